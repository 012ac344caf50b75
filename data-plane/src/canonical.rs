//! The canonical model every translation goes through (hub and spoke): each caller format
//! translates to and from it, and so does each provider, so 4 + 3 translators cover all 12 pairs.
//!
//! Conventions:
//! - Tool-call arguments are kept as the JSON *text* the model produced (`arguments`), never
//!   re-serialized, so streaming fragments concatenate to exactly the final string.
//! - Tool-call ids are opaque strings; `ids::` makes them safe for each provider's rules and maps
//!   them back (see `crate::ids`).
//! - Usage: `input_tokens` INCLUDES cached input; `output_tokens` INCLUDES reasoning tokens
//!   (OpenAI's convention). Providers that count otherwise convert at their edge.
//! - System prompts are kept as an ordered list; a format that has one field joins them with
//!   a blank line.

use flex_shared::catalog::Provider;
use serde_json::Value;

/// One request, independent of any wire format.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    pub model: String,
    /// System and developer instructions, in order.
    pub system: Vec<String>,
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: Option<bool>,
    pub max_output_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub response_format: Option<ResponseFormat>,
    pub reasoning: Option<Effort>,
    /// The Responses `web_search` tool (Gemini `google_search`).
    pub web_search: bool,
    pub stream: bool,
    /// Opaque end-user id, when the caller gave one.
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Image(Media),
    /// PDFs and other documents.
    File {
        media: Media,
        filename: Option<String>,
    },
    /// A call the assistant made.
    ToolCall(ToolCall),
    /// The caller's answer to a call (in a user turn).
    ToolResult(ToolResult),
    /// Model reasoning, replayed as the provider needs it (never flattened into text).
    Reasoning(Reasoning),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Media {
    Url(String),
    Base64 { mime: String, data: String },
}

impl Media {
    /// Parses `data:<mime>;base64,<data>`; anything else is a URL.
    pub fn from_url(url: &str) -> Self {
        if let Some(rest) = url.strip_prefix("data:") {
            if let Some((meta, data)) = rest.split_once(',') {
                if let Some(mime) = meta.strip_suffix(";base64") {
                    return Media::Base64 {
                        mime: mime.to_string(),
                        data: data.to_string(),
                    };
                }
            }
        }
        Media::Url(url.to_string())
    }

    /// As a URL (a data URL for inline data).
    pub fn to_url(&self) -> String {
        match self {
            Media::Url(u) => u.clone(),
            Media::Base64 { mime, data } => format!("data:{mime};base64,{data}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text of the arguments object.
    pub arguments: String,
    /// Provider-specific opaque data that must be replayed with the call (Gemini's
    /// `thoughtSignature`); never copied into another provider's ids.
    pub signature: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolResult {
    pub call_id: String,
    /// The function name, when known (Gemini requires it; Chat tool messages do not carry it:
    /// translators look it up from the matching call earlier in the conversation).
    pub name: Option<String>,
    /// The result as text (JSON text when the caller sent an object).
    pub content: String,
    pub is_error: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reasoning {
    pub text: String,
    /// Anthropic's `signature` / Gemini's `thoughtSignature`: replayed untouched.
    pub signature: Option<String>,
    /// Anthropic `redacted_thinking` data.
    pub redacted: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the parameters.
    pub parameters: Value,
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum ToolChoice {
    #[default]
    Auto,
    None,
    /// The model must call some tool.
    Required,
    /// The model must call this tool.
    Tool(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON matching a schema.
    JsonSchema {
        name: String,
        schema: Value,
        strict: Option<bool>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Effort {
    Minimal,
    Low,
    Medium,
    High,
}

impl Effort {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "minimal" | "none" => Some(Effort::Minimal),
            "low" => Some(Effort::Low),
            "medium" => Some(Effort::Medium),
            "high" | "xhigh" => Some(Effort::High),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Effort::Minimal => "minimal",
            Effort::Low => "low",
            Effort::Medium => "medium",
            Effort::High => "high",
        }
    }

    /// A thinking-token budget for providers that take one (Anthropic `budget_tokens`).
    pub fn budget_tokens(self) -> u64 {
        match self {
            Effort::Minimal => 1024,
            Effort::Low => 2048,
            Effort::Medium => 8192,
            Effort::High => 24576,
        }
    }

    /// The nearest effort for a token budget.
    pub fn from_budget(tokens: u64) -> Self {
        match tokens {
            0..=1535 => Effort::Minimal,
            1536..=4095 => Effort::Low,
            4096..=16383 => Effort::Medium,
            _ => Effort::High,
        }
    }
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StopReason {
    #[default]
    EndTurn,
    MaxTokens,
    ToolUse,
    StopSequence,
    ContentFilter,
    Refusal,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// All input tokens, cached included.
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    /// All output tokens, reasoning included.
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// A complete answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Response {
    /// The provider's response id.
    pub id: String,
    pub model: String,
    /// Assistant output in order: text, tool calls, reasoning.
    pub content: Vec<Part>,
    pub stop: StopReason,
    pub usage: Usage,
    /// Unix seconds.
    pub created: u64,
    /// The provider that answered (from the stream's `Start`), when known: caller formats name
    /// some tiers after it (an Anthropic standard answer reports `"standard"`).
    pub provider: Option<Provider>,
}

/// The most items a provider may number in one answer: output items, content blocks, tool calls,
/// choices (an index is valid below it).
///
/// Indexes in a provider's stream chunks address the collections a decoder, an encoder or an
/// assembler keeps (and an assembler would size a list by one), so they are upstream bytes we
/// must not trust: one chunk with `"index": 1000000000000` must not become a terabyte
/// allocation (an abort) or a scan of a list that long. Real answers number a handful (a Chat
/// Completions answer has one choice; the models we route emit at most a few dozen blocks), so
/// 1024 leaves ample room. A stream past it ends as malformed: the caller's error event, or a
/// 502 `upstream_incomplete`, and usage `incomplete` (see [`past_limit`]).
pub const MAX_INDEX: usize = 1024;

/// A provider-driven `index` checked against [`MAX_INDEX`]; past it, why it is refused (for
/// [`StreamEvent::malformed`]). `what` names it, e.g. `` "`output_index`" ``.
pub fn bounded_index(provider: Provider, what: &str, n: u64) -> Result<usize, String> {
    match usize::try_from(n) {
        Ok(i) if i < MAX_INDEX => Ok(i),
        _ => Err(past_limit(provider, &format!("{what} {n}"))),
    }
}

/// Why a stream whose provider numbered `what` past [`MAX_INDEX`] is refused.
pub fn past_limit(provider: Provider, what: &str) -> String {
    format!(
        "the provider ({provider}) sent {what}, past the limit of {MAX_INDEX} items in one answer; the stream is malformed and was stopped"
    )
}

/// One event of a canonical stream. Blocks are numbered by `index` in output order; every block
/// is opened, receives deltas, and is closed before `Finish`. Every decoder keeps `index` below
/// [`MAX_INDEX`] and opens fewer than [`MAX_INDEX`] blocks, whatever its provider sends.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The stream has begun (before any content).
    Start {
        id: String,
        model: String,
        created: u64,
        /// The provider answering (set by its decoder).
        provider: Option<Provider>,
    },
    TextStart {
        index: usize,
    },
    TextDelta {
        index: usize,
        text: String,
    },
    ToolCallStart {
        index: usize,
        id: String,
        name: String,
        signature: Option<String>,
    },
    /// A fragment of the arguments' JSON text.
    ToolCallDelta {
        index: usize,
        arguments: String,
    },
    ReasoningStart {
        index: usize,
    },
    ReasoningDelta {
        index: usize,
        text: String,
    },
    /// A reasoning block's signature (Anthropic sends it last).
    ReasoningSignature {
        index: usize,
        signature: String,
    },
    BlockStop {
        index: usize,
    },
    /// The end, with the real usage (never synthesized zeros).
    Finish {
        stop: StopReason,
        usage: Usage,
    },
    /// The provider reported an error mid-stream.
    Error {
        message: String,
        /// The error's code in the caller's format: `upstream_error` (the provider reported
        /// it) or `upstream_incomplete` (the answer was cut off or failed after it started).
        code: &'static str,
    },
}

impl StreamEvent {
    /// The error ending a stream whose provider sent malformed data (e.g. an index past
    /// [`MAX_INDEX`]): like a cut-off answer, `upstream_incomplete` to the caller.
    pub fn malformed(message: String) -> Self {
        StreamEvent::Error {
            message,
            code: "upstream_incomplete",
        }
    }

    /// Whether this event means the provider has begun to answer (for the race).
    pub fn is_content(&self) -> bool {
        !matches!(self, StreamEvent::Start { .. })
    }
}

/// Builds a [`Response`] from stream events (non-streaming callers of a streamed upstream).
#[derive(Debug, Default)]
pub struct Accumulator {
    response: Response,
    /// Stream block index → position in `response.content`.
    slots: Vec<(usize, usize)>,
    pub finished: bool,
    pub error: Option<String>,
    /// A block past [`MAX_INDEX`] was refused: every later event is ignored.
    refused: bool,
}

impl Accumulator {
    /// Whether a block `index` may be opened: below [`MAX_INDEX`], and fewer than that many
    /// parts (decoders guarantee both; this keeps the assembled body bounded regardless).
    fn may_open(&mut self, index: usize) -> bool {
        if index < MAX_INDEX && self.response.content.len() < MAX_INDEX {
            return true;
        }
        if self.error.is_none() {
            self.error = Some(format!(
                "the answer numbered block {index} or opened more than {MAX_INDEX} blocks, past the limit of {MAX_INDEX} items in one answer"
            ));
        }
        self.refused = true;
        false
    }

    fn slot(&mut self, index: usize) -> Option<&mut Part> {
        let pos = self
            .slots
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, p)| *p)?;
        self.response.content.get_mut(pos)
    }

    fn open(&mut self, index: usize, part: Part) {
        if !self.may_open(index) {
            return;
        }
        self.slots.push((index, self.response.content.len()));
        self.response.content.push(part);
    }

    pub fn push(&mut self, ev: &StreamEvent) {
        if self.refused {
            // Past a bound: the answer is malformed, and stays unfinished.
            return;
        }
        match ev {
            StreamEvent::Start {
                id,
                model,
                created,
                provider,
            } => {
                self.response.id = id.clone();
                self.response.model = model.clone();
                self.response.created = *created;
                self.response.provider = *provider;
            }
            StreamEvent::TextStart { index } => self.open(*index, Part::Text(String::new())),
            StreamEvent::TextDelta { index, text } => match self.slot(*index) {
                Some(Part::Text(t)) => t.push_str(text),
                _ => self.open(*index, Part::Text(text.clone())),
            },
            StreamEvent::ToolCallStart {
                index,
                id,
                name,
                signature,
            } => self.open(
                *index,
                Part::ToolCall(ToolCall {
                    id: id.clone(),
                    name: name.clone(),
                    arguments: String::new(),
                    signature: signature.clone(),
                }),
            ),
            StreamEvent::ToolCallDelta { index, arguments } => {
                if let Some(Part::ToolCall(c)) = self.slot(*index) {
                    c.arguments.push_str(arguments);
                }
            }
            StreamEvent::ReasoningStart { index } => {
                self.open(*index, Part::Reasoning(Reasoning::default()))
            }
            StreamEvent::ReasoningDelta { index, text } => match self.slot(*index) {
                Some(Part::Reasoning(r)) => r.text.push_str(text),
                _ => self.open(
                    *index,
                    Part::Reasoning(Reasoning {
                        text: text.clone(),
                        ..Reasoning::default()
                    }),
                ),
            },
            StreamEvent::ReasoningSignature { index, signature } => {
                if let Some(Part::Reasoning(r)) = self.slot(*index) {
                    r.signature = Some(signature.clone());
                }
            }
            StreamEvent::BlockStop { .. } => {}
            StreamEvent::Finish { stop, usage } => {
                self.response.stop = *stop;
                self.response.usage = *usage;
                self.finished = true;
            }
            StreamEvent::Error { message, .. } => self.error = Some(message.clone()),
        }
    }

    /// The `n`-th part accumulated so far.
    pub fn part(&self, n: usize) -> Option<&Part> {
        self.response.content.get(n)
    }

    pub fn finish(mut self) -> Response {
        // An empty tool call's arguments are an empty object, never an empty string.
        for p in &mut self.response.content {
            if let Part::ToolCall(c) = p {
                if c.arguments.trim().is_empty() {
                    c.arguments = "{}".into();
                }
            }
        }
        self.response
    }
}

/// Turns a complete [`Response`] into stream events (for a provider answer that was not
/// streamed, or tests).
pub fn events_of(r: &Response) -> Vec<StreamEvent> {
    let mut out = vec![StreamEvent::Start {
        id: r.id.clone(),
        model: r.model.clone(),
        created: r.created,
        provider: r.provider,
    }];
    for (index, part) in r.content.iter().enumerate() {
        match part {
            Part::Text(t) => {
                out.push(StreamEvent::TextStart { index });
                out.push(StreamEvent::TextDelta {
                    index,
                    text: t.clone(),
                });
            }
            Part::ToolCall(c) => {
                out.push(StreamEvent::ToolCallStart {
                    index,
                    id: c.id.clone(),
                    name: c.name.clone(),
                    signature: c.signature.clone(),
                });
                out.push(StreamEvent::ToolCallDelta {
                    index,
                    arguments: c.arguments.clone(),
                });
            }
            Part::Reasoning(rs) => {
                out.push(StreamEvent::ReasoningStart { index });
                if !rs.text.is_empty() {
                    out.push(StreamEvent::ReasoningDelta {
                        index,
                        text: rs.text.clone(),
                    });
                }
                if let Some(s) = &rs.signature {
                    out.push(StreamEvent::ReasoningSignature {
                        index,
                        signature: s.clone(),
                    });
                }
            }
            _ => continue,
        }
        out.push(StreamEvent::BlockStop { index });
    }
    out.push(StreamEvent::Finish {
        stop: r.stop,
        usage: r.usage,
    });
    out
}

/// Joins system prompts for formats with a single system field.
pub fn join_system(system: &[String]) -> Option<String> {
    (!system.is_empty()).then(|| system.join("\n\n"))
}

/// Finds the name of the tool call `call_id` earlier in the conversation.
pub fn call_name(messages: &[Message], call_id: &str) -> Option<String> {
    messages
        .iter()
        .flat_map(|m| &m.parts)
        .find_map(|p| match p {
            Part::ToolCall(c) if c.id == call_id => Some(c.name.clone()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_split_and_join() {
        let m = Media::from_url("data:image/png;base64,AAAA");
        assert_eq!(
            m,
            Media::Base64 {
                mime: "image/png".into(),
                data: "AAAA".into()
            }
        );
        assert_eq!(m.to_url(), "data:image/png;base64,AAAA");
        assert_eq!(
            Media::from_url("https://x/y.png"),
            Media::Url("https://x/y.png".into())
        );
    }

    #[test]
    fn accumulator_round_trips_events() {
        let r = Response {
            id: "r1".into(),
            model: "m".into(),
            content: vec![
                Part::Reasoning(Reasoning {
                    text: "think".into(),
                    signature: Some("sig".into()),
                    redacted: None,
                }),
                Part::Text("hello".into()),
                Part::ToolCall(ToolCall {
                    id: "c1".into(),
                    name: "f".into(),
                    arguments: "{\"a\":1}".into(),
                    signature: None,
                }),
            ],
            stop: StopReason::ToolUse,
            usage: Usage {
                input_tokens: 10,
                cached_input_tokens: 2,
                output_tokens: 5,
                reasoning_tokens: 1,
            },
            created: 7,
            provider: Some(Provider::OpenAi),
        };
        let mut acc = Accumulator::default();
        for e in events_of(&r) {
            acc.push(&e);
        }
        assert!(acc.finished);
        assert_eq!(acc.finish(), r);
    }

    #[test]
    fn indexes_past_the_limit_are_refused() {
        assert_eq!(bounded_index(Provider::OpenAi, "`index`", 0), Ok(0));
        assert_eq!(
            bounded_index(Provider::OpenAi, "`index`", MAX_INDEX as u64 - 1),
            Ok(MAX_INDEX - 1)
        );
        for n in [MAX_INDEX as u64, 1025, 1_000_000_000_000, u64::MAX] {
            match bounded_index(Provider::Gemini, "`index`", n) {
                Err(message) => {
                    assert!(message.contains(&format!("`index` {n}")), "{message}");
                    assert!(message.contains("1024"), "{message}");
                }
                other => panic!("{n}: {other:?}"),
            }
        }
    }

    /// The assembler itself refuses a block past the limit (whatever a decoder let through):
    /// it stays unfinished with the reason, and allocates nothing by the index.
    #[test]
    fn the_accumulator_refuses_blocks_past_the_limit() {
        let mut acc = Accumulator::default();
        acc.push(&StreamEvent::TextStart { index: 0 });
        acc.push(&StreamEvent::TextStart {
            index: 1_000_000_000_000,
        });
        acc.push(&StreamEvent::Finish {
            stop: StopReason::EndTurn,
            usage: Usage::default(),
        });
        assert!(!acc.finished);
        assert!(acc.error.as_deref().is_some_and(|e| e.contains("1024")));

        let mut acc = Accumulator::default();
        for index in 0..=MAX_INDEX {
            acc.push(&StreamEvent::TextStart { index: index % 4 });
        }
        assert!(!acc.finished && acc.error.is_some(), "too many blocks");
        assert_eq!(acc.response.content.len(), MAX_INDEX);
    }

    #[test]
    fn effort_budget_mapping_is_monotonic() {
        for e in [Effort::Minimal, Effort::Low, Effort::Medium, Effort::High] {
            assert_eq!(Effort::from_budget(e.budget_tokens()), e);
        }
    }
}
