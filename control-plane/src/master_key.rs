//! The master keyring: swapping it, reloading the master key file, and rotation (re-sealing every
//! provider key under the active master key).

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use flex_shared::crypto::MasterKeyring;

use crate::domain::{self, Event, ProviderKeyAggregate};
use crate::error::{Error, Result};
use crate::store::Metadata;
use crate::{ControlPlane, IDEMPOTENT_ATTEMPTS};

/// Outcome of [`ControlPlane::rotate_master_key`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Provider keys re-sealed under the active master key.
    pub resealed: usize,
    /// Provider keys that already were under the active master key.
    pub already_current: usize,
    /// The master key id every provider key is now sealed under.
    pub active_key_id: String,
    /// Whether the master key file was read again first ([`ControlPlane::rotate_master_key_from_file`]).
    pub key_file_reloaded: bool,
}

impl ControlPlane {
    /// Swaps the master keyring (e.g. after the key file gained a new active key); follow with
    /// [`ControlPlane::rotate_master_key`].
    pub fn set_keyring(&self, keyring: Arc<MasterKeyring>) {
        *self.keyring.write().unwrap_or_else(PoisonError::into_inner) = keyring;
    }

    /// Remembers the master key file the keyring was loaded from, so that
    /// [`ControlPlane::rotate_master_key_from_file`] (the `RotateMasterKey` RPC) reads it again.
    #[must_use]
    pub fn with_master_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.master_key_file = Some(path.into());
        self
    }

    /// The master key file given with [`ControlPlane::with_master_key_file`], if any.
    pub fn master_key_file(&self) -> Option<&Path> {
        self.master_key_file.as_deref()
    }

    /// Reads the master key file again (when there is one) and swaps the keyring in. Refuses
    /// (`FAILED_PRECONDITION`, keyring unchanged) a file that cannot be read or parsed, or that
    /// lacks a master key some provider key is still sealed under. Returns whether it reloaded.
    pub async fn reload_master_key_file(&self) -> Result<bool> {
        let Some(path) = &self.master_key_file else {
            return Ok(false);
        };
        let keyring = MasterKeyring::load(path).map_err(|e| {
            Error::FailedPrecondition(format!(
                "cannot reload the master key file: {e}. The keyring in use is unchanged; fix the file and retry"
            ))
        })?;
        self.catch_up().await?;
        let state = self.state();
        let mut missing: std::collections::BTreeMap<&str, usize> = Default::default();
        for p in state.provider_keys.values() {
            if let Some(sealed) = &p.sealed {
                if !keyring.key_ids().any(|id| id == sealed.master_key_id) {
                    *missing.entry(sealed.master_key_id.as_str()).or_default() += 1;
                }
            }
        }
        if !missing.is_empty() {
            let list = missing
                .iter()
                .map(|(id, n)| format!("`{id}` ({n} provider keys)"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::FailedPrecondition(format!(
                "the master key file {} lacks master keys still in use: {list}. Keep their lines (as `key_id=hex`, after the new active key) until `flex admin rotate-master-key` has re-sealed every provider key; the keyring in use is unchanged",
                path.display()
            )));
        }
        tracing::info!(
            path = %path.display(),
            active_key_id = keyring.active_key_id(),
            "master key file reloaded"
        );
        self.set_keyring(Arc::new(keyring));
        Ok(true)
    }

    /// Master-key rotation as operators run it (`flex admin rotate-master-key`, the
    /// `RotateMasterKey` RPC): reloads the master key file ([`ControlPlane::reload_master_key_file`]),
    /// then re-seals every provider key under its active key ([`ControlPlane::rotate_master_key`]).
    /// Idempotent: run it again at any time.
    ///
    /// The procedure, without downtime:
    /// 1. Generate a key (`openssl rand -hex 32`) and add it as the **first** line of the master
    ///    key file, as `key_id=hex` (e.g. `mk-2026-11=…`). Keep the old key on a later line: the
    ///    first line seals, every line opens. (A bare hex line's id is its fingerprint, which is
    ///    what the provider keys sealed under it record, so leave an old bare line as it is.)
    /// 2. Give every proxy (`flex proxy --master-key-file`) the new file. No restart: a proxy (and
    ///    `flex up`'s) re-reads its file when a snapshot names a key id it lacks, so the new line
    ///    must be in the file before secrets are sealed under it. With several control-plane
    ///    instances, update each one's file too.
    /// 3. Run `flex admin rotate-master-key` (against each control-plane instance): the control
    ///    plane reads the file again, seals new secrets under the new key from then on, and
    ///    re-wraps every provider key under it (`ProviderKeyRewrapped` events; proxies get them in
    ///    the next snapshot). It reports `resealed` and `already_current`.
    /// 4. Once it reports `resealed: 0`, drop the old line from every file (proxies at their next
    ///    restart). A reload refuses a file that lacks a key still in use, so dropping it too early
    ///    cannot strand a secret.
    pub async fn rotate_master_key_from_file(&self, meta: &Metadata) -> Result<RotationReport> {
        let reloaded = self.reload_master_key_file().await?;
        let mut report = self.rotate_master_key(meta).await?;
        report.key_file_reloaded = reloaded;
        Ok(report)
    }

    /// Re-seals every provider key that is not under the active master key (emits
    /// `ProviderKeyRewrapped`). Old master keys must still be in the keyring to open them.
    pub async fn rotate_master_key(&self, meta: &Metadata) -> Result<RotationReport> {
        self.catch_up().await?;
        let keyring = self.keyring();
        let active = keyring.active_key_id().to_string();
        let mut report = RotationReport {
            active_key_id: active.clone(),
            ..RotationReport::default()
        };
        let targets: Vec<(String, String)> = self
            .state()
            .provider_keys
            .values()
            .filter(|p| p.sealed.is_some())
            .map(|p| (p.org_id.clone(), p.provider.clone()))
            .collect();
        for (org_id, provider) in targets {
            let stream = domain::provider_key_stream(&org_id, &provider);
            let mut attempts = 0;
            loop {
                attempts += 1;
                let current = self.load::<ProviderKeyAggregate>(&stream).await?;
                let Some(sealed) = current.state.sealed.as_ref() else {
                    break; // removed meanwhile
                };
                if sealed.master_key_id == active {
                    report.already_current += 1;
                    break;
                }
                let event = Event::ProviderKeyRewrapped {
                    org_id: org_id.clone(),
                    provider: provider.clone(),
                    sealed: keyring.reseal(&org_id, &provider, sealed)?,
                };
                match self.append(&stream, current.version, &event, meta).await {
                    Ok(()) => {
                        report.resealed += 1;
                        break;
                    }
                    Err(Error::Conflict { .. }) if attempts < IDEMPOTENT_ATTEMPTS => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        tracing::info!(
            active_key_id = %active,
            resealed = report.resealed,
            already_current = report.already_current,
            "master key rotation done"
        );
        Ok(report)
    }
}
