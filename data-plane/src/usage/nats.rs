//! Usage delivery over NATS JetStream.
//!
//! [`NatsDelivery`] publishes events to the stream [`NATS_STREAM`] on `flex.usage.<org_id>` with
//! the request id as `Nats-Msg-Id`, pipelined, and awaits every ack (a duplicate ack counts: the
//! stream has the event). It reads from one of two places:
//!
//! - with a `--state-dir`, the write-ahead log ([`crate::usage::log::UsageWal`], [`NatsDelivery::run_log`]):
//!   events are durable on disk before their answer ends; delivery reads the log in order and
//!   moves its persisted position forward over what JetStream acknowledged. While NATS is
//!   unreachable events simply stay in the log (bounded), and a restarted proxy replays it;
//! - without one, a bounded in-memory [`UsageQueue`] ([`NatsDelivery::run`]): events wait in
//!   memory while NATS is unreachable, and a restart loses them.
//!
//! Either way an event is removed from where it waits only after JetStream has acknowledged it,
//! without an `.await` in between: a delivery task aborted at any point and started again may
//! publish an event twice, never lose one. JetStream drops the repeat inside its duplicate window,
//! and the control plane's ledger (unique request id) in any case.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use flex_shared::usage::{
    nats_subject, UsageEvent, NATS_DUPLICATE_WINDOW_SECS, NATS_MAX_AGE_SECS, NATS_STREAM,
    NATS_SUBJECTS,
};
use tokio::sync::Notify;

use crate::usage::log::UsageWal;
use crate::usage::{UsageSink, QUEUE_CAPACITY};

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often a waiting delivery task looks at the connection state again.
const POLL: Duration = Duration::from_millis(100);

/// The settings of `FLEX_USAGE` (created by whichever side finds it missing first).
pub fn usage_stream_config() -> stream::Config {
    stream::Config {
        name: NATS_STREAM.to_string(),
        subjects: vec![NATS_SUBJECTS.to_string()],
        duplicate_window: Duration::from_secs(NATS_DUPLICATE_WINDOW_SECS),
        max_age: Duration::from_secs(NATS_MAX_AGE_SECS),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

// ----- the queue ------------------------------------------------------------------------------

/// A bounded in-memory queue between the request path and the delivery task. Unlike a channel,
/// the delivery task reads without removing ([`UsageQueue::peek`]) and removes only what is safe
/// elsewhere ([`UsageQueue::remove`]).
#[derive(Debug)]
pub struct UsageQueue {
    events: Mutex<VecDeque<UsageEvent>>,
    notify: Notify,
    capacity: usize,
    dropped: AtomicU64,
}

impl UsageQueue {
    pub fn new() -> Arc<Self> {
        Self::with_capacity(QUEUE_CAPACITY)
    }

    pub fn with_capacity(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            events: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            capacity,
            dropped: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<UsageEvent>> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Events refused because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Copies of the first `max` events, oldest first.
    pub fn peek(&self, max: usize) -> Vec<UsageEvent> {
        self.lock().iter().take(max).cloned().collect()
    }

    /// Removes the first `n` events (they are delivered or spooled).
    pub fn remove(&self, n: usize) {
        let mut q = self.lock();
        let n = n.min(q.len());
        q.drain(..n);
    }

    /// Resolves once the queue holds an event.
    pub async fn wait_nonempty(&self) {
        loop {
            let notified = self.notify.notified();
            if !self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

impl UsageSink for UsageQueue {
    fn emit(&self, event: UsageEvent) {
        {
            let mut q = self.lock();
            if q.len() >= self.capacity {
                drop(q);
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    dropped_total = n,
                    request_id = %event.request_id,
                    "usage queue full (NATS unreachable for long, and no --state-dir for a usage log); event dropped"
                );
                return;
            }
            q.push_back(event);
        }
        self.notify.notify_one();
    }

    fn metrics(&self, out: &mut Vec<crate::series::Series>) {
        use crate::series::Series;
        out.push(Series::gauge(
            "usage_queue_length",
            "Usage events queued in memory for NATS",
            self.len() as f64,
        ));
        out.push(Series::counter(
            "usage_dropped",
            "Usage events dropped because the in-memory queue was full (no --state-dir)",
            self.dropped(),
        ));
    }
}

// ----- delivery -------------------------------------------------------------------------------

/// Settings of [`NatsDelivery`].
#[derive(Debug, Clone)]
pub struct NatsDeliveryConfig {
    /// How long to wait for JetStream to acknowledge a publish.
    pub ack_timeout: Duration,
    /// Events published per round, acks awaited together.
    pub batch: usize,
}

impl Default for NatsDeliveryConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(5),
            batch: 500,
        }
    }
}

/// Counters of a delivery task (shared, so they survive a restarted task).
#[derive(Debug, Default)]
pub struct NatsDeliveryStats {
    /// Events acknowledged by JetStream.
    pub published: AtomicU64,
    /// Acknowledged events JetStream reported as duplicates (already in the stream).
    pub duplicates: AtomicU64,
    /// Publish rounds that failed (NATS unreachable, no ack in time, stream missing); retried.
    pub failures: AtomicU64,
    /// Log lines that could not be read back (skipped).
    pub corrupt: AtomicU64,
    /// Events from memory that could never be delivered, dropped (with a state dir they go
    /// to the usage log's dead-letter file instead).
    pub dead_letters: AtomicU64,
    /// Polls (every 100 ms) during which events waited because NATS was unreachable.
    pub unreachable_polls: AtomicU64,
}

/// Publishes usage events to JetStream, from the usage log or the in-memory queue.
pub struct NatsDelivery {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsDeliveryConfig,
    stats: Arc<NatsDeliveryStats>,
    stream_ready: bool,
}

impl std::fmt::Debug for NatsDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsDelivery")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why a publish round stopped: how many events from the start were acknowledged, and the error.
struct PublishFailure {
    acked: usize,
    error: String,
}

/// Retry pacing after failed rounds.
struct Retry {
    backoff: Duration,
    failing: bool,
}

impl Retry {
    fn new() -> Self {
        Self {
            backoff: MIN_BACKOFF,
            failing: false,
        }
    }

    fn ok(&mut self) {
        if self.failing {
            tracing::info!("usage delivery to NATS recovered");
            self.failing = false;
        }
        self.backoff = MIN_BACKOFF;
    }

    /// Logs the failure and returns how long to wait.
    fn failed(&mut self, error: &str, stats: &NatsDeliveryStats, waits_in: &str) -> Duration {
        stats.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %error, retry_in_ms = u64::try_from(self.backoff.as_millis()).unwrap_or(u64::MAX), waits_in, "usage delivery to NATS failed; retrying");
        self.failing = true;
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        wait
    }
}

impl NatsDelivery {
    /// `client` may still be connecting (connect with `retry_on_initial_connect` so the proxy
    /// starts while NATS is down).
    pub fn new(client: async_nats::Client, config: NatsDeliveryConfig) -> Self {
        Self::with_stats(client, config, Arc::default())
    }

    pub fn with_stats(
        client: async_nats::Client,
        config: NatsDeliveryConfig,
        stats: Arc<NatsDeliveryStats>,
    ) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .build(client.clone());
        Self {
            client,
            js,
            config,
            stats,
            stream_ready: false,
        }
    }

    pub fn stats(&self) -> Arc<NatsDeliveryStats> {
        self.stats.clone()
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn ensure_stream(&mut self) -> Result<(), String> {
        if !self.stream_ready {
            self.js
                .get_or_create_stream(usage_stream_config())
                .await
                .map_err(|e| format!("cannot find or create stream {NATS_STREAM}: {e}"))?;
            self.stream_ready = true;
        }
        Ok(())
    }

    /// Publishes `events` in order (pipelined) and awaits every ack. An event that can never be
    /// delivered (the ledger would refuse it, or it is larger than the server's `max_payload`)
    /// is handed to `dead` and counts as done, so it never holds up the events behind it.
    async fn publish(
        &mut self,
        events: &[&UsageEvent],
        dead: &(dyn Fn(&UsageEvent, &str) + Send + Sync),
    ) -> Result<(), PublishFailure> {
        self.ensure_stream()
            .await
            .map_err(|error| PublishFailure { acked: 0, error })?;
        let max_payload = self.client.server_info().max_payload;
        let mut pending: Vec<Option<PublishAckFuture>> = Vec::with_capacity(events.len());
        let mut send_error = None;
        for e in events {
            let payload = match serde_json::to_vec(e) {
                Ok(p) => p,
                Err(err) => {
                    dead(e, &format!("cannot be serialized: {err}"));
                    pending.push(None);
                    continue;
                }
            };
            if let Some(problem) = e.ledger_problem() {
                dead(e, &format!("the ledger would refuse it: {problem}"));
                pending.push(None);
                continue;
            }
            if max_payload > 0 && payload.len() > max_payload {
                dead(
                    e,
                    &format!(
                        "{} bytes, over the NATS server's max_payload of {max_payload}",
                        payload.len()
                    ),
                );
                pending.push(None);
                continue;
            }
            let msg = PublishMessage::build()
                .payload(payload.into())
                .message_id(&e.request_id)
                .expected_stream(NATS_STREAM);
            match self.js.send_publish(nats_subject(&e.org_id), msg).await {
                Ok(ack) => pending.push(Some(ack)),
                Err(err) => {
                    send_error = Some(format!("publish failed: {err}"));
                    break;
                }
            }
        }
        let mut acked = 0;
        let mut ack_error = None;
        for ack in pending {
            let Some(ack) = ack else {
                if ack_error.is_none() {
                    acked += 1;
                }
                continue;
            };
            match ack.await {
                Ok(a) if ack_error.is_none() => {
                    acked += 1;
                    if a.duplicate {
                        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    if ack_error.is_none() {
                        ack_error = Some(format!("publish not acknowledged: {err}"));
                    }
                }
            }
        }
        self.stats
            .published
            .fetch_add(acked as u64, Ordering::Relaxed);
        match ack_error.or(send_error) {
            None => Ok(()),
            Some(error) => {
                // The stream may be gone (a NATS server that lost its storage): look again.
                self.stream_ready = false;
                Err(PublishFailure { acked, error })
            }
        }
    }

    /// Publishes the next chunk of the log; moves the log's position over what was acknowledged.
    /// Reads and position writes run on the log's I/O thread. Returns whether the position
    /// could move at all (`false`: undelivered bytes that cannot be read yet).
    async fn publish_log_chunk(&mut self, wal: &UsageWal) -> Result<bool, String> {
        let chunk = wal
            .read_async(self.config.batch.max(1))
            .await
            .map_err(|e| format!("cannot read the usage log: {e}"))?;
        if !chunk.moved() {
            return Ok(false);
        }
        let events: Vec<&UsageEvent> = chunk.events.iter().map(|s| &s.event).collect();
        let result = if events.is_empty() {
            // Only unreadable lines: nothing to send, move past them.
            Ok(())
        } else {
            let dead = |e: &UsageEvent, why: &str| wal.dead_letter(e, why);
            self.publish(&events, &dead).await
        };
        let (acked, to) = match &result {
            Ok(()) => (chunk.events.len(), Some(chunk.end)),
            Err(f) => (
                f.acked,
                f.acked
                    .checked_sub(1)
                    .and_then(|i| chunk.events.get(i))
                    .map(|s| s.end),
            ),
        };
        if let Some(to) = to {
            let corrupt = if result.is_ok() { chunk.skipped } else { 0 };
            self.stats
                .corrupt
                .fetch_add(corrupt as u64, Ordering::Relaxed);
            wal.record_delivered(acked, corrupt);
            wal.advance_async(to)
                .await
                .map_err(|e| format!("cannot record the usage log position: {e}"))?;
        }
        result.map(|()| true).map_err(|f| f.error)
    }

    /// Delivers the usage log forever, in order. Abort the task to stop it: the log's position
    /// moves only over acknowledged events, so a new task (or a restarted proxy) carries on.
    pub async fn run_log(mut self, wal: Arc<UsageWal>) {
        let mut retry = Retry::new();
        let mut unreachable_said = false;
        let mut stalled = MIN_BACKOFF;
        loop {
            wal.until_pending().await;
            if !self.connected() {
                if !unreachable_said {
                    tracing::warn!("NATS unreachable; usage events wait in the usage log");
                    unreachable_said = true;
                }
                self.stats.unreachable_polls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(POLL).await;
                continue;
            }
            unreachable_said = false;
            match self.publish_log_chunk(&wal).await {
                Ok(true) => {
                    retry.ok();
                    stalled = MIN_BACKOFF;
                }
                Ok(false) => wal.wait_after_stalled_read(&mut stalled, MAX_BACKOFF).await,
                Err(e) => {
                    let wait = retry.failed(&e, &self.stats, "usage log");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Delivers `queue` forever (no state dir: events wait in memory). Abort the task to stop
    /// it; nothing unacknowledged is removed, so a new task on the same queue carries on.
    pub async fn run(mut self, queue: Arc<UsageQueue>) {
        let mut retry = Retry::new();
        loop {
            if queue.is_empty() {
                tokio::select! {
                    () = queue.wait_nonempty() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            if !self.connected() {
                self.stats.unreachable_polls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(POLL).await;
                continue;
            }
            let batch = queue.peek(self.config.batch.max(1));
            let refs: Vec<&UsageEvent> = batch.iter().collect();
            let stats = self.stats.clone();
            let dead = move |e: &UsageEvent, why: &str| {
                let n = stats.dead_letters.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(request_id = %e.request_id, org_id = %e.org_id, reason = why, dead_letters_total = n, "usage event can never be delivered (no --state-dir for a dead-letter file); dropped, delivery goes on");
            };
            match self.publish(&refs, &dead).await {
                Ok(()) => {
                    queue.remove(batch.len());
                    retry.ok();
                }
                Err(f) => {
                    queue.remove(f.acked);
                    let wait = retry.failed(&f.error, &self.stats, "memory");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Where the events [`spawn_nats_delivery`] delivers wait.
#[derive(Debug, Clone)]
pub enum UsageSource {
    /// The write-ahead log in the state dir.
    Log(Arc<UsageWal>),
    /// Memory only (no state dir).
    Queue(Arc<UsageQueue>),
}

impl UsageSource {
    /// The sink the request path emits into.
    pub fn sink(&self) -> Arc<dyn UsageSink> {
        match self {
            Self::Log(w) => w.clone(),
            Self::Queue(q) => q.clone(),
        }
    }
}

/// Starts delivering `source` over NATS in the background (see [`NatsDelivery`]).
pub fn spawn_nats_delivery(
    source: UsageSource,
    client: async_nats::Client,
    config: NatsDeliveryConfig,
) -> tokio::task::JoinHandle<()> {
    let delivery = NatsDelivery::new(client, config);
    match source {
        UsageSource::Log(w) => tokio::spawn(delivery.run_log(w)),
        UsageSource::Queue(q) => tokio::spawn(delivery.run(q)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::usage::segments::tests::event;

    #[test]
    fn the_queue_removes_only_what_it_is_told() {
        let q = UsageQueue::with_capacity(3);
        for i in 0..4 {
            q.emit(event(i));
        }
        assert_eq!(q.len(), 3);
        assert_eq!(q.dropped(), 1);
        let peeked = q.peek(2);
        assert_eq!(peeked[0].request_id, "req_0");
        assert_eq!(q.len(), 3);
        q.remove(2);
        assert_eq!(q.peek(5)[0].request_id, "req_2");
    }
}
