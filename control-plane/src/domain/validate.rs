//! Checks of what operators and callers send (names, ids, provider secrets, times, idempotency
//! keys), with errors that say how to fix the input and echo at most a clipped part of it.

use flex_shared::catalog::Provider;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::timefmt;

pub fn not_found_org(org_id: &str) -> Error {
    Error::NotFound(format!(
        "org {:?} not found; list orgs with `flex admin org list`",
        clip(org_id)
    ))
}

/// At most 64 characters of user input, for echoing it in an error.
pub fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

pub(super) fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Org names: 1–100 characters, no control characters; surrounding whitespace is trimmed.
pub fn validate_org_name(name: &str) -> Result<String> {
    let n = name.trim();
    let len = n.chars().count();
    if len == 0 || len > 100 || has_control(n) {
        return Err(Error::InvalidArgument(format!(
            "org name must be 1-100 characters without control characters (got {len} characters), e.g. `flex admin org create \"Acme Inc\"`"
        )));
    }
    Ok(n.to_string())
}

/// API key names: up to 100 characters, default `default`.
pub fn validate_key_name(name: &str) -> Result<String> {
    let n = name.trim();
    let len = n.chars().count();
    if len > 100 || has_control(n) {
        return Err(Error::InvalidArgument(format!(
            "API key name must be at most 100 characters without control characters (got {len}), e.g. `flex admin key create --org org_… --name ci`"
        )));
    }
    Ok(if n.is_empty() { "default" } else { n }.to_string())
}

/// Ids the caller passes back (org, key, proxy): required, short, printable.
pub fn validate_id(what: &str, id: &str, example: &str) -> Result<String> {
    let id = id.trim();
    if id.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{what} is required, e.g. {example}"
        )));
    }
    if id.len() > 200 || has_control(id) || id.contains(char::is_whitespace) {
        return Err(Error::InvalidArgument(format!(
            "{what} {:?} is malformed (at most 200 characters, no spaces), e.g. {example}",
            clip(id)
        )));
    }
    Ok(id.to_string())
}

/// `openai`, `anthropic` or `gemini`.
pub fn parse_provider(p: &str) -> Result<Provider> {
    Provider::parse(p.trim()).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "provider must be openai, anthropic or gemini (got {:?}), e.g. `flex admin provider-key set --org org_… --provider openai`",
            clip(p)
        ))
    })
}

/// A provider secret: trimmed (stdin adds a newline), non-empty, no inner whitespace. Errors never
/// echo the secret.
pub fn validate_secret(secret: &str) -> Result<String> {
    let s = secret.trim();
    if s.is_empty() {
        return Err(Error::InvalidArgument(
            "the provider key is empty; pipe it on stdin, e.g. `printf %s \"$OPENAI_API_KEY\" | flex admin provider-key set --org org_… --provider openai`".into(),
        ));
    }
    if s.len() > 4096 {
        return Err(Error::InvalidArgument(
            "the provider key is longer than 4096 bytes; paste only the key itself".into(),
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::InvalidArgument(
            "the provider key contains whitespace or control characters; paste only the key itself (one line)".into(),
        ));
    }
    Ok(s.to_string())
}

/// Revocation reasons: up to 500 characters.
pub fn validate_reason(reason: &str) -> Result<String> {
    let r = reason.trim();
    if r.chars().count() > 500 || has_control(r) {
        return Err(Error::InvalidArgument(
            "revocation reason must be at most 500 characters on one line, e.g. \"leaked in CI logs\"".into(),
        ));
    }
    Ok(r.to_string())
}

/// An optional RFC 3339 time given by an operator.
pub fn parse_time(field: &str, value: &str) -> Result<Option<OffsetDateTime>> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    timefmt::parse(value).map(Some).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{field} must be an RFC 3339 time (got {:?}), e.g. 2030-01-01T00:00:00Z",
            clip(value)
        ))
    })
}

/// Idempotency keys: up to 200 printable characters.
pub fn validate_idempotency_key(key: &str) -> Result<Option<String>> {
    let k = key.trim();
    if k.is_empty() {
        return Ok(None);
    }
    if k.len() > 200 || has_control(k) {
        return Err(Error::InvalidArgument(
            "idempotency_key must be at most 200 printable characters, e.g. a UUID".into(),
        ));
    }
    Ok(Some(k.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn validation_messages_say_how_to_fix() {
        let e = validate_org_name("  ").unwrap_err();
        assert!(e.to_string().contains("1-100"), "{e}");
        assert!(e.to_string().contains("e.g."), "{e}");
        assert!(validate_org_name(&"x".repeat(101)).is_err());
        assert_eq!(validate_org_name(" Acme ").unwrap(), "Acme");
        let e = parse_provider("azure").unwrap_err();
        assert!(e.to_string().contains("openai, anthropic or gemini"), "{e}");
        let e = validate_secret("sk-abc def").unwrap_err();
        assert!(!e.to_string().contains("sk-abc"), "{e}");
        assert_eq!(validate_secret("sk-abc\n").unwrap(), "sk-abc");
        assert!(parse_time("expires_at", "tomorrow").is_err());
        assert_eq!(parse_time("expires_at", "").unwrap(), None);
    }
}
