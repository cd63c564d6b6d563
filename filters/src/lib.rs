//! The per-request pipeline of Portcullis: filter phases over a request context, and the pure
//! stages that plug into it (identity, destination parsing, egress guard, header hygiene).
//! Nothing here opens a socket, so every stage is unit-testable on its own.
#![forbid(unsafe_code)]

pub mod credentials;
pub mod destination;
pub mod egress;
pub mod error;
pub mod hygiene;
pub mod identity;
pub mod mcp;
pub mod pinning;
pub mod pipeline;
pub mod policy;
pub mod secret;
pub mod timing;
pub mod trace;

pub use error::{ErrorCode, Rejection};
pub use pipeline::{Action, ActionKind, Chain, Context, Filter, Outcome, Peer, TraceId, Via};
