//! The dashboard's part of the projected state: users, memberships and invites, folded from the
//! same log as everything else (so a rebuild yields them too). None of it reaches a snapshot:
//! proxies know orgs and keys, not people.

use imbl::OrdMap;
use time::OffsetDateTime;

use super::State;
use crate::domain::accounts::InviteStatus;
use crate::domain::{Event, Role};
use crate::timefmt;

/// A dashboard account.
#[derive(Clone, PartialEq, Eq)]
pub struct UserView {
    pub user_id: String,
    pub email: String,
    /// Argon2id PHC string; only ever compared against, never shown.
    pub password_hash: String,
    pub disabled: bool,
    pub created_at: OffsetDateTime,
}

impl std::fmt::Debug for UserView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserView")
            .field("user_id", &self.user_id)
            .field("email", &self.email)
            .field("disabled", &self.disabled)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub org_id: String,
    pub user_id: String,
    pub role: Role,
    pub added_at: OffsetDateTime,
}

#[derive(Clone, PartialEq, Eq)]
pub struct InviteView {
    pub invite_id: String,
    pub org_id: String,
    pub email: String,
    pub role: Role,
    pub token_hash: String,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub status: InviteStatus,
}

impl std::fmt::Debug for InviteView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InviteView")
            .field("invite_id", &self.invite_id)
            .field("org_id", &self.org_id)
            .field("email", &self.email)
            .field("role", &self.role)
            .field("expires_at", &self.expires_at)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl InviteView {
    /// `open`, `accepted`, `revoked` or `expired` at `now`.
    pub fn status_at(&self, now: OffsetDateTime) -> &'static str {
        match self.status {
            InviteStatus::Open if self.expires_at <= now => "expired",
            s => s.as_str(),
        }
    }
}

/// The accounts' maps of [`State`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accounts {
    pub users: OrdMap<String, UserView>,
    /// User id by normalized email.
    pub user_emails: OrdMap<String, String>,
    /// By (org_id, user_id).
    pub members: OrdMap<(String, String), MemberView>,
    /// By (user_id, org_id): the same memberships, for "my orgs".
    pub memberships: OrdMap<(String, String), Role>,
    pub invites: OrdMap<String, InviteView>,
}

impl Accounts {
    /// The members of `org_id`, in user id order.
    pub fn members_of<'a>(&'a self, org_id: &'a str) -> impl Iterator<Item = &'a MemberView> + 'a {
        self.members
            .range((org_id.to_string(), String::new())..)
            .take_while(move |((o, _), _)| o == org_id)
            .map(|(_, m)| m)
    }

    /// The orgs `user_id` belongs to and the role in each, in org id (creation) order.
    pub fn orgs_of<'a>(&'a self, user_id: &'a str) -> impl Iterator<Item = (&'a str, Role)> + 'a {
        self.memberships
            .range((user_id.to_string(), String::new())..)
            .take_while(move |((u, _), _)| u == user_id)
            .map(|((_, o), r)| (o.as_str(), *r))
    }

    pub fn role_of(&self, org_id: &str, user_id: &str) -> Option<Role> {
        self.memberships
            .get(&(user_id.to_string(), org_id.to_string()))
            .copied()
    }

    pub fn user_by_email(&self, email: &str) -> Option<&UserView> {
        self.user_emails
            .get(email)
            .and_then(|id| self.users.get(id))
    }

    /// The invites of `org_id`, oldest first.
    pub fn invites_of<'a>(&'a self, org_id: &'a str) -> impl Iterator<Item = &'a InviteView> + 'a {
        self.invites.values().filter(move |i| i.org_id == org_id)
    }
}

impl State {
    /// Folds the events of users, memberships and invites.
    pub(super) fn fold_account(&mut self, event: Event, at: OffsetDateTime) {
        let a = &mut self.accounts;
        match event {
            Event::UserRegistered {
                user_id,
                email,
                password_hash,
            } => {
                a.user_emails.insert(email.clone(), user_id.clone());
                a.users.insert(
                    user_id.clone(),
                    UserView {
                        user_id,
                        email,
                        password_hash,
                        disabled: false,
                        created_at: at,
                    },
                );
            }
            Event::UserDisabled { user_id, .. } => {
                if let Some(u) = a.users.get_mut(&user_id) {
                    u.disabled = true;
                }
            }
            Event::UserEnabled { user_id } => {
                if let Some(u) = a.users.get_mut(&user_id) {
                    u.disabled = false;
                }
            }
            Event::MemberAdded {
                org_id,
                user_id,
                role,
                invite_id,
            } => {
                if let Some(inv) = invite_id.and_then(|i| a.invites.get_mut(&i)) {
                    inv.status = InviteStatus::Accepted;
                }
                a.memberships
                    .insert((user_id.clone(), org_id.clone()), role);
                a.members.insert(
                    (org_id.clone(), user_id.clone()),
                    MemberView {
                        org_id,
                        user_id,
                        role,
                        added_at: at,
                    },
                );
            }
            Event::MemberRemoved { org_id, user_id } => {
                a.memberships.remove(&(user_id.clone(), org_id.clone()));
                a.members.remove(&(org_id, user_id));
            }
            Event::InviteCreated {
                org_id,
                invite_id,
                email,
                role,
                token_hash,
                expires_at,
            } => {
                a.invites.insert(
                    invite_id.clone(),
                    InviteView {
                        invite_id,
                        org_id,
                        email,
                        role,
                        token_hash,
                        created_at: at,
                        expires_at: timefmt::parse(&expires_at)
                            .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                        status: InviteStatus::Open,
                    },
                );
            }
            Event::InviteRevoked { invite_id, .. } => {
                if let Some(inv) = a.invites.get_mut(&invite_id) {
                    inv.status = InviteStatus::Revoked;
                }
            }
            // The email's claim is only a uniqueness guard: the user's own event carries it.
            _ => {}
        }
    }
}
