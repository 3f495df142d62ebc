//! The compressed model of a method, and what every entry point does with
//! it: export it to a file, evaluate it in candle, run the file with the
//! integer kernels.

use std::path::Path;

use candle_core::Device;
use qgrad_csr::{CompressedModel, LayoutChoice, SizeReport};
use qgrad_data::{Dataset, Normalization};
use qgrad_models::eval::{evaluate_candle_model, QuantizedModel};
use qgrad_models::export::export_with_scaled;
use qgrad_models::methods::{
    combined, post_training, summarize, PostTrainingOptions, QuantizeSummary, QuantizedTensor,
    ScaledWeight,
};
use qgrad_models::NamedTensor;
use qgrad_runtime::{Arch, EvalReport, ExportMetadata, FileModel};

use crate::error::{Context, PipelineError, Result};
use crate::in_training::InTrainingOutcome;
use crate::trained::HostModel;

/// A quantized network ready to be written.
#[derive(Debug, Clone)]
pub struct Compressed {
    /// The network.
    pub arch: Arch,
    /// The method's name as the file records it.
    pub method: String,
    /// The method's options as the file records them.
    pub options: serde_json::Value,
    /// The seed of the run.
    pub seed: Option<u64>,
    /// The quantized parameters (fixed point, or f32 at width 32).
    pub params: Vec<QuantizedTensor>,
    /// Weights stored as scaled codes (loss-aware quantization).
    pub scaled: Vec<ScaledWeight>,
    /// Width counts of the parameters.
    pub summary: QuantizeSummary,
    /// Batch-norm running statistics (stored as f32).
    pub buffers: Vec<NamedTensor>,
    /// The input normalisation.
    pub norm: Normalization,
    /// Further metadata pairs.
    pub extra: Vec<(String, String)>,
    /// PACT activations of the trained network (METHOD §9), whose clips are
    /// among `params`; `None`: fixed-point activations at the export's width.
    pub pact: Option<qgrad_models::net::PactConfig>,
}

/// Post-training quantization (METHOD §3) of a trained network.
pub fn compress_post_training(
    host: &HostModel,
    opts: &PostTrainingOptions,
    options: serde_json::Value,
    seed: Option<u64>,
) -> Result<Compressed> {
    opts.validate()
        .map_err(|e| PipelineError::usage(format!("invalid post-training options: {e}")))?;
    let (params, summary) = post_training(&host.params, &host.accum, opts, None)
        .runtime("post-training quantization failed")?;
    Ok(Compressed {
        arch: host.arch,
        method: "post-training".into(),
        options,
        seed,
        params,
        scaled: Vec::new(),
        summary,
        buffers: host.buffers.clone(),
        norm: host.norm.clone(),
        extra: Vec::new(),
        pact: None,
    })
}

/// The result of an in-training run (METHOD §4): the frozen part at
/// `b_low`, the float remainder at 32 bits.
pub fn compress_in_training(
    run: &InTrainingOutcome,
    options: serde_json::Value,
) -> Result<Compressed> {
    let params = run
        .hook
        .finish(&run.state)
        .runtime("cannot collect the in-training result")?;
    let summary = summarize(&params);
    trained_model(
        (&run.state, &run.config),
        "in-training",
        options,
        params,
        Vec::new(),
        summary,
    )
}

/// Combined quantization (METHOD §5): the in-training result with its float
/// remainder quantized post-training, clustered by the remainder's `A`.
pub fn compress_combined(
    run: &InTrainingOutcome,
    remainder: &PostTrainingOptions,
    options: serde_json::Value,
) -> Result<Compressed> {
    remainder
        .validate()
        .map_err(|e| PipelineError::usage(format!("invalid post-training options: {e}")))?;
    let in_training = run
        .hook
        .finish(&run.state)
        .runtime("cannot collect the in-training result")?;
    let accum = qgrad_models::methods::accum_to_host(&run.state)
        .runtime("cannot copy accumulated gradients")?;
    let (params, summary) = combined(&in_training, &accum, remainder)
        .runtime("post-training quantization of the remainder failed")?;
    trained_model(
        (&run.state, &run.config),
        "combined",
        options,
        params,
        Vec::new(),
        summary,
    )
}

pub(crate) fn trained_model(
    (state, config): (&qgrad_models::TrainState, &qgrad_models::TrainConfig),
    method: &str,
    options: serde_json::Value,
    params: Vec<QuantizedTensor>,
    scaled: Vec<ScaledWeight>,
    summary: QuantizeSummary,
) -> Result<Compressed> {
    let norm = config
        .normalization
        .clone()
        .ok_or_else(|| PipelineError::usage("the run has no normalisation"))?;
    Ok(Compressed {
        arch: state.network.arch,
        method: method.into(),
        options,
        seed: Some(config.seed),
        params,
        scaled,
        summary,
        buffers: state
            .network
            .buffers_to_host()
            .runtime("cannot copy buffers")?,
        norm,
        extra: Vec::new(),
        pact: state.network.pact(),
    })
}

/// The result of a loss-aware run (METHOD §10): every linear and
/// convolution weight as scaled codes, biases and batch norm as f32.
pub fn compress_loss_aware(
    run: &crate::LossAwareOutcome,
    options: serde_json::Value,
) -> Result<Compressed> {
    compress_loss_aware_state(&run.hook, &run.state, &run.config, options)
}

/// [`compress_loss_aware`] of a quantizer hook and the state it trained
/// (a data-parallel run's, say); `config` has its normalisation filled in.
pub fn compress_loss_aware_state(
    hook: &qgrad_models::methods::LossAwareHook,
    state: &qgrad_models::TrainState,
    config: &qgrad_models::TrainConfig,
    options: serde_json::Value,
) -> Result<Compressed> {
    // Split weights: the high-width parts go into the file as fixed point
    // beside the codes (FORMAT.md, `high_weights`).
    let (scaled, highs) = hook
        .finish_split(state)
        .runtime("cannot quantize the weights")?;
    let mut params = hook
        .float_parameters(state)
        .runtime("cannot copy the float parameters")?;
    params.extend(highs);
    let code_bits = match hook.options().quantizer {
        m if m.binary() => 1u8,
        qgrad_scaled::Method::Laq { bits, .. } => bits,
        _ => 2,
    };
    let summary = scaled_summary(&params, &scaled, code_bits);
    let method = format!("loss-aware:{}", hook.options().quantizer);
    let mut model = trained_model((state, config), &method, options, params, scaled, summary)?;
    if let Some(important) = hook.options().important {
        model.extra.push((
            qgrad_models::methods::HIGH_WEIGHTS.into(),
            important.bits.to_string(),
        ));
    }
    Ok(model)
}

/// The width counts of float parameters plus scaled-code weights, every
/// code counted at `code_bits`.
pub(crate) fn scaled_summary(
    params: &[QuantizedTensor],
    scaled: &[ScaledWeight],
    code_bits: u8,
) -> QuantizeSummary {
    use qgrad_models::methods::HIGH_SUFFIX;
    // A split weight's high-width part is the same parameters as its codes:
    // each element counts once, at its high width where it has one.
    let (highs, rest): (Vec<&QuantizedTensor>, Vec<&QuantizedTensor>) =
        params.iter().partition(|p| p.name.ends_with(HIGH_SUFFIX));
    let rest: Vec<QuantizedTensor> = rest.into_iter().cloned().collect();
    let mut summary = summarize(&rest);
    let mut histogram: std::collections::BTreeMap<u8, usize> =
        summary.width_histogram.iter().copied().collect();
    for w in scaled {
        let n = w.quantized.codes.len();
        summary.parameters += n;
        let high = highs
            .iter()
            .find(|h| h.name.strip_suffix(HIGH_SUFFIX) == Some(w.name.as_str()));
        for (i, &code) in w.quantized.codes.iter().enumerate() {
            match high.map(|h| h.widths[i]).filter(|&b| b != 0) {
                Some(bits) => *histogram.entry(bits).or_default() += 1,
                None => {
                    *histogram.entry(code_bits).or_default() += 1;
                    summary.zeros += usize::from(code == 0);
                }
            }
        }
    }
    summary.width_histogram = histogram.into_iter().collect();
    summary
}

/// What writing and evaluating a compressed model gave.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The size report of the file on disk (its ratio is from the file's
    /// byte length).
    pub size: SizeReport,
    /// The quantized model evaluated in candle (f64 layers, the file's
    /// activation quantization).
    pub candle: EvalReport,
    /// The file run with the integer kernels, when asked for.
    pub file: Option<EvalReport>,
}

impl Exported {
    /// Images on which the file and candle predict different classes.
    pub fn mismatches(&self) -> Option<usize> {
        self.file.as_ref().map(|f| f.mismatches(&self.candle))
    }
}

/// How to write and check a compressed model.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Activation width of the integer inference (2..=16).
    pub act_bits: u8,
    /// Per-tensor layout.
    pub layout: LayoutChoice,
    /// Evaluation device of the candle side.
    pub device: Device,
    /// Also run the written file with the integer kernels.
    pub run_file: bool,
}

/// Writes `model` to `path` (atomically), evaluates it in candle on `test`
/// and, if asked, runs the file straight from disk with the integer kernels.
pub fn export_and_evaluate(
    model: &Compressed,
    path: &Path,
    test: &Dataset,
    opts: &ExportOptions,
) -> Result<Exported> {
    // With PACT the file's fixed-point width is that of the input layer.
    let act_bits = model.pact.map_or(opts.act_bits, |p| p.input_bits);
    let mut extra = model.extra.clone();
    if let Some(p) = model.pact {
        extra.push(("pact_bits".into(), p.bits.to_string()));
    }
    let meta = ExportMetadata {
        arch: model.arch,
        act_bits,
        norm: model.norm.clone(),
        method: model.method.clone(),
        options: model.options.clone(),
        seed: model.seed,
        extra,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).runtime(format!("cannot create {}", parent.display()))?;
    }
    let size = export_with_scaled(
        path,
        &model.params,
        &model.scaled,
        &model.buffers,
        &meta,
        opts.layout,
    )
    .runtime(format!("cannot write {}", path.display()))?;
    let tensors = QuantizedModel {
        params: &model.params,
        scaled: &model.scaled,
        buffers: &model.buffers,
        pact_bits: model.pact.map(|p| p.bits),
    };
    let candle = evaluate_candle_model(
        model.arch,
        &tensors,
        test,
        &model.norm,
        act_bits,
        crate::EVAL_BATCH,
        &opts.device,
    )
    .runtime("candle evaluation of the quantized model failed")?;
    let file = if opts.run_file {
        Some(run_file(path, test)?.1)
    } else {
        None
    };
    Ok(Exported { size, candle, file })
}

/// Reads a compressed file and runs it on `test` with the integer kernels.
pub fn run_file(path: &Path, test: &Dataset) -> Result<(CompressedModel, EvalReport)> {
    let model =
        CompressedModel::read_file(path).input(format!("cannot read {}", path.display()))?;
    let report = FileModel::new(&model)
        .input(format!("{} cannot be run", path.display()))?
        .evaluate(test, crate::EVAL_BATCH)
        .runtime("integer inference from the file failed")?;
    Ok((model, report))
}

/// The file's tensors as a quantized model (what
/// [`evaluate_candle_model`] takes), to check a file against candle: scaled
/// tensors as [`ScaledWeight`]s, every other tensor as fixed point.
pub fn file_tensors(model: &CompressedModel) -> (Vec<QuantizedTensor>, Vec<ScaledWeight>) {
    let mut fixed = Vec::new();
    let mut scaled = Vec::new();
    for t in &model.tensors {
        match (t.scaled_info(), t.codes()) {
            (Some(info), Some(codes)) => {
                // The quantizer whose arithmetic the codes follow.
                let n = info.max_code;
                let bits = (u32::from(n) + 1).ilog2() as u8 + 1;
                let method = match info.levels {
                    qgrad_csr::LevelKind::Binary => qgrad_scaled::Method::Lab,
                    _ if info.two_sided => qgrad_scaled::Method::Lat2Exact,
                    qgrad_csr::LevelKind::Linear if n == 1 => qgrad_scaled::Method::LatExact,
                    qgrad_csr::LevelKind::Linear => qgrad_scaled::Method::Laq { bits, log: false },
                    qgrad_csr::LevelKind::Log => qgrad_scaled::Method::Laq { bits, log: true },
                };
                scaled.push(ScaledWeight {
                    name: t.name.clone(),
                    method,
                    shape: t.shape.clone(),
                    groups: info.groups,
                    quantized: qgrad_scaled::Quantized {
                        values: t.dequantize(),
                        codes,
                        scales: t.scales().to_vec(),
                    },
                });
            }
            _ => fixed.push(QuantizedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                values: t.dequantize(),
                widths: t.widths(),
                exponent: t.exponent,
            }),
        }
    }
    (fixed, scaled)
}
