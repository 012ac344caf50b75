//! What a snapshot holds ([`SnapshotContent`], kept current event by event with its content
//! hash) and what a stretch of the log changed in it ([`Changes`], merged into deltas).

use std::collections::BTreeMap;

use flex_shared::proto::control as pb;
use flex_shared::snapshot::ContentHash;
use imbl::OrdMap;

use crate::timefmt;

/// The entries of a snapshot, keyed as the canonical order sorts them, with its content hash.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotContent {
    pub orgs: OrdMap<String, pb::OrgEntry>,
    /// By key hash.
    pub api_keys: OrdMap<String, pb::ApiKeyEntry>,
    pub provider_keys: OrdMap<(String, String), pb::ProviderKeyEntry>,
    pub models: OrdMap<String, pb::ModelEntry>,
    pub limits: OrdMap<(String, String), pb::LimitEntry>,
    pub hash: ContentHash,
}

/// The snapshot entries a stretch of the log changed: the last value of each, `None` = removed.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    recording: bool,
    orgs: BTreeMap<String, pb::OrgEntry>,
    api_keys: BTreeMap<String, Option<pb::ApiKeyEntry>>,
    provider_keys: BTreeMap<(String, String), Option<pb::ProviderKeyEntry>>,
    models: BTreeMap<String, pb::ModelEntry>,
    limits: BTreeMap<(String, String), Option<pb::LimitEntry>>,
}

impl Changes {
    /// A record that keeps what it is told (the default one ignores it, for rebuilds).
    pub fn recording() -> Self {
        Self {
            recording: true,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.orgs.len()
            + self.api_keys.len()
            + self.provider_keys.len()
            + self.models.len()
            + self.limits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Folds `later` in: its values win.
    pub(super) fn merge(&mut self, later: &Changes) {
        self.orgs
            .extend(later.orgs.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.api_keys
            .extend(later.api_keys.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.provider_keys.extend(
            later
                .provider_keys
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        self.models
            .extend(later.models.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.limits
            .extend(later.limits.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// The delta from `from_version` to the snapshot whose hash is `content_hash`.
    pub(super) fn to_delta(&self, from_version: u64, content_hash: &str) -> pb::SnapshotDelta {
        let mut d = pb::SnapshotDelta {
            from_version,
            content_hash: content_hash.to_string(),
            produced_at: timefmt::format(timefmt::now()),
            upsert_orgs: self.orgs.values().cloned().collect(),
            upsert_models: self.models.values().cloned().collect(),
            ..Default::default()
        };
        for (hash, k) in &self.api_keys {
            match k {
                Some(k) => d.upsert_api_keys.push(k.clone()),
                None => d.remove_api_key_hashes.push(hash.clone()),
            }
        }
        for ((org_id, provider), p) in &self.provider_keys {
            match p {
                Some(p) => d.upsert_provider_keys.push(p.clone()),
                None => d.remove_provider_keys.push(pb::ProviderKeyRef {
                    org_id: org_id.clone(),
                    provider: provider.clone(),
                }),
            }
        }
        for ((org_id, key_id), l) in &self.limits {
            match l {
                Some(l) => d.upsert_limits.push(l.clone()),
                None => d.remove_limits.push(pb::LimitRef {
                    org_id: org_id.clone(),
                    key_id: key_id.clone(),
                }),
            }
        }
        d
    }
}

impl SnapshotContent {
    pub(super) fn set_org(&mut self, e: pb::OrgEntry, changes: &mut Changes) {
        if let Some(old) = self.orgs.get(&e.org_id) {
            if *old == e {
                return;
            }
            self.hash.remove(3, old);
        }
        self.hash.add(3, &e);
        if changes.recording {
            changes.orgs.insert(e.org_id.clone(), e.clone());
        }
        self.orgs.insert(e.org_id.clone(), e);
    }

    pub(super) fn put_key(&mut self, e: pb::ApiKeyEntry, changes: &mut Changes) {
        if let Some(old) = self.api_keys.get(&e.key_hash) {
            if *old == e {
                return;
            }
            self.hash.remove(4, old);
        }
        self.hash.add(4, &e);
        if changes.recording {
            changes.api_keys.insert(e.key_hash.clone(), Some(e.clone()));
        }
        self.api_keys.insert(e.key_hash.clone(), e);
    }

    pub(super) fn remove_key(&mut self, key_hash: &str, changes: &mut Changes) {
        if let Some(old) = self.api_keys.remove(key_hash) {
            self.hash.remove(4, &old);
            if changes.recording {
                changes.api_keys.insert(key_hash.to_string(), None);
            }
        }
    }

    pub(super) fn put_provider_key(&mut self, e: pb::ProviderKeyEntry, changes: &mut Changes) {
        let id = (e.org_id.clone(), e.provider.clone());
        if let Some(old) = self.provider_keys.get(&id) {
            if *old == e {
                return;
            }
            self.hash.remove(5, old);
        }
        self.hash.add(5, &e);
        if changes.recording {
            changes.provider_keys.insert(id.clone(), Some(e.clone()));
        }
        self.provider_keys.insert(id, e);
    }

    pub(super) fn remove_provider_key(&mut self, id: &(String, String), changes: &mut Changes) {
        if let Some(old) = self.provider_keys.remove(id) {
            self.hash.remove(5, &old);
            if changes.recording {
                changes.provider_keys.insert(id.clone(), None);
            }
        }
    }

    pub(super) fn set_model(&mut self, e: pb::ModelEntry, changes: &mut Changes) {
        if let Some(old) = self.models.get(&e.id) {
            if *old == e {
                return;
            }
            self.hash.remove(6, old);
        }
        self.hash.add(6, &e);
        if changes.recording {
            changes.models.insert(e.id.clone(), e.clone());
        }
        self.models.insert(e.id.clone(), e);
    }

    pub(super) fn put_limits(&mut self, e: pb::LimitEntry, changes: &mut Changes) {
        let id = (e.org_id.clone(), e.key_id.clone());
        if let Some(old) = self.limits.get(&id) {
            if *old == e {
                return;
            }
            self.hash.remove(8, old);
        }
        self.hash.add(8, &e);
        if changes.recording {
            changes.limits.insert(id.clone(), Some(e.clone()));
        }
        self.limits.insert(id, e);
    }

    pub(super) fn remove_limits(&mut self, id: &(String, String), changes: &mut Changes) {
        if let Some(old) = self.limits.remove(id) {
            self.hash.remove(8, &old);
            if changes.recording {
                changes.limits.insert(id.clone(), None);
            }
        }
    }

    /// Entries in all (for choosing between a delta and a full snapshot).
    pub fn len(&self) -> usize {
        self.orgs.len()
            + self.api_keys.len()
            + self.provider_keys.len()
            + self.models.len()
            + self.limits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The protobuf snapshot (canonical: the maps iterate in canonical order).
    pub fn to_proto(&self, version: u64, produced_at: String) -> pb::Snapshot {
        pb::Snapshot {
            version,
            content_hash: self.hash.to_hex(),
            orgs: self.orgs.values().cloned().collect(),
            api_keys: self.api_keys.values().cloned().collect(),
            provider_keys: self.provider_keys.values().cloned().collect(),
            models: self.models.values().cloned().collect(),
            limits: self.limits.values().cloned().collect(),
            produced_at,
        }
    }
}
