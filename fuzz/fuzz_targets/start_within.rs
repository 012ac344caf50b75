//! `start_within` (`start_within::parse`, `parse_value`): any string or JSON value is a tier, a
//! duration in range, or an error; and what parses formats back to the same text.
#![no_main]

use flex_data_plane::start_within::{self, StartWithin};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = start_within::parse_value(Some(&v));
    }
    let s = String::from_utf8_lossy(data);
    match start_within::parse(&s) {
        Ok(sw) => {
            if let StartWithin::Within(d) = sw {
                assert!(
                    d >= start_within::MIN && d <= start_within::MAX,
                    "{s:?}: {d:?}"
                );
            }
            assert_eq!(start_within::format(sw), s, "format(parse({s:?}))");
        }
        Err(e) => assert_eq!(e.code, "invalid_start_within"),
    }
});
