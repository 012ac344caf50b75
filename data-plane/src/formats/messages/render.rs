//! Canonical response → Messages `message` body.

use flex_shared::catalog::Tier;
use serde_json::{json, Value};

use crate::canonical::{Part, Response, StopReason, Usage};
use crate::ids;

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
pub(super) fn usage_json(u: &Usage, served: Option<Tier>) -> Value {
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

pub(super) fn message_id(id: &str) -> String {
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
