//! Server-sent events: an incremental parser for upstream streams and the framing we emit.
//!
//! The parser accepts `\n`, `\r\n` and `\r` line endings, multi-line `data:`, comments and
//! events split across chunks at any byte. It bounds the size of one event
//! ([`MAX_EVENT_BYTES`]) so a broken upstream cannot grow memory without limit.

use bytes::{Bytes, BytesMut};

/// The largest single event we accept from an upstream (16 MiB).
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event:` field, empty when absent.
    pub event: String,
    pub data: String,
}

impl Event {
    pub fn new(event: impl Into<String>, data: impl Into<String>) -> Self {
        Self {
            event: event.into(),
            data: data.into(),
        }
    }

    /// The event framed for the wire.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = String::with_capacity(self.data.len() + self.event.len() + 16);
        if !self.event.is_empty() {
            out.push_str("event: ");
            out.push_str(&self.event);
            out.push('\n');
        }
        for line in self.data.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        Bytes::from(out)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    #[error("an upstream event exceeded {MAX_EVENT_BYTES} bytes")]
    TooLarge,
}

/// Incremental SSE parser: feed bytes, take complete events.
#[derive(Debug, Default)]
pub struct Parser {
    buf: BytesMut,
    event: String,
    data: String,
    has_data: bool,
    skip_lf: bool,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk and appends every completed event to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        self.buf.extend_from_slice(chunk);
        loop {
            let mut start = 0;
            if self.skip_lf && !self.buf.is_empty() {
                if self.buf[0] == b'\n' {
                    start = 1;
                }
                self.skip_lf = false;
            }
            let Some(rel) = self.buf[start..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
            else {
                let _ = self.buf.split_to(start);
                break;
            };
            let end = start + rel;
            if self.buf[end] == b'\r' {
                self.skip_lf = true;
            }
            let line = self.buf.split_to(end + 1);
            let line = &line[start..end];
            self.line(line, out);
        }
        if self.buf.len() + self.data.len() > MAX_EVENT_BYTES {
            return Err(SseError::TooLarge);
        }
        Ok(())
    }

    /// Ends the stream: a final event without its blank line is still delivered.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if !self.buf.is_empty() {
            let rest = self.buf.split();
            self.line(&rest, out);
        }
        self.dispatch(out);
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<Event>) {
        if self.has_data {
            out.push(Event {
                event: std::mem::take(&mut self.event),
                data: std::mem::take(&mut self.data),
            });
        }
        self.event.clear();
        self.has_data = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = Parser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap_or_default();
        }
        p.finish(&mut out);
        out
    }

    #[test]
    fn named_and_unnamed_events() {
        let evs = parse_all(&[b"event: a\ndata: {\"x\":1}\n\ndata: [DONE]\n\n"]);
        assert_eq!(
            evs,
            vec![Event::new("a", "{\"x\":1}"), Event::new("", "[DONE]")]
        );
    }

    #[test]
    fn split_anywhere_and_crlf() {
        let whole = b"event: a\r\ndata: one\r\ndata: two\r\n\r\n: comment\r\ndata: z\r\n\r\n";
        for cut in 0..whole.len() {
            let evs = parse_all(&[&whole[..cut], &whole[cut..]]);
            assert_eq!(
                evs,
                vec![Event::new("a", "one\ntwo"), Event::new("", "z")],
                "cut {cut}"
            );
        }
    }

    #[test]
    fn unterminated_last_event_is_delivered() {
        assert_eq!(parse_all(&[b"data: tail"]), vec![Event::new("", "tail")]);
    }

    #[test]
    fn framing_round_trips() {
        let e = Event::new("response.created", "{\"a\":\n1}");
        assert_eq!(parse_all(&[&e.to_bytes()]), vec![e]);
    }

    #[test]
    fn oversized_events_are_refused() {
        let mut p = Parser::new();
        let mut out = Vec::new();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert_eq!(p.feed(b"data: ", &mut out), Ok(()));
        assert_eq!(p.feed(&big, &mut out), Err(SseError::TooLarge));
    }
}
