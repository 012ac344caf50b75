#![allow(clippy::unwrap_used, clippy::expect_used)]

use flex_shared::catalog::Tier;
use serde_json::{json, Value};

use super::*;
use crate::canonical::{
    events_of, Accumulator, Effort, Media, Message, Part, Reasoning, Request, Response,
    ResponseFormat, Role, StopReason, StreamEvent, Tool, ToolCall, ToolChoice, ToolResult, Usage,
};
use crate::formats::{CallerFormat, Encoder, RawBody};
use crate::ids;
use crate::providers::{anthropic, AskTier, Decoder};
use crate::sse::Event;

fn raw(v: &Value) -> RawBody {
    RawBody::parse(v.to_string().as_bytes(), CallerFormat::Messages).unwrap()
}

fn parse(v: Value) -> Result<Request, ApiError> {
    parse_request(&raw(&v))
}

fn base() -> Value {
    json!({"model": "claude-opus-4-8", "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hello!"}]})
}

fn with(field: &str, v: Value) -> Value {
    let mut b = base();
    b[field] = v;
    b
}

#[test]
fn parses_a_full_body() {
    let r = parse(json!({
        "model": "claude-opus-4-8",
        "max_tokens": 2048,
        "system": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in French."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is this, and the weather?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {"type": "document", "title": "contract.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Need the weather.", "signature": "sig1"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "sunny"}], "is_error": false},
            ]},
        ],
        "tools": [{"name": "get_weather", "description": "Weather now", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
        "thinking": {"type": "enabled", "budget_tokens": 8192},
        "top_p": 0.9,
        "metadata": {"user_id": "u-1"},
        "stream": true,
    }))
    .unwrap();
    assert_eq!(
        r,
        Request {
            model: "claude-opus-4-8".into(),
            system: vec!["You are terse.".into(), "Answer in French.".into()],
            messages: vec![
                Message {
                    role: Role::User,
                    parts: vec![
                        Part::Text("What is this, and the weather?".into()),
                        Part::Image(Media::Base64 {
                            mime: "image/png".into(),
                            data: "iVBORw0KGgo=".into()
                        }),
                        Part::Image(Media::Url("https://example.com/cat.jpg".into())),
                        Part::File {
                            media: Media::Base64 {
                                mime: "application/pdf".into(),
                                data: "JVBERi0=".into()
                            },
                            filename: Some("contract.pdf".into())
                        },
                    ]
                },
                Message {
                    role: Role::Assistant,
                    parts: vec![
                        Part::Reasoning(Reasoning {
                            text: "Need the weather.".into(),
                            signature: Some("sig1".into()),
                            redacted: None
                        }),
                        Part::Reasoning(Reasoning {
                            redacted: Some("opaque".into()),
                            ..Reasoning::default()
                        }),
                        Part::ToolCall(ToolCall {
                            id: "toolu_01".into(),
                            name: "get_weather".into(),
                            arguments: r#"{"city":"Paris"}"#.into(),
                            signature: None
                        }),
                    ]
                },
                Message {
                    role: Role::User,
                    parts: vec![Part::ToolResult(ToolResult {
                        call_id: "toolu_01".into(),
                        name: Some("get_weather".into()),
                        content: "sunny".into(),
                        is_error: false
                    })]
                },
            ],
            tools: vec![Tool {
                name: "get_weather".into(),
                description: Some("Weather now".into()),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
                strict: None
            }],
            tool_choice: ToolChoice::Auto,
            parallel_tool_calls: Some(false),
            max_output_tokens: Some(2048),
            top_p: Some(0.9),
            reasoning: Some(Effort::Medium),
            stream: true,
            user: Some("u-1".into()),
            ..Request::default()
        }
    );
}

#[test]
fn max_tokens_is_always_required() {
    let mut b = base();
    b.as_object_mut().unwrap().remove("max_tokens");
    let e = parse(b).unwrap_err();
    assert_eq!(
        (e.code, e.param.as_deref()),
        ("missing_max_tokens", Some("max_tokens"))
    );
    assert!(e.full_message().contains("Example:"));
    assert_eq!(
        parse(with("max_tokens", Value::Null)).unwrap_err().code,
        "missing_max_tokens"
    );
    assert_eq!(
        parse(with("max_tokens", json!("many"))).unwrap_err().code,
        "invalid_request"
    );
}

#[test]
fn seed_refusals_name_the_parameter() {
    let cases = [
        (with("top_k", json!(40)), "top_k"),
        (
            with("stop_sequences", json!(["\n\nHuman:"])),
            "stop_sequences",
        ),
        (
            with("cache_control", json!({"type": "ephemeral"})),
            "cache_control",
        ),
        (
            with(
                "system",
                json!([{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]),
            ),
            "system[0].cache_control",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}]),
            ),
            "messages[0].content[0].cache_control",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}]),
            ),
            "messages[0].content[0].content[0].cache_control",
        ),
        (
            with(
                "tools",
                json!([{"name": "f", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}]),
            ),
            "tools[0].cache_control",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}, "citations": {"enabled": true}}]}]),
            ),
            "messages[0].content[0].citations",
        ),
        (
            with("tools", json!([{"type": "bash_20250124", "name": "bash"}])),
            "tools[0].type",
        ),
    ];
    for (body, param) in cases {
        let e = parse(body).unwrap_err();
        assert_eq!(e.code, "unsupported_parameter", "{param}");
        assert_eq!(e.param.as_deref(), Some(param));
        assert!(!e.fix.is_empty() && !e.example.is_empty(), "{param}");
    }
    // Defaults and explicit "off" values pass.
    let mut ok = with("stop_sequences", json!([]));
    ok["top_k"] = Value::Null;
    ok["cache_control"] = Value::Null;
    ok["messages"] = json!([{"role": "user", "content": [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain"}, "citations": {"enabled": false}}]}]);
    let r = parse(ok).unwrap();
    assert_eq!(r.messages[0].parts, vec![Part::Text("plain".into())]);
}

#[test]
fn web_search_tool_and_choices() {
    let mut b = with(
        "tools",
        json!([{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]),
    );
    b["tool_choice"] = json!({"type": "any"});
    let r = parse(b).unwrap();
    assert!(r.web_search && r.tools.is_empty());
    assert_eq!(r.tool_choice, ToolChoice::Required);
    let r = parse(with("tool_choice", json!({"type": "tool", "name": "f"}))).unwrap();
    assert_eq!(r.tool_choice, ToolChoice::Tool("f".into()));
    let r = parse(with("tool_choice", json!({"type": "none"}))).unwrap();
    assert_eq!(
        (r.tool_choice, r.parallel_tool_calls),
        (ToolChoice::None, None)
    );
}

#[test]
fn thinking_and_output_config() {
    let r = parse(with(
        "thinking",
        json!({"type": "enabled", "budget_tokens": 1024}),
    ))
    .unwrap();
    assert_eq!(r.reasoning, Some(Effort::Minimal));
    let r = parse(with("thinking", json!({"type": "disabled"}))).unwrap();
    assert_eq!(r.reasoning, None);
    let r = parse(with("thinking", json!({"type": "adaptive"}))).unwrap();
    assert_eq!(r.reasoning, Some(Effort::Medium));
    let mut b = with("thinking", json!({"type": "adaptive"}));
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false});
    b["output_config"] =
        json!({"effort": "max", "format": {"type": "json_schema", "schema": schema}});
    let r = parse(b).unwrap();
    assert_eq!(r.reasoning, Some(Effort::High));
    assert_eq!(
        r.response_format,
        Some(ResponseFormat::JsonSchema {
            name: "response".into(),
            schema,
            strict: None
        })
    );
    assert_eq!(
        parse(with("thinking", json!({"type": "enabled"})))
            .unwrap_err()
            .code,
        "invalid_request"
    );
}

#[test]
fn trap_9_system_string_or_blocks_in_order() {
    assert_eq!(
        parse(with("system", json!("Be brief."))).unwrap().system,
        vec!["Be brief."]
    );
    let r = parse(with(
        "system",
        json!([{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]),
    ))
    .unwrap();
    assert_eq!(r.system, vec!["One.", "Two."]);
}

#[test]
fn trap_3_tool_results_keep_their_ids_get_names_and_carry_images_along() {
    let r = parse(with(
        "messages",
        json!([
            {"role": "user", "content": "Weather and a map?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_B", "name": "get_map", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_A", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_B", "is_error": true, "content": [
                    {"type": "text", "text": "partial"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                ]},
            ]},
        ]),
    ))
    .unwrap();
    assert_eq!(
        r.messages[2].parts,
        vec![
            Part::ToolResult(ToolResult {
                call_id: "toolu_A".into(),
                name: Some("get_weather".into()),
                content: "sunny".into(),
                is_error: false
            }),
            Part::ToolResult(ToolResult {
                call_id: "toolu_B".into(),
                name: Some("get_map".into()),
                content: "partial".into(),
                is_error: true
            }),
            Part::Image(Media::Base64 {
                mime: "image/png".into(),
                data: "AAAA".into()
            }),
        ]
    );
    // Native pair: the provider body answers both calls in one user turn, results first.
    let up = anthropic::body(&r, AskTier::Standard).unwrap();
    let turn = &up["messages"][2]["content"];
    assert_eq!(turn[0]["tool_use_id"], "toolu_A");
    assert_eq!(turn[1]["tool_use_id"], "toolu_B");
    assert_eq!(turn[2]["type"], "image");
}

fn response() -> Response {
    Response {
        id: "msg_01XYZ".into(),
        model: "claude-opus-4-8".into(),
        content: vec![
            Part::Reasoning(Reasoning {
                text: "Think.".into(),
                signature: Some("sig".into()),
                redacted: None,
            }),
            Part::Text("Checking the weather.".into()),
            Part::ToolCall(ToolCall {
                id: "call_abc.123".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
                signature: None,
            }),
        ],
        stop: StopReason::ToolUse,
        usage: Usage {
            input_tokens: 1200,
            cached_input_tokens: 200,
            output_tokens: 180,
            reasoning_tokens: 64,
        },
        created: 1_750_000_000,
        provider: None,
    }
}

#[test]
fn trap_6_renders_a_message_with_usage_excluding_cache_and_the_served_tier() {
    let out = render_response(&response(), Tier::Flex);
    let id = ids::for_anthropic("call_abc.123");
    assert_eq!(
        out,
        json!({
            "id": "msg_01XYZ",
            "type": "message",
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Think.", "signature": "sig"},
                {"type": "text", "text": "Checking the weather."},
                {"type": "tool_use", "id": id, "name": "get_weather", "input": {"city": "Paris"}},
            ],
            "model": "claude-opus-4-8",
            "stop_reason": "tool_use",
            "stop_sequence": null,
            "usage": {
                "input_tokens": 1000,
                "cache_read_input_tokens": 200,
                "cache_creation_input_tokens": 0,
                "output_tokens": 180,
                "output_tokens_details": {"thinking_tokens": 64},
                "service_tier": "flex",
            },
        })
    );
    assert_eq!(
        render_response(&response(), Tier::Standard)["usage"]["service_tier"],
        "standard"
    );
}

#[test]
fn trap_1_tool_ids_handed_to_callers_fit_anthropic_rules_and_come_back_unchanged() {
    let out = render_response(&response(), Tier::Standard);
    let id = out["content"][2]["id"].as_str().unwrap();
    assert!(id
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'));
    // The caller echoes it; the upstream gets the same id in the call and the result.
    let r = parse(with(
        "messages",
        json!([
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [out["content"][2].clone()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "sunny"}]},
        ]),
    ))
    .unwrap();
    let up = anthropic::body(&r, AskTier::Standard).unwrap();
    assert_eq!(up["messages"][1]["content"][0]["id"], id);
    assert_eq!(up["messages"][2]["content"][0]["tool_use_id"], id);
}

#[test]
fn stop_reasons_map_both_ways() {
    for (canon, wire) in [
        (StopReason::EndTurn, "end_turn"),
        (StopReason::MaxTokens, "max_tokens"),
        (StopReason::ToolUse, "tool_use"),
        (StopReason::StopSequence, "stop_sequence"),
        (StopReason::ContentFilter, "refusal"),
        (StopReason::Refusal, "refusal"),
    ] {
        assert_eq!(stop_reason(canon), wire);
        if canon != StopReason::ContentFilter {
            assert_eq!(anthropic::stop_reason(wire), canon);
        }
    }
}

fn encode_all(enc: &mut StreamEncoder, events: &[StreamEvent]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for e in events {
        enc.encode(e, &mut out);
    }
    out.into_iter()
        .map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(
                v["type"],
                e.event.as_str(),
                "every event is named after its type"
            );
            (e.event, v)
        })
        .collect()
}

#[test]
fn encoder_emits_messages_events_in_order() {
    let mut enc = StreamEncoder::new(Tier::Flex, "claude-opus-4-8");
    let evs = encode_all(&mut enc, &events_of(&response()));
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let start = &evs[0].1["message"];
    assert_eq!(start["id"], "msg_01XYZ");
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(start["usage"]["service_tier"], "flex");
    assert_eq!(
        evs[1].1["content_block"],
        json!({"type": "thinking", "thinking": "", "signature": ""})
    );
    assert_eq!(
        evs[3].1["delta"],
        json!({"type": "signature_delta", "signature": "sig"})
    );
    assert_eq!(evs[8].1["index"], 2);
    assert_eq!(evs[8].1["content_block"]["input"], json!({}));
    assert_eq!(
        evs[9].1["delta"],
        json!({"type": "input_json_delta", "partial_json": "{\"city\":\"Paris\"}"})
    );
    assert_eq!(
        evs[11].1,
        json!({"type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"input_tokens": 1000, "cache_read_input_tokens": 200, "cache_creation_input_tokens": 0,
                "output_tokens": 180, "output_tokens_details": {"thinking_tokens": 64}}})
    );
}

#[test]
fn trap_7_encoder_never_closes_early_and_closes_what_is_open_at_the_end() {
    let mut enc = StreamEncoder::new(Tier::Standard, "gpt-5.5");
    let evs = encode_all(
        &mut enc,
        &[
            StreamEvent::Start {
                id: "resp_1".into(),
                model: String::new(),
                created: 1,
                provider: None,
            },
            // Interleaved blocks (as OpenAI parallel calls stream): both stay open.
            StreamEvent::ToolCallStart {
                index: 0,
                id: "call_1".into(),
                name: "a".into(),
                signature: None,
            },
            StreamEvent::ToolCallStart {
                index: 1,
                id: "call_2".into(),
                name: "b".into(),
                signature: None,
            },
            StreamEvent::ToolCallDelta {
                index: 0,
                arguments: "{\"x\":".into(),
            },
            StreamEvent::ToolCallDelta {
                index: 1,
                arguments: String::new(),
            },
            StreamEvent::ToolCallDelta {
                index: 0,
                arguments: "1}".into(),
            },
            StreamEvent::BlockStop { index: 0 },
            // A text delta without its start opens the block.
            StreamEvent::TextDelta {
                index: 2,
                text: "done".into(),
            },
            StreamEvent::Finish {
                stop: StopReason::ToolUse,
                usage: Usage {
                    input_tokens: 10,
                    cached_input_tokens: 0,
                    output_tokens: 5,
                    reasoning_tokens: 0,
                },
            },
            StreamEvent::TextDelta {
                index: 2,
                text: "late".into(),
            },
        ],
    );
    let compact: Vec<String> = evs
        .iter()
        .map(|(n, v)| match v["index"].as_u64() {
            Some(i) => format!("{n}:{i}"),
            None => n.clone(),
        })
        .collect();
    assert_eq!(
        compact,
        [
            "message_start",
            "content_block_start:0",
            "content_block_start:1",
            "content_block_delta:0",
            "content_block_delta:0",
            "content_block_stop:0",
            "content_block_start:2",
            "content_block_delta:2",
            "content_block_stop:1",
            "content_block_stop:2",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(evs[0].1["message"]["id"], "msg_resp_1");
    assert_eq!(evs[0].1["message"]["model"], "gpt-5.5");
    assert_eq!(evs[10].1["usage"]["output_tokens"], 5);
}

#[test]
fn errors_become_an_anthropic_error_event() {
    let mut enc = StreamEncoder::new(Tier::Standard, "m");
    let evs = encode_all(
        &mut enc,
        &[StreamEvent::Error {
            message: "overloaded_error: Overloaded".into(),
        }],
    );
    assert_eq!(
        evs.last().unwrap().1,
        json!({"type": "error", "error": {"type": "api_error", "message": "overloaded_error: Overloaded"}})
    );
}

#[test]
fn trap_4_thinking_round_trips_with_its_signature() {
    let body = with(
        "messages",
        json!([
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "", "signature": "EqQB"},
                {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}},
            ]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]},
        ]),
    );
    let up = anthropic::body(&parse(body.clone()).unwrap(), AskTier::Standard).unwrap();
    let mut want = body["messages"].clone();
    want[0]["content"] = json!([{"type": "text", "text": "Weather?"}]);
    assert_eq!(up["messages"], want);
}

#[test]
fn round_trip_caller_body_to_upstream_stream_to_caller() {
    // Caller body → canonical → Anthropic body: the native pair keeps the request's meaning.
    let body = json!({
        "model": "claude-opus-4-8", "max_tokens": 512,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "temperature": 0.3, "stream": false,
    });
    let req = parse(body).unwrap();
    assert_eq!(
        anthropic::body(&req, AskTier::Auto).unwrap(),
        json!({"model": "claude-opus-4-8", "max_tokens": 512, "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "temperature": 0.3, "service_tier": "auto", "stream": true})
    );
    // Upstream SSE → canonical → the caller's stream and the caller's whole message agree.
    let upstream = [
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_9", "type": "message", "role": "assistant", "model": "claude-opus-4-8", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 8, "cache_read_input_tokens": 4, "output_tokens": 1, "service_tier": "priority"}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 2}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ];
    let mut dec = anthropic::StreamDecoder::new();
    let mut canon = Vec::new();
    for (n, d) in &upstream {
        dec.decode(&Event::new(*n, d.to_string()), &mut canon);
    }
    let served = dec.served_tier().unwrap();
    assert_eq!(served, Tier::Priority);
    let mut enc = StreamEncoder::new(served, "claude-opus-4-8");
    let evs = encode_all(&mut enc, &canon);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    let upstream_names: Vec<&str> = upstream.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, upstream_names);
    assert_eq!(evs[2].1["delta"], upstream[2].1["delta"]);
    assert_eq!(evs[4].1["usage"]["input_tokens"], 8);
    assert_eq!(evs[4].1["usage"]["cache_read_input_tokens"], 4);
    let mut acc = Accumulator::default();
    canon.iter().for_each(|e| acc.push(e));
    let whole = render_response(&acc.finish(), served);
    assert_eq!(whole["id"], "msg_9");
    assert_eq!(whole["content"], json!([{"type": "text", "text": "Hello"}]));
    assert_eq!(whole["stop_reason"], "end_turn");
    assert_eq!(whole["usage"]["input_tokens"], 8);
    assert_eq!(whole["usage"]["cache_read_input_tokens"], 4);
    assert_eq!(whole["usage"]["service_tier"], "priority");
}
