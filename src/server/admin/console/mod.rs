//! The web console (docs/console.md): server-rendered pages under `/ui/` on the admin
//! listener, for the people who manage API users.
//!
//! It is another front end to the admin API, not a second implementation: every read and
//! every change is an `/admin/v1` call made through `api::run` with the signed-in admin
//! token as caller, so roles, validation, the store's lock or transaction, and the audit
//! record are decided in one place. What this module adds is the browser's side of
//! security:
//! - sign-in with an admin token → a server-side session (`session.rs`); the cookie is
//!   `HttpOnly`, `SameSite=Strict`, `Path=/ui`; the token behind it is asked about on every
//!   request, so revoking or expiring it ends its sessions;
//! - every POST carries the session's CSRF token and an `Origin` naming this host, else
//!   403 and nothing changes;
//! - every page is sent with a strict Content-Security-Policy (scripts from `/ui/static/`
//!   only, no inline script or style), `X-Frame-Options: DENY` and `no-store`; every value
//!   from a user is escaped by the templates (maud escapes whatever it interpolates).

mod pages;
pub mod session;
pub mod traffic;

use super::api::{self, ApiError, Call};
use super::caller::{Caller, Refusal};
use super::{Admin, Peer};
use crate::credentials::admin_tokens::AdminRole;
use crate::pipeline::history;
use crate::shared::HistoryWindow;
use crate::wire::body::Body;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use maud::Markup;
use serde_json::{Value, json};
use session::Session;
use sha2::{Digest, Sha256};
use std::net::IpAddr;

pub use session::Sessions;
pub use traffic::Traffic;

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");
const ICON: &str = include_str!("favicon.svg");

/// Largest form body accepted (a role's rules, a user's endpoints).
const MAX_FORM: usize = 64 << 10;

/// What the pages of a signed-in request know.
pub(super) struct Ctx<'a> {
    admin: &'a Admin,
    caller: Caller,
    session: Session,
    /// The session cookie's value (the session's id), for its one-time values.
    cookie: String,
    peer: Option<IpAddr>,
}

impl Ctx<'_> {
    /// Whether the caller's role allows `role`'s actions.
    fn may(&self, role: AdminRole) -> bool {
        self.caller.role >= role
    }

    /// Why write controls are off: the caller's role, or a store that cannot be written.
    fn write_block(&self, role: AdminRole) -> Option<String> {
        if !self.may(role) {
            return Some(format!(
                "Your admin token ({}) has role {}; changes need {}.",
                self.caller.name,
                self.caller.role.as_str(),
                role.as_str()
            ));
        }
        self.admin.read_only.reason(self.admin).map(|r| format!("The credential store is read-only here: {r}"))
    }

    /// Runs one admin API call as the signed-in token; its result and `ETag`.
    async fn call(&self, call: Call) -> Result<(Value, Option<String>), ApiError> {
        let mut etag = None;
        let (_, v) = api::run(self.admin, &call, &self.caller, &mut etag).await?;
        Ok((v, etag))
    }

    async fn get(&self, path: &str, query: &str) -> Result<Value, ApiError> {
        self.call(Call::get(path, query, self.peer)).await.map(|(v, _)| v)
    }

    /// A read and the `ETag` of what it read (a user, the roles).
    async fn get_tagged(&self, path: &str) -> Result<(Value, Option<String>), ApiError> {
        self.call(Call::get(path, "", self.peer)).await
    }

    async fn send(&self, method: Method, path: &str, body: Value) -> Result<Value, ApiError> {
        self.send_if(method, path, body, None).await
    }

    /// A change made only if what it changes still has the `ETag` `if_match` (else 412:
    /// somebody changed it since the form was shown).
    async fn send_if(
        &self,
        method: Method,
        path: &str,
        body: Value,
        if_match: Option<&str>,
    ) -> Result<Value, ApiError> {
        let mut call = Call::with(method, path, body, self.peer);
        call.if_match = if_match.filter(|t| !t.is_empty()).map(String::from);
        self.call(call).await.map(|(v, _)| v)
    }
}

/// Whether the credentials file can be written here, asked at most every few seconds
/// (the answer takes a temporary file beside it), off the runtime's worker threads.
#[derive(Debug, Default)]
pub struct ReadOnlyProbe(std::sync::Mutex<Option<(std::time::Instant, Option<String>)>>);

impl ReadOnlyProbe {
    const FRESH: std::time::Duration = std::time::Duration::from_secs(5);

    fn reason(&self, admin: &Admin) -> Option<String> {
        if let Ok(cached) = self.0.lock()
            && let Some((at, reason)) = cached.as_ref()
            && at.elapsed() < Self::FRESH
        {
            return reason.clone();
        }
        let reason = admin.store.as_ref().and_then(|s| api::blocking(|| s.read_only_reason()));
        if let Ok(mut cached) = self.0.lock() {
            *cached = Some((std::time::Instant::now(), reason.clone()));
        }
        reason
    }
}

/// Serves one `/ui` request.
pub async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Body> {
    let mut res = serve(admin, req).await;
    harden(res.headers_mut());
    res
}

/// The headers every console response carries: no framing, no inline or foreign script,
/// no caching of pages that hold secrets or personal data.
fn harden(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Not `no-referrer`: under it Chromium sends `Origin: null` with the console's own
    // form posts, which the origin check must then refuse.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
}

async fn serve(admin: &Admin, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    match (method.clone(), path.as_str()) {
        (Method::GET, "/ui/static/console.css") => return asset(CSS, "text/css; charset=utf-8"),
        (Method::GET, "/ui/static/console.js") => return asset(JS, "text/javascript; charset=utf-8"),
        (Method::GET, "/ui/static/favicon.svg") => return asset(ICON, "image/svg+xml"),
        (Method::GET, "/ui") => return redirect("/ui/"),
        _ => {}
    }
    let cookie = session_cookie(req.headers());
    let same_origin = same_origin(req.headers());
    let form = if method == Method::POST {
        match read_form(req).await {
            Ok(f) => f,
            Err(res) => return res,
        }
    } else {
        Form::default()
    };
    if path == "/ui/sign-in" {
        return match method {
            Method::GET => match cookie.as_deref().and_then(|c| admin.sessions.touch(c)) {
                Some(_) => redirect("/ui/"),
                None => html(StatusCode::OK, pages::sign_in(None)),
            },
            Method::POST if !same_origin => forbidden_post(),
            Method::POST => sign_in(admin, &form, peer).await,
            _ => not_found(),
        };
    }
    // Everything else needs a live session whose token is still live.
    let Some(session) = cookie.as_deref().and_then(|c| admin.sessions.touch(c)) else {
        if method == Method::POST {
            return html(
                StatusCode::FORBIDDEN,
                pages::message("Signed out", "Your session has ended; nothing was changed. Sign in again."),
            );
        }
        return redirect("/ui/sign-in");
    };
    let caller = match admin.caller_of(&session.token_digest, session.named) {
        Ok(Some(c)) => c,
        Ok(None) => {
            if let Some(c) = cookie.as_deref() {
                admin.sessions.end(c);
            }
            return redirect("/ui/sign-in");
        }
        Err(_) => return unavailable(),
    };
    if method == Method::POST && !(same_origin && form.get("csrf").is_some_and(|t| session.csrf_ok(t))) {
        tracing::warn!(path = %path, "console form refused: no CSRF token or another origin");
        return forbidden_post();
    }
    let Some(cookie) = cookie else { return redirect("/ui/sign-in") };
    let ctx = Ctx { admin, caller, session, cookie, peer };
    if (method.clone(), path.as_str()) == (Method::POST, "/ui/sign-out") {
        admin.sessions.end(&ctx.cookie);
        let mut res = redirect("/ui/sign-in");
        res.headers_mut().insert(
            header::SET_COOKIE,
            HeaderValue::from_static("gatehouse_console=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
        );
        return res;
    }
    let segs: Vec<String> = path
        .trim_start_matches("/ui")
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let q = Form::parse(query.as_bytes());
    match (method, segs.as_slice()) {
        (Method::GET, []) => overview(&ctx).await,
        (Method::GET, ["users"]) => users(&ctx, &q).await,
        (Method::GET, ["new-user"]) => match ctx.write_block(AdminRole::Operator) {
            Some(why) => html(StatusCode::FORBIDDEN, pages::refused(&ctx, &why)),
            None => user_form(&ctx, None, &Form::default(), None).await,
        },
        (Method::POST, ["users"]) => save_user(&ctx, None, &form).await,
        (Method::GET, ["users", id]) => user(&ctx, id, None).await,
        (Method::GET, ["users", id, "edit"]) => match ctx.write_block(AdminRole::Operator) {
            Some(why) => html(StatusCode::FORBIDDEN, pages::refused(&ctx, &why)),
            None => match ctx.get_tagged(&format!("/admin/v1/users/{}", enc(id))).await {
                Ok((u, etag)) => {
                    let mut form = Form::from_user(&u);
                    form.0.push(("etag".into(), etag.unwrap_or_default()));
                    user_form(&ctx, Some(&u), &form, None).await
                }
                Err(e) => error_page(&ctx, e),
            },
        },
        (Method::POST, ["users", id]) => save_user(&ctx, Some(id), &form).await,
        (Method::POST, ["users", id, "keys"]) => add_key(&ctx, id, &form).await,
        (Method::GET, ["users", id, "new-key"]) => new_key(&ctx, id).await,
        (Method::GET, ["users", id, "keys", key, "revoke"]) => confirm(&ctx, id, key, pages::confirm_revoke).await,
        (Method::POST, ["users", id, "keys", key, "revoke"]) => {
            let path = format!("/admin/v1/users/{}/keys/{}", enc(id), enc(key));
            match ctx.send(Method::DELETE, &path, Value::Null).await {
                Ok(_) => redirect(&format!("/ui/users/{}", enc(id))),
                Err(e) => error_page(&ctx, e),
            }
        }
        (Method::GET, ["users", id, "keys", key, "rotate"]) => confirm(&ctx, id, key, pages::confirm_rotate).await,
        (Method::POST, ["users", id, "keys", key, "rotate"]) => rotate_key(&ctx, id, key, &form).await,
        // An unknown action is 404 to whoever could act (a viewer is refused first).
        (Method::GET, ["users", _, "status", action])
            if pages::status_action(action).is_none() && ctx.write_block(AdminRole::Operator).is_none() =>
        {
            not_found()
        }
        (Method::GET, ["users", id, "status", action]) => confirm(&ctx, id, action, pages::confirm_status).await,
        (Method::POST, ["users", id, "status", action]) => {
            let Some((status, _, _)) = pages::status_action(action) else { return not_found() };
            match ctx.send(Method::PATCH, &format!("/admin/v1/users/{}", enc(id)), json!({"status": status})).await {
                Ok(_) => redirect(&format!("/ui/users/{}", enc(id))),
                Err(e) => error_page(&ctx, e),
            }
        }
        (Method::GET, ["roles"]) => roles(&ctx, None, &Form::default()).await,
        (Method::POST, ["roles"]) => save_role(&ctx, &form).await,
        (Method::POST, ["roles", name, "delete"]) => delete_role(&ctx, name, &form).await,
        (Method::GET, ["audit"]) => audit(&ctx, &q).await,
        _ => not_found(),
    }
}

/// What an id is percent-encoded with in a console path: everything but RFC 3986's
/// unreserved characters.
const PATH_SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// An id as one segment of a console path.
pub(super) fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, PATH_SEGMENT).to_string()
}

async fn sign_in(admin: &Admin, form: &Form, peer: Option<IpAddr>) -> Response<Body> {
    let token = form.get("token").unwrap_or("").trim();
    let ip = peer.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let caller = match admin.authenticate(token, ip) {
        Ok(c) => c,
        Err(Refusal::Invalid) => {
            let msg = "That admin token is not valid: wrong, expired or revoked.";
            return html(StatusCode::UNAUTHORIZED, pages::sign_in(Some(msg)));
        }
        Err(Refusal::Blocked(secs)) => {
            let msg = format!("Too many failed sign-ins from this address: try again in {secs} s.");
            let mut res = html(StatusCode::TOO_MANY_REQUESTS, pages::sign_in(Some(&msg)));
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return res;
        }
        Err(Refusal::Unavailable) => return unavailable(),
    };
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let Some(id) = admin.sessions.start(digest, crate::credentials::secrets::is_well_formed_admin_token(token)) else {
        return unavailable();
    };
    let client = peer.map(|p| p.to_string());
    let record = crate::pipeline::audit::AdminRecord::new("console", "console.sign_in", &caller.name, Value::Null)
        .by(client.as_deref(), caller.token_ref());
    admin.audit.send(&record);
    let mut res = redirect("/ui/");
    let cookie = format!(
        "{}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}",
        session::COOKIE,
        admin.sessions.lifetime().as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

async fn overview(ctx: &Ctx<'_>) -> Response<Body> {
    let users = match ctx.get("/admin/v1/users", "").await {
        Ok(u) => u,
        Err(e) => return error_page(ctx, e),
    };
    let usage = api::usage_now(ctx.admin).await.unwrap_or_default();
    let window = ctx.admin.traffic.last_hour(&ctx.admin.metrics);
    let now = crate::credentials::ops::now();
    let facts = pages::Facts::gather(&users, &usage, now, ctx.admin.key_rotation_age);
    html(StatusCode::OK, pages::overview(ctx, &window, &facts))
}

async fn users(ctx: &Ctx<'_>, q: &Form) -> Response<Body> {
    // Every user, filtered here: the search and the team filter are the console's own,
    // and a value typed into the form is compared as typed (no query string to escape).
    let list = match ctx.get("/admin/v1/users", "").await {
        Ok(v) => v,
        Err(e) => return error_page(ctx, e),
    };
    let usage = api::usage_now(ctx.admin).await.unwrap_or_default();
    let roles = ctx.get("/admin/v1/roles", "").await.unwrap_or_default();
    let now = crate::credentials::ops::now().unix_timestamp();
    // Only the shown users' keys, and only the last 24 hours (the page's one column): with
    // shared state each is a read from Redis.
    let ids: Vec<String> = pages::shown_users(&list, q)
        .into_iter()
        .flat_map(|u| u["keys"].as_array().into_iter().flatten())
        .filter_map(|k| k["id"].as_str().map(String::from))
        .collect();
    let window = HistoryWindow { hours: history::HOURS, days: 0 };
    // Like the totals above: while the shared state is away the page still lists the
    // users, with the counts it cannot read as 0.
    let history = api::history_now(ctx.admin, &ids, now, window).await.unwrap_or_default();
    let recent = |key: &str| history.last_24h(key, now);
    html(StatusCode::OK, pages::users(ctx, &list, &usage, &recent, &roles, q))
}

async fn user(ctx: &Ctx<'_>, id: &str, notice: Option<(StatusCode, Markup)>) -> Response<Body> {
    let (status, notice) = match notice {
        Some((status, n)) => (status, Some(n)),
        None => (StatusCode::OK, None),
    };
    let u = match ctx.get(&format!("/admin/v1/users/{}", enc(id)), "").await {
        Ok(u) => u,
        Err(e) => return error_page(ctx, e),
    };
    match ctx.get(&format!("/admin/v1/users/{}/usage", enc(id)), "").await {
        Ok(usage) => html(status, pages::user(ctx, &u, &usage, notice)),
        Err(e) => error_page(ctx, e),
    }
}

async fn user_form(
    ctx: &Ctx<'_>,
    existing: Option<&Value>,
    form: &Form,
    error: Option<(StatusCode, &str)>,
) -> Response<Body> {
    let roles = ctx.get("/admin/v1/roles", "").await.unwrap_or_default();
    let status = error.map_or(StatusCode::OK, |(s, _)| s);
    html(status, pages::user_form(ctx, existing, form, &roles, error.map(|(_, m)| m)))
}

/// Creates (`id` None) or updates a user from the form; on a refusal the form comes back
/// with the API's message and what was typed.
async fn save_user(ctx: &Ctx<'_>, id: Option<&str>, form: &Form) -> Response<Body> {
    let lines = |k: &str| -> Vec<String> {
        form.get(k).unwrap_or("").lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
    };
    let list = |k: &str| -> Vec<String> {
        form.get(k).unwrap_or("").split(',').map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
    };
    let mut body = json!({
        "display_name": form.get("display_name").unwrap_or(""),
        "description": form.get("description").unwrap_or(""),
        "organization": form.get("organization").unwrap_or(""),
        "teams": list("teams"),
        "roles": form.all("roles"),
        "allowed_endpoints": lines("allowed_endpoints"),
        "allow_proxied_users": form.get("allow_proxied_users") == Some("on"),
        "allowed_proxied_users": list("allowed_proxied_users"),
    });
    let result = match id {
        None => {
            body["id"] = form.get("id").unwrap_or("").trim().into();
            body["auth_method"] = form.get("auth_method").unwrap_or("").into();
            ctx.send(Method::POST, "/admin/v1/users", body).await
        }
        Some(id) => ctx.send_if(Method::PATCH, &format!("/admin/v1/users/{}", enc(id)), body, form.get("etag")).await,
    };
    match result {
        Ok(u) => redirect(&format!("/ui/users/{}", enc(u["id"].as_str().unwrap_or_default()))),
        Err(ApiError(StatusCode::FORBIDDEN, _, msg)) => html(StatusCode::FORBIDDEN, pages::refused(ctx, &msg)),
        Err(ApiError(status, _, msg)) => {
            let existing = match id {
                Some(id) => ctx.get(&format!("/admin/v1/users/{}", enc(id)), "").await.ok(),
                None => None,
            };
            user_form(ctx, existing.as_ref(), form, Some((status, &msg))).await
        }
    }
}

async fn add_key(ctx: &Ctx<'_>, id: &str, form: &Form) -> Response<Body> {
    let mut body = json!({"label": form.get("label").unwrap_or("").trim()});
    if let Some(days) = form.get("expires_in_days").map(str::trim).filter(|d| !d.is_empty()) {
        let Some(days) = days.parse::<i64>().ok().filter(|d| (1..=3650).contains(d)) else {
            let notice = pages::error_notice("Expires in: a whole number of days from 1 to 3650.");
            return user(ctx, id, Some((StatusCode::UNPROCESSABLE_ENTITY, notice))).await;
        };
        let at = crate::credentials::ops::now() + time::Duration::days(days);
        body["expires_at"] = at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default().into();
    }
    let result = ctx.send(Method::POST, &format!("/admin/v1/users/{}/keys", enc(id)), body).await;
    key_made(ctx, id, result).await
}

/// After a key was added (or rotated in): its secret is kept for the one page that shows
/// it, and the browser is sent there (a reload of that page cannot add another key).
async fn key_made(ctx: &Ctx<'_>, id: &str, result: Result<Value, ApiError>) -> Response<Body> {
    match result {
        Ok(v) => {
            ctx.admin.sessions.put_flash(&ctx.cookie, json!({"user": id, "added": v}));
            redirect(&format!("/ui/users/{}/new-key", enc(id)))
        }
        Err(ApiError(StatusCode::FORBIDDEN, _, msg)) => html(StatusCode::FORBIDDEN, pages::refused(ctx, &msg)),
        Err(ApiError(status, _, msg)) => user(ctx, id, Some((status, pages::error_notice(&msg)))).await,
    }
}

/// The page that shows a new key's token or secret: once.
async fn new_key(ctx: &Ctx<'_>, id: &str) -> Response<Body> {
    let flash = ctx.admin.sessions.take_flash(&ctx.cookie).filter(|f| f["user"] == id);
    let Some(flash) = flash else {
        return html(
            StatusCode::GONE,
            pages::refused(ctx, "This key's token or secret was shown already; it cannot be shown again."),
        );
    };
    let user = ctx.get(&format!("/admin/v1/users/{}", enc(id)), "").await.unwrap_or_default();
    html(StatusCode::OK, pages::key_shown(ctx, &user, &flash["added"]))
}

/// A confirmation page about user `id` (`page` of the user and `what`: a key, an action),
/// offered only to a caller who may make the change.
async fn confirm(ctx: &Ctx<'_>, id: &str, what: &str, page: fn(&Ctx<'_>, &Value, &str) -> Markup) -> Response<Body> {
    if let Some(why) = ctx.write_block(AdminRole::Operator) {
        return html(StatusCode::FORBIDDEN, pages::refused(ctx, &why));
    }
    match ctx.get(&format!("/admin/v1/users/{}", enc(id)), "").await {
        Ok(u) => html(StatusCode::OK, page(ctx, &u, what)),
        Err(e) => error_page(ctx, e),
    }
}

/// Grace periods the rotate page offers, in seconds.
const GRACES: [i64; 4] = [0, 3600, 86_400, 7 * 86_400];

async fn rotate_key(ctx: &Ctx<'_>, id: &str, key: &str, form: &Form) -> Response<Body> {
    let grace = form.get("grace").and_then(|g| g.parse::<i64>().ok()).filter(|g| GRACES.contains(g)).unwrap_or(0);
    let body = json!({"label": form.get("label").unwrap_or("").trim(), "grace_seconds": grace});
    let path = format!("/admin/v1/users/{}/keys/{}/rotate", enc(id), enc(key));
    let result = ctx.send(Method::POST, &path, body).await;
    key_made(ctx, id, result).await
}

async fn roles(ctx: &Ctx<'_>, error: Option<(StatusCode, &str)>, form: &Form) -> Response<Body> {
    match ctx.get_tagged("/admin/v1/roles").await {
        Ok((r, etag)) => {
            let status = error.map_or(StatusCode::OK, |(s, _)| s);
            html(status, pages::roles(ctx, &r, etag.as_deref().unwrap_or(""), error.map(|(_, m)| m), form))
        }
        Err(e) => error_page(ctx, e),
    }
}

/// Creates or replaces one role: the API replaces the whole set, so the others are sent
/// as they are — if the set is still the one the page showed (its `ETag` rides in the
/// form), else 412 and nothing changes.
async fn save_role(ctx: &Ctx<'_>, form: &Form) -> Response<Body> {
    let (mut all, now_tag) = match ctx.get_tagged("/admin/v1/roles").await {
        Ok(r) => r,
        Err(e) => return error_page(ctx, e),
    };
    let name = form.get("name").unwrap_or("").trim().to_string();
    if name.is_empty() {
        return roles(ctx, Some((StatusCode::UNPROCESSABLE_ENTITY, "A role needs a name.")), form).await;
    }
    let rules: Vec<String> =
        form.get("rules").unwrap_or("").lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    all[name.as_str()] = json!({"description": form.get("description").unwrap_or("").trim(), "rules": rules});
    let tag = form.get("etag").or(now_tag.as_deref());
    match ctx.send_if(Method::PUT, "/admin/v1/roles", all, tag).await {
        Ok(_) => redirect("/ui/roles"),
        Err(ApiError(StatusCode::FORBIDDEN, _, msg)) => html(StatusCode::FORBIDDEN, pages::refused(ctx, &msg)),
        Err(ApiError(status, _, msg)) => roles(ctx, Some((status, &msg)), form).await,
    }
}

async fn delete_role(ctx: &Ctx<'_>, name: &str, form: &Form) -> Response<Body> {
    let (mut all, now_tag) = match ctx.get_tagged("/admin/v1/roles").await {
        Ok(r) => r,
        Err(e) => return error_page(ctx, e),
    };
    if let Some(o) = all.as_object_mut() {
        o.remove(name);
    }
    let tag = form.get("etag").or(now_tag.as_deref());
    match ctx.send_if(Method::PUT, "/admin/v1/roles", all, tag).await {
        Ok(_) => redirect("/ui/roles"),
        Err(ApiError(StatusCode::FORBIDDEN, _, msg)) => html(StatusCode::FORBIDDEN, pages::refused(ctx, &msg)),
        Err(ApiError(status, _, msg)) => roles(ctx, Some((status, &msg)), &Form::default()).await,
    }
}

async fn audit(ctx: &Ctx<'_>, q: &Form) -> Response<Body> {
    // The newest 1000 records, filtered here (user, admin token, action, time).
    match ctx.get("/admin/v1/audit", "limit=1000").await {
        Ok(v) => html(StatusCode::OK, pages::audit(ctx, &v, q)),
        Err(e) => error_page(ctx, e),
    }
}

fn error_page(ctx: &Ctx<'_>, ApiError(status, _, msg): ApiError) -> Response<Body> {
    html(status, pages::problem(ctx, status, &msg))
}

fn forbidden_post() -> Response<Body> {
    html(
        StatusCode::FORBIDDEN,
        pages::message(
            "Refused",
            "This form did not come from this console (missing CSRF token or another origin); nothing was changed.",
        ),
    )
}

fn unavailable() -> Response<Body> {
    let mut res = html(
        StatusCode::SERVICE_UNAVAILABLE,
        pages::message("Unavailable", "The admin token store cannot be reached; try again shortly."),
    );
    res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

fn not_found() -> Response<Body> {
    html(StatusCode::NOT_FOUND, pages::message("Not found", "There is no such page."))
}

fn html(status: StatusCode, m: Markup) -> Response<Body> {
    let mut res = Response::new(Body::full(m.into_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    res
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut res = Response::new(Body::full(text));
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// 303 See Other: after a form, the browser GETs the result (a reload does not resend).
fn redirect(to: &str) -> Response<Body> {
    let mut res = Response::new(Body::full(""));
    *res.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

/// The session cookie's value, if the request has one.
fn session_cookie(h: &HeaderMap) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == session::COOKIE)
        .map(|(_, v)| v.to_string())
}

/// A POST is accepted only with an `Origin` whose host is this request's `Host`: browsers
/// send `Origin` with every form POST, and a page of another site cannot set it.
fn same_origin(h: &HeaderMap) -> bool {
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = h.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (host, origin) {
        (Some(host), Some(origin)) => {
            origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host)
        }
        _ => false,
    }
}

/// An `application/x-www-form-urlencoded` body or query string, as (name, value) pairs.
#[derive(Debug, Default, Clone)]
pub(super) struct Form(Vec<(String, String)>);

impl Form {
    fn parse(bytes: &[u8]) -> Form {
        let decode = |s: &[u8]| {
            let plus: Vec<u8> = s.iter().map(|&b| if b == b'+' { b' ' } else { b }).collect();
            percent_encoding::percent_decode(&plus).decode_utf8_lossy().into_owned()
        };
        Form(
            bytes
                .split(|&b| b == b'&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.iter().position(|&b| b == b'=') {
                    Some(i) => (decode(&p[..i]), decode(&p[i + 1..])),
                    None => (decode(p), String::new()),
                })
                .collect(),
        )
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Every value of `name` (checkboxes of one name).
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    }

    /// A user's fields as the edit form sends them.
    fn from_user(u: &Value) -> Form {
        let join = |k: &str, sep: &str| {
            u[k].as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(sep))
                .unwrap_or_default()
        };
        let mut f = vec![
            ("display_name".to_string(), u["display_name"].as_str().unwrap_or_default().to_string()),
            ("description".to_string(), u["description"].as_str().unwrap_or_default().to_string()),
            ("organization".to_string(), u["organization"].as_str().unwrap_or_default().to_string()),
            ("teams".to_string(), join("teams", ", ")),
            ("allowed_endpoints".to_string(), join("allowed_endpoints", "\n")),
            ("allowed_proxied_users".to_string(), join("allowed_proxied_users", ", ")),
        ];
        if u["allow_proxied_users"] == true {
            f.push(("allow_proxied_users".into(), "on".into()));
        }
        for r in u["roles"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            f.push(("roles".into(), r.to_string()));
        }
        Form(f)
    }
}

/// How long a form's body may take to arrive (the listener bounds only the head).
const FORM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn read_form(req: Request<Incoming>) -> Result<Form, Response<Body>> {
    let body = Limited::new(req.into_body(), MAX_FORM).collect();
    match tokio::time::timeout(FORM_TIMEOUT, body).await {
        Ok(Ok(b)) => Ok(Form::parse(&b.to_bytes())),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(html(
            StatusCode::PAYLOAD_TOO_LARGE,
            pages::message("Too large", "The form is too large; nothing was changed."),
        )),
        Ok(Err(_)) => Err(html(
            StatusCode::BAD_REQUEST,
            pages::message("Bad request", "The form could not be read; nothing was changed."),
        )),
        Err(_) => Err(html(
            StatusCode::REQUEST_TIMEOUT,
            pages::message("Too slow", "The form did not arrive in time; nothing was changed."),
        )),
    }
}
