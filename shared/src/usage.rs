//! The usage event: one per request, published by a proxy and counted once by the control plane.
//!
//! Analytics consumers read the same JSON from NATS subject `flex.usage.<org_id>`. Fields are only
//! ever added; `schema_version` changes when a meaning changes. Money is integer micro-dollars.

use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// `ok`, `error`, `cancelled` (client went away) or `incomplete` (stream cut).
    pub outcome: String,
    /// Tiers that were started upstream (normally one; never two billed).
    pub tiers_started: Vec<String>,
    pub cost_micros: i64,
    pub standard_cost_micros: i64,
    /// RFC 3339 time the request was received.
    pub received_at: String,
}

impl UsageEvent {
    pub fn savings_micros(&self) -> i64 {
        self.standard_cost_micros.saturating_sub(self.cost_micros)
    }
}
