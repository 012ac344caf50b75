//! Native passthrough: when the caller's format is the provider's own (Responses or Chat to
//! OpenAI, Messages to Anthropic), the body goes upstream as sent apart from the tier fields
//! (`service_tier`, and `stream` in a race), and the provider's answer comes back untouched: the
//! body byte for byte, the stream event for event. Only a race for a non-streaming caller needs
//! an assembled body (from `response.completed`, or the Chat chunks).

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flex_shared::catalog::Tier;
use flex_shared::usage::UsageEvent;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::Full;
use secrecy::SecretString;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::canonical::Accumulator;
use crate::error::ApiError;
use crate::formats::{chat, messages, responses, CallerFormat, RawBody};
use crate::providers::openai::{self, Api};
use crate::providers::{anthropic, AskTier, Decoder};
use crate::proxy::{lost_draft, ms, outcome_headers, take, Draft, Plan, Proxy, UsageGuard};
use crate::race::{self, AttemptError, EventClass, Started};
use crate::sse::Event;
use crate::upstream::{read_body, MAX_ERROR_BODY};
use crate::usage::{hold_end, Durable};

/// A caller format that is its provider's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Native {
    Responses,
    Chat,
    Messages,
}

impl Native {
    pub(crate) fn of(
        format: CallerFormat,
        provider: flex_shared::catalog::Provider,
    ) -> Option<Self> {
        use flex_shared::catalog::Provider;
        match (format, provider) {
            (CallerFormat::Responses, Provider::OpenAi) => Some(Native::Responses),
            (CallerFormat::ChatCompletions, Provider::OpenAi) => Some(Native::Chat),
            (CallerFormat::Messages, Provider::Anthropic) => Some(Native::Messages),
            _ => None,
        }
    }

    fn format(self) -> CallerFormat {
        match self {
            Native::Responses => CallerFormat::Responses,
            Native::Chat => CallerFormat::ChatCompletions,
            Native::Messages => CallerFormat::Messages,
        }
    }

    /// The upstream request carrying `bytes` as they are.
    fn request(
        self,
        base: &str,
        key: &SecretString,
        bytes: Bytes,
        stream: bool,
        headers: &HeaderMap,
    ) -> Result<http::Request<Full<Bytes>>, ApiError> {
        match self {
            Native::Responses => openai::request(base, Api::Responses, key, bytes, stream),
            Native::Chat => openai::request(base, Api::Chat, key, bytes, stream),
            Native::Messages => anthropic::raw_request(base, key, bytes, stream, headers),
        }
    }

    fn tier_value(self, tier: AskTier) -> Result<&'static str, ApiError> {
        match self {
            Native::Responses | Native::Chat => Ok(openai::tier_value(tier)),
            Native::Messages => anthropic::tier_value(tier),
        }
    }

    /// The served tier a response object (or stream event object) reports.
    fn served_in(self, v: &Value) -> Option<Tier> {
        match self {
            Native::Responses | Native::Chat => {
                v["service_tier"].as_str().and_then(openai::served_tier)
            }
            Native::Messages => v["usage"]["service_tier"]
                .as_str()
                .and_then(anthropic::served_tier),
        }
    }
}

/// One request in the provider's own format (passthrough apart from the tier fields).
pub(crate) struct NativeCall<'a> {
    pub(crate) proxy: &'a Proxy,
    pub(crate) api: Native,
    pub(crate) base: String,
    pub(crate) secret: SecretString,
    pub(crate) body: RawBody,
    pub(crate) caller_wants_usage: bool,
    pub(crate) model: String,
    pub(crate) floor: Duration,
    /// The caller's headers (Messages forwards `anthropic-version` / `anthropic-beta`).
    pub(crate) headers: HeaderMap,
}

/// Classifies a native stream event for the race.
fn classify(api: Native, ev: &Event) -> EventClass {
    match api {
        Native::Responses => openai::classify_responses(ev),
        Native::Messages => anthropic::classify(ev),
        Native::Chat => {
            if ev.data == "[DONE]" {
                return EventClass::Start;
            }
            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                return EventClass::Lifecycle;
            };
            match v.get("error") {
                Some(e) if openai::is_capacity_code(e["code"].as_str().unwrap_or_default()) => {
                    EventClass::CapacityError
                }
                Some(_) => EventClass::Error,
                None if chat::chunk_has_content(&v) => EventClass::Start,
                None => EventClass::Lifecycle,
            }
        }
    }
}

impl NativeCall<'_> {
    fn bytes_for(&self, tier: AskTier, stream: bool) -> Result<Bytes, ApiError> {
        let mut b = self.body.clone();
        b.set("service_tier", &json!(self.api.tier_value(tier)?));
        if stream {
            b.set("stream", &json!(true));
            if self.api == Native::Chat {
                let mut so = b
                    .value("stream_options")
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({}));
                so["include_usage"] = json!(true);
                b.set("stream_options", &so);
            }
        }
        Ok(b.to_bytes())
    }

    async fn stream_attempt(&self, tier: AskTier) -> Result<Started, AttemptError> {
        let bytes = self.bytes_for(tier, true).map_err(AttemptError::Fatal)?;
        let req = self
            .api
            .request(&self.base, &self.secret, bytes, true, &self.headers)
            .map_err(AttemptError::Fatal)?;
        let api = self.api;
        race::attempt(&self.proxy.upstream, req, tier, move |ev| classify(api, ev)).await
    }

    pub(crate) async fn run(
        self,
        plan: Plan,
        caller_stream: bool,
        t0: Instant,
        slot: &mut Option<Draft>,
    ) -> Result<Response, ApiError> {
        if let (Plan::Direct(tier), false) = (plan, caller_stream) {
            let e = &mut slot.as_mut().ok_or_else(lost_draft)?.event;
            e.reason = "direct".into();
            e.tiers_started = vec![tier.assumed_served().as_str().to_string()];
            return self.direct_body(tier, slot).await;
        }
        let e = &mut slot.as_mut().ok_or_else(lost_draft)?.event;
        let started = self
            .proxy
            .start_upstream(plan, t0, &self.model, self.floor, e, |tier| {
                self.stream_attempt(tier)
            })
            .await?;
        Ok(self.respond(started, caller_stream, take(slot)?).await)
    }

    /// Non-streaming, no race: the provider's body goes back untouched.
    async fn direct_body(
        &self,
        tier: AskTier,
        slot: &mut Option<Draft>,
    ) -> Result<Response, ApiError> {
        let req = self.api.request(
            &self.base,
            &self.secret,
            self.bytes_for(tier, false)?,
            false,
            &self.headers,
        )?;
        // A non-streaming answer shows no sign of its start before its head, which comes with
        // the whole body: the request counts as in flight at the provider from here.
        if let Some(d) = slot.as_ref() {
            self.proxy.opened(&d.event, tier);
        }
        let resp = self.proxy.upstream.send(req).await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!("The provider could not be reached: {e}."),
            )
            .fix("check the provider base URL and the network; retry later.")
        })?;
        let (parts, body) = resp.into_parts();
        let ct = parts.headers.get(http::header::CONTENT_TYPE).cloned();
        if !parts.status.is_success() {
            return Err(ApiError::upstream(
                parts.status,
                ct,
                read_body(body, MAX_ERROR_BODY).await,
            ));
        }
        let guard = {
            let mut draft = take(slot)?;
            draft.event.start_latency_ms = ms(draft.t0.elapsed());
            UsageGuard::new(draft, self.proxy.usage.clone(), tier)
        };
        let bytes = read_body(body, self.proxy.cfg.max_response_bytes).await;
        let mut draft = guard.into_draft().ok_or_else(lost_draft)?;
        let mut served = tier.assumed_served();
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            if let Some(t) = self.api.served_in(&v) {
                served = t;
            }
            apply_usage(self.api, &v["usage"], &mut draft.event);
        }
        draft.event.served_tier = served.as_str().to_string();
        let reason = draft.event.reason.clone();
        let durable = draft.emit(self.proxy.usage.as_ref(), parts.status.as_u16(), "ok");
        let mut out = (parts.status, bytes).into_response();
        if let Some(ct) = ct {
            out.headers_mut().insert(http::header::CONTENT_TYPE, ct);
        }
        outcome_headers(out.headers_mut(), served, &reason, 0);
        Ok(hold_end(out, durable))
    }

    /// Answers from a started upstream stream: forwarded as SSE, or assembled into one body.
    async fn respond(&self, started: Started, caller_stream: bool, mut draft: Draft) -> Response {
        let mut tap = Tap {
            api: self.api,
            served: None,
            done: false,
        };
        let ask = started.tier;
        if caller_stream {
            let pending: VecDeque<Event> = started.buffered.into();
            // Which buffered event (if any) ends the answer: it waits for the usage event.
            let mut terminal_at = None;
            for (i, ev) in pending.iter().enumerate() {
                tap.observe(ev, &mut draft.event);
                if tap.done && terminal_at.is_none() {
                    terminal_at = Some(i);
                }
            }
            let served = tap.served.unwrap_or(ask.assumed_served());
            let reason = draft.event.reason.clone();
            let flex_wait = draft.event.flex_wait_ms;
            let state = StreamState {
                pending,
                next_pending: 0,
                terminal_at,
                sent_any: false,
                tail: None,
                rest: started.rest,
                tap,
                strip_usage_chunk: self.api == Native::Chat && !self.caller_wants_usage,
                guard: Some(UsageGuard {
                    draft: Some(draft),
                    sink: self.proxy.usage.clone(),
                    ask,
                    head_sent: true,
                }),
            };
            let stream = futures_util::stream::unfold(state, |mut st| async move {
                if let Some((last, durable)) = st.tail.take() {
                    durable.wait().await;
                    return Some((Ok::<Bytes, std::io::Error>(last), st));
                }
                loop {
                    let (ev, terminal) = match st.pending.pop_front() {
                        Some(ev) => {
                            let terminal = st.terminal_at == Some(st.next_pending);
                            st.next_pending += 1;
                            (ev, terminal)
                        }
                        None => match st.rest.next().await {
                            Some(Ok(ev)) => {
                                let was_done = st.tap.done;
                                if let Some(e) = st.guard.as_mut().and_then(UsageGuard::event_mut) {
                                    st.tap.observe(&ev, e);
                                }
                                (ev, !was_done && st.tap.done)
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "upstream stream broke mid-answer");
                                if let Some(g) = st.guard.take() {
                                    g.finish(st.tap.served, "incomplete").wait().await;
                                }
                                return None;
                            }
                            None => {
                                if let Some(g) = st.guard.take() {
                                    let outcome = if st.tap.done { "ok" } else { "incomplete" };
                                    g.finish(st.tap.served, outcome).wait().await;
                                }
                                return None;
                            }
                        },
                    };
                    let strip = st.strip_usage_chunk && is_usage_only_chunk(&ev);
                    let mut bytes = ev.to_bytes();
                    if terminal {
                        // The answer's last event goes out once its usage event is durable.
                        if let Some(g) = st.guard.take() {
                            let durable = g.finish(st.tap.served, "ok");
                            if !strip && !st.sent_any && !durable.is_ready() && bytes.len() > 1 {
                                // It is also the first: the first byte is never delayed, so
                                // all of it but its last byte goes now (an SSE event is not
                                // complete before its last byte), the last byte once durable.
                                let last = bytes.split_off(bytes.len() - 1);
                                st.tail = Some((last, durable));
                                st.sent_any = true;
                                return Some((Ok(bytes), st));
                            }
                            durable.wait().await;
                        }
                    }
                    if strip {
                        continue;
                    }
                    st.sent_any = true;
                    return Some((Ok(bytes), st));
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
            return resp;
        }
        // Non-streaming caller: read the whole upstream stream and assemble the body. The guard
        // reports the request as cancelled if the caller leaves meanwhile.
        let mut guard = UsageGuard::new(draft, self.proxy.usage.clone(), ask);
        let mut rest = started.rest;
        let mut assembler = chat::Assembler::default();
        let mut final_response: Option<Value> = None;
        let mut decoder = anthropic::StreamDecoder::new();
        let mut canonical = Accumulator::default();
        let mut decoded = Vec::new();
        let mut events: VecDeque<Event> = started.buffered.into();
        let mut broken = None;
        loop {
            let ev = match events.pop_front() {
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
            if let Some(e) = guard.event_mut() {
                tap.observe(&ev, e);
            }
            if self.api == Native::Messages {
                decoded.clear();
                decoder.decode(&ev, &mut decoded);
                decoded.iter().for_each(|e| canonical.push(e));
                continue;
            }
            if ev.data == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                continue;
            };
            match self.api {
                Native::Chat => assembler.push(&v),
                Native::Responses => {
                    if responses::is_terminal(responses::event_type(&ev.event, &v)) {
                        final_response = Some(v["response"].clone());
                    }
                }
                Native::Messages => {}
            }
        }
        let Some(mut draft) = guard.into_draft() else {
            return lost_draft().into_response_for(self.api.format());
        };
        let served = tap.served.unwrap_or(ask.assumed_served());
        draft.event.served_tier = served.as_str().to_string();
        let body = match self.api {
            Native::Chat if broken.is_none() => Some(assembler.finish()),
            Native::Responses => final_response,
            Native::Messages if canonical.finished => {
                Some(messages::render_response(&canonical.finish(), served))
            }
            Native::Chat | Native::Messages => None,
        };
        let reason = draft.event.reason.clone();
        let flex_wait = draft.event.flex_wait_ms;
        let Some(body) = body else {
            let durable = draft.emit(self.proxy.usage.as_ref(), 502, "incomplete");
            let why = broken.unwrap_or_else(|| "it ended without a final response".into());
            let resp = ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_incomplete",
                format!("The provider's answer was cut off: {why}."),
            )
            .fix("retry the request.")
            .into_response_for(self.api.format());
            return hold_end(resp, durable);
        };
        let durable = draft.emit(self.proxy.usage.as_ref(), 200, "ok");
        let mut resp = axum::Json(body).into_response();
        outcome_headers(resp.headers_mut(), served, &reason, flex_wait);
        hold_end(resp, durable)
    }
}

fn is_usage_only_chunk(ev: &Event) -> bool {
    ev.data.contains("\"usage\"")
        && serde_json::from_str::<Value>(&ev.data).is_ok_and(|v| {
            v["choices"].as_array().is_some_and(Vec::is_empty) && v["usage"].is_object()
        })
}

/// Copies a provider's usage (Responses, Chat or Messages naming) into the usage event.
fn apply_usage(api: Native, u: &Value, e: &mut UsageEvent) {
    if !u.is_object() {
        return;
    }
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    match api {
        Native::Responses => {
            e.input_tokens = n(&u["input_tokens"]);
            e.cached_input_tokens = n(&u["input_tokens_details"]["cached_tokens"]);
            e.output_tokens = n(&u["output_tokens"]);
            e.reasoning_tokens = n(&u["output_tokens_details"]["reasoning_tokens"]);
        }
        Native::Chat => {
            e.input_tokens = n(&u["prompt_tokens"]);
            e.cached_input_tokens = n(&u["prompt_tokens_details"]["cached_tokens"]);
            e.output_tokens = n(&u["completion_tokens"]);
            e.reasoning_tokens = n(&u["completion_tokens_details"]["reasoning_tokens"]);
        }
        Native::Messages => {
            // Anthropic's input_tokens exclude cache reads and writes (trap 6); message_delta
            // carries only the cumulative output count.
            if u.get("input_tokens").is_some() {
                let read = n(&u["cache_read_input_tokens"]);
                e.input_tokens =
                    n(&u["input_tokens"]) + read + n(&u["cache_creation_input_tokens"]);
                e.cached_input_tokens = read;
            }
            if let Some(o) = u["output_tokens"].as_u64() {
                e.output_tokens = o;
            }
        }
    }
}

/// Watches forwarded events for the served tier, usage and the end of the answer.
struct Tap {
    api: Native,
    served: Option<Tier>,
    done: bool,
}

impl Tap {
    fn observe(&mut self, ev: &Event, e: &mut UsageEvent) {
        if ev.data == "[DONE]" {
            self.done = true;
            return;
        }
        let interesting = match self.api {
            Native::Responses => {
                ev.event.is_empty()
                    || responses::is_terminal(&ev.event)
                    || (self.served.is_none() && ev.event == "response.created")
            }
            Native::Chat => self.served.is_none() || ev.data.contains("\"usage\""),
            Native::Messages => matches!(
                ev.event.as_str(),
                "message_start" | "message_delta" | "message_stop"
            ),
        };
        if !interesting {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return;
        };
        let obj = match self.api {
            Native::Responses => &v["response"],
            Native::Chat => &v,
            Native::Messages if ev.event == "message_start" => &v["message"],
            Native::Messages => &v,
        };
        if let Some(t) = self.api.served_in(obj) {
            self.served = Some(t);
        }
        apply_usage(self.api, &obj["usage"], e);
        if (self.api == Native::Responses
            && responses::is_terminal(responses::event_type(&ev.event, &v)))
            || ev.event == "message_stop"
        {
            self.done = true;
        }
    }
}

struct StreamState {
    pending: VecDeque<Event>,
    /// How many of `pending` have been forwarded.
    next_pending: usize,
    /// The index in `pending` of the event that ends the answer, if it was buffered.
    terminal_at: Option<usize>,
    /// Bytes have gone to the caller.
    sent_any: bool,
    /// The last byte of a final event that was also the first, and what it waits for.
    tail: Option<(Bytes, Durable)>,
    rest: crate::upstream::EventStream,
    tap: Tap,
    strip_usage_chunk: bool,
    guard: Option<UsageGuard>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caller's W3C trace context stays with us: providers are third parties.
    #[test]
    fn the_callers_trace_headers_are_not_sent_to_providers() {
        let mut caller = HeaderMap::new();
        caller.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        caller.insert("tracestate", http::HeaderValue::from_static("caller=1"));
        caller.insert(
            "anthropic-beta",
            http::HeaderValue::from_static("some-beta"),
        );
        for api in [Native::Responses, Native::Chat, Native::Messages] {
            let req = api
                .request(
                    "http://upstream.test",
                    &SecretString::from("sk-test"),
                    Bytes::from_static(b"{}"),
                    false,
                    &caller,
                )
                .unwrap_or_else(|e| panic!("{e:?}"));
            let h = req.headers();
            assert!(
                h.get("traceparent").is_none() && h.get("tracestate").is_none(),
                "{api:?}: {h:?}"
            );
        }
    }

    mod held_end {
        use std::sync::Arc;

        use super::*;
        use crate::proxy::Plan;
        use crate::usage::test_support::{
            complete_events, draft, fake_upstream, json_response, proxy, read_until_quiet,
            sse_response, GatedSink,
        };

        const QUIET: Duration = Duration::from_millis(300);

        fn chat_call<'a>(proxy: &'a Proxy, base: String, stream: bool) -> NativeCall<'a> {
            let body = format!(
                r#"{{"model":"gpt-5.5","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
            );
            NativeCall {
                proxy,
                api: Native::Chat,
                base,
                secret: SecretString::from("sk-test"),
                body: RawBody::parse(body.as_bytes(), CallerFormat::ChatCompletions)
                    .unwrap_or_else(|e| panic!("{e:?}")),
                caller_wants_usage: true,
                model: "gpt-5.5".into(),
                floor: Duration::from_millis(500),
                headers: HeaderMap::new(),
            }
        }

        async fn run(call: NativeCall<'_>, stream: bool) -> Body {
            let mut slot = Some(draft());
            call.run(
                Plan::Direct(AskTier::Standard),
                stream,
                Instant::now(),
                &mut slot,
            )
            .await
            .unwrap_or_else(|e| panic!("{e:?}"))
            .into_body()
        }

        const ROLE: &str = r#"{"id":"c1","object":"chat.completion.chunk","service_tier":"default","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        const TEXT: &str = r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        const STOP: &str = r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        const USAGE: &str = r#"{"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

        #[tokio::test]
        async fn a_stream_holds_only_its_final_event_until_the_usage_event_is_durable() {
            let sink = Arc::new(GatedSink::default());
            let proxy = proxy(sink.clone());
            // The whole answer at once, then the upstream ends.
            let base = fake_upstream(sse_response(&[
                ("", ROLE),
                ("", TEXT),
                ("", STOP),
                ("", USAGE),
                ("", "[DONE]"),
            ]))
            .await;
            let mut body = run(chat_call(&proxy, base, true), true).await;
            let (before, ended) = read_until_quiet(&mut body, QUIET).await;
            assert!(!ended, "the end waits for the usage event");
            assert_eq!(
                complete_events(&before),
                [ROLE, TEXT, STOP, USAGE],
                "everything but the final event is out at once"
            );
            let emitted = sink.emitted();
            assert_eq!(emitted.len(), 1, "reported before the final event");
            assert_eq!((emitted[0].input_tokens, emitted[0].output_tokens), (3, 1));
            assert_eq!(emitted[0].outcome, "ok");
            assert_eq!(sink.release(), 1);
            let (after, ended) = read_until_quiet(&mut body, Duration::from_secs(5)).await;
            assert!(ended);
            assert_eq!(after, "data: [DONE]\n\n");
        }

        #[tokio::test]
        async fn a_final_event_that_is_also_the_first_sends_its_first_bytes_at_once() {
            let sink = Arc::new(GatedSink::default());
            let proxy = proxy(sink.clone());
            let base = fake_upstream(sse_response(&[("", "[DONE]")])).await;
            let mut body = run(chat_call(&proxy, base, true), true).await;
            let (before, ended) = read_until_quiet(&mut body, QUIET).await;
            assert!(!ended);
            assert_eq!(before, "data: [DONE]\n", "the first byte is not delayed");
            assert!(
                complete_events(&before).is_empty(),
                "the event is not complete before its usage event is durable"
            );
            assert_eq!(sink.release(), 1);
            let (after, ended) = read_until_quiet(&mut body, Duration::from_secs(5)).await;
            assert!(ended);
            assert_eq!(after, "\n");
        }

        #[tokio::test]
        async fn a_body_keeps_its_last_byte_until_the_usage_event_is_durable() {
            let sink = Arc::new(GatedSink::default());
            let proxy = proxy(sink.clone());
            let answer = r#"{"id":"chatcmpl-1","object":"chat.completion","service_tier":"default","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
            let base = fake_upstream(json_response(answer)).await;
            let mut body = run(chat_call(&proxy, base, false), false).await;
            let (before, ended) = read_until_quiet(&mut body, QUIET).await;
            assert!(!ended);
            assert_eq!(before, answer[..answer.len() - 1], "all but the last byte");
            assert_eq!(sink.emitted()[0].output_tokens, 1);
            assert_eq!(sink.release(), 1);
            let (after, ended) = read_until_quiet(&mut body, Duration::from_secs(5)).await;
            assert!(ended);
            assert_eq!(after, "}");
        }
    }

    #[test]
    fn classifies_openai_events() {
        let ev = |name: &str, data: &str| Event::new(name, data);
        assert_eq!(
            classify(
                Native::Responses,
                &ev("response.created", r#"{"type":"response.created"}"#)
            ),
            EventClass::Lifecycle
        );
        assert_eq!(
            classify(
                Native::Responses,
                &ev(
                    "response.output_text.delta",
                    r#"{"type":"response.output_text.delta"}"#
                )
            ),
            EventClass::Start
        );
        assert_eq!(
            classify(
                Native::Responses,
                &ev("error", r#"{"type":"error","code":"resource_unavailable"}"#)
            ),
            EventClass::CapacityError
        );
        assert_eq!(
            classify(
                Native::Chat,
                &ev(
                    "",
                    r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#
                )
            ),
            EventClass::Lifecycle
        );
        assert_eq!(
            classify(
                Native::Chat,
                &ev(
                    "",
                    r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#
                )
            ),
            EventClass::Start
        );
    }

    #[test]
    fn trap_6_anthropic_usage_counts_cache_in_input() {
        let mut e = UsageEvent {
            schema_version: 1,
            ..UsageEvent::default()
        };
        apply_usage(
            Native::Messages,
            &json!({"input_tokens": 10, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 5, "output_tokens": 1}),
            &mut e,
        );
        apply_usage(Native::Messages, &json!({"output_tokens": 42}), &mut e);
        assert_eq!(
            (e.input_tokens, e.cached_input_tokens, e.output_tokens),
            (45, 30, 42)
        );
    }
}
