//! The console's pages, as maud templates: every `( … )` is escaped HTML text, so a value
//! from a user (a description, an id, an audit record) can only ever be shown as text.
//! No page has inline script or style (the Content-Security-Policy forbids both).

use super::traffic::Window;
use super::{Ctx, Form, enc};
use crate::credentials::admin_tokens::AdminRole;
use crate::pipeline::usage::KeyUsageRecord;
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;
use std::collections::BTreeMap;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

type UsageMap = BTreeMap<String, KeyUsageRecord>;

/// Whether a write control is shown, and if so whether it can be used.
enum Control {
    /// The caller's role may not: the control is not on the page at all.
    Hidden,
    /// Allowed, but the store cannot be written: shown disabled, with the reason.
    Disabled(String),
    Enabled,
}

fn control(ctx: &Ctx<'_>, role: AdminRole) -> Control {
    if !ctx.may(role) {
        return Control::Hidden;
    }
    match ctx.write_block(role) {
        Some(why) => Control::Disabled(why),
        None => Control::Enabled,
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Gatehouse" }
            link rel="icon" href="/ui/static/favicon.svg" type="image/svg+xml";
            link rel="stylesheet" href="/ui/static/console.css";
            script src="/ui/static/console.js" defer {}
        }
    }
}

/// A page of a signed-in session: navigation, who is signed in, sign-out.
fn layout(ctx: &Ctx<'_>, title: &str, active: &str, body: Markup) -> Markup {
    let nav = [("/ui/", "Overview"), ("/ui/users", "Users"), ("/ui/roles", "Roles"), ("/ui/audit", "Audit")];
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header {
                    span.brand { "Gatehouse" }
                    nav aria-label="Main" {
                        @for (href, label) in nav {
                            @if label == active {
                                a href=(href) aria-current="page" { (label) }
                            } @else {
                                a href=(href) { (label) }
                            }
                        }
                    }
                    div.who {
                        span #whoami { (ctx.caller.name) " (" (ctx.caller.role.as_str()) ")" }
                        form method="post" action="/ui/sign-out" {
                            (csrf(ctx))
                            button.secondary type="submit" { "Sign out" }
                        }
                    }
                }
                main #main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn csrf(ctx: &Ctx<'_>) -> Markup {
    html! { input type="hidden" name="csrf" value=(ctx.session.csrf); }
}

/// A page outside a session (sign-in problems, refused forms).
pub fn message(title: &str, text: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                main #main.signin {
                    h1 { (title) }
                    p role="alert" { (text) }
                    p { a href="/ui/" { "Back to the console" } }
                }
            }
        }
    }
}

pub fn sign_in(error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body {
                main #main.signin {
                    h1 { "Gatehouse console" }
                    @if let Some(e) = error {
                        div.notice.error role="alert" #sign-in-error { (e) }
                    }
                    form method="post" action="/ui/sign-in" {
                        div.field {
                            label for="token" { "Admin token" }
                            input #token type="password" name="token" autocomplete="off" required autofocus;
                            span.hint { "A named admin token (gha_…) or the bootstrap token." }
                        }
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    }
}

pub fn refused(ctx: &Ctx<'_>, why: &str) -> Markup {
    layout(ctx, "Not allowed", "", html! { div.notice.error role="alert" { (why) " Nothing was changed." } })
}

pub fn problem(ctx: &Ctx<'_>, status: http::StatusCode, msg: &str) -> Markup {
    let title = status.canonical_reason().unwrap_or("Error");
    layout(ctx, title, "", html! { div.notice.error role="alert" { (msg) } })
}

pub fn error_notice(msg: &str) -> Markup {
    html! { div.notice.error role="alert" #form-error { (msg) } }
}

/// The status a user action sets, its button and what it does.
pub fn status_action(action: &str) -> Option<(&'static str, &'static str, &'static str)> {
    match action {
        "disable" => Some((
            "inactive",
            "Disable user",
            "Every key of this user is refused with 401 from the next request on, until the user is enabled again.",
        )),
        "enable" => {
            Some(("active", "Enable user", "The user's live keys are accepted again from the next request on."))
        }
        "retire" => Some((
            "retired",
            "Retire user",
            "The user is retired for good: every key is refused with 401, and it can never be enabled again or get a new key.",
        )),
        _ => None,
    }
}

fn s<'v>(v: &'v Value, k: &str) -> &'v str {
    v[k].as_str().unwrap_or("")
}

fn strs(v: &Value, k: &str) -> Vec<String> {
    v[k].as_array().map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect()).unwrap_or_default()
}

fn parse_time(t: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(t, &Rfc3339).ok()
}

fn unix_text(t: Option<i64>) -> String {
    t.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "never".into())
}

/// When a key is (or was) revoked: a rotation's grace period puts it in the future.
fn revoked_at(k: &Value) -> Option<OffsetDateTime> {
    k["revoked_at"].as_str().and_then(parse_time)
}

/// Neither revoked nor expired at `now`.
fn key_live(k: &Value, now: OffsetDateTime) -> bool {
    revoked_at(k).is_none_or(|r| r > now) && k["expires_at"].as_str().and_then(parse_time).is_none_or(|e| e > now)
}

fn key_status(k: &Value, now: OffsetDateTime) -> String {
    match revoked_at(k) {
        Some(r) if r <= now => "revoked".into(),
        _ if !key_live(k, now) => "expired".into(),
        Some(_) => format!("active until {}", s(k, "revoked_at")),
        None => "active".into(),
    }
}

/// A user's requests and last use over its keys.
fn user_usage(u: &Value, usage: &UsageMap) -> (u64, Option<i64>) {
    let mut requests = 0;
    let mut last = None;
    for k in u["keys"].as_array().into_iter().flatten() {
        if let Some(r) = usage.get(s(k, "id")) {
            requests += r.requests;
            last = last.max(r.last_used_at);
        }
    }
    (requests, last)
}

/// The users of `list` that the users page's filters (`q`) let through.
pub fn shown_users<'a>(list: &'a Value, q: &Form) -> Vec<&'a Value> {
    let want = |k: &str| q.get(k).map(str::trim).filter(|v| !v.is_empty());
    let search = want("q").map(str::to_lowercase);
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|u| want("status").is_none_or(|st| s(u, "status") == st))
        .filter(|u| want("organization").is_none_or(|o| s(u, "organization") == o))
        .filter(|u| want("team").is_none_or(|t| strs(u, "teams").iter().any(|x| x == t)))
        .filter(|u| want("role").is_none_or(|r| strs(u, "roles").iter().any(|x| x == r)))
        .filter(|u| {
            search.as_ref().is_none_or(|needle| {
                [s(u, "id"), s(u, "display_name"), s(u, "description")]
                    .iter()
                    .any(|h| h.to_lowercase().contains(needle.as_str()))
            })
        })
        .collect()
}

pub fn users(
    ctx: &Ctx<'_>,
    list: &Value,
    usage: &UsageMap,
    recent: &dyn Fn(&str) -> u64,
    roles: &Value,
    q: &Form,
) -> Markup {
    let now = crate::credentials::ops::now();
    let want = |k: &str| q.get(k).map(str::trim).filter(|v| !v.is_empty());
    let shown = shown_users(list, q);
    let role_names: Vec<&String> = roles.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    let body = html! {
        form.filters method="get" action="/ui/users" role="search" {
            div { label for="q" { "Search" } input #q type="text" name="q" value=(q.get("q").unwrap_or("")); }
            div {
                label for="status" { "Status" }
                select #status name="status" {
                    option value="" { "any" }
                    @for st in ["active", "inactive", "retired"] {
                        option value=(st) selected[want("status") == Some(st)] { (st) }
                    }
                }
            }
            div { label for="organization" { "Organisation" } input #organization type="text" name="organization" value=(q.get("organization").unwrap_or("")); }
            div { label for="team" { "Team" } input #team type="text" name="team" value=(q.get("team").unwrap_or("")); }
            div {
                label for="role" { "Role" }
                select #role name="role" {
                    option value="" { "any" }
                    @for r in &role_names {
                        option value=(r) selected[want("role") == Some(r.as_str())] { (r) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        @match control(ctx, AdminRole::Operator) {
            Control::Hidden => {}
            Control::Disabled(why) => div.actions { button type="button" disabled { "New user" } span.hint { (why) } },
            Control::Enabled => div.actions { a.button #new-user href="/ui/new-user" { "New user" } },
        }
        p { (shown.len()) " of " (list.as_array().map_or(0, Vec::len)) " users" }
        div.table-wrap {
            table #users {
                thead { tr { th { "ID" } th { "Name" } th { "Status" } th { "Organisation" } th { "Teams" } th { "Roles" } th { "Live keys" } th { "Last used" } th { "Requests (24 h)" } th { "Requests (all)" } } }
                tbody {
                    @for u in &shown {
                        @let (requests, last) = user_usage(u, usage);
                        @let live = u["keys"].as_array().map_or(0, |k| k.iter().filter(|k| key_live(k, now)).count());
                        @let day: u64 = u["keys"].as_array().into_iter().flatten().map(|k| recent(s(k, "id"))).sum();
                        tr {
                            td { a href={ "/ui/users/" (enc(s(u, "id"))) } { (s(u, "id")) } }
                            td { (s(u, "display_name")) }
                            td class={ "status-" (s(u, "status")) } { (s(u, "status")) }
                            td { (s(u, "organization")) }
                            td { (strs(u, "teams").join(", ")) }
                            td { (strs(u, "roles").join(", ")) }
                            td { (live) }
                            td { (unix_text(last)) }
                            td { (day) }
                            td { (requests) }
                        }
                    }
                }
            }
        }
    };
    layout(ctx, "Users", "Users", body)
}

pub fn user(ctx: &Ctx<'_>, u: &Value, usage: &Value, notice: Option<Markup>) -> Markup {
    let now = crate::credentials::ops::now();
    let id = s(u, "id");
    let status = s(u, "status");
    let keys: Vec<&Value> = u["keys"].as_array().map(|k| k.iter().collect()).unwrap_or_default();
    let control = control(ctx, AdminRole::Operator);
    let enabled = matches!(control, Control::Enabled);
    let body = html! {
        @if let Some(n) = notice { (n) }
        dl.props #user-props {
            dt { "Display name" } dd { (s(u, "display_name")) }
            dt { "Description" } dd #description { (s(u, "description")) }
            dt { "Status" } dd class={ "status-" (status) } { (status) }
            dt { "Authentication" } dd { (s(u, "auth_method")) }
            dt { "Organisation" } dd { (s(u, "organization")) }
            dt { "Teams" } dd { (strs(u, "teams").join(", ")) }
            dt { "Roles" } dd { (strs(u, "roles").join(", ")) }
            dt { "Allowed endpoints" } dd { @for e in strs(u, "allowed_endpoints") { code { (e) } br; } }
            dt { "Proxied users" } dd {
                @if u["allow_proxied_users"] == true {
                    "may act for: " (strs(u, "allowed_proxied_users").join(", "))
                } @else { "none" }
            }
            dt { "Created" } dd { (s(u, "created_at")) }
            dt { "Updated" } dd { (s(u, "updated_at")) }
        }
        @match &control {
            Control::Hidden => {}
            Control::Disabled(why) => p.notice { (why) }
            Control::Enabled => div.actions {
                a.button.secondary href={ "/ui/users/" (enc(id)) "/edit" } { "Edit" }
                @if status == "active" { a.button.secondary href={ "/ui/users/" (enc(id)) "/status/disable" } { "Disable" } }
                @if status == "inactive" { a.button.secondary href={ "/ui/users/" (enc(id)) "/status/enable" } { "Enable" } }
                @if status != "retired" { a.button.secondary href={ "/ui/users/" (enc(id)) "/status/retire" } { "Retire" } }
            }
        }
        h2 { "Keys" }
        div.table-wrap {
            table #keys {
                thead { tr { th { "Key" } th { "Label" } th { "Hint" } th { "Status" } th { "Created" } th { "Expires" } th { "Last used" } th { "Requests (24 h)" } th { "Requests (all)" } @if enabled { th { span.hint { "Action" } } } } }
                tbody {
                    @for k in &keys {
                        @let st = key_status(k, now);
                        @let class = st.split(' ').next().unwrap_or_default().to_string();
                        tr {
                            td { code { (s(k, "id")) } }
                            td { (s(k, "label")) }
                            td { code { (s(k, "hint")) } }
                            td class={ "status-" (class) } { (st) }
                            td { (s(k, "created_at")) }
                            td { (k["expires_at"].as_str().unwrap_or("never")) }
                            td { (k["last_used_at"].as_str().unwrap_or("never")) }
                            td { (usage["keys"][s(k, "id")]["requests_24h"].as_u64().unwrap_or(0)) }
                            td { (k["requests"].as_u64().unwrap_or(0)) }
                            @if enabled {
                                td {
                                    @if k["revoked_at"].is_null() && key_live(k, now) {
                                        a href={ "/ui/users/" (enc(id)) "/keys/" (enc(s(k, "id"))) "/rotate" } { "Rotate" }
                                        " · "
                                    }
                                    @if key_live(k, now) {
                                        a href={ "/ui/users/" (enc(id)) "/keys/" (enc(s(k, "id"))) "/revoke" } { "Revoke" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (chart(usage, now, ctx.admin.shared.is_some()))
        @match &control {
            Control::Hidden => {}
            Control::Disabled(_) | Control::Enabled if status == "retired" => {}
            Control::Disabled(why) => {
                h2 { "Add a key" }
                p.notice { (why) }
                button type="button" disabled { "Add key" }
            }
            Control::Enabled => {
                h2 { "Add a key" }
                form #add-key method="post" action={ "/ui/users/" (enc(id)) "/keys" } {
                    (csrf(ctx))
                    div.field { label for="label" { "Label" } input #label type="text" name="label" maxlength="200"; }
                    div.field {
                        label for="expires_in_days" { "Expires in (days) " span.hint { "empty: never" } }
                        input #expires_in_days type="number" name="expires_in_days" min="1" max="3650";
                    }
                    button type="submit" { "Add key" }
                }
            }
        }
    };
    layout(ctx, &format!("User {id}"), "Users", body)
}

/// Requests per day over the last 30 days as bars (SVG attributes, not inline styles:
/// the CSP allows no inline style), with the numbers in a table beside it for screen
/// readers and for reading exact values.
fn chart(usage: &Value, now: OffsetDateTime, shared: bool) -> Markup {
    let by_day: BTreeMap<String, u64> = usage["per_day"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| (s(d, "date").to_string(), d["requests"].as_u64().unwrap_or(0)))
        .collect();
    let days: Vec<(String, u64)> = (0..crate::pipeline::history::DAYS)
        .rev()
        .map(|back| {
            let date = (now - time::Duration::days(back)).date().to_string();
            let n = by_day.get(&date).copied().unwrap_or(0);
            (date, n)
        })
        .collect();
    let max = days.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    let (width, height, bar) = (600u64, 120u64, 20u64);
    let first = days.first().map(|(d, _)| d.clone()).unwrap_or_default();
    let last = days.last().map(|(d, _)| d.clone()).unwrap_or_default();
    html! {
        h2 { "Requests per day" }
        svg.chart role="img" aria-label={ "Requests per day from " (first) " to " (last) } viewBox={ "0 0 " (width) " " (height + 16) } {
            @for (i, (date, n)) in days.iter().enumerate() {
                @let h = n * height / max;
                rect x=(i as u64 * bar + 2) y=(height - h) width=(bar - 4) height=(h) { title { (date) ": " (n) } }
            }
            text x="0" y=(height + 12) { (first) }
            text x=(width - 60) y=(height + 12) { (last) }
            text x="0" y="10" { "max " (max) }
        }
        details {
            summary { "As a table" }
            table #per-day {
                thead { tr { th { "Day" } th { "Requests" } } }
                tbody { @for (date, n) in days.iter().filter(|(_, n)| *n > 0) { tr { td { (date) } td { (n) } } } }
            }
        }
        @if shared { p.hint { "Counted by this gateway: each gateway of the fleet shows its own share." } }
    }
}

pub fn user_form(ctx: &Ctx<'_>, existing: Option<&Value>, form: &Form, roles: &Value, error: Option<&str>) -> Markup {
    let role_names: Vec<&String> = roles.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    let chosen = form.all("roles");
    let v = |k: &str| form.get(k).unwrap_or("").to_string();
    let (title, action) = match existing {
        Some(u) => (format!("Edit user {}", s(u, "id")), format!("/ui/users/{}", enc(s(u, "id")))),
        None => ("New user".to_string(), "/ui/users".to_string()),
    };
    let body = html! {
        @if let Some(e) = error { (error_notice(e)) }
        form #user-form method="post" action=(action) {
            (csrf(ctx))
            @if let Some(tag) = form.get("etag") {
                // The user as the form showed it: a change made since is not overwritten.
                input type="hidden" name="etag" value=(tag);
            }
            @if existing.is_none() {
                div.field {
                    label for="id" { "ID " span.hint { "letters, digits, '.', '_', '-', '@'; cannot be changed later" } }
                    input #id type="text" name="id" required value=(v("id"));
                }
                div.field {
                    label for="auth_method" { "Authentication" }
                    select #auth_method name="auth_method" {
                        option value="api_key" selected[v("auth_method") != "hmac"] { "API key" }
                        option value="hmac" selected[v("auth_method") == "hmac"] { "HMAC signature" }
                    }
                }
            }
            div.field { label for="display_name" { "Display name" } input #display_name type="text" name="display_name" value=(v("display_name")); }
            div.field { label for="description" { "Description" } textarea #description name="description" { (v("description")) } }
            div.field { label for="organization" { "Organisation" } input #organization type="text" name="organization" value=(v("organization")); }
            div.field { label for="teams" { "Teams " span.hint { "comma-separated" } } input #teams type="text" name="teams" value=(v("teams")); }
            fieldset.field {
                legend { "Roles" }
                @for r in &role_names {
                    div.checkbox {
                        input type="checkbox" name="roles" value=(r) id={ "role-" (r) } checked[chosen.iter().any(|c| c == *r)];
                        " " label for={ "role-" (r) } { (r) }
                    }
                }
            }
            div.field {
                label for="allowed_endpoints" { "Allowed endpoints " span.hint { "one rule per line, e.g. GET,POST /api/v1/orders/**" } }
                textarea #allowed_endpoints name="allowed_endpoints" { (v("allowed_endpoints")) }
            }
            div.field.checkbox {
                input #allow_proxied_users type="checkbox" name="allow_proxied_users" checked[v("allow_proxied_users") == "on"];
                " " label for="allow_proxied_users" { "May act for proxied users" }
            }
            div.field { label for="allowed_proxied_users" { "Proxied users it may act for " span.hint { "comma-separated; empty: any" } } input #allowed_proxied_users type="text" name="allowed_proxied_users" value=(v("allowed_proxied_users")); }
            div.actions {
                button type="submit" { @if existing.is_some() { "Save" } @else { "Create user" } }
                a.button.secondary href="/ui/users" { "Cancel" }
            }
        }
    };
    layout(ctx, &title, "Users", body)
}

/// The page that shows a new key's token or secret: the only time it is ever shown.
pub fn key_shown(ctx: &Ctx<'_>, user: &Value, added: &Value) -> Markup {
    let key = &added["key"];
    let key_id = s(key, "id");
    let hmac = added.get("secret").is_some();
    let secret = added["token"].as_str().or(added["secret"].as_str()).unwrap_or("");
    let base = &ctx.admin.example_base;
    let example = if hmac {
        format!(
            "export GATEHOUSE_HMAC_SECRET='{secret}'\ncurl $(gatehouse sign --key-id {key_id} --method GET --path /) {base}/"
        )
    } else {
        format!("curl -H 'X-API-Key: {secret}' {base}/")
    };
    let what = if hmac { "signing secret" } else { "token" };
    let body = html! {
        div.notice.ok role="status" {
            "Key " code { (key_id) } " added for " a href={ "/ui/users/" (enc(s(user, "id"))) } { (s(user, "id")) } ". "
            @if let Some(old) = added.get("replaces") {
                "It replaces " code #replaces { (s(old, "id")) } ", which stops working at " (s(old, "revoked_at")) ". "
            }
            strong { "This is the only time its " (what) " is shown: copy it now." } " It is stored only as a digest (or sealed) and cannot be shown again."
        }
        h2 { "The " (what) }
        code.secret #secret { (secret) }
        div.actions { button type="button" data-copy="secret" hidden { "Copy" } }
        h2 { "Try it" }
        pre #example { (example) }
        div.actions { button type="button" data-copy="example" hidden { "Copy example" } }
        p { a href={ "/ui/users/" (enc(s(user, "id"))) } { "Back to the user" } }
    };
    layout(ctx, "Key added", "Users", body)
}

/// A page about one key of `u`: `body` of the user's id and the key, or a notice that
/// the user has no such key.
fn about_key(ctx: &Ctx<'_>, u: &Value, key_id: &str, title: &str, body: impl FnOnce(&str, &Value) -> Markup) -> Markup {
    let id = s(u, "id");
    let inner = match u["keys"].as_array().into_iter().flatten().find(|k| s(k, "id") == key_id) {
        None => html! { div.notice.error role="alert" { "User " (id) " has no key " (key_id) "." } },
        Some(k) => body(id, k),
    };
    layout(ctx, title, "Users", inner)
}

pub fn confirm_revoke(ctx: &Ctx<'_>, u: &Value, key_id: &str) -> Markup {
    about_key(ctx, u, key_id, "Revoke a key", |id, k| {
        html! {
            p.notice.error #consequence {
                "Revoke key " code { (key_id) } " (" (s(k, "label")) ", " code { (s(k, "hint")) } ") of " (id) "? "
                "Every request with this key is refused with 401 from the next request on; a client still using it stops working. This cannot be undone."
            }
            form method="post" action={ "/ui/users/" (enc(id)) "/keys/" (enc(key_id)) "/revoke" } {
                (csrf(ctx))
                div.actions {
                    button.danger #confirm type="submit" { "Revoke key" }
                    a.button.secondary href={ "/ui/users/" (enc(id)) } { "Cancel" }
                }
            }
        }
    })
}

pub fn confirm_rotate(ctx: &Ctx<'_>, u: &Value, key_id: &str) -> Markup {
    about_key(ctx, u, key_id, "Rotate a key", |id, k| {
        html! {
            p.notice #consequence {
                "Rotate key " code { (key_id) } " (" (s(k, "label")) ", " code { (s(k, "hint")) } ") of " (id) ": "
                "a new key is added now and shown once; the old key keeps working for the grace period you choose, "
                "then every request with it is refused with 401. Move the client to the new key within that time."
            }
            form #rotate method="post" action={ "/ui/users/" (enc(id)) "/keys/" (enc(key_id)) "/rotate" } {
                (csrf(ctx))
                div.field { label for="label" { "Label of the new key" } input #label type="text" name="label" value=(s(k, "label")); }
                div.field {
                    label for="grace" { "The old key stops working" }
                    select #grace name="grace" {
                        option value="0" { "now" }
                        option value="3600" selected { "in 1 hour" }
                        option value="86400" { "in 24 hours" }
                        option value="604800" { "in 7 days" }
                    }
                }
                div.actions {
                    button #confirm type="submit" { "Rotate key" }
                    a.button.secondary href={ "/ui/users/" (enc(id)) } { "Cancel" }
                }
            }
        }
    })
}

pub fn confirm_status(ctx: &Ctx<'_>, u: &Value, action: &str) -> Markup {
    let id = s(u, "id");
    let Some((_, button, consequence)) = status_action(action) else {
        return problem(ctx, http::StatusCode::NOT_FOUND, "No such action");
    };
    let body = html! {
        p.notice.error #consequence { (button) " " (id) "? " (consequence) }
        form method="post" action={ "/ui/users/" (enc(id)) "/status/" (action) } {
            (csrf(ctx))
            div.actions {
                button.danger #confirm type="submit" { (button) }
                a.button.secondary href={ "/ui/users/" (enc(id)) } { "Cancel" }
            }
        }
    };
    layout(ctx, button, "Users", body)
}

pub fn roles(ctx: &Ctx<'_>, roles: &Value, etag: &str, error: Option<&str>, form: &Form) -> Markup {
    let control = control(ctx, AdminRole::Admin);
    let body = html! {
        @if let Some(e) = error { (error_notice(e)) }
        @if let Control::Disabled(why) = &control { p.notice { (why) } }
        @for (name, r) in roles.as_object().into_iter().flatten() {
            section.card {
                h2 { (name) }
                @if !s(r, "description").is_empty() { p { (s(r, "description")) } }
                @match &control {
                    Control::Enabled => {
                        form method="post" action="/ui/roles" {
                            (csrf(ctx))
                            input type="hidden" name="etag" value=(etag);
                            input type="hidden" name="name" value=(name);
                            div.field { label for={ "desc-" (name) } { "Description" } input id={ "desc-" (name) } type="text" name="description" value=(s(r, "description")); }
                            div.field {
                                label for={ "rules-" (name) } { "Rules " span.hint { "one per line: METHODS PATH-PATTERN" } }
                                textarea id={ "rules-" (name) } name="rules" { (strs(r, "rules").join("\n")) }
                            }
                            button type="submit" { "Save role" }
                        }
                        form method="post" action={ "/ui/roles/" (enc(name)) "/delete" } {
                            (csrf(ctx))
                            input type="hidden" name="etag" value=(etag);
                            button.danger type="submit" { "Delete role " (name) }
                        }
                    }
                    _ => pre { (strs(r, "rules").join("\n")) }
                }
            }
        }
        @if let Control::Enabled = control {
            h2 { "New role" }
            form #new-role method="post" action="/ui/roles" {
                (csrf(ctx))
                input type="hidden" name="etag" value=(etag);
                div.field { label for="new-name" { "Name" } input #new-name type="text" name="name" required value=(form.get("name").unwrap_or("")); }
                div.field { label for="new-description" { "Description" } input #new-description type="text" name="description" value=(form.get("description").unwrap_or("")); }
                div.field {
                    label for="new-rules" { "Rules " span.hint { "one per line: METHODS PATH-PATTERN, e.g. GET /api/v1/orders/**" } }
                    textarea #new-rules name="rules" { (form.get("rules").unwrap_or("")) }
                }
                button type="submit" { "Create role" }
            }
        }
    };
    layout(ctx, "Roles", "Roles", body)
}

pub fn audit(ctx: &Ctx<'_>, records: &Value, q: &Form) -> Markup {
    let want = |k: &str| q.get(k).map(str::trim).filter(|v| !v.is_empty());
    // Only the periods the form offers: any other value is no filter (and cannot overflow).
    let since = want("since").and_then(|h| h.parse::<i64>().ok()).filter(|h| [1, 24, 168].contains(h));
    let cutoff = since.map(|h| crate::credentials::ops::now() - time::Duration::hours(h));
    let shown: Vec<&Value> = records
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .filter(|r| want("user").is_none_or(|u| r["user"] == u || r["proxied_user"] == u || r["target"] == u))
        .filter(|r| want("admin").is_none_or(|a| r["token_name"] == a))
        .filter(|r| want("action").is_none_or(|a| r["action"] == a))
        .filter(|r| {
            cutoff.is_none_or(|c| {
                s(r, "time").get(..19).and_then(|t| parse_time(&format!("{t}Z"))).is_some_and(|t| t >= c)
            })
        })
        .collect();
    let body = html! {
        form.filters method="get" action="/ui/audit" role="search" {
            div { label for="a-user" { "User" } input #a-user type="text" name="user" value=(q.get("user").unwrap_or("")); }
            div { label for="a-admin" { "Admin token (name)" } input #a-admin type="text" name="admin" value=(q.get("admin").unwrap_or("")); }
            div { label for="a-action" { "Action" } input #a-action type="text" name="action" value=(q.get("action").unwrap_or("")); }
            div {
                label for="a-since" { "Time" }
                select #a-since name="since" {
                    option value="" { "any" }
                    @for (h, label) in [("1", "last hour"), ("24", "last 24 hours"), ("168", "last 7 days")] {
                        option value=(h) selected[want("since") == Some(h)] { (label) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        p { (shown.len()) " records (newest first; the last 1000 of the audit log are searched)" }
        div.table-wrap {
            table #audit {
                thead { tr { th { "Time" } th { "Who" } th { "What" } th { "On" } th { "Details" } } }
                tbody {
                    @for r in &shown {
                        tr {
                            td { (s(r, "time")) }
                            @if r["kind"] == "admin" {
                                td { (s(r, "actor")) @if !s(r, "token_name").is_empty() { " · token " (s(r, "token_name")) } }
                                td { (s(r, "action")) }
                                td { (s(r, "target")) }
                                td { code { (if r["changes"].is_null() { String::new() } else { r["changes"].to_string() }) } }
                            } @else {
                                td { (s(r, "user")) @if !s(r, "key_id").is_empty() { " · " (s(r, "key_id")) } }
                                td { (s(r, "method")) " " (s(r, "path")) }
                                td { (r["status"].as_u64().unwrap_or(0)) " " (s(r, "outcome")) }
                                td { (s(r, "reason")) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(ctx, "Audit", "Audit", body)
}

/// What the overview lists about keys and users.
#[derive(Debug, Default)]
pub struct Facts {
    /// (user, key, last used) of live keys not used for 90 days.
    pub unused: Vec<(String, String, String)>,
    /// (user, key, created) of live keys older than the rotation age.
    pub old: Vec<(String, String, String)>,
    /// Users (not retired) without a live key.
    pub keyless: Vec<String>,
}

impl Facts {
    pub fn gather(users: &Value, usage: &UsageMap, now: OffsetDateTime, rotation_age: std::time::Duration) -> Facts {
        let mut f = Facts::default();
        let unused_for = time::Duration::days(90);
        let rotation = time::Duration::try_from(rotation_age).unwrap_or(time::Duration::MAX);
        for u in users.as_array().into_iter().flatten().filter(|u| s(u, "status") != "retired") {
            let live: Vec<&Value> = u["keys"].as_array().into_iter().flatten().filter(|k| key_live(k, now)).collect();
            if live.is_empty() {
                f.keyless.push(s(u, "id").to_string());
            }
            for k in live {
                let created = s(k, "created_at").to_string();
                let created_at = parse_time(&created).unwrap_or(now);
                let last = usage.get(s(k, "id")).and_then(|r| r.last_used_at);
                let idle_since = last.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()).unwrap_or(created_at);
                if now - idle_since >= unused_for {
                    f.unused.push((s(u, "id").into(), s(k, "id").into(), unix_text(last)));
                }
                // A key already being replaced (a grace period running) is not due again.
                if now - created_at >= rotation && k["revoked_at"].is_null() {
                    f.old.push((s(u, "id").into(), s(k, "id").into(), created));
                }
            }
        }
        f
    }
}

pub fn overview(ctx: &Ctx<'_>, w: &Window, facts: &Facts) -> Markup {
    let failures: u64 = w.counts.auth_failures.values().sum();
    let period = if w.minutes >= 60 {
        "the last hour".to_string()
    } else {
        format!("the last {} min (since this gateway started)", w.minutes.max(1))
    };
    let rotation_days = ctx.admin.key_rotation_age.as_secs() / 86_400;
    let user_link = |id: &str| html! { a href={ "/ui/users/" (enc(id)) } { (id) } };
    let body = html! {
        p { "Traffic of this gateway over " (period) ", from its own counters." }
        div.cards {
            div.card { div.number #requests-hour { (w.counts.requests) } "requests" }
            div.card { div.number #failures-hour { (failures) } "refused authentications" }
            div.card { div.number #keyless-count { (facts.keyless.len()) } "users without a live key" }
            div.card { div.number #unused-count { (facts.unused.len()) } "keys unused for 90 days" }
            div.card { div.number #old-count { (facts.old.len()) } "keys older than " (rotation_days) " days" }
        }
        h2 { "Refused authentications by reason" }
        @if w.counts.auth_failures.is_empty() { p { "None." } } @else {
            table #failures {
                thead { tr { th { "Reason" } th { "Count" } } }
                tbody { @for (reason, n) in &w.counts.auth_failures { tr { td { code { (reason) } } td { (n) } } } }
            }
        }
        h2 { "Keys unused for 90 days" }
        @if facts.unused.is_empty() { p { "None." } } @else {
            table #unused { thead { tr { th { "User" } th { "Key" } th { "Last used" } } }
                tbody { @for (u, k, t) in &facts.unused { tr { td { (user_link(u)) } td { code { (k) } } td { (t) } } } } }
        }
        h2 { "Keys older than " (rotation_days) " days (rotate them)" }
        @if facts.old.is_empty() { p { "None." } } @else {
            table #old { thead { tr { th { "User" } th { "Key" } th { "Created" } } }
                tbody { @for (u, k, t) in &facts.old { tr { td { (user_link(u)) } td { code { (k) } } td { (t) } } } } }
        }
        h2 { "Users without a live key" }
        @if facts.keyless.is_empty() { p { "None." } } @else {
            ul #keyless { @for u in &facts.keyless { li { (user_link(u)) } } }
        }
    };
    layout(ctx, "Overview", "Overview", body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// a live key idle for 90 days (by its last use, or by its creation when never used)
    /// is listed; a revoked or expired one is not; a user whose keys are all gone is
    /// keyless; a retired user is left out; a future revocation (a rotation's grace) is live
    #[test]
    fn overview_facts() {
        let now = OffsetDateTime::parse("2026-12-07T12:00:00Z", &Rfc3339).unwrap();
        let key = |id: &str, created: &str, revoked: Option<&str>| json!({"id": id, "created_at": created, "revoked_at": revoked, "expires_at": null});
        let users = json!([
            {"id": "a", "status": "active", "keys": [
                key("old-unused", "2026-01-01T00:00:00Z", None),
                key("used-lately", "2026-01-01T00:00:00Z", None),
                key("new", "2026-12-01T00:00:00Z", None),
                key("grace", "2026-12-01T00:00:00Z", Some("2026-12-08T00:00:00Z")),
                key("revoked", "2026-01-01T00:00:00Z", Some("2026-02-01T00:00:00Z")),
            ]},
            {"id": "b", "status": "inactive", "keys": [key("gone", "2026-01-01T00:00:00Z", Some("2026-02-01T00:00:00Z"))]},
            {"id": "c", "status": "retired", "keys": []},
        ]);
        let mut usage = UsageMap::new();
        usage.insert(
            "used-lately".into(),
            KeyUsageRecord { last_used_at: Some(now.unix_timestamp() - 86_400), ..Default::default() },
        );
        let f = Facts::gather(&users, &usage, now, std::time::Duration::from_secs(180 * 86_400));
        let ids = |v: &[(String, String, String)]| v.iter().map(|(_, k, _)| k.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&f.unused), ["old-unused"]);
        assert_eq!(ids(&f.old), ["old-unused", "used-lately"], "a key in its grace period is not due");
        assert_eq!(f.keyless, ["b"]);
        assert_eq!(key_status(&users[0]["keys"][3], now), "active until 2026-12-08T00:00:00Z");
        assert_eq!(key_status(&users[0]["keys"][4], now), "revoked");
    }
}
