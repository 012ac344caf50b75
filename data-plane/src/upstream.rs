//! The HTTP client towards the providers: HTTPS with rustls (webpki roots plus an optional extra
//! CA for tests and private gateways), pooled connections, HTTP/2 where the server offers it via
//! ALPN, and plain HTTP only for explicitly configured `http://` base URLs (the simulator).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::error::ProxyError;
use crate::sse::{Event, Parser};

/// The largest error body we read from a provider to pass it through (1 MiB).
pub const MAX_ERROR_BODY: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Extra PEM CA certificates to trust besides the webpki roots.
    pub extra_ca_file: Option<std::path::PathBuf>,
    pub connect_timeout: Duration,
    /// Longest silence between two upstream stream events before we give up.
    pub idle_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            extra_ca_file: None,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not reach the provider: {0}")]
    Connect(String),
    #[error("the provider stream failed: {0}")]
    Stream(String),
    #[error("the provider sent nothing for {0:?}")]
    Idle(Duration),
    #[error("the provider sent an event larger than the limit")]
    TooLarge,
}

#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    idle_timeout: Duration,
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
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        Ok(Self {
            client,
            idle_timeout: cfg.idle_timeout,
        })
    }

    pub async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        self.client
            .request(req)
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(&e)))
    }

    /// Wraps a response body as a stream of SSE events.
    pub fn events(&self, body: Incoming) -> EventStream {
        EventStream {
            body,
            parser: Parser::new(),
            pending: VecDeque::new(),
            done: false,
            idle_timeout: self.idle_timeout,
        }
    }
}

/// The whole body, at most `limit` bytes (the rest is cut).
pub async fn read_body(body: Incoming, limit: usize) -> Bytes {
    match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
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
    body: Incoming,
    parser: Parser,
    pending: VecDeque<Event>,
    done: bool,
    idle_timeout: Duration,
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
            let frame = match tokio::time::timeout(self.idle_timeout, self.body.frame()).await {
                Err(_) => {
                    self.done = true;
                    return Some(Err(UpstreamError::Idle(self.idle_timeout)));
                }
                Ok(f) => f,
            };
            let mut out = Vec::new();
            match frame {
                None => {
                    self.done = true;
                    self.parser.finish(&mut out);
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(UpstreamError::Stream(error_chain(&e))));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.parser.feed(&data, &mut out).is_err() {
                            self.done = true;
                            return Some(Err(UpstreamError::TooLarge));
                        }
                    }
                }
            }
            self.pending.extend(out);
        }
    }
}
