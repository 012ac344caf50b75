//! Snapshot rules both planes share: the content hash and how a delta applies.
//!
//! The version of a snapshot is the event-log position it reflects. The content hash is the hex
//! SHA-256 of the protobuf encoding of the snapshot's entries in canonical (sorted) order, with
//! the version, hash and timestamp fields cleared, so the proxy can check that what it built from
//! a delta is exactly what the control plane has.

use std::collections::{HashMap, HashSet};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::proto::control::{ApiKeyEntry, Snapshot, SnapshotDelta};

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

/// Whether every list is in canonical order already.
pub fn is_canonical(s: &Snapshot) -> bool {
    s.orgs.windows(2).all(|w| w[0].org_id <= w[1].org_id)
        && s.api_keys
            .windows(2)
            .all(|w| w[0].key_hash <= w[1].key_hash)
        && s.provider_keys
            .windows(2)
            .all(|w| (&w[0].org_id, &w[0].provider) <= (&w[1].org_id, &w[1].provider))
        && s.models.windows(2).all(|w| w[0].id <= w[1].id)
}

/// The content hash of a snapshot (see the module docs).
pub fn content_hash(s: &Snapshot) -> String {
    if !is_canonical(s) {
        let mut c = s.clone();
        canonicalize(&mut c);
        return content_hash(&c);
    }
    let mut h = ContentHasher::new();
    h.orgs(&s.orgs);
    for k in &s.api_keys {
        h.message(4, k);
    }
    h.provider_keys(&s.provider_keys);
    h.models(&s.models);
    h.finish()
}

/// The content hash computed piece by piece, in field order (orgs, API keys, provider keys,
/// models, each list in canonical order), without building the snapshot: the SHA-256 of the
/// protobuf encoding of a snapshot whose version, hash and time are cleared. A holder that keeps
/// the API keys in its own representation feeds their encoding with [`ContentHasher::raw`].
pub struct ContentHasher {
    sha: Sha256,
    buf: Vec<u8>,
}

impl Default for ContentHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl ContentHasher {
    const FLUSH: usize = 1 << 16;

    pub fn new() -> Self {
        Self {
            sha: Sha256::new(),
            buf: Vec::with_capacity(Self::FLUSH + 1024),
        }
    }

    fn flush_if_full(&mut self) {
        if self.buf.len() >= Self::FLUSH {
            self.sha.update(&self.buf);
            self.buf.clear();
        }
    }

    /// One repeated message field element of `Snapshot`.
    pub fn message<M: Message>(&mut self, tag: u32, m: &M) {
        prost::encoding::message::encode(tag, m, &mut self.buf);
        self.flush_if_full();
    }

    /// Bytes already encoded (e.g. API keys as field 4 elements).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.flush_if_full();
    }

    pub fn orgs(&mut self, orgs: &[crate::proto::control::OrgEntry]) {
        for o in orgs {
            self.message(3, o);
        }
    }

    pub fn provider_keys(&mut self, keys: &[crate::proto::control::ProviderKeyEntry]) {
        for p in keys {
            self.message(5, p);
        }
    }

    pub fn models(&mut self, models: &[crate::proto::control::ModelEntry]) {
        for m in models {
            self.message(6, m);
        }
    }

    pub fn finish(mut self) -> String {
        self.sha.update(&self.buf);
        hex::encode(self.sha.finalize())
    }
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
    let orgs: HashSet<&str> = s.orgs.iter().map(|o| o.org_id.as_str()).collect();
    for k in &s.api_keys {
        if k.key_hash.len() != 64 || !k.key_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SnapshotError::Invalid(format!(
                "api key {} has a malformed hash",
                k.key_id
            )));
        }
        if !orgs.contains(k.org_id.as_str()) {
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
    let s = apply_delta_unchecked(base, version, d)?;
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

/// As [`apply_delta`] without the content-hash check (for a holder that hashes its own
/// representation, e.g. a proxy keeping the API keys apart).
pub fn apply_delta_unchecked(
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
    // Keys can number in the millions: one pass with hashed lookups, not a scan per change.
    let removed: HashSet<&str> = d.remove_api_key_hashes.iter().map(String::as_str).collect();
    let mut upserts: HashMap<&str, &ApiKeyEntry> = d
        .upsert_api_keys
        .iter()
        .map(|k| (k.key_hash.as_str(), k))
        .collect();
    if !removed.is_empty() {
        s.api_keys
            .retain(|k| !removed.contains(k.key_hash.as_str()));
    }
    if !upserts.is_empty() {
        for slot in &mut s.api_keys {
            if let Some(k) = upserts.remove(slot.key_hash.as_str()) {
                *slot = k.clone();
            }
        }
        // What is left is new; keep the delta's order so the result does not depend on hashing.
        for k in &d.upsert_api_keys {
            if upserts.contains_key(k.key_hash.as_str()) {
                s.api_keys.push(k.clone());
            }
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
    diff_keys(&old.api_keys, &new.api_keys, &mut d);
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

/// Key changes from `old` to `new`: a merge of the two lists when both are in canonical order
/// (one pass, no hashing: keys can number in the millions), hashed lookups otherwise.
fn diff_keys(old: &[ApiKeyEntry], new: &[ApiKeyEntry], d: &mut SnapshotDelta) {
    let sorted = |v: &[ApiKeyEntry]| v.windows(2).all(|w| w[0].key_hash <= w[1].key_hash);
    if sorted(old) && sorted(new) {
        let (mut i, mut j) = (0, 0);
        loop {
            match (old.get(i), new.get(j)) {
                (Some(o), Some(n)) => match o.key_hash.cmp(&n.key_hash) {
                    std::cmp::Ordering::Less => {
                        d.remove_api_key_hashes.push(o.key_hash.clone());
                        i += 1;
                    }
                    std::cmp::Ordering::Greater => {
                        d.upsert_api_keys.push(n.clone());
                        j += 1;
                    }
                    std::cmp::Ordering::Equal => {
                        if o != n {
                            d.upsert_api_keys.push(n.clone());
                        }
                        i += 1;
                        j += 1;
                    }
                },
                (Some(o), None) => {
                    d.remove_api_key_hashes.push(o.key_hash.clone());
                    i += 1;
                }
                (None, Some(n)) => {
                    d.upsert_api_keys.push(n.clone());
                    j += 1;
                }
                (None, None) => return,
            }
        }
    }
    let old_keys: HashMap<&str, &ApiKeyEntry> =
        old.iter().map(|k| (k.key_hash.as_str(), k)).collect();
    for k in new {
        if old_keys.get(k.key_hash.as_str()) != Some(&k) {
            d.upsert_api_keys.push(k.clone());
        }
    }
    let new_keys: HashSet<&str> = new.iter().map(|k| k.key_hash.as_str()).collect();
    for k in old {
        if !new_keys.contains(k.key_hash.as_str()) {
            d.remove_api_key_hashes.push(k.key_hash.clone());
        }
    }
}

/// How snapshots travel over NATS JetStream (the contract between the publisher in the control
/// plane and the proxies that follow it).
///
/// One stream, [`nats::STREAM`], holds every published version in order: full snapshots on
/// [`nats::FULL_SUBJECT`], deltas on [`nats::DELTA_SUBJECT`]. Each message is a prost-encoded
/// `SnapshotUpdate` (split into numbered chunks when it is larger than the server's
/// `max_payload`) with the headers below. A proxy follows the stream with an ordered consumer
/// from the stream sequence after the last update it applied, or from the first chunk of the
/// newest full snapshot. Proxies report what they applied on `flex.snapshot.ack.<token>` (core
/// NATS, a prost-encoded `AckRequest`).
pub mod nats {
    /// The JetStream stream.
    pub const STREAM: &str = "FLEX_SNAPSHOTS";
    /// Full snapshots.
    pub const FULL_SUBJECT: &str = "flex.snapshot.full";
    /// Deltas from the previous published version.
    pub const DELTA_SUBJECT: &str = "flex.snapshot.delta";
    /// Prefix of the acknowledgement subjects; the control plane listens on `PREFIX.>`.
    pub const ACK_PREFIX: &str = "flex.snapshot.ack";
    /// The version the update brings a proxy to (decimal).
    pub const HEADER_VERSION: &str = "Flex-Version";
    /// `i/n`: this message is chunk `i` (from 0) of `n`; absent = one message.
    pub const HEADER_CHUNK: &str = "Flex-Chunk";
    /// On every chunk after the first: the stream sequence of chunk 0.
    pub const HEADER_FIRST_SEQ: &str = "Flex-First-Seq";

    /// The ack subject of a proxy: its id with the characters NATS reserves replaced.
    pub fn ack_subject(proxy_id: &str) -> String {
        let token: String = proxy_id
            .chars()
            .map(|c| {
                if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        format!("{ACK_PREFIX}.{token}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::control::OrgEntry;

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
    fn the_streamed_hash_is_the_hash_of_the_cleared_encoding() {
        let mut s = snap(9, vec![org("b"), org("a")], vec![key("b", 2), key("a", 1)]);
        s.api_keys[0].expires_at = -5;
        s.api_keys[1].key_id.clear();
        s.models.push(crate::proto::control::ModelEntry {
            id: "m".into(),
            ..Default::default()
        });
        s.produced_at = "2026-01-01T00:00:00Z".into();
        let mut c = s.clone();
        canonicalize(&mut c);
        c.version = 0;
        c.content_hash.clear();
        c.produced_at.clear();
        let reference = hex::encode(Sha256::digest(c.encode_to_vec()));
        assert_eq!(content_hash(&s), reference);
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
