//! Rice-coded column gaps: the column indices of layout 2 (FORMAT.md §5,
//! "Layout 2, CSR with Rice-coded column gaps", version 3), and the
//! row-major gaps of layout 4 ("Layout 4, row-major Rice-coded gaps",
//! version 5), which need no row pointers.
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

/// The gap of every stored entry of layout 4, in element order: the first
/// entry's row-major index, then the distance to the previous entry's index
/// minus one (across row boundaries). `flat` are increasing.
pub(crate) fn flat_gaps(flat: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut prev: Option<u64> = None;
    flat.map(|i| {
        let g = prev.map_or(i, |p| i - p - 1);
        prev = Some(i);
        g
    })
    .collect()
}

/// Bits of `gaps` Rice-coded with parameter `k`: `(g >> k) + 1 + k` each.
fn rice_bits(gaps: &[u64], k: u32) -> u128 {
    GapCode::Rice(k).stream_bits(gaps)
}

/// The largest order a code of gaps below `span` is tried with:
/// `bits(span - 1)`, at most 31 (what the 5-bit field holds).
fn max_order(span: u64) -> u32 {
    bits_for(span.saturating_sub(1)).min((1 << RICE_PARAM_BITS) - 1)
}

/// The parameter `k` in `0 ..= bits(span - 1)` (at most 31) whose code of
/// `gaps` is shortest (the smallest such `k` on a tie), and its bits, the
/// 5-bit parameter field included. `span` bounds a gap: the columns of a
/// row (layout 2) or the elements of the tensor (layout 4).
pub(crate) fn best_rice(gaps: &[u64], span: u64) -> (u32, u128) {
    (0..=max_order(span))
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

/// Bits of layout 4's code field: 1 bit for the family, 5 for `k`.
pub(crate) const GAP_CODE_BITS: u32 = 6;

/// The code of layout 4's gaps (FORMAT.md §5, "Layout 4"): Golomb–Rice or
/// Exp-Golomb, each of order `k`. Rice codes suit geometric gaps (uniformly
/// scattered non-zeros); Exp-Golomb codes suit heavy-tailed ones, which is
/// what a pruned layer's gaps are when whole units or input pixels have lost
/// every connection (LeNet-300-100's `fc1` at 3 %: 177 of 300 rows empty,
/// Exp-Golomb 31,492 bits where Rice takes 48,019).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GapCode {
    /// `g >> k` one bits, a zero bit, the low `k` bits of `g`.
    Rice(u32),
    /// With `x = (g >> k) + 1` of `n` significant bits: `n - 1` one bits, a
    /// zero bit, the low `n - 1` bits of `x`, the low `k` bits of `g`.
    ExpGolomb(u32),
}

impl GapCode {
    fn k(self) -> u32 {
        match self {
            GapCode::Rice(k) | GapCode::ExpGolomb(k) => k,
        }
    }

    fn bits_of(self, g: u64) -> u128 {
        match self {
            GapCode::Rice(k) => u128::from(g >> k) + 1 + u128::from(k),
            GapCode::ExpGolomb(k) => {
                let n = bits_for((g >> k) + 1);
                u128::from(2 * n - 1 + k)
            }
        }
    }

    /// Bits of `gaps` in this code (the code field excluded).
    pub(crate) fn stream_bits(self, gaps: &[u64]) -> u128 {
        gaps.iter().map(|&g| self.bits_of(g)).sum()
    }

    /// The code with the shortest stream of `gaps`, every gap `< span`:
    /// Rice, then Exp-Golomb, each of order `0 ..= bits(span - 1)` (at most
    /// 31), the first of the shortest in that order; and its bits, the
    /// 6-bit code field included.
    pub(crate) fn best(gaps: &[u64], span: u64) -> (GapCode, u128) {
        let max_k = max_order(span);
        (0..=max_k)
            .map(GapCode::Rice)
            .chain((0..=max_k).map(GapCode::ExpGolomb))
            .map(|c| (c, c.stream_bits(gaps) + u128::from(GAP_CODE_BITS)))
            .reduce(|a, b| if b.1 < a.1 { b } else { a })
            .unwrap_or((GapCode::Rice(0), u128::from(GAP_CODE_BITS)))
    }

    /// Writes the code field: the family bit (0 Rice, 1 Exp-Golomb), then `k`.
    pub(crate) fn write_field(self, w: &mut BitWriter) {
        w.write_bits(u64::from(matches!(self, GapCode::ExpGolomb(_))), 1);
        w.write_bits(u64::from(self.k()), RICE_PARAM_BITS);
    }

    /// Reads the code field.
    pub(crate) fn read_field(r: &mut BitReader) -> qgrad_fixed::Result<GapCode> {
        let family = r.read_bits(1)?;
        let k = r.read_bits(RICE_PARAM_BITS)? as u32;
        Ok(if family == 1 {
            GapCode::ExpGolomb(k)
        } else {
            GapCode::Rice(k)
        })
    }

    /// Writes every gap.
    pub(crate) fn write(self, w: &mut BitWriter, gaps: &[u64]) {
        match self {
            GapCode::Rice(k) => write_rice(w, gaps, k),
            GapCode::ExpGolomb(k) => {
                for &g in gaps {
                    let x = (g >> k) + 1;
                    let n = bits_for(x);
                    for _ in 1..n {
                        w.write_bits(1, 1);
                    }
                    w.write_bits(0, 1);
                    w.write_bits(x & ((1u64 << (n - 1)) - 1), n - 1);
                    w.write_bits(g & ((1u64 << k) - 1), k);
                }
            }
        }
    }

    /// Reads one gap, or `None` when its prefix is longer than any gap
    /// `<= max_gap` has (a corrupt stream, stopped early).
    fn read_one(self, r: &mut BitReader, max_gap: u64) -> qgrad_fixed::Result<Option<u64>> {
        let k = self.k();
        let max_ones = match self {
            GapCode::Rice(_) => max_gap >> k,
            GapCode::ExpGolomb(_) => u64::from(bits_for((max_gap >> k) + 1) - 1),
        };
        let mut ones = 0u64;
        while r.read_bits(1)? == 1 {
            ones += 1;
            if ones > max_ones {
                return Ok(None);
            }
        }
        let high = match self {
            GapCode::Rice(_) => ones,
            // ones <= 32 here (max_gap < 2^32), so x < 2^33.
            GapCode::ExpGolomb(_) => ((1u64 << ones) | r.read_bits(ones as u32)?) - 1,
        };
        let low = r.read_bits(k)?;
        Ok(high.checked_mul(1u64 << k).map(|h| h | low))
    }
}

/// Reads the `nnz` row-major gaps of layout 4 in `code` into the row
/// pointers (`rows + 1`) and columns of an in-memory CSR, checking that
/// every index is `< rows · cols` (which also keeps them strictly
/// increasing). Returns the bits read.
pub(crate) fn read_flat_gaps(
    reader: &mut BitReader,
    name: &str,
    (rows, cols, nnz): (usize, usize, u64),
    code: GapCode,
    row_ptr: &mut Vec<u32>,
    col_idx: &mut Vec<u32>,
) -> Result<u64> {
    let trunc = |e: qgrad_fixed::FixedError| CsrError::corrupt(name, format!("payload: {e}"));
    let start = reader.bits_remaining();
    let elements = rows as u64 * cols as u64;
    let max_gap = elements.saturating_sub(1);
    let mut prev: Option<u64> = None;
    row_ptr.push(0);
    for e in 0..nnz {
        let gap = code
            .read_one(reader, max_gap)
            .map_err(trunc)?
            .ok_or_else(|| {
                CsrError::corrupt(
                    name,
                    format!("gap {e} runs past the tensor's {elements} elements"),
                )
            })?;
        let i = match prev.map_or(Some(gap), |p| (p + 1).checked_add(gap)) {
            Some(i) if i < elements => i,
            _ => {
                return Err(CsrError::corrupt(
                    name,
                    format!("entry {e} lies beyond the tensor's {elements} elements"),
                ))
            }
        };
        prev = Some(i);
        // cols > 0: an element exists.
        let r = (i / cols as u64) as usize;
        while row_ptr.len() <= r {
            row_ptr.push(e as u32);
        }
        col_idx.push((i % cols as u64) as u32);
    }
    while row_ptr.len() <= rows {
        row_ptr.push(nnz as u32);
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
    fn flat_gaps_cross_rows_and_round_trip() {
        // 3 x 10: entries (0,2) (0,3) (0,9) (2,0) (2,5)
        let flat = [2u64, 3, 9, 20, 25];
        let gaps = flat_gaps(flat.iter().copied());
        assert_eq!(gaps, vec![2, 0, 5, 10, 4]);
        let codes = (0..=5).flat_map(|k| [GapCode::Rice(k), GapCode::ExpGolomb(k)]);
        for code in codes {
            let mut w = BitWriter::with_capacity_bits(64);
            code.write_field(&mut w);
            code.write(&mut w, &gaps);
            let bytes = w.finish();
            let mut r = BitReader::new(&bytes);
            assert_eq!(GapCode::read_field(&mut r).unwrap(), code);
            let (mut ptr, mut cols) = (Vec::new(), Vec::new());
            let bits = read_flat_gaps(&mut r, "t", (3, 10, 5), code, &mut ptr, &mut cols).unwrap();
            assert_eq!(ptr, vec![0, 3, 3, 5]);
            assert_eq!(cols, vec![2, 3, 9, 0, 5]);
            assert_eq!(u128::from(bits), code.stream_bits(&gaps));
        }
        // Exp-Golomb of order 0 by hand: 2 -> x = 3 = 0b11: `1 0` then the
        // low bit 1; 0 -> x = 1: `0`; 10 -> x = 11 = 0b1011: `1 1 1 0`, then
        // 0b011 LSB first `1 1 0`.
        let mut w = BitWriter::with_capacity_bits(64);
        GapCode::ExpGolomb(0).write(&mut w, &[2, 0, 10]);
        assert_eq!(w.finish(), vec![0b0111_0101, 0b0000_0011]);
        assert_eq!(GapCode::ExpGolomb(0).stream_bits(&[2, 0, 10]), 3 + 1 + 7);
        // The best code is the shortest, with its field.
        let (best, bits) = GapCode::best(&gaps, 30);
        assert_eq!(bits, best.stream_bits(&gaps) + 6);
        for code in (0..=4).flat_map(|k| [GapCode::Rice(k), GapCode::ExpGolomb(k)]) {
            assert!(bits <= code.stream_bits(&gaps) + 6);
        }
        // Trailing empty rows, and no entries at all.
        let mut w = BitWriter::with_capacity_bits(64);
        GapCode::ExpGolomb(2).write(&mut w, &[1]);
        let bytes = w.finish();
        let (mut ptr, mut cols) = (Vec::new(), Vec::new());
        let code = GapCode::ExpGolomb(2);
        read_flat_gaps(
            &mut BitReader::new(&bytes),
            "t",
            (4, 2, 1),
            code,
            &mut ptr,
            &mut cols,
        )
        .unwrap();
        assert_eq!((ptr, cols), (vec![0, 1, 1, 1, 1], vec![1]));
        let (mut ptr, mut cols) = (Vec::new(), Vec::new());
        let code = GapCode::Rice(0);
        read_flat_gaps(
            &mut BitReader::new(&[]),
            "t",
            (2, 2, 0),
            code,
            &mut ptr,
            &mut cols,
        )
        .unwrap();
        assert_eq!((ptr, cols), (vec![0, 0, 0], vec![]));
    }

    #[test]
    fn the_best_code_follows_the_gaps_tail() {
        // Evenly spread gaps of about 30: Rice of order 4 or 5.
        let even: Vec<u64> = (0..1000).map(|i| 20 + (i * 7919) % 21).collect();
        assert!(matches!(
            GapCode::best(&even, 1 << 20).0,
            GapCode::Rice(4 | 5)
        ));
        // Mostly small gaps and a few across empty rows of 784: Exp-Golomb.
        let tail: Vec<u64> = (0..1000)
            .map(|i| if i % 50 == 0 { 5000 } else { i % 4 })
            .collect();
        let (code, bits) = GapCode::best(&tail, 1 << 20);
        assert!(matches!(code, GapCode::ExpGolomb(_)), "{code:?}");
        let rice = (0..=20)
            .map(|k| GapCode::Rice(k).stream_bits(&tail))
            .min()
            .unwrap();
        assert!(bits - 6 < rice, "{bits} against Rice {rice}");
    }

    #[test]
    fn corrupt_flat_streams_are_errors() {
        let read = |bytes: &[u8], nnz: u64, code: GapCode| {
            let (mut ptr, mut cols) = (Vec::new(), Vec::new());
            let mut r = BitReader::new(bytes);
            read_flat_gaps(&mut r, "t", (2, 5, nnz), code, &mut ptr, &mut cols)
        };
        // Runs of ones longer than any gap below 10 has, in both codes
        // (Exp-Golomb order 0: 9 -> x = 10, 3 ones at most).
        for code in [
            GapCode::Rice(0),
            GapCode::ExpGolomb(0),
            GapCode::ExpGolomb(3),
        ] {
            let e = read(&[0xff; 8], 1, code).unwrap_err();
            assert!(e.to_string().contains("runs past"), "{code:?}: {e}");
        }
        // 9, then gap 0 -> index 10 in a tensor of 10 elements.
        for code in [GapCode::Rice(4), GapCode::ExpGolomb(1)] {
            let mut w = BitWriter::with_capacity_bits(64);
            code.write(&mut w, &[9, 0]);
            let e = read(&w.finish(), 2, code).unwrap_err();
            assert!(e.to_string().contains("beyond"), "{code:?}: {e}");
        }
        // Exp-Golomb order 0 within the prefix limit but above the span:
        // x = 0b1111 -> gap 14.
        let mut w = BitWriter::with_capacity_bits(64);
        GapCode::ExpGolomb(0).write(&mut w, &[14]);
        assert!(read(&w.finish(), 1, GapCode::ExpGolomb(0)).is_err());
        // A truncated stream.
        assert!(read(&[], 1, GapCode::Rice(1)).is_err());
        assert!(read(&[], 1, GapCode::ExpGolomb(1)).is_err());
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
