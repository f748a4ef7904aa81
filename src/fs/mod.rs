//! Files the gateway writes and watches: durable atomic replacement, and change
//! detection that survives Kubernetes' symlink swaps. The lowest layer: it knows nothing
//! of HTTP or of the gateway.

pub mod atomic_file;
pub mod watch;
