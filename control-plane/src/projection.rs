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
//!
//! This module holds the [`State`] and its fold; the read models and their admin API forms are in
//! `views`, the snapshot content and change records in `snapshot`, the live [`Projection`] that
//! publishes versions in `live`, and the dashboard's users, members and invites in [`accounts`].

use flex_shared::proto::control as pb;
use imbl::{OrdMap, OrdSet};
use time::OffsetDateTime;

use crate::domain::{Aggregate, BillingAggregate, Event, OrgStatus};
use crate::error::Result;
use crate::store::{Store, StoredEvent};
use crate::timefmt;

/// How many catch-ups' change records are kept for answering a reconnecting proxy with a delta.
pub const HISTORY: usize = 1024;
/// ... and at most this many changed entries across them (a bulk import is not kept for long).
pub const HISTORY_ENTRIES: usize = 1 << 20;
const BATCH: u32 = 1000;

pub mod accounts;
mod live;
mod snapshot;
mod views;

pub use accounts::{Accounts, InviteView, MemberView, UserView};
pub use live::{Projection, Published};
pub use snapshot::{Changes, SnapshotContent};
pub use views::{ApiKeyView, OrgView, ProviderKeyView};

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

    /// The snapshot at this state's version (canonical, hashed; `produced_at` = now). O(entries):
    /// the live path materializes it at most once per version ([`Published::full`]).
    pub fn snapshot(&self) -> pb::Snapshot {
        self.content
            .to_proto(self.last_seq, timefmt::format(timefmt::now()))
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
