//! `flex admin model`: the catalog overrides shipped to every proxy.

use anyhow::Result;
use clap::Subcommand;
use flex_shared::proto::admin as pb;
use serde_json::{json, Value};

use super::{print, status_err, Client};

#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Adds or replaces a model (prices in micro-dollars per million tokens).
    Set {
        #[arg(long, env = "FLEX_ID")]
        id: String,
        #[arg(long, env = "FLEX_PROVIDER", value_parser = ["openai", "anthropic", "gemini"])]
        provider: String,
        /// The model has a flex tier (a duration start_within races it).
        #[arg(long, env = "FLEX_FLEX")]
        flex: bool,
        /// Another name for the model (repeatable, or comma-separated).
        #[arg(long, env = "FLEX_ALIAS", value_delimiter = ',')]
        alias: Vec<String>,
        /// Standard price per million input tokens, micro-dollars.
        #[arg(long, env = "FLEX_INPUT_MICROS")]
        input_micros: i64,
        /// Standard price per million cached input tokens (default: a tenth of input).
        #[arg(long, env = "FLEX_CACHED_INPUT_MICROS")]
        cached_input_micros: Option<i64>,
        /// Standard price per million output tokens.
        #[arg(long, env = "FLEX_OUTPUT_MICROS")]
        output_micros: i64,
        /// Flex price as a share of standard, in percent (default 50).
        #[arg(long, env = "FLEX_FLEX_PERCENT", default_value_t = 50)]
        flex_percent: i64,
        /// Floor of the learned standard start latency (ms) used to hedge the race.
        #[arg(long, env = "FLEX_STANDARD_START_FLOOR_MS", default_value_t = 500)]
        standard_start_floor_ms: u32,
    },
    List,
}

fn model_json(m: &flex_shared::proto::control::ModelEntry) -> Value {
    json!({
        "id": m.id, "provider": m.provider, "flex_capable": m.flex_capable, "aliases": m.aliases,
        "standard_start_floor_ms": m.standard_start_floor_ms,
        "prices": m.prices.iter().map(|p| json!({"tier": p.tier, "input_per_mtok_micros": p.input_per_mtok_micros, "cached_input_per_mtok_micros": p.cached_input_per_mtok_micros, "output_per_mtok_micros": p.output_per_mtok_micros})).collect::<Vec<_>>(),
    })
}

pub(super) async fn model(c: &mut Client, j: bool, cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Set {
            id,
            provider,
            flex,
            alias,
            input_micros,
            cached_input_micros,
            output_micros,
            flex_percent,
            standard_start_floor_ms,
        } => {
            use flex_shared::proto::control::{ModelEntry, TierPrice};
            let cached = cached_input_micros.unwrap_or(input_micros / 10);
            let price = |tier: &str, pct: i64| TierPrice {
                tier: tier.to_string(),
                input_per_mtok_micros: input_micros * pct / 100,
                cached_input_per_mtok_micros: cached * pct / 100,
                output_per_mtok_micros: output_micros * pct / 100,
            };
            let mut prices = vec![price("standard", 100)];
            if flex {
                prices.push(price("flex", flex_percent));
            }
            let m = c
                .set_model(ModelEntry {
                    id,
                    provider,
                    flex_capable: flex,
                    aliases: alias,
                    prices,
                    standard_start_floor_ms,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            print(j, model_json(&m), || {
                format!(
                    "model {} set for every proxy ({}, flex {})",
                    m.id, m.provider, m.flex_capable
                )
            });
        }
        ModelCmd::List => {
            let r = c
                .list_models(pb::ListModelsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            print(
                j,
                json!({"models": r.models.iter().map(model_json).collect::<Vec<_>>()}),
                || {
                    r.models
                        .iter()
                        .map(|m| {
                            format!(
                                "{}  {}  flex={}  aliases={:?}",
                                m.id, m.provider, m.flex_capable, m.aliases
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
    }
    Ok(())
}
