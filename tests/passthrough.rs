#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Native pairs pass through: the provider receives the caller's body with only the tier fields
//! changed, and the caller receives the provider's body byte for byte (issue 4).

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::*;
use serde_json::{json, Value};

/// A provider that answers with fixed, oddly formatted bytes and records what it received.
#[derive(Clone, Default)]
struct Capture {
    requests: Arc<Mutex<Vec<(String, Bytes)>>>,
}

const RESPONSES_BODY: &str = "{\"id\":\"resp_1\",  \"object\":\"response\",\"status\":\"completed\",\"service_tier\":\"default\",\n \"output\":[{\"type\":\"message\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"caf\\u00e9 1.0e0\",\"annotations\":[]}]}],\"usage\":{\"input_tokens\":3,\"output_tokens\":2,\"total_tokens\":5},\"zz_unknown_field\":[1,2.50,{}]}";
const MESSAGES_BODY: &str = "{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-opus-4-8\",\n\"content\":[{\"type\":\"text\",\"text\":\"d\\u00e9j\\u00e0 vu\"}],\"stop_reason\":\"end_turn\",\"stop_sequence\":null,\"usage\":{\"input_tokens\":4,\"output_tokens\":2,\"service_tier\":\"standard\"},  \"future_field\":true}";

async fn upstream() -> (String, Capture) {
    let cap = Capture::default();
    let record = |body: &'static str| {
        move |State(c): State<Capture>, req: axum::extract::Request| async move {
            let path = req.uri().path().to_string();
            let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap();
            c.requests.lock().unwrap().push((path, bytes));
            ([("content-type", "application/json")], body)
        }
    };
    let app = axum::Router::new()
        .route("/v1/responses", post(record(RESPONSES_BODY)))
        .route("/v1/messages", post(record(MESSAGES_BODY)))
        .with_state(cap.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, cap)
}

#[tokio::test]
async fn native_pairs_return_the_provider_body_byte_for_byte_and_edit_only_tier_fields() {
    let (url, cap) = upstream().await;
    let s = stack_with(Options {
        sim: sim_config(),
        openai_url: Some(format!("{url}/v1")),
        ca: None,
        anthropic_url: Some(url.clone()),
    })
    .await;

    let caller = r#"{"model":"gpt-4o","input":[{"role":"user","content":"caf\u00e9"}],"temperature":1.0,"start_within":"default","metadata":{"b":1,"a":2}}"#;
    let r = post_raw(
        &format!("{}/responses", s.base),
        Some(("authorization", format!("Bearer {}", s.api_key))),
        Bytes::from(caller),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        RESPONSES_BODY,
        "the provider's body, byte for byte"
    );
    let (path, sent) = cap.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!(path, "/v1/responses");
    assert_eq!(
        String::from_utf8(sent.to_vec()).unwrap(),
        r#"{"model":"gpt-4o","input":[{"role":"user","content":"caf\u00e9"}],"temperature":1.0,"metadata":{"b":1,"a":2},"service_tier":"default"}"#,
        "only start_within removed and service_tier added"
    );

    let caller = r#"{"model":"claude-opus-4-8","max_tokens":64,"messages":[{"role":"user","content":"d\u00e9j\u00e0"}],"start_within":"priority"}"#;
    let r = post_raw(
        &format!("{}/messages", s.base),
        Some(("x-api-key", s.api_key.clone())),
        Bytes::from(caller),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), MESSAGES_BODY);
    let (path, sent) = cap.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!(path, "/v1/messages");
    let v: Value = serde_json::from_slice(&sent).unwrap();
    assert_eq!(
        v["service_tier"], "auto",
        "priority is best effort on Anthropic"
    );
    assert!(v.get("start_within").is_none());
    assert_eq!(
        String::from_utf8(sent.to_vec()).unwrap(),
        r#"{"model":"claude-opus-4-8","max_tokens":64,"messages":[{"role":"user","content":"d\u00e9j\u00e0"}],"service_tier":"auto"}"#
    );
}

#[tokio::test]
async fn native_messages_streams_pass_through_event_for_event_with_usage() {
    let s = stack().await;
    let body = json!({"model": "claude-opus-4-8", "max_tokens": 64, "stream": true, "messages": [{"role": "user", "content": "hi"}], "start_within": "default"});
    let r = post_raw(
        &format!("{}/messages", s.base),
        Some(("x-api-key", s.api_key.clone())),
        Bytes::from(body.to_string()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let names: Vec<&str> = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .map(|n| Box::leak(n.to_string().into_boxed_str()) as &str)
        .collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    assert_eq!(r.header("x-flex-served-tier"), "standard");
    // Missing max_tokens is ours to refuse, in Anthropic's envelope.
    let body = json!({"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "hi"}], "start_within": "default"});
    let r = post_raw(
        &format!("{}/messages", s.base),
        Some(("x-api-key", s.api_key.clone())),
        Bytes::from(body.to_string()),
    )
    .await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(
        (v["type"].as_str(), v["error"]["code"].as_str()),
        (Some("error"), Some("missing_max_tokens"))
    );
}
