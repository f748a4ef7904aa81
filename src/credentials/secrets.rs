//! Secrets: `ghk_` API tokens, HMAC signing secrets, their at-rest forms, and the types
//! that keep them out of logs.
//!
//! - An API token is `ghk_` + 43 base62 characters (32 bytes from the OS CSPRNG) + a
//!   6-character base62 CRC-32 of everything before it. The checksum lets a mistyped or
//!   made-up token be refused before any lookup, and the fixed prefix lets secret
//!   scanners find leaked tokens. At rest only its SHA-256 digest and a display hint
//!   (`ghk_…` + last four characters) are kept.
//! - An HMAC signing secret is `ghs_` + 43 base62 characters; the HMAC key is the UTF-8
//!   bytes of the whole string, as integrators' clients use it. At rest it is sealed with
//!   AES-256-GCM under the master key, with the key id as associated data (so a sealed
//!   secret cannot be moved to another key).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};
use std::fmt;

/// Prefix of every API token.
pub const TOKEN_PREFIX: &str = "ghk_";
/// Prefix of every HMAC signing secret.
pub const SECRET_PREFIX: &str = "ghs_";
const BODY_LEN: usize = 43;
const CHECK_LEN: usize = 6;
/// Length of a well-formed token.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + BODY_LEN + CHECK_LEN;
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const BASE36: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A secret string: shown once, never printed by `Debug`, no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The secret itself, for the one place that must show or use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The SHA-256 digest of a token: what is stored and looked up.
pub type TokenDigest = [u8; 32];

fn random_bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)?;
    Ok(b)
}

/// Base62 of a big-endian number, left-padded to `len` digits.
fn base62(bytes: &[u8], len: usize) -> String {
    encode(bytes, len, BASE62)
}

/// `bytes` as a big-endian number in the base of `alphabet`, left-padded to `len` digits.
fn encode(bytes: &[u8], len: usize, alphabet: &[u8]) -> String {
    let base = alphabet.len() as u32;
    let mut num = bytes.to_vec();
    let mut out = vec![b'0'; len];
    for slot in out.iter_mut().rev() {
        let mut rem = 0u32;
        for b in num.iter_mut() {
            let acc = (rem << 8) | u32::from(*b);
            *b = (acc / base) as u8;
            rem = acc % base;
        }
        *slot = alphabet[rem as usize];
    }
    String::from_utf8(out).unwrap_or_default()
}

fn checksum(s: &str) -> String {
    base62(&crc32fast::hash(s.as_bytes()).to_be_bytes(), CHECK_LEN)
}

/// A new random API token.
pub fn new_token() -> Result<Secret, getrandom::Error> {
    let body = format!("{TOKEN_PREFIX}{}", base62(&random_bytes::<32>()?, BODY_LEN));
    let check = checksum(&body);
    Ok(Secret(body + &check))
}

/// Prefix of every named admin token (docs/admin.md#admin-tokens).
pub const ADMIN_TOKEN_PREFIX: &str = "gha_";

/// A new random admin token: `gha_` + 43 base62 characters + the checksum of API tokens
/// (so secret scanners and a mistyped token are told apart the same way).
pub fn new_admin_token() -> Result<Secret, getrandom::Error> {
    let body = format!("{ADMIN_TOKEN_PREFIX}{}", base62(&random_bytes::<32>()?, BODY_LEN));
    let check = checksum(&body);
    Ok(Secret(body + &check))
}

/// True when `s` has the shape of an admin token and its checksum is right.
pub fn is_well_formed_admin_token(s: &str) -> bool {
    well_formed(s, ADMIN_TOKEN_PREFIX)
}

/// A new random HMAC signing secret.
pub fn new_hmac_secret() -> Result<Secret, getrandom::Error> {
    Ok(Secret(format!("{SECRET_PREFIX}{}", base62(&random_bytes::<32>()?, BODY_LEN))))
}

/// A new random public key id with `prefix` (`ak_`, `hk_`): 25 lower-case base36
/// characters (128 bits), inside the id alphabet of docs/concepts.md.
pub fn new_key_id(prefix: &str) -> Result<String, getrandom::Error> {
    Ok(format!("{prefix}{}", encode(&random_bytes::<16>()?, 25, BASE36)))
}

/// True when `s` has the shape of a token and its checksum is right.
pub fn is_well_formed_token(s: &str) -> bool {
    well_formed(s, TOKEN_PREFIX)
}

/// `prefix` (4 bytes, like both token prefixes), base62, and the right checksum.
#[inline]
fn well_formed(s: &str, prefix: &str) -> bool {
    s.len() == TOKEN_LEN
        && s.starts_with(prefix)
        && s.bytes().skip(prefix.len()).all(|b| b.is_ascii_alphanumeric())
        && decode_base62(&s.as_bytes()[TOKEN_LEN - CHECK_LEN..])
            == Some(u64::from(crc32fast::hash(&s.as_bytes()[..TOKEN_LEN - CHECK_LEN])))
}

/// The number a short base62 string stands for (no allocation: this runs per request).
fn decode_base62(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &c| {
        let d = BASE62_VALUE[usize::from(c)];
        if d == NOT_BASE62 {
            return None;
        }
        acc.checked_mul(62)?.checked_add(u64::from(d))
    })
}

const NOT_BASE62: u8 = u8::MAX;
/// Each byte's base62 digit value, or `NOT_BASE62`: a table, not a search of `BASE62`.
const BASE62_VALUE: [u8; 256] = {
    let mut t = [NOT_BASE62; 256];
    let mut i = 0;
    while i < BASE62.len() {
        t[BASE62[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// The digest under which a token is stored.
pub fn token_digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// What is shown in listings instead of a token: `ghk_…` + its last four characters.
pub fn token_hint(token: &str) -> String {
    let tail = token.get(token.len().saturating_sub(4)..).unwrap_or_default();
    format!("{TOKEN_PREFIX}…{tail}")
}

/// The gateway's master key ring, for sealing HMAC secrets at rest.
///
/// The key file holds one base64 key per line: the first seals, every one is tried to
/// open (AES-GCM's tag tells which key fits). More than one line exists only during a
/// master-key rotation, so that secrets sealed under the old key keep opening while the
/// file is re-sealed under the new one.
#[derive(Clone)]
pub struct MasterKey(Vec<Key<Aes256Gcm>>);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(<{} redacted>)", self.0.len())
    }
}

/// A sealed secret that does not open.
#[derive(Debug, thiserror::Error)]
#[error("sealed secret cannot be opened with this master key (wrong key, or the value was altered)")]
pub struct OpenError;

impl MasterKey {
    /// A new random master key (one key).
    pub fn generate() -> Result<MasterKey, getrandom::Error> {
        Ok(MasterKey(vec![Key::<Aes256Gcm>::from(random_bytes::<32>()?)]))
    }

    /// Parses the key file's text: one base64 key of 32 bytes per line (blank lines and
    /// `#` comments ignored), at least one.
    pub fn from_text(text: &str) -> Result<MasterKey, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |what: &str| format!("line {}: {what}", n + 1);
            let raw = B64.decode(line).map_err(|_| at("master key is not valid base64"))?;
            let bytes: [u8; 32] = raw.try_into().map_err(|_| at("master key must be 32 bytes (base64)"))?;
            keys.push(Key::<Aes256Gcm>::from(bytes));
        }
        if keys.is_empty() {
            return Err("master key file holds no key".into());
        }
        Ok(MasterKey(keys))
    }

    /// The key file's text: one base64 key per line, the sealing key first.
    pub fn to_text(&self) -> String {
        self.0.iter().map(|k| format!("{}\n", B64.encode(k.as_slice()))).collect()
    }

    /// How many keys the ring holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: a ring holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ring `[new, self…]`: `new` seals, every key of `self` still opens.
    pub fn rotated_to(&self, new: &MasterKey) -> MasterKey {
        MasterKey(new.0.iter().take(1).chain(self.0.iter()).cloned().collect())
    }

    /// The sealing key alone (what is left once nothing is sealed under the others).
    pub fn primary(&self) -> MasterKey {
        MasterKey(self.0.iter().take(1).cloned().collect())
    }

    /// Seals `secret` for key `key_id` under the first key: base64(nonce ‖ ciphertext ‖ tag).
    pub fn seal(&self, key_id: &str, secret: &Secret) -> Result<String, getrandom::Error> {
        let nonce = Nonce::from(random_bytes::<12>()?);
        let ct = match self.0.first() {
            Some(k) => Aes256Gcm::new(k)
                .encrypt(&nonce, Payload { msg: secret.expose().as_bytes(), aad: key_id.as_bytes() })
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(B64.encode(out))
    }

    /// Opens a value made by [`MasterKey::seal`] for the same key id, with whichever key
    /// of the ring sealed it.
    pub fn open(&self, key_id: &str, sealed: &str) -> Result<Secret, OpenError> {
        let raw = B64.decode(sealed.trim()).map_err(|_| OpenError)?;
        if raw.len() < 12 + 16 {
            return Err(OpenError);
        }
        let (nonce, ct) = raw.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| OpenError)?;
        let plain = self
            .0
            .iter()
            .find_map(|k| {
                Aes256Gcm::new(k).decrypt(&Nonce::from(nonce), Payload { msg: ct, aad: key_id.as_bytes() }).ok()
            })
            .ok_or(OpenError)?;
        String::from_utf8(plain).map(Secret).map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// an admin token has its own prefix, the same length and checksum; an API token is no
    /// admin token and the other way round
    #[test]
    fn admin_tokens_carry_a_checksum() {
        let t = new_admin_token().unwrap();
        let s = t.expose();
        assert!(s.starts_with("gha_") && s.len() == TOKEN_LEN, "{s}");
        assert!(is_well_formed_admin_token(s));
        assert!(!is_well_formed_token(s));
        assert!(!is_well_formed_admin_token(new_token().unwrap().expose()));
        let mut flipped = s.as_bytes().to_vec();
        flipped[10] = if flipped[10] == b'a' { b'b' } else { b'a' };
        assert!(!is_well_formed_admin_token(std::str::from_utf8(&flipped).unwrap()));
    }

    /// a new token is well formed, 53 characters, and any single change breaks its checksum
    #[test]
    fn tokens_carry_a_checksum() {
        let t = new_token().unwrap();
        let t = t.expose();
        assert_eq!(t.len(), TOKEN_LEN);
        assert!(t.starts_with("ghk_"));
        assert!(is_well_formed_token(t));
        let mut flipped = t.as_bytes().to_vec();
        flipped[10] = if flipped[10] == b'a' { b'b' } else { b'a' };
        assert!(!is_well_formed_token(std::str::from_utf8(&flipped).unwrap()));
        assert!(!is_well_formed_token(&t[..TOKEN_LEN - 1]));
        assert!(!is_well_formed_token("ghk_nope"));
    }

    /// key ids are valid ids (docs/concepts.md)
    #[test]
    fn key_ids_fit_the_id_alphabet() {
        let id = new_key_id("hk_").unwrap();
        assert_eq!(id.len(), 28);
        assert!(crate::credentials::snapshot::is_valid_id(&id), "{id}");
    }

    /// two tokens never repeat (entropy comes from the OS)
    #[test]
    fn tokens_are_random() {
        assert_ne!(new_token().unwrap(), new_token().unwrap());
    }

    /// the hint shows the prefix and last four characters only
    #[test]
    fn hint_hides_the_token() {
        assert_eq!(token_hint("ghk_abcdefghijkl1234"), "ghk_…1234");
    }

    /// seal/open round-trips; another key id or master key cannot open it
    #[test]
    fn sealing_binds_key_id_and_master_key() {
        let mk = MasterKey::generate().unwrap();
        let s = new_hmac_secret().unwrap();
        let sealed = mk.seal("hk_1", &s).unwrap();
        assert!(!sealed.contains(s.expose()));
        assert_eq!(mk.open("hk_1", &sealed).unwrap(), s);
        assert!(mk.open("hk_2", &sealed).is_err());
        assert!(MasterKey::generate().unwrap().open("hk_1", &sealed).is_err());
        let text = mk.to_text();
        assert_eq!(MasterKey::from_text(&text).unwrap().open("hk_1", &sealed).unwrap(), s);
    }

    /// Debug never shows a secret
    #[test]
    fn debug_is_redacted() {
        let s = new_token().unwrap();
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(!format!("{:?}", MasterKey::generate().unwrap()).contains('='));
    }

    /// a ring seals with its first key and opens with any; its text round-trips
    #[test]
    fn a_ring_seals_with_the_first_key_and_opens_with_any() {
        let old = MasterKey::generate().unwrap();
        let new = MasterKey::generate().unwrap();
        let s = new_hmac_secret().unwrap();
        let under_old = old.seal("hk_1", &s).unwrap();
        let ring = old.rotated_to(&new);
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.open("hk_1", &under_old).unwrap(), s);
        let under_ring = ring.seal("hk_1", &s).unwrap();
        assert_eq!(new.open("hk_1", &under_ring).unwrap(), s);
        assert!(old.open("hk_1", &under_ring).is_err());
        assert!(ring.primary().open("hk_1", &under_old).is_err());
        let text = ring.to_text();
        assert_eq!(text.lines().count(), 2);
        assert_eq!(
            MasterKey::from_text(&format!("# rotating\n{text}\n")).unwrap().open("hk_1", &under_old).unwrap(),
            s
        );
        assert!(MasterKey::from_text("\n# nothing\n").is_err());
        assert!(MasterKey::from_text(&format!("{text}bm90IGEga2V5\n")).unwrap_err().starts_with("line 3:"));
    }
}
