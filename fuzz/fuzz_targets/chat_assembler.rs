//! A native Chat Completions stream (OpenAI's `chat.completion.chunk` events) assembled into one
//! `chat.completion` for a non-streaming caller (`formats::chat::Assembler`).
#![no_main]

use flex_data_plane::formats::chat::{self, Assembler};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut asm = Assembler::default();
    for ev in flex_fuzz::sse_events(data) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&ev.data) {
            let _ = chat::chunk_has_content(&v);
            asm.push(&v);
        }
    }
    let _ = asm.usage();
    let _ = asm.finish();
});
