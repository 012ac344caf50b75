//! Sessions, cookies and the CSRF guard.
//!
//! A session is a random 256-bit token in a cookie; the database row is keyed by its SHA-256, so
//! a copy of the database signs nobody in. A form's CSRF token is derived from the token the
//! browser holds in an `HttpOnly` cookie (the session's, or before signing in a pre-session
//! one): another site can make the browser send the cookie but cannot read it, so it cannot
//! know the token. One middleware checks every POST before its handler runs.

use axum::body::{to_bytes, Body};
use axum::extract::{ConnectInfo, FromRequestParts, OptionalFromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use subtle::ConstantTimeEq;
use time::Duration;

use super::{Dash, Dashboard, PageError};
use crate::projection::UserView;
use crate::timefmt;

/// How long a sign-in lasts.
pub const SESSION_DAYS: i64 = 7;
/// Largest form body accepted (a provider key is at most 4 KiB).
const MAX_FORM_BYTES: usize = 64 * 1024;

const SESSION: &str = "flex_session";
const SESSION_SECURE: &str = "__Host-flex_session";
const PRE: &str = "flex_csrf";
const PRE_SECURE: &str = "__Host-flex_csrf";

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

pub(crate) fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The CSRF token of forms rendered for the holder of `seed` (a cookie's token).
pub(crate) fn csrf_of(seed: &str) -> String {
    sha256_hex(&format!("flex-dashboard-csrf\0{seed}"))
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Dashboard {
    fn session_cookie_name(&self) -> &'static str {
        if self.cfg.secure() {
            SESSION_SECURE
        } else {
            SESSION
        }
    }

    fn pre_cookie_name(&self) -> &'static str {
        if self.cfg.secure() {
            PRE_SECURE
        } else {
            PRE
        }
    }

    fn cookie_header(&self, name: &str, value: &str, max_age_secs: i64) -> HeaderValue {
        let secure = if self.cfg.secure() { "; Secure" } else { "" };
        let text = format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}{secure}"
        );
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The token forms are derived from for this request: the session cookie's, else the
    /// pre-session cookie's.
    fn csrf_seed<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        cookie(headers, self.session_cookie_name())
            .or_else(|| cookie(headers, self.pre_cookie_name()))
    }

    /// The CSRF token for a signed-out page, and the pre-session cookie to set when the browser
    /// has none yet.
    pub(crate) fn anonymous_csrf(&self, headers: &HeaderMap) -> (String, Option<HeaderValue>) {
        match self.csrf_seed(headers) {
            Some(seed) => (csrf_of(seed), None),
            None => {
                let seed = random_token();
                let set = self.cookie_header(self.pre_cookie_name(), &seed, 24 * 3600);
                (csrf_of(&seed), Some(set))
            }
        }
    }

    /// Starts a session for `user_id`: the row, and the cookie that carries its token.
    pub(crate) async fn start_session(&self, user_id: &str) -> Result<HeaderValue, PageError> {
        let token = random_token();
        let now = timefmt::now();
        let store = self.cp.store();
        if let Err(e) = store.sessions_delete_expired(now).await {
            tracing::warn!(error = %e, "could not drop expired dashboard sessions");
        }
        store
            .session_insert(
                &sha256_hex(&token),
                user_id,
                now,
                now + Duration::days(SESSION_DAYS),
            )
            .await?;
        tracing::info!(user_id, "dashboard sign-in");
        Ok(self.cookie_header(self.session_cookie_name(), &token, SESSION_DAYS * 86_400))
    }

    /// Ends the request's session (if any) and returns the cookie that clears it.
    pub(crate) async fn end_session(&self, headers: &HeaderMap) -> Result<HeaderValue, PageError> {
        if let Some(token) = cookie(headers, self.session_cookie_name()) {
            self.cp.store().session_delete(&sha256_hex(token)).await?;
        }
        Ok(self.cookie_header(self.session_cookie_name(), "", 0))
    }

    /// The signed-in, enabled user of a request.
    async fn viewer_of(&self, headers: &HeaderMap) -> Result<Option<Viewer>, PageError> {
        let Some(token) = cookie(headers, self.session_cookie_name()) else {
            return Ok(None);
        };
        let token_hash = sha256_hex(token);
        let Some(row) = self.cp.store().session_get(&token_hash).await? else {
            return Ok(None);
        };
        if row.expires_at <= timefmt::now() {
            return Ok(None);
        }
        let user = self.cp.state().accounts.users.get(&row.user_id).cloned();
        let user = match user {
            Some(u) => u,
            None => {
                // Signed up on another instance a moment ago: fold its events first.
                self.cp.catch_up().await?;
                match self.cp.state().accounts.users.get(&row.user_id).cloned() {
                    Some(u) => u,
                    None => return Ok(None),
                }
            }
        };
        if user.disabled {
            return Ok(None);
        }
        Ok(Some(Viewer {
            csrf: csrf_of(token),
            user,
        }))
    }
}

/// The signed-in user of a request, and the CSRF token for the forms rendered for them. As an
/// extractor it sends a signed-out browser to the sign-in page (coming back afterwards).
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    pub user: UserView,
    pub csrf: String,
}

impl FromRequestParts<Dash> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, dash: &Dash) -> Result<Self, Self::Rejection> {
        match dash.viewer_of(&parts.headers).await {
            Ok(Some(v)) => Ok(v),
            Ok(None) => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".into());
                let target = if parts.method == Method::GET {
                    format!("/signin?next={}", url_encode(&next))
                } else {
                    "/signin".to_string()
                };
                Err(Redirect::to(&target).into_response())
            }
            Err(e) => Err(e.into_response()),
        }
    }
}

impl OptionalFromRequestParts<Dash> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        dash: &Dash,
    ) -> Result<Option<Self>, Self::Rejection> {
        dash.viewer_of(&parts.headers)
            .await
            .map_err(IntoResponse::into_response)
    }
}

/// The client's address (for rate limits), when the server recorded it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// Percent-encodes everything but unreserved characters (for a `next=` query value).
pub(crate) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A local path to go back to after signing in: only `/…` on this site (never `//host`).
pub(crate) fn safe_next(next: Option<&str>) -> Option<String> {
    let n = next?.trim();
    let ok = n.starts_with('/')
        && !n.starts_with("//")
        && !n.starts_with("/\\")
        && n.len() <= 500
        && !n.chars().any(|c| c.is_control());
    ok.then(|| n.to_string())
}

/// Whether `origin` (an `Origin` header) is this site: the configured public URL, or the host
/// the request was addressed to.
fn same_origin(dash: &Dashboard, origin: &str, host: Option<&str>) -> bool {
    if origin == dash.cfg.public_url {
        return true;
    }
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

/// Refuses a POST whose form lacks the right CSRF token, or that another site's page sent
/// (`Origin`), before any handler runs. The body is read (at most 64 KiB) and handed on.
pub(crate) async fn csrf_guard(State(dash): State<Dash>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let refused = |why: &str| {
        // An invite's path carries its secret: log only that it was one.
        let path = parts.uri.path();
        let path = if path.starts_with("/invite/") {
            "/invite/…"
        } else {
            path
        };
        tracing::info!(path, why, "dashboard form refused");
        PageError::Forbidden(
            "This form was refused: it expired, or it was not sent by a page of this dashboard. Go back, reload the page and submit it again.".into(),
        )
        .into_response()
    };
    if let Some(origin) = parts
        .headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok());
        if origin != "null" && !same_origin(&dash, origin, host) {
            return refused("cross-origin");
        }
    }
    let Ok(bytes) = to_bytes(body, MAX_FORM_BYTES).await else {
        return PageError::Invalid("The form is too large.".into()).into_response();
    };
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
    let presented = fields
        .iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.as_str());
    let expected = dash.csrf_seed(&parts.headers).map(csrf_of);
    match (presented, expected) {
        (Some(p), Some(e)) if bool::from(p.as_bytes().ct_eq(e.as_bytes())) => {}
        (None, _) => return refused("no csrf token"),
        _ => return refused("wrong csrf token"),
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_targets_stay_on_this_site() {
        assert_eq!(
            safe_next(Some("/orgs/o/keys")).as_deref(),
            Some("/orgs/o/keys")
        );
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil",
            "keys",
            "",
        ] {
            assert_eq!(safe_next(Some(bad)), None, "{bad}");
        }
        assert_eq!(url_encode("/a?b=c&d"), "/a%3Fb%3Dc%26d");
    }

    #[test]
    fn cookies_are_read_only_when_they_look_like_tokens() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; flex_session=abc123; x=<script>"),
        );
        assert_eq!(cookie(&h, "flex_session"), Some("abc123"));
        assert_eq!(cookie(&h, "x"), None);
        assert_ne!(csrf_of("abc123"), csrf_of("abc124"));
    }
}
