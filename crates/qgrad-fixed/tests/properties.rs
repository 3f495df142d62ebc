//! Property and example tests of the fixed-point formats and the bit packing.

use proptest::prelude::*;
use qgrad_fixed::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn fixed_bits() -> impl Strategy<Value = u8> {
    MIN_FIXED_BITS..=MAX_FIXED_BITS
}

fn any_width() -> impl Strategy<Value = u8> {
    prop_oneof![Just(PRUNED), Just(FLOAT), fixed_bits()]
}

/// Finite f32 values over many magnitudes, including zero and exact powers of two.
fn finite_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(0.0f32),
        -4.0f32..4.0,
        (-40i32..40, any::<bool>()).prop_map(|(e, neg)| {
            let v = 2f32.powi(e);
            if neg {
                -v
            } else {
                v
            }
        }),
        any::<f32>().prop_filter("finite", |v| v.is_finite()),
    ]
}

// ---------------------------------------------------------------- examples

#[test]
fn width_validity() {
    let valid: Vec<u8> = (0..=255u8).filter(|&b| is_valid_width(b)).collect();
    let mut expected = vec![0u8];
    expected.extend(2..=16);
    expected.push(32);
    assert_eq!(valid, expected);
    assert_eq!(FixedFormat::new(1, 0), Err(FixedError::InvalidWidth(1)));
    assert_eq!(FixedFormat::new(17, 0), Err(FixedError::InvalidWidth(17)));
    assert_eq!(FixedFormat::new(32, 0), Err(FixedError::InvalidWidth(32)));
    assert!(FixedFormat::new(2, MAX_EXPONENT).is_ok());
    assert!(FixedFormat::new(16, MIN_EXPONENT).is_ok());
    assert!(matches!(
        FixedFormat::new(8, MAX_EXPONENT + 1),
        Err(FixedError::ExponentOutOfRange { .. })
    ));
    assert!(matches!(
        FixedFormat::new(8, MIN_EXPONENT - 1),
        Err(FixedError::ExponentOutOfRange { .. })
    ));
}

/// Large tensors take the parallel maximum: the same exponent wherever the
/// largest magnitude is, and the first non-finite value's index.
#[test]
fn tensor_exponent_of_large_tensors() {
    let n = 1 << 20;
    for at in [0, 70_000, n / 2 + 3, n - 1] {
        let mut v: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 64.0).collect();
        v[at] = -3.5;
        assert_eq!(tensor_exponent(&v).unwrap(), 2, "largest at {at}");
        v[at + 1 - usize::from(at == n - 1) * 2] = f32::INFINITY;
        v[at] = f32::NAN;
        let first = at.min(at + 1 - usize::from(at == n - 1) * 2);
        assert!(matches!(
            tensor_exponent(&v),
            Err(FixedError::NonFinite { index, .. }) if index == first
        ));
    }
}

#[test]
fn tensor_exponent_examples() {
    assert_eq!(tensor_exponent(&[]).unwrap(), 0);
    assert_eq!(tensor_exponent(&[0.0, -0.0]).unwrap(), 0);
    assert_eq!(tensor_exponent(&[0.5, -0.25]).unwrap(), -1);
    assert_eq!(tensor_exponent(&[0.3]).unwrap(), -1);
    assert_eq!(tensor_exponent(&[0.5000001]).unwrap(), 0);
    assert_eq!(tensor_exponent(&[-1.0]).unwrap(), 0);
    assert_eq!(tensor_exponent(&[1.0000001]).unwrap(), 1);
    assert_eq!(tensor_exponent(&[3.0, 0.1]).unwrap(), 2);
    assert_eq!(tensor_exponent(&[f32::MAX]).unwrap(), 128);
    assert_eq!(tensor_exponent(&[f32::MIN_POSITIVE]).unwrap(), -126);
    assert_eq!(tensor_exponent(&[1e-42]).unwrap(), MIN_EXPONENT);
    assert!(matches!(
        tensor_exponent(&[1.0, f32::NAN]),
        Err(FixedError::NonFinite { index: 1, value }) if value.is_nan()
    ));
    assert!(matches!(
        tensor_exponent(&[f32::NEG_INFINITY]),
        Err(FixedError::NonFinite { index: 0, .. })
    ));
}

#[test]
fn format_arithmetic() {
    let f = FixedFormat::new(8, 0).unwrap();
    assert_eq!(f.frac_bits(), 7);
    assert_eq!(f.step(), 1.0 / 128.0);
    assert_eq!((f.min_int(), f.max_int()), (-128, 127));
    let g = FixedFormat::new(4, 5).unwrap();
    assert_eq!(g.frac_bits(), -2);
    assert_eq!(g.step(), 4.0);
    assert_eq!(g.dequantize(-8), -32.0);
    assert_eq!((g.min_int(), g.max_int()), (-8, 7));
}

#[test]
fn rounding_ties_away_from_zero_and_saturation() {
    let f = FixedFormat::new(4, 0).unwrap(); // step 1/8, range [-1, 7/8]
    assert_eq!(f.quantize(1.0 / 16.0), 1);
    assert_eq!(f.quantize(-1.0 / 16.0), -1);
    assert_eq!(f.quantize(3.0 / 16.0), 2);
    assert_eq!(f.quantize(-3.0 / 16.0), -2);
    assert_eq!(f.quantize(0.0999), 1);
    assert_eq!(f.quantize(0.9), 7);
    assert_eq!(f.quantize(1.0), 7);
    assert_eq!(f.quantize(-1.0), -8);
    assert_eq!(f.quantize(-5.0), -8);
    assert_eq!(f.quantize(f32::INFINITY), 7);
    assert_eq!(f.quantize(f32::NEG_INFINITY), -8);
    assert_eq!(f.quantize(f32::NAN), 0);
    assert_eq!(f.quantize(1.0 / 17.0), 0);
}

#[test]
fn slice_functions_reject_bad_input() {
    assert_eq!(
        quantize_values(&[1.0], &[8, 8], 0),
        Err(FixedError::LengthMismatch {
            values: 1,
            widths: 2
        })
    );
    assert_eq!(
        fake_quantize(&[1.0, 2.0], &[8, 1], 1),
        Err(FixedError::InvalidWidth(1))
    );
    assert_eq!(
        quantize_values(&[1.0, 2.0], &[8, 32], 1),
        Err(FixedError::FloatHasNoInteger { index: 1 })
    );
    assert!(matches!(
        fake_quantize(&[1.0, f32::INFINITY], &[8, 0], 1),
        Err(FixedError::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        quantize_values(&[f32::NAN], &[0], 1),
        Err(FixedError::NonFinite { index: 0, .. })
    ));
    assert!(matches!(
        fake_quantize(&[1.0], &[8], 1000),
        Err(FixedError::ExponentOutOfRange { exponent: 1000 })
    ));
    assert_eq!(quantize_values(&[], &[], 0).unwrap(), Vec::<i32>::new());
}

#[test]
fn mixed_widths_example() {
    let values = [0.9f32, -0.3, 0.01, 0.7];
    let widths = [16u8, 2, 4, 0];
    let e = tensor_exponent(&values).unwrap();
    assert_eq!(e, 0);
    let q = quantize_values(&values, &widths, e).unwrap();
    // 16 bits: 0.9 * 2^15 = 29491.2 -> 29491; 2 bits: step 0.5, -0.3 -> -1 (-0.6
    // rounds to -1); 4 bits: step 1/8, 0.01 -> 0; width 0 -> 0.
    assert_eq!(q, vec![29491, -1, 0, 0]);
    let fq = fake_quantize(&values, &[16, 2, 4, 32], e).unwrap();
    assert_eq!(fq, vec![29491.0 / 32768.0, -0.5, 0.0, 0.7]);
}

#[test]
fn bits_needed_examples() {
    assert_eq!(bits_needed(0), 0);
    assert_eq!(bits_needed(1), 1);
    assert_eq!(bits_needed(2), 2);
    assert_eq!(bits_needed(3), 2);
    assert_eq!(bits_needed(4), 3);
    assert_eq!(bits_needed(255), 8);
    assert_eq!(bits_needed(256), 9);
    assert_eq!(bits_needed(u64::MAX), 64);
}

#[test]
fn bit_order_is_lsb_first() {
    let mut w = BitWriter::new();
    w.write_bits(0b101, 3);
    w.write_bits(0b110011, 6);
    w.write_bits(0, 0);
    w.write_signed(-1, 2);
    assert_eq!(w.bit_len(), 11);
    let bytes = w.finish();
    // bits 0..3 = 101, bits 3..9 = 110011, bits 9..11 = 11
    // byte 0: bit7..0 = 1 0 0 1 1 | 1 0 1 = 0b1001_1101; byte 1: 0b0000_0111
    assert_eq!(bytes, vec![0b1001_1101, 0b0000_0111]);
    let mut r = BitReader::new(&bytes);
    assert_eq!(r.read_bits(3).unwrap(), 0b101);
    assert_eq!(r.read_signed(6).unwrap(), 0b110011 - 64);
    assert_eq!(r.read_signed(2).unwrap(), -1);
    assert_eq!(r.bits_remaining(), 5);
    assert_eq!(r.read_bits(5).unwrap(), 0);
    assert!(matches!(
        r.read_bits(1),
        Err(FixedError::Truncated {
            needed_bits: 1,
            available_bits: 0
        })
    ));
}

#[test]
fn reader_errors_instead_of_panicking() {
    let bytes = [0xffu8; 3];
    let mut r = BitReader::new(&bytes);
    assert!(matches!(
        r.read_bits(65),
        Err(FixedError::FieldTooWide { .. })
    ));
    assert!(r.read_bits(25).is_err());
    assert_eq!(r.read_bits(24).unwrap(), 0xff_ffff);
    assert!(unpack_signed(&bytes, 33, 1).is_err());
    assert!(unpack_unsigned(&bytes, 8, 4).is_err());
    assert!(unpack_unsigned(&bytes, 8, usize::MAX).is_err());
    assert_eq!(unpack_unsigned(&bytes, 8, 3).unwrap(), vec![255; 3]);
    // A huge declared count with no bytes is rejected before allocating.
    assert!(unpack_signed(&[], 1, usize::MAX / 2).is_err());
    // Zero-width fields need no bytes at all.
    assert_eq!(unpack_unsigned(&[], 0, 5).unwrap(), vec![0; 5]);
}

#[test]
fn wide_fields_and_64_bit_values() {
    let mut w = BitWriter::new();
    w.write_bits(1, 1);
    w.write_bits(u64::MAX - 5, 64);
    w.write_signed(i64::MIN, 64);
    w.write_bits(7, 70); // zero-extended to 70 bits
    w.write_signed(-2, 66); // sign-extended to 66 bits
    assert_eq!(w.bit_len(), 1 + 64 + 64 + 70 + 66);
    let bytes = w.finish();
    let mut r = BitReader::new(&bytes);
    assert_eq!(r.read_bits(1).unwrap(), 1);
    assert_eq!(r.read_bits(64).unwrap(), u64::MAX - 5);
    assert_eq!(r.read_signed(64).unwrap(), i64::MIN);
    assert_eq!(r.read_bits(64).unwrap(), 7);
    assert_eq!(r.read_bits(6).unwrap(), 0);
    assert_eq!(r.read_signed(64).unwrap(), -2);
    assert_eq!(r.read_bits(2).unwrap(), 0b11);
}

#[test]
fn stochastic_rounding_is_seeded_and_unbiased() {
    let f = FixedFormat::new(8, 0).unwrap(); // step 1/128
    let x = 0.3f32; // 38.4 steps: 39 with p = 0.4, 38 with p = 0.6
    let draw = |seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..20_000)
            .map(|_| f.quantize_stochastic(x, &mut rng))
            .collect::<Vec<_>>()
    };
    let a = draw(7);
    assert_eq!(a, draw(7));
    assert_ne!(a, draw(8));
    assert!(a.iter().all(|&q| q == 38 || q == 39));
    let mean = a.iter().map(|&q| f64::from(q)).sum::<f64>() / a.len() as f64;
    let expected = f64::from(x) * 128.0;
    // Standard error of the mean: sqrt(0.4*0.6/20000) ~ 0.0035; allow 5 sigma.
    assert!(
        (mean - expected).abs() < 0.0175,
        "mean {mean} expected {expected}"
    );
    // A value on the grid is never moved, and saturation holds.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..100 {
        assert_eq!(f.quantize_stochastic(0.5, &mut rng), 64);
        assert_eq!(f.quantize_stochastic(5.0, &mut rng), 127);
        assert_eq!(f.quantize_stochastic(-5.0, &mut rng), -128);
    }
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fake_quantize_is_idempotent(
        pairs in prop::collection::vec((finite_f32(), any_width()), 0..64),
    ) {
        let (values, widths): (Vec<f32>, Vec<u8>) = pairs.into_iter().unzip();
        let e = tensor_exponent(&values).unwrap();
        prop_assume!(e <= MAX_EXPONENT);
        let once = fake_quantize(&values, &widths, e).unwrap();
        let twice = fake_quantize(&once, &widths, e).unwrap();
        prop_assert_eq!(&once, &twice);
        // And the integers agree with the fake-quantized values.
        let int_widths: Vec<u8> = widths.iter().map(|&w| if w == FLOAT { 16 } else { w }).collect();
        let q = quantize_values(&values, &int_widths, e).unwrap();
        for i in 0..values.len() {
            if widths[i] == PRUNED {
                prop_assert_eq!(q[i], 0);
                prop_assert_eq!(once[i], 0.0);
            } else if widths[i] != FLOAT {
                let f = FixedFormat::new(widths[i], e).unwrap();
                prop_assert_eq!(f.dequantize(q[i]), once[i]);
            } else {
                prop_assert_eq!(once[i].to_bits(), values[i].to_bits());
            }
        }
    }

    #[test]
    fn quantize_values_equals_each_format_with_saturation(
        pairs in prop::collection::vec((finite_f32(), any_width()), 0..64),
        e in MIN_EXPONENT..=MAX_EXPONENT,
    ) {
        // Any exponent, so that large values saturate at every width.
        let (values, widths): (Vec<f32>, Vec<u8>) = pairs.into_iter().unzip();
        let widths: Vec<u8> = widths.iter().map(|&w| if w == FLOAT { 16 } else { w }).collect();
        let q = quantize_values(&values, &widths, e).unwrap();
        for i in 0..values.len() {
            let expected = match widths[i] {
                PRUNED => 0,
                w => FixedFormat::new(w, e).unwrap().quantize(values[i]),
            };
            prop_assert_eq!(q[i], expected, "value {} width {}", values[i], widths[i]);
        }
    }

    #[test]
    fn quantize_matches_f64_round_reference(x in finite_f32(), bits in fixed_bits(), e in MIN_EXPONENT..=MAX_EXPONENT) {
        let f = FixedFormat::new(bits, e).unwrap();
        let reference = (f64::from(x) * 2f64.powi(f.frac_bits()))
            .round()
            .clamp(f64::from(f.min_int()), f64::from(f.max_int())) as i32;
        prop_assert_eq!(f.quantize(x), reference);
    }

    #[test]
    fn quantize_ties_and_near_ties(k in -40_000i32..40_000, bits in fixed_bits()) {
        // k/2 + tiny offsets around the tie, with step 1 (frac_bits 0).
        let f = FixedFormat::new(bits, i32::from(bits) - 1).unwrap();
        for x in [k as f32 * 0.5, f32::from_bits((k as f32 * 0.5).to_bits().wrapping_add(1)), f32::from_bits((k as f32 * 0.5).to_bits().wrapping_sub(1))] {
            let reference = f64::from(x).round().clamp(f64::from(f.min_int()), f64::from(f.max_int())) as i32;
            prop_assert_eq!(f.quantize(x), reference, "x = {}", x);
        }
    }

    #[test]
    fn in_range_error_is_at_most_half_a_step(x in finite_f32(), bits in fixed_bits(), e in -30i32..30) {
        let f = FixedFormat::new(bits, e).unwrap();
        let lo = f64::from(f.min_int()) * f.step();
        let hi = f64::from(f.max_int()) * f.step();
        let xd = f64::from(x);
        let err = (f64::from(f.dequantize(f.quantize(x))) - xd).abs();
        if (lo..=hi).contains(&xd) {
            prop_assert!(err <= f.step() / 2.0, "x {} err {} step {}", x, err, f.step());
        } else if xd > hi {
            prop_assert_eq!(f.quantize(x), f.max_int());
        } else {
            prop_assert_eq!(f.quantize(x), f.min_int());
        }
    }

    #[test]
    fn tensor_range_covers_values(values in prop::collection::vec(finite_f32(), 1..32)) {
        let e = tensor_exponent(&values).unwrap();
        let max = values.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
        prop_assert!(max <= 2f64.powi(e));
        if max > 0.0 && e > MIN_EXPONENT {
            prop_assert!(max > 2f64.powi(e - 1));
        }
        // Within the tensor's range only the top value (+2^e) can saturate;
        // every element's error is at most one step.
        prop_assume!(e <= MAX_EXPONENT);
        for bits in MIN_FIXED_BITS..=MAX_FIXED_BITS {
            let f = FixedFormat::new(bits, e).unwrap();
            for &x in &values {
                let err = (f64::from(f.dequantize(f.quantize(x))) - f64::from(x)).abs();
                prop_assert!(err <= f.step(), "bits {} x {} err {}", bits, x, err);
            }
        }
    }

    #[test]
    fn more_bits_never_increase_the_error(x in finite_f32(), b1 in fixed_bits(), b2 in fixed_bits(), e in -30i32..30) {
        let (lo, hi) = (b1.min(b2), b1.max(b2));
        let err = |bits| {
            let f = FixedFormat::new(bits, e).unwrap();
            (f64::from(f.dequantize(f.quantize(x))) - f64::from(x)).abs()
        };
        prop_assert!(err(hi) <= err(lo));
    }

    #[test]
    fn zero_stays_zero_and_small_values_round_to_zero(bits in fixed_bits(), e in -30i32..30, frac in -0.49999f64..0.49999) {
        let f = FixedFormat::new(bits, e).unwrap();
        prop_assert_eq!(f.quantize(0.0), 0);
        prop_assert_eq!(f.quantize(-0.0), 0);
        let small = (frac * f.step()) as f32;
        prop_assert_eq!(f.quantize(small), 0);
        prop_assert_eq!(f.dequantize(0), 0.0);
    }

    #[test]
    fn saturation_at_the_range_ends(bits in fixed_bits(), e in -30i32..30, over in 1.0f64..1e6) {
        let f = FixedFormat::new(bits, e).unwrap();
        let top = (f64::from(f.max_int()) * f.step() + over * f.step()) as f32;
        let bottom = (f64::from(f.min_int()) * f.step() - over * f.step()) as f32;
        prop_assert_eq!(f.quantize(top), f.max_int());
        prop_assert_eq!(f.quantize(bottom), f.min_int());
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        prop_assert_eq!(f.quantize_stochastic(top, &mut rng), f.max_int());
        prop_assert_eq!(f.quantize_stochastic(bottom, &mut rng), f.min_int());
    }

    #[test]
    fn dequantize_is_exact(bits in fixed_bits(), e in MIN_EXPONENT..=MAX_EXPONENT, frac in 0.0f64..1.0) {
        let f = FixedFormat::new(bits, e).unwrap();
        let span = f64::from(f.max_int()) - f64::from(f.min_int());
        let q = (f64::from(f.min_int()) + (frac * span).round()) as i32;
        let v = f.dequantize(q);
        prop_assert!(v.is_finite());
        prop_assert_eq!(f64::from(v), f64::from(q) * f.step());
        prop_assert_eq!(f.quantize(v), q);
    }

    #[test]
    fn stochastic_rounding_picks_a_neighbour(x in -1.0f32..1.0, bits in fixed_bits(), seed in any::<u64>()) {
        let f = FixedFormat::new(bits, 0).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let q = f.quantize_stochastic(x, &mut rng);
        let scaled = f64::from(x) / f.step();
        let floor = scaled.floor().max(f64::from(f.min_int()));
        let ceil = scaled.ceil().min(f64::from(f.max_int()));
        prop_assert!(f64::from(q) == floor || f64::from(q) == ceil);
    }

    #[test]
    fn signed_pack_round_trip(bits in 0u32..=32, raw in prop::collection::vec(any::<i32>(), 0..200)) {
        // Bring each value into the signed range of `bits`.
        let values: Vec<i32> = raw.iter().map(|&v| match bits {
            0 => 0,
            32 => v,
            _ => {
                let half = 1i64 << (bits - 1);
                (i64::from(v).rem_euclid(2 * half) - half) as i32
            }
        }).collect();
        let bytes = pack_signed(&values, bits);
        prop_assert_eq!(bytes.len(), (values.len() * bits as usize).div_ceil(8));
        prop_assert_eq!(unpack_signed(&bytes, bits, values.len()).unwrap(), values.clone());
        // The padding bits are zero, and one value more is an error unless it fits in the padding.
        let total = values.len() * bits as usize;
        if bits > 0 && bytes.len() * 8 - total < bits as usize {
            prop_assert!(unpack_signed(&bytes, bits, values.len() + 1).is_err());
        }
    }

    #[test]
    fn unsigned_pack_round_trip(bits in 0u32..=32, raw in prop::collection::vec(any::<u32>(), 0..200)) {
        let values: Vec<u32> = raw.iter().map(|&v| if bits == 32 { v } else { v & ((1u32 << bits) - 1) }).collect();
        let bytes = pack_unsigned(&values, bits);
        prop_assert_eq!(bytes.len(), (values.len() * bits as usize).div_ceil(8));
        prop_assert_eq!(unpack_unsigned(&bytes, bits, values.len()).unwrap(), values);
    }

    #[test]
    fn mixed_width_stream_round_trip(fields in prop::collection::vec((any::<u64>(), 0u32..=64, any::<bool>()), 0..100)) {
        let mut w = BitWriter::with_capacity_bits(16);
        for &(v, bits, signed) in &fields {
            if signed { w.write_signed(v as i64, bits) } else { w.write_bits(v, bits) }
        }
        let total: usize = fields.iter().map(|f| f.1 as usize).sum();
        prop_assert_eq!(w.bit_len(), total);
        let bytes = w.finish();
        prop_assert_eq!(bytes.len(), total.div_ceil(8));
        let mut r = BitReader::new(&bytes);
        for &(v, bits, signed) in &fields {
            let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
            if signed {
                let got = r.read_signed(bits).unwrap();
                prop_assert_eq!(got as u64 & mask, v & mask);
                if bits > 0 && bits < 64 {
                    let sign = (v >> (bits - 1)) & 1 == 1;
                    prop_assert_eq!(got < 0, sign);
                }
            } else {
                prop_assert_eq!(r.read_bits(bits).unwrap(), v & mask);
            }
        }
        prop_assert!(r.bits_remaining() < 8);
    }

    #[test]
    fn reading_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..40), reads in prop::collection::vec(0u32..=70, 0..40)) {
        let mut r = BitReader::new(&bytes);
        for bits in reads {
            let before = r.bits_remaining();
            match r.read_signed(bits) {
                Ok(_) => prop_assert_eq!(r.bits_remaining(), before - bits as usize),
                Err(_) => prop_assert_eq!(r.bits_remaining(), before),
            }
        }
    }
}
