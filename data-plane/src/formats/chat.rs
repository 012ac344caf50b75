//! Chat Completions (`/v1/chat/completions`): validation and assembling a `chat.completion` from
//! `chat.completion.chunk` events.

use serde_json::{json, Map, Value};

use super::RawBody;
use crate::error::ApiError;

type Check = (&'static str, fn(&Value) -> bool);

/// Parameters with no match on the models we route: refused only when set to a real value.
pub fn validate(body: &RawBody) -> Result<(), ApiError> {
    let checks: [Check; 11] = [
        ("presence_penalty", |v| v.as_f64().is_some_and(|x| x != 0.0)),
        ("frequency_penalty", |v| {
            v.as_f64().is_some_and(|x| x != 0.0)
        }),
        ("logit_bias", |v| {
            v.as_object().is_some_and(|m| !m.is_empty())
        }),
        ("logprobs", |v| v.as_bool() == Some(true)),
        ("top_logprobs", |v| v.as_u64().is_some_and(|n| n > 0)),
        ("seed", |v| !v.is_null()),
        ("stop", |v| match v {
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Null => false,
            _ => true,
        }),
        ("prediction", |v| !v.is_null()),
        ("audio", |v| !v.is_null()),
        ("web_search_options", |v| !v.is_null()),
        ("n", |v| v.as_u64().is_some_and(|n| n > 1)),
    ];
    for (name, is_real) in checks {
        if let Some(v) = body.value(name) {
            if is_real(&v) {
                return Err(unsupported(name));
            }
        }
    }
    if let Some(Value::Array(m)) = body.value("modalities") {
        if m.iter().any(|x| x.as_str() != Some("text")) {
            return Err(unsupported("modalities"));
        }
    }
    Ok(())
}

fn unsupported(name: &str) -> ApiError {
    let hint = match name {
        "web_search_options" => " For web search, use the Responses API with a web_search tool.",
        "n" => " Send separate requests for several completions.",
        "modalities" => " Only text output is routed.",
        _ => "",
    };
    ApiError::bad_request(
        "unsupported_parameter",
        format!(
            "The Chat Completions parameter `{name}` is set, but it has no match on the models FlexInference routes.{hint}"
        ),
    )
    .param(name.to_string())
    .fix(format!("remove `{name}` (or leave it at its default) and resend."))
    .example(r#"{"model": "gpt-5.5", "messages": [{"role": "user", "content": "Hello!"}], "start_within": "00h-00m-30s"}"#)
}

/// Whether a chunk carries content (the upstream has started answering).
pub fn chunk_has_content(chunk: &Value) -> bool {
    chunk["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|c| {
            let d = &c["delta"];
            d["content"].as_str().is_some_and(|s| !s.is_empty())
                || d["refusal"].as_str().is_some_and(|s| !s.is_empty())
                || d["tool_calls"].as_array().is_some_and(|t| !t.is_empty())
                || d["reasoning_content"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty())
                || !c["finish_reason"].is_null()
        })
    })
}

/// Builds a `chat.completion` body from the chunks of a stream.
#[derive(Default)]
pub struct Assembler {
    base: Option<Value>,
    choices: Vec<ChoiceAcc>,
    usage: Option<Value>,
    service_tier: Option<Value>,
}

#[derive(Default)]
struct ChoiceAcc {
    role: String,
    content: String,
    refusal: Option<String>,
    tool_calls: Vec<Value>,
    finish_reason: Value,
}

impl Assembler {
    pub fn push(&mut self, chunk: &Value) {
        if self.base.is_none() {
            self.base = Some(chunk.clone());
        }
        if !chunk["usage"].is_null() {
            self.usage = Some(chunk["usage"].clone());
        }
        if !chunk["service_tier"].is_null() {
            self.service_tier = Some(chunk["service_tier"].clone());
        }
        let Some(choices) = chunk["choices"].as_array() else {
            return;
        };
        for c in choices {
            let idx = usize::try_from(c["index"].as_u64().unwrap_or(0)).unwrap_or(0);
            if self.choices.len() <= idx {
                self.choices.resize_with(idx + 1, ChoiceAcc::default);
            }
            let acc = &mut self.choices[idx];
            let d = &c["delta"];
            if let Some(r) = d["role"].as_str() {
                acc.role = r.to_string();
            }
            if let Some(t) = d["content"].as_str() {
                acc.content.push_str(t);
            }
            if let Some(t) = d["refusal"].as_str() {
                acc.refusal.get_or_insert_with(String::new).push_str(t);
            }
            if let Some(calls) = d["tool_calls"].as_array() {
                for tc in calls {
                    let ti = usize::try_from(tc["index"].as_u64().unwrap_or(0)).unwrap_or(0);
                    while acc.tool_calls.len() <= ti {
                        acc.tool_calls.push(json!({"id": "", "type": "function", "function": {"name": "", "arguments": ""}}));
                    }
                    let slot = &mut acc.tool_calls[ti];
                    if let Some(id) = tc["id"].as_str() {
                        slot["id"] = json!(id);
                    }
                    if let Some(n) = tc["function"]["name"].as_str() {
                        let name =
                            format!("{}{}", slot["function"]["name"].as_str().unwrap_or(""), n);
                        slot["function"]["name"] = json!(name);
                    }
                    if let Some(a) = tc["function"]["arguments"].as_str() {
                        let args = format!(
                            "{}{}",
                            slot["function"]["arguments"].as_str().unwrap_or(""),
                            a
                        );
                        slot["function"]["arguments"] = json!(args);
                    }
                }
            }
            if !c["finish_reason"].is_null() {
                acc.finish_reason = c["finish_reason"].clone();
            }
        }
    }

    pub fn usage(&self) -> Option<&Value> {
        self.usage.as_ref()
    }

    pub fn finish(self) -> Value {
        let base = self.base.unwrap_or(Value::Null);
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let mut msg = Map::new();
                msg.insert("role".into(), json!(if c.role.is_empty() { "assistant" } else { c.role.as_str() }));
                msg.insert(
                    "content".into(),
                    if c.content.is_empty() && !c.tool_calls.is_empty() { Value::Null } else { json!(c.content) },
                );
                msg.insert("refusal".into(), c.refusal.map_or(Value::Null, Value::String));
                if !c.tool_calls.is_empty() {
                    msg.insert("tool_calls".into(), Value::Array(c.tool_calls));
                }
                json!({"index": i, "message": msg, "logprobs": null, "finish_reason": c.finish_reason})
            })
            .collect();
        let mut out = json!({
            "id": base["id"],
            "object": "chat.completion",
            "created": base["created"],
            "model": base["model"],
            "choices": choices,
        });
        if let Some(fp) = base.get("system_fingerprint") {
            out["system_fingerprint"] = fp.clone();
        }
        out["service_tier"] = self.service_tier.unwrap_or(Value::Null);
        if let Some(u) = self.usage {
            out["usage"] = u;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::formats::CallerFormat;

    fn body(s: &str) -> RawBody {
        RawBody::parse(s.as_bytes(), CallerFormat::ChatCompletions).unwrap()
    }

    #[test]
    fn defaults_pass_and_real_values_are_refused() {
        assert!(validate(&body(r#"{"presence_penalty":0,"frequency_penalty":0.0,"logit_bias":{},"logprobs":false,"top_logprobs":0,"seed":null,"stop":null,"n":1,"modalities":["text"],"audio":null}"#)).is_ok());
        for (f, v) in [
            ("presence_penalty", "0.5"),
            ("frequency_penalty", "-1"),
            ("logit_bias", r#"{"50256":-100}"#),
            ("logprobs", "true"),
            ("top_logprobs", "3"),
            ("seed", "7"),
            ("stop", r#"["\n"]"#),
            ("stop", r#""END""#),
            ("prediction", r#"{"type":"content","content":"x"}"#),
            ("audio", r#"{"voice":"alloy"}"#),
            ("web_search_options", "{}"),
            ("n", "2"),
            ("modalities", r#"["text","audio"]"#),
        ] {
            let e = validate(&body(&format!(r#"{{"{f}":{v}}}"#))).unwrap_err();
            assert_eq!(e.code, "unsupported_parameter", "{f}");
            assert_eq!(e.param.as_deref(), Some(f));
        }
    }

    #[test]
    fn assembles_text_tool_calls_and_usage() {
        let mut a = Assembler::default();
        for c in [
            json!({"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","service_tier":"flex","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\""}}]},"finish_reason":null}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]},"finish_reason":"tool_calls"}]}),
            json!({"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}),
        ] {
            a.push(&c);
        }
        let out = a.finish();
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["service_tier"], "flex");
        assert_eq!(out["choices"][0]["message"]["content"], "Hello");
        assert_eq!(
            out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out["usage"]["total_tokens"], 5);
    }

    #[test]
    fn role_only_chunks_are_not_content() {
        assert!(!chunk_has_content(
            &json!({"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]})
        ));
        assert!(chunk_has_content(
            &json!({"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]})
        ));
    }
}
