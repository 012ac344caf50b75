//! Anthropic: `POST /v1/messages`, a Message object or the `message_*` / `content_block_*`
//! event stream. Tiers: `service_tier` `auto` (served standard, or priority when a directive
//! says `served_tier=priority`) and `standard_only`; reported in `usage.service_tier`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{json, Value};

use super::answer::{count_words, random_hex, texts_of, Answer, Conversation, ToolCall, ToolSpec};
use super::engine::{
    bearer, check_key, header, Admission, ErrorKind, KeyProblem, Knobs, SimError, SimState,
};
use super::sse::Script;
use super::stats::{Provider, Tier};

pub(crate) async fn handle(
    State(state): State<SimState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = format!("req_{}", random_hex());
    serve(&state, &headers, &body, &request_id)
        .await
        .unwrap_or_else(|err| error_response(err, &request_id))
}

async fn serve(
    state: &SimState,
    headers: &HeaderMap,
    body: &[u8],
    request_id: &str,
) -> Result<Response, SimError> {
    authenticate(state, headers)?;
    let request: Value = serde_json::from_slice(body).map_err(|err| SimError::bad_json(&err))?;
    let (model, max_tokens, messages) = required_fields(&request)?;
    let conversation = conversation(&request, messages);
    let knobs = state.knobs(&conversation);
    let tier = tier(&request["service_tier"], &knobs)?;
    let admission = state.admit(Provider::Anthropic, tier, &knobs)?;
    admission.wait_head().await;
    let draft = Draft {
        id: format!("msg_{}", random_hex()),
        model,
        tier: Provider::Anthropic.served_name(tier),
        answer: Answer::new(
            &conversation,
            knobs.tool.as_deref(),
            knobs.output_tokens,
            Some(max_tokens),
        ),
        input_tokens: conversation.input_tokens,
    };
    let headers = [request_id_header(request_id)];
    if request["stream"].as_bool() == Some(true) {
        return Ok(draft.stream(admission, &headers));
    }
    admission.wait_whole_answer(draft.answer.steps()).await;
    Ok((headers, Json(draft.message())).into_response())
}

fn authenticate(state: &SimState, headers: &HeaderMap) -> Result<(), SimError> {
    let given = header(headers, "x-api-key").or_else(|| bearer(headers));
    check_key(state.config().anthropic_key.as_deref(), given).map_err(|problem| {
        SimError::unauthenticated(match problem {
            KeyProblem::Missing => "x-api-key header is required",
            KeyProblem::Wrong => "invalid x-api-key",
        })
    })
}

/// `model`, `max_tokens` and `messages`, which the API requires.
fn required_fields(request: &Value) -> Result<(&str, u64, &[Value]), SimError> {
    let missing =
        |field: &'static str| SimError::invalid(format!("{field}: Field required"), Some(field));
    let model = request["model"].as_str().ok_or_else(|| missing("model"))?;
    let max_tokens = request["max_tokens"]
        .as_u64()
        .ok_or_else(|| missing("max_tokens"))?;
    let messages = request["messages"]
        .as_array()
        .ok_or_else(|| missing("messages"))?;
    Ok((model, max_tokens, messages))
}

fn tier(requested: &Value, knobs: &Knobs) -> Result<Tier, SimError> {
    match requested {
        Value::Null => Ok(auto_tier(knobs)),
        Value::String(tier) if tier == "auto" => Ok(auto_tier(knobs)),
        Value::String(tier) if tier == "standard_only" => Ok(Tier::Standard),
        _ => Err(SimError::invalid(
            "service_tier: Input should be 'auto' or 'standard_only'",
            Some("service_tier"),
        )),
    }
}

fn auto_tier(knobs: &Knobs) -> Tier {
    match knobs.served_tier {
        Some(Tier::Priority) => Tier::Priority,
        _ => Tier::Standard,
    }
}

fn conversation<'a>(request: &'a Value, messages: &'a [Value]) -> Conversation<'a> {
    let mut conversation = Conversation::default();
    for message in messages.iter().filter(|message| message["role"] == "user") {
        texts_of(&message["content"], &["text"], &mut conversation.user_texts);
    }
    conversation.ends_with_tool_result = messages.last().is_some_and(|message| {
        message["content"]
            .as_array()
            .is_some_and(|blocks| blocks.iter().any(|block| block["type"] == "tool_result"))
    });
    if let Some(tools) = request["tools"].as_array() {
        conversation.tools = tools
            .iter()
            .filter_map(|tool| {
                Some(ToolSpec {
                    name: tool["name"].as_str()?,
                    schema: tool.get("input_schema"),
                })
            })
            .collect();
    }
    conversation.input_tokens =
        (messages.iter().map(count_words).sum::<u64>() + count_words(&request["system"])).max(1);
    conversation
}

struct Draft<'a> {
    id: String,
    model: &'a str,
    tier: &'static str,
    answer: Answer,
    input_tokens: u64,
}

impl Draft<'_> {
    fn stop_reason(&self) -> &'static str {
        match &self.answer {
            Answer::Tool(_) => "tool_use",
            Answer::Text(text) if text.truncated => "max_tokens",
            Answer::Text(_) => "end_turn",
        }
    }

    fn usage(&self, output_tokens: u64) -> Value {
        json!({
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
            "service_tier": self.tier,
        })
    }

    /// The message: whole, or as `message_start` announces it.
    fn message_object(
        &self,
        content: Vec<Value>,
        stop_reason: Option<&str>,
        output_tokens: u64,
    ) -> Value {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": null,
            "usage": self.usage(output_tokens),
        })
    }

    fn message(&self) -> Value {
        let block = match &self.answer {
            Answer::Text(text) => json!({"type": "text", "text": text.text()}),
            Answer::Tool(call) => tool_use(call, call.arguments_value()),
        };
        self.message_object(
            vec![block],
            Some(self.stop_reason()),
            self.answer.output_tokens(),
        )
    }

    fn stream(self, admission: Admission, headers: &[(HeaderName, HeaderValue)]) -> Response {
        let Admission {
            guard,
            start_delay,
            token_interval,
            ..
        } = admission;
        let mut script = Script::default();
        let start = self.message_object(Vec::new(), None, 1);
        script.typed_event("message_start", json!({"message": start}));
        script.start_content(start_delay);
        let (block, deltas): (Value, Vec<Value>) = match &self.answer {
            Answer::Text(text) => (
                json!({"type": "text", "text": ""}),
                text.pieces
                    .iter()
                    .map(|piece| json!({"type": "text_delta", "text": piece}))
                    .collect(),
            ),
            Answer::Tool(call) => (
                tool_use(call, json!({})),
                call.fragments()
                    .map(|fragment| json!({"type": "input_json_delta", "partial_json": fragment}))
                    .collect(),
            ),
        };
        script.typed_event(
            "content_block_start",
            json!({"index": 0, "content_block": block}),
        );
        script.typed_event("ping", json!({}));
        for (i, delta) in deltas.into_iter().enumerate() {
            if i > 0 {
                script.pause(token_interval);
            }
            script.typed_event("content_block_delta", json!({"index": 0, "delta": delta}));
        }
        script.typed_event("content_block_stop", json!({"index": 0}));
        script.typed_event(
            "message_delta",
            json!({
                "delta": {"stop_reason": self.stop_reason(), "stop_sequence": null},
                "usage": {"output_tokens": self.answer.output_tokens()},
            }),
        );
        script.typed_event("message_stop", json!({}));
        script.into_response(guard, headers)
    }
}

fn tool_use(call: &ToolCall, input: Value) -> Value {
    json!({
        "type": "tool_use",
        "id": format!("toolu_{}", call.id_suffix),
        "name": call.name,
        "input": input,
    })
}

fn request_id_header(request_id: &str) -> (HeaderName, HeaderValue) {
    let value = HeaderValue::from_str(request_id).unwrap_or(HeaderValue::from_static("req_sim"));
    (HeaderName::from_static("request-id"), value)
}

/// `{"type":"error","error":{"type","message"},"request_id"}` with the error's status.
fn error_response(err: SimError, request_id: &str) -> Response {
    let kind = match err.kind {
        ErrorKind::InvalidRequest => "invalid_request_error",
        ErrorKind::Authentication => "authentication_error",
        ErrorKind::Permission => "permission_error",
        ErrorKind::NotFound => "not_found_error",
        ErrorKind::RateLimit | ErrorKind::Capacity => "rate_limit_error",
        ErrorKind::Overloaded => "overloaded_error",
        ErrorKind::Server => "api_error",
    };
    let kind = err.code.as_deref().unwrap_or(kind);
    let body = json!({
        "type": "error",
        "error": {"type": kind, "message": err.message},
        "request_id": request_id,
    });
    let mut resp = (err.status, [request_id_header(request_id)], Json(body)).into_response();
    super::engine::error_extras(&err, &mut resp);
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::sim::test_util::TestSim;
    use crate::sim::SimConfig;

    fn request(text: &str) -> Value {
        json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "system": "be nice",
            "messages": [{"role": "user", "content": text}]})
    }

    #[tokio::test]
    async fn non_stream_message_and_tiers() {
        let sim = TestSim::start(SimConfig::default()).await;
        let (status, reply) = sim
            .post_json("/v1/messages", vec![], &request("hi #sim output_tokens=2"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(reply["type"], "message");
        assert_eq!(reply["content"][0]["text"], "Simulated answer");
        assert_eq!(reply["stop_reason"], "end_turn");
        assert_eq!(reply["usage"]["service_tier"], "standard");
        assert_eq!(reply["usage"]["input_tokens"], 5);
        let mut priority = request("#sim served_tier=priority");
        priority["service_tier"] = json!("auto");
        let (_, reply) = sim.post_json("/v1/messages", vec![], &priority).await;
        assert_eq!(reply["usage"]["service_tier"], "priority");
        priority["service_tier"] = json!("standard_only");
        let (_, reply) = sim.post_json("/v1/messages", vec![], &priority).await;
        assert_eq!(reply["usage"]["service_tier"], "standard");
        let stats = sim.stats();
        assert_eq!(stats.requests("anthropic:standard"), 2);
        assert_eq!(stats.requests("anthropic:priority"), 1);
    }

    #[tokio::test]
    async fn stream_events() {
        let sim = TestSim::start(SimConfig::default()).await;
        let mut body = request("hi #sim output_tokens=3");
        body["stream"] = json!(true);
        let events = sim.post("/v1/messages", vec![], &body).await.events();
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        for (name, data) in &events {
            assert_eq!(data["type"], name.as_deref().unwrap());
        }
        assert_eq!(events[0].1["message"]["usage"]["service_tier"], "standard");
        assert_eq!(
            events[3].1["delta"],
            json!({"type": "text_delta", "text": "Simulated"})
        );
        assert_eq!(events[7].1["delta"]["stop_reason"], "end_turn");
        assert_eq!(events[7].1["usage"]["output_tokens"], 3);
    }

    #[tokio::test]
    async fn tool_use_stream() {
        let sim = TestSim::start(SimConfig::default()).await;
        let mut body = request("weather? #sim tool=get_weather");
        body["tools"] = json!([{"name": "get_weather", "input_schema": {"type": "object",
            "properties": {"location": {"type": "string"}}, "required": ["location"]}}]);
        let (_, reply) = sim.post_json("/v1/messages", vec![], &body).await;
        assert_eq!(reply["stop_reason"], "tool_use");
        assert_eq!(reply["content"][0]["input"], json!({"location": "Paris"}));
        assert!(reply["content"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("toolu_"));
        body["stream"] = json!(true);
        let events = sim.post("/v1/messages", vec![], &body).await.events();
        assert_eq!(events[1].1["content_block"]["type"], "tool_use");
        assert_eq!(events[1].1["content_block"]["input"], json!({}));
        let json: String = events
            .iter()
            .filter(|(_, d)| d["delta"]["type"] == "input_json_delta")
            .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(json, r#"{"location":"Paris"}"#);
    }

    #[tokio::test]
    async fn errors_in_anthropic_envelope() {
        let sim = TestSim::start(SimConfig {
            anthropic_key: Some("sk-ant-good".into()),
            ..SimConfig::default()
        })
        .await;
        let good = || vec![("x-api-key", "sk-ant-good".to_owned())];
        let mut body = request("hi");
        body.as_object_mut().unwrap().remove("max_tokens");
        let reply = sim.post("/v1/messages", good(), &body).await;
        assert_eq!(reply.status, 400);
        let json = reply.json();
        assert_eq!(json["type"], "error");
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert!(json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"));
        assert_eq!(
            json["request_id"],
            reply.headers["request-id"].to_str().unwrap()
        );

        let (status, json) = sim
            .post_json(
                "/v1/messages",
                vec![("x-api-key", "nope".into())],
                &request("hi"),
            )
            .await;
        assert_eq!(
            (status, json["error"]["type"].as_str()),
            (401, Some("authentication_error"))
        );
        let bearer = vec![("authorization", "Bearer sk-ant-good".to_owned())];
        let (status, _) = sim.post_json("/v1/messages", bearer, &request("hi")).await;
        assert_eq!(status, 200);
        let (status, json) = sim
            .post_json("/v1/messages", good(), &request("#sim status=529"))
            .await;
        assert_eq!(
            (status, json["error"]["type"].as_str()),
            (529, Some("overloaded_error"))
        );
    }
}
