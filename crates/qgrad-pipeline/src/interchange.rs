//! PyTorch state dicts in and out (safetensors): import a trained network
//! into a qgrad checkpoint, export a compressed file's dequantized weights.
//!
//! # Names (decided)
//!
//! qgrad's names are PyTorch's for a module whose layers are attributes named
//! as qgrad's (`fc1`, `conv1`, …; METHOD §7's layer lists, `Arch::layers`):
//! `fc1.weight` `[out, in]`, `conv1.weight` `[out, in, kh, kw]`, `fc1.bias`.
//! A batch norm after layer `L` is qgrad's `L.bn.*`; in PyTorch it is matched
//! as `L.bn.*`, `L_bn.*` or `bnL.*` (`bn1` for `fc1`/`conv1`: the layer's
//! number), with `weight`, `bias`, `running_mean`, `running_var`;
//! `num_batches_tracked` is ignored. Anything else is renamed first by the
//! user's `--map OLD=NEW` rules: a name equal to `OLD` or starting with
//! `OLD.` gets `NEW` in place of that prefix (`--map features.0=conv1`).
//!
//! Every problem (missing tensor, extra tensor, wrong shape, dtype other than
//! f32, non-finite value, unreadable file) is collected and reported at once,
//! and nothing is written.
//!
//! Export writes the tensors of a compressed file, dequantized, under the
//! same names; a batch norm stored folded (`bn.scale`, `bn.shift`) comes
//! back as `weight = scale`, `bias = shift`, `running_mean = 0`,
//! `running_var = 1 − ε`, which PyTorch's batch norm in eval mode computes as
//! `x · scale + shift` up to rounding.
//!
//! # Sparse layout (`sparse-csr-v1`, decided)
//!
//! [`ExportLayout::SparseCsr`] (`qgrad export --sparse`) writes a second
//! safetensors format, for a pruned model whose zeros should stay implicit
//! on the PyTorch side. The header's metadata holds
//! `"qgrad.layout": "sparse-csr-v1"`. A tensor `N` of rank ≥ 2 (a weight) and
//! shape `[d0, d1, …]` is viewed as the row-major matrix `[d0, d1·d2·…]`
//! (PyTorch's `weight.flatten(1)`: a convolution's rows are its output
//! channels) and stored as four tensors, exactly the arguments of
//! `torch.sparse_csr_tensor(crow_indices, col_indices, values, size)`:
//!
//! | name                | dtype | shape     | holds                                       |
//! |---------------------|-------|-----------|---------------------------------------------|
//! | `N.crow_indices`    | I64   | `[d0+1]`  | row offsets, from 0 to nnz                   |
//! | `N.col_indices`     | I64   | `[nnz]`   | each non-zero's column, ascending in a row   |
//! | `N.values`          | F32   | `[nnz]`   | the non-zero values, dequantized             |
//! | `N.size`            | I64   | `[rank]`  | the original shape `[d0, d1, …]`             |
//!
//! A non-zero is a dequantized value `≠ 0.0`: pruned weights and weights whose
//! code dequantizes to zero are both left out. Tensors of rank ≤ 1 (biases,
//! batch norm) are written dense under their own names, as in the dense
//! export. I64 rather than I32 indices because that is the dtype PyTorch's
//! own `to_sparse_csr()` produces, so the tensors need no conversion;
//! `python/qgrad_sparse.py` rebuilds the CSR tensors and the dense state dict.

use std::collections::{BTreeMap, BTreeSet};

use qgrad_csr::CompressedModel;
use qgrad_models::{Arch, LayerSpec, NamedTensor};
use safetensors::{Dtype, SafeTensors};

use crate::error::{PipelineError, Result};

/// The tensors of an imported state dict, by qgrad name.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedModel {
    /// Parameters then buffers, in the network's order.
    pub tensors: Vec<NamedTensor>,
    /// Accumulated gradients by parameter name (empty when none were given).
    pub accgrad: Vec<NamedTensor>,
}

/// A rename rule of `--map OLD=NEW`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameMap {
    /// The prefix to replace.
    pub from: String,
    /// Its replacement.
    pub to: String,
}

impl std::str::FromStr for NameMap {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.split_once('=') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok(NameMap {
                from: a.to_string(),
                to: b.to_string(),
            }),
            _ => Err(format!("'{s}' is not OLD=NEW")),
        }
    }
}

fn apply_maps(name: &str, maps: &[NameMap]) -> String {
    for m in maps {
        if name == m.from {
            return m.to.clone();
        }
        if let Some(rest) = name.strip_prefix(&m.from) {
            if rest.starts_with('.') {
                return format!("{}{rest}", m.to);
            }
        }
    }
    name.to_string()
}

/// The PyTorch spellings of qgrad's batch-norm names for `arch`:
/// `L_bn.x` and `bn<number of L>.x` → `L.bn.x`.
fn batch_norm_aliases(arch: Arch) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for layer in arch.layers() {
        if let LayerSpec::BatchNorm { name, .. } = layer {
            let digits: String = name.chars().filter(|c| c.is_ascii_digit()).collect();
            for suffix in ["weight", "bias", "running_mean", "running_var"] {
                let target = format!("{name}.bn.{suffix}");
                out.insert(format!("{name}_bn.{suffix}"), target.clone());
                if !digits.is_empty() {
                    out.insert(format!("bn{digits}.{suffix}"), target);
                }
            }
        }
    }
    out
}

fn read_f32(
    st: &SafeTensors,
    name: &str,
    shape: &[usize],
    problems: &mut Vec<String>,
) -> Option<Vec<f32>> {
    let view = st.tensor(name).ok()?;
    if view.dtype() != Dtype::F32 {
        problems.push(format!(
            "'{name}' is {:?}, expected F32 (save it with .float())",
            view.dtype()
        ));
        return None;
    }
    if view.shape() != shape {
        problems.push(format!(
            "'{name}' has shape {:?}, expected {shape:?}",
            view.shape()
        ));
        return None;
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        problems.push(format!(
            "'{name}' holds a non-finite value ({}) at element {i}",
            values[i]
        ));
        return None;
    }
    Some(values)
}

/// Reads a state dict (`bytes` of a safetensors file) for `arch`, with
/// `maps`, and optionally the accumulated gradients `<name>.accgrad` of the
/// PyTorch helper. Every problem is listed in one [`PipelineError::Input`].
pub fn import_state_dict(
    arch: Arch,
    bytes: &[u8],
    maps: &[NameMap],
    accgrad: Option<&[u8]>,
) -> Result<ImportedModel> {
    let bad = |what: String| PipelineError::Input {
        context: "cannot import the state dict".into(),
        source: what.into(),
    };
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let aliases = batch_norm_aliases(arch);
    let expected: Vec<(String, Vec<usize>)> = arch
        .parameter_shapes()
        .into_iter()
        .chain(arch.buffer_shapes())
        .collect();
    let wanted: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut problems = Vec::new();
    // qgrad name -> the file's name.
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    for name in st.names() {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let mapped = apply_maps(name, maps);
        let mapped = aliases.get(&mapped).cloned().unwrap_or(mapped);
        if !wanted.contains(mapped.as_str()) {
            problems.push(format!(
                "extra tensor '{name}'{} ({} has no such tensor; --map OLD=NEW renames)",
                if mapped != name {
                    format!(" (read as '{mapped}')")
                } else {
                    String::new()
                },
                arch.name()
            ));
            continue;
        }
        if let Some(previous) = found.insert(mapped.clone(), name.to_string()) {
            problems.push(format!("'{previous}' and '{name}' both map to '{mapped}'"));
        }
    }
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, shape) in &expected {
        match found.get(name) {
            None => problems.push(format!("missing tensor '{name}' {shape:?}")),
            Some(source) => {
                if let Some(values) = read_f32(&st, source, shape, &mut problems) {
                    tensors.push(NamedTensor {
                        name: name.clone(),
                        shape: shape.clone(),
                        values,
                    });
                }
            }
        }
    }
    let mut accum = Vec::new();
    if let Some(bytes) = accgrad {
        match SafeTensors::deserialize(bytes) {
            Err(e) => problems.push(format!(
                "the accumulated gradients are not a safetensors file: {e}"
            )),
            Ok(a) => {
                let mut names: BTreeMap<String, String> = BTreeMap::new();
                for n in a.names() {
                    let base = n.strip_suffix(".accgrad").unwrap_or(n);
                    let mapped = apply_maps(base, maps);
                    let mapped = aliases.get(&mapped).cloned().unwrap_or(mapped);
                    names.insert(mapped, n.to_string());
                }
                for (name, shape) in arch.parameter_shapes() {
                    match names.remove(&name) {
                        None => problems.push(format!("missing accumulated gradient of '{name}'")),
                        Some(source) => {
                            if let Some(values) = read_f32(&a, &source, &shape, &mut problems) {
                                if values.iter().any(|v| *v < 0.0) {
                                    problems.push(format!(
                                        "accumulated gradient '{source}' is negative somewhere (it sums |g|)"
                                    ));
                                }
                                accum.push(NamedTensor {
                                    name,
                                    shape,
                                    values,
                                });
                            }
                        }
                    }
                }
                for (_, source) in names {
                    problems.push(format!("extra accumulated gradient '{source}'"));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(bad(format!(
            "{} problem{}:\n  {}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems.join("\n  ")
        )));
    }
    Ok(ImportedModel {
        tensors,
        accgrad: accum,
    })
}

/// How an exported state dict lays out its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportLayout {
    /// Every tensor dense, f32, under its name: what `load_state_dict` reads.
    #[default]
    Dense,
    /// Every tensor of rank ≥ 2 as compressed sparse rows of its matrix view
    /// (the module docs' "Sparse layout"); vectors dense.
    SparseCsr,
}

/// The safetensors metadata key naming the layout of a sparse export.
pub const LAYOUT_KEY: &str = "qgrad.layout";
/// Its value for [`ExportLayout::SparseCsr`] (version 1 of that layout).
pub const SPARSE_CSR_V1: &str = "sparse-csr-v1";

/// `tensors` as safetensors bytes, names as they are, in `layout`.
pub fn state_dict_bytes(tensors: &[NamedTensor], layout: ExportLayout) -> Result<Vec<u8>> {
    serialize(
        tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), t.values.clone()))
            .collect(),
        layout,
    )
}

/// A compressed file's tensors, dequantized, as safetensors bytes under the
/// names of the module docs (folded batch norms unfolded), in `layout`.
pub fn export_state_dict(model: &CompressedModel, layout: ExportLayout) -> Result<Vec<u8>> {
    let mut out: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for t in &model.tensors {
        if t.name.ends_with(qgrad_runtime::HIGH_SUFFIX) {
            continue;
        }
        let mut values = t.dequantize();
        // A split weight is the sum of its two parts (FORMAT.md,
        // `high_weights`), added in f32 as training added them.
        if let Some(high) = model.high_part(&t.name) {
            for (v, h) in values.iter_mut().zip(high.dequantize()) {
                *v += h;
            }
        }
        let shape = t.shape.clone();
        if let Some(layer) = t
            .name
            .strip_suffix(&format!(".{}", qgrad_runtime::BN_SCALE))
        {
            let n = values.len();
            out.push((format!("{layer}.bn.weight"), shape.clone(), values));
            out.push((
                format!("{layer}.bn.running_mean"),
                shape.clone(),
                vec![0.0; n],
            ));
            out.push((
                format!("{layer}.bn.running_var"),
                shape,
                vec![1.0 - qgrad_runtime::BN_EPS; n],
            ));
        } else if let Some(layer) = t
            .name
            .strip_suffix(&format!(".{}", qgrad_runtime::BN_SHIFT))
        {
            out.push((format!("{layer}.bn.bias"), shape, values));
        } else {
            out.push((t.name.clone(), shape, values));
        }
    }
    serialize(out, layout)
}

/// One matrix in compressed sparse rows, as `torch.sparse_csr_tensor` takes
/// it: row `r`'s non-zeros are `values[crow[r]..crow[r + 1]]` in the columns
/// `col[crow[r]..crow[r + 1]]`, ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct CsrMatrix {
    /// Rows + 1 offsets, from 0 to the number of non-zeros.
    pub crow_indices: Vec<i64>,
    /// The column of each non-zero.
    pub col_indices: Vec<i64>,
    /// The non-zero values.
    pub values: Vec<f32>,
}

impl CsrMatrix {
    /// The non-zeros (`v != 0.0`; −0.0 is a zero) of the row-major matrix
    /// `values` of `rows` × `cols` (`values.len() == rows · cols`).
    pub fn from_dense(values: &[f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(values.len(), rows * cols);
        let mut crow = Vec::with_capacity(rows + 1);
        let mut col = Vec::new();
        let mut nz = Vec::new();
        crow.push(0);
        for r in 0..rows {
            let row = &values[r * cols..(r + 1) * cols];
            for (c, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    col.push(c as i64);
                    nz.push(v);
                }
            }
            crow.push(nz.len() as i64);
        }
        CsrMatrix {
            crow_indices: crow,
            col_indices: col,
            values: nz,
        }
    }

    /// The row-major dense matrix with `cols` columns.
    pub fn to_dense(&self, cols: usize) -> Vec<f32> {
        let rows = self.crow_indices.len().saturating_sub(1);
        let mut out = vec![0.0; rows * cols];
        for r in 0..rows {
            let (a, b) = (
                self.crow_indices[r] as usize,
                self.crow_indices[r + 1] as usize,
            );
            for k in a..b {
                out[r * cols + self.col_indices[k] as usize] = self.values[k];
            }
        }
        out
    }
}

/// One tensor of an export: its name, dtype, shape and little-endian bytes.
type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32_le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_le(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn serialize(out: Vec<(String, Vec<usize>, Vec<f32>)>, layout: ExportLayout) -> Result<Vec<u8>> {
    let mut entries: Vec<Entry> = Vec::new();
    for (name, shape, values) in out {
        if layout == ExportLayout::SparseCsr && shape.len() >= 2 {
            // The matrix view: dimension 0 is the rows (a layer's outputs),
            // the rest flattened row-major is the columns (PyTorch's own
            // `weight.flatten(1)` of a convolution).
            let rows = shape[0];
            let cols: usize = shape[1..].iter().product();
            let csr = CsrMatrix::from_dense(&values, rows, cols);
            let nnz = csr.values.len();
            let size: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            entries.push((
                format!("{name}.crow_indices"),
                Dtype::I64,
                vec![rows + 1],
                i64_le(&csr.crow_indices),
            ));
            entries.push((
                format!("{name}.col_indices"),
                Dtype::I64,
                vec![nnz],
                i64_le(&csr.col_indices),
            ));
            entries.push((
                format!("{name}.values"),
                Dtype::F32,
                vec![nnz],
                f32_le(&csr.values),
            ));
            entries.push((
                format!("{name}.size"),
                Dtype::I64,
                vec![shape.len()],
                i64_le(&size),
            ));
        } else {
            entries.push((name, Dtype::F32, shape, f32_le(&values)));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = entries
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| PipelineError::Runtime {
                    context: format!("cannot export '{n}'"),
                    source: Box::new(e),
                })
        })
        .collect::<Result<_>>()?;
    let metadata = (layout == ExportLayout::SparseCsr).then(|| {
        std::collections::HashMap::from([(LAYOUT_KEY.to_string(), SPARSE_CSR_V1.to_string())])
    });
    safetensors::tensor::serialize(views, metadata).map_err(|e| PipelineError::Runtime {
        context: "cannot serialise the state dict".into(),
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgrad_models::Network;
    use safetensors::tensor::TensorView;

    fn st(entries: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let views: Vec<(String, TensorView)> = entries
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::tensor::serialize(views, None).unwrap()
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// The state dict of a seeded network under PyTorch-style names.
    fn pytorch_like(arch: Arch, rename: impl Fn(&str) -> String) -> (Vec<NamedTensor>, Vec<u8>) {
        let net = Network::new(arch, &candle_core::Device::Cpu, 3).unwrap();
        let host = net.to_host().unwrap();
        let mut entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = host
            .iter()
            .map(|t| {
                (
                    rename(&t.name),
                    Dtype::F32,
                    t.shape.clone(),
                    f32_bytes(&t.values),
                )
            })
            .collect();
        entries.push((
            "bn1.num_batches_tracked".into(),
            Dtype::I64,
            vec![],
            vec![0; 8],
        ));
        let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = entries
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
            .collect();
        (host, st(&refs))
    }

    #[test]
    fn pytorch_names_import_exactly() {
        let arch = Arch::Mlp {
            width: 16,
            depth: 2,
            batch_norm: true,
        };
        // fc1.bn.weight -> bn1.weight, fc2.bn.* -> fc2_bn.*, fc3 -> classifier.
        let (host, bytes) = pytorch_like(arch, |n| {
            n.replace("fc1.bn.", "bn1.")
                .replace("fc2.bn.", "fc2_bn.")
                .replace("fc3.", "classifier.")
        });
        let maps = vec!["classifier=fc3".parse::<NameMap>().unwrap()];
        let imported = import_state_dict(arch, &bytes, &maps, None).unwrap();
        let mut expected = host.clone();
        expected.sort_by(|a, b| a.name.cmp(&b.name));
        let mut got = imported.tensors.clone();
        got.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(got, expected);
        assert!(imported.accgrad.is_empty());
        // Without the map, fc3's tensors are extra and missing.
        let e = import_state_dict(arch, &bytes, &[], None)
            .unwrap_err()
            .to_string();
        let e = format!(
            "{e} {:?}",
            std::error::Error::source(&import_state_dict(arch, &bytes, &[], None).unwrap_err())
        );
        assert!(
            e.contains("extra tensor 'classifier.weight'")
                && e.contains("missing tensor 'fc3.weight'"),
            "{e}"
        );
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let arch = Arch::Lenet300100;
        let net = Network::new(arch, &candle_core::Device::Cpu, 1).unwrap();
        let host = net.to_host().unwrap();
        let mut nan = host[2].values.clone();
        nan[7] = f32::NAN;
        let f64_bytes: Vec<u8> = host[1]
            .values
            .iter()
            .flat_map(|x| (*x as f64).to_le_bytes())
            .collect();
        let bytes = st(&[
            (
                "fc1.weight",
                Dtype::F32,
                vec![784, 300],
                f32_bytes(&host[0].values),
            ),
            ("fc1.bias", Dtype::F64, host[1].shape.clone(), f64_bytes),
            (
                "fc2.weight",
                Dtype::F32,
                host[2].shape.clone(),
                f32_bytes(&nan),
            ),
            (
                "fc2.bias",
                Dtype::F32,
                host[3].shape.clone(),
                f32_bytes(&host[3].values),
            ),
            (
                "fc3.weight",
                Dtype::F32,
                host[4].shape.clone(),
                f32_bytes(&host[4].values),
            ),
            ("dropout.mask", Dtype::F32, vec![1], f32_bytes(&[1.0])),
        ]);
        let err = import_state_dict(arch, &bytes, &[], None).unwrap_err();
        assert_eq!(err.kind(), crate::FailureKind::Input);
        let text = format!("{:?}", std::error::Error::source(&err).unwrap().to_string());
        for needle in [
            "[784, 300], expected [300, 784]",
            "'fc1.bias' is F64",
            "non-finite value (NaN) at element 7",
            "missing tensor 'fc3.bias'",
            "extra tensor 'dropout.mask'",
            "5 problems",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        assert!(import_state_dict(arch, b"not a state dict", &[], None).is_err());
        assert!("nonsense".parse::<NameMap>().is_err());
    }

    #[test]
    fn accumulated_gradients_come_with_the_helper_suffix() {
        let arch = Arch::Lenet300100;
        let (_, bytes) = pytorch_like(arch, |n| n.to_string());
        let shapes = arch.parameter_shapes();
        let entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = shapes
            .iter()
            .map(|(n, s)| {
                let count: usize = s.iter().product();
                (
                    format!("{n}.accgrad"),
                    Dtype::F32,
                    s.clone(),
                    f32_bytes(&vec![0.25; count]),
                )
            })
            .collect();
        let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = entries
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
            .collect();
        let a = st(&refs);
        let imported = import_state_dict(arch, &bytes, &[], Some(&a)).unwrap();
        assert_eq!(imported.accgrad.len(), shapes.len());
        assert!(imported
            .accgrad
            .iter()
            .all(|t| t.values.iter().all(|&v| v == 0.25)));
        // One missing: an error naming it.
        let e = import_state_dict(arch, &bytes, &[], Some(&st(&refs[1..]))).unwrap_err();
        let text = std::error::Error::source(&e).unwrap().to_string();
        assert!(
            text.contains("missing accumulated gradient of 'fc1.weight'"),
            "{text}"
        );
    }

    fn i64s(st: &SafeTensors, name: &str) -> Vec<i64> {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.dtype(), Dtype::I64, "{name}");
        v.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.dtype(), Dtype::F32, "{name}");
        v.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn the_sparse_export_holds_exactly_the_non_zeros() {
        let net = Network::new(Arch::Lenet5, &candle_core::Device::Cpu, 5).unwrap();
        let mut host = net.to_host().unwrap();
        // Prune about two thirds of every weight, a whole row of conv1, and
        // leave one −0.0 (a zero).
        for t in host.iter_mut().filter(|t| t.shape.len() >= 2) {
            for (i, v) in t.values.iter_mut().enumerate() {
                if i % 3 != 0 {
                    *v = 0.0;
                }
            }
        }
        let conv1 = host.iter_mut().find(|t| t.name == "conv1.weight").unwrap();
        conv1.values[..25].iter_mut().for_each(|v| *v = 0.0);
        conv1.values[30] = -0.0;
        let bytes = state_dict_bytes(&host, ExportLayout::SparseCsr).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            header.metadata().as_ref().unwrap()[LAYOUT_KEY],
            SPARSE_CSR_V1
        );
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut expected_names = 0;
        for t in &host {
            if t.shape.len() < 2 {
                assert_eq!(f32s(&st, &t.name), t.values, "{}", t.name);
                expected_names += 1;
                continue;
            }
            expected_names += 4;
            assert!(st.tensor(&t.name).is_err(), "{} also dense", t.name);
            let size = i64s(&st, &format!("{}.size", t.name));
            assert_eq!(size, t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
            let cols: usize = t.shape[1..].iter().product();
            let csr = CsrMatrix {
                crow_indices: i64s(&st, &format!("{}.crow_indices", t.name)),
                col_indices: i64s(&st, &format!("{}.col_indices", t.name)),
                values: f32s(&st, &format!("{}.values", t.name)),
            };
            // The invariants torch.sparse_csr_tensor checks.
            assert_eq!(csr.crow_indices.len(), t.shape[0] + 1);
            assert_eq!(csr.crow_indices[0], 0);
            assert_eq!(*csr.crow_indices.last().unwrap() as usize, csr.values.len());
            assert_eq!(csr.col_indices.len(), csr.values.len());
            for r in csr.crow_indices.windows(2) {
                assert!(r[0] <= r[1]);
                let row = &csr.col_indices[r[0] as usize..r[1] as usize];
                assert!(row.windows(2).all(|c| c[0] < c[1]));
                assert!(row.iter().all(|&c| (c as usize) < cols));
            }
            assert!(csr.values.iter().all(|&v| v != 0.0));
            let nnz = t.values.iter().filter(|&&v| v != 0.0).count();
            assert_eq!(csr.values.len(), nnz, "{}", t.name);
            assert_eq!(csr.to_dense(cols), t.values, "{}", t.name);
        }
        assert_eq!(st.names().len(), expected_names);
        // conv1's first row is empty.
        assert_eq!(i64s(&st, "conv1.weight.crow_indices")[1], 0);
        // The dense export of the same tensors has no layout key.
        let dense = state_dict_bytes(&host, ExportLayout::Dense).unwrap();
        let (_, header) = SafeTensors::read_metadata(&dense).unwrap();
        assert!(header.metadata().is_none());
    }

    #[test]
    fn csr_of_an_empty_or_all_zero_matrix() {
        let csr = CsrMatrix::from_dense(&[0.0; 6], 2, 3);
        assert_eq!(csr.crow_indices, vec![0, 0, 0]);
        assert!(csr.values.is_empty());
        assert_eq!(csr.to_dense(3), vec![0.0; 6]);
        let empty = CsrMatrix::from_dense(&[], 4, 0);
        assert_eq!(empty.crow_indices, vec![0; 5]);
    }
}
