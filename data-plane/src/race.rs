//! The flex race: first byte by the deadline, flex as often as possible, never two tiers billed.
//!
//! The budget D starts when the request is validated. Flex is sent at once. What a failed
//! attempt means is the failure policy (`policy`): a caller's error ends the race and passes
//! through; a capacity error is retried on flex with jittered backoff that honours
//! `Retry-After` while the budget allows; a server or transport failure takes flex out and
//! launches standard at once. Standard is launched at `D - expected standard start latency`
//! (learned per model, never below a floor), so that it too starts by D, or earlier when flex
//! is out. A standard failure keeps flex alive until D, and standard is tried once more if it
//! can still start in time. The first tier whose upstream stream carries a content-bearing
//! event wins; the other future is dropped at once, which closes its upstream request before
//! it produced output.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use flex_shared::catalog::Provider;
use futures_util::FutureExt;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::policy::{self, FailureClass};
use crate::providers::AskTier;
use crate::sse::Event;
use crate::upstream::{EventStream, UpstreamClient, UpstreamError, MAX_ERROR_BODY};

/// How an upstream stream event counts for the race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventClass {
    /// Bookkeeping before any output (e.g. `response.created`).
    Lifecycle,
    /// The provider has begun to answer.
    Start,
    /// An in-stream error that means "no capacity now".
    CapacityError,
    /// Any other in-stream error (a server failure before the answer started).
    Error,
}

/// A tier whose upstream has started answering.
pub struct Started {
    pub tier: AskTier,
    pub status: StatusCode,
    /// The provider's response headers (the answer passes an allow-list of them on).
    pub headers: HeaderMap,
    /// Events read up to and including the first content-bearing one.
    pub buffered: Vec<Event>,
    pub rest: EventStream,
    /// From sending the request to the first content-bearing event.
    pub start_latency: Duration,
}

/// An attempt that did not start, with what it means for the race.
#[derive(Debug)]
pub struct AttemptError {
    pub class: FailureClass,
    /// The provider's error to pass through, or ours for a transport fault.
    pub error: ApiError,
    /// The provider's retry hint.
    pub retry_after: Option<Duration>,
}

impl AttemptError {
    /// An error of ours that is not the provider's (a bug or a bad configuration): final.
    pub fn caller(error: ApiError) -> Self {
        Self {
            class: FailureClass::Caller,
            error,
            retry_after: None,
        }
    }

    /// A transport fault: the provider could not be reached, sent no head in time, or its
    /// stream broke before the answer started.
    pub fn transport(e: &UpstreamError) -> Self {
        let error = match e {
            UpstreamError::HeaderTimeout(_) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!("The provider did not answer in time: {e}."),
            )
            .fix("retry later; operators can raise --upstream-header-timeout-secs."),
            UpstreamError::Connect(_) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!("The provider could not be reached: {e}."),
            )
            .fix("check the provider base URL and the network; retry later."),
            _ => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_stream_error",
                format!("The provider's stream broke before it started answering: {e}."),
            )
            .fix("retry the request."),
        };
        Self {
            class: FailureClass::Server,
            error,
            retry_after: None,
        }
    }
}

/// Sends one streaming request and reads until the upstream starts answering. The response
/// head is awaited at most `header_timeout` (the time left in a race) when given.
pub async fn attempt(
    client: &UpstreamClient,
    provider: Provider,
    req: &http::Request<Bytes>,
    tier: AskTier,
    header_timeout: Option<Duration>,
    classify: impl Fn(&Event) -> EventClass,
) -> Result<Started, AttemptError> {
    let sent = Instant::now();
    let resp = client
        .send(req, header_timeout)
        .await
        .map_err(|e| AttemptError::transport(&e))?;
    if !resp.status.is_success() {
        let body = resp.body.read_lossy(MAX_ERROR_BODY).await;
        return Err(AttemptError {
            class: policy::classify(provider, resp.status, &body),
            retry_after: policy::retry_after(&resp.headers, &body),
            error: ApiError::upstream(resp.status, &resp.headers, body),
        });
    }
    let (status, headers) = (resp.status, resp.headers);
    let mut rest = resp.body.events();
    let mut buffered = Vec::new();
    loop {
        match rest.next().await {
            None if buffered.is_empty() => {
                return Err(AttemptError::transport(&UpstreamError::Stream(
                    "it ended before its first event".into(),
                )));
            }
            None => {
                // Ended after its lifecycle events: the answer's own checks report it cut.
                return Ok(Started {
                    tier,
                    status,
                    headers,
                    buffered,
                    rest,
                    start_latency: sent.elapsed(),
                });
            }
            Some(Err(e)) => return Err(AttemptError::transport(&e)),
            Some(Ok(ev)) => match classify(&ev) {
                EventClass::Lifecycle => buffered.push(ev),
                EventClass::Start => {
                    buffered.push(ev);
                    return Ok(Started {
                        tier,
                        status,
                        headers,
                        buffered,
                        rest,
                        start_latency: sent.elapsed(),
                    });
                }
                class @ (EventClass::CapacityError | EventClass::Error) => {
                    let capacity = class == EventClass::CapacityError;
                    let status = if capacity {
                        StatusCode::TOO_MANY_REQUESTS
                    } else {
                        StatusCode::BAD_GATEWAY
                    };
                    let mut h = HeaderMap::new();
                    h.insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    return Err(AttemptError {
                        class: if capacity {
                            FailureClass::Capacity
                        } else {
                            FailureClass::Server
                        },
                        retry_after: None,
                        error: ApiError::upstream(status, &h, Bytes::from(ev.data)),
                    });
                }
            },
        }
    }
}

/// Why the winner won.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No race: the one tier asked for.
    Direct,
    /// Flex started first.
    FlexStarted,
    /// Flex had not started when standard did.
    FlexTimeout,
    /// Flex kept answering "no capacity" and standard started.
    FlexCapacity,
    /// Flex failed (a server or transport fault) and standard served; or, for a failed race,
    /// neither tier could start.
    FlexError,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Direct => "direct",
            Reason::FlexStarted => "flex_started",
            Reason::FlexTimeout => "flex_timeout",
            Reason::FlexCapacity => "flex_capacity",
            Reason::FlexError => "flex_error",
        }
    }
}

pub struct Outcome<T> {
    pub winner: T,
    pub reason: Reason,
    /// Time spent on flex before it won or lost.
    pub flex_wait: Duration,
    pub flex_attempts: u32,
    pub standard_attempts: u32,
    pub standard_launched: bool,
    /// The losing tier had started too when the winner was picked: its first event was already
    /// at the proxy (a near-tie, inside the time a cancellation takes to reach the provider).
    /// The loser is still dropped at once and the caller billed once, but the provider may bill
    /// the loser for what it generated before the cancellation arrived. Detected without sending
    /// anything: the loser is polled once, and only if its request is already in flight.
    pub loser_started: bool,
}

#[derive(Debug)]
pub struct Failure {
    pub error: ApiError,
    pub class: FailureClass,
    pub flex_wait: Duration,
    pub standard_launched: bool,
}

/// Retry schedule for capacity errors.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// Equal jitter: half the capped exponential delay plus a random part of the other half.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        let half = exp / 2;
        let jitter = rand::random::<u64>() % (u64::try_from(half.as_millis()).unwrap_or(0) + 1);
        half + Duration::from_millis(jitter)
    }
}

/// When things happen in one race.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub deadline: Instant,
    /// When standard is launched if flex has neither started nor dropped out by then.
    pub hedge_at: Instant,
    pub backoff: Backoff,
}

/// Awaits the future in `slot`, or never when there is none.
async fn poll_slot<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever when there is none.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs the race. `flex` is called for every flex attempt with the time left to the deadline
/// (its bound for the response head); `standard` for every standard attempt (at most two).
pub async fn run<T, F, FF, S, SF>(
    s: Schedule,
    mut flex: F,
    mut standard: S,
) -> Result<Outcome<T>, Failure>
where
    F: FnMut(Duration) -> FF,
    FF: Future<Output = Result<T, AttemptError>>,
    S: FnMut() -> SF,
    SF: Future<Output = Result<T, AttemptError>>,
{
    let t0 = Instant::now();
    let mut flex_fut: Option<Pin<Box<FF>>> =
        Some(Box::pin(flex(s.deadline.saturating_duration_since(t0))));
    let mut flex_attempts = 1u32;
    let mut flex_retry_at: Option<Instant> = None;
    let mut flex_error: Option<AttemptError> = None;
    let mut flex_broke = false;
    let mut saw_capacity = false;
    let mut flex_wait: Option<Duration> = None;
    let mut std_fut: Option<Pin<Box<SF>>> = None;
    let mut std_at: Option<Instant> = Some(s.hedge_at);
    let mut std_attempts = 0u32;
    let mut std_error: Option<AttemptError> = None;
    loop {
        let flex_alive = flex_fut.is_some() || flex_retry_at.is_some();
        let std_alive = std_fut.is_some() || std_at.is_some();
        if !flex_alive && !std_alive {
            let e = std_error.or(flex_error).unwrap_or_else(|| {
                AttemptError::caller(ApiError::internal("the race ended without an attempt"))
            });
            return Err(Failure {
                class: e.class,
                error: e.error,
                flex_wait: flex_wait.unwrap_or_else(|| t0.elapsed()),
                standard_launched: std_attempts > 0,
            });
        }
        // Standard is out and flex has not started by the deadline: the promise cannot be kept.
        let give_up_at = (!std_alive).then_some(s.deadline);
        let flex_next = flex_retry_at.filter(|_| flex_fut.is_none());
        let std_next = std_at.filter(|_| std_fut.is_none());
        let flex_out = |flex_wait: &mut Option<Duration>| {
            flex_wait.get_or_insert_with(|| t0.elapsed());
        };
        tokio::select! {
            biased;
            r = poll_slot(&mut flex_fut) => {
                flex_fut = None;
                match r {
                    Ok(winner) => {
                        let loser_started = std_fut
                            .as_mut()
                            .is_some_and(|f| matches!(f.now_or_never(), Some(Ok(_))));
                        return Ok(Outcome {
                            winner,
                            reason: Reason::FlexStarted,
                            flex_wait: t0.elapsed(),
                            flex_attempts,
                            standard_attempts: std_attempts,
                            standard_launched: std_attempts > 0,
                            loser_started,
                        });
                    }
                    Err(e) if e.class == FailureClass::Caller => {
                        return Err(Failure {
                            class: e.class,
                            error: e.error,
                            flex_wait: t0.elapsed(),
                            standard_launched: std_attempts > 0,
                        });
                    }
                    Err(e) => {
                        let now = Instant::now();
                        let retry_at = (e.class == FailureClass::Capacity).then(|| {
                            saw_capacity = true;
                            let wait = s.backoff.delay(flex_attempts - 1).max(e.retry_after.unwrap_or_default());
                            now + wait
                        });
                        match retry_at {
                            Some(at) if at < s.deadline => {
                                flex_retry_at = Some(at);
                                // No flex attempt before the hedge: nothing gained by waiting.
                                if at >= s.hedge_at && std_fut.is_none() && std_attempts == 0 {
                                    std_at = Some(now);
                                }
                            }
                            _ => {
                                flex_broke = e.class == FailureClass::Server;
                                flex_error = Some(e);
                                flex_out(&mut flex_wait);
                                // Flex is out: standard now, unless it is running or done.
                                if std_fut.is_none() && std_attempts == 0 {
                                    std_at = Some(now);
                                }
                            }
                        }
                    }
                }
            }
            r = poll_slot(&mut std_fut) => {
                std_fut = None;
                match r {
                    Ok(winner) => {
                        let loser_started = flex_fut
                            .as_mut()
                            .is_some_and(|f| matches!(f.now_or_never(), Some(Ok(_))));
                        return Ok(Outcome {
                            winner,
                            reason: if flex_broke {
                                Reason::FlexError
                            } else if saw_capacity {
                                Reason::FlexCapacity
                            } else {
                                Reason::FlexTimeout
                            },
                            flex_wait: flex_wait.unwrap_or_else(|| t0.elapsed()),
                            flex_attempts,
                            standard_attempts: std_attempts,
                            standard_launched: true,
                            loser_started,
                        });
                    }
                    Err(e) if e.class == FailureClass::Caller => {
                        return Err(Failure {
                            class: e.class,
                            error: e.error,
                            flex_wait: flex_wait.unwrap_or_else(|| t0.elapsed()),
                            standard_launched: true,
                        });
                    }
                    Err(e) => {
                        let now = Instant::now();
                        let retry_at = now + s.backoff.base.max(e.retry_after.unwrap_or_default());
                        // Once more while it may still start in time (the expected latency
                        // is a p99: a hedge launched at D - p99 leaves no room for a second
                        // p99, but a typical start fits; the alternative is an error).
                        if std_attempts < 2 && retry_at < s.deadline {
                            std_at = Some(retry_at);
                        }
                        std_error = Some(e);
                    }
                }
            }
            () = until(flex_next) => {
                flex_retry_at = None;
                flex_attempts += 1;
                let left = s.deadline.saturating_duration_since(Instant::now());
                flex_fut = Some(Box::pin(flex(left)));
            }
            () = until(std_next) => {
                std_at = None;
                std_attempts += 1;
                std_fut = Some(Box::pin(standard()));
            }
            () = until(give_up_at) => {
                flex_fut = None;
                flex_retry_at = None;
                flex_out(&mut flex_wait);
            }
        }
    }
}

/// Learned standard-tier start latency per model: the p99 of the last samples, never below the
/// floor. Used to launch standard early enough that it starts by the deadline.
#[derive(Default)]
pub struct StartLatency {
    samples: Mutex<HashMap<String, VecDeque<Duration>>>,
}

const WINDOW: usize = 128;

impl StartLatency {
    pub fn record(&self, model: &str, d: Duration) {
        if let Ok(mut m) = self.samples.lock() {
            let ring = m.entry(model.to_string()).or_default();
            if ring.len() == WINDOW {
                ring.pop_front();
            }
            ring.push_back(d);
        }
    }

    pub fn expected(&self, model: &str, floor: Duration) -> Duration {
        let p99 = self.samples.lock().ok().and_then(|m| {
            let ring = m.get(model)?;
            let mut v: Vec<Duration> = ring.iter().copied().collect();
            v.sort_unstable();
            let idx = (v.len() * 99).div_ceil(100).saturating_sub(1);
            v.get(idx).copied()
        });
        p99.map_or(floor, |p| p.max(floor))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn learned_latency_is_p99_above_the_floor() {
        let l = StartLatency::default();
        let floor = Duration::from_millis(100);
        assert_eq!(l.expected("m", floor), floor);
        for i in 1..=100 {
            l.record("m", Duration::from_millis(i * 10));
        }
        assert_eq!(l.expected("m", floor), Duration::from_millis(990));
        assert_eq!(l.expected("other", floor), floor);
        for _ in 0..WINDOW {
            l.record("m", Duration::from_millis(1));
        }
        assert_eq!(l.expected("m", floor), floor, "old samples age out");
    }

    const D: Duration = Duration::from_secs(10);
    const STD_LATENCY: Duration = Duration::from_millis(500);

    /// A fake upstream attempt: waits `delay`, then starts or fails; counts starts, sends and
    /// drops, and when each attempt was sent.
    #[derive(Default)]
    struct Probe {
        sent: Mutex<Vec<Duration>>,
        started: AtomicUsize,
        dropped_unfinished: AtomicUsize,
    }

    impl Probe {
        fn sent(&self) -> Vec<Duration> {
            self.sent.lock().unwrap().clone()
        }
    }

    struct DropFlag<'a>(&'a Probe, bool);
    impl Drop for DropFlag<'_> {
        fn drop(&mut self) {
            if !self.1 {
                self.0.dropped_unfinished.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// How a fake attempt ends.
    #[derive(Clone, Copy)]
    enum Fate {
        Start(&'static str),
        Fail(FailureClass, u16, Option<Duration>),
    }

    use FailureClass::{Caller, Capacity, Server};
    use Fate::{Fail, Start};

    async fn fake(
        probe: &Probe,
        t0: Instant,
        delay: Duration,
        fate: Fate,
    ) -> Result<&'static str, AttemptError> {
        probe.sent.lock().unwrap().push(t0.elapsed());
        let mut flag = DropFlag(probe, false);
        tokio::time::sleep(delay).await;
        flag.1 = true;
        match fate {
            Start(tier) => {
                probe.started.fetch_add(1, Ordering::SeqCst);
                Ok(tier)
            }
            Fail(class, status, retry_after) => Err(AttemptError {
                class,
                error: ApiError::new(StatusCode::from_u16(status).unwrap(), "upstream_error", "x"),
                retry_after,
            }),
        }
    }

    fn schedule(t0: Instant) -> Schedule {
        Schedule {
            deadline: t0 + D,
            hedge_at: t0 + D - STD_LATENCY,
            backoff: Backoff::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flex_starts_in_time_and_wins() {
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let o = run(
            schedule(t0),
            |_| fake(&f, t0, Duration::from_secs(3), Start("flex")),
            || fake(&s, t0, STD_LATENCY, Start("standard")),
        )
        .await
        .unwrap();
        assert_eq!((o.winner, o.reason), ("flex", Reason::FlexStarted));
        assert_eq!(o.flex_wait, Duration::from_secs(3));
        assert!(
            !o.standard_launched,
            "standard is never sent when flex starts before the hedge"
        );
        assert!(s.sent().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn flex_never_starts_so_standard_serves_by_the_deadline() {
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let o = run(
            schedule(t0),
            |_| fake(&f, t0, Duration::from_secs(3600), Start("flex")),
            || fake(&s, t0, STD_LATENCY, Start("standard")),
        )
        .await
        .unwrap();
        assert_eq!((o.winner, o.reason), ("standard", Reason::FlexTimeout));
        assert!(!o.loser_started, "flex was in flight but had not started");
        assert!(t0.elapsed() <= D, "first byte at {:?}", t0.elapsed());
        assert_eq!(f.started.load(Ordering::SeqCst), 0);
        assert_eq!(
            f.dropped_unfinished.load(Ordering::SeqCst),
            1,
            "flex was cancelled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn flex_capacity_then_success_stays_on_flex() {
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let calls = AtomicUsize::new(0);
        let o = run(
            schedule(t0),
            |_| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                let fate = if n < 2 {
                    Fail(Capacity, 429, None)
                } else {
                    Start("flex")
                };
                fake(&f, t0, Duration::from_millis(50), fate)
            },
            || fake(&s, t0, STD_LATENCY, Start("standard")),
        )
        .await
        .unwrap();
        assert_eq!(
            (o.winner, o.reason, o.flex_attempts),
            ("flex", Reason::FlexStarted, 3)
        );
        assert!(s.sent().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn flex_capacity_until_the_end_falls_back_to_standard_in_time() {
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let o = run(
            schedule(t0),
            |_| fake(&f, t0, Duration::from_millis(20), Fail(Capacity, 429, None)),
            || fake(&s, t0, STD_LATENCY, Start("standard")),
        )
        .await
        .unwrap();
        assert_eq!((o.winner, o.reason), ("standard", Reason::FlexCapacity));
        assert!(o.flex_attempts > 3, "flex was retried: {}", o.flex_attempts);
        assert!(t0.elapsed() <= D);
    }

    /// Policy row: a capacity error's `Retry-After` is honoured; when it reaches past the
    /// hedge, standard is launched at once instead of waiting for the hedge.
    #[tokio::test(start_paused = true)]
    async fn retry_after_delays_the_next_flex_attempt() {
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let calls = AtomicUsize::new(0);
        let o = run(
            schedule(t0),
            |_| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                let fate = if n == 0 {
                    Fail(Capacity, 429, Some(Duration::from_secs(3)))
                } else {
                    Start("flex")
                };
                fake(&f, t0, Duration::from_millis(10), fate)
            },
            || fake(&s, t0, STD_LATENCY, Start("standard")),
        )
        .await
        .unwrap();
        assert_eq!(o.winner, "flex");
        let sent = f.sent();
        assert_eq!(sent.len(), 2);
        assert!(
            sent[1] >= Duration::from_secs(3),
            "second flex attempt at {:?}",
            sent[1]
        );
        // A hint past the deadline: flex is out, standard goes now (not at the hedge).
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let o = run(
            schedule(t0),
            |_| {
                fake(
                    &f,
                    t0,
                    Duration::from_millis(10),
                    Fail(Capacity, 429, Some(Duration::from_secs(60))),
                )
            },
            || fake(&s, t0, STD_LATENCY, Start("standard")),
        )
        .await
        .unwrap();
        assert_eq!((o.winner, o.reason), ("standard", Reason::FlexCapacity));
        assert_eq!(f.sent().len(), 1);
        assert_eq!(
            s.sent(),
            [Duration::from_millis(10)],
            "standard launched when flex gave up"
        );
    }

    /// Policy row: a server or transport failure on flex launches standard at once.
    #[tokio::test(start_paused = true)]
    async fn a_flex_server_error_launches_standard_at_once() {
        for status in [500, 502, 504] {
            let t0 = Instant::now();
            let (f, s) = (Probe::default(), Probe::default());
            let o = run(
                schedule(t0),
                |_| {
                    fake(
                        &f,
                        t0,
                        Duration::from_millis(30),
                        Fail(Server, status, None),
                    )
                },
                || fake(&s, t0, STD_LATENCY, Start("standard")),
            )
            .await
            .unwrap();
            assert_eq!(
                (o.winner, o.reason),
                ("standard", Reason::FlexError),
                "{status}"
            );
            assert_eq!(s.sent(), [Duration::from_millis(30)], "{status}");
            assert_eq!(
                f.sent().len(),
                1,
                "{status}: flex is not retried after a server error"
            );
            assert_eq!(t0.elapsed(), Duration::from_millis(30) + STD_LATENCY);
        }
    }

    /// Policy row: a caller's error passes through at once; standard is never sent.
    #[tokio::test(start_paused = true)]
    async fn a_caller_error_passes_through_at_once() {
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let e = run(
            schedule(t0),
            |_| fake(&f, t0, Duration::from_millis(30), Fail(Caller, 429, None)),
            || fake(&s, t0, STD_LATENCY, Start("standard")),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(e.error.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.class, Caller);
        assert!(!e.standard_launched);
        assert_eq!(t0.elapsed(), Duration::from_millis(30));
    }

    /// Policy row: a standard failure keeps flex alive until the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_standard_failure_while_flex_is_pending_lets_flex_win() {
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let o = run(
            schedule(t0),
            // Flex starts 300 ms after the hedge, after standard failed.
            |_| {
                fake(
                    &f,
                    t0,
                    D - STD_LATENCY + Duration::from_millis(300),
                    Start("flex"),
                )
            },
            || {
                fake(
                    &s,
                    t0,
                    Duration::from_millis(100),
                    Fail(Capacity, 503, None),
                )
            },
        )
        .await
        .unwrap();
        assert_eq!((o.winner, o.reason), ("flex", Reason::FlexStarted));
        assert!(t0.elapsed() <= D);
    }

    /// Policy row: standard is retried once when it can still start in time.
    #[tokio::test(start_paused = true)]
    async fn a_failed_standard_is_retried_once_in_time() {
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let calls = AtomicUsize::new(0);
        let mut sched = schedule(t0);
        sched.hedge_at = t0 + Duration::from_secs(5);
        let o = run(
            sched,
            |_| fake(&f, t0, Duration::from_secs(3600), Start("flex")),
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                let fate = if n == 0 {
                    Fail(Server, 503, None)
                } else {
                    Start("standard")
                };
                fake(&s, t0, Duration::from_millis(50), fate)
            },
        )
        .await
        .unwrap();
        assert_eq!((o.winner, o.standard_attempts), ("standard", 2));
        assert!(t0.elapsed() <= D);
        // Failing twice: only two tries; flex kept alive until the deadline, then the error.
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let e = run(
            schedule(t0),
            |_| fake(&f, t0, Duration::from_secs(3600), Start("flex")),
            || fake(&s, t0, Duration::from_millis(10), Fail(Server, 502, None)),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(e.error.status, StatusCode::BAD_GATEWAY);
        assert!(s.sent().len() <= 2, "{:?}", s.sent());
        assert_eq!(t0.elapsed(), D, "flex was given until the deadline");
        assert_eq!(f.dropped_unfinished.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn flex_starting_just_after_the_hedge_leaves_exactly_one_winner() {
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let flex_at = D - STD_LATENCY + Duration::from_millis(100);
        let o = run(
            schedule(t0),
            |_| fake(&f, t0, flex_at, Start("flex")),
            || fake(&s, t0, STD_LATENCY, Start("standard")),
        )
        .await
        .unwrap();
        assert_eq!(o.winner, "flex");
        assert!(o.standard_launched);
        assert_eq!(
            f.started.load(Ordering::SeqCst) + s.started.load(Ordering::SeqCst),
            1
        );
        assert_eq!(
            s.dropped_unfinished.load(Ordering::SeqCst),
            1,
            "standard was cancelled"
        );
        assert!(!o.loser_started);
    }

    #[tokio::test(start_paused = true)]
    async fn a_near_tie_is_reported_as_a_loser_that_started_too() {
        let t0 = Instant::now();
        let (f, s) = (Probe::default(), Probe::default());
        let o = run(
            schedule(t0),
            |_| fake(&f, t0, D, Start("flex")),
            || fake(&s, t0, STD_LATENCY, Start("standard")),
        )
        .await
        .unwrap();
        assert_eq!(o.winner, "flex");
        assert!(o.loser_started);
        let standard_started = AtomicBool::new(false);
        let o = run(
            schedule(Instant::now()),
            |_| async {
                std::future::poll_fn(|_| {
                    if standard_started.load(Ordering::SeqCst) {
                        std::task::Poll::Ready(())
                    } else {
                        std::task::Poll::Pending
                    }
                })
                .await;
                Ok("flex")
            },
            || async {
                tokio::time::sleep(STD_LATENCY).await;
                standard_started.store(true, Ordering::SeqCst);
                Ok("standard")
            },
        )
        .await
        .unwrap();
        assert_eq!(o.winner, "standard");
        assert!(o.loser_started);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_cancels_both_tiers() {
        let t0 = Instant::now();
        let (f, s) = (Arc::new(Probe::default()), Arc::new(Probe::default()));
        let (f2, s2) = (f.clone(), s.clone());
        let task = tokio::spawn(async move {
            let _ = run(
                schedule(t0),
                |_| fake(&f2, t0, Duration::from_secs(3600), Start("flex")),
                || fake(&s2, t0, Duration::from_secs(3600), Start("standard")),
            )
            .await;
        });
        tokio::time::sleep(D - Duration::from_millis(1)).await; // both in flight
        task.abort();
        let _ = task.await;
        assert_eq!(f.dropped_unfinished.load(Ordering::SeqCst), 1);
        assert_eq!(s.dropped_unfinished.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let b = Backoff::default();
        for n in 0..20 {
            let d = b.delay(n);
            assert!(d <= b.max, "{d:?}");
            assert!(d >= b.base.saturating_mul(1 << n.min(16)).min(b.max) / 2);
        }
    }
}
