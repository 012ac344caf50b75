//! FlexInference data plane: the stateless proxy.
//!
//! A request flows `server` → `proxy` (auth against the `snapshot`, `start_within`, format
//! validation in `formats`, the tier `plan`) → `race` / `providers` over `upstream` → back in the
//! caller's format, with one `usage` event per request. The proxy never touches a database: all it
//! knows comes from the control plane's snapshots.

pub mod answer;
pub mod auth;
pub mod canonical;
pub mod control_client;
pub mod error;
pub mod formats;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod passthrough;
pub mod plane_tls;
pub mod policy;
pub mod providers;
pub mod proxy;
pub mod race;
pub mod request;
pub mod series;
pub mod server;
pub mod snapshot;
pub mod sse;
pub mod start_within;
pub mod translate;
pub mod upstream;
pub mod usage;
pub mod workers;
