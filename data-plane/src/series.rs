//! Series that a component reads off its own state at scrape time (the usage sink, the
//! limiter), typed so that `metrics` encodes them like the proxy's other series, each with its
//! own help text. No component here formats Prometheus text itself.

use std::fmt::Write as _;

/// One metric family: a counter or a gauge, with one value per label value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The name without the `flex_` prefix and, for a counter, without `_total`.
    pub name: &'static str,
    pub help: &'static str,
    pub counter: bool,
    /// One value per label value (`None`: the family's single, unlabelled value).
    pub samples: Vec<(Option<(&'static str, String)>, f64)>,
}

impl Series {
    /// A gauge with one value.
    pub fn gauge(name: &'static str, help: &'static str, value: f64) -> Self {
        Self {
            name,
            help,
            counter: false,
            samples: vec![(None, value)],
        }
    }

    /// A gauge with one labelled value.
    pub fn gauge_with(
        name: &'static str,
        help: &'static str,
        label: (&'static str, String),
        value: f64,
    ) -> Self {
        Self {
            name,
            help,
            counter: false,
            samples: vec![(Some(label), value)],
        }
    }

    /// A counter with one value.
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Self {
        Self {
            name,
            help,
            counter: true,
            samples: vec![(None, value as f64)],
        }
    }

    /// A counter with one value per value of `label`.
    pub fn counter_by(
        name: &'static str,
        help: &'static str,
        label: &'static str,
        values: impl IntoIterator<Item = (String, u64)>,
    ) -> Self {
        Self {
            name,
            help,
            counter: true,
            samples: values
                .into_iter()
                .map(|(v, n)| (Some((label, v)), n as f64))
                .collect(),
        }
    }
}

/// The series as plain lines, `name value` or `name{label="v"} value` (counters end in
/// `_total`, no `flex_` prefix): what tests and examples read.
pub fn text(series: &[Series]) -> String {
    let mut out = String::new();
    for s in series {
        let suffix = if s.counter { "_total" } else { "" };
        for (label, v) in &s.samples {
            let _ = match label {
                Some((k, lv)) => writeln!(out, "{}{suffix}{{{k}=\"{lv}\"}} {v}", s.name),
                None => writeln!(out, "{}{suffix} {v}", s.name),
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_counters_with_total_and_labels_in_braces() {
        let s = [
            Series::counter("a", "h", 3),
            Series::gauge("b", "h", 0.0),
            Series::counter_by("c", "h", "reason", [("full".to_string(), 1)]),
            Series::gauge_with("d", "h", ("counters", "redis".into()), 1.0),
        ];
        assert_eq!(
            text(&s),
            "a_total 3\nb 0\nc_total{reason=\"full\"} 1\nd{counters=\"redis\"} 1\n"
        );
    }
}
