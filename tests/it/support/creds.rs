//! `Creds`: a credentials file built the way `gatehouse demo` builds one (the crate's own
//! `FileCredentials`, keys minted with `mint_api_key` / `mint_hmac_key`, written with
//! `serde_saphyr::to_string`), which hands the plaintext tokens and secrets to the test.
//! Also: atomic rewrites of a live file, and a kubelet-style `..data` symlink layout.

use gatehouse::credentials::file::{AuthMethod, FileCredentials, FileRole, FileUser, Status, spanned};
use gatehouse::credentials::secrets::MasterKey;
use gatehouse::credentials::{mint_api_key, mint_hmac_key};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;

/// The role every test user gets: everything is permitted.
pub const ROLE: &str = "all";

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

/// Unix seconds now, as the gateway's clock reads it.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Request headers, in the order they are sent.
pub type Headers = Vec<(&'static str, String)>;

/// An api_key key as the test knows it: its public id and its token.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub key_id: String,
    pub token: String,
}

/// An hmac key as the test knows it: its public id and its signing secret.
#[derive(Debug, Clone)]
pub struct HmacKey {
    pub key_id: String,
    pub secret: String,
}

impl HmacKey {
    /// The hex signature of one request (`gatehouse::pipeline::authn::sign_hex`).
    pub fn sign(&self, ts: &str, method: &str, target: &str, body: &[u8]) -> String {
        gatehouse::pipeline::authn::sign_hex(&self.secret, ts, method, target, body)
    }

    /// The three headers of a request signed now.
    pub fn headers(&self, method: &str, target: &str, body: &[u8]) -> Headers {
        self.headers_at(unix_now(), method, target, body)
    }

    /// The three headers of a request signed with timestamp `ts`.
    pub fn headers_at(&self, ts: i64, method: &str, target: &str, body: &[u8]) -> Headers {
        let ts = ts.to_string();
        let sig = self.sign(&ts, method, target, body);
        vec![("x-api-key", self.key_id.clone()), ("x-timestamp", ts), ("x-signature", sig)]
    }
}

/// A credentials file under construction, and the master key that seals its secrets.
pub struct Creds {
    master: MasterKey,
    file: FileCredentials,
}

impl Default for Creds {
    fn default() -> Self {
        Creds::new()
    }
}

impl Creds {
    /// A fresh master key and one role, [`ROLE`], that permits everything.
    pub fn new() -> Creds {
        let mut file = FileCredentials::default();
        file.roles
            .insert(ROLE.into(), FileRole { description: "everything".into(), rules: vec![spanned("* /**".into())] });
        Creds { master: MasterKey::generate().unwrap(), file }
    }

    fn push_user(&mut self, id: &str, method: AuthMethod) {
        self.file.users.push(FileUser {
            display_name: format!("Test {id}"),
            organization: "acme".into(),
            teams: vec!["team-a".into(), "team-b".into()],
            default_team: Some("team-a".into()),
            roles: vec![spanned(ROLE.to_string())],
            ..FileUser::new(id, method, now())
        });
    }

    /// A new active api_key user with one key.
    pub fn api_user(&mut self, id: &str) -> ApiKey {
        self.push_user(id, AuthMethod::ApiKey);
        self.add_api_key(id)
    }

    /// A new active hmac user with one key.
    pub fn hmac_user(&mut self, id: &str) -> HmacKey {
        self.push_user(id, AuthMethod::Hmac);
        self.add_hmac_key(id)
    }

    /// Another key for the api_key user `user`.
    pub fn add_api_key(&mut self, user: &str) -> ApiKey {
        let (key, token) = mint_api_key("test").unwrap();
        let key_id = key.id.value.clone();
        self.user(user).keys.push(key);
        ApiKey { key_id, token: token.expose().to_string() }
    }

    /// Another key for the hmac user `user`.
    pub fn add_hmac_key(&mut self, user: &str) -> HmacKey {
        let (key, secret) = mint_hmac_key(&self.master, "test").unwrap();
        let key_id = key.id.value.clone();
        self.user(user).keys.push(key);
        HmacKey { key_id, secret: secret.expose().to_string() }
    }

    /// The user `id`, to change anything the helpers do not cover.
    pub fn user(&mut self, id: &str) -> &mut FileUser {
        self.file.users.iter_mut().find(|u| u.id.value == id).unwrap_or_else(|| panic!("no user {id}"))
    }

    fn key(&mut self, key_id: &str) -> &mut gatehouse::credentials::file::FileKey {
        self.file
            .users
            .iter_mut()
            .flat_map(|u| u.keys.iter_mut())
            .find(|k| k.id.value == key_id)
            .unwrap_or_else(|| panic!("no key {key_id}"))
    }

    /// Revokes a key as of `seconds` from now (negative: in the past).
    pub fn revoke_in(&mut self, key_id: &str, seconds: i64) {
        self.key(key_id).revoked_at = Some(now() + time::Duration::seconds(seconds));
    }

    /// Revokes a key a minute ago.
    pub fn revoke(&mut self, key_id: &str) {
        self.revoke_in(key_id, -60);
    }

    /// Undoes a revocation.
    pub fn unrevoke(&mut self, key_id: &str) {
        self.key(key_id).revoked_at = None;
    }

    /// Removes the user `id` and its keys.
    pub fn remove_user(&mut self, id: &str) {
        self.file.users.retain(|u| u.id.value != id);
    }

    /// Makes a key expire `seconds` from now (negative: in the past).
    pub fn expire_in(&mut self, key_id: &str, seconds: i64) {
        self.key(key_id).expires_at = Some(now() + time::Duration::seconds(seconds));
    }

    /// Sets a user's status.
    pub fn set_status(&mut self, user: &str, status: Status) {
        self.user(user).status = status;
    }

    /// Defines (or replaces) the role `name` with exactly these rules, e.g.
    /// `&["GET /api/v1/orders/**"]`.
    pub fn role(&mut self, name: &str, rules: &[&str]) -> &mut Self {
        let rules = rules.iter().map(|r| spanned(r.to_string())).collect();
        self.file.roles.insert(name.into(), FileRole { description: format!("test role {name}"), rules });
        self
    }

    /// Gives `user` exactly these roles, in this order (none: the user is permitted nothing).
    pub fn set_roles(&mut self, user: &str, roles: &[&str]) -> &mut Self {
        self.user(user).roles = roles.iter().map(|r| spanned(r.to_string())).collect();
        self
    }

    /// Sets `user`'s `allowed_endpoints` (empty: no narrowing).
    pub fn allowed_endpoints(&mut self, user: &str, rules: &[&str]) -> &mut Self {
        self.user(user).allowed_endpoints = rules.iter().map(|r| spanned(r.to_string())).collect();
        self
    }

    /// Lets `user` act for others: `allow_proxied_users: true` and
    /// `allowed_proxied_users: ids` (empty: any id).
    pub fn allow_proxied_users(&mut self, user: &str, ids: &[&str]) -> &mut Self {
        let u = self.user(user);
        u.allow_proxied_users = true;
        u.allowed_proxied_users = ids.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sets `user`'s organization.
    pub fn set_organization(&mut self, user: &str, org: &str) -> &mut Self {
        self.user(user).organization = org.into();
        self
    }

    /// Sets `user`'s teams, in this order; the first becomes the default team.
    pub fn set_teams(&mut self, user: &str, teams: &[&str]) -> &mut Self {
        let u = self.user(user);
        u.teams = teams.iter().map(|t| t.to_string()).collect();
        u.default_team = teams.first().map(|t| t.to_string());
        self
    }

    /// The file's text.
    pub fn yaml(&self) -> String {
        serde_saphyr::to_string(&self.file).unwrap()
    }

    /// The master key file's text.
    pub fn master_key_text(&self) -> String {
        self.master.to_text()
    }

    /// The master key, e.g. to open a sealed secret read back from the file.
    pub fn master_key(&self) -> &MasterKey {
        &self.master
    }
}

/// Writes `contents` to `path` as the CLI does: a temporary file in the same directory,
/// fsync, rename over the old one. A reader sees the old file or the new one, never half.
pub fn write_atomic(path: &Path, contents: &str) {
    let dir = path.parent().unwrap();
    let mut tmp = tempfile::NamedTempFile::new_in(dir).unwrap();
    tmp.write_all(contents.as_bytes()).unwrap();
    tmp.as_file().sync_all().unwrap();
    tmp.persist(path).unwrap();
}

/// Writes the master key file with mode 0600 (the gateway refuses a looser one).
pub fn write_master_key(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// A mounted Kubernetes Secret, laid out exactly as kubelet does it:
///
/// ```text
/// creds/..2026_11_23_a/credentials.yaml
/// creds/..data -> ..2026_11_23_a
/// creds/credentials.yaml -> ..data/credentials.yaml
/// ```
///
/// and updated as kubelet does it: a new timestamped directory, a `..data_tmp` symlink
/// to it, `rename(..data_tmp, ..data)` (atomic), then the old directory removed.
pub struct KubeletDir {
    dir: PathBuf,
    current: String,
}

impl KubeletDir {
    /// Creates `parent/creds/` holding `yaml` in the version directory `version`.
    pub fn create(parent: &Path, version: &str, yaml: &str) -> KubeletDir {
        let dir = parent.join("creds");
        std::fs::create_dir(&dir).unwrap();
        Self::version_dir(&dir, version, yaml);
        std::os::unix::fs::symlink(version, dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/credentials.yaml", dir.join("credentials.yaml")).unwrap();
        KubeletDir { dir, current: version.into() }
    }

    fn version_dir(dir: &Path, version: &str, yaml: &str) {
        let v = dir.join(version);
        std::fs::create_dir(&v).unwrap();
        let mut f = std::fs::File::create(v.join("credentials.yaml")).unwrap();
        f.write_all(yaml.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }

    /// The path the gateway is configured with: `creds/credentials.yaml`.
    pub fn path(&self) -> PathBuf {
        self.dir.join("credentials.yaml")
    }

    /// Publishes `yaml` in the new version directory `version`, kubelet's way.
    pub fn swap(&mut self, version: &str, yaml: &str) {
        Self::version_dir(&self.dir, version, yaml);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(self.dir.join(&self.current)).unwrap();
        self.current = version.into();
    }
}
