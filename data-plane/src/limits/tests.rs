//! The two limiters against the same scenarios (the Redis one on a private `redis-server` per
//! test), and the gate's fail modes and recovery. `redis-server` must be installed (never
//! skipped): `apt-get install redis-server`, or `FLEX_TEST_REDIS_SERVER`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

pub(crate) fn redis_server_binary() -> String {
    if let Ok(p) = std::env::var("FLEX_TEST_REDIS_SERVER") {
        return p;
    }
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = format!("{dir}/redis-server");
        if std::path::Path::new(&p).is_file() {
            return p;
        }
    }
    panic!("redis-server not found: these tests need a real Redis (apt-get install redis-server, or set FLEX_TEST_REDIS_SERVER); they never skip")
}

/// A private redis-server on a free port, without persistence; killed when dropped.
pub(crate) struct TestRedis {
    pub port: u16,
    child: Option<Child>,
}

impl TestRedis {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Self { port, child: None };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(redis_server_binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn scope(org: &str, key: Option<&str>) -> ScopeLimits {
    ScopeLimits {
        scope: Scope {
            org_id: org.into(),
            key_id: key.map(str::to_string),
        },
        rpm: 0,
        tpm: 0,
        concurrency: 0,
        daily_budget_micros: 0,
        monthly_budget_micros: 0,
    }
}

fn demand(n: usize, scopes: &[ScopeLimits], tokens: u64, cost: i64) -> Demand {
    Demand {
        lease: format!("req_{n}_{}", uuid::Uuid::new_v4().simple()),
        scopes: scopes.to_vec(),
        tokens,
        cost_micros: cost,
        day: "20250101".into(),
        month: "202501".into(),
    }
}

fn lease_of(d: &Demand) -> Arc<LeaseRef> {
    Arc::new(LeaseRef {
        lease: d.lease.clone(),
        scopes: d.scopes.clone(),
        day: d.day.clone(),
        month: d.month.clone(),
    })
}

async fn settle(l: &dyn Limiter, d: &Demand, tokens: u64, cost: i64) {
    l.settle(&Settlement {
        lease: lease_of(d),
        tokens,
        cost_micros: cost,
    })
    .await
    .unwrap();
}

fn granted(d: Decision) -> Granted {
    match d {
        Decision::Granted(g) => g,
        Decision::Refused(r) => panic!("refused: {r:?}"),
    }
}

fn refused(d: Decision) -> Refusal {
    match d {
        Decision::Refused(r) => r,
        Decision::Granted(g) => panic!("granted: {g:?}"),
    }
}

/// The scenarios every limiter must pass, with the same numbers.
async fn scenarios(l: &dyn Limiter, org: &str) {
    // rpm: exactly the limit in the window; a refusal says when the oldest one leaves.
    let mut rpm = scope(org, Some("k_rpm"));
    rpm.rpm = 5;
    for i in 0..5 {
        let g = granted(l.admit(&demand(i, &[rpm.clone()], 1, 0)).await.unwrap());
        assert_eq!(g.counts[0].requests, i as u64);
    }
    let r = refused(l.admit(&demand(9, &[rpm.clone()], 1, 0)).await.unwrap());
    assert_eq!(
        (r.kind, r.limit, r.used, r.scope),
        (LimitKind::Rpm, 5, 5, 0)
    );
    let retry = r.retry_after_ms.unwrap();
    assert!(retry > 50_000 && retry <= WINDOW_MS, "{retry}");

    // Two scopes are all-or-nothing: the key's refusal consumes nothing of the org's.
    let mut org_scope = scope(org, None);
    org_scope.rpm = 100;
    let mut key = scope(org, Some("k_two"));
    key.rpm = 2;
    for i in 0..2 {
        granted(
            l.admit(&demand(i, &[org_scope.clone(), key.clone()], 1, 0))
                .await
                .unwrap(),
        );
    }
    let r = refused(
        l.admit(&demand(3, &[org_scope.clone(), key.clone()], 1, 0))
            .await
            .unwrap(),
    );
    assert_eq!((r.scope, r.kind), (1, LimitKind::Rpm));
    let g = granted(
        l.admit(&demand(4, &[org_scope.clone()], 1, 0))
            .await
            .unwrap(),
    );
    assert_eq!(
        g.counts[0].requests, 2,
        "the refused request was not counted"
    );

    // tpm: worst case reserved, real use settled; too large is never admitted.
    let mut tpm = scope(org, Some("k_tpm"));
    tpm.tpm = 1000;
    let a = demand(1, &[tpm.clone()], 600, 0);
    granted(l.admit(&a).await.unwrap());
    let r = refused(l.admit(&demand(2, &[tpm.clone()], 600, 0)).await.unwrap());
    assert_eq!((r.kind, r.used, r.requested), (LimitKind::Tpm, 600, 600));
    assert!(r.retry_after_ms.is_some());
    settle(l, &a, 100, 0).await;
    settle(l, &a, 100, 0).await; // idempotent
    let g = granted(l.admit(&demand(3, &[tpm.clone()], 600, 0)).await.unwrap());
    assert_eq!(g.counts[0].tokens, 100);
    let r = refused(l.admit(&demand(4, &[tpm.clone()], 1001, 0)).await.unwrap());
    assert_eq!(r.retry_after_ms, None, "larger than the limit: never");

    // concurrency: leases released by settling.
    let mut conc = scope(org, Some("k_conc"));
    conc.concurrency = 2;
    let a = demand(1, &[conc.clone()], 1, 0);
    granted(l.admit(&a).await.unwrap());
    granted(l.admit(&demand(2, &[conc.clone()], 1, 0)).await.unwrap());
    let r = refused(l.admit(&demand(3, &[conc.clone()], 1, 0)).await.unwrap());
    assert_eq!((r.kind, r.used), (LimitKind::Concurrency, 2));
    settle(l, &a, 0, 0).await;
    let g = granted(l.admit(&demand(4, &[conc.clone()], 1, 0)).await.unwrap());
    assert_eq!(g.counts[0].in_flight, 1);

    // Budget: the worst case is held while in flight, the real cost charged once.
    let mut budget = scope(org, Some("k_budget"));
    budget.daily_budget_micros = 1000;
    budget.monthly_budget_micros = 1_000_000;
    let held: Vec<Demand> = (0..3)
        .map(|i| demand(i, &[budget.clone()], 1, 300))
        .collect();
    for d in &held {
        granted(l.admit(d).await.unwrap());
    }
    let r = refused(
        l.admit(&demand(5, &[budget.clone()], 1, 300))
            .await
            .unwrap(),
    );
    assert_eq!(
        (r.kind, r.used, r.requested, r.retry_after_ms),
        (LimitKind::DailyBudget, 900, 300, None)
    );
    for d in &held {
        settle(l, d, 10, 100).await;
        settle(l, d, 10, 100).await; // a repeated settle is charged once
    }
    let reading = l.read(&budget, "20250101", "202501").await.unwrap();
    assert_eq!(
        (reading.day_settled_micros, reading.reserved_micros),
        (300, 0)
    );
    // 300 settled: two more at 300 fit (900), a third does not.
    granted(
        l.admit(&demand(6, &[budget.clone()], 1, 300))
            .await
            .unwrap(),
    );
    granted(
        l.admit(&demand(7, &[budget.clone()], 1, 300))
            .await
            .unwrap(),
    );
    let r = refused(
        l.admit(&demand(8, &[budget.clone()], 1, 300))
            .await
            .unwrap(),
    );
    assert_eq!(r.used, 900);

    let reading = l.read(&rpm, "20250101", "202501").await.unwrap();
    assert_eq!(reading.requests, 5);
    assert!(reading.window_clear_at_ms > 0);
}

#[tokio::test]
async fn the_in_process_limiter_counts_exactly() {
    scenarios(&LocalLimiter::new(), "org_local").await;
}

#[tokio::test]
async fn the_redis_limiter_counts_exactly_the_same() {
    let redis = TestRedis::start();
    let l = RedisLimiter::new(&redis.url(), Duration::from_secs(2), DEFAULT_LEASE_TTL).unwrap();
    scenarios(&l, "org_redis").await;
    // A second limiter on the same Redis (another proxy) sees the same counters.
    let other = RedisLimiter::new(&redis.url(), Duration::from_secs(2), DEFAULT_LEASE_TTL).unwrap();
    let mut rpm = scope("org_redis", Some("k_rpm"));
    rpm.rpm = 5;
    let r = refused(other.admit(&demand(1, &[rpm], 1, 0)).await.unwrap());
    assert_eq!(r.used, 5);
}

#[tokio::test]
async fn a_killed_proxys_leases_expire_and_refreshed_ones_do_not() {
    let redis = TestRedis::start();
    let ttl = Duration::from_millis(400);
    let l = RedisLimiter::new(&redis.url(), Duration::from_secs(2), ttl).unwrap();
    let mut conc = scope("org_ttl", None);
    conc.concurrency = 1;
    conc.daily_budget_micros = 1000;
    let kept = demand(1, &[conc.clone()], 1, 600);
    granted(l.admit(&kept).await.unwrap());
    // Refreshed past its TTL, the lease holds.
    for _ in 0..4 {
        tokio::time::sleep(ttl / 3).await;
        assert_eq!(l.refresh(&[lease_of(&kept)], "p1").await.unwrap(), 1);
    }
    refused(l.admit(&demand(2, &[conc.clone()], 1, 100)).await.unwrap());
    // Not refreshed (its proxy died): the slot and the money come back after the TTL.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let g = granted(l.admit(&demand(3, &[conc.clone()], 1, 600)).await.unwrap());
    assert_eq!((g.counts[0].in_flight, g.counts[0].day_micros), (0, 0));
    // A late settle of the expired lease is still charged, once.
    settle(&l, &kept, 0, 250).await;
    settle(&l, &kept, 0, 250).await;
    let r = l.read(&conc, "20250101", "202501").await.unwrap();
    assert_eq!((r.day_settled_micros, r.reserved_micros), (250, 600));
}

#[tokio::test]
async fn the_ledgers_spend_raises_what_a_restarted_redis_forgot_and_never_lowers_it() {
    let mut redis = TestRedis::start();
    let l = RedisLimiter::new(&redis.url(), Duration::from_secs(2), DEFAULT_LEASE_TTL).unwrap();
    let mut b = scope("org_raise", None);
    b.daily_budget_micros = 1000;
    let d = demand(1, std::slice::from_ref(&b), 1, 400);
    granted(l.admit(&d).await.unwrap());
    settle(&l, &d, 1, 400).await;
    // Redis restarts empty: the day's spend is gone, the budget would be whole again.
    redis.stop();
    redis.restart();
    let l = RedisLimiter::new(&redis.url(), Duration::from_secs(2), DEFAULT_LEASE_TTL).unwrap();
    assert_eq!(
        l.read(&b, "20250101", "202501")
            .await
            .unwrap()
            .day_settled_micros,
        0
    );
    // The control plane's reconciliation puts the ledger's spend back.
    l.raise_spend(&b, "20250101", "202501", 400, 400)
        .await
        .unwrap();
    l.raise_spend(&b, "20250101", "202501", 100, 100)
        .await
        .unwrap();
    let r = l.read(&b, "20250101", "202501").await.unwrap();
    assert_eq!((r.day_settled_micros, r.month_settled_micros), (400, 400));
    let r = refused(
        l.admit(&demand(2, std::slice::from_ref(&b), 1, 700))
            .await
            .unwrap(),
    );
    assert_eq!((r.kind, r.used), (LimitKind::DailyBudget, 400));
}

fn org_limits(rpm: u64) -> Vec<ScopeLimits> {
    let mut s = scope("org_gate", None);
    s.rpm = rpm;
    vec![s]
}

#[tokio::test]
async fn fail_open_admits_a_local_share_and_recovers_when_redis_returns() {
    let mut redis = TestRedis::start();
    let url = redis.url();
    redis.stop();
    let limits = Limits::redis(
        &url,
        Duration::from_millis(200),
        LimitsConfig {
            fail: FailMode::Open,
            fleet_size: Some(2),
            ..LimitsConfig::default()
        },
    )
    .unwrap();
    // Redis is down from the start: 6 rpm over 2 proxies is 3 here.
    let mut ok = 0;
    for i in 0..5 {
        if limits
            .admit_demand(demand(i, &org_limits(6), 1, 0), CallerFormat::Responses)
            .await
            .is_ok()
        {
            ok += 1;
        }
    }
    assert_eq!(ok, 3);
    assert!(!limits.counters_up());
    let mut m = Vec::new();
    limits.metrics(&mut m);
    let m = crate::series::text(&m);
    assert!(m.contains("limits_fail_open_total 5"), "{m}");
    assert!(
        m.contains("limits_counters_up{counters=\"redis\"} 0"),
        "{m}"
    );
    // Redis returns: within a few probes the proxy counts there again.
    redis.restart();
    let t0 = Instant::now();
    while !limits.counters_up() {
        assert!(t0.elapsed() < Duration::from_secs(5), "did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut granted_in_redis = 0;
    for i in 0..8 {
        if limits
            .admit_demand(demand(i, &org_limits(6), 1, 0), CallerFormat::Responses)
            .await
            .is_ok()
        {
            granted_in_redis += 1;
        }
    }
    assert_eq!(
        granted_in_redis, 6,
        "exact again: the whole limit, in Redis"
    );
}

#[tokio::test]
async fn fail_closed_refuses_with_503_and_settles_wait_for_redis() {
    let mut redis = TestRedis::start();
    let limits = Limits::redis(
        &redis.url(),
        Duration::from_millis(200),
        LimitsConfig {
            fail: FailMode::Closed,
            ..LimitsConfig::default()
        },
    )
    .unwrap();
    let mut s = scope("org_closed", None);
    s.concurrency = 1;
    s.daily_budget_micros = 10_000;
    let a = limits
        .admit_demand(
            demand(1, std::slice::from_ref(&s), 1, 500),
            CallerFormat::Messages,
        )
        .await
        .unwrap();
    redis.stop();
    let e = limits
        .admit_demand(
            demand(2, std::slice::from_ref(&s), 1, 500),
            CallerFormat::Messages,
        )
        .await
        .unwrap_err();
    assert_eq!((e.status.as_u16(), e.code), (503, "limits_unavailable"));
    // The request in flight ends while Redis is down: its settle waits, then lands.
    a.permit.settle(&UsageEvent {
        input_tokens: 3,
        output_tokens: 4,
        cost_micros: 123,
        ..UsageEvent::default()
    });
    assert_eq!(limits.pending_settles(), 1);
    redis.restart();
    let t0 = Instant::now();
    while limits.pending_settles() > 0 || !limits.counters_up() {
        assert!(t0.elapsed() < Duration::from_secs(5), "settle did not land");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Redis restarted empty (no persistence here): the settle landed and nothing is held.
    let r = limits
        .limiter()
        .read(&s, "20250101", "202501")
        .await
        .unwrap();
    assert_eq!((r.in_flight, r.reserved_micros), (0, 0));
}

#[tokio::test]
async fn refusals_say_which_limit_its_value_when_and_how_to_raise() {
    let limits = Limits::in_process();
    let mut s = scope("org_msg", Some("key_msg"));
    s.rpm = 1;
    let ok = limits
        .admit_demand(
            demand(1, std::slice::from_ref(&s), 1, 0),
            CallerFormat::Responses,
        )
        .await
        .unwrap();
    let mut h = http::HeaderMap::new();
    ok.headers.apply(CallerFormat::Responses, &mut h);
    assert_eq!(h["x-ratelimit-limit-requests"], "1");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert_eq!(h["x-ratelimit-reset-requests"], "1m0s");
    let mut h = http::HeaderMap::new();
    ok.headers.apply(CallerFormat::Messages, &mut h);
    assert_eq!(h["anthropic-ratelimit-requests-limit"], "1");
    assert!(h["anthropic-ratelimit-requests-reset"]
        .to_str()
        .unwrap()
        .ends_with('Z'));
    let e = limits
        .admit_demand(
            demand(2, std::slice::from_ref(&s), 1, 0),
            CallerFormat::Responses,
        )
        .await
        .unwrap_err();
    assert_eq!((e.status.as_u16(), e.code), (429, "rate_limit_exceeded"));
    let resp = e.clone().into_response_for(CallerFormat::Responses);
    let secs: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "0");
    let body = e.body(CallerFormat::Responses);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("API key key_msg") && msg.contains("the limit is 1"),
        "{msg}"
    );
    assert!(
        msg.contains("flex admin limits set --org org_msg --key key_msg --rpm 2"),
        "{msg}"
    );
    assert_eq!(body["error"]["limit"]["name"], "rpm");
    assert_eq!(body["error"]["limit"]["value"], 1);
    // Anthropic's envelope on /v1/messages.
    let body = e.body(CallerFormat::Messages);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");

    // A spent budget: no point retrying before the next day.
    let mut b = scope("org_msg", None);
    b.daily_budget_micros = 100;
    let e = limits
        .admit_demand(
            demand(3, std::slice::from_ref(&b), 1, 500),
            CallerFormat::ChatCompletions,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "budget_exceeded");
    let resp = e.into_response_for(CallerFormat::ChatCompletions);
    assert_eq!(resp.headers()["x-should-retry"], "false");
}

#[tokio::test]
async fn a_dropped_permit_releases_its_lease() {
    let limits = Limits::in_process();
    let mut s = scope("org_drop", None);
    s.concurrency = 1;
    let a = limits
        .admit_demand(
            demand(1, std::slice::from_ref(&s), 1, 0),
            CallerFormat::Responses,
        )
        .await
        .unwrap();
    assert!(limits
        .admit_demand(
            demand(2, std::slice::from_ref(&s), 1, 0),
            CallerFormat::Responses
        )
        .await
        .is_err());
    let clone = a.permit.clone();
    drop(a);
    assert!(
        limits
            .admit_demand(
                demand(3, std::slice::from_ref(&s), 1, 0),
                CallerFormat::Responses
            )
            .await
            .is_err(),
        "a clone still holds it"
    );
    drop(clone);
    limits
        .admit_demand(
            demand(4, std::slice::from_ref(&s), 1, 0),
            CallerFormat::Responses,
        )
        .await
        .unwrap();
}
