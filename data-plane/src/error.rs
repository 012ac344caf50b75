//! Every error the proxy itself produces, and how it maps to an HTTP status and a body.
//!
//! This is the one place where errors become responses. Our errors always say what went wrong,
//! why, how to fix it, and show a working example. Errors that come from a provider are not ours:
//! they pass through with their original status and body (see [`ApiError::Upstream`]).

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::json;

use crate::formats::CallerFormat;

/// The dashboard's public URL (`--dashboard-url`), for the errors a user fixes there. One per
/// process: set at start by `flex proxy` and `flex up`.
static DASHBOARD_URL: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// Sets (or clears) the dashboard URL that `no_byok_key` and `payment_required` link to.
pub fn set_dashboard_url(url: Option<&str>) {
    *DASHBOARD_URL
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) =
        url.map(|u| u.trim_end_matches('/').to_string());
}

/// The dashboard page that fixes the error `code`, when there is one and a URL is set.
pub fn dashboard_link(code: &str) -> Option<String> {
    let page = match code {
        "no_byok_key" => "/provider-keys",
        "payment_required" => "/billing",
        _ => return None,
    };
    let url = DASHBOARD_URL
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    url.as_ref().map(|u| format!("{u}{page}"))
}

/// An error of ours, rendered in the caller's envelope. Boxed, so `Result<_, ApiError>` stays
/// one pointer wide on the request path.
#[derive(Debug, Clone)]
pub struct ApiError(Box<ApiErrorInner>);

#[derive(Debug, Clone)]
pub struct ApiErrorInner {
    pub status: StatusCode,
    /// Machine-readable code, e.g. `missing_start_within`.
    pub code: &'static str,
    /// OpenAI-style error type, e.g. `invalid_request_error`.
    pub kind: &'static str,
    pub param: Option<String>,
    /// What went wrong and why.
    pub message: String,
    /// How to fix it.
    pub fix: String,
    /// A working example.
    pub example: String,
    /// A provider error to pass through untouched (status, content type, body).
    pub upstream: Option<Upstream>,
    /// Response headers of ours (e.g. `retry-after` on a 429).
    pub headers: Vec<(http::HeaderName, HeaderValue)>,
    /// A machine-readable object added to the error (e.g. `limit` on a 429).
    pub detail: Option<(&'static str, serde_json::Value)>,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub status: StatusCode,
    /// Its content type and the provider headers a caller's SDK reads (an allow-list).
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let kind = match status.as_u16() {
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        };
        Self(Box::new(ApiErrorInner {
            status,
            code,
            kind,
            param: None,
            message: message.into(),
            fix: String::new(),
            example: String::new(),
            upstream: None,
            headers: Vec::new(),
            detail: None,
        }))
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn param(mut self, p: impl Into<String>) -> Self {
        self.0.param = Some(p.into());
        self
    }

    pub fn fix(mut self, f: impl Into<String>) -> Self {
        self.0.fix = f.into();
        self
    }

    pub fn example(mut self, e: impl Into<String>) -> Self {
        self.0.example = e.into();
        self
    }

    /// Adds a response header.
    pub fn header(mut self, name: &'static str, value: HeaderValue) -> Self {
        self.0
            .headers
            .push((http::HeaderName::from_static(name), value));
        self
    }

    /// Adds `key: value` to the error object.
    pub fn detail(mut self, key: &'static str, value: serde_json::Value) -> Self {
        self.0.detail = Some((key, value));
        self
    }

    /// A provider's error, passed through with its original status, body and content type,
    /// and the provider headers the SDKs read (`retry-after`, rate limits, request id).
    pub fn upstream(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Self {
        let mut e = Self::new(status, "upstream_error", "the provider returned an error");
        let mut kept = HeaderMap::new();
        if let Some(ct) = headers.get(http::header::CONTENT_TYPE) {
            kept.insert(http::header::CONTENT_TYPE, ct.clone());
        }
        crate::upstream::forward_headers(headers, &mut kept);
        e.0.upstream = Some(Upstream {
            status,
            headers: kept,
            body,
        });
        e
    }

    /// A bug of ours: said plainly, with what the caller can do.
    pub fn internal(what: &str) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("Internal error: {what}."),
        )
        .fix("retry the request; if it persists, report it with the x-request-id header.")
    }

    /// The provider's answer was cut off or failed after it started (a truncated stream, a
    /// body over the limit, a failed or malformed final response).
    pub fn incomplete(why: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_incomplete",
            format!("The provider's answer was cut off or failed before it was complete: {why}."),
        )
        .fix("retry the request; if it keeps happening on long answers, lower max_tokens or stream the answer.")
    }

    /// The provider's error status, if this error passes a provider's answer through.
    pub fn upstream_status(&self) -> Option<StatusCode> {
        self.0.upstream.as_ref().map(|u| u.status)
    }

    /// The full human text: what and why, how to fix (with the dashboard page that does it,
    /// when there is one), example.
    pub fn full_message(&self) -> String {
        let mut m = self.message.clone();
        if !self.fix.is_empty() {
            m.push_str(" Fix: ");
            m.push_str(&self.fix);
        }
        if let Some(link) = dashboard_link(self.code) {
            m.push_str(" Dashboard: ");
            m.push_str(&link);
        }
        if !self.example.is_empty() {
            m.push_str(" Example: ");
            m.push_str(&self.example);
        }
        m
    }

    /// The JSON body in the caller's envelope.
    pub fn body(&self, format: CallerFormat) -> serde_json::Value {
        let mut body = self.envelope(format);
        if let Some((key, value)) = &self.detail {
            if let Some(obj) = body.get_mut("error").and_then(|e| e.as_object_mut()) {
                obj.insert((*key).to_string(), value.clone());
            }
        }
        body
    }

    fn envelope(&self, format: CallerFormat) -> serde_json::Value {
        match format {
            CallerFormat::Messages => json!({
                "type": "error",
                "error": {
                    "type": self.kind,
                    "message": self.full_message(),
                    "code": self.code,
                    "param": self.param,
                },
            }),
            _ => json!({
                "error": {
                    "message": self.full_message(),
                    "type": self.kind,
                    "param": self.param,
                    "code": self.code,
                },
            }),
        }
    }

    pub fn into_response_for(self, format: CallerFormat) -> Response {
        if let Some(up) = self.0.upstream {
            let mut resp = (up.status, up.body).into_response();
            resp.headers_mut().extend(up.headers);
            return resp;
        }
        let body = self.body(format);
        let mut resp = (self.status, axum::Json(body)).into_response();
        for (name, value) in &self.headers {
            resp.headers_mut().insert(name.clone(), value.clone());
        }
        resp
    }
}

impl std::ops::Deref for ApiError {
    type Target = ApiErrorInner;

    fn deref(&self) -> &ApiErrorInner {
        &self.0
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

/// Errors of the proxy process itself (start-up, snapshots, I/O), not of a request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("control plane: {0}")]
    Control(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_fixed_in_the_dashboard_link_to_its_page() {
        let e = ApiError::bad_request("no_byok_key", "No openai key.").fix("add it.");
        let other = ApiError::bad_request("missing_model", "No model.");
        set_dashboard_url(Some("https://dash.example.com/"));
        assert_eq!(
            e.full_message(),
            "No openai key. Fix: add it. Dashboard: https://dash.example.com/provider-keys"
        );
        let paid = ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "payment_required",
            "Past due.",
        );
        assert!(paid
            .full_message()
            .ends_with("Dashboard: https://dash.example.com/billing"));
        assert_eq!(other.full_message(), "No model.");
        set_dashboard_url(None);
        assert_eq!(e.full_message(), "No openai key. Fix: add it.");
    }
}
