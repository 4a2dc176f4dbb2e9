//! A client of the admin API, for the `wasmgate deploy|versions|traffic|promote|rollback|history|
//! rollout` commands: every call is one request (two where a change needs the live generation first), and
//! every refusal comes back with the API's own words.

use serde_json::{Value, json};

/// Why a call did not succeed. The binary maps these to exit codes scripts can rely on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API refused (4xx): invalid input, a stale generation, not found, no token.
    #[error("{status}: {detail}")]
    Refused { status: u16, detail: String },
    /// The API could not be reached, or failed (5xx).
    #[error("{0}")]
    Unavailable(String),
}

pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

type Result<T> = std::result::Result<T, ClientError>;

impl AdminClient {
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// Also trusts the CA in `ca_pem` (for an admin listener whose certificate a private CA
    /// signed).
    pub fn trusting(self, ca_pem: &[u8]) -> Result<Self> {
        let ca = reqwest::Certificate::from_pem(ca_pem)
            .map_err(|e| ClientError::Unavailable(format!("not a PEM certificate: {e}")))?;
        let http = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .map_err(|e| ClientError::Unavailable(e.to_string()))?;
        Ok(Self { http, ..self })
    }

    fn url(&self, function: &str, path: &str) -> String {
        format!("{}/admin/v1/functions/{function}/{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<(Value, Option<String>)> {
        let resp = req
            .bearer_auth(&self.token)
            .header("x-wasmgate-actor", actor())
            .send()
            .await
            .map_err(|e| {
                // reqwest's own message stops at "error sending request"; the cause (refused,
                // an untrusted certificate) is in its sources.
                let mut why = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    why.push_str(&format!(": {s}"));
                    source = s.source();
                }
                ClientError::Unavailable(format!(
                    "cannot reach the admin API at {}: {why}",
                    self.base
                ))
            })?;
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        match status {
            200..=299 => Ok((body, etag)),
            400..=499 => Err(ClientError::Refused {
                status,
                detail: body["detail"].as_str().unwrap_or("refused").to_string(),
            }),
            _ => Err(ClientError::Unavailable(format!(
                "the admin API failed ({status}): {}",
                body["detail"].as_str().unwrap_or("no detail")
            ))),
        }
    }

    /// Uploads a module as version `label`, with the settings it changes of its function's
    /// (`("timeout", "5s")`, `("capabilities", "db,cache")`...).
    pub async fn upload(
        &self,
        function: &str,
        label: &str,
        settings: &[(&str, String)],
        bytes: Vec<u8>,
    ) -> Result<Value> {
        let mut query = vec![("label", label.to_string())];
        query.extend(settings.iter().cloned());
        let req = self
            .http
            .post(self.url(function, "versions"))
            .query(&query)
            .body(bytes);
        Ok(self.send(req).await?.0)
    }

    pub async fn versions(&self, function: &str) -> Result<Value> {
        Ok(self
            .send(self.http.get(self.url(function, "versions")))
            .await?
            .0)
    }

    /// The live deployment and its generation, or `None` when the registry has none.
    pub async fn deployment(&self, function: &str) -> Result<Option<(Value, i64)>> {
        match self
            .send(self.http.get(self.url(function, "deployment")))
            .await
        {
            Ok((body, _)) => {
                let generation = body["generation"].as_i64().unwrap_or(0);
                Ok(Some((body, generation)))
            }
            Err(ClientError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets the split, based on the live generation (read first).
    pub async fn traffic(
        &self,
        function: &str,
        weights: &[(String, u32)],
        sticky: Option<&str>,
        reason: &str,
    ) -> Result<Value> {
        let live = self.deployment(function).await?;
        let mut req = self.http.put(self.url(function, "deployment")).json(&json!({
            "versions": weights.iter().map(|(l, w)| json!({"label": l, "weight": w})).collect::<Vec<_>>(),
            "sticky": sticky,
            "reason": reason,
        }));
        if let Some((_, generation)) = live {
            req = req.header("if-match", format!("\"{generation}\""));
        }
        Ok(self.send(req).await?.0)
    }

    pub async fn rollback(&self, function: &str) -> Result<Value> {
        Ok(self
            .send(self.http.post(self.url(function, "rollback")))
            .await?
            .0)
    }

    /// Starts a rollout (`{"version", "steps", "interval", "gates", "reason"}`).
    pub async fn start_rollout(&self, function: &str, plan: &Value) -> Result<Value> {
        let req = self.http.post(self.url(function, "rollout")).json(plan);
        Ok(self.send(req).await?.0)
    }

    /// The running rollout, or the last one.
    pub async fn rollout(&self, function: &str) -> Result<Value> {
        Ok(self
            .send(self.http.get(self.url(function, "rollout")))
            .await?
            .0)
    }

    pub async fn abort_rollout(&self, function: &str) -> Result<Value> {
        Ok(self
            .send(self.http.delete(self.url(function, "rollout")))
            .await?
            .0)
    }

    /// Copies `percent` of the function's requests to version `label` (`{"version", "percent",
    /// "reason"}`).
    pub async fn start_shadow(&self, function: &str, shadow: &Value) -> Result<Value> {
        let req = self.http.put(self.url(function, "shadow")).json(shadow);
        Ok(self.send(req).await?.0)
    }

    /// The shadow and its comparisons per route.
    pub async fn shadow(&self, function: &str) -> Result<Value> {
        Ok(self
            .send(self.http.get(self.url(function, "shadow")))
            .await?
            .0)
    }

    /// Stops the shadow; answers its last comparisons.
    pub async fn stop_shadow(&self, function: &str) -> Result<Value> {
        Ok(self
            .send(self.http.delete(self.url(function, "shadow")))
            .await?
            .0)
    }

    /// A subscription's dead letters; `action`: `None` lists them, `Some(("show", id))`,
    /// `Some(("replay", id))` (an empty id replays every dead one), `Some(("discard", id))`.
    pub async fn dead_letters(
        &self,
        subscription: &str,
        action: Option<(&str, &str)>,
    ) -> Result<Value> {
        let base = format!(
            "{}/admin/v1/subscriptions/{subscription}/dead-letters",
            self.base
        );
        let req = match action {
            None => self.http.get(base),
            Some(("show", id)) => self.http.get(format!("{base}/{id}")),
            Some(("replay", "")) => self.http.post(format!("{base}/replay")),
            Some((verb, id)) => self.http.post(format!("{base}/{id}/{verb}")),
        };
        Ok(self.send(req).await?.0)
    }

    /// Approves what version `label` may do beyond the live one.
    pub async fn approve(&self, function: &str, label: &str) -> Result<Value> {
        let req = self
            .http
            .post(self.url(function, &format!("versions/{label}/approve")));
        Ok(self.send(req).await?.0)
    }

    pub async fn history(&self, function: &str) -> Result<Value> {
        Ok(self
            .send(self.http.get(self.url(function, "history")))
            .await?
            .0)
    }
}

/// Who makes the change, for the history: the operator's login name when there is one.
fn actor() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty() && u.len() <= 64 && u.is_ascii())
        .unwrap_or_else(|| "cli".into())
}

/// The split after adding `label` at `weight`: the live versions keep their proportions in what
/// is left, rounded so the total is 100 (the remainder goes to the heaviest).
pub fn with_canary(live: &Value, label: &str, weight: u32) -> Vec<(String, u32)> {
    let current: Vec<(String, u32)> = live["versions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| {
                    Some((
                        v["label"].as_str()?.to_string(),
                        u32::try_from(v["weight"].as_u64()?).ok()?,
                    ))
                })
                .filter(|(l, _)| l != label)
                .collect()
        })
        .unwrap_or_default();
    let left = 100 - weight.min(100);
    let total: u32 = current.iter().map(|(_, w)| w).sum();
    let mut split: Vec<(String, u32)> = current
        .iter()
        .map(|(l, w)| (l.clone(), (w * left).checked_div(total).unwrap_or(0)))
        .collect();
    let assigned: u32 = split.iter().map(|(_, w)| w).sum();
    if let Some(heaviest) = split.iter_mut().max_by_key(|(_, w)| *w) {
        heaviest.1 += left - assigned;
    }
    split.retain(|(_, w)| *w > 0);
    split.push((label.to_string(), weight.min(100)));
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_canary_takes_its_share_and_the_rest_keep_their_proportions() {
        let live = json!({"versions": [{"label": "v1", "weight": 100}]});
        assert_eq!(
            with_canary(&live, "v2", 10),
            [("v1".into(), 90), ("v2".into(), 10)]
        );
        let live =
            json!({"versions": [{"label": "v1", "weight": 90}, {"label": "v2", "weight": 10}]});
        assert_eq!(
            with_canary(&live, "v2", 50),
            [("v1".into(), 50), ("v2".into(), 50)]
        );
        let live =
            json!({"versions": [{"label": "a", "weight": 50}, {"label": "b", "weight": 50}]});
        let split = with_canary(&live, "c", 33);
        assert_eq!(split.iter().map(|(_, w)| w).sum::<u32>(), 100, "{split:?}");
        assert_eq!(with_canary(&live, "c", 100), [("c".into(), 100)]);
    }
}
