//! Tool-call ids across providers (translation trap 1): OpenAI Chat rejects ids over 40
//! characters, Anthropic requires `^[a-zA-Z0-9_-]+$`, Gemini often sends none. Every transform
//! here is deterministic, so an id we hand a caller comes back from them and maps to the same
//! upstream id again: the call and its result always agree inside one request.

use sha2::{Digest, Sha256};

/// A fresh id for a call the provider did not name.
pub fn generate() -> String {
    format!("call_{}", uuid::Uuid::new_v4().simple())
}

fn short_hash(id: &str) -> String {
    hex::encode(&Sha256::digest(id.as_bytes())[..12])
}

/// Anthropic: only letters, digits, `_` and `-`; an id with other characters becomes
/// `toolu_` + a hash of it (an empty id becomes a fresh one).
pub fn for_anthropic(id: &str) -> String {
    if id.is_empty() {
        return generate();
    }
    if id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        id.to_string()
    } else {
        format!("toolu_{}", short_hash(id))
    }
}

/// OpenAI Chat: at most 40 characters; longer ids become `call_` + a hash of them.
pub fn for_chat(id: &str) -> String {
    if id.is_empty() {
        return generate();
    }
    if id.len() <= 40 {
        id.to_string()
    } else {
        format!("call_{}", short_hash(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trap_1_tool_call_ids_fit_every_provider_and_map_deterministically() {
        let long = "call_".to_string() + &"x".repeat(60);
        assert!(for_chat(&long).len() <= 40);
        assert_eq!(for_chat(&long), for_chat(&long));
        assert_eq!(for_chat("call_abc"), "call_abc");
        let weird = "fc_abc.def/ghi";
        let a = for_anthropic(weird);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        assert_eq!(a, for_anthropic(weird));
        assert_eq!(for_anthropic("toolu_01A"), "toolu_01A");
        assert!(!for_anthropic("").is_empty());
        assert_ne!(generate(), generate());
    }
}
