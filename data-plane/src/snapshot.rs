//! The proxy's view of the control plane: one immutable, indexed snapshot swapped atomically.
//!
//! Invariants: a snapshot is validated (content hash, structure) before it is applied, and a bad
//! update leaves the last good snapshot in place; readers never see a half-applied update; the
//! last good snapshot is persisted to the state dir so a restarted proxy serves while the control
//! plane is down. Request handling never touches a database.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use flex_shared::catalog::{Catalog, Model, Provider};
use flex_shared::crypto::{MasterKeyring, Sealed};
use flex_shared::proto::control::{self as pb, snapshot_update::Kind};
use flex_shared::snapshot::{self as rules, nats};
use prost::Message;
use secrecy::SecretString;

use crate::error::ProxyError;

mod key_table;
pub use key_table::KeyTable;

#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub key_id: String,
    pub org_id: String,
    /// Unix seconds; 0 = never.
    pub expires_at: i64,
}

#[derive(Debug, Clone)]
pub struct OrgEntry {
    pub org_id: String,
    pub active: bool,
    pub past_due: bool,
}

/// A provider key as the proxy holds it: decrypted once at apply time, or why it could not be.
#[derive(Clone)]
pub enum ProviderSecret {
    Ready(SecretString),
    Unusable(String),
}

/// An applied snapshot, indexed for the request path.
pub struct Indexed {
    pub version: u64,
    pub content_hash: String,
    /// The API keys, compact (see [`KeyTable`]).
    pub keys: KeyTable,
    pub orgs: HashMap<String, OrgEntry>,
    pub provider_keys: HashMap<(String, Provider), ProviderSecret>,
    /// Limits by (org_id, key_id; empty = the org's own).
    pub limits: HashMap<(String, String), pb::LimitEntry>,
    pub catalog: Catalog,
    /// The snapshot without its API keys (those are in `keys`), canonical.
    pub rest: pb::Snapshot,
    pub applied_at: Instant,
}

impl Indexed {
    /// Indexes `rest` (a canonical snapshot whose API keys were moved into `keys`).
    /// Provider keys whose ciphertext is unchanged since `prev` keep their decrypted secret, so
    /// an update costs no decryption for them.
    fn build(
        rest: pb::Snapshot,
        keys: KeyTable,
        keyring: Option<&MasterKeyring>,
        prev: Option<&Indexed>,
    ) -> Result<Self, ProxyError> {
        let orgs = rest
            .orgs
            .iter()
            .map(|o| {
                (
                    o.org_id.clone(),
                    OrgEntry {
                        org_id: o.org_id.clone(),
                        active: o.active,
                        past_due: o.billing_status == "past_due",
                    },
                )
            })
            .collect();
        let mut provider_keys = HashMap::new();
        let unchanged: HashMap<(&str, &str), &pb::ProviderKeyEntry> = prev
            .map(|p| {
                p.rest
                    .provider_keys
                    .iter()
                    .map(|e| ((e.org_id.as_str(), e.provider.as_str()), e))
                    .collect()
            })
            .unwrap_or_default();
        for p in &rest.provider_keys {
            let Some(provider) = Provider::parse(&p.provider) else {
                continue;
            };
            let id = (p.org_id.clone(), provider);
            let reused = unchanged
                .get(&(p.org_id.as_str(), p.provider.as_str()))
                .filter(|old| old.sealed == p.sealed)
                .and_then(|_| prev?.provider_keys.get(&id))
                .filter(|s| matches!(s, ProviderSecret::Ready(_)));
            if let Some(secret) = reused {
                provider_keys.insert(id, secret.clone());
                continue;
            }
            let secret = match (&p.sealed, keyring) {
                (None, _) => ProviderSecret::Unusable("the snapshot carries no ciphertext".into()),
                (Some(_), None) => ProviderSecret::Unusable(
                    "this proxy has no master key file (--master-key-file) to decrypt provider keys".into(),
                ),
                (Some(s), Some(ring)) => match ring.open(&p.org_id, &p.provider, &Sealed::from(s.clone())) {
                    Ok(secret) => ProviderSecret::Ready(secret),
                    Err(e) => ProviderSecret::Unusable(e.to_string()),
                },
            };
            provider_keys.insert(id, secret);
        }
        let mut overrides = Vec::new();
        for m in &rest.models {
            overrides.push(Model::from_proto(m).map_err(ProxyError::Snapshot)?);
        }
        let limits = rest
            .limits
            .iter()
            .map(|l| ((l.org_id.clone(), l.key_id.clone()), l.clone()))
            .collect();
        Ok(Self {
            version: rest.version,
            content_hash: rest.content_hash.clone(),
            keys,
            orgs,
            provider_keys,
            limits,
            catalog: Catalog::with_overrides(&overrides),
            rest,
            applied_at: Instant::now(),
        })
    }

    /// The whole snapshot as the control plane sent it (API keys included).
    pub fn to_proto(&self) -> pb::Snapshot {
        pb::Snapshot {
            api_keys: self.keys.to_proto(),
            ..self.rest.clone()
        }
    }

    /// The protobuf encoding of [`Indexed::to_proto`], without building it.
    fn encode(&self) -> Vec<u8> {
        let r = &self.rest;
        let mut buf = Vec::with_capacity(self.keys.len() * 150 + 4096);
        let head = pb::Snapshot {
            version: r.version,
            content_hash: r.content_hash.clone(),
            orgs: r.orgs.clone(),
            ..Default::default()
        };
        head.encode(&mut buf).unwrap_or_default();
        self.keys.encode_into(&mut buf);
        let tail = pb::Snapshot {
            provider_keys: r.provider_keys.clone(),
            models: r.models.clone(),
            limits: r.limits.clone(),
            produced_at: r.produced_at.clone(),
            ..Default::default()
        };
        tail.encode(&mut buf).unwrap_or_default();
        buf
    }
}

/// The bytes of the `full` field of an encoded `SnapshotUpdate`, if it is a full one.
fn full_snapshot_bytes(mut b: &[u8]) -> Option<&[u8]> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    let mut full = None;
    while !b.is_empty() {
        let (tag, wire) = decode_key(&mut b).ok()?;
        if tag == 2 && wire == WireType::LengthDelimited {
            let len = usize::try_from(decode_varint(&mut b).ok()?).ok()?;
            if len > b.len() {
                return None;
            }
            full = Some(&b[..len]);
            b = &b[len..];
        } else {
            skip_field(wire, tag, &mut b, DecodeContext::default()).ok()?;
            if tag == 3 {
                full = None; // a later delta wins, as in a decoded oneof
            }
        }
    }
    full
}

/// The content hash of `rest` (canonical, no API keys) with `keys`.
fn content_hash_of(rest: &pb::Snapshot, keys: &KeyTable) -> String {
    let mut h = rules::ContentHash::default();
    for o in &rest.orgs {
        h.add(3, o);
    }
    for p in &rest.provider_keys {
        h.add(5, p);
    }
    for m in &rest.models {
        h.add(6, m);
    }
    for l in &rest.limits {
        h.add(8, l);
    }
    h.combine(&keys.content_sum());
    h.to_hex()
}

/// Structural checks on the part of a snapshot other than the API keys.
fn check_rest(rest: &pb::Snapshot) -> Result<(), String> {
    for p in &rest.provider_keys {
        if p.sealed.is_none() {
            return Err(format!(
                "invalid snapshot: provider key {}/{} has no ciphertext",
                p.org_id, p.provider
            ));
        }
    }
    let orgs: std::collections::HashSet<&str> =
        rest.orgs.iter().map(|o| o.org_id.as_str()).collect();
    for l in &rest.limits {
        rules::check_limit(l, &orgs).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Connection state towards the control plane, for `/readyz` and metrics.
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    pub connected: bool,
    pub last_error: Option<String>,
    pub rejected_updates: u64,
    /// Full snapshots applied from a source (a warm start from the state dir is not counted).
    pub full_applied: u64,
    /// Deltas applied.
    pub deltas_applied: u64,
}

pub struct SnapshotStore {
    current: ArcSwapOption<Indexed>,
    keyring: ArcSwapOption<MasterKeyring>,
    /// The master key file, re-read when a snapshot names a key id the keyring lacks (an
    /// operator rotated the master key: the new line is in the file before any secret uses it).
    key_file: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    status: Mutex<SourceStatus>,
    /// Wall-clock time the current snapshot was produced by the control plane (unix seconds).
    produced_unix: std::sync::atomic::AtomicU64,
    /// Writes applied snapshots to `state_dir` in the background (none without a state dir).
    persister: Option<Arc<Persister>>,
    /// One update at a time: with two feeds (gRPC and NATS) on one store, the version check and
    /// the swap of one update must not interleave with another's.
    apply_lock: Mutex<()>,
    /// The proxy is shutting down: `/readyz` says not ready so load balancers move on, while
    /// requests keep being served until the listener closes.
    draining: std::sync::atomic::AtomicBool,
}

const STATE_FILE: &str = "snapshot.pb";

/// Persists the newest applied snapshot on its own thread, off the request and update paths
/// (at a million keys a write is about 100 MB): the newest version waiting wins, so a burst of
/// updates costs one write, and a proxy that dies before a write completes warm-starts from
/// the previous file and catches up with a delta.
struct Persister {
    pending: Mutex<PersistSlot>,
    wake: std::sync::Condvar,
    /// The version last written (0 = none yet).
    written: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct PersistSlot {
    next: Option<Arc<Indexed>>,
    closed: bool,
}

impl Persister {
    fn start(dir: PathBuf) -> Option<Arc<Self>> {
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
            match persist_to(dir, &next.encode()) {
                Ok(()) => self
                    .written
                    .store(next.version, std::sync::atomic::Ordering::Release),
                Err(e) => {
                    tracing::warn!(error = %e, version = next.version, "could not persist the snapshot to the state dir")
                }
            }
        }
    }

    fn submit(&self, s: Arc<Indexed>) {
        if let Ok(mut slot) = self.pending.lock() {
            slot.next = Some(s);
        }
        self.wake.notify_one();
    }

    fn close(&self) {
        if let Ok(mut slot) = self.pending.lock() {
            slot.closed = true;
        }
        self.wake.notify_one();
    }
}

impl Drop for SnapshotStore {
    fn drop(&mut self) {
        // The persister finishes a pending write, then stops.
        if let Some(p) = &self.persister {
            p.close();
        }
    }
}

impl SnapshotStore {
    pub fn new(keyring: Option<Arc<MasterKeyring>>, state_dir: Option<PathBuf>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            keyring: ArcSwapOption::new(keyring),
            key_file: None,
            persister: state_dir.clone().and_then(Persister::start),
            apply_lock: Mutex::new(()),
            state_dir,
            status: Mutex::new(SourceStatus::default()),
            produced_unix: std::sync::atomic::AtomicU64::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks the proxy as draining (a planned stop began): not ready from now on.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The version last written to the state dir (0 = none since start).
    pub fn persisted_version(&self) -> u64 {
        self.persister
            .as_ref()
            .map_or(0, |p| p.written.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Waits up to `timeout` until the applied version is persisted (e.g. before a planned
    /// shutdown); true when it is (or there is nothing to persist).
    pub fn flush(&self, timeout: std::time::Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.persister.is_none() || self.persisted_version() >= self.version() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Re-reads `path` when a snapshot's provider keys are sealed under a master key id this
    /// proxy does not have yet (after a rotation), instead of failing those keys.
    pub fn with_key_file(mut self, path: Option<PathBuf>) -> Self {
        self.key_file = path;
        self
    }

    /// The keyring, reloaded from the key file first when `rest` names an unknown key id.
    fn keyring_for(&self, rest: &pb::Snapshot) -> Option<Arc<MasterKeyring>> {
        let ring = self.keyring.load_full();
        let Some(path) = &self.key_file else {
            return ring;
        };
        let unknown = rest
            .provider_keys
            .iter()
            .filter_map(|p| p.sealed.as_ref())
            .any(|s| {
                ring.as_ref()
                    .is_none_or(|r| !r.key_ids().any(|id| id == s.master_key_id))
            });
        if !unknown {
            return ring;
        }
        match MasterKeyring::load(path) {
            Ok(fresh) => {
                tracing::info!(
                    active = fresh.active_key_id(),
                    "master key file re-read for a new key id"
                );
                let fresh = Arc::new(fresh);
                self.keyring.store(Some(fresh.clone()));
                Some(fresh)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not re-read the master key file; keeping the loaded keys");
                ring
            }
        }
    }

    /// Where the last good snapshot is persisted, if anywhere.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }

    /// The current snapshot, if any has been applied.
    pub fn load(&self) -> Option<Arc<Indexed>> {
        self.current.load_full()
    }

    pub fn version(&self) -> u64 {
        self.current.load().as_ref().map_or(0, |s| s.version)
    }

    pub fn status(&self) -> SourceStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn set_connected(&self, connected: bool, error: Option<String>) {
        if let Ok(mut s) = self.status.lock() {
            s.connected = connected;
            if error.is_some() || connected {
                s.last_error = error;
            }
        }
    }

    /// Seconds since the control plane produced the current snapshot.
    pub fn age_seconds(&self) -> Option<u64> {
        let produced = self
            .produced_unix
            .load(std::sync::atomic::Ordering::Relaxed);
        if produced == 0 {
            return None;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Some(now.saturating_sub(produced))
    }

    /// Validates and applies a full snapshot; on error the previous snapshot stays.
    pub fn apply_full(&self, mut raw: pb::Snapshot) -> Result<u64, ProxyError> {
        let api_keys = std::mem::take(&mut raw.api_keys);
        let split = KeyTable::from_proto(api_keys, &raw.orgs)
            .map_err(|e| self.reject(format!("invalid snapshot: {e}")))?;
        self.apply_split(raw, split)
    }

    /// As [`SnapshotStore::apply_full`], from the protobuf encoding of the snapshot: the API keys
    /// go straight from the bytes into the compact table (what NATS and the warm start use).
    pub fn apply_full_encoded(&self, bytes: &[u8]) -> Result<u64, ProxyError> {
        let (rest, keys) = KeyTable::split_encoded(bytes)
            .map_err(|e| self.reject(format!("invalid snapshot: {e}")))?;
        self.apply_split(rest, keys)
    }

    /// Applies the protobuf encoding of a `SnapshotUpdate` (a full one without decoding its keys
    /// into messages).
    pub fn apply_update_encoded(&self, bytes: &[u8]) -> Result<u64, ProxyError> {
        if let Some(full) = full_snapshot_bytes(bytes) {
            return self.apply_full_encoded(full);
        }
        let update = pb::SnapshotUpdate::decode(bytes)
            .map_err(|e| self.reject(format!("undecodable update: {e}")))?;
        self.apply_update(update)
    }

    fn apply_split(&self, rest: pb::Snapshot, keys: KeyTable) -> Result<u64, ProxyError> {
        let rest = self.validated(rest, &keys).map_err(|e| self.reject(e))?;
        let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let v = self.install(rest, keys, true)?;
        if let Ok(mut s) = self.status.lock() {
            s.full_applied += 1;
        }
        Ok(v)
    }

    /// Checks the structure and that the content hash matches; returns `rest` canonical.
    fn validated(&self, mut rest: pb::Snapshot, keys: &KeyTable) -> Result<pb::Snapshot, String> {
        rules::canonicalize(&mut rest);
        check_rest(&rest)?;
        let computed = content_hash_of(&rest, keys);
        if computed != rest.content_hash {
            return Err(rules::SnapshotError::HashMismatch {
                version: rest.version,
                expected: rest.content_hash.clone(),
                computed,
            }
            .to_string());
        }
        Ok(rest)
    }

    /// Applies one update from a control-plane stream.
    pub fn apply_update(&self, update: pb::SnapshotUpdate) -> Result<u64, ProxyError> {
        match update.kind {
            Some(Kind::Full(s)) => self.apply_full(s),
            Some(Kind::Delta(mut d)) => {
                let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
                let base = self.load().ok_or_else(|| {
                    self.reject("a delta arrived before any full snapshot".into())
                })?;
                // Nothing new (e.g. a Watch reconnecting at the current version): no swap, no
                // rewrite of the state file.
                if update.version == base.version
                    && d.from_version == base.version
                    && d.content_hash == base.content_hash
                    && d.upsert_orgs.is_empty()
                    && d.upsert_api_keys.is_empty()
                    && d.remove_api_key_hashes.is_empty()
                    && d.upsert_provider_keys.is_empty()
                    && d.remove_provider_keys.is_empty()
                    && d.upsert_models.is_empty()
                    && d.upsert_limits.is_empty()
                    && d.remove_limits.is_empty()
                {
                    return Ok(base.version);
                }
                // The keys go to the compact table, everything else through the shared rules.
                let upserts = std::mem::take(&mut d.upsert_api_keys);
                let removes = std::mem::take(&mut d.remove_api_key_hashes);
                let rest = rules::apply_delta_unchecked(&base.rest, update.version, &d)
                    .map_err(|e| self.reject(e.to_string()))?;
                check_rest(&rest).map_err(|e| self.reject(e))?;
                let keys = base
                    .keys
                    .apply(&removes, &upserts, &rest.orgs)
                    .map_err(|e| self.reject(format!("invalid delta: {e}")))?;
                let computed = content_hash_of(&rest, &keys);
                if computed != d.content_hash {
                    return Err(self.reject(
                        rules::SnapshotError::HashMismatch {
                            version: update.version,
                            expected: d.content_hash.clone(),
                            computed,
                        }
                        .to_string(),
                    ));
                }
                drop(base);
                let v = self.install(rest, keys, true)?;
                if let Ok(mut s) = self.status.lock() {
                    s.deltas_applied += 1;
                }
                Ok(v)
            }
            None => Err(self.reject("an update without content".into())),
        }
    }

    fn reject(&self, why: String) -> ProxyError {
        if let Ok(mut s) = self.status.lock() {
            s.rejected_updates += 1;
            s.last_error = Some(why.clone());
        }
        tracing::warn!(error = %why, "snapshot update rejected; keeping the last good snapshot");
        ProxyError::Snapshot(why)
    }

    fn install(
        &self,
        rest: pb::Snapshot,
        keys: KeyTable,
        persist: bool,
    ) -> Result<u64, ProxyError> {
        if let Some(cur) = self.load() {
            if rest.version < cur.version {
                return Err(self.reject(format!(
                    "update to version {} is older than the applied version {}",
                    rest.version, cur.version
                )));
            }
        }
        let produced = time_of(&rest.produced_at);
        let ring = self.keyring_for(&rest);
        let indexed = Arc::new(
            Indexed::build(rest, keys, ring.as_deref(), self.load().as_deref())
                .map_err(|e| self.reject(e.to_string()))?,
        );
        let version = indexed.version;
        self.current.store(Some(indexed.clone()));
        self.produced_unix
            .store(produced, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(version, "snapshot applied");
        // Persist after the swap and off this thread, so neither requests nor the next update
        // wait for the disk.
        if persist {
            if let Some(p) = &self.persister {
                p.submit(indexed.clone());
            }
        }
        Ok(version)
    }

    /// An empty store with the same keys and no state dir, to rebuild a snapshot chain off to
    /// the side (a resync) while this one keeps serving.
    pub fn staging(&self) -> SnapshotStore {
        SnapshotStore::new(self.keyring.load_full(), None).with_key_file(self.key_file.clone())
    }

    /// Swaps in a snapshot built in a [`SnapshotStore::staging`] store, if it is newer than the
    /// current one (then persisted like any applied snapshot).
    pub fn adopt(&self, indexed: Arc<Indexed>) -> Result<u64, ProxyError> {
        let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.version();
        if self.load().is_some() && indexed.version <= cur {
            return Err(self.reject(format!(
                "resynced version {} is not newer than the applied version {cur}",
                indexed.version
            )));
        }
        let version = indexed.version;
        self.produced_unix.store(
            time_of(&indexed.rest.produced_at),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.current.store(Some(indexed.clone()));
        if let Some(p) = &self.persister {
            p.submit(indexed);
        }
        if let Ok(mut s) = self.status.lock() {
            s.full_applied += 1;
        }
        tracing::info!(version, "snapshot resynced");
        Ok(version)
    }

    /// Loads the snapshot persisted in the state dir, if any (warm start).
    pub fn load_persisted(&self) -> Result<Option<u64>, ProxyError> {
        let Some(dir) = &self.state_dir else {
            return Ok(None);
        };
        let path = dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (rest, keys) = KeyTable::split_encoded(&bytes)
            .map_err(|e| ProxyError::Snapshot(format!("{} is corrupt: {e}", path.display())))?;
        drop(bytes);
        let rest = self
            .validated(rest, &keys)
            .map_err(|e| ProxyError::Snapshot(format!("{}: {e}", path.display())))?;
        let version = self.install(rest, keys, false)?;
        // That version is on disk already.
        if let Some(p) = &self.persister {
            p.written
                .store(version, std::sync::atomic::Ordering::Release);
        }
        Ok(Some(version))
    }
}

fn time_of(rfc3339: &str) -> u64 {
    // produced_at is written by the control plane as unix seconds in RFC 3339; accept both.
    rfc3339
        .parse::<u64>()
        .ok()
        .or_else(|| parse_rfc3339_seconds(rfc3339))
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
}

/// Minimal RFC 3339 (`YYYY-MM-DDTHH:MM:SS…Z`) to unix seconds, UTC only.
fn parse_rfc3339_seconds(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + se).ok()
}

fn persist_to(dir: &Path, encoded: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, encoded)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))
}

/// Runs `f` (an update apply: a full one is O(keys), about 0.6 s at a million) without holding up
/// the other tasks of this worker thread: `block_in_place` on a multi-threaded runtime, inline
/// otherwise.
fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The largest snapshot update accepted over gRPC.
const MAX_GRPC_SNAPSHOT: usize = 1 << 30;

/// Follows the control plane's gRPC Watch stream, reconnecting with jittered backoff forever;
/// every applied version is acknowledged (or refused with the reason).
pub async fn follow_grpc(
    store: Arc<SnapshotStore>,
    endpoint: tonic::transport::Endpoint,
    proxy_id: String,
) {
    use flex_shared::proto::control::control_service_client::ControlServiceClient;
    let mut backoff = std::time::Duration::from_millis(100);
    // After a refused update the next Watch asks for a full snapshot (have_version 0): the
    // control plane would otherwise answer the same delta from the version we have.
    let mut resync = false;
    loop {
        let result: Result<(), String> = async {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("connect: {}", crate::plane_tls::error_chain(&e)))?;
            // A full snapshot of a million keys is ~145 MB; tonic's default limit is 4 MB.
            let mut client =
                ControlServiceClient::new(channel).max_decoding_message_size(MAX_GRPC_SNAPSHOT);
            let mut stream = client
                .watch(pb::WatchRequest {
                    proxy_id: proxy_id.clone(),
                    have_version: if resync { 0 } else { store.version() },
                })
                .await
                .map_err(|e| format!("watch: {}", crate::plane_tls::status_text(&e)))?
                .into_inner();
            store.set_connected(true, None);
            backoff = std::time::Duration::from_millis(100);
            while let Some(update) = stream
                .message()
                .await
                .map_err(|e| format!("stream: {}", e.message()))?
            {
                let version = update.version;
                let ack = match off_worker(|| store.apply_update(update)) {
                    Ok(v) => pb::AckRequest {
                        proxy_id: proxy_id.clone(),
                        version: v,
                        accepted: true,
                        error: String::new(),
                    },
                    Err(e) => pb::AckRequest {
                        proxy_id: proxy_id.clone(),
                        version,
                        accepted: false,
                        error: e.to_string(),
                    },
                };
                let refused = !ack.accepted;
                let _ = client.ack(ack).await;
                if refused {
                    resync = true;
                    return Err("update refused; resyncing from a full snapshot".to_string());
                }
                resync = false;
            }
            Err("the control plane closed the stream".to_string())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "control plane watch interrupted; serving the last good snapshot");
            store.set_connected(false, Some(e));
        }
        let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1);
        tokio::time::sleep(backoff + std::time::Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

/// Where a NATS follower stands in the snapshot stream, next to the persisted snapshot: the
/// version it applied and the stream sequence of the message that brought it, as `VERSION SEQ`.
const NATS_POSITION_FILE: &str = "nats-position";

fn read_nats_position(dir: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(dir.join(NATS_POSITION_FILE)).ok()?;
    let mut parts = text.split_whitespace();
    let version = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    Some((version, seq))
}

fn write_nats_position(dir: &Path, version: u64, seq: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{NATS_POSITION_FILE}.tmp"));
    std::fs::write(&tmp, format!("{version} {seq}\n"))?;
    std::fs::rename(&tmp, dir.join(NATS_POSITION_FILE))
}

/// A chunked update being put back together.
struct Chunks {
    version: u64,
    next: usize,
    total: usize,
    /// `None` when the update is already applied and is only being skipped.
    buf: Option<Vec<u8>>,
}

fn header_u64(h: Option<&async_nats::HeaderMap>, name: &str) -> Option<u64> {
    h?.get(name)?.as_str().parse().ok()
}

fn header_chunk(h: Option<&async_nats::HeaderMap>) -> Option<(usize, usize)> {
    let v = h?.get(nats::HEADER_CHUNK)?.as_str().to_string();
    let (i, n) = v.split_once('/')?;
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// The newest full snapshot in the stream: its version and the sequence of its first chunk.
async fn latest_full(
    stream: &async_nats::jetstream::stream::Stream,
) -> Result<Option<(u64, u64)>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    match stream
        .get_last_raw_message_by_subject(nats::FULL_SUBJECT)
        .await
    {
        Ok(m) => {
            let version = header_u64(Some(&m.headers), nats::HEADER_VERSION).unwrap_or(0);
            let first = header_u64(Some(&m.headers), nats::HEADER_FIRST_SEQ).unwrap_or(m.sequence);
            Ok(Some((version, first)))
        }
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
        Err(e) => Err(format!("newest full snapshot: {e}")),
    }
}

/// Reports applied (or refused) versions to the control plane, fire and forget.
struct Reporter {
    client: async_nats::Client,
    subject: String,
    proxy_id: String,
}

impl Reporter {
    async fn report(&self, version: u64, accepted: bool, error: String) {
        let ack = pb::AckRequest {
            proxy_id: self.proxy_id.clone(),
            version,
            accepted,
            error,
        };
        if let Err(e) = self
            .client
            .publish(self.subject.clone(), ack.encode_to_vec().into())
            .await
        {
            tracing::debug!(error = %e, "could not report the snapshot version over NATS");
        }
    }
}

/// How often a NATS follower reports its version when nothing changes (the control plane
/// counts it connected while reports keep coming).
const NATS_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);

/// Follows the snapshot stream on NATS JetStream (see `flex_shared::snapshot::nats`), connecting
/// to `nats_url` without credentials (reconnecting forever); see [`follow_nats_client`].
pub async fn follow_nats(store: Arc<SnapshotStore>, nats_url: String, proxy_id: String) {
    let client = match async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(nats_url.as_str())
        .await
    {
        Ok(c) => c,
        Err(e) => {
            let why = format!("NATS {nats_url}: {e}");
            tracing::error!(error = %why, "cannot follow snapshots over NATS");
            store.set_connected(false, Some(why));
            return;
        }
    };
    follow_nats_client(store, client, proxy_id).await;
}

/// How often the follower looks at the NATS connection state.
const NATS_STATE_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Follows the snapshot stream on NATS JetStream over `client` (which should reconnect by
/// itself), forever: an ordered consumer from the stream sequence after the last applied update
/// (kept in memory, and in the state dir for a restart), or from the newest full snapshot when
/// there is none. While NATS is away the last good snapshot keeps serving; on reconnect the
/// consumer starts again from where it was, so only what changed is fetched. A delta that does
/// not apply (a gap, a hash mismatch) is refused and the follower starts again from the newest
/// full snapshot when that one is newer than what it has. Every applied or refused version is
/// reported on `flex.snapshot.ack.<proxy_id>`, and the current one every 15 s.
pub async fn follow_nats_client(
    store: Arc<SnapshotStore>,
    client: async_nats::Client,
    proxy_id: String,
) {
    let js = async_nats::jetstream::new(client.clone());
    let reporter = Reporter {
        client: client.clone(),
        subject: nats::ack_subject(&proxy_id),
        proxy_id,
    };
    // The position is recorded when an update is applied, the snapshot written later by the
    // persister: resume from the position only if it belongs to the snapshot we loaded, else
    // (a crash in between) start from the newest full, skipping what we have.
    let mut resume = match (
        store.state_dir().and_then(read_nats_position),
        store.version(),
    ) {
        (Some((pv, seq)), v) if v > 0 && pv == v => Some(seq + 1),
        (Some((pv, _)), v) if v > 0 => {
            tracing::warn!(
                position_version = pv,
                snapshot_version = v,
                "the recorded NATS position is not the persisted snapshot's; starting from the newest full snapshot"
            );
            None
        }
        _ => None,
    };
    let mut backoff = std::time::Duration::from_millis(100);
    let mut resync = Resync::default();
    loop {
        if client.connection_state() != async_nats::connection::State::Connected {
            store.set_connected(false, Some("NATS is unreachable".into()));
            // The client reconnects by itself.
            while client.connection_state() != async_nats::connection::State::Connected {
                tokio::time::sleep(NATS_STATE_POLL).await;
            }
        }
        let mut progressed = false;
        let result = follow_nats_once(
            &js,
            &client,
            &store,
            &reporter,
            &mut resume,
            &mut progressed,
            &mut resync,
        )
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "NATS snapshot feed interrupted; serving the last good snapshot");
            store.set_connected(false, Some(e));
        }
        if progressed {
            backoff = std::time::Duration::from_millis(100);
        }
        let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1);
        tokio::time::sleep(backoff + std::time::Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

/// A NATS follower's resync state, kept across consumers.
#[derive(Default)]
struct Resync {
    /// A resync in progress: the full it started from and the chain rebuilt off to the side.
    staging: Option<(u64, SnapshotStore)>,
    /// The full a resync already failed from (its chain is broken): wait for a newer one.
    failed_full: Option<u64>,
}

/// One consumer's life: from `resume` (or the newest full) until an error, a lost connection or a
/// resync. `Ok` means start again at once from `resume`.
async fn follow_nats_once(
    js: &async_nats::jetstream::Context,
    client: &async_nats::Client,
    store: &SnapshotStore,
    reporter: &Reporter,
    resume: &mut Option<u64>,
    progressed: &mut bool,
    resync: &mut Resync,
) -> Result<(), String> {
    let Resync {
        staging,
        failed_full,
    } = resync;
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    use futures_util::StreamExt;
    let connects = client
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed);
    let stream = js.get_stream(nats::STREAM).await.map_err(|e| {
        let missing = matches!(
            e.kind(),
            async_nats::jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
        );
        if missing {
            format!(
                "snapshot stream {}: {e}: the control plane creates it when it starts \
                     publishing; check that `flex control` runs with --nats-url pointing at this \
                     server and what its log says",
                nats::STREAM
            )
        } else {
            format!("snapshot stream {}: {e}", nats::STREAM)
        }
    })?;
    let state = &stream.cached_info().state;
    let (first, last) = (state.first_sequence, state.last_sequence);
    if let Some(seq) = *resume {
        // Past the end: the stream was recreated (its store lost). Before its start: what we
        // missed was discarded. Either way, start again from the newest full.
        if seq > last + 1 || (seq < first && last > 0) {
            tracing::warn!(resume = seq, first, last, "snapshot stream does not hold our position; resyncing from the newest full snapshot");
            *resume = None;
        }
    }
    let start = match *resume {
        Some(seq) => seq,
        None => match latest_full(&stream).await? {
            Some((_, first)) => first,
            None => return Err("the snapshot stream has no full snapshot yet".into()),
        },
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| format!("snapshot consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("snapshot consumer: {e}"))?;
    store.set_connected(true, None);
    *progressed = true;
    tracing::info!(
        start_sequence = start,
        version = store.version(),
        "following snapshots over NATS"
    );
    let mut heartbeat = tokio::time::interval(NATS_HEARTBEAT);
    let mut state_poll = tokio::time::interval(NATS_STATE_POLL);
    let mut chunks: Option<Chunks> = None;
    loop {
        let msg = tokio::select! {
            m = messages.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(format!("snapshot consumer: {e}")),
                None => return Err("the snapshot consumer ended".into()),
            },
            _ = state_poll.tick() => {
                // A reconnect, however quick, may come back to a server that lost our consumer
                // (or all of JetStream's state): start a new consumer from our position.
                if client.connection_state() != async_nats::connection::State::Connected
                    || client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed) != connects
                {
                    return Err("NATS connection lost".into());
                }
                continue;
            }
            _ = heartbeat.tick() => {
                if store.load().is_some() {
                    reporter.report(store.version(), true, String::new()).await;
                }
                continue;
            }
        };
        let seq = msg
            .info()
            .map_err(|e| format!("snapshot message: {e}"))?
            .stream_sequence;
        let headers = msg.headers.as_ref();
        let version = header_u64(headers, nats::HEADER_VERSION).unwrap_or(0);
        // Already applied (e.g. the full a restarted control plane publishes first): skip it
        // without decoding. During a resync, "applied" means applied to the staging store.
        let target: &SnapshotStore = staging.as_ref().map_or(store, |(_, st)| st);
        let have = target.load().is_some().then(|| target.version());
        let stale = have.is_some_and(|h| version != 0 && version <= h);
        let payload = match header_chunk(headers) {
            None => {
                chunks = None;
                msg.payload.to_vec()
            }
            Some((i, n)) => {
                if i == 0 {
                    chunks = Some(Chunks {
                        version,
                        next: 0,
                        total: n,
                        // The header is not trusted for the allocation: capped at 1 GiB.
                        buf: (!stale).then(|| {
                            Vec::with_capacity(msg.payload.len().saturating_mul(n).min(1 << 30))
                        }),
                    });
                }
                let Some(c) = chunks
                    .as_mut()
                    .filter(|c| c.version == version && c.next == i && c.total == n)
                else {
                    // A chunk out of place (the stream dropped the start of this update).
                    chunks = None;
                    continue;
                };
                if let Some(buf) = c.buf.as_mut() {
                    buf.extend_from_slice(&msg.payload);
                }
                c.next += 1;
                if c.next < c.total {
                    continue;
                }
                chunks.take().and_then(|c| c.buf).unwrap_or_default()
            }
        };
        if stale {
            *resume = Some(seq + 1);
            continue;
        }
        if let Some((from_full, st)) = staging.as_ref() {
            // Resyncing: the chain goes to the staging store until it passes our version.
            match off_worker(|| st.apply_update_encoded(&payload)) {
                Ok(v) if v > store.version() => {
                    let adopted = st.load().ok_or("staging store without a snapshot")?;
                    *staging = None;
                    let v = store.adopt(adopted).map_err(|e| e.to_string())?;
                    *resume = Some(seq + 1);
                    if let Some(dir) = store.state_dir() {
                        if let Err(e) = write_nats_position(dir, v, seq) {
                            tracing::warn!(error = %e, "could not record the NATS position in the state dir");
                        }
                    }
                    reporter.report(v, true, String::new()).await;
                }
                Ok(_) => *resume = Some(seq + 1),
                Err(e) => {
                    tracing::warn!(error = %e, "resync from the newest full snapshot failed; waiting for the next full");
                    *failed_full = Some(*from_full);
                    *staging = None;
                    *resume = Some(seq + 1);
                }
            }
            continue;
        }
        let outcome = off_worker(|| store.apply_update_encoded(&payload));
        match outcome {
            Ok(v) => {
                *resume = Some(seq + 1);
                if let Some(dir) = store.state_dir() {
                    if let Err(e) = write_nats_position(dir, v, seq) {
                        tracing::warn!(error = %e, "could not record the NATS position in the state dir");
                    }
                }
                reporter.report(v, true, String::new()).await;
            }
            Err(e) => {
                reporter.report(version, false, e.to_string()).await;
                match latest_full(&stream).await? {
                    Some((full, first)) if full > store.version() || store.load().is_none() => {
                        tracing::warn!(error = %e, full_version = full, "resyncing from the newest full snapshot");
                        *resume = Some(first);
                        return Ok(());
                    }
                    // The newest full is not newer than what we have: rebuild its chain off to
                    // the side (this snapshot keeps serving) and swap it in once it passes ours.
                    Some((full, first)) if *failed_full != Some(full) => {
                        tracing::warn!(error = %e, full_version = full, version = store.version(), "resyncing: replaying the chain from the newest full snapshot beside the current one");
                        *staging = Some((full, store.staging()));
                        *resume = Some(first);
                        return Ok(());
                    }
                    // No full, or one whose chain already failed: wait for the next full.
                    _ => *resume = Some(seq + 1),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use flex_shared::proto::control::{ApiKeyEntry, OrgEntry as PbOrg, ProviderKeyEntry};

    fn snapshot(version: u64, ring: &MasterKeyring, revoked: bool) -> pb::Snapshot {
        let mut s = pb::Snapshot {
            version,
            orgs: vec![PbOrg {
                org_id: "o1".into(),
                name: "o".into(),
                active: true,
                billing_status: "active".into(),
                fee_bps: 0,
            }],
            api_keys: if revoked {
                vec![]
            } else {
                vec![ApiKeyEntry {
                    key_id: "k1".into(),
                    org_id: "o1".into(),
                    key_hash: "a".repeat(64),
                    expires_at: 0,
                }]
            },
            provider_keys: vec![ProviderKeyEntry {
                org_id: "o1".into(),
                provider: "openai".into(),
                sealed: Some(
                    ring.seal("o1", "openai", "sk-test-123456789")
                        .unwrap()
                        .into(),
                ),
            }],
            ..Default::default()
        };
        rules::canonicalize(&mut s);
        s.content_hash = rules::content_hash(&s);
        s
    }

    #[test]
    fn applies_validated_snapshots_and_keeps_the_last_good_one() {
        let ring =
            Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "t").unwrap());
        let store = SnapshotStore::new(Some(ring.clone()), None);
        store.apply_full(snapshot(3, &ring, false)).unwrap();
        assert!(store.load().unwrap().keys.contains_key(&"a".repeat(64)));
        assert!(matches!(
            store
                .load()
                .unwrap()
                .provider_keys
                .get(&("o1".into(), Provider::OpenAi)),
            Some(ProviderSecret::Ready(_))
        ));
        let mut bad = snapshot(4, &ring, true);
        bad.content_hash = "0".repeat(64);
        assert!(store.apply_full(bad).is_err());
        assert_eq!(store.version(), 3);
        assert_eq!(store.status().rejected_updates, 1);
        // Older versions are refused too.
        assert!(store.apply_full(snapshot(2, &ring, true)).is_err());
        store.apply_full(snapshot(5, &ring, true)).unwrap();
        assert!(store.load().unwrap().keys.is_empty());
    }

    #[test]
    fn a_rotated_master_key_is_read_from_the_key_file_when_a_snapshot_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("master.key");
        let old = format!("k1={}", "11".repeat(32));
        std::fs::write(&file, &old).unwrap();
        let r1 = Arc::new(MasterKeyring::load(&file).unwrap());
        let store = SnapshotStore::new(Some(r1.clone()), None).with_key_file(Some(file.clone()));
        store.apply_full(snapshot(1, &r1, false)).unwrap();
        // The operator adds k2 first in the file; the control plane re-seals under k2.
        std::fs::write(&file, format!("k2={}\n{old}\n", "22".repeat(32))).unwrap();
        let r2 = MasterKeyring::load(&file).unwrap();
        store.apply_full(snapshot(2, &r2, false)).unwrap();
        assert!(
            matches!(
                store
                    .load()
                    .unwrap()
                    .provider_keys
                    .get(&("o1".into(), Provider::OpenAi)),
                Some(ProviderSecret::Ready(_))
            ),
            "the proxy re-read the key file instead of failing the provider key"
        );
        // Without a key file the same update leaves the key unusable (and says why).
        let plain = SnapshotStore::new(Some(r1), None);
        plain.apply_full(snapshot(2, &r2, false)).unwrap();
        assert!(matches!(
            plain
                .load()
                .unwrap()
                .provider_keys
                .get(&("o1".into(), Provider::OpenAi)),
            Some(ProviderSecret::Unusable(_))
        ));
    }

    #[test]
    fn deltas_apply_on_top_and_persisted_snapshots_warm_start() {
        let ring =
            Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "t").unwrap());
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(Some(ring.clone()), Some(dir.path().to_path_buf()));
        let a = snapshot(3, &ring, false);
        let b = snapshot(4, &ring, true);
        store.apply_full(a.clone()).unwrap();
        let delta = rules::diff(&a, &b);
        store
            .apply_update(pb::SnapshotUpdate {
                version: 4,
                kind: Some(Kind::Delta(delta)),
            })
            .unwrap();
        assert_eq!(store.version(), 4);
        assert!(store.flush(std::time::Duration::from_secs(10)));
        assert_eq!(store.persisted_version(), 4);
        let warm = SnapshotStore::new(Some(ring), Some(dir.path().to_path_buf()));
        assert_eq!(warm.load_persisted().unwrap(), Some(4));
        assert_eq!(warm.persisted_version(), 4, "what was loaded is on disk");
        assert!(warm.load().unwrap().keys.is_empty());
    }

    #[test]
    fn an_unchanged_provider_key_keeps_its_secret_and_a_changed_one_is_opened_again() {
        let ring =
            Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "t").unwrap());
        let store = SnapshotStore::new(Some(ring.clone()), None);
        let a = snapshot(3, &ring, false);
        store.apply_full(a.clone()).unwrap();
        let secret = |store: &SnapshotStore| match store
            .load()
            .unwrap()
            .provider_keys
            .get(&("o1".into(), Provider::OpenAi))
        {
            Some(ProviderSecret::Ready(s)) => secrecy::ExposeSecret::expose_secret(s).to_string(),
            _ => panic!("the provider key is usable"),
        };
        let before = secret(&store);
        // A delta that changes nothing about the provider key.
        store
            .apply_update(pb::SnapshotUpdate {
                version: 4,
                kind: Some(Kind::Delta(pb::SnapshotDelta {
                    from_version: 3,
                    content_hash: a.content_hash.clone(),
                    ..Default::default()
                })),
            })
            .unwrap();
        assert_eq!(secret(&store), before);
        // A new ciphertext (re-sealed) is opened again.
        let b = snapshot(5, &ring, false);
        assert_ne!(b.provider_keys[0].sealed, a.provider_keys[0].sealed);
        store.apply_full(b).unwrap();
        assert_eq!(secret(&store), before);
    }

    #[test]
    fn a_delta_brings_its_production_time_so_the_age_stays_true() {
        let ring =
            Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "t").unwrap());
        let store = SnapshotStore::new(Some(ring.clone()), None);
        let mut a = snapshot(3, &ring, false);
        a.produced_at = "2020-01-01T00:00:00Z".into();
        store.apply_full(a.clone()).unwrap();
        assert!(store.age_seconds().unwrap() > 3600 * 24 * 365);
        let b = snapshot(4, &ring, true);
        let mut delta = rules::diff(&a, &b);
        // Any time at or after now reads as age 0.
        delta.produced_at = "2999-01-01T00:00:00Z".into();
        store
            .apply_update(pb::SnapshotUpdate {
                version: 4,
                kind: Some(Kind::Delta(delta)),
            })
            .unwrap();
        assert!(
            store.age_seconds().unwrap() < 60,
            "{:?}",
            store.age_seconds()
        );
    }

    #[test]
    fn provider_keys_without_the_master_key_are_unusable_not_fatal() {
        let ring = MasterKeyring::parse(&MasterKeyring::generate_file_text(), "t").unwrap();
        let store = SnapshotStore::new(None, None);
        store.apply_full(snapshot(1, &ring, false)).unwrap();
        assert!(matches!(
            store
                .load()
                .unwrap()
                .provider_keys
                .get(&("o1".into(), Provider::OpenAi)),
            Some(ProviderSecret::Unusable(_))
        ));
    }

    #[test]
    fn rfc3339_parsing() {
        assert_eq!(parse_rfc3339_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_seconds("2026-11-23T14:00:00Z"),
            Some(1_795_442_400)
        );
    }
}
