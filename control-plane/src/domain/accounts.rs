//! Dashboard accounts as aggregates: a user (`user-<user_id>`), the claim of an email
//! (`useremail-<sha256(email)>`, one event at most: emails are unique because a stream version
//! is), and an org's members and invites (on the org's own stream, so membership decisions see
//! the org they change). Validation of what a person types in: emails, passwords, roles.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use super::validate::{clip, has_control};
use super::{Aggregate, Event, OrgAggregate};
use crate::error::{Error, Result};
use crate::timefmt;

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 10;
/// Longest password accepted, in bytes (hashing cost is bounded by it).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// How long an invite link works.
pub const INVITE_VALID_DAYS: i64 = 7;

pub fn user_stream(user_id: &str) -> String {
    format!("user-{user_id}")
}

/// The stream that claims `email` (normalized): its id carries a hash, so the address never
/// appears in a stream id (stream ids reach logs).
pub fn user_email_stream(email: &str) -> String {
    format!(
        "useremail-{}",
        hex::encode(Sha256::digest(email.as_bytes()))
    )
}

/// A new user id, `user_` + a time-ordered UUID.
pub fn new_user_id() -> String {
    format!("user_{}", uuid::Uuid::now_v7().simple())
}

/// A new invite id, `inv-` would clash with invoices: `invite_` + a time-ordered UUID.
pub fn new_invite_id() -> String {
    format!("invite_{}", uuid::Uuid::now_v7().simple())
}

/// What a member may do in an org: owners also manage members and invites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "owner" => Ok(Role::Owner),
            "member" | "" => Ok(Role::Member),
            other => Err(Error::InvalidArgument(format!(
                "role must be `owner` or `member` (got {:?}), e.g. --role member",
                clip(other)
            ))),
        }
    }
}

/// An email as accounts key it: trimmed and lower-cased; 3–254 characters with one `@` between
/// a non-empty local part and domain, no spaces or control characters.
pub fn normalize_email(email: &str) -> Result<String> {
    let e = email.trim().to_lowercase();
    let ok = (3..=254).contains(&e.chars().count())
        && !has_control(&e)
        && !e.contains(char::is_whitespace)
        && e.matches('@').count() == 1
        && e.split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty());
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "{:?} is not an email address; give one like ada@example.com",
            clip(email.trim())
        )));
    }
    Ok(e)
}

/// A new password: at least [`MIN_PASSWORD_CHARS`] characters, at most [`MAX_PASSWORD_BYTES`]
/// bytes, not the email itself. Errors never echo it.
pub fn validate_password(password: &str, email: &str) -> Result<()> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(Error::InvalidArgument(format!(
            "the password is {chars} characters long; use at least {MIN_PASSWORD_CHARS} (a passphrase of a few words works well)"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::InvalidArgument(format!(
            "the password is longer than {MAX_PASSWORD_BYTES} bytes; use a shorter one"
        )));
    }
    if password.trim().to_lowercase() == email {
        return Err(Error::InvalidArgument(
            "the password is the email address; choose something else".into(),
        ));
    }
    Ok(())
}

/// Hex SHA-256 of an invite's secret.
pub fn invite_token_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[derive(Debug, Clone, Default)]
pub struct UserAggregate {
    pub exists: bool,
    pub email: String,
    pub disabled: bool,
}

impl Aggregate for UserAggregate {
    fn apply(&mut self, e: &Event) {
        match e {
            Event::UserRegistered { email, .. } => {
                self.exists = true;
                self.email = email.clone();
            }
            Event::UserDisabled { .. } => self.disabled = true,
            Event::UserEnabled { .. } => self.disabled = false,
            _ => {}
        }
    }
}

pub fn not_found_user(user: &str) -> Error {
    Error::NotFound(format!(
        "user {:?} not found; list users with `flex admin user list`",
        clip(user)
    ))
}

impl UserAggregate {
    pub fn disable(&self, user_id: &str, reason: &str) -> Result<Event> {
        if !self.exists {
            return Err(not_found_user(user_id));
        }
        if self.disabled {
            return Err(Error::FailedPrecondition(format!(
                "user {user_id} is already disabled; `flex admin user enable {user_id}` lets them sign in again"
            )));
        }
        Ok(Event::UserDisabled {
            user_id: user_id.to_string(),
            reason: reason.to_string(),
        })
    }

    pub fn enable(&self, user_id: &str) -> Result<Event> {
        if !self.exists {
            return Err(not_found_user(user_id));
        }
        if !self.disabled {
            return Err(Error::FailedPrecondition(format!(
                "user {user_id} is not disabled, so there is nothing to enable"
            )));
        }
        Ok(Event::UserEnabled {
            user_id: user_id.to_string(),
        })
    }
}

/// The claim of one email: which user has it.
#[derive(Debug, Clone, Default)]
pub struct EmailClaimAggregate {
    pub user_id: Option<String>,
}

impl Aggregate for EmailClaimAggregate {
    fn apply(&mut self, e: &Event) {
        if let Event::UserEmailClaimed { user_id, .. } = e {
            self.user_id = Some(user_id.clone());
        }
    }
}

impl EmailClaimAggregate {
    pub fn check_free(&self) -> Result<()> {
        match self.user_id {
            None => Ok(()),
            Some(_) => Err(email_taken()),
        }
    }
}

/// The sign-up error for an email that has an account (says nothing about that account).
pub fn email_taken() -> Error {
    Error::FailedPrecondition(
        "an account with this email already exists; sign in instead (or ask the operator to reset it)"
            .into(),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InviteStatus {
    Open,
    Accepted,
    Revoked,
}

impl InviteStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InviteStatus::Open => "open",
            InviteStatus::Accepted => "accepted",
            InviteStatus::Revoked => "revoked",
        }
    }
}

/// An invite as folded on its org's stream.
#[derive(Clone, PartialEq, Eq)]
pub struct InviteState {
    pub email: String,
    pub role: Role,
    pub token_hash: String,
    pub expires_at: OffsetDateTime,
    pub status: InviteStatus,
}

impl std::fmt::Debug for InviteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InviteState")
            .field("email", &self.email)
            .field("role", &self.role)
            .field("expires_at", &self.expires_at)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// What an owner fills in to invite someone, and the hash of the link's secret.
#[derive(Debug, Clone, Copy)]
pub struct NewInvite<'a> {
    pub email: &'a str,
    pub role: Role,
    pub token_hash: &'a str,
}

fn invite_unusable() -> Error {
    Error::FailedPrecondition(
        "this invite link is not valid: it may have been used, revoked or expired, or it was mistyped. Ask an owner of the org for a new one".into(),
    )
}

impl OrgAggregate {
    /// Folds the membership events of the org's stream.
    pub(crate) fn apply_membership(&mut self, e: &Event) {
        match e {
            Event::MemberAdded {
                user_id,
                role,
                invite_id,
                ..
            } => {
                self.members.insert(user_id.clone(), *role);
                if let Some(inv) = invite_id.as_ref().and_then(|i| self.invites.get_mut(i)) {
                    inv.status = InviteStatus::Accepted;
                }
            }
            Event::MemberRemoved { user_id, .. } => {
                self.members.remove(user_id);
            }
            Event::InviteCreated {
                invite_id,
                email,
                role,
                token_hash,
                expires_at,
                ..
            } => {
                self.invites.insert(
                    invite_id.clone(),
                    InviteState {
                        email: email.clone(),
                        role: *role,
                        token_hash: token_hash.clone(),
                        expires_at: timefmt::parse(expires_at)
                            .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                        status: InviteStatus::Open,
                    },
                );
            }
            Event::InviteRevoked { invite_id, .. } => {
                if let Some(inv) = self.invites.get_mut(invite_id) {
                    inv.status = InviteStatus::Revoked;
                }
            }
            _ => {}
        }
    }

    pub fn role_of(&self, user_id: &str) -> Option<Role> {
        self.members.get(user_id).copied()
    }

    fn require_owner(&self, org_id: &str, by: &str) -> Result<()> {
        self.require(org_id)?;
        match self.role_of(by) {
            Some(Role::Owner) => Ok(()),
            Some(Role::Member) => Err(Error::FailedPrecondition(
                "only an owner of the org can manage its members and invites; ask an owner".into(),
            )),
            None => Err(super::not_found_org(org_id)),
        }
    }

    /// An operator (or a sign-up) makes `user_id` a member.
    pub fn add_member(&self, org_id: &str, user_id: &str, role: Role) -> Result<Event> {
        self.require(org_id)?;
        if self.members.contains_key(user_id) {
            return Err(Error::FailedPrecondition(format!(
                "user {user_id} is already a member of org {org_id}"
            )));
        }
        Ok(Event::MemberAdded {
            org_id: org_id.to_string(),
            user_id: user_id.to_string(),
            role,
            invite_id: None,
        })
    }

    /// An owner invites `new.email` (normalized); `member_emails` are the emails of the current
    /// members (from the projection).
    pub fn invite(
        &self,
        org_id: &str,
        by: &str,
        new: NewInvite<'_>,
        member_emails: &[String],
        now: OffsetDateTime,
    ) -> Result<Event> {
        let NewInvite {
            email,
            role,
            token_hash,
        } = new;
        self.require_owner(org_id, by)?;
        if member_emails.iter().any(|m| m == email) {
            return Err(Error::FailedPrecondition(format!(
                "{email} is already a member of this org"
            )));
        }
        let open = self
            .invites
            .values()
            .filter(|i| i.status == InviteStatus::Open && i.expires_at > now)
            .count();
        if open >= 100 {
            return Err(Error::FailedPrecondition(
                "this org has 100 open invites; revoke some before inviting more".into(),
            ));
        }
        Ok(Event::InviteCreated {
            org_id: org_id.to_string(),
            invite_id: new_invite_id(),
            email: email.to_string(),
            role,
            token_hash: token_hash.to_string(),
            expires_at: timefmt::format(now + time::Duration::days(INVITE_VALID_DAYS)),
        })
    }

    /// `user_id` (whose email is `email`) presents the invite's secret. Every refusal but the
    /// wrong account says the same thing, so a link reveals nothing to a guesser.
    pub fn accept_invite(
        &self,
        org_id: &str,
        invite_id: &str,
        secret: &str,
        user_id: &str,
        email: &str,
        now: OffsetDateTime,
    ) -> Result<Event> {
        let inv = self.invites.get(invite_id).ok_or_else(invite_unusable)?;
        let presented = invite_token_hash(secret);
        if !bool::from(presented.as_bytes().ct_eq(inv.token_hash.as_bytes()))
            || inv.status != InviteStatus::Open
            || inv.expires_at <= now
            || !self.exists
        {
            return Err(invite_unusable());
        }
        if inv.email != email {
            return Err(Error::FailedPrecondition(format!(
                "this invite is for another email address; sign out and sign in (or sign up) as {}",
                mask_email(&inv.email)
            )));
        }
        if self.members.contains_key(user_id) {
            return Err(Error::FailedPrecondition(
                "you already are a member of this org".into(),
            ));
        }
        Ok(Event::MemberAdded {
            org_id: org_id.to_string(),
            user_id: user_id.to_string(),
            role: inv.role,
            invite_id: Some(invite_id.to_string()),
        })
    }

    pub fn revoke_invite(&self, org_id: &str, by: &str, invite_id: &str) -> Result<Event> {
        self.require_owner(org_id, by)?;
        match self.invites.get(invite_id) {
            Some(i) if i.status == InviteStatus::Open => Ok(Event::InviteRevoked {
                org_id: org_id.to_string(),
                invite_id: invite_id.to_string(),
            }),
            Some(i) => Err(Error::FailedPrecondition(format!(
                "invite {invite_id} is {} already",
                i.status.as_str()
            ))),
            None => Err(Error::NotFound(format!(
                "org {org_id} has no invite {:?}",
                clip(invite_id)
            ))),
        }
    }

    /// `by` removes `user_id`: an owner removes anyone, a member only themselves (leaving); the
    /// last owner stays.
    pub fn remove_member(&self, org_id: &str, by: Option<&str>, user_id: &str) -> Result<Event> {
        match by {
            Some(by) if by == user_id => self.require(org_id)?,
            Some(by) => self.require_owner(org_id, by)?,
            None => self.require(org_id)?,
        }
        let Some(role) = self.role_of(user_id) else {
            return Err(Error::NotFound(format!(
                "user {:?} is not a member of org {org_id}",
                clip(user_id)
            )));
        };
        let owners = self.members.values().filter(|r| **r == Role::Owner).count();
        if role == Role::Owner && owners == 1 {
            return Err(Error::FailedPrecondition(
                "this is the org's only owner; make another member an owner first (an org always keeps one)".into(),
            ));
        }
        Ok(Event::MemberRemoved {
            org_id: org_id.to_string(),
            user_id: user_id.to_string(),
        })
    }
}

/// `ada@example.com` → `a***@example.com`, for telling someone which account an invite is for.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn org_with_owner() -> OrgAggregate {
        let mut org = OrgAggregate::default();
        org.apply(&Event::OrgCreated {
            org_id: "o".into(),
            name: "n".into(),
        });
        org.apply(&org.add_member("o", "u1", Role::Owner).unwrap());
        org
    }

    #[test]
    fn emails_are_normalized_and_checked() {
        assert_eq!(
            normalize_email("  Ada@Example.COM ").unwrap(),
            "ada@example.com"
        );
        for bad in ["", "ada", "a@", "@b", "a@b@c", "a b@c.d", "a\n@b.c"] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
        assert_eq!(mask_email("ada@example.com"), "a***@example.com");
        assert_ne!(
            user_email_stream("ada@example.com"),
            user_email_stream("bob@example.com")
        );
        assert!(!user_email_stream("ada@example.com").contains("ada"));
    }

    #[test]
    fn passwords_are_checked_without_being_echoed() {
        let e = validate_password("short", "a@b.c").unwrap_err().to_string();
        assert!(e.contains("at least 10"), "{e}");
        assert!(!e.contains("short"), "{e}");
        assert!(validate_password("a@b.c.d.e.f", "a@b.c.d.e.f").is_err());
        assert!(validate_password(&"x".repeat(1025), "a@b.c").is_err());
        validate_password("correct horse battery", "a@b.c").unwrap();
    }

    #[test]
    fn invites_work_once_for_their_email_until_they_expire() {
        let mut org = org_with_owner();
        let now = timefmt::now();
        let hash = invite_token_hash("s3cret");
        let new = |email| NewInvite {
            email,
            role: Role::Member,
            token_hash: &hash,
        };
        let e = org.invite("o", "u1", new("bob@x.io"), &[], now).unwrap();
        let Event::InviteCreated { invite_id, .. } = &e else {
            panic!("{e:?}")
        };
        let invite_id = invite_id.clone();
        org.apply(&e);
        // A member cannot invite; a stranger learns nothing.
        assert!(org.invite("o", "nobody", new("c@x.io"), &[], now).is_err());
        assert!(org
            .invite("o", "u1", new("d@x.io"), &["d@x.io".into()], now)
            .is_err());
        // Wrong secret, wrong account, expired: refused.
        assert!(org
            .accept_invite("o", &invite_id, "guess", "u2", "bob@x.io", now)
            .is_err());
        let wrong = org
            .accept_invite("o", &invite_id, "s3cret", "u3", "eve@x.io", now)
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("b***@x.io"), "{wrong}");
        let later = now + time::Duration::days(INVITE_VALID_DAYS + 1);
        assert!(org
            .accept_invite("o", &invite_id, "s3cret", "u2", "bob@x.io", later)
            .is_err());
        let joined = org
            .accept_invite("o", &invite_id, "s3cret", "u2", "bob@x.io", now)
            .unwrap();
        org.apply(&joined);
        assert_eq!(org.role_of("u2"), Some(Role::Member));
        // Used up.
        assert!(org
            .accept_invite("o", &invite_id, "s3cret", "u2", "bob@x.io", now)
            .is_err());
        assert!(org.revoke_invite("o", "u1", &invite_id).is_err());
    }

    #[test]
    fn owners_remove_members_and_the_last_owner_stays() {
        let mut org = org_with_owner();
        org.apply(&org.add_member("o", "u2", Role::Member).unwrap());
        assert!(org.add_member("o", "u2", Role::Member).is_err());
        // A member cannot remove another, but can leave.
        assert!(org.remove_member("o", Some("u2"), "u1").is_err());
        assert!(
            org.remove_member("o", Some("u1"), "u1").is_err(),
            "last owner"
        );
        let e = org.remove_member("o", Some("u1"), "u2").unwrap();
        org.apply(&e);
        assert_eq!(org.role_of("u2"), None);
        assert!(org.remove_member("o", Some("u1"), "u2").is_err());
    }
}
