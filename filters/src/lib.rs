//! The per-request pipeline of Portcullis: filter phases over a request context
//! ([`pipeline`]), the pure parsers the stages use ([`parse`]: destinations, the egress guard,
//! SPIFFE identities, placeholders and secrets, JSON-RPC), and the stages that run in the
//! chain ([`stages`]). Nothing here opens a socket, so every part is unit-testable on its own.
#![forbid(unsafe_code)]

pub mod error;
pub mod parse;
pub mod pipeline;
pub mod stages;

pub use error::{ErrorCode, Rejection};
pub use pipeline::{
    Action, ActionKind, AfterResponse, BodyCheck, BodyTransform, Chain, Context, Filter, Outcome,
    Peer, Phase, TraceId, TransformError, Transforms, Via,
};
