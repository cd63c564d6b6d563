//! W3C Trace Context propagation (https://www.w3.org/TR/trace-context/): continue the caller's
//! trace (`traceparent` header, or an MCP message's `params._meta.traceparent`), give each
//! action its own span id, and send `traceparent` upstream with the proxy's span as parent,
//! so the upstream's spans, the proxy's logs and the caller's trace join up.

use http::HeaderValue;

use crate::pipeline::{Action, Context, Filter};
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
#[derive(Debug, Default)]
pub struct TracePropagation;

#[async_trait::async_trait]
impl Filter for TracePropagation {
    fn name(&self) -> &'static str {
        "trace_propagation"
    }

    async fn request(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        let from_header = req
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        let from_meta = || {
            ctx.mcp.as_ref()?.messages.iter().find_map(|m| {
                let tp = m.params.as_ref()?.pointer("/_meta/traceparent")?.as_str()?;
                TraceParent::parse(tp)
            })
        };
        if let Some(tp) = from_header.or_else(from_meta) {
            ctx.trace_id = TraceId(tp.trace_id);
            ctx.parent_span_id = Some(tp.span_id);
            ctx.trace_flags = tp.flags;
        }
        Action::Continue
    }

    fn upstream_request(&self, ctx: &mut Context, req: &mut http::request::Parts) -> Action {
        let tp = TraceParent::header(&ctx.trace_id, &ctx.span_id, ctx.trace_flags);
        if let Ok(v) = HeaderValue::from_str(&tp) {
            req.headers.insert("traceparent", v);
        }
        Action::Continue
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
}
