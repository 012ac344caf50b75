#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Upstream bytes are not trusted, end to end: a provider whose stream numbers an item
//! `1000000000000` (an index that would size a list) makes the caller's answer an error (the
//! format's error event, or a 502 `upstream_incomplete`) with usage `incomplete`, never a crash
//! or a huge allocation, and the proxy goes on serving (docs/failure-policy.md).
//!
//! The provider is a tiny hyper server of the test's own (not the simulator): OpenAI (Responses
//! and Chat Completions) and Anthropic (Messages) streams, malformed unless the request's text
//! carries `#ok`.

mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const HUGE: u64 = 1_000_000_000_000;

fn sse(events: &[(&str, Value)]) -> String {
    let mut out = String::new();
    for (name, data) in events {
        if !name.is_empty() {
            out.push_str(&format!("event: {name}\n"));
        }
        out.push_str(&format!("data: {data}\n\n"));
    }
    out
}

/// An OpenAI Responses stream whose text item is at `output_index` `index`.
fn responses_stream(index: u64) -> String {
    let t = |k: &str| k.to_string();
    let events: Vec<(String, Value)> = vec![
        (
            t("response.created"),
            json!({"type": "response.created", "response": {"id": "resp_1", "model": "gpt-5.5", "created_at": 1, "service_tier": "default"}}),
        ),
        (
            t("response.output_item.added"),
            json!({"type": "response.output_item.added", "output_index": index, "item": {"type": "message"}}),
        ),
        (
            t("response.output_text.delta"),
            json!({"type": "response.output_text.delta", "output_index": index, "delta": "all good"}),
        ),
        (
            t("response.output_item.done"),
            json!({"type": "response.output_item.done", "output_index": index}),
        ),
        (
            t("response.completed"),
            json!({"type": "response.completed", "response": {"id": "resp_1", "model": "gpt-5.5", "status": "completed", "service_tier": "default",
                "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "all good", "annotations": []}]}],
                "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}}),
        ),
    ];
    let events: Vec<(&str, Value)> = events
        .iter()
        .map(|(n, v)| (n.as_str(), v.clone()))
        .collect();
    sse(&events)
}

/// An OpenAI Chat Completions stream whose choice is at `index`.
fn chat_stream(index: u64) -> String {
    let mut s = sse(&[
        (
            "",
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-5.5", "service_tier": "default",
            "choices": [{"index": index, "delta": {"role": "assistant", "content": "all good"}, "finish_reason": null}]}),
        ),
        (
            "",
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-5.5",
            "choices": [{"index": index, "delta": {}, "finish_reason": "stop"}]}),
        ),
        (
            "",
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-5.5", "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
        ),
    ]);
    s.push_str("data: [DONE]\n\n");
    s
}

/// An Anthropic Messages stream whose text block is at `index`.
fn messages_stream(index: u64) -> String {
    sse(&[
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
            "model": "claude-opus-4-8", "content": [], "stop_reason": null, "usage": {"input_tokens": 3, "output_tokens": 1, "service_tier": "standard"}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": "all good"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 2}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ])
}

async fn answer(req: hyper::Request<Incoming>) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let index = if String::from_utf8_lossy(&body).contains("#ok") {
        0
    } else {
        HUGE
    };
    let stream = match path.as_str() {
        "/v1/responses" => responses_stream(index),
        "/v1/chat/completions" => chat_stream(index),
        "/v1/messages" => messages_stream(index),
        _ => {
            let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"{}")));
            *r.status_mut() = http::StatusCode::NOT_FOUND;
            return Ok(r);
        }
    };
    Ok(hyper::Response::builder()
        .header("content-type", "text/event-stream")
        .body(Full::new(Bytes::from(stream)))
        .unwrap())
}

/// The fake provider: its base URL.
async fn provider() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(conn), hyper::service::service_fn(answer))
                    .await;
            });
        }
    });
    url
}

/// Usage rows of the stack's ledger, (outcome, status), once there are `n`.
async fn ledger(s: &Stack, n: usize) -> Vec<(String, i64)> {
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        s.dir.path().join("flex.db").display()
    ))
    .await
    .unwrap();
    let t0 = Instant::now();
    loop {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT outcome, status FROM usage_ledger ORDER BY received_at")
                .fetch_all(&pool)
                .await
                .unwrap();
        if rows.len() >= n || t0.elapsed() > Duration::from_secs(10) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Case {
    what: &'static str,
    path: &'static str,
    body: fn(&str, bool) -> Value,
}

const CASES: &[Case] = &[
    Case {
        what: "messages → openai (translated, Responses decoder)",
        path: "messages",
        body: |text, stream| json!({"model": "gpt-5.5", "max_tokens": 64, "messages": [{"role": "user", "content": text}], "start_within": "00h-00m-05s", "stream": stream}),
    },
    Case {
        what: "chat → openai (native, the Chat assembler in a race)",
        path: "chat/completions",
        body: |text, _| json!({"model": "gpt-5.5", "messages": [{"role": "user", "content": text}], "start_within": "00h-00m-05s", "stream": false}),
    },
    Case {
        what: "chat → anthropic (translated, Messages decoder)",
        path: "chat/completions",
        body: |text, stream| json!({"model": "claude-opus-4-8", "max_completion_tokens": 64, "messages": [{"role": "user", "content": text}], "start_within": "default", "stream": stream}),
    },
];

#[tokio::test]
async fn an_index_of_a_trillion_is_an_error_and_the_proxy_keeps_serving() {
    let url = provider().await;
    let s = stack_with(Options {
        sim: sim_config(),
        openai_url: Some(format!("{url}/v1")),
        ca: None,
        anthropic_url: Some(url.clone()),
    })
    .await;
    let mut answers = 0;
    for case in CASES {
        // The chat → openai case streams natively: its chunks pass through untouched, so only
        // the assembled answer reads their indexes.
        let modes: &[bool] = if case.path == "chat/completions" && case.what.contains("native") {
            &[false]
        } else {
            &[true, false]
        };
        for &stream in modes {
            let what = format!("{} stream={stream}", case.what);
            let r = post(
                &format!("{}/{}", s.base, case.path),
                Some(&s.api_key),
                &(case.body)("hello", stream),
            )
            .await;
            answers += 1;
            let text = r.text();
            assert!(
                text.contains(&format!("{HUGE}, past the limit of 1024 items")),
                "{what}: {text}"
            );
            assert!(!text.contains("all good"), "{what}: {text}");
            if stream {
                assert_eq!(r.status, 200, "{what}: {text}");
                let errors: Vec<Value> = r
                    .sse_data()
                    .iter()
                    .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                    .filter(|v| v.get("error").is_some())
                    .collect();
                assert_eq!(errors.len(), 1, "{what}: one error event: {text}");
                assert_eq!(errors[0]["error"]["code"], "upstream_incomplete", "{what}");
                assert!(!text.contains("[DONE]"), "{what}: {text}");
            } else {
                assert_eq!(r.status, 502, "{what}: {text}");
                assert_eq!(r.json()["error"]["code"], "upstream_incomplete", "{what}");
            }

            // The proxy goes on serving, the same pair included.
            let ok = post(
                &format!("{}/{}", s.base, case.path),
                Some(&s.api_key),
                &(case.body)("hello #ok", stream),
            )
            .await;
            answers += 1;
            assert_eq!(ok.status, 200, "{what}: {}", ok.text());
            assert!(ok.text().contains("all good"), "{what}: {}", ok.text());
        }
    }
    let rows = ledger(&s, answers).await;
    assert_eq!(rows.len(), answers, "{rows:?}");
    let incomplete: Vec<_> = rows.iter().filter(|(o, _)| o == "incomplete").collect();
    assert_eq!(
        incomplete.len(),
        answers / 2,
        "every refused answer: {rows:?}"
    );
    assert!(
        incomplete.iter().all(|(_, st)| *st == 200 || *st == 502),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .filter(|(o, _)| o != "incomplete")
            .all(|(o, st)| o == "ok" && *st == 200),
        "{rows:?}"
    );
}
