//! `keel-fault-proxy`: the fault proxy as a program, for the demo and for manual experiments.
//!
//! ```text
//! keel-fault-proxy --upstream http://127.0.0.1:5000 --rules rules.json --listen 127.0.0.1:4566
//! ```
//!
//! It prints its endpoint on standard output once it listens, logs every request it handles
//! (`RUST_LOG=keel_testkit=debug` for one line per request), and on SIGINT or SIGTERM writes
//! the request record to `--record FILE` (if given) and exits.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use keel_testkit::proxy::{FaultProxy, Rules};

/// An HTTP proxy that makes moto misbehave like the real AWS cloud, by seeded rules.
#[derive(Debug, Parser)]
#[command(name = "keel-fault-proxy", version)]
struct Args {
    /// moto's base URL.
    #[arg(long, env = "KEEL_PROXY_UPSTREAM")]
    upstream: String,
    /// Rules as JSON (see docs/testing.md); without it, only the AssumeRole and deployment
    /// behaviour moto lacks is played.
    #[arg(long, env = "KEEL_PROXY_RULES")]
    rules: Option<PathBuf>,
    /// Where to listen.
    #[arg(long, env = "KEEL_PROXY_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write every request and the fault applied to it, as JSON, on exit.
    #[arg(long)]
    record: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "keel-fault-proxy: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let rules = match &args.rules {
        None => Rules::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let mut json = serde_json::Deserializer::from_str(&text);
            serde_path_to_error::deserialize(&mut json)
                .map_err(|e| format!("{}: field {}: {}", path.display(), e.path(), e.inner()))?
        }
    };
    let proxy =
        FaultProxy::start_on(args.listen, &args.upstream, rules).map_err(|e| e.to_string())?;
    writeln!(std::io::stdout(), "{}", proxy.endpoint()).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        Ok::<(), String>(())
    })?;
    let requests = proxy.requests();
    tracing::info!(
        requests = requests.len(),
        faults = proxy.faults().len(),
        "fault proxy stopping"
    );
    if let Some(path) = &args.record {
        let json = serde_json::to_vec_pretty(&requests).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}
