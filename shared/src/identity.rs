//! A proxy's identity between the planes.
//!
//! With mutual TLS (`flex control --client-ca`), a proxy's id is the common name (CN) of its
//! client certificate: `flex proxy` takes it as its default `--proxy-id`, and the control plane
//! refuses a Watch or an Ack that names another id, so an enrolled proxy cannot report as
//! another one (`deploy/make-secrets.sh` issues `CN=<proxy id>`).

use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
use x509_cert::der::{oid::ObjectIdentifier, Decode};

/// `id-at-commonName` (2.5.4.3).
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// The subject common name of a DER certificate (the last one, if it has several); `None` for
/// a certificate that does not parse or has no CN in a string type.
pub fn certificate_common_name(der: &[u8]) -> Option<String> {
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let mut cn = None;
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter().filter(|a| a.oid == COMMON_NAME) {
            let v = &atv.value;
            let text = v
                .decode_as::<Utf8StringRef<'_>>()
                .map(|s| s.as_str().to_string())
                .or_else(|_| {
                    v.decode_as::<PrintableStringRef<'_>>()
                        .map(|s| s.as_str().to_string())
                })
                .or_else(|_| {
                    v.decode_as::<Ia5StringRef<'_>>()
                        .map(|s| s.as_str().to_string())
                });
            if let Ok(t) = text {
                cn = Some(t);
            }
        }
    }
    cn
}

/// The common name of the first certificate in a PEM file's text.
pub fn pem_common_name(pem: &str) -> Option<String> {
    let body: String = pem
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)?
        .split("-----END CERTIFICATE-----")
        .next()?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()?;
    certificate_common_name(&der)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn cert(cn: Option<&str>) -> rcgen::Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["edge.proxies.test".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "FlexInference");
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params.self_signed(&key).unwrap()
    }

    #[test]
    fn the_common_name_of_a_certificate() {
        let c = cert(Some("edge-1"));
        assert_eq!(certificate_common_name(c.der()).as_deref(), Some("edge-1"));
        assert_eq!(pem_common_name(&c.pem()).as_deref(), Some("edge-1"));
        assert_eq!(certificate_common_name(cert(None).der()), None);
        assert_eq!(certificate_common_name(b"not a certificate"), None);
        assert_eq!(pem_common_name("no pem here"), None);
    }
}
