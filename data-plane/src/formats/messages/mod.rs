//! Messages (`/v1/messages`): the Anthropic Messages shape for any model. Parses a caller body
//! into canonical (refusing what seed 001 lists), renders a canonical answer as a `message`, and
//! encodes canonical stream events as the `message_*` / `content_block_*` event stream.
//!
//! The served tier is reported in `usage.service_tier` (`flex`, `standard` or `priority`).
//! Usage follows Anthropic's convention: `input_tokens` excludes cache reads, which are
//! reported apart in `cache_read_input_tokens`.
//!
//! Choices made here:
//! - `thinking: {type: "enabled", budget_tokens}` becomes the nearest reasoning effort;
//!   `{type: "adaptive"}` becomes `output_config.effort` when given, else medium; `disabled`
//!   none. `output_config.effort` alone (`max` reads as high) is a reasoning effort too.
//! - `output_config.format` (`{type: "json_schema", schema}`) is structured output.
//! - A plain-text `document` (source `text`) is text; `content` sources are their blocks.
//! - Images and documents inside a `tool_result` follow the result as parts of the same user
//!   turn (canonical tool results are text).
//! - Tools: custom tools, and Anthropic's `web_search_*` server tool (the canonical
//!   `web_search`); other server tools exist only on Anthropic and are refused.
//!
//! Validation helpers live here; `parse` (request → canonical), `render` (canonical response →
//! body) and `encoder` (the stream encoder) hold the rest.

mod encoder;
mod parse;
mod render;
#[cfg(test)]
mod tests;

use serde_json::Value;

pub use encoder::StreamEncoder;
pub use parse::parse_request;
pub use render::{render_response, stop_reason};

use super::RawBody;
use crate::error::ApiError;

const EXAMPLE: &str = r#"{"model": "claude-opus-4-8", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello!"}], "start_within": "default"}"#;

fn invalid(param: &str, message: String) -> ApiError {
    ApiError::bad_request("invalid_request", message)
        .param(param.to_string())
        .fix("send the field in the Anthropic Messages shape (see the Messages API reference).")
        .example(EXAMPLE)
}

fn unsupported(param: &str, what: &str, fix: &str) -> ApiError {
    ApiError::bad_request("unsupported_parameter", format!("`{param}` is set: {what}"))
        .param(param.to_string())
        .fix(fix.to_string())
        .example(EXAMPLE)
}

fn cache_control_refused(param: &str) -> ApiError {
    unsupported(
        param,
        "FlexInference routes every request to whichever provider and tier serves it, so Anthropic prompt-cache breakpoints cannot be honoured.",
        &format!("remove `{param}` (provider-side caching still applies automatically where the provider offers it) and resend."),
    )
}

/// Refuses a set `cache_control` on a block, system entry or tool.
fn check_cache_control(v: &Value, param: &str) -> Result<(), ApiError> {
    match v.get("cache_control") {
        Some(c) if !c.is_null() => Err(cache_control_refused(&format!("{param}.cache_control"))),
        _ => Ok(()),
    }
}

/// Seed 001's top-level refusals.
fn refuse_top_level(body: &RawBody) -> Result<(), ApiError> {
    if body.is_set("top_k") {
        return Err(unsupported(
            "top_k",
            "top-k sampling has no match on most models FlexInference routes, so it cannot be applied faithfully.",
            "remove `top_k` (use `temperature` or `top_p` instead) and resend.",
        ));
    }
    if body
        .value("stop_sequences")
        .is_some_and(|v| v.as_array().map_or(!v.is_null(), |a| !a.is_empty()))
    {
        return Err(unsupported(
            "stop_sequences",
            "custom stop sequences are not supported on the models FlexInference routes.",
            "remove `stop_sequences` (or send an empty list) and stop on the text client-side.",
        ));
    }
    if body.is_set("cache_control") {
        return Err(cache_control_refused("cache_control"));
    }
    Ok(())
}
