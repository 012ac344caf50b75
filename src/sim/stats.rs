//! Counters per (provider, tier), so tests can assert that the losing tier of a flex race was
//! cancelled and that at most one tier produced content.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

/// A simulated provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Provider {
    OpenAi,
    Anthropic,
    Gemini,
}

/// A service tier, as served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tier {
    Flex,
    Standard,
    Priority,
}

const PROVIDERS: [Provider; 3] = [Provider::OpenAi, Provider::Anthropic, Provider::Gemini];
const TIERS: [Tier; 3] = [Tier::Flex, Tier::Standard, Tier::Priority];
const SLOTS: usize = PROVIDERS.len() * TIERS.len();

impl Provider {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
        }
    }

    /// The tier as this provider names it on the wire (`None`: the provider has no such tier).
    pub(crate) fn tier_name(self, tier: Tier) -> Option<&'static str> {
        match (self, tier) {
            (Provider::Anthropic, Tier::Flex) => None,
            (Provider::OpenAi, Tier::Standard) => Some("default"),
            (_, Tier::Flex) => Some("flex"),
            (_, Tier::Standard) => Some("standard"),
            (_, Tier::Priority) => Some("priority"),
        }
    }

    /// The wire name of `tier`, falling back to the standard tier's.
    pub(crate) fn served_name(self, tier: Tier) -> &'static str {
        self.tier_name(tier)
            .or(self.tier_name(Tier::Standard))
            .unwrap_or("standard")
    }
}

fn slot(provider: Provider, tier: Tier) -> usize {
    provider as usize * TIERS.len() + tier as usize
}

/// Request counters of a running simulator, by `"provider:tier"` (`"openai:flex"`,
/// `"anthropic:standard"`, `"gemini:priority"`…, tiers named as each provider names them).
#[derive(Debug, Default)]
pub struct SimStats {
    requests: [AtomicU64; SLOTS],
    started: [AtomicU64; SLOTS],
    cancelled: [AtomicU64; SLOTS],
    capacity_errors: [AtomicU64; SLOTS],
    /// Answers being served now (from admission until the last byte is about to go out, or the
    /// client left), and the most there ever were at once since the last reset.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

/// A copy of the counters; `GET /_sim/stats` returns it as JSON. Every key exists, zero or not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SimStatsSnapshot {
    /// Authenticated, well-formed requests, by the tier they were served on.
    pub requests: BTreeMap<String, u64>,
    /// Requests that produced their first content (after the tier's start delay).
    pub started: BTreeMap<String, u64>,
    /// Requests whose client went away before the response ended (streaming or not).
    pub cancelled: BTreeMap<String, u64>,
    /// Flex requests answered with the capacity error.
    pub capacity_errors: BTreeMap<String, u64>,
    /// Answers being served now, all providers and tiers.
    pub in_flight: u64,
    /// The most answers served at once since the start or the last reset (a high-water mark).
    pub max_in_flight: u64,
}

impl SimStatsSnapshot {
    /// `requests["provider:tier"]`, 0 when absent.
    pub fn requests(&self, key: &str) -> u64 {
        self.requests.get(key).copied().unwrap_or(0)
    }

    /// `started["provider:tier"]`, 0 when absent.
    pub fn started(&self, key: &str) -> u64 {
        self.started.get(key).copied().unwrap_or(0)
    }

    /// `cancelled["provider:tier"]`, 0 when absent.
    pub fn cancelled(&self, key: &str) -> u64 {
        self.cancelled.get(key).copied().unwrap_or(0)
    }

    /// `capacity_errors["provider:tier"]`, 0 when absent.
    pub fn capacity_errors(&self, key: &str) -> u64 {
        self.capacity_errors.get(key).copied().unwrap_or(0)
    }
}

impl SimStats {
    /// A copy of all counters.
    pub fn snapshot(&self) -> SimStatsSnapshot {
        SimStatsSnapshot {
            requests: Self::table(&self.requests),
            started: Self::table(&self.started),
            cancelled: Self::table(&self.cancelled),
            capacity_errors: Self::table(&self.capacity_errors),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            max_in_flight: self.max_in_flight.load(Ordering::Relaxed),
        }
    }

    /// Zeroes all counters.
    pub fn reset(&self) {
        for counters in [
            &self.requests,
            &self.started,
            &self.cancelled,
            &self.capacity_errors,
        ] {
            for counter in counters {
                counter.store(0, Ordering::Relaxed);
            }
        }
        self.max_in_flight
            .store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn table(counters: &[AtomicU64; SLOTS]) -> BTreeMap<String, u64> {
        let mut table = BTreeMap::new();
        for provider in PROVIDERS {
            for tier in TIERS {
                if let Some(tier_name) = provider.tier_name(tier) {
                    let count = counters[slot(provider, tier)].load(Ordering::Relaxed);
                    table.insert(format!("{}:{tier_name}", provider.name()), count);
                }
            }
        }
        table
    }

    pub(crate) fn count_request(&self, provider: Provider, tier: Tier) {
        self.requests[slot(provider, tier)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_capacity_error(&self, provider: Provider, tier: Tier) {
        self.capacity_errors[slot(provider, tier)].fetch_add(1, Ordering::Relaxed);
    }
}

/// Lives as long as one served answer (the body stream, or the handler of a non-streaming
/// request). Dropped before [`ServeGuard::finish`], it counts the request as cancelled.
#[derive(Debug)]
pub(crate) struct ServeGuard {
    stats: Arc<SimStats>,
    slot: usize,
    started: bool,
    finished: bool,
    /// Still counted in `in_flight`.
    in_flight: bool,
    /// Break (`Err`) or end (`Ok`) the stream after this many events.
    pub(crate) cut: Option<Result<usize, usize>>,
}

impl ServeGuard {
    pub(crate) fn new(stats: Arc<SimStats>, provider: Provider, tier: Tier) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
        Self {
            stats,
            slot: slot(provider, tier),
            started: false,
            finished: false,
            in_flight: true,
            cut: None,
        }
    }

    fn leave(&mut self) {
        if std::mem::take(&mut self.in_flight) {
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Cuts the stream it serves after some events (a `cut_after` / `end_after` directive).
    pub(crate) fn cut(mut self, cut: Option<Result<usize, usize>>) -> Self {
        self.cut = cut;
        self
    }

    /// The first content is about to go out.
    pub(crate) fn start(&mut self) {
        if !self.started {
            self.started = true;
            self.stats.started[self.slot].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The last byte is about to go out.
    pub(crate) fn finish(&mut self) {
        self.start();
        self.finished = true;
        self.leave();
    }
}

impl Drop for ServeGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.stats.cancelled[self.slot].fetch_add(1, Ordering::Relaxed);
        }
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_cancelled_only_when_unfinished() {
        let stats = Arc::new(SimStats::default());
        drop(ServeGuard::new(stats.clone(), Provider::OpenAi, Tier::Flex));
        let mut done = ServeGuard::new(stats.clone(), Provider::Gemini, Tier::Priority);
        done.finish();
        drop(done);
        let snap = stats.snapshot();
        assert_eq!(snap.cancelled("openai:flex"), 1);
        assert_eq!(snap.started("openai:flex"), 0);
        assert_eq!(snap.cancelled("gemini:priority"), 0);
        assert_eq!(snap.started("gemini:priority"), 1);
        assert!(!snap.requests.contains_key("anthropic:flex"));
        assert_eq!(snap.requests("openai:default"), 0);
        // The high-water mark of answers in flight.
        let a = ServeGuard::new(stats.clone(), Provider::OpenAi, Tier::Standard);
        let mut b = ServeGuard::new(stats.clone(), Provider::Gemini, Tier::Flex);
        assert_eq!(
            (stats.snapshot().in_flight, stats.snapshot().max_in_flight),
            (2, 2)
        );
        b.finish();
        drop(b);
        drop(a);
        assert_eq!(
            (stats.snapshot().in_flight, stats.snapshot().max_in_flight),
            (0, 2)
        );
        stats.reset();
        assert_eq!(stats.snapshot().max_in_flight, 0);
        assert_eq!(stats.snapshot().cancelled("openai:flex"), 0);
    }
}
