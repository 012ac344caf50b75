#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Usage over NATS JetStream into the Postgres ledger, against a private `nats-server` (started
//! on a free port so it can be killed and restarted) and a fresh Postgres database per test.
//!
//! - requests through a proxy (usage log in a state dir) while NATS is killed and restarted, the
//!   control plane is dropped and reopened, and the proxy's delivery task is killed and restarted;
//!   the ledger ends with exactly one row per request and the proxy's totals (the same with real
//!   processes, a proxy SIGKILLed included, is `tests/usage_fault_process.rs`);
//! - duplicates (same `Nats-Msg-Id`, or the same request id under another one) count once, and
//!   malformed messages are terminated, not redelivered;
//! - per-org rollups (whole range, per day, per month) equal the ledger sum, over random events.
//!
//! Needs `nats-server` (PATH, /usr/sbin, or `FLEX_TEST_NATS_SERVER`) and Postgres
//! (`FLEX_TEST_POSTGRES_URL`, default postgres://postgres@127.0.0.1:5432); never skips.

mod common;
#[path = "common/infra.rs"]
mod infra;

use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flex::sim::{self, SimConfig};
use flex_control_plane::sqlx::{self, PgPool};
use flex_control_plane::usage_consumer::{UsageConsumer, UsageConsumerConfig};
use flex_control_plane::{ControlPlane, Metadata};
use flex_data_plane::providers::BaseUrls;
use flex_data_plane::proxy::ProxyConfig;
use flex_data_plane::snapshot::SnapshotStore;
use flex_data_plane::upstream::UpstreamConfig;
use flex_data_plane::usage::log::{UsageWal, WalConfig};
use flex_data_plane::usage::nats::{
    usage_stream_config, NatsDelivery, NatsDeliveryConfig, NatsDeliveryStats, UsageQueue,
};
use flex_data_plane::usage::{Durable, UsageSink};
use flex_shared::crypto::MasterKeyring;
use flex_shared::usage::{nats_subject, UsageEvent};
use infra::{free_port, nats_server_binary, wait_listening, Pg};
use rand::{Rng, SeedableRng};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tokio::net::TcpListener;

// ----- fixtures -------------------------------------------------------------------------------

/// A private `nats-server -js` on a free port, with its own store dir (kept across restarts).
struct NatsServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    fn start() -> Self {
        let mut s = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        s.restart();
        s
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let conf = infra::write_nats_config(
            &self.dir.path().join("nats.conf"),
            &self.dir.path().join("store"),
            "16GB",
            "",
        );
        let child = Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-c"])
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        wait_listening(self.port, "nats-server", Duration::from_secs(10));
    }

    /// SIGKILL, like a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn nats_client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .unwrap()
}

fn keyring() -> Arc<MasterKeyring> {
    Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "test").unwrap())
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Totals {
    rows: i64,
    input: i64,
    output: i64,
    cost: i64,
    standard: i64,
}

fn totals_of<'a>(events: impl IntoIterator<Item = &'a UsageEvent>) -> Totals {
    let mut t = Totals::default();
    for e in events {
        t.rows += 1;
        t.input += e.input_tokens as i64;
        t.output += e.output_tokens as i64;
        t.cost += e.cost_micros;
        t.standard += e.standard_cost_micros;
    }
    t
}

async fn ledger_totals(pool: &PgPool) -> Totals {
    let (rows, input, output, cost, standard): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*)::BIGINT, COALESCE(SUM(input_tokens),0)::BIGINT, \
         COALESCE(SUM(output_tokens),0)::BIGINT, COALESCE(SUM(cost_micros),0)::BIGINT, \
         COALESCE(SUM(standard_cost_micros),0)::BIGINT FROM usage_ledger",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    Totals {
        rows,
        input,
        output,
        cost,
        standard,
    }
}

async fn wait_for_rows(pool: &PgPool, n: i64, within: Duration, what: &str) -> Totals {
    let t0 = Instant::now();
    let mut said = Instant::now();
    loop {
        let t = ledger_totals(pool).await;
        if t.rows >= n || t0.elapsed() > within {
            return t;
        }
        if said.elapsed() > Duration::from_secs(10) {
            eprintln!("{what}: {} of {n} rows after {:?}", t.rows, t0.elapsed());
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The proxy's sink: records every event it emits, then writes it to the usage log.
struct Recorder {
    wal: Arc<UsageWal>,
    seen: Mutex<Vec<UsageEvent>>,
}

impl UsageSink for Recorder {
    fn emit(&self, event: UsageEvent) {
        self.seen.lock().unwrap().push(event.clone());
        self.wal.emit(event);
    }

    fn emit_durable(&self, event: UsageEvent) -> Durable {
        self.seen.lock().unwrap().push(event.clone());
        self.wal.emit_durable(event)
    }
}

fn consumer_config() -> UsageConsumerConfig {
    UsageConsumerConfig {
        ack_wait: Duration::from_secs(2),
        ..UsageConsumerConfig::default()
    }
}

fn delivery(client: &async_nats::Client, stats: &Arc<NatsDeliveryStats>) -> NatsDelivery {
    NatsDelivery::with_stats(
        client.clone(),
        NatsDeliveryConfig {
            ack_timeout: Duration::from_secs(1),
            ..NatsDeliveryConfig::default()
        },
        stats.clone(),
    )
}

/// Delivery from the usage log (a proxy with a state dir).
fn spawn_log_delivery(
    client: &async_nats::Client,
    stats: &Arc<NatsDeliveryStats>,
    wal: &Arc<UsageWal>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(delivery(client, stats).run_log(wal.clone()))
}

/// Delivery from memory (a proxy without a state dir).
fn spawn_queue_delivery(
    client: &async_nats::Client,
    stats: &Arc<NatsDeliveryStats>,
    queue: &Arc<UsageQueue>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(delivery(client, stats).run(queue.clone()))
}

// ----- the fault test -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_is_counted_once_through_nats_pg_and_proxy_restarts() {
    const N: usize = 300;
    const WORKERS: usize = 4;
    let mut nats = NatsServer::start();
    let db = Pg::new().await;
    let keys = keyring();

    // Control plane: org, key, provider key.
    let cp = Arc::new(ControlPlane::open(&db.url(), keys.clone()).await.unwrap());
    let meta = Metadata::new("test");
    let org = cp.create_org(&meta, "acme", None).await.unwrap().org;
    let key = cp
        .create_api_key(&meta, &org.org_id, "k", None, None)
        .await
        .unwrap();
    let api_key = key.secret.as_ref().unwrap().expose_secret().to_string();
    cp.set_provider_key(
        &meta,
        &org.org_id,
        "openai",
        &SecretString::from(common::OPENAI_KEY.to_string()),
    )
    .await
    .unwrap();
    let mut cp = Some(cp);
    let cp_client = nats_client(&nats.url()).await;
    let mut consumer: Option<UsageConsumer> = Some(
        cp.as_ref()
            .unwrap()
            .spawn_usage_consumer(cp_client.clone(), consumer_config()),
    );

    // Proxy: snapshot from the control plane in process (it keeps its last snapshot while the
    // control plane is gone), usage over NATS from the usage log.
    let sim = sim::spawn(SimConfig {
        openai_key: Some(common::OPENAI_KEY.into()),
        flex_delay_ms: 5,
        standard_delay_ms: 5,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let store = Arc::new(SnapshotStore::new(Some(keys.clone()), None));
    tokio::spawn(flex::run::follow_in_process(
        cp.as_ref().unwrap().clone(),
        store.clone(),
    ));
    let state = tempfile::tempdir().unwrap();
    let wal = UsageWal::open(WalConfig::new(state.path())).unwrap();
    let recorder = Arc::new(Recorder {
        wal: wal.clone(),
        seen: Mutex::new(Vec::new()),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    flex::run::serve_proxy(
        listener,
        store.clone(),
        &UpstreamConfig::default(),
        ProxyConfig {
            base_urls: BaseUrls {
                openai: sim.openai_base_url(),
                anthropic: sim.base_url(),
                gemini: sim.base_url(),
            },
            ..ProxyConfig::default()
        },
        None,
        recorder.clone(),
    )
    .unwrap();
    for _ in 0..200 {
        if store.version() >= cp.as_ref().unwrap().snapshot().version {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let proxy_client = nats_client(&nats.url()).await;
    let dstats = Arc::new(NatsDeliveryStats::default());
    let mut delivery = spawn_log_delivery(&proxy_client, &dstats, &wal);

    // Traffic: WORKERS senders, paced so that it spans the faults below.
    let traffic = {
        let base = base.clone();
        let api_key = api_key.clone();
        tokio::spawn(async move {
            let mut workers = Vec::new();
            for w in 0..WORKERS {
                let base = base.clone();
                let api_key = api_key.clone();
                workers.push(tokio::spawn(async move {
                    let mut statuses = Vec::new();
                    for i in (w..N).step_by(WORKERS) {
                        let sw = if i % 3 == 0 { "00h-00m-10s" } else { "default" };
                        let input = "word ".repeat(1 + i % 17);
                        let body = json!({"model": "gpt-5.5", "input": input, "start_within": sw});
                        let r =
                            common::post(&format!("{base}/responses"), Some(&api_key), &body).await;
                        statuses.push(r.status);
                        tokio::time::sleep(Duration::from_millis(40)).await;
                    }
                    statuses
                }));
            }
            let mut all = Vec::new();
            for w in workers {
                all.extend(w.await.unwrap());
            }
            all
        })
    };

    let sleep = |ms| tokio::time::sleep(Duration::from_millis(ms));
    sleep(400).await;
    nats.kill();
    eprintln!("fault: nats-server killed");
    sleep(800).await;
    nats.restart();
    eprintln!("fault: nats-server restarted");
    sleep(400).await;
    drop(consumer.take());
    drop(cp.take());
    eprintln!("fault: control plane dropped");
    sleep(800).await;
    let cp2 = Arc::new(ControlPlane::open(&db.url(), keys.clone()).await.unwrap());
    consumer = Some(cp2.spawn_usage_consumer(cp_client.clone(), consumer_config()));
    eprintln!("fault: control plane reopened");
    sleep(400).await;
    delivery.abort();
    let _ = (&mut delivery).await;
    eprintln!("fault: proxy delivery task killed");
    sleep(400).await;
    delivery = spawn_log_delivery(&proxy_client, &dstats, &wal);
    eprintln!("fault: proxy delivery task restarted");

    let statuses = traffic.await.unwrap();
    assert_eq!(statuses.len(), N);
    assert!(statuses.iter().all(|s| *s == 200), "statuses: {statuses:?}");
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), N, "one usage event per request");
    let ids: HashSet<_> = seen.iter().map(|e| e.request_id.clone()).collect();
    assert_eq!(ids.len(), N, "request ids are unique");
    let expected = totals_of(&seen);
    assert!(expected.cost > 0 && expected.input > 0);

    let pool = PgPool::connect(&db.url()).await.unwrap();
    let got = wait_for_rows(&pool, N as i64, Duration::from_secs(120), "fault test").await;
    // Past the consumer's ack wait: anything still to be redelivered has been.
    sleep(3000).await;
    let got_later = ledger_totals(&pool).await;
    let d = &dstats;
    let w = wal.stats();
    let c = consumer.as_ref().unwrap().stats();
    eprintln!(
        "log: appended {} in {} fsyncs, durable waits {} (timeouts {}); delivery: published {} (duplicates {}), failed rounds {}, polls with NATS unreachable {}; consumer (after reopen): received {}, recorded {}, duplicates {}, malformed {}, errors {}",
        w.appended.load(Ordering::Relaxed),
        w.commits.load(Ordering::Relaxed),
        w.durable.waits.load(Ordering::Relaxed),
        w.durable.timeouts.load(Ordering::Relaxed),
        d.published.load(Ordering::Relaxed),
        d.duplicates.load(Ordering::Relaxed),
        d.failures.load(Ordering::Relaxed),
        d.unreachable_polls.load(Ordering::Relaxed),
        c.received.load(Ordering::Relaxed),
        c.recorded.load(Ordering::Relaxed),
        c.duplicates.load(Ordering::Relaxed),
        c.malformed.load(Ordering::Relaxed),
        c.errors.load(Ordering::Relaxed),
    );
    assert_eq!(
        got, expected,
        "ledger totals = the sum of the proxy's events"
    );
    assert_eq!(got_later, expected, "and no double count later");
    let ledger_ids: Vec<(String,)> = sqlx::query_as("SELECT request_id FROM usage_ledger")
        .fetch_all(&pool)
        .await
        .unwrap();
    let ledger_ids: HashSet<_> = ledger_ids.into_iter().map(|(id,)| id).collect();
    assert_eq!(ledger_ids, ids);
    // Every event went through the log, each answer waited for it, and the faults were real
    // (publishing failed while NATS was down).
    assert_eq!(w.appended.load(Ordering::Relaxed), N as u64);
    assert_eq!(w.durable.waits.load(Ordering::Relaxed), N as u64);
    assert!(
        d.failures.load(Ordering::Relaxed) + d.unreachable_polls.load(Ordering::Relaxed) > 0,
        "delivery never saw NATS down"
    );
    assert_eq!(w.dropped_full.load(Ordering::Relaxed), 0);
    assert_eq!(w.dropped_queue.load(Ordering::Relaxed), 0);
    assert_eq!(wal.pending_bytes(), 0, "the log is fully delivered");
    assert_eq!(c.malformed.load(Ordering::Relaxed), 0);
    // The summary the admin API shows agrees.
    let summary = cp2.get_usage(&org.org_id, "", "").await.unwrap();
    assert_eq!(summary.requests, N as u64);
    assert_eq!(summary.cost_micros, expected.cost);
    assert_eq!(summary.standard_cost_micros, expected.standard);

    delivery.abort();
    drop(consumer);
    pool.close().await;
    drop(cp2);
    db.drop_db().await;
}

// ----- duplicates and malformed messages ------------------------------------------------------

fn event(request_id: &str, org_id: &str, cost: i64) -> UsageEvent {
    UsageEvent {
        schema_version: 1,
        request_id: request_id.into(),
        org_id: org_id.into(),
        key_id: "key_1".into(),
        model: "gpt-5.5".into(),
        provider: "openai".into(),
        caller_format: "responses".into(),
        start_within: "00h-00m-30s".into(),
        served_tier: "flex".into(),
        reason: "flex_started".into(),
        flex_wait_ms: 10,
        start_latency_ms: 20,
        duration_ms: 30,
        input_tokens: 100,
        cached_input_tokens: 0,
        output_tokens: 50,
        reasoning_tokens: 0,
        status: 200,
        outcome: "ok".into(),
        tiers_started: vec!["flex".into()],
        cost_micros: cost,
        standard_cost_micros: cost * 2,
        received_at: "2026-03-01T12:00:00.000000Z".into(),
        provider_request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_publishes_count_once_and_malformed_messages_are_terminated() {
    let nats = NatsServer::start();
    let db = Pg::new().await;
    let cp = Arc::new(ControlPlane::open(&db.url(), keyring()).await.unwrap());
    let client = nats_client(&nats.url()).await;
    let js = async_nats::jetstream::new(client.clone());
    js.get_or_create_stream(usage_stream_config())
        .await
        .unwrap();
    let consumer = cp.spawn_usage_consumer(client.clone(), consumer_config());

    let a = event("req_dup_a", "org_x", 1234);
    let payload = serde_json::to_vec(&a).unwrap();
    let publish = |msg_id: &'static str, body: Vec<u8>, subject: String| {
        let js = js.clone();
        async move {
            js.send_publish(
                subject,
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(body.into())
                    .message_id(msg_id),
            )
            .await
            .unwrap()
            .await
            .unwrap()
        }
    };
    let first = publish("req_dup_a", payload.clone(), nats_subject("org_x")).await;
    let again = publish("req_dup_a", payload.clone(), nats_subject("org_x")).await;
    assert!(!first.duplicate);
    assert!(again.duplicate, "JetStream drops the same Nats-Msg-Id");
    // The same request id under another message id (a republish after the duplicate window):
    // JetStream stores it, the ledger absorbs it.
    let other = publish("req_dup_a-late", payload.clone(), nats_subject("org_x")).await;
    assert!(!other.duplicate);
    // And through the proxy's delivery path (from the usage log), twice.
    let state = tempfile::tempdir().unwrap();
    let wal = UsageWal::open(WalConfig::new(state.path())).unwrap();
    let dstats = Arc::new(NatsDeliveryStats::default());
    let delivery = spawn_log_delivery(&client, &dstats, &wal);
    wal.emit(a.clone());
    wal.emit(a.clone());
    // Malformed: not a usage event, and a usage event without a request id.
    publish(
        "junk-1",
        b"{not json".to_vec(),
        "flex.usage.org_x".to_string(),
    )
    .await;
    publish(
        "junk-2",
        serde_json::to_vec(&event("", "org_x", 5)).unwrap(),
        "flex.usage.org_x".to_string(),
    )
    .await;

    let pool = PgPool::connect(&db.url()).await.unwrap();
    let stats = consumer.stats().clone();
    let t0 = Instant::now();
    while stats.received.load(Ordering::Relaxed) < 4 || stats.malformed.load(Ordering::Relaxed) < 2
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "consumer too slow");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the ack wait: nothing comes back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(dstats.published.load(Ordering::Relaxed), 2);
    assert_eq!(dstats.duplicates.load(Ordering::Relaxed), 2);
    assert_eq!(stats.received.load(Ordering::Relaxed), 4);
    assert_eq!(stats.recorded.load(Ordering::Relaxed), 1);
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 1);
    assert_eq!(stats.malformed.load(Ordering::Relaxed), 2);
    assert_eq!(ledger_totals(&pool).await, totals_of([&a]));
    // The same request id twice in one batch, and once more in the next: one row.
    let b = event("req_dup_b", "org_x", 77);
    assert_eq!(cp.record_usage(&[b.clone(), b.clone()]).await.unwrap(), 1);
    assert_eq!(cp.record_usage(&[b.clone(), a.clone()]).await.unwrap(), 0);
    assert_eq!(ledger_totals(&pool).await, totals_of([&a, &b]));

    delivery.abort();
    drop(consumer);
    pool.close().await;
    drop(cp);
    db.drop_db().await;
}

// ----- rollups equal the ledger ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_org_rollups_equal_the_ledger_sum_over_random_events() {
    let nats = NatsServer::start();
    let db = Pg::new().await;
    let cp = Arc::new(ControlPlane::open(&db.url(), keyring()).await.unwrap());
    let client = nats_client(&nats.url()).await;
    let consumer = cp.spawn_usage_consumer(client.clone(), consumer_config());
    // Delivery from memory (a proxy without a state dir).
    let queue = UsageQueue::new();
    let dstats = Arc::new(NatsDeliveryStats::default());
    let delivery = spawn_queue_delivery(&client, &dstats, &queue);
    let pool = PgPool::connect(&db.url()).await.unwrap();
    let meta = Metadata::new("test");

    let mut all: Vec<UsageEvent> = Vec::new();
    for seed in 0..5u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0000 + seed);
        let mut orgs = Vec::new();
        for k in 0..rng.gen_range(1..=4) {
            let org = cp
                .create_org(&meta, &format!("org-{seed}-{k}"), None)
                .await
                .unwrap()
                .org;
            orgs.push(org.org_id);
        }
        let n = rng.gen_range(50..400);
        let mut events = Vec::new();
        for i in 0..n {
            let org = &orgs[rng.gen_range(0..orgs.len())];
            // 2026-01-29 .. 2026-02-03: crosses days and a month boundary.
            let day = rng.gen_range(0..6u32);
            let (month, d) = if day < 3 { (1, 29 + day) } else { (2, day - 2) };
            let flex = rng.gen_bool(0.5);
            let cost = rng.gen_range(0..=20_000_000_000i64);
            let mut e = event(&format!("req_{seed}_{i}"), org, 0);
            e.received_at = format!(
                "2026-{month:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
                rng.gen_range(0..24),
                rng.gen_range(0..60),
                rng.gen_range(0..60),
                rng.gen_range(0..1_000_000)
            );
            e.served_tier = if flex { "flex" } else { "standard" }.into();
            e.input_tokens = rng.gen_range(0..5_000_000);
            e.output_tokens = rng.gen_range(0..1_000_000);
            e.cost_micros = cost;
            e.standard_cost_micros = if flex {
                cost + rng.gen_range(0..=cost)
            } else {
                cost
            };
            events.push(e);
        }
        for e in &events {
            queue.emit(e.clone());
        }
        all.extend(events.iter().cloned());
        let got = wait_for_rows(&pool, all.len() as i64, Duration::from_secs(60), "rollups").await;
        assert_eq!(
            got,
            totals_of(&all),
            "seed {seed}: the ledger holds the events"
        );

        for org in &orgs {
            let mine: Vec<&UsageEvent> = events.iter().filter(|e| &e.org_id == org).collect();
            let want = totals_of(mine.iter().copied());
            let s = cp.get_usage(org, "", "").await.unwrap();
            let flex_requests = mine.iter().filter(|e| e.served_tier == "flex").count() as u64;
            assert_eq!(s.requests as i64, want.rows, "seed {seed} org {org}");
            assert_eq!(s.input_tokens as i64, want.input);
            assert_eq!(s.output_tokens as i64, want.output);
            assert_eq!(s.cost_micros, want.cost);
            assert_eq!(s.standard_cost_micros, want.standard);
            assert_eq!(s.savings_micros, want.standard - want.cost);
            assert_eq!(s.flex_requests, flex_requests);
            // Per day and per month, the rollups partition the total.
            let days = [
                "2026-01-29",
                "2026-01-30",
                "2026-01-31",
                "2026-02-01",
                "2026-02-02",
                "2026-02-03",
                "2026-02-04",
            ];
            let mut by_day = Totals::default();
            for w in days.windows(2) {
                let (from, to) = (format!("{}T00:00:00Z", w[0]), format!("{}T00:00:00Z", w[1]));
                let d = cp.get_usage(org, &from, &to).await.unwrap();
                let want_day = totals_of(
                    mine.iter()
                        .copied()
                        .filter(|e| e.received_at.starts_with(w[0])),
                );
                assert_eq!(
                    d.requests as i64, want_day.rows,
                    "seed {seed} {org} {}",
                    w[0]
                );
                assert_eq!(d.cost_micros, want_day.cost);
                assert_eq!(d.standard_cost_micros, want_day.standard);
                by_day.rows += d.requests as i64;
                by_day.input += d.input_tokens as i64;
                by_day.output += d.output_tokens as i64;
                by_day.cost += d.cost_micros;
                by_day.standard += d.standard_cost_micros;
            }
            assert_eq!(by_day, want, "seed {seed} {org}: days add up to the total");
            let mut by_month = BTreeMap::new();
            for (m, from, to) in [
                ("2026-01", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
                ("2026-02", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),
            ] {
                let s = cp.get_usage(org, from, to).await.unwrap();
                by_month.insert(
                    m,
                    (s.requests as i64, s.cost_micros, s.standard_cost_micros),
                );
            }
            let months: (i64, i64, i64) = by_month
                .values()
                .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
            assert_eq!(months, (want.rows, want.cost, want.standard));
        }
    }
    assert_eq!(consumer.stats().malformed.load(Ordering::Relaxed), 0);

    delivery.abort();
    drop(consumer);
    pool.close().await;
    drop(cp);
    db.drop_db().await;
}

/// The consumer's lag (`flex_usage_consumer_lag`) is what JetStream holds unacknowledged: it
/// grows to the backlog while the ledger cannot be written (its table locked), and returns to
/// 0 once the backlog is in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_counts_the_backlog_while_the_ledger_is_blocked() {
    let nats = NatsServer::start();
    let db = Pg::new().await;
    let cp = Arc::new(ControlPlane::open(&db.url(), keyring()).await.unwrap());
    let client = nats_client(&nats.url()).await;
    let js = async_nats::jetstream::new(client.clone());
    js.get_or_create_stream(usage_stream_config())
        .await
        .unwrap();
    let consumer = cp.spawn_usage_consumer(
        client.clone(),
        UsageConsumerConfig {
            lag_interval: Duration::from_millis(50),
            ..consumer_config()
        },
    );
    let lag = || consumer.stats().lag.load(Ordering::Relaxed);
    let until = |want: u64, what: &'static str| {
        let t0 = Instant::now();
        async move {
            loop {
                let got = lag();
                if got == want {
                    return;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "lag {got}, waiting for {want}: {what}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    until(0, "an empty stream").await;

    let pool = PgPool::connect(&db.url()).await.unwrap();
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE usage_ledger IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    for i in 0..20 {
        let e = event(&format!("req_lag_{i}"), "org_lag", 10);
        js.publish(
            nats_subject("org_lag"),
            serde_json::to_vec(&e).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    until(20, "20 events behind a locked ledger").await;
    lock.rollback().await.unwrap();
    until(0, "the backlog recorded").await;
    let (rows,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM usage_ledger WHERE org_id = 'org_lag'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows, 20);
}

/// One event that can never be delivered (a NUL in its model, a text field of 2 MB: both refused
/// before publishing, as the ledger would refuse them) does not hold up the rest: it goes to the usage log's dead-letter file, the
/// events behind it reach the ledger, over NATS and over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_event_goes_to_the_dead_letter_file_and_delivery_goes_on() {
    use flex_data_plane::usage::log::DEAD_LETTER_FILE;
    let nats = NatsServer::start();
    let db = Pg::new().await;
    let cp = Arc::new(ControlPlane::open(&db.url(), keyring()).await.unwrap());
    let meta = Metadata::new("test");
    let org = cp
        .create_org(&meta, "dead-letters", None)
        .await
        .unwrap()
        .org;
    let client = nats_client(&nats.url()).await;
    let _consumer = cp.spawn_usage_consumer(client.clone(), consumer_config());
    let pool = PgPool::connect(&db.url()).await.unwrap();
    let rows = |pool: PgPool, prefix: &'static str| async move {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM usage_ledger WHERE request_id LIKE $1")
            .bind(format!("{prefix}%"))
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let dead_lines = |dir: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(DEAD_LETTER_FILE))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let until = |what: &'static str, f: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(30), "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Over NATS: a NUL, then a 2 MB event (over the default 1 MB max_payload), between good ones.
    let state = tempfile::tempdir().unwrap();
    let wal = UsageWal::open(WalConfig::new(state.path())).unwrap();
    let stats = Arc::new(NatsDeliveryStats::default());
    let _delivery = spawn_log_delivery(&client, &stats, &wal);
    let mut nul = event("req_nats_bad_nul", &org.org_id, 5);
    nul.model = "gpt\u{0}5".into();
    let mut big = event("req_nats_bad_big", &org.org_id, 5);
    big.provider_request_id = "x".repeat(2 << 20);
    wal.emit(event("req_nats_ok_1", &org.org_id, 5));
    wal.emit(nul);
    wal.emit(big);
    wal.emit(event("req_nats_ok_2", &org.org_id, 5));
    until_rows(&pool, "req_nats_ok", 2).await;
    until("two dead letters over NATS", &|| {
        dead_lines(state.path()).len() == 2
    });
    let dead = dead_lines(state.path());
    assert_eq!(dead[0]["event"]["request_id"], "req_nats_bad_nul");
    assert!(
        dead[0]["reason"].as_str().unwrap().contains("NUL"),
        "{dead:?}"
    );
    assert_eq!(dead[1]["event"]["request_id"], "req_nats_bad_big");
    assert_eq!(rows(pool.clone(), "req_nats_bad").await, 0);
    let mut m = Vec::new();
    wal.metrics(&mut m);
    assert!(
        flex_data_plane::series::text(&m).contains("usage_dead_letters_total 2"),
        "counted"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(state.path().join(DEAD_LETTER_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Over gRPC: the control plane refuses an event of an org it does not know.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = cp.clone();
    tokio::spawn(async move {
        server
            .serve_with_listener(
                listener,
                &SecretString::from("t".to_string()),
                std::future::pending(),
            )
            .await
    });
    let state = tempfile::tempdir().unwrap();
    let wal = UsageWal::open(WalConfig::new(state.path())).unwrap();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    tokio::spawn(flex_data_plane::usage::log::deliver_grpc(
        wal.clone(),
        endpoint,
        flex_data_plane::control_client::ProxyToken::none(),
    ));
    wal.emit(event("req_grpc_ok_1", &org.org_id, 5));
    wal.emit(event("req_grpc_bad_org", "org_nobody", 5));
    wal.emit(event("req_grpc_ok_2", &org.org_id, 5));
    until_rows(&pool, "req_grpc_ok", 2).await;
    until("one dead letter over gRPC", &|| {
        dead_lines(state.path()).len() == 1
    });
    let dead = dead_lines(state.path());
    assert_eq!(dead[0]["event"]["request_id"], "req_grpc_bad_org");
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{dead:?}"
    );
}

/// Waits (30 s at most) until the ledger has `n` rows whose request id starts with `prefix`.
async fn until_rows(pool: &PgPool, prefix: &str, n: i64) {
    let t0 = Instant::now();
    loop {
        let rows: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM usage_ledger WHERE request_id LIKE $1")
                .bind(format!("{prefix}%"))
                .fetch_one(pool)
                .await
                .unwrap();
        if rows >= n {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{prefix}: {rows} of {n} rows arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
