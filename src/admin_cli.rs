//! `flex admin`: the operator CLI over the gRPC admin API.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use flex_data_plane::plane_tls::{self, ClientTlsFiles, FlagNames};
use flex_shared::proto::admin::{self as pb, admin_service_client::AdminServiceClient};
use serde_json::{json, Value};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

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
    /// Admin token (sent as `authorization: Bearer …`).
    #[arg(long, env = "FLEX_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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

#[derive(Debug, Subcommand)]
pub enum LimitsCmd {
    /// Sets the limits named (others stay as they are; 0 removes one). Without --key they apply
    /// to all of the org's keys together; with --key to that key (both apply to its requests).
    Set {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        #[arg(long, env = "FLEX_KEY")]
        key: Option<String>,
        /// Requests admitted in any 60-second window.
        #[arg(long, env = "FLEX_RPM")]
        rpm: Option<u64>,
        /// Tokens (input + output) in any 60-second window; a request counts its worst case
        /// (estimated input + max output tokens) until it ends, then its real use.
        #[arg(long, env = "FLEX_TPM")]
        tpm: Option<u64>,
        /// Requests in flight at once.
        #[arg(long, env = "FLEX_CONCURRENCY")]
        concurrency: Option<u64>,
        /// Spend per UTC day, integer micro-dollars (5000000 = $5.00).
        #[arg(long, env = "FLEX_DAILY_BUDGET_MICROS")]
        daily_budget_micros: Option<i64>,
        /// Spend per UTC calendar month, integer micro-dollars.
        #[arg(long, env = "FLEX_MONTHLY_BUDGET_MICROS")]
        monthly_budget_micros: Option<i64>,
    },
    /// The limits, and with --json the current use against each (requests, tokens and requests
    /// in flight from the shared counters; spend from the usage ledger).
    Show {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        #[arg(long, env = "FLEX_KEY")]
        key: Option<String>,
    },
    /// Removes every limit of the org (without --key) or of the key.
    Clear {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        #[arg(long, env = "FLEX_KEY")]
        key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Adds or replaces a model (prices in micro-dollars per million tokens).
    Set {
        #[arg(long, env = "FLEX_ID")]
        id: String,
        #[arg(long, env = "FLEX_PROVIDER", value_parser = ["openai", "anthropic", "gemini"])]
        provider: String,
        /// The model has a flex tier (a duration start_within races it).
        #[arg(long, env = "FLEX_FLEX")]
        flex: bool,
        /// Another name for the model (repeatable, or comma-separated).
        #[arg(long, env = "FLEX_ALIAS", value_delimiter = ',')]
        alias: Vec<String>,
        /// Standard price per million input tokens, micro-dollars.
        #[arg(long, env = "FLEX_INPUT_MICROS")]
        input_micros: i64,
        /// Standard price per million cached input tokens (default: a tenth of input).
        #[arg(long, env = "FLEX_CACHED_INPUT_MICROS")]
        cached_input_micros: Option<i64>,
        /// Standard price per million output tokens.
        #[arg(long, env = "FLEX_OUTPUT_MICROS")]
        output_micros: i64,
        /// Flex price as a share of standard, in percent (default 50).
        #[arg(long, env = "FLEX_FLEX_PERCENT", default_value_t = 50)]
        flex_percent: i64,
        /// Floor of the learned standard start latency (ms) used to hedge the race.
        #[arg(long, env = "FLEX_STANDARD_START_FLOOR_MS", default_value_t = 500)]
        standard_start_floor_ms: u32,
    },
    List,
}

#[derive(Debug, Subcommand)]
pub enum BillingCmd {
    Show {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
    },
    #[command(name = "set-status")]
    SetStatus {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        #[arg(value_parser = ["active", "past_due"])]
        status: String,
    },
    /// Sets the plan and its fee on flex savings.
    #[command(name = "set-plan")]
    SetPlan {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        #[arg(long, env = "FLEX_PLAN")]
        plan: String,
        /// Basis points of the flex savings, 0-10000 (1000 = 10%).
        #[arg(long, env = "FLEX_FEE_BPS")]
        fee_bps: u32,
    },
    /// Invoices the fee on the org's flex savings over [--from, --to) from the usage ledger.
    #[command(name = "issue-invoice")]
    IssueInvoice {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        /// RFC 3339 start of the period (inclusive).
        #[arg(long, env = "FLEX_FROM")]
        from: String,
        /// RFC 3339 end of the period (exclusive); the period must have ended.
        #[arg(long, env = "FLEX_TO")]
        to: String,
        /// RFC 3339 due date (default: 14 days from now).
        #[arg(long, env = "FLEX_DUE_AT")]
        due_at: Option<String>,
        #[arg(long, env = "FLEX_IDEMPOTENCY_KEY")]
        idempotency_key: Option<String>,
    },
    /// Records a payment, against one invoice or open invoices oldest first.
    #[command(name = "record-payment")]
    RecordPayment {
        #[arg(long, env = "FLEX_ORG")]
        org: String,
        /// Integer micro-dollars (12500000 = $12.50).
        #[arg(long, env = "FLEX_AMOUNT_MICROS")]
        amount_micros: i64,
        #[arg(long, env = "FLEX_INVOICE")]
        invoice: Option<String>,
        /// Recommended: a retried call with the same key records the payment once.
        #[arg(long, env = "FLEX_IDEMPOTENCY_KEY")]
        idempotency_key: Option<String>,
    },
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

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// The admin endpoint and token of a local `flex up` from its data dir: `admin-endpoint` (written
/// at every start, so it names the running instance), else the `admin_endpoint` of `demo.json`
/// (data dirs of older builds), and `admin-token`.
fn read_local(dir: &Path) -> (Option<String>, Option<String>) {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let token = read("admin-token");
    let endpoint = read("admin-endpoint").or_else(|| {
        read("demo.json")
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v["admin_endpoint"].as_str().map(str::to_string))
    });
    (endpoint, token)
}

pub async fn connect(args: &AdminArgs) -> Result<Client> {
    let (mut endpoint, mut token) = (args.endpoint.clone(), args.token.clone());
    if let Some(dir) = &args.data_dir {
        let (e, t) = read_local(dir);
        endpoint = endpoint.or(e);
        token = token.or(t);
    }
    let endpoint = endpoint.unwrap_or_else(|| "http://127.0.0.1:50051".to_string());
    let token = token.ok_or_else(|| anyhow!("no admin token: pass --token, set FLEX_ADMIN_TOKEN, or --data-dir of a local `flex up` (which holds admin-token)"))?;
    let channel = Channel::from_shared(endpoint.clone()).with_context(|| {
        format!("invalid admin endpoint `{endpoint}` (expected e.g. http://127.0.0.1:50051)")
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
                "cannot reach the admin API at {endpoint}; is `flex up` or `flex control` running?{tls_hint}"
            )
        })?;
    let value: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .context("the admin token contains characters not allowed in a header")?;
    Ok(AdminServiceClient::with_interceptor(channel, Auth(value)))
}

fn model_json(m: &flex_shared::proto::control::ModelEntry) -> Value {
    json!({
        "id": m.id, "provider": m.provider, "flex_capable": m.flex_capable, "aliases": m.aliases,
        "standard_start_floor_ms": m.standard_start_floor_ms,
        "prices": m.prices.iter().map(|p| json!({"tier": p.tier, "input_per_mtok_micros": p.input_per_mtok_micros, "cached_input_per_mtok_micros": p.cached_input_per_mtok_micros, "output_per_mtok_micros": p.output_per_mtok_micros})).collect::<Vec<_>>(),
    })
}

fn limits_json(v: &pb::LimitsView) -> Value {
    let l = v.limits.clone().unwrap_or_default();
    let opt = |x: u64| if x == 0 { Value::Null } else { json!(x) };
    let money = |x: i64| if x == 0 { Value::Null } else { json!(x) };
    let mut usage = serde_json::Map::new();
    for u in &v.usage {
        let mut o = json!({"limit": u.value, "used": u.used, "remaining": u.remaining, "resets_at": (!u.resets_at.is_empty()).then_some(&u.resets_at), "source": u.source});
        if u.source == "ledger" {
            o["reserved"] = json!(u.reserved);
            o["counted"] = json!(u.counted);
        }
        usage.insert(u.limit.clone(), o);
    }
    let mut out = json!({
        "org_id": v.org_id,
        "key_id": (!v.key_id.is_empty()).then_some(&v.key_id),
        "limits": {
            "rpm": opt(l.rpm), "tpm": opt(l.tpm), "concurrency": opt(l.concurrency),
            "daily_budget_micros": money(l.daily_budget_micros),
            "monthly_budget_micros": money(l.monthly_budget_micros),
        },
    });
    if !v.counters.is_empty() {
        out["usage"] = Value::Object(usage);
        out["counters"] = json!(v.counters);
        out["counters_error"] = json!((!v.counters_error.is_empty()).then_some(&v.counters_error));
    }
    out
}

fn limits_human(v: &pb::LimitsView) -> String {
    let l = v.limits.clone().unwrap_or_default();
    let scope = if v.key_id.is_empty() {
        format!("org {} (all its keys)", v.org_id)
    } else {
        format!("API key {} of org {}", v.key_id, v.org_id)
    };
    let mut lines = vec![format!("limits of {scope}:")];
    let rows: [(&str, i64); 5] = [
        ("rpm", i64::try_from(l.rpm).unwrap_or(i64::MAX)),
        ("tpm", i64::try_from(l.tpm).unwrap_or(i64::MAX)),
        (
            "concurrency",
            i64::try_from(l.concurrency).unwrap_or(i64::MAX),
        ),
        ("daily_budget_micros", l.daily_budget_micros),
        ("monthly_budget_micros", l.monthly_budget_micros),
    ];
    if rows.iter().all(|(_, v)| *v == 0) {
        lines.push("  none".into());
    }
    for (name, value) in rows.iter().filter(|(_, v)| *v != 0) {
        let shown = if name.ends_with("_micros") {
            dollars(*value)
        } else {
            value.to_string()
        };
        let used = v
            .usage
            .iter()
            .find(|u| u.limit == *name)
            .map(|u| {
                let used = u.used.map_or("unknown".to_string(), |x| {
                    if name.ends_with("_micros") {
                        dollars(x)
                    } else {
                        x.to_string()
                    }
                });
                let reserved = u
                    .reserved
                    .filter(|r| *r > 0)
                    .map(|r| format!(", {} held in flight", dollars(r)))
                    .unwrap_or_default();
                let resets = if u.resets_at.is_empty() {
                    String::new()
                } else {
                    format!(", resets {}", u.resets_at)
                };
                format!("  (used {used}{reserved}{resets})")
            })
            .unwrap_or_default();
        lines.push(format!("  {name}: {shown}{used}"));
    }
    if !v.counters_error.is_empty() {
        lines.push(format!(
            "counters ({}) unreadable: {}",
            v.counters, v.counters_error
        ));
    }
    lines.join("\n")
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

fn org_json(o: &pb::Org) -> Value {
    json!({"org_id": o.org_id, "name": o.name, "status": o.status, "created_at": o.created_at})
}

fn key_json(k: &pb::ApiKey) -> Value {
    json!({"key_id": k.key_id, "org_id": k.org_id, "name": k.name, "hint": k.hint, "status": k.status, "created_at": k.created_at, "revoked_at": k.revoked_at, "expires_at": k.expires_at})
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

fn pkey_json(p: &pb::ProviderKey) -> Value {
    json!({"org_id": p.org_id, "provider": p.provider, "last4": p.last4, "status": p.status, "master_key_id": p.master_key_id, "updated_at": p.updated_at})
}

fn invoice_json(i: &pb::Invoice) -> Value {
    json!({"invoice_id": i.invoice_id, "org_id": i.org_id, "period_from": i.period_from, "period_to": i.period_to, "amount_micros": i.amount_micros, "paid_micros": i.paid_micros, "open_micros": i.open_micros, "due_at": i.due_at, "status": i.status, "savings_micros": i.savings_micros, "fee_bps": i.fee_bps, "issued_at": i.issued_at})
}

fn billing_json(b: &pb::BillingAccount) -> Value {
    json!({"org_id": b.org_id, "status": b.status, "status_reason": b.status_reason, "plan": b.plan, "fee_bps": b.fee_bps, "balance_due_micros": b.balance_due_micros, "invoiced_micros": b.invoiced_micros, "paid_micros": b.paid_micros, "open_invoices": b.open_invoices.iter().map(invoice_json).collect::<Vec<_>>()})
}

/// Micro-dollars as dollars, with integer arithmetic only.
fn dollars(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}${}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

fn invoice_line(i: &pb::Invoice) -> String {
    format!(
        "{}  [{}, {})  {} of {} open  due {}  {}",
        i.invoice_id,
        i.period_from,
        i.period_to,
        dollars(i.open_micros),
        dollars(i.amount_micros),
        i.due_at,
        i.status
    )
}

fn billing_human(b: &pb::BillingAccount) -> String {
    let reason = if b.status_reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", b.status_reason)
    };
    let mut lines = vec![
        format!("org {}: billing {}{reason}", b.org_id, b.status),
        format!("plan {}, fee {} bps of flex savings", b.plan, b.fee_bps),
        format!(
            "balance due {} ({} open invoices; invoiced {}, paid {})",
            dollars(b.balance_due_micros),
            b.open_invoices.len(),
            dollars(b.invoiced_micros),
            dollars(b.paid_micros)
        ),
    ];
    lines.extend(
        b.open_invoices
            .iter()
            .map(|i| format!("  {}", invoice_line(i))),
    );
    lines.join("\n")
}

pub async fn run(args: AdminArgs) -> Result<()> {
    let mut c = connect(&args).await?;
    let j = args.json;
    match args.command {
        AdminCommand::Org(cmd) => match cmd {
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
        },
        AdminCommand::Key(cmd) => match cmd {
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
        },
        AdminCommand::ProviderKey(cmd) => match cmd {
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
        },
        AdminCommand::Billing(cmd) => match cmd {
            BillingCmd::Show { org } => {
                let b = c
                    .get_billing(pb::OrgRef { org_id: org })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                print(j, billing_json(&b), || billing_human(&b));
            }
            BillingCmd::SetPlan { org, plan, fee_bps } => {
                let b = c
                    .set_billing_plan(pb::SetBillingPlanRequest {
                        org_id: org,
                        plan,
                        fee_bps: Some(fee_bps),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                print(j, billing_json(&b), || {
                    format!(
                        "org {}: plan {}, fee {} bps of flex savings",
                        b.org_id, b.plan, b.fee_bps
                    )
                });
            }
            BillingCmd::IssueInvoice {
                org,
                from,
                to,
                due_at,
                idempotency_key,
            } => {
                let i = c
                    .issue_invoice(pb::IssueInvoiceRequest {
                        org_id: org,
                        period_from: from,
                        period_to: to,
                        due_at: due_at.unwrap_or_default(),
                        idempotency_key: idempotency_key.unwrap_or_default(),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                print(j, invoice_json(&i), || {
                    format!(
                        "issued {} ({} bps of {} flex savings)",
                        invoice_line(&i),
                        i.fee_bps,
                        dollars(i.savings_micros)
                    )
                });
            }
            BillingCmd::RecordPayment {
                org,
                amount_micros,
                invoice,
                idempotency_key,
            } => {
                let p = c
                    .record_payment(pb::RecordPaymentRequest {
                        org_id: org,
                        invoice_id: invoice.unwrap_or_default(),
                        amount_micros,
                        idempotency_key: idempotency_key.unwrap_or_default(),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                let account = p.account.unwrap_or_default();
                print(
                    j,
                    json!({"payment_id": p.payment_id, "org_id": p.org_id, "invoice_id": p.invoice_id, "amount_micros": p.amount_micros, "account": billing_json(&account)}),
                    || {
                        format!(
                            "recorded payment {} of {}\n{}",
                            p.payment_id,
                            dollars(p.amount_micros),
                            billing_human(&account)
                        )
                    },
                );
            }
            BillingCmd::SetStatus { org, status } => {
                let b = c
                    .set_billing_status(pb::SetBillingStatusRequest {
                        org_id: org,
                        status,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                print(j, billing_json(&b), || {
                    format!("org {}: billing {}", b.org_id, b.status)
                });
            }
        },
        AdminCommand::Usage {
            org,
            from,
            to,
            group_by,
        } => {
            let u = c
                .get_usage(pb::GetUsageRequest {
                    org_id: org,
                    from: from.unwrap_or_default(),
                    to: to.unwrap_or_default(),
                    group_by: group_by.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let groups: Vec<Value> = u
                .groups
                .iter()
                .map(|g| json!({"key": g.key, "requests": g.requests, "flex_requests": g.flex_requests, "input_tokens": g.input_tokens, "output_tokens": g.output_tokens, "cost_micros": g.cost_micros, "standard_cost_micros": g.standard_cost_micros, "savings_micros": g.savings_micros}))
                .collect();
            let mut v = json!({"org_id": u.org_id, "requests": u.requests, "flex_requests": u.flex_requests, "input_tokens": u.input_tokens, "output_tokens": u.output_tokens, "cost_micros": u.cost_micros, "standard_cost_micros": u.standard_cost_micros, "savings_micros": u.savings_micros});
            if !groups.is_empty() {
                v["groups"] = Value::Array(groups);
            }
            print(j, v, || {
                let mut lines = vec![format!(
                    "org {}: {} requests ({} on flex), {} input / {} output tokens, spend {}, standard would be {}, saved {}",
                    u.org_id, u.requests, u.flex_requests, u.input_tokens, u.output_tokens,
                    dollars(u.cost_micros), dollars(u.standard_cost_micros), dollars(u.savings_micros)
                )];
                lines.extend(u.groups.iter().map(|g| {
                    format!(
                        "  {:<24} {:>8} requests {:>8} flex  spend {:>14}  saved {:>14}",
                        g.key,
                        g.requests,
                        g.flex_requests,
                        dollars(g.cost_micros),
                        dollars(g.savings_micros)
                    )
                }));
                lines.join("\n")
            });
        }
        AdminCommand::Audit { org } => {
            let r = c
                .list_audit_events(pb::OrgRef { org_id: org })
                .await
                .map_err(status_err)?
                .into_inner();
            let events: Vec<Value> = r
                .events
                .iter()
                .map(|e| json!({"seq": e.seq, "stream_id": e.stream_id, "stream_version": e.stream_version, "event_type": e.event_type, "schema_version": e.schema_version, "actor": e.actor, "request_id": e.request_id, "recorded_at": e.recorded_at, "summary": e.summary, "payload": serde_json::from_str::<Value>(&e.payload_json).unwrap_or(Value::Null)}))
                .collect();
            print(j, json!({"events": events}), || {
                r.events
                    .iter()
                    .map(|e| {
                        format!(
                            "#{:<6} {}  {:<22} {}  (by {})",
                            e.seq, e.recorded_at, e.event_type, e.summary, e.actor
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        AdminCommand::RotateMasterKey => {
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
        }
        AdminCommand::Model(ModelCmd::Set {
            id,
            provider,
            flex,
            alias,
            input_micros,
            cached_input_micros,
            output_micros,
            flex_percent,
            standard_start_floor_ms,
        }) => {
            use flex_shared::proto::control::{ModelEntry, TierPrice};
            let cached = cached_input_micros.unwrap_or(input_micros / 10);
            let price = |tier: &str, pct: i64| TierPrice {
                tier: tier.to_string(),
                input_per_mtok_micros: input_micros * pct / 100,
                cached_input_per_mtok_micros: cached * pct / 100,
                output_per_mtok_micros: output_micros * pct / 100,
            };
            let mut prices = vec![price("standard", 100)];
            if flex {
                prices.push(price("flex", flex_percent));
            }
            let m = c
                .set_model(ModelEntry {
                    id,
                    provider,
                    flex_capable: flex,
                    aliases: alias,
                    prices,
                    standard_start_floor_ms,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, model_json(&m), || {
                format!(
                    "model {} set for every proxy ({}, flex {})",
                    m.id, m.provider, m.flex_capable
                )
            });
        }
        AdminCommand::Model(ModelCmd::List) => {
            let r = c
                .list_models(pb::ListModelsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            print(
                j,
                json!({"models": r.models.iter().map(model_json).collect::<Vec<_>>()}),
                || {
                    r.models
                        .iter()
                        .map(|m| {
                            format!(
                                "{}  {}  flex={}  aliases={:?}",
                                m.id, m.provider, m.flex_capable, m.aliases
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        AdminCommand::User(cmd) => user(&mut c, j, cmd).await?,
        AdminCommand::Limits(cmd) => {
            let v = match cmd {
                LimitsCmd::Set {
                    org,
                    key,
                    rpm,
                    tpm,
                    concurrency,
                    daily_budget_micros,
                    monthly_budget_micros,
                } => c
                    .set_limits(pb::SetLimitsRequest {
                        org_id: org,
                        key_id: key.unwrap_or_default(),
                        rpm,
                        tpm,
                        concurrency,
                        daily_budget_micros,
                        monthly_budget_micros,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner(),
                LimitsCmd::Show { org, key } => c
                    .get_limits(pb::LimitsRef {
                        org_id: org,
                        key_id: key.unwrap_or_default(),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner(),
                LimitsCmd::Clear { org, key } => c
                    .clear_limits(pb::LimitsRef {
                        org_id: org,
                        key_id: key.unwrap_or_default(),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner(),
            };
            print(j, limits_json(&v), || limits_human(&v));
        }
        AdminCommand::Proxies => {
            let r = c
                .list_proxies(pb::ListProxiesRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let list: Vec<Value> = r
                .proxies
                .iter()
                .map(|p| json!({"proxy_id": p.proxy_id, "applied_version": p.applied_version, "connected": p.connected, "transport": p.transport, "connected_since": p.connected_since, "last_seen": p.last_seen, "last_error": p.last_error}))
                .collect();
            print(
                j,
                json!({"current_version": r.current_version, "proxies": list}),
                || {
                    let mut lines = vec![format!("control plane at version {}", r.current_version)];
                    lines.extend(r.proxies.iter().map(|p| {
                        format!(
                            "{}  v{}  {}  {}  last seen {}",
                            p.proxy_id,
                            p.applied_version,
                            if p.connected {
                                "connected"
                            } else {
                                "disconnected"
                            },
                            p.transport,
                            p.last_seen
                        )
                    }));
                    lines.join("\n")
                },
            );
        }
    }
    Ok(())
}

async fn user(c: &mut Client, j: bool, cmd: UserCmd) -> Result<()> {
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
