//! Billing accounts (plan and fee, invoices from the usage ledger, payments, the overdue check)
//! and master-key rotation from the key file, on SQLite and on a real Postgres.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{k1, keyring_text, meta, Backend, TestDb};
use flex_control_plane::{timefmt, ControlPlane, Error};
use flex_shared::crypto::Sealed;
use flex_shared::usage::UsageEvent;
use secrecy::{ExposeSecret, SecretString};

both_backends!(
    plan_and_fee_reach_the_snapshot,
    invoices_bill_the_fee_on_ledger_savings_rounded_up,
    invoice_and_payment_commands_are_idempotent_and_validated,
    an_overdue_invoice_makes_the_org_past_due_until_paid,
    rotation_reloads_the_master_key_file,
);

fn usage(request_id: &str, org_id: &str, cost: i64, standard: i64, at: &str) -> UsageEvent {
    UsageEvent {
        schema_version: 1,
        request_id: request_id.into(),
        org_id: org_id.into(),
        key_id: "key_x".into(),
        model: "gpt-5-mini".into(),
        provider: "openai".into(),
        caller_format: "responses".into(),
        start_within: "00h-00m-30s".into(),
        served_tier: if cost < standard { "flex" } else { "standard" }.into(),
        reason: "flex_started".into(),
        flex_wait_ms: 120,
        start_latency_ms: 300,
        duration_ms: 900,
        input_tokens: 100,
        cached_input_tokens: 0,
        output_tokens: 50,
        reasoning_tokens: 0,
        status: 200,
        outcome: "ok".into(),
        tiers_started: vec!["flex".into()],
        cost_micros: cost,
        standard_cost_micros: standard,
        received_at: at.into(),
        provider_request_id: String::new(),
    }
}

const JAN: (&str, &str) = ("2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z");
const FEB: (&str, &str) = ("2025-02-01T00:00:00Z", "2025-03-01T00:00:00Z");

async fn org(cp: &ControlPlane, name: &str) -> String {
    cp.create_org(&meta(), name, None).await.unwrap().org.org_id
}

fn org_entry(cp: &ControlPlane, org_id: &str) -> flex_shared::proto::control::OrgEntry {
    cp.snapshot()
        .orgs
        .iter()
        .find(|o| o.org_id == org_id)
        .cloned()
        .unwrap()
}

async fn plan_and_fee_reach_the_snapshot(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let o = org(&cp, "acme").await;
    let default = cp.get_billing(&o).await.unwrap();
    assert_eq!(
        (
            default.plan.as_str(),
            default.fee_bps,
            default.status.as_str()
        ),
        ("flex", 1000, "active")
    );
    assert_eq!(default.balance_due_micros, 0);
    assert!(default.open_invoices.is_empty());
    assert_eq!(org_entry(&cp, &o).fee_bps, 1000);

    let set = cp
        .set_billing_plan(&meta(), &o, "growth", Some(800))
        .await
        .unwrap();
    assert_eq!((set.plan.as_str(), set.fee_bps), ("growth", 800));
    assert_eq!(org_entry(&cp, &o).fee_bps, 800);
    let before = cp.state().last_seq;
    cp.set_billing_plan(&meta(), &o, "growth", Some(800))
        .await
        .unwrap();
    assert_eq!(cp.state().last_seq, before, "the same plan records nothing");

    for (plan, fee) in [
        ("growth", None),
        ("growth", Some(10_001)),
        ("Big Plan", Some(5)),
    ] {
        let err = cp
            .set_billing_plan(&meta(), &o, plan, fee)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(
            err.to_string().contains("e.g.") || err.to_string().contains("1000 = 10%"),
            "{err}"
        );
    }
    assert!(matches!(
        cp.set_billing_plan(&meta(), "org_nope", "growth", Some(5))
            .await,
        Err(Error::NotFound(_))
    ));
    cp.set_billing_plan(&meta(), &o, "free", Some(0))
        .await
        .unwrap();
    assert_eq!(org_entry(&cp, &o).fee_bps, 0);
    let audit = cp.list_audit_events(&o).await.unwrap();
    assert!(audit
        .iter()
        .any(|e| e.summary == "billing plan set to growth (fee 800 bps of flex savings)"));
    assert_eq!(*cp.state(), cp.rebuild().await.unwrap());
}

async fn invoices_bill_the_fee_on_ledger_savings_rounded_up(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let o = org(&cp, "metered").await;
    let other = org(&cp, "other").await;
    cp.record_usage(&[
        // January: savings 999,997 + 0 (standard tier) = 999,997.
        usage("r1", &o, 1_000_003, 2_000_000, "2025-01-03T10:00:00Z"),
        usage("r2", &o, 500_000, 500_000, "2025-01-20T10:00:00Z"),
        // The period is [from, to): this one is February's.
        usage("r3", &o, 10, 1_000_010, "2025-02-01T00:00:00Z"),
        // Another org's usage is not billed here.
        usage("r4", &other, 0, 9_000_000, "2025-01-05T00:00:00Z"),
    ])
    .await
    .unwrap();
    let jan = cp
        .issue_invoice(&meta(), &o, JAN.0, JAN.1, None, None)
        .await
        .unwrap();
    assert!(!jan.replayed);
    let inv = jan.invoice;
    assert!(inv.invoice_id.starts_with("inv_"));
    assert_eq!(inv.savings_micros, 999_997);
    assert_eq!(inv.fee_bps, 1000);
    // 999,997 × 10% = 99,999.7 → rounded up.
    assert_eq!(inv.amount_micros, 100_000);
    assert_eq!((inv.open_micros, inv.paid_micros), (100_000, 0));
    assert_eq!(inv.status, "open");
    assert_eq!(inv.period_from, "2025-01-01T00:00:00.000000Z");
    // Due 14 days after issuing by default.
    let issued = timefmt::parse(&inv.issued_at).unwrap();
    assert_eq!(
        timefmt::parse(&inv.due_at).unwrap() - issued,
        time::Duration::days(14)
    );

    // The fee in force when issuing applies.
    cp.set_billing_plan(&meta(), &o, "scale", Some(2_500))
        .await
        .unwrap();
    let feb = cp
        .issue_invoice(
            &meta(),
            &o,
            FEB.0,
            FEB.1,
            Some("2030-01-01T00:00:00Z"),
            None,
        )
        .await
        .unwrap()
        .invoice;
    assert_eq!(feb.savings_micros, 1_000_000);
    assert_eq!(feb.amount_micros, 250_000);
    assert_eq!(feb.due_at, "2030-01-01T00:00:00.000000Z");

    // Overlapping periods are refused: nothing is billed twice.
    let err = cp
        .issue_invoice(
            &meta(),
            &o,
            "2025-01-15T00:00:00Z",
            "2025-02-15T00:00:00Z",
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert!(err.to_string().contains(&inv.invoice_id), "{err}");

    // No savings: an invoice of zero, paid from the start.
    let empty = cp
        .issue_invoice(&meta(), &other, FEB.0, FEB.1, None, None)
        .await
        .unwrap()
        .invoice;
    assert_eq!((empty.amount_micros, empty.status.as_str()), (0, "paid"));

    let account = cp.get_billing(&o).await.unwrap();
    assert_eq!(account.balance_due_micros, 350_000);
    assert_eq!(account.invoiced_micros, 350_000);
    assert_eq!(account.paid_micros, 0);
    let open: Vec<&str> = account
        .open_invoices
        .iter()
        .map(|i| i.invoice_id.as_str())
        .collect();
    assert_eq!(open, [inv.invoice_id.as_str(), feb.invoice_id.as_str()]);
    assert_eq!(account.status, "active", "nothing is overdue yet");
    let audit = cp.list_audit_events(&o).await.unwrap();
    let line = audit
        .iter()
        .find(|e| e.event_type == "InvoiceIssued")
        .unwrap();
    assert!(
        line.summary
            .contains("$0.100000 (1000 bps of $0.999997 flex savings)"),
        "{}",
        line.summary
    );
    assert_eq!(*cp.state(), cp.rebuild().await.unwrap());
}

async fn invoice_and_payment_commands_are_idempotent_and_validated(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let o = org(&cp, "acme").await;
    cp.record_usage(&[usage("r1", &o, 0, 1_000_000, "2025-01-10T00:00:00Z")])
        .await
        .unwrap();
    let bad = [
        ("", JAN.1, "period_from is required"),
        (JAN.0, "next month", "RFC 3339"),
        (JAN.1, JAN.0, "before period_to"),
        (JAN.0, "2999-01-01T00:00:00Z", "in the future"),
    ];
    for (from, to, why) in bad {
        let err = cp
            .issue_invoice(&meta(), &o, from, to, None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(err.to_string().contains(why), "{err}");
    }
    assert!(matches!(
        cp.issue_invoice(&meta(), "org_nope", JAN.0, JAN.1, None, None)
            .await,
        Err(Error::NotFound(_))
    ));

    let first = cp
        .issue_invoice(&meta(), &o, JAN.0, JAN.1, None, Some("inv-jan"))
        .await
        .unwrap();
    let again = cp
        .issue_invoice(&meta(), &o, JAN.0, JAN.1, None, Some("inv-jan"))
        .await
        .unwrap();
    assert!(again.replayed && !first.replayed);
    assert_eq!(again.invoice, first.invoice);
    let err = cp
        .issue_invoice(&meta(), &o, FEB.0, FEB.1, None, Some("inv-jan"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("different request"), "{err}");
    let inv = first.invoice;
    assert_eq!(inv.amount_micros, 100_000);

    // Payments: validated against what is open.
    for (invoice, amount, code) in [
        (Some("inv_nope"), 10, "not_found"),
        (Some(inv.invoice_id.as_str()), 100_001, "precondition"),
        (None, 100_001, "precondition"),
        (None, 0, "invalid"),
        (None, -5, "invalid"),
    ] {
        let err = cp
            .record_payment(&meta(), &o, invoice, amount, None)
            .await
            .unwrap_err();
        let ok = match code {
            "not_found" => matches!(err, Error::NotFound(_)),
            "precondition" => matches!(err, Error::FailedPrecondition(_)),
            _ => matches!(err, Error::InvalidArgument(_)),
        };
        assert!(ok, "{invoice:?} {amount}: {err:?}");
    }
    // A retried payment with its idempotency key is recorded once.
    let p1 = cp
        .record_payment(&meta(), &o, Some(&inv.invoice_id), 40_000, Some("pay-1"))
        .await
        .unwrap();
    let p1_again = cp
        .record_payment(&meta(), &o, Some(&inv.invoice_id), 40_000, Some("pay-1"))
        .await
        .unwrap();
    assert!(p1_again.replayed && !p1.replayed);
    assert_eq!(p1_again.payment.payment_id, p1.payment.payment_id);
    assert!(p1.payment.payment_id.starts_with("pay_"));
    let account = p1_again.payment.account.unwrap();
    assert_eq!(account.paid_micros, 40_000);
    assert_eq!(account.balance_due_micros, 60_000);
    assert_eq!(account.open_invoices[0].open_micros, 60_000);
    // The rest, without naming the invoice: applied oldest first; the invoice is paid.
    let p2 = cp
        .record_payment(&meta(), &o, None, 60_000, Some("pay-2"))
        .await
        .unwrap();
    let account = p2.payment.account.unwrap();
    assert_eq!(account.balance_due_micros, 0);
    assert!(account.open_invoices.is_empty());
    assert_eq!(
        cp.state()
            .invoice_admin(&o, &inv.invoice_id, timefmt::now())
            .unwrap()
            .status,
        "paid"
    );
    let payments = cp
        .list_audit_events(&o)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "PaymentRecorded")
        .count();
    assert_eq!(payments, 2);
    assert_eq!(*cp.state(), cp.rebuild().await.unwrap());
}

async fn an_overdue_invoice_makes_the_org_past_due_until_paid(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let o = org(&cp, "late payer").await;
    cp.record_usage(&[
        usage("r1", &o, 0, 1_000_000, "2025-01-10T00:00:00Z"),
        usage("r2", &o, 0, 3_000_000, "2025-02-10T00:00:00Z"),
    ])
    .await
    .unwrap();
    let jan = cp
        .issue_invoice(
            &meta(),
            &o,
            JAN.0,
            JAN.1,
            Some("2025-02-15T00:00:00Z"),
            None,
        )
        .await
        .unwrap()
        .invoice;
    assert_eq!(jan.status, "overdue", "its due date has passed");
    assert_eq!(
        org_entry(&cp, &o).billing_status,
        "active",
        "until the check runs"
    );

    // The check appends the transition; the snapshot (what proxies enforce) follows it.
    let now = timefmt::now();
    assert_eq!(cp.check_overdue_invoices(now).await.unwrap(), 1);
    assert_eq!(
        cp.check_overdue_invoices(now).await.unwrap(),
        0,
        "once per invoice"
    );
    assert_eq!(org_entry(&cp, &o).billing_status, "past_due");
    let account = cp.get_billing(&o).await.unwrap();
    assert_eq!(account.status, "past_due");
    assert!(
        account.status_reason.contains(&jan.invoice_id)
            && account.status_reason.contains("overdue"),
        "{}",
        account.status_reason
    );
    let events = cp.store().read_all().await.unwrap();
    let change = events.last().unwrap();
    assert_eq!(change.event_type, "BillingStatusChanged");
    assert_eq!(change.actor, "system");

    // A partial payment leaves it overdue; paying the rest makes the org active, atomically.
    cp.record_payment(&meta(), &o, None, 50_000, None)
        .await
        .unwrap();
    assert_eq!(org_entry(&cp, &o).billing_status, "past_due");
    let before = cp.state().last_seq;
    let paid = cp
        .record_payment(&meta(), &o, Some(&jan.invoice_id), 50_000, None)
        .await
        .unwrap()
        .payment
        .account
        .unwrap();
    assert_eq!(paid.status, "active");
    assert_eq!(cp.state().last_seq, before + 2, "payment and status change");
    assert_eq!(org_entry(&cp, &o).billing_status, "active");

    // An operator's `set-status active` waives an overdue invoice for good.
    cp.issue_invoice(
        &meta(),
        &o,
        FEB.0,
        FEB.1,
        Some("2025-03-15T00:00:00Z"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(cp.check_overdue_invoices(timefmt::now()).await.unwrap(), 1);
    assert_eq!(org_entry(&cp, &o).billing_status, "past_due");
    cp.set_billing_status(&meta(), &o, "active").await.unwrap();
    assert_eq!(cp.check_overdue_invoices(timefmt::now()).await.unwrap(), 0);
    let account = cp.get_billing(&o).await.unwrap();
    assert_eq!(account.status, "active");
    assert_eq!(account.balance_due_micros, 300_000);
    assert_eq!(account.open_invoices[0].status, "overdue");
    // An operator's past_due is not lifted by paying.
    cp.set_billing_status(&meta(), &o, "past_due")
        .await
        .unwrap();
    let after = cp
        .record_payment(&meta(), &o, None, 300_000, None)
        .await
        .unwrap()
        .payment
        .account
        .unwrap();
    assert_eq!(
        (after.status.as_str(), after.balance_due_micros),
        ("past_due", 0)
    );

    // The whole history folds the same from scratch, and on another instance.
    assert_eq!(*cp.state(), cp.rebuild().await.unwrap());
    let other = db.open(k1()).await;
    assert_eq!(other.snapshot().content_hash, cp.snapshot().content_hash);
    let summaries: Vec<String> = cp
        .list_audit_events(&o)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.summary)
        .collect();
    assert!(
        summaries
            .iter()
            .any(|s| s.starts_with("billing status set to active: payment pay_")),
        "{summaries:#?}"
    );
}

async fn rotation_reloads_the_master_key_file(b: Backend) {
    let db = TestDb::new(b).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    // A bare hex line, as `flex up` and `openssl rand -hex 32 > master.key` write it.
    let old_hex = hex::encode([0x11u8; 32]);
    std::fs::write(&path, format!("{old_hex}\n")).unwrap();
    let cp = db.open_with_key_file(&path).await;
    let old_id = cp.keyring().active_key_id().to_string();
    assert!(old_id.starts_with("mk-"), "{old_id}");
    let o = org(&cp, "byok").await;
    let secrets = [
        ("openai", "sk-openai-rotation-0001"),
        ("gemini", "AIza-rotation-0002"),
    ];
    for (p, s) in secrets {
        cp.set_provider_key(&meta(), &o, p, &SecretString::from(s.to_string()))
            .await
            .unwrap();
    }
    // Without a file change, nothing to do.
    let r = cp.rotate_master_key_from_file(&meta()).await.unwrap();
    assert_eq!((r.resealed, r.already_current), (0, 2));
    assert!(r.key_file_reloaded);
    assert_eq!(r.active_key_id, old_id);

    // Dropping the old key too early is refused, and the keyring in use stays.
    std::fs::write(&path, keyring_text("k2", 0x22)).unwrap();
    let err = cp.rotate_master_key_from_file(&meta()).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert!(err.to_string().contains(&old_id), "{err}");
    assert_eq!(cp.keyring().active_key_id(), old_id);
    std::fs::write(&path, "not a key\n").unwrap();
    let err = cp.rotate_master_key_from_file(&meta()).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert!(err.to_string().contains("line 1"), "{err}");

    // The procedure: new key first, old one kept; rotate; then drop the old line.
    std::fs::write(
        &path,
        format!("{}# rotated from:\n{old_hex}\n", keyring_text("k2", 0x22)),
    )
    .unwrap();
    let r = cp.rotate_master_key_from_file(&meta()).await.unwrap();
    assert_eq!((r.resealed, r.already_current), (2, 0));
    assert_eq!(r.active_key_id, "k2");
    std::fs::write(&path, keyring_text("k2", 0x22)).unwrap();
    let r = cp.rotate_master_key_from_file(&meta()).await.unwrap();
    assert_eq!(
        (r.resealed, r.already_current, r.key_file_reloaded),
        (0, 2, true)
    );
    assert_eq!(cp.keyring().key_ids().collect::<Vec<_>>(), ["k2"]);
    // New secrets are sealed under the new key; every secret opens with it alone.
    cp.set_provider_key(
        &meta(),
        &o,
        "anthropic",
        &SecretString::from("sk-ant-after-rotation".to_string()),
    )
    .await
    .unwrap();
    let only_k2 = common::keyring(&keyring_text("k2", 0x22));
    let snap = cp.snapshot();
    assert_eq!(snap.provider_keys.len(), 3);
    for entry in &snap.provider_keys {
        let sealed: Sealed = entry.sealed.clone().unwrap().into();
        assert_eq!(sealed.master_key_id, "k2");
        let plain = only_k2.open(&o, &entry.provider, &sealed).unwrap();
        assert!(plain.expose_secret().contains("rotation"));
    }
    assert_eq!(*cp.state(), cp.rebuild().await.unwrap());

    // A control plane started without a file rotates under its in-memory keyring.
    let plain = db.open(only_k2).await;
    let r = plain.rotate_master_key_from_file(&meta()).await.unwrap();
    assert_eq!(
        (r.resealed, r.already_current, r.key_file_reloaded),
        (0, 3, false)
    );
    assert!(plain.master_key_file().is_none());
}
