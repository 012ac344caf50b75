//! The usage consumer: a durable JetStream pull consumer that moves usage events from the stream
//! `FLEX_USAGE` (subjects `flex.usage.<org_id>`, published by the proxies) into the ledger.
//!
//! Exactly once: each batch is recorded in one database transaction ([`ControlPlane::record_usage`],
//! which ignores request ids already in the ledger), and its messages are acknowledged only after
//! that transaction committed. A crash (or a lost ack) between commit and ack redelivers the
//! batch, which the unique request id absorbs; nothing is acknowledged that is not in the ledger.
//!
//! An event that can never enter the ledger (not JSON of a usage event, an empty request id, a
//! count out of range) is logged, counted ([`UsageConsumerStats::malformed`]) and terminated, so
//! it is not redelivered forever. A database that fails is retried with backoff, the batch's
//! messages kept in progress meanwhile; a NATS that fails is reconnected with backoff.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream, AckKind};
use flex_shared::usage::{
    UsageEvent, NATS_DUPLICATE_WINDOW_SECS, NATS_MAX_AGE_SECS, NATS_STREAM, NATS_SUBJECTS,
};
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::store::StoreError;
use crate::ControlPlane;

/// The durable consumer's default name.
pub const DURABLE: &str = "flex-control-usage";

/// The settings of `FLEX_USAGE`; the same as the proxies create it with (whichever side finds
/// it missing first creates it).
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

/// Settings of the usage consumer.
#[derive(Debug, Clone)]
pub struct UsageConsumerConfig {
    /// Durable consumer name; instances sharing it share the work.
    pub durable: String,
    /// Most events recorded in one database transaction.
    pub batch: usize,
    /// After the first message of a batch, how long to wait for more before recording.
    pub linger: Duration,
    /// JetStream redelivers a message not acknowledged within this time.
    pub ack_wait: Duration,
    /// Messages delivered and not yet acknowledged, at most.
    pub max_ack_pending: i64,
    /// How often the consumer's lag is read from JetStream (`flex_usage_consumer_lag`).
    pub lag_interval: Duration,
}

impl Default for UsageConsumerConfig {
    fn default() -> Self {
        Self {
            durable: DURABLE.to_string(),
            batch: 1000,
            linger: Duration::from_millis(20),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
            lag_interval: Duration::from_secs(5),
        }
    }
}

/// Counters of the usage consumer.
#[derive(Debug, Default)]
pub struct UsageConsumerStats {
    /// Messages received (redeliveries included).
    pub received: AtomicU64,
    /// Ledger rows inserted.
    pub recorded: AtomicU64,
    /// Events whose request id was already in the ledger (redeliveries, republished events).
    pub duplicates: AtomicU64,
    /// Messages that can never enter the ledger, terminated.
    pub malformed: AtomicU64,
    /// Database transactions committed.
    pub batches: AtomicU64,
    /// Failed database writes and NATS sessions (each retried).
    pub errors: AtomicU64,
    /// Messages of the stream not yet acknowledged by the consumer (waiting for delivery, or
    /// delivered and not yet in the ledger), as JetStream last reported; `u64::MAX` until the
    /// first report.
    pub lag: AtomicU64,
}

/// A running consumer; dropping it stops it.
pub struct UsageConsumer {
    stats: Arc<UsageConsumerStats>,
    task: JoinHandle<()>,
    lag_task: JoinHandle<()>,
}

impl std::fmt::Debug for UsageConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageConsumer")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl UsageConsumer {
    pub fn stats(&self) -> &Arc<UsageConsumerStats> {
        &self.stats
    }

    /// Stops the consumer (messages it had not acknowledged are redelivered after `ack_wait`).
    pub fn stop(self) {}
}

impl Drop for UsageConsumer {
    fn drop(&mut self) {
        self.task.abort();
        self.lag_task.abort();
    }
}

/// Whether a failed ledger write may succeed later unchanged (the database is unreachable,
/// restarting, overloaded), as opposed to an event the database refuses.
fn refused_by_database(e: &Error) -> bool {
    match e {
        Error::Store(StoreError::Database(sqlx::Error::Database(d))) => {
            // Class 22: data exception; class 23: integrity constraint violation.
            d.code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
        }
        Error::Store(StoreError::OutOfRange(_)) | Error::InvalidArgument(_) => true,
        _ => false,
    }
}

/// Why an event can never enter the ledger, if so.
fn problem(e: &UsageEvent) -> Option<String> {
    e.ledger_problem()
}

/// Reads the durable consumer's lag from JetStream every `every`, into `stats.lag` and the
/// `flex_usage_consumer_lag` gauge: messages not yet acknowledged, which grows while the
/// database or this process falls behind (the ledger write path itself never waits for it).
async fn poll_lag(
    js: jetstream::Context,
    durable: String,
    every: Duration,
    stats: Arc<UsageConsumerStats>,
) {
    let mut consumer: Option<jetstream::consumer::Consumer<pull::Config>> = None;
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if consumer.is_none() {
            consumer = match js.get_stream(NATS_STREAM).await {
                Ok(stream) => stream.get_consumer(&durable).await.ok(),
                Err(_) => None,
            };
        }
        let Some(c) = consumer.as_mut() else {
            continue;
        };
        match c.info().await {
            Ok(info) => {
                let lag = info
                    .num_pending
                    .saturating_add(u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX));
                stats.lag.store(lag, Ordering::Relaxed);
                crate::metrics::metrics()
                    .usage_consumer_lag
                    .set(i64::try_from(lag).unwrap_or(i64::MAX));
            }
            Err(e) => {
                tracing::debug!(error = %e, "usage consumer: cannot read its lag; looking it up again");
                consumer = None;
            }
        }
    }
}

impl ControlPlane {
    /// Starts the usage consumer on `client` in the background (see the module docs).
    pub fn spawn_usage_consumer(
        self: &Arc<Self>,
        client: async_nats::Client,
        config: UsageConsumerConfig,
    ) -> UsageConsumer {
        let stats = Arc::new(UsageConsumerStats {
            lag: AtomicU64::new(u64::MAX),
            ..Default::default()
        });
        let cp = self.clone();
        let lag_task = tokio::spawn(poll_lag(
            jetstream::new(client.clone()),
            config.durable.clone(),
            config.lag_interval,
            stats.clone(),
        ));
        let task = {
            let stats = stats.clone();
            tokio::spawn(async move { cp.consume_usage(client, config, stats).await })
        };
        UsageConsumer {
            stats,
            task,
            lag_task,
        }
    }

    /// Consumes usage from JetStream into the ledger, forever: creates the stream and the durable
    /// pull consumer when missing, reconnects with backoff after any NATS error.
    pub async fn consume_usage(
        self: &Arc<Self>,
        client: async_nats::Client,
        config: UsageConsumerConfig,
        stats: Arc<UsageConsumerStats>,
    ) {
        let js = jetstream::new(client);
        let mut backoff = Duration::from_millis(100);
        loop {
            let before = stats.batches.load(Ordering::Relaxed);
            let e = self.consume_session(&js, &config, &stats).await;
            stats.errors.fetch_add(1, Ordering::Relaxed);
            if stats.batches.load(Ordering::Relaxed) > before {
                backoff = Duration::from_millis(100);
            }
            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "usage consumer interrupted; reconnecting");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// One session: consumes until NATS reports an error, which it returns.
    async fn consume_session(
        self: &Arc<Self>,
        js: &jetstream::Context,
        config: &UsageConsumerConfig,
        stats: &UsageConsumerStats,
    ) -> String {
        let stream = match js.get_or_create_stream(usage_stream_config()).await {
            Ok(s) => s,
            Err(e) => return format!("cannot find or create stream {NATS_STREAM}: {e}"),
        };
        let consumer = match stream
            .get_or_create_consumer(
                &config.durable,
                pull::Config {
                    durable_name: Some(config.durable.clone()),
                    description: Some("FlexInference control plane: usage into the ledger".into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    max_ack_pending: config.max_ack_pending,
                    ..Default::default()
                },
            )
            .await
        {
            Ok(c) => c,
            Err(e) => return format!("cannot find or create consumer {}: {e}", config.durable),
        };
        let batch_size = config.batch.max(1);
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(batch_size * 2)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => return format!("cannot pull from consumer {}: {e}", config.durable),
        };
        tracing::info!(durable = %config.durable, "usage consumer pulling from {NATS_STREAM}");
        loop {
            let first = match messages.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return format!("pull failed: {e}"),
                None => return "the pull stream ended".into(),
            };
            let mut batch = vec![first];
            let mut error = None;
            let deadline = tokio::time::Instant::now() + config.linger;
            while batch.len() < batch_size {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(Some(Ok(m))) => batch.push(m),
                    Ok(Some(Err(e))) => {
                        error = Some(format!("pull failed: {e}"));
                        break;
                    }
                    Ok(None) => {
                        error = Some("the pull stream ended".into());
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.ingest(batch, stats).await;
            if let Some(e) = error {
                return e;
            }
        }
    }

    /// Records a batch in one transaction (retrying the database until it answers), then acks.
    async fn ingest(&self, batch: Vec<jetstream::Message>, stats: &UsageConsumerStats) {
        stats
            .received
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut messages = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for m in batch {
            let parsed = serde_json::from_slice::<UsageEvent>(&m.payload)
                .map_err(|e| format!("not a usage event: {e}"))
                .and_then(|ev| match problem(&ev) {
                    Some(p) => Err(p),
                    None => Ok(ev),
                });
            match parsed {
                Ok(ev) => {
                    messages.push(m);
                    events.push(ev);
                }
                Err(reason) => self.terminate(&m, &reason, stats).await,
            }
        }
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0u32;
        while !events.is_empty() {
            match self.record_usage(&events).await {
                Ok(inserted) => {
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                    stats.recorded.fetch_add(inserted, Ordering::Relaxed);
                    stats.duplicates.fetch_add(
                        (events.len() as u64).saturating_sub(inserted),
                        Ordering::Relaxed,
                    );
                    break;
                }
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    failures += 1;
                    if refused_by_database(&e) && failures >= 3 {
                        // One of them is refused for good: find it, one event at a time.
                        let (keep_m, keep_e) = self.isolate(messages, events, stats).await;
                        messages = keep_m;
                        events = keep_e;
                        continue;
                    }
                    tracing::warn!(error = %e, events = events.len(), retry_in_ms = backoff.as_millis() as u64, "usage ledger write failed; retrying");
                    // Keep JetStream from redelivering them to someone else meanwhile.
                    for m in &messages {
                        let _ = m.ack_with(AckKind::Progress).await;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        for m in &messages {
            if let Err(e) = m.ack().await {
                // Redelivered later; the ledger's unique request id absorbs it.
                tracing::warn!(error = %e, "usage ack failed after commit; the message will be redelivered and counted once");
            }
        }
    }

    /// Records events one at a time; terminates those the database refuses. Returns the rest
    /// (not yet recorded only if the database became unreachable meanwhile).
    async fn isolate(
        &self,
        messages: Vec<jetstream::Message>,
        events: Vec<UsageEvent>,
        stats: &UsageConsumerStats,
    ) -> (Vec<jetstream::Message>, Vec<UsageEvent>) {
        let mut keep_m = Vec::new();
        let mut keep_e = Vec::new();
        for (m, ev) in messages.into_iter().zip(events) {
            match self.record_usage(std::slice::from_ref(&ev)).await {
                Ok(inserted) => {
                    stats.recorded.fetch_add(inserted, Ordering::Relaxed);
                    stats
                        .duplicates
                        .fetch_add(1 - inserted.min(1), Ordering::Relaxed);
                    if let Err(e) = m.ack().await {
                        tracing::warn!(error = %e, "usage ack failed after commit; the message will be redelivered and counted once");
                    }
                }
                Err(e) if refused_by_database(&e) => {
                    self.terminate(&m, &format!("refused by the ledger: {e}"), stats)
                        .await;
                }
                Err(_) => {
                    keep_m.push(m);
                    keep_e.push(ev);
                }
            }
        }
        (keep_m, keep_e)
    }

    async fn terminate(&self, m: &jetstream::Message, reason: &str, stats: &UsageConsumerStats) {
        let n = stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
        tracing::error!(
            subject = %m.subject,
            stream_sequence = seq,
            malformed_total = n,
            reason,
            "usage message cannot enter the ledger; terminated (it stays in the stream for inspection)"
        );
        if let Err(e) = m.ack_with(AckKind::Term).await {
            tracing::warn!(error = %e, "cannot terminate a malformed usage message; it may come back");
        }
    }
}
