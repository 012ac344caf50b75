//! The usage ledger as the control plane serves it: recording usage events (exactly once per
//! request id) and an org's totals, grouped by day, month, model or tier.

use flex_shared::proto::admin as apb;
use flex_shared::usage::UsageEvent;

use crate::domain;
use crate::error::{Error, Result};
use crate::{store, ControlPlane};

impl ControlPlane {
    /// Ledger totals for an org over requests received in `[from, to)` (RFC 3339, optional).
    pub async fn get_usage(&self, org_id: &str, from: &str, to: &str) -> Result<apb::UsageSummary> {
        self.get_usage_grouped(org_id, from, to, "").await
    }

    /// Usage totals in `[from, to)`, plus one row per day, month, model or tier when `group_by`
    /// names one (empty: totals only).
    pub async fn get_usage_grouped(
        &self,
        org_id: &str,
        from: &str,
        to: &str,
        group_by: &str,
    ) -> Result<apb::UsageSummary> {
        let from = domain::parse_time("from", from)?;
        let to = domain::parse_time("to", to)?;
        if let (Some(f), Some(t)) = (from, to) {
            if f >= t {
                return Err(Error::InvalidArgument(
                    "`from` must be before `to` (the range is [from, to)), e.g. from=2025-01-01T00:00:00Z to=2025-02-01T00:00:00Z".into(),
                ));
            }
        }
        let group = match group_by {
            "" => None,
            "day" => Some(store::UsageGroupBy::Day),
            "month" => Some(store::UsageGroupBy::Month),
            "model" => Some(store::UsageGroupBy::Model),
            "tier" => Some(store::UsageGroupBy::Tier),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "`group_by` is \"{}\"; use day, month, model or tier (e.g. group_by=day)",
                    domain::clip(other)
                )))
            }
        };
        self.get_org(org_id).await?;
        let t = self.store.usage_summary(org_id, from, to).await?;
        let groups = match group {
            None => Vec::new(),
            Some(g) => self
                .store
                .usage_grouped(org_id, from, to, Some(g))
                .await?
                .into_iter()
                .map(|(key, t)| apb::UsageGroup {
                    key,
                    requests: t.requests,
                    input_tokens: t.input_tokens,
                    output_tokens: t.output_tokens,
                    cost_micros: t.cost_micros,
                    standard_cost_micros: t.standard_cost_micros,
                    savings_micros: t.standard_cost_micros.saturating_sub(t.cost_micros),
                    flex_requests: t.flex_requests,
                })
                .collect(),
        };
        Ok(apb::UsageSummary {
            org_id: org_id.to_string(),
            requests: t.requests,
            input_tokens: t.input_tokens,
            output_tokens: t.output_tokens,
            cost_micros: t.cost_micros,
            standard_cost_micros: t.standard_cost_micros,
            savings_micros: t.standard_cost_micros.saturating_sub(t.cost_micros),
            flex_requests: t.flex_requests,
            groups,
        })
    }

    /// Records usage events in the ledger, exactly once per request id. Returns how many were new.
    pub async fn record_usage(&self, events: &[UsageEvent]) -> Result<u64> {
        for (i, e) in events.iter().enumerate() {
            if let Some(p) = e.ledger_problem() {
                return Err(Error::InvalidArgument(format!(
                    "usage event {i} cannot enter the ledger: {p}. Nothing in this batch was recorded"
                )));
            }
        }
        let inserted = self.store.insert_usage(events).await?;
        tracing::debug!(received = events.len(), inserted, "usage recorded");
        Ok(inserted)
    }

    /// Refuses events whose org does not exist, or whose key belongs to another org (a key this
    /// control plane does not know, e.g. a synthetic one, is let through: the org is what is
    /// billed). An unknown org is looked for again after catching up with the event log, so an
    /// org created a moment ago on another instance is not refused.
    async fn check_tenancy(&self, events: &[UsageEvent]) -> Result<()> {
        let wrong = |state: &crate::projection::State| {
            events.iter().enumerate().find_map(|(i, e)| {
                if !state.orgs.contains_key(&e.org_id) {
                    return Some(format!(
                        "usage event {i}: org `{}` does not exist",
                        domain::clip(&e.org_id)
                    ));
                }
                match state.api_keys.get(&e.key_id) {
                    Some(k) if k.org_id != e.org_id => Some(format!(
                        "usage event {i}: key `{}` does not belong to org `{}`",
                        domain::clip(&e.key_id),
                        domain::clip(&e.org_id)
                    )),
                    _ => None,
                }
            })
        };
        if wrong(&self.state()).is_none() {
            return Ok(());
        }
        self.catch_up().await?;
        match wrong(&self.state()) {
            None => Ok(()),
            Some(why) => Err(Error::InvalidArgument(format!(
                "{why}. Nothing in this batch was recorded; report usage only for orgs and keys of this control plane"
            ))),
        }
    }

    /// Parses JSON usage events (all or nothing) and records them. Returns how many are now in
    /// the ledger from this batch, duplicates included (they were already counted).
    pub async fn report_usage(&self, events_json: &[String]) -> Result<u32> {
        let events = events_json
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::from_str::<UsageEvent>(s).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "events_json[{i}] is not a usage event ({e}); send the JSON of flex_shared::usage::UsageEvent, schema_version 1. Nothing in this batch was recorded"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.check_tenancy(&events).await?;
        self.record_usage(&events).await?;
        u32::try_from(events.len())
            .map_err(|_| Error::InvalidArgument("too many usage events in one batch".into()))
    }
}
