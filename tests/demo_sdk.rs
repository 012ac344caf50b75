#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `flex up --demo` as a user runs it (the real binary), driven by the official `openai` SDK.

#[path = "common/infra.rs"]
mod infra;

use std::process::{Command, Stdio};
use std::time::Duration;

use infra::FlexUp;

/// The venv `.ci/run` creates with the official SDKs.
pub fn python() -> String {
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    assert!(std::path::Path::new(py).exists(), "{py} is missing: run `bash .ci/run` (it creates .venv with the openai, anthropic and google-genai SDKs)");
    py.to_string()
}

#[test]
fn openai_sdk_against_flex_up_demo() {
    let up = FlexUp::start(&["--demo"], |cmd| {
        cmd.stdout(Stdio::piped());
    });
    up.wait_for_file("demo.json", Duration::from_secs(20));
    let dir = &up.dir;
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/openai_demo.py"
        ))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SDK check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The admin CLI reads endpoint and token from the data dir; --json is one object.
    let out = Command::new(env!("CARGO_BIN_EXE_flex"))
        .args(["admin", "--json", "--data-dir"])
        .arg(dir.path())
        .args(["org", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["orgs"][0]["name"], "demo");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("master.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}
