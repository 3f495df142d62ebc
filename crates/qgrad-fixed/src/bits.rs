//! Bit-level writer and reader (LSB-first, DEFLATE bit order; see the crate docs).

use crate::{FixedError, Result};

/// The low `bits` bits of `value` (`bits` >= 64 keeps all of it).
#[inline(always)]
fn low_bits(value: u64, bits: u32) -> u64 {
    if bits >= 64 {
        value
    } else {
        value & ((1u64 << bits) - 1)
    }
}

/// Appends values of any width 0..=64 to a byte stream, least-significant bit
/// first. Keeps a 64-bit accumulator and flushes whole words.
#[derive(Debug, Default, Clone)]
pub struct BitWriter {
    bytes: Vec<u8>,
    /// Pending bits, the oldest in the low positions.
    acc: u64,
    /// Number of pending bits in `acc`, always < 64.
    acc_bits: u32,
}

impl BitWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty writer with room for `n` bits without reallocating.
    pub fn with_capacity_bits(n: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(n.div_ceil(8) + 8),
            acc: 0,
            acc_bits: 0,
        }
    }

    /// Appends the low `bits` bits of `value`. `bits` may be 0 (writes
    /// nothing). For `bits > 64` the value is zero-extended to `bits` bits.
    #[inline]
    pub fn write_bits(&mut self, value: u64, bits: u32) {
        if bits > 64 {
            self.write_bits(value, 64);
            self.write_zeros(bits - 64);
            return;
        }
        if bits == 0 {
            return;
        }
        let v = low_bits(value, bits);
        self.acc |= v << self.acc_bits;
        let total = self.acc_bits + bits;
        if total >= 64 {
            self.bytes.extend_from_slice(&self.acc.to_le_bytes());
            // The bits of `v` that did not fit; none if the accumulator was empty.
            self.acc = if self.acc_bits == 0 {
                0
            } else {
                v >> (64 - self.acc_bits)
            };
            self.acc_bits = total - 64;
        } else {
            self.acc_bits = total;
        }
    }

    fn write_zeros(&mut self, mut bits: u32) {
        while bits > 0 {
            let n = bits.min(64);
            self.write_bits(0, n);
            bits -= n;
        }
    }

    /// Appends `value` in two's complement in `bits` bits (its low `bits`
    /// bits; for `bits > 64`, sign-extended). Values outside
    /// `-2^(bits-1)..2^(bits-1)` wrap, as two's-complement truncation does.
    #[inline]
    pub fn write_signed(&mut self, value: i64, bits: u32) {
        if bits > 64 {
            self.write_bits(value as u64, 64);
            let fill = if value < 0 { u64::MAX } else { 0 };
            let mut rest = bits - 64;
            while rest > 0 {
                let n = rest.min(64);
                self.write_bits(fill, n);
                rest -= n;
            }
            return;
        }
        self.write_bits(value as u64, bits);
    }

    /// Number of bits written so far.
    pub fn bit_len(&self) -> usize {
        self.bytes.len() * 8 + self.acc_bits as usize
    }

    /// The bytes, the last one padded with zero bits.
    pub fn finish(mut self) -> Vec<u8> {
        let tail = (self.acc_bits as usize).div_ceil(8);
        self.bytes
            .extend_from_slice(&self.acc.to_le_bytes()[..tail]);
        self.bytes
    }
}

/// Reads values of any width 0..=64 from a byte stream written by
/// [`BitWriter`]. Reading past the end is an error, never a panic.
#[derive(Debug, Clone)]
pub struct BitReader<'a> {
    bytes: &'a [u8],
    /// Position of the next bit to read.
    pos: usize,
}

impl<'a> BitReader<'a> {
    /// A reader at the first bit of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// Bits left to read (including the padding of the last byte).
    pub fn bits_remaining(&self) -> usize {
        self.bytes.len() * 8 - self.pos
    }

    /// Reads an unsigned field of `bits` (0..=64) bits.
    #[inline]
    pub fn read_bits(&mut self, bits: u32) -> Result<u64> {
        if bits > 64 {
            return Err(FixedError::FieldTooWide { bits, max: 64 });
        }
        if bits as usize > self.bits_remaining() {
            return Err(FixedError::Truncated {
                needed_bits: u128::from(bits),
                available_bits: self.bits_remaining(),
            });
        }
        if bits == 0 {
            return Ok(0);
        }
        let byte = self.pos / 8;
        let shift = (self.pos % 8) as u32;
        let value = if let Some(window) = self.bytes.get(byte..byte + 8) {
            let word = u64::from_le_bytes(window.try_into().expect("slice of 8 bytes"));
            let mut v = word >> shift;
            if shift + bits > 64 {
                // Only reachable when the field extends into the ninth byte,
                // which the length check above guarantees exists.
                v |= u64::from(self.bytes[byte + 8]) << (64 - shift);
            }
            v
        } else {
            // Near the end: assemble from the remaining (< 8) bytes.
            let mut word = [0u8; 8];
            let rest = &self.bytes[byte..];
            word[..rest.len()].copy_from_slice(rest);
            u64::from_le_bytes(word) >> shift
        };
        self.pos += bits as usize;
        Ok(low_bits(value, bits))
    }

    /// Reads a two's-complement field of `bits` (0..=64) bits, sign-extended.
    #[inline]
    pub fn read_signed(&mut self, bits: u32) -> Result<i64> {
        let raw = self.read_bits(bits)?;
        Ok(sign_extend(raw, bits))
    }
}

#[inline(always)]
fn sign_extend(raw: u64, bits: u32) -> i64 {
    match bits {
        0 => 0,
        64.. => raw as i64,
        _ => ((raw << (64 - bits)) as i64) >> (64 - bits),
    }
}

/// Checks that `count` fields of `bits` bits fit in `bytes` before anything
/// is allocated for them.
fn check_unpack(bytes: &[u8], bits: u32, count: usize, max: u32) -> Result<()> {
    if bits > max {
        return Err(FixedError::FieldTooWide { bits, max });
    }
    let needed = u128::from(bits) * count as u128;
    let available = bytes.len() as u128 * 8;
    if needed > available {
        return Err(FixedError::Truncated {
            needed_bits: needed,
            available_bits: bytes.len().saturating_mul(8),
        });
    }
    Ok(())
}

/// Packs `values` in two's complement, `bits` (0..=32) bits each (values out
/// of range wrap). `bits = 0` gives no bytes.
pub fn pack_signed(values: &[i32], bits: u32) -> Vec<u8> {
    let mut writer = BitWriter::with_capacity_bits(values.len().saturating_mul(bits as usize));
    for &v in values {
        writer.write_signed(i64::from(v), bits);
    }
    writer.finish()
}

/// Unpacks `count` sign-extended `bits`-bit (0..=32) values. Errors if the
/// bytes are too short or `bits > 32`.
pub fn unpack_signed(bytes: &[u8], bits: u32, count: usize) -> Result<Vec<i32>> {
    check_unpack(bytes, bits, count, 32)?;
    let mut reader = BitReader::new(bytes);
    (0..count)
        .map(|_| reader.read_signed(bits).map(|v| v as i32))
        .collect()
}

/// Packs the low `bits` (0..=32) bits of each value. `bits = 0` gives no bytes.
pub fn pack_unsigned(values: &[u32], bits: u32) -> Vec<u8> {
    let mut writer = BitWriter::with_capacity_bits(values.len().saturating_mul(bits as usize));
    for &v in values {
        writer.write_bits(u64::from(v), bits);
    }
    writer.finish()
}

/// Unpacks `count` unsigned `bits`-bit (0..=32) values. Errors if the bytes
/// are too short or `bits > 32`.
pub fn unpack_unsigned(bytes: &[u8], bits: u32, count: usize) -> Result<Vec<u32>> {
    check_unpack(bytes, bits, count, 32)?;
    let mut reader = BitReader::new(bytes);
    (0..count)
        .map(|_| reader.read_bits(bits).map(|v| v as u32))
        .collect()
}
