//! `credentials.yaml`: `file.rs` (shape) → `snapshot.rs` (validated, indexed) → an
//! `ArcSwap` that requests read once each; `reload.rs` keeps it current; `secrets.rs`
//! makes and seals tokens and signing secrets.

pub mod admin_tokens;
pub mod db;
pub mod file;
pub mod ops;
pub mod reload;
pub mod rules;
pub mod secrets;
pub mod snapshot;
pub mod store;
mod subset;

use crate::config::{ConfigErrors, Problem, RateLimitConfig, read_text};
use file::FileKey;
use secrets::{MasterKey, Secret};
use snapshot::Snapshot;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Key ids come from the credentials file, not from clients (these maps are reached only
/// after authentication): a fast seeded hash is enough, where SipHash cost more than the
/// map lookup itself.
pub type KeyIdHasher = foldhash::fast::RandomState;

/// Reads and validates the credentials file.
pub fn load(path: &Path, master: Option<&MasterKey>, default_rate: RateLimitConfig) -> Result<Snapshot, ConfigErrors> {
    let text = read_text(path)?;
    Snapshot::parse(path, &text, master, default_rate)
}

/// A new api_key key: its file entry (digest + hint only) and the token, to show once.
pub fn mint_api_key(label: &str) -> Result<(FileKey, Secret), getrandom::Error> {
    let token = secrets::new_token()?;
    let mut key = blank_key(secrets::new_key_id("ak_")?, label);
    key.token_sha256 = Some(hex::encode(secrets::token_digest(token.expose())));
    key.hint = Some(secrets::token_hint(token.expose()));
    Ok((key, token))
}

/// A new hmac key: its file entry (secret sealed with `master`) and the secret, to show once.
pub fn mint_hmac_key(master: &MasterKey, label: &str) -> Result<(FileKey, Secret), getrandom::Error> {
    let secret = secrets::new_hmac_secret()?;
    let id = secrets::new_key_id("hk_")?;
    let sealed = master.seal(&id, &secret)?;
    let mut key = blank_key(id, label);
    key.secret_sealed = Some(sealed);
    Ok((key, secret))
}

fn blank_key(id: String, label: &str) -> FileKey {
    FileKey::new(id, label.to_string(), ops::now())
}

pub(crate) fn problem(path: &Path, message: String) -> ConfigErrors {
    ConfigErrors { file: path.to_path_buf(), problems: vec![Problem { line: 0, column: 0, message }] }
}

/// Whether a key file's mode is strict enough: no access for others, and none for the
/// group unless the file is root's and the group may only read it. That exception (as
/// PostgreSQL allows for its TLS key) is what a Kubernetes Secret mount looks like to a
/// non-root gateway: kubelet makes the files `root:<fsGroup>`, mode 0440.
fn key_file_mode_ok(mode: u32, owner: u32) -> bool {
    mode & 0o007 == 0 && (mode & 0o070 == 0 || (owner == 0 && mode & 0o030 == 0))
}

/// Loads the master key, creating it (mode 0600) on first use. A key file that group or
/// others can read is refused: it guards every HMAC secret.
pub fn load_or_create_master_key(path: &Path) -> Result<MasterKey, ConfigErrors> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if !key_file_mode_ok(mode, std::os::unix::fs::MetadataExt::uid(&meta)) {
                return Err(problem(
                    path,
                    format!(
                        "master key file is accessible to group or others (mode {mode:o}); run: chmod 600 {}",
                        path.display()
                    ),
                ));
            }
            let text = std::fs::read_to_string(path).map_err(|e| problem(path, format!("cannot read: {e}")))?;
            MasterKey::from_text(&text).map_err(|e| problem(path, e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = MasterKey::generate().map_err(|e| problem(path, format!("no OS randomness: {e}")))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| problem(path, format!("cannot create directory: {e}")))?;
            }
            // create_new: never overwrite a key another process created meanwhile.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| problem(path, format!("cannot create: {e}")))?;
            f.write_all(key.to_text().as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| problem(path, format!("cannot write: {e}")))?;
            tracing::info!(path = %path.display(), "created a new master key");
            Ok(key)
        }
        Err(e) => Err(problem(path, format!("cannot read: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// group access only for a root-owned, group-read-only file; never for others
    #[test]
    fn key_file_modes() {
        for (mode, owner, ok) in [
            (0o600, 1000, true),
            (0o400, 1000, true),
            (0o640, 1000, false),
            (0o640, 0, true),
            (0o440, 0, true),
            (0o660, 0, false),
            (0o650, 0, false),
            (0o604, 0, false),
            (0o644, 0, false),
        ] {
            assert_eq!(key_file_mode_ok(mode, owner), ok, "mode {mode:o} owner {owner}");
        }
    }

    /// a missing master key is created 0600 and then read back; a 0644 one is refused
    #[test]
    fn master_key_file_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/master.key");
        let k1 = load_or_create_master_key(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let k2 = load_or_create_master_key(&path).unwrap();
        assert_eq!(k1.to_text(), k2.to_text());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_master_key(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
