//! [authenticate] Who is calling.
//!
//! The credential checks (API keys, HMAC signatures; SPEC §3) plug in here. Until they
//! do, every caller is anonymous and only routes that allow anonymous callers are
//! open — see `authz`.

use crate::error::GateError;
use crate::request::Parsed;

/// The caller, as far as authentication could tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No credentials were presented.
    Anonymous,
}

/// Decides who sent `parsed`.
pub fn authenticate(_parsed: &Parsed) -> Result<Caller, GateError> {
    Ok(Caller::Anonymous)
}
