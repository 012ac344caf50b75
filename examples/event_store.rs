//! Event-store benchmark: command throughput through `ControlPlane` commands (each appends one
//! event, then the projection catches up) with concurrent writers, and the time to rebuild the
//! projection from a log of 1,000,000 events, on SQLite and on Postgres.
//!
//! Run: `cargo run --release --example event_store -- [--events N] [--engine sqlite|postgres|both]
//! [--writers W] [--commands C] [--postgres-url postgres://USER@HOST:PORT]`
//!
//! For each engine, on a fresh database (SQLite in a temp dir, Postgres in a new database that is
//! dropped afterwards):
//! 0. Raw `Store::append` (no projection): C single-event appends to new streams over W writers.
//! 1. `create_api_key` and then `set_billing_status` (toggling), C commands each, split over W
//!    writers, each writer on its own org: commands/s and per-command latency.
//! 2. N events of a realistic mix (per org: created and renamed, 50 API keys of which 25 are
//!    revoked, 3 provider keys set and re-wrapped, a plan and status changes) bulk-loaded with
//!    `Store::import_events` (multi-row INSERTs, 10,000 events per transaction).
//! 3. `projection::rebuild` over that log (the fold alone), then `ControlPlane::open` (rebuild
//!    plus the first snapshot), each with the peak RSS of the process during that step; then,
//!    timed alone, cloning the state (what every command's catch-up does; O(1) with persistent
//!    maps) and materializing the full snapshot (what only a proxy's full sync needs).
//! 4. The same commands again on top of the large log (each catches the projection up: folds its
//!    event into the state and the snapshot content and records the change for the deltas).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flex_control_plane::domain::{BillingStatus, Event};
use flex_control_plane::sqlx::{Connection, Executor, PgConnection};
use flex_control_plane::store::{ImportEvent, Metadata, Store};
use flex_control_plane::{projection, ControlPlane};
use flex_shared::crypto::MasterKeyring;

#[derive(Parser, Debug)]
struct Args {
    /// Events in the log that is rebuilt.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// `sqlite`, `postgres` or `both`.
    #[arg(long, default_value = "both")]
    engine: String,
    /// Concurrent writers for the command throughput.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Commands per throughput run (each kind), split over the writers.
    #[arg(long, default_value_t = 4000)]
    commands: usize,
    /// Commands per throughput run on top of the large log.
    #[arg(long, default_value_t = 100)]
    commands_large: usize,
    /// Postgres server (a database is created in it and dropped afterwards).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres_url: String,
}

fn keyring() -> Arc<MasterKeyring> {
    Arc::new(MasterKeyring::parse(&format!("bench={}\n", hex::encode([7u8; 32])), "bench").unwrap())
}

/// Peak resident set size of this process (kB) since the last [`reset_peak_rss`].
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn current_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the peak RSS to the current RSS (Linux: `5` to `/proc/self/clear_refs`).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn mib(kb: Option<u64>) -> String {
    kb.map_or("n/a".into(), |k| format!("{}", k / 1024))
}

/// A fresh database for `engine`; the guard drops it (Postgres) or its directory (SQLite).
enum Db {
    Sqlite { _dir: tempfile::TempDir },
    Postgres { admin: String, name: String },
}

impl Db {
    async fn new(engine: &str, pg: &str) -> (Self, String) {
        match engine {
            "sqlite" => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("flex.db").display());
                (Db::Sqlite { _dir: dir }, url)
            }
            _ => {
                let base = pg.trim_end_matches('/');
                let admin = format!("{base}/postgres");
                let name = format!("flex_bench_{}", uuid::Uuid::new_v4().simple());
                let mut c = PgConnection::connect(&admin).await.unwrap();
                c.execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .unwrap();
                c.close().await.unwrap();
                let url = format!("{base}/{name}");
                (Db::Postgres { admin, name }, url)
            }
        }
    }

    async fn drop_it(self) {
        if let Db::Postgres { admin, name } = self {
            let mut c = PgConnection::connect(&admin).await.unwrap();
            c.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                .await
                .unwrap();
            c.close().await.unwrap();
        }
    }
}

struct Throughput {
    what: &'static str,
    commands: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl Throughput {
    fn per_sec(&self) -> f64 {
        self.commands as f64 / self.elapsed.as_secs_f64()
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// `total` raw single-event appends to new streams over `writers` concurrent writers.
async fn raw_appends(store: &Store, writers: usize, total: usize) -> Throughput {
    let per = total / writers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let meta = Metadata::new("bench");
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let org_id = format!("org_raw{w:02}_{i:08}");
                let event = Event::OrgCreated {
                    org_id: org_id.clone(),
                    name: "raw append".into(),
                }
                .to_new()
                .unwrap();
                let t = Instant::now();
                store
                    .append(&format!("org-{org_id}"), 0, &[event], &meta)
                    .await
                    .unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    lat.sort();
    Throughput {
        what: "Store::append",
        commands: lat.len(),
        elapsed,
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
    }
}

/// `total` commands of one kind over `writers` concurrent writers, each on its own org.
async fn commands(
    cp: &Arc<ControlPlane>,
    orgs: &[String],
    total: usize,
    what: &'static str,
) -> Throughput {
    let per = total / orgs.len();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for org in orgs {
        let (cp, org) = (cp.clone(), org.clone());
        tasks.push(tokio::spawn(async move {
            let meta = Metadata::new("bench");
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let t = Instant::now();
                match what {
                    "create_api_key" => {
                        cp.create_api_key(&meta, &org, "bench", None, None)
                            .await
                            .unwrap();
                    }
                    _ => {
                        let status = if i % 2 == 0 { "past_due" } else { "active" };
                        cp.set_billing_status(&meta, &org, status).await.unwrap();
                    }
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    lat.sort();
    Throughput {
        what,
        commands: lat.len(),
        elapsed,
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
    }
}

async fn writer_orgs(cp: &ControlPlane, writers: usize, tag: &str) -> Vec<String> {
    let mut orgs = Vec::new();
    for w in 0..writers {
        let org = cp
            .create_org(&Metadata::new("bench"), &format!("{tag} writer {w}"), None)
            .await
            .unwrap()
            .org;
        orgs.push(org.org_id);
    }
    orgs
}

/// The events of org number `i`, 100 of them, with their stream positions.
fn org_block(i: usize, keyring: &MasterKeyring) -> Vec<ImportEvent> {
    let org_id = format!("org_bench{i:08}");
    let mut out = Vec::with_capacity(100);
    let mut push = |stream: String, version: u64, e: Event| {
        out.push(ImportEvent {
            stream_id: stream,
            stream_version: version,
            event: e.to_new().unwrap(),
        });
    };
    let org_stream = format!("org-{org_id}");
    push(
        org_stream.clone(),
        1,
        Event::OrgCreated {
            org_id: org_id.clone(),
            name: format!("bench org {i}"),
        },
    );
    for k in 0..50 {
        let key_id = format!("key_bench{i:08}_{k:02}");
        push(
            format!("apikey-{key_id}"),
            1,
            Event::ApiKeyCreated {
                key_id: key_id.clone(),
                org_id: org_id.clone(),
                name: format!("key {k}"),
                key_hash: flex_shared::keys::hash(&key_id),
                hint: "flex_live_AbCd…wxyz".into(),
                expires_at: None,
            },
        );
    }
    for k in 0..25 {
        let key_id = format!("key_bench{i:08}_{k:02}");
        push(
            format!("apikey-{key_id}"),
            2,
            Event::ApiKeyRevoked {
                key_id,
                reason: "rotated".into(),
            },
        );
    }
    for provider in ["openai", "anthropic", "gemini"] {
        let sealed = keyring
            .seal(&org_id, provider, "sk-bench-provider-secret-0123456789")
            .unwrap();
        let stream = format!("providerkey-{org_id}-{provider}");
        push(
            stream.clone(),
            1,
            Event::ProviderKeySet {
                org_id: org_id.clone(),
                provider: provider.into(),
                sealed: sealed.clone(),
                last4: "6789".into(),
            },
        );
        push(
            stream,
            2,
            Event::ProviderKeyRewrapped {
                org_id: org_id.clone(),
                provider: provider.into(),
                sealed,
            },
        );
    }
    for r in 0..8u64 {
        push(
            org_stream.clone(),
            2 + r,
            Event::OrgRenamed {
                org_id: org_id.clone(),
                name: format!("bench org {i} v{r}"),
            },
        );
    }
    let billing = format!("billing-{org_id}");
    push(
        billing.clone(),
        1,
        Event::BillingPlanSet {
            org_id: org_id.clone(),
            plan: "growth".into(),
            fee_bps: 800,
        },
    );
    for s in 0..9u64 {
        push(
            billing.clone(),
            2 + s,
            Event::BillingStatusChanged {
                org_id: org_id.clone(),
                status: if s % 2 == 0 {
                    BillingStatus::PastDue
                } else {
                    BillingStatus::Active
                },
                reason: None,
                overdue_invoice_ids: Vec::new(),
            },
        );
    }
    out
}

/// Bulk-loads `n` events; returns the time it took.
async fn load(store: &Store, n: usize, keyring: &MasterKeyring) -> Duration {
    const PER_TRANSACTION: usize = 10_000;
    let meta = Metadata::new("bench-import");
    let start = Instant::now();
    let mut pending: Vec<ImportEvent> = Vec::with_capacity(PER_TRANSACTION + 100);
    let mut loaded = 0;
    let mut org = 0;
    while loaded < n {
        let mut block = org_block(org, keyring);
        org += 1;
        block.truncate(n - loaded);
        loaded += block.len();
        pending.extend(block);
        if pending.len() >= PER_TRANSACTION || loaded == n {
            store.import_events(&pending, &meta).await.unwrap();
            pending.clear();
        }
    }
    start.elapsed()
}

struct EngineResult {
    engine: String,
    small: Vec<Throughput>,
    load: Duration,
    events: u64,
    rebuild: Duration,
    rebuild_peak_mib: String,
    open: Duration,
    open_peak_mib: String,
    snapshot_keys: usize,
    large_peak_mib: String,
    clone_time: Duration,
    snapshot_time: Duration,
    large: Vec<Throughput>,
}

async fn bench_engine(engine: &str, args: &Args) -> EngineResult {
    println!("== {engine}");
    // 1. Command throughput on a fresh database.
    let (db, url) = Db::new(engine, &args.postgres_url).await;
    let cp = Arc::new(ControlPlane::open(&url, keyring()).await.unwrap());
    let mut small = Vec::new();
    let t = raw_appends(cp.store(), args.writers, args.commands).await;
    println!(
        "  raw appends: {} appends, {} writers, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        t.commands,
        args.writers,
        t.per_sec(),
        t.p50.as_secs_f64() * 1e3,
        t.p99.as_secs_f64() * 1e3
    );
    small.push(t);
    cp.store().close().await;
    drop(cp);
    db.drop_it().await;
    let (db, url) = Db::new(engine, &args.postgres_url).await;
    let cp = Arc::new(ControlPlane::open(&url, keyring()).await.unwrap());
    let orgs = writer_orgs(&cp, args.writers, "small").await;
    for what in ["create_api_key", "set_billing_status"] {
        let t = commands(&cp, &orgs, args.commands, what).await;
        println!(
            "  {what}: {} commands, {} writers, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
            t.commands,
            args.writers,
            t.per_sec(),
            t.p50.as_secs_f64() * 1e3,
            t.p99.as_secs_f64() * 1e3
        );
        small.push(t);
    }
    cp.store().close().await;
    drop(cp);
    db.drop_it().await;

    // 2. The large log.
    let (db, url) = Db::new(engine, &args.postgres_url).await;
    let store = Store::connect(&url).await.unwrap();
    let keys = keyring();
    let load_time = load(&store, args.events, &keys).await;
    let events = store.head().await.unwrap();
    println!(
        "  loaded {events} events in {:.1} s ({:.0} events/s)",
        load_time.as_secs_f64(),
        events as f64 / load_time.as_secs_f64()
    );

    // 3. Rebuild (the fold alone), then open (rebuild + first snapshot).
    let rss_before = current_rss_kb();
    let reset = reset_peak_rss();
    let start = Instant::now();
    let state = projection::rebuild(&store).await.unwrap();
    let rebuild = start.elapsed();
    let rebuild_peak = if reset { peak_rss_kb() } else { None };
    assert_eq!(state.last_seq, events);
    assert!(state.undecodable.is_empty());
    println!(
        "  rebuild: {:.2} s ({:.0} events/s), {} orgs, {} API keys; RSS before {} MiB, peak {} MiB",
        rebuild.as_secs_f64(),
        events as f64 / rebuild.as_secs_f64(),
        state.orgs.len(),
        state.api_keys.len(),
        mib(rss_before),
        mib(rebuild_peak)
    );
    drop(state);
    store.close().await;
    let reset = reset_peak_rss();
    let start = Instant::now();
    let cp = Arc::new(ControlPlane::open(&url, keyring()).await.unwrap());
    let open = start.elapsed();
    let open_peak = if reset { peak_rss_kb() } else { None };
    let snapshot_keys = cp.snapshot().api_keys.len();
    println!(
        "  open (rebuild + snapshot of {snapshot_keys} keys): {:.2} s, peak {} MiB",
        open.as_secs_f64(),
        mib(open_peak)
    );
    let live = cp.state();
    let start = Instant::now();
    let copy = flex_control_plane::projection::State::clone(&live);
    let clone_time = start.elapsed();
    drop(copy);
    let start = Instant::now();
    let snap = live.snapshot();
    let snapshot_time = start.elapsed();
    drop((snap, live));
    println!(
        "  at this size: state clone {:.3} ms (per catch-up), full snapshot build {:.0} ms (only for a proxy's full sync, once per version)",
        clone_time.as_secs_f64() * 1e3,
        snapshot_time.as_secs_f64() * 1e3
    );

    // 4. Commands on top of the large log.
    let reset = reset_peak_rss();
    let orgs = writer_orgs(&cp, args.writers, "large").await;
    let mut large = Vec::new();
    for what in ["create_api_key", "set_billing_status"] {
        let t = commands(&cp, &orgs, args.commands_large, what).await;
        println!(
            "  at {events} events, {what}: {} commands, {:.1}/s, p50 {:.1} ms, p99 {:.1} ms",
            t.commands,
            t.per_sec(),
            t.p50.as_secs_f64() * 1e3,
            t.p99.as_secs_f64() * 1e3
        );
        large.push(t);
    }
    let large_peak = if reset { peak_rss_kb() } else { None };
    println!(
        "  peak RSS while running commands on the large log: {} MiB",
        mib(large_peak)
    );
    cp.store().close().await;
    drop(cp);
    db.drop_it().await;
    EngineResult {
        engine: engine.to_string(),
        small,
        load: load_time,
        events,
        rebuild,
        rebuild_peak_mib: mib(rebuild_peak),
        open,
        open_peak_mib: mib(open_peak),
        snapshot_keys,
        large_peak_mib: mib(large_peak),
        clone_time,
        snapshot_time,
        large,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let engines: Vec<&str> = match args.engine.as_str() {
        "sqlite" => vec!["sqlite"],
        "postgres" => vec!["postgres"],
        "both" => vec!["sqlite", "postgres"],
        other => panic!("--engine must be sqlite, postgres or both (got {other})"),
    };
    assert!(args.writers > 0 && args.commands >= args.writers);
    let mut results = Vec::new();
    for e in engines {
        results.push(bench_engine(e, &args).await);
    }

    println!();
    println!("| engine | run | commands | writers | commands/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        for (log, runs) in [("fresh database", &r.small), ("large log", &r.large)] {
            for t in runs {
                let log = if log == "large log" {
                    format!("after {} events", r.events)
                } else {
                    log.to_string()
                };
                println!(
                    "| {} | `{}`, {log} | {} | {} | {:.0} | {:.2} | {:.2} |",
                    r.engine,
                    t.what,
                    t.commands,
                    args.writers,
                    t.per_sec(),
                    t.p50.as_secs_f64() * 1e3,
                    t.p99.as_secs_f64() * 1e3
                );
            }
        }
    }
    println!();
    println!("| engine | events | bulk load s | rebuild s | rebuild events/s | rebuild peak RSS MiB | open (rebuild + snapshot) s | open peak RSS MiB | keys in snapshot | state clone ms (per catch-up) | full snapshot build ms (full syncs only) | peak RSS MiB, commands on the large log |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.0} | {} | {:.2} | {} | {} | {:.3} | {:.0} | {} |",
            r.engine,
            r.events,
            r.load.as_secs_f64(),
            r.rebuild.as_secs_f64(),
            r.events as f64 / r.rebuild.as_secs_f64(),
            r.rebuild_peak_mib,
            r.open.as_secs_f64(),
            r.open_peak_mib,
            r.snapshot_keys,
            r.clone_time.as_secs_f64() * 1e3,
            r.snapshot_time.as_secs_f64() * 1e3,
            r.large_peak_mib
        );
    }
}
