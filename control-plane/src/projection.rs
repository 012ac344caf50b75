//! The in-memory read model folded from the whole log, and the snapshots proxies get.
//!
//! The projection is eventually consistent: it is rebuilt from scratch on start, then advanced by
//! tailing `read_after(last_seq)` after every command (so a command's response reads its own
//! write) and by a background poller (so several control planes on one Postgres converge). Both
//! paths run the same fold as a rebuild, so the live state always equals `rebuild()`.
//!
//! Snapshot version = the `seq` of the last event folded. Its content is a pure function of the
//! log up to that seq: API keys that are revoked, or expired as of the last event's time, are
//! absent (proxies also enforce `expires_at` in real time).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use flex_shared::crypto::Sealed;
use flex_shared::proto::admin as apb;
use flex_shared::proto::control as pb;
use flex_shared::snapshot;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::domain::{Aggregate, BillingAggregate, BillingStatus, Event, Invoice, OrgStatus};
use crate::error::Result;
use crate::store::{Store, StoredEvent};
use crate::timefmt;

/// How many past snapshots are kept for answering a reconnecting proxy with a delta.
pub const HISTORY: usize = 32;
const BATCH: u32 = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgView {
    pub org_id: String,
    pub name: String,
    pub status: OrgStatus,
    pub created_at: OffsetDateTime,
}

#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeyView {
    pub key_id: String,
    pub org_id: String,
    pub name: String,
    /// Hex SHA-256 of the key; goes into snapshots only.
    pub key_hash: String,
    pub hint: String,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    pub revoke_reason: Option<String>,
}

impl std::fmt::Debug for ApiKeyView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyView")
            .field("key_id", &self.key_id)
            .field("org_id", &self.org_id)
            .field("name", &self.name)
            .field("hint", &self.hint)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

impl ApiKeyView {
    /// `active`, `revoked` or `expired` at `now`.
    pub fn status_at(&self, now: OffsetDateTime) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|t| t <= now) {
            "expired"
        } else {
            "active"
        }
    }

    pub fn to_admin(&self, now: OffsetDateTime) -> apb::ApiKey {
        apb::ApiKey {
            key_id: self.key_id.clone(),
            org_id: self.org_id.clone(),
            name: self.name.clone(),
            hint: self.hint.clone(),
            status: self.status_at(now).to_string(),
            created_at: timefmt::format(self.created_at),
            revoked_at: self.revoked_at.map(timefmt::format).unwrap_or_default(),
            expires_at: self.expires_at.map(timefmt::format).unwrap_or_default(),
        }
    }
}

/// A provider key; `sealed` is `None` once removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderKeyView {
    pub org_id: String,
    pub provider: String,
    pub sealed: Option<Sealed>,
    pub last4: String,
    pub updated_at: OffsetDateTime,
}

impl ProviderKeyView {
    pub fn to_admin(&self) -> apb::ProviderKey {
        apb::ProviderKey {
            org_id: self.org_id.clone(),
            provider: self.provider.clone(),
            last4: self.last4.clone(),
            status: if self.sealed.is_some() {
                "set"
            } else {
                "removed"
            }
            .to_string(),
            master_key_id: self
                .sealed
                .as_ref()
                .map(|s| s.master_key_id.clone())
                .unwrap_or_default(),
            updated_at: timefmt::format(self.updated_at),
        }
    }
}

/// Everything the control plane knows, folded from the log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// The seq of the last event folded (the snapshot version).
    pub last_seq: u64,
    /// The time of that event.
    pub last_event_at: Option<OffsetDateTime>,
    pub orgs: BTreeMap<String, OrgView>,
    pub api_keys: BTreeMap<String, ApiKeyView>,
    /// By (org_id, provider).
    pub provider_keys: BTreeMap<(String, String), ProviderKeyView>,
    /// Billing accounts, folded exactly as commands fold them; orgs without an entry have the
    /// default account (`active`, the default plan and fee, no invoices).
    pub billing: BTreeMap<String, BillingAggregate>,
    /// Operator overrides of the model catalog (`ModelOverrideSet`), shipped in every snapshot.
    pub models: BTreeMap<String, pb::ModelEntry>,
    /// Events this build could not decode (seq), skipped so the rest still folds.
    pub undecodable: Vec<u64>,
}

impl State {
    /// Folds one event (events must come in seq order).
    pub fn apply(&mut self, stored: &StoredEvent) {
        self.last_seq = stored.seq;
        self.last_event_at = Some(stored.recorded_at);
        let at = stored.recorded_at;
        let event = match Event::from_stored(stored) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(seq = stored.seq, event_type = %stored.event_type, error = %e, "skipping undecodable event");
                self.undecodable.push(stored.seq);
                return;
            }
        };
        match event {
            Event::OrgCreated { org_id, name } => {
                self.orgs.insert(
                    org_id.clone(),
                    OrgView {
                        org_id,
                        name,
                        status: OrgStatus::Active,
                        created_at: at,
                    },
                );
            }
            Event::OrgRenamed { org_id, name } => {
                if let Some(o) = self.orgs.get_mut(&org_id) {
                    o.name = name;
                }
            }
            Event::OrgSuspended { org_id } => {
                if let Some(o) = self.orgs.get_mut(&org_id) {
                    o.status = OrgStatus::Suspended;
                }
            }
            Event::OrgReactivated { org_id } => {
                if let Some(o) = self.orgs.get_mut(&org_id) {
                    o.status = OrgStatus::Active;
                }
            }
            Event::ApiKeyCreated {
                key_id,
                org_id,
                name,
                key_hash,
                hint,
                expires_at,
            } => {
                self.api_keys.insert(
                    key_id.clone(),
                    ApiKeyView {
                        key_id,
                        org_id,
                        name,
                        key_hash,
                        hint,
                        created_at: at,
                        expires_at: expires_at.as_deref().and_then(timefmt::parse),
                        revoked_at: None,
                        revoke_reason: None,
                    },
                );
            }
            Event::ApiKeyRevoked { key_id, reason } => {
                if let Some(k) = self.api_keys.get_mut(&key_id) {
                    k.revoked_at = Some(at);
                    k.revoke_reason = Some(reason);
                }
            }
            Event::ProviderKeySet {
                org_id,
                provider,
                sealed,
                last4,
            } => {
                self.provider_keys.insert(
                    (org_id.clone(), provider.clone()),
                    ProviderKeyView {
                        org_id,
                        provider,
                        sealed: Some(sealed),
                        last4,
                        updated_at: at,
                    },
                );
            }
            Event::ProviderKeyRewrapped {
                org_id,
                provider,
                sealed,
            } => {
                if let Some(p) = self.provider_keys.get_mut(&(org_id, provider)) {
                    p.sealed = Some(sealed);
                    p.updated_at = at;
                }
            }
            Event::ProviderKeyRemoved { org_id, provider } => {
                if let Some(p) = self.provider_keys.get_mut(&(org_id, provider)) {
                    p.sealed = None;
                    p.last4.clear();
                    p.updated_at = at;
                }
            }
            Event::ModelOverrideSet { ref model } => {
                self.models.insert(model.id.clone(), model.to_proto());
            }
            Event::BillingStatusChanged { ref org_id, .. }
            | Event::BillingPlanSet { ref org_id, .. }
            | Event::InvoiceIssued { ref org_id, .. }
            | Event::PaymentRecorded { ref org_id, .. } => {
                self.billing
                    .entry(org_id.clone())
                    .or_default()
                    .apply(&event);
            }
        }
    }

    pub fn billing_status(&self, org_id: &str) -> BillingStatus {
        self.billing
            .get(org_id)
            .map(|b| b.status)
            .unwrap_or_default()
    }

    /// The org's fee on flex savings, basis points.
    pub fn fee_bps(&self, org_id: &str) -> u32 {
        self.billing
            .get(org_id)
            .map_or(crate::domain::DEFAULT_FEE_BPS, |b| b.fee_bps)
    }

    pub fn org_admin(&self, org_id: &str) -> Option<apb::Org> {
        self.orgs.get(org_id).map(|o| apb::Org {
            org_id: o.org_id.clone(),
            name: o.name.clone(),
            status: o.status.as_str().to_string(),
            created_at: timefmt::format(o.created_at),
        })
    }

    /// The org's billing account as the admin API shows it; invoice status is as of `now`.
    pub fn billing_admin(&self, org_id: &str, now: OffsetDateTime) -> Option<apb::BillingAccount> {
        let o = self.orgs.get(org_id)?;
        let default = BillingAggregate::default();
        let b = self.billing.get(org_id).unwrap_or(&default);
        Some(apb::BillingAccount {
            org_id: o.org_id.clone(),
            status: b.status.as_str().to_string(),
            plan: b.plan.clone(),
            fee_bps: b.fee_bps,
            balance_due_micros: b.balance_due_micros(),
            open_invoices: b
                .invoices
                .iter()
                .filter(|i| i.open_micros() > 0)
                .map(|i| invoice_admin(org_id, i, now))
                .collect(),
            invoiced_micros: b.invoiced_micros(),
            paid_micros: b.paid_micros,
            status_reason: b.status_reason.clone().unwrap_or_default(),
        })
    }

    /// One invoice as the admin API shows it.
    pub fn invoice_admin(
        &self,
        org_id: &str,
        invoice_id: &str,
        now: OffsetDateTime,
    ) -> Option<apb::Invoice> {
        self.billing
            .get(org_id)?
            .invoice(invoice_id)
            .map(|i| invoice_admin(org_id, i, now))
    }

    /// The snapshot at this state's version (canonical, hashed; `produced_at` = now).
    pub fn snapshot(&self) -> pb::Snapshot {
        let log_time = self.last_event_at;
        let mut s = pb::Snapshot {
            version: self.last_seq,
            content_hash: String::new(),
            orgs: self
                .orgs
                .values()
                .map(|o| pb::OrgEntry {
                    org_id: o.org_id.clone(),
                    name: o.name.clone(),
                    active: o.status == OrgStatus::Active,
                    billing_status: self.billing_status(&o.org_id).as_str().to_string(),
                    fee_bps: self.fee_bps(&o.org_id),
                })
                .collect(),
            api_keys: self
                .api_keys
                .values()
                .filter(|k| {
                    k.revoked_at.is_none()
                        && !matches!((k.expires_at, log_time), (Some(exp), Some(now)) if exp <= now)
                })
                .map(|k| pb::ApiKeyEntry {
                    key_id: k.key_id.clone(),
                    org_id: k.org_id.clone(),
                    key_hash: k.key_hash.clone(),
                    expires_at: k.expires_at.map_or(0, OffsetDateTime::unix_timestamp),
                })
                .collect(),
            provider_keys: self
                .provider_keys
                .values()
                .filter_map(|p| {
                    p.sealed.as_ref().map(|s| pb::ProviderKeyEntry {
                        org_id: p.org_id.clone(),
                        provider: p.provider.clone(),
                        sealed: Some(s.clone().into()),
                    })
                })
                .collect(),
            models: self.models.values().cloned().collect(),
            produced_at: timefmt::format(timefmt::now()),
        };
        snapshot::canonicalize(&mut s);
        s.content_hash = snapshot::content_hash(&s);
        s
    }
}

fn invoice_admin(org_id: &str, i: &Invoice, now: OffsetDateTime) -> apb::Invoice {
    apb::Invoice {
        invoice_id: i.invoice_id.clone(),
        org_id: org_id.to_string(),
        period_from: timefmt::format(i.period_from),
        period_to: timefmt::format(i.period_to),
        amount_micros: i.amount_micros,
        paid_micros: i.paid_micros,
        open_micros: i.open_micros(),
        due_at: timefmt::format(i.due_at),
        status: i.status_at(now).to_string(),
        savings_micros: i.savings_micros,
        fee_bps: i.fee_bps,
        issued_at: timefmt::format(i.issued_at),
    }
}

/// Folds the whole log into a fresh [`State`].
pub async fn rebuild(store: &Store) -> Result<State> {
    let mut state = State::default();
    loop {
        let batch = store.read_after(state.last_seq, BATCH).await?;
        if batch.is_empty() {
            return Ok(state);
        }
        for e in &batch {
            state.apply(e);
        }
    }
}

/// The live projection: state, the snapshot channel and a short history of snapshots.
pub struct Projection {
    store: Store,
    state: RwLock<Arc<State>>,
    /// Serializes catch-ups so no event is folded twice.
    catch_up: tokio::sync::Mutex<()>,
    tx: watch::Sender<Arc<pb::Snapshot>>,
    history: Mutex<VecDeque<Arc<pb::Snapshot>>>,
}

impl Projection {
    /// Rebuilds from the log and publishes the first snapshot.
    pub async fn open(store: Store) -> Result<Self> {
        let state = rebuild(&store).await?;
        let snap = Arc::new(state.snapshot());
        let (tx, _rx) = watch::channel(snap.clone());
        Ok(Self {
            store,
            state: RwLock::new(Arc::new(state)),
            catch_up: tokio::sync::Mutex::new(()),
            tx,
            history: Mutex::new(VecDeque::from([snap])),
        })
    }

    pub fn state(&self) -> Arc<State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn current(&self) -> Arc<pb::Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<pb::Snapshot>> {
        self.tx.subscribe()
    }

    /// The snapshot at exactly `version`, if still in the history ring.
    pub fn snapshot_at(&self, version: u64) -> Option<Arc<pb::Snapshot>> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .rev()
            .find(|s| s.version == version)
            .cloned()
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
        while !batch.is_empty() {
            for e in &batch {
                next.apply(e);
            }
            batch = self.store.read_after(next.last_seq, BATCH).await?;
        }
        let snap = Arc::new(next.snapshot());
        *self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        {
            let mut h = self
                .history
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            h.push_back(snap.clone());
            while h.len() > HISTORY {
                h.pop_front();
            }
        }
        tracing::debug!(version = snap.version, "published snapshot");
        self.tx.send_replace(snap);
        Ok(())
    }
}
