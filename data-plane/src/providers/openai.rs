//! OpenAI: Responses (`POST {base}/responses`) and Chat Completions (`POST {base}/chat/completions`).

use bytes::Bytes;
use flex_shared::catalog::Tier;
use http_body_util::Full;
use secrecy::{ExposeSecret, SecretString};

use super::AskTier;
use crate::error::ApiError;

/// The OpenAI API a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Responses,
    Chat,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::Responses => "/responses",
            Api::Chat => "/chat/completions",
        }
    }
}

/// The `service_tier` value for a tier.
pub fn tier_value(t: AskTier) -> &'static str {
    match t {
        AskTier::Flex => "flex",
        AskTier::Standard => "default",
        AskTier::Priority => "priority",
        AskTier::Auto => "auto",
    }
}

/// The tier OpenAI reports in a response's `service_tier`.
pub fn served_tier(v: &str) -> Option<Tier> {
    match v {
        "flex" => Some(Tier::Flex),
        "default" | "auto" | "scale" => Some(Tier::Standard),
        "priority" | "fast" | "ultrafast" => Some(Tier::Priority),
        _ => None,
    }
}

pub fn request(
    base: &str,
    api: Api,
    key: &SecretString,
    body: Bytes,
    stream: bool,
) -> Result<http::Request<Full<Bytes>>, ApiError> {
    let url = format!("{}{}", base.trim_end_matches('/'), api.path());
    http::Request::post(&url)
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", key.expose_secret()),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::ACCEPT,
            if stream {
                "text/event-stream"
            } else {
                "application/json"
            },
        )
        .body(Full::new(body))
        .map_err(|e| {
            ApiError::new(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "bad_upstream_url",
                format!("The OpenAI base URL `{base}` does not form a valid request URL: {e}."),
            )
            .fix("correct --openai-base-url (e.g. https://api.openai.com/v1).")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_map_both_ways() {
        assert_eq!(tier_value(AskTier::Standard), "default");
        assert_eq!(tier_value(AskTier::Flex), "flex");
        assert_eq!(served_tier("default"), Some(Tier::Standard));
        assert_eq!(served_tier("flex"), Some(Tier::Flex));
        assert_eq!(served_tier("priority"), Some(Tier::Priority));
    }
}
