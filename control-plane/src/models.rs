//! The operator's model catalog overrides (`ModelOverrideSet`), shipped to every proxy in the
//! snapshot.

use flex_shared::proto::control as pb;

use crate::domain::{self, Event};
use crate::error::{Error, Result};
use crate::store::Metadata;
use crate::ControlPlane;

impl ControlPlane {
    /// Adds or replaces a catalog entry for every proxy (through the snapshot).
    pub async fn set_model(
        &self,
        meta: &Metadata,
        entry: &pb::ModelEntry,
    ) -> Result<pb::ModelEntry> {
        let id = entry.id.trim();
        if id.is_empty() || id.len() > 100 || id.chars().any(char::is_whitespace) {
            return Err(Error::InvalidArgument(
                "model id must be 1-100 characters without spaces, e.g. id=gpt-9".into(),
            ));
        }
        let model = flex_shared::catalog::Model::from_proto(entry).map_err(|e| {
            Error::InvalidArgument(format!(
                "{e}; a model needs provider openai|anthropic|gemini and a standard price, e.g. `flex admin model set --id gpt-9 --provider openai --input-micros 1250000 --output-micros 10000000 --flex`"
            ))
        })?;
        if model.flex_capable && model.provider == flex_shared::catalog::Provider::Anthropic {
            return Err(Error::InvalidArgument(
                "Anthropic has no flex tier, so a claude model cannot be flex-capable; drop --flex"
                    .into(),
            ));
        }
        let stream = domain::model_stream(&model.id);
        let current = self.load::<domain::ModelAggregate>(&stream).await?;
        let proto = model.to_proto();
        self.append(
            &stream,
            current.version,
            &Event::ModelOverrideSet { model },
            meta,
        )
        .await?;
        Ok(proto)
    }

    /// The operator's catalog overrides.
    pub fn list_models(&self) -> Vec<pb::ModelEntry> {
        self.state().models.values().cloned().collect()
    }
}
