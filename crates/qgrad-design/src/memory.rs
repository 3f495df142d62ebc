//! Activation memory (METHOD §9, decided there): for batch 1, the input at
//! its own width plus the largest sum over two consecutive layers of (output
//! elements × `k_a` bits): what a layer-by-layer accelerator must hold at
//! once while it computes one layer from the previous one.
//!
//! Decided here, for the layer lists of `qgrad_runtime::spec::Arch`:
//! - A "layer" is a weight layer (convolution or linear). Its output is
//!   counted where the next weight layer reads it, that is after its batch
//!   norm, ReLU, pooling and flattening: an accelerator fuses those into the
//!   layer, so a pooled convolution holds the pooled map.
//! - Every layer output, the logits included, is held at `k_a` bits (with
//!   `k_a = 32` a float design).
//! - The input is held at `input_bits` (8 for the byte pixels of MNIST and
//!   CIFAR-10) for the whole pass, so it is added once; a network with one
//!   weight layer holds its input and its one output.

use qgrad_runtime::spec::{Arch, LayerSpec};
use serde::Serialize;

use crate::{DesignError, Result};

/// The widths of the memory model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ActivationMemoryConfig {
    /// Bits of every layer output (`k_a`).
    pub act_bits: u8,
    /// Bits of the input.
    pub input_bits: u8,
}

/// A network's activation memory and what it is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivationMemory {
    /// Elements of the input.
    pub input_elements: usize,
    /// Each weight layer's name and output elements, in order.
    pub layer_outputs: Vec<(String, usize)>,
    /// The consecutive pair (indices into `layer_outputs`) that needs the
    /// most memory; `(0, 0)` with one layer.
    pub peak_pair: (usize, usize),
    /// The memory in bits.
    pub bits: u64,
}

/// [`ActivationMemory`] of `arch` under `config`.
pub fn activation_memory(arch: Arch, config: &ActivationMemoryConfig) -> Result<ActivationMemory> {
    for (what, bits) in [
        ("activation", config.act_bits),
        ("input", config.input_bits),
    ] {
        if !(1..=32).contains(&bits) {
            return Err(DesignError::InvalidWidth { what, bits });
        }
    }
    let [c, h, w] = arch.input_shape();
    let input_elements = c * h * w;
    // The running shape: [channels, height, width], or [features, 1, 1].
    let mut shape = [c, h, w];
    let mut outputs: Vec<(String, usize)> = Vec::new();
    let mut pending: Option<String> = None;
    let shape_err = |layer: usize, reason: String| DesignError::Shape { layer, reason };
    for (i, layer) in arch.layers().iter().enumerate() {
        match layer {
            LayerSpec::Conv2d {
                name,
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            } => {
                if let Some(prev) = pending.take() {
                    outputs.push((prev, shape.iter().product()));
                }
                if shape[0] != *in_channels {
                    return Err(shape_err(
                        i,
                        format!("{name} takes {in_channels} channels, gets {}", shape[0]),
                    ));
                }
                let side = |n: usize| {
                    (n + 2 * padding)
                        .checked_sub(*kernel)
                        .map(|d| d / stride.max(&1) + 1)
                };
                match (side(shape[1]), side(shape[2])) {
                    (Some(oh), Some(ow)) => shape = [*out_channels, oh, ow],
                    _ => {
                        return Err(shape_err(
                            i,
                            format!("{name}'s kernel {kernel} exceeds its padded input"),
                        ))
                    }
                }
                pending = Some(name.clone());
            }
            LayerSpec::Linear {
                name,
                inputs,
                outputs: out,
            } => {
                if let Some(prev) = pending.take() {
                    outputs.push((prev, shape.iter().product()));
                }
                let have: usize = shape.iter().product();
                if have != *inputs {
                    return Err(shape_err(
                        i,
                        format!("{name} takes {inputs} features, gets {have}"),
                    ));
                }
                shape = [*out, 1, 1];
                pending = Some(name.clone());
            }
            LayerSpec::MaxPool2d { size } => {
                let s = (*size).max(1);
                shape = [shape[0], shape[1] / s, shape[2] / s];
            }
            LayerSpec::Flatten => shape = [shape.iter().product(), 1, 1],
            LayerSpec::BatchNorm { .. } | LayerSpec::Relu | LayerSpec::Dropout { .. } => {}
        }
    }
    if let Some(prev) = pending {
        outputs.push((prev, shape.iter().product()));
    }
    let act = u64::from(config.act_bits);
    let (peak_pair, peak) = if outputs.len() < 2 {
        ((0, 0), outputs.first().map_or(0, |o| o.1 as u64) * act)
    } else {
        (0..outputs.len() - 1)
            .map(|i| ((i, i + 1), (outputs[i].1 + outputs[i + 1].1) as u64 * act))
            .fold(((0, 1), 0), |best, x| if x.1 > best.1 { x } else { best })
    };
    Ok(ActivationMemory {
        input_elements,
        layer_outputs: outputs,
        peak_pair,
        bits: input_elements as u64 * u64::from(config.input_bits) + peak,
    })
}

/// Total memory (METHOD §9): the compressed file's bytes as bits plus the
/// activation memory.
pub fn total_memory_bits(file_bytes: u64, activations: &ActivationMemory) -> u64 {
    8 * file_bytes + activations.bits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(arch: &str, act_bits: u8) -> ActivationMemory {
        activation_memory(
            arch.parse().unwrap(),
            &ActivationMemoryConfig {
                act_bits,
                input_bits: 8,
            },
        )
        .unwrap()
    }

    #[test]
    fn lenet_5_by_hand() {
        // 1×28×28 → conv1 20×24×24, pooled 20×12×12 = 2880 → conv2 50×8×8,
        // pooled 50×4×4 = 800 → fc1 500 → fc2 10.
        let m = mem("lenet-5", 2);
        let outs: Vec<usize> = m.layer_outputs.iter().map(|o| o.1).collect();
        assert_eq!(outs, vec![2880, 800, 500, 10]);
        assert_eq!(m.peak_pair, (0, 1));
        assert_eq!(m.bits, 784 * 8 + (2880 + 800) * 2);
        assert_eq!(total_memory_bits(100, &m), 800 + m.bits);
    }

    #[test]
    fn mlps_and_widths() {
        // 784-300-100-10: the widest pair is 300 + 100.
        let m = mem("lenet-300-100", 4);
        assert_eq!(m.peak_pair, (0, 1));
        assert_eq!(m.bits, 784 * 8 + 400 * 4);
        // A batch-normed MLP counts the same elements.
        assert_eq!(mem("mlp-128x1-bn", 2).bits, 784 * 8 + (128 + 10) * 2);
        // Float activations.
        assert_eq!(mem("mlp-1024x4", 32).bits, 784 * 8 + 2048 * 32);
        for bad in [0u8, 33] {
            assert!(activation_memory(
                Arch::Lenet5,
                &ActivationMemoryConfig {
                    act_bits: bad,
                    input_bits: 8
                }
            )
            .is_err());
        }
    }

    #[test]
    fn cifar_networks_follow_their_padding_and_strides() {
        // AlexNet (METHOD §7's CIFAR variant): 32 → conv1 (k11 s4 p5) 8,
        // pooled 4 → conv2 4, pooled 2 → conv3..5 2, pooled 1 → fc.
        let m = mem("alexnet", 8);
        let outs: Vec<usize> = m.layer_outputs.iter().map(|o| o.1).collect();
        assert_eq!(outs, vec![64 * 16, 192 * 4, 384 * 4, 256 * 4, 256, 10]);
        // The widest consecutive pair is conv3 and conv4: 1536 + 1024.
        assert_eq!(m.peak_pair, (2, 3));
        assert_eq!(m.bits, 3 * 32 * 32 * 8 + (1536 + 1024) * 8);
    }
}
