//! One `tracing` span per gRPC call of the control plane (admin API, Watch/Ack/ReportUsage,
//! reflection), exported as an OTLP server span when the binary exports traces.
//!
//! [`GrpcSpanLayer`] wraps the tonic server. It sees the request's path and the response's
//! `grpc-status` (in the headers of an immediate error, else in the trailers), never a body or a
//! header value: the admin token (`authorization`) and the messages' secrets (`SetProviderKey`'s
//! key, a created API key) are out of its reach. The handlers add the ids a request names with
//! [`record_id`]: `org_id`, `key_id`, `proxy_id`, `provider`, `request_id`.
//!
//! The span covers the whole call: for a stream (Watch) until its last message and status, or
//! until the client goes away (recorded as CANCELLED). With trace export on, a call that carries
//! W3C `traceparent` (and `tracestate`) metadata gets its span as a child of that caller's span
//! ([`link_callers_with`]); those two values are the only metadata read.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use flex_shared::proto::admin::admin_service_server::SERVICE_NAME as ADMIN_SERVICE;
use flex_shared::proto::control::control_service_server::SERVICE_NAME as CONTROL_SERVICE;
use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http;
use tracing::field::Empty;
use tracing::Instrument;

/// The services the control plane serves; a call to anything else is named `unknown`.
const SERVICES: [&str; 4] = [
    ADMIN_SERVICE,
    CONTROL_SERVICE,
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Makes a call's span (not yet entered) a child of its caller's trace, from the request's
/// metadata (W3C `traceparent` / `tracestate`). Set once by the binary when it exports traces
/// ([`link_callers_with`]); without it no metadata is looked at. It must never fail a call: a
/// value it cannot use is ignored.
pub type CallerLink = dyn Fn(&http::HeaderMap, &tracing::Span) + Send + Sync;

static CALLER_LINK: std::sync::OnceLock<Box<CallerLink>> = std::sync::OnceLock::new();

/// Links every call span of this process to its caller's trace with `link` (see [`CallerLink`]).
/// The first call wins; later ones are ignored.
pub fn link_callers_with(link: impl Fn(&http::HeaderMap, &tracing::Span) + Send + Sync + 'static) {
    let _ = CALLER_LINK.set(Box::new(link));
}

/// gRPC's CANCELLED: the client went away before the status was sent.
const CANCELLED: i32 = 1;

/// Records an id of the current call on its span (see the module docs for the fields), when it
/// looks like one (at most 128 printable ASCII characters, no spaces). Only ever pass ids,
/// names of providers and request ids: never a secret.
pub(crate) fn record_id(field: &'static str, value: &str) {
    let v = value.trim();
    if !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()) {
        tracing::Span::current().record(field, v);
    }
}

/// `(service, method)` of a path `/<service>/<method>` the control plane serves.
fn rpc_of(path: &str) -> Option<(&'static str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let service = SERVICES.iter().copied().find(|s| *s == service)?;
    let plausible = !method.is_empty()
        && method.len() <= 64
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    plausible.then_some((service, method))
}

fn call_span(path: &str) -> tracing::Span {
    let (name, service, method) = match rpc_of(path) {
        Some((s, m)) => (format!("{s}/{m}"), s, m),
        None => ("unknown".to_string(), "", ""),
    };
    let span = tracing::info_span!(
        "grpc",
        otel.name = name.as_str(),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = Empty,
        rpc.method = Empty,
        rpc.grpc.status_code = Empty,
        org_id = Empty,
        key_id = Empty,
        proxy_id = Empty,
        provider = Empty,
        user_id = Empty,
        request_id = Empty,
    );
    if !service.is_empty() {
        span.record("rpc.service", service);
        span.record("rpc.method", method);
    }
    span
}

/// Records the call's status on its span: the code, and the span status ERROR for the codes
/// OpenTelemetry counts as a server's error (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
/// INTERNAL, UNAVAILABLE, DATA_LOSS).
fn record_status(span: &tracing::Span, code: i32) {
    span.record("rpc.grpc.status_code", i64::from(code));
    if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
        span.record("otel.status_code", "error");
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Wraps every call of the tonic server in a span (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcSpanLayer;

impl<S> tower::Layer<S> for GrpcSpanLayer {
    type Service = GrpcSpans<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcSpans { inner }
    }
}

/// The service of [`GrpcSpanLayer`].
#[derive(Debug, Clone)]
pub struct GrpcSpans<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ResBody> tower::Service<http::Request<B>> for GrpcSpans<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let span = call_span(req.uri().path());
        let meter =
            crate::metrics::CallMeter::new(rpc_of(req.uri().path()).map_or("unknown", |(_, m)| m));
        if let Some(link) = CALLER_LINK.get() {
            // Before the span is first entered: the parent of a started span is fixed.
            link(req.headers(), &span);
        }
        let call = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(async move {
            let resp = call.instrument(span.clone()).await?;
            let (parts, body) = resp.into_parts();
            // An immediate error (or a trailers-only answer) has its status in the headers;
            // otherwise it comes in the trailers, and the body keeps the span until then.
            let mut body = TracedBody {
                inner: body,
                span: Some(span),
                meter: Some(meter),
            };
            if let Some(code) = grpc_status(&parts.headers) {
                body.status(code);
            }
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// A response body that holds its call's span until the status arrives in the trailers.
#[derive(Debug)]
pub struct TracedBody<B> {
    inner: B,
    span: Option<tracing::Span>,
    /// Counts the call in the metrics when its status arrives.
    meter: Option<crate::metrics::CallMeter>,
}

impl<B> TracedBody<B> {
    fn status(&mut self, code: i32) {
        if let Some(span) = self.span.take() {
            record_status(&span, code);
        }
        if let Some(m) = self.meter.take() {
            m.done(code);
        }
    }
}

impl<B: Body + Unpin> Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.status(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(span) = this.span.take() {
                    span.record("otel.status_code", "error");
                }
                if let Some(m) = this.meter.take() {
                    m.done(2);
                }
            }
            // Ended without a status (not gRPC): nothing to record.
            Poll::Ready(None) => {
                drop(this.span.take());
                drop(this.meter.take());
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for TracedBody<B> {
    fn drop(&mut self) {
        // Dropped before its status: the client cancelled or the connection is gone.
        if self.span.is_some() || self.meter.is_some() {
            self.status(CANCELLED);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn only_served_methods_name_a_span() {
        assert_eq!(
            rpc_of("/flex.admin.v1.AdminService/CreateOrg"),
            Some(("flex.admin.v1.AdminService", "CreateOrg"))
        );
        assert_eq!(
            rpc_of("/flex.control.v1.ControlService/Watch"),
            Some(("flex.control.v1.ControlService", "Watch"))
        );
        assert_eq!(rpc_of("/other.Service/CreateOrg"), None);
        assert_eq!(rpc_of("/flex.admin.v1.AdminService/Create Org"), None);
        assert_eq!(rpc_of("/flex.admin.v1.AdminService/"), None);
        assert_eq!(rpc_of("/flex.admin.v1.AdminService"), None);
        assert_eq!(rpc_of("flex.admin.v1.AdminService/CreateOrg"), None);
    }

    #[test]
    fn the_status_comes_from_grpc_status() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_status(&h), Some(5));
    }
}
