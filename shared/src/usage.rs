//! The usage event: one per request, published by a proxy and counted once by the control plane.
//!
//! Analytics consumers read the same JSON from NATS subject `flex.usage.<org_id>`. Fields are only
//! ever added; `schema_version` changes when a meaning changes. Money is integer micro-dollars.

use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: u32 = 1;

/// The JetStream stream usage events are published to (proxies and the control plane create it
/// when missing, with the same settings).
pub const NATS_STREAM: &str = "FLEX_USAGE";
/// Subjects of [`NATS_STREAM`]; an event goes to `flex.usage.<org_id>`.
pub const NATS_SUBJECTS: &str = "flex.usage.>";
/// JetStream deduplicates republished events (same `Nats-Msg-Id`) inside this window; the
/// ledger's unique request id covers everything older.
pub const NATS_DUPLICATE_WINDOW_SECS: u64 = 600;
/// How long the stream keeps events (for analytics consumers; the control plane acks much sooner).
pub const NATS_MAX_AGE_SECS: u64 = 7 * 24 * 3600;

/// The subject an event is published on: `flex.usage.<org_id>`, with characters NATS reserves
/// in a subject token (`.`, `*`, `>`, whitespace) replaced by `_`.
pub fn nats_subject(org_id: &str) -> String {
    let token: String = org_id
        .chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    let token = if token.is_empty() {
        "_".to_string()
    } else {
        token
    };
    format!("flex.usage.{token}")
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub schema_version: u32,
    /// Unique per request; the ledger's idempotency key and the JetStream `Nats-Msg-Id`.
    pub request_id: String,
    pub org_id: String,
    pub key_id: String,
    pub model: String,
    pub provider: String,
    /// `responses`, `chat_completions`, `interactions` or `messages`.
    pub caller_format: String,
    /// As sent: `default`, `priority`, `auto` or a duration like `00h-00m-30s`.
    pub start_within: String,
    /// `flex`, `standard`, `priority`; empty when no tier served (an error before any start).
    pub served_tier: String,
    /// Why the winner won: `flex_started`, `flex_timeout`, `flex_capacity`, `flex_error`,
    /// `direct` (no race), ….
    pub reason: String,
    pub flex_wait_ms: u64,
    /// From validation to the first content-bearing upstream event.
    pub start_latency_ms: u64,
    pub duration_ms: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    /// HTTP status returned to the caller.
    pub status: u16,
    /// `ok`, `error`, `cancelled` (client went away), `incomplete` (the provider's answer was
    /// cut off or failed after it started: the caller got an error, tokens are those seen) or
    /// `interrupted` (the proxy stopped, e.g. was killed, after the provider had started
    /// answering: recorded on its next start with tokens and cost unknown, so 0, and status 0).
    pub outcome: String,
    /// Tiers that were started upstream (normally one; never two billed).
    pub tiers_started: Vec<String>,
    pub cost_micros: i64,
    pub standard_cost_micros: i64,
    /// RFC 3339 time the request was received.
    pub received_at: String,
    /// The provider's own id for the request that served (OpenAI `x-request-id`, Anthropic
    /// `request-id`), for support tickets with the provider; empty when none was sent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider_request_id: String,
}

impl UsageEvent {
    /// Why this event cannot enter the ledger, if it cannot: an empty `request_id` or `org_id`,
    /// or a count beyond the ledger's signed 64-bit columns.
    pub fn ledger_problem(&self) -> Option<String> {
        if self.request_id.trim().is_empty() || self.org_id.trim().is_empty() {
            return Some("empty request_id or org_id; both are required".into());
        }
        let counts = [
            ("flex_wait_ms", self.flex_wait_ms),
            ("start_latency_ms", self.start_latency_ms),
            ("duration_ms", self.duration_ms),
            ("input_tokens", self.input_tokens),
            ("cached_input_tokens", self.cached_input_tokens),
            ("output_tokens", self.output_tokens),
            ("reasoning_tokens", self.reasoning_tokens),
        ];
        for (name, v) in counts {
            if i64::try_from(v).is_err() {
                return Some(format!("{name} = {v} is out of range"));
            }
        }
        if i32::try_from(self.schema_version).is_err() {
            return Some(format!(
                "schema_version = {} is out of range",
                self.schema_version
            ));
        }
        None
    }

    pub fn savings_micros(&self) -> i64 {
        self.standard_cost_micros.saturating_sub(self.cost_micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_single_tokens() {
        assert_eq!(nats_subject("org_0190abc"), "flex.usage.org_0190abc");
        assert_eq!(nats_subject("a.b*c>d e"), "flex.usage.a_b_c_d_e");
        assert_eq!(nats_subject(""), "flex.usage._");
    }
}
