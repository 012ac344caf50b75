//! Messages (`/v1/messages`): the Anthropic Messages shape for any model. Parses a caller body
//! into canonical (refusing what seed 001 lists), renders a canonical answer as a `message`, and
//! encodes canonical stream events as the `message_*` / `content_block_*` event stream.
//!
//! The served tier is reported in `usage.service_tier` (`flex`, `standard` or `priority`).
//! Usage follows Anthropic's convention: `input_tokens` excludes cache reads, which are
//! reported apart in `cache_read_input_tokens`.
//!
//! Choices made here:
//! - `thinking: {type: "enabled", budget_tokens}` becomes the nearest reasoning effort;
//!   `{type: "adaptive"}` becomes `output_config.effort` when given, else medium; `disabled`
//!   none. `output_config.effort` alone (`max` reads as high) is a reasoning effort too.
//! - `output_config.format` (`{type: "json_schema", schema}`) is structured output.
//! - A plain-text `document` (source `text`) is text; `content` sources are their blocks.
//! - Images and documents inside a `tool_result` follow the result as parts of the same user
//!   turn (canonical tool results are text).
//! - Tools: custom tools, and Anthropic's `web_search_*` server tool (the canonical
//!   `web_search`); other server tools exist only on Anthropic and are refused.

use flex_shared::catalog::Tier;
use serde_json::{json, Map, Value};

use super::{CallerFormat, Encoder, RawBody};
use crate::canonical::{
    Effort, Media, Message, Part, Reasoning, Request, Response, ResponseFormat, Role, StopReason,
    StreamEvent, Tool, ToolCall, ToolChoice, ToolResult, Usage,
};
use crate::error::ApiError;
use crate::ids;
use crate::sse::Event;

const EXAMPLE: &str = r#"{"model": "claude-opus-4-8", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello!"}], "start_within": "default"}"#;

fn invalid(param: &str, message: String) -> ApiError {
    ApiError::bad_request("invalid_request", message)
        .param(param.to_string())
        .fix("send the field in the Anthropic Messages shape (see the Messages API reference).")
        .example(EXAMPLE)
}

fn unsupported(param: &str, what: &str, fix: &str) -> ApiError {
    ApiError::bad_request("unsupported_parameter", format!("`{param}` is set: {what}"))
        .param(param.to_string())
        .fix(fix.to_string())
        .example(EXAMPLE)
}

fn cache_control_refused(param: &str) -> ApiError {
    unsupported(
        param,
        "FlexInference routes every request to whichever provider and tier serves it, so Anthropic prompt-cache breakpoints cannot be honoured.",
        &format!("remove `{param}` (provider-side caching still applies automatically where the provider offers it) and resend."),
    )
}

/// Refuses a set `cache_control` on a block, system entry or tool.
fn check_cache_control(v: &Value, param: &str) -> Result<(), ApiError> {
    match v.get("cache_control") {
        Some(c) if !c.is_null() => Err(cache_control_refused(&format!("{param}.cache_control"))),
        _ => Ok(()),
    }
}

/// Validates and parses a Messages body into canonical.
pub fn parse_request(body: &RawBody) -> Result<Request, ApiError> {
    let model = super::model(body, CallerFormat::Messages)?;
    let max_tokens = match body.value("max_tokens") {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                "missing_max_tokens",
                "Missing required parameter `max_tokens`: the Messages API always requires a maximum output length.",
            )
            .param("max_tokens")
            .fix("set `max_tokens` (e.g. 1024) and resend.")
            .example(EXAMPLE))
        }
        Some(v) => v.as_u64().ok_or_else(|| {
            invalid(
                "max_tokens",
                format!("`max_tokens` is {v}, but it must be a non-negative integer."),
            )
        })?,
    };
    refuse_top_level(body)?;

    let mut req = Request {
        model,
        max_output_tokens: Some(max_tokens),
        ..Request::default()
    };
    req.system = system(body.value("system"))?;
    req.messages = messages(body.value("messages"))?;
    (req.tools, req.web_search) = tools(body.value("tools"))?;
    (req.tool_choice, req.parallel_tool_calls) = tool_choice(body.value("tool_choice"))?;

    let output_config = body.value("output_config").unwrap_or(Value::Null);
    let effort = match &output_config["effort"] {
        Value::Null => None,
        Value::String(s) if s == "max" => Some(Effort::High),
        Value::String(s) => Some(Effort::parse(s).ok_or_else(|| {
            invalid(
                "output_config.effort",
                format!("`output_config.effort` is {s:?}; use low, medium, high, xhigh or max."),
            )
        })?),
        v => {
            return Err(invalid(
                "output_config.effort",
                format!("`output_config.effort` is {v}; use low, medium, high, xhigh or max."),
            ))
        }
    };
    req.reasoning = thinking(body.value("thinking"), effort)?;
    req.response_format = output_format(&output_config["format"])?;

    req.temperature = number(body, "temperature")?;
    req.top_p = number(body, "top_p")?;
    req.user = body
        .value("metadata")
        .and_then(|m| m["user_id"].as_str().map(str::to_string));
    req.stream = body.bool_field("stream").unwrap_or(false);
    Ok(req)
}

/// Seed 001's top-level refusals.
fn refuse_top_level(body: &RawBody) -> Result<(), ApiError> {
    if body.is_set("top_k") {
        return Err(unsupported(
            "top_k",
            "top-k sampling has no match on most models FlexInference routes, so it cannot be applied faithfully.",
            "remove `top_k` (use `temperature` or `top_p` instead) and resend.",
        ));
    }
    if body
        .value("stop_sequences")
        .is_some_and(|v| v.as_array().map_or(!v.is_null(), |a| !a.is_empty()))
    {
        return Err(unsupported(
            "stop_sequences",
            "custom stop sequences are not supported on the models FlexInference routes.",
            "remove `stop_sequences` (or send an empty list) and stop on the text client-side.",
        ));
    }
    if body.is_set("cache_control") {
        return Err(cache_control_refused("cache_control"));
    }
    Ok(())
}

fn number(body: &RawBody, key: &str) -> Result<Option<f64>, ApiError> {
    match body.value(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid(key, format!("`{key}` is {v}, but it must be a number."))),
    }
}

fn system(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(if s.is_empty() { Vec::new() } else { vec![s] }),
        Some(Value::Array(blocks)) => {
            let mut out = Vec::new();
            for (i, b) in blocks.iter().enumerate() {
                let here = format!("system[{i}]");
                check_cache_control(b, &here)?;
                match (b["type"].as_str(), b["text"].as_str()) {
                    (Some("text"), Some(t)) => {
                        if !t.is_empty() {
                            out.push(t.to_string());
                        }
                    }
                    _ => {
                        return Err(invalid(
                            &here,
                            format!("`{here}` must be a text block {{\"type\": \"text\", \"text\": \"...\"}}."),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(v) => Err(invalid(
            "system",
            format!("`system` is {v}, but it must be a string or an array of text blocks."),
        )),
    }
}

fn messages(v: Option<Value>) -> Result<Vec<Message>, ApiError> {
    let Some(Value::Array(list)) = v else {
        return Err(invalid(
            "messages",
            "Missing required parameter `messages` (an array of {role, content} turns).".into(),
        ));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let here = format!("messages[{i}]");
        let role = match m["role"].as_str() {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            _ => {
                return Err(invalid(
                    &format!("{here}.role"),
                    format!("`{here}.role` is {}; use \"user\" or \"assistant\" (the system prompt goes in the top-level `system`).", m["role"]),
                ))
            }
        };
        let parts = match &m["content"] {
            Value::String(s) => vec![Part::Text(s.clone())],
            Value::Array(blocks) => {
                let mut parts = Vec::with_capacity(blocks.len());
                for (j, b) in blocks.iter().enumerate() {
                    block(b, &format!("{here}.content[{j}]"), &mut parts)?;
                }
                parts
            }
            other => {
                return Err(invalid(
                    &format!("{here}.content"),
                    format!("`{here}.content` is {other}, but it must be a string or an array of content blocks."),
                ))
            }
        };
        out.push(Message { role, parts });
    }
    // Tool results carry no name in this format; some providers need it (trap 3).
    let names: Vec<(String, String)> = out
        .iter()
        .flat_map(|m| &m.parts)
        .filter_map(|p| match p {
            Part::ToolCall(c) => Some((c.id.clone(), c.name.clone())),
            _ => None,
        })
        .collect();
    for p in out.iter_mut().flat_map(|m| &mut m.parts) {
        if let Part::ToolResult(r) = p {
            if r.name.is_none() {
                r.name = names
                    .iter()
                    .find(|(id, _)| *id == r.call_id)
                    .map(|(_, n)| n.clone());
            }
        }
    }
    Ok(out)
}

fn str_of(b: &Value, key: &str, here: &str) -> Result<String, ApiError> {
    b[key].as_str().map(str::to_string).ok_or_else(|| {
        invalid(
            &format!("{here}.{key}"),
            format!("`{here}.{key}` is missing or not a string."),
        )
    })
}

/// One content block → canonical parts (a tool result may bring several).
fn block(b: &Value, here: &str, out: &mut Vec<Part>) -> Result<(), ApiError> {
    check_cache_control(b, here)?;
    match b["type"].as_str().unwrap_or_default() {
        "text" => out.push(Part::Text(str_of(b, "text", here)?)),
        "image" => out.push(Part::Image(image(&b["source"], here)?)),
        "document" => document(b, here, out)?,
        "tool_use" => out.push(Part::ToolCall(ToolCall {
            id: str_of(b, "id", here)?,
            name: str_of(b, "name", here)?,
            arguments: match &b["input"] {
                Value::Null => "{}".into(),
                v => v.to_string(),
            },
            signature: None,
        })),
        "tool_result" => {
            let call_id = str_of(b, "tool_use_id", here)?;
            let mut extra = Vec::new();
            let content = match &b["content"] {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                Value::Array(items) => {
                    let mut texts = Vec::new();
                    for (k, item) in items.iter().enumerate() {
                        let inner = format!("{here}.content[{k}]");
                        let mut parts = Vec::new();
                        match item["type"].as_str() {
                            Some("text" | "image" | "document") => {
                                block(item, &inner, &mut parts)?
                            }
                            _ => {
                                return Err(unsupported(
                                    &format!("{inner}.type"),
                                    "tool results may hold text, image and document blocks here.",
                                    "send the tool's result as text (or text, image and document blocks).",
                                ))
                            }
                        }
                        for p in parts {
                            match p {
                                Part::Text(t) => texts.push(t),
                                other => extra.push(other),
                            }
                        }
                    }
                    texts.join("\n")
                }
                v => {
                    return Err(invalid(
                        &format!("{here}.content"),
                        format!("`{here}.content` is {v}; use a string or an array of blocks."),
                    ))
                }
            };
            out.push(Part::ToolResult(ToolResult {
                call_id,
                name: None,
                content,
                is_error: b["is_error"].as_bool().unwrap_or(false),
            }));
            out.extend(extra);
        }
        "thinking" => out.push(Part::Reasoning(Reasoning {
            text: b["thinking"].as_str().unwrap_or_default().to_string(),
            signature: b["signature"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            redacted: None,
        })),
        "redacted_thinking" => out.push(Part::Reasoning(Reasoning {
            redacted: Some(str_of(b, "data", here)?),
            ..Reasoning::default()
        })),
        other => {
            return Err(unsupported(
                &format!("{here}.type"),
                &format!("the block type {other:?} has no match on the models FlexInference routes; supported blocks are text, image, document, tool_use, tool_result, thinking and redacted_thinking."),
                "replace the block with a supported one (server-tool blocks only exist on Anthropic's own API).",
            ))
        }
    }
    Ok(())
}

fn image(source: &Value, here: &str) -> Result<Media, ApiError> {
    match source["type"].as_str() {
        Some("base64") => Ok(Media::Base64 {
            mime: str_of(source, "media_type", &format!("{here}.source"))?,
            data: str_of(source, "data", &format!("{here}.source"))?,
        }),
        Some("url") => Ok(Media::Url(str_of(
            source,
            "url",
            &format!("{here}.source"),
        )?)),
        Some("file") => Err(unsupported(
            &format!("{here}.source"),
            "files uploaded to Anthropic's Files API cannot be read by other providers.",
            "send the bytes inline (source type base64) or an https URL (source type url).",
        )),
        _ => Err(invalid(
            &format!("{here}.source.type"),
            format!("`{here}.source.type` must be \"base64\" or \"url\"."),
        )),
    }
}

fn document(b: &Value, here: &str, out: &mut Vec<Part>) -> Result<(), ApiError> {
    if b["citations"]["enabled"].as_bool() == Some(true) {
        return Err(unsupported(
            &format!("{here}.citations"),
            "document citations are an Anthropic-only feature with no match on the other providers FlexInference routes.",
            "remove `citations` from the document block (or set enabled to false) and resend.",
        ));
    }
    let source = &b["source"];
    let src_here = format!("{here}.source");
    let filename = b["title"].as_str().map(str::to_string);
    match source["type"].as_str() {
        Some("base64") => out.push(Part::File {
            media: Media::Base64 {
                mime: source["media_type"]
                    .as_str()
                    .unwrap_or("application/pdf")
                    .to_string(),
                data: str_of(source, "data", &src_here)?,
            },
            filename,
        }),
        Some("url") => out.push(Part::File {
            media: Media::Url(str_of(source, "url", &src_here)?),
            filename,
        }),
        Some("text") => out.push(Part::Text(str_of(source, "data", &src_here)?)),
        Some("content") => match &source["content"] {
            Value::String(s) => out.push(Part::Text(s.clone())),
            Value::Array(items) => {
                for (k, item) in items.iter().enumerate() {
                    let inner = format!("{src_here}.content[{k}]");
                    match item["type"].as_str() {
                        Some("text" | "image") => block(item, &inner, out)?,
                        _ => {
                            return Err(invalid(
                                &inner,
                                format!("`{inner}` must be a text or image block."),
                            ))
                        }
                    }
                }
            }
            _ => {
                return Err(invalid(
                    &format!("{src_here}.content"),
                    format!("`{src_here}.content` must be a string or an array of blocks."),
                ))
            }
        },
        Some("file") => {
            return Err(unsupported(
                &src_here,
                "files uploaded to Anthropic's Files API cannot be read by other providers.",
                "send the document inline (source type base64) or by https URL (source type url).",
            ))
        }
        _ => {
            return Err(invalid(
                &format!("{src_here}.type"),
                format!("`{src_here}.type` must be \"base64\", \"url\", \"text\" or \"content\"."),
            ))
        }
    }
    Ok(())
}

fn tools(v: Option<Value>) -> Result<(Vec<Tool>, bool), ApiError> {
    let mut out = Vec::new();
    let mut web_search = false;
    let list = match v {
        None | Some(Value::Null) => return Ok((out, false)),
        Some(Value::Array(list)) => list,
        Some(v) => {
            return Err(invalid(
                "tools",
                format!("`tools` is {v}, but it must be an array."),
            ))
        }
    };
    for (i, t) in list.iter().enumerate() {
        let here = format!("tools[{i}]");
        check_cache_control(t, &here)?;
        match t["type"].as_str() {
            None | Some("custom") => out.push(Tool {
                name: str_of(t, "name", &here)?,
                description: t["description"].as_str().map(str::to_string),
                parameters: match &t["input_schema"] {
                    Value::Object(_) => t["input_schema"].clone(),
                    _ => {
                        return Err(invalid(
                            &format!("{here}.input_schema"),
                            format!("`{here}.input_schema` must be a JSON Schema object."),
                        ))
                    }
                },
                strict: t["strict"].as_bool(),
            }),
            Some(kind) if kind.starts_with("web_search_") => web_search = true,
            Some(kind) => {
                return Err(unsupported(
                    &format!("{here}.type"),
                    &format!("the server tool {kind:?} runs only on Anthropic's own API, so it cannot be routed to every model."),
                    "define the tool as a custom tool (name, description, input_schema) and run it yourself; web search works as a web_search_* tool.",
                ))
            }
        }
    }
    Ok((out, web_search))
}

fn tool_choice(v: Option<Value>) -> Result<(ToolChoice, Option<bool>), ApiError> {
    let Some(c) = v.filter(|v| !v.is_null()) else {
        return Ok((ToolChoice::Auto, None));
    };
    let choice = match c["type"].as_str() {
        Some("auto") => ToolChoice::Auto,
        Some("any") => ToolChoice::Required,
        Some("none") => ToolChoice::None,
        Some("tool") => ToolChoice::Tool(str_of(&c, "name", "tool_choice")?),
        _ => {
            return Err(invalid(
                "tool_choice.type",
                "`tool_choice.type` must be \"auto\", \"any\", \"tool\" or \"none\".".into(),
            ))
        }
    };
    let parallel = c["disable_parallel_tool_use"]
        .as_bool()
        .filter(|d| *d)
        .map(|_| false);
    Ok((choice, parallel))
}

fn thinking(v: Option<Value>, effort: Option<Effort>) -> Result<Option<Effort>, ApiError> {
    let Some(t) = v.filter(|v| !v.is_null()) else {
        return Ok(effort);
    };
    match t["type"].as_str() {
        Some("enabled") => {
            let budget = t["budget_tokens"].as_u64().ok_or_else(|| {
                invalid(
                    "thinking.budget_tokens",
                    "`thinking.budget_tokens` must be a positive integer (at least 1024).".into(),
                )
            })?;
            Ok(Some(Effort::from_budget(budget)))
        }
        Some("adaptive") => Ok(Some(effort.unwrap_or(Effort::Medium))),
        Some("disabled") => Ok(None),
        _ => Err(invalid(
            "thinking.type",
            "`thinking.type` must be \"enabled\", \"adaptive\" or \"disabled\".".into(),
        )),
    }
}

fn output_format(f: &Value) -> Result<Option<ResponseFormat>, ApiError> {
    match f["type"].as_str() {
        None if f.is_null() => Ok(None),
        Some("json_schema") if f["schema"].is_object() => Ok(Some(ResponseFormat::JsonSchema {
            name: "response".into(),
            schema: f["schema"].clone(),
            strict: None,
        })),
        _ => Err(invalid(
            "output_config.format",
            "`output_config.format` must be {\"type\": \"json_schema\", \"schema\": {...}}.".into(),
        )),
    }
}

/// Canonical → Messages `stop_reason`.
pub fn stop_reason(s: StopReason) -> &'static str {
    match s {
        StopReason::EndTurn | StopReason::Error => "end_turn",
        StopReason::MaxTokens => "max_tokens",
        StopReason::ToolUse => "tool_use",
        StopReason::StopSequence => "stop_sequence",
        StopReason::ContentFilter | StopReason::Refusal => "refusal",
    }
}

/// The Messages `usage` object: `input_tokens` excludes cache reads (Anthropic's convention).
fn usage_json(u: &Usage, served: Option<Tier>) -> Value {
    let mut out = json!({
        "input_tokens": u.input_tokens.saturating_sub(u.cached_input_tokens),
        "cache_read_input_tokens": u.cached_input_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"thinking_tokens": u.reasoning_tokens},
    });
    if let Some(t) = served {
        out["service_tier"] = json!(t.as_str());
    }
    out
}

fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_string()
    } else if id.is_empty() {
        format!("msg_{}", uuid::Uuid::new_v4().simple())
    } else {
        format!("msg_{id}")
    }
}

/// Tool arguments (JSON text) as the `input` object.
fn input_of(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({}),
    }
}

fn content_block(p: &Part) -> Option<Value> {
    Some(match p {
        Part::Text(t) => json!({"type": "text", "text": t}),
        Part::ToolCall(c) => json!({
            "type": "tool_use",
            "id": ids::for_anthropic(&c.id),
            "name": c.name,
            "input": input_of(&c.arguments),
        }),
        Part::Reasoning(r) => match &r.redacted {
            Some(data) => json!({"type": "redacted_thinking", "data": data}),
            None => json!({
                "type": "thinking",
                "thinking": r.text,
                "signature": r.signature.clone().unwrap_or_default(),
            }),
        },
        Part::Image(_) | Part::File { .. } | Part::ToolResult(_) => return None,
    })
}

/// The complete `message` object, the served tier in `usage.service_tier`.
pub fn render_response(r: &Response, served: Tier) -> Value {
    json!({
        "id": message_id(&r.id),
        "type": "message",
        "role": "assistant",
        "content": r.content.iter().filter_map(content_block).collect::<Vec<_>>(),
        "model": r.model,
        "stop_reason": stop_reason(r.stop),
        "stop_sequence": null,
        "usage": usage_json(&r.usage, Some(served)),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Tool,
    Thinking,
}

/// Canonical events → `message_start`, `content_block_start/delta/stop` per block,
/// `message_delta`, `message_stop` (every event named). Blocks are numbered densely in the
/// order they open; a block still open at the end is closed before `message_delta`.
pub struct StreamEncoder {
    served: Tier,
    model: String,
    started: bool,
    done: bool,
    next: usize,
    /// Canonical block index → (our content index, kind), for open blocks.
    open: Vec<(usize, usize, Kind)>,
}

impl StreamEncoder {
    pub fn new(served: Tier, model: &str) -> Self {
        Self {
            served,
            model: model.to_string(),
            started: false,
            done: false,
            next: 0,
            open: Vec::new(),
        }
    }

    fn emit(out: &mut Vec<Event>, name: &str, mut data: Value) {
        if let Value::Object(m) = &mut data {
            let mut with_type = Map::with_capacity(m.len() + 1);
            with_type.insert("type".into(), json!(name));
            with_type.append(m);
            data = Value::Object(with_type);
        }
        out.push(Event::new(name, data.to_string()));
    }

    fn start(&mut self, id: &str, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        Self::emit(
            out,
            "message_start",
            json!({"message": {
                "id": message_id(id),
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": self.model,
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage_json(&Usage::default(), Some(self.served)),
            }}),
        );
    }

    /// Our index of canonical block `index`, opening it with `block` if it is not open yet.
    fn open_block(
        &mut self,
        index: usize,
        kind: Kind,
        block: impl FnOnce() -> Value,
        out: &mut Vec<Event>,
    ) -> Option<usize> {
        if let Some(&(_, ours, k)) = self.open.iter().find(|(i, _, _)| *i == index) {
            return (k == kind).then_some(ours);
        }
        self.start("", out);
        let ours = self.next;
        self.next += 1;
        self.open.push((index, ours, kind));
        Self::emit(
            out,
            "content_block_start",
            json!({"index": ours, "content_block": block()}),
        );
        Some(ours)
    }

    fn delta(&mut self, index: usize, kind: Kind, delta: Value, out: &mut Vec<Event>) {
        let block = match kind {
            Kind::Text => json!({"type": "text", "text": ""}),
            Kind::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
            // A tool block is always opened by its start event (it carries id and name).
            Kind::Tool => {
                if !self
                    .open
                    .iter()
                    .any(|(i, _, k)| *i == index && *k == Kind::Tool)
                {
                    return;
                }
                Value::Null
            }
        };
        if let Some(ours) = self.open_block(index, kind, || block, out) {
            Self::emit(
                out,
                "content_block_delta",
                json!({"index": ours, "delta": delta}),
            );
        }
    }

    fn stop_block(&mut self, index: usize, out: &mut Vec<Event>) {
        if let Some(pos) = self.open.iter().position(|(i, _, _)| *i == index) {
            let (_, ours, _) = self.open.remove(pos);
            Self::emit(out, "content_block_stop", json!({"index": ours}));
        }
    }
}

impl Encoder for StreamEncoder {
    fn set_served(&mut self, served: Tier) {
        self.served = served;
    }

    fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<Event>) {
        if self.done {
            return;
        }
        match ev {
            StreamEvent::Start { id, model, .. } => {
                if !model.is_empty() && !self.started {
                    self.model = model.clone();
                }
                self.start(id, out);
            }
            StreamEvent::TextStart { index } => {
                self.open_block(
                    *index,
                    Kind::Text,
                    || json!({"type": "text", "text": ""}),
                    out,
                );
            }
            StreamEvent::TextDelta { index, text } if !text.is_empty() => self.delta(
                *index,
                Kind::Text,
                json!({"type": "text_delta", "text": text}),
                out,
            ),
            StreamEvent::ToolCallStart {
                index, id, name, ..
            } => {
                let block = json!({"type": "tool_use", "id": ids::for_anthropic(id), "name": name, "input": {}});
                self.open_block(*index, Kind::Tool, || block, out);
            }
            StreamEvent::ToolCallDelta { index, arguments } if !arguments.is_empty() => self.delta(
                *index,
                Kind::Tool,
                json!({"type": "input_json_delta", "partial_json": arguments}),
                out,
            ),
            StreamEvent::ReasoningStart { index } => {
                self.open_block(
                    *index,
                    Kind::Thinking,
                    || json!({"type": "thinking", "thinking": "", "signature": ""}),
                    out,
                );
            }
            StreamEvent::ReasoningDelta { index, text } if !text.is_empty() => self.delta(
                *index,
                Kind::Thinking,
                json!({"type": "thinking_delta", "thinking": text}),
                out,
            ),
            StreamEvent::ReasoningSignature { index, signature } => self.delta(
                *index,
                Kind::Thinking,
                json!({"type": "signature_delta", "signature": signature}),
                out,
            ),
            StreamEvent::BlockStop { index } => self.stop_block(*index, out),
            StreamEvent::Finish { stop, usage } => {
                self.start("", out);
                let open: Vec<usize> = self.open.iter().map(|(i, _, _)| *i).collect();
                for i in open {
                    self.stop_block(i, out);
                }
                Self::emit(
                    out,
                    "message_delta",
                    json!({
                        "delta": {"stop_reason": stop_reason(*stop), "stop_sequence": null},
                        "usage": usage_json(usage, None),
                    }),
                );
                Self::emit(out, "message_stop", json!({}));
                self.done = true;
            }
            StreamEvent::Error { message } => {
                Self::emit(
                    out,
                    "error",
                    json!({"error": {"type": "api_error", "message": message}}),
                );
                self.done = true;
            }
            // Empty deltas carry nothing.
            StreamEvent::TextDelta { .. }
            | StreamEvent::ToolCallDelta { .. }
            | StreamEvent::ReasoningDelta { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::canonical::{events_of, Accumulator};
    use crate::providers::{anthropic, AskTier, Decoder};

    fn raw(v: &Value) -> RawBody {
        RawBody::parse(v.to_string().as_bytes(), CallerFormat::Messages).unwrap()
    }

    fn parse(v: Value) -> Result<Request, ApiError> {
        parse_request(&raw(&v))
    }

    fn base() -> Value {
        json!({"model": "claude-opus-4-8", "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Hello!"}]})
    }

    fn with(field: &str, v: Value) -> Value {
        let mut b = base();
        b[field] = v;
        b
    }

    #[test]
    fn parses_a_full_body() {
        let r = parse(json!({
            "model": "claude-opus-4-8",
            "max_tokens": 2048,
            "system": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in French."}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this, and the weather?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                    {"type": "document", "title": "contract.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
                ]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Need the weather.", "signature": "sig1"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "sunny"}], "is_error": false},
                ]},
            ],
            "tools": [{"name": "get_weather", "description": "Weather now", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
            "thinking": {"type": "enabled", "budget_tokens": 8192},
            "top_p": 0.9,
            "metadata": {"user_id": "u-1"},
            "stream": true,
        }))
        .unwrap();
        assert_eq!(
            r,
            Request {
                model: "claude-opus-4-8".into(),
                system: vec!["You are terse.".into(), "Answer in French.".into()],
                messages: vec![
                    Message {
                        role: Role::User,
                        parts: vec![
                            Part::Text("What is this, and the weather?".into()),
                            Part::Image(Media::Base64 {
                                mime: "image/png".into(),
                                data: "iVBORw0KGgo=".into()
                            }),
                            Part::Image(Media::Url("https://example.com/cat.jpg".into())),
                            Part::File {
                                media: Media::Base64 {
                                    mime: "application/pdf".into(),
                                    data: "JVBERi0=".into()
                                },
                                filename: Some("contract.pdf".into())
                            },
                        ]
                    },
                    Message {
                        role: Role::Assistant,
                        parts: vec![
                            Part::Reasoning(Reasoning {
                                text: "Need the weather.".into(),
                                signature: Some("sig1".into()),
                                redacted: None
                            }),
                            Part::Reasoning(Reasoning {
                                redacted: Some("opaque".into()),
                                ..Reasoning::default()
                            }),
                            Part::ToolCall(ToolCall {
                                id: "toolu_01".into(),
                                name: "get_weather".into(),
                                arguments: r#"{"city":"Paris"}"#.into(),
                                signature: None
                            }),
                        ]
                    },
                    Message {
                        role: Role::User,
                        parts: vec![Part::ToolResult(ToolResult {
                            call_id: "toolu_01".into(),
                            name: Some("get_weather".into()),
                            content: "sunny".into(),
                            is_error: false
                        })]
                    },
                ],
                tools: vec![Tool {
                    name: "get_weather".into(),
                    description: Some("Weather now".into()),
                    parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
                    strict: None
                }],
                tool_choice: ToolChoice::Auto,
                parallel_tool_calls: Some(false),
                max_output_tokens: Some(2048),
                top_p: Some(0.9),
                reasoning: Some(Effort::Medium),
                stream: true,
                user: Some("u-1".into()),
                ..Request::default()
            }
        );
    }

    #[test]
    fn max_tokens_is_always_required() {
        let mut b = base();
        b.as_object_mut().unwrap().remove("max_tokens");
        let e = parse(b).unwrap_err();
        assert_eq!(
            (e.code, e.param.as_deref()),
            ("missing_max_tokens", Some("max_tokens"))
        );
        assert!(e.full_message().contains("Example:"));
        assert_eq!(
            parse(with("max_tokens", Value::Null)).unwrap_err().code,
            "missing_max_tokens"
        );
        assert_eq!(
            parse(with("max_tokens", json!("many"))).unwrap_err().code,
            "invalid_request"
        );
    }

    #[test]
    fn seed_refusals_name_the_parameter() {
        let cases = [
            (with("top_k", json!(40)), "top_k"),
            (
                with("stop_sequences", json!(["\n\nHuman:"])),
                "stop_sequences",
            ),
            (
                with("cache_control", json!({"type": "ephemeral"})),
                "cache_control",
            ),
            (
                with(
                    "system",
                    json!([{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]),
                ),
                "system[0].cache_control",
            ),
            (
                with(
                    "messages",
                    json!([{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}]),
                ),
                "messages[0].content[0].cache_control",
            ),
            (
                with(
                    "messages",
                    json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}]),
                ),
                "messages[0].content[0].content[0].cache_control",
            ),
            (
                with(
                    "tools",
                    json!([{"name": "f", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}]),
                ),
                "tools[0].cache_control",
            ),
            (
                with(
                    "messages",
                    json!([{"role": "user", "content": [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}, "citations": {"enabled": true}}]}]),
                ),
                "messages[0].content[0].citations",
            ),
            (
                with("tools", json!([{"type": "bash_20250124", "name": "bash"}])),
                "tools[0].type",
            ),
        ];
        for (body, param) in cases {
            let e = parse(body).unwrap_err();
            assert_eq!(e.code, "unsupported_parameter", "{param}");
            assert_eq!(e.param.as_deref(), Some(param));
            assert!(!e.fix.is_empty() && !e.example.is_empty(), "{param}");
        }
        // Defaults and explicit "off" values pass.
        let mut ok = with("stop_sequences", json!([]));
        ok["top_k"] = Value::Null;
        ok["cache_control"] = Value::Null;
        ok["messages"] = json!([{"role": "user", "content": [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain"}, "citations": {"enabled": false}}]}]);
        let r = parse(ok).unwrap();
        assert_eq!(r.messages[0].parts, vec![Part::Text("plain".into())]);
    }

    #[test]
    fn web_search_tool_and_choices() {
        let mut b = with(
            "tools",
            json!([{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]),
        );
        b["tool_choice"] = json!({"type": "any"});
        let r = parse(b).unwrap();
        assert!(r.web_search && r.tools.is_empty());
        assert_eq!(r.tool_choice, ToolChoice::Required);
        let r = parse(with("tool_choice", json!({"type": "tool", "name": "f"}))).unwrap();
        assert_eq!(r.tool_choice, ToolChoice::Tool("f".into()));
        let r = parse(with("tool_choice", json!({"type": "none"}))).unwrap();
        assert_eq!(
            (r.tool_choice, r.parallel_tool_calls),
            (ToolChoice::None, None)
        );
    }

    #[test]
    fn thinking_and_output_config() {
        let r = parse(with(
            "thinking",
            json!({"type": "enabled", "budget_tokens": 1024}),
        ))
        .unwrap();
        assert_eq!(r.reasoning, Some(Effort::Minimal));
        let r = parse(with("thinking", json!({"type": "disabled"}))).unwrap();
        assert_eq!(r.reasoning, None);
        let r = parse(with("thinking", json!({"type": "adaptive"}))).unwrap();
        assert_eq!(r.reasoning, Some(Effort::Medium));
        let mut b = with("thinking", json!({"type": "adaptive"}));
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false});
        b["output_config"] =
            json!({"effort": "max", "format": {"type": "json_schema", "schema": schema}});
        let r = parse(b).unwrap();
        assert_eq!(r.reasoning, Some(Effort::High));
        assert_eq!(
            r.response_format,
            Some(ResponseFormat::JsonSchema {
                name: "response".into(),
                schema,
                strict: None
            })
        );
        assert_eq!(
            parse(with("thinking", json!({"type": "enabled"})))
                .unwrap_err()
                .code,
            "invalid_request"
        );
    }

    #[test]
    fn trap_9_system_string_or_blocks_in_order() {
        assert_eq!(
            parse(with("system", json!("Be brief."))).unwrap().system,
            vec!["Be brief."]
        );
        let r = parse(with(
            "system",
            json!([{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]),
        ))
        .unwrap();
        assert_eq!(r.system, vec!["One.", "Two."]);
    }

    #[test]
    fn trap_3_tool_results_keep_their_ids_get_names_and_carry_images_along() {
        let r = parse(with(
            "messages",
            json!([
                {"role": "user", "content": "Weather and a map?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_B", "name": "get_map", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_A", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_B", "is_error": true, "content": [
                        {"type": "text", "text": "partial"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                    ]},
                ]},
            ]),
        ))
        .unwrap();
        assert_eq!(
            r.messages[2].parts,
            vec![
                Part::ToolResult(ToolResult {
                    call_id: "toolu_A".into(),
                    name: Some("get_weather".into()),
                    content: "sunny".into(),
                    is_error: false
                }),
                Part::ToolResult(ToolResult {
                    call_id: "toolu_B".into(),
                    name: Some("get_map".into()),
                    content: "partial".into(),
                    is_error: true
                }),
                Part::Image(Media::Base64 {
                    mime: "image/png".into(),
                    data: "AAAA".into()
                }),
            ]
        );
        // Native pair: the provider body answers both calls in one user turn, results first.
        let up = anthropic::body(&r, AskTier::Standard).unwrap();
        let turn = &up["messages"][2]["content"];
        assert_eq!(turn[0]["tool_use_id"], "toolu_A");
        assert_eq!(turn[1]["tool_use_id"], "toolu_B");
        assert_eq!(turn[2]["type"], "image");
    }

    fn response() -> Response {
        Response {
            id: "msg_01XYZ".into(),
            model: "claude-opus-4-8".into(),
            content: vec![
                Part::Reasoning(Reasoning {
                    text: "Think.".into(),
                    signature: Some("sig".into()),
                    redacted: None,
                }),
                Part::Text("Checking the weather.".into()),
                Part::ToolCall(ToolCall {
                    id: "call_abc.123".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                    signature: None,
                }),
            ],
            stop: StopReason::ToolUse,
            usage: Usage {
                input_tokens: 1200,
                cached_input_tokens: 200,
                output_tokens: 180,
                reasoning_tokens: 64,
            },
            created: 1_750_000_000,
            provider: None,
        }
    }

    #[test]
    fn trap_6_renders_a_message_with_usage_excluding_cache_and_the_served_tier() {
        let out = render_response(&response(), Tier::Flex);
        let id = ids::for_anthropic("call_abc.123");
        assert_eq!(
            out,
            json!({
                "id": "msg_01XYZ",
                "type": "message",
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Think.", "signature": "sig"},
                    {"type": "text", "text": "Checking the weather."},
                    {"type": "tool_use", "id": id, "name": "get_weather", "input": {"city": "Paris"}},
                ],
                "model": "claude-opus-4-8",
                "stop_reason": "tool_use",
                "stop_sequence": null,
                "usage": {
                    "input_tokens": 1000,
                    "cache_read_input_tokens": 200,
                    "cache_creation_input_tokens": 0,
                    "output_tokens": 180,
                    "output_tokens_details": {"thinking_tokens": 64},
                    "service_tier": "flex",
                },
            })
        );
        assert_eq!(
            render_response(&response(), Tier::Standard)["usage"]["service_tier"],
            "standard"
        );
    }

    #[test]
    fn trap_1_tool_ids_handed_to_callers_fit_anthropic_rules_and_come_back_unchanged() {
        let out = render_response(&response(), Tier::Standard);
        let id = out["content"][2]["id"].as_str().unwrap();
        assert!(id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'));
        // The caller echoes it; the upstream gets the same id in the call and the result.
        let r = parse(with(
            "messages",
            json!([
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [out["content"][2].clone()]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "sunny"}]},
            ]),
        ))
        .unwrap();
        let up = anthropic::body(&r, AskTier::Standard).unwrap();
        assert_eq!(up["messages"][1]["content"][0]["id"], id);
        assert_eq!(up["messages"][2]["content"][0]["tool_use_id"], id);
    }

    #[test]
    fn stop_reasons_map_both_ways() {
        for (canon, wire) in [
            (StopReason::EndTurn, "end_turn"),
            (StopReason::MaxTokens, "max_tokens"),
            (StopReason::ToolUse, "tool_use"),
            (StopReason::StopSequence, "stop_sequence"),
            (StopReason::ContentFilter, "refusal"),
            (StopReason::Refusal, "refusal"),
        ] {
            assert_eq!(stop_reason(canon), wire);
            if canon != StopReason::ContentFilter {
                assert_eq!(anthropic::stop_reason(wire), canon);
            }
        }
    }

    fn encode_all(enc: &mut StreamEncoder, events: &[StreamEvent]) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for e in events {
            enc.encode(e, &mut out);
        }
        out.into_iter()
            .map(|e| {
                let v: Value = serde_json::from_str(&e.data).unwrap();
                assert_eq!(
                    v["type"],
                    e.event.as_str(),
                    "every event is named after its type"
                );
                (e.event, v)
            })
            .collect()
    }

    #[test]
    fn encoder_emits_messages_events_in_order() {
        let mut enc = StreamEncoder::new(Tier::Flex, "claude-opus-4-8");
        let evs = encode_all(&mut enc, &events_of(&response()));
        let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let start = &evs[0].1["message"];
        assert_eq!(start["id"], "msg_01XYZ");
        assert_eq!(start["content"], json!([]));
        assert_eq!(start["stop_reason"], Value::Null);
        assert_eq!(start["usage"]["service_tier"], "flex");
        assert_eq!(
            evs[1].1["content_block"],
            json!({"type": "thinking", "thinking": "", "signature": ""})
        );
        assert_eq!(
            evs[3].1["delta"],
            json!({"type": "signature_delta", "signature": "sig"})
        );
        assert_eq!(evs[8].1["index"], 2);
        assert_eq!(evs[8].1["content_block"]["input"], json!({}));
        assert_eq!(
            evs[9].1["delta"],
            json!({"type": "input_json_delta", "partial_json": "{\"city\":\"Paris\"}"})
        );
        assert_eq!(
            evs[11].1,
            json!({"type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                "usage": {"input_tokens": 1000, "cache_read_input_tokens": 200, "cache_creation_input_tokens": 0,
                    "output_tokens": 180, "output_tokens_details": {"thinking_tokens": 64}}})
        );
    }

    #[test]
    fn trap_7_encoder_never_closes_early_and_closes_what_is_open_at_the_end() {
        let mut enc = StreamEncoder::new(Tier::Standard, "gpt-5.5");
        let evs = encode_all(
            &mut enc,
            &[
                StreamEvent::Start {
                    id: "resp_1".into(),
                    model: String::new(),
                    created: 1,
                    provider: None,
                },
                // Interleaved blocks (as OpenAI parallel calls stream): both stay open.
                StreamEvent::ToolCallStart {
                    index: 0,
                    id: "call_1".into(),
                    name: "a".into(),
                    signature: None,
                },
                StreamEvent::ToolCallStart {
                    index: 1,
                    id: "call_2".into(),
                    name: "b".into(),
                    signature: None,
                },
                StreamEvent::ToolCallDelta {
                    index: 0,
                    arguments: "{\"x\":".into(),
                },
                StreamEvent::ToolCallDelta {
                    index: 1,
                    arguments: String::new(),
                },
                StreamEvent::ToolCallDelta {
                    index: 0,
                    arguments: "1}".into(),
                },
                StreamEvent::BlockStop { index: 0 },
                // A text delta without its start opens the block.
                StreamEvent::TextDelta {
                    index: 2,
                    text: "done".into(),
                },
                StreamEvent::Finish {
                    stop: StopReason::ToolUse,
                    usage: Usage {
                        input_tokens: 10,
                        cached_input_tokens: 0,
                        output_tokens: 5,
                        reasoning_tokens: 0,
                    },
                },
                StreamEvent::TextDelta {
                    index: 2,
                    text: "late".into(),
                },
            ],
        );
        let compact: Vec<String> = evs
            .iter()
            .map(|(n, v)| match v["index"].as_u64() {
                Some(i) => format!("{n}:{i}"),
                None => n.clone(),
            })
            .collect();
        assert_eq!(
            compact,
            [
                "message_start",
                "content_block_start:0",
                "content_block_start:1",
                "content_block_delta:0",
                "content_block_delta:0",
                "content_block_stop:0",
                "content_block_start:2",
                "content_block_delta:2",
                "content_block_stop:1",
                "content_block_stop:2",
                "message_delta",
                "message_stop",
            ]
        );
        assert_eq!(evs[0].1["message"]["id"], "msg_resp_1");
        assert_eq!(evs[0].1["message"]["model"], "gpt-5.5");
        assert_eq!(evs[10].1["usage"]["output_tokens"], 5);
    }

    #[test]
    fn errors_become_an_anthropic_error_event() {
        let mut enc = StreamEncoder::new(Tier::Standard, "m");
        let evs = encode_all(
            &mut enc,
            &[StreamEvent::Error {
                message: "overloaded_error: Overloaded".into(),
            }],
        );
        assert_eq!(
            evs.last().unwrap().1,
            json!({"type": "error", "error": {"type": "api_error", "message": "overloaded_error: Overloaded"}})
        );
    }

    #[test]
    fn trap_4_thinking_round_trips_with_its_signature() {
        let body = with(
            "messages",
            json!([
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "", "signature": "EqQB"},
                    {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}},
                ]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]},
            ]),
        );
        let up = anthropic::body(&parse(body.clone()).unwrap(), AskTier::Standard).unwrap();
        let mut want = body["messages"].clone();
        want[0]["content"] = json!([{"type": "text", "text": "Weather?"}]);
        assert_eq!(up["messages"], want);
    }

    #[test]
    fn round_trip_caller_body_to_upstream_stream_to_caller() {
        // Caller body → canonical → Anthropic body: the native pair keeps the request's meaning.
        let body = json!({
            "model": "claude-opus-4-8", "max_tokens": 512,
            "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "temperature": 0.3, "stream": false,
        });
        let req = parse(body).unwrap();
        assert_eq!(
            anthropic::body(&req, AskTier::Auto).unwrap(),
            json!({"model": "claude-opus-4-8", "max_tokens": 512, "system": "Be brief.",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                "temperature": 0.3, "service_tier": "auto", "stream": true})
        );
        // Upstream SSE → canonical → the caller's stream and the caller's whole message agree.
        let upstream = [
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_9", "type": "message", "role": "assistant", "model": "claude-opus-4-8", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 8, "cache_read_input_tokens": 4, "output_tokens": 1, "service_tier": "priority"}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 2}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ];
        let mut dec = anthropic::StreamDecoder::new();
        let mut canon = Vec::new();
        for (n, d) in &upstream {
            dec.decode(&Event::new(*n, d.to_string()), &mut canon);
        }
        let served = dec.served_tier().unwrap();
        assert_eq!(served, Tier::Priority);
        let mut enc = StreamEncoder::new(served, "claude-opus-4-8");
        let evs = encode_all(&mut enc, &canon);
        let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
        let upstream_names: Vec<&str> = upstream.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, upstream_names);
        assert_eq!(evs[2].1["delta"], upstream[2].1["delta"]);
        assert_eq!(evs[4].1["usage"]["input_tokens"], 8);
        assert_eq!(evs[4].1["usage"]["cache_read_input_tokens"], 4);
        let mut acc = Accumulator::default();
        canon.iter().for_each(|e| acc.push(e));
        let whole = render_response(&acc.finish(), served);
        assert_eq!(whole["id"], "msg_9");
        assert_eq!(whole["content"], json!([{"type": "text", "text": "Hello"}]));
        assert_eq!(whole["stop_reason"], "end_turn");
        assert_eq!(whole["usage"]["input_tokens"], 8);
        assert_eq!(whole["usage"]["cache_read_input_tokens"], 4);
        assert_eq!(whole["usage"]["service_tier"], "priority");
    }
}
