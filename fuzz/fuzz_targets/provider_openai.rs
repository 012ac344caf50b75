//! An upstream OpenAi stream: SSE, the race's classification, the stream decoder, the accumulator
//! and every caller format's encoder (`flex_fuzz::provider_stream`).
#![no_main]

use flex_shared::catalog::Provider;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flex_fuzz::provider_stream(Provider::OpenAi, data);
});
