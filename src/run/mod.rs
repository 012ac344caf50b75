//! Wiring of the processes: `flex up`, `flex control`, `flex proxy`, `flex sim`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flex_control_plane::dashboard::DashboardConfig;
use flex_control_plane::ledger_stream::LedgerPublisherConfig;
use flex_control_plane::snapshot_nats::NatsSnapshotConfig;
use flex_control_plane::tls::ServerTls;
use flex_control_plane::usage_consumer::UsageConsumerConfig;
use flex_control_plane::{ControlPlane, Metadata};
use flex_data_plane::plane_tls::{self, ClientTlsFiles};
use flex_data_plane::providers::BaseUrls;
use flex_data_plane::proxy::{ExtraMetrics, Proxy, ProxyConfig};
use flex_data_plane::server::ListenerConfig;
use flex_data_plane::snapshot::{self, SnapshotStore};
use flex_data_plane::upstream::{UpstreamClient, UpstreamConfig};
use flex_data_plane::usage::log::{UsageWal, WalConfig};
use flex_data_plane::usage::nats::{
    spawn_nats_delivery, NatsDeliveryConfig, UsageQueue, UsageSource,
};
use flex_data_plane::usage::{ChannelSink, UsageSink};
use flex_shared::crypto::MasterKeyring;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::cli::{
    ControlArgs, LimitsArgs, ListenerArgs, NatsAuthArgs, ProxyArgs, SimArgs, UpArgs, UpstreamArgs,
};
use crate::ledger_feed::LedgerFeed;
use crate::sim::{self, SimConfig};
use flex_data_plane::limits::{FailMode, Limiter, Limits, LimitsConfig, RedisLimiter};

mod control;
mod proxy;
mod up;

pub use control::control;
pub use proxy::proxy;
pub use up::{up, DEMO_USER_EMAIL};

/// Writes `contents` to a new file readable only by its owner (mode 0600).
fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Reads the file, or creates it with `make()` on first start.
fn load_or_create(path: &Path, make: impl FnOnce() -> String) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let s = make();
            write_private(path, &s)?;
            Ok(s)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn random_hex(bytes: usize) -> String {
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(v)
}

fn proxy_config(u: &UpstreamArgs, base_urls: BaseUrls) -> ProxyConfig {
    ProxyConfig {
        base_urls,
        max_body_bytes: u.max_body_mib.saturating_mul(1024 * 1024),
        max_response_bytes: u.max_response_mib.saturating_mul(1024 * 1024),
        items: flex_data_plane::request::ItemLimits {
            max_messages: u.max_messages,
            max_tools: u.max_tools,
        },
        metrics_org_label_max: u.metrics_org_label_max,
        // Set only when traces are exported.
        caller_trace: crate::telemetry::caller_trace(),
        ..ProxyConfig::default()
    }
}

/// The listener's limits given on the command line (each at least 1), with a warning when the
/// open-files limit is below `--max-connections`.
fn listener_config(l: &ListenerArgs) -> Result<ListenerConfig> {
    let secs = |n: u64, flag: &str| -> Result<Duration> {
        if n == 0 {
            bail!("--{flag} must be at least 1 second (got 0): the listener never waits without a bound; e.g. --{flag} 30");
        }
        Ok(Duration::from_secs(n))
    };
    if l.max_connections == 0 {
        bail!("--max-connections must be at least 1 (got 0); e.g. --max-connections 10000");
    }
    if l.http2_max_concurrent_streams == 0 {
        bail!("--http2-max-concurrent-streams must be at least 1 (got 0); e.g. --http2-max-concurrent-streams 100");
    }
    if let Some(files) = open_files_limit() {
        if files < l.max_connections as u64 + 256 {
            tracing::warn!(
                open_files = files,
                max_connections = l.max_connections,
                "this process may open only {files} files, fewer than --max-connections {} plus room for provider connections and the state dir: accepting fails (and is retried) once it runs out. Raise the limit (systemd LimitNOFILE=65536, docker --ulimit nofile=65536) or lower --max-connections",
                l.max_connections
            );
        }
    }
    Ok(ListenerConfig {
        header_read_timeout: secs(l.header_read_timeout_secs, "header-read-timeout-secs")?,
        tls_handshake_timeout: secs(l.tls_handshake_timeout_secs, "tls-handshake-timeout-secs")?,
        idle_timeout: secs(l.idle_timeout_secs, "idle-timeout-secs")?,
        body_read_timeout: secs(l.body_read_timeout_secs, "body-read-timeout-secs")?,
        max_connections: l.max_connections,
        http2_max_concurrent_streams: l.http2_max_concurrent_streams,
        http2_keepalive_interval: secs(l.http2_keepalive_secs, "http2-keepalive-secs")?,
        worker_threads: l.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
        ..ListenerConfig::default()
    })
}

/// The soft limit of open files of this process (Linux: /proc/self/limits; None elsewhere).
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The limits of a proxy: counters in Redis with `--redis-url`, else in this process.
pub fn limits_of(args: &LimitsArgs, proxy_id: &str, embedded: bool) -> Result<Limits> {
    let fail = FailMode::parse(&args.limits_fail).unwrap_or_default();
    let Some(url) = &args.redis_url else {
        if !embedded {
            tracing::warn!("no --redis-url: this proxy counts rate limits, concurrency and budgets on its own, so each proxy of a fleet allows the whole of every limit. Give every proxy the same --redis-url (e.g. redis://127.0.0.1:6379) to share the counters");
        }
        return Ok(Limits::in_process());
    };
    let cfg = LimitsConfig {
        fail,
        lease_ttl: Duration::from_secs(args.limits_lease_ttl_secs.max(1)),
        fleet_size: args.limits_fleet_size.filter(|n| *n > 0),
        proxy_id: proxy_id.to_string(),
    };
    let limits = Limits::redis(
        url,
        Duration::from_millis(args.redis_timeout_ms.max(1)),
        cfg,
    )
    .map_err(anyhow::Error::msg)?;
    println!(
        "limits counted in Redis at {} (--limits-fail {})",
        redact_url(url),
        fail.as_str()
    );
    Ok(limits)
}

/// A URL without its credentials (for logs and errors): [`flex_shared::redact::url`].
fn redact_url(url: &str) -> String {
    flex_shared::redact::url(url)
}

/// The data plane's counters, read by the control plane for `flex admin limits show`.
pub struct SharedCounters(pub Arc<dyn Limiter>);

impl flex_control_plane::limits::LimitCounters for SharedCounters {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn read<'a>(
        &'a self,
        entry: &'a flex_shared::proto::control::LimitEntry,
    ) -> flex_control_plane::limits::BoxFuture<
        'a,
        std::result::Result<flex_control_plane::limits::CounterReading, String>,
    > {
        Box::pin(async move {
            let r = flex_data_plane::limits::read_entry(self.0.as_ref(), entry)
                .await
                .map_err(|e| e.to_string())?;
            Ok(flex_control_plane::limits::CounterReading {
                requests: r.requests,
                tokens: r.tokens,
                window_clear_at_ms: r.window_clear_at_ms,
                in_flight: r.in_flight,
                reserved_micros: r.reserved_micros,
                day_settled_micros: r.day_settled_micros,
                month_settled_micros: r.month_settled_micros,
            })
        })
    }
    fn raise_spend<'a>(
        &'a self,
        entry: &'a flex_shared::proto::control::LimitEntry,
        day_micros: i64,
        month_micros: i64,
    ) -> flex_control_plane::limits::BoxFuture<'a, std::result::Result<(), String>> {
        Box::pin(async move {
            flex_data_plane::limits::raise_spend_entry(
                self.0.as_ref(),
                entry,
                day_micros,
                month_micros,
            )
            .await
            .map_err(|e| e.to_string())
        })
    }
}

fn base_urls(u: &UpstreamArgs, fallback: Option<(&str, &str)>) -> BaseUrls {
    let d = BaseUrls::default();
    let (sim_openai, sim_root) = match fallback {
        Some((o, r)) => (Some(o.to_string()), Some(r.to_string())),
        None => (None, None),
    };
    BaseUrls {
        openai: u.openai_base_url.clone().or(sim_openai).unwrap_or(d.openai),
        anthropic: u
            .anthropic_base_url
            .clone()
            .or(sim_root.clone())
            .unwrap_or(d.anthropic),
        gemini: u.gemini_base_url.clone().or(sim_root).unwrap_or(d.gemini),
    }
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for {what}: is another process using it? Pick another with the flag or env var"))
}

/// Serves a proxy on `listener` in the background.
pub fn serve_proxy(
    listener: TcpListener,
    store: Arc<SnapshotStore>,
    upstream: &UpstreamConfig,
    cfg: ProxyConfig,
    tls: Option<TlsAcceptor>,
    usage: Arc<dyn UsageSink>,
) -> Result<()> {
    spawn_proxy(listener, store, upstream, cfg, tls, usage).map(drop)
}

/// [`serve_proxy`], returning the task that accepts connections (abort it to stop accepting;
/// connections already open carry on).
pub fn spawn_proxy(
    listener: TcpListener,
    store: Arc<SnapshotStore>,
    upstream: &UpstreamConfig,
    cfg: ProxyConfig,
    tls: Option<TlsAcceptor>,
    usage: Arc<dyn UsageSink>,
) -> Result<tokio::task::JoinHandle<()>> {
    spawn_proxy_until(
        listener,
        store,
        upstream,
        cfg,
        tls,
        usage,
        std::future::pending(),
        Duration::ZERO,
        None,
    )
}

/// [`spawn_proxy`] that drains when `shutdown` resolves: it stops accepting, lets requests in
/// flight finish for up to `grace`, and its task ends once drained.
#[allow(clippy::too_many_arguments)]
pub fn spawn_proxy_until(
    listener: TcpListener,
    store: Arc<SnapshotStore>,
    upstream: &UpstreamConfig,
    cfg: ProxyConfig,
    tls: Option<TlsAcceptor>,
    usage: Arc<dyn UsageSink>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
    metrics: Option<TcpListener>,
) -> Result<tokio::task::JoinHandle<()>> {
    let limits = cfg.listener.clone();
    let proxy = Arc::new(Proxy::new(
        store,
        UpstreamClient::new(upstream)?,
        cfg,
        usage,
    ));
    if let Some(listener) = metrics {
        let router = flex_data_plane::server::metrics_router(proxy.clone());
        tokio::spawn(async move {
            if let Err(e) = flex_data_plane::server::serve(listener, router, None).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    let router = flex_data_plane::server::router(proxy);
    Ok(tokio::spawn(async move {
        if let Err(e) =
            flex_data_plane::server::serve_until(listener, router, tls, limits, shutdown, grace)
                .await
        {
            tracing::error!(error = %e, "proxy server stopped");
        }
    }))
}

/// A proxy fed in process by `cp` (what `flex up` runs): snapshots from its watch channel, usage
/// straight into its ledger. Returns the proxy's snapshot store.
pub fn embedded_proxy(
    cp: &Arc<ControlPlane>,
    store: SnapshotStore,
    listener: TcpListener,
    upstream: &UpstreamConfig,
    cfg: ProxyConfig,
    tls: Option<TlsAcceptor>,
) -> Result<Arc<SnapshotStore>> {
    let (store, _task, _feed) = embedded_proxy_until(
        cp,
        store,
        listener,
        upstream,
        cfg,
        tls,
        std::future::pending(),
        Duration::ZERO,
        None,
    )?;
    Ok(store)
}

/// [`embedded_proxy`] that drains when `shutdown` resolves (see [`spawn_proxy_until`]); also
/// returns the server task, which ends once drained, and the ledger feed, to flush at the exit.
#[allow(clippy::too_many_arguments)]
pub fn embedded_proxy_until(
    cp: &Arc<ControlPlane>,
    store: SnapshotStore,
    listener: TcpListener,
    upstream: &UpstreamConfig,
    cfg: ProxyConfig,
    tls: Option<TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
    metrics: Option<TcpListener>,
) -> Result<(Arc<SnapshotStore>, tokio::task::JoinHandle<()>, LedgerFeed)> {
    let store = Arc::new(store);
    tokio::spawn(follow_in_process(cp.clone(), store.clone()));
    let (sink, rx) = ChannelSink::new();
    let feed = LedgerFeed::spawn(rx, cp.clone());
    let task = spawn_proxy_until(
        listener,
        store.clone(),
        upstream,
        cfg,
        tls,
        sink,
        shutdown,
        grace,
        metrics,
    )?;
    Ok((store, task, feed))
}

/// The default dashboard address of `flex up`.
pub const DEFAULT_UP_DASHBOARD: &str = "127.0.0.1:3000";

/// `flex up`'s dashboard listener: the address given (an error when it cannot be bound), else
/// the default one, where a busy port only costs a warning (`None`: no dashboard).
async fn up_dashboard_listener(given: Option<std::net::SocketAddr>) -> Result<Option<TcpListener>> {
    match given {
        Some(addr) => Ok(Some(
            bind(addr, "the dashboard (--dashboard-listen)").await?,
        )),
        None => match TcpListener::bind(DEFAULT_UP_DASHBOARD).await {
            Ok(l) => Ok(Some(l)),
            Err(e) => {
                tracing::warn!(error = %e, address = DEFAULT_UP_DASHBOARD, "the dashboard is off: its default address is busy; give --dashboard-listen ADDR (e.g. 127.0.0.1:3001)");
                Ok(None)
            }
        },
    }
}

/// The default metrics address of `flex up` (one process on a laptop).
pub const DEFAULT_UP_METRICS: &str = "127.0.0.1:9090";

/// The listener of `--metrics-listen`: the address given (an error when it cannot be bound), or
/// for `flex up` (`fallback`) the default address, where a busy port only costs a warning.
/// Returns it with its URL.
async fn metrics_listener(
    given: Option<std::net::SocketAddr>,
    fallback: bool,
) -> Result<(Option<TcpListener>, Option<String>)> {
    let listener = match (given, fallback) {
        (Some(addr), _) => Some(bind(addr, "the metrics (--metrics-listen)").await?),
        (None, true) => match TcpListener::bind(DEFAULT_UP_METRICS).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, address = DEFAULT_UP_METRICS, "metrics are off: the default metrics address is busy; give --metrics-listen ADDR (e.g. 127.0.0.1:0)");
                None
            }
        },
        (None, false) => None,
    };
    let url = match &listener {
        Some(l) => Some(format!("http://{}/metrics", l.local_addr()?)),
        None => None,
    };
    Ok((listener, url))
}

/// A planned stop of a proxy: `/readyz` says draining at once, connections are still accepted
/// for the drain delay (load balancers see the 503 and move on), then the listener stops and
/// requests in flight get the grace (`serve_until`).
async fn drain_proxy(store: &SnapshotStore, delay: Duration, stop_accepting: impl FnOnce()) {
    store.start_draining();
    tracing::info!(
        drain_delay_secs = delay.as_secs(),
        "draining: /readyz answers 503; the listener closes after the drain delay"
    );
    tokio::time::sleep(delay).await;
    stop_accepting();
}

/// The embedded proxy's id in the control plane's proxy registry (`flex admin proxies`).
pub const EMBEDDED_PROXY_ID: &str = "embedded";

/// Keeps `store` on the newest snapshot of an in-process control plane: a delta from the version
/// it has (the control plane's change records), a full one when they no longer cover the gap or
/// a delta is refused. Listed by `flex admin proxies` as `embedded` (transport `in-process`),
/// with every version it applies or refuses, like a proxy on gRPC Watch.
pub async fn follow_in_process(cp: Arc<ControlPlane>, store: Arc<SnapshotStore>) {
    let mut rx = cp.subscribe();
    store.set_connected(true, None);
    let _registered = cp.proxies().connect(EMBEDDED_PROXY_ID, "in-process");
    loop {
        let next = rx.borrow_and_update().clone();
        let have = store.load().map_or(0, |s| s.version);
        let behind = next.version > have || store.load().is_none();
        if behind {
            let applied = store
                .apply_update(cp.update_between(have, &next))
                .or_else(|_| {
                    // A refused delta: start again from the full snapshot.
                    store.apply_full(flex_shared::proto::control::Snapshot::clone(&next.full()))
                });
            match applied {
                Ok(v) => cp.ack(EMBEDDED_PROXY_ID, v, true, ""),
                Err(e) => cp.ack(EMBEDDED_PROXY_ID, next.version, false, &e.to_string()),
            }
        }
        if rx.changed().await.is_err() {
            store.set_connected(false, Some("the in-process control plane stopped".into()));
            return;
        }
    }
}

/// The upstream client settings and listener TLS given on the command line.
fn upstream_and_tls(u: &UpstreamArgs) -> Result<(UpstreamConfig, Option<TlsAcceptor>)> {
    let secs = |n: u64, flag: &str| -> Result<Duration> {
        if n == 0 {
            anyhow::bail!("--{flag} must be at least 1 second (got 0); e.g. --{flag} 30");
        }
        Ok(Duration::from_secs(n))
    };
    let upstream = UpstreamConfig {
        extra_ca_file: u.upstream_ca_file.clone(),
        connect_timeout: secs(
            u.upstream_connect_timeout_secs,
            "upstream-connect-timeout-secs",
        )?,
        header_timeout: secs(
            u.upstream_header_timeout_secs,
            "upstream-header-timeout-secs",
        )?,
        idle_timeout: secs(u.upstream_idle_timeout_secs, "upstream-idle-timeout-secs")?,
        total_timeout: secs(u.upstream_total_timeout_secs, "upstream-total-timeout-secs")?,
        keepalive_interval: secs(u.upstream_keepalive_secs, "upstream-keepalive-secs")?,
        streams_per_connection: u.upstream_streams_per_connection.max(1),
        max_sse_event_bytes: u.max_sse_event_kib.max(1).saturating_mul(1024),
        ..UpstreamConfig::default()
    };
    let tls = match (&u.tls_cert, &u.tls_key) {
        (Some(c), Some(k)) => Some(flex_data_plane::server::tls_acceptor(c, k)?),
        _ => None,
    };
    Ok((upstream, tls))
}

/// Connects to NATS with the credentials given. Returns at once and keeps trying in the
/// background (reconnecting forever), so a proxy starts, and spools usage, while NATS is down.
/// Where NATS replies (JetStream API answers, publish acks, pulled messages) go for the control
/// plane's connections, so a NATS account can keep proxies from reading them (see
/// deploy/nats/nats-server.conf).
pub const CONTROL_INBOX: &str = "_INBOX.flex-control";
/// Where NATS replies go for a proxy's connections.
pub const PROXY_INBOX: &str = "_INBOX.flex-proxy";

pub async fn nats_connect(
    url: &str,
    auth: &NatsAuthArgs,
    name: &str,
) -> Result<async_nats::Client> {
    let inbox = if name.starts_with("flex-control") {
        CONTROL_INBOX
    } else {
        PROXY_INBOX
    };
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .custom_inbox_prefix(inbox)
        .max_reconnects(None)
        .retry_on_initial_connect()
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("disconnected from NATS; reconnecting")
                }
                other => tracing::warn!(event = %other, "NATS"),
            }
        });
    if let Some(path) = &auth.nats_creds {
        opts = opts
            .credentials_file(path)
            .await
            .with_context(|| format!("cannot read the NATS credentials file {}", path.display()))?;
    }
    // async-nats takes plain Strings: the secrets leave their SecretString only here.
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
    opts.connect(url).await.with_context(|| {
        format!(
            "invalid --nats-url `{}` (expected e.g. nats://127.0.0.1:4222)",
            redact_url(url)
        )
    })
}

/// How long a planned stop waits for the queued usage to be written (the usage log's writer, or
/// `flex up`'s ledger feed).
const SHUTDOWN_USAGE_FLUSH: Duration = Duration::from_secs(5);
/// How long a planned stop waits for the newest snapshot to be persisted.
const SHUTDOWN_SNAPSHOT_FLUSH: Duration = Duration::from_secs(5);

/// Resolves on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed when this is called (not
/// when it is first polled), so call it early: a signal that comes before then kills the
/// process as before.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let install = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, signal = name, "cannot handle the signal; it stops the process without a clean shutdown");
            None
        }
    };
    let mut int = install(SignalKind::interrupt(), "SIGINT");
    let mut term = install(SignalKind::terminate(), "SIGTERM");
    async move {
        let name = tokio::select! {
            () = next_signal(int.as_mut()) => "SIGINT",
            () = next_signal(term.as_mut()) => "SIGTERM",
        };
        tracing::info!(signal = name, "shutting down");
    }
}

/// The next delivery of `signal`; never, without a handler.
async fn next_signal(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// Waits (bounded) until the newest snapshot is persisted, before a planned exit.
async fn flush_snapshot(store: Arc<SnapshotStore>) {
    let flushed = tokio::task::spawn_blocking(move || store.flush(SHUTDOWN_SNAPSHOT_FLUSH))
        .await
        .unwrap_or(false);
    if !flushed {
        tracing::warn!(
            timeout_ms = SHUTDOWN_SNAPSHOT_FLUSH.as_millis() as u64,
            "the newest snapshot was not persisted in time; the next start loads an older one (and catches up)"
        );
    }
}

/// Lets the usage log's writer write (and fsync) everything queued, then stops it (bounded).
async fn close_usage_log(wal: Arc<UsageWal>) {
    let closed = tokio::task::spawn_blocking(move || {
        let closed = wal.close(SHUTDOWN_USAGE_FLUSH);
        (closed, wal.pending_bytes())
    })
    .await;
    match closed {
        Ok((true, pending_bytes)) => {
            tracing::info!(
                pending_bytes,
                "usage log flushed; undelivered events are replayed at the next start"
            );
        }
        _ => tracing::error!(
            "the usage log could not be flushed before the exit; queued usage events may be lost"
        ),
    }
}

/// A secret from a file (surrounding whitespace is not part of it), for `flag`.
fn read_token_file(path: &std::path::Path, flag: &str) -> Result<SecretString> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {flag} {}: create it with `openssl rand -hex 32 > {} && chmod 600 {}`",
            path.display(),
            path.display(),
            path.display()
        )
    })?;
    let t = text.trim();
    if t.is_empty() {
        bail!(
            "{flag} {} is empty: put a random token in it, e.g. `openssl rand -hex 32 > {}`",
            path.display(),
            path.display()
        );
    }
    Ok(SecretString::from(t.to_string()))
}

/// Creates `dir` owner-only (0700), or narrows an existing one and the files in it (written by
/// earlier builds under the umask) to 0700 and 0600; what cannot be narrowed is warned about.
fn private_dir(dir: &Path, flag: &str) -> Result<()> {
    flex_shared::private_fs::create_dir_all(dir)
        .with_context(|| format!("cannot create {flag} {}", dir.display()))?;
    for (path, e) in flex_shared::private_fs::restrict(dir) {
        tracing::warn!(path = %path.display(), error = %e, "{flag}: cannot make this owner-only (0700 for the directory, 0600 for its files); fix its owner or mode");
    }
    Ok(())
}

/// Takes the advisory lock `DIR/lock` (released when the file is dropped or the process exits,
/// even by a crash): two proxies sharing a state dir would interleave their usage logs and
/// overwrite each other's snapshot, so the second one refuses to start.
pub fn lock_state_dir(dir: &Path) -> Result<std::fs::File> {
    private_dir(dir, "--state-dir")?;
    let path = dir.join("lock");
    let file = flex_shared::private_fs::options()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {} in --state-dir", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "--state-dir {} is in use by another flex proxy (it holds the lock on {}). Each proxy needs a state dir of its own, e.g. --state-dir /var/lib/flex/proxy-2",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// The token a proxy presents to the control service (`--proxy-token-file`), if any.
fn proxy_token(args: &ProxyArgs) -> Result<flex_data_plane::control_client::ProxyToken> {
    match &args.proxy_token_file {
        Some(f) => flex_data_plane::control_client::ProxyToken::new(&read_token_file(
            f,
            "--proxy-token-file",
        )?)
        .map_err(anyhow::Error::msg),
        None => Ok(flex_data_plane::control_client::ProxyToken::none()),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "local".into())
}

pub async fn sim(args: SimArgs) -> Result<()> {
    let listener = bind(args.listen, "the simulator").await?;
    println!(
        "provider simulator listening on http://{}",
        listener.local_addr()?
    );
    let cfg = SimConfig {
        openai_key: args.openai_key,
        anthropic_key: args.anthropic_key,
        gemini_key: args.gemini_key,
        flex_delay_ms: args.flex_delay_ms,
        standard_delay_ms: args.standard_delay_ms,
        priority_delay_ms: args.priority_delay_ms,
        flex_status: args.flex_status,
        tokens_per_sec: args.tokens_per_sec,
        flex_capacity_error_rate: args.flex_capacity_error_rate,
    };
    sim::serve(listener, cfg).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_of_an_earlier_build_is_made_owner_only_at_start() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("proxy-1");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        let seg = state.join("usage-wal.1.jsonl");
        std::fs::write(&seg, "").unwrap();
        std::fs::set_permissions(&seg, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _held = lock_state_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&seg), 0o600);
        assert_eq!(mode(&state.join("lock")), 0o600);
        let fresh = dir.path().join("new/proxy-2");
        let _held2 = lock_state_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&fresh.join("lock")), 0o600);
    }

    #[test]
    fn a_state_dir_serves_one_proxy_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("proxy-1");
        let held = lock_state_dir(&state).unwrap();
        let second = lock_state_dir(&state).unwrap_err().to_string();
        assert!(
            second.contains("is in use by another flex proxy"),
            "{second}"
        );
        assert!(
            second.contains("--state-dir /var/lib/flex/proxy-2"),
            "{second}"
        );
        drop(held);
        lock_state_dir(&state).expect("free again once the first proxy is gone");
    }
}
