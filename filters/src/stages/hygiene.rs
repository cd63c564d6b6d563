//! Header hygiene (RFC 9110 §7.6.1): hop-by-hop headers describe one connection and must not be
//! forwarded, in either direction; `Proxy-Authorization` is for this proxy and never leaves it.
//! Also bounds the request header block size, so oversized headers are refused with 431.

use http::header::{self, HeaderMap, HeaderName};

use crate::error::{ErrorCode, Rejection};
use crate::pipeline::{Action, ActionKind, Context, Filter};

/// Headers removed from every forwarded request and response, besides the names `Connection` lists.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Remove hop-by-hop headers, including every name listed in `Connection`. `Transfer-Encoding` is
/// left to hyper, which re-frames bodies itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Bytes the request head occupies, counted as on the wire (`name: value\r\n`).
pub fn header_block_size(req: &http::request::Parts) -> usize {
    let line = req.method.as_str().len() + req.uri.to_string().len() + 12;
    req.headers
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// Enforces `limits.max_header_bytes` and refuses connection upgrades, then strips hop-by-hop
/// headers from what goes upstream and from what comes back.
#[derive(Debug)]
pub struct HeaderHygiene {
    pub max_header_bytes: usize,
}

impl Filter for HeaderHygiene {
    fn name(&self) -> &'static str {
        "header_hygiene"
    }

    fn upstream_request(&self, _ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        strip_hop_by_hop(&mut req.headers);
        Action::Continue
    }

    fn response(&self, _ctx: &mut Context, resp: &mut http::response::Parts) {
        strip_hop_by_hop(&mut resp.headers);
    }

    fn request_now(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        let size = header_block_size(req);
        if size > self.max_header_bytes {
            return Action::Respond(Rejection::new(
                ErrorCode::HeadersTooLarge,
                format!(
                    "request headers are {size} bytes; the limit is {}",
                    self.max_header_bytes
                ),
            ));
        }
        if ctx.kind != ActionKind::Connect && req.headers.contains_key(header::UPGRADE) {
            return Action::Respond(Rejection::new(
                ErrorCode::UpgradeNotSupported,
                "connection upgrades (WebSocket, h2c) are not supported through the proxy",
            ));
        }
        Action::Continue
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_listed_names() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-authorization", "Basic Zm9vOmJhcg==".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        h.insert("authorization", "Bearer x".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("x-kept"));
        assert!(h.contains_key("authorization"));
    }

    #[test]
    fn header_block_size_counts_names_and_values() {
        let (mut parts, ()) = http::Request::get("/a").body(()).unwrap().into_parts();
        let base = header_block_size(&parts);
        parts.headers.insert("x-a", "12345".parse().unwrap());
        assert_eq!(header_block_size(&parts), base + 3 + 5 + 4);
    }
}
