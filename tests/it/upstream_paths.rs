//! Base paths and prefix stripping (docs/configuration.md#paths): the path an upstream
//! receives is built from the normalised path the rules checked, never from the raw
//! one, and never leaves the upstream's base path.

use crate::support::eventually;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::raw::RawConn;
use crate::support::upstream::TestUpstream;
use std::time::Duration;

/// A raw client path, the status, what the rules saw, where it went and as what.
type Case<'a> = (&'a str, u16, Option<&'a str>, Option<(&'a TestUpstream, &'a str)>);

/// Table: the raw path a client sends → the status, the path the rules saw (the audit
/// record's `path`) and the path and query the upstream received (None: nothing).
#[tokio::test]
async fn tricky_paths_through_a_base_path_and_a_stripped_prefix() {
    let erp = TestUpstream::start().await;
    let legacy = TestUpstream::start().await;
    let gw = TestGateway::builder()
        .route(
            RouteSpec::new("erp", "/api/erp")
                .upstream_url(&format!("{}/erp/v2/", erp.url()))
                .setting("strip_prefix: true"),
        )
        .route(RouteSpec::new("legacy", "/legacy/").upstream_url(&format!("{}/base", legacy.url())))
        .start()
        .await;
    #[rustfmt::skip]
    let cases: &[Case<'_>] = &[
        ("/api/erp/orders",                 200, Some("/api/erp/orders"), Some((&erp, "/erp/v2/orders"))),
        ("/api/erp/orders?id=%2F..%2F",     200, Some("/api/erp/orders"), Some((&erp, "/erp/v2/orders?id=%2F..%2F"))),
        ("/api/erp",                        200, Some("/api/erp"),        Some((&erp, "/erp/v2"))),
        ("/api/erp/",                       200, Some("/api/erp/"),       Some((&erp, "/erp/v2/"))),
        ("/api/erp//orders//",              200, Some("/api/erp/orders/"), Some((&erp, "/erp/v2/orders/"))),
        ("/api/erp/./a/../orders",          200, Some("/api/erp/orders"), Some((&erp, "/erp/v2/orders"))),
        ("/api/erp/x/%2e%2e/orders",        200, Some("/api/erp/orders"), Some((&erp, "/erp/v2/orders"))),
        ("/api/erp/%7Euser/a%20b",          200, Some("/api/erp/~user/a%20b"), Some((&erp, "/erp/v2/~user/a%20b"))),
        // Out of the route's prefix once normalised: another route, or none.
        ("/api/erp/../../legacy/x",         200, Some("/legacy/x"),       Some((&legacy, "/base/legacy/x"))),
        ("/api/erp/%2e%2e/%2e%2e/etc/passwd", 404, None, None),
        ("/api/erpx",                       404, None, None),
        // Refused before any rule: above the root, an encoded slash, double encoding.
        ("/api/erp/%2e%2e/%2e%2e/%2e%2e/x", 400, None, None),
        ("/api/erp/a%2Fb",                  400, None, None),
        ("/api/erp/a%252e%252e/b",          400, None, None),
        ("/legacy/a/b",                     200, Some("/legacy/a/b"),     Some((&legacy, "/base/legacy/a/b"))),
    ];
    for (i, (raw, status, saw, got)) in cases.iter().enumerate() {
        let (erp_before, legacy_before) = (erp.count(), legacy.count());
        let mut c = RawConn::connect(gw.addr()).await;
        c.send(format!("GET {raw} HTTP/1.1\r\nHost: gw\r\nX-Case: {i}\r\nConnection: close\r\n\r\n").as_bytes()).await;
        let reply = c.read_response().await;
        assert_eq!(reply.status.as_u16(), *status, "{raw}: {}", reply.text());
        match got {
            Some((up, target)) => {
                let seen = up.requests().pop().unwrap();
                assert_eq!(seen.header("x-case"), i.to_string(), "{raw}: went elsewhere");
                assert_eq!(&seen.target, target, "{raw}");
            }
            None => assert_eq!((erp.count(), legacy.count()), (erp_before, legacy_before), "{raw}: forwarded"),
        }
        if let Some(path) = saw {
            let id = reply.header("x-request-id").to_string();
            let mine = || gw.audit_records().into_iter().find(|r| r["request_id"] == id.as_str());
            eventually(Duration::from_secs(5), "the audit record", || mine().is_some()).await;
            assert_eq!(mine().unwrap()["path"], *path, "{raw}: the rules saw another path");
        }
    }
}
