//! A fleet: one control plane on Postgres (a fresh database per test) serving gRPC, a private
//! `nats-server` with JetStream, and three proxies, two following the NATS snapshot stream and
//! one the gRPC Watch, each with its own state dir and HTTP port. Postgres comes from
//! `FLEX_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432`) and `nats-server` from
//! `FLEX_TEST_NATS_SERVER` (default: `nats-server` on the PATH, then /usr/sbin); if either is
//! missing the tests fail, never skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/infra.rs"]
mod infra;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flex_control_plane::snapshot_nats::{NatsPublisher, NatsSnapshotConfig};
use flex_control_plane::{ControlPlane, Metadata};
use flex_data_plane::proxy::ProxyConfig;
use flex_data_plane::snapshot::{self, SnapshotStore};
use flex_data_plane::upstream::UpstreamConfig;
use flex_data_plane::usage::ChannelSink;
use flex_shared::crypto::MasterKeyring;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use infra::{Nats, Pg};
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinHandle;

// ----- fixtures ------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Nats,
    Grpc,
}

/// One proxy: a snapshot store with its follower and an HTTP server.
struct ProxyNode {
    store: Arc<SnapshotStore>,
    base: String,
    follower: JoinHandle<()>,
    _usage: tokio::sync::mpsc::Receiver<flex_shared::usage::UsageEvent>,
}

impl Drop for ProxyNode {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

struct Fleet {
    pg: Option<Pg>,
    nats: Nats,
    cp: Arc<ControlPlane>,
    grpc_addr: SocketAddr,
    stop_grpc: Option<tokio::sync::oneshot::Sender<()>>,
    grpc_task: Option<JoinHandle<()>>,
    publisher: Option<NatsPublisher>,
    keyring: Arc<MasterKeyring>,
    org_id: String,
    proxies: Vec<(Transport, String, PathBuf, ProxyNode)>,
    _dirs: tempfile::TempDir,
}

async fn start_proxy(
    transport: Transport,
    id: &str,
    state_dir: &Path,
    keyring: Arc<MasterKeyring>,
    grpc_addr: SocketAddr,
    nats_url: &str,
) -> ProxyNode {
    let store = Arc::new(SnapshotStore::new(
        Some(keyring),
        Some(state_dir.to_path_buf()),
    ));
    store.load_persisted().unwrap();
    let follower = match transport {
        Transport::Nats => tokio::spawn(snapshot::follow_nats(
            store.clone(),
            nats_url.to_string(),
            id.to_string(),
        )),
        Transport::Grpc => tokio::spawn(snapshot::follow_grpc(
            store.clone(),
            tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
                .unwrap()
                .connect_timeout(Duration::from_secs(1)),
            id.to_string(),
            flex_data_plane::control_client::ProxyToken::none(),
        )),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let (sink, usage) = ChannelSink::new();
    flex::run::serve_proxy(
        listener,
        store.clone(),
        &UpstreamConfig::default(),
        ProxyConfig::default(),
        None,
        sink,
    )
    .unwrap();
    ProxyNode {
        store,
        base,
        follower,
        _usage: usage,
    }
}

/// The control plane `cp` publishing its snapshots to `nats` with `cfg`.
async fn publish(cp: &Arc<ControlPlane>, nats: &Nats, cfg: NatsSnapshotConfig) -> NatsPublisher {
    cp.start_nats_snapshots(
        &nats.url(),
        flex_control_plane::snapshot_nats::ConnectOptions::new(),
        cfg,
    )
    .await
    .unwrap()
}

impl Fleet {
    async fn start() -> Self {
        let pg = Pg::new().await;
        let nats = Nats::start().await;
        let keyring =
            Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "test").unwrap());
        let cp = Arc::new(
            ControlPlane::open(&pg.url(), keyring.clone())
                .await
                .unwrap(),
        );
        let org_id = cp
            .create_org(&Metadata::new("test"), "fleet", None)
            .await
            .unwrap()
            .org
            .org_id;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let grpc_task = {
            let cp = cp.clone();
            tokio::spawn(async move {
                let _ = cp
                    .serve_with_listener(listener, &SecretString::from("t".to_string()), async {
                        let _ = stop_rx.await;
                    })
                    .await;
            })
        };
        let publisher = publish(&cp, &nats, NatsSnapshotConfig::default()).await;
        let dirs = tempfile::tempdir().unwrap();
        let mut proxies = Vec::new();
        for (transport, id) in [
            (Transport::Nats, "nats-1"),
            (Transport::Nats, "nats-2"),
            (Transport::Grpc, "grpc-1"),
        ] {
            let dir = dirs.path().join(id);
            let node =
                start_proxy(transport, id, &dir, keyring.clone(), grpc_addr, &nats.url()).await;
            proxies.push((transport, id.to_string(), dir, node));
        }
        let fleet = Self {
            pg: Some(pg),
            nats,
            cp,
            grpc_addr,
            stop_grpc: Some(stop_tx),
            grpc_task: Some(grpc_task),
            publisher: Some(publisher),
            keyring,
            org_id,
            proxies,
            _dirs: dirs,
        };
        fleet.converge(Duration::from_secs(10)).await;
        fleet
    }

    /// Waits until every proxy has the control plane's current version.
    async fn converge(&self, within: Duration) {
        let want = self.cp.snapshot().version;
        let t0 = Instant::now();
        for (_, id, _, node) in &self.proxies {
            while node.store.version() < want {
                assert!(
                    t0.elapsed() < within,
                    "proxy {id} is at version {} after {within:?}, wanted {want} ({:?}; publisher: {:?})",
                    node.store.version(),
                    node.store.status(),
                    self.publisher.as_ref().map(|p| p.last_error())
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    async fn create_key(&self) -> (String, String) {
        let k = self
            .cp
            .create_api_key(&Metadata::new("test"), &self.org_id, "k", None, None)
            .await
            .unwrap();
        (
            k.key.key_id,
            k.secret.as_ref().unwrap().expose_secret().to_string(),
        )
    }

    async fn revoke(&self, key_id: &str) {
        self.cp
            .revoke_api_key(&Metadata::new("test"), key_id, "test")
            .await
            .unwrap();
    }

    /// Stops the control plane: its gRPC server (Watch streams end) and its NATS publisher.
    async fn stop_control_plane(&mut self) {
        self.publisher.take();
        if let Some(tx) = self.stop_grpc.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.grpc_task.take() {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("gRPC server stops")
                .unwrap();
        }
    }

    async fn restart_proxy(&mut self, i: usize) {
        let (transport, id, dir, _) = &self.proxies[i];
        let (transport, id, dir) = (*transport, id.clone(), dir.clone());
        // Stop the old one's feed first, then start a new store from the same state dir.
        self.proxies[i].3.follower.abort();
        let node = start_proxy(
            transport,
            &id,
            &dir,
            self.keyring.clone(),
            self.grpc_addr,
            &self.nats.url(),
        )
        .await;
        self.proxies[i].3 = node;
    }

    async fn finish(mut self) {
        self.stop_control_plane().await;
        if let Some(pg) = self.pg.take() {
            pg.drop_db().await;
        }
    }
}

async fn status_of(base: &str, key: &str) -> u16 {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::get(format!("{base}/models"))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// Polls `base` until `key` gets `want`, failing after `within`; returns how long it took.
async fn until_status(base: &str, key: &str, want: u16, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let got = status_of(base, key).await;
        if got == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "{base}: key still answers {got} after {within:?}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ----- tests ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_enforced_fleet_wide_and_proxies_ride_out_a_control_plane_outage() {
    let mut fleet = Fleet::start().await;
    let (revoked_id, revoked) = fleet.create_key().await;
    let (_, kept) = fleet.create_key().await;
    // A new key reaches all three proxies.
    for (_, _, _, node) in &fleet.proxies {
        until_status(&node.base, &revoked, 200, Duration::from_secs(1)).await;
        until_status(&node.base, &kept, 200, Duration::from_secs(1)).await;
    }
    // A revocation is enforced by all three within a second.
    fleet.revoke(&revoked_id).await;
    for (transport, id, _, node) in &fleet.proxies {
        let took = until_status(&node.base, &revoked, 401, Duration::from_secs(1)).await;
        eprintln!("{id} ({transport:?}) enforced the revocation after {took:?}");
    }
    // The control plane lists the NATS proxies too, with the version they applied.
    let want = fleet.cp.snapshot().version;
    let t0 = Instant::now();
    loop {
        let listed = fleet.cp.list_proxies().proxies;
        let ok = ["nats-1", "nats-2", "grpc-1"].iter().all(|id| {
            listed
                .iter()
                .any(|p| p.proxy_id == *id && p.connected && p.applied_version == want)
        });
        if ok {
            let transports: Vec<_> = listed
                .iter()
                .map(|p| (p.proxy_id.as_str(), p.transport.as_str()))
                .collect();
            assert!(transports.contains(&("nats-1", "nats")), "{transports:?}");
            assert!(transports.contains(&("grpc-1", "grpc")), "{transports:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "proxies not listed with version {want}: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The control plane goes away: every proxy keeps serving what it has.
    fleet.stop_control_plane().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (_, _, _, node) in &fleet.proxies {
        assert_eq!(status_of(&node.base, &kept).await, 200);
        assert_eq!(status_of(&node.base, &revoked).await, 401);
    }
    // A proxy restarted while the control plane is down serves from its persisted snapshot: one
    // of each transport.
    for i in [0, 2] {
        fleet.restart_proxy(i).await;
        let node = &fleet.proxies[i].3;
        assert_eq!(node.store.version(), want, "warm start from the state dir");
        assert_eq!(status_of(&node.base, &kept).await, 200);
        assert_eq!(status_of(&node.base, &revoked).await, 401);
    }
    // The restarted NATS proxy resumed from its recorded position: nothing new, no full.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = fleet.proxies[0].3.store.status();
    assert!(st.connected, "NATS proxy follows again: {st:?}");
    assert_eq!(st.full_applied, 0, "{st:?}");
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_restart_resumes_from_the_revision_without_a_full_resync() {
    let mut fleet = Fleet::start().await;
    let (key_id, key) = fleet.create_key().await;
    fleet.converge(Duration::from_secs(2)).await;
    let nats_nodes = [0usize, 1];
    let before: Vec<_> = nats_nodes
        .iter()
        .map(|&i| fleet.proxies[i].3.store.status())
        .collect();
    for st in &before {
        assert_eq!(st.full_applied, 1, "one full snapshot on connect: {st:?}");
    }

    // NATS goes down: the NATS proxies notice and keep serving.
    fleet.nats.stop();
    let t0 = Instant::now();
    for &i in &nats_nodes {
        while fleet.proxies[i].3.store.status().connected {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "proxy never noticed NATS was down"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status_of(&fleet.proxies[i].3.base, &key).await, 200);
    }

    // NATS comes back on the same port and store: the proxies follow again from where they were.
    fleet.nats.restart().await;
    let t0 = Instant::now();
    for &i in &nats_nodes {
        while !fleet.proxies[i].3.store.status().connected {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "proxy did not reconnect to NATS: {:?}",
                fleet.proxies[i].3.store.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    fleet.revoke(&key_id).await;
    for (_, id, _, node) in &fleet.proxies {
        let took = until_status(&node.base, &key, 401, Duration::from_secs(10)).await;
        eprintln!("{id} enforced the revocation {took:?} after the NATS restart");
    }
    for (n, &i) in nats_nodes.iter().enumerate() {
        // The counters are bumped right after the swap that made the 401 visible: give them a
        // moment rather than racing them.
        let t0 = Instant::now();
        let mut st = fleet.proxies[i].3.store.status();
        while st.deltas_applied <= before[n].deltas_applied && t0.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
            st = fleet.proxies[i].3.store.status();
        }
        assert_eq!(
            st.full_applied, before[n].full_applied,
            "resumed without a full resync: {st:?}"
        );
        assert!(st.deltas_applied > before[n].deltas_applied, "{st:?}");
    }
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_nats_store_is_recovered_with_a_full_snapshot() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut fleet = Fleet::start().await;
    let (key_id, key) = fleet.create_key().await;
    fleet.converge(Duration::from_secs(2)).await;
    let before = fleet.proxies[0].3.store.status().full_applied;
    fleet.nats.stop();
    fleet.nats.wipe();
    fleet.nats.restart().await;
    // The publisher recreates the stream with a full snapshot at its next version; the proxies'
    // positions are past the new stream's end, so they start again from that full.
    fleet.revoke(&key_id).await;
    for (_, id, _, node) in &fleet.proxies {
        let took = until_status(&node.base, &key, 401, Duration::from_secs(15)).await;
        eprintln!("{id} enforced the revocation {took:?} after NATS lost its store");
    }
    for i in [0, 1] {
        let st = fleet.proxies[i].3.store.status();
        assert_eq!(st.full_applied, before + 1, "{st:?}");
    }
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_larger_than_max_payload_go_in_chunks() {
    let pg = Pg::new().await;
    let nats = Nats::start_with("max_payload: 16384\n").await;
    let keyring =
        Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "test").unwrap());
    let cp = Arc::new(
        ControlPlane::open(&pg.url(), keyring.clone())
            .await
            .unwrap(),
    );
    let meta = Metadata::new("test");
    let org_id = cp.create_org(&meta, "big", None).await.unwrap().org.org_id;
    let publisher = publish(
        &cp,
        &nats,
        NatsSnapshotConfig {
            full_every: 50,
            ..NatsSnapshotConfig::default()
        },
    )
    .await;
    // A proxy following from the start: it gets one full, then only deltas, even though the
    // publisher sends a full every 50 versions (it skips those as already applied).
    let early_dir = tempfile::tempdir().unwrap();
    let early = Arc::new(SnapshotStore::new(
        Some(keyring.clone()),
        Some(early_dir.path().to_path_buf()),
    ));
    let early_follower = tokio::spawn(snapshot::follow_nats(
        early.clone(),
        nats.url(),
        "early".into(),
    ));
    let t0 = Instant::now();
    while early.load().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "early proxy has no snapshot"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut keys = Vec::new();
    for i in 0..250 {
        let k = cp
            .create_api_key(&meta, &org_id, &format!("k{i}"), None, None)
            .await
            .unwrap();
        keys.push(flex_shared::keys::hash(
            k.secret.as_ref().unwrap().expose_secret(),
        ));
        // One version per key on the stream: the publisher coalesces versions it has not sent
        // yet into one delta, which would leave fewer than the 50 that make a periodic full.
        let version = cp.snapshot().version;
        let t0 = Instant::now();
        while publisher.published_version() < version {
            assert!(t0.elapsed() < Duration::from_secs(10), "not published");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let want = cp.snapshot().version;
    let t0 = Instant::now();
    while publisher.published_version() < want {
        assert!(t0.elapsed() < Duration::from_secs(10), "not published");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        publisher.chunked_published() > 0,
        "a full snapshot of 250 keys exceeds 16 KiB"
    );
    // A proxy joining now starts from the newest (chunked) full, then follows the deltas.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SnapshotStore::new(
        Some(keyring),
        Some(dir.path().to_path_buf()),
    ));
    let follower = tokio::spawn(snapshot::follow_nats(
        store.clone(),
        nats.url(),
        "late".into(),
    ));
    let t0 = Instant::now();
    while store.version() < want {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "late proxy at {} of {want}: {:?}",
            store.version(),
            store.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let snap = store.load().unwrap();
    assert!(keys.iter().all(|h| snap.keys.contains_key(h)));
    assert_eq!(store.status().full_applied, 1);
    follower.abort();
    let t0 = Instant::now();
    while early.version() < want {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{:?}",
            early.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The first full, then a delta and a full of the same version after every 50 deltas.
    assert_eq!(
        publisher.fulls_published(),
        1 + 250 / 51,
        "a full every 50 deltas"
    );
    let st = early.status();
    assert_eq!(st.full_applied, 1, "the periodic fulls are skipped: {st:?}");
    assert_eq!(st.deltas_applied, 250, "{st:?}");
    assert_eq!(st.rejected_updates, 0, "{st:?}");
    early_follower.abort();
    drop(publisher);
    pg.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_of_40k_keys_reaches_grpc_and_nats_proxies_and_revocations_follow() {
    use flex_control_plane::domain::Event;
    use flex_control_plane::store::{ImportEvent, Store};
    // ~6 MB: over tonic's default 4 MB message limit and nats-server's 1 MB max_payload.
    const KEYS: usize = 40_000;
    let pg = Pg::new().await;
    let nats = Nats::start().await;
    let keyring =
        Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "test").unwrap());
    let store = Store::connect(&pg.url()).await.unwrap();
    let org_id = "org_0190aaaabbbbccccddddeeeeffff0000".to_string();
    let mut events = vec![ImportEvent {
        stream_id: format!("org-{org_id}"),
        stream_version: 1,
        event: Event::OrgCreated {
            org_id: org_id.clone(),
            name: "large".into(),
        }
        .to_new()
        .unwrap(),
    }];
    for i in 0..KEYS {
        let key_id = format!("key_{i:032x}");
        events.push(ImportEvent {
            stream_id: format!("apikey-{key_id}"),
            stream_version: 1,
            event: Event::ApiKeyCreated {
                key_id: key_id.clone(),
                org_id: org_id.clone(),
                name: String::new(),
                key_hash: flex_shared::keys::hash(&key_id),
                hint: "flex_live_…".into(),
                expires_at: None,
            }
            .to_new()
            .unwrap(),
        });
    }
    for chunk in events.chunks(10_000) {
        store
            .import_events(chunk, &Metadata::new("test"))
            .await
            .unwrap();
    }
    let cp = Arc::new(
        ControlPlane::with_store(store, keyring.clone())
            .await
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    {
        let cp = cp.clone();
        tokio::spawn(async move {
            let _ = cp
                .serve_with_listener(
                    listener,
                    &SecretString::from("t".to_string()),
                    std::future::pending(),
                )
                .await;
        });
    }
    let publisher = publish(&cp, &nats, NatsSnapshotConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = [
        start_proxy(
            Transport::Grpc,
            "grpc-large",
            &dir.path().join("g"),
            keyring.clone(),
            grpc_addr,
            &nats.url(),
        )
        .await,
        start_proxy(
            Transport::Nats,
            "nats-large",
            &dir.path().join("n"),
            keyring.clone(),
            grpc_addr,
            &nats.url(),
        )
        .await,
    ];
    let want = cp.snapshot().version;
    let t0 = Instant::now();
    for n in &nodes {
        while n.store.version() < want {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "a proxy did not get the large snapshot: {:?}",
                n.store.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(n.store.load().unwrap().keys.len(), KEYS);
    }
    assert!(
        publisher.chunked_published() >= 1,
        "the full went in chunks"
    );
    let revoked = format!("key_{:032x}", 123);
    cp.revoke_api_key(&Metadata::new("test"), &revoked, "test")
        .await
        .unwrap();
    let hash = flex_shared::keys::hash(&revoked);
    let t0 = Instant::now();
    for n in &nodes {
        while n.store.load().unwrap().keys.contains_key(&hash) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "revocation not applied at 40k keys"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(n.store.status().full_applied, 1, "{:?}", n.store.status());
    }
    eprintln!(
        "40k keys: both proxies enforced the revocation after {:?}",
        t0.elapsed()
    );
    drop(publisher);
    pg.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_update_on_nats_is_refused_reported_and_the_next_good_one_applies() {
    use prost::Message;
    let fleet = Fleet::start().await;
    let (key_id, key) = fleet.create_key().await;
    fleet.converge(Duration::from_secs(2)).await;
    let current = fleet.cp.snapshot().version;
    // A delta that claims the next version but whose content hash is wrong.
    let bogus = flex_shared::proto::control::SnapshotUpdate {
        version: current + 1,
        kind: Some(flex_shared::proto::control::snapshot_update::Kind::Delta(
            flex_shared::proto::control::SnapshotDelta {
                from_version: current,
                remove_api_key_hashes: vec![flex_shared::keys::hash(&key)],
                content_hash: "0".repeat(64),
                ..Default::default()
            },
        )),
        signature: vec![],
    };
    let client = async_nats::connect(fleet.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        flex_shared::snapshot::nats::HEADER_VERSION,
        (current + 1).to_string().as_str(),
    );
    headers.insert("Nats-Msg-Id", "bogus");
    js.publish_with_headers(
        flex_shared::snapshot::nats::DELTA_SUBJECT,
        headers,
        bogus.encode_to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let t0 = Instant::now();
    for i in [0, 1] {
        while fleet.proxies[i].3.store.status().rejected_updates == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "bogus update not seen"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let node = &fleet.proxies[i].3;
        assert_eq!(
            node.store.version(),
            current,
            "the last good snapshot stays"
        );
        assert_eq!(status_of(&node.base, &key).await, 200);
    }
    // The refusal reaches the control plane's registry.
    let t0 = Instant::now();
    while !fleet
        .cp
        .list_proxies()
        .proxies
        .iter()
        .any(|p| p.proxy_id == "nats-1" && p.last_error.contains("hash"))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "refusal not reported: {:?}",
            fleet.cp.list_proxies().proxies
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The next real update applies on top of the last good snapshot, as a delta.
    fleet.revoke(&key_id).await;
    for (_, _, _, node) in &fleet.proxies {
        until_status(&node.base, &key, 401, Duration::from_secs(2)).await;
    }
    for i in [0, 1] {
        let st = fleet.proxies[i].3.store.status();
        assert_eq!(st.full_applied, 1, "{st:?}");
    }
    fleet.finish().await;
}

/// A proxy that crashed after recording its NATS position but before its snapshot reached the
/// disk restarts from an older snapshot than its position says: it must not resume after the
/// position (skipping what it never persisted) but replay from the newest full.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxy_whose_snapshot_lags_its_nats_position_replays_what_it_lost() {
    let fleet = Fleet::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = start_proxy(
        Transport::Nats,
        "crashy",
        dir.path(),
        fleet.keyring.clone(),
        fleet.grpc_addr,
        &fleet.nats.url(),
    )
    .await;
    let (key_id, key) = fleet.create_key().await;
    let v1 = fleet.cp.snapshot().version;
    while node.store.version() < v1 || !node.store.flush(Duration::from_secs(5)) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status_of(&node.base, &key).await, 200);
    let older = std::fs::read(dir.path().join("snapshot.pb")).unwrap();
    // The revocation is applied and its position recorded...
    fleet.revoke(&key_id).await;
    until_status(&node.base, &key, 401, Duration::from_secs(3)).await;
    assert!(node.store.flush(Duration::from_secs(5)));
    drop(node);
    // ...but the crash came before the snapshot write: the disk holds the older snapshot.
    std::fs::write(dir.path().join("snapshot.pb"), &older).unwrap();
    let node = start_proxy(
        Transport::Nats,
        "crashy",
        dir.path(),
        fleet.keyring.clone(),
        fleet.grpc_addr,
        &fleet.nats.url(),
    )
    .await;
    assert_eq!(
        node.store.version(),
        v1,
        "warm start from the older snapshot"
    );
    // No new change is needed: the proxy replays the chain and enforces the revocation.
    until_status(&node.base, &key, 401, Duration::from_secs(5)).await;
    assert_eq!(node.store.version(), fleet.cp.snapshot().version);
    drop(node);
    fleet.finish().await;
}

/// Makes `node` diverge from the control plane: the same version with `key` missing (a valid
/// snapshot, wrong content).
async fn diverge(node: &ProxyNode, key: &str) {
    let mut wrong = node.store.load().unwrap().to_proto();
    let hash = flex_shared::keys::hash(key);
    wrong.api_keys.retain(|k| k.key_hash != hash);
    wrong.content_hash = flex_shared::snapshot::content_hash(&wrong);
    node.store.apply_full(wrong).unwrap();
    assert_eq!(status_of(&node.base, key).await, 401);
}

/// A NATS proxy whose state diverged (a delta's content hash does not match what it built)
/// while the newest full in the stream is older than its version rebuilds the chain from that
/// full beside the snapshot it serves, and swaps it in once it passes its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_diverged_nats_proxy_resyncs_from_an_older_full_without_waiting_for_a_new_one() {
    let fleet = Fleet::start().await;
    let (_, kept) = fleet.create_key().await;
    let (doomed_id, doomed) = fleet.create_key().await;
    fleet.converge(Duration::from_secs(3)).await;
    let node = &fleet.proxies[0].3;
    assert_eq!(fleet.proxies[0].0, Transport::Nats);
    diverge(node, &kept).await;
    let fulls = node.store.status().full_applied;
    // The next delta does not match; the proxy resyncs from the (older) newest full.
    fleet.revoke(&doomed_id).await;
    until_status(&node.base, &kept, 200, Duration::from_secs(5)).await;
    until_status(&node.base, &doomed, 401, Duration::from_secs(5)).await;
    let st = node.store.status();
    assert!(st.rejected_updates >= 1, "{st:?}");
    assert_eq!(st.full_applied, fulls + 1, "one resync: {st:?}");
    assert_eq!(
        node.store.load().unwrap().content_hash,
        fleet.cp.snapshot().content_hash
    );
    fleet.finish().await;
}

/// The same divergence on a gRPC proxy: after the refused delta it asks for a full snapshot
/// (not the same delta again) and is back in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_diverged_grpc_proxy_asks_for_a_full_snapshot() {
    let fleet = Fleet::start().await;
    let (_, kept) = fleet.create_key().await;
    let (doomed_id, doomed) = fleet.create_key().await;
    fleet.converge(Duration::from_secs(3)).await;
    let (transport, _, _, node) = fleet
        .proxies
        .iter()
        .find(|p| p.0 == Transport::Grpc)
        .unwrap();
    assert_eq!(*transport, Transport::Grpc);
    diverge(node, &kept).await;
    fleet.revoke(&doomed_id).await;
    until_status(&node.base, &kept, 200, Duration::from_secs(5)).await;
    until_status(&node.base, &doomed, 401, Duration::from_secs(5)).await;
    let st = node.store.status();
    assert!(st.rejected_updates >= 1, "{st:?}");
    assert_eq!(
        node.store.load().unwrap().content_hash,
        fleet.cp.snapshot().content_hash
    );
    fleet.finish().await;
}

/// An idle control plane republishes a full every half `max_age`, so the stream never ages out
/// its last full: a proxy joining after a long quiet spell still finds one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_stream_keeps_a_full_snapshot_for_joiners() {
    let pg = Pg::new().await;
    let nats = Nats::start().await;
    let keyring =
        Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "test").unwrap());
    let cp = Arc::new(
        ControlPlane::open(&pg.url(), keyring.clone())
            .await
            .unwrap(),
    );
    let meta = Metadata::new("test");
    let org_id = cp
        .create_org(&meta, "quiet", None)
        .await
        .unwrap()
        .org
        .org_id;
    let key = cp
        .create_api_key(&meta, &org_id, "k", None, None)
        .await
        .unwrap();
    let key = key.secret.as_ref().unwrap().expose_secret().to_string();
    let publisher = publish(
        &cp,
        &nats,
        NatsSnapshotConfig {
            // Messages older than 2 s are discarded by the stream.
            max_age: Duration::from_secs(2),
            ..NatsSnapshotConfig::default()
        },
    )
    .await;
    // Idle for twice max_age: every message published at the start has aged out by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        publisher.fulls_published() >= 3,
        "a full every second while idle: {} ({:?})",
        publisher.fulls_published(),
        publisher.last_error()
    );
    let store = Arc::new(SnapshotStore::new(Some(keyring), None));
    let follower = tokio::spawn(snapshot::follow_nats(
        store.clone(),
        nats.url(),
        "joiner".into(),
    ));
    let t0 = Instant::now();
    while store.version() < cp.snapshot().version {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no full snapshot for a joiner: {:?}",
            store.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store
        .load()
        .unwrap()
        .keys
        .contains_key(&flex_shared::keys::hash(&key)));
    follower.abort();
    drop(publisher);
    pg.drop_db().await;
}

/// A nats-server whose file store cannot hold the stream's `max_bytes` refuses to create it; the
/// publisher keeps retrying and says what to change, rather than only "stream not found" on the
/// proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_server_without_room_for_the_stream_gets_a_clear_error() {
    let pg = Pg::new().await;
    let nats = Nats::start_with_file_store("64MB").await;
    let keyring =
        Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "test").unwrap());
    let cp = Arc::new(ControlPlane::open(&pg.url(), keyring).await.unwrap());
    let publisher = publish(&cp, &nats, NatsSnapshotConfig::default()).await;
    let t0 = Instant::now();
    let error = loop {
        if let Some(e) = publisher.last_error() {
            if e.contains("create stream") {
                break e;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no error reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(error.contains("insufficient storage"), "{error}");
    assert!(error.contains("1024 MiB"), "{error}");
    assert!(error.contains("max_file_store"), "{error}");
    assert_eq!(publisher.published_version(), 0);
    drop(publisher);
    pg.drop_db().await;
}
