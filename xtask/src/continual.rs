//! `cargo xtask continual`: continual learning on a pruned MLP by growing
//! connections (METHOD §14): split MNIST into five two-digit tasks; for each
//! task, grow new connections in rounds, either uniformly at random or by
//! internal preferential attachment (a connection `i → j` is drawn with
//! probability ∝ `(k_out(i) + 1)(k_in(j) + 1)`, the degrees of its two units
//! among the connections present), train only them while every older
//! connection stays fixed, and stop once the task reaches the target
//! accuracy. Reported per task, averaged over seeds: the accuracy on every
//! task seen so far, the network size (connections) and the training time.
//!
//! # Decisions
//!
//! * Network: `mlp-256x2` (784-256-256-10), one shared 10-way head; a task's
//!   accuracy is taken over its two classes' logits (task-incremental
//!   evaluation: the task is known at test time).
//! * A grown connection starts at the value the dense network's seeded
//!   initialisation gives it; absent connections are 0 and frozen.
//! * Output-layer connections grow only into the current task's two output
//!   units, and only their biases train (hidden biases train on the first
//!   task only), so that nothing old moves.
//! * Each round grows `grow` connections spread over the layers in proportion
//!   to their sizes, then trains one epoch (SGD, momentum 0.9, lr 0.05,
//!   batch 128, no weight decay); at most `max_rounds` rounds per task.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use qgrad_accum::FreezeMask;
use qgrad_models::data::{Augment, Dataset};
use qgrad_models::{train, Arch, LrSchedule, TrainConfig, TrainState};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::fsutil::write_atomic;

/// How new connections are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Growth {
    /// Uniformly among the absent connections.
    Random,
    /// Internal preferential attachment.
    Preferential,
}

/// The experiment's options.
#[derive(Debug, Clone)]
pub struct ContinualOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    pub seeds: Vec<u64>,
    pub grow: usize,
    pub max_rounds: usize,
    pub target: f64,
    /// Training images per task (all when `None`).
    pub train_per_task: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
struct TaskResult {
    growth: Growth,
    seed: u64,
    task: usize,
    rounds: usize,
    connections: usize,
    seconds: f64,
    task_accuracy: f64,
    /// Mean accuracy over the tasks seen so far.
    seen_accuracy: f64,
}

const LAYERS: [&str; 3] = ["fc1", "fc2", "fc3"];

fn subset(data: &Dataset, classes: [u8; 2], limit: Option<usize>) -> Dataset {
    let size = data.image_size();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (i, &l) in data.labels.iter().enumerate() {
        if classes.contains(&l) {
            images.extend_from_slice(&data.images[i * size..(i + 1) * size]);
            labels.push(l);
            if limit.is_some_and(|n| labels.len() >= n) {
                break;
            }
        }
    }
    Dataset {
        images,
        labels,
        shape: data.shape,
        num_classes: data.num_classes,
    }
}

/// Accuracy on `data` of the argmax over `classes`' logits only.
fn task_accuracy(
    state: &TrainState,
    data: &Dataset,
    config: &TrainConfig,
    classes: [u8; 2],
) -> Result<f64> {
    let norm = config.normalization.clone().context("normalisation")?;
    let mut rng = qgrad_models::data::epoch_rng(0, 0, 0);
    let mut input = Vec::new();
    let all: Vec<usize> = (0..data.len()).collect();
    let mut correct = 0usize;
    for chunk in all.chunks(500) {
        data.gather(chunk, &norm, Augment::None, &mut rng, &mut input);
        let [c, h, w] = data.shape;
        let x = Tensor::from_slice(&input, (chunk.len(), c, h, w), &Device::Cpu)?;
        let logits: Vec<Vec<f32>> = state.network.forward(&x, false)?.to_vec2()?;
        for (row, &i) in logits.iter().zip(chunk) {
            let pick = if row[classes[0] as usize] >= row[classes[1] as usize] {
                classes[0]
            } else {
                classes[1]
            };
            correct += usize::from(pick == data.labels[i]);
        }
    }
    Ok(correct as f64 / data.len().max(1) as f64)
}

/// Draws `n` absent entries of `present` (row-major `[rows, cols]`), among
/// `allowed` rows, by `growth`.
fn draw(
    present: &[bool],
    rows: usize,
    cols: usize,
    allowed_rows: &[usize],
    n: usize,
    growth: Growth,
    rng: &mut ChaCha8Rng,
) -> Vec<usize> {
    let mut k_in = vec![0f64; rows];
    let mut k_out = vec![0f64; cols];
    for (e, &p) in present.iter().enumerate() {
        if p {
            k_in[e / cols] += 1.0;
            k_out[e % cols] += 1.0;
        }
    }
    // Efraimidis–Spirakis: the n largest u^(1/w) are a weighted sample
    // without replacement.
    let mut keys: Vec<(f64, usize)> = Vec::new();
    for &r in allowed_rows {
        for (c, k_c) in k_out.iter().enumerate() {
            let e = r * cols + c;
            if present[e] {
                continue;
            }
            let w = match growth {
                Growth::Random => 1.0,
                Growth::Preferential => (k_in[r] + 1.0) * (k_c + 1.0),
            };
            let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            keys.push((u.ln() / w, e));
        }
    }
    let n = n.min(keys.len());
    if n == 0 {
        return Vec::new();
    }
    keys.select_nth_unstable_by(n - 1, |a, b| b.0.total_cmp(&a.0));
    keys[..n].iter().map(|&(_, e)| e).collect()
}

fn run_one(
    growth: Growth,
    seed: u64,
    opts: &ContinualOptions,
    train_set: &Dataset,
    test_set: &Dataset,
) -> Result<Vec<TaskResult>> {
    let arch = Arch::Mlp {
        width: 256,
        depth: 2,
        batch_norm: false,
    };
    let mut config = TrainConfig::default_for(arch);
    config.seed = seed;
    config.lr = 0.05;
    config.weight_decay = 0.0;
    config.schedule = LrSchedule::Constant;
    config.progress = false;
    config.epochs = 0;
    let mut state = TrainState::new(arch, &Device::Cpu, &config)?;
    let init = state.network.params_to_host()?;
    let shapes: Vec<(usize, usize)> = LAYERS
        .iter()
        .map(|l| {
            let t = init
                .iter()
                .find(|t| t.name == format!("{l}.weight"))
                .expect("weight");
            (t.shape[0], t.shape[1])
        })
        .collect();
    let total: usize = shapes.iter().map(|(r, c)| r * c).sum();
    let mut present: Vec<Vec<bool>> = shapes.iter().map(|(r, c)| vec![false; r * c]).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut results = Vec::new();
    let mut seen: Vec<([u8; 2], Dataset)> = Vec::new();
    let mut snapshot: Vec<Vec<f32>> = Vec::new();
    for task in 0..5usize {
        let classes = [2 * task as u8, 2 * task as u8 + 1];
        let train_t = subset(train_set, classes, opts.train_per_task);
        let test_t = subset(test_set, classes, None);
        seen.push((classes, test_t.clone()));
        let t0 = Instant::now();
        let mut new: Vec<Vec<bool>> = shapes.iter().map(|(r, c)| vec![false; r * c]).collect();
        let mut rounds = 0;
        let mut accuracy = 0.0;
        while rounds < opts.max_rounds {
            rounds += 1;
            for (l, &(rows, cols)) in shapes.iter().enumerate() {
                let allowed: Vec<usize> = if l + 1 == LAYERS.len() {
                    classes.iter().map(|&c| c as usize).collect()
                } else {
                    (0..rows).collect()
                };
                let share = (opts.grow * rows * cols).div_ceil(total);
                let mut both = present[l].clone();
                for (b, n) in both.iter_mut().zip(&new[l]) {
                    *b |= *n;
                }
                for e in draw(&both, rows, cols, &allowed, share, growth, &mut rng) {
                    new[l][e] = true;
                }
            }
            // Weights: present and new keep their values, new ones start at
            // their initial value (the first time), absent ones are 0.
            for (l, layer) in LAYERS.iter().enumerate() {
                let name = format!("{layer}.weight");
                let var = state.network.parameter(&name).context("weight")?;
                let mut w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
                let start = &init.iter().find(|t| t.name == name).context("init")?.values;
                for e in 0..w.len() {
                    if new[l][e] && w[e] == 0.0 {
                        w[e] = start[e];
                    } else if !present[l][e] && !new[l][e] {
                        w[e] = 0.0;
                    }
                }
                let dims = var.dims().to_vec();
                state
                    .network
                    .set_parameter(&name, &Tensor::from_vec(w, dims.as_slice(), &Device::Cpu)?)?;
                let frozen: Vec<bool> = new[l].iter().map(|&n| !n).collect();
                state.set_mask(
                    &name,
                    FreezeMask::from_frozen(&dims, &frozen, &Device::Cpu)?,
                )?;
                let bias = format!("{layer}.bias");
                let n_bias = dims[0];
                let frozen_bias: Vec<bool> = (0..n_bias)
                    .map(|i| {
                        if l + 1 == LAYERS.len() {
                            !classes.contains(&(i as u8))
                        } else {
                            task > 0
                        }
                    })
                    .collect();
                state.set_mask(
                    &bias,
                    FreezeMask::from_frozen(&[n_bias], &frozen_bias, &Device::Cpu)?,
                )?;
            }
            config.epochs = state.epoch + 1;
            train(&mut state, &train_t, &test_t, &config, &mut [])?;
            accuracy = task_accuracy(&state, &test_t, &config, classes)?;
            if accuracy >= opts.target {
                break;
            }
        }
        // Growth never touches an older connection: every weight present
        // before this task has exactly its value from then.
        for (l, layer) in LAYERS.iter().enumerate() {
            let w: Vec<f32> = state
                .network
                .parameter(&format!("{layer}.weight"))
                .context("weight")?
                .as_tensor()
                .flatten_all()?
                .to_vec1()?;
            if let Some(before) = snapshot.get(l) {
                let moved = (0..w.len())
                    .filter(|&e| present[l][e] && w[e] != before[e])
                    .count();
                anyhow::ensure!(
                    moved == 0,
                    "{moved} frozen connections of {layer} moved in task {task}"
                );
            }
            if snapshot.len() <= l {
                snapshot.push(w);
            } else {
                snapshot[l] = w;
            }
        }
        for (p, n) in present.iter_mut().zip(&new) {
            for (a, b) in p.iter_mut().zip(n) {
                *a |= *b;
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        let mut seen_sum = 0.0;
        for (c, d) in &seen {
            seen_sum += task_accuracy(&state, d, &config, *c)?;
        }
        let connections = present
            .iter()
            .map(|p| p.iter().filter(|&&b| b).count())
            .sum();
        eprintln!(
            "[continual] {growth:?} seed {seed} task {task}: {rounds} rounds, {connections} connections, task {:.2} %, seen {:.2} %",
            accuracy * 100.0,
            seen_sum / seen.len() as f64 * 100.0
        );
        results.push(TaskResult {
            growth,
            seed,
            task,
            rounds,
            connections,
            seconds,
            task_accuracy: accuracy,
            seen_accuracy: seen_sum / seen.len() as f64,
        });
    }
    Ok(results)
}

/// Runs both growth rules over every seed and writes `CONTINUAL.md` and
/// `continual.json` into `opts.out`.
pub fn run(opts: &ContinualOptions) -> Result<()> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let (train_set, test_set) =
        qgrad_pipeline::data::load_datasets(Arch::Lenet300100, &opts.data, None, None)?;
    let mut all = Vec::new();
    for growth in [Growth::Random, Growth::Preferential] {
        for &seed in &opts.seeds {
            all.extend(run_one(growth, seed, opts, &train_set, &test_set)?);
        }
    }
    write_atomic(
        &opts.out.join("continual.json"),
        serde_json::to_string_pretty(&all)?.as_bytes(),
    )?;
    write_atomic(
        &opts.out.join("CONTINUAL.md"),
        report(&all, opts).as_bytes(),
    )?;
    Ok(())
}

fn report(all: &[TaskResult], opts: &ContinualOptions) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Continual learning by growing a pruned MLP (METHOD §14)\n"
    );
    let _ = writeln!(
        s,
        "Split MNIST, five two-digit tasks; per task rounds of {} new connections and one \
         epoch each until the task reaches {:.0} % (at most {} rounds); means over seeds {:?}. \
         \"seen\" is the mean accuracy over the tasks so far (each over its two classes).\n",
        opts.grow,
        opts.target * 100.0,
        opts.max_rounds,
        opts.seeds
    );
    let _ = writeln!(
        s,
        "| growth | task | rounds | connections | seconds | task accuracy | seen accuracy |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for growth in [Growth::Random, Growth::Preferential] {
        for task in 0..5 {
            let rows: Vec<&TaskResult> = all
                .iter()
                .filter(|r| r.growth == growth && r.task == task)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let n = rows.len() as f64;
            let mean = |f: &dyn Fn(&TaskResult) -> f64| rows.iter().map(|r| f(r)).sum::<f64>() / n;
            let _ = writeln!(
                s,
                "| {growth:?} | {} | {:.1} | {:.0} | {:.1} | {:.2} % | {:.2} % |",
                task + 1,
                mean(&|r| r.rounds as f64),
                mean(&|r| r.connections as f64),
                mean(&|r| r.seconds),
                mean(&|r| r.task_accuracy) * 100.0,
                mean(&|r| r.seen_accuracy) * 100.0
            );
        }
    }
    s
}

/// The default data folder of the experiment.
pub fn default_data(root: &Path) -> PathBuf {
    root.join("datasets").join("mnist-mini")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferential_attachment_favours_high_degree_units() {
        // 10 x 10 layer; row 0 and column 0 are full (degree 10), the rest empty.
        let (rows, cols) = (10, 10);
        let mut present = vec![false; rows * cols];
        present[..cols].fill(true);
        for r in 0..rows {
            present[r * cols] = true;
        }
        let all_rows: Vec<usize> = (0..rows).collect();
        let mut hub = [0usize; 2];
        for (i, growth) in [Growth::Random, Growth::Preferential]
            .into_iter()
            .enumerate()
        {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            for _ in 0..200 {
                let drawn = draw(&present, rows, cols, &all_rows, 5, growth, &mut rng);
                assert_eq!(drawn.len(), 5);
                assert!(drawn.iter().all(|&e| !present[e]), "only absent entries");
                hub[i] += drawn
                    .iter()
                    .filter(|&&e| e % cols == 0 || e / cols == 0)
                    .count();
            }
            // Never the full row or column (they are present).
            assert_eq!(hub[i], 0);
        }
        // With one half-full row, preferential attachment draws from it
        // more often than random growth does.
        let mut present = vec![false; rows * cols];
        for c in 0..5 {
            present[3 * cols + c] = true;
        }
        let mut row3 = [0usize; 2];
        for (i, growth) in [Growth::Random, Growth::Preferential]
            .into_iter()
            .enumerate()
        {
            let mut rng = ChaCha8Rng::seed_from_u64(4);
            for _ in 0..300 {
                let drawn = draw(&present, rows, cols, &all_rows, 3, growth, &mut rng);
                row3[i] += drawn.iter().filter(|&&e| e / cols == 3).count();
            }
        }
        assert!(
            row3[1] > 2 * row3[0],
            "random {} preferential {}",
            row3[0],
            row3[1]
        );
        // Only allowed rows.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let drawn = draw(
            &present,
            rows,
            cols,
            &[7],
            4,
            Growth::Preferential,
            &mut rng,
        );
        assert!(drawn.iter().all(|&e| e / cols == 7));
    }

    #[test]
    fn a_small_run_writes_its_report_and_never_moves_old_connections() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ContinualOptions {
            data: default_data(&crate::repo_root()),
            out: dir.path().to_path_buf(),
            seeds: vec![1],
            grow: 3000,
            max_rounds: 1,
            target: 0.9,
            train_per_task: Some(300),
        };
        run(&opts).unwrap();
        let rows: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("continual.json")).unwrap())
                .unwrap();
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 10, "two growth rules x five tasks");
        // The network only grows.
        for w in rows.windows(2) {
            if w[0]["growth"] == w[1]["growth"] {
                assert!(w[1]["connections"].as_u64() > w[0]["connections"].as_u64());
            }
        }
        assert!(dir.path().join("CONTINUAL.md").exists());
    }
}
