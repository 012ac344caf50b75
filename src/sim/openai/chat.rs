//! `POST /v1/chat/completions`: a chat.completion object, or `chat.completion.chunk` events
//! ending with `data: [DONE]`.

use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use http::HeaderMap;
use serde_json::{json, Value};

use super::{error_response, json_response, parse_request, request_id_header, tier, tier_name};
use crate::sim::answer::{
    count_words, random_hex, texts_of, unix_now, Answer, Conversation, ToolCall, ToolSpec,
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
    let Some(messages) = request["messages"].as_array() else {
        return Err(SimError::invalid(
            "Missing required parameter: 'messages'.",
            Some("messages"),
        ));
    };
    let conversation = conversation(&request, messages);
    let knobs = state.knobs(&conversation);
    let tier = tier(request.get("service_tier"), &knobs)?;
    let admission = state.admit(Provider::OpenAi, tier, &knobs)?;
    admission.wait_head().await;
    let max_tokens = request["max_completion_tokens"]
        .as_u64()
        .or(request["max_tokens"].as_u64());
    let draft = Draft {
        request: &request,
        id: format!("chatcmpl-{}", random_hex()),
        created: unix_now(),
        tier: tier_name(tier),
        answer: Answer::new(
            &conversation,
            knobs.tool.as_deref(),
            knobs.output_tokens,
            max_tokens,
        ),
        input_tokens: conversation.input_tokens,
    };
    if request["stream"].as_bool() == Some(true) {
        return Ok(draft.stream(admission));
    }
    admission.wait_whole_answer(draft.answer.steps()).await;
    Ok(json_response(draft.completion()))
}

fn conversation<'a>(request: &'a Value, messages: &'a [Value]) -> Conversation<'a> {
    let mut conversation = Conversation::default();
    for message in messages.iter().filter(|message| message["role"] == "user") {
        texts_of(&message["content"], &["text"], &mut conversation.user_texts);
    }
    conversation.ends_with_tool_result = messages
        .last()
        .is_some_and(|message| message["role"] == "tool");
    if let Some(tools) = request["tools"].as_array() {
        conversation.tools = tools
            .iter()
            .filter_map(|tool| {
                let function = tool.get("function")?;
                Some(ToolSpec {
                    name: function["name"].as_str()?,
                    schema: function.get("parameters"),
                })
            })
            .collect();
    }
    conversation.input_tokens = messages.iter().map(count_words).sum::<u64>().max(1);
    conversation
}

struct Draft<'a> {
    request: &'a Value,
    id: String,
    created: u64,
    tier: &'static str,
    answer: Answer,
    input_tokens: u64,
}

impl Draft<'_> {
    fn finish_reason(&self) -> &'static str {
        match &self.answer {
            Answer::Tool(_) => "tool_calls",
            Answer::Text(text) if text.truncated => "length",
            Answer::Text(_) => "stop",
        }
    }

    fn usage(&self) -> Value {
        let completion_tokens = self.answer.output_tokens();
        json!({
            "prompt_tokens": self.input_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.input_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        })
    }

    fn completion(&self) -> Value {
        let message = match &self.answer {
            Answer::Text(text) => json!({
                "role": "assistant",
                "content": text.text(),
                "refusal": null,
                "annotations": [],
            }),
            Answer::Tool(call) => json!({
                "role": "assistant",
                "content": null,
                "refusal": null,
                "annotations": [],
                "tool_calls": [tool_call(call, &call.arguments)],
            }),
        };
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.request["model"],
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": null,
                "finish_reason": self.finish_reason(),
            }],
            "usage": self.usage(),
            "service_tier": self.tier,
            "system_fingerprint": null,
        })
    }

    /// A chunk with one choice, or none (the usage chunk).
    fn chunk(&self, choice: Option<Value>, usage: Option<Value>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.request["model"],
            "service_tier": self.tier,
            "system_fingerprint": null,
            "choices": choice.into_iter().collect::<Vec<_>>(),
        });
        if self.include_usage() {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        chunk
    }

    fn delta(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        let choice = json!({
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish_reason,
        });
        self.chunk(Some(choice), None)
    }

    fn include_usage(&self) -> bool {
        self.request["stream_options"]["include_usage"].as_bool() == Some(true)
    }

    fn stream(self, admission: Admission) -> Response {
        let Admission {
            guard,
            start_delay,
            token_interval,
            ..
        } = admission;
        let mut script = Script::default();
        script.start_content(start_delay);
        match &self.answer {
            Answer::Text(text) => {
                let role = json!({"role": "assistant", "content": "", "refusal": null});
                script.data(&self.delta(role, None));
                for (i, piece) in text.pieces.iter().enumerate() {
                    if i > 0 {
                        script.pause(token_interval);
                    }
                    script.data(&self.delta(json!({"content": piece}), None));
                }
            }
            Answer::Tool(call) => {
                let first = json!({"role": "assistant", "content": null, "refusal": null,
                    "tool_calls": [tool_call(call, "")]});
                script.data(&self.delta(first, None));
                for fragment in call.fragments() {
                    script.pause(token_interval);
                    let delta = json!({"tool_calls": [
                        {"index": 0, "function": {"arguments": fragment}}]});
                    script.data(&self.delta(delta, None));
                }
            }
        }
        script.data(&self.delta(json!({}), Some(self.finish_reason())));
        if self.include_usage() {
            script.data(&self.chunk(None, Some(self.usage())));
        }
        script.data_raw("[DONE]");
        script.into_response(guard, &request_id_header())
    }
}

/// A tool call with `arguments` (the whole string, or "" in the first stream fragment).
fn tool_call(call: &ToolCall, arguments: &str) -> Value {
    json!({
        "index": 0,
        "id": format!("call_{}", call.id_suffix),
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::sim::test_util::TestSim;
    use crate::sim::SimConfig;

    fn user(text: &str) -> Value {
        json!([{"role": "system", "content": "sys"}, {"role": "user", "content": text}])
    }

    #[tokio::test]
    async fn non_stream_text_and_tiers() {
        let sim = TestSim::start(SimConfig::default()).await;
        let body = json!({"model": "gpt-4o", "messages": user("hi #sim output_tokens=2"),
            "service_tier": "priority"});
        let (status, reply) = sim.post_json("/v1/chat/completions", vec![], &body).await;
        assert_eq!(status, 200);
        assert_eq!(reply["object"], "chat.completion");
        assert_eq!(reply["service_tier"], "priority");
        assert_eq!(
            reply["choices"][0]["message"]["content"],
            "Simulated answer"
        );
        assert_eq!(reply["choices"][0]["finish_reason"], "stop");
        assert_eq!(reply["usage"]["completion_tokens"], 2);
        assert_eq!(reply["usage"]["prompt_tokens"], 4);
        assert_eq!(sim.stats().requests("openai:priority"), 1);
    }

    #[tokio::test]
    async fn stream_with_usage_chunk_and_done() {
        let sim = TestSim::start(SimConfig::default()).await;
        let body = json!({"model": "gpt-5", "messages": user("hi #sim output_tokens=3"),
            "stream": true, "stream_options": {"include_usage": true}, "service_tier": "flex"});
        let events = sim
            .post("/v1/chat/completions", vec![], &body)
            .await
            .events();
        assert_eq!(events.len(), 1 + 3 + 1 + 1 + 1);
        assert!(events.iter().all(|(name, _)| name.is_none()));
        let chunks: Vec<&Value> = events.iter().map(|(_, data)| data).collect();
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": "", "refusal": null})
        );
        let text: String = chunks[1..4]
            .iter()
            .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(text, "Simulated answer word1");
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[4]["usage"], Value::Null);
        assert_eq!(chunks[5]["choices"], json!([]));
        assert_eq!(chunks[5]["usage"]["total_tokens"], 7);
        assert_eq!(*chunks[6], json!("[DONE]"));
        for chunk in &chunks[..6] {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["service_tier"], "flex");
        }
    }

    #[tokio::test]
    async fn tool_calls_stream_and_body() {
        let sim = TestSim::start(SimConfig::default()).await;
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let mut body = json!({"model": "gpt-5", "tools": tools,
            "messages": user("weather #sim tool=get_weather")});
        let (_, reply) = sim.post_json("/v1/chat/completions", vec![], &body).await;
        let choice = &reply["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert!(call["id"].as_str().unwrap().len() <= 40);

        body["stream"] = json!(true);
        let events = sim
            .post("/v1/chat/completions", vec![], &body)
            .await
            .events();
        let deltas: Vec<&Value> = events
            .iter()
            .map(|(_, data)| &data["choices"][0]["delta"]["tool_calls"][0])
            .filter(|delta| delta.is_object())
            .collect();
        assert!(deltas[0]["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(deltas[0]["function"]["name"], "get_weather");
        let args: String = deltas
            .iter()
            .map(|d| d["function"]["arguments"].as_str().unwrap())
            .collect();
        assert_eq!(args, r#"{"city":"Paris"}"#);
        assert!(deltas[1..]
            .iter()
            .all(|d| d.get("id").is_none() && d["index"] == 0));
        let finish = &events[events.len() - 2].1["choices"][0]["finish_reason"];
        assert_eq!(finish, "tool_calls");
    }

    #[tokio::test]
    async fn max_tokens_gives_length() {
        let sim = TestSim::start(SimConfig::default()).await;
        let body = json!({"model": "gpt-5", "messages": user("x"), "max_completion_tokens": 4});
        let (_, reply) = sim.post_json("/v1/chat/completions", vec![], &body).await;
        assert_eq!(reply["choices"][0]["finish_reason"], "length");
        assert_eq!(reply["usage"]["completion_tokens"], 4);
    }
}
