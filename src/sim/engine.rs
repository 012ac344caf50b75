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
}

impl SimError {
    pub(crate) fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: ErrorKind::InvalidRequest,
            message: message.into(),
            param,
        }
    }

    pub(crate) fn unauthenticated(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: ErrorKind::Authentication,
            message: message.into(),
            param: None,
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
        }
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
}

impl Admission {
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
            return Err(SimError::directed(status));
        }
        let start_delay = match tier {
            Tier::Flex => {
                if let Some(status) = self.flex_capacity_error(knobs) {
                    stats.count_capacity_error(provider, tier);
                    return Err(SimError::capacity(status));
                }
                knobs.flex_delay
            }
            Tier::Standard => knobs.standard_delay,
            Tier::Priority => knobs.priority_delay,
        };
        Ok(Admission {
            guard: ServeGuard::new(stats.clone(), provider, tier),
            start_delay,
            token_interval: knobs.token_interval,
        })
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
