//! The auth tables in the platform database (SQLite by default, PostgreSQL in production, so
//! every replica sees the same): signing keys, sessions (refresh-token families), refresh
//! tokens (only their hashes), and the roles operators grant.

use std::sync::Arc;

use crate::capabilities::db::migrations::{Migration, MigrationError};
use crate::capabilities::db::{DbBackend, DbError, Rows, Value};

/// The migrations namespace of these tables (function names cannot contain `_`).
const OWNER: &str = "_wasmgate_auth";

const DDL: &str = "
CREATE TABLE wasmgate_signing_keys (
  kid TEXT PRIMARY KEY,
  private_pkcs8 TEXT NOT NULL,
  public_x TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  retired_at BIGINT
);
CREATE TABLE wasmgate_sessions (
  id TEXT PRIMARY KEY,
  subject TEXT NOT NULL,
  roles TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  revoked_at BIGINT
);
CREATE INDEX wasmgate_sessions_revoked ON wasmgate_sessions (revoked_at);
CREATE TABLE wasmgate_refresh_tokens (
  hash TEXT PRIMARY KEY,
  session_id TEXT NOT NULL,
  expires_at BIGINT NOT NULL,
  used_at BIGINT
);
CREATE TABLE wasmgate_roles (
  subject TEXT NOT NULL,
  role TEXT NOT NULL,
  granted_at BIGINT NOT NULL,
  PRIMARY KEY (subject, role)
);
";

/// A signing key as stored: the private key (PKCS#8, base64) never leaves the host.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub kid: String,
    pub private_pkcs8: String,
    pub public_x: String,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

/// A session (one login and the refresh tokens rotated from it).
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: String,
    pub subject: String,
    pub roles: Vec<String>,
    pub revoked: bool,
}

/// What presenting a refresh token found.
#[derive(Debug, PartialEq)]
pub enum Redeemed {
    /// Fresh and now used: its session, to issue the next pair from.
    Session(Session),
    /// Already used: a replay (the session is revoked by the caller).
    Replayed { session_id: String },
    /// Unknown, expired, or its session is revoked or gone.
    Refused,
}

#[derive(Clone)]
pub struct Store {
    db: Arc<dyn DbBackend>,
}

fn roles_of(joined: &str) -> Vec<String> {
    joined.split_whitespace().map(str::to_string).collect()
}

impl Store {
    /// Creates the tables if needed (once, under the migrations lock).
    pub async fn open(db: Arc<dyn DbBackend>) -> Result<Self, MigrationError> {
        db.migrate(OWNER, &[Migration::new("0001_auth", DDL.to_string())])
            .await?;
        Ok(Self { db })
    }

    async fn query(&self, sql: &str, params: Vec<Value>) -> Result<Rows, DbError> {
        self.db.query(sql, params).await
    }

    pub async fn keys(&self) -> Result<Vec<StoredKey>, DbError> {
        let rows = self
            .query(
                "SELECT kid, private_pkcs8, public_x, created_at, retired_at FROM wasmgate_signing_keys ORDER BY created_at, kid",
                vec![],
            )
            .await?;
        Ok(rows
            .rows
            .iter()
            .map(|r| StoredKey {
                kid: r[0].text(),
                private_pkcs8: r[1].text(),
                public_x: r[2].text(),
                created_at: r[3].int().unwrap_or(0),
                retired_at: r[4].int(),
            })
            .collect())
    }

    /// Adds `key` and retires every older key (they keep verifying until their tokens expire).
    pub async fn add_key(&self, key: &StoredKey) -> Result<(), DbError> {
        self.db
            .execute(
                "UPDATE wasmgate_signing_keys SET retired_at = $1 WHERE retired_at IS NULL",
                vec![Value::Int64(key.created_at)],
            )
            .await?;
        self.db
            .execute(
                "INSERT INTO wasmgate_signing_keys (kid, private_pkcs8, public_x, created_at, retired_at) VALUES ($1, $2, $3, $4, NULL)",
                vec![
                    Value::Text(key.kid.clone()),
                    Value::Text(key.private_pkcs8.clone()),
                    Value::Text(key.public_x.clone()),
                    Value::Int64(key.created_at),
                ],
            )
            .await?;
        Ok(())
    }

    /// Deletes keys retired before `before`: no token they signed can still be valid.
    pub async fn drop_keys_retired_before(&self, before: i64) -> Result<u64, DbError> {
        self.db
            .execute(
                "DELETE FROM wasmgate_signing_keys WHERE retired_at IS NOT NULL AND retired_at < $1",
                vec![Value::Int64(before)],
            )
            .await
    }

    pub async fn roles(&self, subject: &str) -> Result<Vec<String>, DbError> {
        let rows = self
            .query(
                "SELECT role FROM wasmgate_roles WHERE subject = $1 ORDER BY role",
                vec![Value::Text(subject.into())],
            )
            .await?;
        Ok(rows.rows.iter().map(|r| r[0].text()).collect())
    }

    /// Every grant, or one subject's: (subject, role).
    pub async fn grants(&self, subject: Option<&str>) -> Result<Vec<(String, String)>, DbError> {
        let rows = match subject {
            Some(s) => {
                self.query(
                    "SELECT subject, role FROM wasmgate_roles WHERE subject = $1 ORDER BY subject, role",
                    vec![Value::Text(s.into())],
                )
                .await?
            }
            None => {
                self.query(
                    "SELECT subject, role FROM wasmgate_roles ORDER BY subject, role",
                    vec![],
                )
                .await?
            }
        };
        Ok(rows
            .rows
            .iter()
            .map(|r| (r[0].text(), r[1].text()))
            .collect())
    }

    /// Returns whether the grant is new.
    pub async fn grant(&self, subject: &str, role: &str, now: i64) -> Result<bool, DbError> {
        Ok(self
            .db
            .execute(
                "INSERT INTO wasmgate_roles (subject, role, granted_at) VALUES ($1, $2, $3) ON CONFLICT (subject, role) DO NOTHING",
                vec![
                    Value::Text(subject.into()),
                    Value::Text(role.into()),
                    Value::Int64(now),
                ],
            )
            .await?
            == 1)
    }

    /// Returns whether there was such a grant.
    pub async fn ungrant(&self, subject: &str, role: &str) -> Result<bool, DbError> {
        Ok(self
            .db
            .execute(
                "DELETE FROM wasmgate_roles WHERE subject = $1 AND role = $2",
                vec![Value::Text(subject.into()), Value::Text(role.into())],
            )
            .await?
            == 1)
    }

    /// A new session with its first refresh token (by hash).
    pub async fn create_session(
        &self,
        session: &Session,
        refresh_hash: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), DbError> {
        self.db
            .execute(
                "INSERT INTO wasmgate_sessions (id, subject, roles, created_at, expires_at, revoked_at) VALUES ($1, $2, $3, $4, $5, NULL)",
                vec![
                    Value::Text(session.id.clone()),
                    Value::Text(session.subject.clone()),
                    Value::Text(session.roles.join(" ")),
                    Value::Int64(now),
                    Value::Int64(expires_at),
                ],
            )
            .await?;
        self.add_refresh(&session.id, refresh_hash, expires_at)
            .await
    }

    pub async fn add_refresh(
        &self,
        session_id: &str,
        hash: &str,
        expires_at: i64,
    ) -> Result<(), DbError> {
        self.db
            .execute(
                "INSERT INTO wasmgate_refresh_tokens (hash, session_id, expires_at, used_at) VALUES ($1, $2, $3, NULL)",
                vec![
                    Value::Text(hash.into()),
                    Value::Text(session_id.into()),
                    Value::Int64(expires_at),
                ],
            )
            .await?;
        self.db
            .execute(
                "UPDATE wasmgate_sessions SET expires_at = $1 WHERE id = $2",
                vec![Value::Int64(expires_at), Value::Text(session_id.into())],
            )
            .await?;
        Ok(())
    }

    /// Uses the refresh token with `hash` once. Marking it used is one conditional update, so of
    /// two concurrent presentations exactly one wins and the other is a replay.
    pub async fn redeem(&self, hash: &str, now: i64) -> Result<Redeemed, DbError> {
        let rows = self
            .query(
                "SELECT session_id, expires_at FROM wasmgate_refresh_tokens WHERE hash = $1",
                vec![Value::Text(hash.into())],
            )
            .await?;
        let Some(row) = rows.rows.first() else {
            return Ok(Redeemed::Refused);
        };
        let session_id = row[0].text();
        let used = self
            .db
            .execute(
                "UPDATE wasmgate_refresh_tokens SET used_at = $1 WHERE hash = $2 AND used_at IS NULL",
                vec![Value::Int64(now), Value::Text(hash.into())],
            )
            .await?;
        if used == 0 {
            return Ok(Redeemed::Replayed { session_id });
        }
        if row[1].int().unwrap_or(0) <= now {
            return Ok(Redeemed::Refused);
        }
        match self.session(&session_id).await? {
            Some(s) if !s.revoked => Ok(Redeemed::Session(s)),
            _ => Ok(Redeemed::Refused),
        }
    }

    pub async fn session(&self, id: &str) -> Result<Option<Session>, DbError> {
        let rows = self
            .query(
                "SELECT id, subject, roles, revoked_at FROM wasmgate_sessions WHERE id = $1",
                vec![Value::Text(id.into())],
            )
            .await?;
        Ok(rows.rows.first().map(|r| Session {
            id: r[0].text(),
            subject: r[1].text(),
            roles: roles_of(&r[2].text()),
            revoked: r[3].int().is_some(),
        }))
    }

    /// Marks the session revoked; returns whether it was live.
    pub async fn revoke(&self, id: &str, now: i64) -> Result<bool, DbError> {
        Ok(self
            .db
            .execute(
                "UPDATE wasmgate_sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                vec![Value::Int64(now), Value::Text(id.into())],
            )
            .await?
            == 1)
    }

    /// Sessions revoked at or after `since` (ms): what a process that may have missed a broadcast
    /// must still refuse.
    pub async fn revoked_since(&self, since: i64) -> Result<Vec<(String, i64)>, DbError> {
        let rows = self
            .query(
                "SELECT id, revoked_at FROM wasmgate_sessions WHERE revoked_at >= $1",
                vec![Value::Int64(since)],
            )
            .await?;
        Ok(rows
            .rows
            .iter()
            .map(|r| (r[0].text(), r[1].int().unwrap_or(0)))
            .collect())
    }

    /// Deletes refresh tokens and sessions that expired before `before`.
    pub async fn sweep(&self, before: i64) -> Result<(), DbError> {
        self.db
            .execute(
                "DELETE FROM wasmgate_refresh_tokens WHERE expires_at < $1",
                vec![Value::Int64(before)],
            )
            .await?;
        self.db
            .execute(
                "DELETE FROM wasmgate_sessions WHERE expires_at < $1",
                vec![Value::Int64(before)],
            )
            .await?;
        Ok(())
    }
}
