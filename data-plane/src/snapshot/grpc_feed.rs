//! Following the control plane's gRPC `Watch` stream.

use std::sync::Arc;

use super::*;

const MAX_GRPC_SNAPSHOT: usize = 1 << 30;

/// Follows the control plane's gRPC Watch stream, reconnecting with jittered backoff forever;
/// every applied version is acknowledged (or refused with the reason). Every call carries
/// `token` (none: the control plane trusts the connection).
pub async fn follow_grpc(
    store: Arc<SnapshotStore>,
    endpoint: tonic::transport::Endpoint,
    proxy_id: String,
    token: crate::control_client::ProxyToken,
) {
    let mut backoff = std::time::Duration::from_millis(100);
    // After a refused update the next Watch asks for a full snapshot (have_version 0): the
    // control plane would otherwise answer the same delta from the version we have.
    let mut resync = false;
    loop {
        let result: Result<(), String> = async {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("connect: {}", crate::plane_tls::error_chain(&e)))?;
            // A full snapshot of a million keys is ~145 MB; tonic's default limit is 4 MB.
            let mut client = crate::control_client::client(channel, &token)
                .max_decoding_message_size(MAX_GRPC_SNAPSHOT);
            let mut stream = client
                .watch(pb::WatchRequest {
                    proxy_id: proxy_id.clone(),
                    have_version: if resync { 0 } else { store.version() },
                })
                .await
                .map_err(|e| format!("watch: {}", crate::plane_tls::status_text(&e)))?
                .into_inner();
            store.set_connected(true, None);
            backoff = std::time::Duration::from_millis(100);
            while let Some(update) = stream
                .message()
                .await
                .map_err(|e| format!("stream: {}", e.message()))?
            {
                let version = update.version;
                let ack = match off_worker(|| store.apply_update(update)) {
                    Ok(v) => pb::AckRequest {
                        proxy_id: proxy_id.clone(),
                        version: v,
                        accepted: true,
                        error: String::new(),
                    },
                    Err(e) => pb::AckRequest {
                        proxy_id: proxy_id.clone(),
                        version,
                        accepted: false,
                        error: e.to_string(),
                    },
                };
                let refused = !ack.accepted;
                let _ = client.ack(ack).await;
                if refused {
                    resync = true;
                    return Err("update refused; resyncing from a full snapshot".to_string());
                }
                resync = false;
            }
            Err("the control plane closed the stream".to_string())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "control plane watch interrupted; serving the last good snapshot");
            store.set_connected(false, Some(e));
        }
        let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1);
        tokio::time::sleep(backoff + std::time::Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}
