//! Publishes every snapshot version to NATS JetStream, once, for any number of proxies.
//!
//! Layout ([`flex_shared::snapshot::nats`]): the stream `FLEX_SNAPSHOTS` keeps the published
//! versions in order, full snapshots on `flex.snapshot.full` and deltas on `flex.snapshot.delta`,
//! each a prost-encoded `SnapshotUpdate`. A full goes out first (at start, after a restart of
//! this process, when the stream had to be created), and whenever the delta would be larger
//! than the full; deltas otherwise. When a periodic full is due ([`FullPolicy`]) the version goes
//! out twice: as a delta, which following proxies apply, then as a full, which they skip as
//! already applied (by its version header, without reassembling it) and from which a joining
//! proxy starts.
//! An update larger than the server's `max_payload` is split into chunks published back to back.
//! `Nats-Msg-Id` is the version (plus `-full` and the chunk index), so a retried publish is
//! stored once within the stream's duplicate window. The stream is bounded by age, message count
//! and bytes, oldest discarded first; a proxy that falls behind what is left starts again from
//! the newest full.
//!
//! Why a stream rather than a KV bucket: a KV bucket keeps the latest value per key, so a proxy
//! that reconnects gets the whole snapshot again; the stream keeps the chain of deltas, so it
//! resumes from the sequence after its last applied update and receives only what changed.
//!
//! Run one publisher per stream. A second control plane publishing too is harmless (the same
//! versions carry the same message ids) but its deltas may start from other versions, and a
//! proxy that meets such a gap starts again from the newest full.
//!
//! Proxies report each applied (or refused) version on `flex.snapshot.ack.<proxy>`, plus a
//! heartbeat; [`ControlPlane::publish_snapshots_to_nats`] records them in the proxy registry, so
//! `flex admin proxies` lists NATS proxies next to gRPC ones.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use flex_shared::proto::control as pb;
use flex_shared::snapshot::nats;
use futures_util::StreamExt;
use prost::Message;
use tokio::task::JoinHandle;

use crate::{ControlPlane, Published};

/// Settings of the snapshot stream.
#[derive(Debug, Clone)]
pub struct NatsSnapshotConfig {
    /// Stream name (default `FLEX_SNAPSHOTS`).
    pub stream: String,
    /// A full snapshot after at most this many deltas (see [`FullPolicy`] for the other
    /// triggers).
    pub full_every: u32,
    /// Messages older than this are discarded.
    pub max_age: Duration,
    /// At most this many messages (chunks count one each).
    pub max_messages: i64,
    /// At most this many bytes.
    pub max_bytes: i64,
    /// `Nats-Msg-Id` deduplication window.
    pub duplicate_window: Duration,
}

impl Default for NatsSnapshotConfig {
    fn default() -> Self {
        Self {
            stream: nats::STREAM.to_string(),
            full_every: 10_000,
            max_age: Duration::from_secs(24 * 3600),
            max_messages: 100_000,
            max_bytes: 1 << 30,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// The running publisher; dropping it stops publishing and listening for reports.
pub struct NatsPublisher {
    published: Arc<AtomicU64>,
    fulls: Arc<AtomicU64>,
    chunked: Arc<AtomicU64>,
    last_error: Arc<std::sync::Mutex<Option<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl NatsPublisher {
    /// The last version stored in the stream by this publisher (0 = none yet).
    pub fn published_version(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// How many full snapshots this publisher stored.
    pub fn fulls_published(&self) -> u64 {
        self.fulls.load(Ordering::Relaxed)
    }

    /// How many updates were larger than the server's `max_payload` and went out in chunks.
    pub fn chunked_published(&self) -> u64 {
        self.chunked.load(Ordering::Relaxed)
    }

    /// Why the last attempt to create the stream or publish failed, until the next success.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }
}

impl Drop for NatsPublisher {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher")
            .field("published_version", &self.published_version())
            .field("last_error", &self.last_error())
            .finish_non_exhaustive()
    }
}

pub use async_nats::ConnectOptions;

impl ControlPlane {
    /// Connects to NATS at `url` (credentials in `options`; reconnecting forever, the first
    /// connection too, so the control plane starts while NATS is down) and starts
    /// [`ControlPlane::publish_snapshots_to_nats`].
    pub async fn start_nats_snapshots(
        self: &Arc<Self>,
        url: &str,
        options: ConnectOptions,
        cfg: NatsSnapshotConfig,
    ) -> crate::error::Result<NatsPublisher> {
        let client = options
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(url)
            .await
            .map_err(|e| {
                crate::error::Error::Internal(format!(
                    "NATS {}: {e}",
                    flex_shared::redact::url(url)
                ))
            })?;
        tracing::info!(url = %flex_shared::redact::url(url), stream = %cfg.stream, "publishing snapshots to NATS");
        Ok(self.publish_snapshots_to_nats(client, cfg))
    }

    /// Starts publishing snapshots to JetStream over `client` and recording the proxies' reports.
    /// Both tasks run until the returned handle is dropped, riding out NATS outages.
    pub fn publish_snapshots_to_nats(
        self: &Arc<Self>,
        client: async_nats::Client,
        cfg: NatsSnapshotConfig,
    ) -> NatsPublisher {
        let published = Arc::new(AtomicU64::new(0));
        let fulls = Arc::new(AtomicU64::new(0));
        let chunked = Arc::new(AtomicU64::new(0));
        let last_error = Arc::new(std::sync::Mutex::new(None));
        let publisher = tokio::spawn(publish_loop(
            self.clone(),
            client.clone(),
            cfg,
            Counters {
                published: published.clone(),
                fulls: fulls.clone(),
                chunked: chunked.clone(),
                last_error: last_error.clone(),
            },
        ));
        let reports = tokio::spawn(report_loop(self.clone(), client));
        NatsPublisher {
            published,
            fulls,
            chunked,
            last_error,
            tasks: vec![publisher, reports],
        }
    }
}

/// JetStream's "insufficient storage resources available" (a stream's `max_bytes` is more than
/// the server's file store has left).
const INSUFFICIENT_STORAGE: jetstream::ErrorCode = jetstream::ErrorCode(10047);

/// Gets the stream, creating it when missing. Returns whether it had to be created.
async fn ensure_stream(js: &jetstream::Context, cfg: &NatsSnapshotConfig) -> Result<bool, String> {
    match js.get_stream(&cfg.stream).await {
        Ok(_) => Ok(false),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            js.create_stream(stream::Config {
                name: cfg.stream.clone(),
                subjects: vec![nats::FULL_SUBJECT.into(), nats::DELTA_SUBJECT.into()],
                max_age: cfg.max_age,
                max_messages: cfg.max_messages,
                max_bytes: cfg.max_bytes,
                // JetStream refuses a duplicate window longer than max_age.
                duplicate_window: cfg.duplicate_window.min(cfg.max_age),
                discard: stream::DiscardPolicy::Old,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                let storage = matches!(
                    e.kind(),
                    jetstream::context::CreateStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::INSUFFICIENT_RESOURCES
                            || j.error_code() == INSUFFICIENT_STORAGE
                );
                if storage {
                    format!(
                        "create stream {}: {e}: JetStream reserves the stream's max_bytes ({} MiB) \
                         up front and has less file store left; give nats-server more \
                         (`jetstream {{ max_file_store: 20GB }}` in its config; unset, it takes \
                         75 % of the disk's free space at start) or free disk space",
                        cfg.stream,
                        cfg.max_bytes / (1024 * 1024)
                    )
                } else {
                    format!("create stream {}: {e}", cfg.stream)
                }
            })?;
            tracing::info!(stream = %cfg.stream, "created the NATS snapshot stream");
            Ok(true)
        }
        Err(e) => Err(format!("get stream {}: {e}", cfg.stream)),
    }
}

/// An update ready to publish.
struct Outgoing {
    version: u64,
    full: bool,
    /// An empty delta refreshing `produced_at` ([`ControlPlane::heartbeat_update`]).
    heartbeat: bool,
    bytes: Vec<u8>,
}

/// The encoding of `SnapshotUpdate { version, full: s, signature }`, without copying the
/// snapshot into one.
fn encode_full(s: &pb::Snapshot, signature: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(s.encoded_len() + 96);
    if s.version != 0 {
        prost::encoding::uint64::encode(1, &s.version, &mut buf);
    }
    prost::encoding::message::encode(2, s, &mut buf);
    if !signature.is_empty() {
        prost::encoding::bytes::encode(4, &signature.to_vec(), &mut buf);
    }
    buf
}

/// When a periodic full snapshot is due: after `full_every` deltas, once the deltas since the
/// last full add up to a quarter of its size (at least 1 MiB), so a joining proxy never replays
/// more than that on top of the full, and at least every half `max_age`, so the stream always
/// holds a full. A full of a million keys is about 145 MB, and the deltas published after it wait
/// until it is stored, so it should be rare; deltas cost bytes proportional to what changed.
#[derive(Debug)]
struct FullPolicy {
    deltas: u32,
    delta_bytes: usize,
    last_full_bytes: usize,
    last_full_at: std::time::Instant,
}

impl Default for FullPolicy {
    fn default() -> Self {
        Self {
            deltas: 0,
            delta_bytes: 0,
            last_full_bytes: 0,
            last_full_at: std::time::Instant::now(),
        }
    }
}

impl FullPolicy {
    fn due(&self, cfg: &NatsSnapshotConfig) -> bool {
        self.deltas >= cfg.full_every
            || self.delta_bytes >= (self.last_full_bytes / 4).max(1 << 20)
            || self.last_full_at.elapsed() >= cfg.max_age / 2
    }

    /// Time left until the age rule makes a full due.
    fn until_timed_full(&self, cfg: &NatsSnapshotConfig) -> Duration {
        (cfg.max_age / 2).saturating_sub(self.last_full_at.elapsed())
    }

    fn published(&mut self, out: &Outgoing) {
        if out.heartbeat {
            return;
        }
        if out.full {
            *self = Self {
                last_full_bytes: out.bytes.len(),
                ..Self::default()
            };
        } else {
            self.deltas += 1;
            self.delta_bytes += out.bytes.len();
        }
    }
}

/// What to publish for `next`: the delta from `last` (the change records merged) when the
/// records cover the span and it is no larger than the full, followed by the full when one is
/// due (followers apply the delta and skip the full as already applied, without reassembling
/// it; a joining proxy starts from the full); the full alone otherwise.
fn next_updates(
    cp: &ControlPlane,
    last: Option<u64>,
    next: &Published,
    full_due: bool,
) -> VecDeque<Outgoing> {
    let delta = last.and_then(|last| {
        cp.delta(last, next)
            .filter(|d| crate::delta_entries(d) <= next.content().len())
    });
    let mut out = VecDeque::new();
    if let Some(d) = delta {
        let mut update = pb::SnapshotUpdate {
            version: next.version,
            kind: Some(pb::snapshot_update::Kind::Delta(d)),
            signature: Vec::new(),
        };
        if let Some(signer) = cp.signer.get() {
            signer.sign_update(&mut update);
        }
        out.push_back(Outgoing {
            version: next.version,
            full: false,
            heartbeat: false,
            bytes: update.encode_to_vec(),
        });
        if !full_due {
            return out;
        }
    }
    out.push_back(full_update(cp, next));
    out
}

fn full_update(cp: &ControlPlane, next: &Published) -> Outgoing {
    Outgoing {
        version: next.version,
        full: true,
        heartbeat: false,
        bytes: encode_full(&next.full(), &cp.full_signature(next)),
    }
}

/// Publishes one update (in chunks when needed) and waits until the stream stored all of it.
/// Returns the number of messages.
async fn publish(
    js: &jetstream::Context,
    max_payload: usize,
    out: &Outgoing,
) -> Result<usize, String> {
    let version = out.version;
    let (subject, id) = if out.full {
        (nats::FULL_SUBJECT, format!("{version}-full"))
    } else if out.heartbeat {
        // Unique: a heartbeat must not be deduplicated against the version's delta.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        (nats::DELTA_SUBJECT, format!("{version}-hb-{now}"))
    } else {
        (nats::DELTA_SUBJECT, version.to_string())
    };
    // Leave room for headers and protocol overhead.
    let chunk = max_payload.saturating_sub(4096).max(4096);
    let parts: Vec<&[u8]> = if out.bytes.is_empty() {
        vec![&[][..]]
    } else {
        out.bytes.chunks(chunk).collect()
    };
    let n = parts.len();
    let mut first_seq = None;
    let mut acks = Vec::with_capacity(n);
    for (i, part) in parts.into_iter().enumerate() {
        let mut h = HeaderMap::new();
        h.insert(nats::HEADER_VERSION, version.to_string().as_str());
        if out.heartbeat {
            h.insert(nats::HEADER_HEARTBEAT, "1");
        }
        if n > 1 {
            h.insert("Nats-Msg-Id", format!("{id}/{i}").as_str());
            h.insert(nats::HEADER_CHUNK, format!("{i}/{n}").as_str());
        } else {
            h.insert("Nats-Msg-Id", id.as_str());
        }
        if let Some(seq) = first_seq {
            h.insert(nats::HEADER_FIRST_SEQ, format!("{seq}").as_str());
        }
        let ack = js
            .publish_with_headers(subject, h, part.to_vec().into())
            .await
            .map_err(|e| format!("publish version {version}: {e}"))?;
        if i == 0 {
            // The later chunks name the first one, so a proxy can start from it.
            let ack = ack
                .await
                .map_err(|e| format!("publish version {version}: {e}"))?;
            first_seq = Some(ack.sequence);
        } else {
            acks.push(ack);
        }
    }
    for ack in acks {
        ack.await
            .map_err(|e| format!("publish version {version}: {e}"))?;
    }
    Ok(n)
}

struct Counters {
    published: Arc<AtomicU64>,
    fulls: Arc<AtomicU64>,
    chunked: Arc<AtomicU64>,
    last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl Counters {
    fn set_error(&self, e: Option<&str>) {
        if let Ok(mut last) = self.last_error.lock() {
            if last.as_deref() != e {
                *last = e.map(str::to_string);
            }
        }
    }
}

async fn publish_loop(
    cp: Arc<ControlPlane>,
    client: async_nats::Client,
    cfg: NatsSnapshotConfig,
    counters: Counters,
) {
    let js = jetstream::new(client.clone());
    let mut rx = cp.subscribe();
    let mut last: Option<u64> = None;
    let mut policy = FullPolicy::default();
    let mut pending: VecDeque<Outgoing> = VecDeque::new();
    let mut backoff = Duration::from_millis(100);
    // When the stream last got something from us (heartbeats fill the silence).
    let mut last_sent = tokio::time::Instant::now();
    let heartbeat = cp.snapshot_heartbeat();
    loop {
        match ensure_stream(&js, &cfg).await {
            Ok(created) => {
                if created && last.is_some() {
                    // A new stream starts with a full snapshot.
                    last = None;
                    pending.clear();
                }
                let result: Result<(), String> = async {
                    loop {
                        let current = rx.borrow_and_update().clone();
                        if pending.is_empty() && last != Some(current.version) {
                            let full_due = policy.due(&cfg);
                            // A full is O(entries) to build and encode: off the runtime threads.
                            let (cp2, next) = (cp.clone(), current.clone());
                            pending = tokio::task::spawn_blocking(move || {
                                next_updates(&cp2, last, &next, full_due)
                            })
                            .await
                            .map_err(|e| format!("building the update: {e}"))?;
                        }
                        if let Some(out) = pending.front() {
                            let max_payload = client.server_info().max_payload;
                            let chunks = publish(&js, max_payload, out).await?;
                            policy.published(out);
                            if out.full {
                                counters.fulls.fetch_add(1, Ordering::Relaxed);
                            }
                            if chunks > 1 {
                                counters.chunked.fetch_add(1, Ordering::Relaxed);
                            }
                            counters.published.store(out.version, Ordering::Relaxed);
                            last_sent = tokio::time::Instant::now();
                            counters.set_error(None);
                            tracing::debug!(
                                version = out.version,
                                full = out.full,
                                bytes = out.bytes.len(),
                                "snapshot published to NATS"
                            );
                            if let Some(done) = pending.pop_front() {
                                last = Some(done.version);
                            }
                            backoff = Duration::from_millis(100);
                            continue;
                        }
                        tokio::select! {
                            changed = rx.changed() => {
                                if changed.is_err() {
                                    return Ok(()); // the control plane is gone
                                }
                            }
                            // Idle for half of max_age: a full of the current version, so the
                            // stream never loses its last full to age (followers skip it).
                            () = tokio::time::sleep(policy.until_timed_full(&cfg)) => {
                                if last == Some(current.version) {
                                    let (cp2, next) = (cp.clone(), current.clone());
                                    let full = tokio::task::spawn_blocking(move || full_update(&cp2, &next))
                                        .await
                                        .map_err(|e| format!("building the full: {e}"))?;
                                    pending.push_back(full);
                                }
                            }
                            // Idle for a heartbeat interval: an empty delta with a fresh
                            // `produced_at`, so the proxies' snapshot age stays small.
                            () = tokio::time::sleep_until(last_sent + heartbeat.unwrap_or(Duration::ZERO)), if heartbeat.is_some() => {
                                if last == Some(current.version) {
                                    pending.push_back(Outgoing {
                                        version: current.version,
                                        full: false,
                                        heartbeat: true,
                                        bytes: cp.heartbeat_update(&current).encode_to_vec(),
                                    });
                                } else {
                                    last_sent = tokio::time::Instant::now();
                                }
                            }
                        }
                    }
                }
                .await;
                match result {
                    Ok(()) => return,
                    // The same update is retried with the same message ids, so one whose ack was
                    // lost but which was stored is not stored twice (and a proxy skips a copy
                    // older than what it has); the chain of deltas stays unbroken.
                    Err(e) => {
                        counters.set_error(Some(&e));
                        // A periodic full after its version's delta is for joiners only: when
                        // it fails, drop it rather than hold the next deltas back (the policy
                        // asks for one again).
                        if pending
                            .front()
                            .is_some_and(|o| o.full && Some(o.version) == last)
                        {
                            pending.clear();
                            tracing::warn!(error = %e, "periodic full snapshot not published to NATS; deltas go on, a full is retried later");
                        } else {
                            tracing::warn!(error = %e, "snapshot publish to NATS failed; retrying")
                        }
                    }
                }
            }
            Err(e) => {
                counters.set_error(Some(&e));
                tracing::warn!(error = %e, "NATS snapshot stream unavailable; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Records the proxies' reports (`AckRequest` on `flex.snapshot.ack.>`) in the registry.
async fn report_loop(cp: Arc<ControlPlane>, client: async_nats::Client) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match client.subscribe(format!("{}.>", nats::ACK_PREFIX)).await {
            Ok(mut sub) => {
                backoff = Duration::from_millis(100);
                while let Some(msg) = sub.next().await {
                    let Ok(ack) = pb::AckRequest::decode(msg.payload.as_ref()) else {
                        tracing::warn!(subject = %msg.subject, "undecodable snapshot report ignored");
                        continue;
                    };
                    let Ok(proxy_id) = crate::domain::validate_id(
                        "proxy_id",
                        &ack.proxy_id,
                        "the proxy's hostname",
                    ) else {
                        tracing::warn!(subject = %msg.subject, "snapshot report without a valid proxy id ignored");
                        continue;
                    };
                    let error: String = ack.error.chars().take(1000).collect();
                    cp.proxies()
                        .nats_report(&proxy_id, ack.version, ack.accepted, &error);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to snapshot reports; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_full_is_encoded_as_the_update_message() {
        let s = pb::Snapshot {
            version: 42,
            content_hash: "h".into(),
            orgs: vec![pb::OrgEntry {
                org_id: "o".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let reference = pb::SnapshotUpdate {
            version: 42,
            kind: Some(pb::snapshot_update::Kind::Full(s.clone())),
            signature: vec![],
        }
        .encode_to_vec();
        assert_eq!(encode_full(&s, &[]), reference);
        let signed = pb::SnapshotUpdate {
            version: 42,
            kind: Some(pb::snapshot_update::Kind::Full(s.clone())),
            signature: vec![7; 64],
        }
        .encode_to_vec();
        assert_eq!(encode_full(&s, &[7; 64]), signed);
    }
}
