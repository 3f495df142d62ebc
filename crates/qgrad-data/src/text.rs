//! Character (byte) corpora for language models (METHOD.md §11): a text file
//! read as bytes, its vocabulary, and the split into training, validation and
//! test chunks that the character-LSTM experiments use.
//!
//! # Layout (decided: char-rnn's, which the reference experiments use)
//!
//! The tokens are the file's bytes, each mapped to its index among the
//! distinct byte values of the file (sorted). The text is cut into
//! `n = floor(len / (batch · seq_len))` chunks; the stream of the first
//! `n · batch · seq_len` tokens is laid out as `batch` rows of
//! `L = n · seq_len` consecutive tokens, and chunk `k` is the `seq_len`
//! columns `k · seq_len ..` of every row. Consecutive chunks therefore
//! continue each row, so truncated backpropagation through time can carry
//! the hidden state from chunk `k` to chunk `k + 1`. The first
//! `floor(0.8 n)` chunks are training, the next `floor(0.1 n)` validation,
//! the rest test. Targets are the next token of the text (the token after
//! the last one used is the next byte of the file, or the first when the
//! file ends exactly there).

use std::path::Path;

use rand::seq::SliceRandom;

use crate::error::{DataError, Result};
use crate::image::epoch_rng;

/// A text file as tokens over its own byte vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextCorpus {
    /// The distinct byte values of the file, ascending; token `t` is `vocab[t]`.
    pub vocab: Vec<u8>,
    /// The file as tokens (indices into `vocab`).
    pub tokens: Vec<u16>,
}

impl TextCorpus {
    /// Reads `path`. Errors: unreadable, empty, not UTF-8 text (or holding NUL
    /// bytes, which no text file has).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|m| DataError::format(path, m))
    }

    /// The corpus of `bytes`, or what is wrong with them.
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.is_empty() {
            return Err("the file is empty".into());
        }
        if let Err(e) = std::str::from_utf8(bytes) {
            return Err(format!("not a UTF-8 text file ({e})"));
        }
        if let Some(at) = bytes.iter().position(|&b| b == 0) {
            return Err(format!("not a text file (NUL byte at offset {at})"));
        }
        let mut seen = [false; 256];
        for &b in bytes {
            seen[b as usize] = true;
        }
        let vocab: Vec<u8> = (0..=255u8).filter(|&b| seen[b as usize]).collect();
        let mut index = [0u16; 256];
        for (i, &b) in vocab.iter().enumerate() {
            index[b as usize] = i as u16;
        }
        let tokens = bytes.iter().map(|&b| index[b as usize]).collect();
        Ok(TextCorpus { vocab, tokens })
    }

    /// The corpus of `bytes` over a given vocabulary (a trained model's):
    /// token `t` is byte `vocab[t]`. Errors as [`from_bytes`](Self::from_bytes),
    /// and on a byte the vocabulary lacks.
    pub fn with_vocab(bytes: &[u8], vocab: &[u8]) -> std::result::Result<Self, String> {
        // The text checks of from_bytes (empty, UTF-8, NUL).
        Self::from_bytes(bytes)?;
        let mut index = [None; 256];
        for (t, &b) in vocab.iter().enumerate() {
            index[b as usize] = Some(t as u16);
        }
        let mut tokens = Vec::with_capacity(bytes.len());
        for (at, &b) in bytes.iter().enumerate() {
            match index[b as usize] {
                Some(t) => tokens.push(t),
                None => {
                    return Err(format!(
                        "byte {b} ({:?}) at offset {at} is not in the model's vocabulary \
                         of {} characters",
                        b as char,
                        vocab.len()
                    ))
                }
            }
        }
        Ok(TextCorpus {
            vocab: vocab.to_vec(),
            tokens,
        })
    }

    /// [`with_vocab`](Self::with_vocab) of the file at `path`.
    pub fn load_with_vocab(path: &Path, vocab: &[u8]) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        Self::with_vocab(&bytes, vocab).map_err(|m| DataError::format(path, m))
    }

    /// Number of distinct tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Number of tokens (bytes) in the corpus.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the corpus has no tokens (never true for a loaded corpus).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Decodes tokens back to the text's bytes.
    pub fn decode(&self, tokens: &[u16]) -> Vec<u8> {
        tokens
            .iter()
            .map(|&t| self.vocab.get(t as usize).copied().unwrap_or(b'?'))
            .collect()
    }

    /// The 80/10/10 split into chunks of `batch` rows × `seq_len` tokens
    /// (module docs). Errors when the corpus has fewer than 10 chunks, so
    /// that every part holds at least one.
    pub fn split(&self, batch: usize, seq_len: usize) -> Result<TextSplit> {
        if batch == 0 || seq_len == 0 {
            return Err(DataError::Request(format!(
                "batch ({batch}) and sequence length ({seq_len}) must be >= 1"
            )));
        }
        let per_chunk = batch.saturating_mul(seq_len);
        let n = self.tokens.len() / per_chunk;
        if n < 10 {
            return Err(DataError::Request(format!(
                "a corpus of {} tokens holds {n} chunks of {batch} × {seq_len}; \
                 at least 10 are needed for an 80/10/10 split",
                self.tokens.len()
            )));
        }
        let used = n * per_chunk;
        let row_len = n * seq_len;
        let target_of_last = self.tokens.get(used).copied().unwrap_or(self.tokens[0]);
        let n_train = n * 8 / 10;
        let n_valid = n / 10;
        let part = |from: usize, to: usize| {
            let mut inputs = Vec::with_capacity((to - from) * per_chunk);
            let mut targets = Vec::with_capacity((to - from) * per_chunk);
            for k in from..to {
                for r in 0..batch {
                    let start = r * row_len + k * seq_len;
                    inputs.extend_from_slice(&self.tokens[start..start + seq_len]);
                    for i in start + 1..=start + seq_len {
                        targets.push(if i < used {
                            self.tokens[i]
                        } else {
                            target_of_last
                        });
                    }
                }
            }
            TokenChunks {
                inputs,
                targets,
                batch,
                seq_len,
            }
        };
        Ok(TextSplit {
            train: part(0, n_train),
            valid: part(n_train, n_train + n_valid),
            test: part(n_train + n_valid, n),
        })
    }
}

/// The three parts of a corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSplit {
    /// The first 80 % of the chunks.
    pub train: TokenChunks,
    /// The next 10 %.
    pub valid: TokenChunks,
    /// The rest.
    pub test: TokenChunks,
}

/// Chunks of `batch × seq_len` input tokens with their next-token targets,
/// row-major per chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenChunks {
    inputs: Vec<u16>,
    targets: Vec<u16>,
    /// Rows per chunk.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
}

impl TokenChunks {
    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.inputs.len() / (self.batch * self.seq_len).max(1)
    }

    /// Whether there are no chunks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Chunk `k`: `(inputs, targets)`, each `batch · seq_len` tokens, row `r`
    /// at `r · seq_len ..`. Panics if `k >= len()` (an index, like a slice's).
    pub fn chunk(&self, k: usize) -> (&[u16], &[u16]) {
        let n = self.batch * self.seq_len;
        (
            &self.inputs[k * n..(k + 1) * n],
            &self.targets[k * n..(k + 1) * n],
        )
    }

    /// The order of chunks in `epoch`: in order (so hidden states carry from
    /// one chunk to the next), or a permutation seeded by `(seed, epoch)`.
    pub fn epoch_order(&self, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if shuffle {
            order.shuffle(&mut epoch_rng(seed, epoch, 0));
        }
        order
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_shipped_slice_loads_and_splits() {
        // datasets/war-and-peace-mini: the first 65,511 bytes of the corpus.
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../datasets/war-and-peace-mini/input.txt");
        let corpus = TextCorpus::load(&path).unwrap();
        assert_eq!(corpus.len(), 65_511);
        assert_eq!(corpus.vocab_size(), 74);
        assert_eq!(&corpus.decode(&corpus.tokens[3..8]), b"\"Well");
        let split = corpus.split(10, 100).unwrap();
        // 65 chunks of 10 x 100: 52 training, 6 validation, 7 test.
        assert_eq!(
            (split.train.len(), split.valid.len(), split.test.len()),
            (52, 6, 7)
        );
    }

    use super::*;

    #[test]
    fn split_follows_the_char_rnn_layout() {
        let text: Vec<u8> = (0..2000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let c = TextCorpus::from_bytes(&text).unwrap();
        assert_eq!(c.vocab_size(), 26);
        let s = c.split(4, 10).unwrap(); // 50 chunks: 40 / 5 / 5
        assert_eq!((s.train.len(), s.valid.len(), s.test.len()), (40, 5, 5));
        let row_len = 50 * 10;
        let (x, y) = s.train.chunk(1);
        // Row 2 of chunk 1 starts at 2·L + 10.
        assert_eq!(x[20], c.tokens[2 * row_len + 10]);
        assert_eq!(y[20], c.tokens[2 * row_len + 11]);
        // Targets are the inputs shifted by one along each row.
        assert_eq!(&x[21..30], &y[20..29]);
        assert_eq!(c.decode(&x[..3]), b"klm");
    }

    #[test]
    fn bad_corpora_are_errors() {
        assert!(TextCorpus::from_bytes(b"").is_err());
        assert!(TextCorpus::from_bytes(&[0xff, 0xfe, 0x41]).is_err());
        assert!(TextCorpus::from_bytes(b"ab\0cd").is_err());
        let short = TextCorpus::from_bytes(b"hello world").unwrap();
        assert!(matches!(short.split(2, 3), Err(DataError::Request(_))));
        assert!(short.split(0, 3).is_err());
        let dir = tempfile::tempdir().unwrap();
        let err = TextCorpus::load(&dir.path().join("missing.txt")).unwrap_err();
        assert!(err.to_string().contains("missing.txt"));
    }

    #[test]
    fn a_given_vocabulary_maps_bytes_and_rejects_strangers() {
        let c = TextCorpus::with_vocab(b"abca", b"xcba").unwrap();
        assert_eq!(c.tokens, vec![3, 2, 1, 3]);
        assert_eq!(c.decode(&c.tokens), b"abca");
        let err = TextCorpus::with_vocab(b"abz", b"ab").unwrap_err();
        assert!(err.contains("offset 2"), "{err}");
        assert!(TextCorpus::with_vocab(b"", b"ab").is_err());
    }

    #[test]
    fn shuffled_order_is_seeded() {
        let text = vec![b'x'; 1000];
        let s = TextCorpus::from_bytes(&text).unwrap().split(2, 5).unwrap();
        let a = s.train.epoch_order(3, 1, true);
        assert_eq!(a, s.train.epoch_order(3, 1, true));
        assert_eq!(
            s.train.epoch_order(3, 1, false),
            (0..80).collect::<Vec<_>>()
        );
    }
}
