#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End-to-end: a real proxy, control plane and simulator over loopback HTTP; one request per tier,
//! auth, revocation, the seeds' errors, HTTPS upstream with a private CA, snapshot over gRPC.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flex_control_plane::Metadata;
use serde_json::json;

fn responses(model: &str, input: &str, sw: &str) -> serde_json::Value {
    json!({"model": model, "input": input, "start_within": sw})
}

#[tokio::test]
async fn flex_serves_when_it_starts_in_time() {
    let s = stack().await;
    let r = post(
        &format!("{}/responses", s.base),
        Some(&s.api_key),
        &responses("gpt-5.5", "hi", "00h-00m-10s"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["service_tier"], "flex");
    assert_eq!(r.json()["object"], "response");
    assert_eq!(r.header("x-flex-served-tier"), "flex");
    assert_eq!(r.header("x-flex-reason"), "flex_started");
    assert!(r.header("x-request-id").starts_with("req_"));
}

#[tokio::test]
async fn standard_takes_over_by_the_deadline_when_flex_is_slow() {
    let s = stack().await;
    let t0 = Instant::now();
    let body = json!({"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi #sim flex_delay_ms=60000"}], "start_within": "00h-00m-05s"});
    let r = post(
        &format!("{}/chat/completions", s.base),
        Some(&s.api_key),
        &body,
    )
    .await;
    let elapsed = t0.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["service_tier"], "default");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("Simulated"));
    assert_eq!(r.header("x-flex-reason"), "flex_timeout");
    // The answer started by the deadline (5 s), not 5 s + the standard start latency.
    assert!(elapsed < Duration::from_millis(5300), "took {elapsed:?}");
    assert!(
        elapsed > Duration::from_millis(4000),
        "standard was not hedged that early: {elapsed:?}"
    );
}

#[tokio::test]
async fn flex_capacity_errors_are_retried_then_flex_serves() {
    let s = stack().await;
    let r = post(
        &format!("{}/responses", s.base),
        Some(&s.api_key),
        &responses(
            "gpt-5.5",
            "hi #sim flex_status=429 flex_fail_times=2 sim_id=retry1",
            "00h-00m-10s",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["service_tier"], "flex");
}

#[tokio::test]
async fn a_non_capacity_provider_error_passes_through_untouched() {
    let s = stack().await;
    let r = post(
        &format!("{}/responses", s.base),
        Some(&s.api_key),
        &responses("gpt-5.5", "hi #sim status=400", "00h-00m-10s"),
    )
    .await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert!(v["error"]["message"].is_string());
    assert_ne!(
        v["error"]["code"], "upstream_error",
        "the provider's own body: {v}"
    );
}

#[tokio::test]
async fn direct_tiers_map_to_openai_service_tiers() {
    let s = stack().await;
    for (sw, served) in [
        ("default", "default"),
        ("priority", "priority"),
        ("auto", "default"),
    ] {
        let r = post(
            &format!("{}/responses", s.base),
            Some(&s.api_key),
            &responses("gpt-4o", "hi", sw),
        )
        .await;
        assert_eq!(r.status, 200, "{sw}: {}", r.text());
        assert_eq!(r.json()["service_tier"], served, "{sw}");
        assert_eq!(r.header("x-flex-reason"), "direct");
    }
}

#[tokio::test]
async fn streaming_responses_and_chat_forward_events_after_the_winner_starts() {
    let s = stack().await;
    let mut body = responses("gpt-5-nano", "Count to ten.", "00h-00m-20s");
    body["stream"] = json!(true);
    let r = post(&format!("{}/responses", s.base), Some(&s.api_key), &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/event-stream");
    let events: Vec<serde_json::Value> = r
        .sse_data()
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "response.created");
    assert!(events
        .iter()
        .any(|e| e["type"] == "response.output_text.delta"));
    let done = events.last().unwrap();
    assert_eq!(done["type"], "response.completed");
    assert_eq!(done["response"]["service_tier"], "flex");

    let body = json!({"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}], "stream": true, "start_within": "00h-00m-20s"});
    let r = post(
        &format!("{}/chat/completions", s.base),
        Some(&s.api_key),
        &body,
    )
    .await;
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(
        chunks
            .iter()
            .all(|c| !c["choices"].as_array().unwrap().is_empty()),
        "no usage chunk the caller did not ask for"
    );
}

#[tokio::test]
async fn auth_refuses_missing_malformed_unknown_and_revoked_keys() {
    let s = stack().await;
    let url = format!("{}/responses", s.base);
    let body = responses("gpt-5.5", "hi", "default");
    let r = post(&url, None, &body).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (401, Some("missing_api_key"))
    );
    let r = post(&url, Some("sk-not-ours"), &body).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let r = post(&url, Some(&flex_shared::keys::generate()), &body).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    assert_eq!(post(&url, Some(&s.api_key), &body).await.status, 200);

    s.cp.revoke_api_key(&Metadata::new("test"), &s.key_id, "leaked")
        .await
        .unwrap();
    let t0 = Instant::now();
    loop {
        let r = post(&url, Some(&s.api_key), &body).await;
        if r.status == 401 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "revoked key still accepted after {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_seeds_errors_say_what_why_fix_and_example() {
    let s = stack().await;
    s.cp.remove_provider_key(&Metadata::new("test"), &s.org_id, "gemini")
        .await
        .unwrap();
    for _ in 0..100 {
        if s.store.version() >= s.cp.snapshot().version {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let url = format!("{}/responses", s.base);
    let chat = format!("{}/chat/completions", s.base);
    let cases = vec![
        (
            &url,
            json!({"model": "gpt-5.5", "input": "hi"}),
            400,
            "missing_start_within",
        ),
        (
            &url,
            responses("gpt-5.5", "hi", "00h-00m-04s"),
            400,
            "invalid_start_within",
        ),
        (
            &url,
            responses("gpt-5.5", "hi", "00h-10m-01s"),
            400,
            "invalid_start_within",
        ),
        (
            &url,
            responses("gpt-4o", "hi", "00h-00m-30s"),
            400,
            "model_not_flex_capable",
        ),
        (
            &url,
            responses("gemini-3.5-flash", "hi", "auto"),
            400,
            "auto_unsupported_for_gemini",
        ),
        (
            &url,
            responses("claude-opus-4-8", "hi", "00h-00m-30s"),
            400,
            "flex_unsupported_for_anthropic",
        ),
        (
            &url,
            responses("llama-3", "hi", "default"),
            404,
            "model_not_found",
        ),
        (
            &url,
            json!({"model": "gpt-5.5", "input": "hi", "start_within": "default", "service_tier": "flex"}),
            400,
            "service_tier_not_allowed",
        ),
        (
            &chat,
            json!({"model": "gpt-5.5", "messages": [], "start_within": "default", "seed": 7}),
            400,
            "unsupported_parameter",
        ),
        (
            &url,
            responses("gemini-3.5-flash", "hi", "default"),
            400,
            "no_byok_key",
        ),
    ];
    for (u, body, status, code) in cases {
        let r = post(u, Some(&s.api_key), &body).await;
        assert_eq!(r.status, status, "{code}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["code"], code);
        assert!(e.get("param").is_some() && e.get("type").is_some());
        let m = e["message"].as_str().unwrap();
        assert!(m.contains("Fix:"), "{code}: {m}");
        if code != "model_not_found" {
            assert!(m.contains("Example:"), "{code}: {m}");
        }
    }
}

#[tokio::test]
async fn a_wrong_method_gets_our_error_and_the_allow_header() {
    let s = stack().await;
    // The OpenAI envelope on the OpenAI-shaped endpoints.
    for path in ["responses", "chat/completions", "interactions"] {
        let r = get(&format!("{}/{path}", s.base), Some(&s.api_key)).await;
        assert_eq!(r.status, 405, "{path}: {}", r.text());
        assert_eq!(r.header("allow"), "POST", "{path}");
        let e = &r.json()["error"];
        assert_eq!(e["code"], "method_not_allowed", "{path}");
        assert_eq!(e["type"], "invalid_request_error", "{path}");
        let m = e["message"].as_str().unwrap();
        assert!(
            m.starts_with(&format!("GET /v1/{path} is not supported")),
            "{m}"
        );
        assert!(m.contains("Fix:") && m.contains("Example:"), "{m}");
        assert!(
            m.contains(&format!("curl -X POST http://127.0.0.1:8080/v1/{path}")),
            "{m}"
        );
    }
    // Anthropic's on /v1/messages.
    let r = get(&format!("{}/messages", s.base), Some(&s.api_key)).await;
    assert_eq!((r.status, r.header("allow")), (405, "POST"), "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["code"], "method_not_allowed");
    assert!(v["error"]["message"].as_str().unwrap().contains("Example:"));
    // A GET endpoint asked with POST.
    let r = post(&format!("{}/models", s.base), Some(&s.api_key), &json!({})).await;
    assert_eq!(r.status, 405, "{}", r.text());
    assert!(r.header("allow").contains("GET"), "{:?}", r.headers);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn past_due_orgs_get_402_on_flex_only() {
    let s = stack().await;
    s.cp.set_billing_status(&Metadata::new("test"), &s.org_id, "past_due")
        .await
        .unwrap();
    let url = format!("{}/responses", s.base);
    let mut status = 0;
    for _ in 0..100 {
        status = post(
            &url,
            Some(&s.api_key),
            &responses("gpt-5.5", "hi", "00h-00m-30s"),
        )
        .await
        .status;
        if status == 402 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, 402);
    assert_eq!(
        post(
            &url,
            Some(&s.api_key),
            &responses("gpt-5.5", "hi", "default")
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn models_lists_the_catalog_with_flex_capability() {
    let s = stack().await;
    let r = get(&format!("{}/models", s.base), Some(&s.api_key)).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let m = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "gpt-5.5")
        .unwrap()
        .clone();
    assert_eq!(
        (m["provider"].as_str(), m["flex_capable"].as_bool()),
        (Some("openai"), Some(true))
    );
    assert_eq!(get(&format!("{}/models", s.base), None).await.status, 401);
}

#[tokio::test]
async fn usage_reaches_the_ledger_with_the_served_tier_and_costs() {
    let s = stack().await;
    for sw in ["00h-00m-10s", "default"] {
        assert_eq!(
            post(
                &format!("{}/responses", s.base),
                Some(&s.api_key),
                &responses("gpt-5.5", "hi", sw)
            )
            .await
            .status,
            200
        );
    }
    // A request the provider refuses is counted too (with no tokens and no cost).
    let r = post(
        &format!("{}/responses", s.base),
        Some(&s.api_key),
        &responses("gpt-5.5", "hi #sim status=400", "default"),
    )
    .await;
    assert_eq!(r.status, 400);
    let mut u = Default::default();
    for _ in 0..100 {
        u = s.cp.get_usage(&s.org_id, "", "").await.unwrap();
        if u.requests == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(u.requests, 3);
    assert_eq!(u.flex_requests, 1);
    assert!(u.output_tokens > 0);
    assert!(
        u.cost_micros > 0 && u.standard_cost_micros > u.cost_micros,
        "{u:?}"
    );
    assert_eq!(u.savings_micros, u.standard_cost_micros - u.cost_micros);
    let by_tier =
        s.cp.get_usage_grouped(&s.org_id, "", "", "tier")
            .await
            .unwrap();
    assert_eq!(by_tier.groups.iter().map(|g| g.requests).sum::<u64>(), 3);
    assert_eq!(
        by_tier.groups.iter().map(|g| g.cost_micros).sum::<i64>(),
        u.cost_micros
    );
    let flex = by_tier.groups.iter().find(|g| g.key == "flex").unwrap();
    assert_eq!((flex.requests, flex.flex_requests), (1, 1));
    let by_model =
        s.cp.get_usage_grouped(&s.org_id, "", "", "model")
            .await
            .unwrap();
    assert_eq!(by_model.groups.len(), 1);
    assert_eq!(
        (by_model.groups[0].key.as_str(), by_model.groups[0].requests),
        ("gpt-5.5", 3)
    );
    let by_day =
        s.cp.get_usage_grouped(&s.org_id, "", "", "day")
            .await
            .unwrap();
    assert_eq!(by_day.groups[0].key.len(), 10, "YYYY-MM-DD");
    assert!(s
        .cp
        .get_usage_grouped(&s.org_id, "", "", "week")
        .await
        .is_err());
}

/// Serves the simulator over HTTPS with a certificate from a private CA.
async fn https_sim(dir: &std::path::Path) -> (String, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let (cert, key, ca_file) = (
        dir.join("leaf.pem"),
        dir.join("leaf.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let acceptor = flex_data_plane::server::tls_acceptor(&cert, &key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(flex_data_plane::server::serve(
        listener,
        flex::sim::router(sim_config()),
        Some(acceptor),
    ));
    (format!("https://localhost:{port}/v1"), ca_file)
}

#[tokio::test]
async fn upstream_https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (url, ca) = https_sim(dir.path()).await;
    let s = stack_with(Options {
        sim: sim_config(),
        openai_url: Some(url.clone()),
        ca: Some(ca),
        anthropic_url: None,
    })
    .await;
    for sw in ["default", "00h-00m-10s"] {
        let r = post(
            &format!("{}/responses", s.base),
            Some(&s.api_key),
            &responses("gpt-5.5", "hi", sw),
        )
        .await;
        assert_eq!(r.status, 200, "{sw}: {}", r.text());
    }
    // Without the CA, the same upstream is refused (the certificate is not trusted).
    let s2 = stack_with(Options {
        sim: sim_config(),
        openai_url: None,
        ca: None,
        anthropic_url: None,
    })
    .await;
    let client = flex_data_plane::upstream::UpstreamClient::new(&Default::default()).unwrap();
    let req = http::Request::post(format!("{url}/responses"))
        .body(bytes::Bytes::new())
        .unwrap();
    assert!(
        client.send(&req, None).await.is_err(),
        "untrusted certificate must fail"
    );
    drop(s2);
}

/// The embedded proxy's entry once it has applied the control plane's current version.
async fn embedded_caught_up(
    cp: &flex_control_plane::ControlPlane,
) -> flex_shared::proto::admin::ProxyStatus {
    let t0 = Instant::now();
    loop {
        let r = cp.list_proxies();
        let p = r
            .proxies
            .iter()
            .find(|p| p.proxy_id == "embedded")
            .cloned()
            .unwrap_or_else(|| panic!("no embedded proxy in {:?}", r.proxies));
        if p.applied_version == r.current_version && r.current_version == cp.snapshot().version {
            return p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{p:?} at {}",
            r.current_version
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_embedded_proxy_is_listed_with_each_version_it_applies() {
    let s = stack().await;
    let p = embedded_caught_up(&s.cp).await;
    assert_eq!(p.transport, "in-process");
    assert!(p.connected && !p.connected_since.is_empty(), "{p:?}");
    assert!(p.last_error.is_empty(), "{p:?}");
    // A change: the applied version follows the control plane's.
    s.cp.create_org(&Metadata::new("test"), "second", None)
        .await
        .unwrap();
    assert!(embedded_caught_up(&s.cp).await.applied_version > p.applied_version);
}

#[tokio::test]
async fn a_proxy_gets_the_snapshot_on_connect_over_grpc_watch() {
    let s = stack().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cp = s.cp.clone();
    tokio::spawn(async move {
        let _ = cp
            .serve_with_listener(
                listener,
                &secrecy::SecretString::from("t".to_string()),
                std::future::pending(),
            )
            .await;
    });
    let store = Arc::new(flex_data_plane::snapshot::SnapshotStore::new(
        Some(s.keyring.clone()),
        None,
    ));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    tokio::spawn(flex_data_plane::snapshot::follow_grpc(
        store.clone(),
        endpoint,
        "p1".into(),
        flex_data_plane::control_client::ProxyToken::none(),
    ));
    let want = s.cp.snapshot().version;
    let t0 = Instant::now();
    while store.version() < want {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no snapshot over gRPC"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let snap = store.load().unwrap();
    assert!(snap.keys.contains_key(&flex_shared::keys::hash(&s.api_key)));
    // An update after connect arrives too, and the proxy is listed with its version.
    s.cp.revoke_api_key(&Metadata::new("test"), &s.key_id, "")
        .await
        .unwrap();
    let t0 = Instant::now();
    while store
        .load()
        .unwrap()
        .keys
        .contains_key(&flex_shared::keys::hash(&s.api_key))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "revocation not delivered over gRPC"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let proxies = s.cp.list_proxies();
    let p = proxies
        .proxies
        .iter()
        .find(|p| p.proxy_id == "p1")
        .expect("proxy registered");
    assert_eq!(p.applied_version, s.cp.snapshot().version);
}

#[tokio::test]
async fn an_operator_adds_a_flex_model_without_redeploying_proxies() {
    use flex_shared::proto::control::{ModelEntry, TierPrice};
    let s = stack().await;
    let url = format!("{}/responses", s.base);
    let r = post(
        &url,
        Some(&s.api_key),
        &responses("gpt-9", "hi", "00h-00m-10s"),
    )
    .await;
    assert_eq!(r.json()["error"]["code"], "model_not_flex_capable");
    let price = |tier: &str, n: i64| TierPrice {
        tier: tier.into(),
        input_per_mtok_micros: n,
        cached_input_per_mtok_micros: n / 10,
        output_per_mtok_micros: 8 * n,
    };
    let entry = ModelEntry {
        id: "gpt-9".into(),
        provider: "openai".into(),
        flex_capable: true,
        aliases: vec!["gpt-nine".into()],
        prices: vec![price("standard", 2_000_000), price("flex", 1_000_000)],
        standard_start_floor_ms: 400,
    };
    s.cp.set_model(&Metadata::new("test"), &entry)
        .await
        .unwrap();
    let mut served = String::new();
    for _ in 0..100 {
        let r = post(
            &url,
            Some(&s.api_key),
            &responses("gpt-nine", "hi", "00h-00m-10s"),
        )
        .await;
        if r.status == 200 {
            served = r.header("x-flex-served-tier").to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(served, "flex", "the alias of the new model races flex");
    let models = get(&format!("{}/models", s.base), Some(&s.api_key))
        .await
        .json();
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "gpt-9" && m["flex_capable"] == true));
    // A claude model cannot be made flex-capable; a bad provider is refused with what to fix.
    let mut bad = entry.clone();
    bad.id = "claude-x".into();
    bad.provider = "anthropic".into();
    assert!(s.cp.set_model(&Metadata::new("test"), &bad).await.is_err());
    bad.provider = "mistral".into();
    let e =
        s.cp.set_model(&Metadata::new("test"), &bad)
            .await
            .unwrap_err();
    assert!(e.to_string().contains("openai|anthropic|gemini"), "{e}");
    assert_eq!(s.cp.list_models().len(), 1);
}

/// A caller that goes away before its answer is complete still leaves one usage event,
/// `cancelled`: while a non-streaming body is being read from the provider, while one is being
/// assembled from a raced stream, and during the race itself (no tier started yet).
#[tokio::test]
async fn a_caller_that_leaves_mid_answer_is_recorded_as_cancelled() {
    let s = stack().await;
    // Flex starts at once, then 10 s of tokens.
    let slow = "slow #sim flex_delay_ms=0 output_tokens=400 tokens_per_sec=40";
    let cases = [
        // Passthrough, no race: the provider's body is read whole.
        ("responses", responses("gpt-5.5", slow, "default")),
        // Raced (flex starts at once), the body assembled from the stream.
        ("responses", responses("gpt-5.5", slow, "00h-00m-10s")),
        // Translated and raced, assembled.
        (
            "chat/completions",
            json!({"model": "gemini-3-flash-preview", "start_within": "00h-00m-10s",
                   "messages": [{"role": "user", "content": slow}]}),
        ),
        // In the race: flex will not start for a minute, standard is launched near the end.
        (
            "responses",
            responses("gpt-5.5", "wait #sim flex_delay_ms=60000", "00h-00m-30s"),
        ),
    ];
    for (path, body) in &cases {
        let url = format!("{}/{path}", s.base);
        let left =
            tokio::time::timeout(Duration::from_secs(1), post(&url, Some(&s.api_key), body)).await;
        assert!(left.is_err(), "{path} {body} answered within 1 s");
    }
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        s.dir.path().join("flex.db").display()
    ))
    .await
    .unwrap();
    let t0 = Instant::now();
    let rows = loop {
        let rows: Vec<(String, i64, String, String)> = sqlx::query_as(
            "SELECT outcome, status, served_tier, model FROM usage_ledger ORDER BY received_at",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        if rows.len() >= cases.len() {
            break rows;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} of {} cancelled requests in the ledger: {rows:?}",
            rows.len(),
            cases.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rows.len(), cases.len(), "{rows:?}");
    for r in &rows {
        assert_eq!((r.0.as_str(), r.1), ("cancelled", 499), "{rows:?}");
    }
    // The two assembled from a started flex stream name their tier; the direct one (the
    // simulator sends a non-streaming head with the whole body) and the racing one had none yet.
    let mut served: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    served.sort_unstable();
    assert_eq!(served, ["", "", "flex", "flex"], "{rows:?}");
}
