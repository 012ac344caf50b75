//! The domain: events (schema-versioned JSON in the log), stream ids, aggregates folded from
//! their stream, input validation, and the decisions commands make against current state.
//!
//! Aggregates: an org (`org-<org_id>`), an API key (`apikey-<key_id>`), a provider key
//! (`providerkey-<org_id>-<provider>`) and a billing account (`billing-<org_id>`). Their state is
//! only ever the fold of their own events.

use flex_shared::catalog::Provider;
use flex_shared::crypto::Sealed;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::store::{NewEvent, StoredEvent};
use crate::timefmt;

pub mod accounts;
pub use accounts::{
    normalize_email, user_email_stream, user_stream, EmailClaimAggregate, Role, UserAggregate,
};

/// Schema version of every event type below.
pub const SCHEMA_VERSION: u32 = 1;
/// The plan of a billing account no operator has set a plan for.
pub const DEFAULT_PLAN: &str = "flex";
/// Fee on flex savings, basis points (1000 = 10%), until an operator sets another.
pub const DEFAULT_FEE_BPS: u32 = 1000;
/// The highest fee: 10,000 basis points = 100% of the savings.
pub const MAX_FEE_BPS: u32 = 10_000;
/// Days from issuing an invoice to its due date when the operator gives none.
pub const DEFAULT_PAYMENT_TERMS_DAYS: i64 = 14;

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

/// The largest limit value: counters are compared in Redis's Lua, whose numbers are doubles
/// (integers are exact up to 2^53).
pub const MAX_LIMIT: u64 = (1 << 53) - 1;

/// The limits of one scope (an org, or one API key). 0 = no such limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitValues {
    #[serde(default)]
    pub rpm: u64,
    #[serde(default)]
    pub tpm: u64,
    #[serde(default)]
    pub concurrency: u64,
    #[serde(default)]
    pub daily_budget_micros: i64,
    #[serde(default)]
    pub monthly_budget_micros: i64,
}

impl LimitValues {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn to_entry(
        self,
        org_id: &str,
        key_id: Option<&str>,
    ) -> flex_shared::proto::control::LimitEntry {
        flex_shared::proto::control::LimitEntry {
            org_id: org_id.to_string(),
            key_id: key_id.unwrap_or_default().to_string(),
            rpm: self.rpm,
            tpm: self.tpm,
            concurrency: self.concurrency,
            daily_budget_micros: self.daily_budget_micros,
            monthly_budget_micros: self.monthly_budget_micros,
        }
    }

    /// `name=value` of each limit set, e.g. `rpm=300, daily_budget_micros=5000000`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("rpm", self.rpm as i128),
            ("tpm", self.tpm as i128),
            ("concurrency", self.concurrency as i128),
            ("daily_budget_micros", self.daily_budget_micros as i128),
            ("monthly_budget_micros", self.monthly_budget_micros as i128),
        ]
        .iter()
        .filter(|(_, v)| *v != 0)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// What a `SetLimits` changes: `None` leaves a limit as it is, `Some(0)` removes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitChanges {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u64>,
    pub daily_budget_micros: Option<i64>,
    pub monthly_budget_micros: Option<i64>,
}

impl LimitChanges {
    /// Checks the values and returns `current` with the changes applied.
    pub fn apply_to(&self, current: LimitValues) -> Result<LimitValues> {
        let example = "e.g. `flex admin limits set --org org_… --rpm 300 --daily-budget-micros 5000000` ($5.00 a day)";
        if self == &Self::default() {
            return Err(Error::InvalidArgument(format!(
                "no limit given: name at least one of rpm, tpm, concurrency, daily_budget_micros, monthly_budget_micros (0 removes that limit), {example}"
            )));
        }
        let count = |name: &str, v: Option<u64>| -> Result<Option<u64>> {
            match v {
                Some(n) if n > MAX_LIMIT => Err(Error::InvalidArgument(format!(
                    "{name} must be at most {MAX_LIMIT} (got {n}); 0 removes the limit, {example}"
                ))),
                other => Ok(other),
            }
        };
        let money = |name: &str, v: Option<i64>| -> Result<Option<i64>> {
            match v {
                Some(n) if n < 0 => Err(Error::InvalidArgument(format!(
                    "{name} is integer micro-dollars and cannot be negative (got {n}); 0 removes the budget, {example}"
                ))),
                Some(n) if n as u64 > MAX_LIMIT => Err(Error::InvalidArgument(format!(
                    "{name} must be at most {MAX_LIMIT} micro-dollars (got {n}), {example}"
                ))),
                other => Ok(other),
            }
        };
        let mut next = current;
        if let Some(v) = count("rpm", self.rpm)? {
            next.rpm = v;
        }
        if let Some(v) = count("tpm", self.tpm)? {
            next.tpm = v;
        }
        if let Some(v) = count("concurrency", self.concurrency)? {
            next.concurrency = v;
        }
        if let Some(v) = money("daily_budget_micros", self.daily_budget_micros)? {
            next.daily_budget_micros = v;
        }
        if let Some(v) = money("monthly_budget_micros", self.monthly_budget_micros)? {
            next.monthly_budget_micros = v;
        }
        Ok(next)
    }
}

/// The limits of one scope, folded from its `limits-…` stream.
#[derive(Debug, Clone, Default)]
pub struct LimitsAggregate {
    pub current: LimitValues,
}

impl Aggregate for LimitsAggregate {
    fn apply(&mut self, e: &Event) {
        match e {
            Event::LimitsSet { limits, .. } => self.current = *limits,
            Event::LimitsCleared { .. } => self.current = LimitValues::default(),
            _ => {}
        }
    }
}

impl LimitsAggregate {
    /// The event that records `changes` (`None` when nothing changes): `LimitsSet` with the
    /// whole new set, or `LimitsCleared` when no limit is left.
    pub fn set(
        &self,
        org_id: &str,
        key_id: Option<&str>,
        changes: &LimitChanges,
    ) -> Result<Option<Event>> {
        let next = changes.apply_to(self.current)?;
        if next == self.current {
            return Ok(None);
        }
        Ok(Some(if next.is_empty() {
            Event::LimitsCleared {
                org_id: org_id.to_string(),
                key_id: key_id.map(str::to_string),
            }
        } else {
            Event::LimitsSet {
                org_id: org_id.to_string(),
                key_id: key_id.map(str::to_string),
                limits: next,
            }
        }))
    }

    /// `LimitsCleared`, or `None` when there are no limits to clear.
    pub fn clear(&self, org_id: &str, key_id: Option<&str>) -> Option<Event> {
        (!self.current.is_empty()).then(|| Event::LimitsCleared {
            org_id: org_id.to_string(),
            key_id: key_id.map(str::to_string),
        })
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

/// Micro-dollars as a dollar amount with six decimals (`-` for negatives), integer arithmetic only.
pub fn format_micros(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}${}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

/// The flex fee on `savings_micros` at `fee_bps`: `savings × fee_bps / 10,000`, rounded up to the
/// next micro-dollar; no fee on zero or negative savings. `None` if it does not fit an `i64`.
pub fn fee_micros(savings_micros: i64, fee_bps: u32) -> Option<i64> {
    if savings_micros <= 0 || fee_bps == 0 {
        return Some(0);
    }
    let product = i128::from(savings_micros) * i128::from(fee_bps);
    let fee = (product + 9_999) / 10_000;
    i64::try_from(fee).ok()
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingStatus {
    #[default]
    Active,
    PastDue,
}

impl BillingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingStatus::Active => "active",
            BillingStatus::PastDue => "past_due",
        }
    }

    /// Parses `active` or `past_due`, with an operator-readable error.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "active" => Ok(BillingStatus::Active),
            "past_due" => Ok(BillingStatus::PastDue),
            other => Err(Error::InvalidArgument(format!(
                "billing status must be `active` or `past_due` (got {:?}), e.g. `flex admin billing set-status --org org_… past_due`",
                clip(other)
            ))),
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
    /// `[period_from, period_to)`. Times are RFC 3339 in the fixed form of [`timefmt::format`].
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

/// `org org_…` or `api key key_… (org org_…)`.
pub fn limit_scope_name(org_id: &str, key_id: Option<&str>) -> String {
    match key_id {
        None => format!("org {org_id}"),
        Some(k) => format!("api key {k} (org {org_id})"),
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

#[derive(Debug, Clone, Default)]
pub struct ApiKeyAggregate {
    pub org_id: Option<String>,
    pub revoked: bool,
}

impl Aggregate for ApiKeyAggregate {
    fn apply(&mut self, e: &Event) {
        match e {
            Event::ApiKeyCreated { org_id, .. } => self.org_id = Some(org_id.clone()),
            Event::ApiKeyRevoked { .. } => self.revoked = true,
            _ => {}
        }
    }
}

impl ApiKeyAggregate {
    pub fn revoke(&self, key_id: &str, reason: &str) -> Result<Event> {
        if self.org_id.is_none() {
            return Err(Error::NotFound(format!(
                "API key {key_id} not found; list an org's keys with `flex admin key list --org ORG_ID`"
            )));
        }
        if self.revoked {
            return Err(Error::FailedPrecondition(format!(
                "API key {key_id} is already revoked"
            )));
        }
        Ok(Event::ApiKeyRevoked {
            key_id: key_id.to_string(),
            reason: reason.to_string(),
        })
    }
}

#[derive(Clone, Default)]
pub struct ProviderKeyAggregate {
    pub sealed: Option<Sealed>,
}

impl std::fmt::Debug for ProviderKeyAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderKeyAggregate")
            .field("set", &self.sealed.is_some())
            .finish()
    }
}

impl Aggregate for ProviderKeyAggregate {
    fn apply(&mut self, e: &Event) {
        match e {
            Event::ProviderKeySet { sealed, .. } | Event::ProviderKeyRewrapped { sealed, .. } => {
                self.sealed = Some(sealed.clone());
            }
            Event::ProviderKeyRemoved { .. } => self.sealed = None,
            _ => {}
        }
    }
}

impl ProviderKeyAggregate {
    pub fn remove(&self, org_id: &str, provider: &str) -> Result<Event> {
        if self.sealed.is_none() {
            return Err(Error::NotFound(format!(
                "org {org_id} has no {provider} provider key to remove; see `flex admin provider-key list --org {org_id}`"
            )));
        }
        Ok(Event::ProviderKeyRemoved {
            org_id: org_id.to_string(),
            provider: provider.to_string(),
        })
    }
}

/// An invoice as folded from its `InvoiceIssued` and the payments applied to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub invoice_id: String,
    pub period_from: OffsetDateTime,
    pub period_to: OffsetDateTime,
    pub amount_micros: i64,
    pub paid_micros: i64,
    pub due_at: OffsetDateTime,
    pub issued_at: OffsetDateTime,
    pub savings_micros: i64,
    pub fee_bps: u32,
    /// The overdue check has recorded this invoice as overdue (it does so once per invoice).
    pub flagged_overdue: bool,
}

impl Invoice {
    /// What is still to pay.
    pub fn open_micros(&self) -> i64 {
        self.amount_micros.saturating_sub(self.paid_micros).max(0)
    }

    /// Unpaid (in part or whole) and due at or before `now`.
    pub fn is_overdue_at(&self, now: OffsetDateTime) -> bool {
        self.open_micros() > 0 && self.due_at <= now
    }

    /// `paid`, `overdue` or `open` at `now`.
    pub fn status_at(&self, now: OffsetDateTime) -> &'static str {
        if self.open_micros() == 0 {
            "paid"
        } else if self.is_overdue_at(now) {
            "overdue"
        } else {
            "open"
        }
    }
}

/// A billing account: plan and fee, status, invoices and payments.
///
/// Past due, the event-sourced way: the projection never consults the clock. The control plane's
/// overdue check ([`BillingAggregate::overdue_check`], run periodically and on demand) appends a
/// `BillingStatusChanged { past_due, overdue_invoice_ids }` when it finds an unpaid invoice whose
/// `due_at` has passed; the status (and so the snapshot proxies enforce) follows from that event,
/// and a rebuild yields the same status. Each invoice is flagged at most once, so an operator's
/// `set-status active` waives it for good. A payment that leaves no overdue invoice appends
/// `BillingStatusChanged { active }` in the same transaction, unless an operator had set
/// `past_due` by hand (then only an operator sets it back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingAggregate {
    pub status: BillingStatus,
    /// Why, when the control plane set the status itself.
    pub status_reason: Option<String>,
    /// An operator set `past_due` (payments then leave the status alone).
    pub manual_past_due: bool,
    pub plan: String,
    pub fee_bps: u32,
    /// In issue order.
    pub invoices: Vec<Invoice>,
    /// Sum of all payments.
    pub paid_micros: i64,
}

impl Default for BillingAggregate {
    fn default() -> Self {
        Self {
            status: BillingStatus::Active,
            status_reason: None,
            manual_past_due: false,
            plan: DEFAULT_PLAN.to_string(),
            fee_bps: DEFAULT_FEE_BPS,
            invoices: Vec::new(),
            paid_micros: 0,
        }
    }
}

/// A stored time that commands wrote in RFC 3339; the epoch if the log holds something else.
fn stored_time(s: &str) -> OffsetDateTime {
    timefmt::parse(s).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl Aggregate for BillingAggregate {
    fn apply(&mut self, e: &Event) {
        match e {
            Event::BillingStatusChanged {
                status,
                reason,
                overdue_invoice_ids,
                ..
            } => {
                self.status = *status;
                self.status_reason = reason.clone();
                if reason.is_none() {
                    self.manual_past_due = *status == BillingStatus::PastDue;
                }
                for inv in &mut self.invoices {
                    if overdue_invoice_ids.contains(&inv.invoice_id) {
                        inv.flagged_overdue = true;
                    }
                }
            }
            Event::BillingPlanSet { plan, fee_bps, .. } => {
                self.plan = plan.clone();
                self.fee_bps = *fee_bps;
            }
            Event::InvoiceIssued {
                invoice_id,
                period_from,
                period_to,
                amount_micros,
                due_at,
                issued_at,
                savings_micros,
                fee_bps,
                ..
            } => self.invoices.push(Invoice {
                invoice_id: invoice_id.clone(),
                period_from: stored_time(period_from),
                period_to: stored_time(period_to),
                amount_micros: *amount_micros,
                paid_micros: 0,
                due_at: stored_time(due_at),
                issued_at: stored_time(issued_at),
                savings_micros: *savings_micros,
                fee_bps: *fee_bps,
                flagged_overdue: false,
            }),
            Event::PaymentRecorded {
                invoice_id,
                amount_micros,
                ..
            } => {
                self.paid_micros = self.paid_micros.saturating_add(*amount_micros);
                fn pay(inv: &mut Invoice, left: &mut i64) {
                    let part = (*left).min(inv.open_micros()).max(0);
                    inv.paid_micros = inv.paid_micros.saturating_add(part);
                    *left -= part;
                }
                let mut left = *amount_micros;
                if let Some(id) = invoice_id {
                    if let Some(inv) = self.invoices.iter_mut().find(|i| &i.invoice_id == id) {
                        pay(inv, &mut left);
                    }
                }
                for inv in &mut self.invoices {
                    if left <= 0 {
                        break;
                    }
                    pay(inv, &mut left);
                }
            }
            _ => {}
        }
    }
}

impl BillingAggregate {
    /// Sum of what is still to pay on every invoice.
    pub fn balance_due_micros(&self) -> i64 {
        self.invoices
            .iter()
            .fold(0i64, |acc, i| acc.saturating_add(i.open_micros()))
    }

    /// Sum of every invoice's amount.
    pub fn invoiced_micros(&self) -> i64 {
        self.invoices
            .iter()
            .fold(0i64, |acc, i| acc.saturating_add(i.amount_micros))
    }

    pub fn invoice(&self, invoice_id: &str) -> Option<&Invoice> {
        self.invoices.iter().find(|i| i.invoice_id == invoice_id)
    }

    /// An operator's status change: `None` when the status already is `status` (declarative).
    pub fn set_status(&self, org_id: &str, status: BillingStatus) -> Option<Event> {
        (self.status != status).then(|| Event::BillingStatusChanged {
            org_id: org_id.to_string(),
            status,
            reason: None,
            overdue_invoice_ids: Vec::new(),
        })
    }

    /// `None` when the plan and fee already are these.
    pub fn set_plan(&self, org_id: &str, plan: &str, fee_bps: u32) -> Option<Event> {
        (self.plan != plan || self.fee_bps != fee_bps).then(|| Event::BillingPlanSet {
            org_id: org_id.to_string(),
            plan: plan.to_string(),
            fee_bps,
        })
    }

    /// Refuses a period that overlaps an invoice already issued (no usage is billed twice).
    pub fn check_period_is_free(&self, from: OffsetDateTime, to: OffsetDateTime) -> Result<()> {
        if let Some(i) = self
            .invoices
            .iter()
            .find(|i| i.period_from < to && from < i.period_to)
        {
            return Err(Error::FailedPrecondition(format!(
                "the period [{}, {}) overlaps invoice {} for [{}, {}); invoice only usage not billed yet, e.g. from {}",
                timefmt::format(from),
                timefmt::format(to),
                i.invoice_id,
                timefmt::format(i.period_from),
                timefmt::format(i.period_to),
                timefmt::format(i.period_to)
            )));
        }
        Ok(())
    }

    /// The events of a payment: `PaymentRecorded`, then `BillingStatusChanged { active }` when the
    /// account was past due by the overdue check and no invoice is overdue at `now` afterwards.
    pub fn record_payment(
        &self,
        org_id: &str,
        payment_id: &str,
        invoice_id: Option<&str>,
        amount_micros: i64,
        now: OffsetDateTime,
    ) -> Result<Vec<Event>> {
        if amount_micros <= 0 {
            return Err(Error::InvalidArgument(format!(
                "amount_micros must be a positive number of micro-dollars (got {amount_micros}), e.g. 12500000 for $12.50"
            )));
        }
        match invoice_id {
            Some(id) => {
                let inv = self.invoice(id).ok_or_else(|| {
                    Error::NotFound(format!(
                        "org {org_id} has no invoice {:?}; see its open invoices with `flex admin billing show --org {org_id}`",
                        clip(id)
                    ))
                })?;
                if inv.open_micros() == 0 {
                    return Err(Error::FailedPrecondition(format!(
                        "invoice {id} is already paid in full"
                    )));
                }
                if amount_micros > inv.open_micros() {
                    return Err(Error::FailedPrecondition(format!(
                        "the payment of {} exceeds the {} still open on invoice {id}; record at most {} micro-dollars for it",
                        format_micros(amount_micros),
                        format_micros(inv.open_micros()),
                        inv.open_micros()
                    )));
                }
            }
            None => {
                let due = self.balance_due_micros();
                if amount_micros > due {
                    return Err(Error::FailedPrecondition(format!(
                        "the payment of {} exceeds the balance due of {} for org {org_id}; record at most {due} micro-dollars (credits are not supported)",
                        format_micros(amount_micros),
                        format_micros(due)
                    )));
                }
            }
        }
        let payment = Event::PaymentRecorded {
            org_id: org_id.to_string(),
            payment_id: payment_id.to_string(),
            invoice_id: invoice_id.map(str::to_string),
            amount_micros,
        };
        let mut after = self.clone();
        after.apply(&payment);
        let mut events = vec![payment];
        if after.status == BillingStatus::PastDue
            && !after.manual_past_due
            && !after.invoices.iter().any(|i| i.is_overdue_at(now))
        {
            events.push(Event::BillingStatusChanged {
                org_id: org_id.to_string(),
                status: BillingStatus::Active,
                reason: Some(format!(
                    "payment {payment_id} settled every overdue invoice"
                )),
                overdue_invoice_ids: Vec::new(),
            });
        }
        Ok(events)
    }

    /// The overdue check: `BillingStatusChanged { past_due }` naming the invoices that are unpaid,
    /// due at or before `now` and not flagged before; `None` when there are none.
    pub fn overdue_check(&self, org_id: &str, now: OffsetDateTime) -> Option<Event> {
        let overdue: Vec<&Invoice> = self
            .invoices
            .iter()
            .filter(|i| i.is_overdue_at(now) && !i.flagged_overdue)
            .collect();
        let first = overdue.first()?;
        let more = match overdue.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        Some(Event::BillingStatusChanged {
            org_id: org_id.to_string(),
            status: BillingStatus::PastDue,
            reason: Some(format!(
                "invoice {} is overdue (due {}, {} unpaid){more}",
                first.invoice_id,
                timefmt::format(first.due_at),
                format_micros(first.open_micros())
            )),
            overdue_invoice_ids: overdue.iter().map(|i| i.invoice_id.clone()).collect(),
        })
    }

    /// Whether [`BillingAggregate::overdue_check`] would record anything at `now`.
    pub fn has_unflagged_overdue(&self, now: OffsetDateTime) -> bool {
        self.invoices
            .iter()
            .any(|i| i.is_overdue_at(now) && !i.flagged_overdue)
    }
}

pub fn not_found_org(org_id: &str) -> Error {
    Error::NotFound(format!(
        "org {:?} not found; list orgs with `flex admin org list`",
        clip(org_id)
    ))
}

/// At most 64 characters of user input, for echoing it in an error.
pub fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Org names: 1–100 characters, no control characters; surrounding whitespace is trimmed.
pub fn validate_org_name(name: &str) -> Result<String> {
    let n = name.trim();
    let len = n.chars().count();
    if len == 0 || len > 100 || has_control(n) {
        return Err(Error::InvalidArgument(format!(
            "org name must be 1-100 characters without control characters (got {len} characters), e.g. `flex admin org create \"Acme Inc\"`"
        )));
    }
    Ok(n.to_string())
}

/// API key names: up to 100 characters, default `default`.
pub fn validate_key_name(name: &str) -> Result<String> {
    let n = name.trim();
    let len = n.chars().count();
    if len > 100 || has_control(n) {
        return Err(Error::InvalidArgument(format!(
            "API key name must be at most 100 characters without control characters (got {len}), e.g. `flex admin key create --org org_… --name ci`"
        )));
    }
    Ok(if n.is_empty() { "default" } else { n }.to_string())
}

/// Ids the caller passes back (org, key, proxy): required, short, printable.
pub fn validate_id(what: &str, id: &str, example: &str) -> Result<String> {
    let id = id.trim();
    if id.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{what} is required, e.g. {example}"
        )));
    }
    if id.len() > 200 || has_control(id) || id.contains(char::is_whitespace) {
        return Err(Error::InvalidArgument(format!(
            "{what} {:?} is malformed (at most 200 characters, no spaces), e.g. {example}",
            clip(id)
        )));
    }
    Ok(id.to_string())
}

/// `openai`, `anthropic` or `gemini`.
pub fn parse_provider(p: &str) -> Result<Provider> {
    Provider::parse(p.trim()).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "provider must be openai, anthropic or gemini (got {:?}), e.g. `flex admin provider-key set --org org_… --provider openai`",
            clip(p)
        ))
    })
}

/// A provider secret: trimmed (stdin adds a newline), non-empty, no inner whitespace. Errors never
/// echo the secret.
pub fn validate_secret(secret: &str) -> Result<String> {
    let s = secret.trim();
    if s.is_empty() {
        return Err(Error::InvalidArgument(
            "the provider key is empty; pipe it on stdin, e.g. `printf %s \"$OPENAI_API_KEY\" | flex admin provider-key set --org org_… --provider openai`".into(),
        ));
    }
    if s.len() > 4096 {
        return Err(Error::InvalidArgument(
            "the provider key is longer than 4096 bytes; paste only the key itself".into(),
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::InvalidArgument(
            "the provider key contains whitespace or control characters; paste only the key itself (one line)".into(),
        ));
    }
    Ok(s.to_string())
}

/// Revocation reasons: up to 500 characters.
pub fn validate_reason(reason: &str) -> Result<String> {
    let r = reason.trim();
    if r.chars().count() > 500 || has_control(r) {
        return Err(Error::InvalidArgument(
            "revocation reason must be at most 500 characters on one line, e.g. \"leaked in CI logs\"".into(),
        ));
    }
    Ok(r.to_string())
}

/// An optional RFC 3339 time given by an operator.
pub fn parse_time(field: &str, value: &str) -> Result<Option<OffsetDateTime>> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    timefmt::parse(value).map(Some).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{field} must be an RFC 3339 time (got {:?}), e.g. 2030-01-01T00:00:00Z",
            clip(value)
        ))
    })
}

/// Plan names: 1–64 characters of `a-z`, `0-9`, `-`, `_`, `.`.
pub fn validate_plan(plan: &str) -> Result<String> {
    let p = plan.trim();
    let ok = !p.is_empty()
        && p.len() <= 64
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "plan must be 1-64 characters of a-z, 0-9, `-`, `_` or `.` (got {:?}), e.g. `flex admin billing set-plan --org org_… --plan growth --fee-bps 800`",
            clip(p)
        )));
    }
    Ok(p.to_string())
}

/// Fees: 0 to 10,000 basis points (0–100% of the flex savings); required.
pub fn validate_fee_bps(fee_bps: Option<u32>) -> Result<u32> {
    match fee_bps {
        Some(f) if f <= MAX_FEE_BPS => Ok(f),
        Some(f) => Err(Error::InvalidArgument(format!(
            "fee_bps must be between 0 and {MAX_FEE_BPS} basis points of the flex savings (got {f}); 1000 = 10%"
        ))),
        None => Err(Error::InvalidArgument(
            "fee_bps is required: the fee on flex savings in basis points, 0 to 10000 (1000 = 10%), e.g. --fee-bps 1000".into(),
        )),
    }
}

/// Idempotency keys: up to 200 printable characters.
pub fn validate_idempotency_key(key: &str) -> Result<Option<String>> {
    let k = key.trim();
    if k.is_empty() {
        return Ok(None);
    }
    if k.len() > 200 || has_control(k) {
        return Err(Error::InvalidArgument(
            "idempotency_key must be at most 200 printable characters, e.g. a UUID".into(),
        ));
    }
    Ok(Some(k.to_string()))
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
    fn validation_messages_say_how_to_fix() {
        let e = validate_org_name("  ").unwrap_err();
        assert!(e.to_string().contains("1-100"), "{e}");
        assert!(e.to_string().contains("e.g."), "{e}");
        assert!(validate_org_name(&"x".repeat(101)).is_err());
        assert_eq!(validate_org_name(" Acme ").unwrap(), "Acme");
        let e = parse_provider("azure").unwrap_err();
        assert!(e.to_string().contains("openai, anthropic or gemini"), "{e}");
        let e = validate_secret("sk-abc def").unwrap_err();
        assert!(!e.to_string().contains("sk-abc"), "{e}");
        assert_eq!(validate_secret("sk-abc\n").unwrap(), "sk-abc");
        assert!(BillingStatus::parse("late").is_err());
        assert!(parse_time("expires_at", "tomorrow").is_err());
        assert_eq!(parse_time("expires_at", "").unwrap(), None);
        assert_eq!(validate_plan(" growth-2 ").unwrap(), "growth-2");
        let e = validate_plan("Big Plan").unwrap_err();
        assert!(e.to_string().contains("e.g."), "{e}");
        assert_eq!(validate_fee_bps(Some(0)).unwrap(), 0);
        assert_eq!(validate_fee_bps(Some(10_000)).unwrap(), 10_000);
        assert!(validate_fee_bps(Some(10_001)).is_err());
        let e = validate_fee_bps(None).unwrap_err();
        assert!(e.to_string().contains("required"), "{e}");
    }

    #[test]
    fn limits_merge_remove_and_clear() {
        let mut agg = LimitsAggregate::default();
        let set = |rpm, daily| LimitChanges {
            rpm,
            daily_budget_micros: daily,
            ..LimitChanges::default()
        };
        let e = agg
            .set("o", Some("k"), &set(Some(300), None))
            .unwrap()
            .unwrap();
        assert_eq!(e.summary(), "limits of api key k (org o) set: rpm=300");
        agg.apply(&e);
        // Only what is named changes; setting the same values records nothing.
        let e = agg
            .set("o", Some("k"), &set(None, Some(5_000_000)))
            .unwrap()
            .unwrap();
        agg.apply(&e);
        assert_eq!(
            agg.current,
            LimitValues {
                rpm: 300,
                daily_budget_micros: 5_000_000,
                ..LimitValues::default()
            }
        );
        assert!(agg
            .set("o", Some("k"), &set(Some(300), None))
            .unwrap()
            .is_none());
        // 0 removes one; removing the last one clears the scope.
        let e = agg
            .set("o", Some("k"), &set(Some(0), None))
            .unwrap()
            .unwrap();
        agg.apply(&e);
        let e = agg
            .set("o", Some("k"), &set(None, Some(0)))
            .unwrap()
            .unwrap();
        assert!(matches!(e, Event::LimitsCleared { .. }), "{e:?}");
        agg.apply(&e);
        assert!(agg.clear("o", Some("k")).is_none());
        let err = agg.set("o", None, &LimitChanges::default()).unwrap_err();
        assert!(err.to_string().contains("no limit given"), "{err}");
        let err = agg.set("o", None, &set(None, Some(-1))).unwrap_err();
        assert!(err.to_string().contains("cannot be negative"), "{err}");
        let err = agg
            .set("o", None, &set(Some(MAX_LIMIT + 1), None))
            .unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        // Events round-trip; an org-wide event carries no key_id.
        let e = Event::LimitsSet {
            org_id: "o".into(),
            key_id: None,
            limits: LimitValues {
                tpm: 10,
                ..LimitValues::default()
            },
        };
        let json = e.to_new().unwrap().payload;
        assert!(!json.contains("key_id"), "{json}");
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
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
