//! `/v1`: the frozen contract. Shapes here change only with a new version beside this one.

use serde::{Deserialize, Serialize};
use wasmgate_sdk::{
    Body, HeaderValue, Method, Problem, Request, Response, Result, StatusCode, json, param,
    read_json,
};

use crate::auth;
use crate::invalid;
use crate::store::{self, User};
use wasmgate_sdk::{password, response_cache};

/// Page size when `limit` is absent, and the most a page may hold.
const DEFAULT_LIMIT: i64 = 20;
const MAX_LIMIT: i64 = 100;
const MAX_NAME: usize = 200;
const MAX_EMAIL: usize = 254;
const MIN_PASSWORD: usize = 8;
/// Long passwords are fine, unbounded ones are a hashing-cost attack.
const MAX_PASSWORD: usize = 1024;

#[derive(Serialize)]
struct UserV1<'a> {
    id: &'a str,
    email: &'a str,
    name: &'a str,
    created_at: String,
}

/// Milliseconds since the epoch (as the host's token times are) in the same format.
pub fn rfc3339_ms(ms: u64) -> String {
    rfc3339(i64::try_from(ms).unwrap_or(i64::MAX).saturating_mul(1000))
}

/// Checks a login body's email and password: the user, or `None` for wrong credentials. Always
/// one Argon2 verification in the host, known email or not, so timing does not reveal who has
/// an account. A hash made with older parameters than the host's is replaced by a new one.
pub async fn login(req: &mut Request<Body>) -> std::result::Result<Option<User>, Problem> {
    let login: Login = read_json(req).await?;
    let user = store::by_email(&login.email)?;
    let stored = user.as_ref().map(|u| u.password_hash.as_str());
    if !password::verify(&login.password, stored)? {
        return Ok(None);
    }
    let Some(user) = user else {
        return Ok(None);
    };
    if password::needs_rehash(&user.password_hash)? {
        // Best effort: the login stands either way, and the next one tries again.
        if let Ok(hash) = password::hash(&login.password) {
            let _ = store::replace_password_hash(&user.id, &user.password_hash, &hash);
        }
    }
    Ok(Some(user))
}

/// The one answer to wrong credentials, whatever was wrong.
pub fn login_failed() -> Response<Body> {
    auth::challenge(auth::unauthorized("wrong email or password").into_response())
}

pub fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn shape(u: &User) -> UserV1<'_> {
    UserV1 {
        id: &u.id,
        email: &u.email,
        name: &u.name,
        created_at: rfc3339(u.created_at),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    email: String,
    name: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchUser {
    name: Option<String>,
    email: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    email: String,
    password: String,
}

pub fn check_email(email: &str) -> std::result::Result<(), Problem> {
    let ok = email.len() <= MAX_EMAIL
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain.split('.').count() >= 2
                && domain.split('.').all(|part| !part.is_empty())
        });
    if ok {
        Ok(())
    } else {
        Err(invalid("email is not a valid address"))
    }
}

pub fn check_name(field: &str, name: &str) -> std::result::Result<(), Problem> {
    if name.trim().is_empty()
        || name.chars().count() > MAX_NAME
        || name.chars().any(char::is_control)
    {
        return Err(invalid(format!(
            "{field} must be 1 to {MAX_NAME} printable characters"
        )));
    }
    Ok(())
}

pub fn check_password(password: &str) -> std::result::Result<(), Problem> {
    let n = password.chars().count();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&n) {
        return Err(invalid(format!(
            "password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters"
        )));
    }
    Ok(())
}

pub fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "user-not-found", "User not found")
}

pub fn with_location(mut resp: Response<Body>, path: &str) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(path) {
        resp.headers_mut().insert("location", v);
    }
    resp
}

fn query<'a>(req: &'a Request<Body>, name: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v)
    })
}

fn encode_cursor(u: &User) -> String {
    format!("{}:{}", u.created_at, u.id)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_cursor(cursor: &str) -> Option<(i64, String)> {
    if !cursor.len().is_multiple_of(2) || cursor.len() > 200 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (ts, id) = text.split_once(':')?;
    let id_ok = !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit());
    Some((ts.parse().ok()?, id.to_string())).filter(|_| id_ok)
}

/// One page of users for `?limit=N&cursor=C` (shared by v1 and v2, which differ only in
/// shape), and the cursor of the next page if there is one.
pub fn page(req: &Request<Body>) -> std::result::Result<(Vec<User>, Option<String>), Problem> {
    let limit = match query(req, "limit") {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid("limit must be a positive integer"))?
            .min(MAX_LIMIT),
    };
    let after = match query(req, "cursor") {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            Problem::new(StatusCode::BAD_REQUEST, "bad-cursor", "Invalid cursor")
                .with_detail("use the next_cursor of a previous page")
        })?),
    };
    // One more than asked tells whether another page follows.
    let mut users = store::page(after, limit + 1)?;
    let more = users.len() as i64 > limit;
    users.truncate(limit as usize);
    let next = more.then(|| users.last().map(encode_cursor)).flatten();
    Ok((users, next))
}

/// 204, or 404 when there was no such user (the same in v1 and v2).
pub fn delete(id: &str) -> Result {
    if !store::delete(id)? {
        return Err(not_found());
    }
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

pub async fn handle(mut req: Request<Body>, route: &str) -> Result {
    let id = param(&req, "id").map(str::to_string);
    match (req.method().clone(), route, id) {
        (Method::POST, "/v1/users", _) => {
            let new: NewUser = read_json(&mut req).await?;
            check_email(&new.email)?;
            check_name("name", &new.name)?;
            check_password(&new.password)?;
            let hash = password::hash(&new.password)?;
            let user = store::insert(&new.email, &new.name, None, &hash)?;
            Ok(with_location(
                json(StatusCode::CREATED, &shape(&user)),
                &format!("/v1/users/{}", user.id),
            ))
        }
        (Method::GET, "/v1/users", _) => {
            auth::admin(&req)?;
            let (users, next) = page(&req)?;
            let shaped: Vec<_> = users.iter().map(shape).collect();
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "users": shaped, "next_cursor": next }),
            ))
        }
        (Method::GET, "/v1/users/{id}", Some(id)) => {
            auth::owner_or_admin(&req, &id)?;
            // Tagged either way: a cached 404 is purged too when the id appears.
            let resp = match store::by_id(&id)? {
                Some(user) => json(StatusCode::OK, &shape(&user)),
                None => not_found().into_response(),
            };
            Ok(response_cache::tag(resp, &[&store::tag(&id)]))
        }
        (Method::PATCH, "/v1/users/{id}", Some(id)) => {
            auth::owner_or_admin(&req, &id)?;
            let patch: PatchUser = read_json(&mut req).await?;
            if patch.name.is_none() && patch.email.is_none() {
                return Err(invalid("give name and/or email"));
            }
            if let Some(e) = &patch.email {
                check_email(e)?;
            }
            if let Some(n) = &patch.name {
                check_name("name", n)?;
            }
            let user = store::update(
                &id,
                patch.email.as_deref(),
                patch.name.as_deref(),
                None,
                None,
            )?
            .ok_or_else(not_found)?;
            Ok(json(StatusCode::OK, &shape(&user)))
        }
        (Method::DELETE, "/v1/users/{id}", Some(id)) => {
            auth::owner_or_admin(&req, &id)?;
            delete(&id)
        }
        (Method::POST, "/v1/login", _) => {
            let Some(user) = login(&mut req).await? else {
                return Ok(login_failed());
            };
            let tokens = auth::start_session(&user.id)?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "token": tokens.access_token, "expires_at": rfc3339_ms(tokens.access_expires_at) }),
            ))
        }
        (Method::GET, "/v1/me", _) => {
            let user = match auth::caller(&req) {
                Ok(p) => store::by_id(&p.subject)?,
                Err(_) => None,
            };
            match user {
                Some(u) => Ok(json(StatusCode::OK, &shape(&u))),
                None => Ok(auth::challenge(
                    auth::unauthorized("a valid bearer token is required").into_response(),
                )),
            }
        }
        _ => Err(Problem::not_found()),
    }
}
