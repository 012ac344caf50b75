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
    billing_rpcs_plan_invoice_payment_and_past_due,
    rotate_master_key_rpc_reloads_the_key_file,
    suspend_and_reactivate_toggle_the_keys_access_end_to_end,
    a_fleet_connecting_at_once_gets_its_full_snapshots_a_few_at_a_time,
    the_control_service_requires_the_proxy_token_when_one_is_set,
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
    start_with(db, cp).await
}

/// Serves `cp` (opened on `db`) over a socket.
async fn start_with(db: TestDb, cp: Arc<ControlPlane>) -> Server {
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

/// More proxies than full snapshots sent at once (2) connect together: each gets its full
/// (none waits forever on the bound), then the deltas.
async fn a_fleet_connecting_at_once_gets_its_full_snapshots_a_few_at_a_time(b: Backend) {
    let s = start(b).await;
    let mut a = admin(&s.channel, Some(TOKEN));
    a.create_org(apb::CreateOrgRequest {
        name: "crowd".into(),
        idempotency_key: String::new(),
    })
    .await
    .unwrap();
    let mut streams = Vec::new();
    for i in 0..7 {
        let mut control = ControlServiceClient::new(s.channel.clone());
        streams.push(
            control
                .watch(pb::WatchRequest {
                    proxy_id: format!("crowd-{i}"),
                    have_version: 0,
                })
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let want = s.cp.snapshot().version;
    for stream in &mut streams {
        let u = next_update(stream).await;
        let Some(pb::snapshot_update::Kind::Full(full)) = u.kind else {
            panic!("a full snapshot first: {u:?}");
        };
        assert_eq!(full.version, want);
        assert_eq!(snapshot::validate(&full), Ok(()));
    }
    a.create_org(apb::CreateOrgRequest {
        name: "later".into(),
        idempotency_key: String::new(),
    })
    .await
    .unwrap();
    for stream in &mut streams {
        let u = next_update(stream).await;
        assert!(
            matches!(u.kind, Some(pb::snapshot_update::Kind::Delta(_))),
            "then deltas: {u:?}"
        );
    }
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
    // Events that cannot be true are refused whole, with what is wrong: an org that does not
    // exist, a negative or huge cost, a NUL in a text field, a model id of a megabyte.
    let forged = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&event).unwrap();
        v["request_id"] = "req-forged".into();
        f(&mut v);
        v.to_string()
    };
    for (bad, says) in [
        (
            forged(&|v| v["org_id"] = "org_nobody".into()),
            "does not exist",
        ),
        (forged(&|v| v["cost_micros"] = (-5).into()), "cost_micros"),
        (
            forged(&|v| v["standard_cost_micros"] = i64::MAX.into()),
            "standard_cost_micros",
        ),
        (forged(&|v| v["model"] = "gpt\u{0}x".into()), "NUL"),
        (
            forged(&|v| v["model"] = "m".repeat(1 << 20).into()),
            "model is 1048576 bytes",
        ),
    ] {
        let err = control
            .report_usage(pb::ReportUsageRequest {
                events_json: vec![bad],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(says), "{}", err.message());
    }
    let u = a
        .get_usage(apb::GetUsageRequest {
            org_id: org.org_id.clone(),
            from: String::new(),
            to: String::new(),
            group_by: "tier".into(),
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

fn usage_json(request_id: &str, org_id: &str, cost: i64, standard: i64, at: &str) -> String {
    serde_json::json!({
        "schema_version": 1, "request_id": request_id, "org_id": org_id, "key_id": "key_1",
        "model": "gpt-5-mini", "provider": "openai", "caller_format": "responses",
        "start_within": "00h-01m-00s", "served_tier": "flex", "reason": "flex_started",
        "flex_wait_ms": 0, "start_latency_ms": 800, "duration_ms": 2000, "input_tokens": 1000,
        "cached_input_tokens": 0, "output_tokens": 200, "reasoning_tokens": 0, "status": 200,
        "outcome": "ok", "tiers_started": ["flex"], "cost_micros": cost,
        "standard_cost_micros": standard, "received_at": at
    })
    .to_string()
}

async fn billing_rpcs_plan_invoice_payment_and_past_due(b: Backend) {
    let s = start(b).await;
    let mut a = admin(&s.channel, Some(TOKEN));
    let org_id = a
        .create_org(apb::CreateOrgRequest {
            name: "billed".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .org_id;
    let mut control = ControlServiceClient::new(s.channel.clone());
    control
        .report_usage(pb::ReportUsageRequest {
            events_json: vec![
                usage_json("u1", &org_id, 200_000, 1_000_000, "2025-01-10T00:00:00Z"),
                usage_json("u2", &org_id, 0, 333_333, "2025-02-10T00:00:00Z"),
            ],
        })
        .await
        .unwrap();

    // SetBillingPlan: fee_bps is required and bounded.
    let err = a
        .set_billing_plan(apb::SetBillingPlanRequest {
            org_id: org_id.clone(),
            plan: "growth".into(),
            fee_bps: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("fee_bps is required"),
        "{}",
        err.message()
    );
    let account = a
        .set_billing_plan(apb::SetBillingPlanRequest {
            org_id: org_id.clone(),
            plan: "growth".into(),
            fee_bps: Some(1_500),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((account.plan.as_str(), account.fee_bps), ("growth", 1_500));
    let err = a
        .set_billing_plan(apb::SetBillingPlanRequest {
            org_id: "org_nope".into(),
            plan: "growth".into(),
            fee_bps: Some(1),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // IssueInvoice: 15% of 800,000 savings; the idempotency key replays.
    let err = a
        .issue_invoice(apb::IssueInvoiceRequest {
            org_id: org_id.clone(),
            period_from: "2025-02-01T00:00:00Z".into(),
            period_to: "2025-01-01T00:00:00Z".into(),
            due_at: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let jan = apb::IssueInvoiceRequest {
        org_id: org_id.clone(),
        period_from: "2025-01-01T00:00:00Z".into(),
        period_to: "2025-02-01T00:00:00Z".into(),
        due_at: "2030-01-01T00:00:00Z".into(),
        idempotency_key: "inv-jan".into(),
    };
    let first = a.issue_invoice(jan.clone()).await.unwrap();
    assert!(first.metadata().get("flex-idempotent-replay").is_none());
    let invoice = first.into_inner();
    assert_eq!(
        (
            invoice.savings_micros,
            invoice.fee_bps,
            invoice.amount_micros
        ),
        (800_000, 1_500, 120_000)
    );
    assert_eq!(invoice.status, "open");
    let replay = a.issue_invoice(jan).await.unwrap();
    assert_eq!(
        replay.metadata().get("flex-idempotent-replay").unwrap(),
        "true"
    );
    assert_eq!(replay.into_inner(), invoice);
    let err = a
        .issue_invoice(apb::IssueInvoiceRequest {
            org_id: org_id.clone(),
            period_from: "2025-01-31T00:00:00Z".into(),
            period_to: "2025-02-28T00:00:00Z".into(),
            due_at: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "overlap");
    // February is due already: 333,333 × 15% = 49,999.95 → 50,000.
    let feb = a
        .issue_invoice(apb::IssueInvoiceRequest {
            org_id: org_id.clone(),
            period_from: "2025-02-01T00:00:00Z".into(),
            period_to: "2025-03-01T00:00:00Z".into(),
            due_at: "2025-03-15T00:00:00Z".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (feb.amount_micros, feb.status.as_str()),
        (50_000, "overdue")
    );

    // The overdue check makes the org past due; proxies see it in the snapshot.
    s.cp.check_overdue_invoices(flex_control_plane::timefmt::now())
        .await
        .unwrap();
    let shown = a
        .get_billing(apb::OrgRef {
            org_id: org_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.status, "past_due");
    assert!(shown.status_reason.contains(&feb.invoice_id));
    assert_eq!(shown.balance_due_micros, 170_000);
    assert_eq!(shown.open_invoices.len(), 2);
    let entry =
        s.cp.snapshot()
            .orgs
            .iter()
            .find(|o| o.org_id == org_id)
            .cloned()
            .unwrap();
    assert_eq!(
        (entry.billing_status.as_str(), entry.fee_bps),
        ("past_due", 1_500)
    );

    // RecordPayment: refused beyond what is open; paying February restores active.
    let pay = |invoice_id: &str, amount: i64, key: &str| apb::RecordPaymentRequest {
        org_id: org_id.clone(),
        invoice_id: invoice_id.into(),
        amount_micros: amount,
        idempotency_key: key.into(),
    };
    let err = a
        .record_payment(pay(&feb.invoice_id, 50_001, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("at most 50000"), "{}", err.message());
    let err = a.record_payment(pay("inv_nope", 1, "")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = a.record_payment(pay("", 0, "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let paid = a
        .record_payment(pay(&feb.invoice_id, 50_000, "pay-feb"))
        .await
        .unwrap()
        .into_inner();
    assert!(paid.payment_id.starts_with("pay_"));
    let account = paid.account.unwrap();
    assert_eq!(account.status, "active");
    assert_eq!(account.balance_due_micros, 120_000);
    assert_eq!(account.paid_micros, 50_000);
    let replay = a
        .record_payment(pay(&feb.invoice_id, 50_000, "pay-feb"))
        .await
        .unwrap();
    assert_eq!(
        replay.metadata().get("flex-idempotent-replay").unwrap(),
        "true"
    );
    let replay = replay.into_inner();
    assert_eq!(replay.payment_id, paid.payment_id);
    assert_eq!(replay.account.unwrap().paid_micros, 50_000, "recorded once");

    let audit = a
        .list_audit_events(apb::OrgRef {
            org_id: org_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let types: Vec<&str> = audit.events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "OrgCreated",
            "BillingPlanSet",
            "InvoiceIssued",
            "InvoiceIssued",
            "BillingStatusChanged",
            "PaymentRecorded",
            "BillingStatusChanged"
        ]
    );
    assert_eq!(audit.events[4].actor, "system");
    assert_eq!(*s.cp.state(), s.cp.rebuild().await.unwrap());
}

async fn rotate_master_key_rpc_reloads_the_key_file(b: Backend) {
    let db = TestDb::new(b).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    std::fs::write(&path, common::keyring_text("k1", 0x11)).unwrap();
    let cp = db.open_with_key_file(&path).await;
    let s = start_with(db, cp).await;
    let mut a = admin(&s.channel, Some(TOKEN));
    let org_id = a
        .create_org(apb::CreateOrgRequest {
            name: "byok".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .org_id;
    for provider in ["openai", "gemini"] {
        a.set_provider_key(apb::SetProviderKeyRequest {
            org_id: org_id.clone(),
            provider: provider.into(),
            secret: format!("sk-{provider}-before-rotation"),
        })
        .await
        .unwrap();
    }
    // Without the admin token: refused like every admin call.
    let err = admin(&s.channel, None)
        .rotate_master_key(apb::RotateMasterKeyRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Dropping k1 before re-sealing is refused.
    std::fs::write(&path, common::keyring_text("k2", 0x22)).unwrap();
    let err = a
        .rotate_master_key(apb::RotateMasterKeyRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("`k1` (2 provider keys)"),
        "{}",
        err.message()
    );
    // New key first, old key kept.
    std::fs::write(
        &path,
        format!(
            "{}{}",
            common::keyring_text("k2", 0x22),
            common::keyring_text("k1", 0x11)
        ),
    )
    .unwrap();
    let r = a
        .rotate_master_key(apb::RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r,
        apb::RotateMasterKeyResponse {
            resealed: 2,
            already_current: 0,
            active_key_id: "k2".into(),
            key_file_reloaded: true,
        }
    );
    let keys = a
        .list_provider_keys(apb::OrgRef {
            org_id: org_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(keys.iter().all(|k| k.master_key_id == "k2"), "{keys:?}");
    // Now the old line can go.
    std::fs::write(&path, common::keyring_text("k2", 0x22)).unwrap();
    let r = a
        .rotate_master_key(apb::RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.resealed, r.already_current), (0, 2));
    let text = format!("{r:?} {keys:?}");
    assert!(!text.contains("before-rotation"), "{text}");
}

/// What the data plane's auth decides for `api_key` against a snapshot: the key's hash must be
/// present and its org active (`data-plane/src/auth.rs`).
fn access(snap: &pb::Snapshot, api_key: &str) -> Result<(), &'static str> {
    let hash = flex_shared::keys::hash(api_key);
    let key = snap
        .api_keys
        .iter()
        .find(|k| k.key_hash == hash)
        .ok_or("invalid_api_key")?;
    match snap.orgs.iter().find(|o| o.org_id == key.org_id) {
        Some(o) if o.active => Ok(()),
        _ => Err("org_suspended"),
    }
}

async fn suspend_and_reactivate_toggle_the_keys_access_end_to_end(b: Backend) {
    let s = start(b).await;
    let mut a = admin(&s.channel, Some(TOKEN));
    let org_id = a
        .create_org(apb::CreateOrgRequest {
            name: "toggled".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .org_id;
    let mut keys = Vec::new();
    for name in ["ci", "prod"] {
        keys.push(
            a.create_api_key(apb::CreateApiKeyRequest {
                org_id: org_id.clone(),
                name: name.into(),
                idempotency_key: String::new(),
                expires_at: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .api_key,
        );
    }
    // A bystander org's key must keep working throughout.
    let other_org = a
        .create_org(apb::CreateOrgRequest {
            name: "bystander".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .org_id;
    let other_key = a
        .create_api_key(apb::CreateApiKeyRequest {
            org_id: other_org,
            name: String::new(),
            idempotency_key: String::new(),
            expires_at: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .api_key;

    // A proxy follows the Watch stream, applying deltas as it would.
    let mut control = ControlServiceClient::new(s.channel.clone());
    let mut stream = control
        .watch(pb::WatchRequest {
            proxy_id: "proxy-toggle".into(),
            have_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = next_update(&mut stream).await;
    let Some(pb::snapshot_update::Kind::Full(mut have)) = first.kind else {
        panic!("first update must be a full snapshot: {first:?}");
    };
    for k in &keys {
        assert_eq!(access(&have, k), Ok(()));
    }
    async fn follow_until(
        stream: &mut tonic::Streaming<pb::SnapshotUpdate>,
        have: &mut pb::Snapshot,
        version: u64,
    ) {
        while have.version < version {
            let u = next_update(stream).await;
            let Some(pb::snapshot_update::Kind::Delta(d)) = u.kind else {
                panic!("later updates are deltas: {u:?}");
            };
            *have = snapshot::apply_delta(have, u.version, &d).unwrap();
        }
    }

    let suspended = a
        .suspend_org(apb::OrgRef {
            org_id: org_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(suspended.status, "suspended");
    follow_until(&mut stream, &mut have, s.cp.snapshot().version).await;
    let entry = have.orgs.iter().find(|o| o.org_id == org_id).unwrap();
    assert!(!entry.active, "the snapshot marks the org inactive");
    for k in &keys {
        assert_eq!(access(&have, k), Err("org_suspended"));
        // The keys are not revoked: they come back with the org.
        let hash = flex_shared::keys::hash(k);
        assert!(have.api_keys.iter().any(|e| e.key_hash == hash));
    }
    assert_eq!(access(&have, &other_key), Ok(()));
    // A suspended org gets no new keys either.
    let err = a
        .create_api_key(apb::CreateApiKeyRequest {
            org_id: org_id.clone(),
            name: "more".into(),
            idempotency_key: String::new(),
            expires_at: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let active = a
        .reactivate_org(apb::OrgRef {
            org_id: org_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(active.status, "active");
    follow_until(&mut stream, &mut have, s.cp.snapshot().version).await;
    for k in &keys {
        assert_eq!(access(&have, k), Ok(()));
    }
    assert_eq!(access(&have, &other_key), Ok(()));
    assert_eq!(have.content_hash, s.cp.snapshot().content_hash);
    let audit: Vec<String> = a
        .list_audit_events(apb::OrgRef { org_id })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.summary)
        .collect();
    assert!(audit.iter().any(|l| l.ends_with("suspended")), "{audit:?}");
    assert!(
        audit.iter().any(|l| l.ends_with("reactivated")),
        "{audit:?}"
    );
}

/// With a proxy token set (`flex control --proxy-token-file`), Watch, Ack and ReportUsage without
/// it, or with another one, are refused UNAUTHENTICATED and record nothing; with it they work.
async fn the_control_service_requires_the_proxy_token_when_one_is_set(b: Backend) {
    let db = TestDb::new(b).await;
    let cp = db.open(k1()).await;
    cp.require_proxy_token(&SecretString::from("proxy-secret-0123456789\n".to_string()))
        .unwrap();
    let s = start_with(db, cp).await;
    let mut a = admin(&s.channel, Some(TOKEN));
    let org = a
        .create_org(apb::CreateOrgRequest {
            name: "guarded".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let event = usage_json("req-forged-1", &org.org_id, 5, 10, "2025-03-01T10:00:00Z");
    let with = |token: Option<&str>| {
        let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
            token.map(|t| format!("Bearer {t}").parse().unwrap());
        ControlServiceClient::with_interceptor(s.channel.clone(), move |mut req: Request<()>| {
            if let Some(h) = &header {
                req.metadata_mut().insert("authorization", h.clone());
            }
            Ok(req)
        })
    };
    for (token, says) in [
        (None, "missing proxy token"),
        (Some("guess"), "wrong proxy token"),
        (Some(TOKEN), "wrong proxy token"),
    ] {
        let mut c = with(token);
        let err = c
            .report_usage(pb::ReportUsageRequest {
                events_json: vec![event.clone()],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
        assert!(err.message().contains(says), "{}", err.message());
        assert!(
            err.message().contains("--proxy-token-file"),
            "{}",
            err.message()
        );
        let err = c
            .watch(pb::WatchRequest {
                proxy_id: "intruder".into(),
                have_version: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let err = c
            .ack(pb::AckRequest {
                proxy_id: "intruder".into(),
                version: 1,
                accepted: true,
                error: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    assert!(
        s.cp.proxies()
            .list()
            .iter()
            .all(|p| p.proxy_id != "intruder"),
        "a refused Watch registers no proxy"
    );
    assert_eq!(
        usage_requests(&mut a, &org.org_id).await,
        0,
        "nothing was recorded"
    );
    let mut c = with(Some("proxy-secret-0123456789"));
    let r = c
        .report_usage(pb::ReportUsageRequest {
            events_json: vec![event],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accepted, 1);
    let mut stream = c
        .watch(pb::WatchRequest {
            proxy_id: "edge-1".into(),
            have_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some(), "a snapshot");
    assert_eq!(usage_requests(&mut a, &org.org_id).await, 1);
}

async fn usage_requests(a: &mut Admin, org_id: &str) -> u64 {
    a.get_usage(apb::GetUsageRequest {
        org_id: org_id.to_string(),
        from: String::new(),
        to: String::new(),
        group_by: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .requests
}
