//! Snapshot rules both planes share: the content hash and how a delta applies.
//!
//! The version of a snapshot is the event-log position it reflects. The content hash is a
//! multiset hash of the snapshot's entries ([`ContentHash`]): order-independent and updatable
//! entry by entry, so both planes keep it current in time proportional to a change, not to the
//! number of keys, and a proxy can check that what it built from a delta is exactly what the
//! control plane has.

use std::collections::{HashMap, HashSet};

use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::proto::control::{ApiKeyEntry, LimitEntry, LimitRef, Snapshot, SnapshotDelta};

/// The canonical order of limit entries: by org, then key (the org's own entry, key empty, first).
pub fn limit_id(l: &LimitEntry) -> (&str, &str) {
    (l.org_id.as_str(), l.key_id.as_str())
}

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
    s.limits.sort_by(|a, b| limit_id(a).cmp(&limit_id(b)));
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
        && s.limits
            .windows(2)
            .all(|w| limit_id(&w[0]) <= limit_id(&w[1]))
}

/// The content hash of a snapshot (see the module docs).
pub fn content_hash(s: &Snapshot) -> String {
    let mut h = ContentHash::default();
    for o in &s.orgs {
        h.add(3, o);
    }
    for k in &s.api_keys {
        h.add(4, k);
    }
    for p in &s.provider_keys {
        h.add(5, p);
    }
    for m in &s.models {
        h.add(6, m);
    }
    for l in &s.limits {
        h.add(8, l);
    }
    h.to_hex()
}

/// The digest of one entry: the SHA-256 of its encoding as an element of `Snapshot` field
/// `tag` (tag, length, bytes), read as a little-endian 256-bit number.
pub fn entry_digest<M: Message>(tag: u32, m: &M) -> Digest256 {
    let mut buf = Vec::with_capacity(m.encoded_len() + 8);
    prost::encoding::message::encode(tag, m, &mut buf);
    Digest256::of_encoded(&buf)
}

/// A 256-bit number: an entry digest, or a sum of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Digest256([u64; 4]);

impl Digest256 {
    /// The digest of an entry already encoded as a `Snapshot` field element.
    pub fn of_encoded(bytes: &[u8]) -> Self {
        let d = Sha256::digest(bytes);
        let mut limbs = [0u64; 4];
        for (limb, chunk) in limbs.iter_mut().zip(d.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *limb = u64::from_le_bytes(b);
        }
        Self(limbs)
    }

    fn add(&mut self, o: &Self) {
        let mut carry = false;
        for (a, b) in self.0.iter_mut().zip(o.0) {
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            *a = s2;
            carry = c1 || c2;
        }
    }

    fn sub(&mut self, o: &Self) {
        let mut borrow = false;
        for (a, b) in self.0.iter_mut().zip(o.0) {
            let (d1, b1) = a.overflowing_sub(b);
            let (d2, b2) = d1.overflowing_sub(u64::from(borrow));
            *a = d2;
            borrow = b1 || b2;
        }
    }
}

/// The content hash as a running sum: entries are added and removed one by one, in any order, so
/// a holder of millions of entries updates it in time proportional to what changed. The hash of
/// a snapshot is the sum, modulo 2^256, of the digests of its entries ([`entry_digest`]), as 64
/// hex digits (little-endian). It detects a proxy whose state has diverged from the control
/// plane's (a lost, repeated or corrupted update); it is not a signature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ContentHash {
    sum: Digest256,
}

impl ContentHash {
    pub fn add<M: Message>(&mut self, tag: u32, m: &M) {
        self.add_digest(&entry_digest(tag, m));
    }

    pub fn remove<M: Message>(&mut self, tag: u32, m: &M) {
        self.remove_digest(&entry_digest(tag, m));
    }

    pub fn add_digest(&mut self, d: &Digest256) {
        self.sum.add(d);
    }

    pub fn remove_digest(&mut self, d: &Digest256) {
        self.sum.sub(d);
    }

    /// Adds another sum (e.g. the API keys' part, kept apart).
    pub fn combine(&mut self, other: &ContentHash) {
        self.sum.add(&other.sum);
    }

    pub fn to_hex(&self) -> String {
        let mut bytes = [0u8; 32];
        for (chunk, limb) in bytes.chunks_exact_mut(8).zip(self.sum.0) {
            chunk.copy_from_slice(&limb.to_le_bytes());
        }
        hex::encode(bytes)
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
    for l in &s.limits {
        check_limit(l, &orgs)?;
    }
    Ok(())
}

/// A limit entry must name a known org and carry at least one limit, with budgets not negative.
pub fn check_limit(l: &LimitEntry, orgs: &HashSet<&str>) -> Result<(), SnapshotError> {
    if !orgs.contains(l.org_id.as_str()) {
        return Err(SnapshotError::Invalid(format!(
            "limits of {}/{} belong to unknown org {}",
            l.org_id, l.key_id, l.org_id
        )));
    }
    if l.daily_budget_micros < 0 || l.monthly_budget_micros < 0 {
        return Err(SnapshotError::Invalid(format!(
            "limits of {}/{} have a negative budget",
            l.org_id, l.key_id
        )));
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
    apply_limit_changes(&mut s.limits, &d.upsert_limits, &d.remove_limits);
    canonicalize(&mut s);
    s.version = version;
    s.content_hash = d.content_hash.clone();
    if !d.produced_at.is_empty() {
        s.produced_at = d.produced_at.clone();
    }
    Ok(s)
}

/// Limits: `remove` taken out, then `upsert` put in (replacing an entry of the same org and key).
fn apply_limit_changes(limits: &mut Vec<LimitEntry>, upsert: &[LimitEntry], remove: &[LimitRef]) {
    if !remove.is_empty() {
        let gone: HashSet<(&str, &str)> = remove
            .iter()
            .map(|r| (r.org_id.as_str(), r.key_id.as_str()))
            .collect();
        limits.retain(|l| !gone.contains(&limit_id(l)));
    }
    for l in upsert {
        match limits.iter_mut().find(|x| limit_id(x) == limit_id(l)) {
            Some(slot) => *slot = l.clone(),
            None => limits.push(l.clone()),
        }
    }
}

/// The delta that turns `old` into `new` (both canonical).
pub fn diff(old: &Snapshot, new: &Snapshot) -> SnapshotDelta {
    let mut d = SnapshotDelta {
        from_version: old.version,
        content_hash: new.content_hash.clone(),
        produced_at: new.produced_at.clone(),
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
    for l in &new.limits {
        if !old.limits.contains(l) {
            d.upsert_limits.push(l.clone());
        }
    }
    for l in &old.limits {
        if !new.limits.iter().any(|n| limit_id(n) == limit_id(l)) {
            d.remove_limits.push(LimitRef {
                org_id: l.org_id.clone(),
                key_id: l.key_id.clone(),
            });
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
    /// `1` on a heartbeat: an empty delta from the version to itself with a fresh `produced_at`
    /// (a proxy applies it although its version is the one it has, instead of skipping it).
    pub const HEADER_HEARTBEAT: &str = "Flex-Heartbeat";

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
    use sha2::Digest;

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
    fn the_hash_is_the_sum_of_the_entry_digests_and_updates_in_place() {
        let mut s = snap(9, vec![org("b"), org("a")], vec![key("b", 2), key("a", 1)]);
        s.models.push(crate::proto::control::ModelEntry {
            id: "m".into(),
            ..Default::default()
        });
        s.produced_at = "2026-01-01T00:00:00Z".into();
        // The reference: each entry's field encoding hashed, summed mod 2^256 little-endian.
        let mut entries: Vec<Vec<u8>> = Vec::new();
        for o in &s.orgs {
            entries.push(Vec::new());
            prost::encoding::message::encode(3, o, entries.last_mut().unwrap());
        }
        for k in &s.api_keys {
            entries.push(Vec::new());
            prost::encoding::message::encode(4, k, entries.last_mut().unwrap());
        }
        for m in &s.models {
            entries.push(Vec::new());
            prost::encoding::message::encode(6, m, entries.last_mut().unwrap());
        }
        let mut sum = [0u8; 32];
        for e in &entries {
            let d = Sha256::digest(e);
            let mut carry = 0u16;
            for i in 0..32 {
                let v = u16::from(sum[i]) + u16::from(d[i]) + carry;
                sum[i] = (v & 0xff) as u8;
                carry = v >> 8;
            }
        }
        assert_eq!(content_hash(&s), hex::encode(sum));

        // Removing an entry and adding another, in any order, lands on the rebuilt hash.
        let mut running = ContentHash::default();
        for o in &s.orgs {
            running.add(3, o);
        }
        for k in &s.api_keys {
            running.add(4, k);
        }
        running.add(4, &key("a", 7));
        running.remove(4, &s.api_keys[0]);
        for m in &s.models {
            running.add(6, m);
        }
        let removed = s.api_keys.remove(0);
        s.api_keys.push(key("a", 7));
        assert_eq!(running.to_hex(), content_hash(&s));
        assert_ne!(content_hash(&s), {
            s.api_keys.push(removed);
            content_hash(&s)
        });
        assert_eq!(ContentHash::default().to_hex(), "0".repeat(64));
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

    fn limit(org: &str, key: &str, rpm: u64) -> LimitEntry {
        LimitEntry {
            org_id: org.into(),
            key_id: key.into(),
            rpm,
            ..Default::default()
        }
    }

    #[test]
    fn limits_are_hashed_diffed_and_applied() {
        let mut old = snap(3, vec![org("a"), org("b")], vec![key("a", 1)]);
        old.limits = vec![limit("b", "", 5), limit("a", "key_1", 7), limit("a", "", 9)];
        canonicalize(&mut old);
        assert_eq!(
            old.limits.iter().map(limit_id).collect::<Vec<_>>(),
            vec![("a", ""), ("a", "key_1"), ("b", "")]
        );
        old.content_hash = content_hash(&old);
        let mut new = old.clone();
        new.version = 4;
        new.limits.retain(|l| l.org_id != "b");
        new.limits[1].rpm = 70;
        new.limits.push(limit("b", "key_9", 1));
        canonicalize(&mut new);
        new.content_hash = content_hash(&new);
        assert_ne!(
            old.content_hash, new.content_hash,
            "limits are part of the hash"
        );
        let d = diff(&old, &new);
        assert_eq!(d.upsert_limits.len(), 2);
        assert_eq!(d.remove_limits.len(), 1);
        assert_eq!(apply_delta(&old, 4, &d).unwrap(), new);
        assert_eq!(validate(&new), Ok(()));
        let mut dangling = new.clone();
        dangling.limits.push(limit("zzz", "", 1));
        dangling.content_hash = content_hash(&dangling);
        assert!(matches!(
            validate(&dangling),
            Err(SnapshotError::Invalid(_))
        ));
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
