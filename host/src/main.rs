//! The `wasmgate` binary: flags, logging, socket, then the library's `run`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

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
        overrides: OverrideArgs,
    },
    /// Load the manifest and every function, report problems, and exit without serving.
    Check {
        #[arg(long, short, default_value = "wasmgate.toml")]
        manifest: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
}

#[derive(clap::Args)]
struct OverrideArgs {
    /// Directory for compiled components; overrides `[server] cache_dir`.
    #[arg(long, env = "WASMGATE_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Database for the db capability (sqlite://path or postgres://...); overrides
    /// `[backends] database_url`.
    #[arg(long, env = "WASMGATE_DATABASE_URL")]
    database_url: Option<String>,
    /// Redis for the cache and lock capabilities; overrides `[backends] redis_url`.
    #[arg(long, env = "WASMGATE_REDIS_URL")]
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

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message already names the object and the fix; a backtrace would bury it.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
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
                overrides,
            } => up(manifest, listen, overrides.into()).await,
            Command::Check {
                manifest,
                overrides,
            } => {
                let loaded = loader::load(&manifest, &overrides.into()).await?;
                println!(
                    "manifest `{}` is valid: {} function(s), {} route(s)",
                    manifest.display(),
                    loaded.functions.len(),
                    loaded.manifest.routes.len()
                );
                Ok(())
            }
        }
    })
}

async fn up(
    manifest: PathBuf,
    listen: Option<SocketAddr>,
    overrides: loader::Overrides,
) -> anyhow::Result<()> {
    let loaded = loader::load(&manifest, &overrides).await?;
    let addr = listen.unwrap_or(loaded.manifest.server.listen);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on {addr}"))?;
    let local = listener.local_addr().context("listener has no address")?;
    let state = server::AppState::new(loaded.routes, loaded.backends);
    // Tests and scripts wait for this exact line.
    println!("wasmgate listening on http://{local}");
    tracing::info!(%local, functions = loaded.functions.len(), "serving");
    server::run(listener, state, shutdown_signal())
        .await
        .context("server failed")?;
    // The runtime (engine, epoch ticker) lives until the server has drained.
    drop(loaded.runtime);
    Ok(())
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
