//! What the simulated model says: deterministic words, or a call of a declared tool with
//! arguments drawn from its JSON schema.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// Words produced when no directive says otherwise.
pub(crate) const DEFAULT_OUTPUT_TOKENS: u32 = 12;

/// A tool the request declares.
pub(crate) struct ToolSpec<'a> {
    pub name: &'a str,
    pub schema: Option<&'a Value>,
}

/// A request reduced to what the simulator needs from it.
#[derive(Default)]
pub(crate) struct Conversation<'a> {
    /// Every user text, in order (directives are read from these).
    pub user_texts: Vec<&'a str>,
    /// The last turn answers a tool call: reply with text, never call a tool again.
    pub ends_with_tool_result: bool,
    pub tools: Vec<ToolSpec<'a>>,
    /// Words in the request's texts, at least 1.
    pub input_tokens: u64,
}

/// The model's turn.
pub(crate) enum Answer {
    Text(TextAnswer),
    Tool(ToolCall),
}

pub(crate) struct TextAnswer {
    /// One piece per output token; joined they are the text.
    pub pieces: Vec<String>,
    /// Cut short by the request's output-token limit.
    pub truncated: bool,
}

pub(crate) struct ToolCall {
    pub name: String,
    /// The arguments as a JSON object string.
    pub arguments: String,
    /// Random hex shared by the provider-specific ids of this call.
    pub id_suffix: String,
}

impl Answer {
    /// Calls `tool` when it is named and the request declares tools and does not end with a tool
    /// result; else `output_tokens` words, at most `max_tokens`.
    pub(crate) fn new(
        conversation: &Conversation<'_>,
        tool: Option<&str>,
        output_tokens: u32,
        max_tokens: Option<u64>,
    ) -> Self {
        match tool {
            Some(name) if !conversation.tools.is_empty() && !conversation.ends_with_tool_result => {
                let schema = conversation
                    .tools
                    .iter()
                    .find(|spec| spec.name == name)
                    .and_then(|spec| spec.schema);
                Answer::Tool(ToolCall::new(name, schema))
            }
            _ => {
                let wanted = u64::from(output_tokens);
                let limit = max_tokens.unwrap_or(wanted).min(wanted);
                Answer::Text(TextAnswer::new(limit, limit < wanted))
            }
        }
    }

    pub(crate) fn output_tokens(&self) -> u64 {
        match self {
            Answer::Text(text) => text.pieces.len() as u64,
            Answer::Tool(call) => call.fragments().count() as u64 + 1,
        }
    }

    /// How many paced streaming steps the answer takes (one per token interval).
    pub(crate) fn steps(&self) -> u64 {
        match self {
            Answer::Text(text) => text.pieces.len() as u64,
            Answer::Tool(call) => call.fragments().count() as u64,
        }
    }
}

impl TextAnswer {
    fn new(tokens: u64, truncated: bool) -> Self {
        let pieces = (0..tokens)
            .map(|i| match i {
                0 => "Simulated".to_owned(),
                1 => " answer".to_owned(),
                _ => format!(" word{}", i - 1),
            })
            .collect();
        Self { pieces, truncated }
    }

    pub(crate) fn text(&self) -> String {
        self.pieces.concat()
    }
}

impl ToolCall {
    fn new(name: &str, schema: Option<&Value>) -> Self {
        let arguments = match schema.map(|schema| sample_value(schema, "")) {
            Some(value @ Value::Object(_)) => value,
            _ => json!({"location": "Paris"}),
        };
        Self {
            name: name.to_owned(),
            arguments: arguments.to_string(),
            id_suffix: random_hex(),
        }
    }

    /// The arguments string in a few streaming fragments.
    pub(crate) fn fragments(&self) -> impl Iterator<Item = &str> {
        const FRAGMENT: usize = 8;
        let mut rest = self.arguments.as_str();
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let mut end = FRAGMENT.min(rest.len());
            while !rest.is_char_boundary(end) {
                end += 1;
            }
            let (fragment, tail) = rest.split_at(end);
            rest = tail;
            Some(fragment)
        })
    }

    pub(crate) fn arguments_value(&self) -> Value {
        serde_json::from_str(&self.arguments).unwrap_or_else(|_| json!({}))
    }
}

/// A deterministic value satisfying a (simple) JSON schema; Gemini's upper-case type names too.
fn sample_value(schema: &Value, name: &str) -> Value {
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|values| values.first())
    {
        return first.clone();
    }
    let declared = match schema.get("type") {
        Some(Value::String(ty)) => Some(ty.as_str()),
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null"),
        _ => None,
    };
    let ty =
        declared
            .map(str::to_ascii_lowercase)
            .unwrap_or_else(|| match schema.get("properties") {
                Some(_) => "object".to_owned(),
                None => "string".to_owned(),
            });
    match ty.as_str() {
        "object" => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let object: Map<String, Value> = properties
                .into_iter()
                .flatten()
                .map(|(key, sub)| (key.clone(), sample_value(sub, key)))
                .collect();
            Value::Object(object)
        }
        "array" => match schema.get("items") {
            Some(items) => Value::Array(vec![sample_value(items, name)]),
            None => Value::Array(Vec::new()),
        },
        "integer" | "number" => json!(1),
        "boolean" => json!(true),
        "null" => Value::Null,
        _ if name.contains("unit") => json!("celsius"),
        _ => json!("Paris"),
    }
}

/// 24 random hex characters, for ids.
pub(crate) fn random_hex() -> String {
    format!("{:024x}", rand::random::<u128>() >> 32)
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// Words in every string of `value`, skipping keys that hold no prose (types, ids, base64).
pub(crate) fn count_words(value: &Value) -> u64 {
    const SKIP: [&str; 10] = [
        "type",
        "role",
        "id",
        "call_id",
        "tool_use_id",
        "data",
        "media_type",
        "mimeType",
        "url",
        "signature",
    ];
    match value {
        Value::String(text) => text.split_whitespace().count() as u64,
        Value::Array(items) => items.iter().map(count_words).sum(),
        Value::Object(object) => object
            .iter()
            .filter(|(key, _)| !SKIP.contains(&key.as_str()))
            .map(|(_, value)| count_words(value))
            .sum(),
        _ => 0,
    }
}

/// The text of a content value that is either a string or a list of text parts whose type is one
/// of `text_types` (e.g. `input_text`, `text`).
pub(crate) fn texts_of<'a>(content: &'a Value, text_types: &[&str], out: &mut Vec<&'a str>) {
    match content {
        Value::String(text) => out.push(text),
        Value::Array(parts) => out.extend(parts.iter().filter_map(|part| {
            let ty = part.get("type").and_then(Value::as_str)?;
            text_types
                .contains(&ty)
                .then(|| part.get("text").and_then(Value::as_str))
                .flatten()
        })),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation<'a>(tools: Vec<ToolSpec<'a>>, ends_with_tool_result: bool) -> Conversation<'a> {
        Conversation {
            user_texts: vec![],
            ends_with_tool_result,
            tools,
            input_tokens: 1,
        }
    }

    #[test]
    fn text_is_deterministic_and_limited() {
        let Answer::Text(text) = Answer::new(&conversation(vec![], false), None, 4, None) else {
            panic!("expected text");
        };
        assert_eq!(text.text(), "Simulated answer word1 word2");
        assert!(!text.truncated);
        let limited = Answer::new(&conversation(vec![], false), Some("f"), 4, Some(3));
        assert_eq!(limited.output_tokens(), 3);
        assert!(matches!(
            limited,
            Answer::Text(TextAnswer {
                truncated: true,
                ..
            })
        ));
    }

    #[test]
    fn tool_arguments_follow_the_schema() {
        let schema = json!({"type": "object", "properties": {
            "location": {"type": "string"}, "unit": {"type": "string", "enum": ["f", "c"]},
            "days": {"type": "INTEGER"}, "tags": {"type": "array", "items": {"type": "string"}}}});
        let tools = vec![ToolSpec {
            name: "get_weather",
            schema: Some(&schema),
        }];
        let Answer::Tool(call) =
            Answer::new(&conversation(tools, false), Some("get_weather"), 12, None)
        else {
            panic!("expected a tool call");
        };
        assert_eq!(
            call.arguments_value(),
            json!({"location": "Paris", "unit": "f", "days": 1, "tags": ["Paris"]})
        );
        assert_eq!(call.fragments().collect::<String>(), call.arguments);
        assert!(call.fragments().count() > 1);

        let no_schema = vec![ToolSpec {
            name: "other",
            schema: None,
        }];
        let Answer::Tool(call) = Answer::new(&conversation(no_schema, false), Some("x"), 12, None)
        else {
            panic!("expected a tool call");
        };
        assert_eq!(call.arguments, r#"{"location":"Paris"}"#);
        let after_result = vec![ToolSpec {
            name: "x",
            schema: None,
        }];
        assert!(matches!(
            Answer::new(&conversation(after_result, true), Some("x"), 12, None),
            Answer::Text(_)
        ));
    }

    #[test]
    fn counts_prose_words_only() {
        let value = json!([{"role": "user", "content": [{"type": "input_text", "text": "a b c"}]},
            {"type": "image", "source": {"data": "AAAA BBBB"}}]);
        assert_eq!(count_words(&value), 3);
        let mut out = Vec::new();
        texts_of(&value[0]["content"], &["input_text"], &mut out);
        assert_eq!(out, vec!["a b c"]);
    }
}
