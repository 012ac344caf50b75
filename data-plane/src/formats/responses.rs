//! Responses (`/v1/responses`): which stream events mean the model has started, and the final
//! response object carried by `response.completed` (or `.incomplete` / `.failed`).

use serde_json::Value;

/// Lifecycle events that precede any output: not a start.
pub fn is_lifecycle(event_type: &str) -> bool {
    matches!(
        event_type,
        "response.created" | "response.queued" | "response.in_progress"
    )
}

/// Terminal events carrying the whole response object.
pub fn is_terminal(event_type: &str) -> bool {
    matches!(
        event_type,
        "response.completed" | "response.incomplete" | "response.failed"
    )
}

/// The `type` of a Responses stream event (from its JSON, falling back to the SSE name).
pub fn event_type<'a>(sse_name: &'a str, data: &'a Value) -> &'a str {
    data["type"].as_str().unwrap_or(sse_name)
}
