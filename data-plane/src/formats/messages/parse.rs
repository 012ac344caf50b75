//! Messages request → canonical.

use serde_json::Value;

use super::{check_cache_control, invalid, refuse_top_level, unsupported, EXAMPLE};
use crate::canonical::{
    Effort, Media, Message, Part, Reasoning, Request, ResponseFormat, Role, Tool, ToolCall,
    ToolChoice, ToolResult,
};
use crate::error::ApiError;
use crate::formats::{CallerFormat, RawBody};

/// Validates and parses a Messages body into canonical.
pub fn parse_request(body: &RawBody) -> Result<Request, ApiError> {
    let model = crate::formats::model(body, CallerFormat::Messages)?;
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
