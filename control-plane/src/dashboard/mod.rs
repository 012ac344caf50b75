//! The self-service dashboard: server-rendered pages (minijinja templates embedded in the
//! binary, no JavaScript needed for any flow) served by the control plane on its own port
//! (`flex control --dashboard-listen`, `flex up` on 127.0.0.1:3000).
//!
//! Every change a user makes is a [`ControlPlane`] command with the user as the actor, so it is
//! in the event log, the audit and the snapshot exactly as `flex admin` changes are.
//!
//! Security:
//! - sessions: a random token in an `HttpOnly`, `SameSite=Lax` cookie (`Secure`, and named
//!   `__Host-…`, when `--dashboard-url` is https); the database keeps only its SHA-256
//!   ([`session`]);
//! - CSRF: every POST carries a token derived from the session (or, signed out, from a
//!   pre-session cookie) and a same-origin `Origin` when the browser sends one, checked in one
//!   middleware before any handler runs ([`session::csrf_guard`]);
//! - sign-in and sign-up attempts are rate-limited per address and per account ([`limiter`]);
//! - a strict Content-Security-Policy (only this origin's script and style, no inline code),
//!   `frame-ancestors 'none'`, `Referrer-Policy: no-referrer`, `Cache-Control: no-store`;
//! - a user sees only orgs they are a member of: any other org id, key id or provider in a URL
//!   is "not found" ([`Dashboard::org`]);
//! - secrets: a new API key or invite link is shown once (held in memory for one page view,
//!   [`flash`]); provider keys are never rendered (only their last four characters); no
//!   password, token or key is logged.

mod auth_pages;
mod flash;
mod limiter;
mod org_pages;
mod session;
mod usage_pages;
mod views;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::domain::Role;
use crate::error::Error;
use crate::ControlPlane;
pub use limiter::Limits;
use session::Viewer;

/// How the dashboard is reached and what it tells users.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    /// The dashboard's public URL, e.g. `https://dashboard.example.com` (links in invites and
    /// in the proxies' errors). `https://` makes cookies `Secure`.
    pub public_url: String,
    /// The proxies' public API base URL (`…/v1`) for the quickstart; `None`: a placeholder.
    pub api_base_url: Option<String>,
    /// Sign-in and sign-up rate limits.
    pub limits: Limits,
}

impl DashboardConfig {
    /// A dashboard at `public_url` (trailing `/` dropped).
    pub fn new(public_url: &str) -> Self {
        Self {
            public_url: public_url.trim_end_matches('/').to_string(),
            api_base_url: None,
            limits: Limits::default(),
        }
    }

    /// Sets the proxies' API base URL shown in the quickstart.
    #[must_use]
    pub fn with_api_base_url(mut self, url: impl Into<String>) -> Self {
        self.api_base_url = Some(url.into().trim_end_matches('/').to_string());
        self
    }

    fn secure(&self) -> bool {
        self.public_url.starts_with("https://")
    }
}

/// The dashboard's shared state.
pub struct Dashboard {
    cp: Arc<ControlPlane>,
    cfg: DashboardConfig,
    limiter: limiter::Limiter,
    flash: flash::Flashes,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("public_url", &self.cfg.public_url)
            .finish_non_exhaustive()
    }
}

type Dash = Arc<Dashboard>;

/// An org the viewer belongs to, resolved from a URL.
#[derive(Debug, Clone)]
pub(crate) struct OrgCtx {
    pub org_id: String,
    pub name: String,
    pub role: Role,
}

impl Dashboard {
    pub fn new(cp: Arc<ControlPlane>, cfg: DashboardConfig) -> Result<Arc<Self>, Error> {
        views::check()?;
        Ok(Arc::new(Self {
            limiter: limiter::Limiter::new(cfg.limits),
            flash: flash::Flashes::default(),
            cp,
            cfg,
        }))
    }

    /// The org `org_id` if `viewer` is a member (after catching up with the log), else "not
    /// found", exactly as for an org that does not exist.
    pub(crate) async fn org(&self, viewer: &Viewer, org_id: &str) -> Result<OrgCtx, PageError> {
        self.cp.catch_up().await?;
        let state = self.cp.state();
        let role = state
            .accounts
            .role_of(org_id, &viewer.user.user_id)
            .ok_or(PageError::NotFound)?;
        let org = state.orgs.get(org_id).ok_or(PageError::NotFound)?;
        Ok(OrgCtx {
            org_id: org.org_id.clone(),
            name: org.name.clone(),
            role,
        })
    }

    /// The viewer's first org (their own, for a signed-up account), if any.
    fn home_org(&self, viewer: &Viewer) -> Option<String> {
        self.cp
            .state()
            .accounts
            .orgs_of(&viewer.user.user_id)
            .next()
            .map(|(o, _)| o.to_string())
    }
}

/// What a page handler fails with; rendered as a page (never with a secret in it).
#[derive(Debug)]
pub(crate) enum PageError {
    /// Unknown, or not the viewer's (the same answer for both).
    NotFound,
    /// A form that cannot be done as given: the message says why and what to do.
    Invalid(String),
    /// The CSRF check failed.
    Forbidden(String),
    /// Our fault; the details went to the log.
    Internal,
}

impl From<Error> for PageError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(m) | Error::FailedPrecondition(m) => PageError::Invalid(m),
            Error::NotFound(_) => PageError::NotFound,
            Error::Conflict { .. } => PageError::Invalid(
                "someone changed this at the same time; reload the page and try again".into(),
            ),
            other => {
                tracing::error!(error = %other, "dashboard request failed");
                PageError::Internal
            }
        }
    }
}

impl From<crate::store::StoreError> for PageError {
    fn from(e: crate::store::StoreError) -> Self {
        PageError::from(Error::from(e))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, title, message) = match self {
            PageError::NotFound => (
                StatusCode::NOT_FOUND,
                "Not found",
                "There is nothing here, or it belongs to an organization you are not a member of.".to_string(),
            ),
            PageError::Invalid(m) => (StatusCode::BAD_REQUEST, "That did not work", m),
            PageError::Forbidden(m) => (StatusCode::FORBIDDEN, "Refused", m),
            PageError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "The dashboard could not do this; the details are in the control plane's log. Retrying may help.".to_string(),
            ),
        };
        let body = views::error_page(status.as_u16(), title, &message);
        (status, axum::response::Html(body)).into_response()
    }
}

type PageResult = Result<Response, PageError>;

/// The routes (see the module docs); `dash` is shared by every request.
pub fn router(dash: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/healthz", get(|| async { "ok" }))
        .route("/static/{file}", get(views::asset))
        .route(
            "/signin",
            get(auth_pages::signin_page).post(auth_pages::signin),
        )
        .route(
            "/signup",
            get(auth_pages::signup_page).post(auth_pages::signup),
        )
        .route("/signout", post(auth_pages::signout))
        .route(
            "/invite/{token}",
            get(auth_pages::invite_page).post(auth_pages::invite_accept),
        )
        // Short links (the proxies' errors name them): the viewer's own org's page.
        .route("/keys", get(|s, v| shortcut(s, v, "keys")))
        .route(
            "/provider-keys",
            get(|s, v| shortcut(s, v, "provider-keys")),
        )
        .route("/usage", get(|s, v| shortcut(s, v, "usage")))
        .route("/billing", get(|s, v| shortcut(s, v, "billing")))
        .route("/quickstart", get(|s, v| shortcut(s, v, "quickstart")))
        .route(
            "/orgs/{org}/keys",
            get(org_pages::keys_page).post(org_pages::key_create),
        )
        .route(
            "/orgs/{org}/keys/{key}/revoke",
            get(org_pages::key_revoke_page).post(org_pages::key_revoke),
        )
        .route(
            "/orgs/{org}/provider-keys",
            get(org_pages::provider_keys_page),
        )
        .route(
            "/orgs/{org}/provider-keys/{provider}",
            post(org_pages::provider_key_set),
        )
        .route(
            "/orgs/{org}/provider-keys/{provider}/remove",
            get(org_pages::provider_key_remove_page).post(org_pages::provider_key_remove),
        )
        .route("/orgs/{org}/members", get(org_pages::members_page))
        .route("/orgs/{org}/invites", post(org_pages::invite_create))
        .route(
            "/orgs/{org}/invites/{invite}/revoke",
            post(org_pages::invite_revoke),
        )
        .route(
            "/orgs/{org}/members/{user}/remove",
            get(org_pages::member_remove_page).post(org_pages::member_remove),
        )
        .route("/orgs/{org}/usage", get(usage_pages::usage_page))
        .route("/orgs/{org}/usage.csv", get(usage_pages::usage_csv))
        .route("/orgs/{org}/billing", get(usage_pages::billing_page))
        .route("/orgs/{org}/quickstart", get(usage_pages::quickstart_page))
        .route("/orgs/{org}/audit", get(usage_pages::audit_page))
        .fallback(|| async { PageError::NotFound })
        .layer(middleware::from_fn_with_state(
            dash.clone(),
            session::csrf_guard,
        ))
        .layer(middleware::from_fn_with_state(
            dash.clone(),
            security_headers,
        ))
        .with_state(dash)
}

async fn home(State(dash): State<Dash>, viewer: Option<Viewer>) -> Response {
    match viewer.as_ref().and_then(|v| dash.home_org(v)) {
        Some(org) => Redirect::to(&format!("/orgs/{org}/quickstart")).into_response(),
        None if viewer.is_some() => PageError::NotFound.into_response(),
        None => Redirect::to("/signin").into_response(),
    }
}

async fn shortcut(State(dash): State<Dash>, viewer: Viewer, page: &'static str) -> Response {
    match dash.home_org(&viewer) {
        Some(org) => Redirect::to(&format!("/orgs/{org}/{page}")).into_response(),
        None => PageError::NotFound.into_response(),
    }
}

/// The Content-Security-Policy of every response: this origin's script and style only, no
/// inline script or style, nothing framed, forms only to this origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(State(dash): State<Dash>, req: Request, next: Next) -> Response {
    let is_static = req.uri().path().starts_with("/static/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Invite links carry a secret in their path: never send it on as a referrer.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if !is_static {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if dash.cfg.secure() {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    resp
}

impl ControlPlane {
    /// Serves the dashboard on `listener` until `shutdown` completes.
    pub async fn serve_dashboard(
        self: &Arc<Self>,
        listener: TcpListener,
        cfg: DashboardConfig,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let addr = listener.local_addr().ok();
        let app = router(Dashboard::new(self.clone(), cfg)?);
        tracing::info!(addr = ?addr, "dashboard listening");
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Internal(format!("dashboard server: {e}")))
    }
}
