//! Signing up, in and out, and accepting an invite.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use minijinja::context;
use secrecy::SecretString;
use serde::Deserialize;

use super::limiter::wait_text;
use super::session::{safe_next, url_encode, ClientAddr, Viewer};
use super::views::render_raw;
use super::{Dash, PageError, PageResult};
use crate::accounts::{user_actor, SignIn};
use crate::domain::accounts::mask_email;
use crate::domain::normalize_email;
use crate::store::Metadata;

#[derive(Debug, Deserialize)]
pub(crate) struct NextQuery {
    next: Option<String>,
    email: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct Credentials {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    next: String,
}

/// A signed-out page (sign-in, sign-up, invite), with its CSRF token and, for a browser
/// without one, the pre-session cookie it comes from.
fn anonymous_page(
    dash: &Dash,
    headers: &HeaderMap,
    status: StatusCode,
    name: &str,
    ctx: minijinja::Value,
) -> PageResult {
    let (csrf, set) = dash.anonymous_csrf(headers);
    let body = render_raw(name, context! { csrf, ..ctx })?;
    let mut resp = (status, Html(body)).into_response();
    if let Some(c) = set {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(resp)
}

fn signed_in_redirect(cookie: axum::http::HeaderValue, to: &str) -> Response {
    let mut resp = Redirect::to(to).into_response();
    resp.headers_mut().append(header::SET_COOKIE, cookie);
    resp
}

pub(crate) async fn signin_page(
    State(dash): State<Dash>,
    headers: HeaderMap,
    viewer: Option<Viewer>,
    Query(q): Query<NextQuery>,
) -> PageResult {
    let next = safe_next(q.next.as_deref());
    if viewer.is_some() {
        return Ok(Redirect::to(next.as_deref().unwrap_or("/")).into_response());
    }
    anonymous_page(
        &dash,
        &headers,
        StatusCode::OK,
        "signin.html",
        context! { next, email => q.email },
    )
}

pub(crate) async fn signin(
    State(dash): State<Dash>,
    headers: HeaderMap,
    ClientAddr(ip): ClientAddr,
    Form(f): Form<Credentials>,
) -> PageResult {
    let next = safe_next(Some(&f.next));
    let again = |status: StatusCode, error: String| {
        anonymous_page(
            &dash,
            &headers,
            status,
            "signin.html",
            context! { next, email => f.email.trim(), error },
        )
    };
    let key = normalize_email(&f.email).unwrap_or_else(|_| f.email.trim().to_lowercase());
    if let Err(wait) = dash.limiter.sign_in(ip, &key) {
        tracing::warn!(ip = ?ip, "dashboard sign-in rate-limited");
        return again(
            StatusCode::TOO_MANY_REQUESTS,
            format!("Too many sign-in attempts. Try again {}.", wait_text(wait)),
        );
    }
    let password = SecretString::from(f.password.clone());
    match dash.cp.check_sign_in(&f.email, &password).await? {
        SignIn::Ok(user_id) => {
            dash.limiter.sign_in_succeeded(&key);
            let cookie = dash.start_session(&user_id).await?;
            Ok(signed_in_redirect(cookie, next.as_deref().unwrap_or("/")))
        }
        SignIn::Disabled => again(
            StatusCode::FORBIDDEN,
            "This account is disabled. Ask the operator of this FlexInference to enable it (`flex admin user enable`).".into(),
        ),
        SignIn::Invalid => {
            dash.limiter.sign_in_failed(&key);
            again(
                StatusCode::UNAUTHORIZED,
                "The email or the password is wrong. Check both and try again, or create an account.".into(),
            )
        }
    }
}

pub(crate) async fn signup_page(
    State(dash): State<Dash>,
    headers: HeaderMap,
    viewer: Option<Viewer>,
    Query(q): Query<NextQuery>,
) -> PageResult {
    let next = safe_next(q.next.as_deref());
    if viewer.is_some() {
        return Ok(Redirect::to(next.as_deref().unwrap_or("/")).into_response());
    }
    anonymous_page(
        &dash,
        &headers,
        StatusCode::OK,
        "signup.html",
        context! { next, email => q.email },
    )
}

pub(crate) async fn signup(
    State(dash): State<Dash>,
    headers: HeaderMap,
    ClientAddr(ip): ClientAddr,
    Form(f): Form<Credentials>,
) -> PageResult {
    let next = safe_next(Some(&f.next));
    let again = |status: StatusCode, error: String| {
        anonymous_page(
            &dash,
            &headers,
            status,
            "signup.html",
            context! { next, email => f.email.trim(), error },
        )
    };
    if let Err(wait) = dash.limiter.sign_up(ip) {
        return again(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "Too many accounts were created from your address. Try again {}.",
                wait_text(wait)
            ),
        );
    }
    let password = SecretString::from(f.password.clone());
    match dash.cp.sign_up(&f.email, &password, None).await {
        Ok(reg) => {
            let cookie = dash.start_session(&reg.user_id).await?;
            let to = next.unwrap_or_else(|| format!("/orgs/{}/quickstart", reg.org_id));
            Ok(signed_in_redirect(cookie, &to))
        }
        Err(e) => match PageError::from(e) {
            PageError::Invalid(m) => again(StatusCode::BAD_REQUEST, m),
            other => Err(other),
        },
    }
}

pub(crate) async fn signout(State(dash): State<Dash>, headers: HeaderMap) -> PageResult {
    let clear = dash.end_session(&headers).await?;
    Ok(signed_in_redirect(clear, "/signin"))
}

pub(crate) async fn invite_page(
    State(dash): State<Dash>,
    headers: HeaderMap,
    viewer: Option<Viewer>,
    Path(token): Path<String>,
) -> PageResult {
    dash.cp.catch_up().await?;
    let state = dash.cp.state();
    // Whether the link is good is decided when it is accepted; here, only what it names.
    let invite = dash.cp.invite_of_token(&token);
    let org_name = invite
        .as_ref()
        .and_then(|i| state.orgs.get(&i.org_id))
        .map(|o| o.name.clone());
    let here = format!("/invite/{}", url_encode(&token));
    let ctx = context! {
        token,
        here,
        org_name,
        role => invite.as_ref().map(|i| i.role.as_str()),
        for_email => invite.as_ref().map(|i| mask_email(&i.email)),
        invite_email => invite.as_ref().map(|i| i.email.clone()),
        signed_in_as => viewer.as_ref().map(|v| v.user.email.clone()),
    };
    match viewer {
        Some(v) => {
            let body = render_raw("invite.html", context! { csrf => v.csrf, ..ctx })?;
            Ok(Html(body).into_response())
        }
        None => anonymous_page(&dash, &headers, StatusCode::OK, "invite.html", ctx),
    }
}

pub(crate) async fn invite_accept(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(token): Path<String>,
) -> PageResult {
    let meta = Metadata::new(user_actor(&viewer.user.user_id));
    let org_id = dash
        .cp
        .accept_invite(&meta, &SecretString::from(token), &viewer.user.user_id)
        .await?;
    dash.flash
        .notice(&viewer.csrf, "You joined the organization.");
    Ok(Redirect::to(&format!("/orgs/{org_id}/quickstart")).into_response())
}
