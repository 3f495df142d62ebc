//! The quantized LSTM in qgrad's compressed file (qgrad-csr, FORMAT.md):
//! no new layout, a new model kind. The gate tensors `lstm.wx` `[4H, V]`
//! and `lstm.wh` `[4H, H]` are scaled tensors (one code per weight, one
//! scale per gate matrix or per row), so a binary LSTM stores 1 bit per gate
//! weight and a ternary one at most 2; everything else (the gate bias, the
//! normalisation parameters, batch norm's running averages and the float
//! softmax layer) is stored as f32 (width 32), and the size report lists
//! every tensor. A float model stores its gate tensors as f32 too.
//!
//! Metadata (FORMAT.md §3 lists the keys): `arch` = `char-lstm`,
//! `lstm.config` (the [`LstmConfig`] as JSON), `lstm.vocab` (JSON array of
//! the byte values of the tokens), `method` (the quantizer, or `float`),
//! `qgrad_version`.
//!
//! A reader multiplies with the decoded `Ŵ`; with weight norm it rescales
//! each row of `Ŵ` to its stored norm first (`model` module docs).
//! [`load`] gives a model whose evaluation is the live model's evaluation
//! bit for bit: the decoded values are the quantizer's values.

use std::path::Path;

use candle_core::{Device, Tensor};
use qgrad_csr::{
    CompressedModel, EncodeOptions, LevelKind, ScaledTensorData, SizeReport, TensorData,
    TensorInput,
};
use qgrad_scaled::Method;

use crate::config::LstmConfig;
use crate::error::{LstmError, Result};
use crate::model::{RunningStats, GATE_MATRICES};
use crate::train::LstmRun;

/// The `arch` of an LSTM file.
pub const ARCH: &str = "char-lstm";
/// The names of batch norm's running averages in the file, `[S, 4H]` each.
pub const RUNNING_TENSORS: [&str; 4] = ["bn.x_mean", "bn.x_var", "bn.h_mean", "bn.h_var"];

/// How a quantizer's codes are stored (level function, largest code,
/// two-sided scales): the mapping qgrad-models' export uses.
fn layout_of(method: Method) -> (LevelKind, u8, bool) {
    let levels = match method {
        m if m.binary() => LevelKind::Binary,
        Method::Laq { log: true, .. } => LevelKind::Log,
        _ => LevelKind::Linear,
    };
    (
        levels,
        method.max_code() as u8,
        method.scales_per_group() == 2,
    )
}

/// Writes `run`'s model (its gate matrices as evaluation quantizes them) to
/// `path` atomically; returns the file's size report.
pub fn export(run: &mut LstmRun, path: &Path) -> Result<SizeReport> {
    let quantized = run.quantized_gates()?;
    let model = &run.model;
    let mut values: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, var) in model.params() {
        let is_gate = GATE_MATRICES.contains(&name.as_str());
        if is_gate && quantized.is_some() {
            continue;
        }
        values.push((
            name.clone(),
            var.dims().to_vec(),
            var.as_tensor().flatten_all()?.to_vec1()?,
        ));
    }
    if let Some(r) = &model.running {
        let g4 = 4 * model.config.hidden;
        for (name, v) in RUNNING_TENSORS
            .iter()
            .zip([&r.x_mean, &r.x_var, &r.h_mean, &r.h_var])
        {
            values.push((name.to_string(), vec![r.steps, g4], v.clone()));
        }
    }
    let widths: Vec<Vec<u8>> = values.iter().map(|(_, _, v)| vec![32u8; v.len()]).collect();
    let mut inputs: Vec<TensorInput> = values
        .iter()
        .zip(&widths)
        .map(|((name, shape, v), w)| {
            TensorInput::Fixed(TensorData {
                name,
                shape,
                values: v,
                widths: w,
                exponent: None,
            })
        })
        .collect();
    let method = model.config.weights;
    if let (Some(q), Some(method)) = (&quantized, method) {
        let (levels, max_code, two_sided) = layout_of(method);
        for g in q {
            // Binary codes with a zero cannot occur (sign(0) = +1); a
            // TerConnect draw has no scale: its scales are 1.
            inputs.push(TensorInput::Scaled(ScaledTensorData {
                name: &g.name,
                shape: &g.shape,
                codes: &g.quantized.codes,
                levels,
                max_code,
                // TerConnect's draw carries one scale (1) for the tensor.
                groups: g.quantized.scales.len() / if two_sided { 2 } else { 1 },
                two_sided,
                scales: &g.quantized.scales,
            }));
        }
    }
    let metadata = vec![
        ("arch".to_string(), ARCH.to_string()),
        (
            "lstm.config".to_string(),
            serde_json::to_string(&model.config)
                .map_err(|e| LstmError::Config(format!("cannot encode the settings: {e}")))?,
        ),
        (
            "lstm.vocab".to_string(),
            serde_json::to_string(&run.vocab)
                .map_err(|e| LstmError::Config(format!("cannot encode the vocabulary: {e}")))?,
        ),
        (
            "method".to_string(),
            method.map_or("float".to_string(), |m| m.to_string()),
        ),
        (
            "qgrad_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ];
    let options = EncodeOptions {
        metadata,
        ..EncodeOptions::default()
    };
    Ok(qgrad_csr::write_file_tensors(path, &inputs, &options)?)
}

/// A character LSTM read from a compressed file.
#[derive(Debug)]
pub struct LoadedLstm {
    /// The model, its gate matrices holding the decoded `Ŵ` (and no
    /// quantizer: evaluating it multiplies with `Ŵ` as stored).
    pub run: LstmRun,
    /// The quantizer that made the file (`float`: none).
    pub method: String,
    /// The settings it was trained with (with its quantizer).
    pub trained: LstmConfig,
    /// The file's size report.
    pub size: SizeReport,
}

/// Whether a decoded file holds a character LSTM.
pub fn is_lstm(model: &CompressedModel) -> bool {
    model.metadata_value("arch") == Some(ARCH)
}

/// Reads a character LSTM from a decoded file.
pub fn from_model(file: &CompressedModel, device: &Device) -> Result<LoadedLstm> {
    let bad = |m: String| LstmError::NotAnLstm(m);
    if !is_lstm(file) {
        return Err(bad(format!(
            "the file holds a '{}', not a character LSTM ({ARCH})",
            file.metadata_value("arch").unwrap_or("(no arch)")
        )));
    }
    let get = |key: &str| {
        file.metadata_value(key)
            .ok_or_else(|| bad(format!("the file has no '{key}' metadata")))
    };
    let trained: LstmConfig = serde_json::from_str(get("lstm.config")?)
        .map_err(|e| bad(format!("unreadable lstm.config: {e}")))?;
    let vocab: Vec<u8> = serde_json::from_str(get("lstm.vocab")?)
        .map_err(|e| bad(format!("unreadable lstm.vocab: {e}")))?;
    let float = LstmConfig {
        weights: None,
        ..trained.clone()
    };
    let mut run = LstmRun::new(&float, &vocab, device)
        .map_err(|e| bad(format!("its settings do not build a model: {e}")))?;
    for (name, var) in run.model.params().to_vec() {
        let t = file
            .tensor(&name)
            .ok_or_else(|| bad(format!("the file has no tensor '{name}'")))?;
        let v = t.dequantize();
        if v.len() != var.elem_count() {
            return Err(bad(format!(
                "'{name}' holds {} values, the model needs {:?}",
                v.len(),
                var.dims()
            )));
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(bad(format!("'{name}' holds NaN or infinity")));
        }
        run.model
            .set_param(&name, &Tensor::from_vec(v, var.dims(), device)?)?;
    }
    if let Some(r) = run.model.running.as_mut() {
        let read = |name: &str| -> Result<Vec<f32>> {
            let t = file
                .tensor(name)
                .ok_or_else(|| bad(format!("the file has no tensor '{name}'")))?;
            let v = t.dequantize();
            if v.len() != r.x_mean.len() {
                return Err(bad(format!(
                    "'{name}' holds {} values, expected {}",
                    v.len(),
                    r.x_mean.len()
                )));
            }
            Ok(v)
        };
        let stats = RunningStats {
            steps: r.steps,
            x_mean: read(RUNNING_TENSORS[0])?,
            x_var: read(RUNNING_TENSORS[1])?,
            h_mean: read(RUNNING_TENSORS[2])?,
            h_var: read(RUNNING_TENSORS[3])?,
        };
        *r = stats;
    }
    Ok(LoadedLstm {
        run,
        method: get("method")?.to_string(),
        trained,
        size: file.size_report(),
    })
}

/// Reads the character LSTM in the compressed file at `path`.
pub fn load(path: &Path, device: &Device) -> Result<LoadedLstm> {
    let file = CompressedModel::read_file(path)?;
    from_model(&file, device)
}
