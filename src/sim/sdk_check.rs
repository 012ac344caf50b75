//! The official Python SDKs (`openai`, `anthropic`, `google-genai`, in the repository's `.venv`)
//! call every endpoint of a running simulator, streaming and not: `tests/sdk/sim_sdk_check.py`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use super::{spawn, SimConfig};

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/sim_sdk_check.py");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_parse_every_body_and_event() {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: run `.ci/run`, which creates the .venv with the official openai, \
         anthropic and google-genai SDKs this test drives"
    );
    let (openai_key, anthropic_key, gemini_key) = ("sk-sim-openai", "sk-ant-sim", "AIza-sim");
    let sim = spawn(SimConfig {
        openai_key: Some(openai_key.into()),
        anthropic_key: Some(anthropic_key.into()),
        gemini_key: Some(gemini_key.into()),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let base_url = sim.base_url();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(PYTHON)
            .args([SCRIPT, &base_url, openai_key, anthropic_key, gemini_key])
            .output()
    })
    .await
    .unwrap()
    .expect("could not run the SDK check script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "SDK check failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("all SDK checks passed"),
        "{stdout}\n{stderr}"
    );
    // Shown with `--nocapture`: SDK warnings would point at a body that is not quite right.
    println!("{stdout}{stderr}");
}
