//! `cargo xtask reproduce` and `cargo xtask sweep`: train the float
//! baselines, run the three methods (METHOD.md §3–5) and the trade-off sweep,
//! and write results.json, results.csv, REPORT.md and the plots.
//!
//! # What runs
//!
//! Per model: one float training run (the baseline), then
//! * post-training quantization of the baseline for the headline options and
//!   for every sweep grid point (bit-width lists × clustering methods); no
//!   training, so these are cheap;
//! * one in-training run per split fraction (the headline fraction plus the
//!   sweep fractions). Decided: in-training fine-tunes the trained float
//!   baseline (as incremental network quantization does) rather than training
//!   from scratch, with a split after every epoch; the float remainder keeps
//!   training, and the baseline's accumulated gradients carry on
//!   (`qgrad_pipeline::AccumStart::Carry`, the CLI's default too);
//! * combined quantization of every in-training result with the headline
//!   widths and the sweep widths (cheap once the in-training run exists).
//!
//! Every step (data, baseline, methods, export, evaluation) is a
//! `qgrad-pipeline` call, the same the `qgrad` CLI makes; this module holds
//! the recipes, the plan, the cache and the report. Every point is exported
//! through qgrad-csr as a `.qgz` file and its ratio is read from the file on
//! disk. The accuracy is the quantized model's, evaluated in candle
//! with the same activation quantization as the integer inference; headline
//! points are also run straight from the file with the integer kernels.
//!
//! # Resuming
//!
//! Work is cached under `<out>/cache/<model>-<fingerprint>/`, the fingerprint
//! being a hash of everything that changes the numbers (data, epochs, seed,
//! recipe). The float training checkpoints after every epoch (qgrad-models
//! resumes it), every point is stored as JSON when done, and a rerun skips
//! whatever already exists, unless `--force`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use qgrad_models::checkpoint::CHECKPOINT_FILE;
use qgrad_models::data::Dataset;
use qgrad_models::methods::{FractionSchedule, InTrainingOptions, PostTrainingOptions, Scope};
use qgrad_models::{Arch, DatasetKind, TrainConfig};
use qgrad_pipeline::data::load_datasets;
use qgrad_pipeline::in_training::{run_in_training, InTrainingRun as RunSpec, Start};
use qgrad_pipeline::{
    compress_combined, compress_in_training, compress_post_training, export_and_evaluate,
    train_float, AccumStart, Compressed, ExportOptions, HostModel,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::download::hex;
use crate::fsutil::write_atomic;
use crate::recipe::{cluster_method, recipe, widths_str, InTrainingRecipe, Recipe};
use crate::results::{mark_pareto, Baseline, Method, ResultPoint, Role, RunRecord};

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scale {
    /// The full data set and full recipes.
    Full,
    /// The shipped MNIST subset, few epochs: ≤ 2 minutes on 2 cores.
    Quick,
    /// A few hundred images, one epoch: an integration test in a debug build.
    Smoke,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReproduceOptions {
    pub scale: Scale,
    #[serde(serialize_with = "arch_names")]
    pub models: Vec<Arch>,
    pub methods: Vec<Method>,
    #[serde(skip)]
    pub device: Device,
    pub device_name: String,
    /// Float training epochs (None: the scale's default).
    pub epochs: Option<usize>,
    /// Epochs of each in-training run (None: the scale's default).
    pub in_training_epochs: Option<usize>,
    pub out: PathBuf,
    /// The MNIST folder.
    pub data: PathBuf,
    /// The CIFAR-10 folder.
    pub cifar_data: PathBuf,
    pub force: bool,
    pub seed: u64,
    /// Run the trade-off sweep too.
    pub sweep: bool,
    /// Activation width of the quantized evaluation and integer inference.
    pub act_bits: u8,
    pub progress: bool,
    /// How in-training runs start their accumulated gradients.
    pub accum_start: AccumStart,
    pub command: String,
}

fn arch_names<S: serde::Serializer>(models: &[Arch], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(models.iter().map(|a| a.name()))
}

fn fingerprint(parts: &impl Serialize) -> String {
    let json = serde_json::to_string(parts).unwrap_or_default();
    hex(&Sha256::digest(json.as_bytes()))[..12].to_string()
}

pub(crate) fn load_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

pub(crate) fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// The git commit of the checkout (with `-dirty` when it has changes), or
/// `unknown` outside git.
pub fn git_commit() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(crate::repo_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) => {
            let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c}-dirty")
            } else {
                c
            }
        }
        None => "unknown".into(),
    }
}

pub(crate) struct ModelContext<'a> {
    pub(crate) arch: Arch,
    pub(crate) opts: &'a ReproduceOptions,
    recipe: Recipe,
    pub(crate) cache: PathBuf,
    pub(crate) test: Dataset,
    /// The float baseline on the host (post-training reads it).
    host: HostModel,
    float_accuracy: f64,
    num_params: u64,
}

/// Runs the reproduction and writes every output under `opts.out`.
pub fn run(opts: &ReproduceOptions) -> Result<RunRecord> {
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if !(2..=16).contains(&opts.act_bits) {
        bail!("--act-bits must be in 2..=16, got {}", opts.act_bits);
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let mut baselines = Vec::new();
    let mut points = Vec::new();
    for &arch in &opts.models {
        let (baseline, mut pts) = run_model(arch, opts)?;
        baselines.push(baseline);
        points.append(&mut pts);
    }
    mark_pareto(&mut points);
    let recipes: Vec<(String, Recipe)> = opts
        .models
        .iter()
        .map(|&a| (a.name().to_string(), plan_recipe(opts, a)))
        .collect();
    let record = RunRecord {
        qgrad_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: git_commit(),
        command: opts.command.clone(),
        started_unix,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        seed: opts.seed,
        threads: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        device: opts.device_name.clone(),
        config: serde_json::json!({ "options": opts, "recipes": recipes }),
        baselines,
        points,
    };
    record.write_json(&opts.out.join("results.json"))?;
    record.write_csv(&opts.out.join("results.csv"))?;
    crate::plot::write_plots(&record, &opts.out.join("plots"))?;
    crate::report::write_report(&record, &opts.out.join("REPORT.md"), "plots")?;
    // METHOD §14 on the headline file of every method and model.
    let headline: Vec<PathBuf> = record
        .points
        .iter()
        .filter(|p| p.role == Role::Main)
        .map(|p| opts.out.join(&p.file))
        .collect();
    if !headline.is_empty() {
        crate::powerlaw::run(&headline, &opts.out.join("powerlaw"))?;
    }
    // METHOD §12 on two in-process ranks (the bits of mpirun -np 2).
    if opts.scale != Scale::Smoke {
        let quick = opts.scale == Scale::Quick;
        crate::data_parallel::run(&crate::data_parallel::DataParallelOptions {
            data: opts.data.clone(),
            out: opts.out.join("data-parallel"),
            models: vec![Arch::Lenet5],
            weights: if quick {
                vec!["float".into()]
            } else {
                vec!["float".into(), "lab".into()]
            },
            bits: if quick { vec![3, 2] } else { vec![8, 4, 3, 2] },
            epochs: if quick { 1 } else { 2 },
            ranks: 2,
            max_batches: None,
            train_limit: None,
            dimension: true,
            timing: None,
            report_only: false,
        })?;
        // METHOD §11: quantized character LSTMs with and without
        // normalisation (quick: the shipped War and Peace slice, a small
        // LSTM; full: the whole corpus when it is there, hidden 256).
        let root = crate::repo_root();
        let full = root.join("datasets/war-and-peace/input.txt");
        let (data, lstm) = if quick || !full.is_file() {
            let mut runs = Vec::new();
            for w in [
                None,
                Some(qgrad_scaled::Method::BinaryConnect),
                Some(qgrad_scaled::Method::TerConnect),
            ] {
                for n in [
                    qgrad_lstm::Normalisation::None,
                    qgrad_lstm::Normalisation::Layer,
                ] {
                    runs.push((w, n));
                }
            }
            (
                root.join("datasets/war-and-peace-mini/input.txt"),
                (runs, 64, 5, 16),
            )
        } else {
            (full, (crate::lstm::LstmOptions::default_runs(), 256, 3, 64))
        };
        let (runs, hidden, epochs, batch) = lstm;
        crate::lstm::run(&crate::lstm::LstmOptions {
            data,
            out: opts.out.join("lstm"),
            runs,
            hidden,
            epochs,
            batch,
            seq_len: 100,
            train_chunks: None,
            seed: opts.seed,
            report_only: false,
            progress: true,
        })?;
    }
    // METHOD §9: the structured-sparsity design sweep (quick: the small grid
    // on the shipped subset, 6 epochs; full: the whole grid, 4 epochs).
    if opts.scale != Scale::Smoke {
        let quick = opts.scale == Scale::Quick;
        let sweep = |data: &Path, out: &str, designs, epochs| {
            crate::structured::run(&crate::structured::SweepOptions {
                data: data.to_path_buf(),
                out: opts.out.join(out),
                designs,
                epochs,
                train_limit: None,
                seed: opts.seed,
                report_only: false,
                progress: opts.progress,
                clip: crate::structured::DEFAULT_CLIP,
            })
        };
        let epochs = if quick { 6 } else { 4 };
        sweep(
            &opts.data,
            "structured",
            crate::structured::designs(quick),
            epochs,
        )?;
        // Beyond the thesis: the structured designs against the
        // accumulated-gradient methods on the same MLPs, by size and time.
        let mlp = |width, depth| crate::structured::Net::Mlp { width, depth };
        crate::versus::run(&crate::versus::VersusOptions {
            data: opts.data.clone(),
            sweep: opts.out.join("structured"),
            out: opts.out.join("versus"),
            shapes: if quick {
                vec![mlp(128, 2)]
            } else {
                vec![mlp(256, 2), mlp(512, 2)]
            },
            timing_images: if quick { 200 } else { 1000 },
            skip_timing: false,
            progress: opts.progress,
        })?;
        // The CIFAR-10 CNN designs, when the run includes a CIFAR-10 network
        // (and so has the data).
        if !quick
            && opts
                .models
                .iter()
                .any(|a| a.dataset() == DatasetKind::Cifar10)
        {
            sweep(
                &opts.cifar_data,
                "structured-cifar",
                crate::structured::cnn_designs(),
                crate::structured::CNN_EPOCHS,
            )?;
        }
    }
    Ok(record)
}

fn load_data(
    arch: Arch,
    opts: &ReproduceOptions,
    recipe: &Recipe,
) -> Result<(Dataset, Dataset, PathBuf)> {
    let dir = match arch.dataset() {
        DatasetKind::Mnist => opts.data.clone(),
        DatasetKind::Cifar10 => opts.cifar_data.clone(),
    };
    let (train, test) = load_datasets(arch, &dir, recipe.train_images, recipe.test_images)?;
    Ok((train, test, dir))
}

/// The recipe of `arch` with the run's options applied.
fn plan_recipe(opts: &ReproduceOptions, arch: Arch) -> Recipe {
    Recipe {
        accum_start: opts.accum_start,
        ..recipe(opts.scale, arch, opts.epochs, opts.in_training_epochs)
    }
}

fn run_model(arch: Arch, opts: &ReproduceOptions) -> Result<(Baseline, Vec<ResultPoint>)> {
    let recipe = plan_recipe(opts, arch);
    let (train_set, test_set, data_dir) = load_data(arch, opts, &recipe)?;
    let mut config = TrainConfig::default_for(arch);
    config.epochs = recipe.float_epochs;
    config.seed = opts.seed;
    config.progress = opts.progress;
    let fp = fingerprint(&(
        arch.name(),
        &data_dir,
        train_set.len(),
        test_set.len(),
        &config,
        &recipe,
        opts.act_bits,
        &opts.device_name,
    ));
    let cache = opts.out.join("cache").join(format!("{}-{fp}", arch.name()));
    if opts.force && cache.exists() {
        std::fs::remove_dir_all(&cache).with_context(|| format!("removing {}", cache.display()))?;
    }
    config.checkpoint_dir = Some(cache.join("float"));
    let norm = config
        .normalization
        .clone()
        .unwrap_or_else(|| train_set.channel_statistics());

    eprintln!(
        "[{}] float training: {} epochs on {} images ({})",
        arch.name(),
        config.epochs,
        train_set.len(),
        data_dir.display()
    );
    let t0 = Instant::now();
    let trained = train_float(
        arch,
        &config,
        &opts.device,
        (&train_set, &test_set),
        &mut [],
        |resumed| {
            if let Some(epoch) = resumed {
                eprintln!("[{}] resuming the float run at epoch {epoch}", arch.name());
            }
        },
    )?;
    let train_seconds = t0.elapsed().as_secs_f64();
    let float_accuracy = trained.accuracy(&test_set, &norm)?;
    let state = &trained.state;
    let baseline_path = cache.join("baseline.json");
    let baseline = match load_json::<Baseline>(&baseline_path) {
        Some(b) => b,
        None => {
            let b = Baseline {
                model: arch.name(),
                // Relative to the repository when inside it, so reports
                // from different checkouts compare.
                dataset_dir: data_dir
                    .strip_prefix(crate::repo_root())
                    .unwrap_or(&data_dir)
                    .display()
                    .to_string(),
                train_images: train_set.len(),
                test_images: test_set.len(),
                params: state.network.num_parameters() as u64,
                epochs: config.epochs,
                epoch_accuracy: state.history.iter().map(|e| e.test_accuracy).collect(),
                float_accuracy,
                train_seconds,
                train_config: serde_json::to_value(&config)?,
            };
            save_json(&baseline_path, &b)?;
            b
        }
    };
    eprintln!(
        "[{}] float accuracy {:.2} %",
        arch.name(),
        float_accuracy * 100.0
    );

    let ctx = ModelContext {
        arch,
        opts,
        cache,
        test: test_set.clone(),
        host: trained.to_host(norm.clone())?,
        float_accuracy,
        num_params: state.network.num_parameters() as u64,
        recipe,
    };
    let mut points = Vec::new();
    let r = &ctx.recipe;

    // Post-training: headline, then the sweep grid.
    if opts.methods.contains(&Method::PostTraining) {
        let (w, c) = &r.headline_post;
        points.push(ctx.post_point(w, c, Role::Main)?);
        if opts.sweep {
            for w in &r.sweep_widths {
                for c in &r.sweep_clusters {
                    if (w, c) == (&r.headline_post.0, &r.headline_post.1) {
                        continue;
                    }
                    points.push(ctx.post_point(w, c, Role::Sweep)?);
                }
            }
        }
    }

    // In-training runs, each followed by the combined points built on it.
    let wants_it = opts.methods.contains(&Method::InTraining);
    let wants_comb = opts.methods.contains(&Method::Combined);
    for run in in_training_runs(r, opts.sweep, wants_it, wants_comb) {
        points.extend(ctx.in_training_points(&train_set, &run)?);
    }
    if opts.methods.contains(&Method::LossAware) || opts.methods.contains(&Method::Joint) {
        points.extend(crate::loss_aware::points(&ctx, &train_set)?);
    }
    Ok((baseline, points))
}

/// One in-training run of the plan: whether (and as what) its own point is
/// reported, and the combined points built on its result.
struct InTrainingRun {
    recipe: InTrainingRecipe,
    role: Option<Role>,
    combos: Vec<(Vec<u8>, String, Role)>,
}

/// Adds a run to the plan, or merges `role` and `combo` into the planned
/// run with the same recipe.
fn add_run(
    runs: &mut Vec<InTrainingRun>,
    recipe: &InTrainingRecipe,
    role: Option<Role>,
    combo: Option<(Vec<u8>, String, Role)>,
) {
    let i = match runs.iter().position(|run| run.recipe == *recipe) {
        Some(i) => i,
        None => {
            runs.push(InTrainingRun {
                recipe: recipe.clone(),
                role: None,
                combos: Vec::new(),
            });
            runs.len() - 1
        }
    };
    let run = &mut runs[i];
    if let Some(role) = role {
        if run.role != Some(Role::Main) {
            run.role = Some(role);
        }
    }
    if let Some(c) = combo {
        if !run.combos.iter().any(|(w, cl, _)| (w, cl) == (&c.0, &c.1)) {
            run.combos.push(c);
        }
    }
}

/// Plans the in-training runs: the headline in-training recipe, the headline
/// combined recipe (the same run when their in-training parts agree), the
/// swept fractions and the further combined recipes.
fn in_training_runs(
    r: &Recipe,
    sweep: bool,
    wants_it: bool,
    wants_comb: bool,
) -> Vec<InTrainingRun> {
    let mut runs: Vec<InTrainingRun> = Vec::new();
    let hc = &r.headline_combined;
    if wants_it {
        add_run(&mut runs, &r.headline_in_training, Some(Role::Main), None);
    }
    if wants_comb {
        add_run(
            &mut runs,
            &hc.in_training,
            None,
            Some((hc.widths.clone(), hc.cluster.clone(), Role::Main)),
        );
    }
    if sweep {
        let base = &r.headline_in_training;
        for &p in &r.sweep_fractions {
            if base.fraction == FractionSchedule::Constant(p) {
                continue;
            }
            let it = InTrainingRecipe {
                fraction: FractionSchedule::Constant(p),
                lr: 0.01,
                ..base.clone()
            };
            add_run(&mut runs, &it, wants_it.then_some(Role::Sweep), None);
        }
        for c in r.sweep_combined.iter().filter(|_| wants_comb) {
            add_run(
                &mut runs,
                &c.in_training,
                None,
                Some((c.widths.clone(), c.cluster.clone(), Role::Sweep)),
            );
        }
        if wants_comb {
            // Every run's float remainder with the swept widths.
            let recipes: Vec<InTrainingRecipe> = runs.iter().map(|x| x.recipe.clone()).collect();
            for it in &recipes {
                for w in &r.sweep_combined_widths {
                    add_run(
                        &mut runs,
                        it,
                        None,
                        Some((w.clone(), hc.cluster.clone(), Role::Sweep)),
                    );
                }
            }
        }
    }
    // Runs that only existed to carry combined points need them.
    runs.retain(|run| run.role.is_some() || !run.combos.is_empty());
    runs
}

impl ModelContext<'_> {
    pub(crate) fn point_path(&self, key: &str) -> PathBuf {
        self.cache.join("points").join(format!("{key}.json"))
    }

    fn model_file(&self, key: &str) -> (PathBuf, String) {
        let rel = format!(
            "models/{}/{key}.{}",
            self.arch.name(),
            qgrad_models::export::EXTENSION
        );
        (self.opts.out.join(&rel), rel)
    }

    fn post_point(&self, widths: &[u8], cluster: &str, role: Role) -> Result<ResultPoint> {
        let key = format!("post-w{}-{cluster}", widths_str(widths).replace(',', "_"));
        if let Some(p) = self.cached(&key, role) {
            return Ok(p);
        }
        let t0 = Instant::now();
        let popts = PostTrainingOptions {
            widths: widths.to_vec(),
            method: cluster_method(cluster, widths.len())?,
            scope: Scope::Global,
        };
        let label = format!("widths {} {cluster} global", widths_str(widths));
        let options =
            serde_json::json!({ "widths": widths, "cluster": cluster, "scope": "global" });
        let model = compress_post_training(&self.host, &popts, options, None)?;
        self.finish_point(&key, Method::PostTraining, role, label, model, t0)
    }

    pub(crate) fn cached(&self, key: &str, role: Role) -> Option<ResultPoint> {
        let mut p: ResultPoint = load_json(&self.point_path(key))?;
        // The file must still be there for the record to be true.
        if !self.opts.out.join(&p.file).is_file() {
            return None;
        }
        p.role = role;
        if role == Role::Main && p.file_accuracy.is_none() {
            return None;
        }
        Some(p)
    }

    /// Exports `model` as point `key`, evaluates it in candle and, for a
    /// headline point, runs the file with the integer kernels.
    pub(crate) fn finish_point(
        &self,
        key: &str,
        method: Method,
        role: Role,
        label: String,
        mut model: Compressed,
        t0: Instant,
    ) -> Result<ResultPoint> {
        let (path, rel) = self.model_file(key);
        // Every file of a reproduction records the reproduction's seed.
        model.seed = Some(self.opts.seed);
        let export = ExportOptions {
            act_bits: self.opts.act_bits,
            layout: qgrad_csr::LayoutChoice::Auto,
            device: self.opts.device.clone(),
            run_file: role == Role::Main,
        };
        let out = export_and_evaluate(&model, &path, &self.test, &export)?;
        if let Some(mismatches) = out.mismatches().filter(|&m| m > 0) {
            eprintln!(
                "[{}] warning: {key}: integer inference from the file disagrees with candle on {mismatches} images",
                self.arch.name()
            );
        }
        let file_bytes = std::fs::metadata(&path)?.len();
        let point = ResultPoint {
            model: self.arch.name(),
            method,
            role,
            label,
            options: model.options,
            params: self.num_params,
            file_bytes,
            ratio: 32.0 * self.num_params as f64 / (8.0 * file_bytes as f64),
            accuracy: out.candle.accuracy,
            file_accuracy: out.file.map(|f| f.accuracy),
            float_accuracy: self.float_accuracy,
            seconds: t0.elapsed().as_secs_f64(),
            file: rel,
            pareto: false,
        };
        debug_assert_eq!(out.size.file_bytes, file_bytes);
        eprintln!(
            "[{}] {} {}: {:.2}x, {:.2} %",
            self.arch.name(),
            method.name(),
            point.label,
            point.ratio,
            point.accuracy * 100.0
        );
        save_json(&self.point_path(key), &point)?;
        Ok(point)
    }

    /// One in-training run (fine-tuning the float baseline), its own point
    /// and the combined points built on it.
    fn in_training_points(
        &self,
        train_set: &Dataset,
        run: &InTrainingRun,
    ) -> Result<Vec<ResultPoint>> {
        let it = &run.recipe;
        let it_key = format!("in-{}", it.key());
        let comb_key = |w: &[u8], cluster: &str| {
            format!(
                "comb-{}-w{}-{cluster}",
                it.key(),
                widths_str(w).replace(',', "_")
            )
        };
        let mut cached = Vec::new();
        let mut all_cached = true;
        if let Some(role) = run.role {
            match self.cached(&it_key, role) {
                Some(pt) => cached.push(pt),
                None => all_cached = false,
            }
        }
        for (w, cluster, crole) in &run.combos {
            match self.cached(&comb_key(w, cluster), *crole) {
                Some(pt) => cached.push(pt),
                None => all_cached = false,
            }
        }
        if all_cached {
            return Ok(cached);
        }

        let t0 = Instant::now();
        let options = InTrainingOptions {
            fraction: it.fraction.clone(),
            low_bits: it.low_bits,
            start_epoch: 0,
            split_every: it.split_every,
            ..Default::default()
        };
        let mut config = TrainConfig::default_for(self.arch);
        config.epochs = it.epochs;
        config.lr = it.lr;
        if let Some(wd) = it.weight_decay {
            config.weight_decay = wd;
        }
        config.seed = self.opts.seed.wrapping_add(1);
        config.progress = self.opts.progress;
        config.normalization = Some(self.host.norm.clone());
        // Checkpointed after every epoch (with the split state), so a killed
        // reproduction resumes mid-run.
        let run_dir = self.cache.join("runs").join(it.key());
        config.checkpoint_dir = Some(run_dir.clone());
        let resuming = run_dir.join(CHECKPOINT_FILE).is_file();
        eprintln!(
            "[{}] in-training: {} from the float baseline{}",
            self.arch.name(),
            it.label(),
            if resuming { " (resuming)" } else { "" }
        );
        let baseline = self.cache.join("float");
        let run_spec = RunSpec {
            arch: self.arch,
            config,
            options: options.clone(),
            start: Start::Checkpoint {
                path: &baseline,
                accum: self.recipe.accum_start,
                evaluate: false,
            },
            device: self.opts.device.clone(),
        };
        let result = run_in_training(run_spec, (train_set, &self.test), &mut [])?;
        let train_seconds = t0.elapsed().as_secs_f64();
        let it_options = serde_json::json!({
            "in_training": serde_json::to_value(&options)?,
            "epochs": it.epochs,
            "lr": it.lr,
        });
        let mut out = Vec::new();
        if let Some(role) = run.role {
            let t = Instant::now();
            let model = compress_in_training(&result, it_options.clone())?;
            let mut pt =
                self.finish_point(&it_key, Method::InTraining, role, it.label(), model, t)?;
            pt.seconds += train_seconds;
            save_json(&self.point_path(&it_key), &pt)?;
            out.push(pt);
        }
        for (w, cluster, crole) in &run.combos {
            let t = Instant::now();
            let popts = PostTrainingOptions {
                widths: w.clone(),
                method: cluster_method(cluster, w.len())?,
                scope: Scope::Global,
            };
            let mut options = it_options.clone();
            options["widths"] = serde_json::json!(w);
            options["cluster"] = serde_json::json!(cluster);
            let model = compress_combined(&result, &popts, options)?;
            let key = comb_key(w, cluster);
            let label = format!("{}, then widths {} {cluster}", it.label(), widths_str(w));
            let mut pt = self.finish_point(&key, Method::Combined, *crole, label, model, t)?;
            pt.seconds += train_seconds;
            save_json(&self.point_path(&key), &pt)?;
            out.push(pt);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_runs_only_the_wanted_methods() {
        let r = recipe(Scale::Full, Arch::Lenet300100, None, None);
        // Only loss-aware or joint points asked for: no in-training run at all.
        assert!(in_training_runs(&r, true, false, false).is_empty());
        let only_in = in_training_runs(&r, true, true, false);
        assert!(!only_in.is_empty());
        assert!(only_in.iter().all(|run| run.combos.is_empty()));
        let only_comb = in_training_runs(&r, true, false, true);
        assert!(only_comb.iter().all(|run| run.role.is_none()));
        assert!(only_comb.iter().all(|run| !run.combos.is_empty()));
    }
}
