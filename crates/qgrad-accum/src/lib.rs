//! Accumulated absolute gradients (METHOD.md §1), their ranking, and freeze
//! masks for in-training quantization (METHOD.md §4).
//!
//! For every trainable parameter element θ_i the importance score is
//! `A_i = Σ_t |∂L_t/∂θ_i|`, summed over every optimizer step. qgrad keeps one
//! f32 tensor per parameter tensor, same name and shape, **on the parameter's
//! device**, and adds `|g|` after every backward pass.
//!
//! Design rationale:
//! - The bookkeeping runs once per optimizer step, so it must be cheap and must
//!   never copy gradients to the host. On the CPU the update is a fused in-place
//!   custom op (`A += |g|` in one pass over memory, no allocation); on other
//!   devices it is `A = A + |g|` with candle's own device kernels. Either way
//!   the gradient never leaves the device.
//! - Ranking and selection run once per epoch (or once after training), so they
//!   work on host copies (`to_host`) and use a total order (value, tensor,
//!   element) that makes ties — common, e.g. all-zero scores of unused inputs —
//!   resolve the same way on every run.
//! - Saved files are safetensors with names `<param>.accgrad` (METHOD.md §1),
//!   written to a temporary file in the same directory and renamed, so a crash
//!   never leaves a half-written file under the final name.
//! - [`FreezeMask`] is a per-element f32 tensor (1.0 = trainable, 0.0 = frozen)
//!   on the training device: the optimizer multiplies by it, which keeps frozen
//!   elements exactly unchanged without any host round trip.
//!
//! # Example
//! Accumulate `|∂L/∂w|` over two steps of a tiny loss, freeze the least
//! important element, and round-trip the scores through safetensors:
//!
//! ```rust
//! use candle_core::{Device, Tensor, Var};
//! use qgrad_accum::{select_lowest, AccumulatedGradients, FreezeMask, Scope};
//!
//! let dev = Device::Cpu;
//! let w = Var::from_vec(vec![1f32, -2.0, 0.5], 3, &dev)?;
//! let params = vec![("fc.weight".to_string(), w.clone())];
//! let mut acc = AccumulatedGradients::new(&params)?;
//!
//! // loss = Σ w · x has gradient x, so A = |x₁| + |x₂|.
//! for x in [[3f32, -4.0, 0.0], [-1.0, 0.5, 0.25]] {
//!     let loss = w.as_tensor().mul(&Tensor::new(&x, &dev)?)?.sum_all()?;
//!     acc.accumulate(&loss.backward()?)?;
//! }
//! assert_eq!(acc.steps(), 2);
//! let host = acc.to_host()?;
//! assert_eq!(host[0].0, "fc.weight");
//! assert_eq!(host[0].2, vec![4.0, 4.5, 0.25]);
//!
//! // Freeze the lowest third of the elements: the one with A = 0.25.
//! let frozen = select_lowest(&host, 1.0 / 3.0, Scope::Global, None)?;
//! assert_eq!(frozen[0], vec![false, false, true]);
//! let mask = FreezeMask::from_frozen(&[3], &frozen[0], &dev)?;
//! assert_eq!(mask.num_frozen()?, 1);
//! let update = mask.apply(&Tensor::new(&[1f32, 1.0, 1.0], &dev)?)?;
//! assert_eq!(update.to_vec1::<f32>()?, vec![1.0, 1.0, 0.0]);
//!
//! // The scores and the step count survive a safetensors round trip.
//! let bytes = acc.to_safetensors_bytes()?;
//! let loaded = AccumulatedGradients::from_safetensors_bytes(&bytes, &dev)?;
//! assert_eq!(loaded.steps(), 2);
//! assert_eq!(loaded.to_host()?, host);
//! # Ok::<(), qgrad_accum::AccumError>(())
//! ```

#![warn(missing_docs)]

mod mask;
mod rank;

pub use mask::FreezeMask;
pub use rank::{layer_of, rank_global, rank_per_layer, select_lowest, RankedElement, Scope};

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, Var};

/// `(name, shape, values)`: one accumulated-gradient tensor copied to the host.
pub type HostTensor = (String, Vec<usize>, Vec<f32>);

/// Suffix of every accumulated-gradient tensor name in a saved file.
pub const ACCGRAD_SUFFIX: &str = ".accgrad";

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum AccumError {
    /// A candle tensor operation failed.
    #[error("candle error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Bytes that are not a valid accumulated-gradient safetensors file.
    #[error("{path} is not a valid safetensors file: {message}")]
    Format {
        /// The file, or `<memory>` for in-memory bytes.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// Two parameters given to [`AccumulatedGradients::new`] share a name.
    #[error("parameter '{0}' appears twice")]
    DuplicateName(String),
    /// A parameter name with no accumulator.
    #[error("no accumulated gradient named '{0}'")]
    UnknownName(String),
    /// A tensor whose shape differs from the accumulator's (or, for host
    /// scores, whose value count differs from its shape's product).
    #[error("shape mismatch for '{name}': expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// Parameter name.
        name: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },
    /// A parameter, gradient or stored tensor that is not `f32`.
    #[error("parameter '{name}' has dtype {dtype:?}; only f32 is supported")]
    DType {
        /// Parameter name.
        name: String,
        /// Its actual dtype.
        dtype: DType,
    },
    /// Scores of the named tensor contain NaN or infinity.
    #[error("accumulated gradient '{0}' contains NaN or infinity")]
    NotFinite(String),
    /// `accumulate` on scores loaded from a file and not yet
    /// [`attach`](AccumulatedGradients::attach)ed to parameters.
    #[error("these accumulated gradients were loaded from a file and are not attached to parameters; call attach() first")]
    Detached,
    /// An argument outside its allowed range or inconsistent with the scores.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, AccumError>;

struct Entry {
    name: String,
    /// The parameter whose gradient is accumulated; `None` after `load`.
    param: Option<Var>,
    /// `A`, contiguous f32, same shape as the parameter, on its device.
    accum: Tensor,
}

/// `A = Σ_t |g_t|` for every parameter tensor, kept on the training device.
pub struct AccumulatedGradients {
    entries: Vec<Entry>,
    steps: u64,
}

impl std::fmt::Debug for AccumulatedGradients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccumulatedGradients")
            .field("names", &self.names().collect::<Vec<_>>())
            .field("steps", &self.steps)
            .finish()
    }
}

fn check_f32(name: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(AccumError::DType {
            name: name.to_string(),
            dtype: t.dtype(),
        });
    }
    Ok(())
}

impl AccumulatedGradients {
    /// Zero accumulators for `params` (in that order), on each parameter's device.
    pub fn new(params: &[(String, Var)]) -> Result<Self> {
        let mut entries: Vec<Entry> = Vec::with_capacity(params.len());
        for (name, var) in params {
            if entries.iter().any(|e| &e.name == name) {
                return Err(AccumError::DuplicateName(name.clone()));
            }
            check_f32(name, var.as_tensor())?;
            let accum = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            entries.push(Entry {
                name: name.clone(),
                param: Some(var.clone()),
                accum,
            });
        }
        Ok(Self { entries, steps: 0 })
    }

    /// Adds `|g|` of every tracked parameter's gradient in `grads` (one
    /// optimizer step). A parameter without a gradient (not on the loss path)
    /// adds zero. Runs on the parameters' device; nothing is copied to the host.
    pub fn accumulate(&mut self, grads: &GradStore) -> Result<()> {
        for entry in &mut self.entries {
            let param = entry.param.as_ref().ok_or(AccumError::Detached)?;
            let Some(grad) = grads.get(param.as_tensor()) else {
                continue;
            };
            if grad.dims() != entry.accum.dims() {
                return Err(AccumError::ShapeMismatch {
                    name: entry.name.clone(),
                    expected: entry.accum.dims().to_vec(),
                    got: grad.dims().to_vec(),
                });
            }
            check_f32(&entry.name, grad)?;
            add_abs_assign(&mut entry.accum, grad)?;
        }
        self.steps += 1;
        Ok(())
    }

    /// Number of `accumulate` calls summed into these scores (kept across save/load).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Overrides the step count (checkpoint restore).
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// The live accumulator of `name` (on the training device). It is updated
    /// in place by later `accumulate` calls; take `.copy()` for a snapshot.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| &e.accum)
    }

    /// Parameter names, in the order given to `new` (layer order).
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// Number of tracked parameter tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no parameter tensor is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of scored elements.
    pub fn num_elements(&self) -> usize {
        self.entries.iter().map(|e| e.accum.elem_count()).sum()
    }

    /// `(name, shape, values)` of every accumulator, in order (one device→host copy).
    pub fn to_host(&self) -> Result<Vec<HostTensor>> {
        self.entries
            .iter()
            .map(|e| {
                let values = e.accum.flatten_all()?.to_vec1::<f32>()?;
                Ok((e.name.clone(), e.accum.dims().to_vec(), values))
            })
            .collect()
    }

    /// Replaces the accumulator of `name` (e.g. to restore or to reset a score).
    pub fn set(&mut self, name: &str, values: &Tensor) -> Result<()> {
        let entry = self
            .entries
            .iter_mut()
            .find(|e| e.name == name)
            .ok_or_else(|| AccumError::UnknownName(name.to_string()))?;
        if values.dims() != entry.accum.dims() {
            return Err(AccumError::ShapeMismatch {
                name: name.to_string(),
                expected: entry.accum.dims().to_vec(),
                got: values.dims().to_vec(),
            });
        }
        check_f32(name, values)?;
        // A fresh contiguous copy on the accumulator's device, so in-place
        // updates never write into the caller's tensor.
        entry.accum = values
            .to_device(entry.accum.device())?
            .copy()?
            .contiguous()?;
        Ok(())
    }

    /// Sets every accumulator to zero.
    pub fn reset(&mut self) -> Result<()> {
        for e in &mut self.entries {
            e.accum = e.accum.zeros_like()?;
        }
        self.steps = 0;
        Ok(())
    }

    /// Serialises to safetensors bytes: tensors `<param>.accgrad`, metadata
    /// `qgrad.steps` and `qgrad.order` (the parameter order).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let named: Vec<(String, &Tensor)> = self
            .entries
            .iter()
            .map(|e| (format!("{}{ACCGRAD_SUFFIX}", e.name), &e.accum))
            .collect();
        let mut metadata = HashMap::new();
        metadata.insert(
            "qgrad.kind".to_string(),
            "accumulated-gradients".to_string(),
        );
        metadata.insert("qgrad.steps".to_string(), self.steps.to_string());
        let order: Vec<&str> = self.names().collect();
        metadata.insert("qgrad.order".to_string(), order.join("\n"));
        safetensors::serialize(named, Some(metadata)).map_err(|e| AccumError::Format {
            path: "<memory>".to_string(),
            message: e.to_string(),
        })
    }

    /// Saves to `path` atomically (temporary file in the same directory, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.to_safetensors_bytes()?;
        write_atomic(path.as_ref(), &bytes)
    }

    /// Loads a file written by [`save`](Self::save) onto `device`. The result is
    /// detached from any parameters: it can be read, ranked and saved;
    /// [`attach`](Self::attach) it to parameters to keep accumulating.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| AccumError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_safetensors_bytes(&bytes, device)
            .map_err(|e| with_path(e, &path.display().to_string()))
    }

    /// Parses safetensors bytes (see [`to_safetensors_bytes`](Self::to_safetensors_bytes)).
    pub fn from_safetensors_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let format_err = |message: String| AccumError::Format {
            path: "<memory>".to_string(),
            message,
        };
        let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| format_err(e.to_string()))?;
        let meta = metadata.metadata().clone().unwrap_or_default();
        let steps = match meta.get("qgrad.steps") {
            Some(s) => s
                .parse::<u64>()
                .map_err(|_| format_err(format!("bad qgrad.steps '{s}'")))?,
            None => 0,
        };
        let mut tensors = candle_core::safetensors::load_buffer(bytes, device)
            .map_err(|e| format_err(e.to_string()))?;
        // The recorded order, or the sorted names if the file has none.
        let order: Vec<String> = match meta.get("qgrad.order") {
            Some(o) if !o.is_empty() => o.split('\n').map(str::to_string).collect(),
            _ => {
                let mut names: Vec<String> = tensors
                    .keys()
                    .filter_map(|k| k.strip_suffix(ACCGRAD_SUFFIX).map(str::to_string))
                    .collect();
                names.sort();
                names
            }
        };
        let mut entries = Vec::with_capacity(order.len());
        for name in order {
            let key = format!("{name}{ACCGRAD_SUFFIX}");
            let accum = tensors
                .remove(&key)
                .ok_or_else(|| format_err(format!("missing tensor '{key}'")))?;
            check_f32(&name, &accum)?;
            entries.push(Entry {
                name,
                param: None,
                accum: accum.contiguous()?,
            });
        }
        if let Some(extra) = tensors.keys().find(|k| k.ends_with(ACCGRAD_SUFFIX)) {
            return Err(format_err(format!(
                "tensor '{extra}' is not listed in qgrad.order"
            )));
        }
        Ok(Self { entries, steps })
    }

    /// Attaches loaded scores to `params` (same names and shapes, any order),
    /// moving them to the parameters' device; later `accumulate` calls add to them.
    pub fn attach(&mut self, params: &[(String, Var)]) -> Result<()> {
        if params.len() != self.entries.len() {
            return Err(AccumError::InvalidArgument(format!(
                "{} parameters given, {} accumulated gradients stored",
                params.len(),
                self.entries.len()
            )));
        }
        let mut entries = Vec::with_capacity(params.len());
        for (name, var) in params {
            let pos = self
                .entries
                .iter()
                .position(|e| &e.name == name)
                .ok_or_else(|| AccumError::UnknownName(name.clone()))?;
            let old = &self.entries[pos];
            if old.accum.dims() != var.dims() {
                return Err(AccumError::ShapeMismatch {
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    got: old.accum.dims().to_vec(),
                });
            }
            entries.push(Entry {
                name: name.clone(),
                param: Some(var.clone()),
                accum: old.accum.to_device(var.device())?.copy()?,
            });
        }
        self.entries = entries;
        Ok(())
    }

    /// Checks that every score is finite.
    pub fn check_finite(&self) -> Result<()> {
        for (name, _, values) in self.to_host()? {
            if values.iter().any(|v| !v.is_finite()) {
                return Err(AccumError::NotFinite(name));
            }
        }
        Ok(())
    }
}

fn with_path(e: AccumError, path: &str) -> AccumError {
    match e {
        AccumError::Format { message, .. } => AccumError::Format {
            path: path.to_string(),
            message,
        },
        other => other,
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and
/// an atomic rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io_err = |source: std::io::Error| AccumError::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // An output, not a private file: the permissions `File::create` gives
    // (0o666 less the umask), not tempfile's 0o600. (qgrad-csr's
    // `output_temp_builder` does the same; this crate does not depend on it.)
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(io_err)?;
    tmp.write_all(bytes).map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(path).map_err(|e| io_err(e.error))?;
    Ok(())
}

/// `accum += |grad|` in place on the CPU, `accum = accum + |grad|` elsewhere.
fn add_abs_assign(accum: &mut Tensor, grad: &Tensor) -> candle_core::Result<()> {
    if accum.device().is_cpu() && accum.is_contiguous() {
        accum.inplace_op2(grad, &AddAbsAssign)
    } else {
        // Detached so the running sum never records a backprop graph.
        *accum = accum.add(&grad.detach().abs()?)?;
        Ok(())
    }
}

/// In-place `dst += |src|` (f32), one pass over memory, no allocation.
struct AddAbsAssign;

impl InplaceOp2 for AddAbsAssign {
    fn name(&self) -> &'static str {
        "qgrad-add-abs-assign"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_layout: &Layout,
        src: &CpuStorage,
        src_layout: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(dst), CpuStorage::F32(src)) = (dst, src) else {
            candle_core::bail!("qgrad-add-abs-assign: f32 tensors required");
        };
        let Some((d0, d1)) = dst_layout.contiguous_offsets() else {
            candle_core::bail!("qgrad-add-abs-assign: destination must be contiguous");
        };
        let dst = &mut dst[d0..d1];
        if let Some((s0, s1)) = src_layout.contiguous_offsets() {
            let src = &src[s0..s1];
            if src.len() != dst.len() {
                candle_core::bail!("qgrad-add-abs-assign: length mismatch");
            }
            // Element-wise, so splitting it over rayon's threads changes no
            // bit; below two chunks fork and join would cost more.
            const CHUNK: usize = 1 << 15;
            let add = |dst: &mut [f32], src: &[f32]| {
                for (a, g) in dst.iter_mut().zip(src) {
                    *a += g.abs();
                }
            };
            if dst.len() < 2 * CHUNK {
                add(dst, src);
            } else {
                use rayon::prelude::*;
                dst.par_chunks_mut(CHUNK)
                    .zip(src.par_chunks(CHUNK))
                    .for_each(|(d, s)| add(d, s));
            }
        } else {
            // Strided source (e.g. the transposed gradient of a linear weight):
            // walk it in row-major order of its logical shape.
            let dims = src_layout.dims();
            let stride = src_layout.stride();
            let mut index = vec![0usize; dims.len()];
            let mut offset = src_layout.start_offset();
            for a in dst.iter_mut() {
                *a += src[offset].abs();
                for d in (0..dims.len()).rev() {
                    index[d] += 1;
                    offset += stride[d];
                    if index[d] < dims[d] {
                        break;
                    }
                    offset -= stride[d] * dims[d];
                    index[d] = 0;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(device: &Device) -> Vec<(String, Var)> {
        vec![
            (
                "fc.weight".to_string(),
                Var::from_vec(vec![1f32, -2., 3., 0.5, 0.25, -1.], (2, 3), device).unwrap(),
            ),
            (
                "fc.bias".to_string(),
                Var::from_vec(vec![0.1f32, -0.2], 2, device).unwrap(),
            ),
        ]
    }

    /// loss = sum((x·Wᵀ + b) * c), with the weight used transposed so the
    /// gradient reaching the accumulator is a strided tensor.
    fn step(p: &[(String, Var)], x: &Tensor, c: &Tensor) -> GradStore {
        let w = p[0].1.as_tensor();
        let b = p[1].1.as_tensor();
        let y = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap();
        y.mul(c).unwrap().sum_all().unwrap().backward().unwrap()
    }

    #[test]
    fn accumulates_absolute_gradients_like_a_reference() {
        let dev = Device::Cpu;
        let p = params(&dev);
        let mut acc = AccumulatedGradients::new(&p).unwrap();
        let x1 = Tensor::new(&[[1f32, -2., 3.]], &dev).unwrap();
        let c1 = Tensor::new(&[[1f32, -1.]], &dev).unwrap();
        let x2 = Tensor::new(&[[-0.5f32, 4., 1.]], &dev).unwrap();
        let c2 = Tensor::new(&[[2f32, 3.]], &dev).unwrap();
        let mut expected_w = vec![0f32; 6];
        let mut expected_b = vec![0f32; 2];
        for (x, c) in [(&x1, &c1), (&x2, &c2)] {
            let grads = step(&p, x, c);
            acc.accumulate(&grads).unwrap();
            let xv = x.to_vec2::<f32>().unwrap()[0].clone();
            let cv = c.to_vec2::<f32>().unwrap()[0].clone();
            for o in 0..2 {
                for i in 0..3 {
                    expected_w[o * 3 + i] += (cv[o] * xv[i]).abs();
                }
                expected_b[o] += cv[o].abs();
            }
        }
        assert_eq!(acc.steps(), 2);
        let host = acc.to_host().unwrap();
        assert_eq!(host[0].0, "fc.weight");
        assert_eq!(host[0].1, vec![2, 3]);
        assert_eq!(host[0].2, expected_w);
        assert_eq!(host[1].2, expected_b);
        // The fallback path (non-CPU devices) gives the same numbers.
        let grads = step(&p, &x1, &c1);
        let g = grads.get(p[0].1.as_tensor()).unwrap();
        let reference = acc
            .get("fc.weight")
            .unwrap()
            .add(&g.abs().unwrap())
            .unwrap();
        acc.accumulate(&grads).unwrap();
        assert_eq!(
            reference.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            acc.get("fc.weight")
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }

    #[test]
    fn save_load_round_trip_and_attach() {
        let dev = Device::Cpu;
        let p = params(&dev);
        let mut acc = AccumulatedGradients::new(&p).unwrap();
        let x = Tensor::new(&[[1f32, -2., 3.]], &dev).unwrap();
        let c = Tensor::new(&[[1f32, -1.]], &dev).unwrap();
        acc.accumulate(&step(&p, &x, &c)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.accgrad.safetensors");
        acc.save(&path).unwrap();
        let raw = candle_core::safetensors::load(&path, &dev).unwrap();
        assert!(raw.contains_key("fc.weight.accgrad"));
        assert!(raw.contains_key("fc.bias.accgrad"));
        let mut loaded = AccumulatedGradients::load(&path, &dev).unwrap();
        assert_eq!(
            loaded.names().collect::<Vec<_>>(),
            vec!["fc.weight", "fc.bias"]
        );
        assert_eq!(loaded.steps(), 1);
        assert_eq!(loaded.to_host().unwrap(), acc.to_host().unwrap());
        assert!(matches!(
            loaded.accumulate(&step(&p, &x, &c)),
            Err(AccumError::Detached)
        ));
        loaded.attach(&p).unwrap();
        loaded.accumulate(&step(&p, &x, &c)).unwrap();
        acc.accumulate(&step(&p, &x, &c)).unwrap();
        assert_eq!(loaded.to_host().unwrap(), acc.to_host().unwrap());
    }

    #[test]
    fn corrupt_files_give_clear_errors() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"not a safetensors file at all").unwrap();
        let err = AccumulatedGradients::load(&path, &dev).unwrap_err();
        assert!(matches!(err, AccumError::Format { .. }), "{err}");
        assert!(err.to_string().contains("bad.safetensors"), "{err}");
        // Truncated valid file.
        let p = params(&dev);
        let acc = AccumulatedGradients::new(&p).unwrap();
        let bytes = acc.to_safetensors_bytes().unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        assert!(matches!(
            AccumulatedGradients::load(&path, &dev),
            Err(AccumError::Format { .. })
        ));
        let missing = AccumulatedGradients::load(dir.path().join("nope"), &dev).unwrap_err();
        assert!(matches!(missing, AccumError::Io { .. }));
    }

    #[test]
    fn rejects_duplicates_and_wrong_dtype() {
        let dev = Device::Cpu;
        let v = Var::zeros(3, DType::F32, &dev).unwrap();
        let dup = vec![("a".to_string(), v.clone()), ("a".to_string(), v)];
        assert!(matches!(
            AccumulatedGradients::new(&dup),
            Err(AccumError::DuplicateName(_))
        ));
        let f64var = Var::zeros(3, DType::F64, &dev).unwrap();
        assert!(matches!(
            AccumulatedGradients::new(&[("b".to_string(), f64var)]),
            Err(AccumError::DType { .. })
        ));
    }
}
