//! The route table: path + method -> target.
//!
//! Generic over the target so it is tested without wasm; the server's target is a
//! [`crate::deploy::VersionSet`]. Paths use `{param}` segments
//! and may end in `/*` to match a prefix. A static segment wins over a parameter (`/users/me`
//! before `/users/{id}`); two routes that could match the same request with the same method are
//! refused when the table is built, naming both.

use axum::http::Method;

/// A built, immutable route table.
#[derive(Debug)]
pub struct RouteTable<T> {
    paths: matchit::Router<usize>,
    entries: Vec<PathEntry<T>>,
}

#[derive(Debug)]
struct PathEntry<T> {
    /// matchit's form of the path (a prefix's rest is a catch-all parameter).
    pattern: String,
    methods: Vec<MethodEntry<T>>,
}

#[derive(Debug)]
struct MethodEntry<T> {
    /// `None` answers every method.
    method: Option<Method>,
    target: T,
    /// "routes[2] (GET /x)", for problems.
    label: String,
    /// The route's path as written in the manifest.
    path: String,
}

/// The outcome of looking a request up.
#[derive(Debug, PartialEq)]
pub enum Match<'a, T> {
    Found {
        target: &'a T,
        /// The route's path as written, e.g. `/users/{id}`.
        pattern: &'a str,
        params: Vec<(String, String)>,
    },
    MethodNotAllowed {
        allow: String,
    },
    NotFound,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self {
            paths: matchit::Router::new(),
            entries: Vec::new(),
        }
    }
}

impl<T> RouteTable<T> {
    /// Adds a route. `label` names it in problems ("routes[2] (GET /x)").
    pub fn add(
        &mut self,
        path: &str,
        methods: &[Method],
        target: T,
        label: &str,
    ) -> Result<(), String>
    where
        T: Clone,
    {
        // The manifest's check says this first; here too, so no caller can add a route that
        // no request path can reach (found by the `routes` fuzz target).
        if !path.starts_with('/') {
            return Err(format!("{label}: path must start with `/`"));
        }
        let methods: Vec<Option<Method>> = if methods.is_empty() {
            vec![None]
        } else {
            methods.iter().cloned().map(Some).collect()
        };
        for pattern in matchit_patterns(path) {
            let index = self.entry_for(&pattern, label)?;
            let entry = &mut self.entries[index];
            for m in &methods {
                if let Some(MethodEntry { label: other, .. }) = entry
                    .methods
                    .iter()
                    .find(|e| e.method.is_none() || m.is_none() || e.method == *m)
                {
                    return Err(format!(
                        "{label}: duplicate route, {other} already serves {} {path}; remove one or give them distinct methods",
                        m.as_ref().map_or("every method", Method::as_str)
                    ));
                }
                entry.methods.push(MethodEntry {
                    method: m.clone(),
                    target: target.clone(),
                    label: label.to_string(),
                    path: path.to_string(),
                });
            }
        }
        Ok(())
    }

    fn entry_for(&mut self, pattern: &str, label: &str) -> Result<usize, String> {
        if let Some(i) = self.entries.iter().position(|e| e.pattern == pattern) {
            return Ok(i);
        }
        let index = self.entries.len();
        self.paths.insert(pattern, index).map_err(|e| match e {
            matchit::InsertError::Conflict { with } => {
                let other = self
                    .entries
                    .iter()
                    .find(|e| e.pattern == with)
                    .and_then(|e| e.methods.first())
                    .map_or(with.clone(), |m| m.label.clone());
                format!(
                    "{label}: overlaps {other}: both match the same paths; rename a parameter or make one path more specific"
                )
            }
            other => format!("{label}: invalid path ({other}); use `{{name}}` for parameters and a trailing `/*` for a prefix"),
        })?;
        self.entries.push(PathEntry {
            pattern: pattern.to_string(),
            methods: Vec::new(),
        });
        Ok(index)
    }

    pub fn lookup<'a>(&'a self, method: &Method, path: &str) -> Match<'a, T> {
        let Ok(found) = self.paths.at(path) else {
            return Match::NotFound;
        };
        let entry = &self.entries[*found.value];
        let pick = |want: &Method| {
            entry
                .methods
                .iter()
                .find(|e| e.method.as_ref().is_none_or(|m| m == want))
        };
        // HEAD is GET without a body: a GET route answers it unless HEAD is routed itself.
        let chosen = pick(method).or_else(|| {
            (method == Method::HEAD)
                .then(|| pick(&Method::GET))
                .flatten()
        });
        match chosen {
            Some(MethodEntry { target, path, .. }) => Match::Found {
                target,
                pattern: path.as_str(),
                params: found
                    .params
                    .iter()
                    .filter(|(k, _)| *k != PREFIX_REST)
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
            None => {
                let mut allow: Vec<&str> = entry
                    .methods
                    .iter()
                    .filter_map(|e| e.method.as_ref().map(Method::as_str))
                    .collect();
                if allow.contains(&"GET") && !allow.contains(&"HEAD") {
                    allow.push("HEAD");
                }
                Match::MethodNotAllowed {
                    allow: allow.join(", "),
                }
            }
        }
    }
}

/// Name of the catch-all parameter a prefix route uses; never shown to guests.
const PREFIX_REST: &str = "wasmgate_rest";

/// A prefix `/api/*` matches `/api` itself, `/api/` and everything below it (matchit's
/// catch-all needs at least one character, so `/api/` is a pattern of its own).
fn matchit_patterns(path: &str) -> Vec<String> {
    match path.strip_suffix("/*") {
        Some("") => vec!["/".into(), format!("/{{*{PREFIX_REST}}}")],
        Some(prefix) => vec![
            prefix.into(),
            format!("{prefix}/"),
            format!("{prefix}/{{*{PREFIX_REST}}}"),
        ],
        None => vec![path.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(
        routes: &[(&str, &[Method], &'static str)],
    ) -> Result<RouteTable<&'static str>, String> {
        let mut t = RouteTable::default();
        for (i, (p, m, target)) in routes.iter().enumerate() {
            t.add(p, m, *target, &format!("routes[{i}]"))?;
        }
        Ok(t)
    }

    #[test]
    fn matches_params_methods_and_prefixes() {
        let t = table(&[
            ("/users/{id}", &[Method::GET], "get-user"),
            ("/users/{id}", &[Method::DELETE], "delete-user"),
            ("/users/me", &[], "me"),
            ("/static/*", &[Method::GET], "static"),
        ])
        .expect("valid table");
        assert_eq!(
            t.lookup(&Method::GET, "/users/42"),
            Match::Found {
                target: &"get-user",
                pattern: "/users/{id}",
                params: vec![("id".into(), "42".into())]
            }
        );
        assert!(matches!(
            t.lookup(&Method::DELETE, "/users/42"),
            Match::Found {
                target: &"delete-user",
                ..
            }
        ));
        assert!(matches!(
            t.lookup(&Method::POST, "/users/me"),
            Match::Found { target: &"me", .. }
        ));
        assert!(matches!(
            t.lookup(&Method::HEAD, "/users/7"),
            Match::Found {
                target: &"get-user",
                ..
            }
        ));
        assert!(matches!(
            t.lookup(&Method::GET, "/static"),
            Match::Found {
                target: &"static",
                ..
            }
        ));
        assert!(
            matches!(t.lookup(&Method::GET, "/static/a/b.css"), Match::Found { target: &"static", params, .. } if params.is_empty())
        );
        // The prefix with its trailing slash, and the route as written (not matchit's form).
        assert_eq!(
            t.lookup(&Method::GET, "/static/"),
            Match::Found {
                target: &"static",
                pattern: "/static/*",
                params: vec![]
            }
        );
        assert_eq!(t.lookup(&Method::GET, "/staticx"), Match::NotFound);
        assert_eq!(
            t.lookup(&Method::PUT, "/users/42"),
            Match::MethodNotAllowed {
                allow: "GET, DELETE, HEAD".into()
            }
        );
        assert_eq!(t.lookup(&Method::GET, "/nope"), Match::NotFound);
        assert_eq!(t.lookup(&Method::GET, "/users/42/x"), Match::NotFound);
    }

    #[test]
    fn refuses_duplicate_route_naming_both() {
        let err = table(&[
            ("/a", &[Method::GET, Method::POST], "x"),
            ("/a", &[Method::POST], "y"),
        ])
        .expect_err("duplicate");
        assert!(
            err.contains("routes[1]") && err.contains("routes[0]") && err.contains("duplicate"),
            "{err}"
        );

        let err = table(&[("/a", &[], "x"), ("/a", &[Method::GET], "y")])
            .expect_err("any-method duplicate");
        assert!(err.contains("duplicate"), "{err}");
    }

    #[test]
    fn refuses_overlapping_route_naming_both() {
        let err = table(&[
            ("/users/{id}", &[Method::GET], "x"),
            ("/users/{name}", &[Method::POST], "y"),
        ])
        .expect_err("overlap");
        assert!(
            err.contains("routes[1]") && err.contains("overlaps routes[0]"),
            "{err}"
        );
    }
}
