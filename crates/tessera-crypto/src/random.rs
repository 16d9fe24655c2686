use ring::rand::{SecureRandom, SystemRandom};

use crate::KeyError;

/// Fills a fresh array from the operating system's CSPRNG.
pub fn random_array<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| KeyError::Rng)?;
    Ok(out)
}

/// `len` bytes from the operating system's CSPRNG.
pub fn random_bytes(len: usize) -> Result<Vec<u8>, KeyError> {
    let mut out = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| KeyError::Rng)?;
    Ok(out)
}
