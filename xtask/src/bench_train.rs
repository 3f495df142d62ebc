//! `cargo xtask bench-train`: qgrad's training step against PyTorch's, side by
//! side, on the same machine, network, batch size and thread count.
//!
//! Each image network is trained for a fixed number of steps on random data
//! (SGD with momentum 0.9 and weight decay 5e-4, cross-entropy, training
//! mode: batch norm on batch statistics, dropout on) once by qgrad and once by
//! PyTorch (`xtask/bench_train_torch.py`). The character LSTMs `lstm-<H>`
//! (METHOD §11: one layer of `H` units over one-hot characters of an
//! 87-character vocabulary, War and Peace's, a linear softmax layer,
//! sequences of 100, Adam at 0.002, the global gradient norm clipped at 5,
//! the state carried between steps) train on random characters: qgrad
//! through `qgrad_lstm::LstmRun::train_step`, the path `qgrad train-lstm`
//! runs, and PyTorch through `nn.LSTM`. Every side runs in its own process, so that
//! each peak RSS (`VmHWM` / `ru_maxrss`) is that side's alone; the qgrad side is
//! this same binary re-run with the hidden `--worker` flag, so it trains with
//! the process settings of `qgrad_ops::prepare_cpu_training_process` like any
//! qgrad training run. The thread count is passed as `RAYON_NUM_THREADS` (the
//! pool qgrad-ops' kernels run on) and as `torch.set_num_threads`.
//!
//! PyTorch is a measurement tool, never a dependency: point `--python` (or the
//! `QGRAD_BENCH_PYTHON` environment variable) at an interpreter that has it
//! (default `python3`), or pass `--skip-torch`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use qgrad_models::optim::Sgd;
use qgrad_models::{Arch, Network};
use serde::{Deserialize, Serialize};

#[derive(clap::Args, Debug)]
pub struct BenchTrainArgs {
    /// Networks to train (comma separated): lenet-300-100, lenet-5, alexnet,
    /// vgg-16, the MLPs mlp-<width>x<depth>[-bn] and CNNs cnn-<channels>, and
    /// character LSTMs lstm-<hidden> (e.g. lstm-256) [default: the four
    /// networks with lstm-256 and lstm-512; with --end-to-end
    /// lenet-300-100,lenet-5].
    #[arg(long, value_delimiter = ',')]
    nets: Option<Vec<String>>,
    /// Timed steps per network [default: 40 for LeNet-300-100, 20 LeNet-5,
    /// 10 AlexNet, 3 VGG-16, 10 for an LSTM].
    #[arg(long)]
    steps: Option<usize>,
    /// Untimed steps before the timed ones (allocator, caches, thread pools).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Measurements per side and network, alternating qgrad and PyTorch; the
    /// table shows each side's median run (shared machines drift by tens of
    /// percent between runs, and alternating exposes both sides to it).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Images (or, for an LSTM, sequences of 100 characters) per step
    /// [default: 128 images, 64 sequences].
    #[arg(long)]
    batch: Option<usize>,
    /// Threads for both sides [default: the available cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Python interpreter with PyTorch installed [default: $QGRAD_BENCH_PYTHON, else python3].
    #[arg(long)]
    python: Option<PathBuf>,
    /// Measure qgrad only.
    #[arg(long)]
    skip_torch: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Seed for the weights and the random batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Time the user's path instead of the step: `qgrad train` on full MNIST
    /// for whole epochs (batch assembly, gradient bookkeeping, evaluation,
    /// checkpoints) against the same loop in PyTorch
    /// (`xtask/bench_train_torch_e2e.py`), LeNet-300-100 and LeNet-5 by
    /// default, the CIFAR-10 networks with crop and flip; and
    /// `qgrad train-lstm` on --text against `bench_train_torch_lstm_e2e.py`,
    /// lstm-<hidden>.
    #[arg(long)]
    end_to_end: bool,
    /// --end-to-end: the MNIST folder.
    #[arg(long, default_value = "datasets/mnist")]
    data: PathBuf,
    /// --end-to-end: the CIFAR-10 folder (AlexNet, VGG-16, cnn-<c>).
    #[arg(long, default_value = "datasets/cifar10")]
    cifar: PathBuf,
    /// --end-to-end: stop every epoch of both sides after N batches (a VGG-16
    /// epoch takes minutes); the evaluation and checkpoint still run.
    #[arg(long, value_name = "N")]
    max_batches: Option<usize>,
    /// --end-to-end: train the MNIST networks with this quantizer against the
    /// same loop in PyTorch: `lab` (loss-aware binary weights, `qgrad
    /// quantize loss-aware`, Adam) or `structured` (MLPs: block-sparse 2-bit
    /// weights and 2-bit PACT activations, `qgrad quantize structured`).
    #[arg(long)]
    quantizer: Option<String>,
    /// --end-to-end: the character LSTMs' corpus.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "datasets/war-and-peace/input.txt"
    )]
    text: PathBuf,
    /// --end-to-end: epochs of the timed run [default: 5 for LeNet-300-100,
    /// 2 for LeNet-5, 1 for an LSTM].
    #[arg(long)]
    epochs: Option<usize>,
    /// --end-to-end: the qgrad binary [default: the one beside this xtask].
    #[arg(long, value_name = "PATH")]
    qgrad: Option<PathBuf>,
    /// Internal: run the qgrad side of one network in this process and print
    /// one JSON line.
    #[arg(long, hide = true)]
    worker: bool,
}

/// One side's measurement of one network.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SideResult {
    side: String,
    net: String,
    threads: usize,
    batch: usize,
    steps: usize,
    seconds: f64,
    /// Images (or characters) per second.
    #[serde(alias = "images_per_sec")]
    items_per_sec: f64,
    peak_rss_kib: u64,
    /// qgrad only: mean milliseconds per step in forward, backward and update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    phases_ms: Option<[f64; 3]>,
}

#[derive(Debug, Serialize)]
struct Row {
    net: String,
    /// What the speeds count: img/s or char/s.
    unit: &'static str,
    batch: usize,
    /// The median run of each side (by images/s).
    qgrad: SideResult,
    pytorch: Option<SideResult>,
    /// images/s of every run, in the order measured.
    qgrad_runs: Vec<f64>,
    pytorch_runs: Vec<f64>,
    /// qgrad images/s divided by PyTorch images/s (> 1: qgrad is faster).
    speed_ratio: Option<f64>,
}

/// The networks of the step benchmark when `--nets` is not given.
const DEFAULT_NETS: [&str; 6] = [
    "lenet-300-100",
    "lenet-5",
    "alexnet",
    "vgg-16",
    "lstm-256",
    "lstm-512",
];

/// The networks of `--end-to-end` when `--nets` is not given (the MNIST ones).
const DEFAULT_NETS_END_TO_END: [&str; 2] = ["lenet-300-100", "lenet-5"];

/// What bench-train trains.
#[derive(Debug, Clone, Copy)]
enum BenchNet {
    Image(Arch),
    /// A character LSTM of this many hidden units.
    Lstm(usize),
}

/// Sequence length and vocabulary of the LSTM benchmark (METHOD §11; War and
/// Peace has 87 distinct bytes).
const LSTM_SEQ_LEN: usize = 100;
const LSTM_VOCAB: usize = 87;

impl BenchNet {
    fn parse(name: &str) -> Result<Self> {
        if let Some(h) = name.strip_prefix("lstm-") {
            return match h.parse::<usize>() {
                Ok(h) if h > 0 => Ok(BenchNet::Lstm(h)),
                _ => bail!("'{name}': an LSTM is lstm-<hidden units>, e.g. lstm-256"),
            };
        }
        parse_arch(name).map(BenchNet::Image)
    }

    fn name(&self) -> String {
        match self {
            BenchNet::Image(a) => a.name(),
            BenchNet::Lstm(h) => format!("lstm-{h}"),
        }
    }

    fn default_steps(&self) -> usize {
        match self {
            BenchNet::Image(a) => default_steps(*a),
            BenchNet::Lstm(_) => 10,
        }
    }

    fn default_batch(&self) -> usize {
        match self {
            BenchNet::Image(_) => 128,
            BenchNet::Lstm(_) => 64,
        }
    }

    /// What one item of a batch is.
    fn unit(&self) -> &'static str {
        match self {
            BenchNet::Image(_) => "img/s",
            BenchNet::Lstm(_) => "char/s",
        }
    }
}

fn parse_arch(name: &str) -> Result<Arch> {
    name.parse::<Arch>().ok().with_context(|| {
        let known: Vec<_> = Arch::ALL.iter().map(|a| a.name()).collect();
        format!(
            "unknown network '{name}' (known: {}, mlp-<width>x<depth>[-bn], cnn-<channels>)",
            known.join(", ")
        )
    })
}

/// The Python interpreter with PyTorch when `--python` is not given.
const PYTHON_ENV: &str = "QGRAD_BENCH_PYTHON";

fn default_steps(arch: Arch) -> usize {
    match arch {
        Arch::Lenet300100 => 40,
        Arch::Lenet5 | Arch::Mlp { .. } => 20,
        Arch::AlexNet => 10,
        Arch::Vgg16 | Arch::CifarCnn { .. } => 3,
    }
}

pub fn run(args: BenchTrainArgs) -> Result<()> {
    if args.batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let default_nets: &[&str] = if args.end_to_end {
        &DEFAULT_NETS_END_TO_END
    } else {
        &DEFAULT_NETS
    };
    let nets = args
        .nets
        .clone()
        .unwrap_or_else(|| default_nets.iter().map(|n| n.to_string()).collect());
    let archs = nets
        .iter()
        .map(|n| BenchNet::parse(n.trim()))
        .collect::<Result<Vec<_>>>()?;
    let threads = match args.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    if args.worker {
        let [arch] = archs.as_slice() else {
            bail!("--worker measures exactly one network");
        };
        let steps = args.steps.unwrap_or_else(|| arch.default_steps());
        let batch = args.batch.unwrap_or_else(|| arch.default_batch());
        let result = match *arch {
            BenchNet::Image(a) => qgrad_side(a, batch, steps, args.warmup, threads, args.seed)?,
            BenchNet::Lstm(h) => lstm_side(h, batch, steps, args.warmup, threads, args.seed)?,
        };
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }

    let python = args
        .python
        .clone()
        .or_else(|| std::env::var_os(PYTHON_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"));
    if args.end_to_end {
        if args.skip_torch {
            bail!("--end-to-end compares with PyTorch; --skip-torch does not apply");
        }
        use crate::bench_e2e::E2eNet;
        let image_net: fn(Arch) -> E2eNet = match args.quantizer.as_deref() {
            None => E2eNet::Image,
            Some("lab") => E2eNet::MnistLab,
            Some("structured") => E2eNet::MnistStructured,
            Some(q) => bail!(
                "--quantizer {q}: the PyTorch side implements lab (loss-aware binary weights) \
                 and structured (block-sparse 2-bit weights, 2-bit activations) only"
            ),
        };
        let nets: Vec<_> = archs
            .iter()
            .map(|n| match *n {
                BenchNet::Image(a) => image_net(a),
                BenchNet::Lstm(h) => E2eNet::Lstm(h),
            })
            .collect();
        return crate::bench_e2e::run(crate::bench_e2e::EndToEndOptions {
            nets: &nets,
            data: &args.data,
            cifar: &args.cifar,
            max_batches: args.max_batches,
            text: &args.text,
            epochs: args.epochs,
            threads,
            repeats: args.repeats,
            python: &python,
            qgrad: args.qgrad.as_deref(),
            json: args.json.as_deref(),
        });
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench_train_torch.py");
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let mut rows = Vec::new();
    for &arch in &archs {
        let steps = args.steps.unwrap_or_else(|| arch.default_steps());
        let batch = args.batch.unwrap_or_else(|| arch.default_batch());
        let common = [
            "--steps".to_string(),
            steps.to_string(),
            "--warmup".into(),
            args.warmup.to_string(),
            "--batch".into(),
            batch.to_string(),
            "--threads".into(),
            threads.to_string(),
            "--seed".into(),
            args.seed.to_string(),
        ];
        let mut qgrad_runs = Vec::new();
        let mut torch_runs = Vec::new();
        for repeat in 1..=args.repeats {
            eprintln!(
                "{}: qgrad, {steps} steps of {batch} on {threads} threads (run {repeat}/{})",
                arch.name(),
                args.repeats
            );
            let mut qgrad_cmd = Command::new(&exe);
            qgrad_cmd
                .args(["bench-train", "--worker", "--nets", &arch.name()])
                .args(&common);
            qgrad_runs.push(run_side(qgrad_cmd, threads, "qgrad")?);
            if !args.skip_torch {
                eprintln!("{}: PyTorch (run {repeat}/{})", arch.name(), args.repeats);
                let mut torch_cmd = Command::new(&python);
                torch_cmd
                    .arg(&script)
                    .args(["--net", &arch.name()])
                    .args(&common);
                torch_runs.push(run_side(torch_cmd, threads, "PyTorch")?);
            }
        }
        let speeds = |runs: &[SideResult]| runs.iter().map(|r| r.items_per_sec).collect();
        let (qgrad_speeds, torch_speeds): (Vec<f64>, Vec<f64>) =
            (speeds(&qgrad_runs), speeds(&torch_runs));
        let qgrad = median_run(qgrad_runs).context("no qgrad run")?;
        let pytorch = median_run(torch_runs);
        let speed_ratio = pytorch
            .as_ref()
            .map(|p| qgrad.items_per_sec / p.items_per_sec);
        rows.push(Row {
            net: arch.name(),
            unit: arch.unit(),
            batch,
            qgrad,
            pytorch,
            qgrad_runs: qgrad_speeds,
            pytorch_runs: torch_speeds,
            speed_ratio,
        });
    }
    print_table(&rows, threads, args.repeats);
    if let Some(path) = &args.json {
        write_json(path, &rows)?;
    }
    Ok(())
}

/// The run with the median images/s (the upper median for an even count).
fn median_run(mut runs: Vec<SideResult>) -> Option<SideResult> {
    runs.sort_by(|a, b| a.items_per_sec.total_cmp(&b.items_per_sec));
    let middle = runs.len() / 2;
    runs.into_iter().nth(middle)
}

/// Runs one side in a child process with the thread count in its environment
/// and parses the JSON line it prints last.
fn run_side(mut cmd: Command, threads: usize, what: &str) -> Result<SideResult> {
    let t = threads.to_string();
    cmd.env("RAYON_NUM_THREADS", &t)
        .env("OMP_NUM_THREADS", &t)
        .env("MKL_NUM_THREADS", &t);
    let out = cmd
        .output()
        .with_context(|| format!("starting the {what} side ({cmd:?})"))?;
    if !out.status.success() {
        bail!(
            "the {what} side failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("the {what} side printed no result:\n{stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("parsing the {what} result: {line}"))
}

fn print_table(rows: &[Row], threads: usize, repeats: usize) {
    println!(
        "\n{threads} thread(s), random data; images (SGD) or characters (LSTM: Adam, clip 5, \
         sequences of {LSTM_SEQ_LEN}) per second over the timed steps, median of {repeats} \
         alternating run(s) per side; processor: {}",
        xtask::cpu_model()
    );
    println!(
        "{:<14} {:>6} {:>12} {:>12} {:>7} {:>8} {:>14} {:>14}   qgrad ms/step: fwd / bwd / update",
        "net", "batch", "qgrad", "torch", "unit", "ratio", "qgrad RSS MiB", "torch RSS MiB"
    );
    for row in rows {
        let (torch_ips, torch_rss) = match &row.pytorch {
            Some(p) => (
                format!("{:.1}", p.items_per_sec),
                format!("{:.0}", p.peak_rss_kib as f64 / 1024.0),
            ),
            None => ("-".into(), "-".into()),
        };
        let ratio = row
            .speed_ratio
            .map_or_else(|| "-".to_string(), |r| format!("{r:.2}x"));
        let phases = row.qgrad.phases_ms.map_or_else(String::new, |p| {
            format!("{:.1} / {:.1} / {:.1}", p[0], p[1], p[2])
        });
        println!(
            "{:<14} {:>6} {:>12.1} {:>12} {:>7} {:>8} {:>14.0} {:>14}   {}",
            row.net,
            row.batch,
            row.qgrad.items_per_sec,
            torch_ips,
            row.unit,
            ratio,
            row.qgrad.peak_rss_kib as f64 / 1024.0,
            torch_rss,
            phases
        );
    }
}

/// Atomic write: a temporary file in the same folder, then a rename.
fn write_json(path: &Path, rows: &[Row]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = qgrad_csr::output_temp_file(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    serde_json::to_writer_pretty(&mut tmp, rows)?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Deterministic values in [-1, 1) (splitmix64): the benchmark's input batch.
fn random_values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Mean cross-entropy of `logits [n, k]` against one-hot `targets [n, k]`,
/// written with candle-core ops (log-sum-exp with the row maximum removed).
fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)? as f64;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum)?;
    Ok((log_probs * targets)?.sum_all()?.affine(-1.0 / n, 0.0)?)
}

/// Peak resident set size of this process in KiB (`VmHWM`).
fn peak_rss_kib() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM line in /proc/self/status")
}

fn qgrad_side(
    arch: Arch,
    batch: usize,
    steps: usize,
    warmup: usize,
    threads: usize,
    seed: u64,
) -> Result<SideResult> {
    let device = Device::Cpu;
    let net = Network::new(arch, &device, seed)?;
    let mut sgd = Sgd::new(&net.parameters(), 0.9, 5e-4)?;
    let [c, h, w] = arch.input_shape();
    let classes = arch.num_classes();
    let x = Tensor::from_vec(
        random_values(seed ^ 0x5EED, batch * c * h * w),
        (batch, c, h, w),
        &device,
    )?;
    let labels: Vec<f32> = (0..batch)
        .flat_map(|i| {
            let label = (i * 7 + seed as usize) % classes;
            (0..classes).map(move |k| if k == label { 1.0 } else { 0.0 })
        })
        .collect();
    let targets = Tensor::from_vec(labels, (batch, classes), &device)?.to_dtype(DType::F32)?;

    let mut phases = [0f64; 3];
    let mut step = |timed: bool| -> Result<()> {
        let t0 = Instant::now();
        let logits = net.forward(&x, true)?;
        let loss = cross_entropy(&logits, &targets)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        sgd.step(&grads, 0.01, &[])?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            bail!("{}: the loss became {value}", arch.name());
        }
        let t3 = Instant::now();
        if timed {
            phases[0] += (t1 - t0).as_secs_f64();
            phases[1] += (t2 - t1).as_secs_f64();
            phases[2] += (t3 - t2).as_secs_f64();
        }
        Ok(())
    };
    for _ in 0..warmup {
        step(false)?;
    }
    let start = Instant::now();
    for _ in 0..steps {
        step(true)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let per_step_ms = |s: f64| 1000.0 * s / steps.max(1) as f64;
    Ok(SideResult {
        side: "qgrad".into(),
        net: arch.name(),
        threads,
        batch,
        steps,
        seconds,
        items_per_sec: (batch * steps) as f64 / seconds,
        peak_rss_kib: peak_rss_kib()?,
        phases_ms: Some([
            per_step_ms(phases[0]),
            per_step_ms(phases[1]),
            per_step_ms(phases[2]),
        ]),
    })
}

/// The qgrad side of a character LSTM: `LstmRun::train_step` (float, no
/// normalisation) on random characters, the state carried between steps.
fn lstm_side(
    hidden: usize,
    batch: usize,
    steps: usize,
    warmup: usize,
    threads: usize,
    seed: u64,
) -> Result<SideResult> {
    use qgrad_lstm::{LstmConfig, LstmRun};
    let config = LstmConfig {
        hidden,
        batch,
        seq_len: LSTM_SEQ_LEN,
        seed,
        ..LstmConfig::default()
    };
    let vocab: Vec<u8> = (0..LSTM_VOCAB as u8).map(|b| b + 32).collect();
    let mut run = LstmRun::new(&config, &vocab, &Device::Cpu)?;
    let n = batch * LSTM_SEQ_LEN;
    let tokens = |k: usize| -> Vec<u16> {
        random_values(seed ^ (k as u64 + 1), n)
            .iter()
            .map(|v| (((v + 1.0) / 2.0 * LSTM_VOCAB as f32) as usize).min(LSTM_VOCAB - 1) as u16)
            .collect()
    };
    let (x, y) = (tokens(0), tokens(1));
    let mut state = None;
    for k in 0..warmup {
        run.train_step(&x, &y, &mut state, 0, k)?;
    }
    let start = Instant::now();
    for k in 0..steps {
        run.train_step(&x, &y, &mut state, 0, k)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(SideResult {
        side: "qgrad".into(),
        net: format!("lstm-{hidden}"),
        threads,
        batch,
        steps,
        seconds,
        items_per_sec: (n * steps) as f64 / seconds,
        peak_rss_kib: peak_rss_kib()?,
        phases_ms: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_at(items_per_sec: f64) -> SideResult {
        SideResult {
            side: "qgrad".into(),
            net: "lenet-5".into(),
            threads: 2,
            batch: 128,
            steps: 1,
            seconds: 1.0,
            items_per_sec,
            peak_rss_kib: 0,
            phases_ms: None,
        }
    }

    #[test]
    fn median_run_picks_the_middle_speed() {
        let runs = vec![run_at(30.0), run_at(10.0), run_at(20.0)];
        assert_eq!(median_run(runs).unwrap().items_per_sec, 20.0);
        let runs = vec![run_at(4.0), run_at(1.0), run_at(3.0), run_at(2.0)];
        assert_eq!(median_run(runs).unwrap().items_per_sec, 3.0);
        assert!(median_run(Vec::new()).is_none());
    }
}
