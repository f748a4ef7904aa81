//! The `METHODS PATH-PATTERN` rule grammar (docs/concepts.md): parsed once when a snapshot is
//! built, matched per request against the normalised path.
//!
//! `GET /api/v1/accounts/**`, `GET,POST /api/v1/orders/*`, `* /public/**`. `*` matches
//! exactly one non-empty segment; `**`, only as the last segment, matches zero or more.
//! Literal segments match case-sensitively and must already be in canonical form (the
//! form `path::normalise` produces), so a rule can never be written that no request
//! path could match.

use http::Method;
use std::fmt;
use std::str::FromStr;

/// One compiled rule.
#[derive(Clone, PartialEq, Eq)]
pub struct Rule {
    methods: Methods,
    segments: Box<[Segment]>,
    text: Box<str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Methods {
    Any,
    List(Box<[Method]>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    One,
    Rest,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rule({:?})", self.text)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Rule, String> {
        let text = s.split_whitespace().collect::<Vec<_>>();
        let [methods, pattern] = text.as_slice() else {
            return Err(format!("rule {s:?} must be `METHODS PATH-PATTERN`, e.g. `GET /api/v1/orders/**`"));
        };
        let methods = if *methods == "*" {
            Methods::Any
        } else {
            let list = methods
                .split(',')
                .map(|m| {
                    let m = m.trim().to_ascii_uppercase();
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                        return Err(format!("rule {s:?}: {m:?} is not an HTTP method"));
                    }
                    Method::from_bytes(m.as_bytes()).map_err(|_| format!("rule {s:?}: {m:?} is not an HTTP method"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Methods::List(list.into())
        };
        let Some(rest) = pattern.strip_prefix('/') else {
            return Err(format!("rule {s:?}: the path pattern must start with '/'"));
        };
        let parts: Vec<&str> = if rest.is_empty() { vec![] } else { rest.split('/').collect() };
        let last = parts.len().saturating_sub(1);
        let mut segments = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            segments.push(match *p {
                "**" if i == last => Segment::Rest,
                "**" => return Err(format!("rule {s:?}: `**` is only allowed as the last segment")),
                "*" => Segment::One,
                "" if i == last => Segment::Literal("".into()),
                "" => return Err(format!("rule {s:?}: empty path segment (`//`)")),
                "." | ".." => return Err(format!("rule {s:?}: `.` and `..` segments never match a normalised path")),
                lit => {
                    let canonical = crate::wire::path::normalise(&format!("/{lit}")).ok().is_some_and(|n| n == format!("/{lit}"));
                    if lit.contains('*') || !canonical {
                        return Err(format!(
                            "rule {s:?}: segment {lit:?} is not a plain path segment (write it as requests arrive after normalisation; `*` only as a whole segment)"
                        ));
                    }
                    Segment::Literal(lit.into())
                }
            });
        }
        Ok(Rule { methods, segments: segments.into(), text: format!("{} {}", text[0], text[1]).into() })
    }
}

/// A normalised path split into its segments once, to be matched against many rules.
pub fn split(path: &str) -> Vec<&str> {
    match path.strip_prefix('/') {
        Some("") | None => Vec::new(),
        Some(rest) => rest.split('/').collect(),
    }
}

impl Rule {
    /// True when the rule allows `method` on the normalised `path`.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        path.starts_with('/') && self.matches_split(method, &split(path))
    }

    /// [`Rule::matches`] for a path already [`split`].
    pub fn matches_split(&self, method: &Method, segments: &[&str]) -> bool {
        let method_ok = match &self.methods {
            Methods::Any => true,
            Methods::List(list) => list.iter().any(|m| m == method),
        };
        method_ok && self.matches_segments(segments)
    }

    fn matches_segments(&self, parts: &[&str]) -> bool {
        for (i, seg) in self.segments.iter().enumerate() {
            match (seg, parts.get(i)) {
                (Segment::Rest, _) => return true,
                (Segment::One, Some(p)) if !p.is_empty() => {}
                (Segment::Literal(l), Some(p)) if *p == &**l => {}
                _ => return false,
            }
        }
        parts.len() == self.segments.len()
    }

    /// The rule as written (normalised whitespace).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Rule {
        s.parse().unwrap()
    }

    /// `**` as the last segment matches zero or more segments
    #[test]
    fn double_star_matches_any_depth() {
        let rule = r("GET /api/v1/orders/**");
        for p in ["/api/v1/orders", "/api/v1/orders/", "/api/v1/orders/1", "/api/v1/orders/1/items/2"] {
            assert!(rule.matches(&Method::GET, p), "{p}");
        }
        for p in ["/api/v1/order", "/api/v1/ordersx", "/api/v1", "/api/v1/accounts/1"] {
            assert!(!rule.matches(&Method::GET, p), "{p}");
        }
    }

    /// `*` matches exactly one non-empty segment
    #[test]
    fn single_star_matches_one_segment() {
        let rule = r("GET,POST /api/v1/orders/*");
        assert!(rule.matches(&Method::POST, "/api/v1/orders/42"));
        assert!(!rule.matches(&Method::GET, "/api/v1/orders"));
        assert!(!rule.matches(&Method::GET, "/api/v1/orders/"));
        assert!(!rule.matches(&Method::GET, "/api/v1/orders/42/items"));
        assert!(!rule.matches(&Method::DELETE, "/api/v1/orders/42"));
    }

    /// methods: a comma list, case-insensitive in the rule, or `*` for any
    #[test]
    fn methods() {
        assert!(r("get /x").matches(&Method::GET, "/x"));
        assert!(!r("GET /x").matches(&Method::POST, "/x"));
        assert!(r("* /public/**").matches(&Method::PATCH, "/public/a"));
        assert!(r("* /**").matches(&Method::GET, "/"));
    }

    /// literal segments are case-sensitive and exact
    #[test]
    fn literals_are_case_sensitive() {
        assert!(!r("GET /API/**").matches(&Method::GET, "/api/x"));
        assert!(r("GET /a/b").matches(&Method::GET, "/a/b"));
        assert!(!r("GET /a/b").matches(&Method::GET, "/a/b/"));
        assert!(r("GET /a/b/").matches(&Method::GET, "/a/b/"));
    }

    /// malformed rules are refused with a reason
    #[test]
    fn malformed_rules_are_refused() {
        for bad in [
            "GET",
            "GET api/x",
            "GET /a/**/b",
            "GE T /x",
            "GET /a//b",
            "GET /a/../b",
            "GET /a/b*",
            "GET /a/%2e",
            "G3T /x",
            "GET /x extra",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }

    mod property {
        use super::*;
        use crate::wire::path::normalise;
        use proptest::prelude::*;

        /// Segments an attacker would try, plus random short ones.
        fn segment() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("api".to_string()),
                Just("v1".to_string()),
                Just("orders".to_string()),
                Just("accounts".to_string()),
                Just("..".to_string()),
                Just(".".to_string()),
                Just(String::new()),
                Just("%2e%2e".to_string()),
                Just("%2E%2E".to_string()),
                Just(".%2e".to_string()),
                Just("..%2f".to_string()),
                Just("..%5c".to_string()),
                Just("..;".to_string()),
                Just("%252e%252e".to_string()),
                Just("orders%2F..".to_string()),
                Just("%6Frders".to_string()),
                "[a-z.%;\\\\0-9A-F]{0,5}",
            ]
        }

        /// a path the matcher allows, after normalisation, always lies under the rule's
        /// prefix; it is canonical (normalising it again changes nothing), and decoding it
        /// once more cannot step out of the prefix either. The runner counts allowed cases,
        /// so the property cannot pass by never matching.
        #[test]
        fn allowed_paths_stay_under_the_rule_prefix() {
            let rule: Rule = "GET /api/v1/orders/**".parse().unwrap();
            let prefixes =
                prop_oneof![Just("/api/v1/orders"), Just("/api/v1"), Just("/api"), Just(""), Just("/api/v1/orders/7")];
            let strategy = (prefixes, proptest::collection::vec(segment(), 0..8));
            let mut runner =
                proptest::test_runner::TestRunner::new(ProptestConfig { cases: 6_000, ..ProptestConfig::default() });
            let allowed = std::cell::Cell::new(0u32);
            runner
                .run(&strategy, |(prefix, segs)| {
                    let raw = format!("{prefix}/{}", segs.join("/"));
                    if let Ok(n) = normalise(&raw)
                        && rule.matches(&Method::GET, &n)
                    {
                        allowed.set(allowed.get() + 1);
                        prop_assert!(n == "/api/v1/orders" || n.starts_with("/api/v1/orders/"), "{raw} -> {n}");
                        prop_assert_eq!(normalise(&n).unwrap(), n.clone());
                        let decoded = percent_encoding::percent_decode_str(&n).decode_utf8_lossy().into_owned();
                        prop_assert!(decoded.starts_with("/api/v1/orders"), "{raw} -> {n} -> {decoded}");
                        prop_assert!(!decoded.split('/').any(|s| s == ".." || s == "."), "{raw} -> {n} -> {decoded}");
                    }
                    Ok(())
                })
                .unwrap();
            assert!(allowed.get() > 600, "only {} generated paths were allowed", allowed.get());
        }
    }
}
