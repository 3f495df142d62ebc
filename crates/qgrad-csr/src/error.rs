//! The crate's one error type. Every variant names what is wrong, so that a
//! user handed a damaged file learns whether it was cut short, flipped,
//! written by a newer qgrad, or is not a qgrad file at all.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, CsrError>;

/// Everything that can go wrong while encoding, decoding or running a
/// compressed model.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The first bytes are not the qgrad magic.
    #[error("not a qgrad compressed model: the file starts with {found:02x?}, expected the magic {expected:02x?} (\"QGRADCSR\")")]
    BadMagic {
        /// The bytes found where the magic belongs (fewer than 8 if the file is shorter).
        found: Vec<u8>,
        /// The magic this reader expects.
        expected: [u8; 8],
    },
    /// The file ends before a part it must contain.
    #[error("file is truncated: {what} needs {needed} bytes but the file has {available}")]
    Truncated {
        /// Which part is cut short.
        what: &'static str,
        /// Bytes required.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// The file has bytes after the declared end.
    #[error(
        "file has {extra} unexpected trailing bytes after its declared length of {declared} bytes"
    )]
    TrailingBytes {
        /// Declared file length.
        declared: u64,
        /// Bytes beyond it.
        extra: u64,
    },
    /// The file was written by a newer format version.
    #[error("format version {found} is newer than this reader ({supported})")]
    UnsupportedVersion {
        /// Version stored in the file.
        found: u32,
        /// Newest version this reader understands.
        supported: u32,
    },
    /// Version 0 was never a valid version: the field is corrupt.
    #[error("format version {found} is not a valid version (the first version is 1)")]
    InvalidVersion {
        /// Version stored in the file.
        found: u32,
    },
    /// The CRC32 over the file does not match the stored one.
    #[error("checksum mismatch: the file stores CRC32 {stored:#010x} but its contents hash to {computed:#010x}; the file is corrupted")]
    ChecksumMismatch {
        /// CRC32 stored in the last 4 bytes.
        stored: u32,
        /// CRC32 of the preceding bytes.
        computed: u32,
    },
    /// The postcard-encoded header could not be decoded or is inconsistent.
    #[error("corrupt header: {0}")]
    CorruptHeader(String),
    /// A size declared in the header exceeds what the file can hold; checked
    /// before anything is allocated from it.
    #[error("tensor `{tensor}`: declared {what} needs at least {needed_bits} bits but its payload has only {available_bits}")]
    DeclaredSizeTooLarge {
        /// Tensor name.
        tensor: String,
        /// What was declared.
        what: &'static str,
        /// Lower bound on the bits the declaration implies.
        needed_bits: u128,
        /// Bits actually present.
        available_bits: u128,
    },
    /// A tensor's payload or header entry is internally inconsistent.
    #[error("corrupt tensor `{tensor}`: {reason}")]
    CorruptTensor {
        /// Tensor name.
        tensor: String,
        /// What is inconsistent.
        reason: String,
    },
    /// Input handed to the encoder is invalid.
    #[error("invalid input tensor `{tensor}`: {reason}")]
    InvalidInput {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A scaled tensor's code lies outside `-max_code ..= max_code`, or is 0
    /// in a binary tensor.
    #[error("invalid input tensor `{tensor}`: code {code} of element {index} is outside the allowed codes ({allowed})")]
    CodeOutOfRange {
        /// Tensor name.
        tensor: String,
        /// Row-major element index.
        index: usize,
        /// The offending code.
        code: i8,
        /// What is allowed, e.g. `-3..=3` or `±1 (binary)`.
        allowed: String,
    },
    /// A scaled tensor's `max_code` does not fit its level kind (binary: 1;
    /// linear and log: 1..=127).
    #[error("invalid input tensor `{tensor}`: max_code {max_code} is not allowed for {levels} levels (binary: 1; linear and log: 1..=127)")]
    InvalidMaxCode {
        /// Tensor name.
        tensor: String,
        /// The level kind.
        levels: crate::format::LevelKind,
        /// The declared largest code.
        max_code: u8,
    },
    /// A scaled tensor's group count is 0 or does not divide its element count.
    #[error("invalid input tensor `{tensor}`: {groups} groups do not split {elements} elements into equal groups")]
    InvalidGroups {
        /// Tensor name.
        tensor: String,
        /// Declared groups.
        groups: usize,
        /// Elements of the tensor.
        elements: u64,
    },
    /// A scaled tensor has the wrong number of scales.
    #[error("invalid input tensor `{tensor}`: {found} scales given, expected {expected} ({groups} groups × {per_group})")]
    ScaleCount {
        /// Tensor name.
        tensor: String,
        /// Scales given.
        found: usize,
        /// `groups · per_group`.
        expected: usize,
        /// Groups.
        groups: usize,
        /// Scales per group (2 when two-sided).
        per_group: usize,
    },
    /// A scale is negative, NaN or infinite.
    #[error(
        "invalid input tensor `{tensor}`: scale {index} is {value}, expected a finite value >= 0"
    )]
    InvalidScale {
        /// Tensor name.
        tensor: String,
        /// Index into the scales.
        index: usize,
        /// The offending scale.
        value: f32,
    },
    /// The encoder was asked for a file older readers read, but a tensor or
    /// the requested layout needs a newer version.
    #[error("the file may be at most version {max_version}, but {what} needs version {needed}")]
    VersionTooLow {
        /// The newest version the caller allowed.
        max_version: u32,
        /// What needs the newer version.
        what: String,
        /// The version it needs.
        needed: u32,
    },
    /// Operands of a kernel do not fit together.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// An invalid option (bit width, stride, ...).
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// A fixed-point operation failed.
    #[error(transparent)]
    Fixed(#[from] qgrad_fixed::FixedError),
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Serialising the header failed (should not happen for valid input).
    #[error("could not serialise the header: {0}")]
    Serialize(String),
}

impl CsrError {
    pub(crate) fn corrupt(tensor: &str, reason: impl Into<String>) -> Self {
        CsrError::CorruptTensor {
            tensor: tensor.to_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(tensor: &str, reason: impl Into<String>) -> Self {
        CsrError::InvalidInput {
            tensor: tensor.to_owned(),
            reason: reason.into(),
        }
    }
}
