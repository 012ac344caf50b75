//! `flex admin user`: dashboard accounts.

use std::io::Read;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use flex_shared::proto::admin as pb;
use serde_json::{json, Value};

use super::{print, status_err, Client};

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Every dashboard account, with its orgs and roles.
    List,
    /// Creates an account that owns a new org (as signing up does), or joins --org. The
    /// password is read from stdin (never argv), or generated with --generate-password and
    /// printed once.
    Create {
        email: String,
        /// Join this org instead of owning a new one.
        #[arg(long, env = "FLEX_ORG")]
        org: Option<String>,
        /// The role in --org.
        #[arg(long, env = "FLEX_ROLE", value_parser = ["member", "owner"], default_value = "member", requires = "org")]
        role: String,
        /// Generate a password and print it once, instead of reading one from stdin.
        #[arg(long, env = "FLEX_GENERATE_PASSWORD")]
        generate_password: bool,
    },
    /// Stops an account from signing in and ends its sessions (by user id or email).
    Disable {
        user: String,
        #[arg(long, env = "FLEX_REASON", default_value = "")]
        reason: String,
    },
    /// Lets a disabled account sign in again.
    Enable { user: String },
}

fn user_json(u: &pb::User) -> Value {
    json!({"user_id": u.user_id, "email": u.email, "status": u.status, "created_at": u.created_at, "orgs": u.orgs.iter().map(|m| json!({"org_id": m.org_id, "role": m.role})).collect::<Vec<_>>()})
}

fn user_line(u: &pb::User) -> String {
    let orgs = u
        .orgs
        .iter()
        .map(|m| format!("{} ({})", m.org_id, m.role))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{}  {}  {}  {orgs}", u.user_id, u.status, u.email)
}

pub(super) async fn user(c: &mut Client, j: bool, cmd: UserCmd) -> Result<()> {
    match cmd {
        UserCmd::List => {
            let r = c
                .list_users(pb::ListUsersRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            print(
                j,
                json!({"users": r.users.iter().map(user_json).collect::<Vec<_>>()}),
                || r.users.iter().map(user_line).collect::<Vec<_>>().join("\n"),
            );
        }
        UserCmd::Create {
            email,
            org,
            role,
            generate_password,
        } => {
            let password = if generate_password {
                hex::encode(rand::random::<[u8; 16]>())
            } else {
                let mut p = String::new();
                std::io::stdin()
                    .read_to_string(&mut p)
                    .context("reading the password from stdin")?;
                let p = p.trim_end_matches(['\n', '\r']).to_string();
                if p.is_empty() {
                    bail!("no password on stdin: pipe one in (e.g. `printf %s \"$PASSWORD\" | flex admin user create ada@example.com`), or pass --generate-password");
                }
                p
            };
            let u = c
                .create_user(pb::CreateUserRequest {
                    email,
                    password: password.clone(),
                    org_id: org.unwrap_or_default(),
                    role,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let mut v = user_json(&u);
            if generate_password {
                v["password"] = json!(password);
            }
            print(j, v, || {
                let mut out = format!("created user {}", user_line(&u));
                if generate_password {
                    out.push_str(&format!(
                        "\npassword: {password}\nThis is the only time it is shown: give it to the user now."
                    ));
                }
                out
            });
        }
        UserCmd::Disable { user, reason } => {
            let u = c
                .disable_user(pb::DisableUserRequest { user, reason })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, user_json(&u), || {
                format!(
                    "user {} ({}) disabled; their sessions ended",
                    u.user_id, u.email
                )
            });
        }
        UserCmd::Enable { user } => {
            let u = c
                .enable_user(pb::UserRef { user })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, user_json(&u), || {
                format!("user {} ({}) can sign in again", u.user_id, u.email)
            });
        }
    }
    Ok(())
}
