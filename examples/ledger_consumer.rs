//! An analytics consumer of the settled ledger: a durable JetStream pull consumer on
//! `FLEX_LEDGER` that prints every ledger row once (docs/usage-streams.md has the schema).
//!
//! ```sh
//! cargo run --example ledger_consumer -- --nats-url nats://127.0.0.1:4222
//! cargo run --example ledger_consumer -- --durable billing-export --org org_0123 --json
//! # With the fleet's TLS NATS (deploy/nats/nats-server.conf, user CN=analytics):
//! cargo run --example ledger_consumer -- --nats-url tls://nats.internal:4222 \
//!   --nats-ca ca.pem --nats-cert analytics.pem --nats-key analytics.key
//! ```
//!
//! The durable consumer (`--durable`, default `analytics`) keeps its place in the stream: stop
//! and start this program and it goes on after the last row it acknowledged. Each row is acked
//! after it is printed, so a row can be printed again after a crash between the two (a
//! redelivery: same stream sequence, same `request_id`); the stream itself holds each request
//! once. `--idle-exit-secs N` exits after N seconds without a row (for scripts and tests).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer::pull, AckKind};
use clap::Parser;
use flex::cli::NatsAuthArgs;
use flex_control_plane::ledger_stream::{LedgerRow, LEDGER_SCHEMA_VERSION, LEDGER_STREAM};
use flex_data_plane::plane_tls::{self, ClientTlsFiles};
use flex_shared::usage::subject_token;
use futures_util::StreamExt;
use secrecy::ExposeSecret;

/// Where NATS replies go for this consumer (deploy/nats/nats-server.conf gives the analytics
/// user this inbox prefix only).
const INBOX: &str = "_INBOX.flex-analytics";

#[derive(Debug, Parser)]
#[command(about = "Print every settled ledger row of FLEX_LEDGER once (a durable consumer)")]
struct Args {
    /// NATS URL (tls://… for TLS).
    #[arg(long, env = "FLEX_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    #[command(flatten)]
    nats: NatsAuthArgs,
    /// The durable consumer's name; each name keeps its own place in the stream.
    #[arg(long, default_value = "analytics")]
    durable: String,
    /// Only this org's rows (`flex.ledger.<org_id>`).
    #[arg(long)]
    org: Option<String>,
    /// Print each row as its JSON (one line per row) instead of a summary line.
    #[arg(long)]
    json: bool,
    /// Exit after this many seconds without a row (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    idle_exit_secs: u64,
}

async fn connect(args: &Args) -> Result<async_nats::Client> {
    let mut opts = async_nats::ConnectOptions::new()
        .name("flex-ledger-consumer")
        .custom_inbox_prefix(INBOX)
        .max_reconnects(None)
        .retry_on_initial_connect();
    let auth = &args.nats;
    if let Some(path) = &auth.nats_creds {
        opts = opts
            .credentials_file(path)
            .await
            .with_context(|| format!("cannot read the NATS credentials file {}", path.display()))?;
    }
    if let (Some(user), Some(password)) = (&auth.nats_user, auth.password()?) {
        opts = opts.user_and_password(user.clone(), password.expose_secret().to_string());
    }
    if let Some(token) = auth.token()? {
        opts = opts.token(token.expose_secret().to_string());
    }
    let tls = ClientTlsFiles {
        ca: auth.nats_ca.clone(),
        cert: auth.nats_cert.clone(),
        key: auth.nats_key.clone(),
        server_name: None,
    };
    let opts = plane_tls::nats_options(opts, &tls)?;
    opts.connect(&args.nats_url).await.with_context(|| {
        format!(
            "invalid --nats-url `{}` (expected e.g. nats://127.0.0.1:4222)",
            args.nats_url
        )
    })
}

fn print_row(row: &LedgerRow, seq: u64, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(row)?);
    } else {
        println!(
            "#{seq} {} {} org={} model={} tier={} reason={} status={} tokens={}/{} cost={} saved={} (micro-USD)",
            row.recorded_at,
            row.request_id,
            row.org_id,
            row.model,
            if row.served_tier.is_empty() { "-" } else { &row.served_tier },
            row.reason,
            row.status,
            row.input_tokens,
            row.output_tokens,
            row.cost_micros,
            row.savings_micros,
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = connect(&args).await?;
    let js = jetstream::new(client);
    let stream = js.get_stream(LEDGER_STREAM).await.with_context(|| {
        format!(
            "stream {LEDGER_STREAM} not found: it is created by `flex control --nats-url …` once it runs (and the NATS user needs $JS.API.STREAM.INFO.{LEDGER_STREAM})"
        )
    })?;
    let filter_subject = args
        .org
        .as_deref()
        .map(|org| format!("flex.ledger.{}", subject_token(org)))
        .unwrap_or_default();
    let consumer = stream
        .get_or_create_consumer(
            &args.durable,
            pull::Config {
                durable_name: Some(args.durable.clone()),
                description: Some("FlexInference ledger rows (examples/ledger_consumer.rs)".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 1000,
                filter_subject,
                ..Default::default()
            },
        )
        .await
        .with_context(|| {
            format!(
                "cannot create or bind the durable consumer `{}`",
                args.durable
            )
        })?;
    let mut messages = consumer
        .stream()
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .with_context(|| format!("cannot pull from the durable consumer `{}`", args.durable))?;
    eprintln!(
        "reading {LEDGER_STREAM} with the durable consumer `{}`{}",
        args.durable,
        args.org
            .as_deref()
            .map(|o| format!(" (org {o})"))
            .unwrap_or_default()
    );
    loop {
        let next = if args.idle_exit_secs > 0 {
            match tokio::time::timeout(Duration::from_secs(args.idle_exit_secs), messages.next())
                .await
            {
                Ok(n) => n,
                Err(_) => return Ok(()),
            }
        } else {
            messages.next().await
        };
        let message = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                // Heartbeats missed, a NATS restart: the pull stream resumes on its own.
                eprintln!("pull: {e}");
                continue;
            }
            None => bail!("the pull stream of `{}` ended", args.durable),
        };
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        match serde_json::from_slice::<LedgerRow>(&message.payload) {
            Ok(row) => {
                if row.schema_version > LEDGER_SCHEMA_VERSION {
                    eprintln!(
                        "row #{seq} has schema_version {} (this program knows {LEDGER_SCHEMA_VERSION}): fields may mean something new; update the consumer",
                        row.schema_version
                    );
                }
                print_row(&row, seq, args.json)?;
                if let Err(e) = message.ack().await {
                    eprintln!("ack of #{seq} failed ({e}): it will be delivered again");
                }
            }
            Err(e) => {
                eprintln!("message #{seq} is not a ledger row ({e}); terminated");
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
    }
}
