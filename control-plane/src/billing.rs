//! Billing commands: the status, the plan and its fee, invoices computed from the usage ledger,
//! payments, and the overdue check that makes an org `past_due`.
//!
//! Money is integer micro-dollars throughout. An invoice bills the fee on the org's flex savings
//! over a closed period: savings = standard-tier cost − actual cost of the requests received in
//! `[period_from, period_to)` (never below zero), fee = `ceil(savings × fee_bps / 10,000)` at the
//! fee in force when the invoice is issued. An org's invoice periods never overlap, so no request
//! is billed twice.
//!
//! Past due is event-sourced (see [`BillingAggregate`]): the projection never reads the clock.
//! [`check_overdue`] runs when an instance opens, then every minute (and on demand through
//! [`ControlPlane::check_overdue_invoices`]); when it finds an unpaid invoice past its `due_at`
//! that it has not flagged before, it appends `BillingStatusChanged { past_due }` naming it, and
//! the status reaches the proxies in the next snapshot. A payment that leaves no invoice overdue
//! appends `BillingStatusChanged { active }` in the same transaction.

use flex_shared::proto::admin as apb;
use time::OffsetDateTime;

use crate::domain::{self, BillingAggregate, BillingStatus, Event, Loaded, OrgAggregate};
use crate::error::{Error, Result};
use crate::projection::Projection;
use crate::store::{Metadata, Store, StoreError};
use crate::{fingerprint, idempotency_record, timefmt, ControlPlane, IDEMPOTENT_ATTEMPTS};

/// An issued invoice; `replayed` when an idempotency key returned an earlier result.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuedInvoice {
    pub invoice: apb::Invoice,
    pub replayed: bool,
}

/// A recorded payment; `replayed` when an idempotency key returned an earlier result.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedPayment {
    pub payment: apb::Payment,
    pub replayed: bool,
}

fn required_time(field: &str, value: &str) -> Result<OffsetDateTime> {
    domain::parse_time(field, value)?.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{field} is required: an RFC 3339 time, e.g. 2025-01-01T00:00:00Z"
        ))
    })
}

fn is_retryable(e: &Error) -> bool {
    matches!(
        e,
        Error::Conflict { .. } | Error::Store(StoreError::IdempotencyKeyTaken { .. })
    )
}

impl ControlPlane {
    async fn require_org(&self, org_id: &str) -> Result<()> {
        self.load::<OrgAggregate>(&domain::org_stream(org_id))
            .await?
            .state
            .require(org_id)
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

    /// Sets the org's plan and its fee on flex savings (declarative: the same plan and fee record
    /// nothing). The fee reaches the proxies in the snapshot and applies to invoices issued from
    /// then on.
    pub async fn set_billing_plan(
        &self,
        meta: &Metadata,
        org_id: &str,
        plan: &str,
        fee_bps: Option<u32>,
    ) -> Result<apb::BillingAccount> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let plan = domain::validate_plan(plan)?;
        let fee_bps = domain::validate_fee_bps(fee_bps)?;
        self.require_org(&org_id).await?;
        let stream = domain::billing_stream(&org_id);
        let billing = self.load::<BillingAggregate>(&stream).await?;
        if let Some(event) = billing.state.set_plan(&org_id, &plan, fee_bps) {
            self.append(&stream, billing.version, &event, meta).await?;
        } else {
            self.catch_up().await?;
        }
        self.billing_view(&org_id)
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

    fn invoice_view(&self, org_id: &str, invoice_id: &str) -> Result<apb::Invoice> {
        self.state()
            .invoice_admin(org_id, invoice_id, timefmt::now())
            .ok_or_else(|| {
                Error::Internal(format!(
                    "invoice {invoice_id} of org {org_id} missing from the projection"
                ))
            })
    }

    /// Issues an invoice for `[period_from, period_to)` (RFC 3339; the period must have ended and
    /// must not overlap an earlier invoice of the org): the fee on the flex savings in the usage
    /// ledger over the period. `due_at` defaults to 14 days after issuing. With an idempotency
    /// key, a retry returns the first invoice (`replayed`).
    pub async fn issue_invoice(
        &self,
        meta: &Metadata,
        org_id: &str,
        period_from: &str,
        period_to: &str,
        due_at: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<IssuedInvoice> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let from = required_time("period_from", period_from)?;
        let to = required_time("period_to", period_to)?;
        if from >= to {
            return Err(Error::InvalidArgument(format!(
                "period_from must be before period_to (the period is [from, to)), e.g. period_from=2025-01-01T00:00:00Z period_to=2025-02-01T00:00:00Z; got [{}, {})",
                timefmt::format(from),
                timefmt::format(to)
            )));
        }
        if to > timefmt::now() {
            return Err(Error::InvalidArgument(format!(
                "period_to {} is in the future: invoice a period once it has ended, since usage for it may still arrive",
                timefmt::format(to)
            )));
        }
        let due = domain::parse_time("due_at", due_at.unwrap_or(""))?;
        let key = domain::validate_idempotency_key(idempotency_key.unwrap_or(""))?;
        let due_text = due.map(timefmt::format).unwrap_or_default();
        let fp = fingerprint(&[
            "IssueInvoice",
            &org_id,
            &timefmt::format(from),
            &timefmt::format(to),
            &due_text,
        ]);
        self.require_org(&org_id).await?;
        let stream = domain::billing_stream(&org_id);
        let mut last_err = None;
        for _ in 0..IDEMPOTENT_ATTEMPTS {
            if let Some(k) = &key {
                if let Some(id) = self.idempotency_lookup(k, "IssueInvoice", &fp).await? {
                    self.catch_up().await?;
                    return Ok(IssuedInvoice {
                        invoice: self.invoice_view(&org_id, &id)?,
                        replayed: true,
                    });
                }
            }
            let billing = self.load::<BillingAggregate>(&stream).await?;
            billing.state.check_period_is_free(from, to)?;
            let totals = self
                .store
                .usage_summary(&org_id, Some(from), Some(to))
                .await?;
            let savings = totals
                .standard_cost_micros
                .saturating_sub(totals.cost_micros)
                .max(0);
            let fee_bps = billing.state.fee_bps;
            let amount = domain::fee_micros(savings, fee_bps).ok_or_else(|| {
                Error::Internal(format!(
                    "the fee on {savings} micro-dollars of savings does not fit in 64 bits"
                ))
            })?;
            let issued_at = timefmt::now();
            let due_at =
                due.unwrap_or(issued_at + time::Duration::days(domain::DEFAULT_PAYMENT_TERMS_DAYS));
            let invoice_id = domain::new_invoice_id();
            let event = Event::InvoiceIssued {
                org_id: org_id.clone(),
                invoice_id: invoice_id.clone(),
                period_from: timefmt::format(from),
                period_to: timefmt::format(to),
                amount_micros: amount,
                due_at: timefmt::format(due_at),
                issued_at: timefmt::format(issued_at),
                savings_micros: savings,
                fee_bps,
            };
            let idem = key
                .as_deref()
                .map(|k| idempotency_record(k, "IssueInvoice", &invoice_id, &fp));
            match self
                .append_events(&stream, billing.version, &[event], meta, idem.as_ref())
                .await
            {
                Ok(()) => {
                    return Ok(IssuedInvoice {
                        invoice: self.invoice_view(&org_id, &invoice_id)?,
                        replayed: false,
                    })
                }
                Err(e) if is_retryable(&e) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Internal("issue_invoice retries exhausted".into())))
    }

    /// Records a payment of `amount_micros` against `invoice_id`, or against open invoices oldest
    /// first when none is given; more than is open is refused. If the overdue check had made the
    /// org past due and no invoice is overdue afterwards, the org is active again (same
    /// transaction). Use an idempotency key: a retry with it records the payment once.
    pub async fn record_payment(
        &self,
        meta: &Metadata,
        org_id: &str,
        invoice_id: Option<&str>,
        amount_micros: i64,
        idempotency_key: Option<&str>,
    ) -> Result<RecordedPayment> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let invoice_id = match invoice_id.map(str::trim).filter(|s| !s.is_empty()) {
            Some(id) => Some(domain::validate_id("invoice_id", id, "inv_0190…")?),
            None => None,
        };
        let key = domain::validate_idempotency_key(idempotency_key.unwrap_or(""))?;
        let fp = fingerprint(&[
            "RecordPayment",
            &org_id,
            invoice_id.as_deref().unwrap_or(""),
            &amount_micros.to_string(),
        ]);
        self.require_org(&org_id).await?;
        let stream = domain::billing_stream(&org_id);
        let payment = |payment_id: &str, account: apb::BillingAccount| apb::Payment {
            payment_id: payment_id.to_string(),
            org_id: org_id.clone(),
            invoice_id: invoice_id.clone().unwrap_or_default(),
            amount_micros,
            account: Some(account),
        };
        let mut last_err = None;
        for _ in 0..IDEMPOTENT_ATTEMPTS {
            if let Some(k) = &key {
                if let Some(id) = self.idempotency_lookup(k, "RecordPayment", &fp).await? {
                    self.catch_up().await?;
                    return Ok(RecordedPayment {
                        payment: payment(&id, self.billing_view(&org_id)?),
                        replayed: true,
                    });
                }
            }
            let billing = self.load::<BillingAggregate>(&stream).await?;
            let payment_id = domain::new_payment_id();
            let events = billing.state.record_payment(
                &org_id,
                &payment_id,
                invoice_id.as_deref(),
                amount_micros,
                timefmt::now(),
            )?;
            let idem = key
                .as_deref()
                .map(|k| idempotency_record(k, "RecordPayment", &payment_id, &fp));
            match self
                .append_events(&stream, billing.version, &events, meta, idem.as_ref())
                .await
            {
                Ok(()) => {
                    return Ok(RecordedPayment {
                        payment: payment(&payment_id, self.billing_view(&org_id)?),
                        replayed: false,
                    })
                }
                Err(e) if is_retryable(&e) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Internal("record_payment retries exhausted".into())))
    }

    /// Runs the overdue check now, as of `now` (it also runs every minute on its own). Returns how
    /// many orgs it set `past_due`.
    pub async fn check_overdue_invoices(&self, now: OffsetDateTime) -> Result<usize> {
        check_overdue(&self.store, &self.projection, now).await
    }
}

/// The overdue check: for every org with an unpaid invoice due at or before `now` that was not
/// flagged yet, appends `BillingStatusChanged { past_due }` as the `system` actor. Safe to run on
/// several instances at once (a lost race is a conflict, and the winner's event flags the
/// invoices). Returns how many events it appended.
pub(crate) async fn check_overdue(
    store: &Store,
    projection: &Projection,
    now: OffsetDateTime,
) -> Result<usize> {
    projection.catch_up().await?;
    let candidates: Vec<String> = projection
        .state()
        .billing
        .iter()
        .filter(|(_, b)| b.has_unflagged_overdue(now))
        .map(|(org_id, _)| org_id.clone())
        .collect();
    let meta = Metadata::system();
    let mut appended = 0;
    for org_id in candidates {
        let stream = domain::billing_stream(&org_id);
        let billing = Loaded::<BillingAggregate>::fold(&store.read_stream(&stream).await?)?;
        let Some(event) = billing.state.overdue_check(&org_id, now) else {
            continue;
        };
        match store
            .append(&stream, billing.version, &[event.to_new()?], &meta)
            .await
        {
            Ok(_) => {
                appended += 1;
                tracing::info!(
                    org_id,
                    request_id = %meta.request_id,
                    summary = %event.summary(),
                    "overdue invoice: billing status set to past_due"
                );
            }
            Err(StoreError::Conflict { .. }) => {
                tracing::debug!(
                    org_id,
                    "overdue check lost a race on the billing stream; the next check looks again"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    if appended > 0 {
        projection.catch_up().await?;
    }
    Ok(appended)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::domain::{Aggregate, BillingStatus};

    fn t(s: &str) -> OffsetDateTime {
        timefmt::parse(s).unwrap()
    }

    fn invoice(id: &str, amount: i64, due: &str) -> Event {
        Event::InvoiceIssued {
            org_id: "o".into(),
            invoice_id: id.into(),
            period_from: "2025-01-01T00:00:00Z".into(),
            period_to: "2025-02-01T00:00:00Z".into(),
            amount_micros: amount,
            due_at: due.into(),
            issued_at: "2025-02-01T00:00:00Z".into(),
            savings_micros: amount * 10,
            fee_bps: 1000,
        }
    }

    #[test]
    fn fees_round_up_to_the_micro_dollar() {
        assert_eq!(domain::fee_micros(0, 1000), Some(0));
        assert_eq!(domain::fee_micros(-5, 1000), Some(0));
        assert_eq!(domain::fee_micros(10, 0), Some(0));
        assert_eq!(domain::fee_micros(10_000, 1000), Some(1000));
        assert_eq!(domain::fee_micros(10_001, 1000), Some(1001));
        assert_eq!(domain::fee_micros(1, 1), Some(1));
        assert_eq!(domain::fee_micros(123_456_789, 250), Some(3_086_420));
        assert_eq!(domain::fee_micros(i64::MAX, 10_000), Some(i64::MAX));
        assert_eq!(domain::format_micros(12_500_000), "$12.500000");
        assert_eq!(domain::format_micros(-1), "-$0.000001");
    }

    #[test]
    fn overdue_then_paid_flips_the_status_once_each_way() {
        let mut b = BillingAggregate::default();
        b.apply(&invoice("inv_1", 300, "2025-02-15T00:00:00Z"));
        b.apply(&invoice("inv_2", 200, "2025-03-15T00:00:00Z"));
        assert_eq!(b.balance_due_micros(), 500);
        assert!(b.overdue_check("o", t("2025-02-14T00:00:00Z")).is_none());
        let e = b.overdue_check("o", t("2025-02-20T00:00:00Z")).unwrap();
        b.apply(&e);
        assert_eq!(b.status, BillingStatus::PastDue);
        assert!(!b.manual_past_due);
        assert!(b.overdue_check("o", t("2025-02-20T00:00:00Z")).is_none());
        // A partial payment leaves inv_1 overdue.
        let evs = b
            .record_payment("o", "p1", None, 100, t("2025-02-21T00:00:00Z"))
            .unwrap();
        assert_eq!(evs.len(), 1);
        evs.iter().for_each(|e| b.apply(e));
        assert_eq!(b.invoice("inv_1").unwrap().open_micros(), 200);
        // Paying the rest of inv_1 restores active (inv_2 is not due yet).
        let evs = b
            .record_payment("o", "p2", Some("inv_1"), 200, t("2025-02-21T00:00:00Z"))
            .unwrap();
        assert_eq!(evs.len(), 2);
        evs.iter().for_each(|e| b.apply(e));
        assert_eq!(b.status, BillingStatus::Active);
        assert_eq!(b.balance_due_micros(), 200);
        assert!(matches!(
            b.record_payment("o", "p3", Some("inv_1"), 1, t("2025-02-21T00:00:00Z")),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            b.record_payment("o", "p3", None, 201, t("2025-02-21T00:00:00Z")),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            b.record_payment("o", "p3", None, 0, t("2025-02-21T00:00:00Z")),
            Err(Error::InvalidArgument(_))
        ));
        // An operator's past_due is not lifted by a payment.
        b.apply(&b.set_status("o", BillingStatus::PastDue).unwrap());
        let evs = b
            .record_payment("o", "p4", None, 200, t("2025-04-01T00:00:00Z"))
            .unwrap();
        assert_eq!(evs.len(), 1);
        evs.iter().for_each(|e| b.apply(e));
        assert_eq!(b.status, BillingStatus::PastDue);
        assert_eq!(b.paid_micros, 500);
    }
}
