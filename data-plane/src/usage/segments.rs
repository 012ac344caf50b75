//! The on-disk side of the usage log ([`crate::usage::log`]): segment files of JSON lines, the
//! persisted delivery position, the index the writer thread and delivery share, and [`Spool`],
//! the log for one thread.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use flex_shared::private_fs;
use flex_shared::usage::UsageEvent;

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

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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

/// One event as a line of the log: its JSON and a newline, appended to `buf`.
pub fn encode_line(event: &UsageEvent, buf: &mut Vec<u8>) -> serde_json::Result<()> {
    serde_json::to_writer(&mut *buf, event)?;
    buf.push(b'\n');
    Ok(())
}

/// One line of the log read back (with or without its newline): `None` for a blank line (left
/// by a write that failed and could not be cut back), else the event or why it is unreadable.
/// The inverse of [`encode_line`]; public for the fuzz and property tests of the log's reading.
pub fn decode_line(line: &[u8]) -> Option<serde_json::Result<UsageEvent>> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(serde_json::from_slice::<UsageEvent>(line))
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
    let mut f = private_fs::create(&tmp)?;
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
    private_fs::options()
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
            match decode_line(&line) {
                None => continue,
                Some(Ok(event)) => chunk.events.push(SpooledEvent { event, end }),
                Some(Err(e)) => {
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
pub(super) struct Index {
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
pub(super) struct Log {
    pub(super) dir: PathBuf,
    max_bytes: u64,
    pub(super) index: Mutex<Index>,
    /// Undelivered bytes, kept in step with `index` (read without its lock).
    pending: AtomicU64,
    /// The log refused events for being at its bound (logged once until delivery catches up).
    full: AtomicBool,
    /// One advance at a time (the position file is written outside the index lock).
    advancing: Mutex<()>,
}

impl Log {
    pub(super) fn pending_bytes(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }

    fn update_pending(&self, ix: &Index) {
        let pending = ix.pending();
        self.pending.store(pending, Ordering::Release);
        if pending < self.max_bytes {
            self.full.store(false, Ordering::Relaxed);
        }
    }

    pub(super) fn position(&self) -> Position {
        lock(&self.index).pos
    }

    pub(super) fn segment_paths(&self) -> Vec<PathBuf> {
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
    pub(super) fn read(&self, max: usize) -> std::io::Result<SpoolChunk> {
        let (segments, pos) = lock(&self.index).snapshot();
        read_snapshot(&segments, pos, max)
    }

    /// Marks everything before `to` as delivered: moves the position in memory, persists it,
    /// then deletes every segment before it. A segment is forgotten only once its file is gone,
    /// so a failed delete (or position write) is retried by the next advance.
    pub(super) fn advance(&self, to: Position) -> std::io::Result<()> {
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
pub(super) struct Appender {
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
    pub(super) fn append<'a>(
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
        let mut line = Vec::with_capacity(512);
        for e in events {
            line.clear();
            if let Err(err) = encode_line(e, &mut line) {
                tracing::error!(request_id = %e.request_id, error = %err, "usage event cannot be serialized; dropped");
                written += 1;
                continue;
            }
            let after = pending + (buf.len() - lead) as u64 + line.len() as u64;
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
/// thread (the write-ahead sink [`UsageWal`](super::log::UsageWal) splits it between its writer
/// thread and delivery).
#[derive(Debug)]
pub struct Spool {
    pub(super) log: Arc<Log>,
    pub(super) appender: Appender,
}

impl Spool {
    /// Opens (or creates) the log in `dir`. A torn last line (a crash mid-append) is cut off;
    /// the spool of earlier versions, if any, becomes the first segment.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        Self::open_with(dir, max_bytes, SEGMENT_BYTES)
    }

    pub fn open_with(dir: &Path, max_bytes: u64, segment_bytes: u64) -> std::io::Result<Self> {
        private_fs::create_dir_all(dir)?;
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
            private_fs::create(&path)?.sync_all()?;
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

    pub(crate) fn ids(chunk: &SpoolChunk) -> Vec<String> {
        chunk
            .events
            .iter()
            .map(|e| e.event.request_id.clone())
            .collect()
    }

    pub(crate) fn line_len() -> u64 {
        serde_json::to_vec(&event(0)).unwrap().len() as u64 + 1
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_event() -> impl Strategy<Value = UsageEvent> {
            let text = || any::<String>();
            (
                (any::<u32>(), text(), text(), text(), text(), text()),
                (text(), text(), any::<u64>(), any::<u64>(), any::<u64>()),
                (any::<u64>(), any::<u64>(), any::<u16>(), text()),
                (
                    proptest::collection::vec(text(), 0..3),
                    any::<i64>(),
                    any::<i64>(),
                    text(),
                ),
            )
                .prop_map(|(a, b, c, d)| UsageEvent {
                    schema_version: a.0,
                    request_id: a.1,
                    org_id: a.2,
                    key_id: a.3,
                    model: a.4,
                    provider: a.5,
                    caller_format: b.0,
                    start_within: b.1,
                    flex_wait_ms: b.2,
                    start_latency_ms: b.3,
                    duration_ms: b.4,
                    input_tokens: c.0,
                    output_tokens: c.1,
                    status: c.2,
                    outcome: c.3,
                    tiers_started: d.0,
                    cost_micros: d.1,
                    standard_cost_micros: d.2,
                    provider_request_id: d.3,
                    ..event(0)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Any event is one line (the newline only at its end) that reads back as itself.
            #[test]
            fn a_line_round_trips(e in any_event()) {
                let mut line = Vec::new();
                encode_line(&e, &mut line).unwrap();
                prop_assert_eq!(line.iter().position(|b| *b == b'\n'), Some(line.len() - 1));
                prop_assert_eq!(decode_line(&line).map(Result::ok), Some(Some(e)));
            }

            /// Any bytes: blank, an event, or an error; never a panic.
            #[test]
            fn any_line_decodes_or_is_refused(
                bytes in prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..64),
                    any::<String>().prop_map(|s| format!("{{\"request_id\":{s:?}}}").into_bytes()),
                ],
            ) {
                let _ = decode_line(&bytes);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]

            /// A segment of any lines and a position file of any text: delivery reads every
            /// event that decodes, in order, and ends with nothing pending.
            #[test]
            fn delivery_reads_any_log_to_its_end(
                lines in proptest::collection::vec(
                    prop_oneof![
                        (0usize..50).prop_map(|i| serde_json::to_vec(&event(i)).unwrap()),
                        proptest::collection::vec(any::<u8>(), 0..20),
                    ],
                    0..12,
                ),
                position in proptest::option::of(any::<String>()),
            ) {
                let dir = tempfile::tempdir().unwrap();
                let mut text = lines.join(&b'\n');
                text.push(b'\n');
                std::fs::write(segment_path(dir.path(), 0), &text).unwrap();
                if let Some(p) = &position {
                    std::fs::write(dir.path().join(POSITION_FILE), p).unwrap();
                }
                let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
                let from_start = s.position() == Position::default();
                let mut read = Vec::new();
                for _ in 0..=lines.len() + 1 {
                    let chunk = s.read(3).unwrap();
                    if !chunk.moved() {
                        break;
                    }
                    read.extend(chunk.events.into_iter().map(|e| e.event));
                    s.advance(chunk.end).unwrap();
                }
                prop_assert_eq!(s.pending_bytes(), 0);
                if from_start {
                    let want: Vec<UsageEvent> = text
                        .split(|b| *b == b'\n')
                        .filter_map(|l| decode_line(l).and_then(Result::ok))
                        .collect();
                    prop_assert_eq!(read, want);
                }
            }
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
    fn the_state_dir_and_the_log_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        let seg = line_len() * 2;
        let mut s = Spool::open_with(&dir, 1 << 20, seg).unwrap();
        s.append(&(0..5).map(event).collect::<Vec<_>>()).unwrap();
        let chunk = s.read(1).unwrap();
        s.advance(chunk.end).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert!(files.len() >= 3, "segments and the position: {files:?}");
        for f in files {
            assert_eq!(mode(&f.path()), 0o600, "{}", f.path().display());
        }
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&[event(1), event(2)]).unwrap();
        let path = s.segment_paths().pop().unwrap();
        drop(s);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
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
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
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
}
