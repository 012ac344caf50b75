//! Translation cost benchmark: for every caller format × provider, the CPU time of
//! (a) one typical request: caller body bytes → `RawBody::parse` → `translate::parse_request` →
//!     the provider's body → serialized bytes (the translated path of the proxy), and
//! (b) one upstream stream event: provider SSE event → decoder → caller encoder → caller SSE
//!     bytes, over transcripts recorded from the provider simulator.
//!
//! The typical request (~2 KB) is a multi-turn conversation with a system prompt, two tools,
//! an earlier text turn, an assistant tool call and its result. Transcripts: one text answer of
//! 120 words and one tool call, recorded per provider by sending the translated request to the
//! in-process simulator.
//!
//! Plain `Instant` loops: warm-up, then several batches; the median and the best batch are
//! reported.
//!
//! Run: `cargo run --release --example translation -- [--batches N] [--request-iters N]
//! [--stream-iters N]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flex::sim::{self, SimConfig};
use flex_data_plane::canonical as c;
use flex_data_plane::formats::{CallerFormat, RawBody};
use flex_data_plane::providers::{anthropic, gemini, openai, AskTier};
use flex_data_plane::sse::{Event, Parser};
use flex_data_plane::translate;
use flex_shared::catalog::{Provider, Tier};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::SecretString;
use serde_json::{json, Value};

const FORMATS: [CallerFormat; 4] = [
    CallerFormat::Responses,
    CallerFormat::ChatCompletions,
    CallerFormat::Interactions,
    CallerFormat::Messages,
];
const PROVIDERS: [Provider; 3] = [Provider::OpenAi, Provider::Anthropic, Provider::Gemini];

const SYSTEM: &str = "You are Atlas, the travel assistant of Northwind Travel. Answer in the \
user's language, in short paragraphs. Use the tools for facts that change (weather, flights, \
prices); never guess them. When a tool fails, say so plainly and offer an alternative. Quote \
prices with their currency and say whether taxes are included. Do not book anything without an \
explicit confirmation from the user, and repeat the dates, airports and passenger count before \
asking for it. Keep personal data out of tool arguments unless the tool needs it.";

const USER_1: &str =
    "Hi! I'm planning a long weekend in Paris with my partner, leaving Amsterdam next Friday \
morning and coming back on Monday evening. What should we pack?";
const ASSISTANT_1: &str = "A long weekend in Paris sounds lovely. Packing depends mostly on the \
weather, which I can look up for your dates. In any case: comfortable walking shoes, a light \
rain jacket, an adapter is not needed from the Netherlands, and a small day bag for museums.";
const USER_2: &str =
    "Great, please check the weather for Paris for those days, and then find us morning \
flights from AMS to CDG on Friday for two people.";
const CALL_ARGS: &str = r#"{"location":"Paris, France","unit":"celsius","days":4}"#;
const TOOL_RESULT: &str = r#"{"location":"Paris, France","forecast":[{"day":"Fri","high":19,"low":11,"sky":"sunny"},{"day":"Sat","high":21,"low":12,"sky":"partly cloudy"},{"day":"Sun","high":17,"low":10,"sky":"showers"},{"day":"Mon","high":18,"low":9,"sky":"cloudy"}]}"#;

fn weather_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 10, "description": "Days of forecast"}
        },
        "required": ["location"],
        "additionalProperties": false
    })
}

fn flights_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "origin": {"type": "string", "description": "IATA code of the departure airport"},
            "destination": {"type": "string", "description": "IATA code of the arrival airport"},
            "date": {"type": "string", "description": "Departure date, YYYY-MM-DD"},
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            "time_of_day": {"type": "string", "enum": ["morning", "afternoon", "evening", "any"]}
        },
        "required": ["origin", "destination", "date", "passengers"],
        "additionalProperties": false
    })
}

const WEATHER_DESC: &str = "Get the weather forecast for a city for the next days.";
const FLIGHTS_DESC: &str = "Search scheduled flights between two airports on a date.";

fn model_for(p: Provider) -> &'static str {
    match p {
        Provider::OpenAi => "gpt-5.5",
        Provider::Anthropic => "claude-opus-4-8",
        Provider::Gemini => "gemini-3.5-flash",
    }
}

/// The typical request in a caller format; `directive` is appended to the last user text.
fn caller_body(format: CallerFormat, model: &str, directive: &str) -> Bytes {
    let user_2 = format!("{USER_2}{directive}");
    let v = match format {
        CallerFormat::Responses => json!({
            "model": model,
            "instructions": SYSTEM,
            "input": [
                {"role": "user", "content": USER_1},
                {"role": "assistant", "content": ASSISTANT_1},
                {"role": "user", "content": user_2},
                {"type": "function_call", "call_id": "call_8fJx2kQm4Lr7", "name": "get_weather", "arguments": CALL_ARGS},
                {"type": "function_call_output", "call_id": "call_8fJx2kQm4Lr7", "output": TOOL_RESULT}
            ],
            "tools": [
                {"type": "function", "name": "get_weather", "description": WEATHER_DESC, "parameters": weather_schema()},
                {"type": "function", "name": "search_flights", "description": FLIGHTS_DESC, "parameters": flights_schema()}
            ],
            "max_output_tokens": 1024,
            "temperature": 0.7,
            "stream": true,
            "start_within": "00h-00m-30s"
        }),
        CallerFormat::ChatCompletions => json!({
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": USER_1},
                {"role": "assistant", "content": ASSISTANT_1},
                {"role": "user", "content": user_2},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_8fJx2kQm4Lr7", "type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}}
                ]},
                {"role": "tool", "tool_call_id": "call_8fJx2kQm4Lr7", "content": TOOL_RESULT}
            ],
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "description": WEATHER_DESC, "parameters": weather_schema()}},
                {"type": "function", "function": {"name": "search_flights", "description": FLIGHTS_DESC, "parameters": flights_schema()}}
            ],
            "max_completion_tokens": 1024,
            "temperature": 0.7,
            "stream": true,
            "stream_options": {"include_usage": true},
            "start_within": "00h-00m-30s"
        }),
        CallerFormat::Interactions => json!({
            "model": model,
            "system_instruction": SYSTEM,
            "input": [
                {"type": "user_input", "content": [{"type": "text", "text": USER_1}]},
                {"type": "model_output", "content": [{"type": "text", "text": ASSISTANT_1}]},
                {"type": "user_input", "content": [{"type": "text", "text": user_2}]},
                {"type": "function_call", "id": "call_8fJx2kQm4Lr7", "name": "get_weather", "arguments": serde_json::from_str::<Value>(CALL_ARGS).unwrap()},
                {"type": "function_result", "call_id": "call_8fJx2kQm4Lr7", "name": "get_weather", "result": TOOL_RESULT}
            ],
            "tools": [
                {"type": "function", "name": "get_weather", "description": WEATHER_DESC, "parameters": weather_schema()},
                {"type": "function", "name": "search_flights", "description": FLIGHTS_DESC, "parameters": flights_schema()}
            ],
            "generation_config": {"max_output_tokens": 1024, "temperature": 0.7},
            "stream": true,
            "start_within": "00h-00m-30s"
        }),
        CallerFormat::Messages => json!({
            "model": model,
            "system": SYSTEM,
            "messages": [
                {"role": "user", "content": USER_1},
                {"role": "assistant", "content": ASSISTANT_1},
                {"role": "user", "content": user_2},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_01A8fJx2kQm4Lr7", "name": "get_weather", "input": serde_json::from_str::<Value>(CALL_ARGS).unwrap()}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A8fJx2kQm4Lr7", "content": TOOL_RESULT}
                ]}
            ],
            "tools": [
                {"name": "get_weather", "description": WEATHER_DESC, "input_schema": weather_schema()},
                {"name": "search_flights", "description": FLIGHTS_DESC, "input_schema": flights_schema()}
            ],
            "max_tokens": 1024,
            "temperature": 0.7,
            "stream": true,
            "start_within": "00h-00m-30s"
        }),
    };
    Bytes::from(serde_json::to_vec(&v).unwrap())
}

/// The translated request path for one body: parse, canonical, provider body, bytes.
fn translate_request(format: CallerFormat, provider: Provider, raw: &[u8]) -> Vec<u8> {
    let mut body = RawBody::parse(raw, format).unwrap();
    body.remove("start_within");
    let req = translate::parse_request(format, &body).unwrap();
    let upstream = match provider {
        Provider::OpenAi => openai::body(&req, AskTier::Standard),
        Provider::Anthropic => anthropic::body(&req, AskTier::Standard).unwrap(),
        Provider::Gemini => gemini::body(&req, AskTier::Standard).unwrap(),
    };
    serde_json::to_vec(&upstream).unwrap()
}

/// One stream through decoder and encoder; returns the caller bytes produced.
fn translate_stream(format: CallerFormat, provider: Provider, events: &[Event]) -> usize {
    let mut dec = translate::decoder(provider);
    let mut enc = translate::encoder(format, Tier::Flex, model_for(provider), true);
    let mut canonical: Vec<c::StreamEvent> = Vec::with_capacity(8);
    let mut out = Vec::with_capacity(8);
    let mut bytes = 0;
    for ev in events {
        canonical.clear();
        dec.decode(ev, &mut canonical);
        for e in &canonical {
            out.clear();
            enc.encode(e, &mut out);
            for o in &out {
                bytes += o.to_bytes().len();
            }
        }
    }
    bytes
}

/// Time per iteration of `f` over `batches` batches, after a warm-up: (median batch, best batch).
/// Other processes on the machine only ever add time, so the best batch is the least disturbed.
fn measure(batches: usize, iters: usize, mut f: impl FnMut() -> usize) -> (Duration, Duration) {
    for _ in 0..iters * 10 {
        black_box(f());
    }
    let mut per: Vec<Duration> = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(f());
            }
            t.elapsed() / u32::try_from(iters).unwrap()
        })
        .collect();
    per.sort_unstable();
    (per[per.len() / 2], per[0])
}

fn flag(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} wants a number"))
        })
}

/// Records one streamed answer of `provider` from the simulator, as parsed SSE events.
async fn record(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    sim: &sim::SimHandle,
    provider: Provider,
    directive: &str,
) -> Vec<Event> {
    // A Responses caller's typical request, translated, with the directive in the user text.
    let raw = caller_body(CallerFormat::Responses, model_for(provider), directive);
    let mut body = RawBody::parse(&raw, CallerFormat::Responses).unwrap();
    body.remove("start_within");
    let req = translate::parse_request(CallerFormat::Responses, &body).unwrap();
    let base = match provider {
        Provider::OpenAi => sim.openai_base_url(),
        _ => sim.base_url(),
    };
    let key = SecretString::from("sk-bench".to_string());
    let http_req =
        translate::upstream_request(provider, &base, &req, AskTier::Standard, &key).unwrap();
    let resp = client
        .request(flex_data_plane::upstream::replay(&http_req))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{provider:?} transcript");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let mut parser = Parser::new();
    let mut events = Vec::new();
    parser.feed(&bytes, &mut events).unwrap();
    parser.finish(&mut events);
    events
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Many short batches (a few ms each): on a shared machine some run undisturbed.
    let batches = flag(&args, "--batches", 301);
    let request_iters = flag(&args, "--request-iters", 100);
    let stream_iters = flag(&args, "--stream-iters", 10);

    let sim = sim::spawn(SimConfig {
        standard_delay_ms: 0,
        flex_delay_ms: 0,
        priority_delay_ms: 0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut transcripts = Vec::new();
    for p in PROVIDERS {
        let text = record(&client, &sim, p, " #sim output_tokens=120").await;
        let tool = record(&client, &sim, p, " #sim tool=search_flights").await;
        transcripts.push((p, text, tool));
    }
    drop(sim);

    println!("batches={batches} request_iters={request_iters} stream_iters={stream_iters}");
    for (p, text, tool) in &transcripts {
        println!(
            "transcript {}: text answer {} events, tool call {} events",
            p.as_str(),
            text.len(),
            tool.len()
        );
    }
    println!();
    println!("| caller → provider | request bytes in → out | µs / request, median (best) | upstream events | µs / event, median (best) | caller bytes out |");
    println!("|---|---|---|---|---|---|");
    for f in FORMATS {
        for (p, text, tool) in &transcripts {
            let p = *p;
            let raw = caller_body(f, model_for(p), "");
            let out_len = translate_request(f, p, &raw).len();
            let req = measure(batches, request_iters, || {
                translate_request(f, p, &raw).len()
            });
            let events = text.len() + tool.len();
            let caller_bytes = translate_stream(f, p, text) + translate_stream(f, p, tool);
            let per_pair = measure(batches, stream_iters, || {
                translate_stream(f, p, text) + translate_stream(f, p, tool)
            });
            let per_event = |d: Duration| d.as_secs_f64() * 1e6 / events as f64;
            println!(
                "| {} → {} | {} → {} | {:.1} ({:.1}) | {} | {:.2} ({:.2}) | {} |",
                f.as_str(),
                p.as_str(),
                raw.len(),
                out_len,
                req.0.as_secs_f64() * 1e6,
                req.1.as_secs_f64() * 1e6,
                events,
                per_event(per_pair.0),
                per_event(per_pair.1),
                caller_bytes
            );
        }
    }

    // The native pairs skip translation: the proxy forwards the body with the tier edited.
    println!();
    println!("| native passthrough (no canonical) | µs / request, median (best) |");
    println!("|---|---|");
    for (f, p) in [
        (CallerFormat::Responses, Provider::OpenAi),
        (CallerFormat::ChatCompletions, Provider::OpenAi),
        (CallerFormat::Messages, Provider::Anthropic),
    ] {
        let raw = caller_body(f, model_for(p), "");
        let t = measure(batches, request_iters, || {
            let mut body = RawBody::parse(&raw, f).unwrap();
            body.remove("start_within");
            body.set("service_tier", &json!("flex"));
            body.to_bytes().len()
        });
        println!(
            "| {} → {} | {:.1} ({:.1}) |",
            f.as_str(),
            p.as_str(),
            t.0.as_secs_f64() * 1e6,
            t.1.as_secs_f64() * 1e6
        );
    }
}
