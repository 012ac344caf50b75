//! The gRPC surface over a real socket, on SQLite and on a real Postgres: admin token, status
//! codes, Watch (full, then deltas; delta on reconnect), Ack, ReportUsage, reflection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{k1, Backend, TestDb};
use flex_control_plane::ControlPlane;
use flex_shared::proto::admin as apb;
use flex_shared::proto::admin::admin_service_client::AdminServiceClient;
use flex_shared::proto::control as pb;
use flex_shared::proto::control::control_service_client::ControlServiceClient;
use flex_shared::snapshot;
use secrecy::SecretString;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

both_backends!(
    admin_calls_need_the_token,
    admin_errors_map_to_status_codes,
    watch_streams_full_then_deltas_and_tracks_proxies,
    usage_over_grpc_is_counted_once,
    reflection_lists_the_services,
    shutdown_ends_open_watch_streams,
);

const TOKEN: &str = "test-admin-token-0123456789";

struct Server {
    cp: Arc<ControlPlane>,
    channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
    _db: TestDb,
}

async fn start(b: Backend) -> Server {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = cp.clone();
    let handle = tokio::spawn(async move {
        server
            .serve_with_listener(listener, &SecretString::from(TOKEN.to_string()), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Server {
        cp,
        channel,
        stop: Some(stop),
        handle,
        _db: db,
    }
}

type AddToken = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Admin = AdminServiceClient<InterceptedService<Channel, AddToken>>;

fn admin(channel: &Channel, token: Option<&str>) -> Admin {
    let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    let f: AddToken = Box::new(move |mut req: Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    AdminServiceClient::with_interceptor(channel.clone(), f)
}

async fn admin_calls_need_the_token(b: Backend) {
    let s = start(b).await;
    let err = admin(&s.channel, None)
        .list_orgs(apb::ListOrgsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("authorization: Bearer"),
        "{}",
        err.message()
    );
    let err = admin(&s.channel, Some("wrong"))
        .list_orgs(apb::ListOrgsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("wrong admin token"),
        "{}",
        err.message()
    );
    let mut ok = admin(&s.channel, Some(TOKEN));
    let org = ok
        .create_org(apb::CreateOrgRequest {
            name: "acme".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(org.org_id.starts_with("org_"));
    let orgs = ok
        .list_orgs(apb::ListOrgsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(orgs.orgs, vec![org]);
    // The control service is for proxies and does not take the admin token.
    let mut control = ControlServiceClient::new(s.channel.clone());
    control
        .ack(pb::AckRequest {
            proxy_id: "p".into(),
            version: 0,
            accepted: true,
            error: String::new(),
        })
        .await
        .unwrap();
}

async fn admin_errors_map_to_status_codes(b: Backend) {
    let s = start(b).await;
    let mut a = admin(&s.channel, Some(TOKEN));
    let err = a
        .create_org(apb::CreateOrgRequest {
            name: " ".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("e.g."), "{}", err.message());
    let err = a
        .get_billing(apb::OrgRef {
            org_id: "org_nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let org = a
        .create_org(apb::CreateOrgRequest {
            name: "acme".into(),
            idempotency_key: "i-1".into(),
        })
        .await
        .unwrap();
    assert!(org.metadata().get("flex-idempotent-replay").is_none());
    let org = org.into_inner();
    let replay = a
        .create_org(apb::CreateOrgRequest {
            name: "acme".into(),
            idempotency_key: "i-1".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        replay.metadata().get("flex-idempotent-replay").unwrap(),
        "true"
    );
    assert_eq!(replay.into_inner(), org);

    let req = apb::CreateApiKeyRequest {
        org_id: org.org_id.clone(),
        name: "ci".into(),
        idempotency_key: "k-1".into(),
        expires_at: String::new(),
    };
    let created = a.create_api_key(req.clone()).await.unwrap().into_inner();
    assert!(created.api_key.starts_with("flex_live_"));
    let again = a.create_api_key(req).await.unwrap();
    assert_eq!(
        again.metadata().get("flex-idempotent-replay").unwrap(),
        "true"
    );
    let again = again.into_inner();
    assert_eq!(again.api_key, "", "the secret is shown once");
    assert_eq!(again.key, created.key);
    let key_id = created.key.unwrap().key_id;
    let revoke = apb::RevokeApiKeyRequest {
        key_id: key_id.clone(),
        reason: "leaked".into(),
    };
    let revoked = a.revoke_api_key(revoke.clone()).await.unwrap().into_inner();
    assert_eq!(revoked.status, "revoked");
    let err = a.revoke_api_key(revoke).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let err = a
        .set_provider_key(apb::SetProviderKeyRequest {
            org_id: org.org_id.clone(),
            provider: "mistral".into(),
            secret: "sk-whatever-123".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("openai, anthropic or gemini"));
    let canary = "sk-canary-XYZ-grpc-5d1e0a77c3";
    let set = a
        .set_provider_key(apb::SetProviderKeyRequest {
            org_id: org.org_id.clone(),
            provider: "anthropic".into(),
            secret: canary.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.last4, "77c3");
    assert_eq!(set.master_key_id, "k1");
    let listed = a
        .list_provider_keys(apb::OrgRef {
            org_id: org.org_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let audit = a
        .list_audit_events(apb::OrgRef {
            org_id: org.org_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(audit.events.len(), 4, "{:#?}", audit.events);
    for bytes in [
        prost::Message::encode_to_vec(&set),
        prost::Message::encode_to_vec(&listed),
        prost::Message::encode_to_vec(&audit),
    ] {
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("canary-XYZ"), "{text}");
    }
    let billing = a
        .set_billing_status(apb::SetBillingStatusRequest {
            org_id: org.org_id.clone(),
            status: "past_due".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(billing.status, "past_due");
    assert_eq!(
        a.get_billing(apb::OrgRef {
            org_id: org.org_id.clone()
        })
        .await
        .unwrap()
        .into_inner(),
        billing
    );
    let suspended = a
        .suspend_org(apb::OrgRef {
            org_id: org.org_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(suspended.status, "suspended");
    let renamed = a
        .rename_org(apb::RenameOrgRequest {
            org_id: org.org_id.clone(),
            name: "acme 2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.name, "acme 2");
    let active = a
        .reactivate_org(apb::OrgRef {
            org_id: org.org_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(active.status, "active");
    let removed = a
        .remove_provider_key(apb::RemoveProviderKeyRequest {
            org_id: org.org_id.clone(),
            provider: "anthropic".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (removed.status.as_str(), removed.last4.as_str()),
        ("removed", "")
    );
    let keys = a
        .list_api_keys(apb::OrgRef {
            org_id: org.org_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.keys.len(), 1);
    assert_eq!(keys.keys[0].status, "revoked");
    assert_eq!(*s.cp.state(), s.cp.rebuild().await.unwrap());
}

async fn next_update(stream: &mut tonic::Streaming<pb::SnapshotUpdate>) -> pb::SnapshotUpdate {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an update within 5 s")
        .expect("stream open")
        .expect("no error")
}

async fn watch_streams_full_then_deltas_and_tracks_proxies(b: Backend) {
    let s = start(b).await;
    let mut a = admin(&s.channel, Some(TOKEN));
    let org = a
        .create_org(apb::CreateOrgRequest {
            name: "watched".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut control = ControlServiceClient::new(s.channel.clone());
    let mut stream = control
        .watch(pb::WatchRequest {
            proxy_id: "proxy-a".into(),
            have_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = next_update(&mut stream).await;
    let Some(pb::snapshot_update::Kind::Full(mut have)) = first.kind else {
        panic!("first update must be a full snapshot: {first:?}");
    };
    assert_eq!(first.version, have.version);
    assert_eq!(snapshot::validate(&have), Ok(()));
    assert!(have.orgs.iter().any(|o| o.org_id == org.org_id));

    let proxies = a
        .list_proxies(apb::ListProxiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let p = proxies
        .proxies
        .iter()
        .find(|p| p.proxy_id == "proxy-a")
        .unwrap();
    assert!(p.connected);
    assert_eq!(p.transport, "grpc");
    control
        .ack(pb::AckRequest {
            proxy_id: "proxy-a".into(),
            version: have.version,
            accepted: true,
            error: String::new(),
        })
        .await
        .unwrap();

    // Two commands: each yields a delta the proxy can apply and verify.
    let key = a
        .create_api_key(apb::CreateApiKeyRequest {
            org_id: org.org_id.clone(),
            name: "k".into(),
            idempotency_key: String::new(),
            expires_at: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let hash = flex_shared::keys::hash(&key.api_key);
    let mut seen_key = false;
    while !seen_key {
        let u = next_update(&mut stream).await;
        let Some(pb::snapshot_update::Kind::Delta(d)) = u.kind else {
            panic!("later updates are deltas: {u:?}");
        };
        have = snapshot::apply_delta(&have, u.version, &d).unwrap();
        seen_key = have.api_keys.iter().any(|k| k.key_hash == hash);
    }
    let old_version = have.version;
    a.revoke_api_key(apb::RevokeApiKeyRequest {
        key_id: key.key.unwrap().key_id,
        reason: String::new(),
    })
    .await
    .unwrap();
    let u = next_update(&mut stream).await;
    let Some(pb::snapshot_update::Kind::Delta(d)) = u.kind else {
        panic!("expected a delta: {u:?}");
    };
    assert_eq!(d.remove_api_key_hashes, vec![hash.clone()]);
    have = snapshot::apply_delta(&have, u.version, &d).unwrap();
    assert_eq!(have.content_hash, s.cp.snapshot().content_hash);
    assert_eq!(have.version, s.cp.snapshot().version);

    control
        .ack(pb::AckRequest {
            proxy_id: "proxy-a".into(),
            version: have.version - 1,
            accepted: false,
            error: "content hash mismatch".into(),
        })
        .await
        .unwrap();
    let proxies = a
        .list_proxies(apb::ListProxiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let p = proxies
        .proxies
        .iter()
        .find(|p| p.proxy_id == "proxy-a")
        .unwrap();
    assert!(p.last_error.contains("content hash mismatch"));
    assert_eq!(proxies.current_version, have.version);

    // Disconnect: the registry notices.
    drop(stream);
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let list = s.cp.list_proxies();
            if list
                .proxies
                .iter()
                .any(|p| p.proxy_id == "proxy-a" && !p.connected)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the dropped stream is marked disconnected");

    // Reconnect with a version still in the history: a delta, not the world.
    let mut stream = control
        .watch(pb::WatchRequest {
            proxy_id: "proxy-a".into(),
            have_version: old_version,
        })
        .await
        .unwrap()
        .into_inner();
    let u = next_update(&mut stream).await;
    let Some(pb::snapshot_update::Kind::Delta(d)) = u.kind else {
        panic!("a known have_version gets a delta: {u:?}");
    };
    assert_eq!(d.from_version, old_version);
    assert_eq!(d.remove_api_key_hashes, vec![hash]);
    // An unknown version gets the full snapshot.
    let mut stream = control
        .watch(pb::WatchRequest {
            proxy_id: "proxy-b".into(),
            have_version: 999_999,
        })
        .await
        .unwrap()
        .into_inner();
    let u = next_update(&mut stream).await;
    assert!(matches!(u.kind, Some(pb::snapshot_update::Kind::Full(_))));
}

async fn usage_over_grpc_is_counted_once(b: Backend) {
    let s = start(b).await;
    let mut a = admin(&s.channel, Some(TOKEN));
    let org = a
        .create_org(apb::CreateOrgRequest {
            name: "metered".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let event = serde_json::json!({
        "schema_version": 1, "request_id": "req-1", "org_id": org.org_id, "key_id": "key_1",
        "model": "gemini-2.5-flash", "provider": "gemini", "caller_format": "chat_completions",
        "start_within": "00h-01m-00s", "served_tier": "flex", "reason": "flex_started",
        "flex_wait_ms": 0, "start_latency_ms": 800, "duration_ms": 2000, "input_tokens": 1000,
        "cached_input_tokens": 0, "output_tokens": 200, "reasoning_tokens": 0, "status": 200,
        "outcome": "ok", "tiers_started": ["flex"], "cost_micros": 500,
        "standard_cost_micros": 1000, "received_at": "2025-03-01T10:00:00Z"
    })
    .to_string();
    let mut control = ControlServiceClient::new(s.channel.clone());
    for _ in 0..2 {
        let r = control
            .report_usage(pb::ReportUsageRequest {
                events_json: vec![event.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.accepted, 1);
    }
    let err = control
        .report_usage(pb::ReportUsageRequest {
            events_json: vec!["not json".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let u = a
        .get_usage(apb::GetUsageRequest {
            org_id: org.org_id.clone(),
            from: String::new(),
            to: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            u.requests,
            u.flex_requests,
            u.cost_micros,
            u.standard_cost_micros,
            u.savings_micros
        ),
        (1, 1, 500, 1000, 500)
    );
}

async fn reflection_lists_the_services(b: Backend) {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let s = start(b).await;
    let mut client = ServerReflectionClient::new(s.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection reply: {msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"flex.admin.v1.AdminService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"flex.control.v1.ControlService".to_string()),
        "{names:?}"
    );
}

async fn shutdown_ends_open_watch_streams(b: Backend) {
    let mut s = start(b).await;
    let mut control = ControlServiceClient::new(s.channel.clone());
    let mut stream = control
        .watch(pb::WatchRequest {
            proxy_id: "proxy-a".into(),
            have_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    next_update(&mut stream).await;
    s.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), &mut s.handle)
        .await
        .expect("graceful shutdown does not wait forever for Watch streams")
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream ends");
    match end {
        None => {}
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Some(Ok(u)) => panic!("unexpected update after shutdown: {u:?}"),
    }
}
