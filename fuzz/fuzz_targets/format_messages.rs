//! A caller's `/v1/messages` body through validation, the format's parser and every
//! provider's upstream request (`flex_fuzz::caller_request`).
#![no_main]

use flex_data_plane::formats::CallerFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flex_fuzz::caller_request(CallerFormat::Messages, data);
});
