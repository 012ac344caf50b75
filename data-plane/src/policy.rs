//! The failure policy: what a provider's failure means for the request, in one table per
//! provider (docs/failure-policy.md shows the same tables).
//!
//! - [`FailureClass::Caller`]: the request itself is wrong or cannot be paid for (400, 401, 403,
//!   404, 413, 422, quota and billing errors). Standard would fail the same way, so it passes
//!   through at once with the provider's status, body and headers.
//! - [`FailureClass::Capacity`]: no room now (429 rate or capacity, 503, 529, OpenAI's flex
//!   `resource_unavailable`). Flex is retried with jittered backoff that honours `Retry-After`.
//! - [`FailureClass::Server`]: the provider or the path to it broke (500, 502, 504, a refused or
//!   reset connection, no response head in time, a stream broken before it started). A flex
//!   failure launches standard at once.
//!
//! In a race a standard failure of either of the last two classes keeps flex alive until the
//! deadline, and standard is tried once more if it can still start in time (see `race`).

use std::time::{Duration, SystemTime};

use flex_shared::catalog::Provider;
use http::{HeaderMap, StatusCode};
use serde_json::Value;

/// What a failed attempt means (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    Caller,
    Capacity,
    Server,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Caller => "caller",
            FailureClass::Capacity => "capacity",
            FailureClass::Server => "server",
        }
    }
}

/// The class of a provider's non-2xx answer, by the provider's table.
pub fn classify(provider: Provider, status: StatusCode, body: &[u8]) -> FailureClass {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match provider {
        Provider::OpenAi => openai(status.as_u16(), &v),
        Provider::Anthropic => anthropic(status.as_u16(), &v),
        Provider::Gemini => gemini(status.as_u16(), &v),
    }
}

/// Rows shared by the three tables, after each provider's own.
fn common(status: u16) -> FailureClass {
    match status {
        429 | 503 | 529 => FailureClass::Capacity,
        // 408: the provider gave up waiting for our request; a transport fault, not the caller's.
        408 | 500..=599 => FailureClass::Server,
        _ => FailureClass::Caller,
    }
}

/// OpenAI: `insufficient_quota` (no credit) and billing limits are the caller's; flex
/// `resource_unavailable` is capacity whatever its status.
fn openai(status: u16, v: &Value) -> FailureClass {
    let err = &v["error"];
    let code = err["code"].as_str().unwrap_or_default();
    let kind = err["type"].as_str().unwrap_or_default();
    match (status, code, kind) {
        (_, "insufficient_quota" | "billing_hard_limit_reached" | "billing_not_active", _)
        | (_, _, "insufficient_quota") => FailureClass::Caller,
        (_, "resource_unavailable", _) => FailureClass::Capacity,
        _ => common(status),
    }
}

/// Anthropic: 429 `rate_limit_error` and 529 `overloaded_error` are capacity; 402
/// `billing_error` and a 400 about the credit balance are the caller's.
fn anthropic(status: u16, v: &Value) -> FailureClass {
    match (status, v["error"]["type"].as_str().unwrap_or_default()) {
        (_, "overloaded_error" | "rate_limit_error") => FailureClass::Capacity,
        (_, "billing_error" | "permission_error" | "authentication_error") => FailureClass::Caller,
        (_, "api_error") if status >= 500 => FailureClass::Server,
        _ => common(status),
    }
}

/// Gemini: a 429 `RESOURCE_EXHAUSTED` whose details name a quota (`QuotaFailure`) is the
/// caller's (the project's quota: standard shares it), unless every violation is a
/// per-minute rate, which passes with its `RetryInfo`; 503 `UNAVAILABLE` is capacity.
fn gemini(status: u16, v: &Value) -> FailureClass {
    let err = &v["error"];
    if status == 429 || err["status"] == "RESOURCE_EXHAUSTED" {
        let details = err["details"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let quota = details.iter().find(|d| {
            d["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with("QuotaFailure"))
        });
        return match quota {
            None => FailureClass::Capacity,
            Some(q) => {
                let per_minute = q["violations"].as_array().is_some_and(|vs| {
                    !vs.is_empty()
                        && vs.iter().all(|v| {
                            v["quotaId"]
                                .as_str()
                                .or(v["quotaMetric"].as_str())
                                .is_some_and(|id| id.contains("PerMinute"))
                        })
                });
                if per_minute {
                    FailureClass::Capacity
                } else {
                    FailureClass::Caller
                }
            }
        };
    }
    common(status)
}

/// The longest `Retry-After` we honour; past it the hint is treated as "not in this race".
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The provider's retry hint: `retry-after-ms` (OpenAI), `retry-after` (seconds or an HTTP
/// date), or Gemini's `RetryInfo.retryDelay` (`"37s"`) in the error body.
pub fn retry_after(headers: &HeaderMap, body: &[u8]) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0).min(MAX_RETRY_AFTER));
        }
    }
    if let Some(v) = header("retry-after") {
        let v = v.trim();
        if let Ok(secs) = v.parse::<f64>() {
            if secs.is_finite() && secs >= 0.0 {
                return Some(Duration::from_secs_f64(secs).min(MAX_RETRY_AFTER));
            }
        }
        if let Ok(at) = httpdate(v) {
            let now = SystemTime::now();
            return Some(
                at.duration_since(now)
                    .unwrap_or_default()
                    .min(MAX_RETRY_AFTER),
            );
        }
    }
    if body.is_empty() || !body.windows(10).any(|w| w == b"retryDelay") {
        return None;
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    v["error"]["details"].as_array()?.iter().find_map(|d| {
        let s = d["retryDelay"].as_str()?.strip_suffix('s')?;
        let secs = s
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)?;
        Some(Duration::from_secs_f64(secs).min(MAX_RETRY_AFTER))
    })
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form `Retry-After` dates take.
fn httpdate(v: &str) -> Result<SystemTime, time::error::Parse> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let dt = time::PrimitiveDateTime::parse(v, &format)?;
    Ok(dt.assume_utc().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn class(p: Provider, status: u16, body: Value) -> FailureClass {
        classify(
            p,
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            body.to_string().as_bytes(),
        )
    }

    use FailureClass::{Caller, Capacity, Server};

    /// OpenAI's table, a row per line.
    #[test]
    fn openai_table() {
        let p = Provider::OpenAi;
        let e =
            |code: &str, kind: &str| json!({"error": {"code": code, "type": kind, "message": "m"}});
        for (status, body, want) in [
            (400, e("invalid_value", "invalid_request_error"), Caller),
            (401, e("invalid_api_key", "invalid_request_error"), Caller),
            (
                403,
                e("unsupported_country_region_territory", "request_forbidden"),
                Caller,
            ),
            (404, e("model_not_found", "invalid_request_error"), Caller),
            (413, json!({}), Caller),
            (422, json!({}), Caller),
            (429, e("insufficient_quota", "insufficient_quota"), Caller),
            (
                429,
                e("billing_hard_limit_reached", "invalid_request_error"),
                Caller,
            ),
            (429, e("rate_limit_exceeded", "requests"), Capacity),
            (
                429,
                e("resource_unavailable", "invalid_request_error"),
                Capacity,
            ),
            (503, e("", "server_error"), Capacity),
            (529, json!({}), Capacity),
            (500, e("", "server_error"), Server),
            (502, json!({}), Server),
            (504, json!({}), Server),
            (408, json!({}), Server),
        ] {
            assert_eq!(class(p, status, body.clone()), want, "{status} {body}");
        }
    }

    #[test]
    fn anthropic_table() {
        let p = Provider::Anthropic;
        let e = |kind: &str| json!({"type": "error", "error": {"type": kind, "message": "m"}});
        for (status, body, want) in [
            (400, e("invalid_request_error"), Caller),
            (401, e("authentication_error"), Caller),
            (402, e("billing_error"), Caller),
            (403, e("permission_error"), Caller),
            (404, e("not_found_error"), Caller),
            (413, e("request_too_large"), Caller),
            (429, e("rate_limit_error"), Capacity),
            (529, e("overloaded_error"), Capacity),
            (503, json!({}), Capacity),
            (500, e("api_error"), Server),
            (502, json!({}), Server),
            (504, e("timeout_error"), Server),
        ] {
            assert_eq!(class(p, status, body.clone()), want, "{status} {body}");
        }
    }

    #[test]
    fn gemini_table() {
        let p = Provider::Gemini;
        let e = |code: u16, status: &str, details: Value| json!({"error": {"code": code, "status": status, "message": "m", "details": details}});
        let quota = |id: &str| {
            json!([{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                     "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests", "quotaId": id}]},
                   {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}])
        };
        for (status, body, want) in [
            (400, e(400, "INVALID_ARGUMENT", json!([])), Caller),
            (400, e(400, "FAILED_PRECONDITION", json!([])), Caller),
            (403, e(403, "PERMISSION_DENIED", json!([])), Caller),
            (404, e(404, "NOT_FOUND", json!([])), Caller),
            (
                429,
                e(
                    429,
                    "RESOURCE_EXHAUSTED",
                    quota("GenerateRequestsPerDayPerProjectPerModel"),
                ),
                Caller,
            ),
            (
                429,
                e(
                    429,
                    "RESOURCE_EXHAUSTED",
                    quota("GenerateRequestsPerMinutePerProjectPerModel"),
                ),
                Capacity,
            ),
            (429, e(429, "RESOURCE_EXHAUSTED", json!([])), Capacity),
            (503, e(503, "UNAVAILABLE", json!([])), Capacity),
            (500, e(500, "INTERNAL", json!([])), Server),
            (502, json!({}), Server),
            (504, e(504, "DEADLINE_EXCEEDED", json!([])), Server),
        ] {
            assert_eq!(class(p, status, body.clone()), want, "{status} {body}");
        }
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, b""), None);
        h.insert("retry-after", http::HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h, b""), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", http::HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h, b""), Some(Duration::from_millis(1500)));
        let mut h = HeaderMap::new();
        h.insert("retry-after", http::HeaderValue::from_static("99999"));
        assert_eq!(retry_after(&h, b""), Some(MAX_RETRY_AFTER));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            http::HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(
            retry_after(&h, b""),
            Some(Duration::ZERO),
            "a date in the past"
        );
        let body = json!({"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}]}});
        assert_eq!(
            retry_after(&HeaderMap::new(), body.to_string().as_bytes()),
            Some(Duration::from_secs(37))
        );
    }
}
