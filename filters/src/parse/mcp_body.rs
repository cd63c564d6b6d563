//! JSON-RPC messages in MCP response bodies: a JSON body, or an SSE stream event by event.
//! Pure: bytes in, bytes out, with a bound on what is held.

use serde_json::Value;

/// Rewrites the JSON-RPC messages of an MCP response body as it streams: an SSE body
/// (`text/event-stream`) event by event, with no buffering beyond the current event; a JSON
/// body whole, up to `limit` bytes. Each JSON-RPC message (and each element of a batch) is
/// passed to the edit function; events without data pass through byte for byte. What cannot
/// be edited is never passed on unedited: a body (or one event) over the limit is dropped and
/// `overflowed()` turns true; a JSON body that does not parse, or an event whose data is not
/// JSON the proxy reads (see [`EventData`]), is dropped with everything after it and
/// `unparsable()` turns true. The caller then ends the response with an error.
#[derive(Debug)]
pub struct ResponseRewriter {
    sse: bool,
    buf: Vec<u8>,
    limit: usize,
    overflow: bool,
    unparsable: bool,
    /// Whether the start of the stream (where a client drops one byte-order mark) is behind.
    started: bool,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

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
            started: false,
        })
    }

    /// Feed a chunk; returns the bytes ready to send now.
    pub fn push(&mut self, chunk: &[u8], edit: &mut dyn FnMut(&mut Value)) -> Vec<u8> {
        if self.overflow || self.unparsable {
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
        if !self.start_stream() {
            return Vec::new();
        }
        let mut out = Vec::new();
        while let Some(event) = next_event(&mut self.buf) {
            match rewrite_event(&event, edit) {
                Some(edited) => out.extend_from_slice(&edited),
                None => return self.refuse(out),
            }
        }
        if self.buf.len() > self.limit {
            self.overflow = true;
            self.buf = Vec::new();
        }
        out
    }

    /// The end of the body: flush what is left.
    pub fn finish(&mut self, edit: &mut dyn FnMut(&mut Value)) -> Vec<u8> {
        if self.overflow || self.unparsable {
            return Vec::new();
        }
        if self.sse {
            // A stream of one to two bytes of a byte-order mark is left as it is: not UTF-8.
            let _ = self.start_stream();
        }
        let rest = std::mem::take(&mut self.buf);
        if rest.is_empty() {
            return rest;
        }
        if self.sse {
            return rewrite_event(&rest, edit).unwrap_or_else(|| self.refuse(Vec::new()));
        }
        match serde_json::from_slice::<Value>(&rest) {
            Ok(mut v) => {
                edit_messages(&mut v, edit);
                v.to_string().into_bytes()
            }
            Err(_) => self.refuse(Vec::new()),
        }
    }

    /// A client drops one byte-order mark at the start of an event stream (the SSE spec's
    /// decoding): so does the rewriter, once it has the bytes to tell. False while the bytes
    /// so far may still be the start of one.
    fn start_stream(&mut self) -> bool {
        if self.started {
            return true;
        }
        if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
            return false;
        }
        if self.buf.starts_with(BOM) {
            self.buf.drain(..BOM.len());
        }
        self.started = true;
        true
    }

    /// Unreadable data: what was edited before it goes out, it and the rest never do.
    fn refuse(&mut self, out: Vec<u8>) -> Vec<u8> {
        self.unparsable = true;
        self.buf = Vec::new();
        out
    }

    /// True when a body (or an event) exceeded the limit and was dropped.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// True when a JSON body, or an event's data, was not JSON the proxy reads: it was
    /// dropped, and so is the rest of the body.
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

/// One SSE event as a client interprets it (WHATWG HTML, "interpreting an event stream"):
/// its type (`message` unless an `event:` line says otherwise) and its data (the `data`
/// lines' values joined by LF; `None` when it has no data line, and then a client dispatches
/// nothing). A line is `field: value` (one space after the colon dropped), a lone `field`,
/// or a `:` comment.
#[derive(Debug, PartialEq, Eq)]
pub struct SseEvent<'a> {
    pub kind: &'a str,
    pub data: Option<String>,
}

impl<'a> SseEvent<'a> {
    pub fn parse(text: &'a str) -> SseEvent<'a> {
        let mut kind = "";
        let mut data: Option<String> = None;
        for (name, value) in sse_lines(text).filter_map(sse_field) {
            match name {
                "data" => {
                    let d = data.get_or_insert_with(String::new);
                    d.push_str(value);
                    d.push('\n');
                }
                "event" => kind = value,
                _ => {}
            }
        }
        if let Some(d) = &mut data {
            d.pop();
        }
        SseEvent {
            kind: if kind.is_empty() { "message" } else { kind },
            data,
        }
    }
}

/// A line's field name and value; `None` for a comment or an empty line.
fn sse_field(line: &str) -> Option<(&str, &str)> {
    if line.is_empty() || line.starts_with(':') {
        return None;
    }
    Some(match line.split_once(':') {
        Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
        None => (line, ""),
    })
}

/// What an event's data is to the proxy. MCP sends one JSON-RPC message (or batch) per event;
/// a server may send events with empty data (to prime a reconnection). Data a client might
/// read as JSON but the proxy does not (invalid UTF-8 that a client replaces, a lone surrogate
/// escape that JavaScript accepts, nesting beyond serde_json's limit) is `Unreadable`, and so
/// is any other non-JSON data: the proxy cannot tell what a client will do with it.
#[derive(Debug, PartialEq)]
pub enum EventData {
    /// No data, or only JSON whitespace: no message.
    Empty,
    Json(Value),
    Unreadable,
}

impl EventData {
    pub fn of(event: &[u8]) -> EventData {
        let Ok(text) = std::str::from_utf8(event) else {
            return EventData::Unreadable;
        };
        match SseEvent::parse(text).data {
            None => EventData::Empty,
            Some(d) if d.trim_matches(JSON_WHITESPACE).is_empty() => EventData::Empty,
            Some(d) => match serde_json::from_str(&d) {
                Ok(v) => EventData::Json(v),
                Err(_) => EventData::Unreadable,
            },
        }
    }
}

const JSON_WHITESPACE: [char; 4] = [' ', '\t', '\n', '\r'];

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

/// Rewrite the data of one SSE event if it is JSON; keep every other line as it was. `None`
/// when its data is [`EventData::Unreadable`].
fn rewrite_event(event: &[u8], edit: &mut dyn FnMut(&mut Value)) -> Option<Vec<u8>> {
    let mut v = match EventData::of(event) {
        EventData::Empty => return Some(event.to_vec()),
        EventData::Unreadable => return None,
        EventData::Json(v) => v,
    };
    let text = std::str::from_utf8(event).ok()?;
    edit_messages(&mut v, edit);
    let mut out = String::with_capacity(event.len());
    let mut wrote_data = false;
    for line in sse_lines(text) {
        if sse_field(line).is_some_and(|(name, _)| name == "data") {
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
    Some(out.into_bytes())
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
                assert!(
                    matches!(EventData::of(e), EventData::Json(_)),
                    "{:?}",
                    String::from_utf8_lossy(e)
                );
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
        assert_eq!(
            EventData::of(&got[1]),
            EventData::Json(serde_json::json!({"a": 2}))
        );
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

    const LIST: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"},{"name":"b"}]}}"#;

    /// Rewrites `stream` fed byte by byte and whole; both must agree.
    fn rewrite(stream: &[u8]) -> (String, bool) {
        let mut whole = ResponseRewriter::new(Some("text/event-stream"), 1 << 20).unwrap();
        let mut out = whole.push(stream, &mut drop_b);
        out.extend(whole.finish(&mut drop_b));
        let mut split = ResponseRewriter::new(Some("text/event-stream"), 1 << 20).unwrap();
        let mut out_split: Vec<u8> = stream
            .iter()
            .flat_map(|b| split.push(&[*b], &mut drop_b))
            .collect();
        out_split.extend(split.finish(&mut drop_b));
        assert_eq!(out, out_split);
        assert_eq!(whole.unparsable(), split.unparsable());
        (
            String::from_utf8_lossy(&out).into_owned(),
            whole.unparsable(),
        )
    }

    #[test]
    fn data_a_client_may_read_but_the_proxy_cannot_ends_the_stream() {
        let lone_surrogate = LIST.replace(r#""name":"b""#, r#""name":"b","x":"\ud800""#);
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let unreadable: [&[u8]; 5] = [
            lone_surrogate.as_bytes(),
            deep.as_bytes(),
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"b\xFF\"}]}}",
            b"not json",
            b"{\"jsonrpc\":\"2.0\"} {\"jsonrpc\":\"2.0\"}",
        ];
        for data in unreadable {
            let stream = [
                b"data: ",
                LIST.as_bytes(),
                b"\n\ndata: ",
                data,
                b"\n\nid: 3\ndata: ",
                LIST.as_bytes(),
                b"\n\n",
            ]
            .concat();
            let (out, refused) = rewrite(&stream);
            assert!(refused, "{data:?}");
            // The event before goes out edited; the unreadable one and all after it never do.
            assert_eq!(out.matches("data: ").count(), 1, "{out}");
            assert!(!out.contains(r#""b""#) && !out.contains("id: 3"), "{out}");
        }
        // Invalid UTF-8 in a comment: the event is not read either.
        let (out, refused) = rewrite(&[b": \xFF\ndata: ", LIST.as_bytes(), b"\n\n"].concat());
        assert!(refused && out.is_empty(), "{out}");
    }

    #[test]
    fn a_byte_order_mark_at_the_start_is_dropped_as_a_client_drops_it() {
        let (out, refused) = rewrite(&[b"\xEF\xBB\xBFdata: ", LIST.as_bytes(), b"\n\n"].concat());
        assert!(!refused);
        assert!(
            out.starts_with("data: {") && !out.contains(r#""b""#),
            "{out}"
        );
        // Anywhere else it is part of a field name: that line is no data line to a client.
        let (out, refused) =
            rewrite(&[b": x\n\n\xEF\xBB\xBFdata: ", LIST.as_bytes(), b"\n\n"].concat());
        assert!(!refused);
        assert!(out.contains(r#""b""#), "passed as no data: {out}");
    }

    #[test]
    fn fields_are_read_as_a_client_reads_them() {
        let e = SseEvent::parse("event:endpoint\ndata\ndata:x\ndata: y\n:c\nid\n\n");
        assert_eq!(e.kind, "endpoint");
        assert_eq!(e.data.as_deref(), Some("\nx\ny"));
        assert_eq!(SseEvent::parse(": ping\n\n").data, None);
        assert_eq!(
            SseEvent::parse("id: 1\ndata:\n\n").data.as_deref(),
            Some("")
        );
        assert_eq!(SseEvent::parse("data: 1\n\n").kind, "message");
        // Priming events (an id, empty data) pass byte for byte.
        let (out, refused) = rewrite(b"id: 7\ndata:\n\nid: 8\ndata: \r\n\r\n");
        assert!(!refused);
        assert_eq!(out, "id: 7\ndata:\n\nid: 8\ndata: \r\n\r\n");
        // A data line without a colon is a data line: rewritten with the rest.
        let (out, _) = rewrite(&[b"data: ", LIST.as_bytes(), b"\ndata\n\n"].concat());
        assert_eq!(out.matches("data").count(), 1, "{out}");
    }

    #[test]
    fn other_content_types_are_not_rewritten() {
        assert!(ResponseRewriter::new(Some("text/html"), 10).is_none());
        assert!(ResponseRewriter::new(None, 10).is_none());
    }
}
