//! The request metadata headers of MCP's Streamable HTTP transport (revision 2026-07-28,
//! "Request Metadata"): `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` mirror the body so
//! intermediaries can route without parsing it, and whoever processes the body MUST reject a
//! request whose headers disagree with it (a load balancer acting on the header while the
//! server executes the body is a confused deputy). Portcullis decides on the body and checks
//! the headers against it:
//!
//! - a mirrored header that is present must match the body, whatever the revision (a client of
//!   an older revision sends none, so one that is there and disagrees is not an accident);
//! - a request of revision 2026-07-28 or later (by its `MCP-Protocol-Version` header or its
//!   body's `_meta`) must carry them: `MCP-Protocol-Version` (equal to the body's), `Mcp-Method`
//!   on every request, `Mcp-Name` where the body names a tool, prompt or resource;
//! - `Mcp-Name` may be in the Base64 sentinel form `=?base64?...?=` and is compared decoded;
//! - the revision carries one message per POST: mirrored headers on a batch cannot match.
//!
//! `Mcp-Param-*` headers mirror tool arguments by the tool's schema: checked where the proxy
//! has seen that schema ([`super::mcp_params`]), forwarded untouched where it has not.

use http::HeaderMap;
use serde_json::Value;

use super::jsonrpc::{McpRequest, Message};

/// JSON-RPC error code `HeaderMismatch` (revision 2026-07-28).
pub const HEADER_MISMATCH_CODE: i64 = -32020;

/// The first revision whose requests must carry the mirrored headers.
pub const FIRST_WITH_HEADERS: &str = "2026-07-28";

const VERSION_META: &str = "io.modelcontextprotocol/protocolVersion";

/// Why the headers do not match the body (the JSON-RPC error's message says it).
pub fn check(headers: &HeaderMap, mcp: &McpRequest) -> Result<(), String> {
    let version = single(headers, "mcp-protocol-version")?;
    let method = single(headers, "mcp-method")?;
    let name = single(headers, "mcp-name")?;
    let [m] = mcp.messages.as_slice() else {
        return match (method, name) {
            (None, None) if !is_modern(version) => Ok(()),
            _ => Err(format!(
                "a batch of {} messages cannot carry the headers of one request (revision {FIRST_WITH_HEADERS} sends one message per POST)",
                mcp.messages.len()
            )),
        };
    };
    let body_version = m
        .params
        .as_ref()
        .and_then(|p| p.get("_meta")?.get(VERSION_META)?.as_str());
    let modern = is_modern(version) || is_modern(body_version);
    match (version, body_version) {
        (Some(h), Some(b)) if h != b => {
            return Err(format!(
                "MCP-Protocol-Version header {h:?} does not match the body's {b:?}"
            ))
        }
        (None, Some(_)) if modern => return Err("MCP-Protocol-Version header is missing".into()),
        _ => {}
    }
    let Some(body_method) = m.method.as_deref() else {
        // A response the client sends: nothing is mirrored.
        return match (method, name) {
            (None, None) => Ok(()),
            _ => Err("Mcp-Method/Mcp-Name headers on a JSON-RPC response".into()),
        };
    };
    match method {
        Some(h) if h != body_method => {
            return Err(format!(
                "Mcp-Method header {h:?} does not match the body's method {body_method:?}"
            ))
        }
        None if modern => return Err("Mcp-Method header is missing".into()),
        _ => {}
    }
    let body_name = named(m);
    match (name.map(decode).transpose()?, body_name) {
        (Some(h), Some(b)) if h != b => Err(format!(
            "Mcp-Name header {h:?} does not match the body's {b:?}"
        )),
        (Some(h), None) => Err(format!(
            "Mcp-Name header {h:?} names nothing the body names"
        )),
        (None, Some(_)) if modern => Err(format!(
            "Mcp-Name header is missing (required for {body_method})"
        )),
        _ => Ok(()),
    }
}

/// The value a request's `Mcp-Name` mirrors: `params.name` of `tools/call` and `prompts/get`,
/// `params.uri` of `resources/read`.
fn named(m: &Message) -> Option<&str> {
    let key = match m.method.as_deref()? {
        "tools/call" | "prompts/get" => "name",
        "resources/read" => "uri",
        _ => return None,
    };
    m.params.as_ref()?.get(key).and_then(Value::as_str)
}

/// Whether a request says (by its `MCP-Protocol-Version` header) that it is of revision
/// 2026-07-28 or later. After [`check`] passed, that is also what its body says.
pub fn declares_modern(headers: &HeaderMap) -> bool {
    is_modern(
        headers
            .get("mcp-protocol-version")
            .and_then(|v| v.to_str().ok()),
    )
}

fn is_modern(version: Option<&str>) -> bool {
    // Revisions are dates (YYYY-MM-DD): their order is the strings' order.
    version.is_some_and(|v| v.len() == 10 && v >= FIRST_WITH_HEADERS)
}

/// The one value of header `name`; several, or characters outside visible ASCII, space and
/// tab, are a mismatch.
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, String> {
    let mut all = headers.get_all(name).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(format!("more than one {name} header"));
    }
    v.to_str()
        .map(Some)
        .map_err(|_| format!("the {name} header has characters outside visible ASCII"))
}

/// A header value, decoded from the `=?base64?...?=` sentinel form when it has it.
fn decode(v: &str) -> Result<String, String> {
    super::mcp_params::decode(v)
        .ok_or_else(|| format!("Mcp-Name {v:?} is not valid Base64 of UTF-8"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::parse::jsonrpc::parse;
    use base64::Engine as _;

    fn req(body: &str) -> McpRequest {
        parse(body.as_bytes(), None, None).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
        }
        h
    }

    const MODERN_CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    const LEGACY_CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","arguments":{}}}"#;

    #[test]
    fn matching_headers_pass_and_names_may_be_base64() {
        let ok = [
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "get_weather"),
        ];
        assert_eq!(check(&headers(&ok), &req(MODERN_CALL)), Ok(()));
        let b64 = format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode("get_weather")
        );
        let encoded = [ok[0], ok[1], ("mcp-name", b64.as_str())];
        assert_eq!(check(&headers(&encoded), &req(MODERN_CALL)), Ok(()));
        // An older client sends none of them.
        assert_eq!(check(&HeaderMap::new(), &req(LEGACY_CALL)), Ok(()));
        let read =
            r#"{"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"file:///a b"}}"#;
        let h = headers(&[
            ("mcp-method", "resources/read"),
            ("mcp-name", "file:///a b"),
        ]);
        assert_eq!(check(&h, &req(read)), Ok(()));
    }

    #[test]
    fn disagreeing_missing_or_malformed_headers_are_refused() {
        let base = [
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "get_weather"),
        ];
        let with = |i: usize, v: &str| {
            let mut h = base.to_vec();
            h[i].1 = v;
            headers(&h)
        };
        let without = |i: usize| {
            let mut h = base.to_vec();
            h.remove(i);
            headers(&h)
        };
        let cases: Vec<(&str, HeaderMap, &str)> = vec![
            (
                "other tool",
                with(2, "delete_repo"),
                "does not match the body's",
            ),
            (
                "other method",
                with(1, "tools/list"),
                "does not match the body's method",
            ),
            (
                "other version",
                with(0, "2026-09-01"),
                "does not match the body's",
            ),
            ("no name", without(2), "Mcp-Name header is missing"),
            ("no method", without(1), "Mcp-Method header is missing"),
            (
                "no version",
                without(0),
                "MCP-Protocol-Version header is missing",
            ),
            ("bad base64", with(2, "=?base64?!!?="), "not valid Base64"),
            ("case differs", with(2, "Get_Weather"), "does not match"),
        ];
        for (what, h, why) in cases {
            let err = check(&h, &req(MODERN_CALL)).unwrap_err();
            assert!(err.contains(why), "{what}: {err}");
        }
        let mut twice = headers(&base);
        twice.append("mcp-name", http::HeaderValue::from_static("get_weather"));
        assert!(check(&twice, &req(MODERN_CALL))
            .unwrap_err()
            .contains("more than one"));
        // A legacy request with a disagreeing header is refused too.
        let h = headers(&[("mcp-name", "delete_repo")]);
        assert!(check(&h, &req(LEGACY_CALL)).is_err());
        // A name header where the body names nothing.
        let list = r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#;
        let h = headers(&[("mcp-method", "tools/list"), ("mcp-name", "x")]);
        assert!(check(&h, &req(list)).unwrap_err().contains("names nothing"));
        // Mirrored headers on a batch.
        let batch = format!("[{LEGACY_CALL},{list}]");
        let h = headers(&[("mcp-method", "tools/call")]);
        assert!(check(&h, &req(&batch)).unwrap_err().contains("batch"));
        assert_eq!(check(&HeaderMap::new(), &req(&batch)), Ok(()));
        let obs = headers(&[("mcp-name", "caf\u{e9}")]);
        assert!(check(&obs, &req(LEGACY_CALL))
            .unwrap_err()
            .contains("outside visible ASCII"));
    }
}
