//! The domain: events (schema-versioned JSON in the log), stream ids, aggregates folded from
//! their stream, input validation, and the decisions commands make against current state.
//!
//! Aggregates: an org (`org-<org_id>`), an API key (`apikey-<key_id>`), a provider key
//! (`providerkey-<org_id>-<provider>`) and a billing account (`billing-<org_id>`). Their state is
//! only ever the fold of their own events.
//!
//! This module holds the events, the stream ids and the org aggregate; the other aggregates are
//! in `keys` (API and provider keys), `billing`, `limits` and [`accounts`] (users, members,
//! invites), the checks of what callers send in `validate`. Their items are re-exported here.

use flex_shared::crypto::Sealed;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{NewEvent, StoredEvent};

pub mod accounts;
mod billing;
mod keys;
mod limits;
mod validate;

pub use accounts::{
    normalize_email, user_email_stream, user_stream, EmailClaimAggregate, Role, UserAggregate,
};
pub use billing::{
    fee_micros, format_micros, validate_fee_bps, validate_plan, BillingAggregate, BillingStatus,
    Invoice, DEFAULT_FEE_BPS, DEFAULT_PAYMENT_TERMS_DAYS, DEFAULT_PLAN, MAX_FEE_BPS,
};
pub use keys::{ApiKeyAggregate, ProviderKeyAggregate};
pub use limits::{limit_scope_name, LimitChanges, LimitValues, LimitsAggregate, MAX_LIMIT};
pub use validate::{
    clip, not_found_org, parse_provider, parse_time, validate_id, validate_idempotency_key,
    validate_key_name, validate_org_name, validate_reason, validate_secret,
};

/// Schema version of every event type below.
pub const SCHEMA_VERSION: u32 = 1;

pub fn org_stream(org_id: &str) -> String {
    format!("org-{org_id}")
}

pub fn api_key_stream(key_id: &str) -> String {
    format!("apikey-{key_id}")
}

pub fn provider_key_stream(org_id: &str, provider: &str) -> String {
    format!("providerkey-{org_id}-{provider}")
}

pub fn billing_stream(org_id: &str) -> String {
    format!("billing-{org_id}")
}

pub fn model_stream(model_id: &str) -> String {
    format!("model-{model_id}")
}

/// The stream of an org's own limits (`key_id` None) or of one of its keys' limits.
pub fn limits_stream(org_id: &str, key_id: Option<&str>) -> String {
    match key_id {
        None => format!("limits-{org_id}"),
        Some(k) => format!("limits-{org_id}-{k}"),
    }
}

/// A catalog override's stream: only its version matters (last write wins).
#[derive(Debug, Default)]
pub struct ModelAggregate;

impl Aggregate for ModelAggregate {
    fn apply(&mut self, _e: &Event) {}
}

/// A new org id, `org_` + a time-ordered UUID.
pub fn new_org_id() -> String {
    format!("org_{}", uuid::Uuid::now_v7().simple())
}

/// A new API key id, `key_` + a time-ordered UUID.
pub fn new_key_id() -> String {
    format!("key_{}", uuid::Uuid::now_v7().simple())
}

/// A new invoice id, `inv_` + a time-ordered UUID.
pub fn new_invoice_id() -> String {
    format!("inv_{}", uuid::Uuid::now_v7().simple())
}

/// A new payment id, `pay_` + a time-ordered UUID.
pub fn new_payment_id() -> String {
    format!("pay_{}", uuid::Uuid::now_v7().simple())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrgStatus {
    Active,
    Suspended,
}

impl OrgStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrgStatus::Active => "active",
            OrgStatus::Suspended => "suspended",
        }
    }
}

/// Everything that ever happens to the aggregates. The JSON form carries a `type` tag; each type
/// is at [`SCHEMA_VERSION`]. Fields are only ever added (with serde defaults).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    OrgCreated {
        org_id: String,
        name: String,
    },
    OrgRenamed {
        org_id: String,
        name: String,
    },
    OrgSuspended {
        org_id: String,
    },
    OrgReactivated {
        org_id: String,
    },
    ApiKeyCreated {
        key_id: String,
        org_id: String,
        name: String,
        /// Hex SHA-256 of the whole key.
        key_hash: String,
        hint: String,
        /// RFC 3339.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<String>,
    },
    ApiKeyRevoked {
        key_id: String,
        reason: String,
    },
    ProviderKeySet {
        org_id: String,
        provider: String,
        sealed: Sealed,
        last4: String,
    },
    ProviderKeyRewrapped {
        org_id: String,
        provider: String,
        sealed: Sealed,
    },
    ProviderKeyRemoved {
        org_id: String,
        provider: String,
    },
    /// An operator's `set-status` (no `reason`), or the control plane's own change: the overdue
    /// check setting `past_due` (`overdue_invoice_ids` names the invoices it found overdue, each
    /// at most once), or a payment that settled every overdue invoice setting `active` again.
    BillingStatusChanged {
        org_id: String,
        status: BillingStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        overdue_invoice_ids: Vec<String>,
    },
    BillingPlanSet {
        org_id: String,
        plan: String,
        /// Fee on flex savings, basis points.
        fee_bps: u32,
    },
    /// `amount_micros` = `fee_micros(savings_micros, fee_bps)`, from the usage ledger over
    /// `[period_from, period_to)`. Times are RFC 3339 in the fixed form of
    /// [`timefmt::format`](crate::timefmt::format).
    InvoiceIssued {
        org_id: String,
        invoice_id: String,
        period_from: String,
        period_to: String,
        amount_micros: i64,
        due_at: String,
        issued_at: String,
        savings_micros: i64,
        fee_bps: u32,
    },
    /// Applied to `invoice_id` when given, else to open invoices oldest first.
    PaymentRecorded {
        org_id: String,
        payment_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        invoice_id: Option<String>,
        amount_micros: i64,
    },
    /// An operator's catalog entry, replacing the built-in one with the same id.
    ModelOverrideSet {
        model: flex_shared::catalog::Model,
    },
    /// A dashboard account (stream `user-<user_id>`). `password_hash` is an argon2id PHC
    /// string; the audit elides it.
    UserRegistered {
        user_id: String,
        /// Normalized ([`normalize_email`]).
        email: String,
        password_hash: String,
    },
    /// An email taken by one account: the stream `useremail-<sha256(email)>` holds at most this
    /// one event, so two sign-ups with the same email cannot both commit.
    UserEmailClaimed {
        user_id: String,
        email: String,
    },
    /// The account can no longer sign in; its sessions end.
    UserDisabled {
        user_id: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    UserEnabled {
        user_id: String,
    },
    /// On the org's stream. `invite_id` when the user joined by accepting an invite (which that
    /// uses up).
    MemberAdded {
        org_id: String,
        user_id: String,
        role: Role,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        invite_id: Option<String>,
    },
    MemberRemoved {
        org_id: String,
        user_id: String,
    },
    /// An owner invited `email` (on the org's stream). The link carries a secret whose SHA-256 is
    /// `token_hash` (the audit elides it); it works once, for that email, until `expires_at`.
    InviteCreated {
        org_id: String,
        invite_id: String,
        email: String,
        role: Role,
        token_hash: String,
        /// RFC 3339.
        expires_at: String,
    },
    InviteRevoked {
        org_id: String,
        invite_id: String,
    },
    /// The whole set of limits of an org (`key_id` absent) or of one of its API keys.
    LimitsSet {
        org_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
        limits: LimitValues,
    },
    /// Every limit of the scope removed.
    LimitsCleared {
        org_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
    },
}

/// Debug shows the readable summary only: never a key hash or a ciphertext.
impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.event_type(), self.summary())
    }
}

impl Event {
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::OrgCreated { .. } => "OrgCreated",
            Event::OrgRenamed { .. } => "OrgRenamed",
            Event::OrgSuspended { .. } => "OrgSuspended",
            Event::OrgReactivated { .. } => "OrgReactivated",
            Event::ApiKeyCreated { .. } => "ApiKeyCreated",
            Event::ApiKeyRevoked { .. } => "ApiKeyRevoked",
            Event::ProviderKeySet { .. } => "ProviderKeySet",
            Event::ProviderKeyRewrapped { .. } => "ProviderKeyRewrapped",
            Event::ProviderKeyRemoved { .. } => "ProviderKeyRemoved",
            Event::BillingStatusChanged { .. } => "BillingStatusChanged",
            Event::BillingPlanSet { .. } => "BillingPlanSet",
            Event::InvoiceIssued { .. } => "InvoiceIssued",
            Event::PaymentRecorded { .. } => "PaymentRecorded",
            Event::ModelOverrideSet { .. } => "ModelOverrideSet",
            Event::UserRegistered { .. } => "UserRegistered",
            Event::UserEmailClaimed { .. } => "UserEmailClaimed",
            Event::UserDisabled { .. } => "UserDisabled",
            Event::UserEnabled { .. } => "UserEnabled",
            Event::MemberAdded { .. } => "MemberAdded",
            Event::MemberRemoved { .. } => "MemberRemoved",
            Event::InviteCreated { .. } => "InviteCreated",
            Event::InviteRevoked { .. } => "InviteRevoked",
            Event::LimitsSet { .. } => "LimitsSet",
            Event::LimitsCleared { .. } => "LimitsCleared",
        }
    }

    pub fn schema_version(&self) -> u32 {
        SCHEMA_VERSION
    }

    /// The row to append.
    pub fn to_new(&self) -> Result<NewEvent> {
        let payload = serde_json::to_string(self)
            .map_err(|e| Error::Internal(format!("cannot encode {}: {e}", self.event_type())))?;
        Ok(NewEvent {
            event_type: self.event_type().to_string(),
            schema_version: self.schema_version(),
            payload,
        })
    }

    /// Decodes a stored event (refusing schema versions newer than this build knows).
    pub fn from_stored(e: &StoredEvent) -> Result<Self> {
        if e.schema_version > SCHEMA_VERSION {
            return Err(Error::Internal(format!(
                "event {} ({}) has schema version {}, newer than this build ({SCHEMA_VERSION}); upgrade the control plane",
                e.seq, e.event_type, e.schema_version
            )));
        }
        serde_json::from_str(&e.payload).map_err(|err| {
            // Position and class only: serde's message may quote payload values.
            Error::Internal(format!(
                "event {} ({}) cannot be decoded ({:?} error at line {}, column {})",
                e.seq,
                e.event_type,
                err.classify(),
                err.line(),
                err.column()
            ))
        })
    }

    /// One readable line for the audit log; never a hash or ciphertext.
    pub fn summary(&self) -> String {
        match self {
            Event::OrgCreated { org_id, name } => format!("org {org_id} created (name: {name:?})"),
            Event::OrgRenamed { org_id, name } => format!("org {org_id} renamed to {name:?}"),
            Event::OrgSuspended { org_id } => format!("org {org_id} suspended"),
            Event::OrgReactivated { org_id } => format!("org {org_id} reactivated"),
            Event::ApiKeyCreated {
                key_id,
                org_id,
                name,
                hint,
                expires_at,
                ..
            } => {
                let expiry = expires_at
                    .as_deref()
                    .map(|t| format!(", expires {t}"))
                    .unwrap_or_default();
                format!(
                    "api key {key_id} created for org {org_id} (name: {name:?}, {hint}{expiry})"
                )
            }
            Event::ApiKeyRevoked { key_id, reason } if reason.is_empty() => {
                format!("api key {key_id} revoked (no reason given)")
            }
            Event::ApiKeyRevoked { key_id, reason } => {
                format!("api key {key_id} revoked (reason: {reason})")
            }
            Event::ProviderKeySet {
                provider,
                sealed,
                last4,
                ..
            } => format!(
                "{provider} provider key set (…{last4}, sealed with master key {})",
                sealed.master_key_id
            ),
            Event::ProviderKeyRewrapped {
                provider, sealed, ..
            } => format!(
                "{provider} provider key re-wrapped under master key {}",
                sealed.master_key_id
            ),
            Event::ProviderKeyRemoved { provider, .. } => {
                format!("{provider} provider key removed")
            }
            Event::BillingStatusChanged {
                status,
                reason: None,
                ..
            } => format!("billing status set to {}", status.as_str()),
            Event::BillingStatusChanged {
                status,
                reason: Some(reason),
                ..
            } => format!("billing status set to {}: {reason}", status.as_str()),
            Event::BillingPlanSet { plan, fee_bps, .. } => {
                format!("billing plan set to {plan} (fee {fee_bps} bps of flex savings)")
            }
            Event::InvoiceIssued {
                invoice_id,
                period_from,
                period_to,
                amount_micros,
                due_at,
                savings_micros,
                fee_bps,
                ..
            } => format!(
                "invoice {invoice_id} issued for [{period_from}, {period_to}): {} ({fee_bps} bps of {} flex savings), due {due_at}",
                format_micros(*amount_micros),
                format_micros(*savings_micros)
            ),
            Event::PaymentRecorded {
                payment_id,
                invoice_id,
                amount_micros,
                ..
            } => {
                let target = invoice_id
                    .as_deref()
                    .map(|i| format!(" for invoice {i}"))
                    .unwrap_or_default();
                format!(
                    "payment {payment_id} of {} recorded{target}",
                    format_micros(*amount_micros)
                )
            }
            Event::ModelOverrideSet { model } => format!(
                "model {} set ({}, {}, standard {} in / {} out per Mtok)",
                model.id,
                model.provider,
                if model.flex_capable { "flex-capable" } else { "no flex" },
                format_micros(model.standard.input),
                format_micros(model.standard.output)
            ),
            Event::UserRegistered { user_id, email, .. } => {
                format!("user {user_id} registered ({email})")
            }
            Event::UserEmailClaimed { user_id, email } => {
                format!("email {email} claimed by user {user_id}")
            }
            Event::UserDisabled { user_id, reason } if reason.is_empty() => {
                format!("user {user_id} disabled")
            }
            Event::UserDisabled { user_id, reason } => {
                format!("user {user_id} disabled (reason: {reason})")
            }
            Event::UserEnabled { user_id } => format!("user {user_id} enabled again"),
            Event::MemberAdded {
                org_id,
                user_id,
                role,
                invite_id,
            } => {
                let by = invite_id
                    .as_deref()
                    .map(|i| format!(" (accepted invite {i})"))
                    .unwrap_or_default();
                format!(
                    "user {user_id} added to org {org_id} as {}{by}",
                    role.as_str()
                )
            }
            Event::MemberRemoved { org_id, user_id } => {
                format!("user {user_id} removed from org {org_id}")
            }
            Event::InviteCreated {
                invite_id,
                email,
                role,
                expires_at,
                ..
            } => format!(
                "invite {invite_id} created for {email} as {}, valid until {expires_at}",
                role.as_str()
            ),
            Event::InviteRevoked { invite_id, .. } => format!("invite {invite_id} revoked"),
            Event::LimitsSet {
                org_id,
                key_id,
                limits,
            } => format!(
                "limits of {} set: {}",
                limit_scope_name(org_id, key_id.as_deref()),
                limits.describe()
            ),
            Event::LimitsCleared { org_id, key_id } => format!(
                "limits of {} cleared",
                limit_scope_name(org_id, key_id.as_deref())
            ),
        }
    }
}

/// State folded from one stream.
pub trait Aggregate: Default {
    fn apply(&mut self, e: &Event);
}

/// An aggregate and the stream version it was folded at (the expected version of the next append).
#[derive(Debug, Clone, Default)]
pub struct Loaded<A> {
    pub state: A,
    pub version: u64,
}

impl<A: Aggregate> Loaded<A> {
    /// Folds a stream's events.
    pub fn fold(events: &[StoredEvent]) -> Result<Self> {
        let mut out = Self::default();
        for e in events {
            out.state.apply(&Event::from_stored(e)?);
            out.version = e.stream_version;
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Default)]
pub struct OrgAggregate {
    pub exists: bool,
    pub name: String,
    pub suspended: bool,
    /// Dashboard users of the org, by user id.
    pub members: std::collections::BTreeMap<String, Role>,
    /// Invites by id ([`accounts::InviteState`]).
    pub invites: std::collections::BTreeMap<String, accounts::InviteState>,
}

impl Aggregate for OrgAggregate {
    fn apply(&mut self, e: &Event) {
        match e {
            Event::OrgCreated { name, .. } => {
                self.exists = true;
                self.name = name.clone();
            }
            Event::OrgRenamed { name, .. } => self.name = name.clone(),
            Event::OrgSuspended { .. } => self.suspended = true,
            Event::OrgReactivated { .. } => self.suspended = false,
            Event::MemberAdded { .. }
            | Event::MemberRemoved { .. }
            | Event::InviteCreated { .. }
            | Event::InviteRevoked { .. } => self.apply_membership(e),
            _ => {}
        }
    }
}

impl OrgAggregate {
    pub fn require(&self, org_id: &str) -> Result<()> {
        if self.exists {
            Ok(())
        } else {
            Err(not_found_org(org_id))
        }
    }

    /// Rename: `None` when the name is already that (nothing to record).
    pub fn rename(&self, org_id: &str, name: &str) -> Result<Option<Event>> {
        self.require(org_id)?;
        Ok((self.name != name).then(|| Event::OrgRenamed {
            org_id: org_id.to_string(),
            name: name.to_string(),
        }))
    }

    pub fn suspend(&self, org_id: &str) -> Result<Event> {
        self.require(org_id)?;
        if self.suspended {
            return Err(Error::FailedPrecondition(format!(
                "org {org_id} is already suspended; reactivate it with `flex admin org reactivate {org_id}`"
            )));
        }
        Ok(Event::OrgSuspended {
            org_id: org_id.to_string(),
        })
    }

    pub fn reactivate(&self, org_id: &str) -> Result<Event> {
        self.require(org_id)?;
        if !self.suspended {
            return Err(Error::FailedPrecondition(format!(
                "org {org_id} is not suspended, so there is nothing to reactivate"
            )));
        }
        Ok(Event::OrgReactivated {
            org_id: org_id.to_string(),
        })
    }

    /// API keys can only be created for an existing, active org.
    pub fn check_can_create_key(&self, org_id: &str) -> Result<()> {
        self.require(org_id)?;
        if self.suspended {
            return Err(Error::FailedPrecondition(format!(
                "org {org_id} is suspended, so it cannot get new API keys; reactivate it first (`flex admin org reactivate {org_id}`)"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn events_round_trip_through_json_with_a_type_tag() {
        let e = Event::BillingStatusChanged {
            org_id: "org_1".into(),
            status: BillingStatus::PastDue,
            reason: None,
            overdue_invoice_ids: Vec::new(),
        };
        let new = e.to_new().unwrap();
        assert_eq!(new.event_type, "BillingStatusChanged");
        assert!(new.payload.contains(r#""type":"BillingStatusChanged""#));
        assert!(new.payload.contains(r#""status":"past_due""#));
        let back: Event = serde_json::from_str(&new.payload).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn events_written_before_a_field_existed_still_decode() {
        let old: Event = serde_json::from_str(
            r#"{"type":"BillingStatusChanged","org_id":"o","status":"past_due"}"#,
        )
        .unwrap();
        assert_eq!(
            old,
            Event::BillingStatusChanged {
                org_id: "o".into(),
                status: BillingStatus::PastDue,
                reason: None,
                overdue_invoice_ids: Vec::new(),
            }
        );
        let new = old.to_new().unwrap();
        assert!(!new.payload.contains("reason"), "{}", new.payload);
        assert!(
            !new.payload.contains("overdue_invoice_ids"),
            "{}",
            new.payload
        );
    }

    #[test]
    fn aggregates_decide_against_their_state() {
        let mut org = OrgAggregate::default();
        assert!(matches!(org.suspend("o"), Err(Error::NotFound(_))));
        org.apply(&Event::OrgCreated {
            org_id: "o".into(),
            name: "n".into(),
        });
        assert!(org.rename("o", "n").unwrap().is_none());
        let s = org.suspend("o").unwrap();
        org.apply(&s);
        assert!(matches!(
            org.check_can_create_key("o"),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            org.suspend("o"),
            Err(Error::FailedPrecondition(_))
        ));

        let mut key = ApiKeyAggregate::default();
        assert!(matches!(key.revoke("k", ""), Err(Error::NotFound(_))));
        key.apply(&Event::ApiKeyCreated {
            key_id: "k".into(),
            org_id: "o".into(),
            name: "n".into(),
            key_hash: "h".into(),
            hint: "flex_live_ab…wxyz".into(),
            expires_at: None,
        });
        let r = key.revoke("k", "leaked").unwrap();
        key.apply(&r);
        assert!(matches!(
            key.revoke("k", ""),
            Err(Error::FailedPrecondition(_))
        ));
    }
}
