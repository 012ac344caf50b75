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
//!
//! Tier values and the streaming URL live here; `request` (canonical → upstream body and
//! request) and `decode` (race classification, stream decoder, stop reasons, usage) hold the
//! rest.

mod decode;
mod request;
#[cfg(test)]
mod tests;

pub use decode::{classify, stop_reason, usage_of, StreamDecoder};
pub use request::{body, guess_mime, request, thinking_config};

use flex_shared::catalog::Tier;
use http::StatusCode;

use crate::error::ApiError;
use crate::providers::AskTier;

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
