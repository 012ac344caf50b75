#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The failure policy end to end: the proxy against the simulator provoked by `#sim` directives,
//! for each provider and for native and translated pairs (docs/failure-policy.md).
//!
//! Gemini has no native pair (no caller format is generateContent), and Anthropic has no flex
//! tier, so its rows are the ones without a race (errors pass through, a cut-off answer is an
//! error).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A racing pair: the endpoint, a body builder for its format, and the model.
struct Pair {
    name: &'static str,
    path: &'static str,
    model: &'static str,
}

const RACING: &[Pair] = &[
    Pair {
        name: "chat → openai (native)",
        path: "chat/completions",
        model: "gpt-5.5",
    },
    Pair {
        name: "messages → openai (translated)",
        path: "messages",
        model: "gpt-5.5",
    },
    Pair {
        name: "chat → gemini (translated)",
        path: "chat/completions",
        model: "gemini-3.5-flash",
    },
    Pair {
        name: "responses → gemini (translated)",
        path: "responses",
        model: "gemini-3.5-flash",
    },
];

fn body(path: &str, model: &str, text: &str, sw: &str, stream: bool) -> Value {
    match path {
        "responses" => {
            json!({"model": model, "input": text, "start_within": sw, "stream": stream, "max_output_tokens": 64})
        }
        "messages" => {
            json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}], "start_within": sw, "stream": stream})
        }
        "interactions" => {
            json!({"model": model, "input": text, "start_within": sw, "stream": stream})
        }
        _ => {
            json!({"model": model, "max_completion_tokens": 64, "messages": [{"role": "user", "content": text}], "start_within": sw, "stream": stream})
        }
    }
}

const D: Duration = Duration::from_secs(5);
const FIVE_SECONDS: &str = "00h-00m-05s";

/// Usage rows of the stack's ledger: (outcome, status, served_tier).
async fn ledger(s: &Stack, at_least: usize) -> Vec<(String, i64, String)> {
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        s.dir.path().join("flex.db").display()
    ))
    .await
    .unwrap();
    let t0 = Instant::now();
    loop {
        let rows: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT outcome, status, served_tier FROM usage_ledger ORDER BY received_at",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        if rows.len() >= at_least || t0.elapsed() > Duration::from_secs(10) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Flex 500, 502, 504, a stream broken before it starts, a connection reset before the head, and
/// a provider that sends no head: standard answers, by the deadline; for the failures (not the
/// stall) at once.
#[tokio::test]
async fn flex_server_faults_fall_back_to_standard_by_the_deadline() {
    let s = stack().await;
    let faults = [
        ("flex_status=500", "flex_error", true),
        ("flex_status=502", "flex_error", true),
        ("flex_status=504", "flex_error", true),
        ("flex_cut_after=0", "flex_error", true),
        ("flex_reset=1", "flex_error", true),
        ("flex_header_delay_ms=60000", "flex_timeout", false),
    ];
    for pair in RACING {
        for (fault, reason, at_once) in faults {
            for stream in [false, true] {
                let text = format!("hi #sim {fault}");
                let t0 = Instant::now();
                let r = post(
                    &format!("{}/{}", s.base, pair.path),
                    Some(&s.api_key),
                    &body(pair.path, pair.model, &text, FIVE_SECONDS, stream),
                )
                .await;
                let took = t0.elapsed();
                let what = format!("{} {fault} stream={stream}", pair.name);
                assert_eq!(r.status, 200, "{what}: {}", r.text());
                assert_eq!(r.header("x-flex-served-tier"), "standard", "{what}");
                assert_eq!(r.header("x-flex-reason"), reason, "{what}");
                assert!(took < D, "{what}: answered after {took:?}");
                if at_once {
                    assert!(
                        took < Duration::from_secs(2),
                        "{what}: standard waited for the hedge ({took:?})"
                    );
                }
                if stream {
                    assert!(
                        !r.text().contains("upstream_incomplete"),
                        "{what}: {}",
                        r.text()
                    );
                }
            }
        }
    }
}

/// A caller's error (no credit) passes through at once, with the provider's status and body,
/// even with ten minutes of budget.
#[tokio::test]
async fn insufficient_quota_passes_through_in_under_a_second() {
    let s = stack().await;
    for pair in RACING.iter().filter(|p| p.model.starts_with("gpt")) {
        let t0 = Instant::now();
        let r = post(
            &format!("{}/{}", s.base, pair.path),
            Some(&s.api_key),
            &body(
                pair.path,
                pair.model,
                "hi #sim flex_status=429 error_code=insufficient_quota",
                "00h-10m-00s",
                false,
            ),
        )
        .await;
        let took = t0.elapsed();
        assert_eq!(r.status, 429, "{}: {}", pair.name, r.text());
        assert_eq!(
            r.json()["error"]["code"],
            "insufficient_quota",
            "{}",
            pair.name
        );
        assert!(took < Duration::from_secs(1), "{}: {took:?}", pair.name);
    }
    // Gemini's quota (a QuotaFailure per day) is the same row of its table (policy tests); a
    // Gemini 400 passes through the same way.
    let t0 = Instant::now();
    let r = post(
        &format!("{}/chat/completions", s.base),
        Some(&s.api_key),
        &body(
            "chat/completions",
            "gemini-3.5-flash",
            "hi #sim flex_status=403",
            "00h-10m-00s",
            false,
        ),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(t0.elapsed() < Duration::from_secs(1));
}

/// `Retry-After: 3` on a flex capacity error: the next flex attempt is not sent before 3 s.
#[tokio::test]
async fn retry_after_holds_the_next_flex_attempt() {
    let s = stack().await;
    for (i, pair) in RACING.iter().enumerate() {
        let text = format!("hi #sim flex_status=429 retry_after=3 flex_fail_times=1 sim_id=ra{i}");
        let t0 = Instant::now();
        let r = post(
            &format!("{}/{}", s.base, pair.path),
            Some(&s.api_key),
            &body(pair.path, pair.model, &text, "00h-00m-30s", false),
        )
        .await;
        let took = t0.elapsed();
        assert_eq!(r.status, 200, "{}: {}", pair.name, r.text());
        assert_eq!(r.header("x-flex-served-tier"), "flex", "{}", pair.name);
        assert!(
            took >= Duration::from_secs(3),
            "{}: second flex attempt before 3 s ({took:?})",
            pair.name
        );
        assert!(took < Duration::from_secs(5), "{}: {took:?}", pair.name);
    }
}

/// A standard 503 while flex is pending: flex can still win (standard fails, and is not
/// retried since a retry could not start in time; flex starts before the deadline).
#[tokio::test]
async fn a_standard_503_while_flex_is_pending_lets_flex_win() {
    let s = stack().await;
    for pair in RACING {
        let text = "hi #sim flex_delay_ms=4700 standard_status=503";
        let r = post(
            &format!("{}/{}", s.base, pair.path),
            Some(&s.api_key),
            &body(pair.path, pair.model, text, FIVE_SECONDS, false),
        )
        .await;
        assert_eq!(r.status, 200, "{}: {}", pair.name, r.text());
        assert_eq!(r.header("x-flex-served-tier"), "flex", "{}", pair.name);
        assert_eq!(r.header("x-flex-reason"), "flex_started", "{}", pair.name);
    }
    // A standard that fails once is tried again while it can still start in time.
    let r = post(
        &format!("{}/chat/completions", s.base),
        Some(&s.api_key),
        &body(
            "chat/completions",
            "gpt-5.5",
            "hi #sim flex_delay_ms=60000 standard_status=503 standard_fail_times=1 sim_id=std1",
            "00h-00m-10s",
            false,
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-flex-served-tier"), "standard");
}

/// The format's terminal event, which a cut-off stream must never show.
fn terminal(path: &str) -> &'static str {
    match path {
        "responses" => "response.completed",
        "messages" => "message_stop",
        "interactions" => "interaction.completed",
        _ => "[DONE]",
    }
}

/// An answer the provider cuts off (the connection breaks, or the stream ends early) is an
/// error to the caller, never a clean end, and an `incomplete` usage row.
#[tokio::test]
async fn a_cut_off_answer_is_an_error_and_an_incomplete_row() {
    let s = stack().await;
    let pairs: &[(&str, &str)] = &[
        ("chat/completions", "gpt-5.5"),
        ("responses", "gpt-5.5"),
        ("messages", "claude-opus-4-8"),
        ("chat/completions", "claude-opus-4-8"),
        ("messages", "gpt-5.5"),
        ("chat/completions", "gemini-3.5-flash"),
        ("interactions", "gemini-3.5-flash"),
    ];
    let mut n = 0;
    for (path, model) in pairs {
        for cut in ["cut_after=4", "end_after=4"] {
            for stream in [true, false] {
                // A native non-streaming answer without a race is the provider's JSON body (its
                // read errors are covered in data-plane's `answer` tests); a race streams it.
                let native = matches!(
                    (*path, *model),
                    ("chat/completions" | "responses", "gpt-5.5") | ("messages", "claude-opus-4-8")
                );
                let sw = match (native, stream, *model) {
                    (true, false, "gpt-5.5") => "00h-00m-30s",
                    (true, false, _) => continue,
                    _ => "default",
                };
                let text = format!("hi #sim {cut} output_tokens=40");
                let r = post(
                    &format!("{}/{path}", s.base),
                    Some(&s.api_key),
                    &body(path, model, &text, sw, stream),
                )
                .await;
                n += 1;
                let what = format!("{path} → {model} {cut} stream={stream}");
                if stream {
                    assert_eq!(r.status, 200, "{what}");
                    let t = r.text();
                    assert!(
                        t.contains("upstream_incomplete") || t.contains("cut off"),
                        "{what}: no error event: {t}"
                    );
                    assert!(!t.contains(terminal(path)), "{what}: a clean end: {t}");
                } else {
                    assert_eq!(r.status, 502, "{what}: {}", r.text());
                    let v = r.json();
                    let code = v["error"]["code"].as_str().unwrap_or_default();
                    assert_eq!(code, "upstream_incomplete", "{what}: {v}");
                }
            }
        }
    }
    let rows = ledger(&s, n).await;
    assert_eq!(rows.len(), n, "{rows:?}");
    for (outcome, _, tier) in &rows {
        assert_eq!(outcome, "incomplete", "{rows:?}");
        assert!(!tier.is_empty(), "{rows:?}");
    }
}

/// The provider's rate-limit and request-id headers reach the caller, on answers and errors.
#[tokio::test]
async fn provider_headers_pass_through() {
    let s = stack().await;
    let r = post(
        &format!("{}/chat/completions", s.base),
        Some(&s.api_key),
        &body(
            "chat/completions",
            "gpt-5.5",
            "hi #sim status=429 retry_after=7",
            "default",
            false,
        ),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), "7");
    assert!(
        r.header("x-flex-provider-request-id").starts_with("req_"),
        "{:?}",
        r.headers
    );
    assert!(r.header("x-request-id").starts_with("req_"));
    assert_ne!(
        r.header("x-request-id"),
        r.header("x-flex-provider-request-id")
    );
    let r = post(
        &format!("{}/messages", s.base),
        Some(&s.api_key),
        &body("messages", "claude-opus-4-8", "hi", "default", true),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("request-id").starts_with("req_"),
        "{:?}",
        r.headers
    );
}
