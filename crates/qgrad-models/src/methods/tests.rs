//! Tests of the three accumulated-gradient methods together.

use super::in_training::*;
use super::*;
use crate::NamedTensor;
use qgrad_cluster::ClusterMethod;
use qgrad_fixed::{fake_quantize, tensor_exponent, FLOAT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tensor(name: &str, shape: &[usize], values: Vec<f32>) -> NamedTensor {
    NamedTensor {
        name: name.to_string(),
        shape: shape.to_vec(),
        values,
    }
}

/// Two layers of random weights and importances.
fn model(seed: u64) -> (Vec<NamedTensor>, Vec<NamedTensor>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shapes: [(&str, Vec<usize>); 4] = [
        ("fc1.weight", vec![20, 30]),
        ("fc1.bias", vec![20]),
        ("fc2.weight", vec![10, 20]),
        ("fc2.bias", vec![10]),
    ];
    let mut params = Vec::new();
    let mut accum = Vec::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let values = (0..n).map(|_| rng.random_range(-0.6f32..0.6)).collect();
        let scores = (0..n)
            .map(|_| rng.random_range(0f32..1.0).powi(4))
            .collect();
        params.push(tensor(name, &shape, values));
        accum.push(tensor(name, &shape, scores));
    }
    (params, accum)
}

#[test]
fn post_training_gives_wider_formats_to_more_important_elements() {
    let (params, accum) = model(1);
    let opts = PostTrainingOptions::default();
    let (q, summary) = post_training(&params, &accum, &opts, None).unwrap();
    assert_eq!(summary.parameters, 600 + 20 + 200 + 10);
    // Widths are monotone in A over the whole parameter set.
    let mut pairs: Vec<(f32, u8)> = Vec::new();
    for (t, a) in q.iter().zip(&accum) {
        pairs.extend(a.values.iter().copied().zip(t.widths.iter().copied()));
    }
    pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
    assert!(pairs.windows(2).all(|w| w[0].1 <= w[1].1));
    assert!(summary.width_histogram.len() >= 3, "{summary:?}");
    // Values are exactly the per-tensor fake quantization of the input.
    for (t, p) in q.iter().zip(&params) {
        let e = tensor_exponent(&p.values).unwrap();
        assert_eq!(t.exponent, e);
        assert_eq!(t.values, fake_quantize(&p.values, &t.widths, e).unwrap());
        assert!(t.widths.iter().all(|w| opts.widths.contains(w)));
    }
}

#[test]
fn per_layer_scope_clusters_each_layer_separately() {
    let (params, mut accum) = model(2);
    // Make fc2 a thousand times less important: globally it would be all
    // at the lowest widths, per layer it still gets the widest one.
    for a in accum.iter_mut().filter(|a| a.name.starts_with("fc2")) {
        a.values.iter_mut().for_each(|v| *v *= 1e-3);
    }
    let mut opts = PostTrainingOptions {
        widths: vec![8, 4, 0],
        method: ClusterMethod::Quantiles {
            fractions: vec![0.2, 0.3, 0.5],
        },
        scope: Scope::Global,
    };
    let (global, _) = post_training(&params, &accum, &opts, None).unwrap();
    assert!(!global[2].widths.contains(&8));
    opts.scope = Scope::PerLayer;
    let (per_layer, _) = post_training(&params, &accum, &opts, None).unwrap();
    let eights = per_layer[2]
        .widths
        .iter()
        .chain(&per_layer[3].widths)
        .filter(|&&w| w == 8)
        .count();
    assert_eq!(eights, 42, "20 % of fc2's 210 elements");
}

#[test]
fn bad_options_and_inputs_are_errors() {
    let (params, accum) = model(3);
    let bad_widths = [vec![], vec![4, 8], vec![8, 1], vec![17, 4], vec![8, 8]];
    for widths in bad_widths {
        let opts = PostTrainingOptions {
            widths,
            ..Default::default()
        };
        assert!(post_training(&params, &accum, &opts, None).is_err());
    }
    let mut nan = params.clone();
    nan[0].values[3] = f32::NAN;
    assert!(post_training(&nan, &accum, &PostTrainingOptions::default(), None).is_err());
    assert!(post_training(&params, &accum[..2], &PostTrainingOptions::default(), None).is_err());
    for s in ["0.5", "1", "0.3", "0.7,1.2", "x", ""] {
        assert!(s.parse::<FractionSchedule>().is_err(), "{s}");
    }
    assert_eq!(
        "0.6,0.8".parse::<FractionSchedule>().unwrap(),
        FractionSchedule::PerSplit(vec![0.6, 0.8])
    );
    assert!("per-layer".parse::<Scope>().is_ok() && "layers?".parse::<Scope>().is_err());
    let opts = InTrainingOptions {
        low_bits: 1,
        ..Default::default()
    };
    assert!(InTrainingQuantizer::new(opts, &[("a".into(), vec![2])]).is_err());
}

#[test]
fn splits_can_be_spaced_out_and_ranked_per_layer() {
    let (mut params, mut accum) = model(6);
    // fc2 is far more important than fc1: ranked globally it would never
    // be split before fc1 is exhausted.
    for a in &mut accum[2..] {
        a.values.iter_mut().for_each(|v| *v = *v * 100.0 + 1.0);
    }
    let opts = InTrainingOptions {
        fraction: FractionSchedule::Constant(0.6),
        low_bits: 4,
        start_epoch: 1,
        split_every: 3,
        scope: Scope::PerLayer,
    };
    let mut q = InTrainingQuantizer::new(opts, &shapes(&params)).unwrap();
    let due: Vec<usize> = (0..9).filter(|&e| q.split_due(e)).collect();
    assert_eq!(due, vec![1, 4, 7]);
    let outcome = q.split(&mut params, &accum).unwrap();
    let layer_frozen = |q: &InTrainingQuantizer, range: std::ops::Range<usize>| -> usize {
        q.state().frozen[range]
            .iter()
            .map(|f| f.iter().filter(|&&z| z).count())
            .sum()
    };
    // Each layer (weight and bias together) freezes its own 60 %.
    assert_eq!(layer_frozen(&q, 0..2), 372, "0.6 of fc1's 620 elements");
    assert_eq!(layer_frozen(&q, 2..4), 126, "0.6 of fc2's 210 elements");
    assert_eq!(outcome.newly_frozen, 372 + 126);
    assert_eq!(outcome.float_remaining, 830 - 372 - 126);
    // Within a layer the frozen elements are the least important ones.
    for range in [0..2, 2..4] {
        assert_frozen_are_least_important(&q, &accum, range);
    }
    let zero_gap = InTrainingOptions {
        split_every: 0,
        ..Default::default()
    };
    assert!(InTrainingQuantizer::new(zero_gap, &shapes(&params)).is_err());
}

/// Over the tensors in `range`, no frozen element has a larger `A` than
/// a float one.
fn assert_frozen_are_least_important(
    q: &InTrainingQuantizer,
    accum: &[NamedTensor],
    range: std::ops::Range<usize>,
) {
    let mut max_frozen = f32::MIN;
    let mut min_float = f32::MAX;
    for t in range {
        for (&a, &frozen) in accum[t].values.iter().zip(&q.state().frozen[t]) {
            if frozen {
                max_frozen = max_frozen.max(a);
            } else {
                min_float = min_float.min(a);
            }
        }
    }
    assert!(max_frozen <= min_float, "{max_frozen} > {min_float}");
}

fn shapes(params: &[NamedTensor]) -> Vec<(String, Vec<usize>)> {
    params
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect()
}

/// Stands in for training between splits: moves only float elements.
fn train_a_bit(q: &InTrainingQuantizer, params: &mut [NamedTensor], rng: &mut ChaCha8Rng) {
    for (t, p) in params.iter_mut().enumerate() {
        for (i, v) in p.values.iter_mut().enumerate() {
            if !q.state().frozen[t][i] {
                *v += rng.random_range(-0.05f32..0.05);
            }
        }
    }
}

#[test]
fn in_training_freezes_the_least_important_fraction_of_the_float_elements() {
    let (mut params, accum) = model(4);
    let total = 830;
    let opts = InTrainingOptions {
        fraction: FractionSchedule::PerSplit(vec![0.6, 0.75]),
        low_bits: 4,
        start_epoch: 1,
        ..Default::default()
    };
    let mut q = InTrainingQuantizer::new(opts, &shapes(&params)).unwrap();
    assert!(!q.split_due(0) && q.split_due(1));
    let before = params.clone();
    let first = q.split(&mut params, &accum).unwrap();
    assert_eq!(first.newly_frozen, (0.6f64 * total as f64).round() as usize);
    assert_eq!(first.float_remaining, total - first.newly_frozen);
    // The frozen set is exactly the lowest-A elements.
    assert_frozen_are_least_important(&q, &accum, 0..accum.len());
    // Frozen values are quantized with the exponent of their tensor.
    let exponents: Vec<i32> = q.state().exponents.iter().map(|e| e.unwrap()).collect();
    for (t, p) in params.iter().enumerate() {
        assert_eq!(exponents[t], tensor_exponent(&before[t].values).unwrap());
        for (i, &v) in p.values.iter().enumerate() {
            if q.state().frozen[t][i] {
                let expect = fake_quantize(&[before[t].values[i]], &[4], exponents[t]).unwrap()[0];
                assert_eq!(v, expect);
            } else {
                assert_eq!(v, before[t].values[i]);
            }
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    train_a_bit(&q, &mut params, &mut rng);
    let second = q.split(&mut params, &accum).unwrap();
    assert_eq!(
        second.newly_frozen,
        (0.75 * first.float_remaining as f64).round() as usize
    );
    assert_eq!(second.frozen, first.newly_frozen + second.newly_frozen);
    assert!(!q.split_due(5), "the list schedule has two splits");
    // Exponents stay fixed even though values moved.
    assert_eq!(
        q.state()
            .exponents
            .iter()
            .map(|e| e.unwrap())
            .collect::<Vec<_>>(),
        exponents
    );
    let masks = q.masks();
    let result = q.finish(&params).unwrap();
    for ((r, m), f) in result.iter().zip(&masks).zip(&q.state().frozen) {
        for ((&w, &mask), &frozen) in r.widths.iter().zip(m).zip(f) {
            assert_eq!(w, if frozen { 4 } else { FLOAT });
            assert_eq!(mask, if frozen { 0.0 } else { 1.0 });
        }
    }
    // A frozen element that moved is detected.
    let (t, i) = (0, q.state().frozen[0].iter().position(|&f| f).unwrap());
    params[t].values[i] += 0.01;
    assert!(q.finish(&params).is_err());
}

#[test]
fn combined_leaves_the_in_training_group_untouched() {
    let (mut params, accum) = model(5);
    let opts = InTrainingOptions {
        fraction: FractionSchedule::Constant(0.7),
        low_bits: 2,
        start_epoch: 0,
        ..Default::default()
    };
    let mut q = InTrainingQuantizer::new(opts, &shapes(&params)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    q.split(&mut params, &accum).unwrap();
    // The remainder grows past the tensor's range: it must saturate, not
    // change the exponent under the frozen values.
    train_a_bit(&q, &mut params, &mut rng);
    for (t, p) in params.iter_mut().enumerate() {
        if let Some(i) = q.state().frozen[t].iter().position(|&f| !f) {
            p.values[i] = 3.0;
        }
    }
    let in_training = q.finish(&params).unwrap();
    let post = PostTrainingOptions {
        widths: vec![8, 4, 0],
        method: ClusterMethod::LogKMeans,
        scope: Scope::Global,
    };
    let (result, summary) = combined(&in_training, &accum, &post).unwrap();
    assert!(summary.saturated >= 1, "{summary:?}");
    for (r, it) in result.iter().zip(&in_training) {
        assert_eq!(r.exponent, it.exponent);
        for i in 0..r.values.len() {
            if it.widths[i] != FLOAT {
                assert_eq!(r.widths[i], it.widths[i]);
                assert_eq!(r.values[i].to_bits(), it.values[i].to_bits());
            } else {
                assert!(post.widths.contains(&r.widths[i]));
            }
        }
        assert!(!r.widths.contains(&FLOAT), "the remainder is quantized");
        // Re-quantizing the result with its own widths and exponent is exact.
        assert_eq!(
            fake_quantize(&r.values, &r.widths, r.exponent).unwrap(),
            r.values
        );
    }
}
