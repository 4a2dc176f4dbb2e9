//! The admin API: versions and traffic, on a listener of its own (never the public port),
//! behind a bearer token. JSON in and out, problem+json errors.
//!
//! `GET /admin/v1/deployments` lists every function's live deployment. Routes under
//! `/admin/v1/functions/{function}`:
//! - `POST versions?label=v2`: upload a component (the body, at most [`MAX_MODULE`] bytes) as a
//!   new version; `timeout`, `memory`, `max_body`, `instance_reuse` and `capabilities` in the
//!   query change its function's manifest settings for this version. It is received into a
//!   temporary file as it arrives, then compiled and checked against the function's grants off
//!   the request path, one compile at a time; invalid wasm, a core module, the wrong world or an
//!   ungranted import is a 400 naming the reason. The module is stored content-addressed.
//!   A version that imports a capability the live version does not, is granted more, or
//!   loosens a limit (timeout, memory, body size, instance reuse) is stored with that
//!   difference (`widens`) and takes no traffic until approved (`?approve=true` at upload, or
//!   `POST versions/{label}/approve`); one that only narrows needs nothing.
//! - `GET versions`: the function's versions.
//! - `GET deployment`: the live split, its generation as the `ETag`.
//! - `PUT deployment`: a new split (`{"versions": [{"label", "weight"}], "sticky", "reason"}`),
//!   based on the generation in `If-Match` (none for the first); a stale one is 412.
//! - `POST rollback`: the previous deployment, as a new generation.
//! - `GET history`: every change, newest first.
//! - `GET summary?window=300`: per version, every process's requests, failures, refusals,
//!   success rate, p50 and p99 over the window (figures reach the registry once a second).
//! - `POST|GET|DELETE rollout`: start, follow and abort a progressive rollout (`rollouts`).
//! - `PUT|GET|DELETE shadow`: copy a share of requests to a version with its side effects held
//!   back, and compare its answers with the live ones (`shadows`).
//! - `POST preview-tokens`: a token (an hour) that lets requests pick any deployed version with
//!   `x-wasmgate-preview: <label>`.
//!
//! Under `/admin/v1/subscriptions/{subscription}`: `dead-letters` (list, show, replay,
//! discard: `dead_letters`).
//!
//! Every change goes through the deployer's reload, the same call SIGHUP makes, and is served
//! before the response returns.

pub mod client;
mod dead_letters;
mod rollouts;
mod shadows;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::deploy::{Deployer, Surface};
use crate::registry::{RegistryError, Spec, VersionRow, VersionSettings, Weighted};

/// Largest component accepted.
pub const MAX_MODULE: usize = 64 * 1024 * 1024;
/// Compiles at once: cranelift takes a core each, and serving must keep the rest.
const COMPILES: usize = 1;
/// Uploads received at once (each into a temporary file of up to [`MAX_MODULE`] bytes).
const RECEIVING: usize = 4;

struct Admin {
    deployer: Arc<Deployer>,
    token: [u8; 32],
    compiles: Semaphore,
    receiving: Semaphore,
}

/// An admin error as problem+json.
struct Failure(StatusCode, &'static str, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let Failure(status, slug, detail) = self;
        let body = serde_json::json!({
            "type": format!("{}{slug}", crate::problem::TYPE_BASE),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": detail,
        });
        let mut resp = (status, axum::Json(body)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"wasmgate-admin\""),
            );
        }
        if matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::PAYLOAD_TOO_LARGE
        ) {
            // Refused before its body was read: the connection cannot carry another request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        let detail = e.to_string();
        match e {
            RegistryError::Invalid(_) => Failure(StatusCode::BAD_REQUEST, "invalid", detail),
            RegistryError::NotFound(_) => Failure(StatusCode::NOT_FOUND, "not-found", detail),
            RegistryError::Exists(_) => Failure(StatusCode::CONFLICT, "exists", detail),
            RegistryError::Refused(_) => Failure(StatusCode::CONFLICT, "conflict", detail),
            RegistryError::Stale { .. } => {
                Failure(StatusCode::PRECONDITION_FAILED, "stale-generation", detail)
            }
            RegistryError::Db(_) | RegistryError::Corrupt(_) => {
                tracing::error!(error = %detail, "registry call failed");
                Failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "registry-unavailable",
                    "the registry cannot be reached; retry".into(),
                )
            }
        }
    }
}

type Answer = Result<Response, Failure>;

/// The admin routes, each behind the token.
pub fn router(deployer: Arc<Deployer>, token: &str) -> Router {
    let admin = Arc::new(Admin {
        deployer,
        token: Sha256::digest(token.as_bytes()).into(),
        compiles: Semaphore::new(COMPILES),
        receiving: Semaphore::new(RECEIVING),
    });
    Router::new()
        .route("/admin/v1/deployments", get(all_deployments))
        .route(
            "/admin/v1/functions/{function}/versions",
            get(versions).post(upload),
        )
        .route(
            "/admin/v1/functions/{function}/deployment",
            get(deployment).put(deploy),
        )
        .route("/admin/v1/functions/{function}/rollback", post(rollback))
        .route("/admin/v1/functions/{function}/history", get(history))
        .route(
            "/admin/v1/functions/{function}/versions/{label}/approve",
            post(approve),
        )
        .route(
            "/admin/v1/functions/{function}/rollout",
            get(rollouts::status)
                .post(rollouts::start)
                .delete(rollouts::abort),
        )
        .route(
            "/admin/v1/functions/{function}/shadow",
            get(shadows::status)
                .put(shadows::start)
                .delete(shadows::stop),
        )
        .route("/admin/v1/functions/{function}/summary", get(summary))
        .route(
            "/admin/v1/subscriptions/{subscription}/dead-letters",
            get(dead_letters::list),
        )
        .route(
            "/admin/v1/subscriptions/{subscription}/dead-letters/replay",
            post(dead_letters::replay_all),
        )
        .route(
            "/admin/v1/subscriptions/{subscription}/dead-letters/{event}",
            get(dead_letters::show),
        )
        .route(
            "/admin/v1/subscriptions/{subscription}/dead-letters/{event}/replay",
            post(dead_letters::replay_one),
        )
        .route(
            "/admin/v1/subscriptions/{subscription}/dead-letters/{event}/discard",
            post(dead_letters::discard),
        )
        .route(
            "/admin/v1/functions/{function}/preview-tokens",
            post(preview_token),
        )
        .layer(middleware::from_fn_with_state(admin.clone(), authorize))
        .with_state(admin)
}

/// Compares digests of the presented and the configured token (same length, whatever was sent).
async fn authorize(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
    if presented != Some(admin.token) {
        return Failure(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin API needs its bearer token".into(),
        )
        .into_response();
    }
    next.run(req).await
}

fn actor(headers: &HeaderMap) -> String {
    headers
        .get("x-wasmgate-actor")
        .and_then(|v| v.to_str().ok())
        .filter(|a| !a.is_empty() && a.len() <= 128)
        .unwrap_or("admin")
        .to_string()
}

/// The manifest as it is on disk now, or 503.
fn manifest(admin: &Admin) -> Result<crate::config::Manifest, Failure> {
    admin.deployer.manifest().map_err(|e| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "manifest-unreadable",
            e.to_string(),
        )
    })
}

/// The function's manifest entry, or 404.
fn function_config(
    admin: &Admin,
    function: &str,
) -> Result<crate::config::FunctionConfig, Failure> {
    manifest(admin)?
        .functions
        .get(function)
        .cloned()
        .ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("the manifest defines no function `{function}`"),
            )
        })
}

/// `?label=v2`, and what the version changes of its function's manifest settings:
/// `timeout`, `memory`, `max_body`, `instance_reuse`, `capabilities` (comma-separated).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    label: String,
    timeout: Option<String>,
    memory: Option<String>,
    max_body: Option<String>,
    instance_reuse: Option<u32>,
    capabilities: Option<String>,
    /// Approve at once what it widens (the operator has seen the difference).
    #[serde(default)]
    approve: bool,
}

impl UploadQuery {
    fn settings(&self) -> VersionSettings {
        VersionSettings {
            capabilities: self.capabilities.as_ref().map(|c| {
                c.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect()
            }),
            timeout: self.timeout.clone(),
            memory: self.memory.clone(),
            max_body: self.max_body.clone(),
            instance_reuse: self.instance_reuse,
        }
    }
}

async fn upload(
    State(admin): State<Arc<Admin>>,
    Path(function): Path<String>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    // The body first, even for an unknown function: an answer before it would leave the rest of
    // the upload in the connection.
    let spooled = receive(&admin, body).await?;
    let cfg = function_config(&admin, &function)?;
    let settings = q.settings();
    let (limits, grants) =
        crate::loader::effective(&cfg, &settings, admin.deployer.settings().max_memory)
            .map_err(|e| Failure(StatusCode::BAD_REQUEST, "invalid", e))?;
    // Compile and check it as it would run, off the request path, one at a time. The permit
    // is held until the module is stored: it also bounds the modules held whole in memory.
    let permit = admin.compiles.acquire().await.map_err(|_| stopping())?;
    let (deployer, name) = (admin.deployer.clone(), function.clone());
    let grants_now = grants.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let wasm = spooled.read().map_err(|e| {
            tracing::error!(error = %e, "reading a received upload back");
            Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the upload could not be read back".into(),
            )
        })?;
        let platform = deployer.platform();
        platform
            .runtime
            .load_bytes(
                &name,
                std::path::Path::new("the uploaded module"),
                &wasm,
                limits,
                &grants,
                platform.backends.configure(&name),
            )
            .map(|f| (wasm, f.imports().to_vec()))
            .map_err(|e| Failure(StatusCode::BAD_REQUEST, "invalid-module", e.to_string()))
    })
    .await;
    let (bytes, imports) = match checked {
        Ok(checked) => checked?,
        Err(e) => {
            tracing::error!(error = %e, "module check panicked");
            return Err(Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the module could not be checked".into(),
            ));
        }
    };
    let registry = admin.deployer.registry();
    let surface = Surface::new(&imports, &grants_now, &limits);
    let widens = surface.widens(&live_surface(&admin, &function, &cfg).await?);
    let sha256 = registry.put_module(&bytes).await?;
    drop((bytes, permit));
    let who = actor(&headers);
    let row = VersionRow {
        function: function.clone(),
        label: q.label.clone(),
        sha256: sha256.clone(),
        settings: serde_json::to_string(&settings).expect("settings serialize"),
        created_by: who.clone(),
        created_at: crate::auth::now_ms(),
        surface: serde_json::to_string(&surface).expect("a surface serializes"),
        approved_by: if q.approve && !widens.is_empty() {
            who
        } else {
            String::new()
        },
        widens,
    };
    registry.create_version(&row).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({
            "function": function,
            "label": q.label,
            "sha256": sha256,
            "widens": row.widens,
            "approved_by": row.approved_by,
            "held": row.held(),
        })),
    )
        .into_response())
}

/// An upload received into an unnamed temporary file (gone when dropped).
struct Spooled {
    file: std::fs::File,
    len: usize,
}

impl Spooled {
    /// The whole module, for the compiler and the registry (blocking).
    fn read(mut self) -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek};
        self.file.rewind()?;
        let mut wasm = Vec::with_capacity(self.len);
        self.file.read_to_end(&mut wasm)?;
        Ok(wasm)
    }
}

/// Receives an upload on disk as it arrives: a slow or stalled upload holds a file, not memory,
/// so memory stays bounded by the one module compiled at a time however many arrive at once.
/// At most [`RECEIVING`] are read at once; the others wait, their bytes held back by TCP.
async fn receive(admin: &Admin, body: Body) -> Result<Spooled, Failure> {
    use tokio::io::AsyncWriteExt;
    let _receiving = admin.receiving.acquire().await.map_err(|_| stopping())?;
    let disk = |e: std::io::Error| {
        tracing::error!(error = %e, "writing an upload to a temporary file");
        Failure(
            StatusCode::INSUFFICIENT_STORAGE,
            "no-space",
            "the upload could not be kept on disk".into(),
        )
    };
    let mut file = tokio::fs::File::from_std(tempfile::tempfile().map_err(disk)?);
    let mut len = 0;
    let mut body = body.into_data_stream();
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        let chunk = chunk.map_err(|e| {
            Failure(
                StatusCode::BAD_REQUEST,
                "upload-cut",
                format!("the upload ended early: {e}"),
            )
        })?;
        len += chunk.len();
        if len > MAX_MODULE {
            return Err(Failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                "module-too-large",
                format!("a module may be at most {MAX_MODULE} bytes"),
            ));
        }
        file.write_all(&chunk).await.map_err(disk)?;
    }
    file.flush().await.map_err(disk)?;
    Ok(Spooled {
        file: file.into_std().await,
        len,
    })
}

fn stopping() -> Failure {
    Failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting-down",
        "the server is stopping".into(),
    )
}

/// What the version serving most of `function`'s traffic may do: the registry's record of it,
/// or, while the manifest's `wasm` serves, the manifest's grants and limits (it may import at
/// most what it is granted).
async fn live_surface(
    admin: &Admin,
    function: &str,
    cfg: &crate::config::FunctionConfig,
) -> Result<Surface, Failure> {
    let registry = admin.deployer.registry();
    if let Some(live) = registry.deployment(function).await? {
        let heaviest = live.spec.versions.iter().max_by_key(|w| w.weight);
        let versions = registry.versions(function).await?;
        if let Some(v) = heaviest.and_then(|w| versions.iter().find(|v| v.label == w.label)) {
            return Ok(serde_json::from_str(&v.surface).unwrap_or_default());
        }
    }
    let (limits, grants) = crate::loader::effective(
        cfg,
        &VersionSettings::default(),
        admin.deployer.settings().max_memory,
    )
    .map_err(|e| Failure(StatusCode::BAD_REQUEST, "invalid", e))?;
    let names: Vec<&str> = grants.iter().map(|c| c.name()).collect();
    Ok(Surface::new(&names, &grants, &limits))
}

/// `POST versions/{label}/approve`: lets a version that widens what its function may do take
/// traffic.
async fn approve(
    State(admin): State<Arc<Admin>>,
    Path((function, label)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    function_config(&admin, &function)?;
    let row = admin
        .deployer
        .registry()
        .approve_version(&function, &label, &actor(&headers))
        .await?;
    Ok(axum::Json(serde_json::json!({
        "function": function,
        "label": label,
        "widens": row.widens,
        "approved_by": row.approved_by,
        "held": row.held(),
    }))
    .into_response())
}

async fn versions(State(admin): State<Arc<Admin>>, Path(function): Path<String>) -> Answer {
    let rows = admin.deployer.registry().versions(&function).await?;
    let list: Vec<_> = rows
        .iter()
        .map(|v| {
            let settings: serde_json::Value =
                serde_json::from_str(&v.settings).unwrap_or_default();
            serde_json::json!({"label": v.label, "sha256": v.sha256, "settings": settings, "created_by": v.created_by, "created_at": v.created_at, "widens": v.widens, "approved_by": v.approved_by, "held": v.held()})
        })
        .collect();
    Ok(axum::Json(serde_json::json!({"function": function, "versions": list})).into_response())
}

fn deployment_response(function: &str, generation: i64, spec: &Spec) -> Response {
    let mut resp = axum::Json(serde_json::json!({
        "function": function,
        "generation": generation,
        "versions": spec.versions,
        "sticky": spec.sticky,
        "shadow": spec.shadow,
    }))
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{generation}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// Every function's live deployment in the registry.
async fn all_deployments(State(admin): State<Arc<Admin>>) -> Answer {
    let list: Vec<_> = admin
        .deployer
        .registry()
        .deployments(None)
        .await?
        .into_iter()
        .map(|d| {
            serde_json::json!({
                "function": d.function,
                "generation": d.generation,
                "versions": d.spec.versions,
                "sticky": d.spec.sticky,
                "shadow": d.spec.shadow,
                "updated_by": d.updated_by,
                "updated_at": d.updated_at,
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({"deployments": list})).into_response())
}

async fn deployment(State(admin): State<Arc<Admin>>, Path(function): Path<String>) -> Answer {
    match admin.deployer.registry().deployment(&function).await? {
        Some(d) => Ok(deployment_response(&function, d.generation, &d.spec)),
        None => Err(Failure(
            StatusCode::NOT_FOUND,
            "not-found",
            format!(
                "`{function}` has no deployment in the registry; it serves the manifest's `wasm`"
            ),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployRequest {
    versions: Vec<Weighted>,
    sticky: Option<String>,
    reason: Option<String>,
}

/// A request's JSON body, or a 400 saying what is wrong with it.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| {
        Failure(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("invalid JSON: {e}"),
        )
    })
}

/// The generation `If-Match` names (`"3"` or `3`); none without the header.
fn expected_generation(headers: &HeaderMap) -> Result<Option<i64>, Failure> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .map(|s| s.trim().trim_start_matches("W/").trim_matches('"'))
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            Failure(
                StatusCode::BAD_REQUEST,
                "invalid",
                "If-Match must name a generation, as the deployment's ETag does".into(),
            )
        })
}

/// Applies the registry's new state; if it cannot be served, restores the previous one and says
/// why.
async fn apply(admin: &Admin, function: &str, actor: &str) -> Result<(), Failure> {
    if let Err(e) = admin.deployer.reload().await {
        let _ = admin
            .deployer
            .registry()
            .rollback(
                function,
                actor,
                "automatic: the change could not be applied",
            )
            .await;
        let _ = admin.deployer.reload().await;
        return Err(Failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-applied",
            format!("the change was undone: {e}"),
        ));
    }
    Ok(())
}

async fn deploy(
    State(admin): State<Arc<Admin>>,
    Path(function): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Answer {
    function_config(&admin, &function)?;
    let req: DeployRequest = json_body(&body)?;
    let expected = expected_generation(&headers)?;
    let registry = admin.deployer.registry();
    let mut reason = req.reason.unwrap_or_else(|| "traffic change".into());
    // A shadow stays while its version stays in the split (a stale change is refused anyway).
    let shadow = match registry
        .deployment(&function)
        .await?
        .filter(|d| Some(d.generation) == expected)
        .and_then(|d| d.spec.shadow)
    {
        Some(s) if req.versions.iter().any(|w| w.label == s.label) => Some(s),
        Some(s) => {
            reason.push_str(&format!("; the shadow on {} ended with it", s.label));
            None
        }
        None => None,
    };
    let spec = Spec {
        versions: req.versions,
        sticky: req.sticky,
        shadow,
    };
    let who = actor(&headers);
    let generation = registry
        .set_deployment(&function, expected, &spec, &who, &reason)
        .await?;
    rollouts::superseded(&admin, &function, generation).await;
    apply(&admin, &function, &who).await?;
    admin.deployer.announce(&function, generation).await;
    Ok(deployment_response(&function, generation, &spec))
}

async fn rollback(
    State(admin): State<Arc<Admin>>,
    Path(function): Path<String>,
    headers: HeaderMap,
) -> Answer {
    let who = actor(&headers);
    let registry = admin.deployer.registry();
    let generation = registry.rollback(&function, &who, "rollback").await?;
    rollouts::superseded(&admin, &function, generation).await;
    apply(&admin, &function, &who).await?;
    admin.deployer.announce(&function, generation).await;
    let spec = registry
        .deployment(&function)
        .await?
        .map(|d| d.spec)
        .unwrap_or(Spec {
            versions: Vec::new(),
            sticky: None,
            shadow: None,
        });
    Ok(deployment_response(&function, generation, &spec))
}

/// The function's live deployment in the registry, or a 409 saying there is none yet.
async fn live_deployment(
    admin: &Admin,
    function: &str,
) -> Result<crate::registry::DeploymentRow, Failure> {
    admin
        .deployer
        .registry()
        .deployment(function)
        .await?
        .ok_or_else(|| {
            Failure(
                StatusCode::CONFLICT,
                "no-deployment",
                format!(
                    "`{function}` has no deployment in the registry yet; deploy a version first"
                ),
            )
        })
}

/// `?window=<seconds>`: how far back the summary looks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SummaryQuery {
    window: Option<u64>,
}

/// Longest summary window: the registry keeps figures a day.
const MAX_SUMMARY_WINDOW: u64 = 24 * 3600;

/// Per version, over the last `window` seconds (default 300) and every process: requests the
/// version answered, its failures (5xx, traps, timeouts), the host's refusals (auth, limits,
/// sheds: not counted against it), success rate, p50 and p99 (latency bucket bounds, within 25%).
async fn summary(
    State(admin): State<Arc<Admin>>,
    Path(function): Path<String>,
    Query(q): Query<SummaryQuery>,
) -> Answer {
    function_config(&admin, &function)?;
    let window = q.window.unwrap_or(300).clamp(1, MAX_SUMMARY_WINDOW);
    let since = crate::auth::now_ms() / 1000 - i64::try_from(window).unwrap_or(i64::MAX);
    let registry = admin.deployer.registry();
    let sha: std::collections::BTreeMap<String, String> = registry
        .versions(&function)
        .await?
        .into_iter()
        .map(|v| (v.label, v.sha256[..12.min(v.sha256.len())].to_string()))
        .collect();
    let versions: Vec<_> = registry
        .figures(&function, since)
        .await?
        .into_iter()
        .map(|(label, f)| {
            serde_json::json!({
                "label": label,
                "version": sha.get(&label),
                "requests": f.requests,
                "failed": f.failed,
                "refused": f.refused,
                "success_percent": f.success_percent(),
                "p50_ms": f.quantile_ms(0.5),
                "p99_ms": f.quantile_ms(0.99),
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({
        "function": function,
        "window_seconds": window,
        "scope": "every process sharing the registry; figures are written once a second",
        "versions": versions,
    }))
    .into_response())
}

/// A token that lets requests pick any deployed version of the function (for an hour).
async fn preview_token(State(admin): State<Arc<Admin>>, Path(function): Path<String>) -> Answer {
    function_config(&admin, &function)?;
    let expires_at = crate::auth::now_ms()
        + i64::try_from(crate::deploy::PREVIEW_TTL.as_millis()).unwrap_or(i64::MAX);
    let token = admin
        .deployer
        .registry()
        .create_preview_token(&function, expires_at)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({
            "function": function,
            "token": token,
            "expires_at": expires_at,
            "use": "send x-wasmgate-preview: <label> and x-wasmgate-preview-token: <token>",
        })),
    )
        .into_response())
}

async fn history(State(admin): State<Arc<Admin>>, Path(function): Path<String>) -> Answer {
    let rows = admin.deployer.registry().history(&function).await?;
    let list: Vec<_> = rows
        .iter()
        .map(|h| {
            serde_json::json!({
                "generation": h.generation,
                "versions": h.spec.versions,
                "sticky": h.spec.sticky,
                "shadow": h.spec.shadow,
                "reason": h.reason,
                "actor": h.actor,
                "at": h.at,
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({"function": function, "history": list})).into_response())
}

/// The admin API's inputs, read and checked as the handlers do before anything is written (for
/// [`crate::fuzzing`]): line 1 an upload's query, line 2 an `If-Match`, the rest a JSON body as
/// a deployment and as a rollout.
#[doc(hidden)]
pub fn fuzz_inputs(data: &[u8], function: &crate::config::FunctionConfig) {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let (query, if_match, body) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if let Ok(uri) = http::Uri::try_from([b"/?", query].concat())
        && let Ok(Query(q)) = Query::<UploadQuery>::try_from_uri(&uri)
    {
        let _ = crate::loader::effective(function, &q.settings(), 4 << 30);
    }
    if let Ok(v) = HeaderValue::from_bytes(if_match) {
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_MATCH, v);
        let _ = expected_generation(&headers);
    }
    if let Ok(req) = json_body::<DeployRequest>(body) {
        if let Some(sticky) = &req.sticky {
            let _ = crate::deploy::StickyKey::parse(sticky);
        }
        let _ = Spec {
            versions: req.versions,
            sticky: req.sticky,
            shadow: None,
        }
        .check();
    }
    rollouts::fuzz_start(body);
}
