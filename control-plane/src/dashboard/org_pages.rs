//! An org's API keys, provider keys and members. Every change is the same control-plane
//! command `flex admin` runs, with the signed-in user as the actor; every id in a URL is checked
//! to belong to the org in the URL, and the org to the viewer.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect};
use axum::Form;
use flex_shared::catalog::Provider;
use minijinja::context;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::session::Viewer;
use super::views::{when, Chrome};
use super::{Dash, Dashboard, OrgCtx, PageError, PageResult};
use crate::accounts::user_actor;
use crate::domain::{self, Role};
use crate::store::Metadata;
use crate::timefmt;

fn meta(viewer: &Viewer) -> Metadata {
    Metadata::new(user_actor(&viewer.user.user_id))
}

fn back(org: &OrgCtx, page: &str) -> PageResult {
    Ok(Redirect::to(&format!("/orgs/{}/{page}", org.org_id)).into_response())
}

/// A provider's display name.
pub(crate) fn provider_name(p: Provider) -> &'static str {
    match p {
        Provider::OpenAi => "OpenAI",
        Provider::Anthropic => "Anthropic",
        Provider::Gemini => "Google Gemini",
    }
}

/// Renders `page` as an org page, taking what the last POST left for this session.
/// Which template a page renders, its nav entry and its title.
struct Spec<'a> {
    template: &'a str,
    nav: &'static str,
    title: &'a str,
}

fn org_page(
    dash: &Dashboard,
    viewer: &Viewer,
    org: &OrgCtx,
    spec: Spec<'_>,
    error: Option<String>,
    ctx: minijinja::Value,
) -> PageResult {
    let Spec {
        template,
        nav,
        title,
    } = spec;
    let flash = dash.flash.take(&viewer.csrf);
    let secret = flash.secret.map(|s| {
        context! { label => s.label, value => s.value.expose_secret().to_string() }
    });
    dash.page(
        template,
        Chrome {
            viewer,
            org: Some(org),
            nav,
            title: format!("{title} · {}", org.name),
            notice: flash.notice,
            error,
        },
        context! { secret, ..ctx },
    )
}

#[derive(Debug, Serialize)]
struct KeyRow {
    key_id: String,
    name: String,
    hint: String,
    status: &'static str,
    created: String,
    last_used: String,
    revoked: String,
}

async fn render_keys(
    dash: &Dashboard,
    viewer: &Viewer,
    org: &OrgCtx,
    error: Option<String>,
) -> PageResult {
    let state = dash.cp.state();
    let now = timefmt::now();
    let mut keys: Vec<_> = state
        .api_keys
        .values()
        .filter(|k| k.org_id == org.org_id)
        .cloned()
        .collect();
    let ids: Vec<String> = keys.iter().map(|k| k.key_id.clone()).collect();
    let last_used: HashMap<String, String> = dash
        .cp
        .store()
        .keys_last_used(&org.org_id, &ids)
        .await?
        .into_iter()
        .map(|(id, t)| (id, when(t)))
        .collect();
    // Active keys first, newest first within each group.
    keys.sort_by(|a, b| {
        (
            a.status_at(now) != "active",
            std::cmp::Reverse(a.created_at),
        )
            .cmp(&(
                b.status_at(now) != "active",
                std::cmp::Reverse(b.created_at),
            ))
    });
    let rows: Vec<KeyRow> = keys
        .iter()
        .map(|k| KeyRow {
            key_id: k.key_id.clone(),
            name: k.name.clone(),
            hint: k.hint.clone(),
            status: k.status_at(now),
            created: when(k.created_at),
            last_used: last_used.get(&k.key_id).cloned().unwrap_or_default(),
            revoked: k.revoked_at.map(when).unwrap_or_default(),
        })
        .collect();
    org_page(
        dash,
        viewer,
        org,
        Spec {
            template: "keys.html",
            nav: "keys",
            title: "API keys",
        },
        error,
        context! { keys => rows, suspended => state.orgs.get(&org.org_id).is_some_and(|o| o.status == domain::OrgStatus::Suspended) },
    )
}

pub(crate) async fn keys_page(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(org): Path<String>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    render_keys(&dash, &viewer, &org, None).await
}

#[derive(Deserialize)]
pub(crate) struct NewKey {
    #[serde(default)]
    name: String,
}

pub(crate) async fn key_create(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(org): Path<String>,
    Form(f): Form<NewKey>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    match dash
        .cp
        .create_api_key(&meta(&viewer), &org.org_id, &f.name, None, None)
        .await
    {
        Ok(created) => {
            if let Some(secret) = created.secret {
                dash.flash.secret(
                    &viewer.csrf,
                    format!("API key “{}”", created.key.name),
                    secret,
                );
            }
            dash.flash.notice(
                &viewer.csrf,
                format!("Created the API key “{}”.", created.key.name),
            );
            back(&org, "keys")
        }
        Err(e) => match PageError::from(e) {
            PageError::Invalid(m) => render_keys(&dash, &viewer, &org, Some(m)).await,
            other => Err(other),
        },
    }
}

/// The org's key `key_id`, or not found (also for another org's key).
fn key_of(
    dash: &Dashboard,
    org: &OrgCtx,
    key_id: &str,
) -> Result<crate::projection::ApiKeyView, PageError> {
    dash.cp
        .state()
        .api_keys
        .get(key_id)
        .filter(|k| k.org_id == org.org_id)
        .cloned()
        .ok_or(PageError::NotFound)
}

pub(crate) async fn key_revoke_page(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path((org, key)): Path<(String, String)>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let key = key_of(&dash, &org, &key)?;
    if key.revoked_at.is_some() {
        dash.flash.notice(
            &viewer.csrf,
            format!("The key “{}” is already revoked.", key.name),
        );
        return back(&org, "keys");
    }
    org_page(
        &dash,
        &viewer,
        &org,
        Spec {
            template: "confirm.html",
            nav: "keys",
            title: "Revoke API key",
        },
        None,
        context! {
            heading => format!("Revoke the API key “{}”?", key.name),
            message => format!("Requests with {} are refused (401) within a second, everywhere. This cannot be undone: a revoked key never works again.", key.hint),
            action => format!("/orgs/{}/keys/{}/revoke", org.org_id, key.key_id),
            button => "Revoke key",
            reason => true,
            cancel => format!("/orgs/{}/keys", org.org_id),
        },
    )
}

#[derive(Deserialize)]
pub(crate) struct Reason {
    #[serde(default)]
    reason: String,
}

pub(crate) async fn key_revoke(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path((org, key)): Path<(String, String)>,
    Form(f): Form<Reason>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let key = key_of(&dash, &org, &key)?;
    let reason = if f.reason.trim().is_empty() {
        format!("revoked in the dashboard by {}", viewer.user.email)
    } else {
        f.reason.trim().to_string()
    };
    dash.cp
        .revoke_api_key(&meta(&viewer), &key.key_id, &reason)
        .await?;
    dash.flash
        .notice(&viewer.csrf, format!("Revoked the API key “{}”.", key.name));
    back(&org, "keys")
}

#[derive(Debug, Serialize)]
struct ProviderRow {
    id: &'static str,
    name: &'static str,
    set: bool,
    last4: String,
    updated: String,
}

pub(crate) async fn provider_keys_page(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(org): Path<String>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    render_provider_keys(&dash, &viewer, &org, None)
}

fn render_provider_keys(
    dash: &Dashboard,
    viewer: &Viewer,
    org: &OrgCtx,
    error: Option<String>,
) -> PageResult {
    let state = dash.cp.state();
    let rows: Vec<ProviderRow> = Provider::ALL
        .iter()
        .map(|p| {
            let stored = state
                .provider_keys
                .get(&(org.org_id.clone(), p.as_str().to_string()))
                .filter(|k| k.sealed.is_some());
            ProviderRow {
                id: p.as_str(),
                name: provider_name(*p),
                set: stored.is_some(),
                // The last four characters, never more: the secret itself is never rendered.
                last4: stored.map(|k| k.last4.clone()).unwrap_or_default(),
                updated: stored.map(|k| when(k.updated_at)).unwrap_or_default(),
            }
        })
        .collect();
    org_page(
        dash,
        viewer,
        org,
        Spec {
            template: "provider_keys.html",
            nav: "provider-keys",
            title: "Provider keys",
        },
        error,
        context! { providers => rows },
    )
}

fn provider_of(p: &str) -> Result<Provider, PageError> {
    Provider::parse(p).ok_or(PageError::NotFound)
}

#[derive(Deserialize)]
pub(crate) struct ProviderSecret {
    #[serde(default)]
    secret: String,
}

pub(crate) async fn provider_key_set(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path((org, provider)): Path<(String, String)>,
    Form(f): Form<ProviderSecret>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let provider = provider_of(&provider)?;
    let secret = SecretString::from(f.secret);
    match dash
        .cp
        .set_provider_key(&meta(&viewer), &org.org_id, provider.as_str(), &secret)
        .await
    {
        Ok(saved) => {
            dash.flash.notice(
                &viewer.csrf,
                format!(
                    "Saved the {} key (…{}). It is encrypted at rest; the proxies use it within a second.",
                    provider_name(provider),
                    saved.last4
                ),
            );
            back(&org, "provider-keys")
        }
        Err(e) => match PageError::from(e) {
            PageError::Invalid(m) => render_provider_keys(&dash, &viewer, &org, Some(m)),
            other => Err(other),
        },
    }
}

pub(crate) async fn provider_key_remove_page(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path((org, provider)): Path<(String, String)>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let provider = provider_of(&provider)?;
    org_page(
        &dash,
        &viewer,
        &org,
        Spec {
            template: "confirm.html",
            nav: "provider-keys",
            title: "Remove provider key",
        },
        None,
        context! {
            heading => format!("Remove the {} key?", provider_name(provider)),
            message => format!("Requests to {} models then fail with no_byok_key until you add a key again.", provider_name(provider)),
            action => format!("/orgs/{}/provider-keys/{}/remove", org.org_id, provider.as_str()),
            button => "Remove key",
            reason => false,
            cancel => format!("/orgs/{}/provider-keys", org.org_id),
        },
    )
}

pub(crate) async fn provider_key_remove(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path((org, provider)): Path<(String, String)>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let provider = provider_of(&provider)?;
    dash.cp
        .remove_provider_key(&meta(&viewer), &org.org_id, provider.as_str())
        .await?;
    dash.flash.notice(
        &viewer.csrf,
        format!("Removed the {} key.", provider_name(provider)),
    );
    back(&org, "provider-keys")
}

#[derive(Debug, Serialize)]
struct MemberRow {
    user_id: String,
    email: String,
    role: &'static str,
    added: String,
    you: bool,
}

#[derive(Debug, Serialize)]
struct InviteRow {
    invite_id: String,
    email: String,
    role: &'static str,
    status: &'static str,
    expires: String,
}

fn render_members(
    dash: &Dashboard,
    viewer: &Viewer,
    org: &OrgCtx,
    error: Option<String>,
) -> PageResult {
    let state = dash.cp.state();
    let now = timefmt::now();
    let members: Vec<MemberRow> = state
        .accounts
        .members_of(&org.org_id)
        .map(|m| MemberRow {
            user_id: m.user_id.clone(),
            email: state
                .accounts
                .users
                .get(&m.user_id)
                .map(|u| u.email.clone())
                .unwrap_or_default(),
            role: m.role.as_str(),
            added: when(m.added_at),
            you: m.user_id == viewer.user.user_id,
        })
        .collect();
    let invites: Vec<InviteRow> = state
        .accounts
        .invites_of(&org.org_id)
        .map(|i| InviteRow {
            invite_id: i.invite_id.clone(),
            email: i.email.clone(),
            role: i.role.as_str(),
            status: i.status_at(now),
            expires: when(i.expires_at),
        })
        .collect();
    org_page(
        dash,
        viewer,
        org,
        Spec {
            template: "members.html",
            nav: "members",
            title: "Members",
        },
        error,
        context! { members, invites },
    )
}

pub(crate) async fn members_page(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(org): Path<String>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    render_members(&dash, &viewer, &org, None)
}

#[derive(Deserialize)]
pub(crate) struct NewInvite {
    #[serde(default)]
    email: String,
    #[serde(default)]
    role: String,
}

pub(crate) async fn invite_create(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(org): Path<String>,
    Form(f): Form<NewInvite>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let result = match Role::parse(&f.role) {
        Ok(role) => {
            dash.cp
                .create_invite(
                    &meta(&viewer),
                    &org.org_id,
                    &viewer.user.user_id,
                    &f.email,
                    role,
                )
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(created) => {
            let link = format!(
                "{}/invite/{}",
                dash.cfg.public_url,
                created.link_token.expose_secret()
            );
            dash.flash.secret(
                &viewer.csrf,
                format!("Invite link for {}", created.invite.email),
                SecretString::from(link),
            );
            dash.flash.notice(
                &viewer.csrf,
                format!(
                    "Invited {} as {}. Send them the link below; it works once, for that email, for {} days.",
                    created.invite.email,
                    created.invite.role.as_str(),
                    domain::accounts::INVITE_VALID_DAYS
                ),
            );
            back(&org, "members")
        }
        Err(e) => match PageError::from(e) {
            PageError::Invalid(m) => render_members(&dash, &viewer, &org, Some(m)),
            other => Err(other),
        },
    }
}

pub(crate) async fn invite_revoke(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path((org, invite)): Path<(String, String)>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    match dash
        .cp
        .revoke_invite(&meta(&viewer), &org.org_id, &viewer.user.user_id, &invite)
        .await
    {
        Ok(()) => {
            dash.flash.notice(&viewer.csrf, "Revoked the invite.");
            back(&org, "members")
        }
        Err(e) => match PageError::from(e) {
            PageError::Invalid(m) => render_members(&dash, &viewer, &org, Some(m)),
            other => Err(other),
        },
    }
}

fn member_email(dash: &Dashboard, org: &OrgCtx, user_id: &str) -> Result<String, PageError> {
    let state = dash.cp.state();
    state
        .accounts
        .role_of(&org.org_id, user_id)
        .ok_or(PageError::NotFound)?;
    Ok(state
        .accounts
        .users
        .get(user_id)
        .map(|u| u.email.clone())
        .unwrap_or_default())
}

pub(crate) async fn member_remove_page(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path((org, user)): Path<(String, String)>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let email = member_email(&dash, &org, &user)?;
    let leaving = user == viewer.user.user_id;
    org_page(
        &dash,
        &viewer,
        &org,
        Spec {
            template: "confirm.html",
            nav: "members",
            title: "Remove member",
        },
        None,
        context! {
            heading => if leaving { format!("Leave {}?", org.name) } else { format!("Remove {email} from {}?", org.name) },
            message => if leaving { "You lose access to this organization's keys, usage and billing.".to_string() } else { format!("{email} loses access to this organization at once. API keys they created keep working until you revoke them.") },
            action => format!("/orgs/{}/members/{}/remove", org.org_id, user),
            button => if leaving { "Leave" } else { "Remove member" },
            reason => false,
            cancel => format!("/orgs/{}/members", org.org_id),
        },
    )
}

pub(crate) async fn member_remove(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path((org, user)): Path<(String, String)>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let email = member_email(&dash, &org, &user)?;
    match dash
        .cp
        .remove_member(
            &meta(&viewer),
            &org.org_id,
            Some(&viewer.user.user_id),
            &user,
        )
        .await
    {
        Ok(()) if user == viewer.user.user_id => {
            dash.flash
                .notice(&viewer.csrf, format!("You left {}.", org.name));
            Ok(Redirect::to("/").into_response())
        }
        Ok(()) => {
            dash.flash.notice(
                &viewer.csrf,
                format!("Removed {email} from the organization."),
            );
            back(&org, "members")
        }
        Err(e) => match PageError::from(e) {
            PageError::Invalid(m) => render_members(&dash, &viewer, &org, Some(m)),
            other => Err(other),
        },
    }
}
