//! `start_within`: how long the caller is willing to wait for the answer to start.
//!
//! `"default" | "priority" | "auto"` pick a tier directly; a duration `"HHh-MMm-SSs"` between 5
//! seconds and 10 minutes (inclusive) runs the flex race against that budget.

use std::time::Duration;

use crate::error::ApiError;

pub const MIN: Duration = Duration::from_secs(5);
pub const MAX: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartWithin {
    Default,
    Priority,
    Auto,
    Within(Duration),
}

impl StartWithin {
    pub fn is_duration(self) -> bool {
        matches!(self, StartWithin::Within(_))
    }
}

const EXAMPLE: &str = r#""start_within": "00h-00m-30s" (or "default", "priority", "auto")"#;

fn invalid(why: String) -> ApiError {
    ApiError::bad_request("invalid_start_within", why)
        .param("start_within")
        .fix("use \"default\", \"priority\", \"auto\", or a duration \"HHh-MMm-SSs\" between 5s (00h-00m-05s) and 10m (00h-10m-00s).")
        .example(EXAMPLE)
}

pub fn missing() -> ApiError {
    ApiError::bad_request(
        "missing_start_within",
        "Missing required parameter `start_within`: every request must say how long it may wait to start, so FlexInference can pick the tier.",
    )
    .param("start_within")
    .fix("add start_within to the request body (in the OpenAI Python SDK: extra_body={\"start_within\": \"00h-00m-30s\"}).")
    .example(EXAMPLE)
}

/// Parses the JSON value of `start_within` (`None` when the field is absent or null).
pub fn parse_value(v: Option<&serde_json::Value>) -> Result<StartWithin, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Err(missing()),
        Some(serde_json::Value::String(s)) => parse(s),
        Some(other) => Err(invalid(format!(
            "`start_within` must be a string, got {}.",
            json_kind(other)
        ))),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Parses `default`, `priority`, `auto` or `HHh-MMm-SSs`.
pub fn parse(s: &str) -> Result<StartWithin, ApiError> {
    match s {
        "default" => return Ok(StartWithin::Default),
        "priority" => return Ok(StartWithin::Priority),
        "auto" => return Ok(StartWithin::Auto),
        _ => {}
    }
    let bad_shape = || {
        invalid(format!(
            "`start_within` is \"{}\", which is neither a tier name nor a duration of the form HHh-MMm-SSs.",
            s.chars().take(40).collect::<String>()
        ))
    };
    let parts: Vec<&str> = s.split('-').collect();
    let [h, m, sec] = parts.as_slice() else {
        return Err(bad_shape());
    };
    let num = |part: &str, unit: char| -> Option<u64> {
        let digits = part.strip_suffix(unit)?;
        if digits.len() != 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let (Some(h), Some(m), Some(sec)) = (num(h, 'h'), num(m, 'm'), num(sec, 's')) else {
        return Err(bad_shape());
    };
    if m >= 60 || sec >= 60 {
        return Err(invalid(format!(
            "`start_within` is \"{s}\": minutes and seconds must be below 60."
        )));
    }
    let d = Duration::from_secs(h * 3600 + m * 60 + sec);
    if d < MIN || d > MAX {
        return Err(invalid(format!(
            "`start_within` is \"{s}\" ({}s), outside the allowed range of 5s to 10m.",
            d.as_secs()
        )));
    }
    Ok(StartWithin::Within(d))
}

/// The text [`parse`] reads back as `sw`: a tier name, or the duration as `HHh-MMm-SSs` (whole
/// seconds; every duration in range has exactly one such text).
pub fn format(sw: StartWithin) -> String {
    match sw {
        StartWithin::Default => "default".into(),
        StartWithin::Priority => "priority".into(),
        StartWithin::Auto => "auto".into(),
        StartWithin::Within(d) => {
            let s = d.as_secs();
            format!("{:02}h-{:02}m-{:02}s", s / 3600, s / 60 % 60, s % 60)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(s: &str) -> &'static str {
        match parse(s) {
            Ok(_) => "ok",
            Err(e) => e.code,
        }
    }

    #[test]
    fn tier_names() {
        assert_eq!(parse("default").ok(), Some(StartWithin::Default));
        assert_eq!(parse("priority").ok(), Some(StartWithin::Priority));
        assert_eq!(parse("auto").ok(), Some(StartWithin::Auto));
        assert_eq!(code("flex"), "invalid_start_within");
        assert_eq!(code("Default"), "invalid_start_within");
    }

    #[test]
    fn boundaries() {
        assert_eq!(code("00h-00m-04s"), "invalid_start_within");
        assert_eq!(
            parse("00h-00m-05s").ok(),
            Some(StartWithin::Within(Duration::from_secs(5)))
        );
        assert_eq!(
            parse("00h-10m-00s").ok(),
            Some(StartWithin::Within(Duration::from_secs(600)))
        );
        assert_eq!(code("00h-10m-01s"), "invalid_start_within");
        assert_eq!(code("01h-00m-00s"), "invalid_start_within");
        assert_eq!(code("00h-00m-00s"), "invalid_start_within");
        assert_eq!(
            parse("00h-01m-30s").ok(),
            Some(StartWithin::Within(Duration::from_secs(90)))
        );
    }

    #[test]
    fn bad_shapes() {
        for s in [
            "",
            "30s",
            "00h-30s",
            "0h-0m-30s",
            "00h-00m-30",
            "00h:00m:30s",
            "00h-00m-5s",
            "00h-00m-60s",
            "00h-60m-00s",
            "00m-00h-30s",
            "-00h-00m-30s",
            "00h-00m-30s-",
            "aah-00m-30s",
            "00h-00m-+3s",
            " 00h-00m-30s",
        ] {
            assert_eq!(code(s), "invalid_start_within", "{s:?}");
        }
    }

    #[test]
    fn missing_and_wrong_types() {
        assert_eq!(
            parse_value(None).err().map(|e| e.code),
            Some("missing_start_within")
        );
        assert_eq!(
            parse_value(Some(&serde_json::Value::Null))
                .err()
                .map(|e| e.code),
            Some("missing_start_within")
        );
        let e = parse_value(Some(&serde_json::json!(30))).err();
        assert_eq!(e.as_ref().map(|e| e.code), Some("invalid_start_within"));
        assert!(e
            .map(|e| e.full_message())
            .unwrap_or_default()
            .contains("must be a string"));
    }

    #[test]
    fn format_is_the_text_parse_reads() {
        assert_eq!(format(StartWithin::Within(MIN)), "00h-00m-05s");
        assert_eq!(format(StartWithin::Within(MAX)), "00h-10m-00s");
        assert_eq!(
            format(StartWithin::Within(Duration::from_secs(90))),
            "00h-01m-30s"
        );
        assert_eq!(format(StartWithin::Auto), "auto");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Every duration in range formats to a text that parses back to it.
            #[test]
            fn durations_round_trip(secs in MIN.as_secs()..=MAX.as_secs()) {
                let sw = StartWithin::Within(Duration::from_secs(secs));
                prop_assert_eq!(parse(&format(sw)).ok(), Some(sw));
            }

            /// Any text: a tier, a duration in range (whose one text it is), or the one error.
            #[test]
            fn any_text_parses_or_is_refused(
                s in prop_oneof![
                    any::<String>(),
                    (0u64..100, 0u64..100, 0u64..100, any::<bool>()).prop_map(|(h, m, s, pad)| {
                        if pad { format!("{h:02}h-{m:02}m-{s:02}s") } else { format!("{h}h-{m}m-{s}s") }
                    }),
                ],
            ) {
                match parse(&s) {
                    Ok(sw) => {
                        if let StartWithin::Within(d) = sw {
                            prop_assert!((MIN..=MAX).contains(&d));
                        }
                        prop_assert_eq!(format(sw), s);
                    }
                    Err(e) => prop_assert_eq!(e.code, "invalid_start_within"),
                }
            }
        }
    }

    #[test]
    fn errors_say_what_why_fix_and_show_an_example() {
        let e = parse("00h-00m-04s")
            .err()
            .map(|e| e.full_message())
            .unwrap_or_default();
        assert!(e.contains("outside the allowed range of 5s to 10m"), "{e}");
        assert!(e.contains("Fix:"), "{e}");
        assert!(e.contains("Example:"), "{e}");
    }
}
