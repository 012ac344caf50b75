//! Server-sent events: an incremental parser for upstream streams and the framing we emit.
//!
//! The parser accepts `\n`, `\r\n` and `\r` line endings, multi-line `data:`, comments and
//! events split across chunks at any byte. It bounds the size of one event (its fields and its
//! unfinished line; [`MAX_EVENT_BYTES`] unless `--max-sse-event-kib` says otherwise) so a broken
//! upstream cannot grow memory without limit: an event that never ends, or one `data:` line
//! after another, fails the stream once past the bound.

use bytes::{Bytes, BytesMut};

/// The default bound of a single upstream event (16 MiB; `--max-sse-event-kib`). An OpenAI
/// stream's final event (`response.completed`) carries the whole response (its output and the
/// echoed instructions and tools), so one event may legitimately be as large as an answer body:
/// the bound sits far above any real event, and far below what would hurt the process.
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

    /// The event framed for the wire. Every line break of the data (`\n`, `\r\n` or `\r`, as
    /// the parser reads them) starts a new `data:` line, so a receiver reads the data back with
    /// `\n` for each break; line breaks in the name are dropped. Either would otherwise end
    /// the field early and let the rest of the text be read as fields of its own.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = String::with_capacity(self.data.len() + self.event.len() + 16);
        if !self.event.is_empty() {
            out.push_str("event: ");
            out.extend(self.event.chars().filter(|c| !matches!(c, '\r' | '\n')));
            out.push('\n');
        }
        let mut rest = self.data.as_str();
        loop {
            out.push_str("data: ");
            let Some(i) = rest.find(['\r', '\n']) else {
                out.push_str(rest);
                out.push('\n');
                break;
            };
            out.push_str(&rest[..i]);
            out.push('\n');
            let len = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
            rest = &rest[i + len..];
        }
        out.push('\n');
        Bytes::from(out)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    /// An event grew past the parser's bound (in bytes).
    #[error("an upstream event exceeded the limit of {0} bytes")]
    TooLarge(usize),
}

/// Incremental SSE parser: feed bytes, take complete events.
#[derive(Debug)]
pub struct Parser {
    buf: BytesMut,
    event: String,
    data: String,
    has_data: bool,
    skip_lf: bool,
    /// The bound of one event, in bytes.
    max: usize,
    /// An event went past `max`: the stream is refused from then on.
    failed: bool,
    /// How much of `buf` is known to hold no line ending, so a long line arriving in many
    /// chunks is scanned once, not once per chunk.
    scanned: usize,
}

impl Default for Parser {
    fn default() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }
}

impl Parser {
    /// A parser bounding each event to [`MAX_EVENT_BYTES`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser bounding each event to `max` bytes.
    pub fn with_limit(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            event: String::new(),
            data: String::new(),
            has_data: false,
            skip_lf: false,
            max,
            failed: false,
            scanned: 0,
        }
    }

    /// Refuses the stream: the event's bytes are dropped, every later feed fails.
    fn too_large(&mut self) -> Result<(), SseError> {
        self.failed = true;
        self.scanned = 0;
        self.buf = BytesMut::new();
        self.data = String::new();
        self.event = String::new();
        self.has_data = false;
        Err(SseError::TooLarge(self.max))
    }

    /// Feeds a chunk and appends every completed event to `out`. An event past the bound (its
    /// fields so far and its unfinished line) is an error, and so is every feed after it; the
    /// events completed before it in this chunk are still in `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        if self.failed {
            return Err(SseError::TooLarge(self.max));
        }
        self.buf.extend_from_slice(chunk);
        loop {
            let mut start = 0;
            if self.skip_lf && !self.buf.is_empty() {
                if self.buf[0] == b'\n' {
                    start = 1;
                }
                self.skip_lf = false;
            }
            let from = start.max(self.scanned);
            let Some(rel) = self.buf[from..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
            else {
                let _ = self.buf.split_to(start);
                self.scanned = self.buf.len();
                break;
            };
            let end = from + rel;
            self.scanned = 0;
            if self.buf[end] == b'\r' {
                self.skip_lf = true;
            }
            let line = self.buf.split_to(end + 1);
            let line = &line[start..end];
            self.line(line, out);
            // Per line: one chunk of many `data:` lines cannot take an event far past the bound.
            if self.data.len() + self.event.len() > self.max {
                return self.too_large();
            }
        }
        if self.buf.len() + self.data.len() + self.event.len() > self.max {
            return self.too_large();
        }
        Ok(())
    }

    /// Ends the stream: a final event without its blank line is still delivered (not after the
    /// stream was refused).
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if self.failed {
            return;
        }
        self.scanned = 0;
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

    /// Regression (found writing the framing's round-trip property): a `\r` in the data ended
    /// the `data:` line early, so the receiver lost the rest or read it as a field of its own
    /// (here an injected `event:`); a line break in the name did the same.
    #[test]
    fn carriage_returns_in_data_and_names_stay_inside_the_event() {
        let e = Event::new("a\nevent: b", "one\revent: injected\r\ntwo\n\rthree");
        assert_eq!(
            parse_all(&[&e.to_bytes()]),
            vec![Event::new(
                "aevent: b",
                "one\nevent: injected\ntwo\n\nthree"
            )]
        );
        assert_eq!(
            parse_all(&[&Event::new("", "\r").to_bytes()]),
            vec![Event::new("", "\n")]
        );
    }

    /// A long line in many small chunks is scanned once (`scanned`), and still read whole.
    #[test]
    fn a_long_line_in_small_chunks() {
        let line = format!("data: {}\r\n\r\n", "x".repeat(256 * 1024));
        let chunks: Vec<&[u8]> = line.as_bytes().chunks(7).collect();
        assert_eq!(
            parse_all(&chunks),
            vec![Event::new("", "x".repeat(256 * 1024))]
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Bytes that look like SSE often enough: field names, separators, line endings.
        fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                Just(b"data:".to_vec()),
                Just(b"data: ".to_vec()),
                Just(b"event: ".to_vec()),
                Just(b": c".to_vec()),
                Just(b"id: 1".to_vec()),
                Just(b"\n".to_vec()),
                Just(b"\r".to_vec()),
                Just(b"\r\n".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..8),
            ];
            proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
        }

        /// Text with line breaks and field names in it more often than chance would put them.
        fn text() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                3 => any::<String>(),
                1 => Just("\r".to_string()),
                1 => Just("\n".to_string()),
                1 => Just("\r\n".to_string()),
                1 => Just("data: ".to_string()),
                1 => Just("event: x".to_string()),
            ];
            proptest::collection::vec(piece, 0..6).prop_map(|v| v.concat())
        }

        fn parse(chunks: &[&[u8]]) -> Vec<Event> {
            let mut p = Parser::new();
            let mut out = Vec::new();
            for c in chunks {
                assert_eq!(p.feed(c, &mut out), Ok(()));
            }
            p.finish(&mut out);
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Any bytes, cut anywhere: no panic, and the same events as in one chunk.
            #[test]
            fn chunking_does_not_change_the_events(
                bytes in prop_oneof![sse_bytes(), proptest::collection::vec(any::<u8>(), 0..200)],
                cuts in proptest::collection::vec(any::<usize>(), 0..6),
            ) {
                let whole = parse(&[&bytes]);
                let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
                at.sort_unstable();
                let mut chunks = Vec::new();
                let mut prev = 0;
                for c in at {
                    chunks.push(&bytes[prev..c]);
                    prev = c;
                }
                chunks.push(&bytes[prev..]);
                prop_assert_eq!(parse(&chunks), whole.clone());
                // What was parsed, framed again, parses back as itself.
                for e in &whole {
                    prop_assert_eq!(parse(&[&e.to_bytes()]), vec![e.clone()]);
                }
            }

            /// Any event we frame parses back as that event (line breaks in the data as `\n`).
            #[test]
            fn framing_round_trips(event in text(), data in text()) {
                let framed = Event::new(event.clone(), data.clone()).to_bytes();
                let name: String = event.chars().filter(|c| !matches!(c, '\r' | '\n')).collect();
                let data = data.replace("\r\n", "\n").replace('\r', "\n");
                prop_assert_eq!(parse(&[&framed]), vec![Event::new(name, data)]);
            }
        }
    }

    #[test]
    fn oversized_events_are_refused() {
        let mut p = Parser::new();
        let mut out = Vec::new();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert_eq!(p.feed(b"data: ", &mut out), Ok(()));
        assert_eq!(
            p.feed(&big, &mut out),
            Err(SseError::TooLarge(MAX_EVENT_BYTES))
        );
    }

    /// The bound holds for an event that never ends, for one `data:` line after another (in
    /// one chunk or many), and for a long `event:` name; an event at the bound passes; after a
    /// refusal the parser stays refused and delivers nothing more.
    #[test]
    fn every_way_an_event_grows_is_bounded() {
        const MAX: usize = 64;
        let fits = format!("data: {}\n\n", "x".repeat(MAX));
        let mut p = Parser::with_limit(MAX);
        let mut out = Vec::new();
        assert_eq!(p.feed(fits.as_bytes(), &mut out), Ok(()));
        assert_eq!(out, vec![Event::new("", "x".repeat(MAX))]);

        let unended = format!("data: {}", "x".repeat(MAX + 1));
        let many_lines = "data: 0123456789\n".repeat(MAX);
        let long_name = format!("event: {}\ndata: x\n", "e".repeat(MAX + 1));
        for bad in [unended, many_lines.clone(), long_name] {
            let mut p = Parser::with_limit(MAX);
            let mut out = Vec::new();
            assert_eq!(
                p.feed(bad.as_bytes(), &mut out),
                Err(SseError::TooLarge(MAX)),
                "{bad}"
            );
            assert_eq!(
                p.feed(b"\n\ndata: later\n\n", &mut out),
                Err(SseError::TooLarge(MAX))
            );
            p.finish(&mut out);
            assert!(out.is_empty(), "{out:?}");
        }

        // The same lines a few bytes at a time: refused as soon as the event is past the bound.
        let mut p = Parser::with_limit(MAX);
        let mut out = Vec::new();
        let refused = many_lines
            .as_bytes()
            .chunks(7)
            .position(|c| p.feed(c, &mut out).is_err());
        assert!(refused.is_some_and(|at| at * 7 < 2 * MAX), "{refused:?}");

        // Events completed before the oversized one in the same chunk are delivered.
        let mut p = Parser::with_limit(MAX);
        let mut out = Vec::new();
        let chunk = format!("data: ok\n\ndata: {}", "x".repeat(MAX + 1));
        assert!(p.feed(chunk.as_bytes(), &mut out).is_err());
        assert_eq!(out, vec![Event::new("", "ok")]);
    }
}
