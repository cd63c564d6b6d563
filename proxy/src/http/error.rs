//! The one place a [`Rejection`] becomes an HTTP response: status, `x-portcullis-error` and the
//! JSON body `{"error", "reason", "trace_id"}` of the DESIGN error table.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use portcullis_filters::error::JsonRpcAnswer;
use portcullis_filters::{Rejection, TraceId};

use crate::upstream::Body;

pub const ERROR_HEADER: &str = "x-portcullis-error";

fn error_json(rej: &Rejection, trace_id: TraceId) -> String {
    let mut body = serde_json::json!({
        "error": rej.code.as_str(),
        "reason": rej.reason,
        "trace_id": trace_id.to_string(),
    });
    if let Some(object) = body.as_object_mut() {
        rej.details.merge_into(object);
    }
    body.to_string()
}

pub fn error_response(rej: &Rejection, trace_id: TraceId) -> Response<Body> {
    if let Some(answer) = &rej.jsonrpc {
        return jsonrpc_response(rej, answer);
    }
    let mut resp = Response::new(full(error_json(rej, trace_id)));
    *resp.status_mut() =
        StatusCode::from_u16(rej.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // Extra headers (a policy may set them) cannot override the contract headers.
    for (k, v) in &rej.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            if k != CONTENT_TYPE && k.as_str() != ERROR_HEADER {
                h.append(k, v);
            }
        }
    }
    h.insert(
        HeaderName::from_static(ERROR_HEADER),
        HeaderValue::from_static(rej.code.as_str()),
    );
    resp
}

/// The same answer as raw HTTP/1.1 bytes, for a refusal made below hyper (the head gate),
/// closing the connection.
pub fn raw_error_response(rej: &Rejection, trace_id: TraceId) -> Vec<u8> {
    let body = error_json(rej, trace_id);
    let status = StatusCode::from_u16(rej.status()).unwrap_or(StatusCode::BAD_REQUEST);
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n{ERROR_HEADER}: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        rej.code.as_str(),
        body.len(),
    )
    .into_bytes()
}

/// A refused MCP request: 200 with the JSON-RPC error(s), or 202 when only notifications were
/// refused (they are dropped, as a server would accept them without an answer).
fn jsonrpc_response(rej: &Rejection, answer: &JsonRpcAnswer) -> Response<Body> {
    let (status, body) = match (answer.batch, answer.responses.as_slice()) {
        (_, []) => (StatusCode::ACCEPTED, empty()),
        (false, [one]) => (StatusCode::OK, full(one.to_string())),
        (_, all) => (
            StatusCode::OK,
            full(serde_json::Value::from(all.to_vec()).to_string()),
        ),
    };
    let prescribed = answer.status.and_then(|s| StatusCode::from_u16(s).ok());
    let status = prescribed.unwrap_or(status);
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if !answer.responses.is_empty() {
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    h.insert(
        HeaderName::from_static(ERROR_HEADER),
        HeaderValue::from_static(rej.code.as_str()),
    );
    resp
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}
