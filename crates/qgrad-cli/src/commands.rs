//! The pipelines behind the subcommands.

use std::path::{Path, PathBuf};

use candle_core::Device;
use qgrad_csr::{CompressedModel, LayoutChoice, SizeReport};
use qgrad_models::checkpoint::{load_checkpoint, CHECKPOINT_FILE};
use qgrad_models::data::cifar::load_cifar10;
use qgrad_models::data::mnist::load_mnist;
use qgrad_models::data::{Dataset, Normalization};
use qgrad_models::export::{export, ExportMetadata};
use qgrad_models::int_infer::{evaluate_candle, EvalReport, FileModel};
use qgrad_models::optim::Sgd;
use qgrad_models::quantize::{
    accum_to_host, combined as combine, post_training, InTrainingHook, InTrainingOptions,
    PostTrainingOptions, QuantizeSummary, QuantizedTensor, Scope, SplitOutcome,
};
use qgrad_models::{train as train_loop, Arch, DatasetKind, EpochHook, EpochStats, NamedTensor};
use qgrad_models::{TrainConfig, TrainState};
use serde::Serialize;
use serde_json::json;

use crate::failure::{Classify, CliResult, Failure, INPUT};
use crate::{
    CombinedArgs, DataArgs, EvalArgs, InTrainingArgs, InTrainingOptionArgs, InspectArgs,
    OutputArgs, PostArgs, PostOptionArgs, TrainArgs, TrainingArgs,
};

const EVAL_BATCH: usize = 500;

fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

/// The default data folder of a data set: `datasets/mnist-mini` (the subset
/// shipped in the repository) for MNIST, `datasets/cifar10` (where
/// `cargo xtask download cifar10` puts it) for CIFAR-10; looked for in the
/// current directory or an ancestor of it or of the binary (a binary under
/// `target/…/` finds the repository's copy).
fn default_data_dir(kind: DatasetKind) -> Option<PathBuf> {
    let rel = match kind {
        DatasetKind::Mnist => "mnist-mini",
        DatasetKind::Cifar10 => "cifar10",
    };
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.push(exe);
    }
    roots.iter().find_map(|root| {
        root.ancestors()
            .map(|dir| dir.join("datasets").join(rel))
            .find(|dir| dir.is_dir())
    })
}

fn load_data(arch: Arch, args: &DataArgs) -> CliResult<(Dataset, Dataset)> {
    let dir = match &args.data {
        Some(dir) => dir.clone(),
        None => default_data_dir(arch.dataset()).ok_or_else(|| {
            let hint = match arch.dataset() {
                DatasetKind::Mnist => "the shipped subset datasets/mnist-mini was not found",
                DatasetKind::Cifar10 => {
                    "datasets/cifar10 was not found (fetch it with `cargo xtask download cifar10`)"
                }
            };
            Failure::new(
                INPUT,
                anyhow::anyhow!(
                    "{arch}: no --data given and {hint} from the current directory or the \
                     binary's location"
                ),
            )
        })?,
    };
    let (mut train, mut test) = match arch.dataset() {
        DatasetKind::Mnist => {
            load_mnist(&dir).input(format!("cannot load MNIST from {}", dir.display()))?
        }
        DatasetKind::Cifar10 => {
            load_cifar10(&dir).input(format!("cannot load CIFAR-10 from {}", dir.display()))?
        }
    };
    if let Some(n) = args.train_limit {
        train = train.take(n);
    }
    if let Some(n) = args.test_limit {
        test = test.take(n);
    }
    if train.is_empty() || test.is_empty() {
        return Err(Failure::usage(
            "the training or test set is empty (check the limits)",
        ));
    }
    Ok((train, test))
}

fn training_config(arch: Arch, args: &TrainingArgs) -> CliResult<TrainConfig> {
    let mut config = TrainConfig::default_for(arch);
    config.seed = args.seed;
    if let Some(e) = args.epochs {
        config.epochs = e;
    }
    if let Some(lr) = args.lr {
        config.lr = lr;
    }
    if let Some(decay) = args.weight_decay {
        config.weight_decay = decay;
    }
    config.batch_size = args.batch_size;
    config.max_batches_per_epoch = args.max_batches;
    config.progress = !args.no_progress;
    config.validate().usage("invalid training options")?;
    Ok(config)
}

fn checkpoint_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(CHECKPOINT_FILE)
    } else {
        path.to_path_buf()
    }
}

fn normalization(config: &TrainConfig, train: &Dataset) -> Normalization {
    config
        .normalization
        .clone()
        .unwrap_or_else(|| train.channel_statistics())
}

fn pct(x: f64) -> String {
    format!("{:.2} %", 100.0 * x)
}

fn print_json<T: Serialize>(value: &T) -> CliResult<()> {
    let text = serde_json::to_string_pretty(value).runtime("cannot format the JSON output")?;
    println!("{text}");
    Ok(())
}

/// Prints each finished epoch on stderr (the training loop records an
/// epoch's statistics after its hook; the next hook call prints them) and
/// delegates to an inner hook.
struct EpochPrinter<'a> {
    printed: usize,
    inner: Option<&'a mut dyn EpochHook>,
}

fn print_epoch(e: &EpochStats) {
    eprintln!(
        "epoch {:>3}: loss {:.4}  test accuracy {}  lr {:.4}  {:.0} img/s  frozen {}",
        e.epoch + 1,
        e.train_loss,
        pct(e.test_accuracy),
        e.lr,
        e.images_per_second,
        pct(e.frozen_fraction)
    );
}

impl EpochPrinter<'_> {
    fn flush(&mut self, state: &TrainState) {
        for e in state.history.iter().skip(self.printed) {
            print_epoch(e);
        }
        self.printed = state.history.len();
    }
}

impl EpochHook for EpochPrinter<'_> {
    fn after_epoch(&mut self, epoch: usize, state: &mut TrainState) -> qgrad_models::Result<()> {
        self.flush(state);
        match self.inner.as_deref_mut() {
            Some(h) => h.after_epoch(epoch, state),
            None => Ok(()),
        }
    }

    // The wrapped hook's state is what checkpoints must carry.
    fn checkpoint_state(&self) -> qgrad_models::Result<Option<String>> {
        match self.inner.as_deref() {
            Some(h) => h.checkpoint_state(),
            None => Ok(None),
        }
    }

    fn restore_state(&mut self, saved: &str, state: &TrainState) -> qgrad_models::Result<()> {
        match self.inner.as_deref_mut() {
            Some(h) => h.restore_state(saved, state),
            None => Ok(()),
        }
    }
}

fn run_training(
    state: &mut TrainState,
    train: &Dataset,
    test: &Dataset,
    config: &TrainConfig,
    hook: Option<&mut dyn EpochHook>,
) -> CliResult<()> {
    let mut printer = EpochPrinter {
        printed: state.history.len(),
        inner: hook,
    };
    train_loop(state, train, test, config, Some(&mut printer)).map_err(|e| match e {
        // A resumed checkpoint that does not fit the options is the user's
        // to fix, like any other bad option.
        qgrad_models::ModelsError::Config(m) => Failure::usage(m),
        e => Failure::new(
            crate::failure::RUNTIME,
            anyhow::Error::new(e).context("training failed"),
        ),
    })?;
    printer.flush(state);
    Ok(())
}

pub fn train(args: TrainArgs) -> CliResult<()> {
    let arch = args.training.model;
    let mut config = training_config(arch, &args.training)?;
    config.checkpoint_dir = Some(args.out.clone());
    let (train, test) = load_data(arch, &args.data)?;
    let (mut state, resumed) = TrainState::resume_or_new(arch, &device(), &config)
        .input(format!("cannot resume from {}", args.out.display()))?;
    if resumed {
        eprintln!(
            "resuming {} after epoch {}",
            args.out.display(),
            state.epoch
        );
    }
    eprintln!(
        "training {arch} for {} epochs on {} images (seed {})",
        config.epochs,
        train.len(),
        config.seed
    );
    run_training(&mut state, &train, &test, &config, None)?;
    let accuracy = state.history.last().map(|e| e.test_accuracy);
    let checkpoint = args.out.join(CHECKPOINT_FILE);
    if args.json {
        print_json(&json!({
            "model": arch.name(),
            "seed": config.seed,
            "epochs": state.history,
            "test_accuracy": accuracy,
            "checkpoint": checkpoint,
        }))
    } else {
        println!("model           {arch}");
        println!("checkpoint      {}", checkpoint.display());
        if let Some(a) = accuracy {
            println!("test accuracy   {}", pct(a));
        }
        Ok(())
    }
}

fn post_options(args: &PostOptionArgs) -> CliResult<PostTrainingOptions> {
    let opts = PostTrainingOptions {
        widths: args.widths.clone(),
        method: args.cluster.clone(),
        scope: args.scope,
    };
    opts.validate().usage("invalid post-training options")?;
    Ok(opts)
}

fn in_training_options(args: &InTrainingOptionArgs) -> CliResult<InTrainingOptions> {
    let opts = InTrainingOptions {
        fraction: args.fraction.clone(),
        low_bits: args.low_bits,
        start_epoch: args.start_epoch,
        split_every: args.split_every,
        scope: args.split_scope,
    };
    opts.validate().usage("invalid in-training options")?;
    Ok(opts)
}

fn layout(output: &OutputArgs) -> LayoutChoice {
    match output.layout.as_str() {
        "csr" => LayoutChoice::Csr,
        "dense" => LayoutChoice::Dense,
        _ => LayoutChoice::Auto,
    }
}

/// Everything the three quantize commands report.
#[derive(Serialize)]
struct QuantizeOutcome {
    model: String,
    method: String,
    options: serde_json::Value,
    seed: Option<u64>,
    file: PathBuf,
    file_bytes: u64,
    parameters: u64,
    ratio: f64,
    /// The float network's accuracy (the checkpoint quantized, or the
    /// --init checkpoint of in-training), if there is one.
    float_accuracy: Option<f64>,
    /// Accuracy of the trained network before export (in-training: frozen
    /// quantized part plus float remainder, evaluated in candle f32).
    trained_accuracy: Option<f64>,
    /// The quantized model evaluated in candle (f64 layers, quantized activations).
    quantized_accuracy: f64,
    /// The compressed file run with integer kernels.
    file_accuracy: f64,
    /// Images on which the two evaluations predict different classes.
    mismatches: usize,
    test_images: usize,
    act_bits: u8,
    summary: QuantizeSummary,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    training: Vec<EpochStats>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    splits: Vec<(usize, SplitOutcome)>,
    size: SizeReport,
}

struct Quantized<'a> {
    arch: Arch,
    method: &'static str,
    options: serde_json::Value,
    seed: Option<u64>,
    params: Vec<QuantizedTensor>,
    summary: QuantizeSummary,
    buffers: Vec<NamedTensor>,
    norm: Normalization,
    test: &'a Dataset,
    float_accuracy: Option<f64>,
    trained_accuracy: Option<f64>,
    training: Vec<EpochStats>,
    splits: Vec<(usize, SplitOutcome)>,
}

/// Evaluates the quantized model in candle, exports it, runs the file with
/// the integer kernels, and prints the outcome.
fn evaluate_and_export(q: Quantized, output: &OutputArgs) -> CliResult<()> {
    let device = device();
    eprintln!("evaluating the quantized model in candle ...");
    let candle = evaluate_candle(
        q.arch,
        &q.params,
        &q.buffers,
        q.test,
        &q.norm,
        output.act_bits,
        EVAL_BATCH,
        &device,
    )
    .runtime("candle evaluation of the quantized model failed")?;
    let meta = ExportMetadata {
        arch: q.arch,
        act_bits: output.act_bits,
        norm: q.norm.clone(),
        method: q.method.to_string(),
        options: q.options.clone(),
        seed: q.seed,
        extra: q
            .float_accuracy
            .map(|a| vec![("float_accuracy".to_string(), a.to_string())])
            .unwrap_or_default(),
    };
    let size = export(&output.out, &q.params, &q.buffers, &meta, layout(output))
        .runtime(format!("cannot write {}", output.out.display()))?;
    eprintln!("running {} with integer kernels ...", output.out.display());
    let model = CompressedModel::read_file(&output.out)
        .runtime(format!("cannot read back {}", output.out.display()))?;
    let file_eval = FileModel::new(&model)
        .and_then(|m| m.evaluate(q.test, EVAL_BATCH))
        .runtime("integer inference from the file failed")?;
    let outcome = QuantizeOutcome {
        model: q.arch.name().to_string(),
        method: q.method.to_string(),
        options: q.options,
        seed: q.seed,
        file: output.out.clone(),
        file_bytes: size.file_bytes,
        parameters: size.parameters,
        ratio: size.ratio,
        float_accuracy: q.float_accuracy,
        trained_accuracy: q.trained_accuracy,
        quantized_accuracy: candle.accuracy,
        file_accuracy: file_eval.accuracy,
        mismatches: candle.mismatches(&file_eval),
        test_images: q.test.len(),
        act_bits: output.act_bits,
        summary: q.summary,
        training: q.training,
        splits: q.splits,
        size,
    };
    if output.json {
        return print_json(&outcome);
    }
    println!("model               {}", outcome.model);
    println!(
        "method              {}  {}",
        outcome.method, outcome.options
    );
    println!(
        "file                {} ({} bytes)",
        outcome.file.display(),
        outcome.file_bytes
    );
    println!(
        "compression ratio   {:.2}x  ({} parameters)",
        outcome.ratio, outcome.parameters
    );
    let hist: Vec<String> = outcome
        .summary
        .width_histogram
        .iter()
        .map(|(w, n)| format!("{w}b:{n}"))
        .collect();
    println!(
        "widths              {}  (zeros {}, saturated {})",
        hist.join(" "),
        outcome.summary.zeros,
        outcome.summary.saturated
    );
    if let Some(a) = outcome.float_accuracy {
        println!("float accuracy      {}", pct(a));
    }
    if let Some(a) = outcome.trained_accuracy {
        println!("trained accuracy    {}  (before export, f32)", pct(a));
    }
    println!(
        "quantized accuracy  {}  (candle, {}-bit activations)",
        pct(outcome.quantized_accuracy),
        outcome.act_bits
    );
    println!(
        "file accuracy       {}  (integer kernels, {} test images)",
        pct(outcome.file_accuracy),
        outcome.test_images
    );
    println!("mismatches          {}", outcome.mismatches);
    Ok(())
}

fn load_trained(path: &Path) -> CliResult<(TrainState, TrainConfig)> {
    let file = checkpoint_file(path);
    load_checkpoint(&file, &device()).input(format!("cannot load checkpoint {}", file.display()))
}

pub fn post(args: PostArgs) -> CliResult<()> {
    let opts = post_options(&args.post)?;
    let (state, config) = load_trained(&args.checkpoint)?;
    let arch = state.network.arch;
    let (train, test) = load_data(arch, &args.data)?;
    let norm = normalization(&config, &train);
    eprintln!("evaluating the float model ...");
    let float_accuracy = state
        .network
        .evaluate(&test, &norm, EVAL_BATCH)
        .runtime("evaluation of the float model failed")?;
    let params = state
        .network
        .params_to_host()
        .runtime("cannot copy parameters")?;
    let buffers = state
        .network
        .buffers_to_host()
        .runtime("cannot copy buffers")?;
    let accum = accum_to_host(&state).runtime("cannot copy accumulated gradients")?;
    let (quantized, summary) =
        post_training(&params, &accum, &opts, None).runtime("post-training quantization failed")?;
    evaluate_and_export(
        Quantized {
            arch,
            method: "post-training",
            options: json!({
                "widths": opts.widths,
                "cluster": opts.method.to_string(),
                "scope": opts.scope.to_string(),
                "checkpoint": args.checkpoint,
            }),
            seed: Some(config.seed),
            params: quantized,
            summary,
            buffers,
            norm,
            test: &test,
            float_accuracy: Some(float_accuracy),
            trained_accuracy: None,
            training: Vec::new(),
            splits: Vec::new(),
        },
        &args.output,
    )
}

/// Trains with in-training quantization; returns the state, the hook, the
/// normalisation and the float accuracy of the --init checkpoint.
fn run_in_training(
    training: &TrainingArgs,
    opts: &InTrainingOptions,
    in_args: &InTrainingOptionArgs,
    train: &Dataset,
    test: &Dataset,
) -> CliResult<(TrainState, InTrainingHook, TrainConfig, Option<f64>)> {
    let arch = training.model;
    let mut config = training_config(arch, training)?;
    let (state, float_accuracy) = match in_args.init.as_deref() {
        Some(path) => {
            let (mut state, init_config) = load_trained(path)?;
            if state.network.arch != arch {
                return Err(Failure::usage(format!(
                    "--init holds {}, but --model is {arch}",
                    state.network.arch
                )));
            }
            // Same normalisation as the network was trained with; a fresh
            // schedule, momentum and freeze state; the accumulated gradients
            // carry on.
            config.normalization = Some(normalization(&init_config, train));
            let norm = normalization(&config, train);
            let accuracy = state
                .network
                .evaluate(test, &norm, EVAL_BATCH)
                .runtime("evaluation of the --init model failed")?;
            let params = state.network.parameters();
            state.optimizer = Sgd::new(&params, config.momentum, config.weight_decay)
                .runtime("cannot create the optimizer")?;
            state.masks = vec![None; params.len()];
            state.epoch = 0;
            state.history.clear();
            (state, Some(accuracy))
        }
        None => (
            TrainState::new(arch, &device(), &config).runtime("cannot create the network")?,
            None,
        ),
    };
    let mut state = state;
    if let Some(dir) = in_args.checkpoint_dir.as_deref() {
        config.checkpoint_dir = Some(dir.to_path_buf());
        let file = dir.join(CHECKPOINT_FILE);
        if file.is_file() {
            let (resumed, _) = load_trained(&file)?;
            if resumed.network.arch != arch {
                return Err(Failure::usage(format!(
                    "--checkpoint-dir {} holds a {} run, but --model is {arch}",
                    dir.display(),
                    resumed.network.arch
                )));
            }
            eprintln!(
                "resuming the in-training run in {} after epoch {}",
                dir.display(),
                resumed.epoch
            );
            state = resumed;
        }
    }
    let mut hook =
        InTrainingHook::new(opts.clone(), &state).usage("invalid in-training options")?;
    eprintln!(
        "training {arch} for {} epochs with in-training quantization (p = {}, b_low = {}, from epoch {}, seed {})",
        config.epochs, opts.fraction, opts.low_bits, opts.start_epoch, config.seed
    );
    run_training(&mut state, train, test, &config, Some(&mut hook))?;
    Ok((state, hook, config, float_accuracy))
}

fn in_training_json(
    opts: &InTrainingOptions,
    args: &InTrainingOptionArgs,
    training: &TrainingArgs,
    config: &TrainConfig,
) -> serde_json::Value {
    let mut options = json!({
        "fraction": opts.fraction.to_string(),
        "low_bits": opts.low_bits,
        "start_epoch": opts.start_epoch,
        "init": args.init,
        "epochs": config.epochs,
        "lr": config.lr,
        "batch_size": config.batch_size,
    });
    // Options at their defaults are left out, so that a file written without
    // them keeps the bytes (and the ratio) it had before they existed.
    if opts.split_every != 1 {
        options["split_every"] = json!(opts.split_every);
    }
    if opts.scope != Scope::Global {
        options["split_scope"] = json!(opts.scope.to_string());
    }
    if training.weight_decay.is_some() {
        options["weight_decay"] = json!(config.weight_decay);
    }
    options
}

pub fn in_training(args: InTrainingArgs) -> CliResult<()> {
    let opts = in_training_options(&args.in_training)?;
    let (train, test) = load_data(args.training.model, &args.data)?;
    let (state, hook, config, float_accuracy) =
        run_in_training(&args.training, &opts, &args.in_training, &train, &test)?;
    let quantized = hook
        .finish(&state)
        .runtime("cannot collect the in-training result")?;
    let summary = qgrad_models::quantize::summarize(&quantized);
    let options = in_training_json(&opts, &args.in_training, &args.training, &config);
    let run = (&state, &hook, &config, float_accuracy);
    export_trained(
        "in-training",
        options,
        quantized,
        summary,
        run,
        (&train, &test),
        &args.output,
    )
}

/// Exports the outcome of an in-training run (in-training or combined): the
/// record both methods share, built in one place.
fn export_trained(
    method: &'static str,
    options: serde_json::Value,
    params: Vec<QuantizedTensor>,
    summary: QuantizeSummary,
    (state, hook, config, float_accuracy): (
        &TrainState,
        &InTrainingHook,
        &TrainConfig,
        Option<f64>,
    ),
    (train, test): (&Dataset, &Dataset),
    output: &OutputArgs,
) -> CliResult<()> {
    let buffers = state
        .network
        .buffers_to_host()
        .runtime("cannot copy buffers")?;
    evaluate_and_export(
        Quantized {
            arch: state.network.arch,
            method,
            options,
            seed: Some(config.seed),
            params,
            summary,
            buffers,
            norm: normalization(config, train),
            test,
            float_accuracy,
            trained_accuracy: state.history.last().map(|e| e.test_accuracy),
            training: state.history.clone(),
            splits: hook.log.clone(),
        },
        output,
    )
}

pub fn combined(args: CombinedArgs) -> CliResult<()> {
    let post_opts = post_options(&args.post)?;
    let opts = in_training_options(&args.in_training)?;
    let (train, test) = load_data(args.training.model, &args.data)?;
    let (state, hook, config, float_accuracy) =
        run_in_training(&args.training, &opts, &args.in_training, &train, &test)?;
    let in_training = hook
        .finish(&state)
        .runtime("cannot collect the in-training result")?;
    let accum = accum_to_host(&state).runtime("cannot copy accumulated gradients")?;
    let (quantized, summary) = combine(&in_training, &accum, &post_opts)
        .runtime("post-training quantization of the remainder failed")?;
    let mut options = in_training_json(&opts, &args.in_training, &args.training, &config);
    options["widths"] = json!(post_opts.widths);
    options["cluster"] = json!(post_opts.method.to_string());
    options["scope"] = json!(post_opts.scope.to_string());
    let run = (&state, &hook, &config, float_accuracy);
    export_trained(
        "combined",
        options,
        quantized,
        summary,
        run,
        (&train, &test),
        &args.output,
    )
}

fn read_model(path: &Path) -> CliResult<CompressedModel> {
    CompressedModel::read_file(path).input(format!("cannot read {}", path.display()))
}

pub fn eval(args: EvalArgs) -> CliResult<()> {
    let model = read_model(&args.file)?;
    let file_model =
        FileModel::new(&model).input(format!("{} cannot be run", args.file.display()))?;
    let arch = file_model.arch();
    let (_, test) = load_data(arch, &args.data)?;
    eprintln!("running {} with integer kernels ...", args.file.display());
    let report = file_model
        .evaluate(&test, args.batch_size)
        .runtime("integer inference failed")?;
    let candle: Option<EvalReport> = if args.compare_candle {
        let params: Vec<QuantizedTensor> = model
            .tensors
            .iter()
            .map(|t| QuantizedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                values: t.dequantize(),
                widths: t.widths(),
                exponent: t.exponent,
            })
            .collect();
        let norm = Normalization {
            mean: file_model.meta.mean.clone(),
            std: file_model.meta.std.clone(),
        };
        Some(
            evaluate_candle(
                arch,
                &params,
                &[],
                &test,
                &norm,
                file_model.meta.act_bits,
                args.batch_size,
                &device(),
            )
            .runtime("candle evaluation failed")?,
        )
    } else {
        None
    };
    let mismatches = candle.as_ref().map(|c| c.mismatches(&report));
    let size = model.size_report();
    if args.json {
        return print_json(&json!({
            "file": args.file,
            "model": arch.name(),
            "method": file_model.meta.method,
            "act_bits": file_model.meta.act_bits,
            "test_images": report.total,
            "correct": report.correct,
            "accuracy": report.accuracy,
            "candle_accuracy": candle.as_ref().map(|c| c.accuracy),
            "mismatches": mismatches,
            "file_bytes": size.file_bytes,
            "ratio": size.ratio,
        }));
    }
    println!("model        {arch}");
    println!(
        "accuracy     {}  ({} / {} test images, integer kernels, {}-bit activations)",
        pct(report.accuracy),
        report.correct,
        report.total,
        file_model.meta.act_bits
    );
    if let (Some(c), Some(m)) = (&candle, mismatches) {
        println!("candle       {}  ({m} mismatching images)", pct(c.accuracy));
    }
    println!(
        "ratio        {:.2}x  ({} bytes)",
        size.ratio, size.file_bytes
    );
    Ok(())
}

pub fn inspect(args: InspectArgs) -> CliResult<()> {
    let model = read_model(&args.file)?;
    let size = model.size_report();
    if args.json {
        return print_json(&json!({
            "file": args.file,
            "metadata": model.metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "size": size,
        }));
    }
    for (k, v) in &model.metadata {
        println!("{k:<14} {v}");
    }
    println!();
    println!(
        "{:<22} {:>16} {:>10} {:>9} {:>6} {:>11} {:>8} {:>7}  widths",
        "tensor", "shape", "params", "nnz", "layout", "bytes", "bits/p", "ratio"
    );
    for t in &size.tensors {
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        let bytes = t.bits.total() as f64 / 8.0;
        let bpp = t.bits_per_parameter();
        let ratio = if bpp > 0.0 { 32.0 / bpp } else { 0.0 };
        let hist: Vec<String> = t
            .width_histogram
            .iter()
            .map(|(w, n)| format!("{w}b:{n}"))
            .collect();
        println!(
            "{:<22} {:>16} {:>10} {:>9} {:>6} {:>11.1} {:>8.3} {:>6.2}x  {}",
            t.name,
            shape.join("x"),
            t.parameters,
            t.nnz,
            t.layout.to_string(),
            bytes,
            bpp,
            ratio,
            hist.join(" ")
        );
    }
    println!(
        "{:<22} {:>16} {:>10} {:>9} {:>6} {:>11.1}",
        "(header, metadata, crc)",
        "",
        "",
        "",
        "",
        size.overhead_bits as f64 / 8.0
    );
    let nnz: u64 = size.tensors.iter().map(|t| t.nnz).sum();
    println!(
        "{:<22} {:>16} {:>10} {:>9} {:>6} {:>11} {:>8.3} {:>6.2}x",
        "total",
        "",
        size.parameters,
        nnz,
        "",
        size.file_bytes,
        8.0 * size.file_bytes as f64 / size.parameters.max(1) as f64,
        size.ratio
    );
    Ok(())
}
