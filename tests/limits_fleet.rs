//! Limits across a fleet of real processes: `flex control` on a fresh Postgres database (with
//! `--redis-url`, for `flex admin limits show`), a private `redis-server`, the provider
//! simulator, and three `flex proxy` processes sharing that Redis, each with its own state dir.
//! Clients hammer all three proxies at once, and every limit holds for the fleet as a whole:
//! exactly 300 of 450 requests under `--rpm 300`; never more in flight at the simulator than
//! `--concurrency 4`; settled spend never over the daily budget; the tokens of a tpm limit over
//! it by at most the excess of the requests in flight over their reservations (the test computes
//! that bound). A proxy killed while holding concurrency slots gives them back after the lease
//! TTL; Redis killed in the middle: the proxies keep answering on their local shares (fail open),
//! log it, and count exactly in Redis again once it is back. Every request has exactly one row in
//! the ledger. Postgres and redis-server are required (see `common/infra.rs`); never skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/infra.rs"]
mod infra;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use infra::{free_port, output_with_stdin, Pg, Proc, Redis};
use serde_json::{json, Value};
use sqlx::Connection;

const TOKEN: &str = "limits-admin-token";
const OPENAI_KEY: &str = "sk-sim-limits-fleet-0000";
/// Short leases, so a killed proxy's slots come back within the test.
const LEASE_TTL_SECS: u64 = 3;

fn spawn_flex(name: &str, args: &[String], log: PathBuf) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flex"));
    cmd.env_clear()
        .env("FLEX_LOG", "warn,flex=info,flex_data_plane=info")
        .args(args);
    Proc::spawn(name, cmd, log).tail_on_panic(40)
}

type Http = Client<HttpConnector, Full<Bytes>>;

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

async fn chat(http: &Http, base: &str, key: &str, body: &Value) -> Reply {
    let req = http::Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), http.request(req))
        .await
        .expect("no answer within 60 s")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

fn chat_body(text: &str, max_tokens: u64) -> Value {
    json!({
        "model": "gpt-5.5",
        "messages": [{"role": "user", "content": text}],
        "max_completion_tokens": max_tokens,
        "start_within": "default",
    })
}

struct Fleet {
    dir: tempfile::TempDir,
    pg: Pg,
    redis: Redis,
    sim: flex::sim::SimHandle,
    master_key: PathBuf,
    control_port: u16,
    _control: Proc,
    ports: Vec<u16>,
    /// Each proxy's `--metrics-listen`.
    metrics_ports: Vec<u16>,
    proxies: Vec<Proc>,
    org: String,
    http: Http,
}

impl Fleet {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pg = Pg::new().await;
        let redis = Redis::start();
        let sim = flex::sim::spawn(flex::sim::SimConfig {
            openai_key: Some(OPENAI_KEY.into()),
            standard_delay_ms: 2,
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
        let control_port = free_port();
        let control = spawn_flex(
            "control",
            &[
                "control".into(),
                "--database-url".into(),
                pg.url(),
                "--listen".into(),
                format!("127.0.0.1:{control_port}"),
                "--admin-token".into(),
                TOKEN.into(),
                "--master-key-file".into(),
                master_key.to_str().unwrap().into(),
                "--redis-url".into(),
                redis.url(),
            ],
            dir.path().join("control.log"),
        );
        let mut fleet = Self {
            dir,
            pg,
            redis,
            sim,
            master_key,
            control_port,
            _control: control,
            ports: (0..3).map(|_| free_port()).collect(),
            metrics_ports: (0..3).map(|_| free_port()).collect(),
            proxies: Vec::new(),
            org: String::new(),
            http: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(64)
                .build_http(),
        };
        let t0 = Instant::now();
        while !fleet.admin_raw(&["org", "list"]).status.success() {
            assert!(t0.elapsed() < Duration::from_secs(30), "control plane down");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        fleet.org = fleet.admin(&["org", "create", "limits"])["org_id"]
            .as_str()
            .unwrap()
            .to_string();
        let org = fleet.org.clone();
        let out = output_with_stdin(
            fleet
                .admin_cmd()
                .args(["provider-key", "set", "--org", &org, "--provider", "openai"]),
            Some(OPENAI_KEY),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for i in 0..3 {
            let p = fleet.spawn_proxy(i);
            fleet.proxies.push(p);
        }
        for i in 0..3 {
            fleet.wait_ready(i).await;
        }
        fleet
    }

    fn admin_cmd(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flex"));
        cmd.env_clear().args([
            "admin",
            "--endpoint",
            &format!("http://127.0.0.1:{}", self.control_port),
            "--token",
            TOKEN,
            "--json",
        ]);
        cmd
    }

    fn admin_raw(&self, args: &[&str]) -> std::process::Output {
        output_with_stdin(self.admin_cmd().args(args), None)
    }

    fn admin(&self, args: &[&str]) -> Value {
        let out = self.admin_raw(args);
        assert!(
            out.status.success(),
            "flex admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn base(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    fn spawn_proxy(&self, i: usize) -> Proc {
        let id = format!("limits-{}", i + 1);
        spawn_flex(
            &id,
            &[
                "proxy".into(),
                "--listen".into(),
                format!("127.0.0.1:{}", self.ports[i]),
                "--metrics-listen".into(),
                format!("127.0.0.1:{}", self.metrics_ports[i]),
                "--control-url".into(),
                format!("http://127.0.0.1:{}", self.control_port),
                "--state-dir".into(),
                self.dir.path().join(&id).to_str().unwrap().into(),
                "--master-key-file".into(),
                self.master_key.to_str().unwrap().into(),
                "--proxy-id".into(),
                id.clone(),
                "--openai-base-url".into(),
                self.sim.openai_base_url(),
                "--redis-url".into(),
                self.redis.url(),
                "--limits-fail".into(),
                "open".into(),
                "--limits-lease-ttl-secs".into(),
                LEASE_TTL_SECS.to_string(),
                // Debug builds of five processes on two cores can take longer than the default
                // 250 ms to schedule a reply under this load; a timeout would be counted locally.
                "--redis-timeout-ms".into(),
                "3000".into(),
            ],
            self.dir.path().join(format!("{id}.log")),
        )
    }

    async fn wait_ready(&self, i: usize) {
        let t0 = Instant::now();
        loop {
            if let Ok((200, _)) = infra::request(
                http::Method::GET,
                &format!("{}/readyz", self.base(i)),
                None,
                None,
            )
            .await
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "proxy {i} not ready\n{}",
                self.proxies[i].log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A series of proxy `i`'s metrics (`--metrics-listen`), by its name without `flex_`.
    async fn metric(&self, i: usize, name: &str) -> f64 {
        let name = format!("flex_{name}");
        let name = name.as_str();
        let (_, text) = infra::request(
            http::Method::GET,
            &format!("http://127.0.0.1:{}/metrics", self.metrics_ports[i]),
            None,
            None,
        )
        .await
        .unwrap();
        text.lines()
            .find_map(|l| {
                let (n, v) = l.rsplit_once(' ')?;
                (n == name).then(|| v.parse().ok())?
            })
            .unwrap_or(f64::NAN)
    }

    /// Proxy `i`'s `flex_limits_*` series, for a failure message.
    async fn metrics_text(&self, i: usize) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_ports[i]);
        match infra::request(http::Method::GET, &url, None, None).await {
            Ok((_, text)) => text
                .lines()
                .filter(|l| l.contains("limits_"))
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("{url}: {e}"),
        }
    }

    async fn wait_metric(&self, i: usize, name: &str, want: impl Fn(f64) -> bool, what: &str) {
        let t0 = Instant::now();
        loop {
            let v = self.metric(i, name).await;
            if want(v) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "proxy {i}: {name} = {v}, waiting for {what}\n{}\n--- its limiter metrics ---\n{}",
                self.proxies[i].log_tail(),
                self.metrics_text(i).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn key(&self) -> (String, String) {
        let v = self.admin(&["key", "create", "--org", &self.org]);
        (
            v["key_id"].as_str().unwrap().to_string(),
            v["api_key"].as_str().unwrap().to_string(),
        )
    }

    /// `flex admin limits set --org ORG --key KEY ARGS`, then waits until every proxy has it.
    async fn set_limits(&self, key_id: &str, args: &[&str]) -> Value {
        let mut all = vec!["limits", "set", "--org", &self.org, "--key", key_id];
        all.extend_from_slice(args);
        let v = self.admin(&all);
        let version = self.admin(&["proxies"])["current_version"]
            .as_f64()
            .unwrap();
        for i in 0..3 {
            self.wait_metric(i, "snapshot_version", |v| v >= version, "the limits")
                .await;
        }
        v
    }

    fn show(&self, key_id: &str) -> Value {
        self.admin(&["limits", "show", "--org", &self.org, "--key", key_id])
    }

    /// `n` requests from `clients` concurrent clients, request `i` to proxy `i % 3`.
    async fn hammer(&self, key: &str, body: &Value, n: usize, clients: usize) -> Vec<Reply> {
        let next = Arc::new(AtomicUsize::new(0));
        let bases: Arc<Vec<String>> = Arc::new((0..3).map(|i| self.base(i)).collect());
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (next, bases, http) = (next.clone(), bases.clone(), self.http.clone());
            let (key, body) = (key.to_string(), body.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return out;
                    }
                    out.push(chat(&http, &bases[i % 3], &key, &body).await);
                }
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    }

    /// (rows, spend) of a key in the ledger, once it has `rows` of them (usage is delivered
    /// asynchronously).
    async fn ledger(&self, key_id: &str, rows: i64) -> (i64, i64) {
        let mut conn = sqlx::PgConnection::connect(&self.pg.url()).await.unwrap();
        let t0 = Instant::now();
        loop {
            let (n, spend): (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*)::BIGINT, COALESCE(SUM(cost_micros), 0)::BIGINT FROM usage_ledger WHERE key_id = $1",
            )
            .bind(key_id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
            if n >= rows {
                let dups: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*)::BIGINT FROM (SELECT request_id FROM usage_ledger WHERE key_id = $1 GROUP BY request_id HAVING COUNT(*) > 1) d",
                )
                .bind(key_id)
                .fetch_one(&mut conn)
                .await
                .unwrap();
                assert_eq!(dups, 0);
                return (n, spend);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the ledger has {n} of {rows} rows of key {key_id}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn count(rs: &[Reply], status: u16, code: &str) -> usize {
    rs.iter()
        .filter(|r| r.status == status && (code.is_empty() || r.code() == code))
        .count()
}

/// What the proxy reserves for a body (`limits::estimate`): a quarter of the bytes of its fields
/// (`start_within` is taken out first), rounded up, plus the output cap.
fn reserved_tokens(body: &Value, max_tokens: u64) -> u64 {
    let bytes: usize = body
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "start_within")
        .map(|(_, v)| v.to_string().len())
        .sum();
    (bytes as u64).div_ceil(4) + max_tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_hold_exactly_across_three_proxies_sharing_redis() {
    let mut fleet = Fleet::start().await;
    let org = fleet.org.clone();

    // ---- rpm: exactly 300 of 450, from all three proxies at once --------------------------
    let (key_a, api_a) = fleet.key();
    let set = fleet.set_limits(&key_a, &["--rpm", "300"]).await;
    assert_eq!(set["limits"]["rpm"], 300);
    let t0 = Instant::now();
    let replies = fleet
        .hammer(
            &api_a,
            &chat_body("Hello! #sim output_tokens=3", 8),
            450,
            30,
        )
        .await;
    assert!(
        t0.elapsed() < Duration::from_secs(50),
        "not within one window"
    );
    if count(&replies, 200, "") != 300 {
        for i in 0..3 {
            for m in [
                "limits_fail_open_total",
                "limits_admitted_total",
                "limits_counter_errors_total",
            ] {
                eprintln!("proxy {i} {m} {}", fleet.metric(i, m).await);
            }
            eprintln!(
                "{}",
                fleet.proxies[i]
                    .log_text()
                    .lines()
                    .filter(|l| l.contains("WARN"))
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    assert_eq!(
        count(&replies, 200, ""),
        300,
        "exactly the limit, fleet-wide"
    );
    assert_eq!(count(&replies, 429, "rate_limit_exceeded"), 150);
    // Each admission saw the exact count: the remaining values are 299 down to 0, once each.
    let mut remaining: Vec<u64> = replies
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| {
            assert_eq!(r.header("x-ratelimit-limit-requests"), "300");
            assert_eq!(r.header("x-ratelimit-reset-requests"), "1m0s");
            r.header("x-ratelimit-remaining-requests").parse().unwrap()
        })
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..300).collect::<Vec<u64>>());
    let refused = replies.iter().find(|r| r.status == 429).unwrap();
    let retry: u64 = refused.header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), "0");
    assert_eq!(refused.body["error"]["limit"]["value"], 300);
    assert_eq!(refused.body["error"]["limit"]["scope"], "key");
    let msg = refused.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "flex admin limits set --org {org} --key {key_a} --rpm 600"
        )),
        "{msg}"
    );
    let shown = fleet.show(&key_a);
    assert_eq!(shown["counters"], "redis");
    assert_eq!(shown["usage"]["rpm"]["used"], 300, "{shown}");
    assert_eq!(shown["usage"]["rpm"]["remaining"], 0);

    // ---- concurrency: never more than 4 at the provider ---------------------------------
    let (key_b, api_b) = fleet.key();
    fleet.set_limits(&key_b, &["--concurrency", "4"]).await;
    fleet.sim.stats.reset();
    let replies = fleet
        .hammer(
            &api_b,
            &chat_body("Slow one #sim standard_delay_ms=150 output_tokens=3", 8),
            240,
            15,
        )
        .await;
    let stats = fleet.sim.stats.snapshot();
    let ok = count(&replies, 200, "");
    let busy = count(&replies, 429, "concurrency_limit_exceeded");
    assert_eq!(
        ok + busy,
        replies.len(),
        "only answers or concurrency refusals"
    );
    assert!(ok >= 8 && busy > 0, "ok {ok}, refused {busy}");
    assert_eq!(
        stats.max_in_flight, 4,
        "at most the cap in flight at the simulator, and the cap reached"
    );
    assert_eq!(stats.requests("openai:default"), ok as u64);

    // ---- daily budget: settled spend never over it ----------------------------------------
    let (key_c, api_c) = fleet.key();
    let budget: i64 = 20_000;
    fleet
        .set_limits(&key_c, &["--daily-budget-micros", &budget.to_string()])
        .await;
    let mut sent = 0;
    let mut worst = 0i64;
    loop {
        let replies = fleet
            .hammer(
                &api_c,
                &chat_body("Spend some #sim output_tokens=40", 50),
                30,
                9,
            )
            .await;
        sent += replies.len();
        let spent = replies.iter().filter(|r| r.code() == "budget_exceeded");
        for r in spent.clone() {
            assert_eq!(r.header("x-should-retry"), "false");
            worst = worst.max(r.body["error"]["limit"]["requested"].as_i64().unwrap());
        }
        if spent.count() == replies.len() {
            break;
        }
        assert!(sent < 2000, "the budget never ran out");
    }
    let (rows, spend) = fleet.ledger(&key_c, sent as i64).await;
    assert_eq!(rows, sent as i64, "one ledger row per request");
    assert!(spend <= budget, "settled {spend} > budget {budget}");
    assert!(
        spend > budget - worst,
        "the budget was used up to one worst case ({worst}): {spend}"
    );
    let shown = fleet.show(&key_c);
    let daily = &shown["usage"]["daily_budget_micros"];
    assert_eq!(daily["used"], spend, "{shown}");
    assert_eq!(
        daily["counted"], spend,
        "Redis's settled spend is the ledger's"
    );
    assert_eq!(daily["reserved"], 0);

    // ---- tpm: over it at most by the in-flight excess over the reservations -------------
    let (key_d, api_d) = fleet.key();
    let tpm: u64 = 30_000;
    fleet.set_limits(&key_d, &["--tpm", &tpm.to_string()]).await;
    // A dense prompt (2 bytes a word; the simulator counts a token a word) uses more input
    // than the 4-bytes-a-token estimate reserves: the case where a tpm limit can be exceeded.
    let prompt = format!("{} #sim output_tokens=10", "a ".repeat(2000));
    let body = chat_body(&prompt, 10);
    let reserved = reserved_tokens(&body, 10);
    let clients = 6;
    let mut used = Vec::new();
    let mut refusals = 0;
    while refusals < 3 * clients {
        let replies = fleet.hammer(&api_d, &body, clients, clients).await;
        for r in &replies {
            match r.status {
                200 => used.push(
                    r.body["usage"]["prompt_tokens"].as_u64().unwrap()
                        + r.body["usage"]["completion_tokens"].as_u64().unwrap(),
                ),
                429 => {
                    assert_eq!(r.code(), "rate_limit_exceeded");
                    refusals += 1;
                }
                s => panic!("unexpected status {s}: {}", r.body),
            }
        }
        assert!(used.len() < 500, "the tpm limit never bound");
    }
    let total: u64 = used.iter().sum();
    let excess = used.iter().max().unwrap().saturating_sub(reserved);
    let bound = tpm + clients as u64 * excess;
    println!(
        "tpm {tpm}: {} requests admitted used {total} tokens (reserved {reserved} each, used up to {}): over the limit by {}, bound {} = {clients} in flight x {excess}",
        used.len(),
        used.iter().max().unwrap(),
        total.saturating_sub(tpm),
        bound - tpm
    );
    assert!(excess > 0, "the dense prompt exceeds its reservation");
    assert!(total <= bound, "{total} tokens > bound {bound}");
    assert!(total + reserved > tpm, "the limit was used up: {total}");
    let shown = fleet.show(&key_d);
    assert_eq!(
        shown["usage"]["tpm"]["used"], total,
        "the window holds the real use of every admitted request: {shown}"
    );

    // ---- a killed proxy's concurrency slots come back after the lease TTL ---------------
    let (key_f, api_f) = fleet.key();
    fleet.set_limits(&key_f, &["--concurrency", "2"]).await;
    fleet.sim.stats.reset();
    let long = chat_body("Hold on #sim standard_delay_ms=60000", 8);
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (http, base, key, body) = (
                fleet.http.clone(),
                fleet.base(2),
                api_f.clone(),
                long.clone(),
            );
            tokio::spawn(async move {
                let req = http::Request::post(format!("{base}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .header("authorization", format!("Bearer {key}"))
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap();
                let _ = http.request(req).await;
            })
        })
        .collect();
    let t0 = Instant::now();
    while fleet.sim.stats.snapshot().in_flight < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the long requests did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let quick = chat_body("Quick #sim output_tokens=2", 4);
    let r = chat(&fleet.http, &fleet.base(0), &api_f, &quick).await;
    assert_eq!(r.code(), "concurrency_limit_exceeded", "{}", r.body);
    fleet.proxies[2].kill();
    let killed = Instant::now();
    let admitted_after = loop {
        let r = chat(&fleet.http, &fleet.base(0), &api_f, &quick).await;
        if r.status == 200 {
            break killed.elapsed();
        }
        assert_eq!(r.code(), "concurrency_limit_exceeded", "{}", r.body);
        assert!(
            killed.elapsed() < Duration::from_secs(LEASE_TTL_SECS + 3),
            "the dead proxy's slots did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "slots of the killed proxy back after {admitted_after:?} (lease TTL {LEASE_TTL_SECS} s)"
    );
    for h in held {
        h.abort();
    }
    fleet.proxies[2] = fleet.spawn_proxy(2);
    fleet.wait_ready(2).await;

    // ---- Redis killed mid-traffic: local shares, then exact again ---------------------------
    let (key_e, api_e) = fleet.key();
    fleet.set_limits(&key_e, &["--rpm", "90"]).await;
    for i in 0..3 {
        fleet
            .wait_metric(i, "limits_fleet_size", |v| v == 3.0, "3 proxies in Redis")
            .await;
    }
    let body = chat_body("Outage #sim output_tokens=2", 4);
    let before = fleet.hammer(&api_e, &body, 30, 6).await;
    assert_eq!(count(&before, 200, ""), 30);
    fleet.redis.kill();
    let during = fleet.hammer(&api_e, &body, 180, 9).await;
    assert_eq!(
        count(&during, 200, "") + count(&during, 429, "rate_limit_exceeded"),
        180,
        "the proxies keep answering: admitted or refused, never an error"
    );
    assert_eq!(
        count(&during, 200, ""),
        90,
        "each proxy admits its share, 90 / 3, while Redis is down"
    );
    let shown = fleet.show(&key_e);
    assert!(!shown["counters_error"].is_null(), "{shown}");
    for i in 0..3 {
        assert_eq!(
            fleet
                .metric(i, "limits_counters_up{counters=\"redis\"}")
                .await,
            0.0
        );
        assert!(fleet.metric(i, "limits_fail_open_total").await >= 1.0);
        assert!(
            fleet.proxies[i]
                .log_text()
                .contains("(Redis) are unreachable"),
            "proxy {i} did not log the outage"
        );
    }
    fleet.redis.restart();
    for i in 0..3 {
        fleet
            .wait_metric(
                i,
                "limits_counters_up{counters=\"redis\"}",
                |v| v == 1.0,
                "Redis back",
            )
            .await;
        assert!(fleet.proxies[i].log_text().contains("answer again"));
    }
    // The restarted Redis is empty (no persistence): a new window, counted exactly again.
    let after = fleet.hammer(&api_e, &body, 150, 9).await;
    assert_eq!(count(&after, 200, ""), 90, "exact again once Redis is back");
    assert_eq!(count(&after, 429, "rate_limit_exceeded"), 60);

    // The restarted Redis forgot the budget's spend; the control plane puts the ledger's back
    // (every 15 s), and the spent budget refuses again.
    let t0 = Instant::now();
    loop {
        let shown = fleet.show(&key_c);
        if shown["usage"]["daily_budget_micros"]["counted"] == spend {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "the budget's spend was not reconciled into Redis: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = chat(
        &fleet.http,
        &fleet.base(1),
        &api_c,
        &chat_body("Spend some #sim output_tokens=40", 50),
    )
    .await;
    assert_eq!(r.code(), "budget_exceeded", "{}", r.body);
    sent += 1;
    let (rows, after) = fleet.ledger(&key_c, sent as i64).await;
    assert_eq!((rows, after), (sent as i64, spend));

    // ---- every request has exactly one ledger row ---------------------------------------
    let (rows, _) = fleet.ledger(&key_a, 450).await;
    assert_eq!(rows, 450);
    let (rows, _) = fleet.ledger(&key_e, 360).await;
    assert_eq!(rows, 360);
    // The killed proxy's two answers in flight are recorded (`interrupted`) once it restarted.
    let (rows, _) = fleet.ledger(&key_f, 2).await;
    assert!(rows >= 3, "{rows}");
}
