//! The provider-independent behaviour: the effective knobs of one request (config + directive),
//! the tier's fate (capacity error, directed error, or start delay and token rate), and the
//! errors every provider renders in its own envelope.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{HeaderMap, StatusCode};

use super::answer::{Conversation, DEFAULT_OUTPUT_TOKENS};
use super::directive::Directive;
use super::stats::{Provider, ServeGuard, SimStats, Tier};
use super::SimConfig;

/// Shared by all handlers.
#[derive(Clone)]
pub(crate) struct SimState(Arc<Inner>);

struct Inner {
    cfg: SimConfig,
    stats: Arc<SimStats>,
    /// Flex attempts so far per `flex_fail_times` key.
    flex_attempts: Mutex<HashMap<String, u32>>,
}

/// What kind of failure an error is; each provider names it its own way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    InvalidRequest,
    Authentication,
    Permission,
    NotFound,
    RateLimit,
    /// The flex tier is out of capacity (429 or 503).
    Capacity,
    Overloaded,
    Server,
}

/// An error answer, before a provider puts it in its envelope.
#[derive(Clone, Debug)]
pub(crate) struct SimError {
    pub status: StatusCode,
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<&'static str>,
    /// The provider's error code, when a directive names one (`error_code=`).
    pub code: Option<String>,
    /// A `Retry-After` header in seconds (`retry_after=`).
    pub retry_after: Option<u64>,
    /// No answer at all: the connection is closed or the stream reset (`flex_reset=1`).
    pub reset: bool,
}

impl SimError {
    pub(crate) fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: ErrorKind::InvalidRequest,
            message: message.into(),
            param,
            code: None,
            retry_after: None,
            reset: false,
        }
    }

    pub(crate) fn unauthenticated(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: ErrorKind::Authentication,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
            reset: false,
        }
    }

    pub(crate) fn bad_json(err: &serde_json::Error) -> Self {
        Self::invalid(
            format!("We could not parse the JSON body of your request: {err}."),
            None,
        )
    }

    /// The flex tier's "no capacity right now" answer.
    fn capacity(status: u16) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            kind: ErrorKind::Capacity,
            message: "Resource Unavailable: the flex tier has no capacity for this request right \
                      now (simulated). Retry with exponential backoff, or use the standard tier."
                .to_owned(),
            param: None,
            code: None,
            retry_after: None,
            reset: false,
        }
    }

    /// The error a `status=N` directive asks for.
    fn directed(status: u16) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        let kind = match status.as_u16() {
            401 => ErrorKind::Authentication,
            403 => ErrorKind::Permission,
            404 => ErrorKind::NotFound,
            429 => ErrorKind::RateLimit,
            503 | 529 => ErrorKind::Overloaded,
            code if code >= 500 => ErrorKind::Server,
            _ => ErrorKind::InvalidRequest,
        };
        Self {
            status,
            kind,
            message: format!(
                "Simulated error: the request's `#sim status={}` directive asks for it.",
                status.as_u16()
            ),
            param: None,
            code: None,
            retry_after: None,
            reset: false,
        }
    }

    /// The error a tier's `flex_status` / `standard_status` asks for: a capacity error for 429,
    /// 503 and 529, else like `status=`.
    fn tier_error(status: u16) -> Self {
        if matches!(status, 429 | 503 | 529) {
            Self::capacity(status)
        } else {
            Self::directed(status)
        }
    }

    /// With the directive's code and retry hint.
    fn with(mut self, knobs: &Knobs) -> Self {
        self.code = knobs.error_code.clone();
        self.retry_after = knobs.retry_after;
        self
    }
}

/// Config and directive, merged, for one request.
pub(crate) struct Knobs {
    flex_delay: Duration,
    standard_delay: Duration,
    priority_delay: Duration,
    flex_status: Option<u16>,
    flex_fail_times: Option<u32>,
    flex_error_rate: f64,
    status: Option<u16>,
    fail_key: String,
    standard_status: Option<u16>,
    standard_fail_times: Option<u32>,
    error_code: Option<String>,
    retry_after: Option<u64>,
    flex_header_delay: Duration,
    standard_header_delay: Duration,
    /// Break the stream (`Err`) or end it cleanly (`Ok`) after this many events.
    pub cut: Option<Result<usize, usize>>,
    /// Break the flex tier's stream after this many events.
    flex_cut: Option<usize>,
    flex_reset: bool,
    /// Wait between two output tokens (zero: unlimited).
    pub token_interval: Duration,
    pub output_tokens: u32,
    pub tool: Option<String>,
    /// The tier an `auto` request is served on, if the directive says.
    pub served_tier: Option<Tier>,
}

/// A request that passed the tier: the wait before its first content and between its tokens.
pub(crate) struct Admission {
    pub guard: ServeGuard,
    pub start_delay: Duration,
    pub token_interval: Duration,
    /// The wait before the response head.
    pub head_delay: Duration,
}

impl Admission {
    /// Waits before the response head (a `*_header_delay_ms` directive).
    pub(crate) async fn wait_head(&self) {
        if !self.head_delay.is_zero() {
            tokio::time::sleep(self.head_delay).await;
        }
    }

    /// For a non-streaming answer of `steps` paced tokens: waits as long as the stream would
    /// have taken. Dropped meanwhile (client gone), the request counts as cancelled.
    pub(crate) async fn wait_whole_answer(mut self, steps: u64) {
        let total = self.start_delay + self.token_interval.saturating_mul(saturate(steps));
        if !total.is_zero() {
            tokio::time::sleep(total).await;
        }
        self.guard.finish();
    }
}

fn saturate(steps: u64) -> u32 {
    u32::try_from(steps).unwrap_or(u32::MAX)
}

impl SimState {
    pub(crate) fn new(cfg: SimConfig, stats: Arc<SimStats>) -> Self {
        Self(Arc::new(Inner {
            cfg,
            stats,
            flex_attempts: Mutex::new(HashMap::new()),
        }))
    }

    pub(crate) fn config(&self) -> &SimConfig {
        &self.0.cfg
    }

    pub(crate) fn stats(&self) -> &Arc<SimStats> {
        &self.0.stats
    }

    pub(crate) fn reset(&self) {
        self.0.stats.reset();
        self.flex_attempts().clear();
    }

    fn flex_attempts(&self) -> MutexGuard<'_, HashMap<String, u32>> {
        self.0
            .flex_attempts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The knobs of a request whose user texts are in `conversation`.
    pub(crate) fn knobs(&self, conversation: &Conversation<'_>) -> Knobs {
        let cfg = &self.0.cfg;
        let d = Directive::parse(conversation.user_texts.iter().copied());
        let tokens_per_sec = d.tokens_per_sec.unwrap_or(cfg.tokens_per_sec);
        Knobs {
            flex_delay: Duration::from_millis(d.flex_delay_ms.unwrap_or(cfg.flex_delay_ms)),
            standard_delay: Duration::from_millis(
                d.standard_delay_ms.unwrap_or(cfg.standard_delay_ms),
            ),
            priority_delay: Duration::from_millis(
                d.priority_delay_ms.unwrap_or(cfg.priority_delay_ms),
            ),
            flex_status: d.flex_status.or(cfg.flex_status).filter(|s| *s != 0),
            flex_fail_times: d.flex_fail_times,
            flex_error_rate: d.flex_error_rate.unwrap_or(cfg.flex_capacity_error_rate),
            status: d.status,
            token_interval: match tokens_per_sec {
                0 => Duration::ZERO,
                rate => Duration::from_secs(1) / saturate(rate),
            },
            output_tokens: d.output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS),
            tool: d.tool,
            served_tier: d.served_tier.as_deref().and_then(|tier| match tier {
                "flex" => Some(Tier::Flex),
                "standard" | "default" => Some(Tier::Standard),
                "priority" => Some(Tier::Priority),
                _ => None,
            }),
            standard_status: d.standard_status,
            standard_fail_times: d.standard_fail_times,
            error_code: d.error_code,
            retry_after: d.retry_after,
            flex_header_delay: Duration::from_millis(d.flex_header_delay_ms.unwrap_or(0)),
            standard_header_delay: Duration::from_millis(d.standard_header_delay_ms.unwrap_or(0)),
            cut: d.cut_after.map(Err).or(d.end_after.map(Ok)),
            flex_cut: d.flex_cut_after,
            flex_reset: d.flex_reset,
            fail_key: d.sim_id.unwrap_or(d.text),
        }
    }

    /// Counts the request on `tier` and decides its fate: an error now, or an admission.
    pub(crate) fn admit(
        &self,
        provider: Provider,
        tier: Tier,
        knobs: &Knobs,
    ) -> Result<Admission, SimError> {
        let stats = self.stats();
        stats.count_request(provider, tier);
        if let Some(status) = knobs.status {
            return Err(SimError::directed(status).with(knobs));
        }
        let (start_delay, head_delay) = match tier {
            Tier::Flex => {
                if knobs.flex_reset {
                    let mut err = SimError::directed(500);
                    err.reset = true;
                    return Err(err);
                }
                if let Some(status) = self.flex_capacity_error(knobs) {
                    stats.count_capacity_error(provider, tier);
                    return Err(SimError::tier_error(status).with(knobs));
                }
                (knobs.flex_delay, knobs.flex_header_delay)
            }
            Tier::Standard => {
                if let Some(status) = self.standard_error(knobs) {
                    return Err(SimError::tier_error(status).with(knobs));
                }
                (knobs.standard_delay, knobs.standard_header_delay)
            }
            Tier::Priority => (knobs.priority_delay, Duration::ZERO),
        };
        Ok(Admission {
            guard: ServeGuard::new(stats.clone(), provider, tier).cut(match tier {
                Tier::Flex => knobs.flex_cut.map(Err).or(knobs.cut),
                _ => knobs.cut,
            }),
            start_delay,
            token_interval: knobs.token_interval,
            head_delay,
        })
    }

    /// The standard tier's directed error, if this attempt gets one.
    fn standard_error(&self, knobs: &Knobs) -> Option<u16> {
        let status = knobs.standard_status?;
        let Some(fail_times) = knobs.standard_fail_times else {
            return Some(status);
        };
        let mut attempts = self.flex_attempts();
        let attempt = attempts
            .entry(format!("standard:{}", knobs.fail_key))
            .or_insert(0);
        *attempt = attempt.saturating_add(1);
        (*attempt <= fail_times).then_some(status)
    }

    /// The capacity error status, if this flex attempt gets one.
    fn flex_capacity_error(&self, knobs: &Knobs) -> Option<u16> {
        const DEFAULT_CAPACITY_STATUS: u16 = 429;
        if let Some(fail_times) = knobs.flex_fail_times {
            let mut attempts = self.flex_attempts();
            let attempt = attempts.entry(knobs.fail_key.clone()).or_insert(0);
            *attempt = attempt.saturating_add(1);
            return (*attempt <= fail_times)
                .then(|| knobs.flex_status.unwrap_or(DEFAULT_CAPACITY_STATUS));
        }
        if knobs.flex_error_rate > 0.0 {
            return (rand::random::<f64>() < knobs.flex_error_rate)
                .then(|| knobs.flex_status.unwrap_or(DEFAULT_CAPACITY_STATUS));
        }
        knobs.flex_status
    }
}

/// Adds the error's `Retry-After` header, if it has one.
/// What every provider's error response carries besides its envelope: a `Retry-After` header,
/// and the mark that makes the server reset instead of answering.
pub(crate) fn error_extras(err: &SimError, resp: &mut axum::response::Response) {
    if let Some(secs) = err.retry_after {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    }
    if err.reset {
        resp.extensions_mut().insert(ResetConnection);
    }
}

/// A response marked so is never sent: the server closes the connection (HTTP/1.1) or resets
/// the stream (HTTP/2) instead, as a provider's crashed backend or a load balancer does.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResetConnection;

/// Why a provider key was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyProblem {
    Missing,
    Wrong,
}

/// Any key goes when none is configured; else `given` must be the configured one.
pub(crate) fn check_key(expected: Option<&str>, given: Option<&str>) -> Result<(), KeyProblem> {
    match (expected, given) {
        (None, _) => Ok(()),
        (Some(expected), Some(given)) if expected == given => Ok(()),
        (Some(_), Some(_)) => Err(KeyProblem::Wrong),
        (Some(_), None) => Err(KeyProblem::Missing),
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A header's value as text.
pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(cfg: SimConfig) -> SimState {
        SimState::new(cfg, Arc::new(SimStats::default()))
    }

    fn knobs_for(state: &SimState, text: &str) -> Knobs {
        let conversation = Conversation {
            user_texts: vec![text],
            ..Conversation::default()
        };
        state.knobs(&conversation)
    }

    #[test]
    fn flex_fails_n_times_per_sim_id_then_succeeds() {
        let sim = state(SimConfig::default());
        let knobs = knobs_for(&sim, "#sim flex_fail_times=2 flex_status=503 sim_id=a");
        for _ in 0..2 {
            let err = sim
                .admit(Provider::OpenAi, Tier::Flex, &knobs)
                .err()
                .map(|e| (e.status, e.kind));
            assert_eq!(
                err,
                Some((StatusCode::SERVICE_UNAVAILABLE, ErrorKind::Capacity))
            );
        }
        assert!(sim.admit(Provider::OpenAi, Tier::Flex, &knobs).is_ok());
        // Another id has its own count; standard never fails.
        let other = knobs_for(&sim, "#sim flex_fail_times=1 sim_id=b");
        assert!(sim.admit(Provider::Gemini, Tier::Standard, &other).is_ok());
        assert!(sim.admit(Provider::Gemini, Tier::Flex, &other).is_err());
        let snap = sim.stats().snapshot();
        assert_eq!(snap.capacity_errors("openai:flex"), 2);
        assert_eq!(snap.requests("openai:flex"), 3);
        assert_eq!(snap.capacity_errors("gemini:flex"), 1);
    }

    #[test]
    fn config_and_directive_merge() {
        let sim = state(SimConfig {
            flex_status: Some(429),
            tokens_per_sec: 100,
            ..SimConfig::default()
        });
        let plain = knobs_for(&sim, "hi");
        assert_eq!(
            sim.admit(Provider::OpenAi, Tier::Flex, &plain)
                .err()
                .map(|e| e.status),
            Some(StatusCode::TOO_MANY_REQUESTS)
        );
        assert_eq!(plain.token_interval, Duration::from_millis(10));
        let cleared = knobs_for(&sim, "#sim flex_status=0 flex_delay_ms=7 tokens_per_sec=0");
        let admission = sim.admit(Provider::OpenAi, Tier::Flex, &cleared);
        assert_eq!(
            admission.ok().map(|a| (a.start_delay, a.token_interval)),
            Some((Duration::from_millis(7), Duration::ZERO))
        );
        let directed = knobs_for(&sim, "#sim status=400");
        let err = sim
            .admit(Provider::Anthropic, Tier::Priority, &directed)
            .err();
        assert_eq!(err.map(|e| e.kind), Some(ErrorKind::InvalidRequest));
    }

    #[test]
    fn keys() {
        assert_eq!(check_key(None, None), Ok(()));
        assert_eq!(check_key(Some("k"), Some("k")), Ok(()));
        assert_eq!(check_key(Some("k"), Some("x")), Err(KeyProblem::Wrong));
        assert_eq!(check_key(Some("k"), None), Err(KeyProblem::Missing));
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            http::HeaderValue::from_static("Bearer  sk-1"),
        );
        assert_eq!(bearer(&headers), Some("sk-1"));
    }
}
