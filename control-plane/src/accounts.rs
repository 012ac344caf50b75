//! Dashboard accounts as control-plane commands: sign-up (a user, the claim of their email and
//! their own org, appended together), operator-created users, sign-in checks, disabling,
//! invites and members. Every change is an event on the same log as the rest, with the user (or
//! the operator) as the actor, so the audit, the projection and a rebuild see it.
//!
//! Passwords are hashed with argon2id (19 MiB, 2 passes: OWASP's minimum) off the runtime's
//! threads, at most [`HASHING_AT_ONCE`] at a time; they live in a [`SecretString`] until then and
//! never reach a log line, an error or an event (only the PHC hash does, and the audit elides it).

use std::sync::OnceLock;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use flex_shared::proto::admin as apb;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::domain::accounts::{
    email_taken, invite_token_hash, new_user_id, not_found_user, validate_password,
};
use crate::domain::{
    self, normalize_email, user_email_stream, user_stream, EmailClaimAggregate, Event,
    OrgAggregate, Role, UserAggregate,
};
use crate::error::{Error, Result};
use crate::projection::{InviteView, State, UserView};
use crate::store::{Metadata, StreamAppend};
use crate::{timefmt, ControlPlane};

/// Password hashes computed at the same time (each takes 19 MiB and a core for a few ms).
pub const HASHING_AT_ONCE: usize = 2;
static HASHING: Semaphore = Semaphore::const_new(HASHING_AT_ONCE);

/// The actor recorded for a change a dashboard user makes.
pub fn user_actor(user_id: &str) -> String {
    format!("user:{user_id}")
}

fn argon2() -> Result<Argon2<'static>> {
    let params = Params::new(19 * 1024, 2, 1, None)
        .map_err(|e| Error::Internal(format!("argon2 parameters: {e}")))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Runs `f` on a blocking thread, holding one of the hashing permits.
async fn hashing<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let _permit = HASHING
        .acquire()
        .await
        .map_err(|_| Error::Internal("password hashing is shut down".into()))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("password hashing task: {e}")))?
}

/// The argon2id PHC string of `password`.
pub async fn hash_password(password: &SecretString) -> Result<String> {
    let password = password.clone();
    hashing(move || {
        let salt = SaltString::generate(&mut OsRng);
        argon2()?
            .hash_password(password.expose_secret().as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| Error::Internal(format!("hashing a password failed: {e}")))
    })
    .await
}

/// A hash of a password nobody knows, verified against when the email has no account, so an
/// unknown email costs as long as a wrong password.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        argon2()
            .ok()
            .and_then(|a| {
                a.hash_password(uuid::Uuid::new_v4().as_bytes(), &salt)
                    .ok()
                    .map(|h| h.to_string())
            })
            .unwrap_or_default()
    })
}

/// Whether `password` matches the PHC string `hash` (false for a malformed hash).
pub async fn verify_password(password: &SecretString, hash: &str) -> Result<bool> {
    let password = password.clone();
    let hash = hash.to_string();
    hashing(move || {
        let hash = if hash.is_empty() {
            dummy_hash().to_string()
        } else {
            hash
        };
        let Ok(parsed) = PasswordHash::new(&hash) else {
            return Ok(false);
        };
        Ok(argon2()?
            .verify_password(password.expose_secret().as_bytes(), &parsed)
            .is_ok())
    })
    .await
}

/// What a sign-in attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignIn {
    /// The password matches an enabled account.
    Ok(String),
    /// Unknown email or wrong password (not told apart).
    Invalid,
    /// The password matches, but an operator disabled the account.
    Disabled,
}

/// A new account and the org it owns (or joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub user_id: String,
    pub org_id: String,
}

/// A new invite; `link_token` (`invite_id.secret`) is in this result only.
#[derive(Clone)]
pub struct CreatedInvite {
    pub invite: InviteView,
    pub link_token: SecretString,
}

impl std::fmt::Debug for CreatedInvite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedInvite")
            .field("invite", &self.invite)
            .finish_non_exhaustive()
    }
}

/// The admin API's view of a user.
pub fn user_admin(state: &State, u: &UserView) -> apb::User {
    apb::User {
        user_id: u.user_id.clone(),
        email: u.email.clone(),
        status: if u.disabled { "disabled" } else { "active" }.to_string(),
        created_at: timefmt::format(u.created_at),
        orgs: state
            .accounts
            .orgs_of(&u.user_id)
            .map(|(org_id, role)| apb::Membership {
                org_id: org_id.to_string(),
                role: role.as_str().to_string(),
            })
            .collect(),
    }
}

impl ControlPlane {
    /// Appends to several aggregates at once (all or nothing), then catches up.
    async fn append_streams(
        &self,
        parts: &[(String, u64, Vec<Event>)],
        meta: &Metadata,
    ) -> Result<()> {
        let encoded = parts
            .iter()
            .map(|(_, _, events)| events.iter().map(Event::to_new).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        let appends: Vec<StreamAppend<'_>> = parts
            .iter()
            .zip(&encoded)
            .map(|((stream_id, expected, _), events)| StreamAppend {
                stream_id,
                expected_version: *expected,
                events,
            })
            .collect();
        self.store().append_streams(&appends, meta, None).await?;
        for (stream_id, _, events) in parts {
            for event in events {
                tracing::info!(
                    stream_id = %stream_id,
                    event_type = event.event_type(),
                    actor = %meta.actor,
                    request_id = %meta.request_id,
                    "event appended"
                );
            }
        }
        self.catch_up().await
    }

    /// Sign-up: a new account that owns a new org named after its email. The actor is the new
    /// user.
    pub async fn sign_up(
        &self,
        email: &str,
        password: &SecretString,
        request_id: Option<&str>,
    ) -> Result<Registered> {
        let user_id = new_user_id();
        let mut meta = Metadata::new(user_actor(&user_id));
        if let Some(id) = request_id {
            meta.request_id = id.to_string();
        }
        self.register(&meta, &user_id, email, password, None).await
    }

    /// An operator's `flex admin user create`: the account owns a new org, or joins `org` with
    /// the role given.
    pub async fn create_user(
        &self,
        meta: &Metadata,
        email: &str,
        password: &SecretString,
        org: Option<(&str, Role)>,
    ) -> Result<Registered> {
        self.register(meta, &new_user_id(), email, password, org)
            .await
    }

    async fn register(
        &self,
        meta: &Metadata,
        user_id: &str,
        email: &str,
        password: &SecretString,
        org: Option<(&str, Role)>,
    ) -> Result<Registered> {
        let email = normalize_email(email)?;
        validate_password(password.expose_secret(), &email)?;
        let claim_stream = user_email_stream(&email);
        let claim = self.load::<EmailClaimAggregate>(&claim_stream).await?;
        claim.state.check_free()?;
        let password_hash = hash_password(password).await?;
        let mut parts = vec![
            (
                claim_stream.clone(),
                claim.version,
                vec![Event::UserEmailClaimed {
                    user_id: user_id.to_string(),
                    email: email.clone(),
                }],
            ),
            (
                user_stream(user_id),
                0,
                vec![Event::UserRegistered {
                    user_id: user_id.to_string(),
                    email: email.clone(),
                    password_hash,
                }],
            ),
        ];
        let org_id = match org {
            Some((org_id, role)) => {
                let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
                let stream = domain::org_stream(&org_id);
                let current = self.load::<OrgAggregate>(&stream).await?;
                let added = current.state.add_member(&org_id, user_id, role)?;
                parts.push((stream, current.version, vec![added]));
                org_id
            }
            None => {
                let org_id = domain::new_org_id();
                let name = domain::validate_org_name(&email)?;
                parts.push((
                    domain::org_stream(&org_id),
                    0,
                    vec![
                        Event::OrgCreated {
                            org_id: org_id.clone(),
                            name,
                        },
                        Event::MemberAdded {
                            org_id: org_id.clone(),
                            user_id: user_id.to_string(),
                            role: Role::Owner,
                            invite_id: None,
                        },
                    ],
                ));
                org_id
            }
        };
        match self.append_streams(&parts, meta).await {
            Ok(()) => {}
            Err(Error::Conflict { stream_id, .. }) if stream_id == claim_stream => {
                return Err(email_taken())
            }
            Err(e) => return Err(e),
        }
        tracing::info!(user_id, org_id, request_id = %meta.request_id, "user registered");
        Ok(Registered {
            user_id: user_id.to_string(),
            org_id,
        })
    }

    /// Checks a sign-in: the same work whether or not the email has an account.
    pub async fn check_sign_in(&self, email: &str, password: &SecretString) -> Result<SignIn> {
        let Ok(email) = normalize_email(email) else {
            verify_password(password, "").await?;
            return Ok(SignIn::Invalid);
        };
        self.catch_up().await?;
        let state = self.state();
        let user = state.accounts.user_by_email(&email);
        let hash = user.map(|u| u.password_hash.as_str()).unwrap_or("");
        let ok = verify_password(password, hash).await? && user.is_some();
        Ok(match user {
            Some(u) if ok && u.disabled => SignIn::Disabled,
            Some(u) if ok => SignIn::Ok(u.user_id.clone()),
            _ => SignIn::Invalid,
        })
    }

    /// A user by id, or by email when `user` contains `@`.
    pub fn find_user(&self, user: &str) -> Result<UserView> {
        let state = self.state();
        let found = if user.contains('@') {
            normalize_email(user)
                .ok()
                .and_then(|e| state.accounts.user_by_email(&e).cloned())
        } else {
            state.accounts.users.get(user.trim()).cloned()
        };
        found.ok_or_else(|| not_found_user(user))
    }

    /// Disables an account (by id or email) and ends its sessions.
    pub async fn disable_user(
        &self,
        meta: &Metadata,
        user: &str,
        reason: &str,
    ) -> Result<apb::User> {
        self.catch_up().await?;
        let user_id = self.find_user(user)?.user_id;
        let reason = domain::validate_reason(reason)?;
        let stream = user_stream(&user_id);
        let current = self.load::<UserAggregate>(&stream).await?;
        let event = current.state.disable(&user_id, &reason)?;
        self.append_streams(&[(stream, current.version, vec![event])], meta)
            .await?;
        let ended = self.store().sessions_delete_user(&user_id).await?;
        tracing::info!(user_id, sessions_ended = ended, "user disabled");
        self.user_admin_view(&user_id)
    }

    pub async fn enable_user(&self, meta: &Metadata, user: &str) -> Result<apb::User> {
        self.catch_up().await?;
        let user_id = self.find_user(user)?.user_id;
        let stream = user_stream(&user_id);
        let current = self.load::<UserAggregate>(&stream).await?;
        let event = current.state.enable(&user_id)?;
        self.append_streams(&[(stream, current.version, vec![event])], meta)
            .await?;
        self.user_admin_view(&user_id)
    }

    pub fn user_admin_view(&self, user_id: &str) -> Result<apb::User> {
        let state = self.state();
        let u = state
            .accounts
            .users
            .get(user_id)
            .ok_or_else(|| not_found_user(user_id))?;
        Ok(user_admin(&state, u))
    }

    pub async fn list_users(&self) -> Result<Vec<apb::User>> {
        self.catch_up().await?;
        let state = self.state();
        Ok(state
            .accounts
            .users
            .values()
            .map(|u| user_admin(&state, u))
            .collect())
    }

    /// An owner (`by`) invites `email` to `org_id` as `role`; the link token is shown once.
    pub async fn create_invite(
        &self,
        meta: &Metadata,
        org_id: &str,
        by: &str,
        email: &str,
        role: Role,
    ) -> Result<CreatedInvite> {
        let email = normalize_email(email)?;
        let stream = domain::org_stream(org_id);
        let current = self.load::<OrgAggregate>(&stream).await?;
        self.catch_up().await?;
        let member_emails: Vec<String> = {
            let state = self.state();
            state
                .accounts
                .members_of(org_id)
                .filter_map(|m| state.accounts.users.get(&m.user_id))
                .map(|u| u.email.clone())
                .collect()
        };
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let event = current.state.invite(
            org_id,
            by,
            domain::accounts::NewInvite {
                email: &email,
                role,
                token_hash: &invite_token_hash(&secret),
            },
            &member_emails,
            timefmt::now(),
        )?;
        let Event::InviteCreated { invite_id, .. } = &event else {
            return Err(Error::Internal(
                "an invite decision made another event".into(),
            ));
        };
        let invite_id = invite_id.clone();
        self.append_streams(&[(stream, current.version, vec![event])], meta)
            .await?;
        let invite = self
            .state()
            .accounts
            .invites
            .get(&invite_id)
            .cloned()
            .ok_or_else(|| {
                Error::Internal(format!("invite {invite_id} missing from the projection"))
            })?;
        Ok(CreatedInvite {
            invite,
            link_token: SecretString::from(format!("{invite_id}.{secret}")),
        })
    }

    /// The invite a link token names, if it has that shape (nothing is checked yet).
    pub fn invite_of_token(&self, token: &str) -> Option<InviteView> {
        let (invite_id, _) = token.split_once('.')?;
        self.state().accounts.invites.get(invite_id).cloned()
    }

    /// `user_id` accepts the invite of a link token; returns the org joined.
    pub async fn accept_invite(
        &self,
        meta: &Metadata,
        token: &SecretString,
        user_id: &str,
    ) -> Result<String> {
        let unusable = || {
            Error::FailedPrecondition(
                "this invite link is not valid: it may have been used, revoked or expired, or it was mistyped. Ask an owner of the org for a new one".into(),
            )
        };
        let (invite_id, secret) = token.expose_secret().split_once('.').ok_or_else(unusable)?;
        self.catch_up().await?;
        let (org_id, email) = {
            let state = self.state();
            let inv = state.accounts.invites.get(invite_id).ok_or_else(unusable)?;
            let user = state
                .accounts
                .users
                .get(user_id)
                .ok_or_else(|| not_found_user(user_id))?;
            (inv.org_id.clone(), user.email.clone())
        };
        let stream = domain::org_stream(&org_id);
        let current = self.load::<OrgAggregate>(&stream).await?;
        let event = current.state.accept_invite(
            &org_id,
            invite_id,
            secret,
            user_id,
            &email,
            timefmt::now(),
        )?;
        self.append_streams(&[(stream, current.version, vec![event])], meta)
            .await?;
        Ok(org_id)
    }

    pub async fn revoke_invite(
        &self,
        meta: &Metadata,
        org_id: &str,
        by: &str,
        invite_id: &str,
    ) -> Result<()> {
        let stream = domain::org_stream(org_id);
        let current = self.load::<OrgAggregate>(&stream).await?;
        let event = current.state.revoke_invite(org_id, by, invite_id)?;
        self.append_streams(&[(stream, current.version, vec![event])], meta)
            .await
    }

    /// Removes `user_id` from `org_id`: `by` an owner, or the member themselves; `None` = an
    /// operator.
    pub async fn remove_member(
        &self,
        meta: &Metadata,
        org_id: &str,
        by: Option<&str>,
        user_id: &str,
    ) -> Result<()> {
        let stream = domain::org_stream(org_id);
        let current = self.load::<OrgAggregate>(&stream).await?;
        let event = current.state.remove_member(org_id, by, user_id)?;
        self.append_streams(&[(stream, current.version, vec![event])], meta)
            .await
    }
}
