//! The proxy's usage write-ahead log (with a `--state-dir`).
//!
//! Every usage event is appended to a local log and made durable before the request's answer
//! ends ([`UsageWal`]: the request path hands events to a writer thread over a bounded channel;
//! the thread writes whatever has queued up and fsyncs once per group, then tells each waiting
//! response). Delivery (NATS: [`crate::usage::nats::NatsDelivery::run_log`]; gRPC:
//! [`deliver_grpc`]) reads the log in order and moves a persisted position forward only after the
//! other side has acknowledged; on start the proxy replays whatever lies past that position. A
//! proxy killed at any point loses no event whose answer was completed: it may publish some twice
//! (JetStream's `Nats-Msg-Id` window and the ledger's unique request id absorb those).
//!
//! Threads: the writer thread owns the active segment file and writes and fsyncs it without any
//! lock; it takes the index lock only to publish the new durable length (or a new segment). The
//! delivery tasks read the files and persist the position on the log's own I/O thread
//! ([`UsageWal::read_async`], [`UsageWal::advance_async`]), never on a runtime worker; the
//! undelivered byte count is an atomic (`/metrics` and the delivery loops read it lock-free). On a
//! planned stop, [`UsageWal::close`] lets the writer write what is queued and waits for it.
//!
//! On disk ([`Spool`]): segments `usage-wal.<seq>.jsonl` (JSON lines; a new segment once the
//! active one passes [`SEGMENT_BYTES`]; a delivered segment is deleted, and one whose delete
//! failed is retried on every advance) and the position `usage-wal.pos` (`<seq> <offset>`: the
//! first undelivered byte). Undelivered bytes are bounded (`--usage-spool-max-mib`); past the
//! bound new events are dropped, logged and counted (`usage_log_dropped_total` in `/metrics`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flex_shared::usage::UsageEvent;
use tokio::sync::{oneshot, Notify};

use crate::usage::{Durable, DurableStats, UsageSink, QUEUE_CAPACITY};

pub use super::segments::{
    decode_line, encode_line, Position, Spool, SpoolChunk, SpooledEvent, LEGACY_OFFSET_FILE,
    LEGACY_SPOOL_FILE, POSITION_FILE, SEGMENT_BYTES, SEGMENT_PREFIX, SEGMENT_SUFFIX,
};
use super::segments::{lock, Appender, Log};

/// Default bound on undelivered bytes.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Default bound on how long a response's end waits for its event to be durable.
pub const DEFAULT_DURABLE_WAIT: Duration = Duration::from_millis(200);
/// Most events written (and fsynced) in one group.
const MAX_GROUP: usize = 4096;
/// How long an answer that ends after the log was closed (the proxy is stopping) keeps its end:
/// longer than a stop takes, so it never completes without its event.
const CLOSED_HOLD: Duration = Duration::from_secs(60);

// ----- the sink -------------------------------------------------------------------------------

/// Settings of [`UsageWal`].
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// The proxy's `--state-dir`.
    pub dir: PathBuf,
    /// Bound on undelivered bytes (`--usage-spool-max-mib`).
    pub max_bytes: u64,
    /// Bound on how long a response's end waits for its event (`--usage-durable-wait-ms`;
    /// zero: answers do not wait, events are still written).
    pub durable_wait: Duration,
    /// Events waiting for the writer before new ones are dropped.
    pub queue_capacity: usize,
    /// Size at which a new segment starts.
    pub segment_bytes: u64,
}

impl WalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            durable_wait: DEFAULT_DURABLE_WAIT,
            queue_capacity: QUEUE_CAPACITY,
            segment_bytes: SEGMENT_BYTES,
        }
    }
}

/// Counters of the log.
#[derive(Debug, Default)]
pub struct WalStats {
    /// Events written and fsynced.
    pub appended: AtomicU64,
    /// Groups written (one fsync each).
    pub commits: AtomicU64,
    /// Events dropped because the log was at its bound.
    pub dropped_full: AtomicU64,
    /// Events dropped because the writer's queue was full (the disk cannot keep up), or the
    /// log was closed (shutting down).
    pub dropped_queue: AtomicU64,
    /// Failed writes (retried).
    pub write_errors: AtomicU64,
    /// Lines that could not be read back.
    pub corrupt: AtomicU64,
    /// Events delivered (acknowledged by NATS or the control plane) from the log.
    pub delivered: AtomicU64,
    /// Delivery rounds that found undelivered bytes but could read nothing (and backed off).
    pub stalled_reads: AtomicU64,
    /// The bounded wait of responses for durability.
    pub durable: Arc<DurableStats>,
    /// Answers whose upstream started and whose event is not in the log yet (the in-flight
    /// journal's open requests).
    pub inflight: AtomicU64,
    /// Failed writes of the in-flight journal.
    pub inflight_errors: AtomicU64,
    /// Events a peer refused as malformed, moved to [`DEAD_LETTER_FILE`].
    pub dead_letters: AtomicU64,
}

/// The file, beside the usage log, of usage events that can never be delivered (the control
/// plane refused them as malformed, or they exceed what NATS accepts): one JSON line each,
/// `{"reason": …, "event": {…}}`, so an operator can inspect and replay them. Delivery goes on
/// past them instead of retrying one event forever while every later one waits.
pub const DEAD_LETTER_FILE: &str = "usage-dead-letter.jsonl";

type Entry = (UsageEvent, Option<oneshot::Sender<bool>>);

/// What the writer thread receives.
enum Msg {
    /// Boxed: the queue holds up to `queue_capacity` of these.
    Event(Box<Entry>),
    /// Write what is queued, then stop ([`UsageWal::close`]).
    Close,
}

/// Work for the log's I/O thread (delivery's reads and advances).
type IoJob = Box<dyn FnOnce(&Log) + Send>;

struct Shared {
    log: Arc<Log>,
    /// Answers whose upstream started and whose event is not in the log yet.
    journal: Mutex<crate::usage::journal::Journal>,
    /// Woken after every group written, for the delivery task.
    appended: Notify,
    stats: WalStats,
    /// Set by [`UsageWal::close`]: new events are refused.
    closing: AtomicBool,
    /// Events being handed to the writer right now: [`UsageWal::close`] waits for them, so
    /// every event accepted before the close is ahead of [`Msg::Close`] in the queue.
    sending: AtomicUsize,
    /// Waiters of answers that ended after the log was closed: kept (never resolved) so those
    /// answers keep their end until the process exits.
    parked: Mutex<Vec<oneshot::Sender<bool>>>,
}

/// The write-ahead usage sink: see the module docs.
pub struct UsageWal {
    tx: SyncSender<Msg>,
    io: Sender<IoJob>,
    shared: Arc<Shared>,
    durable_wait: Duration,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for UsageWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageWal")
            .field("dir", &self.shared.log.dir)
            .field("durable_wait", &self.durable_wait)
            .finish_non_exhaustive()
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("the usage log's I/O thread is gone")
}

impl UsageWal {
    /// Moves `event` out of delivery for good: appends it with `reason` to
    /// [`DEAD_LETTER_FILE`] (mode 0600, synced), counts it and logs it. The caller then moves
    /// the log's position past it.
    pub fn dead_letter(&self, event: &UsageEvent, reason: &str) {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        self.shared
            .stats
            .dead_letters
            .fetch_add(1, Ordering::Relaxed);
        let path = self.shared.log.dir.join(DEAD_LETTER_FILE);
        let line = serde_json::json!({"reason": reason, "event": event}).to_string() + "\n";
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(line.as_bytes())?;
                f.sync_data()
            });
        match written {
            Ok(()) => tracing::error!(
                request_id = %event.request_id,
                org_id = %event.org_id,
                reason,
                file = %path.display(),
                "usage event refused for good; moved to the dead-letter file, delivery goes on"
            ),
            Err(e) => tracing::error!(
                request_id = %event.request_id,
                org_id = %event.org_id,
                reason,
                error = %e,
                file = %path.display(),
                "usage event refused for good and the dead-letter file cannot be written; delivery goes on"
            ),
        }
    }

    /// Opens the log in `config.dir` and starts its writer thread (which ends once the sink is
    /// dropped or [closed](Self::close)) and its I/O thread for delivery.
    pub fn open(config: WalConfig) -> std::io::Result<Arc<Self>> {
        let spool = Spool::open_with(&config.dir, config.max_bytes, config.segment_bytes)?;
        let Spool { log, mut appender } = spool;
        // Answers the last run was still giving when it stopped: into the log before the journal
        // starts again (a crash in between records them twice, which the ledger absorbs).
        let interrupted = crate::usage::journal::recover(&config.dir)?;
        if !interrupted.is_empty() {
            let written = appender.append(&log, &interrupted)?;
            tracing::warn!(
                interrupted = interrupted.len(),
                written,
                "answers were in flight when the proxy last stopped; recorded as `interrupted` (tokens and cost unknown)"
            );
        }
        let journal = crate::usage::journal::Journal::create(&config.dir)?;
        let shared = Arc::new(Shared {
            journal: Mutex::new(journal),
            log: log.clone(),
            appended: Notify::new(),
            stats: WalStats::default(),
            closing: AtomicBool::new(false),
            sending: AtomicUsize::new(0),
            parked: Mutex::new(Vec::new()),
        });
        let (tx, rx) = sync_channel(config.queue_capacity.max(1));
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("usage-wal".into())
            .spawn(move || writer(rx, appender, writer_shared))?;
        let (io_tx, io_rx) = channel::<IoJob>();
        std::thread::Builder::new()
            .name("usage-wal-io".into())
            .spawn(move || {
                while let Ok(job) = io_rx.recv() {
                    job(&log);
                }
            })?;
        Ok(Arc::new(Self {
            tx,
            io: io_tx,
            shared,
            durable_wait: config.durable_wait,
            writer: Mutex::new(Some(writer)),
        }))
    }

    pub fn stats(&self) -> &WalStats {
        &self.shared.stats
    }

    /// Bytes not yet delivered (lock-free).
    pub fn pending_bytes(&self) -> u64 {
        self.shared.log.pending_bytes()
    }

    /// The first undelivered byte.
    pub fn position(&self) -> Position {
        self.shared.log.position()
    }

    /// Reads up to `max` undelivered events in order, on the calling thread (blocking file I/O:
    /// async code uses [`Self::read_async`]).
    pub fn read(&self, max: usize) -> std::io::Result<SpoolChunk> {
        self.shared.log.read(max)
    }

    /// Marks everything before `to` as delivered (persisted with an fsync; delivered segments
    /// deleted), on the calling thread (async code uses [`Self::advance_async`]).
    pub fn advance(&self, to: Position) -> std::io::Result<()> {
        self.shared.log.advance(to)
    }

    /// Runs `f` on the log's I/O thread.
    async fn on_io<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Log) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.io
            .send(Box::new(move |log: &Log| {
                let _ = tx.send(f(log));
            }))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// [`Self::read`] on the log's I/O thread: no runtime worker waits for the disk.
    pub async fn read_async(&self, max: usize) -> std::io::Result<SpoolChunk> {
        self.on_io(move |log| log.read(max)).await
    }

    /// [`Self::advance`] on the log's I/O thread.
    pub async fn advance_async(&self, to: Position) -> std::io::Result<()> {
        self.on_io(move |log| log.advance(to)).await
    }

    /// Resolves after the writer has written a group (or at once if it has since the last call).
    pub async fn wait_appended(&self) {
        self.shared.appended.notified().await;
    }

    /// Resolves once the log holds undelivered bytes (looking at least once a second).
    pub async fn until_pending(&self) {
        while self.pending_bytes() == 0 {
            tokio::select! {
                () = self.wait_appended() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// A delivery round found undelivered bytes but could read nothing: counts it, warns (the
    /// 1st, 2nd, 4th, … time), and waits for the next append or `stalled`, which then doubles up
    /// to `max`, so delivery waits instead of spinning.
    pub async fn wait_after_stalled_read(&self, stalled: &mut Duration, max: Duration) {
        let n = self
            .shared
            .stats
            .stalled_reads
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if n == 1 || n.is_power_of_two() {
            tracing::warn!(stalled_reads_total = n, position = ?self.position(), pending_bytes = self.pending_bytes(), "the usage log has undelivered bytes but nothing could be read; waiting");
        }
        tokio::select! {
            () = self.wait_appended() => {}
            () = tokio::time::sleep(*stalled) => {}
        }
        *stalled = (*stalled * 2).min(max);
    }

    /// Records a delivered chunk: `delivered` events acknowledged, `corrupt` lines passed over.
    pub fn record_delivered(&self, delivered: usize, corrupt: usize) {
        let s = &self.shared.stats;
        s.delivered.fetch_add(delivered as u64, Ordering::Relaxed);
        s.corrupt.fetch_add(corrupt as u64, Ordering::Relaxed);
    }

    /// For a planned stop (blocking; call it off the runtime): refuses new events, lets the
    /// writer write and fsync every event accepted so far, and waits for it at most `timeout`.
    /// Returns whether they are all on disk. Later events are dropped (counted), and their
    /// answers keep their end until the process exits (even with a zero durable wait): an
    /// answer received whole always has its event in the log.
    pub fn close(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.shared.closing.store(true, Ordering::SeqCst);
        // Events past the closing check are being queued: let them in ahead of the close.
        while self.shared.sending.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        let Some(handle) = lock(&self.writer).take() else {
            return true;
        };
        loop {
            match self.tx.try_send(Msg::Close) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => break,
                Err(TrySendError::Full(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(TrySendError::Full(_)) => {
                    tracing::error!(
                        timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                        "usage log writer did not take its queue in time; queued usage events are lost"
                    );
                    return false;
                }
            }
        }
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                tracing::error!(
                    timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    "usage log writer did not finish in time (a slow or failing disk); queued usage events may be lost"
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        handle.join().is_ok()
    }

    fn closing(&self) -> bool {
        self.shared.closing.load(Ordering::SeqCst)
    }

    /// Hands `event` to the writer; on refusal gives the waiter back.
    fn send(
        &self,
        event: UsageEvent,
        waiter: Option<oneshot::Sender<bool>>,
    ) -> Result<(), Option<oneshot::Sender<bool>>> {
        // Announced before the closing check (both SeqCst): either `close` sees this send and
        // waits for it, or this send sees the close.
        self.shared.sending.fetch_add(1, Ordering::SeqCst);
        let result = self.try_send(event, waiter);
        self.shared.sending.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn try_send(
        &self,
        event: UsageEvent,
        waiter: Option<oneshot::Sender<bool>>,
    ) -> Result<(), Option<oneshot::Sender<bool>>> {
        let stats = &self.shared.stats;
        if self.closing() {
            let n = stats.dropped_queue.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                dropped_total = n,
                request_id = %event.request_id,
                "usage log closed (the proxy is stopping); event dropped"
            );
            return Err(waiter);
        }
        match self.tx.try_send(Msg::Event(Box::new((event, waiter)))) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => {
                let n = stats.dropped_queue.fetch_add(1, Ordering::Relaxed) + 1;
                let Msg::Event(entry) = msg else {
                    return Err(None);
                };
                let (event, waiter) = *entry;
                tracing::error!(
                    dropped_total = n,
                    request_id = %event.request_id,
                    "usage log writer is behind (queue full) or gone; event dropped"
                );
                Err(waiter)
            }
        }
    }
}

impl UsageWal {
    /// The log is closed (the proxy is stopping) and the answer's event was not written: the
    /// answer keeps its end until the process exits, so it is never received whole without
    /// its event.
    fn hold_until_exit(&self) -> Durable {
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.parked).push(tx);
        Durable::pending(rx, CLOSED_HOLD, self.shared.stats.durable.clone())
    }
}

impl UsageSink for UsageWal {
    fn emit(&self, event: UsageEvent) {
        let _ = self.send(event, None);
    }

    fn opened(&self, event: UsageEvent) {
        // In the kernel before the answer's first byte leaves: a kill cannot lose it.
        let mut journal = lock(&self.shared.journal);
        match journal.open(event) {
            Ok(true) => self
                .shared
                .stats
                .inflight
                .store(journal.open_count() as u64, Ordering::Relaxed),
            Ok(false) => journal_error(
                &self.shared.stats,
                &std::io::Error::other(format!(
                    "{} answers are open (events dropped for a full queue stay open until the next start); not recording more",
                    crate::usage::journal::MAX_OPEN
                )),
            ),
            Err(e) => journal_error(&self.shared.stats, &e),
        }
    }

    fn emit_durable(&self, event: UsageEvent) -> Durable {
        let stats = self.shared.stats.durable.clone();
        if self.durable_wait.is_zero() {
            // Waiting switched off: the event is still written, the answer does not wait.
            return match self.send(event, None) {
                Err(_) if self.closing() => self.hold_until_exit(),
                _ => Durable::ready(),
            };
        }
        let (tx, rx) = oneshot::channel();
        match self.send(event, Some(tx)) {
            Ok(()) => Durable::pending(rx, self.durable_wait, stats),
            Err(_) if self.closing() => self.hold_until_exit(),
            Err(_) => {
                stats.not_durable.fetch_add(1, Ordering::Relaxed);
                Durable::ready()
            }
        }
    }

    fn metrics(&self, out: &mut Vec<crate::series::Series>) {
        use crate::series::Series;
        let s = &self.shared.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.extend([
            Series::counter(
                "usage_log_appended",
                "Usage events appended to the usage log (--state-dir)",
                g(&s.appended),
            ),
            Series::counter(
                "usage_log_commits",
                "Group commits (one fsync each) of the usage log",
                g(&s.commits),
            ),
            Series::counter(
                "usage_log_delivered",
                "Usage events of the log that the control plane acknowledged",
                g(&s.delivered),
            ),
            Series::gauge(
                "usage_log_pending_bytes",
                "Bytes of the usage log not yet acknowledged (delivery lag)",
                self.pending_bytes() as f64,
            ),
            Series::counter_by(
                "usage_log_dropped",
                "Usage events dropped: the log at its size bound (full), or the writer's queue full or closed (queue)",
                "reason",
                [
                    ("full".to_string(), g(&s.dropped_full)),
                    ("queue".to_string(), g(&s.dropped_queue)),
                ],
            ),
            Series::counter(
                "usage_log_write_errors",
                "Failed writes of the usage log (retried)",
                g(&s.write_errors),
            ),
            Series::counter(
                "usage_log_corrupt_lines",
                "Lines of the usage log that could not be read back (skipped)",
                g(&s.corrupt),
            ),
            Series::counter(
                "usage_log_stalled_reads",
                "Delivery rounds that found undelivered bytes but could read nothing (and backed off)",
                g(&s.stalled_reads),
            ),
            Series::counter(
                "usage_durable_waits",
                "Answers that waited for their usage event to be durable",
                g(&s.durable.waits),
            ),
            Series::counter(
                "usage_durable_wait_timeouts",
                "Answers released before their usage event was durable (--usage-durable-wait-ms)",
                g(&s.durable.timeouts),
            ),
            Series::counter(
                "usage_not_durable",
                "Answers whose usage event could not be made durable (log full, write error, writer gone)",
                g(&s.durable.not_durable),
            ),
            Series::gauge(
                "usage_inflight_answers",
                "Answers open in the journal (recorded as interrupted if the proxy stops)",
                g(&s.inflight) as f64,
            ),
            Series::counter(
                "usage_inflight_errors",
                "Failed writes of the in-flight journal",
                g(&s.inflight_errors),
            ),
            Series::counter(
                "usage_dead_letters",
                "Usage events that can never be delivered, moved to usage-dead-letter.jsonl in the state dir",
                g(&s.dead_letters),
            ),
        ]);
    }
}

/// The writer thread: takes whatever has queued up (group commit), appends it with one fsync
/// (owning the active file: no lock is held while writing), then tells the waiting responses and
/// the delivery task. A failed write is retried (the responses are released at once; the events
/// stay in hand). After [`Msg::Close`] it writes what is still queued and ends.
fn writer(rx: Receiver<Msg>, mut appender: Appender, shared: Arc<Shared>) {
    let mut group: Vec<Entry> = Vec::new();
    let mut closing = false;
    let mut backoff = Duration::from_millis(50);
    let stats = &shared.stats;
    loop {
        if group.is_empty() {
            let next = if closing {
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => {
                        sync_journal(&shared, true);
                        return;
                    }
                }
            } else {
                match rx.recv_timeout(crate::usage::journal::SYNC_EVERY) {
                    Ok(m) => m,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        sync_journal(&shared, false);
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        sync_journal(&shared, true);
                        return;
                    }
                }
            };
            match next {
                Msg::Event(e) => group.push(*e),
                Msg::Close => {
                    closing = true;
                    continue;
                }
            }
        }
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(Msg::Event(e)) => group.push(*e),
                Ok(Msg::Close) => closing = true,
                Err(_) => break,
            }
        }
        let result = appender.append(&shared.log, group.iter().map(|(e, _)| e));
        match result {
            Ok(written) => {
                stats.appended.fetch_add(written as u64, Ordering::Relaxed);
                stats.commits.fetch_add(1, Ordering::Relaxed);
                let refused = group.len() - written;
                if refused > 0 {
                    stats
                        .dropped_full
                        .fetch_add(refused as u64, Ordering::Relaxed);
                }
                let mut ids = Vec::with_capacity(group.len());
                for (i, (event, waiter)) in group.drain(..).enumerate() {
                    if let Some(w) = waiter {
                        let _ = w.send(i < written);
                    }
                    ids.push(event.request_id);
                }
                shared.appended.notify_one();
                {
                    // In the log (or refused by its bound, and then not to come back either):
                    // one write, after the answers were released.
                    let mut journal = lock(&shared.journal);
                    if let Err(e) = journal.done(ids.iter().map(String::as_str)) {
                        journal_error(stats, &e);
                    }
                    stats
                        .inflight
                        .store(journal.open_count() as u64, Ordering::Relaxed);
                }
                sync_journal(&shared, false);
                backoff = Duration::from_millis(50);
            }
            Err(e) => {
                let n = stats.write_errors.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(error = %e, write_errors_total = n, events = group.len(), retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "cannot write the usage log; retrying (responses no longer wait for it)");
                for (_, waiter) in &mut group {
                    if let Some(w) = waiter.take() {
                        let _ = w.send(false);
                    }
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn journal_error(stats: &WalStats, e: &std::io::Error) {
    let n = stats.inflight_errors.fetch_add(1, Ordering::Relaxed) + 1;
    if n == 1 || n.is_power_of_two() {
        tracing::error!(error = %e, inflight_errors_total = n, "cannot write the in-flight usage journal (an answer cut off by a crash may then have no event)");
    }
}

/// Fsyncs the in-flight journal when due (or `now`), without holding its lock.
fn sync_journal(shared: &Shared, now: bool) {
    let due = lock(&shared.journal).due_for_sync(now);
    if let Some(job) = due {
        if let Err(e) = job.run() {
            lock(&shared.journal).sync_failed();
            journal_error(&shared.stats, &e);
        }
    }
}

// ----- gRPC delivery from the log ---------------------------------------------------------------

/// Sends `events` one per `ReportUsage`: an event refused as malformed (`INVALID_ARGUMENT`) goes
/// to the dead-letter file. False when the control plane became unreachable meanwhile (the
/// chunk is sent again later; the ledger counts each request id once).
async fn deliver_one_by_one(
    client: &mut crate::control_client::ControlClient,
    wal: &UsageWal,
    events: &[&UsageEvent],
) -> bool {
    use flex_shared::proto::control::ReportUsageRequest;
    for e in events {
        let json = match serde_json::to_string(e) {
            Ok(j) => j,
            Err(err) => {
                wal.dead_letter(e, &format!("cannot be serialized: {err}"));
                continue;
            }
        };
        match client
            .report_usage(ReportUsageRequest {
                events_json: vec![json],
            })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                wal.dead_letter(e, &format!("the control plane refused it: {}", s.message()));
            }
            Err(s) => {
                tracing::warn!(error = %s.message(), "usage delivery failed; retrying");
                return false;
            }
        }
    }
    true
}

/// Delivers the log to the control plane's `ReportUsage` in order, moving the position forward
/// after each accepted batch (the ledger deduplicates by request id), retrying with backoff.
/// File reads and position writes run on the log's I/O thread.
pub async fn deliver_grpc(
    wal: Arc<UsageWal>,
    endpoint: tonic::transport::Endpoint,
    token: crate::control_client::ProxyToken,
) {
    use flex_shared::proto::control::ReportUsageRequest;
    const MIN_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let mut client: Option<crate::control_client::ControlClient> = None;
    let mut backoff = MIN_BACKOFF;
    let mut stalled = MIN_BACKOFF;
    loop {
        wal.until_pending().await;
        let chunk = match wal.read_async(500).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the usage log; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if !chunk.moved() {
            wal.wait_after_stalled_read(&mut stalled, MAX_BACKOFF).await;
            continue;
        }
        stalled = MIN_BACKOFF;
        let events_json: Vec<String> = chunk
            .events
            .iter()
            .filter_map(|s| serde_json::to_string(&s.event).ok())
            .collect();
        let delivered = if events_json.is_empty() {
            // Only unreadable lines: nothing to send, move past them.
            true
        } else {
            if client.is_none() {
                client = endpoint
                    .connect()
                    .await
                    .ok()
                    .map(|c| crate::control_client::client(c, &token));
            }
            match client.as_mut() {
                Some(c) => match c.report_usage(ReportUsageRequest { events_json }).await {
                    Ok(_) => true,
                    Err(e) if e.code() == tonic::Code::InvalidArgument => {
                        // The control plane refused the batch as malformed: find the event(s)
                        // it refuses, one at a time, and move them aside.
                        tracing::warn!(error = %e.message(), events = chunk.events.len(), "usage batch refused as malformed; delivering it one event at a time");
                        let events: Vec<&UsageEvent> =
                            chunk.events.iter().map(|s| &s.event).collect();
                        let all = deliver_one_by_one(c, &wal, &events).await;
                        if !all {
                            client = None;
                        }
                        all
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message(), "usage delivery failed; retrying");
                        client = None;
                        false
                    }
                },
                None => false,
            }
        };
        if delivered {
            wal.record_delivered(chunk.events.len(), chunk.skipped);
            match wal.advance_async(chunk.end).await {
                Ok(()) => {
                    backoff = MIN_BACKOFF;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot record the usage log position; retrying");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;
    use crate::usage::segments::tests::{event, ids, line_len};

    fn until(what: &str, mut done: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !done() {
            assert!(t0.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn the_writer_writes_and_fsyncs_without_the_index_lock_and_metrics_never_take_it() {
        let dir = tempfile::tempdir().unwrap();
        let wal = UsageWal::open(WalConfig::new(dir.path())).unwrap();
        let path = wal.shared.log.segment_paths().pop().unwrap();
        let ix = lock(&wal.shared.log.index);
        wal.emit(event(1));
        // The line reaches the file while delivery (here: the test) holds the lock.
        until("the writer wrote under a held index lock", || {
            std::fs::metadata(&path).unwrap().len() == line_len()
        });
        // /metrics and the delivery loops' check do not wait for the lock.
        let (tx, rx) = std::sync::mpsc::channel();
        let w = wal.clone();
        std::thread::spawn(move || {
            let mut m = Vec::new();
            w.metrics(&mut m);
            let _ = tx.send((w.pending_bytes(), crate::series::text(&m)));
        });
        let (pending, metrics) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(pending, 0, "not published while the lock is held");
        assert!(metrics.contains("usage_log_pending_bytes 0"), "{metrics}");
        drop(ix);
        until("published once the lock is free", || {
            wal.pending_bytes() == line_len()
        });
    }

    #[test]
    fn close_writes_everything_queued() {
        let dir = tempfile::tempdir().unwrap();
        let wal = UsageWal::open(WalConfig {
            durable_wait: Duration::ZERO,
            ..WalConfig::new(dir.path())
        })
        .unwrap();
        for i in 0..500 {
            assert!(wal.emit_durable(event(i)).is_ready(), "no waiting");
        }
        assert!(wal.close(Duration::from_secs(10)));
        assert!(wal.close(Duration::from_secs(1)), "closing twice is fine");
        wal.emit(event(500));
        assert_eq!(wal.stats().dropped_queue.load(Ordering::Relaxed), 1);
        drop(wal);
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(
            ids(&s.read(1000).unwrap()),
            (0..500).map(|i| format!("req_{i}")).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn an_answer_ending_after_close_keeps_its_end_until_the_exit() {
        for wait in [Duration::ZERO, Duration::from_millis(20)] {
            let dir = tempfile::tempdir().unwrap();
            let wal = UsageWal::open(WalConfig {
                durable_wait: wait,
                ..WalConfig::new(dir.path())
            })
            .unwrap();
            assert!(wal.close(Duration::from_secs(10)));
            let durable = wal.emit_durable(event(1));
            assert!(!durable.is_ready(), "held even with a zero wait ({wait:?})");
            assert!(
                tokio::time::timeout(Duration::from_millis(200), durable.wait())
                    .await
                    .is_err(),
                "not released by the configured bound ({wait:?})"
            );
            assert_eq!(wal.stats().dropped_queue.load(Ordering::Relaxed), 1);
        }
    }

    #[test]
    fn every_event_accepted_before_close_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let wal = UsageWal::open(WalConfig {
            durable_wait: Duration::ZERO,
            ..WalConfig::new(dir.path())
        })
        .unwrap();
        // Senders racing the close: each event is either written or refused (then held).
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (wal, accepted) = (wal.clone(), accepted.clone());
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let id = t * 10_000 + i;
                        if wal.emit_durable(event(id)).is_ready() {
                            lock(&accepted).push(format!("req_{id}"));
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(5));
        assert!(wal.close(Duration::from_secs(10)));
        for t in threads {
            t.join().unwrap();
        }
        drop(wal);
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        let written: std::collections::HashSet<String> =
            ids(&s.read(100_000).unwrap()).into_iter().collect();
        let accepted = lock(&accepted).clone();
        assert!(!accepted.is_empty());
        for id in &accepted {
            assert!(written.contains(id), "{id} was accepted but not written");
        }
    }

    #[tokio::test]
    async fn events_are_durable_when_the_wait_resolves_and_writes_are_grouped() {
        let dir = tempfile::tempdir().unwrap();
        let wal = UsageWal::open(WalConfig::new(dir.path())).unwrap();
        let mut waits = Vec::new();
        for i in 0..200 {
            waits.push(wal.emit_durable(event(i)));
        }
        wal.emit(event(200));
        for w in waits {
            assert!(w.wait().await, "durable");
        }
        // What is durable is in the files, in order.
        let chunk = wal.read_async(1000).await.unwrap();
        assert!(chunk.events.len() >= 200);
        assert_eq!(
            ids(&chunk)[..200],
            (0..200).map(|i| format!("req_{i}")).collect::<Vec<_>>()[..]
        );
        let commits = wal.stats().commits.load(Ordering::Relaxed);
        assert!(
            commits < 200,
            "group commit: {commits} fsyncs for 201 events"
        );
        for _ in 0..100 {
            if wal.stats().appended.load(Ordering::Relaxed) == 201 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Delivered up to req_49, then a restart: everything after is replayed.
        let first = wal.read(50).unwrap();
        wal.advance_async(first.end).await.unwrap();
        drop(wal);
        let again = UsageWal::open(WalConfig::new(dir.path())).unwrap();
        assert_eq!(again.position(), first.end);
        let rest = again.read(1000).unwrap();
        assert_eq!(
            ids(&rest),
            (50..201).map(|i| format!("req_{i}")).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn answers_in_flight_at_a_stop_come_back_as_interrupted_after_the_complete_ones() {
        let dir = tempfile::tempdir().unwrap();
        let wal = UsageWal::open(WalConfig::new(dir.path())).unwrap();
        // Three answers start; only req_2 completes before the proxy stops.
        for i in 1..=3 {
            wal.opened(event(i));
        }
        assert!(wal.emit_durable(event(2)).wait().await);
        // An error event whose upstream never started is not in the journal.
        assert!(wal.emit_durable(event(9)).wait().await);
        let mut m = Vec::new();
        wal.metrics(&mut m);
        let m = crate::series::text(&m);
        assert!(m.contains("usage_inflight_answers 2"), "{m}");
        // A stop that loses the queue and the writer's memory (what a kill leaves is the files).
        drop(wal);
        let again = UsageWal::open(WalConfig::new(dir.path())).unwrap();
        let chunk = again.read(100).unwrap();
        assert_eq!(ids(&chunk), ["req_2", "req_9", "req_1", "req_3"]);
        let outcomes: Vec<_> = chunk
            .events
            .iter()
            .map(|e| e.event.outcome.as_str())
            .collect();
        assert_eq!(outcomes, ["ok", "ok", "interrupted", "interrupted"]);
        let cut = &chunk.events[2].event;
        assert_eq!(
            (cut.org_id.as_str(), cut.served_tier.as_str()),
            ("org_1", "standard")
        );
        assert_eq!((cut.output_tokens, cut.cost_micros, cut.status), (0, 0, 0));
        // Recorded once: a second restart finds nothing new in flight.
        drop(again);
        let third = UsageWal::open(WalConfig::new(dir.path())).unwrap();
        assert_eq!(third.read(100).unwrap().events.len(), 4);
    }

    #[tokio::test]
    async fn a_full_log_drops_and_does_not_hold_the_response() {
        let dir = tempfile::tempdir().unwrap();
        let wal = UsageWal::open(WalConfig {
            max_bytes: line_len() * 2,
            ..WalConfig::new(dir.path())
        })
        .unwrap();
        let a = wal.emit_durable(event(1));
        let b = wal.emit_durable(event(2));
        let c = wal.emit_durable(event(3));
        assert!(a.wait().await);
        assert!(b.wait().await);
        assert!(!c.wait().await);
        assert_eq!(wal.stats().dropped_full.load(Ordering::Relaxed), 1);
        let mut m = Vec::new();
        wal.metrics(&mut m);
        let m = crate::series::text(&m);
        assert!(
            m.contains("usage_log_dropped_total{reason=\"full\"} 1"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn grpc_delivery_backs_off_when_the_log_has_bytes_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let wal = UsageWal::open(WalConfig::new(dir.path())).unwrap();
        assert!(wal.emit_durable(event(1)).wait().await);
        // The file lost its bytes behind the log's back: counted, but nothing to read.
        let path = wal.shared.log.segment_paths().pop().unwrap();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert!(wal.pending_bytes() > 0);
        let endpoint = tonic::transport::Endpoint::from_static("http://127.0.0.1:1");
        let task = tokio::spawn(deliver_grpc(
            wal.clone(),
            endpoint,
            crate::control_client::ProxyToken::none(),
        ));
        tokio::time::sleep(Duration::from_millis(700)).await;
        task.abort();
        let stalls = wal.stats().stalled_reads.load(Ordering::Relaxed);
        assert!(
            (1..=6).contains(&stalls),
            "{stalls} reads in 700 ms: backoff, not a spin"
        );
    }
}
