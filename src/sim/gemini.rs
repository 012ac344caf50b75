//! Gemini (Developer API): `POST /v1beta/models/{model}:generateContent` and
//! `:streamGenerateContent` (`?alt=sse`: one whole GenerateContentResponse per `data:` line, no
//! `[DONE]`; without it, a JSON array). Tier: top-level `serviceTier` `flex|standard|priority`
//! (any case, `SERVICE_TIER_FLEX` too), reported in `usageMetadata.serviceTier` and the
//! `x-gemini-service-tier` header.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{json, Value};

use super::answer::{count_words, random_hex, Answer, Conversation, ToolSpec};
use super::engine::{check_key, header, Admission, ErrorKind, KeyProblem, SimError, SimState};
use super::sse::Script;
use super::stats::{Provider, Tier};

const TIER_HEADER: &str = "x-gemini-service-tier";

pub(crate) async fn handle(
    State(state): State<SimState>,
    Path(rest): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve(&state, &rest, &query, &headers, &body)
        .await
        .unwrap_or_else(error_response)
}

async fn serve(
    state: &SimState,
    rest: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, SimError> {
    authenticate(state, headers, query)?;
    let (model, stream) = match rest.rsplit_once(':') {
        Some((model, "generateContent")) => (model, false),
        Some((model, "streamGenerateContent")) => (model, true),
        _ => return Err(not_found(rest)),
    };
    let request: Value = serde_json::from_slice(body).map_err(|err| SimError::bad_json(&err))?;
    let Some(contents) = request["contents"].as_array() else {
        return Err(SimError::invalid(
            "* GenerateContentRequest.contents: contents is not specified",
            Some("contents"),
        ));
    };
    let conversation = conversation(&request, contents);
    let knobs = state.knobs(&conversation);
    let tier = tier(&request)?;
    let admission = state.admit(Provider::Gemini, tier, &knobs)?;
    admission.wait_head().await;
    let max_tokens = request["generationConfig"]["maxOutputTokens"].as_u64();
    let draft = Draft {
        model,
        response_id: random_hex(),
        tier: Provider::Gemini.served_name(tier),
        answer: Answer::new(
            &conversation,
            knobs.tool.as_deref(),
            knobs.output_tokens,
            max_tokens,
        ),
        input_tokens: conversation.input_tokens,
    };
    let tier_header = [(
        HeaderName::from_static(TIER_HEADER),
        HeaderValue::from_static(draft.tier),
    )];
    if stream && query.get("alt").map(String::as_str) == Some("sse") {
        return Ok(draft.stream(admission, &tier_header));
    }
    admission.wait_whole_answer(draft.answer.steps()).await;
    let body = if stream {
        Value::Array(draft.chunks())
    } else {
        draft.whole()
    };
    Ok((tier_header, Json(body)).into_response())
}

fn authenticate(
    state: &SimState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<(), SimError> {
    let given = header(headers, "x-goog-api-key").or(query.get("key").map(String::as_str));
    check_key(state.config().gemini_key.as_deref(), given).map_err(|problem| {
        SimError::unauthenticated(match problem {
            KeyProblem::Missing => {
                "Method doesn't allow unregistered callers (callers without established \
                 identity). Please use API Key or other form of API consumer identity to call \
                 this API."
            }
            KeyProblem::Wrong => "API key not valid. Please pass a valid API key.",
        })
    })
}

fn not_found(rest: &str) -> SimError {
    SimError {
        status: StatusCode::NOT_FOUND,
        kind: ErrorKind::NotFound,
        message: format!(
            "models/{rest} is not found for API version v1beta, or is not supported for this \
             method (use :generateContent or :streamGenerateContent)."
        ),
        param: None,
        code: None,
        retry_after: None,
        reset: false,
    }
}

/// `serviceTier`: absent or unspecified → standard.
fn tier(request: &Value) -> Result<Tier, SimError> {
    let requested = match request.get("serviceTier").or(request.get("service_tier")) {
        None | Some(Value::Null) => return Ok(Tier::Standard),
        Some(Value::String(tier)) => tier.to_ascii_uppercase(),
        Some(other) => other.to_string(),
    };
    match requested.trim_start_matches("SERVICE_TIER_") {
        "FLEX" => Ok(Tier::Flex),
        "STANDARD" | "UNSPECIFIED" => Ok(Tier::Standard),
        "PRIORITY" => Ok(Tier::Priority),
        _ => Err(SimError::invalid(
            format!(
                "Invalid value at 'service_tier' ({requested}): expected flex, standard or \
                 priority."
            ),
            Some("serviceTier"),
        )),
    }
}

fn conversation<'a>(request: &'a Value, contents: &'a [Value]) -> Conversation<'a> {
    let mut conversation = Conversation::default();
    let is_user = |content: &&Value| matches!(content["role"].as_str(), None | Some("user"));
    for content in contents.iter().filter(is_user) {
        let parts = content["parts"].as_array().into_iter().flatten();
        conversation
            .user_texts
            .extend(parts.filter_map(|part| part["text"].as_str()));
    }
    conversation.ends_with_tool_result = contents.last().is_some_and(|content| {
        content["parts"].as_array().is_some_and(|parts| {
            parts
                .iter()
                .any(|part| part.get("functionResponse").is_some())
        })
    });
    let declarations = request["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|tool| tool["functionDeclarations"].as_array())
        .flatten();
    conversation.tools = declarations
        .filter_map(|declaration| {
            Some(ToolSpec {
                name: declaration["name"].as_str()?,
                schema: declaration
                    .get("parameters")
                    .or(declaration.get("parametersJsonSchema")),
            })
        })
        .collect();
    conversation.input_tokens = (contents.iter().map(count_words).sum::<u64>()
        + count_words(&request["systemInstruction"]))
    .max(1);
    conversation
}

struct Draft<'a> {
    model: &'a str,
    response_id: String,
    tier: &'static str,
    answer: Answer,
    input_tokens: u64,
}

impl Draft<'_> {
    fn finish_reason(&self) -> &'static str {
        match &self.answer {
            Answer::Text(text) if text.truncated => "MAX_TOKENS",
            _ => "STOP",
        }
    }

    /// A GenerateContentResponse with `parts`, `output_tokens` so far, and the finish reason
    /// on the last one.
    fn chunk(&self, parts: Vec<Value>, last: bool, output_tokens: u64) -> Value {
        let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
        if last {
            candidate["finishReason"] = json!(self.finish_reason());
        }
        json!({
            "candidates": [candidate],
            "usageMetadata": {
                "promptTokenCount": self.input_tokens,
                "candidatesTokenCount": output_tokens,
                "thoughtsTokenCount": 0,
                "totalTokenCount": self.input_tokens + output_tokens,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": self.input_tokens}],
                "serviceTier": self.tier,
            },
            "modelVersion": self.model,
            "responseId": self.response_id,
        })
    }

    fn whole(&self) -> Value {
        let parts = match &self.answer {
            Answer::Text(text) => vec![json!({"text": text.text()})],
            Answer::Tool(call) => vec![json!({"functionCall": {
                "name": call.name, "args": call.arguments_value()}})],
        };
        self.chunk(parts, true, self.answer.output_tokens())
    }

    /// The stream's chunks: one per output token (at least one), or one function call.
    fn chunks(&self) -> Vec<Value> {
        let Answer::Text(text) = &self.answer else {
            return vec![self.whole()];
        };
        if text.pieces.is_empty() {
            return vec![self.chunk(vec![json!({"text": ""})], true, 0)];
        }
        let count = text.pieces.len();
        text.pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                self.chunk(vec![json!({"text": piece})], i + 1 == count, i as u64 + 1)
            })
            .collect()
    }

    fn stream(self, admission: Admission, headers: &[(HeaderName, HeaderValue)]) -> Response {
        let Admission {
            guard,
            start_delay,
            token_interval,
            ..
        } = admission;
        let mut script = Script::default();
        script.start_content(start_delay);
        for (i, chunk) in self.chunks().iter().enumerate() {
            if i > 0 {
                script.pause(token_interval);
            }
            script.data(chunk);
        }
        script.into_response(guard, headers)
    }
}

/// `{"error":{"code","message","status"}}` with the error's status.
fn error_response(err: SimError) -> Response {
    let status = match err.kind {
        ErrorKind::InvalidRequest => "INVALID_ARGUMENT",
        ErrorKind::Authentication => "UNAUTHENTICATED",
        ErrorKind::Permission => "PERMISSION_DENIED",
        ErrorKind::NotFound => "NOT_FOUND",
        ErrorKind::RateLimit => "RESOURCE_EXHAUSTED",
        ErrorKind::Capacity if err.status == StatusCode::TOO_MANY_REQUESTS => "RESOURCE_EXHAUSTED",
        ErrorKind::Capacity | ErrorKind::Overloaded => "UNAVAILABLE",
        ErrorKind::Server => "INTERNAL",
    };
    let status = err.code.as_deref().unwrap_or(status);
    let body = json!({"error": {
        "code": err.status.as_u16(),
        "message": err.message,
        "status": status,
    }});
    let mut resp = (err.status, Json(body)).into_response();
    super::engine::error_extras(&err, &mut resp);
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::sim::test_util::TestSim;
    use crate::sim::SimConfig;

    fn request(text: &str, tier: &str) -> Value {
        json!({"contents": [{"role": "user", "parts": [{"text": text}]}], "serviceTier": tier,
            "systemInstruction": {"parts": [{"text": "be nice"}]}})
    }

    const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
    const STREAM: &str = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";

    #[tokio::test]
    async fn generate_content_with_tiers() {
        let sim = TestSim::start(SimConfig::default()).await;
        let reply = sim
            .post(
                GENERATE,
                vec![],
                &request("hi #sim output_tokens=2", "flex"),
            )
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.headers[TIER_HEADER], "flex");
        let json = reply.json();
        let candidate = &json["candidates"][0];
        assert_eq!(candidate["content"]["parts"][0]["text"], "Simulated answer");
        assert_eq!(candidate["content"]["role"], "model");
        assert_eq!(candidate["finishReason"], "STOP");
        let usage = &json["usageMetadata"];
        assert_eq!(usage["promptTokenCount"], 5);
        assert_eq!(usage["candidatesTokenCount"], 2);
        assert_eq!(usage["totalTokenCount"], 7);
        assert_eq!(usage["serviceTier"], "flex");
        assert_eq!(json["modelVersion"], "gemini-2.5-flash");
        for (given, served) in [
            ("SERVICE_TIER_PRIORITY", "priority"),
            ("Standard", "standard"),
        ] {
            let (_, json) = sim.post_json(GENERATE, vec![], &request("x", given)).await;
            assert_eq!(json["usageMetadata"]["serviceTier"], served);
        }
        let (status, json) = sim
            .post_json(GENERATE, vec![], &request("x", "turbo"))
            .await;
        assert_eq!(
            (status, json["error"]["status"].as_str()),
            (400, Some("INVALID_ARGUMENT"))
        );
        let stats = sim.stats();
        assert_eq!(stats.requests("gemini:flex"), 1);
        assert_eq!(stats.requests("gemini:priority"), 1);
        assert_eq!(stats.requests("gemini:standard"), 1);
    }

    #[tokio::test]
    async fn sse_stream_and_json_array_stream() {
        let sim = TestSim::start(SimConfig::default()).await;
        let body = request("hi #sim output_tokens=3", "standard");
        let reply = sim.post(STREAM, vec![], &body).await;
        assert_eq!(reply.headers[TIER_HEADER], "standard");
        let events = reply.events();
        assert_eq!(events.len(), 3);
        let text: String = events
            .iter()
            .map(|(_, c)| {
                c["candidates"][0]["content"]["parts"][0]["text"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(text, "Simulated answer word1");
        assert!(events[1].1["candidates"][0].get("finishReason").is_none());
        assert_eq!(events[2].1["candidates"][0]["finishReason"], "STOP");
        assert_eq!(events[2].1["usageMetadata"]["candidatesTokenCount"], 3);
        let path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent";
        let (status, array) = sim.post_json(path, vec![], &body).await;
        assert_eq!(status, 200);
        assert_eq!(array.as_array().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn function_call() {
        let sim = TestSim::start(SimConfig::default()).await;
        let mut body = request("weather? #sim tool=get_weather", "standard");
        body["tools"] = json!([{"functionDeclarations": [{"name": "get_weather",
            "parameters": {"type": "OBJECT", "properties": {"location": {"type": "STRING"}}}}]}]);
        let events = sim.post(STREAM, vec![], &body).await.events();
        assert_eq!(events.len(), 1);
        let part = &events[0].1["candidates"][0]["content"]["parts"][0];
        assert_eq!(
            part["functionCall"],
            json!({"name": "get_weather", "args": {"location": "Paris"}})
        );
    }

    #[tokio::test]
    async fn errors_in_google_envelope() {
        let sim = TestSim::start(SimConfig {
            gemini_key: Some("AIza-good".into()),
            ..SimConfig::default()
        })
        .await;
        let body = request("hi", "flex");
        let (status, json) = sim.post_json(GENERATE, vec![], &body).await;
        assert_eq!(
            (status, json["error"]["status"].as_str()),
            (401, Some("UNAUTHENTICATED"))
        );
        let wrong = vec![("x-goog-api-key", "AIza-bad".to_owned())];
        let (status, json) = sim.post_json(GENERATE, wrong, &body).await;
        assert_eq!(status, 401);
        assert_eq!(json["error"]["code"], 401);
        let keyed = format!("{GENERATE}?key=AIza-good");
        let (status, _) = sim.post_json(&keyed, vec![], &body).await;
        assert_eq!(status, 200);
        let capacity = request("#sim flex_status=429", "flex");
        let (status, json) = sim.post_json(&keyed, vec![], &capacity).await;
        assert_eq!(
            (status, json["error"]["status"].as_str()),
            (429, Some("RESOURCE_EXHAUSTED"))
        );
        let unavailable = request("#sim flex_status=503", "flex");
        let (status, json) = sim.post_json(&keyed, vec![], &unavailable).await;
        assert_eq!(
            (status, json["error"]["status"].as_str()),
            (503, Some("UNAVAILABLE"))
        );
        let unknown = "/v1beta/models/gemini-2.5-flash:countTokens?key=AIza-good";
        let (status, _) = sim.post_json(unknown, vec![], &body).await;
        assert_eq!(status, 404);
    }
}
