//! The proxy's HTTP front: HTTP/1.1 and HTTP/2 (h2c, or ALPN over TLS with rustls) on one port.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::auth::authenticate;
use crate::error::{ApiError, ProxyError};
use crate::formats::CallerFormat;
use crate::proxy::Proxy;

/// The proxy's routes: the four API formats, `/v1/models`, health, readiness and metrics.
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route(
            "/v1/responses",
            post(|s, r| api(s, r, CallerFormat::Responses)),
        )
        .route(
            "/v1/chat/completions",
            post(|s, r| api(s, r, CallerFormat::ChatCompletions)),
        )
        .route(
            "/v1/interactions",
            post(|s, r| api(s, r, CallerFormat::Interactions)),
        )
        .route(
            "/v1/messages",
            post(|s, r| api(s, r, CallerFormat::Messages)),
        )
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(proxy)
}

async fn api(State(proxy): State<Arc<Proxy>>, req: Request, format: CallerFormat) -> Response {
    let (parts, body) = req.into_parts();
    let limit = proxy.cfg.max_body_bytes;
    let bytes: Bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            let err = if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    format!(
                        "The request body is larger than the limit of {} MiB.",
                        limit / (1024 * 1024)
                    ),
                )
                .fix("send large files by URL instead of inline base64, or split the request.")
            } else {
                ApiError::bad_request(
                    "body_read_error",
                    format!("The request body could not be read: {e}."),
                )
            };
            return err.into_response_for(format);
        }
    };
    proxy.handle(format, parts.headers, bytes).await
}

async fn models(State(proxy): State<Arc<Proxy>>, req: Request) -> Response {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let caller = match authenticate(
        proxy.snapshots.load(),
        CallerFormat::Responses,
        req.headers(),
        now,
    ) {
        Ok(c) => c,
        Err(e) => return e.into_response_for(CallerFormat::Responses),
    };
    let data: Vec<_> = caller
        .snapshot
        .catalog
        .models()
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "object": "model",
                "created": 0,
                "owned_by": m.provider.as_str(),
                "provider": m.provider.as_str(),
                "flex_capable": m.flex_capable,
                "aliases": m.aliases,
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn readyz(State(proxy): State<Arc<Proxy>>) -> Response {
    if proxy.snapshots.draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: draining (a planned stop); requests in flight are being finished\n",
        )
            .into_response();
    }
    match proxy.snapshots.load() {
        Some(s) => (
            StatusCode::OK,
            format!("ready: snapshot version {}\n", s.version),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no snapshot loaded yet\n",
        )
            .into_response(),
    }
}

async fn metrics(State(proxy): State<Arc<Proxy>>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        proxy
            .metrics
            .encode(proxy.cfg.extra_metrics.as_ref().map(|e| &*e.0)),
    )
        .into_response()
}

/// The metrics endpoint, for `--metrics-listen` (never on the public API port): `GET /metrics`.
pub fn metrics_router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(proxy)
}

async fn not_found(req: Request) -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_endpoint", format!("There is no endpoint {} {}.", req.method(), req.uri().path()))
        .fix("use POST /v1/responses, /v1/chat/completions, /v1/interactions, /v1/messages or GET /v1/models; the base URL ends in /v1.")
        .example("base_url=\"http://127.0.0.1:8080/v1\"")
        .into_response_for(CallerFormat::Responses)
}

/// A route that exists, asked with another method (e.g. `GET /v1/responses`): our error, in the
/// envelope of the endpoint's format; axum adds the `allow` header.
async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path();
    let format = [
        CallerFormat::Responses,
        CallerFormat::ChatCompletions,
        CallerFormat::Interactions,
        CallerFormat::Messages,
    ]
    .into_iter()
    .find(|f| f.path() == path);
    let (allowed, fix, example) = match format {
        Some(f) => {
            let body = match f {
                CallerFormat::Messages => {
                    r#"{"model": "claude-opus-4-8", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello!"}], "start_within": "default"}"#
                }
                CallerFormat::ChatCompletions => {
                    r#"{"model": "gpt-5.5", "messages": [{"role": "user", "content": "Hello!"}], "start_within": "00h-00m-30s"}"#
                }
                CallerFormat::Interactions => {
                    r#"{"model": "gemini-3.5-flash", "input": "Hello!", "start_within": "00h-00m-30s"}"#
                }
                CallerFormat::Responses => {
                    r#"{"model": "gpt-5.5", "input": "Hello!", "start_within": "00h-00m-30s"}"#
                }
            };
            (
                "POST",
                format!("send POST {path} with a JSON body (the official SDKs do)."),
                format!("curl -X POST http://127.0.0.1:8080{path} -H \"Authorization: Bearer $FLEX_API_KEY\" -H 'Content-Type: application/json' -d '{body}'"),
            )
        }
        None => (
            "GET",
            format!("send GET {path}."),
            format!("curl http://127.0.0.1:8080{path}"),
        ),
    };
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} {path} is not supported: {path} takes {allowed} only.",
            req.method()
        ),
    )
    .fix(fix)
    .example(example)
    .into_response_for(format.unwrap_or(CallerFormat::Responses))
}

/// Builds a TLS acceptor (HTTP/2 and HTTP/1.1 by ALPN) from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ProxyError> {
    let certs = crate::plane_tls::pem_certs(std::io::BufReader::new(
        std::fs::File::open(cert)
            .map_err(|e| ProxyError::Tls(format!("cannot open {}: {e}", cert.display())))?,
    ));
    let certs =
        certs.map_err(|e| ProxyError::Tls(format!("{} is not PEM: {e}", cert.display())))?;
    let key = crate::plane_tls::pem_private_key(std::io::BufReader::new(
        std::fs::File::open(key)
            .map_err(|e| ProxyError::Tls(format!("cannot open {}: {e}", key.display())))?,
    ))
    .map_err(|e| ProxyError::Tls(format!("{} is not PEM: {e}", key.display())))?
    .ok_or_else(|| ProxyError::Tls(format!("{} holds no private key", key.display())))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ProxyError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| ProxyError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves `router` on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<()> {
    serve_until(
        listener,
        router,
        tls,
        std::future::pending(),
        std::time::Duration::ZERO,
    )
    .await
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains: no new connections,
/// idle keep-alive connections closed, and requests in flight (streams included) given up to
/// `grace` to finish before their connections are dropped. Returns once drained.
pub async fn serve_until(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: std::time::Duration,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(router.clone());
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let result = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => {
                        watcher
                            .watch(builder.serve_connection(TokioIo::new(s), svc))
                            .await
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), svc))
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "requests still in flight after the shutdown grace period are cut off"
        );
    } else {
        tracing::info!("every request in flight finished");
    }
    Ok(())
}
