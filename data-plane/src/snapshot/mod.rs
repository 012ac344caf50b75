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

mod grpc_feed;
mod key_table;
mod nats_feed;
mod persist;

pub use grpc_feed::follow_grpc;
pub use key_table::KeyTable;
pub use nats_feed::{follow_nats, follow_nats_client};
use persist::{Persister, STATE_FILE};

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

/// The unix seconds of a snapshot's `produced_at` (RFC 3339, as the control plane writes it, or
/// plain unix seconds); now when it is neither.
fn time_of(rfc3339: &str) -> u64 {
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

/// RFC 3339 to unix seconds (`None` before 1970 or when it does not parse).
fn parse_rfc3339_seconds(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp()).ok()
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
        assert_eq!(
            parse_rfc3339_seconds("2026-11-23T15:00:00.5+01:00"),
            Some(1_795_442_400)
        );
        assert_eq!(parse_rfc3339_seconds("2026-11-23 14:00"), None);
    }
}
