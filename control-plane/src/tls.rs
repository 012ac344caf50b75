//! TLS on the control plane's gRPC server, and the enrolment rule for proxies.
//!
//! The admin API and the proxies' `flex.control.v1.ControlService` (Watch, Ack, ReportUsage)
//! share one server. With [`ServerTls`] it speaks TLS only (rustls, ring). With a client CA
//! ([`ServerTls::client_ca`], `flex control --client-ca`) a client may still connect without a
//! certificate (operators reach the admin API with the admin token), but:
//!
//! - a client that presents a certificate not signed by that CA is refused in the handshake;
//! - every `ControlService` call without a verified client certificate is refused with
//!   `UNAUTHENTICATED` ([`EnrolledProxiesLayer`]), so only enrolled proxies can watch snapshots,
//!   acknowledge versions or report usage.

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use flex_shared::proto::control::control_service_server::SERVICE_NAME as CONTROL_SERVICE;
use futures_util::future::{Either, Ready};
use rustls::pki_types::pem::{self, PemObject};

use secrecy::SecretString;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::{ControlPlane, Error, Result};

/// A TLS setting that could not be loaded: which file, why, and how to fix it. Never contains
/// key material.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {why}. {fix}")]
pub struct TlsFileError {
    pub what: String,
    pub path: String,
    pub why: String,
    pub fix: String,
}

impl TlsFileError {
    fn new(what: &str, path: &Path, why: impl Into<String>, fix: &str) -> Self {
        Self {
            what: what.to_string(),
            path: path.display().to_string(),
            why: why.into(),
            fix: fix.to_string(),
        }
    }
}

/// The server side of TLS between the planes: the server's certificate chain and key, and
/// optionally the CA that signs the proxies' client certificates.
#[derive(Clone)]
pub struct ServerTls {
    identity: Identity,
    client_ca: Option<Certificate>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_ca", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

fn read(what: &str, path: &Path, fix: &str) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path)
        .map_err(|e| TlsFileError::new(what, path, format!("cannot read it ({e})"), fix))
}

fn pem_certs(
    what: &str,
    path: &Path,
    pem: &[u8],
    fix: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsFileError> {
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError::new(what, path, format!("it is not valid PEM ({e})"), fix))?;
    if certs.is_empty() {
        return Err(TlsFileError::new(
            what,
            path,
            "it holds no `-----BEGIN CERTIFICATE-----` block",
            fix,
        ));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTls {
    /// Loads and checks PEM files: `cert` (the server's chain, leaf first), `key` (its private
    /// key: PKCS#8, PKCS#1 or SEC1) and, for mTLS, `client_ca` (the CA certificates that sign the
    /// proxies' client certificates).
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsFileError> {
        const CERT_FIX: &str = "Fix: pass the PEM certificate chain of this control plane (leaf first) with --tls-cert";
        const KEY_FIX: &str =
            "Fix: pass the PEM private key that matches --tls-cert with --tls-key";
        const CA_FIX: &str = "Fix: pass the PEM certificate of the CA that signs the proxies' client certificates with --client-ca";
        let cert_pem = read("the TLS certificate (--tls-cert)", cert, CERT_FIX)?;
        let key_pem = read("the TLS key (--tls-key)", key, KEY_FIX)?;
        let ca_pem = match client_ca {
            Some(p) => Some((p, read("the client CA (--client-ca)", p, CA_FIX)?)),
            None => None,
        };
        let certs = pem_certs(
            "the TLS certificate (--tls-cert)",
            cert,
            &cert_pem,
            CERT_FIX,
        )?;
        let der_key = match rustls::pki_types::PrivateKeyDer::from_pem_slice(&key_pem) {
            Ok(k) => Ok(Some(k)),
            Err(pem::Error::NoItemsFound) => Ok(None),
            Err(e) => Err(e),
        }
        .map_err(|e| {
            TlsFileError::new(
                "the TLS key (--tls-key)",
                key,
                format!("it is not valid PEM ({e})"),
                KEY_FIX,
            )
        })?
        .ok_or_else(|| {
            TlsFileError::new(
                "the TLS key (--tls-key)",
                key,
                "it holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                KEY_FIX,
            )
        })?;
        // Builds the rustls configuration once to catch a key that does not match the
        // certificate, or an unsupported key type, now rather than at the first handshake.
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| {
                TlsFileError::new(
                    "the TLS certificate (--tls-cert)",
                    cert,
                    e.to_string(),
                    CERT_FIX,
                )
            })?
            .with_no_client_auth()
            .with_single_cert(certs, der_key)
            .map_err(|e| {
                TlsFileError::new(
                    "the TLS key (--tls-key)",
                    key,
                    format!(
                        "it does not fit the certificate --tls-cert {} ({e})",
                        cert.display()
                    ),
                    KEY_FIX,
                )
            })?;
        let client_ca = match ca_pem {
            Some((path, pem)) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in pem_certs("the client CA (--client-ca)", path, &pem, CA_FIX)? {
                    roots.add(c).map_err(|e| {
                        TlsFileError::new(
                            "the client CA (--client-ca)",
                            path,
                            format!("a certificate in it is not a usable CA ({e})"),
                            CA_FIX,
                        )
                    })?;
                }
                Some(Certificate::from_pem(pem))
            }
            None => None,
        };
        Ok(Self {
            identity: Identity::from_pem(cert_pem, key_pem),
            client_ca,
        })
    }

    /// From PEM text already in memory (tests). Checked by the server when it starts.
    pub fn from_pem(
        cert_pem: impl AsRef<[u8]>,
        key_pem: impl AsRef<[u8]>,
        client_ca_pem: Option<&[u8]>,
    ) -> Self {
        Self {
            identity: Identity::from_pem(cert_pem, key_pem),
            client_ca: client_ca_pem.map(Certificate::from_pem),
        }
    }

    /// Whether proxies must present a client certificate signed by the client CA.
    pub fn client_ca(&self) -> bool {
        self.client_ca.is_some()
    }

    fn tonic_config(&self) -> ServerTlsConfig {
        let cfg = ServerTlsConfig::new()
            .identity(self.identity.clone())
            .timeout(std::time::Duration::from_secs(10));
        match &self.client_ca {
            // Optional at the TLS layer (operators may reach the admin API without a
            // certificate); a certificate that is presented must verify, and the control
            // service requires one (EnrolledProxiesLayer).
            Some(ca) => cfg.client_ca_root(ca.clone()).client_auth_optional(true),
            None => cfg,
        }
    }
}

/// Refuses `flex.control.v1.ControlService` calls that arrive without a verified client
/// certificate (when enabled). Everything else passes.
#[derive(Debug, Clone, Copy)]
pub struct EnrolledProxiesLayer {
    enabled: bool,
}

impl EnrolledProxiesLayer {
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }
}

impl<S> tower::Layer<S> for EnrolledProxiesLayer {
    type Service = EnrolledProxies<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EnrolledProxies {
            inner,
            enabled: self.enabled,
        }
    }
}

/// The service of [`EnrolledProxiesLayer`].
#[derive(Debug, Clone)]
pub struct EnrolledProxies<S> {
    inner: S,
    enabled: bool,
}

/// Whether the request came over TLS with a client certificate (rustls verified it against the
/// client CA during the handshake, or the connection would not exist).
fn has_verified_client_cert<B>(req: &http::Request<B>) -> bool {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .is_some_and(|certs| !certs.is_empty())
}

fn is_control_service(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(CONTROL_SERVICE))
        .is_some_and(|rest| rest.starts_with('/'))
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for EnrolledProxies<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.enabled && is_control_service(req.uri().path()) && !has_verified_client_cert(&req) {
            tracing::warn!(
                path = req.uri().path(),
                "refused a control-service call without a client certificate"
            );
            let status = tonic::Status::unauthenticated(
                "this control plane only serves enrolled proxies (flex control --client-ca): the \
                 connection presented no client certificate. Fix: start the proxy with \
                 --control-cert and --control-key (a certificate signed by the control plane's \
                 client CA) and --control-url https://…",
            );
            return Either::Left(futures_util::future::ready(Ok(status.into_http())));
        }
        Either::Right(self.inner.call(req))
    }
}

impl ControlPlane {
    /// As [`ControlPlane::serve_with_listener`], over TLS when `tls` is given (see the module
    /// docs for the client-certificate rule).
    pub async fn serve_with_listener_tls(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        admin_token: &SecretString,
        tls: Option<&ServerTls>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<()> {
        let routes = self.grpc_router(admin_token)?;
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(
                %addr,
                tls = tls.is_some(),
                client_ca = tls.is_some_and(ServerTls::client_ca),
                "control plane gRPC listening"
            );
        }
        let shutdown = async move {
            shutdown.await;
            self.end_watch_streams();
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls.tonic_config()).map_err(|e| {
                Error::Internal(format!(
                    "the TLS certificate or key was refused: {}",
                    error_chain(&e)
                ))
            })?;
        }
        builder
            // Outermost, so a call the next layer refuses has its span too.
            .layer(crate::grpc_trace::GrpcSpanLayer)
            .layer(EnrolledProxiesLayer::new(
                tls.is_some_and(ServerTls::client_ca),
            ))
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                // Watch updates are small writes: without TCP_NODELAY, Nagle's algorithm and the
                // peer's delayed ACK hold each one back by tens of milliseconds.
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    |conn| {
                        if let Ok(c) = &conn {
                            let _ = c.set_nodelay(true);
                        }
                        conn
                    },
                ),
                shutdown,
            )
            .await?;
        Ok(())
    }
}

/// An error and its causes, `a: b: c`.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_control_service_paths_are_guarded() {
        assert!(is_control_service("/flex.control.v1.ControlService/Watch"));
        assert!(is_control_service(
            "/flex.control.v1.ControlService/ReportUsage"
        ));
        assert!(!is_control_service("/flex.admin.v1.AdminService/ListOrgs"));
        assert!(!is_control_service(
            "/flex.control.v1.ControlServiceX/Watch"
        ));
        assert!(!is_control_service(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
    }

    #[test]
    fn bad_files_say_which_flag_why_and_how_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = ServerTls::load(&missing, &missing, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--tls-cert") && e.contains("cannot read") && e.contains("Fix:"),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let e = ServerTls::load(&junk, &junk, None).unwrap_err().to_string();
        assert!(e.contains("no `-----BEGIN CERTIFICATE-----`"), "{e}");
    }
}
