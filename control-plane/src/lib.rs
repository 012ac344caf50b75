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

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use flex_shared::catalog::Provider;
use flex_shared::crypto::MasterKeyring;
use flex_shared::keys;
use flex_shared::proto::admin as apb;
use flex_shared::proto::control as pb;
use flex_shared::usage::UsageEvent;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::domain::{
    Aggregate, ApiKeyAggregate, BillingAggregate, BillingStatus, Event, Loaded, OrgAggregate,
    ProviderKeyAggregate,
};
pub use crate::error::{Error, Result};
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

/// A created org; `replayed` when an idempotency key returned an earlier result.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatedOrg {
    pub org: apb::Org,
    pub replayed: bool,
}

/// A created API key. `secret` is the full key, present only in the response to the call that
/// created it: a replay of the same idempotency key returns the key's metadata with
/// `secret: None` (the control plane keeps only a hash, so it cannot show the key again; if the
/// first response was lost, revoke that key and create another).
#[derive(Debug, Clone)]
pub struct CreatedApiKey {
    pub key: apb::ApiKey,
    pub secret: Option<SecretString>,
    pub replayed: bool,
}

impl CreatedApiKey {
    /// The gRPC response (`api_key` empty on a replay).
    pub fn to_proto(&self) -> apb::CreatedApiKey {
        apb::CreatedApiKey {
            key: Some(self.key.clone()),
            api_key: self
                .secret
                .as_ref()
                .map(|s| s.expose_secret().to_string())
                .unwrap_or_default(),
        }
    }
}

/// Outcome of [`ControlPlane::rotate_master_key`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Provider keys re-sealed under the active master key.
    pub resealed: usize,
    /// Provider keys that already were under the active master key.
    pub already_current: usize,
    /// The master key id every provider key is now sealed under.
    pub active_key_id: String,
    /// Whether the master key file was read again first ([`ControlPlane::rotate_master_key_from_file`]).
    pub key_file_reloaded: bool,
}

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
    _poller: AbortOnDrop,
}

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

/// Replaces hashes and ciphertexts in an event payload (at any depth) for the audit log.
fn elide_payload(payload: &str) -> String {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, val) in map.iter_mut() {
                    match k.as_str() {
                        "sealed" => {
                            let id = val
                                .get("master_key_id")
                                .cloned()
                                .unwrap_or(serde_json::Value::Null);
                            *val = serde_json::json!({ "master_key_id": id, "ciphertext": "<elided>" });
                        }
                        "key_hash" | "wrapped_dek" | "ciphertext" | "secret" | "password_hash"
                        | "token_hash" => {
                            *val = serde_json::Value::String("<elided>".into());
                        }
                        _ => walk(val),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(mut v) => {
            walk(&mut v);
            v.to_string()
        }
        Err(_) => r#"{"error":"payload cannot be parsed; elided"}"#.to_string(),
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
            _poller: AbortOnDrop(poller),
        })
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

    /// Swaps the master keyring (e.g. after the key file gained a new active key); follow with
    /// [`ControlPlane::rotate_master_key`].
    pub fn set_keyring(&self, keyring: Arc<MasterKeyring>) {
        *self.keyring.write().unwrap_or_else(PoisonError::into_inner) = keyring;
    }

    /// Remembers the master key file the keyring was loaded from, so that
    /// [`ControlPlane::rotate_master_key_from_file`] (the `RotateMasterKey` RPC) reads it again.
    #[must_use]
    pub fn with_master_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.master_key_file = Some(path.into());
        self
    }

    /// The master key file given with [`ControlPlane::with_master_key_file`], if any.
    pub fn master_key_file(&self) -> Option<&Path> {
        self.master_key_file.as_deref()
    }

    /// Reads the master key file again (when there is one) and swaps the keyring in. Refuses
    /// (`FAILED_PRECONDITION`, keyring unchanged) a file that cannot be read or parsed, or that
    /// lacks a master key some provider key is still sealed under. Returns whether it reloaded.
    pub async fn reload_master_key_file(&self) -> Result<bool> {
        let Some(path) = &self.master_key_file else {
            return Ok(false);
        };
        let keyring = MasterKeyring::load(path).map_err(|e| {
            Error::FailedPrecondition(format!(
                "cannot reload the master key file: {e}. The keyring in use is unchanged; fix the file and retry"
            ))
        })?;
        self.catch_up().await?;
        let state = self.state();
        let mut missing: std::collections::BTreeMap<&str, usize> = Default::default();
        for p in state.provider_keys.values() {
            if let Some(sealed) = &p.sealed {
                if !keyring.key_ids().any(|id| id == sealed.master_key_id) {
                    *missing.entry(sealed.master_key_id.as_str()).or_default() += 1;
                }
            }
        }
        if !missing.is_empty() {
            let list = missing
                .iter()
                .map(|(id, n)| format!("`{id}` ({n} provider keys)"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::FailedPrecondition(format!(
                "the master key file {} lacks master keys still in use: {list}. Keep their lines (as `key_id=hex`, after the new active key) until `flex admin rotate-master-key` has re-sealed every provider key; the keyring in use is unchanged",
                path.display()
            )));
        }
        tracing::info!(
            path = %path.display(),
            active_key_id = keyring.active_key_id(),
            "master key file reloaded"
        );
        self.set_keyring(Arc::new(keyring));
        Ok(true)
    }

    /// Master-key rotation as operators run it (`flex admin rotate-master-key`, the
    /// `RotateMasterKey` RPC): reloads the master key file ([`ControlPlane::reload_master_key_file`]),
    /// then re-seals every provider key under its active key ([`ControlPlane::rotate_master_key`]).
    /// Idempotent: run it again at any time.
    ///
    /// The procedure, without downtime:
    /// 1. Generate a key (`openssl rand -hex 32`) and add it as the **first** line of the master
    ///    key file, as `key_id=hex` (e.g. `mk-2026-11=…`). Keep the old key on a later line: the
    ///    first line seals, every line opens. (A bare hex line's id is its fingerprint, which is
    ///    what the provider keys sealed under it record, so leave an old bare line as it is.)
    /// 2. Give every proxy (`flex proxy --master-key-file`) the new file. No restart: a proxy (and
    ///    `flex up`'s) re-reads its file when a snapshot names a key id it lacks, so the new line
    ///    must be in the file before secrets are sealed under it. With several control-plane
    ///    instances, update each one's file too.
    /// 3. Run `flex admin rotate-master-key` (against each control-plane instance): the control
    ///    plane reads the file again, seals new secrets under the new key from then on, and
    ///    re-wraps every provider key under it (`ProviderKeyRewrapped` events; proxies get them in
    ///    the next snapshot). It reports `resealed` and `already_current`.
    /// 4. Once it reports `resealed: 0`, drop the old line from every file (proxies at their next
    ///    restart). A reload refuses a file that lacks a key still in use, so dropping it too early
    ///    cannot strand a secret.
    pub async fn rotate_master_key_from_file(&self, meta: &Metadata) -> Result<RotationReport> {
        let reloaded = self.reload_master_key_file().await?;
        let mut report = self.rotate_master_key(meta).await?;
        report.key_file_reloaded = reloaded;
        Ok(report)
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
            .unwrap_or_else(|| Self::full_update(to))
    }

    /// The delta half of [`ControlPlane::update_between`]: `None` when a full snapshot is needed.
    pub fn delta_update(&self, from_version: u64, to: &Published) -> Option<pb::SnapshotUpdate> {
        let d = (from_version > 0)
            .then(|| self.projection.delta(from_version, to))
            .flatten()
            .filter(|d| delta_entries(d) <= to.content().len())?;
        Some(pb::SnapshotUpdate {
            version: to.version,
            kind: Some(pb::snapshot_update::Kind::Delta(d)),
        })
    }

    /// The full snapshot of `to` as an update (O(entries): built once per version, then copied).
    pub fn full_update(to: &Published) -> pb::SnapshotUpdate {
        pb::SnapshotUpdate {
            version: to.version,
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

    fn api_key_view(&self, key_id: &str) -> Result<apb::ApiKey> {
        self.state()
            .api_keys
            .get(key_id)
            .map(|k| k.to_admin(timefmt::now()))
            .ok_or_else(|| Error::Internal(format!("api key {key_id} missing from the projection")))
    }

    // ----- commands -----------------------------------------------------------------------

    /// Creates an org. With an idempotency key, a retry returns the first org (`replayed`).
    pub async fn create_org(
        &self,
        meta: &Metadata,
        name: &str,
        idempotency_key: Option<&str>,
    ) -> Result<CreatedOrg> {
        let name = domain::validate_org_name(name)?;
        let key = domain::validate_idempotency_key(idempotency_key.unwrap_or(""))?;
        let fp = fingerprint(&["CreateOrg", &name]);
        let mut last_err = None;
        for _ in 0..IDEMPOTENT_ATTEMPTS {
            if let Some(k) = &key {
                if let Some(org_id) = self.idempotency_lookup(k, "CreateOrg", &fp).await? {
                    self.catch_up().await?;
                    let org = self.org_or_not_found(&self.state(), &org_id)?;
                    return Ok(CreatedOrg {
                        org,
                        replayed: true,
                    });
                }
            }
            let org_id = domain::new_org_id();
            let event = Event::OrgCreated {
                org_id: org_id.clone(),
                name: name.clone(),
            };
            let idem = key
                .as_deref()
                .map(|k| idempotency_record(k, "CreateOrg", &org_id, &fp));
            match self
                .store
                .append_with_idempotency(
                    &domain::org_stream(&org_id),
                    0,
                    &[event.to_new()?],
                    meta,
                    idem.as_ref(),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(org_id, request_id = %meta.request_id, "org created");
                    self.catch_up().await?;
                    let org = self.org_or_not_found(&self.state(), &org_id)?;
                    return Ok(CreatedOrg {
                        org,
                        replayed: false,
                    });
                }
                Err(e @ (StoreError::Conflict { .. } | StoreError::IdempotencyKeyTaken { .. })) => {
                    last_err = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err.map_or_else(
            || Error::Internal("create_org retries exhausted".into()),
            Error::from,
        ))
    }

    pub async fn rename_org(&self, meta: &Metadata, org_id: &str, name: &str) -> Result<apb::Org> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let name = domain::validate_org_name(name)?;
        let stream = domain::org_stream(&org_id);
        let org = self.load::<OrgAggregate>(&stream).await?;
        if let Some(event) = org.state.rename(&org_id, &name)? {
            self.append(&stream, org.version, &event, meta).await?;
        } else {
            self.catch_up().await?;
        }
        self.org_or_not_found(&self.state(), &org_id)
    }

    pub async fn suspend_org(&self, meta: &Metadata, org_id: &str) -> Result<apb::Org> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let stream = domain::org_stream(&org_id);
        let org = self.load::<OrgAggregate>(&stream).await?;
        let event = org.state.suspend(&org_id)?;
        self.append(&stream, org.version, &event, meta).await?;
        self.org_or_not_found(&self.state(), &org_id)
    }

    pub async fn reactivate_org(&self, meta: &Metadata, org_id: &str) -> Result<apb::Org> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let stream = domain::org_stream(&org_id);
        let org = self.load::<OrgAggregate>(&stream).await?;
        let event = org.state.reactivate(&org_id)?;
        self.append(&stream, org.version, &event, meta).await?;
        self.org_or_not_found(&self.state(), &org_id)
    }

    /// Creates an API key for an active org; the secret is in the result only this once.
    /// `expires_at`: optional RFC 3339 time in the future.
    pub async fn create_api_key(
        &self,
        meta: &Metadata,
        org_id: &str,
        name: &str,
        expires_at: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<CreatedApiKey> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let name = domain::validate_key_name(name)?;
        let expires = domain::parse_time("expires_at", expires_at.unwrap_or(""))?;
        if let Some(t) = expires {
            if t <= timefmt::now() {
                return Err(Error::InvalidArgument(format!(
                    "expires_at {} is in the past; give a future RFC 3339 time, e.g. 2030-01-01T00:00:00Z",
                    timefmt::format(t)
                )));
            }
        }
        let expires = expires.map(timefmt::format);
        let key = domain::validate_idempotency_key(idempotency_key.unwrap_or(""))?;
        let fp = fingerprint(&[
            "CreateApiKey",
            &org_id,
            &name,
            expires.as_deref().unwrap_or(""),
        ]);
        let mut last_err = None;
        for _ in 0..IDEMPOTENT_ATTEMPTS {
            if let Some(k) = &key {
                if let Some(key_id) = self.idempotency_lookup(k, "CreateApiKey", &fp).await? {
                    self.catch_up().await?;
                    return Ok(CreatedApiKey {
                        key: self.api_key_view(&key_id)?,
                        secret: None,
                        replayed: true,
                    });
                }
            }
            let org = self
                .load::<OrgAggregate>(&domain::org_stream(&org_id))
                .await?;
            org.state.check_can_create_key(&org_id)?;
            let secret = keys::generate();
            let key_id = domain::new_key_id();
            let event = Event::ApiKeyCreated {
                key_id: key_id.clone(),
                org_id: org_id.clone(),
                name: name.clone(),
                key_hash: keys::hash(&secret),
                hint: keys::hint(&secret),
                expires_at: expires.clone(),
            };
            let idem = key
                .as_deref()
                .map(|k| idempotency_record(k, "CreateApiKey", &key_id, &fp));
            match self
                .store
                .append_with_idempotency(
                    &domain::api_key_stream(&key_id),
                    0,
                    &[event.to_new()?],
                    meta,
                    idem.as_ref(),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(key_id, org_id, request_id = %meta.request_id, "api key created");
                    self.catch_up().await?;
                    return Ok(CreatedApiKey {
                        key: self.api_key_view(&key_id)?,
                        secret: Some(SecretString::from(secret)),
                        replayed: false,
                    });
                }
                Err(e @ (StoreError::Conflict { .. } | StoreError::IdempotencyKeyTaken { .. })) => {
                    last_err = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err.map_or_else(
            || Error::Internal("create_api_key retries exhausted".into()),
            Error::from,
        ))
    }

    /// Revokes an API key (it leaves the next snapshot). Revoking a revoked key fails.
    pub async fn revoke_api_key(
        &self,
        meta: &Metadata,
        key_id: &str,
        reason: &str,
    ) -> Result<apb::ApiKey> {
        let key_id = domain::validate_id("key_id", key_id, "key_0190…")?;
        let reason = domain::validate_reason(reason)?;
        let stream = domain::api_key_stream(&key_id);
        let key = self.load::<ApiKeyAggregate>(&stream).await?;
        let event = key.state.revoke(&key_id, &reason)?;
        self.append(&stream, key.version, &event, meta).await?;
        self.api_key_view(&key_id)
    }

    /// Seals `secret` under the active master key and records it for (org, provider).
    pub async fn set_provider_key(
        &self,
        meta: &Metadata,
        org_id: &str,
        provider: &str,
        secret: &SecretString,
    ) -> Result<apb::ProviderKey> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let provider = domain::parse_provider(provider)?.as_str();
        let secret = domain::validate_secret(secret.expose_secret())?;
        let org = self
            .load::<OrgAggregate>(&domain::org_stream(&org_id))
            .await?;
        org.state.require(&org_id)?;
        let stream = domain::provider_key_stream(&org_id, provider);
        let current = self.load::<ProviderKeyAggregate>(&stream).await?;
        let sealed = self.keyring().seal(&org_id, provider, &secret)?;
        let event = Event::ProviderKeySet {
            org_id: org_id.clone(),
            provider: provider.to_string(),
            last4: keys::last4(&secret),
            sealed,
        };
        drop(secret);
        self.append(&stream, current.version, &event, meta).await?;
        self.provider_key_view(&org_id, provider)
    }

    pub async fn remove_provider_key(
        &self,
        meta: &Metadata,
        org_id: &str,
        provider: &str,
    ) -> Result<apb::ProviderKey> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let provider = domain::parse_provider(provider)?.as_str();
        let stream = domain::provider_key_stream(&org_id, provider);
        let current = self.load::<ProviderKeyAggregate>(&stream).await?;
        let event = current.state.remove(&org_id, provider)?;
        self.append(&stream, current.version, &event, meta).await?;
        self.provider_key_view(&org_id, provider)
    }

    fn provider_key_view(&self, org_id: &str, provider: &str) -> Result<apb::ProviderKey> {
        self.state()
            .provider_keys
            .get(&(org_id.to_string(), provider.to_string()))
            .map(projection::ProviderKeyView::to_admin)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "provider key {org_id}/{provider} missing from the projection"
                ))
            })
    }

    /// Sets `active` or `past_due` (declarative: setting the current status records nothing).
    pub async fn set_billing_status(
        &self,
        meta: &Metadata,
        org_id: &str,
        status: &str,
    ) -> Result<apb::BillingAccount> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let status = BillingStatus::parse(status)?;
        let org = self
            .load::<OrgAggregate>(&domain::org_stream(&org_id))
            .await?;
        org.state.require(&org_id)?;
        let stream = domain::billing_stream(&org_id);
        let billing = self.load::<BillingAggregate>(&stream).await?;
        if let Some(event) = billing.state.set_status(&org_id, status) {
            self.append(&stream, billing.version, &event, meta).await?;
        } else {
            self.catch_up().await?;
        }
        self.billing_view(&org_id)
    }

    /// Adds or replaces a catalog entry for every proxy (through the snapshot).
    pub async fn set_model(
        &self,
        meta: &Metadata,
        entry: &pb::ModelEntry,
    ) -> Result<pb::ModelEntry> {
        let id = entry.id.trim();
        if id.is_empty() || id.len() > 100 || id.chars().any(char::is_whitespace) {
            return Err(Error::InvalidArgument(
                "model id must be 1-100 characters without spaces, e.g. id=gpt-9".into(),
            ));
        }
        let model = flex_shared::catalog::Model::from_proto(entry).map_err(|e| {
            Error::InvalidArgument(format!(
                "{e}; a model needs provider openai|anthropic|gemini and a standard price, e.g. `flex admin model set --id gpt-9 --provider openai --input-micros 1250000 --output-micros 10000000 --flex`"
            ))
        })?;
        if model.flex_capable && model.provider == flex_shared::catalog::Provider::Anthropic {
            return Err(Error::InvalidArgument(
                "Anthropic has no flex tier, so a claude model cannot be flex-capable; drop --flex"
                    .into(),
            ));
        }
        let stream = domain::model_stream(&model.id);
        let current = self.load::<domain::ModelAggregate>(&stream).await?;
        let proto = model.to_proto();
        self.append(
            &stream,
            current.version,
            &Event::ModelOverrideSet { model },
            meta,
        )
        .await?;
        Ok(proto)
    }

    /// The operator's catalog overrides.
    pub fn list_models(&self) -> Vec<pb::ModelEntry> {
        self.state().models.values().cloned().collect()
    }

    /// Re-seals every provider key that is not under the active master key (emits
    /// `ProviderKeyRewrapped`). Old master keys must still be in the keyring to open them.
    pub async fn rotate_master_key(&self, meta: &Metadata) -> Result<RotationReport> {
        self.catch_up().await?;
        let keyring = self.keyring();
        let active = keyring.active_key_id().to_string();
        let mut report = RotationReport {
            active_key_id: active.clone(),
            ..RotationReport::default()
        };
        let targets: Vec<(String, String)> = self
            .state()
            .provider_keys
            .values()
            .filter(|p| p.sealed.is_some())
            .map(|p| (p.org_id.clone(), p.provider.clone()))
            .collect();
        for (org_id, provider) in targets {
            let stream = domain::provider_key_stream(&org_id, &provider);
            let mut attempts = 0;
            loop {
                attempts += 1;
                let current = self.load::<ProviderKeyAggregate>(&stream).await?;
                let Some(sealed) = current.state.sealed.as_ref() else {
                    break; // removed meanwhile
                };
                if sealed.master_key_id == active {
                    report.already_current += 1;
                    break;
                }
                let event = Event::ProviderKeyRewrapped {
                    org_id: org_id.clone(),
                    provider: provider.clone(),
                    sealed: keyring.reseal(&org_id, &provider, sealed)?,
                };
                match self.append(&stream, current.version, &event, meta).await {
                    Ok(()) => {
                        report.resealed += 1;
                        break;
                    }
                    Err(Error::Conflict { .. }) if attempts < IDEMPOTENT_ATTEMPTS => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        tracing::info!(
            active_key_id = %active,
            resealed = report.resealed,
            already_current = report.already_current,
            "master key rotation done"
        );
        Ok(report)
    }

    // ----- queries (from the projection, caught up first) ---------------------------------

    pub async fn list_orgs(&self) -> Result<Vec<apb::Org>> {
        self.catch_up().await?;
        let state = self.state();
        Ok(state
            .orgs
            .keys()
            .filter_map(|id| state.org_admin(id))
            .collect())
    }

    pub async fn get_org(&self, org_id: &str) -> Result<apb::Org> {
        self.catch_up().await?;
        self.org_or_not_found(&self.state(), org_id)
    }

    pub async fn list_api_keys(&self, org_id: &str) -> Result<Vec<apb::ApiKey>> {
        self.catch_up().await?;
        let state = self.state();
        self.org_or_not_found(&state, org_id)?;
        let now = timefmt::now();
        Ok(state
            .api_keys
            .values()
            .filter(|k| k.org_id == org_id)
            .map(|k| k.to_admin(now))
            .collect())
    }

    pub async fn list_provider_keys(&self, org_id: &str) -> Result<Vec<apb::ProviderKey>> {
        self.catch_up().await?;
        let state = self.state();
        self.org_or_not_found(&state, org_id)?;
        Ok(state
            .provider_keys
            .values()
            .filter(|p| p.org_id == org_id)
            .map(projection::ProviderKeyView::to_admin)
            .collect())
    }

    pub async fn get_billing(&self, org_id: &str) -> Result<apb::BillingAccount> {
        self.catch_up().await?;
        self.billing_view(org_id)
    }

    /// The org's billing account from the projection, invoice status as of now.
    fn billing_view(&self, org_id: &str) -> Result<apb::BillingAccount> {
        self.state()
            .billing_admin(org_id, timefmt::now())
            .ok_or_else(|| domain::not_found_org(org_id))
    }

    /// Ledger totals for an org over requests received in `[from, to)` (RFC 3339, optional).
    pub async fn get_usage(&self, org_id: &str, from: &str, to: &str) -> Result<apb::UsageSummary> {
        self.get_usage_grouped(org_id, from, to, "").await
    }

    /// Usage totals in `[from, to)`, plus one row per day, month, model or tier when `group_by`
    /// names one (empty: totals only).
    pub async fn get_usage_grouped(
        &self,
        org_id: &str,
        from: &str,
        to: &str,
        group_by: &str,
    ) -> Result<apb::UsageSummary> {
        let from = domain::parse_time("from", from)?;
        let to = domain::parse_time("to", to)?;
        if let (Some(f), Some(t)) = (from, to) {
            if f >= t {
                return Err(Error::InvalidArgument(
                    "`from` must be before `to` (the range is [from, to)), e.g. from=2025-01-01T00:00:00Z to=2025-02-01T00:00:00Z".into(),
                ));
            }
        }
        let group = match group_by {
            "" => None,
            "day" => Some(store::UsageGroupBy::Day),
            "month" => Some(store::UsageGroupBy::Month),
            "model" => Some(store::UsageGroupBy::Model),
            "tier" => Some(store::UsageGroupBy::Tier),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "`group_by` is \"{}\"; use day, month, model or tier (e.g. group_by=day)",
                    domain::clip(other)
                )))
            }
        };
        self.get_org(org_id).await?;
        let t = self.store.usage_summary(org_id, from, to).await?;
        let groups = match group {
            None => Vec::new(),
            Some(g) => self
                .store
                .usage_grouped(org_id, from, to, Some(g))
                .await?
                .into_iter()
                .map(|(key, t)| apb::UsageGroup {
                    key,
                    requests: t.requests,
                    input_tokens: t.input_tokens,
                    output_tokens: t.output_tokens,
                    cost_micros: t.cost_micros,
                    standard_cost_micros: t.standard_cost_micros,
                    savings_micros: t.standard_cost_micros.saturating_sub(t.cost_micros),
                    flex_requests: t.flex_requests,
                })
                .collect(),
        };
        Ok(apb::UsageSummary {
            org_id: org_id.to_string(),
            requests: t.requests,
            input_tokens: t.input_tokens,
            output_tokens: t.output_tokens,
            cost_micros: t.cost_micros,
            standard_cost_micros: t.standard_cost_micros,
            savings_micros: t.standard_cost_micros.saturating_sub(t.cost_micros),
            flex_requests: t.flex_requests,
            groups,
        })
    }

    /// The org's events (org, billing, provider keys, its API keys) in log order, readable, with
    /// hashes and ciphertexts elided.
    pub async fn list_audit_events(&self, org_id: &str) -> Result<Vec<apb::AuditEvent>> {
        self.catch_up().await?;
        let state = self.state();
        self.org_or_not_found(&state, org_id)?;
        let mut streams = vec![
            domain::org_stream(org_id),
            domain::billing_stream(org_id),
            domain::limits_stream(org_id, None),
        ];
        streams.extend(
            Provider::ALL
                .iter()
                .map(|p| domain::provider_key_stream(org_id, p.as_str())),
        );
        streams.extend(
            state
                .api_keys
                .values()
                .filter(|k| k.org_id == org_id)
                .flat_map(|k| {
                    [
                        domain::api_key_stream(&k.key_id),
                        domain::limits_stream(org_id, Some(&k.key_id)),
                    ]
                }),
        );
        let events = self.store.read_streams(&streams).await?;
        Ok(events
            .iter()
            .map(|e| apb::AuditEvent {
                seq: e.seq,
                stream_id: e.stream_id.clone(),
                stream_version: e.stream_version,
                event_type: e.event_type.clone(),
                schema_version: e.schema_version,
                payload_json: elide_payload(&e.payload),
                actor: e.actor.clone(),
                request_id: e.request_id.clone(),
                recorded_at: timefmt::format(e.recorded_at),
                summary: Event::from_stored(e).map_or_else(
                    |_| format!("{} (not readable by this build)", e.event_type),
                    |ev| ev.summary(),
                ),
            })
            .collect())
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

    /// Records usage events in the ledger, exactly once per request id. Returns how many were new.
    pub async fn record_usage(&self, events: &[UsageEvent]) -> Result<u64> {
        for (i, e) in events.iter().enumerate() {
            if e.request_id.trim().is_empty() || e.org_id.trim().is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "usage event {i} has an empty request_id or org_id; both are required"
                )));
            }
        }
        let inserted = self.store.insert_usage(events).await?;
        tracing::debug!(received = events.len(), inserted, "usage recorded");
        Ok(inserted)
    }

    /// Parses JSON usage events (all or nothing) and records them. Returns how many are now in
    /// the ledger from this batch, duplicates included (they were already counted).
    pub async fn report_usage(&self, events_json: &[String]) -> Result<u32> {
        let events = events_json
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::from_str::<UsageEvent>(s).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "events_json[{i}] is not a usage event ({e}); send the JSON of flex_shared::usage::UsageEvent, schema_version 1. Nothing in this batch was recorded"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.record_usage(&events).await?;
        u32::try_from(events.len())
            .map_err(|_| Error::InvalidArgument("too many usage events in one batch".into()))
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
