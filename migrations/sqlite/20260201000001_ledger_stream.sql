-- The settled-ledger stream (control-plane/src/ledger_stream.rs). Keep in step with
-- migrations/postgres/: same columns, same meaning.
--
-- `published` (0 or 1): whether the row is in the JetStream stream FLEX_LEDGER. A new row is
-- inserted unpublished in the transaction that records it (the column default), so a control
-- plane that stops between the commit and the publish publishes it after its restart; the
-- publisher marks a row once JetStream has acknowledged it. A duplicate usage event inserts no
-- row, so it is never published. Rows recorded before this migration count as published
-- (FLEX_LEDGER starts with the upgrade; to backfill, set `published = 0` on the rows to send).
ALTER TABLE usage_ledger ADD COLUMN published INTEGER NOT NULL DEFAULT 0 CHECK (published IN (0, 1));
UPDATE usage_ledger SET published = 1;

-- What the publisher reads: only the rows still to publish, in id order.
CREATE INDEX usage_ledger_unpublished ON usage_ledger (id) WHERE published = 0;
