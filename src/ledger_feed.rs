//! `flex up`'s usage path: the embedded proxy's events go straight into the in-process control
//! plane's ledger, in groups (group commit, off the request path).
//!
//! The proxy's sink only queues an event (a `try_send`, no wake-up of anything while the feed
//! lingers). The feed takes the first event, waits [`LEDGER_LINGER`] for the others of that
//! moment, and writes all of them in one ledger transaction: one write, and one hand-off to the
//! database's thread, per group instead of per request. A planned stop flushes what is queued
//! ([`LedgerFeed::flush`]).

use std::sync::Arc;
use std::time::Duration;

use flex_control_plane::{ControlPlane, StoreError};
use flex_shared::usage::UsageEvent;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// How long the first event of a group waits for others before they are written together.
/// Bounds how stale the ledger (the dashboard, `flex admin usage`) is behind the answers.
pub const LEDGER_LINGER: Duration = Duration::from_millis(10);

/// Most events in one ledger transaction.
pub const LEDGER_BATCH_MAX: usize = 2000;

/// The running feed: ask it to write what is queued and stop.
pub struct LedgerFeed {
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

impl LedgerFeed {
    /// Starts delivering `rx` into `cp`'s ledger.
    pub fn spawn(rx: mpsc::Receiver<UsageEvent>, cp: Arc<ControlPlane>) -> Self {
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(deliver(rx, cp, stop.clone()));
        Self { stop, task }
    }

    /// Writes every queued event, then stops; gives up after `within` (the events left are
    /// lost, as in a crash: logged).
    pub async fn flush(self, within: Duration) {
        self.stop.notify_one();
        if tokio::time::timeout(within, self.task).await.is_err() {
            tracing::error!(
                within_ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX),
                "the usage ledger could not be written before the exit; the usage events still queued are lost"
            );
        }
    }
}

/// Delivers queued events to the ledger in groups, retrying a failed write until it is stored.
async fn deliver(mut rx: mpsc::Receiver<UsageEvent>, cp: Arc<ControlPlane>, stop: Arc<Notify>) {
    let mut batch = Vec::new();
    let mut stopping = false;
    loop {
        if !stopping {
            tokio::select! {
                n = rx.recv_many(&mut batch, LEDGER_BATCH_MAX) => if n == 0 { return },
                () = stop.notified() => stopping = true,
            }
        }
        if !stopping {
            // Nothing polls the queue meanwhile, so the events of this moment join the group
            // without waking this task one by one.
            tokio::select! {
                () = tokio::time::sleep(LEDGER_LINGER) => {}
                () = stop.notified() => stopping = true,
            }
        }
        while batch.len() < LEDGER_BATCH_MAX {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        write(&cp, &batch).await;
        batch.clear();
    }
}

/// Writes `batch` in one transaction, retrying until it is stored. An event the ledger refuses
/// (it cannot ever be stored: the proxy checks what it reports, so this is a bug) must not hold
/// back the others: the batch is then written event by event and the refused ones logged.
async fn write(cp: &ControlPlane, batch: &[UsageEvent]) {
    match record(cp, batch).await {
        Ok(()) => {}
        Err(_) if batch.len() > 1 => {
            for e in batch {
                if let Err(why) = record(cp, std::slice::from_ref(e)).await {
                    tracing::error!(request_id = %e.request_id, error = %why, "usage event refused by the ledger; dropped");
                }
            }
        }
        Err(why) => {
            let id = batch
                .first()
                .map(|e| e.request_id.as_str())
                .unwrap_or_default();
            tracing::error!(request_id = %id, error = %why, "usage event refused by the ledger; dropped");
        }
    }
}

/// Records `events`, retrying every failure but a refusal of their content (returned).
async fn record(cp: &ControlPlane, events: &[UsageEvent]) -> Result<(), String> {
    let mut backoff = Duration::from_millis(50);
    loop {
        match cp.record_usage(events).await {
            Ok(_) => return Ok(()),
            Err(
                flex_control_plane::Error::InvalidArgument(why)
                | flex_control_plane::Error::Store(StoreError::OutOfRange(why)),
            ) => return Err(why),
            Err(e) => {
                tracing::warn!(error = %e, events = events.len(), "usage ledger write failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flex_control_plane::Metadata;
    use flex_shared::crypto::MasterKeyring;

    async fn control_plane(dir: &std::path::Path) -> (Arc<ControlPlane>, String) {
        let keyring =
            Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "test").unwrap());
        let db = format!("sqlite://{}?mode=rwc", dir.join("flex.db").display());
        let cp = Arc::new(ControlPlane::open(&db, keyring).await.unwrap());
        let org = cp
            .create_org(&Metadata::new("test"), "acme", None)
            .await
            .unwrap()
            .org;
        (cp, org.org_id)
    }

    fn event(org: &str, i: usize) -> UsageEvent {
        UsageEvent {
            schema_version: flex_shared::usage::SCHEMA_VERSION,
            request_id: format!("req_{i:06}"),
            org_id: org.to_string(),
            key_id: "key_test".into(),
            model: "gpt-5.5".into(),
            provider: "openai".into(),
            caller_format: "chat_completions".into(),
            served_tier: "standard".into(),
            status: 200,
            outcome: "ok".into(),
            cost_micros: 3,
            standard_cost_micros: 3,
            received_at: "2026-12-01T00:00:00Z".into(),
            ..UsageEvent::default()
        }
    }

    #[tokio::test]
    async fn a_flush_writes_every_queued_event_in_groups_once() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, org) = control_plane(dir.path()).await;
        let (tx, rx) = mpsc::channel(10_000);
        let feed = LedgerFeed::spawn(rx, cp.clone());
        // More than one group's worth, and one event twice: counted once.
        let n = LEDGER_BATCH_MAX * 2 + 7;
        for i in 0..n {
            tx.send(event(&org, i)).await.unwrap();
        }
        tx.send(event(&org, 0)).await.unwrap();
        feed.flush(Duration::from_secs(30)).await;
        let t = cp.store().usage_summary(&org, None, None).await.unwrap();
        assert_eq!(t.requests, n as u64);
        assert_eq!(t.cost_micros, 3 * n as i64);
    }

    #[tokio::test]
    async fn an_event_the_ledger_refuses_does_not_hold_back_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, org) = control_plane(dir.path()).await;
        let (tx, rx) = mpsc::channel(100);
        let feed = LedgerFeed::spawn(rx, cp.clone());
        let mut bad = event(&org, 1);
        bad.cost_micros = -5; // out of the ledger's range: refused
        for e in [event(&org, 0), bad, event(&org, 2)] {
            tx.send(e).await.unwrap();
        }
        feed.flush(Duration::from_secs(30)).await;
        let t = cp.store().usage_summary(&org, None, None).await.unwrap();
        assert_eq!(t.requests, 2, "the two good events are in the ledger");
    }
}
