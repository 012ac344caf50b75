//! TLS between the planes, with certificates made at test time (rcgen): the control plane's gRPC
//! over TLS (Watch and the admin CLI trusting a private CA), mTLS (only proxies with a client
//! certificate from `--client-ca` can watch or report usage; the admin API still works with its
//! token), NATS over TLS with client certificates against a private `nats-server`
//! (`tls { verify: true }`), and the start-up errors for bad certificate files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/infra.rs"]
mod infra;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flex::cli::NatsAuthArgs;
use flex_control_plane::snapshot_nats::NatsSnapshotConfig;
use flex_control_plane::tls::ServerTls;
use flex_control_plane::{ControlPlane, Metadata};
use flex_data_plane::plane_tls::{self, ClientTlsFiles, PROXY_FLAGS};
use flex_data_plane::snapshot::{self, SnapshotStore};
use flex_shared::crypto::MasterKeyring;
use infra::{Nats, Pki};
use secrecy::SecretString;
use tokio::task::JoinHandle;

const TOKEN: &str = "admin-token-for-tls-tests";

struct Cp {
    cp: Arc<ControlPlane>,
    addr: SocketAddr,
    keyring: Arc<MasterKeyring>,
    org_id: String,
    _dir: tempfile::TempDir,
}

async fn control_plane(tls: Option<ServerTls>) -> Cp {
    let dir = tempfile::tempdir().unwrap();
    let keyring =
        Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "test").unwrap());
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("flex.db").display());
    let cp = Arc::new(ControlPlane::open(&db, keyring.clone()).await.unwrap());
    let org_id = cp
        .create_org(&Metadata::new("test"), "tls", None)
        .await
        .unwrap()
        .org
        .org_id;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    {
        let cp = cp.clone();
        tokio::spawn(async move {
            cp.serve_with_listener_tls(
                listener,
                &SecretString::from(TOKEN.to_string()),
                tls.as_ref(),
                std::future::pending(),
            )
            .await
            .unwrap();
        });
    }
    Cp {
        cp,
        addr,
        keyring,
        org_id,
        _dir: dir,
    }
}

struct GrpcProxy {
    store: Arc<SnapshotStore>,
    task: JoinHandle<()>,
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tls_files(ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> ClientTlsFiles {
    ClientTlsFiles {
        ca: Some(ca.to_path_buf()),
        cert: identity.map(|i| i.0.clone()),
        key: identity.map(|i| i.1.clone()),
        server_name: None,
    }
}

fn grpc_proxy(cp: &Cp, id: &str, files: &ClientTlsFiles) -> GrpcProxy {
    let store = Arc::new(SnapshotStore::new(Some(cp.keyring.clone()), None));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", cp.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    let endpoint = plane_tls::grpc_endpoint(endpoint, files, PROXY_FLAGS).unwrap();
    let task = tokio::spawn(snapshot::follow_grpc(
        store.clone(),
        endpoint,
        id.into(),
        flex_data_plane::control_client::ProxyToken::none(),
    ));
    GrpcProxy { store, task }
}

async fn wait_version(store: &SnapshotStore, want: u64, what: &str) {
    let t0 = Instant::now();
    while store.version() < want {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: at version {} of {want}: {:?}",
            store.version(),
            store.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the follower reports an error, and returns it.
async fn wait_error(store: &SnapshotStore, what: &str) -> String {
    let t0 = Instant::now();
    loop {
        if let Some(e) = store.status().last_error {
            return e;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: no error reported: {:?}",
            store.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `flex admin --endpoint … --token … --json ARGS`.
fn flex_admin(endpoint: &str, extra: &[&str], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flex"))
        .env_clear()
        .arg("admin")
        .args(["--endpoint", endpoint, "--token", TOKEN, "--json"])
        .args(extra)
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_watch_and_admin_over_tls_trust_only_the_given_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "plane");
    let other = Pki::new(dir.path(), "other");
    let (cert, key) = pki.server("control");
    let cp = control_plane(Some(ServerTls::load(&cert, &key, None).unwrap())).await;

    // A proxy trusting the CA follows the Watch over TLS: the full, then a delta.
    let proxy = grpc_proxy(&cp, "tls-1", &tls_files(&pki.ca_path(), None));
    wait_version(&proxy.store, cp.cp.snapshot().version, "TLS proxy").await;
    cp.cp
        .create_api_key(&Metadata::new("test"), &cp.org_id, "k", None, None)
        .await
        .unwrap();
    wait_version(&proxy.store, cp.cp.snapshot().version, "TLS proxy, delta").await;
    assert!(proxy.store.status().connected);
    assert!(proxy.store.status().deltas_applied >= 1);

    // One trusting another CA refuses the server's certificate.
    let wrong = grpc_proxy(&cp, "tls-wrong-ca", &tls_files(&other.ca_path(), None));
    let err = wait_error(&wrong.store, "wrong CA").await;
    assert!(
        err.contains("UnknownIssuer") || err.contains("certificate"),
        "{err}"
    );
    assert_eq!(wrong.store.version(), 0);

    // The admin CLI over https:// with --ca; without it (public roots only) it is refused,
    // and the error says why.
    let url = format!("https://{}", cp.addr);
    let ca = pki.ca_path();
    let out = flex_admin(&url, &["--ca", ca.to_str().unwrap()], &["org", "list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&cp.org_id));
    let out = flex_admin(&url, &[], &["org", "list"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--ca"), "{stderr}");
    // Plain http:// to a TLS server does not work either.
    let out = flex_admin(&format!("http://{}", cp.addr), &[], &["org", "list"]);
    assert!(!out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_client_ca_only_enrolled_proxies_can_watch() {
    use flex_shared::proto::control::control_service_client::ControlServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "plane");
    let rogue = Pki::new(dir.path(), "rogue");
    let (cert, key) = pki.server("control");
    let enrolled = pki.client("edge-1");
    let unknown = rogue.client("edge-x");
    let cp = control_plane(Some(
        ServerTls::load(&cert, &key, Some(&pki.ca_path())).unwrap(),
    ))
    .await;
    let want = cp.cp.snapshot().version;

    // No client certificate: the Watch is refused with a message saying what to do.
    let anonymous = grpc_proxy(&cp, "anonymous", &tls_files(&pki.ca_path(), None));
    let err = wait_error(&anonymous.store, "no client cert").await;
    assert!(err.contains("--control-cert"), "{err}");
    // A certificate from another CA: refused in the handshake.
    let stranger = grpc_proxy(&cp, "stranger", &tls_files(&pki.ca_path(), Some(&unknown)));
    let err = wait_error(&stranger.store, "unknown client cert").await;
    // (The TLS alert `UnknownCA` shows when the client reads it before the connection closes.)
    assert!(
        err.starts_with("watch: ") || err.starts_with("connect: "),
        "{err}"
    );
    // An enrolled proxy calling itself by another proxy's id: refused, with the fix.
    let impostor = grpc_proxy(&cp, "edge-2", &tls_files(&pki.ca_path(), Some(&enrolled)));
    let err = wait_error(&impostor.store, "impostor").await;
    assert!(
        err.contains("certificate is for proxy `edge-1`") && err.contains("--proxy-id edge-1"),
        "{err}"
    );
    impostor.task.abort();
    // The enrolled proxy gets the snapshot and then the deltas.
    let good = grpc_proxy(&cp, "edge-1", &tls_files(&pki.ca_path(), Some(&enrolled)));
    wait_version(&good.store, want, "enrolled proxy").await;
    cp.cp
        .create_api_key(&Metadata::new("test"), &cp.org_id, "k", None, None)
        .await
        .unwrap();
    wait_version(
        &good.store,
        cp.cp.snapshot().version,
        "enrolled proxy, delta",
    )
    .await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        anonymous.store.version(),
        0,
        "{:?}",
        anonymous.store.status()
    );
    assert_eq!(stranger.store.version(), 0, "{:?}", stranger.store.status());
    let listed: Vec<_> = cp
        .cp
        .list_proxies()
        .proxies
        .into_iter()
        .map(|p| p.proxy_id)
        .collect();
    assert_eq!(listed, vec!["edge-1".to_string()]);

    // Usage reports need the certificate too.
    let channel = plane_tls::grpc_endpoint(
        tonic::transport::Endpoint::from_shared(format!("https://{}", cp.addr)).unwrap(),
        &tls_files(&pki.ca_path(), None),
        PROXY_FLAGS,
    )
    .unwrap()
    .connect()
    .await
    .unwrap();
    let status = ControlServiceClient::new(channel)
        .report_usage(flex_shared::proto::control::ReportUsageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // Operators reach the admin API without a client certificate, with the token.
    let ca = pki.ca_path();
    let out = flex_admin(
        &format!("https://{}", cp.addr),
        &["--ca", ca.to_str().unwrap()],
        &["proxies"],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("edge-1"));
}

fn nats_auth(ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> NatsAuthArgs {
    NatsAuthArgs {
        nats_ca: Some(ca.to_path_buf()),
        nats_cert: identity.map(|i| i.0.clone()),
        nats_key: identity.map(|i| i.1.clone()),
        ..NatsAuthArgs::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_over_nats_with_tls_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "nats");
    let nats = Nats::start_tls(&pki).await;
    let cp = control_plane(None).await;

    // Both planes connect the way `flex control` / `flex proxy` do (--nats-ca/-cert/-key).
    let control_id = pki.client("control");
    let proxy_id = pki.client("proxy");
    let client = flex::run::nats_connect(
        &nats.url(),
        &nats_auth(&pki.ca_path(), Some(&control_id)),
        "test-control",
    )
    .await
    .unwrap();
    let publisher = cp
        .cp
        .publish_snapshots_to_nats(client, NatsSnapshotConfig::default());
    let store = Arc::new(SnapshotStore::new(Some(cp.keyring.clone()), None));
    let client = flex::run::nats_connect(
        &nats.url(),
        &nats_auth(&pki.ca_path(), Some(&proxy_id)),
        "test-proxy",
    )
    .await
    .unwrap();
    let follower = tokio::spawn(snapshot::follow_nats_client(
        store.clone(),
        client,
        "nats-tls".into(),
    ));
    wait_version(&store, cp.cp.snapshot().version, "NATS TLS proxy").await;
    cp.cp
        .create_api_key(&Metadata::new("test"), &cp.org_id, "k", None, None)
        .await
        .unwrap();
    wait_version(&store, cp.cp.snapshot().version, "NATS TLS proxy, delta").await;
    assert_eq!(store.status().full_applied, 1, "{:?}", store.status());

    // Without a client certificate, or without TLS at all, the server refuses the connection.
    let no_cert = plane_tls::nats_options(
        async_nats::ConnectOptions::new(),
        &ClientTlsFiles {
            ca: Some(pki.ca_path()),
            ..ClientTlsFiles::default()
        },
    )
    .unwrap()
    .connection_timeout(Duration::from_secs(3))
    .connect(nats.url())
    .await;
    assert!(no_cert.is_err(), "connected without a client certificate");
    let plain = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(nats.url())
        .await;
    assert!(plain.is_err(), "connected without TLS");
    follower.abort();
    drop(publisher);
}

/// Runs `flex ARGS` and returns its stderr, expecting it to fail at once.
fn flex_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flex"))
        .env_clear()
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "flex {args:?} should fail: {out:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_certificate_files_fail_at_start_with_the_flag_the_reason_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "plane");
    let (cert, key) = pki.server("control");
    let (_, other_key) = pki.server("other");
    let master = dir.path().join("master.key");
    std::fs::write(&master, MasterKeyring::generate_file_text()).unwrap();
    let missing = dir.path().join("missing.pem");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let control = |extra: &[String]| {
        let mut args: Vec<String> = [
            "control",
            "--database-url",
            "sqlite::memory:",
            "--admin-token",
            "t",
            "--listen",
            "127.0.0.1:0",
            "--master-key-file",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.push(s(&master));
        args.extend_from_slice(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        flex_fails(&refs)
    };
    let e = control(&[
        "--tls-cert".into(),
        s(&missing),
        "--tls-key".into(),
        s(&key),
    ]);
    assert!(
        e.contains("--tls-cert") && e.contains("cannot read") && e.contains("Fix:"),
        "{e}"
    );
    let e = control(&[
        "--tls-cert".into(),
        s(&cert),
        "--tls-key".into(),
        s(&other_key),
    ]);
    assert!(e.contains("--tls-key") && e.contains("does not fit"), "{e}");
    let e = control(&[
        "--tls-cert".into(),
        s(&cert),
        "--tls-key".into(),
        s(&key),
        "--client-ca".into(),
        s(&missing),
    ]);
    assert!(e.contains("--client-ca") && e.contains("Fix:"), "{e}");
    // --client-ca without TLS is a usage error.
    let e = control(&["--client-ca".into(), s(&pki.ca_path())]);
    assert!(e.contains("--tls-cert"), "{e}");

    let proxy = |extra: &[&str]| {
        let mut args = vec!["proxy", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        flex_fails(&args)
    };
    let missing_s = s(&missing);
    let e = proxy(&[
        "--control-url",
        "https://127.0.0.1:1",
        "--control-ca",
        &missing_s,
    ]);
    assert!(
        e.contains("--control-ca") && e.contains("cannot read") && e.contains("Fix:"),
        "{e}"
    );
    let ca_s = s(&pki.ca_path());
    let e = proxy(&["--control-url", "http://127.0.0.1:1", "--control-ca", &ca_s]);
    assert!(e.contains("not https://"), "{e}");
    let e = proxy(&["--nats-url", "nats://127.0.0.1:1", "--nats-ca", &missing_s]);
    assert!(e.contains("--nats-ca") && e.contains("cannot read"), "{e}");
}

#[test]
fn flex_control_without_its_secrets_says_how_to_give_them() {
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("master.key");
    std::fs::write(&master, MasterKeyring::generate_file_text()).unwrap();
    let master = master.to_str().unwrap();
    let base = [
        "control",
        "--database-url",
        "sqlite::memory:",
        "--listen",
        "127.0.0.1:0",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        flex_fails(&a)
    };
    let e = with(&["--master-key-file", master]);
    assert!(
        e.contains("needs an admin token") && e.contains("FLEX_ADMIN_TOKEN"),
        "{e}"
    );
    let e = with(&["--master-key-file", master, "--admin-token", "  "]);
    assert!(e.contains("needs an admin token"), "{e}");
    let e = with(&["--admin-token", "t"]);
    assert!(
        e.contains("needs a master key file")
            && e.contains("FLEX_MASTER_KEY_FILE")
            && e.contains("openssl rand -hex 32"),
        "{e}"
    );
}
