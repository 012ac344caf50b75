//! Limits benchmark: what admission adds, and what limits cost a proxy's throughput.
//!
//! 1. Admission latency: `Limits::admit_demand` (one Lua script, one round trip) against a private
//!    `redis-server` on loopback, one request at a time and 32 at once, for a key with rpm, tpm
//!    and concurrency limits, and for an org and a key with all five limits (budgets too: the
//!    longest script path); each admission is settled as a request's end would (not timed). A
//!    `PING` round trip and the in-process limiter for comparison.
//! 2. Throughput of one proxy (in process, as `flex up` wires it, with its limits in that
//!    Redis) on the provider simulator: Chat Completions, non-streaming, `start_within: default`,
//!    for a key without limits and a key with all five (set high enough never to refuse),
//!    alternating off/on.
//!
//! Run: `cargo run --release --example limits -- [ADMISSIONS] [REQUESTS]` (defaults 20000, 20000).
//! Needs `redis-server` on the PATH (or `FLEX_TEST_REDIS_SERVER`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flex::sim::{self, SimConfig};
use flex_control_plane::domain::LimitChanges;
use flex_control_plane::{ControlPlane, Metadata};
use flex_data_plane::formats::CallerFormat;
use flex_data_plane::limits::{
    Decision, Demand, LeaseRef, LimitKind, Limiter, Limits, LimitsConfig, RedisLimiter, Scope,
    ScopeLimits, Settlement, DEFAULT_LEASE_TTL,
};
use flex_data_plane::providers::BaseUrls;
use flex_data_plane::proxy::ProxyConfig;
use flex_data_plane::upstream::UpstreamConfig;
use flex_shared::crypto::MasterKeyring;
use flex_shared::usage::UsageEvent;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};

const KEY: &str = "sk-bench-openai-limits-0000";
const HIGH: u64 = 1 << 50;

struct RedisServer(std::process::Child, u16);

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn redis_server() -> RedisServer {
    let bin = std::env::var("FLEX_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server on the PATH (apt-get install redis-server)");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    RedisServer(child, port)
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let i = ((v.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1);
    v[i].as_secs_f64() * 1e6
}

fn scope(org: &str, key: Option<&str>, all: bool) -> ScopeLimits {
    ScopeLimits {
        scope: Scope {
            org_id: org.into(),
            key_id: key.map(str::to_string),
        },
        rpm: HIGH,
        tpm: HIGH,
        concurrency: HIGH,
        daily_budget_micros: if all { HIGH as i64 } else { 0 },
        monthly_budget_micros: if all { HIGH as i64 } else { 0 },
    }
}

/// `n` admissions by `conc` tasks, each settled right after; the admission times, sorted.
async fn admissions(
    limits: &Limits,
    scopes: &[ScopeLimits],
    n: usize,
    conc: usize,
) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for t in 0..conc {
        let (limits, scopes) = (limits.clone(), scopes.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(n / conc);
            for i in 0..n / conc {
                let d = Demand {
                    lease: format!("bench-{t}-{i}"),
                    scopes: scopes.clone(),
                    tokens: 1200,
                    cost_micros: 900,
                    day: "20250101".into(),
                    month: "202501".into(),
                };
                let t0 = Instant::now();
                let a = limits
                    .admit_demand(d, CallerFormat::ChatCompletions)
                    .await
                    .unwrap_or_else(|e| panic!("refused: {e}"));
                out.push(t0.elapsed());
                a.permit.settle(&UsageEvent {
                    input_tokens: 30,
                    output_tokens: 40,
                    cost_micros: 450,
                    ..UsageEvent::default()
                });
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

/// `n` admissions one at a time straight on the Redis limiter, each settled (awaited, not timed)
/// before the next: the script's own round trip, with no settle queued beside it.
async fn raw_admissions(l: &RedisLimiter, scopes: &[ScopeLimits], n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let d = Demand {
            lease: format!("raw-{i}"),
            scopes: scopes.to_vec(),
            tokens: 1200,
            cost_micros: 900,
            day: "20250101".into(),
            month: "202501".into(),
        };
        let t0 = Instant::now();
        let decision = l.admit(&d).await.unwrap();
        out.push(t0.elapsed());
        assert!(matches!(decision, Decision::Granted(_)));
        l.settle(&Settlement {
            lease: Arc::new(LeaseRef {
                lease: d.lease.clone(),
                scopes: d.scopes.clone(),
                day: d.day.clone(),
                month: d.month.clone(),
            }),
            tokens: 70,
            cost_micros: 450,
        })
        .await
        .unwrap();
    }
    out.sort_unstable();
    out
}

async fn http_run(
    url: &str,
    auth: &str,
    body: &Bytes,
    n: usize,
    conc: usize,
) -> (Vec<Duration>, f64) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, url, auth, body) = (
            client.clone(),
            url.to_string(),
            auth.to_string(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(n / conc);
            for _ in 0..n / conc {
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
    let rps = all.len() as f64 / t.elapsed().as_secs_f64();
    all.sort_unstable();
    (all, rps)
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(20_000);
    let requests = args.get(1).copied().unwrap_or(20_000);
    let redis = redis_server();
    let url = format!("redis://127.0.0.1:{}", redis.1);
    let limits = Limits::redis(&url, Duration::from_secs(1), LimitsConfig::default()).unwrap();
    let local = Limits::in_process();

    // A PING round trip on a plain multiplexed connection: the floor of any admission.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut pings = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        pings.push(t0.elapsed());
    }
    pings.sort_unstable();

    let key_only = vec![scope("org_bench", Some("key_bench"), false)];
    let both = vec![
        scope("org_bench", None, true),
        scope("org_bench", Some("key_bench2"), true),
    ];
    // Warm-up (loads the scripts).
    admissions(&limits, &both, 1000, 1).await;
    println!(
        "admission latency (n={n} per row; the window then holds up to {n} entries per scope)"
    );
    println!(
        "| limiter | scopes and limits | concurrency | p50 µs | p99 µs | p99.9 µs | admissions/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| Redis PING (floor) | | 1 | {:.0} | {:.0} | {:.0} | |",
        pct(&pings, 0.5),
        pct(&pings, 0.99),
        pct(&pings, 0.999)
    );
    let raw = RedisLimiter::new(&url, Duration::from_secs(1), DEFAULT_LEASE_TTL).unwrap();
    for (what, scopes) in [
        ("key: rpm, tpm, concurrency", &key_only),
        ("org + key: all five", &both),
    ] {
        let lat = raw_admissions(&raw, scopes, n).await;
        println!(
            "| Redis, script alone (settle awaited between) | {what} | 1 | {:.0} | {:.0} | {:.0} | |",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 0.999)
        );
    }
    for (name, lim) in [("Redis", &limits), ("in process", &local)] {
        for (what, scopes) in [
            ("key: rpm, tpm, concurrency", &key_only),
            ("org + key: all five", &both),
        ] {
            for conc in [1, 32] {
                let t = Instant::now();
                let lat = admissions(lim, scopes, n, conc).await;
                let rate = lat.len() as f64 / t.elapsed().as_secs_f64();
                println!(
                    "| {name} | {what} | {conc} | {:.0} | {:.0} | {:.0} | {rate:.0} |",
                    pct(&lat, 0.5),
                    pct(&lat, 0.99),
                    pct(&lat, 0.999)
                );
            }
        }
    }
    let mut m = Vec::new();
    limits.metrics(&mut m);
    let m = flex_data_plane::series::text(&m);
    assert!(
        m.contains("limits_fail_open_total 0"),
        "Redis was unreachable during the run:\n{m}"
    );
    // Redis's own time per script call (admissions and settles together).
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    for line in info
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha") || l.starts_with("cmdstat_eval:"))
    {
        println!("redis {line}");
    }

    // ---- one proxy, limits off vs on ------------------------------------------------------
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
    let off = cp
        .create_api_key(&meta, &org.org_id, "off", None, None)
        .await
        .unwrap();
    let on = cp
        .create_api_key(&meta, &org.org_id, "on", None, None)
        .await
        .unwrap();
    let high = i64::try_from(HIGH).unwrap();
    cp.set_limits(
        &meta,
        &org.org_id,
        &on.key.key_id,
        &LimitChanges {
            rpm: Some(HIGH),
            tpm: Some(HIGH),
            concurrency: Some(HIGH),
            daily_budget_micros: Some(high),
            monthly_budget_micros: Some(high),
        },
    )
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
    let proxy_limits = Limits::redis(
        &url,
        Duration::from_secs(1),
        LimitsConfig {
            lease_ttl: DEFAULT_LEASE_TTL,
            ..LimitsConfig::default()
        },
    )
    .unwrap();
    let cfg = ProxyConfig {
        base_urls: BaseUrls {
            openai: sim.openai_base_url(),
            anthropic: sim.base_url(),
            gemini: sim.base_url(),
        },
        limits: proxy_limits.clone(),
        ..ProxyConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!(
        "http://{}/v1/chat/completions",
        listener.local_addr().unwrap()
    );
    let store = flex::run::embedded_proxy(
        &cp,
        flex_data_plane::snapshot::SnapshotStore::new(Some(ring), None),
        listener,
        &UpstreamConfig::default(),
        cfg,
        None,
    )
    .unwrap();
    while store.version() < cp.snapshot().version {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let body = Bytes::from(
        r#"{"model":"gpt-5.5","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Summarize the plot of Hamlet in one sentence."}],"max_completion_tokens":64,"start_within":"default"}"#,
    );
    let auth = |k: &flex_control_plane::CreatedApiKey| {
        format!("Bearer {}", k.secret.as_ref().unwrap().expose_secret())
    };
    http_run(&proxy_url, &auth(&off), &body, 1000, 32).await;
    http_run(&proxy_url, &auth(&on), &body, 1000, 32).await;
    println!();
    println!("one proxy, requests={requests} per row");
    println!("| limits | concurrency | p50 µs | p90 µs | p99 µs | req/s |");
    println!("|---|---|---|---|---|---|");
    for conc in [1, 32] {
        for round in 0..2 {
            for (name, key) in [("off", &off), ("on (Redis, 5 limits)", &on)] {
                let (lat, rps) = http_run(&proxy_url, &auth(key), &body, requests, conc).await;
                println!(
                    "| {name}{} | {conc} | {:.0} | {:.0} | {:.0} | {rps:.0} |",
                    if round == 1 { ", again" } else { "" },
                    pct(&lat, 0.5),
                    pct(&lat, 0.9),
                    pct(&lat, 0.99)
                );
            }
        }
    }
    let mut m = Vec::new();
    proxy_limits.metrics(&mut m);
    let m = flex_data_plane::series::text(&m);
    let refused: usize = LimitKind::ALL
        .iter()
        .map(|k| format!("limits_refused_total{{limit=\"{}\"}} 0", k.name()))
        .filter(|line| !m.contains(line))
        .count();
    assert_eq!(refused, 0, "a limit refused during the run:\n{m}");
    assert!(m.contains("limits_fail_open_total 0"), "{m}");
}
