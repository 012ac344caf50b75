//! The proxy's Prometheus metrics (`prometheus-client`), served on `--metrics-listen`, never on
//! the public API port.
//!
//! Every request is counted once, from its usage event (`Metered` wraps the usage sink), so the
//! counters agree with the ledger; requests refused before a usage event exists (an unknown key,
//! a body that is not JSON) are counted by the pipeline with empty provider, model and tier.
//! No label carries an org or a key: the label values are formats, providers, catalog model ids,
//! tiers, statuses and reasons.

use std::sync::Arc;

use flex_shared::usage::UsageEvent;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::series::Series;
use crate::snapshot::SnapshotStore;
use crate::usage::{Durable, UsageSink};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub format: String,
    pub provider: String,
    pub model: String,
    pub tier: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub provider: String,
    pub tier: String,
    /// `started`, or the failure class: `caller`, `capacity`, `server`.
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub provider: String,
    pub model: String,
    pub tier: String,
    /// `input`, `cached_input`, `output`, `reasoning`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub provider: String,
    pub model: String,
    pub tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

/// The opt-in per-org series (`--metrics-org-label-max`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrgLabels {
    /// An org id, or `_other` past the cap.
    pub org: String,
}

/// The orgs that have their own label value, at most `cap` (0: no per-org series).
#[derive(Debug, Default)]
struct OrgCap {
    cap: usize,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl OrgCap {
    /// The label value of `org`: its id while fewer than `cap` orgs have one, else `_other`.
    fn label(&self, org: &str) -> String {
        let Ok(mut seen) = self.seen.lock() else {
            return "_other".into();
        };
        if seen.contains(org) {
            return org.to_string();
        }
        if seen.len() < self.cap {
            seen.insert(org.to_string());
            return org.to_string();
        }
        "_other".into()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `rate`, `tokens`, `concurrency`, `budget`.
    pub limit: String,
}

/// Seconds from 1 ms to about 9 minutes (doubling).
fn request_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 20).collect()
}

/// The proxy's own time: 10 µs to about 0.3 s, so tens of microseconds resolve.
fn overhead_buckets() -> Vec<f64> {
    exponential_buckets(0.000_01, 2.0, 16).collect()
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every series the proxy exports. Cheap to update: atomics behind a read lock per label set.
pub struct ProxyMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: HistogramFamily<ProviderLabels>,
    pub overhead: Histogram,
    pub ttft: HistogramFamily<ProviderLabels>,
    pub flex_wait: Histogram,
    pub race_outcomes: Family<ReasonLabels, Counter>,
    pub attempts: Family<AttemptLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost: Family<CostLabels, Counter>,
    pub standard_cost: Family<CostLabels, Counter>,
    pub rate_limited: Family<LimitLabels, Counter>,
    /// `flex_org_requests_total{org}`, `flex_org_cost_micros_total{org}`: only with
    /// [`ProxyMetrics::with_org_label_cap`] (off by default: an org label multiplies series).
    pub org_requests: Family<OrgLabels, Counter>,
    pub org_cost: Family<OrgLabels, Counter>,
    orgs: OrgCap,
    /// Set when nothing serves the request series (`disable`).
    disabled: std::sync::atomic::AtomicBool,
}

fn new_request_histogram() -> Histogram {
    Histogram::new(request_buckets())
}

impl ProxyMetrics {
    /// The request series, plus `state`'s read at every scrape.
    pub fn new(state: StateCollector) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(state));
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: HistogramFamily<ProviderLabels> =
            Family::new_with_constructor(new_request_histogram as fn() -> Histogram);
        let overhead = Histogram::new(overhead_buckets());
        let ttft: HistogramFamily<ProviderLabels> =
            Family::new_with_constructor(new_request_histogram as fn() -> Histogram);
        let flex_wait = Histogram::new(request_buckets());
        let race_outcomes = Family::<ReasonLabels, Counter>::default();
        let attempts = Family::<AttemptLabels, Counter>::default();
        let tokens = Family::<TokenLabels, Counter>::default();
        let cost = Family::<CostLabels, Counter>::default();
        let standard_cost = Family::<CostLabels, Counter>::default();
        let rate_limited = Family::<LimitLabels, Counter>::default();
        let org_requests = Family::<OrgLabels, Counter>::default();
        let org_cost = Family::<OrgLabels, Counter>::default();
        registry.register(
            "flex_requests",
            "Requests answered, by caller format, provider, model, served tier and HTTP status",
            requests.clone(),
        );
        registry.register(
            "flex_request_duration_seconds",
            "Whole request time, from arrival to the answer's last byte",
            duration.clone(),
        );
        registry.register(
            "flex_overhead_seconds",
            "The proxy's own time before the provider is asked: authentication, validation, translation, the upstream body",
            overhead.clone(),
        );
        registry.register(
            "flex_time_to_first_token_seconds",
            "From arrival to the provider's first content (the start the race is about)",
            ttft.clone(),
        );
        registry.register(
            "flex_flex_wait_seconds",
            "Time spent on the flex tier in a race before it won or lost",
            flex_wait.clone(),
        );
        registry.register(
            "flex_race_outcomes",
            "Flex races by why the winner won (flex_started, flex_timeout, flex_capacity, flex_error)",
            race_outcomes.clone(),
        );
        registry.register(
            "flex_upstream_attempts",
            "Upstream attempts by provider, tier asked and result (started, or the failure class)",
            attempts.clone(),
        );
        registry.register(
            "flex_tokens",
            "Tokens by provider, model, served tier and kind",
            tokens.clone(),
        );
        registry.register(
            "flex_cost_micros",
            "What the requests cost at the served tier, in micro-dollars",
            cost.clone(),
        );
        registry.register(
            "flex_standard_cost_micros",
            "What the same requests would have cost on the standard tier, in micro-dollars",
            standard_cost.clone(),
        );
        registry.register(
            "flex_rate_limited",
            "Requests refused by a rate limit, concurrency cap or budget",
            rate_limited.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            overhead,
            ttft,
            flex_wait,
            race_outcomes,
            attempts,
            tokens,
            cost,
            standard_cost,
            rate_limited,
            org_requests,
            org_cost,
            orgs: OrgCap::default(),
            disabled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Also counts requests and spend per org (`flex_org_requests_total{org}`,
    /// `flex_org_cost_micros_total{org}`), for at most `cap` orgs (the first seen); the rest
    /// together as `org="_other"`. `cap` 0 keeps them off.
    pub fn with_org_label_cap(mut self, cap: usize) -> Self {
        if cap > 0 {
            self.registry.register(
                "flex_org_requests",
                "Requests answered, by org (opt-in: --metrics-org-label-max; past the cap, org=\"_other\")",
                self.org_requests.clone(),
            );
            self.registry.register(
                "flex_org_cost_micros",
                "Spend at the served tier in micro-dollars, by org (opt-in: --metrics-org-label-max)",
                self.org_cost.clone(),
            );
        }
        self.orgs.cap = cap;
        self
    }

    /// Stops counting requests (`ProxyConfig::metrics` off): the counting calls return at once.
    pub fn disable(&self) {
        self.disabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn off(&self) -> bool {
        self.disabled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Observes the proxy's own time of a request (`flex_overhead_seconds`).
    pub fn overhead(&self, d: std::time::Duration) {
        if !self.off() {
            self.overhead.observe(d.as_secs_f64());
        }
    }

    /// Counts a request that ended before it had a usage event.
    pub fn refused(&self, format: &str, status: u16) {
        if self.off() {
            return;
        }
        self.requests
            .get_or_create(&RequestLabels {
                format: format.to_string(),
                provider: String::new(),
                model: String::new(),
                tier: String::new(),
                status: status.to_string(),
            })
            .inc();
    }

    /// Counts an upstream attempt.
    pub fn attempt(&self, provider: &str, tier: &str, class: &str) {
        if self.off() {
            return;
        }
        self.attempts
            .get_or_create(&AttemptLabels {
                provider: provider.to_string(),
                tier: tier.to_string(),
                class: class.to_string(),
            })
            .inc();
    }

    /// Counts a finished request from its usage event.
    pub fn observe(&self, e: &UsageEvent) {
        let provider = ProviderLabels {
            provider: e.provider.clone(),
        };
        if self.orgs.cap > 0 {
            let org = OrgLabels {
                org: self.orgs.label(&e.org_id),
            };
            self.org_requests.get_or_create(&org).inc();
            if e.cost_micros > 0 {
                self.org_cost
                    .get_or_create(&org)
                    .inc_by(e.cost_micros.unsigned_abs());
            }
        }
        self.requests
            .get_or_create(&RequestLabels {
                format: e.caller_format.clone(),
                provider: e.provider.clone(),
                model: e.model.clone(),
                tier: e.served_tier.clone(),
                status: e.status.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&provider)
            .observe(e.duration_ms as f64 / 1000.0);
        if e.start_latency_ms > 0 {
            self.ttft
                .get_or_create(&provider)
                .observe(e.start_latency_ms as f64 / 1000.0);
        }
        let raced = e.tiers_started.first().is_some_and(|t| t == "flex")
            && e.reason != "direct"
            && !e.reason.is_empty();
        if raced {
            self.flex_wait.observe(e.flex_wait_ms as f64 / 1000.0);
            self.race_outcomes
                .get_or_create(&ReasonLabels {
                    reason: e.reason.clone(),
                })
                .inc();
        }
        if e.served_tier.is_empty() {
            return;
        }
        for (kind, n) in [
            ("input", e.input_tokens),
            ("cached_input", e.cached_input_tokens),
            ("output", e.output_tokens),
            ("reasoning", e.reasoning_tokens),
        ] {
            if n > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        provider: e.provider.clone(),
                        model: e.model.clone(),
                        tier: e.served_tier.clone(),
                        kind: kind.to_string(),
                    })
                    .inc_by(n);
            }
        }
        let labels = CostLabels {
            provider: e.provider.clone(),
            model: e.model.clone(),
            tier: e.served_tier.clone(),
        };
        if e.cost_micros > 0 {
            self.cost
                .get_or_create(&labels)
                .inc_by(e.cost_micros.unsigned_abs());
        }
        if e.standard_cost_micros > 0 {
            self.standard_cost
                .get_or_create(&labels)
                .inc_by(e.standard_cost_micros.unsigned_abs());
        }
    }

    /// The OpenMetrics text exposition, with `extra`'s families before its end.
    pub fn encode(&self, extra: Option<&(dyn Fn(&mut String) + Send + Sync)>) -> String {
        let mut body = String::new();
        if let Err(e) =
            prometheus_client::encoding::text::encode_registry(&mut body, &self.registry)
        {
            tracing::warn!(error = %e, "metrics: encoding failed");
        }
        if let Some(extra) = extra {
            extra(&mut body);
        }
        let _ = prometheus_client::encoding::text::encode_eof(&mut body);
        body
    }
}

/// The series read at scrape time: the snapshot's state, the race's near-ties and the usage
/// sink's counters.
#[derive(Clone)]
pub struct StateCollector {
    pub snapshots: Arc<SnapshotStore>,
    pub usage: Arc<dyn UsageSink>,
    pub loser_started: Arc<std::sync::atomic::AtomicU64>,
    /// The limiter's own series (admitted, refused by limit, fail-open/closed, counters up).
    pub limits: Option<crate::limits::Limits>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.snapshots;
        let st = s.status();
        gauge(
            &mut enc,
            "flex_snapshot_version",
            "The snapshot version served",
            s.version() as f64,
        )?;
        gauge(
            &mut enc,
            "flex_snapshot_age_seconds",
            "Seconds since the control plane produced the snapshot served (-1: none)",
            s.age_seconds().map_or(-1.0, |a| a as f64),
        )?;
        gauge(
            &mut enc,
            "flex_control_plane_connected",
            "1 while a snapshot feed is connected",
            f64::from(u8::from(st.connected)),
        )?;
        gauge(
            &mut enc,
            "flex_snapshot_persisted_version",
            "The snapshot version last written to --state-dir (0: none)",
            s.persisted_version() as f64,
        )?;
        gauge(
            &mut enc,
            "flex_draining",
            "1 once a planned stop began",
            f64::from(u8::from(s.draining())),
        )?;
        counter(
            &mut enc,
            "flex_snapshot_rejected_updates",
            "Snapshot updates refused (kept the last good one)",
            st.rejected_updates,
        )?;
        counter(
            &mut enc,
            "flex_snapshot_full_applied",
            "Full snapshots applied",
            st.full_applied,
        )?;
        counter(
            &mut enc,
            "flex_snapshot_deltas_applied",
            "Snapshot deltas applied",
            st.deltas_applied,
        )?;
        counter(
            &mut enc,
            "flex_race_loser_started",
            "Races whose losing tier had started too (a near-tie the provider may bill a few tokens for)",
            self.loser_started.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        // The usage sink's own series (log, journal, delivery) and the limiter's.
        let mut series = Vec::new();
        self.usage.metrics(&mut series);
        if let Some(l) = &self.limits {
            l.metrics(&mut series);
        }
        for s in &series {
            encode_series(&mut enc, s)?;
        }
        Ok(())
    }
}

/// `series` as OpenMetrics `flex_` families without the end marker: what an exposition's
/// `extra` appends (e.g. the listener's counters, `server::ListenerStats`).
pub fn encode_series_text(out: &mut String, series: Vec<Series>) {
    #[derive(Debug)]
    struct Families(Vec<Series>);
    impl Collector for Families {
        fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            self.0.iter().try_for_each(|s| encode_series(&mut enc, s))
        }
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(series)));
    if let Err(e) = prometheus_client::encoding::text::encode_registry(out, &registry) {
        tracing::warn!(error = %e, "metrics: encoding failed");
    }
}

/// One [`Series`] as a `flex_` family: a counter's samples end in `_total`.
fn encode_series(enc: &mut DescriptorEncoder<'_>, s: &Series) -> std::fmt::Result {
    let name = format!("flex_{}", s.name);
    let kind = if s.counter {
        prometheus_client::metrics::MetricType::Counter
    } else {
        prometheus_client::metrics::MetricType::Gauge
    };
    let mut m = enc.encode_descriptor(&name, s.help, None, kind)?;
    for (label, v) in &s.samples {
        let Some((k, lv)) = label else {
            return if s.counter {
                ConstCounter::new(v.max(0.0) as u64).encode(m)
            } else {
                ConstGauge::new(*v).encode(m)
            };
        };
        let labels = [(*k, lv.as_str())];
        let sample = m.encode_family(&labels)?;
        if s.counter {
            ConstCounter::new(v.max(0.0) as u64).encode(sample)?;
        } else {
            ConstGauge::new(*v).encode(sample)?;
        }
    }
    Ok(())
}

/// A usage sink that counts every event into the metrics, then passes it on.
pub struct Metered {
    pub inner: Arc<dyn UsageSink>,
    pub metrics: Arc<ProxyMetrics>,
}

impl UsageSink for Metered {
    fn emit(&self, event: UsageEvent) {
        self.metrics.observe(&event);
        self.inner.emit(event);
    }

    fn emit_durable(&self, event: UsageEvent) -> Durable {
        self.metrics.observe(&event);
        self.inner.emit_durable(event)
    }

    fn opened(&self, event: UsageEvent) {
        self.inner.opened(event);
    }

    fn metrics(&self, out: &mut Vec<crate::series::Series>) {
        self.inner.metrics(out);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn metrics() -> ProxyMetrics {
        let (sink, _rx) = crate::usage::ChannelSink::new();
        ProxyMetrics::new(StateCollector {
            snapshots: Arc::new(SnapshotStore::new(None, None)),
            usage: sink,
            loser_started: Arc::default(),
            limits: None,
        })
    }

    /// Counted when enabled; nothing counted once disabled (no listener serves the series),
    /// while the scrape-time series stay.
    #[test]
    fn a_disabled_registry_counts_nothing() {
        for enabled in [true, false] {
            let m = metrics();
            if !enabled {
                m.disable();
            }
            m.refused("responses", 401);
            m.attempt("openai", "flex", "started");
            m.overhead(std::time::Duration::from_micros(30));
            let text = m.encode(None);
            let counted = [
                r#"flex_requests_total{format="responses",provider="",model="",tier="",status="401"} 1"#,
                r#"flex_upstream_attempts_total{provider="openai",tier="flex",class="started"} 1"#,
                "flex_overhead_seconds_count 1",
            ];
            for line in counted {
                assert_eq!(text.contains(line), enabled, "{line} in:\n{text}");
            }
            assert!(text.contains("flex_snapshot_version"), "{text}");
            assert!(!text.contains("org"), "no org series unless asked for");
        }
    }

    /// The opt-in per-org series: the first `cap` orgs by id, the rest as `_other`.
    #[test]
    fn per_org_series_are_capped() {
        let m = metrics().with_org_label_cap(2);
        for (org, n) in [
            ("org_a", 3),
            ("org_b", 1),
            ("org_c", 2),
            ("org_d", 1),
            ("org_a", 1),
        ] {
            for _ in 0..n {
                m.observe(&UsageEvent {
                    org_id: org.into(),
                    cost_micros: 10,
                    ..UsageEvent::default()
                });
            }
        }
        let text = m.encode(None);
        for line in [
            r#"flex_org_requests_total{org="org_a"} 4"#,
            r#"flex_org_requests_total{org="org_b"} 1"#,
            r#"flex_org_requests_total{org="_other"} 3"#,
            r#"flex_org_cost_micros_total{org="org_a"} 40"#,
            r#"flex_org_cost_micros_total{org="_other"} 30"#,
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
        assert!(
            !text.contains(r#"org="org_c""#) && !text.contains(r#"org="org_d""#),
            "{text}"
        );
    }
}
