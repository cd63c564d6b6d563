//! What every remote credential source shares, and nothing else: why a fetch failed, the cache expiry by the
//! fetched value's lifetime, the fetch counters for `/metrics`, the source fingerprint replicas agree on, and
//! the note a traced read uses to tell a cache hit from a fetch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;

use crate::replicas::Fetched;

/// Why a source produced no secret. Every message is safe to show the agent (it becomes the
/// reason of a 503 `credential_unavailable`): it names the back end and what went wrong, never
/// a value, a token, or credentials from a URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("{backend}: invalid request")]
    BadRequest { backend: &'static str },
    #[error("{backend} is unreachable")]
    Unreachable { backend: &'static str },
    #[error("{backend} response was cut off")]
    CutOff { backend: &'static str },
    #[error("{backend} did not answer within {timeout:?}")]
    Timeout {
        backend: &'static str,
        timeout: Duration,
    },
    /// It answered, but not with a usable secret (a status, a malformed or partial answer).
    #[error("{0}")]
    Answer(String),
    /// A local source or a secret reference in the config cannot be read.
    #[error("{0}")]
    Local(String),
}

/// Fetches from remote credential sources (Vault, OAuth), for `/metrics`.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub fetches: AtomicU64,
    pub errors: AtomicU64,
}

impl FetchStats {
    /// Count one fetch from a source and its outcome.
    pub fn record<T>(&self, r: Result<T, SourceError>) -> Result<T, SourceError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        note_fetch();
        if r.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

/// Cache entries live as long as the secret they hold.
pub struct ByLifetime;

impl<K> Expiry<K, Arc<Fetched>> for ByLifetime {
    fn expire_after_create(&self, _k: &K, f: &Arc<Fetched>, _now: Instant) -> Option<Duration> {
        Some(f.lifetime)
    }
}

/// A stable fingerprint of where a secret comes from (which Vault path, which token endpoint
/// and client), so replicas share a value only when they fetch it from the same place. It is
/// built from the fields themselves, each length-prefixed (`None` distinct from empty), so it
/// changes exactly when one of them does, never with a type's `Debug` output.
pub fn fingerprint<'a>(fields: impl IntoIterator<Item = Option<&'a str>>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for field in fields {
        match field {
            None => ctx.update(&[0]),
            Some(s) => {
                ctx.update(&[1]);
                ctx.update(&(s.len() as u64).to_be_bytes());
                ctx.update(s.as_bytes());
            }
        }
    }
    portcullis_filters::pipeline::hex(&ctx.finish().as_ref()[..8])
}

tokio::task_local! {
    /// Set while a traced read runs, when a source (not a cache) produced the value.
    pub static FETCHED: std::cell::Cell<bool>;
}

/// A source was asked for a secret (Vault, OAuth, a file re-read): the traced read in this
/// task, if any, was not a cache hit.
pub fn note_fetch() {
    let _ = FETCHED.try_with(|f| f.set(true));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_follow_the_fields_and_their_boundaries() {
        let a = fingerprint([Some("https://vault:8200"), None, Some("secret")]);
        assert_eq!(
            a,
            fingerprint([Some("https://vault:8200"), None, Some("secret")])
        );
        assert_eq!(a.len(), 16);
        assert_ne!(
            a,
            fingerprint([Some("https://vault:8200"), Some(""), Some("secret")])
        );
        assert_ne!(
            fingerprint([Some("ab"), Some("c")]),
            fingerprint([Some("a"), Some("bc")])
        );
    }
}
