//! The configuration: one serde tree with `deny_unknown_fields`, defaults in one place
//! (`Default` impls below), and `validate()` that reports the exact key and reason. Relative paths
//! are resolved against the config file's directory when loading.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use portcullis_filters::parse::identity::TrustDomain;
use serde::{Deserialize, Deserializer};

/// A config problem, with the file and the key it is about.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    #[serde(default = "defaults::admin_listen")]
    pub admin_listen: SocketAddr,
    pub tls: TlsConfig,
    pub trust_domains: BTreeMap<String, TrustDomainConfig>,
    pub mitm: MitmConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub egress: EgressConfig,
    /// Required: without a policy nothing would decide, and Portcullis fails closed.
    pub policy: PolicyConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub mcp: McpConfig,
    #[serde(default)]
    pub credentials: Vec<CredentialConfig>,
    #[serde(default)]
    pub vault: Option<VaultConfig>,
    /// Shared, encrypted credential cache and tool pins across replicas (optional).
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// Gateway mode: origin-form requests on the proxy listener (`GET /github/...`) are
    /// routed to a fixed upstream through the same pipeline.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// How often certificate, key and bundle files (and this file's `trust_domains`) are
    /// checked for changes.
    #[serde(default = "defaults::reload_interval", with = "duration")]
    pub reload_interval: Duration,
}

/// The proxy's own server certificate: files (`cert` + `key`), or the X.509-SVID the SPIFFE
/// Workload API gives this workload (`workload_api: unix:///run/spire/agent.sock`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub workload_api: Option<String>,
}

impl TlsConfig {
    /// The certificate and key files, when the certificate comes from files.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        Some((self.cert.as_deref()?, self.key.as_deref()?))
    }

    /// The Workload API address (validated by `Config::validate`).
    pub fn workload_api(&self) -> Option<crate::reload::workload_api::Endpoint> {
        crate::reload::workload_api::Endpoint::parse(self.workload_api.as_deref()?).ok()
    }
}

/// Where a trust domain's CA certificates come from: a PEM file (`bundle`), or the Workload
/// API's X.509 bundles stream (`workload_api: true`, the socket of `tls.workload_api`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustDomainConfig {
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    #[serde(default)]
    pub workload_api: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MitmConfig {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    #[serde(default = "defaults::leaf_ttl", with = "duration")]
    pub leaf_ttl: Duration,
    #[serde(default = "defaults::leaf_cache_size")]
    pub cache_size: u64,
    /// Hosts tunnelled without interception: `example.com` or `*.example.com`.
    #[serde(default)]
    pub passthrough: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub extra_roots: Vec<PathBuf>,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    #[serde(with = "duration")]
    pub tls_timeout: Duration,
    #[serde(with = "duration")]
    pub response_header_timeout: Duration,
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Offer h2 to upstreams (ALPN). With h2 all requests to one host share one multiplexed
    /// connection, whose stream state every tunnel then contends for; the default (`false`)
    /// uses pooled HTTP/1.1 connections, which the bench measured 10-20 % cheaper per request
    /// and faster for large bodies. Turn it on for h2-only services such as gRPC.
    pub http2: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            extra_roots: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            tls_timeout: Duration::from_secs(10),
            response_header_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 64,
            http2: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Exceptions to the default deny of private, loopback, link-local, ... ranges.
    pub allow: Vec<IpNet>,
    /// Extra ranges to deny; wins over `allow`.
    pub deny: Vec<IpNet>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `.rego` files and data documents (`.json`, `.yaml`), files or directories.
    pub paths: Vec<PathBuf>,
    #[serde(default = "defaults::entrypoint")]
    pub entrypoint: String,
    /// Wall-clock budget per decision; exceeding it denies with `policy_eval_limit`.
    #[serde(default = "defaults::max_eval_time", with = "duration")]
    pub max_eval_time: Duration,
    /// VM instruction budget per decision (deterministic, unlike the clock).
    #[serde(default = "defaults::max_instructions")]
    pub max_instructions: u64,
    /// Extra header names whose values are redacted in the policy input (Authorization,
    /// Proxy-Authorization, Cookie, Set-Cookie and X-Api-Key always are).
    #[serde(default)]
    pub redact_headers: Vec<String>,
}

impl PolicyConfig {
    pub fn limits(&self) -> portcullis_policy::Limits {
        portcullis_policy::Limits {
            max_eval_time: self.max_eval_time,
            max_instructions: Some(self.max_instructions),
            ..portcullis_policy::Limits::default()
        }
    }

    /// Load the policy and run its own tests (a policy whose tests fail is not served).
    pub fn load(&self) -> Result<portcullis_policy::PolicySet, portcullis_policy::PolicyError> {
        portcullis_policy::PolicySet::load_tested(&self.paths, &self.entrypoint, self.limits())
    }
}

/// One brokered credential. The secret itself is never in the config, only where to get it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    pub name: String,
    /// Default `pcx_<name>`.
    #[serde(default)]
    pub placeholder: Option<String>,
    /// The only destinations it may be substituted for (`host` or `*.suffix`). Required.
    pub hosts: Vec<String>,
    /// `{env: VAR}` or `{file: path}`.
    #[serde(with = "serde_yaml_ng::with::singleton_map")]
    pub source: SourceConfig,
    /// Also substitute placeholders inside request bodies (buffered up to the inspection limit).
    #[serde(default)]
    pub body: bool,
    /// For gateway routes that name this credential: the header to add (with the placeholder,
    /// substituted like any other) when the request has none.
    #[serde(default)]
    pub inject: Option<InjectConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InjectConfig {
    #[serde(default = "defaults::inject_header")]
    pub header: String,
    /// `{}` is where the secret goes.
    #[serde(default = "defaults::inject_format")]
    pub format: String,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            header: defaults::inject_header(),
            format: defaults::inject_format(),
        }
    }
}

/// One gateway route: `https://<proxy>/<path_prefix>...` → `<upstream>/...`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: RouteMatch,
    /// `https://api.github.com` (a base path is allowed: `https://host/v2`).
    pub upstream: String,
    /// A credential whose placeholder is injected (see `credentials[].inject`).
    #[serde(default)]
    pub credential: Option<String>,
    /// Remove `path_prefix` before forwarding (default true).
    #[serde(default = "defaults::yes")]
    pub strip_prefix: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Only requests whose Host is this name (any when absent).
    #[serde(default)]
    pub host: Option<String>,
    pub path_prefix: String,
}

impl CredentialConfig {
    pub fn placeholder(&self) -> String {
        self.placeholder
            .clone()
            .unwrap_or_else(|| format!("pcx_{}", self.name))
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum SourceConfig {
    /// An environment variable of the proxy process.
    Env(String),
    /// A file holding the secret (trailing newline ignored), re-read when it changes.
    File(PathBuf),
    /// A field of a Vault KV v2 secret (needs the top-level `vault` section).
    Vault(VaultSecretRef),
    /// An OAuth 2.0 access token (client_credentials or refresh_token grant), cached until
    /// shortly before it expires.
    Oauth(OAuthSourceConfig),
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OAuthSourceConfig {
    pub token_url: String,
    /// `client_credentials` (default) or `refresh_token`.
    #[serde(default)]
    pub grant: OAuthGrant,
    /// For the `refresh_token` grant: a reference (`env:NAME` or `file:PATH`) to the refresh
    /// token to start from. A rotated refresh token is kept in Redis (encrypted) when
    /// configured, else written back to the `file:`, else kept in memory.
    #[serde(default)]
    pub refresh_token: Option<String>,
    pub client_id: String,
    /// A reference: `env:NAME` or `file:PATH`.
    pub client_secret: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub audience: Option<String>,
    /// `basic` (HTTP Basic, the default) or `post` (in the form body).
    #[serde(default = "defaults::client_auth")]
    pub client_auth: String,
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default = "defaults::vault_timeout", with = "duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OAuthGrant {
    #[default]
    ClientCredentials,
    RefreshToken,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VaultSecretRef {
    #[serde(default = "defaults::vault_mount")]
    pub mount: String,
    pub path: String,
    pub field: String,
}

/// Where Vault is and how to log in. Secrets here are references too: `env:NAME` or
/// `file:PATH`, never literals.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// `https://vault.internal:8200` (plain `http://` for a local dev server only).
    pub address: String,
    /// Token auth: a reference to the token.
    #[serde(default)]
    pub token: Option<String>,
    /// AppRole auth: references to the role id and secret id.
    #[serde(default)]
    pub approle: Option<AppRoleConfig>,
    #[serde(default)]
    pub namespace: Option<String>,
    /// Extra CA for Vault's TLS certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// How long a fetched secret is reused before Vault is asked again.
    #[serde(default = "defaults::vault_cache_ttl", with = "duration")]
    pub cache_ttl: Duration,
    #[serde(default = "defaults::vault_timeout", with = "duration")]
    pub timeout: Duration,
}

/// Redis as the cache shared by replicas: fetched credentials (AES-256-GCM encrypted with
/// `encryption_key`, expiring with the secret), revocations (pub/sub) and MCP tool pins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:6379/0`, or `rediss://` for TLS. Credentials go in `username`/`password`,
    /// not in the URL.
    pub url: String,
    #[serde(default)]
    pub username: Option<String>,
    /// A reference: `env:NAME` or `file:PATH`.
    #[serde(default)]
    pub password: Option<String>,
    /// A reference to 32 random bytes, base64: the AES-256-GCM key for cached values.
    pub encryption_key: String,
    /// Extra CA for a `rediss://` server certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Key and channel prefix, so several deployments can share one Redis.
    #[serde(default = "defaults::redis_prefix")]
    pub prefix: String,
    /// Per command; a slower Redis is treated as down (the proxy falls back to its own cache
    /// and the source).
    #[serde(default = "defaults::redis_timeout", with = "duration")]
    pub timeout: Duration,
    /// How long a replica waits for another replica that is already fetching the same
    /// credential before it fetches on its own.
    #[serde(default = "defaults::redis_lock_ttl", with = "duration")]
    pub lock_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRoleConfig {
    pub role_id: String,
    pub secret_id: String,
    #[serde(default = "defaults::approle_mount")]
    pub mount: String,
}

impl Config {
    fn validate_routes(&self) -> Result<(), (String, String)> {
        for (i, c) in self.credentials.iter().enumerate() {
            if let Some(inj) = &c.inject {
                let key = format!("credentials[{i}].inject");
                if http::HeaderName::from_bytes(inj.header.as_bytes()).is_err() {
                    return Err((
                        format!("{key}.header"),
                        format!("{:?} is not a header name", inj.header),
                    ));
                }
                if inj.format.matches("{}").count() != 1 {
                    return Err((
                        format!("{key}.format"),
                        "must contain {} exactly once".into(),
                    ));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            let e = |k: &str, reason: String| Err((format!("{key}.{k}"), reason));
            if r.name.is_empty()
                || !r
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return e(
                    "name",
                    format!("{:?} must be non-empty letters, digits, - or _", r.name),
                );
            }
            if !names.insert(&r.name) {
                return e("name", format!("duplicate route {:?}", r.name));
            }
            if !r.matches.path_prefix.starts_with('/') {
                return e("match.path_prefix", "must start with /".into());
            }
            let upstream = crate::http::gateway::parse_upstream(&r.upstream)
                .map_err(|reason| (format!("{key}.upstream"), reason))?;
            if let Some(name) = &r.credential {
                let Some(c) = self.credentials.iter().find(|c| &c.name == name) else {
                    return e("credential", format!("no credential named {name:?}"));
                };
                if !c.hosts.iter().any(|h| upstream.0.host.matches(h)) {
                    return e(
                        "credential",
                        format!(
                            "credential {name:?} is not bound to {} (its hosts: {:?})",
                            upstream.0.host, c.hosts
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

impl RedisConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let reference = |r: &str| r.starts_with("env:") || r.starts_with("file:");
        let info = redis::IntoConnectionInfo::into_connection_info(self.url.as_str())
            .map_err(|e| ("url".to_owned(), format!("not a Redis URL: {e}")))?;
        if info.redis_settings().password().is_some() {
            return Err((
                "url".into(),
                "has a password in it: put a reference (env:NAME or file:PATH) in redis.password instead".into(),
            ));
        }
        if self.password.as_deref().is_some_and(|p| !reference(p))
            || !reference(&self.encryption_key)
        {
            return Err((
                "password/encryption_key".into(),
                "must be references (env:NAME or file:PATH), never literals".into(),
            ));
        }
        if self.timeout.is_zero() || self.lock_ttl.is_zero() {
            return Err((
                "timeout/lock_ttl".into(),
                "must be greater than zero".into(),
            ));
        }
        if self.prefix.is_empty() {
            return Err(("prefix".into(), "must not be empty".into()));
        }
        Ok(())
    }
}

/// Resolve a secret reference (`env:NAME` or `file:PATH`) from the config.
pub fn resolve_reference(
    reference: &str,
) -> Result<portcullis_filters::parse::secret::SecretValue, String> {
    use portcullis_filters::parse::secret::SecretValue;
    let value = if let Some(var) = reference.strip_prefix("env:") {
        std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?
    } else if let Some(path) = reference.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {path}: {e}"))?
            .trim_end_matches(['\n', '\r'])
            .to_owned()
    } else {
        return Err("a secret in the config must be a reference: env:NAME or file:PATH".into());
    };
    if value.is_empty() {
        return Err(format!("{reference} is empty"));
    }
    Ok(SecretValue::new(value))
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// MCP-only hosts (`host` or `*.suffix`): every POST there must be inspectable JSON-RPC.
    pub servers: Vec<String>,
    /// When a pinned tool definition changes: `log` (default) or `deny` (hide the tool and
    /// refuse its calls until accepted on the admin API).
    pub tool_changes: ToolChanges,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ToolChanges {
    #[default]
    Log,
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Where decision log lines go: `stdout`, `stderr`, `off`, or a file path (appended).
    pub decision_log: String,
    /// OTLP collector endpoint (default: `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`; none: no export).
    pub otlp_endpoint: Option<String>,
    /// `grpc` (default) or `http/protobuf` (default: `OTEL_EXPORTER_OTLP_PROTOCOL`).
    pub otlp_protocol: Option<String>,
    /// Headers sent with every export (collector API keys): a value `env:NAME` or `file:PATH`
    /// is read from there, any other value is sent as written. Added to (and overriding)
    /// `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`.
    pub otlp_headers: BTreeMap<String, String>,
    /// Extra CA for an `https://` collector.
    pub otlp_ca: Option<PathBuf>,
    /// Resource `service.name` (default: `OTEL_SERVICE_NAME`, else `portcullis`).
    pub service_name: Option<String>,
    /// Fraction of new traces sampled (callers' sampled flags are honoured).
    pub sampling_ratio: f64,
    /// One compact line per action's span tree in the log (target `portcullis::span`);
    /// `dev` turns it on when no collector is given.
    pub span_summary: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            decision_log: "stdout".into(),
            otlp_endpoint: None,
            otlp_protocol: None,
            otlp_headers: BTreeMap::new(),
            otlp_ca: None,
            service_name: None,
            sampling_ratio: 1.0,
            span_summary: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_header_bytes: usize,
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    #[serde(with = "duration")]
    pub tls_handshake_timeout: Duration,
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    pub max_connections: usize,
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    pub inspect_body_bytes: usize,
    /// Time to receive a body that must be inspected (slow-body clients).
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
}

impl LimitsConfig {
    /// hyper's own header buffer limit sits above ours so our 431 (with the error contract)
    /// answers first; anything beyond it still gets hyper's bare 431.
    pub fn hyper_buf_size(&self) -> usize {
        (self.max_header_bytes * 2).max(8192)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(10),
            inspect_body_bytes: 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
        }
    }
}

mod defaults {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8443))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9901))
    }
    pub fn reload_interval() -> Duration {
        Duration::from_secs(2)
    }
    pub fn leaf_ttl() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn leaf_cache_size() -> u64 {
        10_000
    }
    pub fn entrypoint() -> String {
        "data.portcullis.decision".to_owned()
    }
    pub fn max_eval_time() -> Duration {
        Duration::from_millis(50)
    }
    pub fn max_instructions() -> u64 {
        1_000_000
    }
    pub fn client_auth() -> String {
        "basic".to_owned()
    }
    pub fn vault_mount() -> String {
        "secret".to_owned()
    }
    pub fn approle_mount() -> String {
        "approle".to_owned()
    }
    pub fn vault_cache_ttl() -> Duration {
        Duration::from_secs(300)
    }
    pub fn inject_header() -> String {
        "authorization".into()
    }
    pub fn inject_format() -> String {
        "Bearer {}".into()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn redis_prefix() -> String {
        "portcullis".into()
    }
    pub fn redis_timeout() -> Duration {
        Duration::from_millis(500)
    }
    pub fn redis_lock_ttl() -> Duration {
        Duration::from_secs(5)
    }
    pub fn vault_timeout() -> Duration {
        Duration::from_secs(5)
    }
}

/// Durations are written as `250ms`, `10s`, `5m`, `24h`.
pub mod duration {
    use super::*;

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m, h)"))?;
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("duration {s:?} must start with a whole number"))?;
        let secs = |k: u64| {
            n.checked_mul(k)
                .map(Duration::from_secs)
                .ok_or_else(|| format!("duration {s:?} is too large"))
        };
        match unit {
            "ms" => Ok(Duration::from_millis(n)),
            "s" => secs(1),
            "m" => secs(60),
            "h" => secs(3600),
            _ => Err(format!(
                "duration {s:?} has unknown unit {unit:?} (ms, s, m, h)"
            )),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Read, parse, resolve relative paths and validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, &file, base)
    }

    /// Parse YAML text; `base` is the directory relative paths are resolved against.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let at = inner
                .location()
                .map(|l| format!(" (line {} column {})", l.line(), l.column()))
                .unwrap_or_default();
            // serde_yaml_ng may already prefix its message with the path.
            let msg = inner.to_string();
            let msg = msg
                .strip_prefix(&format!("{key}: "))
                .unwrap_or(&msg)
                .to_owned();
            let msg = match at.is_empty() || msg.contains(" at line ") {
                true => msg,
                false => format!("{msg}{at}"),
            };
            ConfigError {
                file: file.to_owned(),
                key: if key == "." { "(document)".into() } else { key },
                reason: msg,
            }
        })?;
        cfg.resolve_paths(base);
        cfg.validate().map_err(|(key, reason)| ConfigError {
            file: file.to_owned(),
            key,
            reason,
        })?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.tls.cert.iter_mut().for_each(fix);
        self.tls.key.iter_mut().for_each(fix);
        self.trust_domains
            .values_mut()
            .for_each(|t| t.bundle.iter_mut().for_each(fix));
        fix(&mut self.mitm.ca_cert);
        fix(&mut self.mitm.ca_key);
        self.upstream.extra_roots.iter_mut().for_each(fix);
        self.policy.paths.iter_mut().for_each(fix);
        for c in &mut self.credentials {
            match &mut c.source {
                SourceConfig::File(p) => fix(p),
                SourceConfig::Oauth(o) => o.ca.iter_mut().for_each(fix),
                _ => {}
            }
        }
        if let Some(ca) = self.vault.as_mut().and_then(|v| v.ca.as_mut()) {
            fix(ca);
        }
        if let Some(ca) = self.redis.as_mut().and_then(|r| r.ca.as_mut()) {
            fix(ca);
        }
        self.telemetry.otlp_ca.iter_mut().for_each(fix);
        if !matches!(
            self.telemetry.decision_log.as_str(),
            "stdout" | "stderr" | "off"
        ) {
            let mut p = PathBuf::from(&self.telemetry.decision_log);
            fix(&mut p);
            self.telemetry.decision_log = p.display().to_string();
        }
    }

    /// Semantic checks serde cannot express. Returns `(key, reason)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, r: String| Err((k.to_owned(), r));
        if self.trust_domains.is_empty() {
            return err(
                "trust_domains",
                "at least one trust domain is required: no trust domain means no client can be authenticated".into(),
            );
        }
        let tls = &self.tls;
        match (&tls.cert, &tls.key, &tls.workload_api) {
            (Some(_), Some(_), None) => {}
            (None, None, Some(api)) => {
                if let Err(e) = crate::reload::workload_api::Endpoint::parse(api) {
                    return err("tls.workload_api", e);
                }
            }
            (Some(_), None, None) => return err("tls.key", "required with tls.cert".into()),
            (None, Some(_), None) => return err("tls.cert", "required with tls.key".into()),
            (None, None, None) => {
                return err(
                    "tls",
                    "give cert and key files, or workload_api (the SPIFFE Workload API socket)"
                        .into(),
                )
            }
            _ => {
                return err(
                    "tls",
                    "give either cert and key, or workload_api, not both".into(),
                )
            }
        }
        for (name, td) in &self.trust_domains {
            let key = format!("trust_domains.{name}");
            if let Err(e) = TrustDomain::parse(name) {
                return err(&key, e.to_string());
            }
            match (&td.bundle, td.workload_api) {
                (Some(_), false) => {}
                (None, true) if tls.workload_api.is_some() => {}
                (None, true) => {
                    return err(
                        &format!("{key}.workload_api"),
                        "needs tls.workload_api: the Workload API socket the bundles come from"
                            .into(),
                    )
                }
                (Some(_), true) => {
                    return err(
                        &key,
                        "give either bundle or workload_api: true, not both".into(),
                    )
                }
                (None, false) => {
                    return err(
                        &key,
                        "give bundle (a PEM file) or workload_api: true".into(),
                    )
                }
            }
        }
        let files = [
            ("tls.cert", tls.cert.as_ref()),
            ("tls.key", tls.key.as_ref()),
            ("mitm.ca_cert", Some(&self.mitm.ca_cert)),
            ("mitm.ca_key", Some(&self.mitm.ca_key)),
        ];
        let files = files
            .into_iter()
            .filter_map(|(k, p)| Some((k.to_owned(), p?)));
        let bundles = self
            .trust_domains
            .iter()
            .filter_map(|(k, v)| Some((format!("trust_domains.{k}.bundle"), v.bundle.as_ref()?)));
        let roots = self
            .upstream
            .extra_roots
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("upstream.extra_roots[{i}]"), p));
        for (key, path) in files.chain(bundles).chain(roots) {
            if !path.is_file() {
                return err(&key, format!("file {} does not exist", path.display()));
            }
        }
        if self.policy.paths.is_empty() {
            return err("policy.paths", "at least one path is required".into());
        }
        for (i, p) in self.policy.paths.iter().enumerate() {
            if !p.exists() {
                return err(
                    &format!("policy.paths[{i}]"),
                    format!("{} does not exist", p.display()),
                );
            }
        }
        if self.policy.max_eval_time.is_zero() || self.policy.max_instructions == 0 {
            return err(
                "policy",
                "max_eval_time and max_instructions must be greater than zero".into(),
            );
        }
        for (i, host) in self.mitm.passthrough.iter().enumerate() {
            let name = host.strip_prefix("*.").unwrap_or(host);
            if portcullis_filters::parse::destination::Host::parse(name).is_err() {
                return err(
                    &format!("mitm.passthrough[{i}]"),
                    format!("{host:?} is not a host name or *.suffix pattern"),
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut placeholders = std::collections::HashSet::new();
        for (i, c) in self.credentials.iter().enumerate() {
            let key = format!("credentials[{i}]");
            if c.name.is_empty()
                || !c
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return err(
                    &format!("{key}.name"),
                    format!("{:?} must be non-empty letters, digits or _", c.name),
                );
            }
            if portcullis_filters::parse::secret::Placeholder::parse(&c.placeholder()).is_none() {
                return err(
                    &format!("{key}.placeholder"),
                    format!(
                        "{:?} must be pcx_ followed by letters, digits or _",
                        c.placeholder()
                    ),
                );
            }
            if c.hosts.is_empty() {
                return err(
                    &format!("{key}.hosts"),
                    "required: a credential bound to no host could never be used safely".into(),
                );
            }
            if let SourceConfig::Oauth(o) = &c.source {
                if !(o.token_url.starts_with("https://") || o.token_url.starts_with("http://")) {
                    return err(
                        &format!("{key}.source.oauth.token_url"),
                        "must be an http(s) URL".into(),
                    );
                }
                if !(o.client_secret.starts_with("env:") || o.client_secret.starts_with("file:")) {
                    return err(
                        &format!("{key}.source.oauth.client_secret"),
                        "must be a reference (env:NAME or file:PATH), never a literal".into(),
                    );
                }
                match (o.grant, &o.refresh_token) {
                    (OAuthGrant::RefreshToken, None) => {
                        return err(
                            &format!("{key}.source.oauth.refresh_token"),
                            "required by the refresh_token grant".into(),
                        )
                    }
                    (OAuthGrant::RefreshToken, Some(r))
                        if !(r.starts_with("env:") || r.starts_with("file:")) =>
                    {
                        return err(
                            &format!("{key}.source.oauth.refresh_token"),
                            "must be a reference (env:NAME or file:PATH), never a literal".into(),
                        )
                    }
                    (OAuthGrant::ClientCredentials, Some(_)) => {
                        return err(
                            &format!("{key}.source.oauth.refresh_token"),
                            "only used with grant: refresh_token".into(),
                        )
                    }
                    _ => {}
                }
                if !matches!(o.client_auth.as_str(), "basic" | "post") {
                    return err(
                        &format!("{key}.source.oauth.client_auth"),
                        "basic or post".into(),
                    );
                }
            }
            if !names.insert(c.name.clone()) || !placeholders.insert(c.placeholder()) {
                return err(&key, format!("duplicate name or placeholder {:?}", c.name));
            }
        }
        let uses_vault = self
            .credentials
            .iter()
            .any(|c| matches!(c.source, SourceConfig::Vault(_)));
        match &self.vault {
            None if uses_vault => {
                return err(
                    "vault",
                    "a credential uses a vault source but there is no vault section".into(),
                )
            }
            Some(v) => {
                if !(v.address.starts_with("https://") || v.address.starts_with("http://")) {
                    return err(
                        "vault.address",
                        format!("{:?} must be an http(s) URL", v.address),
                    );
                }
                let refs = v
                    .token
                    .iter()
                    .chain(v.approle.iter().flat_map(|a| [&a.role_id, &a.secret_id]));
                for r in refs {
                    if !(r.starts_with("env:") || r.starts_with("file:")) {
                        return err(
                            "vault",
                            "token, role_id and secret_id must be references (env:NAME or file:PATH), never literals".into(),
                        );
                    }
                }
                if v.token.is_some() == v.approle.is_some() {
                    return err("vault", "give exactly one of token or approle".into());
                }
            }
            None => {}
        }
        if let Err((key, reason)) = self.validate_routes() {
            return err(&key, reason);
        }
        if let Some(r) = &self.redis {
            if let Err((key, reason)) = r.validate() {
                return err(&format!("redis.{key}"), reason);
            }
        }
        let protocol = match &self.telemetry.otlp_protocol {
            Some(p) => match crate::telemetry::otlp::Protocol::parse(p) {
                Some(p) => p,
                None => {
                    return err(
                        "telemetry.otlp_protocol",
                        format!("{p:?}: use grpc or http/protobuf"),
                    )
                }
            },
            None => crate::telemetry::otlp::Protocol::Grpc,
        };
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            if let Err(e) = crate::telemetry::otlp::export_url(protocol, endpoint) {
                return err("telemetry.otlp_endpoint", e);
            }
        }
        if let Some(name) = self
            .telemetry
            .otlp_headers
            .keys()
            .find(|n| http::HeaderName::from_bytes(n.as_bytes()).is_err())
        {
            return err(
                "telemetry.otlp_headers",
                format!("{name:?} is not a header name"),
            );
        }
        if !(0.0..=1.0).contains(&self.telemetry.sampling_ratio) {
            return err("telemetry.sampling_ratio", "must be between 0 and 1".into());
        }
        if self.mitm.cache_size == 0 {
            return err("mitm.cache_size", "must be at least 1".into());
        }
        if self.mitm.leaf_ttl < Duration::from_secs(300) {
            return err("mitm.leaf_ttl", "must be at least 5m".into());
        }
        if self.limits.max_header_bytes < 1024 {
            return err("limits.max_header_bytes", "must be at least 1024".into());
        }
        if self.limits.max_connections == 0 {
            return err("limits.max_connections", "must be at least 1".into());
        }
        let nonzero = [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.tls_timeout", self.upstream.tls_timeout),
            (
                "upstream.response_header_timeout",
                self.upstream.response_header_timeout,
            ),
            (
                "limits.header_read_timeout",
                self.limits.header_read_timeout,
            ),
            (
                "limits.tls_handshake_timeout",
                self.limits.tls_handshake_timeout,
            ),
            ("limits.idle_timeout", self.limits.idle_timeout),
            ("limits.body_read_timeout", self.limits.body_read_timeout),
            ("reload_interval", self.reload_interval),
        ];
        for (key, d) in nonzero {
            if d.is_zero() {
                return err(key, "must be greater than zero".into());
            }
        }
        Ok(())
    }

    /// The trust domains whose bundle is a file, as validated newtypes.
    pub fn trust_domain_bundles(&self) -> Vec<(TrustDomain, PathBuf)> {
        self.trust_domains
            .iter()
            .filter_map(|(k, v)| Some((TrustDomain::parse(k).ok()?, v.bundle.clone()?)))
            .collect()
    }

    /// The trust domains whose bundle comes from the Workload API.
    pub fn workload_api_trust_domains(&self) -> Vec<TrustDomain> {
        self.trust_domains
            .iter()
            .filter(|(_, v)| v.workload_api)
            .filter_map(|(k, _)| TrustDomain::parse(k).ok())
            .collect()
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listen={} admin={} trust_domains={}",
            self.listen,
            self.admin_listen,
            self.trust_domains
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            duration::parse("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(duration::parse("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(duration::parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(duration::parse("24h").unwrap(), Duration::from_secs(86400));
        for bad in ["", "10", "s", "1.5s", "10x", "-1s", "99999999999999999999h"] {
            assert!(duration::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e =
            Config::parse("listen: 127.0.0.1:1\nbogus: 1\n", "c.yaml", Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn missing_files_name_the_key() {
        let yaml = "tls: {cert: nope.pem, key: nope.key}\ntrust_domains: {acme.test: {bundle: b.pem}}\nmitm: {ca_cert: m.pem, ca_key: m.key}\npolicy: {paths: [p]}\n";
        let e = Config::parse(yaml, "c.yaml", Path::new("/nonexistent")).unwrap_err();
        assert_eq!(e.key, "tls.cert");
        assert!(e.reason.contains("/nonexistent/nope.pem"), "{e}");
    }

    #[test]
    fn a_config_without_policy_is_an_error() {
        let yaml = "tls: {cert: a, key: b}\ntrust_domains: {acme.test: {bundle: b.pem}}\nmitm: {ca_cert: m.pem, ca_key: m.key}\n";
        let e = Config::parse(yaml, "c.yaml", Path::new(".")).unwrap_err();
        assert!(e.reason.contains("policy"), "{e}");
    }

    fn tls_error(tls: &str, tds: &str) -> ConfigError {
        let yaml = format!("tls: {tls}\ntrust_domains: {tds}\nmitm: {{ca_cert: m.pem, ca_key: m.key}}\npolicy: {{paths: [p]}}\n");
        Config::parse(&yaml, "c.yaml", Path::new("/nonexistent")).unwrap_err()
    }

    #[test]
    fn tls_from_files_or_the_workload_api() {
        let api = "{workload_api: 'unix:///run/spire/agent.sock'}";
        let file_td = "{acme.test: {bundle: b.pem}}";
        let api_td = "{acme.test: {workload_api: true}}";
        #[rustfmt::skip]
        let cases = [
            ("{cert: a.pem}", file_td, "tls.key", "required with tls.cert"),
            ("{key: a.key}", file_td, "tls.cert", "required with tls.key"),
            ("{}", file_td, "tls", "cert and key files, or workload_api"),
            ("{cert: a, key: b, workload_api: 'unix:///a'}", file_td, "tls", "not both"),
            ("{workload_api: run/agent.sock}", file_td, "tls.workload_api", "unix:///"),
            ("{cert: a, key: b}", api_td, "trust_domains.acme.test.workload_api", "needs tls.workload_api"),
            (api, "{acme.test: {}}", "trust_domains.acme.test", "bundle (a PEM file) or workload_api"),
            (api, "{acme.test: {bundle: b.pem, workload_api: true}}", "trust_domains.acme.test", "not both"),
            (api, "{acme.test: {workload_api: 1}}", "trust_domains.acme.test.workload_api", ""),
            // With the Workload API nothing TLS-related needs a file: the next error is the MITM CA.
            (api, api_td, "mitm.ca_cert", "does not exist"),
        ];
        for (tls, tds, key, reason) in cases {
            let e = tls_error(tls, tds);
            assert_eq!(e.key, key, "{tls} {tds}: {e}");
            assert!(e.reason.contains(reason), "{tls} {tds}: {e}");
        }
    }

    #[test]
    fn bad_trust_domain_is_rejected() {
        let yaml = "tls: {cert: a, key: b}\ntrust_domains: {Acme.Test: {bundle: b.pem}}\nmitm: {ca_cert: m.pem, ca_key: m.key}\npolicy: {paths: [p]}\n";
        let e = Config::parse(yaml, "c.yaml", Path::new(".")).unwrap_err();
        assert_eq!(e.key, "trust_domains.Acme.Test");
    }
}
