//! Training checkpoints: one safetensors file with every tensor of the
//! training state and a JSON header in its metadata, written atomically.
//!
//! Tensor names: parameters and buffers under their own names (so the file
//! loads as plain weights with any safetensors reader), `<param>.accgrad`
//! (METHOD.md §1), `<param>.momentum`, and `<param>.freeze_mask` for
//! parameters with frozen elements. Metadata `qgrad.checkpoint` is a JSON
//! [`CheckpointHeader`]; `qgrad.order`/`qgrad.steps` make the same file
//! readable by `AccumulatedGradients::load`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qgrad_accum::{AccumulatedGradients, FreezeMask, ACCGRAD_SUFFIX};
use serde::{Deserialize, Serialize};

use crate::arch::Arch;
use crate::error::{ModelsError, Result};
use crate::net::{NamedTensor, Network};
use crate::optim::Sgd;
use crate::train::{EpochStats, TrainConfig, TrainState};

/// File name of the checkpoint inside `TrainConfig::checkpoint_dir`.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The accumulated gradients alone, written beside the checkpoint.
pub const ACCGRAD_FILE: &str = "checkpoint.accgrad.safetensors";
const FORMAT_VERSION: u32 = 1;
const HEADER_KEY: &str = "qgrad.checkpoint";
const MOMENTUM_SUFFIX: &str = ".momentum";
const MASK_SUFFIX: &str = ".freeze_mask";

/// The non-tensor part of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointHeader {
    pub format_version: u32,
    pub arch: String,
    /// Completed epochs.
    pub epoch: usize,
    pub accum_steps: u64,
    pub config: TrainConfig,
    pub history: Vec<EpochStats>,
    /// The epoch hook's own state (in-training quantization: which elements
    /// are frozen, the exponents, the splits done), so a killed run resumes
    /// with it. Absent in checkpoints of plain training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_state: Option<String>,
}

/// Writes `state` (and the `config` it was trained with) to `path` atomically.
pub fn save_checkpoint(state: &TrainState, config: &TrainConfig, path: &Path) -> Result<()> {
    let net = &state.network;
    let params = net.parameters();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, var) in &params {
        tensors.push((name.clone(), var.as_tensor().clone()));
    }
    for b in net.buffers_to_host()? {
        let t = b.to_tensor(&Device::Cpu)?;
        tensors.push((b.name, t));
    }
    for name in state.accum.names() {
        let a = state
            .accum
            .get(name)
            .ok_or_else(|| ModelsError::Other(format!("no accumulated gradient for '{name}'")))?;
        tensors.push((format!("{name}{ACCGRAD_SUFFIX}"), a.copy()?));
    }
    for (name, v) in state.optimizer.velocities() {
        tensors.push((format!("{name}{MOMENTUM_SUFFIX}"), v.clone()));
    }
    for ((name, _), mask) in params.iter().zip(&state.masks) {
        if let Some(m) = mask {
            tensors.push((format!("{name}{MASK_SUFFIX}"), m.tensor().clone()));
        }
    }
    let header = CheckpointHeader {
        format_version: FORMAT_VERSION,
        arch: net.arch.name().to_string(),
        epoch: state.epoch,
        accum_steps: state.accum.steps(),
        config: config.clone(),
        history: state.history.clone(),
        hook_state: state.hook_state.clone(),
    };
    let mut metadata = HashMap::new();
    let json = serde_json::to_string(&header)
        .map_err(|e| ModelsError::checkpoint(path, format!("cannot encode header: {e}")))?;
    metadata.insert(HEADER_KEY.to_string(), json);
    let order: Vec<&str> = state.accum.names().collect();
    metadata.insert("qgrad.order".to_string(), order.join("\n"));
    metadata.insert("qgrad.steps".to_string(), state.accum.steps().to_string());
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| ModelsError::checkpoint(path, format!("cannot encode tensors: {e}")))?;
    qgrad_accum::write_atomic(path, &bytes)?;
    Ok(())
}

/// Reads the header of a checkpoint without loading its tensors.
pub fn read_header(path: &Path) -> Result<CheckpointHeader> {
    let bytes = std::fs::read(path).map_err(|e| ModelsError::io(path, e))?;
    parse_header(path, &bytes)
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<CheckpointHeader> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| ModelsError::checkpoint(path, format!("not a safetensors file: {e}")))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(HEADER_KEY))
        .ok_or_else(|| {
            ModelsError::checkpoint(path, "no qgrad checkpoint header (not a qgrad checkpoint?)")
        })?;
    let header: CheckpointHeader = serde_json::from_str(json)
        .map_err(|e| ModelsError::checkpoint(path, format!("corrupt header: {e}")))?;
    if header.format_version != FORMAT_VERSION {
        return Err(ModelsError::checkpoint(
            path,
            format!(
                "format version {} is not supported (expected {FORMAT_VERSION})",
                header.format_version
            ),
        ));
    }
    Ok(header)
}

/// Loads a checkpoint onto `device`: the training state and its config.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<(TrainState, TrainConfig)> {
    let bytes = std::fs::read(path).map_err(|e| ModelsError::io(path, e))?;
    let header = parse_header(path, &bytes)?;
    let ck = |m: String| ModelsError::checkpoint(path, m);
    let arch: Arch = header
        .arch
        .parse()
        .map_err(|e: crate::arch::UnknownArch| ck(e.to_string()))?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| ck(format!("corrupt tensor data: {e}")))?;
    let present: std::collections::HashSet<String> = tensors.keys().cloned().collect();
    let mut take = |name: String, shape: &[usize]| take_tensor(&mut tensors, path, name, shape);
    let mut network = Network::new(arch, device, header.config.seed)?;
    let mut host = Vec::new();
    for (name, shape) in arch
        .parameter_shapes()
        .into_iter()
        .chain(arch.buffer_shapes())
    {
        let t = take(name.clone(), &shape)?;
        host.push(NamedTensor::from_tensor(&name, &t)?);
    }
    if let Some(bad) = host
        .iter()
        .find(|t| t.values.iter().any(|v| !v.is_finite()))
    {
        return Err(ck(format!(
            "tensor '{}' contains NaN or infinity",
            bad.name
        )));
    }
    network.set_from_host(&host)?;
    let params = network.parameters();
    let mut accum = AccumulatedGradients::new(&params)?;
    let mut optimizer = Sgd::new(&params, header.config.momentum, header.config.weight_decay)?;
    let mut masks = Vec::with_capacity(params.len());
    for (name, var) in &params {
        let shape = var.dims();
        accum.set(name, &take(format!("{name}{ACCGRAD_SUFFIX}"), shape)?)?;
        optimizer.set_velocity(name, &take(format!("{name}{MOMENTUM_SUFFIX}"), shape)?)?;
        let mask_name = format!("{name}{MASK_SUFFIX}");
        masks.push(if present.contains(&mask_name) {
            let m = take(mask_name.clone(), shape)?;
            Some(FreezeMask::from_tensor(m).map_err(|e| ck(format!("'{mask_name}': {e}")))?)
        } else {
            None
        });
    }
    accum.set_steps(header.accum_steps);
    accum.check_finite().map_err(|e| ck(e.to_string()))?;
    let state = TrainState {
        network,
        accum,
        masks,
        optimizer,
        epoch: header.epoch,
        history: header.history,
        hook_state: header.hook_state,
    };
    Ok((state, header.config))
}

/// Removes tensor `name` from `tensors`, checking its shape and dtype.
fn take_tensor(
    tensors: &mut HashMap<String, Tensor>,
    path: &Path,
    name: String,
    shape: &[usize],
) -> Result<Tensor> {
    let t = tensors
        .remove(&name)
        .ok_or_else(|| ModelsError::checkpoint(path, format!("missing tensor '{name}'")))?;
    if t.dims() != shape {
        return Err(ModelsError::checkpoint(
            path,
            format!(
                "tensor '{name}' has shape {:?}, expected {shape:?}",
                t.dims()
            ),
        ));
    }
    if t.dtype() != DType::F32 {
        return Err(ModelsError::checkpoint(
            path,
            format!("tensor '{name}' is {:?}, expected f32", t.dtype()),
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config(dir: &Path) -> TrainConfig {
        let mut c = TrainConfig::default_for(Arch::Lenet300100);
        c.checkpoint_dir = Some(dir.to_path_buf());
        c
    }

    #[test]
    fn round_trip_preserves_every_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config(dir.path());
        let dev = Device::Cpu;
        let mut state = TrainState::new(Arch::Lenet300100, &dev, &config).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 1, 28, 28), &dev).unwrap();
        let y = Tensor::new(&[1u32, 2, 3, 4], &dev).unwrap();
        state.train_step(&x, &y, 0.1).unwrap();
        let mask = FreezeMask::from_frozen(&[10], &[true; 10], &dev).unwrap();
        state.set_mask("fc3.bias", mask).unwrap();
        state.epoch = 3;
        let path = dir.path().join(CHECKPOINT_FILE);
        save_checkpoint(&state, &config, &path).unwrap();
        let (loaded, cfg) = load_checkpoint(&path, &dev).unwrap();
        assert_eq!(cfg, config);
        assert_eq!(loaded.epoch, 3);
        assert_eq!(
            loaded.network.to_host().unwrap(),
            state.network.to_host().unwrap()
        );
        assert_eq!(
            loaded.accum.to_host().unwrap(),
            state.accum.to_host().unwrap()
        );
        assert_eq!(loaded.accum.steps(), 1);
        assert_eq!(loaded.mask("fc3.bias").unwrap().num_frozen().unwrap(), 10);
        assert!(loaded.mask("fc3.weight").is_none());
        for ((_, a), (_, b)) in loaded
            .optimizer
            .velocities()
            .zip(state.optimizer.velocities())
        {
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        // The accumulated gradients are also readable straight from the checkpoint.
        let acc = AccumulatedGradients::load(&path, &dev).unwrap();
        assert_eq!(acc.to_host().unwrap(), state.accum.to_host().unwrap());
    }

    #[test]
    fn corrupt_checkpoints_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config(dir.path());
        let dev = Device::Cpu;
        let state = TrainState::new(Arch::Lenet300100, &dev, &config).unwrap();
        let path = dir.path().join(CHECKPOINT_FILE);
        save_checkpoint(&state, &config, &path).unwrap();
        let good = std::fs::read(&path).unwrap();

        let err = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            match load_checkpoint(&path, &dev) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("corrupt checkpoint accepted"),
            }
        };
        let msg = err(&good[..good.len() / 2]);
        assert!(
            msg.contains("checkpoint") && msg.contains(CHECKPOINT_FILE),
            "{msg}"
        );
        let msg = err(b"garbage");
        assert!(msg.contains("not a safetensors file"), "{msg}");
        // A weights-only safetensors file is not a checkpoint.
        let plain = safetensors::serialize(
            [("fc1.bias", Tensor::zeros(300, DType::F32, &dev).unwrap())],
            None,
        )
        .unwrap();
        let msg = err(&plain);
        assert!(msg.contains("no qgrad checkpoint header"), "{msg}");
        let missing = load_checkpoint(&dir.path().join("absent.safetensors"), &dev).unwrap_err();
        assert!(matches!(missing, ModelsError::Io { .. }));
    }
}
