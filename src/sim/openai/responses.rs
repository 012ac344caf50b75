//! `POST /v1/responses`: a Response object, or the `response.*` event stream.

use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use http::HeaderMap;
use serde_json::{json, Map, Value};

use super::{error_response, json_response, parse_request, request_id_header, tier, tier_name};
use crate::sim::answer::{
    count_words, random_hex, texts_of, unix_now, Answer, Conversation, ToolSpec,
};
use crate::sim::engine::{Admission, SimError, SimState};
use crate::sim::sse::Script;
use crate::sim::stats::Provider;

pub(crate) async fn handle(
    State(state): State<SimState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve(&state, &headers, &body)
        .await
        .unwrap_or_else(error_response)
}

async fn serve(state: &SimState, headers: &HeaderMap, body: &[u8]) -> Result<Response, SimError> {
    let request = parse_request(state, headers, body)?;
    let conversation = conversation(&request);
    let knobs = state.knobs(&conversation);
    let tier = tier(request.get("service_tier"), &knobs)?;
    let admission = state.admit(Provider::OpenAi, tier, &knobs)?;
    admission.wait_head().await;
    let max_tokens = request.get("max_output_tokens").and_then(Value::as_u64);
    let draft = Draft {
        request: &request,
        id: format!("resp_{}", random_hex()),
        created_at: unix_now(),
        tier: tier_name(tier),
        answer: Answer::new(
            &conversation,
            knobs.tool.as_deref(),
            knobs.output_tokens,
            max_tokens,
        ),
        input_tokens: conversation.input_tokens,
    };
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        return Ok(draft.stream(admission));
    }
    admission.wait_whole_answer(draft.answer.steps()).await;
    Ok(json_response(draft.response(true)))
}

fn conversation(request: &Value) -> Conversation<'_> {
    let mut conversation = Conversation::default();
    let input = &request["input"];
    match input {
        Value::String(text) => conversation.user_texts.push(text),
        Value::Array(items) => {
            for item in items.iter().filter(|item| item["role"] == "user") {
                texts_of(
                    &item["content"],
                    &["input_text"],
                    &mut conversation.user_texts,
                );
            }
            conversation.ends_with_tool_result = items
                .last()
                .is_some_and(|item| item["type"] == "function_call_output");
        }
        _ => {}
    }
    if let Some(tools) = request["tools"].as_array() {
        conversation.tools = tools
            .iter()
            .filter(|tool| tool["type"] == "function")
            .filter_map(|tool| {
                Some(ToolSpec {
                    name: tool["name"].as_str()?,
                    schema: tool.get("parameters"),
                })
            })
            .collect();
    }
    conversation.input_tokens = (count_words(input) + count_words(&request["instructions"])).max(1);
    conversation
}

/// The answer to one request, rendered as a body or as events.
struct Draft<'a> {
    request: &'a Value,
    id: String,
    created_at: u64,
    tier: &'static str,
    answer: Answer,
    input_tokens: u64,
}

impl Draft<'_> {
    fn truncated(&self) -> bool {
        matches!(&self.answer, Answer::Text(text) if text.truncated)
    }

    fn item_id(&self) -> String {
        match &self.answer {
            Answer::Text(_) => format!("msg_{}", &self.id["resp_".len()..]),
            Answer::Tool(call) => format!("fc_{}", call.id_suffix),
        }
    }

    /// A request field echoed back, or its default.
    fn echo(&self, key: &str, default: Value) -> Value {
        match self.request.get(key) {
            Some(value) if !value.is_null() => value.clone(),
            _ => default,
        }
    }

    /// The Response object: finished (output, usage) or just created.
    fn response(&self, finished: bool) -> Value {
        let status = match (finished, self.truncated()) {
            (false, _) => "in_progress",
            (true, false) => "completed",
            (true, true) => "incomplete",
        };
        let (output, usage) = if finished {
            (vec![self.item(true)], self.usage())
        } else {
            (Vec::new(), Value::Null)
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": false,
            "completed_at": if finished { json!(unix_now()) } else { Value::Null },
            "error": null,
            "incomplete_details": if finished && self.truncated() {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "instructions": self.echo("instructions", Value::Null),
            "max_output_tokens": self.echo("max_output_tokens", Value::Null),
            "max_tool_calls": self.echo("max_tool_calls", Value::Null),
            "model": self.request["model"],
            "output": output,
            "parallel_tool_calls": self.echo("parallel_tool_calls", json!(true)),
            "previous_response_id": self.echo("previous_response_id", Value::Null),
            "prompt_cache_key": self.echo("prompt_cache_key", Value::Null),
            "reasoning": self.echo("reasoning", json!({"effort": null, "summary": null})),
            "safety_identifier": self.echo("safety_identifier", Value::Null),
            "service_tier": self.tier,
            "store": self.echo("store", json!(true)),
            "temperature": self.echo("temperature", json!(1.0)),
            "text": self.echo("text", json!({"format": {"type": "text"}, "verbosity": "medium"})),
            "tool_choice": self.echo("tool_choice", json!("auto")),
            "tools": self.echo("tools", json!([])),
            "top_logprobs": self.echo("top_logprobs", json!(0)),
            "top_p": self.echo("top_p", json!(1.0)),
            "truncation": self.echo("truncation", json!("disabled")),
            "usage": usage,
            "user": self.echo("user", Value::Null),
            "metadata": self.echo("metadata", json!({})),
        })
    }

    fn usage(&self) -> Value {
        let output_tokens = self.answer.output_tokens();
        json!({
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + output_tokens,
        })
    }

    /// The output item, empty (as first announced) or whole.
    fn item(&self, done: bool) -> Value {
        let status = match (done, self.truncated()) {
            (false, _) => "in_progress",
            (true, false) => "completed",
            (true, true) => "incomplete",
        };
        match &self.answer {
            Answer::Text(text) => {
                let content = if done {
                    vec![text_part(&text.text())]
                } else {
                    Vec::new()
                };
                json!({
                    "id": self.item_id(),
                    "type": "message",
                    "status": status,
                    "content": content,
                    "role": "assistant",
                })
            }
            Answer::Tool(call) => json!({
                "id": self.item_id(),
                "type": "function_call",
                "status": status,
                "arguments": if done { call.arguments.as_str() } else { "" },
                "call_id": format!("call_{}", call.id_suffix),
                "name": call.name,
            }),
        }
    }

    fn stream(self, admission: Admission) -> Response {
        let Admission {
            guard,
            start_delay,
            token_interval,
            ..
        } = admission;
        let item_id = self.item_id();
        let mut events = Events::default();
        events.emit(
            "response.created",
            json!({"response": self.response(false)}),
        );
        events.emit(
            "response.in_progress",
            json!({"response": self.response(false)}),
        );
        events.script.start_content(start_delay);
        events.emit(
            "response.output_item.added",
            json!({"output_index": 0, "item": self.item(false)}),
        );
        match &self.answer {
            Answer::Text(text) => {
                let at = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
                events.emit_at(
                    "response.content_part.added",
                    &at,
                    json!({"part": text_part("")}),
                );
                for (i, piece) in text.pieces.iter().enumerate() {
                    if i > 0 {
                        events.script.pause(token_interval);
                    }
                    let delta = json!({"delta": piece, "logprobs": []});
                    events.emit_at("response.output_text.delta", &at, delta);
                }
                let full = text.text();
                let done = json!({"text": full, "logprobs": []});
                events.emit_at("response.output_text.done", &at, done);
                let part = json!({"part": text_part(&full)});
                events.emit_at("response.content_part.done", &at, part);
            }
            Answer::Tool(call) => {
                let at = json!({"item_id": item_id, "output_index": 0});
                for (i, fragment) in call.fragments().enumerate() {
                    if i > 0 {
                        events.script.pause(token_interval);
                    }
                    let delta = json!({"delta": fragment});
                    events.emit_at("response.function_call_arguments.delta", &at, delta);
                }
                let done = json!({"arguments": call.arguments, "name": call.name});
                events.emit_at("response.function_call_arguments.done", &at, done);
            }
        }
        events.emit(
            "response.output_item.done",
            json!({"output_index": 0, "item": self.item(true)}),
        );
        let last = if self.truncated() {
            "response.incomplete"
        } else {
            "response.completed"
        };
        events.emit(last, json!({"response": self.response(true)}));
        events.script.into_response(guard, &request_id_header())
    }
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// Responses events: `type` first, then the fields, then `sequence_number`.
#[derive(Default)]
struct Events {
    script: Script,
    sequence: u64,
}

impl Events {
    fn emit(&mut self, kind: &str, fields: Value) {
        self.emit_at(kind, &Value::Null, fields);
    }

    /// With the position fields (`item_id`, `output_index`, …) of `at` before `fields`.
    fn emit_at(&mut self, kind: &str, at: &Value, fields: Value) {
        let mut event = Map::new();
        for source in [at.clone(), fields] {
            if let Value::Object(map) = source {
                event.extend(map);
            }
        }
        event.insert("sequence_number".into(), self.sequence.into());
        self.sequence += 1;
        self.script.typed_event(kind, Value::Object(event));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::{Duration, Instant};

    use super::*;
    use crate::sim::test_util::{eventually, read, TestSim};
    use crate::sim::SimConfig;

    fn kinds(events: &[(Option<String>, Value)]) -> Vec<String> {
        events
            .iter()
            .map(|(name, _)| name.clone().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn non_stream_text() {
        let sim = TestSim::start(SimConfig::default()).await;
        let body = json!({"model": "gpt-5", "input": "hello there #sim output_tokens=3",
            "service_tier": "auto", "instructions": "be brief"});
        let (status, reply) = sim.post_json("/v1/responses", vec![], &body).await;
        assert_eq!(status, 200);
        assert_eq!(reply["object"], "response");
        assert_eq!(reply["status"], "completed");
        assert_eq!(reply["service_tier"], "default");
        assert_eq!(reply["instructions"], "be brief");
        let output = &reply["output"][0];
        assert_eq!(output["type"], "message");
        assert_eq!(output["content"][0]["text"], "Simulated answer word1");
        assert_eq!(reply["usage"]["output_tokens"], 3);
        assert_eq!(reply["usage"]["input_tokens"], 6);
        assert_eq!(reply["usage"]["total_tokens"], 9);
        assert_eq!(sim.stats().requests("openai:default"), 1);
    }

    #[tokio::test]
    async fn stream_events_in_order_with_flex_delay_before_content() {
        let sim = TestSim::start(SimConfig::default()).await;
        let body = json!({"model": "o3", "stream": true, "service_tier": "flex",
            "input": [{"role": "user", "content": [{"type": "input_text",
                "text": "hi #sim flex_delay_ms=300 output_tokens=2"}]}]});
        let began = Instant::now();
        let response = sim.open("POST", "/v1/responses", vec![], Some(&body)).await;
        assert!(
            began.elapsed() < Duration::from_millis(250),
            "headers come at once"
        );
        let reply = read(response).await;
        assert!(began.elapsed() >= Duration::from_millis(300));
        assert!(reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let events = reply.events();
        assert_eq!(
            kinds(&events),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, (name, data)) in events.iter().enumerate() {
            assert_eq!(data["sequence_number"], i as u64);
            assert_eq!(data["type"], name.as_deref().unwrap());
        }
        let completed = &events[9].1["response"];
        assert_eq!(completed["service_tier"], "flex");
        assert_eq!(
            completed["output"][0]["content"][0]["text"],
            "Simulated answer"
        );
        assert_eq!(
            completed["usage"]["output_tokens_details"]["reasoning_tokens"],
            0
        );
        assert_eq!(events[4].1["logprobs"], json!([]));
        let stats = sim.stats();
        assert_eq!(stats.started("openai:flex"), 1);
        assert_eq!(stats.cancelled("openai:flex"), 0);
    }

    #[tokio::test]
    async fn function_call_stream_and_body() {
        let sim = TestSim::start(SimConfig::default()).await;
        let tools = json!([{"type": "function", "name": "get_weather", "parameters": {
            "type": "object", "properties": {"location": {"type": "string"}}}}]);
        let body = json!({"model": "gpt-5", "tools": tools,
            "input": "weather? #sim tool=get_weather", "stream": true});
        let events = sim.post("/v1/responses", vec![], &body).await.events();
        let args: String = events
            .iter()
            .filter(|(name, _)| name.as_deref() == Some("response.function_call_arguments.delta"))
            .map(|(_, data)| data["delta"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(args, r#"{"location":"Paris"}"#);
        let item = &events.last().unwrap().1["response"]["output"][0];
        assert_eq!(item["type"], "function_call");
        assert!(item["id"].as_str().unwrap().starts_with("fc_"));
        assert!(item["call_id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(item["name"], "get_weather");

        // After the tool result, the model answers in text.
        let body = json!({"model": "gpt-5", "tools": tools, "input": [
            {"role": "user", "content": "weather? #sim tool=get_weather"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]});
        let (_, reply) = sim.post_json("/v1/responses", vec![], &body).await;
        assert_eq!(reply["output"][0]["type"], "message");
    }

    #[tokio::test]
    async fn truncated_answer_is_incomplete() {
        let sim = TestSim::start(SimConfig::default()).await;
        let body = json!({"model": "gpt-5", "input": "x", "max_output_tokens": 5, "stream": true});
        let events = sim.post("/v1/responses", vec![], &body).await.events();
        let (name, last) = events.last().unwrap();
        assert_eq!(name.as_deref(), Some("response.incomplete"));
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(last["response"]["usage"]["output_tokens"], 5);
    }

    #[tokio::test]
    async fn flex_capacity_error_and_directed_error() {
        let sim = TestSim::start(SimConfig::default()).await;
        let flex = |text: &str| json!({"model": "o3", "input": text, "service_tier": "flex"});
        let (status, reply) = sim
            .post_json("/v1/responses", vec![], &flex("#sim flex_status=429"))
            .await;
        assert_eq!(status, 429);
        assert_eq!(reply["error"]["code"], "resource_unavailable");
        assert!(reply["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Resource Unavailable"));
        let retried = flex("#sim flex_fail_times=1 sim_id=r1");
        let (first, _) = sim.post_json("/v1/responses", vec![], &retried).await;
        let (second, _) = sim.post_json("/v1/responses", vec![], &retried).await;
        assert_eq!((first, second), (429, 200));
        let (status, reply) = sim
            .post_json(
                "/v1/responses",
                vec![],
                &json!({"model": "o3", "input": "#sim status=400"}),
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(reply["error"]["type"], "invalid_request_error");
        assert_eq!(sim.stats().capacity_errors("openai:flex"), 2);
    }

    #[tokio::test]
    async fn dropped_stream_counts_as_cancelled() {
        let sim = TestSim::start(SimConfig::default()).await;
        let body = json!({"model": "o3", "stream": true, "service_tier": "flex",
            "input": "#sim flex_delay_ms=10000"});
        let response = sim.open("POST", "/v1/responses", vec![], Some(&body)).await;
        assert_eq!(response.status(), 200);
        drop(response);
        eventually(&sim, |s| s.cancelled("openai:flex") == 1).await;
        assert_eq!(sim.stats().started("openai:flex"), 0);
    }

    #[tokio::test]
    async fn dropped_non_stream_request_counts_as_cancelled() {
        let sim = TestSim::start(SimConfig::default()).await;
        let body = json!({"model": "o3", "service_tier": "flex",
            "input": "#sim flex_delay_ms=10000"});
        let request = sim.open("POST", "/v1/responses", vec![], Some(&body));
        assert!(tokio::time::timeout(Duration::from_millis(200), request)
            .await
            .is_err());
        eventually(&sim, |s| s.cancelled("openai:flex") == 1).await;
    }

    #[tokio::test]
    async fn serves_http2_prior_knowledge() {
        let sim = TestSim::start_h2(SimConfig::default()).await;
        let body = json!({"model": "gpt-5", "input": "hi", "stream": true});
        let response = sim.open("POST", "/v1/responses", vec![], Some(&body)).await;
        assert_eq!(response.version(), http::Version::HTTP_2);
        let events = read(response).await.events();
        assert_eq!(
            events.last().unwrap().0.as_deref(),
            Some("response.completed")
        );
    }
}
