//! The live projection: the state behind a lock, catch-ups that fold new events and publish a
//! version, and the recent change records that answer a reconnecting proxy with a delta.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use flex_shared::proto::control as pb;
use tokio::sync::watch;

use super::{rebuild, Changes, SnapshotContent, State, BATCH, HISTORY, HISTORY_ENTRIES};
use crate::error::Result;
use crate::store::Store;
use crate::timefmt;

/// A published snapshot version: cheap to clone and to hand to every watcher; the protobuf
/// snapshot is built from it only when a proxy needs a full one, and then once.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub content_hash: String,
    content: SnapshotContent,
    full: OnceLock<Arc<pb::Snapshot>>,
    full_sha256: OnceLock<[u8; 32]>,
}

impl Published {
    fn new(state: &State) -> Self {
        Self {
            version: state.last_seq,
            content_hash: state.content.hash.to_hex(),
            content: state.content.clone(),
            full: OnceLock::new(),
            full_sha256: OnceLock::new(),
        }
    }

    /// The full snapshot (built on first use; `produced_at` is that time).
    pub fn full(&self) -> Arc<pb::Snapshot> {
        self.full
            .get_or_init(|| {
                Arc::new(
                    self.content
                        .to_proto(self.version, timefmt::format(timefmt::now())),
                )
            })
            .clone()
    }

    /// SHA-256 of the encoding of [`Published::full`] (what a signature of the full covers),
    /// computed once.
    pub fn full_body_sha256(&self) -> [u8; 32] {
        *self
            .full_sha256
            .get_or_init(|| flex_shared::snapshot_sign::snapshot_body_sha256(&self.full()))
    }

    pub fn content(&self) -> &SnapshotContent {
        &self.content
    }
}

/// What one catch-up changed: from version `from` to `to`.
#[derive(Debug)]
struct ChangeRecord {
    from: u64,
    to: u64,
    changes: Changes,
}

/// The live projection: state, the published snapshot and the recent change records.
pub struct Projection {
    store: Store,
    state: RwLock<Arc<State>>,
    /// Serializes catch-ups so no event is folded twice.
    catch_up: tokio::sync::Mutex<()>,
    tx: watch::Sender<Arc<Published>>,
    history: Mutex<VecDeque<Arc<ChangeRecord>>>,
}

impl Projection {
    /// Rebuilds from the log and publishes the first snapshot.
    pub async fn open(store: Store) -> Result<Self> {
        let state = rebuild(&store).await?;
        let (tx, _rx) = watch::channel(Arc::new(Published::new(&state)));
        Ok(Self {
            store,
            state: RwLock::new(Arc::new(state)),
            catch_up: tokio::sync::Mutex::new(()),
            tx,
            history: Mutex::new(VecDeque::new()),
        })
    }

    pub fn state(&self) -> Arc<State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn published(&self) -> Arc<Published> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.tx.subscribe()
    }

    /// The delta from `from_version` to `to`, when the change records still cover that span.
    pub fn delta(&self, from_version: u64, to: &Published) -> Option<pb::SnapshotDelta> {
        if from_version == to.version {
            return Some(Changes::default().to_delta(from_version, &to.content_hash));
        }
        let h = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = h.iter().position(|r| r.from == from_version)?;
        let mut merged = Changes::recording();
        let mut at = from_version;
        for r in h.iter().skip(start) {
            if r.from != at {
                return None;
            }
            merged.merge(&r.changes);
            at = r.to;
            if at == to.version {
                return Some(merged.to_delta(from_version, &to.content_hash));
            }
        }
        None
    }

    /// Folds every event appended since the last catch-up and publishes a new snapshot if any.
    pub async fn catch_up(&self) -> Result<()> {
        let _serial = self.catch_up.lock().await;
        let current = self.state();
        let mut batch = self.store.read_after(current.last_seq, BATCH).await?;
        if batch.is_empty() {
            return Ok(());
        }
        let mut next = State::clone(&current);
        drop(current);
        let from = next.last_seq;
        let mut changes = Changes::recording();
        while !batch.is_empty() {
            for e in &batch {
                next.apply_recording(e, &mut changes);
            }
            batch = self.store.read_after(next.last_seq, BATCH).await?;
        }
        let published = Arc::new(Published::new(&next));
        *self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        {
            let mut h = self
                .history
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            h.push_back(Arc::new(ChangeRecord {
                from,
                to: published.version,
                changes,
            }));
            let mut entries: usize = h.iter().map(|r| r.changes.len()).sum();
            while h.len() > HISTORY || (entries > HISTORY_ENTRIES && h.len() > 1) {
                if let Some(r) = h.pop_front() {
                    entries -= r.changes.len();
                }
            }
        }
        tracing::debug!(version = published.version, "published snapshot");
        self.tx.send_replace(published);
        Ok(())
    }
}
