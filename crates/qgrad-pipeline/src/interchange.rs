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

/// `tensors` as safetensors bytes (f32), names as they are.
pub fn state_dict_bytes(tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    serialize(
        tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), t.values.clone()))
            .collect(),
    )
}

/// A compressed file's tensors, dequantized, as safetensors bytes under the
/// names of the module docs (folded batch norms unfolded).
pub fn export_state_dict(model: &CompressedModel) -> Result<Vec<u8>> {
    let mut out: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for t in &model.tensors {
        let values = t.dequantize();
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
    serialize(out)
}

fn serialize(out: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = out
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| PipelineError::Runtime {
                    context: format!("cannot export '{n}'"),
                    source: Box::new(e),
                })
        })
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(views, None).map_err(|e| PipelineError::Runtime {
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
}
