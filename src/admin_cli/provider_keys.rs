//! `flex admin provider-key` (provider keys, BYOK, stored sealed) and `flex admin
//! rotate-master-key` (re-sealing them under the active master key).

use std::io::Read;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use flex_shared::proto::admin as pb;
use serde_json::{json, Value};

use super::{print, status_err, Client};

#[derive(Debug, Subcommand)]
pub enum ProviderKeyCmd {
    /// Sets the org's key for a provider; the secret is read from stdin, never from argv.
    Set {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        #[arg(long, env = "FLEX_PROVIDER", value_parser = ["openai", "anthropic", "gemini"])]
        provider: String,
    },
    Remove {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        #[arg(long, env = "FLEX_PROVIDER", value_parser = ["openai", "anthropic", "gemini"])]
        provider: String,
    },
    /// Lists the org's provider keys (last four characters at most).
    List {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
    },
}

fn pkey_json(p: &pb::ProviderKey) -> Value {
    json!({"org_id": p.org_id, "provider": p.provider, "last4": p.last4, "status": p.status, "master_key_id": p.master_key_id, "updated_at": p.updated_at})
}

pub(super) async fn provider_key(c: &mut Client, j: bool, cmd: ProviderKeyCmd) -> Result<()> {
    match cmd {
        ProviderKeyCmd::Set { org, provider } => {
            let mut secret = String::new();
            std::io::stdin()
                .read_to_string(&mut secret)
                .context("reading the provider key from stdin")?;
            let secret = secret.trim().to_string();
            if secret.is_empty() {
                bail!("no provider key on stdin: pipe it in, e.g. `printf %s \"$OPENAI_API_KEY\" | flex admin provider-key set --org ORG --provider openai`");
            }
            let p = c
                .set_provider_key(pb::SetProviderKeyRequest {
                    org_id: org,
                    provider,
                    secret,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, pkey_json(&p), || {
                format!("{} key set for org {} (…{})", p.provider, p.org_id, p.last4)
            });
        }
        ProviderKeyCmd::Remove { org, provider } => {
            let p = c
                .remove_provider_key(pb::RemoveProviderKeyRequest {
                    org_id: org,
                    provider,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, pkey_json(&p), || {
                format!("{} key removed for org {}", p.provider, p.org_id)
            });
        }
        ProviderKeyCmd::List { org } => {
            let r = c
                .list_provider_keys(pb::OrgRef { org_id: org })
                .await
                .map_err(status_err)?
                .into_inner();
            print(
                j,
                json!({"keys": r.keys.iter().map(pkey_json).collect::<Vec<_>>()}),
                || {
                    r.keys
                        .iter()
                        .map(|p| {
                            format!(
                                "{}  {}  …{}  {}",
                                p.provider, p.status, p.last4, p.updated_at
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
    }
    Ok(())
}

pub(super) async fn rotate_master_key(c: &mut Client, j: bool) -> Result<()> {
    let r = c
        .rotate_master_key(pb::RotateMasterKeyRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    print(
        j,
        json!({"resealed": r.resealed, "already_current": r.already_current, "active_key_id": r.active_key_id}),
        || {
            let reload = if r.key_file_reloaded {
                "master key file reloaded; "
            } else {
                "no master key file to reload; "
            };
            let next = if r.resealed == 0 {
                "every provider key is under it: old master keys can now be dropped from the file"
            } else {
                "keep the old master key lines until a run reports 0 re-sealed"
            };
            format!(
                        "{reload}active master key {}: {} provider keys re-sealed, {} already current; {next}",
                        r.active_key_id, r.resealed, r.already_current
                    )
        },
    );
    Ok(())
}
