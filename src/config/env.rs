//! `${VAR}` expansion for config values, read through a seam so tests never touch the
//! process environment.

use std::collections::HashMap;

/// Where `${VAR}` values come from.
pub trait Env {
    /// The variable's value, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Replaces every `${NAME}` in `s`. `$$` is a literal `$`. An unset variable is an error
/// (a silently empty credential header would be worse than refusing to start).
pub fn expand(s: &str, env: &dyn Env) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail.find('}').ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
            let name = &tail[..end];
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(format!("invalid variable name {name:?}"));
            }
            let value = env.var(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> HashMap<String, String> {
        HashMap::from([("TOKEN".to_string(), "s3cret".to_string())])
    }

    /// `${VAR}` is replaced; text around it is kept
    #[test]
    fn expands_set_variables() {
        assert_eq!(expand("Bearer ${TOKEN}", &env()).unwrap(), "Bearer s3cret");
        assert_eq!(expand("${TOKEN}${TOKEN}", &env()).unwrap(), "s3crets3cret");
        assert_eq!(expand("no vars", &env()).unwrap(), "no vars");
    }

    /// `$$` escapes, a lone `$` stays
    #[test]
    fn dollar_escapes() {
        assert_eq!(expand("cost $$5 $x", &env()).unwrap(), "cost $5 $x");
    }

    /// an unset variable, a bad name or a missing brace is an error naming it
    #[test]
    fn unset_or_malformed_is_an_error() {
        assert!(expand("${MISSING}", &env()).unwrap_err().contains("MISSING is not set"));
        assert!(expand("${1A}", &env()).is_err());
        assert!(expand("${TOKEN", &env()).unwrap_err().contains("unterminated"));
    }
}
