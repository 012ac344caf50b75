#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Cross-format translation end to end over loopback: caller format × provider, stream and not,
//! against the simulator. The official SDKs check the same matrix in `translation_sdk.rs`.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn chat_caller_reaches_claude_and_back() {
    let s = stack().await;
    let body = json!({"model": "claude-opus-4-8", "max_completion_tokens": 64, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "start_within": "default"});
    let r = post(
        &format!("{}/chat/completions", s.base),
        Some(&s.api_key),
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("Simulated"),
        "{v}"
    );
    // Seed 003: a standard_only request comes back reported as "standard".
    assert_eq!(v["service_tier"], "standard");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let mut body = body;
    body["stream"] = json!(true);
    let r = post(
        &format!("{}/chat/completions", s.base),
        Some(&s.api_key),
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let tiers: Vec<Value> = r
        .sse_data()
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .map(|c| c["service_tier"].clone())
        .collect();
    assert!(
        !tiers.is_empty() && tiers.iter().all(|t| t == "standard"),
        "{tiers:?}"
    );
}

#[tokio::test]
async fn claude_needs_a_token_cap_in_every_format() {
    let s = stack().await;
    let body = json!({"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "hi"}], "start_within": "default"});
    let r = post(
        &format!("{}/chat/completions", s.base),
        Some(&s.api_key),
        &body,
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (400, Some("missing_max_tokens"))
    );
    assert_eq!(r.json()["error"]["param"], "max_completion_tokens");
}

#[tokio::test]
async fn messages_caller_reaches_openai_with_flex_and_streams() {
    let s = stack().await;
    let body = json!({"model": "gpt-5.5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], "start_within": "00h-00m-10s"});
    let r = post(&format!("{}/messages", s.base), Some(&s.api_key), &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["usage"]["service_tier"], "flex");
    assert!(v["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Simulated"));

    let mut body = body;
    body["stream"] = json!(true);
    let r = post(&format!("{}/messages", s.base), Some(&s.api_key), &body).await;
    assert_eq!(r.status, 200);
    let names: Vec<String> = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("event: ").map(str::to_string))
        .collect();
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert!(names.iter().any(|n| n == "content_block_delta"));
}

#[tokio::test]
async fn responses_caller_streams_a_claude_tool_call() {
    let s = stack().await;
    let body = json!({"model": "claude-opus-4-8", "max_output_tokens": 200, "stream": true, "start_within": "default",
        "input": "weather? #sim tool=get_weather",
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}]});
    let r = post(&format!("{}/responses", s.base), Some(&s.api_key), &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events: Vec<Value> = r
        .sse_data()
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let done = events
        .iter()
        .find(|e| e["type"] == "response.function_call_arguments.done")
        .expect("tool call arguments");
    let args: Value = serde_json::from_str(done["arguments"].as_str().unwrap()).unwrap();
    assert!(args.is_object());
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.completed");
    assert_eq!(last["response"]["output"][0]["type"], "function_call");
    assert_eq!(events[0]["response"]["service_tier"], "standard");
    assert_eq!(last["response"]["service_tier"], "standard");
}

#[tokio::test]
async fn gemini_races_flex_too() {
    let s = stack().await;
    let url = format!("{}/chat/completions", s.base);
    let body = |content: &str, sw: &str| json!({"model": "gemini-3.5-flash", "messages": [{"role": "user", "content": content}], "start_within": sw});
    let r = post(&url, Some(&s.api_key), &body("hi", "00h-00m-10s")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        (r.json()["service_tier"].as_str(), r.header("x-flex-reason")),
        (Some("flex"), "flex_started")
    );

    let t0 = std::time::Instant::now();
    let r = post(
        &url,
        Some(&s.api_key),
        &body("hi #sim flex_delay_ms=60000", "00h-00m-05s"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        (r.json()["service_tier"].as_str(), r.header("x-flex-reason")),
        (Some("default"), "flex_timeout")
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_millis(5300),
        "{:?}",
        t0.elapsed()
    );

    let r = post(
        &url,
        Some(&s.api_key),
        &body(
            "hi #sim flex_status=429 flex_fail_times=2 sim_id=g1",
            "00h-00m-10s",
        ),
    )
    .await;
    assert_eq!(
        r.json()["service_tier"],
        "flex",
        "a capacity error is retried on Gemini too"
    );
}
