//! `Mcp-Param-{Name}` headers (MCP revision 2026-07-28, Streamable HTTP "Custom Headers from
//! Tool Parameters"): a server marks tool parameters with `x-mcp-header: Name` in the tool's
//! `inputSchema`, and a client mirrors the argument's value into `Mcp-Param-Name`. Whoever
//! processes the body MUST reject a request whose recognised `Mcp-Param-*` headers disagree
//! with the body (`400`, `HeaderMismatch`), or that omits one whose value is in the body.
//!
//! A header is recognised when the proxy has seen the tool's definition in a `tools/list`
//! answer from that server ([`declarations`] reads them); one it has not seen is forwarded
//! untouched, as the transport says an intermediary that does not recognise it must.

use base64::Engine as _;
use http::HeaderMap;
use serde_json::Value;

pub const PREFIX: &str = "mcp-param-";

/// One `x-mcp-header` annotation: the header's name part (lower-cased: header names compare
/// case-insensitively) and the chain of `properties` keys that leads to the parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub header: String,
    pub path: Vec<String>,
}

/// The annotations of a tool's `inputSchema`, walking only `properties` chains (where the
/// revision allows them). `None` when there are none.
pub fn declarations(input_schema: &Value) -> Option<Vec<Declared>> {
    let mut out = Vec::new();
    walk(input_schema, &mut Vec::new(), &mut out);
    (!out.is_empty()).then_some(out)
}

fn walk(schema: &Value, path: &mut Vec<String>, out: &mut Vec<Declared>) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (key, sub) in props {
        path.push(key.clone());
        if let Some(name) = sub.get("x-mcp-header").and_then(Value::as_str) {
            out.push(Declared {
                header: name.to_ascii_lowercase(),
                path: path.clone(),
            });
        }
        // Bounded by the schema's own nesting (serde_json's parser bounds that at 128).
        walk(sub, path, out);
        path.pop();
    }
}

/// Check a `tools/call`'s `Mcp-Param-*` headers against its `arguments`, for the tool's
/// `declared` parameters. `modern`: the request is of revision 2026-07-28 or later, whose
/// clients MUST send the headers (an older client sends none, and is not refused for it).
pub fn check(
    headers: &HeaderMap,
    declared: &[Declared],
    arguments: Option<&Value>,
    modern: bool,
) -> Result<(), String> {
    for d in declared {
        let name = format!("{PREFIX}{}", d.header);
        let mut values = headers.get_all(name.as_str()).iter();
        let header =
            match (values.next(), values.next()) {
                (None, _) => None,
                (Some(v), None) => Some(v.to_str().map_err(|_| {
                    format!("the {name} header has characters outside visible ASCII")
                })?),
                (Some(_), Some(_)) => return Err(format!("more than one {name} header")),
            };
        let body = arguments
            .and_then(|a| at(a, &d.path))
            .filter(|v| !v.is_null());
        match (header, body) {
            (None, None) => {}
            (None, Some(_)) if !modern => {}
            (None, Some(_)) => {
                return Err(format!(
                    "{name} header is missing (the tool declares it and the arguments have {})",
                    d.path.join(".")
                ))
            }
            (Some(_), None) => {
                return Err(format!(
                    "{name} header given, but the arguments have no {}",
                    d.path.join(".")
                ))
            }
            (Some(h), Some(b)) => {
                let h = decode(h).ok_or_else(|| format!("{name} is not valid Base64 of UTF-8"))?;
                if !same(&h, b) {
                    return Err(format!(
                        "{name} header does not match the arguments' {}",
                        d.path.join(".")
                    ));
                }
            }
        }
    }
    Ok(())
}

fn at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, key| v.get(key))
}

/// A header value against the body's: strings exactly, integers numerically (`42.0` is `42`),
/// booleans as `true`/`false`. Any other body value (a number with a fraction, an object, an
/// array) cannot be mirrored: never a match.
fn same(header: &str, body: &Value) -> bool {
    match body {
        Value::String(s) => header == s,
        Value::Bool(b) => header == if *b { "true" } else { "false" },
        Value::Number(n) => match (n.as_i64(), header.parse::<f64>()) {
            // Integers in JavaScript's safe range are exact in an f64.
            (Some(i), Ok(h)) => i.unsigned_abs() < 1 << 53 && h == i as f64,
            _ => false,
        },
        _ => false,
    }
}

/// A header value, decoded from the `=?base64?...?=` sentinel form when it has it.
pub fn decode(v: &str) -> Option<String> {
    let Some(b64) = v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    else {
        return Some(v.to_owned());
    };
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .and_then(|raw| String::from_utf8(raw).ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

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

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "limit": {"type": "integer", "x-mcp-header": "Limit"},
            "opts": {"type": "object", "properties": {
                "dry": {"type": "boolean", "x-mcp-header": "Dry-Run"}}},
            "items": {"type": "array", "items": {"properties": {
                "x": {"type": "string", "x-mcp-header": "Nope"}}}},
            "query": {"type": "string"}}})
    }

    #[test]
    fn declarations_follow_properties_chains_only() {
        let mut d = declarations(&schema()).unwrap();
        d.sort_by(|a, b| a.header.cmp(&b.header));
        let got: Vec<(&str, String)> = d
            .iter()
            .map(|d| (d.header.as_str(), d.path.join(".")))
            .collect();
        assert_eq!(
            got,
            [
                ("dry-run", "opts.dry".to_owned()),
                ("limit", "limit".to_owned()),
                ("region", "region".to_owned())
            ]
        );
        assert_eq!(declarations(&json!({"type": "object"})), None);
    }

    #[test]
    fn headers_must_mirror_the_arguments() {
        let d = declarations(&schema()).unwrap();
        let args =
            json!({"region": "Hello, 世界", "limit": 42, "opts": {"dry": true}, "query": "q"});
        let b64 = format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode("Hello, 世界")
        );
        let ok = [
            ("mcp-param-region", b64.as_str()),
            ("Mcp-Param-Limit", "42.0"),
            ("mcp-param-dry-run", "true"),
        ];
        assert_eq!(check(&headers(&ok), &d, Some(&args), true), Ok(()));
        for (i, bad) in ["us-west1", "41", "false"].into_iter().enumerate() {
            let mut h = ok.to_vec();
            h[i].1 = bad;
            assert!(check(&headers(&h), &d, Some(&args), true).is_err(), "{bad}");
        }
        // Missing while the body has the value: refused for a 2026-07-28 request only.
        let missing = &ok[1..];
        assert!(check(&headers(missing), &d, Some(&args), true).is_err());
        assert_eq!(check(&headers(missing), &d, Some(&args), false), Ok(()));
        // A header for a value the body does not have (or has as null).
        let none = json!({"query": "q", "region": null});
        assert!(check(&headers(&ok[..1]), &d, Some(&none), true).is_err());
        assert_eq!(check(&HeaderMap::new(), &d, Some(&none), true), Ok(()));
        // Two values, or a value that is no header text.
        let twice = [ok[0], ok[1], ok[2], ("mcp-param-limit", "42")];
        assert!(check(&headers(&twice), &d, Some(&args), true).is_err());
        let fraction = json!({"limit": 4.5});
        assert!(check(
            &headers(&[("mcp-param-limit", "4.5")]),
            &d,
            Some(&fraction),
            true
        )
        .is_err());
    }
}
