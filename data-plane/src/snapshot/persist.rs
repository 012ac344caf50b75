//! Writing the newest applied snapshot to the state dir, on its own thread.

use std::path::{Path, PathBuf};

use flex_shared::private_fs;
use std::sync::{Arc, Mutex};

use super::Indexed;

pub(super) const STATE_FILE: &str = "snapshot.pb";
/// The control plane's signature of the persisted snapshot (a [`flex_shared::snapshot_sign::Seal`]
/// line), written after it: a crash in between leaves a pair that does not verify, and a proxy
/// with a public key then starts without the file rather than trusting it.
pub(super) const SEAL_FILE: &str = "snapshot.sig";

/// Persists the newest applied snapshot on its own thread, off the request and update paths
/// (at a million keys a write is about 100 MB): the newest version waiting wins, so a burst of
/// updates costs one write, and a proxy that dies before a write completes warm-starts from
/// the previous file and catches up with a delta.
pub(super) struct Persister {
    pending: Mutex<PersistSlot>,
    wake: std::sync::Condvar,
    /// The version last written (0 = none yet).
    pub(super) written: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct PersistSlot {
    next: Option<Arc<Indexed>>,
    closed: bool,
}

impl Persister {
    pub(super) fn start(dir: PathBuf) -> Option<Arc<Self>> {
        let p = Arc::new(Self {
            pending: Mutex::new(PersistSlot::default()),
            wake: std::sync::Condvar::new(),
            written: std::sync::atomic::AtomicU64::new(0),
        });
        let worker = p.clone();
        match std::thread::Builder::new()
            .name("snapshot-persist".into())
            .spawn(move || worker.run(&dir))
        {
            Ok(_) => Some(p),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the snapshot persister; snapshots will not be persisted");
                None
            }
        }
    }

    fn run(&self, dir: &Path) {
        loop {
            let next = {
                let Ok(mut slot) = self.pending.lock() else {
                    return;
                };
                loop {
                    if let Some(next) = slot.next.take() {
                        break next;
                    }
                    if slot.closed {
                        return;
                    }
                    slot = match self.wake.wait(slot) {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                }
            };
            match persist_to(dir, &next.encode(), next.seal.as_ref()) {
                Ok(()) => self
                    .written
                    .store(next.version, std::sync::atomic::Ordering::Release),
                Err(e) => {
                    tracing::warn!(error = %e, version = next.version, "could not persist the snapshot to the state dir")
                }
            }
        }
    }

    pub(super) fn submit(&self, s: Arc<Indexed>) {
        if let Ok(mut slot) = self.pending.lock() {
            slot.next = Some(s);
        }
        self.wake.notify_one();
    }

    pub(super) fn close(&self) {
        if let Ok(mut slot) = self.pending.lock() {
            slot.closed = true;
        }
        self.wake.notify_one();
    }
}

fn persist_to(
    dir: &Path,
    encoded: &[u8],
    seal: Option<&flex_shared::snapshot_sign::Seal>,
) -> std::io::Result<()> {
    private_fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    private_fs::write(&tmp, encoded)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    match seal {
        Some(seal) => {
            let tmp = dir.join(format!("{SEAL_FILE}.tmp"));
            private_fs::write(&tmp, seal.to_line().as_bytes())?;
            std::fs::rename(&tmp, dir.join(SEAL_FILE))
        }
        None => match std::fs::remove_file(dir.join(SEAL_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_persisted_snapshot_and_its_dir_are_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        persist_to(&dir, b"snapshot bytes", None).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(STATE_FILE)), 0o600);
    }
}
