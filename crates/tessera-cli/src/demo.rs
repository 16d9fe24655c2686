//! `tessera demo`: a throwaway stack, and the seed played end to end with
//! every step checked. It exits non-zero at the first step that does not
//! behave as stated.

use std::path::Path;

use tessera_card::{
    CardKind, NewCard, app_sign,
    channel::{Change, NewChannelStatement, Role},
    kms_sign,
};
use tessera_client::{
    Approval, Client, Content, Endpoints, Enrollment, Home, KdfParams, Source, Visibility,
    approval_code,
};
use tessera_crypto::{DeviceKeys, SigningKey};
use tessera_stack::{
    Stack, StackConfig,
    hostile::{self, Proxy},
};

use crate::error::CliError;

const PASSPHRASE: &[u8] = b"demo device passphrase";

struct Demo {
    home: Home,
    stack: Stack,
    /// The directory as alice's devices see it: honest until step 8.
    directory: Proxy,
    /// The app server as bob's devices see it: honest until step 10.
    relay: Proxy,
    step: usize,
}

fn fail(step: &str, detail: impl Into<String>) -> CliError {
    CliError::DemoStep {
        step: step.to_owned(),
        detail: detail.into(),
    }
}

fn check(cond: bool, step: &str, detail: &str) -> Result<(), CliError> {
    if cond {
        Ok(())
    } else {
        Err(fail(step, detail))
    }
}

fn short(id: &tessera_client::CardId) -> String {
    id.short()
}

impl Demo {
    fn title(&mut self, text: &str) {
        self.step += 1;
        println!("\n== {}. {text}", self.step);
    }

    /// A new device; alice's devices reach the key service through the
    /// directory proxy, bob's reach the app server through the relay proxy.
    async fn device(
        &self,
        profile: &str,
        identity: &str,
        sign_up: bool,
    ) -> Result<Client, CliError> {
        self.device_in(&self.home, profile, identity, sign_up).await
    }

    /// [`Demo::device`] with its profile in `home` (another machine's).
    async fn device_in(
        &self,
        home: &Home,
        profile: &str,
        identity: &str,
        sign_up: bool,
    ) -> Result<Client, CliError> {
        let info = self.stack.info();
        let via_proxy = identity == "alice";
        let password = format!("{identity} demo password");
        let client = Client::enroll(
            home,
            profile,
            Enrollment {
                endpoints: Endpoints {
                    server_url: if identity == "bob" {
                        self.relay.url()
                    } else {
                        info.server_url.clone()
                    },
                    kms_url: if via_proxy {
                        self.directory.url()
                    } else {
                        info.kms_url.clone()
                    },
                    backup_url: info.backup_url.clone(),
                    ca_cert: None,
                },
                identity,
                password: &password,
                sign_up,
                device_name: profile,
                passphrase: PASSPHRASE,
                kdf: KdfParams::DEFAULT,
                expected_app_key: Some(info.app_public_key),
                expected_kms_key: Some(info.kms_public_key),
                reset: false,
            },
        )
        .await?;
        println!(
            "   {identity}/{profile}: ClientKey made on the device (never leaves it), card {}",
            short(&client.card_id())
        );
        Ok(client)
    }
}

pub(crate) async fn run(keep: Option<&Path>) -> Result<(), CliError> {
    let temp = tempfile::tempdir().map_err(|e| CliError::Failed(e.to_string()))?;
    let root = keep.map_or_else(|| temp.path().to_path_buf(), Path::to_path_buf);
    println!(
        "Tessera demo: the seed \"End-to-End Encrypted Twilio Programmable Chat\", end to end."
    );
    println!("(data in {})", root.display());

    let mut config = StackConfig::for_tests(root.join("stack"));
    config.org_identity = Some("org:acme".into());
    config.danger_fast_kdf = false;
    let stack = Stack::start(config)
        .await
        .map_err(|e| CliError::Failed(format!("stack: {e}")))?;
    let directory = Proxy::directory(&stack.info().kms_url)
        .await
        .map_err(CliError::Failed)?;
    let relay = Proxy::relay(&stack.info().server_url)
        .await
        .map_err(CliError::Failed)?;
    let mut d = Demo {
        home: Home::new(root.join("home")),
        stack,
        directory,
        relay,
        step: 0,
    };
    let info = d.stack.info().clone();
    println!(
        "\nStack on loopback: app server {}, key service {}, backup {}",
        info.server_url,
        info.kms_url,
        info.backup_url.clone().unwrap_or_default()
    );
    println!(
        "AppKey {} | key service {}",
        hex::encode(&info.app_public_key.as_bytes()[..8]),
        hex::encode(&info.kms_public_key.as_bytes()[..8])
    );

    let result = play(&mut d).await;
    let Demo {
        stack,
        directory,
        relay,
        ..
    } = d;
    directory.stop().await;
    relay.stop().await;
    stack.stop().await;
    match &result {
        Ok(()) => println!("\nEvery step behaved as the seed says."),
        Err(e) => println!("\nFAILED: {e}"),
    }
    result
}

async fn play(d: &mut Demo) -> Result<(), CliError> {
    // 1. Registration.
    let step = "registration";
    d.title("Registration: alice enrolls two devices, bob one (ClientCard = self + AppKey + KMS signatures)");
    let alice_laptop = d.device("alice-laptop", "alice", true).await?;
    let alice_phone = d.device("alice-phone", "alice", false).await?;
    check(
        alice_phone.approval().await? == Approval::Pending,
        step,
        "alice's second device was trusted before any of her devices approved it",
    )?;
    let code = approval_code(&alice_phone.card_id());
    println!(
        "   alice's phone waits for approval (code {code}); her laptop shows the same code and approves it"
    );
    check(
        approval_code(&alice_phone.card_id()) == code,
        step,
        "the two devices disagree on the approval code",
    )?;
    alice_laptop.approve_device(&alice_phone.card_id()).await?;
    let bob_phone = d.device("bob-phone", "bob", true).await?;
    let (found, _) = alice_laptop
        .cards_of(&["alice".into(), "bob".into()])
        .await?;
    let bob_cards = found.get("bob").cloned().unwrap_or_default();
    check(
        found.get("alice").map_or(0, |d| d.approved.len()) == 2 && bob_cards.approved.len() == 1,
        step,
        "expected 2 cards for alice and 1 for bob",
    )?;
    for card in found.values().flat_map(|d| d.approved.iter()) {
        let c = card.card();
        check(
            !c.self_signature.is_empty()
                && !c.app_signature.is_empty()
                && !c.kms_signature.is_empty(),
            step,
            "a card lacks one of its three signatures",
        )?;
    }
    println!(
        "   every card verified: self, app and kms signatures, its place in the transparency log, and its owner's signed device list"
    );
    for profile in ["alice-laptop", "alice-phone", "bob-phone"] {
        let key = std::fs::read(d.home.profile_dir(profile).join("device.key"))
            .map_err(|e| fail(step, e.to_string()))?;
        check(
            tessera_crypto::keystore::is_protected(&key).unwrap_or(false),
            step,
            "a device key is not passphrase-protected",
        )?;
    }
    println!(
        "   each ClientKey lives only in its profile's key file, sealed with Argon2id + AES-256-GCM"
    );

    // 2. Organisation.
    let step = "organisation";
    d.title("The organisation org:acme has its OrgKey/OrgCard; the admin adds bob to it");
    let admin = Client::enroll(
        &d.home,
        "admin",
        Enrollment {
            endpoints: d.stack.info().endpoints(),
            identity: &d.stack.info().admin_identity.clone(),
            password: &d.stack.info().admin_password.clone(),
            sign_up: false,
            device_name: "admin console",
            passphrase: PASSPHRASE,
            kdf: KdfParams::DEFAULT,
            expected_app_key: Some(d.stack.info().app_public_key),
            expected_kms_key: Some(d.stack.info().kms_public_key),
            reset: false,
        },
    )
    .await?;
    let members = admin.set_org_member("bob", true).await?;
    check(members == ["bob"], step, "bob is not in the organisation")?;
    check(
        bob_phone.is_org_member().await?,
        step,
        "bob's device does not know it belongs to the organisation",
    )?;
    let org = bob_phone.org().await?;
    println!(
        "   OrgCard {} (kind org, AppKey-signed, in the log); bob's devices will back up",
        short(&org.card.id())
    );

    // 3. Message exchange.
    let step = "message exchange";
    d.title("alice sends to bob: EncMsg = Enc(Msg, every device of every member)");
    let channel = alice_laptop
        .create_channel("deal", Visibility::Shared, &["bob".into()])
        .await?;
    let secret = "Bob, the price is 4.2 million. Keep it quiet.";
    let sent = alice_laptop.send_text(&channel.channel_id, secret).await?;
    check(
        sent.recipients.len() == 3,
        step,
        "not encrypted to exactly 3 cards",
    )?;
    println!(
        "   signed by alice's laptop, encrypted to 3 cards: alice-laptop {}, alice-phone {}, bob-phone {}",
        short(&alice_laptop.card_id()),
        short(&alice_phone.card_id()),
        short(&bob_phone.card_id())
    );

    // 4. What the server stores.
    let step = "server sees ciphertext only";
    d.title("What the app server stores");
    let stored = bob_phone
        .stored_messages(&channel.channel_id, 0, 10)
        .await?;
    let m = stored.first().ok_or_else(|| fail(step, "nothing stored"))?;
    let parsed = tessera_crypto::sender_key::ParsedGroupEnvelope::parse(&m.envelope)
        .map_err(|e| fail(step, e.to_string()))?;
    println!(
        "   message {} from {} (card {}): {} bytes, one group envelope (sender-key chain {}, generation {}; no per-device data), body {}...",
        m.index,
        m.sender_identity,
        hex::encode(&m.sender_card_id[..8]),
        m.envelope.len(),
        hex::encode(&parsed.chain_id()[..4]),
        parsed.generation(),
        hex::encode(&m.envelope[m.envelope.len() - 24..])
    );
    // Every 8-byte piece of the plaintext, wherever it sits in the message,
    // is looked for in what the server stores.
    let leaked = secret
        .as_bytes()
        .windows(8)
        .find(|piece| m.envelope.windows(piece.len()).any(|w| w == *piece));
    check(
        leaked.is_none(),
        step,
        &format!(
            "part of the plaintext ({:?}) appears in what the server stores",
            leaked.map(String::from_utf8_lossy)
        ),
    )?;
    println!("   the plaintext appears nowhere in it: ciphertext only");

    // 5. Decrypt and verify.
    let step = "decrypt and verify";
    d.title("bob decrypts with his ClientKey and verifies alice's signature");
    let page = bob_phone.history(&channel.channel_id, 0, 10, false).await?;
    let received = page
        .messages
        .first()
        .and_then(|(_, r)| r.as_ref().ok())
        .ok_or_else(|| fail(step, "bob could not read it"))?;
    check(
        matches!(&received.content, Content::Text(t) if t == secret),
        step,
        "wrong plaintext",
    )?;
    check(
        received.sender_card_id == alice_laptop.card_id(),
        step,
        "wrong sender card",
    )?;
    println!(
        "   \"{secret}\"  — from alice, card {} verified (signature, card, log)",
        short(&received.sender_card_id)
    );
    let other = alice_phone
        .history(&channel.channel_id, 0, 10, false)
        .await?;
    check(
        other.messages.first().is_some_and(|(_, r)| r.is_ok()),
        step,
        "alice's phone cannot read her own message",
    )?;
    println!("   alice's phone reads it too: the sender's other devices are recipients");

    // 6. Backup.
    let step = "org backup";
    d.title("bob's device re-encrypts it to the OrgCard (OrgEncMsg) and backs it up");
    check(
        bob_phone.back_up(received).await?,
        step,
        "the backup was not stored",
    )?;
    println!("   stored by the backup service, with alice's original signature inside");
    let second = alice_laptop
        .send_text(&channel.channel_id, "Signing is on Friday.")
        .await?;
    let page = bob_phone
        .history(&channel.channel_id, second.index, 1, false)
        .await?;
    if let Some((_, Ok(r))) = page.messages.first() {
        check(
            bob_phone.back_up(r).await?,
            step,
            "the second backup was not stored",
        )?;
    }

    // 7. New device + history sync.
    let step = "history sync";
    d.title("bob enrolls a new device, approves it from his phone: it cannot read the originals, and syncs them from the org");
    let bob_tablet = d.device("bob-tablet", "bob", false).await?;
    check(
        bob_tablet
            .sync_from_org(&channel.channel_id, 0, 0, |_, _| {})
            .await
            .is_err(),
        step,
        "the organisation served history to a device bob had not approved",
    )?;
    bob_phone.approve_device(&bob_tablet.card_id()).await?;
    println!(
        "   approved from bob's phone (code {})",
        approval_code(&bob_tablet.card_id())
    );
    let page = bob_tablet
        .history(&channel.channel_id, 0, 10, false)
        .await?;
    check(
        page.messages.iter().all(|(_, r)| r.is_err()),
        step,
        "the new device could read messages sent before it existed",
    )?;
    if let Some((_, Err(e))) = page.messages.first() {
        println!("   from the app server: {e}");
    }
    let synced = bob_tablet
        .sync_from_org(&channel.channel_id, 0, 0, |_, _| {})
        .await?;
    check(
        synced.len() == 2,
        step,
        "expected both messages from the organisation",
    )?;
    for entry in &synced {
        let r = entry
            .result
            .as_ref()
            .map_err(|e| fail(step, e.to_string()))?;
        check(
            r.source == Source::Organisation && r.sender_card_id == alice_laptop.card_id(),
            step,
            "wrong origin",
        )?;
        if let Content::Text(t) = &r.content {
            println!(
                "   #{} \"{t}\" — org signature verified, and alice's original signature verified",
                r.index
            );
        }
    }

    // 8. Forged card.
    let step = "card verification";
    d.title("A MITM directory injects a forged card for bob: alice's client refuses it");
    let attacker_app = SigningKey::generate().map_err(|e| fail(step, e.to_string()))?;
    let attacker_kms = SigningKey::generate().map_err(|e| fail(step, e.to_string()))?;
    let mut forged = NewCard {
        identity: "bob",
        kind: CardKind::Client,
        device_name: "bob's new phone",
        created_at: 1_800_000_000,
        previous_card_id: None,
    }
    .self_signed(&DeviceKeys::generate().map_err(|e| fail(step, e.to_string()))?)
    .map_err(|e| fail(step, e.to_string()))?;
    app_sign(&mut forged, &attacker_app);
    kms_sign(&mut forged, &attacker_kms);
    d.directory
        .control
        .set_tamper(hostile::inject_card("bob".into(), forged));
    match alice_laptop
        .send_text(&channel.channel_id, "Did you get it?")
        .await
    {
        Err(e @ tessera_client::ClientError::CardRejected { .. }) => println!("   refused: {e}"),
        Err(e) => return Err(fail(step, format!("failed for another reason: {e}"))),
        Ok(_) => return Err(fail(step, "the forged card was accepted")),
    }
    d.directory.control.set_tamper(hostile::honest());
    println!("   (nothing was sent; with the honest directory back, sending works again)");
    alice_laptop
        .send_text(&channel.channel_id, "Did you get it?")
        .await?;

    // 9. A device behind bob's back.
    let step = "device list";
    d.title("The app server, which holds the AppKey and sees bob's password, enrolls a device of its own for bob");
    let attacker = Home::new(d.home.root().with_file_name("attacker-home"));
    let rogue = d.device_in(&attacker, "server-made", "bob", false).await?;
    let sent = alice_laptop
        .send_text(&channel.channel_id, "Only for bob's real devices.")
        .await?;
    check(
        !sent.recipients.contains(&rogue.card_id())
            && sent.pending.iter().any(|p| p.card_id == rogue.card_id()),
        step,
        "alice encrypted to a device none of bob's devices approved",
    )?;
    println!(
        "   its card carries valid app and kms signatures, but none of bob's devices signed it into his device list:"
    );
    println!(
        "   alice's client reports \"bob has 1 pending device (not encrypted to)\" and encrypts to {} cards only",
        sent.recipients.len()
    );
    check(
        rogue
            .send_text(&channel.channel_id, "Send the money here.")
            .await
            .is_err(),
        step,
        "a device nobody approved could send",
    )?;
    let audit = bob_phone.audit().await?;
    check(
        audit
            .unrecognised_active()
            .any(|c| c.card_id == rogue.card_id()),
        step,
        "bob's audit does not flag the device",
    )?;
    println!(
        "   bob's audit flags card {} as made by none of his devices",
        short(&rogue.card_id())
    );
    bob_phone
        .revoke_device(&rogue.card_id(), "not mine", Some("bob demo password"))
        .await?;
    println!("   bob revokes it");

    // 10. A ghost member.
    let step = "channel membership";
    d.title("The app server adds an account of its own, mallory, to the deal channel: bob's client refuses the ghost");
    let mallory = d.device("mallory", "mallory", true).await?;
    d.relay
        .control
        .set_tamper(hostile::ghost_member("mallory".into()));
    let view = bob_phone.channel(&channel.channel_id).await?;
    check(
        view.unverified_members == ["mallory"],
        step,
        "bob's client did not notice a member nobody added",
    )?;
    let sent = bob_phone
        .send_text(&channel.channel_id, "Agreed, 4.2 it is.")
        .await?;
    check(
        !sent.recipients.contains(&mallory.card_id()),
        step,
        "bob encrypted to the ghost",
    )?;
    println!(
        "   the server's member list names mallory; the channel's signed membership chain does not: bob's message goes to {} cards, none of mallory's",
        sent.recipients.len()
    );
    // The server goes further: it slips a statement "mallory joins", signed
    // by mallory's own device, into the chain it serves.
    let state = bob_phone.verified_channel(&channel.channel_id).await?.state;
    let keys = tessera_crypto::keystore::load(
        &d.home.profile_dir("mallory").join("device.key"),
        Some(PASSPHRASE),
    )
    .and_then(|k| k.into_device())
    .map_err(|e| fail(step, e.to_string()))?;
    let joins = NewChannelStatement {
        channel_id: &channel.channel_id,
        epoch: state.length(),
        previous_hash: state.head(),
        signer_identity: "mallory",
        signer: mallory.card_id(),
        created_at: tessera_service::now_secs(),
        change: Change::Add {
            identity: "mallory".into(),
            role: Role::Member,
        },
    }
    .sign(&keys.signing);
    d.relay.control.set_tamper(hostile::both(
        hostile::ghost_member("mallory".into()),
        hostile::append_statement(channel.channel_id.clone(), joins),
    ));
    match bob_phone
        .send_text(&channel.channel_id, "Is mallory with us?")
        .await
    {
        Err(e @ tessera_client::ClientError::Channel { .. }) => println!("   refused: {e}"),
        Err(e) => return Err(fail(step, format!("failed for another reason: {e}"))),
        Ok(_) => return Err(fail(step, "the forged statement was accepted")),
    }
    d.relay.control.set_tamper(hostile::honest());
    println!("   (nothing was sent: only a member with the right role can sign a change)");

    // 11. Tampered message.
    let step = "tampered message";
    d.title("The relay turns hostile and flips one bit of each message: bob's client refuses them");
    d.relay.control.set_tamper(hostile::rewrite_messages(|m| {
        if let Some(byte) = m.envelope.last_mut() {
            *byte ^= 0x01;
        }
    }));
    let page = bob_phone.history(&channel.channel_id, 0, 10, false).await?;
    d.relay.control.set_tamper(hostile::honest());
    check(
        !page.messages.is_empty() && page.messages.iter().all(|(_, r)| r.is_err()),
        step,
        "a tampered message was accepted",
    )?;
    if let Some((_, Err(e))) = page.messages.first() {
        println!("   refused: {e}");
    }

    // 12. Safety numbers.
    let step = "safety numbers";
    d.title("alice and bob compare safety numbers");
    let a = alice_laptop.safety_number("bob").await?;
    let b = bob_phone.safety_number("alice").await?;
    check(
        a.number == b.number,
        step,
        "the two sides see different numbers",
    )?;
    println!("   alice sees:\n{}", indent(&a.number.to_string()));
    println!("   bob sees:\n{}", indent(&b.number.to_string()));
    println!("   they match: both sides see the same devices for each other");
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("      {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
