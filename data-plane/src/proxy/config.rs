//! The request path's configuration: [`ProxyConfig`] and the hooks the binary plugs in
//! ([`CallerTrace`], [`ExtraMetrics`]).

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;

use crate::providers::BaseUrls;
use crate::race::Backoff;

/// Limits and knobs of the request path.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub base_urls: BaseUrls,
    /// Largest request body accepted (default 32 MiB: room for base64 images and PDFs).
    pub max_body_bytes: usize,
    /// Largest non-streaming upstream body we read, and largest stream we assemble into one
    /// body for a non-streaming caller (default 64 MiB).
    pub max_response_bytes: usize,
    /// Floor of the learned standard start latency when the catalog gives none.
    pub standard_start_floor: Duration,
    pub backoff: Backoff,
    pub strategy: RaceStrategy,
    /// Makes each request span a child of the caller's trace (`traceparent`). Set by the binary
    /// only when it exports traces; `None` (the default) costs nothing, and also makes the request
    /// span a debug span (see `request_span!`), since nothing exports it.
    pub caller_trace: Option<CallerTrace>,
    /// More series for the same exposition (e.g. `flex up`'s in-process control plane).
    pub extra_metrics: Option<ExtraMetrics>,
    /// Rate limits, concurrency caps and budgets (in process by default; Redis for a fleet).
    pub limits: crate::limits::Limits,
    /// Bounds on a request's messages and tools.
    pub items: crate::request::ItemLimits,
    /// Per-org request and spend series for at most this many orgs (0: none; the rest as
    /// `_other`).
    pub metrics_org_label_max: usize,
    /// Counts the request series (`metrics`). The binaries turn it off when no
    /// `--metrics-listen` serves them; the scrape-time series cost nothing until scraped.
    pub metrics: bool,
    /// The listener's limits (timeouts, connection and stream caps) and its counters.
    pub listener: crate::server::ListenerConfig,
}

/// Appends OpenMetrics families (without the end marker) to the proxy's exposition.
#[derive(Clone)]
pub struct ExtraMetrics(pub Arc<dyn Fn(&mut String) + Send + Sync>);

impl std::fmt::Debug for ExtraMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraMetrics")
    }
}

/// Links a request's span to the trace its caller is part of, from the request headers, before
/// the span is first entered. The binary provides it (W3C trace context over OpenTelemetry),
/// so this crate does not depend on an OpenTelemetry version. It must never fail a request: a
/// header it cannot use is ignored. The caller's trace headers are never sent on to a provider
/// (only the headers each provider module names are).
#[derive(Clone)]
pub struct CallerTrace(pub(super) Arc<LinkFn>);

type LinkFn = dyn Fn(&HeaderMap, &tracing::Span) + Send + Sync;

impl CallerTrace {
    pub fn new(link: impl Fn(&HeaderMap, &tracing::Span) + Send + Sync + 'static) -> Self {
        Self(Arc::new(link))
    }
}

impl std::fmt::Debug for CallerTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallerTrace")
    }
}

/// When standard is launched in a flex race.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RaceStrategy {
    /// At the deadline minus the learned standard start latency, so standard also starts by the
    /// deadline (the product's behaviour).
    #[default]
    Hedged,
    /// Only at the deadline (flex may still win until standard starts): a gateway that waits
    /// out the budget before falling back. Kept for the race-quality benchmark's comparison.
    Naive,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            base_urls: BaseUrls::default(),
            max_body_bytes: 32 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            standard_start_floor: Duration::from_millis(500),
            backoff: Backoff::default(),
            strategy: RaceStrategy::default(),
            caller_trace: None,
            extra_metrics: None,
            limits: crate::limits::Limits::default(),
            items: crate::request::ItemLimits::default(),
            metrics_org_label_max: 0,
            metrics: true,
            listener: crate::server::ListenerConfig::default(),
        }
    }
}
