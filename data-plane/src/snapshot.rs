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
use flex_shared::snapshot as rules;
use prost::Message;
use secrecy::SecretString;

use crate::error::ProxyError;

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
    pub keys: HashMap<String, KeyEntry>,
    pub orgs: HashMap<String, OrgEntry>,
    pub provider_keys: HashMap<(String, Provider), ProviderSecret>,
    pub catalog: Catalog,
    pub raw: pb::Snapshot,
    pub applied_at: Instant,
}

impl Indexed {
    fn build(raw: pb::Snapshot, keyring: Option<&MasterKeyring>) -> Result<Self, ProxyError> {
        let keys = raw
            .api_keys
            .iter()
            .map(|k| {
                (
                    k.key_hash.clone(),
                    KeyEntry {
                        key_id: k.key_id.clone(),
                        org_id: k.org_id.clone(),
                        expires_at: k.expires_at,
                    },
                )
            })
            .collect();
        let orgs = raw
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
        for p in &raw.provider_keys {
            let Some(provider) = Provider::parse(&p.provider) else {
                continue;
            };
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
            provider_keys.insert((p.org_id.clone(), provider), secret);
        }
        let mut overrides = Vec::new();
        for m in &raw.models {
            overrides.push(Model::from_proto(m).map_err(ProxyError::Snapshot)?);
        }
        Ok(Self {
            version: raw.version,
            content_hash: raw.content_hash.clone(),
            keys,
            orgs,
            provider_keys,
            catalog: Catalog::with_overrides(&overrides),
            raw,
            applied_at: Instant::now(),
        })
    }
}

/// Connection state towards the control plane, for `/readyz` and metrics.
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    pub connected: bool,
    pub last_error: Option<String>,
    pub rejected_updates: u64,
}

pub struct SnapshotStore {
    current: ArcSwapOption<Indexed>,
    keyring: Option<Arc<MasterKeyring>>,
    state_dir: Option<PathBuf>,
    status: Mutex<SourceStatus>,
    /// Wall-clock time the current snapshot was produced by the control plane (unix seconds).
    produced_unix: std::sync::atomic::AtomicU64,
}

const STATE_FILE: &str = "snapshot.pb";

impl SnapshotStore {
    pub fn new(keyring: Option<Arc<MasterKeyring>>, state_dir: Option<PathBuf>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            keyring,
            state_dir,
            status: Mutex::new(SourceStatus::default()),
            produced_unix: std::sync::atomic::AtomicU64::new(0),
        }
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
    pub fn apply_full(&self, raw: pb::Snapshot) -> Result<u64, ProxyError> {
        rules::validate(&raw).map_err(|e| self.reject(e.to_string()))?;
        self.install(raw, true)
    }

    /// Applies one update from a control-plane stream.
    pub fn apply_update(&self, update: pb::SnapshotUpdate) -> Result<u64, ProxyError> {
        match update.kind {
            Some(Kind::Full(s)) => self.apply_full(s),
            Some(Kind::Delta(d)) => {
                let base = self.load().ok_or_else(|| {
                    self.reject("a delta arrived before any full snapshot".into())
                })?;
                let next = rules::apply_delta(&base.raw, update.version, &d)
                    .map_err(|e| self.reject(e.to_string()))?;
                self.install(next, true)
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

    fn install(&self, raw: pb::Snapshot, persist: bool) -> Result<u64, ProxyError> {
        if let Some(cur) = self.load() {
            if raw.version < cur.version {
                return Err(self.reject(format!(
                    "update to version {} is older than the applied version {}",
                    raw.version, cur.version
                )));
            }
        }
        let produced = time_of(&raw.produced_at);
        let indexed =
            Indexed::build(raw, self.keyring.as_deref()).map_err(|e| self.reject(e.to_string()))?;
        let version = indexed.version;
        if persist {
            if let Some(dir) = &self.state_dir {
                if let Err(e) = persist_to(dir, &indexed.raw) {
                    tracing::warn!(error = %e, "could not persist the snapshot to the state dir");
                }
            }
        }
        self.current.store(Some(Arc::new(indexed)));
        self.produced_unix
            .store(produced, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(version, "snapshot applied");
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
        let raw = pb::Snapshot::decode(bytes.as_slice())
            .map_err(|e| ProxyError::Snapshot(format!("{} is corrupt: {e}", path.display())))?;
        rules::validate(&raw)
            .map_err(|e| ProxyError::Snapshot(format!("{}: {e}", path.display())))?;
        self.install(raw, false).map(Some)
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

fn persist_to(dir: &Path, raw: &pb::Snapshot) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, raw.encode_to_vec())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))
}

/// Follows an in-process control plane (`flex up`): every published snapshot is applied.
pub async fn follow_watch(
    store: Arc<SnapshotStore>,
    mut rx: tokio::sync::watch::Receiver<Arc<pb::Snapshot>>,
) {
    store.set_connected(true, None);
    loop {
        let snap = rx.borrow_and_update().clone();
        if snap.version > store.version() || store.load().is_none() {
            let _ = store.apply_full((*snap).clone());
        }
        if rx.changed().await.is_err() {
            store.set_connected(false, Some("the in-process control plane stopped".into()));
            return;
        }
    }
}

/// Follows the control plane's gRPC Watch stream, reconnecting with jittered backoff forever;
/// every applied version is acknowledged (or refused with the reason).
pub async fn follow_grpc(
    store: Arc<SnapshotStore>,
    endpoint: tonic::transport::Endpoint,
    proxy_id: String,
) {
    use flex_shared::proto::control::control_service_client::ControlServiceClient;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        let result: Result<(), String> = async {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut client = ControlServiceClient::new(channel);
            let mut stream = client
                .watch(pb::WatchRequest {
                    proxy_id: proxy_id.clone(),
                    have_version: store.version(),
                })
                .await
                .map_err(|e| format!("watch: {}", e.message()))?
                .into_inner();
            store.set_connected(true, None);
            backoff = std::time::Duration::from_millis(100);
            while let Some(update) = stream
                .message()
                .await
                .map_err(|e| format!("stream: {}", e.message()))?
            {
                let version = update.version;
                let ack = match store.apply_update(update) {
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
                    // Reconnect: the control plane answers a fresh Watch with a full snapshot.
                    return Err("update refused; resyncing".to_string());
                }
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
        let warm = SnapshotStore::new(Some(ring), Some(dir.path().to_path_buf()));
        assert_eq!(warm.load_persisted().unwrap(), Some(4));
        assert!(warm.load().unwrap().keys.is_empty());
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
