-- The audit log: every user event, once (a second application of an event fails on its id).
CREATE TABLE user_audit (
    event_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    version BIGINT NOT NULL,
    changed TEXT,
    at BIGINT NOT NULL
);
CREATE INDEX user_audit_user ON user_audit (user_id, at);
-- The read model: each user as its newest event describes it, with how many events it had.
CREATE TABLE user_activity (
    user_id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    name TEXT NOT NULL,
    display_name TEXT,
    version BIGINT NOT NULL,
    events BIGINT NOT NULL,
    created_at BIGINT,
    updated_at BIGINT,
    deleted_at BIGINT
);
