-- FlexInference control plane, SQLite (the embedded default). Keep in step with
-- migrations/postgres/: same tables, same columns, same meaning.

-- The append-only event log. `seq` is the global order projections tail; (stream_id,
-- stream_version) is the optimistic-concurrency key of each aggregate.
CREATE TABLE events (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_id      TEXT    NOT NULL,
    stream_version INTEGER NOT NULL CHECK (stream_version > 0),
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    payload        TEXT    NOT NULL CHECK (json_valid(payload)),
    actor          TEXT    NOT NULL,
    request_id     TEXT    NOT NULL,
    -- UTC, fixed width `YYYY-MM-DDTHH:MM:SS.ffffffZ`, so text order is time order.
    recorded_at    TEXT    NOT NULL,
    UNIQUE (stream_id, stream_version)
);

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

-- Results of idempotent commands, written in the same transaction as their events.
CREATE TABLE idempotency (
    key         TEXT PRIMARY KEY,
    command     TEXT NOT NULL,
    result_json TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

-- One row per request, counted once: `request_id` is unique and inserts ignore duplicates.
CREATE TABLE usage_ledger (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id           TEXT    NOT NULL UNIQUE,
    schema_version       INTEGER NOT NULL,
    org_id               TEXT    NOT NULL,
    key_id               TEXT    NOT NULL,
    model                TEXT    NOT NULL,
    provider             TEXT    NOT NULL,
    caller_format        TEXT    NOT NULL,
    start_within         TEXT    NOT NULL,
    served_tier          TEXT    NOT NULL,
    reason               TEXT    NOT NULL,
    flex_wait_ms         INTEGER NOT NULL,
    start_latency_ms     INTEGER NOT NULL,
    duration_ms          INTEGER NOT NULL,
    input_tokens         INTEGER NOT NULL,
    cached_input_tokens  INTEGER NOT NULL,
    output_tokens        INTEGER NOT NULL,
    reasoning_tokens     INTEGER NOT NULL,
    status               INTEGER NOT NULL,
    outcome              TEXT    NOT NULL,
    tiers_started        TEXT    NOT NULL CHECK (json_valid(tiers_started)),
    cost_micros          INTEGER NOT NULL,
    standard_cost_micros INTEGER NOT NULL,
    received_at          TEXT    NOT NULL,
    recorded_at          TEXT    NOT NULL
);

CREATE INDEX usage_ledger_org_time ON usage_ledger (org_id, received_at);
