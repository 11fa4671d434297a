//! `keel-demo`: the README's demo. Starts moto's server and the fault proxy, runs a `keel
//! worker` process, provisions a Greengrass core with client devices and a fleet, SIGKILLs
//! the worker midway and restarts it, runs a core that fails late and is compensated, prints
//! the history and stats tables, and checks through the AWS API that every resource exists
//! exactly once and the compensated run left nothing. Exits 0 only if all of that held.

// The narration is the program's output.
#![allow(clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use keel_testkit::demo::{self, DemoOptions};

/// The Keel demo against moto's server.
#[derive(Debug, Parser)]
#[command(name = "keel-demo", version)]
struct Args {
    /// The `keel` binary (default: next to this program).
    #[arg(long)]
    keel: Option<PathBuf>,
    /// A directory for the worker's data and the inputs (default: a fresh temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Client devices of the Greengrass core.
    #[arg(long, default_value_t = 5)]
    clients: usize,
    /// Devices of the fleet.
    #[arg(long, default_value_t = 20)]
    fleet: usize,
    /// Seed of the proxy's faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let keel = args.keel.unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("this program's path");
        exe.with_file_name("keel")
    });
    let temporary = match &args.dir {
        Some(_) => None,
        None => match tempfile_dir() {
            Ok(dir) => Some(dir),
            Err(e) => {
                eprintln!("keel-demo: cannot make a temporary directory: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let dir = args.dir.or_else(|| temporary.clone()).expect("one of them");
    let options = DemoOptions {
        keel,
        dir,
        clients: args.clients,
        fleet: args.fleet,
        seed: args.seed,
    };
    let result = demo::run(&options, &mut std::io::stdout());
    if let Some(dir) = temporary {
        let _ = std::fs::remove_dir_all(dir);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keel-demo: FAILED: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A fresh directory under the system's temporary directory.
fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("keel-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
