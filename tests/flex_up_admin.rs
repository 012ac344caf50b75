#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `flex up` without `--demo` (the real binary) operated with `flex admin --data-dir`: the
//! endpoint and token come from the data dir, subcommand flags from `FLEX_*` variables, the
//! embedded proxy is listed, and the state files are owner-only.

#[path = "common/infra.rs"]
mod infra;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use infra::{flex_admin_in, FlexUp};

/// `flex admin --data-dir DIR ARGS…` with `env`, and no `FLEX_*` variable of the test's own.
fn admin(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    flex_admin_in(dir, args, env, None)
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "flex admin failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn flex_admin_reads_a_plain_flex_up_data_dir() {
    let up = FlexUp::start(&[], |_| {});
    let (dir, admin_port) = (&up.dir, up.admin);

    // `flex up` writes where its admin API listens, owner-only like the token.
    let endpoint_file = up.wait_for_file("admin-endpoint", Duration::from_secs(20));
    assert!(!dir.path().join("demo.json").exists());
    assert_eq!(
        std::fs::read_to_string(&endpoint_file).unwrap().trim(),
        format!("http://127.0.0.1:{admin_port}")
    );

    // `--json` after the command too.
    let v = json_of(&admin(dir.path(), &["org", "list", "--json"], &[]));
    assert_eq!(v["orgs"], serde_json::json!([]));

    // Subcommand flags from FLEX_* variables.
    let org = json_of(&admin(
        dir.path(),
        &["--json", "org", "create", "acme"],
        &[],
    ));
    let org_id = org["org_id"].as_str().unwrap();
    let key = json_of(&admin(
        dir.path(),
        &["--json", "key", "create"],
        &[("FLEX_ORG", org_id), ("FLEX_NAME", "from-env")],
    ));
    assert_eq!(key["org_id"], org_id);
    assert!(key["api_key"].as_str().unwrap().starts_with("flex_live_"));
    let keys = json_of(&admin(
        dir.path(),
        &["--json", "key", "list"],
        &[("FLEX_ORG", org_id)],
    ));
    assert_eq!(keys["keys"][0]["name"], "from-env");
    assert_eq!(keys["keys"][0]["key_id"], key["key_id"]);
    // A flag given on the command line wins over its variable.
    let out = admin(
        dir.path(),
        &["--json", "key", "list", "--org", "org_nope"],
        &[("FLEX_ORG", org_id)],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("org_nope"), "{err}");

    // The embedded proxy is listed, at the control plane's version.
    let t0 = Instant::now();
    loop {
        let v = json_of(&admin(dir.path(), &["--json", "proxies"], &[]));
        let p = &v["proxies"][0];
        if p["applied_version"] == v["current_version"] {
            assert_eq!(p["proxy_id"], "embedded", "{v}");
            assert_eq!(p["transport"], "in-process", "{v}");
            assert_eq!(p["connected"], true, "{v}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{v}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // State files are owner-only, the SQLite database and its WAL files included.
    for name in [
        "admin-token",
        "admin-endpoint",
        "master.key",
        "flex.db",
        "flex.db-wal",
        "flex.db-shm",
    ] {
        assert_eq!(mode(&dir.path().join(name)), 0o600, "{name}");
    }
}

#[test]
fn flex_admin_manages_dashboard_users() {
    let up = FlexUp::start(&[], |_| {});
    let dir = up.dir.path();
    up.wait_for_file("admin-endpoint", Duration::from_secs(20));
    let run = |args: &[&str], stdin: Option<&str>| flex_admin_in(dir, args, &[], stdin);

    // A password from stdin (never argv); the account owns a new org named after it.
    let password = "correct horse battery staple";
    let ada = json_of(&run(
        &["--json", "user", "create", "Ada@Example.com"],
        Some(&format!("{password}\n")),
    ));
    assert_eq!(ada["email"], "ada@example.com");
    assert_eq!(ada["status"], "active");
    assert_eq!(ada["orgs"][0]["role"], "owner");
    let org = ada["orgs"][0]["org_id"].as_str().unwrap().to_string();
    // A generated password is printed once; --org joins an existing org.
    let bob = json_of(&run(
        &[
            "--json",
            "user",
            "create",
            "bob@example.com",
            "--org",
            &org,
            "--role",
            "member",
            "--generate-password",
        ],
        None,
    ));
    assert_eq!(bob["orgs"][0]["org_id"], org.as_str());
    assert_eq!(bob["orgs"][0]["role"], "member");
    assert_eq!(bob["password"].as_str().unwrap().len(), 32);
    // The same email twice, no password, a short one: refused, saying why.
    for (args, stdin, says) in [
        (
            vec!["user", "create", "ada@example.com"],
            Some(password),
            "already exists",
        ),
        (
            vec!["user", "create", "carol@example.com"],
            None,
            "no password on stdin",
        ),
        (
            vec!["user", "create", "carol@example.com"],
            Some("short"),
            "at least 10",
        ),
    ] {
        let out = run(&args, stdin);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        assert!(!err.contains(password) && !err.contains("short\n"), "{err}");
    }
    let list = json_of(&run(&["--json", "user", "list"], None));
    assert_eq!(list["users"].as_array().unwrap().len(), 2);
    let human = run(&["user", "list"], None);
    assert!(String::from_utf8_lossy(&human.stdout).contains("bob@example.com"));

    // Disable (by email) and enable (by id).
    let off = json_of(&run(
        &[
            "--json",
            "user",
            "disable",
            "bob@example.com",
            "--reason",
            "left",
        ],
        None,
    ));
    assert_eq!(off["status"], "disabled");
    let again = run(&["user", "disable", "bob@example.com"], None);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already disabled"));
    let id = bob["user_id"].as_str().unwrap();
    let on = json_of(&run(&["--json", "user", "enable", id], None));
    assert_eq!(on["status"], "active");
    let missing = run(&["user", "disable", "nobody@example.com"], None);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));

    // The audit shows the operator's membership change; the password hash is elided.
    let audit = json_of(&run(&["--json", "audit", "--org", &org], None));
    let text = audit.to_string();
    assert!(
        text.contains("MemberAdded") && !text.contains("$argon2"),
        "{text}"
    );
}
