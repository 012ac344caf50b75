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
    /// The largest single SSE event read from a provider's stream (`--max-sse-event-kib`);
    /// a larger one fails the stream (see [`crate::sse::MAX_EVENT_BYTES`], the default).
    pub max_sse_event_bytes: usize,
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
            max_sse_event_bytes: crate::sse::MAX_EVENT_BYTES,
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
    #[error("the provider's answer is larger than the limit of {0} bytes (--max-response-mib)")]
    TooLarge(usize),
    #[error(
        "the provider sent a stream event larger than the limit of {0} bytes (--max-sse-event-kib)"
    )]
    EventTooLarge(usize),
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

/// A connection thread (0: off them) and a `scheme://authority`.
type PoolKey = (usize, String);

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    cfg: UpstreamConfig,
    /// Shards per connection thread ([`crate::workers::current`]) and `scheme://authority`.
    hosts: Mutex<HashMap<PoolKey, Vec<Arc<Shard>>>>,
}

fn load_pem_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ProxyError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ProxyError::Tls(format!("cannot open CA file {}: {e}", path.display())))?;
    let certs = crate::plane_tls::pem_certs(std::io::BufReader::new(file))
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
    /// The bound of one SSE event when the body is read as a stream.
    max_event: usize,
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
            parser: Parser::with_limit(self.max_event),
            body: self,
            pending: VecDeque::new(),
            done: false,
            refused: None,
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
        // Each connection thread has its own connections (`--worker-threads`): a request never
        // waits on a connection driven by another thread.
        let shards = hosts.entry((crate::workers::current(), host)).or_default();
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

    /// How many connections (shards) the client keeps to `scheme://authority`, over every
    /// connection thread.
    pub fn connections_to(&self, origin: &str) -> usize {
        self.inner
            .hosts
            .lock()
            .map(|h| {
                h.iter()
                    .filter(|((_, o), _)| o == origin)
                    .map(|(_, v)| v.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Sends `req` and waits for the response head, at most `header_timeout` (or less when
    /// given, e.g. the time left to a race's deadline). A stream the server refused before
    /// processing it (HTTP/2 `REFUSED_STREAM`, e.g. a burst on a new connection before its
    /// stream limit was known) is sent again, at most twice: the server guarantees it did
    /// nothing with it.
    pub async fn send(
        &self,
        req: &http::Request<Bytes>,
        header_timeout: Option<Duration>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let cfg = &self.inner.cfg;
        let origin = format!(
            "{}://{}",
            req.uri().scheme_str().unwrap_or("http"),
            req.uri().authority().map_or("", |a| a.as_str())
        );
        let wait = header_timeout.map_or(cfg.header_timeout, |t| t.min(cfg.header_timeout));
        let sent = Instant::now();
        let mut refused = 0;
        loop {
            let (client, slot) = self.pick(origin.clone());
            let left = wait.saturating_sub(sent.elapsed());
            let resp = match tokio::time::timeout(left, client.request(replay(req))).await {
                Err(_) => return Err(UpstreamError::HeaderTimeout(wait)),
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    let chain = error_chain(&e);
                    if refused < 2 && chain.contains("refused stream") {
                        refused += 1;
                        tracing::debug!(
                            error = chain,
                            "upstream refused a stream unprocessed; sending it again"
                        );
                        continue;
                    }
                    return Err(UpstreamError::Connect(chain));
                }
            };
            let (parts, incoming) = resp.into_parts();
            return Ok(UpstreamResponse {
                status: parts.status,
                headers: parts.headers,
                body: UpstreamBody {
                    incoming,
                    deadline: sent + cfg.total_timeout,
                    total: cfg.total_timeout,
                    idle: cfg.idle_timeout,
                    max_event: cfg.max_sse_event_bytes,
                    _slot: slot,
                },
            });
        }
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
    /// Why the stream failed after the events still pending.
    refused: Option<UpstreamError>,
}

impl EventStream {
    /// The next event; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<Event, UpstreamError>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(Ok(e));
            }
            if self.done {
                return self.refused.take().map(Err);
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
                    if let Err(crate::sse::SseError::TooLarge(max)) =
                        self.parser.feed(&data, &mut out)
                    {
                        // The events completed before the oversized one come first.
                        self.done = true;
                        self.refused = Some(UpstreamError::EventTooLarge(max));
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use std::convert::Infallible;

    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use hyper_util::rt::TokioIo;

    /// An HTTPS server speaking only HTTP/2 with a concurrent-stream limit of `limit`: every
    /// answer's head goes at once, its body only after `hold` (a long stream).
    async fn h2_server(limit: u32, hold: Duration) -> (String, tempfile::NamedTempFile) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let mut ca = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut ca, cert.cert.pem().as_bytes()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |_req| async move {
                        let body = futures_util::stream::once(async move {
                            tokio::time::sleep(hold).await;
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"data: {}\n\n")))
                        });
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(StreamBody::new(body))
                                .unwrap(),
                        )
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(limit)
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (format!("https://localhost:{port}"), ca)
    }

    /// Three times a host's concurrent-stream limit of simultaneous long streams: every one
    /// gets its head at once, on as many connections as it takes; none queues behind another.
    #[tokio::test]
    async fn streams_beyond_a_connections_limit_open_another_connection() {
        let limit = 4;
        let hold = Duration::from_millis(1500);
        let (origin, ca) = h2_server(limit, hold).await;
        let client = UpstreamClient::new(&UpstreamConfig {
            extra_ca_file: Some(ca.path().to_path_buf()),
            streams_per_connection: limit as usize,
            ..UpstreamConfig::default()
        })
        .unwrap();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..3 * limit {
            let client = client.clone();
            let url = format!("{origin}/v1/responses");
            tasks.push(tokio::spawn(async move {
                let req = http::Request::post(url).body(Bytes::new()).unwrap();
                let resp = client.send(&req, None).await.unwrap();
                let head = t0.elapsed();
                let events = resp.body.read(1024).await.unwrap();
                (head, events)
            }));
        }
        for task in tasks {
            let (head, body) = task.await.unwrap();
            assert!(
                head < Duration::from_secs(1),
                "a head after {head:?}: queued behind a stream"
            );
            assert_eq!(&body[..], b"data: {}\n\n");
        }
        assert_eq!(client.connections_to(&origin), 3);
        // With one connection (the old behaviour) the second wave waits for the first's streams.
        let single = UpstreamClient::new(&UpstreamConfig {
            extra_ca_file: Some(ca.path().to_path_buf()),
            streams_per_connection: usize::MAX,
            max_connections_per_host: 1,
            ..UpstreamConfig::default()
        })
        .unwrap();
        // Its connection knows the server's limit (a burst on a new one races the settings).
        let warm = http::Request::post(format!("{origin}/v1/responses"))
            .body(Bytes::new())
            .unwrap();
        let _ = single
            .send(&warm, None)
            .await
            .unwrap()
            .body
            .read(1024)
            .await;
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..2 * limit {
            let client = single.clone();
            let url = format!("{origin}/v1/responses");
            tasks.push(tokio::spawn(async move {
                let req = http::Request::post(url).body(Bytes::new()).unwrap();
                let resp = client.send(&req, None).await.unwrap();
                let head = t0.elapsed();
                let _ = resp.body.read(1024).await;
                head
            }));
        }
        let mut late = 0;
        for task in tasks {
            if task.await.unwrap() >= hold {
                late += 1;
            }
        }
        assert_eq!(
            late, limit,
            "the control: one connection queues the streams past its limit"
        );
    }

    /// A body longer than the limit, or one that breaks, is an error (never a cut 200).
    #[tokio::test]
    async fn a_body_over_the_limit_or_broken_is_an_error() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    // Promises 100 bytes, sends 10, closes.
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                        .await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        let client = UpstreamClient::new(&UpstreamConfig::default()).unwrap();
        let req = http::Request::post(format!("http://{addr}/x"))
            .body(Bytes::new())
            .unwrap();
        let resp = client.send(&req, None).await.unwrap();
        assert!(matches!(
            resp.body.read(1 << 20).await,
            Err(UpstreamError::Stream(_))
        ));
        let resp = client.send(&req, None).await.unwrap();
        assert!(matches!(
            resp.body.read(5).await,
            Err(UpstreamError::TooLarge(5))
        ));
    }

    #[test]
    fn only_the_allow_listed_provider_headers_pass() {
        let mut src = HeaderMap::new();
        for (k, v) in [
            ("retry-after", "3"),
            ("x-ratelimit-remaining-requests", "9"),
            ("anthropic-ratelimit-tokens-limit", "1000"),
            ("request-id", "req_a"),
            ("x-request-id", "req_o"),
            ("set-cookie", "s=1"),
            ("openai-organization", "org-secret"),
            ("content-length", "10"),
        ] {
            src.insert(
                http::HeaderName::from_static(k),
                http::HeaderValue::from_static(v),
            );
        }
        let mut dst = HeaderMap::new();
        forward_headers(&src, &mut dst);
        let mut names: Vec<&str> = dst.keys().map(http::HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "anthropic-ratelimit-tokens-limit",
                "request-id",
                "retry-after",
                "x-flex-provider-request-id",
                "x-ratelimit-remaining-requests"
            ]
        );
        assert_eq!(provider_request_id(&src).as_deref(), Some("req_o"));
    }
}
