//! Usage reporting from the proxy: one event per request, handed to a sink that never blocks the
//! request path.
//!
//! A sink may be durable (the write-ahead log of [`crate::usage_wal`], with a `--state-dir`):
//! [`UsageSink::emit_durable`] then returns a [`Durable`] that resolves once the event is on disk,
//! and the request path holds back the end of the response body until then ([`hold_end`], or the
//! streaming paths before their final event), for at most a bounded wait. A caller that has the
//! whole answer therefore has a durable usage event behind it.

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

    /// Appends the sink's Prometheus text lines to the proxy's `/metrics`.
    fn write_metrics(&self, _out: &mut String) {}
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
            durable: Some(durable),
            wait: None,
            inner_done: false,
        })
    })
}

type WaitFuture = Pin<Box<dyn Future<Output = bool> + Send>>;

/// A body that forwards `inner` but keeps its last byte until the usage event is durable.
struct HoldEnd {
    inner: Body,
    /// The last byte seen so far.
    held: Option<Bytes>,
    durable: Option<Durable>,
    wait: Option<WaitFuture>,
    inner_done: bool,
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
                return Poll::Ready(this.held.take().map(|b| Ok(Frame::data(b))));
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.inner_done = true;
                    this.wait = this
                        .durable
                        .take()
                        .map(|d| Box::pin(d.wait()) as WaitFuture);
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
                // Trailers (our bodies have none): after the data, so release the held byte.
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
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

    fn write_metrics(&self, out: &mut String) {
        out.push_str(&format!(
            "# TYPE usage_dropped_total counter\nusage_dropped_total {}\n",
            self.dropped()
        ));
    }
}

/// Delivers queued events to the control plane's `ReportUsage` in batches, retrying with backoff
/// until each batch is accepted (the ledger deduplicates by request id).
pub async fn deliver_grpc(
    mut rx: mpsc::Receiver<UsageEvent>,
    endpoint: tonic::transport::Endpoint,
) {
    use flex_shared::proto::control::control_service_client::ControlServiceClient;
    use flex_shared::proto::control::ReportUsageRequest;
    let mut client: Option<ControlServiceClient<tonic::transport::Channel>> = None;
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
                client = endpoint.connect().await.ok().map(ControlServiceClient::new);
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
    async fn a_ready_durable_leaves_the_body_alone() {
        let resp = hold_end(Response::new(Body::from("abc")), Durable::ready());
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "abc");
    }
}
