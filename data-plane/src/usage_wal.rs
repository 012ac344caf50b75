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

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
/// How long an answer that ends after the log was closed (the proxy is stopping) keeps its end:
/// longer than a stop takes, so it never completes without its event.
const CLOSED_HOLD: Duration = Duration::from_secs(60);

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
    /// Durable length (whole lines only).
    len: u64,
}

/// Events read back from the log ([`Spool::read`]).
#[derive(Debug)]
pub struct SpoolChunk {
    pub events: Vec<SpooledEvent>,
    /// Unreadable lines passed over.
    pub skipped: usize,
    /// The position the read started at.
    pub start: Position,
    /// The position just after the last line read (`start` when nothing could be read).
    pub end: Position,
}

impl SpoolChunk {
    /// Whether the read got past anything (events, unreadable or empty lines).
    pub fn moved(&self) -> bool {
        self.end != self.start
    }
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

/// Reads up to `max` events from `start` on, crossing into later segments of `segments` (the
/// undelivered ones, oldest first). Lines that do not parse are logged and skipped; empty lines
/// (left by a write that failed and could not be cut back) are passed over. Only whole lines of
/// the lengths given are read (a concurrent append is not seen).
fn read_snapshot(segments: &[Segment], start: Position, max: usize) -> std::io::Result<SpoolChunk> {
    let mut chunk = SpoolChunk {
        events: Vec::new(),
        skipped: 0,
        start,
        end: start,
    };
    let mut line = Vec::new();
    for seg in segments {
        if seg.seq < start.seq {
            continue;
        }
        let from = if seg.seq == start.seq {
            start.offset
        } else {
            0
        };
        if from >= seg.len {
            continue;
        }
        let mut f = File::open(&seg.path)?;
        f.seek(SeekFrom::Start(from))?;
        let mut reader = BufReader::new(f.take(seg.len - from));
        let mut at = from;
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
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
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

// ----- the index: what the writer and delivery share ----------------------------------------------

/// The segments and the delivery position. Its lock is only ever held for in-memory updates,
/// never across file I/O.
#[derive(Debug)]
struct Index {
    /// Oldest first; the last one is the active one (appended to). Segments before `pos.seq`
    /// are delivered and only wait for their file to be deleted (retried on every advance).
    segments: VecDeque<Segment>,
    /// The first undelivered byte; `pos.seq` names a segment in `segments`.
    pos: Position,
}

impl Index {
    fn pending(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.seq >= self.pos.seq)
            .map(|s| s.len)
            .sum::<u64>()
            .saturating_sub(self.pos.offset)
    }

    /// The undelivered segments (what a read needs) and the position.
    fn snapshot(&self) -> (Vec<Segment>, Position) {
        (
            self.segments
                .iter()
                .filter(|s| s.seq >= self.pos.seq)
                .cloned()
                .collect(),
            self.pos,
        )
    }

    /// Moves the position forward to `to`, clamped to what exists; the end of a segment that is
    /// not the active one becomes the start of the next. Never moves backwards.
    fn move_to(&mut self, to: Position) {
        let mut to = to;
        let mut i = 0;
        while let Some(s) = self.segments.get(i) {
            if s.seq < to.seq {
                i += 1;
                continue;
            }
            if s.seq > to.seq {
                // `to` names a segment that is gone: this one's start.
                to = Position {
                    seq: s.seq,
                    offset: 0,
                };
            }
            match self.segments.get(i + 1) {
                Some(next) if to.offset >= s.len => {
                    to = Position {
                        seq: next.seq,
                        offset: 0,
                    };
                    i += 1;
                }
                _ => {
                    to.offset = to.offset.min(s.len);
                    break;
                }
            }
        }
        if i >= self.segments.len() {
            // Past every segment: the end of the active one.
            if let Some(last) = self.segments.back() {
                to = Position {
                    seq: last.seq,
                    offset: last.len,
                };
            }
        }
        if to > self.pos {
            self.pos = to;
        }
    }
}

/// The shared side of the log: its index, the undelivered byte count, and delivery's operations
/// (reads and advances; file I/O outside the index lock).
#[derive(Debug)]
struct Log {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    /// Undelivered bytes, kept in step with `index` (read without its lock).
    pending: AtomicU64,
    /// The log refused events for being at its bound (logged once until delivery catches up).
    full: AtomicBool,
    /// One advance at a time (the position file is written outside the index lock).
    advancing: Mutex<()>,
}

impl Log {
    fn pending_bytes(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }

    fn update_pending(&self, ix: &Index) {
        let pending = ix.pending();
        self.pending.store(pending, Ordering::Release);
        if pending < self.max_bytes {
            self.full.store(false, Ordering::Relaxed);
        }
    }

    fn position(&self) -> Position {
        lock(&self.index).pos
    }

    fn segment_paths(&self) -> Vec<PathBuf> {
        lock(&self.index)
            .segments
            .iter()
            .map(|s| s.path.clone())
            .collect()
    }

    /// The writer made the segment `seq` durable up to `len`.
    fn publish(&self, seq: u64, len: u64) {
        let mut ix = lock(&self.index);
        if let Some(s) = ix.segments.iter_mut().rev().find(|s| s.seq == seq) {
            s.len = len;
        }
        self.update_pending(&ix);
    }

    /// The writer started a new active segment.
    fn push_segment(&self, seg: Segment) {
        lock(&self.index).segments.push_back(seg);
    }

    /// Reads up to `max` events from the delivery position, in order (the lock is held only to
    /// see the segments).
    fn read(&self, max: usize) -> std::io::Result<SpoolChunk> {
        let (segments, pos) = lock(&self.index).snapshot();
        read_snapshot(&segments, pos, max)
    }

    /// Marks everything before `to` as delivered: moves the position in memory, persists it,
    /// then deletes every segment before it. A segment is forgotten only once its file is gone,
    /// so a failed delete (or position write) is retried by the next advance.
    fn advance(&self, to: Position) -> std::io::Result<()> {
        let _one = lock(&self.advancing);
        let (pos, delivered) = {
            let mut ix = lock(&self.index);
            ix.move_to(to);
            self.update_pending(&ix);
            let pos = ix.pos;
            let delivered: Vec<(u64, PathBuf)> = ix
                .segments
                .iter()
                .filter(|s| s.seq < pos.seq)
                .map(|s| (s.seq, s.path.clone()))
                .collect();
            (pos, delivered)
        };
        write_position(&self.dir, pos)?;
        let mut deleted = Vec::new();
        for (seq, path) in delivered {
            match std::fs::remove_file(&path) {
                Ok(()) => deleted.push(seq),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => deleted.push(seq),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete a delivered usage log segment; retrying at the next delivery");
                }
            }
        }
        if !deleted.is_empty() {
            lock(&self.index)
                .segments
                .retain(|s| !deleted.contains(&s.seq));
        }
        Ok(())
    }
}

/// The writing side: the active segment, owned by whoever appends (the writer thread).
#[derive(Debug)]
struct Appender {
    dir: PathBuf,
    active: File,
    seq: u64,
    path: PathBuf,
    /// Durable length of the active segment (what the index shows).
    len: u64,
    /// A failed write could not be cut back: the file may hold a partial line past `len`, so
    /// the next write starts on a new line and the length is taken from the file.
    dirty: bool,
    segment_bytes: u64,
}

impl Appender {
    /// Appends `events` in order and fsyncs once, without holding the index lock; publishes the
    /// new length after. Returns how many were written; the rest (from the first that would take
    /// the log past its bound) are refused, with an error log. On a write error the file is cut
    /// back to its last whole line and nothing counts as written.
    fn append<'a>(
        &mut self,
        log: &Log,
        events: impl IntoIterator<Item = &'a UsageEvent>,
    ) -> std::io::Result<usize> {
        let mut buf = Vec::with_capacity(4096);
        if self.dirty {
            // Whatever a failed write left ends here as one unreadable line (skipped by reads).
            buf.push(b'\n');
        }
        let lead = buf.len();
        let mut written = 0;
        let pending = log.pending_bytes();
        for e in events {
            let line = match serde_json::to_vec(e) {
                Ok(l) => l,
                Err(err) => {
                    tracing::error!(request_id = %e.request_id, error = %err, "usage event cannot be serialized; dropped");
                    written += 1;
                    continue;
                }
            };
            let after = pending + (buf.len() - lead) as u64 + line.len() as u64 + 1;
            if after > log.max_bytes {
                if !log.full.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        dir = %log.dir.display(),
                        max_bytes = log.max_bytes,
                        "usage log is full: its events have not been delivered for long; new usage events are DROPPED until delivery catches up (raise --usage-spool-max-mib or fix NATS / the control plane)"
                    );
                }
                break;
            }
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            written += 1;
        }
        if buf.len() == lead {
            return Ok(written);
        }
        let result = self
            .active
            .write_all(&buf)
            .and_then(|()| self.active.sync_data());
        if let Err(e) = result {
            // Cut a partial write off, so a retry does not glue a torn line to the next one.
            if let Err(cut) = self.active.set_len(self.len) {
                tracing::error!(path = %self.path.display(), error = %cut, "cannot cut a failed usage log write back; the next write starts on a new line");
                self.dirty = true;
            }
            return Err(e);
        }
        if self.dirty {
            self.len = self.active.metadata()?.len();
            self.dirty = false;
        } else {
            self.len += buf.len() as u64;
        }
        log.publish(self.seq, self.len);
        if self.len >= self.segment_bytes {
            if let Err(e) = self.rotate(log) {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot start a new usage log segment; appending to the current one");
            }
        }
        Ok(written)
    }

    fn rotate(&mut self, log: &Log) -> std::io::Result<()> {
        let seq = self.seq + 1;
        let path = segment_path(&self.dir, seq);
        let file = open_append(&path)?;
        sync_dir(&self.dir)?;
        log.push_segment(Segment {
            seq,
            path: path.clone(),
            len: 0,
        });
        self.active = file;
        self.seq = seq;
        self.path = path;
        self.len = 0;
        self.dirty = false;
        Ok(())
    }
}

/// The segmented, append-only log of JSON lines with its persisted delivery position, for one
/// thread (the write-ahead sink [`UsageWal`] splits it between its writer thread and delivery).
#[derive(Debug)]
pub struct Spool {
    log: Arc<Log>,
    appender: Appender,
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
        } else if dir.join(LEGACY_SPOOL_FILE).exists() {
            tracing::warn!(
                path = %dir.join(LEGACY_SPOOL_FILE).display(),
                "a usage spool of an earlier version lies next to the usage log and is NOT replayed (it is taken over only when there is no usage log): its undelivered events are missing from the ledger until it is delivered by hand; delete it once it has been"
            );
        }
        let pos = read_position(dir)?;
        let mut segments = VecDeque::new();
        for seq in seqs {
            let path = segment_path(dir, seq);
            if seq < pos.seq {
                // Delivered (a crash, or a failed delete, between saving the position and
                // deleting it): delete it now, or at the next advance.
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot delete a delivered usage log segment; retrying at the next delivery");
                        segments.push_back(Segment { seq, path, len: 0 });
                    }
                }
                continue;
            }
            let len = std::fs::metadata(&path)?.len();
            segments.push_back(Segment { seq, path, len });
        }
        if segments.back().is_none_or(|s| s.seq < pos.seq) {
            // Past anything the position names, so nothing new is ever taken as delivered.
            let seq = pos.seq.saturating_add(1);
            let path = segment_path(dir, seq);
            File::create(&path)?.sync_all()?;
            sync_dir(dir)?;
            segments.push_back(Segment { seq, path, len: 0 });
        }
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
        let appender = Appender {
            dir: dir.to_path_buf(),
            active,
            seq: last.seq,
            path: last.path.clone(),
            len: last.len,
            dirty: false,
            segment_bytes: segment_bytes.max(1),
        };
        let pos = match segments.iter().find(|s| s.seq >= pos.seq) {
            Some(first) if first.seq == pos.seq => Position {
                seq: first.seq,
                offset: pos.offset.min(first.len),
            },
            Some(first) => Position {
                seq: first.seq,
                offset: 0,
            },
            None => return Err(std::io::Error::other("usage log has no segment")),
        };
        let index = Index { segments, pos };
        let pending = index.pending();
        if pending > 0 {
            tracing::info!(
                dir = %dir.display(),
                pending_bytes = pending,
                "usage log holds undelivered events; they are replayed first"
            );
        }
        let log = Arc::new(Log {
            dir: dir.to_path_buf(),
            max_bytes,
            index: Mutex::new(index),
            pending: AtomicU64::new(pending),
            full: AtomicBool::new(false),
            advancing: Mutex::new(()),
        });
        Ok(Self { log, appender })
    }

    pub fn dir(&self) -> &Path {
        &self.log.dir
    }

    /// Paths of the segment files, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.log.segment_paths()
    }

    /// Bytes not yet delivered.
    pub fn pending_bytes(&self) -> u64 {
        self.log.pending_bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    /// The first undelivered byte.
    pub fn position(&self) -> Position {
        self.log.position()
    }

    /// Appends `events` in order and fsyncs once. Returns how many were written; the rest (from
    /// the first that would take the log past its bound) are refused, with an error log. On a
    /// write error the file is cut back to its last whole line and nothing counts as written.
    pub fn append<'a>(
        &mut self,
        events: impl IntoIterator<Item = &'a UsageEvent>,
    ) -> std::io::Result<usize> {
        self.appender.append(&self.log, events)
    }

    /// Reads up to `max` events from the delivery position, in order.
    pub fn read(&self, max: usize) -> std::io::Result<SpoolChunk> {
        self.log.read(max)
    }

    /// Marks everything before `to` as delivered: persists the position, then deletes the
    /// segments it has left behind (a failed delete is retried by the next advance).
    pub fn advance(&mut self, to: Position) -> std::io::Result<()> {
        self.log.advance(to)
    }
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
}

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
    journal: Mutex<crate::usage_inflight::Journal>,
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
    /// Opens the log in `config.dir` and starts its writer thread (which ends once the sink is
    /// dropped or [closed](Self::close)) and its I/O thread for delivery.
    pub fn open(config: WalConfig) -> std::io::Result<Arc<Self>> {
        let spool = Spool::open_with(&config.dir, config.max_bytes, config.segment_bytes)?;
        let Spool { log, mut appender } = spool;
        // Answers the last run was still giving when it stopped: into the log before the journal
        // starts again (a crash in between records them twice, which the ledger absorbs).
        let interrupted = crate::usage_inflight::recover(&config.dir)?;
        if !interrupted.is_empty() {
            let written = appender.append(&log, &interrupted)?;
            tracing::warn!(
                interrupted = interrupted.len(),
                written,
                "answers were in flight when the proxy last stopped; recorded as `interrupted` (tokens and cost unknown)"
            );
        }
        let journal = crate::usage_inflight::Journal::create(&config.dir)?;
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
                    crate::usage_inflight::MAX_OPEN
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
             # TYPE usage_log_stalled_reads_total counter\nusage_log_stalled_reads_total {}\n\
             # TYPE usage_durable_waits_total counter\nusage_durable_waits_total {}\n\
             # TYPE usage_durable_wait_timeouts_total counter\nusage_durable_wait_timeouts_total {}\n\
             # TYPE usage_not_durable_total counter\nusage_not_durable_total {}\n\
             # TYPE usage_inflight_answers gauge\nusage_inflight_answers {}\n\
             # TYPE usage_inflight_errors_total counter\nusage_inflight_errors_total {}\n",
            g(&s.appended),
            g(&s.commits),
            g(&s.delivered),
            self.pending_bytes(),
            g(&s.dropped_full),
            g(&s.dropped_queue),
            g(&s.write_errors),
            g(&s.corrupt),
            g(&s.stalled_reads),
            g(&s.durable.waits),
            g(&s.durable.timeouts),
            g(&s.durable.not_durable),
            g(&s.inflight),
            g(&s.inflight_errors),
        ));
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
                match rx.recv_timeout(crate::usage_inflight::SYNC_EVERY) {
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

/// Delivers the log to the control plane's `ReportUsage` in order, moving the position forward
/// after each accepted batch (the ledger deduplicates by request id), retrying with backoff.
/// File reads and position writes run on the log's I/O thread.
pub async fn deliver_grpc(wal: Arc<UsageWal>, endpoint: tonic::transport::Endpoint) {
    use flex_shared::proto::control::control_service_client::ControlServiceClient;
    use flex_shared::proto::control::ReportUsageRequest;
    const MIN_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let mut client: Option<ControlServiceClient<tonic::transport::Channel>> = None;
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
pub(crate) mod tests {
    use super::*;

    /// A usage event with request id `req_{i}` (shared by the usage modules' tests).
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
            provider_request_id: String::new(),
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

    fn until(what: &str, mut done: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !done() {
            assert!(t0.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(2));
        }
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
    fn a_write_that_could_not_be_cut_back_does_not_glue_to_the_next_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&[event(1)]).unwrap();
        // A write that failed half-way and whose cut failed too: partial bytes past the durable
        // length.
        let path = s.segment_paths().pop().unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"schema_version":1,"request_id":"req_"#)
            .unwrap();
        drop(f);
        s.appender.dirty = true;
        s.append(&[event(2)]).unwrap();
        let all = s.read(100).unwrap();
        assert_eq!(
            ids(&all),
            ["req_1", "req_2"],
            "the retried event is readable"
        );
        assert_eq!(all.skipped, 1, "the partial bytes are one unreadable line");
        // Dirty with nothing left behind: an empty line, passed over without a complaint.
        s.appender.dirty = true;
        s.append(&[event(3)]).unwrap();
        let all = s.read(100).unwrap();
        assert_eq!(ids(&all), ["req_1", "req_2", "req_3"]);
        assert_eq!(all.skipped, 1);
        assert_eq!(
            s.pending_bytes(),
            std::fs::metadata(&path).unwrap().len(),
            "the durable length is the file's"
        );
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&s.read(100).unwrap()), ["req_1", "req_2", "req_3"]);
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
    fn a_legacy_spool_next_to_segments_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&[event(1)]).unwrap();
        drop(s);
        let legacy = dir.path().join(LEGACY_SPOOL_FILE);
        let mut text = serde_json::to_vec(&event(7)).unwrap();
        text.push(b'\n');
        std::fs::write(&legacy, &text).unwrap();
        // Opens (with a warning), replays only the log, and keeps the spool for a human.
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&s.read(10).unwrap()), ["req_1"]);
        assert_eq!(std::fs::read(&legacy).unwrap(), text);
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

    #[test]
    fn a_failed_position_write_keeps_delivered_segments_for_the_next_advance() {
        let dir = tempfile::tempdir().unwrap();
        let seg = line_len() * 3;
        let mut s = Spool::open_with(dir.path(), 1 << 20, seg).unwrap();
        let events: Vec<_> = (0..6).map(event).collect();
        s.append(&events[..3]).unwrap();
        s.append(&events[3..]).unwrap();
        assert_eq!(list_segments(dir.path()).unwrap().len(), 3);
        let all = s.read(10).unwrap();
        // The position cannot be written (a directory in its way).
        let pos_path = dir.path().join(POSITION_FILE);
        std::fs::create_dir(&pos_path).unwrap();
        std::fs::write(pos_path.join("x"), "x").unwrap();
        assert!(s.advance(all.end).is_err());
        assert!(s.is_empty(), "delivered in memory: not sent again");
        assert_eq!(
            list_segments(dir.path()).unwrap().len(),
            3,
            "nothing deleted before the position is on disk"
        );
        std::fs::remove_dir_all(&pos_path).unwrap();
        // The next advance (even to the same place) persists it and deletes what it left.
        s.advance(s.position()).unwrap();
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
        assert_eq!(s.segment_paths().len(), 1);
        drop(s);
        assert!(Spool::open_with(dir.path(), 1 << 20, seg)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_delivered_segment_that_cannot_be_deleted_is_retried_and_does_not_fail_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let seg = line_len() * 3;
        let mut s = Spool::open_with(dir.path(), 1 << 20, seg).unwrap();
        let events: Vec<_> = (0..6).map(event).collect();
        s.append(&events[..3]).unwrap();
        s.append(&events[3..]).unwrap();
        let first = s.read(3).unwrap();
        // The delivered segment cannot be deleted (a directory in its place).
        let seg1 = s.segment_paths()[0].clone();
        std::fs::remove_file(&seg1).unwrap();
        std::fs::create_dir(&seg1).unwrap();
        std::fs::write(seg1.join("x"), "x").unwrap();
        s.advance(first.end).unwrap();
        assert_eq!(ids(&s.read(10).unwrap()), ["req_3", "req_4", "req_5"]);
        assert!(s.segment_paths().contains(&seg1), "kept until deleted");
        drop(s);
        // Start-up does not fail on it either.
        let mut s = Spool::open_with(dir.path(), 1 << 20, seg).unwrap();
        assert_eq!(ids(&s.read(10).unwrap()), ["req_3", "req_4", "req_5"]);
        std::fs::remove_dir_all(&seg1).unwrap();
        std::fs::write(&seg1, "").unwrap();
        s.advance(s.position()).unwrap();
        assert!(!seg1.exists(), "deleted by the next advance");
        assert!(!s.segment_paths().contains(&seg1));
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
            let mut m = String::new();
            w.write_metrics(&mut m);
            let _ = tx.send((w.pending_bytes(), m));
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
        let mut m = String::new();
        wal.write_metrics(&mut m);
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
        let mut m = String::new();
        wal.write_metrics(&mut m);
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
        let task = tokio::spawn(deliver_grpc(wal.clone(), endpoint));
        tokio::time::sleep(Duration::from_millis(700)).await;
        task.abort();
        let stalls = wal.stats().stalled_reads.load(Ordering::Relaxed);
        assert!(
            (1..=6).contains(&stalls),
            "{stalls} reads in 700 ms: backoff, not a spin"
        );
    }
}
