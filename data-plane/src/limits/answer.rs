//! What callers see of limits: the rate-limit headers of an answer, in the caller's conventions,
//! and the 429 (503 when the counters are unreachable and the proxy fails closed) rendered by
//! [`ApiError`] in the caller's envelope.
//!
//! OpenAI's names on Responses, Chat Completions and Interactions:
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (reset as a duration, e.g. `60s`,
//! `1m0s`, `250ms`); Anthropic's on Messages: `anthropic-ratelimit-{requests,tokens}-{limit,
//! remaining,reset}` (reset as an RFC 3339 time). "Reset" is when the 60-second window has fully
//! replenished. A refusal carries `retry-after` (seconds) and `retry-after-ms` when waiting
//! helps (the official SDKs wait that long before their retry), and `x-should-retry: false`
//! when it does not (a budget spent until the next day or month, a request larger than the tpm
//! limit), which the official SDKs honour too.

use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::json;

use super::{Demand, Granted, LimitKind, Refusal, ScopeLimits, WINDOW_MS};
use crate::error::ApiError;
use crate::formats::CallerFormat;

/// The wall clock, unix ms.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The UTC time of unix ms `ms` (the epoch for one out of range).
fn utc(ms: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Unix ms of a UTC date's midnight.
fn midnight_ms(d: time::Date) -> u64 {
    let t = d.midnight().assume_utc().unix_timestamp();
    u64::try_from(t).unwrap_or(0).saturating_mul(1000)
}

/// The UTC day (`YYYYMMDD`) and month (`YYYYMM`) of a time.
pub(crate) fn day_and_month(ms: u64) -> (String, String) {
    let d = utc(ms).date();
    let (y, m) = (d.year(), u8::from(d.month()));
    (
        format!("{y:04}{m:02}{:02}", d.day()),
        format!("{y:04}{m:02}"),
    )
}

/// Unix ms of the next UTC midnight and of the next first of a month after `ms`.
fn next_day_and_month(ms: u64) -> (u64, u64) {
    let d = utc(ms).date();
    let next_day = d.next_day().unwrap_or(d);
    let (y, m) = match d.month() {
        time::Month::December => (d.year() + 1, time::Month::January),
        m => (d.year(), m.next()),
    };
    let next_month = time::Date::from_calendar_date(y, m, 1).unwrap_or(next_day);
    (midnight_ms(next_day), midnight_ms(next_month))
}

/// RFC 3339, whole seconds (rounded up), UTC.
pub(crate) fn rfc3339(ms: u64) -> String {
    let t = utc(ms.div_ceil(1000).saturating_mul(1000));
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// OpenAI's duration form: `250ms`, `12.4s`, `1m0s`, `6m30.5s`.
pub(crate) fn openai_duration(ms: u64) -> String {
    let secs = |ms: u64| {
        let s = format!("{}.{:03}", ms / 1000, ms % 1000);
        let s = s.trim_end_matches('0').trim_end_matches('.').to_string();
        format!("{s}s")
    };
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        secs(ms)
    } else {
        format!("{}m{}", ms / 60_000, secs(ms % 60_000))
    }
}

/// The dollar form of micro-dollars: `$1.250000`.
fn dollars(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}${}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    limit: u64,
    remaining: u64,
    /// From `at_ms` until the window has fully replenished.
    reset_ms: u64,
}

/// The rate-limit headers of an answer: the binding rpm and tpm limit (the one with the least
/// left, of the org's and the key's) after this request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateHeaders {
    requests: Option<Window>,
    tokens: Option<Window>,
    at_ms: u64,
}

fn tighter(a: Option<Window>, b: Window) -> Option<Window> {
    match a {
        Some(a) if a.remaining <= b.remaining => Some(a),
        _ => Some(b),
    }
}

impl RateHeaders {
    pub(crate) fn granted(d: &Demand, g: &Granted) -> Self {
        let mut h = Self {
            at_ms: g.now_ms,
            ..Self::default()
        };
        for (s, c) in d.scopes.iter().zip(&g.counts) {
            if s.rpm > 0 {
                let w = Window {
                    limit: s.rpm,
                    remaining: s.rpm.saturating_sub(c.requests + 1),
                    reset_ms: WINDOW_MS,
                };
                h.requests = tighter(h.requests, w);
            }
            if s.tpm > 0 {
                let w = Window {
                    limit: s.tpm,
                    remaining: s.tpm.saturating_sub(c.tokens + d.tokens),
                    reset_ms: WINDOW_MS,
                };
                h.tokens = tighter(h.tokens, w);
            }
        }
        h
    }

    /// Whether there is anything to send.
    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }

    /// Writes the headers in `format`'s conventions.
    pub fn apply(&self, format: CallerFormat, h: &mut HeaderMap) {
        let anthropic = format == CallerFormat::Messages;
        for (what, w) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(w) = w else {
                continue;
            };
            let (limit, remaining, reset, reset_value) = if anthropic {
                (
                    format!("anthropic-ratelimit-{what}-limit"),
                    format!("anthropic-ratelimit-{what}-remaining"),
                    format!("anthropic-ratelimit-{what}-reset"),
                    rfc3339(self.at_ms + w.reset_ms),
                )
            } else {
                (
                    format!("x-ratelimit-limit-{what}"),
                    format!("x-ratelimit-remaining-{what}"),
                    format!("x-ratelimit-reset-{what}"),
                    openai_duration(w.reset_ms),
                )
            };
            for (name, value) in [
                (limit, w.limit.to_string()),
                (remaining, w.remaining.to_string()),
                (reset, reset_value),
            ] {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    h.insert(n, v);
                }
            }
        }
    }
}

/// The refusal, in the caller's envelope: which limit, its value, when it resets, how to raise it.
pub(crate) fn refused(
    r: &Refusal,
    scope: &ScopeLimits,
    d: &Demand,
    format: CallerFormat,
) -> ApiError {
    let who = scope.scope.describe();
    let org = &scope.scope.org_id;
    let key_flag = scope
        .scope
        .key_id
        .as_deref()
        .map(|k| format!(" --key {k}"))
        .unwrap_or_default();
    let (next_day, next_month) = next_day_and_month(unix_ms());
    let now = unix_ms();
    let value = scope.value(r.kind);
    let resets_at = match (r.kind, r.retry_after_ms) {
        (_, Some(ms)) => Some(now + ms),
        (LimitKind::DailyBudget, None) => Some(next_day),
        (LimitKind::MonthlyBudget, None) => Some(next_month),
        _ => None,
    };
    let resets = resets_at.map(rfc3339);
    let raise = |suggest: i64| {
        format!(
            "flex admin limits set --org {org}{key_flag} {} {suggest}",
            r.kind.flag()
        )
    };
    let too_large = r.kind == LimitKind::Tpm && r.retry_after_ms.is_none();
    let message = match r.kind {
        LimitKind::Rpm => format!(
            "Rate limit reached for {who} on requests per minute: the limit is {value}, {} requests were admitted in the last 60 s. A slot frees in {} (at {}).",
            r.used,
            openai_duration(r.retry_after_ms.unwrap_or(WINDOW_MS)),
            resets.clone().unwrap_or_default()
        ),
        LimitKind::Tpm if too_large => format!(
            "This request may use up to {} tokens (its estimated input, a quarter of its bytes, plus its output cap: max_tokens, or 4096 when it sets none), more than the tokens-per-minute limit of {who} ({value}): it can never be admitted under that limit.",
            d.tokens
        ),
        LimitKind::Tpm => format!(
            "Rate limit reached for {who} on tokens per minute: the limit is {value}, {} tokens are counted in the last 60 s (requests in flight at their worst case) and this request may use up to {}. Enough frees in {} (at {}).",
            r.used,
            r.requested,
            openai_duration(r.retry_after_ms.unwrap_or(WINDOW_MS)),
            resets.clone().unwrap_or_default()
        ),
        LimitKind::Concurrency => format!(
            "Concurrency limit reached for {who}: {} requests are in flight and the limit is {value}. A slot frees when one of them ends.",
            r.used
        ),
        LimitKind::DailyBudget | LimitKind::MonthlyBudget => format!(
            "The {} budget of {who} is spent: {} of {} is spent or held by requests in flight this UTC {}, and this request may cost up to {}. It resets at {}.",
            if r.kind == LimitKind::DailyBudget { "daily" } else { "monthly" },
            dollars(r.used),
            dollars(value),
            if r.kind == LimitKind::DailyBudget { "day" } else { "month" },
            dollars(r.requested),
            resets.clone().unwrap_or_default()
        ),
    };
    let fix = match r.kind {
        LimitKind::Tpm if too_large => "lower max_tokens (or send a shorter input), or ask your FlexInference operator to raise the limit.".to_string(),
        LimitKind::DailyBudget | LimitKind::MonthlyBudget => format!("wait until {}, or ask your FlexInference operator to raise the budget (integer micro-dollars).", resets.clone().unwrap_or_default()),
        _ => "retry after the `Retry-After` header (the official SDKs do by themselves), or ask your FlexInference operator to raise the limit.".to_string(),
    };
    let suggest = match r.kind {
        LimitKind::Tpm if too_large => r.requested.max(value.saturating_mul(2)),
        _ => value.saturating_mul(2).max(1),
    };
    let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, r.kind.code(), message)
        .param(r.kind.name())
        .fix(fix)
        .example(raise(suggest))
        .detail(
            "limit",
            json!({
                "name": r.kind.name(),
                "scope": if scope.scope.key_id.is_some() { "key" } else { "org" },
                "org_id": org,
                "key_id": scope.scope.key_id,
                "value": value,
                "used": r.used,
                "requested": r.requested,
                "resets_at": resets,
                "retry_after_ms": r.retry_after_ms,
            }),
        );
    match r.retry_after_ms {
        Some(ms) if !too_large => {
            let secs = ms.div_ceil(1000).max(1);
            e = e
                .header("retry-after", HeaderValue::from(secs))
                .header("retry-after-ms", HeaderValue::from(ms.max(1)));
        }
        _ => {
            if let Some(at) = resets_at {
                e = e.header(
                    "retry-after",
                    HeaderValue::from(at.saturating_sub(now).div_ceil(1000).max(1)),
                );
            }
            e = e.header("x-should-retry", HeaderValue::from_static("false"));
        }
    }
    if matches!(r.kind, LimitKind::Rpm | LimitKind::Tpm) {
        let limit = u64::try_from(value).unwrap_or(0);
        let used = u64::try_from(r.used).unwrap_or(0);
        let w = Window {
            limit,
            remaining: if r.kind == LimitKind::Rpm {
                0
            } else {
                limit.saturating_sub(used)
            },
            reset_ms: r.retry_after_ms.unwrap_or(WINDOW_MS),
        };
        let h = RateHeaders {
            requests: (r.kind == LimitKind::Rpm).then_some(w),
            tokens: (r.kind == LimitKind::Tpm).then_some(w),
            at_ms: now,
        };
        let mut map = HeaderMap::new();
        h.apply(format, &mut map);
        for (name, value) in &map {
            if let Some(n) = static_name(name.as_str()) {
                e = e.header(n, value.clone());
            }
        }
    }
    e
}

/// The header names [`RateHeaders::apply`] writes, as `'static` (for [`ApiError::header`]).
fn static_name(name: &str) -> Option<&'static str> {
    const NAMES: [&str; 12] = [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    ];
    NAMES.iter().copied().find(|n| *n == name)
}

/// Fail closed: the counters are unreachable, so a request under a limit is refused.
pub(crate) fn unavailable(_format: CallerFormat) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "limits_unavailable",
        "This request is under a rate limit, concurrency cap or budget, and the shared limit counters (Redis) cannot be reached; this proxy runs with --limits-fail closed, so it refuses such requests rather than count them wrongly.",
    )
    .fix("retry in a moment; operators: bring Redis back (the proxy counts there again within 250 ms), or run the proxies with --limits-fail open to admit on local shares meanwhile.")
    .example("flex proxy --redis-url redis://127.0.0.1:6379 --limits-fail open …")
    .header("retry-after", HeaderValue::from_static("1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_and_formats() {
        // 2024-02-29T23:59:59.500Z
        let ms = 1_709_251_199_500;
        assert_eq!(day_and_month(ms), ("20240229".into(), "202402".into()));
        let (d, m) = next_day_and_month(ms);
        assert_eq!(rfc3339(d), "2024-03-01T00:00:00Z");
        assert_eq!(rfc3339(m), "2024-03-01T00:00:00Z");
        let (_, m) = next_day_and_month(1_734_000_000_000); // December 2024
        assert_eq!(rfc3339(m), "2025-01-01T00:00:00Z");
        assert_eq!(rfc3339(ms), "2024-03-01T00:00:00Z");
        assert_eq!(openai_duration(250), "250ms");
        assert_eq!(openai_duration(12_400), "12.4s");
        assert_eq!(openai_duration(1_000), "1s");
        assert_eq!(openai_duration(60_000), "1m0s");
        assert_eq!(openai_duration(390_500), "6m30.5s");
        assert_eq!(dollars(1_250_000), "$1.250000");
    }
}
