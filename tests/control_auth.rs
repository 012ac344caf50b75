#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The control service is never open by accident: `flex control` refuses a non-loopback listen
//! address with neither mutual TLS nor a proxy token (unless `--insecure`), and with
//! `--proxy-token-file` a proxy holding the same token follows snapshots and reports usage over
//! gRPC while one with another token is refused and never becomes ready.

#[path = "common/infra.rs"]
mod infra;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flex::sim::{self, SimConfig};
use flex_shared::crypto::MasterKeyring;
use infra::{admin_json_of, free_port, output_with_stdin, request, wait_listening, Proc};
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "control-auth-admin-token";
const OPENAI_KEY: &str = "sk-sim-control-auth-0000";

fn flex() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flex"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FLEX_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("FLEX_LOG", "warn,flex=info");
    cmd
}

/// `DIR/admin.token` holding [`ADMIN_TOKEN`] with surrounding whitespace, as an editor leaves it.
fn admin_token_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("  {ADMIN_TOKEN}\n\n")).unwrap();
    path
}

fn control(dir: &Path, listen: &str, extra: &[&str]) -> Command {
    let mut cmd = flex();
    cmd.args(["control", "--database-url"])
        .arg(format!(
            "sqlite://{}?mode=rwc",
            dir.join("flex.db").display()
        ))
        // The admin token from a file (trimmed), as deploy/ gives it: never on the command line.
        .arg("--admin-token-file")
        .arg(admin_token_file(dir))
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .args(["--listen", listen])
        .args(extra);
    cmd
}

#[test]
fn a_non_loopback_control_service_needs_mtls_a_proxy_token_or_insecure() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("master.key"),
        MasterKeyring::generate_file_text(),
    )
    .unwrap();
    let listen = format!("0.0.0.0:{}", free_port());
    let out = control(tmp.path(), &listen, &[]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for says in [
        "--client-ca",
        "--proxy-token-file",
        "--insecure",
        "openssl rand",
    ] {
        assert!(err.contains(says), "{says} in: {err}");
    }
    // With --insecure it starts (and says what that means in its log).
    let port = free_port();
    let log = tmp.path().join("insecure.log");
    let mut p = Proc::spawn(
        "flex-control",
        control(tmp.path(), &format!("0.0.0.0:{port}"), &["--insecure"]),
        log,
    );
    wait_listening(port, "flex control --insecure", Duration::from_secs(60));
    assert!(
        p.log_text().contains("anyone who reaches it"),
        "{}",
        p.log_text()
    );
    p.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_prove_themselves_with_the_proxy_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("master.key"), MasterKeyring::generate_file_text()).unwrap();
    std::fs::write(dir.join("proxy.token"), "the-right-token-0123456789\n").unwrap();
    std::fs::write(dir.join("other.token"), "a-guessed-token\n").unwrap();
    let sim = sim::spawn(SimConfig {
        openai_key: Some(OPENAI_KEY.into()),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let cp_port = free_port();
    let cp_url = format!("http://127.0.0.1:{cp_port}");
    let _control = Proc::spawn(
        "flex-control",
        control(
            dir,
            &format!("127.0.0.1:{cp_port}"),
            &[
                "--proxy-token-file",
                &dir.join("proxy.token").display().to_string(),
            ],
        ),
        dir.join("control.log"),
    )
    .tail_on_panic(40);
    wait_listening(cp_port, "flex control", Duration::from_secs(60));
    let admin = |args: &[&str], stdin: Option<&str>| -> Value {
        let out = output_with_stdin(
            flex()
                .args([
                    "admin",
                    "--endpoint",
                    &cp_url,
                    "--token-file",
                    &admin_token_file(dir).display().to_string(),
                    "--json",
                ])
                .args(args),
            stdin,
        );
        admin_json_of(&out, args)
    };
    let org = admin(&["org", "create", "acme"], None)["org_id"]
        .as_str()
        .unwrap()
        .to_string();
    let key = admin(&["key", "create", "--org", &org, "--name", "k"], None)["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    admin(
        &["provider-key", "set", "--org", &org, "--provider", "openai"],
        Some(OPENAI_KEY),
    );
    let proxy = |name: &str, token_file: &str| {
        let port = free_port();
        let mut cmd = flex();
        cmd.args(["proxy", "--control-url", &cp_url, "--master-key-file"])
            .arg(dir.join("master.key"))
            .args(["--proxy-id", name, "--listen", &format!("127.0.0.1:{port}")])
            .args(["--openai-base-url", &sim.openai_base_url()])
            .arg("--proxy-token-file")
            .arg(dir.join(token_file));
        let p = Proc::spawn(name, cmd, dir.join(format!("{name}.log"))).tail_on_panic(40);
        (p, port)
    };
    let (good, good_port) = proxy("edge-good", "proxy.token");
    let (bad, bad_port) = proxy("edge-bad", "other.token");

    // The proxy with the token gets its snapshot, answers, and its usage reaches the ledger.
    let url = format!("http://127.0.0.1:{good_port}/v1/chat/completions");
    let body = json!({"model": "gpt-5.5", "start_within": "default",
                      "messages": [{"role": "user", "content": "hi"}]});
    let t0 = Instant::now();
    loop {
        if let Ok((200, _)) =
            request(http::Method::POST, &url, Some(&key), Some(body.clone())).await
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never served:\n{}",
            good.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now();
    while admin(&["usage", "--org", &org], None)["requests"].as_u64() != Some(1) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "usage never arrived:\n{}",
            good.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The other one is refused: no snapshot, not ready, and its log says why.
    let ready = format!("http://127.0.0.1:{bad_port}/readyz");
    let t0 = Instant::now();
    while !bad.log_text().contains("wrong proxy token") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no refusal logged:\n{}",
            bad.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = request(http::Method::GET, &ready, None, None)
        .await
        .unwrap();
    assert_eq!(status, 503, "a refused proxy has no snapshot");
    let proxies = admin(&["proxies"], None).to_string();
    assert!(proxies.contains("edge-good"), "{proxies}");
    assert!(!proxies.contains("edge-bad"), "{proxies}");
    assert!(
        !bad.log_text().contains("a-guessed-token") && !good.log_text().contains("the-right-token"),
        "no token in a log"
    );
}
