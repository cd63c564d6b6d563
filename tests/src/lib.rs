//! End-to-end test scaffolding: a PKI generated at test time with the project's own `pki`
//! module, a real TLS upstream that records what reaches it, the real `portcullis` binary as a
//! child process (JSON logs captured), real curl, and a raw mTLS client for malformed input.
// This crate only exists to test; failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod workload_api;
pub use workload_api::{JwtAuthority, WorkloadApiServer};

mod curl;
mod harness;
mod mcp;
mod oauth;
mod otlp;
mod pki;
mod process;
mod redis;
mod upstream;
mod vault;

pub use curl::*;
pub use harness::*;
pub use mcp::*;
pub use oauth::*;
pub use otlp::*;
pub use pki::*;
pub use process::*;
pub use redis::*;
pub use upstream::*;
pub use vault::*;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::pki::{rcgen, Authority, LeafSpec};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for anything that should happen "soon"; loops never run longer.
pub const WAIT: Duration = Duration::from_secs(30);
/// Bound on a peer process becoming ready.
pub const PEER_START: Duration = Duration::from_secs(90);

/// A policy that allows every action.
pub const ALLOW_ALL: &str = "package portcullis\n\ndecision := true\n";

/// Standard Base64 (with padding) of `s`'s UTF-8.
pub fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
