//! The `flex` binary's library: the command line, process wiring, logging and trace export
//! (`telemetry`), the admin CLI and the provider simulator. The planes themselves live in
//! `control-plane/` and `data-plane/`.

pub mod admin_cli;
pub mod cli;
pub mod ledger_feed;
pub mod run;
pub mod sim;
pub mod snapshot_keys;
pub mod telemetry;
