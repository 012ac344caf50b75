#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A planned stop drains: SIGTERM to `flex up --demo` during a 5 s race and a stream; `/readyz`
//! answers 503 at once, both answers complete, and the process exits after them.

#[path = "common/infra.rs"]
mod infra;

use std::time::{Duration, Instant};

use infra::{request, FlexUp};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_race_and_a_stream_then_exits() {
    let mut up = FlexUp::start(&["--demo", "--drain-delay-secs", "1"], |_| {});
    let demo_path = up
        .wait_for_file_async("demo.json", Duration::from_secs(60))
        .await;
    let demo: Value = serde_json::from_slice(&std::fs::read(demo_path).unwrap()).unwrap();
    let base = demo["base_url"].as_str().unwrap().to_string();
    let key = demo["api_key"].as_str().unwrap().to_string();
    let ready = format!("http://127.0.0.1:{}/readyz", up.api);
    assert_eq!(
        request(http::Method::GET, &ready, None, None)
            .await
            .unwrap()
            .0,
        200
    );

    // A race whose flex starts after 4.5 s of a 5 s budget, and a stream of 3 s.
    let race = tokio::spawn({
        let (base, key) = (base.clone(), key.clone());
        async move {
            let body = json!({"model": "gpt-5.5", "input": "hi #sim flex_delay_ms=4500 standard_delay_ms=100",
                               "start_within": "00h-00m-05s"});
            request(
                http::Method::POST,
                &format!("{base}/responses"),
                Some(&key),
                Some(body),
            )
            .await
        }
    });
    let stream = tokio::spawn({
        let (base, key) = (base.clone(), key.clone());
        async move {
            let body = json!({"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi #sim output_tokens=15 tokens_per_sec=5"}],
                               "start_within": "default", "stream": true});
            request(
                http::Method::POST,
                &format!("{base}/chat/completions"),
                Some(&key),
                Some(body),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    let pid = up.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Not ready at once (well within the drain delay).
    let mut not_ready_after = None;
    while sent.elapsed() < Duration::from_millis(900) {
        if let Ok((503, text)) = request(http::Method::GET, &ready, None, None).await {
            assert!(text.contains("draining"), "{text}");
            not_ready_after = Some(sent.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let not_ready_after = not_ready_after.expect("/readyz did not turn 503 during the drain delay");
    assert!(
        not_ready_after < Duration::from_millis(500),
        "{not_ready_after:?}"
    );

    let (status, body) = race.await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "completed", "{v}");
    let (status, body) = stream.await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("[DONE]"), "the stream was cut: {body}");
    assert!(body.contains("word13"), "{body}");

    // The process exits once the answers are done, cleanly.
    let t0 = Instant::now();
    let exit = loop {
        if let Some(status) = up.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "flex up did not exit after the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert!(
        sent.elapsed() >= Duration::from_secs(3),
        "exited before the stream ended"
    );
}
