//! Responses (`/v1/responses`): which stream events mean the model has started, and the final
//! response object carried by `response.completed` (or `.incomplete` / `.failed`).

use serde_json::Value;

/// Lifecycle events that precede any output: not a start.
pub fn is_lifecycle(event_type: &str) -> bool {
    matches!(
        event_type,
        "response.created" | "response.queued" | "response.in_progress"
    )
}

/// Terminal events carrying the whole response object.
pub fn is_terminal(event_type: &str) -> bool {
    matches!(
        event_type,
        "response.completed" | "response.incomplete" | "response.failed"
    )
}

/// The `type` of a Responses stream event (from its JSON, falling back to the SSE name).
pub fn event_type<'a>(sse_name: &'a str, data: &'a Value) -> &'a str {
    data["type"].as_str().unwrap_or(sse_name)
}

// ----- translation: the Responses caller format ⇄ canonical -------------------------------

use flex_shared::catalog::Tier;
use serde_json::json;

use super::{openai_tier_name, Encoder, RawBody};
use crate::canonical::{self as c, Accumulator, Message, Part, Role, StreamEvent};
use crate::error::ApiError;
use crate::sse::Event;

fn unsupported(param: &str, why: &str) -> ApiError {
    ApiError::bad_request(
        "unsupported_parameter",
        format!("`{param}` cannot be translated to this model's provider: {why}."),
    )
    .param(param.to_string())
    .fix(format!(
        "remove `{param}`, or call an OpenAI model, which receives the Responses body as sent."
    ))
    .example(r#"{"model": "gemini-3.5-flash", "input": "Hello!", "start_within": "00h-00m-30s"}"#)
}

fn invalid(param: &str, why: String) -> ApiError {
    ApiError::bad_request("invalid_request", why)
        .param(param.to_string())
        .fix("follow the Responses API shape for this field.")
        .example(
            r#""input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}]"#,
        )
}

fn parse_parts(content: &Value, param: &str) -> Result<Vec<Part>, ApiError> {
    match content {
        Value::String(s) => Ok(vec![Part::Text(s.clone())]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let here = format!("{param}[{i}]");
                match p["type"].as_str() {
                    Some("input_text" | "output_text" | "text") => Ok(Part::Text(p["text"].as_str().unwrap_or_default().to_string())),
                    Some("refusal") => Ok(Part::Text(p["refusal"].as_str().unwrap_or_default().to_string())),
                    Some("input_image") => match p["image_url"].as_str() {
                        Some(u) => Ok(Part::Image(c::Media::from_url(u))),
                        None => Err(unsupported(&here, "only images given by `image_url` (a URL or a base64 data URL) can be translated; `file_id` refers to OpenAI's file store")),
                    },
                    Some("input_file") => {
                        let filename = p["filename"].as_str().map(str::to_string);
                        if let Some(d) = p["file_data"].as_str() {
                            Ok(Part::File { media: c::Media::from_url(d), filename })
                        } else if let Some(u) = p["file_url"].as_str() {
                            Ok(Part::File { media: c::Media::Url(u.to_string()), filename })
                        } else {
                            Err(unsupported(&here, "only files given by `file_data` (a base64 data URL) or `file_url` can be translated"))
                        }
                    }
                    other => Err(unsupported(&here, &format!("content part type {other:?} is not supported across providers"))),
                }
            })
            .collect(),
        _ => Err(invalid(param, format!("`{param}` must be a string or an array of content parts."))),
    }
}

fn push(messages: &mut Vec<Message>, role: Role, parts: Vec<Part>) {
    match messages.last_mut() {
        // Consecutive items of one role form one turn (e.g. parallel calls, parallel results).
        Some(last) if last.role == role => last.parts.extend(parts),
        _ => messages.push(Message { role, parts }),
    }
}

/// A Responses request as canonical (for a non-OpenAI model).
pub fn parse_request(body: &RawBody) -> Result<c::Request, ApiError> {
    for p in ["previous_response_id", "conversation", "prompt"] {
        if body.is_set(p) {
            return Err(unsupported(p, "server-side conversation state exists only at OpenAI; send the whole conversation in `input`"));
        }
    }
    let mut req = c::Request {
        model: body.str_field("model").unwrap_or_default(),
        ..c::Request::default()
    };
    if let Some(i) = body.str_field("instructions") {
        req.system.push(i);
    }
    match body.value("input") {
        Some(Value::String(s)) => req.messages.push(Message {
            role: Role::User,
            parts: vec![Part::Text(s)],
        }),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let here = format!("input[{i}]");
                match (item["type"].as_str(), item["role"].as_str()) {
                    (Some("function_call"), _) => push(
                        &mut req.messages,
                        Role::Assistant,
                        vec![Part::ToolCall(c::ToolCall {
                            id: item["call_id"].as_str().unwrap_or_default().to_string(),
                            name: item["name"].as_str().unwrap_or_default().to_string(),
                            arguments: item["arguments"].as_str().unwrap_or("{}").to_string(),
                            signature: None,
                        })],
                    ),
                    (Some("function_call_output"), _) => {
                        let call_id = item["call_id"].as_str().unwrap_or_default().to_string();
                        let content = match &item["output"] {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
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
                    // OpenAI's reasoning items are encrypted for OpenAI only.
                    (Some("reasoning"), _) => {}
                    (Some("message") | None, Some(role)) => {
                        let parts = parse_parts(&item["content"], &format!("{here}.content"))?;
                        match role {
                            "system" | "developer" => req.system.extend(parts.into_iter().filter_map(|p| if let Part::Text(t) = p { Some(t) } else { None })),
                            "user" => push(&mut req.messages, Role::User, parts),
                            "assistant" => push(&mut req.messages, Role::Assistant, parts),
                            other => return Err(invalid(&here, format!("`{here}.role` is \"{other}\"; use user, assistant, system or developer."))),
                        }
                    }
                    (other, _) => {
                        return Err(unsupported(
                            &here,
                            &format!("input item type {other:?} is not supported across providers"),
                        ))
                    }
                }
            }
        }
        None | Some(Value::Null) => {
            return Err(invalid(
                "input",
                "Missing required parameter `input`.".into(),
            ))
        }
        Some(_) => {
            return Err(invalid(
                "input",
                "`input` must be a string or an array of items.".into(),
            ))
        }
    }
    if let Some(Value::Array(tools)) = body.value("tools") {
        for (i, t) in tools.iter().enumerate() {
            match t["type"].as_str() {
                Some("function") => req.tools.push(c::Tool {
                    name: t["name"].as_str().unwrap_or_default().to_string(),
                    description: t["description"].as_str().map(str::to_string),
                    parameters: t.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                    strict: t["strict"].as_bool(),
                }),
                Some("web_search" | "web_search_preview") => req.web_search = true,
                other => return Err(unsupported(&format!("tools[{i}]"), &format!("tool type {other:?} exists only at OpenAI; function tools and web_search work everywhere"))),
            }
        }
    }
    req.tool_choice = match body.value("tool_choice") {
        Some(Value::String(s)) if s == "none" => c::ToolChoice::None,
        Some(Value::String(s)) if s == "required" => c::ToolChoice::Required,
        Some(Value::Object(o)) => match o.get("name").and_then(Value::as_str) {
            Some(n) => c::ToolChoice::Tool(n.to_string()),
            None => c::ToolChoice::Required,
        },
        _ => c::ToolChoice::Auto,
    };
    req.parallel_tool_calls = body.bool_field("parallel_tool_calls");
    req.max_output_tokens = body.value("max_output_tokens").and_then(|v| v.as_u64());
    req.temperature = body.value("temperature").and_then(|v| v.as_f64());
    req.top_p = body.value("top_p").and_then(|v| v.as_f64());
    if let Some(f) = body.value("text").map(|t| t["format"].clone()) {
        req.response_format = match f["type"].as_str() {
            Some("json_schema") => Some(c::ResponseFormat::JsonSchema {
                name: f["name"].as_str().unwrap_or("response").to_string(),
                schema: f["schema"].clone(),
                strict: f["strict"].as_bool(),
            }),
            Some("json_object") => Some(c::ResponseFormat::JsonObject),
            _ => None,
        };
    }
    req.reasoning = body
        .value("reasoning")
        .and_then(|r| r["effort"].as_str().and_then(c::Effort::parse));
    req.user = body
        .str_field("safety_identifier")
        .or_else(|| body.str_field("user"));
    req.stream = body.bool_field("stream").unwrap_or(false);
    Ok(req)
}

fn usage_json(u: &c::Usage) -> Value {
    json!({
        "input_tokens": u.input_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_input_tokens, "cache_write_tokens": 0},
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.total(),
    })
}

fn item_json(part: &Part, n: usize, done: bool) -> Option<Value> {
    let status = if done { "completed" } else { "in_progress" };
    Some(match part {
        Part::Text(t) => json!({
            "id": format!("msg_{n:04}"), "type": "message", "role": "assistant", "status": status,
            "content": if done { json!([{"type": "output_text", "text": t, "annotations": [], "logprobs": []}]) } else { json!([]) },
        }),
        Part::ToolCall(call) => json!({
            "id": format!("fc_{n:04}"), "type": "function_call", "status": status,
            "call_id": call.id, "name": call.name, "arguments": if done { call.arguments.as_str() } else { "" },
        }),
        Part::Reasoning(r) => json!({
            "id": format!("rs_{n:04}"), "type": "reasoning",
            "summary": if done && !r.text.is_empty() { json!([{"type": "summary_text", "text": r.text}]) } else { json!([]) },
        }),
        _ => return None,
    })
}

fn response_json(r: &c::Response, served: Tier, status: &str) -> Value {
    let output: Vec<Value> = r
        .content
        .iter()
        .enumerate()
        .filter_map(|(n, p)| item_json(p, n, true))
        .collect();
    let incomplete = match r.stop {
        c::StopReason::MaxTokens => json!({"reason": "max_output_tokens"}),
        c::StopReason::ContentFilter => json!({"reason": "content_filter"}),
        _ => Value::Null,
    };
    json!({
        "id": if r.id.starts_with("resp_") { r.id.clone() } else { format!("resp_{}", r.id) },
        "object": "response",
        "created_at": r.created,
        "status": status,
        "error": if r.stop == c::StopReason::Error { json!({"code": "server_error", "message": "the provider failed"}) } else { Value::Null },
        "incomplete_details": incomplete,
        "instructions": null,
        "metadata": {},
        "model": r.model,
        "output": output,
        "parallel_tool_calls": true,
        "temperature": null,
        "tool_choice": "auto",
        "tools": [],
        "top_p": null,
        "service_tier": openai_tier_name(served, r.provider),
        "usage": usage_json(&r.usage),
    })
}

fn final_status(stop: c::StopReason) -> &'static str {
    match stop {
        c::StopReason::MaxTokens | c::StopReason::ContentFilter => "incomplete",
        c::StopReason::Error => "failed",
        _ => "completed",
    }
}

/// A canonical response as a Responses `response` object.
pub fn render_response(r: &c::Response, served: Tier) -> Value {
    response_json(r, served, final_status(r.stop))
}

/// Canonical events → Responses stream events (`event:` named, with `sequence_number`).
pub struct StreamEncoder {
    served: Tier,
    model: String,
    seq: u64,
    acc: Accumulator,
    /// Canonical block index → output index, in start order.
    blocks: Vec<usize>,
    started: Option<c::Response>,
}

impl StreamEncoder {
    pub fn new(served: Tier, model: &str) -> Self {
        Self {
            served,
            model: model.to_string(),
            seq: 0,
            acc: Accumulator::default(),
            blocks: Vec::new(),
            started: None,
        }
    }

    fn emit(&mut self, out: &mut Vec<Event>, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.push(Event::new(kind, data.to_string()));
    }

    fn output_index(&self, index: usize) -> usize {
        self.blocks.iter().position(|&b| b == index).unwrap_or(0)
    }

    fn snapshot(&self) -> c::Response {
        self.started.clone().unwrap_or_default()
    }
}

impl Encoder for StreamEncoder {
    fn set_served(&mut self, served: Tier) {
        self.served = served;
    }

    fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<Event>) {
        self.acc.push(ev);
        match ev {
            StreamEvent::Start {
                id,
                model,
                created,
                provider,
            } => {
                let mut r = c::Response {
                    id: id.clone(),
                    model: if model.is_empty() {
                        self.model.clone()
                    } else {
                        model.clone()
                    },
                    created: *created,
                    provider: *provider,
                    ..c::Response::default()
                };
                if r.id.is_empty() {
                    r.id = uuid::Uuid::new_v4().simple().to_string();
                }
                self.started = Some(r.clone());
                let body = response_json(&r, self.served, "in_progress");
                self.emit(out, "response.created", json!({"response": body.clone()}));
                self.emit(out, "response.in_progress", json!({"response": body}));
            }
            StreamEvent::TextStart { index }
            | StreamEvent::ToolCallStart { index, .. }
            | StreamEvent::ReasoningStart { index } => {
                self.blocks.push(*index);
                let n = self.blocks.len() - 1;
                let part = match ev {
                    StreamEvent::TextStart { .. } => Part::Text(String::new()),
                    StreamEvent::ToolCallStart { id, name, .. } => Part::ToolCall(c::ToolCall {
                        id: id.clone(),
                        name: name.clone(),
                        arguments: String::new(),
                        signature: None,
                    }),
                    _ => Part::Reasoning(c::Reasoning::default()),
                };
                if let Some(item) = item_json(&part, n, false) {
                    self.emit(
                        out,
                        "response.output_item.added",
                        json!({"output_index": n, "item": item}),
                    );
                }
                if matches!(part, Part::Text(_)) {
                    self.emit(out, "response.content_part.added", json!({"item_id": format!("msg_{n:04}"), "output_index": n, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}));
                }
            }
            StreamEvent::TextDelta { index, text } => {
                let n = self.output_index(*index);
                self.emit(out, "response.output_text.delta", json!({"item_id": format!("msg_{n:04}"), "output_index": n, "content_index": 0, "delta": text, "logprobs": []}));
            }
            StreamEvent::ToolCallDelta { index, arguments } => {
                let n = self.output_index(*index);
                self.emit(
                    out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": format!("fc_{n:04}"), "output_index": n, "delta": arguments}),
                );
            }
            StreamEvent::ReasoningDelta { index, text } => {
                let n = self.output_index(*index);
                self.emit(out, "response.reasoning_summary_text.delta", json!({"item_id": format!("rs_{n:04}"), "output_index": n, "summary_index": 0, "delta": text}));
            }
            StreamEvent::ReasoningSignature { .. } => {}
            StreamEvent::BlockStop { index } => {
                let n = self.output_index(*index);
                let part = self.acc_part(n);
                match &part {
                    Some(Part::Text(t)) => {
                        self.emit(out, "response.output_text.done", json!({"item_id": format!("msg_{n:04}"), "output_index": n, "content_index": 0, "text": t, "logprobs": []}));
                        self.emit(out, "response.content_part.done", json!({"item_id": format!("msg_{n:04}"), "output_index": n, "content_index": 0, "part": {"type": "output_text", "text": t, "annotations": []}}));
                    }
                    Some(Part::ToolCall(call)) => {
                        let args = if call.arguments.trim().is_empty() {
                            "{}"
                        } else {
                            call.arguments.as_str()
                        };
                        self.emit(out, "response.function_call_arguments.done", json!({"item_id": format!("fc_{n:04}"), "output_index": n, "name": call.name, "arguments": args}));
                    }
                    _ => {}
                }
                if let Some(item) = part
                    .as_ref()
                    .and_then(|p| item_json(&normalized(p), n, true))
                {
                    self.emit(
                        out,
                        "response.output_item.done",
                        json!({"output_index": n, "item": item}),
                    );
                }
            }
            StreamEvent::Finish { stop, usage } => {
                let mut r = std::mem::take(&mut self.acc).finish();
                let base = self.snapshot();
                r.id = base.id;
                r.model = base.model;
                r.created = base.created;
                r.provider = base.provider;
                r.stop = *stop;
                r.usage = *usage;
                let kind = match final_status(*stop) {
                    "incomplete" => "response.incomplete",
                    "failed" => "response.failed",
                    _ => "response.completed",
                };
                let body = render_response(&r, self.served);
                self.emit(out, kind, json!({"response": body}));
            }
            StreamEvent::Error { message } => {
                self.emit(
                    out,
                    "error",
                    json!({"code": "upstream_error", "message": message, "param": null}),
                );
            }
        }
    }
}

fn normalized(p: &Part) -> Part {
    match p {
        Part::ToolCall(call) if call.arguments.trim().is_empty() => Part::ToolCall(c::ToolCall {
            arguments: "{}".into(),
            ..call.clone()
        }),
        other => other.clone(),
    }
}

impl StreamEncoder {
    /// The accumulated part at output position `n`.
    fn acc_part(&self, n: usize) -> Option<Part> {
        self.acc.part(n).cloned()
    }
}

#[cfg(test)]
mod translation_tests {
    use super::*;

    fn body(v: Value) -> RawBody {
        RawBody::parse(
            v.to_string().as_bytes(),
            super::super::CallerFormat::Responses,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn trap_9_instructions_and_system_messages_merge_in_order() {
        let r = parse_request(&body(json!({"model": "gemini-3.5-flash", "instructions": "A", "input": [
            {"role": "developer", "content": "B"}, {"role": "system", "content": [{"type": "input_text", "text": "C"}]},
            {"role": "user", "content": "hi"}]}))).unwrap();
        assert_eq!(r.system, vec!["A", "B", "C"]);
        assert_eq!(r.messages.len(), 1);
    }

    #[test]
    fn tool_calls_and_results_become_turns_with_names() {
        let r = parse_request(&body(json!({"model": "m", "input": [
            {"role": "user", "content": "weather in Paris and Rome?"},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{\"city\":\"Rome\"}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": {"t": 20}}],
            "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}, {"type": "web_search"}],
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}, "reasoning": {"effort": "high"}}))).unwrap();
        assert_eq!(r.messages.len(), 3);
        assert_eq!(
            r.messages[1].parts.len(),
            2,
            "parallel calls in one assistant turn"
        );
        assert_eq!(
            r.messages[2].parts.len(),
            2,
            "parallel results in one user turn"
        );
        let Part::ToolResult(res) = &r.messages[2].parts[1] else {
            panic!()
        };
        assert_eq!(
            (res.name.as_deref(), res.content.as_str()),
            (Some("w"), "{\"t\":20}")
        );
        assert!(r.web_search);
        assert_eq!(r.reasoning, Some(c::Effort::High));
        assert!(matches!(
            r.response_format,
            Some(c::ResponseFormat::JsonSchema { .. })
        ));
    }

    #[test]
    fn server_side_state_is_refused() {
        let e = parse_request(&body(
            json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
        ))
        .unwrap_err();
        assert_eq!(
            (e.code, e.param.as_deref()),
            ("unsupported_parameter", Some("previous_response_id"))
        );
    }

    #[test]
    fn stream_encoder_emits_the_responses_event_sequence() {
        let r = c::Response {
            id: "x1".into(),
            model: "gemini-3.5-flash".into(),
            content: vec![
                Part::Text("Hi".into()),
                Part::ToolCall(c::ToolCall {
                    id: "call_1".into(),
                    name: "f".into(),
                    arguments: "{}".into(),
                    signature: None,
                }),
            ],
            stop: c::StopReason::ToolUse,
            usage: c::Usage {
                input_tokens: 3,
                cached_input_tokens: 0,
                output_tokens: 2,
                reasoning_tokens: 0,
            },
            created: 1,
            provider: None,
        };
        let mut enc = StreamEncoder::new(Tier::Flex, "gemini-3.5-flash");
        let mut out = Vec::new();
        for e in c::events_of(&r) {
            enc.encode(&e, &mut out);
        }
        let kinds: Vec<&str> = out.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(
            kinds,
            vec![
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let last: Value = serde_json::from_str(&out.last().unwrap().data).unwrap();
        assert_eq!(last["response"]["service_tier"], "flex");
        assert_eq!(last["response"]["usage"]["total_tokens"], 5);
        assert_eq!(last["response"]["output"][1]["call_id"], "call_1");
        let seqs: Vec<u64> = out
            .iter()
            .map(|e| {
                serde_json::from_str::<Value>(&e.data).unwrap()["sequence_number"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    }
}
