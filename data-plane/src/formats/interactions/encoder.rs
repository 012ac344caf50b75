//! Canonical stream events → Interactions SSE events.

use flex_shared::catalog::Tier;
use serde_json::{json, Map, Value};

use super::iso8601;
use super::render::{interaction, interaction_id, now_secs};
use crate::canonical::{Accumulator, StopReason, StreamEvent};
use crate::formats::Encoder;
use crate::sse::Event;

/// Canonical events → Interactions SSE: `interaction.created`, then per output step
/// `step.start` / `step.delta`… / `step.stop`, then `interaction.completed` with the final
/// interaction (status, usage and the steps), or `error`. Each event's JSON carries its
/// `event_type`, which is also the SSE `event:` name.
pub struct StreamEncoder {
    served: Tier,
    model: String,
    id: String,
    created: u64,
    started: bool,
    finished: bool,
    failed: bool,
    /// Canonical block index → step index, for the open steps.
    open: Vec<(usize, usize)>,
    next_step: usize,
    acc: Accumulator,
}

impl StreamEncoder {
    pub fn new(served: Tier, model: &str) -> Self {
        Self {
            served,
            model: model.to_string(),
            id: String::new(),
            created: 0,
            started: false,
            finished: false,
            failed: false,
            open: Vec::new(),
            next_step: 0,
            acc: Accumulator::default(),
        }
    }

    fn emit(out: &mut Vec<Event>, data: Value) {
        let kind = data["event_type"].as_str().unwrap_or_default().to_string();
        out.push(Event::new(kind, data.to_string()));
    }

    fn ensure_started(&mut self, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        self.id = interaction_id(&self.id);
        if self.created == 0 {
            self.created = now_secs();
        }
        let created = iso8601(self.created);
        Self::emit(
            out,
            json!({
                "event_type": "interaction.created",
                "interaction": {
                    "id": self.id,
                    "object": "interaction",
                    "status": "in_progress",
                    "model": self.model,
                    "created": created,
                    "updated": created,
                    "service_tier": self.served.as_str(),
                },
            }),
        );
    }

    fn step_index(&self, index: usize) -> Option<usize> {
        self.open.iter().find(|(i, _)| *i == index).map(|(_, s)| *s)
    }

    fn start_step(&mut self, index: usize, step: Value, out: &mut Vec<Event>) -> usize {
        self.ensure_started(out);
        let s = self.next_step;
        self.next_step += 1;
        self.open.push((index, s));
        Self::emit(
            out,
            json!({"event_type": "step.start", "index": s, "step": step}),
        );
        s
    }

    /// The step of block `index`, opening one with `step` when a delta arrives first.
    fn step_for(&mut self, index: usize, step: Value, out: &mut Vec<Event>) -> usize {
        match self.step_index(index) {
            Some(s) => s,
            None => self.start_step(index, step, out),
        }
    }

    fn delta(out: &mut Vec<Event>, step: usize, delta: Value) {
        Self::emit(
            out,
            json!({"event_type": "step.delta", "index": step, "delta": delta}),
        );
    }

    fn stop_step(&mut self, index: usize, out: &mut Vec<Event>) {
        if let Some(pos) = self.open.iter().position(|(i, _)| *i == index) {
            let (_, s) = self.open.remove(pos);
            Self::emit(out, json!({"event_type": "step.stop", "index": s}));
        }
    }
}

fn text_step() -> Value {
    json!({"type": "model_output", "content": []})
}

fn thought_step() -> Value {
    json!({"type": "thought", "summary": []})
}

impl Encoder for StreamEncoder {
    fn set_served(&mut self, served: Tier) {
        self.served = served;
    }

    fn encode(&mut self, ev: &StreamEvent, out: &mut Vec<Event>) {
        if self.finished {
            return;
        }
        self.acc.push(ev);
        match ev {
            StreamEvent::Start {
                id, model, created, ..
            } => {
                if !self.started {
                    self.id.clone_from(id);
                    self.created = *created;
                    if self.model.is_empty() {
                        self.model.clone_from(model);
                    }
                }
                self.ensure_started(out);
            }
            StreamEvent::TextStart { index } => {
                self.step_for(*index, text_step(), out);
            }
            StreamEvent::TextDelta { index, text } => {
                let s = self.step_for(*index, text_step(), out);
                Self::delta(out, s, json!({"type": "text", "text": text}));
            }
            StreamEvent::ToolCallStart {
                index,
                id,
                name,
                signature,
            } => {
                let mut step = Map::new();
                step.insert("type".into(), json!("function_call"));
                step.insert("id".into(), json!(id));
                step.insert("name".into(), json!(name));
                step.insert("arguments".into(), json!({}));
                if let Some(sig) = signature {
                    step.insert("signature".into(), json!(sig));
                }
                self.step_for(*index, Value::Object(step), out);
            }
            StreamEvent::ToolCallDelta { index, arguments } => {
                let step = json!({"type": "function_call", "id": "", "name": "", "arguments": {}});
                let s = self.step_for(*index, step, out);
                if !arguments.is_empty() {
                    Self::delta(
                        out,
                        s,
                        json!({"type": "arguments_delta", "arguments": arguments}),
                    );
                }
            }
            StreamEvent::ReasoningStart { index } => {
                self.step_for(*index, thought_step(), out);
            }
            StreamEvent::ReasoningDelta { index, text } => {
                let s = self.step_for(*index, thought_step(), out);
                Self::delta(
                    out,
                    s,
                    json!({"type": "thought_summary", "content": {"type": "text", "text": text}}),
                );
            }
            StreamEvent::ReasoningSignature { index, signature } => {
                let s = self.step_for(*index, thought_step(), out);
                Self::delta(
                    out,
                    s,
                    json!({"type": "thought_signature", "signature": signature}),
                );
            }
            StreamEvent::BlockStop { index } => self.stop_step(*index, out),
            StreamEvent::Finish { stop, .. } => {
                self.ensure_started(out);
                let open: Vec<usize> = self.open.iter().map(|(i, _)| *i).collect();
                for index in open {
                    self.stop_step(index, out);
                }
                self.finished = true;
                let stop = if self.failed {
                    StopReason::Error
                } else {
                    *stop
                };
                let r = std::mem::take(&mut self.acc).finish();
                let interaction = interaction(
                    &self.id,
                    &self.model,
                    self.created,
                    self.served,
                    stop,
                    &r.usage,
                    &r.content,
                );
                Self::emit(
                    out,
                    json!({"event_type": "interaction.completed", "interaction": interaction}),
                );
            }
            StreamEvent::Error { message } => {
                self.ensure_started(out);
                self.failed = true;
                Self::emit(
                    out,
                    json!({
                        "event_type": "error",
                        "error": {"code": "upstream_error", "message": message},
                    }),
                );
            }
        }
    }
}
