//! Native passthrough: when the caller's format is the provider's own (Responses or Chat to
//! OpenAI, Messages to Anthropic), the body goes upstream as sent apart from the tier fields
//! (`service_tier`, and `stream` in a race), and the provider's answer comes back untouched: the
//! body byte for byte, the stream event for event. Only a race for a non-streaming caller needs
//! an assembled body (from `response.completed`, or the Chat chunks).
//!
//! [`NativeTranscoder`] is this pair's [`Transcode`]: the identity, plus a tap for the served
//! tier, the usage and the end of the answer.

use bytes::Bytes;
use flex_shared::catalog::Tier;
use flex_shared::usage::UsageEvent;
use http::HeaderMap;
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::answer::{Fed, Mode, Transcode};
use crate::canonical::{Accumulator, StopReason, StreamEvent};
use crate::error::ApiError;
use crate::formats::{chat, messages, responses, CallerFormat, RawBody};
use crate::providers::openai::{self, Api};
use crate::providers::{anthropic, AskTier, Decoder};
use crate::race::EventClass;
use crate::sse::Event;

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

    /// The upstream request carrying `bytes` as they are.
    pub(crate) fn request(
        self,
        base: &str,
        key: &SecretString,
        bytes: Bytes,
        stream: bool,
        headers: &HeaderMap,
    ) -> Result<http::Request<Bytes>, ApiError> {
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
    pub(crate) fn served_in(self, v: &Value) -> Option<Tier> {
        match self {
            Native::Responses | Native::Chat => {
                v["service_tier"].as_str().and_then(openai::served_tier)
            }
            Native::Messages => v["usage"]["service_tier"]
                .as_str()
                .and_then(anthropic::served_tier),
        }
    }

    /// The caller's body for `tier`: only `service_tier` (and, for a stream, `stream` and
    /// Chat's `stream_options.include_usage`) are edited.
    pub(crate) fn body_for(
        self,
        body: &RawBody,
        tier: AskTier,
        stream: bool,
    ) -> Result<Bytes, ApiError> {
        let mut b = body.clone();
        b.set("service_tier", &json!(self.tier_value(tier)?));
        if stream {
            b.set("stream", &json!(true));
            if self == Native::Chat {
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

    /// Classifies a native stream event for the race.
    pub(crate) fn classify(self, ev: &Event) -> EventClass {
        match self {
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

    /// Reads the served tier and usage of a whole (non-streamed) answer.
    pub(crate) fn parse_body(self, v: &Value, e: &mut UsageEvent) -> Option<Tier> {
        apply_usage(self, &v["usage"], e);
        self.served_in(v)
    }
}

/// A native answer: forwarded event for event (or assembled), tapped for usage and its end.
pub(crate) struct NativeTranscoder {
    api: Native,
    mode: Mode,
    /// Chat's usage-only chunk is ours (we asked for it), unless the caller asked too.
    strip_usage_chunk: bool,
    served: Option<Tier>,
    /// The final event has been seen.
    ended: bool,
    /// The provider reported the answer failed: why.
    failed: Option<String>,
    /// Events forwarded (a Responses stream numbers its events from 0).
    forwarded: u64,
    assembler: chat::Assembler,
    final_response: Option<Value>,
    decoder: anthropic::StreamDecoder,
    canonical: Accumulator,
    decoded: Vec<StreamEvent>,
}

impl NativeTranscoder {
    pub(crate) fn new(api: Native, mode: Mode, caller_wants_usage: bool) -> Self {
        Self {
            api,
            mode,
            strip_usage_chunk: api == Native::Chat && !caller_wants_usage,
            served: None,
            ended: false,
            failed: None,
            forwarded: 0,
            assembler: chat::Assembler::default(),
            final_response: None,
            decoder: anthropic::StreamDecoder::new(),
            canonical: Accumulator::default(),
            decoded: Vec::new(),
        }
    }

    /// The served tier, usage, end and failure an event carries.
    fn observe(&mut self, ev: &Event, v: Option<&Value>, e: &mut UsageEvent) -> Option<Fed> {
        if ev.data == "[DONE]" {
            return Some(Fed::Finished { final_from: 0 });
        }
        let v = v?;
        let (obj, kind) = match self.api {
            Native::Responses => {
                let t = responses::event_type(&ev.event, v);
                (&v["response"], t)
            }
            Native::Chat => (v, ""),
            Native::Messages if ev.event == "message_start" => (&v["message"], "message_start"),
            Native::Messages => (v, ev.event.as_str()),
        };
        if let Some(t) = self.api.served_in(obj) {
            self.served = Some(t);
        }
        apply_usage(self.api, &obj["usage"], e);
        let failure = match (self.api, kind) {
            (Native::Responses, "response.failed") => Some(
                obj["error"]["message"]
                    .as_str()
                    .unwrap_or("the provider reported the response failed")
                    .to_string(),
            ),
            (Native::Responses, "error") => Some(
                v["message"]
                    .as_str()
                    .unwrap_or("the provider sent an error event")
                    .to_string(),
            ),
            (Native::Chat, _) if v.get("error").is_some() => Some(
                v["error"]["message"]
                    .as_str()
                    .unwrap_or("the provider sent an error chunk")
                    .to_string(),
            ),
            (Native::Messages, "error") => Some(
                v["error"]["message"]
                    .as_str()
                    .unwrap_or("the provider sent an error event")
                    .to_string(),
            ),
            _ => None,
        };
        if let Some(why) = failure {
            self.failed = Some(why);
            return Some(Fed::Failed { final_from: 0 });
        }
        let done = match self.api {
            Native::Responses => responses::is_terminal(kind),
            Native::Messages => kind == "message_stop",
            Native::Chat => false,
        };
        done.then_some(Fed::Finished { final_from: 0 })
    }

    /// Whether the tap must parse this event (most deltas need no look).
    fn interesting(&self, ev: &Event) -> bool {
        match (self.api, self.mode) {
            (_, Mode::Assemble) => true,
            (Native::Responses, _) => {
                ev.event.is_empty()
                    || ev.event == "error"
                    || responses::is_terminal(&ev.event)
                    || (self.served.is_none() && ev.event == "response.created")
            }
            (Native::Chat, _) => {
                self.served.is_none()
                    || ev.data.contains("\"usage\"")
                    || ev.data.contains("\"error\"")
            }
            (Native::Messages, _) => matches!(
                ev.event.as_str(),
                "message_start" | "message_delta" | "message_stop" | "error"
            ),
        }
    }
}

impl Transcode for NativeTranscoder {
    fn feed(&mut self, ev: Event, out: &mut Vec<Event>, usage: &mut UsageEvent) -> Fed {
        let parsed = if self.interesting(&ev) && ev.data != "[DONE]" {
            serde_json::from_str::<Value>(&ev.data).ok()
        } else {
            None
        };
        let fed = if self.ended {
            Fed::More
        } else {
            self.observe(&ev, parsed.as_ref(), usage)
                .unwrap_or(Fed::More)
        };
        if fed != Fed::More {
            self.ended = true;
        }
        match self.mode {
            Mode::Stream => {
                let strip = self.strip_usage_chunk && is_usage_only_chunk(&ev);
                let at = out.len();
                if !strip {
                    out.push(ev);
                    self.forwarded += 1;
                }
                match fed {
                    Fed::Finished { .. } => Fed::Finished { final_from: at },
                    Fed::Failed { .. } => Fed::Failed { final_from: at },
                    Fed::More => Fed::More,
                }
            }
            Mode::Assemble if self.failed.is_some() => fed,
            Mode::Assemble => {
                let refused = match (self.api, parsed.as_ref()) {
                    (Native::Chat, Some(v)) => self.assembler.push(v).err(),
                    (Native::Responses, Some(v))
                        if responses::is_terminal(responses::event_type(&ev.event, v)) =>
                    {
                        self.final_response = Some(v["response"].clone());
                        None
                    }
                    (Native::Messages, _) => {
                        self.decoded.clear();
                        self.decoder.decode(&ev, &mut self.decoded);
                        self.decoded.iter().for_each(|e| self.canonical.push(e));
                        self.decoded.iter().find_map(|e| match e {
                            StreamEvent::Error { message, .. } => Some(message.clone()),
                            _ => None,
                        })
                    }
                    _ => None,
                };
                match refused {
                    // Malformed (e.g. an index past the limit): the answer ends failed.
                    Some(why) if self.failed.is_none() => {
                        self.failed = Some(why);
                        self.ended = true;
                        Fed::Failed { final_from: 0 }
                    }
                    _ => fed,
                }
            }
        }
    }

    fn served(&self) -> Option<Tier> {
        self.served
    }

    fn cut_off(&mut self, why: &str, out: &mut Vec<Event>) {
        let message = format!(
            "The provider's answer was cut off before it was complete: {why}. Retry the request."
        );
        out.push(match self.api {
            Native::Responses => Event::new(
                "error",
                json!({"type": "error", "code": "upstream_incomplete", "message": message, "param": null, "sequence_number": self.forwarded}).to_string(),
            ),
            Native::Chat => Event::new(
                "",
                json!({"error": {"message": message, "type": "api_error", "param": null, "code": "upstream_incomplete"}}).to_string(),
            ),
            Native::Messages => Event::new(
                "error",
                json!({"type": "error", "error": {"type": "api_error", "message": message, "code": "upstream_incomplete"}}).to_string(),
            ),
        });
    }

    fn body(&mut self) -> Result<Value, String> {
        if let Some(why) = &self.failed {
            return Err(why.clone());
        }
        match self.api {
            Native::Responses => self
                .final_response
                .take()
                .ok_or_else(|| "the stream ended without `response.completed`".into()),
            Native::Chat if self.ended => Ok(std::mem::take(&mut self.assembler).finish()),
            Native::Chat => Err("the stream ended without `[DONE]`".into()),
            Native::Messages if self.canonical.finished => {
                let r = std::mem::take(&mut self.canonical).finish();
                if r.stop == StopReason::Error {
                    return Err("the provider reported the message failed".into());
                }
                let served = self.served.unwrap_or(Tier::Standard);
                Ok(messages::render_response(&r, served))
            }
            Native::Messages => Err("the stream ended without `message_stop`".into()),
        }
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

        use std::time::Duration;

        use axum::body::Body;
        use tokio::time::Instant;

        use super::*;
        use crate::proxy::{Call, Pair, Plan, Proxy};
        use crate::usage::test_support::{
            complete_events, draft, fake_upstream, json_response, proxy, read_until_quiet,
            sse_response, GatedSink,
        };

        const QUIET: Duration = Duration::from_millis(300);

        fn chat_call(base: String, stream: bool) -> Call {
            let body = format!(
                r#"{{"model":"gpt-5.5","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
            );
            Call {
                format: CallerFormat::ChatCompletions,
                provider: flex_shared::catalog::Provider::OpenAi,
                model: "gpt-5.5".into(),
                base,
                secret: SecretString::from("sk-test"),
                floor: Duration::from_millis(500),
                stream,
                pair: Pair::Native {
                    api: Native::Chat,
                    body: RawBody::parse(body.as_bytes(), CallerFormat::ChatCompletions)
                        .unwrap_or_else(|e| panic!("{e:?}")),
                    caller_wants_usage: true,
                    headers: HeaderMap::new(),
                },
            }
        }

        async fn run(proxy: &Proxy, call: Call) -> Body {
            let mut slot = Some(draft());
            proxy
                .run(
                    &call,
                    Plan::Direct(AskTier::Standard),
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
            let mut body = run(&proxy, chat_call(base, true)).await;
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
            let mut body = run(&proxy, chat_call(base, true)).await;
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
            let mut body = run(&proxy, chat_call(base, false)).await;
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
            Native::Responses.classify(&ev("response.created", r#"{"type":"response.created"}"#)),
            EventClass::Lifecycle
        );
        assert_eq!(
            Native::Responses.classify(&ev(
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta"}"#
            )),
            EventClass::Start
        );
        assert_eq!(
            Native::Responses.classify(&ev(
                "error",
                r#"{"type":"error","code":"resource_unavailable"}"#
            )),
            EventClass::CapacityError
        );
        assert_eq!(
            Native::Chat.classify(
                &ev(
                    "",
                    r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#
                )
            ),
            EventClass::Lifecycle
        );
        assert_eq!(
            Native::Chat.classify(&ev(
                "",
                r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#
            )),
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
