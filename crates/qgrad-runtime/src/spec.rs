//! The networks qgrad trains, written as data: the four of METHOD.md §7, and
//! the families the later theses sweep (MLPs of any width and depth, with or
//! without batch norm, METHOD §9 and §15; the loss-aware papers' CIFAR-10 CNN
//! with a channel multiplier, §15).
//!
//! Every network qgrad trains is a straight sequence of layers. Writing that
//! sequence once, as a `Vec<LayerSpec>`, gives one source of truth that three
//! interpreters read: the candle training forward pass, the candle evaluation of
//! the quantized model, and the integer inference that runs straight from the
//! compressed file. They cannot drift apart because none of them hard-codes a
//! network.
//!
//! Parameter names are `<layer>.weight` and `<layer>.bias` (and, for batch norm,
//! `<layer>.bn.weight`, `<layer>.bn.bias`, with running statistics
//! `<layer>.bn.running_mean` / `<layer>.bn.running_var`, which are buffers, not
//! parameters). Weight layouts follow candle/PyTorch: linear `[out, in]`,
//! convolution `[out, in, kh, kw]`.

use std::fmt;
use std::str::FromStr;

/// One step of a sequential network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSpec {
    /// `y = x·Wᵀ + b`, weight `[out, in]`, bias `[out]`.
    Linear {
        /// Parameter prefix.
        name: String,
        /// Input features.
        inputs: usize,
        /// Output features.
        outputs: usize,
    },
    /// 2-D convolution, weight `[out, in, k, k]`, bias `[out]`, square kernel,
    /// equal stride and zero padding on both axes.
    Conv2d {
        /// Parameter prefix.
        name: String,
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel side.
        kernel: usize,
        /// Stride on both axes.
        stride: usize,
        /// Zero padding on every side.
        padding: usize,
    },
    /// Batch normalisation over the channels of the preceding convolution (or
    /// the features of the preceding linear layer). Parameters
    /// `<name>.bn.weight`/`<name>.bn.bias`, buffers `<name>.bn.running_mean` /
    /// `<name>.bn.running_var`.
    BatchNorm {
        /// The layer whose outputs are normalised (parameters `<name>.bn.*`).
        name: String,
        /// Channels (or features).
        channels: usize,
    },
    /// Non-overlapping max pooling, kernel == stride (the only max-pool candle
    /// can differentiate).
    MaxPool2d {
        /// Window side and stride.
        size: usize,
    },
    /// `max(x, 0)`.
    Relu,
    /// Dropout with probability `p_percent / 100` in training, identity in
    /// evaluation. (An integer so that the spec stays `Eq`.)
    Dropout {
        /// Drop probability in percent.
        p_percent: u8,
    },
    /// `[n, c, h, w]` → `[n, c·h·w]`.
    Flatten,
}

/// A named network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// LeNet-300-100 (METHOD §7), 784-300-100-10, ReLU.
    Lenet300100,
    /// Caffe's LeNet-5 (METHOD §7).
    Lenet5,
    /// AlexNet, CIFAR-10 variant (METHOD §7).
    AlexNet,
    /// VGG-16 with batch norm, CIFAR-10 variant (METHOD §7).
    Vgg16,
    /// An MNIST MLP 784-w^d-10 (METHOD §9's design space; with batch norm
    /// after every layer, the output layer included, it is §15's reference
    /// MLP at width 2048, depth 3). Name `mlp-<width>x<depth>`, `-bn` appended
    /// with batch norm.
    Mlp {
        /// Units of every hidden layer.
        width: u32,
        /// Hidden layers (1..=16).
        depth: u8,
        /// Batch norm after every linear layer.
        batch_norm: bool,
    },
    /// The loss-aware papers' CIFAR-10 CNN (METHOD §15) with `channels` as the
    /// first block's width: 2×cC3-MP2-2×2cC3-MP2-2×4cC3-MP2-8c-8c-10, batch
    /// norm after every layer but the last (c = 128 is the reference
    /// network). Name `cnn-<channels>`.
    CifarCnn {
        /// Channels of the first two convolutions.
        channels: u32,
    },
}

/// The dataset a network is trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    /// MNIST, 1×28×28, 10 classes.
    Mnist,
    /// CIFAR-10, 3×32×32, 10 classes.
    Cifar10,
}

impl Arch {
    /// The four networks of the first thesis (METHOD §7).
    pub const ALL: [Arch; 4] = [Arch::Lenet300100, Arch::Lenet5, Arch::AlexNet, Arch::Vgg16];

    /// The reference MLP of the loss-aware papers: 784-2048-2048-2048-10
    /// with batch norm after every layer (METHOD §15).
    pub const REFERENCE_MLP: Arch = Arch::Mlp {
        width: 2048,
        depth: 3,
        batch_norm: true,
    };

    /// The reference CIFAR-10 CNN of the loss-aware papers (METHOD §15).
    pub const REFERENCE_CNN: Arch = Arch::CifarCnn { channels: 128 };

    /// The command-line and file-header name.
    pub fn name(self) -> String {
        match self {
            Arch::Lenet300100 => "lenet-300-100".into(),
            Arch::Lenet5 => "lenet-5".into(),
            Arch::AlexNet => "alexnet".into(),
            Arch::Vgg16 => "vgg-16".into(),
            Arch::Mlp {
                width,
                depth,
                batch_norm,
            } => format!("mlp-{width}x{depth}{}", if batch_norm { "-bn" } else { "" }),
            Arch::CifarCnn { channels } => format!("cnn-{channels}"),
        }
    }

    /// The dataset the network is trained on.
    pub fn dataset(self) -> DatasetKind {
        match self {
            Arch::Lenet300100 | Arch::Lenet5 | Arch::Mlp { .. } => DatasetKind::Mnist,
            Arch::AlexNet | Arch::Vgg16 | Arch::CifarCnn { .. } => DatasetKind::Cifar10,
        }
    }

    /// Input shape of one example, `[c, h, w]`.
    pub fn input_shape(self) -> [usize; 3] {
        match self.dataset() {
            DatasetKind::Mnist => [1, 28, 28],
            DatasetKind::Cifar10 => [3, 32, 32],
        }
    }

    /// Output classes.
    pub fn num_classes(self) -> usize {
        10
    }

    /// The layer sequence (METHOD.md §7).
    pub fn layers(self) -> Vec<LayerSpec> {
        use LayerSpec::*;
        let linear = |name: &str, inputs, outputs| Linear {
            name: name.to_string(),
            inputs,
            outputs,
        };
        let conv = |name: &str, in_channels, out_channels, kernel, stride, padding| Conv2d {
            name: name.to_string(),
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
        };
        match self {
            Arch::Lenet300100 => vec![
                Flatten,
                linear("fc1", 784, 300),
                Relu,
                linear("fc2", 300, 100),
                Relu,
                linear("fc3", 100, 10),
            ],
            // Caffe's LeNet-5: no non-linearity after the convolutions.
            Arch::Lenet5 => vec![
                conv("conv1", 1, 20, 5, 1, 0),
                MaxPool2d { size: 2 },
                conv("conv2", 20, 50, 5, 1, 0),
                MaxPool2d { size: 2 },
                Flatten,
                linear("fc1", 800, 500),
                Relu,
                linear("fc2", 500, 10),
            ],
            // CIFAR-10 variant (decided in METHOD.md §7): 32 → 8 → 4 → 2 → 1.
            Arch::AlexNet => vec![
                conv("conv1", 3, 64, 11, 4, 5),
                Relu,
                MaxPool2d { size: 2 },
                conv("conv2", 64, 192, 5, 1, 2),
                Relu,
                MaxPool2d { size: 2 },
                conv("conv3", 192, 384, 3, 1, 1),
                Relu,
                conv("conv4", 384, 256, 3, 1, 1),
                Relu,
                conv("conv5", 256, 256, 3, 1, 1),
                Relu,
                MaxPool2d { size: 2 },
                Flatten,
                linear("fc", 256, 10),
            ],
            Arch::Vgg16 => {
                const CFG: [usize; 18] = [
                    64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
                ];
                let mut layers = conv_bn_relu_stack(&CFG);
                layers.push(Flatten);
                layers.push(linear("fc1", 512, 512));
                layers.push(Relu);
                layers.push(Dropout { p_percent: 50 });
                layers.push(linear("fc2", 512, 10));
                layers
            }
            Arch::Mlp {
                width,
                depth,
                batch_norm,
            } => {
                let width = width as usize;
                let mut layers = vec![Flatten];
                let mut inputs = 784;
                for i in 1..=depth as usize + 1 {
                    let name = format!("fc{i}");
                    let last = i == depth as usize + 1;
                    let outputs = if last { 10 } else { width };
                    layers.push(linear(&name, inputs, outputs));
                    if batch_norm {
                        layers.push(BatchNorm {
                            name,
                            channels: outputs,
                        });
                    }
                    if !last {
                        layers.push(Relu);
                    }
                    inputs = outputs;
                }
                layers
            }
            Arch::CifarCnn { channels } => {
                let c = channels as usize;
                let mut layers = conv_bn_relu_stack(&[c, c, 0, 2 * c, 2 * c, 0, 4 * c, 4 * c, 0]);
                layers.push(Flatten);
                let mut features = 4 * c * 4 * 4;
                for name in ["fc1", "fc2"] {
                    layers.push(linear(name, features, 8 * c));
                    layers.push(BatchNorm {
                        name: name.to_string(),
                        channels: 8 * c,
                    });
                    layers.push(Relu);
                    features = 8 * c;
                }
                layers.push(linear("fc3", features, 10));
                layers
            }
        }
    }

    /// `(name, shape)` of every trainable parameter, in layer order.
    pub fn parameter_shapes(self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for layer in self.layers() {
            match layer {
                LayerSpec::Linear {
                    name,
                    inputs,
                    outputs,
                } => {
                    out.push((format!("{name}.weight"), vec![outputs, inputs]));
                    out.push((format!("{name}.bias"), vec![outputs]));
                }
                LayerSpec::Conv2d {
                    name,
                    in_channels,
                    out_channels,
                    kernel,
                    ..
                } => {
                    out.push((
                        format!("{name}.weight"),
                        vec![out_channels, in_channels, kernel, kernel],
                    ));
                    out.push((format!("{name}.bias"), vec![out_channels]));
                }
                LayerSpec::BatchNorm { name, channels } => {
                    out.push((format!("{name}.bn.weight"), vec![channels]));
                    out.push((format!("{name}.bn.bias"), vec![channels]));
                }
                _ => {}
            }
        }
        out
    }

    /// `(name, shape)` of every non-trainable buffer (batch-norm running statistics).
    pub fn buffer_shapes(self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for layer in self.layers() {
            if let LayerSpec::BatchNorm { name, channels } = layer {
                out.push((format!("{name}.bn.running_mean"), vec![channels]));
                out.push((format!("{name}.bn.running_var"), vec![channels]));
            }
        }
        out
    }

    /// `(name, shape)` of every tensor a file of this network holds, when
    /// the batch-norm layers for which `folded(layer)` is true are stored
    /// folded for inference (`<layer>.bn.scale` and `<layer>.bn.shift`, see
    /// [`crate::fold_batch_norm`]) instead of as their parameters and running
    /// statistics.
    pub fn stored_tensor_shapes(self, folded: impl Fn(&str) -> bool) -> Vec<(String, Vec<usize>)> {
        let folded_layers: Vec<(String, usize)> = self
            .layers()
            .into_iter()
            .filter_map(|l| match l {
                LayerSpec::BatchNorm { name, channels } if folded(&name) => Some((name, channels)),
                _ => None,
            })
            .collect();
        let is_folded = |tensor: &str| {
            folded_layers.iter().any(|(layer, _)| {
                tensor
                    .strip_prefix(layer.as_str())
                    .is_some_and(|rest| rest.starts_with(".bn."))
            })
        };
        let mut out: Vec<(String, Vec<usize>)> = self
            .parameter_shapes()
            .into_iter()
            .chain(self.buffer_shapes())
            .filter(|(name, _)| !is_folded(name))
            .collect();
        for (layer, channels) in folded_layers {
            out.push((format!("{layer}.{}", crate::BN_SCALE), vec![channels]));
            out.push((format!("{layer}.{}", crate::BN_SHIFT), vec![channels]));
        }
        out
    }

    /// Number of trainable parameters.
    pub fn num_parameters(self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Error for an unknown architecture name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownArch(
    /// The name given.
    pub String,
);

impl fmt::Display for UnknownArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = Arch::ALL.iter().map(|a| a.name()).collect();
        write!(
            f,
            "unknown model '{}' (expected one of: {})",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownArch {}

impl FromStr for Arch {
    type Err = UnknownArch;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = s.to_ascii_lowercase().replace('_', "-");
        match key.as_str() {
            "lenet-300-100" | "lenet300100" | "lenet-300" | "mlp" => Ok(Arch::Lenet300100),
            "lenet-5" | "lenet5" => Ok(Arch::Lenet5),
            "alexnet" => Ok(Arch::AlexNet),
            "vgg-16" | "vgg16" => Ok(Arch::Vgg16),
            _ => parse_family(&key).ok_or_else(|| UnknownArch(s.to_string())),
        }
    }
}

/// 3×3 convolutions (padding 1) named `conv1`, `conv2`, … from 3 input
/// channels, each followed by batch norm and ReLU; a 0 in `widths` is a 2×2
/// max pool (VGG's configuration lists).
fn conv_bn_relu_stack(widths: &[usize]) -> Vec<LayerSpec> {
    let mut layers = Vec::new();
    let mut inputs = 3;
    let mut index = 0;
    for &width in widths {
        if width == 0 {
            layers.push(LayerSpec::MaxPool2d { size: 2 });
            continue;
        }
        index += 1;
        let name = format!("conv{index}");
        layers.push(LayerSpec::Conv2d {
            name: name.clone(),
            in_channels: inputs,
            out_channels: width,
            kernel: 3,
            stride: 1,
            padding: 1,
        });
        layers.push(LayerSpec::BatchNorm {
            name,
            channels: width,
        });
        layers.push(LayerSpec::Relu);
        inputs = width;
    }
    layers
}

/// `mlp-<w>x<d>[-bn]` or `cnn-<c>`, with sizes a machine can hold.
fn parse_family(key: &str) -> Option<Arch> {
    if let Some(rest) = key.strip_prefix("mlp-") {
        let (rest, batch_norm) = match rest.strip_suffix("-bn") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let (w, d) = rest.split_once('x')?;
        let width: u32 = w.parse().ok().filter(|w| (1..=65_536).contains(w))?;
        let depth: u8 = d.parse().ok().filter(|d| (1..=16).contains(d))?;
        return Some(Arch::Mlp {
            width,
            depth,
            batch_norm,
        });
    }
    let channels: u32 = key
        .strip_prefix("cnn-")?
        .parse()
        .ok()
        .filter(|c| (1..=1024).contains(c))?;
    Some(Arch::CifarCnn { channels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_method_section_7() {
        assert_eq!(Arch::Lenet300100.num_parameters(), 266_610);
        assert_eq!(Arch::Lenet5.num_parameters(), 431_080);
        let alexnet = Arch::AlexNet.num_parameters();
        assert_eq!(alexnet, 2_472_266, "about 2.47 M");
        let vgg = Arch::Vgg16.num_parameters();
        assert!(
            (14_900_000..15_100_000).contains(&vgg),
            "about 15 M, got {vgg}"
        );
    }

    #[test]
    fn names_round_trip() {
        let families = [
            Arch::REFERENCE_MLP,
            Arch::Mlp {
                width: 128,
                depth: 1,
                batch_norm: false,
            },
            Arch::REFERENCE_CNN,
            Arch::CifarCnn { channels: 16 },
        ];
        for arch in Arch::ALL.into_iter().chain(families) {
            assert_eq!(arch.name().parse::<Arch>().unwrap(), arch);
        }
        for bad in ["resnet", "mlp-0x2", "mlp-128x0", "mlp-128", "cnn-", "cnn-x"] {
            assert!(bad.parse::<Arch>().is_err(), "{bad}");
        }
    }

    #[test]
    fn family_shapes_chain() {
        // 784·2048 + 2·2048² + 2048·10 weights, biases, 2 per batch norm unit.
        let mlp = Arch::REFERENCE_MLP.num_parameters();
        let linear = 784 * 2048 + 2 * 2048 * 2048 + 2048 * 10 + 3 * 2048 + 10;
        assert_eq!(mlp, linear + 2 * (3 * 2048 + 10));
        assert_eq!(Arch::REFERENCE_MLP.buffer_shapes().len(), 8);
        // The reference CNN: about 14 M parameters (the papers' 14.0 M).
        let cnn = Arch::REFERENCE_CNN.num_parameters();
        assert!((13_900_000..14_100_000).contains(&cnn), "{cnn}");
        assert_eq!(Arch::REFERENCE_CNN.input_shape(), [3, 32, 32]);
    }
}
