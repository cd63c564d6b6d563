//! Gateway mode: an origin-form request on the proxy listener (`GET /github/repos/...`, sent
//! to Portcullis as if it were the API) is matched against `routes` and becomes a request to
//! the route's fixed upstream, which then goes through the same pipeline as any other
//! (identity, policy with `input.gateway.route`, credentials, MCP, telemetry, egress guard).
//! A route that names a credential gets its placeholder injected when the request has none;
//! the usual substitution (bound hosts only) turns it into the secret.

use http::{HeaderName, HeaderValue, Response, Uri};
use portcullis_filters::parse::destination::{split_authority, Destination, Scheme};

use http::header::HOST;
use hyper::body::Incoming;
use portcullis_filters::{Context, ErrorCode, Rejection, Via};

use crate::config::{CredentialConfig, Invalid, RouteConfig};
use crate::http::forward::forward;
use crate::http::{no_destination, refuse, Conn, Shared};
use crate::upstream::Body;

#[derive(Debug)]
pub struct Route {
    pub name: std::sync::Arc<str>,
    host: Option<String>,
    prefix: String,
    strip_prefix: bool,
    pub upstream: Destination,
    /// The upstream's base path, without a trailing `/`.
    base_path: String,
    /// Header and value (with the placeholder) to add when absent.
    inject: Option<(HeaderName, HeaderValue)>,
    /// The audience a bearer JWT-SVID must name for this route (`jwt_svid`), when the route
    /// takes such callers on `bearer_listen`.
    pub jwt_svid_audience: Option<String>,
}

#[derive(Debug, Default)]
pub struct Routes {
    /// Most specific first: host-bound before any-host, then longer prefixes first.
    routes: Vec<Route>,
}

impl Routes {
    /// Built from a validated config.
    pub fn new(routes: &[RouteConfig], creds: &[CredentialConfig]) -> Result<Routes, Invalid> {
        let mut out = Vec::with_capacity(routes.len());
        for (i, r) in routes.iter().enumerate() {
            let key = || format!("routes[{i}].credential");
            let upstream = r.upstream.destination.clone();
            let base_path = r.upstream.base_path.clone();
            let inject = match &r.credential {
                Some(name) => {
                    let c = creds
                        .iter()
                        .find(|c| &c.name == name)
                        .ok_or_else(|| Invalid::new(key(), format!("no credential {name:?}")))?;
                    let inj = c.inject.clone().unwrap_or_default();
                    let header = HeaderName::from_bytes(inj.header.as_bytes())
                        .map_err(|e| Invalid::new(key(), format!("inject.header: {e}")))?;
                    let value =
                        HeaderValue::from_str(&inj.format.replacen("{}", &c.placeholder(), 1))
                            .map_err(|e| Invalid::new(key(), format!("inject.format: {e}")))?;
                    Some((header, value))
                }
                None => None,
            };
            out.push(Route {
                name: r.name.as_str().into(),
                host: r.matches.host.as_ref().map(|h| h.to_ascii_lowercase()),
                prefix: r.matches.path_prefix.clone(),
                strip_prefix: r.strip_prefix,
                upstream,
                base_path,
                inject,
                jwt_svid_audience: r.jwt_svid.as_ref().map(|j| j.audience.clone()),
            });
        }
        out.sort_by(|a, b| {
            (b.host.is_some(), b.prefix.len()).cmp(&(a.host.is_some(), a.prefix.len()))
        });
        Ok(Routes { routes: out })
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route for a request to `host` (the Host header, port ignored) and `path`. A prefix
    /// matches whole segments: `/github` matches `/github` and `/github/x`, not `/githubx`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        // The Host header's name without its port (a malformed one matches no host-bound route).
        let host = host
            .and_then(|h| split_authority(h).ok())
            .map(|(h, _)| h.to_ascii_lowercase());
        self.routes.iter().find(|r| {
            let host_ok = match (&r.host, &host) {
                (None, _) => true,
                (Some(want), Some(got)) => want == got,
                (Some(_), None) => false,
            };
            host_ok && prefix_matches(&r.prefix, path)
        })
    }
}

/// A route's base path must never be escaped: a path with a dot segment (`.`, `..`, or
/// either percent-encoded) or an encoded `/` or `\` could reach the upstream as another path
/// than the route and the policy saw (an upstream or a framework normalises it). Refused.
fn escapes_base(path: &str) -> Result<(), String> {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return Err("the path has an encoded or backslash separator".into());
    }
    let dots = lower.replace("%2e", ".");
    if dots.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("the path has a dot segment".into());
    }
    Ok(())
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'))
}

impl Route {
    /// The upstream URI for a request's path and query.
    pub fn upstream_uri(&self, uri: &Uri) -> Result<Uri, String> {
        let path = uri.path();
        escapes_base(path)?;
        let rest = match self.strip_prefix {
            true => &path[self.prefix.len().min(path.len())..],
            false => path,
        };
        let rest = rest.trim_start_matches('/');
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        // `/prefix` alone goes to the base path itself (`/` for none).
        let sep = if rest.is_empty() && !self.base_path.is_empty() {
            ""
        } else {
            "/"
        };
        let scheme = match self.upstream.scheme {
            Scheme::Https => "https",
            Scheme::Http => "http",
        };
        format!(
            "{scheme}://{}{}{sep}{rest}{query}",
            self.upstream.authority(),
            self.base_path
        )
        .parse()
        .map_err(|e| format!("cannot build the upstream URI: {e}"))
    }

    /// Add the credential's placeholder header when the request has none.
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        if let Some((name, value)) = &self.inject {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
}

/// An origin-form request in gateway mode from an mTLS caller: route it, or 404 `no_route`.
pub(crate) async fn handle(
    shared: &Shared,
    conn: &Conn,
    parts: http::request::Parts,
    body: Incoming,
) -> Response<Body> {
    let Some(route) = shared.routes.find(host_of(&parts), parts.uri.path()) else {
        let reason = format!("no gateway route matches {}", parts.uri.path());
        let ctx = Context::new(conn.peer.clone(), Via::Gateway, no_destination(), &parts);
        return refuse(shared, ctx, Rejection::new(ErrorCode::NoRoute, reason));
    };
    let caller = Caller {
        peer: &conn.peer,
        body_budget: &conn.body_budget,
        jwt_svid: None,
    };
    to_route(shared, caller, route, parts, body).await
}

/// The request's Host header, as text.
pub(crate) fn host_of(parts: &http::request::Parts) -> Option<&str> {
    parts.headers.get(HOST).and_then(|h| h.to_str().ok())
}

/// Who sent a gateway request: an mTLS peer, or a bearer caller authenticated by its JWT-SVID.
pub(crate) struct Caller<'a> {
    pub peer: &'a std::sync::Arc<portcullis_filters::Peer>,
    pub body_budget: &'a crate::http::budget::Budget,
    pub jwt_svid: Option<std::sync::Arc<portcullis_filters::parse::jwt::JwtSvid>>,
}

/// Send a request to `route`'s upstream through the pipeline.
pub(crate) async fn to_route(
    shared: &Shared,
    caller: Caller<'_>,
    route: &Route,
    mut parts: http::request::Parts,
    body: Incoming,
) -> Response<Body> {
    let uri = route.upstream_uri(&parts.uri);
    let unroutable = uri.as_ref().err().cloned();
    if let Ok(uri) = uri {
        parts.uri = uri;
    }
    route.inject(&mut parts.headers);
    let mut ctx = Context::new(
        caller.peer.clone(),
        Via::Gateway,
        route.upstream.clone(),
        &parts,
    );
    ctx.gateway_route = Some(route.name.clone());
    ctx.jwt_svid = caller.jwt_svid;
    if let Some(why) = unroutable {
        let rej = Rejection::new(
            ErrorCode::BadRequest,
            format!("the path cannot be routed: {why}"),
        );
        return refuse(shared, ctx, rej);
    }
    forward(shared, caller.body_budget, ctx, parts, body).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{RouteMatch, SourceConfig};

    fn route(
        name: &str,
        host: Option<&str>,
        prefix: &str,
        upstream: &str,
        strip: bool,
    ) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            matches: RouteMatch {
                host: host.map(str::to_owned),
                path_prefix: prefix.into(),
            },
            upstream: crate::config::UpstreamUrl::try_from(upstream.to_owned()).unwrap(),
            credential: None,
            strip_prefix: strip,
            jwt_svid: None,
        }
    }

    fn routes() -> Routes {
        let cfg = [
            route("gh", None, "/github/", "https://api.github.com", true),
            route(
                "ghv",
                None,
                "/github/v2",
                "https://api.github.com/v2/",
                true,
            ),
            route("keep", None, "/keep", "https://example.com/base", false),
            route(
                "hosted",
                Some("gw.example.com"),
                "/github/",
                "https://ghe.example.com",
                true,
            ),
        ];
        Routes::new(&cfg, &[]).unwrap_or_default()
    }

    fn target(r: &Routes, host: Option<&str>, uri: &str) -> Option<(String, String)> {
        let uri: Uri = uri.parse().ok()?;
        let route = r.find(host, uri.path())?;
        Some((
            route.name.to_string(),
            route.upstream_uri(&uri).ok()?.to_string(),
        ))
    }

    #[test]
    fn most_specific_route_wins_and_paths_are_rewritten() {
        let r = routes();
        let t = |h, u: &str| target(&r, h, u);
        assert_eq!(
            t(None, "/github/repos/o/r?x=1"),
            Some((
                "gh".into(),
                "https://api.github.com:443/repos/o/r?x=1".into()
            ))
        );
        assert_eq!(
            t(None, "/github/v2/users"),
            Some(("ghv".into(), "https://api.github.com:443/v2/users".into()))
        );
        assert_eq!(
            t(Some("GW.example.com:8443"), "/github/x"),
            Some(("hosted".into(), "https://ghe.example.com:443/x".into()))
        );
        assert_eq!(
            t(None, "/keep/a"),
            Some(("keep".into(), "https://example.com:443/base/keep/a".into()))
        );
        assert_eq!(
            t(None, "/github/v2"),
            Some(("ghv".into(), "https://api.github.com:443/v2".into()))
        );
        assert_eq!(t(None, "/keeper"), None, "prefixes match whole segments");
        for escape in [
            "/keep/../admin",
            "/keep/%2e%2e/admin",
            "/keep/.%2E/admin",
            "/keep/a%2F..%2Fadmin",
            "/keep/a%5c..%5cadmin",
            "/keep/./a",
            "/keep/a/..",
        ] {
            assert_eq!(t(None, escape), None, "{escape} escapes the base path");
        }
        assert!(
            t(None, "/keep/a..b/.well-known").is_some(),
            "dots inside a name are fine"
        );
        assert_eq!(t(None, "/gitlab/x"), None);
        assert_eq!(t(None, "/github"), None, "/github/ needs the slash");
    }

    #[test]
    fn credential_placeholder_is_injected_only_when_absent() {
        let mut cfg = route("gh", None, "/github/", "https://api.github.com", true);
        cfg.credential = Some("github".into());
        let cred = CredentialConfig {
            name: "github".into(),
            placeholder: None,
            hosts: vec![
                portcullis_filters::parse::destination::Binding::parse("api.github.com").unwrap(),
            ],
            source: SourceConfig::Env("X".into()),
            body: false,
            refresh_interval: std::time::Duration::from_secs(30),
            inject: None,
        };
        let r = Routes::new(&[cfg], &[cred]).unwrap_or_default();
        let route = r.find(None, "/github/x");
        let mut h = http::HeaderMap::new();
        route.iter().for_each(|r| r.inject(&mut h));
        assert_eq!(
            h.get("authorization").and_then(|v| v.to_str().ok()),
            Some("Bearer pcx_github")
        );
        let mut h = http::HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer pcx_other"),
        );
        route.iter().for_each(|r| r.inject(&mut h));
        assert_eq!(
            h.get("authorization").and_then(|v| v.to_str().ok()),
            Some("Bearer pcx_other")
        );
    }
}
