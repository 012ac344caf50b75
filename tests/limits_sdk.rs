#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Limits as SDK users meet them: `flex up --demo` (the in-process limiter), limits set with
//! `flex admin limits set`, then `tests/sdk/limits_sdk.py` checks the rate-limit headers and the
//! 429s with the official `openai` and `anthropic` SDKs, including that the openai SDK's retry
//! waits what our `Retry-After` says.

#[path = "common/infra.rs"]
mod infra;

use std::process::Command;
use std::time::Duration;

use infra::{admin_json_of, flex_admin_in, FlexUp};

/// The venv `.ci/run` creates with the official SDKs.
fn python() -> String {
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    assert!(std::path::Path::new(py).exists(), "{py} is missing: run `bash .ci/run` (it creates .venv with the openai, anthropic and google-genai SDKs)");
    py.to_string()
}

#[test]
fn sdks_see_rate_limit_headers_and_honour_retry_after() {
    let up = FlexUp::start(&["--demo"], |_| {});
    up.wait_for_file("demo.json", Duration::from_secs(30));
    let demo: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(up.dir.path().join("demo.json")).unwrap())
            .unwrap();
    let org = demo["org_id"].as_str().unwrap();
    let args = [
        "--json",
        "limits",
        "set",
        "--org",
        org,
        "--rpm",
        "6",
        "--tpm",
        "200000",
        "--concurrency",
        "1",
    ];
    let set = admin_json_of(&flex_admin_in(up.dir.path(), &args, &[], None), &args);
    assert_eq!(set["limits"]["rpm"], 6);
    assert_eq!(
        set["limits"]["daily_budget_micros"],
        serde_json::Value::Null
    );
    // The embedded proxy follows the control plane in process: the limits apply at once.
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/limits_sdk.py"
        ))
        .arg(up.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SDK check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // `limits show --json` reads the embedded proxy's counters: the six admitted requests, none
    // in flight.
    let args = ["--json", "limits", "show", "--org", org];
    let shown = admin_json_of(&flex_admin_in(up.dir.path(), &args, &[], None), &args);
    assert_eq!(shown["counters"], "in-process", "{shown}");
    assert_eq!(shown["usage"]["rpm"]["used"], 6, "{shown}");
    assert_eq!(shown["usage"]["rpm"]["remaining"], 0, "{shown}");
    assert_eq!(shown["usage"]["concurrency"]["used"], 0, "{shown}");
    let tokens = shown["usage"]["tpm"]["used"].as_u64().unwrap();
    assert!(
        tokens > 0 && tokens < 1000,
        "real use, not the reservations: {shown}"
    );
    // Clear: no limits, and requests are no longer counted.
    let args = ["--json", "limits", "clear", "--org", org];
    let cleared = admin_json_of(&flex_admin_in(up.dir.path(), &args, &[], None), &args);
    assert_eq!(
        cleared["limits"]["rpm"],
        serde_json::Value::Null,
        "{cleared}"
    );
    let args = ["--json", "audit", "--org", org];
    let audit = admin_json_of(&flex_admin_in(up.dir.path(), &args, &[], None), &args);
    let text = audit.to_string();
    assert!(
        text.contains("LimitsSet") && text.contains("LimitsCleared"),
        "{text}"
    );
}
