//! Replacing a file so that a crash or power loss leaves either the old or the new
//! content, never a truncated or empty file: the credentials file, the master key and
//! the usage state all go through `write_durably`.
//!
//! The steps: a temporary file in the same directory (a rename is atomic only within one
//! filesystem), write, `fsync` it (else the rename can reach the disk before the data),
//! rename it over the target, `fsync` the directory (else the rename itself can be lost).

use std::fs::{File, Permissions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A step of `write_durably` that failed, and the path it was working on (the directory,
/// the temporary file or the target), so the message points at what to fix.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl From<WriteError> for std::io::Error {
    fn from(e: WriteError) -> std::io::Error {
        std::io::Error::new(e.source.kind(), e.to_string())
    }
}

/// Maps an error of a step to the path that step worked on.
fn at(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError { path: path.to_path_buf(), source }
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Replaces `path` with `bytes` durably (see the module). The new file has mode `mode`,
/// else 0600. On error `path` is untouched and the temporary file is removed.
pub fn write_durably(path: &Path, bytes: &[u8], mode: Option<Permissions>) -> Result<(), WriteError> {
    let dir = parent_dir(path);
    // Named after the target, so a leftover (a crash between create and rename) says whose
    // it is; tempfile adds a random part and creates it 0600, exclusively.
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".tmp-");
    let mut tmp = tempfile::Builder::new().prefix(&prefix).tempfile_in(dir).map_err(at(dir))?;
    tmp.write_all(bytes).and_then(|_| tmp.as_file().sync_all()).map_err(at(tmp.path()))?;
    if let Some(mode) = mode {
        // Best effort, as before this module existed: a failure leaves 0600, which is
        // stricter than asked, never looser.
        let _ = std::fs::set_permissions(tmp.path(), mode);
    }
    // `persist` renames; on failure the returned handle still owns the temporary file and
    // removes it when dropped.
    tmp.persist(path).map_err(|e| at(path)(e.error))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// the file holds the new content with the asked mode (else 0600), and no temporary
    /// file is left beside it
    #[test]
    fn a_write_replaces_the_file_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"old").unwrap();
        write_durably(&path, b"new", None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        write_durably(&path, b"newer", Some(Permissions::from_mode(0o640))).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"newer");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(entries(dir.path()), ["state.json"]);
    }

    /// a write that cannot happen returns an error naming the path and changes nothing
    /// (root ignores permission bits, so the failures are structural: a parent that is a
    /// regular file, a target that is a directory)
    #[test]
    fn a_failed_write_leaves_the_old_file_intact() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"old").unwrap();
        let err = write_durably(&file.join("state.json"), b"new", None).unwrap_err();
        assert_eq!(err.path, file, "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"old");

        // The temporary file is written, the rename fails: it must not stay behind.
        let target = dir.path().join("taken");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), b"old").unwrap();
        let err = write_durably(&target, b"new", None).unwrap_err();
        assert_eq!(err.path, target, "{err}");
        assert_eq!(std::fs::read(target.join("inside")).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["plain", "taken"]);
        let io: std::io::Error = err.into();
        assert!(io.to_string().contains("taken"), "{io}");
    }
}
