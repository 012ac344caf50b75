//! Caller formats: the four request/response shapes callers speak to us.
//!
//! Each format module owns its validation rules (seed 001) and, for the native provider pair,
//! how a non-streaming body is assembled from an upstream stream.

pub mod chat;
pub mod interactions;
pub mod messages;
pub mod responses;

use flex_shared::catalog::{Provider, Tier};
use indexmap::IndexMap;
use serde_json::value::RawValue;

use crate::canonical::StreamEvent;
use crate::error::ApiError;
use crate::sse::Event;

/// Turns canonical stream events into a caller format's SSE events, in that format's order.
/// Stateful (sequence numbers, open blocks); created with the tier that won, which the format
/// reports in its own field.
pub trait Encoder: Send {
    fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<Event>);
    /// The tier the provider reported serving, learned after the encoder was made (the final
    /// events report it).
    fn set_served(&mut self, served: Tier);
}

/// `service_tier` as the OpenAI-shaped formats (Responses, Chat Completions) report it: OpenAI's
/// names, except that Anthropic's standard tier keeps its own name (seed 003: a `standard_only`
/// request "comes back reported as "service_tier": "standard""). `provider` is the one that
/// answered ([`crate::canonical::Response::provider`]).
pub fn openai_tier_name(t: Tier, provider: Option<Provider>) -> &'static str {
    match (t, provider) {
        (Tier::Flex, _) => "flex",
        (Tier::Standard, Some(Provider::Anthropic)) => "standard",
        (Tier::Standard, _) => "default",
        (Tier::Priority, _) => "priority",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallerFormat {
    Responses,
    ChatCompletions,
    Interactions,
    Messages,
}

impl CallerFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            CallerFormat::Responses => "responses",
            CallerFormat::ChatCompletions => "chat_completions",
            CallerFormat::Interactions => "interactions",
            CallerFormat::Messages => "messages",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            CallerFormat::Responses => "/v1/responses",
            CallerFormat::ChatCompletions => "/v1/chat/completions",
            CallerFormat::Interactions => "/v1/interactions",
            CallerFormat::Messages => "/v1/messages",
        }
    }
}

/// A request body kept as its top-level fields with the values as raw JSON text: we read the few
/// fields we route on, edit the tier fields, and forward everything else byte for byte.
#[derive(Debug, Clone)]
pub struct RawBody {
    pub fields: IndexMap<String, Box<RawValue>>,
}

impl RawBody {
    pub fn parse(bytes: &[u8], format: CallerFormat) -> Result<Self, ApiError> {
        let example = match format {
            CallerFormat::ChatCompletions => {
                r#"{"model": "gpt-5.5", "messages": [{"role": "user", "content": "Hello!"}], "start_within": "00h-00m-30s"}"#
            }
            CallerFormat::Messages => {
                r#"{"model": "claude-opus-4-8", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello!"}], "start_within": "default"}"#
            }
            _ => r#"{"model": "gpt-5.5", "input": "Hello!", "start_within": "00h-00m-30s"}"#,
        };
        serde_json::from_slice(bytes)
            .map(|fields| Self { fields })
            .map_err(|e| {
                ApiError::bad_request(
                    "invalid_json",
                    format!("The request body is not a JSON object: {e}."),
                )
                .fix("send a JSON object with Content-Type: application/json.")
                .example(example)
            })
    }

    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.fields.get(key).map(AsRef::as_ref)
    }

    /// The field as a JSON value (`None` when absent).
    pub fn value(&self, key: &str) -> Option<serde_json::Value> {
        self.get(key)
            .and_then(|r| serde_json::from_str(r.get()).ok())
    }

    /// True when the field is present and not `null`.
    pub fn is_set(&self, key: &str) -> bool {
        self.get(key).is_some_and(|r| r.get() != "null")
    }

    pub fn str_field(&self, key: &str) -> Option<String> {
        self.get(key)
            .and_then(|r| serde_json::from_str::<String>(r.get()).ok())
    }

    pub fn bool_field(&self, key: &str) -> Option<bool> {
        self.get(key)
            .and_then(|r| serde_json::from_str::<bool>(r.get()).ok())
    }

    pub fn remove(&mut self, key: &str) -> Option<Box<RawValue>> {
        self.fields.shift_remove(key)
    }

    /// Sets a field to a JSON value, keeping its position when it already exists.
    pub fn set(&mut self, key: &str, value: &serde_json::Value) {
        if let Ok(raw) = serde_json::value::to_raw_value(value) {
            self.fields.insert(key.to_string(), raw);
        }
    }

    pub fn to_bytes(&self) -> bytes::Bytes {
        serde_json::to_vec(&self.fields)
            .map(bytes::Bytes::from)
            .unwrap_or_default()
    }
}

/// The `model` field, required on every format.
pub fn model(body: &RawBody, format: CallerFormat) -> Result<String, ApiError> {
    match body.str_field("model") {
        Some(m) if !m.trim().is_empty() => Ok(m),
        _ => Err(ApiError::bad_request(
            "missing_model",
            "Missing required parameter `model`: FlexInference routes by model id.",
        )
        .param("model")
        .fix("set `model` to a model id such as gpt-5.5, gemini-3.5-flash or claude-opus-4-8 (GET /v1/models lists them).")
        .example(match format {
            CallerFormat::Messages => r#"{"model": "claude-opus-4-8", ...}"#,
            _ => r#"{"model": "gpt-5.5", ...}"#,
        })),
    }
}

/// A caller may not pick the tier: FlexInference owns it.
pub fn reject_service_tier(body: &RawBody) -> Result<(), ApiError> {
    if body.is_set("service_tier") {
        return Err(ApiError::bad_request(
            "service_tier_not_allowed",
            "The request sets `service_tier`, but FlexInference chooses the tier from `start_within`.",
        )
        .param("service_tier")
        .fix("remove `service_tier` and express the tier through start_within (\"default\", \"priority\", \"auto\" or a duration for flex).")
        .example(r#""start_within": "priority" instead of "service_tier": "priority""#));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn raw_body_edits_only_what_it_touches() {
        let src = br#"{"model":"gpt-5.5","input":[{"role":"user","content":"caf\u00e9 1.0"}],"start_within":"default","temperature":1.0}"#;
        let mut b = RawBody::parse(src, CallerFormat::Responses).unwrap();
        b.remove("start_within");
        b.set("service_tier", &serde_json::json!("flex"));
        let out = String::from_utf8(b.to_bytes().to_vec()).unwrap();
        assert_eq!(
            out,
            r#"{"model":"gpt-5.5","input":[{"role":"user","content":"caf\u00e9 1.0"}],"temperature":1.0,"service_tier":"flex"}"#
        );
    }

    #[test]
    fn non_objects_are_refused_with_an_example() {
        let e = RawBody::parse(b"[1]", CallerFormat::ChatCompletions).unwrap_err();
        assert_eq!(e.code, "invalid_json");
        assert!(e.full_message().contains("Example:"));
    }

    #[test]
    fn service_tier_is_refused_unless_null() {
        let b = RawBody::parse(br#"{"service_tier":"flex"}"#, CallerFormat::Responses).unwrap();
        assert_eq!(
            reject_service_tier(&b).unwrap_err().code,
            "service_tier_not_allowed"
        );
        let b = RawBody::parse(br#"{"service_tier":null}"#, CallerFormat::Responses).unwrap();
        assert!(reject_service_tier(&b).is_ok());
    }

    /// Seed 003: a Claude `standard_only` answer is reported as `"service_tier": "standard"` on
    /// Responses and Chat Completions too, body and every stream event; OpenAI's and Gemini's
    /// standard answers keep OpenAI's `"default"`.
    #[test]
    fn an_anthropic_standard_answer_says_standard_in_the_openai_shapes() {
        use crate::canonical as c;
        use serde_json::Value;
        let cases = [
            (Some(Provider::Anthropic), Tier::Standard, "standard"),
            (Some(Provider::OpenAi), Tier::Standard, "default"),
            (Some(Provider::Gemini), Tier::Standard, "default"),
            (None, Tier::Standard, "default"),
            (Some(Provider::Anthropic), Tier::Priority, "priority"),
            (Some(Provider::Gemini), Tier::Flex, "flex"),
        ];
        for (provider, served, want) in cases {
            let r = c::Response {
                id: "msg_1".into(),
                model: "claude-opus-4-8".into(),
                content: vec![c::Part::Text("hi".into())],
                provider,
                ..c::Response::default()
            };
            let case = format!("{provider:?} {served:?}");
            assert_eq!(
                responses::render_response(&r, served)["service_tier"],
                want,
                "{case}"
            );
            assert_eq!(
                chat::render_response(&r, served)["service_tier"],
                want,
                "{case}"
            );
            let mut encoders: Vec<Box<dyn Encoder>> = vec![
                Box::new(responses::StreamEncoder::new(served, "claude-opus-4-8")),
                Box::new(chat::StreamEncoder::new(served, "claude-opus-4-8", true)),
            ];
            for enc in &mut encoders {
                let mut out = Vec::new();
                for e in c::events_of(&r) {
                    enc.encode(&e, &mut out);
                }
                let tiers: Vec<Value> = out
                    .iter()
                    .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
                    .filter_map(|v| {
                        v.get("service_tier")
                            .or_else(|| v["response"].get("service_tier"))
                            .cloned()
                    })
                    .collect();
                assert!(!tiers.is_empty(), "{case}");
                assert!(tiers.iter().all(|t| t == want), "{case}: {tiers:?}");
            }
        }
    }
}
