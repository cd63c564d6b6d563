//! Values the config parses at the edge, once, so the rest of the proxy passes types instead of
//! re-checking strings: secret references, the Workload API address, the OTLP protocol and
//! collector URL, a gateway route's upstream URL. Each parses with `TryFrom<String>` (serde's
//! `try_from`), so a bad value is reported with its key path like any other config error.

use std::fmt;
use std::path::PathBuf;

use portcullis_filters::parse::destination::Destination;
use portcullis_filters::parse::secret::SecretValue;
use serde::Deserialize;

/// A secret in the config: where to read it (`env:NAME` or `file:PATH`), never the value.
/// `Display` and `Debug` show the reference, which is not secret.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

/// Why a secret reference could not be read. Never holds the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretRefError {
    #[error("environment variable {0} is not set")]
    Unset(String),
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{0} is empty")]
    Empty(String),
}

/// What a literal in a secret's place is told (never echoed back: it may be the secret).
pub const NOT_A_REFERENCE: &str =
    "must be a reference (env:NAME or file:PATH): secrets are never literals in the config";

impl TryFrom<String> for SecretRef {
    type Error = &'static str;

    fn try_from(s: String) -> Result<SecretRef, &'static str> {
        match (s.strip_prefix("env:"), s.strip_prefix("file:")) {
            (Some(var), _) if !var.is_empty() => Ok(SecretRef::Env(var.to_owned())),
            (_, Some(path)) if !path.is_empty() => Ok(SecretRef::File(PathBuf::from(path))),
            _ => Err(NOT_A_REFERENCE),
        }
    }
}

impl SecretRef {
    /// Read the secret now (a file's trailing newline dropped). An empty value is an error.
    pub fn resolve(&self) -> Result<SecretValue, SecretRefError> {
        let value = match self {
            SecretRef::Env(var) => {
                std::env::var(var).map_err(|_| SecretRefError::Unset(var.clone()))?
            }
            SecretRef::File(path) => std::fs::read_to_string(path)
                .map_err(|e| SecretRefError::Unreadable {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        };
        if value.is_empty() {
            return Err(SecretRefError::Empty(self.to_string()));
        }
        Ok(SecretValue::new(value))
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(var) => write!(f, "env:{var}"),
            SecretRef::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A value that is a secret reference when it reads like one (`env:NAME`, `file:PATH`) and is
/// used as written otherwise (OTLP export header values). `Debug` never shows a literal.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum ValueOrRef {
    Ref(SecretRef),
    Value(String),
}

impl From<String> for ValueOrRef {
    fn from(s: String) -> ValueOrRef {
        match SecretRef::try_from(s.clone()) {
            Ok(r) => ValueOrRef::Ref(r),
            Err(_) => ValueOrRef::Value(s),
        }
    }
}

impl fmt::Debug for ValueOrRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueOrRef::Ref(r) => write!(f, "{r}"),
            ValueOrRef::Value(_) => f.write_str("(value)"),
        }
    }
}

/// A validated Workload API address: `unix:///path/agent.sock` (or `unix:/path`, or just the
/// absolute socket path), or `tcp://127.0.0.1:8081`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct WorkloadApiEndpoint(String);

impl TryFrom<String> for WorkloadApiEndpoint {
    type Error = String;

    fn try_from(s: String) -> Result<WorkloadApiEndpoint, String> {
        let uri = match s.starts_with('/') {
            true => format!("unix://{s}"),
            false => s.clone(),
        };
        spiffe::transport::Endpoint::parse(&uri)
            .map(|_| WorkloadApiEndpoint(uri))
            .map_err(|e| format!("{s:?} is not a Workload API address (unix:///path/agent.sock, /path/agent.sock or tcp://IP:PORT): {e}"))
    }
}

impl WorkloadApiEndpoint {
    pub fn parse(s: &str) -> Result<WorkloadApiEndpoint, String> {
        WorkloadApiEndpoint::try_from(s.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkloadApiEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How span batches reach the collector (`grpc`, `http/protobuf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum OtlpProtocol {
    /// `POST {endpoint}/v1/traces`, `application/x-protobuf`.
    HttpProtobuf,
    /// The unary `TraceService/Export` call over HTTP/2.
    Grpc,
}

impl TryFrom<String> for OtlpProtocol {
    type Error = String;

    fn try_from(s: String) -> Result<OtlpProtocol, String> {
        match s.as_str() {
            "grpc" => Ok(OtlpProtocol::Grpc),
            "http/protobuf" | "http" => Ok(OtlpProtocol::HttpProtobuf),
            _ => Err(format!("{s:?}: use grpc or http/protobuf")),
        }
    }
}

impl fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OtlpProtocol::HttpProtobuf => "http/protobuf",
            OtlpProtocol::Grpc => "grpc",
        })
    }
}

/// A collector's base URL: `http(s)://host[:port][/path]`, no credentials (they go in
/// `telemetry.otlp_headers`), no query. Errors never echo the URL: it could hold credentials.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct OtlpEndpoint(http::Uri);

impl TryFrom<String> for OtlpEndpoint {
    type Error = &'static str;

    fn try_from(s: String) -> Result<OtlpEndpoint, &'static str> {
        let url: http::Uri = s
            .trim_end_matches('/')
            .parse()
            .map_err(|_| "is not a URL: use http://host:port or https://host:port")?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err("must be http://host:port or https://host:port");
        }
        if url.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err("must not carry credentials: put them in telemetry.otlp_headers");
        }
        if url.query().is_some() {
            return Err("must not have a query string");
        }
        Ok(OtlpEndpoint(url))
    }
}

impl OtlpEndpoint {
    pub fn uri(&self) -> &http::Uri {
        &self.0
    }
}

impl fmt::Debug for OtlpEndpoint {
    /// Scheme and authority only: a path could hold a token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.0.scheme_str().unwrap_or("");
        let authority = self.0.authority().map_or("", |a| a.as_str());
        write!(f, "{scheme}://{authority}")
    }
}

/// A gateway route's upstream: `https://api.github.com`, optionally with a base path
/// (`https://host/v2`), no query string.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct UpstreamUrl {
    pub destination: Destination,
    /// Without a trailing `/` (empty for the root).
    pub base_path: String,
}

impl TryFrom<String> for UpstreamUrl {
    type Error = String;

    fn try_from(url: String) -> Result<UpstreamUrl, String> {
        let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
        let destination =
            Destination::from_absolute_uri(&uri).map_err(|e| format!("{url:?}: {e}"))?;
        if uri.query().is_some() {
            return Err(format!("{url:?}: no query string allowed"));
        }
        Ok(UpstreamUrl {
            destination,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn secret_references_parse_once_and_never_echo_a_literal() {
        assert_eq!(
            SecretRef::try_from("env:TOKEN".to_owned()),
            Ok(SecretRef::Env("TOKEN".into()))
        );
        assert_eq!(
            SecretRef::try_from("file:/run/s".to_owned())
                .unwrap()
                .to_string(),
            "file:/run/s"
        );
        for literal in ["env:", "file:", "ENV:X", " env:X", ""] {
            assert!(
                SecretRef::try_from(literal.to_owned()).is_err(),
                "{literal:?}"
            );
        }
        let e = SecretRef::try_from("hunter2-s3cr3t".to_owned()).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        std::env::remove_var("PORTCULLIS_TYPES_TEST_UNSET");
        assert_eq!(
            SecretRef::Env("PORTCULLIS_TYPES_TEST_UNSET".into())
                .resolve()
                .unwrap_err(),
            SecretRefError::Unset("PORTCULLIS_TYPES_TEST_UNSET".into())
        );
    }

    #[test]
    fn workload_api_endpoints() {
        for ok in [
            "unix:///run/spire/agent.sock",
            "unix:/tmp/a.sock",
            "tcp://127.0.0.1:8081",
        ] {
            assert_eq!(WorkloadApiEndpoint::parse(ok).unwrap().to_string(), ok);
        }
        let bare = WorkloadApiEndpoint::parse("/run/spire/agent.sock").unwrap();
        assert_eq!(bare.to_string(), "unix:///run/spire/agent.sock");
        for bad in [
            "",
            "run/agent.sock",
            "http://127.0.0.1:1",
            "unix://",
            "tcp://host:1",
        ] {
            assert!(WorkloadApiEndpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn otlp_endpoints_are_urls_without_credentials() {
        let ok = |s: &str| OtlpEndpoint::try_from(s.to_owned()).map(|e| e.uri().to_string());
        assert_eq!(ok("http://c:4318/").unwrap(), "http://c:4318/");
        assert!(ok("https://c/otlp").is_ok());
        for bad in ["c:4317", "ftp://c:4317", "http://c:4317?k=v"] {
            assert!(ok(bad).is_err(), "{bad}");
        }
        let e = ok("https://user:hunter2@c:4317").unwrap_err();
        assert!(!e.contains("hunter2"));
        assert_eq!(
            format!(
                "{:?}",
                OtlpEndpoint::try_from("https://c:1/t0k3n".to_owned()).unwrap()
            ),
            "https://c:1"
        );
    }

    #[test]
    fn upstream_urls_keep_their_base_path() {
        let u = UpstreamUrl::try_from("https://api.example.com/v2/".to_owned()).unwrap();
        assert_eq!(u.destination.authority(), "api.example.com:443");
        assert_eq!(u.base_path, "/v2");
        assert!(UpstreamUrl::try_from("https://h/?q=1".to_owned()).is_err());
        assert!(UpstreamUrl::try_from("not a url".to_owned()).is_err());
    }
}
