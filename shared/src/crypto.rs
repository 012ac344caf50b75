//! Envelope encryption of provider keys (BYOK).
//!
//! Each secret gets its own random AES-256-GCM data key (DEK); the DEK is wrapped by a master key
//! that has a key id, so master keys can rotate: a new id becomes active, old ids stay readable
//! until every secret has been re-wrapped. The associated data binds both layers to the org, the
//! provider and the master key id, so a ciphertext cannot be moved to another row.
//!
//! Master key file: one line of 64 hex characters (32 bytes; its id is a fingerprint of the key),
//! or several `key_id=hex` lines, the first being the active key. `#` starts a comment.

use std::collections::HashMap;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::proto::control as pb;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("cannot read master key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("master key file {path}, line {line}: {why}. Expected 64 hex characters (e.g. the output of `openssl rand -hex 32`), optionally as `key_id=<hex>`")]
    Parse {
        path: String,
        line: usize,
        why: &'static str,
    },
    #[error(
        "master key file {path} holds no key. Create one with `openssl rand -hex 32 > {path}`"
    )]
    Empty { path: String },
    #[error("the secret was sealed with master key `{0}`, which is not in the master key file; add that key (as `{0}=<hex>`) to decrypt it")]
    UnknownKeyId(String),
    #[error("decryption failed: the ciphertext, its binding (org, provider, key id) or the master key is wrong")]
    Decrypt,
    #[error("sealed secret is malformed: {0}")]
    Malformed(&'static str),
}

/// The master keys: the active one seals, all of them open.
pub struct MasterKeyring {
    active: String,
    keys: HashMap<String, SecretBox<[u8; 32]>>,
}

impl std::fmt::Debug for MasterKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("MasterKeyring")
            .field("active", &self.active)
            .field("key_ids", &ids)
            .finish()
    }
}

fn fingerprint(key: &[u8; 32]) -> String {
    let digest = Sha256::digest(key);
    format!("mk-{}", hex::encode(&digest[..4]))
}

impl MasterKeyring {
    /// Reads a master key file (see the module docs for the format).
    pub fn load(path: &Path) -> Result<Self, CryptoError> {
        // The file's text is key material: wiped once parsed.
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| CryptoError::Read {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses master key file text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, CryptoError> {
        let mut active = None;
        let mut keys = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |why| CryptoError::Parse {
                path: origin.to_string(),
                line: i + 1,
                why,
            };
            let (id, hexpart) = match line.split_once('=') {
                Some((id, h)) => (Some(id.trim().to_string()), h.trim()),
                None => (None, line),
            };
            // Every copy of the key's bytes is wiped when dropped; the one kept is in a SecretBox.
            let bytes = Zeroizing::new(hex::decode(hexpart).map_err(|_| err("not hexadecimal"))?);
            let mut key = Box::new([0u8; 32]);
            if bytes.len() != key.len() {
                return Err(err(
                    "a master key must be exactly 32 bytes (64 hex characters)",
                ));
            }
            key.copy_from_slice(&bytes);
            let key = SecretBox::new(key);
            let id = match id {
                Some(id) if id.is_empty() => return Err(err("empty key id before `=`")),
                Some(id) => id,
                None => fingerprint(key.expose_secret()),
            };
            if keys.contains_key(&id) {
                return Err(err("duplicate key id"));
            }
            if active.is_none() {
                active = Some(id.clone());
            }
            keys.insert(id, key);
        }
        let active = active.ok_or_else(|| CryptoError::Empty {
            path: origin.to_string(),
        })?;
        Ok(Self { active, keys })
    }

    /// Generates the text of a new master key file (one random key).
    pub fn generate_file_text() -> String {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::thread_rng().fill_bytes(key.as_mut());
        format!("{}\n", hex::encode(key.as_ref()))
    }

    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    fn cipher(&self, id: &str) -> Result<Aes256Gcm, CryptoError> {
        let key = self
            .keys
            .get(id)
            .ok_or_else(|| CryptoError::UnknownKeyId(id.to_string()))?;
        Ok(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(
            key.expose_secret(),
        )))
    }

    /// Encrypts `secret` for (org, provider) under the active master key.
    pub fn seal(&self, org_id: &str, provider: &str, secret: &str) -> Result<Sealed, CryptoError> {
        // Wiped when dropped, on every path (not a loop the optimizer may remove).
        let mut dek = Zeroizing::new([0u8; 32]);
        rand::thread_rng().fill_bytes(dek.as_mut());
        let dek_cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(dek.as_ref()));
        let aad = aad(org_id, provider, &self.active);
        let nonce = random_nonce();
        let ciphertext = dek_cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Decrypt)?;
        let (wrapped_dek, dek_nonce) = self.wrap(&dek, &aad, &self.active)?;
        Ok(Sealed {
            master_key_id: self.active.clone(),
            wrapped_dek,
            dek_nonce,
            ciphertext,
            nonce: nonce.to_vec(),
        })
    }

    fn wrap(&self, dek: &[u8; 32], aad: &str, id: &str) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        let nonce = random_nonce();
        let wrapped = self
            .cipher(id)?
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: dek,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Decrypt)?;
        Ok((wrapped, nonce.to_vec()))
    }

    fn unwrap_dek(
        &self,
        org_id: &str,
        provider: &str,
        s: &Sealed,
    ) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        if s.dek_nonce.len() != 12 || s.nonce.len() != 12 {
            return Err(CryptoError::Malformed("nonces must be 12 bytes"));
        }
        let aad = aad(org_id, provider, &s.master_key_id);
        let dek = Zeroizing::new(
            self.cipher(&s.master_key_id)?
                .decrypt(
                    Nonce::from_slice(&s.dek_nonce),
                    Payload {
                        msg: &s.wrapped_dek,
                        aad: aad.as_bytes(),
                    },
                )
                .map_err(|_| CryptoError::Decrypt)?,
        );
        let mut out = Zeroizing::new([0u8; 32]);
        if dek.len() != out.len() {
            return Err(CryptoError::Malformed("data key must be 32 bytes"));
        }
        out.copy_from_slice(&dek);
        Ok(out)
    }

    /// Decrypts a sealed secret bound to (org, provider).
    pub fn open(
        &self,
        org_id: &str,
        provider: &str,
        s: &Sealed,
    ) -> Result<SecretString, CryptoError> {
        let dek = self.unwrap_dek(org_id, provider, s)?;
        let aad = aad(org_id, provider, &s.master_key_id);
        // The decrypted bytes are wiped when dropped, whether or not they are UTF-8; the key
        // lives on only in the SecretString (wiped in turn when it is dropped).
        let plain = Zeroizing::new(
            Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(dek.as_ref()))
                .decrypt(
                    Nonce::from_slice(&s.nonce),
                    Payload {
                        msg: &s.ciphertext,
                        aad: aad.as_bytes(),
                    },
                )
                .map_err(|_| CryptoError::Decrypt)?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| CryptoError::Malformed("not UTF-8"))?;
        Ok(SecretString::from(text.to_owned()))
    }

    /// Re-seals under the active master key (rotation). The secret is decrypted and re-encrypted
    /// with a fresh data key, because the associated data names the master key id.
    pub fn reseal(&self, org_id: &str, provider: &str, s: &Sealed) -> Result<Sealed, CryptoError> {
        let secret = self.open(org_id, provider, s)?;
        self.seal(org_id, provider, secret.expose_secret())
    }
}

fn random_nonce() -> [u8; 12] {
    let mut n = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

fn aad(org_id: &str, provider: &str, master_key_id: &str) -> String {
    format!("flex/provider-key/v1\0{org_id}\0{provider}\0{master_key_id}")
}

/// A sealed provider key as stored in the event log (base64 in JSON) and shipped in snapshots.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub master_key_id: String,
    #[serde(with = "b64")]
    pub wrapped_dek: Vec<u8>,
    #[serde(with = "b64")]
    pub dek_nonce: Vec<u8>,
    #[serde(with = "b64")]
    pub ciphertext: Vec<u8>,
    #[serde(with = "b64")]
    pub nonce: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("master_key_id", &self.master_key_id)
            .finish_non_exhaustive()
    }
}

impl From<Sealed> for pb::SealedSecret {
    fn from(s: Sealed) -> Self {
        pb::SealedSecret {
            master_key_id: s.master_key_id,
            wrapped_dek: s.wrapped_dek,
            dek_nonce: s.dek_nonce,
            ciphertext: s.ciphertext,
            nonce: s.nonce,
        }
    }
}

impl From<pb::SealedSecret> for Sealed {
    fn from(s: pb::SealedSecret) -> Self {
        Sealed {
            master_key_id: s.master_key_id,
            wrapped_dek: s.wrapped_dek,
            dek_nonce: s.dek_nonce,
            ciphertext: s.ciphertext,
            nonce: s.nonce,
        }
    }
}

mod b64 {
    use super::{Engine, B64};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(text: &str) -> MasterKeyring {
        MasterKeyring::parse(text, "test").expect("valid keyring")
    }

    #[test]
    fn seal_then_open_round_trips() {
        let r = ring(&MasterKeyring::generate_file_text());
        let s = r.seal("org_1", "openai", "sk-secret-value").expect("seal");
        assert_eq!(s.master_key_id, r.active_key_id());
        let back = r.open("org_1", "openai", &s).expect("open");
        assert_eq!(back.expose_secret(), "sk-secret-value");
    }

    #[test]
    fn ciphertext_is_bound_to_org_and_provider() {
        let r = ring(&MasterKeyring::generate_file_text());
        let s = r.seal("org_1", "openai", "sk-secret-value").expect("seal");
        assert!(matches!(
            r.open("org_2", "openai", &s),
            Err(CryptoError::Decrypt)
        ));
        assert!(matches!(
            r.open("org_1", "gemini", &s),
            Err(CryptoError::Decrypt)
        ));
        let mut moved = s.clone();
        moved.master_key_id = "other".into();
        assert!(matches!(
            r.open("org_1", "openai", &moved),
            Err(CryptoError::UnknownKeyId(_))
        ));
    }

    #[test]
    fn rotation_keeps_old_ids_readable_and_reseals_under_the_new_one() {
        let old = format!("k1={}", "11".repeat(32));
        let r1 = ring(&old);
        let s = r1.seal("o", "gemini", "AIza-secret").expect("seal");
        let r2 = ring(&format!("k2={}\n{old}\n", "22".repeat(32)));
        assert_eq!(r2.active_key_id(), "k2");
        assert_eq!(
            r2.open("o", "gemini", &s).expect("old id").expose_secret(),
            "AIza-secret"
        );
        let s2 = r2.reseal("o", "gemini", &s).expect("reseal");
        assert_eq!(s2.master_key_id, "k2");
        assert_eq!(
            ring(&format!("k2={}", "22".repeat(32)))
                .open("o", "gemini", &s2)
                .expect("new")
                .expose_secret(),
            "AIza-secret"
        );
    }

    #[test]
    fn bad_files_say_what_to_fix() {
        let e = MasterKeyring::parse("zz", "f").expect_err("bad");
        assert!(e.to_string().contains("openssl rand -hex 32"), "{e}");
        let e = MasterKeyring::parse("abcd", "f").expect_err("short");
        assert!(e.to_string().contains("32 bytes"), "{e}");
        assert!(matches!(
            MasterKeyring::parse("# nothing\n", "f"),
            Err(CryptoError::Empty { .. })
        ));
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let text = MasterKeyring::generate_file_text();
        let r = ring(&text);
        let dbg = format!("{r:?}");
        assert!(!dbg.contains(text.trim()));
        let s = r.seal("o", "openai", "sk-canary-123456").expect("seal");
        assert!(!format!("{s:?}").contains("ciphertext"));
    }
}
