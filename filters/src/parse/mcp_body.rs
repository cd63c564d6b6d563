//! JSON-RPC messages in MCP response bodies: a JSON body, or an SSE stream event by event.
//! Pure: bytes in, bytes out, with a bound on what is held.

use serde_json::Value;

/// Rewrites the JSON-RPC messages of an MCP response body as it streams: an SSE body
/// (`text/event-stream`) event by event, with no buffering beyond the current event; a JSON
/// body whole, up to `limit` bytes. Each JSON-RPC message (and each element of a batch) is
/// passed to the edit function; events without JSON data pass through byte for byte. A body
/// (or one event) over the limit cannot be edited: it is dropped and `overflowed()` turns
/// true, so the caller can end the response with an error instead of passing it unedited.
#[derive(Debug)]
pub struct ResponseRewriter {
    sse: bool,
    buf: Vec<u8>,
    limit: usize,
    overflow: bool,
    /// A JSON body that did not parse (it is then dropped, not passed on unedited).
    unparsable: bool,
}

impl ResponseRewriter {
    pub fn new(content_type: Option<&str>, limit: usize) -> Option<ResponseRewriter> {
        let ct = content_type?.split(';').next()?.trim().to_ascii_lowercase();
        let sse = match ct.as_str() {
            "text/event-stream" => true,
            "application/json" => false,
            _ => return None,
        };
        Some(ResponseRewriter {
            sse,
            buf: Vec::new(),
            limit,
            overflow: false,
            unparsable: false,
        })
    }

    /// Feed a chunk; returns the bytes ready to send now.
    pub fn push(&mut self, chunk: &[u8], edit: &mut dyn FnMut(&mut Value)) -> Vec<u8> {
        if self.overflow {
            return Vec::new();
        }
        self.buf.extend_from_slice(chunk);
        if !self.sse {
            if self.buf.len() > self.limit {
                self.overflow = true;
                self.buf = Vec::new();
            }
            return Vec::new();
        }
        let mut out = Vec::new();
        while let Some(event) = next_event(&mut self.buf) {
            out.extend_from_slice(&rewrite_event(&event, edit));
        }
        if self.buf.len() > self.limit {
            self.overflow = true;
            self.buf = Vec::new();
        }
        out
    }

    /// The end of the body: flush what is left.
    pub fn finish(&mut self, edit: &mut dyn FnMut(&mut Value)) -> Vec<u8> {
        let rest = std::mem::take(&mut self.buf);
        if self.overflow || rest.is_empty() {
            return rest;
        }
        if self.sse {
            return rewrite_event(&rest, edit);
        }
        match serde_json::from_slice::<Value>(&rest) {
            Ok(mut v) => {
                edit_messages(&mut v, edit);
                v.to_string().into_bytes()
            }
            Err(_) => {
                self.unparsable = true;
                Vec::new()
            }
        }
    }

    /// True when a body (or an event) exceeded the limit and was dropped.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// True when a JSON body did not parse and was dropped.
    pub fn unparsable(&self) -> bool {
        self.unparsable
    }
}

fn edit_messages(v: &mut Value, edit: &mut dyn FnMut(&mut Value)) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(edit),
        other => edit(other),
    }
}

/// Splits an SSE stream into complete events (each with its blank line), holding at most
/// `limit` bytes of an unfinished one.
#[derive(Debug)]
pub struct SseEvents {
    buf: Vec<u8>,
    limit: usize,
}

/// An SSE event longer than the splitter's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTooLarge;

impl SseEvents {
    pub fn new(limit: usize) -> SseEvents {
        SseEvents {
            buf: Vec::new(),
            limit,
        }
    }

    /// Feed a chunk; returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, EventTooLarge> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(event) = next_event(&mut self.buf) {
            events.push(event);
        }
        if self.buf.len() > self.limit {
            self.buf = Vec::new();
            return Err(EventTooLarge);
        }
        Ok(events)
    }

    /// The end of the stream: the unfinished event, as it is.
    pub fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Take the first complete event off the front of `buf`.
fn next_event(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let end = event_end(buf)?;
    Some(buf.drain(..end).collect())
}

/// The lines of an SSE text: terminated by CRLF, LF or a lone CR, as the SSE spec allows.
pub fn sse_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        let line = &rest[..end];
        let term = match rest.as_bytes().get(end..end + 2) {
            Some(b"\r\n") => 2,
            _ if end < rest.len() => 1,
            _ => 0,
        };
        rest = &rest[end + term..];
        Some(line)
    })
}

/// The JSON value of an event's `data:` lines; `None` when it has none or they are not JSON.
pub fn event_json(event: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(event).ok()?;
    let data: Vec<&str> = sse_lines(text)
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        return None;
    }
    serde_json::from_str(&data.join("\n")).ok()
}

/// The ids of the JSON-RPC messages in `v` (a message or a batch).
pub fn message_ids(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(items) => items.iter().filter_map(|m| m.get("id")).collect(),
        other => other.get("id").into_iter().collect(),
    }
}

/// Index just past the blank line that ends the first complete SSE event. Lines end in CRLF,
/// LF or a lone CR; a CR at the very end of `buf` that ends a non-empty line may be the start
/// of a CRLF, so that event waits for the next byte.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    // Whether the previous line ended right before `i` and was empty so far.
    let mut line_start = true;
    while i < buf.len() {
        let term = match (buf[i], buf.get(i + 1)) {
            (b'\r', Some(b'\n')) => 2,
            // The blank line is complete whatever follows; a line's own CR may be a CRLF.
            (b'\r', None) if line_start && i > 0 => return Some(i + 1),
            (b'\r', None) => return None,
            (b'\r' | b'\n', _) => 1,
            _ => 0,
        };
        if term == 0 {
            line_start = false;
            i += 1;
            continue;
        }
        i += term;
        if line_start && i > term {
            return Some(i);
        }
        line_start = true;
    }
    None
}

/// Rewrite the `data:` of one SSE event if it is JSON; keep every other line as it was.
fn rewrite_event(event: &[u8], edit: &mut dyn FnMut(&mut Value)) -> Vec<u8> {
    let (Ok(text), Some(mut v)) = (std::str::from_utf8(event), event_json(event)) else {
        return event.to_vec();
    };
    edit_messages(&mut v, edit);
    let mut out = String::with_capacity(event.len());
    let mut wrote_data = false;
    for line in sse_lines(text) {
        if line.starts_with("data:") {
            if !wrote_data {
                out.push_str("data: ");
                out.push_str(&v.to_string());
                out.push('\n');
                wrote_data = true;
            }
        } else if !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push('\n');
    out.into_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod rewriter_tests {
    use super::*;

    fn drop_b(v: &mut Value) {
        if let Some(tools) = v.pointer_mut("/result/tools").and_then(Value::as_array_mut) {
            tools.retain(|t| t["name"] != "b");
        }
    }

    #[test]
    fn sse_events_are_rewritten_one_by_one() {
        let mut r = ResponseRewriter::new(Some("text/event-stream"), 1 << 20).unwrap();
        let ev1 = b"event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"a\"},{\"name\":\"b\"}]}}\n\n";
        // Split mid-event: nothing comes out until the event is complete.
        assert!(r.push(&ev1[..20], &mut drop_b).is_empty());
        let out = String::from_utf8(r.push(&ev1[20..], &mut drop_b)).unwrap();
        assert!(out.starts_with("event: message\nid: 1\ndata: "), "{out}");
        assert!(out.contains("\"a\"") && !out.contains("\"b\""), "{out}");
        assert!(out.ends_with("\n\n"));
        // A comment/keep-alive event passes byte for byte.
        assert_eq!(r.push(b": ping\n\n", &mut drop_b), b": ping\n\n");
        assert!(r.finish(&mut drop_b).is_empty());
    }

    #[test]
    fn json_bodies_are_rewritten_at_the_end() {
        let mut r =
            ResponseRewriter::new(Some("application/json; charset=utf-8"), 1 << 20).unwrap();
        let body = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"},{"name":"b"}]}}"#;
        assert!(r.push(body, &mut drop_b).is_empty());
        let v: Value = serde_json::from_slice(&r.finish(&mut drop_b)).unwrap();
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn sse_events_end_at_a_blank_line_whatever_the_line_endings() {
        for (stream, events) in [
            (&b"data: 1\n\ndata: 2\n\n"[..], 2),
            (b"data: 1\r\rdata: 2\r\r", 2),
            (b"data: 1\r\n\r\ndata: 2\r\n\r\n", 2),
            (b"data: 1\r\n\ndata: 2\n\r", 2),
            (b"data: 1\r", 0),
        ] {
            let mut split = SseEvents::new(1 << 20);
            let got = split.push(stream).unwrap();
            assert_eq!(got.len(), events, "{:?}", String::from_utf8_lossy(stream));
            for e in &got {
                assert!(event_json(e).is_some(), "{:?}", String::from_utf8_lossy(e));
            }
        }
        // Byte by byte, the same events.
        let stream = b"data: {\"a\":1}\r\rdata: {\"a\":2}\r\n\r\n";
        let mut split = SseEvents::new(1 << 20);
        let got: Vec<_> = stream
            .iter()
            .flat_map(|b| split.push(&[*b]).unwrap())
            .collect();
        assert_eq!(got.len(), 2);
        assert_eq!(event_json(&got[1]).unwrap()["a"], 2);
    }

    #[test]
    fn oversized_json_is_dropped_not_passed_unedited() {
        let mut r = ResponseRewriter::new(Some("application/json"), 8).unwrap();
        assert!(r.push(b"0123456789", &mut drop_b).is_empty());
        assert!(r.overflowed());
        assert!(r.finish(&mut drop_b).is_empty());
    }

    #[test]
    fn json_that_does_not_parse_is_dropped_not_passed_unedited() {
        let mut r = ResponseRewriter::new(Some("application/json"), 1 << 20).unwrap();
        assert!(r.push(b"{\"tools\": [oops", &mut drop_b).is_empty());
        assert!(r.finish(&mut drop_b).is_empty());
        assert!(r.unparsable());
    }

    #[test]
    fn other_content_types_are_not_rewritten() {
        assert!(ResponseRewriter::new(Some("text/html"), 10).is_none());
        assert!(ResponseRewriter::new(None, 10).is_none());
    }
}
