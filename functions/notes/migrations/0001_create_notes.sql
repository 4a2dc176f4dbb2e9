CREATE TABLE notes (
    id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    fence BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX notes_created_at ON notes (created_at);
