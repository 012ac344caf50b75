//! OpenAI: Responses (`POST {base}/responses`) and Chat Completions (`POST {base}/chat/completions`).

use bytes::Bytes;
use flex_shared::catalog::{Provider, Tier};
use secrecy::{ExposeSecret, SecretString};

use super::AskTier;
use crate::error::ApiError;

/// The OpenAI API a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Responses,
    Chat,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::Responses => "/responses",
            Api::Chat => "/chat/completions",
        }
    }
}

/// The `service_tier` value for a tier.
pub fn tier_value(t: AskTier) -> &'static str {
    match t {
        AskTier::Flex => "flex",
        AskTier::Standard => "default",
        AskTier::Priority => "priority",
        AskTier::Auto => "auto",
    }
}

/// The tier OpenAI reports in a response's `service_tier`.
pub fn served_tier(v: &str) -> Option<Tier> {
    match v {
        "flex" => Some(Tier::Flex),
        "default" | "auto" | "scale" => Some(Tier::Standard),
        "priority" | "fast" | "ultrafast" => Some(Tier::Priority),
        _ => None,
    }
}

pub fn request(
    base: &str,
    api: Api,
    key: &SecretString,
    body: Bytes,
    stream: bool,
) -> Result<http::Request<Bytes>, ApiError> {
    let url = format!("{}{}", base.trim_end_matches('/'), api.path());
    // Sensitive: never put in HTTP/2's header compression table.
    // The header's text is wiped once copied into the header value.
    let bearer = secrecy::zeroize::Zeroizing::new(format!("Bearer {}", key.expose_secret()));
    let mut auth = http::HeaderValue::from_str(&bearer).map_err(|_| {
        ApiError::internal("the stored OpenAI key contains characters not allowed in a header")
    })?;
    auth.set_sensitive(true);
    http::Request::post(&url)
        .header(http::header::AUTHORIZATION, auth)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::ACCEPT,
            if stream {
                "text/event-stream"
            } else {
                "application/json"
            },
        )
        .body(body)
        .map_err(|e| {
            ApiError::new(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "bad_upstream_url",
                format!("The OpenAI base URL `{base}` does not form a valid request URL: {e}."),
            )
            .fix("correct --openai-base-url (e.g. https://api.openai.com/v1).")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_map_both_ways() {
        assert_eq!(tier_value(AskTier::Standard), "default");
        assert_eq!(tier_value(AskTier::Flex), "flex");
        assert_eq!(served_tier("default"), Some(Tier::Standard));
        assert_eq!(served_tier("flex"), Some(Tier::Flex));
        assert_eq!(served_tier("priority"), Some(Tier::Priority));
    }

    #[test]
    fn the_authorization_header_is_sensitive() {
        let key = SecretString::from("sk-test".to_string());
        for api in [Api::Responses, Api::Chat] {
            let http = request("http://sim:1/v1", api, &key, Bytes::new(), true).unwrap();
            let auth = &http.headers()[http::header::AUTHORIZATION];
            assert_eq!(auth, "Bearer sk-test");
            assert!(
                auth.is_sensitive(),
                "kept out of HTTP/2's header compression"
            );
        }
    }
}

// ----- translation: canonical ⇄ the Responses API -----------------------------------------

use serde_json::{json, Map, Value};

use crate::canonical::{self as c, Part, Role, StreamEvent};
use crate::providers::Decoder;
use crate::race::EventClass;
use crate::sse::Event;

fn input_content(parts: &[Part], role: Role) -> Vec<Value> {
    parts
        .iter()
        .filter_map(|p| match (p, role) {
            (Part::Text(t), Role::User) => Some(json!({"type": "input_text", "text": t})),
            (Part::Text(t), Role::Assistant) => Some(json!({"type": "output_text", "text": t, "annotations": []})),
            (Part::Image(m), _) => Some(json!({"type": "input_image", "image_url": m.to_url(), "detail": "auto"})),
            (Part::File { media, filename }, _) => Some(match media {
                c::Media::Base64 { .. } => json!({"type": "input_file", "file_data": media.to_url(), "filename": filename.clone().unwrap_or_else(|| "file.pdf".into())}),
                c::Media::Url(u) => json!({"type": "input_file", "file_url": u}),
            }),
            _ => None,
        })
        .collect()
}

/// The Responses request body for a canonical request (always streamed).
pub fn body(req: &c::Request, tier: AskTier) -> Value {
    let mut input = Vec::new();
    for m in &req.messages {
        let content = input_content(&m.parts, m.role);
        if !content.is_empty() {
            let role = if m.role == Role::User {
                "user"
            } else {
                "assistant"
            };
            input.push(json!({"type": "message", "role": role, "content": content}));
        }
        for p in &m.parts {
            match p {
                Part::ToolCall(call) => input.push(json!({"type": "function_call", "call_id": call.id, "name": call.name, "arguments": call.arguments})),
                Part::ToolResult(r) => input.push(json!({"type": "function_call_output", "call_id": r.call_id, "output": r.content})),
                // Other providers' reasoning cannot be replayed to OpenAI (it needs OpenAI's own
                // encrypted items); it is dropped, never flattened into text.
                _ => {}
            }
        }
    }
    let mut b = Map::new();
    b.insert("model".into(), json!(req.model));
    b.insert("input".into(), Value::Array(input));
    if let Some(s) = c::join_system(&req.system) {
        b.insert("instructions".into(), json!(s));
    }
    let mut tools: Vec<Value> = req
        .tools
        .iter()
        .map(|t| {
            let mut v = json!({"type": "function", "name": t.name, "parameters": t.parameters});
            if let Some(d) = &t.description {
                v["description"] = json!(d);
            }
            if let Some(s) = t.strict {
                v["strict"] = json!(s);
            }
            v
        })
        .collect();
    if req.web_search {
        tools.push(json!({"type": "web_search"}));
    }
    if !tools.is_empty() {
        b.insert("tools".into(), Value::Array(tools));
        b.insert(
            "tool_choice".into(),
            match &req.tool_choice {
                c::ToolChoice::Auto => json!("auto"),
                c::ToolChoice::None => json!("none"),
                c::ToolChoice::Required => json!("required"),
                c::ToolChoice::Tool(n) => json!({"type": "function", "name": n}),
            },
        );
    }
    if let Some(p) = req.parallel_tool_calls {
        b.insert("parallel_tool_calls".into(), json!(p));
    }
    if let Some(n) = req.max_output_tokens {
        b.insert("max_output_tokens".into(), json!(n));
    }
    if let Some(t) = req.temperature {
        b.insert("temperature".into(), json!(t));
    }
    if let Some(t) = req.top_p {
        b.insert("top_p".into(), json!(t));
    }
    match &req.response_format {
        Some(c::ResponseFormat::JsonObject) => {
            b.insert("text".into(), json!({"format": {"type": "json_object"}}));
        }
        Some(c::ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        }) => {
            let mut f = json!({"type": "json_schema", "name": name, "schema": schema});
            if let Some(s) = strict {
                f["strict"] = json!(s);
            }
            b.insert("text".into(), json!({"format": f}));
        }
        None => {}
    }
    if let Some(e) = req.reasoning {
        b.insert("reasoning".into(), json!({"effort": e.as_str()}));
    }
    if let Some(u) = &req.user {
        b.insert("safety_identifier".into(), json!(u));
    }
    b.insert("stream".into(), json!(true));
    b.insert("store".into(), json!(false));
    b.insert("service_tier".into(), json!(tier_value(tier)));
    Value::Object(b)
}

/// The streaming Responses request for a canonical request.
pub fn translated_request(
    base: &str,
    req: &c::Request,
    tier: AskTier,
    key: &SecretString,
) -> Result<http::Request<Bytes>, ApiError> {
    let bytes = serde_json::to_vec(&body(req, tier))
        .map(Bytes::from)
        .unwrap_or_default();
    request(base, Api::Responses, key, bytes, true)
}

/// How a Responses stream event counts for the race.
pub fn classify_responses(ev: &Event) -> EventClass {
    let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
        return EventClass::Lifecycle;
    };
    let t = v["type"].as_str().unwrap_or(&ev.event);
    let error = match t {
        "error" => &v,
        "response.failed" => &v["response"]["error"],
        "response.created" | "response.queued" | "response.in_progress" => {
            return EventClass::Lifecycle
        }
        _ => return EventClass::Start,
    };
    if is_capacity_code(error["code"].as_str().unwrap_or_default()) {
        EventClass::CapacityError
    } else {
        EventClass::Error
    }
}

/// OpenAI error codes that mean "no capacity now".
pub fn is_capacity_code(code: &str) -> bool {
    matches!(
        code,
        "resource_unavailable" | "rate_limit_exceeded" | "server_overloaded" | "overloaded"
    )
}

pub fn usage_of(u: &Value) -> c::Usage {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    c::Usage {
        input_tokens: n(&u["input_tokens"]),
        cached_input_tokens: n(&u["input_tokens_details"]["cached_tokens"]),
        output_tokens: n(&u["output_tokens"]),
        reasoning_tokens: n(&u["output_tokens_details"]["reasoning_tokens"]),
    }
}

/// Responses stream → canonical events. The canonical index is the provider's `output_index`,
/// so it is checked against [`c::MAX_INDEX`], and so is the number of blocks opened.
#[derive(Default)]
pub struct StreamDecoder {
    /// Output indexes whose block is open, with its kind.
    open: Vec<(usize, &'static str)>,
    /// Blocks opened so far.
    opened: usize,
    saw_call: bool,
    served: Option<Tier>,
    /// The stream was refused as malformed: the rest is ignored.
    failed: bool,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends the stream as malformed.
    fn fail(&mut self, why: String, out: &mut Vec<StreamEvent>) {
        self.failed = true;
        out.push(StreamEvent::malformed(why));
    }

    /// Opens a block at `index`, unless that is one block more than an answer may have.
    fn open_block(&mut self, index: usize, kind: &'static str, out: &mut Vec<StreamEvent>) -> bool {
        if self.opened >= c::MAX_INDEX {
            let why = c::past_limit(
                Provider::OpenAi,
                &format!("more than {} output items", c::MAX_INDEX),
            );
            self.fail(why, out);
            return false;
        }
        self.opened += 1;
        self.open.push((index, kind));
        true
    }

    /// Opens the block at `index` unless it is open; false when the stream was refused.
    fn ensure_open(
        &mut self,
        index: usize,
        kind: &'static str,
        out: &mut Vec<StreamEvent>,
    ) -> bool {
        if self.open.iter().any(|(i, _)| *i == index) {
            return true;
        }
        if !self.open_block(index, kind, out) {
            return false;
        }
        out.push(match kind {
            "reasoning" => StreamEvent::ReasoningStart { index },
            _ => StreamEvent::TextStart { index },
        });
        true
    }

    fn close(&mut self, index: usize, out: &mut Vec<StreamEvent>) {
        if let Some(pos) = self.open.iter().position(|(i, _)| *i == index) {
            self.open.remove(pos);
            out.push(StreamEvent::BlockStop { index });
        }
    }
}

impl Decoder for StreamDecoder {
    fn decode(&mut self, ev: &Event, out: &mut Vec<StreamEvent>) {
        if self.failed {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return;
        };
        let t = v["type"].as_str().unwrap_or(&ev.event).to_string();
        let index = v["output_index"].as_u64().unwrap_or(0);
        let index = match c::bounded_index(Provider::OpenAi, "`output_index`", index) {
            Ok(i) => i,
            Err(why) => return self.fail(why, out),
        };
        match t.as_str() {
            "response.created" => {
                let r = &v["response"];
                if let Some(s) = r["service_tier"].as_str().and_then(served_tier) {
                    self.served = Some(s);
                }
                out.push(StreamEvent::Start {
                    id: r["id"].as_str().unwrap_or_default().to_string(),
                    model: r["model"].as_str().unwrap_or_default().to_string(),
                    created: r["created_at"].as_u64().unwrap_or(0),
                    provider: Some(Provider::OpenAi),
                });
            }
            "response.output_item.added" => {
                let item = &v["item"];
                match item["type"].as_str() {
                    Some("function_call") => {
                        self.saw_call = true;
                        if !self.open_block(index, "tool", out) {
                            return;
                        }
                        out.push(StreamEvent::ToolCallStart {
                            index,
                            id: item["call_id"].as_str().unwrap_or_default().to_string(),
                            name: item["name"].as_str().unwrap_or_default().to_string(),
                            signature: None,
                        });
                    }
                    Some("reasoning") => {
                        self.ensure_open(index, "reasoning", out);
                    }
                    _ => {}
                }
            }
            "response.output_text.delta" | "response.refusal.delta" => {
                if !self.ensure_open(index, "text", out) {
                    return;
                }
                out.push(StreamEvent::TextDelta {
                    index,
                    text: v["delta"].as_str().unwrap_or_default().to_string(),
                });
            }
            "response.function_call_arguments.delta" => {
                out.push(StreamEvent::ToolCallDelta {
                    index,
                    arguments: v["delta"].as_str().unwrap_or_default().to_string(),
                });
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                if !self.ensure_open(index, "reasoning", out) {
                    return;
                }
                out.push(StreamEvent::ReasoningDelta {
                    index,
                    text: v["delta"].as_str().unwrap_or_default().to_string(),
                });
            }
            "response.output_item.done" => self.close(index, out),
            "response.completed" | "response.incomplete" | "response.failed" => {
                let r = &v["response"];
                for (i, _) in std::mem::take(&mut self.open) {
                    out.push(StreamEvent::BlockStop { index: i });
                }
                if let Some(s) = r["service_tier"].as_str().and_then(served_tier) {
                    self.served = Some(s);
                }
                let stop = match (t.as_str(), r["incomplete_details"]["reason"].as_str()) {
                    ("response.failed", _) => c::StopReason::Error,
                    (_, Some("max_output_tokens")) => c::StopReason::MaxTokens,
                    (_, Some("content_filter")) => c::StopReason::ContentFilter,
                    _ if self.saw_call => c::StopReason::ToolUse,
                    _ => c::StopReason::EndTurn,
                };
                if t == "response.failed" {
                    out.push(StreamEvent::Error {
                        code: "upstream_error",
                        message: r["error"]["message"]
                            .as_str()
                            .unwrap_or("the provider failed")
                            .to_string(),
                    });
                }
                out.push(StreamEvent::Finish {
                    stop,
                    usage: usage_of(&r["usage"]),
                });
            }
            "error" => out.push(StreamEvent::Error {
                code: "upstream_error",
                message: v["message"]
                    .as_str()
                    .unwrap_or("provider error")
                    .to_string(),
            }),
            _ => {}
        }
    }

    fn served_tier(&self) -> Option<Tier> {
        self.served
    }
}

#[cfg(test)]
mod translation_tests {
    use super::*;
    use crate::canonical::{Accumulator, Message, Request, ToolCall, ToolResult};

    #[test]
    fn golden_request_with_system_tools_results_and_images() {
        let req = Request {
            model: "gpt-5.5".into(),
            system: vec!["Be terse.".into(), "Answer in French.".into()],
            messages: vec![
                Message {
                    role: Role::User,
                    parts: vec![
                        Part::Text("Weather?".into()),
                        Part::Image(c::Media::from_url("data:image/png;base64,AAAA")),
                    ],
                },
                Message {
                    role: Role::Assistant,
                    parts: vec![Part::ToolCall(ToolCall {
                        id: "call_1".into(),
                        name: "get_weather".into(),
                        arguments: "{\"city\":\"Paris\"}".into(),
                        signature: None,
                    })],
                },
                Message {
                    role: Role::User,
                    parts: vec![Part::ToolResult(ToolResult {
                        call_id: "call_1".into(),
                        name: None,
                        content: "sunny".into(),
                        is_error: false,
                    })],
                },
            ],
            tools: vec![c::Tool {
                name: "get_weather".into(),
                description: Some("d".into()),
                parameters: json!({"type": "object"}),
                strict: None,
            }],
            tool_choice: c::ToolChoice::Tool("get_weather".into()),
            max_output_tokens: Some(100),
            response_format: Some(c::ResponseFormat::JsonSchema {
                name: "w".into(),
                schema: json!({"type": "object"}),
                strict: Some(true),
            }),
            reasoning: Some(c::Effort::Low),
            web_search: true,
            ..Request::default()
        };
        let b = body(&req, AskTier::Flex);
        assert_eq!(b["instructions"], "Be terse.\n\nAnswer in French.");
        assert_eq!(
            b["input"][0]["content"][1],
            json!({"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"})
        );
        assert_eq!(
            b["input"][1],
            json!({"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"})
        );
        assert_eq!(
            b["input"][2],
            json!({"type": "function_call_output", "call_id": "call_1", "output": "sunny"})
        );
        assert_eq!(b["tools"][1], json!({"type": "web_search"}));
        assert_eq!(
            b["tool_choice"],
            json!({"type": "function", "name": "get_weather"})
        );
        assert_eq!(b["text"]["format"]["type"], "json_schema");
        assert_eq!(b["reasoning"]["effort"], "low");
        assert_eq!(
            (b["service_tier"].as_str(), b["stream"].as_bool()),
            (Some("flex"), Some(true))
        );
    }

    #[test]
    fn decodes_text_and_tool_call_streams_with_usage() {
        let events = [
            (
                "response.created",
                json!({"type": "response.created", "response": {"id": "resp_1", "model": "gpt-5.5", "created_at": 5, "service_tier": "flex"}}),
            ),
            (
                "response.output_item.added",
                json!({"type": "response.output_item.added", "output_index": 0, "item": {"type": "message"}}),
            ),
            (
                "response.output_text.delta",
                json!({"type": "response.output_text.delta", "output_index": 0, "delta": "Hi"}),
            ),
            (
                "response.output_item.done",
                json!({"type": "response.output_item.done", "output_index": 0}),
            ),
            (
                "response.output_item.added",
                json!({"type": "response.output_item.added", "output_index": 1, "item": {"type": "function_call", "call_id": "call_9", "name": "f"}}),
            ),
            (
                "response.function_call_arguments.delta",
                json!({"type": "response.function_call_arguments.delta", "output_index": 1, "delta": "{\"a\""}),
            ),
            (
                "response.function_call_arguments.delta",
                json!({"type": "response.function_call_arguments.delta", "output_index": 1, "delta": ":1}"}),
            ),
            (
                "response.output_item.done",
                json!({"type": "response.output_item.done", "output_index": 1}),
            ),
            (
                "response.completed",
                json!({"type": "response.completed", "response": {"service_tier": "flex", "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 2}}}}),
            ),
        ];
        let mut d = StreamDecoder::new();
        let mut out = Vec::new();
        for (name, data) in events {
            d.decode(&Event::new(name, data.to_string()), &mut out);
        }
        let mut acc = Accumulator::default();
        out.iter().for_each(|e| acc.push(e));
        let r = acc.finish();
        assert_eq!(r.content[0], Part::Text("Hi".into()));
        assert_eq!(
            r.content[1],
            Part::ToolCall(ToolCall {
                id: "call_9".into(),
                name: "f".into(),
                arguments: "{\"a\":1}".into(),
                signature: None
            })
        );
        assert_eq!(r.stop, c::StopReason::ToolUse);
        assert_eq!(
            r.usage,
            c::Usage {
                input_tokens: 10,
                cached_input_tokens: 4,
                output_tokens: 7,
                reasoning_tokens: 2
            }
        );
        assert_eq!(d.served_tier(), Some(Tier::Flex));
    }

    /// The canonical events a Responses stream decodes to.
    fn decode_all(events: &[Value]) -> Vec<StreamEvent> {
        let mut d = StreamDecoder::new();
        let mut out = Vec::new();
        for v in events {
            let name = v["type"].as_str().unwrap_or_default();
            d.decode(&Event::new(name, v.to_string()), &mut out);
        }
        out
    }

    fn refused(out: &[StreamEvent]) -> Option<&str> {
        out.iter().find_map(|e| match e {
            StreamEvent::Error {
                message,
                code: "upstream_incomplete",
            } => Some(message.as_str()),
            _ => None,
        })
    }

    /// An `output_index` past the limit ends the stream as malformed (no block, no allocation
    /// by the index), and nothing after it is decoded.
    #[test]
    fn an_output_index_past_the_limit_is_an_error() {
        for n in [1_000_000_000_000_u64, 1025, c::MAX_INDEX as u64] {
            for first in [
                json!({"type": "response.output_text.delta", "output_index": n, "delta": "Hi"}),
                json!({"type": "response.output_item.added", "output_index": n, "item": {"type": "function_call", "call_id": "c", "name": "f"}}),
                json!({"type": "response.function_call_arguments.delta", "output_index": n, "delta": "{}"}),
                json!({"type": "response.reasoning_text.delta", "output_index": n, "delta": "hm"}),
            ] {
                let out = decode_all(&[
                    first.clone(),
                    json!({"type": "response.output_text.delta", "output_index": 0, "delta": "later"}),
                    json!({"type": "response.completed", "response": {"usage": {}}}),
                ]);
                let why = refused(&out).unwrap_or_else(|| panic!("{n} {first}: {out:?}"));
                assert!(why.contains(&format!("`output_index` {n}")), "{why}");
                assert_eq!(out.len(), 1, "nothing after the error: {out:?}");
            }
        }
        let ok = decode_all(&[
            json!({"type": "response.output_text.delta", "output_index": c::MAX_INDEX - 1, "delta": "Hi"}),
        ]);
        assert!(refused(&ok).is_none(), "{ok:?}");
    }

    /// More blocks than an answer may have (here the same index reopened) is an error too.
    #[test]
    fn more_output_items_than_the_limit_is_an_error() {
        let mut events = Vec::new();
        for _ in 0..=c::MAX_INDEX {
            events.push(json!({"type": "response.output_item.added", "output_index": 3, "item": {"type": "function_call", "call_id": "c", "name": "f"}}));
        }
        let out = decode_all(&events);
        let why = refused(&out).unwrap_or_else(|| panic!("{:?}", out.last()));
        assert!(why.contains("more than 1024 output items"), "{why}");
        assert_eq!(out.len(), c::MAX_INDEX + 1);
    }

    #[test]
    fn classifies_capacity_errors() {
        assert_eq!(
            classify_responses(&Event::new(
                "response.created",
                r#"{"type":"response.created"}"#
            )),
            EventClass::Lifecycle
        );
        assert_eq!(
            classify_responses(&Event::new(
                "error",
                r#"{"type":"error","code":"resource_unavailable"}"#
            )),
            EventClass::CapacityError
        );
        assert_eq!(
            classify_responses(&Event::new(
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta"}"#
            )),
            EventClass::Start
        );
    }
}
