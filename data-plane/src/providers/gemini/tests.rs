#![allow(clippy::unwrap_used, clippy::expect_used)]

use flex_shared::catalog::Tier;
use http::StatusCode;
use secrecy::SecretString;
use serde_json::{json, Value};

use super::*;
use crate::canonical::{
    Accumulator, Effort, Media, Message, Part, Reasoning, Request, Response, ResponseFormat, Role,
    StopReason, StreamEvent, Tool, ToolCall, ToolChoice, ToolResult, Usage,
};
use crate::providers::{AskTier, Decoder};
use crate::race::EventClass;
use crate::sse::Event;

fn user(text: &str) -> Message {
    Message {
        role: Role::User,
        parts: vec![Part::Text(text.into())],
    }
}

fn req(model: &str, messages: Vec<Message>) -> Request {
    Request {
        model: model.into(),
        messages,
        ..Request::default()
    }
}

fn call(id: &str, name: &str, args: &str, sig: Option<&str>) -> Part {
    Part::ToolCall(ToolCall {
        id: id.into(),
        name: name.into(),
        arguments: args.into(),
        signature: sig.map(Into::into),
    })
}

fn result(id: &str, name: Option<&str>, content: &str) -> Part {
    Part::ToolResult(ToolResult {
        call_id: id.into(),
        name: name.map(Into::into),
        content: content.into(),
        is_error: false,
    })
}

fn decode_all(lines: &[Value]) -> (Vec<StreamEvent>, StreamDecoder) {
    let mut d = StreamDecoder::new();
    let mut out = Vec::new();
    for l in lines {
        d.decode(&Event::new("", l.to_string()), &mut out);
    }
    (out, d)
}

fn accumulate(events: &[StreamEvent]) -> Response {
    let mut acc = Accumulator::default();
    for e in events {
        acc.push(e);
    }
    assert!(acc.finished, "no Finish in {events:?}");
    acc.finish()
}

#[test]
fn golden_text() {
    let mut r = req("gemini-3.5-flash", vec![user("Hello!")]);
    r.max_output_tokens = Some(100);
    r.temperature = Some(0.5);
    r.top_p = Some(0.9);
    assert_eq!(
        body(&r, AskTier::Flex).unwrap(),
        json!({
            "contents": [{"role": "user", "parts": [{"text": "Hello!"}]}],
            "generationConfig": {"maxOutputTokens": 100, "temperature": 0.5, "topP": 0.9},
            "serviceTier": "flex"
        })
    );
}

#[test]
fn tiers_map_and_auto_is_an_internal_error() {
    let r = req("gemini-2.5-flash", vec![user("x")]);
    assert_eq!(
        body(&r, AskTier::Standard).unwrap()["serviceTier"],
        "standard"
    );
    assert_eq!(
        body(&r, AskTier::Priority).unwrap()["serviceTier"],
        "priority"
    );
    let e = body(&r, AskTier::Auto).unwrap_err();
    assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(served_tier("flex"), Some(Tier::Flex));
    assert_eq!(served_tier("SERVICE_TIER_PRIORITY"), Some(Tier::Priority));
    assert_eq!(served_tier("Standard"), Some(Tier::Standard));
    assert_eq!(served_tier("turbo"), None);
}

#[test]
fn request_has_url_key_and_body() {
    let key = SecretString::from("AIza-test".to_string());
    let r = req("gemini-2.5-flash", vec![user("hi")]);
    let http = request("http://sim:1/", &r, AskTier::Flex, &key).unwrap();
    assert_eq!(
        http.uri().to_string(),
        "http://sim:1/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    );
    assert_eq!(http.headers()["x-goog-api-key"], "AIza-test");
    assert!(
        http.headers()["x-goog-api-key"].is_sensitive(),
        "kept out of HTTP/2's header compression"
    );
    assert_eq!(http.headers()["accept"], "text/event-stream");
    assert_eq!(http.method(), http::Method::POST);
    assert_eq!(
        url("https://g.example/v1beta", "models/gemini-3.5-flash").unwrap(),
        "https://g.example/v1beta/models/gemini-3.5-flash:streamGenerateContent?alt=sse"
    );
    let bad = req("gemini/../x", vec![user("hi")]);
    assert_eq!(
        request("http://sim", &bad, AskTier::Flex, &key)
            .unwrap_err()
            .code,
        "invalid_request"
    );
}

#[test]
fn trap_9_several_system_prompts_merged_in_order() {
    let mut r = req("gemini-3.5-flash", vec![user("hi")]);
    r.system = vec!["Be brief.".into(), "Answer in French.".into()];
    assert_eq!(
        body(&r, AskTier::Standard).unwrap()["systemInstruction"],
        json!({"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]})
    );
}

#[test]
fn golden_multi_turn() {
    let r = req(
        "gemini-2.5-flash",
        vec![
            user("Hi"),
            Message {
                role: Role::Assistant,
                parts: vec![
                    Part::Reasoning(Reasoning {
                        text: "greet".into(),
                        signature: Some("anthropic-sig".into()),
                        redacted: None,
                    }),
                    Part::Text("Hello! How can I help?".into()),
                ],
            },
            user("Tell me a joke."),
            user("A short one."),
        ],
    );
    assert_eq!(
        body(&r, AskTier::Standard).unwrap()["contents"],
        json!([
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Hello! How can I help?"}]},
            {"role": "user", "parts": [{"text": "Tell me a joke."}, {"text": "A short one."}]}
        ])
    );
}

#[test]
fn golden_tools_and_tool_choice() {
    let mut r = req("gemini-2.5-flash", vec![user("Weather in Paris?")]);
    r.tools = vec![
        Tool {
            name: "get_weather".into(),
            description: Some("Current weather".into()),
            parameters: json!({
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": false
            }),
            strict: Some(true),
        },
        Tool {
            name: "now".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {}}),
            strict: None,
        },
    ];
    r.web_search = true;
    r.tool_choice = ToolChoice::Tool("get_weather".into());
    let b = body(&r, AskTier::Flex).unwrap();
    assert_eq!(
        b["tools"],
        json!([
            {"functionDeclarations": [
                {"name": "get_weather", "description": "Current weather",
                 "parametersJsonSchema": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                    "additionalProperties": false}},
                {"name": "now"}
            ]},
            {"googleSearch": {}}
        ])
    );
    assert_eq!(
        b["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
    );
    for (choice, mode) in [(ToolChoice::Required, "ANY"), (ToolChoice::None, "NONE")] {
        r.tool_choice = choice;
        let b = body(&r, AskTier::Flex).unwrap();
        assert_eq!(
            b["toolConfig"],
            json!({"functionCallingConfig": {"mode": mode}})
        );
    }
    r.tool_choice = ToolChoice::Auto;
    assert!(body(&r, AskTier::Flex).unwrap().get("toolConfig").is_none());
}

#[test]
fn trap_3_parallel_tool_results_in_one_user_message() {
    // The caller sent one message per result (Chat style) with no names: they are merged
    // into one user turn and named from the calls.
    let r = req(
        "gemini-2.5-flash",
        vec![
            user("Weather in Paris and Rome?"),
            Message {
                role: Role::Assistant,
                parts: vec![
                    call("call_1", "get_weather", r#"{"city":"Paris"}"#, None),
                    call("call_2", "get_weather", r#"{"city":"Rome"}"#, None),
                ],
            },
            Message {
                role: Role::User,
                parts: vec![result("call_1", None, r#"{"temp":21}"#)],
            },
            Message {
                role: Role::User,
                parts: vec![result("call_2", None, "sunny")],
            },
        ],
    );
    let c = body(&r, AskTier::Flex).unwrap()["contents"].clone();
    assert_eq!(
        c,
        json!([
            {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
            {"role": "model", "parts": [
                {"functionCall": {"id": "call_1", "name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"id": "call_2", "name": "get_weather", "args": {"city": "Rome"}}}
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"id": "call_1", "name": "get_weather", "response": {"result": {"temp": 21}}}},
                {"functionResponse": {"id": "call_2", "name": "get_weather", "response": {"result": "sunny"}}}
            ]}
        ])
    );
    // A result whose call is unknown cannot be named: refused with a fix.
    let orphan = req(
        "gemini-2.5-flash",
        vec![Message {
            role: Role::User,
            parts: vec![result("call_9", None, "x")],
        }],
    );
    let e = body(&orphan, AskTier::Flex).unwrap_err();
    assert_eq!(e.code, "invalid_request");
    assert!(e.full_message().contains("Example:"));
    // An error result goes back under `error`.
    let err = req(
        "gemini-2.5-flash",
        vec![Message {
            role: Role::User,
            parts: vec![Part::ToolResult(ToolResult {
                call_id: String::new(),
                name: Some("f".into()),
                content: "boom".into(),
                is_error: true,
            })],
        }],
    );
    assert_eq!(
        body(&err, AskTier::Flex).unwrap()["contents"][0]["parts"][0],
        json!({"functionResponse": {"name": "f", "response": {"error": "boom"}}})
    );
}

#[test]
fn trap_2_thought_signature_rides_on_function_calls() {
    let assistant = Message {
        role: Role::Assistant,
        parts: vec![
            call("c1", "f", "{}", Some("c2lnLTE=")),
            call("c2", "g", "{}", None),
        ],
    };
    let r = req("gemini-3.5-flash", vec![user("go"), assistant.clone()]);
    let parts = body(&r, AskTier::Flex).unwrap()["contents"][1]["parts"].clone();
    assert_eq!(parts[0]["thoughtSignature"], "c2lnLTE=");
    assert_eq!(parts[0]["functionCall"]["id"], "c1");
    assert!(parts[1].get("thoughtSignature").is_none());
    // The signature never leaks into the call id.
    assert!(!parts[0]["functionCall"]["id"]
        .as_str()
        .unwrap()
        .contains("c2lnLTE"));

    // History from another provider has no signatures: Gemini 3 gets the placeholder on the
    // first call of each step, Gemini 2.5 gets nothing.
    let foreign = Message {
        role: Role::Assistant,
        parts: vec![
            call("toolu_1", "f", "{}", None),
            call("toolu_2", "g", "{}", None),
        ],
    };
    let r = req("gemini-3.5-flash", vec![user("go"), foreign.clone()]);
    let parts = body(&r, AskTier::Flex).unwrap()["contents"][1]["parts"].clone();
    assert_eq!(parts[0]["thoughtSignature"], PLACEHOLDER_SIGNATURE);
    assert!(parts[1].get("thoughtSignature").is_none());
    let r = req("gemini-2.5-flash", vec![user("go"), foreign]);
    let parts = body(&r, AskTier::Flex).unwrap()["contents"][1]["parts"].clone();
    assert!(parts[0].get("thoughtSignature").is_none());

    // Decoding: the signature comes back on the call, the id is generated when absent.
    let (events, _) = decode_all(&[json!({
        "candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "U0lH"}
        ]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2}
    })]);
    let resp = accumulate(&events);
    let Part::ToolCall(c) = &resp.content[0] else {
        panic!("{resp:?}")
    };
    assert_eq!(c.signature.as_deref(), Some("U0lH"));
    assert!(c.id.starts_with("call_"));
    assert_ne!(c.id, "U0lH");
}

#[test]
fn trap_8_images_data_url_and_url() {
    let r = req(
        "gemini-2.5-flash",
        vec![Message {
            role: Role::User,
            parts: vec![
                Part::Text("What is in these?".into()),
                Part::Image(Media::from_url("data:image/png;base64,iVBORw0K")),
                Part::Image(Media::from_url("https://example.com/cat.JPG?size=large")),
                Part::Image(Media::from_url("https://example.com/image")),
                Part::File {
                    media: Media::from_url("data:application/pdf;base64,JVBERi0x"),
                    filename: Some("contract.pdf".into()),
                },
                Part::File {
                    media: Media::Url("https://example.com/download?id=7".into()),
                    filename: Some("report.pdf".into()),
                },
            ],
        }],
    );
    assert_eq!(
        body(&r, AskTier::Flex).unwrap()["contents"][0]["parts"],
        json!([
            {"text": "What is in these?"},
            {"inlineData": {"mimeType": "image/png", "data": "iVBORw0K"}},
            {"fileData": {"fileUri": "https://example.com/cat.JPG?size=large", "mimeType": "image/jpeg"}},
            {"fileData": {"fileUri": "https://example.com/image", "mimeType": "application/octet-stream"}},
            {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0x"}},
            {"fileData": {"fileUri": "https://example.com/download?id=7", "mimeType": "application/pdf"}}
        ])
    );
}

#[test]
fn golden_structured_output() {
    let mut r = req("gemini-2.5-flash", vec![user("A person")]);
    r.response_format = Some(ResponseFormat::JsonSchema {
        name: "person".into(),
        schema: json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": false
        }),
        strict: Some(true),
    });
    assert_eq!(
        body(&r, AskTier::Flex).unwrap()["generationConfig"],
        json!({
            "responseMimeType": "application/json",
            "responseJsonSchema": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"],
                "additionalProperties": false
            }
        })
    );
    r.response_format = Some(ResponseFormat::JsonObject);
    assert_eq!(
        body(&r, AskTier::Flex).unwrap()["generationConfig"],
        json!({"responseMimeType": "application/json"})
    );
}

#[test]
fn golden_reasoning_effort_per_model() {
    let level = |model: &str, e: Effort| {
        let mut r = req(model, vec![user("think")]);
        r.reasoning = Some(e);
        body(&r, AskTier::Flex).unwrap()["generationConfig"]
            .get("thinkingConfig")
            .cloned()
    };
    assert_eq!(
        level("gemini-3.5-flash", Effort::Medium),
        Some(json!({"thinkingLevel": "medium", "includeThoughts": true}))
    );
    assert_eq!(
        level("gemini-3-flash-preview", Effort::Minimal).unwrap()["thinkingLevel"],
        "minimal"
    );
    assert_eq!(
        level("gemini-3.1-flash-lite", Effort::Minimal).unwrap()["thinkingLevel"],
        "minimal"
    );
    // 3.1 Pro: no minimal.
    assert_eq!(
        level("gemini-3.1-pro-preview", Effort::Minimal).unwrap()["thinkingLevel"],
        "low"
    );
    assert_eq!(
        level("gemini-3.1-pro-preview", Effort::Medium).unwrap()["thinkingLevel"],
        "medium"
    );
    // 3 Pro: low | high.
    assert_eq!(
        level("gemini-3-pro-preview", Effort::Medium).unwrap()["thinkingLevel"],
        "high"
    );
    assert_eq!(
        level("gemini-3-pro-preview", Effort::Minimal).unwrap()["thinkingLevel"],
        "low"
    );
    // 2.5: a token budget.
    assert_eq!(
        level("gemini-2.5-pro", Effort::High),
        Some(json!({"thinkingBudget": 24576, "includeThoughts": true}))
    );
    assert_eq!(
        level("gemini-2.5-flash-lite", Effort::Low).unwrap()["thinkingBudget"],
        2048
    );
    // 2.0: no thinking at all.
    assert_eq!(level("gemini-2.0-flash", Effort::High), None);
}

fn text_chunk(text: &str, finish: Option<&str>, out: u64) -> Value {
    let mut c = json!({"content": {"role": "model", "parts": [{"text": text}]}, "index": 0});
    if let Some(f) = finish {
        c["finishReason"] = json!(f);
    }
    json!({
        "candidates": [c],
        "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": out,
                          "totalTokenCount": 12 + out, "serviceTier": "flex"},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "resp-1"
    })
}

#[test]
fn decodes_a_text_stream() {
    let (events, d) = decode_all(&[
        text_chunk("Hello", None, 1),
        text_chunk(", world", None, 2),
        text_chunk("!", Some("STOP"), 3),
    ]);
    assert!(matches!(&events[0], StreamEvent::Start { id, model, .. }
        if id == "resp-1" && model == "gemini-2.5-flash"));
    assert_eq!(
        events[1..].to_vec(),
        vec![
            StreamEvent::TextStart { index: 0 },
            StreamEvent::TextDelta {
                index: 0,
                text: "Hello".into()
            },
            StreamEvent::TextDelta {
                index: 0,
                text: ", world".into()
            },
            StreamEvent::TextDelta {
                index: 0,
                text: "!".into()
            },
            StreamEvent::BlockStop { index: 0 },
            StreamEvent::Finish {
                stop: StopReason::EndTurn,
                usage: Usage {
                    input_tokens: 12,
                    cached_input_tokens: 0,
                    output_tokens: 3,
                    reasoning_tokens: 0
                }
            },
        ]
    );
    assert_eq!(d.served_tier(), Some(Tier::Flex));
    let r = accumulate(&events);
    assert_eq!(r.content, vec![Part::Text("Hello, world!".into())]);
    assert_eq!(r.usage.total(), 15);
}

#[test]
fn trap_6_usage_candidates_exclude_thoughts_and_cached_is_inside_input() {
    let (events, _) = decode_all(&[json!({
        "candidates": [{"content": {"parts": [{"text": "ok"}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 100, "cachedContentTokenCount": 40,
                          "candidatesTokenCount": 10, "thoughtsTokenCount": 25,
                          "toolUsePromptTokenCount": 5, "totalTokenCount": 140}
    })]);
    let r = accumulate(&events);
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 105,
            cached_input_tokens: 40,
            output_tokens: 35,
            reasoning_tokens: 25
        }
    );
    // The canonical total equals Gemini's totalTokenCount.
    assert_eq!(r.usage.total(), 140);
}

#[test]
fn decodes_thinking_then_text_with_signature() {
    let (events, _) = decode_all(&[
        json!({"candidates": [{"content": {"role": "model", "parts": [
            {"text": "Let me think", "thought": true}]}}], "responseId": "r"}),
        json!({"candidates": [{"content": {"role": "model", "parts": [
            {"text": " harder.", "thought": true, "thoughtSignature": "dGhvdWdodA=="}]}}]}),
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "42"}]},
            "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1,
                              "thoughtsTokenCount": 30}}),
    ]);
    assert_eq!(
        events[1..].to_vec(),
        vec![
            StreamEvent::ReasoningStart { index: 0 },
            StreamEvent::ReasoningDelta {
                index: 0,
                text: "Let me think".into()
            },
            StreamEvent::ReasoningDelta {
                index: 0,
                text: " harder.".into()
            },
            StreamEvent::ReasoningSignature {
                index: 0,
                signature: "dGhvdWdodA==".into()
            },
            StreamEvent::BlockStop { index: 0 },
            StreamEvent::TextStart { index: 1 },
            StreamEvent::TextDelta {
                index: 1,
                text: "42".into()
            },
            StreamEvent::BlockStop { index: 1 },
            StreamEvent::Finish {
                stop: StopReason::EndTurn,
                usage: Usage {
                    input_tokens: 5,
                    cached_input_tokens: 0,
                    output_tokens: 31,
                    reasoning_tokens: 30
                }
            },
        ]
    );
    let r = accumulate(&events);
    assert_eq!(
        r.content[0],
        Part::Reasoning(Reasoning {
            text: "Let me think harder.".into(),
            signature: Some("dGhvdWdodA==".into()),
            redacted: None
        })
    );
}

#[test]
fn trap_5_stop_after_function_call_in_an_earlier_chunk_is_tool_use() {
    let (events, _) = decode_all(&[
        json!({"candidates": [{"content": {"role": "model", "parts": [
            {"text": "Checking."},
            {"functionCall": {"id": "fc_1", "name": "get_weather", "args": {"city": "Paris"}},
             "thoughtSignature": "c2ln"},
            {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}
        ]}}], "responseId": "r2"}),
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]},
            "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 15}}),
    ]);
    let last = events.last().unwrap();
    assert!(matches!(
        last,
        StreamEvent::Finish {
            stop: StopReason::ToolUse,
            ..
        }
    ));
    // Every block is closed before the next opens (trap 7), arguments are whole JSON text.
    assert!(matches!(events[1], StreamEvent::TextStart { index: 0 }));
    assert!(matches!(events[3], StreamEvent::BlockStop { index: 0 }));
    assert!(
        matches!(&events[4], StreamEvent::ToolCallStart { index: 1, id, signature: Some(s), .. }
        if id == "fc_1" && s == "c2ln")
    );
    let r = accumulate(&events);
    assert_eq!(r.stop, StopReason::ToolUse);
    assert_eq!(r.content.len(), 3);
    let Part::ToolCall(c2) = &r.content[2] else {
        panic!()
    };
    assert_eq!(c2.arguments, r#"{"city":"Rome"}"#);
    assert!(!c2.id.is_empty());
    assert_eq!(r.usage.output_tokens, 15);
}

#[test]
fn trap_7_tool_call_is_one_complete_block_and_finish_carries_real_usage() {
    let (events, _) = decode_all(&[json!({
        "candidates": [{"content": {"parts": [
            {"functionCall": {"name": "now", "args": {}}}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3}
    })]);
    assert_eq!(
        events[1..4].to_vec(),
        vec![
            match &events[1] {
                StreamEvent::ToolCallStart { id, .. } => StreamEvent::ToolCallStart {
                    index: 0,
                    id: id.clone(),
                    name: "now".into(),
                    signature: None
                },
                other => panic!("{other:?}"),
            },
            StreamEvent::ToolCallDelta {
                index: 0,
                arguments: "{}".into()
            },
            StreamEvent::BlockStop { index: 0 },
        ]
    );
    assert!(matches!(events[4], StreamEvent::Finish { usage, .. } if usage.total() == 10));
}

#[test]
fn finish_reasons_map() {
    assert_eq!(stop_reason("MAX_TOKENS", true), StopReason::MaxTokens);
    assert_eq!(stop_reason("SAFETY", false), StopReason::ContentFilter);
    assert_eq!(
        stop_reason("PROHIBITED_CONTENT", false),
        StopReason::ContentFilter
    );
    assert_eq!(stop_reason("RECITATION", false), StopReason::ContentFilter);
    assert_eq!(
        stop_reason("MALFORMED_FUNCTION_CALL", false),
        StopReason::Error
    );
    assert_eq!(stop_reason("STOP", false), StopReason::EndTurn);
    assert_eq!(stop_reason("OTHER", false), StopReason::EndTurn);
    let (events, _) = decode_all(&[json!({
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 4}
    })]);
    assert!(matches!(
        events.last().unwrap(),
        StreamEvent::Finish {
            stop: StopReason::ContentFilter,
            usage
        } if usage.input_tokens == 4
    ));
}

#[test]
fn in_stream_errors_and_classification() {
    let cap = Event::new(
        "",
        r#"{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED"}}"#,
    );
    assert_eq!(classify(&cap), EventClass::CapacityError);
    let unavailable = Event::new(
        "",
        r#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#,
    );
    assert_eq!(classify(&unavailable), EventClass::CapacityError);
    let bad = Event::new(
        "",
        r#"{"error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}"#,
    );
    assert_eq!(classify(&bad), EventClass::Error);
    assert_eq!(
        classify(&Event::new("", text_chunk("hi", None, 1).to_string())),
        EventClass::Start
    );
    assert_eq!(
        classify(&Event::new(
            "",
            r#"{"usageMetadata":{"promptTokenCount":3},"responseId":"x"}"#
        )),
        EventClass::Lifecycle
    );
    assert_eq!(classify(&Event::new("", "not json")), EventClass::Error);
    let mut d = StreamDecoder::new();
    let mut out = Vec::new();
    d.decode(&bad, &mut out);
    assert!(
        matches!(&out[0], StreamEvent::Error { message, .. } if message.contains("INVALID_ARGUMENT"))
    );
}

#[test]
fn max_tokens_and_chunks_after_finish_are_ignored() {
    let (events, _) = decode_all(&[
        text_chunk("cut", Some("MAX_TOKENS"), 1),
        text_chunk("late", None, 2),
    ]);
    let r = accumulate(&events);
    assert_eq!(r.stop, StopReason::MaxTokens);
    assert_eq!(r.content, vec![Part::Text("cut".into())]);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Finish { .. }))
            .count(),
        1
    );
}

/// Bytes recorded from the provider simulator (`flex sim`), through the real SSE parser.
#[test]
fn decodes_simulator_transcripts() {
    const TEXT: &str = r#"data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Simulated"}]},"index":0}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":1,"thoughtsTokenCount":0,"totalTokenCount":6,"promptTokensDetails":[{"modality":"TEXT","tokenCount":5}],"serviceTier":"flex"},"modelVersion":"gemini-3.5-flash","responseId":"796459a0b7820d4ae1798c9f"}

data: {"candidates":[{"content":{"role":"model","parts":[{"text":" answer"}]},"index":0}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":2,"thoughtsTokenCount":0,"totalTokenCount":7,"promptTokensDetails":[{"modality":"TEXT","tokenCount":5}],"serviceTier":"flex"},"modelVersion":"gemini-3.5-flash","responseId":"796459a0b7820d4ae1798c9f"}

data: {"candidates":[{"content":{"role":"model","parts":[{"text":" word1"}]},"index":0,"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":3,"thoughtsTokenCount":0,"totalTokenCount":8,"promptTokensDetails":[{"modality":"TEXT","tokenCount":5}],"serviceTier":"flex"},"modelVersion":"gemini-3.5-flash","responseId":"796459a0b7820d4ae1798c9f"}

"#;
    const TOOL: &str = r#"data: {"candidates":[{"content":{"role":"model","parts":[{"functionCall":{"name":"get_weather","args":{"location":"Paris"}}}]},"index":0,"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4,"thoughtsTokenCount":0,"totalTokenCount":7,"promptTokensDetails":[{"modality":"TEXT","tokenCount":3}],"serviceTier":"standard"},"modelVersion":"gemini-3.5-flash","responseId":"a385eb9057f9a0659033a5e4"}

"#;
    let run = |raw: &str| {
        let mut parser = crate::sse::Parser::new();
        let mut evs = Vec::new();
        // Split at an awkward byte to exercise framing.
        let (a, b) = raw.as_bytes().split_at(raw.len() / 3);
        parser.feed(a, &mut evs).unwrap();
        parser.feed(b, &mut evs).unwrap();
        assert_eq!(classify(&evs[0]), EventClass::Start);
        let mut d = StreamDecoder::new();
        let mut out = Vec::new();
        for e in &evs {
            d.decode(e, &mut out);
        }
        (accumulate(&out), d.served_tier())
    };
    let (r, tier) = run(TEXT);
    assert_eq!(r.content, vec![Part::Text("Simulated answer word1".into())]);
    assert_eq!(r.stop, StopReason::EndTurn);
    assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (5, 3));
    assert_eq!(r.model, "gemini-3.5-flash");
    assert_eq!(tier, Some(Tier::Flex));
    let (r, tier) = run(TOOL);
    assert_eq!(r.stop, StopReason::ToolUse);
    let Part::ToolCall(c) = &r.content[0] else {
        panic!("{r:?}")
    };
    assert_eq!(
        (c.name.as_str(), c.arguments.as_str()),
        ("get_weather", r#"{"location":"Paris"}"#)
    );
    assert_eq!(r.usage.total(), 7);
    assert_eq!(tier, Some(Tier::Standard));
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

/// A candidate `index` past the limit ends the stream as malformed, and nothing after it is
/// decoded.
#[test]
fn a_candidate_index_past_the_limit_is_an_error() {
    for n in [
        1_000_000_000_000_u64,
        1025,
        crate::canonical::MAX_INDEX as u64,
    ] {
        let mut first = text_chunk("Hi", None, 1);
        first["candidates"][0]["index"] = json!(n);
        let (out, _) = decode_all(&[first, text_chunk(" there", Some("STOP"), 2)]);
        let why = malformed(&out).unwrap_or_else(|| panic!("{n}: {out:?}"));
        assert!(why.contains(&format!("candidate `index` {n}")), "{why}");
        assert!(
            !out.iter().any(|e| matches!(e, StreamEvent::Finish { .. })),
            "{out:?}"
        );
    }
}

/// Parts past the limit (each function call is a block of its own) end the stream too.
#[test]
fn more_parts_than_the_limit_is_an_error() {
    let parts: Vec<Value> = (0..=crate::canonical::MAX_INDEX)
        .map(|i| json!({"functionCall": {"id": format!("c{i}"), "name": "f", "args": {}}}))
        .collect();
    let chunk = json!({"candidates": [{"content": {"role": "model", "parts": parts}, "index": 0, "finishReason": "STOP"}]});
    let (out, _) = decode_all(&[chunk]);
    let why = malformed(&out).unwrap_or_else(|| panic!("{:?}", out.last()));
    assert!(why.contains("more than 1024 content parts"), "{why}");
    assert!(
        !out.iter().any(|e| matches!(e, StreamEvent::Finish { .. })),
        "refused before its finish reason"
    );
}
