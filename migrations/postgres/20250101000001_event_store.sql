-- FlexInference control plane, Postgres (production). Keep in step with migrations/sqlite/:
-- same tables, same columns, same meaning.

-- The append-only event log. `seq` is the global order projections tail; appends take
-- pg_advisory_xact_lock first, so seq order is commit order. (stream_id, stream_version) is the
-- optimistic-concurrency key of each aggregate.
CREATE TABLE events (
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id      TEXT        NOT NULL,
    stream_version BIGINT      NOT NULL CHECK (stream_version > 0),
    event_type     TEXT        NOT NULL,
    schema_version INTEGER     NOT NULL,
    -- JSON (not JSONB): keeps the payload text exactly as written.
    payload        JSON        NOT NULL,
    actor          TEXT        NOT NULL,
    request_id     TEXT        NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL,
    UNIQUE (stream_id, stream_version)
);

CREATE FUNCTION flex_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION flex_events_append_only();

-- Results of idempotent commands, written in the same transaction as their events.
CREATE TABLE idempotency (
    key         TEXT PRIMARY KEY,
    command     TEXT        NOT NULL,
    result_json TEXT        NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);

-- One row per request, counted once: `request_id` is unique and inserts ignore duplicates.
CREATE TABLE usage_ledger (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id           TEXT        NOT NULL UNIQUE,
    schema_version       INTEGER     NOT NULL,
    org_id               TEXT        NOT NULL,
    key_id               TEXT        NOT NULL,
    model                TEXT        NOT NULL,
    provider             TEXT        NOT NULL,
    caller_format        TEXT        NOT NULL,
    start_within         TEXT        NOT NULL,
    served_tier          TEXT        NOT NULL,
    reason               TEXT        NOT NULL,
    flex_wait_ms         BIGINT      NOT NULL,
    start_latency_ms     BIGINT      NOT NULL,
    duration_ms          BIGINT      NOT NULL,
    input_tokens         BIGINT      NOT NULL,
    cached_input_tokens  BIGINT      NOT NULL,
    output_tokens        BIGINT      NOT NULL,
    reasoning_tokens     BIGINT      NOT NULL,
    status               INTEGER     NOT NULL,
    outcome              TEXT        NOT NULL,
    tiers_started        JSON        NOT NULL,
    cost_micros          BIGINT      NOT NULL,
    standard_cost_micros BIGINT      NOT NULL,
    received_at          TIMESTAMPTZ NOT NULL,
    recorded_at          TIMESTAMPTZ NOT NULL
);

CREATE INDEX usage_ledger_org_time ON usage_ledger (org_id, received_at);
