//! Anthropic events → race classification and canonical stream events.

use std::time::{SystemTime, UNIX_EPOCH};

use flex_shared::catalog::{Provider, Tier};
use serde_json::Value;

use super::served_tier;
use crate::canonical::{self as c, StopReason, StreamEvent, Usage};
use crate::providers::Decoder;
use crate::race::EventClass;
use crate::sse::Event;

/// How a raw upstream event counts for the race.
pub fn classify(ev: &Event) -> EventClass {
    let data: Option<Value> = if ev.event.is_empty() || ev.event == "error" {
        serde_json::from_str(&ev.data).ok()
    } else {
        None
    };
    let name = if ev.event.is_empty() {
        data.as_ref()
            .and_then(|d| d["type"].as_str())
            .unwrap_or_default()
    } else {
        ev.event.as_str()
    };
    match name {
        "content_block_start"
        | "content_block_delta"
        | "content_block_stop"
        | "message_delta"
        | "message_stop" => EventClass::Start,
        "error" => match data.as_ref().and_then(|d| d["error"]["type"].as_str()) {
            Some("overloaded_error" | "rate_limit_error") => EventClass::CapacityError,
            _ => EventClass::Error,
        },
        _ => EventClass::Lifecycle,
    }
}

/// Anthropic `stop_reason` → canonical.
pub fn stop_reason(s: &str) -> StopReason {
    match s {
        "max_tokens" | "model_context_window_exceeded" => StopReason::MaxTokens,
        "tool_use" => StopReason::ToolUse,
        "stop_sequence" => StopReason::StopSequence,
        "refusal" => StopReason::Refusal,
        _ => StopReason::EndTurn,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Tool,
    Reasoning,
}

#[derive(Debug)]
struct Open {
    upstream: u64,
    index: usize,
    kind: Kind,
    has_args: bool,
}

/// Anthropic SSE → canonical events. Blocks are renumbered densely (server-tool and redacted
/// blocks are skipped); usage is kept from `message_start` and `message_delta` and emitted once,
/// real, with `Finish` at `message_stop`. The provider's `index` and the number of blocks are
/// checked against [`c::MAX_INDEX`]: past it the stream ends as malformed.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    open: Vec<Open>,
    next_index: usize,
    input: u64,
    cache_read: u64,
    cache_creation: u64,
    output: u64,
    thinking: u64,
    stop: Option<StopReason>,
    saw_tool: bool,
    tier: Option<Tier>,
    finished: bool,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    fn usage(&self) -> Usage {
        Usage {
            // Saturating: a provider's counts near u64::MAX must not wrap the bill.
            input_tokens: self
                .input
                .saturating_add(self.cache_read)
                .saturating_add(self.cache_creation),
            cached_input_tokens: self.cache_read,
            output_tokens: self.output,
            reasoning_tokens: self.thinking,
        }
    }

    /// Reads a (cumulative) usage object; absent fields keep their earlier value.
    fn read_usage(&mut self, u: &Value) {
        let set = |slot: &mut u64, v: &Value| {
            if let Some(n) = v.as_u64() {
                *slot = n;
            }
        };
        set(&mut self.input, &u["input_tokens"]);
        set(&mut self.cache_read, &u["cache_read_input_tokens"]);
        set(&mut self.cache_creation, &u["cache_creation_input_tokens"]);
        set(&mut self.output, &u["output_tokens"]);
        set(
            &mut self.thinking,
            &u["output_tokens_details"]["thinking_tokens"],
        );
        if let Some(t) = u["service_tier"].as_str().and_then(served_tier) {
            self.tier = Some(t);
        }
    }

    /// Opens a block: its canonical index, or `None` (the stream refused) past the limit.
    fn open(&mut self, upstream: u64, kind: Kind, out: &mut Vec<StreamEvent>) -> Option<usize> {
        if self.next_index >= c::MAX_INDEX {
            let what = format!("more than {} content blocks", c::MAX_INDEX);
            self.fail(c::past_limit(Provider::Anthropic, &what), out);
            return None;
        }
        let index = self.next_index;
        self.next_index += 1;
        self.open.push(Open {
            upstream,
            index,
            kind,
            has_args: false,
        });
        Some(index)
    }

    /// Ends the stream as malformed: nothing after it is decoded.
    fn fail(&mut self, why: String, out: &mut Vec<StreamEvent>) {
        out.push(StreamEvent::malformed(why));
        self.finished = true;
    }

    fn close(b: &Open, out: &mut Vec<StreamEvent>) {
        // Trap 7: a tool call always ends with an arguments object, never empty.
        if b.kind == Kind::Tool && !b.has_args {
            out.push(StreamEvent::ToolCallDelta {
                index: b.index,
                arguments: "{}".into(),
            });
        }
        out.push(StreamEvent::BlockStop { index: b.index });
    }

    fn block_start(&mut self, upstream: u64, cb: &Value, out: &mut Vec<StreamEvent>) {
        let text = |k: &str| cb[k].as_str().unwrap_or_default().to_string();
        match cb["type"].as_str() {
            Some("text") => {
                let Some(index) = self.open(upstream, Kind::Text, out) else {
                    return;
                };
                out.push(StreamEvent::TextStart { index });
                let t = text("text");
                if !t.is_empty() {
                    out.push(StreamEvent::TextDelta { index, text: t });
                }
            }
            Some("tool_use") => {
                self.saw_tool = true;
                let Some(index) = self.open(upstream, Kind::Tool, out) else {
                    return;
                };
                out.push(StreamEvent::ToolCallStart {
                    index,
                    id: text("id"),
                    name: text("name"),
                    signature: None,
                });
                if cb["input"].as_object().is_some_and(|o| !o.is_empty()) {
                    out.push(StreamEvent::ToolCallDelta {
                        index,
                        arguments: cb["input"].to_string(),
                    });
                    if let Some(b) = self.open.last_mut() {
                        b.has_args = true;
                    }
                }
            }
            Some("thinking") => {
                let Some(index) = self.open(upstream, Kind::Reasoning, out) else {
                    return;
                };
                out.push(StreamEvent::ReasoningStart { index });
                let t = text("thinking");
                if !t.is_empty() {
                    out.push(StreamEvent::ReasoningDelta { index, text: t });
                }
                let s = text("signature");
                if !s.is_empty() {
                    out.push(StreamEvent::ReasoningSignature {
                        index,
                        signature: s,
                    });
                }
            }
            // redacted_thinking: the canonical stream has no event for its data (see the
            // report); server-tool blocks are the provider's own business.
            _ => {}
        }
    }

    fn block_delta(&mut self, upstream: u64, d: &Value, out: &mut Vec<StreamEvent>) {
        let Some(b) = self.open.iter_mut().find(|b| b.upstream == upstream) else {
            return;
        };
        let index = b.index;
        let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
        match (d["type"].as_str(), b.kind) {
            (Some("text_delta"), Kind::Text) => out.push(StreamEvent::TextDelta {
                index,
                text: s("text"),
            }),
            (Some("input_json_delta"), Kind::Tool) => {
                let arguments = s("partial_json");
                if !arguments.is_empty() {
                    b.has_args = true;
                    out.push(StreamEvent::ToolCallDelta { index, arguments });
                }
            }
            (Some("thinking_delta"), Kind::Reasoning) => out.push(StreamEvent::ReasoningDelta {
                index,
                text: s("thinking"),
            }),
            (Some("signature_delta"), Kind::Reasoning) => {
                out.push(StreamEvent::ReasoningSignature {
                    index,
                    signature: s("signature"),
                })
            }
            _ => {}
        }
    }

    fn finish(&mut self, out: &mut Vec<StreamEvent>) {
        for b in std::mem::take(&mut self.open) {
            Self::close(&b, out);
        }
        let mut stop = self.stop.unwrap_or_default();
        if stop == StopReason::EndTurn && self.saw_tool {
            stop = StopReason::ToolUse;
        }
        out.push(StreamEvent::Finish {
            stop,
            usage: self.usage(),
        });
        self.finished = true;
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Decoder for StreamDecoder {
    fn decode(&mut self, ev: &Event, out: &mut Vec<StreamEvent>) {
        if self.finished {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return;
        };
        let name = if ev.event.is_empty() {
            v["type"].as_str().unwrap_or_default()
        } else {
            ev.event.as_str()
        };
        let index = v["index"].as_u64().unwrap_or(0);
        if name.starts_with("content_block_") {
            if let Err(why) = c::bounded_index(Provider::Anthropic, "`index`", index) {
                return self.fail(why, out);
            }
        }
        match name {
            "message_start" => {
                let m = &v["message"];
                self.read_usage(&m["usage"]);
                out.push(StreamEvent::Start {
                    id: m["id"].as_str().unwrap_or_default().to_string(),
                    model: m["model"].as_str().unwrap_or_default().to_string(),
                    created: now(),
                    provider: Some(Provider::Anthropic),
                });
            }
            "content_block_start" => self.block_start(index, &v["content_block"], out),
            "content_block_delta" => self.block_delta(index, &v["delta"], out),
            "content_block_stop" => {
                if let Some(pos) = self.open.iter().position(|b| b.upstream == index) {
                    let b = self.open.remove(pos);
                    Self::close(&b, out);
                }
            }
            "message_delta" => {
                if let Some(s) = v["delta"]["stop_reason"].as_str() {
                    self.stop = Some(stop_reason(s));
                }
                self.read_usage(&v["usage"]);
            }
            "message_stop" => self.finish(out),
            "error" => {
                let e = &v["error"];
                out.push(StreamEvent::Error {
                    code: "upstream_error",
                    message: format!(
                        "{}: {}",
                        e["type"].as_str().unwrap_or("error"),
                        e["message"]
                            .as_str()
                            .unwrap_or("the provider reported an error")
                    ),
                });
                self.finished = true;
            }
            _ => {}
        }
    }

    fn served_tier(&self) -> Option<Tier> {
        self.tier
    }
}
