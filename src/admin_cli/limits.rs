//! `flex admin limits`: rate limits, concurrency caps and spend budgets of an org or of one of
//! its API keys, and their current use.

use anyhow::Result;
use clap::Subcommand;
use flex_shared::proto::admin as pb;
use serde_json::{json, Value};

use super::{dollars, print, status_err, Client};

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

pub(super) async fn limits(c: &mut Client, j: bool, cmd: LimitsCmd) -> Result<()> {
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
    Ok(())
}
