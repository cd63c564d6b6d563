//! W3C Trace Context propagation (https://www.w3.org/TR/trace-context/): continue the caller's
//! trace (`traceparent` header, or an MCP message's `params._meta.traceparent`), give each
//! action its own span id, and send `traceparent` upstream, so the upstream's spans, the
//! proxy's logs and the caller's trace join up. When spans are exported, the parent sent
//! upstream is the proxy's client span of that upstream call (HTTP semconv: client span →
//! server span), and forwarded MCP requests and notifications carry it in
//! `params._meta.traceparent` too; otherwise the parent is the action's span and MCP bodies
//! are forwarded untouched.

use http::HeaderValue;

use crate::pipeline::timing::{sampled, Steps};
use crate::pipeline::{Action, Context, Filter, RequestBody};
use crate::TraceId;

/// A parsed `traceparent`: version 00, trace id, parent span id, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl TraceParent {
    /// Strict parse of version `00` (lowercase hex, non-zero ids); anything else is ignored,
    /// as the spec asks, and a new trace starts.
    pub fn parse(s: &str) -> Option<TraceParent> {
        let mut parts = s.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = hex(trace)?;
        let span_id: [u8; 8] = hex(span)?;
        let [flags] = hex::<1>(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    pub fn header(trace_id: &TraceId, span_id: &[u8; 8], flags: u8) -> String {
        let mut buf = [0u8; 32];
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        out.push_str(crate::pipeline::hex_into(&trace_id.0, &mut buf));
        out.push('-');
        out.push_str(crate::pipeline::hex_into(span_id, &mut buf));
        out.push('-');
        out.push_str(crate::pipeline::hex_into(&[flags], &mut buf));
        out
    }
}

/// The propagation stage. Runs after MCP inspection so `_meta.traceparent` is visible.
/// `sampling` is `Some(ratio)` when spans are exported: sampled actions then record their
/// steps (`Context::steps`) for child spans.
#[derive(Debug, Default)]
pub struct TracePropagation {
    pub sampling: Option<f64>,
}

impl Filter for TracePropagation {
    fn name(&self) -> &'static str {
        "trace_propagation"
    }

    fn upstream_request(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        let parent = match ctx.trace.steps.as_deref_mut() {
            Some(steps) => {
                let id = steps.next_id();
                steps.upstream_span = Some(id);
                id
            }
            None => ctx.trace.span_id,
        };
        let tp = TraceParent::header(&ctx.trace.id, &parent, ctx.trace.flags);
        if let Some(steps) = ctx.trace.steps.as_deref() {
            if let (Some(mcp), RequestBody::Buffered(body)) = (&ctx.mcp.request, &ctx.body) {
                if mcp.messages.iter().any(|m| m.method.is_some()) {
                    if let Some(b) = inject_meta(body, &tp, steps.tracestate.as_deref()) {
                        ctx.body = RequestBody::Buffered(b.into());
                    }
                }
            }
        }
        if let Ok(v) = HeaderValue::from_str(&tp) {
            req.headers.insert("traceparent", v);
        }
        Action::Continue
    }

    fn request_now(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        let header = req
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse)
            .map(|tp| {
                let state = req.headers.get("tracestate").and_then(|v| v.to_str().ok());
                (tp, state.map(str::to_owned))
            });
        let from_meta = || {
            ctx.mcp.request.as_ref()?.messages.iter().find_map(|m| {
                let meta = m.params.as_ref()?.get("_meta")?;
                let tp = TraceParent::parse(meta.get("traceparent")?.as_str()?)?;
                let state = meta.get("tracestate").and_then(|s| s.as_str());
                Some((tp, state.map(str::to_owned)))
            })
        };
        let mut tracestate = None;
        if let Some((tp, state)) = header.or_else(from_meta) {
            ctx.trace.id = TraceId(tp.trace_id);
            ctx.trace.parent_span_id = Some(tp.span_id);
            ctx.trace.flags = tp.flags;
            tracestate = state;
        }
        if let Some(ratio) = self.sampling {
            let parent = ctx.trace.parent_span_id.is_some();
            let sampled = sampled(&ctx.trace.id.0, parent, ctx.trace.flags, ratio);
            if !parent {
                ctx.trace.flags = u8::from(sampled);
            }
            if sampled {
                ctx.trace.steps = Some(Box::new(Steps::new(ctx.trace.span_id, tracestate)));
            }
        }
        Action::Continue
    }
}

/// Set `params._meta.traceparent` (and `tracestate`, when given) of every JSON-RPC request and
/// notification in `body` (a message or a batch), as MCP's `_meta` convention for trace
/// context asks. Responses are left alone. The bytes are edited in place: everything but the
/// inserted or replaced members stays byte-identical (no re-serialisation, so number
/// precision, key order and whitespace are kept). `None` when nothing could be set, or the
/// result would not parse (the body is then forwarded as it was).
pub fn inject_meta(body: &[u8], traceparent: &str, tracestate: Option<&str>) -> Option<Vec<u8>> {
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    let start = skip_ws(body, 0);
    match body.get(start)? {
        b'[' => {
            let mut i = skip_ws(body, start + 1);
            while body.get(i) != Some(&b']') {
                let end = skip_value(body, i)?;
                message_edits(body, i, traceparent, tracestate, &mut edits);
                i = skip_ws(body, end);
                if body.get(i) == Some(&b',') {
                    i = skip_ws(body, i + 1);
                }
            }
        }
        b'{' => message_edits(body, start, traceparent, tracestate, &mut edits),
        _ => return None,
    }
    if edits.is_empty() {
        return None;
    }
    let mut out = body.to_vec();
    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (at, remove, text) in edits {
        out.splice(at..at + remove, text.into_bytes());
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&out)
        .is_ok()
        .then_some(out)
}

fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The edits that set the trace context in one message (an object at `at`).
fn message_edits(
    b: &[u8],
    at: usize,
    traceparent: &str,
    tracestate: Option<&str>,
    edits: &mut Vec<(usize, usize, String)>,
) {
    let Some(msg) = members(b, at) else { return };
    if msg.get("method").is_none() {
        return; // a response: nothing to carry
    }
    let mut fields = vec![("traceparent", json_str(traceparent))];
    if let Some(ts) = tracestate {
        fields.push(("tracestate", json_str(ts)));
    }
    let new_object = |fields: &[(&str, String)]| {
        let inner: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!(r#""{k}":{v}"#))
            .collect();
        format!("{{{}}}", inner.join(","))
    };
    let Some(params) = msg.get("params") else {
        let meta = format!(r#"{{"_meta":{}}}"#, new_object(&fields));
        edits.push((msg.last_end, 0, format!(r#","params":{meta}"#)));
        return;
    };
    if b.get(params.0) != Some(&b'{') {
        return; // positional params: no `_meta`
    }
    let Some(p) = members(b, params.0) else {
        return;
    };
    let Some(meta) = p.get("_meta") else {
        edits.push((
            params.0 + 1,
            0,
            format!(r#""_meta":{}{}"#, new_object(&fields), p.comma()),
        ));
        return;
    };
    if b.get(meta.0) != Some(&b'{') {
        return;
    }
    let Some(m) = members(b, meta.0) else { return };
    let mut missing = Vec::new();
    for (key, value) in fields {
        match m.get(key) {
            Some((s, e)) => edits.push((s, e - s, value)),
            None => missing.push(format!(r#""{key}":{value}"#)),
        }
    }
    if !missing.is_empty() {
        edits.push((meta.0 + 1, 0, format!("{}{}", missing.join(","), m.comma())));
    }
}

/// The members of the JSON object at `at`: decoded keys with their value spans.
struct Members {
    items: Vec<(String, usize, usize)>,
    /// Just past the last member's value (or the `{`, when there is none).
    last_end: usize,
}

impl Members {
    /// The last member with this key (what a JSON parser keeps).
    fn get(&self, key: &str) -> Option<(usize, usize)> {
        self.items
            .iter()
            .rev()
            .find(|(k, _, _)| k == key)
            .map(|(_, s, e)| (*s, *e))
    }

    /// What follows a member inserted first: a comma when others follow it.
    fn comma(&self) -> &'static str {
        if self.items.is_empty() {
            ""
        } else {
            ","
        }
    }
}

fn members(b: &[u8], at: usize) -> Option<Members> {
    if b.get(at) != Some(&b'{') {
        return None;
    }
    let mut items = Vec::new();
    let mut last_end = at + 1;
    let mut i = skip_ws(b, at + 1);
    while b.get(i)? != &b'}' {
        let key_end = skip_value(b, i)?;
        let key: String = serde_json::from_slice(b.get(i..key_end)?).ok()?;
        i = skip_ws(b, key_end);
        if b.get(i)? != &b':' {
            return None;
        }
        let vs = skip_ws(b, i + 1);
        let ve = skip_value(b, vs)?;
        items.push((key, vs, ve));
        last_end = ve;
        i = skip_ws(b, ve);
        if b.get(i) == Some(&b',') {
            i = skip_ws(b, i + 1);
        }
    }
    Some(Members { items, last_end })
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// Just past the JSON value starting at `i` (the text is known to be valid JSON).
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => {
            let mut j = i + 1;
            loop {
                match b.get(j)? {
                    b'\\' => j += 2,
                    b'"' => return Some(j + 1),
                    _ => j += 1,
                }
            }
        }
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = skip_value(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while b
                .get(j)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_and_rejects_invalid() {
        let tp =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.span_id[0], 0x00);
        assert_eq!(tp.trace_id[0], 0x4b);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn header_round_trips() {
        let h = TraceParent::header(&TraceId([0xab; 16]), &[0xcd; 8], 1);
        let tp = TraceParent::parse(&h).unwrap();
        assert_eq!(
            (tp.trace_id, tp.span_id, tp.flags),
            ([0xab; 16], [0xcd; 8], 1)
        );
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn inject(body: &str, state: Option<&str>) -> Option<String> {
        inject_meta(body.as_bytes(), TP, state).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn meta_is_added_with_the_rest_byte_identical() {
        let body = r#"{"jsonrpc":"2.0", "id":7,"method":"tools/call","params":{"name":"t","arguments":{"n":123456789012345678901234567890,"f":1.50}}}"#;
        let out = inject(body, None).unwrap();
        assert_eq!(
            out,
            format!(
                r#"{{"jsonrpc":"2.0", "id":7,"method":"tools/call","params":{{"_meta":{{"traceparent":"{TP}"}},"name":"t","arguments":{{"n":123456789012345678901234567890,"f":1.50}}}}}}"#
            )
        );
    }

    #[test]
    fn meta_cases_params_absent_empty_existing_and_batches() {
        let out = inject(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            Some("a=b"),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["params"]["_meta"]["traceparent"], TP);
        assert_eq!(v["params"]["_meta"]["tracestate"], "a=b");

        let out = inject(
            r#"{"jsonrpc":"2.0","method":"notifications/initialized","params":{}}"#,
            None,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["params"]["_meta"]["traceparent"], TP);

        // An existing traceparent is replaced, other _meta keys are kept.
        let body = r#"{"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"_meta":{"progressToken":5,"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},"name":"t"}}"#;
        let v: serde_json::Value = serde_json::from_str(&inject(body, None).unwrap()).unwrap();
        assert_eq!(v["params"]["_meta"]["traceparent"], TP);
        assert_eq!(v["params"]["_meta"]["progressToken"], 5);
        assert_eq!(v["params"]["name"], "t");

        // A batch: requests and notifications get it, responses do not.
        let body = r#"[ {"jsonrpc":"2.0","id":1,"method":"ping"} , {"jsonrpc":"2.0","id":9,"result":{}},{"jsonrpc":"2.0","method":"notifications/x","params":{"_meta":{}}}]"#;
        let v: serde_json::Value = serde_json::from_str(&inject(body, None).unwrap()).unwrap();
        assert_eq!(v[0]["params"]["_meta"]["traceparent"], TP);
        assert!(v[1].get("params").is_none());
        assert_eq!(v[1]["result"], serde_json::json!({}));
        assert_eq!(v[2]["params"]["_meta"]["traceparent"], TP);
    }

    #[test]
    fn meta_is_not_forced_where_it_cannot_go() {
        // Only responses; positional params; a non-object _meta; escaped strings survive.
        assert!(inject(r#"{"jsonrpc":"2.0","id":1,"result":{"a":"}"}}"#, None).is_none());
        assert!(inject(
            r#"{"jsonrpc":"2.0","id":1,"method":"m","params":[1,2]}"#,
            None
        )
        .is_none());
        assert!(inject(
            r#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"_meta":3}}"#,
            None
        )
        .is_none());
        let out = inject(
            r#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"s":"a\"}{,"}}"#,
            None,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["params"]["s"], "a\"}{,");
        assert_eq!(v["params"]["_meta"]["traceparent"], TP);
    }
}
