#![allow(clippy::unwrap_used, clippy::expect_used)]

use flex_shared::catalog::Tier;
use http::StatusCode;
use secrecy::SecretString;
use serde_json::{json, Value};

use super::request::base64_decode;
use super::*;
use crate::canonical::{
    Accumulator, Effort, Media, Message, Part, Reasoning, Request, Response, ResponseFormat, Role,
    StopReason, StreamEvent, Tool, ToolCall, ToolChoice, ToolResult, Usage,
};
use crate::providers::{AskTier, Decoder};
use crate::race::EventClass;
use crate::sse::Event;

fn user(parts: Vec<Part>) -> Message {
    Message {
        role: Role::User,
        parts,
    }
}

fn assistant(parts: Vec<Part>) -> Message {
    Message {
        role: Role::Assistant,
        parts,
    }
}

fn text(t: &str) -> Part {
    Part::Text(t.into())
}

fn req(messages: Vec<Message>) -> Request {
    Request {
        model: "claude-sonnet-4-5".into(),
        messages,
        max_output_tokens: Some(1024),
        ..Request::default()
    }
}

fn call(id: &str, name: &str, args: &str) -> Part {
    Part::ToolCall(ToolCall {
        id: id.into(),
        name: name.into(),
        arguments: args.into(),
        signature: None,
    })
}

fn result(id: &str, content: &str) -> Part {
    Part::ToolResult(ToolResult {
        call_id: id.into(),
        name: None,
        content: content.into(),
        is_error: false,
    })
}

#[test]
fn golden_text() {
    let b = body(&req(vec![user(vec![text("Hello!")])]), AskTier::Standard).unwrap();
    assert_eq!(
        b,
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}],
            "service_tier": "standard_only",
            "stream": true,
        })
    );
}

#[test]
fn tiers_map_and_flex_never_reaches_anthropic() {
    let r = req(vec![user(vec![text("x")])]);
    assert_eq!(body(&r, AskTier::Auto).unwrap()["service_tier"], "auto");
    assert_eq!(body(&r, AskTier::Priority).unwrap()["service_tier"], "auto");
    assert_eq!(
        body(&r, AskTier::Flex).unwrap_err().code,
        "flex_unsupported_for_anthropic"
    );
    assert_eq!(served_tier("standard"), Some(Tier::Standard));
    assert_eq!(served_tier("priority"), Some(Tier::Priority));
    assert_eq!(served_tier("batch"), None);
}

#[test]
fn max_tokens_is_required() {
    let mut r = req(vec![user(vec![text("x")])]);
    r.max_output_tokens = None;
    let e = body(&r, AskTier::Standard).unwrap_err();
    assert_eq!(e.code, "missing_max_tokens");
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert!(e.full_message().contains("Example:"));
}

#[test]
fn trap_9_several_system_prompts_merge_in_order() {
    let mut r = req(vec![user(vec![text("Hi")])]);
    r.system = vec!["You are terse.".into(), "Answer in French.".into()];
    assert_eq!(
        body(&r, AskTier::Standard).unwrap()["system"],
        "You are terse.\n\nAnswer in French."
    );
}

#[test]
fn golden_multi_turn_merges_same_role_neighbours() {
    let r = req(vec![
        user(vec![text("Hi")]),
        assistant(vec![text("Hello! How can I help?")]),
        user(vec![text("Tell me a joke.")]),
        user(vec![text(""), text("A short one.")]),
    ]);
    assert_eq!(
        body(&r, AskTier::Standard).unwrap()["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello! How can I help?"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Tell me a joke."},
                {"type": "text", "text": "A short one."},
            ]},
        ])
    );
}

fn weather_tool() -> Tool {
    Tool {
        name: "get_weather".into(),
        description: Some("Current weather".into()),
        parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        strict: Some(true),
    }
}

#[test]
fn golden_tools_and_tool_choice() {
    let mut r = req(vec![user(vec![text("Weather in Paris?")])]);
    r.tools = vec![
        weather_tool(),
        Tool {
            name: "now".into(),
            description: None,
            parameters: Value::Null,
            strict: None,
        },
    ];
    r.tool_choice = ToolChoice::Tool("get_weather".into());
    r.parallel_tool_calls = Some(false);
    let b = body(&r, AskTier::Standard).unwrap();
    assert_eq!(
        b["tools"],
        json!([
            {"name": "get_weather", "description": "Current weather",
             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
            {"name": "now", "input_schema": {"type": "object", "properties": {}}},
        ])
    );
    assert_eq!(
        b["tool_choice"],
        json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true})
    );
    for (choice, want) in [
        (ToolChoice::Auto, json!({"type": "auto"})),
        (ToolChoice::Required, json!({"type": "any"})),
        (ToolChoice::None, json!({"type": "none"})),
    ] {
        r.tool_choice = choice;
        r.parallel_tool_calls = None;
        assert_eq!(body(&r, AskTier::Standard).unwrap()["tool_choice"], want);
    }
    // No tools: no tool_choice either (Anthropic refuses one alone).
    r.tools.clear();
    assert!(body(&r, AskTier::Standard)
        .unwrap()
        .get("tool_choice")
        .is_none());
}

#[test]
fn web_search_becomes_the_server_tool() {
    let mut r = req(vec![user(vec![text("News?")])]);
    r.web_search = true;
    let b = body(&r, AskTier::Standard).unwrap();
    assert_eq!(
        b["tools"],
        json!([{"type": "web_search_20250305", "name": "web_search"}])
    );
}

#[test]
fn trap_1_tool_call_ids_are_made_safe_and_stay_paired() {
    let weird = "fc_68a.b/c";
    let r = req(vec![
        user(vec![text("Weather?")]),
        assistant(vec![call(weird, "get_weather", r#"{"city":"Paris"}"#)]),
        user(vec![result(weird, "sunny")]),
    ]);
    let b = body(&r, AskTier::Standard).unwrap();
    let id = b["messages"][1]["content"][0]["id"].as_str().unwrap();
    assert!(id
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'));
    assert_eq!(b["messages"][2]["content"][0]["tool_use_id"], id);
}

#[test]
fn trap_3_parallel_tool_results_in_one_user_message() {
    let r = req(vec![
        user(vec![text("Weather in Paris and Rome?")]),
        assistant(vec![
            text("Checking both."),
            call("toolu_01", "get_weather", r#"{"city":"Paris"}"#),
            call("toolu_02", "get_weather", r#"{"city":"Rome"}"#),
        ]),
        // As a Chat caller sends them: one message per result, then more text.
        user(vec![result("toolu_01", "sunny")]),
        user(vec![
            text("Also, be brief."),
            Part::ToolResult(ToolResult {
                call_id: "toolu_02".into(),
                name: Some("get_weather".into()),
                content: "{\"error\":\"timeout\"}".into(),
                is_error: true,
            }),
        ]),
    ]);
    let b = body(&r, AskTier::Standard).unwrap();
    assert_eq!(
        b["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking both."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {"city": "Rome"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_02", "content": "{\"error\":\"timeout\"}", "is_error": true},
                {"type": "text", "text": "Also, be brief."},
            ]},
        ])
    );
    // A call left unanswered is refused up front, naming it.
    let r = req(vec![
        user(vec![text("Weather?")]),
        assistant(vec![
            call("toolu_01", "get_weather", "{}"),
            call("toolu_02", "get_weather", "{}"),
        ]),
        user(vec![result("toolu_01", "sunny")]),
    ]);
    let e = body(&r, AskTier::Standard).unwrap_err();
    assert_eq!(e.code, "missing_tool_result");
    assert!(e.message.contains("toolu_02"));
}

#[test]
fn trap_4_signed_thinking_is_replayed_before_tool_use() {
    let signed = |t: &str, s: &str| {
        Part::Reasoning(Reasoning {
            text: t.into(),
            signature: Some(s.into()),
            redacted: None,
        })
    };
    let r = req(vec![
        user(vec![text("Weather?")]),
        assistant(vec![
            signed("Let me check.", "sig1"),
            call("toolu_01", "get_weather", r#"{"city":"Paris"}"#),
            // Empty-text signed block, arriving after the call: still replayed, moved up.
            signed("", "sig2"),
            Part::Reasoning(Reasoning {
                redacted: Some("opaque".into()),
                ..Reasoning::default()
            }),
            // Another provider's unsigned reasoning: dropped, never made text.
            Part::Reasoning(Reasoning {
                text: "openai summary".into(),
                ..Reasoning::default()
            }),
        ]),
        user(vec![result("toolu_01", "sunny")]),
    ]);
    let b = body(&r, AskTier::Standard).unwrap();
    assert_eq!(
        b["messages"][1]["content"],
        json!([
            {"type": "thinking", "thinking": "Let me check.", "signature": "sig1"},
            {"type": "thinking", "thinking": "", "signature": "sig2"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
        ])
    );
    assert!(!b.to_string().contains("openai summary"));
}

#[test]
fn trap_8_images_split_data_urls_and_allow_only_four_types() {
    let r = req(vec![user(vec![
        text("What is in these?"),
        Part::Image(Media::from_url("data:image/png;base64,iVBORw0KGgo=")),
        Part::Image(Media::from_url("https://example.com/cat.jpg")),
        Part::Image(Media::from_url("data:image/jpg;base64,/9j/4AAQ")),
    ])]);
    assert_eq!(
        body(&r, AskTier::Standard).unwrap()["messages"][0]["content"],
        json!([
            {"type": "text", "text": "What is in these?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
        ])
    );
    let r = req(vec![user(vec![Part::Image(Media::from_url(
        "data:image/bmp;base64,Qk0=",
    ))])]);
    let e = body(&r, AskTier::Standard).unwrap_err();
    assert_eq!(e.code, "unsupported_parameter");
    assert!(e
        .message
        .contains("image/jpeg, image/png, image/gif and image/webp"));
}

#[test]
fn files_become_documents() {
    let r = req(vec![user(vec![
        Part::File {
            media: Media::from_url("data:application/pdf;base64,JVBERi0="),
            filename: Some("contract.pdf".into()),
        },
        Part::File {
            media: Media::from_url("data:text/plain;base64,aGVsbG8gd29ybGQ="),
            filename: None,
        },
        Part::File {
            media: Media::Url("https://example.com/a.pdf".into()),
            filename: None,
        },
    ])]);
    assert_eq!(
        body(&r, AskTier::Standard).unwrap()["messages"][0]["content"],
        json!([
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}, "title": "contract.pdf"},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hello world"}},
            {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
        ])
    );
    let r = req(vec![user(vec![Part::File {
        media: Media::from_url("data:application/zip;base64,UEsD"),
        filename: None,
    }])]);
    assert_eq!(
        body(&r, AskTier::Standard).unwrap_err().code,
        "unsupported_parameter"
    );
}

#[test]
fn golden_structured_output() {
    let mut r = req(vec![user(vec![text("Extract the name.")])]);
    let schema = json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": false});
    r.response_format = Some(ResponseFormat::JsonSchema {
        name: "person".into(),
        schema: schema.clone(),
        strict: Some(true),
    });
    let b = body(&r, AskTier::Standard).unwrap();
    assert_eq!(
        b["output_config"],
        json!({"format": {"type": "json_schema", "schema": schema}})
    );
    r.system = vec!["Be exact.".into()];
    r.response_format = Some(ResponseFormat::JsonObject);
    let b = body(&r, AskTier::Standard).unwrap();
    assert!(b.get("output_config").is_none());
    assert_eq!(
        b["system"],
        format!("Be exact.\n\n{JSON_OBJECT_INSTRUCTION}")
    );
}

#[test]
fn golden_reasoning_effort() {
    let mut r = req(vec![user(vec![text("Prove it.")])]);
    r.max_output_tokens = Some(32_000);
    r.reasoning = Some(Effort::Medium);
    r.temperature = Some(0.7);
    r.top_p = Some(0.5);
    let b = body(&r, AskTier::Standard).unwrap();
    assert_eq!(
        b["thinking"],
        json!({"type": "enabled", "budget_tokens": 8192})
    );
    assert!(b.get("temperature").is_none() && b.get("top_p").is_none());
    // The budget stays below max_tokens.
    r.reasoning = Some(Effort::High);
    r.max_output_tokens = Some(4096);
    assert_eq!(
        body(&r, AskTier::Standard).unwrap()["thinking"]["budget_tokens"],
        4095
    );
    // Too small for Anthropic's minimum: no thinking, sampling kept (clamped to 0..=1).
    r.max_output_tokens = Some(1000);
    r.temperature = Some(1.5);
    let b = body(&r, AskTier::Standard).unwrap();
    assert!(b.get("thinking").is_none());
    assert_eq!(b["temperature"], 1.0);
    assert!(b.get("top_p").is_none());
    // A forced tool excludes thinking.
    r.max_output_tokens = Some(32_000);
    r.tools = vec![weather_tool()];
    r.tool_choice = ToolChoice::Required;
    assert!(body(&r, AskTier::Standard)
        .unwrap()
        .get("thinking")
        .is_none());
}

#[test]
fn metadata_user() {
    let mut r = req(vec![user(vec![text("x")])]);
    r.user = Some("u-42".into());
    assert_eq!(
        body(&r, AskTier::Standard).unwrap()["metadata"],
        json!({"user_id": "u-42"})
    );
}

#[test]
fn request_addresses_messages_with_the_key_headers() {
    let key = SecretString::from("sk-ant-test".to_string());
    let r = req(vec![user(vec![text("Hello!")])]);
    let http = request("http://127.0.0.1:9/", &r, AskTier::Standard, &key).unwrap();
    assert_eq!(http.uri(), "http://127.0.0.1:9/v1/messages");
    assert_eq!(http.method(), http::Method::POST);
    let h = http.headers();
    assert_eq!(h["x-api-key"], "sk-ant-test");
    assert!(h["x-api-key"].is_sensitive());
    assert_eq!(h["anthropic-version"], "2023-06-01");
    assert_eq!(h["content-type"], "application/json");
}

#[test]
fn a_passthrough_request_marks_its_key_header_sensitive() {
    let key = SecretString::from("sk-ant-test".to_string());
    let http = raw_request(
        "http://127.0.0.1:9",
        &key,
        bytes::Bytes::from_static(b"{}"),
        true,
        &http::HeaderMap::new(),
    )
    .unwrap();
    assert_eq!(http.headers()["x-api-key"], "sk-ant-test");
    assert!(http.headers()["x-api-key"].is_sensitive());
}

fn ev(name: &str, data: Value) -> Event {
    Event::new(name, data.to_string())
}

fn run(events: &[Event]) -> (Vec<StreamEvent>, StreamDecoder) {
    let mut d = StreamDecoder::new();
    let mut out = Vec::new();
    for e in events {
        d.decode(e, &mut out);
    }
    (out, d)
}

fn accumulate(events: &[StreamEvent]) -> Response {
    let mut acc = Accumulator::default();
    for e in events {
        acc.push(e);
    }
    assert!(acc.finished);
    acc.finish()
}

fn message_start(usage: Value) -> Event {
    ev(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_01", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": usage}}),
    )
}

#[test]
fn decodes_a_text_stream_with_real_usage() {
    let transcript = [
        message_start(
            json!({"input_tokens": 12, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 100,
            "output_tokens": 1, "service_tier": "standard"}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev("ping", json!({"type": "ping"})),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " world"}}),
        ),
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": 7}}),
        ),
        ev("message_stop", json!({"type": "message_stop"})),
    ];
    let classes: Vec<EventClass> = transcript.iter().map(classify).collect();
    assert_eq!(
        &classes[..3],
        [
            EventClass::Lifecycle,
            EventClass::Start,
            EventClass::Lifecycle
        ]
    );
    let (out, d) = run(&transcript);
    assert_eq!(d.served_tier(), Some(Tier::Standard));
    assert!(
        matches!(&out[0], StreamEvent::Start { id, model, .. } if id == "msg_01" && model == "claude-sonnet-4-5-20250929")
    );
    assert_eq!(
        &out[1..],
        [
            StreamEvent::TextStart { index: 0 },
            StreamEvent::TextDelta {
                index: 0,
                text: "Hello".into()
            },
            StreamEvent::TextDelta {
                index: 0,
                text: " world".into()
            },
            StreamEvent::BlockStop { index: 0 },
            StreamEvent::Finish {
                stop: StopReason::EndTurn,
                usage: Usage {
                    input_tokens: 115,
                    cached_input_tokens: 100,
                    output_tokens: 7,
                    reasoning_tokens: 0
                }
            },
        ]
    );
    let r = accumulate(&out);
    assert_eq!(r.content, vec![text("Hello world")]);
}

#[test]
fn trap_6_usage_input_adds_cache_reads_and_writes() {
    let (out, _) = run(&[
        message_start(json!({"input_tokens": 5, "cache_creation_input_tokens": 20,
            "cache_read_input_tokens": 1000, "output_tokens": 1, "service_tier": "priority"})),
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
            "usage": {"output_tokens": 50, "output_tokens_details": {"thinking_tokens": 30}}}),
        ),
        ev("message_stop", json!({"type": "message_stop"})),
    ]);
    assert_eq!(
        out.last(),
        Some(&StreamEvent::Finish {
            stop: StopReason::MaxTokens,
            usage: Usage {
                input_tokens: 1025,
                cached_input_tokens: 1000,
                output_tokens: 50,
                reasoning_tokens: 30
            }
        })
    );
}

#[test]
fn trap_7_tool_arguments_stream_in_fragments_and_blocks_close_in_order() {
    let (out, d) = run(&[
        message_start(json!({"input_tokens": 400, "output_tokens": 1, "service_tier": "standard"})),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking."}}),
        ),
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {}}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "ris\"}"}}),
        ),
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ),
        // A call without arguments never comes out empty.
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_01B", "name": "now", "input": {}}}),
        ),
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 2}),
        ),
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 60}}),
        ),
        ev("message_stop", json!({"type": "message_stop"})),
    ]);
    assert_eq!(d.served_tier(), Some(Tier::Standard));
    assert_eq!(
        &out[4..],
        [
            StreamEvent::ToolCallStart {
                index: 1,
                id: "toolu_01A".into(),
                name: "get_weather".into(),
                signature: None
            },
            StreamEvent::ToolCallDelta {
                index: 1,
                arguments: "{\"city\": \"Pa".into()
            },
            StreamEvent::ToolCallDelta {
                index: 1,
                arguments: "ris\"}".into()
            },
            StreamEvent::BlockStop { index: 1 },
            StreamEvent::ToolCallStart {
                index: 2,
                id: "toolu_01B".into(),
                name: "now".into(),
                signature: None
            },
            StreamEvent::ToolCallDelta {
                index: 2,
                arguments: "{}".into()
            },
            StreamEvent::BlockStop { index: 2 },
            StreamEvent::Finish {
                stop: StopReason::ToolUse,
                usage: Usage {
                    input_tokens: 400,
                    cached_input_tokens: 0,
                    output_tokens: 60,
                    reasoning_tokens: 0
                }
            },
        ]
    );
    let r = accumulate(&out);
    assert_eq!(r.stop, StopReason::ToolUse);
    assert_eq!(
        r.content,
        vec![
            text("Checking."),
            call("toolu_01A", "get_weather", "{\"city\": \"Paris\"}"),
            call("toolu_01B", "now", "{}"),
        ]
    );
}

#[test]
fn decodes_thinking_with_its_signature_and_skips_server_blocks() {
    let (out, _) = run(&[
        message_start(json!({"input_tokens": 30, "output_tokens": 1, "service_tier": "standard"})),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me think"}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": " step by step."}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}}),
        ),
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}}),
        ),
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "42"}}),
        ),
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 2}),
        ),
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 90}}),
        ),
        ev("message_stop", json!({"type": "message_stop"})),
    ]);
    let r = accumulate(&out);
    assert_eq!(
        r.content,
        vec![
            Part::Reasoning(Reasoning {
                text: "Let me think step by step.".into(),
                signature: Some("EqQBCgIYAhIM".into()),
                redacted: None
            }),
            text("42"),
        ]
    );
    // Dense canonical indices despite the skipped server block.
    assert!(out.contains(&StreamEvent::TextStart { index: 1 }));
    assert_eq!(r.usage.output_tokens, 90);
}

#[test]
fn stop_reasons_map() {
    for (s, want) in [
        ("end_turn", StopReason::EndTurn),
        ("max_tokens", StopReason::MaxTokens),
        ("tool_use", StopReason::ToolUse),
        ("stop_sequence", StopReason::StopSequence),
        ("refusal", StopReason::Refusal),
        ("pause_turn", StopReason::EndTurn),
        ("model_context_window_exceeded", StopReason::MaxTokens),
    ] {
        assert_eq!(stop_reason(s), want, "{s}");
    }
}

#[test]
fn errors_classify_by_type_and_decode_to_error_events() {
    let overloaded = ev(
        "error",
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    );
    let limited = Event::new(
        "",
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
            .to_string(),
    );
    let invalid = ev(
        "error",
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}),
    );
    assert_eq!(classify(&overloaded), EventClass::CapacityError);
    assert_eq!(classify(&limited), EventClass::CapacityError);
    assert_eq!(classify(&invalid), EventClass::Error);
    assert_eq!(classify(&ev("message_delta", json!({}))), EventClass::Start);
    let (out, _) = run(&[
        message_start(json!({"input_tokens": 1, "output_tokens": 1})),
        overloaded,
    ]);
    assert_eq!(
        out[1],
        StreamEvent::Error {
            code: "upstream_error",
            message: "overloaded_error: Overloaded".into()
        }
    );
}

#[test]
fn base64_decoding() {
    assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(base64_decode("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
    assert_eq!(base64_decode("YQ").unwrap(), b"a");
    assert!(base64_decode("a*b").is_none());
}

fn malformed(out: &[StreamEvent]) -> Option<&str> {
    out.iter().find_map(|e| match e {
        StreamEvent::Error {
            message,
            code: "upstream_incomplete",
        } => Some(message.as_str()),
        _ => None,
    })
}

/// A content block `index` past the limit ends the stream as malformed (no panic, nothing sized
/// by it), and the rest of the stream is ignored.
#[test]
fn an_index_past_the_limit_is_an_error() {
    for n in [
        1_000_000_000_000_u64,
        1025,
        crate::canonical::MAX_INDEX as u64,
    ] {
        for first in [
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": n, "content_block": {"type": "text", "text": ""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": n, "delta": {"type": "text_delta", "text": "x"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": n}),
            ),
        ] {
            let (out, _) = run(&[
                message_start(json!({"input_tokens": 1, "output_tokens": 1})),
                first,
                ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
                ev("message_stop", json!({"type": "message_stop"})),
            ]);
            let why = malformed(&out).unwrap_or_else(|| panic!("{n}: {out:?}"));
            assert!(why.contains(&format!("`index` {n}")), "{why}");
            assert_eq!(out.len(), 2, "Start, then the error only: {out:?}");
        }
    }
}

/// More content blocks than the limit (the same upstream index reopened) is an error too.
#[test]
fn more_blocks_than_the_limit_is_an_error() {
    let mut events = vec![message_start(
        json!({"input_tokens": 1, "output_tokens": 1}),
    )];
    for _ in 0..=crate::canonical::MAX_INDEX {
        events.push(ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ));
    }
    let (out, _) = run(&events);
    let why = malformed(&out).unwrap_or_else(|| panic!("{:?}", out.last()));
    assert!(why.contains("more than 1024 content blocks"), "{why}");
}
