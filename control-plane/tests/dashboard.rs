//! The dashboard over HTTP (its axum router, in process), on SQLite and on a real Postgres: accounts,
//! CSRF, tenant isolation by URL, keys shown once, provider secrets never rendered, invites,
//! rate limits, and that everything it did is in the log, rebuildable, with the user as actor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use common::{k1, Backend, TestDb};
use flex_control_plane::dashboard::{self, Dashboard, DashboardConfig, Limits};
use flex_control_plane::{ControlPlane, Metadata};
use flex_shared::usage::UsageEvent;
use secrecy::{ExposeSecret, SecretString};
use tower::ServiceExt;

both_backends!(
    sign_up_keys_and_provider_keys_through_the_dashboard,
    a_user_sees_only_their_own_orgs_even_by_url,
    forms_without_their_csrf_token_or_from_another_site_are_refused,
    invites_add_members_and_owners_remove_them,
    usage_billing_and_audit_pages_show_the_org_ledger,
    sign_in_is_rate_limited_and_disabled_users_are_signed_out,
);

/// A browser: a cookie jar and the last page, against the dashboard's router.
struct Browser {
    app: Router,
    cookies: HashMap<String, String>,
    last: String,
    origin: Option<String>,
}

struct Page {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> String {
        self.headers
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

fn csrf_in(html: &str) -> Option<String> {
    let at = html.find(r#"name="csrf" value=""#)? + r#"name="csrf" value=""#.len();
    Some(html[at..].split('"').next()?.to_string())
}

impl Browser {
    fn new(app: &Router) -> Self {
        Self {
            app: app.clone(),
            cookies: HashMap::new(),
            last: String::new(),
            origin: None,
        }
    }

    async fn send(&mut self, req: Request<Body>) -> Page {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        for c in headers.get_all(header::SET_COOKIE) {
            let c = c.to_str().unwrap();
            let (kv, _) = c.split_once(';').unwrap_or((c, ""));
            let (k, v) = kv.split_once('=').unwrap();
            if v.is_empty() || c.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_string(), v.to_string());
            }
        }
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        if status == StatusCode::OK {
            self.last = body.clone();
        }
        Page {
            status,
            headers,
            body,
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn get(&mut self, path: &str) -> Page {
        let req = Request::get(path)
            .header(header::COOKIE, self.cookie_header())
            .body(Body::empty())
            .unwrap();
        self.send(req).await
    }

    /// Posts `fields` with the CSRF token of the last page.
    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let csrf = csrf_in(&self.last).expect("the last page has a form");
        let mut all: Vec<(&str, &str)> = vec![("csrf", &csrf)];
        all.extend_from_slice(fields);
        self.post_raw(path, &all).await
    }

    async fn post_raw(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let body = serde_urlencoded::to_string(fields).unwrap();
        let mut req = Request::post(path)
            .header(header::COOKIE, self.cookie_header())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::HOST, "dash.test");
        if let Some(o) = &self.origin {
            req = req.header(header::ORIGIN, o);
        }
        self.send(req.body(Body::from(body)).unwrap()).await
    }

    /// Signs up; returns the new org's id.
    async fn sign_up(&mut self, email: &str, password: &str) -> String {
        let p = self.get("/signup").await;
        assert_eq!(p.status, StatusCode::OK, "{}", p.body);
        let p = self
            .post("/signup", &[("email", email), ("password", password)])
            .await;
        assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
        let to = p.location();
        assert!(
            to.starts_with("/orgs/org_") && to.ends_with("/quickstart"),
            "{to}"
        );
        to.trim_start_matches("/orgs/")
            .trim_end_matches("/quickstart")
            .to_string()
    }
}

async fn app(cp: &Arc<ControlPlane>, cfg: DashboardConfig) -> Router {
    dashboard::router(Dashboard::new(cp.clone(), cfg).unwrap())
        .layer(MockConnectInfo(SocketAddr::from(([10, 0, 0, 7], 40000))))
}

fn cfg() -> DashboardConfig {
    DashboardConfig::new("http://dash.test").with_api_base_url("http://api.test/v1")
}

const PASSWORD: &str = "correct horse battery staple";

async fn sign_up_keys_and_provider_keys_through_the_dashboard(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let app = app(&cp, cfg()).await;
    let mut ada = Browser::new(&app);

    // Signed out: every page leads to the sign-in page, coming back afterwards.
    let p = ada.get("/provider-keys").await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(p.location(), "/signin?next=/provider-keys");

    let org = ada.sign_up(" Ada@Example.com ", PASSWORD).await;
    let session = ada.cookies.get("flex_session").cloned().unwrap();
    assert_eq!(session.len(), 64);
    let state = cp.state();
    let user = state.accounts.user_by_email("ada@example.com").unwrap();
    assert!(user.password_hash.starts_with("$argon2id$"));
    assert_eq!(
        state.accounts.role_of(&org, &user.user_id),
        Some(flex_control_plane::domain::Role::Owner)
    );
    assert_eq!(state.orgs[&org].name, "ada@example.com");
    // The session row holds only the token's hash.
    let row = cp
        .store()
        .session_get(&hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            session.as_bytes(),
        )))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.user_id, user.user_id);
    let again = ada.get("/signup").await;
    assert_eq!(again.status, StatusCode::SEE_OTHER, "already signed in");

    // The same email cannot sign up twice (in any case).
    let mut eve = Browser::new(&app);
    eve.get("/signup").await;
    let p = eve
        .post(
            "/signup",
            &[("email", "ADA@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("already exists"), "{}", p.body);
    let p = eve
        .post(
            "/signup",
            &[("email", "eve@example.com"), ("password", "short")],
        )
        .await;
    assert!(p.body.contains("at least 10"), "{}", p.body);

    // Create a key: shown once.
    let keys = format!("/orgs/{org}/keys");
    let p = ada.get(&keys).await;
    assert!(p.body.contains("No keys yet"), "{}", p.body);
    let p = ada.post(&keys, &[("name", "ci")]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert_eq!(p.location(), keys);
    let p = ada.get(&keys).await;
    let at = p
        .body
        .find(r#"value="flex_live_"#)
        .expect("the new key is shown")
        + 7;
    let secret: String = p.body[at..]
        .chars()
        .take_while(char::is_ascii_alphanumeric_or_underscore)
        .collect();
    assert!(secret.len() > 30, "{secret}");
    assert!(p.body.contains("only time it is shown"));
    let key = cp
        .snapshot()
        .api_keys
        .iter()
        .find(|k| k.key_hash == flex_shared::keys::hash(&secret))
        .cloned()
        .expect("the key is live");
    let p = ada.get(&keys).await;
    assert!(!p.body.contains(&secret), "a reload does not show it again");
    assert!(p.body.contains("never"), "not used yet");

    // Paste a provider key: sealed, only its last four characters shown, anywhere.
    let canary = "sk-canary-0123456789-WXYZ";
    let pk = format!("/orgs/{org}/provider-keys");
    ada.get(&pk).await;
    let p = ada
        .post(&format!("{pk}/openai"), &[("secret", canary)])
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    let p = ada.get(&pk).await;
    assert!(p.body.contains("…WXYZ"), "{}", p.body);
    assert!(!p.body.contains("canary"), "{}", p.body);
    let p = ada
        .post(&format!("{pk}/gemini"), &[("secret", "two words")])
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("whitespace"));
    assert!(
        !p.body.contains("two words"),
        "an error never echoes a secret"
    );
    // Replace, then remove with a confirmation.
    ada.get(&pk).await;
    ada.post(&format!("{pk}/openai"), &[("secret", "sk-second-key-ABCD")])
        .await;
    let p = ada.get(&format!("{pk}/openai/remove")).await;
    assert!(p.body.contains("Remove the OpenAI key?"));
    let p = ada.post(&format!("{pk}/openai/remove"), &[]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert!(!cp.snapshot().provider_keys.iter().any(|p| p.org_id == org));
    ada.get(&pk).await;
    ada.post(&format!("{pk}/openai"), &[("secret", canary)])
        .await;
    for page in [
        "quickstart",
        "keys",
        "provider-keys",
        "usage",
        "billing",
        "members",
        "audit",
    ] {
        let p = ada.get(&format!("/orgs/{org}/{page}")).await;
        assert_eq!(p.status, StatusCode::OK, "{page}: {}", p.body);
        assert!(!p.body.contains(canary), "{page}");
        assert!(!p.body.contains(&secret), "{page}");
        assert!(!p.body.contains("$argon2"), "{page}");
    }
    let quick = ada.get(&format!("/orgs/{org}/quickstart")).await;
    assert!(
        quick
            .body
            .replace("&#x2f;", "/")
            .contains("http://api.test/v1"),
        "{}",
        quick.body
    );

    // Revoke, with a confirmation page first; the key leaves the snapshot.
    let revoke = format!("/orgs/{org}/keys/{}/revoke", key.key_id);
    let p = ada.get(&revoke).await;
    assert!(p.body.contains("Revoke the API key “ci”?"), "{}", p.body);
    let p = ada.post(&revoke, &[("reason", "rotated")]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert!(!cp
        .snapshot()
        .api_keys
        .iter()
        .any(|k| k.key_id == key.key_id));
    let p = ada.get(&keys).await;
    assert!(p.body.contains("revoked"));

    // Every change is an event with the user as actor; the log folds to the same state.
    let events = cp.store().read_all().await.unwrap();
    let actor = format!("user:{}", user.user_id);
    for t in [
        "UserEmailClaimed",
        "UserRegistered",
        "OrgCreated",
        "MemberAdded",
        "ApiKeyCreated",
        "ProviderKeySet",
        "ProviderKeyRemoved",
        "ApiKeyRevoked",
    ] {
        let e = events.iter().find(|e| e.event_type == t).unwrap();
        assert_eq!(e.actor, actor, "{t}");
    }
    let log = events.iter().map(|e| e.payload.clone()).collect::<String>();
    assert!(!log.contains(canary) && !log.contains(&secret) && !log.contains(PASSWORD));
    assert_eq!(*cp.state(), cp.rebuild().await.unwrap());
    let audit = ada.get(&format!("/orgs/{org}/audit")).await;
    assert!(
        audit.body.contains("ada@example.com"),
        "actor shown as the user"
    );
    assert!(audit.body.contains("revoked (reason: rotated)"));

    // Signing out ends the session for good.
    ada.get(&keys).await;
    let old = ada.cookies.clone();
    let p = ada.post("/signout", &[]).await;
    assert_eq!(p.location(), "/signin");
    ada.cookies = old;
    let p = ada.get(&keys).await;
    assert_eq!(
        p.status,
        StatusCode::SEE_OTHER,
        "the old cookie signs nobody in"
    );

    // And signing in again works, back to where the browser was going.
    let p = ada.get("/signin?next=/orgs/x/usage").await;
    assert!(p
        .body
        .contains(r#"name="next" value="&#x2f;orgs&#x2f;x&#x2f;usage""#));
    let p = ada
        .post(
            "/signin",
            &[
                ("email", "ada@example.com"),
                ("password", PASSWORD),
                ("next", "/usage"),
            ],
        )
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(p.location(), "/usage");
    let p = ada.get("/usage").await;
    assert_eq!(p.location(), format!("/orgs/{org}/usage"));
}

trait KeyChar {
    fn is_ascii_alphanumeric_or_underscore(&self) -> bool;
}

impl KeyChar for char {
    fn is_ascii_alphanumeric_or_underscore(&self) -> bool {
        self.is_ascii_alphanumeric() || *self == '_'
    }
}

async fn a_user_sees_only_their_own_orgs_even_by_url(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let app = app(&cp, cfg()).await;
    let mut ada = Browser::new(&app);
    let mut bob = Browser::new(&app);
    let ada_org = ada.sign_up("ada@example.com", PASSWORD).await;
    let bob_org = bob.sign_up("bob@example.com", PASSWORD).await;
    ada.get(&format!("/orgs/{ada_org}/keys")).await;
    ada.post(&format!("/orgs/{ada_org}/keys"), &[("name", "prod")])
        .await;
    let ada_key = cp
        .state()
        .api_keys
        .values()
        .find(|k| k.org_id == ada_org)
        .unwrap()
        .key_id
        .clone();
    // An org created by an operator, with nobody in it, is no one's either.
    let other = cp
        .create_org(&Metadata::new("admin"), "ops", None)
        .await
        .unwrap()
        .org
        .org_id;

    for org in [&ada_org, &other] {
        for page in [
            "quickstart",
            "keys",
            "provider-keys",
            "usage",
            "usage.csv",
            "billing",
            "members",
            "audit",
        ] {
            let p = bob.get(&format!("/orgs/{org}/{page}")).await;
            assert_eq!(p.status, StatusCode::NOT_FOUND, "{org}/{page}");
            assert!(!p.body.contains("prod"), "{page}");
        }
    }
    // Touching Ada's key: by her org's URL, or by slipping it into Bob's own org's URL.
    bob.get(&format!("/orgs/{bob_org}/keys")).await;
    for url in [
        format!("/orgs/{ada_org}/keys/{ada_key}/revoke"),
        format!("/orgs/{bob_org}/keys/{ada_key}/revoke"),
    ] {
        assert_eq!(bob.get(&url).await.status, StatusCode::NOT_FOUND, "{url}");
        bob.get(&format!("/orgs/{bob_org}/keys")).await;
        let p = bob.post(&url, &[]).await;
        assert_eq!(p.status, StatusCode::NOT_FOUND, "{url}");
    }
    bob.get(&format!("/orgs/{bob_org}/keys")).await;
    for (url, fields) in [
        (format!("/orgs/{ada_org}/keys"), vec![("name", "sneaky")]),
        (
            format!("/orgs/{ada_org}/provider-keys/openai"),
            vec![("secret", "sk-evil-0000")],
        ),
        (
            format!("/orgs/{ada_org}/provider-keys/openai/remove"),
            vec![],
        ),
        (
            format!("/orgs/{ada_org}/invites"),
            vec![("email", "bob@example.com")],
        ),
    ] {
        let p = bob.post(&url, &fields).await;
        assert_eq!(p.status, StatusCode::NOT_FOUND, "{url}");
    }
    assert!(cp.state().api_keys[&ada_key].revoked_at.is_none());
    assert_eq!(
        cp.state()
            .api_keys
            .values()
            .filter(|k| k.org_id == ada_org)
            .count(),
        1
    );
    assert!(cp.state().provider_keys.is_empty());
    // Bob's pages list only his org.
    let p = bob.get(&format!("/orgs/{bob_org}/keys")).await;
    assert!(!p.body.contains(&ada_org) && !p.body.contains("ada@example.com"));
    // Unknown providers and paths are not found either.
    assert_eq!(
        bob.get(&format!("/orgs/{bob_org}/provider-keys/azure/remove"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(bob.get("/nope").await.status, StatusCode::NOT_FOUND);
}

async fn forms_without_their_csrf_token_or_from_another_site_are_refused(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let app = app(&cp, cfg()).await;
    let mut ada = Browser::new(&app);
    let org = ada.sign_up("ada@example.com", PASSWORD).await;
    let keys = format!("/orgs/{org}/keys");
    let page = ada.get(&keys).await;

    // Headers every page carries.
    let h = &page.headers;
    assert_eq!(
        h[header::CONTENT_SECURITY_POLICY],
        dashboard::CONTENT_SECURITY_POLICY
    );
    assert!(dashboard::CONTENT_SECURITY_POLICY.contains("script-src 'self'"));
    assert!(!dashboard::CONTENT_SECURITY_POLICY.contains("unsafe"));
    assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
    assert_eq!(h[header::CACHE_CONTROL], "no-store");
    // No inline script or style anywhere (the CSP would block it).
    for page in ["quickstart", "keys", "usage", "members"] {
        let p = ada.get(&format!("/orgs/{org}/{page}")).await;
        assert!(
            !p.body.contains("<script>") && !p.body.contains("style="),
            "{page}"
        );
        assert!(p.body.contains(r#"<script src="/static/app.js" defer>"#));
    }
    let css = ada.get("/static/style.css").await;
    assert_eq!(css.status, StatusCode::OK);
    assert!(css.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/css"));

    ada.get(&keys).await;
    let none = ada.post_raw(&keys, &[("name", "no-token")]).await;
    assert_eq!(none.status, StatusCode::FORBIDDEN, "{}", none.body);
    assert!(none.body.contains("reload the page"));
    let wrong = ada
        .post_raw(&keys, &[("csrf", &"0".repeat(64)), ("name", "wrong-token")])
        .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    // Another user's token does not work with this session either.
    let mut bob = Browser::new(&app);
    let bob_org = bob.sign_up("bob@example.com", PASSWORD).await;
    bob.get(&format!("/orgs/{bob_org}/keys")).await;
    let bobs = csrf_in(&bob.last).unwrap();
    let p = ada
        .post_raw(&keys, &[("csrf", &bobs), ("name", "bobs-token")])
        .await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
    // The right token from another site's page.
    ada.get(&keys).await;
    ada.origin = Some("https://evil.example".into());
    let p = ada.post(&keys, &[("name", "cross-site")]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
    // From this site it works (the configured URL, or the host the browser addressed).
    for origin in ["http://dash.test", "http://DASH.test"] {
        ada.origin = Some(origin.into());
        ada.get(&keys).await;
        let p = ada.post(&keys, &[("name", "same-site")]).await;
        assert_eq!(p.status, StatusCode::SEE_OTHER, "{origin}: {}", p.body);
    }
    assert_eq!(
        cp.state()
            .api_keys
            .values()
            .filter(|k| k.org_id == org)
            .count(),
        2,
        "only the two same-site posts created keys"
    );
    // Signing out and signing in need their token too (no login CSRF).
    let mut fresh = Browser::new(&app);
    let p = fresh
        .post_raw(
            "/signin",
            &[("email", "ada@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
    let p = ada.post_raw("/signout", &[]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);

    // Cookies: HttpOnly, SameSite=Lax; over https also Secure with the __Host- prefix.
    let mut plain = Browser::new(&app);
    let p = plain.get("/signin").await;
    let c = p.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(
        c.starts_with("flex_csrf=") && c.contains("HttpOnly") && c.contains("SameSite=Lax"),
        "{c}"
    );
    assert!(!c.contains("Secure"), "{c}");
    let tls = app_https(&cp).await;
    let mut carol = Browser::new(&tls);
    carol.get("/signup").await;
    let p = carol
        .post(
            "/signup",
            &[("email", "carol@example.com"), ("password", PASSWORD)],
        )
        .await;
    let c = p.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(c.starts_with("__Host-flex_session="), "{c}");
    assert!(
        c.contains("; Secure")
            && c.contains("HttpOnly")
            && c.contains("SameSite=Lax")
            && c.contains("Path=/"),
        "{c}"
    );
    assert!(p.headers.contains_key(header::STRICT_TRANSPORT_SECURITY));
}

async fn app_https(cp: &Arc<ControlPlane>) -> Router {
    app(cp, DashboardConfig::new("https://dash.test")).await
}

async fn invites_add_members_and_owners_remove_them(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let app = app(&cp, cfg()).await;
    let mut ada = Browser::new(&app);
    let org = ada.sign_up("ada@example.com", PASSWORD).await;
    let members = format!("/orgs/{org}/members");
    ada.get(&members).await;
    let p = ada
        .post(
            &format!("/orgs/{org}/invites"),
            &[("email", "Bob@Example.com"), ("role", "member")],
        )
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    let p = ada.get(&members).await;
    // minijinja escapes `/` in attribute values.
    let body = p.body.replace("&#x2f;", "/");
    let at = body
        .find("http://dash.test/invite/")
        .expect("the link is shown");
    let link: String = body[at..].chars().take_while(|c| *c != '"').collect();
    let path = link.trim_start_matches("http://dash.test").to_string();
    assert!(
        !ada.get(&members)
            .await
            .body
            .replace("&#x2f;", "/")
            .contains(&link),
        "shown once"
    );

    // Signed out, the link says what it is and where to go; it works only for bob.
    let mut bob = Browser::new(&app);
    let p = bob.get(&path).await;
    assert!(
        p.body.contains("Join ada@example.com") && p.body.contains("b***@example.com"),
        "{}",
        p.body
    );
    let mut eve = Browser::new(&app);
    eve.sign_up("eve@example.com", PASSWORD).await;
    eve.get(&path).await;
    let p = eve.post(&path, &[]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("another email address"), "{}", p.body);
    // A guessed secret for the right invite id is refused like any bad link.
    let (id, _) = path.trim_start_matches("/invite/").split_once('.').unwrap();
    let guess = format!("/invite/{id}.{}", "0".repeat(64));
    eve.get(&guess).await;
    assert!(eve.post(&guess, &[]).await.body.contains("not valid"));

    let bob_own = bob.sign_up("bob@example.com", PASSWORD).await;
    bob.get(&path).await;
    let p = bob.post(&path, &[]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert_eq!(p.location(), format!("/orgs/{org}/quickstart"));
    let p = bob.get(&format!("/orgs/{org}/keys")).await;
    assert_eq!(p.status, StatusCode::OK, "bob is a member now");
    assert!(p.body.contains(&bob_own), "both orgs are in bob's switcher");
    // Used up.
    bob.get(&path).await;
    assert_eq!(bob.post(&path, &[]).await.status, StatusCode::BAD_REQUEST);
    // A member cannot invite or remove others.
    bob.get(&format!("/orgs/{org}/members")).await;
    let p = bob
        .post(
            &format!("/orgs/{org}/invites"),
            &[("email", "x@example.com")],
        )
        .await;
    assert!(p.body.contains("only an owner"), "{}", p.body);
    let ada_id = cp
        .state()
        .accounts
        .user_by_email("ada@example.com")
        .unwrap()
        .user_id
        .clone();
    let bob_id = cp
        .state()
        .accounts
        .user_by_email("bob@example.com")
        .unwrap()
        .user_id
        .clone();
    bob.get(&format!("/orgs/{org}/members")).await;
    let p = bob
        .post(&format!("/orgs/{org}/members/{ada_id}/remove"), &[])
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    // The owner cannot leave her only org as its only owner; she removes bob.
    ada.get(&members).await;
    let p = ada
        .post(&format!("/orgs/{org}/members/{ada_id}/remove"), &[])
        .await;
    assert!(p.body.contains("only owner"), "{}", p.body);
    let confirm = ada
        .get(&format!("/orgs/{org}/members/{bob_id}/remove"))
        .await;
    assert!(
        confirm.body.contains("Remove bob@example.com"),
        "{}",
        confirm.body
    );
    let p = ada
        .post(&format!("/orgs/{org}/members/{bob_id}/remove"), &[])
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(
        bob.get(&format!("/orgs/{org}/keys")).await.status,
        StatusCode::NOT_FOUND,
        "removed: the org is gone for bob at once"
    );
    // An invite can be revoked before it is used.
    ada.get(&members).await;
    ada.post(
        &format!("/orgs/{org}/invites"),
        &[("email", "dan@example.com")],
    )
    .await;
    let inv = cp
        .state()
        .accounts
        .invites_of(&org)
        .find(|i| i.email == "dan@example.com")
        .unwrap()
        .invite_id
        .clone();
    ada.get(&members).await;
    let p = ada
        .post(&format!("/orgs/{org}/invites/{inv}/revoke"), &[])
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert!(ada.get(&members).await.body.contains("revoked"));
    let audit = ada.get(&format!("/orgs/{org}/audit")).await;
    for s in ["accepted invite", "removed from org", "invite", "revoked"] {
        assert!(audit.body.contains(s), "{s}");
    }
    assert!(!audit.body.contains(id.trim_start_matches("invite_")) || !audit.body.contains(&path));
    assert_eq!(*cp.state(), cp.rebuild().await.unwrap());
}

fn usage(
    request_id: &str,
    org_id: &str,
    key_id: &str,
    tier: &str,
    cost: i64,
    standard: i64,
) -> UsageEvent {
    UsageEvent {
        schema_version: 1,
        request_id: request_id.into(),
        org_id: org_id.into(),
        key_id: key_id.into(),
        model: "gpt-5.5".into(),
        provider: "openai".into(),
        caller_format: "responses".into(),
        start_within: "00h-00m-30s".into(),
        served_tier: tier.into(),
        reason: "flex_started".into(),
        input_tokens: 120,
        output_tokens: 30,
        status: 200,
        outcome: "ok".into(),
        cost_micros: cost,
        standard_cost_micros: standard,
        received_at: flex_control_plane::timefmt::format(flex_control_plane::timefmt::now()),
        ..UsageEvent::default()
    }
}

async fn usage_billing_and_audit_pages_show_the_org_ledger(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let app = app(&cp, cfg()).await;
    let mut ada = Browser::new(&app);
    let org = ada.sign_up("ada@example.com", PASSWORD).await;
    ada.get(&format!("/orgs/{org}/keys")).await;
    ada.post(&format!("/orgs/{org}/keys"), &[("name", "prod")])
        .await;
    let key = cp
        .state()
        .api_keys
        .values()
        .find(|k| k.org_id == org)
        .unwrap()
        .key_id
        .clone();
    cp.record_usage(&[
        usage("r1", &org, &key, "flex", 1_250, 2_500),
        usage("r2", &org, &key, "flex", 1_250, 2_500),
        usage("r3", &org, &key, "standard", 2_500, 2_500),
        usage("other", "org_someone_else", "key_x", "flex", 9, 99),
    ])
    .await
    .unwrap();
    let p = ada.get(&format!("/orgs/{org}/usage")).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    assert!(p.body.contains("<svg class=\"chart\""), "inline chart");
    // 3 requests, spend $0.005, standard $0.0075, saved $0.0025, 66% on flex.
    for s in [
        "$0.005",
        "$0.0075",
        "$0.0025",
        "66% on flex",
        "tier-flex",
        "flex_started",
        "prod",
    ] {
        assert!(p.body.contains(s), "{s}: {}", p.body);
    }
    assert!(!p.body.contains("$0.000099"), "another org's usage");
    let keys = ada.get(&format!("/orgs/{org}/keys")).await;
    assert!(
        !keys.body.contains(">never<"),
        "last used comes from the ledger"
    );
    let csv = ada.get(&format!("/orgs/{org}/usage.csv?days=7")).await;
    assert_eq!(csv.status, StatusCode::OK);
    assert!(csv.headers[header::CONTENT_DISPOSITION]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    let lines: Vec<&str> = csv.body.lines().collect();
    assert_eq!(lines[0], "date,model,served_tier,requests,flex_requests,input_tokens,output_tokens,cost_usd,standard_cost_usd,savings_usd");
    assert_eq!(lines.len(), 3, "{}", csv.body);
    assert!(
        lines[1].ends_with(",gpt-5.5,flex,2,2,240,60,0.002500,0.005000,0.002500"),
        "{}",
        lines[1]
    );

    // Billing: past due says what it blocks and how to fix it.
    let p = ada.get(&format!("/orgs/{org}/billing")).await;
    assert!(
        p.body.contains("Everything is paid up") && p.body.contains("10%"),
        "{}",
        p.body
    );
    cp.set_billing_status(&Metadata::new("admin"), &org, "past_due")
        .await
        .unwrap();
    let p = ada.get(&format!("/orgs/{org}/billing")).await;
    assert!(
        p.body.contains("402 payment_required") && p.body.contains("To resolve it"),
        "{}",
        p.body
    );
    let audit = ada.get(&format!("/orgs/{org}/audit")).await;
    assert!(
        audit.body.contains("operator (flex admin)"),
        "{}",
        audit.body
    );
}

async fn sign_in_is_rate_limited_and_disabled_users_are_signed_out(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let limits = Limits {
        sign_in_per_address: 6,
        sign_in_failures_per_account: 3,
        sign_up_per_address: 3,
        window: Duration::from_secs(600),
    };
    let app = app(&cp, DashboardConfig { limits, ..cfg() }).await;
    let mut ada = Browser::new(&app);
    ada.sign_up("ada@example.com", PASSWORD).await;
    let mut mallory = Browser::new(&app);
    mallory.get("/signin").await;
    for _ in 0..3 {
        let p = mallory
            .post(
                "/signin",
                &[
                    ("email", "ada@example.com"),
                    ("password", "guess-guess-guess"),
                ],
            )
            .await;
        assert_eq!(p.status, StatusCode::UNAUTHORIZED);
        assert!(p.body.contains("email or the password is wrong"));
    }
    // The account is locked now, even with the right password.
    let p = mallory
        .post(
            "/signin",
            &[("email", "ada@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS, "{}", p.body);
    assert!(p.body.contains("Try again in"), "{}", p.body);
    // Unknown accounts fail the same way, until the address's own limit.
    let p = mallory
        .post(
            "/signin",
            &[("email", "nobody@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    let p = mallory
        .post(
            "/signin",
            &[("email", "nobody2@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    let p = mallory
        .post(
            "/signin",
            &[("email", "nobody3@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(
        p.status,
        StatusCode::UNAUTHORIZED,
        "the 6th counted attempt"
    );
    let p = mallory
        .post(
            "/signin",
            &[("email", "nobody4@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(
        p.status,
        StatusCode::TOO_MANY_REQUESTS,
        "6 attempts from one address"
    );
    // Sign-ups per address.
    let mut spam = Browser::new(&app);
    spam.get("/signup").await;
    for i in 0..2 {
        let email = format!("s{i}@example.com");
        let p = spam
            .post("/signup", &[("email", &email), ("password", PASSWORD)])
            .await;
        assert_eq!(p.status, StatusCode::SEE_OTHER);
        spam.cookies.clear();
        spam.get("/signup").await;
    }
    let p = spam
        .post(
            "/signup",
            &[("email", "s9@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS);

    // An operator disables Ada: her session stops working at once, and she cannot sign in.
    let user = cp.find_user("ada@example.com").unwrap();
    assert_eq!(ada.get("/keys").await.status, StatusCode::SEE_OTHER);
    let u = cp
        .disable_user(
            &Metadata::new("admin"),
            "ada@example.com",
            "left the company",
        )
        .await
        .unwrap();
    assert_eq!(u.status, "disabled");
    assert_eq!(ada.get("/keys").await.location(), "/signin?next=/keys");
    let check = cp
        .check_sign_in("ada@example.com", &SecretString::from(PASSWORD.to_string()))
        .await
        .unwrap();
    assert_eq!(check, flex_control_plane::accounts::SignIn::Disabled);
    cp.enable_user(&Metadata::new("admin"), &user.user_id)
        .await
        .unwrap();
    let check = cp
        .check_sign_in("ADA@example.com", &SecretString::from(PASSWORD.to_string()))
        .await
        .unwrap();
    assert_eq!(
        check,
        flex_control_plane::accounts::SignIn::Ok(user.user_id.clone())
    );
    let wrong = cp
        .check_sign_in(
            "ada@example.com",
            &SecretString::from("nope-nope-nope".to_string()),
        )
        .await
        .unwrap();
    assert_eq!(wrong, flex_control_plane::accounts::SignIn::Invalid);
    // Operators create users that own a new org, or join one.
    let made = cp
        .create_user(
            &Metadata::new("admin"),
            "ops@example.com",
            &SecretString::from(PASSWORD.to_string()),
            None,
        )
        .await
        .unwrap();
    let joined = cp
        .create_user(
            &Metadata::new("admin"),
            "ops2@example.com",
            &SecretString::from(PASSWORD.to_string()),
            Some((&made.org_id, flex_control_plane::domain::Role::Member)),
        )
        .await
        .unwrap();
    assert_eq!(joined.org_id, made.org_id);
    let users = cp.list_users().await.unwrap();
    assert_eq!(users.len(), 5, "ada, two sign-ups, two by the operator");
    let ops2 = users
        .iter()
        .find(|u| u.email == "ops2@example.com")
        .unwrap();
    assert_eq!(ops2.orgs[0].role, "member");
    let _ = SecretString::from(String::new()).expose_secret().len();
    assert_eq!(*cp.state(), cp.rebuild().await.unwrap());
}
