//! The provider simulator: OpenAI (Responses, Chat Completions), Anthropic Messages and Gemini
//! generateContent, streaming and not, faithful enough that the official SDKs parse every body
//! and every SSE event.
//!
//! It models the service tiers (flex start delay and capacity errors, standard and priority start
//! latency, token rate) from [`SimConfig`], and per request from a directive in any user text,
//! e.g. `hello #sim flex_delay_ms=12000 flex_status=429 output_tokens=20` (see [`directive`]).
//!
//! Besides the provider endpoints it serves `GET /healthz`, `GET /_sim/stats` (see [`SimStats`];
//! with `in_flight`, the answers being served, and `max_in_flight`, the most at once: what a
//! concurrency limit is checked against) and `POST /_sim/reset` (zeroes the counters, the
//! high-water mark and the `flex_fail_times` memory).

mod answer;
mod anthropic;
pub mod directive;
mod engine;
mod gemini;
mod openai;
mod sse;
mod stats;

#[cfg(test)]
mod sdk_check;
#[cfg(test)]
mod test_util;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use stats::{SimStats, SimStatsSnapshot};

use engine::SimState;

/// Requests carry images and files; the real providers accept tens of megabytes.
const MAX_BODY_BYTES: usize = 100 * 1024 * 1024;

/// How the simulated providers behave. Every field can be overridden per request by a directive.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// When set, `/v1/responses` and `/v1/chat/completions` accept only this key (else any).
    pub openai_key: Option<String>,
    /// When set, `/v1/messages` accepts only this key (else any).
    pub anthropic_key: Option<String>,
    /// When set, the Gemini endpoints accept only this key (else any).
    pub gemini_key: Option<String>,
    /// Wait before the first content event on the flex tier.
    pub flex_delay_ms: u64,
    /// Wait before the first content event on the standard (OpenAI "default") tier.
    pub standard_delay_ms: u64,
    /// Wait before the first content event on the priority tier.
    pub priority_delay_ms: u64,
    /// The capacity error status of the flex tier (429 or 503). Alone it makes every flex request
    /// fail; with `flex_capacity_error_rate` (or a `flex_fail_times` directive) it is the status
    /// of those failures, which default to 429.
    pub flex_status: Option<u16>,
    /// Output tokens per second while streaming; 0 means as fast as possible.
    pub tokens_per_sec: u64,
    /// Probability (0..=1) that a flex request gets the capacity error.
    pub flex_capacity_error_rate: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            openai_key: None,
            anthropic_key: None,
            gemini_key: None,
            flex_delay_ms: 0,
            standard_delay_ms: 50,
            priority_delay_ms: 20,
            flex_status: None,
            tokens_per_sec: 0,
            flex_capacity_error_rate: 0.0,
        }
    }
}

/// All the simulator's routes, with fresh counters.
pub fn router(cfg: SimConfig) -> Router {
    router_with_stats(cfg, Arc::new(SimStats::default()))
}

/// All the simulator's routes, counting into `stats` (so a test can read them without HTTP).
pub fn router_with_stats(cfg: SimConfig, stats: Arc<SimStats>) -> Router {
    let state = SimState::new(cfg, stats);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/_sim/stats", get(stats_handler))
        .route("/_sim/reset", post(reset_handler))
        .route("/v1/responses", post(openai::responses::handle))
        .route("/v1/chat/completions", post(openai::chat::handle))
        .route("/v1/messages", post(anthropic::handle))
        .route("/v1beta/models/{*rest}", post(gemini::handle))
        .route("/v1/models/{*rest}", post(gemini::handle))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the simulator on `listener` (HTTP/1.1 and HTTP/2 with prior knowledge, i.e. h2c)
/// until the task is dropped or the listener fails.
pub async fn serve(listener: TcpListener, cfg: SimConfig) -> std::io::Result<()> {
    serve_with_stats(listener, cfg, Arc::new(SimStats::default())).await
}

/// Like [`serve`], counting into `stats`.
pub async fn serve_with_stats(
    listener: TcpListener,
    cfg: SimConfig,
    stats: Arc<SimStats>,
) -> std::io::Result<()> {
    let router = router_with_stats(cfg, stats);
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(err) => {
                // Out of file descriptors or a connection aborted while queued: go on.
                tracing::debug!(error = %err, "sim: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        // Small SSE frames must not wait for Nagle's algorithm.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "sim: could not set TCP_NODELAY");
        }
        tokio::spawn(serve_connection(tcp, router.clone()));
    }
}

/// Serves one connection. A response marked [`engine::ResetConnection`] is not sent: the
/// service fails instead, so hyper closes the HTTP/1.1 connection or resets the HTTP/2 stream.
async fn serve_connection(tcp: tokio::net::TcpStream, router: Router) {
    use tower::ServiceExt as _;
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let router = router.clone();
        async move {
            let resp = match router.oneshot(req.map(axum::body::Body::new)).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            if resp.extensions().get::<engine::ResetConnection>().is_some() {
                return Err(std::io::Error::other(
                    "sim: connection reset by a flex_reset directive",
                ));
            }
            Ok(resp)
        }
    });
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    if let Err(err) = builder
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
        .await
    {
        tracing::debug!(error = %err, "sim: connection ended with an error");
    }
}

/// A simulator running in the background on 127.0.0.1 (for tests and the demo); it stops when
/// the handle is dropped.
pub struct SimHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub stats: Arc<SimStats>,
    task: JoinHandle<std::io::Result<()>>,
}

impl SimHandle {
    /// `http://127.0.0.1:PORT` (Anthropic and Gemini base URL).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1` (OpenAI base URL).
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a simulator on a free port of 127.0.0.1.
pub async fn spawn(cfg: SimConfig) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(SimStats::default());
    let task = tokio::spawn(serve_with_stats(listener, cfg, stats.clone()));
    Ok(SimHandle { addr, stats, task })
}

async fn stats_handler(State(state): State<SimState>) -> Json<SimStatsSnapshot> {
    Json(state.stats().snapshot())
}

async fn reset_handler(State(state): State<SimState>) -> Json<SimStatsSnapshot> {
    state.reset();
    Json(state.stats().snapshot())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::test_util::TestSim;
    use super::*;

    #[tokio::test]
    async fn health_stats_and_reset() {
        let sim = TestSim::start(SimConfig::default()).await;
        let health = sim.get("/healthz").await;
        assert_eq!((health.status, health.body.as_str()), (200, "ok"));
        let body = json!({"model": "o3", "input": "hi", "service_tier": "flex"});
        sim.post("/v1/responses", vec![], &body).await;
        let stats = sim.get("/_sim/stats").await.json();
        assert_eq!(stats["requests"]["openai:flex"], 1);
        assert_eq!(stats["started"]["openai:flex"], 1);
        assert_eq!(stats["cancelled"]["openai:flex"], 0);
        assert_eq!(stats["requests"]["gemini:standard"], 0);
        let reset = sim.post("/_sim/reset", vec![], &json!({})).await.json();
        assert_eq!(reset["requests"]["openai:flex"], 0);
    }

    /// `flex_reset=1`: no response head at all on flex, over HTTP/1.1 (the connection closes)
    /// and HTTP/2 (the stream is reset); standard on the same server answers.
    #[tokio::test]
    async fn flex_reset_answers_with_no_head() {
        for sim in [
            TestSim::start(SimConfig::default()).await,
            TestSim::start_h2(SimConfig::default()).await,
        ] {
            for tier in ["flex", "default"] {
                let body =
                    json!({"model": "o3", "input": "hi #sim flex_reset=1", "service_tier": tier});
                let got = sim.try_post("/v1/responses", &body).await;
                if tier == "flex" {
                    let err = got.expect_err("a reset, not a response");
                    assert!(!err.is_connect(), "the connection was made: {err:?}");
                } else {
                    assert_eq!(got.unwrap().status(), 200);
                }
            }
        }
    }
}
