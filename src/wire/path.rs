//! Request-path normalisation: the path that is routed, authorised and forwarded is one
//! and the same canonical string (docs/identity-headers.md).
//!
//! Percent-encoded unreserved characters are decoded, `.` and `..` segments resolved,
//! empty segments (`//`) merged, and every other byte that is not a plain path character
//! re-encoded in upper-case hex. What cannot be made unambiguous is refused: an encoded
//! `/` or `\` (backends disagree on whether it splits a segment), `..` above the root,
//! NUL and control characters, invalid UTF-8, a `%` that is not an escape, double
//! encoding (`%252e`: a backend that decodes twice would see `.`), a raw `\` (some
//! backends read it as `/`), and `;` (Tomcat-style path parameters turn `..;` into `..`).

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsafe;

/// Normalises an origin-form path (no query). Returns the input unchanged, without
/// allocating, when it is already canonical (the common case).
pub fn normalise(raw: &str) -> Result<Cow<'_, str>, Unsafe> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(Unsafe);
    }
    if is_canonical(b) {
        return Ok(Cow::Borrowed(raw));
    }
    let mut segments: Vec<String> = Vec::new();
    let mut trailing_slash = false;
    for part in raw[1..].split('/') {
        let seg = decode_segment(part)?;
        // Only the last segment decides the trailing slash: `/a/b/` and `/a/b/.` keep it.
        trailing_slash = matches!(seg.as_str(), "" | "." | "..");
        match seg.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop().ok_or(Unsafe)?;
            }
            _ => segments.push(seg),
        }
    }
    let mut out = String::with_capacity(raw.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// True when every byte is a plain path character and no segment is empty, `.` or `..`.
fn is_canonical(b: &[u8]) -> bool {
    let mut prev_slash = false;
    for (i, &c) in b.iter().enumerate() {
        if !is_plain(c) && c != b'/' {
            return false;
        }
        if c == b'/' {
            if prev_slash {
                return false;
            }
            prev_slash = true;
        } else {
            if c == b'.' && prev_slash {
                // `/.` starting a segment: `.` or `..` segments need the slow path.
                let rest = &b[i..];
                let seg_end = rest.iter().position(|&x| x == b'/').unwrap_or(rest.len());
                if matches!(&rest[..seg_end], b"." | b"..") {
                    return false;
                }
            }
            prev_slash = false;
        }
    }
    true
}

/// Characters that stand for themselves in a canonical path: RFC 3986 `pchar` minus `%`
/// and `;`.
fn is_plain(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&c)
}

/// Decodes one segment and re-encodes it canonically.
fn decode_segment(part: &str) -> Result<String, Unsafe> {
    let b = part.as_bytes();
    let mut bytes = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let hi = b.get(i + 1).and_then(|&h| (h as char).to_digit(16)).ok_or(Unsafe)?;
            let lo = b.get(i + 2).and_then(|&h| (h as char).to_digit(16)).ok_or(Unsafe)?;
            bytes.push((hi * 16 + lo) as u8);
            i += 3;
        } else if c == b'\\' || c == b';' || c < 0x20 || c == 0x7f {
            return Err(Unsafe);
        } else {
            bytes.push(c);
            i += 1;
        }
    }
    let s = String::from_utf8(bytes).map_err(|_| Unsafe)?;
    if s.contains(['/', '\\', ';', '\0']) || s.chars().any(char::is_control) || has_escape(&s) {
        return Err(Unsafe);
    }
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if is_plain(c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    Ok(out)
}

/// A decoded segment that still holds `%XX` was encoded twice.
fn has_escape(s: &str) -> bool {
    s.as_bytes().windows(3).any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Result<String, Unsafe> {
        normalise(s).map(|c| c.into_owned())
    }

    /// canonical paths are returned borrowed, unchanged
    #[test]
    fn canonical_paths_pass_through_without_allocating() {
        for p in ["/", "/api/v1/orders", "/api/v1/orders/", "/a/b.json", "/a/..b/.c", "/~user/x@y:z"] {
            assert!(matches!(normalise(p), Ok(Cow::Borrowed(x)) if x == p), "{p}");
        }
    }

    /// dot segments resolve and `//` merges
    #[test]
    fn dot_segments_and_empty_segments_resolve() {
        assert_eq!(n("/api/v1/orders/../accounts").unwrap(), "/api/v1/accounts");
        assert_eq!(n("/api//v1///orders").unwrap(), "/api/v1/orders");
        assert_eq!(n("/api/./v1/./orders").unwrap(), "/api/v1/orders");
        assert_eq!(n("/api/v1/..").unwrap(), "/api/");
        assert_eq!(n("/api/v1/.").unwrap(), "/api/v1/");
        assert_eq!(n("//").unwrap(), "/");
    }

    /// encoded dots are decoded before dot segments are resolved
    #[test]
    fn encoded_dots_are_resolved() {
        assert_eq!(n("/api/v1/orders/%2e%2e/accounts").unwrap(), "/api/v1/accounts");
        assert_eq!(n("/api/v1/orders/%2E%2E/accounts").unwrap(), "/api/v1/accounts");
        assert_eq!(n("/api/v1/orders/.%2e/accounts").unwrap(), "/api/v1/accounts");
        assert_eq!(n("/a/%7Euser/%41").unwrap(), "/a/~user/A");
    }

    /// what cannot be normalised safely is refused
    #[test]
    fn ambiguous_paths_are_refused() {
        for p in [
            "/api/v1/orders/..%2faccounts",
            "/api/v1/orders/..%5caccounts",
            "/api/v1/orders/..;/accounts",
            "/api/v1/orders/%252e%252e/accounts",
            "/a/%00",
            "/a/%ff",
            "/a/%zz",
            "/a/%2",
            "/..",
            "/a/../..",
            "/a\\b",
            "relative",
            "",
        ] {
            assert_eq!(n(p), Err(Unsafe), "{p}");
        }
    }

    /// non-ASCII and reserved bytes are re-encoded in upper-case hex, identically each time
    #[test]
    fn reencoding_is_canonical() {
        assert_eq!(n("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
        assert_eq!(n(&n("/x/%2e/y%3f").unwrap()).unwrap(), "/x/y%3F");
    }
}
