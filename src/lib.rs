//! Gatehouse: an authentication gateway for machine clients.
//!
//! Every proxied request flows one way:
//!
//! ```text
//!  accept ──► TLS ──► parse ──► authenticate ──► authorize ──► limit ──► rewrite ──► forward ──► record
//!  server/   tls.rs  pipeline/request  pipeline/authn  pipeline/authz  pipeline/limit  pipeline/rewrite
//!                                                             pipeline/forward → wire/upstream  pipeline/record
//! ```
//!
//! `pipeline/mod.rs` calls the steps in that order; each step returns `Result<_, GateError>`
//! and `pipeline/error.rs` is the only place a failure becomes a status and a JSON body.
//! The one step visited twice is `limit`: a client IP's failed-authentication budget is
//! checked before `authenticate` and charged when it fails; the key's quota after
//! `authorize`. `record` writes usage, metrics and the audit record from the request's
//! `Outcome`. The admin listener (`server/admin/`) is a separate service on its own socket.
//!
//! The folders are layers, lowest first; a module imports only from its own layer and
//! the ones below (`tests/it/layers.rs` fails the build otherwise):
//! `fs` → `wire` → `config` → `tls` → `credentials` → `shared` → `pipeline` → `server` → `cli`.
//! (`tls` sits below `credentials`, as TLS comes before authentication in a request, and
//! the credential database is reached over TLS with the same rustls provider.)

#![forbid(unsafe_code)]

pub mod fs;
pub mod wire;
pub mod config;
pub mod tls;
pub mod credentials;
pub mod shared;
pub mod pipeline;
pub mod server;
pub mod cli;
