//! Rice-coded column gaps: the column indices of layout 2 (FORMAT.md §5,
//! "Layout 2, CSR with Rice-coded column gaps", version 3).
//!
//! Layout 0 spends `bits(cols - 1)` bits on every column index: 10 bits per
//! non-zero of a 784-column layer, ten times the 1 bit of a ternary code.
//! Within a row the gaps between consecutive non-zeros of a layer at density
//! `p` are close to geometric with mean `1/p`, and a Golomb–Rice code with
//! parameter `k ≈ log2(1/p)` stores one in about `k + 2` bits, within a bit of
//! their entropy. The encoder tries every `k` and keeps the smallest stream.
//!
//! Written by hand: the code is a dozen lines over qgrad-fixed's bit
//! streams, and its exact bit order is part of the format's contract.

use qgrad_fixed::{BitReader, BitWriter};

use crate::error::{CsrError, Result};
use crate::format::bits_for;

/// Bits of the Rice parameter `k` at the start of a layout-2 payload.
pub(crate) const RICE_PARAM_BITS: u32 = 5;

/// The gap of every stored entry, in element order: per row the first
/// column, then the distance to the previous column minus one. `flat` are
/// the row-major indices of the entries, increasing.
pub(crate) fn column_gaps(cols: u64, flat: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut gaps = Vec::new();
    let mut prev: Option<(u64, u64)> = None;
    for i in flat {
        let (r, c) = (i / cols, i % cols);
        gaps.push(match prev {
            Some((pr, pc)) if pr == r => c - pc - 1,
            _ => c,
        });
        prev = Some((r, c));
    }
    gaps
}

/// Bits of `gaps` Rice-coded with parameter `k`: `(g >> k) + 1 + k` each.
fn rice_bits(gaps: &[u64], k: u32) -> u128 {
    gaps.iter()
        .map(|&g| u128::from(g >> k) + 1 + u128::from(k))
        .sum()
}

/// The parameter `k` in `0 ..= bits(cols - 1)` (at most 31) whose code of
/// `gaps` is shortest (the smallest such `k` on a tie), and its bits, the
/// 5-bit parameter field included.
pub(crate) fn best_rice(gaps: &[u64], cols: u64) -> (u32, u128) {
    let max_k = bits_for(cols.saturating_sub(1)).min((1 << RICE_PARAM_BITS) - 1);
    (0..=max_k)
        .map(|k| (k, rice_bits(gaps, k) + u128::from(RICE_PARAM_BITS)))
        .min_by_key(|&(k, bits)| (bits, k))
        .unwrap_or((0, u128::from(RICE_PARAM_BITS)))
}

/// Writes `gaps` with parameter `k`: `g >> k` one bits, a zero bit, then the
/// low `k` bits of `g` (the parameter itself is written by the caller, first
/// in the payload).
pub(crate) fn write_rice(writer: &mut BitWriter, gaps: &[u64], k: u32) {
    for &g in gaps {
        for _ in 0..(g >> k) {
            writer.write_bits(1, 1);
        }
        writer.write_bits(0, 1);
        writer.write_bits(g & ((1u64 << k) - 1), k);
    }
}

/// Reads the column of every entry of rows `row_ptr` from Rice-coded gaps
/// with parameter `k`, checking that every column is `< cols` (which also
/// keeps columns strictly increasing within a row). Returns the bits read.
pub(crate) fn read_rice_columns(
    reader: &mut BitReader,
    name: &str,
    cols: usize,
    row_ptr: &[u32],
    k: u32,
    col_idx: &mut Vec<u32>,
) -> Result<u64> {
    let trunc = |e: qgrad_fixed::FixedError| CsrError::corrupt(name, format!("payload: {e}"));
    let start = reader.bits_remaining();
    // No gap of a valid stream has a quotient above this: a longer run of
    // one bits is corrupt, and stops the loop early.
    let max_quotient = (cols as u64).saturating_sub(1) >> k;
    for (r, w) in row_ptr.windows(2).enumerate() {
        let mut prev: Option<u64> = None;
        for _ in w[0]..w[1] {
            let mut q = 0u64;
            while reader.read_bits(1).map_err(trunc)? == 1 {
                q += 1;
                if q > max_quotient {
                    return Err(CsrError::corrupt(
                        name,
                        format!("a column gap in row {r} runs past the row's {cols} columns"),
                    ));
                }
            }
            let gap = (q << k) | reader.read_bits(k).map_err(trunc)?;
            let c = prev.map_or(gap, |p| p + 1 + gap);
            if c >= cols as u64 {
                return Err(CsrError::corrupt(
                    name,
                    format!("column {c} in row {r} is out of range ({cols} columns)"),
                ));
            }
            prev = Some(c);
            col_idx.push(c as u32);
        }
    }
    Ok((start - reader.bits_remaining()) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_restart_at_each_row_and_round_trip() {
        // 3 x 10: entries (0,2) (0,3) (0,9) (2,0) (2,5)
        let flat = [2u64, 3, 9, 20, 25];
        let gaps = column_gaps(10, flat.iter().copied());
        assert_eq!(gaps, vec![2, 0, 5, 0, 4]);
        let row_ptr = [0u32, 3, 3, 5];
        for k in 0..=4 {
            let mut w = BitWriter::with_capacity_bits(64);
            write_rice(&mut w, &gaps, k);
            let bytes = w.finish();
            let mut r = BitReader::new(&bytes);
            let mut cols = Vec::new();
            let bits = read_rice_columns(&mut r, "t", 10, &row_ptr, k, &mut cols).unwrap();
            assert_eq!(cols, vec![2, 3, 9, 0, 5]);
            assert_eq!(u128::from(bits), rice_bits(&gaps, k));
        }
        // k = 1: gaps 2,0,5,0,4 -> quotients 1,0,2,0,2, unary 2+1+3+1+3,
        // plus one low bit each: 15.
        assert_eq!(rice_bits(&gaps, 1), 15);
        assert_eq!(
            best_rice(&gaps, 10).1,
            rice_bits(&gaps, best_rice(&gaps, 10).0) + 5
        );
    }

    #[test]
    fn corrupt_streams_are_errors() {
        // A run of ones longer than any column allows.
        let bytes = [0xffu8; 4];
        let mut r = BitReader::new(&bytes);
        let e = read_rice_columns(&mut r, "t", 10, &[0, 1], 0, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("runs past"), "{e}");
        // A gap that lands beyond the last column: 9 then gap 0 -> column 10.
        let mut w = BitWriter::with_capacity_bits(64);
        write_rice(&mut w, &[9, 0], 4);
        let bytes = w.finish();
        let mut r = BitReader::new(&bytes);
        let e = read_rice_columns(&mut r, "t", 10, &[0, 2], 4, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        // A truncated stream.
        let mut r = BitReader::new(&[]);
        assert!(read_rice_columns(&mut r, "t", 10, &[0, 1], 2, &mut Vec::new()).is_err());
    }
}
