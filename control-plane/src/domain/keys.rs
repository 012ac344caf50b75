//! The API key (`apikey-<key_id>`) and provider key (`providerkey-<org_id>-<provider>`)
//! aggregates and the decisions made against them.

use flex_shared::crypto::Sealed;

use super::{Aggregate, Event};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Default)]
pub struct ApiKeyAggregate {
    pub org_id: Option<String>,
    pub revoked: bool,
}

impl Aggregate for ApiKeyAggregate {
    fn apply(&mut self, e: &Event) {
        match e {
            Event::ApiKeyCreated { org_id, .. } => self.org_id = Some(org_id.clone()),
            Event::ApiKeyRevoked { .. } => self.revoked = true,
            _ => {}
        }
    }
}

impl ApiKeyAggregate {
    pub fn revoke(&self, key_id: &str, reason: &str) -> Result<Event> {
        if self.org_id.is_none() {
            return Err(Error::NotFound(format!(
                "API key {key_id} not found; list an org's keys with `flex admin key list --org ORG_ID`"
            )));
        }
        if self.revoked {
            return Err(Error::FailedPrecondition(format!(
                "API key {key_id} is already revoked"
            )));
        }
        Ok(Event::ApiKeyRevoked {
            key_id: key_id.to_string(),
            reason: reason.to_string(),
        })
    }
}

#[derive(Clone, Default)]
pub struct ProviderKeyAggregate {
    pub sealed: Option<Sealed>,
}

impl std::fmt::Debug for ProviderKeyAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderKeyAggregate")
            .field("set", &self.sealed.is_some())
            .finish()
    }
}

impl Aggregate for ProviderKeyAggregate {
    fn apply(&mut self, e: &Event) {
        match e {
            Event::ProviderKeySet { sealed, .. } | Event::ProviderKeyRewrapped { sealed, .. } => {
                self.sealed = Some(sealed.clone());
            }
            Event::ProviderKeyRemoved { .. } => self.sealed = None,
            _ => {}
        }
    }
}

impl ProviderKeyAggregate {
    pub fn remove(&self, org_id: &str, provider: &str) -> Result<Event> {
        if self.sealed.is_none() {
            return Err(Error::NotFound(format!(
                "org {org_id} has no {provider} provider key to remove; see `flex admin provider-key list --org {org_id}`"
            )));
        }
        Ok(Event::ProviderKeyRemoved {
            org_id: org_id.to_string(),
            provider: provider.to_string(),
        })
    }
}
