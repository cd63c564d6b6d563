//! The configuration: one serde tree with `deny_unknown_fields`, defaults in one place
//! (`Default` impls below), and `validate()` that reports the exact key and reason. Relative paths
//! are resolved against the config file's directory when loading.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

mod types;
mod validate;

pub use validate::Invalid;

pub use types::{
    OtlpEndpoint, OtlpProtocol, SecretRef, UpstreamUrl, ValueOrRef, WorkloadApiEndpoint,
};

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
    /// A second TLS listener, without client certificates, for gateway callers that present
    /// a JWT-SVID as `Authorization: Bearer` instead (routes with `jwt_svid`); off when absent.
    #[serde(default)]
    pub bearer_listen: Option<SocketAddr>,
    /// Bearer token the admin listener requires on every endpoint but `/healthz` and
    /// `/readyz` (`env:NAME` or `file:PATH`). Required when `admin_listen` is not loopback.
    #[serde(default)]
    pub admin_token: Option<SecretRef>,
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
    /// Human approval of calls a decision marks (`approval: {...}`).
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// Rate limits declared here (besides those decisions ask for) and in-flight limits.
    #[serde(default)]
    pub rate_limits: RateLimitsConfig,
    /// Who the agent acts for: a JWT in a request header, verified against allowed issuers.
    #[serde(default)]
    pub delegation: Option<DelegationConfig>,
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
    pub workload_api: Option<WorkloadApiEndpoint>,
}

impl TlsConfig {
    /// The certificate and key files, when the certificate comes from files.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        Some((self.cert.as_deref()?, self.key.as_deref()?))
    }

    /// The Workload API address (validated by `Config::validate`).
    pub fn workload_api(&self) -> Option<WorkloadApiEndpoint> {
        self.workload_api.clone()
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
    /// The trust domain's JWT authorities (a SPIFFE bundle or JWK Set, JSON), to verify the
    /// JWT-SVIDs its workloads send; with `workload_api: true` they come from there instead.
    #[serde(default)]
    pub jwt_bundle: Option<PathBuf>,
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
    /// Bounds of the request-controlled parts of the policy input; a request over one is
    /// refused (400/431/413), never decided on a truncated view.
    #[serde(default)]
    pub input_limits: portcullis_policy::InputLimits,
    /// A candidate policy decided beside this one on every action, never enforced.
    #[serde(default)]
    pub shadow: Option<ShadowConfig>,
}

/// `policy.shadow`: loaded, tested and hot-reloaded like the enforcing policy (same entrypoint
/// unless given, same limits); its decisions are counted, logged and traced, never enforced.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    pub paths: Vec<PathBuf>,
    #[serde(default)]
    pub entrypoint: Option<String>,
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
            .inspect(|set| log_loaded(set, "enforcing"))
    }

    /// Load the shadow policy, with the same rule (its tests must pass).
    pub fn load_shadow(
        &self,
    ) -> Option<Result<portcullis_policy::PolicySet, portcullis_policy::PolicyError>> {
        let shadow = self.shadow.as_ref()?;
        Some(
            portcullis_policy::PolicySet::load_tested(
                &shadow.paths,
                shadow.entrypoint.as_deref().unwrap_or(&self.entrypoint),
                self.limits(),
            )
            .inspect(|set| log_loaded(set, "shadow")),
        )
    }
}

/// What a loaded policy set reads of the input (the only parts built for it) and whether
/// its decisions are remembered (README "Policy": "What the engine is given").
fn log_loaded(set: &portcullis_policy::PolicySet, role: &'static str) {
    let reads = set.input_reads().join(", ");
    let decisions = match set.not_remembered_because() {
        None => "remembered per thread for the exact values read".to_owned(),
        Some(why) => format!("evaluated every time: {why}"),
    };
    tracing::info!(policy = role, revision = %set.revision(), reads = %reads,
        decisions = %decisions, "policy loaded");
}

/// One brokered credential. The secret itself is never in the config, only where to get it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    pub name: String,
    /// Default `pcx_<name>`.
    #[serde(default)]
    pub placeholder: Option<String>,
    /// The only destinations it may be substituted for. Required. `host` or `*.suffix` means
    /// `https` on 443; `host:port`, `host:*` (any port) and `http://host[:port]` (cleartext,
    /// only where written so) widen it explicitly.
    pub hosts: Vec<portcullis_filters::parse::destination::Binding>,
    /// `{env: VAR}` or `{file: path}`.
    #[serde(with = "serde_yaml_ng::with::singleton_map")]
    pub source: SourceConfig,
    /// Also substitute placeholders inside request bodies (buffered up to the inspection limit).
    #[serde(default)]
    pub body: bool,
    /// At most one refresh (drop the cached value, fetch it again) per this interval when an
    /// upstream answers 401, across replicas when `redis` is configured: an agent cannot
    /// cause a fetch storm against Vault or the OAuth server.
    #[serde(default = "defaults::refresh_interval", with = "duration")]
    pub refresh_interval: Duration,
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
    pub upstream: UpstreamUrl,
    /// A credential whose placeholder is injected (see `credentials[].inject`).
    #[serde(default)]
    pub credential: Option<String>,
    /// Remove `path_prefix` before forwarding (default true).
    #[serde(default = "defaults::yes")]
    pub strip_prefix: bool,
    /// Also take callers on `bearer_listen` whose JWT-SVID, issued for `audience`, comes as
    /// `Authorization: Bearer` (off by default: mTLS only).
    #[serde(default)]
    pub jwt_svid: Option<RouteJwtSvidConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteJwtSvidConfig {
    pub audience: String,
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
    /// An access token minted for the principal a request is made for, by OAuth 2.0 Token
    /// Exchange (RFC 8693) of its verified delegation token; cached per principal.
    #[serde(rename = "token_exchange")]
    TokenExchange(TokenExchangeConfig),
    /// The same, by the JWT bearer grant (RFC 7523): the delegation token is the `assertion`
    /// (`subject_token_type` is not used).
    #[serde(rename = "jwt_bearer")]
    JwtBearer(TokenExchangeConfig),
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenExchangeConfig {
    pub token_url: String,
    pub client_id: String,
    /// A reference: `env:NAME` or `file:PATH`.
    pub client_secret: SecretRef,
    /// `basic` (default) or `post`.
    #[serde(default = "defaults::client_auth")]
    pub client_auth: String,
    /// `audience` and `resource` of the request (RFC 8693 §2.1), when the server wants them.
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default)]
    pub resource: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The type of the delegation token sent as `subject_token`.
    #[serde(default = "defaults::subject_token_type")]
    pub subject_token_type: String,
    /// An `actor_token` naming the calling workload (token exchange only).
    #[serde(default)]
    pub actor: Option<ActorConfig>,
    #[serde(default = "defaults::refresh_before", with = "duration")]
    pub refresh_before: Duration,
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default = "defaults::vault_timeout", with = "duration")]
    pub timeout: Duration,
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
    pub refresh_token: Option<SecretRef>,
    pub client_id: String,
    /// A reference: `env:NAME` or `file:PATH`.
    pub client_secret: SecretRef,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub audience: Option<String>,
    /// `basic` (HTTP Basic, the default) or `post` (in the form body).
    #[serde(default = "defaults::client_auth")]
    pub client_auth: String,
    /// A token is used until this long before it expires (its `expires_in`), so no request
    /// carries a dying token; one that expires sooner is used for the request that fetched it
    /// only. A token without `expires_in` is taken to live 5 minutes.
    #[serde(default = "defaults::refresh_before", with = "duration")]
    pub refresh_before: Duration,
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
    pub token: Option<SecretRef>,
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
    pub password: Option<SecretRef>,
    /// A reference to 32 random bytes, base64: the AES-256-GCM key for cached values.
    pub encryption_key: SecretRef,
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
    pub role_id: SecretRef,
    pub secret_id: SecretRef,
    #[serde(default = "defaults::approle_mount")]
    pub mount: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// MCP-only hosts (`host` or `*.suffix`): every POST there must be inspectable JSON-RPC.
    pub servers: Vec<String>,
    /// When a pinned tool definition changes: `log` (default) or `deny` (hide the tool and
    /// refuse its calls until accepted on the admin API).
    pub tool_changes: ToolChanges,
    /// Most JSON-RPC messages in one request: a larger batch is refused (413).
    pub max_batch: usize,
    /// Most tool pins kept per MCP server and in all; a tool first seen without room is not
    /// pinned and counts as changed.
    pub max_pins_per_server: usize,
    pub max_pins: usize,
    /// Most JSON-RPC messages (denials) queued for one HTTP+SSE event stream that its client
    /// is not reading: a denied POST beyond that is refused with 503 `overloaded`.
    pub sse_queue: usize,
}

impl Default for McpConfig {
    fn default() -> McpConfig {
        McpConfig {
            servers: Vec::new(),
            tool_changes: ToolChanges::default(),
            max_batch: 256,
            max_pins_per_server: 1000,
            max_pins: 100_000,
            sse_queue: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// How long a call that needs an approval waits for it (`0s`: refused at once with
    /// `approval_required`, to be retried).
    #[serde(with = "duration")]
    pub hold: Duration,
    /// Most calls waiting at once; more are refused at once.
    pub max_held: usize,
    /// `Retry-After` of an `approval_required` refusal.
    #[serde(with = "duration")]
    pub retry_after: Duration,
    /// How long a pending approval waits for an approver before it expires.
    #[serde(with = "duration")]
    pub pending_ttl: Duration,
    /// Most approvals pending at once (in memory, or in Redis as seen by this replica); a new
    /// one beyond is refused with 503 `approval_unavailable`.
    pub max_pending: usize,
    /// Who may decide (admin API, CLI, console), each with a bearer token; the decision
    /// records the name. Without approvers, `admin_token` (recorded as `admin`) decides.
    pub approvers: Vec<ApproverConfig>,
    /// POSTed a JSON announcement of each new pending approval: a URL, or
    /// `{url, headers, ca, timeout}`.
    #[serde(deserialize_with = "webhook_setting")]
    pub webhook: Option<WebhookConfig>,
}

impl Default for ApprovalsConfig {
    fn default() -> ApprovalsConfig {
        ApprovalsConfig {
            hold: Duration::ZERO,
            max_held: 256,
            retry_after: Duration::from_secs(30),
            pending_ttl: Duration::from_secs(3600),
            max_pending: 10_000,
            approvers: Vec::new(),
            webhook: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverConfig {
    pub name: String,
    /// `env:NAME` or `file:PATH`.
    pub token: SecretRef,
}

/// `approvals.webhook`: a URL alone, or the whole object.
fn webhook_setting<'de, D: Deserializer<'de>>(d: D) -> Result<Option<WebhookConfig>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Setting {
        Url(String),
        Full(WebhookConfig),
    }
    Ok(match Option::<Setting>::deserialize(d)? {
        None => None,
        Some(Setting::Url(url)) => Some(WebhookConfig {
            url,
            ca: None,
            headers: BTreeMap::new(),
            timeout: defaults::webhook_timeout(),
        }),
        Some(Setting::Full(w)) => Some(w),
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL, called directly like Vault (the operator configured it,
    /// so not through the egress guard), TLS verified with the system roots and `ca`.
    pub url: String,
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Extra request headers (values may be `env:`/`file:` references).
    #[serde(default)]
    pub headers: BTreeMap<String, ValueOrRef>,
    #[serde(default = "defaults::webhook_timeout", with = "duration")]
    pub timeout: Duration,
}

/// The actor token of a token exchange: exactly one of these.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActorConfig {
    /// A JWT the proxy signs for each exchange: `sub` = the caller's SPIFFE ID (the agent),
    /// `iss` = `issuer`, `aud` = `audience` (default: the token URL), valid `ttl`; ES256 with a
    /// P-256 PKCS#8 key whose public half the authorization server trusts (as `kid`).
    #[serde(default)]
    pub assertion: Option<ActorAssertionConfig>,
    /// The caller's own JWT-SVID (sent in `x-portcullis-jwt-svid`, verified by the proxy),
    /// which must be issued for `audience`; without one the credential is refused.
    #[serde(default)]
    pub jwt_svid: Option<ActorJwtSvidConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActorJwtSvidConfig {
    pub audience: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActorAssertionConfig {
    pub key: PathBuf,
    pub kid: String,
    pub issuer: String,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default = "defaults::actor_ttl", with = "duration")]
    pub ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationConfig {
    /// The request header carrying the token (`Bearer ` prefix optional); stripped before the
    /// request goes upstream.
    #[serde(default = "defaults::delegation_header")]
    pub header: String,
    pub issuers: Vec<DelegationIssuerConfig>,
    /// Claims copied into `input.delegation.claims` (besides sub, iss, aud, scope, act).
    #[serde(default)]
    pub claims: Vec<String>,
    /// Clock difference tolerated on `exp`, `nbf` and `iat`.
    #[serde(default = "defaults::delegation_skew", with = "duration")]
    pub max_skew: Duration,
    /// How long a fetched JWKS is used before it is fetched again (a token naming an unknown
    /// `kid` fetches sooner, at most every 30 s).
    #[serde(default = "defaults::jwks_refresh", with = "duration")]
    pub jwks_refresh: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationIssuerConfig {
    /// Exactly the `iss` its tokens carry.
    pub issuer: String,
    /// Where its keys are: a JWKS URL (fetched, cached, refreshed) or a file.
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// `aud` must hold one of these.
    pub audiences: Vec<String>,
    /// CA for the JWKS URL (besides the system roots).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default = "defaults::vault_timeout", with = "duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    pub limits: Vec<RateLimitConfig>,
    /// Most HTTP/MCP requests in flight per identity on this replica (tunnels not counted).
    pub in_flight_per_identity: Option<u32>,
    /// Most buckets a replica keeps in memory (the local limiter, and the fallback when Redis
    /// is down); beyond, new keys are refused with 503 `overloaded`.
    pub max_keys: usize,
}

impl Default for RateLimitsConfig {
    fn default() -> RateLimitsConfig {
        RateLimitsConfig {
            limits: Vec::new(),
            in_flight_per_identity: None,
            max_keys: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The metrics label (`[a-z0-9_.-]`).
    pub name: String,
    /// What the bucket is keyed by: any of `identity`, `destination`, `route`, `method`,
    /// `tool` (one bucket per value; `[]`: one bucket for everything).
    #[serde(default)]
    pub by: Vec<String>,
    /// `N/s`, `N/m`, `N/h`, `N/d` or `N/<duration>`.
    pub rate: String,
    /// Calls allowed at once (default: the rate's count).
    #[serde(default)]
    pub burst: Option<u32>,
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
    /// Bytes of decision-log lines that may wait for the output; beyond, lines are dropped
    /// and counted (a request never waits for the log).
    pub decision_log_buffer: usize,
    /// OTLP collector endpoint (default: `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`; none: no export).
    pub otlp_endpoint: Option<OtlpEndpoint>,
    /// `grpc` (default) or `http/protobuf` (default: `OTEL_EXPORTER_OTLP_PROTOCOL`).
    pub otlp_protocol: Option<OtlpProtocol>,
    /// Headers sent with every export (collector API keys): a value `env:NAME` or `file:PATH`
    /// is read from there, any other value is sent as written. Added to (and overriding)
    /// `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`.
    pub otlp_headers: BTreeMap<String, ValueOrRef>,
    /// Extra CA for an `https://` collector.
    pub otlp_ca: Option<PathBuf>,
    /// Resource `service.name` (default: `OTEL_SERVICE_NAME`, else `portcullis`).
    pub service_name: Option<String>,
    /// Fraction of new traces sampled (callers' sampled flags are honoured).
    pub sampling_ratio: f64,
    /// One compact line per action's span tree in the log (target `portcullis::span`);
    /// `dev` turns it on when no collector is given.
    pub span_summary: bool,
    /// Add each decision's policy input (as the engine read it: credential headers redacted)
    /// to its decision-log line, for `portcullis policy replay`.
    pub decision_log_input: bool,
    /// Largest input written on a line; a larger one is left out (`input_omitted` says its
    /// size) and counted.
    pub decision_log_input_max_bytes: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            decision_log: "stdout".into(),
            decision_log_buffer: 4 << 20,
            otlp_endpoint: None,
            otlp_protocol: None,
            otlp_headers: BTreeMap::new(),
            otlp_ca: None,
            service_name: None,
            sampling_ratio: 1.0,
            span_summary: false,
            decision_log_input: false,
            decision_log_input_max_bytes: 64 << 10,
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
    /// A client connection (and its tunnels) is closed gracefully after this long, so every
    /// connection's identity is re-established by a handshake at least this often.
    #[serde(with = "duration")]
    pub max_connection_age: Duration,
    /// Request-body bytes buffered for inspection at once, process-wide (over: 503).
    pub buffered_body_bytes: usize,
    /// The same, per client connection (over: 429).
    pub buffered_body_bytes_per_connection: usize,
    pub max_connections: usize,
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    pub inspect_body_bytes: usize,
    /// Time to receive a body that must be inspected (slow-body clients).
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
}

impl LimitsConfig {
    /// The most a request head may take before the proxy stops reading it (431): the HTTP/1.1
    /// head gate's limit and h2's `SETTINGS_MAX_HEADER_LIST_SIZE` (and with it h2's
    /// CONTINUATION frame count). Well above `max_header_bytes`, so a header block over that
    /// reaches the hygiene filter, which names the limit; past this (8× the limit, at least
    /// 64 KiB) the gate refuses on HTTP/1.1, and h2 itself answers a bare 431 or GOAWAY.
    pub fn head_read_bytes(&self) -> usize {
        self.max_header_bytes.saturating_mul(8).max(64 * 1024)
    }

    /// hyper's HTTP/1.1 read buffer: room for the largest head the gate passes and what
    /// follows it, so hyper never refuses a head on its own.
    pub fn hyper_buf_size(&self) -> usize {
        self.head_read_bytes().saturating_mul(2)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connection_age: Duration::from_secs(3600),
            buffered_body_bytes: 256 << 20,
            buffered_body_bytes_per_connection: 32 << 20,
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(10),
            inspect_body_bytes: 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
        }
    }
}

mod defaults {
    use std::net::SocketAddr;

    pub fn refresh_interval() -> std::time::Duration {
        std::time::Duration::from_secs(30)
    }
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
    pub fn refresh_before() -> Duration {
        Duration::from_secs(30)
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
    pub fn webhook_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn actor_ttl() -> Duration {
        Duration::from_secs(60)
    }
    pub fn subject_token_type() -> String {
        "urn:ietf:params:oauth:token-type:jwt".into()
    }
    pub fn delegation_header() -> String {
        "x-portcullis-on-behalf-of".into()
    }
    pub fn delegation_skew() -> Duration {
        Duration::from_secs(60)
    }
    pub fn jwks_refresh() -> Duration {
        Duration::from_secs(300)
    }
}

/// Durations are written as `250ms`, `10s`, `5m`, `24h`, `7d`.
pub mod duration {
    use super::*;

    pub use portcullis_policy::parse_duration as parse;

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
        cfg.validate().map_err(|e| ConfigError {
            file: file.to_owned(),
            key: e.key,
            reason: e.reason,
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
            .for_each(|t| t.bundle.iter_mut().chain(&mut t.jwt_bundle).for_each(fix));
        fix(&mut self.mitm.ca_cert);
        fix(&mut self.mitm.ca_key);
        self.upstream.extra_roots.iter_mut().for_each(fix);
        self.policy.paths.iter_mut().for_each(fix);
        if let Some(shadow) = self.policy.shadow.as_mut() {
            shadow.paths.iter_mut().for_each(fix);
        }
        for c in &mut self.credentials {
            match &mut c.source {
                SourceConfig::File(p) => fix(p),
                SourceConfig::Oauth(o) => o.ca.iter_mut().for_each(fix),
                SourceConfig::TokenExchange(t) | SourceConfig::JwtBearer(t) => {
                    t.ca.iter_mut().for_each(fix);
                    if let Some(a) = t.actor.as_mut().and_then(|a| a.assertion.as_mut()) {
                        fix(&mut a.key);
                    }
                }
                _ => {}
            }
        }
        if let Some(ca) = self.vault.as_mut().and_then(|v| v.ca.as_mut()) {
            fix(ca);
        }
        if let Some(ca) = self.redis.as_mut().and_then(|r| r.ca.as_mut()) {
            fix(ca);
        }
        if let Some(ca) = self.approvals.webhook.as_mut().and_then(|w| w.ca.as_mut()) {
            fix(ca);
        }
        if let Some(d) = self.delegation.as_mut() {
            for i in &mut d.issuers {
                i.ca.iter_mut().for_each(fix);
                i.jwks_file.iter_mut().for_each(fix);
            }
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
    fn a_webhook_is_a_url_or_an_object() {
        let parse = |yaml: &str| -> ApprovalsConfig { serde_yaml_ng::from_str(yaml).unwrap() };
        let short = parse("webhook: https://hooks.example/approvals\n");
        let w = short.webhook.unwrap();
        assert_eq!(w.url, "https://hooks.example/approvals");
        assert_eq!(w.timeout, defaults::webhook_timeout());
        let full = parse("webhook: {url: 'http://127.0.0.1:9/h', timeout: 2s}\n");
        assert_eq!(full.webhook.unwrap().timeout, Duration::from_secs(2));
        assert!(parse("hold: 5s\n").webhook.is_none());
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
