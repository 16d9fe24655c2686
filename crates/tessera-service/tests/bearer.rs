//! `authorization: Bearer <lowercase hex>` is enforced exactly as
//! docs/protocol.md section 10 says: uppercase or mixed-case hex and
//! whitespace around the token are refused.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use tessera_crypto::SigningKey;
use tessera_service::{
    TokenIssuer, TokenVerifier,
    token::{Audience, AuthMethod, Grant, TokenError, bearer_header},
};

#[test]
fn only_lowercase_hex_bearer_tokens_are_accepted() {
    let issuer = TokenIssuer::new(SigningKey::generate().unwrap(), Duration::from_secs(600));
    let verifier = TokenVerifier::new(issuer.public_key(), Audience::Server);
    let token = issuer
        .issue(
            &Grant::user("alice", AuthMethod::Password),
            Audience::Server,
        )
        .unwrap();
    let header = bearer_header(&token.bytes);
    let hex = header.strip_prefix("Bearer ").unwrap();
    assert!(hex.bytes().any(|b| b.is_ascii_alphabetic()), "has letters");
    assert_eq!(verifier.verify_header(&header).unwrap().identity, "alice");

    let mixed: String = hex
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    for bad in [
        format!("Bearer {}", hex.to_ascii_uppercase()),
        format!("Bearer {mixed}"),
        format!("Bearer {hex} "),
        format!("Bearer  {hex}"),
        format!("bearer {hex}"),
        "Bearer ".to_owned(),
    ] {
        assert!(
            matches!(verifier.verify_header(&bad), Err(TokenError::Malformed)),
            "{bad:?} was accepted"
        );
    }
}
