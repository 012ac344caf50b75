//! `flex admin`: the operator CLI over the gRPC admin API.
//!
//! This module holds the arguments, the connection to the admin API, the output helpers and the
//! dispatch. Each subcommand group's arguments and handler are in a file of their own: `orgs`
//! (org, key), `provider_keys` (provider-key, rotate-master-key), `billing`, `users`, `limits`,
//! `models`, and `reports` (usage, audit, proxies).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use clap::Subcommand;
use flex_data_plane::plane_tls::{self, ClientTlsFiles, FlagNames};
use flex_shared::proto::admin::admin_service_client::AdminServiceClient;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

mod billing;
mod limits;
mod models;
mod orgs;
mod provider_keys;
mod reports;
mod users;

pub use billing::BillingCmd;
pub use limits::LimitsCmd;
pub use models::ModelCmd;
pub use orgs::{KeyCmd, OrgCmd};
pub use provider_keys::ProviderKeyCmd;
pub use users::UserCmd;

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// Admin gRPC endpoint, e.g. http://127.0.0.1:50051 (https://… when the control plane
    /// serves TLS).
    #[arg(long, env = "FLEX_ADMIN_ENDPOINT")]
    pub endpoint: Option<String>,
    /// PEM CA certificate(s) to trust for an https:// endpoint (default: the public webpki
    /// roots).
    #[arg(long, env = "FLEX_ADMIN_CA")]
    pub ca: Option<PathBuf>,
    /// Admin token (sent as `authorization: Bearer …`; on the command line it is visible in
    /// `ps`, so prefer --token-file or the variable).
    #[arg(long, env = "FLEX_ADMIN_TOKEN", hide_env_values = true, value_parser = admin_secret)]
    pub token: Option<SecretString>,
    /// A file holding the admin token (surrounding whitespace ignored).
    #[arg(long, env = "FLEX_ADMIN_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Data dir of a local `flex up`: endpoint and token are read from there.
    #[arg(long, env = "FLEX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print one JSON object per command, for scripts (before or after the command).
    #[arg(long, env = "FLEX_JSON", global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Organizations.
    #[command(subcommand)]
    Org(OrgCmd),
    /// FlexInference API keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Provider keys (BYOK), stored encrypted.
    #[command(subcommand, name = "provider-key")]
    ProviderKey(ProviderKeyCmd),
    /// Billing status.
    #[command(subcommand)]
    Billing(BillingCmd),
    /// Usage totals of an org.
    Usage {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        /// RFC 3339 lower bound (inclusive).
        #[arg(long, env = "FLEX_FROM")]
        from: Option<String>,
        /// RFC 3339 upper bound (exclusive).
        #[arg(long, env = "FLEX_TO")]
        to: Option<String>,
        /// One row per day, month (UTC), model or served tier.
        #[arg(long, env = "FLEX_GROUP_BY", value_parser = ["day", "month", "model", "tier"])]
        group_by: Option<String>,
    },
    /// The org's events, readable.
    Audit {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
    },
    /// Connected proxies and their snapshot version.
    Proxies,
    /// Catalog overrides shipped to every proxy.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Dashboard accounts.
    #[command(subcommand)]
    User(UserCmd),
    /// Rate limits, concurrency caps and spend budgets of an org or one of its API keys,
    /// enforced by every proxy with counters they share (Redis).
    #[command(subcommand)]
    Limits(LimitsCmd),
    /// Re-seals every provider key under the active master key, after reloading the master key
    /// file the control plane was started with. Procedure: add the new key as the first line
    /// (`key_id=hex`) of the file, keep the old line, on the control plane and in every proxy's
    /// --master-key-file (no restart: proxies, and `flex up`, re-read their file when a snapshot
    /// names a key id they lack); run this; once it reports `resealed: 0`, drop the old line.
    #[command(name = "rotate-master-key")]
    RotateMasterKey,
}

type Client = AdminServiceClient<InterceptedService<Channel, Auth>>;

/// `flex admin`'s TLS flags (it presents no client certificate: the admin token is its
/// credential).
const ADMIN_FLAGS: FlagNames = FlagNames {
    url: "--endpoint",
    ca: "--ca",
    cert: "--cert",
    key: "--key",
};

#[derive(Clone)]
pub struct Auth(MetadataValue<tonic::metadata::Ascii>);

fn admin_secret(s: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(s.to_string()))
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// The admin endpoint and token of a local `flex up` from its data dir: `admin-endpoint` (written
/// at every start, so it names the running instance), else the `admin_endpoint` of `demo.json`
/// (data dirs of older builds), and `admin-token`.
fn read_local(dir: &Path) -> (Option<String>, Option<SecretString>) {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let token = read("admin-token").map(SecretString::from);
    let endpoint = read("admin-endpoint").or_else(|| {
        read("demo.json")
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v["admin_endpoint"].as_str().map(str::to_string))
    });
    (endpoint, token)
}

pub async fn connect(args: &AdminArgs) -> Result<Client> {
    let mut endpoint = args.endpoint.clone();
    let mut token = crate::cli::secret_from(
        args.token.as_ref(),
        args.token_file.as_deref(),
        "--token-file",
    )?;
    if let Some(dir) = &args.data_dir {
        let (e, t) = read_local(dir);
        endpoint = endpoint.or(e);
        token = token.or(t);
    }
    let endpoint = endpoint.unwrap_or_else(|| "http://127.0.0.1:50051".to_string());
    let token = token.ok_or_else(|| anyhow!("no admin token: pass --token-file FILE (or FLEX_ADMIN_TOKEN_FILE), set FLEX_ADMIN_TOKEN, or --data-dir of a local `flex up` (which holds admin-token)"))?;
    let channel = Channel::from_shared(endpoint.clone()).with_context(|| {
        format!(
            "invalid admin endpoint `{}` (expected e.g. http://127.0.0.1:50051)",
            flex_shared::redact::url(&endpoint)
        )
    })?;
    let tls = ClientTlsFiles {
        ca: args.ca.clone(),
        ..ClientTlsFiles::default()
    };
    let channel = plane_tls::grpc_endpoint(channel, &tls, ADMIN_FLAGS)?
        .connect()
        .await
        .with_context(|| {
            let tls_hint = if endpoint.starts_with("https://") {
                " For https://, --ca must name the CA that signed the control plane's certificate."
            } else {
                ""
            };
            format!(
                "cannot reach the admin API at {}; is `flex up` or `flex control` running?{tls_hint}",
                flex_shared::redact::url(&endpoint)
            )
        })?;
    let bearer = secrecy::zeroize::Zeroizing::new(format!("Bearer {}", token.expose_secret()));
    let mut value: MetadataValue<_> = bearer
        .parse()
        .context("the admin token contains characters not allowed in a header")?;
    // Kept out of HTTP/2's header compression table.
    value.set_sensitive(true);
    Ok(AdminServiceClient::with_interceptor(channel, Auth(value)))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("{:?}: {}", s.code(), s.message())
}

fn print(json_mode: bool, value: Value, human: impl FnOnce() -> String) {
    if json_mode {
        println!("{value}");
    } else {
        println!("{}", human());
    }
}

/// Micro-dollars as dollars, with integer arithmetic only.
fn dollars(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}${}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

pub async fn run(args: AdminArgs) -> Result<()> {
    let mut c = connect(&args).await?;
    let j = args.json;
    match args.command {
        AdminCommand::Org(cmd) => orgs::org(&mut c, j, cmd).await?,
        AdminCommand::Key(cmd) => orgs::key(&mut c, j, cmd).await?,
        AdminCommand::ProviderKey(cmd) => provider_keys::provider_key(&mut c, j, cmd).await?,
        AdminCommand::Billing(cmd) => billing::billing(&mut c, j, cmd).await?,
        AdminCommand::Usage {
            org,
            from,
            to,
            group_by,
        } => reports::usage(&mut c, j, org, from, to, group_by).await?,
        AdminCommand::Audit { org } => reports::audit(&mut c, j, org).await?,
        AdminCommand::RotateMasterKey => provider_keys::rotate_master_key(&mut c, j).await?,
        AdminCommand::Model(cmd) => models::model(&mut c, j, cmd).await?,
        AdminCommand::User(cmd) => users::user(&mut c, j, cmd).await?,
        AdminCommand::Limits(cmd) => limits::limits(&mut c, j, cmd).await?,
        AdminCommand::Proxies => reports::proxies(&mut c, j).await?,
    }
    Ok(())
}
