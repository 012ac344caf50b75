//! `flex admin usage`, `audit` and `proxies`: an org's usage totals, its audit log, and the
//! proxies connected to the control plane.

use anyhow::Result;
use flex_shared::proto::admin as pb;
use serde_json::{json, Value};

use super::{dollars, print, status_err, Client};

pub(super) async fn usage(
    c: &mut Client,
    j: bool,
    org: String,
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
) -> Result<()> {
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
    Ok(())
}

pub(super) async fn audit(c: &mut Client, j: bool, org: String) -> Result<()> {
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
    Ok(())
}

pub(super) async fn proxies(c: &mut Client, j: bool) -> Result<()> {
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
    Ok(())
}
