#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The settled-ledger stream `FLEX_LEDGER` (control-plane/src/ledger_stream.rs): a durable
//! analytics consumer sees each request exactly once, where the raw usage stream `FLEX_USAGE`
//! repeats requests.
//!
//! - `a_durable_consumer_counts_each_request_once_across_a_replay_a_nats_outage_and_crashes`:
//!   real processes (`flex control` on a fresh Postgres database, `flex proxy` with a state dir,
//!   a private `nats-server`). The proxy's NATS link goes through a relay in the test: while it
//!   is down a batch of usage events builds up in the proxy's log; it comes back dropping what
//!   the server delivers, so JetStream stores the batch and its acks never arrive; then
//!   nats-server is killed and stays down longer than `FLEX_USAGE`'s duplicate window (2 s here,
//!   the stream created by the test, standing in for the 10 minutes) while the proxy keeps
//!   serving; after the restart the proxy replays its log and the raw stream holds those
//!   requests twice. Then the control plane is SIGKILLed: the proxy's
//!   usage waits in `FLEX_USAGE`, rows committed to the ledger and not yet published wait in
//!   the ledger, and rows published but not marked (a stop between the publish and the mark)
//!   are found in the stream by the restarted publisher (past `FLEX_LEDGER`'s duplicate window,
//!   so the window cannot be what saves them). A durable pull consumer on `FLEX_LEDGER`, stopped
//!   and bound again on the way, receives every request exactly once with the ledger's values,
//!   and so does `examples/ledger_consumer.rs`.
//! - `sqlite_ledger_rows_are_published_once_and_found_again_after_a_stop`: the same publisher on
//!   SQLite, in process: duplicates add nothing, published-unmarked rows are reconciled.
//! - `two_control_planes_on_one_postgres_database_publish_each_row_once`: the second publisher
//!   stands by (the advisory lock) and takes over when the first one stops.
//!
//! Needs `nats-server` (PATH, /usr/sbin, or `FLEX_TEST_NATS_SERVER`) and Postgres
//! (`FLEX_TEST_POSTGRES_URL`, default postgres://postgres@127.0.0.1:5432); never skips.

#[path = "common/infra.rs"]
mod infra;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use flex::sim::{self, SimConfig};
use flex_control_plane::ledger_stream::{
    ledger_stream_config, pending_rows, unpublished_rows, LedgerMessage, LedgerPublisherConfig,
    LedgerRow, LEDGER_STREAM,
};
use flex_control_plane::usage_consumer::usage_stream_config;
use flex_control_plane::{ControlPlane, Store};
use flex_shared::crypto::MasterKeyring;
use flex_shared::usage::{UsageEvent, NATS_STREAM};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use infra::{admin_json_of, free_port, output_with_stdin, wait_listening, Nats, Pg, Proc};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const OPENAI_KEY: &str = "sk-sim-openai-ledger-000000";
const ADMIN_TOKEN: &str = "ledger-test-admin-token";
/// `FLEX_USAGE`'s duplicate window in this test (10 minutes in production).
const USAGE_WINDOW: Duration = Duration::from_secs(2);
/// `FLEX_LEDGER`'s duplicate window in this test (10 minutes in production).
const LEDGER_WINDOW: Duration = Duration::from_secs(1);

// ----- fixtures -------------------------------------------------------------------------------

/// What the relay in front of nats-server does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Everything flows.
    Open,
    /// Connections are closed and new ones refused (the proxy sees NATS unreachable).
    Down,
    /// Everything flows but the messages the server delivers (`MSG`/`HMSG` frames: publish
    /// acks, JetStream API replies, consumer deliveries), which are dropped: what the proxy
    /// publishes is stored, and it never hears so.
    LoseReplies,
}

/// A TCP relay in front of nats-server, frame-aware in the server-to-client direction.
struct Relay {
    port: u16,
    link: watch::Sender<Link>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (link, link_rx) = watch::channel(Link::Open);
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = {
            let dropped = dropped.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if *link_rx.borrow() == Link::Down {
                        continue; // closed at once
                    }
                    tokio::spawn(relay_connection(
                        client,
                        upstream,
                        link_rx.clone(),
                        dropped.clone(),
                    ));
                }
            })
        };
        Self {
            port,
            link,
            dropped,
            task,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The length of the first complete server frame in `buf` and whether it is a delivered
/// message, or None while it is incomplete.
fn server_frame(buf: &[u8]) -> Option<(usize, bool)> {
    let eol = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = &buf[..eol];
    if line.starts_with(b"MSG ") || line.starts_with(b"HMSG ") {
        let total: usize = std::str::from_utf8(line)
            .ok()?
            .split_ascii_whitespace()
            .last()?
            .parse()
            .ok()?;
        let len = eol + 2 + total + 2;
        (buf.len() >= len).then_some((len, true))
    } else {
        Some((eol + 2, false))
    }
}

async fn relay_connection(
    client: TcpStream,
    upstream: u16,
    mut link: watch::Receiver<Link>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return; // nats-server is down: the client sees its connection close.
    };
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let up = async move {
        let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
    };
    let down = async move {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                n = server_r.read(&mut chunk) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
                changed = link.changed() => {
                    if changed.is_err() || *link.borrow() == Link::Down {
                        return;
                    }
                    continue;
                }
            }
            let lose = *link.borrow() == Link::LoseReplies;
            let mut out = Vec::new();
            while let Some((len, message)) = server_frame(&buf) {
                let frame: Vec<u8> = buf.drain(..len).collect();
                if message && lose {
                    dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    out.extend_from_slice(&frame);
                }
            }
            if !out.is_empty() && client_w.write_all(&out).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

async fn nats_client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .unwrap()
}

/// How many lines of the proxy's log contain `text`.
fn proxy_log_count(logs: &Path, text: &str) -> usize {
    std::fs::read_to_string(logs.join("flex-proxy.log"))
        .map(|l| l.lines().filter(|l| l.contains(text)).count())
        .unwrap_or(0)
}

fn spawn(name: &str, args: &[String], logs: &Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flex"));
    cmd.args(args).env("FLEX_LOG", "warn,flex=info");
    Proc::spawn(name, cmd, logs.join(format!("{name}.log"))).tail_on_panic(60)
}

struct Cluster {
    logs: PathBuf,
    db_url: String,
    nats_url: String,
    key_file: PathBuf,
    cp_port: u16,
}

impl Cluster {
    fn control_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.cp_port)
    }

    fn start_control(&self) -> Proc {
        let args: Vec<String> = [
            "control",
            "--database-url",
            &self.db_url,
            "--nats-url",
            &self.nats_url,
            "--admin-token",
            ADMIN_TOKEN,
            "--master-key-file",
            &self.key_file.display().to_string(),
            "--listen",
            &format!("127.0.0.1:{}", self.cp_port),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = spawn("flex-control", &args, &self.logs);
        wait_listening(self.cp_port, "flex control", Duration::from_secs(60));
        p
    }

    fn admin(&self, args: &[&str], stdin: Option<&str>) -> Value {
        let out = output_with_stdin(
            Command::new(env!("CARGO_BIN_EXE_flex"))
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

/// One Responses request; returns the status and the proxy's request id (`x-request-id`, the
/// usage event's id).
async fn respond(port: u16, api_key: &str, i: usize) -> (u16, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = json!({
        "model": "gpt-5.5",
        "input": "word ".repeat(1 + i % 7),
        "start_within": if i.is_multiple_of(2) { "default" } else { "00h-00m-10s" },
    });
    let req = http::Request::post(format!("http://127.0.0.1:{port}/v1/responses"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {api_key}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("the proxy answers within 30 s")
        .unwrap();
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    resp.into_body().collect().await.unwrap();
    (status, id)
}

/// `n` requests, each answered 200; their request ids.
async fn send(port: u16, api_key: &str, n: usize, offset: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let (status, id) = respond(port, api_key, offset + i).await;
        assert_eq!(status, 200, "request {} not served", offset + i);
        assert!(!id.is_empty(), "no x-request-id");
        ids.push(id);
    }
    ids
}

/// What a durable consumer of `FLEX_LEDGER` received: stream sequence → row (a redelivery has
/// the same sequence, a stored repeat would have another).
type Received = Arc<Mutex<BTreeMap<u64, LedgerRow>>>;

/// A durable pull consumer `durable` on `FLEX_LEDGER` (created when missing, bound again
/// otherwise), acking each row after recording it; rides out NATS outages.
fn spawn_durable_reader(
    js: jetstream::Context,
    durable: &str,
    into: Received,
) -> tokio::task::JoinHandle<()> {
    let durable = durable.to_string();
    tokio::spawn(async move {
        loop {
            let consumer = match js.get_stream(LEDGER_STREAM).await {
                Ok(s) => {
                    s.get_or_create_consumer(
                        &durable,
                        pull::Config {
                            durable_name: Some(durable.clone()),
                            ack_policy: jetstream::consumer::AckPolicy::Explicit,
                            ack_wait: Duration::from_secs(5),
                            ..Default::default()
                        },
                    )
                    .await
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(consumer) = consumer else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(mut messages) = consumer
                .stream()
                .heartbeat(Duration::from_secs(1))
                .expires(Duration::from_secs(5))
                .messages()
                .await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while let Some(Ok(m)) = messages.next().await {
                let seq = m.info().unwrap().stream_sequence;
                let row: LedgerRow = serde_json::from_slice(&m.payload).unwrap();
                assert_eq!(
                    m.headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.as_str().to_string()),
                    Some(row.request_id.clone()),
                    "Nats-Msg-Id is the request id"
                );
                assert_eq!(m.subject.as_str(), format!("flex.ledger.{}", row.org_id));
                into.lock().unwrap().insert(seq, row);
                m.ack().await.ok();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn received_ids(r: &Received) -> BTreeSet<String> {
    r.lock()
        .unwrap()
        .values()
        .map(|row| row.request_id.clone())
        .collect()
}

async fn until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while !done().await {
        assert!(t0.elapsed() < within, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every message of the raw usage stream: request id → how many times the stream holds it.
async fn raw_usage_counts(js: &jetstream::Context) -> HashMap<String, usize> {
    let mut s = js.get_stream(NATS_STREAM).await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut counts = HashMap::new();
    for seq in state.first_sequence..=state.last_sequence {
        let m = s.get_raw_message(seq).await.unwrap();
        let e: UsageEvent = serde_json::from_slice(&m.payload).unwrap();
        *counts.entry(e.request_id).or_insert(0) += 1;
    }
    counts
}

async fn ledger_ids(pool: &sqlx::PgPool) -> BTreeSet<String> {
    let rows: Vec<(String,)> = sqlx::query_as("SELECT request_id FROM usage_ledger")
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter().map(|(id,)| id).collect()
}

fn synthetic(request_id: &str, org_id: &str, i: i64) -> UsageEvent {
    UsageEvent {
        schema_version: 1,
        request_id: request_id.into(),
        org_id: org_id.into(),
        key_id: "key_synthetic".into(),
        model: "gpt-5.5".into(),
        provider: "openai".into(),
        caller_format: "responses".into(),
        start_within: "00h-00m-30s".into(),
        served_tier: "flex".into(),
        reason: "flex_started".into(),
        flex_wait_ms: 10,
        start_latency_ms: 20,
        duration_ms: 30,
        input_tokens: 100 + i as u64,
        output_tokens: 50,
        status: 200,
        outcome: "ok".into(),
        tiers_started: vec!["flex".into()],
        cost_micros: 1000 + i,
        standard_cost_micros: 2000 + i,
        received_at: "2026-03-01T12:00:00.000000Z".into(),
        ..UsageEvent::default()
    }
}

// ----- the process test -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_durable_consumer_counts_each_request_once_across_a_replay_a_nats_outage_and_crashes() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let key_file = tmp.path().join("master.key");
    std::fs::write(&key_file, MasterKeyring::generate_file_text()).unwrap();
    let mut nats = Nats::start().await;
    let db = Pg::new().await;
    let test_client = nats_client(&nats.url()).await;
    let js = jetstream::new(test_client.clone());
    // Both streams exist before flex does, with short duplicate windows (the code creates them
    // with 10 minutes when missing, and uses them as they are when present).
    js.create_stream(stream::Config {
        duplicate_window: USAGE_WINDOW,
        ..usage_stream_config()
    })
    .await
    .unwrap();
    js.create_stream(ledger_stream_config(&LedgerPublisherConfig {
        duplicate_window: LEDGER_WINDOW,
        ..LedgerPublisherConfig::default()
    }))
    .await
    .unwrap();

    let sim = sim::spawn(SimConfig {
        openai_key: Some(OPENAI_KEY.into()),
        flex_delay_ms: 5,
        standard_delay_ms: 5,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let cluster = Cluster {
        logs: logs.clone(),
        db_url: db.url(),
        nats_url: nats.url(),
        key_file: key_file.clone(),
        cp_port: free_port(),
    };
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

    // The proxy: snapshots over gRPC, usage to NATS through the relay, a usage log.
    let relay = Relay::start(nats.port).await;
    let proxy_port = free_port();
    let state_dir = tmp.path().join("proxy");
    let proxy_args: Vec<String> = [
        "proxy",
        "--control-url",
        &cluster.control_url(),
        "--nats-url",
        &relay.url(),
        "--master-key-file",
        &key_file.display().to_string(),
        "--state-dir",
        &state_dir.display().to_string(),
        "--proxy-id",
        "ledger-proxy",
        "--listen",
        &format!("127.0.0.1:{proxy_port}"),
        "--openai-base-url",
        &sim.openai_base_url(),
        "--usage-durable-wait-ms",
        "5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _proxy = spawn("flex-proxy", &proxy_args, &logs);
    let t0 = Instant::now();
    loop {
        if let Ok((200, _)) = infra::request(
            http::Method::GET,
            &format!("http://127.0.0.1:{proxy_port}/readyz"),
            None,
            None,
        )
        .await
        {
            if respond(proxy_port, &api_key, 0).await.0 == 200 {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the proxy never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
    let first_reader: Received = Arc::default();
    let reader = spawn_durable_reader(js.clone(), "analytics", first_reader.clone());
    let mut expected: BTreeSet<String> = BTreeSet::new();

    // 1. Normal operation.
    let normal = send(proxy_port, &api_key, 10, 1).await;
    until(
        "the first requests in the ledger",
        Duration::from_secs(60),
        async || {
            let ledger = ledger_ids(&pool).await;
            normal.iter().all(|id| ledger.contains(id))
        },
    )
    .await;
    // The probes of the start are in the ledger too (each request has its row).
    expected.extend(ledger_ids(&pool).await);

    // 2. JetStream stores a batch whose acks never reach the proxy, then nats-server dies and
    //    stays down past FLEX_USAGE's duplicate window. The batch builds up in the proxy's log
    //    while its link is down; it comes back losing what the server delivers, so the proxy's
    //    next round is published, stored, and never acknowledged.
    let disconnects = proxy_log_count(&logs, "disconnected from NATS");
    relay.set(Link::Down);
    until(
        "the proxy sees NATS down",
        Duration::from_secs(30),
        async || proxy_log_count(&logs, "disconnected from NATS") > disconnects,
    )
    .await;
    let held = send(proxy_port, &api_key, 10, 100).await;
    relay.set(Link::LoseReplies);
    until(
        "the held batch stored in FLEX_USAGE",
        Duration::from_secs(60),
        async || {
            let counts = raw_usage_counts(&js).await;
            held.iter().all(|id| counts.contains_key(id))
        },
    )
    .await;
    assert!(
        relay.dropped.load(Ordering::Relaxed) > 0,
        "no reply was lost"
    );
    until(
        "the held batch in the ledger and on FLEX_LEDGER",
        Duration::from_secs(60),
        async || {
            let got = received_ids(&first_reader);
            expected.iter().chain(&held).all(|id| got.contains(id))
        },
    )
    .await;
    expected.extend(held.iter().cloned());
    nats.stop();
    let outage = Instant::now();
    relay.set(Link::Open);
    eprintln!(
        "fault: nats-server killed with the acks of {} events held",
        held.len()
    );
    // The proxy keeps serving during the outage; usage waits in its log.
    expected.extend(send(proxy_port, &api_key, 5, 200).await);
    tokio::time::sleep((USAGE_WINDOW + Duration::from_secs(1)).saturating_sub(outage.elapsed()))
        .await;
    nats.restart().await;
    eprintln!("fault: nats-server restarted after {:?}", outage.elapsed());
    until(
        "the outage's requests in the ledger",
        Duration::from_secs(90),
        async || ledger_ids(&pool).await == expected,
    )
    .await;
    // The proxy replayed the held batch: the raw stream holds each of those requests again.
    until(
        "the proxy's replay of the held batch in FLEX_USAGE",
        Duration::from_secs(60),
        async || {
            let counts = raw_usage_counts(&js).await;
            held.iter()
                .all(|id| counts.get(id).copied().unwrap_or(0) >= 2)
        },
    )
    .await;
    until(
        "FLEX_LEDGER caught up after the outage",
        Duration::from_secs(60),
        async || received_ids(&first_reader) == expected,
    )
    .await;
    // The analytics consumer stops here (its durable keeps its place).
    reader.abort();
    let _ = reader.await;

    // 3. The control plane is SIGKILLed. Meanwhile: the proxy's usage waits in FLEX_USAGE; rows
    //    committed to the ledger and not published (a stop between commit and publish); some
    //    of them published and not marked (a stop between publish and mark).
    control.kill();
    eprintln!("fault: flex control SIGKILLed");
    expected.extend(send(proxy_port, &api_key, 5, 300).await);
    let store = Store::connect(&db.url()).await.unwrap();
    let events: Vec<UsageEvent> = (0..6)
        .map(|i| synthetic(&format!("req_committed_unpublished_{i}"), &org_id, i))
        .collect();
    assert_eq!(store.insert_usage(&events).await.unwrap(), 6);
    expected.extend(events.iter().map(|e| e.request_id.clone()));
    let pending = pending_rows(&store, 100).await.unwrap();
    assert_eq!(
        pending
            .iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        events
            .iter()
            .map(|e| e.request_id.as_str())
            .collect::<Vec<_>>(),
        "only the rows committed after the kill wait, in ledger order"
    );
    for row in &pending[..3] {
        let (subject, msg) = LedgerMessage::of(row).unwrap().publish();
        let ack = js.send_publish(subject, msg).await.unwrap().await.unwrap();
        assert!(!ack.duplicate);
    }
    // Past FLEX_LEDGER's duplicate window: only the publisher's own check can spare them.
    tokio::time::sleep(LEDGER_WINDOW + Duration::from_millis(500)).await;
    let control = cluster.start_control();
    let second_reader: Received = Arc::default();
    let reader = spawn_durable_reader(js.clone(), "analytics", second_reader.clone());
    until(
        "every request on FLEX_LEDGER after the restart",
        Duration::from_secs(90),
        async || {
            let mut all = received_ids(&first_reader);
            all.extend(received_ids(&second_reader));
            all == expected
        },
    )
    .await;
    assert!(
        control
            .log_text()
            .contains("marked published without publishing them again"),
        "the restarted publisher did not report the rows it found in the stream:\n{}",
        control.log_tail()
    );
    // Anything more would have arrived by now.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Each request exactly once: one stream sequence per request id, the stream holds one
    // message per ledger row, and nothing waits.
    let mut by_seq = first_reader.lock().unwrap().clone();
    by_seq.extend(second_reader.lock().unwrap().clone());
    let mut seqs_of: HashMap<String, Vec<u64>> = HashMap::new();
    for (seq, row) in &by_seq {
        seqs_of
            .entry(row.request_id.clone())
            .or_default()
            .push(*seq);
    }
    let repeated: Vec<_> = seqs_of.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(repeated.is_empty(), "repeated on FLEX_LEDGER: {repeated:?}");
    assert_eq!(
        seqs_of.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "FLEX_LEDGER has exactly the ledger's requests"
    );
    assert_eq!(ledger_ids(&pool).await, expected);
    assert_eq!(
        stream_messages(&js, LEDGER_STREAM).await,
        expected.len() as u64
    );
    assert_eq!(unpublished_rows(&store).await.unwrap(), 0);
    let raw = raw_usage_counts(&js).await;
    let raw_total: usize = raw.values().sum();
    assert!(
        held.iter().all(|id| raw[id] >= 2),
        "the raw stream repeats the replayed requests"
    );
    eprintln!(
        "FLEX_USAGE: {raw_total} messages for {} requests; FLEX_LEDGER: {} rows for {} requests",
        raw.len(),
        by_seq.len(),
        expected.len()
    );
    // The rows carry the ledger's values.
    let db_rows: Vec<(String, i64, i64, i64, i64, String, String)> = sqlx::query_as(
        "SELECT request_id, input_tokens, output_tokens, cost_micros, standard_cost_micros, \
         served_tier, org_id FROM usage_ledger",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let rows: HashMap<String, LedgerRow> = by_seq
        .into_values()
        .map(|r| (r.request_id.clone(), r))
        .collect();
    for (id, input, output, cost, standard, tier, org) in db_rows {
        let r = &rows[&id];
        assert_eq!(
            (
                r.input_tokens,
                r.output_tokens,
                r.cost_micros,
                r.standard_cost_micros,
                r.savings_micros
            ),
            (input, output, cost, standard, standard - cost),
            "row {id}"
        );
        assert_eq!((&r.served_tier, &r.org_id), (&tier, &org));
        assert_eq!(r.schema_version, 1);
        assert!(input > 0 && cost > 0, "row {id} has tokens and a cost");
    }

    // The example consumer reads the same: every row once, and nothing on a second run of the
    // same durable consumer.
    let printed = run_example_consumer(&nats.url(), "example-check");
    let ids: BTreeSet<String> = printed.iter().map(|r| r.request_id.clone()).collect();
    assert_eq!(
        printed.len(),
        expected.len(),
        "the example printed each row once"
    );
    assert_eq!(ids, expected);
    assert!(run_example_consumer(&nats.url(), "example-check").is_empty());

    reader.abort();
    drop(control);
    pool.close().await;
    store.close().await;
    db.drop_db().await;
}

/// Runs examples/ledger_consumer.rs with the durable consumer `durable`, printing JSON, until
/// it has been idle for 3 s; the rows it printed. `cargo test` builds the examples before it
/// runs the tests; a `cargo test --test ledger_stream` alone needs `cargo build --example
/// ledger_consumer` first. (Not built from here: a nested cargo inherits the test's
/// environment and rebuilds the workspace each time.)
fn run_example_consumer(nats_url: &str, durable: &str) -> Vec<LedgerRow> {
    let bin = Path::new(env!("CARGO_BIN_EXE_flex"))
        .parent()
        .unwrap()
        .join("examples/ledger_consumer");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --example ledger_consumer` (a whole `cargo test` builds it)",
        bin.display()
    );
    let out = Command::new(bin)
        .args(["--nats-url", nats_url, "--durable", durable, "--json"])
        .args(["--idle-exit-secs", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ledger_consumer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

// ----- the publisher in process ---------------------------------------------------------------

fn keyring() -> Arc<MasterKeyring> {
    Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "test").unwrap())
}

fn fast(window: Duration) -> LedgerPublisherConfig {
    LedgerPublisherConfig {
        poll: Duration::from_millis(20),
        duplicate_window: window,
        standby_poll: Duration::from_millis(200),
        ..LedgerPublisherConfig::default()
    }
}

/// Every message of `FLEX_LEDGER`, by stream sequence.
async fn ledger_messages(js: &jetstream::Context) -> BTreeMap<u64, LedgerRow> {
    let mut s = js.get_stream(LEDGER_STREAM).await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut out = BTreeMap::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let m = s.get_raw_message(seq).await.unwrap();
        out.insert(seq, serde_json::from_slice(&m.payload).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ledger_rows_are_published_once_and_found_again_after_a_stop() {
    let nats = Nats::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("flex.db").display());
    let cp = Arc::new(ControlPlane::open(&db, keyring()).await.unwrap());
    let client = nats_client(&nats.url()).await;
    let js = jetstream::new(client.clone());

    let first: Vec<UsageEvent> = (0..3)
        .map(|i| synthetic(&format!("req_sqlite_{i}"), "org.a b", i))
        .collect();
    assert_eq!(cp.record_usage(&first).await.unwrap(), 3);
    assert_eq!(unpublished_rows(cp.store()).await.unwrap(), 3);
    let publisher = cp.spawn_ledger_publisher(client.clone(), fast(LEDGER_WINDOW));
    until("3 rows published", Duration::from_secs(30), async || {
        unpublished_rows(cp.store()).await.unwrap() == 0
    })
    .await;
    let got = ledger_messages(&js).await;
    assert_eq!(got.len(), 3);
    let row = got.values().next().unwrap();
    assert_eq!(row.request_id, "req_sqlite_0");
    assert_eq!(row.org_id, "org.a b");
    assert_eq!(
        (
            row.cost_micros,
            row.standard_cost_micros,
            row.savings_micros
        ),
        (1000, 2000, 1000)
    );
    assert_eq!(row.tiers_started, vec!["flex".to_string()]);
    assert_eq!(row.received_at, "2026-03-01T12:00:00.000000Z");
    assert_eq!(row.event_schema_version, 1);
    let m = js
        .get_stream(LEDGER_STREAM)
        .await
        .unwrap()
        .get_raw_message(*got.keys().next().unwrap())
        .await
        .unwrap();
    assert_eq!(m.subject.as_str(), "flex.ledger.org_a_b");

    // The same events again (a replayed usage event): no new row, nothing published.
    assert_eq!(cp.record_usage(&first).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stream_messages(&js, LEDGER_STREAM).await, 3);
    assert_eq!(publisher.stats().published.load(Ordering::Relaxed), 3);

    // A stop between publish and mark: two of four new rows are in the stream, unmarked.
    drop(publisher);
    let second: Vec<UsageEvent> = (3..7)
        .map(|i| synthetic(&format!("req_sqlite_{i}"), "org.a b", i))
        .collect();
    assert_eq!(cp.record_usage(&second).await.unwrap(), 4);
    let pending = pending_rows(cp.store(), 10).await.unwrap();
    assert_eq!(pending.len(), 4);
    for row in &pending[..2] {
        let (subject, msg) = LedgerMessage::of(row).unwrap().publish();
        js.send_publish(subject, msg).await.unwrap().await.unwrap();
    }
    tokio::time::sleep(LEDGER_WINDOW + Duration::from_millis(300)).await;
    let publisher = cp.spawn_ledger_publisher(client.clone(), fast(LEDGER_WINDOW));
    until("the rest published", Duration::from_secs(30), async || {
        unpublished_rows(cp.store()).await.unwrap() == 0
    })
    .await;
    let got = ledger_messages(&js).await;
    let ids: Vec<&str> = got.values().map(|r| r.request_id.as_str()).collect();
    assert_eq!(
        ids,
        (0..7)
            .map(|i| format!("req_sqlite_{i}"))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "each row once, in ledger order"
    );
    let s = publisher.stats();
    assert_eq!(s.reconciled.load(Ordering::Relaxed), 2);
    assert_eq!(s.published.load(Ordering::Relaxed), 2);
    assert_eq!(s.duplicates.load(Ordering::Relaxed), 0);
    drop(publisher);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_on_one_postgres_database_publish_each_row_once() {
    let nats = Nats::start().await;
    let db = Pg::new().await;
    let keys = keyring();
    let a = Arc::new(ControlPlane::open(&db.url(), keys.clone()).await.unwrap());
    let b = Arc::new(ControlPlane::open(&db.url(), keys.clone()).await.unwrap());
    let client = nats_client(&nats.url()).await;
    let js = jetstream::new(client.clone());
    let pa = a.spawn_ledger_publisher(client.clone(), fast(LEDGER_WINDOW));
    let pb = b.spawn_ledger_publisher(client.clone(), fast(LEDGER_WINDOW));
    until(
        "one of them stands by",
        Duration::from_secs(30),
        async || {
            pa.stats().standing_by.load(Ordering::Relaxed)
                != pb.stats().standing_by.load(Ordering::Relaxed)
        },
    )
    .await;
    let (active, standby) = if pb.stats().standing_by.load(Ordering::Relaxed) {
        (pa, pb)
    } else {
        (pb, pa)
    };
    // Rows recorded through both control planes.
    for i in 0..40 {
        let cp = if i % 2 == 0 { &a } else { &b };
        let e = synthetic(&format!("req_pg_{i}"), "org_pg", i);
        assert_eq!(cp.record_usage(&[e.clone(), e]).await.unwrap(), 1);
    }
    until("40 rows published", Duration::from_secs(30), async || {
        unpublished_rows(a.store()).await.unwrap() == 0
    })
    .await;
    assert_eq!(active.stats().published.load(Ordering::Relaxed), 40);
    assert_eq!(standby.stats().published.load(Ordering::Relaxed), 0);
    // The active one stops: the other takes over.
    drop(active);
    for i in 40..50 {
        assert_eq!(
            a.record_usage(&[synthetic(&format!("req_pg_{i}"), "org_pg", i)])
                .await
                .unwrap(),
            1
        );
    }
    until(
        "the standby publishes",
        Duration::from_secs(30),
        async || unpublished_rows(a.store()).await.unwrap() == 0,
    )
    .await;
    assert_eq!(standby.stats().published.load(Ordering::Relaxed), 10);
    assert!(!standby.stats().standing_by.load(Ordering::Relaxed));
    let got = ledger_messages(&js).await;
    let ids: BTreeSet<String> = got.values().map(|r| r.request_id.clone()).collect();
    assert_eq!(got.len(), 50, "each row once");
    assert_eq!(ids.len(), 50);
    drop(standby);
    drop(a);
    drop(b);
    db.drop_db().await;
}
