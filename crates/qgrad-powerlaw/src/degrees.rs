//! Degrees of the units of a weight layer of a compressed file.

use qgrad_csr::{CompressedModel, CompressedTensor};
use serde::Serialize;

use crate::{PowerLawError, Result};

/// The in- and out-degrees of one weight layer's units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerDegrees {
    /// The weight tensor.
    pub name: String,
    /// Its shape: `[out, in]` or `[out, in, kh, kw]`.
    pub shape: Vec<usize>,
    /// Per output unit (row, or output channel): its non-zero incoming
    /// weights (kernel taps for a convolution).
    pub in_degree: Vec<u32>,
    /// Per input unit (column, or input channel): its non-zero outgoing
    /// weights (kernel taps).
    pub out_degree: Vec<u32>,
}

impl LayerDegrees {
    /// The degrees of `t`, a linear (`[out, in]`) or convolution
    /// (`[out, in, kh, kw]`) weight.
    pub fn of(t: &CompressedTensor) -> Result<Self> {
        Self::of_split(t, None)
    }

    /// The degrees of a split weight (FORMAT.md, `high_weights`): an element
    /// is a connection when it is non-zero in `t` or in its high-width part
    /// `high` (of the same shape).
    pub fn of_split(t: &CompressedTensor, high: Option<&CompressedTensor>) -> Result<Self> {
        let (outs, ins, taps) = match *t.shape.as_slice() {
            [o, i] => (o, i, 1),
            [o, i, kh, kw] => (o, i, kh * kw),
            _ => return Err(PowerLawError::NotAWeight(t.name.clone())),
        };
        let mut in_degree = vec![0u32; outs];
        let mut out_degree = vec![0u32; ins];
        let mut widths = t.widths();
        if let Some(high) = high.filter(|h| h.shape == t.shape) {
            for (w, h) in widths.iter_mut().zip(high.widths()) {
                *w = (*w).max(h);
            }
        }
        for (e, &w) in widths.iter().enumerate() {
            if w != 0 {
                let row = e / (ins * taps);
                let input = (e % (ins * taps)) / taps;
                in_degree[row] += 1;
                out_degree[input] += 1;
            }
        }
        Ok(LayerDegrees {
            name: t.name.clone(),
            shape: t.shape.clone(),
            in_degree,
            out_degree,
        })
    }
}

impl LayerDegrees {
    /// The control of METHOD §14: the degrees of a uniformly random mask of
    /// this layer's shape with the same number of non-zeros (seeded), whose
    /// degrees are hypergeometric, not heavy-tailed.
    pub fn random_control(&self, seed: u64) -> LayerDegrees {
        use rand::seq::index::sample;
        use rand::SeedableRng;
        let outs = self.in_degree.len();
        let ins = self.out_degree.len();
        let taps = self.shape.iter().skip(2).product::<usize>().max(1);
        let elements = outs * ins * taps;
        let nnz = self.in_degree.iter().map(|&d| d as usize).sum::<usize>();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut in_degree = vec![0u32; outs];
        let mut out_degree = vec![0u32; ins];
        for e in sample(&mut rng, elements, nnz.min(elements)) {
            in_degree[e / (ins * taps)] += 1;
            out_degree[(e % (ins * taps)) / taps] += 1;
        }
        LayerDegrees {
            name: self.name.clone(),
            shape: self.shape.clone(),
            in_degree,
            out_degree,
        }
    }
}

/// The degrees of every weight layer (`*.weight` of rank 2 or 4, not batch
/// norm) of `model`, in file order.
pub fn layer_degrees(model: &CompressedModel) -> Vec<LayerDegrees> {
    model
        .tensors
        .iter()
        .filter(|t| t.name.ends_with(".weight") && !t.name.ends_with(".bn.weight"))
        .filter_map(|t| LayerDegrees::of_split(t, model.high_part(&t.name)).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgrad_csr::{EncodeOptions, TensorData};

    fn model(name: &str, shape: &[usize], values: &[f32]) -> CompressedModel {
        let widths: Vec<u8> = values
            .iter()
            .map(|&v| if v == 0.0 { 0 } else { 8 })
            .collect();
        let t = TensorData {
            name,
            shape,
            values,
            widths: &widths,
            exponent: Some(0),
        };
        let bytes = qgrad_csr::encode(&[t], &EncodeOptions::default()).unwrap();
        CompressedModel::from_bytes(&bytes).unwrap()
    }

    #[test]
    fn degrees_of_a_hand_made_sparse_layer() {
        // 3 outputs x 4 inputs:
        // [1 0 0 1]
        // [0 0 0 1]
        // [1 1 0 1]
        let m = model(
            "fc.weight",
            &[3, 4],
            &[0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.5],
        );
        let d = layer_degrees(&m);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].in_degree, vec![2, 1, 3]);
        assert_eq!(d[0].out_degree, vec![2, 1, 0, 3]);
        // The random control keeps the shape and the number of non-zeros.
        let r = d[0].random_control(1);
        assert_eq!(r.in_degree.iter().sum::<u32>(), 6);
        assert_eq!(r.out_degree.iter().sum::<u32>(), 6);
        assert!(r.in_degree.iter().all(|&k| k <= 4) && r.out_degree.iter().all(|&k| k <= 3));
        assert_eq!(r, d[0].random_control(1));
    }

    #[test]
    fn a_convolution_counts_kernel_taps_per_channel() {
        // 2 output channels, 2 input channels, 2x1 kernels.
        // out 0: in 0 taps [1, 1], in 1 taps [0, 1]; out 1: in 0 [0, 0], in 1 [1, 0]
        let m = model(
            "conv.weight",
            &[2, 2, 2, 1],
            &[0.5, 0.5, 0.0, 0.5, 0.0, 0.0, 0.5, 0.0],
        );
        let d = layer_degrees(&m);
        assert_eq!(d[0].in_degree, vec![3, 1]);
        assert_eq!(d[0].out_degree, vec![2, 2]);
        let bias = model("fc.bias", &[3], &[0.5, 0.5, 0.5]);
        assert!(layer_degrees(&bias).is_empty());
        assert!(LayerDegrees::of(&bias.tensors[0]).is_err());
    }

    #[test]
    fn a_split_weight_counts_both_parts() {
        // fc.weight [1 0 0 1 / 0 0 0 0] and its high part [0 1 0 0 / 0 0 1 0].
        let widths =
            |v: &[f32]| -> Vec<u8> { v.iter().map(|&x| if x == 0.0 { 0 } else { 8 }).collect() };
        let low = [0.5f32, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0];
        let high = [0.0f32, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0];
        let (wl, wh) = (widths(&low), widths(&high));
        let tensors = [
            TensorData {
                name: "fc.weight",
                shape: &[2, 4],
                values: &low,
                widths: &wl,
                exponent: Some(0),
            },
            TensorData {
                name: "fc.weight_high",
                shape: &[2, 4],
                values: &high,
                widths: &wh,
                exponent: Some(0),
            },
        ];
        let bytes = qgrad_csr::encode(&tensors, &EncodeOptions::default()).unwrap();
        let m = CompressedModel::from_bytes(&bytes).unwrap();
        let d = layer_degrees(&m);
        assert_eq!(d.len(), 1, "the high part is not a layer of its own");
        assert_eq!(d[0].in_degree, vec![3, 1]);
        assert_eq!(d[0].out_degree, vec![1, 1, 1, 1]);
    }
}
