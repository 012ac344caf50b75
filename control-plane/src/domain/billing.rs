//! Billing accounts (`billing-<org_id>`): the default plan and fee, money in micro-dollars, the
//! billing status, invoices and the aggregate that decides payments and the overdue check; the
//! checks of an operator's plan and fee.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::validate::clip;
use super::{Aggregate, Event};
use crate::error::{Error, Result};
use crate::timefmt;

/// The plan of a billing account no operator has set a plan for.
pub const DEFAULT_PLAN: &str = "flex";
/// Fee on flex savings, basis points (1000 = 10%), until an operator sets another.
pub const DEFAULT_FEE_BPS: u32 = 1000;
/// The highest fee: 10,000 basis points = 100% of the savings.
pub const MAX_FEE_BPS: u32 = 10_000;
/// Days from issuing an invoice to its due date when the operator gives none.
pub const DEFAULT_PAYMENT_TERMS_DAYS: i64 = 14;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn billing_validation_messages_say_how_to_fix() {
        assert!(BillingStatus::parse("late").is_err());
        assert_eq!(validate_plan(" growth-2 ").unwrap(), "growth-2");
        let e = validate_plan("Big Plan").unwrap_err();
        assert!(e.to_string().contains("e.g."), "{e}");
        assert_eq!(validate_fee_bps(Some(0)).unwrap(), 0);
        assert_eq!(validate_fee_bps(Some(10_000)).unwrap(), 10_000);
        assert!(validate_fee_bps(Some(10_001)).is_err());
        let e = validate_fee_bps(None).unwrap_err();
        assert!(e.to_string().contains("required"), "{e}");
    }
}
