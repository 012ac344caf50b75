//! The `flex` binary.

use clap::Parser;
use flex::cli::{Cli, Command};

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
