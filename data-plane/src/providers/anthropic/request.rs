//! Canonical → Anthropic Messages body and upstream request.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Map, Value};

use super::{
    tier_value, API_VERSION, EXAMPLE, IMAGE_TYPES, JSON_OBJECT_INSTRUCTION, MIN_THINKING_BUDGET,
};
use crate::canonical::{self, join_system, Media, Message, Part, ResponseFormat, Role, ToolChoice};
use crate::error::ApiError;
use crate::ids;
use crate::providers::AskTier;

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
pub(super) fn base64_decode(s: &str) -> Option<Vec<u8>> {
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
