//! Console sessions: server-side, in this process's memory. The browser holds a random
//! 256-bit id in an `HttpOnly`, `SameSite=Strict` cookie; the gateway keeps only the id's
//! SHA-256, the admin token's SHA-256 (to ask on every request whether that token is
//! still live), a CSRF token, and two deadlines (idle and absolute).

use dashmap::DashMap;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE: &str = "gatehouse_console";

/// Sessions kept at most: sign-in needs a valid admin token, so this only bounds memory
/// against a holder of one signing in in a loop. Expired sessions are dropped first.
const MAX_SESSIONS: usize = 10_000;

/// Sessions one admin token may hold: its oldest goes when it signs in once more, so one
/// token holder signing in in a loop cannot push everybody else's sessions out.
const MAX_PER_TOKEN: usize = 20;

/// A new key's token or secret, held for the one page that shows it (the form's POST
/// redirects there, so a reload cannot resubmit the form). Never printed by `Debug`.
#[derive(Clone)]
pub struct Flash(pub serde_json::Value);

impl std::fmt::Debug for Flash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Flash(<redacted>)")
    }
}

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// SHA-256 of the admin token it signed in with.
    pub token_digest: [u8; 32],
    /// Whether that token is a named (`gha_`) one, looked up in the store.
    pub named: bool,
    /// Sent back by every form; compared in constant time.
    pub csrf: String,
    created: Instant,
    last_seen: Instant,
    flash: Option<Flash>,
}

/// Every session of this process.
#[derive(Debug)]
pub struct Sessions {
    by_id: DashMap<[u8; 32], Session>,
    idle: Duration,
    lifetime: Duration,
}

fn random_text() -> Option<String> {
    use base64::Engine;
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    pub fn new(idle: Duration, lifetime: Duration) -> Sessions {
        Sessions { by_id: DashMap::new(), idle, lifetime }
    }

    /// Starts a session for the token with SHA-256 `token_digest`; returns the cookie
    /// value (the session id), or `None` when no randomness is available.
    pub fn start(&self, token_digest: [u8; 32], named: bool) -> Option<String> {
        let mine: Vec<([u8; 32], Instant)> = self
            .by_id
            .iter()
            .filter(|e| e.value().token_digest == token_digest)
            .map(|e| (*e.key(), e.value().created))
            .collect();
        if mine.len() >= MAX_PER_TOKEN
            && let Some((k, _)) = mine.iter().min_by_key(|(_, created)| *created)
        {
            self.by_id.remove(k);
        }
        if self.by_id.len() >= MAX_SESSIONS {
            let now = Instant::now();
            self.by_id.retain(|_, s| self.live(s, now));
            if self.by_id.len() >= MAX_SESSIONS {
                // Still full of live sessions: the oldest goes.
                let oldest = self.by_id.iter().min_by_key(|e| e.value().created).map(|e| *e.key());
                if let Some(k) = oldest {
                    self.by_id.remove(&k);
                }
            }
        }
        let id = random_text()?;
        let csrf = random_text()?;
        let now = Instant::now();
        self.by_id
            .insert(digest(&id), Session { token_digest, named, csrf, created: now, last_seen: now, flash: None });
        Some(id)
    }

    fn live(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.last_seen) < self.idle && now.duration_since(s.created) < self.lifetime
    }

    /// The live session with cookie value `id`, its idle deadline pushed back; an
    /// expired one is dropped.
    pub fn touch(&self, id: &str) -> Option<Session> {
        let key = digest(id);
        let now = Instant::now();
        let mut entry = self.by_id.get_mut(&key)?;
        if !self.live(&entry, now) {
            drop(entry);
            self.by_id.remove(&key);
            return None;
        }
        entry.last_seen = now;
        // The copy handed out carries no secret: a flash is taken only by `take_flash`.
        Some(Session { flash: None, ..entry.clone() })
    }

    /// Keeps `flash` for the session's next [`Sessions::take_flash`].
    pub fn put_flash(&self, id: &str, flash: serde_json::Value) {
        if let Some(mut s) = self.by_id.get_mut(&digest(id)) {
            s.flash = Some(Flash(flash));
        }
    }

    /// What [`Sessions::put_flash`] kept, once.
    pub fn take_flash(&self, id: &str) -> Option<serde_json::Value> {
        self.by_id.get_mut(&digest(id)).and_then(|mut s| s.flash.take()).map(|f| f.0)
    }

    /// Ends the session with cookie value `id`.
    pub fn end(&self, id: &str) {
        self.by_id.remove(&digest(id));
    }

    /// How long a session lives at most after sign-in (the cookie's `Max-Age`).
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

impl Session {
    /// Whether `sent` is this session's CSRF token.
    pub fn csrf_ok(&self, sent: &str) -> bool {
        sent.len() == self.csrf.len() && bool::from(sent.as_bytes().ct_eq(self.csrf.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// a session lives until its idle or absolute deadline; an ended one is gone
    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(3600));
        let id = s.start([1; 32], false).unwrap();
        let got = s.touch(&id).unwrap();
        assert_eq!(got.token_digest, [1; 32]);
        assert!(got.csrf_ok(&got.csrf.clone()));
        assert!(!got.csrf_ok("nope"));
        assert!(s.touch("not-a-session").is_none());
        s.end(&id);
        assert!(s.touch(&id).is_none());
        let short = Sessions::new(Duration::ZERO, Duration::from_secs(3600));
        let id = short.start([1; 32], false).unwrap();
        assert!(short.touch(&id).is_none(), "idle deadline");
        let short = Sessions::new(Duration::from_secs(60), Duration::ZERO);
        let id = short.start([1; 32], false).unwrap();
        assert!(short.touch(&id).is_none(), "absolute deadline");
    }

    /// a flash is taken once; one token's sessions are capped, its oldest goes first, and
    /// another token's sessions are untouched
    #[test]
    fn flashes_and_the_per_token_cap() {
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(3600));
        let other = s.start([2; 32], false).unwrap();
        let first = s.start([1; 32], false).unwrap();
        s.put_flash(&first, serde_json::json!({"token": "ghk_x"}));
        assert!(!format!("{:?}", s.by_id).contains("ghk_x"), "a flash in Debug output");
        assert_eq!(s.take_flash(&first), Some(serde_json::json!({"token": "ghk_x"})));
        assert_eq!(s.take_flash(&first), None);
        for _ in 0..MAX_PER_TOKEN {
            s.start([1; 32], false).unwrap();
        }
        assert!(s.touch(&first).is_none(), "the token's oldest session was kept");
        assert!(s.touch(&other).is_some(), "another token's session was evicted");
    }
}
