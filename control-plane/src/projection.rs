//! The in-memory read model folded from the whole log, and the snapshots proxies get.
//!
//! The projection is eventually consistent: it is rebuilt from scratch on start, then advanced by
//! tailing `read_after(last_seq)` after every command (so a command's response reads its own
//! write) and by a background poller (so several control planes on one Postgres converge). Both
//! paths run the same fold as a rebuild, so the live state always equals `rebuild()`.
//!
//! The state lives in persistent maps ([`imbl::OrdMap`]): a catch-up clones it in O(1) and
//! copies only the paths it changes, so readers keep their version while the next one is built.
//! The snapshot content ([`SnapshotContent`]) is part of the state and is kept current event by
//! event together with its content hash, and each catch-up records what it changed
//! ([`Changes`]); the delta a proxy gets is the merge of those records. Nothing on the command
//! path is proportional to the number of keys: a full snapshot is materialized only when a proxy
//! needs one, once per version ([`Published::full`]).
//!
//! Snapshot version = the `seq` of the last event folded. Its content is a pure function of the
//! log up to that seq: API keys that are revoked, or whose expiry an event's time has passed, are
//! absent (proxies also enforce `expires_at` in real time).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use flex_shared::crypto::Sealed;
use flex_shared::proto::admin as apb;
use flex_shared::proto::control as pb;
use flex_shared::snapshot::ContentHash;
use imbl::{OrdMap, OrdSet};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::domain::{Aggregate, BillingAggregate, BillingStatus, Event, Invoice, OrgStatus};
use crate::error::Result;
use crate::store::{Store, StoredEvent};
use crate::timefmt;

/// How many catch-ups' change records are kept for answering a reconnecting proxy with a delta.
pub const HISTORY: usize = 1024;
/// ... and at most this many changed entries across them (a bulk import is not kept for long).
pub const HISTORY_ENTRIES: usize = 1 << 20;
const BATCH: u32 = 1000;

pub mod accounts;
pub use accounts::{Accounts, InviteView, MemberView, UserView};

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
    pub orgs: OrdMap<String, OrgView>,
    pub api_keys: OrdMap<String, ApiKeyView>,
    /// By (org_id, provider).
    pub provider_keys: OrdMap<(String, String), ProviderKeyView>,
    /// Billing accounts, folded exactly as commands fold them; orgs without an entry have the
    /// default account (`active`, the default plan and fee, no invoices).
    pub billing: OrdMap<String, BillingAggregate>,
    /// Operator overrides of the model catalog (`ModelOverrideSet`), shipped in every snapshot.
    pub models: OrdMap<String, pb::ModelEntry>,
    /// Dashboard users, memberships and invites (never in a snapshot).
    pub accounts: Accounts,
    /// Limits by (org_id, key_id; empty = the org's own), shipped in every snapshot.
    pub limits: OrdMap<(String, String), pb::LimitEntry>,
    /// Events this build could not decode (seq), skipped so the rest still folds.
    pub undecodable: Vec<u64>,
    /// What the snapshot at `last_seq` holds, kept current as events fold.
    pub content: SnapshotContent,
    /// Keys in the snapshot that have an expiry, by (expires_at, key_id).
    expiring: OrdSet<(OffsetDateTime, String)>,
}

/// The entries of a snapshot, keyed as the canonical order sorts them, with its content hash.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotContent {
    pub orgs: OrdMap<String, pb::OrgEntry>,
    /// By key hash.
    pub api_keys: OrdMap<String, pb::ApiKeyEntry>,
    pub provider_keys: OrdMap<(String, String), pb::ProviderKeyEntry>,
    pub models: OrdMap<String, pb::ModelEntry>,
    pub limits: OrdMap<(String, String), pb::LimitEntry>,
    pub hash: ContentHash,
}

/// The snapshot entries a stretch of the log changed: the last value of each, `None` = removed.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    recording: bool,
    orgs: BTreeMap<String, pb::OrgEntry>,
    api_keys: BTreeMap<String, Option<pb::ApiKeyEntry>>,
    provider_keys: BTreeMap<(String, String), Option<pb::ProviderKeyEntry>>,
    models: BTreeMap<String, pb::ModelEntry>,
    limits: BTreeMap<(String, String), Option<pb::LimitEntry>>,
}

impl Changes {
    /// A record that keeps what it is told (the default one ignores it, for rebuilds).
    pub fn recording() -> Self {
        Self {
            recording: true,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.orgs.len()
            + self.api_keys.len()
            + self.provider_keys.len()
            + self.models.len()
            + self.limits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Folds `later` in: its values win.
    fn merge(&mut self, later: &Changes) {
        self.orgs
            .extend(later.orgs.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.api_keys
            .extend(later.api_keys.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.provider_keys.extend(
            later
                .provider_keys
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        self.models
            .extend(later.models.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.limits
            .extend(later.limits.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// The delta from `from_version` to the snapshot whose hash is `content_hash`.
    fn to_delta(&self, from_version: u64, content_hash: &str) -> pb::SnapshotDelta {
        let mut d = pb::SnapshotDelta {
            from_version,
            content_hash: content_hash.to_string(),
            produced_at: timefmt::format(timefmt::now()),
            upsert_orgs: self.orgs.values().cloned().collect(),
            upsert_models: self.models.values().cloned().collect(),
            ..Default::default()
        };
        for (hash, k) in &self.api_keys {
            match k {
                Some(k) => d.upsert_api_keys.push(k.clone()),
                None => d.remove_api_key_hashes.push(hash.clone()),
            }
        }
        for ((org_id, provider), p) in &self.provider_keys {
            match p {
                Some(p) => d.upsert_provider_keys.push(p.clone()),
                None => d.remove_provider_keys.push(pb::ProviderKeyRef {
                    org_id: org_id.clone(),
                    provider: provider.clone(),
                }),
            }
        }
        for ((org_id, key_id), l) in &self.limits {
            match l {
                Some(l) => d.upsert_limits.push(l.clone()),
                None => d.remove_limits.push(pb::LimitRef {
                    org_id: org_id.clone(),
                    key_id: key_id.clone(),
                }),
            }
        }
        d
    }
}

impl SnapshotContent {
    fn set_org(&mut self, e: pb::OrgEntry, changes: &mut Changes) {
        if let Some(old) = self.orgs.get(&e.org_id) {
            if *old == e {
                return;
            }
            self.hash.remove(3, old);
        }
        self.hash.add(3, &e);
        if changes.recording {
            changes.orgs.insert(e.org_id.clone(), e.clone());
        }
        self.orgs.insert(e.org_id.clone(), e);
    }

    fn put_key(&mut self, e: pb::ApiKeyEntry, changes: &mut Changes) {
        if let Some(old) = self.api_keys.get(&e.key_hash) {
            if *old == e {
                return;
            }
            self.hash.remove(4, old);
        }
        self.hash.add(4, &e);
        if changes.recording {
            changes.api_keys.insert(e.key_hash.clone(), Some(e.clone()));
        }
        self.api_keys.insert(e.key_hash.clone(), e);
    }

    fn remove_key(&mut self, key_hash: &str, changes: &mut Changes) {
        if let Some(old) = self.api_keys.remove(key_hash) {
            self.hash.remove(4, &old);
            if changes.recording {
                changes.api_keys.insert(key_hash.to_string(), None);
            }
        }
    }

    fn put_provider_key(&mut self, e: pb::ProviderKeyEntry, changes: &mut Changes) {
        let id = (e.org_id.clone(), e.provider.clone());
        if let Some(old) = self.provider_keys.get(&id) {
            if *old == e {
                return;
            }
            self.hash.remove(5, old);
        }
        self.hash.add(5, &e);
        if changes.recording {
            changes.provider_keys.insert(id.clone(), Some(e.clone()));
        }
        self.provider_keys.insert(id, e);
    }

    fn remove_provider_key(&mut self, id: &(String, String), changes: &mut Changes) {
        if let Some(old) = self.provider_keys.remove(id) {
            self.hash.remove(5, &old);
            if changes.recording {
                changes.provider_keys.insert(id.clone(), None);
            }
        }
    }

    fn set_model(&mut self, e: pb::ModelEntry, changes: &mut Changes) {
        if let Some(old) = self.models.get(&e.id) {
            if *old == e {
                return;
            }
            self.hash.remove(6, old);
        }
        self.hash.add(6, &e);
        if changes.recording {
            changes.models.insert(e.id.clone(), e.clone());
        }
        self.models.insert(e.id.clone(), e);
    }

    fn put_limits(&mut self, e: pb::LimitEntry, changes: &mut Changes) {
        let id = (e.org_id.clone(), e.key_id.clone());
        if let Some(old) = self.limits.get(&id) {
            if *old == e {
                return;
            }
            self.hash.remove(8, old);
        }
        self.hash.add(8, &e);
        if changes.recording {
            changes.limits.insert(id.clone(), Some(e.clone()));
        }
        self.limits.insert(id, e);
    }

    fn remove_limits(&mut self, id: &(String, String), changes: &mut Changes) {
        if let Some(old) = self.limits.remove(id) {
            self.hash.remove(8, &old);
            if changes.recording {
                changes.limits.insert(id.clone(), None);
            }
        }
    }

    /// Entries in all (for choosing between a delta and a full snapshot).
    pub fn len(&self) -> usize {
        self.orgs.len()
            + self.api_keys.len()
            + self.provider_keys.len()
            + self.models.len()
            + self.limits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The protobuf snapshot (canonical: the maps iterate in canonical order).
    pub fn to_proto(&self, version: u64, produced_at: String) -> pb::Snapshot {
        pb::Snapshot {
            version,
            content_hash: self.hash.to_hex(),
            orgs: self.orgs.values().cloned().collect(),
            api_keys: self.api_keys.values().cloned().collect(),
            provider_keys: self.provider_keys.values().cloned().collect(),
            models: self.models.values().cloned().collect(),
            limits: self.limits.values().cloned().collect(),
            produced_at,
        }
    }
}

fn key_entry(k: &ApiKeyView) -> pb::ApiKeyEntry {
    pb::ApiKeyEntry {
        key_id: k.key_id.clone(),
        org_id: k.org_id.clone(),
        key_hash: k.key_hash.clone(),
        expires_at: k.expires_at.map_or(0, OffsetDateTime::unix_timestamp),
    }
}

impl State {
    /// Folds one event (events must come in seq order).
    pub fn apply(&mut self, stored: &StoredEvent) {
        self.apply_recording(stored, &mut Changes::default());
    }

    /// Folds one event and records in `changes` the snapshot entries it changed.
    pub fn apply_recording(&mut self, stored: &StoredEvent, changes: &mut Changes) {
        self.last_seq = stored.seq;
        self.last_event_at = Some(stored.recorded_at);
        let at = stored.recorded_at;
        match Event::from_stored(stored) {
            Ok(event) => self.fold(event, at, changes),
            Err(e) => {
                tracing::error!(seq = stored.seq, event_type = %stored.event_type, error = %e, "skipping undecodable event");
                self.undecodable.push(stored.seq);
            }
        }
        self.expire_until(at, changes);
    }

    fn fold(&mut self, event: Event, at: OffsetDateTime, changes: &mut Changes) {
        match event {
            Event::OrgCreated { org_id, name } => {
                self.orgs.insert(
                    org_id.clone(),
                    OrgView {
                        org_id: org_id.clone(),
                        name,
                        status: OrgStatus::Active,
                        created_at: at,
                    },
                );
                self.refresh_org(&org_id, changes);
            }
            Event::OrgRenamed { org_id, name } => {
                if let Some(o) = self.orgs.get_mut(&org_id) {
                    o.name = name;
                }
                self.refresh_org(&org_id, changes);
            }
            Event::OrgSuspended { org_id } => {
                if let Some(o) = self.orgs.get_mut(&org_id) {
                    o.status = OrgStatus::Suspended;
                }
                self.refresh_org(&org_id, changes);
            }
            Event::OrgReactivated { org_id } => {
                if let Some(o) = self.orgs.get_mut(&org_id) {
                    o.status = OrgStatus::Active;
                }
                self.refresh_org(&org_id, changes);
            }
            Event::ApiKeyCreated {
                key_id,
                org_id,
                name,
                key_hash,
                hint,
                expires_at,
            } => {
                let view = ApiKeyView {
                    key_id: key_id.clone(),
                    org_id,
                    name,
                    key_hash,
                    hint,
                    created_at: at,
                    expires_at: expires_at.as_deref().and_then(timefmt::parse),
                    revoked_at: None,
                    revoke_reason: None,
                };
                match view.expires_at {
                    Some(exp) if exp <= at => {}
                    Some(exp) => {
                        self.expiring.insert((exp, key_id.clone()));
                        self.content.put_key(key_entry(&view), changes);
                    }
                    None => self.content.put_key(key_entry(&view), changes),
                }
                self.api_keys.insert(key_id, view);
            }
            Event::ApiKeyRevoked { key_id, reason } => {
                if let Some(k) = self.api_keys.get_mut(&key_id) {
                    k.revoked_at = Some(at);
                    k.revoke_reason = Some(reason);
                    let (hash, exp) = (k.key_hash.clone(), k.expires_at);
                    if let Some(exp) = exp {
                        self.expiring.remove(&(exp, key_id));
                    }
                    self.content.remove_key(&hash, changes);
                }
            }
            Event::ProviderKeySet {
                org_id,
                provider,
                sealed,
                last4,
            } => {
                self.content.put_provider_key(
                    pb::ProviderKeyEntry {
                        org_id: org_id.clone(),
                        provider: provider.clone(),
                        sealed: Some(sealed.clone().into()),
                    },
                    changes,
                );
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
                let id = (org_id, provider);
                if let Some(p) = self.provider_keys.get_mut(&id) {
                    p.sealed = Some(sealed.clone());
                    p.updated_at = at;
                    self.content.put_provider_key(
                        pb::ProviderKeyEntry {
                            org_id: id.0.clone(),
                            provider: id.1.clone(),
                            sealed: Some(sealed.into()),
                        },
                        changes,
                    );
                }
            }
            Event::ProviderKeyRemoved { org_id, provider } => {
                let id = (org_id, provider);
                if let Some(p) = self.provider_keys.get_mut(&id) {
                    p.sealed = None;
                    p.last4.clear();
                    p.updated_at = at;
                }
                self.content.remove_provider_key(&id, changes);
            }
            Event::ModelOverrideSet { ref model } => {
                let entry = model.to_proto();
                self.models.insert(model.id.clone(), entry.clone());
                self.content.set_model(entry, changes);
            }
            Event::UserRegistered { .. }
            | Event::UserEmailClaimed { .. }
            | Event::UserDisabled { .. }
            | Event::UserEnabled { .. }
            | Event::MemberAdded { .. }
            | Event::MemberRemoved { .. }
            | Event::InviteCreated { .. }
            | Event::InviteRevoked { .. } => self.fold_account(event, at),
            Event::LimitsSet {
                org_id,
                key_id,
                limits,
            } => {
                let entry = limits.to_entry(&org_id, key_id.as_deref());
                let id = (org_id, key_id.unwrap_or_default());
                self.limits.insert(id, entry.clone());
                self.content.put_limits(entry, changes);
            }
            Event::LimitsCleared { org_id, key_id } => {
                let id = (org_id, key_id.unwrap_or_default());
                self.limits.remove(&id);
                self.content.remove_limits(&id, changes);
            }
            Event::BillingStatusChanged { ref org_id, .. }
            | Event::BillingPlanSet { ref org_id, .. }
            | Event::InvoiceIssued { ref org_id, .. }
            | Event::PaymentRecorded { ref org_id, .. } => {
                let org_id = org_id.clone();
                self.billing
                    .entry(org_id.clone())
                    .or_default()
                    .apply(&event);
                self.refresh_org(&org_id, changes);
            }
        }
    }

    /// Puts the org's snapshot entry (org fields and billing) in line with the state.
    fn refresh_org(&mut self, org_id: &str, changes: &mut Changes) {
        let Some(o) = self.orgs.get(org_id) else {
            return;
        };
        let entry = pb::OrgEntry {
            org_id: o.org_id.clone(),
            name: o.name.clone(),
            active: o.status == OrgStatus::Active,
            billing_status: self.billing_status(org_id).as_str().to_string(),
            fee_bps: self.fee_bps(org_id),
        };
        self.content.set_org(entry, changes);
    }

    /// Takes the keys whose expiry is at or before `at` out of the snapshot.
    fn expire_until(&mut self, at: OffsetDateTime, changes: &mut Changes) {
        while let Some((exp, key_id)) = self.expiring.get_min().cloned() {
            if exp > at {
                return;
            }
            self.expiring.remove(&(exp, key_id.clone()));
            if let Some(k) = self.api_keys.get(&key_id) {
                let hash = k.key_hash.clone();
                self.content.remove_key(&hash, changes);
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

    /// The snapshot at this state's version (canonical, hashed; `produced_at` = now). O(entries):
    /// the live path materializes it at most once per version ([`Published::full`]).
    pub fn snapshot(&self) -> pb::Snapshot {
        self.content
            .to_proto(self.last_seq, timefmt::format(timefmt::now()))
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

/// A published snapshot version: cheap to clone and to hand to every watcher; the protobuf
/// snapshot is built from it only when a proxy needs a full one, and then once.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub content_hash: String,
    content: SnapshotContent,
    full: OnceLock<Arc<pb::Snapshot>>,
}

impl Published {
    fn new(state: &State) -> Self {
        Self {
            version: state.last_seq,
            content_hash: state.content.hash.to_hex(),
            content: state.content.clone(),
            full: OnceLock::new(),
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
