//! Usage reporting from the proxy: one event per request, handed to a sink that never blocks the
//! request path.
//!
//! A sink may be durable (the write-ahead log of [`log`], with a `--state-dir`):
//! [`UsageSink::emit_durable`] then returns a [`Durable`] that resolves once the event is on disk,
//! and the request path holds back the end of the response body until then ([`hold_end`], or the
//! streaming paths before their final event), for at most a bounded wait. A caller that has the
//! whole answer therefore has a durable usage event behind it.

pub mod journal;
pub mod log;
pub mod nats;
mod segments;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use flex_shared::usage::UsageEvent;
use http_body::{Frame, SizeHint};
use tokio::sync::{mpsc, oneshot};

/// Where usage events go. `emit` must not block or fail the caller's request.
pub trait UsageSink: Send + Sync {
    fn emit(&self, event: UsageEvent);

    /// Emits `event` and tells when it is durable. The default (an in-memory sink) has nothing
    /// to wait for.
    fn emit_durable(&self, event: UsageEvent) -> Durable {
        self.emit(event);
        Durable::ready()
    }

    /// The upstream of `event`'s request started answering (its tier is set): a sink that
    /// survives a crash records it, so that an answer cut off by the proxy stopping still gets an
    /// event (`interrupted`) on the next start. The default has nothing to record.
    fn opened(&self, _event: UsageEvent) {}

    /// Appends the sink's own series (log, journal, delivery) to the proxy's `/metrics`.
    fn metrics(&self, _out: &mut Vec<crate::series::Series>) {}
}

/// Counters of the bounded wait for durability (shared by every [`Durable`] of one sink).
#[derive(Debug, Default)]
pub struct DurableStats {
    /// Responses whose end waited for their usage event to be durable.
    pub waits: AtomicU64,
    /// Waits that hit the bound: the response ended before its event was durable.
    pub timeouts: AtomicU64,
    /// Events the sink could not make durable (log full, write error, writer gone); the
    /// response ended at once.
    pub not_durable: AtomicU64,
}

/// Resolves once a usage event is durable, or at the sink's bound. Await it with
/// [`Durable::wait`] right before the end of the response body.
#[must_use = "hold the end of the response until the usage event is durable (or drop it on purpose)"]
#[derive(Debug)]
pub struct Durable(Option<Pending>);

#[derive(Debug)]
struct Pending {
    rx: oneshot::Receiver<bool>,
    max_wait: Duration,
    stats: Arc<DurableStats>,
}

impl Durable {
    /// Nothing to wait for.
    pub fn ready() -> Self {
        Self(None)
    }

    /// Waits for `rx` (`true`: durable; `false`: never will be) for at most `max_wait`.
    pub fn pending(
        rx: oneshot::Receiver<bool>,
        max_wait: Duration,
        stats: Arc<DurableStats>,
    ) -> Self {
        Self(Some(Pending {
            rx,
            max_wait,
            stats,
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.0.is_none()
    }

    /// Waits (bounded) until the event is durable. Returns whether it is; never fails.
    pub async fn wait(self) -> bool {
        let Some(p) = self.0 else {
            return true;
        };
        p.stats.waits.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(p.max_wait, p.rx).await {
            Ok(Ok(true)) => true,
            Ok(Ok(false) | Err(_)) => {
                p.stats.not_durable.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(_) => {
                let n = p.stats.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    wait_ms = u64::try_from(p.max_wait.as_millis()).unwrap_or(u64::MAX),
                    timeouts_total = n,
                    "usage event not durable within the bound; the response ends anyway (the event is still being written)"
                );
                false
            }
        }
    }
}

/// Holds back the last byte of `resp`'s body until `durable` resolves (for non-streaming
/// answers: everything else goes out at once). A ready `durable` leaves `resp` as it is.
pub fn hold_end(resp: Response, durable: Durable) -> Response {
    if durable.is_ready() {
        return resp;
    }
    resp.map(|body| {
        Body::new(HoldEnd {
            inner: body,
            held: None,
            trailers: None,
            durable: Some(durable),
            wait: None,
            inner_done: false,
        })
    })
}

type WaitFuture = Pin<Box<dyn Future<Output = bool> + Send>>;

/// A body that forwards `inner` but keeps its last byte until the usage event is durable.
/// Trailers (if any) follow the last byte.
struct HoldEnd {
    inner: Body,
    /// The last byte seen so far.
    held: Option<Bytes>,
    /// The inner body's trailers: sent after the held byte.
    trailers: Option<Frame<Bytes>>,
    durable: Option<Durable>,
    wait: Option<WaitFuture>,
    inner_done: bool,
}

impl HoldEnd {
    /// The inner body has ended (or sent its trailers): start waiting for durability.
    fn inner_ended(&mut self) {
        self.inner_done = true;
        self.wait = self
            .durable
            .take()
            .map(|d| Box::pin(d.wait()) as WaitFuture);
    }
}

impl http_body::Body for HoldEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        loop {
            if this.inner_done {
                if let Some(w) = this.wait.as_mut() {
                    if w.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.wait = None;
                }
                if let Some(b) = this.held.take() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                return Poll::Ready(this.trailers.take().map(Ok));
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.inner_ended();
                    continue;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(mut data) => {
                    if data.is_empty() {
                        continue;
                    }
                    let last = data.split_off(data.len() - 1);
                    let out = match this.held.replace(last) {
                        Some(prev) => {
                            let mut b = BytesMut::with_capacity(prev.len() + data.len());
                            b.extend_from_slice(&prev);
                            b.extend_from_slice(&data);
                            b.freeze()
                        }
                        None => data,
                    };
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                // Trailers end the body: they go out after the held byte, once it is released.
                Err(frame) => {
                    this.trailers = Some(frame);
                    this.inner_ended();
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.as_ref().map_or(0, |b| b.len() as u64);
        let inner = if self.inner_done {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        };
        match inner.exact() {
            Some(n) => SizeHint::with_exact(n + held),
            None => {
                let mut h = SizeHint::new();
                if let Some(upper) = inner.upper() {
                    h.set_upper(upper + held);
                }
                h.set_lower(inner.lower() + held);
                h
            }
        }
    }
}

/// A bounded in-memory queue in front of a delivery task.
pub struct ChannelSink {
    tx: mpsc::Sender<UsageEvent>,
    dropped: AtomicU64,
}

/// Events the queue holds before new ones are counted as dropped.
pub const QUEUE_CAPACITY: usize = 100_000;

impl ChannelSink {
    pub fn new() -> (Arc<Self>, mpsc::Receiver<UsageEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        (
            Arc::new(Self {
                tx,
                dropped: AtomicU64::new(0),
            }),
            rx,
        )
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl UsageSink for ChannelSink {
    fn emit(&self, event: UsageEvent) {
        if self.tx.try_send(event).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(
                dropped_total = n,
                "usage queue full or closed; event dropped"
            );
        }
    }

    fn metrics(&self, out: &mut Vec<crate::series::Series>) {
        out.push(crate::series::Series::counter(
            "usage_dropped",
            "Usage events dropped because the queue to the control plane was full or closed",
            self.dropped(),
        ));
    }
}

/// Delivers queued events to the control plane's `ReportUsage` in batches, retrying with backoff
/// until each batch is accepted (the ledger deduplicates by request id).
pub async fn deliver_grpc(
    mut rx: mpsc::Receiver<UsageEvent>,
    endpoint: tonic::transport::Endpoint,
    token: crate::control_client::ProxyToken,
) {
    use flex_shared::proto::control::ReportUsageRequest;
    let mut client: Option<crate::control_client::ControlClient> = None;
    let mut batch: Vec<String> = Vec::new();
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(ev) => batch.push(serde_json::to_string(&ev).unwrap_or_default()),
                None => return,
            }
        }
        while batch.len() < 500 {
            match rx.try_recv() {
                Ok(ev) => batch.push(serde_json::to_string(&ev).unwrap_or_default()),
                Err(_) => break,
            }
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            if client.is_none() {
                client = endpoint
                    .connect()
                    .await
                    .ok()
                    .map(|c| crate::control_client::client(c, &token));
            }
            if let Some(c) = client.as_mut() {
                match c
                    .report_usage(ReportUsageRequest {
                        events_json: batch.clone(),
                    })
                    .await
                {
                    Ok(_) => {
                        batch.clear();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message(), "usage delivery failed; retrying");
                        client = None;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Test helpers for the request paths that hold the end of an answer: a sink whose events
/// become durable only when the test says so, a loopback upstream with a canned answer, and a
/// reader of a response body that tells what arrived before it went quiet.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::{Proxy, ProxyConfig};
    use crate::request::Draft;
    use crate::snapshot::SnapshotStore;
    use crate::upstream::{UpstreamClient, UpstreamConfig};

    /// A sink whose [`Durable`]s resolve only on [`GatedSink::release`].
    #[derive(Default)]
    pub(crate) struct GatedSink {
        waiters: Mutex<Vec<oneshot::Sender<bool>>>,
        pub(crate) events: Mutex<Vec<UsageEvent>>,
        stats: Arc<DurableStats>,
    }

    impl GatedSink {
        /// Makes every event emitted so far durable; returns how many were waiting.
        pub(crate) fn release(&self) -> usize {
            let waiters: Vec<_> = self
                .waiters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .drain(..)
                .collect();
            let n = waiters.len();
            for w in waiters {
                let _ = w.send(true);
            }
            n
        }

        pub(crate) fn emitted(&self) -> Vec<UsageEvent> {
            self.events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        }
    }

    impl UsageSink for GatedSink {
        fn emit(&self, event: UsageEvent) {
            self.events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(event);
        }

        fn emit_durable(&self, event: UsageEvent) -> Durable {
            self.emit(event);
            let (tx, rx) = oneshot::channel();
            self.waiters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(tx);
            Durable::pending(rx, Duration::from_secs(60), self.stats.clone())
        }
    }

    /// A loopback server answering every connection with `response` (raw HTTP/1.1) after reading
    /// the request. Returns its base URL.
    pub(crate) async fn fake_upstream(response: String) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}"));
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let response = response.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok(n) = conn.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                        if let Some(head_end) = text.find("\r\n\r\n") {
                            let len = text[..head_end]
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if req.len() >= head_end + 4 + len {
                                break;
                            }
                        }
                    }
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        format!("http://{addr}")
    }

    /// A close-delimited SSE answer of `events` (`(event name, data)`; an empty name is left out).
    pub(crate) fn sse_response(events: &[(&str, &str)]) -> String {
        let mut body = String::new();
        for (name, data) in events {
            if !name.is_empty() {
                body.push_str(&format!("event: {name}\n"));
            }
            body.push_str(&format!("data: {data}\n\n"));
        }
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}"
        )
    }

    /// A JSON answer.
    pub(crate) fn json_response(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    pub(crate) fn proxy(sink: Arc<GatedSink>) -> Proxy {
        Proxy::new(
            Arc::new(SnapshotStore::new(None, None)),
            UpstreamClient::new(&UpstreamConfig::default())
                .unwrap_or_else(|e| panic!("upstream client: {e}")),
            ProxyConfig::default(),
            sink,
        )
    }

    pub(crate) fn draft() -> Draft {
        Draft {
            event: UsageEvent {
                schema_version: 1,
                request_id: "req_test".into(),
                org_id: "org_1".into(),
                key_id: "key_1".into(),
                start_within: "default".into(),
                ..UsageEvent::default()
            },
            t0: tokio::time::Instant::now(),
            model: None,
            span: tracing::Span::none(),
            limit: None,
        }
    }

    /// Reads `body` until no frame comes for `quiet` (or it ends). Returns what arrived and
    /// whether the body ended.
    pub(crate) async fn read_until_quiet(body: &mut Body, quiet: Duration) -> (String, bool) {
        use http_body_util::BodyExt;
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(quiet, body.frame()).await {
                Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
                Ok(None) => return (String::from_utf8_lossy(&got).into_owned(), true),
                Ok(Some(Err(e))) => panic!("body failed: {e}"),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        got.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Complete SSE events (terminated by a blank line) in `text`: their `data:` lines.
    pub(crate) fn complete_events(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find("\n\n") {
            let ev = &rest[..i];
            out.push(
                ev.lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
            rest = &rest[i + 2..];
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn pending(max_wait: Duration) -> (oneshot::Sender<bool>, Durable, Arc<DurableStats>) {
        let (tx, rx) = oneshot::channel();
        let stats = Arc::new(DurableStats::default());
        (tx, Durable::pending(rx, max_wait, stats.clone()), stats)
    }

    #[tokio::test]
    async fn the_last_byte_waits_until_the_event_is_durable() {
        let (tx, durable, stats) = pending(Duration::from_secs(30));
        let resp = hold_end(Response::new(Body::from("hello")), durable);
        let mut body = resp.into_body();
        assert_eq!(
            http_body::Body::size_hint(&body).exact(),
            Some(5),
            "Content-Length is kept"
        );
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "hell");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), body.frame())
                .await
                .is_err(),
            "the end is held"
        );
        tx.send(true).unwrap();
        let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(last, "o");
        assert!(body.frame().await.is_none());
        assert_eq!(stats.waits.load(Ordering::Relaxed), 1);
        assert_eq!(stats.timeouts.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn the_wait_is_bounded_and_counted() {
        let (_tx, durable, stats) = pending(Duration::from_millis(30));
        let resp = hold_end(Response::new(Body::from("{}")), durable);
        let t0 = std::time::Instant::now();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "{}");
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert_eq!(stats.timeouts.load(Ordering::Relaxed), 1);
        // A sink that cannot make it durable releases the answer at once.
        let (tx, durable, stats) = pending(Duration::from_secs(30));
        tx.send(false).unwrap();
        let resp = hold_end(Response::new(Body::from("{}")), durable);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "{}");
        assert_eq!(stats.not_durable.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn trailers_follow_the_held_last_byte() {
        let (tx, durable, _stats) = pending(Duration::from_secs(30));
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-done", http::HeaderValue::from_static("1"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from("hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let inner = Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        let mut body = hold_end(Response::new(inner), durable).into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "hell");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), body.frame())
                .await
                .is_err(),
            "neither the last byte nor the trailers before the event is durable"
        );
        tx.send(true).unwrap();
        let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(last, "o", "the last byte comes first");
        let t = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(t["x-done"], "1");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_ready_durable_leaves_the_body_alone() {
        let resp = hold_end(Response::new(Body::from("abc")), Durable::ready());
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "abc");
    }
}
