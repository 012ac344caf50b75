//! Which proxies are connected, and which snapshot version each one applied.
//!
//! Entries are in memory, per control-plane instance: a proxy's Watch stream lives on exactly one
//! instance, and `ListProxies` answers for the instance it reaches.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use flex_shared::proto::admin as apb;
use time::OffsetDateTime;

use crate::timefmt;

const NATS: &str = "nats";

/// A NATS proxy reports at least this often (its heartbeat is 15 s), so silence for longer means
/// it is gone.
const NATS_LIVENESS: time::Duration = time::Duration::seconds(45);

fn nats_alive(e: &Entry, now: OffsetDateTime) -> bool {
    now - e.last_seen < NATS_LIVENESS
}

#[derive(Debug, Clone)]
struct Entry {
    applied_version: u64,
    connected_since: Option<OffsetDateTime>,
    last_seen: OffsetDateTime,
    transport: String,
    /// Open Watch streams (a reconnecting proxy may briefly have two).
    streams: u32,
    last_error: String,
}

#[derive(Debug, Clone, Default)]
pub struct ProxyRegistry {
    inner: Arc<Mutex<BTreeMap<String, Entry>>>,
}

/// Held by a Watch stream; dropping it marks the stream gone.
#[derive(Debug)]
pub struct Connection {
    registry: ProxyRegistry,
    proxy_id: String,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut map = self
            .registry
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get_mut(&self.proxy_id) {
            e.streams = e.streams.saturating_sub(1);
            e.last_seen = timefmt::now();
            if e.streams == 0 {
                e.connected_since = None;
            }
        }
        tracing::info!(proxy_id = %self.proxy_id, "proxy watch stream closed");
    }
}

impl ProxyRegistry {
    fn with<R>(&self, proxy_id: &str, transport: &str, f: impl FnOnce(&mut Entry) -> R) -> R {
        let now = timefmt::now();
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.entry(proxy_id.to_string()).or_insert_with(|| Entry {
            applied_version: 0,
            connected_since: None,
            last_seen: now,
            transport: transport.to_string(),
            streams: 0,
            last_error: String::new(),
        });
        entry.last_seen = now;
        f(entry)
    }

    /// A Watch stream opened; keep the returned guard for as long as it is open.
    pub fn connect(&self, proxy_id: &str, transport: &str) -> Connection {
        self.with(proxy_id, transport, |e| {
            e.streams += 1;
            e.transport = transport.to_string();
            if e.connected_since.is_none() {
                e.connected_since = Some(timefmt::now());
            }
        });
        tracing::info!(proxy_id, transport, "proxy watch stream opened");
        Connection {
            registry: self.clone(),
            proxy_id: proxy_id.to_string(),
        }
    }

    /// A proxy applied `version` (`accepted`) or refused it (`error` says why).
    pub fn ack(&self, proxy_id: &str, version: u64, accepted: bool, error: &str) {
        self.with(proxy_id, "", |e| {
            if accepted {
                e.applied_version = version;
                e.last_error.clear();
            } else {
                e.last_error = format!("refused version {version}: {error}");
            }
        });
        if accepted {
            tracing::debug!(proxy_id, version, "proxy applied snapshot");
        } else {
            tracing::warn!(proxy_id, version, error, "proxy refused snapshot");
        }
    }

    /// A report of a proxy that follows snapshots over NATS: it has no stream here, so it counts
    /// as connected while its reports (every applied version, and a heartbeat) keep arriving.
    pub fn nats_report(&self, proxy_id: &str, version: u64, accepted: bool, error: &str) {
        let now = timefmt::now();
        let fresh = {
            let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            let e = map.entry(proxy_id.to_string()).or_insert_with(|| Entry {
                applied_version: 0,
                connected_since: None,
                last_seen: now,
                transport: NATS.to_string(),
                streams: 0,
                last_error: String::new(),
            });
            let fresh = e.connected_since.is_none() || !nats_alive(e, now);
            if fresh && e.streams == 0 {
                e.connected_since = Some(now);
            }
            e.transport = NATS.to_string();
            fresh
        };
        if fresh {
            tracing::info!(proxy_id, "proxy following snapshots over NATS");
        }
        self.ack(proxy_id, version, accepted, error);
    }

    /// Every proxy seen by this instance, connected or not.
    pub fn list(&self) -> Vec<apb::ProxyStatus> {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let now = timefmt::now();
        map.iter()
            .map(|(id, e)| apb::ProxyStatus {
                proxy_id: id.clone(),
                applied_version: e.applied_version,
                last_seen: timefmt::format(e.last_seen),
                transport: if e.transport.is_empty() {
                    "unknown".to_string()
                } else {
                    e.transport.clone()
                },
                connected: e.streams > 0 || (e.transport == NATS && nats_alive(e, now)),
                connected_since: match (e.streams, e.transport == NATS && nats_alive(e, now)) {
                    (0, false) => String::new(),
                    _ => e.connected_since.map(timefmt::format).unwrap_or_default(),
                },
                last_error: e.last_error.clone(),
            })
            .collect()
    }
}
