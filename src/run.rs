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

fn demo_sim_keys(dir: &Path) -> Result<serde_json::Value> {
    let text = load_or_create(&dir.join("sim-keys.json"), || {
        json!({
            "openai": format!("sk-sim-{}", random_hex(16)),
            "anthropic": format!("sk-ant-sim-{}", random_hex(16)),
            "gemini": format!("AIza-sim-{}", random_hex(16)),
        })
        .to_string()
    })?;
    serde_json::from_str(&text).context("sim-keys.json is corrupt; delete it to regenerate")
}

/// Creates (or finds) the demo org, key and provider keys and writes demo.json.
/// Where a local `flex up` serves what `demo.json` names.
struct DemoUrls<'a> {
    base_url: &'a str,
    admin_endpoint: &'a str,
    admin_token: &'a str,
    /// `None`: no dashboard in this start (the default port was busy).
    dashboard_url: Option<&'a str>,
}

/// The demo org's dashboard user: the one `demo` names when it still exists, else a new owner
/// of `org_id` with a generated password. Sets `dashboard_email` and `dashboard_password`.
async fn ensure_demo_user(
    cp: &ControlPlane,
    org_id: &str,
    demo: &mut serde_json::Value,
) -> Result<()> {
    let known = demo["dashboard_email"]
        .as_str()
        .filter(|_| demo["dashboard_password"].as_str().is_some())
        .is_some_and(|email| cp.find_user(email).is_ok());
    if known {
        return Ok(());
    }
    let password = random_hex(16);
    let meta = Metadata::new("flex-up-demo");
    let user = cp
        .create_user(
            &meta,
            DEMO_USER_EMAIL,
            &SecretString::from(password.clone()),
            Some((org_id, flex_control_plane::domain::Role::Owner)),
        )
        .await
        .with_context(|| format!("cannot create the demo's dashboard user {DEMO_USER_EMAIL}; delete the data dir to start the demo afresh"))?;
    tracing::info!(user_id = %user.user_id, "demo dashboard user created");
    demo["dashboard_email"] = json!(DEMO_USER_EMAIL);
    demo["dashboard_password"] = json!(password);
    Ok(())
}

/// The demo's dashboard account.
pub const DEMO_USER_EMAIL: &str = "demo@example.com";

async fn ensure_demo(
    cp: &ControlPlane,
    dir: &Path,
    urls: &DemoUrls<'_>,
    sim_keys: &serde_json::Value,
) -> Result<serde_json::Value> {
    let DemoUrls {
        base_url,
        admin_endpoint,
        admin_token,
        dashboard_url,
    } = *urls;
    let path = dir.join("demo.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) {
            let org_ok = v["org_id"]
                .as_str()
                .is_some_and(|o| cp.state().orgs.contains_key(o));
            let key_ok = v["api_key"].as_str().is_some_and(|k| {
                cp.snapshot()
                    .api_keys
                    .iter()
                    .any(|e| e.key_hash == flex_shared::keys::hash(k))
            });
            if org_ok && key_ok {
                v["base_url"] = json!(base_url);
                v["admin_endpoint"] = json!(admin_endpoint);
                v["dashboard_url"] = json!(dashboard_url);
                let org_id = v["org_id"].as_str().unwrap_or_default().to_string();
                ensure_demo_user(cp, &org_id, &mut v).await?;
                write_private(&path, &serde_json::to_string_pretty(&v)?)?;
                return Ok(v);
            }
        }
    }
    let meta = Metadata::new("flex-up-demo");
    let org = cp.create_org(&meta, "demo", None).await?.org;
    let key = cp
        .create_api_key(&meta, &org.org_id, "demo", None, None)
        .await?;
    let secret = key
        .secret
        .as_ref()
        .map(|s| s.expose_secret().to_string())
        .unwrap_or_default();
    for provider in ["openai", "anthropic", "gemini"] {
        if let Some(k) = sim_keys[provider].as_str() {
            cp.set_provider_key(
                &meta,
                &org.org_id,
                provider,
                &SecretString::from(k.to_string()),
            )
            .await?;
        }
    }
    let mut v = json!({
        "base_url": base_url,
        "api_key": secret,
        "org_id": org.org_id,
        "admin_endpoint": admin_endpoint,
        "admin_token": admin_token,
        "dashboard_url": dashboard_url,
    });
    ensure_demo_user(cp, &org.org_id, &mut v).await?;
    write_private(&path, &serde_json::to_string_pretty(&v)?)?;
    Ok(v)
}

pub async fn up(args: UpArgs) -> Result<()> {
    let dir = &args.data_dir;
    private_dir(dir, "--data-dir")?;
    let token = load_or_create(&dir.join("admin-token"), || format!("{}\n", random_hex(32)))?
        .trim()
        .to_string();
    let key_path = dir.join("master.key");
    // The key file's text, wiped at once: the keyring reads the file itself.
    drop(secrecy::zeroize::Zeroizing::new(load_or_create(
        &key_path,
        MasterKeyring::generate_file_text,
    )?));
    let keyring = Arc::new(MasterKeyring::load(&key_path)?);
    let db = format!("sqlite://{}?mode=rwc", dir.join("flex.db").display());
    let cp = Arc::new(
        ControlPlane::open(&db, keyring.clone())
            .await?
            .with_master_key_file(&key_path),
    );

    let admin_listener = bind(args.admin_listen, "the admin API").await?;
    let admin_endpoint = format!("http://{}", admin_listener.local_addr()?);
    // `flex admin --data-dir DIR` reads the endpoint from here (and the token from admin-token).
    write_private(&dir.join("admin-endpoint"), &format!("{admin_endpoint}\n"))?;
    let token_secret = SecretString::from(token.clone());
    {
        let cp = cp.clone();
        tokio::spawn(async move {
            if let Err(e) = cp
                .serve_with_listener(admin_listener, &token_secret, std::future::pending())
                .await
            {
                tracing::error!(error = %e, "admin API stopped");
            }
        });
    }

    // Bound now, so a given address in use fails before anything else starts.
    let dashboard_listener = up_dashboard_listener(args.dashboard_listen).await?;
    let dashboard_url = match (&dashboard_listener, &args.dashboard_url) {
        (None, _) => None,
        (Some(_), Some(u)) => Some(u.clone()),
        (Some(l), None) => Some(format!("http://{}", l.local_addr()?)),
    };
    // The embedded proxy's no_byok_key and payment_required link to the dashboard's pages.
    flex_data_plane::error::set_dashboard_url(dashboard_url.as_deref());

    let needs_sim = args.demo
        && (args.upstream.openai_base_url.is_none()
            || args.upstream.anthropic_base_url.is_none()
            || args.upstream.gemini_base_url.is_none());
    let sim_keys = if args.demo {
        Some(demo_sim_keys(dir)?)
    } else {
        None
    };
    let sim = match (&sim_keys, needs_sim) {
        (Some(k), true) => Some(
            sim::spawn(SimConfig {
                openai_key: k["openai"].as_str().map(str::to_string),
                anthropic_key: k["anthropic"].as_str().map(str::to_string),
                gemini_key: k["gemini"].as_str().map(str::to_string),
                flex_delay_ms: 1500,
                standard_delay_ms: 200,
                ..SimConfig::default()
            })
            .await?,
        ),
        _ => None,
    };
    let urls = base_urls(
        &args.upstream,
        sim.as_ref()
            .map(|s| (s.openai_base_url(), s.base_url()))
            .as_ref()
            .map(|(a, b)| (a.as_str(), b.as_str())),
    );

    let listener = bind(args.listen, "the proxy").await?;
    let scheme = if args.upstream.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let base_url = format!("{scheme}://{}/v1", listener.local_addr()?);
    let (upstream, tls) = upstream_and_tls(&args.upstream)?;
    let (metrics_listener, metrics_url) =
        metrics_listener(args.metrics.metrics_listen, true).await?;
    let limits = limits_of(&args.limits, EMBEDDED_PROXY_ID, true)?;
    cp.set_limit_counters(Arc::new(SharedCounters(limits.limiter())));
    // From here on SIGINT and SIGTERM stop the process cleanly.
    let stop = shutdown_signal();
    let (drain, drained) = tokio::sync::oneshot::channel::<()>();
    let (store, server, feed) = embedded_proxy_until(
        &cp,
        // No state dir: the control plane runs in this process, so the proxy always starts from
        // it, never from a persisted snapshot (nothing to write on every update).
        SnapshotStore::new(Some(keyring), None).with_key_file(Some(key_path.clone())),
        listener,
        &upstream,
        ProxyConfig {
            // One exposition for the whole process: the proxy's series and the control plane's.
            extra_metrics: Some(ExtraMetrics(Arc::new({
                let cp = cp.clone();
                move |out: &mut String| {
                    flex_control_plane::metrics::metrics().encode_into(out, &cp.proxies().list());
                }
            }))),
            limits,
            metrics: metrics_listener.is_some(),
            listener: listener_config(&args.listener)?,
            ..proxy_config(&args.upstream, urls)
        },
        tls,
        async {
            let _ = drained.await;
        },
        Duration::from_secs(args.drain.shutdown_grace_secs),
        metrics_listener,
    )?;

    if let (Some(dashboard_listener), Some(url)) = (dashboard_listener, &dashboard_url) {
        let cp = cp.clone();
        let cfg = DashboardConfig::new(url).with_api_base_url(&base_url);
        tokio::spawn(async move {
            if let Err(e) = cp
                .serve_dashboard(dashboard_listener, cfg, std::future::pending())
                .await
            {
                tracing::error!(error = %e, "dashboard stopped");
            }
        });
    }

    println!("FlexInference is up.");
    println!("  API:       {base_url}");
    if let Some(url) = &dashboard_url {
        println!("  dashboard: {url}");
    }
    if let Some(url) = &metrics_url {
        println!("  metrics:   {url}");
    }
    println!(
        "  admin:     {admin_endpoint}  (token in {})",
        dir.join("admin-token").display()
    );
    if let (true, Some(keys)) = (args.demo, &sim_keys) {
        let urls = DemoUrls {
            base_url: &base_url,
            admin_endpoint: &admin_endpoint,
            admin_token: &token,
            dashboard_url: dashboard_url.as_deref(),
        };
        let mut demo = ensure_demo(&cp, dir, &urls, keys).await?;
        // Where this start serves its metrics (null when the default port was busy).
        demo["metrics_url"] = json!(metrics_url);
        write_private(
            &dir.join("demo.json"),
            &serde_json::to_string_pretty(&demo)?,
        )?;
        if let Some(s) = &sim {
            println!(
                "  simulator: {} (flex starts after 1.5 s, standard after 0.2 s)",
                s.base_url()
            );
        }
        println!(
            "  demo:      {} (org {})",
            dir.join("demo.json").display(),
            demo["org_id"].as_str().unwrap_or("")
        );
        if let Some(url) = &dashboard_url {
            println!(
                "  sign in:   {url} as {} with password {} (also in demo.json)",
                demo["dashboard_email"].as_str().unwrap_or(""),
                demo["dashboard_password"].as_str().unwrap_or("")
            );
        }
        println!();
        println!("Try it (flex wins; put \"#sim flex_delay_ms=20000\" in the input to see standard take over):");
        println!(
            "  curl -s {base_url}/responses -H \"Authorization: Bearer $(jq -r .api_key {})\" -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"gpt-5.5\", \"input\": \"Hello!\", \"start_within\": \"00h-00m-10s\"}}'",
            dir.join("demo.json").display()
        );
    }
    stop.await;
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
    // The answers are out; their usage must reach the ledger before the process ends.
    feed.flush(SHUTDOWN_USAGE_FLUSH).await;
    flush_snapshot(store).await;
    Ok(())
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

/// The admin token and the master key file `flex control` cannot run without, or an error that
/// says how to give them.
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
