//! A fast reader for the block YAML that Gatehouse itself writes (the CLI, the admin
//! API, `benches/fill_users.py`). serde-saphyr reads a 100 000-user file in about 3 s,
//! most of it in its general scanner and event layers; this reader takes less than a
//! tenth of that.
//!
//! It accepts only a strict subset of YAML: block mappings and sequences with
//! consistent indentation, `[a, b]`, `[]` and `{}` on one line, plain scalars, one-line
//! quoted scalars without escapes, `>-`/`|` block scalars whose lines share one indent,
//! whole-line comments. Whatever it is not certain serde-saphyr reads the same way
//! (null-like words, tags, anchors, tabs, escapes, other multi-line scalars, duplicate
//! or unknown keys, a value of another type) makes it return `None`, and the caller
//! parses with serde-saphyr as before. So it changes how fast a file is read, never
//! what the file means; a property test compares the two on generated documents.
//! Locations are left unknown: a caller that reports a line parses again with
//! serde-saphyr.

use super::file::{AuthMethod, FileCredentials, FileKey, FileRateLimit, FileRole, FileUser, Status, spanned};
use std::borrow::Cow;
use std::collections::BTreeMap;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Far inside the budget `snapshot::yaml_options` gives serde-saphyr (1 GiB of input,
/// 20 M nodes, 50 M events): a file read here is never one that budget refuses.
const MAX_BYTES: usize = 256 << 20;
const MAX_NODES: usize = 10_000_000;
/// Comments are events too: serde-saphyr refuses more than 32 comment lines in a row in
/// some places (its comment buffer), and the budget counts their bytes.
const MAX_COMMENT_RUN: usize = 16;
const MAX_COMMENT_BYTES: usize = 1 << 20;
/// YAML caps an implicit key at 1024 characters.
const MAX_KEY: usize = 128;

/// What the reader hands on, in the order a builder needs it: the roles (with about how
/// many users follow, to size maps by), then each user as soon as it is read, so that a
/// large file is never held whole as a file model.
pub(super) trait Sink {
    fn roles(&mut self, roles: BTreeMap<String, FileRole>, users: usize);
    fn user(&mut self, user: FileUser);
}

/// Collects the file model.
impl Sink for FileCredentials {
    fn roles(&mut self, roles: BTreeMap<String, FileRole>, users: usize) {
        self.roles = roles;
        self.users.reserve(users);
    }

    fn user(&mut self, user: FileUser) {
        self.users.push(user);
    }
}

/// The file model of `text`, or `None` when `text` is outside the subset.
pub(super) fn parse(text: &str) -> Option<FileCredentials> {
    let mut file = FileCredentials::default();
    read(text, &mut file)?;
    Some(file)
}

/// Reads `text` into `sink`; `None` when `text` is outside the subset (whatever `sink`
/// was given before that is then to be thrown away).
pub(super) fn read(text: &str, sink: &mut impl Sink) -> Option<()> {
    if text.len() > MAX_BYTES {
        return None;
    }
    let top_items = prescan(text)?;
    let mut r = Reader { text, pos: 0, nodes: 0 };
    if r.peek()?.indent != 0 {
        return None;
    }
    let mut seen = Fields::new(TOP_KEYS);
    // Users are streamed once the roles are known; users written before the roles
    // (only by hand) wait for them.
    let (mut roles_sent, mut late_roles, mut early_users) = (false, None, Vec::new());
    r.mapping(0, None, |r, n, key, value| {
        seen.once(key)?;
        match key {
            "roles" => {
                let roles = r.roles(n, value)?;
                if seen.has("users") {
                    late_roles = Some(roles);
                } else {
                    sink.roles(roles, top_items);
                    roles_sent = true;
                }
            }
            "users" => {
                if roles_sent {
                    r.users(n, value, |u| sink.user(u))?;
                } else {
                    r.users(n, value, |u| early_users.push(u))?;
                }
            }
            _ => return None,
        }
        Some(())
    })?;
    if r.peek().is_some() || r.nodes > MAX_NODES {
        return None;
    }
    if !roles_sent {
        sink.roles(late_roles.unwrap_or_default(), early_users.len());
        early_users.into_iter().for_each(|u| sink.user(u));
    }
    Some(())
}

/// Characters, trailing spaces and comments, checked once for the whole text so that
/// the reader below only looks at structure. Returns how many lines start with `- `
/// (the number of users when `users` is a sequence at indent 0, as Gatehouse writes it).
fn prescan(text: &str) -> Option<usize> {
    let (mut run, mut comment_bytes, mut top_items) = (0, 0, 0);
    for line in text.split('\n') {
        top_items += usize::from(line.starts_with("- "));
        if !line.bytes().all(|b| (b' '..=b'~').contains(&b)) && !line.chars().all(printable) {
            return None;
        }
        let body = line.trim_start_matches(' ');
        if body.starts_with('#') {
            run += 1;
            comment_bytes += body.len();
            if run > MAX_COMMENT_RUN || comment_bytes > MAX_COMMENT_BYTES {
                return None;
            }
        } else if !body.is_empty() {
            if body.ends_with(' ') {
                return None;
            }
            run = 0;
        }
    }
    Some(top_items)
}

/// YAML's printable characters, less tab, the byte order mark and the Unicode line
/// and paragraph separators (which YAML 1.1 read as line breaks).
fn printable(c: char) -> bool {
    matches!(c, ' '..='~' | '\u{A0}'..='\u{2027}' | '\u{202A}'..='\u{D7FF}' | '\u{E000}'..='\u{FEFE}' | '\u{FF00}'..='\u{FFFD}' | '\u{10000}'..)
}

/// A plain scalar serde-saphyr reads as null rather than as this text.
fn is_null(s: &str) -> bool {
    matches!(s, "~" | "null" | "Null" | "NULL")
}

/// A plain scalar that means its own text in block context: it starts with no
/// indicator, holds no comment and no `: `, and is not null.
fn plain_block(s: &str) -> bool {
    let Some(&first) = s.as_bytes().first() else { return false };
    !b"-?:,[]{}#&*!|>'\"%@` ".contains(&first)
        && !s.contains('#')
        && !s.contains(": ")
        && !s.ends_with(':')
        && !is_null(s)
}

/// The same inside `[ ]`, where `,`, brackets and braces are also indicators.
fn plain_flow(s: &str) -> bool {
    plain_block(s) && !s.contains([',', '[', ']', '{', '}', ':'])
}

/// The text of a quoted scalar that spans all of `s`, with no escapes to decode.
fn quoted(s: &str) -> Option<Cow<'_, str>> {
    if let Some(inner) = s.strip_prefix('"') {
        let inner = inner.strip_suffix('"')?;
        return (!inner.contains(['"', '\\'])).then_some(Cow::Borrowed(inner));
    }
    let inner = s.strip_prefix('\'')?.strip_suffix('\'')?;
    if !inner.contains('\'') {
        return Some(Cow::Borrowed(inner));
    }
    // '' is a quote; a lone quote would have ended the scalar.
    let mut out = String::with_capacity(inner.len());
    for (i, part) in inner.split("''").enumerate() {
        if part.contains('\'') {
            return None;
        }
        if i > 0 {
            out.push('\'');
        }
        out.push_str(part);
    }
    Some(Cow::Owned(out))
}

/// `- ` (or a bare `-`) starts a sequence item.
fn is_item(body: &str) -> bool {
    body == "-" || body.starts_with("- ")
}

/// `key: value` or `key:` with a plain key of letters, digits and `_.-/`.
fn split_entry(body: &str) -> Option<(&str, &str)> {
    let b = body.as_bytes();
    let n = b.iter().position(|&c| !(c.is_ascii_alphanumeric() || b"_.-/".contains(&c)))?;
    if n == 0 || n > MAX_KEY || b[n] != b':' || !(b[0].is_ascii_alphabetic() || b[0] == b'_') {
        return None;
    }
    let (key, after) = (&body[..n], &body[n + 1..]);
    if is_null(key) {
        return None;
    }
    match after.strip_prefix(' ') {
        Some(v) => Some((key, v.trim_start_matches(' '))),
        None if after.is_empty() => Some((key, "")),
        None => None,
    }
}

/// The keys a mapping may have, and which of them it has had: an unknown key, or one
/// seen twice, is outside the subset.
struct Fields {
    names: &'static [&'static str],
    seen: u32,
}

impl Fields {
    fn new(names: &'static [&'static str]) -> Fields {
        debug_assert!(names.len() <= 32);
        Fields { names, seen: 0 }
    }

    fn bit(&self, key: &str) -> Option<u32> {
        self.names.iter().position(|n| *n == key).map(|i| 1 << i)
    }

    /// `None` for a key the mapping may not have, or has had already.
    fn once(&mut self, key: &str) -> Option<()> {
        let bit = self.bit(key)?;
        (self.seen & bit == 0).then(|| self.seen |= bit)
    }

    fn has(&self, key: &str) -> bool {
        self.bit(key).is_some_and(|b| self.seen & b != 0)
    }

    /// `None` unless every key in `required` was there.
    fn has_all(&self, required: &[&str]) -> Option<()> {
        required.iter().all(|k| self.has(k)).then_some(())
    }
}

const TOP_KEYS: &[&str] = &["roles", "users"];
const ROLE_KEYS: &[&str] = &["description", "rules"];
const USER_KEYS: &[&str] = &[
    "id",
    "display_name",
    "description",
    "organization",
    "teams",
    "default_team",
    "roles",
    "status",
    "auth_method",
    "allowed_endpoints",
    "allow_proxied_users",
    "allowed_proxied_users",
    "rate_limit",
    "keys",
    "created_at",
    "updated_at",
];
const USER_REQUIRED: &[&str] = &["id", "status", "auth_method", "created_at", "updated_at"];
const KEY_KEYS: &[&str] =
    &["id", "label", "created_at", "expires_at", "revoked_at", "token_sha256", "hint", "secret_sealed", "rate_limit"];
const KEY_REQUIRED: &[&str] = &["id", "created_at"];

/// One line with content (blank lines and comments are skipped).
#[derive(Clone, Copy)]
struct Line<'a> {
    indent: usize,
    body: &'a str,
    end: usize,
}

struct Reader<'a> {
    text: &'a str,
    pos: usize,
    /// Scalars, mappings and sequences read, as the budget counts them.
    nodes: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<Line<'a>> {
        let mut pos = self.pos;
        while pos < self.text.len() {
            let rest = &self.text[pos..];
            let line = rest.split_once('\n').map_or(rest, |(l, _)| l);
            let end = pos + line.len() + 1;
            let body = line.trim_start_matches(' ');
            if !body.is_empty() && !body.starts_with('#') {
                return Some(Line { indent: line.len() - body.len(), body, end });
            }
            pos = end;
        }
        None
    }

    /// A block mapping whose keys are at `indent`; `first` is an entry already read
    /// from a sequence item's line. `entry` gets the indent, the key and the rest of
    /// the key's line, and reads the value.
    fn mapping(
        &mut self,
        indent: usize,
        first: Option<&'a str>,
        mut entry: impl FnMut(&mut Self, usize, &'a str, &'a str) -> Option<()>,
    ) -> Option<()> {
        self.nodes += 1;
        if let Some(body) = first {
            let (key, value) = split_entry(body)?;
            self.nodes += 1;
            entry(self, indent, key, value)?;
        }
        while let Some(l) = self.peek() {
            if l.indent < indent {
                break;
            }
            if l.indent > indent || is_item(l.body) {
                return None;
            }
            self.pos = l.end;
            let (key, value) = split_entry(l.body)?;
            self.nodes += 1;
            entry(self, indent, key, value)?;
        }
        Some(())
    }

    /// The value of a key at `parent` that must be a mapping: `{}`, or a block
    /// mapping on the lines below.
    fn block_map(
        &mut self,
        parent: usize,
        value: &str,
        entry: impl FnMut(&mut Self, usize, &'a str, &'a str) -> Option<()>,
    ) -> Option<()> {
        if value == "{}" {
            self.nodes += 1;
            return Some(());
        }
        let first = self.peek()?;
        if !value.is_empty() || first.indent <= parent || is_item(first.body) {
            return None;
        }
        self.mapping(first.indent, None, entry)
    }

    /// The value of a key at `parent` that must be a sequence: `[]`, or a block
    /// sequence below (at the key's indent or deeper). `item` gets the column of the
    /// item's content and the content.
    fn block_seq(
        &mut self,
        parent: usize,
        value: &str,
        mut item: impl FnMut(&mut Self, usize, &'a str) -> Option<()>,
    ) -> Option<()> {
        self.nodes += 1;
        if value == "[]" {
            return Some(());
        }
        let first = self.peek()?;
        if !value.is_empty() || first.indent < parent || !is_item(first.body) {
            return None;
        }
        let indent = first.indent;
        while let Some(l) = self.peek() {
            if l.indent < indent || (l.indent == indent && !is_item(l.body)) {
                break;
            }
            if l.indent > indent {
                return None;
            }
            self.pos = l.end;
            let content = l.body.get(2..)?;
            let trimmed = content.trim_start_matches(' ');
            item(self, indent + 2 + content.len() - trimmed.len(), trimmed)?;
        }
        Some(())
    }

    /// A one-line scalar that is all of `value`, as text.
    fn str(&mut self, value: &'a str) -> Option<Cow<'a, str>> {
        self.nodes += 1;
        if plain_block(value) { Some(Cow::Borrowed(value)) } else { quoted(value) }
    }

    /// The string value of a key at `parent`: a one-line scalar, or a block scalar
    /// (the serialiser folds strings of more than 80 characters, such as sealed secrets).
    fn string(&mut self, parent: usize, value: &'a str) -> Option<String> {
        match value {
            ">-" | ">" | "|-" | "|" => self.block_scalar(parent, value),
            _ => self.str(value).map(Cow::into_owned),
        }
    }

    /// `>-`, `>`, `|-` or `|` and the lines below it, when they are all at one indent,
    /// with no blank line, no line ending in a space and none starting with `#` (content,
    /// not a comment, in a block scalar). Folding such lines joins them with a space.
    fn block_scalar(&mut self, parent: usize, header: &str) -> Option<String> {
        let (folded, clip) = (header.starts_with('>'), !header.ends_with('-'));
        let mut out = String::new();
        let mut indent = None;
        while self.pos < self.text.len() {
            let rest = &self.text[self.pos..];
            let line = rest.split_once('\n').map_or(rest, |(l, _)| l);
            let body = line.trim_start_matches(' ');
            let at = line.len() - body.len();
            if body.is_empty() {
                return None;
            }
            let want = *indent.get_or_insert(at);
            if at < want || at <= parent {
                break;
            }
            if at > want || body.starts_with('#') || body.ends_with(' ') {
                return None;
            }
            if !out.is_empty() {
                out.push(if folded { ' ' } else { '\n' });
            }
            out.push_str(body);
            self.pos += line.len() + 1;
        }
        // Clipping keeps the last line break, which a scalar ending the file may lack.
        if out.is_empty() || self.pos > self.text.len() {
            return None;
        }
        if clip {
            out.push('\n');
        }
        self.nodes += 1;
        Some(out)
    }

    /// A plain scalar (the only form read here as a bool, number or enum).
    fn plain(&mut self, value: &'a str) -> Option<&'a str> {
        self.nodes += 1;
        plain_block(value).then_some(value)
    }

    fn date(&mut self, value: &'a str) -> Option<OffsetDateTime> {
        OffsetDateTime::parse(&self.str(value)?, &Rfc3339).ok()
    }

    fn boolean(&mut self, value: &'a str) -> Option<bool> {
        match self.plain(value)? {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }

    /// Decimal digits without a leading zero: what every YAML schema reads alike.
    fn uint(&mut self, value: &'a str) -> Option<u32> {
        let v = self.plain(value)?;
        let digits = v.bytes().all(|b| b.is_ascii_digit()) && (v == "0" || !v.starts_with('0'));
        if digits { v.parse().ok() } else { None }
    }

    /// A sequence of strings: `[a, "b"]` on the key's line, or a block sequence.
    fn list<T>(&mut self, parent: usize, value: &'a str, wrap: impl Fn(String) -> T) -> Option<Vec<T>> {
        if value.starts_with('[') && value != "[]" {
            self.nodes += 1;
            let inner = value.strip_prefix('[')?.strip_suffix(']')?;
            if inner.trim_matches(' ').is_empty() {
                return Some(Vec::new());
            }
            let mut out = Vec::with_capacity(inner.bytes().filter(|&b| b == b',').count() + 1);
            let mut rest = inner;
            loop {
                rest = rest.trim_start_matches(' ');
                let (item, after) = if rest.starts_with(['"', '\'']) {
                    // The closing quote: the first one not doubled ('' in single quotes).
                    let q = rest.as_bytes()[0];
                    let mut i = 1;
                    loop {
                        let at = rest.as_bytes().get(i..)?.iter().position(|&b| b == q)? + i;
                        if q == b'\'' && rest.as_bytes().get(at + 1) == Some(&b'\'') {
                            i = at + 2;
                        } else {
                            break (quoted(&rest[..=at])?, &rest[at + 1..]);
                        }
                    }
                } else {
                    let end = rest.find(',').unwrap_or(rest.len());
                    let item = rest[..end].trim_end_matches(' ');
                    if !plain_flow(item) {
                        return None;
                    }
                    (Cow::Borrowed(item), &rest[end..])
                };
                self.nodes += 1;
                out.push(wrap(item.into_owned()));
                match after.trim_start_matches(' ').strip_prefix(',') {
                    Some(next) => rest = next,
                    None if after.trim_start_matches(' ').is_empty() => return Some(out),
                    None => return None,
                }
            }
        }
        let mut out = Vec::new();
        self.block_seq(parent, value, |r, _, content| {
            out.push(wrap(r.str(content)?.into_owned()));
            Some(())
        })?;
        Some(out)
    }

    fn roles(&mut self, parent: usize, value: &'a str) -> Option<BTreeMap<String, FileRole>> {
        let mut roles = BTreeMap::new();
        self.block_map(parent, value, |r, n, name, value| {
            let role = r.role(n, value)?;
            roles.insert(name.to_string(), role).is_none().then_some(())
        })?;
        Some(roles)
    }

    fn role(&mut self, parent: usize, value: &'a str) -> Option<FileRole> {
        let mut role = FileRole::default();
        let mut seen = Fields::new(ROLE_KEYS);
        self.block_map(parent, value, |r, n, key, value| {
            seen.once(key)?;
            match key {
                "description" => role.description = r.string(n, value)?,
                "rules" => role.rules = r.list(n, value, spanned)?,
                _ => return None,
            }
            Some(())
        })?;
        Some(role)
    }

    fn users(&mut self, parent: usize, value: &'a str, mut each: impl FnMut(FileUser)) -> Option<()> {
        self.block_seq(parent, value, |r, col, content| {
            each(r.user(col, content)?);
            Some(())
        })
    }

    fn user(&mut self, col: usize, first: &'a str) -> Option<FileUser> {
        let mut u = FileUser::new("", AuthMethod::ApiKey, OffsetDateTime::UNIX_EPOCH);
        let mut seen = Fields::new(USER_KEYS);
        self.mapping(col, Some(first), |r, n, key, value| {
            seen.once(key)?;
            match key {
                "id" => u.id = spanned(r.string(n, value)?),
                "display_name" => u.display_name = r.string(n, value)?,
                "description" => u.description = r.string(n, value)?,
                "organization" => u.organization = r.string(n, value)?,
                "teams" => u.teams = r.list(n, value, |s| s)?,
                "default_team" => u.default_team = Some(r.string(n, value)?),
                "roles" => u.roles = r.list(n, value, spanned)?,
                "status" => {
                    u.status = match r.plain(value)? {
                        "active" => Status::Active,
                        "inactive" => Status::Inactive,
                        "retired" => Status::Retired,
                        _ => return None,
                    };
                }
                "auth_method" => {
                    u.auth_method = match r.plain(value)? {
                        "api_key" => AuthMethod::ApiKey,
                        "hmac" => AuthMethod::Hmac,
                        _ => return None,
                    };
                }
                "allowed_endpoints" => u.allowed_endpoints = r.list(n, value, spanned)?,
                "allow_proxied_users" => u.allow_proxied_users = r.boolean(value)?,
                "allowed_proxied_users" => u.allowed_proxied_users = r.list(n, value, |s| s)?,
                "rate_limit" => u.rate_limit = Some(spanned(r.rate_limit(n, value)?)),
                "keys" => {
                    // Most users have one key (the default growth makes room for four).
                    let mut keys = Vec::with_capacity(1);
                    r.block_seq(n, value, |r, col, content| {
                        keys.push(r.key(col, content)?);
                        Some(())
                    })?;
                    u.keys = keys;
                }
                "created_at" => u.created_at = r.date(value)?,
                "updated_at" => u.updated_at = r.date(value)?,
                _ => return None,
            }
            Some(())
        })?;
        seen.has_all(USER_REQUIRED)?;
        Some(u)
    }

    fn key(&mut self, col: usize, first: &'a str) -> Option<FileKey> {
        let mut k = FileKey::new(String::new(), String::new(), OffsetDateTime::UNIX_EPOCH);
        let mut seen = Fields::new(KEY_KEYS);
        self.mapping(col, Some(first), |r, n, key, value| {
            seen.once(key)?;
            match key {
                "id" => k.id = spanned(r.string(n, value)?),
                "label" => k.label = r.string(n, value)?,
                "created_at" => k.created_at = r.date(value)?,
                "expires_at" => k.expires_at = Some(r.date(value)?),
                "revoked_at" => k.revoked_at = Some(r.date(value)?),
                "token_sha256" => k.token_sha256 = Some(r.string(n, value)?),
                "hint" => k.hint = Some(r.string(n, value)?),
                "secret_sealed" => k.secret_sealed = Some(r.string(n, value)?),
                "rate_limit" => k.rate_limit = Some(r.rate_limit(n, value)?),
                _ => return None,
            }
            Some(())
        })?;
        seen.has_all(KEY_REQUIRED)?;
        Some(k)
    }

    fn rate_limit(&mut self, parent: usize, value: &'a str) -> Option<FileRateLimit> {
        let (mut per_second, mut burst) = (None, None);
        self.block_map(parent, value, |r, _, key, value| {
            let slot = match key {
                "per_second" => &mut per_second,
                "burst" => &mut burst,
                _ => return None,
            };
            if slot.is_some() {
                return None;
            }
            *slot = Some(r.uint(value)?);
            Some(())
        })?;
        Some(FileRateLimit { per_second: per_second?, burst: burst? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::ops::{self, UserFields};
    use crate::credentials::secrets::MasterKey;

    /// What serde-saphyr makes of `text`, as the comparable JSON of the file model.
    fn saphyr(text: &str) -> Result<serde_json::Value, String> {
        let f: FileCredentials = serde_saphyr::from_str_with_options(text, super::super::snapshot::yaml_options())
            .map_err(|e| e.to_string())?;
        Ok(serde_json::to_value(&f).unwrap())
    }

    fn fast(text: &str) -> Option<serde_json::Value> {
        parse(text).map(|f| serde_json::to_value(&f).unwrap())
    }

    /// every field the CLI and admin API can set, written by the real serialiser, is read
    /// by the fast path, and read as serde-saphyr reads it
    #[test]
    fn what_gatehouse_writes_takes_the_fast_path() {
        let master = MasterKey::generate().unwrap();
        let mut c = FileCredentials::default();
        ops::set_role(&mut c, "bench", String::new(), vec!["* /**".into()]).unwrap();
        ops::set_role(&mut c, "orders-read", "Reads orders: all of them".into(), vec!["GET /orders/**".into()])
            .unwrap();
        let fields = UserFields {
            display_name: Some("Émile O'Brien".into()),
            description: Some("batch job, runs nightly".into()),
            organization: Some("Acme".into()),
            teams: Some(vec!["payments".into(), "ops".into()]),
            default_team: Some(Some("ops".into())),
            roles: Some(vec!["bench".into(), "orders-read".into()]),
            allowed_endpoints: Some(vec!["POST /orders".into()]),
            allow_proxied_users: Some(true),
            allowed_proxied_users: Some(vec!["alice".into()]),
            rate_limit: Some(Some(FileRateLimit { per_second: 5, burst: 10 })),
        };
        ops::create_user(&mut c, "svc-a", AuthMethod::ApiKey, fields).unwrap();
        ops::create_user(&mut c, "svc-b", AuthMethod::Hmac, UserFields::default()).unwrap();
        ops::create_user(&mut c, "svc-c", AuthMethod::ApiKey, UserFields::default()).unwrap();
        ops::add_key(&mut c, "svc-a", "main", Some(ops::now()), || unreachable!()).unwrap();
        ops::add_key(&mut c, "svc-a", "", None, || unreachable!()).unwrap();
        ops::add_key(&mut c, "svc-b", "ci", None, || Ok(master)).unwrap();
        let kid = c.users[0].keys[0].id.value.clone();
        ops::revoke_key(&mut c, "svc-a", &kid, ops::now()).unwrap();
        c.users[0].keys[1].rate_limit = Some(FileRateLimit { per_second: 1, burst: 2 });
        ops::set_status(&mut c, "svc-c", Status::Retired).unwrap();
        let text = serde_saphyr::to_string(&c).unwrap();
        assert_eq!(fast(&text), Some(saphyr(&text).unwrap()), "{text}");
        assert_eq!(fast(&text), Some(serde_json::to_value(&c).unwrap()));
        // An empty file model as written.
        let text = serde_saphyr::to_string(&FileCredentials::default()).unwrap();
        assert_eq!(fast(&text), Some(saphyr(&text).unwrap()), "{text}");
    }

    /// the shape `benches/fill_users.py` appends (flow lists, plain dates), and a
    /// hand-written file with comments and deeper indentation
    #[test]
    fn generated_and_hand_written_files_take_the_fast_path() {
        for text in [
            "roles:\n  bench:\n    rules:\n    - \"* /**\"\nusers:\n- id: filler-000000\n  status: active\n  auth_method: api_key\n  roles: [bench]\n  created_at: 2026-01-01T00:00:00Z\n  updated_at: 2026-01-01T00:00:00Z\n  keys:\n  - id: ak_filler000000\n    created_at: 2026-01-01T00:00:00Z\n    token_sha256: a522b71be950316075157f00aa7377d239a9b5b992057d22249eea9be0b07228\n    hint: ghk_…0000\n",
            "roles:\n    reader:   # a trailing comment: refused\n      rules: ['GET /a', \"GET /b\"]\n",
            "# credentials\n\nroles:\n    reader:\n        description: 'it''s'\n        rules: ['GET /a', \"GET /b\"]\n    # none yet\nusers: []\n",
        ] {
            let expected = saphyr(text);
            match fast(text) {
                Some(v) => assert_eq!(Ok(v), expected, "{text}"),
                None => assert!(text.contains("refused"), "{text}"),
            }
        }
    }

    /// whatever the fast path is unsure of goes to serde-saphyr (each of these is
    /// valid YAML, or an error serde-saphyr reports with its line)
    #[test]
    fn doubtful_files_go_to_serde_saphyr() {
        let user = "users:\n- id: u\n  status: active\n  auth_method: api_key\n  created_at: 2026-01-01T00:00:00Z\n  updated_at: 2026-01-01T00:00:00Z\n";
        assert!(fast(user).is_some());
        let comments = format!("- id: u\n{}", "  # c\n".repeat(MAX_COMMENT_RUN + 1));
        for (from, to) in [
            ("id: u", "id: ~"),
            ("id: u", "id: null"),
            ("id: u", "id:"),
            ("id: u", "id: &a u"),
            ("id: u", "id: !!str u"),
            ("id: u", "id: \"u\\u0041\""),
            ("id: u", "id: u # a comment"),
            ("id: u", "id: u\n  id: v"),
            ("id: u", "id: u\n  colour: blue"),
            ("id: u", "id:\tu"),
            ("id: u", "id: u "),
            ("id: u", "id: u\r"),
            ("id: u", "id: |2\n    u"),
            ("id: u", "id: u\n    v"),
            ("id: u", "id: 'u\n    v'"),
            ("id: u", "id : u"),
            ("id: u", "\"id\": u"),
            ("id: u", "id: \u{feff}u"),
            ("status: active", "status: Active"),
            ("status: active", "status: \"active\""),
            ("auth_method: api_key", "auth_method: api_key\n  allow_proxied_users: yes"),
            ("auth_method: api_key", "auth_method: api_key\n  rate_limit: {per_second: 1, burst: 1}"),
            ("auth_method: api_key", "auth_method: api_key\n  rate_limit:\n    per_second: 01\n    burst: 1"),
            ("auth_method: api_key", "auth_method: api_key\n  rate_limit:\n    per_second: 1"),
            ("auth_method: api_key", "auth_method: api_key\n  teams: [a, ]"),
            ("auth_method: api_key", "auth_method: api_key\n  teams: [a, [b]]"),
            ("auth_method: api_key", "auth_method: api_key\n  teams:\n  - - a"),
            ("created_at: 2026-01-01T00:00:00Z\n", "created_at: 2026-01-01\n"),
            ("users:\n", "---\nusers:\n"),
            ("users:\n", "users:\n  <<: {}\n"),
            ("users:\n", "%YAML 1.2\n---\nusers:\n"),
            ("- id: u\n", &comments),
        ] {
            let text = user.replacen(from, to, 1);
            assert_ne!(text, user);
            assert_eq!(fast(&text), None, "{text}");
        }
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        /// A small deterministic generator: the property below draws a seed, and the
        /// document is a function of it (failures print the document).
        struct Gen(u64);

        impl Gen {
            fn below(&mut self, n: usize) -> usize {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 % n as u64) as usize
            }
            fn chance(&mut self, percent: usize) -> bool {
                self.below(100) < percent
            }
            fn pick<'s>(&mut self, xs: &[&'s str]) -> &'s str {
                xs[self.below(xs.len())]
            }
        }

        /// Scalars YAML reads in surprising ways, or that end the scalar early.
        const ODD: &[&str] = &[
            "",
            " ",
            "a b",
            "a  b",
            "~",
            "null",
            "Null",
            "NULL",
            "true",
            "True",
            "yes",
            "no",
            "off",
            "0",
            "01",
            "0x1F",
            "1e3",
            "1_0",
            "+1",
            "-1",
            ".inf",
            ".nan",
            "-",
            "-a",
            "- a",
            "?a",
            "? a",
            ":a",
            "a:",
            "a: b",
            "a:b",
            "a #b",
            "a#b",
            "#a",
            "&a",
            "*a",
            "!a",
            "!!str a",
            "|",
            ">",
            "%a",
            "@a",
            "`a",
            "'a",
            "a'b",
            "a''b",
            "\"a",
            "a\"b",
            "a\\b",
            "[a]",
            "{a}",
            "a,b",
            "a]",
            "a}",
            "é",
            "\u{a0}x",
            "x\u{a0}",
            "\u{3000}x",
            "a\u{2028}b",
            "\u{85}",
            "\u{feff}a",
            "a\tb",
            "…",
            "* /**",
            "GET /x/*",
            "2026-01-01T00:00:00Z",
            "<<",
            "=",
            "a\\",
            "\\",
            "...",
            "---",
            "a ...",
        ];
        const WORDS: &[&str] =
            &["bench", "ops", "a-b", "x.y", "svc_1", "Payments Team", "GET /orders/**", "* /**", "ghk_…abcd"];
        const IDS: &[&str] = &["u", "svc-a", "ak_3npv1g5trp8qkhvo59yywyc2p", "filler-000001", "U", "1", "a b"];
        const DATES: &[&str] = &[
            "2026-01-01T00:00:00Z",
            "2026-11-23T13:34:46+01:00",
            "2026-01-01T00:00:00.5Z",
            "2026-01-01",
            "2026-01-01 00:00:00Z",
            "2026-02-30T00:00:00Z",
            "yesterday",
        ];
        const NUMBERS: &[&str] = &["1", "5", "0", "01", "4294967295", "4294967296", "+1", "0x10", "1_0", "-1", "1.0"];

        struct Doc {
            g: Gen,
            out: String,
            /// Perturbations (odd scalars, comments, bad indentation, duplicate keys) are
            /// allowed in this document.
            noisy: bool,
            step: usize,
            seq_at_key: bool,
        }

        impl Doc {
            fn line(&mut self, indent: usize, text: &str) {
                self.out.push_str(&" ".repeat(indent));
                self.out.push_str(text);
                self.out.push('\n');
                if self.noisy && self.g.chance(4) {
                    let (at, n) = (self.g.below(8), if self.g.chance(10) { 20 } else { 1 + self.g.below(3) });
                    let text = *["# c", "#", "# a: b", "#- x", ""].get(self.g.below(5)).unwrap_or(&"");
                    for _ in 0..n {
                        self.out.push_str(&format!("{}{text}\n", " ".repeat(at)));
                    }
                }
                if self.noisy && self.g.chance(1) {
                    self.out.push_str(["\t", " ", "\r"][self.g.below(3)]);
                }
            }

            fn text(&mut self, pool: &[&str]) -> String {
                if self.noisy && self.g.chance(15) {
                    self.g.pick(ODD).to_string()
                } else {
                    self.g.pick(pool).to_string()
                }
            }

            /// A scalar of `pool`, plain or quoted.
            fn scalar(&mut self, pool: &[&str]) -> String {
                let t = self.text(pool);
                match self.g.below(10) {
                    0..=5 => t,
                    6 | 7 => format!("\"{t}\""),
                    _ if self.noisy && self.g.chance(10) => format!("'{t}'"),
                    _ => format!("'{}'", t.replace('\'', "''")),
                }
            }

            /// `key: value`, or `key:` and a block written by `block` at `indent`.
            fn entry(&mut self, indent: usize, key: &str, value: String) {
                let key = if self.noisy && self.g.chance(2) { self.g.pick(ODD).to_string() } else { key.to_string() };
                let sep = if self.noisy && self.g.chance(3) { ":  " } else { ": " };
                self.line(indent, &format!("{key}{sep}{value}"));
            }

            /// `key: >-` (or another block header) and its lines.
            fn block(&mut self, indent: usize, key: &str) {
                let header = self.g.pick(&[">-", ">", "|-", "|", ">-", "|+", ">2", "> # c"]);
                self.entry(indent, key, header.to_string());
                let at = indent + self.step;
                for _ in 0..1 + self.g.below(3) {
                    let extra = if self.noisy && self.g.chance(10) { self.g.below(3) } else { 0 };
                    let text = self.text(&[
                        "yP6Tiu4T46uB2lh/KqR7t9qUoOUSqzbluQdc35Exa5oo+",
                        "runs nightly",
                        "a: b # c",
                        "- x",
                    ]);
                    self.line(at + extra, &text);
                }
            }

            fn list(&mut self, indent: usize, key: &str, pool: &[&str]) {
                let n = self.g.below(4);
                let items: Vec<String> = (0..n).map(|_| self.scalar(pool)).collect();
                if self.g.chance(50) {
                    let sep = if self.g.chance(20) { " , " } else { ", " };
                    self.entry(indent, key, format!("[{}]", items.join(sep)));
                } else if items.is_empty() {
                    self.entry(indent, key, "[]".into());
                } else {
                    self.line(indent, &format!("{key}:"));
                    let at = if self.seq_at_key { indent } else { indent + self.step };
                    for i in items {
                        self.line(at, &format!("- {i}"));
                    }
                }
            }

            /// Fields in a random order, each with its writer; required ones are rarely
            /// left out, and a noisy document sometimes repeats one or adds an unknown one.
            fn fields(
                &mut self,
                first: Option<usize>,
                indent: usize,
                fields: &[(&str, bool)],
                mut write: impl FnMut(&mut Self, usize, &str),
            ) {
                let mut order: Vec<usize> = (0..fields.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, self.g.below(i + 1));
                }
                let mut chosen: Vec<usize> = order
                    .into_iter()
                    .filter(|&i| if fields[i].1 { !(self.noisy && self.g.chance(3)) } else { self.g.chance(40) })
                    .collect();
                if self.noisy && self.g.chance(3) && !chosen.is_empty() {
                    chosen.push(chosen[self.g.below(chosen.len())]);
                }
                for (n, i) in chosen.into_iter().enumerate() {
                    let at = match (n, first) {
                        (0, Some(_)) => usize::MAX,
                        _ if self.noisy && self.g.chance(1) => indent + 1,
                        _ => indent,
                    };
                    write(self, at, fields[i].0);
                }
                if self.noisy && self.g.chance(3) {
                    self.line(indent, "colour: blue");
                }
            }
        }

        /// Writes a document; `usize::MAX` as an indent means "on the `- ` line".
        fn document(seed: u64) -> String {
            let mut g = Gen(seed | 1);
            let noisy = g.chance(50);
            let step = if g.chance(80) { 2 } else { 4 };
            let seq_at_key = g.chance(70);
            let mut d = Doc { g, out: String::new(), noisy, step, seq_at_key };
            let roles_first = d.g.chance(80);
            for part in if roles_first { ["roles", "users"] } else { ["users", "roles"] } {
                if d.g.chance(15) {
                    continue;
                }
                if part == "roles" {
                    roles(&mut d);
                } else {
                    users(&mut d);
                }
            }
            d.out
        }

        fn roles(d: &mut Doc) {
            let n = d.g.below(3);
            if n == 0 {
                d.line(0, "roles: {}");
                return;
            }
            d.line(0, "roles:");
            for _ in 0..n {
                let name = d.text(&["bench", "read-only", "ops.v2", "_x", "true", "123"]);
                if d.g.chance(10) {
                    d.entry(d.step, &name, "{}".into());
                    continue;
                }
                d.line(d.step, &format!("{name}:"));
                let at = 2 * d.step;
                d.fields(None, at, &[("description", false), ("rules", false)], |d, i, f| match f {
                    "description" if d.g.chance(20) => d.block(i, f),
                    "description" => {
                        let v = d.scalar(WORDS);
                        d.entry(i, f, v)
                    }
                    _ => d.list(i, f, WORDS),
                });
            }
        }

        fn users(d: &mut Doc) {
            let n = d.g.below(4);
            if n == 0 {
                d.line(0, "users: []");
                return;
            }
            d.line(0, "users:");
            let at = if d.seq_at_key { 0 } else { d.step };
            for _ in 0..n {
                item(d, at, USER, user_field);
            }
        }

        const USER: &[(&str, bool)] = &[
            ("id", true),
            ("display_name", false),
            ("description", false),
            ("organization", false),
            ("teams", false),
            ("default_team", false),
            ("roles", false),
            ("status", true),
            ("auth_method", true),
            ("allowed_endpoints", false),
            ("allow_proxied_users", false),
            ("allowed_proxied_users", false),
            ("rate_limit", false),
            ("keys", false),
            ("created_at", true),
            ("updated_at", true),
        ];
        const KEY: &[(&str, bool)] = &[
            ("id", true),
            ("label", false),
            ("created_at", true),
            ("expires_at", false),
            ("revoked_at", false),
            ("token_sha256", false),
            ("hint", false),
            ("secret_sealed", false),
            ("rate_limit", false),
        ];

        /// A sequence item holding a mapping: its first field on the `- ` line.
        fn item(d: &mut Doc, at: usize, fields: &[(&str, bool)], field: fn(&mut Doc, usize, &str)) {
            let pad = if d.g.chance(10) { 3 } else { 1 };
            let col = at + 1 + pad;
            let mut first = true;
            d.fields(Some(0), col, fields, |d, i, f| {
                if i == usize::MAX || first {
                    first = false;
                    // Written into a scratch document, then glued after the dash.
                    let mut sub = Doc {
                        g: Gen(d.g.0),
                        out: String::new(),
                        noisy: d.noisy,
                        step: d.step,
                        seq_at_key: d.seq_at_key,
                    };
                    field(&mut sub, col, f);
                    d.g = sub.g;
                    let body = sub.out.get(col..).unwrap_or("").to_string();
                    d.out.push_str(&format!("{}-{}{body}", " ".repeat(at), " ".repeat(pad)));
                } else {
                    field(d, i, f);
                }
            });
            if first {
                d.line(at, "- {}");
            }
        }

        fn rate_limit(d: &mut Doc, i: usize, f: &str) {
            if d.g.chance(10) {
                d.entry(i, f, "{}".into());
                return;
            }
            d.line(i, &format!("{f}:"));
            let at = i + d.step;
            d.fields(None, at, &[("per_second", true), ("burst", true)], |d, i, f| {
                let v = d.scalar(NUMBERS);
                d.entry(i, f, v)
            });
        }

        fn user_field(d: &mut Doc, i: usize, f: &str) {
            let v = match f {
                "id" => d.scalar(IDS),
                "status" => d.scalar(&["active", "inactive", "retired", "active", "Active"]),
                "auth_method" => d.scalar(&["api_key", "hmac", "api_key", "hmac", "apikey"]),
                "allow_proxied_users" => d.scalar(&["true", "false", "True", "yes"]),
                "created_at" | "updated_at" => d.scalar(DATES),
                "teams" | "roles" | "allowed_endpoints" | "allowed_proxied_users" => return d.list(i, f, WORDS),
                "rate_limit" => return rate_limit(d, i, f),
                "display_name" | "description" | "organization" if d.g.chance(20) => return d.block(i, f),
                "keys" => {
                    let n = d.g.below(3);
                    if n == 0 {
                        return d.entry(i, f, "[]".into());
                    }
                    d.line(i, &format!("{f}:"));
                    let at = if d.seq_at_key { i } else { i + d.step };
                    for _ in 0..n {
                        item(d, at, KEY, key_field);
                    }
                    return;
                }
                _ => d.scalar(WORDS),
            };
            d.entry(i, f, v);
        }

        fn key_field(d: &mut Doc, i: usize, f: &str) {
            let v = match f {
                "id" => d.scalar(IDS),
                "created_at" | "expires_at" | "revoked_at" => d.scalar(DATES),
                "token_sha256" => d.scalar(&["6d8b90bdea1baea768d3a916625028ea967f910b3958682a05e02b1622995279", "12"]),
                "secret_sealed" | "label" | "hint" if d.g.chance(30) => return d.block(i, f),
                "rate_limit" => return rate_limit(d, i, f),
                _ => d.scalar(WORDS),
            };
            d.entry(i, f, v);
        }

        /// whenever the fast path reads a document, serde-saphyr reads it too, to the
        /// same value; the runner counts the documents read, so the property cannot pass
        /// by refusing everything
        #[test]
        fn the_fast_path_means_what_serde_saphyr_means() {
            let mut runner =
                proptest::test_runner::TestRunner::new(ProptestConfig { cases: 50_000, ..ProptestConfig::default() });
            let (read, noisy_read) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
            runner
                .run(&any::<u64>(), |seed| {
                    let text = document(seed);
                    if let Some(v) = fast(&text) {
                        read.set(read.get() + 1);
                        noisy_read.set(noisy_read.get() + u32::from(Gen(seed | 1).chance(50)));
                        let expected = saphyr(&text);
                        prop_assert_eq!(Ok(v), expected, "{}", text);
                    }
                    Ok(())
                })
                .unwrap();
            assert!(read.get() > 8_000, "only {} documents took the fast path", read.get());
            assert!(noisy_read.get() > 4_000, "only {} perturbed documents took the fast path", noisy_read.get());
        }
    }
}
