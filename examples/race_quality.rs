//! Flex race quality: the hedged race (the product) against the naive one (standard launched only
//! at the deadline), on the same request set, in the same run.
//!
//! Setup: one control plane (SQLite in a temp dir) with two orgs, one per strategy, so the usage
//! ledger separates their money; two in-process proxies on it (`RaceStrategy::Hedged`,
//! `RaceStrategy::Naive`); one provider simulator per proxy, so each strategy's `SimStats`
//! (requests, starts, cancellations per provider:tier) are its own.
//!
//! Every request gets its fate from a `#sim` directive in the prompt, drawn once from a seeded
//! RNG and sent identically to both proxies:
//! - flex start delay ~ lognormal(median = `median-factor` × budget, `sigma`);
//! - a share of requests whose first k ∈ 1..=3 flex attempts get a 429 (`flex_fail_times=k`),
//!   and a share whose every flex attempt gets a 429 (flex never has capacity);
//! - standard start delay = `standard-ms` ± uniform `standard-jitter-ms`;
//! - faults (the failure policy): a share of requests whose flex attempt fails with a 500, 502
//!   or 504 (`flex-5xx-share`: standard must take over at once), and a share whose first
//!   standard attempt fails with a 503 (`standard-503-share`: flex stays alive, standard is
//!   tried again).
//!
//! Measured client side per request: time from sending to the first output text delta (a
//! streaming Responses or Chat caller against gpt-5.5), and the `x-flex-served-tier` header.
//! Hindsight optimum: flex could have served iff flex ever has capacity for the request and its
//! start delay ≤ the budget (capacity errors are answered at once, so an oracle retrying at
//! once loses nothing). "Started on both tiers" comes from the simulator: every successful
//! request started exactly one tier, so `started[flex] + started[default] − successes` counts
//! requests where both tiers produced content.
//!
//! Run: `cargo run --release --example race_quality -- [--requests N] [--budget-secs S]
//! [--concurrency C] [--seed X] [--median-factor F] [--sigma S] [--capacity-share P]
//! [--no-capacity-share P] [--standard-ms MS] [--standard-jitter-ms MS] [--caller responses|chat]
//! [--flex-5xx-share P] [--standard-503-share P]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flex::sim::{self, SimConfig, SimHandle};
use flex_control_plane::{ControlPlane, Metadata};
use flex_data_plane::providers::BaseUrls;
use flex_data_plane::proxy::{ProxyConfig, RaceStrategy};
use flex_data_plane::sse::{Event, Parser};
use flex_data_plane::upstream::UpstreamConfig;
use flex_shared::crypto::MasterKeyring;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

const KEY: &str = "sk-bench-openai-0000000000";
/// "Deadline met" allows this much past the budget (loopback HTTP and client-side timing).
const SLACK: Duration = Duration::from_millis(50);

struct Params {
    requests: usize,
    budget: Duration,
    concurrency: usize,
    seed: u64,
    median_factor: f64,
    sigma: f64,
    capacity_share: f64,
    no_capacity_share: f64,
    standard_ms: u64,
    standard_jitter_ms: u64,
    flex_5xx_share: f64,
    standard_503_share: f64,
    chat: bool,
    /// Per-request CSV (strategy, index, fate, outcome) for analysis.
    dump: Option<String>,
}

impl Params {
    fn from_args() -> Self {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let get = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let num = |name: &str, default: f64| -> f64 {
            get(name).map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} wants a number, got {v}"))
            })
        };
        let budget_secs = num("--budget-secs", 5.0);
        assert!(
            (5.0..=600.0).contains(&budget_secs),
            "start_within allows 5 s to 10 min"
        );
        Self {
            requests: num("--requests", 2000.0) as usize,
            budget: Duration::from_secs_f64(budget_secs.round()),
            concurrency: num("--concurrency", 64.0) as usize,
            seed: num("--seed", 42.0) as u64,
            median_factor: num("--median-factor", 0.8),
            sigma: num("--sigma", 0.6),
            capacity_share: num("--capacity-share", 0.15),
            no_capacity_share: num("--no-capacity-share", 0.05),
            standard_ms: num("--standard-ms", 300.0) as u64,
            standard_jitter_ms: num("--standard-jitter-ms", 100.0) as u64,
            flex_5xx_share: num("--flex-5xx-share", 0.05),
            standard_503_share: num("--standard-503-share", 0.02),
            chat: match get("--caller").as_deref() {
                None | Some("responses") => false,
                Some("chat") => true,
                Some(other) => panic!("--caller responses|chat, got {other}"),
            },
            dump: get("--dump"),
        }
    }
}

#[derive(Clone, Copy)]
enum Capacity {
    Available,
    /// The first k flex attempts get a 429.
    FailTimes(u32),
    /// Every flex attempt gets a 429.
    Never,
}

#[derive(Clone)]
struct Spec {
    flex_delay_ms: u64,
    standard_delay_ms: u64,
    capacity: Capacity,
    /// The flex attempt fails with this server error.
    flex_5xx: Option<u16>,
    /// The first standard attempt fails with a 503.
    standard_503: bool,
    directive: String,
}

impl Spec {
    /// What an oracle with the whole future in hand would do: flex iff it can start by D.
    fn optimum_flex(&self, budget: Duration) -> bool {
        !matches!(self.capacity, Capacity::Never)
            && self.flex_5xx.is_none()
            && Duration::from_millis(self.flex_delay_ms) <= budget
    }
}

fn specs(p: &Params) -> Vec<Spec> {
    let mut rng = StdRng::seed_from_u64(p.seed);
    let mu = (p.median_factor * p.budget.as_secs_f64() * 1000.0).ln();
    (0..p.requests)
        .map(|i| {
            // Box-Muller for a standard normal.
            let (u1, u2): (f64, f64) = (rng.gen::<f64>().max(1e-12), rng.gen());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            let flex_delay_ms = (mu + p.sigma * z).exp().round() as u64;
            let jitter = rng.gen_range(0..=2 * p.standard_jitter_ms);
            let standard_delay_ms = (p.standard_ms + jitter).saturating_sub(p.standard_jitter_ms);
            let roll: f64 = rng.gen();
            let capacity = if roll < p.no_capacity_share {
                Capacity::Never
            } else if roll < p.no_capacity_share + p.capacity_share {
                Capacity::FailTimes(rng.gen_range(1..=3))
            } else {
                Capacity::Available
            };
            let mut directive = format!(
                "#sim flex_delay_ms={flex_delay_ms} standard_delay_ms={standard_delay_ms} output_tokens=40 sim_id=rq-{i}"
            );
            let fault: f64 = rng.gen();
            let flex_5xx = (matches!(capacity, Capacity::Available) && fault < p.flex_5xx_share)
                .then(|| [500, 502, 504][rng.gen_range(0..3)]);
            let standard_503 = rng.gen::<f64>() < p.standard_503_share;
            match (capacity, flex_5xx) {
                (_, Some(status)) => directive.push_str(&format!(" flex_status={status}")),
                (Capacity::Available, None) => {}
                (Capacity::FailTimes(k), _) => {
                    directive.push_str(&format!(" flex_status=429 flex_fail_times={k}"))
                }
                (Capacity::Never, _) => directive.push_str(" flex_status=429"),
            }
            if standard_503 {
                directive.push_str(" standard_status=503 standard_fail_times=1");
            }
            Spec {
                flex_delay_ms,
                standard_delay_ms,
                capacity,
                flex_5xx,
                standard_503,
                directive,
            }
        })
        .collect()
}

/// `HHh-MMm-SSs`.
fn start_within(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}h-{:02}m-{:02}s", s / 3600, s / 60 % 60, s % 60)
}

struct Outcome {
    status: u16,
    first_byte: Option<Duration>,
    served: String,
    reason: String,
}

/// Whether an SSE event of the caller's format carries output text.
fn is_content(chat: bool, ev: &Event) -> bool {
    if chat {
        serde_json::from_str::<Value>(&ev.data).is_ok_and(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
    } else {
        ev.event == "response.output_text.delta"
    }
}

async fn one(
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
    auth: String,
    body: Bytes,
    chat: bool,
) -> Outcome {
    let req = http::Request::post(&url)
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let t = Instant::now();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (served, reason) = (header("x-flex-served-tier"), header("x-flex-reason"));
    let mut body = resp.into_body();
    let mut parser = Parser::new();
    let mut events = Vec::new();
    let mut first_byte = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        if first_byte.is_none() {
            events.clear();
            parser.feed(&data, &mut events).unwrap();
            if events.iter().any(|e| is_content(chat, e)) {
                first_byte = Some(t.elapsed());
            }
        }
    }
    Outcome {
        status,
        first_byte,
        served,
        reason,
    }
}

struct Arm {
    name: &'static str,
    sim: SimHandle,
    org_id: String,
    url: String,
    /// The proxy's `/metrics` (its `--metrics-listen`).
    metrics_url: String,
    auth: String,
}

/// A counter from the proxy's `/metrics`.
async fn metric(client: &Client<HttpConnector, Full<Bytes>>, url: &str, name: &str) -> u64 {
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn setup(
    cp: &Arc<ControlPlane>,
    ring: &Arc<MasterKeyring>,
    name: &'static str,
    strategy: RaceStrategy,
    chat: bool,
) -> Arm {
    let meta = Metadata::new("bench");
    let org = cp.create_org(&meta, name, None).await.unwrap().org;
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
        strategy,
        ..ProxyConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let path = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/responses"
    };
    let url = format!("http://{}{path}", listener.local_addr().unwrap());
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", metrics.local_addr().unwrap());
    let (store, _server, _feed) = flex::run::embedded_proxy_until(
        cp,
        flex_data_plane::snapshot::SnapshotStore::new(Some(ring.clone()), None),
        listener,
        &UpstreamConfig::default(),
        cfg,
        None,
        std::future::pending(),
        Duration::ZERO,
        Some(metrics),
    )
    .unwrap();
    while store.version() < cp.snapshot().version {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Arm {
        name,
        sim,
        org_id: org.org_id,
        url,
        metrics_url,
        auth: format!("Bearer {}", key.secret.as_ref().unwrap().expose_secret()),
    }
}

fn body_for(spec: &Spec, p: &Params, i: usize) -> Bytes {
    let prompt = format!(
        "Request {i}: summarize the attached meeting notes in three bullet points. {}",
        spec.directive
    );
    let sw = start_within(p.budget);
    let v = if p.chat {
        json!({"model": "gpt-5.5", "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": prompt}],
               "max_completion_tokens": 256, "stream": true, "start_within": sw})
    } else {
        json!({"model": "gpt-5.5", "instructions": "You are terse.", "input": prompt,
               "max_output_tokens": 256, "stream": true, "start_within": sw})
    };
    Bytes::from(serde_json::to_vec(&v).unwrap())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1);
    sorted[i]
}

fn share(n: usize, of: usize) -> String {
    format!("{:.1} %", 100.0 * n as f64 / of.max(1) as f64)
}

fn dollars(micros: i64) -> String {
    format!("${:.4}", micros as f64 / 1e6)
}

#[tokio::main]
async fn main() {
    let p = Arc::new(Params::from_args());
    let specs = Arc::new(specs(&p));
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
    let arms = vec![
        setup(&cp, &ring, "hedged", RaceStrategy::Hedged, p.chat).await,
        setup(&cp, &ring, "naive", RaceStrategy::Naive, p.chat).await,
    ];

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(p.concurrency * 2)
        .build_http();
    let started_at = Instant::now();
    let mut handles = Vec::new();
    for arm in &arms {
        let sem = Arc::new(Semaphore::new(p.concurrency));
        let mut tasks = Vec::with_capacity(p.requests);
        for (i, spec) in specs.iter().enumerate() {
            let permit = sem.clone().acquire_owned();
            let (client, url, auth, body, chat) = (
                client.clone(),
                arm.url.clone(),
                arm.auth.clone(),
                body_for(spec, &p, i),
                p.chat,
            );
            tasks.push(tokio::spawn(async move {
                let _permit = permit.await.unwrap();
                one(client, url, auth, body, chat).await
            }));
        }
        handles.push(tasks);
    }
    let mut results: Vec<Vec<Outcome>> = Vec::new();
    for tasks in handles {
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.unwrap());
        }
        results.push(out);
    }
    let wall = started_at.elapsed();

    // The ledger is fed asynchronously: wait until it holds every request of both orgs.
    let mut usage = Vec::new();
    for arm in &arms {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let u = cp.get_usage(&arm.org_id, "", "").await.unwrap();
            if u.requests >= p.requests as u64 || Instant::now() > deadline {
                usage.push(u);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let budget_ms = p.budget.as_secs_f64() * 1000.0;
    let optimum = specs.iter().filter(|s| s.optimum_flex(p.budget)).count();
    let mean_flex_delay =
        specs.iter().map(|s| s.flex_delay_ms as f64).sum::<f64>() / specs.len() as f64;
    let mean_std_delay = specs
        .iter()
        .map(|s| s.standard_delay_ms as f64)
        .sum::<f64>()
        / specs.len() as f64;
    println!(
        "requests={} per strategy, budget D={} s (start_within \"{}\"), concurrency={} per strategy, seed={}, caller={}",
        p.requests,
        p.budget.as_secs(),
        start_within(p.budget),
        p.concurrency,
        p.seed,
        if p.chat { "chat_completions" } else { "responses" }
    );
    println!(
        "flex start delay ~ lognormal(median {:.0} ms, sigma {}), mean {:.0} ms; P(delay <= D) = {}",
        p.median_factor * budget_ms,
        p.sigma,
        mean_flex_delay,
        share(
            specs
                .iter()
                .filter(|s| Duration::from_millis(s.flex_delay_ms) <= p.budget)
                .count(),
            specs.len()
        )
    );
    let count = |f: fn(&Capacity) -> bool| specs.iter().filter(|s| f(&s.capacity)).count();
    println!(
        "flex capacity: {} fail 1-3 times with 429 then succeed, {} never have capacity; standard start {} ± {} ms (mean {:.0} ms)",
        count(|c| matches!(c, Capacity::FailTimes(_))),
        count(|c| matches!(c, Capacity::Never)),
        p.standard_ms,
        p.standard_jitter_ms,
        mean_std_delay
    );
    println!(
        "faults: {} flex attempts fail with 500/502/504, {} first standard attempts fail with 503",
        specs.iter().filter(|s| s.flex_5xx.is_some()).count(),
        specs.iter().filter(|s| s.standard_503).count()
    );
    println!("wall time {:.1} s", wall.as_secs_f64());
    println!();
    println!("| strategy | served by flex | hindsight optimum | deadline met (≤ D + 50 ms) | failed | first byte p50 − D | first byte p99 − D | started on both tiers (simulator) | of which seen by the proxy | cost | always-standard cost | saved |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    for ((arm, res), u) in arms.iter().zip(&results).zip(&usage) {
        let ok: Vec<&Outcome> = res
            .iter()
            .filter(|o| o.status == 200 && o.first_byte.is_some())
            .collect();
        let flex = ok.iter().filter(|o| o.served == "flex").count();
        let met = ok
            .iter()
            .filter(|o| o.first_byte.unwrap() <= p.budget + SLACK)
            .count();
        let mut rel: Vec<f64> = ok
            .iter()
            .map(|o| o.first_byte.unwrap().as_secs_f64() * 1000.0 - budget_ms)
            .collect();
        rel.sort_by(f64::total_cmp);
        let stats = arm.sim.stats.snapshot();
        let started = stats.started("openai:flex") + stats.started("openai:default");
        let both = started.saturating_sub(ok.len() as u64);
        let seen = metric(&client, &arm.metrics_url, "flex_race_loser_started_total ").await;
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for o in res {
            *reasons.entry(o.reason.as_str()).or_default() += 1;
        }
        let failed = res.len() - ok.len();
        println!(
            "| {} | {} | {} | {} | {} | {:+.0} ms | {:+.0} ms | {} | {} | {} | {} | {} ({:.1} %) |",
            arm.name,
            share(flex, res.len()),
            share(optimum, res.len()),
            share(met, res.len()),
            res.len() - ok.len(),
            pct(&rel, 0.5),
            pct(&rel, 0.99),
            both,
            seen,
            dollars(u.cost_micros),
            dollars(u.standard_cost_micros),
            dollars(u.savings_micros),
            100.0 * u.savings_micros as f64 / u.standard_cost_micros.max(1) as f64
        );
        notes.push(format!(
            "{}: {} ok, {} failed; reasons {:?}; ledger {} requests ({} flex); sim openai:flex requests={} capacity_errors={} started={} cancelled={}, openai:default requests={} started={} cancelled={}",
            arm.name,
            ok.len(),
            failed,
            reasons,
            u.requests,
            u.flex_requests,
            stats.requests("openai:flex"),
            stats.capacity_errors("openai:flex"),
            stats.started("openai:flex"),
            stats.cancelled("openai:flex"),
            stats.requests("openai:default"),
            stats.started("openai:default"),
            stats.cancelled("openai:default"),
        ));
    }
    println!();
    for n in notes {
        println!("{n}");
    }
    if let Some(path) = &p.dump {
        let mut csv = String::from(
            "strategy,index,flex_delay_ms,standard_delay_ms,flex_fail_times,status,served,reason,first_byte_ms\n",
        );
        for (arm, res) in arms.iter().zip(&results) {
            for (i, (s, o)) in specs.iter().zip(res).enumerate() {
                let fails = match s.capacity {
                    Capacity::Available => "0".to_string(),
                    Capacity::FailTimes(k) => k.to_string(),
                    Capacity::Never => "always".to_string(),
                };
                csv.push_str(&format!(
                    "{},{i},{},{},{fails},{},{},{},{}\n",
                    arm.name,
                    s.flex_delay_ms,
                    s.standard_delay_ms,
                    o.status,
                    o.served,
                    o.reason,
                    o.first_byte.map_or(String::new(), |d| format!(
                        "{:.1}",
                        d.as_secs_f64() * 1000.0
                    ))
                ));
            }
        }
        std::fs::write(path, csv).unwrap();
    }
}
