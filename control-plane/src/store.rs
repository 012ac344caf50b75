//! The append-only event store, the idempotency table and the usage ledger, over SQLite (the
//! embedded default) or Postgres (production), with runtime queries only (no compile-time
//! database).
//!
//! Invariants:
//! - `seq` is a global order and, on both backends, commit order: Postgres appends take
//!   `pg_advisory_xact_lock` before inserting, SQLite has a single writer. A subscriber that tails
//!   `read_after(last_seq)` therefore never misses an event.
//! - `(stream_id, stream_version)` is unique: an append says which version it expects the stream
//!   to be at, and a concurrent writer that got there first turns into [`StoreError::Conflict`].
//! - The idempotency record of a command commits in the same transaction as its events.
//! - Usage rows are keyed by `request_id`; a duplicate insert is silently ignored.

use std::str::FromStr;
use std::time::Duration;

use flex_shared::usage::UsageEvent;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Row;
use time::OffsetDateTime;

use crate::timefmt;

mod dashboard;
pub use dashboard::{RecentRequest, SessionRow, UsageDailyRow};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");

/// The advisory lock every Postgres append holds until commit (ASCII "flexevt").
const APPEND_LOCK_KEY: i64 = 0x0066_6c65_7865_7674;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("stream {stream_id} is no longer at version {expected}")]
    Conflict { stream_id: String, expected: u64 },
    #[error("idempotency key `{key}` was recorded by a concurrent command")]
    IdempotencyKeyTaken { key: String },
    #[error("unsupported database URL (scheme `{0}`): use sqlite://PATH?mode=rwc, sqlite:PATH or postgres://USER@HOST:5432/DB")]
    UnsupportedUrl(String),
    #[error("an append needs at least one event")]
    NothingToAppend,
    #[error("an imported event's stream position is already taken (stream {stream_id}); nothing of the batch was imported")]
    ImportConflict { stream_id: String },
    #[error("{0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row in the event store: {0}")]
    Corrupt(String),
    #[error("value out of range for the database: {0}")]
    OutOfRange(String),
}

type Result<T> = std::result::Result<T, StoreError>;

/// An event about to be appended.
#[derive(Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_type: String,
    pub schema_version: u32,
    /// JSON text.
    pub payload: String,
}

/// The events to append to one stream, which must be at `expected_version` (0 = new stream).
#[derive(Clone, Copy)]
pub struct StreamAppend<'a> {
    pub stream_id: &'a str,
    pub expected_version: u64,
    pub events: &'a [NewEvent],
}

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

/// An event of a bulk import ([`Store::import_events`]), at a stream position the caller assigns.
#[derive(Clone, PartialEq, Eq)]
pub struct ImportEvent {
    pub stream_id: String,
    pub stream_version: u64,
    pub event: NewEvent,
}

/// Rows per multi-row INSERT of an import (8 bind parameters each, well under both engines' limits).
const IMPORT_ROWS_PER_INSERT: usize = 500;

/// Who caused an append, and in which request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub actor: String,
    pub request_id: String,
}

impl Metadata {
    /// Metadata with a fresh request id.
    pub fn new(actor: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            request_id: format!("req_{}", uuid::Uuid::now_v7().simple()),
        }
    }

    /// The control plane acting on its own (e.g. master-key rotation at start).
    pub fn system() -> Self {
        Self::new("system")
    }
}

/// An event as stored. Its payload may hold key hashes and ciphertexts: never log it whole.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub stream_id: String,
    pub stream_version: u64,
    pub event_type: String,
    pub schema_version: u32,
    pub payload: String,
    pub actor: String,
    pub request_id: String,
    /// UTC, microsecond precision.
    pub recorded_at: OffsetDateTime,
}

impl std::fmt::Debug for StoredEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredEvent")
            .field("seq", &self.seq)
            .field("stream_id", &self.stream_id)
            .field("stream_version", &self.stream_version)
            .field("event_type", &self.event_type)
            .field("schema_version", &self.schema_version)
            .field("actor", &self.actor)
            .field("request_id", &self.request_id)
            .field("recorded_at", &self.recorded_at)
            .finish_non_exhaustive()
    }
}

/// The stored result of an idempotent command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub key: String,
    pub command: String,
    pub result_json: String,
}

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

/// The event store over one of the two backends. Cloning is cheap (pools are shared).
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

fn i64_of(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::OutOfRange(format!("{what} = {v}")))
}

fn u64_of(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} = {v} is negative")))
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation()
                || matches!(d.code().as_deref(), Some("23505" | "2067" | "1555"))
        }
        _ => false,
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

/// Creates the SQLite database file readable only by its owner (mode 0600) when it does not
/// exist yet; SQLite gives its `-wal` and `-shm` files the database file's mode. (SQLite itself
/// would create it with the umask, typically 0644: the log holds key hashes and sealed secrets.)
fn create_private(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Database(sqlx::Error::Io(std::io::Error::new(
            e.kind(),
            format!("cannot create the database file {}: {e}", path.display()),
        )))),
    }
}

const USAGE_COLUMNS: &str = "request_id, schema_version, org_id, key_id, model, provider, \
    caller_format, start_within, served_tier, reason, flex_wait_ms, start_latency_ms, duration_ms, \
    input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, status, outcome, \
    tiers_started, cost_micros, standard_cost_micros, received_at, recorded_at";

impl Store {
    /// Connects and runs the migrations. Accepts `sqlite://PATH?mode=rwc`, `sqlite:PATH`,
    /// `sqlite::memory:` and `postgres://…` / `postgresql://…`.
    pub async fn connect(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            let memory = url.contains(":memory:") || url.contains("mode=memory");
            if !memory && !opts.get_filename().as_os_str().is_empty() {
                create_private(opts.get_filename())?;
            }
            let mut pool = SqlitePoolOptions::new();
            if memory {
                // Every connection to `:memory:` is its own database: keep exactly one, forever.
                pool = pool
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None);
            } else {
                pool = pool.max_connections(8);
            }
            let pool = pool.connect_with(opts).await?;
            SQLITE_MIGRATIONS.run(&pool).await?;
            Ok(Store::Sqlite(pool))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(10)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await?;
            POSTGRES_MIGRATIONS.run(&pool).await?;
            Ok(Store::Postgres(pool))
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            Err(StoreError::UnsupportedUrl(
                scheme.chars().take(20).collect(),
            ))
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        match self {
            Store::Sqlite(p) => p.close().await,
            Store::Postgres(p) => p.close().await,
        }
    }

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
                let recorded = timefmt::format(now);
                let sql = format!(
                    "INSERT INTO usage_ledger ({USAGE_COLUMNS}) VALUES \
                     (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                     ON CONFLICT (request_id) DO NOTHING"
                );
                let mut tx = pool.begin().await?;
                for r in &rows {
                    let e = r.e;
                    let done = sqlx::query(&sql)
                        .bind(&e.request_id)
                        .bind(i64::from(e.schema_version))
                        .bind(&e.org_id)
                        .bind(&e.key_id)
                        .bind(&e.model)
                        .bind(&e.provider)
                        .bind(&e.caller_format)
                        .bind(&e.start_within)
                        .bind(&e.served_tier)
                        .bind(&e.reason)
                        .bind(r.flex_wait_ms)
                        .bind(r.start_latency_ms)
                        .bind(r.duration_ms)
                        .bind(r.input_tokens)
                        .bind(r.cached_input_tokens)
                        .bind(r.output_tokens)
                        .bind(r.reasoning_tokens)
                        .bind(i64::from(e.status))
                        .bind(&e.outcome)
                        .bind(&r.tiers_started)
                        .bind(e.cost_micros)
                        .bind(e.standard_cost_micros)
                        .bind(timefmt::format(r.received_at))
                        .bind(&recorded)
                        .execute(&mut *tx)
                        .await?;
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
