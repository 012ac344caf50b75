//! Interactions request → canonical.

use serde_json::{json, Map, Value};

use super::{invalid, refuse_unsupported, unsupported, EXAMPLE};
use crate::canonical::{
    Effort, Media, Message, Part, Reasoning, Request, ResponseFormat, Role, Tool, ToolCall,
    ToolChoice, ToolResult,
};
use crate::error::ApiError;
use crate::formats::{CallerFormat, RawBody};

/// Validates and parses an Interactions request body into canonical.
pub fn parse_request(body: &RawBody) -> Result<Request, ApiError> {
    let model = crate::formats::model(body, CallerFormat::Interactions)?;
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
