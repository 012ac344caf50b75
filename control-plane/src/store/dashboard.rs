//! What the dashboard reads and writes beside the event log: browser sessions (only a hash of
//! each token), and read models of the usage ledger (per day, model and tier; recent requests; an
//! API key's last use).

use sqlx::Row;
use time::OffsetDateTime;

use super::{u64_of, Result, Store, StoreError, UsageTotals};
use crate::timefmt;

/// A signed-in session as stored: whose it is and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub user_id: String,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

/// Ledger totals of one (UTC day, model, served tier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDailyRow {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub model: String,
    pub served_tier: String,
    pub totals: UsageTotals,
}

/// One request of the ledger, as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentRequest {
    pub request_id: String,
    pub key_id: String,
    pub model: String,
    pub provider: String,
    pub caller_format: String,
    pub start_within: String,
    pub served_tier: String,
    pub reason: String,
    pub status: u16,
    pub outcome: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_micros: i64,
    pub standard_cost_micros: i64,
    pub received_at: OffsetDateTime,
}

fn time_of(s: &str, what: &str) -> Result<OffsetDateTime> {
    timefmt::parse(s).ok_or_else(|| StoreError::Corrupt(format!("{what} `{s}`")))
}

type DailyTuple = (String, String, String, i64, i64, i64, i64, i64, i64);

fn daily_row(r: DailyTuple) -> Result<UsageDailyRow> {
    Ok(UsageDailyRow {
        day: r.0,
        model: r.1,
        served_tier: r.2,
        totals: UsageTotals {
            requests: u64_of(r.3, "requests")?,
            input_tokens: u64_of(r.4, "input_tokens")?,
            output_tokens: u64_of(r.5, "output_tokens")?,
            cost_micros: r.6,
            standard_cost_micros: r.7,
            flex_requests: u64_of(r.8, "flex_requests")?,
        },
    })
}

const RECENT_COLUMNS: &str = "request_id, key_id, model, provider, caller_format, start_within, \
    served_tier, reason, status, outcome, input_tokens, output_tokens, cost_micros, \
    standard_cost_micros, received_at";

impl Store {
    /// Records a new session (`token_hash` = hex SHA-256 of the cookie's token).
    pub async fn session_insert(
        &self,
        token_hash: &str,
        user_id: &str,
        created_at: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<()> {
        match self {
            Store::Sqlite(pool) => {
                sqlx::query(
                    "INSERT INTO dashboard_sessions (token_hash, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                )
                .bind(token_hash)
                .bind(user_id)
                .bind(timefmt::format(created_at))
                .bind(timefmt::format(expires_at))
                .execute(pool)
                .await?;
            }
            Store::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO dashboard_sessions (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(token_hash)
                .bind(user_id)
                .bind(created_at)
                .bind(expires_at)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// The session whose token hashes to `token_hash`, expired or not.
    pub async fn session_get(&self, token_hash: &str) -> Result<Option<SessionRow>> {
        match self {
            Store::Sqlite(pool) => {
                let row: Option<(String, String, String)> = sqlx::query_as(
                    "SELECT user_id, created_at, expires_at FROM dashboard_sessions WHERE token_hash = ?",
                )
                .bind(token_hash)
                .fetch_optional(pool)
                .await?;
                row.map(|(user_id, c, e)| {
                    Ok(SessionRow {
                        user_id,
                        created_at: time_of(&c, "created_at")?,
                        expires_at: time_of(&e, "expires_at")?,
                    })
                })
                .transpose()
            }
            Store::Postgres(pool) => {
                let row: Option<(String, OffsetDateTime, OffsetDateTime)> = sqlx::query_as(
                    "SELECT user_id, created_at, expires_at FROM dashboard_sessions WHERE token_hash = $1",
                )
                .bind(token_hash)
                .fetch_optional(pool)
                .await?;
                Ok(row.map(|(user_id, created_at, expires_at)| SessionRow {
                    user_id,
                    created_at,
                    expires_at,
                }))
            }
        }
    }

    /// Ends one session (signing out). Returns whether there was one.
    pub async fn session_delete(&self, token_hash: &str) -> Result<bool> {
        let done = match self {
            Store::Sqlite(pool) => {
                sqlx::query("DELETE FROM dashboard_sessions WHERE token_hash = ?")
                    .bind(token_hash)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
            Store::Postgres(pool) => {
                sqlx::query("DELETE FROM dashboard_sessions WHERE token_hash = $1")
                    .bind(token_hash)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        };
        Ok(done > 0)
    }

    /// Ends every session of a user (a disabled account). Returns how many there were.
    pub async fn sessions_delete_user(&self, user_id: &str) -> Result<u64> {
        Ok(match self {
            Store::Sqlite(pool) => sqlx::query("DELETE FROM dashboard_sessions WHERE user_id = ?")
                .bind(user_id)
                .execute(pool)
                .await?
                .rows_affected(),
            Store::Postgres(pool) => {
                sqlx::query("DELETE FROM dashboard_sessions WHERE user_id = $1")
                    .bind(user_id)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        })
    }

    /// Drops the sessions that expired before `now`.
    pub async fn sessions_delete_expired(&self, now: OffsetDateTime) -> Result<u64> {
        Ok(match self {
            Store::Sqlite(pool) => {
                sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at < ?")
                    .bind(timefmt::format(now))
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
            Store::Postgres(pool) => {
                sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at < $1")
                    .bind(now)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        })
    }

    /// Ledger totals of `org_id` for requests received in `[from, to)`, one row per (UTC day,
    /// model, served tier), ordered by day, then model, then tier.
    pub async fn usage_daily(
        &self,
        org_id: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageDailyRow>> {
        let rows: Vec<DailyTuple> = match self {
            Store::Sqlite(pool) => {
                sqlx::query_as(
                    "SELECT substr(received_at, 1, 10) AS d, model, served_tier, COUNT(*), \
                     COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), \
                     COALESCE(SUM(cost_micros), 0), COALESCE(SUM(standard_cost_micros), 0), \
                     COALESCE(SUM(CASE WHEN served_tier = 'flex' THEN 1 ELSE 0 END), 0) \
                     FROM usage_ledger WHERE org_id = ? AND received_at >= ? AND received_at < ? \
                     GROUP BY d, model, served_tier ORDER BY d, model, served_tier",
                )
                .bind(org_id)
                .bind(timefmt::format(from))
                .bind(timefmt::format(to))
                .fetch_all(pool)
                .await?
            }
            Store::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS d, model, \
                     served_tier, COUNT(*)::BIGINT, COALESCE(SUM(input_tokens), 0)::BIGINT, \
                     COALESCE(SUM(output_tokens), 0)::BIGINT, COALESCE(SUM(cost_micros), 0)::BIGINT, \
                     COALESCE(SUM(standard_cost_micros), 0)::BIGINT, \
                     (COUNT(*) FILTER (WHERE served_tier = 'flex'))::BIGINT \
                     FROM usage_ledger WHERE org_id = $1 AND received_at >= $2 AND received_at < $3 \
                     GROUP BY d, model, served_tier ORDER BY d, model, served_tier",
                )
                .bind(org_id)
                .bind(from)
                .bind(to)
                .fetch_all(pool)
                .await?
            }
        };
        rows.into_iter().map(daily_row).collect()
    }

    /// The org's newest `limit` requests, newest first.
    pub async fn usage_recent(&self, org_id: &str, limit: u32) -> Result<Vec<RecentRequest>> {
        let limit = i64::from(limit);
        match self {
            Store::Sqlite(pool) => {
                let rows = sqlx::query(&format!(
                    "SELECT {RECENT_COLUMNS} FROM usage_ledger WHERE org_id = ? \
                     ORDER BY received_at DESC, id DESC LIMIT ?"
                ))
                .bind(org_id)
                .bind(limit)
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        let at: String = r.try_get("received_at")?;
                        recent(r, time_of(&at, "received_at")?)
                    })
                    .collect()
            }
            Store::Postgres(pool) => {
                let rows = sqlx::query(&format!(
                    "SELECT {RECENT_COLUMNS} FROM usage_ledger WHERE org_id = $1 \
                     ORDER BY received_at DESC, id DESC LIMIT $2"
                ))
                .bind(org_id)
                .bind(limit)
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|r| recent(r, r.try_get("received_at")?))
                    .collect()
            }
        }
    }

    /// When each of `key_ids` (keys of `org_id`) was last used, as the ledger says (keys without
    /// a request are absent). One index lookup per key.
    pub async fn keys_last_used(
        &self,
        org_id: &str,
        key_ids: &[String],
    ) -> Result<Vec<(String, OffsetDateTime)>> {
        if key_ids.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Sqlite(pool) => {
                let values = vec!["(?)"; key_ids.len()].join(", ");
                let sql = format!(
                    "WITH k(id) AS (VALUES {values}) SELECT id, \
                     (SELECT MAX(received_at) FROM usage_ledger u WHERE u.key_id = k.id AND u.org_id = ?) \
                     FROM k"
                );
                let mut q = sqlx::query_as::<_, (String, Option<String>)>(&sql);
                for id in key_ids {
                    q = q.bind(id);
                }
                let rows = q.bind(org_id).fetch_all(pool).await?;
                rows.into_iter()
                    .filter_map(|(id, t)| t.map(|t| (id, t)))
                    .map(|(id, t)| Ok((id, time_of(&t, "received_at")?)))
                    .collect()
            }
            Store::Postgres(pool) => {
                let rows: Vec<(String, Option<OffsetDateTime>)> = sqlx::query_as(
                    "SELECT id, (SELECT MAX(received_at) FROM usage_ledger u WHERE u.key_id = k.id AND u.org_id = $2) \
                     FROM unnest($1::TEXT[]) AS k(id)",
                )
                .bind(key_ids)
                .bind(org_id)
                .fetch_all(pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .filter_map(|(id, t)| t.map(|t| (id, t)))
                    .collect())
            }
        }
    }
}

fn recent<R>(r: &R, received_at: OffsetDateTime) -> Result<RecentRequest>
where
    R: Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'c> String: sqlx::Decode<'c, R::Database> + sqlx::Type<R::Database>,
    for<'c> i64: sqlx::Decode<'c, R::Database> + sqlx::Type<R::Database>,
    for<'c> i32: sqlx::Decode<'c, R::Database> + sqlx::Type<R::Database>,
{
    let status: i32 = r.try_get("status")?;
    Ok(RecentRequest {
        request_id: r.try_get("request_id")?,
        key_id: r.try_get("key_id")?,
        model: r.try_get("model")?,
        provider: r.try_get("provider")?,
        caller_format: r.try_get("caller_format")?,
        start_within: r.try_get("start_within")?,
        served_tier: r.try_get("served_tier")?,
        reason: r.try_get("reason")?,
        status: u16::try_from(status)
            .map_err(|_| StoreError::Corrupt(format!("status = {status}")))?,
        outcome: r.try_get("outcome")?,
        input_tokens: u64_of(r.try_get("input_tokens")?, "input_tokens")?,
        output_tokens: u64_of(r.try_get("output_tokens")?, "output_tokens")?,
        cost_micros: r.try_get("cost_micros")?,
        standard_cost_micros: r.try_get("standard_cost_micros")?,
        received_at,
    })
}
