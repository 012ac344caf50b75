#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The fault test of issue 7 with real processes: a `flex control` process on a fresh Postgres
//! database, a private `nats-server` (JetStream), two `flex proxy` processes (each with its own
//! state dir, so each has a durable usage log) and the provider simulator. N requests (Responses
//! and Chat, streaming and not, direct and raced, passthrough and translated) go to both proxies
//! while NATS hangs (SIGSTOP: nothing acknowledged, connections open), one proxy is SIGKILLed
//! mid-load (so its log holds events of answered requests that never reached NATS) and restarted
//! on the same state dir, NATS is SIGKILLed and restarted, and the control plane is SIGKILLed and
//! restarted. A request whose proxy died is retried on the other one (a new request id).
//!
//! Then: every answer the client received completely has its row in the ledger (no loss), with
//! the tokens the client saw; no request id is counted twice; every answer cut off by the kill
//! after its headers came (a provider had started it) has exactly one row too: its complete event
//! if that was durable before the kill, else an `interrupted` one (no tokens) that the restarted
//! proxy recorded from its in-flight journal; the only other rows are of attempts cut off before
//! their headers came (no more than the attempts that failed); and the ledger totals
//! (tokens, cost, standard cost) equal the sum of the events the proxies published to
//! `FLEX_USAGE`.
//!
//! Needs `nats-server` (PATH, /usr/sbin, or `FLEX_TEST_NATS_SERVER`) and Postgres
//! (`FLEX_TEST_POSTGRES_URL`, default postgres://postgres@127.0.0.1:5432); never skips.

#[path = "common/infra.rs"]
mod infra;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flex::sim::{self, SimConfig};
use flex_shared::crypto::MasterKeyring;
use flex_shared::usage::{UsageEvent, NATS_STREAM};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use infra::{
    admin_json_of, free_port, nats_server_binary, output_with_stdin, wait_listening, Pg, Proc,
};
use serde_json::{json, Value};
use sqlx::PgPool;

const OPENAI_KEY: &str = "sk-sim-openai-fault-000000";
const GEMINI_KEY: &str = "AIza-sim-fault-000000";
const ADMIN_TOKEN: &str = "fault-test-admin-token";
/// Logical requests; each completes exactly once (retried on the other proxy if its proxy dies).
const N: usize = 300;
const WORKERS: usize = 6;

// ----- fixtures -------------------------------------------------------------------------------

/// `program ARGS` with `FLEX_LOG` set, its output in `LOGS/NAME.log` (the log's tail is printed
/// if the test panics).
fn spawn(name: &str, program: &Path, args: &[String], logs: &Path) -> Proc {
    let mut cmd = Command::new(program);
    cmd.args(args).env("FLEX_LOG", "warn,flex=info");
    Proc::spawn(name, cmd, logs.join(format!("{name}.log"))).tail_on_panic(60)
}

/// Everything the processes need to be started (and started again).
struct Cluster {
    flex: PathBuf,
    logs: PathBuf,
    /// Usage and snapshots over NATS; without it, over the control plane's gRPC only.
    use_nats: bool,
    nats_port: u16,
    nats_dir: PathBuf,
    cp_port: u16,
    db_url: String,
    key_file: PathBuf,
    openai_url: String,
    gemini_url: String,
}

impl Cluster {
    fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.nats_port)
    }

    fn control_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.cp_port)
    }

    fn start_nats(&self) -> Proc {
        let p = spawn(
            "nats-server",
            &nats_server_binary(),
            &[
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                self.nats_port.to_string(),
                "-c".into(),
                infra::write_nats_config(
                    &self.nats_dir.with_extension("conf"),
                    &self.nats_dir,
                    "16GB",
                    "",
                )
                .display()
                .to_string(),
            ],
            &self.logs,
        );
        wait_listening(self.nats_port, "nats-server", Duration::from_secs(10));
        p
    }

    fn nats_args(&self) -> Vec<String> {
        if self.use_nats {
            vec!["--nats-url".into(), self.nats_url()]
        } else {
            Vec::new()
        }
    }

    fn start_control(&self) -> Proc {
        let mut args: Vec<String> = vec![
            "control".into(),
            "--database-url".into(),
            self.db_url.clone(),
            "--admin-token".into(),
            ADMIN_TOKEN.into(),
            "--master-key-file".into(),
            self.key_file.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.cp_port),
        ];
        args.extend(self.nats_args());
        let p = spawn("flex-control", &self.flex, &args, &self.logs);
        wait_listening(self.cp_port, "flex control", Duration::from_secs(60));
        p
    }

    fn start_proxy(&self, i: usize, port: u16, state_dir: &Path) -> Proc {
        // Generous, so that "answered ⇒ durable" holds on a loaded machine too (the default is
        // 200 ms; a timeout is counted in /metrics, checked below).
        self.start_proxy_waiting(i, port, state_dir, 5000, &[])
    }

    /// A proxy whose answers wait at most `durable_wait_ms` for their usage event, with `extra`
    /// flags.
    fn start_proxy_waiting(
        &self,
        i: usize,
        port: u16,
        state_dir: &Path,
        durable_wait_ms: u64,
        extra: &[&str],
    ) -> Proc {
        let mut args: Vec<String> = vec![
            "proxy".into(),
            "--control-url".into(),
            self.control_url(),
            "--master-key-file".into(),
            self.key_file.display().to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--proxy-id".into(),
            format!("fault-proxy-{i}"),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--openai-base-url".into(),
            self.openai_url.clone(),
            "--gemini-base-url".into(),
            self.gemini_url.clone(),
            "--usage-durable-wait-ms".into(),
            durable_wait_ms.to_string(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", metrics_port(port)),
        ];
        args.extend(self.nats_args());
        args.extend(extra.iter().map(|a| a.to_string()));
        spawn(&format!("flex-proxy-{i}"), &self.flex, &args, &self.logs)
    }

    /// Waits (60 s at most) until `flex admin usage --org ORG` shows `expected` (requests,
    /// input tokens, output tokens), never more requests than that on the way.
    async fn until_usage(&self, org_id: &str, expected: (usize, i64, i64), what: &str) {
        let t0 = Instant::now();
        loop {
            let u = self.admin(&["usage", "--org", org_id], None);
            let got = (
                u["requests"].as_u64().unwrap() as usize,
                u["input_tokens"].as_i64().unwrap(),
                u["output_tokens"].as_i64().unwrap(),
            );
            if got == expected {
                return;
            }
            assert!(
                got.0 <= expected.0 && t0.elapsed() < Duration::from_secs(60),
                "ledger {got:?}, {what} {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `flex admin --json …` against the control plane process.
    fn admin(&self, args: &[&str], stdin: Option<&str>) -> Value {
        let out = output_with_stdin(
            Command::new(&self.flex)
                .args([
                    "admin",
                    "--endpoint",
                    &self.control_url(),
                    "--token",
                    ADMIN_TOKEN,
                    "--json",
                ])
                .args(args),
            stdin,
        );
        admin_json_of(&out, args)
    }
}

async fn http_get(url: &str) -> Option<(u16, String)> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn wait_ready(port: u16, within: Duration) {
    let t0 = Instant::now();
    loop {
        if let Some((200, _)) = http_get(&format!("http://127.0.0.1:{port}/readyz")).await {
            return;
        }
        assert!(t0.elapsed() < within, "proxy on {port} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `--metrics-listen` port of the proxy on API port `port` (the same across its restarts).
fn metrics_port(port: u16) -> u16 {
    static PORTS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u16, u16>>> =
        std::sync::LazyLock::new(Default::default);
    *PORTS.lock().unwrap().entry(port).or_insert_with(free_port)
}

/// A `/metrics` value of a proxy (the first sample line starting with `name`), as a whole
/// number: counters and gauges print as `3` or `3.0`.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.fract() == 0.0 && *v >= 0.0)
        .map(|v| v as u64)
}

// ----- traffic --------------------------------------------------------------------------------

/// One logical request of the load.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Responses → OpenAI (passthrough), non-streaming, `default`.
    ResponsesBody,
    /// Responses → OpenAI (passthrough), streaming, raced.
    ResponsesStream,
    /// Chat → Gemini (translated), streaming with usage, raced.
    ChatGeminiStream,
    /// Chat → Gemini (translated), non-streaming, `default`.
    ChatGeminiBody,
}

impl Kind {
    fn of(i: usize) -> Self {
        match i % 4 {
            0 => Self::ResponsesBody,
            1 => Self::ResponsesStream,
            2 => Self::ChatGeminiStream,
            _ => Self::ChatGeminiBody,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::ResponsesBody | Self::ResponsesStream => "/v1/responses",
            Self::ChatGeminiStream | Self::ChatGeminiBody => "/v1/chat/completions",
        }
    }

    fn body(self, i: usize) -> Value {
        // Streams take ~50–250 ms (so a kill cuts some), bodies vary in size.
        let prompt = format!(
            "{} #sim output_tokens={} tokens_per_sec=200",
            "word ".repeat(1 + i % 13),
            10 + i % 40
        );
        match self {
            Self::ResponsesBody => {
                json!({"model": "gpt-5.5", "input": prompt, "start_within": "default"})
            }
            Self::ResponsesStream => json!({"model": "gpt-5.5", "input": prompt,
                "start_within": "00h-00m-10s", "stream": true}),
            Self::ChatGeminiStream => json!({"model": "gemini-3.5-flash",
                "messages": [{"role": "user", "content": prompt}], "start_within": "00h-00m-10s",
                "stream": true, "stream_options": {"include_usage": true}}),
            Self::ChatGeminiBody => json!({"model": "gemini-3.5-flash",
                "messages": [{"role": "user", "content": prompt}], "start_within": "default"}),
        }
    }

    /// The (input, output) tokens of a complete answer, or `None` if it is not complete.
    fn usage(self, body: &[u8]) -> Option<(i64, i64)> {
        let text = String::from_utf8_lossy(body);
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        let tokens = |u: &Value, i: &str, o: &str| Some((u[i].as_i64()?, u[o].as_i64()?));
        match self {
            Self::ResponsesBody => {
                let v: Value = serde_json::from_slice(body).ok()?;
                tokens(&v["usage"], "input_tokens", "output_tokens")
            }
            Self::ChatGeminiBody => {
                let v: Value = serde_json::from_slice(body).ok()?;
                tokens(&v["usage"], "prompt_tokens", "completion_tokens")
            }
            Self::ResponsesStream => data.iter().find_map(|d| {
                let v: Value = serde_json::from_str(d).ok()?;
                (v["type"] == "response.completed")
                    .then(|| tokens(&v["response"]["usage"], "input_tokens", "output_tokens"))?
            }),
            Self::ChatGeminiStream => {
                if data.last() != Some(&"[DONE]") {
                    return None;
                }
                data.iter().rev().find_map(|d| {
                    let v: Value = serde_json::from_str(d).ok()?;
                    tokens(&v["usage"], "prompt_tokens", "completion_tokens")
                })
            }
        }
    }
}

/// What the client saw.
#[derive(Default)]
struct Seen {
    /// Request id → (input, output) tokens of every answer received completely.
    completed: HashMap<String, (i64, i64)>,
    /// Request ids of answers whose headers came but whose body was cut off.
    cut_off: HashSet<String>,
    /// Attempts that failed (connection refused or cut off) and were retried.
    retries: usize,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

enum Attempt {
    /// The whole answer arrived (the body ended cleanly).
    Complete {
        id: String,
        status: u16,
        body: Bytes,
    },
    /// Refused, or cut off (with the request id if the headers came).
    CutOff(Option<String>),
}

async fn attempt(
    client: &HttpClient,
    port: u16,
    kind: Kind,
    body: &Value,
    api_key: &str,
) -> Attempt {
    let req = http::Request::post(format!("http://127.0.0.1:{port}{}", kind.path()))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {api_key}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = match tokio::time::timeout(Duration::from_secs(30), client.request(req)).await {
        Ok(Ok(r)) => r,
        _ => return Attempt::CutOff(None),
    };
    let id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let status = resp.status().as_u16();
    let bytes =
        match tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            _ => return Attempt::CutOff(id),
        };
    Attempt::Complete {
        id: id.unwrap_or_default(),
        status,
        body: bytes,
    }
}

/// A control plane on SQLite (a `flex control` process), the simulator, and an org with an API
/// key and an OpenAI provider key: where the single-proxy tests start.
struct SqliteSetup {
    sim: sim::SimHandle,
    cluster: Cluster,
    control: Proc,
    org_id: String,
    api_key: String,
}

async fn sqlite_setup(tmp: &Path, sim_delay_ms: u64) -> SqliteSetup {
    let logs = tmp.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let key_file = tmp.join("master.key");
    std::fs::write(&key_file, MasterKeyring::generate_file_text()).unwrap();
    let sim = sim::spawn(SimConfig {
        openai_key: Some(OPENAI_KEY.into()),
        gemini_key: Some(GEMINI_KEY.into()),
        flex_delay_ms: sim_delay_ms,
        standard_delay_ms: sim_delay_ms,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let cluster = Cluster {
        flex: PathBuf::from(env!("CARGO_BIN_EXE_flex")),
        logs,
        use_nats: false,
        nats_port: 0,
        nats_dir: tmp.join("unused"),
        cp_port: free_port(),
        db_url: format!("sqlite://{}?mode=rwc", tmp.join("flex.db").display()),
        key_file,
        openai_url: sim.openai_base_url(),
        gemini_url: sim.base_url(),
    };
    let control = cluster.start_control();
    let org_id = cluster.admin(&["org", "create", "acme"], None)["org_id"]
        .as_str()
        .unwrap()
        .to_string();
    let api_key = cluster.admin(&["key", "create", "--org", &org_id, "--name", "k"], None)
        ["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    cluster.admin(
        &[
            "provider-key",
            "set",
            "--org",
            &org_id,
            "--provider",
            "openai",
        ],
        Some(OPENAI_KEY),
    );
    SqliteSetup {
        sim,
        cluster,
        control,
        org_id,
        api_key,
    }
}

/// Waits (at most 30 s) until the proxy on `port` answers a request whole: its snapshot has the
/// key and the provider key.
async fn until_served(client: &HttpClient, port: u16, api_key: &str) {
    let t0 = Instant::now();
    while !matches!(
        attempt(
            client,
            port,
            Kind::ResponsesBody,
            &Kind::ResponsesBody.body(0),
            api_key
        )
        .await,
        Attempt::Complete { status: 200, .. }
    ) {
        assert!(t0.elapsed() < Duration::from_secs(30), "never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ----- the test -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_usage_is_lost_or_double_counted_when_nats_the_control_plane_and_a_proxy_are_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let key_file = tmp.path().join("master.key");
    std::fs::write(&key_file, MasterKeyring::generate_file_text()).unwrap();
    let pg = Pg::new().await;
    let sim = sim::spawn(SimConfig {
        openai_key: Some(OPENAI_KEY.into()),
        gemini_key: Some(GEMINI_KEY.into()),
        flex_delay_ms: 10,
        standard_delay_ms: 10,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let cluster = Arc::new(Cluster {
        flex: PathBuf::from(env!("CARGO_BIN_EXE_flex")),
        logs: logs.clone(),
        use_nats: true,
        nats_port: free_port(),
        nats_dir: tmp.path().join("nats"),
        cp_port: free_port(),
        db_url: pg.url(),
        key_file,
        openai_url: sim.openai_base_url(),
        gemini_url: sim.base_url(),
    });

    let mut nats = cluster.start_nats();
    let mut control = cluster.start_control();
    let org_id = cluster.admin(&["org", "create", "acme"], None)["org_id"]
        .as_str()
        .unwrap()
        .to_string();
    let api_key = cluster.admin(&["key", "create", "--org", &org_id, "--name", "k"], None)
        ["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    for (provider, key) in [("openai", OPENAI_KEY), ("gemini", GEMINI_KEY)] {
        cluster.admin(
            &[
                "provider-key",
                "set",
                "--org",
                &org_id,
                "--provider",
                provider,
            ],
            Some(key),
        );
    }

    let ports = [free_port(), free_port()];
    let state_dirs = [tmp.path().join("proxy-0"), tmp.path().join("proxy-1")];
    let mut proxies: Vec<Proc> = (0..2)
        .map(|i| cluster.start_proxy(i, ports[i], &state_dirs[i]))
        .collect();
    for p in ports {
        wait_ready(p, Duration::from_secs(30)).await;
    }
    // Both proxies have the snapshot with the key and the provider keys before the load (these
    // probes are answered, so they are in the ledger too).
    let mut probes = HashMap::new();
    let probe_client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    for p in ports {
        let t0 = Instant::now();
        for kind in [Kind::ResponsesBody, Kind::ChatGeminiBody] {
            loop {
                let r = attempt(&probe_client, p, kind, &kind.body(0), &api_key).await;
                if let Attempt::Complete {
                    id,
                    status: 200,
                    body,
                } = r
                {
                    probes.insert(id, kind.usage(&body).unwrap());
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "proxy {p} never served"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // The load: WORKERS senders over both proxies; a failed attempt goes to the other proxy.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let seen = seen.clone();
        let api_key = api_key.clone();
        workers.push(tokio::spawn(async move {
            let client: HttpClient = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build_http();
            for i in (w..N).step_by(WORKERS) {
                let kind = Kind::of(i);
                let body = kind.body(i);
                let mut target = i % 2;
                let t0 = Instant::now();
                loop {
                    match attempt(&client, ports[target], kind, &body, &api_key).await {
                        Attempt::Complete { id, status, body } => {
                            let text = String::from_utf8_lossy(&body);
                            assert_eq!(status, 200, "{kind:?} via {}: {text}", ports[target]);
                            assert!(!id.is_empty(), "no x-request-id: {text}");
                            let usage = kind.usage(&body).unwrap_or_else(|| {
                                panic!(
                                    "{kind:?} ended cleanly but is not a complete answer: {text}"
                                )
                            });
                            let mut s = seen.lock().unwrap();
                            assert!(
                                s.completed.insert(id.clone(), usage).is_none(),
                                "request id {id} answered twice"
                            );
                            break;
                        }
                        Attempt::CutOff(id) => {
                            let mut s = seen.lock().unwrap();
                            s.retries += 1;
                            if let Some(id) = id {
                                s.cut_off.insert(id);
                            }
                        }
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(60),
                        "request {i} never completed"
                    );
                    target = 1 - target;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }

    // The faults, while the load runs.
    let sleep = |ms| tokio::time::sleep(Duration::from_millis(ms));
    sleep(1000).await;
    // A hung NATS first: connections stay open and nothing is acknowledged, so events of
    // answered requests are neither in JetStream nor (in a design that spools only when NATS is
    // unreachable) on disk; only a write-ahead log keeps them across the kill below.
    nats.freeze();
    eprintln!("fault: nats-server hung (SIGSTOP)");
    sleep(1000).await;
    // A long stream in flight on proxy 0 when it dies: cut off before its end, so its complete
    // event is never written; the in-flight journal has it, and the restarted proxy records it
    // as `interrupted`.
    let long = {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let body = json!({"model": "gpt-5.5", "start_within": "default", "stream": true,
            "input": "long #sim output_tokens=400 tokens_per_sec=40"});
        let req = http::Request::post(format!("http://127.0.0.1:{}/v1/responses", ports[0]))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {api_key}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        let mut body = resp.into_body();
        body.frame().await.unwrap().unwrap();
        (
            id,
            tokio::spawn(async move { body.collect().await.is_ok() }),
        )
    };
    proxies[0].kill();
    eprintln!("fault: proxy 0 SIGKILLed (NATS hung: its usage log holds undelivered events)");
    sleep(200).await;
    nats.kill();
    eprintln!("fault: nats-server SIGKILLed");
    sleep(800).await;
    nats = cluster.start_nats();
    eprintln!("fault: nats-server restarted");
    sleep(700).await;
    proxies[0] = cluster.start_proxy(0, ports[0], &state_dirs[0]);
    wait_ready(ports[0], Duration::from_secs(30)).await;
    eprintln!("fault: proxy 0 restarted on its state dir");
    sleep(1000).await;
    control.kill();
    eprintln!("fault: control plane SIGKILLed");
    sleep(1500).await;
    control = cluster.start_control();
    eprintln!("fault: control plane restarted");

    for w in workers {
        w.await.unwrap();
    }
    let (long_id, long_body) = long;
    assert!(
        !long_body.await.unwrap(),
        "the long stream was cut off by the kill"
    );
    let (mut completed, cut_off, retries) = {
        let s = seen.lock().unwrap();
        (s.completed.clone(), s.cut_off.clone(), s.retries)
    };
    assert_eq!(completed.len(), N, "every logical request completed once");
    completed.extend(probes);
    let answered = completed.len();
    assert!(
        retries > 0,
        "the proxy kill failed no request: the fault was not real"
    );
    assert!(
        proxies[0]
            .log_text()
            .contains("usage log holds undelivered events"),
        "the restarted proxy had nothing to replay: the fault was not real"
    );

    // Delivery finishes: both logs drained, then the ledger holds every completed answer.
    let t0 = Instant::now();
    let mut metrics = Vec::new();
    loop {
        metrics.clear();
        for p in ports {
            metrics.push(
                http_get(&format!("http://127.0.0.1:{}/metrics", metrics_port(p)))
                    .await
                    .map(|(_, m)| m)
                    .unwrap_or_default(),
            );
        }
        if metrics
            .iter()
            .all(|m| metric(m, "flex_usage_log_pending_bytes") == Some(0))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "usage logs not drained: {metrics:?}"
        );
        sleep(200).await;
    }
    for m in &metrics {
        assert_eq!(
            metric(m, "flex_usage_durable_wait_timeouts_total"),
            Some(0),
            "{m}"
        );
        assert_eq!(metric(m, "flex_usage_not_durable_total"), Some(0), "{m}");
        assert_eq!(
            metric(m, "flex_usage_log_dropped_total{reason=\"full\"}"),
            Some(0)
        );
        assert_eq!(
            metric(m, "flex_usage_log_dropped_total{reason=\"queue\"}"),
            Some(0)
        );
    }
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    type Row = (String, i64, i64, i64, i64, String);
    let ledger = |pool: PgPool| async move {
        sqlx::query_as::<_, Row>(
            "SELECT request_id, input_tokens::BIGINT, output_tokens::BIGINT, cost_micros, \
             standard_cost_micros, outcome FROM usage_ledger",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let t0 = Instant::now();
    let rows = loop {
        let rows = ledger(pool.clone()).await;
        let ids: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let started = completed
            .keys()
            .chain(&cut_off)
            .chain([&long_id])
            .filter(|id| ids.contains(id.as_str()))
            .count();
        if started == completed.len() + cut_off.len() + 1 {
            break rows;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "ledger: {} rows, {} of {} completed answers, {} of {} cut off, long stream: {}",
            rows.len(),
            completed
                .keys()
                .filter(|id| ids.contains(id.as_str()))
                .count(),
            completed.len(),
            cut_off
                .iter()
                .filter(|id| ids.contains(id.as_str()))
                .count(),
            cut_off.len(),
            ids.contains(long_id.as_str()),
        );
        sleep(200).await;
    };
    // Redeliveries (the consumer's ack wait) may still arrive; they must not add rows.
    sleep(3000).await;
    let rows_later = ledger(pool.clone()).await;
    assert_eq!(
        rows_later.len(),
        rows.len(),
        "rows appeared after the ledger was complete"
    );

    // No loss: every complete answer is in the ledger with the tokens the client saw (the
    // ledger's unique request id keeps each answer to one row).
    let by_id: HashMap<&str, &Row> = rows.iter().map(|r| (r.0.as_str(), r)).collect();
    for (id, (input, output)) in &completed {
        let r = by_id[id.as_str()];
        assert_eq!((r.1, r.2), (*input, *output), "tokens of {id}");
    }
    // No double count: the only other rows are of answers cut off by the kill (the headers
    // came, so a provider had started): each has exactly one row, either its complete event
    // (durable before the kill) or, recorded from the in-flight journal when the proxy came
    // back, an `interrupted` one with no tokens.
    let extra: Vec<&str> = by_id
        .keys()
        .copied()
        .filter(|id| !completed.contains_key(*id))
        .collect();
    // Rows of attempts cut off before their headers came (a non-streaming answer is sent whole
    // at its end): the client never saw their ids, but each is one of its failed attempts.
    let unseen: Vec<&str> = extra
        .iter()
        .copied()
        .filter(|id| !cut_off.contains(*id) && *id != long_id)
        .collect();
    assert!(
        unseen.len() <= retries,
        "{} ledger rows belong to no answer the client saw, but only {retries} attempts failed: {unseen:?}",
        unseen.len()
    );
    let interrupted = extra
        .iter()
        .filter(|id| by_id[**id].5 == "interrupted")
        .count();
    for id in &extra {
        let r = by_id[*id];
        if r.5 == "interrupted" {
            assert_eq!(
                (r.1, r.2, r.3, r.4),
                (0, 0, 0, 0),
                "an interrupted row: {r:?}"
            );
        }
    }
    let long_row = by_id[long_id.as_str()];
    assert_eq!(
        (long_row.5.as_str(), long_row.2),
        ("interrupted", 0),
        "the stream cut off mid-answer is recorded as interrupted: {long_row:?}"
    );

    // The totals are the sum of the events the proxies published.
    let client = async_nats::connect(cluster.nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(NATS_STREAM).await.unwrap();
    let info = stream.info().await.unwrap().state.clone();
    let mut events: HashMap<String, UsageEvent> = HashMap::new();
    for seq in info.first_sequence..=info.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        let e: UsageEvent = serde_json::from_slice(&m.payload).unwrap();
        if let Some(prev) = events.insert(e.request_id.clone(), e.clone()) {
            assert_eq!(prev, e, "one request id, two different events");
        }
    }
    let sum = |it: &mut dyn Iterator<Item = (i64, i64, i64, i64)>| {
        it.fold((0, 0, 0, 0), |a, b| {
            (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3)
        })
    };
    let ledger_totals = sum(&mut rows.iter().map(|r| (r.1, r.2, r.3, r.4)));
    let event_totals = sum(&mut rows.iter().map(|r| {
        let e = events
            .get(&r.0)
            .unwrap_or_else(|| panic!("ledger row {} has no event in {NATS_STREAM}", r.0));
        (
            e.input_tokens as i64,
            e.output_tokens as i64,
            e.cost_micros,
            e.standard_cost_micros,
        )
    }));
    assert_eq!(
        ledger_totals, event_totals,
        "ledger totals = the sum of the events"
    );
    assert!(ledger_totals.2 > 0, "costs were counted");
    eprintln!(
        "{N} answers completed, plus {} probes ({retries} attempts retried, {} cut off, and the \
         long stream {long_id}); ledger {} rows ({} of answers cut off: {} complete events \
         durable before the kill, {interrupted} interrupted); {} events in {NATS_STREAM} ({} \
         messages); totals (input, output, cost µ$, standard µ$) = {ledger_totals:?}",
        answered - N,
        cut_off.len(),
        rows.len(),
        extra.len(),
        extra.len() - interrupted,
        events.len(),
        info.messages,
    );

    drop(proxies);
    drop(control);
    drop(nats);
    pool.close().await;
    pg.drop_db().await;
}

/// Without NATS: a proxy reports usage over the control plane's gRPC, from its usage log. The
/// control plane is SIGKILLed (events wait in the log), then the proxy is SIGKILLed too, and
/// both restart: the restarted proxy replays its log, and the ledger has every answer once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_usage_from_the_log_survives_control_plane_and_proxy_kills() {
    let tmp = tempfile::tempdir().unwrap();
    let SqliteSetup {
        sim: _sim,
        cluster,
        mut control,
        org_id,
        api_key,
    } = sqlite_setup(tmp.path(), 5).await;
    let port = free_port();
    let state_dir = tmp.path().join("proxy");
    let mut proxy = cluster.start_proxy(0, port, &state_dir);
    wait_ready(port, Duration::from_secs(30)).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut expected = (0usize, 0i64, 0i64);
    let send = |n: usize| {
        let client = client.clone();
        let api_key = api_key.clone();
        async move {
            let mut got = (0usize, 0i64, 0i64);
            for i in 0..n {
                let kind = if i % 2 == 0 {
                    Kind::ResponsesBody
                } else {
                    Kind::ResponsesStream
                };
                let t0 = Instant::now();
                loop {
                    if let Attempt::Complete {
                        status: 200, body, ..
                    } = attempt(&client, port, kind, &kind.body(i), &api_key).await
                    {
                        let (input, output) = kind.usage(&body).unwrap();
                        got = (got.0 + 1, got.1 + input, got.2 + output);
                        break;
                    }
                    assert!(t0.elapsed() < Duration::from_secs(30), "not served");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            got
        }
    };
    let add = |a: (usize, i64, i64), b: (usize, i64, i64)| (a.0 + b.0, a.1 + b.1, a.2 + b.2);
    expected = add(expected, send(20).await);
    control.kill();
    eprintln!("fault: control plane SIGKILLed");
    expected = add(expected, send(20).await);
    proxy.kill();
    eprintln!("fault: proxy SIGKILLed (its log holds the events the control plane missed)");
    control = cluster.start_control();
    proxy = cluster.start_proxy(0, port, &state_dir);
    wait_ready(port, Duration::from_secs(30)).await;
    assert!(
        proxy
            .log_text()
            .contains("usage log holds undelivered events"),
        "the restarted proxy had nothing to replay"
    );
    expected = add(expected, send(10).await);

    cluster.until_usage(&org_id, expected, "answers").await;
    drop(proxy);
    drop(control);
}

/// The usage events in a proxy's log files (delivered or not), by request id.
fn events_in_log(state_dir: &Path) -> HashMap<String, UsageEvent> {
    let mut events = HashMap::new();
    for entry in std::fs::read_dir(state_dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("usage-wal.") && name.ends_with(".jsonl")) {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            if line.trim().is_empty() {
                continue;
            }
            let e: UsageEvent = serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("{}: unreadable line {line}: {err}", path.display()));
            events.insert(e.request_id.clone(), e);
        }
    }
    events
}

/// A planned stop: a proxy that answers without waiting for its usage log
/// (`--usage-durable-wait-ms 0`) gets SIGTERM in the middle of a load, with the control plane
/// down (nothing is delivered). It exits cleanly, and its log holds the event of every answer a
/// client received whole (the only others are of answers cut off by the exit); restarted, it
/// delivers them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_load_keeps_the_event_of_every_answer_received() {
    const CONCURRENCY: usize = 16;
    /// Answers received before the SIGTERM.
    const BEFORE: usize = 60;
    let tmp = tempfile::tempdir().unwrap();
    let SqliteSetup {
        sim: _sim,
        cluster,
        mut control,
        org_id,
        api_key,
    } = sqlite_setup(tmp.path(), 2).await;
    let port = free_port();
    let state_dir = tmp.path().join("proxy");
    let mut proxy = cluster.start_proxy_waiting(0, port, &state_dir, 0, &[]);
    wait_ready(port, Duration::from_secs(30)).await;
    // Served once (the snapshot has the provider key), then the control plane goes down.
    let probe: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    until_served(&probe, port, &api_key).await;
    control.kill();
    eprintln!("fault: control plane SIGKILLed (usage waits in the proxy's log)");

    // The load: until the proxy goes away.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut workers = Vec::new();
    for w in 0..CONCURRENCY {
        let (seen, api_key) = (seen.clone(), api_key.clone());
        workers.push(tokio::spawn(async move {
            let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
            for i in (1 + w..).step_by(CONCURRENCY) {
                let kind = if i % 2 == 0 {
                    Kind::ResponsesBody
                } else {
                    Kind::ResponsesStream
                };
                match attempt(&client, port, kind, &kind.body(i), &api_key).await {
                    Attempt::Complete { id, status, body } => {
                        let text = String::from_utf8_lossy(&body);
                        assert_eq!(status, 200, "{kind:?}: {text}");
                        let usage = kind.usage(&body).unwrap_or_else(|| {
                            panic!("{kind:?} ended cleanly but is not a complete answer: {text}")
                        });
                        seen.lock().unwrap().completed.insert(id, usage);
                    }
                    Attempt::CutOff(id) => {
                        let mut s = seen.lock().unwrap();
                        s.cut_off.extend(id);
                        return;
                    }
                }
            }
        }));
    }
    let t0 = Instant::now();
    while seen.lock().unwrap().completed.len() < BEFORE {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the load is too slow"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let status = tokio::task::block_in_place(|| proxy.terminate(Duration::from_secs(20)));
    eprintln!("fault: proxy SIGTERMed mid-load");
    for w in workers {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("the load stops with the proxy")
            .unwrap();
    }
    assert!(status.success(), "a clean exit on SIGTERM: {status}");
    let out = proxy.log_text();
    assert!(out.contains("SIGTERM"), "{out}");
    assert!(out.contains("usage log flushed"), "{out}");
    let (completed, cut_off) = {
        let s = seen.lock().unwrap();
        (s.completed.clone(), s.cut_off.clone())
    };
    assert!(completed.len() >= BEFORE);

    // The log holds every answer received whole, with the tokens the client saw.
    let logged = events_in_log(&state_dir);
    for (id, (input, output)) in &completed {
        let e = logged
            .get(id)
            .unwrap_or_else(|| panic!("answer {id} was received whole but its event is lost"));
        assert_eq!(
            (e.input_tokens as i64, e.output_tokens as i64),
            (*input, *output),
            "tokens of {id}"
        );
    }
    let probes = logged
        .keys()
        .filter(|id| !completed.contains_key(*id) && !cut_off.contains(*id))
        .count();
    assert!(probes <= 1, "events of answers no client saw: {probes}");

    // Restarted, the proxy delivers them all.
    control = cluster.start_control();
    proxy = cluster.start_proxy_waiting(0, port, &state_dir, 0, &[]);
    wait_ready(port, Duration::from_secs(30)).await;
    let expected = logged.values().fold((0usize, 0i64, 0i64), |a, e| {
        (
            a.0 + 1,
            a.1 + e.input_tokens as i64,
            a.2 + e.output_tokens as i64,
        )
    });
    cluster
        .until_usage(&org_id, expected, "events in the log")
        .await;
    eprintln!(
        "{} answers received whole, {} cut off by the stop; {} events in the log, all in the ledger",
        completed.len(),
        cut_off.len(),
        logged.len()
    );
    drop(proxy);
    drop(control);
}

/// A planned stop drains: a proxy sent SIGTERM while a two-second stream is in flight stops
/// accepting connections at once, lets that stream finish whole (its usage event in the log),
/// then exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_the_answers_in_flight_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let SqliteSetup {
        sim: _sim,
        cluster,
        control: _control,
        org_id: _,
        api_key,
    } = sqlite_setup(tmp.path(), 2).await;
    let port = free_port();
    let state_dir = tmp.path().join("proxy");
    // No drain delay: this test is about what a stop does once the proxy stops accepting (the
    // delay, which keeps accepting while load balancers notice, is tests/drain.rs's).
    let mut proxy =
        cluster.start_proxy_waiting(0, port, &state_dir, 200, &["--drain-delay-secs", "0"]);
    wait_ready(port, Duration::from_secs(30)).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    until_served(&client, port, &api_key).await;

    // 200 tokens at 100 per second: a two-second stream.
    let slow = json!({"model": "gpt-5.5", "start_within": "00h-00m-10s", "stream": true,
        "input": "a long answer #sim output_tokens=200 tokens_per_sec=100"});
    let in_flight = {
        let (client, api_key) = (client.clone(), api_key.clone());
        tokio::spawn(
            async move { attempt(&client, port, Kind::ResponsesStream, &slow, &api_key).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    let exited = tokio::task::spawn_blocking(move || {
        let status = proxy.terminate(Duration::from_secs(20));
        (status, proxy.log_text())
    });
    // Draining: new connections are refused while the stream goes on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    assert!(
        matches!(
            attempt(
                &fresh,
                port,
                Kind::ResponsesBody,
                &Kind::ResponsesBody.body(1),
                &api_key
            )
            .await,
            Attempt::CutOff(None)
        ),
        "a draining proxy accepts no new connection"
    );
    let Attempt::Complete { id, status, body } = in_flight.await.unwrap() else {
        panic!("the stream in flight was cut off by the stop");
    };
    assert_eq!(status, 200);
    let (_, output) = Kind::ResponsesStream
        .usage(&body)
        .unwrap_or_else(|| panic!("incomplete: {}", String::from_utf8_lossy(&body)));
    assert_eq!(output, 200);
    let (status, out) = exited.await.unwrap();
    assert!(status.success(), "a clean exit on SIGTERM: {status}\n{out}");
    assert!(
        sent.elapsed() >= Duration::from_millis(1000),
        "the proxy waited for the stream"
    );
    let logged = events_in_log(&state_dir);
    assert_eq!(
        logged[&id].output_tokens, 200,
        "its usage event is in the log"
    );
}

/// A hostile tenant's model ids (2 MB long, or with a NUL) get a 400 `invalid_model` before any
/// usage event exists, and another tenant's usage keeps flowing into the ledger: over NATS and
/// over the control plane's gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_model_ids_are_refused_and_other_tenants_usage_keeps_flowing() {
    for use_nats in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let logs = tmp.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let key_file = tmp.path().join("master.key");
        std::fs::write(&key_file, MasterKeyring::generate_file_text()).unwrap();
        let sim = sim::spawn(SimConfig {
            openai_key: Some(OPENAI_KEY.into()),
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let cluster = Cluster {
            flex: PathBuf::from(env!("CARGO_BIN_EXE_flex")),
            logs,
            use_nats,
            nats_port: free_port(),
            nats_dir: tmp.path().join("nats"),
            cp_port: free_port(),
            db_url: format!("sqlite://{}?mode=rwc", tmp.path().join("flex.db").display()),
            key_file,
            openai_url: sim.openai_base_url(),
            gemini_url: sim.base_url(),
        };
        let _nats = use_nats.then(|| cluster.start_nats());
        let _control = cluster.start_control();
        let mut tenants = Vec::new();
        for name in ["mallory", "alice"] {
            let org = cluster.admin(&["org", "create", name], None)["org_id"]
                .as_str()
                .unwrap()
                .to_string();
            let key = cluster.admin(&["key", "create", "--org", &org, "--name", "k"], None)
                ["api_key"]
                .as_str()
                .unwrap()
                .to_string();
            cluster.admin(
                &["provider-key", "set", "--org", &org, "--provider", "openai"],
                Some(OPENAI_KEY),
            );
            tenants.push((org, key));
        }
        let [(mallory_org, mallory), (alice_org, alice)] = [tenants[0].clone(), tenants[1].clone()];
        let port = free_port();
        let _proxy = cluster.start_proxy(0, port, &tmp.path().join("proxy"));
        wait_ready(port, Duration::from_secs(30)).await;
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        until_served(&client, port, &alice).await;
        until_served(&client, port, &mallory).await;

        let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
        let chat = |model: &str| {
            json!({"model": model, "start_within": "default",
                   "messages": [{"role": "user", "content": "hi"}]})
        };
        let huge = format!("gpt-{}", "a".repeat(2 * 1024 * 1024));
        for model in [huge.as_str(), "gpt-5.5\u{0}x"] {
            let (status, body) =
                infra::request(http::Method::POST, &url, Some(&mallory), Some(chat(model)))
                    .await
                    .unwrap();
            let what = format!("nats={use_nats} model of {} bytes", model.len());
            assert_eq!(status, 400, "{what}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["code"], "invalid_model", "{what}: {body}");
            assert!(body.len() < 2000, "{what}: the error echoes no model id");
            for _ in 0..3 {
                let (status, body) = infra::request(
                    http::Method::POST,
                    &url,
                    Some(&alice),
                    Some(chat("gpt-5.5")),
                )
                .await
                .unwrap();
                assert_eq!(status, 200, "{what}: {body}");
            }
        }
        // Alice's six answers and her probe's are in the ledger; of Mallory's, only her probe's.
        let db = sqlx::SqlitePool::connect(&cluster.db_url).await.unwrap();
        let answered = |org: String| {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT COUNT(*) FROM usage_ledger WHERE org_id = ? AND status = 200",
                )
                .bind(org)
                .fetch_one(&db)
                .await
                .unwrap()
            }
        };
        let t0 = Instant::now();
        loop {
            let a = answered(alice_org.clone()).await;
            if a == 7 {
                assert_eq!(
                    answered(mallory_org.clone()).await,
                    1,
                    "nats={use_nats}: only Mallory's probe answered"
                );
                break;
            }
            assert!(
                a < 7 && t0.elapsed() < Duration::from_secs(60),
                "nats={use_nats}: alice's ledger has {a} answers, waiting for 7"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
