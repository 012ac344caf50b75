//! Gemini Developer API: `POST {base}/v1beta/models/{model}:streamGenerateContent?alt=sse`
//! (header `x-goog-api-key`, camelCase JSON). We always stream; each SSE `data:` is a whole
//! `GenerateContentResponse`, and there is no terminal event: the chunk carrying
//! `finishReason` (with the final `usageMetadata`) ends the answer.
//!
//! Request mapping (canonical → Gemini):
//! - tier → top-level `serviceTier` `flex|standard|priority` (`Auto` never reaches Gemini);
//! - system prompts → `systemInstruction.parts`, one text part each, in order (trap 9);
//! - messages → `contents` (`user` / `model`); consecutive messages of one role are merged into
//!   one content, so parallel tool results always travel in one user turn (trap 3);
//! - images and files → `inlineData{mimeType,data}` for data URLs, `fileData{fileUri,mimeType}`
//!   for URLs, the MIME type guessed from the extension (trap 8);
//! - tool calls → `functionCall{id,name,args}` parts carrying `thoughtSignature` from
//!   `ToolCall.signature` (trap 2); on Gemini 3 models a model step whose calls carry no
//!   signature (a conversation that began on another provider) gets Google's documented
//!   placeholder signature so validation does not reject the history;
//! - tool results → `functionResponse{id,name,response:{result|error}}`; the name comes from the
//!   result or from the matching call earlier in the conversation (trap 3);
//! - reasoning parts are not replayed: Gemini only validates the signatures on function calls,
//!   which travel on the calls themselves, and a foreign signature would be rejected;
//! - tools → `functionDeclarations` with `parametersJsonSchema` (full JSON Schema, so
//!   `additionalProperties` and friends are accepted), `web_search` → `{googleSearch:{}}`;
//! - structured output → `responseMimeType: application/json` + `responseJsonSchema`;
//! - reasoning effort → `thinkingConfig` per model family, see [`thinking_config`].

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flex_shared::catalog::{Provider, Tier};
use http::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Map, Value};

use super::{AskTier, Decoder};
use crate::canonical::{
    call_name, Effort, Media, Message, Part, Request, ResponseFormat, Role, StopReason,
    StreamEvent, ToolChoice, Usage,
};
use crate::error::ApiError;
use crate::ids;
use crate::race::EventClass;
use crate::sse::Event;

/// Google's documented placeholder for function calls whose real signature is unknown (history
/// produced by another model); Gemini 3 accepts it in place of a thought signature.
pub const PLACEHOLDER_SIGNATURE: &str = "skip_thought_signature_validator";

/// The `serviceTier` value for a tier. `Auto` has no Gemini equivalent; the proxy refuses it
/// with `auto_unsupported_for_gemini` before translating, so reaching here is a bug.
pub fn tier_value(t: AskTier) -> Result<&'static str, ApiError> {
    match t {
        AskTier::Flex => Ok("flex"),
        AskTier::Standard => Ok("standard"),
        AskTier::Priority => Ok("priority"),
        AskTier::Auto => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "Internal error: the tier `auto` was about to be sent to Gemini, which has no such tier.",
        )
        .fix("this is a FlexInference bug; retry with start_within \"default\" or a duration and report it.")
        .example(r#""start_within": "default""#)),
    }
}

/// The tier Gemini reports in `usageMetadata.serviceTier` (any case, `SERVICE_TIER_` prefix
/// tolerated).
pub fn served_tier(v: &str) -> Option<Tier> {
    let up = v.to_ascii_uppercase();
    match up.trim_start_matches("SERVICE_TIER_") {
        "FLEX" => Some(Tier::Flex),
        "STANDARD" | "UNSPECIFIED" | "DEFAULT" => Some(Tier::Standard),
        "PRIORITY" => Some(Tier::Priority),
        _ => None,
    }
}

fn bad_model(model: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_request",
        format!("The model id `{model}` cannot be addressed on Gemini: it must be letters, digits, `.`, `_` and `-` only."),
    )
    .param("model")
    .fix("use a Gemini model id from GET /v1/models.")
    .example(r#"{"model": "gemini-3.5-flash", ...}"#)
}

/// The model id as it goes into the URL path (`models/` prefix dropped).
fn path_model(model: &str) -> Result<&str, ApiError> {
    let m = model.strip_prefix("models/").unwrap_or(model);
    if m.is_empty()
        || !m
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad_model(model));
    }
    Ok(m)
}

/// The streaming URL for `model` under `base` (the SDK convention: the base has no version).
pub fn url(base: &str, model: &str) -> Result<String, ApiError> {
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/v1beta").unwrap_or(base);
    Ok(format!(
        "{base}/v1beta/models/{}:streamGenerateContent?alt=sse",
        path_model(model)?
    ))
}

/// Builds the upstream request for `req` at tier `tier`, always streaming.
pub fn request(
    base: &str,
    req: &Request,
    tier: AskTier,
    key: &SecretString,
) -> Result<http::Request<Bytes>, ApiError> {
    let url = url(base, &req.model)?;
    let body = serde_json::to_vec(&body(req, tier)?).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("Internal error: the Gemini request could not be serialized: {e}."),
        )
    })?;
    // Sensitive: never put in HTTP/2's header compression table.
    let mut auth = http::HeaderValue::from_str(key.expose_secret()).map_err(|_| {
        ApiError::internal("the stored Gemini key contains characters not allowed in a header")
    })?;
    auth.set_sensitive(true);
    http::Request::post(&url)
        .header("x-goog-api-key", auth)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "text/event-stream")
        .body(Bytes::from(body))
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "bad_upstream_url",
                format!("The Gemini base URL `{base}` does not form a valid request URL: {e}."),
            )
            .fix("correct --gemini-base-url (e.g. https://generativelanguage.googleapis.com).")
        })
}

/// The upstream JSON body alone (what [`request`] sends).
pub fn body(req: &Request, tier: AskTier) -> Result<Value, ApiError> {
    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents(req)?));
    if !req.system.is_empty() {
        let parts: Vec<Value> = req.system.iter().map(|s| json!({"text": s})).collect();
        out.insert("systemInstruction".into(), json!({ "parts": parts }));
    }
    let mut tools = Vec::new();
    if !req.tools.is_empty() {
        let decls: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                let mut d = Map::new();
                d.insert("name".into(), json!(t.name));
                if let Some(desc) = t.description.as_deref().filter(|d| !d.is_empty()) {
                    d.insert("description".into(), json!(desc));
                }
                if let Some(schema) = parameters_schema(&t.parameters) {
                    d.insert("parametersJsonSchema".into(), schema);
                }
                Value::Object(d)
            })
            .collect();
        tools.push(json!({ "functionDeclarations": decls }));
    }
    if req.web_search {
        tools.push(json!({"googleSearch": {}}));
    }
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
    }
    let calling = match &req.tool_choice {
        ToolChoice::Auto => None,
        ToolChoice::None => Some(json!({"mode": "NONE"})),
        ToolChoice::Required => Some(json!({"mode": "ANY"})),
        ToolChoice::Tool(name) => Some(json!({"mode": "ANY", "allowedFunctionNames": [name]})),
    };
    if let Some(c) = calling {
        out.insert("toolConfig".into(), json!({ "functionCallingConfig": c }));
    }
    let mut gen = Map::new();
    if let Some(n) = req.max_output_tokens {
        gen.insert("maxOutputTokens".into(), json!(n));
    }
    if let Some(t) = req.temperature {
        gen.insert("temperature".into(), json!(t));
    }
    if let Some(p) = req.top_p {
        gen.insert("topP".into(), json!(p));
    }
    match &req.response_format {
        None => {}
        Some(ResponseFormat::JsonObject) => {
            gen.insert("responseMimeType".into(), json!("application/json"));
        }
        Some(ResponseFormat::JsonSchema { schema, .. }) => {
            gen.insert("responseMimeType".into(), json!("application/json"));
            gen.insert("responseJsonSchema".into(), clean_schema(schema));
        }
    }
    if let Some(effort) = req.reasoning {
        if let Some(tc) = thinking_config(&req.model, effort) {
            gen.insert("thinkingConfig".into(), tc);
        }
    }
    if !gen.is_empty() {
        out.insert("generationConfig".into(), Value::Object(gen));
    }
    out.insert("serviceTier".into(), json!(tier_value(tier)?));
    Ok(Value::Object(out))
}

/// A JSON Schema as Gemini's `*JsonSchema` fields take it: `$schema` dropped (not in the
/// supported keyword list), everything else kept.
fn clean_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "$schema")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The parameters schema of a function, or `None` for a function without parameters (Gemini
/// wants the field left out rather than an empty object schema).
fn parameters_schema(params: &Value) -> Option<Value> {
    let m = params.as_object()?;
    let no_props = m
        .get("properties")
        .is_none_or(|p| p.as_object().is_some_and(Map::is_empty));
    let only_shape = m.keys().all(|k| {
        matches!(
            k.as_str(),
            "type" | "properties" | "additionalProperties" | "required" | "$schema"
        )
    });
    if no_props && only_shape {
        return None;
    }
    Some(clean_schema(params))
}

/// The Gemini generation a model id belongs to, for the features that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// 1.x / 2.0: no thinking.
    NoThinking,
    /// 2.5: `thinkingBudget` in tokens.
    Budget,
    /// Gemini 3 Pro (3.0): `thinkingLevel` low | high.
    LevelsLowHigh,
    /// Gemini 3.1+ Pro: low | medium | high.
    LevelsNoMinimal,
    /// Gemini 3 Flash / Flash-Lite and newer or unknown models: minimal | low | medium | high.
    LevelsAll,
}

/// `(major, minor)` of `gemini-<major>[.<minor>]-…`.
fn version(model: &str) -> Option<(u32, u32)> {
    let m = model.strip_prefix("models/").unwrap_or(model);
    let rest = m.strip_prefix("gemini-")?;
    let v = rest.split('-').next()?;
    let mut it = v.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

fn family(model: &str) -> Family {
    let is_pro = model.contains("-pro");
    match version(model) {
        Some((0..=1, _)) | Some((2, 0..=4)) => Family::NoThinking,
        Some((2, _)) => Family::Budget,
        Some((3, 0)) if is_pro => Family::LevelsLowHigh,
        Some(_) if is_pro => Family::LevelsNoMinimal,
        _ => Family::LevelsAll,
    }
}

/// Whether the model validates thought signatures on function calls (Gemini 3 and newer).
fn validates_signatures(model: &str) -> bool {
    version(model).is_none_or(|(major, _)| major >= 3)
}

/// `thinkingConfig` for a reasoning effort, clamped per model:
/// - Gemini 3 Flash, 3.1 Flash-Lite, 3.5 Flash (and unknown newer ids): `thinkingLevel` as asked
///   (minimal | low | medium | high);
/// - Gemini 3.1+ Pro: no `minimal`, so minimal → low;
/// - Gemini 3 Pro: low | high only, so minimal → low and medium → high;
/// - Gemini 2.5: `thinkingBudget` = the effort's token budget (1024 / 2048 / 8192 / 24576, inside
///   every 2.5 model's range);
/// - Gemini 2.0 and older: no thinking, the field is left out.
///
/// `includeThoughts` is set so the thought summaries come back as reasoning blocks.
pub fn thinking_config(model: &str, effort: Effort) -> Option<Value> {
    let level = |e: Effort| json!({"thinkingLevel": e.as_str(), "includeThoughts": true});
    match family(model) {
        Family::NoThinking => None,
        Family::Budget => {
            Some(json!({"thinkingBudget": effort.budget_tokens(), "includeThoughts": true}))
        }
        Family::LevelsLowHigh => Some(level(match effort {
            Effort::Minimal | Effort::Low => Effort::Low,
            Effort::Medium | Effort::High => Effort::High,
        })),
        Family::LevelsNoMinimal => Some(level(effort.max(Effort::Low))),
        Family::LevelsAll => Some(level(effort)),
    }
}

fn gemini_role(r: Role) -> &'static str {
    match r {
        Role::User => "user",
        Role::Assistant => "model",
    }
}

/// A MIME type from a URL's or file name's extension.
pub fn guess_mime(path: &str) -> &'static str {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "md" => "text/markdown",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "json" => "application/json",
        "mp3" => "audio/mp3",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        _ => "application/octet-stream",
    }
}

fn media_part(media: &Media, filename: Option<&str>) -> Value {
    match media {
        Media::Base64 { mime, data } => {
            json!({"inlineData": {"mimeType": mime, "data": data}})
        }
        Media::Url(u) => {
            let mut mime = guess_mime(u);
            if mime == "application/octet-stream" {
                if let Some(f) = filename {
                    mime = guess_mime(f);
                }
            }
            json!({"fileData": {"fileUri": u, "mimeType": mime}})
        }
    }
}

fn tool_result_response(content: &str, is_error: bool) -> Value {
    let value = serde_json::from_str::<Value>(content)
        .ok()
        .filter(|v| v.is_object() || v.is_array())
        .unwrap_or_else(|| Value::String(content.to_string()));
    if is_error {
        json!({ "error": value })
    } else {
        json!({ "result": value })
    }
}

fn missing_call_name(call_id: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_request",
        format!("A tool result answers call `{call_id}`, but no earlier tool call has that id, so its function name is unknown (Gemini requires the name)."),
    )
    .param("messages")
    .fix("send the assistant turn with the matching tool call before its result, or give the result the function name.")
    .example(r#"[{"role":"assistant","tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{}"}}]},{"role":"tool","tool_call_id":"call_1","content":"sunny"}]"#)
}

fn contents(req: &Request) -> Result<Vec<Value>, ApiError> {
    let signatures = validates_signatures(&req.model);
    let mut out: Vec<(Role, Vec<Value>)> = Vec::new();
    for m in &req.messages {
        let parts = message_parts(m, &req.messages)?;
        if parts.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some((role, existing)) if *role == m.role => existing.extend(parts),
            _ => out.push((m.role, parts)),
        }
    }
    Ok(out
        .into_iter()
        .map(|(role, mut parts)| {
            if signatures && role == Role::Assistant {
                sign_first_calls(&mut parts);
            }
            json!({"role": gemini_role(role), "parts": parts})
        })
        .collect())
}

/// In each run of consecutive `functionCall` parts (one model step), Gemini 3 requires a
/// signature on the first call. When no call of the run has one (the history came from another
/// provider), the first gets [`PLACEHOLDER_SIGNATURE`].
fn sign_first_calls(parts: &mut [Value]) {
    let mut i = 0;
    while i < parts.len() {
        if parts[i].get("functionCall").is_none() {
            i += 1;
            continue;
        }
        let start = i;
        while i < parts.len() && parts[i].get("functionCall").is_some() {
            i += 1;
        }
        let run = &mut parts[start..i];
        if run.iter().all(|p| p.get("thoughtSignature").is_none()) {
            if let Some(first) = run.first_mut().and_then(Value::as_object_mut) {
                first.insert("thoughtSignature".into(), json!(PLACEHOLDER_SIGNATURE));
            }
        }
    }
}

fn message_parts(m: &Message, all: &[Message]) -> Result<Vec<Value>, ApiError> {
    let mut parts = Vec::new();
    for p in &m.parts {
        match p {
            Part::Text(t) => {
                if !t.is_empty() {
                    parts.push(json!({ "text": t }));
                }
            }
            Part::Image(media) => parts.push(media_part(media, None)),
            Part::File { media, filename } => parts.push(media_part(media, filename.as_deref())),
            Part::ToolCall(c) => {
                let args = serde_json::from_str::<Value>(&c.arguments)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({}));
                let mut call = Map::new();
                if !c.id.is_empty() {
                    call.insert("id".into(), json!(c.id));
                }
                call.insert("name".into(), json!(c.name));
                call.insert("args".into(), args);
                let mut part = Map::new();
                part.insert("functionCall".into(), Value::Object(call));
                if let Some(sig) = c.signature.as_deref().filter(|s| !s.is_empty()) {
                    part.insert("thoughtSignature".into(), json!(sig));
                }
                parts.push(Value::Object(part));
            }
            Part::ToolResult(r) => {
                let name = r
                    .name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .or_else(|| call_name(all, &r.call_id))
                    .ok_or_else(|| missing_call_name(&r.call_id))?;
                let mut resp = Map::new();
                if !r.call_id.is_empty() {
                    resp.insert("id".into(), json!(r.call_id));
                }
                resp.insert("name".into(), json!(name));
                resp.insert(
                    "response".into(),
                    tool_result_response(&r.content, r.is_error),
                );
                parts.push(json!({ "functionResponse": resp }));
            }
            // Not replayed: see the module docs.
            Part::Reasoning(_) => {}
        }
    }
    Ok(parts)
}

/// How a raw upstream event counts for the flex race.
pub fn classify(ev: &Event) -> EventClass {
    let data = ev.data.trim();
    if data.is_empty() {
        return EventClass::Lifecycle;
    }
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return EventClass::Error;
    };
    if let Some(err) = v.get("error") {
        return match err["status"].as_str() {
            Some("RESOURCE_EXHAUSTED" | "UNAVAILABLE") => EventClass::CapacityError,
            _ if matches!(err["code"].as_u64(), Some(429 | 503)) => EventClass::CapacityError,
            _ => EventClass::Error,
        };
    }
    let started = v["candidates"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            c["content"]["parts"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
                || c["finishReason"].is_string()
        })
    }) || v["promptFeedback"]["blockReason"].is_string();
    if started {
        EventClass::Start
    } else {
        EventClass::Lifecycle
    }
}

/// The canonical stop reason for a `finishReason`.
pub fn stop_reason(finish: &str, saw_tool_call: bool) -> StopReason {
    match finish {
        "MAX_TOKENS" => StopReason::MaxTokens,
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => StopReason::ContentFilter,
        "MALFORMED_FUNCTION_CALL"
        | "UNEXPECTED_TOOL_CALL"
        | "TOO_MANY_TOOL_CALLS"
        | "MISSING_THOUGHT_SIGNATURE"
        | "MALFORMED_RESPONSE" => StopReason::Error,
        _ if saw_tool_call => StopReason::ToolUse,
        _ => StopReason::EndTurn,
    }
}

/// Canonical usage from `usageMetadata` (trap 6): input = prompt (cached included) + tool-use
/// prompt tokens (billed as input); output = candidates + thoughts, since Gemini's candidates
/// EXCLUDE thoughts.
pub fn usage_of(meta: &Value) -> Usage {
    let n = |k: &str| meta[k].as_u64().unwrap_or(0);
    Usage {
        input_tokens: n("promptTokenCount") + n("toolUsePromptTokenCount"),
        cached_input_tokens: n("cachedContentTokenCount"),
        output_tokens: n("candidatesTokenCount") + n("thoughtsTokenCount"),
        reasoning_tokens: n("thoughtsTokenCount"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Reasoning,
}

/// Gemini SSE → canonical events.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    started: bool,
    finished: bool,
    /// The open text or reasoning block and its index.
    open: Option<(Open, usize)>,
    next_index: usize,
    /// A function call was seen in any chunk: a later `STOP` means tool use (trap 5).
    saw_tool_call: bool,
    usage: Usage,
    served: Option<Tier>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    fn close(&mut self, out: &mut Vec<StreamEvent>) {
        if let Some((_, index)) = self.open.take() {
            out.push(StreamEvent::BlockStop { index });
        }
    }

    /// The index of an open block of `kind`, opening one (and closing another kind) as needed.
    fn ensure(&mut self, kind: Open, out: &mut Vec<StreamEvent>) -> usize {
        if let Some((k, index)) = self.open {
            if k == kind {
                return index;
            }
        }
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        out.push(match kind {
            Open::Text => StreamEvent::TextStart { index },
            Open::Reasoning => StreamEvent::ReasoningStart { index },
        });
        self.open = Some((kind, index));
        index
    }

    fn part(&mut self, part: &Value, out: &mut Vec<StreamEvent>) {
        let signature = part["thoughtSignature"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        if let Some(fc) = part.get("functionCall") {
            self.close(out);
            let index = self.next_index;
            self.next_index += 1;
            let id = fc["id"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .unwrap_or_else(ids::generate);
            let args = match fc.get("args") {
                Some(a) if a.is_object() => a.to_string(),
                _ => "{}".to_string(),
            };
            out.push(StreamEvent::ToolCallStart {
                index,
                id,
                name: fc["name"].as_str().unwrap_or_default().to_string(),
                signature,
            });
            out.push(StreamEvent::ToolCallDelta {
                index,
                arguments: args,
            });
            out.push(StreamEvent::BlockStop { index });
            self.saw_tool_call = true;
            return;
        }
        let Some(text) = part["text"].as_str() else {
            // Inline data, executable code and other parts have no canonical form.
            return;
        };
        if part["thought"].as_bool() == Some(true) {
            let index = self.ensure(Open::Reasoning, out);
            if !text.is_empty() {
                out.push(StreamEvent::ReasoningDelta {
                    index,
                    text: text.to_string(),
                });
            }
            if let Some(signature) = signature {
                out.push(StreamEvent::ReasoningSignature { index, signature });
            }
        } else if !text.is_empty() {
            let index = self.ensure(Open::Text, out);
            out.push(StreamEvent::TextDelta {
                index,
                text: text.to_string(),
            });
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Decoder for StreamDecoder {
    fn decode(&mut self, ev: &Event, out: &mut Vec<StreamEvent>) {
        let data = ev.data.trim();
        if data.is_empty() || self.finished {
            return;
        }
        let v = match serde_json::from_str::<Value>(data) {
            Ok(v) => v,
            Err(e) => {
                out.push(StreamEvent::Error {
                    message: format!("Gemini sent an event that is not JSON: {e}"),
                });
                return;
            }
        };
        if let Some(err) = v.get("error") {
            let status = err["status"].as_str().unwrap_or("UNKNOWN");
            let message = err["message"].as_str().unwrap_or("no message");
            out.push(StreamEvent::Error {
                message: format!("Gemini error {status}: {message}"),
            });
            return;
        }
        if !self.started {
            self.started = true;
            out.push(StreamEvent::Start {
                id: v["responseId"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("gemini_{}", uuid::Uuid::new_v4().simple())),
                model: v["modelVersion"].as_str().unwrap_or_default().to_string(),
                created: now_secs(),
                provider: Some(Provider::Gemini),
            });
        }
        if let Some(meta) = v.get("usageMetadata").filter(|m| m.is_object()) {
            self.usage = usage_of(meta);
            if let Some(t) = meta["serviceTier"].as_str().and_then(served_tier) {
                self.served = Some(t);
            }
        }
        let candidate = &v["candidates"][0];
        if let Some(parts) = candidate["content"]["parts"].as_array() {
            for p in parts {
                self.part(p, out);
            }
        }
        let finish = candidate["finishReason"]
            .as_str()
            .filter(|f| *f != "FINISH_REASON_UNSPECIFIED");
        let blocked = v["promptFeedback"]["blockReason"].is_string() && finish.is_none();
        if finish.is_some() || blocked {
            self.close(out);
            self.finished = true;
            let stop = if blocked {
                StopReason::ContentFilter
            } else {
                stop_reason(finish.unwrap_or("STOP"), self.saw_tool_call)
            };
            out.push(StreamEvent::Finish {
                stop,
                usage: self.usage,
            });
        }
    }

    fn served_tier(&self) -> Option<Tier> {
        self.served
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::canonical::{Accumulator, Reasoning, Response, Tool, ToolCall, ToolResult};

    fn user(text: &str) -> Message {
        Message {
            role: Role::User,
            parts: vec![Part::Text(text.into())],
        }
    }

    fn req(model: &str, messages: Vec<Message>) -> Request {
        Request {
            model: model.into(),
            messages,
            ..Request::default()
        }
    }

    fn call(id: &str, name: &str, args: &str, sig: Option<&str>) -> Part {
        Part::ToolCall(ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: args.into(),
            signature: sig.map(Into::into),
        })
    }

    fn result(id: &str, name: Option<&str>, content: &str) -> Part {
        Part::ToolResult(ToolResult {
            call_id: id.into(),
            name: name.map(Into::into),
            content: content.into(),
            is_error: false,
        })
    }

    fn decode_all(lines: &[Value]) -> (Vec<StreamEvent>, StreamDecoder) {
        let mut d = StreamDecoder::new();
        let mut out = Vec::new();
        for l in lines {
            d.decode(&Event::new("", l.to_string()), &mut out);
        }
        (out, d)
    }

    fn accumulate(events: &[StreamEvent]) -> Response {
        let mut acc = Accumulator::default();
        for e in events {
            acc.push(e);
        }
        assert!(acc.finished, "no Finish in {events:?}");
        acc.finish()
    }

    #[test]
    fn golden_text() {
        let mut r = req("gemini-3.5-flash", vec![user("Hello!")]);
        r.max_output_tokens = Some(100);
        r.temperature = Some(0.5);
        r.top_p = Some(0.9);
        assert_eq!(
            body(&r, AskTier::Flex).unwrap(),
            json!({
                "contents": [{"role": "user", "parts": [{"text": "Hello!"}]}],
                "generationConfig": {"maxOutputTokens": 100, "temperature": 0.5, "topP": 0.9},
                "serviceTier": "flex"
            })
        );
    }

    #[test]
    fn tiers_map_and_auto_is_an_internal_error() {
        let r = req("gemini-2.5-flash", vec![user("x")]);
        assert_eq!(
            body(&r, AskTier::Standard).unwrap()["serviceTier"],
            "standard"
        );
        assert_eq!(
            body(&r, AskTier::Priority).unwrap()["serviceTier"],
            "priority"
        );
        let e = body(&r, AskTier::Auto).unwrap_err();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(served_tier("flex"), Some(Tier::Flex));
        assert_eq!(served_tier("SERVICE_TIER_PRIORITY"), Some(Tier::Priority));
        assert_eq!(served_tier("Standard"), Some(Tier::Standard));
        assert_eq!(served_tier("turbo"), None);
    }

    #[test]
    fn request_has_url_key_and_body() {
        let key = SecretString::from("AIza-test".to_string());
        let r = req("gemini-2.5-flash", vec![user("hi")]);
        let http = request("http://sim:1/", &r, AskTier::Flex, &key).unwrap();
        assert_eq!(
            http.uri().to_string(),
            "http://sim:1/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert_eq!(http.headers()["x-goog-api-key"], "AIza-test");
        assert_eq!(http.headers()["accept"], "text/event-stream");
        assert_eq!(http.method(), http::Method::POST);
        assert_eq!(
            url("https://g.example/v1beta", "models/gemini-3.5-flash").unwrap(),
            "https://g.example/v1beta/models/gemini-3.5-flash:streamGenerateContent?alt=sse"
        );
        let bad = req("gemini/../x", vec![user("hi")]);
        assert_eq!(
            request("http://sim", &bad, AskTier::Flex, &key)
                .unwrap_err()
                .code,
            "invalid_request"
        );
    }

    #[test]
    fn trap_9_several_system_prompts_merged_in_order() {
        let mut r = req("gemini-3.5-flash", vec![user("hi")]);
        r.system = vec!["Be brief.".into(), "Answer in French.".into()];
        assert_eq!(
            body(&r, AskTier::Standard).unwrap()["systemInstruction"],
            json!({"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]})
        );
    }

    #[test]
    fn golden_multi_turn() {
        let r = req(
            "gemini-2.5-flash",
            vec![
                user("Hi"),
                Message {
                    role: Role::Assistant,
                    parts: vec![
                        Part::Reasoning(Reasoning {
                            text: "greet".into(),
                            signature: Some("anthropic-sig".into()),
                            redacted: None,
                        }),
                        Part::Text("Hello! How can I help?".into()),
                    ],
                },
                user("Tell me a joke."),
                user("A short one."),
            ],
        );
        assert_eq!(
            body(&r, AskTier::Standard).unwrap()["contents"],
            json!([
                {"role": "user", "parts": [{"text": "Hi"}]},
                {"role": "model", "parts": [{"text": "Hello! How can I help?"}]},
                {"role": "user", "parts": [{"text": "Tell me a joke."}, {"text": "A short one."}]}
            ])
        );
    }

    #[test]
    fn golden_tools_and_tool_choice() {
        let mut r = req("gemini-2.5-flash", vec![user("Weather in Paris?")]);
        r.tools = vec![
            Tool {
                name: "get_weather".into(),
                description: Some("Current weather".into()),
                parameters: json!({
                    "$schema": "http://json-schema.org/draft-07/schema#",
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                    "additionalProperties": false
                }),
                strict: Some(true),
            },
            Tool {
                name: "now".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {}}),
                strict: None,
            },
        ];
        r.web_search = true;
        r.tool_choice = ToolChoice::Tool("get_weather".into());
        let b = body(&r, AskTier::Flex).unwrap();
        assert_eq!(
            b["tools"],
            json!([
                {"functionDeclarations": [
                    {"name": "get_weather", "description": "Current weather",
                     "parametersJsonSchema": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                        "additionalProperties": false}},
                    {"name": "now"}
                ]},
                {"googleSearch": {}}
            ])
        );
        assert_eq!(
            b["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
        );
        for (choice, mode) in [(ToolChoice::Required, "ANY"), (ToolChoice::None, "NONE")] {
            r.tool_choice = choice;
            let b = body(&r, AskTier::Flex).unwrap();
            assert_eq!(
                b["toolConfig"],
                json!({"functionCallingConfig": {"mode": mode}})
            );
        }
        r.tool_choice = ToolChoice::Auto;
        assert!(body(&r, AskTier::Flex).unwrap().get("toolConfig").is_none());
    }

    #[test]
    fn trap_3_parallel_tool_results_in_one_user_message() {
        // The caller sent one message per result (Chat style) with no names: they are merged
        // into one user turn and named from the calls.
        let r = req(
            "gemini-2.5-flash",
            vec![
                user("Weather in Paris and Rome?"),
                Message {
                    role: Role::Assistant,
                    parts: vec![
                        call("call_1", "get_weather", r#"{"city":"Paris"}"#, None),
                        call("call_2", "get_weather", r#"{"city":"Rome"}"#, None),
                    ],
                },
                Message {
                    role: Role::User,
                    parts: vec![result("call_1", None, r#"{"temp":21}"#)],
                },
                Message {
                    role: Role::User,
                    parts: vec![result("call_2", None, "sunny")],
                },
            ],
        );
        let c = body(&r, AskTier::Flex).unwrap()["contents"].clone();
        assert_eq!(
            c,
            json!([
                {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
                {"role": "model", "parts": [
                    {"functionCall": {"id": "call_1", "name": "get_weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"id": "call_2", "name": "get_weather", "args": {"city": "Rome"}}}
                ]},
                {"role": "user", "parts": [
                    {"functionResponse": {"id": "call_1", "name": "get_weather", "response": {"result": {"temp": 21}}}},
                    {"functionResponse": {"id": "call_2", "name": "get_weather", "response": {"result": "sunny"}}}
                ]}
            ])
        );
        // A result whose call is unknown cannot be named: refused with a fix.
        let orphan = req(
            "gemini-2.5-flash",
            vec![Message {
                role: Role::User,
                parts: vec![result("call_9", None, "x")],
            }],
        );
        let e = body(&orphan, AskTier::Flex).unwrap_err();
        assert_eq!(e.code, "invalid_request");
        assert!(e.full_message().contains("Example:"));
        // An error result goes back under `error`.
        let err = req(
            "gemini-2.5-flash",
            vec![Message {
                role: Role::User,
                parts: vec![Part::ToolResult(ToolResult {
                    call_id: String::new(),
                    name: Some("f".into()),
                    content: "boom".into(),
                    is_error: true,
                })],
            }],
        );
        assert_eq!(
            body(&err, AskTier::Flex).unwrap()["contents"][0]["parts"][0],
            json!({"functionResponse": {"name": "f", "response": {"error": "boom"}}})
        );
    }

    #[test]
    fn trap_2_thought_signature_rides_on_function_calls() {
        let assistant = Message {
            role: Role::Assistant,
            parts: vec![
                call("c1", "f", "{}", Some("c2lnLTE=")),
                call("c2", "g", "{}", None),
            ],
        };
        let r = req("gemini-3.5-flash", vec![user("go"), assistant.clone()]);
        let parts = body(&r, AskTier::Flex).unwrap()["contents"][1]["parts"].clone();
        assert_eq!(parts[0]["thoughtSignature"], "c2lnLTE=");
        assert_eq!(parts[0]["functionCall"]["id"], "c1");
        assert!(parts[1].get("thoughtSignature").is_none());
        // The signature never leaks into the call id.
        assert!(!parts[0]["functionCall"]["id"]
            .as_str()
            .unwrap()
            .contains("c2lnLTE"));

        // History from another provider has no signatures: Gemini 3 gets the placeholder on the
        // first call of each step, Gemini 2.5 gets nothing.
        let foreign = Message {
            role: Role::Assistant,
            parts: vec![
                call("toolu_1", "f", "{}", None),
                call("toolu_2", "g", "{}", None),
            ],
        };
        let r = req("gemini-3.5-flash", vec![user("go"), foreign.clone()]);
        let parts = body(&r, AskTier::Flex).unwrap()["contents"][1]["parts"].clone();
        assert_eq!(parts[0]["thoughtSignature"], PLACEHOLDER_SIGNATURE);
        assert!(parts[1].get("thoughtSignature").is_none());
        let r = req("gemini-2.5-flash", vec![user("go"), foreign]);
        let parts = body(&r, AskTier::Flex).unwrap()["contents"][1]["parts"].clone();
        assert!(parts[0].get("thoughtSignature").is_none());

        // Decoding: the signature comes back on the call, the id is generated when absent.
        let (events, _) = decode_all(&[json!({
            "candidates": [{"content": {"role": "model", "parts": [
                {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "U0lH"}
            ]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2}
        })]);
        let resp = accumulate(&events);
        let Part::ToolCall(c) = &resp.content[0] else {
            panic!("{resp:?}")
        };
        assert_eq!(c.signature.as_deref(), Some("U0lH"));
        assert!(c.id.starts_with("call_"));
        assert_ne!(c.id, "U0lH");
    }

    #[test]
    fn trap_8_images_data_url_and_url() {
        let r = req(
            "gemini-2.5-flash",
            vec![Message {
                role: Role::User,
                parts: vec![
                    Part::Text("What is in these?".into()),
                    Part::Image(Media::from_url("data:image/png;base64,iVBORw0K")),
                    Part::Image(Media::from_url("https://example.com/cat.JPG?size=large")),
                    Part::Image(Media::from_url("https://example.com/image")),
                    Part::File {
                        media: Media::from_url("data:application/pdf;base64,JVBERi0x"),
                        filename: Some("contract.pdf".into()),
                    },
                    Part::File {
                        media: Media::Url("https://example.com/download?id=7".into()),
                        filename: Some("report.pdf".into()),
                    },
                ],
            }],
        );
        assert_eq!(
            body(&r, AskTier::Flex).unwrap()["contents"][0]["parts"],
            json!([
                {"text": "What is in these?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0K"}},
                {"fileData": {"fileUri": "https://example.com/cat.JPG?size=large", "mimeType": "image/jpeg"}},
                {"fileData": {"fileUri": "https://example.com/image", "mimeType": "application/octet-stream"}},
                {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0x"}},
                {"fileData": {"fileUri": "https://example.com/download?id=7", "mimeType": "application/pdf"}}
            ])
        );
    }

    #[test]
    fn golden_structured_output() {
        let mut r = req("gemini-2.5-flash", vec![user("A person")]);
        r.response_format = Some(ResponseFormat::JsonSchema {
            name: "person".into(),
            schema: json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"],
                "additionalProperties": false
            }),
            strict: Some(true),
        });
        assert_eq!(
            body(&r, AskTier::Flex).unwrap()["generationConfig"],
            json!({
                "responseMimeType": "application/json",
                "responseJsonSchema": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"],
                    "additionalProperties": false
                }
            })
        );
        r.response_format = Some(ResponseFormat::JsonObject);
        assert_eq!(
            body(&r, AskTier::Flex).unwrap()["generationConfig"],
            json!({"responseMimeType": "application/json"})
        );
    }

    #[test]
    fn golden_reasoning_effort_per_model() {
        let level = |model: &str, e: Effort| {
            let mut r = req(model, vec![user("think")]);
            r.reasoning = Some(e);
            body(&r, AskTier::Flex).unwrap()["generationConfig"]
                .get("thinkingConfig")
                .cloned()
        };
        assert_eq!(
            level("gemini-3.5-flash", Effort::Medium),
            Some(json!({"thinkingLevel": "medium", "includeThoughts": true}))
        );
        assert_eq!(
            level("gemini-3-flash-preview", Effort::Minimal).unwrap()["thinkingLevel"],
            "minimal"
        );
        assert_eq!(
            level("gemini-3.1-flash-lite", Effort::Minimal).unwrap()["thinkingLevel"],
            "minimal"
        );
        // 3.1 Pro: no minimal.
        assert_eq!(
            level("gemini-3.1-pro-preview", Effort::Minimal).unwrap()["thinkingLevel"],
            "low"
        );
        assert_eq!(
            level("gemini-3.1-pro-preview", Effort::Medium).unwrap()["thinkingLevel"],
            "medium"
        );
        // 3 Pro: low | high.
        assert_eq!(
            level("gemini-3-pro-preview", Effort::Medium).unwrap()["thinkingLevel"],
            "high"
        );
        assert_eq!(
            level("gemini-3-pro-preview", Effort::Minimal).unwrap()["thinkingLevel"],
            "low"
        );
        // 2.5: a token budget.
        assert_eq!(
            level("gemini-2.5-pro", Effort::High),
            Some(json!({"thinkingBudget": 24576, "includeThoughts": true}))
        );
        assert_eq!(
            level("gemini-2.5-flash-lite", Effort::Low).unwrap()["thinkingBudget"],
            2048
        );
        // 2.0: no thinking at all.
        assert_eq!(level("gemini-2.0-flash", Effort::High), None);
    }

    fn text_chunk(text: &str, finish: Option<&str>, out: u64) -> Value {
        let mut c = json!({"content": {"role": "model", "parts": [{"text": text}]}, "index": 0});
        if let Some(f) = finish {
            c["finishReason"] = json!(f);
        }
        json!({
            "candidates": [c],
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": out,
                              "totalTokenCount": 12 + out, "serviceTier": "flex"},
            "modelVersion": "gemini-2.5-flash",
            "responseId": "resp-1"
        })
    }

    #[test]
    fn decodes_a_text_stream() {
        let (events, d) = decode_all(&[
            text_chunk("Hello", None, 1),
            text_chunk(", world", None, 2),
            text_chunk("!", Some("STOP"), 3),
        ]);
        assert!(matches!(&events[0], StreamEvent::Start { id, model, .. }
            if id == "resp-1" && model == "gemini-2.5-flash"));
        assert_eq!(
            events[1..].to_vec(),
            vec![
                StreamEvent::TextStart { index: 0 },
                StreamEvent::TextDelta {
                    index: 0,
                    text: "Hello".into()
                },
                StreamEvent::TextDelta {
                    index: 0,
                    text: ", world".into()
                },
                StreamEvent::TextDelta {
                    index: 0,
                    text: "!".into()
                },
                StreamEvent::BlockStop { index: 0 },
                StreamEvent::Finish {
                    stop: StopReason::EndTurn,
                    usage: Usage {
                        input_tokens: 12,
                        cached_input_tokens: 0,
                        output_tokens: 3,
                        reasoning_tokens: 0
                    }
                },
            ]
        );
        assert_eq!(d.served_tier(), Some(Tier::Flex));
        let r = accumulate(&events);
        assert_eq!(r.content, vec![Part::Text("Hello, world!".into())]);
        assert_eq!(r.usage.total(), 15);
    }

    #[test]
    fn trap_6_usage_candidates_exclude_thoughts_and_cached_is_inside_input() {
        let (events, _) = decode_all(&[json!({
            "candidates": [{"content": {"parts": [{"text": "ok"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 100, "cachedContentTokenCount": 40,
                              "candidatesTokenCount": 10, "thoughtsTokenCount": 25,
                              "toolUsePromptTokenCount": 5, "totalTokenCount": 140}
        })]);
        let r = accumulate(&events);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 105,
                cached_input_tokens: 40,
                output_tokens: 35,
                reasoning_tokens: 25
            }
        );
        // The canonical total equals Gemini's totalTokenCount.
        assert_eq!(r.usage.total(), 140);
    }

    #[test]
    fn decodes_thinking_then_text_with_signature() {
        let (events, _) = decode_all(&[
            json!({"candidates": [{"content": {"role": "model", "parts": [
                {"text": "Let me think", "thought": true}]}}], "responseId": "r"}),
            json!({"candidates": [{"content": {"role": "model", "parts": [
                {"text": " harder.", "thought": true, "thoughtSignature": "dGhvdWdodA=="}]}}]}),
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "42"}]},
                "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1,
                                  "thoughtsTokenCount": 30}}),
        ]);
        assert_eq!(
            events[1..].to_vec(),
            vec![
                StreamEvent::ReasoningStart { index: 0 },
                StreamEvent::ReasoningDelta {
                    index: 0,
                    text: "Let me think".into()
                },
                StreamEvent::ReasoningDelta {
                    index: 0,
                    text: " harder.".into()
                },
                StreamEvent::ReasoningSignature {
                    index: 0,
                    signature: "dGhvdWdodA==".into()
                },
                StreamEvent::BlockStop { index: 0 },
                StreamEvent::TextStart { index: 1 },
                StreamEvent::TextDelta {
                    index: 1,
                    text: "42".into()
                },
                StreamEvent::BlockStop { index: 1 },
                StreamEvent::Finish {
                    stop: StopReason::EndTurn,
                    usage: Usage {
                        input_tokens: 5,
                        cached_input_tokens: 0,
                        output_tokens: 31,
                        reasoning_tokens: 30
                    }
                },
            ]
        );
        let r = accumulate(&events);
        assert_eq!(
            r.content[0],
            Part::Reasoning(Reasoning {
                text: "Let me think harder.".into(),
                signature: Some("dGhvdWdodA==".into()),
                redacted: None
            })
        );
    }

    #[test]
    fn trap_5_stop_after_function_call_in_an_earlier_chunk_is_tool_use() {
        let (events, _) = decode_all(&[
            json!({"candidates": [{"content": {"role": "model", "parts": [
                {"text": "Checking."},
                {"functionCall": {"id": "fc_1", "name": "get_weather", "args": {"city": "Paris"}},
                 "thoughtSignature": "c2ln"},
                {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}
            ]}}], "responseId": "r2"}),
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]},
                "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 15}}),
        ]);
        let last = events.last().unwrap();
        assert!(matches!(
            last,
            StreamEvent::Finish {
                stop: StopReason::ToolUse,
                ..
            }
        ));
        // Every block is closed before the next opens (trap 7), arguments are whole JSON text.
        assert!(matches!(events[1], StreamEvent::TextStart { index: 0 }));
        assert!(matches!(events[3], StreamEvent::BlockStop { index: 0 }));
        assert!(
            matches!(&events[4], StreamEvent::ToolCallStart { index: 1, id, signature: Some(s), .. }
            if id == "fc_1" && s == "c2ln")
        );
        let r = accumulate(&events);
        assert_eq!(r.stop, StopReason::ToolUse);
        assert_eq!(r.content.len(), 3);
        let Part::ToolCall(c2) = &r.content[2] else {
            panic!()
        };
        assert_eq!(c2.arguments, r#"{"city":"Rome"}"#);
        assert!(!c2.id.is_empty());
        assert_eq!(r.usage.output_tokens, 15);
    }

    #[test]
    fn trap_7_tool_call_is_one_complete_block_and_finish_carries_real_usage() {
        let (events, _) = decode_all(&[json!({
            "candidates": [{"content": {"parts": [
                {"functionCall": {"name": "now", "args": {}}}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3}
        })]);
        assert_eq!(
            events[1..4].to_vec(),
            vec![
                match &events[1] {
                    StreamEvent::ToolCallStart { id, .. } => StreamEvent::ToolCallStart {
                        index: 0,
                        id: id.clone(),
                        name: "now".into(),
                        signature: None
                    },
                    other => panic!("{other:?}"),
                },
                StreamEvent::ToolCallDelta {
                    index: 0,
                    arguments: "{}".into()
                },
                StreamEvent::BlockStop { index: 0 },
            ]
        );
        assert!(matches!(events[4], StreamEvent::Finish { usage, .. } if usage.total() == 10));
    }

    #[test]
    fn finish_reasons_map() {
        assert_eq!(stop_reason("MAX_TOKENS", true), StopReason::MaxTokens);
        assert_eq!(stop_reason("SAFETY", false), StopReason::ContentFilter);
        assert_eq!(
            stop_reason("PROHIBITED_CONTENT", false),
            StopReason::ContentFilter
        );
        assert_eq!(stop_reason("RECITATION", false), StopReason::ContentFilter);
        assert_eq!(
            stop_reason("MALFORMED_FUNCTION_CALL", false),
            StopReason::Error
        );
        assert_eq!(stop_reason("STOP", false), StopReason::EndTurn);
        assert_eq!(stop_reason("OTHER", false), StopReason::EndTurn);
        let (events, _) = decode_all(&[json!({
            "promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": {"promptTokenCount": 4}
        })]);
        assert!(matches!(
            events.last().unwrap(),
            StreamEvent::Finish {
                stop: StopReason::ContentFilter,
                usage
            } if usage.input_tokens == 4
        ));
    }

    #[test]
    fn in_stream_errors_and_classification() {
        let cap = Event::new(
            "",
            r#"{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED"}}"#,
        );
        assert_eq!(classify(&cap), EventClass::CapacityError);
        let unavailable = Event::new(
            "",
            r#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#,
        );
        assert_eq!(classify(&unavailable), EventClass::CapacityError);
        let bad = Event::new(
            "",
            r#"{"error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}"#,
        );
        assert_eq!(classify(&bad), EventClass::Error);
        assert_eq!(
            classify(&Event::new("", text_chunk("hi", None, 1).to_string())),
            EventClass::Start
        );
        assert_eq!(
            classify(&Event::new(
                "",
                r#"{"usageMetadata":{"promptTokenCount":3},"responseId":"x"}"#
            )),
            EventClass::Lifecycle
        );
        assert_eq!(classify(&Event::new("", "not json")), EventClass::Error);
        let mut d = StreamDecoder::new();
        let mut out = Vec::new();
        d.decode(&bad, &mut out);
        assert!(
            matches!(&out[0], StreamEvent::Error { message } if message.contains("INVALID_ARGUMENT"))
        );
    }

    #[test]
    fn max_tokens_and_chunks_after_finish_are_ignored() {
        let (events, _) = decode_all(&[
            text_chunk("cut", Some("MAX_TOKENS"), 1),
            text_chunk("late", None, 2),
        ]);
        let r = accumulate(&events);
        assert_eq!(r.stop, StopReason::MaxTokens);
        assert_eq!(r.content, vec![Part::Text("cut".into())]);
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, StreamEvent::Finish { .. }))
                .count(),
            1
        );
    }

    /// Bytes recorded from the provider simulator (`flex sim`), through the real SSE parser.
    #[test]
    fn decodes_simulator_transcripts() {
        const TEXT: &str = r#"data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Simulated"}]},"index":0}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":1,"thoughtsTokenCount":0,"totalTokenCount":6,"promptTokensDetails":[{"modality":"TEXT","tokenCount":5}],"serviceTier":"flex"},"modelVersion":"gemini-3.5-flash","responseId":"796459a0b7820d4ae1798c9f"}

data: {"candidates":[{"content":{"role":"model","parts":[{"text":" answer"}]},"index":0}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":2,"thoughtsTokenCount":0,"totalTokenCount":7,"promptTokensDetails":[{"modality":"TEXT","tokenCount":5}],"serviceTier":"flex"},"modelVersion":"gemini-3.5-flash","responseId":"796459a0b7820d4ae1798c9f"}

data: {"candidates":[{"content":{"role":"model","parts":[{"text":" word1"}]},"index":0,"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":3,"thoughtsTokenCount":0,"totalTokenCount":8,"promptTokensDetails":[{"modality":"TEXT","tokenCount":5}],"serviceTier":"flex"},"modelVersion":"gemini-3.5-flash","responseId":"796459a0b7820d4ae1798c9f"}

"#;
        const TOOL: &str = r#"data: {"candidates":[{"content":{"role":"model","parts":[{"functionCall":{"name":"get_weather","args":{"location":"Paris"}}}]},"index":0,"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4,"thoughtsTokenCount":0,"totalTokenCount":7,"promptTokensDetails":[{"modality":"TEXT","tokenCount":3}],"serviceTier":"standard"},"modelVersion":"gemini-3.5-flash","responseId":"a385eb9057f9a0659033a5e4"}

"#;
        let run = |raw: &str| {
            let mut parser = crate::sse::Parser::new();
            let mut evs = Vec::new();
            // Split at an awkward byte to exercise framing.
            let (a, b) = raw.as_bytes().split_at(raw.len() / 3);
            parser.feed(a, &mut evs).unwrap();
            parser.feed(b, &mut evs).unwrap();
            assert_eq!(classify(&evs[0]), EventClass::Start);
            let mut d = StreamDecoder::new();
            let mut out = Vec::new();
            for e in &evs {
                d.decode(e, &mut out);
            }
            (accumulate(&out), d.served_tier())
        };
        let (r, tier) = run(TEXT);
        assert_eq!(r.content, vec![Part::Text("Simulated answer word1".into())]);
        assert_eq!(r.stop, StopReason::EndTurn);
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (5, 3));
        assert_eq!(r.model, "gemini-3.5-flash");
        assert_eq!(tier, Some(Tier::Flex));
        let (r, tier) = run(TOOL);
        assert_eq!(r.stop, StopReason::ToolUse);
        let Part::ToolCall(c) = &r.content[0] else {
            panic!("{r:?}")
        };
        assert_eq!(
            (c.name.as_str(), c.arguments.as_str()),
            ("get_weather", r#"{"location":"Paris"}"#)
        );
        assert_eq!(r.usage.total(), 7);
        assert_eq!(tier, Some(Tier::Standard));
    }
}
