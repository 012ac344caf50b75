//! Usage delivery over NATS JetStream, with a local spool for when NATS is unreachable.
//!
//! Events wait in a [`UsageQueue`] (the request path only ever pushes, never waits). The delivery
//! task ([`NatsDelivery::run`]) publishes them to the stream [`NATS_STREAM`] on
//! `flex.usage.<org_id>` with the request id as `Nats-Msg-Id`, and removes them from the queue
//! only once JetStream has acknowledged them (a duplicate ack counts: the stream has the event).
//! When NATS is down or acks time out, events are appended to a spool file in the state dir
//! (JSON lines, fsynced per batch, bounded) and from then on every new event goes to the spool
//! too, so that order is kept; when NATS is back the spool is replayed from the start, and its
//! acknowledged prefix is cut off (a persisted offset, the file truncated once fully replayed).
//!
//! Every step removes an event from where it waits only after it is safe elsewhere, without an
//! `.await` in between: a delivery task aborted at any point and started again (on the same
//! queue and spool) may publish an event twice, never lose one. JetStream drops the repeat inside
//! its duplicate window, and the control plane's ledger (unique request id) in any case.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use flex_shared::usage::{
    nats_subject, UsageEvent, NATS_DUPLICATE_WINDOW_SECS, NATS_MAX_AGE_SECS, NATS_STREAM,
    NATS_SUBJECTS,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::usage::{UsageSink, QUEUE_CAPACITY};

/// The spool file inside the state dir.
pub const SPOOL_FILE: &str = "usage-spool.jsonl";
/// The replayed (acknowledged) prefix of the spool file, in bytes.
pub const SPOOL_OFFSET_FILE: &str = "usage-spool.offset";
/// Default bound on undelivered bytes in the spool.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;

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
                    "usage queue full (NATS unreachable and no spool, or the spool is full); event dropped"
                );
                return;
            }
            q.push_back(event);
        }
        self.notify.notify_one();
    }
}

// ----- the spool ------------------------------------------------------------------------------

/// An append-only file of JSON lines with a persisted replay offset.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    offset_path: PathBuf,
    file: File,
    len: u64,
    offset: u64,
    max_bytes: u64,
    full: bool,
}

/// Events read back from the spool ([`Spool::read`]).
#[derive(Debug)]
pub struct SpoolChunk {
    pub events: Vec<SpooledEvent>,
    /// Unreadable lines passed over.
    pub skipped: usize,
    /// The offset just after the last line read.
    pub end: u64,
}

/// One event read back from the spool, with the file offset just after its line.
#[derive(Debug)]
pub struct SpooledEvent {
    pub event: UsageEvent,
    pub end: u64,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. A torn last line (a crash mid-append) is cut off.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(SPOOL_FILE);
        let offset_path = dir.join(SPOOL_OFFSET_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let mut len = file.metadata()?.len();
        let whole = last_newline_end(&mut file, len)?;
        if whole != len {
            tracing::warn!(
                path = %path.display(),
                cut_bytes = len - whole,
                "usage spool ends in a torn line (a crash mid-append); cutting it off"
            );
            file.set_len(whole)?;
            file.sync_all()?;
            len = whole;
        }
        let offset = match std::fs::read_to_string(&offset_path) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        }
        .min(len);
        let spool = Self {
            path,
            offset_path,
            file,
            len,
            offset,
            max_bytes,
            full: false,
        };
        if spool.pending_bytes() > 0 {
            tracing::info!(
                path = %spool.path.display(),
                pending_bytes = spool.pending_bytes(),
                "usage spool holds undelivered events; they are replayed once NATS answers"
            );
        }
        Ok(spool)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes not yet acknowledged by JetStream.
    pub fn pending_bytes(&self) -> u64 {
        self.len - self.offset
    }

    pub fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    /// Appends `events` in order and fsyncs once. Returns how many were written; the rest (from
    /// the first that would take the spool past its bound) are refused, with an error log.
    pub fn append(&mut self, events: &[UsageEvent]) -> std::io::Result<usize> {
        let mut buf = Vec::with_capacity(events.len() * 512);
        let mut written = 0;
        for e in events {
            let line = match serde_json::to_vec(e) {
                Ok(l) => l,
                Err(err) => {
                    tracing::error!(request_id = %e.request_id, error = %err, "usage event cannot be serialized; dropped");
                    written += 1;
                    continue;
                }
            };
            let after = self.pending_bytes() + buf.len() as u64 + line.len() as u64 + 1;
            if after > self.max_bytes {
                if !self.full {
                    tracing::error!(
                        path = %self.path.display(),
                        max_bytes = self.max_bytes,
                        "usage spool is full: NATS has been unreachable for long; new usage events are DROPPED until it answers again (raise the bound or fix NATS)"
                    );
                }
                self.full = true;
                break;
            }
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            written += 1;
        }
        if !buf.is_empty() {
            self.file.write_all(&buf)?;
            self.file.sync_data()?;
            self.len += buf.len() as u64;
        }
        Ok(written)
    }

    /// Reads up to `max` events from the replay offset, in order. Lines that do not parse are
    /// logged and skipped. Returns the events, how many lines were skipped, and the offset just
    /// after the last line read (to advance to once every event returned is acknowledged).
    pub fn read(&self, max: usize) -> std::io::Result<SpoolChunk> {
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::new(f.take(self.len - self.offset));
        let mut chunk = SpoolChunk {
            events: Vec::new(),
            skipped: 0,
            end: self.offset,
        };
        let mut line = Vec::new();
        while chunk.events.len() < max {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            let start = chunk.end;
            chunk.end += n as u64;
            match serde_json::from_slice::<UsageEvent>(&line) {
                Ok(event) => chunk.events.push(SpooledEvent {
                    event,
                    end: chunk.end,
                }),
                Err(e) => {
                    chunk.skipped += 1;
                    tracing::error!(path = %self.path.display(), at = start, error = %e, "unreadable line in the usage spool; skipped");
                }
            }
        }
        Ok(chunk)
    }

    fn persist_offset(&self, offset: u64) -> std::io::Result<()> {
        let tmp = self.offset_path.with_extension("offset.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(offset.to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.offset_path)
    }

    /// Marks everything before `to` as acknowledged; truncates the file once all of it is.
    pub fn advance(&mut self, to: u64) -> std::io::Result<()> {
        let to = to.clamp(self.offset, self.len);
        if to == self.len {
            // Truncate first: a crash before the offset is rewritten leaves offset > len, which
            // `open` clamps to the (empty) end.
            self.file.set_len(0)?;
            self.file.sync_all()?;
            self.len = 0;
            self.offset = 0;
            self.full = false;
            self.persist_offset(0)
        } else {
            self.persist_offset(to)?;
            self.offset = to;
            if self.pending_bytes() < self.max_bytes {
                self.full = false;
            }
            Ok(())
        }
    }
}

/// The length of `file` up to and including its last newline.
fn last_newline_end(file: &mut File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = usize::try_from(end - start).unwrap_or(buf.len());
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

// ----- delivery -------------------------------------------------------------------------------

/// Settings of [`NatsDelivery`].
#[derive(Debug, Clone)]
pub struct NatsDeliveryConfig {
    /// Where the spool lives (`--state-dir`). Without one, undelivered events wait in the
    /// in-memory queue (bounded; a restart loses them).
    pub spool_dir: Option<PathBuf>,
    /// Bound on undelivered bytes in the spool.
    pub spool_max_bytes: u64,
    /// How long to wait for JetStream to acknowledge a publish.
    pub ack_timeout: Duration,
    /// Events published (or replayed) per round, acks awaited together.
    pub batch: usize,
}

impl Default for NatsDeliveryConfig {
    fn default() -> Self {
        Self {
            spool_dir: None,
            spool_max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            ack_timeout: Duration::from_secs(5),
            batch: 500,
        }
    }
}

/// Counters of a delivery task (shared, so they survive a restarted task).
#[derive(Debug, Default)]
pub struct NatsDeliveryStats {
    /// Events acknowledged by JetStream (straight from the queue or replayed).
    pub published: AtomicU64,
    /// Acknowledged events JetStream reported as duplicates (already in the stream).
    pub duplicates: AtomicU64,
    /// Events written to the spool.
    pub spooled: AtomicU64,
    /// Events replayed from the spool and acknowledged.
    pub replayed: AtomicU64,
    /// Events dropped because the spool was full.
    pub spool_dropped: AtomicU64,
    /// Spool lines that could not be read back.
    pub spool_corrupt: AtomicU64,
}

/// Publishes usage events to JetStream, spooling when it cannot.
pub struct NatsDelivery {
    client: async_nats::Client,
    js: jetstream::Context,
    spool: Option<Spool>,
    config: NatsDeliveryConfig,
    stats: Arc<NatsDeliveryStats>,
    stream_ready: bool,
}

impl std::fmt::Debug for NatsDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsDelivery")
            .field("spool", &self.spool)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why a publish round stopped: how many events from the start were acknowledged, and the error.
struct PublishFailure {
    acked: usize,
    error: String,
}

impl NatsDelivery {
    /// Opens the spool (if configured). `client` may still be connecting (connect with
    /// `retry_on_initial_connect` so the proxy starts while NATS is down).
    pub fn new(client: async_nats::Client, config: NatsDeliveryConfig) -> std::io::Result<Self> {
        Self::with_stats(client, config, Arc::default())
    }

    pub fn with_stats(
        client: async_nats::Client,
        config: NatsDeliveryConfig,
        stats: Arc<NatsDeliveryStats>,
    ) -> std::io::Result<Self> {
        let spool = match &config.spool_dir {
            Some(dir) => Some(Spool::open(dir, config.spool_max_bytes)?),
            None => None,
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .build(client.clone());
        Ok(Self {
            client,
            js,
            spool,
            config,
            stats,
            stream_ready: false,
        })
    }

    pub fn stats(&self) -> Arc<NatsDeliveryStats> {
        self.stats.clone()
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn spooling(&self) -> bool {
        self.spool.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// Moves everything queued into the spool (in order), removing it from the queue only once
    /// it is written and fsynced. Events the full spool refuses are dropped (counted).
    fn spool_queue(&mut self, queue: &UsageQueue) {
        let Some(spool) = self.spool.as_mut() else {
            return;
        };
        loop {
            let batch = queue.peek(self.config.batch.max(1) * 4);
            if batch.is_empty() {
                return;
            }
            match spool.append(&batch) {
                Ok(written) => {
                    self.stats
                        .spooled
                        .fetch_add(written as u64, Ordering::Relaxed);
                    let refused = batch.len() - written;
                    if refused > 0 {
                        self.stats
                            .spool_dropped
                            .fetch_add(refused as u64, Ordering::Relaxed);
                    }
                    queue.remove(batch.len());
                }
                Err(e) => {
                    // Keep them queued (bounded); try the spool again at the next round.
                    tracing::error!(path = %spool.path().display(), error = %e, "cannot write the usage spool; events stay queued in memory");
                    return;
                }
            }
        }
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

    /// Publishes `events` in order (pipelined) and awaits every ack.
    async fn publish(&mut self, events: &[&UsageEvent]) -> Result<(), PublishFailure> {
        self.ensure_stream()
            .await
            .map_err(|error| PublishFailure { acked: 0, error })?;
        let mut pending: Vec<PublishAckFuture> = Vec::with_capacity(events.len());
        let mut send_error = None;
        for e in events {
            let payload = match serde_json::to_vec(e) {
                Ok(p) => p,
                Err(err) => {
                    send_error = Some(format!("cannot serialize usage event: {err}"));
                    break;
                }
            };
            let msg = PublishMessage::build()
                .payload(payload.into())
                .message_id(&e.request_id)
                .expected_stream(NATS_STREAM);
            match self.js.send_publish(nats_subject(&e.org_id), msg).await {
                Ok(ack) => pending.push(ack),
                Err(err) => {
                    send_error = Some(format!("publish failed: {err}"));
                    break;
                }
            }
        }
        let mut acked = 0;
        let mut ack_error = None;
        for ack in pending {
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

    /// Publishes the next chunk of the spool; advances the offset over what was acknowledged.
    async fn replay_chunk(&mut self) -> Result<(), String> {
        let Some(spool) = self.spool.as_ref() else {
            return Ok(());
        };
        let chunk = spool
            .read(self.config.batch.max(1))
            .map_err(|e| format!("cannot read the usage spool: {e}"))?;
        let events: Vec<&UsageEvent> = chunk.events.iter().map(|s| &s.event).collect();
        let result = self.publish(&events).await;
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
        if let (Some(spool), Some(to)) = (self.spool.as_mut(), to) {
            spool
                .advance(to)
                .map_err(|e| format!("cannot record the usage spool offset: {e}"))?;
            if result.is_ok() {
                self.stats
                    .spool_corrupt
                    .fetch_add(chunk.skipped as u64, Ordering::Relaxed);
            }
            self.stats
                .replayed
                .fetch_add(acked as u64, Ordering::Relaxed);
            if spool.is_empty() {
                tracing::info!("usage spool fully replayed to NATS");
            }
        }
        result.map_err(|f| f.error)
    }

    /// Delivers forever. Abort the task to stop it; nothing acknowledged is lost and nothing
    /// unacknowledged is removed, so a new task on the same queue and spool carries on.
    pub async fn run(mut self, queue: Arc<UsageQueue>) {
        let mut backoff = MIN_BACKOFF;
        let mut next_attempt = Instant::now();
        let mut failing = false;
        loop {
            let spooling = self.spooling();
            if spooling {
                self.spool_queue(&queue);
            }
            let ready = Instant::now() >= next_attempt && self.connected();
            if ready && (spooling || !queue.is_empty()) {
                let result = if spooling {
                    self.replay_chunk().await
                } else {
                    let batch = queue.peek(self.config.batch.max(1));
                    let refs: Vec<&UsageEvent> = batch.iter().collect();
                    match self.publish(&refs).await {
                        Ok(()) => {
                            queue.remove(batch.len());
                            Ok(())
                        }
                        Err(f) => {
                            queue.remove(f.acked);
                            Err(f.error)
                        }
                    }
                };
                match result {
                    Ok(()) => {
                        if failing {
                            tracing::info!("usage delivery to NATS recovered");
                            failing = false;
                        }
                        backoff = MIN_BACKOFF;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, spool = self.spool.is_some(), "usage delivery to NATS failed; spooling and retrying");
                        failing = true;
                        next_attempt = Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        self.spool_queue(&queue);
                    }
                }
                continue;
            }
            if !ready && self.spool.is_some() && !queue.is_empty() {
                // NATS is unreachable: keep events safe on disk, in order.
                if !failing {
                    tracing::warn!("NATS unreachable; spooling usage events");
                    failing = true;
                }
                self.spool_queue(&queue);
                continue;
            }
            if ready {
                // Nothing to send: wait for an event (the connection may drop meanwhile, which
                // the next round sees).
                tokio::select! {
                    () = queue.wait_nonempty() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            } else {
                let wake = next_attempt.max(Instant::now() + POLL);
                if self.spool.is_some() {
                    tokio::select! {
                        () = queue.wait_nonempty() => {}
                        () = tokio::time::sleep_until(wake) => {}
                    }
                } else {
                    tokio::time::sleep_until(wake).await;
                }
            }
        }
    }
}

/// Starts delivering `queue` over NATS in the background (see [`NatsDelivery`]).
pub fn spawn_nats_delivery(
    queue: Arc<UsageQueue>,
    client: async_nats::Client,
    config: NatsDeliveryConfig,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let delivery = NatsDelivery::new(client, config)?;
    Ok(tokio::spawn(delivery.run(queue)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: usize) -> UsageEvent {
        UsageEvent {
            schema_version: 1,
            request_id: format!("req_{i}"),
            org_id: "org_1".into(),
            key_id: "key_1".into(),
            model: "gpt-5.5".into(),
            provider: "openai".into(),
            caller_format: "responses".into(),
            start_within: "default".into(),
            served_tier: "standard".into(),
            reason: "direct".into(),
            flex_wait_ms: 0,
            start_latency_ms: 1,
            duration_ms: 2,
            input_tokens: 3,
            cached_input_tokens: 0,
            output_tokens: 4,
            reasoning_tokens: 0,
            status: 200,
            outcome: "ok".into(),
            tiers_started: vec!["standard".into()],
            cost_micros: 5,
            standard_cost_micros: 5,
            received_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn spool_keeps_order_across_reopen_and_truncates_when_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let events: Vec<_> = (0..10).map(event).collect();
        assert_eq!(s.append(&events[..6]).unwrap(), 6);
        let chunk = s.read(4).unwrap().events;
        assert_eq!(chunk.len(), 4);
        s.advance(chunk[3].end).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.append(&events[6..]).unwrap(), 4);
        let rest = s.read(100).unwrap().events;
        let ids: Vec<_> = rest.iter().map(|e| e.event.request_id.clone()).collect();
        assert_eq!(ids, (4..10).map(|i| format!("req_{i}")).collect::<Vec<_>>());
        s.advance(rest.last().unwrap().end).unwrap();
        assert!(s.is_empty());
        assert_eq!(std::fs::metadata(s.path()).unwrap().len(), 0);
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&[event(1), event(2)]).unwrap();
        drop(s);
        let path = dir.path().join(SPOOL_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"schema_version":1,"request_id":"req_3""#)
            .unwrap();
        drop(f);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&[event(4)]).unwrap();
        let all = s.read(100).unwrap();
        assert_eq!(all.skipped, 0);
        let ids: Vec<_> = all
            .events
            .iter()
            .map(|e| e.event.request_id.as_str())
            .collect();
        assert_eq!(ids, ["req_1", "req_2", "req_4"]);
    }

    #[test]
    fn the_spool_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&event(0)).unwrap().len() as u64 + 1;
        let mut s = Spool::open(dir.path(), one * 3 + 10).unwrap();
        let events: Vec<_> = (0..5).map(event).collect();
        assert_eq!(s.append(&events).unwrap(), 3);
        let chunk = s.read(2).unwrap().events;
        s.advance(chunk[1].end).unwrap();
        assert_eq!(s.append(&events[3..]).unwrap(), 2);
    }

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
