//! The checks serde cannot express, one function per config section, each naming the exact key
//! it refuses. Shapes (secret references, URLs, addresses, protocols) were already parsed into
//! types by serde; what is left here is about values together and about the files named.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use portcullis_filters::parse::destination::Host;
use portcullis_filters::parse::identity::TrustDomain;
use portcullis_filters::parse::secret::Placeholder;

use super::{Config, OAuthGrant, OAuthSourceConfig, RedisConfig, SourceConfig};

/// A semantic problem with one key (`Config::parse` adds the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct Invalid {
    pub key: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, reason: impl ToString) -> Invalid {
        Invalid {
            key: key.into(),
            reason: reason.to_string(),
        }
    }
}

fn invalid<T>(key: impl Into<String>, reason: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid::new(key, reason.into()))
}

type Checked = Result<(), Invalid>;

impl Config {
    /// Every section, in the order a reader meets them in the README's table.
    pub fn validate(&self) -> Checked {
        self.validate_identity()?;
        self.validate_files()?;
        self.validate_policy()?;
        self.validate_mitm()?;
        self.validate_credentials()?;
        self.validate_vault()?;
        self.validate_routes()?;
        if let Some(r) = &self.redis {
            r.validate().map_err(|e| Invalid {
                key: format!("redis.{}", e.key),
                reason: e.reason,
            })?;
        }
        self.validate_telemetry()?;
        self.validate_admin()?;
        self.validate_approvals()?;
        self.validate_rate_limits()?;
        self.validate_delegation()?;
        self.validate_limits()
    }

    fn validate_delegation(&self) -> Checked {
        let Some(d) = &self.delegation else {
            return Ok(());
        };
        if http::HeaderName::from_bytes(d.header.as_bytes()).is_err() {
            return invalid("delegation.header", "not a header name");
        }
        let reserved = ["authorization", "proxy-authorization", "cookie", "host"];
        if reserved.contains(&d.header.to_ascii_lowercase().as_str()) {
            return invalid(
                "delegation.header",
                "pick a header of its own: this one is the upstream's or the proxy's",
            );
        }
        if d.issuers.is_empty() {
            return invalid("delegation.issuers", "at least one issuer is required");
        }
        if d.max_skew > Duration::from_secs(600) {
            return invalid("delegation.max_skew", "at most 10m");
        }
        for (i, is) in d.issuers.iter().enumerate() {
            let key = |k: &str| format!("delegation.issuers[{i}].{k}");
            if is.issuer.is_empty() {
                return invalid(key("issuer"), "required");
            }
            if is.audiences.is_empty() || is.audiences.iter().any(String::is_empty) {
                return invalid(key("audiences"), "at least one non-empty audience");
            }
            match (&is.jwks_url, &is.jwks_file) {
                (Some(url), None) => {
                    let ok = url.parse::<http::Uri>().ok().is_some_and(|u| {
                        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                    });
                    if !ok {
                        return invalid(key("jwks_url"), "must be an http:// or https:// URL");
                    }
                }
                (None, Some(_)) => {}
                _ => return invalid(key("jwks_url"), "give jwks_url or jwks_file (one)"),
            }
        }
        Ok(())
    }

    fn validate_approvals(&self) -> Checked {
        let a = &self.approvals;
        if a.max_pending == 0 {
            return invalid("approvals.max_pending", "must be at least 1");
        }
        if a.pending_ttl.is_zero() {
            return invalid("approvals.pending_ttl", "must be longer than 0s");
        }
        if a.hold > Duration::from_secs(3600) {
            return invalid(
                "approvals.hold",
                "at most 1h: a held request keeps its connection",
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, ap) in a.approvers.iter().enumerate() {
            let ok = !ap.name.is_empty()
                && ap.name.len() <= 64
                && ap
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-@".contains(&b));
            if !ok {
                return invalid(
                    format!("approvals.approvers[{i}].name"),
                    "1..=64 of [A-Za-z0-9_.-@]: it is recorded as who decided",
                );
            }
            if !names.insert(ap.name.as_str()) {
                return invalid(
                    format!("approvals.approvers[{i}].name"),
                    format!("{:?} is named twice", ap.name),
                );
            }
        }
        if let Some(w) = &a.webhook {
            let ok = w.url.parse::<http::Uri>().ok().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                return invalid(
                    "approvals.webhook.url",
                    "must be an http:// or https:// URL",
                );
            }
        }
        Ok(())
    }

    fn validate_rate_limits(&self) -> Checked {
        let r = &self.rate_limits;
        if r.max_keys == 0 {
            return invalid("rate_limits.max_keys", "must be at least 1");
        }
        if r.in_flight_per_identity == Some(0) {
            return invalid("rate_limits.in_flight_per_identity", "must be at least 1");
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, l) in r.limits.iter().enumerate() {
            let key = |k: &str| format!("rate_limits.limits[{i}].{k}");
            let ok = !l.name.is_empty()
                && l.name.len() <= 64
                && l.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
            if !ok || l.name == "in_flight" {
                return invalid(
                    key("name"),
                    "1..=64 of [a-z0-9_.-], not in_flight (reserved)",
                );
            }
            if !names.insert(l.name.as_str()) {
                return invalid(key("name"), format!("{:?} is named twice", l.name));
            }
            for b in &l.by {
                if portcullis_filters::stages::quota::KeyPart::parse(b).is_none() {
                    return invalid(
                        key("by"),
                        format!("unknown {b:?} (identity, destination, route, method, tool)"),
                    );
                }
            }
            if let Err(e) = portcullis_policy::Rate::parse(&l.rate) {
                return invalid(key("rate"), e);
            }
            if l.burst == Some(0) {
                return invalid(key("burst"), "must be at least 1");
            }
        }
        Ok(())
    }

    /// The admin API revokes credentials and accepts tool pins: off loopback it needs a token.
    fn validate_admin(&self) -> Checked {
        if self.admin_token.is_none() && !self.admin_listen.ip().is_loopback() {
            return invalid(
                "admin_token",
                format!(
                    "admin_listen {} is not a loopback address: set admin_token (env:NAME or file:PATH), \
                     the admin API revokes credentials and accepts tool pins",
                    self.admin_listen
                ),
            );
        }
        Ok(())
    }

    /// `tls` and `trust_domains`: where the proxy's certificate and the bundles come from.
    fn validate_identity(&self) -> Checked {
        if self.trust_domains.is_empty() {
            return invalid(
                "trust_domains",
                "at least one trust domain is required: no trust domain means no client can be authenticated",
            );
        }
        let tls = &self.tls;
        match (&tls.cert, &tls.key, &tls.workload_api) {
            (Some(_), Some(_), None) | (None, None, Some(_)) => {}
            (Some(_), None, None) => return invalid("tls.key", "required with tls.cert"),
            (None, Some(_), None) => return invalid("tls.cert", "required with tls.key"),
            (None, None, None) => {
                return invalid(
                    "tls",
                    "give cert and key files, or workload_api (the SPIFFE Workload API socket)",
                )
            }
            _ => return invalid("tls", "give either cert and key, or workload_api, not both"),
        }
        for (name, td) in &self.trust_domains {
            let key = format!("trust_domains.{name}");
            if let Err(e) = TrustDomain::parse(name) {
                return invalid(key, e.to_string());
            }
            match (&td.bundle, td.workload_api) {
                (Some(_), false) => {}
                (None, true) if tls.workload_api.is_some() => {}
                (None, true) => {
                    return invalid(
                        format!("{key}.workload_api"),
                        "needs tls.workload_api: the Workload API socket the bundles come from",
                    )
                }
                (Some(_), true) => {
                    return invalid(key, "give either bundle or workload_api: true, not both")
                }
                (None, false) => {
                    return invalid(key, "give bundle (a PEM file) or workload_api: true")
                }
            }
            if td.workload_api && td.jwt_bundle.is_some() {
                return invalid(
                    format!("{key}.jwt_bundle"),
                    "with workload_api: true the JWT bundle comes from the Workload API too",
                );
            }
        }
        Ok(())
    }

    /// Every certificate, key and bundle file named must exist.
    fn validate_files(&self) -> Checked {
        let tls = &self.tls;
        let named = [
            ("tls.cert", tls.cert.as_ref()),
            ("tls.key", tls.key.as_ref()),
            ("mitm.ca_cert", Some(&self.mitm.ca_cert)),
            ("mitm.ca_key", Some(&self.mitm.ca_key)),
        ];
        let named = named
            .into_iter()
            .filter_map(|(k, p)| Some((k.to_owned(), p?)));
        let bundles = self.trust_domains.iter().flat_map(|(k, v)| {
            let bundle = v
                .bundle
                .as_ref()
                .map(|p| (format!("trust_domains.{k}.bundle"), p));
            let jwt = v.jwt_bundle.as_ref();
            bundle
                .into_iter()
                .chain(jwt.map(|p| (format!("trust_domains.{k}.jwt_bundle"), p)))
        });
        let roots = self
            .upstream
            .extra_roots
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("upstream.extra_roots[{i}]"), p));
        for (key, path) in named.chain(bundles).chain(roots) {
            if !path.is_file() {
                return invalid(key, format!("file {} does not exist", path.display()));
            }
        }
        Ok(())
    }

    fn validate_policy(&self) -> Checked {
        let policy = &self.policy;
        if policy.paths.is_empty() {
            return invalid("policy.paths", "at least one path is required");
        }
        if let Some(shadow) = &policy.shadow {
            if shadow.paths.is_empty() {
                return invalid("policy.shadow.paths", "at least one path is required");
            }
            if let Some((i, p)) = shadow.paths.iter().enumerate().find(|(_, p)| !p.exists()) {
                return invalid(
                    format!("policy.shadow.paths[{i}]"),
                    format!("{} does not exist", p.display()),
                );
            }
        }
        for (i, p) in policy.paths.iter().enumerate() {
            if !p.exists() {
                return invalid(
                    format!("policy.paths[{i}]"),
                    format!("{} does not exist", p.display()),
                );
            }
        }
        if policy.max_eval_time.is_zero() || policy.max_instructions == 0 {
            return invalid(
                "policy",
                "max_eval_time and max_instructions must be greater than zero",
            );
        }
        let l = &policy.input_limits;
        for (key, value, min) in [
            ("path_bytes", l.path_bytes, 256),
            ("query_keys", l.query_keys, 1),
            ("header_names", l.header_names, 16),
            ("values_per_key", l.values_per_key, 1),
            ("string_bytes", l.string_bytes, 64),
            ("header_value_bytes", l.header_value_bytes, 64),
            ("mcp_depth", l.mcp_depth, 4),
            ("mcp_nodes", l.mcp_nodes, 16),
            ("mcp_string_bytes", l.mcp_string_bytes, 64),
        ] {
            if value < min {
                return invalid(
                    format!("policy.input_limits.{key}"),
                    format!("must be at least {min}"),
                );
            }
        }
        if l.mcp_depth > 128 {
            // serde_json refuses deeper JSON anyway; the converter recurses that deep.
            return invalid("policy.input_limits.mcp_depth", "must be at most 128");
        }
        Ok(())
    }

    fn validate_mitm(&self) -> Checked {
        for (i, host) in self.mitm.passthrough.iter().enumerate() {
            let name = host.strip_prefix("*.").unwrap_or(host);
            if Host::parse(name).is_err() {
                return invalid(
                    format!("mitm.passthrough[{i}]"),
                    format!("{host:?} is not a host name or *.suffix pattern"),
                );
            }
        }
        if self.mitm.cache_size == 0 {
            return invalid("mitm.cache_size", "must be at least 1");
        }
        if self.mitm.leaf_ttl < Duration::from_secs(300) {
            return invalid("mitm.leaf_ttl", "must be at least 5m");
        }
        Ok(())
    }

    fn validate_credentials(&self) -> Checked {
        let mut names = HashSet::new();
        let mut placeholders = HashSet::new();
        for (i, c) in self.credentials.iter().enumerate() {
            let key = format!("credentials[{i}]");
            let name_ok = !c.name.is_empty()
                && c.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name_ok {
                return invalid(
                    format!("{key}.name"),
                    format!("{:?} must be non-empty letters, digits or _", c.name),
                );
            }
            if Placeholder::parse(&c.placeholder()).is_none() {
                return invalid(
                    format!("{key}.placeholder"),
                    format!(
                        "{:?} must be pcx_ followed by letters, digits or _",
                        c.placeholder()
                    ),
                );
            }
            if c.hosts.is_empty() {
                return invalid(
                    format!("{key}.hosts"),
                    "required: a credential bound to no host could never be used safely",
                );
            }
            if let SourceConfig::Oauth(o) = &c.source {
                validate_oauth(o, &format!("{key}.source.oauth"))?;
            }
            if let SourceConfig::TokenExchange(t) | SourceConfig::JwtBearer(t) = &c.source {
                let k = format!("{key}.source");
                let url_ok = t.token_url.parse::<http::Uri>().ok().is_some_and(|u| {
                    matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                });
                if !url_ok {
                    return invalid(
                        format!("{k}.token_url"),
                        "must be an http:// or https:// URL",
                    );
                }
                if !matches!(t.client_auth.as_str(), "basic" | "post") {
                    return invalid(format!("{k}.client_auth"), "basic or post");
                }
                if self.delegation.is_none() {
                    return invalid(
                        k,
                        "needs `delegation`: the subject token is the request's delegation token",
                    );
                }
            }
            if !names.insert(c.name.clone()) || !placeholders.insert(c.placeholder()) {
                return invalid(key, format!("duplicate name or placeholder {:?}", c.name));
            }
        }
        Ok(())
    }

    fn validate_vault(&self) -> Checked {
        let uses_vault = self
            .credentials
            .iter()
            .any(|c| matches!(c.source, SourceConfig::Vault(_)));
        let Some(v) = &self.vault else {
            return match uses_vault {
                true => invalid(
                    "vault",
                    "a credential uses a vault source but there is no vault section",
                ),
                false => Ok(()),
            };
        };
        if !is_http_url(&v.address) {
            return invalid(
                "vault.address",
                format!("{:?} must be an http(s) URL", v.address),
            );
        }
        if v.token.is_some() == v.approle.is_some() {
            return invalid("vault", "give exactly one of token or approle");
        }
        Ok(())
    }

    fn validate_routes(&self) -> Checked {
        if self.bearer_listen.is_some() && !self.routes.iter().any(|r| r.jwt_svid.is_some()) {
            return invalid(
                "bearer_listen",
                "no route takes JWT-SVID callers (routes[].jwt_svid): nothing would be served",
            );
        }
        let mut names = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            let name_ok = !r.name.is_empty()
                && r.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return invalid(
                    format!("{key}.name"),
                    format!("{:?} must be non-empty letters, digits, - or _", r.name),
                );
            }
            if !names.insert(&r.name) {
                return invalid(
                    format!("{key}.name"),
                    format!("duplicate route {:?}", r.name),
                );
            }
            if !r.matches.path_prefix.starts_with('/') {
                return invalid(format!("{key}.match.path_prefix"), "must start with /");
            }
            match (&r.jwt_svid, self.bearer_listen) {
                (Some(j), _) if j.audience.trim().is_empty() => {
                    return invalid(format!("{key}.jwt_svid.audience"), "must not be empty")
                }
                (Some(_), None) => {
                    return invalid(
                        format!("{key}.jwt_svid"),
                        "needs bearer_listen: JWT-SVID callers have their own listener",
                    )
                }
                _ => {}
            }
            let Some(name) = &r.credential else {
                continue;
            };
            let Some(c) = self.credentials.iter().find(|c| &c.name == name) else {
                return invalid(
                    format!("{key}.credential"),
                    format!("no credential named {name:?}"),
                );
            };
            let dest = &r.upstream.destination;
            if !c.hosts.iter().any(|b| b.covers(dest)) {
                let hosts: Vec<String> = c.hosts.iter().map(ToString::to_string).collect();
                return invalid(
                    format!("{key}.credential"),
                    format!(
                        "credential {name:?} is not bound to {}://{} (its hosts: {hosts:?})",
                        dest.scheme,
                        dest.authority()
                    ),
                );
            }
        }
        Ok(())
    }

    fn validate_telemetry(&self) -> Checked {
        let t = &self.telemetry;
        if let Some(name) = t
            .otlp_headers
            .keys()
            .find(|n| http::HeaderName::from_bytes(n.as_bytes()).is_err())
        {
            return invalid(
                "telemetry.otlp_headers",
                format!("{name:?} is not a header name"),
            );
        }
        if !(0.0..=1.0).contains(&t.sampling_ratio) {
            return invalid("telemetry.sampling_ratio", "must be between 0 and 1");
        }
        if t.decision_log_input && t.decision_log_input_max_bytes < 1024 {
            return invalid(
                "telemetry.decision_log_input_max_bytes",
                "must be at least 1024 (an input is rarely smaller)",
            );
        }
        Ok(())
    }

    /// `limits`, and every timeout anywhere: zero would mean "never" or "at once".
    fn validate_limits(&self) -> Checked {
        let l = &self.limits;
        for (key, bytes) in [
            ("limits.buffered_body_bytes", l.buffered_body_bytes),
            (
                "limits.buffered_body_bytes_per_connection",
                l.buffered_body_bytes_per_connection,
            ),
        ] {
            if bytes <= l.inspect_body_bytes {
                return invalid(
                    key,
                    "must be larger than limits.inspect_body_bytes (one body must fit)",
                );
            }
        }
        if self.limits.max_header_bytes < 1024 {
            return invalid("limits.max_header_bytes", "must be at least 1024");
        }
        if self.limits.max_connections == 0 {
            return invalid("limits.max_connections", "must be at least 1");
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
            ("limits.max_connection_age", self.limits.max_connection_age),
            ("limits.body_read_timeout", self.limits.body_read_timeout),
            ("reload_interval", self.reload_interval),
        ];
        match nonzero.iter().find(|(_, d)| d.is_zero()) {
            Some((key, _)) => invalid(*key, "must be greater than zero"),
            None => Ok(()),
        }
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

fn is_http_url(s: &str) -> bool {
    s.starts_with("https://") || s.starts_with("http://")
}

fn validate_oauth(o: &OAuthSourceConfig, key: &str) -> Checked {
    if !is_http_url(&o.token_url) {
        return invalid(format!("{key}.token_url"), "must be an http(s) URL");
    }
    match (o.grant, &o.refresh_token) {
        (OAuthGrant::RefreshToken, None) => invalid(
            format!("{key}.refresh_token"),
            "required by the refresh_token grant",
        ),
        (OAuthGrant::ClientCredentials, Some(_)) => invalid(
            format!("{key}.refresh_token"),
            "only used with grant: refresh_token",
        ),
        _ if !matches!(o.client_auth.as_str(), "basic" | "post") => {
            invalid(format!("{key}.client_auth"), "basic or post")
        }
        _ => Ok(()),
    }
}

impl RedisConfig {
    /// Keys relative to `redis.`.
    fn validate(&self) -> Checked {
        let info =
            redis::IntoConnectionInfo::into_connection_info(self.url.as_str()).map_err(|e| {
                Invalid {
                    key: "url".into(),
                    reason: format!("not a Redis URL: {e}"),
                }
            })?;
        if info.redis_settings().password().is_some() {
            return invalid(
                "url",
                "has a password in it: put a reference (env:NAME or file:PATH) in redis.password instead",
            );
        }
        if self.timeout.is_zero() || self.lock_ttl.is_zero() {
            return invalid("timeout/lock_ttl", "must be greater than zero");
        }
        if self.prefix.is_empty() {
            return invalid("prefix", "must not be empty");
        }
        Ok(())
    }
}
