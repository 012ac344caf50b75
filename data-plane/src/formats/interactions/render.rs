//! Canonical response → `Interaction`.

use std::time::{SystemTime, UNIX_EPOCH};

use flex_shared::catalog::Tier;
use serde_json::{json, Map, Value};

use crate::canonical::{Part, Response, StopReason, Usage};

/// `YYYY-MM-DDThh:mm:ssZ` for Unix seconds.
pub fn iso8601(secs: u64) -> String {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    // Whole seconds, so RFC 3339 prints no fraction; a year past 9999 cannot be reached here.
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `interaction_…` from the provider's response id.
pub(super) fn interaction_id(id: &str) -> String {
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

pub(super) fn interaction(
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
