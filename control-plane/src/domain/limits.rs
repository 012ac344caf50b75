//! Limits of an org or of one of its API keys (stream `limits-<org_id>[-<key_id>]`): the values
//! proxies enforce, what a `SetLimits` changes, and the aggregate that decides it.

use serde::{Deserialize, Serialize};

use super::{Aggregate, Event};
use crate::error::{Error, Result};

/// The largest limit value: counters are compared in Redis's Lua, whose numbers are doubles
/// (integers are exact up to 2^53).
pub const MAX_LIMIT: u64 = (1 << 53) - 1;

/// The limits of one scope (an org, or one API key). 0 = no such limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitValues {
    #[serde(default)]
    pub rpm: u64,
    #[serde(default)]
    pub tpm: u64,
    #[serde(default)]
    pub concurrency: u64,
    #[serde(default)]
    pub daily_budget_micros: i64,
    #[serde(default)]
    pub monthly_budget_micros: i64,
}

impl LimitValues {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn to_entry(
        self,
        org_id: &str,
        key_id: Option<&str>,
    ) -> flex_shared::proto::control::LimitEntry {
        flex_shared::proto::control::LimitEntry {
            org_id: org_id.to_string(),
            key_id: key_id.unwrap_or_default().to_string(),
            rpm: self.rpm,
            tpm: self.tpm,
            concurrency: self.concurrency,
            daily_budget_micros: self.daily_budget_micros,
            monthly_budget_micros: self.monthly_budget_micros,
        }
    }

    /// `name=value` of each limit set, e.g. `rpm=300, daily_budget_micros=5000000`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("rpm", self.rpm as i128),
            ("tpm", self.tpm as i128),
            ("concurrency", self.concurrency as i128),
            ("daily_budget_micros", self.daily_budget_micros as i128),
            ("monthly_budget_micros", self.monthly_budget_micros as i128),
        ]
        .iter()
        .filter(|(_, v)| *v != 0)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// What a `SetLimits` changes: `None` leaves a limit as it is, `Some(0)` removes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitChanges {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u64>,
    pub daily_budget_micros: Option<i64>,
    pub monthly_budget_micros: Option<i64>,
}

impl LimitChanges {
    /// Checks the values and returns `current` with the changes applied.
    pub fn apply_to(&self, current: LimitValues) -> Result<LimitValues> {
        let example = "e.g. `flex admin limits set --org org_… --rpm 300 --daily-budget-micros 5000000` ($5.00 a day)";
        if self == &Self::default() {
            return Err(Error::InvalidArgument(format!(
                "no limit given: name at least one of rpm, tpm, concurrency, daily_budget_micros, monthly_budget_micros (0 removes that limit), {example}"
            )));
        }
        let count = |name: &str, v: Option<u64>| -> Result<Option<u64>> {
            match v {
                Some(n) if n > MAX_LIMIT => Err(Error::InvalidArgument(format!(
                    "{name} must be at most {MAX_LIMIT} (got {n}); 0 removes the limit, {example}"
                ))),
                other => Ok(other),
            }
        };
        let money = |name: &str, v: Option<i64>| -> Result<Option<i64>> {
            match v {
                Some(n) if n < 0 => Err(Error::InvalidArgument(format!(
                    "{name} is integer micro-dollars and cannot be negative (got {n}); 0 removes the budget, {example}"
                ))),
                Some(n) if n as u64 > MAX_LIMIT => Err(Error::InvalidArgument(format!(
                    "{name} must be at most {MAX_LIMIT} micro-dollars (got {n}), {example}"
                ))),
                other => Ok(other),
            }
        };
        let mut next = current;
        if let Some(v) = count("rpm", self.rpm)? {
            next.rpm = v;
        }
        if let Some(v) = count("tpm", self.tpm)? {
            next.tpm = v;
        }
        if let Some(v) = count("concurrency", self.concurrency)? {
            next.concurrency = v;
        }
        if let Some(v) = money("daily_budget_micros", self.daily_budget_micros)? {
            next.daily_budget_micros = v;
        }
        if let Some(v) = money("monthly_budget_micros", self.monthly_budget_micros)? {
            next.monthly_budget_micros = v;
        }
        Ok(next)
    }
}

/// The limits of one scope, folded from its `limits-…` stream.
#[derive(Debug, Clone, Default)]
pub struct LimitsAggregate {
    pub current: LimitValues,
}

impl Aggregate for LimitsAggregate {
    fn apply(&mut self, e: &Event) {
        match e {
            Event::LimitsSet { limits, .. } => self.current = *limits,
            Event::LimitsCleared { .. } => self.current = LimitValues::default(),
            _ => {}
        }
    }
}

impl LimitsAggregate {
    /// The event that records `changes` (`None` when nothing changes): `LimitsSet` with the
    /// whole new set, or `LimitsCleared` when no limit is left.
    pub fn set(
        &self,
        org_id: &str,
        key_id: Option<&str>,
        changes: &LimitChanges,
    ) -> Result<Option<Event>> {
        let next = changes.apply_to(self.current)?;
        if next == self.current {
            return Ok(None);
        }
        Ok(Some(if next.is_empty() {
            Event::LimitsCleared {
                org_id: org_id.to_string(),
                key_id: key_id.map(str::to_string),
            }
        } else {
            Event::LimitsSet {
                org_id: org_id.to_string(),
                key_id: key_id.map(str::to_string),
                limits: next,
            }
        }))
    }

    /// `LimitsCleared`, or `None` when there are no limits to clear.
    pub fn clear(&self, org_id: &str, key_id: Option<&str>) -> Option<Event> {
        (!self.current.is_empty()).then(|| Event::LimitsCleared {
            org_id: org_id.to_string(),
            key_id: key_id.map(str::to_string),
        })
    }
}

/// `org org_…` or `api key key_… (org org_…)`.
pub fn limit_scope_name(org_id: &str, key_id: Option<&str>) -> String {
    match key_id {
        None => format!("org {org_id}"),
        Some(k) => format!("api key {k} (org {org_id})"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn limits_merge_remove_and_clear() {
        let mut agg = LimitsAggregate::default();
        let set = |rpm, daily| LimitChanges {
            rpm,
            daily_budget_micros: daily,
            ..LimitChanges::default()
        };
        let e = agg
            .set("o", Some("k"), &set(Some(300), None))
            .unwrap()
            .unwrap();
        assert_eq!(e.summary(), "limits of api key k (org o) set: rpm=300");
        agg.apply(&e);
        // Only what is named changes; setting the same values records nothing.
        let e = agg
            .set("o", Some("k"), &set(None, Some(5_000_000)))
            .unwrap()
            .unwrap();
        agg.apply(&e);
        assert_eq!(
            agg.current,
            LimitValues {
                rpm: 300,
                daily_budget_micros: 5_000_000,
                ..LimitValues::default()
            }
        );
        assert!(agg
            .set("o", Some("k"), &set(Some(300), None))
            .unwrap()
            .is_none());
        // 0 removes one; removing the last one clears the scope.
        let e = agg
            .set("o", Some("k"), &set(Some(0), None))
            .unwrap()
            .unwrap();
        agg.apply(&e);
        let e = agg
            .set("o", Some("k"), &set(None, Some(0)))
            .unwrap()
            .unwrap();
        assert!(matches!(e, Event::LimitsCleared { .. }), "{e:?}");
        agg.apply(&e);
        assert!(agg.clear("o", Some("k")).is_none());
        let err = agg.set("o", None, &LimitChanges::default()).unwrap_err();
        assert!(err.to_string().contains("no limit given"), "{err}");
        let err = agg.set("o", None, &set(None, Some(-1))).unwrap_err();
        assert!(err.to_string().contains("cannot be negative"), "{err}");
        let err = agg
            .set("o", None, &set(Some(MAX_LIMIT + 1), None))
            .unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        // Events round-trip; an org-wide event carries no key_id.
        let e = Event::LimitsSet {
            org_id: "o".into(),
            key_id: None,
            limits: LimitValues {
                tpm: 10,
                ..LimitValues::default()
            },
        };
        let json = e.to_new().unwrap().payload;
        assert!(!json.contains("key_id"), "{json}");
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
    }
}
