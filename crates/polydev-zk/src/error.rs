/// Everything that can go wrong, each a distinct, clear case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("wrong master password")]
    WrongPassword,
    #[error("wrong recovery key")]
    WrongRecoveryKey,
    #[error("not a recovery key: expected 64 hexadecimal digits (dashes and spaces allowed)")]
    InvalidRecoveryKey,
    #[error("the key material or ciphertext was tampered with or is corrupt")]
    Tampered,
    #[error("the envelope belongs elsewhere: {0} does not match")]
    WrongContext(&'static str),
    #[error(
        "key derivation parameters below the minimum (Argon2id m={min_memory_kib} KiB, t={min_iterations}, p=1) or above the maximum"
    )]
    WeakKdfParams {
        min_memory_kib: u32,
        min_iterations: u32,
    },
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    #[error("too large: at most {0} bytes")]
    TooLarge(usize),
    #[error("invalid {0}")]
    InvalidInput(&'static str),
    #[error("the system random generator failed")]
    Random,
}
