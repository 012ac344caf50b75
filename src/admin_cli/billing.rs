//! `flex admin billing`: an org's billing account, plan and fee, invoices and payments.

use anyhow::Result;
use clap::Subcommand;
use flex_shared::proto::admin as pb;
use serde_json::{json, Value};

use super::{dollars, print, status_err, Client};

#[derive(Debug, Subcommand)]
pub enum BillingCmd {
    Show {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
    },
    #[command(name = "set-status")]
    SetStatus {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        #[arg(value_parser = ["active", "past_due"])]
        status: String,
    },
    /// Sets the plan and its fee on flex savings.
    #[command(name = "set-plan")]
    SetPlan {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        #[arg(long, env = "FLEX_PLAN")]
        plan: String,
        /// Basis points of the flex savings, 0-10000 (1000 = 10%).
        #[arg(long, env = "FLEX_FEE_BPS")]
        fee_bps: u32,
    },
    /// Invoices the fee on the org's flex savings over [--from, --to) from the usage ledger.
    #[command(name = "issue-invoice")]
    IssueInvoice {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        /// RFC 3339 start of the period (inclusive).
        #[arg(long, env = "FLEX_FROM")]
        from: String,
        /// RFC 3339 end of the period (exclusive); the period must have ended.
        #[arg(long, env = "FLEX_TO")]
        to: String,
        /// RFC 3339 due date (default: 14 days from now).
        #[arg(long, env = "FLEX_DUE_AT")]
        due_at: Option<String>,
        #[arg(long, env = "FLEX_IDEMPOTENCY_KEY")]
        idempotency_key: Option<String>,
    },
    /// Records a payment, against one invoice or open invoices oldest first.
    #[command(name = "record-payment")]
    RecordPayment {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        /// Integer micro-dollars (12500000 = $12.50).
        #[arg(long, env = "FLEX_AMOUNT_MICROS")]
        amount_micros: i64,
        #[arg(long, env = "FLEX_INVOICE")]
        invoice: Option<String>,
        /// Recommended: a retried call with the same key records the payment once.
        #[arg(long, env = "FLEX_IDEMPOTENCY_KEY")]
        idempotency_key: Option<String>,
    },
}

fn invoice_json(i: &pb::Invoice) -> Value {
    json!({"invoice_id": i.invoice_id, "org_id": i.org_id, "period_from": i.period_from, "period_to": i.period_to, "amount_micros": i.amount_micros, "paid_micros": i.paid_micros, "open_micros": i.open_micros, "due_at": i.due_at, "status": i.status, "savings_micros": i.savings_micros, "fee_bps": i.fee_bps, "issued_at": i.issued_at})
}

fn billing_json(b: &pb::BillingAccount) -> Value {
    json!({"org_id": b.org_id, "status": b.status, "status_reason": b.status_reason, "plan": b.plan, "fee_bps": b.fee_bps, "balance_due_micros": b.balance_due_micros, "invoiced_micros": b.invoiced_micros, "paid_micros": b.paid_micros, "open_invoices": b.open_invoices.iter().map(invoice_json).collect::<Vec<_>>()})
}

fn invoice_line(i: &pb::Invoice) -> String {
    format!(
        "{}  [{}, {})  {} of {} open  due {}  {}",
        i.invoice_id,
        i.period_from,
        i.period_to,
        dollars(i.open_micros),
        dollars(i.amount_micros),
        i.due_at,
        i.status
    )
}

fn billing_human(b: &pb::BillingAccount) -> String {
    let reason = if b.status_reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", b.status_reason)
    };
    let mut lines = vec![
        format!("org {}: billing {}{reason}", b.org_id, b.status),
        format!("plan {}, fee {} bps of flex savings", b.plan, b.fee_bps),
        format!(
            "balance due {} ({} open invoices; invoiced {}, paid {})",
            dollars(b.balance_due_micros),
            b.open_invoices.len(),
            dollars(b.invoiced_micros),
            dollars(b.paid_micros)
        ),
    ];
    lines.extend(
        b.open_invoices
            .iter()
            .map(|i| format!("  {}", invoice_line(i))),
    );
    lines.join("\n")
}

pub(super) async fn billing(c: &mut Client, j: bool, cmd: BillingCmd) -> Result<()> {
    match cmd {
        BillingCmd::Show { org } => {
            let b = c
                .get_billing(pb::OrgRef { org_id: org })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, billing_json(&b), || billing_human(&b));
        }
        BillingCmd::SetPlan { org, plan, fee_bps } => {
            let b = c
                .set_billing_plan(pb::SetBillingPlanRequest {
                    org_id: org,
                    plan,
                    fee_bps: Some(fee_bps),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, billing_json(&b), || {
                format!(
                    "org {}: plan {}, fee {} bps of flex savings",
                    b.org_id, b.plan, b.fee_bps
                )
            });
        }
        BillingCmd::IssueInvoice {
            org,
            from,
            to,
            due_at,
            idempotency_key,
        } => {
            let i = c
                .issue_invoice(pb::IssueInvoiceRequest {
                    org_id: org,
                    period_from: from,
                    period_to: to,
                    due_at: due_at.unwrap_or_default(),
                    idempotency_key: idempotency_key.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, invoice_json(&i), || {
                format!(
                    "issued {} ({} bps of {} flex savings)",
                    invoice_line(&i),
                    i.fee_bps,
                    dollars(i.savings_micros)
                )
            });
        }
        BillingCmd::RecordPayment {
            org,
            amount_micros,
            invoice,
            idempotency_key,
        } => {
            let p = c
                .record_payment(pb::RecordPaymentRequest {
                    org_id: org,
                    invoice_id: invoice.unwrap_or_default(),
                    amount_micros,
                    idempotency_key: idempotency_key.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let account = p.account.unwrap_or_default();
            print(
                j,
                json!({"payment_id": p.payment_id, "org_id": p.org_id, "invoice_id": p.invoice_id, "amount_micros": p.amount_micros, "account": billing_json(&account)}),
                || {
                    format!(
                        "recorded payment {} of {}\n{}",
                        p.payment_id,
                        dollars(p.amount_micros),
                        billing_human(&account)
                    )
                },
            );
        }
        BillingCmd::SetStatus { org, status } => {
            let b = c
                .set_billing_status(pb::SetBillingStatusRequest {
                    org_id: org,
                    status,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, billing_json(&b), || {
                format!("org {}: billing {}", b.org_id, b.status)
            });
        }
    }
    Ok(())
}
