//! The translated path: a caller format that is not the provider's own goes through the
//! canonical model. Upstream is always streamed (the race needs the start, and one code path
//! serves every pair); a non-streaming caller gets the body assembled from the stream.
//!
//! The dispatch tables below are the only place that pairs formats and providers.

use bytes::Bytes;
use flex_shared::catalog::{Provider, Tier};
use flex_shared::usage::UsageEvent;
use secrecy::SecretString;
use serde_json::Value;

use crate::answer::{Fed, Mode, Transcode};
use crate::canonical::{self as c, Accumulator, StreamEvent};
use crate::error::ApiError;
use crate::formats::{chat, interactions, messages, responses, CallerFormat, Encoder, RawBody};
use crate::providers::{anthropic, gemini, openai, AskTier, Decoder};
use crate::race::EventClass;
use crate::sse::Event;

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
) -> Result<http::Request<Bytes>, ApiError> {
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

/// A translated answer: the provider's events decoded to canonical, then encoded in the
/// caller's format (or accumulated into one body).
pub(crate) struct TranslatedTranscoder {
    format: CallerFormat,
    provider: Provider,
    mode: Mode,
    model: String,
    include_usage: bool,
    ask: AskTier,
    decoder: Box<dyn Decoder>,
    /// Made at the first event, once the provider may have said which tier serves.
    encoder: Option<Box<dyn Encoder>>,
    acc: Accumulator,
    canonical: Vec<StreamEvent>,
    finished: bool,
    failed: Option<String>,
}

impl TranslatedTranscoder {
    pub(crate) fn new(
        format: CallerFormat,
        provider: Provider,
        mode: Mode,
        model: &str,
        include_usage: bool,
        ask: AskTier,
    ) -> Self {
        Self {
            format,
            provider,
            mode,
            model: model.to_string(),
            include_usage,
            ask,
            decoder: decoder(provider),
            encoder: None,
            acc: Accumulator::default(),
            canonical: Vec::new(),
            finished: false,
            failed: None,
        }
    }

    fn served_now(&self) -> Tier {
        self.decoder
            .served_tier()
            .unwrap_or(self.ask.assumed_served())
    }

    fn encode(&mut self, e: &StreamEvent, out: &mut Vec<Event>) {
        if self.mode == Mode::Assemble {
            return;
        }
        let served = self.served_now();
        let enc = self
            .encoder
            .get_or_insert_with(|| encoder(self.format, served, &self.model, self.include_usage));
        enc.set_served(served);
        enc.encode(e, out);
    }
}

impl Transcode for TranslatedTranscoder {
    fn feed(&mut self, ev: Event, out: &mut Vec<Event>, usage: &mut UsageEvent) -> Fed {
        if self.finished || self.failed.is_some() {
            return Fed::More;
        }
        let mut canonical = std::mem::take(&mut self.canonical);
        canonical.clear();
        self.decoder.decode(&ev, &mut canonical);
        let mut fed = Fed::More;
        for e in &canonical {
            if self.mode == Mode::Assemble {
                self.acc.push(e);
            }
            match e {
                StreamEvent::Error { message, .. } => {
                    self.failed = Some(message.clone());
                    fed = Fed::Failed {
                        final_from: out.len(),
                    };
                    self.encode(e, out);
                    break;
                }
                StreamEvent::Finish { stop, usage: u } => {
                    apply(u, usage);
                    if *stop == c::StopReason::Error {
                        // e.g. Gemini `MALFORMED_FUNCTION_CALL`: no answer to give.
                        let message = format!(
                            "{} reported that it could not complete the answer (finish reason: error); retry the request",
                            self.provider
                        );
                        self.failed = Some(message.clone());
                        fed = Fed::Failed {
                            final_from: out.len(),
                        };
                        self.encode(
                            &StreamEvent::Error {
                                message,
                                code: "upstream_incomplete",
                            },
                            out,
                        );
                        break;
                    }
                    self.finished = true;
                    fed = Fed::Finished {
                        final_from: out.len(),
                    };
                    self.encode(e, out);
                }
                _ => self.encode(e, out),
            }
        }
        self.canonical = canonical;
        fed
    }

    fn served(&self) -> Option<Tier> {
        self.decoder.served_tier()
    }

    fn cut_off(&mut self, why: &str, out: &mut Vec<Event>) {
        let message = format!(
            "The provider's answer was cut off before it was complete: {why}. Retry the request."
        );
        self.encode(
            &StreamEvent::Error {
                message,
                code: "upstream_incomplete",
            },
            out,
        );
    }

    fn body(&mut self) -> Result<Value, String> {
        if let Some(why) = &self.failed {
            return Err(why.clone());
        }
        if !self.acc.finished {
            return Err(self
                .acc
                .error
                .clone()
                .unwrap_or_else(|| "the stream ended without a final event".into()));
        }
        let mut r = std::mem::take(&mut self.acc).finish();
        if r.model.is_empty() {
            r.model = self.model.clone();
        }
        Ok(render(self.format, &r, self.served_now()))
    }
}

fn apply(u: &c::Usage, e: &mut UsageEvent) {
    e.input_tokens = u.input_tokens;
    e.cached_input_tokens = u.cached_input_tokens;
    e.output_tokens = u.output_tokens;
    e.reasoning_tokens = u.reasoning_tokens;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use secrecy::SecretString;
    use tokio::time::Instant;

    use super::*;
    use crate::proxy::{Call, Pair, Plan, Proxy};
    use crate::usage::test_support::{
        complete_events, draft, fake_upstream, proxy, read_until_quiet, sse_response, GatedSink,
    };

    const QUIET: Duration = Duration::from_millis(300);

    /// Gemini's whole answer in one upstream event: text, finish reason and usage together.
    const ONE_CHUNK: &str = r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Hello there"}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2,"totalTokenCount":5},"modelVersion":"gemini-3.5-flash","responseId":"r1"}"#;

    fn call(base: String, stream: bool) -> Call {
        Call {
            format: CallerFormat::ChatCompletions,
            provider: Provider::Gemini,
            model: "gemini-3.5-flash".into(),
            base,
            secret: SecretString::from("AIza-test"),
            floor: Duration::from_millis(500),
            stream,
            pair: Pair::Translated {
                req: Box::new(c::Request {
                    model: "gemini-3.5-flash".into(),
                    messages: vec![c::Message {
                        role: c::Role::User,
                        parts: vec![c::Part::Text("hi".into())],
                    }],
                    stream,
                    ..c::Request::default()
                }),
                include_usage: true,
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

    #[tokio::test]
    async fn a_one_chunk_answer_streams_its_text_at_once_and_holds_only_the_final_events() {
        let sink = Arc::new(GatedSink::default());
        let proxy = proxy(sink.clone());
        let base = fake_upstream(sse_response(&[("", ONE_CHUNK)])).await;
        let mut body = run(&proxy, call(base, true)).await;
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
        let mut body = run(&proxy, call(base, false)).await;
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

    fn call_to(provider: Provider, model: &str, base: String, stream: bool) -> Call {
        let mut c = call(base, stream);
        c.provider = provider;
        c.model = model.into();
        if let Pair::Translated { req, .. } = &mut c.pair {
            req.model = model.into();
            req.max_output_tokens = Some(64);
        }
        c
    }

    async fn response(proxy: &Proxy, call: Call, ask: AskTier) -> axum::response::Response {
        let mut slot = Some(draft());
        proxy
            .run(&call, Plan::Direct(ask), Instant::now(), &mut slot)
            .await
            .unwrap_or_else(|e| panic!("{e:?}"))
    }

    /// An Anthropic `auto` request served on priority says so (header, body, usage event),
    /// although the tier asked for assumes standard.
    #[tokio::test]
    async fn the_served_tier_is_the_providers_report() {
        let events = [
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-8","content":[],"stop_reason":null,"usage":{"input_tokens":3,"output_tokens":1,"service_tier":"priority"}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":2}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ];
        for stream in [true, false] {
            let sink = Arc::new(GatedSink::default());
            let proxy = proxy(sink.clone());
            let base = fake_upstream(sse_response(&events)).await;
            let resp = response(
                &proxy,
                call_to(Provider::Anthropic, "claude-opus-4-8", base, stream),
                AskTier::Auto,
            )
            .await;
            assert_eq!(
                resp.headers()["x-flex-served-tier"],
                "priority",
                "stream={stream}"
            );
            let mut body = resp.into_body();
            sink.release();
            let (text, ended) = read_until_quiet(&mut body, QUIET).await;
            sink.release();
            let rest = if ended {
                String::new()
            } else {
                read_until_quiet(&mut body, Duration::from_secs(5)).await.0
            };
            let all = format!("{text}{rest}");
            assert!(
                all.contains(r#""service_tier":"priority""#),
                "stream={stream}: {all}"
            );
            assert!(
                !all.contains(r#""service_tier":"default""#),
                "stream={stream}: {all}"
            );
            assert_eq!(sink.emitted()[0].served_tier, "priority");
        }
    }

    /// Gemini's `MALFORMED_FUNCTION_CALL` ends the answer without one: an error, not "stop".
    #[tokio::test]
    async fn a_malformed_function_call_is_an_error_not_a_stop() {
        const MALFORMED: &str = r#"{"candidates":[{"content":{"role":"model","parts":[]},"finishReason":"MALFORMED_FUNCTION_CALL"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":0,"totalTokenCount":3},"modelVersion":"gemini-3.5-flash","responseId":"r2"}"#;
        for stream in [true, false] {
            let sink = Arc::new(GatedSink::default());
            let proxy = proxy(sink.clone());
            let base = fake_upstream(sse_response(&[("", MALFORMED)])).await;
            let resp = response(&proxy, call(base, stream), AskTier::Standard).await;
            let status = resp.status();
            let mut body = resp.into_body();
            sink.release();
            let (text, ended) = read_until_quiet(&mut body, QUIET).await;
            sink.release();
            let rest = if ended {
                String::new()
            } else {
                read_until_quiet(&mut body, Duration::from_secs(5)).await.0
            };
            let all = format!("{text}{rest}");
            if stream {
                assert_eq!(status, 200);
                assert!(all.contains(r#""error""#), "{all}");
                assert!(!all.contains(r#""finish_reason":"stop""#), "{all}");
                assert!(!all.contains("[DONE]"), "{all}");
            } else {
                assert_eq!(status, 502, "{all}");
                assert!(all.contains("upstream_incomplete"), "{all}");
            }
            assert_eq!(sink.emitted()[0].outcome, "incomplete");
        }
    }

    /// The whole answer, releasing the usage event's hold as it goes: (status, text).
    async fn answer_of(proxy: &Proxy, sink: &GatedSink, call: Call) -> (http::StatusCode, String) {
        let resp = response(proxy, call, AskTier::Standard).await;
        let status = resp.status();
        let mut body = resp.into_body();
        sink.release();
        let (text, ended) = read_until_quiet(&mut body, QUIET).await;
        sink.release();
        let rest = if ended {
            String::new()
        } else {
            read_until_quiet(&mut body, Duration::from_secs(5)).await.0
        };
        (status, format!("{text}{rest}"))
    }

    fn proxy_with(
        sink: Arc<GatedSink>,
        cfg: crate::proxy::ProxyConfig,
        up: crate::upstream::UpstreamConfig,
    ) -> Proxy {
        Proxy::new(
            Arc::new(crate::snapshot::SnapshotStore::new(None, None)),
            crate::upstream::UpstreamClient::new(&up).unwrap_or_else(|e| panic!("{e}")),
            cfg,
            sink,
        )
    }

    /// Gemini text chunks of `text` each, the last with the finish reason.
    fn chunks(n: usize, text: &str) -> Vec<String> {
        (0..n)
            .map(|i| {
                let finish = if i + 1 == n { r#","finishReason":"STOP""# } else { "" };
                format!(
                    r#"{{"candidates":[{{"content":{{"role":"model","parts":[{{"text":"{text}"}}]}}{finish}}}],"usageMetadata":{{"promptTokenCount":3,"candidatesTokenCount":{i},"totalTokenCount":5}},"modelVersion":"gemini-3.5-flash","responseId":"r1"}}"#
                )
            })
            .collect()
    }

    /// An assembled answer is bounded by `max_response_bytes`, like a non-streaming body: past
    /// it a 502 `upstream_incomplete` naming the limit, usage `incomplete`; under it, the body.
    #[tokio::test]
    async fn an_assembled_answer_over_the_response_limit_is_an_error() {
        let data = chunks(8, &"x".repeat(100));
        let events: Vec<(&str, &str)> = data.iter().map(|d| ("", d.as_str())).collect();
        let whole: usize = data.iter().map(String::len).sum();
        for (limit, over) in [(whole / 2, true), (whole, false)] {
            let sink = Arc::new(GatedSink::default());
            let cfg = crate::proxy::ProxyConfig {
                max_response_bytes: limit,
                ..crate::proxy::ProxyConfig::default()
            };
            let proxy = proxy_with(
                sink.clone(),
                cfg,
                crate::upstream::UpstreamConfig::default(),
            );
            let base = fake_upstream(sse_response(&events)).await;
            let (status, all) = answer_of(&proxy, &sink, call(base, false)).await;
            if over {
                assert_eq!(status, 502, "{all}");
                let v: Value = serde_json::from_str(&all).unwrap_or_else(|e| panic!("{e}: {all}"));
                assert_eq!(v["error"]["code"], "upstream_incomplete", "{all}");
                let message = v["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains(&format!("limit of {limit} bytes (--max-response-mib)")),
                    "{message}"
                );
                assert_eq!(sink.emitted()[0].outcome, "incomplete");
                assert_eq!(sink.emitted()[0].status, 502);
            } else {
                assert_eq!(status, 200, "{all}");
                assert!(all.contains(&"x".repeat(800)), "{all}");
                assert_eq!(sink.emitted()[0].outcome, "ok");
            }
        }
    }

    /// A stream event larger than `--max-sse-event-kib` cuts the answer off: the caller's error
    /// event (streaming) or a 502 (assembled), usage `incomplete`.
    #[tokio::test]
    async fn an_upstream_event_over_the_sse_bound_cuts_the_answer_off() {
        let mut data = chunks(2, "small");
        data[1] = chunks(1, &"y".repeat(4096)).remove(0);
        let events: Vec<(&str, &str)> = data.iter().map(|d| ("", d.as_str())).collect();
        for stream in [true, false] {
            let sink = Arc::new(GatedSink::default());
            let up = crate::upstream::UpstreamConfig {
                max_sse_event_bytes: 1024,
                ..crate::upstream::UpstreamConfig::default()
            };
            let proxy = proxy_with(sink.clone(), crate::proxy::ProxyConfig::default(), up);
            let base = fake_upstream(sse_response(&events)).await;
            let (status, all) = answer_of(&proxy, &sink, call(base, stream)).await;
            assert!(
                all.contains("larger than the limit of 1024 bytes (--max-sse-event-kib)"),
                "stream={stream}: {all}"
            );
            assert!(all.contains("upstream_incomplete"), "{all}");
            assert!(!all.contains(&"y".repeat(4096)), "{all}");
            if stream {
                assert_eq!(status, 200);
                assert!(
                    all.contains("small"),
                    "the event before it was streamed: {all}"
                );
                assert!(!all.contains("[DONE]"), "{all}");
            } else {
                assert_eq!(status, 502, "{all}");
            }
            assert_eq!(sink.emitted()[0].outcome, "incomplete");
        }
    }

    /// A provider index past the limit ends the answer as malformed through the whole path:
    /// the caller's error event, or a 502, and usage `incomplete`.
    #[tokio::test]
    async fn an_index_past_the_limit_fails_the_answer_through_the_proxy() {
        let mut data = chunks(2, "fine");
        data[1] = data[1].replacen(r#""content""#, r#""index":1000000000000,"content""#, 1);
        let events: Vec<(&str, &str)> = data.iter().map(|d| ("", d.as_str())).collect();
        for stream in [true, false] {
            let sink = Arc::new(GatedSink::default());
            let proxy = proxy(sink.clone());
            let base = fake_upstream(sse_response(&events)).await;
            let (status, all) = answer_of(&proxy, &sink, call(base, stream)).await;
            assert!(
                all.contains("candidate `index` 1000000000000, past the limit of 1024 items"),
                "stream={stream}: {all}"
            );
            assert!(all.contains("upstream_incomplete"), "{all}");
            assert_eq!(status, if stream { 200 } else { 502 }, "{all}");
            assert!(!all.contains("[DONE]"), "{all}");
            assert_eq!(sink.emitted()[0].outcome, "incomplete");
        }
    }
}
