//! Interactions (`/v1/interactions`): Google's Interactions API shape (the `google-genai` SDK's
//! `client.interactions`), stateless: every request carries its whole conversation in `input`.
//!
//! Request → canonical:
//! - `input`: a string, one content object, a list of content objects (one user turn), or a list
//!   of steps (`user_input`, `model_output`, `thought`, `function_call`, `function_result`);
//!   consecutive steps of one side are merged into one message, so parallel results travel
//!   together. Server-side tool steps (`google_search_call`, …) are history only and skipped.
//! - content: `text`, `image` / `document` with `data` + `mime_type` or `uri` (data URLs too);
//!   `audio` / `video` are refused (no canonical form).
//! - `system_instruction`, `tools` (`function`, `google_search` → web search), `response_format`
//!   (a text format with `mime_type: application/json` and `schema`, or a bare JSON schema),
//!   `generation_config{max_output_tokens, temperature, top_p, thinking_level, tool_choice}`,
//!   `stream`.
//! - Refused with `unsupported_parameter` (seed 001): `generation_config.seed`,
//!   `generation_config.stop_sequences`; also `previous_interaction_id` and `background: true`,
//!   which need server-side state FlexInference does not keep.
//!
//! Response: an `Interaction` whose `steps` hold only the output (`model_output`, `thought`,
//! `function_call`), so `steps[0]` is the first output step as seed 001 shows; `created` /
//! `updated` are ISO 8601 strings (the SDK types); `function_call` steps carry the Gemini thought
//! signature in an extra `signature` field (as the Interactions API's other call steps do; the
//! SDK keeps unknown fields), and it is read back from there.
//!
//! Validation helpers live here; `parse` (request → canonical), `render` (canonical response →
//! `Interaction`) and `encoder` (the stream encoder) hold the rest.

mod encoder;
mod parse;
mod render;
#[cfg(test)]
mod tests;

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::formats::RawBody;

pub use encoder::StreamEncoder;
pub use parse::parse_request;
pub use render::{iso8601, render_response, status, usage_json};

const EXAMPLE: &str = r#"{"model": "gemini-3.5-flash", "input": "Summarize this contract.", "start_within": "00h-01m-00s"}"#;

fn unsupported(param: &str, why: &str) -> ApiError {
    ApiError::bad_request(
        "unsupported_parameter",
        format!("The Interactions parameter `{param}` is set, but FlexInference does not support it: {why}."),
    )
    .param(param.to_string())
    .fix(format!("remove `{param}` (or leave it at its default) and resend."))
    .example(EXAMPLE)
}

fn invalid(param: &str, why: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", why)
        .param(param.to_string())
        .fix("follow the Interactions API shape for this field (see the google-genai SDK's interactions types).")
        .example(
            r#""input": [{"type": "user_input", "content": [{"type": "text", "text": "Hello!"}]}]"#,
        )
}

fn refuse_unsupported(body: &RawBody, config: &Map<String, Value>) -> Result<(), ApiError> {
    if config.get("seed").is_some_and(|v| !v.is_null()) {
        return Err(unsupported(
            "generation_config.seed",
            "seeded sampling has no match on every provider FlexInference routes, and a seed that is silently ignored would promise reproducibility it cannot give",
        ));
    }
    let stops_set = match config.get("stop_sequences") {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    if stops_set {
        return Err(unsupported(
            "generation_config.stop_sequences",
            "stop sequences are not translated across providers",
        ));
    }
    if body
        .str_field("previous_interaction_id")
        .is_some_and(|s| !s.is_empty())
    {
        return Err(unsupported(
            "previous_interaction_id",
            "FlexInference stores no interactions, so there is no previous interaction to continue; send the earlier steps in `input` instead",
        ));
    }
    if body.bool_field("background") == Some(true) {
        return Err(unsupported(
            "background",
            "background interactions need server-side storage; use `stream: true` for long answers",
        ));
    }
    Ok(())
}
