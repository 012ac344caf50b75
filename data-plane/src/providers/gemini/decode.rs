//! Gemini events → race classification and canonical stream events.

use std::time::{SystemTime, UNIX_EPOCH};

use flex_shared::catalog::{Provider, Tier};
use serde_json::Value;

use super::served_tier;
use crate::canonical::{self as c, StopReason, StreamEvent, Usage};
use crate::ids;
use crate::providers::Decoder;
use crate::race::EventClass;
use crate::sse::Event;

/// How a raw upstream event counts for the flex race.
pub fn classify(ev: &Event) -> EventClass {
    let data = ev.data.trim();
    if data.is_empty() {
        return EventClass::Lifecycle;
    }
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return EventClass::Error;
    };
    if let Some(err) = v.get("error") {
        return match err["status"].as_str() {
            Some("RESOURCE_EXHAUSTED" | "UNAVAILABLE") => EventClass::CapacityError,
            _ if matches!(err["code"].as_u64(), Some(429 | 503)) => EventClass::CapacityError,
            _ => EventClass::Error,
        };
    }
    let started = v["candidates"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            c["content"]["parts"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
                || c["finishReason"].is_string()
        })
    }) || v["promptFeedback"]["blockReason"].is_string();
    if started {
        EventClass::Start
    } else {
        EventClass::Lifecycle
    }
}

/// The canonical stop reason for a `finishReason`.
pub fn stop_reason(finish: &str, saw_tool_call: bool) -> StopReason {
    match finish {
        "MAX_TOKENS" => StopReason::MaxTokens,
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => StopReason::ContentFilter,
        "MALFORMED_FUNCTION_CALL"
        | "UNEXPECTED_TOOL_CALL"
        | "TOO_MANY_TOOL_CALLS"
        | "MISSING_THOUGHT_SIGNATURE"
        | "MALFORMED_RESPONSE" => StopReason::Error,
        _ if saw_tool_call => StopReason::ToolUse,
        _ => StopReason::EndTurn,
    }
}

/// Canonical usage from `usageMetadata` (trap 6): input = prompt (cached included) + tool-use
/// prompt tokens (billed as input); output = candidates + thoughts, since Gemini's candidates
/// EXCLUDE thoughts.
pub fn usage_of(meta: &Value) -> Usage {
    let n = |k: &str| meta[k].as_u64().unwrap_or(0);
    Usage {
        // Saturating: a provider's counts near u64::MAX must not wrap the bill.
        input_tokens: n("promptTokenCount").saturating_add(n("toolUsePromptTokenCount")),
        cached_input_tokens: n("cachedContentTokenCount"),
        output_tokens: n("candidatesTokenCount").saturating_add(n("thoughtsTokenCount")),
        reasoning_tokens: n("thoughtsTokenCount"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Reasoning,
}

/// Gemini SSE → canonical events. Every part opens at most one block, so the number of blocks
/// (and the candidate's `index`) is checked against [`c::MAX_INDEX`]: past it the stream ends as
/// malformed.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    started: bool,
    finished: bool,
    /// The open text or reasoning block and its index.
    open: Option<(Open, usize)>,
    next_index: usize,
    /// A function call was seen in any chunk: a later `STOP` means tool use (trap 5).
    saw_tool_call: bool,
    usage: Usage,
    served: Option<Tier>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    fn close(&mut self, out: &mut Vec<StreamEvent>) {
        if let Some((_, index)) = self.open.take() {
            out.push(StreamEvent::BlockStop { index });
        }
    }

    /// Ends the stream as malformed: nothing after it is decoded.
    fn fail(&mut self, why: String, out: &mut Vec<StreamEvent>) {
        out.push(StreamEvent::malformed(why));
        self.finished = true;
    }

    /// The index of a new block, or `None` (the stream refused) past the limit.
    fn next_block(&mut self, out: &mut Vec<StreamEvent>) -> Option<usize> {
        if self.next_index >= c::MAX_INDEX {
            let what = format!("more than {} content parts", c::MAX_INDEX);
            self.fail(c::past_limit(Provider::Gemini, &what), out);
            return None;
        }
        let index = self.next_index;
        self.next_index += 1;
        Some(index)
    }

    /// The index of an open block of `kind`, opening one (and closing another kind) as needed;
    /// `None` when the stream was refused.
    fn ensure(&mut self, kind: Open, out: &mut Vec<StreamEvent>) -> Option<usize> {
        if let Some((k, index)) = self.open {
            if k == kind {
                return Some(index);
            }
        }
        self.close(out);
        let index = self.next_block(out)?;
        out.push(match kind {
            Open::Text => StreamEvent::TextStart { index },
            Open::Reasoning => StreamEvent::ReasoningStart { index },
        });
        self.open = Some((kind, index));
        Some(index)
    }

    fn part(&mut self, part: &Value, out: &mut Vec<StreamEvent>) {
        let signature = part["thoughtSignature"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        if let Some(fc) = part.get("functionCall") {
            self.close(out);
            let Some(index) = self.next_block(out) else {
                return;
            };
            let id = fc["id"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .unwrap_or_else(ids::generate);
            let args = match fc.get("args") {
                Some(a) if a.is_object() => a.to_string(),
                _ => "{}".to_string(),
            };
            out.push(StreamEvent::ToolCallStart {
                index,
                id,
                name: fc["name"].as_str().unwrap_or_default().to_string(),
                signature,
            });
            out.push(StreamEvent::ToolCallDelta {
                index,
                arguments: args,
            });
            out.push(StreamEvent::BlockStop { index });
            self.saw_tool_call = true;
            return;
        }
        let Some(text) = part["text"].as_str() else {
            // Inline data, executable code and other parts have no canonical form.
            return;
        };
        if part["thought"].as_bool() == Some(true) {
            let Some(index) = self.ensure(Open::Reasoning, out) else {
                return;
            };
            if !text.is_empty() {
                out.push(StreamEvent::ReasoningDelta {
                    index,
                    text: text.to_string(),
                });
            }
            if let Some(signature) = signature {
                out.push(StreamEvent::ReasoningSignature { index, signature });
            }
        } else if !text.is_empty() {
            let Some(index) = self.ensure(Open::Text, out) else {
                return;
            };
            out.push(StreamEvent::TextDelta {
                index,
                text: text.to_string(),
            });
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Decoder for StreamDecoder {
    fn decode(&mut self, ev: &Event, out: &mut Vec<StreamEvent>) {
        let data = ev.data.trim();
        if data.is_empty() || self.finished {
            return;
        }
        let v = match serde_json::from_str::<Value>(data) {
            Ok(v) => v,
            Err(e) => {
                out.push(StreamEvent::Error {
                    code: "upstream_error",
                    message: format!("Gemini sent an event that is not JSON: {e}"),
                });
                return;
            }
        };
        if let Some(err) = v.get("error") {
            let status = err["status"].as_str().unwrap_or("UNKNOWN");
            let message = err["message"].as_str().unwrap_or("no message");
            out.push(StreamEvent::Error {
                code: "upstream_error",
                message: format!("Gemini error {status}: {message}"),
            });
            return;
        }
        if !self.started {
            self.started = true;
            out.push(StreamEvent::Start {
                id: v["responseId"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("gemini_{}", uuid::Uuid::new_v4().simple())),
                model: v["modelVersion"].as_str().unwrap_or_default().to_string(),
                created: now_secs(),
                provider: Some(Provider::Gemini),
            });
        }
        if let Some(meta) = v.get("usageMetadata").filter(|m| m.is_object()) {
            self.usage = usage_of(meta);
            if let Some(t) = meta["serviceTier"].as_str().and_then(served_tier) {
                self.served = Some(t);
            }
        }
        let candidate = &v["candidates"][0];
        // One candidate is asked for; its `index` is checked like every provider-driven index.
        if let Err(why) = c::bounded_index(
            Provider::Gemini,
            "candidate `index`",
            candidate["index"].as_u64().unwrap_or(0),
        ) {
            return self.fail(why, out);
        }
        if let Some(parts) = candidate["content"]["parts"].as_array() {
            for p in parts {
                self.part(p, out);
                if self.finished {
                    return;
                }
            }
        }
        let finish = candidate["finishReason"]
            .as_str()
            .filter(|f| *f != "FINISH_REASON_UNSPECIFIED");
        let blocked = v["promptFeedback"]["blockReason"].is_string() && finish.is_none();
        if finish.is_some() || blocked {
            self.close(out);
            self.finished = true;
            let stop = if blocked {
                StopReason::ContentFilter
            } else {
                stop_reason(finish.unwrap_or("STOP"), self.saw_tool_call)
            };
            out.push(StreamEvent::Finish {
                stop,
                usage: self.usage,
            });
        }
    }

    fn served_tier(&self) -> Option<Tier> {
        self.served
    }
}
