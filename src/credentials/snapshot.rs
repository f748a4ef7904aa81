//! An immutable, indexed view of `credentials.yaml`, built to the side on every reload
//! and swapped in whole.
//!
//! Everything a request needs is precomputed here: token digests and key ids in hash
//! maps (no scan, no secret compared with `==`), HMAC secrets opened and keyed once,
//! rules compiled, each key's effective rate limit resolved.

use super::file::{AuthMethod, FileCredentials, FileKey, FileRole, FileUser, Status};
use super::secrets::{MasterKey, TokenDigest};
use crate::config::{ConfigErrors, Problem, RateLimitConfig, yaml_problem};
use crate::credentials::rules::Rule;
use hmac::{Hmac, KeyInit};
use http::HeaderValue;
use serde_saphyr::Location;
use sha2::Sha256;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::Path;
use std::sync::Arc;

/// A team or role name can be joined with `,` into `X-Gatehouse-Teams` / `-Roles` (docs/identity-headers.md)
/// without one name reading as several: non-empty, no comma, no space at either end.
fn is_joinable_name(s: &str) -> bool {
    !s.is_empty() && !s.contains(',') && s.trim() == s
}

/// A user id, key id or proxied-user id: `[a-z0-9][a-z0-9_.-]{0,63}` (docs/concepts.md).
pub fn is_valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(&c))
}

/// An API user, as requests see it.
#[derive(Debug)]
pub struct User {
    pub id: Arc<str>,
    pub organization: String,
    pub teams: Vec<String>,
    pub roles: Vec<Arc<Role>>,
    pub status: Status,
    pub auth_method: AuthMethod,
    pub allowed_endpoints: Vec<Rule>,
    pub allow_proxied_users: bool,
    pub allowed_proxied_users: HashSet<String>,
    /// Identity header values, built once per snapshot.
    pub headers: UserHeaders,
}

/// The values of the `X-Gatehouse-*` identity headers for one user.
#[derive(Debug, Clone)]
pub struct UserHeaders {
    pub user: HeaderValue,
    pub org: HeaderValue,
    pub teams: HeaderValue,
    pub roles: HeaderValue,
}

/// A role: a named set of rules.
#[derive(Debug)]
pub struct Role {
    pub name: String,
    pub rules: Vec<Rule>,
}

/// The secret side of a key, ready to use.
#[derive(Clone)]
pub enum KeyCredential {
    /// An API token, found by its digest.
    Token,
    /// An HMAC key already keyed with its secret: cloning it is cheaper than keying.
    /// Boxed: its 144 bytes of state would otherwise be in every key, api_key ones too.
    Hmac(Box<Hmac<Sha256>>),
}

impl std::fmt::Debug for KeyCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyCredential::Token => "Token",
            KeyCredential::Hmac(_) => "Hmac(<redacted>)",
        })
    }
}

/// Per-second rate and burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// One key of one user.
#[derive(Debug)]
pub struct Key {
    pub id: Arc<str>,
    pub user: Arc<User>,
    /// Unix seconds from which the key is revoked (a future time schedules it).
    pub revoked_at: Option<i64>,
    /// Unix seconds after which the key is expired.
    pub expires_at: Option<i64>,
    pub credential: KeyCredential,
    /// The key id as a header value.
    pub id_header: HeaderValue,
    /// Key override, else user override, else the config default.
    pub rate_limit: RateLimit,
    /// `rate_limit.per_second` as the `X-RateLimit-Limit` value, shared by the keys with
    /// the same rate: no number formatted per request.
    pub limit_header: HeaderValue,
}

/// Token digests are SHA-256 outputs: already uniform, and an attacker cannot choose
/// them, so the first eight bytes are a fine hash (no SipHash per request).
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (i * 8);
        }
    }
}

type DigestMap<V> = HashMap<TokenDigest, V, BuildHasherDefault<DigestHasher>>;

/// The whole credentials file, indexed.
#[derive(Debug, Default)]
pub struct Snapshot {
    tokens: DigestMap<Arc<Key>>,
    key_ids: HashMap<Arc<str>, Arc<Key>>,
    users: usize,
}

impl Snapshot {
    /// A snapshot with no users (no credentials file configured).
    pub fn empty() -> Snapshot {
        Snapshot::default()
    }

    /// The api_key key whose token has this digest.
    pub fn by_token(&self, digest: &TokenDigest) -> Option<&Arc<Key>> {
        self.tokens.get(digest)
    }

    /// The key with this public id (either kind).
    pub fn by_id(&self, id: &str) -> Option<&Arc<Key>> {
        self.key_ids.get(id)
    }

    /// Number of users loaded.
    pub fn user_count(&self) -> usize {
        self.users
    }

    /// Number of keys loaded.
    pub fn key_count(&self) -> usize {
        self.key_ids.len()
    }

    /// Parses and validates a credentials file. Every problem is reported with its line.
    pub fn parse(
        path: &Path,
        text: &str,
        master: Option<&MasterKey>,
        default_rate: RateLimitConfig,
    ) -> Result<Snapshot, ConfigErrors> {
        // The fast reader streams users into the builder. It keeps no locations: a file
        // with a problem is parsed again below, so that every problem has its line.
        {
            let mut fast = Builder::new(master, default_rate);
            if super::subset::read(text, &mut fast).is_some()
                && let Ok(snap) = fast.finish()
            {
                return Ok(snap);
            }
        }
        let file = parse_yaml(path, text)?;
        Builder::new(master, default_rate)
            .build(file)
            .map_err(|problems| ConfigErrors { file: path.to_path_buf(), problems })
    }
}

impl Snapshot {
    /// Builds a snapshot from a file model already in memory (the credential database's):
    /// the same checks as a file, each problem naming its user, key or role.
    pub fn from_model(
        file: FileCredentials,
        master: Option<&MasterKey>,
        default_rate: RateLimitConfig,
    ) -> Result<Snapshot, Vec<Problem>> {
        Builder::new(master, default_rate).build(file)
    }

    /// This snapshot with the users `changed` replaced by `users` (their current state; a
    /// name of `changed` absent from `users` was deleted), built with `roles` (which must be
    /// the ones this snapshot was built with). The users kept are shared, not rebuilt: a
    /// change to one user of 100,000 costs a copy of the maps, not a build of them all.
    /// `total_users`: how many users the store holds after the change.
    pub fn with_users(
        &self,
        changed: &[String],
        users: Vec<FileUser>,
        roles: &BTreeMap<String, FileRole>,
        master: Option<&MasterKey>,
        default_rate: RateLimitConfig,
        total_users: usize,
    ) -> Result<Snapshot, Vec<Problem>> {
        let mut b = Builder::new(master, default_rate);
        b.add_roles(roles.clone());
        for u in users {
            b.add_user(u);
        }
        let part = b.finish()?;
        let gone: HashSet<&str> = changed.iter().map(String::as_str).collect();
        let mut next = Snapshot {
            tokens: self
                .tokens
                .iter()
                .filter(|(_, k)| !gone.contains(&*k.user.id))
                .map(|(d, k)| (*d, k.clone()))
                .collect(),
            key_ids: self
                .key_ids
                .iter()
                .filter(|(_, k)| !gone.contains(&*k.user.id))
                .map(|(i, k)| (i.clone(), k.clone()))
                .collect(),
            users: total_users,
        };
        let mut problems = Vec::new();
        for (id, key) in part.key_ids {
            if let Some(other) = next.key_ids.insert(id.clone(), key) {
                problems.push(unlocated(format!("duplicate key id {id:?} (also under user {:?})", other.user.id)));
            }
        }
        for (digest, key) in part.tokens {
            if next.tokens.insert(digest, key.clone()).is_some() {
                problems.push(unlocated(format!("key {:?}: the same token is stored under another key", key.id)));
            }
        }
        if problems.is_empty() { Ok(next) } else { Err(problems) }
    }
}

fn unlocated(message: String) -> Problem {
    Problem { line: 0, column: 0, message }
}

/// The file model of a credentials file: the one parse the gateway, the admin API and
/// the CLI share. The fast reader takes what Gatehouse itself writes; anything else goes
/// to serde-saphyr.
pub(super) fn parse_file(path: &Path, text: &str) -> Result<FileCredentials, ConfigErrors> {
    match super::subset::parse(text) {
        Some(file) => Ok(file),
        None => parse_yaml(path, text),
    }
}

/// serde-saphyr, with the budget a large file needs and every location kept.
fn parse_yaml(path: &Path, text: &str) -> Result<FileCredentials, ConfigErrors> {
    serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| ConfigErrors { file: path.to_path_buf(), problems: vec![yaml_problem(&e)] })
}

/// The parser's budget, sized for large files: about 25 nodes a user, so 20 M nodes is
/// ~800 k users. Alias and anchor limits (the YAML-bomb defences) keep their defaults.
pub(super) fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 20_000_000;
    budget.max_events = 50_000_000;
    budget.max_total_scalar_bytes = 1 << 30;
    budget.max_reader_input_bytes = Some(1 << 30);
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

struct Builder<'a> {
    problems: Vec<Problem>,
    master: Option<&'a MasterKey>,
    default_rate: RateLimitConfig,
    roles: HashMap<String, Arc<Role>>,
    snap: Snapshot,
    user_ids: HashSet<Arc<str>>,
    cache: HeaderCache,
}

/// Header values already built, by text: users mostly share their organization, teams
/// and roles, and a clone of a shared value is a reference count, not an allocation.
type HeaderCache = HashMap<String, HeaderValue>;

impl super::subset::Sink for Builder<'_> {
    fn roles(&mut self, roles: BTreeMap<String, FileRole>, users: usize) {
        // Most users have one key.
        self.reserve(users, users);
        self.add_roles(roles);
    }

    fn user(&mut self, user: FileUser) {
        self.add_user(user);
    }
}

impl<'a> Builder<'a> {
    fn new(master: Option<&'a MasterKey>, default_rate: RateLimitConfig) -> Builder<'a> {
        Builder {
            problems: Vec::new(),
            master,
            default_rate,
            roles: HashMap::new(),
            snap: Snapshot::default(),
            user_ids: HashSet::new(),
            cache: HeaderCache::new(),
        }
    }

    fn at(&mut self, loc: &Location, message: impl Into<String>) {
        self.problems.push(Problem { line: loc.line(), column: loc.column(), message: message.into() });
    }

    /// Sized up front: growing maps of 100 000 entries rehashes them several times.
    fn reserve(&mut self, users: usize, keys: usize) {
        self.snap.tokens.reserve(keys);
        self.snap.key_ids.reserve(keys);
        self.user_ids.reserve(users);
    }

    fn build(mut self, file: FileCredentials) -> Result<Snapshot, Vec<Problem>> {
        self.reserve(file.users.len(), file.users.iter().map(|u| u.keys.len()).sum());
        self.add_roles(file.roles);
        for u in file.users {
            self.add_user(u);
        }
        self.finish()
    }

    fn finish(mut self) -> Result<Snapshot, Vec<Problem>> {
        self.snap.users = self.user_ids.len();
        if self.problems.is_empty() { Ok(self.snap) } else { Err(self.problems) }
    }

    fn add_roles(&mut self, roles: BTreeMap<String, FileRole>) {
        for (name, role) in roles {
            if !is_joinable_name(&name) {
                let loc = role.rules.first().map_or(Location::UNKNOWN, |r| r.referenced);
                self.at(&loc, format!("role name {name:?} must be non-empty, without commas or spaces at either end"));
            }
            let rules = role
                .rules
                .iter()
                .filter_map(|r| r.value.parse::<Rule>().map_err(|e| self.at(&r.referenced, e)).ok())
                .collect();
            self.roles.insert(name.clone(), Arc::new(Role { name, rules }));
        }
    }

    fn add_user(&mut self, u: FileUser) {
        let id: Arc<str> = Arc::from(u.id.value.as_str());
        if !is_valid_id(&id) {
            self.at(&u.id.referenced, format!("user id {:?} must match [a-z0-9][a-z0-9_.-]{{0,63}}", u.id.value));
        } else if !self.user_ids.insert(id.clone()) {
            self.at(&u.id.referenced, format!("duplicate user id {:?}", u.id.value));
        }
        self.user(u, id);
    }

    fn user(&mut self, u: FileUser, id: Arc<str>) {
        let mut user_roles = Vec::with_capacity(u.roles.len());
        for r in &u.roles {
            match self.roles.get(&r.value).cloned() {
                Some(role) => user_roles.push(role),
                None => self.at(&r.referenced, format!("user {:?}: unknown role {:?}", u.id.value, r.value)),
            }
        }
        let allowed_endpoints = u
            .allowed_endpoints
            .iter()
            .filter_map(|r| r.value.parse::<Rule>().map_err(|e| self.at(&r.referenced, e)).ok())
            .collect();
        for t in u.teams.iter().filter(|t| !is_joinable_name(t)) {
            self.at(
                &u.id.referenced,
                format!("user {:?}: team {t:?} must be non-empty, without commas or spaces at either end", u.id.value),
            );
        }
        if let Some(t) = &u.default_team
            && !u.teams.contains(t)
        {
            self.at(&u.id.referenced, format!("user {:?}: default_team {t:?} is not one of its teams", u.id.value));
        }
        for p in &u.allowed_proxied_users {
            if !is_valid_id(p) {
                self.at(
                    &u.id.referenced,
                    format!("user {:?}: allowed_proxied_users entry {p:?} is not a valid id", u.id.value),
                );
            }
        }
        let user_rate = match &u.rate_limit {
            Some(r) if r.value.per_second == 0 || r.value.burst == 0 => {
                self.at(&r.referenced, "rate_limit.per_second and burst must be at least 1");
                None
            }
            Some(r) => Some(RateLimit { per_second: r.value.per_second, burst: r.value.burst }),
            None => None,
        };
        let roles_joined = match u.roles.as_slice() {
            [one] => Cow::Borrowed(one.value.as_str()),
            all => Cow::Owned(all.iter().map(|r| r.value.as_str()).collect::<Vec<_>>().join(",")),
        };
        let teams_joined = match u.teams.as_slice() {
            [one] => Cow::Borrowed(one.as_str()),
            all => Cow::Owned(all.join(",")),
        };
        let mut cache = std::mem::take(&mut self.cache);
        let mut value = |what: &str, v: &str, cache: Option<&mut HeaderCache>| {
            if let Some(hit) = cache.as_ref().and_then(|c| c.get(v)) {
                return hit.clone();
            }
            match HeaderValue::from_bytes(v.as_bytes()) {
                Ok(h) => {
                    if let Some(c) = cache {
                        c.insert(v.to_string(), h.clone());
                    }
                    h
                }
                Err(_) => {
                    self.at(&u.id.referenced, format!("user {:?}: {what} contains control characters", u.id.value));
                    HeaderValue::from_static("")
                }
            }
        };
        let headers = UserHeaders {
            user: value("id", &id, None),
            org: value("organization", &u.organization, Some(&mut cache)),
            teams: value("teams", &teams_joined, Some(&mut cache)),
            roles: value("roles", &roles_joined, Some(&mut cache)),
        };
        self.cache = cache;
        let user = Arc::new(User {
            headers,
            id,
            organization: u.organization,
            teams: u.teams,
            roles: user_roles,
            status: u.status,
            auth_method: u.auth_method,
            allowed_endpoints,
            allow_proxied_users: u.allow_proxied_users,
            allowed_proxied_users: u.allowed_proxied_users.into_iter().collect(),
        });
        let default = RateLimit { per_second: self.default_rate.per_second, burst: self.default_rate.burst };
        for k in u.keys {
            let rate = k
                .rate_limit
                .map(|r| RateLimit { per_second: r.per_second, burst: r.burst })
                .or(user_rate)
                .unwrap_or(default);
            self.key(&user, k, rate);
        }
    }

    fn key(&mut self, user: &Arc<User>, k: FileKey, rate_limit: RateLimit) {
        let loc = k.id.referenced;
        let id: Arc<str> = Arc::from(k.id.value.as_str());
        if !is_valid_id(&id) {
            self.at(&loc, format!("key id {id:?} must match [a-z0-9][a-z0-9_.-]{{0,63}}"));
        }
        if self.snap.key_ids.contains_key(&*id) {
            self.at(&loc, format!("duplicate key id {id:?}"));
            return;
        }
        if rate_limit.per_second == 0 || rate_limit.burst == 0 {
            self.at(&loc, "rate_limit.per_second and burst must be at least 1");
        }
        let credential = match (user.auth_method, &k.token_sha256, &k.secret_sealed) {
            (AuthMethod::ApiKey, Some(hex_digest), None) => {
                let mut digest: TokenDigest = [0; 32];
                if hex::decode_to_slice(hex_digest, &mut digest).is_err() {
                    self.at(&loc, format!("key {id:?}: token_sha256 must be 64 hex characters"));
                    return;
                }
                let key = Arc::new(self.entry(&id, user, &k, KeyCredential::Token, rate_limit));
                if self.snap.tokens.insert(digest, key.clone()).is_some() {
                    self.at(&loc, format!("key {id:?}: the same token is stored under another key"));
                }
                self.snap.key_ids.insert(id, key);
                return;
            }
            (AuthMethod::Hmac, None, Some(sealed)) => {
                let Some(master) = self.master else {
                    self.at(&loc, format!("key {id:?}: an hmac key needs the master key, and none is configured"));
                    return;
                };
                match master.open(&id, sealed).map(|s| Hmac::<Sha256>::new_from_slice(s.expose().as_bytes())) {
                    Ok(Ok(mac)) => KeyCredential::Hmac(Box::new(mac)),
                    Ok(Err(_)) | Err(_) => {
                        self.at(&loc, format!("key {id:?}: secret_sealed cannot be opened with the master key (wrong master key, or the value was altered)"));
                        return;
                    }
                }
            }
            (AuthMethod::ApiKey, _, _) => {
                self.at(&loc, format!("key {id:?}: an api_key user's key needs token_sha256 and no secret_sealed"));
                return;
            }
            (AuthMethod::Hmac, _, _) => {
                self.at(&loc, format!("key {id:?}: an hmac user's key needs secret_sealed and no token_sha256"));
                return;
            }
        };
        let key = Arc::new(self.entry(&id, user, &k, credential, rate_limit));
        self.snap.key_ids.insert(id, key);
    }

    fn entry(
        &mut self,
        id: &Arc<str>,
        user: &Arc<User>,
        k: &FileKey,
        credential: KeyCredential,
        rate: RateLimit,
    ) -> Key {
        Key {
            id: id.clone(),
            user: user.clone(),
            revoked_at: k.revoked_at.map(|t| t.unix_timestamp()),
            expires_at: k.expires_at.map(|t| t.unix_timestamp()),
            id_header: HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("")),
            credential,
            rate_limit: rate,
            limit_header: self.number_header(rate.per_second),
        }
    }

    /// A number as a header value, shared through the cache.
    fn number_header(&mut self, n: u32) -> HeaderValue {
        let mut digits = itoa::Buffer::new();
        let text = digits.format(n);
        if let Some(hit) = self.cache.get(text) {
            return hit.clone();
        }
        let value = crate::wire::headers::number(n);
        self.cache.insert(text.to_string(), value.clone());
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "roles:\n  bench:\n    rules:\n    - \"* /**\"\nusers:\n- id: u1\n  teams: [ops]\n  roles: [bench]\n  status: active\n  auth_method: api_key\n  created_at: 2026-01-01T00:00:00Z\n  updated_at: 2026-01-01T00:00:00Z\n  keys:\n  - id: ak_1\n    created_at: 2026-01-01T00:00:00Z\n    token_sha256: 6d8b90bdea1baea768d3a916625028ea967f910b3958682a05e02b1622995279\n";

    /// serde-saphyr's model alone: how every file was read before the fast reader.
    fn slow(text: &str) -> Result<Snapshot, ConfigErrors> {
        let path = Path::new("c.yaml");
        Builder::new(None, RateLimitConfig::DEFAULT)
            .build(parse_yaml(path, text)?)
            .map_err(|problems| ConfigErrors { file: path.into(), problems })
    }

    /// a file the fast reader takes but that has problems is reported exactly as before,
    /// every problem with its line; a good one builds the same snapshot
    #[test]
    fn problems_in_a_fast_read_file_keep_their_lines() {
        let good = Snapshot::parse(Path::new("c.yaml"), FILE, None, RateLimitConfig::DEFAULT).unwrap();
        assert_eq!((good.user_count(), good.key_count()), (1, 1));
        let user = &good.by_id("ak_1").unwrap().user;
        assert_eq!((user.roles[0].name.as_str(), user.headers.teams.to_str().unwrap()), ("bench", "ops"));
        for (from, to) in [
            ("roles: [bench]", "roles: [bench, nope]"),
            ("- id: u1", "- id: U1"),
            ("teams: [ops]", "teams: [\"o,ps\"]"),
            ("- \"* /**\"", "- \"* /**\"\n    - \"GET /x extra\""),
            ("token_sha256: 6d", "token_sha256: 6x"),
            ("- id: ak_1", "- id: ak_1\n    rate_limit:\n      per_second: 0\n      burst: 1"),
            ("- id: ak_1\n", "- id: ak_1\n    created_at: 2026-01-01T00:00:00Z\n    token_sha256: 00\n  - id: ak_1\n"),
        ] {
            let text = FILE.replacen(from, to, 1);
            assert!(super::super::subset::parse(&text).is_some(), "not on the fast path: {text}");
            let fast = Snapshot::parse(Path::new("c.yaml"), &text, None, RateLimitConfig::DEFAULT).unwrap_err();
            assert!(fast.problems.iter().all(|p| p.line > 0), "{fast}");
            assert_eq!(fast.to_string(), slow(&text).unwrap_err().to_string());
        }
    }
}
