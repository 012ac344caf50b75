#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Usage ingest benchmark: events/s from JetStream into the Postgres ledger through the control
//! plane's usage consumer (one transaction per batch, acks after commit).
//!
//! `cargo run --release --example usage_ingest -- [EVENTS] [BATCH,BATCH,…]`
//! (default 200000 events, batch 1000).
//!
//! Starts a private `nats-server -js` on a free port (store in a temp dir) and uses a fresh
//! Postgres database per run (`FLEX_TEST_POSTGRES_URL`, default postgres://postgres@127.0.0.1:5432).
//! First the proxy side: EVENTS usage events are queued and published through the proxy's
//! delivery path (`NatsDelivery`: pipelined publishes, every ack awaited). Then, per batch size,
//! a control plane on a fresh database drains the stream with a new durable consumer; the clock
//! runs from the consumer's start until the ledger holds every event (checked with COUNT(*)).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flex_control_plane::sqlx::{self, Connection, Executor, PgConnection, PgPool};
use flex_control_plane::usage_consumer::UsageConsumerConfig;
use flex_control_plane::ControlPlane;
use flex_data_plane::usage::UsageSink;
use flex_data_plane::usage_nats::{NatsDelivery, NatsDeliveryConfig, UsageQueue};
use flex_shared::crypto::MasterKeyring;
use flex_shared::usage::UsageEvent;

fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FLEX_TEST_NATS_SERVER") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("nats-server");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("/usr/sbin/nats-server")
}

fn event(i: usize) -> UsageEvent {
    UsageEvent {
        schema_version: 1,
        request_id: format!("req_bench_{i:09}"),
        org_id: format!("org_bench_{}", i % 50),
        key_id: "key_bench".into(),
        model: "gpt-5.5".into(),
        provider: "openai".into(),
        caller_format: "responses".into(),
        start_within: "00h-00m-30s".into(),
        served_tier: if i.is_multiple_of(4) {
            "standard"
        } else {
            "flex"
        }
        .into(),
        reason: "flex_started".into(),
        flex_wait_ms: 1200,
        start_latency_ms: 1250,
        duration_ms: 4000,
        input_tokens: 1000 + (i % 977) as u64,
        cached_input_tokens: 128,
        output_tokens: 200 + (i % 331) as u64,
        reasoning_tokens: 64,
        status: 200,
        outcome: "ok".into(),
        tiers_started: vec!["flex".into()],
        cost_micros: 1_000 + (i % 7919) as i64,
        standard_cost_micros: 2_000 + (i % 7919) as i64 * 2,
        received_at: "2026-11-23T10:00:00.000000Z".into(),
        provider_request_id: String::new(),
    }
}

async fn fresh_db(base: &str) -> (String, String) {
    let admin = format!("{base}/postgres");
    let mut conn = PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("Postgres unreachable at {admin}: {e}"));
    let name = format!("flex_bench_{}", uuid::Uuid::new_v4().simple());
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    (format!("{base}/{name}"), name)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let batches: Vec<usize> = args
        .get(2)
        .map(|s| s.split(',').filter_map(|b| b.parse().ok()).collect())
        .unwrap_or_else(|| vec![1000]);
    let pg_base = std::env::var("FLEX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
        .trim_end_matches('/')
        .to_string();

    // A private nats-server.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = tempfile::tempdir().unwrap();
    let mut nats = Command::new(nats_server_bin())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server");
    let url = format!("nats://127.0.0.1:{port}");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nats-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let client = async_nats::connect(&url).await.unwrap();

    // Proxy side: publish through the delivery path.
    let queue = UsageQueue::with_capacity(n);
    for i in 0..n {
        queue.emit(event(i));
    }
    let delivery = NatsDelivery::new(client.clone(), NatsDeliveryConfig::default());
    let dstats = delivery.stats();
    let t0 = Instant::now();
    let task = tokio::spawn(delivery.run(queue.clone()));
    while dstats.published.load(Ordering::Relaxed) < n as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let publish_secs = t0.elapsed().as_secs_f64();
    task.abort();
    assert_eq!(dstats.failures.load(Ordering::Relaxed), 0);
    println!(
        "publish (proxy delivery path): {n} events in {publish_secs:.2} s = {:.0} events/s",
        n as f64 / publish_secs
    );

    println!();
    println!("| events | batch | ingest s | events/s | transactions | duplicates | malformed |");
    println!("|---|---|---|---|---|---|---|");
    let keyring =
        Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "bench").unwrap());
    for (run, batch) in batches.iter().enumerate() {
        let (db_url, db_name) = fresh_db(&pg_base).await;
        let cp = Arc::new(ControlPlane::open(&db_url, keyring.clone()).await.unwrap());
        let pool = PgPool::connect(&db_url).await.unwrap();
        let t0 = Instant::now();
        let consumer = cp.spawn_usage_consumer(
            client.clone(),
            UsageConsumerConfig {
                durable: format!("bench-{run}-{batch}"),
                batch: *batch,
                ..UsageConsumerConfig::default()
            },
        );
        let stats = consumer.stats().clone();
        while stats.recorded.load(Ordering::Relaxed) < n as u64 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let secs = t0.elapsed().as_secs_f64();
        let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*)::BIGINT FROM usage_ledger")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rows, n as i64, "the ledger holds every event once");
        println!(
            "| {n} | {batch} | {secs:.2} | {:.0} | {} | {} | {} |",
            n as f64 / secs,
            stats.batches.load(Ordering::Relaxed),
            stats.duplicates.load(Ordering::Relaxed),
            stats.malformed.load(Ordering::Relaxed),
        );
        drop(consumer);
        pool.close().await;
        drop(cp);
        let mut conn = PgConnection::connect(&format!("{pg_base}/postgres"))
            .await
            .unwrap();
        conn.execute(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)").as_str())
            .await
            .ok();
    }
    nats.kill().ok();
    nats.wait().ok();
}
