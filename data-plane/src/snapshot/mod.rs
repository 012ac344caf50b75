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
use flex_shared::snapshot_sign::{self as sign, Seal, SnapshotVerifier};
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
use persist::{Persister, SEAL_FILE, STATE_FILE};

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
    /// The control plane's signature of the update that produced this snapshot (with a public
    /// key: always), persisted beside it so a warm start can check it.
    pub seal: Option<Seal>,
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
            seal: None,
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

/// The bytes of the `full` field of an encoded `SnapshotUpdate`, if it is a full one, and of
/// its `signature` (empty when unsigned).
fn full_snapshot_bytes(mut b: &[u8]) -> Option<(&[u8], &[u8])> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    let mut full = None;
    let mut signature: &[u8] = &[];
    while !b.is_empty() {
        let (tag, wire) = decode_key(&mut b).ok()?;
        if (tag == 2 || tag == 4) && wire == WireType::LengthDelimited {
            let len = usize::try_from(decode_varint(&mut b).ok()?).ok()?;
            if len > b.len() {
                return None;
            }
            if tag == 2 {
                full = Some(&b[..len]);
            } else {
                signature = &b[..len];
            }
            b = &b[len..];
        } else {
            skip_field(wire, tag, &mut b, DecodeContext::default()).ok()?;
            if tag == 3 {
                full = None; // a later delta wins, as in a decoded oneof
            }
        }
    }
    Some((full?, signature))
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
    /// The control plane's public key (`--snapshot-public-key-file`): with it, every update and
    /// the persisted snapshot must carry a valid signature before anything is applied.
    verifier: Option<Arc<SnapshotVerifier>>,
    /// `--max-snapshot-age-secs`: past it the proxy fails closed ([`SnapshotStore::too_old`]).
    max_age: Option<std::time::Duration>,
}

/// The snapshot served is older than `--max-snapshot-age-secs`: the proxy refuses requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooOld {
    pub age_secs: u64,
    pub max_age_secs: u64,
    /// Unix seconds the snapshot was produced (the last time the control plane was heard).
    pub produced_unix: u64,
}

impl TooOld {
    /// `produced_unix` as RFC 3339.
    pub fn produced_at(&self) -> String {
        i64::try_from(self.produced_unix)
            .ok()
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| self.produced_unix.to_string())
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
            verifier: None,
            max_age: None,
        }
    }

    /// Fail closed past `max_age` (`--max-snapshot-age-secs`; `None`: never).
    pub fn with_max_age(mut self, max_age: Option<std::time::Duration>) -> Self {
        self.max_age = max_age.filter(|d| !d.is_zero());
        self
    }

    /// When a maximum age is set and the snapshot served was produced longer ago than that
    /// (no update or heartbeat since): why requests are refused and `/readyz` is 503.
    pub fn too_old(&self) -> Option<TooOld> {
        let max = self.max_age?;
        self.load()?;
        let age_secs = self.age_seconds()?;
        (age_secs > max.as_secs()).then(|| TooOld {
            age_secs,
            max_age_secs: max.as_secs(),
            produced_unix: self
                .produced_unix
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// From now on only updates signed by the holder of `verifier`'s private key are applied
    /// (and a persisted snapshot only with a valid seal). `None`: updates are not checked.
    pub fn with_verifier(mut self, verifier: Option<Arc<SnapshotVerifier>>) -> Self {
        self.verifier = verifier;
        self
    }

    /// Whether updates must be signed.
    pub fn verifies_signatures(&self) -> bool {
        self.verifier.is_some()
    }

    /// With a public key: checks `signature` over `statement()` and returns the seal to keep
    /// (a refusal is counted and logged like any rejected update). Without one: `None`, and the
    /// statement is never computed (a full's digest is O(entries)).
    fn verified<'a>(
        &self,
        statement: impl FnOnce() -> Option<sign::Statement<'a>>,
        signature: &[u8],
    ) -> Result<Option<Seal>, ProxyError> {
        let Some(v) = &self.verifier else {
            return Ok(None);
        };
        let st = statement().ok_or_else(|| self.reject("an update without content".into()))?;
        v.verify(&st, signature).map_err(|e| self.reject(e))?;
        Ok(Some(Seal::of(&st, signature)))
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

    /// Validates and applies an unsigned full snapshot; on error the previous snapshot stays.
    /// Refused when this store verifies signatures (use [`SnapshotStore::apply_update`]).
    pub fn apply_full(&self, raw: pb::Snapshot) -> Result<u64, ProxyError> {
        self.apply_update(pb::SnapshotUpdate {
            signature: vec![],
            version: raw.version,
            kind: Some(Kind::Full(raw)),
        })
    }

    fn apply_full_sealed(
        &self,
        mut raw: pb::Snapshot,
        seal: Option<Seal>,
    ) -> Result<u64, ProxyError> {
        let api_keys = std::mem::take(&mut raw.api_keys);
        let split = KeyTable::from_proto(api_keys, &raw.orgs)
            .map_err(|e| self.reject(format!("invalid snapshot: {e}")))?;
        self.apply_split(raw, split, seal)
    }

    /// As [`SnapshotStore::apply_full`], from the protobuf encoding of the snapshot: the API keys
    /// go straight from the bytes into the compact table (what NATS and the warm start use).
    pub fn apply_full_encoded(&self, bytes: &[u8]) -> Result<u64, ProxyError> {
        self.apply_full_encoded_signed(bytes, &[])
    }

    /// As [`SnapshotStore::apply_full_encoded`], with the update's signature, checked over the
    /// SHA-256 of exactly these bytes before anything is applied.
    fn apply_full_encoded_signed(&self, bytes: &[u8], signature: &[u8]) -> Result<u64, ProxyError> {
        let (rest, keys) = KeyTable::split_encoded(bytes)
            .map_err(|e| self.reject(format!("invalid snapshot: {e}")))?;
        let seal = self.verified(
            || {
                Some(sign::Statement {
                    kind: sign::UpdateKind::Full,
                    version: rest.version,
                    from_version: 0,
                    body_sha256: sign::bytes_sha256(bytes),
                    content_hash: &rest.content_hash,
                    produced_at: &rest.produced_at,
                })
            },
            signature,
        )?;
        self.apply_split(rest, keys, seal)
    }

    /// Applies the protobuf encoding of a `SnapshotUpdate` (a full one without decoding its keys
    /// into messages).
    pub fn apply_update_encoded(&self, bytes: &[u8]) -> Result<u64, ProxyError> {
        if let Some((full, signature)) = full_snapshot_bytes(bytes) {
            return self.apply_full_encoded_signed(full, signature);
        }
        let update = pb::SnapshotUpdate::decode(bytes)
            .map_err(|e| self.reject(format!("undecodable update: {e}")))?;
        self.apply_update(update)
    }

    fn apply_split(
        &self,
        rest: pb::Snapshot,
        keys: KeyTable,
        seal: Option<Seal>,
    ) -> Result<u64, ProxyError> {
        let rest = self.validated(rest, &keys).map_err(|e| self.reject(e))?;
        let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let v = self.install(rest, keys, true, seal)?;
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

    /// Applies one update from a control-plane stream (its signature checked first when this
    /// store has a public key).
    pub fn apply_update(&self, update: pb::SnapshotUpdate) -> Result<u64, ProxyError> {
        let seal = self.verified(|| sign::statement_of(&update), &update.signature)?;
        match update.kind {
            Some(Kind::Full(s)) => self.apply_full_sealed(s, seal),
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
                    // A heartbeat: the control plane still stands by this version, as of
                    // `produced_at` (signed, when signatures are checked), so the age restarts.
                    if !d.produced_at.is_empty() {
                        self.produced_unix.fetch_max(
                            time_of(&d.produced_at),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
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
                let v = self.install(rest, keys, true, seal)?;
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
        seal: Option<Seal>,
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
        let mut indexed = Indexed::build(rest, keys, ring.as_deref(), self.load().as_deref())
            .map_err(|e| self.reject(e.to_string()))?;
        indexed.seal = seal;
        let indexed = Arc::new(indexed);
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
        SnapshotStore::new(self.keyring.load_full(), None)
            .with_key_file(self.key_file.clone())
            .with_verifier(self.verifier.clone())
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
        let seal = match &self.verifier {
            None => None,
            Some(v) => {
                let seal_path = dir.join(SEAL_FILE);
                let seal = std::fs::read_to_string(&seal_path)
                    .ok()
                    .and_then(|l| Seal::parse(&l))
                    .ok_or_else(|| {
                        ProxyError::Snapshot(format!(
                            "{} has no readable signature ({}): with --snapshot-public-key-file a \
                             persisted snapshot is used only with the control plane's signature \
                             of it; starting without it",
                            path.display(),
                            seal_path.display()
                        ))
                    })?;
                v.verify(
                    &seal.statement(rest.version, &rest.content_hash, &rest.produced_at),
                    &seal.signature,
                )
                .map_err(|e| ProxyError::Snapshot(format!("{}: {e}", path.display())))?;
                Some(seal)
            }
        };
        let version = self.install(rest, keys, false, seal)?;
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
                signature: vec![],
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
                signature: vec![],
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
                signature: vec![],
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

    fn signed(mut u: pb::SnapshotUpdate, signer: &sign::SnapshotSigner) -> pb::SnapshotUpdate {
        signer.sign_update(&mut u);
        u
    }

    fn full(s: pb::Snapshot) -> pb::SnapshotUpdate {
        pb::SnapshotUpdate {
            version: s.version,
            kind: Some(Kind::Full(s)),
            signature: vec![],
        }
    }

    #[test]
    fn with_a_public_key_only_signed_updates_apply_and_a_tampered_delta_keeps_the_last_good_one() {
        let ring =
            Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "t").unwrap());
        let signer = sign::SnapshotSigner::generate();
        let verifier = Some(Arc::new(signer.verifier()));
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(Some(ring.clone()), Some(dir.path().to_path_buf()))
            .with_verifier(verifier.clone());
        let a = snapshot(3, &ring, false);
        let b = snapshot(4, &ring, true);
        // Unsigned, and signed by another key: refused, nothing applied.
        let e = store.apply_full(a.clone()).unwrap_err().to_string();
        assert!(e.contains("unsigned"), "{e}");
        let other = sign::SnapshotSigner::generate();
        assert!(store.apply_update(signed(full(a.clone()), &other)).is_err());
        assert!(store.load().is_none());
        // Signed: applied, over the decoded and the encoded path alike.
        let signed_full = signed(full(a.clone()), &signer);
        assert_eq!(store.apply_update(signed_full.clone()).unwrap(), 3);
        let encoded = SnapshotStore::new(Some(ring.clone()), None).with_verifier(verifier.clone());
        assert_eq!(
            encoded
                .apply_update_encoded(&signed_full.encode_to_vec())
                .unwrap(),
            3
        );
        // A full changed after signing (a byte of a key hash flipped): refused.
        let mut bytes = signed_full.encode_to_vec();
        let at = bytes
            .windows(64)
            .position(|w| w == "a".repeat(64).as_bytes())
            .unwrap();
        bytes[at] = b'b';
        let fresh = SnapshotStore::new(Some(ring.clone()), None).with_verifier(verifier.clone());
        assert!(fresh.apply_update_encoded(&bytes).is_err());
        assert!(fresh.load().is_none());

        // The genuine delta revokes key a; the tampered one also adds an attacker's key, with a
        // correct content hash: only the signature tells them apart.
        let genuine = signed(
            pb::SnapshotUpdate {
                version: 4,
                kind: Some(Kind::Delta(rules::diff(&a, &b))),
                signature: vec![],
            },
            &signer,
        );
        let mut evil = b.clone();
        evil.api_keys.push(ApiKeyEntry {
            key_id: "evil".into(),
            org_id: "o1".into(),
            key_hash: "e".repeat(64),
            expires_at: 0,
        });
        evil.content_hash = rules::content_hash(&evil);
        let mut tampered = genuine.clone();
        tampered.kind = Some(Kind::Delta(rules::diff(&a, &evil)));
        let rejected = store.status().rejected_updates;
        let e = store
            .apply_update(tampered.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad snapshot signature"), "{e}");
        assert!(store
            .apply_update_encoded(&tampered.encode_to_vec())
            .is_err());
        let mut unsigned = genuine.clone();
        unsigned.signature.clear();
        assert!(store.apply_update(unsigned).is_err());
        assert_eq!(store.status().rejected_updates, rejected + 3);
        let cur = store.load().unwrap();
        assert_eq!(cur.version, 3, "the last good snapshot stays");
        assert!(cur.keys.contains_key(&"a".repeat(64)));
        assert!(!cur.keys.contains_key(&"e".repeat(64)));
        assert_eq!(store.apply_update(genuine).unwrap(), 4);
        assert!(!store.load().unwrap().keys.contains_key(&"a".repeat(64)));

        // Warm start: the persisted snapshot is used only with a valid seal.
        assert!(store.flush(std::time::Duration::from_secs(10)));
        drop(store);
        let warm = |v: Option<Arc<SnapshotVerifier>>| {
            SnapshotStore::new(Some(ring.clone()), Some(dir.path().to_path_buf())).with_verifier(v)
        };
        assert_eq!(warm(verifier.clone()).load_persisted().unwrap(), Some(4));
        assert!(warm(Some(Arc::new(other.verifier())))
            .load_persisted()
            .is_err());
        let seal = std::fs::read_to_string(dir.path().join(SEAL_FILE)).unwrap();
        // The snapshot file replaced by one with the attacker's key (consistent hash): refused.
        let good = std::fs::read(dir.path().join(STATE_FILE)).unwrap();
        let mut evil5 = evil.clone();
        evil5.version = 4;
        std::fs::write(dir.path().join(STATE_FILE), evil5.encode_to_vec()).unwrap();
        let e = warm(verifier.clone())
            .load_persisted()
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad snapshot signature"), "{e}");
        std::fs::write(dir.path().join(STATE_FILE), good).unwrap();
        // No seal: refused with a key, accepted without.
        std::fs::remove_file(dir.path().join(SEAL_FILE)).unwrap();
        assert!(warm(verifier.clone()).load_persisted().is_err());
        assert_eq!(warm(None).load_persisted().unwrap(), Some(4));
        std::fs::write(dir.path().join(SEAL_FILE), seal).unwrap();
        assert_eq!(warm(verifier).load_persisted().unwrap(), Some(4));
    }

    #[test]
    fn past_the_maximum_age_the_store_is_too_old_until_a_heartbeat() {
        let ring =
            Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "t").unwrap());
        let signer = sign::SnapshotSigner::generate();
        let store = SnapshotStore::new(Some(ring.clone()), None)
            .with_verifier(Some(Arc::new(signer.verifier())))
            .with_max_age(Some(std::time::Duration::from_secs(60)));
        assert!(
            store.too_old().is_none(),
            "nothing loaded: not ready, not too old"
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut a = snapshot(3, &ring, false);
        a.produced_at = (now - 3600).to_string();
        store
            .apply_update(signed(full(a.clone()), &signer))
            .unwrap();
        let t = store.too_old().unwrap();
        assert!(t.age_secs >= 3600 && t.max_age_secs == 60, "{t:?}");
        let heartbeat = |at: u64| pb::SnapshotUpdate {
            version: 3,
            kind: Some(Kind::Delta(pb::SnapshotDelta {
                from_version: 3,
                content_hash: a.content_hash.clone(),
                produced_at: at.to_string(),
                ..Default::default()
            })),
            signature: vec![],
        };
        // An unsigned heartbeat does not refresh anything; a signed one does.
        assert!(store.apply_update(heartbeat(now)).is_err());
        assert!(store.too_old().is_some());
        assert_eq!(
            store.apply_update(signed(heartbeat(now), &signer)).unwrap(),
            3
        );
        assert!(store.too_old().is_none());
        // An older heartbeat (replayed) does not move the time back.
        store
            .apply_update(signed(heartbeat(now - 7200), &signer))
            .unwrap();
        assert!(store.too_old().is_none());
        // Without a maximum age nothing is ever too old.
        let lax = SnapshotStore::new(Some(ring.clone()), None);
        lax.apply_full(a).unwrap();
        assert!(lax.too_old().is_none());
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
