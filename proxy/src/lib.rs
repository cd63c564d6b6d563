//! Portcullis: an egress forward proxy for AI-agent tool calls. This crate is the network edge:
//! listeners, TLS (mTLS with SPIFFE SVID verification), CONNECT and MITM, the upstream client,
//! config, admin endpoints and the CLI commands. The per-request logic lives in
//! `portcullis-filters`.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod backend;
pub mod body;
pub mod cli;
pub mod config;
pub mod connect;
pub mod decision_log;
pub mod dev;
pub mod error;
pub mod gateway;
pub mod idle;
pub mod metrics;
pub mod mitm;
pub mod oauth;
pub mod otlp;
pub mod pki;
pub mod proxy;
pub mod redis_store;
pub mod reload;
pub mod response_body;
pub mod secrets;
pub mod server;
pub mod sse_sessions;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod vault;
pub mod workload_api;
