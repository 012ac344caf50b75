//! The read models of orgs, API keys and provider keys, and the admin API's view of the state
//! (orgs, billing accounts, invoices).

use flex_shared::crypto::Sealed;
use flex_shared::proto::admin as apb;
use time::OffsetDateTime;

use super::State;
use crate::domain::{BillingAggregate, BillingStatus, Invoice, OrgStatus};
use crate::timefmt;

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

impl State {
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
