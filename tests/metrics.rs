#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Known traffic through `flex up --demo`, then a scrape of `--metrics-listen`: the exposition
//! parses with the official Python OpenMetrics parser (`prometheus_client`), and each counter has
//! exactly the expected value; the public port has no `/metrics`.

#[path = "common/infra.rs"]
mod infra;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use infra::{flex_admin_in, free_port, request, FlexUp};
use serde_json::{json, Value};

/// Parses an OpenMetrics exposition with `prometheus_client`'s strict parser: every sample as
/// `name{sorted labels} -> value`.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `bash .ci/run` (it creates .venv with prometheus_client)",
        python.display()
    );
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples.get(key).unwrap_or_else(|| {
        panic!(
            "no sample {key}; have:\n{}",
            samples.keys().cloned().collect::<Vec<_>>().join("\n")
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_traffic_gives_exact_counters() {
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let up = FlexUp::start(&["--demo", "--metrics-listen", &metrics_addr], |_| {});
    let demo_path = up
        .wait_for_file_async("demo.json", Duration::from_secs(60))
        .await;
    let demo: Value = serde_json::from_slice(&std::fs::read(demo_path).unwrap()).unwrap();
    assert_eq!(
        demo["metrics_url"],
        format!("http://{metrics_addr}/metrics")
    );
    let base = demo["base_url"].as_str().unwrap().to_string();
    let key = demo["api_key"].as_str().unwrap().to_string();
    let post = |path: &str, body: Value, key: Option<&str>| {
        let url = format!("{base}/{path}");
        let key = key.map(str::to_string);
        async move {
            request(http::Method::POST, &url, key.as_deref(), Some(body))
                .await
                .unwrap()
        }
    };
    let chat = |text: &str, sw: &str| json!({"model": "gpt-5.5", "messages": [{"role": "user", "content": text}], "start_within": sw});
    // 1. standard, no race; 2. flex starts in time; 3. flex too slow: standard takes over;
    // 4. one flex capacity error, then flex; 5. a provider error; 6. an unknown key.
    assert_eq!(
        post("chat/completions", chat("hi", "default"), Some(&key))
            .await
            .0,
        200
    );
    assert_eq!(
        post("chat/completions", chat("hi", "00h-00m-05s"), Some(&key))
            .await
            .0,
        200
    );
    assert_eq!(
        post(
            "chat/completions",
            chat("hi #sim flex_delay_ms=20000", "00h-00m-05s"),
            Some(&key)
        )
        .await
        .0,
        200
    );
    assert_eq!(
        post(
            "chat/completions",
            chat(
                "hi #sim flex_delay_ms=100 flex_status=429 flex_fail_times=1 sim_id=m1",
                "00h-00m-05s"
            ),
            Some(&key)
        )
        .await
        .0,
        200
    );
    assert_eq!(
        post(
            "chat/completions",
            chat("hi #sim status=400", "default"),
            Some(&key)
        )
        .await
        .0,
        400
    );
    assert_eq!(
        post(
            "chat/completions",
            chat("hi", "default"),
            Some("flex_live_unknown")
        )
        .await
        .0,
        401
    );

    // The public port has no metrics.
    let public = format!("http://127.0.0.1:{}/metrics", up.api);
    assert_eq!(
        request(http::Method::GET, &public, None, None)
            .await
            .unwrap()
            .0,
        404
    );

    // One admin call, for the control plane's series.
    let out = flex_admin_in(up.dir.path(), &["org", "list"], &[], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let url = demo["metrics_url"].as_str().unwrap();
    // The ledger is fed in the background: wait for the five usage events.
    let t0 = std::time::Instant::now();
    let (text, s) = loop {
        let (status, text) = request(http::Method::GET, url, None, None).await.unwrap();
        assert_eq!(status, 200);
        let s = parse(&text);
        if s.get("flex_ledger_inserts_total{}").copied().unwrap_or(0.0) >= 5.0
            || t0.elapsed() > Duration::from_secs(10)
        {
            break (text, s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let req = |tier: &str, status: u16| {
        format!(
            r#"flex_requests_total{{format="chat_completions",model="gpt-5.5",provider="openai",status="{status}",tier="{tier}"}}"#
        )
    };
    assert_eq!(
        value(&s, &req("standard", 200)),
        2.0,
        "the default request and the fallback"
    );
    assert_eq!(
        value(&s, &req("flex", 200)),
        2.0,
        "flex in time, and flex after a capacity retry"
    );
    assert_eq!(value(&s, &req("", 400)), 1.0);
    assert_eq!(
        value(
            &s,
            r#"flex_requests_total{format="chat_completions",model="",provider="",status="401",tier=""}"#
        ),
        1.0
    );
    assert_eq!(
        value(&s, r#"flex_race_outcomes_total{reason="flex_started"}"#),
        2.0
    );
    assert_eq!(
        value(&s, r#"flex_race_outcomes_total{reason="flex_timeout"}"#),
        1.0
    );
    let attempts = |tier: &str, class: &str| {
        value(
            &s,
            &format!(
                r#"flex_upstream_attempts_total{{class="{class}",provider="openai",tier="{tier}"}}"#
            ),
        )
    };
    assert_eq!(attempts("flex", "started"), 2.0);
    assert_eq!(attempts("flex", "capacity"), 1.0);
    assert_eq!(attempts("standard", "started"), 2.0);
    assert_eq!(attempts("standard", "caller"), 1.0);
    assert_eq!(value(&s, "flex_flex_wait_seconds_count{}"), 3.0);
    assert_eq!(
        value(&s, "flex_overhead_seconds_count{}"),
        5.0,
        "every request that reached a provider"
    );
    assert_eq!(
        value(
            &s,
            r#"flex_request_duration_seconds_count{provider="openai"}"#
        ),
        5.0
    );
    // Tokens and money, by served tier: the simulator answers 12 output tokens.
    assert_eq!(
        value(
            &s,
            r#"flex_tokens_total{kind="output",model="gpt-5.5",provider="openai",tier="flex"}"#
        ),
        24.0
    );
    let cost = value(
        &s,
        r#"flex_cost_micros_total{model="gpt-5.5",provider="openai",tier="flex"}"#,
    );
    let standard = value(
        &s,
        r#"flex_standard_cost_micros_total{model="gpt-5.5",provider="openai",tier="flex"}"#,
    );
    assert!(
        cost > 0.0 && standard > cost,
        "flex costs less: {cost} vs {standard}"
    );
    assert!(value(&s, "flex_snapshot_version{}") > 0.0);
    assert_eq!(value(&s, "flex_draining{}"), 0.0);
    // The in-process control plane's series, in the same exposition.
    assert_eq!(value(&s, "flex_ledger_inserts_total{}"), 5.0);
    assert_eq!(
        value(
            &s,
            r#"flex_admin_requests_total{code="OK",method="ListOrgs"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            r#"flex_admin_request_duration_seconds_count{method="ListOrgs"}"#
        ),
        1.0
    );
    assert_eq!(
        value(&s, "flex_usage_consumer_lag{}"),
        0.0,
        "no NATS, no consumer"
    );
    assert!(
        value(&s, "flex_event_log_appends_total{}") >= 5.0,
        "the demo's org, key and provider keys"
    );
    let connected: f64 = s
        .iter()
        .filter(|(k, _)| k.starts_with(r#"flex_connected_proxies{transport="in-process""#))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(connected, 1.0);
    // No org or key label anywhere.
    assert!(!text.contains("org_"), "{text}");
    assert!(!text.contains("key_"), "{text}");
    dashboard_series_are_exposed(&s);
}

/// Every series the Grafana dashboard reads (`deploy/grafana/metrics.txt`: `NAME TYPE
/// [LABELS]`) is in the exposition, with the labels the dashboard uses (a histogram through its
/// `_bucket` samples).
fn dashboard_series_are_exposed(s: &BTreeMap<String, f64>) {
    let listed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/metrics.txt"),
    )
    .unwrap();
    let mut checked = 0;
    for line in listed
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let mut parts = line.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        let labels: Vec<&str> = parts
            .next()
            .map(|l| l.split(',').collect())
            .unwrap_or_default();
        let sample = if kind == "histogram" {
            format!("{name}_bucket")
        } else {
            name.to_string()
        };
        let found = s.keys().find(|k| {
            k.split_once('{').is_some_and(|(n, rest)| {
                n == sample && labels.iter().all(|l| rest.contains(&format!("{l}=\"")))
            })
        });
        assert!(
            found.is_some(),
            "deploy/grafana/metrics.txt lists {name} ({kind}, labels {labels:?}), which the exposition lacks"
        );
        checked += 1;
    }
    assert!(checked >= 15, "metrics.txt lists {checked} series");
}
