//! Access control per route, the first policy after routing: a refused request costs a header
//! parse and a cache lookup, and never reaches the response cache, the idempotency store, the
//! bulkhead or an instance.
//!
//! The verified principal reaches the guest as `wasmgate-principal-*` headers (subject, roles,
//! scopes, token id, session, issuer); the server removes every client-sent `wasmgate-*`
//! header before this runs, so a guest can trust them.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, header};
use axum::response::Response;

use super::GuestRequest;
use super::layer::{Next, Policy, forward};
use crate::auth::{Auth, Principal, Rejection, RouteAuthConfig};
use crate::problem::Problem;
use crate::request_id::RequestId;
use crate::server::ROUTE_HEADER_PREFIX;

/// One route's rule.
pub struct AuthPolicy {
    auth: Auth,
    rule: RouteAuthConfig,
    /// The header the server put the owner parameter in.
    owner: Option<HeaderName>,
}

impl AuthPolicy {
    pub fn new(auth: Auth, rule: &RouteAuthConfig) -> Self {
        let owner = rule.owner.as_ref().and_then(|p| {
            HeaderName::from_bytes(format!("{ROUTE_HEADER_PREFIX}param-{p}").as_bytes()).ok()
        });
        Self {
            auth,
            rule: rule.clone(),
            owner,
        }
    }

    /// May `p` make this request? `Err` says why not.
    fn authorize(&self, p: &Principal, headers: &HeaderMap) -> Result<(), Problem> {
        let admin = p.has_role(&self.auth.config().admin_role);
        if !self.rule.roles.is_empty() && !self.rule.roles.iter().any(|r| p.has_role(r)) {
            return Err(Problem::Forbidden {
                detail: format!(
                    "this route needs one of the roles: {}",
                    self.rule.roles.join(", ")
                ),
                insufficient: true,
            });
        }
        if let Some(missing) = self.rule.scopes.iter().find(|s| !p.scopes.contains(s)) {
            return Err(Problem::Forbidden {
                detail: format!("this route needs the scope `{missing}`"),
                insufficient: true,
            });
        }
        if let Some(h) = &self.owner
            && !admin
            && headers
                .get(h)
                .is_none_or(|v| v.as_bytes() != p.subject.as_bytes())
        {
            return Err(Problem::Forbidden {
                detail: "only the owner of this resource or an admin may do this".into(),
                insufficient: false,
            });
        }
        Ok(())
    }
}

/// What the `Authorization` header holds.
pub(crate) enum Credentials<'a> {
    None,
    Bearer(&'a str),
    /// A header that is there but not a usable bearer token.
    Unusable,
}

pub(crate) fn credentials(headers: &HeaderMap) -> Credentials<'_> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = all.next() else {
        return Credentials::None;
    };
    if all.next().is_some() {
        return Credentials::Unusable;
    }
    let Ok(text) = value.to_str() else {
        return Credentials::Unusable;
    };
    match text.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Credentials::Bearer(token.trim())
        }
        _ => Credentials::Unusable,
    }
}

impl Policy for AuthPolicy {
    async fn call<S: Next>(self: Arc<Self>, mut req: GuestRequest, mut next: S) -> Response {
        let token = match credentials(req.headers()) {
            Credentials::Bearer(t) => t,
            Credentials::None | Credentials::Unusable if !self.rule.required => {
                return forward(&mut next, req).await;
            }
            Credentials::None => {
                return Problem::Unauthorized { rejection: None }
                    .into_response_with(&RequestId::of(req.extensions()));
            }
            Credentials::Unusable => {
                return Problem::Unauthorized {
                    rejection: Some(Rejection::Malformed),
                }
                .into_response_with(&RequestId::of(req.extensions()));
            }
        };
        let refuse = |problem: Problem, req: &GuestRequest| {
            problem.into_response_with(&RequestId::of(req.extensions()))
        };
        let principal = match self.auth.verify(token).await {
            Ok(p) => p,
            Err(r) => return refuse(Problem::Unauthorized { rejection: Some(r) }, &req),
        };
        if let Err(problem) = self.authorize(&principal, req.headers()) {
            return refuse(problem, &req);
        }
        let headers = req.headers_mut();
        for (name, value) in &principal.headers {
            headers.insert(name.clone(), value.clone());
        }
        req.extensions_mut().insert(principal);
        forward(&mut next, req).await
    }
}
