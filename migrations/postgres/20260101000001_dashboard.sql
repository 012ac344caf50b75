-- The dashboard (control-plane/src/dashboard/). Keep in step with migrations/sqlite/.

-- Signed-in browser sessions. Not domain state (users and memberships are events in the log):
-- a row only says that whoever holds the cookie whose SHA-256 is `token_hash` is `user_id` until
-- `expires_at`. The token itself is never stored.
CREATE TABLE dashboard_sessions (
    token_hash TEXT        PRIMARY KEY,
    user_id    TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE INDEX dashboard_sessions_user ON dashboard_sessions (user_id);

-- An API key's last use (the dashboard's key list) without scanning the org's whole ledger.
CREATE INDEX usage_ledger_key_time ON usage_ledger (key_id, received_at);
