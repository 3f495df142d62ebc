//! `qgrad-scaled`: weight quantizers whose result is a *scaled code* — a
//! small integer per weight and one float scale per tensor (or per output
//! channel): binary, ternary and m-bit. The loss-aware ones of METHOD §10
//! (LAB, LAT approximate and exact, LAT2, LAQ) minimise a second-order model
//! of the loss, `Σ D_i (Ŵ_i − W_i)²` with the diagonal curvature `D` the
//! caller gives (Adam's `sqrt(v) + ε` in training); the baselines
//! (BinaryConnect, BWN, TWN, TerConnect) ignore `D`.
//!
//! Everything here is plain Rust on slices, without candle, so that the
//! quantizers can be property-tested exhaustively and used by the deployment
//! side. The training side calls [`quantize`] once per step and tensor.
//!
//! # Decisions
//!
//! * `sign(0) = +1` (METHOD §10).
//! * Groups: a tensor of `n` elements in `g` groups is `g` consecutive runs of
//!   `n / g` elements (one per output row: per-output-channel scales); each
//!   group gets its own scale(s).
//! * LAT approximate starts, without a previous step, from TWN's codes.
//! * LAQ's scale update: METHOD writes `α = Σ|b D W| / Σ|b D|`, which is the
//!   minimiser of the objective only for levels in {0, ±1}. For m ≥ 3 bits
//!   the levels are fractions, and the minimiser of `Σ D (α b − W)²` is
//!   `Σ D b W / Σ D b²`; this crate implements that (the math, as METHOD asks
//!   where the published code slips). Both agree for binary and ternary codes.
//!   LAQ starts from the previous step's α, or `max |W|` of the group.
//! * TerConnect, no scale: in training it is stochastic, as in Lin et al.
//!   (each code is `sign(W)` with probability `|clip(W)|`, else 0; see
//!   [`stochastic_ternary`]), so that small weights still take part; for
//!   evaluation and export ([`quantize`]) it is deterministic, `clip(W)`
//!   rounded to the nearest of {−1, 0, +1} (threshold ½).
//! * Ties in LAQ's nearest level go to the smaller magnitude; so do
//!   [`Method::Uniform`]'s (structured sparsity, METHOD §9), whose scale is
//!   not solved for but fixed at `max |W|` of the group.
//!
//! ```
//! use qgrad_scaled::{quantize, Method};
//!
//! let w = [0.9f32, -0.2, 0.05, -0.7];
//! // With constant curvature LAB is BWN: α = mean |W|.
//! let lab = quantize(Method::Lab, &w, Some(&[1.0; 4]), 1, None)?;
//! let bwn = quantize(Method::Bwn, &w, None, 1, None)?;
//! assert_eq!(lab.values, bwn.values);
//! assert!((lab.scales[0] - 0.4625).abs() < 1e-6);
//! assert_eq!(lab.codes, vec![1, -1, 1, -1]);
//! // Exact loss-aware ternarization: small weights become 0.
//! let lat = quantize(Method::LatExact, &w, Some(&[1.0; 4]), 1, None)?;
//! assert_eq!(lat.codes, vec![1, 0, 0, -1]);
//! assert!((lat.scales[0] - 0.8).abs() < 1e-6);
//! # Ok::<(), qgrad_scaled::ScaledError>(())
//! ```
#![warn(missing_docs)]

mod solvers;
pub mod sparse;

pub use sparse::{budget_at, curvature_score, kept_count, quantize_masked, quantize_sparse};

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The one error type of qgrad-scaled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScaledError {
    /// Weights or curvature that are NaN or infinite, or negative curvature.
    #[error("{0} holds NaN, infinity or (curvature) a negative value")]
    NotFinite(&'static str),
    /// Lengths that do not fit together.
    #[error("{0}")]
    Shape(String),
    /// An unknown method name or an unsupported width.
    #[error("{0}")]
    Method(String),
}

/// `Result` with [`ScaledError`].
pub type Result<T> = std::result::Result<T, ScaledError>;

/// A weight quantizer of METHOD §10.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Method {
    /// BinaryConnect: `sign(W)`, no scale.
    BinaryConnect,
    /// Binary-weight networks: `α·sign(W)`, `α = mean |W|`.
    Bwn,
    /// Loss-aware binarization: `α·sign(W)`, `α = ‖D⊙W‖₁ / ‖D‖₁`.
    Lab,
    /// Ternary, no scale: `clip(W)` rounded to {−1, 0, +1}.
    TerConnect,
    /// Ternary-weight networks: `Δ = 0.7·mean |W|`, `α` = mean |W| above Δ.
    Twn,
    /// Loss-aware ternarization, alternating α and the codes.
    LatApprox,
    /// Loss-aware ternarization, the exact minimiser.
    LatExact,
    /// LAT approximate with separate scales for positive and negative weights.
    Lat2Approx,
    /// LAT exact with separate scales for positive and negative weights.
    Lat2Exact,
    /// Loss-aware m-bit quantization.
    Laq {
        /// Bits per weight, 2..=8 (2 is ternary).
        bits: u8,
        /// Logarithmic levels (powers of two) instead of linear ones.
        log: bool,
    },
    /// Symmetric uniform `k`-bit weights of structured sparsity (METHOD §9):
    /// `α = max |W|`, levels `α·{−n … n}/n` with `n = 2^(k−1) − 1`, each
    /// weight rounded to the nearest level. (METHOD §9's `k = 1` is
    /// [`Method::Bwn`].)
    Uniform {
        /// Bits per weight, 2..=8 (2 is ternary at threshold `α/2`).
        bits: u8,
    },
}

impl Method {
    /// Every method, with LAQ at 2, 3 and 4 bits, linear and logarithmic.
    pub fn all() -> Vec<Method> {
        let mut all = vec![
            Method::BinaryConnect,
            Method::Bwn,
            Method::Lab,
            Method::TerConnect,
            Method::Twn,
            Method::LatApprox,
            Method::LatExact,
            Method::Lat2Approx,
            Method::Lat2Exact,
        ];
        for bits in [2, 3, 4] {
            for log in [false, true] {
                all.push(Method::Laq { bits, log });
            }
        }
        all
    }

    /// Whether the method reads the curvature `D`.
    pub fn loss_aware(self) -> bool {
        !matches!(
            self,
            Method::BinaryConnect
                | Method::Bwn
                | Method::TerConnect
                | Method::Twn
                | Method::Uniform { .. }
        )
    }

    /// Whether every code is ±1 (no zero).
    pub fn binary(self) -> bool {
        matches!(self, Method::BinaryConnect | Method::Bwn | Method::Lab)
    }

    /// The largest code magnitude `n`: codes lie in `−n ..= n` (binary: ±1).
    pub fn max_code(self) -> i8 {
        match self {
            Method::Laq { bits, .. } | Method::Uniform { bits } => ((1i32 << (bits - 1)) - 1) as i8,
            _ => 1,
        }
    }

    /// Scales per group: 2 for LAT2 (positive, negative), else 1.
    pub fn scales_per_group(self) -> usize {
        match self {
            Method::Lat2Approx | Method::Lat2Exact => 2,
            _ => 1,
        }
    }

    /// The level of code `k` (|k| ≤ [`max_code`](Self::max_code)) before
    /// scaling: `k / n` (linear) or `sign(k)·2^(|k| − n)` (logarithmic), 0
    /// for 0.
    pub fn level(self, code: i8) -> f32 {
        let n = self.max_code() as i32;
        let k = code as i32;
        match self {
            Method::Laq { log: true, .. } if k != 0 => (k.signum() as f32) * 2f32.powi(k.abs() - n),
            Method::Laq { .. } | Method::Uniform { .. } => k as f32 / n as f32,
            _ => k as f32,
        }
    }

    /// The allowed levels before scaling, ascending (METHOD §10).
    pub fn levels(self) -> Vec<f32> {
        let n = self.max_code();
        let mut v: Vec<f32> = (-n..=n)
            .filter(|&k| !(self.binary() && k == 0))
            .map(|k| self.level(k))
            .collect();
        v.sort_by(f32::total_cmp);
        v
    }

    /// Rejects an unsupported width (LAQ outside 2..=8 bits).
    pub fn validate(self) -> Result<()> {
        match self {
            Method::Laq { bits, .. } if !(2..=8).contains(&bits) => Err(ScaledError::Method(
                format!("LAQ takes 2..=8 bits, not {bits}"),
            )),
            Method::Uniform { bits } if !(2..=8).contains(&bits) => Err(ScaledError::Method(
                format!("uniform quantization takes 2..=8 bits (1 bit is bwn), not {bits}"),
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::BinaryConnect => f.write_str("binary-connect"),
            Method::Bwn => f.write_str("bwn"),
            Method::Lab => f.write_str("lab"),
            Method::TerConnect => f.write_str("ter-connect"),
            Method::Twn => f.write_str("twn"),
            Method::LatApprox => f.write_str("lat-a"),
            Method::LatExact => f.write_str("lat-e"),
            Method::Lat2Approx => f.write_str("lat2-a"),
            Method::Lat2Exact => f.write_str("lat2-e"),
            Method::Laq { bits, log } => {
                write!(f, "laq{bits}{}", if *log { "-log" } else { "" })
            }
            Method::Uniform { bits } => write!(f, "uniform{bits}"),
        }
    }
}

impl FromStr for Method {
    type Err = ScaledError;
    fn from_str(s: &str) -> Result<Self> {
        let key = s.to_ascii_lowercase().replace('_', "-");
        let m = match key.as_str() {
            "binary-connect" | "binaryconnect" | "bc" => Method::BinaryConnect,
            "bwn" => Method::Bwn,
            "lab" => Method::Lab,
            "ter-connect" | "terconnect" => Method::TerConnect,
            "twn" => Method::Twn,
            // The short names are the canonical ones (`Display`); the long
            // ones are what help texts and the thesis spell out.
            "lat-a" | "lat" | "lat-approx" => Method::LatApprox,
            "lat-e" | "lat-exact" => Method::LatExact,
            "lat2-a" | "lat2-approx" => Method::Lat2Approx,
            "lat2-e" | "lat2-exact" => Method::Lat2Exact,
            other if other.starts_with("uniform") => {
                let bits = other["uniform".len()..].trim_start_matches('-');
                Method::Uniform {
                    bits: bits.parse().map_err(|_| unknown(s))?,
                }
            }
            other => {
                let rest = other.strip_prefix("laq").ok_or_else(|| unknown(s))?;
                let (bits, log) = match rest.strip_suffix("-log") {
                    Some(b) => (b, true),
                    None => (rest.strip_suffix("-linear").unwrap_or(rest), false),
                };
                let bits: u8 = bits.parse().map_err(|_| unknown(s))?;
                Method::Laq { bits, log }
            }
        };
        m.validate()?;
        Ok(m)
    }
}

fn unknown(s: &str) -> ScaledError {
    ScaledError::Method(format!(
        "unknown quantizer '{s}' (expected binary-connect, bwn, lab, ter-connect, twn, lat-a, \
         lat-e, lat2-a, lat2-e, laq<m>, laq<m>-log or uniform<m>)"
    ))
}

impl TryFrom<String> for Method {
    type Error = ScaledError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Method> for String {
    fn from(m: Method) -> String {
        m.to_string()
    }
}

/// A quantized tensor: `values[i] = scale · level(codes[i])`, the scale of
/// element `i`'s group (for LAT2: the group's positive or negative scale).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quantized {
    /// The quantized weights `Ŵ`.
    pub values: Vec<f32>,
    /// The signed code of every element.
    pub codes: Vec<i8>,
    /// Per group, [`Method::scales_per_group`] scales (≥ 0).
    pub scales: Vec<f32>,
}

/// Quantizes `w` (in `groups` equal consecutive groups) with `method`. `d`
/// is the curvature (one per element, ≥ 0; `None` is constant 1). `warm`
/// is the previous step's result for the iterative methods.
pub fn quantize(
    method: Method,
    w: &[f32],
    d: Option<&[f32]>,
    groups: usize,
    warm: Option<&Quantized>,
) -> Result<Quantized> {
    method.validate()?;
    if !all_finite(w) {
        return Err(ScaledError::NotFinite("the weights"));
    }
    if let Some(d) = d {
        if d.len() != w.len() {
            return Err(ScaledError::Shape(format!(
                "{} curvature values for {} weights",
                d.len(),
                w.len()
            )));
        }
        if !all_finite_non_negative(d) {
            return Err(ScaledError::NotFinite("the curvature"));
        }
    }
    check_groups(w.len(), groups)?;
    let warm = warm.filter(|q| q.codes.len() == w.len());
    let per = w.len() / groups;
    let spg = method.scales_per_group();
    let mut out = Quantized {
        values: Vec::with_capacity(w.len()),
        codes: Vec::with_capacity(w.len()),
        scales: Vec::with_capacity(groups * spg),
    };
    // Constant curvature for a loss-aware method called without `D`; the
    // other methods never read it (an empty slice: no per-call allocation
    // and fill of a weight-sized buffer, every training step).
    let ones = if d.is_none() && method.loss_aware() {
        vec![1f32; per]
    } else {
        Vec::new()
    };
    for g in 0..groups {
        let range = g * per..(g + 1) * per;
        let wg = &w[range.clone()];
        let dg = match d {
            Some(d) => &d[range.clone()],
            None => ones.as_slice(),
        };
        let warm_g = warm.map(|q| (&q.codes[range.clone()], &q.scales[g * spg..(g + 1) * spg]));
        let (codes, scales) = solvers::solve(method, wg, dg, warm_g);
        // `scale · level(code)` of each of the method's codes, once per
        // group: the same products as per element, without a `match` per
        // element; `value_of[c + max]` is code `c`'s.
        let max = method.max_code();
        let value_of: Vec<f32> = (-max..=max)
            .map(|c| {
                let scale = if spg == 2 && c < 0 {
                    scales[1]
                } else {
                    scales[0]
                };
                scale * method.level(c)
            })
            .collect();
        let values = par_map(&codes, |c| {
            value_of[(i16::from(c) + i16::from(max)) as usize]
        });
        // One group (the common case) moves in without a copy.
        if out.values.is_empty() {
            out.values = values;
        } else {
            out.values.extend(values);
        }
        out.codes.extend(codes);
        out.scales.extend(scales);
    }
    Ok(out)
}

/// Elements per parallel chunk of [`par_map`].
const PAR_CHUNK: usize = 1 << 15;

/// `v.iter().map(f).collect()`, in chunks on rayon's threads when there are
/// at least two: the element passes of `quantize` run every training step
/// over every weight, beside GEMMs that use every core. Element-wise, so the
/// result is the same whatever the split.
pub(crate) fn par_map<T, U, F>(v: &[T], f: F) -> Vec<U>
where
    T: Copy + Sync,
    U: Copy + Default + Send + Sync,
    F: Fn(T) -> U + Sync,
{
    use rayon::prelude::*;
    if v.len() < 2 * PAR_CHUNK {
        return v.iter().map(|&x| f(x)).collect();
    }
    let mut out = vec![U::default(); v.len()];
    out.par_chunks_mut(PAR_CHUNK)
        .zip(v.par_chunks(PAR_CHUNK))
        .for_each(|(out, v)| {
            for (o, &x) in out.iter_mut().zip(v) {
                *o = f(x);
            }
        });
    out
}

// The input checks of `quantize` run every training step over every
// weight and its curvature. As `any` with an early exit they compiled to a
// scalar loop, two thirds of `quantize`'s time for LAB on LeNet-300-100
// (`perf annotate`); as an integer max over the bit patterns (an exponent of
// all ones is infinite or NaN) they vectorise and answer the same question.

/// Whether every value is finite.
fn all_finite(v: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    v.iter().fold(0u32, |m, x| m.max(x.to_bits() & EXPONENT)) < EXPONENT
}

/// Whether every value is finite and ≥ 0 (−0 included, as `x < 0.0` says).
fn all_finite_non_negative(v: &[f32]) -> bool {
    const NEGATIVE_ZERO: u32 = 0x8000_0000;
    // As unsigned bits, a finite value ≥ 0 is below +∞'s; −0 is mapped to 0.
    v.iter().fold(0u32, |m, x| {
        let b = x.to_bits();
        m.max(if b == NEGATIVE_ZERO { 0 } else { b })
    }) < f32::INFINITY.to_bits()
}

/// `n` elements split into `groups` equal groups, or an error.
pub(crate) fn check_groups(n: usize, groups: usize) -> Result<()> {
    if groups == 0 || !n.is_multiple_of(groups) {
        return Err(ScaledError::Shape(format!(
            "{n} weights do not split into {groups} equal groups"
        )));
    }
    Ok(())
}

/// TerConnect's stochastic codes: element `i` is `sign(W_i)` when
/// `uniforms[i] < |clip(W_i)|`, else 0 (`uniforms` in [0, 1), one per
/// element); no scale. The expected code is `clip(W_i)`.
pub fn stochastic_ternary(w: &[f32], uniforms: &[f32]) -> Result<Quantized> {
    if w.len() != uniforms.len() {
        return Err(ScaledError::Shape(format!(
            "{} random numbers for {} weights",
            uniforms.len(),
            w.len()
        )));
    }
    if w.iter().any(|x| !x.is_finite()) {
        return Err(ScaledError::NotFinite("the weights"));
    }
    let codes: Vec<i8> = w
        .iter()
        .zip(uniforms)
        .map(|(&x, &u)| {
            if u < x.abs().min(1.0) {
                if x < 0.0 {
                    -1
                } else {
                    1
                }
            } else {
                0
            }
        })
        .collect();
    Ok(Quantized {
        values: codes.iter().map(|&c| c as f32).collect(),
        codes,
        scales: vec![1.0],
    })
}

/// `Σ D_i (Ŵ_i − W_i)²` in f64 (`D = 1` when `None`): what the loss-aware
/// quantizers minimise.
pub fn objective(w: &[f32], d: Option<&[f32]>, values: &[f32]) -> f64 {
    w.iter()
        .zip(values)
        .enumerate()
        .map(|(i, (&w, &v))| {
            let di = d.map_or(1.0, |d| d[i] as f64);
            di * (v as f64 - w as f64).powi(2)
        })
        .sum()
}

#[cfg(test)]
mod tests;
