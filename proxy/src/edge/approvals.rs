//! The approvers' side of the admin listener: `GET /approvals[?state=]`, `GET /approvals/{id}`,
//! `POST /approvals/{id}/approve|deny`, `GET /approvals/events` (server-sent events, one per
//! change) and the console (`/approvals/console`, a static page with its script and style).
//!
//! Who may decide: each of `approvals.approvers` with its own bearer token (the decision
//! records the name); without approvers, the admin token (recorded as `admin`), or anyone who
//! reaches a loopback admin listener without a token. The console's files need no token: the
//! page asks for it and sends it as a bearer header (no cookie, so no cross-site request can
//! decide).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use portcullis_filters::parse::secret::SecretValue;
use portcullis_filters::stages::approval::{ApprovalState, DecideError};

use super::admin::{bearer, same};
use crate::gates::Gates;
use crate::upstream::Body;

const CONSOLE_HTML: &str = include_str!("console/console.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Most records one listing returns.
const MAX_LISTED: usize = 1000;

/// Whether `path` is this module's.
pub fn handles(path: &str) -> bool {
    path == "/approvals" || path.starts_with("/approvals/")
}

pub async fn handle(
    req: Request<Incoming>,
    gates: &Gates,
    admin_token: Option<&SecretValue>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let get = req.method() == Method::GET;
    match (get, path.as_str()) {
        (true, "/approvals/console" | "/approvals/console/") => {
            return file(CONSOLE_HTML, "text/html; charset=utf-8")
        }
        (true, "/approvals/console.js") => {
            return file(CONSOLE_JS, "text/javascript; charset=utf-8")
        }
        (true, "/approvals/console.css") => return file(CONSOLE_CSS, "text/css; charset=utf-8"),
        _ => {}
    }
    let Some(approver) = approver(&req, gates, admin_token) else {
        let mut r = text(StatusCode::UNAUTHORIZED, "approver token required\n");
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return r;
    };
    let store = &gates.approvals.store;
    if get && path == "/approvals/events" {
        return events(gates);
    }
    if get && path == "/approvals" {
        let want = query_state(&req);
        let want = match want {
            Ok(w) => w,
            Err(e) => return text(StatusCode::BAD_REQUEST, &e),
        };
        return match store.list(MAX_LISTED).await {
            Ok(all) => {
                let shown: Vec<_> = all
                    .iter()
                    .filter(|r| want.is_none_or(|w| r.state == w))
                    .map(|r| r.to_json())
                    .collect();
                json(StatusCode::OK, &serde_json::Value::from(shown))
            }
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{e}\n")),
        };
    }
    let Some(rest) = path.strip_prefix("/approvals/") else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let (id, verb) = match rest.split_once('/') {
        Some((id, verb)) => (id, Some(verb)),
        None => (rest, None),
    };
    match (req.method().clone(), verb) {
        (Method::GET, None) => match store.get(id).await {
            Ok(Some(rec)) => json(StatusCode::OK, &rec.to_json()),
            Ok(None) => text(StatusCode::NOT_FOUND, &format!("no approval {id}\n")),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{e}\n")),
        },
        (Method::POST, Some(verb @ ("approve" | "deny"))) => {
            let grant = verb == "approve";
            match store.decide(id, grant, &approver).await {
                Ok(rec) => {
                    let d = &gates.decisions;
                    let counter = if grant { &d.granted } else { &d.denied };
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let waited = rec
                        .decided_at_ms
                        .unwrap_or(0)
                        .saturating_sub(rec.created_ms);
                    d.wait_ms
                        .fetch_add(waited, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(approval = %rec.id, decision = rec.state.as_str(),
                        approver = %approver, identity = %rec.identity, "approval decided");
                    json(StatusCode::OK, &rec.to_json())
                }
                Err(e @ DecideError::NotFound(_)) => text(StatusCode::NOT_FOUND, &format!("{e}\n")),
                Err(e @ DecideError::NotPending(..)) => {
                    text(StatusCode::CONFLICT, &format!("{e}\n"))
                }
                Err(e @ DecideError::Store(_)) => {
                    text(StatusCode::SERVICE_UNAVAILABLE, &format!("{e}\n"))
                }
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The approver's name, when the request carries a token that may decide.
fn approver(
    req: &Request<Incoming>,
    gates: &Gates,
    admin_token: Option<&SecretValue>,
) -> Option<String> {
    let given = bearer(req);
    if !gates.approvers.is_empty() {
        let given = given?;
        return gates
            .approvers
            .iter()
            .find(|(_, token)| same(given, token.expose().as_bytes()))
            .map(|(name, _)| name.clone());
    }
    match admin_token {
        Some(token) => same(given?, token.expose().as_bytes()).then(|| "admin".to_owned()),
        // A loopback admin listener without a token (the config refuses any other).
        None => Some("admin".to_owned()),
    }
}

fn query_state(req: &Request<Incoming>) -> Result<Option<ApprovalState>, String> {
    let q: std::collections::HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    match q.get("state").map(String::as_str) {
        None | Some("all") => Ok(None),
        Some(s) => ApprovalState::parse(s).map(Some).ok_or_else(|| {
            format!("unknown state {s:?} (pending, granted, denied, expired, all)\n")
        }),
    }
}

/// `text/event-stream`: `event: change` with `{"id", "state"}` per change, `: ping` every 15 s.
fn events(gates: &Gates) -> Response<Body> {
    let rx = gates.approvals.store.changes();
    let mut ping = tokio::time::interval(Duration::from_secs(15));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = futures_util::stream::unfold((rx, ping), |(mut rx, mut ping)| async move {
        let chunk = tokio::select! {
            got = rx.recv() => match got {
                Ok(c) => format!(
                    "event: change\ndata: {}\n\n",
                    serde_json::json!({"id": c.id, "state": c.state.as_str()})
                ),
                // Missed some: the console refetches on any event.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    "event: change\ndata: {}\n\n".to_owned()
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            },
            _ = ping.tick() => ": ping\n\n".to_owned(),
        };
        Some((
            Ok::<_, crate::upstream::BoxError>(hyper::body::Frame::data(Bytes::from(chunk))),
            (rx, ping),
        ))
    });
    let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed());
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

fn file(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(crate::http::error::full(body));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

fn text(code: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(crate::http::error::full(body.to_owned()));
    *r.status_mut() = code;
    r
}

fn json(code: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = text(code, &value.to_string());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
