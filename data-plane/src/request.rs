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
}
