//! Spectral norms of the gate matrices: the thesis's explanation of why a
//! binary LSTM needs normalisation (METHOD §11, §15) is that a ±1 matrix
//! `[H, d]` has spectral norm at least `√d` (its rows have norm `√d`), so
//! the recurrent pre-activations explode; weight norm rescales the rows and
//! layer or batch norm divide the pre-activations by their spread.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::{CharLstm, GateWeights, GATES};

/// The largest singular value of one gate matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpectralNorm {
    /// `wx.<gate>` or `wh.<gate>`.
    pub matrix: String,
    /// Columns `d` of the matrix (`√d` bounds a ±1 matrix's norm below).
    pub columns: usize,
    /// The spectral norm `σ_max`.
    pub value: f64,
}

/// `σ_max` of a row-major `rows × cols` matrix by power iteration on `MᵀM`
/// (deterministic start; 300 rounds or a relative change below 1e-9).
pub fn largest_singular_value(m: &[f32], rows: usize, cols: usize) -> f64 {
    if rows == 0 || cols == 0 {
        return 0.0;
    }
    let mut v: Vec<f64> = (0..cols).map(|j| 1.0 + (j % 7) as f64 * 1e-3).collect();
    let mut sigma = 0.0;
    for _ in 0..300 {
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        v.iter_mut().for_each(|x| *x /= norm);
        let u: Vec<f64> = m
            .chunks(cols)
            .map(|row| row.iter().zip(&v).map(|(&a, b)| f64::from(a) * b).sum())
            .collect();
        let next = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut w = vec![0f64; cols];
        for (row, ui) in m.chunks(cols).zip(&u) {
            for (wj, &a) in w.iter_mut().zip(row) {
                *wj += f64::from(a) * ui;
            }
        }
        v = w;
        let done = (next - sigma).abs() <= 1e-9 * next.max(1e-30);
        sigma = next;
        if done {
            break;
        }
    }
    sigma
}

/// The spectral norms of the eight gate matrices the forward pass uses
/// (`weights` after weight norm, when the model has it).
pub fn gate_spectral_norms(model: &CharLstm, weights: &GateWeights) -> Result<Vec<SpectralNorm>> {
    let w = model.effective_gate_weights(weights)?;
    let h = model.config.hidden;
    let mut out = Vec::new();
    for (prefix, t) in [("wx", &w.wx), ("wh", &w.wh)] {
        let cols = t.dim(1)?;
        let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        for (g, gate) in GATES.iter().enumerate() {
            let block = &values[g * h * cols..(g + 1) * h * cols];
            out.push(SpectralNorm {
                matrix: format!("{prefix}.{gate}"),
                columns: cols,
                value: largest_singular_value(block, h, cols),
            });
        }
    }
    Ok(out)
}
