//! The control plane's behaviour, run on SQLite and on a real Postgres.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{k1, keyring, keyring_text, meta, Backend, TestDb};
use flex_control_plane::domain::Event;
use flex_control_plane::store::{ImportEvent, Metadata, NewEvent, StoreError};
use flex_control_plane::{ControlPlane, Error};
use flex_shared::crypto::Sealed;
use flex_shared::snapshot;
use flex_shared::usage::UsageEvent;
use secrecy::{ExposeSecret, SecretString};

both_backends!(
    concurrent_appends_with_the_same_expected_version_conflict,
    concurrent_commands_on_one_aggregate_yield_one_winner,
    state_after_many_commands_equals_a_rebuild,
    revoked_and_expired_keys_leave_the_snapshot,
    idempotent_create_returns_the_first_result,
    rotation_reseals_every_provider_key_under_the_new_master_key,
    provider_secret_canary_never_leaves_the_ciphertext,
    subscribers_get_the_snapshot_then_each_change,
    two_instances_on_one_database_converge,
    usage_is_counted_once_per_request,
    commands_validate_against_current_state,
    bulk_import_keeps_positions_unique_and_folds_like_commands,
);

fn ev(n: u32) -> NewEvent {
    NewEvent {
        event_type: "TestEvent".into(),
        schema_version: 1,
        payload: format!(r#"{{"type":"TestEvent","n":{n}}}"#),
    }
}

async fn concurrent_appends_with_the_same_expected_version_conflict(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let store = cp.store().clone();
    let m = Metadata::new("test");
    let (one, two) = ([ev(1)], [ev(2), ev(3)]);
    let (a, bb) = tokio::join!(
        store.append("test-1", 0, &one, &m),
        store.append("test-1", 0, &two, &m)
    );
    let results = [a, bb];
    let oks = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(oks, 1, "exactly one append wins: {results:?}");
    let conflict = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(
        matches!(conflict, StoreError::Conflict { stream_id, expected: 0 } if stream_id == "test-1"),
        "{conflict:?}"
    );
    let winner_events = if results[0].is_ok() { 1 } else { 2 };
    let all = store.read_all().await.unwrap();
    let stream: Vec<_> = all.iter().filter(|e| e.stream_id == "test-1").collect();
    assert_eq!(stream.len(), winner_events, "the loser wrote nothing");
    assert_eq!(store.head().await.unwrap(), all.last().unwrap().seq);

    // An expected version ahead of the stream is a conflict too (no gaps).
    let v = winner_events as u64;
    let err = store
        .append("test-1", v + 1, &[ev(9)], &m)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    // The right version appends, with consecutive stream versions and increasing seq.
    let seq = store
        .append("test-1", v, &[ev(4), ev(5)], &m)
        .await
        .unwrap();
    let tail = store.read_after(0, 1000).await.unwrap();
    assert_eq!(tail.last().unwrap().seq, seq);
    let versions: Vec<u64> = tail
        .iter()
        .filter(|e| e.stream_id == "test-1")
        .map(|e| e.stream_version)
        .collect();
    assert_eq!(versions, (1..=v + 2).collect::<Vec<_>>());
    assert!(tail.windows(2).all(|w| w[0].seq < w[1].seq));
    // read_after honours the limit and the position.
    let first = store.read_after(0, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(store.read_after(seq, 10).await.unwrap().len(), 0);
}

async fn concurrent_commands_on_one_aggregate_yield_one_winner(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let org = cp.create_org(&meta(), "race", None).await.unwrap().org;
    let key = cp
        .create_api_key(&meta(), &org.org_id, "k", None, None)
        .await
        .unwrap();
    let id = key.key.key_id.clone();
    let (m1, m2) = (meta(), meta());
    let (a, c) = tokio::join!(
        cp.revoke_api_key(&m1, &id, "a"),
        cp.revoke_api_key(&m2, &id, "b")
    );
    let results = [a, c];
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    let err = results.into_iter().find_map(Result::err).unwrap();
    // Either it lost the race at the append (ABORTED) or it saw the revocation (FAILED_PRECONDITION).
    assert!(
        matches!(err, Error::Conflict { .. } | Error::FailedPrecondition(_)),
        "{err:?}"
    );
    let revocations = cp
        .store()
        .read_all()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "ApiKeyRevoked")
        .count();
    assert_eq!(revocations, 1);
}

/// Runs a varied history of commands; returns the org ids.
async fn busy_history(cp: &ControlPlane) -> Vec<String> {
    let m = meta();
    let mut orgs = Vec::new();
    for i in 0..4 {
        let org = cp
            .create_org(&m, &format!("org {i}"), None)
            .await
            .unwrap()
            .org;
        orgs.push(org.org_id.clone());
        for j in 0..3 {
            let k = cp
                .create_api_key(&m, &org.org_id, &format!("key {j}"), None, None)
                .await
                .unwrap();
            if j == 1 {
                cp.revoke_api_key(&m, &k.key.key_id, "rotated")
                    .await
                    .unwrap();
            }
        }
        for p in ["openai", "gemini"] {
            let secret = SecretString::from(format!("sk-{p}-{i}-0123456789abcdef"));
            cp.set_provider_key(&m, &org.org_id, p, &secret)
                .await
                .unwrap();
        }
    }
    cp.rename_org(&m, &orgs[0], "renamed").await.unwrap();
    cp.suspend_org(&m, &orgs[1]).await.unwrap();
    cp.suspend_org(&m, &orgs[2]).await.unwrap();
    cp.reactivate_org(&m, &orgs[2]).await.unwrap();
    cp.remove_provider_key(&m, &orgs[3], "gemini")
        .await
        .unwrap();
    cp.set_billing_status(&m, &orgs[3], "past_due")
        .await
        .unwrap();
    cp.set_billing_status(&m, &orgs[2], "past_due")
        .await
        .unwrap();
    cp.set_billing_status(&m, &orgs[2], "active").await.unwrap();
    cp.set_billing_plan(&m, &orgs[0], "scale", Some(750))
        .await
        .unwrap();
    cp.record_usage(&[usage("busy-1", &orgs[0], "flex", "2025-01-05T00:00:00Z")])
        .await
        .unwrap();
    let inv = cp
        .issue_invoice(
            &m,
            &orgs[0],
            "2025-01-01T00:00:00Z",
            "2025-02-01T00:00:00Z",
            Some("2025-02-15T00:00:00Z"),
            None,
        )
        .await
        .unwrap()
        .invoice;
    cp.check_overdue_invoices(flex_control_plane::timefmt::now())
        .await
        .unwrap();
    cp.record_payment(&m, &orgs[0], Some(&inv.invoice_id), 1, None)
        .await
        .unwrap();
    orgs
}

async fn state_after_many_commands_equals_a_rebuild(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let orgs = busy_history(&cp).await;
    let live = cp.state();
    let rebuilt = cp.rebuild().await.unwrap();
    assert_eq!(*live, rebuilt);
    assert_eq!(live.last_seq, cp.store().head().await.unwrap());
    assert!(live.undecodable.is_empty());

    let snap = cp.snapshot();
    assert_eq!(snap.version, live.last_seq);
    assert_eq!(snapshot::validate(&snap), Ok(()));
    let again = rebuilt.snapshot();
    assert_eq!(again.content_hash, snap.content_hash);
    assert_eq!(again.version, snap.version);

    // The snapshot says what the history did.
    assert_eq!(snap.orgs.len(), 4);
    assert_eq!(snap.api_keys.len(), 8, "12 keys, 4 revoked");
    assert_eq!(snap.provider_keys.len(), 7, "8 set, 1 removed");
    let org = |id: &str| snap.orgs.iter().find(|o| o.org_id == id).unwrap();
    assert_eq!(org(&orgs[0]).name, "renamed");
    assert!(!org(&orgs[1]).active);
    assert!(org(&orgs[2]).active);
    assert_eq!(org(&orgs[2]).billing_status, "active");
    assert_eq!(org(&orgs[3]).billing_status, "past_due");
    assert_eq!(org(&orgs[0]).fee_bps, 750);
    assert_eq!(org(&orgs[1]).fee_bps, 1000);
    assert_eq!(
        org(&orgs[0]).billing_status,
        "past_due",
        "its invoice is overdue and only partly paid"
    );
    assert!(snap.models.is_empty());

    // A second instance opened on the same log folds to the same state.
    let other = db.open(k1()).await;
    assert_eq!(*other.state(), rebuilt);
    assert_eq!(other.snapshot().content_hash, snap.content_hash);
}

async fn revoked_and_expired_keys_leave_the_snapshot(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let org = cp.create_org(&meta(), "acme", None).await.unwrap().org;
    let created = cp
        .create_api_key(&meta(), &org.org_id, "ci", None, None)
        .await
        .unwrap();
    let secret = created.secret.as_ref().unwrap().expose_secret().to_string();
    assert_eq!(flex_shared::keys::check_format(&secret), Ok(()));
    let hash = flex_shared::keys::hash(&secret);
    let snap = cp.snapshot();
    assert!(snap
        .api_keys
        .iter()
        .any(|k| k.key_hash == hash && k.key_id == created.key.key_id));
    assert_eq!(created.key.status, "active");
    assert!(secret.starts_with(&created.key.hint[..12]));

    let revoked = cp
        .revoke_api_key(&meta(), &created.key.key_id, "leaked")
        .await
        .unwrap();
    assert_eq!(revoked.status, "revoked");
    assert!(!revoked.revoked_at.is_empty());
    let after = cp.snapshot();
    assert!(after.version > snap.version);
    assert!(!after.api_keys.iter().any(|k| k.key_hash == hash));
    let d = snapshot::diff(&snap, &after);
    assert_eq!(d.remove_api_key_hashes, vec![hash]);
    assert_eq!(
        snapshot::apply_delta(&snap, after.version, &d)
            .unwrap()
            .content_hash,
        after.content_hash
    );

    // A key whose expiry passed by the time of the latest event is absent too.
    let soon = flex_control_plane::timefmt::format(
        time::OffsetDateTime::now_utc() + time::Duration::milliseconds(300),
    );
    let expiring = cp
        .create_api_key(&meta(), &org.org_id, "short", Some(&soon), None)
        .await
        .unwrap();
    let e_hash = flex_shared::keys::hash(expiring.secret.as_ref().unwrap().expose_secret());
    let entry = cp
        .snapshot()
        .api_keys
        .iter()
        .find(|k| k.key_hash == e_hash)
        .cloned()
        .unwrap();
    assert!(entry.expires_at > 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before_rename = cp.published();
    cp.rename_org(&meta(), &org.org_id, "acme 2").await.unwrap();
    assert!(!cp.snapshot().api_keys.iter().any(|k| k.key_hash == e_hash));
    // The delta of that event takes the expired key out along with the org's new name.
    let d = cp
        .delta(before_rename.version, &cp.published())
        .expect("the change records cover the last command");
    assert_eq!(d.remove_api_key_hashes, vec![e_hash.clone()]);
    assert_eq!(d.upsert_orgs.len(), 1);
    assert_eq!(
        snapshot::apply_delta(&before_rename.full(), cp.published().version, &d)
            .unwrap()
            .content_hash,
        cp.snapshot().content_hash
    );
    let listed = cp.list_api_keys(&org.org_id).await.unwrap();
    let status = |id: &str| {
        listed
            .iter()
            .find(|k| k.key_id == id)
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(status(&expiring.key.key_id), "expired");
    assert_eq!(status(&created.key.key_id), "revoked");
    assert_eq!(*cp.state(), cp.rebuild().await.unwrap());
}

async fn idempotent_create_returns_the_first_result(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let first = cp
        .create_org(&meta(), "acme", Some("idem-1"))
        .await
        .unwrap();
    assert!(!first.replayed);
    let again = cp
        .create_org(&meta(), "acme", Some("idem-1"))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.org, first.org);
    assert_eq!(cp.list_orgs().await.unwrap().len(), 1);

    // Concurrent retries of one key still make one org.
    let m = meta();
    let (x, y, z) = tokio::join!(
        cp.create_org(&m, "beta", Some("idem-2")),
        cp.create_org(&m, "beta", Some("idem-2")),
        cp.create_org(&m, "beta", Some("idem-2"))
    );
    let ids: Vec<String> = [x, y, z]
        .into_iter()
        .map(|r| r.unwrap().org.org_id)
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert_eq!(cp.list_orgs().await.unwrap().len(), 2);

    // The same key for a different request is refused.
    let err = cp
        .create_org(&meta(), "other", Some("idem-1"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("different request"), "{err}");

    // API keys: the replay has the same key, but not the secret (only its hash is kept).
    let org_id = first.org.org_id;
    let k1 = cp
        .create_api_key(&meta(), &org_id, "ci", None, Some("key-idem"))
        .await
        .unwrap();
    assert!(k1.secret.is_some() && !k1.replayed);
    let k2 = cp
        .create_api_key(&meta(), &org_id, "ci", None, Some("key-idem"))
        .await
        .unwrap();
    assert!(k2.replayed);
    assert!(k2.secret.is_none());
    assert_eq!(k2.to_proto().api_key, "");
    assert_eq!(k2.key, k1.key);
    assert_eq!(cp.list_api_keys(&org_id).await.unwrap().len(), 1);
    let err = cp
        .create_org(&meta(), "acme", Some("key-idem"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
}

async fn rotation_reseals_every_provider_key_under_the_new_master_key(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let mut expected = Vec::new();
    for i in 0..2 {
        let org = cp
            .create_org(&meta(), &format!("o{i}"), None)
            .await
            .unwrap()
            .org;
        for p in ["openai", "anthropic", "gemini"] {
            let secret = format!("sk-{p}-{i}-secret-value-0000");
            cp.set_provider_key(&meta(), &org.org_id, p, &SecretString::from(secret.clone()))
                .await
                .unwrap();
            expected.push((org.org_id.clone(), p.to_string(), secret));
        }
    }
    cp.remove_provider_key(&meta(), &expected[0].0, "gemini")
        .await
        .unwrap();
    let first_org = expected[0].0.clone();
    expected.retain(|(o, p, _)| !(o == &first_org && p == "gemini"));
    assert!(cp
        .snapshot()
        .provider_keys
        .iter()
        .all(|p| p.sealed.as_ref().unwrap().master_key_id == "k1"));

    // The key file gains k2 (active) and keeps k1 for reading.
    let both = format!("{}{}", keyring_text("k2", 0x22), keyring_text("k1", 0x11));
    cp.set_keyring(keyring(&both));
    let report = cp.rotate_master_key(&Metadata::system()).await.unwrap();
    assert_eq!(report.resealed, expected.len());
    assert_eq!(report.already_current, 0);
    let again = cp.rotate_master_key(&Metadata::system()).await.unwrap();
    assert_eq!(again.resealed, 0);
    assert_eq!(again.already_current, expected.len());

    // Only the new key is needed now.
    let only_k2 = keyring(&keyring_text("k2", 0x22));
    let snap = cp.snapshot();
    assert_eq!(snap.provider_keys.len(), expected.len());
    for (org, provider, secret) in &expected {
        let entry = snap
            .provider_keys
            .iter()
            .find(|p| &p.org_id == org && &p.provider == provider)
            .unwrap();
        let sealed: Sealed = entry.sealed.clone().unwrap().into();
        assert_eq!(sealed.master_key_id, "k2");
        assert_eq!(
            only_k2
                .open(org, provider, &sealed)
                .unwrap()
                .expose_secret(),
            secret
        );
    }
    let listed = cp.list_provider_keys(&expected[0].0).await.unwrap();
    assert!(listed
        .iter()
        .filter(|p| p.status == "set")
        .all(|p| p.master_key_id == "k2"));
    let audit = cp.list_audit_events(&expected[0].0).await.unwrap();
    assert!(audit.iter().any(|e| e.event_type == "ProviderKeyRewrapped"
        && e.summary.contains("re-wrapped under master key k2")));
    assert_eq!(*cp.state(), cp.rebuild().await.unwrap());
    // A restart with only the new key rebuilds and serves the same snapshot.
    drop(cp);
    let restarted = db.open(only_k2).await;
    assert_eq!(restarted.snapshot().content_hash, snap.content_hash);
}

async fn provider_secret_canary_never_leaves_the_ciphertext(b: Backend) {
    const CANARY: &str = "sk-canary-XYZ-8f3a9c2e7b1d4f60-tail";
    const NEEDLES: [&str; 3] = [CANARY, "canary-XYZ", "8f3a9c2e7b1d4f60"];
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let m = meta();
    let mut responses: Vec<String> = Vec::new();
    let created = cp.create_org(&m, "canary org", None).await.unwrap();
    let org_id = created.org.org_id.clone();
    responses.push(format!("{created:?}"));
    let set = cp
        .set_provider_key(
            &m,
            &org_id,
            "openai",
            &SecretString::from(format!("  {CANARY}\n")),
        )
        .await
        .unwrap();
    assert_eq!(set.last4, "tail");
    assert_eq!(set.status, "set");
    responses.push(format!("{set:?}"));
    cp.set_provider_key(
        &m,
        &org_id,
        "gemini",
        &SecretString::from(CANARY.to_string()),
    )
    .await
    .unwrap();
    let key = cp
        .create_api_key(&m, &org_id, "k", None, None)
        .await
        .unwrap();
    responses.push(format!("{key:?}"));
    responses.push(format!("{:?}", cp.list_orgs().await.unwrap()));
    responses.push(format!("{:?}", cp.get_org(&org_id).await.unwrap()));
    responses.push(format!("{:?}", cp.list_api_keys(&org_id).await.unwrap()));
    responses.push(format!(
        "{:?}",
        cp.list_provider_keys(&org_id).await.unwrap()
    ));
    responses.push(format!("{:?}", cp.get_billing(&org_id).await.unwrap()));
    responses.push(format!(
        "{:?}",
        cp.get_usage(&org_id, "", "").await.unwrap()
    ));
    let audit = cp.list_audit_events(&org_id).await.unwrap();
    responses.push(format!("{audit:?}"));
    responses.push(format!("{:?}", cp.list_proxies()));
    responses.push(format!(
        "{:?}",
        cp.remove_provider_key(&m, &org_id, "gemini").await.unwrap()
    ));
    cp.set_keyring(keyring(&format!(
        "{}{}",
        keyring_text("k2", 0x22),
        keyring_text("k1", 0x11)
    )));
    responses.push(format!("{:?}", cp.rotate_master_key(&m).await.unwrap()));
    responses.push(format!("{:?}", cp.snapshot()));
    responses.push(format!("{:?}", cp.state()));
    responses.push(format!("{cp:?}"));
    // Errors about a bad secret do not echo it either.
    let bad = format!("{CANARY} second-part");
    let err = cp
        .set_provider_key(&m, &org_id, "openai", &SecretString::from(bad))
        .await
        .unwrap_err();
    responses.push(format!("{err:?} {err}"));
    // The gRPC encoding of the snapshot carries only ciphertext.
    responses.push(
        String::from_utf8_lossy(&prost::Message::encode_to_vec(&*cp.snapshot())).into_owned(),
    );
    for r in &responses {
        for n in NEEDLES {
            assert!(!r.contains(n), "secret leaked into a response: {r}");
        }
    }
    // Audit payloads carry no hash or ciphertext.
    for e in &audit {
        assert!(
            !e.payload_json.contains("wrapped_dek"),
            "{}",
            e.payload_json
        );
        if e.event_type == "ApiKeyCreated" {
            assert!(
                e.payload_json.contains(r#""key_hash":"<elided>""#),
                "{}",
                e.payload_json
            );
        }
        if e.event_type == "ProviderKeySet" {
            assert!(
                e.payload_json.contains(r#""ciphertext":"<elided>""#),
                "{}",
                e.payload_json
            );
            assert!(e.summary.contains("…tail"), "{}", e.summary);
        }
        assert!(!e.summary.is_empty());
    }
    // No event payload holds the plaintext, nor does the raw events table.
    for e in cp.store().read_all().await.unwrap() {
        for n in NEEDLES {
            assert!(!e.payload.contains(n), "secret in event {}", e.seq);
        }
    }
    let raw: Vec<String> = match cp.store() {
        flex_control_plane::Store::Sqlite(p) => sqlx::query_scalar("SELECT payload FROM events")
            .fetch_all(p)
            .await
            .unwrap(),
        flex_control_plane::Store::Postgres(p) => {
            sqlx::query_scalar("SELECT payload::text FROM events")
                .fetch_all(p)
                .await
                .unwrap()
        }
    };
    assert!(!raw.is_empty());
    assert!(raw.iter().all(|p| NEEDLES.iter().all(|n| !p.contains(n))));
    // ...and yet the secret is recoverable with the master key.
    let snap = cp.snapshot();
    let entry = snap
        .provider_keys
        .iter()
        .find(|p| p.provider == "openai")
        .unwrap();
    let sealed: Sealed = entry.sealed.clone().unwrap().into();
    assert_eq!(
        cp.keyring()
            .open(&org_id, "openai", &sealed)
            .unwrap()
            .expose_secret(),
        CANARY
    );
}

async fn subscribers_get_the_snapshot_then_each_change(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let org = cp.create_org(&meta(), "watched", None).await.unwrap().org;
    let mut rx = cp.subscribe();
    let first = rx.borrow_and_update().clone();
    assert_eq!(first.version, cp.state().last_seq);
    let first_full = first.full();
    assert!(first_full.orgs.iter().any(|o| o.org_id == org.org_id));
    assert_eq!(snapshot::content_hash(&first_full), first.content_hash);
    cp.suspend_org(&meta(), &org.org_id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("a new snapshot within 5 s")
        .unwrap();
    let second = rx.borrow_and_update().clone();
    assert!(second.version > first.version);
    let second_full = second.full();
    // The incrementally kept hash is the hash of the content.
    assert_eq!(snapshot::content_hash(&second_full), second.content_hash);
    // The delta from the change records is the diff of the two snapshots, and applies.
    let d = cp.delta(first.version, &second).unwrap();
    assert!(
        !d.produced_at.is_empty(),
        "a delta says when it was produced"
    );
    assert_eq!(
        flex_shared::proto::control::SnapshotDelta {
            produced_at: String::new(),
            ..d.clone()
        },
        flex_shared::proto::control::SnapshotDelta {
            produced_at: String::new(),
            ..snapshot::diff(&first_full, &second_full)
        }
    );
    assert_eq!(d.upsert_orgs.len(), 1);
    assert!(!d.upsert_orgs[0].active);
    let applied = snapshot::apply_delta(&first_full, second.version, &d).unwrap();
    assert_eq!(applied.content_hash, second.content_hash);
    assert_eq!(
        flex_shared::proto::control::Snapshot {
            produced_at: String::new(),
            ..applied
        },
        flex_shared::proto::control::Snapshot {
            produced_at: String::new(),
            ..(*second_full).clone()
        }
    );
    // A version the records do not cover gets no delta (the caller sends a full one).
    assert!(cp.delta(first.version + 1_000_000, &second).is_none());
}

async fn two_instances_on_one_database_converge(b: Backend) {
    let db = TestDb::new(b).await;
    let a = db.open(k1()).await;
    let bb = db.open(k1()).await;
    let mut rx = bb.subscribe();
    rx.borrow_and_update();
    let org = a.create_org(&meta(), "shared", None).await.unwrap().org;
    // B learns of A's write through its poller alone.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            rx.changed().await.unwrap();
            if rx
                .borrow_and_update()
                .content()
                .orgs
                .contains_key(&org.org_id)
            {
                break;
            }
        }
    })
    .await
    .expect("the second instance converges within 5 s");
    // B can command the aggregate A created; A sees it.
    bb.suspend_org(&meta(), &org.org_id).await.unwrap();
    assert_eq!(a.get_org(&org.org_id).await.unwrap().status, "suspended");
    assert_eq!(a.snapshot().content_hash, bb.snapshot().content_hash);
    assert_eq!(*a.state(), *bb.state());
}

fn usage(request_id: &str, org_id: &str, tier: &str, received_at: &str) -> UsageEvent {
    UsageEvent {
        schema_version: 1,
        request_id: request_id.into(),
        org_id: org_id.into(),
        key_id: "key_x".into(),
        model: "gpt-5-mini".into(),
        provider: "openai".into(),
        caller_format: "responses".into(),
        start_within: "00h-00m-30s".into(),
        served_tier: tier.into(),
        reason: "flex_started".into(),
        flex_wait_ms: 120,
        start_latency_ms: 300,
        duration_ms: 900,
        input_tokens: 100,
        cached_input_tokens: 10,
        output_tokens: 50,
        reasoning_tokens: 5,
        status: 200,
        outcome: "ok".into(),
        tiers_started: vec![tier.into()],
        cost_micros: 40,
        standard_cost_micros: 100,
        received_at: received_at.into(),
        provider_request_id: String::new(),
    }
}

async fn usage_is_counted_once_per_request(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let org = cp.create_org(&meta(), "metered", None).await.unwrap().org;
    let o = &org.org_id;
    let other = cp.create_org(&meta(), "other", None).await.unwrap().org;
    let batch: Vec<String> = [
        usage("r1", o, "flex", "2025-01-01T00:00:00Z"),
        usage("r2", o, "standard", "2025-01-15T12:00:00+02:00"),
        usage("r3", o, "flex", "2025-02-01T00:00:00.250Z"),
        usage("r4", &other.org_id, "flex", "2025-01-02T00:00:00Z"),
    ]
    .iter()
    .map(|e| serde_json::to_string(e).unwrap())
    .collect();
    assert_eq!(cp.report_usage(&batch).await.unwrap(), 4);
    // Redelivery (NATS, proxy spool replay) does not double count.
    assert_eq!(cp.report_usage(&batch[..2]).await.unwrap(), 2);
    assert_eq!(
        cp.record_usage(&[usage("r1", o, "flex", "2025-01-01T00:00:00Z")])
            .await
            .unwrap(),
        0
    );
    let all = cp.get_usage(o, "", "").await.unwrap();
    assert_eq!(all.requests, 3);
    assert_eq!(all.flex_requests, 2);
    assert_eq!(all.input_tokens, 300);
    assert_eq!(all.output_tokens, 150);
    assert_eq!(all.cost_micros, 120);
    assert_eq!(all.standard_cost_micros, 300);
    assert_eq!(all.savings_micros, 180);
    let jan = cp
        .get_usage(o, "2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z")
        .await
        .unwrap();
    assert_eq!(jan.requests, 2, "[from, to): the Feb 1 request is excluded");
    let late = cp.get_usage(o, "2025-02-01T00:00:00.1Z", "").await.unwrap();
    assert_eq!(late.requests, 1);
    assert_eq!(late.flex_requests, 1);
    // Rollups per month and tier add up to the ledger.
    let keyed = |g: &[flex_shared::proto::admin::UsageGroup]| -> Vec<(String, u64, i64)> {
        g.iter()
            .map(|g| (g.key.clone(), g.requests, g.cost_micros))
            .collect()
    };
    let months = cp.get_usage_grouped(o, "", "", "month").await.unwrap();
    assert_eq!(
        keyed(&months.groups),
        vec![("2025-01".into(), 2, 80), ("2025-02".into(), 1, 40)]
    );
    let tiers = cp.get_usage_grouped(o, "", "", "tier").await.unwrap();
    assert_eq!(
        keyed(&tiers.groups),
        vec![("flex".into(), 2, 80), ("standard".into(), 1, 40)]
    );
    let days = cp.get_usage_grouped(o, "", "", "day").await.unwrap();
    assert_eq!(days.groups.len(), 3);
    assert!(cp.get_usage_grouped(o, "", "", "hour").await.is_err());
    // Bad input says what to fix; nothing of a bad batch is recorded.
    let err = cp
        .report_usage(&[
            serde_json::to_string(&usage("r9", o, "flex", "")).unwrap(),
            "{}".into(),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("events_json[1]"), "{err}");
    assert_eq!(cp.get_usage(o, "", "").await.unwrap().requests, 3);
    let err = cp
        .get_usage(o, "2025-02-01T00:00:00Z", "2025-01-01T00:00:00Z")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    let err = cp.get_usage(o, "yesterday", "").await.unwrap_err();
    assert!(err.to_string().contains("RFC 3339"), "{err}");
    assert!(matches!(
        cp.get_usage("org_nope", "", "").await,
        Err(Error::NotFound(_))
    ));
}

async fn commands_validate_against_current_state(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let m = meta();
    assert!(matches!(
        cp.create_org(&m, "", None).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        cp.create_api_key(&m, "org_missing", "k", None, None).await,
        Err(Error::NotFound(_))
    ));
    let org = cp.create_org(&m, "acme", None).await.unwrap().org;
    assert_eq!(org.status, "active");
    assert!(!org.created_at.is_empty());
    let suspended = cp.suspend_org(&m, &org.org_id).await.unwrap();
    assert_eq!(suspended.status, "suspended");
    assert!(matches!(
        cp.suspend_org(&m, &org.org_id).await,
        Err(Error::FailedPrecondition(_))
    ));
    let err = cp
        .create_api_key(&m, &org.org_id, "k", None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert!(err.to_string().contains("reactivate"), "{err}");
    cp.reactivate_org(&m, &org.org_id).await.unwrap();
    let err = cp
        .create_api_key(&m, &org.org_id, "k", Some("2001-01-01T00:00:00Z"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let key = cp
        .create_api_key(&m, &org.org_id, "", None, None)
        .await
        .unwrap();
    assert_eq!(key.key.name, "default");
    cp.revoke_api_key(&m, &key.key.key_id, "").await.unwrap();
    assert!(matches!(
        cp.revoke_api_key(&m, &key.key.key_id, "").await,
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        cp.revoke_api_key(&m, "key_nope", "").await,
        Err(Error::NotFound(_))
    ));
    let err = cp
        .set_provider_key(
            &m,
            &org.org_id,
            "azure",
            &SecretString::from("sk-x".to_string()),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("openai, anthropic or gemini"),
        "{err}"
    );
    assert!(matches!(
        cp.set_provider_key(
            &m,
            &org.org_id,
            "openai",
            &SecretString::from(" \n".to_string())
        )
        .await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        cp.set_provider_key(
            &m,
            "org_nope",
            "openai",
            &SecretString::from("sk-123456789".to_string())
        )
        .await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        cp.remove_provider_key(&m, &org.org_id, "openai").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        cp.set_billing_status(&m, &org.org_id, "overdue").await,
        Err(Error::InvalidArgument(_))
    ));
    let billing = cp.get_billing(&org.org_id).await.unwrap();
    assert_eq!((billing.status.as_str(), billing.fee_bps), ("active", 1000));
    let before = cp.state().last_seq;
    // Declarative no-ops record nothing.
    cp.set_billing_status(&m, &org.org_id, "active")
        .await
        .unwrap();
    cp.rename_org(&m, &org.org_id, "acme").await.unwrap();
    assert_eq!(cp.state().last_seq, before);
    let audit = cp.list_audit_events(&org.org_id).await.unwrap();
    let summaries: Vec<&str> = audit.iter().map(|e| e.summary.as_str()).collect();
    assert!(
        summaries.iter().any(|s| s.contains("suspended")),
        "{summaries:?}"
    );
    assert!(
        summaries
            .iter()
            .any(|s| s.contains("revoked (no reason given)")),
        "{summaries:?}"
    );
    assert!(audit.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(audit
        .iter()
        .all(|e| e.actor == "test" && !e.request_id.is_empty()));
}

async fn bulk_import_keeps_positions_unique_and_folds_like_commands(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let m = Metadata::new("import");
    let row = |stream: &str, version: u64, e: &Event| ImportEvent {
        stream_id: stream.to_string(),
        stream_version: version,
        event: e.to_new().unwrap(),
    };
    // 1,200 events: more than one multi-row INSERT.
    let mut rows = Vec::new();
    for i in 0..400 {
        let org_id = format!("org_imp{i:04}");
        let stream = format!("org-{org_id}");
        rows.push(row(
            &stream,
            1,
            &Event::OrgCreated {
                org_id: org_id.clone(),
                name: format!("imported {i}"),
            },
        ));
        rows.push(row(
            &stream,
            2,
            &Event::OrgRenamed {
                org_id: org_id.clone(),
                name: format!("renamed {i}"),
            },
        ));
        rows.push(row(
            &stream,
            3,
            &Event::OrgSuspended {
                org_id: org_id.clone(),
            },
        ));
    }
    assert_eq!(cp.store().import_events(&[], &m).await.unwrap(), 0);
    let last = cp.store().import_events(&rows, &m).await.unwrap();
    assert_eq!(last, cp.store().head().await.unwrap());
    let all = cp.store().read_all().await.unwrap();
    assert_eq!(all.len(), 1200);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(all.iter().all(|e| e.actor == "import"));

    // A taken position fails the whole batch.
    let clash = vec![
        row(
            "org-org_new",
            1,
            &Event::OrgCreated {
                org_id: "org_new".into(),
                name: "new".into(),
            },
        ),
        rows[1].clone(),
    ];
    let err = cp.store().import_events(&clash, &m).await.unwrap_err();
    assert!(matches!(err, StoreError::ImportConflict { .. }), "{err:?}");
    assert_eq!(cp.store().read_all().await.unwrap().len(), 1200);

    // Imported streams fold like any other and take commands at the next version.
    cp.catch_up().await.unwrap();
    let state = cp.state();
    assert_eq!(state.orgs.len(), 400);
    assert_eq!(state.orgs["org_imp0007"].name, "renamed 7");
    assert_eq!(*state, cp.rebuild().await.unwrap());
    let org = cp.reactivate_org(&meta(), "org_imp0007").await.unwrap();
    assert_eq!(org.status, "active");
    let reopened = db.open(k1()).await;
    assert_eq!(reopened.snapshot().content_hash, cp.snapshot().content_hash);
}

/// The SQLite file holds key hashes and sealed provider keys: owner-only, and so are the `-wal`
/// and `-shm` files SQLite creates next to it (they take the database file's mode).
#[tokio::test]
async fn sqlite_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flex.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let cp = ControlPlane::open(&url, k1()).await.unwrap();
    cp.create_org(&meta(), "acme", None).await.unwrap();
    for name in ["flex.db", "flex.db-wal", "flex.db-shm"] {
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name} has mode {:o}", mode & 0o777);
    }
}
