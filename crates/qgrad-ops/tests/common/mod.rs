//! What the op tests share: seeded inputs (splitmix64), so that a failure
//! reproduces from the seed proptest prints.

/// The next splitmix64 output of `state`.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic values in [-1, 1).
#[allow(dead_code)] // not every test file uses it
pub fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| ((splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        .collect()
}
