//! Timestamps: UTC with microsecond precision (what both databases keep), printed in one fixed
//! RFC 3339 form, `YYYY-MM-DDTHH:MM:SS.ffffffZ`, whose text order is time order.

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// Now, truncated to microseconds.
pub fn now() -> OffsetDateTime {
    truncate(OffsetDateTime::now_utc())
}

/// UTC, truncated to microseconds.
pub fn truncate(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(UtcOffset::UTC);
    t.replace_nanosecond(t.microsecond() * 1000).unwrap_or(t)
}

/// The fixed-width RFC 3339 form.
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Parses any RFC 3339 time (normalized to UTC, microseconds).
pub fn parse(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s.trim(), &Rfc3339).ok().map(truncate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_sorts_as_text() {
        let t = now();
        assert_eq!(parse(&format(t)), Some(t));
        let a = parse("2025-01-01T00:00:00Z").unwrap_or(t);
        let b = parse("2025-01-01T00:00:00.5+00:00").unwrap_or(t);
        assert!(format(a) < format(b));
        assert_eq!(format(a), "2025-01-01T00:00:00.000000Z");
        assert_eq!(
            parse("2025-01-01T02:00:00+02:00").map(format).as_deref(),
            Some("2025-01-01T00:00:00.000000Z")
        );
    }
}
