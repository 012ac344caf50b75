//! Snapshot rules both planes share: the content hash and how a delta applies.
//!
//! The version of a snapshot is the event-log position it reflects. The content hash is the hex
//! SHA-256 of the protobuf encoding of the snapshot's entries in canonical (sorted) order, with
//! the version, hash and timestamp fields cleared, so the proxy can check that what it built from
//! a delta is exactly what the control plane has.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::proto::control::{Snapshot, SnapshotDelta};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error(
        "delta starts at version {from} but the proxy has version {have}; a full resync is needed"
    )]
    VersionGap { from: u64, have: u64 },
    #[error("content hash mismatch after applying version {version}: expected {expected}, computed {computed}")]
    HashMismatch {
        version: u64,
        expected: String,
        computed: String,
    },
    #[error("invalid snapshot: {0}")]
    Invalid(String),
}

/// Sorts every list of the snapshot into canonical order.
pub fn canonicalize(s: &mut Snapshot) {
    s.orgs.sort_by(|a, b| a.org_id.cmp(&b.org_id));
    s.api_keys.sort_by(|a, b| a.key_hash.cmp(&b.key_hash));
    s.provider_keys
        .sort_by(|a, b| (&a.org_id, &a.provider).cmp(&(&b.org_id, &b.provider)));
    s.models.sort_by(|a, b| a.id.cmp(&b.id));
}

/// The content hash of a snapshot (see the module docs).
pub fn content_hash(s: &Snapshot) -> String {
    let mut c = s.clone();
    canonicalize(&mut c);
    c.version = 0;
    c.content_hash.clear();
    c.produced_at.clear();
    hex::encode(Sha256::digest(c.encode_to_vec()))
}

/// Structural checks a proxy runs before applying a snapshot.
pub fn validate(s: &Snapshot) -> Result<(), SnapshotError> {
    let computed = content_hash(s);
    if computed != s.content_hash {
        return Err(SnapshotError::HashMismatch {
            version: s.version,
            expected: s.content_hash.clone(),
            computed,
        });
    }
    for k in &s.api_keys {
        if k.key_hash.len() != 64 || !k.key_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SnapshotError::Invalid(format!(
                "api key {} has a malformed hash",
                k.key_id
            )));
        }
        if !s.orgs.iter().any(|o| o.org_id == k.org_id) {
            return Err(SnapshotError::Invalid(format!(
                "api key {} belongs to unknown org {}",
                k.key_id, k.org_id
            )));
        }
    }
    for p in &s.provider_keys {
        if p.sealed.is_none() {
            return Err(SnapshotError::Invalid(format!(
                "provider key {}/{} has no ciphertext",
                p.org_id, p.provider
            )));
        }
    }
    Ok(())
}

/// Applies a delta to `base`, producing the snapshot at `version`, checked against the hash.
pub fn apply_delta(
    base: &Snapshot,
    version: u64,
    d: &SnapshotDelta,
) -> Result<Snapshot, SnapshotError> {
    if d.from_version != base.version {
        return Err(SnapshotError::VersionGap {
            from: d.from_version,
            have: base.version,
        });
    }
    let mut s = base.clone();
    for o in &d.upsert_orgs {
        match s.orgs.iter_mut().find(|x| x.org_id == o.org_id) {
            Some(slot) => *slot = o.clone(),
            None => s.orgs.push(o.clone()),
        }
    }
    s.api_keys
        .retain(|k| !d.remove_api_key_hashes.contains(&k.key_hash));
    for k in &d.upsert_api_keys {
        match s.api_keys.iter_mut().find(|x| x.key_hash == k.key_hash) {
            Some(slot) => *slot = k.clone(),
            None => s.api_keys.push(k.clone()),
        }
    }
    s.provider_keys.retain(|p| {
        !d.remove_provider_keys
            .iter()
            .any(|r| r.org_id == p.org_id && r.provider == p.provider)
    });
    for p in &d.upsert_provider_keys {
        match s
            .provider_keys
            .iter_mut()
            .find(|x| x.org_id == p.org_id && x.provider == p.provider)
        {
            Some(slot) => *slot = p.clone(),
            None => s.provider_keys.push(p.clone()),
        }
    }
    for m in &d.upsert_models {
        match s.models.iter_mut().find(|x| x.id == m.id) {
            Some(slot) => *slot = m.clone(),
            None => s.models.push(m.clone()),
        }
    }
    canonicalize(&mut s);
    s.version = version;
    s.content_hash = d.content_hash.clone();
    let computed = content_hash(&s);
    if computed != d.content_hash {
        return Err(SnapshotError::HashMismatch {
            version,
            expected: d.content_hash.clone(),
            computed,
        });
    }
    Ok(s)
}

/// The delta that turns `old` into `new` (both canonical).
pub fn diff(old: &Snapshot, new: &Snapshot) -> SnapshotDelta {
    let mut d = SnapshotDelta {
        from_version: old.version,
        content_hash: new.content_hash.clone(),
        ..Default::default()
    };
    for o in &new.orgs {
        if !old.orgs.contains(o) {
            d.upsert_orgs.push(o.clone());
        }
    }
    for k in &new.api_keys {
        if !old.api_keys.contains(k) {
            d.upsert_api_keys.push(k.clone());
        }
    }
    for k in &old.api_keys {
        if !new.api_keys.iter().any(|n| n.key_hash == k.key_hash) {
            d.remove_api_key_hashes.push(k.key_hash.clone());
        }
    }
    for p in &new.provider_keys {
        if !old.provider_keys.contains(p) {
            d.upsert_provider_keys.push(p.clone());
        }
    }
    for p in &old.provider_keys {
        if !new
            .provider_keys
            .iter()
            .any(|n| n.org_id == p.org_id && n.provider == p.provider)
        {
            d.remove_provider_keys
                .push(crate::proto::control::ProviderKeyRef {
                    org_id: p.org_id.clone(),
                    provider: p.provider.clone(),
                });
        }
    }
    for m in &new.models {
        if !old.models.contains(m) {
            d.upsert_models.push(m.clone());
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::control::{ApiKeyEntry, OrgEntry};

    fn org(id: &str) -> OrgEntry {
        OrgEntry {
            org_id: id.into(),
            name: id.into(),
            active: true,
            billing_status: "active".into(),
            fee_bps: 0,
        }
    }

    fn key(org: &str, n: u8) -> ApiKeyEntry {
        ApiKeyEntry {
            key_id: format!("key_{n}"),
            org_id: org.into(),
            key_hash: format!("{:064x}", n),
            expires_at: 0,
        }
    }

    fn snap(version: u64, orgs: Vec<OrgEntry>, keys: Vec<ApiKeyEntry>) -> Snapshot {
        let mut s = Snapshot {
            version,
            orgs,
            api_keys: keys,
            ..Default::default()
        };
        canonicalize(&mut s);
        s.content_hash = content_hash(&s);
        s
    }

    #[test]
    fn hash_ignores_order_and_version() {
        let a = snap(1, vec![org("a"), org("b")], vec![key("a", 1), key("b", 2)]);
        let b = snap(9, vec![org("b"), org("a")], vec![key("b", 2), key("a", 1)]);
        assert_eq!(a.content_hash, b.content_hash);
        assert_eq!(validate(&a), Ok(()));
    }

    #[test]
    fn diff_then_apply_reproduces_the_new_snapshot() {
        let old = snap(3, vec![org("a")], vec![key("a", 1), key("a", 2)]);
        let mut suspended = org("a");
        suspended.active = false;
        let new = snap(7, vec![suspended, org("b")], vec![key("a", 2), key("b", 3)]);
        let d = diff(&old, &new);
        assert_eq!(d.remove_api_key_hashes.len(), 1);
        let applied = apply_delta(&old, 7, &d).expect("applies");
        assert_eq!(applied, new);
    }

    #[test]
    fn a_gap_or_a_corrupt_delta_is_refused() {
        let old = snap(3, vec![org("a")], vec![]);
        let new = snap(5, vec![org("a"), org("b")], vec![]);
        let mut d = diff(&old, &new);
        let other = snap(4, vec![org("a")], vec![]);
        assert!(matches!(
            apply_delta(&other, 5, &d),
            Err(SnapshotError::VersionGap { .. })
        ));
        d.content_hash = "00".into();
        assert!(matches!(
            apply_delta(&old, 5, &d),
            Err(SnapshotError::HashMismatch { .. })
        ));
    }

    #[test]
    fn validation_catches_tampering_and_dangling_keys() {
        let mut s = snap(1, vec![org("a")], vec![key("a", 1)]);
        s.orgs[0].active = false;
        assert!(matches!(
            validate(&s),
            Err(SnapshotError::HashMismatch { .. })
        ));
        let s = snap(1, vec![org("a")], vec![key("zzz", 1)]);
        assert!(matches!(validate(&s), Err(SnapshotError::Invalid(_))));
    }
}
