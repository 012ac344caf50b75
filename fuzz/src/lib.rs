//! What the fuzz targets share: each drives one parser of outside bytes through the crates'
//! public API the way the proxy does, and checks the properties that must hold for any input
//! (no panic, and where there is an encoder, that what it writes parses back).

use flex_data_plane::canonical::{Accumulator, StreamEvent};
use flex_data_plane::formats::{self, chat, CallerFormat, RawBody};
use flex_data_plane::providers::AskTier;
use flex_data_plane::sse::{Event, Parser};
use flex_data_plane::{limits, start_within, translate};
use flex_shared::catalog::{Provider, Tier};

pub const FORMATS: [CallerFormat; 4] = [
    CallerFormat::Responses,
    CallerFormat::ChatCompletions,
    CallerFormat::Interactions,
    CallerFormat::Messages,
];

pub const PROVIDERS: [Provider; 3] = [Provider::OpenAi, Provider::Anthropic, Provider::Gemini];

const TIERS: [AskTier; 4] = [
    AskTier::Flex,
    AskTier::Standard,
    AskTier::Priority,
    AskTier::Auto,
];

/// Every event of `bytes` as one upstream stream (fed whole, then finished).
pub fn sse_events(bytes: &[u8]) -> Vec<Event> {
    let mut p = Parser::new();
    let mut out = Vec::new();
    if p.feed(bytes, &mut out).is_ok() {
        p.finish(&mut out);
    }
    out
}

/// A caller's request body, as `proxy::serve` takes it: the JSON object, `start_within`,
/// `model`, the tier and Chat checks, the limits' estimate, the format's parser, and every
/// provider's upstream request for every tier. Checks that the raw body re-encodes to the same
/// fields.
pub fn caller_request(format: CallerFormat, bytes: &[u8]) {
    let Ok(mut body) = RawBody::parse(bytes, format) else {
        return;
    };
    let again = RawBody::parse(&body.to_bytes(), format).map(|b| b.to_bytes());
    assert_eq!(
        again.as_ref().ok(),
        Some(&body.to_bytes()),
        "a parsed body re-encodes to the same fields"
    );
    let sw = body.value("start_within");
    let _ = start_within::parse_value(sw.as_ref());
    body.remove("start_within");
    let _ = formats::model(&body, format);
    let _ = formats::reject_service_tier(&body);
    if format == CallerFormat::ChatCompletions {
        let _ = chat::validate(&body);
    }
    let _ = limits::estimate::worst_case_tokens(&body, format);
    let Ok(req) = translate::parse_request(format, &body) else {
        return;
    };
    let key = secrecy::SecretString::from("sk-fuzz".to_string());
    for provider in PROVIDERS {
        let _ = translate::require_max_tokens(provider, &req, format);
        for tier in TIERS {
            let _ = translate::upstream_request(provider, "https://fuzz.invalid", &req, tier, &key);
        }
    }
}

/// An upstream stream of `provider`: the race's classification of each event, the provider's
/// decoder, the canonical accumulator (non-streaming callers), and every caller format's encoder
/// and renderer. Each event an encoder writes must parse back as the same SSE event, with JSON
/// data (or Chat's `[DONE]`).
pub fn provider_stream(provider: Provider, bytes: &[u8]) {
    let mut decoder = translate::decoder(provider);
    let mut acc = Accumulator::default();
    let mut encoders: Vec<_> = FORMATS
        .iter()
        .map(|f| translate::encoder(*f, Tier::Flex, "fuzz-model", true))
        .collect();
    let mut canonical: Vec<StreamEvent> = Vec::new();
    let mut written: Vec<Event> = Vec::new();
    for ev in sse_events(bytes) {
        let _ = translate::classify(provider, &ev);
        canonical.clear();
        decoder.decode(&ev, &mut canonical);
        for e in &canonical {
            acc.push(e);
            for enc in &mut encoders {
                if let Some(t) = decoder.served_tier() {
                    enc.set_served(t);
                }
                written.clear();
                enc.encode(e, &mut written);
                for w in &written {
                    check_written(w);
                }
            }
        }
    }
    let served = decoder.served_tier().unwrap_or(Tier::Standard);
    let response = acc.finish();
    for f in FORMATS {
        let _ = translate::render(f, &response, served);
    }
}

/// An event we write parses back as itself, and its data is JSON (or `[DONE]`).
fn check_written(w: &Event) {
    let back = sse_events(&w.to_bytes());
    assert_eq!(back.as_slice(), std::slice::from_ref(w), "re-parsed {w:?}");
    assert!(
        w.data == "[DONE]" || serde_json::from_str::<serde_json::Value>(&w.data).is_ok(),
        "an encoder wrote data that is not JSON: {w:?}"
    );
}
