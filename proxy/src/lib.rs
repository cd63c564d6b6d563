//! Portcullis: an egress forward proxy for AI-agent tool calls. This crate is the network
//! edge and the process around it; the per-request logic lives in `portcullis-filters`.
//!
//! One request, in module order: [`edge`] accepts and authenticates the connection (mTLS, the
//! SPIFFE SVID) → [`http`] reads CONNECT, absolute-form or gateway requests, intercepts
//! tunnels and runs the filter chain's phases (built in [`app::build_chain`]) → [`upstream`]
//! dials (the egress guard sits at its only dial) → the response body streams back through
//! the chain's transforms → the logging phase feeds [`telemetry`]. Around it: [`credentials`]
//! (secret sources), [`gates`] (approvals and rate limits), [`replicas`] (Redis shared by replicas), [`reload`] (files and the
//! Workload API), [`connector`] (`portcullis connect`), [`cli`] and [`config`].
#![forbid(unsafe_code)]

mod app;
mod certs;
mod cli;
mod config;
mod connector;
mod credentials;
mod delegation;
mod edge;
mod gates;
mod http;
pub mod pki;
mod reload;
mod replicas;
mod telemetry;
mod upstream;

pub use cli::main;

/// TLS helpers the bench and the tests share with the proxy: PEM loading, the rustls crypto
/// provider and the X.509-SVID leaf checks.
pub mod tls {
    pub use crate::certs::{load_certs, load_key, provider};
    pub use crate::edge::tls::check_leaf;
}

/// The direct OTLP span encoder and the transparent connector's name parsers, re-exported for
/// the fuzz targets (`tests/fuzz`). Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::connector::transparent::{authority_for, http_host, sni, Named};
    pub use crate::telemetry::otlp::{Attributes, Encoder, Envelope, Kind, SpanHead};
}
