//! Proxy overhead benchmark: the same requests straight to the provider simulator and through the
//! proxy (`start_within: "default"`, non-streaming, so there is no race), over loopback HTTP/1.1
//! with keep-alive. Reports latency percentiles and what the proxy adds.
//!
//! Run: `cargo run --release --example overhead -- [REQUESTS] [CONCURRENCY] [--usage-log]
//! [--no-metrics]`
//!
//! `--no-metrics`: the proxy counts no request series (as `flex proxy` without
//! `--metrics-listen`); without it every request is counted, as with a metrics listener.
//!
//! `--usage-log`: the proxy writes usage to the write-ahead usage log (as `flex proxy
//! --state-dir` does: each answer's end waits for its event's group fsync), in a temp dir on the
//! machine's disk, and a task delivers the log into the ledger; without it, usage goes to the
//! ledger from memory (as in `flex up`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flex::sim::{self, SimConfig};
use flex_control_plane::{ControlPlane, Metadata};
use flex_data_plane::providers::BaseUrls;
use flex_data_plane::proxy::ProxyConfig;
use flex_data_plane::upstream::UpstreamConfig;
use flex_data_plane::usage::log::{UsageWal, WalConfig};
use flex_shared::crypto::MasterKeyring;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};

const KEY: &str = "sk-bench-openai-0000000000";

async fn run(url: &str, auth: &str, body: &Bytes, n: usize, conc: usize) -> Vec<Duration> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let per = n / conc;
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, url, auth, body) = (
            client.clone(),
            url.to_string(),
            auth.to_string(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per);
            for _ in 0..per {
                let req = http::Request::post(&url)
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .unwrap();
                let t = Instant::now();
                let resp = client.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap();
                out.push(t.elapsed());
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    all
}

/// Delivery from the usage log into the ledger (what NATS and the consumer do, in process).
async fn deliver_log(wal: Arc<UsageWal>, cp: Arc<ControlPlane>) {
    loop {
        wal.until_pending().await;
        // Errors only when the benchmark ends (its temp dir is gone): stop.
        let Ok(chunk) = wal.read(1000) else { return };
        let end = chunk.end;
        let events: Vec<_> = chunk.events.into_iter().map(|e| e.event).collect();
        if cp.record_usage(&events).await.is_err() || wal.advance(end).is_err() {
            return;
        }
    }
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let i = ((v.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1);
    v[i].as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(20_000);
    let conc = args.get(1).copied().unwrap_or(32);
    let usage_log = std::env::args().any(|a| a == "--usage-log");
    let metrics = !std::env::args().any(|a| a == "--no-metrics");
    let dir = tempfile::tempdir().unwrap();
    let ring =
        Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "bench").unwrap());
    let cp = Arc::new(
        ControlPlane::open(
            &format!("sqlite://{}?mode=rwc", dir.path().join("b.db").display()),
            ring.clone(),
        )
        .await
        .unwrap(),
    );
    let meta = Metadata::new("bench");
    let org = cp.create_org(&meta, "bench", None).await.unwrap().org;
    let key = cp
        .create_api_key(&meta, &org.org_id, "b", None, None)
        .await
        .unwrap();
    cp.set_provider_key(
        &meta,
        &org.org_id,
        "openai",
        &SecretString::from(KEY.to_string()),
    )
    .await
    .unwrap();
    let sim = sim::spawn(SimConfig {
        openai_key: Some(KEY.into()),
        standard_delay_ms: 0,
        flex_delay_ms: 0,
        priority_delay_ms: 0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let cfg = ProxyConfig {
        base_urls: BaseUrls {
            openai: sim.openai_base_url(),
            anthropic: sim.base_url(),
            gemini: sim.base_url(),
        },
        metrics,
        ..ProxyConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!(
        "http://{}/v1/chat/completions",
        listener.local_addr().unwrap()
    );
    let mut wal = None;
    let mut delivery = None;
    let store = if usage_log {
        let store = Arc::new(flex_data_plane::snapshot::SnapshotStore::new(
            Some(ring),
            None,
        ));
        tokio::spawn(flex::run::follow_in_process(cp.clone(), store.clone()));
        let w = UsageWal::open(WalConfig::new(dir.path().join("proxy-state"))).unwrap();
        delivery = Some(tokio::spawn(deliver_log(w.clone(), cp.clone())));
        flex::run::serve_proxy(
            listener,
            store.clone(),
            &UpstreamConfig::default(),
            cfg,
            None,
            w.clone(),
        )
        .unwrap();
        wal = Some(w);
        store
    } else {
        flex::run::embedded_proxy(
            &cp,
            flex_data_plane::snapshot::SnapshotStore::new(Some(ring), None),
            listener,
            &UpstreamConfig::default(),
            cfg,
            None,
        )
        .unwrap()
    };
    while store.version() < cp.snapshot().version {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let body = Bytes::from(
        r#"{"model":"gpt-5.5","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Summarize the plot of Hamlet in one sentence."}],"max_completion_tokens":64,"start_within":"default"}"#,
    );
    let direct_body = body.clone();
    let sim_url = format!("{}/chat/completions", sim.openai_base_url());
    // Warm-up.
    run(&sim_url, &format!("Bearer {KEY}"), &direct_body, 1000, conc).await;
    run(
        &proxy_url,
        &format!("Bearer {}", key.secret.as_ref().unwrap().expose_secret()),
        &body,
        1000,
        conc,
    )
    .await;
    let t = Instant::now();
    let direct = run(&sim_url, &format!("Bearer {KEY}"), &direct_body, n, conc).await;
    let direct_rps = direct.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let via = run(
        &proxy_url,
        &format!("Bearer {}", key.secret.as_ref().unwrap().expose_secret()),
        &body,
        n,
        conc,
    )
    .await;
    let via_rps = via.len() as f64 / t.elapsed().as_secs_f64();
    println!(
        "requests={} concurrency={conc} usage={}",
        direct.len(),
        if usage_log {
            "write-ahead log (fsync per group)"
        } else {
            "memory"
        }
    );
    if let Some(w) = &wal {
        let s = w.stats();
        let appended = s.appended.load(std::sync::atomic::Ordering::Relaxed);
        let commits = s.commits.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "usage log: {appended} events in {commits} fsyncs ({:.1} per group), durable-wait timeouts {}",
            appended as f64 / commits.max(1) as f64,
            s.durable.timeouts.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    println!("| path | p50 µs | p90 µs | p99 µs | req/s |");
    println!("|---|---|---|---|---|");
    println!(
        "| simulator direct | {:.0} | {:.0} | {:.0} | {:.0} |",
        pct(&direct, 0.5),
        pct(&direct, 0.9),
        pct(&direct, 0.99),
        direct_rps
    );
    println!(
        "| through the proxy | {:.0} | {:.0} | {:.0} | {:.0} |",
        pct(&via, 0.5),
        pct(&via, 0.9),
        pct(&via, 0.99),
        via_rps
    );
    println!(
        "| added by the proxy | {:.0} | {:.0} | {:.0} | |",
        pct(&via, 0.5) - pct(&direct, 0.5),
        pct(&via, 0.9) - pct(&direct, 0.9),
        pct(&via, 0.99) - pct(&direct, 0.99)
    );
    if let Some(d) = delivery {
        d.abort();
    }
}
