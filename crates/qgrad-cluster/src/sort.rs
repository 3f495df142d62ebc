//! Parallel radix sort of `f32` in IEEE-754 total order.

use rayon::prelude::*;

use crate::buffer;

/// Below this length a comparison sort is faster than setting up the radix
/// passes.
const RADIX_THRESHOLD: usize = 1 << 15;
/// Buckets smaller than this are finished with a comparison sort.
const SMALL_BUCKET: usize = 512;
/// Bits of the most-significant-digit pass (2048 buckets: sign, exponent and
/// two mantissa bits, so real data spreads over many buckets).
const MSD_BITS: u32 = 11;
const MSD_SHIFT: u32 = 32 - MSD_BITS;
/// Elements per chunk of the parallel histogram.
const HISTOGRAM_CHUNK: usize = 1 << 16;

/// Maps an `f32` to a `u32` whose unsigned order is `f32::total_cmp` order:
/// negative numbers have all bits flipped, positive ones the sign bit set.
#[inline(always)]
pub(crate) fn to_key(v: f32) -> u32 {
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[inline(always)]
fn from_key(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k & 0x7fff_ffff
    } else {
        !k
    })
}

/// Sorts `values` ascending in IEEE-754 total order (`f32::total_cmp`:
/// `-NaN < -inf < … < -0.0 < +0.0 < … < +inf < +NaN`), the same result as
/// `values.sort_by(f32::total_cmp)`.
///
/// Small inputs use a comparison sort; large ones a radix sort on the bit
/// patterns: one most-significant-digit pass over 11 bits, then every bucket
/// in parallel (rayon) with least-significant-digit passes over the remaining
/// 21 bits. Uses two temporary `u32` buffers of the input's length.
pub fn par_sort_f32(values: &mut [f32]) {
    if values.len() < RADIX_THRESHOLD {
        values.sort_unstable_by(f32::total_cmp);
        return;
    }
    // Both buffers are written in full (in parallel) before they are read:
    // zeroed lazily, so no serial fill touches their pages first.
    let mut keys: Vec<u32> = buffer::zeroed(values.len());
    keys.par_chunks_mut(HISTOGRAM_CHUNK)
        .zip(values.par_chunks(HISTOGRAM_CHUNK))
        .for_each(|(k, v)| k.iter_mut().zip(v).for_each(|(k, &v)| *k = to_key(v)));
    // The most-significant-digit pass in parallel: a histogram per chunk,
    // then each chunk scatters its keys to its own slots of every bucket
    // (bucket-major, chunk-minor), all slots disjoint.
    let histograms: Vec<Vec<usize>> = keys
        .par_chunks(HISTOGRAM_CHUNK)
        .map(|chunk| {
            let mut hist = vec![0usize; 1 << MSD_BITS];
            for &k in chunk {
                hist[(k >> MSD_SHIFT) as usize] += 1;
            }
            hist
        })
        .collect();
    let mut counts = vec![0usize; 1 << MSD_BITS];
    for hist in &histograms {
        counts.iter_mut().zip(hist).for_each(|(c, h)| *c += h);
    }
    let mut starts: Vec<Vec<usize>> = vec![Vec::with_capacity(1 << MSD_BITS); histograms.len()];
    let mut total = 0usize;
    for digit in 0..1 << MSD_BITS {
        for (start, hist) in starts.iter_mut().zip(&histograms) {
            start.push(total);
            total += hist[digit];
        }
    }
    let mut sorted: Vec<u32> = buffer::zeroed(keys.len());
    let out = SharedSlice(sorted.as_mut_ptr(), sorted.len());
    keys.par_chunks(HISTOGRAM_CHUNK)
        .zip(starts.into_par_iter())
        .for_each(|(chunk, mut next)| {
            for &k in chunk {
                let digit = (k >> MSD_SHIFT) as usize;
                // SAFETY: chunk c writes bucket d's slots
                // starts[c][d]..starts[c][d] + histograms[c][d], one per key
                // of digit d in the chunk; these ranges are disjoint across
                // chunks and digits and lie inside `sorted` (they partition
                // 0..len), and nothing reads `sorted` until every chunk is
                // done.
                unsafe { out.write(next[digit], k) };
                next[digit] += 1;
            }
        });

    // Every bucket is now a contiguous range of `sorted`; `keys` is free to
    // serve as the scratch buffer of the same ranges.
    let mut buckets = Vec::new();
    let mut rest_sorted = &mut sorted[..];
    let mut rest_scratch = &mut keys[..];
    for &c in counts.iter().filter(|&&c| c > 0) {
        let (bucket, tail) = std::mem::take(&mut rest_sorted).split_at_mut(c);
        let (scratch, scratch_tail) = std::mem::take(&mut rest_scratch).split_at_mut(c);
        buckets.push((bucket, scratch));
        rest_sorted = tail;
        rest_scratch = scratch_tail;
    }
    buckets
        .into_par_iter()
        .for_each(|(bucket, scratch)| sort_low_bits(bucket, scratch));

    values
        .par_iter_mut()
        .zip(sorted.par_iter())
        .for_each(|(v, &k)| *v = from_key(k));
}

/// A slice written from several threads at disjoint indices (the parallel
/// scatter of [`par_sort_f32`]); every user states why its indices are
/// disjoint.
#[derive(Clone, Copy)]
struct SharedSlice(*mut u32, usize);

// SAFETY: the pointer is only written through `write`, whose callers
// guarantee that no two threads touch the same index.
unsafe impl Send for SharedSlice {}
// SAFETY: as above.
unsafe impl Sync for SharedSlice {}

impl SharedSlice {
    /// # Safety
    /// No other thread may read or write index `i` concurrently.
    #[inline(always)]
    unsafe fn write(self, i: usize, value: u32) {
        assert!(i < self.1, "scatter index {i} past {}", self.1);
        // SAFETY: in bounds (checked); exclusive by the caller's promise.
        unsafe { self.0.add(i).write(value) };
    }
}

/// Sorts keys that share their top `MSD_BITS` bits by the low 21 bits, in
/// two LSD passes (11 + 10 bits) through `scratch`; the result is in `bucket`.
fn sort_low_bits(bucket: &mut [u32], scratch: &mut [u32]) {
    if bucket.len() < SMALL_BUCKET {
        bucket.sort_unstable();
        return;
    }
    if radix_pass(bucket, scratch, 0, 11) {
        // The data is in `scratch`; bring it back with the second pass.
        if !radix_pass(scratch, bucket, 11, 10) {
            bucket.copy_from_slice(scratch);
        }
    } else if radix_pass(bucket, scratch, 11, 10) {
        bucket.copy_from_slice(scratch);
    }
}

/// One stable counting pass on `bits` bits at `shift` from `src` into `dst`.
/// Returns false (and moves nothing) when every key has the same digit.
fn radix_pass(src: &[u32], dst: &mut [u32], shift: u32, bits: u32) -> bool {
    let mask = (1u32 << bits) - 1;
    let mut counts = [0usize; 1 << 11];
    for &k in src {
        counts[((k >> shift) & mask) as usize] += 1;
    }
    if counts.contains(&src.len()) {
        return false;
    }
    let mut total = 0usize;
    for c in counts.iter_mut() {
        let n = *c;
        *c = total;
        total += n;
    }
    for &k in src {
        let digit = ((k >> shift) & mask) as usize;
        dst[counts[digit]] = k;
        counts[digit] += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_is_total_order() {
        let values = [
            f32::NEG_INFINITY,
            -1e30,
            -1.0,
            -f32::MIN_POSITIVE,
            -1e-45,
            -0.0,
            0.0,
            1e-45,
            1.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for w in values.windows(2) {
            assert!(to_key(w[0]) < to_key(w[1]), "{} {}", w[0], w[1]);
        }
        for &v in &values {
            assert_eq!(from_key(to_key(v)).to_bits(), v.to_bits());
        }
    }
}
