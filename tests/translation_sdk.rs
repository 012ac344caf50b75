#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The translation matrix (issue 4) checked by the official `openai` and `anthropic` SDKs: every
//! caller format × provider × {body, stream} × {text, tool call, tool result, image, structured}.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_parse_every_cell_of_the_matrix() {
    let s = stack().await;
    let root = s.base.trim_end_matches("/v1").to_string();
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    assert!(
        std::path::Path::new(py).exists(),
        "{py} is missing: run `bash .ci/run` (it creates .venv with the official SDKs)"
    );
    let out = tokio::process::Command::new(py)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/translation_matrix.py"
        ))
        .args([
            &root,
            &s.api_key,
            "gpt-5.5",
            "claude-opus-4-8",
            "gemini-3.5-flash",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "matrix failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
