//! The client side of TLS between the planes: the proxy's (and the admin CLI's) gRPC channel to
//! the control plane, and TLS on NATS connections. PEM files are read and checked up front, so a
//! wrong path or a key that does not match its certificate fails at start with the flag's name,
//! the reason and the fix, instead of as a retried handshake in the background.
//!
//! The server side (the control plane's TLS and its client-certificate rule) is
//! `flex_control_plane::tls`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The certificates (`-----BEGIN CERTIFICATE-----` blocks) of PEM text, in order; other
/// sections and text between sections are passed over, a malformed section is an error.
/// (rustls-pki-types' [`PemObject`]; the unmaintained rustls-pemfile is not used.)
pub fn pem_certs(pem: impl std::io::Read) -> Result<Vec<CertificateDer<'static>>, pem::Error> {
    CertificateDer::pem_reader_iter(pem).collect()
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of PEM text; `None` when it holds none.
pub fn pem_private_key(
    pem: impl std::io::Read,
) -> Result<Option<PrivateKeyDer<'static>>, pem::Error> {
    match PrivateKeyDer::from_pem_reader(pem) {
        Ok(key) => Ok(Some(key)),
        Err(pem::Error::NoItemsFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A TLS setting that could not be used: which flag and file, why, and how to fix it. Never
/// contains key material.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {why}. Fix: {fix}")]
pub struct PlaneTlsError {
    pub what: String,
    pub why: String,
    pub fix: String,
}

impl PlaneTlsError {
    fn new(what: impl Into<String>, why: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            why: why.into(),
            fix: fix.into(),
        }
    }
}

/// The flag names a caller exposes, so errors name what the operator typed.
#[derive(Debug, Clone, Copy)]
pub struct FlagNames {
    pub url: &'static str,
    pub ca: &'static str,
    pub cert: &'static str,
    pub key: &'static str,
}

/// `flex proxy`'s flags for its gRPC channel to the control plane.
pub const PROXY_FLAGS: FlagNames = FlagNames {
    url: "--control-url",
    ca: "--control-ca",
    cert: "--control-cert",
    key: "--control-key",
};

/// `flex control` and `flex proxy`'s flags for NATS.
pub const NATS_FLAGS: FlagNames = FlagNames {
    url: "--nats-url",
    ca: "--nats-ca",
    cert: "--nats-cert",
    key: "--nats-key",
};

/// PEM files for a TLS client: the CA to trust (else the public webpki roots) and the client's
/// own certificate chain and key (for mTLS).
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to verify in the server's certificate, when it differs from the URL's host.
    pub server_name: Option<String>,
}

impl ClientTlsFiles {
    fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

fn read_file(flag: &str, what: &str, path: &Path) -> Result<Vec<u8>, PlaneTlsError> {
    std::fs::read(path).map_err(|e| {
        PlaneTlsError::new(
            format!("{flag} {}", path.display()),
            format!("cannot read {what} ({e})"),
            format!("pass the path of a readable PEM file with {flag}"),
        )
    })
}

/// Reads PEM certificates (at least one) from `path`.
pub fn read_certs(
    flag: &str,
    what: &str,
    path: &Path,
) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), PlaneTlsError> {
    let pem = read_file(flag, what, path)?;
    let certs = pem_certs(pem.as_slice()).map_err(|e| {
        PlaneTlsError::new(
            format!("{flag} {}", path.display()),
            format!("{what} is not valid PEM ({e})"),
            format!("pass a PEM file with `-----BEGIN CERTIFICATE-----` blocks with {flag}"),
        )
    })?;
    if certs.is_empty() {
        return Err(PlaneTlsError::new(
            format!("{flag} {}", path.display()),
            format!("{what}: the file holds no `-----BEGIN CERTIFICATE-----` block"),
            format!("pass a PEM certificate file with {flag}"),
        ));
    }
    Ok((pem, certs))
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1) from `path`.
pub fn read_key(
    flag: &str,
    path: &Path,
) -> Result<(Vec<u8>, PrivateKeyDer<'static>), PlaneTlsError> {
    let pem = read_file(flag, "the private key", path)?;
    let key = pem_private_key(pem.as_slice())
        .map_err(|e| {
            PlaneTlsError::new(
                format!("{flag} {}", path.display()),
                format!("the private key is not valid PEM ({e})"),
                format!("pass a PEM private key with {flag}"),
            )
        })?
        .ok_or_else(|| {
            PlaneTlsError::new(
                format!("{flag} {}", path.display()),
                "the file holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                format!("pass the PEM private key of the client certificate with {flag}"),
            )
        })?;
    Ok((pem, key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks the CA file: every certificate in it must be usable as a trust anchor.
fn check_ca(flags: FlagNames, path: &Path) -> Result<Vec<u8>, PlaneTlsError> {
    read_ca(flags.ca, path)
}

/// Reads the CA file given with `flag` and checks that every certificate in it is usable as a
/// trust anchor; returns its PEM text.
pub fn read_ca(flag: &str, path: &Path) -> Result<Vec<u8>, PlaneTlsError> {
    let (pem, certs) = read_certs(flag, "the CA certificate", path)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| {
            PlaneTlsError::new(
                format!("{flag} {}", path.display()),
                format!("a certificate in it is not a usable CA ({e})"),
                format!(
                    "pass the PEM certificate of the CA that signed the server's certificate with {flag}"
                ),
            )
        })?;
    }
    Ok(pem)
}

/// Checks the client certificate and key: both readable and matching.
fn check_identity(
    flags: FlagNames,
    cert: &Path,
    key: &Path,
) -> Result<(Vec<u8>, Vec<u8>), PlaneTlsError> {
    let (cert_pem, certs) = read_certs(flags.cert, "the client certificate", cert)?;
    let (key_pem, der_key) = read_key(flags.key, key)?;
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PlaneTlsError::new("TLS", e.to_string(), "report this as a bug"))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(certs, der_key)
        .map_err(|e| {
            PlaneTlsError::new(
                format!("{} {}", flags.key, key.display()),
                format!(
                    "the key does not fit the certificate {} {} ({e})",
                    flags.cert,
                    cert.display()
                ),
                format!(
                    "pass the private key that was issued with the certificate, with {}",
                    flags.key
                ),
            )
        })?;
    Ok((cert_pem, key_pem))
}

fn pair(flags: FlagNames, files: &ClientTlsFiles) -> Result<Option<(&Path, &Path)>, PlaneTlsError> {
    match (&files.cert, &files.key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(PlaneTlsError::new(
            flags.cert,
            format!(
                "a client certificate needs its private key, and {} is missing",
                flags.key
            ),
            format!("pass both {} and {}", flags.cert, flags.key),
        )),
        (None, Some(_)) => Err(PlaneTlsError::new(
            flags.key,
            format!(
                "a private key needs its certificate, and {} is missing",
                flags.cert
            ),
            format!("pass both {} and {}", flags.cert, flags.key),
        )),
    }
}

/// Applies TLS to a gRPC endpoint: for an `https://` URL, trust `files.ca` (or, without it, the
/// public webpki roots) and present `files.cert`/`files.key` when given. An `http://` URL with
/// TLS files is refused (the files would silently do nothing).
pub fn grpc_endpoint(
    endpoint: Endpoint,
    files: &ClientTlsFiles,
    flags: FlagNames,
) -> Result<Endpoint, PlaneTlsError> {
    let https = endpoint.uri().scheme_str() == Some("https");
    if !https {
        if files.any() {
            return Err(PlaneTlsError::new(
                format!("{} {}", flags.url, endpoint.uri()),
                format!(
                    "TLS files ({} / {} / {}) were given but the URL is not https://",
                    flags.ca, flags.cert, flags.key
                ),
                format!(
                    "use {} https://HOST:PORT for a control plane started with --tls-cert, or drop the TLS flags",
                    flags.url
                ),
            ));
        }
        return Ok(endpoint);
    }
    let mut cfg = ClientTlsConfig::new();
    cfg = match &files.ca {
        Some(ca) => cfg.ca_certificate(Certificate::from_pem(check_ca(flags, ca)?)),
        None => cfg.trust_anchors(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    };
    if let Some((cert, key)) = pair(flags, files)? {
        let (cert_pem, key_pem) = check_identity(flags, cert, key)?;
        cfg = cfg.identity(Identity::from_pem(cert_pem, key_pem));
    }
    if let Some(name) = &files.server_name {
        cfg = cfg.domain_name(name.clone());
    }
    endpoint.tls_config(cfg).map_err(|e| {
        PlaneTlsError::new(
            flags.url,
            format!("TLS could not be set up ({})", error_chain(&e)),
            format!("check {}, {} and {}", flags.ca, flags.cert, flags.key),
        )
    })
}

/// Applies TLS to NATS connect options: `files.ca` to trust (else the system roots), the client
/// certificate and key for servers with `verify: true`, and TLS required whenever any TLS file is
/// given (a plaintext server is then refused rather than silently used).
pub fn nats_options(
    mut opts: async_nats::ConnectOptions,
    files: &ClientTlsFiles,
) -> Result<async_nats::ConnectOptions, PlaneTlsError> {
    let flags = NATS_FLAGS;
    if let Some(ca) = &files.ca {
        check_ca(flags, ca)?;
        opts = opts.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = pair(flags, files)? {
        check_identity(flags, cert, key)?;
        opts = opts.add_client_certificate(cert.to_path_buf(), key.to_path_buf());
    }
    if files.any() {
        opts = opts.require_tls(true);
    }
    Ok(opts)
}

/// A gRPC status for a log line: its message, then the causes a transport failure carries
/// (e.g. the TLS alert of a refused client certificate under a bare "transport error").
pub fn status_text(status: &tonic::Status) -> String {
    use std::error::Error;
    match status.source() {
        Some(src) => {
            let chain = error_chain(src);
            if chain.starts_with(status.message()) {
                chain
            } else {
                format!("{}: {chain}", status.message())
            }
        }
        None => status.message().to_string(),
    }
}

/// An error and its causes, `a: b: c` (tonic's transport errors say only "transport error" at
/// the top; the TLS reason is further down).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_and_leaf() -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["proxy".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (ca.pem(), leaf.pem(), key.serialize_pem())
    }

    fn endpoint(url: &str) -> Endpoint {
        Endpoint::from_shared(url.to_string()).unwrap()
    }

    #[test]
    fn good_files_configure_an_https_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = ca_and_leaf();
        for (n, t) in [("ca.pem", &ca), ("c.pem", &cert), ("k.pem", &key)] {
            std::fs::write(dir.path().join(n), t).unwrap();
        }
        let files = ClientTlsFiles {
            ca: Some(dir.path().join("ca.pem")),
            cert: Some(dir.path().join("c.pem")),
            key: Some(dir.path().join("k.pem")),
            server_name: None,
        };
        grpc_endpoint(endpoint("https://127.0.0.1:1"), &files, PROXY_FLAGS).unwrap();
        // Without a CA: the public roots.
        grpc_endpoint(
            endpoint("https://example.com"),
            &ClientTlsFiles::default(),
            PROXY_FLAGS,
        )
        .unwrap();
        nats_options(async_nats::ConnectOptions::new(), &files).unwrap();
    }

    #[test]
    fn bad_files_name_the_flag_the_reason_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, _) = ca_and_leaf();
        let (_, _, other_key) = ca_and_leaf();
        std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
        std::fs::write(dir.path().join("c.pem"), &cert).unwrap();
        std::fs::write(dir.path().join("k.pem"), &other_key).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "not pem").unwrap();
        let err = |files: ClientTlsFiles, url: &str| {
            grpc_endpoint(endpoint(url), &files, PROXY_FLAGS)
                .unwrap_err()
                .to_string()
        };
        let e = err(
            ClientTlsFiles {
                ca: Some(dir.path().join("missing.pem")),
                ..Default::default()
            },
            "https://h:1",
        );
        assert!(
            e.contains("--control-ca") && e.contains("cannot read") && e.contains("Fix:"),
            "{e}"
        );
        let e = err(
            ClientTlsFiles {
                ca: Some(dir.path().join("junk.pem")),
                ..Default::default()
            },
            "https://h:1",
        );
        assert!(e.contains("no `-----BEGIN CERTIFICATE-----`"), "{e}");
        let e = err(
            ClientTlsFiles {
                cert: Some(dir.path().join("c.pem")),
                key: Some(dir.path().join("k.pem")),
                ..Default::default()
            },
            "https://h:1",
        );
        assert!(
            e.contains("--control-key") && e.contains("does not fit"),
            "{e}"
        );
        let e = err(
            ClientTlsFiles {
                cert: Some(dir.path().join("c.pem")),
                key: Some(dir.path().join("junk.pem")),
                ..Default::default()
            },
            "https://h:1",
        );
        assert!(e.contains("no PEM private key"), "{e}");
        let e = err(
            ClientTlsFiles {
                ca: Some(dir.path().join("ca.pem")),
                ..Default::default()
            },
            "http://h:1",
        );
        assert!(e.contains("not https://"), "{e}");
        let e = nats_options(
            async_nats::ConnectOptions::new(),
            &ClientTlsFiles {
                cert: Some(dir.path().join("c.pem")),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--nats-key"), "{e}");
    }
}
