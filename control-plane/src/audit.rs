//! The audit log of an org: its events in log order, each with a readable summary, with hashes
//! and ciphertexts elided from the payload.

use flex_shared::catalog::Provider;
use flex_shared::proto::admin as apb;

use crate::domain::{self, Event};
use crate::error::Result;
use crate::{timefmt, ControlPlane};

/// Replaces hashes and ciphertexts in an event payload (at any depth) for the audit log.
fn elide_payload(payload: &str) -> String {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, val) in map.iter_mut() {
                    match k.as_str() {
                        "sealed" => {
                            let id = val
                                .get("master_key_id")
                                .cloned()
                                .unwrap_or(serde_json::Value::Null);
                            *val = serde_json::json!({ "master_key_id": id, "ciphertext": "<elided>" });
                        }
                        "key_hash" | "wrapped_dek" | "ciphertext" | "secret" | "password_hash"
                        | "token_hash" => {
                            *val = serde_json::Value::String("<elided>".into());
                        }
                        _ => walk(val),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(mut v) => {
            walk(&mut v);
            v.to_string()
        }
        Err(_) => r#"{"error":"payload cannot be parsed; elided"}"#.to_string(),
    }
}

impl ControlPlane {
    /// The org's events (org, billing, provider keys, its API keys) in log order, readable, with
    /// hashes and ciphertexts elided.
    pub async fn list_audit_events(&self, org_id: &str) -> Result<Vec<apb::AuditEvent>> {
        self.catch_up().await?;
        let state = self.state();
        self.org_or_not_found(&state, org_id)?;
        let mut streams = vec![
            domain::org_stream(org_id),
            domain::billing_stream(org_id),
            domain::limits_stream(org_id, None),
        ];
        streams.extend(
            Provider::ALL
                .iter()
                .map(|p| domain::provider_key_stream(org_id, p.as_str())),
        );
        streams.extend(
            state
                .api_keys
                .values()
                .filter(|k| k.org_id == org_id)
                .flat_map(|k| {
                    [
                        domain::api_key_stream(&k.key_id),
                        domain::limits_stream(org_id, Some(&k.key_id)),
                    ]
                }),
        );
        let events = self.store.read_streams(&streams).await?;
        Ok(events
            .iter()
            .map(|e| apb::AuditEvent {
                seq: e.seq,
                stream_id: e.stream_id.clone(),
                stream_version: e.stream_version,
                event_type: e.event_type.clone(),
                schema_version: e.schema_version,
                payload_json: elide_payload(&e.payload),
                actor: e.actor.clone(),
                request_id: e.request_id.clone(),
                recorded_at: timefmt::format(e.recorded_at),
                summary: Event::from_stored(e).map_or_else(
                    |_| format!("{} (not readable by this build)", e.event_type),
                    |ev| ev.summary(),
                ),
            })
            .collect())
    }
}
