//! The proxy's HTTP front: HTTP/1.1 and HTTP/2 (h2c, or ALPN over TLS with rustls) on one port,
//! with the listener's limits ([`ListenerConfig`]): a TLS handshake, the wait for a request's
//! headers, an idle connection and a request body are each bounded in time; connections and
//! HTTP/2 streams per connection are capped; and a request's API key and `Content-Length` are
//! checked from its headers before any of its body is read.

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::auth::authenticate;
use crate::error::{ApiError, ProxyError};
use crate::formats::CallerFormat;
use crate::proxy::Proxy;
use crate::series::Series;

/// The limits of the proxy's listener, each a flag of `flex up` and `flex proxy`
/// (docs/security.md, "Listener limits"), and the counters they report on `--metrics-listen`.
/// Clones share the counters.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// `--header-read-timeout-secs`: an HTTP/1.1 connection waiting for a request (a new one, or
    /// an idle keep-alive one: hyper's timer starts as soon as it waits) gets this long for the
    /// whole head; and a new connection (HTTP/1.1 or HTTP/2, after TLS) must start its first
    /// request within it, which bounds the HTTP/2 preface too. Past it the connection is closed.
    pub header_read_timeout: Duration,
    /// `--tls-handshake-timeout-secs`: the longest TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// `--idle-timeout-secs`: a connection with no request in flight for this long is closed
    /// (HTTP/2: GOAWAY). An HTTP/1.1 connection waiting for its next request is also bounded by
    /// `header_read_timeout`, whichever is shorter.
    pub idle_timeout: Duration,
    /// `--body-read-timeout-secs`: the whole request body must arrive within this long after its
    /// headers, else 408 `body_read_timeout`.
    pub body_read_timeout: Duration,
    /// `--max-connections`: connections open at once. At the cap the listener stops accepting
    /// (new connections wait in the kernel's accept queue) until one closes.
    pub max_connections: usize,
    /// `--http2-max-concurrent-streams`: HTTP/2 streams (requests) in flight per connection
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub http2_max_concurrent_streams: u32,
    /// `--http2-keepalive-secs`: the interval of HTTP/2 pings to callers; a ping unanswered for
    /// as long again closes the connection (a dead peer holding streams open).
    pub http2_keepalive_interval: Duration,
    /// `--worker-threads`: connections are served on this many threads of their own
    /// ([`crate::workers`]); 0 serves them on the caller's runtime.
    pub worker_threads: usize,
    pub stats: Arc<ListenerStats>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(15),
            tls_handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            http2_max_concurrent_streams: 100,
            http2_keepalive_interval: Duration::from_secs(20),
            worker_threads: 0,
            stats: Arc::default(),
        }
    }
}

/// What a listener closed or refused, and its connections: `flex_listener_*` on the metrics port.
#[derive(Debug, Default)]
pub struct ListenerStats {
    open: AtomicU64,
    max: AtomicU64,
    accepted: AtomicU64,
    saturated: AtomicU64,
    tls_handshake: AtomicU64,
    header_read: AtomicU64,
    idle: AtomicU64,
    http2_keepalive: AtomicU64,
    body_read: AtomicU64,
}

impl ListenerStats {
    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// The series, read at scrape time.
    pub fn series(&self) -> Vec<Series> {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            Series::gauge(
                "listener_connections",
                "Connections open on the API port",
                n(&self.open) as f64,
            ),
            Series::gauge(
                "listener_connections_max",
                "--max-connections: at it the listener stops accepting until a connection closes",
                n(&self.max) as f64,
            ),
            Series::counter(
                "listener_connections_accepted",
                "Connections accepted on the API port",
                n(&self.accepted),
            ),
            Series::counter(
                "listener_saturated",
                "Times the listener was at --max-connections and waited for a connection to close before accepting",
                n(&self.saturated),
            ),
            Series::counter_by(
                "listener_timeouts",
                "Connections closed and requests refused by a listener limit: tls_handshake, header_read (a request head or a first request too slow), idle, http2_keepalive (a ping unanswered), body_read (408)",
                "kind",
                [
                    ("tls_handshake", &self.tls_handshake),
                    ("header_read", &self.header_read),
                    ("idle", &self.idle),
                    ("http2_keepalive", &self.http2_keepalive),
                    ("body_read", &self.body_read),
                ]
                .map(|(k, a)| (k.to_string(), n(a))),
            ),
        ]
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// The proxy's routes: the four API formats, `/v1/models`, health, readiness and metrics.
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route(
            "/v1/responses",
            post(|s, r| api(s, r, CallerFormat::Responses)),
        )
        .route(
            "/v1/chat/completions",
            post(|s, r| api(s, r, CallerFormat::ChatCompletions)),
        )
        .route(
            "/v1/interactions",
            post(|s, r| api(s, r, CallerFormat::Interactions)),
        )
        .route(
            "/v1/messages",
            post(|s, r| api(s, r, CallerFormat::Messages)),
        )
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(proxy)
}

/// An API request: the key and the `Content-Length` are checked from the headers first, so an
/// unauthenticated or oversized body is refused before any of it is read (hyper then closes an
/// HTTP/1.1 connection whose body was left unread; `Expect: 100-continue` gets no `100`). The
/// body must then arrive whole within `--body-read-timeout-secs`.
async fn api(State(proxy): State<Arc<Proxy>>, req: Request, format: CallerFormat) -> Response {
    let (parts, body) = req.into_parts();
    // `Proxy::handle` authenticates again (the same snapshot lookup, a microsecond): this check
    // only keeps an unauthenticated body from being read at all.
    if let Err(e) = authenticate(&proxy.snapshots, format, &parts.headers, now_unix()) {
        return refuse(&proxy, format, e);
    }
    let limit = proxy.cfg.max_body_bytes;
    let declared = content_length(&parts.headers);
    if let Some(len) = declared.filter(|len| *len > limit as u64) {
        return refuse(&proxy, format, too_large(limit, Some(len)));
    }
    let listener = &proxy.cfg.listener;
    let read = tokio::time::timeout(
        listener.body_read_timeout,
        Limited::new(body, limit).collect(),
    )
    .await;
    let bytes: Bytes = match read {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) => {
            let err = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large(limit, None)
            } else {
                ApiError::bad_request(
                    "body_read_error",
                    format!("The request body could not be read: {e}."),
                )
            };
            return refuse(&proxy, format, err);
        }
        Err(_elapsed) => {
            bump(&listener.stats.body_read);
            return refuse(
                &proxy,
                format,
                body_read_timeout(listener.body_read_timeout, declared),
            );
        }
    };
    proxy.handle(format, parts.headers, bytes).await
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The request's `Content-Length`, when it has a valid one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A request refused before `Proxy::handle` (its body unread, too large or too slow): counted
/// like the pipeline's refusals (`flex_requests_total`, empty provider) and logged, with an
/// `x-request-id`.
fn refuse(proxy: &Proxy, format: CallerFormat, e: ApiError) -> Response {
    let request_id = format!("req_{}", uuid::Uuid::now_v7().simple());
    let status = e.status.as_u16();
    proxy.metrics.refused(format.as_str(), status);
    tracing::info!(
        request_id,
        code = e.code,
        status,
        format = format.as_str(),
        "request refused before its body was read"
    );
    let mut resp = e.into_response_for(format);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

fn mib(bytes: usize) -> usize {
    bytes / (1024 * 1024)
}

/// 413: the body is over `--max-body-mib`, said by its `Content-Length` (before reading
/// anything) or found while reading it.
fn too_large(limit: usize, declared: Option<u64>) -> ApiError {
    let message = match declared {
        Some(len) => format!(
            "The request body is {len} bytes (its Content-Length), larger than this proxy's limit of {} MiB ({limit} bytes, --max-body-mib); nothing of it was read.",
            mib(limit)
        ),
        None => format!(
            "The request body is larger than this proxy's limit of {} MiB ({limit} bytes, --max-body-mib).",
            mib(limit)
        ),
    };
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", message)
        .fix("send large files by URL instead of inline base64, or split the request; an operator can raise the limit with --max-body-mib (FLEX_MAX_BODY_MIB).")
        .example(r#"{"type": "input_image", "image_url": "https://example.com/photo.png"} instead of a data: URL"#)
}

/// 408: the body did not arrive whole within `--body-read-timeout-secs`.
fn body_read_timeout(limit: Duration, declared: Option<u64>) -> ApiError {
    let size = declared.map_or_else(String::new, |len| format!(" of {len} bytes"));
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_read_timeout",
        format!(
            "The request body{size} did not arrive within {} s of its headers (--body-read-timeout-secs), so the request was not processed.",
            limit.as_secs()
        ),
    )
    .fix("send the whole body right after the headers, with a Content-Length that matches it; on a slow link send large files by URL instead of inline base64, or ask the operator to raise --body-read-timeout-secs (FLEX_BODY_READ_TIMEOUT_SECS).")
    .example("curl -X POST http://127.0.0.1:8080/v1/responses -H \"Authorization: Bearer $FLEX_API_KEY\" -H 'Content-Type: application/json' --data-binary @request.json")
}

async fn models(State(proxy): State<Arc<Proxy>>, req: Request) -> Response {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let caller = match authenticate(
        &proxy.snapshots,
        CallerFormat::Responses,
        req.headers(),
        now,
    ) {
        Ok(c) => c,
        Err(e) => return e.into_response_for(CallerFormat::Responses),
    };
    let data: Vec<_> = caller
        .snapshot
        .catalog
        .models()
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "object": "model",
                "created": 0,
                "owned_by": m.provider.as_str(),
                "provider": m.provider.as_str(),
                "flex_capable": m.flex_capable,
                "aliases": m.aliases,
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn readyz(State(proxy): State<Arc<Proxy>>) -> Response {
    if proxy.snapshots.draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: draining (a planned stop); requests in flight are being finished\n",
        )
            .into_response();
    }
    if let Some(t) = proxy.snapshots.too_old() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: snapshot_too_old: version {} was produced at {} ({} s ago, over --max-snapshot-age-secs {}); the control plane has not been heard since\n",
                proxy.snapshots.version(),
                t.produced_at(),
                t.age_secs,
                t.max_age_secs
            ),
        )
            .into_response();
    }
    match proxy.snapshots.load() {
        Some(s) => (
            StatusCode::OK,
            format!("ready: snapshot version {}\n", s.version),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no snapshot loaded yet\n",
        )
            .into_response(),
    }
}

async fn metrics(State(proxy): State<Arc<Proxy>>) -> Response {
    let listener = proxy.cfg.listener.stats.series();
    let extra = |out: &mut String| {
        crate::metrics::encode_series_text(out, listener.clone());
        if let Some(e) = &proxy.cfg.extra_metrics {
            (e.0)(out);
        }
    };
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        proxy.metrics.encode(Some(&extra)),
    )
        .into_response()
}

/// The metrics endpoint, for `--metrics-listen` (never on the public API port): `GET /metrics`.
pub fn metrics_router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(proxy)
}

async fn not_found(req: Request) -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_endpoint", format!("There is no endpoint {} {}.", req.method(), req.uri().path()))
        .fix("use POST /v1/responses, /v1/chat/completions, /v1/interactions, /v1/messages or GET /v1/models; the base URL ends in /v1.")
        .example("base_url=\"http://127.0.0.1:8080/v1\"")
        .into_response_for(CallerFormat::Responses)
}

/// A route that exists, asked with another method (e.g. `GET /v1/responses`): our error, in the
/// envelope of the endpoint's format; axum adds the `allow` header.
async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path();
    let format = [
        CallerFormat::Responses,
        CallerFormat::ChatCompletions,
        CallerFormat::Interactions,
        CallerFormat::Messages,
    ]
    .into_iter()
    .find(|f| f.path() == path);
    let (allowed, fix, example) = match format {
        Some(f) => {
            let body = match f {
                CallerFormat::Messages => {
                    r#"{"model": "claude-opus-4-8", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello!"}], "start_within": "default"}"#
                }
                CallerFormat::ChatCompletions => {
                    r#"{"model": "gpt-5.5", "messages": [{"role": "user", "content": "Hello!"}], "start_within": "00h-00m-30s"}"#
                }
                CallerFormat::Interactions => {
                    r#"{"model": "gemini-3.5-flash", "input": "Hello!", "start_within": "00h-00m-30s"}"#
                }
                CallerFormat::Responses => {
                    r#"{"model": "gpt-5.5", "input": "Hello!", "start_within": "00h-00m-30s"}"#
                }
            };
            (
                "POST",
                format!("send POST {path} with a JSON body (the official SDKs do)."),
                format!("curl -X POST http://127.0.0.1:8080{path} -H \"Authorization: Bearer $FLEX_API_KEY\" -H 'Content-Type: application/json' -d '{body}'"),
            )
        }
        None => (
            "GET",
            format!("send GET {path}."),
            format!("curl http://127.0.0.1:8080{path}"),
        ),
    };
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} {path} is not supported: {path} takes {allowed} only.",
            req.method()
        ),
    )
    .fix(fix)
    .example(example)
    .into_response_for(format.unwrap_or(CallerFormat::Responses))
}

/// Builds a TLS acceptor (HTTP/2 and HTTP/1.1 by ALPN) from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ProxyError> {
    let certs = crate::plane_tls::pem_certs(std::io::BufReader::new(
        std::fs::File::open(cert)
            .map_err(|e| ProxyError::Tls(format!("cannot open {}: {e}", cert.display())))?,
    ));
    let certs =
        certs.map_err(|e| ProxyError::Tls(format!("{} is not PEM: {e}", cert.display())))?;
    let key = crate::plane_tls::pem_private_key(std::io::BufReader::new(
        std::fs::File::open(key)
            .map_err(|e| ProxyError::Tls(format!("cannot open {}: {e}", key.display())))?,
    ))
    .map_err(|e| ProxyError::Tls(format!("{} is not PEM: {e}", key.display())))?
    .ok_or_else(|| ProxyError::Tls(format!("{} holds no private key", key.display())))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ProxyError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| ProxyError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves `router` on `listener` until the process ends, with the default [`ListenerConfig`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<()> {
    serve_until(
        listener,
        router,
        tls,
        ListenerConfig::default(),
        std::future::pending(),
        Duration::ZERO,
    )
    .await
}

/// How long a connection closed for idleness may take to say goodbye (HTTP/2: the GOAWAY and
/// its ping) before it is dropped.
const IDLE_CLOSE_LINGER: Duration = Duration::from_secs(5);

/// How often the listener logs that it is at `--max-connections`.
const SATURATED_LOG_EVERY: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then drains: no new
/// connections, idle keep-alive connections closed, and requests in flight (streams included)
/// given up to `grace` to finish before their connections are dropped. Returns once drained.
pub async fn serve_until(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: ListenerConfig,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()> {
    let max = limits.max_connections.clamp(1, u32::MAX as usize);
    limits.stats.max.store(max as u64, Ordering::Relaxed);
    // One permit per open connection: at the cap the loop waits for one before it accepts, and
    // the drain waits for all of them.
    let slots = Arc::new(Semaphore::new(max));
    let (stop, stopped) = watch::channel(false);
    let workers = match limits.worker_threads {
        0 => None,
        n => Some(crate::workers::Workers::start(n, "flex-proxy")?),
    };
    let mut last_saturated_log: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                bump(&limits.stats.saturated);
                if last_saturated_log.is_none_or(|t| t.elapsed() >= SATURATED_LOG_EVERY) {
                    last_saturated_log = Some(Instant::now());
                    tracing::warn!(
                        max_connections = max,
                        "the listener is at --max-connections: new connections wait in the accept queue until one closes; raise --max-connections (and the open-files limit) or add proxies"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        bump(&limits.stats.accepted);
        let _ = stream.set_nodelay(true);
        let (router, tls, limits, stopped) =
            (router.clone(), tls.clone(), limits.clone(), stopped.clone());
        match &workers {
            Some(w) => w.spawn(stream, move |stream| {
                connection(stream, router, tls, limits, stopped, slot)
            }),
            None => {
                tokio::spawn(connection(stream, router, tls, limits, stopped, slot));
            }
        }
    }
    drop(listener);
    let _ = stop.send(true);
    if tokio::time::timeout(grace, slots.acquire_many(max as u32))
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "requests still in flight after the shutdown grace period are cut off"
        );
    } else {
        tracing::info!("every request in flight finished");
    }
    // Only now: the threads' runtimes go with them, and with them what still runs there.
    drop(workers);
    Ok(())
}

/// One accepted connection, holding its `slot` until it closes: the TLS handshake (bounded),
/// then HTTP.
async fn connection(
    stream: TcpStream,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: ListenerConfig,
    stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let stats = limits.stats.clone();
    stats.open.fetch_add(1, Ordering::Relaxed);
    let _open = scopeguard(move || {
        stats.open.fetch_sub(1, Ordering::Relaxed);
    });
    // Created once the connection speaks HTTP (after TLS): the first request's clock.
    let activity;
    let result = match tls {
        Some(acceptor) => {
            match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream)).await
            {
                Ok(Ok(s)) => {
                    activity = Arc::new(Activity::new());
                    drive(TokioIo::new(s), router, &limits, &activity, stop).await
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    bump(&limits.stats.tls_handshake);
                    tracing::debug!(
                        timeout_secs = limits.tls_handshake_timeout.as_secs(),
                        "TLS handshake timed out (--tls-handshake-timeout-secs)"
                    );
                    return;
                }
            }
        }
        None => {
            activity = Arc::new(Activity::new());
            drive(TokioIo::new(stream), router, &limits, &activity, stop).await
        }
    };
    if let Err(e) = result {
        let timed_out = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if timed_out {
            // hyper's own timers: HTTP/1.1's header read, HTTP/2's keep-alive ping.
            if activity.http2.load(Ordering::Relaxed) {
                bump(&limits.stats.http2_keepalive);
            } else {
                bump(&limits.stats.header_read);
            }
        }
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves HTTP/1.1 or HTTP/2 on `io` within `limits`: hyper's header-read timer, stream cap and
/// keep-alive pings, and a watchdog that closes the connection when its first request does not
/// start within the header-read timeout or no request has been in flight for the idle timeout;
/// `stop` starts a graceful close (the drain).
async fn drive<I>(
    io: I,
    router: Router,
    limits: &ListenerConfig,
    activity: &Arc<Activity>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let in_flight = activity.begin(req.version() == http::Version::HTTP_2);
            let router = router.clone();
            async move {
                let resp = tower::ServiceExt::oneshot(router, req).await?;
                // The request is in flight until its response body is done (or dropped).
                Ok::<_, Infallible>(resp.map(|body| {
                    axum::body::Body::new(Tracked {
                        body,
                        _in_flight: in_flight,
                    })
                }))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(limits.http2_keepalive_interval);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let mut stopping = *stop.borrow();
    // When the connection was told to close (the drain, or idleness): from then on, once nothing
    // is in flight, it has IDLE_CLOSE_LINGER to finish saying goodbye before it is dropped.
    let mut closing: Option<Instant> = None;
    if stopping {
        closing = Some(Instant::now());
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let idle = activity.in_flight.load(Ordering::SeqCst) == 0;
        let wake = match (idle, closing) {
            (false, _) => None,
            (true, None) => Some(activity.idle_deadline(limits)),
            (true, Some(at)) => Some(at.max(activity.idle_since()) + IDLE_CLOSE_LINGER),
        };
        tokio::select! {
            result = conn.as_mut() => return result,
            changed = stop.changed(), if !stopping => {
                let _ = changed;
                stopping = true;
                if closing.is_none() {
                    closing = Some(Instant::now());
                    conn.as_mut().graceful_shutdown();
                }
            }
            // A request ended: the idle clock starts again.
            () = activity.ended.notified(), if !idle => {}
            () = sleep_until(wake) => {
                if activity.in_flight.load(Ordering::SeqCst) > 0 {
                    continue;
                }
                let now = Instant::now();
                match closing {
                    None if now >= activity.idle_deadline(limits) => {
                        if activity.requests.load(Ordering::SeqCst) == 0 {
                            bump(&limits.stats.header_read);
                        } else {
                            bump(&limits.stats.idle);
                        }
                        closing = Some(now);
                        conn.as_mut().graceful_shutdown();
                    }
                    // Told to close, nothing in flight for the linger (hyper has flushed the
                    // last answer), and still open: drop it.
                    Some(at) if now >= at.max(activity.idle_since()) + IDLE_CLOSE_LINGER => {
                        return Ok(());
                    }
                    None | Some(_) => {}
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A connection's requests: how many are in flight, since when none is, and whether it speaks
/// HTTP/2.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Milliseconds from `start` to the end of the last request.
    idle_since_ms: AtomicU64,
    http2: AtomicBool,
    ended: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            ended: Notify::new(),
        }
    }

    fn begin(self: &Arc<Self>, http2: bool) -> InFlight {
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    fn idle_since(&self) -> Instant {
        self.start + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst))
    }

    /// When the connection is closed if no request starts: the first request within the
    /// header-read timeout, the next ones within the idle timeout of the last one's end.
    fn idle_deadline(&self, limits: &ListenerConfig) -> Instant {
        if self.requests.load(Ordering::SeqCst) == 0 {
            self.start + limits.header_read_timeout
        } else {
            self.idle_since() + limits.idle_timeout
        }
    }
}

/// One request in flight on its connection, until dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since_ms.store(ms, Ordering::SeqCst);
        if a.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            a.ended.notify_one();
        }
    }
}

/// A response body that keeps its request in flight until it is done or dropped.
struct Tracked {
    body: axum::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
