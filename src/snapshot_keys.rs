//! Snapshot signing keys on the command line: `flex keygen snapshot-signing`, `flex control
//! --snapshot-signing-key-file` and `flex proxy --snapshot-public-key-file` (the format and what
//! is signed: `flex_shared::snapshot_sign`; docs/security.md "Signed snapshots").
//!
//! `flex up` neither signs nor verifies: its proxy follows the control plane in the same
//! process, with no transport in between to tamper with.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use flex_control_plane::ControlPlane;
use flex_shared::snapshot_sign::{SnapshotSigner, SnapshotVerifier};

use crate::cli::{KeygenArgs, KeygenCommand, SnapshotSigningArgs, SnapshotTrustArgs};

/// `flex keygen …`.
pub fn keygen(args: KeygenArgs) -> Result<()> {
    match args.what {
        KeygenCommand::SnapshotSigning {
            snapshot_signing_key_file: private_key_file,
            snapshot_public_key_file: public_key_file,
        } => {
            let signer = if private_key_file.exists() {
                let s = SnapshotSigner::load(&private_key_file)?;
                println!(
                    "kept the existing private key {}",
                    private_key_file.display()
                );
                s
            } else {
                let s = SnapshotSigner::generate();
                write_private(&private_key_file, &s.seed_hex())?;
                println!(
                    "wrote the private key {} (mode 0600): give it to `flex control --snapshot-signing-key-file`",
                    private_key_file.display()
                );
                s
            };
            std::fs::write(&public_key_file, format!("{}\n", signer.public_key_hex()))
                .with_context(|| format!("cannot write {}", public_key_file.display()))?;
            println!(
                "wrote the public key {} ({}): give it to every `flex proxy --snapshot-public-key-file`",
                public_key_file.display(),
                signer.public_key_hex()
            );
            Ok(())
        }
    }
}

/// `flex control`: signs with the key file when given, and sets the heartbeat interval.
pub fn configure_control(cp: &ControlPlane, args: &SnapshotSigningArgs) -> Result<()> {
    cp.set_snapshot_heartbeat(Duration::from_secs(args.snapshot_heartbeat_secs));
    match &args.snapshot_signing_key_file {
        Some(path) => {
            let signer = SnapshotSigner::load(path).context("--snapshot-signing-key-file")?;
            let public = signer.public_key_hex();
            cp.sign_snapshots_with(signer)?;
            println!("signing snapshots (public key {public})");
        }
        None => tracing::warn!(
            "snapshots are not signed (no --snapshot-signing-key-file): proxies cannot tell this control plane's updates from anyone else's"
        ),
    }
    Ok(())
}

/// `flex proxy`: the public key to verify with, if given.
pub fn proxy_verifier(args: &SnapshotTrustArgs) -> Result<Option<Arc<SnapshotVerifier>>> {
    match &args.snapshot_public_key_file {
        Some(path) => {
            let v = SnapshotVerifier::load(path).context("--snapshot-public-key-file")?;
            println!(
                "accepting only snapshots signed by public key {}",
                v.public_key_hex()
            );
            Ok(Some(Arc::new(v)))
        }
        None => {
            tracing::warn!(
                "snapshot signatures are not checked (no --snapshot-public-key-file): whoever can publish on the snapshot subjects or impersonate the control plane can add API keys"
            );
            Ok(None)
        }
    }
}

/// `--max-snapshot-age-secs` (0 = off).
pub fn max_age(args: &SnapshotTrustArgs) -> Option<Duration> {
    (args.max_snapshot_age_secs > 0).then(|| Duration::from_secs(args.max_snapshot_age_secs))
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}
