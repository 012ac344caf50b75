//! The in-process limiter: exact within one process (`flex up`, a `flex proxy` without
//! `--redis-url`, and a proxy's fallback while Redis is unreachable). The same counting as the
//! Redis scripts, on maps behind one mutex held for microseconds (never across an await).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{
    BoxFuture, Decision, Demand, Granted, LeaseRef, LimitKind, Limiter, LimiterError, Reading,
    Refusal, ScopeCount, ScopeLimits, Settlement, WINDOW_MS,
};

#[derive(Default)]
struct ScopeState {
    /// Admissions in the window: (unix ms, lease), oldest first.
    window: VecDeque<(u64, String)>,
    /// Tokens counted per lease in the window, and their sum.
    tokens: HashMap<String, u64>,
    token_sum: u64,
    in_flight: HashSet<String>,
    reserved: HashMap<String, i64>,
    reserved_sum: i64,
    /// Settled spend by UTC day (`YYYYMMDD`) and month (`YYYYMM`); only the current ones kept.
    day: HashMap<String, i64>,
    month: HashMap<String, i64>,
}

impl ScopeState {
    fn expire(&mut self, now: u64) {
        while let Some((t, _)) = self.window.front() {
            if *t + WINDOW_MS > now {
                break;
            }
            if let Some((_, lease)) = self.window.pop_front() {
                if let Some(n) = self.tokens.remove(&lease) {
                    self.token_sum = self.token_sum.saturating_sub(n);
                }
            }
        }
    }

    /// The earliest time the window frees `need` tokens (ms from `now`).
    fn tokens_free_in(&self, need: u64, now: u64) -> u64 {
        let mut freed = 0;
        for (t, lease) in &self.window {
            freed += self.tokens.get(lease).copied().unwrap_or(0);
            if freed >= need {
                return (*t + WINDOW_MS).saturating_sub(now);
            }
        }
        WINDOW_MS
    }
}

/// The in-process limiter (see the module docs).
#[derive(Default)]
pub struct LocalLimiter {
    scopes: Mutex<HashMap<(String, String), ScopeState>>,
    /// The last admission time handed out, so the window stays ordered if the clock steps back.
    last_ms: std::sync::atomic::AtomicU64,
}

fn key(s: &ScopeLimits) -> (String, String) {
    (
        s.scope.org_id.clone(),
        s.scope.key_id.clone().unwrap_or_default(),
    )
}

impl LocalLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    fn now(&self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let prev = self
            .last_ms
            .fetch_max(wall, std::sync::atomic::Ordering::Relaxed);
        wall.max(prev)
    }

    /// Decides and (when granted) records one admission; what the Redis script does.
    pub fn admit_now(&self, d: &Demand) -> Decision {
        let now = self.now();
        let mut scopes = self
            .scopes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut counts = Vec::with_capacity(d.scopes.len());
        for (i, s) in d.scopes.iter().enumerate() {
            let st = scopes.entry(key(s)).or_default();
            let mut c = ScopeCount::default();
            let refuse = |kind, limit: u64, used: u64, requested: u64, retry| {
                Decision::Refused(Refusal {
                    now_ms: now,
                    scope: i,
                    kind,
                    limit: i64::try_from(limit).unwrap_or(i64::MAX),
                    used: i64::try_from(used).unwrap_or(i64::MAX),
                    requested: i64::try_from(requested).unwrap_or(i64::MAX),
                    retry_after_ms: retry,
                })
            };
            if s.rpm > 0 || s.tpm > 0 {
                st.expire(now);
                c.requests = st.window.len() as u64;
                if s.rpm > 0 && c.requests + 1 > s.rpm {
                    let retry = st
                        .window
                        .front()
                        .map_or(WINDOW_MS, |(t, _)| (*t + WINDOW_MS).saturating_sub(now));
                    return refuse(LimitKind::Rpm, s.rpm, c.requests, 1, Some(retry));
                }
                if s.tpm > 0 {
                    c.tokens = st.token_sum;
                    if d.tokens > s.tpm {
                        return refuse(LimitKind::Tpm, s.tpm, c.tokens, d.tokens, None);
                    }
                    if c.tokens + d.tokens > s.tpm {
                        let retry = st.tokens_free_in(c.tokens + d.tokens - s.tpm, now);
                        return refuse(LimitKind::Tpm, s.tpm, c.tokens, d.tokens, Some(retry));
                    }
                }
            }
            if s.concurrency > 0 {
                c.in_flight = st.in_flight.len() as u64;
                if c.in_flight + 1 > s.concurrency {
                    return refuse(
                        LimitKind::Concurrency,
                        s.concurrency,
                        c.in_flight,
                        1,
                        Some(1000),
                    );
                }
            }
            if s.has_budget() {
                let day = st.day.get(&d.day).copied().unwrap_or(0) + st.reserved_sum;
                let month = st.month.get(&d.month).copied().unwrap_or(0) + st.reserved_sum;
                c.day_micros = day;
                c.month_micros = month;
                let need = d.cost_micros.max(1);
                let money = |v: i64| u64::try_from(v.max(0)).unwrap_or(0);
                let cost = money(d.cost_micros);
                if s.daily_budget_micros > 0 && day + need > s.daily_budget_micros {
                    return refuse(
                        LimitKind::DailyBudget,
                        money(s.daily_budget_micros),
                        money(day),
                        cost,
                        None,
                    );
                }
                if s.monthly_budget_micros > 0 && month + need > s.monthly_budget_micros {
                    return refuse(
                        LimitKind::MonthlyBudget,
                        money(s.monthly_budget_micros),
                        money(month),
                        cost,
                        None,
                    );
                }
            }
            counts.push(c);
        }
        for s in &d.scopes {
            let st = scopes.entry(key(s)).or_default();
            if s.rpm > 0 || s.tpm > 0 {
                st.window.push_back((now, d.lease.clone()));
                if s.tpm > 0 {
                    st.tokens.insert(d.lease.clone(), d.tokens);
                    st.token_sum += d.tokens;
                }
            }
            if s.concurrency > 0 {
                st.in_flight.insert(d.lease.clone());
            }
            if s.has_budget() {
                st.reserved.insert(d.lease.clone(), d.cost_micros);
                st.reserved_sum += d.cost_micros;
            }
        }
        Decision::Granted(Granted {
            now_ms: now,
            counts,
        })
    }

    /// Settles one lease; what the Redis script does.
    pub fn settle_now(&self, s: &Settlement) {
        let mut scopes = self
            .scopes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for sl in &s.lease.scopes {
            let Some(st) = scopes.get_mut(&key(sl)) else {
                continue;
            };
            if sl.tpm > 0 {
                if let Some(old) = st.tokens.get_mut(&s.lease.lease) {
                    st.token_sum = st.token_sum.saturating_sub(*old) + s.tokens;
                    *old = s.tokens;
                }
            }
            if sl.concurrency > 0 {
                st.in_flight.remove(&s.lease.lease);
            }
            if sl.has_budget() {
                if let Some(held) = st.reserved.remove(&s.lease.lease) {
                    st.reserved_sum -= held;
                    if s.cost_micros > 0 {
                        st.day.retain(|d, _| *d == s.lease.day);
                        st.month.retain(|m, _| *m == s.lease.month);
                        *st.day.entry(s.lease.day.clone()).or_default() += s.cost_micros;
                        *st.month.entry(s.lease.month.clone()).or_default() += s.cost_micros;
                    }
                }
            }
        }
    }

    /// The counters of one scope now.
    pub fn read_now(&self, s: &ScopeLimits, day: &str, month: &str) -> Reading {
        let now = self.now();
        let mut scopes = self
            .scopes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(st) = scopes.get_mut(&key(s)) else {
            return Reading::default();
        };
        st.expire(now);
        Reading {
            requests: st.window.len() as u64,
            tokens: st.token_sum,
            window_clear_at_ms: st.window.back().map_or(0, |(t, _)| t + WINDOW_MS),
            in_flight: st.in_flight.len() as u64,
            reserved_micros: st.reserved_sum,
            day_settled_micros: st.day.get(day).copied().unwrap_or(0),
            month_settled_micros: st.month.get(month).copied().unwrap_or(0),
        }
    }

    /// Leases in flight here (what a fallback limiter still holds).
    pub fn in_flight(&self) -> usize {
        self.scopes
            .lock()
            .map(|s| s.values().map(|st| st.in_flight.len()).sum())
            .unwrap_or(0)
    }
}

impl Limiter for LocalLimiter {
    fn kind(&self) -> &'static str {
        "in-process"
    }

    fn shared(&self) -> bool {
        false
    }

    fn admit<'a>(&'a self, d: &'a Demand) -> BoxFuture<'a, Result<Decision, LimiterError>> {
        let decision = self.admit_now(d);
        Box::pin(async move { Ok(decision) })
    }

    fn settle<'a>(&'a self, s: &'a Settlement) -> BoxFuture<'a, Result<(), LimiterError>> {
        self.settle_now(s);
        Box::pin(async { Ok(()) })
    }

    fn refresh<'a>(
        &'a self,
        _leases: &'a [std::sync::Arc<LeaseRef>],
        _proxy_id: &'a str,
    ) -> BoxFuture<'a, Result<u64, LimiterError>> {
        Box::pin(async { Ok(1) })
    }

    fn read<'a>(
        &'a self,
        s: &'a ScopeLimits,
        day: &'a str,
        month: &'a str,
    ) -> BoxFuture<'a, Result<Reading, LimiterError>> {
        let r = self.read_now(s, day, month);
        Box::pin(async move { Ok(r) })
    }

    fn add_spend<'a>(
        &'a self,
        _s: &'a ScopeLimits,
        _day: &'a str,
        _month: &'a str,
        _micros: i64,
    ) -> BoxFuture<'a, Result<(), LimiterError>> {
        Box::pin(async { Ok(()) })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), LimiterError>> {
        Box::pin(async { Ok(()) })
    }
}
