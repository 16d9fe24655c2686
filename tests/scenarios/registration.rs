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
        for file in files(cluster.dir.path()) {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !contains(&bytes, seed.as_ref()),
                "{profile}'s signing key found in {}",
                file.display()
            );
            assert!(
                !contains(&bytes, secret.as_ref()),
                "{profile}'s encryption key found in {}",
                file.display()
            );
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
