//! Structured sparsity co-trained with low-bit weights and PACT activations
//! (METHOD §9), resumable like the other training methods: the run, and the
//! compressed model of its result.

use qgrad_data::Dataset;
use qgrad_models::methods::{summarize, StructuredHook, StructuredOptions, StructuredWeights};
use qgrad_models::TrainHook;

use crate::compress::{scaled_summary, trained_model, Compressed};
use crate::error::{Context, PipelineError, Result};
use crate::in_training::{run_method, MethodRun, RunOutcome};

/// One structured run; the activations' width is `config.pact`.
pub type StructuredRun<'a> = MethodRun<'a, StructuredOptions>;

/// A finished structured run.
pub type StructuredOutcome = RunOutcome<StructuredHook>;

/// Trains `run`; `extra` hooks run after the method's.
pub fn run_structured(
    run: StructuredRun,
    data: (&Dataset, &Dataset),
    extra: &mut [&mut dyn TrainHook],
) -> Result<StructuredOutcome> {
    run.options
        .validate()
        .map_err(|e| PipelineError::usage(format!("invalid structured options: {e}")))?;
    run_method(run, data, extra, |options, state| {
        StructuredHook::new(options, state)
            .map_err(|e| PipelineError::usage(format!("invalid structured options: {e}")))
    })
}

/// The compressed model of a structured run: `k_w`-bit weights as scaled
/// codes (or float weights, masked elements pruned), the rest (biases,
/// batch norm, PACT clips) as f32.
pub fn compress_structured(
    run: &StructuredOutcome,
    options: serde_json::Value,
) -> Result<Compressed> {
    let mut params = run
        .hook
        .float_parameters(&run.state)
        .runtime("cannot copy the float parameters")?;
    let (scaled, summary) = match run
        .hook
        .finish(&run.state)
        .runtime("cannot quantize the weights")?
    {
        StructuredWeights::Scaled(scaled) => {
            let summary = scaled_summary(&params, &scaled, run.hook.options().weight_bits);
            (scaled, summary)
        }
        StructuredWeights::Float(weights) => {
            params.extend(weights);
            (Vec::new(), summarize(&params))
        }
    };
    let o = run.hook.options();
    let method = format!(
        "structured:w{}-a{}-c{}",
        o.weight_bits,
        run.config.pact.map_or(32, |p| p.bits),
        o.blocks.map_or(1, |b| b.compression)
    );
    trained_model(
        (&run.state, &run.config),
        &method,
        options,
        params,
        scaled,
        summary,
    )
}
