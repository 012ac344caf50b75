//! The flex race: first byte by the deadline, flex as often as possible, never two tiers billed.
//!
//! The budget D starts when the request is validated. Flex is sent at once; a capacity error is
//! retried with jittered exponential backoff while the budget allows; any other error ends the
//! race and passes through (standard would fail the same way). Standard is launched at
//! `D - expected standard start latency` (learned per model, never below a floor), so that it too
//! starts by D. The first tier whose upstream stream carries a content-bearing event wins; the
//! other future is dropped at once, which closes its upstream request before it produced output.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::providers::{is_capacity_status, AskTier};
use crate::sse::Event;
use crate::upstream::{read_body, EventStream, UpstreamClient, MAX_ERROR_BODY};

/// How an upstream stream event counts for the race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventClass {
    /// Bookkeeping before any output (e.g. `response.created`).
    Lifecycle,
    /// The provider has begun to answer.
    Start,
    /// An in-stream error that means "no capacity now".
    CapacityError,
    /// Any other in-stream error.
    Error,
}

/// A tier whose upstream has started answering.
pub struct Started {
    pub tier: AskTier,
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// Events read up to and including the first content-bearing one.
    pub buffered: Vec<Event>,
    pub rest: EventStream,
    /// From sending the request to the first content-bearing event.
    pub start_latency: Duration,
}

#[derive(Debug)]
pub enum AttemptError {
    /// No capacity now: worth retrying on flex.
    Capacity(ApiError),
    /// Anything else: passes through to the caller.
    Fatal(ApiError),
}

impl AttemptError {
    pub fn into_api(self) -> ApiError {
        match self {
            AttemptError::Capacity(e) | AttemptError::Fatal(e) => e,
        }
    }
}

/// Sends one streaming request and reads until the upstream starts answering.
pub async fn attempt(
    client: &UpstreamClient,
    req: http::Request<Full<Bytes>>,
    tier: AskTier,
    classify: impl Fn(&Event) -> EventClass,
) -> Result<Started, AttemptError> {
    let sent = Instant::now();
    let resp = client.send(req).await.map_err(|e| {
        AttemptError::Fatal(
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!("The provider could not be reached: {e}."),
            )
            .fix("check the provider base URL and the network; retry later."),
        )
    })?;
    let (parts, body) = resp.into_parts();
    if !parts.status.is_success() {
        let ct = parts.headers.get(http::header::CONTENT_TYPE).cloned();
        let bytes = read_body(body, MAX_ERROR_BODY).await;
        let e = ApiError::upstream(parts.status, ct, bytes);
        return Err(if is_capacity_status(parts.status) {
            AttemptError::Capacity(e)
        } else {
            AttemptError::Fatal(e)
        });
    }
    let mut rest = client.events(body);
    let mut buffered = Vec::new();
    loop {
        match rest.next().await {
            None => {
                // The stream ended without content: that is its whole answer.
                return Ok(Started {
                    tier,
                    status: parts.status,
                    headers: parts.headers,
                    buffered,
                    rest,
                    start_latency: sent.elapsed(),
                });
            }
            Some(Err(e)) => {
                return Err(AttemptError::Fatal(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_stream_error",
                    format!("The provider's stream broke before it started answering: {e}."),
                )));
            }
            Some(Ok(ev)) => {
                let class = classify(&ev);
                match class {
                    EventClass::Lifecycle => buffered.push(ev),
                    EventClass::Start => {
                        buffered.push(ev);
                        return Ok(Started {
                            tier,
                            status: parts.status,
                            headers: parts.headers,
                            buffered,
                            rest,
                            start_latency: sent.elapsed(),
                        });
                    }
                    EventClass::CapacityError | EventClass::Error => {
                        let e = ApiError::upstream(
                            if class == EventClass::CapacityError {
                                StatusCode::TOO_MANY_REQUESTS
                            } else {
                                StatusCode::BAD_GATEWAY
                            },
                            Some(http::HeaderValue::from_static("application/json")),
                            Bytes::from(ev.data),
                        );
                        return Err(if class == EventClass::CapacityError {
                            AttemptError::Capacity(e)
                        } else {
                            AttemptError::Fatal(e)
                        });
                    }
                }
            }
        }
    }
}

/// Why the winner won.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Flex started first.
    FlexStarted,
    /// Flex had not started when standard did.
    FlexTimeout,
    /// Flex kept answering "no capacity" and standard started.
    FlexCapacity,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::FlexStarted => "flex_started",
            Reason::FlexTimeout => "flex_timeout",
            Reason::FlexCapacity => "flex_capacity",
        }
    }
}

pub struct Outcome<T> {
    pub winner: T,
    pub reason: Reason,
    /// Time spent on flex before it won or lost.
    pub flex_wait: Duration,
    pub flex_attempts: u32,
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
    pub flex_wait: Duration,
    pub standard_launched: bool,
}

/// Retry schedule for flex capacity errors.
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

/// Runs the race. `flex` is called for every flex attempt; `standard` once, at `hedge_at`.
pub async fn run<T, F, FF, S, SF>(
    deadline: Instant,
    hedge_at: Instant,
    backoff: Backoff,
    mut flex: F,
    standard: S,
) -> Result<Outcome<T>, Failure>
where
    F: FnMut() -> FF,
    FF: Future<Output = Result<T, AttemptError>>,
    S: FnOnce() -> SF,
    SF: Future<Output = Result<T, AttemptError>>,
{
    let t0 = Instant::now();
    let attempts = AtomicU32::new(0);
    let saw_capacity = AtomicBool::new(false);
    let launched = AtomicBool::new(false);
    let flex_in_flight = AtomicBool::new(false);
    let flex_side = async {
        loop {
            let n = attempts.fetch_add(1, Ordering::Relaxed);
            flex_in_flight.store(true, Ordering::Relaxed);
            let result = flex().await;
            flex_in_flight.store(false, Ordering::Relaxed);
            match result {
                Ok(s) => return Ok(s),
                Err(AttemptError::Capacity(e)) => {
                    saw_capacity.store(true, Ordering::Relaxed);
                    let wait = backoff.delay(n);
                    if Instant::now() + wait >= deadline {
                        return Err(AttemptError::Capacity(e));
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(fatal) => return Err(fatal),
            }
        }
    };
    let standard_side = async {
        tokio::time::sleep_until(hedge_at).await;
        launched.store(true, Ordering::Relaxed);
        standard().await
    };
    tokio::pin!(flex_side);
    tokio::pin!(standard_side);
    let failure = |error: ApiError, launched: &AtomicBool| Failure {
        error,
        flex_wait: t0.elapsed(),
        standard_launched: launched.load(Ordering::Relaxed),
    };
    tokio::select! {
        biased;
        r = &mut flex_side => match r {
            Ok(winner) => Ok(Outcome {
                winner,
                reason: Reason::FlexStarted,
                flex_wait: t0.elapsed(),
                flex_attempts: attempts.load(Ordering::Relaxed),
                standard_launched: launched.load(Ordering::Relaxed),
                // Polling standard before its launch would send it: only look once it is out.
                loser_started: launched.load(Ordering::Relaxed)
                    && matches!((&mut standard_side).now_or_never(), Some(Ok(_))),
            }),
            Err(AttemptError::Fatal(e)) => Err(failure(e, &launched)),
            Err(AttemptError::Capacity(_)) => {
                // Flex gave up inside the budget: standard (launched now if not yet) takes over.
                let flex_wait = t0.elapsed();
                match (&mut standard_side).await {
                    Ok(winner) => Ok(Outcome { winner, reason: Reason::FlexCapacity, flex_wait, flex_attempts: attempts.load(Ordering::Relaxed), standard_launched: true, loser_started: false }),
                    Err(e) => Err(Failure { error: e.into_api(), flex_wait, standard_launched: true }),
                }
            }
        },
        r = &mut standard_side => match r {
            Ok(winner) => Ok(Outcome {
                winner,
                reason: if saw_capacity.load(Ordering::Relaxed) { Reason::FlexCapacity } else { Reason::FlexTimeout },
                flex_wait: t0.elapsed(),
                flex_attempts: attempts.load(Ordering::Relaxed),
                standard_launched: true,
                // Polling flex between attempts could send a new one: only look at one in flight.
                loser_started: flex_in_flight.load(Ordering::Relaxed)
                    && matches!((&mut flex_side).now_or_never(), Some(Ok(_))),
            }),
            Err(e) => Err(failure(e.into_api(), &launched)),
        },
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

    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    const D: Duration = Duration::from_secs(10);
    const STD_LATENCY: Duration = Duration::from_millis(500);

    /// A fake upstream attempt: waits `delay`, then starts or fails; counts starts and drops.
    #[derive(Default)]
    struct Probe {
        started: AtomicUsize,
        dropped_unfinished: AtomicUsize,
    }

    struct DropFlag<'a>(&'a Probe, bool);
    impl Drop for DropFlag<'_> {
        fn drop(&mut self) {
            if !self.1 {
                self.0.dropped_unfinished.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    async fn fake(
        probe: &Probe,
        delay: Duration,
        result: Result<&'static str, u16>,
    ) -> Result<&'static str, AttemptError> {
        let mut flag = DropFlag(probe, false);
        tokio::time::sleep(delay).await;
        flag.1 = true;
        match result {
            Ok(tier) => {
                probe.started.fetch_add(1, Ordering::SeqCst);
                Ok(tier)
            }
            Err(status) => {
                let e = ApiError::new(StatusCode::from_u16(status).unwrap(), "upstream_error", "x");
                Err(
                    if is_capacity_status(StatusCode::from_u16(status).unwrap()) {
                        AttemptError::Capacity(e)
                    } else {
                        AttemptError::Fatal(e)
                    },
                )
            }
        }
    }

    fn times() -> (Instant, Instant, Instant) {
        let t0 = Instant::now();
        (t0, t0 + D, t0 + D - STD_LATENCY)
    }

    #[tokio::test(start_paused = true)]
    async fn flex_starts_in_time_and_wins() {
        let (t0, deadline, hedge) = times();
        let (f, s) = (Probe::default(), Probe::default());
        let o = run(
            deadline,
            hedge,
            Backoff::default(),
            || fake(&f, Duration::from_secs(3), Ok("flex")),
            || fake(&s, STD_LATENCY, Ok("standard")),
        )
        .await
        .unwrap();
        assert_eq!((o.winner, o.reason), ("flex", Reason::FlexStarted));
        assert_eq!(o.flex_wait, Duration::from_secs(3));
        assert!(
            !o.standard_launched,
            "standard is never sent when flex starts before the hedge"
        );
        assert_eq!(s.started.load(Ordering::SeqCst), 0);
        assert!(t0.elapsed() <= D);
    }

    #[tokio::test(start_paused = true)]
    async fn flex_never_starts_so_standard_serves_by_the_deadline() {
        let (t0, deadline, hedge) = times();
        let (f, s) = (Probe::default(), Probe::default());
        let o = run(
            deadline,
            hedge,
            Backoff::default(),
            || fake(&f, Duration::from_secs(3600), Ok("flex")),
            || fake(&s, STD_LATENCY, Ok("standard")),
        )
        .await
        .unwrap();
        assert_eq!((o.winner, o.reason), ("standard", Reason::FlexTimeout));
        assert!(!o.loser_started, "flex was in flight but had not started");
        assert!(
            t0.elapsed() <= D,
            "first byte at {:?}, deadline {D:?}",
            t0.elapsed()
        );
        assert_eq!(f.started.load(Ordering::SeqCst), 0);
        assert_eq!(
            f.dropped_unfinished.load(Ordering::SeqCst),
            1,
            "the flex request was cancelled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn flex_429_then_success_stays_on_flex() {
        let (_, deadline, hedge) = times();
        let (f, s) = (Probe::default(), Probe::default());
        let calls = AtomicUsize::new(0);
        let o = run(
            deadline,
            hedge,
            Backoff::default(),
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                fake(
                    &f,
                    Duration::from_millis(50),
                    if n < 2 { Err(429) } else { Ok("flex") },
                )
            },
            || fake(&s, STD_LATENCY, Ok("standard")),
        )
        .await
        .unwrap();
        assert_eq!(
            (o.winner, o.reason, o.flex_attempts),
            ("flex", Reason::FlexStarted, 3)
        );
        assert_eq!(s.started.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn flex_429_until_the_end_falls_back_to_standard_in_time() {
        let (t0, deadline, hedge) = times();
        let (f, s) = (Probe::default(), Probe::default());
        let o = run(
            deadline,
            hedge,
            Backoff::default(),
            || fake(&f, Duration::from_millis(20), Err(429)),
            || fake(&s, STD_LATENCY, Ok("standard")),
        )
        .await
        .unwrap();
        assert_eq!((o.winner, o.reason), ("standard", Reason::FlexCapacity));
        assert!(o.flex_attempts > 3, "flex was retried: {}", o.flex_attempts);
        assert!(t0.elapsed() <= D);
    }

    #[tokio::test(start_paused = true)]
    async fn flex_starting_just_after_the_hedge_leaves_exactly_one_winner() {
        let (_, deadline, hedge) = times();
        let (f, s) = (Probe::default(), Probe::default());
        // Flex starts 100 ms after standard was launched, before standard starts.
        let flex_at = D - STD_LATENCY + Duration::from_millis(100);
        let o = run(
            deadline,
            hedge,
            Backoff::default(),
            || fake(&f, flex_at, Ok("flex")),
            || fake(&s, STD_LATENCY, Ok("standard")),
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
        let (_, deadline, hedge) = times();
        let (f, s) = (Probe::default(), Probe::default());
        // Both tiers' first events arrive at the same instant: flex wins (it is polled first),
        // and standard, already started, is reported rather than counted as cancelled in time.
        let o = run(
            deadline,
            hedge,
            Backoff::default(),
            || fake(&f, D, Ok("flex")),
            || fake(&s, STD_LATENCY, Ok("standard")),
        )
        .await
        .unwrap();
        assert_eq!(o.winner, "flex");
        assert!(o.loser_started);
        assert_eq!(s.started.load(Ordering::SeqCst), 1);
        // The other way round: standard starts, and flex's first event is already there when
        // the race looks (flex becomes ready the moment standard has started).
        let standard_started = AtomicBool::new(false);
        let o = run(
            deadline,
            hedge,
            Backoff::default(),
            || async {
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
    async fn a_non_capacity_flex_error_passes_through_at_once() {
        let (t0, deadline, hedge) = times();
        let (f, s) = (Probe::default(), Probe::default());
        let e = run(
            deadline,
            hedge,
            Backoff::default(),
            || fake(&f, Duration::from_millis(30), Err(400)),
            || fake(&s, STD_LATENCY, Ok("standard")),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(e.error.status, StatusCode::BAD_REQUEST);
        assert!(!e.standard_launched);
        assert_eq!(t0.elapsed(), Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_cancels_both_tiers() {
        let (_, deadline, hedge) = times();
        let (f, s) = (Arc::new(Probe::default()), Arc::new(Probe::default()));
        let (f2, s2) = (f.clone(), s.clone());
        let task = tokio::spawn(async move {
            let _ = run(
                deadline,
                hedge,
                Backoff::default(),
                || fake(&f2, Duration::from_secs(3600), Ok("flex")),
                || fake(&s2, Duration::from_secs(3600), Ok("standard")),
            )
            .await;
        });
        tokio::time::sleep(D).await; // both in flight
        task.abort();
        let _ = task.await;
        assert_eq!(f.dropped_unfinished.load(Ordering::SeqCst), 1);
        assert_eq!(s.dropped_unfinished.load(Ordering::SeqCst), 1);
        assert_eq!(
            f.started.load(Ordering::SeqCst) + s.started.load(Ordering::SeqCst),
            0
        );
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
