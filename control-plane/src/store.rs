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
//!
//! This module holds the store handle, its errors, connecting (with the migrations) and the types
//! callers pass and get back; the queries are in `events` (the event log and the idempotency
//! records that commit with it), `ledger` (the usage ledger) and `dashboard` (sessions and the
//! dashboard's read models of the ledger).

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use time::OffsetDateTime;

mod dashboard;
mod events;
mod ledger;
pub use dashboard::{RecentRequest, SessionRow, UsageDailyRow};
pub use ledger::{UsageGroupBy, UsageTotals};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");

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

/// An event of a bulk import ([`Store::import_events`]), at a stream position the caller assigns.
#[derive(Clone, PartialEq, Eq)]
pub struct ImportEvent {
    pub stream_id: String,
    pub stream_version: u64,
    pub event: NewEvent,
}

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

impl Store {
    /// Connects and runs the migrations. Accepts `sqlite://PATH?mode=rwc`, `sqlite:PATH`,
    /// `sqlite::memory:` and `postgres://…` / `postgresql://…`.
    pub async fn connect(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL, not NORMAL: in WAL mode NORMAL skips the fsync at commit, so a power
                // loss can roll back committed events and ledger rows whose JetStream messages
                // were already acked (the usage consumer acks after the commit) and whose
                // commands were already answered. FULL fsyncs the WAL at every commit.
                .synchronous(SqliteSynchronous::Full)
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
}
