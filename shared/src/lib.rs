//! The contract between FlexInference's control plane and its data-plane proxies.
//!
//! Only what both planes must agree on lives here: the generated gRPC types, the API-key format
//! and hash, the envelope encryption of provider keys, the snapshot's content hash and delta
//! rules, the model catalog with prices, and the usage event.

pub mod catalog;
pub mod crypto;
pub mod identity;
pub mod keys;
pub mod proto;
pub mod snapshot;
pub mod snapshot_sign;
pub mod usage;
