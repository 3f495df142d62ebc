//! Fuzzes `CompressedModel::from_bytes` and everything a decoded model offers
//! (fixed and scaled tensors alike).
//!
//! Input byte 0 chooses the mode: even = the rest is decoded as is (mostly
//! stopped by the checksum, which tests the prefix checks); odd = the
//! declared length and the CRC32 are repaired first, so that mutations reach
//! the header and payload validation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qgrad_csr::{CompressedModel, FixedActivations};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 && bytes.len() >= 28 {
        let len = bytes.len() as u64;
        bytes[16..24].copy_from_slice(&len.to_le_bytes());
        let end = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(model) = CompressedModel::from_bytes(&bytes) {
        let _ = model.size_report();
        for t in &model.tensors {
            // Dense views allocate rows·cols: keep them small under the fuzzer.
            let _ = (t.kind(), t.scales(), model.high_part(&t.name));
            if t.num_elements() <= 1 << 16 {
                let _ = t.dequantize();
                let _ = t.codes();
                let _ = t.widths();
                let _ = t.width_histogram();
                if let Ok(x) = FixedActivations::quantize(&vec![0.75; 2 * t.cols()], 2, t.cols(), 8)
                {
                    let _ = t.matmul(&x).expect("shapes agree");
                }
            }
        }
    }
});
