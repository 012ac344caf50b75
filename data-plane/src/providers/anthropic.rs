//! Anthropic Messages (`POST {base}/v1/messages`): canonical requests become Messages bodies
//! (always streamed), and the `message_*` / `content_block_*` event stream becomes canonical
//! events.
//!
//! Choices made here (each one where Anthropic's API has no exact match):
//! - System prompts are joined into the top-level `system` string, in order (trap 9).
//! - Consecutive canonical messages of one role are merged into one Messages turn, and in a user
//!   turn every `tool_result` block comes first: all results answering one assistant turn travel
//!   in ONE user message (trap 3). A tool call of the previous turn left without a result is
//!   refused up front (Anthropic would refuse it too, less clearly).
//! - Reasoning is replayed only when Anthropic can verify it: signed `thinking` blocks (empty text
//!   included) and `redacted_thinking`; unsigned reasoning from another provider is dropped, never
//!   turned into text. Signed blocks always precede the turn's `tool_use` blocks (trap 4).
//! - Structured output uses `output_config.format` (`{type: "json_schema", schema}`, the SDK's
//!   `OutputConfigParam`), not a forced tool, so tool calling and thinking stay available. "Any
//!   JSON object" has no schema form there (Anthropic requires closed object schemas), so it
//!   becomes one more system instruction.
//! - Reasoning effort becomes `thinking: {type: "enabled", budget_tokens}` with the budget
//!   clamped below `max_tokens` (Anthropic's rule); below Anthropic's 1024-token minimum, or with
//!   a forced tool choice (which Anthropic refuses with thinking), no thinking is requested.
//!   With thinking on, `temperature` is not sent and `top_p` only within 0.95..=1 (Anthropic's
//!   limits). `temperature` is clamped to Anthropic's 0..=1, and when both `temperature` and
//!   `top_p` are set only `temperature` is sent (recent Claude models refuse both).
//! - Tool `strict` is not forwarded: OpenAI callers set it by default, and Anthropic's strict
//!   mode has its own schema limits and model list.
//! - `web_search` becomes Anthropic's server tool `web_search_20250305`; its server blocks
//!   (`server_tool_use`, `web_search_tool_result`) are not canonical content and are skipped
//!   when decoding, the model's cited text comes through as text.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flex_shared::catalog::{Provider, Tier};
use http::{HeaderValue, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Map, Value};

use super::{AskTier, Decoder};
use crate::canonical::{
    self, join_system, Media, Message, Part, ResponseFormat, Role, StopReason, StreamEvent,
    ToolChoice, Usage,
};
use crate::error::ApiError;
use crate::ids;
use crate::race::EventClass;
use crate::sse::Event;

/// The `anthropic-version` header we speak.
pub const API_VERSION: &str = "2023-06-01";

/// Image types Anthropic accepts inline (trap 8).
pub const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Anthropic's smallest thinking budget.
pub const MIN_THINKING_BUDGET: u64 = 1024;

/// The instruction standing in for "respond with any JSON object" (no schema form exists).
pub const JSON_OBJECT_INSTRUCTION: &str =
    "Respond with a single valid JSON object and nothing else: no prose, no code fences.";

const EXAMPLE: &str = r#"{"model": "claude-opus-4-8", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello!"}], "start_within": "default"}"#;

/// The `service_tier` value for a tier. Anthropic has no flex tier: the proxy refuses a flex
/// plan for Claude models before it gets here, so this only guards against a wiring mistake.
pub fn tier_value(t: AskTier) -> Result<&'static str, ApiError> {
    match t {
        AskTier::Standard => Ok("standard_only"),
        AskTier::Auto | AskTier::Priority => Ok("auto"),
        AskTier::Flex => Err(ApiError::bad_request(
            "flex_unsupported_for_anthropic",
            "A flex request was addressed to Anthropic, which has no flex tier.",
        )
        .param("start_within")
        .fix("drop the duration and use \"default\", \"priority\" or \"auto\" for Claude models.")
        .example(EXAMPLE)),
    }
}

/// The tier Anthropic reports in `usage.service_tier`.
pub fn served_tier(v: &str) -> Option<Tier> {
    match v {
        "standard" => Some(Tier::Standard),
        "priority" => Some(Tier::Priority),
        _ => None,
    }
}

/// Builds the upstream request for `req` at tier `tier`, always streaming.
pub fn request(
    base: &str,
    req: &canonical::Request,
    tier: AskTier,
    key: &SecretString,
) -> Result<http::Request<Bytes>, ApiError> {
    let bytes = serde_json::to_vec(&body(req, tier)?).map_err(|e| internal(e.to_string()))?;
    let url = format!("{}/v1/messages", base.trim_end_matches('/'));
    let mut key_value = HeaderValue::from_str(key.expose_secret()).map_err(|_| {
        internal("the stored Anthropic key contains characters not allowed in a header".into())
    })?;
    key_value.set_sensitive(true);
    http::Request::post(&url)
        .header("x-api-key", key_value)
        .header("anthropic-version", API_VERSION)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "text/event-stream")
        .body(Bytes::from(bytes))
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "bad_upstream_url",
                format!("The Anthropic base URL `{base}` does not form a valid request URL: {e}."),
            )
            .fix("correct --anthropic-base-url (e.g. https://api.anthropic.com).")
        })
}

/// A Messages request whose body the caller wrote (native passthrough). The caller's
/// `anthropic-version` and `anthropic-beta` headers are forwarded; the version defaults to ours.
pub fn raw_request(
    base: &str,
    key: &SecretString,
    body: Bytes,
    stream: bool,
    caller_headers: &http::HeaderMap,
) -> Result<http::Request<Bytes>, ApiError> {
    let url = format!("{}/v1/messages", base.trim_end_matches('/'));
    let mut key_value = HeaderValue::from_str(key.expose_secret()).map_err(|_| {
        internal("the stored Anthropic key contains characters not allowed in a header".into())
    })?;
    key_value.set_sensitive(true);
    let version = caller_headers
        .get("anthropic-version")
        .cloned()
        .unwrap_or(HeaderValue::from_static(API_VERSION));
    let mut builder = http::Request::post(&url)
        .header("x-api-key", key_value)
        .header("anthropic-version", version)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::ACCEPT,
            if stream {
                "text/event-stream"
            } else {
                "application/json"
            },
        );
    if let Some(beta) = caller_headers.get("anthropic-beta") {
        builder = builder.header("anthropic-beta", beta.clone());
    }
    builder.body(body).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "bad_upstream_url",
            format!("The Anthropic base URL `{base}` does not form a valid request URL: {e}."),
        )
        .fix("correct --anthropic-base-url (e.g. https://api.anthropic.com).")
    })
}

fn internal(detail: String) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        format!("The Anthropic request could not be built: {detail}."),
    )
    .fix("check the provider key with `flex admin provider-key set`; report the problem if it persists.")
}

/// The upstream JSON body alone (what [`request`] sends).
pub fn body(req: &canonical::Request, tier: AskTier) -> Result<Value, ApiError> {
    let Some(max_tokens) = req.max_output_tokens else {
        return Err(missing_max_tokens(&req.model));
    };
    let service_tier = tier_value(tier)?;
    let mut out = Map::new();
    out.insert("model".into(), json!(req.model));
    out.insert("max_tokens".into(), json!(max_tokens));

    let mut system = req.system.clone();
    if req.response_format == Some(ResponseFormat::JsonObject) {
        system.push(JSON_OBJECT_INSTRUCTION.into());
    }
    if let Some(s) = join_system(&system) {
        out.insert("system".into(), json!(s));
    }
    out.insert("messages".into(), Value::Array(messages(&req.messages)?));

    let mut tools: Vec<Value> = req.tools.iter().map(tool).collect();
    if req.web_search {
        tools.push(json!({"type": "web_search_20250305", "name": "web_search"}));
    }
    let forced_tool =
        !tools.is_empty() && matches!(req.tool_choice, ToolChoice::Required | ToolChoice::Tool(_));
    if !tools.is_empty() {
        out.insert(
            "tool_choice".into(),
            tool_choice(&req.tool_choice, req.parallel_tool_calls),
        );
        out.insert("tools".into(), Value::Array(tools));
    }

    let budget = req
        .reasoning
        .map(|e| e.budget_tokens().min(max_tokens.saturating_sub(1)))
        .filter(|b| *b >= MIN_THINKING_BUDGET && !forced_tool);
    if let Some(budget) = budget {
        out.insert(
            "thinking".into(),
            json!({"type": "enabled", "budget_tokens": budget}),
        );
        if let Some(p) = req.top_p.filter(|p| (0.95..=1.0).contains(p)) {
            out.insert("top_p".into(), json!(p));
        }
    } else if let Some(t) = req.temperature {
        out.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    } else if let Some(p) = req.top_p {
        out.insert("top_p".into(), json!(p));
    }

    if let Some(ResponseFormat::JsonSchema { schema, .. }) = &req.response_format {
        out.insert(
            "output_config".into(),
            json!({"format": {"type": "json_schema", "schema": schema}}),
        );
    }
    if let Some(u) = &req.user {
        out.insert("metadata".into(), json!({"user_id": u}));
    }
    out.insert("service_tier".into(), json!(service_tier));
    out.insert("stream".into(), json!(true));
    Ok(Value::Object(out))
}

fn missing_max_tokens(model: &str) -> ApiError {
    ApiError::bad_request(
        "missing_max_tokens",
        format!("The request for the Claude model `{model}` sets no maximum output length, and Anthropic requires one on every request."),
    )
    .param("max_output_tokens")
    .fix("set `max_output_tokens` (Responses), `max_completion_tokens` (Chat), `generation_config.max_output_tokens` (Interactions) or `max_tokens` (Messages) and resend.")
    .example(EXAMPLE)
}

fn tool(t: &canonical::Tool) -> Value {
    let mut schema = match &t.parameters {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    // Anthropic requires an object schema; a tool without parameters takes an empty object.
    schema
        .entry("type")
        .or_insert_with(|| Value::String("object".into()));
    if schema.get("type") == Some(&json!("object")) {
        schema.entry("properties").or_insert_with(|| json!({}));
    }
    let mut out = Map::new();
    out.insert("name".into(), json!(t.name));
    if let Some(d) = t.description.as_ref().filter(|d| !d.is_empty()) {
        out.insert("description".into(), json!(d));
    }
    out.insert("input_schema".into(), Value::Object(schema));
    Value::Object(out)
}

fn tool_choice(choice: &ToolChoice, parallel: Option<bool>) -> Value {
    let mut out = match choice {
        ToolChoice::Auto => json!({"type": "auto"}),
        ToolChoice::None => return json!({"type": "none"}),
        ToolChoice::Required => json!({"type": "any"}),
        ToolChoice::Tool(name) => json!({"type": "tool", "name": name}),
    };
    if parallel == Some(false) {
        out["disable_parallel_tool_use"] = json!(true);
    }
    out
}

/// Canonical messages → Messages turns (traps 3 and 4).
fn messages(msgs: &[Message]) -> Result<Vec<Value>, ApiError> {
    let mut turns: Vec<(Role, Vec<Value>)> = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let mut blocks = Vec::with_capacity(m.parts.len());
        for part in &m.parts {
            if let Some(b) = block(part, m.role, i)? {
                blocks.push(b);
            }
        }
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((role, prev)) if *role == m.role => prev.extend(blocks),
            _ => turns.push((m.role, blocks)),
        }
    }
    for (role, blocks) in &mut turns {
        match role {
            // Trap 3: the results come first, all in this one user message.
            Role::User => blocks.sort_by_key(|b| b["type"] != "tool_result"),
            Role::Assistant => hoist_thinking(blocks),
        }
    }
    check_results(&turns)?;
    Ok(turns
        .into_iter()
        .map(|(role, content)| {
            json!({
                "role": match role { Role::User => "user", Role::Assistant => "assistant" },
                "content": content,
            })
        })
        .collect())
}

fn is_thinking(b: &Value) -> bool {
    b["type"] == "thinking" || b["type"] == "redacted_thinking"
}

/// Trap 4: signed thinking blocks must precede the turn's `tool_use` blocks. Order is otherwise
/// kept (thinking blocks among themselves keep their original order, as Anthropic requires).
fn hoist_thinking(blocks: &mut Vec<Value>) {
    let Some(first_tool) = blocks.iter().position(|b| b["type"] == "tool_use") else {
        return;
    };
    let late: Vec<Value> = {
        let mut late = Vec::new();
        let mut i = first_tool;
        while i < blocks.len() {
            if is_thinking(&blocks[i]) {
                late.push(blocks.remove(i));
            } else {
                i += 1;
            }
        }
        late
    };
    for (k, b) in late.into_iter().enumerate() {
        blocks.insert(first_tool + k, b);
    }
}

/// Every `tool_use` of an assistant turn must be answered in the next (user) turn.
fn check_results(turns: &[(Role, Vec<Value>)]) -> Result<(), ApiError> {
    for pair in turns.windows(2) {
        let [(Role::Assistant, asked), (Role::User, answered)] = pair else {
            continue;
        };
        for call in asked.iter().filter(|b| b["type"] == "tool_use") {
            let id = call["id"].as_str().unwrap_or_default();
            if !answered
                .iter()
                .any(|b| b["type"] == "tool_result" && b["tool_use_id"] == id)
            {
                let name = call["name"].as_str().unwrap_or_default();
                return Err(ApiError::bad_request(
                    "missing_tool_result",
                    format!("The assistant turn calls the tool `{name}` (call id `{id}`), but the next user turn carries no result for it; Claude models need a result for every call of the previous turn."),
                )
                .param("messages")
                .fix("send one tool result per tool call of the previous assistant turn, all in the turn that follows it.")
                .example(r#"[{"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}]}]"#));
            }
        }
    }
    Ok(())
}

fn block(part: &Part, role: Role, msg: usize) -> Result<Option<Value>, ApiError> {
    Ok(Some(match part {
        Part::Text(t) if t.is_empty() => return Ok(None),
        Part::Text(t) => json!({"type": "text", "text": t}),
        Part::Image(media) => json!({"type": "image", "source": image_source(media, msg)?}),
        Part::File { media, filename } => {
            let mut doc = json!({"type": "document", "source": document_source(media, msg)?});
            if let Some(f) = filename.as_ref().filter(|f| !f.is_empty()) {
                doc["title"] = json!(f);
            }
            doc
        }
        Part::ToolCall(c) => json!({
            "type": "tool_use",
            "id": ids::for_anthropic(&c.id),
            "name": c.name,
            "input": arguments(&c.arguments, &c.name, msg)?,
        }),
        Part::ToolResult(r) => {
            let mut b =
                json!({"type": "tool_result", "tool_use_id": ids::for_anthropic(&r.call_id)});
            if !r.content.is_empty() {
                b["content"] = json!(r.content);
            }
            if r.is_error {
                b["is_error"] = json!(true);
            }
            b
        }
        // Thinking belongs to assistant turns only.
        Part::Reasoning(_) if role == Role::User => return Ok(None),
        Part::Reasoning(r) => match (&r.redacted, &r.signature) {
            (Some(data), _) => json!({"type": "redacted_thinking", "data": data}),
            (None, Some(sig)) if !sig.is_empty() => {
                json!({"type": "thinking", "thinking": r.text, "signature": sig})
            }
            // Unsigned reasoning (another provider's) cannot be verified by Anthropic.
            _ => return Ok(None),
        },
    }))
}

/// Tool arguments are JSON text; Anthropic wants the object.
fn arguments(text: &str, name: &str, msg: usize) -> Result<Value, ApiError> {
    if text.trim().is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(ApiError::bad_request(
            "invalid_tool_arguments",
            format!("The arguments of the earlier call to `{name}` (message {msg}) are not a JSON object, and Claude models take tool input as an object."),
        )
        .param("messages")
        .fix("send the call's arguments as a JSON object text, e.g. \"{\\\"city\\\": \\\"Paris\\\"}\".")
        .example(r#"{"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}"#)),
    }
}

fn image_source(media: &Media, msg: usize) -> Result<Value, ApiError> {
    match media {
        Media::Url(url) => Ok(json!({"type": "url", "url": url})),
        Media::Base64 { mime, data } => {
            let mime = match mime.to_ascii_lowercase().as_str() {
                "image/jpg" => "image/jpeg".to_string(),
                m => m.to_string(),
            };
            if !IMAGE_TYPES.contains(&mime.as_str()) {
                return Err(ApiError::bad_request(
                    "unsupported_parameter",
                    format!("An image in message {msg} has the type `{mime}`, but Claude models accept only image/jpeg, image/png, image/gif and image/webp."),
                )
                .param("image")
                .fix("convert the image to JPEG, PNG, GIF or WebP (or pass it by https URL) and resend.")
                .example(r#""image_url": "data:image/png;base64,iVBORw0KGgo...""#));
            }
            Ok(json!({"type": "base64", "media_type": mime, "data": data}))
        }
    }
}

fn document_source(media: &Media, msg: usize) -> Result<Value, ApiError> {
    match media {
        Media::Url(url) => Ok(json!({"type": "url", "url": url})),
        Media::Base64 { mime, data } if mime.eq_ignore_ascii_case("application/pdf") => {
            Ok(json!({"type": "base64", "media_type": "application/pdf", "data": data}))
        }
        Media::Base64 { mime, data } => {
            // Plain-text documents travel as text; other binary formats have no Anthropic form.
            let text = is_textual(mime)
                .then(|| base64_decode(data))
                .flatten()
                .and_then(|bytes| String::from_utf8(bytes).ok());
            match text {
                Some(text) => Ok(json!({"type": "text", "media_type": "text/plain", "data": text})),
                None => Err(ApiError::bad_request(
                    "unsupported_parameter",
                    format!("A file in message {msg} has the type `{mime}`, but Claude models read only PDF and plain-text documents."),
                )
                .param("file")
                .fix("send the file as a PDF (data:application/pdf;base64,...) or as text.")
                .example(r#"{"type": "input_file", "filename": "contract.pdf", "file_data": "data:application/pdf;base64,JVBERi0..."}"#)),
            }
        }
    }
}

fn is_textual(mime: &str) -> bool {
    let m = mime.to_ascii_lowercase();
    m.starts_with("text/")
        || matches!(
            m.as_str(),
            "application/json" | "application/xml" | "application/x-yaml" | "application/yaml"
        )
}

/// Standard (or URL-safe) base64, padding optional, whitespace ignored.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' | b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

/// How a raw upstream event counts for the race.
pub fn classify(ev: &Event) -> EventClass {
    let data: Option<Value> = if ev.event.is_empty() || ev.event == "error" {
        serde_json::from_str(&ev.data).ok()
    } else {
        None
    };
    let name = if ev.event.is_empty() {
        data.as_ref()
            .and_then(|d| d["type"].as_str())
            .unwrap_or_default()
    } else {
        ev.event.as_str()
    };
    match name {
        "content_block_start"
        | "content_block_delta"
        | "content_block_stop"
        | "message_delta"
        | "message_stop" => EventClass::Start,
        "error" => match data.as_ref().and_then(|d| d["error"]["type"].as_str()) {
            Some("overloaded_error" | "rate_limit_error") => EventClass::CapacityError,
            _ => EventClass::Error,
        },
        _ => EventClass::Lifecycle,
    }
}

/// Anthropic `stop_reason` → canonical.
pub fn stop_reason(s: &str) -> StopReason {
    match s {
        "max_tokens" | "model_context_window_exceeded" => StopReason::MaxTokens,
        "tool_use" => StopReason::ToolUse,
        "stop_sequence" => StopReason::StopSequence,
        "refusal" => StopReason::Refusal,
        _ => StopReason::EndTurn,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Tool,
    Reasoning,
}

#[derive(Debug)]
struct Open {
    upstream: u64,
    index: usize,
    kind: Kind,
    has_args: bool,
}

/// Anthropic SSE → canonical events. Blocks are renumbered densely (server-tool and redacted
/// blocks are skipped); usage is kept from `message_start` and `message_delta` and emitted once,
/// real, with `Finish` at `message_stop`.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    open: Vec<Open>,
    next_index: usize,
    input: u64,
    cache_read: u64,
    cache_creation: u64,
    output: u64,
    thinking: u64,
    stop: Option<StopReason>,
    saw_tool: bool,
    tier: Option<Tier>,
    finished: bool,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.input + self.cache_read + self.cache_creation,
            cached_input_tokens: self.cache_read,
            output_tokens: self.output,
            reasoning_tokens: self.thinking,
        }
    }

    /// Reads a (cumulative) usage object; absent fields keep their earlier value.
    fn read_usage(&mut self, u: &Value) {
        let set = |slot: &mut u64, v: &Value| {
            if let Some(n) = v.as_u64() {
                *slot = n;
            }
        };
        set(&mut self.input, &u["input_tokens"]);
        set(&mut self.cache_read, &u["cache_read_input_tokens"]);
        set(&mut self.cache_creation, &u["cache_creation_input_tokens"]);
        set(&mut self.output, &u["output_tokens"]);
        set(
            &mut self.thinking,
            &u["output_tokens_details"]["thinking_tokens"],
        );
        if let Some(t) = u["service_tier"].as_str().and_then(served_tier) {
            self.tier = Some(t);
        }
    }

    fn open(&mut self, upstream: u64, kind: Kind) -> usize {
        let index = self.next_index;
        self.next_index += 1;
        self.open.push(Open {
            upstream,
            index,
            kind,
            has_args: false,
        });
        index
    }

    fn close(b: &Open, out: &mut Vec<StreamEvent>) {
        // Trap 7: a tool call always ends with an arguments object, never empty.
        if b.kind == Kind::Tool && !b.has_args {
            out.push(StreamEvent::ToolCallDelta {
                index: b.index,
                arguments: "{}".into(),
            });
        }
        out.push(StreamEvent::BlockStop { index: b.index });
    }

    fn block_start(&mut self, upstream: u64, cb: &Value, out: &mut Vec<StreamEvent>) {
        let text = |k: &str| cb[k].as_str().unwrap_or_default().to_string();
        match cb["type"].as_str() {
            Some("text") => {
                let index = self.open(upstream, Kind::Text);
                out.push(StreamEvent::TextStart { index });
                let t = text("text");
                if !t.is_empty() {
                    out.push(StreamEvent::TextDelta { index, text: t });
                }
            }
            Some("tool_use") => {
                self.saw_tool = true;
                let index = self.open(upstream, Kind::Tool);
                out.push(StreamEvent::ToolCallStart {
                    index,
                    id: text("id"),
                    name: text("name"),
                    signature: None,
                });
                if cb["input"].as_object().is_some_and(|o| !o.is_empty()) {
                    out.push(StreamEvent::ToolCallDelta {
                        index,
                        arguments: cb["input"].to_string(),
                    });
                    if let Some(b) = self.open.last_mut() {
                        b.has_args = true;
                    }
                }
            }
            Some("thinking") => {
                let index = self.open(upstream, Kind::Reasoning);
                out.push(StreamEvent::ReasoningStart { index });
                let t = text("thinking");
                if !t.is_empty() {
                    out.push(StreamEvent::ReasoningDelta { index, text: t });
                }
                let s = text("signature");
                if !s.is_empty() {
                    out.push(StreamEvent::ReasoningSignature {
                        index,
                        signature: s,
                    });
                }
            }
            // redacted_thinking: the canonical stream has no event for its data (see the
            // report); server-tool blocks are the provider's own business.
            _ => {}
        }
    }

    fn block_delta(&mut self, upstream: u64, d: &Value, out: &mut Vec<StreamEvent>) {
        let Some(b) = self.open.iter_mut().find(|b| b.upstream == upstream) else {
            return;
        };
        let index = b.index;
        let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
        match (d["type"].as_str(), b.kind) {
            (Some("text_delta"), Kind::Text) => out.push(StreamEvent::TextDelta {
                index,
                text: s("text"),
            }),
            (Some("input_json_delta"), Kind::Tool) => {
                let arguments = s("partial_json");
                if !arguments.is_empty() {
                    b.has_args = true;
                    out.push(StreamEvent::ToolCallDelta { index, arguments });
                }
            }
            (Some("thinking_delta"), Kind::Reasoning) => out.push(StreamEvent::ReasoningDelta {
                index,
                text: s("thinking"),
            }),
            (Some("signature_delta"), Kind::Reasoning) => {
                out.push(StreamEvent::ReasoningSignature {
                    index,
                    signature: s("signature"),
                })
            }
            _ => {}
        }
    }

    fn finish(&mut self, out: &mut Vec<StreamEvent>) {
        for b in std::mem::take(&mut self.open) {
            Self::close(&b, out);
        }
        let mut stop = self.stop.unwrap_or_default();
        if stop == StopReason::EndTurn && self.saw_tool {
            stop = StopReason::ToolUse;
        }
        out.push(StreamEvent::Finish {
            stop,
            usage: self.usage(),
        });
        self.finished = true;
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Decoder for StreamDecoder {
    fn decode(&mut self, ev: &Event, out: &mut Vec<StreamEvent>) {
        if self.finished {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return;
        };
        let name = if ev.event.is_empty() {
            v["type"].as_str().unwrap_or_default()
        } else {
            ev.event.as_str()
        };
        let index = v["index"].as_u64().unwrap_or(0);
        match name {
            "message_start" => {
                let m = &v["message"];
                self.read_usage(&m["usage"]);
                out.push(StreamEvent::Start {
                    id: m["id"].as_str().unwrap_or_default().to_string(),
                    model: m["model"].as_str().unwrap_or_default().to_string(),
                    created: now(),
                    provider: Some(Provider::Anthropic),
                });
            }
            "content_block_start" => self.block_start(index, &v["content_block"], out),
            "content_block_delta" => self.block_delta(index, &v["delta"], out),
            "content_block_stop" => {
                if let Some(pos) = self.open.iter().position(|b| b.upstream == index) {
                    let b = self.open.remove(pos);
                    Self::close(&b, out);
                }
            }
            "message_delta" => {
                if let Some(s) = v["delta"]["stop_reason"].as_str() {
                    self.stop = Some(stop_reason(s));
                }
                self.read_usage(&v["usage"]);
            }
            "message_stop" => self.finish(out),
            "error" => {
                let e = &v["error"];
                out.push(StreamEvent::Error {
                    message: format!(
                        "{}: {}",
                        e["type"].as_str().unwrap_or("error"),
                        e["message"]
                            .as_str()
                            .unwrap_or("the provider reported an error")
                    ),
                });
                self.finished = true;
            }
            _ => {}
        }
    }

    fn served_tier(&self) -> Option<Tier> {
        self.tier
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::canonical::{
        Accumulator, Effort, Reasoning, Request, Response, Tool, ToolCall, ToolResult,
    };

    fn user(parts: Vec<Part>) -> Message {
        Message {
            role: Role::User,
            parts,
        }
    }

    fn assistant(parts: Vec<Part>) -> Message {
        Message {
            role: Role::Assistant,
            parts,
        }
    }

    fn text(t: &str) -> Part {
        Part::Text(t.into())
    }

    fn req(messages: Vec<Message>) -> Request {
        Request {
            model: "claude-sonnet-4-5".into(),
            messages,
            max_output_tokens: Some(1024),
            ..Request::default()
        }
    }

    fn call(id: &str, name: &str, args: &str) -> Part {
        Part::ToolCall(ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: args.into(),
            signature: None,
        })
    }

    fn result(id: &str, content: &str) -> Part {
        Part::ToolResult(ToolResult {
            call_id: id.into(),
            name: None,
            content: content.into(),
            is_error: false,
        })
    }

    #[test]
    fn golden_text() {
        let b = body(&req(vec![user(vec![text("Hello!")])]), AskTier::Standard).unwrap();
        assert_eq!(
            b,
            json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 1024,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}],
                "service_tier": "standard_only",
                "stream": true,
            })
        );
    }

    #[test]
    fn tiers_map_and_flex_never_reaches_anthropic() {
        let r = req(vec![user(vec![text("x")])]);
        assert_eq!(body(&r, AskTier::Auto).unwrap()["service_tier"], "auto");
        assert_eq!(body(&r, AskTier::Priority).unwrap()["service_tier"], "auto");
        assert_eq!(
            body(&r, AskTier::Flex).unwrap_err().code,
            "flex_unsupported_for_anthropic"
        );
        assert_eq!(served_tier("standard"), Some(Tier::Standard));
        assert_eq!(served_tier("priority"), Some(Tier::Priority));
        assert_eq!(served_tier("batch"), None);
    }

    #[test]
    fn max_tokens_is_required() {
        let mut r = req(vec![user(vec![text("x")])]);
        r.max_output_tokens = None;
        let e = body(&r, AskTier::Standard).unwrap_err();
        assert_eq!(e.code, "missing_max_tokens");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.full_message().contains("Example:"));
    }

    #[test]
    fn trap_9_several_system_prompts_merge_in_order() {
        let mut r = req(vec![user(vec![text("Hi")])]);
        r.system = vec!["You are terse.".into(), "Answer in French.".into()];
        assert_eq!(
            body(&r, AskTier::Standard).unwrap()["system"],
            "You are terse.\n\nAnswer in French."
        );
    }

    #[test]
    fn golden_multi_turn_merges_same_role_neighbours() {
        let r = req(vec![
            user(vec![text("Hi")]),
            assistant(vec![text("Hello! How can I help?")]),
            user(vec![text("Tell me a joke.")]),
            user(vec![text(""), text("A short one.")]),
        ]);
        assert_eq!(
            body(&r, AskTier::Standard).unwrap()["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello! How can I help?"}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "Tell me a joke."},
                    {"type": "text", "text": "A short one."},
                ]},
            ])
        );
    }

    fn weather_tool() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("Current weather".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            strict: Some(true),
        }
    }

    #[test]
    fn golden_tools_and_tool_choice() {
        let mut r = req(vec![user(vec![text("Weather in Paris?")])]);
        r.tools = vec![
            weather_tool(),
            Tool {
                name: "now".into(),
                description: None,
                parameters: Value::Null,
                strict: None,
            },
        ];
        r.tool_choice = ToolChoice::Tool("get_weather".into());
        r.parallel_tool_calls = Some(false);
        let b = body(&r, AskTier::Standard).unwrap();
        assert_eq!(
            b["tools"],
            json!([
                {"name": "get_weather", "description": "Current weather",
                 "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
                {"name": "now", "input_schema": {"type": "object", "properties": {}}},
            ])
        );
        assert_eq!(
            b["tool_choice"],
            json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true})
        );
        for (choice, want) in [
            (ToolChoice::Auto, json!({"type": "auto"})),
            (ToolChoice::Required, json!({"type": "any"})),
            (ToolChoice::None, json!({"type": "none"})),
        ] {
            r.tool_choice = choice;
            r.parallel_tool_calls = None;
            assert_eq!(body(&r, AskTier::Standard).unwrap()["tool_choice"], want);
        }
        // No tools: no tool_choice either (Anthropic refuses one alone).
        r.tools.clear();
        assert!(body(&r, AskTier::Standard)
            .unwrap()
            .get("tool_choice")
            .is_none());
    }

    #[test]
    fn web_search_becomes_the_server_tool() {
        let mut r = req(vec![user(vec![text("News?")])]);
        r.web_search = true;
        let b = body(&r, AskTier::Standard).unwrap();
        assert_eq!(
            b["tools"],
            json!([{"type": "web_search_20250305", "name": "web_search"}])
        );
    }

    #[test]
    fn trap_1_tool_call_ids_are_made_safe_and_stay_paired() {
        let weird = "fc_68a.b/c";
        let r = req(vec![
            user(vec![text("Weather?")]),
            assistant(vec![call(weird, "get_weather", r#"{"city":"Paris"}"#)]),
            user(vec![result(weird, "sunny")]),
        ]);
        let b = body(&r, AskTier::Standard).unwrap();
        let id = b["messages"][1]["content"][0]["id"].as_str().unwrap();
        assert!(id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'));
        assert_eq!(b["messages"][2]["content"][0]["tool_use_id"], id);
    }

    #[test]
    fn trap_3_parallel_tool_results_in_one_user_message() {
        let r = req(vec![
            user(vec![text("Weather in Paris and Rome?")]),
            assistant(vec![
                text("Checking both."),
                call("toolu_01", "get_weather", r#"{"city":"Paris"}"#),
                call("toolu_02", "get_weather", r#"{"city":"Rome"}"#),
            ]),
            // As a Chat caller sends them: one message per result, then more text.
            user(vec![result("toolu_01", "sunny")]),
            user(vec![
                text("Also, be brief."),
                Part::ToolResult(ToolResult {
                    call_id: "toolu_02".into(),
                    name: Some("get_weather".into()),
                    content: "{\"error\":\"timeout\"}".into(),
                    is_error: true,
                }),
            ]),
        ]);
        let b = body(&r, AskTier::Standard).unwrap();
        assert_eq!(
            b["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking both."},
                    {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {"city": "Rome"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_02", "content": "{\"error\":\"timeout\"}", "is_error": true},
                    {"type": "text", "text": "Also, be brief."},
                ]},
            ])
        );
        // A call left unanswered is refused up front, naming it.
        let r = req(vec![
            user(vec![text("Weather?")]),
            assistant(vec![
                call("toolu_01", "get_weather", "{}"),
                call("toolu_02", "get_weather", "{}"),
            ]),
            user(vec![result("toolu_01", "sunny")]),
        ]);
        let e = body(&r, AskTier::Standard).unwrap_err();
        assert_eq!(e.code, "missing_tool_result");
        assert!(e.message.contains("toolu_02"));
    }

    #[test]
    fn trap_4_signed_thinking_is_replayed_before_tool_use() {
        let signed = |t: &str, s: &str| {
            Part::Reasoning(Reasoning {
                text: t.into(),
                signature: Some(s.into()),
                redacted: None,
            })
        };
        let r = req(vec![
            user(vec![text("Weather?")]),
            assistant(vec![
                signed("Let me check.", "sig1"),
                call("toolu_01", "get_weather", r#"{"city":"Paris"}"#),
                // Empty-text signed block, arriving after the call: still replayed, moved up.
                signed("", "sig2"),
                Part::Reasoning(Reasoning {
                    redacted: Some("opaque".into()),
                    ..Reasoning::default()
                }),
                // Another provider's unsigned reasoning: dropped, never made text.
                Part::Reasoning(Reasoning {
                    text: "openai summary".into(),
                    ..Reasoning::default()
                }),
            ]),
            user(vec![result("toolu_01", "sunny")]),
        ]);
        let b = body(&r, AskTier::Standard).unwrap();
        assert_eq!(
            b["messages"][1]["content"],
            json!([
                {"type": "thinking", "thinking": "Let me check.", "signature": "sig1"},
                {"type": "thinking", "thinking": "", "signature": "sig2"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
            ])
        );
        assert!(!b.to_string().contains("openai summary"));
    }

    #[test]
    fn trap_8_images_split_data_urls_and_allow_only_four_types() {
        let r = req(vec![user(vec![
            text("What is in these?"),
            Part::Image(Media::from_url("data:image/png;base64,iVBORw0KGgo=")),
            Part::Image(Media::from_url("https://example.com/cat.jpg")),
            Part::Image(Media::from_url("data:image/jpg;base64,/9j/4AAQ")),
        ])]);
        assert_eq!(
            body(&r, AskTier::Standard).unwrap()["messages"][0]["content"],
            json!([
                {"type": "text", "text": "What is in these?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
            ])
        );
        let r = req(vec![user(vec![Part::Image(Media::from_url(
            "data:image/bmp;base64,Qk0=",
        ))])]);
        let e = body(&r, AskTier::Standard).unwrap_err();
        assert_eq!(e.code, "unsupported_parameter");
        assert!(e
            .message
            .contains("image/jpeg, image/png, image/gif and image/webp"));
    }

    #[test]
    fn files_become_documents() {
        let r = req(vec![user(vec![
            Part::File {
                media: Media::from_url("data:application/pdf;base64,JVBERi0="),
                filename: Some("contract.pdf".into()),
            },
            Part::File {
                media: Media::from_url("data:text/plain;base64,aGVsbG8gd29ybGQ="),
                filename: None,
            },
            Part::File {
                media: Media::Url("https://example.com/a.pdf".into()),
                filename: None,
            },
        ])]);
        assert_eq!(
            body(&r, AskTier::Standard).unwrap()["messages"][0]["content"],
            json!([
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}, "title": "contract.pdf"},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hello world"}},
                {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
            ])
        );
        let r = req(vec![user(vec![Part::File {
            media: Media::from_url("data:application/zip;base64,UEsD"),
            filename: None,
        }])]);
        assert_eq!(
            body(&r, AskTier::Standard).unwrap_err().code,
            "unsupported_parameter"
        );
    }

    #[test]
    fn golden_structured_output() {
        let mut r = req(vec![user(vec![text("Extract the name.")])]);
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": false});
        r.response_format = Some(ResponseFormat::JsonSchema {
            name: "person".into(),
            schema: schema.clone(),
            strict: Some(true),
        });
        let b = body(&r, AskTier::Standard).unwrap();
        assert_eq!(
            b["output_config"],
            json!({"format": {"type": "json_schema", "schema": schema}})
        );
        r.system = vec!["Be exact.".into()];
        r.response_format = Some(ResponseFormat::JsonObject);
        let b = body(&r, AskTier::Standard).unwrap();
        assert!(b.get("output_config").is_none());
        assert_eq!(
            b["system"],
            format!("Be exact.\n\n{JSON_OBJECT_INSTRUCTION}")
        );
    }

    #[test]
    fn golden_reasoning_effort() {
        let mut r = req(vec![user(vec![text("Prove it.")])]);
        r.max_output_tokens = Some(32_000);
        r.reasoning = Some(Effort::Medium);
        r.temperature = Some(0.7);
        r.top_p = Some(0.5);
        let b = body(&r, AskTier::Standard).unwrap();
        assert_eq!(
            b["thinking"],
            json!({"type": "enabled", "budget_tokens": 8192})
        );
        assert!(b.get("temperature").is_none() && b.get("top_p").is_none());
        // The budget stays below max_tokens.
        r.reasoning = Some(Effort::High);
        r.max_output_tokens = Some(4096);
        assert_eq!(
            body(&r, AskTier::Standard).unwrap()["thinking"]["budget_tokens"],
            4095
        );
        // Too small for Anthropic's minimum: no thinking, sampling kept (clamped to 0..=1).
        r.max_output_tokens = Some(1000);
        r.temperature = Some(1.5);
        let b = body(&r, AskTier::Standard).unwrap();
        assert!(b.get("thinking").is_none());
        assert_eq!(b["temperature"], 1.0);
        assert!(b.get("top_p").is_none());
        // A forced tool excludes thinking.
        r.max_output_tokens = Some(32_000);
        r.tools = vec![weather_tool()];
        r.tool_choice = ToolChoice::Required;
        assert!(body(&r, AskTier::Standard)
            .unwrap()
            .get("thinking")
            .is_none());
    }

    #[test]
    fn metadata_user() {
        let mut r = req(vec![user(vec![text("x")])]);
        r.user = Some("u-42".into());
        assert_eq!(
            body(&r, AskTier::Standard).unwrap()["metadata"],
            json!({"user_id": "u-42"})
        );
    }

    #[test]
    fn request_addresses_messages_with_the_key_headers() {
        let key = SecretString::from("sk-ant-test".to_string());
        let r = req(vec![user(vec![text("Hello!")])]);
        let http = request("http://127.0.0.1:9/", &r, AskTier::Standard, &key).unwrap();
        assert_eq!(http.uri(), "http://127.0.0.1:9/v1/messages");
        assert_eq!(http.method(), http::Method::POST);
        let h = http.headers();
        assert_eq!(h["x-api-key"], "sk-ant-test");
        assert!(h["x-api-key"].is_sensitive());
        assert_eq!(h["anthropic-version"], "2023-06-01");
        assert_eq!(h["content-type"], "application/json");
    }

    fn ev(name: &str, data: Value) -> Event {
        Event::new(name, data.to_string())
    }

    fn run(events: &[Event]) -> (Vec<StreamEvent>, StreamDecoder) {
        let mut d = StreamDecoder::new();
        let mut out = Vec::new();
        for e in events {
            d.decode(e, &mut out);
        }
        (out, d)
    }

    fn accumulate(events: &[StreamEvent]) -> Response {
        let mut acc = Accumulator::default();
        for e in events {
            acc.push(e);
        }
        assert!(acc.finished);
        acc.finish()
    }

    fn message_start(usage: Value) -> Event {
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_01", "type": "message", "role": "assistant",
                "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": usage}}),
        )
    }

    #[test]
    fn decodes_a_text_stream_with_real_usage() {
        let transcript = [
            message_start(
                json!({"input_tokens": 12, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 100,
                "output_tokens": 1, "service_tier": "standard"}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            ev("ping", json!({"type": "ping"})),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " world"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            ev(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": 7}}),
            ),
            ev("message_stop", json!({"type": "message_stop"})),
        ];
        let classes: Vec<EventClass> = transcript.iter().map(classify).collect();
        assert_eq!(
            &classes[..3],
            [
                EventClass::Lifecycle,
                EventClass::Start,
                EventClass::Lifecycle
            ]
        );
        let (out, d) = run(&transcript);
        assert_eq!(d.served_tier(), Some(Tier::Standard));
        assert!(
            matches!(&out[0], StreamEvent::Start { id, model, .. } if id == "msg_01" && model == "claude-sonnet-4-5-20250929")
        );
        assert_eq!(
            &out[1..],
            [
                StreamEvent::TextStart { index: 0 },
                StreamEvent::TextDelta {
                    index: 0,
                    text: "Hello".into()
                },
                StreamEvent::TextDelta {
                    index: 0,
                    text: " world".into()
                },
                StreamEvent::BlockStop { index: 0 },
                StreamEvent::Finish {
                    stop: StopReason::EndTurn,
                    usage: Usage {
                        input_tokens: 115,
                        cached_input_tokens: 100,
                        output_tokens: 7,
                        reasoning_tokens: 0
                    }
                },
            ]
        );
        let r = accumulate(&out);
        assert_eq!(r.content, vec![text("Hello world")]);
    }

    #[test]
    fn trap_6_usage_input_adds_cache_reads_and_writes() {
        let (out, _) = run(&[
            message_start(json!({"input_tokens": 5, "cache_creation_input_tokens": 20,
                "cache_read_input_tokens": 1000, "output_tokens": 1, "service_tier": "priority"})),
            ev(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                "usage": {"output_tokens": 50, "output_tokens_details": {"thinking_tokens": 30}}}),
            ),
            ev("message_stop", json!({"type": "message_stop"})),
        ]);
        assert_eq!(
            out.last(),
            Some(&StreamEvent::Finish {
                stop: StopReason::MaxTokens,
                usage: Usage {
                    input_tokens: 1025,
                    cached_input_tokens: 1000,
                    output_tokens: 50,
                    reasoning_tokens: 30
                }
            })
        );
    }

    #[test]
    fn trap_7_tool_arguments_stream_in_fragments_and_blocks_close_in_order() {
        let (out, d) = run(&[
            message_start(
                json!({"input_tokens": 400, "output_tokens": 1, "service_tier": "standard"}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking."}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {}}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "ris\"}"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            // A call without arguments never comes out empty.
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_01B", "name": "now", "input": {}}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 2}),
            ),
            ev(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 60}}),
            ),
            ev("message_stop", json!({"type": "message_stop"})),
        ]);
        assert_eq!(d.served_tier(), Some(Tier::Standard));
        assert_eq!(
            &out[4..],
            [
                StreamEvent::ToolCallStart {
                    index: 1,
                    id: "toolu_01A".into(),
                    name: "get_weather".into(),
                    signature: None
                },
                StreamEvent::ToolCallDelta {
                    index: 1,
                    arguments: "{\"city\": \"Pa".into()
                },
                StreamEvent::ToolCallDelta {
                    index: 1,
                    arguments: "ris\"}".into()
                },
                StreamEvent::BlockStop { index: 1 },
                StreamEvent::ToolCallStart {
                    index: 2,
                    id: "toolu_01B".into(),
                    name: "now".into(),
                    signature: None
                },
                StreamEvent::ToolCallDelta {
                    index: 2,
                    arguments: "{}".into()
                },
                StreamEvent::BlockStop { index: 2 },
                StreamEvent::Finish {
                    stop: StopReason::ToolUse,
                    usage: Usage {
                        input_tokens: 400,
                        cached_input_tokens: 0,
                        output_tokens: 60,
                        reasoning_tokens: 0
                    }
                },
            ]
        );
        let r = accumulate(&out);
        assert_eq!(r.stop, StopReason::ToolUse);
        assert_eq!(
            r.content,
            vec![
                text("Checking."),
                call("toolu_01A", "get_weather", "{\"city\": \"Paris\"}"),
                call("toolu_01B", "now", "{}"),
            ]
        );
    }

    #[test]
    fn decodes_thinking_with_its_signature_and_skips_server_blocks() {
        let (out, _) = run(&[
            message_start(
                json!({"input_tokens": 30, "output_tokens": 1, "service_tier": "standard"}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me think"}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": " step by step."}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "42"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 2}),
            ),
            ev(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 90}}),
            ),
            ev("message_stop", json!({"type": "message_stop"})),
        ]);
        let r = accumulate(&out);
        assert_eq!(
            r.content,
            vec![
                Part::Reasoning(Reasoning {
                    text: "Let me think step by step.".into(),
                    signature: Some("EqQBCgIYAhIM".into()),
                    redacted: None
                }),
                text("42"),
            ]
        );
        // Dense canonical indices despite the skipped server block.
        assert!(out.contains(&StreamEvent::TextStart { index: 1 }));
        assert_eq!(r.usage.output_tokens, 90);
    }

    #[test]
    fn stop_reasons_map() {
        for (s, want) in [
            ("end_turn", StopReason::EndTurn),
            ("max_tokens", StopReason::MaxTokens),
            ("tool_use", StopReason::ToolUse),
            ("stop_sequence", StopReason::StopSequence),
            ("refusal", StopReason::Refusal),
            ("pause_turn", StopReason::EndTurn),
            ("model_context_window_exceeded", StopReason::MaxTokens),
        ] {
            assert_eq!(stop_reason(s), want, "{s}");
        }
    }

    #[test]
    fn errors_classify_by_type_and_decode_to_error_events() {
        let overloaded = ev(
            "error",
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        );
        let limited = Event::new(
            "",
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
                .to_string(),
        );
        let invalid = ev(
            "error",
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}),
        );
        assert_eq!(classify(&overloaded), EventClass::CapacityError);
        assert_eq!(classify(&limited), EventClass::CapacityError);
        assert_eq!(classify(&invalid), EventClass::Error);
        assert_eq!(classify(&ev("message_delta", json!({}))), EventClass::Start);
        let (out, _) = run(&[
            message_start(json!({"input_tokens": 1, "output_tokens": 1})),
            overloaded,
        ]);
        assert_eq!(
            out[1],
            StreamEvent::Error {
                message: "overloaded_error: Overloaded".into()
            }
        );
    }

    #[test]
    fn base64_decoding() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert_eq!(base64_decode("YQ").unwrap(), b"a");
        assert!(base64_decode("a*b").is_none());
    }
}
