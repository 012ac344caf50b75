//! The request pipeline, one straight line for every request:
//!
//! ```text
//! handle → validate (auth, body, start_within, model, tier plan, billing, provider key)
//!        → Call (the pair: native or translated; one upstream body per tier, built once)
//!        → start (the flex race, or the one tier; the failure policy decides each failure)
//!        → answer (stream or assemble through the pair's Transcode) → usage event
//! ```
//!
//! A native pair (the caller's format is the provider's own) and a translated pair differ only
//! in their `Call::request` (the caller's body with the tier edited, or one rendered from the
//! canonical request) and their `Transcode` (identity plus a usage tap, or decode → encode).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::response::Response;
use bytes::Bytes;
use flex_shared::catalog::{Model, Provider};
use flex_shared::usage::{UsageEvent, SCHEMA_VERSION};
use http::{HeaderMap, HeaderValue, StatusCode};
use secrecy::SecretString;
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::Instrument;

use crate::answer::{self, Mode, Transcode};
use crate::auth::{authenticate, Caller};
use crate::canonical as c;
use crate::error::ApiError;
use crate::formats::{self, chat, CallerFormat, RawBody};
use crate::metrics::{Metered, ProxyMetrics, StateCollector};
use crate::passthrough::{Native, NativeTranscoder};
use crate::providers::AskTier;
use crate::race::{self, AttemptError, EventClass, Schedule, StartLatency, Started};
use crate::request::{ms, rfc3339_now, take, CancelledIfDropped, Draft, Outcome, DIRECT};
use crate::snapshot::{ProviderSecret, SnapshotStore};
use crate::start_within::{self, StartWithin};
use crate::translate::{self, TranslatedTranscoder};
use crate::upstream::{UpstreamClient, MAX_ERROR_BODY};
use crate::usage::{hold_end, Durable, UsageSink};

mod config;
pub use config::{CallerTrace, ExtraMetrics, ProxyConfig, RaceStrategy};

pub struct Proxy {
    pub snapshots: Arc<SnapshotStore>,
    pub upstream: UpstreamClient,
    pub cfg: ProxyConfig,
    pub latency: StartLatency,
    /// The usage sink, wrapped so every event is counted in `metrics` too.
    pub usage: Arc<dyn UsageSink>,
    /// Races whose losing tier had started too (a near-tie; see [`race::Outcome::loser_started`]).
    pub races_loser_started: Arc<std::sync::atomic::AtomicU64>,
    pub metrics: Arc<ProxyMetrics>,
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

/// The pair a request takes: its format, its provider, and how its bodies are made.
pub(crate) struct Call {
    pub(crate) format: CallerFormat,
    pub(crate) provider: Provider,
    pub(crate) model: String,
    pub(crate) base: String,
    pub(crate) secret: SecretString,
    /// Floor of the learned standard start latency for this model.
    pub(crate) floor: Duration,
    /// The caller asked for a stream.
    pub(crate) stream: bool,
    pub(crate) pair: Pair,
}

pub(crate) enum Pair {
    /// The caller's format is the provider's own: its body goes as sent, tier fields edited.
    Native {
        api: Native,
        body: RawBody,
        caller_wants_usage: bool,
        /// The caller's headers (Messages forwards `anthropic-version` / `anthropic-beta`).
        headers: HeaderMap,
    },
    /// Through the canonical model.
    Translated {
        req: Box<c::Request>,
        include_usage: bool,
    },
}

impl Call {
    /// The upstream request for `tier` (`stream`: as a stream, which every race is).
    fn request(&self, tier: AskTier, stream: bool) -> Result<http::Request<Bytes>, ApiError> {
        match &self.pair {
            Pair::Native {
                api, body, headers, ..
            } => {
                let bytes = api.body_for(body, tier, stream)?;
                api.request(&self.base, &self.secret, bytes, stream, headers)
            }
            Pair::Translated { req, .. } => {
                translate::upstream_request(self.provider, &self.base, req, tier, &self.secret)
            }
        }
    }

    fn classify(&self, ev: &crate::sse::Event) -> EventClass {
        match &self.pair {
            Pair::Native { api, .. } => api.classify(ev),
            Pair::Translated { .. } => translate::classify(self.provider, ev),
        }
    }

    fn transcoder(&self, mode: Mode, ask: AskTier) -> Box<dyn Transcode> {
        match &self.pair {
            Pair::Native {
                api,
                caller_wants_usage,
                ..
            } => Box::new(NativeTranscoder::new(*api, mode, *caller_wants_usage)),
            Pair::Translated { include_usage, .. } => Box::new(TranslatedTranscoder::new(
                self.format,
                self.provider,
                mode,
                &self.model,
                *include_usage,
                ask,
            )),
        }
    }
}

/// The upstream requests of one call, one per tier it may use, each built once.
struct Prepared {
    first: (AskTier, http::Request<Bytes>),
    second: Option<(AskTier, http::Request<Bytes>)>,
}

impl Prepared {
    fn new(call: &Call, plan: Plan) -> Result<Self, ApiError> {
        Ok(match plan {
            Plan::Direct(t) => Self {
                first: (t, call.request(t, true)?),
                second: None,
            },
            Plan::Race(_) => Self {
                first: (AskTier::Flex, call.request(AskTier::Flex, true)?),
                second: Some((AskTier::Standard, call.request(AskTier::Standard, true)?)),
            },
        })
    }

    fn get(&self, tier: AskTier) -> Result<&http::Request<Bytes>, AttemptError> {
        std::iter::once(&self.first)
            .chain(self.second.as_ref())
            .find(|(t, _)| *t == tier)
            .map(|(_, r)| r)
            .ok_or_else(|| AttemptError::caller(ApiError::internal("a tier without a request")))
    }
}

/// The per-request span at a given level (`info_span` or `debug_span`): a span's level is fixed
/// where it is written, so each level is its own call site with the same fields.
macro_rules! request_span {
    ($level:ident, $request_id:ident, $format:ident) => {
        tracing::$level!(
            "request",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            request_id = %$request_id,
            format = $format.as_str(),
            org_id = tracing::field::Empty,
            key_id = tracing::field::Empty,
            model = tracing::field::Empty,
            provider = tracing::field::Empty,
            start_within = tracing::field::Empty,
            served_tier = tracing::field::Empty,
            reason = tracing::field::Empty,
            flex_wait_ms = tracing::field::Empty,
            start_latency_ms = tracing::field::Empty,
            provider_request_id = tracing::field::Empty,
            status = tracing::field::Empty,
            error_code = tracing::field::Empty,
            // OpenTelemetry GenAI semantic conventions, so GenAI dashboards work unchanged.
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = tracing::field::Empty,
            gen_ai.request.model = tracing::field::Empty,
            gen_ai.response.model = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
        )
    };
}

impl Proxy {
    pub fn new(
        snapshots: Arc<SnapshotStore>,
        upstream: UpstreamClient,
        cfg: ProxyConfig,
        usage: Arc<dyn UsageSink>,
    ) -> Self {
        let loser_started = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let metrics = Arc::new(
            ProxyMetrics::new(StateCollector {
                snapshots: snapshots.clone(),
                usage: usage.clone(),
                loser_started: loser_started.clone(),
                limits: Some(cfg.limits.clone()),
            })
            .with_org_label_cap(cfg.metrics_org_label_max),
        );
        let usage: Arc<dyn UsageSink> = if cfg.metrics {
            Arc::new(Metered {
                inner: usage,
                metrics: metrics.clone(),
            })
        } else {
            metrics.disable();
            usage
        };
        Self {
            snapshots,
            upstream,
            cfg,
            latency: StartLatency::default(),
            usage,
            races_loser_started: loser_started,
            metrics,
        }
    }

    /// Gets an upstream stream started for `plan`: the flex race for a duration, the one tier
    /// otherwise. Records the outcome (reason, tiers started, flex wait, start latency) in `e`,
    /// and feeds standard start latencies to the learned hedge. `attempt` is called with the
    /// tier and the bound of its wait for the response head (the time left in a race).
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
        F: Fn(AskTier, Option<Duration>) -> Fut,
        Fut: std::future::Future<Output = Result<Started, AttemptError>>,
    {
        let budget = match plan {
            Plan::Direct(tier) => {
                e.reason = DIRECT.into();
                e.tiers_started = vec![tier.assumed_served().as_str().to_string()];
                let started = attempt(tier, None).await.map_err(|f| {
                    tracing::info!(
                        request_id = %e.request_id,
                        class = f.class.as_str(),
                        tier = tier.as_str(),
                        "upstream attempt failed"
                    );
                    f.error
                })?;
                e.start_latency_ms = ms(t0.elapsed());
                if tier == AskTier::Standard {
                    self.latency.record(model, started.start_latency);
                }
                record_outcome(tier, e);
                self.opened(e, tier);
                return Ok(started);
            }
            Plan::Race(budget) => budget,
        };
        let deadline = t0 + budget;
        let expected = self.latency.expected(model, floor);
        let hedge_at = match self.cfg.strategy {
            RaceStrategy::Hedged => deadline
                .checked_sub(expected)
                .unwrap_or(t0)
                .max(Instant::now()),
            RaceStrategy::Naive => deadline,
        };
        let schedule = Schedule {
            deadline,
            hedge_at,
            backoff: self.cfg.backoff,
        };
        let outcome = race::run(
            schedule,
            |left| attempt(AskTier::Flex, Some(left)),
            || attempt(AskTier::Standard, None),
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
                    request_id = %e.request_id,
                    winner = o.winner.tier.as_str(),
                    reason = e.reason,
                    flex_wait_ms = e.flex_wait_ms,
                    start_latency_ms = e.start_latency_ms,
                    flex_attempts = o.flex_attempts,
                    standard_attempts = o.standard_attempts,
                    loser_started = o.loser_started,
                    "flex race decided"
                );
                if o.loser_started {
                    self.races_loser_started
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(
                        request_id = %e.request_id,
                        winner = o.winner.tier.as_str(),
                        "both tiers had started (a near-tie): the loser was dropped at once and the caller is billed once, but the provider may bill the loser for what it generated before the cancellation reached it"
                    );
                }
                Ok(o.winner)
            }
            Err(f) => {
                e.tiers_started = launched(f.standard_launched);
                e.reason = race::Reason::FlexError.as_str().into();
                e.flex_wait_ms = ms(f.flex_wait);
                tracing::info!(
                    request_id = %e.request_id,
                    class = f.class.as_str(),
                    status = f.error.status.as_u16(),
                    standard_launched = f.standard_launched,
                    "flex race failed: no tier could start"
                );
                Err(f.error)
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
        // Without export it is a debug span: under the default log level it is disabled, so no
        // layer stores or formats its twenty fields on every request (`FLEX_LOG=debug` shows it).
        let span = if self.cfg.caller_trace.is_some() {
            request_span!(info_span, request_id, format)
        } else {
            request_span!(debug_span, request_id, format)
        };
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
                    Some(d) => d.emit(self.usage.as_ref(), status, Outcome::Error),
                    None => {
                        self.metrics.refused(format.as_str(), status);
                        Durable::ready()
                    }
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

    /// Validates the request and plans it; then runs its call.
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
        let Caller { snapshot, key } = authenticate(&self.snapshots, format, headers, now_unix())?;
        let mut body = RawBody::parse(&body, format)?;
        let sw_value = body.value("start_within");
        let sw = start_within::parse_value(sw_value.as_ref())?;
        body.remove("start_within");
        let model = formats::model(&body, format)?;
        // Everything that reaches the usage draft (and from it the event, the span and the log
        // lines) is checked before the draft exists.
        crate::request::check_model_id(&model)?;
        crate::request::check_items(&body, format, self.cfg.items)?;
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
            span: tracing::Span::current(),
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
            span.record("gen_ai.provider.name", genai_provider(provider));
            span.record("gen_ai.request.model", d.event.model.as_str());
            // The model answering is the one asked (an alias is not resolved by us).
            span.record("gen_ai.response.model", d.event.model.as_str());
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
        let stream = body.bool_field("stream").unwrap_or(false);
        let include_usage = body
            .value("stream_options")
            .is_some_and(|v| v["include_usage"] == json!(true));
        let floor = entry.as_ref().map_or(self.cfg.standard_start_floor, |m| {
            Duration::from_millis(u64::from(m.standard_start_floor_ms))
        });
        // The worst case a limit reserves: only worth a scan of the body when some org has limits.
        let worst = if snapshot.limits.is_empty() {
            (0, 0)
        } else {
            crate::limits::estimate::worst_case_tokens(&body, format)
        };
        let pair = match Native::of(format, provider) {
            Some(api) => {
                if api == Native::Messages {
                    // Validation only (refusals, max_tokens): the body itself goes as sent.
                    translate::parse_request(format, &body)?;
                }
                Pair::Native {
                    api,
                    body,
                    caller_wants_usage: api == Native::Chat && include_usage,
                    headers: headers.clone(),
                }
            }
            None => {
                let req = translate::parse_request(format, &body)?;
                translate::require_max_tokens(provider, &req, format)?;
                Pair::Translated {
                    req: Box::new(req),
                    include_usage,
                }
            }
        };
        let call = Call {
            format,
            provider,
            model,
            base: self.cfg.base_urls.for_provider(provider).to_string(),
            secret,
            floor,
            stream,
            pair,
        };
        // Limits: one admission per request (a retry inside the race is the same request); the
        // permit settles with the usage event, the headers go on the answer.
        let ask = crate::limits::Ask {
            snapshot: &snapshot,
            org_id: &key.org_id,
            key_id: &key.key_id,
            model: entry.as_ref(),
            priority: matches!(plan, Plan::Direct(AskTier::Priority | AskTier::Auto)),
            worst,
            format,
            request_id,
        };
        if let Some(admitted) = self.cfg.limits.admit(ask).await? {
            *rate = Some(admitted.headers);
            if let Some(d) = draft.as_mut() {
                d.limit = Some(admitted.permit);
            }
        }
        // On success the answer takes the draft and reports it when it ends; on failure the
        // draft stays (with what was learned) for `handle` to report.
        self.run(&call, plan, t0, draft).await
    }

    /// Starts the call's upstream for `plan` and answers from it.
    pub(crate) async fn run(
        &self,
        call: &Call,
        plan: Plan,
        t0: Instant,
        slot: &mut Option<Draft>,
    ) -> Result<Response, ApiError> {
        if let (Plan::Direct(tier), false, Pair::Native { api, .. }) =
            (plan, call.stream, &call.pair)
        {
            return self.direct_body(call, *api, tier, slot).await;
        }
        let prepared = Prepared::new(call, plan)?;
        self.metrics.overhead(t0.elapsed());
        let e = &mut slot.as_mut().ok_or_else(crate::request::lost_draft)?.event;
        let started = self
            .start_upstream(plan, t0, &call.model, call.floor, e, |tier, left| {
                let req = prepared.get(tier);
                async move {
                    let r = race::attempt(&self.upstream, call.provider, req?, tier, left, |ev| {
                        call.classify(ev)
                    })
                    .await;
                    let class = r.as_ref().map_or_else(|e| e.class.as_str(), |_| "started");
                    self.metrics
                        .attempt(call.provider.as_str(), tier.as_str(), class);
                    r
                }
            })
            .await?;
        let draft = take(slot)?;
        if call.stream {
            let t = call.transcoder(Mode::Stream, started.tier);
            Ok(answer::stream(started, draft, t, self.usage.clone()))
        } else {
            let t = call.transcoder(Mode::Assemble, started.tier);
            let limit = self.cfg.max_response_bytes;
            Ok(answer::assemble(started, draft, t, self.usage.clone(), call.format, limit).await)
        }
    }

    /// A native pair, non-streaming, no race: the provider's own body, untouched.
    async fn direct_body(
        &self,
        call: &Call,
        api: Native,
        tier: AskTier,
        slot: &mut Option<Draft>,
    ) -> Result<Response, ApiError> {
        let req = call.request(tier, false)?;
        let d = slot.as_mut().ok_or_else(crate::request::lost_draft)?;
        d.event.reason = DIRECT.into();
        d.event.tiers_started = vec![tier.assumed_served().as_str().to_string()];
        record_outcome(tier, &d.event);
        // A non-streaming answer shows no sign of its start before its head, which comes with
        // the whole body: the request counts as in flight at the provider from here.
        self.opened(&d.event, tier);
        self.metrics.overhead(d.t0.elapsed());
        let (provider, ask) = (call.provider.as_str(), tier.as_str());
        let resp = match self.upstream.send(&req, None).await {
            Ok(r) => r,
            Err(e) => {
                let e = AttemptError::transport(&e);
                self.metrics.attempt(provider, ask, e.class.as_str());
                return Err(e.error);
            }
        };
        if !resp.status.is_success() {
            let (status, headers) = (resp.status, resp.headers);
            let body = resp.body.read_lossy(MAX_ERROR_BODY).await;
            let class = crate::policy::classify(call.provider, status, &body);
            self.metrics.attempt(provider, ask, class.as_str());
            return Err(ApiError::upstream(status, &headers, body));
        }
        self.metrics.attempt(provider, ask, "started");
        Ok(answer::direct_body(
            resp,
            take(slot)?,
            tier,
            self.usage.clone(),
            call.format,
            self.cfg.max_response_bytes,
            |v, e| api.parse_body(v, e),
        )
        .await)
    }
}

/// The provider's name in the OpenTelemetry GenAI conventions (`gen_ai.provider.name`).
fn genai_provider(p: Provider) -> &'static str {
    match p {
        Provider::OpenAi => "openai",
        Provider::Anthropic => "anthropic",
        Provider::Gemini => "gcp.gemini",
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
}
