//! `flex proxy`: a data-plane proxy fed by the control plane (gRPC Watch and/or NATS), with its
//! usage sink (JetStream or ReportUsage, through the write-ahead log in `--state-dir`).

use super::*;

pub async fn proxy(args: ProxyArgs) -> Result<()> {
    if args.control_url.is_none() && args.nats_url.is_none() {
        bail!("flex proxy needs a snapshot source: pass --control-url http://CONTROL:50051 (gRPC Watch) and/or --nats-url nats://NATS:4222 (JetStream), or set FLEX_CONTROL_URL / FLEX_NATS_URL");
    }
    // Errors a user fixes in the dashboard (no_byok_key, payment_required) link to its page.
    flex_data_plane::error::set_dashboard_url(args.dashboard_url.as_deref());
    // Held until this function returns (the process ends): one proxy per state dir.
    let _state_lock = args.state_dir.as_deref().map(lock_state_dir).transpose()?;
    let keyring = match &args.master_key_file {
        Some(p) => Some(Arc::new(MasterKeyring::load(p)?)),
        None => None,
    };
    let store = Arc::new(
        SnapshotStore::new(keyring, args.state_dir.clone())
            .with_key_file(args.master_key_file.clone())
            .with_verifier(crate::snapshot_keys::proxy_verifier(&args.snapshot_trust)?)
            .with_max_age(crate::snapshot_keys::max_age(&args.snapshot_trust)),
    );
    match store.load_persisted() {
        Ok(Some(v)) => println!("warm start from persisted snapshot version {v}"),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "ignoring the persisted snapshot"),
    }
    let endpoint = match &args.control_url {
        Some(control_url) => Some(
            tonic::transport::Endpoint::from_shared(control_url.clone())
                .with_context(|| {
                    format!(
                        "invalid --control-url `{}` (expected e.g. http://127.0.0.1:50051)",
                        redact_url(control_url)
                    )
                })?
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true),
        ),
        None => None,
    };
    let endpoint = match endpoint {
        Some(e) => {
            let tls = ClientTlsFiles {
                ca: args.control_ca.clone(),
                cert: args.control_cert.clone(),
                key: args.control_key.clone(),
                server_name: args.control_server_name.clone(),
            };
            Some(plane_tls::grpc_endpoint(e, &tls, plane_tls::PROXY_FLAGS)?)
        }
        None => None,
    };
    // With a client certificate, its common name is the proxy's id between the planes
    // (flex_shared::identity): the control plane refuses another one.
    let certified = args
        .control_cert
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|pem| flex_shared::identity::pem_common_name(&pem));
    let proxy_id = args
        .proxy_id
        .clone()
        .or(certified)
        .unwrap_or_else(|| format!("proxy-{}-{}", hostname(), std::process::id()));
    let limits_proxy_id = proxy_id.clone();
    // Snapshots: gRPC Watch and/or the JetStream stream (both feed the same store).
    if let Some(endpoint) = &endpoint {
        tokio::spawn(snapshot::follow_grpc(
            store.clone(),
            endpoint.clone(),
            proxy_id.clone(),
            proxy_token(&args)?,
        ));
    }
    if let Some(url) = &args.nats_url {
        let client = nats_connect(url, &args.nats_auth, "flex-proxy-snapshots").await?;
        println!(
            "following snapshots on NATS at {} (stream FLEX_SNAPSHOTS)",
            redact_url(url)
        );
        tokio::spawn(snapshot::follow_nats_client(
            store.clone(),
            client,
            proxy_id,
        ));
    }
    let (sink, wal) = usage_sink(&args, endpoint).await?;
    let listener = bind(args.listen, "the proxy").await?;
    println!("proxy listening on {}", listener.local_addr()?);
    let (upstream, tls) = upstream_and_tls(&args.upstream)?;
    let (metrics, _) = metrics_listener(args.metrics.metrics_listen, false).await?;
    let cfg = ProxyConfig {
        limits: limits_of(&args.limits, &limits_proxy_id, false)?,
        metrics: metrics.is_some(),
        listener: listener_config(&args.listener)?,
        ..proxy_config(&args.upstream, base_urls(&args.upstream, None))
    };
    // From here on SIGINT and SIGTERM stop the process cleanly.
    let stop = shutdown_signal();
    let (drain, drained) = tokio::sync::oneshot::channel::<()>();
    let grace = Duration::from_secs(args.drain.shutdown_grace_secs);
    let server = spawn_proxy_until(
        listener,
        store.clone(),
        &upstream,
        cfg,
        tls,
        sink,
        async {
            let _ = drained.await;
        },
        grace,
        metrics,
    )?;
    stop.await;
    // A planned stop: not ready at once, no new connections after --drain-delay-secs, requests
    // in flight given --shutdown-grace-secs to finish (then cut off, like a kill), the usage
    // log's queue written and fsynced, the newest snapshot persisted.
    drain_proxy(
        &store,
        Duration::from_secs(args.drain.drain_delay_secs),
        || {
            let _ = drain.send(());
        },
    )
    .await;
    if let Err(e) = server.await {
        tracing::warn!(error = %e, "the proxy server task ended abnormally");
    }
    if let Some(wal) = wal {
        close_usage_log(wal).await;
    }
    flush_snapshot(store).await;
    Ok(())
}

/// Where a proxy's usage goes: JetStream when --nats-url is given, else the control plane's
/// `ReportUsage`; from the write-ahead usage log in --state-dir when there is one (each event
/// durable before its answer ends, replayed after a restart; returned too, to close it on a
/// planned stop), else from memory.
async fn usage_sink(
    args: &ProxyArgs,
    endpoint: Option<tonic::transport::Endpoint>,
) -> Result<(Arc<dyn UsageSink>, Option<Arc<UsageWal>>)> {
    let wal = match &args.state_dir {
        Some(dir) => Some(
            UsageWal::open(WalConfig {
                max_bytes: args.usage_spool_max_mib.saturating_mul(1024 * 1024),
                durable_wait: Duration::from_millis(args.usage_durable_wait_ms),
                ..WalConfig::new(dir)
            })
            .with_context(|| {
                format!("cannot open the usage log in --state-dir {}", dir.display())
            })?,
        ),
        None => {
            tracing::warn!("no --state-dir: usage events wait in memory until delivered (bounded; a crash or restart loses them). Give --state-dir for a durable usage log");
            None
        }
    };
    let Some(url) = &args.nats_url else {
        let Some(endpoint) = endpoint else {
            bail!("flex proxy needs --control-url or --nats-url");
        };
        if let Some(wal) = wal {
            tokio::spawn(flex_data_plane::usage::log::deliver_grpc(
                wal.clone(),
                endpoint,
                proxy_token(args)?,
            ));
            return Ok((wal.clone(), Some(wal)));
        }
        let (sink, rx) = ChannelSink::new();
        tokio::spawn(flex_data_plane::usage::deliver_grpc(
            rx,
            endpoint,
            proxy_token(args)?,
        ));
        return Ok((sink, None));
    };
    let client = nats_connect(url, &args.nats_auth, "flex-proxy").await?;
    let source = match &wal {
        Some(wal) => UsageSource::Log(wal.clone()),
        None => UsageSource::Queue(UsageQueue::new()),
    };
    let sink = source.sink();
    spawn_nats_delivery(source, client, NatsDeliveryConfig::default());
    println!(
        "usage goes to NATS at {} (stream FLEX_USAGE)",
        redact_url(url)
    );
    Ok((sink, wal))
}
