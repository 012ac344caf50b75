//! The `flex` binary.

use clap::Parser;
use flex::cli::{Cli, Command};

/// jemalloc instead of glibc's malloc: a request allocates and frees a few hundred small buffers
/// (headers, the JSON body, the usage event) on the proxy's worker threads, and glibc's malloc,
/// free and consolidation were about 15 % of those threads' CPU at concurrency 32. Measured in
/// BENCHMARKS.md ("Against peers", session 7): +8 % req/s, idle RSS +2 MiB. mimalloc was faster
/// still but held 38 MiB more at idle.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Logging (FLEX_LOG), and OTLP trace export when `--otlp-endpoint` (or OTEL_*) says so.
    let telemetry = match flex::telemetry::init(&cli.command) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Up(a) => flex::run::up(a).await,
        Command::Control(a) => flex::run::control(a).await,
        Command::Proxy(a) => flex::run::proxy(a).await,
        Command::Admin(a) => flex::admin_cli::run(a).await,
        Command::Sim(a) => flex::run::sim(a).await,
        Command::Keygen(a) => flex::snapshot_keys::keygen(a),
    };
    telemetry.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
