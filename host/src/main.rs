//! The `wasmgate` binary: flags, logging, socket, then the library's `run`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use wasmgate::admin::{self, client::AdminClient, client::ClientError};
use wasmgate::deploy::Deployer;
use wasmgate::{loader, server};

#[derive(Parser)]
#[command(
    name = "wasmgate",
    version,
    about = "WebAssembly serverless functions platform"
)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the manifest and serve its routes.
    Up {
        /// The manifest to serve.
        #[arg(
            long,
            short,
            default_value = "wasmgate.toml",
            env = "WASMGATE_MANIFEST"
        )]
        manifest: PathBuf,
        /// Address to listen on; overrides `[server] listen`. Port 0 picks a free port.
        #[arg(long, env = "WASMGATE_LISTEN")]
        listen: Option<SocketAddr>,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Load the manifest and every function, report problems, and exit without serving.
    Check {
        #[arg(long, short, default_value = "wasmgate.toml")]
        manifest: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Grant, revoke and list the roles tokens carry (e.g. `admin`), in the platform database.
    /// A grant reaches a user's tokens at their next login or refresh.
    Roles {
        #[command(subcommand)]
        action: RolesAction,
        #[command(flatten)]
        target: Platform,
    },
    /// Upload a component as a new version of a function and send it traffic (through the
    /// admin API): all of it by default, or `--weight` percent beside the live versions.
    Deploy {
        function: String,
        wasm: PathBuf,
        /// The version's label (default: the first 12 digits of its sha256).
        #[arg(long)]
        label: Option<String>,
        /// Percent of traffic for it; the live versions share the rest in their proportions.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=100))]
        weight: u32,
        /// Why (kept in the history).
        #[arg(long, default_value = "deploy")]
        reason: String,
        /// This version's timeout, instead of its function's ("5s").
        #[arg(long)]
        timeout: Option<String>,
        /// This version's memory cap, instead of its function's ("32MiB").
        #[arg(long)]
        memory: Option<String>,
        /// This version's capabilities, instead of its function's ("db,cache"; "" for none).
        #[arg(long)]
        capabilities: Option<String>,
        /// Approve what it may do beyond the live version (a capability it imports or is
        /// granted, a looser limit). Without it, such a version is held at 0% and the
        /// difference printed.
        #[arg(long)]
        approve: bool,
        #[command(flatten)]
        api: AdminConn,
    },
    /// Approve what a held version may do beyond the live one, so it can take traffic.
    Approve {
        function: String,
        label: String,
        #[command(flatten)]
        api: AdminConn,
    },
    /// List a function's versions.
    Versions {
        function: String,
        #[command(flatten)]
        api: AdminConn,
    },
    /// Split a function's traffic: `wasmgate traffic users v1=90 v2=10 [--sticky header:x-user-id]`.
    Traffic {
        function: String,
        /// `label=percent`, summing to 100.
        #[arg(required = true, value_parser = parse_weight)]
        weights: Vec<(String, u32)>,
        /// Keep each client on one version: `header:<name>`, `cookie:<name>` or `client-ip`.
        #[arg(long)]
        sticky: Option<String>,
        #[arg(long, default_value = "traffic change")]
        reason: String,
        #[command(flatten)]
        api: AdminConn,
    },
    /// Send all of a function's traffic to one version.
    Promote {
        function: String,
        label: String,
        #[command(flatten)]
        api: AdminConn,
    },
    /// Restore a function's previous deployment.
    Rollback {
        function: String,
        #[command(flatten)]
        api: AdminConn,
    },
    /// Move a function's traffic to a version step by step, judged by gates in the host:
    /// `wasmgate rollout users v2 --steps 5,25,50,100 --interval 30s`. Without a version, shows
    /// the running (or last) rollout; `--abort` stops it and sends the traffic back.
    Rollout {
        function: String,
        /// The candidate version's label (omit to see the rollout's state).
        version: Option<String>,
        /// Percent of traffic at each step, ending at 100.
        #[arg(long, value_delimiter = ',', default_value = "5,25,50,100")]
        steps: Vec<u32>,
        /// How long each step runs before it is judged ("30s", "2m").
        #[arg(long, default_value = "30s")]
        interval: String,
        /// Requests a step needs before it is judged; with fewer it holds.
        #[arg(long, default_value_t = 100)]
        min_requests: u64,
        /// Lowest success rate (percent of requests without a 5xx).
        #[arg(long, default_value_t = 99.0)]
        min_success: f64,
        /// Highest p99 latency ("1s", "250ms").
        #[arg(long, default_value = "1s")]
        max_p99: String,
        /// Stop the running rollout; the traffic goes back to the baseline.
        #[arg(long, conflicts_with = "version")]
        abort: bool,
        /// Follow the rollout until it ends (exit 0 when promoted, 1 otherwise).
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: AdminConn,
    },
    /// Run a copy of a share of a function's requests on a version, after the live response,
    /// with its side effects held back, and compare the answers:
    /// `wasmgate shadow users v2 --percent 20`. Without a version, shows the comparisons per
    /// route; `--stop` ends it.
    Shadow {
        function: String,
        /// The version the copies run on (omit to see the comparisons).
        version: Option<String>,
        /// Percent of requests copied (1 to 100).
        #[arg(long, default_value_t = 10)]
        percent: u32,
        /// Stop the shadow (prints its last comparisons).
        #[arg(long, conflicts_with = "version")]
        stop: bool,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: AdminConn,
    },
    /// A subscription's dead letters: listed (`wasmgate dead-letters tally.amounts`), shown
    /// with `--show <event>`, run again with `--replay <event>` or `--replay-all` (through the
    /// inbox: never applied twice), given up with `--discard <event>`.
    DeadLetters {
        subscription: String,
        #[arg(long, conflicts_with_all = ["replay", "replay_all", "discard"])]
        show: Option<String>,
        #[arg(long, conflicts_with_all = ["replay_all", "discard"])]
        replay: Option<String>,
        #[arg(long, conflicts_with = "discard")]
        replay_all: bool,
        #[arg(long)]
        discard: Option<String>,
        #[command(flatten)]
        api: AdminConn,
    },
    /// Every change to a function's deployment, newest first.
    History {
        function: String,
        #[command(flatten)]
        api: AdminConn,
    },
    /// Signing keys of the tokens wasmgate issues.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
        #[command(flatten)]
        target: Platform,
    },
}

/// Which platform database an operator command works on: the manifest's, with the same
/// overrides as `up`.
#[derive(clap::Args)]
struct Platform {
    #[arg(
        long,
        short,
        global = true,
        default_value = "wasmgate.toml",
        env = "WASMGATE_MANIFEST"
    )]
    manifest: PathBuf,
    #[command(flatten)]
    overrides: OverrideArgs,
}

#[derive(Subcommand)]
enum RolesAction {
    /// Gives `subject` (a user id) the role.
    Grant { subject: String, role: String },
    /// Takes the role away (tokens already issued keep it until they expire).
    Revoke { subject: String, role: String },
    /// Lists grants, of one subject or all.
    List { subject: Option<String> },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Adds a new signing key and retires the others: every running replica signs with the new
    /// key within 10 s, and tokens signed by a retired key verify until they expire.
    Rotate,
    /// Lists the keys: id, created, retired.
    List,
}

/// The admin API: on only with a token, and never on the public listener.
#[derive(clap::Args)]
struct AdminArgs {
    /// Where the admin API listens (keep it private: loopback or an internal network).
    #[arg(long, env = "WASMGATE_ADMIN_LISTEN", default_value = "127.0.0.1:8081")]
    admin_listen: SocketAddr,
    /// A file holding the admin API's bearer token (at least 16 characters); or set
    /// WASMGATE_ADMIN_TOKEN. Without a token the admin API is off.
    #[arg(long, env = "WASMGATE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

/// Where the deployment commands find the admin API.
#[derive(clap::Args)]
struct AdminConn {
    #[arg(
        long,
        env = "WASMGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    admin_url: String,
    /// The admin API's bearer token.
    #[arg(long, env = "WASMGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// A CA (PEM) to trust for an `https://` admin URL, beside the usual roots: the CA that
    /// signed `[server] tls`'s certificate, when it is a private one.
    #[arg(long, env = "WASMGATE_ADMIN_CA_FILE")]
    admin_ca_file: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl AdminConn {
    fn client(&self) -> anyhow::Result<AdminClient> {
        let client = AdminClient::new(&self.admin_url, &self.admin_token);
        Ok(match &self.admin_ca_file {
            None => client,
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading --admin-ca-file {}", path.display()))?;
                client
                    .trusting(&pem)
                    .with_context(|| format!("--admin-ca-file {}", path.display()))?
            }
        })
    }

    /// Prints `body` as JSON, or as the table `table` makes of it.
    fn print(&self, body: &serde_json::Value, table: impl FnOnce(&serde_json::Value) -> String) {
        if self.json {
            println!("{body}");
        } else {
            print!("{}", table(body));
        }
    }
}

fn parse_weight(s: &str) -> Result<(String, u32), String> {
    let (label, weight) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not label=percent"))?;
    let weight: u32 = weight
        .parse()
        .map_err(|_| format!("`{weight}` is not a percent"))?;
    Ok((label.to_string(), weight))
}

/// `v1 90%, v2 10%` (and the sticky key).
fn split_line(deployment: &serde_json::Value) -> String {
    let versions: Vec<String> = deployment["versions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| format!("{} {}%", v["label"].as_str().unwrap_or("?"), v["weight"]))
                .collect()
        })
        .unwrap_or_default();
    let sticky = deployment["sticky"]
        .as_str()
        .map(|k| format!(" (sticky by {k})"))
        .unwrap_or_default();
    format!("{}{sticky}", versions.join(", "))
}

fn deployment_table(d: &serde_json::Value) -> String {
    format!(
        "{} generation {}: {}\n",
        d["function"].as_str().unwrap_or("?"),
        d["generation"],
        split_line(d)
    )
}

async fn deployments(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Deploy {
            function,
            wasm,
            label,
            weight,
            reason,
            timeout,
            memory,
            capabilities,
            approve,
            api,
        } => {
            let bytes = std::fs::read(&wasm)
                .with_context(|| format!("failed to read `{}`", wasm.display()))?;
            let label = label.unwrap_or_else(|| {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&bytes))[..12].to_string()
            });
            let client = api.client()?;
            let settings: Vec<(&str, String)> = [
                ("timeout", timeout),
                ("memory", memory),
                ("capabilities", capabilities),
            ]
            .into_iter()
            .chain([("approve", approve.then(|| "true".to_string()))])
            .filter_map(|(k, v)| Some((k, v?)))
            .collect();
            let uploaded = client.upload(&function, &label, &settings, bytes).await?;
            if uploaded["held"] == true {
                return held(&client, &api, &function, &label, &uploaded).await;
            }
            let split = match client.deployment(&function).await? {
                Some((live, _)) => admin::client::with_canary(&live, &label, weight),
                None if weight == 100 => vec![(label.clone(), 100)],
                None => anyhow::bail!(
                    "{function} has no deployment in the registry to share traffic with; deploy a version at 100% first"
                ),
            };
            let deployed = client.traffic(&function, &split, None, &reason).await?;
            api.print(
                &serde_json::json!({"uploaded": uploaded, "deployment": deployed}),
                |_| {
                    format!(
                        "uploaded {function} {label} (sha256 {})\n{}",
                        uploaded["sha256"]
                            .as_str()
                            .map_or("?", |s| &s[..12.min(s.len())]),
                        deployment_table(&deployed)
                    )
                },
            );
        }
        Command::Approve {
            function,
            label,
            api,
        } => {
            let body = api.client()?.approve(&function, &label).await?;
            api.print(&body, |b| {
                format!(
                    "{function} {label} approved by {}: {}\n",
                    b["approved_by"].as_str().unwrap_or("?"),
                    widens(b)
                )
            });
        }
        Command::Versions { function, api } => {
            let body = api.client()?.versions(&function).await?;
            api.print(&body, |b| {
                let mut out = format!("{:<16} {:<14} {:<12} CREATED\n", "LABEL", "SHA256", "BY");
                for v in b["versions"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "{:<16} {:<14} {:<12} {}\n",
                        v["label"].as_str().unwrap_or("?"),
                        v["sha256"].as_str().map_or("?", |s| &s[..12.min(s.len())]),
                        v["created_by"].as_str().unwrap_or("?"),
                        when(&v["created_at"]),
                    ));
                }
                out
            });
        }
        Command::Traffic {
            function,
            weights,
            sticky,
            reason,
            api,
        } => {
            let body = api
                .client()?
                .traffic(&function, &weights, sticky.as_deref(), &reason)
                .await?;
            api.print(&body, deployment_table);
        }
        Command::Promote {
            function,
            label,
            api,
        } => {
            let body = api
                .client()?
                .traffic(
                    &function,
                    &[(label.clone(), 100)],
                    None,
                    &format!("promote {label}"),
                )
                .await?;
            api.print(&body, deployment_table);
        }
        Command::Rollback { function, api } => {
            let body = api.client()?.rollback(&function).await?;
            api.print(&body, deployment_table);
        }
        Command::History { function, api } => {
            let body = api.client()?.history(&function).await?;
            api.print(&body, |b| {
                let mut out = format!(
                    "{:<4} {:<24} {:<12} {:<32} REASON\n",
                    "GEN", "WHEN", "BY", "SPLIT"
                );
                for h in b["history"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "{:<4} {:<24} {:<12} {:<32} {}\n",
                        h["generation"].to_string(),
                        when(&h["at"]),
                        h["actor"].as_str().unwrap_or("?"),
                        split_line(h),
                        h["reason"].as_str().unwrap_or(""),
                    ));
                }
                out
            });
        }
        Command::Rollout {
            function,
            version,
            steps,
            interval,
            min_requests,
            min_success,
            max_p99,
            abort,
            watch,
            reason,
            api,
        } => {
            let client = api.client()?;
            let mut body = if abort {
                client.abort_rollout(&function).await?
            } else if let Some(version) = version {
                let max_p99 = wasmgate::config::parse_duration(&max_p99)
                    .map_err(|e| anyhow::anyhow!("--max-p99: {e}"))?;
                let plan = serde_json::json!({
                    "version": version,
                    "steps": steps,
                    "interval": interval,
                    "gates": {
                        "min_requests": min_requests,
                        "min_success_percent": min_success,
                        "max_p99_ms": max_p99.as_secs_f64() * 1000.0,
                    },
                    "reason": reason,
                });
                client.start_rollout(&function, &plan).await?
            } else {
                client.rollout(&function).await?
            };
            api.print(&body, rollout_table);
            if watch {
                let mut last = body["last"].clone();
                while body["state"] == "running" {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    body = client.rollout(&function).await?;
                    if body["last"] != last {
                        last = body["last"].clone();
                        api.print(&body, rollout_table);
                    }
                }
                anyhow::ensure!(
                    body["state"] == "promoted",
                    "the rollout ended {}",
                    body["state"].as_str().unwrap_or("?")
                );
            }
        }
        Command::DeadLetters {
            subscription,
            show,
            replay,
            replay_all,
            discard,
            api,
        } => {
            let client = api.client()?;
            let action = match (&show, &replay, replay_all, &discard) {
                (Some(id), _, _, _) => Some(("show", id.as_str())),
                (_, Some(id), _, _) => Some(("replay", id.as_str())),
                (_, _, true, _) => Some(("replay", "")),
                (_, _, _, Some(id)) => Some(("discard", id.as_str())),
                _ => None,
            };
            let body = client.dead_letters(&subscription, action).await?;
            api.print(&body, dead_letters_table);
        }
        Command::Shadow {
            function,
            version,
            percent,
            stop,
            reason,
            api,
        } => {
            let client = api.client()?;
            let body = if stop {
                client.stop_shadow(&function).await?
            } else if let Some(version) = version {
                let shadow = serde_json::json!({
                    "version": version,
                    "percent": percent,
                    "reason": reason,
                });
                client.start_shadow(&function, &shadow).await?
            } else {
                client.shadow(&function).await?
            };
            api.print(&body, shadow_table);
        }
        _ => unreachable!("only deployment commands come here"),
    }
    Ok(())
}

/// `users rollout 1a2b3c of v2 (from v1): running, step 2 of 4 (25%)`, the last judgement and
/// the step's figures.
fn rollout_table(r: &serde_json::Value) -> String {
    let steps = r["steps"].as_array().map_or(0, Vec::len);
    let mut out = format!(
        "{} rollout {} of {} (from {}): {}, step {} of {steps} ({}%)\n  {}\n",
        r["function"].as_str().unwrap_or("?"),
        r["id"].as_str().unwrap_or("?"),
        r["candidate"].as_str().unwrap_or("?"),
        r["baseline"].as_str().unwrap_or("?"),
        r["state"].as_str().unwrap_or("?"),
        r["step"],
        r["weight"],
        r["last"].as_str().unwrap_or(""),
    );
    for f in r["this_step"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  this step: {}\n",
            f["summary"].as_str().unwrap_or("")
        ));
    }
    out
}

/// One line per dead letter (a list), the letter (`--show`), or what an action did.
fn dead_letters_table(b: &serde_json::Value) -> String {
    let line = |l: &serde_json::Value| {
        format!(
            "{} {} key {} #{} ({} attempts) {}: {}\n",
            l["event_id"].as_str().unwrap_or("?"),
            l["topic"].as_str().unwrap_or("?"),
            l["key"].as_str().unwrap_or("?"),
            l["sequence"],
            l["attempts"],
            l["state"].as_str().unwrap_or("?"),
            l["error"].as_str().unwrap_or(""),
        )
    };
    if let Some(list) = b["dead_letters"].as_array() {
        if list.is_empty() {
            return "no dead letters\n".into();
        }
        return list.iter().map(line).collect();
    }
    if let Some(n) = b["replaying"].as_u64() {
        return format!("{n} dead letter(s) will run again\n");
    }
    let mut out = line(b);
    if let Some(p) = b["payload"].as_str() {
        out.push_str(&format!("  payload: {p}\n"));
    }
    out
}

/// `users shadow on v2 (20% of requests)`, then per route its match rate and mismatches.
fn shadow_table(s: &serde_json::Value) -> String {
    let mut out = format!(
        "{} shadow on {} ({}% of requests)\n",
        s["function"].as_str().unwrap_or("?"),
        s["version"].as_str().unwrap_or("?"),
        s["percent"],
    );
    let routes = s["routes"].as_array().cloned().unwrap_or_default();
    if routes.is_empty() {
        out.push_str("  nothing compared yet\n");
    }
    for r in &routes {
        let rate = r["match_percent"]
            .as_f64()
            .map_or("-".to_string(), |p| format!("{p:.1}%"));
        out.push_str(&format!(
            "  {}: {rate} of {} matched ({} other status, {} other body, {} failed, {} skipped)\n",
            r["route"].as_str().unwrap_or("?"),
            r["compared"],
            r["status_differs"],
            r["body_differs"],
            r["shadow_failed"],
            r["skipped"],
        ));
        for m in r["mismatches"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "    {} {}: live {}, shadow {}\n",
                m["request_id"].as_str().unwrap_or("?"),
                m["verdict"].as_str().unwrap_or("?"),
                m["live_status"],
                m["shadow_status"],
            ));
        }
    }
    out
}

/// What a version may do beyond the live one, as one line.
fn widens(v: &serde_json::Value) -> String {
    v["widens"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// An uploaded version that may do more than the live one: deployed at 0% (where there is a
/// deployment to add it to), the difference printed, and a failure exit so scripts stop.
async fn held(
    client: &admin::client::AdminClient,
    api: &AdminConn,
    function: &str,
    label: &str,
    uploaded: &serde_json::Value,
) -> anyhow::Result<()> {
    let deployed = match client.deployment(function).await? {
        Some((live, _)) => Some(
            client
                .traffic(
                    function,
                    &admin::client::with_canary(&live, label, 0),
                    None,
                    "held for approval",
                )
                .await?,
        ),
        None => None,
    };
    api.print(
        &serde_json::json!({"uploaded": uploaded, "deployment": deployed}),
        |_| {
            format!(
                "uploaded {function} {label} (sha256 {})\n{label} may do more than the live version: {}\n{}",
                uploaded["sha256"].as_str().map_or("?", |s| &s[..12.min(s.len())]),
                widens(uploaded),
                deployed.as_ref().map(deployment_table).unwrap_or_default()
            )
        },
    );
    anyhow::bail!(
        "{label} is held at 0% until approved: review the difference above, then `wasmgate approve {function} {label}` and set its traffic"
    )
}

/// Milliseconds since the epoch as UTC time.
fn when(ms: &serde_json::Value) -> String {
    ms.as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or("?".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// Shortest admin token accepted: long enough that guessing it is hopeless.
const MIN_ADMIN_TOKEN: usize = 16;

impl AdminArgs {
    fn token(&self) -> anyhow::Result<Option<String>> {
        let token = match &self.admin_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| {
                        format!("failed to read the admin token file `{}`", path.display())
                    })?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var("WASMGATE_ADMIN_TOKEN").ok(),
        };
        if let Some(t) = &token {
            anyhow::ensure!(
                t.len() >= MIN_ADMIN_TOKEN,
                "the admin token must be at least {MIN_ADMIN_TOKEN} characters"
            );
        }
        Ok(token)
    }
}

#[derive(clap::Args)]
struct OverrideArgs {
    /// Directory for compiled components; overrides `[server] cache_dir`.
    #[arg(long, global = true, env = "WASMGATE_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Database for the db capability (sqlite://path or postgres://...); overrides
    /// `[backends] database_url`.
    #[arg(long, global = true, env = "WASMGATE_DATABASE_URL")]
    database_url: Option<String>,
    /// Redis for the cache and lock capabilities; overrides `[backends] redis_url`.
    #[arg(long, global = true, env = "WASMGATE_REDIS_URL")]
    redis_url: Option<String>,
}

impl From<OverrideArgs> for loader::Overrides {
    fn from(a: OverrideArgs) -> Self {
        Self {
            cache_dir: a.cache_dir,
            database_url: a.database_url,
            redis_url: a.redis_url,
        }
    }
}

/// Exit codes: 0 done; 1 refused or failed (the message says why); 2 bad usage (clap's);
/// 3 the admin API could not be reached or failed, so retrying later may work.
fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message already names the object and the fix; a backtrace would bury it.
            eprintln!("error: {e:#}");
            match e.downcast_ref::<ClientError>() {
                Some(ClientError::Unavailable(_)) => std::process::ExitCode::from(3),
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Up {
                manifest,
                listen,
                admin,
                overrides,
            } => up(manifest, listen, admin, overrides.into()).await,
            Command::Check {
                manifest,
                overrides,
            } => {
                let (m, _, built) = loader::load(&manifest, &overrides.into(), None).await?;
                println!(
                    "manifest `{}` is valid: {} function(s), {} route(s)",
                    manifest.display(),
                    built.functions.len(),
                    m.routes.len()
                );
                Ok(())
            }
            Command::Roles { action, target } => roles(action, target.store().await?).await,
            c @ (Command::Deploy { .. }
            | Command::Versions { .. }
            | Command::Traffic { .. }
            | Command::Promote { .. }
            | Command::Rollback { .. }
            | Command::Rollout { .. }
            | Command::Shadow { .. }
            | Command::DeadLetters { .. }
            | Command::Approve { .. }
            | Command::History { .. }) => deployments(c).await,
            Command::Keys { action, target } => keys(action, target.store().await?).await,
        }
    })
}

impl Platform {
    async fn store(self) -> anyhow::Result<wasmgate::auth::store::Store> {
        Ok(loader::auth_store(&self.manifest, &self.overrides.into()).await?)
    }
}

fn failed(e: wasmgate::capabilities::db::DbError) -> anyhow::Error {
    anyhow::anyhow!("the platform database refused the change: {e:?}")
}

async fn roles(action: RolesAction, store: wasmgate::auth::store::Store) -> anyhow::Result<()> {
    match action {
        RolesAction::Grant { subject, role } => {
            anyhow::ensure!(
                !role.is_empty() && !role.contains([' ', ',']) && !subject.is_empty(),
                "a role is one word without spaces or commas, and the subject may not be empty"
            );
            let new = store
                .grant(&subject, &role, wasmgate::auth::now_ms())
                .await
                .map_err(failed)?;
            println!(
                "{subject}: {role} {}",
                if new {
                    "granted"
                } else {
                    "was already granted"
                }
            );
        }
        RolesAction::Revoke { subject, role } => {
            let had = store.ungrant(&subject, &role).await.map_err(failed)?;
            println!(
                "{subject}: {role} {}",
                if had { "revoked" } else { "was not granted" }
            );
        }
        RolesAction::List { subject } => {
            for (s, r) in store.grants(subject.as_deref()).await.map_err(failed)? {
                println!("{s}\t{r}");
            }
        }
    }
    Ok(())
}

async fn keys(action: KeysAction, store: wasmgate::auth::store::Store) -> anyhow::Result<()> {
    match action {
        KeysAction::Rotate => {
            let key = wasmgate::auth::keys::generate();
            store.add_key(&key).await.map_err(failed)?;
            println!("new signing key {}; the others are retired", key.kid);
        }
        KeysAction::List => {
            for k in store.keys().await.map_err(failed)? {
                let retired = k
                    .retired_at
                    .map_or("active".to_string(), |r| format!("retired {r}"));
                println!("{}\tcreated {}\t{retired}", k.kid, k.created_at);
            }
        }
    }
    Ok(())
}

async fn up(
    manifest: PathBuf,
    listen: Option<SocketAddr>,
    admin: AdminArgs,
    overrides: loader::Overrides,
) -> anyhow::Result<()> {
    let admin_token = admin.token()?;
    let metrics = install_metrics()?;
    let deployer = Deployer::start(&manifest, overrides, listen, Some(metrics)).await?;
    let addr = deployer.settings().listen;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on {addr}"))?;
    let local = listener.local_addr().context("listener has no address")?;
    let state = deployer.state();
    let connections = deployer.settings().connections;
    let tls = match &deployer.settings().tls {
        Some(files) => {
            let tls = wasmgate::tls::Tls::load(files)?;
            // Runs as long as the process: the listeners share it.
            drop(tls.watch());
            Some(tls)
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    match admin_token {
        Some(token) => {
            let admin_listener =
                TcpListener::bind(admin.admin_listen)
                    .await
                    .with_context(|| {
                        format!(
                            "failed to listen on {} for the admin API",
                            admin.admin_listen
                        )
                    })?;
            let admin_local = admin_listener
                .local_addr()
                .context("admin listener has no address")?;
            let router = wasmgate::admin::router(deployer.clone(), &token);
            let admin_tls = tls.clone();
            tokio::spawn(async move {
                let serving = wasmgate::connections::serve(
                    admin_listener,
                    router,
                    connections,
                    admin_tls,
                    std::future::pending(),
                );
                if let Err(e) = serving.await {
                    tracing::error!(error = %e, "admin API stopped");
                }
            });
            // Printed before the public line, which tests and scripts wait for.
            println!("wasmgate admin listening on {scheme}://{admin_local}");
        }
        None => {
            tracing::info!("admin API off: no token (--admin-token-file or WASMGATE_ADMIN_TOKEN)")
        }
    }
    tokio::spawn(reload_on_sighup(deployer));
    // Tests and scripts wait for this exact line.
    println!("wasmgate listening on {scheme}://{local}");
    tracing::info!(%local, "serving");
    server::run(listener, state, connections, tls, shutdown_signal())
        .await
        .context("server failed")
}

/// On SIGHUP, applies the manifest again (the deployer's reload: same engine and backends, the
/// deployment swapped whole); requests in flight finish on the version they started on. A
/// manifest with problems is refused and the current deployment keeps serving.
async fn reload_on_sighup(deployer: std::sync::Arc<Deployer>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload needs a restart");
        return;
    };
    while hup.recv().await.is_some() {
        match deployer.reload().await {
            Ok(functions) => tracing::info!(functions, "reloaded manifest"),
            Err(e) => {
                tracing::error!(error = %e, "reload refused; still serving the previous manifest")
            }
        }
    }
}

/// Installs the Prometheus recorder; latency buckets cover a cached hit to a slow guest.
fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    const BUCKETS: &[f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .context("invalid histogram buckets")?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("a metrics recorder is already installed")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

fn init_tracing(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WASMGATE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,cranelift=warn,wasmtime=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
