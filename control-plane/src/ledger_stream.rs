//! The settled ledger for analytics: every new usage-ledger row, published once to the JetStream
//! stream `FLEX_LEDGER` on `flex.ledger.<org_id>` (the org id escaped by
//! [`flex_shared::usage::subject_token`], as on `flex.usage.<org_id>`), with the request id as
//! `Nats-Msg-Id`. The raw usage stream `FLEX_USAGE` can carry a request twice (a proxy that
//! republishes after an outage longer than its 10-minute duplicate window); the ledger cannot
//! (its request id is unique), so a durable consumer of `FLEX_LEDGER` sees each request once.
//! The message schema is [`LedgerRow`] (`docs/usage-streams.md`).
//!
//! Exactly once, across crashes:
//! - A row is inserted with `published` false in the transaction that records it (the column's
//!   default, `migrations/*/20260201000001_ledger_stream.sql`), so whatever path recorded it
//!   (the NATS usage consumer, gRPC `ReportUsage`, `flex up`'s in-process proxy) and whenever the
//!   control plane stops, the row is still to publish when it comes back. A duplicate event
//!   inserts no row and is never published.
//! - The publisher reads unpublished rows in ledger-id order, publishes a batch (pipelined),
//!   and marks the rows JetStream acknowledged. A crash between the publish and the mark leaves
//!   at most one batch stored and unmarked: at the start of every session the publisher reads the
//!   last `batch` messages of the stream and marks the rows it finds there without publishing
//!   them again. The stream's `Nats-Msg-Id` window (10 minutes) is a second guard.
//! - One publisher at a time: on Postgres a session advisory lock, held on a connection of the
//!   publisher's own, makes a second control plane on the same database stand by until the first
//!   one goes away (its lock goes with its connection). SQLite has one process by construction.
//!
//! The publisher polls the ledger (an index holds only the unpublished rows, so an idle poll
//! costs one empty index lookup), so a row reaches the stream within `poll` (200 ms) of its
//! commit. It rides out NATS and database outages with backoff; rows wait in the ledger.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use flex_shared::usage::subject_token;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Connection, Row};
use tokio::task::JoinHandle;

use crate::store::{Store, StoreError};
use crate::{timefmt, ControlPlane};

/// The stream of settled ledger rows.
pub const LEDGER_STREAM: &str = "FLEX_LEDGER";
/// Subjects of [`LEDGER_STREAM`]; a row goes to `flex.ledger.<org_id>` ([`ledger_subject`]).
pub const LEDGER_SUBJECTS: &str = "flex.ledger.>";
/// The version of [`LedgerRow`]'s schema: fields are only ever added; it changes when a
/// meaning changes.
pub const LEDGER_SCHEMA_VERSION: u32 = 1;
/// The header carrying the row's ledger id (also in the payload).
pub const HEADER_LEDGER_ID: &str = "Flex-Ledger-Id";
/// The header carrying the schema version of the payload.
pub const HEADER_SCHEMA: &str = "Flex-Schema-Version";

/// The advisory lock the Postgres publisher holds for its session (ASCII "flexldg").
const PUBLISH_LOCK_KEY: i64 = 0x0066_6c65_786c_6467;

/// The subject a row of `org_id` is published on: `flex.ledger.<org_id>`.
pub fn ledger_subject(org_id: &str) -> String {
    format!("flex.ledger.{}", subject_token(org_id))
}

/// One settled ledger row, as published on `FLEX_LEDGER` (JSON, one row per message).
///
/// The request's usage event as the ledger recorded it (the first time its request id
/// arrived), with the ledger's own fields. Integers are the ledger's signed 64-bit columns;
/// money is integer micro-dollars.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRow {
    /// [`LEDGER_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The row's id in the ledger: unique, increasing in insertion order (a row committed by a
    /// concurrent transaction can be published after a higher id).
    pub ledger_id: i64,
    /// Unique per request; also the message's `Nats-Msg-Id`.
    pub request_id: String,
    /// The `schema_version` of the usage event the row was recorded from.
    pub event_schema_version: i64,
    pub org_id: String,
    pub key_id: String,
    pub model: String,
    pub provider: String,
    pub caller_format: String,
    pub start_within: String,
    pub served_tier: String,
    pub reason: String,
    pub flex_wait_ms: i64,
    pub start_latency_ms: i64,
    pub duration_ms: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub status: i64,
    pub outcome: String,
    pub tiers_started: Vec<String>,
    pub cost_micros: i64,
    pub standard_cost_micros: i64,
    /// `standard_cost_micros - cost_micros`.
    pub savings_micros: i64,
    /// RFC 3339 (UTC, microseconds): when the proxy received the request.
    pub received_at: String,
    /// RFC 3339 (UTC, microseconds): when the ledger recorded it.
    pub recorded_at: String,
}

/// The JetStream settings of `FLEX_LEDGER` under `config`.
pub fn ledger_stream_config(config: &LedgerPublisherConfig) -> stream::Config {
    stream::Config {
        name: LEDGER_STREAM.to_string(),
        description: Some(
            "FlexInference: settled usage-ledger rows, one per request (flex control)".into(),
        ),
        subjects: vec![LEDGER_SUBJECTS.to_string()],
        // JetStream refuses a duplicate window longer than max_age.
        duplicate_window: config.duplicate_window.min(config.max_age),
        max_age: config.max_age,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// A row as a message: its subject, headers (`Nats-Msg-Id` = the request id,
/// [`HEADER_LEDGER_ID`], [`HEADER_SCHEMA`]) and JSON payload.
#[derive(Debug, Clone)]
pub struct LedgerMessage {
    pub subject: String,
    pub headers: async_nats::HeaderMap,
    pub payload: Vec<u8>,
}

impl LedgerMessage {
    pub fn of(row: &LedgerRow) -> Result<Self, String> {
        let payload = serde_json::to_vec(row)
            .map_err(|e| format!("ledger row {} cannot be encoded: {e}", row.ledger_id))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", row.request_id.as_str());
        headers.insert(HEADER_LEDGER_ID, row.ledger_id.to_string());
        headers.insert(HEADER_SCHEMA, LEDGER_SCHEMA_VERSION.to_string());
        Ok(Self {
            subject: ledger_subject(&row.org_id),
            headers,
            payload,
        })
    }

    /// The JetStream publish of this message (refused unless the subject is `FLEX_LEDGER`'s).
    pub fn publish(self) -> (String, PublishMessage) {
        let msg = PublishMessage::build()
            .headers(self.headers)
            .payload(self.payload.into())
            .expected_stream(LEDGER_STREAM);
        (self.subject, msg)
    }
}

/// Settings of the ledger publisher.
#[derive(Debug, Clone)]
pub struct LedgerPublisherConfig {
    /// Rows published per round (pipelined, acks awaited together), and how many of the
    /// stream's last messages a session start checks against the ledger.
    pub batch: usize,
    /// How often an idle publisher looks for new rows.
    pub poll: Duration,
    /// How long to wait for JetStream to acknowledge a publish.
    pub ack_timeout: Duration,
    /// How long the stream keeps a row (when the publisher creates it).
    pub max_age: Duration,
    /// The stream's `Nats-Msg-Id` window (when the publisher creates it).
    pub duplicate_window: Duration,
    /// How often a publisher standing by (another one holds the Postgres lock) tries again.
    pub standby_poll: Duration,
}

impl Default for LedgerPublisherConfig {
    fn default() -> Self {
        Self {
            batch: 500,
            poll: Duration::from_millis(200),
            ack_timeout: Duration::from_secs(5),
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(600),
            standby_poll: Duration::from_secs(5),
        }
    }
}

/// Counters of the ledger publisher.
#[derive(Debug, Default)]
pub struct LedgerPublisherStats {
    /// Rows stored in the stream and marked published.
    pub published: AtomicU64,
    /// Publishes JetStream acknowledged as duplicates (the row was already stored within the
    /// duplicate window); marked too. Normally 0.
    pub duplicates: AtomicU64,
    /// Rows found already in the stream at a session start (a stop between a publish and its
    /// mark) and marked without publishing them again.
    pub reconciled: AtomicU64,
    /// Rounds that published at least one row.
    pub batches: AtomicU64,
    /// Failed sessions (NATS, the database); each retried with backoff.
    pub errors: AtomicU64,
    /// Another control plane holds the publish lock; this one waits.
    pub standing_by: AtomicBool,
}

/// The running publisher; dropping it stops it (rows not yet marked are published, or found
/// in the stream, by the next one).
pub struct LedgerPublisher {
    stats: Arc<LedgerPublisherStats>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for LedgerPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerPublisher")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl LedgerPublisher {
    pub fn stats(&self) -> &Arc<LedgerPublisherStats> {
        &self.stats
    }

    /// Stops the publisher.
    pub fn stop(self) {}
}

impl Drop for LedgerPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ----- the ledger side ------------------------------------------------------------------------

const ROW_COLUMNS_SQLITE: &str =
    "id, request_id, schema_version, org_id, key_id, model, provider, \
    caller_format, start_within, served_tier, reason, flex_wait_ms, start_latency_ms, duration_ms, \
    input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, status, outcome, \
    tiers_started, cost_micros, standard_cost_micros, received_at, recorded_at";
const ROW_COLUMNS_PG: &str = "id, request_id, schema_version::BIGINT AS schema_version, org_id, \
    key_id, model, provider, caller_format, start_within, served_tier, reason, flex_wait_ms, \
    start_latency_ms, duration_ms, input_tokens, cached_input_tokens, output_tokens, \
    reasoning_tokens, status::BIGINT AS status, outcome, tiers_started::TEXT AS tiers_started, \
    cost_micros, standard_cost_micros, received_at, recorded_at";

fn tiers(id: i64, text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(|e| {
        StoreError::Corrupt(format!(
            "usage_ledger row {id}: tiers_started `{text}` is not a JSON list of strings ({e})"
        ))
    })
}

/// The fields both engines store the same way.
fn row_of<R: Row>(r: &R, received_at: String, recorded_at: String) -> Result<LedgerRow, StoreError>
where
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let ledger_id: i64 = r.try_get("id")?;
    let tiers_text: String = r.try_get("tiers_started")?;
    let cost_micros: i64 = r.try_get("cost_micros")?;
    let standard_cost_micros: i64 = r.try_get("standard_cost_micros")?;
    Ok(LedgerRow {
        schema_version: LEDGER_SCHEMA_VERSION,
        ledger_id,
        request_id: r.try_get("request_id")?,
        event_schema_version: r.try_get("schema_version")?,
        org_id: r.try_get("org_id")?,
        key_id: r.try_get("key_id")?,
        model: r.try_get("model")?,
        provider: r.try_get("provider")?,
        caller_format: r.try_get("caller_format")?,
        start_within: r.try_get("start_within")?,
        served_tier: r.try_get("served_tier")?,
        reason: r.try_get("reason")?,
        flex_wait_ms: r.try_get("flex_wait_ms")?,
        start_latency_ms: r.try_get("start_latency_ms")?,
        duration_ms: r.try_get("duration_ms")?,
        input_tokens: r.try_get("input_tokens")?,
        cached_input_tokens: r.try_get("cached_input_tokens")?,
        output_tokens: r.try_get("output_tokens")?,
        reasoning_tokens: r.try_get("reasoning_tokens")?,
        status: r.try_get("status")?,
        outcome: r.try_get("outcome")?,
        tiers_started: tiers(ledger_id, &tiers_text)?,
        cost_micros,
        standard_cost_micros,
        savings_micros: standard_cost_micros.saturating_sub(cost_micros),
        received_at,
        recorded_at,
    })
}

fn sqlite_row(r: &SqliteRow) -> Result<LedgerRow, StoreError> {
    // Written by timefmt::format already.
    row_of(r, r.try_get("received_at")?, r.try_get("recorded_at")?)
}

fn pg_row(r: &PgRow) -> Result<LedgerRow, StoreError> {
    let received: time::OffsetDateTime = r.try_get("received_at")?;
    let recorded: time::OffsetDateTime = r.try_get("recorded_at")?;
    row_of(r, timefmt::format(received), timefmt::format(recorded))
}

fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit.max(1)).unwrap_or(i64::MAX)
}

async fn sqlite_pending(pool: &SqlitePool, limit: usize) -> Result<Vec<LedgerRow>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {ROW_COLUMNS_SQLITE} FROM usage_ledger WHERE published = 0 ORDER BY id LIMIT ?"
    ))
    .bind(limit_of(limit))
    .fetch_all(pool)
    .await?;
    rows.iter().map(sqlite_row).collect()
}

async fn pg_pending<'c, E>(db: E, limit: usize) -> Result<Vec<LedgerRow>, StoreError>
where
    E: sqlx::PgExecutor<'c>,
{
    let rows = sqlx::query(&format!(
        "SELECT {ROW_COLUMNS_PG} FROM usage_ledger WHERE NOT published ORDER BY id LIMIT $1"
    ))
    .bind(limit_of(limit))
    .fetch_all(db)
    .await?;
    rows.iter().map(pg_row).collect()
}

/// Up to `limit` rows not yet published, in ledger-id order.
pub async fn pending_rows(store: &Store, limit: usize) -> Result<Vec<LedgerRow>, StoreError> {
    match store {
        Store::Sqlite(pool) => sqlite_pending(pool, limit).await,
        Store::Postgres(pool) => pg_pending(pool, limit).await,
    }
}

/// How many ledger rows are not published yet (the publisher's backlog).
pub async fn unpublished_rows(store: &Store) -> Result<u64, StoreError> {
    let n: i64 = match store {
        Store::Sqlite(pool) => {
            sqlx::query_scalar("SELECT COUNT(*) FROM usage_ledger WHERE published = 0")
                .fetch_one(pool)
                .await?
        }
        Store::Postgres(pool) => {
            sqlx::query_scalar("SELECT COUNT(*)::BIGINT FROM usage_ledger WHERE NOT published")
                .fetch_one(pool)
                .await?
        }
    };
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("unpublished count {n}")))
}

/// The publisher's hold on the ledger for one session.
enum Ledger {
    Sqlite(SqlitePool),
    /// A connection of its own, holding the publish lock (released when it closes).
    Postgres(PgConnection),
}

/// Why a session ended.
enum SessionEnd {
    /// Another control plane holds the publish lock.
    Standby,
    Failed(String),
}

impl Ledger {
    /// Opens the session's hold: on Postgres a new connection that takes the publish lock
    /// (`None` when another publisher has it).
    async fn open(store: &Store) -> Result<Option<Self>, String> {
        match store {
            Store::Sqlite(pool) => Ok(Some(Ledger::Sqlite(pool.clone()))),
            Store::Postgres(pool) => {
                let opts = pool.connect_options();
                let mut conn = PgConnection::connect_with(&opts)
                    .await
                    .map_err(|e| format!("cannot connect to the ledger database: {e}"))?;
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(PUBLISH_LOCK_KEY)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(|e| format!("cannot take the ledger publish lock: {e}"))?;
                if locked {
                    Ok(Some(Ledger::Postgres(conn)))
                } else {
                    let _ = conn.close().await;
                    Ok(None)
                }
            }
        }
    }

    async fn close(self) {
        if let Ledger::Postgres(conn) = self {
            // Closing ends the database session, and the lock with it.
            let _ = conn.close().await;
        }
    }

    async fn pending(&mut self, limit: usize) -> Result<Vec<LedgerRow>, StoreError> {
        match self {
            Ledger::Sqlite(pool) => sqlite_pending(pool, limit).await,
            Ledger::Postgres(conn) => pg_pending(&mut *conn, limit).await,
        }
    }

    /// Marks the rows `ids` published.
    async fn mark(&mut self, ids: &[i64]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done = match self {
            Ledger::Sqlite(pool) => {
                let marks = vec!["?"; ids.len()].join(", ");
                let sql = format!("UPDATE usage_ledger SET published = 1 WHERE id IN ({marks})");
                let mut q = sqlx::query(&sql);
                for id in ids {
                    q = q.bind(id);
                }
                q.execute(&*pool).await?.rows_affected()
            }
            Ledger::Postgres(conn) => {
                sqlx::query("UPDATE usage_ledger SET published = TRUE WHERE id = ANY($1)")
                    .bind(ids)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
            }
        };
        Ok(done)
    }

    /// Marks published the unpublished rows of these request ids. Returns how many.
    async fn mark_requests(&mut self, request_ids: &[String]) -> Result<u64, StoreError> {
        if request_ids.is_empty() {
            return Ok(0);
        }
        let done = match self {
            Ledger::Sqlite(pool) => {
                let marks = vec!["?"; request_ids.len()].join(", ");
                let sql = format!(
                    "UPDATE usage_ledger SET published = 1 \
                     WHERE published = 0 AND request_id IN ({marks})"
                );
                let mut q = sqlx::query(&sql);
                for id in request_ids {
                    q = q.bind(id);
                }
                q.execute(&*pool).await?.rows_affected()
            }
            Ledger::Postgres(conn) => sqlx::query(
                "UPDATE usage_ledger SET published = TRUE \
                     WHERE NOT published AND request_id = ANY($1)",
            )
            .bind(request_ids)
            .execute(&mut *conn)
            .await?
            .rows_affected(),
        };
        Ok(done)
    }
}

// ----- the stream side ------------------------------------------------------------------------

/// JetStream's "no message found" (a sequence deleted by age).
fn no_message(e: &stream::RawMessageError) -> bool {
    match e.kind() {
        stream::RawMessageErrorKind::NoMessageFound => true,
        stream::RawMessageErrorKind::JetStream(j) => {
            j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND
        }
        _ => false,
    }
}

/// The request ids of the last `n` messages of the stream (those a stopped publisher may have
/// stored without marking).
async fn last_request_ids(stream: &stream::Stream, n: usize) -> Result<Vec<String>, String> {
    let info = stream
        .get_info()
        .await
        .map_err(|e| format!("cannot read stream {LEDGER_STREAM}'s state: {e}"))?;
    let state = info.state;
    if state.messages == 0 || state.last_sequence == 0 {
        return Ok(Vec::new());
    }
    let n = u64::try_from(n.max(1)).unwrap_or(u64::MAX);
    let from = state
        .first_sequence
        .max(state.last_sequence.saturating_sub(n - 1))
        .max(1);
    let mut ids = Vec::new();
    for seq in from..=state.last_sequence {
        match stream.get_raw_message(seq).await {
            Ok(m) => {
                if let Some(id) = m.headers.get("Nats-Msg-Id") {
                    ids.push(id.as_str().to_string());
                }
            }
            Err(e) if no_message(&e) => {}
            Err(e) => {
                return Err(format!(
                    "cannot read message {seq} of stream {LEDGER_STREAM}: {e}"
                ))
            }
        }
    }
    Ok(ids)
}

/// Publishes `rows` (pipelined) and returns the ids JetStream acknowledged, how many of them as
/// duplicates, and the first error.
async fn publish_rows(
    js: &jetstream::Context,
    rows: &[LedgerRow],
) -> (Vec<i64>, u64, Option<String>) {
    let mut pending: Vec<(i64, PublishAckFuture)> = Vec::with_capacity(rows.len());
    let mut error = None;
    for row in rows {
        let (subject, msg) = match LedgerMessage::of(row) {
            Ok(m) => m.publish(),
            Err(e) => {
                error = Some(e);
                break;
            }
        };
        match js.send_publish(subject, msg).await {
            Ok(ack) => pending.push((row.ledger_id, ack)),
            Err(e) => {
                error = Some(format!("publish to {LEDGER_STREAM} failed: {e}"));
                break;
            }
        }
    }
    let mut acked = Vec::with_capacity(pending.len());
    let mut duplicates = 0;
    for (id, ack) in pending {
        match ack.await {
            Ok(a) => {
                if a.duplicate {
                    duplicates += 1;
                }
                acked.push(id);
            }
            Err(e) => {
                if error.is_none() {
                    error = Some(format!(
                        "{LEDGER_STREAM} did not acknowledge ledger row {id}: {e}"
                    ));
                }
            }
        }
    }
    (acked, duplicates, error)
}

impl ControlPlane {
    /// Starts publishing the ledger to `FLEX_LEDGER` over `client`, in the background, until the
    /// returned handle is dropped (see the module docs).
    pub fn spawn_ledger_publisher(
        self: &Arc<Self>,
        client: async_nats::Client,
        config: LedgerPublisherConfig,
    ) -> LedgerPublisher {
        let stats = Arc::new(LedgerPublisherStats::default());
        let store = self.store().clone();
        let task = {
            let stats = stats.clone();
            tokio::spawn(async move { publish_ledger(store, client, config, stats).await })
        };
        LedgerPublisher { stats, task }
    }
}

/// Publishes the ledger forever: one session at a time, reconnecting with backoff.
async fn publish_ledger(
    store: Store,
    client: async_nats::Client,
    config: LedgerPublisherConfig,
    stats: Arc<LedgerPublisherStats>,
) {
    let js = jetstream::ContextBuilder::new()
        .timeout(config.ack_timeout)
        .build(client.clone());
    let mut backoff = Duration::from_millis(100);
    let mut said_standby = false;
    loop {
        let before = stats.published.load(Ordering::Relaxed);
        match session(&store, &client, &js, &config, &stats).await {
            SessionEnd::Standby => {
                stats.standing_by.store(true, Ordering::Relaxed);
                if !said_standby {
                    tracing::info!(
                        "another control plane publishes the ledger to {LEDGER_STREAM} (it holds the publish lock); standing by"
                    );
                    said_standby = true;
                }
                tokio::time::sleep(config.standby_poll).await;
                continue;
            }
            SessionEnd::Failed(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                if stats.published.load(Ordering::Relaxed) > before {
                    backoff = Duration::from_millis(100);
                }
                tracing::warn!(error = %e, retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "ledger publishing to {LEDGER_STREAM} interrupted; rows wait in the ledger; retrying");
            }
        }
        stats.standing_by.store(false, Ordering::Relaxed);
        said_standby = false;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// One session: takes the ledger (and its lock), finds or creates the stream, marks what a
/// previous session stored without marking, then publishes until an error.
async fn session(
    store: &Store,
    client: &async_nats::Client,
    js: &jetstream::Context,
    config: &LedgerPublisherConfig,
    stats: &LedgerPublisherStats,
) -> SessionEnd {
    let mut ledger = match Ledger::open(store).await {
        Ok(Some(l)) => l,
        Ok(None) => return SessionEnd::Standby,
        Err(e) => return SessionEnd::Failed(e),
    };
    stats.standing_by.store(false, Ordering::Relaxed);
    let end = publish_session(&mut ledger, client, js, config, stats).await;
    ledger.close().await;
    SessionEnd::Failed(end)
}

async fn publish_session(
    ledger: &mut Ledger,
    client: &async_nats::Client,
    js: &jetstream::Context,
    config: &LedgerPublisherConfig,
    stats: &LedgerPublisherStats,
) -> String {
    let batch = config.batch.max(1);
    let stream = match js.get_or_create_stream(ledger_stream_config(config)).await {
        Ok(s) => s,
        Err(e) => return format!("cannot find or create stream {LEDGER_STREAM}: {e}"),
    };
    let stored = match last_request_ids(&stream, batch).await {
        Ok(ids) => ids,
        Err(e) => return e,
    };
    match ledger.mark_requests(&stored).await {
        Ok(0) => {}
        Ok(n) => {
            stats.reconciled.fetch_add(n, Ordering::Relaxed);
            tracing::info!(
                rows = n,
                "ledger rows already in {LEDGER_STREAM} (stored before the last stop, not yet marked) marked published without publishing them again"
            );
        }
        Err(e) => return format!("cannot mark ledger rows published: {e}"),
    }
    tracing::info!("publishing the ledger to {LEDGER_STREAM}");
    loop {
        if client.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(config.poll).await;
            continue;
        }
        let rows = match ledger.pending(batch).await {
            Ok(r) => r,
            Err(e @ StoreError::Corrupt(_)) => {
                return format!(
                    "{e}; publishing stops at this row: fix it, or skip it with `UPDATE usage_ledger SET published = TRUE WHERE id = …` (SQLite: 1)"
                )
            }
            Err(e) => return format!("cannot read the ledger: {e}"),
        };
        if rows.is_empty() {
            tokio::time::sleep(config.poll).await;
            continue;
        }
        let (acked, duplicates, error) = publish_rows(js, &rows).await;
        // Mark what JetStream stored even when the round failed part way.
        match ledger.mark(&acked).await {
            Ok(_) => {
                let fresh = acked.len() as u64 - duplicates;
                stats.published.fetch_add(fresh, Ordering::Relaxed);
                stats.duplicates.fetch_add(duplicates, Ordering::Relaxed);
                if !acked.is_empty() {
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                return format!(
                    "cannot mark {} ledger rows published (they are in {LEDGER_STREAM}; the next session finds them there): {e}",
                    acked.len()
                )
            }
        }
        if let Some(e) = error {
            return e;
        }
        if rows.len() < batch {
            tokio::time::sleep(config.poll).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_escape_the_org_like_the_usage_stream() {
        assert_eq!(ledger_subject("org_01abc"), "flex.ledger.org_01abc");
        assert_eq!(ledger_subject("a.b*c>d e"), "flex.ledger.a_b_c_d_e");
        assert_eq!(ledger_subject(""), "flex.ledger._");
    }

    #[test]
    fn a_row_is_one_message_keyed_by_its_request_id() {
        let row = LedgerRow {
            schema_version: LEDGER_SCHEMA_VERSION,
            ledger_id: 42,
            request_id: "req_1".into(),
            org_id: "org.x".into(),
            cost_micros: 10,
            standard_cost_micros: 25,
            savings_micros: 15,
            tiers_started: vec!["flex".into()],
            ..LedgerRow::default()
        };
        let msg = LedgerMessage::of(&row).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(msg.subject, "flex.ledger.org_x");
        let header = |name: &str| msg.headers.get(name).map(|v| v.as_str().to_string());
        assert_eq!(header("Nats-Msg-Id").as_deref(), Some("req_1"));
        assert_eq!(header(HEADER_LEDGER_ID).as_deref(), Some("42"));
        assert_eq!(header(HEADER_SCHEMA).as_deref(), Some("1"));
        let back: LedgerRow =
            serde_json::from_slice(&msg.payload).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, row);
        let json: serde_json::Value =
            serde_json::from_slice(&msg.payload).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json["schema_version"], 1);
        assert_eq!(json["savings_micros"], 15);
    }

    #[test]
    fn the_duplicate_window_never_exceeds_max_age() {
        let cfg = LedgerPublisherConfig {
            max_age: Duration::from_secs(60),
            ..LedgerPublisherConfig::default()
        };
        let s = ledger_stream_config(&cfg);
        assert_eq!(s.duplicate_window, Duration::from_secs(60));
        assert_eq!(s.subjects, vec!["flex.ledger.>".to_string()]);
        assert_eq!(s.storage, stream::StorageType::File);
    }
}
