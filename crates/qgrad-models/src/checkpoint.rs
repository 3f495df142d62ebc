//! Training checkpoints: one safetensors file with every tensor of the
//! training state and a JSON header in its metadata, written atomically and
//! protected by a checksum.
//!
//! Tensor names: parameters and buffers under their own names (so the file
//! loads as plain weights with any safetensors reader), `<param>.accgrad`
//! (METHOD.md §1), `<param>.<slot>` for every state slot of the optimizer
//! (SGD: `momentum`; Adam: `exp_avg`, `exp_avg_sq`), and
//! `<param>.freeze_mask` for parameters with frozen elements. Metadata
//! `qgrad.checkpoint` is a JSON [`CheckpointHeader`]; `qgrad.order` /
//! `qgrad.steps` make the same file readable by `AccumulatedGradients::load`.
//!
//! # Checksum (format version 2)
//!
//! Metadata `qgrad.checksum` is the CRC-32 (IEEE, as in zip and PNG; 8 lower-
//! case hex digits) of a canonical byte string: for every tensor in name
//! order, its name, dtype and shape and its data bytes, then every other
//! metadata pair in key order, each field preceded by its length as a
//! little-endian u64. Loading recomputes it before using anything, so a
//! flipped bit anywhere in the tensors or the header is an error naming the
//! file, never a silently different model. Version-1 files (before the
//! checksum, SGD only) still load.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qgrad_accum::{AccumulatedGradients, FreezeMask, ACCGRAD_SUFFIX};
use qgrad_optim::OptimizerConfig;
use serde::{Deserialize, Serialize};

use crate::arch::Arch;
use crate::error::{ModelsError, Result};
use crate::net::{NamedTensor, Network};
use crate::train::{EpochStats, TrainConfig, TrainState};

/// File name of the checkpoint inside `TrainConfig::checkpoint_dir`.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The accumulated gradients alone, written beside the checkpoint.
pub const ACCGRAD_FILE: &str = "checkpoint.accgrad.safetensors";
const FORMAT_VERSION: u32 = 2;
const HEADER_KEY: &str = "qgrad.checkpoint";
const CHECKSUM_KEY: &str = "qgrad.checksum";
const MASK_SUFFIX: &str = ".freeze_mask";
/// The hook-state key that version-1 checkpoints' single hook state gets
/// (it was in-training quantization's, the only hook with state then).
const LEGACY_HOOK: &str = "in-training";

/// The non-tensor part of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointHeader {
    /// 1 (no checksum, SGD only) or 2.
    pub format_version: u32,
    /// The network's name.
    pub arch: String,
    /// Completed epochs.
    pub epoch: usize,
    /// Steps summed into the accumulated gradients.
    pub accum_steps: u64,
    /// The configuration of the run.
    pub config: TrainConfig,
    /// Statistics of the completed epochs.
    pub history: Vec<EpochStats>,
    /// The optimizer's settings (absent in version 1: SGD from `config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerConfig>,
    /// Updates the optimizer has made.
    #[serde(default)]
    pub optimizer_steps: u64,
    /// The hooks' own states by hook name (in-training quantization: which
    /// elements are frozen, the exponents, the splits done), so a killed run
    /// resumes with them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hook_states: BTreeMap<String, String>,
    /// Version 1's single hook state.
    #[serde(default, skip_serializing)]
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
    for (name, _) in &params {
        for slot in state.optimizer.slots() {
            let t = state.optimizer.state(name, slot).ok_or_else(|| {
                ModelsError::Other(format!("the optimizer has no {slot} for '{name}'"))
            })?;
            tensors.push((format!("{name}.{slot}"), t.clone()));
        }
    }
    for ((name, _), mask) in params.iter().zip(&state.masks) {
        if let Some(m) = mask {
            tensors.push((format!("{name}{MASK_SUFFIX}"), m.tensor().clone()));
        }
    }
    let header = CheckpointHeader {
        format_version: FORMAT_VERSION,
        arch: net.arch.name(),
        epoch: state.epoch,
        accum_steps: state.accum.steps(),
        config: config.clone(),
        history: state.history.clone(),
        optimizer: Some(state.optimizer.config()),
        optimizer_steps: state.optimizer.steps(),
        hook_states: state.hook_states.clone(),
        hook_state: None,
    };
    let mut metadata = HashMap::new();
    let json = serde_json::to_string(&header)
        .map_err(|e| ModelsError::checkpoint(path, format!("cannot encode header: {e}")))?;
    metadata.insert(HEADER_KEY.to_string(), json);
    let order: Vec<&str> = state.accum.names().collect();
    metadata.insert("qgrad.order".to_string(), order.join("\n"));
    metadata.insert("qgrad.steps".to_string(), state.accum.steps().to_string());
    let encode = |metadata: HashMap<String, String>| {
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| ModelsError::checkpoint(path, format!("cannot encode tensors: {e}")))
    };
    // The checksum covers the content, not the byte layout, so it is
    // computed on the file without it and then added to the metadata.
    let unsummed = encode(metadata.clone())?;
    let sum = checksum(path, &unsummed)?;
    metadata.insert(CHECKSUM_KEY.to_string(), format!("{sum:08x}"));
    let bytes = encode(metadata)?;
    qgrad_accum::write_atomic(path, &bytes)?;
    Ok(())
}

/// The CRC-32 of the canonical content of a safetensors file (module docs),
/// leaving out the checksum pair itself.
fn checksum(path: &Path, bytes: &[u8]) -> Result<u32> {
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ModelsError::checkpoint(path, format!("not a safetensors file: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| ModelsError::checkpoint(path, format!("not a safetensors file: {e}")))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut field = |bytes: &[u8]| {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    let mut tensors = file.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in &tensors {
        field(name.as_bytes());
        field(format!("{:?}", view.dtype()).as_bytes());
        let shape: Vec<u8> = view
            .shape()
            .iter()
            .flat_map(|d| (*d as u64).to_le_bytes())
            .collect();
        field(&shape);
        field(view.data());
    }
    let pairs: BTreeMap<&String, &String> = meta
        .metadata()
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != CHECKSUM_KEY)
        .collect();
    for (k, v) in pairs {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    Ok(hasher.finalize())
}

/// Reads the header of a checkpoint, verifying its checksum.
pub fn read_header(path: &Path) -> Result<CheckpointHeader> {
    let bytes = std::fs::read(path).map_err(|e| ModelsError::io(path, e))?;
    parse_header(path, &bytes)
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<CheckpointHeader> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| ModelsError::checkpoint(path, format!("not a safetensors file: {e}")))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let json = metadata.get(HEADER_KEY).ok_or_else(|| {
        ModelsError::checkpoint(path, "no qgrad checkpoint header (not a qgrad checkpoint?)")
    })?;
    let mut header: CheckpointHeader = serde_json::from_str(json)
        .map_err(|e| ModelsError::checkpoint(path, format!("corrupt header: {e}")))?;
    match header.format_version {
        1 => {
            if let Some(saved) = header.hook_state.take() {
                header.hook_states.insert(LEGACY_HOOK.to_string(), saved);
            }
        }
        FORMAT_VERSION => {
            let stored = metadata.get(CHECKSUM_KEY).ok_or_else(|| {
                ModelsError::checkpoint(path, "no checksum (a version-2 checkpoint has one)")
            })?;
            let actual = format!("{:08x}", checksum(path, bytes)?);
            if *stored != actual {
                return Err(ModelsError::checkpoint(
                    path,
                    format!(
                        "checksum mismatch (stored {stored}, content {actual}): the file is \
                         corrupt"
                    ),
                ));
            }
        }
        v => {
            return Err(ModelsError::checkpoint(
                path,
                format!("format version {v} is not supported (expected 1 or {FORMAT_VERSION})"),
            ))
        }
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
    if let Some(pact) = header.config.pact {
        network.enable_pact(pact)?;
    }
    let clips: Vec<(String, Vec<usize>)> = match network.pact() {
        Some(_) => network
            .clip_names()
            .into_iter()
            .map(|n| (n, vec![1]))
            .collect(),
        None => Vec::new(),
    };
    let mut host = Vec::new();
    for (name, shape) in arch
        .parameter_shapes()
        .into_iter()
        .chain(clips)
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
    let optimizer_config = header
        .optimizer
        .clone()
        .unwrap_or_else(|| header.config.optimizer_config());
    let mut optimizer = optimizer_config
        .build(&params)
        .map_err(|e| ck(e.to_string()))?;
    let mut masks = Vec::with_capacity(params.len());
    for (name, var) in &params {
        let shape = var.dims();
        accum.set(name, &take(format!("{name}{ACCGRAD_SUFFIX}"), shape)?)?;
        for slot in optimizer.slots() {
            let t = take(format!("{name}.{slot}"), shape)?;
            optimizer
                .set_state(name, slot, &t)
                .map_err(|e| ck(e.to_string()))?;
        }
        let mask_name = format!("{name}{MASK_SUFFIX}");
        masks.push(if present.contains(&mask_name) {
            let m = take(mask_name.clone(), shape)?;
            Some(FreezeMask::from_tensor(m).map_err(|e| ck(format!("'{mask_name}': {e}")))?)
        } else {
            None
        });
    }
    optimizer.set_steps(header.optimizer_steps);
    accum.set_steps(header.accum_steps);
    accum.check_finite().map_err(|e| ck(e.to_string()))?;
    let state = TrainState {
        network,
        accum,
        masks,
        optimizer,
        epoch: header.epoch,
        history: header.history,
        hook_states: header.hook_states,
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

    fn assert_same_optimizer_state(a: &TrainState, b: &TrainState) {
        assert_eq!(a.optimizer.config(), b.optimizer.config());
        assert_eq!(a.optimizer.steps(), b.optimizer.steps());
        for (name, _) in b.network.parameters() {
            for slot in b.optimizer.slots() {
                let get = |s: &TrainState| {
                    let t = s.optimizer.state(&name, slot).unwrap();
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                };
                assert_eq!(get(a), get(b), "{name}.{slot}");
            }
        }
    }

    #[test]
    fn adam_state_round_trips_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = tiny_config(dir.path());
        config.optimizer = crate::train::OptimizerKind::ADAM;
        let dev = Device::Cpu;
        let mut state = TrainState::new(Arch::Lenet300100, &dev, &config).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 1, 28, 28), &dev).unwrap();
        let y = Tensor::new(&[1u32, 2, 3, 4], &dev).unwrap();
        state.train_step(&x, &y, 0.001).unwrap();
        state.train_step(&x, &y, 0.001).unwrap();
        let path = dir.path().join(CHECKPOINT_FILE);
        save_checkpoint(&state, &config, &path).unwrap();
        let (loaded, _) = load_checkpoint(&path, &dev).unwrap();
        assert_eq!(loaded.optimizer.config().name(), "adam");
        assert_eq!(loaded.optimizer.steps(), 2);
        assert_same_optimizer_state(&loaded, &state);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config(dir.path());
        let dev = Device::Cpu;
        let state = TrainState::new(Arch::Lenet300100, &dev, &config).unwrap();
        let path = dir.path().join(CHECKPOINT_FILE);
        save_checkpoint(&state, &config, &path).unwrap();
        let good = std::fs::read(&path).unwrap();
        // Bits across the whole file: length prefix, JSON header, tensor data.
        let stride = good.len() / 97;
        for (k, at) in (0..good.len()).step_by(stride).enumerate() {
            let mut bad = good.clone();
            bad[at] ^= 1 << (k % 8);
            std::fs::write(&path, &bad).unwrap();
            match load_checkpoint(&path, &dev) {
                Ok(_) => panic!("a flipped bit at byte {at} of {} was accepted", good.len()),
                Err(e) => assert!(e.to_string().contains(CHECKPOINT_FILE), "{e}"),
            }
        }
    }

    #[test]
    fn version_1_checkpoints_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config(dir.path());
        let dev = Device::Cpu;
        let state = TrainState::new(Arch::Lenet300100, &dev, &config).unwrap();
        // A version-1 file: no checksum, SGD momentum, one hook state.
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, var) in state.network.parameters() {
            tensors.push((name.clone(), var.as_tensor().clone()));
            tensors.push((
                format!("{name}.accgrad"),
                var.as_tensor().ones_like().unwrap(),
            ));
            tensors.push((
                format!("{name}.momentum"),
                var.as_tensor().zeros_like().unwrap(),
            ));
        }
        let header = serde_json::json!({
            "format_version": 1,
            "arch": "lenet-300-100",
            "epoch": 2,
            "accum_steps": 7,
            "config": config,
            "history": [],
            "hook_state": "{}",
        });
        let metadata = HashMap::from([(HEADER_KEY.to_string(), header.to_string())]);
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
                .unwrap();
        let path = dir.path().join(CHECKPOINT_FILE);
        std::fs::write(&path, bytes).unwrap();
        let (loaded, _) = load_checkpoint(&path, &dev).unwrap();
        assert_eq!(loaded.epoch, 2);
        assert_eq!(loaded.accum.steps(), 7);
        assert_eq!(loaded.optimizer.config().name(), "sgd");
        assert_eq!(
            loaded.hook_states.get(LEGACY_HOOK).map(String::as_str),
            Some("{}")
        );
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
        assert_same_optimizer_state(&loaded, &state);
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
