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
