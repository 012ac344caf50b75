//! Rate limits, concurrency caps and spend budgets, per org and per API key, that mean the same
//! with one proxy or fifty.
//!
//! A request under a limit is admitted once, after authentication and validation and before any
//! upstream call (a flex retry inside the race is the same request), by one call to a
//! [`Limiter`]: [`RedisLimiter`] (counters shared by the fleet, one atomic script per admission)
//! or [`LocalLimiter`] (in process: `flex up`, or a proxy without `--redis-url`). Admission checks
//! every limit of the org and of the key and records the request only if all of them pass:
//! - rpm: the requests admitted in the last 60 s (an exact sliding window);
//! - tpm: the tokens of those requests, each counted at its worst case while in flight (estimated
//!   input plus its output cap, see [`estimate`]) and at its real use once it ends;
//! - concurrency: leases, released when the request ends (expiring after the lease TTL when a
//!   proxy dies holding them);
//! - daily and monthly budgets: settled spend of the UTC day or month plus the worst-case cost of
//!   the requests in flight (reserved at the standard tier's price, the priority tier's for
//!   priority requests).
//!
//! Admission returns a [`Permit`], carried with the request's usage draft; when the usage event
//! is completed (ok, error, cancelled: every request has exactly one), the permit is settled with
//! its real tokens and cost, and a permit dropped unsettled releases what it held. Limits never
//! create, drop or change a usage event.
//!
//! When Redis cannot be reached ([`FailMode`]): `open` admits on a local share of each limit (the
//! limit divided by the number of proxies last seen in Redis; a budget's share of what was left
//! of it), counted in `limits_fail_open_total`; `closed` refuses requests under a limit (503
//! `limits_unavailable`). Either way the proxy keeps serving, logs the change once, probes Redis
//! every 250 ms, and counts in Redis again once it answers; settles and the spend of requests
//! admitted locally are sent to Redis then.

mod answer;
pub mod estimate;
mod local;
mod redis_limiter;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flex_shared::catalog::Model;
use flex_shared::proto::control as pb;
use flex_shared::usage::UsageEvent;
use futures_util::FutureExt;

pub use answer::RateHeaders;
pub use local::LocalLimiter;
pub use redis_limiter::{scope_keys, RedisLimiter};

use crate::error::ApiError;
use crate::formats::CallerFormat;
use crate::snapshot::Indexed;

/// The sliding window of rpm and tpm.
pub const WINDOW_MS: u64 = 60_000;
/// How long a concurrency lease or money reservation lives unless its proxy refreshes it.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// The bound on one call to Redis.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
/// How often an unreachable Redis is probed.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// A boxed future (the [`Limiter`] trait is object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Rpm,
    Tpm,
    Concurrency,
    DailyBudget,
    MonthlyBudget,
}

impl LimitKind {
    pub const ALL: [LimitKind; 5] = [
        LimitKind::Rpm,
        LimitKind::Tpm,
        LimitKind::Concurrency,
        LimitKind::DailyBudget,
        LimitKind::MonthlyBudget,
    ];

    fn from_code(c: i64) -> Option<Self> {
        Self::ALL
            .get(usize::try_from(c).ok()?.checked_sub(1)?)
            .copied()
    }

    /// As the admin API and the error's `limit.name` call it.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::Rpm => "rpm",
            LimitKind::Tpm => "tpm",
            LimitKind::Concurrency => "concurrency",
            LimitKind::DailyBudget => "daily_budget_micros",
            LimitKind::MonthlyBudget => "monthly_budget_micros",
        }
    }

    /// The `flex admin limits set` flag.
    pub fn flag(self) -> &'static str {
        match self {
            LimitKind::Rpm => "--rpm",
            LimitKind::Tpm => "--tpm",
            LimitKind::Concurrency => "--concurrency",
            LimitKind::DailyBudget => "--daily-budget-micros",
            LimitKind::MonthlyBudget => "--monthly-budget-micros",
        }
    }

    /// The error code of a refusal.
    pub fn code(self) -> &'static str {
        match self {
            LimitKind::Rpm | LimitKind::Tpm => "rate_limit_exceeded",
            LimitKind::Concurrency => "concurrency_limit_exceeded",
            LimitKind::DailyBudget | LimitKind::MonthlyBudget => "budget_exceeded",
        }
    }
}

/// An org (all its keys together) or one of its API keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    pub org_id: String,
    pub key_id: Option<String>,
}

impl Scope {
    /// `org org_…` or `API key key_…`.
    pub fn describe(&self) -> String {
        match &self.key_id {
            None => format!("org {}", self.org_id),
            Some(k) => format!("API key {k}"),
        }
    }
}

/// One scope's limits as admitted (0 = none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeLimits {
    pub scope: Scope,
    pub rpm: u64,
    pub tpm: u64,
    pub concurrency: u64,
    pub daily_budget_micros: i64,
    pub monthly_budget_micros: i64,
}

impl ScopeLimits {
    pub fn from_entry(e: &pb::LimitEntry) -> Self {
        let key = e.key_id.trim();
        Self {
            scope: Scope {
                org_id: e.org_id.clone(),
                key_id: (!key.is_empty()).then(|| key.to_string()),
            },
            rpm: e.rpm,
            tpm: e.tpm,
            concurrency: e.concurrency,
            daily_budget_micros: e.daily_budget_micros,
            monthly_budget_micros: e.monthly_budget_micros,
        }
    }

    pub fn has_budget(&self) -> bool {
        self.daily_budget_micros > 0 || self.monthly_budget_micros > 0
    }

    pub fn is_empty(&self) -> bool {
        self.rpm == 0 && self.tpm == 0 && self.concurrency == 0 && !self.has_budget()
    }

    fn value(&self, kind: LimitKind) -> i64 {
        let c = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        match kind {
            LimitKind::Rpm => c(self.rpm),
            LimitKind::Tpm => c(self.tpm),
            LimitKind::Concurrency => c(self.concurrency),
            LimitKind::DailyBudget => self.daily_budget_micros,
            LimitKind::MonthlyBudget => self.monthly_budget_micros,
        }
    }
}

/// What one request asks of the limiter: its lease id (the request id), the limits of its org
/// and key, and its worst case.
#[derive(Debug, Clone)]
pub struct Demand {
    pub lease: String,
    pub scopes: Vec<ScopeLimits>,
    pub tokens: u64,
    pub cost_micros: i64,
    /// The UTC day (`YYYYMMDD`) and month (`YYYYMM`) of the request (its spend's).
    pub day: String,
    pub month: String,
}

/// The counters of one scope when a request was admitted (before it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeCount {
    pub requests: u64,
    pub tokens: u64,
    pub in_flight: u64,
    /// Settled plus reserved spend of the day and month.
    pub day_micros: i64,
    pub month_micros: i64,
}

#[derive(Debug, Clone)]
pub struct Granted {
    /// The limiter's clock (Redis's `TIME`), unix ms.
    pub now_ms: u64,
    /// Per scope of the demand, in its order.
    pub counts: Vec<ScopeCount>,
}

/// Why a request was refused.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub now_ms: u64,
    /// Which scope of the demand.
    pub scope: usize,
    pub kind: LimitKind,
    pub limit: i64,
    /// What the window, the leases or the day/month held.
    pub used: i64,
    /// What this request needed.
    pub requested: i64,
    /// When it could pass (rpm, tpm, concurrency); `None`: not before the window, day or month
    /// ends (budgets), or never (a request larger than the tpm limit).
    pub retry_after_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum Decision {
    Granted(Granted),
    Refused(Refusal),
}

/// What an admitted request holds: its lease and the limits it was admitted under.
#[derive(Debug, Clone)]
pub struct LeaseRef {
    pub lease: String,
    pub scopes: Vec<ScopeLimits>,
    pub day: String,
    pub month: String,
}

/// The end of a request: its real use.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub lease: Arc<LeaseRef>,
    pub tokens: u64,
    pub cost_micros: i64,
}

/// The counters of one scope (for `flex admin limits show`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    pub requests: u64,
    pub tokens: u64,
    /// Unix ms when the window is empty again (0: it is).
    pub window_clear_at_ms: u64,
    pub in_flight: u64,
    pub reserved_micros: i64,
    pub day_settled_micros: i64,
    pub month_settled_micros: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    /// The counters cannot be reached (refused, reset, broken connection, an error reply).
    #[error("{0}")]
    Unavailable(String),
    /// No answer in time (a hung Redis, or a busy proxy): only a run of them counts as an outage.
    #[error("{0}")]
    Timeout(String),
}

/// Consecutive timeouts that make the counters count as unreachable.
const TIMEOUTS_TO_TRIP: u32 = 3;

/// Where counters live.
pub trait Limiter: Send + Sync + 'static {
    /// `redis` or `in-process`.
    fn kind(&self) -> &'static str;
    /// Whether other proxies count here too (then an outage has a fail mode).
    fn shared(&self) -> bool;
    /// Decides and, when granted, records one admission, atomically.
    fn admit<'a>(&'a self, d: &'a Demand) -> BoxFuture<'a, Result<Decision, LimiterError>>;
    /// Settles one lease with its real use (idempotent).
    fn settle<'a>(&'a self, s: &'a Settlement) -> BoxFuture<'a, Result<(), LimiterError>>;
    /// Extends the leases of requests still in flight; registers `proxy_id` and returns how many
    /// proxies count here.
    fn refresh<'a>(
        &'a self,
        leases: &'a [Arc<LeaseRef>],
        proxy_id: &'a str,
    ) -> BoxFuture<'a, Result<u64, LimiterError>>;
    fn read<'a>(
        &'a self,
        s: &'a ScopeLimits,
        day: &'a str,
        month: &'a str,
    ) -> BoxFuture<'a, Result<Reading, LimiterError>>;
    /// Adds spend settled elsewhere (by a proxy's fallback during an outage).
    fn add_spend<'a>(
        &'a self,
        s: &'a ScopeLimits,
        day: &'a str,
        month: &'a str,
        micros: i64,
    ) -> BoxFuture<'a, Result<(), LimiterError>>;
    fn ping(&self) -> BoxFuture<'_, Result<(), LimiterError>>;
    /// Raises the settled spend of the day and month to at least these (the ledger's), never
    /// lowers it: what a Redis that restarted empty has forgotten comes back.
    fn raise_spend<'a>(
        &'a self,
        _s: &'a ScopeLimits,
        _day: &'a str,
        _month: &'a str,
        _day_micros: i64,
        _month_micros: i64,
    ) -> BoxFuture<'a, Result<(), LimiterError>> {
        Box::pin(async { Ok(()) })
    }
}

/// What a proxy does with requests under a limit while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    /// Admit on a local share of each limit.
    #[default]
    Open,
    /// Refuse them (503 `limits_unavailable`).
    Closed,
}

impl FailMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(FailMode::Open),
            "closed" => Some(FailMode::Closed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub fail: FailMode,
    pub lease_ttl: Duration,
    /// The number of proxies sharing the limits, for the local shares of fail-open; `None`: the
    /// proxies seen in Redis (at least 1).
    pub fleet_size: Option<u64>,
    /// This proxy's id in Redis's proxy set.
    pub proxy_id: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            fail: FailMode::Open,
            lease_ttl: DEFAULT_LEASE_TTL,
            fleet_size: None,
            proxy_id: format!("proxy-{}", std::process::id()),
        }
    }
}

#[derive(Default)]
struct Metrics {
    admitted: AtomicU64,
    refused: [AtomicU64; 5],
    fail_open: AtomicU64,
    fail_closed: AtomicU64,
    errors: AtomicU64,
}

type ScopeDay = (Scope, String, String);

struct Gate {
    primary: Arc<dyn Limiter>,
    cfg: LimitsConfig,
    up: AtomicBool,
    /// The in-process limiter used while Redis is unreachable (a fresh one per outage).
    fallback: Mutex<Arc<LocalLimiter>>,
    /// Leases held on the primary, refreshed while in flight.
    leases: Mutex<HashMap<String, Arc<LeaseRef>>>,
    /// Settles that could not reach the primary, sent again once it answers.
    pending: Mutex<VecDeque<Settlement>>,
    /// Spend settled on fallback leases, not in the primary yet.
    unsynced: Mutex<HashMap<ScopeDay, (ScopeLimits, i64)>>,
    /// The budget use (day, month) last seen from the primary, per scope.
    seen: Mutex<HashMap<Scope, (i64, i64)>>,
    fleet: AtomicU64,
    maintenance: AtomicBool,
    /// Timeouts in a row (reset by any answer).
    timeouts: std::sync::atomic::AtomicU32,
    metrics: Metrics,
}

/// The proxy's limits: its limiter, the fail mode and the fallback (see the module docs).
#[derive(Clone)]
pub struct Limits(Arc<Gate>);

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("counters", &self.0.primary.kind())
            .field("fail", &self.0.cfg.fail)
            .finish()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::in_process()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Limits {
    /// Counting in this process only (exact for this one proxy).
    pub fn in_process() -> Self {
        Self::with_limiter(Arc::new(LocalLimiter::new()), LimitsConfig::default())
    }

    /// Counting in `primary`. For a shared one, a background task (started now when a runtime
    /// is running, else at the first admission) refreshes leases, probes it while unreachable
    /// and sends it what waited.
    pub fn with_limiter(primary: Arc<dyn Limiter>, cfg: LimitsConfig) -> Self {
        let fleet = cfg.fleet_size.unwrap_or(1).max(1);
        let limits = Self(Arc::new(Gate {
            primary,
            cfg,
            up: AtomicBool::new(true),
            fallback: Mutex::new(Arc::new(LocalLimiter::new())),
            leases: Mutex::new(HashMap::new()),
            pending: Mutex::new(VecDeque::new()),
            unsynced: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            fleet: AtomicU64::new(fleet),
            maintenance: AtomicBool::new(false),
            timeouts: std::sync::atomic::AtomicU32::new(0),
            metrics: Metrics::default(),
        }));
        limits.ensure_maintenance();
        limits
    }

    /// Counting in Redis at `url`; see [`RedisLimiter::new`].
    pub fn redis(url: &str, timeout: Duration, cfg: LimitsConfig) -> Result<Self, String> {
        let limiter = RedisLimiter::new(url, timeout, cfg.lease_ttl)?;
        Ok(Self::with_limiter(Arc::new(limiter), cfg))
    }

    /// The limiter (for reading counters).
    pub fn limiter(&self) -> Arc<dyn Limiter> {
        self.0.primary.clone()
    }

    pub fn fail_mode(&self) -> FailMode {
        self.0.cfg.fail
    }

    /// Whether the limiter answers (always true in process).
    pub fn counters_up(&self) -> bool {
        self.0.up.load(Ordering::Relaxed)
    }

    /// Settles waiting for Redis.
    pub fn pending_settles(&self) -> usize {
        lock(&self.0.pending).len()
    }

    fn ensure_maintenance(&self) {
        if !self.0.primary.shared() || self.0.maintenance.load(Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.0.maintenance.swap(true, Ordering::AcqRel) {
            return;
        }
        let gate = Arc::downgrade(&self.0);
        rt.spawn(maintain(gate));
    }

    /// The limiter's series (appended to the proxy's `/metrics`).
    pub fn metrics(&self, out: &mut Vec<crate::series::Series>) {
        use crate::series::Series;
        let m = &self.0.metrics;
        let g = &self.0;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.extend([
            Series::counter(
                "limits_admitted",
                "Requests admitted under an org's or a key's limits",
                n(&m.admitted),
            ),
            Series::counter_by(
                "limits_refused",
                "Requests refused by a limit (429), by the limit",
                "limit",
                LimitKind::ALL
                    .iter()
                    .zip(&m.refused)
                    .map(|(k, c)| (k.name().to_string(), n(c))),
            ),
            Series::counter(
                "limits_fail_open",
                "Requests admitted on local shares while the shared counters were unreachable",
                n(&m.fail_open),
            ),
            Series::counter(
                "limits_fail_closed",
                "Requests refused (503) while the shared counters were unreachable (--limits-fail closed)",
                n(&m.fail_closed),
            ),
            Series::counter(
                "limits_counter_errors",
                "Failed calls to the limit counters",
                n(&m.errors),
            ),
            Series::gauge_with(
                "limits_counters_up",
                "1 while the limit counters answer (counters: redis or in-process)",
                ("counters", g.primary.kind().to_string()),
                f64::from(u8::from(g.up.load(Ordering::Relaxed))),
            ),
            Series::gauge(
                "limits_settles_pending",
                "Settlements of real use waiting for the shared counters",
                lock(&g.pending).len() as f64,
            ),
            Series::gauge(
                "limits_fleet_size",
                "Proxies counting in the shared counters (local shares divide by it)",
                g.fleet.load(Ordering::Relaxed) as f64,
            ),
        ]);
    }

    /// Admits one request under the limits of its org and key (`Ok(None)`: it has none); the
    /// 429 (or, fail closed, 503) in the caller's format otherwise. One call per request.
    pub async fn admit(&self, ask: Ask<'_>) -> Result<Option<Admitted>, ApiError> {
        if ask.snapshot.limits.is_empty() {
            return Ok(None);
        }
        let mut scopes = Vec::with_capacity(2);
        for key in [None, Some(ask.key_id)] {
            let id = (ask.org_id.to_string(), key.unwrap_or_default().to_string());
            if let Some(e) = ask.snapshot.limits.get(&id) {
                let s = ScopeLimits::from_entry(e);
                if !s.is_empty() {
                    scopes.push(s);
                }
            }
        }
        if scopes.is_empty() {
            return Ok(None);
        }
        self.ensure_maintenance();
        let (input, output) = ask.worst;
        let (day, month) = answer::day_and_month(answer::unix_ms());
        let demand = Demand {
            lease: ask.request_id.to_string(),
            scopes,
            tokens: input.saturating_add(output),
            cost_micros: estimate::worst_case_cost(ask.model, input, output, ask.priority),
            day,
            month,
        };
        self.admit_demand(demand, ask.format).await.map(Some)
    }

    /// Admits one demand (what [`Limits::admit`] does once it has built it).
    pub async fn admit_demand(
        &self,
        demand: Demand,
        format: CallerFormat,
    ) -> Result<Admitted, ApiError> {
        self.ensure_maintenance();
        let g = &self.0;
        let decided = if !g.primary.shared() || g.up.load(Ordering::Relaxed) {
            match g.primary.admit(&demand).await {
                Ok(d) => {
                    g.timeouts.store(0, Ordering::Relaxed);
                    Some(d)
                }
                Err(e) => {
                    self.counters_failed(&e);
                    None
                }
            }
        } else {
            None
        };
        let (decision, on) = match decided {
            Some(d) => (d, On::Primary),
            None => match g.cfg.fail {
                FailMode::Closed => {
                    g.metrics.fail_closed.fetch_add(1, Ordering::Relaxed);
                    return Err(answer::unavailable(format));
                }
                FailMode::Open => {
                    g.metrics.fail_open.fetch_add(1, Ordering::Relaxed);
                    let local = lock(&g.fallback).clone();
                    let shares = self.local_share(&demand);
                    (local.admit_now(&shares), On::Fallback(local))
                }
            },
        };
        match decision {
            Decision::Refused(r) => {
                g.metrics.refused[r.kind as usize].fetch_add(1, Ordering::Relaxed);
                let scope = &demand.scopes[r.scope.min(demand.scopes.len() - 1)];
                tracing::info!(
                    limit = r.kind.name(),
                    scope = %scope.scope.describe(),
                    value = r.limit,
                    used = r.used,
                    requested = r.requested,
                    "request refused by a limit"
                );
                Err(answer::refused(&r, scope, &demand, format))
            }
            Decision::Granted(granted) => {
                g.metrics.admitted.fetch_add(1, Ordering::Relaxed);
                let lease = Arc::new(LeaseRef {
                    lease: demand.lease.clone(),
                    scopes: demand.scopes.clone(),
                    day: demand.day.clone(),
                    month: demand.month.clone(),
                });
                if matches!(on, On::Primary) {
                    if g.primary.shared() {
                        lock(&g.leases).insert(lease.lease.clone(), lease.clone());
                    }
                    let mut seen = lock(&g.seen);
                    for (s, c) in demand.scopes.iter().zip(&granted.counts) {
                        if s.has_budget() {
                            seen.insert(
                                s.scope.clone(),
                                (
                                    c.day_micros + demand.cost_micros,
                                    c.month_micros + demand.cost_micros,
                                ),
                            );
                        }
                    }
                }
                Ok(Admitted {
                    headers: RateHeaders::granted(&demand, &granted),
                    permit: Permit(Arc::new(Mutex::new(Some(Held {
                        gate: g.clone(),
                        lease,
                        on,
                        done: false,
                    })))),
                })
            }
        }
    }

    /// The demand with each limit cut to this proxy's share (fail open).
    fn local_share(&self, d: &Demand) -> Demand {
        let n = self
            .0
            .cfg
            .fleet_size
            .unwrap_or_else(|| self.0.fleet.load(Ordering::Relaxed))
            .max(1);
        let share = |v: u64| if v == 0 { 0 } else { (v / n).max(1) };
        let seen = lock(&self.0.seen);
        let money = |limit: i64, used: Option<i64>| {
            if limit <= 0 {
                return 0;
            }
            let left = used.map_or(limit, |u| (limit - u).max(0));
            // 0 would mean "no budget": one micro-dollar is as good as none left.
            (left / i64::try_from(n).unwrap_or(1)).max(1)
        };
        let mut out = d.clone();
        for s in &mut out.scopes {
            let used = seen.get(&s.scope).copied();
            s.rpm = share(s.rpm);
            s.tpm = share(s.tpm);
            s.concurrency = share(s.concurrency);
            s.daily_budget_micros = money(s.daily_budget_micros, used.map(|u| u.0));
            s.monthly_budget_micros = money(s.monthly_budget_micros, used.map(|u| u.1));
        }
        out
    }

    fn counters_failed(&self, e: &LimiterError) {
        self.0.counters_failed(e);
    }

    /// Reads one scope's counters (in process, or from Redis).
    pub async fn read(&self, entry: &pb::LimitEntry) -> Result<Reading, LimiterError> {
        read_entry(self.0.primary.as_ref(), entry).await
    }
}

/// Raises the settled spend of `entry`'s scope for the current UTC day and month to at least
/// these (see [`Limiter::raise_spend`]).
pub async fn raise_spend_entry(
    limiter: &dyn Limiter,
    entry: &pb::LimitEntry,
    day_micros: i64,
    month_micros: i64,
) -> Result<(), LimiterError> {
    let (day, month) = answer::day_and_month(answer::unix_ms());
    limiter
        .raise_spend(
            &ScopeLimits::from_entry(entry),
            &day,
            &month,
            day_micros,
            month_micros,
        )
        .await
}

/// The counters of `entry`'s scope in `limiter`, for the current UTC day and month.
pub async fn read_entry(
    limiter: &dyn Limiter,
    entry: &pb::LimitEntry,
) -> Result<Reading, LimiterError> {
    let (day, month) = answer::day_and_month(answer::unix_ms());
    limiter
        .read(&ScopeLimits::from_entry(entry), &day, &month)
        .await
}

impl Gate {
    fn counters_failed(&self, e: &LimiterError) {
        self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        if matches!(e, LimiterError::Timeout(_))
            && self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 < TIMEOUTS_TO_TRIP
        {
            tracing::debug!(error = %e, "a limit counter call timed out; this request follows the fail mode");
            return;
        }
        if self.primary.shared() && self.up.swap(false, Ordering::AcqRel) {
            *lock(&self.fallback) = Arc::new(LocalLimiter::new());
            match self.cfg.fail {
                FailMode::Open => {
                    tracing::warn!(error = %e, "the shared limit counters (Redis) are unreachable: admitting on this proxy's local share of each limit (--limits-fail open) until Redis answers again")
                }
                FailMode::Closed => {
                    tracing::warn!(error = %e, "the shared limit counters (Redis) are unreachable: refusing requests under a limit (--limits-fail closed) until Redis answers again")
                }
            }
        }
    }

    fn settle_on_primary(self: &Arc<Self>, s: Settlement) {
        if !self.primary.shared() {
            // In process: done before the call returns.
            let _ = self.primary.settle(&s).now_or_never();
            return;
        }
        lock(&self.leases).remove(&s.lease.lease);
        if !self.up.load(Ordering::Relaxed) {
            lock(&self.pending).push_back(s);
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            lock(&self.pending).push_back(s);
            return;
        };
        let gate = self.clone();
        rt.spawn(async move {
            if let Err(e) = gate.primary.settle(&s).await {
                gate.counters_failed(&e);
                lock(&gate.pending).push_back(s);
            }
        });
    }
}

/// The background work of a shared limiter; ends when the limits are dropped.
async fn maintain(gate: std::sync::Weak<Gate>) {
    // The first refresh at the first tick: the fleet size is known early.
    let mut last_refresh = {
        let now = tokio::time::Instant::now();
        let ttl = gate
            .upgrade()
            .map_or(DEFAULT_LEASE_TTL, |g| g.cfg.lease_ttl);
        now.checked_sub(ttl).unwrap_or(now)
    };
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(g) = gate.upgrade() else {
            return;
        };
        if !g.up.load(Ordering::Relaxed) {
            if g.primary.ping().await.is_err() {
                continue;
            }
            g.timeouts.store(0, Ordering::Relaxed);
            g.up.store(true, Ordering::Release);
            tracing::info!(
                pending_settles = lock(&g.pending).len(),
                "the shared limit counters (Redis) answer again: counting in Redis"
            );
        }
        // Settles that waited, then the spend of leases the fallback admitted.
        loop {
            let Some(s) = lock(&g.pending).pop_front() else {
                break;
            };
            if let Err(e) = g.primary.settle(&s).await {
                g.counters_failed(&e);
                lock(&g.pending).push_front(s);
                break;
            }
        }
        let unsynced: Vec<(ScopeDay, (ScopeLimits, i64))> = lock(&g.unsynced).drain().collect();
        let mut rest = unsynced.into_iter();
        while let Some((k, (limits, micros))) = rest.next() {
            if let Err(e) = g.primary.add_spend(&limits, &k.1, &k.2, micros).await {
                g.counters_failed(&e);
                let mut back = lock(&g.unsynced);
                for (k, (limits, micros)) in std::iter::once((k, (limits, micros))).chain(rest) {
                    back.entry(k).or_insert_with(|| (limits, 0)).1 += micros;
                }
                break;
            }
        }
        if last_refresh.elapsed() >= g.cfg.lease_ttl / 3 && g.up.load(Ordering::Relaxed) {
            last_refresh = tokio::time::Instant::now();
            let leases: Vec<Arc<LeaseRef>> = lock(&g.leases).values().cloned().collect();
            match g.primary.refresh(&leases, &g.cfg.proxy_id).await {
                Ok(n) => g.fleet.store(n.max(1), Ordering::Relaxed),
                Err(e) => g.counters_failed(&e),
            }
        }
    }
}

enum On {
    Primary,
    /// Admitted by the local fallback (fail open) while Redis was unreachable.
    Fallback(Arc<LocalLimiter>),
}

struct Held {
    gate: Arc<Gate>,
    lease: Arc<LeaseRef>,
    on: On,
    done: bool,
}

impl Held {
    fn finish(&mut self, tokens: u64, cost_micros: i64) {
        if self.done {
            return;
        }
        self.done = true;
        let s = Settlement {
            lease: self.lease.clone(),
            tokens,
            cost_micros,
        };
        match &self.on {
            On::Primary => self.gate.settle_on_primary(s),
            On::Fallback(local) => {
                local.settle_now(&s);
                if self.gate.primary.shared() && cost_micros > 0 {
                    let mut unsynced = lock(&self.gate.unsynced);
                    for sl in self.lease.scopes.iter().filter(|s| s.has_budget()) {
                        let e = unsynced
                            .entry((
                                sl.scope.clone(),
                                self.lease.day.clone(),
                                self.lease.month.clone(),
                            ))
                            .or_insert_with(|| (sl.clone(), 0));
                        e.1 += cost_micros;
                    }
                }
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Unsettled (the request's event was never completed): release what it held.
        self.finish(0, 0);
    }
}

/// What an admitted request holds until it ends: settle it with the request's usage event
/// ([`Permit::settle`]); dropped unsettled, it releases what it held. Clones share one lease.
#[derive(Clone)]
pub struct Permit(Arc<Mutex<Option<Held>>>);

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

impl Permit {
    /// Settles with the event's tokens (input + output) and cost; once (later calls do nothing).
    pub fn settle(&self, e: &UsageEvent) {
        let held = lock(&self.0).take();
        if let Some(mut h) = held {
            h.finish(
                e.input_tokens.saturating_add(e.output_tokens),
                e.cost_micros.max(0),
            );
        }
    }
}

/// One request, as admission sees it.
pub struct Ask<'a> {
    pub snapshot: &'a Indexed,
    pub org_id: &'a str,
    pub key_id: &'a str,
    /// The model's catalog entry (its prices), if known.
    pub model: Option<&'a Model>,
    /// The request asks for the priority tier (reserved at its price).
    pub priority: bool,
    /// Its estimated input and its output cap: [`estimate::worst_case_tokens`] of its body.
    pub worst: (u64, u64),
    pub format: CallerFormat,
    /// The lease id.
    pub request_id: &'a str,
}

/// An admitted request: its permit (into the usage draft) and the headers of its answer.
#[derive(Debug)]
pub struct Admitted {
    pub permit: Permit,
    pub headers: RateHeaders,
}

#[cfg(test)]
mod tests;
