//! The HTTP client towards the providers: HTTPS with rustls (webpki roots plus an optional extra
//! CA for tests and private gateways), pooled connections, HTTP/2 where the server offers it via
//! ALPN (with keep-alive pings), and plain HTTP only for explicitly configured `http://` base URLs
//! (the simulator).
//!
//! Every wait is bounded: the connection (`connect_timeout`), the response head
//! (`header_timeout`, and in a race the deadline), the silence between two events
//! (`idle_timeout`) and the whole answer (`total_timeout`).
//!
//! An HTTP/2 connection carries at most the server's concurrent-stream limit, and hyper queues
//! the requests beyond it silently behind the open streams. So the client keeps *shards* per
//! host: independent connection pools, each given at most `streams_per_connection` requests at
//! a time; a new shard (a new connection) is opened when all are full. No request queues behind
//! another tenant's long streams.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::sse::{Event, Parser};

/// The largest error body we read from a provider to pass it through (1 MiB).
pub const MAX_ERROR_BODY: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Extra PEM CA certificates to trust besides the webpki roots.
    pub extra_ca_file: Option<std::path::PathBuf>,
    pub connect_timeout: Duration,
    /// Longest wait for a provider's response head (status and headers) once the request is
    /// sent. A flex attempt in a race is also bounded by the deadline.
    pub header_timeout: Duration,
    /// Longest silence between two upstream stream events (or body frames) before we give up.
    pub idle_timeout: Duration,
    /// Longest time for a whole answer, from sending the request to its last byte.
    pub total_timeout: Duration,
    /// Interval of HTTP/2 keep-alive pings to providers (a dead connection is found within
    /// interval + `keepalive_timeout`, not at the next request's timeout).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Requests given to one HTTP/2 connection at a time before another is opened to the same
    /// host (set it to the provider's `SETTINGS_MAX_CONCURRENT_STREAMS`; 100 is the common one).
    pub streams_per_connection: usize,
    /// Connections (shards) per host at most; past it a request goes to the least loaded one.
    pub max_connections_per_host: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            extra_ca_file: None,
            connect_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(300),
            total_timeout: Duration::from_secs(3600),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            streams_per_connection: 100,
            max_connections_per_host: 64,
        }
    }
}

/// Why a provider exchange failed below HTTP (a transport fault, never a provider's answer).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not reach the provider: {0}")]
    Connect(String),
    #[error("the provider sent no response headers within {0:?}")]
    HeaderTimeout(Duration),
    #[error("the provider stream failed: {0}")]
    Stream(String),
    #[error("the provider sent nothing for {0:?}")]
    Idle(Duration),
    #[error("the provider's answer took longer than the limit of {0:?}")]
    Total(Duration),
    #[error("the provider sent more than the limit of {0} bytes")]
    TooLarge(usize),
}

type HyperClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

struct Shard {
    client: HyperClient,
    in_flight: Arc<AtomicUsize>,
}

#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    cfg: UpstreamConfig,
    /// Shards per `scheme://authority`.
    hosts: Mutex<HashMap<String, Vec<Arc<Shard>>>>,
}

fn load_pem_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ProxyError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ProxyError::Tls(format!("cannot open CA file {}: {e}", path.display())))?;
    let certs: Result<Vec<_>, _> =
        rustls_pemfile::certs(&mut std::io::BufReader::new(file)).collect();
    let certs = certs
        .map_err(|e| ProxyError::Tls(format!("CA file {} is not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ProxyError::Tls(format!(
            "CA file {} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// Counts a request on its shard until the answer is dropped or read to the end.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A provider's response head, and its body (which keeps the request's shard slot).
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: UpstreamBody,
}

pub struct UpstreamBody {
    incoming: Incoming,
    /// When the request was sent plus the total timeout.
    deadline: Instant,
    total: Duration,
    idle: Duration,
    _slot: Slot,
}

impl UpstreamBody {
    /// The next data frame; `None` at the end. Bounded by the idle and the total timeout.
    async fn frame(&mut self) -> Option<Result<Bytes, UpstreamError>> {
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                return Some(Err(UpstreamError::Total(self.total)));
            }
            let wait = self.idle.min(self.deadline - now);
            let frame = match tokio::time::timeout(wait, self.incoming.frame()).await {
                Err(_) if wait < self.idle => return Some(Err(UpstreamError::Total(self.total))),
                Err(_) => return Some(Err(UpstreamError::Idle(self.idle))),
                Ok(f) => f,
            };
            match frame {
                None => return None,
                Some(Err(e)) => return Some(Err(UpstreamError::Stream(error_chain(&e)))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                    // Trailers: nothing to forward.
                }
            }
        }
    }

    /// The whole body, refusing more than `limit` bytes.
    pub async fn read(mut self, limit: usize) -> Result<Bytes, UpstreamError> {
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = self.frame().await {
            let data = frame?;
            if buf.len() + data.len() > limit {
                return Err(UpstreamError::TooLarge(limit));
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    }

    /// At most `limit` bytes of an error body; a broken or longer one is cut there (an error
    /// is passed through as far as it could be read).
    pub async fn read_lossy(mut self, limit: usize) -> Bytes {
        let mut buf = bytes::BytesMut::new();
        while let Some(Ok(data)) = self.frame().await {
            let room = limit.saturating_sub(buf.len());
            buf.extend_from_slice(&data[..data.len().min(room)]);
            if buf.len() >= limit {
                break;
            }
        }
        buf.freeze()
    }

    /// The body as a stream of SSE events.
    pub fn events(self) -> EventStream {
        EventStream {
            body: self,
            parser: Parser::new(),
            pending: VecDeque::new(),
            done: false,
        }
    }
}

impl UpstreamClient {
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, ProxyError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.extra_ca_file {
            for cert in load_pem_certs(path)? {
                roots.add(cert).map_err(|e| {
                    ProxyError::Tls(format!("bad CA certificate in {}: {e}", path.display()))
                })?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ProxyError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let mut cfg = cfg.clone();
        cfg.streams_per_connection = cfg.streams_per_connection.max(1);
        cfg.max_connections_per_host = cfg.max_connections_per_host.max(1);
        Ok(Self {
            inner: Arc::new(Inner {
                connector,
                cfg,
                hosts: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.inner.cfg
    }

    fn new_shard(&self) -> Arc<Shard> {
        let cfg = &self.inner.cfg;
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .http2_keep_alive_interval(Some(cfg.keepalive_interval))
            .http2_keep_alive_timeout(cfg.keepalive_timeout)
            .http2_keep_alive_while_idle(true)
            .build(self.inner.connector.clone());
        Arc::new(Shard {
            client,
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The shard to send a request to `host` on, with its slot taken.
    fn pick(&self, host: String) -> (HyperClient, Slot) {
        let cfg = &self.inner.cfg;
        let mut hosts = self
            .inner
            .hosts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let shards = hosts.entry(host).or_default();
        let free = shards
            .iter()
            .find(|s| s.in_flight.load(Ordering::Relaxed) < cfg.streams_per_connection)
            .cloned();
        let shard = match free {
            Some(s) => s,
            None if shards.len() < cfg.max_connections_per_host => {
                let s = self.new_shard();
                shards.push(s.clone());
                if shards.len() > 1 {
                    tracing::debug!(
                        connections = shards.len(),
                        "upstream: every connection to this host carries its stream limit; opened another"
                    );
                }
                s
            }
            None => match shards
                .iter()
                .min_by_key(|s| s.in_flight.load(Ordering::Relaxed))
            {
                Some(s) => s.clone(),
                None => {
                    let s = self.new_shard();
                    shards.push(s.clone());
                    s
                }
            },
        };
        shard.in_flight.fetch_add(1, Ordering::Relaxed);
        (shard.client.clone(), Slot(shard.in_flight.clone()))
    }

    /// How many connections (shards) the client keeps to `scheme://authority`.
    pub fn connections_to(&self, origin: &str) -> usize {
        self.inner
            .hosts
            .lock()
            .map(|h| h.get(origin).map_or(0, Vec::len))
            .unwrap_or(0)
    }

    /// Sends `req` and waits for the response head, at most `header_timeout` (or less when
    /// given, e.g. the time left to a race's deadline).
    pub async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
        header_timeout: Option<Duration>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let cfg = &self.inner.cfg;
        let origin = format!(
            "{}://{}",
            req.uri().scheme_str().unwrap_or("http"),
            req.uri().authority().map_or("", |a| a.as_str())
        );
        let (client, slot) = self.pick(origin);
        let wait = header_timeout.map_or(cfg.header_timeout, |t| t.min(cfg.header_timeout));
        let sent = Instant::now();
        let resp = match tokio::time::timeout(wait, client.request(req)).await {
            Err(_) => return Err(UpstreamError::HeaderTimeout(wait)),
            Ok(r) => r.map_err(|e| UpstreamError::Connect(error_chain(&e)))?,
        };
        let (parts, incoming) = resp.into_parts();
        Ok(UpstreamResponse {
            status: parts.status,
            headers: parts.headers,
            body: UpstreamBody {
                incoming,
                deadline: sent + cfg.total_timeout,
                total: cfg.total_timeout,
                idle: cfg.idle_timeout,
                _slot: slot,
            },
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// SSE events read from an upstream body.
pub struct EventStream {
    body: UpstreamBody,
    parser: Parser,
    pending: VecDeque<Event>,
    done: bool,
}

impl EventStream {
    /// The next event; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<Event, UpstreamError>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            let mut out = Vec::new();
            match self.body.frame().await {
                None => {
                    self.done = true;
                    self.parser.finish(&mut out);
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok(data)) => {
                    if self.parser.feed(&data, &mut out).is_err() {
                        self.done = true;
                        return Some(Err(UpstreamError::TooLarge(crate::sse::MAX_EVENT_BYTES)));
                    }
                }
            }
            self.pending.extend(out);
        }
    }
}

/// Rebuilds a prepared request for one attempt (the body is shared, never copied).
pub fn replay(req: &http::Request<Bytes>) -> http::Request<Full<Bytes>> {
    let mut out = http::Request::new(Full::new(req.body().clone()));
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.headers_mut() = req.headers().clone();
    out
}

/// Whether a provider's response header reaches the caller: the ones the official SDKs read
/// (rate-limit state, the retry hint, the provider's request id). Nothing else is forwarded.
pub fn is_forwarded_header(name: &str) -> bool {
    matches!(
        name,
        "retry-after" | "retry-after-ms" | "x-request-id" | "request-id" | "openai-processing-ms"
    ) || name.starts_with("x-ratelimit-")
        || name.starts_with("anthropic-ratelimit-")
}

/// Copies the forwarded headers of a provider's response into `dst`. The provider's
/// `x-request-id` goes out as `x-flex-provider-request-id` (`x-request-id` is ours).
pub fn forward_headers(src: &HeaderMap, dst: &mut HeaderMap) {
    for (name, value) in src {
        if !is_forwarded_header(name.as_str()) {
            continue;
        }
        if name == "x-request-id" {
            dst.insert("x-flex-provider-request-id", value.clone());
        } else {
            dst.append(name.clone(), value.clone());
        }
    }
}

/// The provider's id for this request (OpenAI `x-request-id`, Anthropic `request-id`, Google
/// `x-goog-request-id`), for the log line, the span and the usage event.
pub fn provider_request_id(h: &HeaderMap) -> Option<String> {
    ["x-request-id", "request-id", "x-goog-request-id"]
        .iter()
        .find_map(|n| h.get(*n))
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 200)
        .map(str::to_string)
}
