//! Owner-only files and directories: a proxy's state dir (usage log segments, the in-flight
//! journal, delivery and stream positions, the persisted snapshot with its sealed provider keys)
//! and `flex up`'s data dir are mode 0700, and every file in them 0600, whatever the umask.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of a private directory.
pub const DIR_MODE: u32 = 0o700;
/// The mode of a private file.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents with mode 0700 (an existing directory is left as it
/// is: see [`restrict`]).
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Open options that create a file with mode 0600 (an existing file keeps its mode).
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Creates or truncates `path` (mode 0600 when created) for writing.
pub fn create(path: &Path) -> std::io::Result<File> {
    options().write(true).create(true).truncate(true).open(path)
}

/// Writes `contents` to `path` like [`std::fs::write`], creating it with mode 0600.
pub fn write(path: &Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    create(path)?.write_all(contents.as_ref())
}

/// Narrows an existing `dir` to 0700 and the regular files directly in it to 0600 (state
/// written by earlier builds under the default umask). Returns what could not be changed, for
/// the caller to warn about; nothing is ever widened.
pub fn restrict(dir: &Path) -> Vec<(PathBuf, std::io::Error)> {
    let mut failed = Vec::new();
    narrow(dir, DIR_MODE, &mut failed);
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    narrow(&entry.path(), FILE_MODE, &mut failed);
                }
            }
        }
        Err(e) => failed.push((dir.to_path_buf(), e)),
    }
    failed
}

fn narrow(path: &Path, mode: u32, failed: &mut Vec<(PathBuf, std::io::Error)>) {
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o777 & !mode == 0 => {}
        Ok(m) => {
            let narrowed = m.permissions().mode() & 0o777 & mode;
            if let Err(e) = std::fs::set_permissions(path, Permissions::from_mode(narrowed)) {
                failed.push((path.to_path_buf(), e));
            }
        }
        Err(e) => failed.push((path.to_path_buf(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_owner_only_and_existing_narrowed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        create_dir_all(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        write(&dir.join("f"), "x").unwrap();
        assert_eq!(mode(&dir.join("f")), 0o600);

        let old = root.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, Permissions::from_mode(0o755)).unwrap();
        std::fs::write(old.join("seg"), "x").unwrap();
        std::fs::set_permissions(old.join("seg"), Permissions::from_mode(0o644)).unwrap();
        std::fs::write(old.join("ro"), "x").unwrap();
        std::fs::set_permissions(old.join("ro"), Permissions::from_mode(0o400)).unwrap();
        assert!(restrict(&old).is_empty());
        assert_eq!(mode(&old), 0o700);
        assert_eq!(mode(&old.join("seg")), 0o600);
        assert_eq!(mode(&old.join("ro")), 0o400, "never widened");
    }
}
