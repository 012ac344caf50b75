//! The `flex` command line. Every flag also reads `FLEX_<FLAG>` from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use secrecy::SecretString;

use crate::admin_cli::AdminArgs;
use crate::telemetry::OtlpArgs;

#[derive(Debug, Parser)]
#[command(
    name = "flex",
    version,
    about = "FlexInference: a deadline-aware, multi-tenant LLM inference router"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant (`proxy`'s flags) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Everything in one process on embedded defaults (SQLite, in-process bus, one proxy).
    Up(UpArgs),
    /// The control plane: event log, admin API, snapshot Watch.
    Control(ControlArgs),
    /// A stateless data-plane proxy.
    Proxy(ProxyArgs),
    /// Operator commands over the admin API.
    Admin(AdminArgs),
    /// The provider simulator (OpenAI, Anthropic and Gemini wire formats).
    Sim(SimArgs),
    /// Make keys: `flex keygen snapshot-signing` (the control plane's snapshot signing key).
    Keygen(KeygenArgs),
}

/// Provider base URLs and upstream TLS, shared by `up` and `proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// OpenAI base URL (the SDK convention, including /v1).
    #[arg(long, env = "FLEX_OPENAI_BASE_URL")]
    pub openai_base_url: Option<String>,
    /// Anthropic base URL.
    #[arg(long, env = "FLEX_ANTHROPIC_BASE_URL")]
    pub anthropic_base_url: Option<String>,
    /// Gemini base URL (the proxy appends /v1beta/models/…).
    #[arg(long, env = "FLEX_GEMINI_BASE_URL")]
    pub gemini_base_url: Option<String>,
    /// Extra PEM CA certificates to trust for upstream HTTPS (besides the webpki roots).
    #[arg(long, env = "FLEX_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// Serve the proxy over TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "FLEX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "FLEX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Largest request body accepted, in MiB.
    #[arg(long, env = "FLEX_MAX_BODY_MIB", default_value_t = 32)]
    pub max_body_mib: usize,
    /// Longest wait for a provider's response headers, in seconds (a flex attempt in a race is
    /// also bounded by the deadline).
    #[arg(long, env = "FLEX_UPSTREAM_HEADER_TIMEOUT_SECS", default_value_t = 120)]
    pub upstream_header_timeout_secs: u64,
    /// Longest silence between two events of a provider's stream (or two body frames), in
    /// seconds; past it the answer is cut off and reported `upstream_incomplete`.
    #[arg(long, env = "FLEX_UPSTREAM_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    pub upstream_idle_timeout_secs: u64,
    /// Longest time for a whole upstream answer, in seconds.
    #[arg(long, env = "FLEX_UPSTREAM_TOTAL_TIMEOUT_SECS", default_value_t = 3600)]
    pub upstream_total_timeout_secs: u64,
    /// Longest wait to connect to a provider, in seconds.
    #[arg(long, env = "FLEX_UPSTREAM_CONNECT_TIMEOUT_SECS", default_value_t = 10)]
    pub upstream_connect_timeout_secs: u64,
    /// Interval of HTTP/2 keep-alive pings to providers, in seconds (a ping unanswered for 10 s
    /// closes the connection).
    #[arg(long, env = "FLEX_UPSTREAM_KEEPALIVE_SECS", default_value_t = 20)]
    pub upstream_keepalive_secs: u64,
    /// Requests carried by one HTTP/2 connection to a provider at a time before another
    /// connection is opened (match the provider's SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(
        long,
        env = "FLEX_UPSTREAM_STREAMS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub upstream_streams_per_connection: usize,
    /// Largest non-streaming provider body read, and largest stream assembled into one body for
    /// a non-streaming caller, in MiB; a longer one is cut off and reported
    /// `upstream_incomplete`.
    #[arg(long, env = "FLEX_MAX_RESPONSE_MIB", default_value_t = 64)]
    pub max_response_mib: usize,
    /// Most messages (Chat Completions, Messages) or input items (Responses, Interactions) in
    /// one request; more get a 400 `too_many_messages`.
    #[arg(long, env = "FLEX_MAX_MESSAGES", default_value_t = 10_000)]
    pub max_messages: usize,
    /// Most tools declared in one request; more get a 400 `too_many_tools`.
    #[arg(long, env = "FLEX_MAX_TOOLS", default_value_t = 1_024)]
    pub max_tools: usize,
    /// Also export requests and spend per org (`flex_org_requests_total{org}`,
    /// `flex_org_cost_micros_total{org}`) for at most this many orgs, the rest as
    /// `org="_other"`; 0 (the default) exports no org label at all.
    #[arg(long, env = "FLEX_METRICS_ORG_LABEL_MAX", default_value_t = 0)]
    pub metrics_org_label_max: usize,
    /// Largest single event of a provider's stream, in KiB (OpenAI's final event carries the
    /// whole response); a larger one cuts the answer off, reported `upstream_incomplete`.
    #[arg(long, env = "FLEX_MAX_SSE_EVENT_KIB", default_value_t = 16 * 1024)]
    pub max_sse_event_kib: usize,
}

/// The proxy listener's limits, shared by `up` and `proxy` (docs/security.md, "Listener
/// limits"). Every limit must be at least 1.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenerArgs {
    /// Longest wait for a request's headers, in seconds: an HTTP/1.1 connection waiting for a
    /// request (new, or idle between keep-alive requests) is closed if the whole head has not
    /// arrived within it, and a new connection (HTTP/1.1 or HTTP/2, after TLS) must start its
    /// first request within it (slowloris, a stalled HTTP/2 preface).
    #[arg(long, env = "FLEX_HEADER_READ_TIMEOUT_SECS", default_value_t = 15)]
    pub header_read_timeout_secs: u64,
    /// Longest TLS handshake on the API port (with --tls-cert), in seconds.
    #[arg(long, env = "FLEX_TLS_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub tls_handshake_timeout_secs: u64,
    /// A connection with no request in flight for this many seconds is closed (HTTP/2 with a
    /// GOAWAY); an idle HTTP/1.1 connection is also closed by --header-read-timeout-secs,
    /// whichever is shorter.
    #[arg(long, env = "FLEX_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// The whole request body must arrive within this many seconds of its headers, else 408
    /// `body_read_timeout` (32 MiB in 300 s needs about 1 Mbit/s).
    #[arg(long, env = "FLEX_BODY_READ_TIMEOUT_SECS", default_value_t = 300)]
    pub body_read_timeout_secs: u64,
    /// Most connections open at once on the API port. At the cap the proxy stops accepting
    /// (new connections wait in the kernel's accept queue) until one closes; counted in
    /// flex_listener_saturated_total. Keep the open-files limit above it (LimitNOFILE).
    #[arg(long, env = "FLEX_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Threads that serve the API's connections, each with its own runtime and its own
    /// connections to the providers, so a request never hops between threads (default: one per
    /// CPU). 0 serves them on the process's shared runtime.
    #[arg(long, env = "FLEX_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Most HTTP/2 streams (requests in flight) per caller connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS); a client opens another connection for more.
    #[arg(long, env = "FLEX_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    pub http2_max_concurrent_streams: u32,
    /// Interval of HTTP/2 keep-alive pings to callers, in seconds; a ping unanswered for as
    /// long again closes the connection (a dead peer holding its streams).
    #[arg(long, env = "FLEX_HTTP2_KEEPALIVE_SECS", default_value_t = 20)]
    pub http2_keepalive_secs: u64,
}

/// Where Prometheus metrics are served, shared by every process.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics (`flex_*`, OpenMetrics text) at http://ADDR/metrics, never on
    /// the public API port. `flex up` uses 127.0.0.1:9090 when not given (and goes on without
    /// metrics, with a warning, if that port is busy); `flex proxy` and `flex control` serve
    /// none unless given.
    #[arg(long, env = "FLEX_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

/// How a planned stop (SIGTERM, Ctrl-C) drains the proxy, shared by `up` and `proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct DrainArgs {
    /// On SIGTERM or Ctrl-C, `/readyz` answers 503 at once; the proxy keeps accepting
    /// connections for this many seconds (so load balancers move on), then stops accepting.
    #[arg(long, env = "FLEX_DRAIN_DELAY_SECS", default_value_t = 5)]
    pub drain_delay_secs: u64,
    /// Then, how long requests in flight (races and streams included) may take to finish, in
    /// seconds, before they are cut off. The default covers a 10-minute `start_within` plus a
    /// minute of answer.
    #[arg(long, env = "FLEX_SHUTDOWN_GRACE_SECS", default_value_t = 660)]
    pub shutdown_grace_secs: u64,
}

/// NATS credentials (give at most one kind) and TLS, shared by `control` and `proxy`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsAuthArgs {
    /// NATS credentials file (JWT + NKey seed, as `nsc` writes it).
    #[arg(long, env = "FLEX_NATS_CREDS", conflicts_with_all = ["nats_user", "nats_token", "nats_token_file"])]
    pub nats_creds: Option<PathBuf>,
    /// NATS user (with --nats-password or --nats-password-file).
    #[arg(
        long,
        env = "FLEX_NATS_USER",
        requires = "nats_password_source",
        conflicts_with_all = ["nats_token", "nats_token_file"]
    )]
    pub nats_user: Option<String>,
    /// NATS password for --nats-user (visible in `ps`: prefer --nats-password-file).
    #[arg(
        long,
        env = "FLEX_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user",
        group = "nats_password_source",
        value_parser = secret
    )]
    pub nats_password: Option<SecretString>,
    /// A file holding the NATS password for --nats-user (surrounding whitespace ignored).
    #[arg(
        long,
        env = "FLEX_NATS_PASSWORD_FILE",
        requires = "nats_user",
        group = "nats_password_source",
        conflicts_with = "nats_password"
    )]
    pub nats_password_file: Option<PathBuf>,
    /// NATS token (visible in `ps`: prefer --nats-token-file).
    #[arg(long, env = "FLEX_NATS_TOKEN", hide_env_values = true, value_parser = secret)]
    pub nats_token: Option<SecretString>,
    /// A file holding the NATS token (surrounding whitespace ignored).
    #[arg(long, env = "FLEX_NATS_TOKEN_FILE", conflicts_with = "nats_token")]
    pub nats_token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for NATS over TLS (default: the system roots). Any of
    /// --nats-ca/--nats-cert makes TLS required.
    #[arg(long, env = "FLEX_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// PEM client certificate for NATS servers that verify clients (`tls { verify: true }`).
    #[arg(long, env = "FLEX_NATS_CERT", requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,
    /// PEM private key for --nats-cert.
    #[arg(long, env = "FLEX_NATS_KEY", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
}

/// Where limit counters live, and what happens when they cannot be reached (`up` and `proxy`).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitsArgs {
    /// Redis for the rate-limit, concurrency and budget counters the proxies share, e.g.
    /// redis://127.0.0.1:6379 (redis://:PASSWORD@HOST:6379/DB). Without it each process counts
    /// on its own: exact for one proxy, but every proxy of a fleet then allows the whole limit.
    #[arg(long, env = "FLEX_REDIS_URL")]
    pub redis_url: Option<String>,
    /// When Redis cannot be reached: `open` admits requests under a limit on this proxy's share
    /// of it (the limit divided by the proxies last seen in Redis; counted in
    /// limits_fail_open_total), `closed` refuses them (503 limits_unavailable). Requests without
    /// limits are never affected; either way the proxy counts in Redis again once it answers.
    #[arg(long, env = "FLEX_LIMITS_FAIL", default_value = "open", value_parser = ["open", "closed"])]
    pub limits_fail: String,
    /// The longest wait for Redis on one admission, in ms; that request then follows
    /// --limits-fail, and three in a row (or a refused connection) make Redis unreachable.
    #[arg(long, env = "FLEX_REDIS_TIMEOUT_MS", default_value_t = 250)]
    pub redis_timeout_ms: u64,
    /// How long a request's concurrency slot and budget reservation outlive a proxy that died
    /// holding them, in seconds (live proxies refresh theirs every third of it).
    #[arg(long, env = "FLEX_LIMITS_LEASE_TTL_SECS", default_value_t = 30)]
    pub limits_lease_ttl_secs: u64,
    /// The number of proxies sharing the limits, for the local shares of --limits-fail open
    /// (default: the proxies seen in Redis in the last lease TTL).
    #[arg(long, env = "FLEX_LIMITS_FLEET_SIZE")]
    pub limits_fleet_size: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Also start the provider simulator and create a ready-to-use `demo` org.
    #[arg(long, env = "FLEX_DEMO")]
    pub demo: bool,
    /// Where the database, admin token, master key and demo.json live.
    #[arg(long, env = "FLEX_DATA_DIR", default_value = ".flex")]
    pub data_dir: PathBuf,
    /// Proxy listen address (API under /v1).
    #[arg(long, env = "FLEX_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Admin gRPC listen address.
    #[arg(long, env = "FLEX_ADMIN_LISTEN", default_value = "127.0.0.1:50051")]
    pub admin_listen: SocketAddr,
    /// Dashboard listen address (the web UI: sign up, keys, provider keys, usage, billing).
    /// Default 127.0.0.1:3000 (if that port is busy, `flex up` goes on without the dashboard,
    /// with a warning; a given address must be free).
    #[arg(long, env = "FLEX_DASHBOARD_LISTEN")]
    pub dashboard_listen: Option<SocketAddr>,
    /// The dashboard's public URL, when it is not http://DASHBOARD_LISTEN (e.g. behind a
    /// reverse proxy); https:// makes its cookies Secure.
    #[arg(long, env = "FLEX_DASHBOARD_URL", value_parser = parse_dashboard_url)]
    pub dashboard_url: Option<String>,
    #[command(flatten)]
    pub listener: ListenerArgs,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    #[command(flatten)]
    pub limits: LimitsArgs,
    #[command(flatten)]
    pub drain: DrainArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub otlp: OtlpArgs,
}

/// A dashboard URL: `http(s)://HOST[:PORT]`, served at the root of its origin (no path).
pub fn parse_dashboard_url(s: &str) -> Result<String, String> {
    let t = s.trim().trim_end_matches('/');
    let rest = t
        .strip_prefix("https://")
        .or_else(|| t.strip_prefix("http://"))
        .ok_or_else(|| format!("`{t}` is not an http:// or https:// URL; give the dashboard's address as users open it, e.g. https://dashboard.example.com"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
        return Err(format!("`{t}` must be just a scheme and host (and port): the dashboard is served at the root of its origin, e.g. https://dashboard.example.com"));
    }
    Ok(t.to_string())
}

#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// postgres://USER@HOST:5432/DB or sqlite://PATH?mode=rwc
    #[arg(long, env = "FLEX_DATABASE_URL")]
    pub database_url: String,
    /// NATS URL: usage from the proxies is consumed from JetStream (stream FLEX_USAGE) into the
    /// ledger, every new ledger row is published once to JetStream (stream FLEX_LEDGER, for
    /// analytics), and every snapshot version is published to JetStream (stream FLEX_SNAPSHOTS).
    #[arg(long, env = "FLEX_NATS_URL")]
    pub nats_url: Option<String>,
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
    /// gRPC listen address (admin API and the proxies' Watch).
    #[arg(long, env = "FLEX_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// The admin token operators must present (required: this, or --admin-token-file; on the
    /// command line it is visible in `ps`, so prefer the file or the variable).
    #[arg(long, env = "FLEX_ADMIN_TOKEN", hide_env_values = true, value_parser = secret)]
    pub admin_token: Option<SecretString>,
    /// A file holding the admin token (surrounding whitespace ignored).
    #[arg(long, env = "FLEX_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,
    /// Master key file: 64 hex characters, or `key_id=hex` lines (first = active); required, by
    /// flag or env.
    #[arg(long, env = "FLEX_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Serve gRPC (admin API and the proxies' Watch) over TLS with this PEM certificate chain
    /// (needs --tls-key).
    #[arg(long, env = "FLEX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "FLEX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// mTLS: PEM CA that signs the proxies' client certificates. Only proxies with such a
    /// certificate can Watch, Ack and report usage; the admin API still takes the admin token.
    #[arg(long, env = "FLEX_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// A file holding the token every proxy must present on Watch, Ack and ReportUsage
    /// (`authorization: Bearer TOKEN`); give each proxy the same file as --proxy-token-file.
    /// Either this or --client-ca proves a proxy (both may be given).
    #[arg(long, env = "FLEX_PROXY_TOKEN_FILE")]
    pub proxy_token_file: Option<PathBuf>,
    /// Serve the control service on a non-loopback --listen with neither --client-ca nor
    /// --proxy-token-file: anyone who reaches the port can then read every snapshot and write
    /// usage for any org. Only for a network where every host is trusted.
    #[arg(long, env = "FLEX_INSECURE")]
    pub insecure: bool,
    /// Serve the dashboard (the web UI where users sign up and manage their keys, provider
    /// keys, usage and billing) on this address; without it there is no dashboard.
    #[arg(long, env = "FLEX_DASHBOARD_LISTEN")]
    pub dashboard_listen: Option<SocketAddr>,
    /// The dashboard's public URL, e.g. https://dashboard.example.com (invite links; https://
    /// makes its cookies Secure, for a TLS-terminating reverse proxy in front of it). Default:
    /// http://DASHBOARD_LISTEN.
    #[arg(long, env = "FLEX_DASHBOARD_URL", requires = "dashboard_listen", value_parser = parse_dashboard_url)]
    pub dashboard_url: Option<String>,
    /// The proxies' public API base URL, shown in the dashboard's quickstart, e.g.
    /// https://api.example.com/v1.
    #[arg(long, env = "FLEX_API_BASE_URL", requires = "dashboard_listen")]
    pub api_base_url: Option<String>,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// The Redis the proxies count limits in (their --redis-url): `flex admin limits show`
    /// then reports requests, tokens and requests in flight against each limit, and every 15 s
    /// the budgets' spend in Redis is raised to the ledger's where Redis holds less (a Redis
    /// that restarted empty).
    #[arg(long, env = "FLEX_REDIS_URL")]
    pub redis_url: Option<String>,
    #[command(flatten)]
    pub otlp: OtlpArgs,
    #[command(flatten)]
    pub snapshot_signing: SnapshotSigningArgs,
}

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Control plane gRPC URL, e.g. http://127.0.0.1:50051 (https://… when it serves TLS).
    #[arg(long, env = "FLEX_CONTROL_URL")]
    pub control_url: Option<String>,
    /// PEM CA certificate(s) to trust for an https:// --control-url (default: the public
    /// webpki roots).
    #[arg(long, env = "FLEX_CONTROL_CA", requires = "control_url")]
    pub control_ca: Option<PathBuf>,
    /// PEM client certificate presented to the control plane (mTLS: signed by its --client-ca).
    #[arg(
        long,
        env = "FLEX_CONTROL_CERT",
        requires = "control_key",
        requires = "control_url"
    )]
    pub control_cert: Option<PathBuf>,
    /// PEM private key for --control-cert.
    #[arg(long, env = "FLEX_CONTROL_KEY", requires = "control_cert")]
    pub control_key: Option<PathBuf>,
    /// Name to verify in the control plane's certificate when it differs from the URL's host.
    #[arg(long, env = "FLEX_CONTROL_SERVER_NAME", requires = "control_url")]
    pub control_server_name: Option<String>,
    /// A file holding the token to present to the control plane (`authorization: Bearer`):
    /// the same file as the control plane's --proxy-token-file.
    #[arg(long, env = "FLEX_PROXY_TOKEN_FILE", requires = "control_url")]
    pub proxy_token_file: Option<PathBuf>,
    /// NATS URL: usage goes to JetStream (spooled in --state-dir while NATS is down) instead of
    /// the control plane's gRPC; snapshots follow JetStream (stream FLEX_SNAPSHOTS). At least one
    /// of --control-url and --nats-url is required.
    #[arg(long, env = "FLEX_NATS_URL")]
    pub nats_url: Option<String>,
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
    /// Most undelivered usage kept in the usage log under --state-dir, in MiB (past it, new
    /// events are dropped, logged and counted in /metrics).
    #[arg(long, env = "FLEX_USAGE_SPOOL_MAX_MIB", default_value_t = 1024)]
    pub usage_spool_max_mib: u64,
    /// With --state-dir: longest wait, in ms, for a request's usage event to be durable in the
    /// usage log before the end of its answer is sent anyway (counted in /metrics); 0: answers
    /// never wait (events are still written, a crash may lose the last few).
    #[arg(long, env = "FLEX_USAGE_DURABLE_WAIT_MS", default_value_t = 200)]
    pub usage_durable_wait_ms: u64,
    #[command(flatten)]
    pub drain: DrainArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[arg(long, env = "FLEX_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the last good snapshot is kept for a warm start, and the usage write-ahead log:
    /// each request's usage event is durable here before its answer ends, and is replayed
    /// after a restart. Without it usage waits in memory only.
    #[arg(long, env = "FLEX_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Master key file to decrypt provider keys.
    #[arg(long, env = "FLEX_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// The dashboard's public URL (as `flex control --dashboard-url`): errors that a user fixes
    /// there (`no_byok_key`, `payment_required`) link to its page.
    #[arg(long, env = "FLEX_DASHBOARD_URL", value_parser = parse_dashboard_url)]
    pub dashboard_url: Option<String>,
    /// This proxy's id as the control plane lists it (default: the common name of
    /// --control-cert, else proxy-<hostname>-<pid>). With mutual TLS it must be the
    /// certificate's common name: the control plane refuses another.
    #[arg(long, env = "FLEX_PROXY_ID")]
    pub proxy_id: Option<String>,
    #[command(flatten)]
    pub listener: ListenerArgs,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    #[command(flatten)]
    pub limits: LimitsArgs,
    #[command(flatten)]
    pub otlp: OtlpArgs,
    #[command(flatten)]
    pub snapshot_trust: SnapshotTrustArgs,
}

/// `flex control`: signing the snapshots it sends, and heartbeats on an idle feed.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotSigningArgs {
    /// Sign every snapshot update (full, delta, heartbeat; gRPC Watch and NATS) with this
    /// Ed25519 private key: a file of 64 hex characters (the 32-byte seed), e.g. from `flex
    /// keygen snapshot-signing` or `openssl rand -hex 32`. Proxies given the public key
    /// (--snapshot-public-key-file) refuse anything else. Without it updates are unsigned.
    #[arg(long, env = "FLEX_SNAPSHOT_SIGNING_KEY_FILE")]
    pub snapshot_signing_key_file: Option<PathBuf>,
    /// Seconds between heartbeats on an idle snapshot feed: an empty update with a fresh
    /// produced_at, so a proxy's snapshot age says how long it has not heard from the control
    /// plane. Keep it well below the proxies' --max-snapshot-age-secs (a third or less); 0: none.
    #[arg(long, env = "FLEX_SNAPSHOT_HEARTBEAT_SECS", default_value_t = 30)]
    pub snapshot_heartbeat_secs: u64,
}

/// `flex proxy`: which snapshots to trust, and for how long.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotTrustArgs {
    /// The control plane's snapshot public key (64 hex characters, from `flex keygen
    /// snapshot-signing`): every update, and the snapshot persisted in --state-dir, must carry
    /// its valid signature or it is refused (the last good snapshot keeps serving). Without it
    /// anyone who can publish on the snapshot subjects or impersonate the control plane can
    /// change what this proxy accepts.
    #[arg(long, env = "FLEX_SNAPSHOT_PUBLIC_KEY_FILE")]
    pub snapshot_public_key_file: Option<PathBuf>,
    /// Fail closed when the snapshot served was produced longer ago than this many seconds
    /// (the control plane refreshes it every --snapshot-heartbeat-secs, 30 by default): API
    /// requests get 503 `snapshot_too_old` and /readyz is 503 until a fresh update arrives, so
    /// a proxy cut off from the control plane stops accepting keys revoked meanwhile. 0: off.
    #[arg(long, env = "FLEX_MAX_SNAPSHOT_AGE_SECS", default_value_t = 0)]
    pub max_snapshot_age_secs: u64,
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    #[command(subcommand)]
    pub what: KeygenCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeygenCommand {
    /// The control plane's Ed25519 snapshot signing key: writes the private key file (mode
    /// 0600; kept if it exists, so this also derives the public key of an existing one) and
    /// the public key file, 64 hex characters each.
    SnapshotSigning {
        /// The private key file (for `flex control --snapshot-signing-key-file`).
        #[arg(long, env = "FLEX_SNAPSHOT_SIGNING_KEY_FILE")]
        snapshot_signing_key_file: PathBuf,
        /// The public key file (for `flex proxy --snapshot-public-key-file`).
        #[arg(long, env = "FLEX_SNAPSHOT_PUBLIC_KEY_FILE")]
        snapshot_public_key_file: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    #[arg(long, env = "FLEX_LISTEN", default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// Refuse any other OpenAI key (401 in OpenAI's envelope).
    #[arg(long, env = "FLEX_OPENAI_KEY", hide_env_values = true)]
    pub openai_key: Option<String>,
    #[arg(long, env = "FLEX_ANTHROPIC_KEY", hide_env_values = true)]
    pub anthropic_key: Option<String>,
    #[arg(long, env = "FLEX_GEMINI_KEY", hide_env_values = true)]
    pub gemini_key: Option<String>,
    /// Delay before the flex tier starts answering, ms.
    #[arg(long, env = "FLEX_FLEX_DELAY_MS", default_value_t = 0)]
    pub flex_delay_ms: u64,
    /// Delay before the standard tier starts answering, ms.
    #[arg(long, env = "FLEX_STANDARD_DELAY_MS", default_value_t = 50)]
    pub standard_delay_ms: u64,
    /// Delay before the priority tier starts answering, ms.
    #[arg(long, env = "FLEX_PRIORITY_DELAY_MS", default_value_t = 20)]
    pub priority_delay_ms: u64,
    /// Status the flex tier answers with when out of capacity (e.g. 429).
    #[arg(long, env = "FLEX_FLEX_STATUS")]
    pub flex_status: Option<u16>,
    /// Share of flex requests refused for capacity (0.0–1.0).
    #[arg(long, env = "FLEX_FLEX_CAPACITY_ERROR_RATE", default_value_t = 0.0)]
    pub flex_capacity_error_rate: f64,
    /// Output token rate; 0 = as fast as possible.
    #[arg(long, env = "FLEX_TOKENS_PER_SEC", default_value_t = 0)]
    pub tokens_per_sec: u64,
}

/// A secret given as a flag value: held as a [`SecretString`] from the moment it is parsed.
fn secret(s: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(s.to_string()))
}

/// The secret in `path`, for `flag`: surrounding whitespace (a trailing newline) is not part of
/// it; a missing, unreadable or empty file is an error naming the flag and the file.
pub fn read_secret_file(path: &std::path::Path, flag: &str) -> anyhow::Result<SecretString> {
    let text = secrecy::zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {flag} {}: {e}. Create it with e.g. `openssl rand -hex 32 > {} && chmod 600 {}`",
            path.display(),
            path.display(),
            path.display()
        )
    })?);
    let t = text.trim();
    if t.is_empty() {
        anyhow::bail!(
            "{flag} {} is empty: put the secret in it, e.g. `openssl rand -hex 32 > {}`",
            path.display(),
            path.display()
        );
    }
    Ok(SecretString::from(t.to_string()))
}

/// A secret given either as `value` (a flag or variable) or in `file` (its `-file` flag).
pub fn secret_from(
    value: Option<&SecretString>,
    file: Option<&std::path::Path>,
    file_flag: &str,
) -> anyhow::Result<Option<SecretString>> {
    match (value, file) {
        (_, Some(path)) => read_secret_file(path, file_flag).map(Some),
        (Some(v), None) => Ok(Some(v.clone())),
        (None, None) => Ok(None),
    }
}

impl NatsAuthArgs {
    /// The NATS password, from --nats-password or --nats-password-file.
    pub fn password(&self) -> anyhow::Result<Option<SecretString>> {
        secret_from(
            self.nats_password.as_ref(),
            self.nats_password_file.as_deref(),
            "--nats-password-file",
        )
    }

    /// The NATS token, from --nats-token or --nats-token-file.
    pub fn token(&self) -> anyhow::Result<Option<SecretString>> {
        secret_from(
            self.nats_token.as_ref(),
            self.nats_token_file.as_deref(),
            "--nats-token-file",
        )
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Flags whose variable carries the command's name, to tell it from another command's flag.
    const RENAMED: &[(&str, &str)] = &[
        ("admin endpoint", "FLEX_ADMIN_ENDPOINT"),
        ("admin ca", "FLEX_ADMIN_CA"),
        ("admin token", "FLEX_ADMIN_TOKEN"),
        ("admin token-file", "FLEX_ADMIN_TOKEN_FILE"),
    ];

    fn check(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        let top = path.split(' ').nth(1).unwrap_or_default();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            if matches!(long, "help" | "version") {
                continue;
            }
            let expected = RENAMED
                .iter()
                .find(|(flag, _)| *flag == format!("{top} {long}"))
                .map(|(_, env)| env.to_string())
                .unwrap_or_else(|| format!("FLEX_{}", long.replace('-', "_").to_uppercase()));
            let got = arg.get_env().and_then(|e| e.to_str());
            if got != Some(expected.as_str()) {
                missing.push(format!("{path} --{long}: env {got:?}, expected {expected}"));
            }
        }
        for sub in cmd.get_subcommands() {
            check(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }

    #[test]
    fn secret_files_exclude_their_flag_and_are_read_trimmed() {
        use super::{read_secret_file, Command};
        use clap::Parser;
        use secrecy::ExposeSecret;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "  s3cret-token\n").unwrap();
        let f = file.to_str().unwrap();
        let control = |extra: &[&str]| {
            let mut argv = vec!["flex", "control", "--database-url", "sqlite::memory:"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        let err = control(&["--admin-token", "x", "--admin-token-file", f]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let err = control(&["--nats-token", "x", "--nats-token-file", f]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let err = control(&[
            "--nats-user",
            "u",
            "--nats-password",
            "x",
            "--nats-password-file",
            f,
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        // A user needs a password, from the flag or the file.
        assert!(control(&["--nats-user", "u"]).is_err());
        let Command::Control(args) = control(&["--nats-user", "u", "--nats-password-file", f])
            .unwrap()
            .command
        else {
            panic!("not control")
        };
        let pw = args.nats_auth.password().unwrap().unwrap();
        assert_eq!(pw.expose_secret(), "s3cret-token");
        assert!(!format!("{args:?}").contains("s3cret"), "Debug redacts");
        let Command::Control(args) = control(&["--nats-token", "tok"]).unwrap().command else {
            panic!("not control")
        };
        assert_eq!(
            args.nats_auth.token().unwrap().unwrap().expose_secret(),
            "tok"
        );
        assert!(!format!("{args:?}").contains("tok\""), "Debug redacts");
        assert!(Cli::try_parse_from([
            "flex",
            "admin",
            "--token",
            "x",
            "--token-file",
            f,
            "org",
            "list"
        ])
        .is_err());

        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        let e = read_secret_file(&empty, "--admin-token-file")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--admin-token-file") && e.contains("is empty"),
            "{e}"
        );
        let e = read_secret_file(&dir.path().join("none"), "--nats-token-file")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read --nats-token-file"), "{e}");
    }

    #[test]
    fn every_flag_reads_its_flex_env_var() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        check(&cmd, "flex", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
    }

    #[test]
    fn help_texts_say_what_the_code_does() {
        let mut cmd = Cli::command();
        cmd.build();
        let help = |path: &[&str]| {
            let mut c = cmd.clone();
            for name in path {
                c = c.find_subcommand(name).cloned().unwrap();
            }
            c.render_long_help().to_string()
        };
        // run::proxy's default id.
        let proxy = help(&["proxy"]);
        assert!(proxy.contains("proxy-<hostname>-<pid>"), "{proxy}");
        // SnapshotStore::with_key_file re-reads the key file: no restart needed.
        let rotate = help(&["admin", "rotate-master-key"]);
        assert!(!rotate.contains("restart proxies"), "{rotate}");
        assert!(rotate.contains("no restart"), "{rotate}");
    }
}
