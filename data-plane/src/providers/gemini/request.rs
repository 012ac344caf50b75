//! Canonical → Gemini `GenerateContentRequest` body and upstream request.

use bytes::Bytes;
use http::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Map, Value};

use super::{tier_value, url, PLACEHOLDER_SIGNATURE};
use crate::canonical::{
    call_name, Effort, Media, Message, Part, Request, ResponseFormat, Role, ToolChoice,
};
use crate::error::ApiError;
use crate::providers::AskTier;

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
