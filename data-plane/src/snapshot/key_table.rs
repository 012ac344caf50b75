//! The API keys of a snapshot as the proxy holds them: compact and sorted, for millions of keys.
//!
//! One entry is 64 bytes: the SHA-256 of the key (32 bytes, binary) in one sorted array, and in a
//! parallel array the key id (a `key_` + 32-hex id packed into a `u128`; any other id is kept
//! aside by hash), the expiry and the org (an index into an interned list of org ids). Lookups
//! are a binary search. A delta is applied in one merge pass that builds the next table (the
//! copy an immutable snapshot needs anyway). The keys' part of the content hash is a running sum
//! of per-entry digests (each entry encoded exactly as the protobuf `ApiKeyEntry` would be),
//! updated only for the entries a delta touches, so no `Snapshot` with millions of strings is
//! ever held and revoking one key re-hashes nothing else.

use std::collections::{HashMap, HashSet};

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

/// The API keys of one snapshot, sorted by hash.
#[derive(Debug, Clone, Default)]
pub struct KeyTable {
    hashes: Vec<[u8; 32]>,
    rest: Vec<Rest>,
    /// Interned org ids (append-only across deltas; orgs are never deleted).
    org_ids: Vec<String>,
    org_index: HashMap<String, u32>,
    /// Key ids that are not `key_<32 hex>`, by key hash.
    odd_ids: HashMap<[u8; 32], String>,
    /// The keys' part of the snapshot's content hash, kept current entry by entry.
    sum: ContentHash,
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
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The key with this hex hash, if present.
    pub fn get(&self, hex_hash: &str) -> Option<KeyEntry> {
        let h = parse_hash(hex_hash)?;
        let i = self.hashes.binary_search(&h).ok()?;
        Some(self.entry(i))
    }

    pub fn contains_key(&self, hex_hash: &str) -> bool {
        parse_hash(hex_hash).is_some_and(|h| self.hashes.binary_search(&h).is_ok())
    }

    fn key_id(&self, i: usize) -> String {
        let r = &self.rest[i];
        if r.odd {
            self.odd_ids
                .get(&self.hashes[i])
                .cloned()
                .unwrap_or_default()
        } else {
            format!("key_{:032x}", r.id)
        }
    }

    fn org_id(&self, i: usize) -> &str {
        self.org_ids
            .get(self.rest[i].org as usize)
            .map_or("", String::as_str)
    }

    fn entry(&self, i: usize) -> KeyEntry {
        KeyEntry {
            key_id: self.key_id(i),
            org_id: self.org_id(i).to_string(),
            expires_at: self.rest[i].expires_at,
        }
    }

    fn intern(&mut self, org_id: &str) -> u32 {
        if let Some(&i) = self.org_index.get(org_id) {
            return i;
        }
        let i = u32::try_from(self.org_ids.len()).unwrap_or(u32::MAX);
        self.org_ids.push(org_id.to_string());
        self.org_index.insert(org_id.to_string(), i);
        i
    }

    /// Compacts one entry; `known_orgs` are the snapshot's orgs.
    fn compact(
        &mut self,
        k: KeyRef<'_>,
        known_orgs: &HashSet<&str>,
    ) -> Result<([u8; 32], Rest), String> {
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
        let rest = match parse_id(k.key_id) {
            Some(id) => Rest {
                id,
                expires_at: k.expires_at,
                org,
                odd: false,
            },
            None => {
                self.odd_ids.insert(hash, k.key_id.to_string());
                Rest {
                    id: 0,
                    expires_at: k.expires_at,
                    org,
                    odd: true,
                }
            }
        };
        Ok((hash, rest))
    }

    fn sort_if_needed(&mut self) {
        if !self.hashes.windows(2).all(|w| w[0] <= w[1]) {
            let mut pairs: Vec<_> = self.hashes.drain(..).zip(self.rest.drain(..)).collect();
            pairs.sort_by_key(|a| a.0);
            (self.hashes, self.rest) = pairs.into_iter().unzip();
        }
    }

    /// Splits an encoded `Snapshot` into the snapshot without its API keys and the table of
    /// keys, reading each key straight from the bytes (no string is allocated per key). Checks
    /// each hash's format and that its org is one of the snapshot's orgs.
    pub fn split_encoded(bytes: &[u8]) -> Result<(pb::Snapshot, Self), String> {
        use prost::Message;
        let mut rest_bytes = Vec::new();
        let mut entries: Vec<&[u8]> = Vec::new();
        let mut b = bytes;
        while !b.is_empty() {
            let start = b;
            let (tag, wire) = decode_key(&mut b).map_err(|e| e.to_string())?;
            if tag == 4 && wire == WireType::LengthDelimited {
                entries.push(take_len(&mut b)?);
            } else {
                skip_field(wire, tag, &mut b, DecodeContext::default())
                    .map_err(|e| e.to_string())?;
                rest_bytes.extend_from_slice(&start[..start.len() - b.len()]);
            }
        }
        let rest = pb::Snapshot::decode(rest_bytes.as_slice()).map_err(|e| e.to_string())?;
        let known: HashSet<&str> = rest.orgs.iter().map(|o| o.org_id.as_str()).collect();
        let mut t = Self {
            hashes: Vec::with_capacity(entries.len()),
            rest: Vec::with_capacity(entries.len()),
            ..Self::default()
        };
        for e in entries {
            let (h, r) = t.compact(parse_entry(e)?, &known)?;
            t.hashes.push(h);
            t.rest.push(r);
        }
        t.sort_if_needed();
        t.sum = t.full_sum();
        Ok((rest, t))
    }

    /// Builds the table from a snapshot's keys (consumed, so their strings are freed as they are
    /// compacted), checking each hash's format and that its org is one of `orgs`.
    pub fn from_proto(keys: Vec<pb::ApiKeyEntry>, orgs: &[pb::OrgEntry]) -> Result<Self, String> {
        let known: HashSet<&str> = orgs.iter().map(|o| o.org_id.as_str()).collect();
        let mut t = Self {
            hashes: Vec::with_capacity(keys.len()),
            rest: Vec::with_capacity(keys.len()),
            ..Self::default()
        };
        for k in keys {
            let (h, r) = t.compact(KeyRef::from(&k), &known)?;
            t.hashes.push(h);
            t.rest.push(r);
        }
        t.sort_if_needed();
        t.sum = t.full_sum();
        Ok(t)
    }

    /// The next table: `remove` (hex hashes) taken out, `upsert` put in (replacing an entry with
    /// the same hash), in one merge pass. `orgs` are the orgs of the next snapshot.
    pub fn apply(
        &self,
        remove: &[String],
        upsert: &[pb::ApiKeyEntry],
        orgs: &[pb::OrgEntry],
    ) -> Result<Self, String> {
        let known: HashSet<&str> = orgs.iter().map(|o| o.org_id.as_str()).collect();
        let removed: HashSet<[u8; 32]> = remove.iter().filter_map(|h| parse_hash(h)).collect();
        let mut next = Self {
            hashes: Vec::with_capacity(self.len() + upsert.len()),
            rest: Vec::with_capacity(self.len() + upsert.len()),
            org_ids: self.org_ids.clone(),
            org_index: self.org_index.clone(),
            odd_ids: HashMap::new(),
            sum: self.sum,
        };
        let mut buf = Vec::with_capacity(256);
        let mut new: Vec<([u8; 32], Rest, Option<String>)> = Vec::with_capacity(upsert.len());
        for k in upsert {
            let (h, r) = next.compact(KeyRef::from(k), &known)?;
            new.push((h, r, next.odd_ids.remove(&h)));
        }
        new.sort_by_key(|a| a.0);
        new.dedup_by(|later, earlier| {
            // The last upsert of a hash wins.
            if later.0 == earlier.0 {
                std::mem::swap(later, earlier);
                true
            } else {
                false
            }
        });
        let mut j = 0;
        for (i, h) in self.hashes.iter().enumerate() {
            while j < new.len() && new[j].0 < *h {
                next.push_new(&mut new[j], &mut buf);
                j += 1;
            }
            if (j < new.len() && new[j].0 == *h) || removed.contains(h) {
                // Replaced by the upsert (pushed in order below) or removed.
                next.sum.remove_digest(&self.digest(i, &mut buf));
                continue;
            }
            next.hashes.push(*h);
            next.rest.push(self.rest[i]);
            if self.rest[i].odd {
                if let Some(id) = self.odd_ids.get(h) {
                    next.odd_ids.insert(*h, id.clone());
                }
            }
        }
        while j < new.len() {
            next.push_new(&mut new[j], &mut buf);
            j += 1;
        }
        Ok(next)
    }

    fn push_new(&mut self, e: &mut ([u8; 32], Rest, Option<String>), buf: &mut Vec<u8>) {
        self.hashes.push(e.0);
        self.rest.push(e.1);
        if let Some(id) = e.2.take() {
            self.odd_ids.insert(e.0, id);
        }
        let d = self.digest(self.len() - 1, buf);
        self.sum.add_digest(&d);
    }

    /// The content-hash digest of entry `i` (`buf` is scratch space).
    fn digest(&self, i: usize, buf: &mut Vec<u8>) -> Digest256 {
        buf.clear();
        self.encode_entry(i, buf);
        Digest256::of_encoded(buf)
    }

    /// The keys' part of the content hash, from scratch.
    fn full_sum(&self) -> ContentHash {
        let mut sum = ContentHash::default();
        let mut buf = Vec::with_capacity(256);
        for i in 0..self.len() {
            sum.add_digest(&self.digest(i, &mut buf));
        }
        sum
    }

    /// Appends entry `i` as a `Snapshot.api_keys` element (field 4), byte for byte as prost
    /// encodes an `ApiKeyEntry`.
    fn encode_entry(&self, i: usize, buf: &mut Vec<u8>) {
        let r = &self.rest[i];
        let mut id_buf = [0u8; 36];
        let odd;
        let key_id: &[u8] = if r.odd {
            odd = self.key_id(i);
            odd.as_bytes()
        } else {
            id_buf[..4].copy_from_slice(b"key_");
            // 16 bytes always fit 32 hex digits.
            let _ = hex::encode_to_slice(r.id.to_be_bytes(), &mut id_buf[4..]);
            &id_buf
        };
        let org_id = self.org_id(i).as_bytes();
        let mut hash_hex = [0u8; 64];
        // 32 bytes always fit 64 hex digits.
        let _ = hex::encode_to_slice(self.hashes[i], &mut hash_hex);
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

    /// The keys' part of the content hash (see [`flex_shared::snapshot::ContentHash`]).
    pub fn content_sum(&self) -> ContentHash {
        self.sum
    }

    /// The protobuf entries again (for persistence and tools).
    pub fn to_proto(&self) -> Vec<pb::ApiKeyEntry> {
        (0..self.len())
            .map(|i| pb::ApiKeyEntry {
                key_id: self.key_id(i),
                org_id: self.org_id(i).to_string(),
                key_hash: hex::encode(self.hashes[i]),
                expires_at: self.rest[i].expires_at,
            })
            .collect()
    }

    /// Appends the whole list as `Snapshot.api_keys` (for writing a snapshot without building it).
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        for i in 0..self.len() {
            self.encode_entry(i, buf);
        }
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
}
