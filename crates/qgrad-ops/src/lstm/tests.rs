//! The recurrence on any number of workers against one worker, reruns, and
//! errors that must not leave a team waiting.

use super::*;

fn values(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

fn modes(g4: usize) -> Vec<RecurrentNorm> {
    vec![
        RecurrentNorm::None,
        RecurrentNorm::Layer { eps: 1e-5 },
        RecurrentNorm::BatchTrain { eps: 1e-5 },
        RecurrentNorm::BatchEval {
            mean: values(7, 2 * g4, 0.3),
            var: values(8, 2 * g4, 1.0)
                .iter()
                .map(|v| v.abs() + 0.5)
                .collect(),
            eps: 1e-5,
        },
    ]
}

/// Every output of forward and backward on `workers` workers.
fn run(workers: usize, g: &LstmGeometry, norm: &RecurrentNorm, seed: u64) -> Vec<Vec<f32>> {
    let (t, b, h) = (g.steps, g.batch, g.hidden);
    let g4 = 4 * h;
    let xproj = values(seed, t * b * g4, 1.0);
    let wh = values(seed + 1, g4 * h, 0.6);
    let gain: Vec<f32> = values(seed + 2, g4, 0.5).iter().map(|v| v + 1.0).collect();
    let (h0, c0) = (values(seed + 3, b * h, 0.5), values(seed + 4, b * h, 0.5));
    let grad_h = values(seed + 5, t * b * h, 1.0);
    let gain = norm.has_gain().then_some(&gain[..]);
    let x = XSource::Rows(&xproj);
    let (hs, cache, stats) = forward(workers, g, norm, x, &wh, gain, &h0, &c0).unwrap();
    let (dx, dwh, dgain) = backward(
        workers, g, norm, &cache, &hs, &grad_h, &wh, gain, &h0, &c0, None,
    )
    .unwrap();
    vec![
        hs,
        cache.cells,
        cache.gates,
        cache.normalised,
        cache.inv_std,
        stats.mean,
        stats.var,
        dx,
        dwh,
        dgain,
    ]
}

/// Within rounding, not bit for bit: a worker's GEMMs have fewer columns,
/// and gemm sums a one-column product (one unit per worker) in another
/// order than a wide one.
#[test]
fn any_number_of_workers_gives_the_one_worker_numbers() {
    // Uneven unit shares (7 units on 3 or 4 workers), a unit per worker,
    // one row, more workers than units (clamped).
    for &(t, b, h) in &[(3, 4, 7), (2, 3, 2), (4, 1, 5), (2, 5, 3)] {
        let g = LstmGeometry {
            steps: t,
            batch: b,
            hidden: h,
        };
        for norm in modes(4 * h) {
            if matches!(norm, RecurrentNorm::BatchTrain { .. }) && b == 1 {
                continue;
            }
            let one = run(1, &g, &norm, 40 + h as u64);
            for workers in 2..=4 {
                let many = run(workers, &g, &norm, 40 + h as u64);
                for (i, (a, m)) in one.iter().zip(&many).enumerate() {
                    let close = a.len() == m.len()
                        && a.iter()
                            .zip(m)
                            .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + x.abs().max(y.abs())));
                    assert!(
                        close,
                        "{norm:?}, {t}x{b}x{h}, {workers} workers: output {i} differs"
                    );
                }
            }
        }
    }
}

#[test]
fn reruns_on_two_workers_are_bit_identical() {
    let g = LstmGeometry {
        steps: 5,
        batch: 6,
        hidden: 9,
    };
    for norm in modes(36) {
        let a = run(2, &g, &norm, 3);
        let b = run(2, &g, &norm, 3);
        assert!(a.iter().zip(&b).all(|(x, y)| {
            x.iter()
                .map(|v| v.to_bits())
                .eq(y.iter().map(|v| v.to_bits()))
        }));
    }
}

#[test]
fn a_bad_gain_is_an_error_not_a_hang() {
    let g = LstmGeometry {
        steps: 2,
        batch: 2,
        hidden: 3,
    };
    let (x, w, z) = (vec![0f32; 2 * 2 * 12], vec![0f32; 36], vec![0f32; 6]);
    let norm = RecurrentNorm::Layer { eps: 1e-5 };
    let x = XSource::Rows(&x);
    assert!(forward(2, &g, &norm, x, &w, Some(&[1.0; 5]), &z, &z).is_err());
    assert!(forward(2, &g, &norm, x, &w, None, &z, &z).is_err());
}
