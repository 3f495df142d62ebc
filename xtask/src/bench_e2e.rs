//! `cargo xtask bench-train --end-to-end`: the path a user runs, timed whole.
//!
//! The step benchmark of [`crate::bench_train`] times a stripped training
//! step on random data. This mode runs the real programs on the real data
//! set: `qgrad train --model M --data D --epochs E --json` (the release
//! binary beside this one, or `--qgrad`) against `bench_train_torch_e2e.py`,
//! which trains the same network the same way in PyTorch (batch 128, SGD with
//! momentum 0.9 and weight decay 5e-4, cosine from lr 0.05, the accumulated
//! |gradient| after every backward pass, a full test evaluation and an atomic
//! checkpoint after every epoch). Each side runs as its own process with the
//! same thread count, alternating sides, `--repeats` times.
//!
//! What is reported, per side (the median run by epoch time):
//! * **process seconds**, what `time` shows a user (PyTorch's includes
//!   `import torch`, 2–4 s with a warm page cache, far more on a cold one);
//! * **seconds per epoch**: from the moment the side reports that training
//!   starts (its first stderr line beginning with `training `, which
//!   `qgrad train` prints once the data and network are ready) to the moment
//!   it reports the last epoch done (its last line beginning with `epoch `,
//!   printed after the evaluation and the checkpoint), over the epochs; the
//!   script prints both lines at the same points. So every per-epoch cost
//!   (batch assembly, the step, the gradient bookkeeping, evaluation,
//!   checkpointing) counts and start-up and teardown do not (PyTorch's
//!   interpreter takes about a second to exit), measured the same way on
//!   both sides from outside;
//! * images per second from that, the final test accuracy (both sides train
//!   the same recipe, so they should agree within noise), and the peak RSS
//!   of the process (`wait4`'s `ru_maxrss`).
//!
//! Character LSTMs `lstm-<H>` run the same way: `qgrad train-lstm --text T
//! --hidden H --epochs E --json` against `bench_train_torch_lstm_e2e.py`
//! (the corpus split as qgrad-data lays it out, nn.LSTM over one-hot
//! characters, Adam at 0.002, the gradient norm clipped at 5, the state
//! carried, the validation bits per character and an atomic checkpoint after
//! every epoch); the rate is characters per second and the result the test
//! bits per character.
//!
//! With `--quantizer lab` the MNIST networks train with loss-aware binary
//! weights instead (METHOD §10): `qgrad quantize loss-aware --quantizer lab`
//! with Adam (lr 0.005, cosine, batch 100, no weight decay) against the same
//! loop in the script (`--quantizer lab`), the result being the binary
//! network's test accuracy (qgrad's from its file).
//!
//! With `--quantizer structured` an MNIST MLP (LeNet-300-100 or
//! `mlp-<w>x<d>`) trains under structured sparsity with low-bit weights and
//! activations instead (METHOD §9): `qgrad quantize structured` at its
//! defaults (2-bit weights, 2-bit PACT activations, 16×16 blocks at 4x
//! compression drawn at random, `α = max |W|`) with Adam (lr 0.002, cosine,
//! batch 100, no weight decay) against the script's `--quantizer structured`
//! (the same masks rule, quantizers and PACT clips as PyTorch modules), the
//! result being the quantized network's test accuracy (qgrad's from its
//! file).
//!
//! The CIFAR-10 networks (AlexNet, VGG-16, `cnn-<c>`) run `qgrad train` on
//! `--cifar` with their recipe's augmentation (zero padding by 4, a random
//! 32×32 crop and a horizontal flip per image) and per-channel
//! normalisation from the training set; the script does the same per batch
//! with one indexing operation, and computes the statistics after its
//! `training` line, where qgrad computes them. A VGG-16 epoch takes minutes
//! on 2 cores, so `--max-batches N` cuts every epoch of both sides short
//! (the per-epoch evaluation of the whole test set and the checkpoint still
//! run, and count).

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use qgrad_models::{Arch, DatasetKind};
use serde::Serialize;

/// A network of the end-to-end mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E2eNet {
    /// An MNIST or CIFAR-10 network, trained by `qgrad train` (CIFAR-10's
    /// with crop and flip).
    Image(Arch),
    /// An MNIST network with loss-aware binary weights (LAB, METHOD §10),
    /// trained by `qgrad quantize loss-aware --quantizer lab` with Adam.
    MnistLab(Arch),
    /// An MNIST MLP with block-sparse 2-bit weights and 2-bit activations
    /// (METHOD §9), trained by `qgrad quantize structured` with Adam.
    MnistStructured(Arch),
    /// A character LSTM of this many hidden units, by `qgrad train-lstm`.
    Lstm(usize),
}

impl E2eNet {
    fn name(self) -> String {
        match self {
            E2eNet::Image(a) => a.name(),
            E2eNet::MnistLab(a) => format!("{} lab", a.name()),
            E2eNet::MnistStructured(a) => format!("{} struct", a.name()),
            E2eNet::Lstm(h) => format!("lstm-{h}"),
        }
    }

    /// Default epochs of the timed run (the LeNet-300-100
    /// measurement used 5, LeNet-5's 2; a CIFAR-10 epoch is 36 s to 13 min
    /// on 2 cores, an LSTM epoch over War and Peace 2.6 M characters, tens
    /// of seconds to minutes).
    fn default_epochs(self) -> usize {
        match self {
            E2eNet::Image(Arch::Lenet5) | E2eNet::MnistLab(Arch::Lenet5) => 2,
            E2eNet::Image(a) if a.dataset() == DatasetKind::Cifar10 => 1,
            E2eNet::Image(_) | E2eNet::MnistLab(_) | E2eNet::MnistStructured(_) => 5,
            E2eNet::Lstm(_) => 1,
        }
    }

    /// The training batch of the recipe.
    fn batch(self) -> usize {
        match self {
            E2eNet::Image(_) => 128,
            E2eNet::MnistLab(_) | E2eNet::MnistStructured(_) => 100,
            E2eNet::Lstm(_) => LSTM_BATCH,
        }
    }

    /// The key of the result in qgrad's and in the script's JSON, and what
    /// it is.
    fn metric(self) -> [&'static str; 3] {
        match self {
            E2eNet::Image(_) => ["test_accuracy", "test_accuracy", "test accuracy"],
            // The binary network's accuracy: from the file (the integer
            // kernels, equal to candle's evaluation) against PyTorch's
            // evaluation with the binary weights.
            E2eNet::MnistLab(_) | E2eNet::MnistStructured(_) => {
                ["file_accuracy", "test_accuracy", "test accuracy"]
            }
            E2eNet::Lstm(_) => ["test_bpc", "test_bpc", "test bits per character"],
        }
    }

    /// The MNIST script's options that make its loop this net's recipe
    /// (the qgrad side's flags, as the script spells them).
    fn torch_recipe(self) -> &'static [&'static str] {
        match self {
            E2eNet::Image(_) => &["--batch", "128"],
            E2eNet::MnistLab(_) => &[
                "--batch",
                "100",
                "--lr",
                "0.005",
                "--optimizer",
                "adam",
                "--weight-decay",
                "0",
                "--quantizer",
                "lab",
            ],
            E2eNet::MnistStructured(_) => &[
                "--batch",
                "100",
                "--lr",
                "0.002",
                "--optimizer",
                "adam",
                "--weight-decay",
                "0",
                "--quantizer",
                "structured",
            ],
            E2eNet::Lstm(_) => &[],
        }
    }

    /// Refuses what the PyTorch scripts have no twin of.
    fn check(self) -> Result<()> {
        match self {
            E2eNet::MnistStructured(Arch::Lenet300100 | Arch::Mlp { .. }) => Ok(()),
            E2eNet::MnistStructured(a) => bail!(
                "--quantizer structured covers the MNIST MLPs (lenet-300-100, \
                 mlp-<width>x<depth>[-bn]); the PyTorch script has no {} twin",
                a.name()
            ),
            E2eNet::MnistLab(a) if a.dataset() != DatasetKind::Mnist => bail!(
                "--quantizer lab covers the MNIST networks (lenet-300-100, lenet-5, \
                 mlp-<width>x<depth>[-bn]); the PyTorch script has no {} twin",
                a.name()
            ),
            _ => Ok(()),
        }
    }

    fn arch(self) -> Option<Arch> {
        match self {
            E2eNet::Image(a) | E2eNet::MnistLab(a) | E2eNet::MnistStructured(a) => Some(a),
            E2eNet::Lstm(_) => None,
        }
    }
}

/// The options of the end-to-end mode.
pub struct EndToEndOptions<'a> {
    pub nets: &'a [E2eNet],
    /// The MNIST folder.
    pub data: &'a Path,
    /// The CIFAR-10 folder.
    pub cifar: &'a Path,
    /// Stop every epoch of both sides after this many batches.
    pub max_batches: Option<usize>,
    /// The LSTMs' corpus.
    pub text: &'a Path,
    pub epochs: Option<usize>,
    pub threads: usize,
    pub repeats: usize,
    pub python: &'a Path,
    pub qgrad: Option<&'a Path>,
    pub json: Option<&'a Path>,
}

/// One child process's measurement.
#[derive(Debug, Clone, Serialize)]
struct ProcessRun {
    epochs: usize,
    seconds: f64,
    /// From the side's `training …` line to its last `epoch …` line.
    loop_seconds: f64,
    peak_rss_kib: u64,
    /// The test accuracy (MNIST) or test bits per character (LSTM).
    metric: f64,
}

/// One side of one network.
#[derive(Debug, Clone, Serialize)]
struct SideSummary {
    /// The median run (by its epoch time).
    process_seconds: f64,
    seconds_per_epoch: f64,
    /// Images (MNIST) or characters (LSTM) per second.
    items_per_second: f64,
    metric: f64,
    peak_rss_kib: u64,
    /// Every run, in the order measured.
    runs: Vec<ProcessRun>,
}

#[derive(Debug, Serialize)]
struct EndToEndRow {
    net: String,
    epochs: usize,
    /// Training images (or characters) per epoch.
    train_items: usize,
    /// What `metric` is.
    metric: &'static str,
    qgrad: SideSummary,
    pytorch: SideSummary,
    /// PyTorch's seconds per epoch over qgrad's (> 1: qgrad is faster).
    speed_ratio: f64,
}

/// Runs the comparison and prints its table.
pub fn run(opts: EndToEndOptions<'_>) -> Result<()> {
    for &net in opts.nets {
        net.check()?;
    }
    if opts.max_batches == Some(0) {
        bail!("--max-batches must be at least 1");
    }
    if opts.max_batches.is_some() && opts.nets.iter().any(|n| matches!(n, E2eNet::Lstm(_))) {
        bail!("--max-batches applies to the image networks; an LSTM epoch is the whole corpus");
    }
    let uses = |kind| {
        opts.nets
            .iter()
            .any(|n| n.arch().map(Arch::dataset) == Some(kind))
    };
    let mnist_images = if uses(DatasetKind::Mnist) {
        let (train, _) = qgrad_data::mnist::load_mnist(opts.data)
            .with_context(|| format!("--end-to-end needs full MNIST in {}", opts.data.display()))?;
        train.len()
    } else {
        0
    };
    let cifar_images = if uses(DatasetKind::Cifar10) {
        let (train, _) = qgrad_data::cifar::load_cifar10(opts.cifar)
            .with_context(|| format!("--end-to-end needs CIFAR-10 in {}", opts.cifar.display()))?;
        train.len()
    } else {
        0
    };
    let corpus_chars = if opts.nets.iter().any(|n| matches!(n, E2eNet::Lstm(_))) {
        let corpus = qgrad_data::text::TextCorpus::load(opts.text).with_context(|| {
            format!("--end-to-end needs the LSTM corpus {}", opts.text.display())
        })?;
        let split = corpus
            .split(LSTM_BATCH, LSTM_SEQ_LEN)
            .with_context(|| format!("splitting {}", opts.text.display()))?;
        split.train.len() * LSTM_BATCH * LSTM_SEQ_LEN
    } else {
        0
    };
    let qgrad = match opts.qgrad {
        Some(p) => p.to_path_buf(),
        None => sibling_qgrad()?,
    };
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = tempfile::tempdir().context("creating a scratch folder for checkpoints")?;
    let mut rows = Vec::new();
    for &net in opts.nets {
        let epochs = opts.epochs.unwrap_or_else(|| net.default_epochs());
        ensure!(epochs >= 1, "--epochs must be at least 1");
        let [qgrad_key, torch_key, metric_name] = net.metric();
        let data = match net.arch().map(Arch::dataset) {
            Some(DatasetKind::Cifar10) => opts.cifar,
            _ => opts.data,
        };
        let max_batches: Vec<String> = opts
            .max_batches
            .map(|b| vec!["--max-batches".to_string(), b.to_string()])
            .unwrap_or_default();
        let mut sides: [Vec<ProcessRun>; 2] = [Vec::new(), Vec::new()];
        for repeat in 1..=opts.repeats {
            for (s, side) in ["qgrad", "PyTorch"].iter().enumerate() {
                eprintln!(
                    "{}: {side}, {epochs} epoch(s) on {} threads (run {repeat}/{})",
                    net.name(),
                    opts.threads,
                    opts.repeats
                );
                let out = scratch
                    .path()
                    .join(format!("{}-{side}-{repeat}", net.name()));
                let e = epochs.to_string();
                let threads = opts.threads.to_string();
                let mut cmd = match (net, s) {
                    (E2eNet::Image(arch), 0) => {
                        let mut c = Command::new(&qgrad);
                        c.args(["train", "--model", &arch.name(), "--data"])
                            .arg(data)
                            .args(&max_batches)
                            .args(["--epochs", &e, "--batch-size", "128"])
                            .args(["--json", "--no-progress", "--out"])
                            .arg(&out);
                        c
                    }
                    (E2eNet::MnistLab(arch), 0) => {
                        let mut c = Command::new(&qgrad);
                        c.args(["quantize", "loss-aware", "--quantizer", "lab", "--model"])
                            .arg(arch.name())
                            .arg("--data")
                            .arg(data)
                            .args(&max_batches)
                            .args(["--epochs", &e, "--batch-size", "100", "--lr", "0.005"])
                            .args(["--weight-decay", "0", "--json", "--no-progress", "--out"])
                            .arg(&out);
                        c
                    }
                    (E2eNet::MnistStructured(arch), 0) => {
                        let mut c = Command::new(&qgrad);
                        c.args(["quantize", "structured", "--model"])
                            .arg(arch.name())
                            .arg("--data")
                            .arg(data)
                            .args(&max_batches)
                            .args(["--epochs", &e, "--batch-size", "100", "--lr", "0.002"])
                            .args(["--optimizer", "adam", "--weight-decay", "0"])
                            .args(["--json", "--no-progress", "--out"])
                            .arg(&out);
                        c
                    }
                    (
                        E2eNet::Image(arch)
                        | E2eNet::MnistLab(arch)
                        | E2eNet::MnistStructured(arch),
                        _,
                    ) => {
                        let mut c = Command::new(opts.python);
                        c.arg(here.join("bench_train_torch_e2e.py"))
                            .args(["--net", &arch.name(), "--data"])
                            .arg(data)
                            .args(&max_batches)
                            .args(["--epochs", &e])
                            .args(net.torch_recipe())
                            .args(["--threads", &threads, "--out"])
                            .arg(&out);
                        c
                    }
                    (E2eNet::Lstm(h), 0) => {
                        let mut c = Command::new(&qgrad);
                        c.args(["train-lstm", "--text"])
                            .arg(opts.text)
                            .args(["--hidden", &h.to_string(), "--epochs", &e, "--json"])
                            .arg("--checkpoint")
                            .arg(&out);
                        c
                    }
                    (E2eNet::Lstm(h), _) => {
                        let mut c = Command::new(opts.python);
                        c.arg(here.join("bench_train_torch_lstm_e2e.py"))
                            .arg("--text")
                            .arg(opts.text)
                            .args(["--hidden", &h.to_string(), "--epochs", &e])
                            .args(["--threads", &threads, "--out"])
                            .arg(&out);
                        c
                    }
                };
                let key = if s == 0 { qgrad_key } else { torch_key };
                sides[s].push(run_process(&mut cmd, opts.threads, side, epochs, key)?);
            }
        }
        let train_items = match net.arch().map(Arch::dataset) {
            Some(DatasetKind::Mnist) => mnist_images,
            Some(DatasetKind::Cifar10) => cifar_images,
            None => corpus_chars,
        };
        // The images an epoch cut short by --max-batches trains on.
        let train_items = opts
            .max_batches
            .map_or(train_items, |b| train_items.min(b * net.batch()));
        let [q, t] = sides.map(|runs| summarise(runs, train_items));
        let speed_ratio = t.seconds_per_epoch / q.seconds_per_epoch;
        rows.push(EndToEndRow {
            net: net.name(),
            epochs,
            train_items,
            metric: metric_name,
            qgrad: q,
            pytorch: t,
            speed_ratio,
        });
    }
    print_table(&rows, opts.threads, opts.repeats);
    if let Some(path) = opts.json {
        xtask::fsutil::write_atomic(path, &serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

/// The LSTMs' batch and sequence length: `qgrad train-lstm`'s defaults,
/// which the script shares.
const LSTM_BATCH: usize = 64;
const LSTM_SEQ_LEN: usize = 100;

/// The `qgrad` binary next to this one (both are built into the same
/// `target/<profile>/`).
fn sibling_qgrad() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let path = exe.with_file_name(format!("qgrad{}", std::env::consts::EXE_SUFFIX));
    ensure!(
        path.is_file(),
        "no qgrad binary at {}: build it with `cargo build --release -p qgrad-cli` (and run \
         xtask from the same profile), or pass --qgrad PATH",
        path.display()
    );
    Ok(path)
}

fn summarise(mut runs: Vec<ProcessRun>, items: usize) -> SideSummary {
    let all = runs.clone();
    runs.sort_by(|a, b| a.loop_seconds.total_cmp(&b.loop_seconds));
    let median = &runs[runs.len() / 2];
    let seconds_per_epoch = median.loop_seconds / median.epochs as f64;
    SideSummary {
        process_seconds: median.seconds,
        seconds_per_epoch,
        items_per_second: items as f64 / seconds_per_epoch,
        metric: median.metric,
        peak_rss_kib: median.peak_rss_kib,
        runs: all,
    }
}

/// Runs `cmd` to completion with the thread count in its environment; its
/// wall time, its own peak RSS and `metric` of its JSON output.
fn run_process(
    cmd: &mut Command,
    threads: usize,
    side: &str,
    epochs: usize,
    metric: &str,
) -> Result<ProcessRun> {
    let t = threads.to_string();
    cmd.env("RAYON_NUM_THREADS", &t)
        .env("OMP_NUM_THREADS", &t)
        .env("MKL_NUM_THREADS", &t)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the {side} side ({cmd:?})"))?;
    // Both pipes drained on threads so that neither can fill and stall it.
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let err_thread = std::thread::spawn(move || {
        let mut text = String::new();
        let (mut ready, mut last_epoch) = (None, None);
        for line in std::io::BufReader::new(&mut stderr).lines() {
            let Ok(line) = line else { break };
            if ready.is_none() && line.starts_with("training ") {
                ready = Some(start.elapsed().as_secs_f64());
            }
            if line.starts_with("epoch ") {
                last_epoch = Some(start.elapsed().as_secs_f64());
            }
            text.push_str(&line);
            text.push('\n');
        }
        (text, ready.zip(last_epoch))
    });
    let mut out = String::new();
    stdout
        .read_to_string(&mut out)
        .context("reading the side's output")?;
    let (status, peak_rss_kib) = wait_with_rusage(&mut child)?;
    let seconds = start.elapsed().as_secs_f64();
    let (err, ready) = err_thread.join().unwrap_or_default();
    if !status.success() {
        bail!("the {side} side failed ({status}):\n{err}");
    }
    let (ready, done) = ready.with_context(|| {
        format!("the {side} side printed no `training …` and `epoch …` lines on stderr:\n{err}")
    })?;
    let json = parse_last_json(&out)
        .with_context(|| format!("the {side} side printed no JSON result:\n{out}\n{err}"))?;
    let metric = json[metric]
        .as_f64()
        .with_context(|| format!("no {metric} in the {side} side's result"))?;
    Ok(ProcessRun {
        epochs,
        seconds,
        loop_seconds: done - ready,
        peak_rss_kib,
        metric,
    })
}

/// The last JSON document in `out`: `qgrad train --json` pretty-prints one
/// document, the script prints one line.
fn parse_last_json(out: &str) -> Option<serde_json::Value> {
    let start = out
        .rfind("\n{")
        .map_or_else(|| out.find('{'), |i| Some(i + 1))?;
    serde_json::from_str(&out[start..]).ok()
}

/// Waits for `child` and returns its exit status and its own peak RSS in KiB.
#[cfg(target_os = "linux")]
fn wait_with_rusage(child: &mut std::process::Child) -> Result<(std::process::ExitStatus, u64)> {
    use std::os::unix::process::ExitStatusExt;
    let pid = libc::pid_t::try_from(child.id()).context("process id out of range")?;
    let mut status: libc::c_int = 0;
    // SAFETY: `rusage` is plain old data that wait4 fills; `status` and
    // `usage` outlive the call. std offers no per-child rusage (`Child::wait`
    // discards it), and RUSAGE_CHILDREN is the maximum over every child so
    // far, which would mix the two sides.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    ensure!(
        reaped == pid,
        "waiting for process {pid}: {}",
        std::io::Error::last_os_error()
    );
    let peak = u64::try_from(usage.ru_maxrss).unwrap_or(0);
    Ok((std::process::ExitStatus::from_raw(status), peak))
}

#[cfg(not(target_os = "linux"))]
fn wait_with_rusage(child: &mut std::process::Child) -> Result<(std::process::ExitStatus, u64)> {
    // Peak RSS is measured on Linux only; elsewhere it reads 0.
    Ok((child.wait()?, 0))
}

fn print_table(rows: &[EndToEndRow], threads: usize, repeats: usize) {
    println!(
        "\nend to end, {threads} thread(s); MNIST and CIFAR-10 (crop and flip): the full training \
         set or --max-batches, batch 128, SGD momentum 0.9 + wd 5e-4, cosine (lab: binary weights, batch 100, Adam 0.005, cosine; struct: 2-bit weights and \
         activations, 16x16 blocks at 4x, batch 100, Adam 0.002, cosine); LSTM: batch 64 x 100 characters, Adam 0.002, clip 5; seconds per epoch from each \
         side's `training` line to its last `epoch` line, over E; images or characters per \
         second; median of {repeats} alternating run(s) per side; processor: {}",
        xtask::cpu_model()
    );
    println!(
        "{:<20} {:>3} {:>10} {:>10} {:>10} {:>10} {:>7} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}",
        "net",
        "E",
        "qgrad s",
        "torch s",
        "qgrad s/ep",
        "torch s/ep",
        "ratio",
        "qgrad /s",
        "torch /s",
        "qgrad test",
        "torch test",
        "qgrad MiB",
        "torch MiB"
    );
    let shown = |r: &EndToEndRow, v: f64| {
        if r.metric == "test accuracy" {
            format!("{:.2} %", 100.0 * v)
        } else {
            format!("{v:.3} bpc")
        }
    };
    for r in rows {
        println!(
            "{:<20} {:>3} {:>10.2} {:>10.2} {:>10.3} {:>10.3} {:>6.2}x {:>9.0} {:>9.0} {:>10} {:>10} {:>9.0} {:>9.0}",
            r.net,
            r.epochs,
            r.qgrad.process_seconds,
            r.pytorch.process_seconds,
            r.qgrad.seconds_per_epoch,
            r.pytorch.seconds_per_epoch,
            r.speed_ratio,
            r.qgrad.items_per_second,
            r.pytorch.items_per_second,
            shown(r, r.qgrad.metric),
            shown(r, r.pytorch.metric),
            r.qgrad.peak_rss_kib as f64 / 1024.0,
            r.pytorch.peak_rss_kib as f64 / 1024.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_json_of_pretty_and_line_output() {
        let pretty = "noise\n{\n  \"a\": {\"b\": 1},\n  \"test_accuracy\": 0.5\n}\n";
        assert_eq!(parse_last_json(pretty).unwrap()["test_accuracy"], 0.5);
        let line = "warning\n{\"test_accuracy\": 0.25}\n";
        assert_eq!(parse_last_json(line).unwrap()["test_accuracy"], 0.25);
        assert!(parse_last_json("no json").is_none());
    }

    #[test]
    fn lstm_rows_read_bits_per_character_over_one_epoch() {
        let net = E2eNet::Lstm(256);
        assert_eq!(net.name(), "lstm-256");
        assert_eq!(net.default_epochs(), 1);
        assert_eq!(net.metric()[0], "test_bpc");
        let mnist = E2eNet::Image(Arch::Lenet5);
        assert_eq!(
            (mnist.default_epochs(), mnist.metric()[0]),
            (2, "test_accuracy")
        );
        // The binary network's qgrad result is the file's accuracy.
        let lab = E2eNet::MnistLab(Arch::Lenet300100);
        assert_eq!(
            (lab.name().as_str(), lab.metric()[0]),
            ("lenet-300-100 lab", "file_accuracy")
        );
        let line = "{\"side\": \"pytorch\", \"test_bpc\": 1.75}\n";
        assert_eq!(parse_last_json(line).unwrap()[net.metric()[1]], 1.75);
    }

    #[test]
    fn structured_rows_cover_the_mlps_only() {
        let mlp: Arch = "mlp-512x2".parse().unwrap();
        let net = E2eNet::MnistStructured(mlp);
        assert_eq!(net.name(), "mlp-512x2 struct");
        assert_eq!(net.metric()[0], "file_accuracy");
        assert!(net.check().is_ok());
        assert!(E2eNet::MnistStructured(Arch::Lenet300100).check().is_ok());
        // The script's structured twin is an MLP; LeNet-5 has convolutions.
        let err = E2eNet::MnistStructured(Arch::Lenet5).check().unwrap_err();
        assert!(err.to_string().contains("MLPs"), "{err}");
        // The plain loop covers CIFAR-10 too; LAB's twin is MNIST's.
        assert!(E2eNet::Image(Arch::AlexNet).check().is_ok());
        assert!(E2eNet::Image(Arch::Vgg16).check().is_ok());
        let err = E2eNet::MnistLab(Arch::Vgg16).check().unwrap_err();
        assert!(err.to_string().contains("MNIST"), "{err}");
        assert!(E2eNet::Image(mlp).check().is_ok());
        // CIFAR-10 epochs default to one, with the recipe's batch.
        assert_eq!(E2eNet::Image(Arch::Vgg16).default_epochs(), 1);
        assert_eq!(E2eNet::Image(Arch::AlexNet).batch(), 128);
        assert_eq!(net.batch(), 100);
    }

    #[test]
    fn per_epoch_time_is_the_median_loop_over_epochs() {
        let run = |seconds, loop_seconds| ProcessRun {
            epochs: 5,
            seconds,
            loop_seconds,
            peak_rss_kib: 1,
            metric: 0.9,
        };
        let s = summarise(vec![run(9.0, 7.5), run(7.0, 5.0), run(11.0, 10.0)], 60_000);
        // Loops of 7.5, 5.0 and 10.0 s: the median is the first run's.
        assert_eq!(s.seconds_per_epoch, 1.5);
        assert_eq!(s.process_seconds, 9.0);
        assert_eq!(s.items_per_second, 40_000.0);
        assert_eq!(s.runs.len(), 3);
    }
}
