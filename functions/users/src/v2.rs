//! `/v2`: the evolving contract over the same rows as v1: adds `display_name`, `updated_at` and
//! a `version` (also the `ETag`); `PATCH` with `If-Match` refuses a stale version with 412, so
//! two concurrent updates never silently overwrite each other.

use serde::{Deserialize, Deserializer, Serialize};
use wasmgate_sdk::{
    Body, HeaderValue, Method, Problem, Request, Response, Result, StatusCode, json, param,
    read_json,
};

use crate::store::{self, User};
use crate::v1::{
    check_email, check_name, check_password, delete, login, login_failed, not_found, page, rfc3339,
    rfc3339_ms, with_location,
};
use crate::{auth, invalid};
use wasmgate_sdk::response_cache;

#[derive(Serialize)]
struct UserV2<'a> {
    id: &'a str,
    email: &'a str,
    name: &'a str,
    display_name: Option<&'a str>,
    created_at: String,
    updated_at: String,
    version: i64,
}

fn shape(u: &User) -> UserV2<'_> {
    UserV2 {
        id: &u.id,
        email: &u.email,
        name: &u.name,
        display_name: u.display_name.as_deref(),
        created_at: rfc3339(u.created_at),
        updated_at: rfc3339(u.updated_at),
        version: u.version,
    }
}

/// The user with its version as a strong ETag.
fn respond(status: StatusCode, u: &User) -> Response<Body> {
    let mut resp = json(status, &shape(u));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", u.version)) {
        resp.headers_mut().insert("etag", etag);
    }
    resp
}

/// `Some(Some(v))` for a value, `Some(None)` for an explicit null, `None` when absent.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    email: String,
    name: String,
    password: String,
    display_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchUser {
    name: Option<String>,
    email: Option<String>,
    #[serde(default, deserialize_with = "present")]
    display_name: Option<Option<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Refresh {
    refresh_token: String,
}

/// An OAuth 2.0-style token response (RFC 6749 section 5.1), with absolute expiry times too.
fn token_response(t: &wasmgate_sdk::auth::Tokens) -> Response<Body> {
    let now_ms = crate::store::now_micros() / 1000;
    let expires_in =
        (i64::try_from(t.access_expires_at).unwrap_or(i64::MAX) - now_ms).max(0) / 1000;
    let mut resp = json(
        StatusCode::OK,
        &serde_json::json!({
            "access_token": t.access_token,
            "token_type": "Bearer",
            "expires_in": expires_in,
            "expires_at": rfc3339_ms(t.access_expires_at),
            "refresh_token": t.refresh_token,
            "refresh_expires_at": rfc3339_ms(t.refresh_expires_at),
        }),
    );
    // Tokens are credentials: no cache may keep them (RFC 6749 section 5.1).
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    resp
}

fn precondition_failed() -> Problem {
    Problem::new(
        StatusCode::PRECONDITION_FAILED,
        "stale-version",
        "The user changed since you read it",
    )
    .with_detail("GET it again and retry with its ETag in If-Match")
}

/// The version `If-Match` names: `None` without the header or for `*`.
fn if_match(req: &Request<Body>) -> std::result::Result<Option<i64>, Problem> {
    let Some(v) = req.headers().get("if-match") else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| invalid("If-Match is not text"))?
        .trim();
    if v == "*" {
        return Ok(None);
    }
    v.trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .map(Some)
        .map_err(|_| precondition_failed())
}

pub async fn handle(mut req: Request<Body>, route: &str) -> Result {
    let id = param(&req, "id").map(str::to_string);
    match (req.method().clone(), route, id) {
        (Method::POST, "/v2/users", _) => {
            let new: NewUser = read_json(&mut req).await?;
            check_email(&new.email)?;
            check_name("name", &new.name)?;
            check_password(&new.password)?;
            if let Some(d) = &new.display_name {
                check_name("display_name", d)?;
            }
            let hash = wasmgate_sdk::password::hash(&new.password)?;
            let user = store::insert(&new.email, &new.name, new.display_name.as_deref(), &hash)?;
            Ok(with_location(
                respond(StatusCode::CREATED, &user),
                &format!("/v2/users/{}", user.id),
            ))
        }
        (Method::GET, "/v2/users", _) => {
            auth::admin(&req)?;
            let (users, next) = page(&req)?;
            let shaped: Vec<_> = users.iter().map(shape).collect();
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "users": shaped, "next_cursor": next }),
            ))
        }
        (Method::GET, "/v2/users/{id}", Some(id)) => {
            auth::owner_or_admin(&req, &id)?;
            let resp = match store::by_id(&id)? {
                Some(user) => respond(StatusCode::OK, &user),
                None => not_found().into_response(),
            };
            Ok(response_cache::tag(resp, &[&store::tag(&id)]))
        }
        (Method::PATCH, "/v2/users/{id}", Some(id)) => {
            auth::owner_or_admin(&req, &id)?;
            let expected = if_match(&req)?;
            let patch: PatchUser = read_json(&mut req).await?;
            if patch.name.is_none() && patch.email.is_none() && patch.display_name.is_none() {
                return Err(invalid("give name, email and/or display_name"));
            }
            if let Some(e) = &patch.email {
                check_email(e)?;
            }
            if let Some(n) = &patch.name {
                check_name("name", n)?;
            }
            if let Some(Some(d)) = &patch.display_name {
                check_name("display_name", d)?;
            }
            let display = patch.display_name.as_ref().map(Option::as_deref);
            let Some(user) = store::update(
                &id,
                patch.email.as_deref(),
                patch.name.as_deref(),
                display,
                expected,
            )?
            else {
                // Absent, or present at another version than If-Match named.
                return Err(if store::by_id(&id)?.is_some() {
                    precondition_failed()
                } else {
                    not_found()
                });
            };
            Ok(respond(StatusCode::OK, &user))
        }
        (Method::DELETE, "/v2/users/{id}", Some(id)) => {
            auth::owner_or_admin(&req, &id)?;
            delete(&id)
        }
        (Method::GET, "/v2/users/{id}/activity", Some(id)) => {
            auth::owner_or_admin(&req, &id)?;
            crate::activity::get(&id)
        }
        (Method::POST, "/v2/login", _) => {
            let Some(user) = login(&mut req).await? else {
                return Ok(login_failed());
            };
            Ok(token_response(&auth::start_session(&user.id)?))
        }
        (Method::POST, "/v2/token/refresh", _) => {
            let body: Refresh = read_json(&mut req).await?;
            match wasmgate_sdk::auth::refresh(&body.refresh_token) {
                Ok(tokens) => Ok(token_response(&tokens)),
                Err(wasmgate_sdk::auth::Error::Refused) => Ok(auth::challenge(
                    auth::unauthorized("the refresh token is not valid; log in again")
                        .into_response(),
                )),
                Err(e) => Err(e.into()),
            }
        }
        (Method::POST, "/v2/logout", _) => {
            let p = auth::caller(&req)?;
            let Some(session) = p.session else {
                return Err(invalid("this token has no session to end"));
            };
            wasmgate_sdk::auth::revoke(&session)?;
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            Ok(resp)
        }
        _ => Err(Problem::not_found()),
    }
}
