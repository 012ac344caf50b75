//! The event log and the idempotency table: appends (checked against each stream's expected
//! version, with the command's idempotency record in the same transaction), bulk imports, and
//! reads in `seq` order.

use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::{
    i64_of, is_unique_violation, u64_of, IdempotencyRecord, ImportEvent, Metadata, NewEvent,
    Result, Store, StoreError, StoredEvent, StreamAppend,
};
use crate::timefmt;

/// The advisory lock every Postgres append holds until commit (ASCII "flexevt").
const APPEND_LOCK_KEY: i64 = 0x0066_6c65_7865_7674;

/// Rows per multi-row INSERT of an import (8 bind parameters each, well under both engines' limits).
const IMPORT_ROWS_PER_INSERT: usize = 500;

impl StreamAppend<'_> {
    fn conflict(&self) -> StoreError {
        StoreError::Conflict {
            stream_id: self.stream_id.to_string(),
            expected: self.expected_version,
        }
    }

    fn map_insert(&self, e: sqlx::Error) -> StoreError {
        if is_unique_violation(&e) {
            self.conflict()
        } else {
            StoreError::Database(e)
        }
    }
}

const EVENT_COLUMNS_SQLITE: &str =
    "seq, stream_id, stream_version, event_type, schema_version, payload, actor, request_id, recorded_at";
const EVENT_COLUMNS_PG: &str = "seq, stream_id, stream_version, event_type, schema_version, payload::text AS payload, actor, request_id, recorded_at";

fn sqlite_event(r: &SqliteRow) -> Result<StoredEvent> {
    let recorded: String = r.try_get("recorded_at")?;
    Ok(StoredEvent {
        seq: u64_of(r.try_get("seq")?, "seq")?,
        stream_id: r.try_get("stream_id")?,
        stream_version: u64_of(r.try_get("stream_version")?, "stream_version")?,
        event_type: r.try_get("event_type")?,
        schema_version: u32::try_from(r.try_get::<i64, _>("schema_version")?)
            .map_err(|_| StoreError::Corrupt("schema_version out of range".into()))?,
        payload: r.try_get("payload")?,
        actor: r.try_get("actor")?,
        request_id: r.try_get("request_id")?,
        recorded_at: timefmt::parse(&recorded)
            .ok_or_else(|| StoreError::Corrupt(format!("recorded_at `{recorded}`")))?,
    })
}

fn pg_event(r: &PgRow) -> Result<StoredEvent> {
    Ok(StoredEvent {
        seq: u64_of(r.try_get("seq")?, "seq")?,
        stream_id: r.try_get("stream_id")?,
        stream_version: u64_of(r.try_get("stream_version")?, "stream_version")?,
        event_type: r.try_get("event_type")?,
        schema_version: u32::try_from(r.try_get::<i32, _>("schema_version")?)
            .map_err(|_| StoreError::Corrupt("schema_version out of range".into()))?,
        payload: r.try_get("payload")?,
        actor: r.try_get("actor")?,
        request_id: r.try_get("request_id")?,
        recorded_at: r.try_get("recorded_at")?,
    })
}

impl Store {
    /// Appends `events` to `stream_id`, which must be at `expected_version` (0 = new stream).
    /// Atomic; returns the `seq` of the last event.
    pub async fn append(
        &self,
        stream_id: &str,
        expected_version: u64,
        events: &[NewEvent],
        meta: &Metadata,
    ) -> Result<u64> {
        self.append_with_idempotency(stream_id, expected_version, events, meta, None)
            .await
    }

    /// Counts appended events in the metrics (`flex_event_log_appends_total`).
    fn count_appends(n: usize) {
        crate::metrics::metrics()
            .appends
            .inc_by(u64::try_from(n).unwrap_or(0));
    }

    /// [`Store::append`], also recording `idempotency` in the same transaction. A key that is
    /// already recorded fails with [`StoreError::IdempotencyKeyTaken`] and appends nothing.
    pub async fn append_with_idempotency(
        &self,
        stream_id: &str,
        expected_version: u64,
        events: &[NewEvent],
        meta: &Metadata,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<u64> {
        let one = StreamAppend {
            stream_id,
            expected_version,
            events,
        };
        self.append_streams(std::slice::from_ref(&one), meta, idempotency)
            .await
    }

    /// Appends to several streams in one transaction: all or nothing, each stream at its
    /// expected version (a command whose decision spans aggregates, e.g. a sign-up: the email's
    /// claim, the user and the user's org). The events get consecutive `seq`s in the order
    /// given. Returns the `seq` of the last event.
    pub async fn append_streams(
        &self,
        appends: &[StreamAppend<'_>],
        meta: &Metadata,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<u64> {
        if appends.is_empty() || appends.iter().any(|a| a.events.is_empty()) {
            return Err(StoreError::NothingToAppend);
        }
        let now = timefmt::now();
        let mut last_seq = 0i64;
        let idempotency_taken = |e: sqlx::Error, key: &str| {
            if is_unique_violation(&e) {
                StoreError::IdempotencyKeyTaken {
                    key: key.to_string(),
                }
            } else {
                StoreError::Database(e)
            }
        };
        match self {
            Store::Sqlite(pool) => {
                let recorded = timefmt::format(now);
                let mut tx = pool.begin().await?;
                for a in appends {
                    let expected = i64_of(a.expected_version, "expected_version")?;
                    for (i, e) in (1i64..).zip(a.events) {
                        let row = sqlx::query(
                            "INSERT INTO events (stream_id, stream_version, event_type, schema_version, \
                             payload, actor, request_id, recorded_at) \
                             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                        )
                        .bind(a.stream_id)
                        .bind(expected + i)
                        .bind(&e.event_type)
                        .bind(i64::from(e.schema_version))
                        .bind(&e.payload)
                        .bind(&meta.actor)
                        .bind(&meta.request_id)
                        .bind(&recorded)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(|err| a.map_insert(err))?;
                        last_seq = row.try_get(0)?;
                    }
                    if expected > 0 {
                        let found: i64 = sqlx::query_scalar(
                            "SELECT COUNT(*) FROM events WHERE stream_id = ? AND stream_version = ?",
                        )
                        .bind(a.stream_id)
                        .bind(expected)
                        .fetch_one(&mut *tx)
                        .await?;
                        if found == 0 {
                            return Err(a.conflict());
                        }
                    }
                }
                if let Some(idem) = idempotency {
                    sqlx::query(
                        "INSERT INTO idempotency (key, command, result_json, created_at) VALUES (?, ?, ?, ?)",
                    )
                    .bind(&idem.key)
                    .bind(&idem.command)
                    .bind(&idem.result_json)
                    .bind(&recorded)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| idempotency_taken(e, &idem.key))?;
                }
                tx.commit().await?;
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                // Serialize appends so that seq order is commit order.
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(APPEND_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                for a in appends {
                    let expected = i64_of(a.expected_version, "expected_version")?;
                    let current: i64 = sqlx::query_scalar(
                        "SELECT COALESCE(MAX(stream_version), 0)::BIGINT FROM events WHERE stream_id = $1",
                    )
                    .bind(a.stream_id)
                    .fetch_one(&mut *tx)
                    .await?;
                    if current != expected {
                        return Err(a.conflict());
                    }
                    for (i, e) in (1i64..).zip(a.events) {
                        let row = sqlx::query(
                            "INSERT INTO events (stream_id, stream_version, event_type, schema_version, \
                             payload, actor, request_id, recorded_at) \
                             VALUES ($1, $2, $3, $4, $5::json, $6, $7, $8) RETURNING seq",
                        )
                        .bind(a.stream_id)
                        .bind(expected + i)
                        .bind(&e.event_type)
                        .bind(i32::try_from(e.schema_version).map_err(|_| {
                            StoreError::OutOfRange(format!(
                                "schema_version = {}",
                                e.schema_version
                            ))
                        })?)
                        .bind(&e.payload)
                        .bind(&meta.actor)
                        .bind(&meta.request_id)
                        .bind(now)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(|err| a.map_insert(err))?;
                        last_seq = row.try_get(0)?;
                    }
                }
                if let Some(idem) = idempotency {
                    sqlx::query(
                        "INSERT INTO idempotency (key, command, result_json, created_at) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(&idem.key)
                    .bind(&idem.command)
                    .bind(&idem.result_json)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| idempotency_taken(e, &idem.key))?;
                }
                tx.commit().await?;
            }
        }
        Self::count_appends(appends.iter().map(|a| a.events.len()).sum());
        u64_of(last_seq, "seq")
    }

    /// Bulk-appends events whose stream versions the caller assigns (imports, benchmarks), in one
    /// transaction of multi-row INSERTs. `(stream_id, stream_version)` stays unique: a position
    /// that is taken fails the whole batch with [`StoreError::ImportConflict`]. Unlike
    /// [`Store::append`] it does not check that a stream's versions follow its current one, so the
    /// caller gives each stream the versions 1, 2, 3… in order (commands treat a gap as a
    /// conflict). On Postgres it holds the append lock, so `seq` order stays commit order.
    /// Returns the `seq` of the last event (0 for an empty batch).
    pub async fn import_events(&self, events: &[ImportEvent], meta: &Metadata) -> Result<u64> {
        if events.is_empty() {
            return Ok(0);
        }
        let now = timefmt::now();
        let rows = events
            .iter()
            .map(|e| {
                Ok((
                    e,
                    i64_of(e.stream_version, "stream_version")?,
                    i32::try_from(e.event.schema_version).map_err(|_| {
                        StoreError::OutOfRange(format!(
                            "schema_version = {}",
                            e.event.schema_version
                        ))
                    })?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let map_insert = |chunk: &[(&ImportEvent, i64, i32)]| {
            let stream_id = chunk
                .first()
                .map(|(e, _, _)| e.stream_id.clone())
                .unwrap_or_default();
            move |e: sqlx::Error| {
                if is_unique_violation(&e) {
                    StoreError::ImportConflict { stream_id }
                } else {
                    StoreError::Database(e)
                }
            }
        };
        let mut last_seq = 0i64;
        match self {
            Store::Sqlite(pool) => {
                let recorded = timefmt::format(now);
                let mut tx = pool.begin().await?;
                for chunk in rows.chunks(IMPORT_ROWS_PER_INSERT) {
                    let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
                    let sql = format!(
                        "INSERT INTO events (stream_id, stream_version, event_type, schema_version, \
                         payload, actor, request_id, recorded_at) VALUES {values} RETURNING seq"
                    );
                    let mut q = sqlx::query_scalar::<_, i64>(&sql);
                    for (e, version, schema) in chunk {
                        q = q
                            .bind(&e.stream_id)
                            .bind(*version)
                            .bind(&e.event.event_type)
                            .bind(i64::from(*schema))
                            .bind(&e.event.payload)
                            .bind(&meta.actor)
                            .bind(&meta.request_id)
                            .bind(&recorded);
                    }
                    let seqs = q.fetch_all(&mut *tx).await.map_err(map_insert(chunk))?;
                    last_seq = last_seq.max(seqs.into_iter().max().unwrap_or(0));
                }
                tx.commit().await?;
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(APPEND_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                for chunk in rows.chunks(IMPORT_ROWS_PER_INSERT) {
                    let values = (0..chunk.len())
                        .map(|i| {
                            let b = i * 8;
                            format!(
                                "(${}, ${}, ${}, ${}, ${}::json, ${}, ${}, ${})",
                                b + 1,
                                b + 2,
                                b + 3,
                                b + 4,
                                b + 5,
                                b + 6,
                                b + 7,
                                b + 8
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    let sql = format!(
                        "INSERT INTO events (stream_id, stream_version, event_type, schema_version, \
                         payload, actor, request_id, recorded_at) VALUES {values} RETURNING seq"
                    );
                    let mut q = sqlx::query_scalar::<_, i64>(&sql);
                    for (e, version, schema) in chunk {
                        q = q
                            .bind(&e.stream_id)
                            .bind(*version)
                            .bind(&e.event.event_type)
                            .bind(*schema)
                            .bind(&e.event.payload)
                            .bind(&meta.actor)
                            .bind(&meta.request_id)
                            .bind(now);
                    }
                    let seqs = q.fetch_all(&mut *tx).await.map_err(map_insert(chunk))?;
                    last_seq = last_seq.max(seqs.into_iter().max().unwrap_or(0));
                }
                tx.commit().await?;
            }
        }
        u64_of(last_seq, "seq")
    }

    /// Up to `limit` events with `seq > after`, in seq order.
    pub async fn read_after(&self, after: u64, limit: u32) -> Result<Vec<StoredEvent>> {
        let after = i64_of(after, "seq")?;
        let limit = i64::from(limit);
        match self {
            Store::Sqlite(pool) => {
                let rows = sqlx::query(&format!(
                    "SELECT {EVENT_COLUMNS_SQLITE} FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
                ))
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await?;
                rows.iter().map(sqlite_event).collect()
            }
            Store::Postgres(pool) => {
                let rows = sqlx::query(&format!(
                    "SELECT {EVENT_COLUMNS_PG} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"
                ))
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await?;
                rows.iter().map(pg_event).collect()
            }
        }
    }

    /// Every event, in seq order (for rebuilds and tests).
    pub async fn read_all(&self) -> Result<Vec<StoredEvent>> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let batch = self.read_after(after, 1000).await?;
            let Some(last) = batch.last() else { break };
            after = last.seq;
            out.extend(batch);
        }
        Ok(out)
    }

    /// The events of one stream, in version order.
    pub async fn read_stream(&self, stream_id: &str) -> Result<Vec<StoredEvent>> {
        self.read_streams(&[stream_id.to_string()]).await
    }

    /// The events of several streams, in seq order.
    pub async fn read_streams(&self, stream_ids: &[String]) -> Result<Vec<StoredEvent>> {
        if stream_ids.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Sqlite(pool) => {
                let marks = vec!["?"; stream_ids.len()].join(", ");
                let sql = format!(
                    "SELECT {EVENT_COLUMNS_SQLITE} FROM events WHERE stream_id IN ({marks}) ORDER BY seq"
                );
                let mut q = sqlx::query(&sql);
                for id in stream_ids {
                    q = q.bind(id);
                }
                let rows = q.fetch_all(pool).await?;
                rows.iter().map(sqlite_event).collect()
            }
            Store::Postgres(pool) => {
                let rows = sqlx::query(&format!(
                    "SELECT {EVENT_COLUMNS_PG} FROM events WHERE stream_id = ANY($1) ORDER BY seq"
                ))
                .bind(stream_ids)
                .fetch_all(pool)
                .await?;
                rows.iter().map(pg_event).collect()
            }
        }
    }

    /// The highest `seq` (0 for an empty log).
    pub async fn head(&self) -> Result<u64> {
        let seq: i64 = match self {
            Store::Sqlite(pool) => {
                sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events")
                    .fetch_one(pool)
                    .await?
            }
            Store::Postgres(pool) => {
                sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0)::BIGINT FROM events")
                    .fetch_one(pool)
                    .await?
            }
        };
        u64_of(seq, "seq")
    }

    /// The recorded result of an idempotent command, if any.
    pub async fn idempotency_get(&self, key: &str) -> Result<Option<IdempotencyRecord>> {
        let row = match self {
            Store::Sqlite(pool) => {
                sqlx::query_as::<_, (String, String, String)>(
                    "SELECT key, command, result_json FROM idempotency WHERE key = ?",
                )
                .bind(key)
                .fetch_optional(pool)
                .await?
            }
            Store::Postgres(pool) => {
                sqlx::query_as::<_, (String, String, String)>(
                    "SELECT key, command, result_json FROM idempotency WHERE key = $1",
                )
                .bind(key)
                .fetch_optional(pool)
                .await?
            }
        };
        Ok(row.map(|(key, command, result_json)| IdempotencyRecord {
            key,
            command,
            result_json,
        }))
    }
}
