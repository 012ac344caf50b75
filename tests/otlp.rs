#![allow(clippy::unwrap_used, clippy::expect_used)]
//! OTLP trace export with the real binary: `flex up --demo --otlp-endpoint` against a collector
//! stub (opentelemetry-proto's gRPC `TraceService`, served by tonic on a free port). The request
//! spans arrive with the race outcome, their ids and numbers, and none of the secrets: not the
//! API key, not a provider key, not the prompt. A caller's W3C `traceparent` makes the request
//! span its child; the control plane's admin RPCs (driven by `flex admin`) arrive as spans with
//! their method, status and ids, without the admin token or a provider key set through them; and
//! an https:// collector signed by a private CA is reached with `--otlp-ca`.

#[path = "common/infra.rs"]
mod infra;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use infra::{flex_admin_in, FlexUp};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{json, Value};

/// What the stub received: every export request, decoded.
#[derive(Clone, Default)]
struct Collector {
    got: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.got.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Every span received, with the `service.name` of its resource.
    fn spans(&self) -> Vec<(String, Span)> {
        let got = self.got.lock().unwrap();
        let mut out = Vec::new();
        for req in got.iter() {
            for rs in &req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| attr(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for span in &ss.spans {
                        out.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        out
    }

    /// Everything exported, as the bytes that went over the wire (protobuf keeps strings as
    /// they are, so a secret anywhere in a payload shows up here).
    fn wire_bytes(&self) -> Vec<u8> {
        let got = self.got.lock().unwrap();
        got.iter().flat_map(Message::encode_to_vec).collect()
    }
}

/// An attribute's value as text (strings as they are, numbers in decimal).
fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match v.value.as_ref()? {
        Any::StringValue(s) => Some(s.clone()),
        Any::IntValue(i) => Some(i.to_string()),
        Any::BoolValue(b) => Some(b.to_string()),
        Any::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
}

async fn post(url: String, key: &str, body: Value) -> Reply {
    post_with(url, key, body, &[]).await
}

async fn post_with(url: String, key: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("the proxy answered within 30 s")
        .unwrap();
    let (parts, body) = resp.into_parts();
    body.collect().await.unwrap();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
    }
}

fn header(r: &Reply, name: &str) -> String {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A collector stub on a free port: plain gRPC, or TLS with `identity` (cert, key PEM).
async fn start_collector(identity: Option<(String, String)>) -> (Collector, u16) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let svc = TraceServiceServer::new(collector.clone());
    let mut server = tonic::transport::Server::builder();
    if let Some((cert, key)) = identity {
        server = server
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .unwrap();
    }
    tokio::spawn(async move {
        server
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (collector, port)
}

/// A running `flex up --demo`, exporting to a collector.
struct Up {
    flex: FlexUp,
    demo: Value,
}

/// `flex up --demo` with `otlp_args` (the endpoint, …). The batch processor's delay is a
/// minute, so whatever arrives was sent by the flush at exit.
async fn start_up(otlp_args: &[&str]) -> Up {
    let flex = FlexUp::start(&["--demo"], |cmd| {
        cmd.args(otlp_args)
            .env("FLEX_OTLP_SERVICE_NAME", "flex-otlp-test")
            .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
            .env_remove("FLEX_LOG")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_TRACES_SAMPLER")
            .stdin(Stdio::null());
    });
    let demo_path = flex
        .wait_for_file_async("demo.json", Duration::from_secs(30))
        .await;
    let demo: Value = serde_json::from_slice(&std::fs::read(&demo_path).unwrap()).unwrap();
    Up { flex, demo }
}

impl Up {
    fn dir(&self) -> &Path {
        self.flex.dir.path()
    }

    fn api_key(&self) -> String {
        self.demo["api_key"].as_str().unwrap().to_string()
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.flex.api)
    }

    /// SIGTERM (a planned stop flushes the spans), then a clean exit.
    async fn stop(&mut self) {
        let pid = self.flex.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.flex.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "flex up did not exit within 20 s of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "flex up exited with {status}");
    }
}

/// The one `request` span of the answer `r` (by its `x-request-id`).
fn request_span_of(spans: &[(String, Span)], r: &Reply) -> (String, Span) {
    let id = header(r, "x-request-id");
    assert!(id.starts_with("req_"), "{id:?}");
    let found: Vec<_> = spans
        .iter()
        .filter(|(_, s)| {
            s.name == "request" && attr(&s.attributes, "request_id") == Some(id.clone())
        })
        .collect();
    assert_eq!(found.len(), 1, "one span for {id} in {spans:#?}");
    found[0].clone()
}

/// Whether `needle` occurs anywhere in `wire`.
fn contains(wire: &[u8], needle: &str) -> bool {
    wire.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_an_otlp_collector_without_secrets() {
    let (collector, otlp_port) = start_collector(None).await;
    let mut up = start_up(&["--otlp-endpoint", &format!("http://127.0.0.1:{otlp_port}")]).await;
    let dir = up.dir().to_path_buf();
    let demo = up.demo.clone();
    let api_key = up.api_key();
    assert!(api_key.starts_with("flex_live_"), "{api_key}");
    let sim_keys: Value =
        serde_json::from_slice(&std::fs::read(dir.join("sim-keys.json")).unwrap()).unwrap();
    let provider_keys: Vec<String> = ["openai", "anthropic", "gemini"]
        .iter()
        .map(|p| sim_keys[p].as_str().unwrap().to_string())
        .collect();
    let base = up.base();
    const PROMPT: &str = "prompt-canary-7f3a9c";

    // Flex starts in time; flex never starts within a 5 s budget (standard takes over); a
    // refused request.
    let flex = post(
        format!("{base}/responses"),
        &api_key,
        json!({"model": "gpt-5.5", "input": format!("{PROMPT} #sim flex_delay_ms=50"),
               "start_within": "00h-00m-10s"}),
    );
    let standard = post(
        format!("{base}/chat/completions"),
        &api_key,
        json!({"model": "gpt-5.5",
               "messages": [{"role": "user", "content": format!("{PROMPT} #sim flex_delay_ms=60000")}],
               "start_within": "00h-00m-05s"}),
    );
    let refused = post(
        format!("{base}/responses"),
        &api_key,
        json!({"model": "gpt-5.5", "input": PROMPT, "start_within": "soon"}),
    );
    let (flex, standard, refused) = tokio::join!(flex, standard, refused);
    assert_eq!(flex.status, 200);
    assert_eq!(header(&flex, "x-flex-served-tier"), "flex");
    assert_eq!(standard.status, 200);
    assert_eq!(header(&standard, "x-flex-reason"), "flex_timeout");
    assert_eq!(refused.status, 400);

    // Nothing before exit (the schedule is a minute away); then SIGTERM: a planned stop flushes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(collector.spans().is_empty(), "exported before the flush");
    up.stop().await;

    let spans = collector.spans();
    let request_span = |r: &Reply| request_span_of(&spans, r);

    let (service, span) = request_span(&flex);
    assert_eq!(service, "flex-otlp-test");
    assert_eq!(span.kind, SpanKind::Server as i32);
    let a = |k: &str| attr(&span.attributes, k);
    assert_eq!(a("format").as_deref(), Some("responses"));
    assert_eq!(a("model").as_deref(), Some("gpt-5.5"));
    assert_eq!(a("provider").as_deref(), Some("openai"));
    assert_eq!(a("start_within").as_deref(), Some("00h-00m-10s"));
    assert_eq!(a("served_tier").as_deref(), Some("flex"));
    assert_eq!(a("reason").as_deref(), Some("flex_started"));
    assert_eq!(a("status").as_deref(), Some("200"));
    assert_eq!(a("org_id").as_deref(), demo["org_id"].as_str());
    assert!(a("key_id").is_some_and(|k| !k.is_empty()));
    let flex_wait: u64 = a("flex_wait_ms").unwrap().parse().unwrap();
    let start_latency: u64 = a("start_latency_ms").unwrap().parse().unwrap();
    assert!(start_latency >= flex_wait, "{start_latency} < {flex_wait}");
    // The OpenTelemetry GenAI semantic-convention attributes.
    assert_eq!(a("gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(a("gen_ai.provider.name").as_deref(), Some("openai"));
    assert_eq!(a("gen_ai.request.model").as_deref(), Some("gpt-5.5"));
    assert_eq!(a("gen_ai.response.model").as_deref(), Some("gpt-5.5"));
    let input: u64 = a("gen_ai.usage.input_tokens").unwrap().parse().unwrap();
    let output: u64 = a("gen_ai.usage.output_tokens").unwrap().parse().unwrap();
    assert!(input > 0 && output > 0, "{input} {output}");
    // The race's event rides along on the span.
    assert!(
        span.events.iter().any(|e| e.name == "flex race decided"),
        "{:?}",
        span.events
    );

    let (_, span) = request_span(&standard);
    let a = |k: &str| attr(&span.attributes, k);
    assert_eq!(a("format").as_deref(), Some("chat_completions"));
    assert_eq!(a("served_tier").as_deref(), Some("standard"));
    assert_eq!(a("reason").as_deref(), Some("flex_timeout"));
    assert_eq!(a("status").as_deref(), Some("200"));
    let start_latency: u64 = a("start_latency_ms").unwrap().parse().unwrap();
    assert!(start_latency <= 5_000, "{start_latency}");

    let (_, span) = request_span(&refused);
    let a = |k: &str| attr(&span.attributes, k);
    assert_eq!(a("status").as_deref(), Some("400"));
    assert_eq!(a("error_code").as_deref(), Some("invalid_start_within"));
    assert_eq!(a("served_tier"), None);

    // No secret and no prompt anywhere in what was exported.
    let wire = collector.wire_bytes();
    assert!(!wire.is_empty());
    let contains = |needle: &str| contains(&wire, needle);
    assert!(!contains(&api_key), "the API key was exported");
    let key_body = api_key.trim_start_matches("flex_live_");
    assert!(
        !contains(key_body),
        "the API key's secret part was exported"
    );
    for k in &provider_keys {
        assert!(!contains(k), "a provider key was exported");
    }
    assert!(!contains(PROMPT), "prompt content was exported");
    assert!(!contains("Bearer"), "an authorization header was exported");
}

/// `flex admin --data-dir DIR ARGS…`, with `stdin` piped in, and no `FLEX_*` variable of the
/// test's own.
fn admin(dir: &Path, args: &[&str], stdin: &str) -> Output {
    flex_admin_in(dir, args, &[], Some(stdin))
}

fn admin_json(dir: &Path, args: &[&str], stdin: &str) -> Value {
    let out = admin(dir, args, stdin);
    assert!(
        out.status.success(),
        "flex admin {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The one span named `name` whose attribute `key` is `value`.
fn span_named<'a>(spans: &'a [(String, Span)], name: &str, key: &str, value: &str) -> &'a Span {
    let found: Vec<_> = spans
        .iter()
        .filter(|(_, s)| s.name == name && attr(&s.attributes, key).as_deref() == Some(value))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name} span with {key}={value} in {:#?}",
        spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
    );
    &found[0].1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_trace_context_and_admin_rpcs_are_exported_without_secrets() {
    let (collector, otlp_port) = start_collector(None).await;
    let mut up = start_up(&["--otlp-endpoint", &format!("http://127.0.0.1:{otlp_port}")]).await;
    let dir = up.dir().to_path_buf();
    let api_key = up.api_key();
    let body = json!({"model": "gpt-5.5", "input": "hi", "start_within": "default"});

    // A caller's W3C trace context: sampled, not sampled (our span is recorded all the same),
    // and malformed (ignored: the request is served and its span is a root).
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    const UNSAMPLED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let sampled = post_with(
        format!("{}/responses", up.base()),
        &api_key,
        body.clone(),
        &[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "caller=blue"),
        ],
    )
    .await;
    let unsampled = post_with(
        format!("{}/responses", up.base()),
        &api_key,
        body.clone(),
        &[("traceparent", &format!("00-{UNSAMPLED_TRACE}-{PARENT}-00"))],
    )
    .await;
    let malformed = post_with(
        format!("{}/responses", up.base()),
        &api_key,
        body.clone(),
        &[("traceparent", &format!("00-{TRACE}-{PARENT}"))],
    )
    .await;
    for r in [&sampled, &unsampled, &malformed] {
        assert_eq!(r.status, 200);
    }

    // The admin API, through `flex admin` (the token comes from the data dir).
    let admin_token = std::fs::read_to_string(dir.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    assert!(admin_token.len() >= 16, "{admin_token:?}");
    let org = admin_json(&dir, &["--json", "org", "create", "otlp-org"], "");
    let org_id = org["org_id"].as_str().unwrap().to_string();
    const PROVIDER_KEY: &str = "sk-provider-canary-5e1d0b7a";
    admin_json(
        &dir,
        &[
            "--json",
            "provider-key",
            "set",
            "--org",
            &org_id,
            "--provider",
            "openai",
        ],
        PROVIDER_KEY,
    );
    let key = admin_json(&dir, &["--json", "key", "create", "--org", &org_id], "");
    let created_key = key["api_key"].as_str().unwrap().to_string();
    let key_id = key["key_id"].as_str().unwrap().to_string();
    assert!(created_key.starts_with("flex_live_"));
    // Refused calls: an unknown org; a wrong token.
    let out = admin(&dir, &["org", "suspend", "org_nope"], "");
    assert!(!out.status.success());
    const WRONG_TOKEN: &str = "wrong-admin-token-canary-42";
    let out = admin(&dir, &["--token", WRONG_TOKEN, "org", "list"], "");
    assert!(!out.status.success());
    // A gRPC caller with W3C trace context metadata (as grpcurl -H traceparent:… sends it).
    const ADMIN_TRACE: &str = "5b8aa5a2d2c872e8321cf37308d69df2";
    const ADMIN_PARENT: &str = "051581bf3cb55c13";
    {
        use flex_shared::proto::admin::admin_service_client::AdminServiceClient;
        use flex_shared::proto::admin::ListOrgsRequest;
        let mut client = AdminServiceClient::connect(format!("http://127.0.0.1:{}", up.flex.admin))
            .await
            .unwrap();
        let mut req = tonic::Request::new(ListOrgsRequest {});
        let md = req.metadata_mut();
        md.insert(
            "authorization",
            format!("Bearer {admin_token}").parse().unwrap(),
        );
        md.insert(
            "traceparent",
            format!("00-{ADMIN_TRACE}-{ADMIN_PARENT}-01")
                .parse()
                .unwrap(),
        );
        let orgs = client.list_orgs(req).await.unwrap().into_inner().orgs;
        assert!(orgs.iter().any(|o| o.org_id == org_id));
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    up.stop().await;
    let spans = collector.spans();

    // The request spans: children of the caller's span, in the caller's trace.
    let (_, span) = request_span_of(&spans, &sampled);
    assert_eq!(hex(&span.trace_id), TRACE);
    assert_eq!(hex(&span.parent_span_id), PARENT);
    assert_eq!(span.trace_state, "caller=blue");
    let (_, span) = request_span_of(&spans, &unsampled);
    assert_eq!(hex(&span.trace_id), UNSAMPLED_TRACE);
    assert_eq!(hex(&span.parent_span_id), PARENT);
    let (_, span) = request_span_of(&spans, &malformed);
    assert_ne!(hex(&span.trace_id), TRACE);
    assert!(span.parent_span_id.is_empty(), "{span:?}");

    // The admin RPCs: one server span each, with the method, the status and the ids.
    let s = span_named(
        &spans,
        "flex.admin.v1.AdminService/CreateOrg",
        "org_id",
        &org_id,
    );
    assert_eq!(s.kind, SpanKind::Server as i32);
    let a = |s: &Span, k: &str| attr(&s.attributes, k);
    assert_eq!(a(s, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        a(s, "rpc.service").as_deref(),
        Some("flex.admin.v1.AdminService")
    );
    assert_eq!(a(s, "rpc.method").as_deref(), Some("CreateOrg"));
    assert_eq!(a(s, "rpc.grpc.status_code").as_deref(), Some("0"));
    assert!(a(s, "request_id").is_some_and(|r| r.starts_with("req_")));
    let s = span_named(
        &spans,
        "flex.admin.v1.AdminService/SetProviderKey",
        "org_id",
        &org_id,
    );
    assert_eq!(a(s, "provider").as_deref(), Some("openai"));
    assert_eq!(a(s, "rpc.grpc.status_code").as_deref(), Some("0"));
    let s = span_named(
        &spans,
        "flex.admin.v1.AdminService/CreateApiKey",
        "key_id",
        &key_id,
    );
    assert_eq!(a(s, "org_id").as_deref(), Some(org_id.as_str()));
    let s = span_named(
        &spans,
        "flex.admin.v1.AdminService/SuspendOrg",
        "org_id",
        "org_nope",
    );
    assert_eq!(a(s, "rpc.grpc.status_code").as_deref(), Some("5"));
    let s = span_named(
        &spans,
        "flex.admin.v1.AdminService/ListOrgs",
        "rpc.grpc.status_code",
        "16",
    );
    assert_eq!(a(s, "org_id"), None);
    // The call with trace context: a child of the caller's span; the others are roots.
    let traced: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| {
            s.name == "flex.admin.v1.AdminService/ListOrgs" && hex(&s.trace_id) == ADMIN_TRACE
        })
        .collect();
    assert_eq!(traced.len(), 1, "one ListOrgs call carried trace context");
    assert_eq!(hex(&traced[0].parent_span_id), ADMIN_PARENT);
    assert_eq!(a(traced[0], "rpc.grpc.status_code").as_deref(), Some("0"));
    let s = span_named(
        &spans,
        "flex.admin.v1.AdminService/CreateOrg",
        "org_id",
        &org_id,
    );
    assert!(s.parent_span_id.is_empty(), "{s:?}");

    // No token, no key: neither the admin token, the wrong one, the provider key set through
    // the API nor the API key it created.
    let wire = collector.wire_bytes();
    assert!(
        !contains(&wire, &admin_token),
        "the admin token was exported"
    );
    assert!(
        !contains(&wire, WRONG_TOKEN),
        "a presented token was exported"
    );
    assert!(
        !contains(&wire, PROVIDER_KEY),
        "a provider key was exported"
    );
    assert!(
        !contains(&wire, &created_key),
        "a created API key was exported"
    );
    assert!(
        !contains(&wire, created_key.trim_start_matches("flex_live_")),
        "a created API key's secret part was exported"
    );
    assert!(!contains(&wire, &api_key), "the API key was exported");
    assert!(
        !contains(&wire, "Bearer"),
        "an authorization header was exported"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_collector_with_a_private_ca() {
    let pki = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "otlp test CA");
    let ca = params.self_signed(&ca_key).unwrap();
    let ca_path = pki.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();

    // A bad CA file stops the process at start, naming the flag, the reason and the fix.
    let out = Command::new(env!("CARGO_BIN_EXE_flex"))
        .args(["up", "--demo", "--data-dir"])
        .arg(pki.path().join("unused"))
        .args([
            "--otlp-endpoint",
            "https://localhost:4317",
            "--otlp-ca",
            "/nonexistent/otlp-ca.pem",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--otlp-ca /nonexistent/otlp-ca.pem")
            && err.contains("cannot read")
            && err.contains("Fix:"),
        "{err}"
    );

    // … and so does a CA with nothing to use it for.
    let out = Command::new(env!("CARGO_BIN_EXE_flex"))
        .args(["up", "--demo", "--data-dir"])
        .arg(pki.path().join("unused"))
        .arg("--otlp-ca")
        .arg(&ca_path)
        .env_remove("FLEX_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--otlp-ca") && err.contains("no OTLP endpoint") && err.contains("Fix:"),
        "{err}"
    );

    let (collector, otlp_port) = start_collector(Some((cert.pem(), key.serialize_pem()))).await;
    let mut up = start_up(&[
        "--otlp-endpoint",
        &format!("https://localhost:{otlp_port}"),
        "--otlp-ca",
        ca_path.to_str().unwrap(),
    ])
    .await;
    let r = post(
        format!("{}/responses", up.base()),
        &up.api_key(),
        json!({"model": "gpt-5.5", "input": "hi", "start_within": "default"}),
    )
    .await;
    assert_eq!(r.status, 200);
    up.stop().await;
    let spans = collector.spans();
    let (service, _) = request_span_of(&spans, &r);
    assert_eq!(service, "flex-otlp-test");
}
