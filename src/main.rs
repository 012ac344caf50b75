//! The `flex` binary.

use clap::Parser;
use flex::cli::{Cli, Command};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,flex=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(a) => flex::run::up(a).await,
        Command::Control(a) => flex::run::control(a).await,
        Command::Proxy(a) => flex::run::proxy(a).await,
        Command::Admin(a) => flex::admin_cli::run(a).await,
        Command::Sim(a) => flex::run::sim(a).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
