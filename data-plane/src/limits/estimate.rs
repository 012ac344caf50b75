//! A request's worst case, reserved at admission: its estimated input tokens plus the output
//! tokens it allows, and what that costs.
//!
//! Input: a quarter of the request body's bytes (OpenAI's own rule of thumb for English text,
//! and above it for JSON, whose keys and quotes count too), with each inline base64 attachment (a
//! run of at least 1 KiB of base64 characters: an image or a file) counted as
//! [`ATTACHMENT_TOKENS`] instead of by its size. Output: the request's own cap (`max_output_tokens`
//! on Responses, `max_completion_tokens` or `max_tokens` on Chat, `max_tokens` on Messages,
//! `generation_config.max_output_tokens` on Interactions), else [`DEFAULT_OUTPUT_TOKENS`].
//! The reservation is settled with the real usage when the answer ends, so an estimate only
//! decides how close to a limit requests in flight can go: a request whose real use exceeds its
//! reservation (a prompt denser than 4 bytes a token, or more output than the default when it
//! set no cap) can push the counted tokens or spend over the limit by that excess, and only
//! while it is in flight with others in the same position.

use flex_shared::catalog::{Model, Tier};

use crate::formats::{CallerFormat, RawBody};

/// The output reserved for a request that sets no cap of its own.
pub const DEFAULT_OUTPUT_TOKENS: u64 = 4096;
/// What an inline base64 attachment is counted as (about a high-resolution image).
pub const ATTACHMENT_TOKENS: u64 = 1600;
/// The shortest run of base64 characters taken for an attachment.
const ATTACHMENT_MIN_BYTES: usize = 1024;

/// (estimated input tokens, output tokens allowed) of a request body.
pub fn worst_case_tokens(body: &RawBody, format: CallerFormat) -> (u64, u64) {
    let mut text_bytes = 0usize;
    let mut attachments = 0u64;
    for raw in body.fields.values() {
        let (t, a) = scan(raw.get().as_bytes());
        text_bytes += t;
        attachments += a;
    }
    let input = (text_bytes as u64).div_ceil(4) + attachments * ATTACHMENT_TOKENS;
    (
        input,
        max_output(body, format).unwrap_or(DEFAULT_OUTPUT_TOKENS),
    )
}

/// Bytes that are not part of a long base64 run, and the number of such runs.
fn scan(b: &[u8]) -> (usize, u64) {
    let is_b64 = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=');
    let (mut text, mut runs, mut run) = (0usize, 0u64, 0usize);
    for &c in b {
        if is_b64(c) {
            run += 1;
            continue;
        }
        if run >= ATTACHMENT_MIN_BYTES {
            runs += 1;
        } else {
            text += run;
        }
        run = 0;
        text += 1;
    }
    if run >= ATTACHMENT_MIN_BYTES {
        runs += 1;
    } else {
        text += run;
    }
    (text, runs)
}

fn max_output(body: &RawBody, format: CallerFormat) -> Option<u64> {
    let field = |name: &str| body.value(name).and_then(|v| v.as_u64());
    match format {
        CallerFormat::Responses => field("max_output_tokens"),
        CallerFormat::ChatCompletions => {
            field("max_completion_tokens").or_else(|| field("max_tokens"))
        }
        CallerFormat::Messages => field("max_tokens"),
        CallerFormat::Interactions => body
            .value("generation_config")
            .and_then(|g| g.get("max_output_tokens").and_then(|v| v.as_u64())),
    }
}

/// The worst-case cost of `input` + `output` tokens on `model` at the standard tier (the
/// priority tier's price for a request that asks for it, which costs more); 0 for a model the
/// catalog has no price for.
pub fn worst_case_cost(model: Option<&Model>, input: u64, output: u64, priority: bool) -> i64 {
    let Some(m) = model else {
        return 0;
    };
    let standard = m.price(Tier::Standard).cost_micros(input, 0, output);
    if priority {
        standard.max(m.price(Tier::Priority).cost_micros(input, 0, output))
    } else {
        standard
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn body(json: &str, format: CallerFormat) -> RawBody {
        RawBody::parse(json.as_bytes(), format).unwrap()
    }

    #[test]
    fn input_is_a_quarter_of_the_bytes_and_attachments_are_flat() {
        let b = body(
            r#"{"model":"gpt-5.5","input":"Hello there, how are you?"}"#,
            CallerFormat::Responses,
        );
        let bytes = r#""gpt-5.5""Hello there, how are you?""#.len() as u64;
        assert_eq!(
            worst_case_tokens(&b, CallerFormat::Responses),
            (bytes.div_ceil(4), DEFAULT_OUTPUT_TOKENS)
        );
        let image = "A".repeat(200_000);
        let b = body(
            &format!(
                r#"{{"model":"gpt-5.5","max_completion_tokens":50,"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}]}}"#
            ),
            CallerFormat::ChatCompletions,
        );
        let (input, output) = worst_case_tokens(&b, CallerFormat::ChatCompletions);
        assert_eq!(output, 50);
        assert!(
            input > ATTACHMENT_TOKENS && input < ATTACHMENT_TOKENS + 100,
            "{input}"
        );
    }

    #[test]
    fn each_format_names_its_output_cap() {
        let cases = [
            (r#"{"max_output_tokens":7}"#, CallerFormat::Responses),
            (r#"{"max_tokens":7}"#, CallerFormat::ChatCompletions),
            (r#"{"max_tokens":7}"#, CallerFormat::Messages),
            (
                r#"{"generation_config":{"max_output_tokens":7}}"#,
                CallerFormat::Interactions,
            ),
        ];
        for (json, format) in cases {
            assert_eq!(
                worst_case_tokens(&body(json, format), format).1,
                7,
                "{json}"
            );
        }
    }

    #[test]
    fn cost_is_standard_or_priority_and_zero_without_a_price() {
        let cat = flex_shared::catalog::Catalog::default();
        let m = cat.get("gpt-5.5");
        let standard = worst_case_cost(m, 1000, 1000, false);
        assert!(standard > 0);
        assert!(worst_case_cost(m, 1000, 1000, true) > standard);
        assert_eq!(worst_case_cost(None, 1000, 1000, true), 0);
    }
}
