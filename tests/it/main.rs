//! Gatehouse integration tests: real sockets on 127.0.0.1 ephemeral ports, a real recording
//! upstream, real TLS with certificates generated per test, and the real binary where the
//! process matters (memory, signals, exit codes). One binary, one file per capability or
//! threat; the harness is in `support/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod admin_api;
mod auth_api_key;
mod auth_hmac;
mod authz;
mod cli;
mod config;
mod console;
mod credential_db;
mod demo;
mod differential;
mod docs;
mod deploy;
mod edge;
mod errors;
mod grpc;
mod identity_headers;
mod layers;
mod lifecycle;
mod master_key;
mod limits;
mod observability;
mod observability_support;
mod proxy;
mod rate_limit;
mod reload;
mod secrets;
mod shared_state;
mod shutdown;
mod smuggling;
mod upstream_h2;
mod upstream_health;
mod upstream_paths;
mod upstream_pool;
mod upstream_tls;
mod upstream_wire;
