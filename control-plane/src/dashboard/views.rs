//! Templates (minijinja, HTML auto-escaped, compiled once from files embedded in the binary),
//! the page chrome every signed-in page shares, value formatting, and the static assets.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use minijinja::{context, Environment, Value};
use serde::Serialize;
use time::OffsetDateTime;

use super::session::Viewer;
use super::{Dashboard, OrgCtx, PageError, PageResult};
use crate::domain::Role;

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("error.html", include_str!("templates/error.html")),
    ("_secret.html", include_str!("templates/_secret.html")),
    ("signin.html", include_str!("templates/signin.html")),
    ("signup.html", include_str!("templates/signup.html")),
    ("invite.html", include_str!("templates/invite.html")),
    ("keys.html", include_str!("templates/keys.html")),
    ("confirm.html", include_str!("templates/confirm.html")),
    (
        "provider_keys.html",
        include_str!("templates/provider_keys.html"),
    ),
    ("members.html", include_str!("templates/members.html")),
    ("usage.html", include_str!("templates/usage.html")),
    ("billing.html", include_str!("templates/billing.html")),
    ("quickstart.html", include_str!("templates/quickstart.html")),
    ("audit.html", include_str!("templates/audit.html")),
];

const STYLE: &str = include_str!("static/style.css");
const SCRIPT: &str = include_str!("static/app.js");
const ICON: &str = include_str!("static/icon.svg");

fn build() -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    for (name, text) in TEMPLATES {
        env.add_template(name, text)?;
    }
    env.add_filter("money", |m: i64| money(m));
    env.add_filter("thousands", |n: i64| thousands(n));
    Ok(env)
}

/// The compiled templates (a template error is a bug the tests catch; it is logged too).
fn env() -> Option<&'static Environment<'static>> {
    static ENV: OnceLock<Option<Environment<'static>>> = OnceLock::new();
    ENV.get_or_init(|| match build() {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::error!(error = %e, "dashboard templates do not compile");
            None
        }
    })
    .as_ref()
}

/// Fails when the embedded templates do not compile (checked when a dashboard starts).
pub(crate) fn check() -> Result<(), crate::error::Error> {
    env().map(|_| ()).ok_or_else(|| {
        crate::error::Error::Internal(
            "the dashboard's templates do not compile (see the log)".into(),
        )
    })
}

/// Renders `name` with `ctx`; a template error is logged and becomes a 500 page.
pub(crate) fn render_raw(name: &str, ctx: Value) -> Result<String, PageError> {
    let env = env().ok_or(PageError::Internal)?;
    env.get_template(name)
        .and_then(|t| t.render(ctx))
        .map_err(|e| {
            tracing::error!(template = name, error = %e, "dashboard template failed");
            PageError::Internal
        })
}

/// A whole error page (no chrome: it may have no signed-in user).
pub(crate) fn error_page(status: u16, title: &str, message: &str) -> String {
    render_raw("error.html", context! { status, title, message })
        .unwrap_or_else(|_| format!("{status} {title}"))
}

/// An org in the switcher.
#[derive(Debug, Serialize)]
struct OrgLink {
    id: String,
    name: String,
    current: bool,
}

/// What every signed-in page shows around its content.
pub(crate) struct Chrome<'a> {
    pub viewer: &'a Viewer,
    pub org: Option<&'a OrgCtx>,
    /// The nav entry to mark current.
    pub nav: &'static str,
    pub title: String,
    pub notice: Option<String>,
    pub error: Option<String>,
}

impl Dashboard {
    /// Renders a signed-in page: `ctx` plus the chrome (user, org switcher, nav, CSRF token).
    pub(crate) fn page(&self, name: &str, chrome: Chrome<'_>, ctx: Value) -> PageResult {
        let state = self.cp.state();
        let orgs: Vec<OrgLink> = state
            .accounts
            .orgs_of(&chrome.viewer.user.user_id)
            .map(|(id, _)| OrgLink {
                id: id.to_string(),
                name: state
                    .orgs
                    .get(id)
                    .map(|o| o.name.clone())
                    .unwrap_or_else(|| id.to_string()),
                current: chrome.org.is_some_and(|o| o.org_id == id),
            })
            .collect();
        let org = chrome.org.map(|o| {
            context! {
                id => o.org_id,
                name => o.name,
                role => o.role.as_str(),
                owner => o.role == Role::Owner,
            }
        });
        let status = if chrome.error.is_some() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        };
        let full = context! {
            title => chrome.title,
            nav => chrome.nav,
            user_email => chrome.viewer.user.email,
            csrf => chrome.viewer.csrf,
            org,
            orgs,
            notice => chrome.notice,
            error => chrome.error,
            ..ctx
        };
        Ok((status, Html(render_raw(name, full)?)).into_response())
    }
}

/// Micro-dollars as dollars: at least cents, more decimals only when there are any
/// (`$12.50`, `$0.000123`, `-$3.00`); integer arithmetic only.
pub(crate) fn money(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let frac = format!("{:06}", abs % 1_000_000);
    let frac = frac.trim_end_matches('0');
    let frac = if frac.len() < 2 {
        format!("{frac:0<2}")
    } else {
        frac.to_string()
    };
    format!("{sign}${}.{frac}", thousands_u(abs / 1_000_000))
}

fn thousands_u(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// 1234567 → `1,234,567`.
pub(crate) fn thousands(n: i64) -> String {
    let s = thousands_u(n.unsigned_abs());
    if n < 0 {
        format!("-{s}")
    } else {
        s
    }
}

/// `2026-12-01 21:25 UTC`.
pub(crate) fn when(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

/// The same, from an RFC 3339 string (empty stays empty).
pub(crate) fn when_str(s: &str) -> String {
    crate::timefmt::parse(s).map(when).unwrap_or_default()
}

/// `/static/{file}`: the embedded stylesheet, script and icon (cached for an hour).
pub(crate) async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "style.css" => (STYLE, "text/css; charset=utf-8"),
        "app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "icon.svg" => (ICON, "image/svg+xml"),
        _ => return PageError::NotFound.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles() {
        build().unwrap_or_else(|e| panic!("{e:#}"));
    }

    #[test]
    fn money_keeps_every_micro_dollar() {
        assert_eq!(money(12_500_000), "$12.50");
        assert_eq!(money(123), "$0.000123");
        assert_eq!(money(0), "$0.00");
        assert_eq!(money(-3_000_000), "-$3.00");
        assert_eq!(money(1_234_567_890_000), "$1,234,567.89");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(-999), "-999");
    }
}
