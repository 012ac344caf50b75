//! FlexInference API keys: `flex_live_` + 43 base62 characters (256 bits) + a 6-character base62
//! CRC32 of the random part, so secret scanners and the proxy can recognise a mistyped or
//! truncated key offline. Only the SHA-256 of the whole key is ever stored.

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const PREFIX: &str = "flex_live_";
const SECRET_LEN: usize = 43;
const CHECK_LEN: usize = 6;
const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a presented key is not even worth looking up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("the key does not start with `flex_live_`")]
    Prefix,
    #[error("the key has the wrong length (expected {} characters)", PREFIX.len() + SECRET_LEN + CHECK_LEN)]
    Length,
    #[error("the key contains characters other than letters and digits after `flex_live_`")]
    Charset,
    #[error("the key's checksum does not match (it was probably truncated or mistyped)")]
    Checksum,
}

fn base62_fixed(mut n: u64, len: usize) -> String {
    let mut out = vec![b'0'; len];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn checksum(secret: &str) -> String {
    base62_fixed(u64::from(crc32fast::hash(secret.as_bytes())), CHECK_LEN)
}

/// A new random API key. Show it once, store only [`hash`].
pub fn generate() -> String {
    let mut rng = rand::thread_rng();
    let secret: String = (0..SECRET_LEN)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    let check = checksum(&secret);
    format!("{PREFIX}{secret}{check}")
}

/// Checks prefix, length, alphabet and checksum without any lookup.
pub fn check_format(key: &str) -> Result<(), KeyFormatError> {
    let rest = key.strip_prefix(PREFIX).ok_or(KeyFormatError::Prefix)?;
    if rest.len() != SECRET_LEN + CHECK_LEN {
        return Err(KeyFormatError::Length);
    }
    if !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(KeyFormatError::Charset);
    }
    let (secret, check) = rest.split_at(SECRET_LEN);
    if checksum(secret) != check {
        return Err(KeyFormatError::Checksum);
    }
    Ok(())
}

/// Hex SHA-256 of the whole key: what the log, the snapshots and the proxies hold.
pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Constant-time comparison of two hex hashes.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// What an operator may see of a key: its prefix, two characters and the last four.
pub fn hint(key: &str) -> String {
    let head: String = key.chars().take(PREFIX.len() + 2).collect();
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{head}…{tail}")
}

/// The last four characters of any secret (for provider keys).
pub fn last4(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() <= 8 {
        // Too short to reveal anything safely.
        return "****".to_string();
    }
    chars[chars.len() - 4..].iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_pass_the_format_check_and_differ() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(a.len(), PREFIX.len() + SECRET_LEN + CHECK_LEN);
        assert_eq!(check_format(&a), Ok(()));
    }

    #[test]
    fn a_changed_character_fails_the_checksum() {
        let key = generate();
        let mut chars: Vec<char> = key.chars().collect();
        let i = PREFIX.len() + 5;
        chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
        let bad: String = chars.into_iter().collect();
        assert_eq!(check_format(&bad), Err(KeyFormatError::Checksum));
    }

    #[test]
    fn malformed_keys_are_classified() {
        assert_eq!(check_format("sk-abc"), Err(KeyFormatError::Prefix));
        assert_eq!(check_format("flex_live_abc"), Err(KeyFormatError::Length));
        let mut key = generate();
        key.replace_range(PREFIX.len()..PREFIX.len() + 1, "-");
        assert_eq!(check_format(&key), Err(KeyFormatError::Charset));
    }

    #[test]
    fn hint_and_last4_reveal_little() {
        let key = generate();
        let h = hint(&key);
        assert!(h.starts_with("flex_live_"));
        assert!(h.len() < 24);
        assert_eq!(last4("sk-proj-1234567890abcd"), "abcd");
        assert_eq!(last4("short"), "****");
    }

    #[test]
    fn hash_is_stable_hex_and_compares_in_constant_time() {
        let h = hash("flex_live_x");
        assert_eq!(h.len(), 64);
        assert!(hashes_equal(&h, &hash("flex_live_x")));
        assert!(!hashes_equal(&h, &hash("flex_live_y")));
    }
}
