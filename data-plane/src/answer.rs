//! The answer stage: a started upstream stream becomes the caller's answer, streamed or
//! assembled into one body, by the same machinery for every pair. What differs per pair is a
//! [`Transcode`]: the identity plus a usage tap for a native pair (`passthrough`), decode →
//! canonical → encode for a translated one (`translate`).
//!
//! The machinery owns what every answer must get right:
//! - the usage event is emitted when the answer ends (or `cancelled` when the caller leaves),
//!   and the answer's final events (and last byte) wait until it is durable;
//! - an answer the provider cuts off (the stream breaks or ends before its final event, a body
//!   over the limit) or reports failed is an error to the caller, never a clean end: a
//!   streaming caller gets its format's error event, a non-streaming one a 502
//!   `upstream_incomplete`; usage records `incomplete` with the tokens seen;
//! - the served tier is the provider's own report; the provider headers the SDKs read pass on.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use flex_shared::catalog::Tier;
use flex_shared::usage::UsageEvent;
use http::{HeaderMap, HeaderValue};
use serde_json::Value;

use crate::error::ApiError;
use crate::formats::CallerFormat;
use crate::providers::AskTier;
use crate::race::Started;
use crate::request::{ms, outcome_headers, Draft, Outcome, UsageGuard};
use crate::sse::Event;
use crate::upstream::{forward_headers, provider_request_id, EventStream, UpstreamResponse};
use crate::usage::{hold_end, Durable, UsageSink};

/// Whether a transcoder renders events for a streaming caller or assembles one body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Stream,
    Assemble,
}

/// What one upstream event did to the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fed {
    /// More to come.
    More,
    /// The answer is complete with this event: the caller events from `final_from` on are its
    /// final ones (they wait for the usage event to be durable).
    Finished { final_from: usize },
    /// The provider reported the answer failed (an error event, a failed or malformed final
    /// response); the events from `final_from` on carry the error in the caller's format.
    Failed { final_from: usize },
}

/// One pair's view of an answer: upstream events in, the caller's events (or body) out.
pub(crate) trait Transcode: Send {
    /// Feeds one upstream event, appending the caller's events to `out` (nothing in
    /// [`Mode::Assemble`]) and the usage seen so far to `usage`.
    fn feed(&mut self, ev: Event, out: &mut Vec<Event>, usage: &mut UsageEvent) -> Fed;
    /// The tier the provider reported serving, once known.
    fn served(&self) -> Option<Tier>;
    /// The caller format's error event(s) for an answer cut off (`why` says how).
    fn cut_off(&mut self, why: &str, out: &mut Vec<Event>);
    /// The complete body for a non-streaming caller, or why there is none.
    fn body(&mut self) -> Result<Value, String>;
}

/// The response head every answer carries: outcome headers, the provider's forwarded headers.
fn head(h: &mut HeaderMap, upstream: &HeaderMap, served: Tier, draft: &Draft) {
    forward_headers(upstream, h);
    outcome_headers(h, served, &draft.event.reason, draft.event.flex_wait_ms);
}

/// Records the provider's request id in the draft and on the request's span.
pub(crate) fn note_provider_request_id(upstream: &HeaderMap, draft: &mut Draft) {
    if let Some(id) = provider_request_id(upstream) {
        tracing::Span::current().record("provider_request_id", id.as_str());
        draft.event.provider_request_id = id;
    }
}

fn served_or(t: &dyn Transcode, ask: AskTier) -> Tier {
    t.served().unwrap_or(ask.assumed_served())
}

struct StreamState {
    pending: VecDeque<Event>,
    rest: EventStream,
    t: Box<dyn Transcode>,
    /// Bytes to send now.
    out: VecDeque<Bytes>,
    /// The answer's final bytes: sent once `hold` resolves.
    held: VecDeque<Bytes>,
    /// The usage event's durability (set when the answer ends).
    hold: Option<Durable>,
    /// The last byte of a final event that was also the first, and what it waits for.
    tail: Option<(Bytes, Durable)>,
    sent_any: bool,
    upstream_done: bool,
    guard: Option<UsageGuard>,
    /// Where the usage goes once the guard has emitted (events after the end are ignored).
    spare: UsageEvent,
    events: Vec<Event>,
}

impl StreamState {
    /// Feeds one upstream event; queues the caller's events.
    fn feed(&mut self, ev: Event) {
        self.events.clear();
        let usage = match self.guard.as_mut().and_then(UsageGuard::event_mut) {
            Some(u) => u,
            None => &mut self.spare,
        };
        let fed = self.t.feed(ev, &mut self.events, usage);
        let events = std::mem::take(&mut self.events);
        match fed {
            Fed::More => self.queue(&events, events.len()),
            Fed::Finished { final_from } | Fed::Failed { final_from } => {
                self.queue(&events, final_from.min(events.len()));
                let outcome = if matches!(fed, Fed::Failed { .. }) {
                    Outcome::Incomplete
                } else {
                    Outcome::Ok
                };
                self.end(outcome);
                self.queue(&events[final_from.min(events.len())..], usize::MAX);
            }
        }
        self.events = events;
    }

    /// Queues `events[..upto]`: to send now, or after the end once the answer has ended.
    fn queue(&mut self, events: &[Event], upto: usize) {
        let target = if self.hold.is_some() || self.tail.is_some() {
            &mut self.held
        } else {
            &mut self.out
        };
        target.extend(events.iter().take(upto).map(Event::to_bytes));
    }

    /// Emits the usage event (once); what is queued from now on waits for it to be durable.
    fn end(&mut self, outcome: Outcome) {
        let served = self.t.served();
        if let Some(g) = self.guard.take() {
            self.hold = Some(g.finish(served, outcome));
        }
    }

    /// The answer was cut off: the caller's error event, usage `incomplete`.
    fn cut(&mut self, why: &str) {
        if self.guard.is_none() {
            return;
        }
        let request_id = self
            .guard
            .as_ref()
            .and_then(|g| g.draft.as_ref())
            .map(|d| d.event.request_id.as_str())
            .unwrap_or_default();
        tracing::warn!(request_id, why, "upstream answer cut off before its end");
        self.end(Outcome::Incomplete);
        let mut events = Vec::new();
        self.t.cut_off(why, &mut events);
        self.queue(&events, events.len());
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if let Some((last, durable)) = self.tail.take() {
                durable.wait().await;
                self.out.push_back(last);
                self.out.append(&mut self.held);
                continue;
            }
            if let Some(b) = self.out.pop_front() {
                self.sent_any = true;
                return Some(b);
            }
            if let Some(durable) = self.hold.take() {
                if !self.sent_any && !durable.is_ready() {
                    // The final events are also the first: the first byte is never delayed, so
                    // all but the last byte go now (an SSE event is not complete before its last
                    // byte), the last byte once durable.
                    let mut all = BytesMut::new();
                    self.held.drain(..).for_each(|b| all.extend_from_slice(&b));
                    let mut all = all.freeze();
                    if all.len() > 1 {
                        let last = all.split_off(all.len() - 1);
                        self.tail = Some((last, durable));
                        self.sent_any = true;
                        return Some(all);
                    }
                    self.held.push_back(all);
                }
                durable.wait().await;
                self.out.append(&mut self.held);
                continue;
            }
            if self.upstream_done {
                return None;
            }
            let next = match self.pending.pop_front() {
                Some(ev) => Some(Ok(ev)),
                None => self.rest.next().await,
            };
            match next {
                Some(Ok(ev)) => self.feed(ev),
                Some(Err(e)) => {
                    self.upstream_done = true;
                    self.cut(&format!("the provider's stream broke: {e}"));
                }
                None => {
                    self.upstream_done = true;
                    self.cut("the provider's stream ended before the answer's final event");
                }
            }
        }
    }
}

/// Streams the answer to the caller as SSE.
pub(crate) fn stream(
    started: Started,
    mut draft: Draft,
    t: Box<dyn Transcode>,
    sink: Arc<dyn UsageSink>,
) -> Response {
    note_provider_request_id(&started.headers, &mut draft);
    let ask = started.tier;
    let mut state = StreamState {
        pending: VecDeque::new(),
        rest: started.rest,
        t,
        out: VecDeque::new(),
        held: VecDeque::new(),
        hold: None,
        tail: None,
        sent_any: false,
        upstream_done: false,
        guard: None,
        spare: UsageEvent::default(),
        events: Vec::new(),
    };
    let reason_draft = draft.clone();
    state.guard = Some(UsageGuard {
        draft: Some(draft),
        sink,
        ask,
        head_sent: true,
    });
    // The events already here (up to the first content-bearing one) are fed before the head, so
    // it reports the tier the provider says it serves.
    for ev in started.buffered {
        state.feed(ev);
    }
    let served = served_or(state.t.as_ref(), ask);
    let body = futures_util::stream::unfold(state, |mut st| async move {
        let chunk = st.next_chunk().await?;
        Some((Ok::<Bytes, std::io::Error>(chunk), st))
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    head(h, &started.headers, served, &reason_draft);
    resp
}

/// Reads the whole upstream stream and answers with the assembled body. The stream's events
/// count against `limit` (`--max-response-mib`, the bound of a non-streaming provider body):
/// past it the answer is cut off, never held in memory whole.
pub(crate) async fn assemble(
    started: Started,
    mut draft: Draft,
    mut t: Box<dyn Transcode>,
    sink: Arc<dyn UsageSink>,
    format: CallerFormat,
    limit: usize,
) -> Response {
    note_provider_request_id(&started.headers, &mut draft);
    let ask = started.tier;
    // Reports the request as cancelled if the caller leaves while the body is assembled.
    let mut guard = UsageGuard::new(draft, sink.clone(), ask);
    let mut pending: VecDeque<Event> = started.buffered.into();
    let mut rest = started.rest;
    let mut broken = None;
    let mut over = None;
    let mut failed = false;
    let mut scratch = Vec::new();
    let mut spare = UsageEvent::default();
    let mut read = 0usize;
    loop {
        let ev = match pending.pop_front() {
            Some(ev) => ev,
            None => match rest.next().await {
                Some(Ok(ev)) => ev,
                Some(Err(e)) => {
                    broken = Some(format!("the provider's stream broke: {e}"));
                    break;
                }
                None => break,
            },
        };
        read = read.saturating_add(ev.data.len() + ev.event.len());
        if read > limit {
            over = Some(crate::upstream::UpstreamError::TooLarge(limit).to_string());
            break;
        }
        scratch.clear();
        let usage = guard.event_mut().unwrap_or(&mut spare);
        if let Fed::Failed { .. } = t.feed(ev, &mut scratch, usage) {
            failed = true;
        }
    }
    let Some(mut draft) = guard.into_draft() else {
        return crate::request::lost_draft().into_response_for(format);
    };
    let served = served_or(t.as_ref(), ask);
    draft.event.served_tier = served.as_str().to_string();
    let body = match over {
        Some(why) => Err(why),
        None => t.body(),
    };
    let body = match body {
        Ok(v) if !failed => v,
        other => {
            let why = match other {
                Err(why) => broken.map_or(why.clone(), |b| format!("{b} ({why})")),
                Ok(_) => "the provider reported that the answer failed".into(),
            };
            tracing::warn!(request_id = %draft.event.request_id, why, "upstream answer incomplete");
            let mut resp = ApiError::incomplete(&why).into_response_for(format);
            head(resp.headers_mut(), &started.headers, served, &draft);
            let durable = draft.emit(sink.as_ref(), 502, Outcome::Incomplete);
            return hold_end(resp, durable);
        }
    };
    let mut resp = axum::Json(body).into_response();
    head(resp.headers_mut(), &started.headers, served, &draft);
    let durable = draft.emit(sink.as_ref(), 200, Outcome::Ok);
    hold_end(resp, durable)
}

/// A non-streaming, non-racing answer in the provider's own format: its body goes back
/// untouched. `parse` reads the served tier and usage from it.
pub(crate) async fn direct_body(
    resp: UpstreamResponse,
    mut draft: Draft,
    ask: AskTier,
    sink: Arc<dyn UsageSink>,
    format: CallerFormat,
    limit: usize,
    parse: impl FnOnce(&Value, &mut UsageEvent) -> Option<Tier>,
) -> Response {
    note_provider_request_id(&resp.headers, &mut draft);
    draft.event.start_latency_ms = ms(draft.t0.elapsed());
    let guard = UsageGuard::new(draft, sink.clone(), ask);
    let (status, headers) = (resp.status, resp.headers);
    let read = resp.body.read(limit).await;
    let Some(mut draft) = guard.into_draft() else {
        return crate::request::lost_draft().into_response_for(format);
    };
    let mut served = ask.assumed_served();
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(e) => {
            draft.event.served_tier = served.as_str().to_string();
            let why = format!("reading its body failed: {e}");
            tracing::warn!(request_id = %draft.event.request_id, why, "upstream answer incomplete");
            let durable = draft.emit(sink.as_ref(), 502, Outcome::Incomplete);
            let mut out = ApiError::incomplete(&why).into_response_for(format);
            forward_headers(&headers, out.headers_mut());
            return hold_end(out, durable);
        }
    };
    if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
        if let Some(t) = parse(&v, &mut draft.event) {
            served = t;
        }
    }
    draft.event.served_tier = served.as_str().to_string();
    let mut out = (status, bytes).into_response();
    if let Some(ct) = headers.get(http::header::CONTENT_TYPE) {
        out.headers_mut()
            .insert(http::header::CONTENT_TYPE, ct.clone());
    }
    head(out.headers_mut(), &headers, served, &draft);
    let durable = draft.emit(sink.as_ref(), status.as_u16(), Outcome::Ok);
    hold_end(out, durable)
}
