#![allow(clippy::unwrap_used, clippy::expect_used)]

use flex_shared::catalog::Tier;
use serde_json::{json, Value};

use super::*;
use crate::canonical::{
    events_of, Effort, Media, Message, Part, Reasoning, Request, Response, ResponseFormat, Role,
    StopReason, StreamEvent, ToolCall, ToolChoice, ToolResult, Usage,
};
use crate::error::ApiError;
use crate::formats::{CallerFormat, Encoder, RawBody};
use crate::sse::Event;

fn raw(v: Value) -> RawBody {
    RawBody::parse(v.to_string().as_bytes(), CallerFormat::Interactions).unwrap()
}

fn parse(v: Value) -> Request {
    parse_request(&raw(v)).unwrap()
}

fn parse_err(v: Value) -> ApiError {
    parse_request(&raw(v)).unwrap_err()
}

fn user(text: &str) -> Message {
    Message {
        role: Role::User,
        parts: vec![Part::Text(text.into())],
    }
}

#[test]
fn string_input_and_generation_config() {
    let r = parse(json!({
        "model": "gemini-3.5-flash",
        "input": "Summarize this contract.",
        "stream": true,
        "generation_config": {"max_output_tokens": 512, "temperature": 0.2, "top_p": 0.8,
                              "thinking_level": "low", "thinking_summaries": "auto"}
    }));
    assert_eq!(r.model, "gemini-3.5-flash");
    assert_eq!(r.messages, vec![user("Summarize this contract.")]);
    assert!(r.stream);
    assert_eq!(r.max_output_tokens, Some(512));
    assert_eq!(r.temperature, Some(0.2));
    assert_eq!(r.top_p, Some(0.8));
    assert_eq!(r.reasoning, Some(Effort::Low));
    let r = parse(
        json!({"model": "m", "input": "x", "generation_config": {"thinking_level": "xhigh"}}),
    );
    assert_eq!(r.reasoning, Some(Effort::High));
    let e = parse_err(
        json!({"model": "m", "input": "x", "generation_config": {"thinking_level": "max"}}),
    );
    assert_eq!(e.param.as_deref(), Some("generation_config.thinking_level"));
}

#[test]
fn seed_and_stop_sequences_are_refused_when_set() {
    for (config, param) in [
        (json!({"seed": 7}), "generation_config.seed"),
        (
            json!({"stop_sequences": ["END"]}),
            "generation_config.stop_sequences",
        ),
    ] {
        let e = parse_err(
            json!({"model": "gemini-3.5-flash", "input": "x", "generation_config": config}),
        );
        assert_eq!(e.code, "unsupported_parameter");
        assert_eq!(e.param.as_deref(), Some(param));
        let m = e.full_message();
        assert!(m.contains("Fix:") && m.contains("Example:"), "{m}");
    }
    // Defaults are fine.
    parse(json!({"model": "m", "input": "x",
        "generation_config": {"seed": null, "stop_sequences": []}}));
    let e = parse_err(json!({"model": "m", "input": "x", "previous_interaction_id": "v1_abc"}));
    assert_eq!(e.param.as_deref(), Some("previous_interaction_id"));
    assert_eq!(parse_err(json!({"model": "m"})).code, "missing_input");
    assert_eq!(parse_err(json!({"input": "x"})).code, "missing_model");
}

#[test]
fn trap_9_system_instruction_becomes_the_system_prompt() {
    let r = parse(json!({"model": "m", "input": "hi", "system_instruction": "Be brief."}));
    assert_eq!(r.system, vec!["Be brief.".to_string()]);
    // Several canonical system prompts reach the response side untouched; the provider
    // merges them (see providers::gemini's trap 9 test).
}

#[test]
fn content_array_is_one_user_turn_with_images_and_documents() {
    let r = parse(json!({"model": "m", "input": [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "data": "iVBORw0K", "mime_type": "image/png"},
        {"type": "image", "uri": "https://example.com/cat.jpg"},
        {"type": "image", "uri": "data:image/webp;base64,UklG"},
        {"type": "document", "data": "JVBERi0x", "mime_type": "application/pdf"}
    ]}));
    assert_eq!(
        r.messages,
        vec![Message {
            role: Role::User,
            parts: vec![
                Part::Text("What is this?".into()),
                Part::Image(Media::Base64 {
                    mime: "image/png".into(),
                    data: "iVBORw0K".into()
                }),
                Part::Image(Media::Url("https://example.com/cat.jpg".into())),
                Part::Image(Media::Base64 {
                    mime: "image/webp".into(),
                    data: "UklG".into()
                }),
                Part::File {
                    media: Media::Base64 {
                        mime: "application/pdf".into(),
                        data: "JVBERi0x".into()
                    },
                    filename: None
                },
            ]
        }]
    );
    let e = parse_err(
        json!({"model": "m", "input": [{"type": "audio", "data": "AAAA", "mime_type": "audio/wav"}]}),
    );
    assert_eq!(e.code, "unsupported_parameter");
    // A single content object is accepted too.
    let r = parse(json!({"model": "m", "input": {"type": "text", "text": "solo"}}));
    assert_eq!(r.messages, vec![user("solo")]);
}

#[test]
fn steps_multi_turn_with_tools_and_parallel_results() {
    let r = parse(json!({"model": "gemini-3.5-flash", "input": [
        {"type": "user_input", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {"type": "thought", "signature": "c2lnLXQ=", "summary": [{"type": "text", "text": "Two calls."}]},
        {"type": "function_call", "id": "fc_1", "name": "get_weather",
         "arguments": {"city": "Paris"}, "signature": "c2lnLWY="},
        {"type": "function_call", "id": "fc_2", "name": "get_weather", "arguments": {"city": "Rome"}},
        {"type": "function_result", "call_id": "fc_1", "name": "get_weather", "result": {"temp": 21}},
        {"type": "function_result", "call_id": "fc_2", "result": [{"type": "text", "text": "sunny"}],
         "is_error": false},
        {"type": "model_output", "content": [{"type": "text", "text": "Paris 21, Rome sunny."}]},
        {"type": "google_search_call", "id": "gs_1", "arguments": {"queries": ["x"]}},
        {"type": "user_input", "content": [{"type": "text", "text": "Thanks!"}]}
    ],
    "tools": [{"type": "function", "name": "get_weather", "description": "Weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
              {"type": "google_search"}],
    "generation_config": {"tool_choice": {"allowed_tools": {"mode": "any", "tools": ["get_weather"]}}}
    }));
    assert_eq!(r.messages.len(), 5);
    assert_eq!(r.messages[0], user("Weather in Paris and Rome?"));
    assert_eq!(
        r.messages[1].parts,
        vec![
            Part::Reasoning(Reasoning {
                text: "Two calls.".into(),
                signature: Some("c2lnLXQ=".into()),
                redacted: None
            }),
            Part::ToolCall(ToolCall {
                id: "fc_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
                signature: Some("c2lnLWY=".into())
            }),
            Part::ToolCall(ToolCall {
                id: "fc_2".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Rome"}"#.into(),
                signature: None
            }),
        ]
    );
    // trap 3: both results in one user message.
    assert_eq!(r.messages[2].role, Role::User);
    assert_eq!(
        r.messages[2].parts,
        vec![
            Part::ToolResult(ToolResult {
                call_id: "fc_1".into(),
                name: Some("get_weather".into()),
                content: r#"{"temp":21}"#.into(),
                is_error: false
            }),
            Part::ToolResult(ToolResult {
                call_id: "fc_2".into(),
                name: None,
                content: "sunny".into(),
                is_error: false
            }),
        ]
    );
    assert_eq!(
        r.messages[3].parts,
        vec![Part::Text("Paris 21, Rome sunny.".into())]
    );
    assert_eq!(r.messages[4], user("Thanks!"));
    assert_eq!(r.tools.len(), 1);
    assert_eq!(r.tools[0].description.as_deref(), Some("Weather"));
    assert!(r.web_search);
    assert_eq!(r.tool_choice, ToolChoice::Tool("get_weather".into()));

    for (choice, want) in [
        (json!("any"), ToolChoice::Required),
        (json!("none"), ToolChoice::None),
        (json!("auto"), ToolChoice::Auto),
        (
            json!({"allowed_tools": {"mode": "any", "tools": ["a", "b"]}}),
            ToolChoice::Required,
        ),
    ] {
        let r = parse(
            json!({"model": "m", "input": "x", "generation_config": {"tool_choice": choice}}),
        );
        assert_eq!(r.tool_choice, want);
    }
    let e = parse_err(json!({"model": "m", "input": "x", "tools": [{"type": "code_execution"}]}));
    assert_eq!(
        (e.code, e.param.as_deref()),
        ("unsupported_parameter", Some("tools"))
    );
}

#[test]
fn response_formats() {
    let schema =
        json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]});
    let r = parse(json!({"model": "m", "input": "x",
        "response_format": {"type": "text", "mime_type": "application/json", "schema": schema}}));
    assert_eq!(
        r.response_format,
        Some(ResponseFormat::JsonSchema {
            name: "response".into(),
            schema: schema.clone(),
            strict: None
        })
    );
    let r = parse(json!({"model": "m", "input": "x", "response_format": schema}));
    assert!(matches!(
        r.response_format,
        Some(ResponseFormat::JsonSchema { .. })
    ));
    let r = parse(json!({"model": "m", "input": "x",
        "response_format": [{"type": "text", "mime_type": "application/json"}]}));
    assert_eq!(r.response_format, Some(ResponseFormat::JsonObject));
    let r = parse(json!({"model": "m", "input": "x", "response_mime_type": "application/json"}));
    assert_eq!(r.response_format, Some(ResponseFormat::JsonObject));
    let r = parse(
        json!({"model": "m", "input": "x", "response_format": {"type": "text", "mime_type": "text/plain"}}),
    );
    assert_eq!(r.response_format, None);
}

fn sample_response() -> Response {
    Response {
        id: "resp-1".into(),
        model: "gemini-3.5-flash".into(),
        content: vec![
            Part::Reasoning(Reasoning {
                text: "Thinking.".into(),
                signature: Some("c2ln".into()),
                redacted: None,
            }),
            Part::Text("Hello!".into()),
        ],
        stop: StopReason::EndTurn,
        usage: Usage {
            input_tokens: 1200,
            cached_input_tokens: 0,
            output_tokens: 244,
            reasoning_tokens: 64,
        },
        created: 1_750_000_000,
        provider: None,
    }
}

#[test]
fn renders_the_seed_shape() {
    let v = render_response(&sample_response(), Tier::Flex);
    assert_eq!(v["id"], "interaction_resp-1");
    assert_eq!(v["object"], "interaction");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["model"], "gemini-3.5-flash");
    assert_eq!(v["created"], "2025-06-15T15:06:40Z");
    assert!(v["updated"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v["service_tier"], "flex");
    // The seed's numbers: 1200 in, 180 out, 64 thought, 1444 total.
    assert_eq!(
        v["usage"],
        json!({"total_input_tokens": 1200, "total_output_tokens": 180,
               "total_thought_tokens": 64, "total_cached_tokens": 0,
               "total_tool_use_tokens": 0, "total_tokens": 1444})
    );
    assert_eq!(
        v["steps"],
        json!([
            {"type": "thought", "signature": "c2ln", "summary": [{"type": "text", "text": "Thinking."}]},
            {"type": "model_output", "content": [{"type": "text", "text": "Hello!"}]}
        ])
    );
    assert_eq!(
        render_response(&sample_response(), Tier::Standard)["service_tier"],
        "standard"
    );
    assert_eq!(
        render_response(&sample_response(), Tier::Priority)["service_tier"],
        "priority"
    );
}

#[test]
fn statuses() {
    let mut r = sample_response();
    r.stop = StopReason::MaxTokens;
    assert_eq!(render_response(&r, Tier::Flex)["status"], "incomplete");
    r.stop = StopReason::Error;
    assert_eq!(render_response(&r, Tier::Flex)["status"], "failed");
    r.stop = StopReason::ContentFilter;
    assert_eq!(render_response(&r, Tier::Flex)["status"], "incomplete");
    r.stop = StopReason::ToolUse;
    r.content.push(Part::ToolCall(ToolCall {
        id: "call_1".into(),
        name: "f".into(),
        arguments: r#"{"a":1}"#.into(),
        signature: Some("U0lH".into()),
    }));
    let v = render_response(&r, Tier::Flex);
    assert_eq!(v["status"], "requires_action");
    assert_eq!(
        v["steps"][2],
        json!({"type": "function_call", "id": "call_1", "name": "f",
               "arguments": {"a": 1}, "signature": "U0lH"})
    );
}

#[test]
fn round_trip_caller_body_to_canonical_to_render_and_back() {
    // Turn 1: the caller's body → canonical.
    let req = parse(
        json!({"model": "gemini-3.5-flash", "input": "Weather in Paris?",
        "tools": [{"type": "function", "name": "get_weather",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]}),
    );
    assert_eq!(req.messages, vec![user("Weather in Paris?")]);
    // The model answers with a signed call; render it.
    let resp = Response {
        id: "r1".into(),
        model: "gemini-3.5-flash".into(),
        content: vec![Part::ToolCall(ToolCall {
            id: "call_7".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
            signature: Some("U0lH".into()),
        })],
        stop: StopReason::ToolUse,
        usage: Usage::default(),
        created: 1,
        provider: None,
    };
    let rendered = render_response(&resp, Tier::Standard);
    assert_eq!(rendered["status"], "requires_action");
    // Turn 2: the caller sends the steps back with the result (the SDK idiom).
    let mut input = vec![
        json!({"type": "user_input", "content": [{"type": "text", "text": "Weather in Paris?"}]}),
    ];
    input.extend(rendered["steps"].as_array().unwrap().iter().cloned());
    input.push(json!({"type": "function_result", "call_id": "call_7", "name": "get_weather", "result": "sunny"}));
    let req2 = parse(json!({"model": "gemini-3.5-flash", "input": input}));
    assert_eq!(
        req2.messages[1].parts, resp.content,
        "the call and its signature survive"
    );
    assert!(matches!(&req2.messages[2].parts[0], Part::ToolResult(t) if t.call_id == "call_7"));
}

fn decode(events: &[Event]) -> Vec<Value> {
    events
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(e.event, v["event_type"].as_str().unwrap());
            v
        })
        .collect()
}

#[test]
fn stream_event_order_and_shapes() {
    let mut r = sample_response();
    r.content.push(Part::ToolCall(ToolCall {
        id: "call_1".into(),
        name: "f".into(),
        arguments: r#"{"a":1}"#.into(),
        signature: None,
    }));
    r.stop = StopReason::ToolUse;
    let mut enc = StreamEncoder::new(Tier::Flex, "gemini-3.5-flash");
    let mut out = Vec::new();
    for e in events_of(&r) {
        enc.encode(&e, &mut out);
    }
    let v = decode(&out);
    let kinds: Vec<&str> = v
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "interaction.created",
            "step.start",
            "step.delta",
            "step.delta",
            "step.stop",
            "step.start",
            "step.delta",
            "step.stop",
            "step.start",
            "step.delta",
            "step.stop",
            "interaction.completed"
        ]
    );
    assert_eq!(
        v[0]["interaction"],
        json!({"id": "interaction_resp-1", "object": "interaction", "status": "in_progress",
               "model": "gemini-3.5-flash", "created": "2025-06-15T15:06:40Z",
               "updated": "2025-06-15T15:06:40Z", "service_tier": "flex"})
    );
    assert_eq!(
        v[1],
        json!({"event_type": "step.start", "index": 0, "step": {"type": "thought", "summary": []}})
    );
    assert_eq!(
        v[2]["delta"],
        json!({"type": "thought_summary", "content": {"type": "text", "text": "Thinking."}})
    );
    assert_eq!(
        v[3]["delta"],
        json!({"type": "thought_signature", "signature": "c2ln"})
    );
    assert_eq!(v[4], json!({"event_type": "step.stop", "index": 0}));
    assert_eq!(v[5]["step"], json!({"type": "model_output", "content": []}));
    assert_eq!(
        v[6],
        json!({"event_type": "step.delta", "index": 1, "delta": {"type": "text", "text": "Hello!"}})
    );
    assert_eq!(
        v[8]["step"],
        json!({"type": "function_call", "id": "call_1", "name": "f", "arguments": {}})
    );
    assert_eq!(
        v[9]["delta"],
        json!({"type": "arguments_delta", "arguments": "{\"a\":1}"})
    );
    let done = &v[11]["interaction"];
    assert_eq!(done["status"], "requires_action");
    assert_eq!(done["usage"]["total_tokens"], 1444);
    assert_eq!(done["service_tier"], "flex");
    assert_eq!(done["steps"].as_array().unwrap().len(), 3);
    assert_eq!(done["steps"][2]["arguments"], json!({"a": 1}));
}

#[test]
fn stream_errors_and_fragments() {
    let mut enc = StreamEncoder::new(Tier::Standard, "gpt-5.5");
    let mut out = Vec::new();
    for e in [
        StreamEvent::Start {
            id: "x".into(),
            model: "gpt-5.5-2026".into(),
            created: 2,
            provider: None,
        },
        StreamEvent::ToolCallStart {
            index: 3,
            id: "c".into(),
            name: "f".into(),
            signature: None,
        },
        StreamEvent::ToolCallDelta {
            index: 3,
            arguments: "{\"a\":".into(),
        },
        StreamEvent::ToolCallDelta {
            index: 3,
            arguments: "1}".into(),
        },
        StreamEvent::Error {
            message: "boom".into(),
        },
        StreamEvent::Finish {
            stop: StopReason::ToolUse,
            usage: Usage {
                input_tokens: 3,
                output_tokens: 2,
                ..Usage::default()
            },
        },
        StreamEvent::TextDelta {
            index: 9,
            text: "after the end".into(),
        },
    ] {
        enc.encode(&e, &mut out);
    }
    let v = decode(&out);
    let kinds: Vec<&str> = v
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "interaction.created",
            "step.start",
            "step.delta",
            "step.delta",
            "error",
            "step.stop",
            "interaction.completed"
        ]
    );
    assert_eq!(v[0]["interaction"]["model"], "gpt-5.5");
    assert_eq!(v[1]["index"], 0);
    assert_eq!(
        v[4]["error"],
        json!({"code": "upstream_error", "message": "boom"})
    );
    let done = &v[6]["interaction"];
    assert_eq!(done["status"], "failed");
    assert_eq!(done["steps"][0]["arguments"], json!({"a": 1}));
    assert_eq!(done["usage"]["total_tokens"], 5);
    assert_eq!(done["service_tier"], "standard");
}

#[test]
fn iso_dates() {
    assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
    assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(iso8601(1_750_000_000), "2025-06-15T15:06:40Z");
}
