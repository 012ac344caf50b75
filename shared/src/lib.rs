//! The contract between FlexInference's control plane and its data-plane proxies.
//!
//! Only what both planes must agree on lives here: the generated gRPC types, the API-key format
//! and hash, the envelope encryption of provider keys, the snapshot's content hash and delta
//! rules, the model catalog with prices, and the usage event; and the hygiene both sides of the
//! fleet share: owner-only state files (`private_fs`) and URLs without credentials in logs
//! (`redact`).

pub mod catalog;
pub mod crypto;
pub mod identity;
pub mod keys;
pub mod private_fs;
pub mod proto;
pub mod redact;
pub mod snapshot;
pub mod snapshot_sign;
pub mod usage;
