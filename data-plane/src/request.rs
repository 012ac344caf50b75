//! Request-scoped state shared by every stage of the pipeline: the usage draft that becomes the
//! request's one usage event, the guards that report it when the caller leaves, and the outcome
//! headers. No stage imports another for these; they all import this.

use std::sync::Arc;
use std::time::Duration;

use flex_shared::catalog::{Model, Tier};
use flex_shared::usage::UsageEvent;
use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::providers::AskTier;
use crate::race::Reason;
use crate::usage::{Durable, UsageSink};

/// How a request ended, as the usage event records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused or failed before any answer started.
    Error,
    /// The caller left.
    Cancelled,
    /// The provider's answer was cut off, or failed after it started.
    Incomplete,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
            Outcome::Incomplete => "incomplete",
        }
    }
}

/// The current time as RFC 3339 (UTC, seconds).
pub fn rfc3339_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The longest model id accepted (bytes). Real ids are tens of characters; the id goes into the
/// usage event, the span, log lines and metric labels, so it is bounded before any of them.
pub const MAX_MODEL_ID_BYTES: usize = 256;

/// Bounds on the items of a request (`--max-messages`, `--max-tools`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemLimits {
    /// Messages (Chat Completions, Messages) or input items (Responses, Interactions).
    pub max_messages: usize,
    pub max_tools: usize,
}

impl Default for ItemLimits {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_tools: 1_024,
        }
    }
}

/// Checks the model id before it reaches the usage draft: at most [`MAX_MODEL_ID_BYTES`], of
/// letters, digits and `. _ - : / @ +` (every provider's ids, fine-tuned ones included). The
/// error never echoes the id (it may be megabytes, or hold control characters).
pub fn check_model_id(model: &str) -> Result<(), ApiError> {
    let fix = "use a model id from GET /v1/models.";
    let example = r#"{"model": "gpt-5.5", ...}"#;
    if model.len() > MAX_MODEL_ID_BYTES {
        return Err(ApiError::bad_request(
            "invalid_model",
            format!(
                "The model id is {} bytes long; a model id is at most {MAX_MODEL_ID_BYTES}.",
                model.len()
            ),
        )
        .param("model")
        .fix(fix)
        .example(example));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-:/@+".contains(c);
    if let Some((at, c)) = model.char_indices().find(|&(_, c)| !allowed(c)) {
        let what = if c.is_control() {
            format!("a control character (U+{:04X})", u32::from(c))
        } else {
            format!("`{c}`")
        };
        return Err(ApiError::bad_request(
            "invalid_model",
            format!(
                "The model id has {what} at byte {at}; a model id is letters, digits and . _ - : / @ +."
            ),
        )
        .param("model")
        .fix(fix)
        .example(example));
    }
    Ok(())
}

/// Checks the counts of messages (or input items) and tools against `limits`, without
/// parsing the items themselves.
pub fn check_items(
    body: &crate::formats::RawBody,
    format: crate::formats::CallerFormat,
    limits: ItemLimits,
) -> Result<(), ApiError> {
    use crate::formats::CallerFormat;
    let messages = match format {
        CallerFormat::ChatCompletions | CallerFormat::Messages => "messages",
        CallerFormat::Responses | CallerFormat::Interactions => "input",
    };
    for (field, max, flag) in [
        (messages, limits.max_messages, "--max-messages"),
        ("tools", limits.max_tools, "--max-tools"),
    ] {
        let Some(raw) = body.get(field) else {
            continue;
        };
        // More than `max` items take at least `2 * max + 3` bytes (`[1,1,…]`): a shorter array
        // needs no count (most requests).
        if raw.get().len() < max.saturating_mul(2).saturating_add(3) {
            continue;
        }
        // An array's length without building its items; other shapes are the format's to judge.
        let Ok(items) = serde_json::from_str::<Vec<serde::de::IgnoredAny>>(raw.get()) else {
            continue;
        };
        if items.len() > max {
            return Err(ApiError::bad_request(
                if field == "tools" { "too_many_tools" } else { "too_many_messages" },
                format!(
                    "`{field}` has {} items; this proxy accepts at most {max} ({flag}).",
                    items.len()
                ),
            )
            .param(field)
            .fix(format!(
                "send fewer {field} (summarize or drop old turns), or ask the operator to raise {flag}."
            )));
        }
    }
    Ok(())
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What we know about a request, filled in as it goes; becomes its usage event.
#[derive(Clone)]
pub(crate) struct Draft {
    pub(crate) event: UsageEvent,
    pub(crate) t0: Instant,
    pub(crate) model: Option<Model>,
    /// The request's span: the answer's end records the tokens on it (the OpenTelemetry GenAI
    /// `gen_ai.usage.*` attributes), and it stays open until then.
    pub(crate) span: tracing::Span,
    /// The request's admission under its limits, settled when the event is completed.
    pub(crate) limit: Option<crate::limits::Permit>,
}

impl Draft {
    /// Completes the event and hands it to `sink`; the returned [`Durable`] resolves once it is
    /// durable (hold the end of the answer on it).
    pub(crate) fn emit(self, sink: &dyn UsageSink, status: u16, outcome: Outcome) -> Durable {
        sink.emit_durable(self.complete(status, outcome))
    }

    /// Completes the event and hands it to `sink` without waiting (no answer to hold).
    pub(crate) fn emit_detached(self, sink: &dyn UsageSink, status: u16, outcome: Outcome) {
        sink.emit(self.complete(status, outcome));
    }

    fn complete(mut self, status: u16, outcome: Outcome) -> UsageEvent {
        let e = &self.event;
        if e.input_tokens > 0 || e.output_tokens > 0 {
            self.span
                .record("gen_ai.usage.input_tokens", e.input_tokens);
            self.span
                .record("gen_ai.usage.output_tokens", e.output_tokens);
        }
        self.event.status = status;
        self.event.outcome = outcome.as_str().to_string();
        self.event.duration_ms = ms(self.t0.elapsed());
        if let Some(m) = &self.model {
            let e = &mut self.event;
            let uncached = e.input_tokens.saturating_sub(e.cached_input_tokens);
            if let Some(tier) = Tier::parse(&e.served_tier) {
                e.cost_micros =
                    m.price(tier)
                        .cost_micros(uncached, e.cached_input_tokens, e.output_tokens);
                e.standard_cost_micros = m.price(Tier::Standard).cost_micros(
                    uncached,
                    e.cached_input_tokens,
                    e.output_tokens,
                );
            }
        }
        if let Some(permit) = self.limit.take() {
            permit.settle(&self.event);
        }
        self.event
    }
}

pub(crate) fn lost_draft() -> ApiError {
    ApiError::internal("the request's state was lost")
}

pub(crate) fn take(slot: &mut Option<Draft>) -> Result<Draft, ApiError> {
    slot.take().ok_or_else(lost_draft)
}

/// The outcome headers every answer carries: the tier that served, why, and the flex wait.
pub(crate) fn outcome_headers(h: &mut HeaderMap, served: Tier, reason: &str, flex_wait_ms: u64) {
    h.insert(
        "x-flex-served-tier",
        HeaderValue::from_static(served.as_str()),
    );
    if let Ok(v) = HeaderValue::from_str(reason) {
        h.insert("x-flex-reason", v);
    }
    h.insert("x-flex-wait-ms", HeaderValue::from(flex_wait_ms));
}

/// The reason recorded for a request that had no race.
pub(crate) const DIRECT: &str = Reason::Direct.as_str();

/// The draft of a request whose answer has not started yet: emitted as `cancelled` (status 499,
/// nginx's "client closed request") when dropped while still holding it, which happens only when
/// the caller went away and hyper dropped the request's future.
pub(crate) struct CancelledIfDropped {
    pub(crate) draft: Option<Draft>,
    pub(crate) sink: Arc<dyn UsageSink>,
}

impl Drop for CancelledIfDropped {
    fn drop(&mut self) {
        if let Some(draft) = self.draft.take() {
            draft.emit_detached(self.sink.as_ref(), 499, Outcome::Cancelled);
        }
    }
}

/// Emits the usage event when an answer ends (the caller's answer holds its final bytes on the
/// returned [`Durable`]), or as `cancelled` when the caller left.
pub(crate) struct UsageGuard {
    /// `None` once the event has been emitted.
    pub(crate) draft: Option<Draft>,
    pub(crate) sink: Arc<dyn UsageSink>,
    pub(crate) ask: AskTier,
    /// The response's head went out (a stream): a cancelled request then reports 200, else 499.
    pub(crate) head_sent: bool,
}

impl UsageGuard {
    /// A guard for an answer whose head has not been sent (a body being assembled).
    pub(crate) fn new(draft: Draft, sink: Arc<dyn UsageSink>, ask: AskTier) -> Self {
        Self {
            draft: Some(draft),
            sink,
            ask,
            head_sent: false,
        }
    }

    pub(crate) fn event_mut(&mut self) -> Option<&mut UsageEvent> {
        self.draft.as_mut().map(|d| &mut d.event)
    }

    /// Takes the draft back to report it otherwise (the answer is complete): disarms the guard.
    pub(crate) fn into_draft(mut self) -> Option<Draft> {
        self.draft.take()
    }

    pub(crate) fn finish(mut self, served: Option<Tier>, outcome: Outcome) -> Durable {
        match self.draft.take() {
            Some(mut draft) => {
                draft.event.served_tier = served
                    .unwrap_or(self.ask.assumed_served())
                    .as_str()
                    .to_string();
                draft.emit(self.sink.as_ref(), 200, outcome)
            }
            None => Durable::ready(),
        }
    }
}

impl Drop for UsageGuard {
    fn drop(&mut self) {
        if let Some(mut draft) = self.draft.take() {
            draft.event.served_tier = self.ask.assumed_served().as_str().to_string();
            // The caller is gone: nothing to hold, but the event still reaches the log.
            let status = if self.head_sent { 200 } else { 499 };
            draft.emit_detached(self.sink.as_ref(), status, Outcome::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_now_is_well_formed() {
        let s = rfc3339_now();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.ends_with('Z'));
        assert!(
            time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339).is_ok()
        );
    }

    #[test]
    fn model_ids_are_bounded_and_plain() {
        for ok in [
            "gpt-5.5",
            "ft:gpt-4o:acme:custom:abc123",
            "models/gemini-3.5-flash",
            "claude-opus-4-8@2026",
        ] {
            assert!(check_model_id(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_MODEL_ID_BYTES + 1);
        for (bad, says) in [
            (long.as_str(), "257 bytes long"),
            ("gpt\u{0}5", "control character (U+0000) at byte 3"),
            ("gpt 5", "` ` at byte 3"),
            ("gpt-5\n", "U+000A"),
        ] {
            let e = check_model_id(bad).unwrap_err();
            assert_eq!(e.code, "invalid_model");
            assert!(e.message.contains(says), "{}", e.message);
            assert!(!e.message.contains(bad), "the id is not echoed");
        }
    }

    #[test]
    fn message_and_tool_counts_are_bounded() {
        use crate::formats::{CallerFormat, RawBody};
        let limits = ItemLimits {
            max_messages: 2,
            max_tools: 1,
        };
        let msg = r#"{"role": "user", "content": "hi"}"#;
        let cases = [
            (
                CallerFormat::ChatCompletions,
                format!(r#"{{"messages": [{msg},{msg}]}}"#),
                None,
            ),
            (
                CallerFormat::ChatCompletions,
                format!(r#"{{"messages": [{msg},{msg},{msg}]}}"#),
                Some("too_many_messages"),
            ),
            (
                CallerFormat::Messages,
                format!(r#"{{"messages": [{msg},{msg},{msg}]}}"#),
                Some("too_many_messages"),
            ),
            (
                CallerFormat::Responses,
                r#"{"input": ["a", "b", "c"]}"#.to_string(),
                Some("too_many_messages"),
            ),
            (
                CallerFormat::Responses,
                r#"{"input": "a long string is one input"}"#.to_string(),
                None,
            ),
            (
                CallerFormat::Interactions,
                r#"{"input": [1, 2, 3]}"#.to_string(),
                Some("too_many_messages"),
            ),
            (
                CallerFormat::Responses,
                r#"{"input": "x", "tools": [{}, {}]}"#.to_string(),
                Some("too_many_tools"),
            ),
        ];
        for (format, body, want) in cases {
            let raw = RawBody::parse(body.as_bytes(), format).unwrap();
            let got = check_items(&raw, format, limits).err().map(|e| e.code);
            assert_eq!(got, want, "{format:?} {body}");
        }
    }
}
