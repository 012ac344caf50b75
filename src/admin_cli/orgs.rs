//! `flex admin org` and `flex admin key`: organizations and their FlexInference API keys.

use anyhow::Result;
use clap::Subcommand;
use flex_shared::proto::admin as pb;
use serde_json::{json, Value};

use super::{print, status_err, Client};

#[derive(Debug, Subcommand)]
pub enum OrgCmd {
    Create {
        name: String,
        #[arg(long, env = "FLEX_IDEMPOTENCY_KEY")]
        idempotency_key: Option<String>,
    },
    List,
    Rename {
        org_id: String,
        name: String,
    },
    Suspend {
        org_id: String,
    },
    Reactivate {
        org_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Creates a key and prints it once.
    Create {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        #[arg(long, env = "FLEX_NAME", default_value = "")]
        name: String,
        /// RFC 3339 expiry.
        #[arg(long, env = "FLEX_EXPIRES_AT")]
        expires_at: Option<String>,
        #[arg(long, env = "FLEX_IDEMPOTENCY_KEY")]
        idempotency_key: Option<String>,
    },
    List {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
    },
    Revoke {
        key_id: String,
        #[arg(long, env = "FLEX_REASON", default_value = "")]
        reason: String,
    },
}

fn org_json(o: &pb::Org) -> Value {
    json!({"org_id": o.org_id, "name": o.name, "status": o.status, "created_at": o.created_at})
}

fn key_json(k: &pb::ApiKey) -> Value {
    json!({"key_id": k.key_id, "org_id": k.org_id, "name": k.name, "hint": k.hint, "status": k.status, "created_at": k.created_at, "revoked_at": k.revoked_at, "expires_at": k.expires_at})
}

pub(super) async fn org(c: &mut Client, j: bool, cmd: OrgCmd) -> Result<()> {
    match cmd {
        OrgCmd::Create {
            name,
            idempotency_key,
        } => {
            let o = c
                .create_org(pb::CreateOrgRequest {
                    name,
                    idempotency_key: idempotency_key.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, org_json(&o), || {
                format!("created org {} ({})", o.org_id, o.name)
            });
        }
        OrgCmd::List => {
            let r = c
                .list_orgs(pb::ListOrgsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            print(
                j,
                json!({"orgs": r.orgs.iter().map(org_json).collect::<Vec<_>>()}),
                || {
                    r.orgs
                        .iter()
                        .map(|o| format!("{}  {}  {}", o.org_id, o.status, o.name))
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        OrgCmd::Rename { org_id, name } => {
            let o = c
                .rename_org(pb::RenameOrgRequest { org_id, name })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, org_json(&o), || {
                format!("org {} is now named {}", o.org_id, o.name)
            });
        }
        OrgCmd::Suspend { org_id } => {
            let o = c
                .suspend_org(pb::OrgRef { org_id })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, org_json(&o), || format!("org {} suspended", o.org_id));
        }
        OrgCmd::Reactivate { org_id } => {
            let o = c
                .reactivate_org(pb::OrgRef { org_id })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, org_json(&o), || format!("org {} reactivated", o.org_id));
        }
    }
    Ok(())
}

pub(super) async fn key(c: &mut Client, j: bool, cmd: KeyCmd) -> Result<()> {
    match cmd {
        KeyCmd::Create {
            org,
            name,
            expires_at,
            idempotency_key,
        } => {
            let r = c
                .create_api_key(pb::CreateApiKeyRequest {
                    org_id: org,
                    name,
                    idempotency_key: idempotency_key.unwrap_or_default(),
                    expires_at: expires_at.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let k = r.key.unwrap_or_default();
            print(
                j,
                json!({"key_id": k.key_id, "org_id": k.org_id, "api_key": r.api_key, "hint": k.hint}),
                || {
                    if r.api_key.is_empty() {
                        format!("key {} already existed (idempotent replay); its secret was shown only when it was created", k.key_id)
                    } else {
                        format!("created key {}\n{}\nThis is the only time the key is shown: store it now.", k.key_id, r.api_key)
                    }
                },
            );
        }
        KeyCmd::List { org } => {
            let r = c
                .list_api_keys(pb::OrgRef { org_id: org })
                .await
                .map_err(status_err)?
                .into_inner();
            print(
                j,
                json!({"keys": r.keys.iter().map(key_json).collect::<Vec<_>>()}),
                || {
                    r.keys
                        .iter()
                        .map(|k| format!("{}  {}  {}  {}", k.key_id, k.status, k.hint, k.name))
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        KeyCmd::Revoke { key_id, reason } => {
            let k = c
                .revoke_api_key(pb::RevokeApiKeyRequest { key_id, reason })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, key_json(&k), || format!("key {} revoked", k.key_id));
        }
    }
    Ok(())
}
