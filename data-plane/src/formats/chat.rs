//! Chat Completions (`/v1/chat/completions`): validation and assembling a `chat.completion` from
//! `chat.completion.chunk` events.

use serde_json::{json, Map, Value};

use super::RawBody;
use crate::error::ApiError;

type Check = (&'static str, fn(&Value) -> bool);

/// Parameters with no match on the models we route: refused only when set to a real value.
pub fn validate(body: &RawBody) -> Result<(), ApiError> {
    let checks: [Check; 11] = [
        ("presence_penalty", |v| v.as_f64().is_some_and(|x| x != 0.0)),
        ("frequency_penalty", |v| {
            v.as_f64().is_some_and(|x| x != 0.0)
        }),
        ("logit_bias", |v| {
            v.as_object().is_some_and(|m| !m.is_empty())
        }),
        ("logprobs", |v| v.as_bool() == Some(true)),
        ("top_logprobs", |v| v.as_u64().is_some_and(|n| n > 0)),
        ("seed", |v| !v.is_null()),
        ("stop", |v| match v {
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Null => false,
            _ => true,
        }),
        ("prediction", |v| !v.is_null()),
        ("audio", |v| !v.is_null()),
        ("web_search_options", |v| !v.is_null()),
        ("n", |v| v.as_u64().is_some_and(|n| n > 1)),
    ];
    for (name, is_real) in checks {
        if let Some(v) = body.value(name) {
            if is_real(&v) {
                return Err(unsupported(name));
            }
        }
    }
    if let Some(Value::Array(m)) = body.value("modalities") {
        if m.iter().any(|x| x.as_str() != Some("text")) {
            return Err(unsupported("modalities"));
        }
    }
    Ok(())
}

fn unsupported(name: &str) -> ApiError {
    let hint = match name {
        "web_search_options" => " For web search, use the Responses API with a web_search tool.",
        "n" => " Send separate requests for several completions.",
        "modalities" => " Only text output is routed.",
        _ => "",
    };
    ApiError::bad_request(
        "unsupported_parameter",
        format!(
            "The Chat Completions parameter `{name}` is set, but it has no match on the models FlexInference routes.{hint}"
        ),
    )
    .param(name.to_string())
    .fix(format!("remove `{name}` (or leave it at its default) and resend."))
    .example(r#"{"model": "gpt-5.5", "messages": [{"role": "user", "content": "Hello!"}], "start_within": "00h-00m-30s"}"#)
}

/// Whether a chunk carries content (the upstream has started answering).
pub fn chunk_has_content(chunk: &Value) -> bool {
    chunk["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|c| {
            let d = &c["delta"];
            d["content"].as_str().is_some_and(|s| !s.is_empty())
                || d["refusal"].as_str().is_some_and(|s| !s.is_empty())
                || d["tool_calls"].as_array().is_some_and(|t| !t.is_empty())
                || d["reasoning_content"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty())
                || !c["finish_reason"].is_null()
        })
    })
}

/// Builds a `chat.completion` body from the chunks of a stream. The chunks' choice and tool-call
/// `index`es size its lists, so both are checked against [`crate::canonical::MAX_INDEX`].
#[derive(Default)]
pub struct Assembler {
    base: Option<Value>,
    choices: Vec<ChoiceAcc>,
    usage: Option<Value>,
    service_tier: Option<Value>,
}

#[derive(Default)]
struct ChoiceAcc {
    role: String,
    content: String,
    refusal: Option<String>,
    tool_calls: Vec<Value>,
    finish_reason: Value,
}

impl Assembler {
    /// Adds one chunk; an `index` past [`crate::canonical::MAX_INDEX`] is refused (why), and the
    /// chunk is not applied.
    pub fn push(&mut self, chunk: &Value) -> Result<(), String> {
        if self.base.is_none() {
            self.base = Some(chunk.clone());
        }
        if !chunk["usage"].is_null() {
            self.usage = Some(chunk["usage"].clone());
        }
        if !chunk["service_tier"].is_null() {
            self.service_tier = Some(chunk["service_tier"].clone());
        }
        let Some(choices) = chunk["choices"].as_array() else {
            return Ok(());
        };
        let index = |v: &Value, what: &str| {
            crate::canonical::bounded_index(
                Provider::OpenAi,
                what,
                v["index"].as_u64().unwrap_or(0),
            )
        };
        for c in choices {
            let idx = index(c, "a choice `index`")?;
            if let Some(calls) = c["delta"]["tool_calls"].as_array() {
                for tc in calls {
                    index(tc, "a tool call `index`")?;
                }
            }
            if self.choices.len() <= idx {
                self.choices.resize_with(idx + 1, ChoiceAcc::default);
            }
            let acc = &mut self.choices[idx];
            let d = &c["delta"];
            if let Some(r) = d["role"].as_str() {
                acc.role = r.to_string();
            }
            if let Some(t) = d["content"].as_str() {
                acc.content.push_str(t);
            }
            if let Some(t) = d["refusal"].as_str() {
                acc.refusal.get_or_insert_with(String::new).push_str(t);
            }
            if let Some(calls) = d["tool_calls"].as_array() {
                for tc in calls {
                    let ti = index(tc, "a tool call `index`")?;
                    while acc.tool_calls.len() <= ti {
                        acc.tool_calls.push(json!({"id": "", "type": "function", "function": {"name": "", "arguments": ""}}));
                    }
                    let slot = &mut acc.tool_calls[ti];
                    if let Some(id) = tc["id"].as_str() {
                        slot["id"] = json!(id);
                    }
                    if let Some(n) = tc["function"]["name"].as_str() {
                        let name =
                            format!("{}{}", slot["function"]["name"].as_str().unwrap_or(""), n);
                        slot["function"]["name"] = json!(name);
                    }
                    if let Some(a) = tc["function"]["arguments"].as_str() {
                        let args = format!(
                            "{}{}",
                            slot["function"]["arguments"].as_str().unwrap_or(""),
                            a
                        );
                        slot["function"]["arguments"] = json!(args);
                    }
                }
            }
            if !c["finish_reason"].is_null() {
                acc.finish_reason = c["finish_reason"].clone();
            }
        }
        Ok(())
    }

    pub fn usage(&self) -> Option<&Value> {
        self.usage.as_ref()
    }

    pub fn finish(self) -> Value {
        let base = self.base.unwrap_or(Value::Null);
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let mut msg = Map::new();
                msg.insert("role".into(), json!(if c.role.is_empty() { "assistant" } else { c.role.as_str() }));
                msg.insert(
                    "content".into(),
                    if c.content.is_empty() && !c.tool_calls.is_empty() { Value::Null } else { json!(c.content) },
                );
                msg.insert("refusal".into(), c.refusal.map_or(Value::Null, Value::String));
                if !c.tool_calls.is_empty() {
                    msg.insert("tool_calls".into(), Value::Array(c.tool_calls));
                }
                json!({"index": i, "message": msg, "logprobs": null, "finish_reason": c.finish_reason})
            })
            .collect();
        let mut out = json!({
            "id": base["id"],
            "object": "chat.completion",
            "created": base["created"],
            "model": base["model"],
            "choices": choices,
        });
        if let Some(fp) = base.get("system_fingerprint") {
            out["system_fingerprint"] = fp.clone();
        }
        out["service_tier"] = self.service_tier.unwrap_or(Value::Null);
        if let Some(u) = self.usage {
            out["usage"] = u;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::formats::CallerFormat;

    fn body(s: &str) -> RawBody {
        RawBody::parse(s.as_bytes(), CallerFormat::ChatCompletions).unwrap()
    }

    #[test]
    fn defaults_pass_and_real_values_are_refused() {
        assert!(validate(&body(r#"{"presence_penalty":0,"frequency_penalty":0.0,"logit_bias":{},"logprobs":false,"top_logprobs":0,"seed":null,"stop":null,"n":1,"modalities":["text"],"audio":null}"#)).is_ok());
        for (f, v) in [
            ("presence_penalty", "0.5"),
            ("frequency_penalty", "-1"),
            ("logit_bias", r#"{"50256":-100}"#),
            ("logprobs", "true"),
            ("top_logprobs", "3"),
            ("seed", "7"),
            ("stop", r#"["\n"]"#),
            ("stop", r#""END""#),
            ("prediction", r#"{"type":"content","content":"x"}"#),
            ("audio", r#"{"voice":"alloy"}"#),
            ("web_search_options", "{}"),
            ("n", "2"),
            ("modalities", r#"["text","audio"]"#),
        ] {
            let e = validate(&body(&format!(r#"{{"{f}":{v}}}"#))).unwrap_err();
            assert_eq!(e.code, "unsupported_parameter", "{f}");
            assert_eq!(e.param.as_deref(), Some(f));
        }
    }

    #[test]
    fn assembles_text_tool_calls_and_usage() {
        let mut a = Assembler::default();
        for c in [
            json!({"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","service_tier":"flex","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\""}}]},"finish_reason":null}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]},"finish_reason":"tool_calls"}]}),
            json!({"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}),
        ] {
            a.push(&c).unwrap();
        }
        let out = a.finish();
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["service_tier"], "flex");
        assert_eq!(out["choices"][0]["message"]["content"], "Hello");
        assert_eq!(
            out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out["usage"]["total_tokens"], 5);
    }

    /// A choice or tool-call `index` past the limit is refused, never a list that long.
    #[test]
    fn an_index_past_the_limit_is_an_error() {
        for n in [
            1_000_000_000_000_u64,
            1025,
            crate::canonical::MAX_INDEX as u64,
        ] {
            for chunk in [
                json!({"id":"c1","choices":[{"index":n,"delta":{"content":"Hi"},"finish_reason":null}]}),
                json!({"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":n,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]},"finish_reason":null}]}),
            ] {
                let mut a = Assembler::default();
                let why = a.push(&chunk).unwrap_err();
                assert!(why.contains(&format!("`index` {n}")), "{why}");
                assert!(a.choices.is_empty(), "the chunk is not applied");
            }
        }
        let mut a = Assembler::default();
        a.push(
            &json!({"choices":[{"index":crate::canonical::MAX_INDEX - 1,"delta":{"content":"x"}}]}),
        )
        .unwrap();
    }

    #[test]
    fn role_only_chunks_are_not_content() {
        assert!(!chunk_has_content(
            &json!({"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]})
        ));
        assert!(chunk_has_content(
            &json!({"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]})
        ));
    }
}

// ----- translation: the Chat Completions caller format ⇄ canonical ------------------------

use flex_shared::catalog::{Provider, Tier};

use super::{openai_tier_name, Encoder};
use crate::canonical::{self as c, Message, Part, Role, StreamEvent};
use crate::ids;
use crate::sse::Event;

fn invalid(param: &str, why: String) -> ApiError {
    ApiError::bad_request("invalid_request", why)
        .param(param.to_string())
        .fix("follow the Chat Completions shape for this field.")
        .example(r#""messages": [{"role": "user", "content": "Hello!"}]"#)
}

fn parts_of(content: &Value, param: &str) -> Result<Vec<Part>, ApiError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![Part::Text(s.clone())]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, p)| match p["type"].as_str() {
                Some("text") => Ok(Part::Text(p["text"].as_str().unwrap_or_default().to_string())),
                Some("refusal") => Ok(Part::Text(p["refusal"].as_str().unwrap_or_default().to_string())),
                Some("image_url") => Ok(Part::Image(c::Media::from_url(p["image_url"]["url"].as_str().unwrap_or_default()))),
                Some("file") => match p["file"]["file_data"].as_str() {
                    Some(d) => Ok(Part::File { media: c::Media::from_url(d), filename: p["file"]["filename"].as_str().map(str::to_string) }),
                    None => Err(ApiError::bad_request("unsupported_parameter", format!("`{param}[{i}].file` has no `file_data`; a `file_id` refers to OpenAI's file store and cannot be sent to another provider."))
                        .param(format!("{param}[{i}]"))
                        .fix("send the file inline as a base64 data URL in `file_data`.")
                        .example(r#"{"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,..."}}"#)),
                },
                other => Err(invalid(&format!("{param}[{i}]"), format!("content part type {other:?} is not supported."))),
            })
            .collect(),
        _ => Err(invalid(param, format!("`{param}` must be a string or an array of content parts."))),
    }
}

fn push(messages: &mut Vec<Message>, role: Role, parts: Vec<Part>) {
    match messages.last_mut() {
        Some(last) if last.role == role => last.parts.extend(parts),
        _ => messages.push(Message { role, parts }),
    }
}

/// A Chat Completions request as canonical (for a non-OpenAI model). `validate` ran already.
pub fn parse_request(body: &RawBody) -> Result<c::Request, ApiError> {
    let mut req = c::Request {
        model: body.str_field("model").unwrap_or_default(),
        ..c::Request::default()
    };
    let Some(Value::Array(messages)) = body.value("messages") else {
        return Err(invalid(
            "messages",
            "Missing required parameter `messages` (an array of {role, content}).".into(),
        ));
    };
    for (i, m) in messages.iter().enumerate() {
        let here = format!("messages[{i}]");
        match m["role"].as_str() {
            Some("system" | "developer") => {
                req.system.extend(
                    parts_of(&m["content"], &format!("{here}.content"))?
                        .into_iter()
                        .filter_map(|p| if let Part::Text(t) = p { Some(t) } else { None }),
                );
            }
            Some("user") => push(
                &mut req.messages,
                Role::User,
                parts_of(&m["content"], &format!("{here}.content"))?,
            ),
            Some("assistant") => {
                let mut parts = parts_of(&m["content"], &format!("{here}.content"))?;
                if let Some(calls) = m["tool_calls"].as_array() {
                    for call in calls {
                        parts.push(Part::ToolCall(c::ToolCall {
                            id: call["id"].as_str().unwrap_or_default().to_string(),
                            name: call["function"]["name"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                            arguments: call["function"]["arguments"]
                                .as_str()
                                .unwrap_or("{}")
                                .to_string(),
                            signature: None,
                        }));
                    }
                }
                push(&mut req.messages, Role::Assistant, parts);
            }
            Some("tool") => {
                let call_id = m["tool_call_id"].as_str().unwrap_or_default().to_string();
                let content = parts_of(&m["content"], &format!("{here}.content"))?
                    .into_iter()
                    .filter_map(|p| if let Part::Text(t) = p { Some(t) } else { None })
                    .collect::<Vec<_>>()
                    .join("");
                // Trap 3: Chat tool messages carry no name; Gemini needs it, so look it up.
                let name = c::call_name(&req.messages, &call_id);
                push(
                    &mut req.messages,
                    Role::User,
                    vec![Part::ToolResult(c::ToolResult {
                        call_id,
                        name,
                        content,
                        is_error: false,
                    })],
                );
            }
            other => {
                return Err(invalid(
                    &here,
                    format!(
                    "`{here}.role` is {other:?}; use system, developer, user, assistant or tool."
                ),
                ))
            }
        }
    }
    if let Some(Value::Array(tools)) = body.value("tools") {
        for t in &tools {
            let f = &t["function"];
            req.tools.push(c::Tool {
                name: f["name"].as_str().unwrap_or_default().to_string(),
                description: f["description"].as_str().map(str::to_string),
                parameters: f
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                strict: f["strict"].as_bool(),
            });
        }
    }
    req.tool_choice = match body.value("tool_choice") {
        Some(Value::String(s)) if s == "none" => c::ToolChoice::None,
        Some(Value::String(s)) if s == "required" => c::ToolChoice::Required,
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f["name"].as_str())
            .map_or(c::ToolChoice::Required, |n| {
                c::ToolChoice::Tool(n.to_string())
            }),
        _ => c::ToolChoice::Auto,
    };
    req.parallel_tool_calls = body.bool_field("parallel_tool_calls");
    req.max_output_tokens = body
        .value("max_completion_tokens")
        .or_else(|| body.value("max_tokens"))
        .and_then(|v| v.as_u64());
    req.temperature = body.value("temperature").and_then(|v| v.as_f64());
    req.top_p = body.value("top_p").and_then(|v| v.as_f64());
    req.response_format = body
        .value("response_format")
        .and_then(|f| match f["type"].as_str() {
            Some("json_schema") => Some(c::ResponseFormat::JsonSchema {
                name: f["json_schema"]["name"]
                    .as_str()
                    .unwrap_or("response")
                    .to_string(),
                schema: f["json_schema"]["schema"].clone(),
                strict: f["json_schema"]["strict"].as_bool(),
            }),
            Some("json_object") => Some(c::ResponseFormat::JsonObject),
            _ => None,
        });
    req.reasoning = body
        .str_field("reasoning_effort")
        .as_deref()
        .and_then(c::Effort::parse);
    req.user = body
        .str_field("safety_identifier")
        .or_else(|| body.str_field("user"));
    req.stream = body.bool_field("stream").unwrap_or(false);
    Ok(req)
}

fn finish_reason(stop: c::StopReason) -> &'static str {
    match stop {
        c::StopReason::MaxTokens => "length",
        c::StopReason::ToolUse => "tool_calls",
        c::StopReason::ContentFilter | c::StopReason::Refusal => "content_filter",
        _ => "stop",
    }
}

fn usage_json(u: &c::Usage) -> Value {
    json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total(),
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    })
}

fn completion_id(id: &str) -> String {
    if id.starts_with("chatcmpl-") {
        id.to_string()
    } else {
        format!("chatcmpl-{id}")
    }
}

/// A canonical response as a `chat.completion`.
pub fn render_response(r: &c::Response, served: Tier) -> Value {
    let text: String = r
        .content
        .iter()
        .filter_map(|p| {
            if let Part::Text(t) = p {
                Some(t.as_str())
            } else {
                None
            }
        })
        .collect();
    let calls: Vec<Value> = r
        .content
        .iter()
        .filter_map(|p| match p {
            Part::ToolCall(call) => Some(json!({"id": ids::for_chat(&call.id), "type": "function", "function": {"name": call.name, "arguments": call.arguments}})),
            _ => None,
        })
        .collect();
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }, "refusal": null});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({
        "id": completion_id(&r.id),
        "object": "chat.completion",
        "created": r.created,
        "model": r.model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason(r.stop)}],
        "service_tier": openai_tier_name(served, r.provider),
        "usage": usage_json(&r.usage),
    })
}

/// Canonical events → `chat.completion.chunk`s, then `[DONE]`.
pub struct StreamEncoder {
    served: Tier,
    /// The provider answering, from `Start` (how the tier is named).
    provider: Option<Provider>,
    model: String,
    id: String,
    created: u64,
    include_usage: bool,
    /// Canonical block index → tool-call index, for tool-call blocks.
    calls: Vec<usize>,
}

impl StreamEncoder {
    pub fn new(served: Tier, model: &str, include_usage: bool) -> Self {
        Self {
            served,
            provider: None,
            model: model.to_string(),
            id: String::new(),
            created: 0,
            include_usage,
            calls: Vec::new(),
        }
    }

    fn chunk(&self, choices: Value) -> Event {
        Event::new("", json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "service_tier": openai_tier_name(self.served, self.provider), "choices": choices}).to_string())
    }

    fn delta(&self, delta: Value) -> Event {
        self.chunk(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]))
    }
}

impl Encoder for StreamEncoder {
    fn set_served(&mut self, served: Tier) {
        self.served = served;
    }

    fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<Event>) {
        match ev {
            StreamEvent::Start {
                id,
                model,
                created,
                provider,
            } => {
                self.id = completion_id(if id.is_empty() { "flex" } else { id });
                self.provider = *provider;
                if !model.is_empty() {
                    self.model = model.clone();
                }
                self.created = *created;
                out.push(self.delta(json!({"role": "assistant", "content": ""})));
            }
            StreamEvent::TextDelta { text, .. } => out.push(self.delta(json!({"content": text}))),
            StreamEvent::ToolCallStart {
                index, id, name, ..
            } => {
                self.calls.push(*index);
                let k = self.calls.len() - 1;
                out.push(self.delta(json!({"tool_calls": [{"index": k, "id": ids::for_chat(id), "type": "function", "function": {"name": name, "arguments": ""}}]})));
            }
            StreamEvent::ToolCallDelta { index, arguments } => {
                if let Some(k) = self.calls.iter().position(|i| i == index) {
                    out.push(self.delta(
                        json!({"tool_calls": [{"index": k, "function": {"arguments": arguments}}]}),
                    ));
                }
            }
            // Chat Completions has no reasoning content; blocks open and close implicitly.
            StreamEvent::TextStart { .. }
            | StreamEvent::ReasoningStart { .. }
            | StreamEvent::ReasoningDelta { .. }
            | StreamEvent::ReasoningSignature { .. }
            | StreamEvent::BlockStop { .. } => {}
            StreamEvent::Finish { stop, usage } => {
                out.push(self.chunk(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(*stop)}])));
                if self.include_usage {
                    let mut last = self.chunk(json!([]));
                    if let Ok(mut v) = serde_json::from_str::<Value>(&last.data) {
                        v["usage"] = usage_json(usage);
                        last = Event::new("", v.to_string());
                    }
                    out.push(last);
                }
                out.push(Event::new("", "[DONE]"));
            }
            StreamEvent::Error { message, code } => {
                out.push(Event::new("", json!({"error": {"message": message, "type": "api_error", "param": null, "code": code}}).to_string()));
            }
        }
    }
}

#[cfg(test)]
mod translation_tests {
    use super::*;
    use crate::formats::CallerFormat;

    fn body(v: Value) -> RawBody {
        RawBody::parse(v.to_string().as_bytes(), CallerFormat::ChatCompletions)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn trap_3_parallel_tool_messages_become_one_user_turn_with_names() {
        let r = parse_request(&body(json!({"model": "claude-opus-4-8", "messages": [
            {"role": "system", "content": "S1"}, {"role": "developer", "content": "S2"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "w", "arguments": "{}"}},
                {"id": "call_b", "type": "function", "function": {"name": "t", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_a", "content": "1"},
            {"role": "tool", "tool_call_id": "call_b", "content": "2"}],
            "max_completion_tokens": 50, "reasoning_effort": "medium",
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": true}}}))).unwrap();
        assert_eq!(r.system, vec!["S1", "S2"]);
        assert_eq!(r.messages.len(), 3);
        assert_eq!(
            r.messages[0].parts[1],
            Part::Image(c::Media::Base64 {
                mime: "image/jpeg".into(),
                data: "/9j/".into()
            })
        );
        assert_eq!(r.messages[2].parts.len(), 2);
        let Part::ToolResult(b) = &r.messages[2].parts[1] else {
            panic!()
        };
        assert_eq!(b.name.as_deref(), Some("t"));
        assert_eq!(r.max_output_tokens, Some(50));
        assert_eq!(r.reasoning, Some(c::Effort::Medium));
    }

    #[test]
    fn trap_6_usage_totals_in_chat_terms() {
        let r = c::Response {
            id: "x".into(),
            model: "m".into(),
            content: vec![Part::Text("ok".into())],
            usage: c::Usage {
                input_tokens: 100,
                cached_input_tokens: 40,
                output_tokens: 30,
                reasoning_tokens: 10,
            },
            ..c::Response::default()
        };
        let v = render_response(&r, Tier::Standard);
        assert_eq!(
            v["usage"]["prompt_tokens"], 100,
            "prompt_tokens includes cached"
        );
        assert_eq!(
            v["usage"]["completion_tokens"], 30,
            "completion_tokens includes reasoning"
        );
        assert_eq!(v["usage"]["total_tokens"], 130);
        assert_eq!(v["service_tier"], "default");
    }

    #[test]
    fn trap_7_stream_tool_arguments_keyed_by_index_and_final_usage_is_real() {
        let r = c::Response {
            id: "x".into(),
            model: "m".into(),
            content: vec![
                Part::ToolCall(c::ToolCall {
                    id: "toolu_".to_string() + &"z".repeat(50),
                    name: "f".into(),
                    arguments: "{\"a\":1}".into(),
                    signature: None,
                }),
                Part::ToolCall(c::ToolCall {
                    id: "call_2".into(),
                    name: "g".into(),
                    arguments: "{}".into(),
                    signature: None,
                }),
            ],
            stop: c::StopReason::ToolUse,
            usage: c::Usage {
                input_tokens: 5,
                cached_input_tokens: 0,
                output_tokens: 9,
                reasoning_tokens: 0,
            },
            created: 3,
            provider: None,
        };
        let mut enc = StreamEncoder::new(Tier::Flex, "m", true);
        let mut out = Vec::new();
        c::events_of(&r)
            .iter()
            .for_each(|e| enc.encode(e, &mut out));
        assert_eq!(out.last().unwrap().data, "[DONE]");
        let chunks: Vec<Value> = out[..out.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect();
        let mut asm = Assembler::default();
        chunks.iter().for_each(|c| asm.push(c).unwrap());
        let done = asm.finish();
        let calls = done["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap();
        assert_eq!(calls.len(), 2);
        assert!(
            calls[0]["id"].as_str().unwrap().len() <= 40,
            "trap 1: Chat ids fit 40 chars"
        );
        assert_eq!(calls[0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(done["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(done["usage"]["completion_tokens"], 9);
    }
}
