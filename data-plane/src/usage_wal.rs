//! The proxy's usage write-ahead log (with a `--state-dir`).
//!
//! Every usage event is appended to a local log and made durable before the request's answer
//! ends ([`UsageWal`]: the request path hands events to a writer thread over a bounded channel;
//! the thread writes whatever has queued up and fsyncs once per group, then tells each waiting
//! response). Delivery (NATS: [`crate::usage_nats::NatsDelivery::run_log`]; gRPC:
//! [`deliver_grpc`]) reads the log in order and moves a persisted position forward only after the
//! other side has acknowledged; on start the proxy replays whatever lies past that position. A
//! proxy killed at any point loses no event whose answer was completed: it may publish some twice
//! (JetStream's `Nats-Msg-Id` window and the ledger's unique request id absorb those).
//!
//! On disk ([`Spool`]): segments `usage-wal.<seq>.jsonl` (JSON lines; a new segment once the
//! active one passes [`SEGMENT_BYTES`]; a delivered segment is deleted) and the position
//! `usage-wal.pos` (`<seq> <offset>`: the first undelivered byte). Undelivered bytes are bounded
//! (`--usage-spool-max-mib`); past the bound new events are dropped, logged and counted
//! (`usage_log_dropped_total` in `/metrics`).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use flex_shared::usage::UsageEvent;
use tokio::sync::{oneshot, Notify};

use crate::usage::{Durable, DurableStats, UsageSink, QUEUE_CAPACITY};

/// Segment files: `usage-wal.<seq>.jsonl`.
pub const SEGMENT_PREFIX: &str = "usage-wal.";
pub const SEGMENT_SUFFIX: &str = ".jsonl";
/// The delivery position: `<seq> <offset>`.
pub const POSITION_FILE: &str = "usage-wal.pos";
/// The spool of earlier versions (written only while NATS was down); taken over on open.
pub const LEGACY_SPOOL_FILE: &str = "usage-spool.jsonl";
pub const LEGACY_OFFSET_FILE: &str = "usage-spool.offset";
/// A new segment starts once the active one is this large.
pub const SEGMENT_BYTES: u64 = 16 << 20;
/// Default bound on undelivered bytes.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Default bound on how long a response's end waits for its event to be durable.
pub const DEFAULT_DURABLE_WAIT: Duration = Duration::from_millis(200);
/// Most events written (and fsynced) in one group.
const MAX_GROUP: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ----- the files ------------------------------------------------------------------------------

/// A place in the log: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub seq: u64,
    pub offset: u64,
}

#[derive(Debug, Clone)]
struct Segment {
    seq: u64,
    path: PathBuf,
    len: u64,
}

/// The segmented, append-only log of JSON lines with its persisted delivery position.
/// Invariant: `segments` is never empty, the last one is the active one (appended to), and the
/// delivery position lies in the first one (earlier segments are delivered and deleted).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    active: File,
    /// Offset of the first undelivered byte in `segments[0]`.
    offset: u64,
    max_bytes: u64,
    segment_bytes: u64,
    full: bool,
}

/// Events read back from the log ([`Spool::read`]).
#[derive(Debug)]
pub struct SpoolChunk {
    pub events: Vec<SpooledEvent>,
    /// Unreadable lines passed over.
    pub skipped: usize,
    /// The position just after the last line read.
    pub end: Position,
}

/// One event read back from the log, with the position just after its line.
#[derive(Debug)]
pub struct SpooledEvent {
    pub event: UsageEvent,
    pub end: Position,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{seq:020}{SEGMENT_SUFFIX}"))
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?
        .parse()
        .ok()
}

/// Writes `contents` to `path` atomically (temp file, fsync, rename).
fn write_atomic(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The persisted position; an unreadable one means "from the start" (duplicates, never loss).
fn read_position(dir: &Path) -> std::io::Result<Position> {
    match std::fs::read_to_string(dir.join(POSITION_FILE)) {
        Ok(s) => {
            let mut it = s.split_whitespace().map(str::parse::<u64>);
            Ok(match (it.next(), it.next()) {
                (Some(Ok(seq)), Some(Ok(offset))) => Position { seq, offset },
                _ => {
                    tracing::warn!(path = %dir.join(POSITION_FILE).display(), "unreadable usage log position; replaying the log from its start (the ledger drops duplicates)");
                    Position::default()
                }
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Position::default()),
        Err(e) => Err(e),
    }
}

fn write_position(dir: &Path, p: Position) -> std::io::Result<()> {
    write_atomic(&dir.join(POSITION_FILE), &format!("{} {}", p.seq, p.offset))
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

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
}

impl Spool {
    /// Opens (or creates) the log in `dir`. A torn last line (a crash mid-append) is cut off;
    /// the spool of earlier versions, if any, becomes the first segment.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        Self::open_with(dir, max_bytes, SEGMENT_BYTES)
    }

    pub fn open_with(dir: &Path, max_bytes: u64, segment_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut seqs = list_segments(dir)?;
        if seqs.is_empty() {
            take_over_legacy_spool(dir)?;
            seqs = list_segments(dir)?;
        }
        let pos = read_position(dir)?;
        // Segments before the position are delivered (a crash between saving the position and
        // deleting them): delete them now.
        let mut segments = VecDeque::new();
        for seq in seqs {
            let path = segment_path(dir, seq);
            if seq < pos.seq {
                std::fs::remove_file(&path)?;
                continue;
            }
            let len = std::fs::metadata(&path)?.len();
            segments.push_back(Segment { seq, path, len });
        }
        if segments.is_empty() {
            // Past anything the position names, so nothing new is ever taken as delivered.
            let seq = pos.seq.saturating_add(1);
            let path = segment_path(dir, seq);
            File::create(&path)?.sync_all()?;
            sync_dir(dir)?;
            segments.push_back(Segment { seq, path, len: 0 });
        }
        let offset = match segments.front() {
            Some(first) if first.seq == pos.seq => pos.offset.min(first.len),
            _ => 0,
        };
        let Some(last) = segments.back_mut() else {
            return Err(std::io::Error::other("usage log has no segment"));
        };
        let mut active = open_append(&last.path)?;
        let whole = last_newline_end(&mut active, last.len)?;
        if whole != last.len {
            tracing::warn!(
                path = %last.path.display(),
                cut_bytes = last.len - whole,
                "usage log ends in a torn line (a crash mid-append); cutting it off"
            );
            active.set_len(whole)?;
            active.sync_all()?;
            last.len = whole;
        }
        let mut spool = Self {
            dir: dir.to_path_buf(),
            segments,
            active,
            offset,
            max_bytes,
            segment_bytes: segment_bytes.max(1),
            full: false,
        };
        spool.offset = spool.offset.min(spool.segments[0].len);
        if spool.pending_bytes() > 0 {
            tracing::info!(
                dir = %spool.dir.display(),
                pending_bytes = spool.pending_bytes(),
                "usage log holds undelivered events; they are replayed first"
            );
        }
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Paths of the segment files, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }

    /// Bytes not yet delivered.
    pub fn pending_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum::<u64>() - self.offset
    }

    pub fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    /// The first undelivered byte.
    pub fn position(&self) -> Position {
        Position {
            seq: self.segments[0].seq,
            offset: self.offset,
        }
    }

    /// Appends `events` in order and fsyncs once. Returns how many were written; the rest (from
    /// the first that would take the log past its bound) are refused, with an error log. On a
    /// write error the file is cut back to its last whole line and nothing counts as written.
    pub fn append<'a>(
        &mut self,
        events: impl IntoIterator<Item = &'a UsageEvent>,
    ) -> std::io::Result<usize> {
        let mut buf = Vec::with_capacity(4096);
        let mut written = 0;
        let pending = self.pending_bytes();
        for e in events {
            let line = match serde_json::to_vec(e) {
                Ok(l) => l,
                Err(err) => {
                    tracing::error!(request_id = %e.request_id, error = %err, "usage event cannot be serialized; dropped");
                    written += 1;
                    continue;
                }
            };
            let after = pending + buf.len() as u64 + line.len() as u64 + 1;
            if after > self.max_bytes {
                if !self.full {
                    tracing::error!(
                        dir = %self.dir.display(),
                        max_bytes = self.max_bytes,
                        "usage log is full: its events have not been delivered for long; new usage events are DROPPED until delivery catches up (raise --usage-spool-max-mib or fix NATS / the control plane)"
                    );
                }
                self.full = true;
                break;
            }
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            written += 1;
        }
        if buf.is_empty() {
            return Ok(written);
        }
        let Some(last) = self.segments.back_mut() else {
            return Err(std::io::Error::other("usage log has no segment"));
        };
        let result = self
            .active
            .write_all(&buf)
            .and_then(|()| self.active.sync_data());
        if let Err(e) = result {
            // Cut a partial write off, so a retry does not glue a torn line to the next one.
            if let Err(cut) = self.active.set_len(last.len) {
                tracing::error!(path = %last.path.display(), error = %cut, "cannot cut a failed usage log write back");
            }
            return Err(e);
        }
        last.len += buf.len() as u64;
        if last.len >= self.segment_bytes {
            if let Err(e) = self.rotate() {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot start a new usage log segment; appending to the current one");
            }
        }
        Ok(written)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let seq = self.segments.back().map_or(0, |s| s.seq) + 1;
        let path = segment_path(&self.dir, seq);
        let file = open_append(&path)?;
        sync_dir(&self.dir)?;
        self.active = file;
        self.segments.push_back(Segment { seq, path, len: 0 });
        Ok(())
    }

    /// What [`read_snapshot`] needs, taken under the lock (reading happens outside it).
    fn snapshot(&self) -> (Vec<Segment>, u64) {
        (self.segments.iter().cloned().collect(), self.offset)
    }

    /// Reads up to `max` events from the delivery position, in order (see [`read_snapshot`]).
    pub fn read(&self, max: usize) -> std::io::Result<SpoolChunk> {
        let (segments, offset) = self.snapshot();
        read_snapshot(&segments, offset, max)
    }

    /// Moves the in-memory position to `to` (clamped to what exists). Returns the position to
    /// persist and the segments that are now fully delivered (to delete once it is persisted).
    fn move_to(&mut self, to: Position) -> (Position, Vec<PathBuf>) {
        let mut done = Vec::new();
        while self.segments.len() > 1 {
            let first = &self.segments[0];
            let past = first.seq < to.seq || (first.seq == to.seq && to.offset >= first.len);
            if !past {
                break;
            }
            done.push(first.path.clone());
            self.segments.pop_front();
            self.offset = 0;
        }
        if self.segments[0].seq == to.seq {
            self.offset = self.offset.max(to.offset.min(self.segments[0].len));
        }
        if self.pending_bytes() < self.max_bytes {
            self.full = false;
        }
        (self.position(), done)
    }

    /// Marks everything before `to` as delivered: persists the position, then deletes the
    /// segments it has left behind.
    pub fn advance(&mut self, to: Position) -> std::io::Result<()> {
        let (pos, done) = self.move_to(to);
        finish_advance(&self.dir, pos, &done)
    }
}

fn finish_advance(dir: &Path, pos: Position, done: &[PathBuf]) -> std::io::Result<()> {
    write_position(dir, pos)?;
    for path in done {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(segment_seq) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Makes the spool of earlier versions (`usage-spool.jsonl` + its offset) segment 0: the
/// position is written first, so a crash in between only repeats this step.
fn take_over_legacy_spool(dir: &Path) -> std::io::Result<()> {
    let legacy = dir.join(LEGACY_SPOOL_FILE);
    if !legacy.exists() {
        return Ok(());
    }
    let offset_path = dir.join(LEGACY_OFFSET_FILE);
    let offset = match std::fs::read_to_string(&offset_path) {
        Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    write_position(dir, Position { seq: 0, offset })?;
    std::fs::rename(&legacy, segment_path(dir, 0))?;
    match std::fs::remove_file(&offset_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    sync_dir(dir)?;
    tracing::info!(dir = %dir.display(), "took over the usage spool of an earlier version as the usage log");
    Ok(())
}

/// Reads up to `max` events from `offset` in `segments[0]` on, crossing into later segments.
/// Lines that do not parse are logged and skipped. Only whole lines of the lengths given are
/// read (a concurrent append is not seen).
fn read_snapshot(segments: &[Segment], offset: u64, max: usize) -> std::io::Result<SpoolChunk> {
    let mut chunk = SpoolChunk {
        events: Vec::new(),
        skipped: 0,
        end: Position {
            seq: segments.first().map_or(0, |s| s.seq),
            offset,
        },
    };
    let mut line = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        let start = if i == 0 { offset } else { 0 };
        if start >= seg.len {
            continue;
        }
        let mut f = File::open(&seg.path)?;
        f.seek(SeekFrom::Start(start))?;
        let mut reader = BufReader::new(f.take(seg.len - start));
        let mut at = start;
        while chunk.events.len() < max {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            let line_start = at;
            at += n as u64;
            let end = Position {
                seq: seg.seq,
                offset: at,
            };
            chunk.end = end;
            match serde_json::from_slice::<UsageEvent>(&line) {
                Ok(event) => chunk.events.push(SpooledEvent { event, end }),
                Err(e) => {
                    chunk.skipped += 1;
                    tracing::error!(path = %seg.path.display(), at = line_start, error = %e, "unreadable line in the usage log; skipped");
                }
            }
        }
        if chunk.events.len() >= max {
            break;
        }
    }
    Ok(chunk)
}

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
    /// Events dropped because the writer's queue was full (the disk cannot keep up).
    pub dropped_queue: AtomicU64,
    /// Failed writes (retried).
    pub write_errors: AtomicU64,
    /// Lines that could not be read back.
    pub corrupt: AtomicU64,
    /// Events delivered (acknowledged by NATS or the control plane) from the log.
    pub delivered: AtomicU64,
    /// The bounded wait of responses for durability.
    pub durable: Arc<DurableStats>,
}

type Entry = (UsageEvent, Option<oneshot::Sender<bool>>);

struct Shared {
    spool: Mutex<Spool>,
    /// Woken after every group written, for the delivery task.
    appended: Notify,
    stats: WalStats,
}

/// The write-ahead usage sink: see the module docs.
pub struct UsageWal {
    tx: SyncSender<Entry>,
    shared: Arc<Shared>,
    durable_wait: Duration,
}

impl std::fmt::Debug for UsageWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageWal")
            .field("dir", &lock(&self.shared.spool).dir)
            .field("durable_wait", &self.durable_wait)
            .finish_non_exhaustive()
    }
}

impl UsageWal {
    /// Opens the log in `config.dir` and starts its writer thread (which ends once the sink is
    /// dropped).
    pub fn open(config: WalConfig) -> std::io::Result<Arc<Self>> {
        let spool = Spool::open_with(&config.dir, config.max_bytes, config.segment_bytes)?;
        let shared = Arc::new(Shared {
            spool: Mutex::new(spool),
            appended: Notify::new(),
            stats: WalStats::default(),
        });
        let (tx, rx) = sync_channel(config.queue_capacity.max(1));
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("usage-wal".into())
            .spawn(move || writer(rx, writer_shared))?;
        Ok(Arc::new(Self {
            tx,
            shared,
            durable_wait: config.durable_wait,
        }))
    }

    pub fn stats(&self) -> &WalStats {
        &self.shared.stats
    }

    /// Bytes not yet delivered.
    pub fn pending_bytes(&self) -> u64 {
        lock(&self.shared.spool).pending_bytes()
    }

    /// The first undelivered byte.
    pub fn position(&self) -> Position {
        lock(&self.shared.spool).position()
    }

    /// Reads up to `max` undelivered events in order (the lock is held only to see the files).
    pub fn read(&self, max: usize) -> std::io::Result<SpoolChunk> {
        let (segments, offset) = lock(&self.shared.spool).snapshot();
        read_snapshot(&segments, offset, max)
    }

    /// Marks everything before `to` as delivered (persisted; delivered segments deleted).
    pub fn advance(&self, to: Position) -> std::io::Result<()> {
        let (dir, pos, done) = {
            let mut s = lock(&self.shared.spool);
            let (pos, done) = s.move_to(to);
            (s.dir.clone(), pos, done)
        };
        finish_advance(&dir, pos, &done)
    }

    /// Resolves after the writer has written a group (or at once if it has since the last call).
    pub async fn wait_appended(&self) {
        self.shared.appended.notified().await;
    }

    /// Records a delivered chunk: `delivered` events acknowledged, `corrupt` lines passed over.
    pub fn record_delivered(&self, delivered: usize, corrupt: usize) {
        let s = &self.shared.stats;
        s.delivered.fetch_add(delivered as u64, Ordering::Relaxed);
        s.corrupt.fetch_add(corrupt as u64, Ordering::Relaxed);
    }

    fn send(&self, event: UsageEvent, waiter: Option<oneshot::Sender<bool>>) -> bool {
        match self.tx.try_send((event, waiter)) {
            Ok(()) => true,
            Err(TrySendError::Full((event, _)) | TrySendError::Disconnected((event, _))) => {
                let n = self
                    .shared
                    .stats
                    .dropped_queue
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                tracing::error!(
                    dropped_total = n,
                    request_id = %event.request_id,
                    "usage log writer is behind (queue full) or gone; event dropped"
                );
                false
            }
        }
    }
}

impl UsageSink for UsageWal {
    fn emit(&self, event: UsageEvent) {
        self.send(event, None);
    }

    fn emit_durable(&self, event: UsageEvent) -> Durable {
        if self.durable_wait.is_zero() {
            // Waiting switched off: the event is still written, the answer does not wait.
            self.send(event, None);
            return Durable::ready();
        }
        let (tx, rx) = oneshot::channel();
        if !self.send(event, Some(tx)) {
            self.shared
                .stats
                .durable
                .not_durable
                .fetch_add(1, Ordering::Relaxed);
            return Durable::ready();
        }
        Durable::pending(rx, self.durable_wait, self.shared.stats.durable.clone())
    }

    fn write_metrics(&self, out: &mut String) {
        let s = &self.shared.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str(&format!(
            "# TYPE usage_log_appended_total counter\nusage_log_appended_total {}\n\
             # TYPE usage_log_commits_total counter\nusage_log_commits_total {}\n\
             # TYPE usage_log_delivered_total counter\nusage_log_delivered_total {}\n\
             # TYPE usage_log_pending_bytes gauge\nusage_log_pending_bytes {}\n\
             # TYPE usage_log_dropped_total counter\nusage_log_dropped_total{{reason=\"full\"}} {}\nusage_log_dropped_total{{reason=\"queue\"}} {}\n\
             # TYPE usage_log_write_errors_total counter\nusage_log_write_errors_total {}\n\
             # TYPE usage_log_corrupt_lines_total counter\nusage_log_corrupt_lines_total {}\n\
             # TYPE usage_durable_waits_total counter\nusage_durable_waits_total {}\n\
             # TYPE usage_durable_wait_timeouts_total counter\nusage_durable_wait_timeouts_total {}\n\
             # TYPE usage_not_durable_total counter\nusage_not_durable_total {}\n",
            g(&s.appended),
            g(&s.commits),
            g(&s.delivered),
            self.pending_bytes(),
            g(&s.dropped_full),
            g(&s.dropped_queue),
            g(&s.write_errors),
            g(&s.corrupt),
            g(&s.durable.waits),
            g(&s.durable.timeouts),
            g(&s.durable.not_durable),
        ));
    }
}

/// The writer thread: takes whatever has queued up (group commit), appends it with one fsync,
/// then tells the waiting responses and the delivery task. A failed write is retried (the
/// responses are released at once; the events stay in hand).
fn writer(rx: Receiver<Entry>, shared: Arc<Shared>) {
    let mut group: Vec<Entry> = Vec::new();
    let mut backoff = Duration::from_millis(50);
    loop {
        if group.is_empty() {
            match rx.recv() {
                Ok(e) => group.push(e),
                Err(_) => return,
            }
        }
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(e) => group.push(e),
                Err(_) => break,
            }
        }
        let result = lock(&shared.spool).append(group.iter().map(|(e, _)| e));
        let stats = &shared.stats;
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
                for (i, (_, waiter)) in group.drain(..).enumerate() {
                    if let Some(w) = waiter {
                        let _ = w.send(i < written);
                    }
                }
                shared.appended.notify_one();
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

// ----- gRPC delivery from the log ---------------------------------------------------------------

/// Delivers the log to the control plane's `ReportUsage` in order, moving the position forward
/// after each accepted batch (the ledger deduplicates by request id), retrying with backoff.
pub async fn deliver_grpc(wal: Arc<UsageWal>, endpoint: tonic::transport::Endpoint) {
    use flex_shared::proto::control::control_service_client::ControlServiceClient;
    use flex_shared::proto::control::ReportUsageRequest;
    let mut client: Option<ControlServiceClient<tonic::transport::Channel>> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        if wal.pending_bytes() == 0 {
            tokio::select! {
                () = wal.wait_appended() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let chunk = match wal.read(500) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the usage log; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
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
                client = endpoint.connect().await.ok().map(ControlServiceClient::new);
            }
            match client.as_mut() {
                Some(c) => match c.report_usage(ReportUsageRequest { events_json }).await {
                    Ok(_) => true,
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
            match wal.advance(chunk.end) {
                Ok(()) => {
                    wal.record_delivered(chunk.events.len(), chunk.skipped);
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot record the usage log position; retrying");
                }
            }
            continue;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn event(i: usize) -> UsageEvent {
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

    fn ids(chunk: &SpoolChunk) -> Vec<String> {
        chunk
            .events
            .iter()
            .map(|e| e.event.request_id.clone())
            .collect()
    }

    fn line_len() -> u64 {
        serde_json::to_vec(&event(0)).unwrap().len() as u64 + 1
    }

    #[test]
    fn the_log_keeps_order_across_reopen_and_drops_delivered_segments() {
        let dir = tempfile::tempdir().unwrap();
        // Three events per segment.
        let seg = line_len() * 3;
        let mut s = Spool::open_with(dir.path(), 1 << 20, seg).unwrap();
        let events: Vec<_> = (0..10).map(event).collect();
        // A group is written whole; the next one goes to a new segment once this one is full.
        assert_eq!(s.append(&events[..3]).unwrap(), 3);
        assert_eq!(s.append(&events[3..6]).unwrap(), 3);
        assert_eq!(
            s.segment_paths().len(),
            3,
            "two full segments and a new one"
        );
        let chunk = s.read(4).unwrap();
        assert_eq!(ids(&chunk), ["req_0", "req_1", "req_2", "req_3"]);
        s.advance(chunk.events[3].end).unwrap();
        assert_eq!(s.segment_paths().len(), 2, "the first segment is deleted");
        drop(s);
        let mut s = Spool::open_with(dir.path(), 1 << 20, seg).unwrap();
        assert_eq!(s.append(&events[6..]).unwrap(), 4);
        let rest = s.read(100).unwrap();
        assert_eq!(
            ids(&rest),
            (4..10).map(|i| format!("req_{i}")).collect::<Vec<_>>()
        );
        s.advance(rest.end).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.segment_paths().len(), 1);
        drop(s);
        let s = Spool::open_with(dir.path(), 1 << 20, seg).unwrap();
        assert!(s.is_empty(), "delivered events are not replayed");
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&[event(1), event(2)]).unwrap();
        let path = s.segment_paths().pop().unwrap();
        drop(s);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"schema_version":1,"request_id":"req_3""#)
            .unwrap();
        drop(f);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&[event(4)]).unwrap();
        let all = s.read(100).unwrap();
        assert_eq!(all.skipped, 0);
        assert_eq!(ids(&all), ["req_1", "req_2", "req_4"]);
    }

    #[test]
    fn the_log_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), line_len() * 3 + 10).unwrap();
        let events: Vec<_> = (0..5).map(event).collect();
        assert_eq!(s.append(&events).unwrap(), 3);
        let chunk = s.read(2).unwrap().events;
        s.advance(chunk[1].end).unwrap();
        assert_eq!(s.append(&events[3..]).unwrap(), 2);
    }

    #[test]
    fn the_spool_of_earlier_versions_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = Vec::new();
        for i in 0..3 {
            text.extend(serde_json::to_vec(&event(i)).unwrap());
            text.push(b'\n');
        }
        std::fs::write(dir.path().join(LEGACY_SPOOL_FILE), &text).unwrap();
        std::fs::write(dir.path().join(LEGACY_OFFSET_FILE), line_len().to_string()).unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&s.read(10).unwrap()), ["req_1", "req_2"]);
        assert!(!dir.path().join(LEGACY_SPOOL_FILE).exists());
    }

    #[test]
    fn a_lost_position_replays_and_a_stale_one_never_skips_new_events() {
        let dir = tempfile::tempdir().unwrap();
        let seg = line_len() * 2;
        let mut s = Spool::open_with(dir.path(), 1 << 20, seg).unwrap();
        let events: Vec<_> = (0..4).map(event).collect();
        s.append(&events).unwrap();
        let all = s.read(10).unwrap();
        s.advance(all.end).unwrap();
        drop(s);
        // Every segment delivered and deleted: a new one starts past the saved position.
        for p in list_segments(dir.path()).unwrap() {
            std::fs::remove_file(segment_path(dir.path(), p)).unwrap();
        }
        let mut s = Spool::open_with(dir.path(), 1 << 20, seg).unwrap();
        s.append(&[event(9)]).unwrap();
        drop(s);
        let s = Spool::open_with(dir.path(), 1 << 20, seg).unwrap();
        assert_eq!(ids(&s.read(10).unwrap()), ["req_9"]);
        drop(s);
        std::fs::write(dir.path().join(POSITION_FILE), "garbage").unwrap();
        let s = Spool::open_with(dir.path(), 1 << 20, seg).unwrap();
        assert_eq!(ids(&s.read(10).unwrap()), ["req_9"]);
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
        let chunk = wal.read(1000).unwrap();
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
        wal.advance(first.end).unwrap();
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
        let mut m = String::new();
        wal.write_metrics(&mut m);
        assert!(
            m.contains("usage_log_dropped_total{reason=\"full\"} 1"),
            "{m}"
        );
    }
}
