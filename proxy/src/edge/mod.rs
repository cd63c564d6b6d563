//! The network edge: the client-facing listener (accept, TLS handshake with SPIFFE client
//! verification), the proxy's own TLS material, and the admin listener.

pub(crate) mod admin;
mod approvals;
pub(crate) mod bearer;
pub(crate) mod lifetime;
pub(crate) mod listener;
pub(crate) mod revocation;
pub(crate) mod slots;
pub(crate) mod tls;
