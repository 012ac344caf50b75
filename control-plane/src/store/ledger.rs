//! The usage ledger: one row per request (a duplicate `request_id` is ignored), and its totals
//! for an org, grouped or not, and the spend the budgets count.

use flex_shared::usage::UsageEvent;
use time::OffsetDateTime;

use super::{i64_of, u64_of, Result, Store, StoreError};
use crate::timefmt;

/// How `usage_grouped` groups the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroupBy {
    Day,
    Month,
    Model,
    Tier,
}

/// Ledger totals for one org.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_micros: i64,
    pub standard_cost_micros: i64,
    pub flex_requests: u64,
}

/// A usage event flattened into the ledger's column types.
struct UsageRow<'a> {
    e: &'a UsageEvent,
    flex_wait_ms: i64,
    start_latency_ms: i64,
    duration_ms: i64,
    input_tokens: i64,
    cached_input_tokens: i64,
    output_tokens: i64,
    reasoning_tokens: i64,
    tiers_started: String,
    received_at: OffsetDateTime,
}

impl<'a> UsageRow<'a> {
    fn new(e: &'a UsageEvent, now: OffsetDateTime) -> Result<Self> {
        let received_at = match timefmt::parse(&e.received_at) {
            Some(t) => t,
            None => {
                tracing::warn!(
                    request_id = %e.request_id,
                    "usage event has no valid received_at; using the time it was recorded"
                );
                now
            }
        };
        Ok(Self {
            e,
            flex_wait_ms: i64_of(e.flex_wait_ms, "flex_wait_ms")?,
            start_latency_ms: i64_of(e.start_latency_ms, "start_latency_ms")?,
            duration_ms: i64_of(e.duration_ms, "duration_ms")?,
            input_tokens: i64_of(e.input_tokens, "input_tokens")?,
            cached_input_tokens: i64_of(e.cached_input_tokens, "cached_input_tokens")?,
            output_tokens: i64_of(e.output_tokens, "output_tokens")?,
            reasoning_tokens: i64_of(e.reasoning_tokens, "reasoning_tokens")?,
            tiers_started: serde_json::to_string(&e.tiers_started)
                .map_err(|err| StoreError::OutOfRange(format!("tiers_started: {err}")))?,
            received_at,
        })
    }
}

const USAGE_COLUMNS: &str = "request_id, schema_version, org_id, key_id, model, provider, \
    caller_format, start_within, served_tier, reason, flex_wait_ms, start_latency_ms, duration_ms, \
    input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, status, outcome, \
    tiers_started, cost_micros, standard_cost_micros, received_at, recorded_at";

/// Rows per SQLite `INSERT`: 24 parameters each, well under SQLite's 32,766 per statement.
const SQLITE_ROWS_PER_INSERT: usize = 500;

impl Store {
    /// Inserts usage events in one transaction, ignoring request ids already in the ledger.
    /// Returns how many rows were new.
    pub async fn insert_usage(&self, events: &[UsageEvent]) -> Result<u64> {
        if events.is_empty() {
            return Ok(0);
        }
        let now = timefmt::now();
        let rows = events
            .iter()
            .map(|e| UsageRow::new(e, now))
            .collect::<Result<Vec<_>>>()?;
        let mut inserted = 0;
        match self {
            Store::Sqlite(pool) => {
                // Multi-row statements, so a group costs a few round trips to SQLite's thread
                // (begin, one per chunk, commit), not one per event.
                let recorded = timefmt::format(now);
                let mut tx = pool.begin().await?;
                for chunk in rows.chunks(SQLITE_ROWS_PER_INSERT) {
                    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
                        "INSERT INTO usage_ledger ({USAGE_COLUMNS}) "
                    ));
                    q.push_values(chunk, |mut b, r| {
                        let e = r.e;
                        b.push_bind(e.request_id.as_str())
                            .push_bind(i64::from(e.schema_version))
                            .push_bind(e.org_id.as_str())
                            .push_bind(e.key_id.as_str())
                            .push_bind(e.model.as_str())
                            .push_bind(e.provider.as_str())
                            .push_bind(e.caller_format.as_str())
                            .push_bind(e.start_within.as_str())
                            .push_bind(e.served_tier.as_str())
                            .push_bind(e.reason.as_str())
                            .push_bind(r.flex_wait_ms)
                            .push_bind(r.start_latency_ms)
                            .push_bind(r.duration_ms)
                            .push_bind(r.input_tokens)
                            .push_bind(r.cached_input_tokens)
                            .push_bind(r.output_tokens)
                            .push_bind(r.reasoning_tokens)
                            .push_bind(i64::from(e.status))
                            .push_bind(e.outcome.as_str())
                            .push_bind(r.tiers_started.as_str())
                            .push_bind(e.cost_micros)
                            .push_bind(e.standard_cost_micros)
                            .push_bind(timefmt::format(r.received_at))
                            .push_bind(recorded.as_str());
                    });
                    q.push(" ON CONFLICT (request_id) DO NOTHING");
                    // Not kept in the connection's statement cache: each group size is its own
                    // SQL text, and a cached 500-row statement is a large compiled program, so
                    // caching them held tens of MiB per connection after a burst of traffic.
                    let done = q.build().persistent(false).execute(&mut *tx).await?;
                    inserted += done.rows_affected();
                }
                tx.commit().await?;
            }
            Store::Postgres(pool) => {
                // One statement per batch: a column array per field, unnested into rows.
                let sql = format!(
                    "INSERT INTO usage_ledger ({USAGE_COLUMNS}) \
                     SELECT request_id, schema_version, org_id, key_id, model, provider, \
                       caller_format, start_within, served_tier, reason, flex_wait_ms, \
                       start_latency_ms, duration_ms, input_tokens, cached_input_tokens, \
                       output_tokens, reasoning_tokens, status, outcome, tiers_started::json, \
                       cost_micros, standard_cost_micros, received_at, $24 \
                     FROM UNNEST($1::TEXT[], $2::INT4[], $3::TEXT[], $4::TEXT[], $5::TEXT[], \
                       $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::INT8[], \
                       $12::INT8[], $13::INT8[], $14::INT8[], $15::INT8[], $16::INT8[], \
                       $17::INT8[], $18::INT4[], $19::TEXT[], $20::TEXT[], $21::INT8[], \
                       $22::INT8[], $23::TIMESTAMPTZ[]) \
                     AS u(request_id, schema_version, org_id, key_id, model, provider, \
                       caller_format, start_within, served_tier, reason, flex_wait_ms, \
                       start_latency_ms, duration_ms, input_tokens, cached_input_tokens, \
                       output_tokens, reasoning_tokens, status, outcome, tiers_started, \
                       cost_micros, standard_cost_micros, received_at) \
                     ON CONFLICT (request_id) DO NOTHING"
                );
                let n = rows.len();
                let mut schema_version = Vec::with_capacity(n);
                for r in &rows {
                    schema_version.push(i32::try_from(r.e.schema_version).map_err(|_| {
                        StoreError::OutOfRange(format!("schema_version = {}", r.e.schema_version))
                    })?);
                }
                let text = |f: fn(&UsageEvent) -> &String| -> Vec<&str> {
                    rows.iter().map(|r| f(r.e).as_str()).collect()
                };
                let int =
                    |f: fn(&UsageRow<'_>) -> i64| -> Vec<i64> { rows.iter().map(f).collect() };
                // A single statement is atomic: all rows or none.
                let done = sqlx::query(&sql)
                    .bind(text(|e| &e.request_id))
                    .bind(schema_version)
                    .bind(text(|e| &e.org_id))
                    .bind(text(|e| &e.key_id))
                    .bind(text(|e| &e.model))
                    .bind(text(|e| &e.provider))
                    .bind(text(|e| &e.caller_format))
                    .bind(text(|e| &e.start_within))
                    .bind(text(|e| &e.served_tier))
                    .bind(text(|e| &e.reason))
                    .bind(int(|r| r.flex_wait_ms))
                    .bind(int(|r| r.start_latency_ms))
                    .bind(int(|r| r.duration_ms))
                    .bind(int(|r| r.input_tokens))
                    .bind(int(|r| r.cached_input_tokens))
                    .bind(int(|r| r.output_tokens))
                    .bind(int(|r| r.reasoning_tokens))
                    .bind(
                        rows.iter()
                            .map(|r| i32::from(r.e.status))
                            .collect::<Vec<_>>(),
                    )
                    .bind(text(|e| &e.outcome))
                    .bind(
                        rows.iter()
                            .map(|r| r.tiers_started.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(int(|r| r.e.cost_micros))
                    .bind(int(|r| r.e.standard_cost_micros))
                    .bind(rows.iter().map(|r| r.received_at).collect::<Vec<_>>())
                    .bind(now)
                    .execute(pool)
                    .await?;
                inserted = done.rows_affected();
            }
        }
        crate::metrics::metrics().ledger_inserts.inc_by(inserted);
        Ok(inserted)
    }

    /// Ledger totals for `org_id` over requests received in `[from, to)` (either bound optional).
    pub async fn usage_summary(
        &self,
        org_id: &str,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Result<UsageTotals> {
        let rows = self.usage_grouped(org_id, from, to, None).await?;
        Ok(rows.into_iter().next().map(|(_, t)| t).unwrap_or_default())
    }

    /// Ledger totals for one org in `[from, to)`, one row per group (`None`: one row in all).
    /// Groups are ordered by key.
    pub async fn usage_grouped(
        &self,
        org_id: &str,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
        group: Option<UsageGroupBy>,
    ) -> Result<Vec<(String, UsageTotals)>> {
        let rows: Vec<(String, i64, i64, i64, i64, i64, i64)> = match self {
            Store::Sqlite(pool) => {
                let key = match group {
                    None => "''",
                    Some(UsageGroupBy::Day) => "substr(received_at, 1, 10)",
                    Some(UsageGroupBy::Month) => "substr(received_at, 1, 7)",
                    Some(UsageGroupBy::Model) => "model",
                    Some(UsageGroupBy::Tier) => "served_tier",
                };
                let mut sql = format!(
                    "SELECT {key} AS k, COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), \
                     COALESCE(SUM(cost_micros), 0), COALESCE(SUM(standard_cost_micros), 0), \
                     COALESCE(SUM(CASE WHEN served_tier = 'flex' THEN 1 ELSE 0 END), 0) \
                     FROM usage_ledger WHERE org_id = ?"
                );
                if from.is_some() {
                    sql.push_str(" AND received_at >= ?");
                }
                if to.is_some() {
                    sql.push_str(" AND received_at < ?");
                }
                sql.push_str(" GROUP BY k ORDER BY k");
                let mut q = sqlx::query_as(&sql).bind(org_id);
                for t in [from, to].into_iter().flatten() {
                    q = q.bind(timefmt::format(t));
                }
                q.fetch_all(pool).await?
            }
            Store::Postgres(pool) => {
                let key = match group {
                    None => "''::TEXT",
                    Some(UsageGroupBy::Day) => {
                        "to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
                    }
                    Some(UsageGroupBy::Month) => {
                        "to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM')"
                    }
                    Some(UsageGroupBy::Model) => "model",
                    Some(UsageGroupBy::Tier) => "served_tier",
                };
                let mut sql = format!(
                    "SELECT {key} AS k, COUNT(*)::BIGINT, COALESCE(SUM(input_tokens), 0)::BIGINT, \
                     COALESCE(SUM(output_tokens), 0)::BIGINT, COALESCE(SUM(cost_micros), 0)::BIGINT, \
                     COALESCE(SUM(standard_cost_micros), 0)::BIGINT, \
                     (COUNT(*) FILTER (WHERE served_tier = 'flex'))::BIGINT \
                     FROM usage_ledger WHERE org_id = $1"
                );
                let mut n = 1;
                if from.is_some() {
                    n += 1;
                    sql.push_str(&format!(" AND received_at >= ${n}"));
                }
                if to.is_some() {
                    n += 1;
                    sql.push_str(&format!(" AND received_at < ${n}"));
                }
                sql.push_str(" GROUP BY k ORDER BY k");
                let mut q = sqlx::query_as(&sql).bind(org_id);
                for t in [from, to].into_iter().flatten() {
                    q = q.bind(t);
                }
                q.fetch_all(pool).await?
            }
        };
        rows.into_iter()
            .map(|r| {
                Ok((
                    r.0,
                    UsageTotals {
                        requests: u64_of(r.1, "requests")?,
                        input_tokens: u64_of(r.2, "input_tokens")?,
                        output_tokens: u64_of(r.3, "output_tokens")?,
                        cost_micros: r.4,
                        standard_cost_micros: r.5,
                        flex_requests: u64_of(r.6, "flex_requests")?,
                    },
                ))
            })
            .collect()
    }

    /// The spend (`cost_micros`) in the ledger of an org, or of one of its keys, for requests
    /// received at or after `from` (the budgets' `used`).
    pub async fn spend_since(
        &self,
        org_id: &str,
        key_id: Option<&str>,
        from: OffsetDateTime,
    ) -> Result<i64> {
        let spend: i64 = match self {
            Store::Sqlite(pool) => {
                let mut sql = "SELECT COALESCE(SUM(cost_micros), 0) FROM usage_ledger WHERE org_id = ? AND received_at >= ?".to_string();
                if key_id.is_some() {
                    sql.push_str(" AND key_id = ?");
                }
                let mut q = sqlx::query_scalar(&sql)
                    .bind(org_id)
                    .bind(timefmt::format(from));
                if let Some(k) = key_id {
                    q = q.bind(k);
                }
                q.fetch_one(pool).await?
            }
            Store::Postgres(pool) => {
                let mut sql = "SELECT COALESCE(SUM(cost_micros), 0)::BIGINT FROM usage_ledger WHERE org_id = $1 AND received_at >= $2".to_string();
                if key_id.is_some() {
                    sql.push_str(" AND key_id = $3");
                }
                let mut q = sqlx::query_scalar(&sql).bind(org_id).bind(from);
                if let Some(k) = key_id {
                    q = q.bind(k);
                }
                q.fetch_one(pool).await?
            }
        };
        Ok(spend)
    }
}
