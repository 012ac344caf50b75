//! Streaming answers: a provider writes its whole stream up front as a [`Script`] of SSE frames
//! and pauses; playing it back costs one timer per pause and nothing else. Frames between two
//! pauses go out as one chunk.

use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderName, HeaderValue};
use serde::Serialize;
use serde_json::{Map, Value};

use super::stats::ServeGuard;

enum Step {
    Frame(Bytes),
    Pause(Duration),
    /// The first content-bearing event follows.
    Start,
    /// The stream breaks here (the connection is reset): a `cut_after` directive.
    Break,
}

/// Keeps the first `n` events of `steps`; then the stream breaks (`Err`) or ends (`Ok`).
fn cut_steps(steps: Vec<Step>, cut: Result<usize, usize>) -> Vec<Step> {
    let (Ok(n) | Err(n)) = cut;
    let mut out = Vec::new();
    let mut seen = 0;
    for step in steps {
        match step {
            Step::Frame(frame) => {
                let mut end = 0;
                while seen < n {
                    match frame[end..].windows(2).position(|w| w == b"\n\n") {
                        Some(p) => {
                            end += p + 2;
                            seen += 1;
                        }
                        None => break,
                    }
                }
                if seen < n {
                    out.push(Step::Frame(frame));
                    continue;
                }
                if end > 0 {
                    out.push(Step::Frame(frame.slice(..end)));
                }
                if cut.is_err() {
                    // Let the events before the cut reach the wire before the reset.
                    out.push(Step::Pause(Duration::from_millis(20)));
                    out.push(Step::Break);
                }
                return out;
            }
            other => out.push(other),
        }
    }
    out
}

/// An SSE stream, written ahead of time.
#[derive(Default)]
pub(crate) struct Script {
    steps: Vec<Step>,
    buf: BytesMut,
}

impl Script {
    /// `event: <name>\ndata: <json>\n\n`
    pub(crate) fn event(&mut self, name: &str, data: &impl Serialize) {
        self.buf.put_slice(b"event: ");
        self.buf.put_slice(name.as_bytes());
        self.buf.put_slice(b"\n");
        self.data(data);
    }

    /// `event: <kind>\ndata: {"type": <kind>, …fields}\n\n` (Anthropic's and the Responses
    /// API's events name themselves in `type`).
    pub(crate) fn typed_event(&mut self, kind: &str, fields: Value) {
        let mut event = Map::new();
        event.insert("type".to_owned(), Value::from(kind));
        if let Value::Object(fields) = fields {
            event.extend(fields);
        }
        self.event(kind, &event);
    }

    /// `data: <json>\n\n`
    pub(crate) fn data(&mut self, data: &impl Serialize) {
        self.buf.put_slice(b"data: ");
        let mut writer = (&mut self.buf).writer();
        if let Err(err) = serde_json::to_writer(&mut writer, data) {
            // Serializing a `serde_json::Value` cannot fail; keep the stream well-formed anyway.
            tracing::error!(error = %err, "sim: could not serialize an SSE event");
            self.buf.put_slice(b"{}");
        }
        self.buf.put_slice(b"\n\n");
    }

    /// `data: <text>\n\n`, verbatim (e.g. `[DONE]`).
    pub(crate) fn data_raw(&mut self, text: &str) {
        self.buf.put_slice(b"data: ");
        self.buf.put_slice(text.as_bytes());
        self.buf.put_slice(b"\n\n");
    }

    /// Waits `delay` (nothing when zero) before what follows.
    pub(crate) fn pause(&mut self, delay: Duration) {
        if !delay.is_zero() {
            self.flush();
            self.steps.push(Step::Pause(delay));
        }
    }

    /// Waits `delay`, then marks the start of the content (counted in the stats).
    pub(crate) fn start_content(&mut self, delay: Duration) {
        self.pause(delay);
        self.flush();
        self.steps.push(Step::Start);
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.steps.push(Step::Frame(self.buf.split().freeze()));
        }
    }

    /// A `200 text/event-stream` response playing the script; dropping it early counts as a
    /// cancellation in `guard`.
    pub(crate) fn into_response(
        mut self,
        guard: ServeGuard,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Response {
        self.flush();
        let steps = match guard.cut {
            Some(cut) => cut_steps(self.steps, cut),
            None => self.steps,
        };
        let playback = Playback {
            steps: steps.into_iter(),
            guard,
        };
        let body = Body::from_stream(futures_util::stream::unfold(playback, next_frame));
        let mut response = (
            [
                (
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream; charset=utf-8"),
                ),
                (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            body,
        )
            .into_response();
        response.headers_mut().extend(headers.iter().cloned());
        response
    }
}

struct Playback {
    steps: std::vec::IntoIter<Step>,
    guard: ServeGuard,
}

async fn next_frame(mut playback: Playback) -> Option<(Result<Bytes, std::io::Error>, Playback)> {
    while let Some(step) = playback.steps.next() {
        match step {
            Step::Pause(delay) => tokio::time::sleep(delay).await,
            Step::Start => playback.guard.start(),
            Step::Break => {
                playback.guard.finish();
                let cut = std::io::Error::other("sim: stream cut by a cut_after directive");
                return Some((Err(cut), playback));
            }
            Step::Frame(frame) => {
                if playback.steps.as_slice().is_empty() {
                    playback.guard.finish();
                }
                return Some((Ok(frame), playback));
            }
        }
    }
    playback.guard.finish();
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use http_body_util::BodyExt;
    use serde_json::json;

    use super::*;
    use crate::sim::stats::{Provider, SimStats, Tier};

    #[tokio::test]
    async fn frames_between_pauses_are_merged_and_completion_is_counted() {
        let stats = Arc::new(SimStats::default());
        let mut script = Script::default();
        script.typed_event("a", json!({"x": 1}));
        script.start_content(Duration::from_millis(1));
        script.data(&json!("y"));
        script.data_raw("[DONE]");
        let guard = ServeGuard::new(stats.clone(), Provider::OpenAi, Tier::Flex);
        let response = script.into_response(guard, &[]);
        let mut body = response.into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(
            frames,
            vec![
                Bytes::from("event: a\ndata: {\"type\":\"a\",\"x\":1}\n\n"),
                Bytes::from("data: \"y\"\n\ndata: [DONE]\n\n"),
            ]
        );
        let snap = stats.snapshot();
        assert_eq!(snap.started("openai:flex"), 1);
        assert_eq!(snap.cancelled("openai:flex"), 0);
    }
}
