//! Test infrastructure shared by the process, fleet and TLS tests (`#[path = "common/infra.rs"]
//! mod infra;`): free ports, a private `nats-server` (JetStream, optional extra configuration such
//! as a `tls { … }` block), a fresh Postgres database, a throwaway PKI made with rcgen, child
//! processes logging to a file, a `flex up` process, and an HTTP request helper. Postgres
//! comes from `FLEX_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432`) and
//! `nats-server` from `FLEX_TEST_NATS_SERVER` (default: `nats-server` on the PATH, then
//! /usr/sbin); if either is missing the tests fail, never skip.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn nats_server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("FLEX_TEST_NATS_SERVER") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/bin"])
    {
        let p = Path::new(dir).join("nats-server");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "nats-server not found: these tests need a real nats-server (apt-get install nats-server, \
         or set FLEX_TEST_NATS_SERVER). They never skip."
    )
}

/// A private nats-server with JetStream on a free port; it can be stopped and started again on
/// the same port and store dir.
pub struct Nats {
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Extra server configuration (e.g. `max_payload: 16384`).
    config: String,
    /// JetStream's `max_file_store`.
    file_store: String,
    child: Option<Child>,
}

/// Writes a nats-server configuration to `path`: JetStream stored in `store` with an explicit
/// file-store limit, then `extra`. Returns `path`. Left unset, nats-server takes 75 % of the
/// disk's free space at start as its limit, and a machine with little free disk then refuses the
/// snapshot stream (its `max_bytes` is reserved up front) with "insufficient storage resources".
pub fn write_nats_config(path: &Path, store: &Path, file_store: &str, extra: &str) -> PathBuf {
    std::fs::write(
        path,
        format!(
            "jetstream {{\n  store_dir: {:?}\n  max_file_store: {file_store}\n}}\n{extra}",
            store.display().to_string(),
        ),
    )
    .unwrap();
    path.to_path_buf()
}

impl Nats {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    pub async fn start_with(config: &str) -> Self {
        Self::start_full(config, "16GB").await
    }

    /// A server that speaks only TLS and requires client certificates signed by `pki`'s CA (its
    /// own certificate is `pki.server("nats")`).
    pub async fn start_tls(pki: &Pki) -> Self {
        let (cert, key) = pki.server("nats");
        Self::start_with(&format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 5\n}}\n",
            cert.display().to_string(),
            key.display().to_string(),
            pki.ca_path().display().to_string(),
        ))
        .await
    }

    /// A server whose JetStream file store holds at most `limit` (e.g. `64MB`).
    pub async fn start_with_file_store(limit: &str) -> Self {
        Self::start_full("", limit).await
    }

    async fn start_full(config: &str, file_store: &str) -> Self {
        let mut n = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            config: config.to_string(),
            file_store: file_store.to_string(),
            child: None,
        };
        n.restart().await;
        n
    }

    /// Loses the JetStream store (as if the server came back on a new disk).
    pub fn wipe(&self) {
        assert!(self.child.is_none(), "stop nats-server first");
        std::fs::remove_dir_all(self.dir.path().join("store")).unwrap();
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let conf = write_nats_config(
            &self.dir.path().join("nats.conf"),
            &self.dir.path().join("store"),
            &self.file_store,
            &self.config,
        );
        let child = Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("nats.log"))
                    .unwrap(),
            )
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let t0 = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "nats-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits (blocking, polling every 20 ms) until something listens on `port` of 127.0.0.1.
pub fn wait_listening(port: u16, what: &str, within: Duration) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < within,
            "{what} did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process whose stdout and stderr go to a log file; SIGKILLed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    /// Lines of the log printed to stderr when dropped during a panic (0: none).
    panic_tail: usize,
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_string(),
            child: Some(child),
            log,
            panic_tail: 0,
        }
    }

    /// When dropped during a panic, prints the last `lines` lines of the log.
    pub fn tail_on_panic(mut self, lines: usize) -> Self {
        self.panic_tail = lines;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGSTOP: the process hangs with its connections open (nothing is answered or closed).
    pub fn freeze(&self) {
        let ok = Command::new("kill")
            .args(["-STOP", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot SIGSTOP {}", self.name);
    }

    /// SIGTERM, then waits (bounded) for the process to exit on its own.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot SIGTERM {}", self.name);
        let t0 = Instant::now();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if t0.elapsed() > within {
                c.kill().ok();
                c.wait().ok();
                panic!("{} did not exit within {within:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown code runs, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// The whole log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 30 lines of the log, under a header with the process's name.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!("--- {} log ---\n{}", self.name, lines[from..].join("\n"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if self.panic_tail > 0 && std::thread::panicking() {
            eprintln!("----- {} ({}) -----", self.name, self.log.display());
            let out = self.log_text();
            let tail: Vec<&str> = out.lines().rev().take(self.panic_tail).collect();
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Runs `cmd` to the end with `stdin` written to its standard input (closed at once when None),
/// and collects its stdout and stderr.
pub fn output_with_stdin(cmd: &mut Command, stdin: Option<&str>) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

/// The output of `flex admin … ARGS`, which must have succeeded: its stdout as JSON.
pub fn admin_json_of(out: &Output, args: &[&str]) -> Value {
    assert!(
        out.status.success(),
        "flex admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A `flex up` process (the real binary) on free ports, with its data dir in a temp dir; killed
/// when dropped.
pub struct FlexUp {
    pub dir: tempfile::TempDir,
    /// The port of the proxy API (`--listen`).
    pub api: u16,
    /// The port of the admin API (`--admin-listen`).
    pub admin: u16,
    /// The port of the dashboard (`--dashboard-listen`).
    pub dashboard: u16,
    pub child: Child,
    /// `flex up ARGS`, for messages.
    what: String,
}

impl FlexUp {
    /// Starts `flex up ARGS --data-dir DIR --listen 127.0.0.1:API --admin-listen
    /// 127.0.0.1:ADMIN --dashboard-listen 127.0.0.1:DASHBOARD`, stdout and stderr to
    /// /dev/null; `configure` changes the command (more arguments, environment, stdio) before it
    /// is spawned.
    pub fn start(args: &[&str], configure: impl FnOnce(&mut Command)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (api, admin, dashboard) = (free_port(), free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flex"));
        cmd.arg("up")
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .args([
                "--listen",
                &format!("127.0.0.1:{api}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
                "--dashboard-listen",
                &format!("127.0.0.1:{dashboard}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        configure(&mut cmd);
        let child = cmd.spawn().unwrap();
        let what = std::iter::once("flex up")
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            dir,
            api,
            admin,
            dashboard,
            child,
            what,
        }
    }

    /// Waits (blocking, polling every 50 ms, at most `within`) until `flex up` has written `file`
    /// into its data dir, then 200 ms more; returns the file's path.
    pub fn wait_for_file(&self, file: &str, within: Duration) -> PathBuf {
        let path = self.dir.path().join(file);
        let t0 = Instant::now();
        while !path.exists() {
            self.assert_within(t0, within, file);
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        path
    }

    /// [`FlexUp::wait_for_file`] without blocking the runtime's thread.
    pub async fn wait_for_file_async(&self, file: &str, within: Duration) -> PathBuf {
        let path = self.dir.path().join(file);
        let t0 = Instant::now();
        while !path.exists() {
            self.assert_within(t0, within, file);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        path
    }

    fn assert_within(&self, t0: Instant, within: Duration, file: &str) {
        assert!(t0.elapsed() < within, "{} wrote no {file}", self.what);
    }
}

impl Drop for FlexUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `flex admin --data-dir DIR ARGS…` with `env`, and no `FLEX_*` variable of the test's own;
/// `stdin` is written to its standard input (None: no standard input).
pub fn flex_admin_in(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flex"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FLEX_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(["admin", "--data-dir"])
        .arg(dir)
        .args(args)
        .envs(env.iter().copied());
    match stdin {
        None => cmd.stdin(Stdio::null()).output().unwrap(),
        Some(text) => output_with_stdin(&mut cmd, Some(text)),
    }
}

/// A fresh Postgres database, dropped at the end.
pub struct Pg {
    base: String,
    name: String,
}

impl Pg {
    pub async fn new() -> Self {
        let base = std::env::var("FLEX_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
            .trim_end_matches('/')
            .to_string();
        let mut conn = PgConnection::connect(&format!("{base}/postgres"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "Postgres is unreachable at {base}: {e}. These tests need a real Postgres \
                     (or FLEX_TEST_POSTGRES_URL). They never skip."
                )
            });
        let name = format!("flex_fleet_{}", uuid::Uuid::new_v4().simple());
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        conn.close().await.ok();
        Self { base, name }
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.base, self.name)
    }

    pub async fn drop_db(self) {
        if let Ok(mut conn) = PgConnection::connect(&format!("{}/postgres", self.base)).await {
            let _ = conn
                .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
                .await;
        }
    }
}

/// A throwaway certificate authority writing PEM files into a directory: a CA, server
/// certificates for `localhost` and 127.0.0.1, client certificates.
pub struct Pki {
    dir: PathBuf,
    name: String,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&ca_key).unwrap();
        let pki = Self {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            ca,
            ca_key,
        };
        std::fs::write(pki.ca_path(), pki.ca.pem()).unwrap();
        pki
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    fn issue(
        &self,
        file: &str,
        cn: &str,
        sans: Vec<String>,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (
            self.dir.join(format!("{}-{file}.pem", self.name)),
            self.dir.join(format!("{}-{file}.key", self.name)),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// A server certificate for `localhost` and 127.0.0.1: (cert, key) paths.
    pub fn server(&self, file: &str) -> (PathBuf, PathBuf) {
        self.issue(
            file,
            "localhost",
            vec!["localhost".to_string(), "127.0.0.1".to_string()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate with common name `cn`: (cert, key) paths.
    pub fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        self.issue(
            cn,
            cn,
            vec![format!("{cn}.proxies.test")],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// One HTTP/1.1 request (JSON body when given, bearer key when given), bounded to 10 s: the
/// status and the body as text.
pub async fn request(
    method: http::Method,
    url: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, String), String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Full::new(body)).unwrap()),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).to_string()))
}

/// `redis-server` from `FLEX_TEST_REDIS_SERVER`, else on the PATH or in /usr/bin; the tests fail
/// without it, never skip.
pub fn redis_server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("FLEX_TEST_REDIS_SERVER") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain([
        "/usr/bin",
        "/usr/local/bin",
        "/usr/sbin",
    ]) {
        let p = Path::new(dir).join("redis-server");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "redis-server not found: these tests need a real Redis (apt-get install redis-server, or \
         set FLEX_TEST_REDIS_SERVER). They never skip."
    )
}

/// A private redis-server on a free port of 127.0.0.1, without persistence (`--save ''
/// --appendonly no`), that can be killed and started again on the same port.
pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Self {
        let mut r = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let child = Command::new(redis_server_binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_listening(self.port, "redis-server", Duration::from_secs(10));
    }

    /// SIGKILL (its counters are gone: no persistence).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
