//! The model catalog: which provider serves a model, whether it has a flex tier, and its prices.
//!
//! The built-in catalog ships with the binary (seed 003's flex-capable models); operators override
//! or add models through the control plane's snapshot, so a proxy learns a new model without a
//! redeploy. Prices are integer micro-dollars per million tokens, per tier.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::proto::control as pb;

/// An upstream provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::OpenAi, Provider::Anthropic, Provider::Gemini];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(Provider::OpenAi),
            "anthropic" => Some(Provider::Anthropic),
            "gemini" => Some(Provider::Gemini),
            _ => None,
        }
    }

    /// The provider a model id belongs to by its family prefix (`gpt-*`, `o3`, `o4-*`, …).
    pub fn for_model_prefix(model: &str) -> Option<Self> {
        let m = model.to_ascii_lowercase();
        if m.starts_with("gpt-")
            || m.starts_with("chatgpt-")
            || m.starts_with("codex-")
            || is_o_series(&m)
        {
            Some(Provider::OpenAi)
        } else if m.starts_with("gemini-") {
            Some(Provider::Gemini)
        } else if m.starts_with("claude-") {
            Some(Provider::Anthropic)
        } else {
            None
        }
    }
}

fn is_o_series(m: &str) -> bool {
    // o1, o3, o3-mini, o4-mini, ...
    let mut chars = m.chars();
    chars.next() == Some('o')
        && chars.next().is_some_and(|c| c.is_ascii_digit())
        && chars.next().is_none_or(|c| c == '-')
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The tier that served (or would serve) a request, in our own vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Flex,
    Standard,
    Priority,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Flex => "flex",
            Tier::Standard => "standard",
            Tier::Priority => "priority",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "flex" => Some(Tier::Flex),
            "standard" | "default" => Some(Tier::Standard),
            "priority" => Some(Tier::Priority),
            _ => None,
        }
    }
}

/// Price per million tokens in micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Price {
    pub input: i64,
    pub cached_input: i64,
    pub output: i64,
}

impl Price {
    const fn new(input: i64, cached_input: i64, output: i64) -> Self {
        Self {
            input,
            cached_input,
            output,
        }
    }

    /// Half price: the flex (batch-rate) tier.
    const fn half(self) -> Self {
        Self::new(self.input / 2, self.cached_input / 2, self.output / 2)
    }

    /// Priority: about 1.8x standard.
    const fn priority(self) -> Self {
        Self::new(
            self.input * 9 / 5,
            self.cached_input * 9 / 5,
            self.output * 9 / 5,
        )
    }

    /// Cost in micro-dollars of the given token counts (uncached input, cached input, output),
    /// rounded up so a request never costs zero by rounding.
    pub fn cost_micros(&self, uncached_input: u64, cached_input: u64, output: u64) -> i64 {
        let num = i128::from(self.input) * i128::from(uncached_input)
            + i128::from(self.cached_input) * i128::from(cached_input)
            + i128::from(self.output) * i128::from(output);
        let cost = (num + 999_999) / 1_000_000;
        i64::try_from(cost).unwrap_or(i64::MAX)
    }
}

/// One catalog entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    pub id: String,
    pub provider: Provider,
    pub flex_capable: bool,
    pub aliases: Vec<String>,
    pub standard: Price,
    pub flex: Option<Price>,
    pub priority: Option<Price>,
    /// Floor for the learned standard-tier start latency used to launch the hedge, ms.
    pub standard_start_floor_ms: u32,
}

impl Model {
    pub fn price(&self, tier: Tier) -> Price {
        match tier {
            Tier::Flex => self.flex.unwrap_or(self.standard),
            Tier::Standard => self.standard,
            Tier::Priority => self.priority.unwrap_or(self.standard),
        }
    }

    pub fn to_proto(&self) -> pb::ModelEntry {
        let mut prices = vec![tier_price("standard", self.standard)];
        if let Some(p) = self.flex {
            prices.push(tier_price("flex", p));
        }
        if let Some(p) = self.priority {
            prices.push(tier_price("priority", p));
        }
        pb::ModelEntry {
            id: self.id.clone(),
            provider: self.provider.as_str().to_string(),
            flex_capable: self.flex_capable,
            aliases: self.aliases.clone(),
            prices,
            standard_start_floor_ms: self.standard_start_floor_ms,
        }
    }

    /// Validates an operator-supplied entry.
    pub fn from_proto(e: &pb::ModelEntry) -> Result<Self, String> {
        if e.id.trim().is_empty() {
            return Err("model entry has an empty id".into());
        }
        let provider = Provider::parse(&e.provider).ok_or_else(|| {
            format!(
                "model `{}` names unknown provider `{}` (expected openai, anthropic or gemini)",
                e.id, e.provider
            )
        })?;
        let mut standard = None;
        let mut flex = None;
        let mut priority = None;
        for p in &e.prices {
            if p.input_per_mtok_micros < 0
                || p.output_per_mtok_micros < 0
                || p.cached_input_per_mtok_micros < 0
            {
                return Err(format!("model `{}` has a negative price", e.id));
            }
            let price = Price::new(
                p.input_per_mtok_micros,
                p.cached_input_per_mtok_micros,
                p.output_per_mtok_micros,
            );
            match p.tier.as_str() {
                "standard" => standard = Some(price),
                "flex" => flex = Some(price),
                "priority" => priority = Some(price),
                other => {
                    return Err(format!(
                        "model `{}` has a price for unknown tier `{other}`",
                        e.id
                    ))
                }
            }
        }
        Ok(Model {
            id: e.id.clone(),
            provider,
            flex_capable: e.flex_capable,
            aliases: e.aliases.clone(),
            standard: standard.ok_or_else(|| format!("model `{}` has no standard price", e.id))?,
            flex,
            priority,
            standard_start_floor_ms: e.standard_start_floor_ms,
        })
    }
}

fn tier_price(tier: &str, p: Price) -> pb::TierPrice {
    pb::TierPrice {
        tier: tier.to_string(),
        input_per_mtok_micros: p.input,
        cached_input_per_mtok_micros: p.cached_input,
        output_per_mtok_micros: p.output,
    }
}

/// Default floor for the standard tier's start latency, ms.
pub const DEFAULT_STANDARD_START_FLOOR_MS: u32 = 500;

fn m(id: &str, provider: Provider, flex: bool, standard: Price) -> Model {
    Model {
        id: id.to_string(),
        provider,
        flex_capable: flex,
        aliases: Vec::new(),
        standard,
        flex: flex.then(|| standard.half()),
        priority: Some(standard.priority()),
        standard_start_floor_ms: DEFAULT_STANDARD_START_FLOOR_MS,
    }
}

/// The built-in catalog (seed 003). Prices are list prices in micro-dollars per million tokens
/// (input, cached input, output); flex is half of standard. Operators override them through the
/// control plane.
pub fn builtin() -> Vec<Model> {
    use Provider::*;
    let p = Price::new;
    vec![
        m("gpt-5.5", OpenAi, true, p(1_250_000, 125_000, 10_000_000)),
        m(
            "gpt-5.5-pro",
            OpenAi,
            true,
            p(15_000_000, 1_500_000, 120_000_000),
        ),
        m("gpt-5.4", OpenAi, true, p(1_250_000, 125_000, 10_000_000)),
        m("gpt-5.4-mini", OpenAi, true, p(250_000, 25_000, 2_000_000)),
        m("gpt-5.4-nano", OpenAi, true, p(50_000, 5_000, 400_000)),
        m(
            "gpt-5.4-pro",
            OpenAi,
            true,
            p(15_000_000, 1_500_000, 120_000_000),
        ),
        m("gpt-5.2", OpenAi, true, p(1_250_000, 125_000, 10_000_000)),
        m(
            "gpt-5.2-pro",
            OpenAi,
            true,
            p(15_000_000, 1_500_000, 120_000_000),
        ),
        m("gpt-5", OpenAi, true, p(1_250_000, 125_000, 10_000_000)),
        m("gpt-5-mini", OpenAi, true, p(250_000, 25_000, 2_000_000)),
        m("gpt-5-nano", OpenAi, true, p(50_000, 5_000, 400_000)),
        m("gpt-5.1", OpenAi, true, p(1_250_000, 125_000, 10_000_000)),
        m("o3", OpenAi, true, p(2_000_000, 500_000, 8_000_000)),
        m("o4-mini", OpenAi, true, p(1_100_000, 275_000, 4_400_000)),
        m("gpt-4.1", OpenAi, false, p(2_000_000, 500_000, 8_000_000)),
        m("gpt-4o", OpenAi, false, p(2_500_000, 1_250_000, 10_000_000)),
        m("gpt-4o-mini", OpenAi, false, p(150_000, 75_000, 600_000)),
        m(
            "gemini-3.5-flash",
            Gemini,
            true,
            p(300_000, 30_000, 2_500_000),
        ),
        m(
            "gemini-3.1-pro-preview",
            Gemini,
            true,
            p(2_000_000, 200_000, 12_000_000),
        ),
        m(
            "gemini-3.1-flash-lite",
            Gemini,
            true,
            p(100_000, 10_000, 400_000),
        ),
        m(
            "gemini-3-flash-preview",
            Gemini,
            true,
            p(300_000, 30_000, 2_500_000),
        ),
        m(
            "gemini-2.5-pro",
            Gemini,
            true,
            p(1_250_000, 125_000, 10_000_000),
        ),
        m(
            "gemini-2.5-flash",
            Gemini,
            true,
            p(300_000, 30_000, 2_500_000),
        ),
        m(
            "gemini-2.5-flash-lite",
            Gemini,
            true,
            p(100_000, 10_000, 400_000),
        ),
        m(
            "gemini-2.0-flash",
            Gemini,
            false,
            p(100_000, 25_000, 400_000),
        ),
        m(
            "claude-opus-4-8",
            Anthropic,
            false,
            p(5_000_000, 500_000, 25_000_000),
        ),
        m(
            "claude-opus-4-7",
            Anthropic,
            false,
            p(5_000_000, 500_000, 25_000_000),
        ),
        m(
            "claude-opus-4-6",
            Anthropic,
            false,
            p(5_000_000, 500_000, 25_000_000),
        ),
        m(
            "claude-opus-4-5",
            Anthropic,
            false,
            p(5_000_000, 500_000, 25_000_000),
        ),
        m(
            "claude-opus-4-1",
            Anthropic,
            false,
            p(15_000_000, 1_500_000, 75_000_000),
        ),
        m(
            "claude-sonnet-5",
            Anthropic,
            false,
            p(3_000_000, 300_000, 15_000_000),
        ),
        m(
            "claude-sonnet-4-6",
            Anthropic,
            false,
            p(3_000_000, 300_000, 15_000_000),
        ),
        m(
            "claude-sonnet-4-5",
            Anthropic,
            false,
            p(3_000_000, 300_000, 15_000_000),
        ),
        m(
            "claude-haiku-4-5",
            Anthropic,
            false,
            p(1_000_000, 100_000, 5_000_000),
        ),
        m(
            "claude-fable-5",
            Anthropic,
            false,
            p(3_000_000, 300_000, 15_000_000),
        ),
    ]
}

/// A catalog indexed by id and alias: the built-in entries with operator overrides on top.
#[derive(Debug, Clone)]
pub struct Catalog {
    models: Vec<Model>,
    index: HashMap<String, usize>,
}

impl Catalog {
    pub fn new(models: Vec<Model>) -> Self {
        let mut index = HashMap::new();
        for (i, model) in models.iter().enumerate() {
            index.insert(model.id.clone(), i);
            for alias in &model.aliases {
                index.entry(alias.clone()).or_insert(i);
            }
        }
        Self { models, index }
    }

    /// The built-in catalog with `overrides` replacing or adding entries by id.
    pub fn with_overrides(overrides: &[Model]) -> Self {
        let mut models = builtin();
        for o in overrides {
            match models.iter_mut().find(|m| m.id == o.id) {
                Some(slot) => *slot = o.clone(),
                None => models.push(o.clone()),
            }
        }
        Self::new(models)
    }

    /// Exact id or alias. A dated snapshot name (`gpt-5.5-2026-01-01`) is not an alias.
    pub fn get(&self, model: &str) -> Option<&Model> {
        self.index.get(model).and_then(|&i| self.models.get(i))
    }

    pub fn models(&self) -> &[Model] {
        &self.models
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Self::new(builtin())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_by_prefix() {
        assert_eq!(Provider::for_model_prefix("gpt-4o"), Some(Provider::OpenAi));
        assert_eq!(Provider::for_model_prefix("o3"), Some(Provider::OpenAi));
        assert_eq!(
            Provider::for_model_prefix("o4-mini"),
            Some(Provider::OpenAi)
        );
        assert_eq!(
            Provider::for_model_prefix("gemini-9"),
            Some(Provider::Gemini)
        );
        assert_eq!(
            Provider::for_model_prefix("claude-x"),
            Some(Provider::Anthropic)
        );
        assert_eq!(Provider::for_model_prefix("omega"), None);
        assert_eq!(Provider::for_model_prefix("llama-3"), None);
    }

    #[test]
    fn seed_flex_models_are_flex_capable_and_claude_is_not() {
        let c = Catalog::default();
        for id in [
            "gpt-5.5",
            "gpt-5-nano",
            "o3",
            "o4-mini",
            "gemini-3.5-flash",
            "gemini-2.5-flash-lite",
        ] {
            assert!(c.get(id).is_some_and(|m| m.flex_capable), "{id}");
        }
        assert!(!c.get("claude-opus-4-8").is_some_and(|m| m.flex_capable));
        assert!(
            c.get("gpt-5.5-2026-01-01").is_none(),
            "dated snapshots are not aliases"
        );
    }

    #[test]
    fn cost_is_integer_and_rounds_up() {
        let p = Price::new(1_250_000, 125_000, 10_000_000);
        // 1000 input tokens at $1.25/M = 1250 micros; 100 output at $10/M = 1000 micros.
        assert_eq!(p.cost_micros(1000, 0, 100), 2250);
        assert_eq!(Price::new(1, 0, 0).cost_micros(1, 0, 0), 1);
        assert_eq!(p.half().cost_micros(1000, 0, 100), 1125);
    }

    #[test]
    fn overrides_replace_and_add() {
        let mut custom = builtin()[0].clone();
        custom.standard.input = 7;
        let mut new = custom.clone();
        new.id = "gpt-9".into();
        new.aliases = vec!["gpt-nine".into()];
        let c = Catalog::with_overrides(&[custom, new]);
        assert_eq!(c.get("gpt-5.5").map(|m| m.standard.input), Some(7));
        assert_eq!(c.get("gpt-nine").map(|m| m.id.as_str()), Some("gpt-9"));
    }

    #[test]
    fn proto_round_trip_validates() {
        let m0 = builtin()[0].clone();
        assert_eq!(Model::from_proto(&m0.to_proto()), Ok(m0));
        let mut bad = builtin()[0].to_proto();
        bad.provider = "mistral".into();
        assert!(Model::from_proto(&bad).is_err());
    }
}
