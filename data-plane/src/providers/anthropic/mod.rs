//! Anthropic Messages (`POST {base}/v1/messages`): canonical requests become Messages bodies
//! (always streamed), and the `message_*` / `content_block_*` event stream becomes canonical
//! events.
//!
//! Choices made here (each one where Anthropic's API has no exact match):
//! - System prompts are joined into the top-level `system` string, in order (trap 9).
//! - Consecutive canonical messages of one role are merged into one Messages turn, and in a user
//!   turn every `tool_result` block comes first: all results answering one assistant turn travel
//!   in ONE user message (trap 3). A tool call of the previous turn left without a result is
//!   refused up front (Anthropic would refuse it too, less clearly).
//! - Reasoning is replayed only when Anthropic can verify it: signed `thinking` blocks (empty text
//!   included) and `redacted_thinking`; unsigned reasoning from another provider is dropped, never
//!   turned into text. Signed blocks always precede the turn's `tool_use` blocks (trap 4).
//! - Structured output uses `output_config.format` (`{type: "json_schema", schema}`, the SDK's
//!   `OutputConfigParam`), not a forced tool, so tool calling and thinking stay available. "Any
//!   JSON object" has no schema form there (Anthropic requires closed object schemas), so it
//!   becomes one more system instruction.
//! - Reasoning effort becomes `thinking: {type: "enabled", budget_tokens}` with the budget
//!   clamped below `max_tokens` (Anthropic's rule); below Anthropic's 1024-token minimum, or with
//!   a forced tool choice (which Anthropic refuses with thinking), no thinking is requested.
//!   With thinking on, `temperature` is not sent and `top_p` only within 0.95..=1 (Anthropic's
//!   limits). `temperature` is clamped to Anthropic's 0..=1, and when both `temperature` and
//!   `top_p` are set only `temperature` is sent (recent Claude models refuse both).
//! - Tool `strict` is not forwarded: OpenAI callers set it by default, and Anthropic's strict
//!   mode has its own schema limits and model list.
//! - `web_search` becomes Anthropic's server tool `web_search_20250305`; its server blocks
//!   (`server_tool_use`, `web_search_tool_result`) are not canonical content and are skipped
//!   when decoding, the model's cited text comes through as text.
//!
//! Tier values and constants live here; `request` (canonical → upstream body and request) and
//! `decode` (race classification, stream decoder, stop reasons, usage) hold the rest.

mod decode;
mod request;
#[cfg(test)]
mod tests;

pub use decode::{classify, stop_reason, StreamDecoder};
pub use request::{body, raw_request, request};

use flex_shared::catalog::Tier;

use crate::error::ApiError;
use crate::providers::AskTier;

/// The `anthropic-version` header we speak.
pub const API_VERSION: &str = "2023-06-01";

/// Image types Anthropic accepts inline (trap 8).
pub const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Anthropic's smallest thinking budget.
pub const MIN_THINKING_BUDGET: u64 = 1024;

/// The instruction standing in for "respond with any JSON object" (no schema form exists).
pub const JSON_OBJECT_INSTRUCTION: &str =
    "Respond with a single valid JSON object and nothing else: no prose, no code fences.";

const EXAMPLE: &str = r#"{"model": "claude-opus-4-8", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello!"}], "start_within": "default"}"#;

/// The `service_tier` value for a tier. Anthropic has no flex tier: the proxy refuses a flex
/// plan for Claude models before it gets here, so this only guards against a wiring mistake.
pub fn tier_value(t: AskTier) -> Result<&'static str, ApiError> {
    match t {
        AskTier::Standard => Ok("standard_only"),
        AskTier::Auto | AskTier::Priority => Ok("auto"),
        AskTier::Flex => Err(ApiError::bad_request(
            "flex_unsupported_for_anthropic",
            "A flex request was addressed to Anthropic, which has no flex tier.",
        )
        .param("start_within")
        .fix("drop the duration and use \"default\", \"priority\" or \"auto\" for Claude models.")
        .example(EXAMPLE)),
    }
}

/// The tier Anthropic reports in `usage.service_tier`.
pub fn served_tier(v: &str) -> Option<Tier> {
    match v {
        "standard" => Some(Tier::Standard),
        "priority" => Some(Tier::Priority),
        _ => None,
    }
}
