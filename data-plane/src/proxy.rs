//! The request path: authenticate → validate → plan the tier → call the provider (racing flex
//! against the deadline when asked) → answer in the caller's format → report usage.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::response::Response;
use bytes::Bytes;
use flex_shared::catalog::{Model, Provider, Tier};
use flex_shared::usage::{UsageEvent, SCHEMA_VERSION};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::Instrument;

use crate::auth::{authenticate, Caller};
use crate::error::ApiError;
use crate::formats::{self, chat, CallerFormat, RawBody};
use crate::passthrough::{Native, NativeCall};
use crate::providers::{AskTier, BaseUrls};
use crate::race::{self, AttemptError, Backoff, StartLatency, Started};
use crate::snapshot::{ProviderSecret, SnapshotStore};
use crate::start_within::{self, StartWithin};
use crate::translate::{self, TranslatedCall};
use crate::upstream::UpstreamClient;
use crate::usage::{hold_end, Durable, UsageSink};

/// Limits and knobs of the request path.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub base_urls: BaseUrls,
    /// Largest request body accepted (default 32 MiB: room for base64 images and PDFs).
    pub max_body_bytes: usize,
    /// Largest non-streaming upstream body we read (default 64 MiB).
    pub max_response_bytes: usize,
    /// Floor of the learned standard start latency when the catalog gives none.
    pub standard_start_floor: Duration,
    pub backoff: Backoff,
    pub strategy: RaceStrategy,
    /// Makes each request span a child of the caller's trace (`traceparent`). Set by the binary
    /// only when it exports traces; `None` (the default) costs nothing.
    pub caller_trace: Option<CallerTrace>,
    /// Rate limits, concurrency caps and budgets (in process by default; Redis for a fleet).
    pub limits: crate::limits::Limits,
}

/// Links a request's span to the trace its caller is part of, from the request headers, before
/// the span is first entered. The binary provides it (W3C trace context over OpenTelemetry),
/// so this crate does not depend on an OpenTelemetry version. It must never fail a request: a
/// header it cannot use is ignored. The caller's trace headers are never sent on to a provider
/// (only the headers each provider module names are).
#[derive(Clone)]
pub struct CallerTrace(Arc<LinkFn>);

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
            limits: crate::limits::Limits::default(),
        }
    }
}

pub struct Proxy {
    pub snapshots: Arc<SnapshotStore>,
    pub upstream: UpstreamClient,
    pub cfg: ProxyConfig,
    pub latency: StartLatency,
    pub usage: Arc<dyn UsageSink>,
    /// Races whose losing tier had started too (a near-tie; see [`race::Outcome::loser_started`]).
    pub races_loser_started: std::sync::atomic::AtomicU64,
}

/// How the tier is chosen for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Direct(AskTier),
    Race(Duration),
}

/// Maps `start_within` to a plan for a provider and model (DESIGN.md's tier table).
pub fn plan(
    sw: StartWithin,
    provider: Provider,
    model: &str,
    entry: Option<&Model>,
) -> Result<Plan, ApiError> {
    match (sw, provider) {
        (StartWithin::Default, _) => Ok(Plan::Direct(AskTier::Standard)),
        (StartWithin::Priority, Provider::Anthropic) => Ok(Plan::Direct(AskTier::Auto)),
        (StartWithin::Priority, _) => Ok(Plan::Direct(AskTier::Priority)),
        (StartWithin::Auto, Provider::Gemini) => Err(ApiError::bad_request(
            "auto_unsupported_for_gemini",
            format!("`start_within: \"auto\"` was sent for the Gemini model `{model}`, but Gemini has no auto tier."),
        )
        .param("start_within")
        .fix("use \"default\" for Gemini's standard tier, \"priority\", or a duration to race flex.")
        .example(format!(r#"{{"model": "{model}", "start_within": "default"}}"#))),
        (StartWithin::Auto, _) => Ok(Plan::Direct(AskTier::Auto)),
        (StartWithin::Within(_), Provider::Anthropic) => Err(ApiError::bad_request(
            "flex_unsupported_for_anthropic",
            format!("A duration `start_within` was sent for the Claude model `{model}`, but Anthropic has no flex tier to race."),
        )
        .param("start_within")
        .fix("drop the duration and use \"default\", \"priority\" or \"auto\".")
        .example(format!(r#"{{"model": "{model}", "start_within": "default"}}"#))),
        (StartWithin::Within(d), _) => {
            if entry.is_some_and(|m| m.flex_capable) {
                Ok(Plan::Race(d))
            } else {
                Err(ApiError::bad_request(
                    "model_not_flex_capable",
                    format!("A duration `start_within` was sent for `{model}`, which has no flex tier (or is not a flex-capable alias; dated snapshot names are not aliases)."),
                )
                .param("model")
                .fix("pick a flex-capable model (GET /v1/models shows flex_capable), or use \"default\", \"priority\" or \"auto\".")
                .example(r#"{"model": "gpt-5.5", "start_within": "00h-00m-30s"}"#))
            }
        }
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn rfc3339_now() -> String {
    let secs = now_unix();
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What we know about a request, filled in as it goes; becomes its usage event.
#[derive(Clone)]
pub(crate) struct Draft {
    pub(crate) event: UsageEvent,
    pub(crate) t0: Instant,
    pub(crate) model: Option<Model>,
    /// The request's admission under its limits, settled when the event is completed.
    pub(crate) limit: Option<crate::limits::Permit>,
}

impl Draft {
    /// Completes the event and hands it to `sink`; the returned [`Durable`] resolves once it is
    /// durable (hold the end of the answer on it).
    pub(crate) fn emit(self, sink: &dyn UsageSink, status: u16, outcome: &str) -> Durable {
        sink.emit_durable(self.complete(status, outcome))
    }

    /// Completes the event and hands it to `sink` without waiting (no answer to hold).
    pub(crate) fn emit_detached(self, sink: &dyn UsageSink, status: u16, outcome: &str) {
        sink.emit(self.complete(status, outcome));
    }

    fn complete(mut self, status: u16, outcome: &str) -> UsageEvent {
        self.event.status = status;
        self.event.outcome = outcome.to_string();
        self.event.duration_ms = ms(self.t0.elapsed());
        if let Some(m) = &self.model {
            let e = &mut self.event;
            let uncached = e.input_tokens.saturating_sub(e.cached_input_tokens);
            if let Some(tier) = Tier::parse(&e.served_tier) {
                e.cost_micros =
                    m.price(tier)
                        .cost_micros(uncached, e.cached_input_tokens, e.output_tokens);
                e.standard_cost_micros = m.price(Tier::Standard).cost_micros(
                    uncached,
                    e.cached_input_tokens,
                    e.output_tokens,
                );
            }
        }
        if let Some(permit) = self.limit.take() {
            permit.settle(&self.event);
        }
        self.event
    }
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Proxy {
    pub fn new(
        snapshots: Arc<SnapshotStore>,
        upstream: UpstreamClient,
        cfg: ProxyConfig,
        usage: Arc<dyn UsageSink>,
    ) -> Self {
        Self {
            snapshots,
            upstream,
            cfg,
            latency: StartLatency::default(),
            usage,
            races_loser_started: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Gets an upstream stream started for `plan`: the flex race for a duration, the one tier
    /// otherwise. Records the outcome (reason, tiers started, flex wait, start latency) in `e`,
    /// and feeds standard start latencies to the learned hedge.
    pub(crate) async fn start_upstream<F, Fut>(
        &self,
        plan: Plan,
        t0: Instant,
        model: &str,
        floor: Duration,
        e: &mut UsageEvent,
        attempt: F,
    ) -> Result<Started, ApiError>
    where
        F: Fn(AskTier) -> Fut,
        Fut: std::future::Future<Output = Result<Started, AttemptError>>,
    {
        match plan {
            Plan::Race(budget) => {
                let deadline = t0 + budget;
                let expected = self.latency.expected(model, floor);
                let hedge_at = match self.cfg.strategy {
                    RaceStrategy::Hedged => deadline
                        .checked_sub(expected)
                        .unwrap_or(t0)
                        .max(Instant::now()),
                    RaceStrategy::Naive => deadline,
                };
                let outcome = race::run(
                    deadline,
                    hedge_at,
                    self.cfg.backoff,
                    || attempt(AskTier::Flex),
                    || attempt(AskTier::Standard),
                )
                .await;
                let launched = |standard: bool| -> Vec<String> {
                    if standard {
                        vec!["flex".into(), "standard".into()]
                    } else {
                        vec!["flex".into()]
                    }
                };
                match outcome {
                    Ok(o) => {
                        e.tiers_started = launched(o.standard_launched);
                        e.reason = o.reason.as_str().to_string();
                        e.flex_wait_ms = ms(o.flex_wait);
                        e.start_latency_ms = ms(t0.elapsed());
                        if o.winner.tier == AskTier::Standard {
                            self.latency.record(model, o.winner.start_latency);
                        }
                        record_outcome(o.winner.tier, e);
                        self.opened(e, o.winner.tier);
                        tracing::info!(
                            winner = o.winner.tier.as_str(),
                            reason = e.reason,
                            flex_wait_ms = e.flex_wait_ms,
                            start_latency_ms = e.start_latency_ms,
                            loser_started = o.loser_started,
                            "flex race decided"
                        );
                        if o.loser_started {
                            self.races_loser_started
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!(
                                winner = o.winner.tier.as_str(),
                                "both tiers had started (a near-tie): the loser was dropped at once and the caller is billed once, but the provider may bill the loser for what it generated before the cancellation reached it"
                            );
                        }
                        Ok(o.winner)
                    }
                    Err(f) => {
                        e.tiers_started = launched(f.standard_launched);
                        e.reason = "flex_error".into();
                        e.flex_wait_ms = ms(f.flex_wait);
                        Err(f.error)
                    }
                }
            }
            Plan::Direct(tier) => {
                e.reason = "direct".into();
                e.tiers_started = vec![tier.assumed_served().as_str().to_string()];
                let started = attempt(tier).await.map_err(AttemptError::into_api)?;
                e.start_latency_ms = ms(t0.elapsed());
                if tier == AskTier::Standard {
                    self.latency.record(model, started.start_latency);
                }
                record_outcome(tier, e);
                self.opened(e, tier);
                Ok(started)
            }
        }
    }

    /// Tells the usage sink that `e`'s upstream started on `tier` (see [`UsageSink::opened`]).
    pub(crate) fn opened(&self, e: &UsageEvent, tier: AskTier) {
        let mut open = e.clone();
        open.served_tier = tier.assumed_served().as_str().to_string();
        self.usage.opened(open);
    }

    /// Serves one API request in `format`.
    pub async fn handle(
        self: Arc<Self>,
        format: CallerFormat,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let t0 = Instant::now();
        let request_id = format!("req_{}", uuid::Uuid::now_v7().simple());
        // Reports the request as `cancelled` if the caller goes away (this future is dropped)
        // while the draft is still here: during the race, or before a tier answered.
        let mut slot = CancelledIfDropped {
            draft: None,
            sink: self.usage.clone(),
        };
        // One span per request; the race fields are recorded on it as they become known. With
        // `--otlp-endpoint` it is exported as an OTLP server span (`otel.*` fields), so its
        // fields are ids, names and numbers only: never a key, a secret or prompt content.
        let span = tracing::info_span!(
            "request",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            request_id = %request_id,
            format = format.as_str(),
            org_id = tracing::field::Empty,
            key_id = tracing::field::Empty,
            model = tracing::field::Empty,
            provider = tracing::field::Empty,
            start_within = tracing::field::Empty,
            served_tier = tracing::field::Empty,
            reason = tracing::field::Empty,
            flex_wait_ms = tracing::field::Empty,
            start_latency_ms = tracing::field::Empty,
            status = tracing::field::Empty,
            error_code = tracing::field::Empty,
        );
        if let Some(link) = &self.cfg.caller_trace {
            // Before the span is first entered: the parent of a started span is fixed.
            (link.0)(&headers, &span);
        }
        let mut rate = None;
        let result = self
            .serve(
                format,
                &headers,
                body,
                &request_id,
                t0,
                &mut slot.draft,
                &mut rate,
            )
            .instrument(span.clone())
            .await;
        let draft = slot.draft.take();
        let mut resp = match result {
            // The answer reports its own event (a successful call took the draft).
            Ok(r) => r,
            Err(e) => {
                let status = e.status.as_u16();
                span.record("error_code", e.code);
                if let Some(reason) = draft.as_ref().map(|d| d.event.reason.as_str()) {
                    if !reason.is_empty() {
                        // e.g. `flex_error`: the race failed before a tier started.
                        span.record("reason", reason);
                    }
                }
                let durable = match draft {
                    Some(d) => d.emit(self.usage.as_ref(), status, "error"),
                    None => Durable::ready(),
                };
                tracing::info!(request_id, code = e.code, status, "request refused");
                hold_end(e.into_response_for(format), durable)
            }
        };
        span.record("status", resp.status().as_u16());
        if resp.status().is_server_error() {
            span.record("otel.status_code", "error");
        }
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        if let Some(rate) = rate {
            rate.apply(format, resp.headers_mut());
        }
        resp
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &self,
        format: CallerFormat,
        headers: &HeaderMap,
        body: Bytes,
        request_id: &str,
        t0: Instant,
        draft: &mut Option<Draft>,
        rate: &mut Option<crate::limits::RateHeaders>,
    ) -> Result<Response, ApiError> {
        let Caller { snapshot, key } =
            authenticate(self.snapshots.load(), format, headers, now_unix())?;
        let mut body = RawBody::parse(&body, format)?;
        let sw_value = body.value("start_within");
        let sw = start_within::parse_value(sw_value.as_ref())?;
        body.remove("start_within");
        let model = formats::model(&body, format)?;
        let entry = snapshot.catalog.get(&model).cloned();
        *draft = Some(Draft {
            event: UsageEvent {
                schema_version: SCHEMA_VERSION,
                request_id: request_id.to_string(),
                org_id: key.org_id.clone(),
                key_id: key.key_id.clone(),
                model: model.clone(),
                caller_format: format.as_str().to_string(),
                start_within: sw_value
                    .as_ref()
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                received_at: rfc3339_now(),
                ..UsageEvent::default()
            },
            t0,
            model: entry.clone(),
            limit: None,
        });
        formats::reject_service_tier(&body)?;
        if format == CallerFormat::ChatCompletions {
            chat::validate(&body)?;
        }
        let provider = entry.as_ref().map(|m| m.provider).or_else(|| Provider::for_model_prefix(&model)).ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "model_not_found", format!("The model `{model}` is not known, and its name does not belong to OpenAI (gpt-*, o*), Gemini (gemini-*) or Anthropic (claude-*)."))
                .param("model")
                .fix("use a model id from GET /v1/models.")
                .example(r#"{"model": "gpt-5.5", ...}"#)
        })?;
        if let Some(d) = draft.as_mut() {
            d.event.provider = provider.as_str().to_string();
            let span = tracing::Span::current();
            span.record("org_id", d.event.org_id.as_str());
            span.record("key_id", d.event.key_id.as_str());
            span.record("model", d.event.model.as_str());
            span.record("provider", provider.as_str());
            span.record("start_within", d.event.start_within.as_str());
        }
        let plan = plan(sw, provider, &model, entry.as_ref())?;
        if matches!(plan, Plan::Race(_))
            && snapshot.orgs.get(&key.org_id).is_some_and(|o| o.past_due)
        {
            return Err(ApiError::new(StatusCode::PAYMENT_REQUIRED, "payment_required", "Billing for this organization is past due, so billable flex requests are paused.")
                .param("start_within")
                .fix("update payment to resume flex; meanwhile \"default\", \"priority\" and \"auto\" keep working.")
                .example(r#""start_within": "default""#));
        }
        let secret = match snapshot.provider_keys.get(&(key.org_id.clone(), provider)) {
            Some(ProviderSecret::Ready(s)) => s.clone(),
            Some(ProviderSecret::Unusable(why)) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "provider_key_unusable", format!("The {provider} key of this organization cannot be used: {why}."))
                    .fix(format!("ask the operator to check the proxy's master key file, or set the key again with `flex admin provider-key set --org {} --provider {provider}`.", key.org_id)));
            }
            None => {
                return Err(ApiError::bad_request("no_byok_key", format!("The model `{model}` is served by {provider}, but this organization has no {provider} key (FlexInference uses your own provider key: BYOK)."))
                    .fix(format!("add it in the dashboard, or: `flex admin provider-key set --org {} --provider {provider}` (reads the key from stdin).", key.org_id))
                    .example(format!("echo \"$PROVIDER_KEY\" | flex admin provider-key set --org {} --provider {provider}", key.org_id)));
            }
        };
        // Limits: one admission per request (a retry inside the race is the same request); the
        // permit settles with the usage event, the headers go on the answer.
        let ask = crate::limits::Ask {
            snapshot: &snapshot,
            org_id: &key.org_id,
            key_id: &key.key_id,
            model: entry.as_ref(),
            priority: matches!(plan, Plan::Direct(AskTier::Priority | AskTier::Auto)),
            body: &body,
            format,
            request_id,
        };
        if let Some(admitted) = self.cfg.limits.admit(ask).await? {
            *rate = Some(admitted.headers);
            if let Some(d) = draft.as_mut() {
                d.limit = Some(admitted.permit);
            }
        }
        let caller_stream = body.bool_field("stream").unwrap_or(false);
        let floor = entry.as_ref().map_or(self.cfg.standard_start_floor, |m| {
            Duration::from_millis(u64::from(m.standard_start_floor_ms))
        });
        let Some(api) = Native::of(format, provider) else {
            let req = translate::parse_request(format, &body)?;
            translate::require_max_tokens(provider, &req, format)?;
            let call = TranslatedCall {
                proxy: self,
                format,
                provider,
                base: self.cfg.base_urls.for_provider(provider).to_string(),
                secret,
                include_usage: body
                    .value("stream_options")
                    .is_some_and(|v| v["include_usage"] == json!(true)),
                req,
                floor,
            };
            return call.run(plan, t0, draft).await;
        };
        if api == Native::Messages {
            // Validation only (refusals, max_tokens): the body itself goes upstream as sent.
            translate::parse_request(format, &body)?;
        }
        let call = NativeCall {
            proxy: self,
            api,
            base: self.cfg.base_urls.for_provider(provider).to_string(),
            secret,
            caller_wants_usage: api == Native::Chat
                && body
                    .value("stream_options")
                    .is_some_and(|v| v["include_usage"] == json!(true)),
            body,
            model,
            floor,
            headers: headers.clone(),
        };
        // On success the call takes the draft and reports it when the answer ends; on failure it
        // leaves it (with what it learned) for `handle` to report.
        call.run(plan, caller_stream, t0, draft).await
    }
}

/// Records the race outcome on the request's span (the same fields as the usage event).
fn record_outcome(tier: AskTier, e: &UsageEvent) {
    let span = tracing::Span::current();
    span.record("served_tier", tier.assumed_served().as_str());
    span.record("reason", e.reason.as_str());
    span.record("flex_wait_ms", e.flex_wait_ms);
    span.record("start_latency_ms", e.start_latency_ms);
}

pub(crate) fn lost_draft() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "request state lost",
    )
}

pub(crate) fn take(slot: &mut Option<Draft>) -> Result<Draft, ApiError> {
    slot.take().ok_or_else(lost_draft)
}

pub(crate) fn outcome_headers(h: &mut HeaderMap, served: Tier, reason: &str, flex_wait_ms: u64) {
    h.insert(
        "x-flex-served-tier",
        HeaderValue::from_static(served.as_str()),
    );
    if let Ok(v) = HeaderValue::from_str(reason) {
        h.insert("x-flex-reason", v);
    }
    h.insert("x-flex-wait-ms", HeaderValue::from(flex_wait_ms));
}

/// The draft of a request whose answer has not started yet: emitted as `cancelled` (status 499,
/// nginx's "client closed request") when dropped while still holding it, which happens only when
/// the caller went away and hyper dropped the request's future.
struct CancelledIfDropped {
    draft: Option<Draft>,
    sink: Arc<dyn UsageSink>,
}

impl Drop for CancelledIfDropped {
    fn drop(&mut self) {
        if let Some(draft) = self.draft.take() {
            draft.emit_detached(self.sink.as_ref(), 499, "cancelled");
        }
    }
}

/// Emits the usage event when a forwarded stream ends (the caller's stream holds its final bytes
/// on the returned [`Durable`]), or as `cancelled` when the caller left.
pub(crate) struct UsageGuard {
    /// `None` once the event has been emitted.
    pub(crate) draft: Option<Draft>,
    pub(crate) sink: Arc<dyn UsageSink>,
    pub(crate) ask: AskTier,
    /// The response's head went out (a stream): a cancelled request then reports 200, else 499.
    pub(crate) head_sent: bool,
}

impl UsageGuard {
    /// A guard for an answer whose head has not been sent (a body being assembled).
    pub(crate) fn new(draft: Draft, sink: Arc<dyn UsageSink>, ask: AskTier) -> Self {
        Self {
            draft: Some(draft),
            sink,
            ask,
            head_sent: false,
        }
    }

    pub(crate) fn event_mut(&mut self) -> Option<&mut UsageEvent> {
        self.draft.as_mut().map(|d| &mut d.event)
    }

    /// Takes the draft back to report it otherwise (the answer is complete): disarms the guard.
    pub(crate) fn into_draft(mut self) -> Option<Draft> {
        self.draft.take()
    }

    pub(crate) fn finish(mut self, served: Option<Tier>, outcome: &str) -> Durable {
        match self.draft.take() {
            Some(mut draft) => {
                draft.event.served_tier = served
                    .unwrap_or(self.ask.assumed_served())
                    .as_str()
                    .to_string();
                draft.emit(self.sink.as_ref(), 200, outcome)
            }
            None => Durable::ready(),
        }
    }
}

impl Drop for UsageGuard {
    fn drop(&mut self) {
        if let Some(mut draft) = self.draft.take() {
            draft.event.served_tier = self.ask.assumed_served().as_str().to_string();
            // The caller is gone: nothing to hold, but the event still reaches the log.
            let status = if self.head_sent { 200 } else { 499 };
            draft.emit_detached(self.sink.as_ref(), status, "cancelled");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_table() {
        let cat = flex_shared::catalog::Catalog::default();
        let d = Duration::from_secs(30);
        let p = |sw, model: &str| {
            let entry = cat.get(model);
            let provider = entry
                .map(|m| m.provider)
                .or_else(|| Provider::for_model_prefix(model))
                .unwrap_or(Provider::OpenAi);
            plan(sw, provider, model, entry).map_err(|e| e.code)
        };
        assert_eq!(
            p(StartWithin::Default, "gpt-5.5"),
            Ok(Plan::Direct(AskTier::Standard))
        );
        assert_eq!(
            p(StartWithin::Priority, "gpt-5.5"),
            Ok(Plan::Direct(AskTier::Priority))
        );
        assert_eq!(
            p(StartWithin::Auto, "gpt-5.5"),
            Ok(Plan::Direct(AskTier::Auto))
        );
        assert_eq!(p(StartWithin::Within(d), "gpt-5.5"), Ok(Plan::Race(d)));
        assert_eq!(
            p(StartWithin::Within(d), "gpt-4o"),
            Err("model_not_flex_capable")
        );
        assert_eq!(
            p(StartWithin::Within(d), "gpt-5.5-2026-01-01"),
            Err("model_not_flex_capable")
        );
        assert_eq!(
            p(StartWithin::Default, "gpt-4o"),
            Ok(Plan::Direct(AskTier::Standard))
        );
        assert_eq!(
            p(StartWithin::Auto, "gemini-3.5-flash"),
            Err("auto_unsupported_for_gemini")
        );
        assert_eq!(
            p(StartWithin::Within(d), "gemini-3.5-flash"),
            Ok(Plan::Race(d))
        );
        assert_eq!(
            p(StartWithin::Priority, "gemini-3.5-flash"),
            Ok(Plan::Direct(AskTier::Priority))
        );
        assert_eq!(
            p(StartWithin::Within(d), "claude-opus-4-8"),
            Err("flex_unsupported_for_anthropic")
        );
        assert_eq!(
            p(StartWithin::Priority, "claude-opus-4-8"),
            Ok(Plan::Direct(AskTier::Auto))
        );
        assert_eq!(
            p(StartWithin::Default, "claude-opus-4-8"),
            Ok(Plan::Direct(AskTier::Standard))
        );
    }

    #[test]
    fn rfc3339_now_is_well_formed() {
        let s = rfc3339_now();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.ends_with('Z'));
    }
}
