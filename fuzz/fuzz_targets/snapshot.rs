//! Snapshots and deltas as a proxy receives them (NATS, gRPC, the state file): the encoded bytes
//! applied to a `SnapshotStore` (`apply_update_encoded`, `apply_full_encoded`, whose key table
//! reads the API keys straight from the bytes), and the shared delta rules
//! (`flex_shared::snapshot`).
//!
//! Most inputs fail the content-hash check, so each input is also tried with its hash made
//! right, to reach what lies past it:
//! - a full snapshot applied from its bytes and from its decoded message gives the same result;
//! - a delta applied by the proxy's store gives what the shared rules give, and the same as
//!   applying that result as a full snapshot.
#![no_main]

use flex_data_plane::snapshot::SnapshotStore;
use flex_shared::proto::control::{self as pb, snapshot_update::Kind};
use flex_shared::snapshot as rules;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn base() -> pb::Snapshot {
    let org = |id: &str| pb::OrgEntry {
        org_id: id.into(),
        name: id.into(),
        active: true,
        billing_status: "active".into(),
        fee_bps: 0,
    };
    let key = |id: &str, org: &str, hash: char| pb::ApiKeyEntry {
        key_id: id.into(),
        org_id: org.into(),
        key_hash: hash.to_string().repeat(64),
        expires_at: 0,
    };
    let mut s = pb::Snapshot {
        version: 7,
        orgs: vec![org("o1"), org("o2")],
        api_keys: vec![
            key("key_0123456789abcdef0123456789abcdef", "o1", 'a'),
            key("k2", "o1", 'b'),
            key("k3", "o2", 'c'),
        ],
        provider_keys: vec![pb::ProviderKeyEntry {
            org_id: "o1".into(),
            provider: "openai".into(),
            sealed: Some(pb::SealedSecret::default()),
        }],
        limits: vec![pb::LimitEntry {
            org_id: "o2".into(),
            rpm: 60,
            ..Default::default()
        }],
        produced_at: "2026-01-01T00:00:00Z".into(),
        ..Default::default()
    };
    rules::canonicalize(&mut s);
    s.content_hash = rules::content_hash(&s);
    s
}

/// The store's snapshot as the control plane would hold it (canonical, keys included).
fn held(store: &SnapshotStore) -> Option<pb::Snapshot> {
    store.load().map(|i| {
        let mut s = i.to_proto();
        rules::canonicalize(&mut s);
        s
    })
}

fn with_base() -> SnapshotStore {
    let store = SnapshotStore::new(None, None);
    assert!(
        store.apply_full(base()).is_ok(),
        "the base snapshot applies"
    );
    store
}

fuzz_target!(|data: &[u8]| {
    // The bytes as they come, on an empty store and on one holding a snapshot.
    let _ = SnapshotStore::new(None, None).apply_update_encoded(data);
    let _ = SnapshotStore::new(None, None).apply_full_encoded(data);
    let store = with_base();
    let _ = store.apply_update_encoded(data);

    // A full snapshot with its hash made right: from its bytes and from its message alike. The
    // hash field is appended to the input's own bytes (the last value of a field wins), so the
    // bytes the key table reads are the fuzzer's, not a re-encoding.
    if let Ok(mut s) = pb::Snapshot::decode(data) {
        s.content_hash = rules::content_hash(&s);
        let mut bytes = data.to_vec();
        prost::encoding::string::encode(2, &s.content_hash, &mut bytes);
        let from_bytes = SnapshotStore::new(None, None);
        let from_message = SnapshotStore::new(None, None);
        let a = from_bytes
            .apply_full_encoded(&bytes)
            .map_err(|e| e.to_string());
        let b = from_message
            .apply_full(s.clone())
            .map_err(|e| e.to_string());
        assert_eq!(a.is_ok(), b.is_ok(), "bytes: {a:?}, message: {b:?}");
        assert_eq!(held(&from_bytes), held(&from_message));
    }

    // A delta on the base with its versions and hash made right.
    if let Ok(mut u) = pb::SnapshotUpdate::decode(data) {
        let Some(Kind::Delta(d)) = u.kind.as_mut() else {
            return;
        };
        let b = base();
        d.from_version = b.version;
        u.version = u.version.max(b.version);
        let Ok(mut want) = rules::apply_delta_unchecked(&b, u.version, d) else {
            return;
        };
        want.content_hash = rules::content_hash(&want);
        d.content_hash = want.content_hash.clone();
        let store = with_base();
        let got = store.apply_update(u.clone()).map_err(|e| e.to_string());
        let full = SnapshotStore::new(None, None);
        let as_full = full.apply_full(want.clone()).map_err(|e| e.to_string());
        if got.is_ok() {
            assert_eq!(
                held(&store).as_ref(),
                Some(&want),
                "delta vs the shared rules"
            );
        }
        assert_eq!(
            got.is_ok(),
            as_full.is_ok(),
            "delta: {got:?}, as a full snapshot: {as_full:?}"
        );
        if got.is_ok() {
            assert_eq!(held(&store), held(&full));
        }
        // The encoded path gives the same as the decoded one.
        let encoded = with_base();
        let e = encoded
            .apply_update_encoded(&u.encode_to_vec())
            .map_err(|e| e.to_string());
        assert_eq!(e.is_ok(), got.is_ok(), "encoded: {e:?}, decoded: {got:?}");
    }
});
