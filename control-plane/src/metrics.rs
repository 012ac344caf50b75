//! The control plane's Prometheus metrics, served with `--metrics-listen` (`flex control`, and
//! inside `flex up`'s exposition): gRPC calls by method and status, their latency, event-log
//! appends, ledger inserts, the usage consumer's lag on NATS, and the connected proxies by
//! transport and snapshot version.

use std::sync::LazyLock;
use std::time::Instant;

use flex_shared::proto::admin as apb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub method: String,
    /// The gRPC status name, e.g. `OK`, `INVALID_ARGUMENT`.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    pub transport: String,
    pub version: String,
}

type Histograms = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn call_histogram() -> Histogram {
    // 100 µs to about 100 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 20))
}

pub struct ControlMetrics {
    registry: Registry,
    pub calls: Family<CallLabels, Counter>,
    pub call_duration: Histograms,
    pub appends: Counter,
    pub ledger_inserts: Counter,
    /// Usage messages on NATS not yet acknowledged by this process's consumer.
    pub usage_consumer_lag: Gauge,
}

static METRICS: LazyLock<ControlMetrics> = LazyLock::new(ControlMetrics::new);

/// The process's control-plane metrics.
pub fn metrics() -> &'static ControlMetrics {
    &METRICS
}

impl ControlMetrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let calls = Family::<CallLabels, Counter>::default();
        let call_duration: Histograms =
            Family::new_with_constructor(call_histogram as fn() -> Histogram);
        let appends = Counter::default();
        let ledger_inserts = Counter::default();
        let usage_consumer_lag = Gauge::default();
        registry.register(
            "flex_admin_requests",
            "gRPC calls (admin and control services) by method and status",
            calls.clone(),
        );
        registry.register(
            "flex_admin_request_duration_seconds",
            "gRPC call latency by method, until its status (a Watch lasts as long as its stream)",
            call_duration.clone(),
        );
        registry.register(
            "flex_event_log_appends",
            "Events appended to the event log",
            appends.clone(),
        );
        registry.register(
            "flex_ledger_inserts",
            "Usage events inserted into the ledger (duplicates refused by the unique request id are not counted)",
            ledger_inserts.clone(),
        );
        registry.register(
            "flex_usage_consumer_lag",
            "Usage messages in FLEX_USAGE not yet acknowledged by the ledger consumer (0 without NATS)",
            usage_consumer_lag.clone(),
        );
        Self {
            registry,
            calls,
            call_duration,
            appends,
            ledger_inserts,
            usage_consumer_lag,
        }
    }

    /// The series, without the OpenMetrics end marker (so another exposition can follow), with
    /// `proxies` as `flex_connected_proxies{transport,version}`.
    pub fn encode_into(&self, out: &mut String, proxies: &[apb::ProxyStatus]) {
        let mut connected = Registry::default();
        let family = Family::<ProxyLabels, Gauge>::default();
        for p in proxies.iter().filter(|p| p.connected) {
            family
                .get_or_create(&ProxyLabels {
                    transport: p.transport.clone(),
                    version: p.applied_version.to_string(),
                })
                .inc();
        }
        connected.register(
            "flex_connected_proxies",
            "Proxies connected now, by transport and the snapshot version they hold",
            family,
        );
        let enc = prometheus_client::encoding::text::encode_registry;
        if enc(out, &self.registry).is_err() || enc(out, &connected).is_err() {
            tracing::warn!("metrics: encoding failed");
        }
    }

    /// The whole exposition.
    pub fn encode(&self, proxies: &[apb::ProxyStatus]) -> String {
        let mut out = String::new();
        self.encode_into(&mut out, proxies);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

/// A gRPC call being measured.
#[derive(Debug)]
pub(crate) struct CallMeter {
    method: String,
    t0: Instant,
}

impl CallMeter {
    pub(crate) fn new(method: &str) -> Self {
        Self {
            method: method.to_string(),
            t0: Instant::now(),
        }
    }

    /// The call ended with gRPC status `code`.
    pub(crate) fn done(self, code: i32) {
        let m = metrics();
        m.calls
            .get_or_create(&CallLabels {
                method: self.method.clone(),
                code: code_name(code).to_string(),
            })
            .inc();
        m.call_duration
            .get_or_create(&MethodLabels {
                method: self.method,
            })
            .observe(self.t0.elapsed().as_secs_f64());
    }
}

fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "OTHER",
    }
}
