//! Snapshot signatures: the control plane signs every update it sends (full, delta, heartbeat)
//! with an Ed25519 key; a proxy given the public key verifies before it applies anything.
//!
//! What is signed is a [`Statement`]: a domain tag, the update's kind, the version it brings,
//! the version a delta starts from, the SHA-256 of the protobuf encoding of the `full` or `delta`
//! message itself (so the signature covers exactly the content applied), and the resulting
//! content hash and `produced_at`. The last two let a proxy check its persisted snapshot on a
//! warm start against the statement of the update that produced it (a [`Seal`] kept beside it).
//! `produced_at` being signed is what makes a replayed old update harmless under a maximum age.
//!
//! Key files hold 64 hex characters: the 32-byte Ed25519 seed (private, `flex control
//! --snapshot-signing-key-file`; `openssl rand -hex 32` makes one) or the 32-byte public key
//! (`flex proxy --snapshot-public-key-file`; `flex keygen snapshot-signing` derives it).

use std::path::Path;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use prost::Message;
use secrecy::zeroize::Zeroize as _;
use sha2::{Digest as _, Sha256};

use crate::proto::control::{snapshot_update::Kind, Snapshot, SnapshotDelta, SnapshotUpdate};

const DOMAIN: &[u8] = b"flex.snapshot-update.v1\0";

/// The kind of update a statement is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateKind {
    Full,
    Delta,
}

impl UpdateKind {
    fn tag(self) -> u8 {
        match self {
            Self::Full => 1,
            Self::Delta => 2,
        }
    }
}

/// What the control plane signs for one update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement<'a> {
    pub kind: UpdateKind,
    /// The version the update brings the proxy to.
    pub version: u64,
    /// The version a delta starts from (0 for a full).
    pub from_version: u64,
    /// SHA-256 of the encoded `Snapshot` (full) or `SnapshotDelta` (delta) message.
    pub body_sha256: [u8; 32],
    /// The content hash after the update.
    pub content_hash: &'a str,
    /// The `produced_at` the update carries.
    pub produced_at: &'a str,
}

impl Statement<'_> {
    /// The signed bytes (length-prefixed, so no two statements encode alike).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(DOMAIN.len() + 1 + 16 + 32 + 8 + 64 + 40);
        b.extend_from_slice(DOMAIN);
        b.push(self.kind.tag());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.from_version.to_be_bytes());
        b.extend_from_slice(&self.body_sha256);
        for s in [self.content_hash, self.produced_at] {
            b.extend_from_slice(&(s.len() as u32).to_be_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        b
    }
}

/// SHA-256 of the protobuf encoding of `s` (equal to hashing `s.encode_to_vec()`), computed
/// entry by entry so a snapshot of millions of keys is never encoded into one buffer.
pub fn snapshot_body_sha256(s: &Snapshot) -> [u8; 32] {
    use prost::encoding::{message, string, uint64};
    let mut h = Sha256::new();
    let mut buf = Vec::with_capacity(256);
    let flush = |buf: &mut Vec<u8>, h: &mut Sha256| {
        h.update(&buf[..]);
        buf.clear();
    };
    // The fields in the order prost writes them (declaration order), defaults omitted.
    if s.version != 0 {
        uint64::encode(1, &s.version, &mut buf);
    }
    if !s.content_hash.is_empty() {
        string::encode(2, &s.content_hash, &mut buf);
    }
    flush(&mut buf, &mut h);
    for o in &s.orgs {
        message::encode(3, o, &mut buf);
        flush(&mut buf, &mut h);
    }
    for k in &s.api_keys {
        message::encode(4, k, &mut buf);
        flush(&mut buf, &mut h);
    }
    for p in &s.provider_keys {
        message::encode(5, p, &mut buf);
        flush(&mut buf, &mut h);
    }
    for m in &s.models {
        message::encode(6, m, &mut buf);
        flush(&mut buf, &mut h);
    }
    if !s.produced_at.is_empty() {
        string::encode(7, &s.produced_at, &mut buf);
    }
    for l in &s.limits {
        message::encode(8, l, &mut buf);
        flush(&mut buf, &mut h);
    }
    flush(&mut buf, &mut h);
    h.finalize().into()
}

/// SHA-256 of the protobuf encoding of `d`.
pub fn delta_body_sha256(d: &SnapshotDelta) -> [u8; 32] {
    Sha256::digest(d.encode_to_vec()).into()
}

/// SHA-256 of bytes as received (a full snapshot's encoding off NATS).
pub fn bytes_sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// The statement of a decoded update (`None` for an update without content).
pub fn statement_of(update: &SnapshotUpdate) -> Option<Statement<'_>> {
    match update.kind.as_ref()? {
        Kind::Full(s) => Some(Statement {
            kind: UpdateKind::Full,
            version: s.version,
            from_version: 0,
            body_sha256: snapshot_body_sha256(s),
            content_hash: &s.content_hash,
            produced_at: &s.produced_at,
        }),
        Kind::Delta(d) => Some(Statement {
            kind: UpdateKind::Delta,
            version: update.version,
            from_version: d.from_version,
            body_sha256: delta_body_sha256(d),
            content_hash: &d.content_hash,
            produced_at: &d.produced_at,
        }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {why}; expected 64 hex characters (32 bytes), e.g. from `flex keygen snapshot-signing`")]
    Format { path: String, why: String },
}

fn read_32(path: &Path) -> Result<[u8; 32], KeyFileError> {
    let shown = path.display().to_string();
    let mut text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut out = [0u8; 32];
    let decoded = hex::decode_to_slice(text.trim(), &mut out);
    text.zeroize();
    decoded.map_err(|e| KeyFileError::Format {
        path: shown,
        why: format!("not 32 hex-encoded bytes ({e})"),
    })?;
    Ok(out)
}

/// The control plane's signing key.
pub struct SnapshotSigner {
    key: SigningKey,
}

impl std::fmt::Debug for SnapshotSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSigner")
            .field("public_key", &self.public_key_hex())
            .finish_non_exhaustive()
    }
}

impl SnapshotSigner {
    /// A new random key.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        let key = SigningKey::from_bytes(&seed);
        seed.zeroize();
        Self { key }
    }

    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(seed),
        }
    }

    /// Reads a private key file (64 hex characters: the seed).
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let mut seed = read_32(path)?;
        let s = Self::from_seed(&seed);
        seed.zeroize();
        Ok(s)
    }

    /// The private key file's content (64 hex characters and a newline).
    pub fn seed_hex(&self) -> String {
        format!("{}\n", hex::encode(self.key.to_bytes()))
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    pub fn verifier(&self) -> SnapshotVerifier {
        SnapshotVerifier {
            key: self.key.verifying_key(),
        }
    }

    pub fn sign(&self, st: &Statement<'_>) -> Vec<u8> {
        self.key.sign(&st.to_bytes()).to_bytes().to_vec()
    }

    /// Sets `update.signature` (over its statement).
    pub fn sign_update(&self, update: &mut SnapshotUpdate) {
        let sig = statement_of(update).map(|st| self.sign(&st));
        update.signature = sig.unwrap_or_default();
    }
}

/// A proxy's copy of the control plane's public key.
#[derive(Debug, Clone)]
pub struct SnapshotVerifier {
    key: VerifyingKey,
}

impl SnapshotVerifier {
    /// Reads a public key file (64 hex characters).
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = read_32(path)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| KeyFileError::Format {
            path: path.display().to_string(),
            why: format!("not an Ed25519 public key ({e})"),
        })?;
        Ok(Self { key })
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.to_bytes())
    }

    /// Checks `signature` over `st`; the error says why, for the log and the refused ack.
    pub fn verify(&self, st: &Statement<'_>, signature: &[u8]) -> Result<(), String> {
        if signature.is_empty() {
            return Err(format!(
                "unsigned snapshot update (version {}): this proxy requires updates signed by the \
                 control plane's snapshot key (--snapshot-public-key-file); start `flex control` \
                 with --snapshot-signing-key-file holding the matching private key",
                st.version
            ));
        }
        let sig = ed25519_dalek::Signature::from_slice(signature).map_err(|_| {
            format!(
                "malformed snapshot signature (version {}, {} bytes, expected 64)",
                st.version,
                signature.len()
            )
        })?;
        self.key.verify_strict(&st.to_bytes(), &sig).map_err(|_| {
            format!(
                "bad snapshot signature (version {}): the update was altered or not signed by \
                     the key whose public half is in --snapshot-public-key-file",
                st.version
            )
        })
    }
}

/// What a proxy keeps beside its persisted snapshot to check it on a warm start: the parts of
/// the statement that the snapshot alone does not give (kind, from version, body digest) and the
/// signature. The rest (version, content hash, `produced_at`) is recomputed from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    pub kind: UpdateKind,
    pub from_version: u64,
    pub body_sha256: [u8; 32],
    pub signature: Vec<u8>,
}

impl Seal {
    pub fn of(st: &Statement<'_>, signature: &[u8]) -> Self {
        Self {
            kind: st.kind,
            from_version: st.from_version,
            body_sha256: st.body_sha256,
            signature: signature.to_vec(),
        }
    }

    /// The statement this seal signs, for a snapshot at `version` with that hash and time.
    pub fn statement<'a>(
        &self,
        version: u64,
        content_hash: &'a str,
        produced_at: &'a str,
    ) -> Statement<'a> {
        Statement {
            kind: self.kind,
            version,
            from_version: self.from_version,
            body_sha256: self.body_sha256,
            content_hash,
            produced_at,
        }
    }

    /// One line: `v1 full|delta FROM BODY_HEX SIGNATURE_HEX`.
    pub fn to_line(&self) -> String {
        let kind = match self.kind {
            UpdateKind::Full => "full",
            UpdateKind::Delta => "delta",
        };
        format!(
            "v1 {kind} {} {} {}\n",
            self.from_version,
            hex::encode(self.body_sha256),
            hex::encode(&self.signature)
        )
    }

    pub fn parse(line: &str) -> Option<Self> {
        let mut p = line.split_whitespace();
        if p.next()? != "v1" {
            return None;
        }
        let kind = match p.next()? {
            "full" => UpdateKind::Full,
            "delta" => UpdateKind::Delta,
            _ => return None,
        };
        let from_version = p.next()?.parse().ok()?;
        let mut body_sha256 = [0u8; 32];
        hex::decode_to_slice(p.next()?, &mut body_sha256).ok()?;
        let signature = hex::decode(p.next()?).ok()?;
        Some(Self {
            kind,
            from_version,
            body_sha256,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::proto::control::{ApiKeyEntry, LimitEntry, OrgEntry};

    fn snapshot() -> Snapshot {
        Snapshot {
            version: 7,
            content_hash: "ab".repeat(32),
            orgs: vec![OrgEntry {
                org_id: "o1".into(),
                name: "o".into(),
                active: true,
                ..Default::default()
            }],
            api_keys: vec![ApiKeyEntry {
                key_id: "k1".into(),
                org_id: "o1".into(),
                key_hash: "c".repeat(64),
                expires_at: 0,
            }],
            produced_at: "2026-01-01T00:00:00Z".into(),
            limits: vec![LimitEntry {
                org_id: "o1".into(),
                rpm: 5,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_streamed_body_digest_is_the_digest_of_the_encoding() {
        let s = snapshot();
        assert_eq!(snapshot_body_sha256(&s), bytes_sha256(&s.encode_to_vec()));
        let empty = Snapshot::default();
        assert_eq!(
            snapshot_body_sha256(&empty),
            bytes_sha256(&empty.encode_to_vec())
        );
    }

    #[test]
    fn signed_updates_verify_and_any_change_is_refused() {
        let signer = SnapshotSigner::generate();
        let verifier = signer.verifier();
        let mut u = SnapshotUpdate {
            version: 9,
            kind: Some(Kind::Delta(SnapshotDelta {
                from_version: 7,
                content_hash: "ab".repeat(32),
                produced_at: "2026-01-01T00:00:01Z".into(),
                ..Default::default()
            })),
            signature: vec![],
        };
        let st = statement_of(&u).unwrap();
        assert!(verifier.verify(&st, &u.signature).is_err(), "unsigned");
        signer.sign_update(&mut u);
        verifier
            .verify(&statement_of(&u).unwrap(), &u.signature)
            .unwrap();
        // An added key, another version, another time: all refused.
        let mut tampered = u.clone();
        if let Some(Kind::Delta(d)) = tampered.kind.as_mut() {
            d.upsert_api_keys.push(ApiKeyEntry {
                key_id: "evil".into(),
                org_id: "o1".into(),
                key_hash: "d".repeat(64),
                expires_at: 0,
            });
        }
        assert!(verifier
            .verify(&statement_of(&tampered).unwrap(), &tampered.signature)
            .is_err());
        let mut later = u.clone();
        later.version = 10;
        assert!(verifier
            .verify(&statement_of(&later).unwrap(), &later.signature)
            .is_err());
        let other = SnapshotSigner::generate().verifier();
        assert!(other
            .verify(&statement_of(&u).unwrap(), &u.signature)
            .is_err());
        // The seal round-trips and signs the same statement.
        let seal = Seal::of(&statement_of(&u).unwrap(), &u.signature);
        let back = Seal::parse(&seal.to_line()).unwrap();
        assert_eq!(back, seal);
        verifier
            .verify(
                &back.statement(9, &"ab".repeat(32), "2026-01-01T00:00:01Z"),
                &back.signature,
            )
            .unwrap();
    }

    #[test]
    fn key_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let signer = SnapshotSigner::generate();
        let private = dir.path().join("snapshot-signing.key");
        let public = dir.path().join("snapshot-signing.pub");
        std::fs::write(&private, signer.seed_hex()).unwrap();
        std::fs::write(&public, signer.public_key_hex()).unwrap();
        let loaded = SnapshotSigner::load(&private).unwrap();
        assert_eq!(loaded.public_key_hex(), signer.public_key_hex());
        assert_eq!(
            SnapshotVerifier::load(&public).unwrap().public_key_hex(),
            signer.public_key_hex()
        );
        std::fs::write(&public, "not hex").unwrap();
        let e = SnapshotVerifier::load(&public).unwrap_err().to_string();
        assert!(e.contains("64 hex characters"), "{e}");
        assert!(!format!("{loaded:?}").contains(signer.seed_hex().trim()));
    }
}
