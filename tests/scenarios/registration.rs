//! The seed's registration: the ClientKey never leaves the device, and every
//! card carries self, app and kms signatures.

use std::path::Path;

use tessera_card::{CardKind, Verifier};
use tessera_crypto::{hazmat, keystore};
use tessera_testkit::{Cluster, PASSPHRASE};

/// Every file under `dir` (recursively).
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The forms a leaked key could take in a file: raw bytes, hex (either
/// case), and base64 (standard and URL-safe alphabets) at each of the three
/// alignments the key can have inside a longer base64 text, keeping only the
/// characters the key's bits alone determine.
fn encodings(key: &[u8]) -> Vec<(String, Vec<u8>)> {
    use base64::Engine as _;
    let mut forms = vec![
        ("raw".to_owned(), key.to_vec()),
        ("hex".to_owned(), hex::encode(key).into_bytes()),
        ("HEX".to_owned(), hex::encode_upper(key).into_bytes()),
    ];
    for offset in 0..3usize {
        let mut shifted = vec![0u8; offset];
        shifted.extend_from_slice(key);
        let text = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&shifted);
        let first = (offset * 8).div_ceil(6);
        let last = (shifted.len() * 8) / 6;
        let inner = &text[first..last];
        forms.push((
            format!("base64 at offset {offset}"),
            inner.as_bytes().to_vec(),
        ));
        let url_safe = inner.replace('+', "-").replace('/', "_");
        forms.push((
            format!("url-safe base64 at offset {offset}"),
            url_safe.into_bytes(),
        ));
    }
    forms
}

#[test]
fn every_encoding_of_a_key_is_found_in_text_that_embeds_it() {
    use base64::Engine as _;
    let key: Vec<u8> = (1..=32).map(|i| i * 7).collect();
    for prefix in 0..3 {
        let mut blob = b"{\"x\":1}".repeat(prefix + 1)[..prefix].to_vec();
        blob.extend_from_slice(&key);
        blob.extend_from_slice(b" trailing");
        let texts = [
            base64::engine::general_purpose::STANDARD.encode(&blob),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&blob),
        ];
        for text in texts {
            assert!(
                encodings(&key)
                    .iter()
                    .any(|(_, form)| contains(text.as_bytes(), form)),
                "key at offset {prefix} not found in {text}"
            );
        }
    }
    let in_hex = format!("key={}", hex::encode(&key));
    assert!(
        encodings(&key)
            .iter()
            .any(|(_, f)| contains(in_hex.as_bytes(), f))
    );
}

#[tokio::test]
async fn client_key_never_leaves_the_device_and_cards_carry_three_signatures() {
    let cluster = Cluster::start().await;
    let alice = cluster.device("alice-laptop", "alice", true).await;
    // Bob registers from the command line, as a user would.
    let out = std::process::Command::new(tessera_testkit::bin_path("tessera"))
        .args(["signup", "bob", "--device-name", "phone"])
        .env("TESSERA_HOME", cluster.home.root())
        .env("TESSERA_PROFILE", "bob-phone")
        .env("TESSERA_PASSWORD", "bob-testkit-password")
        .env(
            "TESSERA_PASSPHRASE",
            std::str::from_utf8(PASSPHRASE).unwrap(),
        )
        .env("TESSERA_DANGER_FAST_KDF", "1")
        .env("TESSERA_SERVER_URL", cluster.server.url())
        .env("TESSERA_KMS_URL", cluster.kms.url())
        .env("TESSERA_BACKUP_URL", cluster.backup.url())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let channel = alice
        .create_channel(
            "hello",
            tessera_client::HistoryVisibility::Shared,
            &["bob".into()],
        )
        .await
        .unwrap();
    alice
        .send_text(&channel.channel_id, "registration works")
        .await
        .unwrap();

    for profile in ["alice-laptop", "bob-phone"] {
        let key_file = cluster.home.profile_dir(profile).join("device.key");
        let keys = keystore::load(&key_file, Some(PASSPHRASE))
            .unwrap()
            .into_device()
            .unwrap();
        let (seed, secret) = hazmat::device_key_bytes(&keys);
        // Nowhere in any service's data, logs or other profiles, and not in
        // clear even in the device's own key file.
        let mut searched = 0;
        let forms: Vec<(String, String, Vec<u8>)> =
            [("signing", seed.as_ref()), ("encryption", secret.as_ref())]
                .into_iter()
                .flat_map(|(which, key)| {
                    encodings(key)
                        .into_iter()
                        .map(move |(form, bytes)| (which.to_owned(), form, bytes))
                })
                .collect();
        for file in files(cluster.dir.path()) {
            let bytes = std::fs::read(&file).unwrap();
            for (which, form, needle) in &forms {
                assert!(
                    !contains(&bytes, needle),
                    "{profile}'s {which} key found ({form}) in {}",
                    file.display()
                );
            }
            searched += 1;
        }
        assert!(searched > 20, "only {searched} files searched");
    }

    let verifier = Verifier::new(cluster.keys.app, cluster.keys.kms);
    let (found, _) = alice
        .cards_of(&["alice".into(), "bob".into()])
        .await
        .unwrap();
    for (identity, devices) in &found {
        assert_eq!(devices.approved.len(), 1);
        assert!(devices.pending.is_empty());
        let card = devices.approved[0].card();
        assert_eq!(card.self_signature.len(), 64);
        assert_eq!(card.app_signature.len(), 64);
        assert_eq!(card.kms_signature.len(), 64);
        verifier
            .verify(card, Some(identity), CardKind::Client)
            .unwrap();
    }
}
