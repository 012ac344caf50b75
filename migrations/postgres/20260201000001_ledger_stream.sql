-- The settled-ledger stream (control-plane/src/ledger_stream.rs). Keep in step with
-- migrations/sqlite/: same columns, same meaning.
--
-- `published`: whether the row is in the JetStream stream FLEX_LEDGER. A new row is inserted
-- unpublished in the transaction that records it (the column default), so a control plane that
-- stops between the commit and the publish publishes it after its restart; the publisher marks a
-- row once JetStream has acknowledged it. A duplicate usage event inserts no row, so it is never
-- published. Rows recorded before this migration count as published (FLEX_LEDGER starts with the
-- upgrade; to backfill, set `published = FALSE` on the rows to send).
ALTER TABLE usage_ledger ADD COLUMN published BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE usage_ledger ALTER COLUMN published SET DEFAULT FALSE;

-- What the publisher reads: only the rows still to publish, in id order.
CREATE INDEX usage_ledger_unpublished ON usage_ledger (id) WHERE NOT published;
