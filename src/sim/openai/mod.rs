//! OpenAI: `POST /v1/responses` and `POST /v1/chat/completions`; what both share (auth, tiers,
//! the error envelope, headers).

pub(crate) mod chat;
pub(crate) mod responses;

use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{json, Value};

use super::answer::random_hex;
use super::engine::{bearer, check_key, ErrorKind, KeyProblem, Knobs, SimError, SimState};
use super::stats::{Provider, Tier};

fn authenticate(state: &SimState, headers: &HeaderMap) -> Result<(), SimError> {
    let given = bearer(headers);
    check_key(state.config().openai_key.as_deref(), given).map_err(|problem| {
        SimError::unauthenticated(match problem {
            KeyProblem::Missing => "You didn't provide an API key. You need to provide your API \
                 key in an Authorization header using Bearer auth (i.e. Authorization: Bearer \
                 YOUR_KEY)."
                .to_owned(),
            KeyProblem::Wrong => format!(
                "Incorrect API key provided: {}. You can find your API key at \
                 https://platform.openai.com/account/api-keys.",
                redact(given.unwrap_or_default())
            ),
        })
    })
}

/// `sk-...abcd`, as OpenAI shows a wrong key.
fn redact(key: &str) -> String {
    let tail = key
        .char_indices()
        .rev()
        .nth(3)
        .map_or(key, |(start, _)| &key[start..]);
    format!("sk-...{tail}")
}

/// The tier a request is served on: absent/`default`/`scale` → default, `flex`, `priority`/`fast`
/// → priority, `auto` → default (or the directive's `served_tier`).
fn tier(requested: Option<&Value>, knobs: &Knobs) -> Result<Tier, SimError> {
    match requested {
        None | Some(Value::Null) => Ok(Tier::Standard),
        Some(Value::String(tier)) => match tier.as_str() {
            "default" | "scale" => Ok(Tier::Standard),
            "flex" => Ok(Tier::Flex),
            "priority" | "fast" | "ultrafast" => Ok(Tier::Priority),
            "auto" => Ok(knobs.served_tier.unwrap_or(Tier::Standard)),
            other => Err(invalid_tier(other)),
        },
        Some(other) => Err(invalid_tier(&other.to_string())),
    }
}

fn invalid_tier(value: &str) -> SimError {
    SimError::invalid(
        format!(
            "Invalid value: '{value}'. Supported values are: 'auto', 'default', 'flex', 'scale' \
             and 'priority'."
        ),
        Some("service_tier"),
    )
}

fn tier_name(tier: Tier) -> &'static str {
    Provider::OpenAi.served_name(tier)
}

/// The fields every OpenAI request must have.
fn parse_request(state: &SimState, headers: &HeaderMap, body: &[u8]) -> Result<Value, SimError> {
    authenticate(state, headers)?;
    let request: Value = serde_json::from_slice(body).map_err(|err| SimError::bad_json(&err))?;
    if !request.is_object() {
        return Err(SimError::invalid(
            "The request body must be a JSON object.",
            None,
        ));
    }
    if request.get("model").and_then(Value::as_str).is_none() {
        return Err(SimError::invalid(
            "Missing required parameter: 'model'.",
            Some("model"),
        ));
    }
    Ok(request)
}

fn request_id_header() -> [(HeaderName, HeaderValue); 1] {
    let id = format!("req_{}", random_hex());
    let value = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("req_sim"));
    [(HeaderName::from_static("x-request-id"), value)]
}

/// A JSON body with OpenAI's headers.
fn json_response(body: Value) -> Response {
    (request_id_header(), Json(body)).into_response()
}

/// `{"error":{"message","type","param","code"}}` with the error's status.
fn error_response(err: SimError) -> Response {
    let (kind, code) = match err.kind {
        ErrorKind::InvalidRequest => ("invalid_request_error", None),
        ErrorKind::Authentication => ("invalid_request_error", Some("invalid_api_key")),
        ErrorKind::Permission => ("invalid_request_error", Some("permission_denied")),
        ErrorKind::NotFound => ("invalid_request_error", Some("model_not_found")),
        ErrorKind::RateLimit => ("requests", Some("rate_limit_exceeded")),
        ErrorKind::Capacity if err.status.as_u16() == 429 => {
            ("rate_limit_error", Some("resource_unavailable"))
        }
        ErrorKind::Capacity => ("server_error", Some("resource_unavailable")),
        ErrorKind::Overloaded => ("server_error", Some("server_overloaded")),
        ErrorKind::Server => ("server_error", None),
    };
    // `error_code=insufficient_quota` reads like OpenAI's: the type is the code too.
    let (kind, code) = match err.code.as_deref() {
        Some("insufficient_quota") => ("insufficient_quota", Some("insufficient_quota")),
        Some(c) => (kind, Some(c)),
        None => (kind, code),
    };
    let body = json!({"error": {
        "message": err.message,
        "type": kind,
        "param": err.param,
        "code": code,
    }});
    let mut resp = (err.status, request_id_header(), Json(body)).into_response();
    super::engine::error_extras(&err, &mut resp);
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::sim::test_util::TestSim;
    use crate::sim::SimConfig;

    #[test]
    fn tiers() {
        let sim = SimState::new(SimConfig::default(), Default::default());
        let plain = sim.knobs(&Default::default());
        let t = |v: Value| tier(Some(&v), &plain).map_err(|e| e.param);
        assert_eq!(tier(None, &plain).ok(), Some(Tier::Standard));
        assert_eq!(t(json!("auto")), Ok(Tier::Standard));
        assert_eq!(t(json!("flex")), Ok(Tier::Flex));
        assert_eq!(t(json!("fast")), Ok(Tier::Priority));
        assert_eq!(t(json!("cheap")), Err(Some("service_tier")));
        assert_eq!(redact("sk-abcdef"), "sk-...cdef");
    }

    #[tokio::test]
    async fn auth_errors_use_openai_envelope() {
        let sim = TestSim::start(SimConfig {
            openai_key: Some("sk-good".into()),
            ..SimConfig::default()
        })
        .await;
        let body = json!({"model": "gpt-5", "input": "hi"});
        for (key, message) in [
            (None, "didn't provide"),
            (Some("sk-bad"), "Incorrect API key"),
        ] {
            let (status, reply) = sim
                .post_json("/v1/responses", key_headers(key), &body)
                .await;
            assert_eq!(status, 401);
            assert_eq!(reply["error"]["code"], "invalid_api_key");
            assert_eq!(reply["error"]["param"], Value::Null);
            assert!(reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains(message));
        }
        let (status, _) = sim
            .post_json("/v1/responses", key_headers(Some("sk-good")), &body)
            .await;
        assert_eq!(status, 200);
        let (status, reply) = sim
            .post_json(
                "/v1/chat/completions",
                key_headers(Some("sk-good")),
                &json!({"messages": []}),
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(reply["error"]["param"], "model");
    }

    fn key_headers(key: Option<&str>) -> Vec<(&'static str, String)> {
        key.map(|k| vec![("authorization", format!("Bearer {k}"))])
            .unwrap_or_default()
    }
}
