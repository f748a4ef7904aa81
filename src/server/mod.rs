//! The sockets: proxy listeners (accept, TLS handshake, HTTP/1 and HTTP/2 serving,
//! drain), the JSON form of hyper's own parse errors, and the admin listener. Each
//! request a listener serves goes to [`crate::pipeline::handle`].

pub mod admin;
pub mod listen;
pub mod parse_errors;
