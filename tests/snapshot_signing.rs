//! Signed snapshots and the maximum snapshot age, with real processes: `flex keygen
//! snapshot-signing`, a private `nats-server`, `flex control` on SQLite signing with the private
//! key (heartbeats every second), and two `flex proxy` processes given the public key and
//! `--max-snapshot-age-secs 4`, one on NATS and one on the gRPC Watch. A delta forged on the NATS
//! snapshot subject (adding an attacker's API key, with a correct content hash) is refused and
//! the proxy keeps serving its last good snapshot; idle, the proxies stay fresh through the
//! heartbeats; with the control plane killed they answer 503 `snapshot_too_old` and `/readyz` is
//! 503 once the age passes the limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/infra.rs"]
mod infra;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use infra::{free_port, output_with_stdin, request, Nats, Proc};
use prost::Message;
use serde_json::Value;

const TOKEN: &str = "signing-admin-token";

fn flex(name: &str, args: &[&str], log: &Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flex"));
    cmd.env_clear()
        .env("FLEX_LOG", "warn,flex=info,flex_data_plane=info")
        .args(args);
    Proc::spawn(name, cmd, log.to_path_buf())
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

async fn get(url: &str, key: Option<&str>) -> (u16, String) {
    request(http::Method::GET, url, key, None)
        .await
        .unwrap_or((0, String::new()))
}

async fn wait_for(what: &str, within: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while !ok().await {
        assert!(t0.elapsed() < within, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_snapshots_refuse_a_forged_delta_and_a_stale_proxy_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let private = d.join("snapshot-signing.key");
    let public = d.join("snapshot-signing.pub");
    let out = output_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_flex")).args([
            "keygen",
            "snapshot-signing",
            "--snapshot-signing-key-file",
            p(&private),
            "--snapshot-public-key-file",
            p(&public),
        ]),
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let public_hex = std::fs::read_to_string(&public).unwrap();
    assert_eq!(public_hex.trim().len(), 64);
    assert!(
        !String::from_utf8_lossy(&out.stdout)
            .contains(std::fs::read_to_string(&private).unwrap().trim()),
        "the private key is never printed"
    );
    let master = d.join("master.key");
    std::fs::write(&master, format!("{}\n", "ab".repeat(32))).unwrap();

    let nats = Nats::start().await;
    let control_port = free_port();
    let control_url = format!("http://127.0.0.1:{control_port}");
    let db = format!("sqlite://{}?mode=rwc", p(&d.join("flex.db")));
    let listen = format!("127.0.0.1:{control_port}");
    let nats_url = nats.url();
    let mut control = Some(flex(
        "control",
        &[
            "control",
            "--database-url",
            &db,
            "--listen",
            &listen,
            "--admin-token",
            TOKEN,
            "--master-key-file",
            p(&master),
            "--nats-url",
            &nats_url,
            "--snapshot-signing-key-file",
            p(&private),
            "--snapshot-heartbeat-secs",
            "1",
        ],
        &d.join("control.log"),
    ));
    infra::wait_listening(control_port, "flex control", Duration::from_secs(30));
    let admin = |args: &[&str]| -> Value {
        let out = output_with_stdin(
            Command::new(env!("CARGO_BIN_EXE_flex"))
                .env_clear()
                .args([
                    "admin",
                    "--endpoint",
                    &control_url,
                    "--token",
                    TOKEN,
                    "--json",
                ])
                .args(args),
            None,
        );
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let org = admin(&["org", "create", "acme"])["org_id"]
        .as_str()
        .unwrap()
        .to_string();
    let created = admin(&["key", "create", "--org", &org]);
    let key = created["api_key"].as_str().unwrap().to_string();
    let key_id = created["key_id"].as_str().unwrap().to_string();

    let mut proxies = Vec::new();
    for (name, transport, url) in [
        ("nats-proxy", "--nats-url", nats_url.as_str()),
        ("grpc-proxy", "--control-url", control_url.as_str()),
    ] {
        let port = free_port();
        let metrics = free_port();
        let state = d.join(format!("{name}-state"));
        let proc = flex(
            name,
            &[
                "proxy",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--metrics-listen",
                &format!("127.0.0.1:{metrics}"),
                "--state-dir",
                p(&state),
                "--master-key-file",
                p(&master),
                "--proxy-id",
                name,
                transport,
                url,
                "--snapshot-public-key-file",
                p(&public),
                "--max-snapshot-age-secs",
                "4",
            ],
            &d.join(format!("{name}.log")),
        );
        proxies.push((format!("http://127.0.0.1:{port}"), metrics, proc));
    }
    for (base, _, proc) in &proxies {
        let models = format!("{base}/v1/models");
        let key = key.clone();
        wait_for("the key accepted", Duration::from_secs(30), async || {
            get(&models, Some(&key)).await.0 == 200
        })
        .await;
        assert_eq!(get(&format!("{base}/readyz"), None).await.0, 200);
        assert!(
            proc.log_text().contains("accepting only snapshots signed"),
            "{}",
            proc.log_tail()
        );
    }

    // Forge a delta on the NATS snapshot subject: the next version, the attacker's key added,
    // the content hash right for the result; unsigned, then with a made-up signature.
    let (nats_base, nats_metrics, nats_proc) = &proxies[0];
    let metrics_url = format!("http://127.0.0.1:{nats_metrics}/metrics");
    let metric = async |name: &str| -> u64 {
        let (_, text) = get(&metrics_url, None).await;
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    let version = metric("flex_snapshot_version").await;
    assert!(version > 0);
    let attacker_key = flex_shared::keys::generate();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // The proxy's current content, to make the forged hash right.
    let snapshot_file = d.join("nats-proxy-state").join("snapshot.pb");
    wait_for(
        "the snapshot persisted",
        Duration::from_secs(10),
        async || {
            std::fs::read(&snapshot_file)
                .ok()
                .and_then(|b| flex_shared::proto::control::Snapshot::decode(b.as_slice()).ok())
                .is_some_and(|s| s.version == version)
        },
    )
    .await;
    let mut forged = flex_shared::proto::control::Snapshot::decode(
        std::fs::read(&snapshot_file).unwrap().as_slice(),
    )
    .unwrap();
    let before = forged.clone();
    forged.version = version + 1;
    forged
        .api_keys
        .push(flex_shared::proto::control::ApiKeyEntry {
            key_id: "attacker".into(),
            org_id: org.clone(),
            key_hash: flex_shared::keys::hash(&attacker_key),
            expires_at: 0,
        });
    flex_shared::snapshot::canonicalize(&mut forged);
    forged.content_hash = flex_shared::snapshot::content_hash(&forged);
    let delta = flex_shared::snapshot::diff(&before, &forged);
    let rejected_before = metric("flex_snapshot_rejected_updates").await;
    for signature in [vec![], vec![7u8; 64]] {
        let update = flex_shared::proto::control::SnapshotUpdate {
            version: version + 1,
            kind: Some(flex_shared::proto::control::snapshot_update::Kind::Delta(
                delta.clone(),
            )),
            signature,
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            flex_shared::snapshot::nats::HEADER_VERSION,
            (version + 1).to_string().as_str(),
        );
        js.publish_with_headers(
            flex_shared::snapshot::nats::DELTA_SUBJECT,
            headers,
            update.encode_to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    wait_for(
        "both forged deltas refused",
        Duration::from_secs(10),
        async || metric("flex_snapshot_rejected_updates").await >= rejected_before + 2,
    )
    .await;
    let models = format!("{nats_base}/v1/models");
    let (status, body) = get(&models, Some(&attacker_key)).await;
    assert_eq!(status, 401, "the forged key is refused: {body}");
    assert_eq!(
        get(&models, Some(&key)).await.0,
        200,
        "the last good snapshot serves"
    );
    assert_eq!(metric("flex_snapshot_version").await, version);
    let log = nats_proc.log_text();
    assert!(log.contains("unsigned snapshot update"), "{log}");
    assert!(log.contains("bad snapshot signature"), "{log}");

    // Idle for longer than the maximum age: the heartbeats keep both proxies fresh.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for (base, _, proc) in &proxies {
        assert_eq!(
            get(&format!("{base}/v1/models"), Some(&key)).await.0,
            200,
            "{}",
            proc.log_tail()
        );
    }
    // A change still arrives, signed, over both transports.
    admin(&["key", "revoke", &key_id]);
    for (base, _, _) in &proxies {
        let models = format!("{base}/v1/models");
        let key = key.clone();
        wait_for("the revocation", Duration::from_secs(10), async || {
            get(&models, Some(&key)).await.0 == 401
        })
        .await;
    }
    let key2 = admin(&["key", "create", "--org", &org])["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    for (base, _, _) in &proxies {
        let models = format!("{base}/v1/models");
        let key2 = key2.clone();
        wait_for("the new key", Duration::from_secs(10), async || {
            get(&models, Some(&key2)).await.0 == 200
        })
        .await;
    }

    // The control plane gone: past the maximum age, 503 snapshot_too_old and /readyz 503.
    control.take().unwrap().kill();
    for (base, _, proc) in &proxies {
        let readyz = format!("{base}/readyz");
        wait_for("/readyz 503", Duration::from_secs(15), async || {
            get(&readyz, None).await.0 == 503
        })
        .await;
        let (_, text) = get(&readyz, None).await;
        assert!(text.contains("snapshot_too_old"), "{text}");
        let (status, body) = get(&format!("{base}/v1/models"), Some(&key2)).await;
        assert_eq!(status, 503, "{body}\n{}", proc.log_tail());
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "snapshot_too_old", "{body}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("has not heard from the control plane since"),
            "{message}"
        );
    }
    drop(proxies);
}
