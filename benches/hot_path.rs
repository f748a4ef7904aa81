//! Per-request pure steps of the pipeline, without sockets: what every proxied request
//! pays before it is forwarded. One function per group; run with
//! `cargo bench --bench hot_path` (add `-- --quick` for a fast look).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use gatehouse::config::RouteConfig;
use gatehouse::headers;
use gatehouse::path;
use gatehouse::request;
use gatehouse::route::RouteTable;
use http::HeaderMap;
use std::hint::black_box;
use std::time::Duration;

/// `path::normalise`: the canonical fast path (borrowed, no allocation) and the slow
/// path (empty and dot segments, an encoded `..`, an encoded unreserved character).
fn bench_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("path");
    g.bench_function("normalise_canonical", |b| b.iter(|| path::normalise(black_box("/api/v1/orders/12345"))));
    g.bench_function("normalise_dirty", |b| {
        b.iter(|| path::normalise(black_box("/api//v1/./orders/%2e%2e/accounts/%41")))
    });
    g.finish();
}

/// `RouteTable::find` over 20 routes: a match in the middle of the table, and a path
/// that only the catch-all `/` matches (every route is tried).
fn bench_route(c: &mut Criterion) {
    let table = RouteTable::new(&twenty_routes());
    assert_eq!(table.find(None, "/api/v1/orders/12345").unwrap().name.as_ref(), "orders");
    assert_eq!(table.find(None, "/unrouted/x").unwrap().name.as_ref(), "root");
    let mut g = c.benchmark_group("route");
    g.bench_function("find_20_routes", |b| b.iter(|| table.find(black_box(None), black_box("/api/v1/orders/12345"))));
    g.bench_function("find_20_routes_fallback", |b| b.iter(|| table.find(black_box(None), black_box("/unrouted/x"))));
    g.finish();
}

fn twenty_routes() -> Vec<RouteConfig> {
    let route = |name: &str, host: Option<&str>, prefix: &str| RouteConfig {
        name: name.into(),
        host: host.map(str::to_string),
        path_prefix: prefix.into(),
        upstreams: vec!["http://127.0.0.1:3000".parse().unwrap()],
        allow_anonymous: false,
        forward_credentials: false,
        timeout: Duration::from_secs(30),
        set_headers: vec![],
    };
    let mut routes = vec![route("root", None, "/"), route("api", None, "/api/"), route("api-v1", None, "/api/v1/")];
    for name in ["orders", "accounts", "invoices", "payments", "customers", "products", "shipments", "refunds"] {
        routes.push(route(name, None, &format!("/api/v1/{name}/")));
    }
    for name in ["orders", "accounts", "invoices", "payments"] {
        routes.push(route(&format!("{name}-v2"), None, &format!("/api/v2/{name}/")));
    }
    for name in ["billing", "reports", "search"] {
        routes.push(route(&format!("{name}-host"), Some(&format!("{name}.example.com")), "/api/v1/"));
    }
    routes.extend([route("health", None, "/healthz"), route("static", None, "/static/")]);
    assert_eq!(routes.len(), 20);
    routes
}

/// `headers::classify` over the header names of a typical API client request.
fn bench_headers(c: &mut Criterion) {
    const NAMES: [&str; 12] = [
        "host",
        "user-agent",
        "accept",
        "accept-encoding",
        "accept-language",
        "content-type",
        "content-length",
        "authorization",
        "x-api-key",
        "x-request-id",
        "x-forwarded-for",
        "cookie",
    ];
    let mut g = c.benchmark_group("headers");
    g.bench_function("classify_12_names", |b| {
        b.iter(|| {
            for name in black_box(NAMES) {
                black_box(headers::classify(name));
            }
        })
    });
    g.finish();
}

/// `request::request_id` when the client sent none: a fresh UUIDv7 as a header value.
fn bench_request(c: &mut Criterion) {
    let no_id = HeaderMap::new();
    let mut g = c.benchmark_group("request");
    g.bench_function("request_id_generate", |b| b.iter(|| request::request_id(black_box(&no_id))));
    g.finish();
}

criterion_group!(benches, bench_path, bench_route, bench_headers, bench_request);
criterion_main!(benches);
