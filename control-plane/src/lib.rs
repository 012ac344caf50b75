//! The FlexInference control plane.
//!
//! Orgs, API keys, provider keys (BYOK) and billing accounts are aggregates whose state is only
//! ever derived from an append-only event log ([`store`]) on SQLite or Postgres. Commands load the
//! aggregate from its stream, decide against it ([`domain`]) and append with the expected version
//! (a concurrent change becomes `ABORTED`). The [`projection`] folds the whole log into memory and
//! publishes versioned snapshots that proxies receive over gRPC Watch ([`service`]), in-process
//! through [`ControlPlane::subscribe`], or over NATS JetStream ([`snapshot_nats`]).
//!
//! Secrets: API keys are stored only as SHA-256 hashes and shown once. Provider keys are sealed
//! with the master keyring before they reach the log; admin responses carry only `last4`.

pub mod accounts;
pub mod billing;
pub mod dashboard;
pub mod domain;
pub mod error;
pub mod grpc_trace;
pub mod ledger_stream;
pub mod limits;
pub mod metrics;
pub mod projection;
pub mod proxies;
pub mod service;
pub mod snapshot_nats;
pub mod store;
pub mod timefmt;
pub mod tls;
pub mod usage_consumer;

// Further `impl ControlPlane` blocks, one per command family; their types are re-exported below.
mod audit;
mod master_key;
mod models;
mod orgs;
mod usage;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use flex_shared::crypto::MasterKeyring;
use flex_shared::proto::admin as apb;
use flex_shared::proto::control as pb;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::domain::{Aggregate, Event, Loaded};
pub use crate::error::{Error, Result};
pub use crate::master_key::RotationReport;
pub use crate::orgs::{CreatedApiKey, CreatedOrg};
pub use crate::projection::Published;
use crate::projection::{Projection, State};
use crate::proxies::ProxyRegistry;
pub use crate::store::{Metadata, Store, StoreError};
/// The sqlx this crate is built with ([`Store`]'s variants hold its pools), for callers that
/// need the pools themselves (tests, benchmarks).
pub use sqlx;

/// How often each instance polls the log for events appended by other instances.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// The overdue-invoice check ([`ControlPlane::check_overdue_invoices`]) runs when an instance
/// opens and then every this many polls (120 × 500 ms = every minute).
pub const OVERDUE_CHECK_EVERY_POLLS: u64 = 120;
/// How many times an idempotent command retries after a conflict.
const IDEMPOTENT_ATTEMPTS: usize = 5;

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The control plane: event store, projection, proxy registry and the master keyring.
pub struct ControlPlane {
    store: Store,
    keyring: RwLock<Arc<MasterKeyring>>,
    /// The file the keyring came from, read again on `RotateMasterKey`.
    master_key_file: Option<PathBuf>,
    projection: Arc<Projection>,
    proxies: ProxyRegistry,
    /// Set to `true` to end every open Watch stream (graceful shutdown waits for streams).
    stop_streams: watch::Sender<bool>,
    /// The proxies' shared limit counters, read for `GetLimits` (none: use unknown).
    limit_counters: RwLock<Option<Arc<dyn limits::LimitCounters>>>,
    /// The digest of the proxy token the control service requires (`--proxy-token-file`);
    /// unset: the service trusts the connection (mutual TLS, or loopback).
    proxy_token: std::sync::OnceLock<[u8; 32]>,
    /// The snapshot signing key (`--snapshot-signing-key-file`): every update sent is signed.
    signer: std::sync::OnceLock<Arc<flex_shared::snapshot_sign::SnapshotSigner>>,
    /// Seconds between heartbeats on an idle snapshot feed (0 = none); see
    /// [`ControlPlane::heartbeat_update`].
    snapshot_heartbeat_secs: std::sync::atomic::AtomicU64,
    _poller: AbortOnDrop,
}

/// Default seconds between snapshot heartbeats (`flex control --snapshot-heartbeat-secs`): well
/// below any sensible `flex proxy --max-snapshot-age-secs` (minutes).
pub const DEFAULT_SNAPSHOT_HEARTBEAT_SECS: u64 = 30;

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("backend", &self.store.backend())
            .field("version", &self.projection.published().version)
            .finish_non_exhaustive()
    }
}

fn fingerprint(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

fn idempotency_record(key: &str, command: &str, id: &str, fp: &str) -> store::IdempotencyRecord {
    store::IdempotencyRecord {
        key: key.to_string(),
        command: command.to_string(),
        result_json: serde_json::json!({ "id": id, "request_sha256": fp }).to_string(),
    }
}

impl ControlPlane {
    /// Opens the event store (`sqlite://PATH?mode=rwc`, `sqlite:PATH` or `postgres://…`), runs
    /// the migrations, rebuilds the projection from the log and starts the poller.
    pub async fn open(database_url: &str, keyring: Arc<MasterKeyring>) -> Result<Self> {
        let store = Store::connect(database_url).await?;
        Self::with_store(store, keyring).await
    }

    /// As [`ControlPlane::open`], over an already connected store.
    pub async fn with_store(store: Store, keyring: Arc<MasterKeyring>) -> Result<Self> {
        let projection = Arc::new(Projection::open(store.clone()).await?);
        // The start-up overdue check runs here, before `open` returns, so it never races a
        // command issued right after opening; the poller repeats it every few minutes.
        if let Err(e) = billing::check_overdue(&store, &projection, timefmt::now()).await {
            tracing::warn!(error = %e, "overdue-invoice check failed; retrying at the next one");
        }
        let poller = {
            let projection = projection.clone();
            let store = store.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(POLL_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for polls in 1u64.. {
                    tick.tick().await;
                    if let Err(e) = projection.catch_up().await {
                        tracing::warn!(error = %e, "projection poll failed; retrying");
                    }
                    if polls % OVERDUE_CHECK_EVERY_POLLS == 0 {
                        if let Err(e) =
                            billing::check_overdue(&store, &projection, timefmt::now()).await
                        {
                            tracing::warn!(error = %e, "overdue-invoice check failed; retrying at the next one");
                        }
                    }
                }
            })
        };
        tracing::info!(
            backend = store.backend(),
            version = projection.published().version,
            "control plane opened"
        );
        Ok(Self {
            store,
            keyring: RwLock::new(keyring),
            master_key_file: None,
            projection,
            proxies: ProxyRegistry::default(),
            stop_streams: watch::channel(false).0,
            limit_counters: RwLock::new(None),
            proxy_token: std::sync::OnceLock::new(),
            signer: std::sync::OnceLock::new(),
            snapshot_heartbeat_secs: std::sync::atomic::AtomicU64::new(
                DEFAULT_SNAPSHOT_HEARTBEAT_SECS,
            ),
            _poller: AbortOnDrop(poller),
        })
    }

    /// From now on the control service (`Watch`, `Ack`, `ReportUsage`) requires
    /// `authorization: Bearer <token>` (`flex control --proxy-token-file`). Set before serving;
    /// only the token's digest is kept. Fails when a token is already set or `token` is empty.
    pub fn require_proxy_token(&self, token: &secrecy::SecretString) -> Result<()> {
        use secrecy::ExposeSecret;
        let t = token.expose_secret().trim();
        if t.is_empty() {
            return Err(Error::InvalidArgument(
                "the proxy token is empty: put a random string (e.g. `openssl rand -hex 32`) in the --proxy-token-file".into(),
            ));
        }
        self.proxy_token
            .set(Sha256::digest(t.as_bytes()).into())
            .map_err(|_| Error::Internal("the proxy token is already set".into()))
    }

    /// From now on every snapshot update (full, delta, heartbeat; gRPC Watch, NATS, in process)
    /// is signed with `signer` (`flex control --snapshot-signing-key-file`). Set before serving.
    pub fn sign_snapshots_with(
        &self,
        signer: flex_shared::snapshot_sign::SnapshotSigner,
    ) -> Result<()> {
        self.signer
            .set(Arc::new(signer))
            .map_err(|_| Error::Internal("the snapshot signing key is already set".into()))
    }

    /// Whether updates are signed.
    pub fn signs_snapshots(&self) -> bool {
        self.signer.get().is_some()
    }

    /// Heartbeats every `every` on an idle snapshot feed (zero: none). Set before serving.
    pub fn set_snapshot_heartbeat(&self, every: Duration) {
        self.snapshot_heartbeat_secs
            .store(every.as_secs(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The heartbeat interval (`None`: off).
    pub fn snapshot_heartbeat(&self) -> Option<Duration> {
        match self
            .snapshot_heartbeat_secs
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            n => Some(Duration::from_secs(n)),
        }
    }

    /// The digest of the required proxy token, if any.
    pub(crate) fn proxy_token_digest(&self) -> Option<[u8; 32]> {
        self.proxy_token.get().copied()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn proxies(&self) -> &ProxyRegistry {
        &self.proxies
    }

    pub fn keyring(&self) -> Arc<MasterKeyring> {
        self.keyring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Published snapshot versions: the current one at once, then every new one (a watcher
    /// that falls behind sees only the newest; [`ControlPlane::update_between`] bridges the gap).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.projection.subscribe()
    }

    /// Ends every open Watch stream, now and from now on (proxies reconnect elsewhere). A
    /// graceful gRPC shutdown waits for open streams, so call this when shutting down;
    /// [`ControlPlane::serve`] does it when its shutdown future completes.
    pub fn end_watch_streams(&self) {
        self.stop_streams.send_replace(true);
    }

    /// Resolves when [`ControlPlane::end_watch_streams`] has been called.
    pub fn watch_streams_ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop_streams.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// The current snapshot, in full (built once per version).
    pub fn snapshot(&self) -> Arc<pb::Snapshot> {
        self.projection.published().full()
    }

    /// The current published version.
    pub fn published(&self) -> Arc<Published> {
        self.projection.published()
    }

    /// The delta from `from_version` to `to`, while the in-memory change records cover it.
    pub fn delta(&self, from_version: u64, to: &Published) -> Option<pb::SnapshotDelta> {
        self.projection.delta(from_version, to)
    }

    /// The update that brings a proxy at `from_version` (0 = nothing) to `to`: a delta when the
    /// change records cover the span and it is smaller than the snapshot, else the full snapshot.
    pub fn update_between(&self, from_version: u64, to: &Published) -> pb::SnapshotUpdate {
        self.delta_update(from_version, to)
            .unwrap_or_else(|| self.full_update(to))
    }

    /// The delta half of [`ControlPlane::update_between`]: `None` when a full snapshot is needed.
    pub fn delta_update(&self, from_version: u64, to: &Published) -> Option<pb::SnapshotUpdate> {
        let d = (from_version > 0)
            .then(|| self.projection.delta(from_version, to))
            .flatten()
            .filter(|d| delta_entries(d) <= to.content().len())?;
        let mut u = pb::SnapshotUpdate {
            version: to.version,
            kind: Some(pb::snapshot_update::Kind::Delta(d)),
            signature: Vec::new(),
        };
        if let Some(signer) = self.signer.get() {
            signer.sign_update(&mut u);
        }
        Some(u)
    }

    /// A heartbeat for a proxy at `at`'s version: an empty delta from that version to itself
    /// whose `produced_at` is now (signed like any update), so a proxy's snapshot age measures
    /// how long it has not heard from the control plane, not how long nothing changed.
    pub fn heartbeat_update(&self, at: &Published) -> pb::SnapshotUpdate {
        let mut u = pb::SnapshotUpdate {
            version: at.version,
            kind: Some(pb::snapshot_update::Kind::Delta(pb::SnapshotDelta {
                from_version: at.version,
                content_hash: at.content_hash.clone(),
                produced_at: timefmt::format(timefmt::now()),
                ..Default::default()
            })),
            signature: Vec::new(),
        };
        if let Some(signer) = self.signer.get() {
            signer.sign_update(&mut u);
        }
        u
    }

    /// The signature of `to`'s full snapshot (empty without a signing key); the digest of the
    /// full is computed once per version.
    pub fn full_signature(&self, to: &Published) -> Vec<u8> {
        let Some(signer) = self.signer.get() else {
            return Vec::new();
        };
        let full = to.full();
        signer.sign(&flex_shared::snapshot_sign::Statement {
            kind: flex_shared::snapshot_sign::UpdateKind::Full,
            version: full.version,
            from_version: 0,
            body_sha256: to.full_body_sha256(),
            content_hash: &full.content_hash,
            produced_at: &full.produced_at,
        })
    }

    /// The full snapshot of `to` as an update (O(entries): built once per version, then copied).
    pub fn full_update(&self, to: &Published) -> pb::SnapshotUpdate {
        pb::SnapshotUpdate {
            version: to.version,
            signature: self.full_signature(to),
            kind: Some(pb::snapshot_update::Kind::Full(pb::Snapshot::clone(
                &to.full(),
            ))),
        }
    }

    /// The live projected state.
    pub fn state(&self) -> Arc<State> {
        self.projection.state()
    }

    /// A fresh state folded from the whole log (must equal [`ControlPlane::state`] once caught up).
    pub async fn rebuild(&self) -> Result<State> {
        projection::rebuild(&self.store).await
    }

    /// Folds events appended since the last fold (by this or another instance).
    pub async fn catch_up(&self) -> Result<()> {
        self.projection.catch_up().await
    }

    async fn load<A: Aggregate>(&self, stream_id: &str) -> Result<Loaded<A>> {
        Loaded::fold(&self.store.read_stream(stream_id).await?)
    }

    async fn append(
        &self,
        stream_id: &str,
        expected: u64,
        event: &Event,
        meta: &Metadata,
    ) -> Result<()> {
        self.append_events(stream_id, expected, std::slice::from_ref(event), meta, None)
            .await
    }

    /// Appends `events` atomically (with an idempotency record when given), then catches up.
    async fn append_events(
        &self,
        stream_id: &str,
        expected: u64,
        events: &[Event],
        meta: &Metadata,
        idempotency: Option<&store::IdempotencyRecord>,
    ) -> Result<()> {
        let new = events
            .iter()
            .map(Event::to_new)
            .collect::<Result<Vec<_>>>()?;
        self.store
            .append_with_idempotency(stream_id, expected, &new, meta, idempotency)
            .await?;
        for event in events {
            tracing::info!(
                stream_id,
                event_type = event.event_type(),
                actor = %meta.actor,
                request_id = %meta.request_id,
                "event appended"
            );
        }
        self.projection.catch_up().await
    }

    /// The id recorded under an idempotency key, if this exact request was made before.
    async fn idempotency_lookup(
        &self,
        key: &str,
        command: &str,
        fp: &str,
    ) -> Result<Option<String>> {
        let Some(rec) = self.store.idempotency_get(key).await? else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(&rec.result_json)
            .map_err(|e| Error::Internal(format!("idempotency record `{key}`: {e}")))?;
        if rec.command != command || v["request_sha256"].as_str() != Some(fp) {
            return Err(Error::InvalidArgument(format!(
                "idempotency_key {:?} was already used for a different request ({}); use a new key for a new request",
                domain::clip(key),
                rec.command
            )));
        }
        let id = v["id"]
            .as_str()
            .ok_or_else(|| Error::Internal(format!("idempotency record `{key}` has no id")))?;
        Ok(Some(id.to_string()))
    }

    fn org_or_not_found(&self, state: &State, org_id: &str) -> Result<apb::Org> {
        state
            .org_admin(org_id)
            .ok_or_else(|| domain::not_found_org(org_id))
    }

    /// Proxies seen by this instance, and the current snapshot version.
    pub fn list_proxies(&self) -> apb::ListProxiesResponse {
        apb::ListProxiesResponse {
            proxies: self.proxies.list(),
            current_version: self.projection.published().version,
        }
    }

    // ----- data plane ---------------------------------------------------------------------

    /// A proxy applied (or refused) a snapshot version.
    pub fn ack(&self, proxy_id: &str, version: u64, accepted: bool, error: &str) {
        self.proxies.ack(proxy_id, version, accepted, error);
    }

    // ----- gRPC -------------------------------------------------------------------------------

    /// The gRPC routes: `flex.admin.v1.AdminService` (requires `authorization: Bearer
    /// <admin_token>`), `flex.control.v1.ControlService` (with a client CA, only for proxies with
    /// an enrolled client certificate: [`tls`]; without one, keep it on the proxies' network),
    /// and server reflection (v1 and v1alpha).
    pub fn grpc_router(
        self: &Arc<Self>,
        admin_token: &SecretString,
    ) -> Result<tonic::service::Routes> {
        service::routes(self, admin_token)
    }

    /// Serves [`ControlPlane::grpc_router`] on `addr` until `shutdown` completes.
    pub async fn serve(
        self: &Arc<Self>,
        addr: SocketAddr,
        admin_token: &SecretString,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Internal(format!("cannot listen on {addr}: {e}")))?;
        self.serve_with_listener(listener, admin_token, shutdown)
            .await
    }

    /// As [`ControlPlane::serve`], on a bound listener (e.g. port 0 in tests), without TLS; see
    /// [`ControlPlane::serve_with_listener_tls`].
    pub async fn serve_with_listener(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        admin_token: &SecretString,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        self.serve_with_listener_tls(listener, admin_token, None, shutdown)
            .await
    }
}

/// Entries a delta carries.
pub(crate) fn delta_entries(d: &pb::SnapshotDelta) -> usize {
    d.upsert_orgs.len()
        + d.upsert_api_keys.len()
        + d.remove_api_key_hashes.len()
        + d.upsert_provider_keys.len()
        + d.remove_provider_keys.len()
        + d.upsert_models.len()
        + d.upsert_limits.len()
        + d.remove_limits.len()
}
