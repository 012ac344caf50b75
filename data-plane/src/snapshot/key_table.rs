//! The API keys of a snapshot as the proxy holds them: compact and sorted, for millions of keys.
//!
//! One entry is 64 bytes: the SHA-256 of the key (32 bytes, binary) in one sorted array, and in a
//! parallel array the key id (a `key_` + 32-hex id packed into a `u128`; any other id is kept
//! aside by hash), the expiry and the org (an index into an interned list of org ids). Lookups
//! are a binary search. The arrays are shared (`Arc`) by every table derived from them: a delta
//! goes into a small sorted overlay in front of them (upserts, and tombstones for removed keys),
//! so applying it costs O(changes × log keys), not a copy of a million entries; when the overlay
//! outgrows its limit (4,096 + keys/128 entries) it is merged into new arrays in one pass. The
//! keys' part of the content hash is a running sum of per-entry digests (each entry encoded
//! exactly as the protobuf `ApiKeyEntry` would be), updated only for the entries a delta touches,
//! so no `Snapshot` with millions of strings is ever held and revoking one key re-hashes nothing
//! else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use flex_shared::proto::control as pb;
use prost::encoding::{
    decode_key, decode_varint, encode_varint, encoded_len_varint, skip_field, DecodeContext,
    WireType,
};

use flex_shared::snapshot::{ContentHash, Digest256};

use super::KeyEntry;

/// An API key entry borrowed from a protobuf message or its bytes.
#[derive(Clone, Copy)]
struct KeyRef<'a> {
    key_id: &'a str,
    org_id: &'a str,
    key_hash: &'a str,
    expires_at: i64,
}

impl<'a> From<&'a pb::ApiKeyEntry> for KeyRef<'a> {
    fn from(k: &'a pb::ApiKeyEntry) -> Self {
        Self {
            key_id: &k.key_id,
            org_id: &k.org_id,
            key_hash: &k.key_hash,
            expires_at: k.expires_at,
        }
    }
}

/// A length-delimited field's bytes.
fn take_len<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len =
        usize::try_from(decode_varint(b).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    if len > b.len() {
        return Err("truncated field".into());
    }
    let (v, r) = b.split_at(len);
    *b = r;
    Ok(v)
}

/// An encoded `ApiKeyEntry`, read in place.
fn parse_entry(mut b: &[u8]) -> Result<KeyRef<'_>, String> {
    let mut k = KeyRef {
        key_id: "",
        org_id: "",
        key_hash: "",
        expires_at: 0,
    };
    while !b.is_empty() {
        let (tag, wire) = decode_key(&mut b).map_err(|e| e.to_string())?;
        match (tag, wire) {
            (1..=3, WireType::LengthDelimited) => {
                let v = std::str::from_utf8(take_len(&mut b)?)
                    .map_err(|_| "api key entry with a string that is not UTF-8".to_string())?;
                match tag {
                    1 => k.key_id = v,
                    2 => k.org_id = v,
                    _ => k.key_hash = v,
                }
            }
            (4, WireType::Varint) => {
                k.expires_at = decode_varint(&mut b).map_err(|e| e.to_string())? as i64;
            }
            _ => skip_field(wire, tag, &mut b, DecodeContext::default())
                .map_err(|e| e.to_string())?,
        }
    }
    Ok(k)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rest {
    /// The id's 32 hex digits when it is `key_<32 lowercase hex>`; else `odd` is set.
    id: u128,
    expires_at: i64,
    org: u32,
    odd: bool,
}

/// An entry outside the sorted arrays: its fields and, for an odd id, the id itself.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    rest: Rest,
    odd_id: Option<String>,
}

/// The sorted arrays, shared by every table built from them by deltas.
#[derive(Debug, Default)]
struct Base {
    hashes: Vec<[u8; 32]>,
    rest: Vec<Rest>,
    /// Key ids that are not `key_<32 hex>`, by key hash.
    odd_ids: HashMap<[u8; 32], String>,
}

impl Base {
    fn find(&self, h: &[u8; 32]) -> Option<usize> {
        self.hashes.binary_search(h).ok()
    }
}

/// Interned org ids (append-only; orgs are never deleted).
#[derive(Debug, Clone, Default)]
struct Orgs {
    ids: Vec<String>,
    index: HashMap<String, u32>,
}

/// The API keys of one snapshot, by hash: a sorted base plus a small overlay of what deltas
/// changed since the base was built (`None` = removed from the base).
#[derive(Debug, Clone, Default)]
pub struct KeyTable {
    base: Arc<Base>,
    overlay: BTreeMap<[u8; 32], Option<Slot>>,
    orgs: Arc<Orgs>,
    len: usize,
    /// The keys' part of the snapshot's content hash, kept current entry by entry.
    sum: ContentHash,
}

/// One entry, wherever it lives.
#[derive(Clone, Copy)]
struct View<'a> {
    hash: &'a [u8; 32],
    rest: Rest,
    odd_id: Option<&'a str>,
}

/// A 64-character lowercase hex SHA-256.
fn parse_hash(hex_hash: &str) -> Option<[u8; 32]> {
    if hex_hash.len() != 64
        || !hex_hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut out).ok()?;
    Some(out)
}

fn parse_id(key_id: &str) -> Option<u128> {
    let digits = key_id.strip_prefix("key_")?;
    if digits.len() != 32
        || !digits
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u128::from_str_radix(digits, 16).ok()
}

fn field_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        1 + encoded_len_varint(len as u64) + len
    }
}

fn put_field(buf: &mut Vec<u8>, key: u8, bytes: &[u8]) {
    if !bytes.is_empty() {
        buf.push(key);
        encode_varint(bytes.len() as u64, buf);
        buf.extend_from_slice(bytes);
    }
}

impl KeyTable {
    /// The overlay is merged into a new base once it holds more than this many entries.
    fn overlay_limit(&self) -> usize {
        4096 + self.base.hashes.len() / 128
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn lookup(&self, h: &[u8; 32]) -> Option<View<'_>> {
        if let Some((hash, slot)) = self.overlay.get_key_value(h) {
            return slot.as_ref().map(|s| View {
                hash,
                rest: s.rest,
                odd_id: s.odd_id.as_deref(),
            });
        }
        let i = self.base.find(h)?;
        Some(self.base_view(i))
    }

    fn base_view(&self, i: usize) -> View<'_> {
        let hash = &self.base.hashes[i];
        let rest = self.base.rest[i];
        View {
            hash,
            rest,
            odd_id: if rest.odd {
                self.base.odd_ids.get(hash).map(String::as_str)
            } else {
                None
            },
        }
    }

    /// The key with this hex hash, if present.
    pub fn get(&self, hex_hash: &str) -> Option<KeyEntry> {
        let h = parse_hash(hex_hash)?;
        self.lookup(&h).map(|v| self.entry(v))
    }

    pub fn contains_key(&self, hex_hash: &str) -> bool {
        parse_hash(hex_hash).is_some_and(|h| self.lookup(&h).is_some())
    }

    fn key_id(v: View<'_>) -> String {
        match v.odd_id {
            Some(id) => id.to_string(),
            None if v.rest.odd => String::new(),
            None => format!("key_{:032x}", v.rest.id),
        }
    }

    fn org_id(&self, org: u32) -> &str {
        self.orgs.ids.get(org as usize).map_or("", String::as_str)
    }

    fn entry(&self, v: View<'_>) -> KeyEntry {
        KeyEntry {
            key_id: Self::key_id(v),
            org_id: self.org_id(v.rest.org).to_string(),
            expires_at: v.rest.expires_at,
        }
    }

    /// Every entry in hash order: the base and the overlay merged.
    fn for_each(&self, mut f: impl FnMut(View<'_>)) {
        let mut over = self.overlay.iter().peekable();
        for i in 0..self.base.hashes.len() {
            let h = &self.base.hashes[i];
            while let Some((oh, slot)) = over.next_if(|(oh, _)| *oh < h) {
                if let Some(s) = slot {
                    f(View {
                        hash: oh,
                        rest: s.rest,
                        odd_id: s.odd_id.as_deref(),
                    });
                }
            }
            if let Some((oh, slot)) = over.next_if(|(oh, _)| *oh == h) {
                if let Some(s) = slot {
                    f(View {
                        hash: oh,
                        rest: s.rest,
                        odd_id: s.odd_id.as_deref(),
                    });
                }
                continue;
            }
            f(self.base_view(i));
        }
        for (oh, slot) in over {
            if let Some(s) = slot {
                f(View {
                    hash: oh,
                    rest: s.rest,
                    odd_id: s.odd_id.as_deref(),
                });
            }
        }
    }

    fn intern(&mut self, org_id: &str) -> u32 {
        if let Some(&i) = self.orgs.index.get(org_id) {
            return i;
        }
        let orgs = Arc::make_mut(&mut self.orgs);
        let i = u32::try_from(orgs.ids.len()).unwrap_or(u32::MAX);
        orgs.ids.push(org_id.to_string());
        orgs.index.insert(org_id.to_string(), i);
        i
    }

    /// Compacts one entry; `known_orgs` are the snapshot's orgs.
    fn compact(
        &mut self,
        k: KeyRef<'_>,
        known_orgs: &HashSet<&str>,
    ) -> Result<([u8; 32], Slot), String> {
        let hash = parse_hash(k.key_hash).ok_or_else(|| {
            format!(
                "api key {} has a malformed hash (64 lowercase hex digits expected)",
                k.key_id
            )
        })?;
        if !known_orgs.contains(k.org_id) {
            return Err(format!(
                "api key {} belongs to unknown org {}",
                k.key_id, k.org_id
            ));
        }
        let org = self.intern(k.org_id);
        Ok(match parse_id(k.key_id) {
            Some(id) => (
                hash,
                Slot {
                    rest: Rest {
                        id,
                        expires_at: k.expires_at,
                        org,
                        odd: false,
                    },
                    odd_id: None,
                },
            ),
            None => (
                hash,
                Slot {
                    rest: Rest {
                        id: 0,
                        expires_at: k.expires_at,
                        org,
                        odd: true,
                    },
                    odd_id: Some(k.key_id.to_string()),
                },
            ),
        })
    }

    /// A table from entries in any order (the last entry of a hash wins).
    fn from_entries(mut t: Self, mut entries: Vec<([u8; 32], Slot)>) -> Self {
        entries.sort_by_key(|e| e.0);
        entries.dedup_by(|later, earlier| {
            if later.0 == earlier.0 {
                std::mem::swap(later, earlier);
                true
            } else {
                false
            }
        });
        let mut base = Base {
            hashes: Vec::with_capacity(entries.len()),
            rest: Vec::with_capacity(entries.len()),
            odd_ids: HashMap::new(),
        };
        for (h, slot) in entries {
            base.hashes.push(h);
            base.rest.push(slot.rest);
            if let Some(id) = slot.odd_id {
                base.odd_ids.insert(h, id);
            }
        }
        t.len = base.hashes.len();
        t.base = Arc::new(base);
        t.overlay.clear();
        t.sum = t.full_sum();
        t
    }

    /// Splits an encoded `Snapshot` into the snapshot without its API keys and the table of
    /// keys, reading each key straight from the bytes (no string is allocated per key). Checks
    /// each hash's format and that its org is one of the snapshot's orgs.
    pub fn split_encoded(bytes: &[u8]) -> Result<(pb::Snapshot, Self), String> {
        use prost::Message;
        let mut rest_bytes = Vec::new();
        let mut raw: Vec<&[u8]> = Vec::new();
        let mut b = bytes;
        while !b.is_empty() {
            let start = b;
            let (tag, wire) = decode_key(&mut b).map_err(|e| e.to_string())?;
            if tag == 4 && wire == WireType::LengthDelimited {
                raw.push(take_len(&mut b)?);
            } else {
                skip_field(wire, tag, &mut b, DecodeContext::default())
                    .map_err(|e| e.to_string())?;
                rest_bytes.extend_from_slice(&start[..start.len() - b.len()]);
            }
        }
        let rest = pb::Snapshot::decode(rest_bytes.as_slice()).map_err(|e| e.to_string())?;
        let known: HashSet<&str> = rest.orgs.iter().map(|o| o.org_id.as_str()).collect();
        let mut t = Self::default();
        let mut entries = Vec::with_capacity(raw.len());
        for e in raw {
            entries.push(t.compact(parse_entry(e)?, &known)?);
        }
        Ok((rest, Self::from_entries(t, entries)))
    }

    /// Builds the table from a snapshot's keys (consumed, so their strings are freed as they are
    /// compacted), checking each hash's format and that its org is one of `orgs`.
    pub fn from_proto(keys: Vec<pb::ApiKeyEntry>, orgs: &[pb::OrgEntry]) -> Result<Self, String> {
        let known: HashSet<&str> = orgs.iter().map(|o| o.org_id.as_str()).collect();
        let mut t = Self::default();
        let mut entries = Vec::with_capacity(keys.len());
        for k in keys {
            entries.push(t.compact(KeyRef::from(&k), &known)?);
        }
        Ok(Self::from_entries(t, entries))
    }

    /// The next table: `remove` (hex hashes) taken out, then `upsert` put in (replacing an
    /// entry with the same hash; the last of a hash wins). `orgs` are the orgs of the next
    /// snapshot. Costs O(changes × log keys): the changes go to the overlay, and only when it
    /// outgrows its limit is it merged into a new base (one pass, amortized over the deltas).
    pub fn apply(
        &self,
        remove: &[String],
        upsert: &[pb::ApiKeyEntry],
        orgs: &[pb::OrgEntry],
    ) -> Result<Self, String> {
        let known: HashSet<&str> = orgs.iter().map(|o| o.org_id.as_str()).collect();
        let mut next = self.clone();
        let mut buf = Vec::with_capacity(256);
        for hex_hash in remove {
            let Some(h) = parse_hash(hex_hash) else {
                continue;
            };
            if let Some(old) = next.lookup(&h) {
                let d = next.digest(old, &mut buf);
                next.sum.remove_digest(&d);
                next.len -= 1;
                if next.base.find(&h).is_some() {
                    next.overlay.insert(h, None);
                } else {
                    next.overlay.remove(&h);
                }
            }
        }
        for k in upsert {
            let (h, slot) = next.compact(KeyRef::from(k), &known)?;
            match next.lookup(&h) {
                Some(old) => {
                    let d = next.digest(old, &mut buf);
                    next.sum.remove_digest(&d);
                }
                None => next.len += 1,
            }
            let d = next.digest(
                View {
                    hash: &h,
                    rest: slot.rest,
                    odd_id: slot.odd_id.as_deref(),
                },
                &mut buf,
            );
            next.sum.add_digest(&d);
            next.overlay.insert(h, Some(slot));
        }
        if next.overlay.len() > next.overlay_limit() {
            next.compact_overlay();
        }
        Ok(next)
    }

    /// Merges the overlay into a new base.
    fn compact_overlay(&mut self) {
        let mut base = Base {
            hashes: Vec::with_capacity(self.len),
            rest: Vec::with_capacity(self.len),
            odd_ids: HashMap::new(),
        };
        self.for_each(|v| {
            base.hashes.push(*v.hash);
            base.rest.push(v.rest);
            if let Some(id) = v.odd_id {
                base.odd_ids.insert(*v.hash, id.to_string());
            }
        });
        self.base = Arc::new(base);
        self.overlay.clear();
    }

    /// Appends an entry as a `Snapshot.api_keys` element (field 4), byte for byte as prost
    /// encodes an `ApiKeyEntry`.
    fn encode_view(&self, v: View<'_>, buf: &mut Vec<u8>) {
        let r = &v.rest;
        let mut id_buf = [0u8; 36];
        let key_id: &[u8] = match v.odd_id {
            Some(id) => id.as_bytes(),
            None if r.odd => b"",
            None => {
                id_buf[..4].copy_from_slice(b"key_");
                // 16 bytes always fit 32 hex digits.
                let _ = hex::encode_to_slice(r.id.to_be_bytes(), &mut id_buf[4..]);
                &id_buf
            }
        };
        let org_id = self.org_id(r.org).as_bytes();
        let mut hash_hex = [0u8; 64];
        // 32 bytes always fit 64 hex digits.
        let _ = hex::encode_to_slice(v.hash, &mut hash_hex);
        let expires = if r.expires_at != 0 {
            1 + encoded_len_varint(r.expires_at as u64)
        } else {
            0
        };
        let len = field_len(key_id.len()) + field_len(org_id.len()) + field_len(64) + expires;
        buf.push(0x22); // field 4, length-delimited
        encode_varint(len as u64, buf);
        put_field(buf, 0x0a, key_id);
        put_field(buf, 0x12, org_id);
        put_field(buf, 0x1a, &hash_hex);
        if r.expires_at != 0 {
            buf.push(0x20);
            encode_varint(r.expires_at as u64, buf);
        }
    }

    /// The content-hash digest of an entry (`buf` is scratch space).
    fn digest(&self, v: View<'_>, buf: &mut Vec<u8>) -> Digest256 {
        buf.clear();
        self.encode_view(v, buf);
        Digest256::of_encoded(buf)
    }

    /// The keys' part of the content hash, from scratch.
    fn full_sum(&self) -> ContentHash {
        let mut sum = ContentHash::default();
        let mut buf = Vec::with_capacity(256);
        self.for_each(|v| sum.add_digest(&self.digest(v, &mut buf)));
        sum
    }

    /// The keys' part of the content hash (see [`flex_shared::snapshot::ContentHash`]).
    pub fn content_sum(&self) -> ContentHash {
        self.sum
    }

    /// The protobuf entries again (for persistence and tools).
    pub fn to_proto(&self) -> Vec<pb::ApiKeyEntry> {
        let mut out = Vec::with_capacity(self.len);
        self.for_each(|v| {
            out.push(pb::ApiKeyEntry {
                key_id: Self::key_id(v),
                org_id: self.org_id(v.rest.org).to_string(),
                key_hash: hex::encode(v.hash),
                expires_at: v.rest.expires_at,
            });
        });
        out
    }

    /// Appends the whole list as `Snapshot.api_keys` (for writing a snapshot without building it).
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        self.for_each(|v| self.encode_view(v, buf));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use prost::Message;

    fn org(id: &str) -> pb::OrgEntry {
        pb::OrgEntry {
            org_id: id.into(),
            ..Default::default()
        }
    }

    fn key(n: u64, id: &str, org: &str, expires_at: i64) -> pb::ApiKeyEntry {
        pb::ApiKeyEntry {
            key_id: id.into(),
            org_id: org.into(),
            key_hash: format!("{:064x}", n * 7919),
            expires_at,
        }
    }

    #[test]
    fn encodes_like_prost_and_applies_deltas_like_the_shared_rules() {
        let orgs = vec![org("o1"), org("o2")];
        let keys = vec![
            key(3, "key_0190aaaabbbbccccddddeeeeffff0000", "o1", 0),
            key(1, "key_1", "o2", -7),
            key(2, "", "o1", 1_900_000_000),
        ];
        let mut s = pb::Snapshot {
            orgs: orgs.clone(),
            api_keys: keys.clone(),
            ..Default::default()
        };
        flex_shared::snapshot::canonicalize(&mut s);
        let t = KeyTable::from_proto(keys, &orgs).unwrap();
        assert_eq!(t.to_proto(), s.api_keys);
        let mut buf = Vec::new();
        t.encode_into(&mut buf);
        let reference = pb::Snapshot {
            api_keys: s.api_keys.clone(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(buf, reference);
        let (rest, split) = KeyTable::split_encoded(&s.encode_to_vec()).unwrap();
        assert!(rest.api_keys.is_empty());
        assert_eq!(rest.orgs, s.orgs);
        assert_eq!(split.to_proto(), s.api_keys);
        let h = t.get(&format!("{:064x}", 7919)).unwrap();
        assert_eq!(
            (h.key_id.as_str(), h.org_id.as_str(), h.expires_at),
            ("key_1", "o2", -7)
        );
        assert!(!t.contains_key("zz"));

        // A delta: remove one, replace one, add two.
        let removed = format!("{:064x}", 3 * 7919);
        let upserts = vec![
            key(2, "key_00000000000000000000000000000002", "o2", 0),
            key(9, "odd-id", "o1", 5),
            key(0, "key_00000000000000000000000000000000", "o1", 0),
        ];
        let next = t
            .apply(std::slice::from_ref(&removed), &upserts, &orgs)
            .unwrap();
        let mut expected = s.clone();
        expected.api_keys.retain(|k| k.key_hash != removed);
        expected
            .api_keys
            .retain(|k| !upserts.iter().any(|u| u.key_hash == k.key_hash));
        expected.api_keys.extend(upserts.iter().cloned());
        flex_shared::snapshot::canonicalize(&mut expected);
        assert_eq!(next.to_proto(), expected.api_keys);
        // The running hash equals the hash of the result built from scratch.
        assert_eq!(next.content_sum(), next.full_sum());
        let only_keys = pb::Snapshot {
            api_keys: expected.api_keys.clone(),
            ..Default::default()
        };
        assert_eq!(
            next.content_sum().to_hex(),
            flex_shared::snapshot::content_hash(&only_keys)
        );
        assert_ne!(next.content_sum(), t.content_sum());
        assert!(t.contains_key(&removed), "the old table is unchanged");
        assert!(next.apply(&[], &[key(4, "k", "nope", 0)], &orgs).is_err());
    }

    /// Thousands of small deltas (past several overlay merges) end where one table built from
    /// the final key set is: same entries, same lookups, same hash.
    #[test]
    fn many_deltas_through_the_overlay_equal_a_table_built_from_scratch() {
        let orgs = vec![org("o1"), org("o2"), org("o3")];
        let mut live: std::collections::BTreeMap<String, pb::ApiKeyEntry> = Default::default();
        let initial: Vec<_> = (0..3000u64)
            .map(|n| key(n, &format!("key_{n:032x}"), "o1", 0))
            .collect();
        for k in &initial {
            live.insert(k.key_hash.clone(), k.clone());
        }
        let mut t = KeyTable::from_proto(initial, &orgs).unwrap();
        let mut merges = 0;
        let mut seed = 7u64;
        let mut rnd = |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        for step in 0..6000u64 {
            let mut removes = Vec::new();
            let mut upserts = Vec::new();
            for _ in 0..=rnd(3) {
                let n = rnd(12_000);
                if rnd(3) == 0 {
                    removes.push(format!("{:064x}", n * 7919));
                } else {
                    let org = ["o1", "o2", "o3"][rnd(3) as usize];
                    let id = if n % 50 == 0 {
                        format!("odd-{n}")
                    } else {
                        format!("key_{n:032x}")
                    };
                    upserts.push(key(n, &id, org, (step % 3) as i64));
                }
            }
            for r in &removes {
                live.remove(r);
            }
            for u in &upserts {
                live.insert(u.key_hash.clone(), u.clone());
            }
            let before = t.overlay.len();
            t = t.apply(&removes, &upserts, &orgs).unwrap();
            if t.overlay.len() < before {
                merges += 1;
            }
            assert_eq!(t.len(), live.len());
        }
        assert!(
            merges >= 1,
            "the overlay was merged into the base at least once"
        );
        let expected: Vec<_> = live.values().cloned().collect();
        assert_eq!(t.to_proto(), expected);
        let scratch = KeyTable::from_proto(expected.clone(), &orgs).unwrap();
        assert_eq!(t.content_sum(), scratch.content_sum());
        assert_eq!(t.content_sum(), t.full_sum());
        for k in &expected {
            let e = t.get(&k.key_hash).unwrap();
            assert_eq!(
                (e.key_id.as_str(), e.org_id.as_str()),
                (k.key_id.as_str(), k.org_id.as_str())
            );
        }
        assert!(!t.contains_key(&format!("{:064x}", 13_000 * 7919)));
        let mut a = Vec::new();
        let mut b = Vec::new();
        t.encode_into(&mut a);
        scratch.encode_into(&mut b);
        assert_eq!(a, b);
    }
}
