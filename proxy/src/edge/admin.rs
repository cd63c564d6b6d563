//! The admin listener (plain HTTP, bind it to loopback or set `admin_token`): `/healthz`
//! (process up), `/readyz` (listeners, certificates and bundles loaded), `/metrics`
//! (Prometheus text), credential and identity revocation, MCP tool pins, approvals.

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::credentials::LocalSecrets;
use crate::edge::revocation::{Record, Selector, KINDS};
use crate::edge::tls::Trust;
use crate::http::error::full;
use crate::http::mitm::LeafStats;
use crate::http::Shared;
use crate::upstream::Body;
use portcullis_filters::parse::secret::SecretValue;
use portcullis_filters::stages::credentials::SecretStore as _;

/// Process-wide state the admin endpoints report.
#[derive(Debug, Default)]
pub struct Status {
    pub ready: AtomicBool,
    pub reloads: AtomicU64,
    pub reload_errors: AtomicU64,
    /// Of those, the policy's own (`reloads` and `reload_errors` count every kind).
    pub policy_reloads: AtomicU64,
    pub policy_reload_errors: AtomicU64,
}

/// The admin API. With a token (`admin_token`), every endpoint but the probes requires
/// `Authorization: Bearer <token>` (401 otherwise).
pub async fn serve(
    listener: TcpListener,
    token: Option<Arc<SecretValue>>,
    status: Arc<Status>,
    shared: Arc<crate::http::Shared>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let (status, shared, token) = (status.clone(), shared.clone(), token.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (status, shared, token) = (status.clone(), shared.clone(), token.clone());
                async move {
                    // Approvers have their own tokens (see `approvals`).
                    if super::approvals::handles(req.uri().path()) {
                        let gates = &shared.ops.gates;
                        return Ok::<_, Infallible>(
                            super::approvals::handle(req, gates, token.as_deref()).await,
                        );
                    }
                    let probe = matches!(req.uri().path(), "/healthz" | "/readyz");
                    if let (Some(token), false) = (&token, probe) {
                        if !authorized(&req, token) {
                            let mut r =
                                text(StatusCode::UNAUTHORIZED, "admin token required\n".into());
                            r.headers_mut().insert(
                                http::header::WWW_AUTHENTICATE,
                                http::HeaderValue::from_static("Bearer"),
                            );
                            return Ok::<_, Infallible>(r);
                        }
                    }
                    if req.method() == http::Method::POST
                        && req.uri().path() == "/credentials/revoke"
                    {
                        return Ok::<_, Infallible>(revoke(&req, &shared).await);
                    }
                    if req.uri().path().starts_with("/identity/") {
                        return Ok::<_, Infallible>(identity(&req, &shared).await);
                    }
                    let pending = match req.uri().path() {
                        "/metrics" => pending_approvals(&shared).await,
                        _ => None,
                    };
                    Ok::<_, Infallible>(route(&req, &status, &shared, pending))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// `Authorization: Bearer <token>`, compared in constant time.
fn authorized(req: &Request<Incoming>, token: &SecretValue) -> bool {
    bearer(req).is_some_and(|given| same(given, token.expose().as_bytes()))
}

/// The token of an `Authorization: Bearer` header.
pub(super) fn bearer(req: &Request<Incoming>) -> Option<&[u8]> {
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
}

/// Equal, compared in constant time (tokens).
pub(super) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn query(req: &Request<Incoming>) -> std::collections::HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn text(code: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = code;
    r
}

/// `POST /credentials/revoke?name=NAME`: drop the cached value so the next use refetches.
async fn revoke(req: &Request<Incoming>, shared: &Shared) -> Response<Body> {
    match query(req).get("name") {
        Some(name) if shared.ops.secrets.revoke(name).await => {
            text(StatusCode::OK, format!("revoked {name}\n"))
        }
        Some(name) => text(
            StatusCode::NOT_FOUND,
            format!("no credential named {name}\n"),
        ),
        None => text(StatusCode::BAD_REQUEST, "give ?name=CREDENTIAL\n".into()),
    }
}

/// Identity revocations: `GET /identity/revocations`, and `POST /identity/revoke` or
/// `/identity/restore` with one selector (`?id=`, `?prefix=`, `?serial=` or `?sha256=`; revoke
/// also takes `&reason=`). Applied here at once; with Redis, stored and announced to the other
/// replicas (a failure to share answers 502: in force on this replica only).
async fn identity(req: &Request<Incoming>, shared: &Shared) -> Response<Body> {
    let trust = shared.verifier.trust();
    let post = req.method() == http::Method::POST;
    let path = req.uri().path();
    if path == "/identity/revocations" && req.method() == http::Method::GET {
        let all: Vec<_> = trust.revocations().records().cloned().collect();
        return json(StatusCode::OK, &serde_json::json!(all));
    }
    if !post || !matches!(path, "/identity/revoke" | "/identity/restore") {
        return text(StatusCode::NOT_FOUND, "not found\n".into());
    }
    let q = query(req);
    let given: Vec<_> = KINDS
        .iter()
        .filter_map(|k| q.get(*k).map(|v| (*k, v)))
        .collect();
    let selector = match given.as_slice() {
        [(kind, value)] => Selector::parse(kind, value),
        _ => Err(format!("give exactly one of ?{}=", KINDS.join("=, ?"))),
    };
    let selector = match selector {
        Ok(s) => s,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let store = shared.ops.secrets.shared();
    if path == "/identity/revoke" {
        let reason = q.get("reason").map_or("", String::as_str);
        let record = Record::new(&selector, reason, std::time::SystemTime::now());
        trust.revoke(selector, record.clone());
        tracing::info!(revocation = %record.selector, reason = %record.reason,
            "operator revoked an identity");
        let shared_err = match store {
            Some(store) => store.share_revocation(&record).await.err(),
            None => None,
        };
        return match shared_err {
            None => json(StatusCode::OK, &record),
            Some(e) => text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "revoked {} on this replica only: redis: {e}\n",
                    record.selector
                ),
            ),
        };
    }
    if !trust.restore(&selector) && store.is_none() {
        return text(
            StatusCode::NOT_FOUND,
            format!("{selector} is not revoked\n"),
        );
    }
    tracing::info!(revocation = %selector, "operator restored an identity");
    match store {
        Some(store) => match store.share_restore(&selector).await {
            Ok(()) => text(StatusCode::OK, format!("restored {selector}\n")),
            Err(e) => text(
                StatusCode::BAD_GATEWAY,
                format!("restored {selector} on this replica only: redis: {e}\n"),
            ),
        },
        None => text(StatusCode::OK, format!("restored {selector}\n")),
    }
}

fn json(code: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let mut r = text(code, serde_json::to_string(value).unwrap_or_default());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Approval records pending and expired now, as the store lists them (`None` when it cannot
/// be read).
async fn pending_approvals(shared: &Shared) -> Option<(usize, usize)> {
    use portcullis_filters::stages::approval::ApprovalState;
    let all = shared.ops.gates.approvals.store.list(10_000).await.ok()?;
    let count = |state| all.iter().filter(|r| r.state == state).count();
    Some((count(ApprovalState::Pending), count(ApprovalState::Expired)))
}

fn route(
    req: &Request<Incoming>,
    status: &Status,
    shared: &Shared,
    pending: Option<(usize, usize)>,
) -> Response<Body> {
    let leaf = &shared.mitm.stats;
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if status.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        "/metrics" => {
            let mut out = metrics(status, leaf, &shared.ops.secrets, shared.verifier.trust());
            shared.ops.metrics.render(&mut out);
            shared.ops.gates.render_metrics(&mut out, pending);
            if let Some(slot) = &shared.ops.shadow {
                let loaded = slot.current().is_some();
                shared.ops.metrics.shadow.render(&mut out, loaded);
            }
            let _ = writeln!(
                out,
                "# HELP portcullis_buffered_body_bytes Request-body bytes held for inspection now (of limits.buffered_body_bytes).\n# TYPE portcullis_buffered_body_bytes gauge\nportcullis_buffered_body_bytes {}",
                shared.body_budget.held_bytes()
            );
            let pins = &shared.ops.pins;
            let _ = writeln!(
                out,
                "# HELP portcullis_mcp_pins MCP tool pins kept (of mcp.max_pins).\n# TYPE portcullis_mcp_pins gauge\nportcullis_mcp_pins {}\n# HELP portcullis_mcp_pins_refused_total Tools first seen without room for a pin (they count as changed).\n# TYPE portcullis_mcp_pins_refused_total counter\nportcullis_mcp_pins_refused_total {}",
                pins.len(),
                pins.refused.load(std::sync::atomic::Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "# HELP portcullis_runtime_alive_tasks Tokio tasks alive now (spawned, not yet finished).\n# TYPE portcullis_runtime_alive_tasks gauge\nportcullis_runtime_alive_tasks {}",
                tokio::runtime::Handle::try_current().map_or(0, |h| h.metrics().num_alive_tasks())
            );
            text(StatusCode::OK, out)
        }
        "/mcp/pins" if req.method() == http::Method::GET => {
            let pins: Vec<serde_json::Value> = shared
                .ops
                .pins
                .list()
                .into_iter()
                .map(|(server, tool, pinned, changed_to)| {
                    serde_json::json!({"server": server, "tool": tool, "pinned": pinned, "changed_to": changed_to})
                })
                .collect();
            text(StatusCode::OK, serde_json::Value::from(pins).to_string())
        }
        "/mcp/pins/accept" if req.method() == http::Method::POST => {
            let q = query(req);
            match (q.get("server"), q.get("tool")) {
                (Some(s), Some(t)) if shared.ops.pins.accept(s, t) => {
                    tracing::info!(server = %s, tool = %t, "operator accepted a changed MCP tool definition");
                    text(StatusCode::OK, "accepted\n".into())
                }
                (Some(_), Some(_)) => text(
                    StatusCode::NOT_FOUND,
                    "no pending change for that tool\n".into(),
                ),
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "give ?server=HOST:PORT&tool=NAME\n".into(),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn metrics(status: &Status, leaf: &LeafStats, secrets: &LocalSecrets, trust: &Trust) -> String {
    let mut out = String::new();
    let redis_errors = secrets
        .shared()
        .map_or(0, |s| s.errors.load(Ordering::Relaxed));
    let rows = [
        (
            "portcullis_identity_revocations",
            "gauge",
            trust.revocations().len() as u64,
        ),
        (
            "portcullis_identity_revoked_handshakes_total",
            "counter",
            trust.refused_handshakes.load(Ordering::Relaxed),
        ),
        (
            "portcullis_identity_revoked_connections_total",
            "counter",
            trust.closed_connections.load(Ordering::Relaxed),
        ),
        (
            "portcullis_credential_fetches_total",
            "counter",
            secrets.stats.fetches.load(Ordering::Relaxed),
        ),
        (
            "portcullis_credential_fetch_errors_total",
            "counter",
            secrets.stats.errors.load(Ordering::Relaxed),
        ),
        ("portcullis_redis_errors_total", "counter", redis_errors),
        (
            "portcullis_mitm_leaf_cache_hits_total",
            "counter",
            leaf.hits.load(Ordering::Relaxed),
        ),
        (
            "portcullis_mitm_leaf_cache_misses_total",
            "counter",
            leaf.misses.load(Ordering::Relaxed),
        ),
        (
            "portcullis_mitm_leaf_issue_microseconds_total",
            "counter",
            leaf.issue_nanos.load(Ordering::Relaxed) / 1000,
        ),
        (
            "portcullis_reloads_total",
            "counter",
            status.reloads.load(Ordering::Relaxed),
        ),
        (
            "portcullis_reload_errors_total",
            "counter",
            status.reload_errors.load(Ordering::Relaxed),
        ),
        (
            "portcullis_policy_reloads_total",
            "counter",
            status.policy_reloads.load(Ordering::Relaxed),
        ),
        (
            "portcullis_policy_reload_errors_total",
            "counter",
            status.policy_reload_errors.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, value) in rows {
        let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
    }
    out
}
