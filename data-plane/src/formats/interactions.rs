//! Interactions (`/v1/interactions`): Google's Interactions API shape (the `google-genai` SDK's
//! `client.interactions`), stateless: every request carries its whole conversation in `input`.
//!
//! Request → canonical:
//! - `input`: a string, one content object, a list of content objects (one user turn), or a list
//!   of steps (`user_input`, `model_output`, `thought`, `function_call`, `function_result`);
//!   consecutive steps of one side are merged into one message, so parallel results travel
//!   together. Server-side tool steps (`google_search_call`, …) are history only and skipped.
//! - content: `text`, `image` / `document` with `data` + `mime_type` or `uri` (data URLs too);
//!   `audio` / `video` are refused (no canonical form).
//! - `system_instruction`, `tools` (`function`, `google_search` → web search), `response_format`
//!   (a text format with `mime_type: application/json` and `schema`, or a bare JSON schema),
//!   `generation_config{max_output_tokens, temperature, top_p, thinking_level, tool_choice}`,
//!   `stream`.
//! - Refused with `unsupported_parameter` (seed 001): `generation_config.seed`,
//!   `generation_config.stop_sequences`; also `previous_interaction_id` and `background: true`,
//!   which need server-side state FlexInference does not keep.
//!
//! Response: an `Interaction` whose `steps` hold only the output (`model_output`, `thought`,
//! `function_call`), so `steps[0]` is the first output step as seed 001 shows; `created` /
//! `updated` are ISO 8601 strings (the SDK types); `function_call` steps carry the Gemini thought
//! signature in an extra `signature` field (as the Interactions API's other call steps do; the
//! SDK keeps unknown fields), and it is read back from there.

use std::time::{SystemTime, UNIX_EPOCH};

use flex_shared::catalog::Tier;
use serde_json::{json, Map, Value};

use super::{CallerFormat, Encoder, RawBody};
use crate::canonical::{
    Accumulator, Effort, Media, Message, Part, Reasoning, Request, Response, ResponseFormat, Role,
    StopReason, StreamEvent, Tool, ToolCall, ToolChoice, ToolResult, Usage,
};
use crate::error::ApiError;
use crate::sse::Event;

const EXAMPLE: &str = r#"{"model": "gemini-3.5-flash", "input": "Summarize this contract.", "start_within": "00h-01m-00s"}"#;

fn unsupported(param: &str, why: &str) -> ApiError {
    ApiError::bad_request(
        "unsupported_parameter",
        format!("The Interactions parameter `{param}` is set, but FlexInference does not support it: {why}."),
    )
    .param(param.to_string())
    .fix(format!("remove `{param}` (or leave it at its default) and resend."))
    .example(EXAMPLE)
}

fn invalid(param: &str, why: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", why)
        .param(param.to_string())
        .fix("follow the Interactions API shape for this field (see the google-genai SDK's interactions types).")
        .example(
            r#""input": [{"type": "user_input", "content": [{"type": "text", "text": "Hello!"}]}]"#,
        )
}

/// Validates and parses an Interactions request body into canonical.
pub fn parse_request(body: &RawBody) -> Result<Request, ApiError> {
    let model = super::model(body, CallerFormat::Interactions)?;
    let config = match body.value("generation_config") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(invalid(
                "generation_config",
                "`generation_config` must be an object.",
            ))
        }
    };
    refuse_unsupported(body, &config)?;

    let mut req = Request {
        model,
        stream: body.bool_field("stream").unwrap_or(false),
        ..Request::default()
    };
    match body.value("system_instruction") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            if !s.is_empty() {
                req.system.push(s);
            }
        }
        Some(_) => {
            return Err(invalid(
                "system_instruction",
                "`system_instruction` must be a string.",
            ))
        }
    }
    match body.value("input") {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                "missing_input",
                "Missing required parameter `input`: FlexInference is stateless, so every interaction carries its whole conversation.",
            )
            .param("input")
            .fix("send `input` as a string, a list of content parts, or the list of steps so far.")
            .example(EXAMPLE))
        }
        Some(v) => parse_input(&v, &mut req.messages)?,
    }
    if let Some(tools) = body.value("tools") {
        parse_tools(&tools, &mut req)?;
    }
    parse_config(&config, &mut req)?;
    req.response_format = parse_response_format(
        body.value("response_format"),
        body.str_field("response_mime_type"),
    )?;
    Ok(req)
}

fn refuse_unsupported(body: &RawBody, config: &Map<String, Value>) -> Result<(), ApiError> {
    if config.get("seed").is_some_and(|v| !v.is_null()) {
        return Err(unsupported(
            "generation_config.seed",
            "seeded sampling has no match on every provider FlexInference routes, and a seed that is silently ignored would promise reproducibility it cannot give",
        ));
    }
    let stops_set = match config.get("stop_sequences") {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    if stops_set {
        return Err(unsupported(
            "generation_config.stop_sequences",
            "stop sequences are not translated across providers",
        ));
    }
    if body
        .str_field("previous_interaction_id")
        .is_some_and(|s| !s.is_empty())
    {
        return Err(unsupported(
            "previous_interaction_id",
            "FlexInference stores no interactions, so there is no previous interaction to continue; send the earlier steps in `input` instead",
        ));
    }
    if body.bool_field("background") == Some(true) {
        return Err(unsupported(
            "background",
            "background interactions need server-side storage; use `stream: true` for long answers",
        ));
    }
    Ok(())
}

/// Appends a part to the conversation, merging it into the last message of the same role.
fn push(messages: &mut Vec<Message>, role: Role, part: Part) {
    match messages.last_mut() {
        Some(m) if m.role == role => m.parts.push(part),
        _ => messages.push(Message {
            role,
            parts: vec![part],
        }),
    }
}

const CONTENT_TYPES: [&str; 5] = ["text", "image", "document", "audio", "video"];

fn parse_input(input: &Value, messages: &mut Vec<Message>) -> Result<(), ApiError> {
    match input {
        Value::String(s) => {
            push(messages, Role::User, Part::Text(s.clone()));
            Ok(())
        }
        Value::Object(_) => parse_item(input, messages),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => push(messages, Role::User, Part::Text(s.clone())),
                    _ => parse_item(item, messages)?,
                }
            }
            Ok(())
        }
        _ => Err(invalid(
            "input",
            "`input` must be a string, a content object, or a list of content objects or steps.",
        )),
    }
}

fn parse_item(item: &Value, messages: &mut Vec<Message>) -> Result<(), ApiError> {
    let kind = item["type"].as_str().unwrap_or_default();
    if CONTENT_TYPES.contains(&kind) {
        let part = content_part(item, "input")?;
        push(messages, Role::User, part);
        return Ok(());
    }
    match kind {
        "user_input" => {
            for c in content_list(&item["content"]) {
                let part = content_part(c, "input")?;
                push(messages, Role::User, part);
            }
        }
        "model_output" => {
            for c in content_list(&item["content"]) {
                if let Some(t) = c["text"].as_str().filter(|_| c["type"] == "text") {
                    push(messages, Role::Assistant, Part::Text(t.to_string()));
                }
            }
        }
        "thought" => {
            let text: String = content_list(&item["summary"])
                .filter_map(|c| c["text"].as_str())
                .collect();
            let signature = item["signature"].as_str().map(str::to_string);
            let redacted = item["redacted"].as_str().map(str::to_string);
            if !text.is_empty() || signature.is_some() || redacted.is_some() {
                push(
                    messages,
                    Role::Assistant,
                    Part::Reasoning(Reasoning {
                        text,
                        signature,
                        redacted,
                    }),
                );
            }
        }
        "function_call" => {
            let name = item["name"]
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| invalid("input", "A `function_call` step needs a `name`."))?;
            let arguments = match &item["arguments"] {
                Value::Null => "{}".to_string(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            push(
                messages,
                Role::Assistant,
                Part::ToolCall(ToolCall {
                    id: item["id"].as_str().unwrap_or_default().to_string(),
                    name: name.to_string(),
                    arguments,
                    signature: item["signature"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                }),
            );
        }
        "function_result" => {
            let call_id = item["call_id"].as_str().ok_or_else(|| {
                invalid(
                    "input",
                    "A `function_result` step needs the `call_id` of the call it answers.",
                )
            })?;
            push(
                messages,
                Role::User,
                Part::ToolResult(ToolResult {
                    call_id: call_id.to_string(),
                    name: item["name"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                    content: result_text(&item["result"]),
                    is_error: item["is_error"].as_bool().unwrap_or(false),
                }),
            );
        }
        // Server-side tool traces (search, code execution, …) are history the provider already
        // used; no provider accepts them back, so they are skipped.
        k if k.ends_with("_call") || k.ends_with("_result") => {}
        other => {
            return Err(invalid(
                "input",
                format!("Unknown input item type `{other}`: expected a content type (text, image, document) or a step (user_input, model_output, thought, function_call, function_result)."),
            ))
        }
    }
    Ok(())
}

fn content_list(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// A function result as text: strings as they are, text sub-contents joined, objects as JSON.
fn result_text(result: &Value) -> String {
    match result {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Array(items) if items.iter().all(|i| i["type"] == "text") => items
            .iter()
            .filter_map(|i| i["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

fn content_part(c: &Value, param: &str) -> Result<Part, ApiError> {
    let kind = c["type"].as_str().unwrap_or_default();
    match kind {
        "text" => Ok(Part::Text(
            c["text"].as_str().unwrap_or_default().to_string(),
        )),
        "image" | "document" => {
            let default_mime = if kind == "image" {
                "image/png"
            } else {
                "application/pdf"
            };
            let media = if let Some(data) = c["data"].as_str() {
                Media::Base64 {
                    mime: c["mime_type"].as_str().unwrap_or(default_mime).to_string(),
                    data: data.to_string(),
                }
            } else if let Some(uri) = c["uri"].as_str() {
                Media::from_url(uri)
            } else {
                return Err(invalid(
                    param,
                    format!(
                        "An `{kind}` content needs `data` (base64 with `mime_type`) or a `uri`."
                    ),
                ));
            };
            Ok(if kind == "image" {
                Part::Image(media)
            } else {
                Part::File {
                    media,
                    filename: None,
                }
            })
        }
        "audio" | "video" => Err(unsupported(
            param,
            &format!(
                "`{kind}` input is not translated across providers; send text, images or documents"
            ),
        )),
        other => Err(invalid(
            param,
            format!("Unknown content type `{other}`: expected text, image or document."),
        )),
    }
}

fn parse_tools(tools: &Value, req: &mut Request) -> Result<(), ApiError> {
    let list = match tools {
        Value::Null => return Ok(()),
        Value::Array(a) => a,
        _ => return Err(invalid("tools", "`tools` must be a list.")),
    };
    for t in list {
        match t["type"].as_str().unwrap_or_default() {
            "function" => {
                let name = t["name"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| invalid("tools", "A function tool needs a `name`."))?;
                req.tools.push(Tool {
                    name: name.to_string(),
                    description: t["description"].as_str().map(str::to_string),
                    parameters: match &t["parameters"] {
                        Value::Null => json!({"type": "object", "properties": {}}),
                        p => p.clone(),
                    },
                    strict: None,
                });
            }
            "google_search" => req.web_search = true,
            other => {
                return Err(unsupported(
                    "tools",
                    &format!("the `{other}` tool is not translated across providers (function and google_search are)"),
                ))
            }
        }
    }
    Ok(())
}

fn parse_tool_choice(v: &Value) -> Result<ToolChoice, ApiError> {
    let param = "generation_config.tool_choice";
    let by_mode = |mode: &str, tools: &[Value]| -> Result<ToolChoice, ApiError> {
        Ok(match mode {
            "auto" | "validated" | "" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "any" => match tools {
                [one] => ToolChoice::Tool(one.as_str().unwrap_or_default().to_string()),
                _ => ToolChoice::Required,
            },
            other => {
                return Err(invalid(
                    param,
                    format!(
                    "Unknown tool_choice mode `{other}`: expected auto, any, none or validated."
                ),
                ))
            }
        })
    };
    match v {
        Value::Null => Ok(ToolChoice::Auto),
        Value::String(mode) => by_mode(mode, &[]),
        Value::Object(o) => {
            let allowed = &o.get("allowed_tools").cloned().unwrap_or(Value::Null);
            let tools: Vec<Value> = content_list(&allowed["tools"]).cloned().collect();
            by_mode(allowed["mode"].as_str().unwrap_or("auto"), &tools)
        }
        _ => Err(invalid(
            param,
            "`tool_choice` must be a mode string or {\"allowed_tools\": {...}}.",
        )),
    }
}

fn parse_config(config: &Map<String, Value>, req: &mut Request) -> Result<(), ApiError> {
    let number = |key: &str| -> Result<Option<f64>, ApiError> {
        match config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                invalid(
                    &format!("generation_config.{key}"),
                    format!("`{key}` must be a number."),
                )
            }),
        }
    };
    req.temperature = number("temperature")?;
    req.top_p = number("top_p")?;
    match config.get("max_output_tokens") {
        None | Some(Value::Null) => {}
        Some(v) => {
            req.max_output_tokens = Some(v.as_u64().ok_or_else(|| {
                invalid(
                    "generation_config.max_output_tokens",
                    "`max_output_tokens` must be a positive integer.",
                )
            })?)
        }
    }
    match config.get("thinking_level") {
        None | Some(Value::Null) => {}
        Some(v) => {
            req.reasoning = Some(v.as_str().and_then(Effort::parse).ok_or_else(|| {
                invalid(
                    "generation_config.thinking_level",
                    format!(
                        "Unknown thinking_level {v}: expected minimal, low, medium, high or xhigh."
                    ),
                )
            })?)
        }
    }
    if let Some(tc) = config.get("tool_choice") {
        req.tool_choice = parse_tool_choice(tc)?;
    }
    Ok(())
}

fn parse_response_format(
    format: Option<Value>,
    mime: Option<String>,
) -> Result<Option<ResponseFormat>, ApiError> {
    let json_mime = mime.as_deref() == Some("application/json");
    let format = match format {
        None | Some(Value::Null) => {
            return Ok(json_mime.then_some(ResponseFormat::JsonObject));
        }
        // A list of formats (one per modality): the text one is what can be translated.
        Some(Value::Array(items)) => match items
            .into_iter()
            .find(|i| i["type"] == "text" || i.get("type").is_none() || i["type"] == "object")
        {
            Some(i) => i,
            None => return Ok(None),
        },
        Some(v) => v,
    };
    let schema_format = |schema: Value| ResponseFormat::JsonSchema {
        name: schema["title"]
            .as_str()
            .filter(|t| !t.is_empty())
            .unwrap_or("response")
            .to_string(),
        schema,
        strict: None,
    };
    match format["type"].as_str() {
        Some("text") => {
            let is_json = format["mime_type"].as_str() == Some("application/json") || json_mime;
            Ok(match format.get("schema").filter(|s| !s.is_null()) {
                Some(schema) => Some(schema_format(schema.clone())),
                None if is_json => Some(ResponseFormat::JsonObject),
                None => None,
            })
        }
        Some(kind @ ("audio" | "image" | "video")) => Err(unsupported(
            "response_format",
            &format!("`{kind}` output is not routed; only text and JSON output are"),
        )),
        // A bare JSON schema.
        _ if format.is_object() => Ok(Some(schema_format(format))),
        _ => Err(invalid(
            "response_format",
            "`response_format` must be an object: {\"type\": \"text\", \"mime_type\": \"application/json\", \"schema\": {...}}.",
        )),
    }
}

// ----- canonical → Interactions ----------------------------------------------------------

/// `YYYY-MM-DDThh:mm:ssZ` for Unix seconds.
pub fn iso8601(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `interaction_…` from the provider's response id.
fn interaction_id(id: &str) -> String {
    if id.is_empty() {
        format!("interaction_{}", uuid::Uuid::new_v4().simple())
    } else if id.starts_with("interaction_") {
        id.to_string()
    } else {
        format!("interaction_{id}")
    }
}

/// The interaction status for a stop reason: `failed` on error, `incomplete` when truncated
/// (length or content filter), `requires_action` when a step is a function call.
pub fn status(stop: StopReason, has_call: bool) -> &'static str {
    match stop {
        StopReason::Error => "failed",
        StopReason::MaxTokens => "incomplete",
        _ if has_call => "requires_action",
        StopReason::ContentFilter => "incomplete",
        _ => "completed",
    }
}

/// Usage in the Interactions split: output EXCLUDES thoughts (canonical output includes them),
/// and the total is input + output + thoughts.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "total_input_tokens": u.input_tokens,
        "total_output_tokens": u.output_tokens.saturating_sub(u.reasoning_tokens),
        "total_thought_tokens": u.reasoning_tokens,
        "total_cached_tokens": u.cached_input_tokens,
        "total_tool_use_tokens": 0,
        "total_tokens": u.total(),
    })
}

fn arguments_object(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({}),
    }
}

fn step_of(part: &Part) -> Option<Value> {
    Some(match part {
        Part::Text(t) => json!({"type": "model_output", "content": [{"type": "text", "text": t}]}),
        Part::Reasoning(r) => {
            let mut s = Map::new();
            s.insert("type".into(), json!("thought"));
            if let Some(sig) = &r.signature {
                s.insert("signature".into(), json!(sig));
            }
            if !r.text.is_empty() {
                s.insert("summary".into(), json!([{"type": "text", "text": r.text}]));
            }
            if let Some(data) = &r.redacted {
                s.insert("redacted".into(), json!(data));
            }
            Value::Object(s)
        }
        Part::ToolCall(c) => {
            let mut s = Map::new();
            s.insert("type".into(), json!("function_call"));
            s.insert("id".into(), json!(c.id));
            s.insert("name".into(), json!(c.name));
            s.insert("arguments".into(), arguments_object(&c.arguments));
            if let Some(sig) = &c.signature {
                s.insert("signature".into(), json!(sig));
            }
            Value::Object(s)
        }
        Part::Image(_) | Part::File { .. } | Part::ToolResult(_) => return None,
    })
}

fn interaction(
    id: &str,
    model: &str,
    created: u64,
    served: Tier,
    stop: StopReason,
    usage: &Usage,
    content: &[Part],
) -> Value {
    let steps: Vec<Value> = content.iter().filter_map(step_of).collect();
    let has_call = content.iter().any(|p| matches!(p, Part::ToolCall(_)));
    json!({
        "id": interaction_id(id),
        "object": "interaction",
        "status": status(stop, has_call),
        "model": model,
        "created": iso8601(created),
        "updated": iso8601(now_secs().max(created)),
        "service_tier": served.as_str(),
        "usage": usage_json(usage),
        "steps": steps,
    })
}

/// The complete response as an `Interaction`, reporting the served tier in `service_tier`.
pub fn render_response(r: &Response, served: Tier) -> Value {
    interaction(
        &r.id, &r.model, r.created, served, r.stop, &r.usage, &r.content,
    )
}

/// Canonical events → Interactions SSE: `interaction.created`, then per output step
/// `step.start` / `step.delta`… / `step.stop`, then `interaction.completed` with the final
/// interaction (status, usage and the steps), or `error`. Each event's JSON carries its
/// `event_type`, which is also the SSE `event:` name.
pub struct StreamEncoder {
    served: Tier,
    model: String,
    id: String,
    created: u64,
    started: bool,
    finished: bool,
    failed: bool,
    /// Canonical block index → step index, for the open steps.
    open: Vec<(usize, usize)>,
    next_step: usize,
    acc: Accumulator,
}

impl StreamEncoder {
    pub fn new(served: Tier, model: &str) -> Self {
        Self {
            served,
            model: model.to_string(),
            id: String::new(),
            created: 0,
            started: false,
            finished: false,
            failed: false,
            open: Vec::new(),
            next_step: 0,
            acc: Accumulator::default(),
        }
    }

    fn emit(out: &mut Vec<Event>, data: Value) {
        let kind = data["event_type"].as_str().unwrap_or_default().to_string();
        out.push(Event::new(kind, data.to_string()));
    }

    fn ensure_started(&mut self, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        self.id = interaction_id(&self.id);
        if self.created == 0 {
            self.created = now_secs();
        }
        let created = iso8601(self.created);
        Self::emit(
            out,
            json!({
                "event_type": "interaction.created",
                "interaction": {
                    "id": self.id,
                    "object": "interaction",
                    "status": "in_progress",
                    "model": self.model,
                    "created": created,
                    "updated": created,
                    "service_tier": self.served.as_str(),
                },
            }),
        );
    }

    fn step_index(&self, index: usize) -> Option<usize> {
        self.open.iter().find(|(i, _)| *i == index).map(|(_, s)| *s)
    }

    fn start_step(&mut self, index: usize, step: Value, out: &mut Vec<Event>) -> usize {
        self.ensure_started(out);
        let s = self.next_step;
        self.next_step += 1;
        self.open.push((index, s));
        Self::emit(
            out,
            json!({"event_type": "step.start", "index": s, "step": step}),
        );
        s
    }

    /// The step of block `index`, opening one with `step` when a delta arrives first.
    fn step_for(&mut self, index: usize, step: Value, out: &mut Vec<Event>) -> usize {
        match self.step_index(index) {
            Some(s) => s,
            None => self.start_step(index, step, out),
        }
    }

    fn delta(out: &mut Vec<Event>, step: usize, delta: Value) {
        Self::emit(
            out,
            json!({"event_type": "step.delta", "index": step, "delta": delta}),
        );
    }

    fn stop_step(&mut self, index: usize, out: &mut Vec<Event>) {
        if let Some(pos) = self.open.iter().position(|(i, _)| *i == index) {
            let (_, s) = self.open.remove(pos);
            Self::emit(out, json!({"event_type": "step.stop", "index": s}));
        }
    }
}

fn text_step() -> Value {
    json!({"type": "model_output", "content": []})
}

fn thought_step() -> Value {
    json!({"type": "thought", "summary": []})
}

impl Encoder for StreamEncoder {
    fn set_served(&mut self, served: Tier) {
        self.served = served;
    }

    fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<Event>) {
        if self.finished {
            return;
        }
        self.acc.push(ev);
        match ev {
            StreamEvent::Start {
                id, model, created, ..
            } => {
                if !self.started {
                    self.id.clone_from(id);
                    self.created = *created;
                    if self.model.is_empty() {
                        self.model.clone_from(model);
                    }
                }
                self.ensure_started(out);
            }
            StreamEvent::TextStart { index } => {
                self.step_for(*index, text_step(), out);
            }
            StreamEvent::TextDelta { index, text } => {
                let s = self.step_for(*index, text_step(), out);
                Self::delta(out, s, json!({"type": "text", "text": text}));
            }
            StreamEvent::ToolCallStart {
                index,
                id,
                name,
                signature,
            } => {
                let mut step = Map::new();
                step.insert("type".into(), json!("function_call"));
                step.insert("id".into(), json!(id));
                step.insert("name".into(), json!(name));
                step.insert("arguments".into(), json!({}));
                if let Some(sig) = signature {
                    step.insert("signature".into(), json!(sig));
                }
                self.step_for(*index, Value::Object(step), out);
            }
            StreamEvent::ToolCallDelta { index, arguments } => {
                let step = json!({"type": "function_call", "id": "", "name": "", "arguments": {}});
                let s = self.step_for(*index, step, out);
                if !arguments.is_empty() {
                    Self::delta(
                        out,
                        s,
                        json!({"type": "arguments_delta", "arguments": arguments}),
                    );
                }
            }
            StreamEvent::ReasoningStart { index } => {
                self.step_for(*index, thought_step(), out);
            }
            StreamEvent::ReasoningDelta { index, text } => {
                let s = self.step_for(*index, thought_step(), out);
                Self::delta(
                    out,
                    s,
                    json!({"type": "thought_summary", "content": {"type": "text", "text": text}}),
                );
            }
            StreamEvent::ReasoningSignature { index, signature } => {
                let s = self.step_for(*index, thought_step(), out);
                Self::delta(
                    out,
                    s,
                    json!({"type": "thought_signature", "signature": signature}),
                );
            }
            StreamEvent::BlockStop { index } => self.stop_step(*index, out),
            StreamEvent::Finish { stop, .. } => {
                self.ensure_started(out);
                let open: Vec<usize> = self.open.iter().map(|(i, _)| *i).collect();
                for index in open {
                    self.stop_step(index, out);
                }
                self.finished = true;
                let stop = if self.failed {
                    StopReason::Error
                } else {
                    *stop
                };
                let r = std::mem::take(&mut self.acc).finish();
                let interaction = interaction(
                    &self.id,
                    &self.model,
                    self.created,
                    self.served,
                    stop,
                    &r.usage,
                    &r.content,
                );
                Self::emit(
                    out,
                    json!({"event_type": "interaction.completed", "interaction": interaction}),
                );
            }
            StreamEvent::Error { message } => {
                self.ensure_started(out);
                self.failed = true;
                Self::emit(
                    out,
                    json!({
                        "event_type": "error",
                        "error": {"code": "upstream_error", "message": message},
                    }),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::canonical::events_of;

    fn raw(v: Value) -> RawBody {
        RawBody::parse(v.to_string().as_bytes(), CallerFormat::Interactions).unwrap()
    }

    fn parse(v: Value) -> Request {
        parse_request(&raw(v)).unwrap()
    }

    fn parse_err(v: Value) -> ApiError {
        parse_request(&raw(v)).unwrap_err()
    }

    fn user(text: &str) -> Message {
        Message {
            role: Role::User,
            parts: vec![Part::Text(text.into())],
        }
    }

    #[test]
    fn string_input_and_generation_config() {
        let r = parse(json!({
            "model": "gemini-3.5-flash",
            "input": "Summarize this contract.",
            "stream": true,
            "generation_config": {"max_output_tokens": 512, "temperature": 0.2, "top_p": 0.8,
                                  "thinking_level": "low", "thinking_summaries": "auto"}
        }));
        assert_eq!(r.model, "gemini-3.5-flash");
        assert_eq!(r.messages, vec![user("Summarize this contract.")]);
        assert!(r.stream);
        assert_eq!(r.max_output_tokens, Some(512));
        assert_eq!(r.temperature, Some(0.2));
        assert_eq!(r.top_p, Some(0.8));
        assert_eq!(r.reasoning, Some(Effort::Low));
        let r = parse(
            json!({"model": "m", "input": "x", "generation_config": {"thinking_level": "xhigh"}}),
        );
        assert_eq!(r.reasoning, Some(Effort::High));
        let e = parse_err(
            json!({"model": "m", "input": "x", "generation_config": {"thinking_level": "max"}}),
        );
        assert_eq!(e.param.as_deref(), Some("generation_config.thinking_level"));
    }

    #[test]
    fn seed_and_stop_sequences_are_refused_when_set() {
        for (config, param) in [
            (json!({"seed": 7}), "generation_config.seed"),
            (
                json!({"stop_sequences": ["END"]}),
                "generation_config.stop_sequences",
            ),
        ] {
            let e = parse_err(
                json!({"model": "gemini-3.5-flash", "input": "x", "generation_config": config}),
            );
            assert_eq!(e.code, "unsupported_parameter");
            assert_eq!(e.param.as_deref(), Some(param));
            let m = e.full_message();
            assert!(m.contains("Fix:") && m.contains("Example:"), "{m}");
        }
        // Defaults are fine.
        parse(json!({"model": "m", "input": "x",
            "generation_config": {"seed": null, "stop_sequences": []}}));
        let e = parse_err(json!({"model": "m", "input": "x", "previous_interaction_id": "v1_abc"}));
        assert_eq!(e.param.as_deref(), Some("previous_interaction_id"));
        assert_eq!(parse_err(json!({"model": "m"})).code, "missing_input");
        assert_eq!(parse_err(json!({"input": "x"})).code, "missing_model");
    }

    #[test]
    fn trap_9_system_instruction_becomes_the_system_prompt() {
        let r = parse(json!({"model": "m", "input": "hi", "system_instruction": "Be brief."}));
        assert_eq!(r.system, vec!["Be brief.".to_string()]);
        // Several canonical system prompts reach the response side untouched; the provider
        // merges them (see providers::gemini's trap 9 test).
    }

    #[test]
    fn content_array_is_one_user_turn_with_images_and_documents() {
        let r = parse(json!({"model": "m", "input": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "data": "iVBORw0K", "mime_type": "image/png"},
            {"type": "image", "uri": "https://example.com/cat.jpg"},
            {"type": "image", "uri": "data:image/webp;base64,UklG"},
            {"type": "document", "data": "JVBERi0x", "mime_type": "application/pdf"}
        ]}));
        assert_eq!(
            r.messages,
            vec![Message {
                role: Role::User,
                parts: vec![
                    Part::Text("What is this?".into()),
                    Part::Image(Media::Base64 {
                        mime: "image/png".into(),
                        data: "iVBORw0K".into()
                    }),
                    Part::Image(Media::Url("https://example.com/cat.jpg".into())),
                    Part::Image(Media::Base64 {
                        mime: "image/webp".into(),
                        data: "UklG".into()
                    }),
                    Part::File {
                        media: Media::Base64 {
                            mime: "application/pdf".into(),
                            data: "JVBERi0x".into()
                        },
                        filename: None
                    },
                ]
            }]
        );
        let e = parse_err(
            json!({"model": "m", "input": [{"type": "audio", "data": "AAAA", "mime_type": "audio/wav"}]}),
        );
        assert_eq!(e.code, "unsupported_parameter");
        // A single content object is accepted too.
        let r = parse(json!({"model": "m", "input": {"type": "text", "text": "solo"}}));
        assert_eq!(r.messages, vec![user("solo")]);
    }

    #[test]
    fn steps_multi_turn_with_tools_and_parallel_results() {
        let r = parse(json!({"model": "gemini-3.5-flash", "input": [
            {"type": "user_input", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
            {"type": "thought", "signature": "c2lnLXQ=", "summary": [{"type": "text", "text": "Two calls."}]},
            {"type": "function_call", "id": "fc_1", "name": "get_weather",
             "arguments": {"city": "Paris"}, "signature": "c2lnLWY="},
            {"type": "function_call", "id": "fc_2", "name": "get_weather", "arguments": {"city": "Rome"}},
            {"type": "function_result", "call_id": "fc_1", "name": "get_weather", "result": {"temp": 21}},
            {"type": "function_result", "call_id": "fc_2", "result": [{"type": "text", "text": "sunny"}],
             "is_error": false},
            {"type": "model_output", "content": [{"type": "text", "text": "Paris 21, Rome sunny."}]},
            {"type": "google_search_call", "id": "gs_1", "arguments": {"queries": ["x"]}},
            {"type": "user_input", "content": [{"type": "text", "text": "Thanks!"}]}
        ],
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
                  {"type": "google_search"}],
        "generation_config": {"tool_choice": {"allowed_tools": {"mode": "any", "tools": ["get_weather"]}}}
        }));
        assert_eq!(r.messages.len(), 5);
        assert_eq!(r.messages[0], user("Weather in Paris and Rome?"));
        assert_eq!(
            r.messages[1].parts,
            vec![
                Part::Reasoning(Reasoning {
                    text: "Two calls.".into(),
                    signature: Some("c2lnLXQ=".into()),
                    redacted: None
                }),
                Part::ToolCall(ToolCall {
                    id: "fc_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                    signature: Some("c2lnLWY=".into())
                }),
                Part::ToolCall(ToolCall {
                    id: "fc_2".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Rome"}"#.into(),
                    signature: None
                }),
            ]
        );
        // trap 3: both results in one user message.
        assert_eq!(r.messages[2].role, Role::User);
        assert_eq!(
            r.messages[2].parts,
            vec![
                Part::ToolResult(ToolResult {
                    call_id: "fc_1".into(),
                    name: Some("get_weather".into()),
                    content: r#"{"temp":21}"#.into(),
                    is_error: false
                }),
                Part::ToolResult(ToolResult {
                    call_id: "fc_2".into(),
                    name: None,
                    content: "sunny".into(),
                    is_error: false
                }),
            ]
        );
        assert_eq!(
            r.messages[3].parts,
            vec![Part::Text("Paris 21, Rome sunny.".into())]
        );
        assert_eq!(r.messages[4], user("Thanks!"));
        assert_eq!(r.tools.len(), 1);
        assert_eq!(r.tools[0].description.as_deref(), Some("Weather"));
        assert!(r.web_search);
        assert_eq!(r.tool_choice, ToolChoice::Tool("get_weather".into()));

        for (choice, want) in [
            (json!("any"), ToolChoice::Required),
            (json!("none"), ToolChoice::None),
            (json!("auto"), ToolChoice::Auto),
            (
                json!({"allowed_tools": {"mode": "any", "tools": ["a", "b"]}}),
                ToolChoice::Required,
            ),
        ] {
            let r = parse(
                json!({"model": "m", "input": "x", "generation_config": {"tool_choice": choice}}),
            );
            assert_eq!(r.tool_choice, want);
        }
        let e =
            parse_err(json!({"model": "m", "input": "x", "tools": [{"type": "code_execution"}]}));
        assert_eq!(
            (e.code, e.param.as_deref()),
            ("unsupported_parameter", Some("tools"))
        );
    }

    #[test]
    fn response_formats() {
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]});
        let r = parse(json!({"model": "m", "input": "x",
            "response_format": {"type": "text", "mime_type": "application/json", "schema": schema}}));
        assert_eq!(
            r.response_format,
            Some(ResponseFormat::JsonSchema {
                name: "response".into(),
                schema: schema.clone(),
                strict: None
            })
        );
        let r = parse(json!({"model": "m", "input": "x", "response_format": schema}));
        assert!(matches!(
            r.response_format,
            Some(ResponseFormat::JsonSchema { .. })
        ));
        let r = parse(json!({"model": "m", "input": "x",
            "response_format": [{"type": "text", "mime_type": "application/json"}]}));
        assert_eq!(r.response_format, Some(ResponseFormat::JsonObject));
        let r =
            parse(json!({"model": "m", "input": "x", "response_mime_type": "application/json"}));
        assert_eq!(r.response_format, Some(ResponseFormat::JsonObject));
        let r = parse(
            json!({"model": "m", "input": "x", "response_format": {"type": "text", "mime_type": "text/plain"}}),
        );
        assert_eq!(r.response_format, None);
    }

    fn sample_response() -> Response {
        Response {
            id: "resp-1".into(),
            model: "gemini-3.5-flash".into(),
            content: vec![
                Part::Reasoning(Reasoning {
                    text: "Thinking.".into(),
                    signature: Some("c2ln".into()),
                    redacted: None,
                }),
                Part::Text("Hello!".into()),
            ],
            stop: StopReason::EndTurn,
            usage: Usage {
                input_tokens: 1200,
                cached_input_tokens: 0,
                output_tokens: 244,
                reasoning_tokens: 64,
            },
            created: 1_750_000_000,
            provider: None,
        }
    }

    #[test]
    fn renders_the_seed_shape() {
        let v = render_response(&sample_response(), Tier::Flex);
        assert_eq!(v["id"], "interaction_resp-1");
        assert_eq!(v["object"], "interaction");
        assert_eq!(v["status"], "completed");
        assert_eq!(v["model"], "gemini-3.5-flash");
        assert_eq!(v["created"], "2025-06-15T15:06:40Z");
        assert!(v["updated"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["service_tier"], "flex");
        // The seed's numbers: 1200 in, 180 out, 64 thought, 1444 total.
        assert_eq!(
            v["usage"],
            json!({"total_input_tokens": 1200, "total_output_tokens": 180,
                   "total_thought_tokens": 64, "total_cached_tokens": 0,
                   "total_tool_use_tokens": 0, "total_tokens": 1444})
        );
        assert_eq!(
            v["steps"],
            json!([
                {"type": "thought", "signature": "c2ln", "summary": [{"type": "text", "text": "Thinking."}]},
                {"type": "model_output", "content": [{"type": "text", "text": "Hello!"}]}
            ])
        );
        assert_eq!(
            render_response(&sample_response(), Tier::Standard)["service_tier"],
            "standard"
        );
        assert_eq!(
            render_response(&sample_response(), Tier::Priority)["service_tier"],
            "priority"
        );
    }

    #[test]
    fn statuses() {
        let mut r = sample_response();
        r.stop = StopReason::MaxTokens;
        assert_eq!(render_response(&r, Tier::Flex)["status"], "incomplete");
        r.stop = StopReason::Error;
        assert_eq!(render_response(&r, Tier::Flex)["status"], "failed");
        r.stop = StopReason::ContentFilter;
        assert_eq!(render_response(&r, Tier::Flex)["status"], "incomplete");
        r.stop = StopReason::ToolUse;
        r.content.push(Part::ToolCall(ToolCall {
            id: "call_1".into(),
            name: "f".into(),
            arguments: r#"{"a":1}"#.into(),
            signature: Some("U0lH".into()),
        }));
        let v = render_response(&r, Tier::Flex);
        assert_eq!(v["status"], "requires_action");
        assert_eq!(
            v["steps"][2],
            json!({"type": "function_call", "id": "call_1", "name": "f",
                   "arguments": {"a": 1}, "signature": "U0lH"})
        );
    }

    #[test]
    fn round_trip_caller_body_to_canonical_to_render_and_back() {
        // Turn 1: the caller's body → canonical.
        let req = parse(
            json!({"model": "gemini-3.5-flash", "input": "Weather in Paris?",
            "tools": [{"type": "function", "name": "get_weather",
                       "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]}),
        );
        assert_eq!(req.messages, vec![user("Weather in Paris?")]);
        // The model answers with a signed call; render it.
        let resp = Response {
            id: "r1".into(),
            model: "gemini-3.5-flash".into(),
            content: vec![Part::ToolCall(ToolCall {
                id: "call_7".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
                signature: Some("U0lH".into()),
            })],
            stop: StopReason::ToolUse,
            usage: Usage::default(),
            created: 1,
            provider: None,
        };
        let rendered = render_response(&resp, Tier::Standard);
        assert_eq!(rendered["status"], "requires_action");
        // Turn 2: the caller sends the steps back with the result (the SDK idiom).
        let mut input = vec![
            json!({"type": "user_input", "content": [{"type": "text", "text": "Weather in Paris?"}]}),
        ];
        input.extend(rendered["steps"].as_array().unwrap().iter().cloned());
        input.push(json!({"type": "function_result", "call_id": "call_7", "name": "get_weather", "result": "sunny"}));
        let req2 = parse(json!({"model": "gemini-3.5-flash", "input": input}));
        assert_eq!(
            req2.messages[1].parts, resp.content,
            "the call and its signature survive"
        );
        assert!(matches!(&req2.messages[2].parts[0], Part::ToolResult(t) if t.call_id == "call_7"));
    }

    fn decode(events: &[Event]) -> Vec<Value> {
        events
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_str(&e.data).unwrap();
                assert_eq!(e.event, v["event_type"].as_str().unwrap());
                v
            })
            .collect()
    }

    #[test]
    fn stream_event_order_and_shapes() {
        let mut r = sample_response();
        r.content.push(Part::ToolCall(ToolCall {
            id: "call_1".into(),
            name: "f".into(),
            arguments: r#"{"a":1}"#.into(),
            signature: None,
        }));
        r.stop = StopReason::ToolUse;
        let mut enc = StreamEncoder::new(Tier::Flex, "gemini-3.5-flash");
        let mut out = Vec::new();
        for e in events_of(&r) {
            enc.encode(&e, &mut out);
        }
        let v = decode(&out);
        let kinds: Vec<&str> = v
            .iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "interaction.created",
                "step.start",
                "step.delta",
                "step.delta",
                "step.stop",
                "step.start",
                "step.delta",
                "step.stop",
                "step.start",
                "step.delta",
                "step.stop",
                "interaction.completed"
            ]
        );
        assert_eq!(
            v[0]["interaction"],
            json!({"id": "interaction_resp-1", "object": "interaction", "status": "in_progress",
                   "model": "gemini-3.5-flash", "created": "2025-06-15T15:06:40Z",
                   "updated": "2025-06-15T15:06:40Z", "service_tier": "flex"})
        );
        assert_eq!(
            v[1],
            json!({"event_type": "step.start", "index": 0, "step": {"type": "thought", "summary": []}})
        );
        assert_eq!(
            v[2]["delta"],
            json!({"type": "thought_summary", "content": {"type": "text", "text": "Thinking."}})
        );
        assert_eq!(
            v[3]["delta"],
            json!({"type": "thought_signature", "signature": "c2ln"})
        );
        assert_eq!(v[4], json!({"event_type": "step.stop", "index": 0}));
        assert_eq!(v[5]["step"], json!({"type": "model_output", "content": []}));
        assert_eq!(
            v[6],
            json!({"event_type": "step.delta", "index": 1, "delta": {"type": "text", "text": "Hello!"}})
        );
        assert_eq!(
            v[8]["step"],
            json!({"type": "function_call", "id": "call_1", "name": "f", "arguments": {}})
        );
        assert_eq!(
            v[9]["delta"],
            json!({"type": "arguments_delta", "arguments": "{\"a\":1}"})
        );
        let done = &v[11]["interaction"];
        assert_eq!(done["status"], "requires_action");
        assert_eq!(done["usage"]["total_tokens"], 1444);
        assert_eq!(done["service_tier"], "flex");
        assert_eq!(done["steps"].as_array().unwrap().len(), 3);
        assert_eq!(done["steps"][2]["arguments"], json!({"a": 1}));
    }

    #[test]
    fn stream_errors_and_fragments() {
        let mut enc = StreamEncoder::new(Tier::Standard, "gpt-5.5");
        let mut out = Vec::new();
        for e in [
            StreamEvent::Start {
                id: "x".into(),
                model: "gpt-5.5-2026".into(),
                created: 2,
                provider: None,
            },
            StreamEvent::ToolCallStart {
                index: 3,
                id: "c".into(),
                name: "f".into(),
                signature: None,
            },
            StreamEvent::ToolCallDelta {
                index: 3,
                arguments: "{\"a\":".into(),
            },
            StreamEvent::ToolCallDelta {
                index: 3,
                arguments: "1}".into(),
            },
            StreamEvent::Error {
                message: "boom".into(),
            },
            StreamEvent::Finish {
                stop: StopReason::ToolUse,
                usage: Usage {
                    input_tokens: 3,
                    output_tokens: 2,
                    ..Usage::default()
                },
            },
            StreamEvent::TextDelta {
                index: 9,
                text: "after the end".into(),
            },
        ] {
            enc.encode(&e, &mut out);
        }
        let v = decode(&out);
        let kinds: Vec<&str> = v
            .iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "interaction.created",
                "step.start",
                "step.delta",
                "step.delta",
                "error",
                "step.stop",
                "interaction.completed"
            ]
        );
        assert_eq!(v[0]["interaction"]["model"], "gpt-5.5");
        assert_eq!(v[1]["index"], 0);
        assert_eq!(
            v[4]["error"],
            json!({"code": "upstream_error", "message": "boom"})
        );
        let done = &v[6]["interaction"];
        assert_eq!(done["status"], "failed");
        assert_eq!(done["steps"][0]["arguments"], json!({"a": 1}));
        assert_eq!(done["usage"]["total_tokens"], 5);
        assert_eq!(done["service_tier"], "standard");
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_750_000_000), "2025-06-15T15:06:40Z");
    }
}
