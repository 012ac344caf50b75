//! Upstream providers: one module each, around the same few questions (how to address a request
//! for a tier, which event means "started", which error means "no capacity").

pub mod anthropic;
pub mod gemini;
pub mod openai;

use flex_shared::catalog::{Provider, Tier};
use http::StatusCode;

use crate::canonical::StreamEvent;
use crate::sse::Event;

/// Turns a provider's stream events into canonical events. Stateful: it remembers open blocks,
/// tool calls seen (so a later `STOP` still means tool use), and usage until the end.
pub trait Decoder: Send {
    /// Decodes one upstream SSE event, appending zero or more canonical events.
    fn decode(&mut self, ev: &Event, out: &mut Vec<StreamEvent>);
    /// The tier the provider reported serving, once known.
    fn served_tier(&self) -> Option<Tier>;
}

/// The tier we ask a provider for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AskTier {
    Flex,
    Standard,
    Priority,
    Auto,
}

impl AskTier {
    pub fn as_str(self) -> &'static str {
        match self {
            AskTier::Flex => "flex",
            AskTier::Standard => "standard",
            AskTier::Priority => "priority",
            AskTier::Auto => "auto",
        }
    }

    /// The tier we assume served the request when the provider does not say.
    pub fn assumed_served(self) -> Tier {
        match self {
            AskTier::Flex => Tier::Flex,
            AskTier::Priority => Tier::Priority,
            AskTier::Standard | AskTier::Auto => Tier::Standard,
        }
    }
}

/// Provider base URLs (each SDK's convention: OpenAI's includes `/v1`).
#[derive(Debug, Clone)]
pub struct BaseUrls {
    pub openai: String,
    pub anthropic: String,
    pub gemini: String,
}

impl Default for BaseUrls {
    fn default() -> Self {
        Self {
            openai: "https://api.openai.com/v1".into(),
            anthropic: "https://api.anthropic.com".into(),
            gemini: "https://generativelanguage.googleapis.com".into(),
        }
    }
}

impl BaseUrls {
    pub fn for_provider(&self, p: Provider) -> &str {
        match p {
            Provider::OpenAi => &self.openai,
            Provider::Anthropic => &self.anthropic,
            Provider::Gemini => &self.gemini,
        }
    }
}

/// Capacity errors are worth retrying on flex; anything else would fail on standard too.
pub fn is_capacity_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 503 | 529)
}
