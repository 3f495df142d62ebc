//! The four networks of METHOD.md §7, written as data.
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
        name: String,
        inputs: usize,
        outputs: usize,
    },
    /// 2-D convolution, weight `[out, in, k, k]`, bias `[out]`, square kernel,
    /// equal stride and zero padding on both axes.
    Conv2d {
        name: String,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    /// Batch normalisation over the channels of the preceding convolution (or
    /// the features of the preceding linear layer). Parameters
    /// `<name>.bn.weight`/`<name>.bn.bias`, buffers `<name>.bn.running_mean` /
    /// `<name>.bn.running_var`.
    BatchNorm {
        name: String,
        channels: usize,
    },
    /// Non-overlapping max pooling, kernel == stride (the only max-pool candle
    /// can differentiate).
    MaxPool2d {
        size: usize,
    },
    Relu,
    /// Dropout with probability `p_percent / 100` in training, identity in
    /// evaluation. (An integer so that the spec stays `Eq`.)
    Dropout {
        p_percent: u8,
    },
    /// `[n, c, h, w]` → `[n, c·h·w]`.
    Flatten,
}

/// A named network of METHOD.md §7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    Lenet300100,
    Lenet5,
    AlexNet,
    Vgg16,
}

/// The dataset a network is trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    Mnist,
    Cifar10,
}

impl Arch {
    pub const ALL: [Arch; 4] = [Arch::Lenet300100, Arch::Lenet5, Arch::AlexNet, Arch::Vgg16];

    /// The command-line and file-header name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Lenet300100 => "lenet-300-100",
            Arch::Lenet5 => "lenet-5",
            Arch::AlexNet => "alexnet",
            Arch::Vgg16 => "vgg-16",
        }
    }

    pub fn dataset(self) -> DatasetKind {
        match self {
            Arch::Lenet300100 | Arch::Lenet5 => DatasetKind::Mnist,
            Arch::AlexNet | Arch::Vgg16 => DatasetKind::Cifar10,
        }
    }

    /// Input shape of one example, `[c, h, w]`.
    pub fn input_shape(self) -> [usize; 3] {
        match self.dataset() {
            DatasetKind::Mnist => [1, 28, 28],
            DatasetKind::Cifar10 => [3, 32, 32],
        }
    }

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
                let mut layers = Vec::new();
                let mut channels = 3;
                let mut index = 0;
                for &width in &CFG {
                    if width == 0 {
                        layers.push(MaxPool2d { size: 2 });
                        continue;
                    }
                    index += 1;
                    let name = format!("conv{index}");
                    layers.push(conv(&name, channels, width, 3, 1, 1));
                    layers.push(BatchNorm {
                        name,
                        channels: width,
                    });
                    layers.push(Relu);
                    channels = width;
                }
                layers.push(Flatten);
                layers.push(linear("fc1", 512, 512));
                layers.push(Relu);
                layers.push(Dropout { p_percent: 50 });
                layers.push(linear("fc2", 512, 10));
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
        f.write_str(self.name())
    }
}

/// Error for an unknown architecture name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownArch(pub String);

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
            _ => Err(UnknownArch(s.to_string())),
        }
    }
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
        for arch in Arch::ALL {
            assert_eq!(arch.name().parse::<Arch>().unwrap(), arch);
        }
        assert!("resnet".parse::<Arch>().is_err());
    }
}
