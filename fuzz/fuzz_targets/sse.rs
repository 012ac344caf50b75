//! The incremental SSE parser (`sse::Parser`) and our framing (`Event::to_bytes`).
//!
//! - The events do not depend on where the stream is cut into chunks (the first two bytes pick
//!   the cuts; the rest is the stream).
//! - Every parsed event, framed again, parses back as itself.
//! - Any event we frame (name and data taken from the input) parses back as one event with the
//!   same name and data, line breaks in the data read as `\n`.
#![no_main]

use flex_data_plane::sse::{Event, Parser};
use libfuzzer_sys::fuzz_target;

fn parse_chunks(chunks: &[&[u8]]) -> (Vec<Event>, bool) {
    let mut p = Parser::new();
    let mut out = Vec::new();
    for c in chunks {
        if p.feed(c, &mut out).is_err() {
            return (out, false);
        }
    }
    p.finish(&mut out);
    (out, true)
}

fuzz_target!(|data: &[u8]| {
    let (cuts, stream) = match data {
        [a, b, rest @ ..] => ((*a as usize, *b as usize), rest),
        _ => ((0, 0), data),
    };
    let (whole, ok) = parse_chunks(&[stream]);
    // Three chunks, cut at the two positions the input picks.
    let mut i = cuts.0.min(stream.len());
    let mut j = (i + cuts.1).min(stream.len());
    if i > j {
        std::mem::swap(&mut i, &mut j);
    }
    let (pieces, ok2) = parse_chunks(&[&stream[..i], &stream[i..j], &stream[j..]]);
    assert_eq!(ok, ok2);
    assert_eq!(whole, pieces, "cut at {i} and {j}");
    // One byte at a time.
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    let (single, _) = parse_chunks(&bytes);
    assert_eq!(whole, single, "byte by byte");

    for e in &whole {
        let (back, _) = parse_chunks(&[&e.to_bytes()]);
        assert_eq!(back, vec![e.clone()], "re-framed {e:?}");
    }

    // An event of our own, name and data from the input.
    let text = String::from_utf8_lossy(stream);
    let (name, body) = text.split_once('\u{0}').unwrap_or(("", &text));
    let ours = Event::new(name, body);
    let (back, _) = parse_chunks(&[&ours.to_bytes()]);
    let data = body.replace("\r\n", "\n").replace('\r', "\n");
    let name: String = name.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    assert_eq!(back, vec![Event::new(name, data)], "framed {ours:?}");
});
