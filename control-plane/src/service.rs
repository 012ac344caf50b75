//! gRPC: the admin API (token-guarded), the control API proxies use (Watch, Ack, ReportUsage),
//! and server reflection. Handlers only translate; the work is in [`ControlPlane`], and errors map
//! to status codes in one place ([`crate::error`]).

use std::sync::Arc;

use flex_shared::proto::admin as apb;
use flex_shared::proto::admin::admin_service_server::{AdminService, AdminServiceServer};
use flex_shared::proto::control as pb;
use flex_shared::proto::control::control_service_server::{ControlService, ControlServiceServer};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::grpc_trace::record_id;
use crate::store::Metadata;
use crate::{domain, ControlPlane};

/// Response metadata set when an idempotency key replayed an earlier result.
pub const REPLAY_HEADER: &str = "flex-idempotent-replay";

const TOKEN_HELP: &str = "pass the admin token as gRPC metadata `authorization: Bearer <token>` (flex admin --token T or FLEX_ADMIN_TOKEN; grpcurl -H 'authorization: Bearer <token>'); `flex up` writes it to DATA_DIR/admin-token";

/// Checks `authorization: Bearer <token>` in constant time (compares SHA-256 digests, so neither
/// the length nor the content of the token leaks). Holds only the digest, never the token.
#[derive(Clone)]
pub struct AdminAuth {
    digest: Option<[u8; 32]>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("configured", &self.digest.is_some())
            .finish()
    }
}

impl AdminAuth {
    /// An empty token disables the admin API (every call is refused).
    pub fn new(token: &SecretString) -> Self {
        let t = token.expose_secret().trim();
        Self {
            digest: (!t.is_empty()).then(|| Sha256::digest(t.as_bytes()).into()),
        }
    }

    pub fn check(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> std::result::Result<(), Status> {
        let Some(expected) = &self.digest else {
            return Err(Status::unauthenticated(
                "the control plane has no admin token configured (set --admin-token or FLEX_ADMIN_TOKEN), so the admin API is disabled",
            ));
        };
        check_bearer(metadata, expected).map_err(|why| {
            Status::unauthenticated(format!("{} admin token: {TOKEN_HELP}", why.as_str()))
        })
    }
}

/// Why a bearer token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BearerRefusal {
    Missing,
    Malformed,
    Wrong,
}

impl BearerRefusal {
    fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed (not `Bearer <token>`)",
            Self::Wrong => "wrong",
        }
    }
}

/// Checks `authorization: Bearer <token>` against a digest in constant time (compares SHA-256
/// digests, so neither the length nor the content of the token leaks).
fn check_bearer(
    metadata: &tonic::metadata::MetadataMap,
    expected: &[u8; 32],
) -> std::result::Result<(), BearerRefusal> {
    let value = metadata
        .get("authorization")
        .ok_or(BearerRefusal::Missing)?;
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or(BearerRefusal::Malformed)?;
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    if bool::from(digest.ct_eq(expected)) {
        Ok(())
    } else {
        Err(BearerRefusal::Wrong)
    }
}

/// The control service's check of the proxy token, when the control plane requires one
/// (`--proxy-token-file`); without one every call passes (mutual TLS, checked by
/// `EnrolledProxiesLayer`, or a loopback listener protect it).
#[derive(Clone)]
pub struct ProxyAuth {
    digest: Option<[u8; 32]>,
}

impl Interceptor for ProxyAuth {
    fn call(&mut self, req: Request<()>) -> std::result::Result<Request<()>, Status> {
        let Some(expected) = &self.digest else {
            return Ok(req);
        };
        check_bearer(req.metadata(), expected).map_err(|why| {
            Status::unauthenticated(format!(
                "{} proxy token: this control plane requires `authorization: Bearer <token>` on Watch, Ack and ReportUsage. Fix: start the proxy with --proxy-token-file FILE holding the same token as the control plane's --proxy-token-file",
                why.as_str()
            ))
        })?;
        Ok(req)
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, req: Request<()>) -> std::result::Result<Request<()>, Status> {
        self.check(req.metadata())?;
        Ok(req)
    }
}

/// Builds the routes (see [`ControlPlane::grpc_router`]).
pub fn routes(
    cp: &Arc<ControlPlane>,
    admin_token: &SecretString,
) -> Result<tonic::service::Routes> {
    let admin = AdminServiceServer::with_interceptor(
        AdminApi { cp: cp.clone() },
        AdminAuth::new(admin_token),
    );
    let control = ControlServiceServer::with_interceptor(
        ControlApi {
            cp: cp.clone(),
            fulls: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_FULLS)),
        },
        ProxyAuth {
            digest: cp.proxy_token_digest(),
        },
    );
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flex_shared::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("gRPC reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flex_shared::proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("gRPC reflection: {e}")))?;
    Ok(tonic::service::Routes::new(admin)
        .add_service(control)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}

/// Actor and request id of an admin call (`x-request-id` is honoured when it looks sane).
fn admin_meta<T>(req: &Request<T>) -> Metadata {
    let mut meta = Metadata::new("admin");
    if let Some(id) = req
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
    {
        meta.request_id = id.to_string();
    }
    record_id("request_id", &meta.request_id);
    meta
}

fn replay_marked<T>(value: T, replayed: bool) -> Response<T> {
    let mut resp = Response::new(value);
    if replayed {
        resp.metadata_mut()
            .insert(REPLAY_HEADER, MetadataValue::from_static("true"));
    }
    resp
}

/// The admin API.
#[derive(Debug, Clone)]
pub struct AdminApi {
    cp: Arc<ControlPlane>,
}

type Reply<T> = std::result::Result<Response<T>, Status>;

fn ok<T>(r: Result<T>) -> Reply<T> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_org(&self, req: Request<apb::CreateOrgRequest>) -> Reply<apb::Org> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        let created = self
            .cp
            .create_org(&meta, &r.name, Some(&r.idempotency_key))
            .await?;
        record_id("org_id", &created.org.org_id);
        Ok(replay_marked(created.org, created.replayed))
    }

    async fn list_orgs(&self, _req: Request<apb::ListOrgsRequest>) -> Reply<apb::ListOrgsResponse> {
        ok(self
            .cp
            .list_orgs()
            .await
            .map(|orgs| apb::ListOrgsResponse { orgs }))
    }

    async fn rename_org(&self, req: Request<apb::RenameOrgRequest>) -> Reply<apb::Org> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        record_id("org_id", &r.org_id);
        ok(self.cp.rename_org(&meta, &r.org_id, &r.name).await)
    }

    async fn suspend_org(&self, req: Request<apb::OrgRef>) -> Reply<apb::Org> {
        let meta = admin_meta(&req);
        let org_id = req.into_inner().org_id;
        record_id("org_id", &org_id);
        ok(self.cp.suspend_org(&meta, &org_id).await)
    }

    async fn reactivate_org(&self, req: Request<apb::OrgRef>) -> Reply<apb::Org> {
        let meta = admin_meta(&req);
        let org_id = req.into_inner().org_id;
        record_id("org_id", &org_id);
        ok(self.cp.reactivate_org(&meta, &org_id).await)
    }

    async fn create_api_key(
        &self,
        req: Request<apb::CreateApiKeyRequest>,
    ) -> Reply<apb::CreatedApiKey> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        record_id("org_id", &r.org_id);
        let created = self
            .cp
            .create_api_key(
                &meta,
                &r.org_id,
                &r.name,
                Some(&r.expires_at),
                Some(&r.idempotency_key),
            )
            .await?;
        // The key's id, never the key.
        record_id("key_id", &created.key.key_id);
        Ok(replay_marked(created.to_proto(), created.replayed))
    }

    async fn list_api_keys(&self, req: Request<apb::OrgRef>) -> Reply<apb::ListApiKeysResponse> {
        let org_id = req.into_inner().org_id;
        record_id("org_id", &org_id);
        ok(self
            .cp
            .list_api_keys(&org_id)
            .await
            .map(|keys| apb::ListApiKeysResponse { keys }))
    }

    async fn revoke_api_key(&self, req: Request<apb::RevokeApiKeyRequest>) -> Reply<apb::ApiKey> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        record_id("key_id", &r.key_id);
        ok(self.cp.revoke_api_key(&meta, &r.key_id, &r.reason).await)
    }

    async fn set_provider_key(
        &self,
        req: Request<apb::SetProviderKeyRequest>,
    ) -> Reply<apb::ProviderKey> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        // The org and the provider's name; the key itself goes straight into a SecretString.
        record_id("org_id", &r.org_id);
        record_id("provider", &r.provider);
        let secret = SecretString::from(r.secret);
        ok(self
            .cp
            .set_provider_key(&meta, &r.org_id, &r.provider, &secret)
            .await)
    }

    async fn remove_provider_key(
        &self,
        req: Request<apb::RemoveProviderKeyRequest>,
    ) -> Reply<apb::ProviderKey> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        record_id("org_id", &r.org_id);
        record_id("provider", &r.provider);
        ok(self
            .cp
            .remove_provider_key(&meta, &r.org_id, &r.provider)
            .await)
    }

    async fn list_provider_keys(
        &self,
        req: Request<apb::OrgRef>,
    ) -> Reply<apb::ListProviderKeysResponse> {
        let org_id = req.into_inner().org_id;
        record_id("org_id", &org_id);
        ok(self
            .cp
            .list_provider_keys(&org_id)
            .await
            .map(|keys| apb::ListProviderKeysResponse { keys }))
    }

    async fn get_billing(&self, req: Request<apb::OrgRef>) -> Reply<apb::BillingAccount> {
        let org_id = req.into_inner().org_id;
        record_id("org_id", &org_id);
        ok(self.cp.get_billing(&org_id).await)
    }

    async fn set_billing_status(
        &self,
        req: Request<apb::SetBillingStatusRequest>,
    ) -> Reply<apb::BillingAccount> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        record_id("org_id", &r.org_id);
        ok(self
            .cp
            .set_billing_status(&meta, &r.org_id, &r.status)
            .await)
    }

    async fn set_billing_plan(
        &self,
        req: Request<apb::SetBillingPlanRequest>,
    ) -> Reply<apb::BillingAccount> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        record_id("org_id", &r.org_id);
        ok(self
            .cp
            .set_billing_plan(&meta, &r.org_id, &r.plan, r.fee_bps)
            .await)
    }

    async fn issue_invoice(&self, req: Request<apb::IssueInvoiceRequest>) -> Reply<apb::Invoice> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        record_id("org_id", &r.org_id);
        let issued = self
            .cp
            .issue_invoice(
                &meta,
                &r.org_id,
                &r.period_from,
                &r.period_to,
                Some(&r.due_at),
                Some(&r.idempotency_key),
            )
            .await?;
        Ok(replay_marked(issued.invoice, issued.replayed))
    }

    async fn record_payment(&self, req: Request<apb::RecordPaymentRequest>) -> Reply<apb::Payment> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        record_id("org_id", &r.org_id);
        let recorded = self
            .cp
            .record_payment(
                &meta,
                &r.org_id,
                Some(&r.invoice_id),
                r.amount_micros,
                Some(&r.idempotency_key),
            )
            .await?;
        Ok(replay_marked(recorded.payment, recorded.replayed))
    }

    async fn rotate_master_key(
        &self,
        req: Request<apb::RotateMasterKeyRequest>,
    ) -> Reply<apb::RotateMasterKeyResponse> {
        let meta = admin_meta(&req);
        ok(self
            .cp
            .rotate_master_key_from_file(&meta)
            .await
            .map(|r| apb::RotateMasterKeyResponse {
                resealed: r.resealed as u64,
                already_current: r.already_current as u64,
                active_key_id: r.active_key_id,
                key_file_reloaded: r.key_file_reloaded,
            }))
    }

    async fn get_usage(&self, req: Request<apb::GetUsageRequest>) -> Reply<apb::UsageSummary> {
        let r = req.into_inner();
        record_id("org_id", &r.org_id);
        ok(self
            .cp
            .get_usage_grouped(&r.org_id, &r.from, &r.to, &r.group_by)
            .await)
    }

    async fn list_audit_events(
        &self,
        req: Request<apb::OrgRef>,
    ) -> Reply<apb::ListAuditEventsResponse> {
        let org_id = req.into_inner().org_id;
        record_id("org_id", &org_id);
        ok(self
            .cp
            .list_audit_events(&org_id)
            .await
            .map(|events| apb::ListAuditEventsResponse { events }))
    }

    async fn list_proxies(
        &self,
        _req: Request<apb::ListProxiesRequest>,
    ) -> Reply<apb::ListProxiesResponse> {
        Ok(Response::new(self.cp.list_proxies()))
    }

    async fn set_model(
        &self,
        req: Request<flex_shared::proto::control::ModelEntry>,
    ) -> Reply<flex_shared::proto::control::ModelEntry> {
        let meta = admin_meta(&req);
        ok(self.cp.set_model(&meta, req.get_ref()).await)
    }

    async fn list_models(
        &self,
        _req: Request<apb::ListModelsRequest>,
    ) -> Reply<apb::ListModelsResponse> {
        Ok(Response::new(apb::ListModelsResponse {
            models: self.cp.list_models(),
        }))
    }

    async fn list_users(
        &self,
        _req: Request<apb::ListUsersRequest>,
    ) -> Reply<apb::ListUsersResponse> {
        ok(self
            .cp
            .list_users()
            .await
            .map(|users| apb::ListUsersResponse { users }))
    }

    async fn create_user(&self, req: Request<apb::CreateUserRequest>) -> Reply<apb::User> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        // The password goes straight into a SecretString; the email is not an id: not recorded.
        let password = SecretString::from(r.password);
        let org = if r.org_id.trim().is_empty() {
            None
        } else {
            record_id("org_id", &r.org_id);
            Some((r.org_id.as_str(), domain::Role::parse(&r.role)?))
        };
        let created = self.cp.create_user(&meta, &r.email, &password, org).await?;
        record_id("user_id", &created.user_id);
        ok(self.cp.user_admin_view(&created.user_id))
    }

    async fn disable_user(&self, req: Request<apb::DisableUserRequest>) -> Reply<apb::User> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        ok(self.cp.disable_user(&meta, &r.user, &r.reason).await)
    }

    async fn enable_user(&self, req: Request<apb::UserRef>) -> Reply<apb::User> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        ok(self.cp.enable_user(&meta, &r.user).await)
    }

    async fn set_limits(&self, req: Request<apb::SetLimitsRequest>) -> Reply<apb::LimitsView> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        record_id("org_id", &r.org_id);
        record_id("key_id", &r.key_id);
        let changes = domain::LimitChanges {
            rpm: r.rpm,
            tpm: r.tpm,
            concurrency: r.concurrency,
            daily_budget_micros: r.daily_budget_micros,
            monthly_budget_micros: r.monthly_budget_micros,
        };
        ok(self
            .cp
            .set_limits(&meta, &r.org_id, &r.key_id, &changes)
            .await)
    }

    async fn get_limits(&self, req: Request<apb::LimitsRef>) -> Reply<apb::LimitsView> {
        let r = req.into_inner();
        record_id("org_id", &r.org_id);
        record_id("key_id", &r.key_id);
        ok(self.cp.get_limits(&r.org_id, &r.key_id).await)
    }

    async fn clear_limits(&self, req: Request<apb::LimitsRef>) -> Reply<apb::LimitsView> {
        let meta = admin_meta(&req);
        let r = req.into_inner();
        record_id("org_id", &r.org_id);
        record_id("key_id", &r.key_id);
        ok(self.cp.clear_limits(&meta, &r.org_id, &r.key_id).await)
    }
}

/// The control API the proxies use (mTLS when the server has a client CA).
#[derive(Debug, Clone)]
pub struct ControlApi {
    cp: Arc<ControlPlane>,
    /// Full snapshots being sent at once: each is a copy of the whole snapshot (hundreds of MB at
    /// a million keys), so a fleet reconnecting together is served a few at a time.
    fulls: Arc<tokio::sync::Semaphore>,
}

/// Full snapshots sent at the same time over Watch streams.
const CONCURRENT_FULLS: usize = 2;

/// Sends the update that brings a Watch stream from `from` to `to`; a full one is built off the
/// runtime threads and holds one of `fulls` until the stream has taken it. False when the
/// stream is gone.
async fn send_update(
    tx: &mpsc::Sender<std::result::Result<pb::SnapshotUpdate, Status>>,
    cp: &Arc<ControlPlane>,
    fulls: &Arc<tokio::sync::Semaphore>,
    from: u64,
    to: &Arc<crate::Published>,
) -> bool {
    if let Some(delta) = cp.delta_update(from, to) {
        return tx.send(Ok(delta)).await.is_ok();
    }
    let Ok(permit) = fulls.clone().acquire_owned().await else {
        return false;
    };
    let published = to.clone();
    let cp2 = cp.clone();
    let Ok(full) = tokio::task::spawn_blocking(move || cp2.full_update(&published)).await else {
        return false;
    };
    if tx.send(Ok(full)).await.is_err() {
        return false;
    }
    // Keep the permit until the encoder has taken the copy off the channel.
    let t0 = tokio::time::Instant::now();
    while tx.capacity() < tx.max_capacity()
        && !tx.is_closed()
        && t0.elapsed() < std::time::Duration::from_secs(120)
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(permit);
    true
}

/// The proxy id a verified client certificate names (its common name), when the call came with
/// one (mutual TLS: `flex control --client-ca`); see `flex_shared::identity`.
fn certified_proxy_id<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    flex_shared::identity::certificate_common_name(certs.first()?.as_ref())
}

/// With a certificate's id: the id the call may use (the certificate's), or PERMISSION_DENIED
/// when the call names another one. Without one: `None` (the claimed id stands, validated).
fn bound_proxy_id(
    claimed: &str,
    certified: Option<String>,
) -> std::result::Result<Option<String>, Status> {
    let Some(cn) = certified else {
        return Ok(None);
    };
    let claimed = claimed.trim();
    if claimed.is_empty() || claimed == cn {
        let id = domain::validate_id(
            "proxy_id",
            &cn,
            "the common name of the proxy's client certificate",
        )?;
        return Ok(Some(id));
    }
    Err(Status::permission_denied(format!(
        "this connection's client certificate is for proxy `{cn}` (its common name), but the call \
         names proxy `{claimed}`: with mutual TLS a proxy's id is its certificate's. Fix: start \
         the proxy with --proxy-id {cn}, or without --proxy-id (it then takes the certificate's), \
         or give it a certificate issued for `{claimed}` (deploy/make-secrets.sh {claimed})"
    )))
}

#[tonic::async_trait]
impl ControlService for ControlApi {
    type WatchStream = ReceiverStream<std::result::Result<pb::SnapshotUpdate, Status>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Reply<Self::WatchStream> {
        let peer = req.remote_addr();
        let certified = certified_proxy_id(&req);
        let r = req.into_inner();
        let proxy_id = match bound_proxy_id(&r.proxy_id, certified)? {
            Some(id) => id,
            None if r.proxy_id.trim().is_empty() => match peer {
                Some(addr) => format!("anonymous@{addr}"),
                None => format!("anonymous-{}", uuid::Uuid::new_v4().simple()),
            },
            None => domain::validate_id("proxy_id", &r.proxy_id, "the proxy's hostname")?,
        };
        record_id("proxy_id", &proxy_id);
        let mut rx = self.cp.subscribe();
        let current = rx.borrow_and_update().clone();
        let have_version = r.have_version;
        let connection = self.cp.proxies().connect(&proxy_id, "grpc");
        let ended = self.cp.watch_streams_ended();
        let (tx, out) = mpsc::channel(16);
        let (cp, fulls) = (self.cp.clone(), self.fulls.clone());
        tokio::spawn(async move {
            let _connection = connection;
            tokio::pin!(ended);
            // A delta from the version the proxy has, while the change records cover it; else
            // the full snapshot.
            if !send_update(&tx, &cp, &fulls, have_version, &current).await {
                return;
            }
            let mut last = current;
            // An idle stream still hears from us: a heartbeat refreshes the proxy's age.
            let every = cp
                .snapshot_heartbeat()
                .unwrap_or(std::time::Duration::from_secs(365 * 24 * 3600));
            let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    _ = beat.tick(), if cp.snapshot_heartbeat().is_some() => {
                        if tx.send(Ok(cp.heartbeat_update(&last))).await.is_err() {
                            return;
                        }
                    }
                    () = &mut ended => {
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "the control plane is shutting down; reconnect",
                            )))
                            .await;
                        return;
                    }
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return; // the control plane is shutting down
                        }
                        let next = rx.borrow_and_update().clone();
                        if next.version == last.version {
                            continue;
                        }
                        if !send_update(&tx, &cp, &fulls, last.version, &next).await {
                            return;
                        }
                        last = next;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Reply<pb::AckResponse> {
        let certified = certified_proxy_id(&req);
        let r = req.into_inner();
        let proxy_id = match bound_proxy_id(&r.proxy_id, certified)? {
            Some(id) => id,
            None => domain::validate_id("proxy_id", &r.proxy_id, "the proxy's hostname")?,
        };
        record_id("proxy_id", &proxy_id);
        let error: String = r.error.chars().take(1000).collect();
        self.cp.ack(&proxy_id, r.version, r.accepted, &error);
        Ok(Response::new(pb::AckResponse {}))
    }

    async fn report_usage(
        &self,
        req: Request<pb::ReportUsageRequest>,
    ) -> Reply<pb::ReportUsageResponse> {
        let r = req.into_inner();
        ok(self
            .cp
            .report_usage(&r.events_json)
            .await
            .map(|accepted| pb::ReportUsageResponse { accepted }))
    }
}
