//! The translated path: a caller format that is not the provider's own goes through the
//! canonical model. Upstream is always streamed (the race needs the start, and one code path
//! serves every pair); a non-streaming caller gets the body assembled from the stream.
//!
//! The dispatch tables below are the only place that pairs formats and providers.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flex_shared::catalog::{Provider, Tier};
use http::{HeaderValue, StatusCode};
use http_body_util::Full;
use secrecy::SecretString;
use serde_json::Value;
use tokio::time::Instant;

use crate::canonical::{self as c, Accumulator, StreamEvent};
use crate::error::ApiError;
use crate::formats::{chat, interactions, messages, responses, CallerFormat, Encoder, RawBody};
use crate::providers::{anthropic, gemini, openai, AskTier, Decoder};
use crate::proxy::{lost_draft, outcome_headers, take, Draft, Plan, Proxy, UsageGuard};
use crate::race::{self, AttemptError, EventClass, Started};
use crate::sse::Event;
use crate::upstream::EventStream;
use crate::usage::{hold_end, Durable};

// ----- dispatch -----------------------------------------------------------------------------

/// The caller's body as canonical.
pub fn parse_request(format: CallerFormat, body: &RawBody) -> Result<c::Request, ApiError> {
    match format {
        CallerFormat::Responses => responses::parse_request(body),
        CallerFormat::ChatCompletions => chat::parse_request(body),
        CallerFormat::Interactions => interactions::parse_request(body),
        CallerFormat::Messages => messages::parse_request(body),
    }
}

/// A complete canonical response in the caller's format.
pub fn render(format: CallerFormat, r: &c::Response, served: Tier) -> Value {
    match format {
        CallerFormat::Responses => responses::render_response(r, served),
        CallerFormat::ChatCompletions => chat::render_response(r, served),
        CallerFormat::Interactions => interactions::render_response(r, served),
        CallerFormat::Messages => messages::render_response(r, served),
    }
}

/// A stream encoder for the caller's format.
pub fn encoder(
    format: CallerFormat,
    served: Tier,
    model: &str,
    include_usage: bool,
) -> Box<dyn Encoder> {
    match format {
        CallerFormat::Responses => Box::new(responses::StreamEncoder::new(served, model)),
        CallerFormat::ChatCompletions => {
            Box::new(chat::StreamEncoder::new(served, model, include_usage))
        }
        CallerFormat::Interactions => Box::new(interactions::StreamEncoder::new(served, model)),
        CallerFormat::Messages => Box::new(messages::StreamEncoder::new(served, model)),
    }
}

/// The streaming upstream request for a canonical request.
pub fn upstream_request(
    provider: Provider,
    base: &str,
    req: &c::Request,
    tier: AskTier,
    key: &SecretString,
) -> Result<http::Request<Full<Bytes>>, ApiError> {
    match provider {
        Provider::OpenAi => openai::translated_request(base, req, tier, key),
        Provider::Anthropic => anthropic::request(base, req, tier, key),
        Provider::Gemini => gemini::request(base, req, tier, key),
    }
}

/// How an upstream event of `provider` counts for the race.
pub fn classify(provider: Provider, ev: &Event) -> EventClass {
    match provider {
        Provider::OpenAi => openai::classify_responses(ev),
        Provider::Anthropic => anthropic::classify(ev),
        Provider::Gemini => gemini::classify(ev),
    }
}

/// A stream decoder for `provider`.
pub fn decoder(provider: Provider) -> Box<dyn Decoder> {
    match provider {
        Provider::OpenAi => Box::new(openai::StreamDecoder::new()),
        Provider::Anthropic => Box::new(anthropic::StreamDecoder::new()),
        Provider::Gemini => Box::new(gemini::StreamDecoder::new()),
    }
}

// ----- the call -----------------------------------------------------------------------------

/// Whether a provider needs a token cap on every request (Anthropic does).
pub fn require_max_tokens(
    provider: Provider,
    req: &c::Request,
    format: CallerFormat,
) -> Result<(), ApiError> {
    if provider != Provider::Anthropic || req.max_output_tokens.is_some() {
        return Ok(());
    }
    let field = match format {
        CallerFormat::ChatCompletions => "max_completion_tokens",
        CallerFormat::Messages => "max_tokens",
        CallerFormat::Interactions => "generation_config.max_output_tokens",
        CallerFormat::Responses => "max_output_tokens",
    };
    Err(ApiError::bad_request(
        "missing_max_tokens",
        format!("`{}` is a Claude model, and Anthropic requires a cap on output tokens, but the request sets no `{field}`.", req.model),
    )
    .param(field)
    .fix(format!("set `{field}` and resend."))
    .example(format!(r#""{field}": 1024"#)))
}

pub(crate) struct TranslatedCall<'a> {
    pub proxy: &'a Proxy,
    pub format: CallerFormat,
    pub provider: Provider,
    pub base: String,
    pub secret: SecretString,
    pub req: c::Request,
    pub include_usage: bool,
    pub floor: Duration,
}

impl TranslatedCall<'_> {
    async fn attempt(&self, tier: AskTier) -> Result<Started, AttemptError> {
        let req = upstream_request(self.provider, &self.base, &self.req, tier, &self.secret)
            .map_err(AttemptError::Fatal)?;
        let provider = self.provider;
        race::attempt(&self.proxy.upstream, req, tier, move |ev| {
            classify(provider, ev)
        })
        .await
    }

    pub(crate) async fn run(
        self,
        plan: Plan,
        t0: Instant,
        slot: &mut Option<Draft>,
    ) -> Result<Response, ApiError> {
        let e = &mut slot.as_mut().ok_or_else(lost_draft)?.event;
        let started = self
            .proxy
            .start_upstream(plan, t0, &self.req.model, self.floor, e, |tier| {
                self.attempt(tier)
            })
            .await?;
        let draft = take(slot)?;
        Ok(if self.req.stream {
            self.stream(started, draft)
        } else {
            self.assemble(started, draft).await
        })
    }

    fn stream(self, started: Started, draft: Draft) -> Response {
        let served = started.tier.assumed_served();
        let reason = draft.event.reason.clone();
        let flex_wait = draft.event.flex_wait_ms;
        let state = State {
            pending: started.buffered.into(),
            rest: started.rest,
            decoder: decoder(self.provider),
            encoder: encoder(self.format, served, &self.req.model, self.include_usage),
            out: VecDeque::new(),
            held: VecDeque::new(),
            finished: false,
            hold: None,
            upstream_done: false,
            guard: Some(UsageGuard {
                draft: Some(draft),
                sink: self.proxy.usage.clone(),
                ask: started.tier,
                head_sent: true,
            }),
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(ev) = st.out.pop_front() {
                    return Some((Ok::<Bytes, std::io::Error>(ev.to_bytes()), st));
                }
                // The answer's final events (and the end of the body) go out once the usage
                // event is durable; everything before them has gone already.
                if let Some(durable) = st.hold.take() {
                    durable.wait().await;
                    st.out.append(&mut st.held);
                    continue;
                }
                if st.upstream_done {
                    return None;
                }
                let upstream = match st.pending.pop_front() {
                    Some(ev) => Some(Ok(ev)),
                    None => st.rest.next().await,
                };
                match upstream {
                    Some(Ok(ev)) => st.feed(&ev),
                    Some(Err(e)) => {
                        st.upstream_done = true;
                        tracing::warn!(error = %e, "upstream stream broke mid-answer");
                        if st.guard.is_some() {
                            st.end("incomplete");
                            let mut out = Vec::new();
                            st.encoder.encode(
                                &StreamEvent::Error {
                                    message: format!("the provider's stream broke: {e}"),
                                },
                                &mut out,
                            );
                            st.release(out);
                        }
                    }
                    None => {
                        st.upstream_done = true;
                        let outcome = if st.finished { "ok" } else { "incomplete" };
                        st.end(outcome);
                    }
                }
            }
        });
        let mut resp = Response::new(Body::from_stream(stream));
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        outcome_headers(h, served, &reason, flex_wait);
        resp
    }

    async fn assemble(self, started: Started, draft: Draft) -> Response {
        // Reports the request as cancelled if the caller leaves while the body is assembled.
        let guard = UsageGuard::new(draft, self.proxy.usage.clone(), started.tier);
        let mut dec = decoder(self.provider);
        let mut acc = Accumulator::default();
        let mut pending: VecDeque<Event> = started.buffered.into();
        let mut rest = started.rest;
        let mut broken = None;
        let mut events = Vec::new();
        loop {
            let ev = match pending.pop_front() {
                Some(ev) => ev,
                None => match rest.next().await {
                    Some(Ok(ev)) => ev,
                    Some(Err(e)) => {
                        broken = Some(e.to_string());
                        break;
                    }
                    None => break,
                },
            };
            events.clear();
            dec.decode(&ev, &mut events);
            events.iter().for_each(|e| acc.push(e));
        }
        let Some(mut draft) = guard.into_draft() else {
            return lost_draft().into_response_for(self.format);
        };
        let served = dec.served_tier().unwrap_or(started.tier.assumed_served());
        draft.event.served_tier = served.as_str().to_string();
        let reason = draft.event.reason.clone();
        let flex_wait = draft.event.flex_wait_ms;
        if !acc.finished {
            let why = broken
                .or(acc.error.clone())
                .unwrap_or_else(|| "it ended without a final event".into());
            let durable = draft.emit(self.proxy.usage.as_ref(), 502, "incomplete");
            let resp = ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_incomplete",
                format!("The provider's answer was cut off: {why}."),
            )
            .fix("retry the request.")
            .into_response_for(self.format);
            return hold_end(resp, durable);
        }
        let mut r = acc.finish();
        if r.model.is_empty() {
            r.model = self.req.model.clone();
        }
        apply(&r.usage, &mut draft.event);
        let durable = draft.emit(self.proxy.usage.as_ref(), 200, "ok");
        let mut resp = axum::Json(render(self.format, &r, served)).into_response();
        outcome_headers(resp.headers_mut(), served, &reason, flex_wait);
        hold_end(resp, durable)
    }
}

fn apply(u: &c::Usage, e: &mut flex_shared::usage::UsageEvent) {
    e.input_tokens = u.input_tokens;
    e.cached_input_tokens = u.cached_input_tokens;
    e.output_tokens = u.output_tokens;
    e.reasoning_tokens = u.reasoning_tokens;
}

struct State {
    pending: VecDeque<Event>,
    rest: EventStream,
    decoder: Box<dyn Decoder>,
    encoder: Box<dyn Encoder>,
    /// Events to send now.
    out: VecDeque<Event>,
    /// The answer's final events: sent once `hold` resolves.
    held: VecDeque<Event>,
    finished: bool,
    /// The usage event's durability, awaited (once `out` is sent) before `held` and the end of
    /// the body (set when the answer ends).
    hold: Option<Durable>,
    /// The upstream stream has ended (or broken).
    upstream_done: bool,
    guard: Option<UsageGuard>,
}

impl State {
    fn feed(&mut self, ev: &Event) {
        let mut canonical = Vec::new();
        self.decoder.decode(ev, &mut canonical);
        let mut out = Vec::new();
        for e in &canonical {
            if let StreamEvent::Finish { usage, .. } = e {
                if !self.finished {
                    self.finished = true;
                    if let Some(ue) = self.guard.as_mut().and_then(UsageGuard::event_mut) {
                        apply(usage, ue);
                    }
                    // The answer is complete (usage included): what came before its final
                    // events goes now; report it, and hold the final events until the report
                    // is durable.
                    self.release(std::mem::take(&mut out));
                    self.end("ok");
                }
            }
            self.encoder.encode(e, &mut out);
        }
        self.release(out);
    }

    /// Queues `events`: to send now, or after the final events once the answer has ended.
    fn release(&mut self, events: Vec<Event>) {
        if self.hold.is_some() {
            self.held.extend(events);
        } else {
            self.out.extend(events);
        }
    }

    /// Reports the usage event (once); what is released from now on waits for it to be durable.
    fn end(&mut self, outcome: &str) {
        let served = self.decoder.served_tier();
        if let Some(g) = self.guard.take() {
            self.hold = Some(g.finish(served, outcome));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use secrecy::SecretString;

    use super::*;
    use crate::usage::test_support::{
        complete_events, draft, fake_upstream, proxy, read_until_quiet, sse_response, GatedSink,
    };

    const QUIET: Duration = Duration::from_millis(300);

    /// Gemini's whole answer in one upstream event: text, finish reason and usage together.
    const ONE_CHUNK: &str = r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Hello there"}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2,"totalTokenCount":5},"modelVersion":"gemini-3.5-flash","responseId":"r1"}"#;

    fn call(proxy: &Proxy, base: String, stream: bool) -> TranslatedCall<'_> {
        TranslatedCall {
            proxy,
            format: CallerFormat::ChatCompletions,
            provider: Provider::Gemini,
            base,
            secret: SecretString::from("AIza-test"),
            req: c::Request {
                model: "gemini-3.5-flash".into(),
                messages: vec![c::Message {
                    role: c::Role::User,
                    parts: vec![c::Part::Text("hi".into())],
                }],
                stream,
                ..c::Request::default()
            },
            include_usage: true,
            floor: Duration::from_millis(500),
        }
    }

    async fn run(call: TranslatedCall<'_>) -> Body {
        let mut slot = Some(draft());
        call.run(Plan::Direct(AskTier::Standard), Instant::now(), &mut slot)
            .await
            .unwrap_or_else(|e| panic!("{e:?}"))
            .into_body()
    }

    #[tokio::test]
    async fn a_one_chunk_answer_streams_its_text_at_once_and_holds_only_the_final_events() {
        let sink = Arc::new(GatedSink::default());
        let proxy = proxy(sink.clone());
        let base = fake_upstream(sse_response(&[("", ONE_CHUNK)])).await;
        let mut body = run(call(&proxy, base, true)).await;
        let (before, ended) = read_until_quiet(&mut body, QUIET).await;
        assert!(!ended, "the end waits for the usage event");
        let events = complete_events(&before);
        assert_eq!(events.len(), 2, "the role and the text: {before}");
        assert!(events[0].contains(r#""role":"assistant""#), "{before}");
        assert!(events[1].contains("Hello there"), "{before}");
        assert!(!before.contains("finish_reason\":\"stop"), "{before}");
        assert!(!before.contains("[DONE]"), "{before}");
        let emitted = sink.emitted();
        assert_eq!(emitted.len(), 1, "reported before the final events");
        assert_eq!((emitted[0].input_tokens, emitted[0].output_tokens), (3, 2));
        assert_eq!(sink.release(), 1);
        let (after, ended) = read_until_quiet(&mut body, Duration::from_secs(5)).await;
        assert!(ended);
        let events = complete_events(&after);
        assert_eq!(events.len(), 3, "finish, usage, [DONE]: {after}");
        assert!(events[0].contains(r#""finish_reason":"stop""#), "{after}");
        assert!(events[1].contains(r#""prompt_tokens":3"#), "{after}");
        assert_eq!(events[2], "[DONE]");
    }

    #[tokio::test]
    async fn an_assembled_body_keeps_its_last_byte_until_the_usage_event_is_durable() {
        let sink = Arc::new(GatedSink::default());
        let proxy = proxy(sink.clone());
        let base = fake_upstream(sse_response(&[("", ONE_CHUNK)])).await;
        let mut body = run(call(&proxy, base, false)).await;
        let (before, ended) = read_until_quiet(&mut body, QUIET).await;
        assert!(!ended);
        assert!(
            before.starts_with('{') && before.contains("Hello there"),
            "{before}"
        );
        assert!(
            serde_json::from_str::<Value>(&before).is_err(),
            "the last byte is held: {before}"
        );
        assert_eq!(sink.release(), 1);
        let (after, ended) = read_until_quiet(&mut body, Duration::from_secs(5)).await;
        assert!(ended);
        assert_eq!(after, "}");
        let whole: Value = serde_json::from_str(&format!("{before}{after}")).unwrap();
        assert_eq!(whole["usage"]["completion_tokens"], 2);
    }
}
