//! HTTP on the wire, below any policy: header names and classes, path normalisation, the
//! body type both sides share, and the upstream side (HTTP/1.1 client written by the
//! gateway, its connection pool, HTTP/2 through hyper's client, target balancing,
//! WebSocket tunnels). Knows nothing of
//! configuration files, credentials or the pipeline: callers hand it plain values.

pub mod balance;
pub mod body;
pub mod h1;
pub mod h2;
pub mod headers;
pub mod path;
pub mod tunnel;
pub mod upstream;
