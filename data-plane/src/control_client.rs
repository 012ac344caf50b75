//! The proxy's client of the control service (`Watch`, `Ack`, `ReportUsage`): a channel, plus
//! the proxy token when the control plane requires one (`--proxy-token-file` on both sides;
//! mutual TLS is the other way a control plane knows its proxies).

use flex_shared::proto::control::control_service_client::ControlServiceClient;
use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Adds `authorization: Bearer <proxy token>` to every call (none without a token). The value
/// is marked sensitive, so HTTP/2 header compression never indexes it.
#[derive(Clone, Default)]
pub struct ProxyToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for ProxyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyToken")
            .field("set", &self.0.is_some())
            .finish()
    }
}

impl ProxyToken {
    /// No token: the control plane must trust the connection itself (mutual TLS, or loopback).
    pub fn none() -> Self {
        Self(None)
    }

    /// The token (surrounding whitespace, e.g. a file's last newline, is not part of it).
    pub fn new(token: &SecretString) -> Result<Self, String> {
        let t = token.expose_secret().trim();
        if t.is_empty() {
            return Err("the proxy token is empty: put a random string (e.g. `openssl rand -hex 32`) in the file given to --proxy-token-file".into());
        }
        let mut v = MetadataValue::try_from(format!("Bearer {t}")).map_err(|_| {
            "the proxy token has characters that cannot go in a gRPC header: use printable ASCII, e.g. `openssl rand -hex 32`".to_string()
        })?;
        v.set_sensitive(true);
        Ok(Self(Some(v)))
    }
}

impl Interceptor for ProxyToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A control-service client on `channel` that sends `token`.
pub type ControlClient = ControlServiceClient<InterceptedService<Channel, ProxyToken>>;

/// A control-service client on `channel` that sends `token`.
pub fn client(channel: Channel, token: &ProxyToken) -> ControlClient {
    ControlServiceClient::with_interceptor(channel, token.clone())
}
