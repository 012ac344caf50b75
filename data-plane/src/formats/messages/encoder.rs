//! Canonical stream events → Messages SSE events.

use flex_shared::catalog::Tier;
use serde_json::{json, Map, Value};

use super::render::{message_id, usage_json};
use super::stop_reason;
use crate::canonical::{StreamEvent, Usage};
use crate::formats::Encoder;
use crate::ids;
use crate::sse::Event;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Tool,
    Thinking,
}

/// Canonical events → `message_start`, `content_block_start/delta/stop` per block,
/// `message_delta`, `message_stop` (every event named). Blocks are numbered densely in the
/// order they open; a block still open at the end is closed before `message_delta`.
pub struct StreamEncoder {
    served: Tier,
    model: String,
    started: bool,
    done: bool,
    next: usize,
    /// Canonical block index → (our content index, kind), for open blocks.
    open: Vec<(usize, usize, Kind)>,
}

impl StreamEncoder {
    pub fn new(served: Tier, model: &str) -> Self {
        Self {
            served,
            model: model.to_string(),
            started: false,
            done: false,
            next: 0,
            open: Vec::new(),
        }
    }

    fn emit(out: &mut Vec<Event>, name: &str, mut data: Value) {
        if let Value::Object(m) = &mut data {
            let mut with_type = Map::with_capacity(m.len() + 1);
            with_type.insert("type".into(), json!(name));
            with_type.append(m);
            data = Value::Object(with_type);
        }
        out.push(Event::new(name, data.to_string()));
    }

    fn start(&mut self, id: &str, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        Self::emit(
            out,
            "message_start",
            json!({"message": {
                "id": message_id(id),
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": self.model,
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage_json(&Usage::default(), Some(self.served)),
            }}),
        );
    }

    /// Our index of canonical block `index`, opening it with `block` if it is not open yet.
    fn open_block(
        &mut self,
        index: usize,
        kind: Kind,
        block: impl FnOnce() -> Value,
        out: &mut Vec<Event>,
    ) -> Option<usize> {
        if let Some(&(_, ours, k)) = self.open.iter().find(|(i, _, _)| *i == index) {
            return (k == kind).then_some(ours);
        }
        self.start("", out);
        let ours = self.next;
        self.next += 1;
        self.open.push((index, ours, kind));
        Self::emit(
            out,
            "content_block_start",
            json!({"index": ours, "content_block": block()}),
        );
        Some(ours)
    }

    fn delta(&mut self, index: usize, kind: Kind, delta: Value, out: &mut Vec<Event>) {
        let block = match kind {
            Kind::Text => json!({"type": "text", "text": ""}),
            Kind::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
            // A tool block is always opened by its start event (it carries id and name).
            Kind::Tool => {
                if !self
                    .open
                    .iter()
                    .any(|(i, _, k)| *i == index && *k == Kind::Tool)
                {
                    return;
                }
                Value::Null
            }
        };
        if let Some(ours) = self.open_block(index, kind, || block, out) {
            Self::emit(
                out,
                "content_block_delta",
                json!({"index": ours, "delta": delta}),
            );
        }
    }

    fn stop_block(&mut self, index: usize, out: &mut Vec<Event>) {
        if let Some(pos) = self.open.iter().position(|(i, _, _)| *i == index) {
            let (_, ours, _) = self.open.remove(pos);
            Self::emit(out, "content_block_stop", json!({"index": ours}));
        }
    }
}

impl Encoder for StreamEncoder {
    fn set_served(&mut self, served: Tier) {
        self.served = served;
    }

    fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<Event>) {
        if self.done {
            return;
        }
        match ev {
            StreamEvent::Start { id, model, .. } => {
                if !model.is_empty() && !self.started {
                    self.model = model.clone();
                }
                self.start(id, out);
            }
            StreamEvent::TextStart { index } => {
                self.open_block(
                    *index,
                    Kind::Text,
                    || json!({"type": "text", "text": ""}),
                    out,
                );
            }
            StreamEvent::TextDelta { index, text } if !text.is_empty() => self.delta(
                *index,
                Kind::Text,
                json!({"type": "text_delta", "text": text}),
                out,
            ),
            StreamEvent::ToolCallStart {
                index, id, name, ..
            } => {
                let block = json!({"type": "tool_use", "id": ids::for_anthropic(id), "name": name, "input": {}});
                self.open_block(*index, Kind::Tool, || block, out);
            }
            StreamEvent::ToolCallDelta { index, arguments } if !arguments.is_empty() => self.delta(
                *index,
                Kind::Tool,
                json!({"type": "input_json_delta", "partial_json": arguments}),
                out,
            ),
            StreamEvent::ReasoningStart { index } => {
                self.open_block(
                    *index,
                    Kind::Thinking,
                    || json!({"type": "thinking", "thinking": "", "signature": ""}),
                    out,
                );
            }
            StreamEvent::ReasoningDelta { index, text } if !text.is_empty() => self.delta(
                *index,
                Kind::Thinking,
                json!({"type": "thinking_delta", "thinking": text}),
                out,
            ),
            StreamEvent::ReasoningSignature { index, signature } => self.delta(
                *index,
                Kind::Thinking,
                json!({"type": "signature_delta", "signature": signature}),
                out,
            ),
            StreamEvent::BlockStop { index } => self.stop_block(*index, out),
            StreamEvent::Finish { stop, usage } => {
                self.start("", out);
                let open: Vec<usize> = self.open.iter().map(|(i, _, _)| *i).collect();
                for i in open {
                    self.stop_block(i, out);
                }
                Self::emit(
                    out,
                    "message_delta",
                    json!({
                        "delta": {"stop_reason": stop_reason(*stop), "stop_sequence": null},
                        "usage": usage_json(usage, None),
                    }),
                );
                Self::emit(out, "message_stop", json!({}));
                self.done = true;
            }
            StreamEvent::Error { message } => {
                Self::emit(
                    out,
                    "error",
                    json!({"error": {"type": "api_error", "message": message}}),
                );
                self.done = true;
            }
            // Empty deltas carry nothing.
            StreamEvent::TextDelta { .. }
            | StreamEvent::ToolCallDelta { .. }
            | StreamEvent::ReasoningDelta { .. } => {}
        }
    }
}
