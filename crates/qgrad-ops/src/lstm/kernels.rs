//! The element-wise kernels of an LSTM step: the gate non-linearities, one
//! row's activations and new state, one row's gate derivatives, and layer
//! norm's row sums; each dispatched at run time to an AVX2 instantiation.

// The gate non-linearities, written out rather than taken from libm: glibc's
// `tanhf` (through `expm1f`) took a third of a hidden-512 training step, and
// a call per element keeps the loops from vectorising. `exp` below is
// branch-free (range reduction to `2^n · e^r`, |r| ≤ ln2/2, and the degree-7
// Taylor polynomial, whose truncation error 5e-9 is below f32's rounding), so
// LLVM turns the loops over a row into SIMD code; σ and tanh built on it are
// within a few ulp of libm's (the tests compare with candle's ops).

/// `e^x` for f32 (saturating at the f32 range).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // 0x3f31_7200, exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer in plain
    // SSE2 (`f32::round`/`floor` are libm calls without SSE4.1).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // Cody–Waite: ln 2 in two parts, the first with few enough bits that
    // n · LN2_HI is exact, so that |n| up to 126 keeps r accurate.
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n ∈ [-126, 127]: a normal power of two. `shifted` lies in [2^23,
    // 2^24), where the float's step is 1, so its bits are ROUND's plus n:
    // integer arithmetic on the bits gives 2^n without a float-to-int
    // conversion, which Rust's saturating `as` would keep scalar (one
    // `cvttss2si` per lane) and so keep the loops from vectorising.
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    f32::from_bits(biased << 23) * p
}

/// The logistic function.
#[inline(always)]
pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `tanh x = 1 − 2 / (e^{2x} + 1)` (±1 in the limits, never NaN).
#[inline(always)]
pub(super) fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

// The element-wise kernels of a step, row by row. The crate is built for
// the x86-64 baseline (SSE2), where the loops above vectorise four lanes
// wide; each kernel below is also instantiated with AVX2 enabled and picked
// at run time, which halved the gate pass of a hidden-256 step (12.7 → 6 ms
// per sequence and worker). Rust never fuses a multiply and an add on its
// own, so both instantiations compute the same bits.

/// Whether the AVX2 instantiations can run here (std caches the answer).
#[inline]
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name(args)`, which runs `$body` compiled for AVX2 where the
/// processor has it and for the baseline elsewhere.
macro_rules! dispatched {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the processor has AVX2 (checked just above).
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}

dispatched! {
    /// One row of a step: `z` holds the pre-activations of `nu` units as
    /// four gate chunks `[i f g o]`; turns them into the activations in place
    /// and writes the units' new cell and hidden state.
    pub(super) fn activate_row(z: &mut [f32], nu: usize, c_prev: &[f32], c_out: &mut [f32], h_out: &mut [f32]) {
        let (ifg, o) = z.split_at_mut(3 * nu);
        let (if_, g) = ifg.split_at_mut(2 * nu);
        // One simple loop per non-linearity, so that each vectorises.
        for v in if_.iter_mut() {
            *v = sigmoid(*v);
        }
        for v in g.iter_mut() {
            *v = tanh(*v);
        }
        for v in o.iter_mut() {
            *v = sigmoid(*v);
        }
        let (i, f) = if_.split_at(nu);
        let (i, f, g, o) = (&i[..nu], &f[..nu], &g[..nu], &o[..nu]);
        let (c_prev, c_out, h_out) = (&c_prev[..nu], &mut c_out[..nu], &mut h_out[..nu]);
        for k in 0..nu {
            let c = f[k] * c_prev[k] + i[k] * g[k];
            c_out[k] = c;
            h_out[k] = o[k] * tanh(c);
        }
    }
}

dispatched! {
    /// The gate derivatives of one row's `nu` units: from the activations
    /// `[i f g o]`, the cell states, the incoming `dh` (output gradient and
    /// recurrent part) and `dc`; updates `dc` to the previous step's.
    pub(super) fn gate_grad_row(
        gi: &[f32], gf: &[f32], gg: &[f32], go: &[f32],
        ct: &[f32], cp: &[f32], gh: &[f32], dhn: &[f32], dcn: &mut [f32],
        dz_i: &mut [f32], dz_f: &mut [f32], dz_g: &mut [f32], dz_o: &mut [f32],
    ) {
        let nu = dcn.len();
        let (gi, gf, gg, go) = (&gi[..nu], &gf[..nu], &gg[..nu], &go[..nu]);
        let (ct, cp, gh, dhn) = (&ct[..nu], &cp[..nu], &gh[..nu], &dhn[..nu]);
        let (dz_i, dz_f, dz_g, dz_o) = (&mut dz_i[..nu], &mut dz_f[..nu], &mut dz_g[..nu], &mut dz_o[..nu]);
        for k in 0..nu {
            let (i, f, g, o) = (gi[k], gf[k], gg[k], go[k]);
            let dh = gh[k] + dhn[k];
            let tc = tanh(ct[k]);
            let dc = dcn[k] + dh * o * (1.0 - tc * tc);
            dz_i[k] = dc * g * i * (1.0 - i);
            dz_f[k] = dc * cp[k] * f * (1.0 - f);
            dz_g[k] = dc * i * (1.0 - g * g);
            dz_o[k] = dh * tc * o * (1.0 - o);
            dcn[k] = dc * f;
        }
    }
}

/// Partial sums per lane: a row's f64 sum in one accumulator is a chain of
/// dependent adds (4H of them), eight lanes let them overlap and vectorise.
const SUM_LANES: usize = 8;

#[inline(always)]
fn lane_total(lanes: [f64; SUM_LANES]) -> f64 {
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

dispatched! {
    /// Mean and biased variance of a row, in f64 (layer norm's statistics).
    pub(super) fn row_mean_var(a: &[f32]) -> (f64, f64) {
        let n = a.len() as f64;
        let mut lanes = [0f64; SUM_LANES];
        let chunks = a.chunks_exact(SUM_LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..SUM_LANES {
                lanes[l] += f64::from(c[l]);
            }
        }
        for (l, &x) in tail.iter().enumerate() {
            lanes[l] += f64::from(x);
        }
        let mean = lane_total(lanes) / n;
        let mut lanes = [0f64; SUM_LANES];
        let chunks = a.chunks_exact(SUM_LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..SUM_LANES {
                let d = f64::from(c[l]) - mean;
                lanes[l] += d * d;
            }
        }
        for (l, &x) in tail.iter().enumerate() {
            let d = f64::from(x) - mean;
            lanes[l] += d * d;
        }
        (mean, lane_total(lanes) / n)
    }
}

dispatched! {
    /// Layer norm's backward row sums, `(Σ dz·γ, Σ dz·γ·â)`, in f64.
    pub(super) fn row_grad_sums(dz: &[f32], gain: &[f32], n: &[f32]) -> (f64, f64) {
        let len = dz.len();
        let (gain, n) = (&gain[..len], &n[..len]);
        let (mut s1, mut s2) = ([0f64; SUM_LANES], [0f64; SUM_LANES]);
        let whole = len / SUM_LANES * SUM_LANES;
        for base in (0..whole).step_by(SUM_LANES) {
            for l in 0..SUM_LANES {
                let dn = f64::from(dz[base + l] * gain[base + l]);
                s1[l] += dn;
                s2[l] += dn * f64::from(n[base + l]);
            }
        }
        for j in whole..len {
            let dn = f64::from(dz[j] * gain[j]);
            s1[j - whole] += dn;
            s2[j - whole] += dn * f64::from(n[j]);
        }
        (lane_total(s1), lane_total(s2))
    }
}

#[cfg(test)]
mod tests {
    use super::{exp, sigmoid, tanh};

    #[test]
    fn the_written_out_nonlinearities_match_libm() {
        let mut worst = (0f32, 0f32, 0f32);
        let mut x = -100.0f32;
        while x <= 100.0 {
            let e = (exp(x) - x.exp()).abs() / x.exp().max(f32::MIN_POSITIVE);
            let s = (sigmoid(x) - 1.0 / (1.0 + (-x).exp())).abs();
            let t = (tanh(x) - x.tanh()).abs();
            if x.abs() < 87.0 {
                worst.0 = worst.0.max(e);
            }
            worst.1 = worst.1.max(s);
            worst.2 = worst.2.max(t);
            x += 0.0137;
        }
        assert!(worst.0 < 4e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 2e-7, "sigmoid absolute error {}", worst.1);
        assert!(worst.2 < 4e-7, "tanh absolute error {}", worst.2);
        // Saturation without NaN or infinity in the limits; NaN propagates.
        assert_eq!((tanh(1e9), tanh(-1e9)), (1.0, -1.0));
        assert_eq!(sigmoid(1e9), 1.0);
        assert!((0.0..1e-37).contains(&sigmoid(-1e9)));
        assert!(exp(1e9).is_finite() && exp(-1e9) >= 0.0);
        assert!(tanh(f32::NAN).is_nan() && sigmoid(f32::NAN).is_nan());
    }
}
