//! The fleet as separate processes, secured end to end: one `flex control` on a fresh Postgres
//! database serving gRPC over mTLS (`--tls-cert/--tls-key/--client-ca`), a private `nats-server`
//! that speaks only TLS and requires client certificates, the provider simulator, and three
//! `flex proxy` processes, each with its own `--state-dir` and port: two following the NATS
//! snapshot stream (`--nats-ca/--nats-cert/--nats-key`) and one the gRPC Watch
//! (`--control-url https://… --control-ca/--control-cert/--control-key`). Operators act through
//! `flex admin --ca`. Certificates are made at test time (rcgen). Postgres and nats-server are
//! required (see `common/infra.rs`); the test never skips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/infra.rs"]
mod infra;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use infra::{free_port, output_with_stdin, request, Nats, Pg, Pki, Proc};
use serde_json::{json, Value};

const TOKEN: &str = "fleet-admin-token";
const OPENAI_KEY: &str = "sk-sim-fleet-processes-0000";

/// `flex ARGS` with only `FLEX_LOG` in its environment, its output in `log`.
fn spawn_flex(name: &str, args: &[String], log: PathBuf) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flex"));
    cmd.env_clear()
        .env("FLEX_LOG", "warn,flex=info,flex_data_plane=info")
        .args(args);
    Proc::spawn(name, cmd, log)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Nats,
    Grpc,
}

struct ProxySpec {
    id: String,
    transport: Transport,
    port: u16,
    /// `--metrics-listen`.
    metrics_port: u16,
    state_dir: PathBuf,
    /// (cert, key) for NATS or the control plane, per transport; None: no client certificate.
    identity: Option<(PathBuf, PathBuf)>,
}

impl ProxySpec {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

struct Fleet {
    dir: tempfile::TempDir,
    pki: Pki,
    pg: Option<Pg>,
    nats: Nats,
    sim: flex::sim::SimHandle,
    master_key: PathBuf,
    control_port: u16,
    control: Option<Proc>,
    control_identity: (PathBuf, PathBuf),
    server_identity: (PathBuf, PathBuf),
    specs: Vec<ProxySpec>,
    proxies: Vec<Proc>,
    org_id: String,
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

impl Fleet {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(&dir.path().join("pki"), "fleet");
        let nats = Nats::start_tls(&pki).await;
        let pg = Pg::new().await;
        let sim = flex::sim::spawn(flex::sim::SimConfig {
            openai_key: Some(OPENAI_KEY.into()),
            flex_delay_ms: 0,
            standard_delay_ms: 5,
            ..flex::sim::SimConfig::default()
        })
        .await
        .unwrap();
        let master_key = dir.path().join("master.key");
        std::fs::write(
            &master_key,
            flex_shared::crypto::MasterKeyring::generate_file_text(),
        )
        .unwrap();
        let control_identity = pki.client("control-plane");
        let server_identity = pki.server("control");
        let control_port = free_port();
        let mut specs = Vec::new();
        for (id, transport) in [
            ("nats-1", Transport::Nats),
            ("nats-2", Transport::Nats),
            ("grpc-1", Transport::Grpc),
        ] {
            specs.push(ProxySpec {
                id: id.to_string(),
                transport,
                port: free_port(),
                metrics_port: free_port(),
                state_dir: dir.path().join(id),
                identity: Some(pki.client(id)),
            });
        }
        let mut fleet = Self {
            dir,
            pki,
            pg: Some(pg),
            nats,
            sim,
            master_key,
            control_port,
            control: None,
            control_identity,
            server_identity,
            specs,
            proxies: Vec::new(),
            org_id: String::new(),
        };
        fleet.start_control().await;
        fleet.org_id = fleet.admin(&["org", "create", "fleet"], None)["org_id"]
            .as_str()
            .unwrap()
            .to_string();
        let org = fleet.org_id.clone();
        fleet.admin(
            &["provider-key", "set", "--org", &org, "--provider", "openai"],
            Some(OPENAI_KEY),
        );
        for i in 0..fleet.specs.len() {
            let p = fleet.spawn_proxy(i);
            fleet.proxies.push(p);
        }
        for i in 0..fleet.specs.len() {
            fleet.wait_ready(i, Duration::from_secs(20)).await;
        }
        fleet
    }

    fn control_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.control_port)
    }

    /// Starts `flex control` (again) on the same port and database, and waits for its admin API.
    async fn start_control(&mut self) {
        let pg = self.pg.as_ref().unwrap();
        let args: Vec<String> = vec![
            "control".into(),
            "--database-url".into(),
            pg.url(),
            "--nats-url".into(),
            self.nats.url(),
            "--nats-ca".into(),
            s(&self.pki.ca_path()),
            "--nats-cert".into(),
            s(&self.control_identity.0),
            "--nats-key".into(),
            s(&self.control_identity.1),
            "--listen".into(),
            format!("127.0.0.1:{}", self.control_port),
            "--admin-token".into(),
            TOKEN.into(),
            "--master-key-file".into(),
            s(&self.master_key),
            "--tls-cert".into(),
            s(&self.server_identity.0),
            "--tls-key".into(),
            s(&self.server_identity.1),
            "--client-ca".into(),
            s(&self.pki.ca_path()),
        ];
        self.stop_control();
        self.control = Some(spawn_flex(
            "control",
            &args,
            self.dir.path().join("control.log"),
        ));
        let t0 = Instant::now();
        loop {
            let out = self.admin_raw(&["org", "list"], None);
            if out.status.success() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the control plane did not answer: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.control_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL to the control plane.
    fn stop_control(&mut self) {
        if let Some(mut c) = self.control.take() {
            c.kill();
        }
    }

    fn control_log(&self) -> String {
        self.control
            .as_ref()
            .map(Proc::log_tail)
            .unwrap_or_default()
    }

    fn admin_raw(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        output_with_stdin(
            Command::new(env!("CARGO_BIN_EXE_flex"))
                .env_clear()
                .arg("admin")
                .args(["--endpoint", &self.control_url(), "--ca"])
                .arg(self.pki.ca_path())
                .args(["--token", TOKEN, "--json"])
                .args(args),
            stdin,
        )
    }

    /// `flex admin … --json ARGS`, which must succeed.
    fn admin(&self, args: &[&str], stdin: Option<&str>) -> Value {
        let out = self.admin_raw(args, stdin);
        assert!(
            out.status.success(),
            "flex admin {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.control_log()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn spawn_proxy(&self, i: usize) -> Proc {
        self.spawn(&self.specs[i])
    }

    fn spawn(&self, spec: &ProxySpec) -> Proc {
        let mut args: Vec<String> = vec![
            "proxy".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", spec.port),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", spec.metrics_port),
            "--state-dir".into(),
            s(&spec.state_dir),
            "--master-key-file".into(),
            s(&self.master_key),
            "--proxy-id".into(),
            spec.id.clone(),
            "--openai-base-url".into(),
            self.sim.openai_base_url(),
        ];
        let (url_flag, url, ca, cert, key) = match spec.transport {
            Transport::Nats => (
                "--nats-url",
                self.nats.url(),
                "--nats-ca",
                "--nats-cert",
                "--nats-key",
            ),
            Transport::Grpc => (
                "--control-url",
                self.control_url(),
                "--control-ca",
                "--control-cert",
                "--control-key",
            ),
        };
        args.extend([url_flag.into(), url, ca.into(), s(&self.pki.ca_path())]);
        if let Some((c, k)) = &spec.identity {
            args.extend([cert.into(), s(c), key.into(), s(k)]);
        }
        spawn_flex(
            &spec.id,
            &args,
            self.dir.path().join(format!("{}.log", spec.id)),
        )
    }

    async fn restart_proxy(&mut self, i: usize) {
        // The snapshot is persisted by a background thread after each update: wait for it, so
        // the restart tests the warm start, not the race with that write.
        let t0 = Instant::now();
        loop {
            let m = self.metrics(i).await;
            if m["flex_snapshot_persisted_version"] == m["flex_snapshot_version"] {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{}: snapshot not persisted: {m:?}",
                self.specs[i].id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.proxies[i].kill();
        self.proxies[i] = self.spawn_proxy(i);
    }

    async fn wait_ready(&self, i: usize, within: Duration) {
        let base = self.specs[i].base();
        let t0 = Instant::now();
        loop {
            if let Ok((200, _)) = get(&format!("{base}/readyz"), None).await {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "{} not ready after {within:?}\n{}",
                self.specs[i].id,
                self.proxies[i].log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn create_key(&self) -> (String, String) {
        let v = self.admin(&["key", "create", "--org", &self.org_id], None);
        (
            v["key_id"].as_str().unwrap().to_string(),
            v["api_key"].as_str().unwrap().to_string(),
        )
    }

    fn revoke(&self, key_id: &str) {
        self.admin(&["key", "revoke", key_id, "--reason", "test"], None);
    }

    /// Polls every proxy until `key` gets `want` on `/v1/models`.
    async fn until_all(&self, key: &str, want: u16, within: Duration, what: &str) {
        for (i, spec) in self.specs.iter().enumerate() {
            let t0 = Instant::now();
            loop {
                let got = get(&format!("{}/v1/models", spec.base()), Some(key)).await;
                if matches!(got, Ok((status, _)) if status == want) {
                    eprintln!(
                        "{} ({:?}): {what} after {:?}",
                        spec.id,
                        spec.transport,
                        t0.elapsed()
                    );
                    break;
                }
                assert!(
                    t0.elapsed() < within,
                    "{}: {what}: key answers {got:?}, wanted {want}\n{}",
                    spec.id,
                    self.proxies[i].log_tail()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    async fn assert_all(&self, key: &str, want: u16) {
        for (i, spec) in self.specs.iter().enumerate() {
            let got = get(&format!("{}/v1/models", spec.base()), Some(key))
                .await
                .map(|r| r.0);
            assert_eq!(
                got.ok(),
                Some(want),
                "{}: wanted {want}\n{}",
                spec.id,
                self.proxies[i].log_tail()
            );
        }
    }

    async fn metrics(&self, i: usize) -> HashMap<String, f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.specs[i].metrics_port);
        let (status, body) = get(&url, None).await.unwrap();
        assert_eq!(status, 200);
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    /// Waits until metric `name` of proxy `i` satisfies `ok`.
    async fn until_metric(
        &self,
        i: usize,
        name: &str,
        ok: impl Fn(f64) -> bool,
        within: Duration,
    ) -> f64 {
        let t0 = Instant::now();
        loop {
            let v = self.metrics(i).await.get(name).copied().unwrap_or(-1.0);
            if ok(v) {
                return v;
            }
            assert!(
                t0.elapsed() < within,
                "{}: {name} = {v} after {within:?}\n{}",
                self.specs[i].id,
                self.proxies[i].log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(mut self) {
        for p in &mut self.proxies {
            p.kill();
        }
        self.stop_control();
        if let Some(pg) = self.pg.take() {
            pg.drop_db().await;
        }
    }
}

async fn get(url: &str, key: Option<&str>) -> Result<(u16, String), String> {
    request(http::Method::GET, url, key, None).await
}

/// A chat completion through proxy `base` to the simulator (the provider key comes from the
/// snapshot, decrypted with the master key file).
async fn chat(base: &str, key: &str) -> (u16, String) {
    request(
        http::Method::POST,
        &format!("{base}/v1/chat/completions"),
        Some(key),
        Some(json!({"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}], "start_within": "default"})),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_proxy_processes_enforce_keys_and_survive_control_plane_proxy_and_nats_restarts() {
    let mut fleet = Fleet::start().await;
    let within = Duration::from_secs(5);

    // A new key is enforced by all three, and requests go through to the provider.
    let (revoked_id, revoked) = fleet.create_key();
    let (_, kept) = fleet.create_key();
    fleet
        .until_all(&revoked, 200, within, "new key accepted")
        .await;
    fleet
        .until_all(&kept, 200, within, "new key accepted")
        .await;
    for (i, spec) in fleet.specs.iter().enumerate() {
        let (status, body) = chat(&spec.base(), &kept).await;
        assert_eq!(
            status,
            200,
            "{}: {body}\n{}",
            spec.id,
            fleet.proxies[i].log_tail()
        );
    }
    // A revocation is enforced by all three.
    fleet.revoke(&revoked_id);
    fleet
        .until_all(&revoked, 401, within, "revocation enforced")
        .await;

    // `flex admin proxies` lists all three at the control plane's version.
    let t0 = Instant::now();
    loop {
        let v = fleet.admin(&["proxies"], None);
        let current = v["current_version"].as_u64().unwrap();
        let proxies = v["proxies"].as_array().unwrap().clone();
        let ok = ["nats-1", "nats-2", "grpc-1"].iter().all(|id| {
            proxies.iter().any(|p| {
                p["proxy_id"] == *id && p["connected"] == true && p["applied_version"] == current
            })
        });
        if ok {
            break;
        }
        assert!(
            t0.elapsed() < within,
            "proxies not listed at version {current}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A proxy without a client certificate cannot watch: it never becomes ready, and says why.
    let intruder = ProxySpec {
        id: "intruder".into(),
        transport: Transport::Grpc,
        port: free_port(),
        metrics_port: free_port(),
        state_dir: fleet.dir.path().join("intruder"),
        identity: None,
    };
    let p = fleet.spawn(&intruder);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = get(&format!("{}/readyz", intruder.base()), None).await;
    assert_eq!(ready.map(|r| r.0).ok(), Some(503), "{}", p.log_tail());
    assert!(p.log_tail().contains("--control-cert"), "{}", p.log_tail());
    drop(p);
    let listed = fleet.admin(&["proxies"], None).to_string();
    assert!(!listed.contains("intruder"), "{listed}");

    // The control plane is killed: every proxy keeps serving what it has, requests included.
    let versions: Vec<f64> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(fleet.metrics(i).await["flex_snapshot_version"]);
        }
        v
    };
    fleet.stop_control();
    fleet
        .until_metric(2, "flex_control_plane_connected", |v| v == 0.0, within)
        .await;
    fleet.assert_all(&kept, 200).await;
    fleet.assert_all(&revoked, 401).await;
    for spec in &fleet.specs {
        assert_eq!(chat(&spec.base(), &kept).await.0, 200, "{}", spec.id);
    }

    // A proxy restarted while the control plane is down serves from its persisted snapshot:
    // one of each transport.
    for i in [0, 2] {
        fleet.restart_proxy(i).await;
        fleet.wait_ready(i, within).await;
        let m = fleet.metrics(i).await;
        assert_eq!(
            m["flex_snapshot_version"], versions[i],
            "{}",
            fleet.specs[i].id
        );
        let base = fleet.specs[i].base();
        assert_eq!(
            get(&format!("{base}/v1/models"), Some(&kept))
                .await
                .unwrap()
                .0,
            200
        );
        assert_eq!(
            get(&format!("{base}/v1/models"), Some(&revoked))
                .await
                .unwrap()
                .0,
            401
        );
        assert_eq!(chat(&base, &kept).await.0, 200);
    }
    // The restarted NATS proxy resumed from its recorded position: following again, no full.
    fleet
        .until_metric(0, "flex_control_plane_connected", |v| v == 1.0, within)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fleet.metrics(0).await["flex_snapshot_full_applied_total"],
        0.0
    );

    // The control plane comes back: the gRPC proxy reconnects, new keys reach everyone.
    fleet.start_control().await;
    let (key3_id, key3) = fleet.create_key();
    fleet
        .until_all(
            &key3,
            200,
            Duration::from_secs(15),
            "key after control plane restart",
        )
        .await;

    // NATS restarts: the NATS proxies resume from their revision, with deltas and no full.
    let mut before = Vec::new();
    for i in [0, 1] {
        let m = fleet.metrics(i).await;
        before.push((
            m["flex_snapshot_full_applied_total"],
            m["flex_snapshot_deltas_applied_total"],
        ));
    }
    fleet.nats.stop();
    for i in [0, 1] {
        fleet
            .until_metric(
                i,
                "flex_control_plane_connected",
                |v| v == 0.0,
                Duration::from_secs(10),
            )
            .await;
    }
    fleet.assert_all(&key3, 200).await;
    fleet.nats.restart().await;
    for i in [0, 1] {
        fleet
            .until_metric(
                i,
                "flex_control_plane_connected",
                |v| v == 1.0,
                Duration::from_secs(20),
            )
            .await;
    }
    fleet.revoke(&key3_id);
    fleet
        .until_all(
            &key3,
            401,
            Duration::from_secs(15),
            "revocation after NATS restart",
        )
        .await;
    for (n, i) in [0usize, 1].into_iter().enumerate() {
        let (full, deltas) = before[n];
        fleet
            .until_metric(
                i,
                "flex_snapshot_deltas_applied_total",
                |v| v > deltas,
                within,
            )
            .await;
        assert_eq!(
            fleet.metrics(i).await["flex_snapshot_full_applied_total"],
            full,
            "{}: resumed without a full resync",
            fleet.specs[i].id
        );
    }
    fleet.assert_all(&kept, 200).await;
    fleet.finish().await;
}
