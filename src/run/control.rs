//! `flex control`: the control plane on its own (Postgres or SQLite, gRPC admin and control,
//! NATS snapshots and the usage stream, the dashboard).

use super::*;

/// The admin token and the master key file `flex control` cannot run without, or an error that
/// says how to give them.
fn control_secrets(args: &ControlArgs) -> Result<(SecretString, std::path::PathBuf)> {
    let given = crate::cli::secret_from(
        args.admin_token.as_ref(),
        args.admin_token_file.as_deref(),
        "--admin-token-file",
    )?;
    let token = match given.as_ref().map(|t| t.expose_secret().trim()) {
        Some(t) if !t.is_empty() => SecretString::from(t.to_string()),
        _ => bail!(
            "flex control needs an admin token (operators present it to the admin API as `authorization: Bearer TOKEN`): pass --admin-token-file FILE (or FLEX_ADMIN_TOKEN_FILE), or set FLEX_ADMIN_TOKEN, e.g. `openssl rand -hex 32 > admin.token && chmod 600 admin.token` then flex control --admin-token-file admin.token …"
        ),
    };
    let Some(key_file) = args.master_key_file.clone() else {
        bail!(
            "flex control needs a master key file (it seals the provider keys): pass --master-key-file or set FLEX_MASTER_KEY_FILE; create one with `openssl rand -hex 32 > master.key && chmod 600 master.key`"
        );
    };
    Ok((token, key_file))
}

pub async fn control(args: ControlArgs) -> Result<()> {
    // TLS files first: a wrong path fails before anything connects.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls::load(cert, key, args.client_ca.as_deref())?),
        _ => None,
    };
    let (token, key_file) = control_secrets(&args)?;
    let proxy_token = args
        .proxy_token_file
        .as_deref()
        .map(|f| read_token_file(f, "--proxy-token-file"))
        .transpose()?;
    if !args.listen.ip().is_loopback()
        && args.client_ca.is_none()
        && proxy_token.is_none()
        && !args.insecure
    {
        bail!(
            "flex control would serve Watch, Ack and ReportUsage on {} to anyone who reaches it (every snapshot, usage for any org), because neither --client-ca (mutual TLS) nor --proxy-token-file is given. Fix: give the proxies a token, e.g. `openssl rand -hex 32 > proxy.token && chmod 600 proxy.token`, then `flex control --proxy-token-file proxy.token …` and `flex proxy --proxy-token-file proxy.token …`; or listen on 127.0.0.1; or, on a network where every host is trusted, add --insecure",
            args.listen
        );
    }
    let keyring = Arc::new(MasterKeyring::load(&key_file)?);
    let cp = Arc::new(
        ControlPlane::open(&args.database_url, keyring)
            .await
            .with_context(|| {
                format!(
                    "cannot open the event store at --database-url {}",
                    redact_url(&args.database_url)
                )
            })?
            .with_master_key_file(&key_file),
    );
    if let Some(t) = &proxy_token {
        cp.require_proxy_token(t)?;
        println!("the control service requires the proxy token of --proxy-token-file");
    }
    crate::snapshot_keys::configure_control(&cp, &args.snapshot_signing)?;
    if let Some(url) = &args.redis_url {
        let limiter = RedisLimiter::new(
            url,
            Duration::from_secs(1),
            flex_data_plane::limits::DEFAULT_LEASE_TTL,
        )
        .map_err(anyhow::Error::msg)?;
        cp.set_limit_counters(Arc::new(SharedCounters(Arc::new(limiter))));
        println!("reading limit counters from Redis at {}", redact_url(url));
        // A Redis that restarts without persistence forgets the day's and month's spend: the
        // ledger's is put back.
        let cp = cp.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                match cp.reconcile_budgets().await {
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("budget reconciliation with Redis works again");
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "budget reconciliation failed; retrying");
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(flex_control_plane::limits::RECONCILE_EVERY).await;
            }
        });
    }
    // Usage from the proxies: the durable consumer on FLEX_USAGE into the ledger.
    let _usage_consumer = match &args.nats_url {
        Some(url) => {
            let client = nats_connect(url, &args.nats_auth, "flex-control").await?;
            println!(
                "consuming usage from NATS at {} (stream FLEX_USAGE)",
                redact_url(url)
            );
            Some(cp.spawn_usage_consumer(client, UsageConsumerConfig::default()))
        }
        None => None,
    };
    // The settled ledger for analytics: every new ledger row, once, to FLEX_LEDGER.
    let _ledger_publisher = match &args.nats_url {
        Some(url) => {
            let client = nats_connect(url, &args.nats_auth, "flex-control-ledger").await?;
            println!(
                "publishing the settled ledger to NATS at {} (stream FLEX_LEDGER)",
                redact_url(url)
            );
            Some(cp.spawn_ledger_publisher(client, LedgerPublisherConfig::default()))
        }
        None => None,
    };
    // Snapshots to the proxies that follow NATS: the FLEX_SNAPSHOTS stream.
    let _snapshot_publisher = match &args.nats_url {
        Some(url) => {
            let client = nats_connect(url, &args.nats_auth, "flex-control-snapshots").await?;
            println!(
                "publishing snapshots to NATS at {} (stream FLEX_SNAPSHOTS)",
                redact_url(url)
            );
            Some(cp.publish_snapshots_to_nats(client, NatsSnapshotConfig::default()))
        }
        None => None,
    };
    let listener = bind(args.listen, "the control plane gRPC API").await?;
    let addr = listener.local_addr()?;
    if let (Some(metrics), Some(url)) = metrics_listener(args.metrics.metrics_listen, false).await?
    {
        println!("metrics on {url}");
        let cp = cp.clone();
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let cp = cp.clone();
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        flex_control_plane::metrics::metrics().encode(&cp.proxies().list()),
                    )
                }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = flex_data_plane::server::serve(metrics, router, None).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    match &tls {
        Some(t) if t.client_ca() => println!(
            "control plane listening on https://{addr} (mTLS: only proxies with a client certificate from --client-ca can watch)"
        ),
        Some(_) => println!("control plane listening on https://{addr}"),
        None => {
            println!("control plane listening on http://{addr}");
            if !addr.ip().is_loopback() && args.proxy_token_file.is_some() {
                tracing::warn!(%addr, "gRPC without TLS on a non-loopback address: the proxy token, snapshots (key hashes, sealed provider keys) and usage cross the network in clear. Give --tls-cert/--tls-key");
            } else if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "gRPC without TLS or a proxy token on a non-loopback address (--insecure): anyone who reaches it can watch snapshots (key hashes, sealed provider keys) and report usage. Give --proxy-token-file, or --tls-cert/--tls-key and --client-ca");
            }
        }
    }
    // One signal stops the gRPC server and the dashboard.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signal = shutdown_signal();
    if let Some(addr) = args.dashboard_listen {
        spawn_control_dashboard(&cp, &args, addr, stop_rx).await?;
    }
    let stop = async move {
        signal.await;
        let _ = stop_tx.send(true);
    };
    cp.serve_with_listener_tls(listener, &token, tls.as_ref(), stop)
        .await?;
    Ok(())
}

/// `flex control --dashboard-listen`: the dashboard, until `stop` turns true.
async fn spawn_control_dashboard(
    cp: &Arc<ControlPlane>,
    args: &ControlArgs,
    addr: std::net::SocketAddr,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let listener = bind(addr, "the dashboard").await?;
    let local = listener.local_addr()?;
    let url = args
        .dashboard_url
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));
    let mut cfg = DashboardConfig::new(&url);
    if let Some(api) = &args.api_base_url {
        cfg = cfg.with_api_base_url(api);
    }
    println!("dashboard listening on http://{local} (public URL {url})");
    if !local.ip().is_loopback() && !url.starts_with("https://") {
        tracing::warn!(%local, "the dashboard listens beyond loopback without TLS: passwords and session cookies cross the network in clear. Put a TLS-terminating reverse proxy in front and give --dashboard-url https://…");
    }
    let cp = cp.clone();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = cp.serve_dashboard(listener, cfg, shutdown).await {
            tracing::error!(error = %e, "dashboard stopped");
        }
    });
    Ok(())
}
