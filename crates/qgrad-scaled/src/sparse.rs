//! Joint quantization and sparsification (METHOD §13): the quantizers of
//! this crate under a non-zero budget. At most `keep` elements of a tensor
//! are non-zero; they are the `keep` elements with the largest score (by
//! default `D_i W_i²`, the loss increase the second-order model predicts for
//! zeroing element `i`), quantized by the method's own solver restricted to
//! them; every other element is 0. For the binary methods the non-zeros are
//! `±α` (a "sparse binary" tensor is stored as ternary codes).
//!
//! # Decisions
//!
//! * Budget: `keep = floor(κ·n)`, at least 1 for a non-empty tensor (a layer
//!   without any weight would cut the network in two).
//! * Ties in the score go to the lower index, so the selection is
//!   deterministic.
//! * Groups (per-channel scales): the budget is per tensor (METHOD: "per
//!   layer"); each group's scale is fitted to its kept elements, and a group
//!   without any is all zeros with scale 0.
//! * The caller may rank by another score: the training side offers the
//!   accumulated gradient `A` of the first thesis (METHOD §1) instead.
//! * Schedule ([`budget_at`]): κ falls from 1 to its target along Zhu and
//!   Gupta's cubic, `κ(t) = κ + (1 − κ)(1 − t/T)³` for `t < T`, `κ` after.
//!
//! ```
//! use qgrad_scaled::{curvature_score, quantize_sparse, Method};
//!
//! let w = [0.9f32, -0.2, 0.05, -0.7, 0.3, -0.6];
//! let score = curvature_score(&w, None)?;
//! let q = quantize_sparse(Method::Lab, &w, None, 1, 3, &score, None)?;
//! // The three largest |W| keep ±α, α = their mean |W| (BWN on the kept).
//! assert_eq!(q.codes, vec![1, 0, 0, -1, 0, -1]);
//! assert!((q.scales[0] - (0.9 + 0.7 + 0.6) / 3.0).abs() < 1e-6);
//! # Ok::<(), qgrad_scaled::ScaledError>(())
//! ```

use crate::{quantize, Method, Quantized, Result, ScaledError};

/// The §13 score `D_i W_i²` of every element (`D = 1` when `None`).
pub fn curvature_score(w: &[f32], d: Option<&[f32]>) -> Result<Vec<f32>> {
    if let Some(d) = d {
        if d.len() != w.len() {
            return Err(ScaledError::Shape(format!(
                "{} curvature values for {} weights",
                d.len(),
                w.len()
            )));
        }
    }
    Ok(w.iter()
        .enumerate()
        .map(|(i, &x)| d.map_or(1.0, |d| d[i]) * x * x)
        .collect())
}

/// `floor(κ·n)`, at least 1 for `n > 0`; κ must lie in (0, 1].
pub fn kept_count(kappa: f64, n: usize) -> Result<usize> {
    if !(kappa > 0.0 && kappa <= 1.0) {
        return Err(ScaledError::Method(format!(
            "the non-zero budget κ must lie in (0, 1], not {kappa}"
        )));
    }
    Ok(((kappa * n as f64).floor() as usize).clamp(n.min(1), n))
}

/// The budget at training time `t` (in epochs) of a schedule that reaches
/// `kappa` at `ramp` epochs (cubic, see the module docs); `ramp = 0` is the
/// target from the start.
pub fn budget_at(kappa: f64, t: f64, ramp: f64) -> f64 {
    if ramp <= 0.0 || t >= ramp {
        return kappa;
    }
    let left = 1.0 - (t / ramp).max(0.0);
    kappa + (1.0 - kappa) * left * left * left
}

/// `method`'s quantization of `w` (in `groups` groups) with at most `keep`
/// non-zeros: the elements of largest `score` (see the module docs). `d` and
/// `warm` as for [`quantize`]; `warm` gives the previous codes of the kept
/// elements to the iterative solvers.
pub fn quantize_sparse(
    method: Method,
    w: &[f32],
    d: Option<&[f32]>,
    groups: usize,
    keep: usize,
    score: &[f32],
    warm: Option<&Quantized>,
) -> Result<Quantized> {
    if score.len() != w.len() {
        return Err(ScaledError::Shape(format!(
            "{} scores for {} weights",
            score.len(),
            w.len()
        )));
    }
    if score.iter().any(|s| !s.is_finite()) {
        return Err(ScaledError::NotFinite("the scores"));
    }
    crate::check_groups(w.len(), groups)?;
    let keep = keep.min(w.len());
    if keep == w.len() {
        return quantize(method, w, d, groups, warm);
    }
    quantize_masked(method, w, d, groups, &largest(score, keep), warm)
}

/// The mask of the `keep` largest `score`s (ties to the lower index, so the
/// selection is deterministic); `keep` is capped at `score.len()`.
///
/// ```
/// assert_eq!(qgrad_scaled::sparse::largest(&[0.1, 3.0, 2.0, 3.0], 2), [false, true, false, true]);
/// ```
pub fn largest(score: &[f32], keep: usize) -> Vec<bool> {
    let keep = keep.min(score.len());
    let mut order: Vec<usize> = (0..score.len()).collect();
    if keep > 0 {
        order.select_nth_unstable_by(keep - 1, |&a, &b| {
            score[b].total_cmp(&score[a]).then(a.cmp(&b))
        });
    }
    let mut kept = vec![false; score.len()];
    for &i in &order[..keep] {
        kept[i] = true;
    }
    kept
}

/// `method`'s quantization of the elements of `w` where `kept` is true (per
/// group, the solver sees only them); the others get code 0 and value 0.0,
/// binary methods included. This is how a fixed sparsity mask (block
/// sparsity, METHOD §9) meets a quantizer: the scale is that of the kept
/// weights alone.
pub fn quantize_masked(
    method: Method,
    w: &[f32],
    d: Option<&[f32]>,
    groups: usize,
    kept: &[bool],
    warm: Option<&Quantized>,
) -> Result<Quantized> {
    if kept.len() != w.len() {
        return Err(ScaledError::Shape(format!(
            "a mask of {} elements for {} weights",
            kept.len(),
            w.len()
        )));
    }
    crate::check_groups(w.len(), groups)?;
    if kept.iter().all(|&k| k) {
        return quantize(method, w, d, groups, warm);
    }
    let warm = warm.filter(|q| q.codes.len() == w.len());
    let per = w.len() / groups;
    let spg = method.scales_per_group();
    let mut out = Quantized {
        values: vec![0.0; w.len()],
        codes: vec![0; w.len()],
        scales: Vec::with_capacity(groups * spg),
    };
    for g in 0..groups {
        let idx: Vec<usize> = (g * per..(g + 1) * per).filter(|&i| kept[i]).collect();
        if idx.is_empty() {
            out.scales.extend(std::iter::repeat_n(0.0, spg));
            continue;
        }
        let wg: Vec<f32> = idx.iter().map(|&i| w[i]).collect();
        let dg: Option<Vec<f32>> = d.map(|d| idx.iter().map(|&i| d[i]).collect());
        let warm_g = warm.map(|q| Quantized {
            values: idx.iter().map(|&i| q.values[i]).collect(),
            codes: idx.iter().map(|&i| q.codes[i]).collect(),
            scales: q.scales[g * spg..(g + 1) * spg].to_vec(),
        });
        let q = quantize(method, &wg, dg.as_deref(), 1, warm_g.as_ref())?;
        for (j, &i) in idx.iter().enumerate() {
            out.values[i] = q.values[j];
            out.codes[i] = q.codes[j];
        }
        out.scales.extend(q.scales);
    }
    Ok(out)
}
