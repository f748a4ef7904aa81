//! \[authorize\] Whether the caller may make this request (docs/authorization.md: "permission", "proxied
//! user").
//!
//! The only way to obtain a [`Permit`], and `rewrite` needs one to build the upstream
//! request: "forwarded without a decision" cannot be written. Rules are matched against
//! the normalised path, which is also the path forwarded.

use crate::credentials::rules;
use crate::credentials::snapshot::{Role, User, is_valid_id};
use crate::pipeline::authn::Caller;
use crate::pipeline::error::{BadRequest, Denial, GateError};
use crate::pipeline::request::Parsed;
use crate::wire::headers::X_PROXIED_USER;
use http::{HeaderValue, Method};
use std::sync::Arc;

/// Proof that a request was authorised. Its fields are private to this module.
#[derive(Debug)]
pub struct Permit {
    caller: Caller,
    proxied_user: Option<HeaderValue>,
    granted_by: Option<Grant>,
}

/// The role rule that granted a request (for the log and audit record).
#[derive(Debug, Clone)]
pub struct Grant {
    role: Arc<Role>,
    rule: usize,
}

impl Grant {
    /// `role: METHODS PATTERN`.
    pub fn describe(&self) -> String {
        let rule = self.role.rules.get(self.rule).map_or("", |r| r.as_str());
        format!("{}: {rule}", self.role.name)
    }
}

impl Permit {
    /// Who the request was authorised for.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The user the caller acts for, when it sent an accepted `X-Proxied-User`.
    pub fn proxied_user(&self) -> Option<&HeaderValue> {
        self.proxied_user.as_ref()
    }

    /// The rule that granted it (none for anonymous requests).
    pub fn granted_by(&self) -> Option<&Grant> {
        self.granted_by.as_ref()
    }
}

/// The first role rule that allows `method` on `path`, if the user's allowed endpoints
/// (when it has any) allow it too. A user with no roles is permitted nothing.
pub fn permits(user: &User, method: &Method, path: &str) -> Option<Grant> {
    // Split once; every rule then compares segments by index.
    let segments = rules::split(path);
    let grant = user.roles.iter().find_map(|role| {
        let rule = role.rules.iter().position(|r| r.matches_split(method, &segments))?;
        Some(Grant { role: role.clone(), rule })
    })?;
    let allowed =
        user.allowed_endpoints.is_empty() || user.allowed_endpoints.iter().any(|r| r.matches_split(method, &segments));
    allowed.then_some(grant)
}

/// Authorises `caller` for `parsed`.
pub fn authorize(caller: Caller, parsed: &Parsed) -> Result<Permit, GateError> {
    let proxied = proxied_user(parsed)?;
    let Caller::User(identity) = &caller else {
        // Anonymous callers act for nobody.
        if proxied.is_some() {
            return Err(GateError::Forbidden(Denial::ProxiedAnonymous));
        }
        return Ok(Permit { caller, proxied_user: None, granted_by: None });
    };
    let user = &identity.key.user;
    let grant = permits(user, &parsed.parts.method, parsed.path()).ok_or(GateError::Forbidden(Denial::NotGranted))?;
    if let Some((id, value)) = &proxied {
        if !user.allow_proxied_users {
            return Err(GateError::Forbidden(Denial::ProxiedNotAllowed));
        }
        if !user.allowed_proxied_users.is_empty() && !user.allowed_proxied_users.contains(*id) {
            return Err(GateError::Forbidden(Denial::ProxiedNotListed));
        }
        return Ok(Permit { caller, proxied_user: Some((*value).clone()), granted_by: Some(grant) });
    }
    Ok(Permit { caller, proxied_user: None, granted_by: Some(grant) })
}

/// The one `X-Proxied-User`, checked to be a valid user id (docs/concepts.md: the id alphabet, ≤ 64).
fn proxied_user(parsed: &Parsed) -> Result<Option<(&str, &HeaderValue)>, GateError> {
    let mut all = parsed.parts.headers.get_all(X_PROXIED_USER).iter();
    let Some(v) = all.next() else { return Ok(None) };
    let bad = GateError::BadRequest(BadRequest::ProxiedUser);
    if all.next().is_some() {
        return Err(bad);
    }
    let id = v.to_str().map_err(|_| bad)?;
    if !is_valid_id(id) {
        return Err(bad);
    }
    Ok(Some((id, v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::file::{AuthMethod, Status};
    use crate::credentials::rules::Rule;
    use crate::credentials::snapshot::UserHeaders;
    use std::collections::HashSet;

    fn user(roles: &[&[&str]], allowed: &[&str]) -> User {
        let roles = roles
            .iter()
            .enumerate()
            .map(|(i, rules)| {
                Arc::new(Role {
                    name: format!("r{i}"),
                    rules: rules.iter().map(|r| r.parse::<Rule>().unwrap()).collect(),
                })
            })
            .collect();
        let h = HeaderValue::from_static("x");
        User {
            id: "u".into(),
            organization: String::new(),
            teams: vec![],
            roles,
            status: Status::Active,
            auth_method: AuthMethod::ApiKey,
            allowed_endpoints: allowed.iter().map(|r| r.parse().unwrap()).collect(),
            allow_proxied_users: false,
            allowed_proxied_users: HashSet::new(),
            headers: UserHeaders { user: h.clone(), org: h.clone(), teams: h.clone(), roles: h },
        }
    }

    /// permitted = some role grants it AND (allowed_endpoints empty OR one matches)
    #[test]
    fn roles_and_allowed_endpoints_intersect() {
        let u = user(&[&["GET /api/v1/orders/**"], &["POST /api/v1/orders"]], &[]);
        assert!(permits(&u, &Method::GET, "/api/v1/orders/1").is_some());
        assert!(permits(&u, &Method::POST, "/api/v1/orders").is_some());
        assert!(permits(&u, &Method::POST, "/api/v1/orders/1").is_none(), "POST only granted on the collection");
        assert!(permits(&u, &Method::GET, "/api/v1/accounts").is_none());
        let narrowed = user(&[&["* /api/**"]], &["GET /api/v1/orders/*"]);
        assert!(permits(&narrowed, &Method::GET, "/api/v1/orders/7").is_some());
        assert!(permits(&narrowed, &Method::GET, "/api/v1/accounts/7").is_none(), "role allows, endpoints do not");
    }

    /// a user with no roles is permitted nothing, even with allowed endpoints
    #[test]
    fn no_roles_no_permission() {
        assert!(permits(&user(&[], &["* /**"]), &Method::GET, "/").is_none());
    }

    /// the grant names the role and rule that allowed the request
    #[test]
    fn grant_names_role_and_rule() {
        let u = user(&[&["GET /a", "GET /b/**"]], &[]);
        assert_eq!(permits(&u, &Method::GET, "/b/c").unwrap().describe(), "r0: GET /b/**");
    }
}
