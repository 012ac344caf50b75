//! Org, API key and provider key commands (create, rename, suspend, revoke, set, remove) and the
//! queries that list them from the projection.

use flex_shared::keys;
use flex_shared::proto::admin as apb;
use secrecy::{ExposeSecret, SecretString};

use crate::domain::{self, ApiKeyAggregate, Event, OrgAggregate, ProviderKeyAggregate};
use crate::error::{Error, Result};
use crate::store::{Metadata, StoreError};
use crate::{
    fingerprint, idempotency_record, projection, timefmt, ControlPlane, IDEMPOTENT_ATTEMPTS,
};

/// A created org; `replayed` when an idempotency key returned an earlier result.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatedOrg {
    pub org: apb::Org,
    pub replayed: bool,
}

/// A created API key. `secret` is the full key, present only in the response to the call that
/// created it: a replay of the same idempotency key returns the key's metadata with
/// `secret: None` (the control plane keeps only a hash, so it cannot show the key again; if the
/// first response was lost, revoke that key and create another).
#[derive(Debug, Clone)]
pub struct CreatedApiKey {
    pub key: apb::ApiKey,
    pub secret: Option<SecretString>,
    pub replayed: bool,
}

impl CreatedApiKey {
    /// The gRPC response (`api_key` empty on a replay).
    pub fn to_proto(&self) -> apb::CreatedApiKey {
        apb::CreatedApiKey {
            key: Some(self.key.clone()),
            api_key: self
                .secret
                .as_ref()
                .map(|s| s.expose_secret().to_string())
                .unwrap_or_default(),
        }
    }
}

impl ControlPlane {
    fn api_key_view(&self, key_id: &str) -> Result<apb::ApiKey> {
        self.state()
            .api_keys
            .get(key_id)
            .map(|k| k.to_admin(timefmt::now()))
            .ok_or_else(|| Error::Internal(format!("api key {key_id} missing from the projection")))
    }

    /// Creates an org. With an idempotency key, a retry returns the first org (`replayed`).
    pub async fn create_org(
        &self,
        meta: &Metadata,
        name: &str,
        idempotency_key: Option<&str>,
    ) -> Result<CreatedOrg> {
        let name = domain::validate_org_name(name)?;
        let key = domain::validate_idempotency_key(idempotency_key.unwrap_or(""))?;
        let fp = fingerprint(&["CreateOrg", &name]);
        let mut last_err = None;
        for _ in 0..IDEMPOTENT_ATTEMPTS {
            if let Some(k) = &key {
                if let Some(org_id) = self.idempotency_lookup(k, "CreateOrg", &fp).await? {
                    self.catch_up().await?;
                    let org = self.org_or_not_found(&self.state(), &org_id)?;
                    return Ok(CreatedOrg {
                        org,
                        replayed: true,
                    });
                }
            }
            let org_id = domain::new_org_id();
            let event = Event::OrgCreated {
                org_id: org_id.clone(),
                name: name.clone(),
            };
            let idem = key
                .as_deref()
                .map(|k| idempotency_record(k, "CreateOrg", &org_id, &fp));
            match self
                .store
                .append_with_idempotency(
                    &domain::org_stream(&org_id),
                    0,
                    &[event.to_new()?],
                    meta,
                    idem.as_ref(),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(org_id, request_id = %meta.request_id, "org created");
                    self.catch_up().await?;
                    let org = self.org_or_not_found(&self.state(), &org_id)?;
                    return Ok(CreatedOrg {
                        org,
                        replayed: false,
                    });
                }
                Err(e @ (StoreError::Conflict { .. } | StoreError::IdempotencyKeyTaken { .. })) => {
                    last_err = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err.map_or_else(
            || Error::Internal("create_org retries exhausted".into()),
            Error::from,
        ))
    }

    pub async fn rename_org(&self, meta: &Metadata, org_id: &str, name: &str) -> Result<apb::Org> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let name = domain::validate_org_name(name)?;
        let stream = domain::org_stream(&org_id);
        let org = self.load::<OrgAggregate>(&stream).await?;
        if let Some(event) = org.state.rename(&org_id, &name)? {
            self.append(&stream, org.version, &event, meta).await?;
        } else {
            self.catch_up().await?;
        }
        self.org_or_not_found(&self.state(), &org_id)
    }

    pub async fn suspend_org(&self, meta: &Metadata, org_id: &str) -> Result<apb::Org> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let stream = domain::org_stream(&org_id);
        let org = self.load::<OrgAggregate>(&stream).await?;
        let event = org.state.suspend(&org_id)?;
        self.append(&stream, org.version, &event, meta).await?;
        self.org_or_not_found(&self.state(), &org_id)
    }

    pub async fn reactivate_org(&self, meta: &Metadata, org_id: &str) -> Result<apb::Org> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let stream = domain::org_stream(&org_id);
        let org = self.load::<OrgAggregate>(&stream).await?;
        let event = org.state.reactivate(&org_id)?;
        self.append(&stream, org.version, &event, meta).await?;
        self.org_or_not_found(&self.state(), &org_id)
    }

    /// Creates an API key for an active org; the secret is in the result only this once.
    /// `expires_at`: optional RFC 3339 time in the future.
    pub async fn create_api_key(
        &self,
        meta: &Metadata,
        org_id: &str,
        name: &str,
        expires_at: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<CreatedApiKey> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let name = domain::validate_key_name(name)?;
        let expires = domain::parse_time("expires_at", expires_at.unwrap_or(""))?;
        if let Some(t) = expires {
            if t <= timefmt::now() {
                return Err(Error::InvalidArgument(format!(
                    "expires_at {} is in the past; give a future RFC 3339 time, e.g. 2030-01-01T00:00:00Z",
                    timefmt::format(t)
                )));
            }
        }
        let expires = expires.map(timefmt::format);
        let key = domain::validate_idempotency_key(idempotency_key.unwrap_or(""))?;
        let fp = fingerprint(&[
            "CreateApiKey",
            &org_id,
            &name,
            expires.as_deref().unwrap_or(""),
        ]);
        let mut last_err = None;
        for _ in 0..IDEMPOTENT_ATTEMPTS {
            if let Some(k) = &key {
                if let Some(key_id) = self.idempotency_lookup(k, "CreateApiKey", &fp).await? {
                    self.catch_up().await?;
                    return Ok(CreatedApiKey {
                        key: self.api_key_view(&key_id)?,
                        secret: None,
                        replayed: true,
                    });
                }
            }
            let org = self
                .load::<OrgAggregate>(&domain::org_stream(&org_id))
                .await?;
            org.state.check_can_create_key(&org_id)?;
            let secret = keys::generate();
            let key_id = domain::new_key_id();
            let event = Event::ApiKeyCreated {
                key_id: key_id.clone(),
                org_id: org_id.clone(),
                name: name.clone(),
                key_hash: keys::hash(&secret),
                hint: keys::hint(&secret),
                expires_at: expires.clone(),
            };
            let idem = key
                .as_deref()
                .map(|k| idempotency_record(k, "CreateApiKey", &key_id, &fp));
            match self
                .store
                .append_with_idempotency(
                    &domain::api_key_stream(&key_id),
                    0,
                    &[event.to_new()?],
                    meta,
                    idem.as_ref(),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(key_id, org_id, request_id = %meta.request_id, "api key created");
                    self.catch_up().await?;
                    return Ok(CreatedApiKey {
                        key: self.api_key_view(&key_id)?,
                        secret: Some(SecretString::from(secret)),
                        replayed: false,
                    });
                }
                Err(e @ (StoreError::Conflict { .. } | StoreError::IdempotencyKeyTaken { .. })) => {
                    last_err = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err.map_or_else(
            || Error::Internal("create_api_key retries exhausted".into()),
            Error::from,
        ))
    }

    /// Revokes an API key (it leaves the next snapshot). Revoking a revoked key fails.
    pub async fn revoke_api_key(
        &self,
        meta: &Metadata,
        key_id: &str,
        reason: &str,
    ) -> Result<apb::ApiKey> {
        let key_id = domain::validate_id("key_id", key_id, "key_0190…")?;
        let reason = domain::validate_reason(reason)?;
        let stream = domain::api_key_stream(&key_id);
        let key = self.load::<ApiKeyAggregate>(&stream).await?;
        let event = key.state.revoke(&key_id, &reason)?;
        self.append(&stream, key.version, &event, meta).await?;
        self.api_key_view(&key_id)
    }

    /// Seals `secret` under the active master key and records it for (org, provider).
    pub async fn set_provider_key(
        &self,
        meta: &Metadata,
        org_id: &str,
        provider: &str,
        secret: &SecretString,
    ) -> Result<apb::ProviderKey> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let provider = domain::parse_provider(provider)?.as_str();
        let secret = domain::validate_secret(secret.expose_secret())?;
        let org = self
            .load::<OrgAggregate>(&domain::org_stream(&org_id))
            .await?;
        org.state.require(&org_id)?;
        let stream = domain::provider_key_stream(&org_id, provider);
        let current = self.load::<ProviderKeyAggregate>(&stream).await?;
        let sealed = self.keyring().seal(&org_id, provider, &secret)?;
        let event = Event::ProviderKeySet {
            org_id: org_id.clone(),
            provider: provider.to_string(),
            last4: keys::last4(&secret),
            sealed,
        };
        drop(secret);
        self.append(&stream, current.version, &event, meta).await?;
        self.provider_key_view(&org_id, provider)
    }

    pub async fn remove_provider_key(
        &self,
        meta: &Metadata,
        org_id: &str,
        provider: &str,
    ) -> Result<apb::ProviderKey> {
        let org_id = domain::validate_id("org_id", org_id, "org_0190…")?;
        let provider = domain::parse_provider(provider)?.as_str();
        let stream = domain::provider_key_stream(&org_id, provider);
        let current = self.load::<ProviderKeyAggregate>(&stream).await?;
        let event = current.state.remove(&org_id, provider)?;
        self.append(&stream, current.version, &event, meta).await?;
        self.provider_key_view(&org_id, provider)
    }

    fn provider_key_view(&self, org_id: &str, provider: &str) -> Result<apb::ProviderKey> {
        self.state()
            .provider_keys
            .get(&(org_id.to_string(), provider.to_string()))
            .map(projection::ProviderKeyView::to_admin)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "provider key {org_id}/{provider} missing from the projection"
                ))
            })
    }

    // ----- queries (from the projection, caught up first) ---------------------------------

    pub async fn list_orgs(&self) -> Result<Vec<apb::Org>> {
        self.catch_up().await?;
        let state = self.state();
        Ok(state
            .orgs
            .keys()
            .filter_map(|id| state.org_admin(id))
            .collect())
    }

    pub async fn get_org(&self, org_id: &str) -> Result<apb::Org> {
        self.catch_up().await?;
        self.org_or_not_found(&self.state(), org_id)
    }

    pub async fn list_api_keys(&self, org_id: &str) -> Result<Vec<apb::ApiKey>> {
        self.catch_up().await?;
        let state = self.state();
        self.org_or_not_found(&state, org_id)?;
        let now = timefmt::now();
        Ok(state
            .api_keys
            .values()
            .filter(|k| k.org_id == org_id)
            .map(|k| k.to_admin(now))
            .collect())
    }

    pub async fn list_provider_keys(&self, org_id: &str) -> Result<Vec<apb::ProviderKey>> {
        self.catch_up().await?;
        let state = self.state();
        self.org_or_not_found(&state, org_id)?;
        Ok(state
            .provider_keys
            .values()
            .filter(|p| p.org_id == org_id)
            .map(projection::ProviderKeyView::to_admin)
            .collect())
    }
}
