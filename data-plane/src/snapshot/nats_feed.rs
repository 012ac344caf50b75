//! Following the snapshot chain on NATS JetStream (full snapshots, deltas, a resync from the
//! newest full one), with the stream position kept in the state dir.

use std::sync::Arc;

use flex_shared::private_fs;

use super::*;

/// Where a NATS follower stands in the snapshot stream, next to the persisted snapshot: the
/// version it applied and the stream sequence of the message that brought it, as `VERSION SEQ`.
const NATS_POSITION_FILE: &str = "nats-position";

fn read_nats_position(dir: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(dir.join(NATS_POSITION_FILE)).ok()?;
    let mut parts = text.split_whitespace();
    let version = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    Some((version, seq))
}

fn write_nats_position(dir: &Path, version: u64, seq: u64) -> std::io::Result<()> {
    private_fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{NATS_POSITION_FILE}.tmp"));
    private_fs::write(&tmp, format!("{version} {seq}\n"))?;
    std::fs::rename(&tmp, dir.join(NATS_POSITION_FILE))
}

/// A chunked update being put back together.
struct Chunks {
    version: u64,
    next: usize,
    total: usize,
    /// `None` when the update is already applied and is only being skipped.
    buf: Option<Vec<u8>>,
}

fn header_u64(h: Option<&async_nats::HeaderMap>, name: &str) -> Option<u64> {
    h?.get(name)?.as_str().parse().ok()
}

fn header_chunk(h: Option<&async_nats::HeaderMap>) -> Option<(usize, usize)> {
    let v = h?.get(nats::HEADER_CHUNK)?.as_str().to_string();
    let (i, n) = v.split_once('/')?;
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// The newest full snapshot in the stream: its version and the sequence of its first chunk.
async fn latest_full(
    stream: &async_nats::jetstream::stream::Stream,
) -> Result<Option<(u64, u64)>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    match stream
        .get_last_raw_message_by_subject(nats::FULL_SUBJECT)
        .await
    {
        Ok(m) => {
            let version = header_u64(Some(&m.headers), nats::HEADER_VERSION).unwrap_or(0);
            let first = header_u64(Some(&m.headers), nats::HEADER_FIRST_SEQ).unwrap_or(m.sequence);
            Ok(Some((version, first)))
        }
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
        Err(e) => Err(format!("newest full snapshot: {e}")),
    }
}

/// Reports applied (or refused) versions to the control plane, fire and forget.
struct Reporter {
    client: async_nats::Client,
    subject: String,
    proxy_id: String,
}

impl Reporter {
    async fn report(&self, version: u64, accepted: bool, error: String) {
        let ack = pb::AckRequest {
            proxy_id: self.proxy_id.clone(),
            version,
            accepted,
            error,
        };
        if let Err(e) = self
            .client
            .publish(self.subject.clone(), ack.encode_to_vec().into())
            .await
        {
            tracing::debug!(error = %e, "could not report the snapshot version over NATS");
        }
    }
}

/// How often a NATS follower reports its version when nothing changes (the control plane
/// counts it connected while reports keep coming).
const NATS_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);

/// Follows the snapshot stream on NATS JetStream (see `flex_shared::snapshot::nats`), connecting
/// to `nats_url` without credentials (reconnecting forever); see [`follow_nats_client`].
pub async fn follow_nats(store: Arc<SnapshotStore>, nats_url: String, proxy_id: String) {
    let client = match async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(nats_url.as_str())
        .await
    {
        Ok(c) => c,
        Err(e) => {
            let why = format!("NATS {}: {e}", flex_shared::redact::url(&nats_url));
            tracing::error!(error = %why, "cannot follow snapshots over NATS");
            store.set_connected(false, Some(why));
            return;
        }
    };
    follow_nats_client(store, client, proxy_id).await;
}

/// How often the follower looks at the NATS connection state.
const NATS_STATE_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Follows the snapshot stream on NATS JetStream over `client` (which should reconnect by
/// itself), forever: an ordered consumer from the stream sequence after the last applied update
/// (kept in memory, and in the state dir for a restart), or from the newest full snapshot when
/// there is none. While NATS is away the last good snapshot keeps serving; on reconnect the
/// consumer starts again from where it was, so only what changed is fetched. A delta that does
/// not apply (a gap, a hash mismatch) is refused and the follower starts again from the newest
/// full snapshot when that one is newer than what it has. Every applied or refused version is
/// reported on `flex.snapshot.ack.<proxy_id>`, and the current one every 15 s.
pub async fn follow_nats_client(
    store: Arc<SnapshotStore>,
    client: async_nats::Client,
    proxy_id: String,
) {
    let js = async_nats::jetstream::new(client.clone());
    let reporter = Reporter {
        client: client.clone(),
        subject: nats::ack_subject(&proxy_id),
        proxy_id,
    };
    // The position is recorded when an update is applied, the snapshot written later by the
    // persister: resume from the position only if it belongs to the snapshot we loaded, else
    // (a crash in between) start from the newest full, skipping what we have.
    let mut resume = match (
        store.state_dir().and_then(read_nats_position),
        store.version(),
    ) {
        (Some((pv, seq)), v) if v > 0 && pv == v => Some(seq + 1),
        (Some((pv, _)), v) if v > 0 => {
            tracing::warn!(
                position_version = pv,
                snapshot_version = v,
                "the recorded NATS position is not the persisted snapshot's; starting from the newest full snapshot"
            );
            None
        }
        _ => None,
    };
    let mut backoff = std::time::Duration::from_millis(100);
    let mut resync = Resync::default();
    loop {
        if client.connection_state() != async_nats::connection::State::Connected {
            store.set_connected(false, Some("NATS is unreachable".into()));
            // The client reconnects by itself.
            while client.connection_state() != async_nats::connection::State::Connected {
                tokio::time::sleep(NATS_STATE_POLL).await;
            }
        }
        let mut progressed = false;
        let result = follow_nats_once(
            &js,
            &client,
            &store,
            &reporter,
            &mut resume,
            &mut progressed,
            &mut resync,
        )
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "NATS snapshot feed interrupted; serving the last good snapshot");
            store.set_connected(false, Some(e));
        }
        if progressed {
            backoff = std::time::Duration::from_millis(100);
        }
        let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1);
        tokio::time::sleep(backoff + std::time::Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

/// A NATS follower's resync state, kept across consumers.
#[derive(Default)]
struct Resync {
    /// A resync in progress: the full it started from and the chain rebuilt off to the side.
    staging: Option<(u64, SnapshotStore)>,
    /// The full a resync already failed from (its chain is broken): wait for a newer one.
    failed_full: Option<u64>,
}

/// One consumer's life: from `resume` (or the newest full) until an error, a lost connection or a
/// resync. `Ok` means start again at once from `resume`.
async fn follow_nats_once(
    js: &async_nats::jetstream::Context,
    client: &async_nats::Client,
    store: &SnapshotStore,
    reporter: &Reporter,
    resume: &mut Option<u64>,
    progressed: &mut bool,
    resync: &mut Resync,
) -> Result<(), String> {
    let Resync {
        staging,
        failed_full,
    } = resync;
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    use futures_util::StreamExt;
    let connects = client
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed);
    let stream = js.get_stream(nats::STREAM).await.map_err(|e| {
        let missing = matches!(
            e.kind(),
            async_nats::jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
        );
        if missing {
            format!(
                "snapshot stream {}: {e}: the control plane creates it when it starts \
                     publishing; check that `flex control` runs with --nats-url pointing at this \
                     server and what its log says",
                nats::STREAM
            )
        } else {
            format!("snapshot stream {}: {e}", nats::STREAM)
        }
    })?;
    let state = &stream.cached_info().state;
    let (first, last) = (state.first_sequence, state.last_sequence);
    if let Some(seq) = *resume {
        // Past the end: the stream was recreated (its store lost). Before its start: what we
        // missed was discarded. Either way, start again from the newest full.
        if seq > last + 1 || (seq < first && last > 0) {
            tracing::warn!(resume = seq, first, last, "snapshot stream does not hold our position; resyncing from the newest full snapshot");
            *resume = None;
        }
    }
    let start = match *resume {
        Some(seq) => seq,
        None => match latest_full(&stream).await? {
            Some((_, first)) => first,
            None => return Err("the snapshot stream has no full snapshot yet".into()),
        },
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| format!("snapshot consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("snapshot consumer: {e}"))?;
    store.set_connected(true, None);
    *progressed = true;
    tracing::info!(
        start_sequence = start,
        version = store.version(),
        "following snapshots over NATS"
    );
    let mut heartbeat = tokio::time::interval(NATS_HEARTBEAT);
    let mut state_poll = tokio::time::interval(NATS_STATE_POLL);
    let mut chunks: Option<Chunks> = None;
    loop {
        let msg = tokio::select! {
            m = messages.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(format!("snapshot consumer: {e}")),
                None => return Err("the snapshot consumer ended".into()),
            },
            _ = state_poll.tick() => {
                // A reconnect, however quick, may come back to a server that lost our consumer
                // (or all of JetStream's state): start a new consumer from our position.
                if client.connection_state() != async_nats::connection::State::Connected
                    || client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed) != connects
                {
                    return Err("NATS connection lost".into());
                }
                continue;
            }
            _ = heartbeat.tick() => {
                if store.load().is_some() {
                    reporter.report(store.version(), true, String::new()).await;
                }
                continue;
            }
        };
        let seq = msg
            .info()
            .map_err(|e| format!("snapshot message: {e}"))?
            .stream_sequence;
        let headers = msg.headers.as_ref();
        let version = header_u64(headers, nats::HEADER_VERSION).unwrap_or(0);
        // Already applied (e.g. the full a restarted control plane publishes first): skip it
        // without decoding. During a resync, "applied" means applied to the staging store.
        let target: &SnapshotStore = staging.as_ref().map_or(store, |(_, st)| st);
        let have = target.load().is_some().then(|| target.version());
        // A heartbeat (an empty delta to the version we have, with a newer `produced_at`) is
        // applied, not skipped: it is what keeps the snapshot's age small while nothing changes.
        let heartbeat = headers
            .and_then(|h| h.get(nats::HEADER_HEARTBEAT))
            .is_some_and(|v| v.as_str() == "1");
        let stale = have.is_some_and(|h| {
            version != 0 && (version < h || (version == h && !(heartbeat && staging.is_none())))
        });
        let payload = match header_chunk(headers) {
            None => {
                chunks = None;
                msg.payload.to_vec()
            }
            Some((i, n)) => {
                if i == 0 {
                    chunks = Some(Chunks {
                        version,
                        next: 0,
                        total: n,
                        // The header is not trusted for the allocation: capped at 1 GiB.
                        buf: (!stale).then(|| {
                            Vec::with_capacity(msg.payload.len().saturating_mul(n).min(1 << 30))
                        }),
                    });
                }
                let Some(c) = chunks
                    .as_mut()
                    .filter(|c| c.version == version && c.next == i && c.total == n)
                else {
                    // A chunk out of place (the stream dropped the start of this update).
                    chunks = None;
                    continue;
                };
                if let Some(buf) = c.buf.as_mut() {
                    buf.extend_from_slice(&msg.payload);
                }
                c.next += 1;
                if c.next < c.total {
                    continue;
                }
                chunks.take().and_then(|c| c.buf).unwrap_or_default()
            }
        };
        if stale {
            *resume = Some(seq + 1);
            continue;
        }
        if let Some((from_full, st)) = staging.as_ref() {
            // Resyncing: the chain goes to the staging store until it passes our version.
            match off_worker(|| st.apply_update_encoded(&payload)) {
                Ok(v) if v > store.version() => {
                    let adopted = st.load().ok_or("staging store without a snapshot")?;
                    *staging = None;
                    let v = store.adopt(adopted).map_err(|e| e.to_string())?;
                    *resume = Some(seq + 1);
                    if let Some(dir) = store.state_dir() {
                        if let Err(e) = write_nats_position(dir, v, seq) {
                            tracing::warn!(error = %e, "could not record the NATS position in the state dir");
                        }
                    }
                    reporter.report(v, true, String::new()).await;
                }
                Ok(_) => *resume = Some(seq + 1),
                Err(e) => {
                    tracing::warn!(error = %e, "resync from the newest full snapshot failed; waiting for the next full");
                    *failed_full = Some(*from_full);
                    *staging = None;
                    *resume = Some(seq + 1);
                }
            }
            continue;
        }
        let outcome = off_worker(|| store.apply_update_encoded(&payload));
        match outcome {
            Ok(v) => {
                *resume = Some(seq + 1);
                if let Some(dir) = store.state_dir() {
                    if let Err(e) = write_nats_position(dir, v, seq) {
                        tracing::warn!(error = %e, "could not record the NATS position in the state dir");
                    }
                }
                reporter.report(v, true, String::new()).await;
            }
            Err(e) => {
                reporter.report(version, false, e.to_string()).await;
                match latest_full(&stream).await? {
                    Some((full, first)) if full > store.version() || store.load().is_none() => {
                        tracing::warn!(error = %e, full_version = full, "resyncing from the newest full snapshot");
                        *resume = Some(first);
                        return Ok(());
                    }
                    // The newest full is not newer than what we have: rebuild its chain off to
                    // the side (this snapshot keeps serving) and swap it in once it passes ours.
                    Some((full, first)) if *failed_full != Some(full) => {
                        tracing::warn!(error = %e, full_version = full, version = store.version(), "resyncing: replaying the chain from the newest full snapshot beside the current one");
                        *staging = Some((full, store.staging()));
                        *resume = Some(first);
                        return Ok(());
                    }
                    // No full, or one whose chain already failed: wait for the next full.
                    _ => *resume = Some(seq + 1),
                }
            }
        }
    }
}

#[cfg(test)]
mod position_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_stream_position_is_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        write_nats_position(&dir, 7, 42).unwrap();
        assert_eq!(read_nats_position(&dir), Some((7, 42)));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(NATS_POSITION_FILE)), 0o600);
    }
}
