CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    -- lower(email): the uniqueness that matters is case-insensitive.
    email_lower TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    display_name TEXT,
    password_hash TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX users_created_at_id ON users (created_at, id);
