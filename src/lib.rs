//! Gatehouse: an authentication gateway for machine clients.
//!
//! Every proxied request flows one way:
//!
//! ```text
//!  accept ──► TLS ──► parse ──► authenticate ──► authorize ──► limit ──► rewrite ──► forward ──► record
//!  listen.rs  tls.rs  request.rs  authn/          authz.rs     limit.rs  rewrite.rs  forward.rs  record.rs
//! ```
//!
//! `pipeline.rs` calls the steps in that order; each step returns `Result<_, GateError>`
//! and `error.rs` is the only place a failure becomes a status and a JSON body. The one
//! step visited twice is `limit`: a client IP's failed-authentication budget is checked
//! before `authenticate` and charged when it fails; the key's quota after `authorize`.
//! `record` writes usage, metrics and the audit record from the request's `Outcome`.
//! The admin listener (`admin/`) is a separate service on its own socket.

#![forbid(unsafe_code)]

// Shared building blocks.
pub mod atomic_file;
pub mod body;
pub mod config;
pub mod credentials;
pub mod error;
pub mod headers;
pub mod path;
pub mod route;
pub mod rules;
pub mod state;
pub mod watch;

// The request pipeline, in request order.
pub mod listen;
pub mod tls;
pub mod parse_errors;
pub mod request;
pub mod authn;
pub mod authz;
pub mod limit;
pub mod rewrite;
pub mod forward;
pub mod tunnel;
pub mod upstream;
pub mod h1;
pub mod record;
pub mod usage;
pub mod metrics;
pub mod audit;
pub mod pipeline;

// Around the pipeline.
pub mod admin;
pub mod cli;
pub mod echo;
