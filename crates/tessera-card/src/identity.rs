//! Identities and device names.

use crate::CardError;

/// Longest identity, in bytes.
pub const MAX_IDENTITY_LEN: usize = 64;
/// Longest device name, in bytes.
pub const MAX_DEVICE_NAME_LEN: usize = 64;

/// An identity is 1 to 64 bytes of lowercase ASCII letters, digits and
/// `. _ - @ + :`. Lowercase only, so two identities that look alike are the
/// same identity.
pub fn validate_identity(identity: &str) -> Result<(), CardError> {
    if identity.is_empty() {
        return Err(CardError::InvalidIdentity("empty"));
    }
    if identity.len() > MAX_IDENTITY_LEN {
        return Err(CardError::InvalidIdentity("longer than 64 bytes"));
    }
    if !identity
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-@+:".contains(&b))
    {
        return Err(CardError::InvalidIdentity(
            "only lowercase letters, digits and . _ - @ + : are allowed",
        ));
    }
    Ok(())
}

/// A device name is 1 to 64 bytes of printable text (no control characters).
pub fn validate_device_name(name: &str) -> Result<(), CardError> {
    if name.trim().is_empty() {
        return Err(CardError::InvalidDeviceName("empty"));
    }
    if name.len() > MAX_DEVICE_NAME_LEN {
        return Err(CardError::InvalidDeviceName("longer than 64 bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err(CardError::InvalidDeviceName("contains control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities() {
        for ok in [
            "alice",
            "bob.smith",
            "carol@example.com",
            "org:acme",
            "a",
            "x+y_z-1",
        ] {
            assert_eq!(validate_identity(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Alice", "bob smith", "émile", "a\n", &"a".repeat(65)] {
            assert!(validate_identity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_names() {
        assert_eq!(validate_device_name("alice's laptop"), Ok(()));
        assert!(validate_device_name("").is_err());
        assert!(validate_device_name("   ").is_err());
        assert!(validate_device_name("a\u{7}b").is_err());
        assert!(validate_device_name(&"x".repeat(65)).is_err());
    }
}
