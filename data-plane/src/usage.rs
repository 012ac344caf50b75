//! Usage reporting from the proxy: one event per request, handed to a sink that never blocks the
//! request path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flex_shared::usage::UsageEvent;
use tokio::sync::mpsc;

/// Where usage events go. `emit` must not block or fail the caller's request.
pub trait UsageSink: Send + Sync {
    fn emit(&self, event: UsageEvent);
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
