//! Snapshot distribution benchmark.
//!
//! Run: `cargo run --release --example snapshot_fleet -- [--revocations 200] [--nats-proxies 3]
//! [--grpc-proxies 3] [--background-keys 1000] [--bulk-keys 0] [--keys 1000000]
//! [--part latency|full|both] [--postgres-url postgres://USER@HOST:PORT]`
//!
//! 1. Revocation to enforcement across a fleet: a control plane on Postgres (a fresh database,
//!    dropped afterwards) serving gRPC, a private `nats-server -js` on a free port, and proxies'
//!    snapshot stores following NATS and gRPC Watch in this process. For each revocation: the
//!    time from `revoke_api_key` returning until each store no longer has the key (polled every
//!    100 µs from a separate thread), p50/p99/max per transport and for the whole fleet (the
//!    slowest store of each revocation).
//! 2. Full sync of a snapshot with N API keys (built directly, 1 org per 1,000 keys), in a child
//!    process so the measurement starts from a clean heap: the prost decode, then
//!    `SnapshotStore::apply_full` (content hash and structure validation, then the index), and
//!    the resident memory the applied snapshot holds (VmRSS after minus before, the encoded bytes
//!    excluded), per key. Then one revocation delta applied on top of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flex_control_plane::snapshot_nats::{ConnectOptions, NatsSnapshotConfig};
use flex_control_plane::sqlx::{Connection, Executor, PgConnection};
use flex_control_plane::{ControlPlane, Metadata};
use flex_data_plane::snapshot::{self, SnapshotStore};
use flex_shared::crypto::MasterKeyring;
use flex_shared::proto::control as pb;
use flex_shared::snapshot as rules;
use prost::Message;
use secrecy::{ExposeSecret, SecretString};

#[derive(Parser, Debug)]
struct Args {
    /// `latency`, `full` or `both`.
    #[arg(long, default_value = "both")]
    part: String,
    /// Revocations measured.
    #[arg(long, default_value_t = 200)]
    revocations: usize,
    /// Stores following NATS.
    #[arg(long, default_value_t = 3)]
    nats_proxies: usize,
    /// Stores following the gRPC Watch.
    #[arg(long, default_value_t = 3)]
    grpc_proxies: usize,
    /// Keys that stay in the snapshot during the latency run.
    #[arg(long, default_value_t = 1000)]
    background_keys: usize,
    /// Keys bulk-imported into the log before the control plane opens (a large snapshot for
    /// the latency run).
    #[arg(long, default_value_t = 0)]
    bulk_keys: usize,
    /// API keys in the full-sync snapshot.
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// Postgres server (a database is created in it and dropped afterwards).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres_url: String,
    /// nats-server binary.
    #[arg(long, default_value = "nats-server")]
    nats_server: String,
    /// Internal: measure the full sync of the snapshot in this file.
    #[arg(long, hide = true)]
    full_sync_child: Option<PathBuf>,
}

fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "| {name} | {} | {} | {} | {} |",
        v.len(),
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.99)),
        ms(*v.last().unwrap_or(&Duration::ZERO))
    );
}

// ----- part 1: revocation latency ----------------------------------------------------------

struct NatsServer(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_nats(bin: &str) -> (NatsServer, String) {
    let bin = if Path::new(bin).is_absolute() || which(bin) {
        bin.to_string()
    } else {
        "/usr/sbin/nats-server".to_string()
    };
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    // An explicit file-store limit: the snapshot stream reserves its 1 GiB cap, which an unset
    // limit (75 % of the free disk) may not have room for.
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "jetstream {{\n  store_dir: {:?}\n  max_file_store: 16GB\n}}\n",
            dir.path().join("store").display().to_string()
        ),
    )
    .unwrap();
    let child = Command::new(&bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let t0 = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nats-server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (NatsServer(child, dir), format!("nats://127.0.0.1:{port}"))
}

fn which(bin: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| Path::new(d).join(bin).is_file())
}

async fn latency(args: &Args) {
    let (_nats, nats_url) = start_nats(&args.nats_server).await;
    let admin = format!("{}/postgres", args.postgres_url.trim_end_matches('/'));
    let db = format!("flex_bench_snap_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&admin).await.unwrap();
    conn.execute(format!("CREATE DATABASE {db}").as_str())
        .await
        .unwrap();
    let url = format!("{}/{db}", args.postgres_url.trim_end_matches('/'));
    let keyring =
        Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "bench").unwrap());
    let store = flex_control_plane::Store::connect(&url).await.unwrap();
    if args.bulk_keys > 0 {
        println!("importing {} keys into the log…", args.bulk_keys);
        bulk_import(&store, args.bulk_keys).await;
    }
    let cp = Arc::new(
        ControlPlane::with_store(store, keyring.clone())
            .await
            .unwrap(),
    );
    let meta = Metadata::new("bench");
    let org = cp
        .create_org(&meta, "bench", None)
        .await
        .unwrap()
        .org
        .org_id;
    println!(
        "creating {} keys to revoke and {} that stay…",
        args.revocations, args.background_keys
    );
    let mut keys = Vec::new();
    for i in 0..args.revocations + args.background_keys {
        let k = cp
            .create_api_key(&meta, &org, &format!("k{i}"), None, None)
            .await
            .unwrap();
        if i < args.revocations {
            keys.push((
                k.key.key_id,
                flex_shared::keys::hash(k.secret.as_ref().unwrap().expose_secret()),
            ));
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
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
    let _publisher = cp
        .start_nats_snapshots(
            &nats_url,
            ConnectOptions::new(),
            NatsSnapshotConfig::default(),
        )
        .await
        .unwrap();
    let mut stores: Vec<(&str, Arc<SnapshotStore>)> = Vec::new();
    for i in 0..args.nats_proxies {
        let s = Arc::new(SnapshotStore::new(Some(keyring.clone()), None));
        tokio::spawn(snapshot::follow_nats(
            s.clone(),
            nats_url.clone(),
            format!("nats-{i}"),
        ));
        stores.push(("nats", s));
    }
    for i in 0..args.grpc_proxies {
        let s = Arc::new(SnapshotStore::new(Some(keyring.clone()), None));
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        tokio::spawn(snapshot::follow_grpc(
            s.clone(),
            endpoint,
            format!("grpc-{i}"),
            flex_data_plane::control_client::ProxyToken::none(),
        ));
        stores.push(("grpc", s));
    }
    let want = cp.snapshot().version;
    let t0 = Instant::now();
    while stores.iter().any(|(_, s)| s.version() < want) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "fleet did not converge"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "fleet of {} NATS + {} gRPC stores at version {want} ({} keys); measuring {} revocations…",
        args.nats_proxies,
        args.grpc_proxies,
        stores[0].1.load().unwrap().keys.len(),
        args.revocations
    );

    // The poller: a plain thread, so its 100 µs sleeps are real (tokio's timer has 1 ms ticks).
    type Job = (String, Instant, tokio::sync::oneshot::Sender<Vec<Duration>>);
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let poll_stores: Vec<Arc<SnapshotStore>> = stores.iter().map(|(_, s)| s.clone()).collect();
    std::thread::spawn(move || {
        while let Ok((hash, t0, done)) = job_rx.recv() {
            let mut took = vec![None; poll_stores.len()];
            while took.iter().any(Option::is_none) {
                for (i, s) in poll_stores.iter().enumerate() {
                    if took[i].is_none() && !s.load().unwrap().keys.contains_key(&hash) {
                        took[i] = Some(t0.elapsed());
                    }
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    panic!("a store still has the revoked key after 10 s");
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            let _ = done.send(took.into_iter().map(Option::unwrap).collect());
        }
    });
    let mut by_transport: std::collections::BTreeMap<&str, Vec<Duration>> = Default::default();
    let mut fleet = Vec::new();
    for (key_id, hash) in &keys {
        cp.revoke_api_key(&meta, key_id, "bench").await.unwrap();
        let t0 = Instant::now();
        let (tx, rx) = tokio::sync::oneshot::channel();
        job_tx.send((hash.clone(), t0, tx)).unwrap();
        let took = rx.await.unwrap();
        for (i, d) in took.iter().enumerate() {
            by_transport.entry(stores[i].0).or_default().push(*d);
        }
        fleet.push(took.into_iter().max().unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!();
    println!("| revocation → enforcement | samples | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (t, v) in by_transport {
        summary(&format!("{t} (each store)"), v);
    }
    summary("fleet (slowest store)", fleet);
    let proxies = cp.list_proxies();
    println!(
        "\nproxies listed by the control plane: {}",
        proxies
            .proxies
            .iter()
            .map(|p| format!("{}={}@{}", p.proxy_id, p.transport, p.applied_version))
            .collect::<Vec<_>>()
            .join(" ")
    );
    drop(cp);
    let _ = conn
        .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
        .await;
}

/// `n` API keys of one org, appended straight to the log.
async fn bulk_import(store: &flex_control_plane::Store, n: usize) {
    use flex_control_plane::domain::Event;
    use flex_control_plane::store::ImportEvent;
    let org_id = "org_0190aaaabbbbccccddddeeeeffff0000".to_string();
    let mut events = vec![ImportEvent {
        stream_id: format!("org-{org_id}"),
        stream_version: 1,
        event: Event::OrgCreated {
            org_id: org_id.clone(),
            name: "bulk".into(),
        }
        .to_new()
        .unwrap(),
    }];
    for i in 0..n {
        let key_id = format!("key_{:032x}", i as u128 + (1 << 100));
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
            .import_events(chunk, &Metadata::new("bench"))
            .await
            .unwrap();
    }
}

// ----- part 2: full sync of N keys -----------------------------------------------------------

fn hex32(n: u64, salt: u64) -> String {
    // Distinct, uniformly spread 64-hex "hashes" (splitmix64).
    let mut x = n.wrapping_mul(4).wrapping_add(salt << 56);
    let mut out = String::with_capacity(64);
    for _ in 0..4 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.push_str(&format!("{:016x}", z ^ (z >> 31)));
    }
    out
}

fn build_snapshot(n: usize) -> pb::Snapshot {
    let orgs = n.div_ceil(1000).max(1);
    let org_ids: Vec<String> = (0..orgs)
        .map(|i| format!("org_{}", uuid::Uuid::from_u128(i as u128 + 1).simple()))
        .collect();
    let mut s = pb::Snapshot {
        version: 1_000_000,
        orgs: org_ids
            .iter()
            .map(|id| pb::OrgEntry {
                org_id: id.clone(),
                name: format!("org {id}"),
                active: true,
                billing_status: "active".into(),
                fee_bps: 1000,
            })
            .collect(),
        api_keys: (0..n)
            .map(|i| pb::ApiKeyEntry {
                key_id: format!("key_{}", uuid::Uuid::from_u128(i as u128 + 7).simple()),
                org_id: org_ids[i % orgs].clone(),
                key_hash: hex32(i as u64, 1),
                expires_at: 0,
            })
            .collect(),
        produced_at: "2026-11-23T00:00:00Z".into(),
        ..Default::default()
    };
    rules::canonicalize(&mut s);
    s.content_hash = rules::content_hash(&s);
    s
}

fn full_sync_parent(args: &Args) {
    println!("building a snapshot of {} API keys…", args.keys);
    let t = Instant::now();
    let snap = build_snapshot(args.keys);
    let build = t.elapsed();
    let bytes = snap.encode_to_vec();
    drop(snap);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshot.pb");
    std::fs::write(&path, &bytes).unwrap();
    println!(
        "built and hashed in {:.2} s; {} bytes encoded ({:.1} bytes/key)",
        build.as_secs_f64(),
        bytes.len(),
        bytes.len() as f64 / args.keys as f64
    );
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("--full-sync-child")
        .arg(&path)
        .arg("--keys")
        .arg(args.keys.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

fn full_sync_child(path: &Path, n: usize) {
    let bytes = std::fs::read(path).unwrap();
    let rss_before = rss_kb();
    // What a NATS proxy and a warm start do: keys go from the bytes into the compact table.
    let store = SnapshotStore::new(None, None);
    let t = Instant::now();
    store.apply_full_encoded(&bytes).unwrap();
    let encoded_path = t.elapsed();
    let rss_after = rss_kb();
    let held_kb = rss_after.saturating_sub(rss_before);
    // What a gRPC proxy does: tonic decodes the message, then apply_full.
    let t = Instant::now();
    let decoded = pb::Snapshot::decode(bytes.as_slice()).unwrap();
    let decode = t.elapsed();
    let t = Instant::now();
    rules::validate(&decoded).unwrap();
    let reference_validate = t.elapsed();
    let other = SnapshotStore::new(None, None);
    let t = Instant::now();
    other.apply_full(decoded).unwrap();
    let apply = t.elapsed();
    drop(other);
    println!("| full sync of {n} keys | seconds |");
    println!("|---|---|");
    println!(
        "| **bytes → applied** (`apply_full_encoded`: split, compact, hash check, index, swap; NATS and warm start) | **{:.3}** |",
        encoded_path.as_secs_f64()
    );
    println!(
        "| prost decode of the message (gRPC: tonic does this) | {:.3} |",
        decode.as_secs_f64()
    );
    println!(
        "| `apply_full` of the decoded message (compact, hash check, index, swap) | {:.3} |",
        apply.as_secs_f64()
    );
    println!(
        "| **decode + apply_full** (gRPC path) | **{:.3}** |",
        (decode + apply).as_secs_f64()
    );
    println!(
        "| for reference: `flex_shared::snapshot::validate` on the decoded message | {:.3} |",
        reference_validate.as_secs_f64()
    );
    println!();
    println!(
        "resident memory held by the applied snapshot (VmRSS after − before, bytes path): {} MiB = {:.0} bytes/key",
        held_kb / 1024,
        held_kb as f64 * 1024.0 / n as f64
    );
    // One revocation on top: the delta as the control plane sends it (one removed hash and the
    // new content hash, which it keeps as a running sum), then the proxy's delta apply.
    let current = store.load().unwrap();
    let revoked = current.keys.to_proto().swap_remove(n / 2);
    let mut hash = rules::ContentHash::default();
    let rest = &current.rest;
    for o in &rest.orgs {
        hash.add(3, o);
    }
    for p in &rest.provider_keys {
        hash.add(5, p);
    }
    for m in &rest.models {
        hash.add(6, m);
    }
    hash.combine(&current.keys.content_sum());
    hash.remove(4, &revoked);
    let delta = pb::SnapshotDelta {
        from_version: current.version,
        remove_api_key_hashes: vec![revoked.key_hash.clone()],
        content_hash: hash.to_hex(),
        ..Default::default()
    };
    let version = current.version + 1;
    drop(current);
    let t = Instant::now();
    store
        .apply_update(pb::SnapshotUpdate {
            signature: vec![],
            version,
            kind: Some(pb::snapshot_update::Kind::Delta(delta)),
        })
        .unwrap();
    println!(
        "one revocation at this size: delta apply {:.3} s (proxy: merge into a new key table, hash the changed entry, swap)",
        t.elapsed().as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    if let Some(path) = &args.full_sync_child {
        full_sync_child(path, args.keys);
        return;
    }
    if args.part == "latency" || args.part == "both" {
        latency(&args).await;
    }
    if args.part == "full" || args.part == "both" {
        println!();
        full_sync_parent(&args);
    }
}
