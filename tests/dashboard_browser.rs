#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The dashboard in a real headless Chromium (Selenium, `tests/sdk/dashboard_browser.py`),
//! against the real `flex up --demo` binary, with the official `openai` SDK calling its proxy:
//! sign up, a key shown once, a provider key pasted, a request through the proxy that shows up
//! on the usage page with its tier and savings, the quickstart's snippets run as shown, the key revoked and refused within a second, a
//! second account that cannot see or touch the first one's keys (by URL or form), a form
//! without its CSRF token refused, the demo's own sign-in from demo.json. On failure the script
//! saves a screenshot of every page it visited (the path is in the failure message).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and `selenium` in
//! `.venv`; it fails, never skips, without them.

#[path = "common/infra.rs"]
mod infra;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use infra::{flex_admin_in, FlexUp};

fn python() -> String {
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    assert!(
        Path::new(py).exists(),
        "{py} is missing: run `bash .ci/run` (it creates .venv with the SDKs and selenium)"
    );
    py.to_string()
}

fn require(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install Debian's {package} (`apt-get install -y chromium chromium-driver`; `bash .ci/run` does it)"
    );
}

#[test]
fn the_dashboard_in_a_real_browser() {
    let chromium = std::env::var("FLEX_TEST_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
    let driver = std::env::var("FLEX_TEST_CHROMEDRIVER").unwrap_or("/usr/bin/chromedriver".into());
    require(&chromium, "chromium");
    require(&driver, "chromium-driver");
    let up = FlexUp::start(&["--demo"], |_| {});
    let demo = up.wait_for_file("demo.json", Duration::from_secs(30));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&demo).unwrap()).unwrap();
    // demo.json names the dashboard and a demo user's sign-in.
    assert_eq!(
        v["dashboard_url"],
        format!("http://127.0.0.1:{}", up.dashboard)
    );
    assert_eq!(v["dashboard_email"], "demo@example.com");
    assert!(v["dashboard_password"].as_str().unwrap().len() >= 16);

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/dashboard_browser.py"
        ))
        .arg(up.dir.path())
        .arg(&shots)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser test failed (screenshots of every page it visited: {}):\n{stdout}\n{}",
        shots.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    // What the browser did is what the operator sees: one key in the first org, revoked by the
    // user, none created by the second account or by the forged forms.
    let dir = up.dir.path();
    let json = |args: &[&str]| {
        let out = flex_admin_in(dir, args, &[], None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let org = r["org_id"].as_str().unwrap();
    let keys = json(&["--json", "key", "list", "--org", org]);
    let keys = keys["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0]["key_id"], r["key_id"]);
    assert_eq!(keys[0]["status"], "revoked");
    let pks = json(&["--json", "provider-key", "list", "--org", org]);
    assert_eq!(
        pks["keys"][0]["status"], "set",
        "the forged removal changed nothing"
    );
    let other = json(&[
        "--json",
        "key",
        "list",
        "--org",
        r["other_org_id"].as_str().unwrap(),
    ]);
    assert_eq!(
        other["keys"],
        serde_json::json!([]),
        "the form without CSRF created nothing"
    );
    let audit = json(&["--json", "audit", "--org", org]);
    let users = json(&["--json", "user", "list"]);
    let ada = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["email"] == "ada@example.com")
        .unwrap();
    let actor = format!("user:{}", ada["user_id"].as_str().unwrap());
    for t in ["ApiKeyCreated", "ProviderKeySet", "ApiKeyRevoked"] {
        let e = audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event_type"] == t)
            .unwrap_or_else(|| panic!("{t} in {audit}"));
        assert_eq!(e["actor"], actor.as_str(), "{t}");
    }
    let usage = json(&["--json", "usage", "--org", org]);
    // The refused request, the SDK's, the quickstart's snippets', until the revocation.
    assert!(usage["requests"].as_u64().unwrap() >= 6, "{usage}");
    assert!(usage["flex_requests"].as_u64().unwrap() >= 2, "{usage}");
    assert!(usage["savings_micros"].as_i64().unwrap() > 0);
}
