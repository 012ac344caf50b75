//! Rate limits, concurrency caps and spend budgets: the commands (events on the `limits-…`
//! streams, carried to proxies in the snapshot) and the view with the current use against each
//! limit.
//!
//! Where the use comes from: requests, tokens and requests in flight from the counters the proxies
//! share ([`LimitCounters`]: Redis with `flex control --redis-url`, or the embedded proxy's
//! in-process limiter under `flex up`); spend from the usage ledger (what billing uses), next to
//! what the counters hold (settled spend plus the worst case of the requests in flight), which is
//! what admission decides on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use flex_shared::proto::admin as apb;
use flex_shared::proto::control as pb;
use time::{Date, Month, OffsetDateTime, Time};

use crate::domain::{self, ApiKeyAggregate, LimitChanges, LimitsAggregate, OrgAggregate};
use crate::error::{Error, Result};
use crate::store::Metadata;
use crate::{timefmt, ControlPlane};

/// A boxed future, for the object-safe [`LimitCounters`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the shared counters hold for one scope right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterReading {
    /// Requests admitted in the last 60 s.
    pub requests: u64,
    /// Tokens counted in the last 60 s (the worst case of requests in flight, the real use of
    /// those that ended).
    pub tokens: u64,
    /// Unix ms when the 60-second window is empty again (0: it is empty).
    pub window_clear_at_ms: u64,
    /// Requests in flight.
    pub in_flight: u64,
    /// The worst case of the requests in flight, micro-dollars.
    pub reserved_micros: i64,
    /// Settled spend of the current UTC day and month, micro-dollars.
    pub day_settled_micros: i64,
    pub month_settled_micros: i64,
}

/// Reads the counters the proxies share (implemented by the binary over the data plane's
/// limiter: Redis or the in-process one).
pub trait LimitCounters: Send + Sync {
    /// `redis` or `in-process`.
    fn kind(&self) -> &'static str;
    /// The counters of `entry`'s scope (its limits say which counters exist).
    fn read<'a>(
        &'a self,
        entry: &'a pb::LimitEntry,
    ) -> BoxFuture<'a, std::result::Result<CounterReading, String>>;
    /// Raises the counters' settled spend of the current UTC day and month to at least these
    /// (the ledger's), never lowering it.
    fn raise_spend<'a>(
        &'a self,
        entry: &'a pb::LimitEntry,
        day_micros: i64,
        month_micros: i64,
    ) -> BoxFuture<'a, std::result::Result<(), String>>;
}

/// How often [`ControlPlane::reconcile_budgets`] runs under `flex control --redis-url`.
pub const RECONCILE_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

fn scope_key(key_id: &str) -> Option<&str> {
    let k = key_id.trim();
    (!k.is_empty()).then_some(k)
}

/// The start of the UTC day of `t`, and of the next one.
pub fn day_bounds(t: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
    let start = t.replace_time(Time::MIDNIGHT);
    (start, start + time::Duration::days(1))
}

/// The start of the UTC month of `t`, and of the next one.
pub fn month_bounds(t: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
    let start = t.replace_time(Time::MIDNIGHT);
    let first = Date::from_calendar_date(t.year(), t.month(), 1).unwrap_or(t.date());
    let (y, m) = match t.month() {
        Month::December => (t.year() + 1, Month::January),
        m => (t.year(), m.next()),
    };
    let next = Date::from_calendar_date(y, m, 1).unwrap_or(t.date());
    (start.replace_date(first), start.replace_date(next))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl ControlPlane {
    /// Uses `counters` for the current use in [`ControlPlane::get_limits`].
    pub fn set_limit_counters(&self, counters: Arc<dyn LimitCounters>) {
        *self
            .limit_counters
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(counters);
    }

    fn limit_counters(&self) -> Option<Arc<dyn LimitCounters>> {
        self.limit_counters
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Checks the scope: the org exists, and the key (when given) is one of its keys.
    async fn check_limit_scope(
        &self,
        org_id: &str,
        key_id: Option<&str>,
        for_set: bool,
    ) -> Result<()> {
        let org = self
            .load::<OrgAggregate>(&domain::org_stream(org_id))
            .await?;
        org.state.require(org_id)?;
        if let Some(key_id) = key_id {
            let key = self
                .load::<ApiKeyAggregate>(&domain::api_key_stream(key_id))
                .await?;
            if key.state.org_id.as_deref() != Some(org_id) {
                return Err(Error::NotFound(format!(
                    "org {org_id} has no API key {:?}; list its keys with `flex admin key list --org {org_id}`",
                    domain::clip(key_id)
                )));
            }
            if for_set && key.state.revoked {
                return Err(Error::FailedPrecondition(format!(
                    "API key {key_id} is revoked, so it makes no requests to limit; limit the org (`flex admin limits set --org {org_id} …`) or another key"
                )));
            }
        }
        Ok(())
    }

    /// Changes the limits of an org (`key_id` empty: all its keys together) or of one of its
    /// keys: only those named, `0` removing one. Recorded as `LimitsSet` (or `LimitsCleared` when
    /// none is left); proxies enforce them from the next snapshot.
    pub async fn set_limits(
        &self,
        meta: &Metadata,
        org_id: &str,
        key_id: &str,
        changes: &LimitChanges,
    ) -> Result<apb::LimitsView> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let key_id = scope_key(key_id)
            .map(|k| domain::validate_id("key_id", k, "key_0190…"))
            .transpose()?;
        self.check_limit_scope(&org_id, key_id.as_deref(), true)
            .await?;
        let stream = domain::limits_stream(&org_id, key_id.as_deref());
        let current = self.load::<LimitsAggregate>(&stream).await?;
        match current.state.set(&org_id, key_id.as_deref(), changes)? {
            Some(event) => self.append(&stream, current.version, &event, meta).await?,
            None => self.catch_up().await?,
        }
        Ok(self.limits_view(&org_id, key_id.as_deref()))
    }

    /// Removes every limit of the scope (nothing to remove is not an error).
    pub async fn clear_limits(
        &self,
        meta: &Metadata,
        org_id: &str,
        key_id: &str,
    ) -> Result<apb::LimitsView> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let key_id = scope_key(key_id)
            .map(|k| domain::validate_id("key_id", k, "key_0190…"))
            .transpose()?;
        self.check_limit_scope(&org_id, key_id.as_deref(), false)
            .await?;
        let stream = domain::limits_stream(&org_id, key_id.as_deref());
        let current = self.load::<LimitsAggregate>(&stream).await?;
        match current.state.clear(&org_id, key_id.as_deref()) {
            Some(event) => self.append(&stream, current.version, &event, meta).await?,
            None => self.catch_up().await?,
        }
        Ok(self.limits_view(&org_id, key_id.as_deref()))
    }

    /// The scope's limits from the projection (no use).
    fn limits_view(&self, org_id: &str, key_id: Option<&str>) -> apb::LimitsView {
        let state = self.state();
        let entry = state
            .limits
            .get(&(org_id.to_string(), key_id.unwrap_or_default().to_string()))
            .cloned()
            .unwrap_or_else(|| pb::LimitEntry {
                org_id: org_id.to_string(),
                key_id: key_id.unwrap_or_default().to_string(),
                ..pb::LimitEntry::default()
            });
        apb::LimitsView {
            org_id: org_id.to_string(),
            key_id: key_id.unwrap_or_default().to_string(),
            limits: Some(entry),
            usage: Vec::new(),
            counters: String::new(),
            counters_error: String::new(),
        }
    }

    /// Puts the ledger's spend into the counters where they hold less (a Redis that restarted
    /// without persistence forgot the day's and month's spend): for every scope with a budget,
    /// the counters' settled spend becomes at least the ledger's since the start of the UTC day
    /// and month. Both are lower bounds of the true spend (events still on their way, settles
    /// lost with Redis), so the larger is too. Returns the scopes reconciled.
    pub async fn reconcile_budgets(&self) -> Result<usize> {
        let Some(counters) = self.limit_counters() else {
            return Ok(0);
        };
        let now = timefmt::now();
        let (day, _) = day_bounds(now);
        let (month, _) = month_bounds(now);
        let entries: Vec<pb::LimitEntry> = self
            .state()
            .limits
            .values()
            .filter(|e| e.daily_budget_micros > 0 || e.monthly_budget_micros > 0)
            .cloned()
            .collect();
        let mut done = 0;
        for e in &entries {
            let key = scope_key(&e.key_id);
            let d = self.store.spend_since(&e.org_id, key, day).await?;
            let m = self.store.spend_since(&e.org_id, key, month).await?;
            if d == 0 && m == 0 {
                continue;
            }
            counters.raise_spend(e, d, m).await.map_err(|why| {
                Error::Internal(format!(
                    "the limit counters cannot be reached to reconcile budgets: {why}"
                ))
            })?;
            done += 1;
        }
        Ok(done)
    }

    /// The scope's limits, each with the current use against it (see the module docs).
    pub async fn get_limits(&self, org_id: &str, key_id: &str) -> Result<apb::LimitsView> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let key_id = scope_key(key_id)
            .map(|k| domain::validate_id("key_id", k, "key_0190…"))
            .transpose()?;
        self.catch_up().await?;
        self.check_limit_scope(&org_id, key_id.as_deref(), false)
            .await?;
        let mut view = self.limits_view(&org_id, key_id.as_deref());
        let entry = view.limits.clone().unwrap_or_default();
        let now = timefmt::now();
        let (reading, counters, counters_error) = match self.limit_counters() {
            None => (None, "none".to_string(), String::new()),
            Some(c) => match c.read(&entry).await {
                Ok(r) => (Some(r), c.kind().to_string(), String::new()),
                Err(e) => (None, c.kind().to_string(), e),
            },
        };
        let (day_start, day_end) = day_bounds(now);
        let (month_start, month_end) = month_bounds(now);
        let mut usage = Vec::new();
        let window_reset = |r: &CounterReading| {
            if r.window_clear_at_ms == 0 {
                String::new()
            } else {
                let t = OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(r.window_clear_at_ms) * 1_000_000,
                )
                .unwrap_or(now);
                timefmt::format(t)
            }
        };
        let counted =
            |limit: &str, value: u64, used: Option<u64>, resets_at: String| apb::LimitUsage {
                limit: limit.to_string(),
                value: i64_of(value),
                used: used.map(i64_of),
                reserved: None,
                remaining: used.map(|u| i64_of(value.saturating_sub(u))),
                resets_at,
                source: "counters".to_string(),
                counted: None,
            };
        if entry.rpm > 0 {
            usage.push(counted(
                "rpm",
                entry.rpm,
                reading.map(|r| r.requests),
                reading.as_ref().map(window_reset).unwrap_or_default(),
            ));
        }
        if entry.tpm > 0 {
            usage.push(counted(
                "tpm",
                entry.tpm,
                reading.map(|r| r.tokens),
                reading.as_ref().map(window_reset).unwrap_or_default(),
            ));
        }
        if entry.concurrency > 0 {
            usage.push(counted(
                "concurrency",
                entry.concurrency,
                reading.map(|r| r.in_flight),
                String::new(),
            ));
        }
        for (limit, value, from, until, settled) in [
            (
                "daily_budget_micros",
                entry.daily_budget_micros,
                day_start,
                day_end,
                reading.map(|r| r.day_settled_micros),
            ),
            (
                "monthly_budget_micros",
                entry.monthly_budget_micros,
                month_start,
                month_end,
                reading.map(|r| r.month_settled_micros),
            ),
        ] {
            if value <= 0 {
                continue;
            }
            let spent = self
                .store
                .spend_since(&org_id, key_id.as_deref(), from)
                .await?;
            let reserved = reading.map(|r| r.reserved_micros);
            let held = spent.max(settled.unwrap_or(0)) + reserved.unwrap_or(0);
            usage.push(apb::LimitUsage {
                limit: limit.to_string(),
                value,
                used: Some(spent),
                reserved,
                remaining: Some((value - held).max(0)),
                resets_at: timefmt::format(until),
                source: "ledger".to_string(),
                counted: settled.map(|s| s + reserved.unwrap_or(0)),
            });
        }
        view.usage = usage;
        view.counters = counters;
        view.counters_error = counters_error;
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_months_are_utc_calendar_periods() {
        let t = timefmt::parse("2025-12-31T23:59:59.5Z").unwrap_or_else(timefmt::now);
        let (d0, d1) = day_bounds(t);
        assert_eq!(timefmt::format(d0), "2025-12-31T00:00:00.000000Z");
        assert_eq!(timefmt::format(d1), "2026-01-01T00:00:00.000000Z");
        let (m0, m1) = month_bounds(t);
        assert_eq!(timefmt::format(m0), "2025-12-01T00:00:00.000000Z");
        assert_eq!(timefmt::format(m1), "2026-01-01T00:00:00.000000Z");
        let t = timefmt::parse("2024-02-10T08:00:00Z").unwrap_or_else(timefmt::now);
        let (m0, m1) = month_bounds(t);
        assert_eq!(timefmt::format(m0), "2024-02-01T00:00:00.000000Z");
        assert_eq!(timefmt::format(m1), "2024-03-01T00:00:00.000000Z");
    }
}
