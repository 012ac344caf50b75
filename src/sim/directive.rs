//! Per-request directives: `#sim key=value key=value …` anywhere in a user text, in any caller
//! format, override the simulator's configuration for that one request.
//!
//! Keys (unknown keys and malformed values are ignored):
//! - `flex_delay_ms`, `standard_delay_ms`, `priority_delay_ms`: the tier's wait before content;
//! - `flex_status=N` (any status ≥ 400): the flex tier's error; 429, 503 and 529 are capacity
//!   errors (`0` clears a configured one);
//! - `standard_status=N` with `standard_fail_times=N` (and `sim_id`): the standard tier's error,
//!   for its first N attempts (every attempt without `standard_fail_times`);
//! - `error_code=CODE`: the error's code in the provider's envelope (OpenAI `code`, Anthropic
//!   `error.type`, Gemini `status`), e.g. `insufficient_quota`;
//! - `retry_after=S`: a `Retry-After: S` header on the error;
//! - `flex_header_delay_ms`, `standard_header_delay_ms`: the wait before the response head (a
//!   provider that accepted the connection and says nothing);
//! - `cut_after=N`: the stream breaks (the connection is reset) after N events; `end_after=N`:
//!   it ends cleanly after N events, without its final ones; `flex_cut_after=N`: the same break,
//!   on the flex tier only (`flex_cut_after=0`: a stream broken before it starts);
//! - `flex_reset=1`: the flex tier closes the connection (HTTP/1.1) or resets the stream
//!   (HTTP/2) instead of answering: no response head at all;
//! - `flex_fail_times=N` with `sim_id=ID`: the first N flex attempts with that id fail with the
//!   capacity error, later ones succeed (without `sim_id` the directive text is the key);
//! - `flex_error_rate=0.3`: probability of the flex capacity error;
//! - `status=400` (any status ≥ 400): every tier fails with that error, e.g. 400
//!   `invalid_request_error`, in the provider's envelope;
//! - `output_tokens=N`: words in the answer (default 12); `tokens_per_sec=N` (0 = unlimited);
//! - `tool=NAME` or `tool_call=NAME`: when the request declares tools, call that one;
//! - `served_tier=priority|standard|default|flex`: the tier an `auto` request is served on.
//!
//! Several `#sim` blocks (in one text or across user texts) merge, later keys winning. A block
//! ends at the first word without `=`.

const MARKER: &str = "#sim";

/// The overrides found in a request's user texts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Directive {
    pub flex_delay_ms: Option<u64>,
    pub standard_delay_ms: Option<u64>,
    pub priority_delay_ms: Option<u64>,
    /// `Some(0)` clears the configured status.
    pub flex_status: Option<u16>,
    pub flex_fail_times: Option<u32>,
    pub flex_error_rate: Option<f64>,
    pub status: Option<u16>,
    pub output_tokens: Option<u32>,
    pub tokens_per_sec: Option<u64>,
    pub tool: Option<String>,
    pub served_tier: Option<String>,
    pub sim_id: Option<String>,
    pub standard_status: Option<u16>,
    pub standard_fail_times: Option<u32>,
    pub error_code: Option<String>,
    pub retry_after: Option<u64>,
    pub flex_header_delay_ms: Option<u64>,
    pub standard_header_delay_ms: Option<u64>,
    pub cut_after: Option<usize>,
    pub end_after: Option<usize>,
    pub flex_cut_after: Option<usize>,
    pub flex_reset: bool,
    /// Every `key=value` token seen, space-separated, in order (keys the `flex_fail_times`
    /// counter when there is no `sim_id`).
    pub text: String,
}

impl Directive {
    /// Parses and merges every `#sim` block of `texts`.
    pub fn parse<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut directive = Self::default();
        for text in texts {
            for (start, _) in text.match_indices(MARKER) {
                let rest = &text[start + MARKER.len()..];
                // `#simulate` is not a directive.
                if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
                    continue;
                }
                for token in rest.split_whitespace() {
                    let Some((key, value)) = token.split_once('=') else {
                        break;
                    };
                    directive.set(key, value.trim_end_matches([',', ';', '.']));
                    if !directive.text.is_empty() {
                        directive.text.push(' ');
                    }
                    directive.text.push_str(token);
                }
            }
        }
        directive
    }

    /// Whether any `#sim` token was found.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    fn set(&mut self, key: &str, value: &str) {
        match key {
            "flex_delay_ms" => self.flex_delay_ms = value.parse().ok(),
            "standard_delay_ms" => self.standard_delay_ms = value.parse().ok(),
            "priority_delay_ms" => self.priority_delay_ms = value.parse().ok(),
            "flex_status" => self.flex_status = value.parse().ok(),
            "flex_fail_times" => self.flex_fail_times = value.parse().ok(),
            "flex_error_rate" => {
                self.flex_error_rate = value.parse().ok().filter(|rate: &f64| rate.is_finite())
            }
            "status" => self.status = value.parse().ok().filter(|status| *status >= 400),
            "output_tokens" => self.output_tokens = value.parse().ok(),
            "tokens_per_sec" => self.tokens_per_sec = value.parse().ok(),
            "tool" | "tool_call" => self.tool = Some(value.to_owned()).filter(|v| !v.is_empty()),
            "served_tier" => self.served_tier = Some(value.to_ascii_lowercase()),
            "sim_id" => self.sim_id = Some(value.to_owned()),
            "standard_status" => {
                self.standard_status = value.parse().ok().filter(|status| *status >= 400)
            }
            "standard_fail_times" => self.standard_fail_times = value.parse().ok(),
            "error_code" => self.error_code = Some(value.to_owned()).filter(|v| !v.is_empty()),
            "retry_after" => self.retry_after = value.parse().ok(),
            "flex_header_delay_ms" => self.flex_header_delay_ms = value.parse().ok(),
            "standard_header_delay_ms" => self.standard_header_delay_ms = value.parse().ok(),
            "cut_after" => self.cut_after = value.parse().ok(),
            "end_after" => self.end_after = value.parse().ok(),
            "flex_cut_after" => self.flex_cut_after = value.parse().ok(),
            "flex_reset" => self.flex_reset = matches!(value, "1" | "true"),
            _ => tracing::debug!(key, "sim: unknown directive key"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let d = Directive::parse([
            "hello #sim flex_delay_ms=12000 flex_status=429 standard_delay_ms=30 output_tokens=20 \
             tool=get_weather flex_fail_times=2 status=400 and then prose=ignored",
        ]);
        assert_eq!(d.flex_delay_ms, Some(12000));
        assert_eq!(d.flex_status, Some(429));
        assert_eq!(d.standard_delay_ms, Some(30));
        assert_eq!(d.output_tokens, Some(20));
        assert_eq!(d.tool.as_deref(), Some("get_weather"));
        assert_eq!(d.flex_fail_times, Some(2));
        assert_eq!(d.status, Some(400));
        assert!(d.text.starts_with("flex_delay_ms=12000 "));
        assert!(d.text.ends_with("status=400"));
    }

    #[test]
    fn merges_blocks_later_wins_and_ignores_noise() {
        let d = Directive::parse([
            "#sim output_tokens=3 tool_call=f",
            "#simulated output_tokens=99",
            "x #sim output_tokens=5, sim_id=abc served_tier=PRIORITY",
        ]);
        assert_eq!(d.output_tokens, Some(5));
        assert_eq!(d.tool.as_deref(), Some("f"));
        assert_eq!(d.sim_id.as_deref(), Some("abc"));
        assert_eq!(d.served_tier.as_deref(), Some("priority"));
        assert_eq!(
            Directive::parse(["no directive here"]),
            Directive::default()
        );
        assert!(Directive::parse(["#sim"]).is_empty());
        assert_eq!(Directive::parse(["#sim status=200"]).status, None);
    }
}
