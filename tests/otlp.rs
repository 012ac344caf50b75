#![allow(clippy::unwrap_used, clippy::expect_used)]
//! OTLP trace export with the real binary: `flex up --demo --otlp-endpoint` against a collector
//! stub (opentelemetry-proto's gRPC `TraceService`, served by tonic on a free port). The request
//! spans arrive with the race outcome, their ids and numbers, and none of the secrets: not the
//! API key, not a provider key, not the prompt.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
}

async fn post(url: String, key: &str, body: Value) -> Reply {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_an_otlp_collector_without_secrets() {
    // The collector stub.
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_port = listener.local_addr().unwrap().port();
    {
        let svc = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
    }

    // `flex up --demo`, exporting to it. The batch processor's delay is a minute, so whatever
    // arrives was sent by the flush at exit.
    let dir = tempfile::tempdir().unwrap();
    let (api, admin) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_flex"))
        .args(["up", "--demo", "--data-dir"])
        .arg(dir.path())
        .args([
            "--listen",
            &format!("127.0.0.1:{api}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{otlp_port}"),
        ])
        .env("FLEX_OTLP_SERVICE_NAME", "flex-otlp-test")
        .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
        .env_remove("FLEX_LOG")
        .env_remove("OTEL_SERVICE_NAME")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Kill(child);
    let demo_path = dir.path().join("demo.json");
    let t0 = Instant::now();
    while !demo_path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "flex up --demo wrote no demo.json"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let demo: Value = serde_json::from_slice(&std::fs::read(&demo_path).unwrap()).unwrap();
    let api_key = demo["api_key"].as_str().unwrap().to_string();
    assert!(api_key.starts_with("flex_live_"), "{api_key}");
    let sim_keys: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("sim-keys.json")).unwrap()).unwrap();
    let provider_keys: Vec<String> = ["openai", "anthropic", "gemini"]
        .iter()
        .map(|p| sim_keys[p].as_str().unwrap().to_string())
        .collect();
    let base = format!("http://127.0.0.1:{api}/v1");
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
    let pid = guard.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = guard.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "flex up did not exit within 20 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "flex up exited with {status}");

    let spans = collector.spans();
    let request_span = |r: &Reply| {
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
    };

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
    let contains = |needle: &str| wire.windows(needle.len()).any(|w| w == needle.as_bytes());
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
