//! The subcommands: each parses nothing and computes nothing of its own. It
//! turns its arguments into `qgrad-pipeline` calls and prints the outcome.

use std::path::{Path, PathBuf};

use qgrad_csr::{CompressedModel, LayoutChoice, SizeReport};
use qgrad_data::Dataset;
use qgrad_models::eval::{evaluate_candle_model, QuantizedModel};
use qgrad_models::methods::{
    Importance, ImportantWeights, InTrainingOptions, LossAwareOptions, PostTrainingOptions,
    QuantizeSummary, Scope, SparseBudget, SplitOutcome,
};
use qgrad_models::train::OptimizerKind;
use qgrad_models::{Arch, EpochStats, TrainConfig, TrainHook, TrainState};
use qgrad_pipeline::data::{load_datasets, resolve_data_dir};
use qgrad_pipeline::in_training::{run_in_training, InTrainingOutcome, InTrainingRun, Start};
use qgrad_pipeline::{
    compress_combined, compress_in_training, compress_loss_aware, compress_post_training,
    default_device, export_and_evaluate, load_trained, run_loss_aware, train_float, Compressed,
    ExportOptions, LossAwareRun,
};
use qgrad_runtime::{EvalReport, FileModel};
use serde::Serialize;
use serde_json::json;

use crate::failure::{Classify, CliResult, Failure};
use crate::{
    AnalyzeArgs, CombinedArgs, DataArgs, EvalArgs, ExportArgs, ImportArgs, InTrainingArgs,
    InTrainingOptionArgs, InspectArgs, LossAwareArgs, OutputArgs, PostArgs, PostOptionArgs,
    RepackArgs, StructuredArgs, TrainArgs, TrainingArgs,
};

pub(crate) fn load_data(arch: Arch, args: &DataArgs) -> CliResult<(Dataset, Dataset)> {
    let dir = resolve_data_dir(arch, args.data.as_deref())?;
    Ok(load_datasets(
        arch,
        &dir,
        args.train_limit,
        args.test_limit,
    )?)
}

pub(crate) fn training_config(arch: Arch, args: &TrainingArgs) -> CliResult<TrainConfig> {
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
    if args.optimizer.as_deref() == Some("adam") {
        config.optimizer = OptimizerKind::ADAM;
    }
    if let Some(schedule) = &args.lr_schedule {
        config.schedule = schedule.clone();
    }
    config.batch_size = args.batch_size;
    config.max_batches_per_epoch = args.max_batches;
    config.progress = !args.no_progress;
    config.validate().usage("invalid training options")?;
    Ok(config)
}

pub(crate) fn pct(x: f64) -> String {
    format!("{:.2} %", 100.0 * x)
}

pub(crate) fn print_json<T: Serialize>(value: &T) -> CliResult<()> {
    let text = serde_json::to_string_pretty(value).runtime("cannot format the JSON output")?;
    println!("{text}");
    Ok(())
}

/// Prints each finished epoch on stderr (the training loop's last stage).
pub(crate) struct EpochPrinter;

impl TrainHook for EpochPrinter {
    fn name(&self) -> &'static str {
        "epoch-printer"
    }

    fn epoch_finished(&mut self, e: &EpochStats, _: &TrainState) -> qgrad_models::Result<()> {
        eprintln!(
            "epoch {:>3}: loss {:.4}  test accuracy {}  lr {:.4}  {:.0} img/s  frozen {}",
            e.epoch + 1,
            e.train_loss,
            pct(e.test_accuracy),
            e.lr,
            e.images_per_second,
            pct(e.frozen_fraction)
        );
        Ok(())
    }
}

pub fn train(args: TrainArgs) -> CliResult<()> {
    let arch = args.training.model;
    let mut config = training_config(arch, &args.training)?;
    config.checkpoint_dir = Some(args.out.clone());
    let (train, test) = load_data(arch, &args.data)?;
    let trained = train_float(
        arch,
        &config,
        &default_device(),
        (&train, &test),
        &mut [&mut EpochPrinter],
        |resumed| {
            if let Some(epoch) = resumed {
                eprintln!("resuming {} after epoch {epoch}", args.out.display());
            }
            eprintln!(
                "training {arch} for {} epochs on {} images (seed {})",
                config.epochs,
                train.len(),
                config.seed
            );
        },
    )?;
    let accuracy = trained.state.history.last().map(|e| e.test_accuracy);
    let checkpoint = args.out.join(qgrad_models::checkpoint::CHECKPOINT_FILE);
    if args.json {
        print_json(&json!({
            "model": arch.name(),
            "seed": config.seed,
            "epochs": trained.state.history,
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

fn layout_choice(name: &str) -> LayoutChoice {
    match name {
        "csr" => LayoutChoice::Csr,
        "csr-rice" => LayoutChoice::CsrRice,
        "dense" => LayoutChoice::Dense,
        "block" => LayoutChoice::Block,
        "flat-gaps" => LayoutChoice::FlatGaps,
        _ => LayoutChoice::Auto,
    }
}

fn export_options(output: &OutputArgs) -> ExportOptions {
    ExportOptions {
        act_bits: output.act_bits,
        layout: layout_choice(&output.layout),
        device: default_device(),
        run_file: true,
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
    /// `k_a` of PACT activations (structured runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pact_bits: Option<u8>,
    summary: QuantizeSummary,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    training: Vec<EpochStats>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    splits: Vec<(usize, SplitOutcome)>,
    size: SizeReport,
}

/// What an in-training run adds to the report.
#[derive(Default)]
struct RunReport {
    float_accuracy: Option<f64>,
    trained_accuracy: Option<f64>,
    training: Vec<EpochStats>,
    splits: Vec<(usize, SplitOutcome)>,
}

impl RunReport {
    fn of(run: &InTrainingOutcome) -> Self {
        RunReport {
            float_accuracy: run.float_accuracy,
            trained_accuracy: run.state.history.last().map(|e| e.test_accuracy),
            training: run.state.history.clone(),
            splits: run.hook.log.clone(),
        }
    }
}

/// Writes the file, evaluates it in candle and from the file, and prints the
/// outcome.
fn export_and_print(
    mut model: Compressed,
    run: RunReport,
    test: &Dataset,
    output: &OutputArgs,
) -> CliResult<()> {
    if let Some(a) = run.float_accuracy {
        model
            .extra
            .push(("float_accuracy".to_string(), a.to_string()));
    }
    eprintln!(
        "writing {}, evaluating it in candle and with integer kernels ...",
        output.out.display()
    );
    let out = export_and_evaluate(&model, &output.out, test, &export_options(output))?;
    let file_eval = out
        .file
        .as_ref()
        .ok_or_else(|| Failure::usage("the file was not run"))?;
    let outcome = QuantizeOutcome {
        model: model.arch.name(),
        method: model.method.clone(),
        options: model.options.clone(),
        seed: model.seed,
        file: output.out.clone(),
        file_bytes: out.size.file_bytes,
        parameters: out.size.parameters,
        ratio: out.size.ratio,
        float_accuracy: run.float_accuracy,
        trained_accuracy: run.trained_accuracy,
        quantized_accuracy: out.candle.accuracy,
        file_accuracy: file_eval.accuracy,
        mismatches: out.mismatches().unwrap_or(0),
        test_images: test.len(),
        act_bits: model.pact.map_or(output.act_bits, |p| p.input_bits),
        pact_bits: model.pact.map(|p| p.bits),
        summary: model.summary.clone(),
        training: run.training,
        splits: run.splits,
        size: out.size.clone(),
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
        "quantized accuracy  {}  (candle, {})",
        pct(outcome.quantized_accuracy),
        activations(outcome.act_bits, outcome.pact_bits)
    );
    println!(
        "file accuracy       {}  (integer kernels, {} test images)",
        pct(outcome.file_accuracy),
        outcome.test_images
    );
    println!("mismatches          {}", outcome.mismatches);
    Ok(())
}

pub fn post(args: PostArgs) -> CliResult<()> {
    let opts = post_options(&args.post)?;
    let trained = load_trained(&args.checkpoint, &default_device())?;
    let (train, test) = load_data(trained.arch(), &args.data)?;
    let norm = trained.normalization(&train);
    eprintln!("evaluating the float model ...");
    let float_accuracy = trained.accuracy(&test, &norm)?;
    let options = json!({
        "widths": opts.widths,
        "cluster": opts.method.to_string(),
        "scope": opts.scope.to_string(),
        "checkpoint": args.checkpoint,
    });
    let host = trained.to_host(norm)?;
    let model = compress_post_training(&host, &opts, options, Some(trained.config.seed))?;
    let run = RunReport {
        float_accuracy: Some(float_accuracy),
        ..Default::default()
    };
    export_and_print(model, run, &test, &args.output)
}

/// Trains with in-training quantization (from --init or from scratch,
/// resuming --checkpoint-dir's run).
fn in_training_run(
    training: &TrainingArgs,
    opts: &InTrainingOptions,
    in_args: &InTrainingOptionArgs,
    data: (&Dataset, &Dataset),
) -> CliResult<InTrainingOutcome> {
    let arch = training.model;
    let mut config = training_config(arch, training)?;
    config.checkpoint_dir = in_args.checkpoint_dir.clone();
    let start = match in_args.init.as_deref() {
        Some(path) => Start::Checkpoint {
            path,
            accum: in_args.accum_start,
            evaluate: true,
        },
        None => Start::Scratch,
    };
    eprintln!(
        "training {arch} for {} epochs with in-training quantization (p = {}, b_low = {}, from epoch {}, seed {})",
        config.epochs, opts.fraction, opts.low_bits, opts.start_epoch, config.seed
    );
    let run = InTrainingRun {
        arch,
        config,
        options: opts.clone(),
        start,
        device: default_device(),
    };
    if let Some(dir) = &in_args.checkpoint_dir {
        if dir
            .join(qgrad_models::checkpoint::CHECKPOINT_FILE)
            .is_file()
        {
            eprintln!("resuming the in-training run in {}", dir.display());
        }
    }
    Ok(run_in_training(run, data, &mut [&mut EpochPrinter])?)
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
    if args.init.is_some() && args.accum_start != qgrad_pipeline::AccumStart::Carry {
        options["accum_start"] = json!(args.accum_start.to_string());
    }
    if let Some(optimizer) = training.optimizer.as_deref().filter(|o| *o != "sgd") {
        options["optimizer"] = json!(optimizer);
    }
    options
}

pub fn in_training(args: InTrainingArgs) -> CliResult<()> {
    let opts = in_training_options(&args.in_training)?;
    let (train, test) = load_data(args.training.model, &args.data)?;
    let run = in_training_run(&args.training, &opts, &args.in_training, (&train, &test))?;
    let options = in_training_json(&opts, &args.in_training, &args.training, &run.config);
    let model = compress_in_training(&run, options)?;
    export_and_print(model, RunReport::of(&run), &test, &args.output)
}

pub fn combined(args: CombinedArgs) -> CliResult<()> {
    let post_opts = post_options(&args.post)?;
    let opts = in_training_options(&args.in_training)?;
    let (train, test) = load_data(args.training.model, &args.data)?;
    let run = in_training_run(&args.training, &opts, &args.in_training, (&train, &test))?;
    let mut options = in_training_json(&opts, &args.in_training, &args.training, &run.config);
    options["widths"] = json!(post_opts.widths);
    options["cluster"] = json!(post_opts.method.to_string());
    options["scope"] = json!(post_opts.scope.to_string());
    let model = compress_combined(&run, &post_opts, options)?;
    export_and_print(model, RunReport::of(&run), &test, &args.output)
}

pub fn loss_aware(args: LossAwareArgs) -> CliResult<()> {
    let arch = args.training.model;
    let mut config = training_config(arch, &args.training)?;
    if args.training.optimizer.is_none() {
        // The loss-aware recipes train with Adam (METHOD §15).
        config.optimizer = OptimizerKind::ADAM;
    }
    config.checkpoint_dir = args.checkpoint_dir.clone();
    let (train, test) = load_data(arch, &args.data)?;
    let sparsity = match args.kappa {
        Some(kappa) => {
            let mut budget = SparseBudget::uniform(
                kappa,
                args.kappa_ramp.unwrap_or(config.epochs as f64 / 2.0),
                args.importance
                    .parse::<Importance>()
                    .usage("invalid --importance")?,
            );
            budget.freeze_after_ramp = args.freeze_mask;
            for (layer, kappa) in &args.kappa_layer {
                if budget.layers.insert(layer.clone(), *kappa).is_some() {
                    return Err(Failure::usage(format!("--kappa-layer names {layer} twice")));
                }
            }
            budget.validate().usage("invalid non-zero budget")?;
            Some(budget)
        }
        None => None,
    };
    LossAwareOptions::check_bias_bits(args.bias_bits).usage("invalid --bias-bits")?;
    let important = match args.important {
        Some(fraction) => {
            let important = ImportantWeights {
                fraction,
                bits: args.important_bits,
            };
            important.validate().usage("invalid --important")?;
            Some(important)
        }
        None => None,
    };
    let options = LossAwareOptions {
        quantizer: args.quantizer,
        per_channel: args.per_channel,
        clip: !args.no_clip,
        seed: config.seed,
        sparsity: sparsity.clone(),
        bias_bits: args.bias_bits,
        important,
    };
    let start = match args.init.as_deref() {
        Some(path) => Start::Checkpoint {
            path,
            accum: qgrad_pipeline::AccumStart::Carry,
            evaluate: true,
        },
        None => Start::Scratch,
    };
    eprintln!(
        "training {arch} for {} epochs with {} weights ({}, seed {})",
        config.epochs,
        args.quantizer,
        config.optimizer_config().name(),
        config.seed
    );
    let run = LossAwareRun {
        arch,
        config,
        options,
        start,
        device: default_device(),
    };
    let outcome = run_loss_aware(run, (&train, &test), &mut [&mut EpochPrinter])?;
    let mut json_options = json!({
        "quantizer": args.quantizer.to_string(),
        "per_channel": args.per_channel,
        "clip": !args.no_clip,
        "init": args.init,
        "epochs": outcome.config.epochs,
        "lr": outcome.config.lr,
        "batch_size": outcome.config.batch_size,
        "optimizer": outcome.config.optimizer_config().name(),
    });
    if let Some(budget) = &sparsity {
        json_options["sparsity"] = json!(budget);
    }
    if args.bias_bits != 32 {
        json_options["bias_bits"] = json!(args.bias_bits);
    }
    if let Some(important) = important {
        json_options["important"] = json!(important);
    }
    if args.training.lr_schedule.is_some() {
        json_options["lr_schedule"] = json!(outcome.config.schedule);
    }
    if args.training.weight_decay.is_some() {
        json_options["weight_decay"] = json!(outcome.config.weight_decay);
    }
    let model = compress_loss_aware(&outcome, json_options)?;
    let report = RunReport {
        float_accuracy: outcome.float_accuracy,
        trained_accuracy: outcome.state.history.last().map(|e| e.test_accuracy),
        training: outcome.state.history.clone(),
        splits: Vec::new(),
    };
    export_and_print(model, report, &test, &args.output)
}

fn read_model(path: &Path) -> CliResult<CompressedModel> {
    CompressedModel::read_file(path).input(format!("cannot read {}", path.display()))
}

pub fn eval(args: EvalArgs) -> CliResult<()> {
    let model = read_model(&args.file)?;
    if qgrad_lstm::file::is_lstm(&model) {
        return crate::lstm::eval_lstm(&model, &args.file, args.text.as_deref(), args.json);
    }
    let file_model =
        FileModel::new(&model).input(format!("{} cannot be run", args.file.display()))?;
    let arch = file_model.arch();
    let (_, test) = load_data(arch, &args.data)?;
    eprintln!("running {} with integer kernels ...", args.file.display());
    let report = file_model
        .evaluate(&test, args.batch_size)
        .runtime("integer inference failed")?;
    let candle: Option<EvalReport> = if args.compare_candle {
        let (params, scaled) = qgrad_pipeline::compress::file_tensors(&model);
        let norm = file_model.meta.normalization();
        let tensors = QuantizedModel {
            params: &params,
            scaled: &scaled,
            buffers: &[],
            pact_bits: file_model.meta.pact_bits,
        };
        Some(
            evaluate_candle_model(
                arch,
                &tensors,
                &test,
                &norm,
                file_model.meta.act_bits,
                args.batch_size,
                &default_device(),
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
        "accuracy     {}  ({} / {} test images, integer kernels, {})",
        pct(report.accuracy),
        report.correct,
        report.total,
        activations(file_model.meta.act_bits, file_model.meta.pact_bits)
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

pub fn repack(args: RepackArgs) -> CliResult<()> {
    let same = match (args.file.canonicalize(), args.out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Failure::usage(format!(
            "--out {} is the input file: write the re-encoded file elsewhere",
            args.out.display()
        )));
    }
    let model = read_model(&args.file)?;
    let before = model.size_report();
    let context = format!("cannot re-encode {}", args.file.display());
    let bytes =
        match qgrad_csr::reencode_up_to(&model, layout_choice(&args.layout), args.format_version) {
            Ok(bytes) => bytes,
            // What the user asked for cannot be written: a usage error.
            Err(
                e @ (qgrad_csr::CsrError::VersionTooLow { .. }
                | qgrad_csr::CsrError::InvalidOption(_)),
            ) => return Err(e).usage(context),
            Err(e) => return Err(e).runtime(context),
        };
    qgrad_csr::write_bytes_atomically(&args.out, &bytes)
        .runtime(format!("cannot write {}", args.out.display()))?;
    let after = read_model(&args.out)?.size_report();
    if args.json {
        return print_json(&json!({
            "file": args.file,
            "out": args.out,
            "before": { "file_bytes": before.file_bytes, "ratio": before.ratio },
            "after": { "file_bytes": after.file_bytes, "ratio": after.ratio },
            "size": after,
        }));
    }
    println!(
        "{}: {} bytes ({:.2}x) -> {}: {} bytes ({:.2}x), the same tensors",
        args.file.display(),
        before.file_bytes,
        before.ratio,
        args.out.display(),
        after.file_bytes,
        after.ratio
    );
    Ok(())
}

pub fn import(args: ImportArgs) -> CliResult<()> {
    let arch = args.model;
    let checkpoint = args.out.join(qgrad_models::checkpoint::CHECKPOINT_FILE);
    if checkpoint.exists() {
        return Err(Failure::usage(format!(
            "{} already holds a checkpoint: import into a new directory",
            args.out.display()
        )));
    }
    let read = |p: &Path| std::fs::read(p).input(format!("cannot read {}", p.display()));
    let bytes = read(&args.from)?;
    let accgrad = args.accgrad.as_deref().map(read).transpose()?;
    let imported = qgrad_pipeline::interchange::import_state_dict(
        arch,
        &bytes,
        &args.maps,
        accgrad.as_deref(),
    )?;
    let epochs = args
        .fine_tune_epochs
        .unwrap_or(if args.accgrad.is_some() { 0 } else { 1 });
    let mut config = TrainConfig::default_for(arch);
    config.epochs = epochs;
    config.lr = args.lr;
    config.batch_size = args.batch_size;
    config.schedule = qgrad_optim::LrSchedule::Constant;
    config.checkpoint_dir = Some(args.out.clone());
    config.progress = false;
    config.validate().usage("invalid fine-tuning options")?;
    let device = default_device();
    let mut state = TrainState::new(arch, &device, &config).runtime("cannot build the network")?;
    state
        .network
        .set_from_host(&imported.tensors)
        .input("the state dict does not fit the network")?;
    for a in &imported.accgrad {
        let t = a
            .to_tensor(&device)
            .runtime("cannot hold the accumulated gradients")?;
        state
            .accum
            .set(&a.name, &t)
            .input(format!("accumulated gradient '{}'", a.name))?;
    }
    let data = if epochs > 0 || args.data.data.is_some() {
        Some(load_data(arch, &args.data)?)
    } else {
        None
    };
    let before = match &data {
        Some((train, test)) => {
            let norm = config
                .normalization
                .clone()
                .unwrap_or_else(|| train.channel_statistics());
            config.normalization = Some(norm.clone());
            Some(
                state
                    .network
                    .evaluate(test, &norm, qgrad_pipeline::EVAL_BATCH)
                    .runtime("cannot evaluate the imported network")?,
            )
        }
        None => None,
    };
    std::fs::create_dir_all(&args.out).runtime(format!("cannot create {}", args.out.display()))?;
    qgrad_models::checkpoint::save_checkpoint(&state, &config, &checkpoint)
        .runtime(format!("cannot write {}", checkpoint.display()))?;
    let mut after = None;
    if let (true, Some((train, test))) = (epochs > 0, &data) {
        eprintln!("fine-tuning the imported {arch} for {epochs} epochs to record its accumulated gradients");
        let trained = train_float(
            arch,
            &config,
            &device,
            (train, test),
            &mut [&mut EpochPrinter],
            |_| {},
        )?;
        after = trained.state.history.last().map(|e| e.test_accuracy);
    }
    if args.json {
        return print_json(&json!({
            "model": arch.name(),
            "checkpoint": checkpoint,
            "tensors": imported.tensors.len(),
            "accgrad": if args.accgrad.is_some() { "imported" } else if epochs > 0 { "fine-tuned" } else { "zero" },
            "fine_tune_epochs": epochs,
            "accuracy_before": before,
            "accuracy_after": after,
        }));
    }
    println!("model            {arch}");
    println!("checkpoint       {}", checkpoint.display());
    println!("tensors          {}", imported.tensors.len());
    if let Some(b) = before {
        println!("accuracy         {} (as imported)", pct(b));
    }
    if let Some(a) = after {
        println!(
            "after fine-tune  {} ({epochs} epochs at lr {})",
            pct(a),
            args.lr
        );
    }
    if args.accgrad.is_none() && epochs == 0 {
        println!("note             no accumulated gradients: give --accgrad or --fine-tune-epochs before post-training quantization");
    }
    Ok(())
}

pub fn export(args: ExportArgs) -> CliResult<()> {
    use qgrad_pipeline::interchange::ExportLayout;
    let layout = if args.sparse {
        ExportLayout::SparseCsr
    } else {
        ExportLayout::Dense
    };
    let bytes = if args.input.is_dir() {
        let trained = qgrad_pipeline::load_trained(&args.input, &default_device())?;
        let host = trained
            .state
            .network
            .to_host()
            .runtime("cannot read the checkpoint's tensors")?;
        qgrad_pipeline::interchange::state_dict_bytes(&host, layout)?
    } else {
        let model = read_model(&args.input)?;
        qgrad_pipeline::interchange::export_state_dict(&model, layout)?
    };
    qgrad_csr::write_bytes_atomically(&args.safetensors, &bytes)
        .runtime(format!("cannot write {}", args.safetensors.display()))?;
    let how = if args.sparse {
        "rebuild it with python/qgrad_sparse.py (load_csr or load_dense)"
    } else {
        "load it with model.load_state_dict(safetensors.torch.load_file(...))"
    };
    println!(
        "wrote {} ({} bytes): {how}",
        args.safetensors.display(),
        bytes.len()
    );
    Ok(())
}

pub fn analyze(args: AnalyzeArgs) -> CliResult<()> {
    let model = read_model(&args.file)?;
    let layers = qgrad_powerlaw::layer_degrees(&model);
    let mut rows = Vec::new();
    for l in &layers {
        for (side, degrees) in [("in", &l.in_degree), ("out", &l.out_degree)] {
            // Too few units (a 10-class output layer) is not an error.
            let fit = qgrad_powerlaw::fit_tail(degrees).ok();
            rows.push((l, side, degrees, fit));
        }
    }
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(l, side, degrees, fit)| {
                json!({
                    "tensor": l.name,
                    "shape": l.shape,
                    "side": side,
                    "degrees": degrees,
                    "fit": fit,
                })
            })
            .collect();
        return print_json(&json!({ "file": args.file, "layers": out }));
    }
    println!(
        "{:<14} {:>4} {:>6} {:>5} {:>6} {:>6} {:>6} {:>13} {:>6}  {:<24} {:<24}",
        "tensor",
        "side",
        "units",
        "zero",
        "k_min",
        "k_max",
        "tail",
        "γ ± se",
        "KS",
        "vs exponential",
        "vs log-normal"
    );
    for (l, side, degrees, fit) in &rows {
        match fit {
            Some(f) if f.k_min == f.k_max => println!(
                "{:<14} {:>4} {:>6} {:>5}  (every fitted unit has degree {}: nothing to fit)",
                l.name, side, f.units, f.zero_degree, f.k_min
            ),
            Some(f) => println!(
                "{:<14} {:>4} {:>6} {:>5} {:>6} {:>6} {:>6} {:>6.2} ± {:<4.2} {:>6.3}  {:<24} {:<24}",
                l.name,
                side,
                f.units,
                f.zero_degree,
                f.k_min,
                f.k_max,
                f.tail,
                f.power_law.gamma,
                f.power_law.std_err,
                f.ks_distance,
                f.compare[0].verdict(),
                f.compare[1].verdict(),
            ),
            None => println!(
                "{:<14} {:>4} {:>6}  (too few units with a non-zero degree to fit)",
                l.name,
                side,
                degrees.len()
            ),
        }
    }
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

/// How a file's activations are quantized, in words.
fn activations(act_bits: u8, pact_bits: Option<u8>) -> String {
    match pact_bits {
        Some(k) => format!("{k}-bit PACT activations, {act_bits}-bit input"),
        None => format!("{act_bits}-bit activations"),
    }
}

pub fn structured(args: StructuredArgs) -> CliResult<()> {
    use qgrad_models::methods::{
        BlockSelection, BlockSparsityOptions, StructuredOptions, WeightScale,
    };
    let arch = args.training.model;
    let mut config = training_config(arch, &args.training)?;
    if args.training.optimizer.is_none() {
        config.optimizer = OptimizerKind::ADAM;
    }
    if args.training.lr.is_none() {
        // The recipe of `cargo xtask structured` (Adam).
        config.lr = 0.002;
    }
    config.checkpoint_dir = args.checkpoint_dir.clone();
    if ![2, 3, 4, 8, 32].contains(&args.pact_bits) {
        return Err(Failure::usage(format!(
            "--pact-bits {} is not one of 2, 3, 4, 8, 32",
            args.pact_bits
        )));
    }
    config.pact = (args.pact_bits < 32).then_some(qgrad_models::net::PactConfig {
        bits: args.pact_bits,
        clip: args.clip,
        learned: !args.fixed_clip,
        input_bits: args.input_bits,
    });
    config.validate().usage("invalid training options")?;
    let selection = match args.selection.as_str() {
        "norm" => BlockSelection::Norm,
        "accumulated-gradient" => BlockSelection::AccumulatedGradient,
        _ => BlockSelection::Random { seed: config.seed },
    };
    if selection != (BlockSelection::Random { seed: config.seed }) && args.init.is_none() {
        return Err(Failure::usage(format!(
            "--selection {} ranks the blocks of a trained network: give it with --init",
            args.selection
        )));
    }
    let options = StructuredOptions {
        weight_bits: args.weight_bits,
        blocks: Some(BlockSparsityOptions {
            block: args.block,
            compression: args.compression,
            selection,
            dense_first_last: args.dense_first_last,
        }),
        scale: if args.scale == "least-squares" {
            WeightScale::LeastSquares
        } else {
            WeightScale::Max
        },
    };
    options.validate().usage("invalid structured options")?;
    let (train, test) = load_data(arch, &args.data)?;
    let start = match args.init.as_deref() {
        Some(path) => Start::Checkpoint {
            path,
            accum: qgrad_pipeline::AccumStart::Carry,
            evaluate: true,
        },
        None => Start::Scratch,
    };
    eprintln!(
        "training {arch} for {} epochs: {}-bit weights, {}-bit activations, {}x block compression ({}x{} blocks, seed {})",
        config.epochs,
        args.weight_bits,
        args.pact_bits,
        args.compression,
        args.block.0,
        args.block.1,
        config.seed
    );
    let run = qgrad_pipeline::StructuredRun {
        arch,
        config,
        options,
        start,
        device: default_device(),
    };
    let outcome = qgrad_pipeline::run_structured(run, (&train, &test), &mut [&mut EpochPrinter])?;
    let json_options = json!({
        "structured": options,
        "pact": outcome.config.pact,
        "init": args.init,
        "epochs": outcome.config.epochs,
        "lr": outcome.config.lr,
        "batch_size": outcome.config.batch_size,
        "optimizer": outcome.config.optimizer_config().name(),
    });
    let model = qgrad_pipeline::compress_structured(&outcome, json_options)?;
    let report = RunReport {
        float_accuracy: outcome.float_accuracy,
        trained_accuracy: outcome.state.history.last().map(|e| e.test_accuracy),
        training: outcome.state.history.clone(),
        splits: Vec::new(),
    };
    export_and_print(model, report, &test, &args.output)
}
