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

/// The subject an event is published on: `flex.usage.<org_id>`, the org id made one subject
/// token by [`subject_token`].
pub fn nats_subject(org_id: &str) -> String {
    format!("flex.usage.{}", subject_token(org_id))
}

/// An org id as one NATS subject token: the characters NATS reserves in a token (`.`, `*`, `>`,
/// whitespace, control characters) replaced by `_`, and `_` for an empty id. The usage stream
/// (`flex.usage.<token>`) and the control plane's settled-ledger stream (`flex.ledger.<token>`)
/// both use it, so a consumer filters one org the same way on either.
pub fn subject_token(org_id: &str) -> String {
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
    if token.is_empty() {
        "_".to_string()
    } else {
        token
    }
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

/// The largest cost of one request the ledger accepts, in micro-dollars ($1,000,000).
pub const MAX_COST_MICROS: i64 = 1_000_000_000_000;

/// The longest text field of a usage event (bytes). The proxy's own fields are far shorter
/// (a model id is at most 256 bytes); this bounds an event from any source.
pub const MAX_TEXT_BYTES: usize = 512;

impl UsageEvent {
    /// Why this event cannot enter the ledger, if it cannot: an empty `request_id` or `org_id`,
    /// a count beyond the ledger's signed 64-bit columns, a cost out of
    /// `0..=`[`MAX_COST_MICROS`], a text field over [`MAX_TEXT_BYTES`] or with a NUL (which
    /// Postgres refuses in TEXT).
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
        for (name, v) in [
            ("cost_micros", self.cost_micros),
            ("standard_cost_micros", self.standard_cost_micros),
        ] {
            if !(0..=MAX_COST_MICROS).contains(&v) {
                return Some(format!(
                    "{name} = {v} is out of range (0 to {MAX_COST_MICROS}, $1,000,000)"
                ));
            }
        }
        let texts = [
            ("request_id", &self.request_id),
            ("org_id", &self.org_id),
            ("key_id", &self.key_id),
            ("model", &self.model),
            ("provider", &self.provider),
            ("caller_format", &self.caller_format),
            ("start_within", &self.start_within),
            ("served_tier", &self.served_tier),
            ("reason", &self.reason),
            ("outcome", &self.outcome),
            ("received_at", &self.received_at),
            ("provider_request_id", &self.provider_request_id),
        ];
        let tiers = self.tiers_started.iter().map(|t| ("tiers_started", t));
        for (name, t) in texts.into_iter().chain(tiers) {
            if t.len() > MAX_TEXT_BYTES {
                return Some(format!(
                    "{name} is {} bytes long (at most {MAX_TEXT_BYTES})",
                    t.len()
                ));
            }
            if t.contains('\0') {
                return Some(format!("{name} contains a NUL character"));
            }
        }
        if self.tiers_started.len() > 3 {
            return Some(format!(
                "tiers_started has {} entries (at most 3)",
                self.tiers_started.len()
            ));
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
        assert_eq!(subject_token("a.b\tc"), "a_b_c");
    }
}
