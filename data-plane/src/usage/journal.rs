//! The journal of answers in flight, beside the usage log in `--state-dir`.
//!
//! A usage event is complete only when its answer ends, so a proxy killed while answers are
//! streaming (SIGKILL, OOM, a crash) would leave no trace of them, though the provider had
//! started, and billed, each one. The journal closes that gap: when an upstream starts answering
//! (a tier has won), the request's event as known then (ids, model, provider, served tier, start
//! latency; no tokens yet) is written to `usage-inflight.jsonl`; once its complete event is in
//! the usage log, a `done` line follows. On the next start, every request opened but not done is
//! appended to the usage log as an event with outcome `interrupted` (tokens and cost unknown,
//! so 0; status 0: the proxy could not tell what reached the caller), and the journal starts
//! empty. The ledger then holds a row for every answer a provider started.
//!
//! The open line is written by the request itself, before its answer's first byte leaves the
//! proxy (one `write` to the kernel, no fsync: a killed process loses nothing the kernel has);
//! the done line by the usage log's writer thread after the group holding the event is fsynced.
//! The journal is fsynced at most every [`SYNC_EVERY`], off its lock (a machine crash, not a
//! killed process, can lose the opens of that last interval). It holds at most [`MAX_OPEN`]
//! requests. A request id may be recorded twice (a crash between writing the interrupted
//! events and emptying the journal, or a done line lost with the machine): the ledger keeps the
//! first event of a request id, and the complete event always comes first in the log.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flex_shared::private_fs;
use flex_shared::usage::UsageEvent;
use serde::{Deserialize, Serialize};

/// The journal file in the state dir.
pub const INFLIGHT_FILE: &str = "usage-inflight.jsonl";
/// The outcome of an event recorded for an answer the proxy stopped in the middle of.
pub const OUTCOME_INTERRUPTED: &str = "interrupted";
/// Longest time between fsyncs of the journal while it is written to.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);
/// The journal is rewritten with only the open requests once it is this large and mostly done
/// lines.
const COMPACT_BYTES: u64 = 4 << 20;
/// Most requests the journal holds open. Past it (events dropped for a full queue leave their
/// requests open until the next start) new ones are not recorded, and counted as errors.
pub const MAX_OPEN: usize = 100_000;

/// A journal line, as read back.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Open { event: Box<UsageEvent> },
    Done { request_id: String },
}

/// A journal line, as written (borrowing what it writes; the same encoding as [`Line`]).
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum LineRef<'a> {
    Open { event: &'a UsageEvent },
    Done { request_id: &'a str },
}

/// Appends `line` and its newline to `buf`.
fn encode(buf: &mut Vec<u8>, line: &LineRef<'_>) -> std::io::Result<()> {
    serde_json::to_writer(&mut *buf, line).map_err(std::io::Error::other)?;
    buf.push(b'\n');
    Ok(())
}

/// The event recorded for `opened` when its answer never completed.
pub fn interrupted(mut opened: UsageEvent) -> UsageEvent {
    opened.outcome = OUTCOME_INTERRUPTED.to_string();
    opened.status = 0;
    opened.duration_ms = 0;
    opened.input_tokens = 0;
    opened.cached_input_tokens = 0;
    opened.output_tokens = 0;
    opened.reasoning_tokens = 0;
    opened.cost_micros = 0;
    opened.standard_cost_micros = 0;
    opened
}

/// Reads the journal in `dir` (none: nothing) and returns the interrupted events of the requests
/// opened and not done, in the order they were opened. Unreadable lines (a torn last line) are
/// skipped.
pub fn recover(dir: &Path) -> std::io::Result<Vec<UsageEvent>> {
    let file = match File::open(dir.join(INFLIGHT_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut order: Vec<String> = Vec::new();
    let mut open: HashMap<String, UsageEvent> = HashMap::new();
    let mut skipped = 0usize;
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Line>(&line) {
            Ok(Line::Open { event }) => {
                let id = event.request_id.clone();
                if open.insert(id.clone(), *event).is_none() {
                    order.push(id);
                }
            }
            Ok(Line::Done { request_id }) => {
                open.remove(&request_id);
            }
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "the in-flight usage journal has unreadable lines (a torn write); skipped"
        );
    }
    Ok(order
        .into_iter()
        .filter_map(|id| open.remove(&id))
        .map(interrupted)
        .collect())
}

/// The open journal (shared by the requests and the usage log's writer thread under a lock;
/// every call is one small `write`, never an fsync).
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Requests opened and not done, with their open line's event.
    open: HashMap<String, UsageEvent>,
    bytes: u64,
    /// Written since the last fsync was handed out.
    dirty: bool,
    /// A write failed part-way: the next one starts on a new line, so the fragment stays one
    /// unreadable line (skipped by [`recover`]) instead of spoiling the line after it.
    torn: bool,
    /// Compacted (renamed) since the last fsync: the directory needs one too.
    renamed: bool,
    last_sync: Instant,
}

/// An fsync the journal's lock holder hands out, to run without the lock ([`Journal::due_for_sync`]).
#[derive(Debug)]
pub struct SyncJob {
    file: std::io::Result<File>,
    dir: Option<PathBuf>,
}

impl SyncJob {
    pub fn run(self) -> std::io::Result<()> {
        self.file?.sync_data()?;
        if let Some(dir) = self.dir {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Journal {
    /// Starts an empty journal in `dir` (call after [`recover`]'s events are in the usage log).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(INFLIGHT_FILE);
        let file = create_synced(&path)?;
        Ok(Self {
            path,
            file,
            open: HashMap::new(),
            bytes: 0,
            dirty: false,
            torn: false,
            renamed: false,
            last_sync: Instant::now(),
        })
    }

    /// Requests opened and not done.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Records that `event`'s upstream started answering. `Ok(false)`: not recorded, the journal
    /// holds [`MAX_OPEN`] requests already.
    pub fn open(&mut self, event: UsageEvent) -> std::io::Result<bool> {
        if self.open.len() >= MAX_OPEN {
            return Ok(false);
        }
        let mut buf = Vec::new();
        encode(&mut buf, &LineRef::Open { event: &event })?;
        self.write(&buf)?;
        self.open.insert(event.request_id.clone(), event);
        Ok(true)
    }

    /// Records that these requests' complete events are in the usage log, in one write (ids
    /// never opened are skipped: answers that failed before any tier started).
    pub fn done<'a>(
        &mut self,
        request_ids: impl IntoIterator<Item = &'a str>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for id in request_ids {
            if self.open.remove(id).is_some() {
                encode(&mut buf, &LineRef::Done { request_id: id })?;
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.write(&buf)?;
        if self.bytes >= COMPACT_BYTES && (self.open.len() as u64) * 1024 < self.bytes / 4 {
            self.compact()?;
        }
        Ok(())
    }

    /// When what was written is due for an fsync (at most every [`SYNC_EVERY`], unless `now`):
    /// the fsync to run without holding the journal's lock. If it fails, call
    /// [`Journal::sync_failed`].
    pub fn due_for_sync(&mut self, now: bool) -> Option<SyncJob> {
        if self.dirty && (now || self.last_sync.elapsed() >= SYNC_EVERY) {
            self.dirty = false;
            self.last_sync = Instant::now();
            let dir = std::mem::take(&mut self.renamed)
                .then(|| self.path.parent().map(Path::to_path_buf))
                .flatten();
            return Some(SyncJob {
                file: self.file.try_clone(),
                dir,
            });
        }
        None
    }

    /// The fsync handed out failed: the next one is due again.
    pub fn sync_failed(&mut self) {
        self.dirty = true;
        self.renamed = true;
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.torn {
            self.file.write_all(b"\n")?;
            self.torn = false;
        }
        // One write per call: a process killed mid-way leaves at most a torn last line.
        self.dirty = true;
        if let Err(e) = self.file.write_all(buf) {
            self.torn = true;
            return Err(e);
        }
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Rewrites the journal with only the open requests (temp file, rename). Its fsyncs are left
    /// to the next [`Journal::due_for_sync`], made due at once: the lock is never held over one.
    fn compact(&mut self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut file = private_fs::create(&tmp)?;
        let mut buf = Vec::new();
        for event in self.open.values() {
            encode(&mut buf, &LineRef::Open { event })?;
        }
        file.write_all(&buf)?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = file;
        self.bytes = buf.len() as u64;
        self.torn = false;
        self.dirty = true;
        self.renamed = true;
        self.last_sync = Instant::now() - SYNC_EVERY;
        Ok(())
    }
}

/// Creates (truncating) `path` for appending, durably empty.
fn create_synced(path: &Path) -> std::io::Result<File> {
    let file = private_fs::create(path)?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn event(id: &str) -> UsageEvent {
        UsageEvent {
            request_id: id.to_string(),
            org_id: "org_1".into(),
            served_tier: "flex".into(),
            input_tokens: 7,
            output_tokens: 9,
            cost_micros: 5,
            standard_cost_micros: 10,
            status: 200,
            outcome: "ok".into(),
            ..UsageEvent::default()
        }
    }

    #[test]
    fn the_journal_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path()).unwrap();
        j.open(event("a")).unwrap();
        j.compact().unwrap();
        let m = std::fs::metadata(dir.path().join(INFLIGHT_FILE)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn opened_and_not_done_come_back_as_interrupted_in_open_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path()).unwrap();
        for id in ["a", "b", "c", "d"] {
            j.open(event(id)).unwrap();
        }
        j.done(["b"]).unwrap();
        j.done(["never-opened"]).unwrap();
        j.done(["d"]).unwrap();
        assert_eq!(j.open_count(), 2);
        drop(j); // a kill: no sync, nothing else
        let back = recover(dir.path()).unwrap();
        let ids: Vec<_> = back.iter().map(|e| e.request_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        let a = &back[0];
        assert_eq!(a.outcome, OUTCOME_INTERRUPTED);
        assert_eq!((a.status, a.input_tokens, a.output_tokens), (0, 0, 0));
        assert_eq!((a.cost_micros, a.standard_cost_micros), (0, 0));
        assert_eq!(
            (a.org_id.as_str(), a.served_tier.as_str()),
            ("org_1", "flex")
        );
        // A new journal starts empty.
        Journal::create(dir.path()).unwrap();
        assert!(recover(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_a_missing_journal_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(recover(dir.path()).unwrap().is_empty());
        let mut j = Journal::create(dir.path()).unwrap();
        j.open(event("a")).unwrap();
        drop(j);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(INFLIGHT_FILE))
            .unwrap();
        f.write_all(br#"{"op":"done","request_id":"#).unwrap();
        let back = recover(dir.path()).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].request_id, "a");
    }

    #[test]
    fn compaction_keeps_only_the_open_requests() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path()).unwrap();
        j.open(event("stays")).unwrap();
        let mut i = 0u64;
        let mut largest = 0;
        loop {
            let id = format!("r{i}");
            j.open(event(&id)).unwrap();
            j.done([id.as_str()]).unwrap();
            i += 1;
            if j.bytes < largest {
                break; // the done that crossed the size compacted it
            }
            largest = j.bytes;
            assert!(largest < 2 * COMPACT_BYTES, "never compacted");
        }
        // `largest` is the size before the last open and done (a few hundred bytes).
        assert!(
            largest + 4096 >= COMPACT_BYTES,
            "compacted at {largest} bytes"
        );
        assert!(j.bytes < 4096, "{} bytes after compaction", j.bytes);
        j.open(event("later")).unwrap();
        drop(j);
        let ids: Vec<_> = recover(dir.path())
            .unwrap()
            .into_iter()
            .map(|e| e.request_id)
            .collect();
        assert_eq!(ids, ["stays", "later"]);
    }
}
