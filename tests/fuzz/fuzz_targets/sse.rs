//! Server-sent event streams (`filters/src/parse/mcp_body.rs`): the event splitter
//! `SseEvents` (its `event_end`), `sse_lines`, `SseEvent`, `EventData`, `message_ids`, and the
//! `ResponseRewriter` that edits the JSON-RPC messages of an MCP response stream (tool-list
//! filtering and tool pinning run through it).
//!
//! Input: the first byte chooses the chunking (low 6 bits + 1: chunk size; bit 6: a first
//! chunk of one byte), the rest is the stream.
//!
//! Invariants:
//! - the splitter keeps every byte (events + unfinished rest = the stream), and feeding the
//!   stream in chunks gives the same events as feeding it whole (up to the line terminators
//!   at an event's edges, which carry no meaning: a blank line completed by a lone CR at a
//!   chunk's end);
//! - the events the rewriter emits are, to a client parsing the stream per the SSE spec
//!   (WHATWG HTML §9.2.6), the same whether the stream comes whole or in chunks;
//! - every event whose data a spec-compliant client reads as JSON reaches the client edited
//!   (here the edit wraps each message in `{"edited": ...}`), or the stream ends before it
//!   (`unparsable()`): the rewriter never lets an event through unedited that the client
//!   would act on, and no event with data that is not JSON passes at all.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_filters::parse::mcp_body::{
    message_ids, sse_lines, EventData, ResponseRewriter, SseEvent, SseEvents,
};
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let size = usize::from(ctl & 0x3f) + 1;
    let chunks = chunk(stream, size, ctl & 0x40 != 0);

    // The splitter: whole and in chunks.
    let mut whole = SseEvents::new(usize::MAX);
    let whole_events = whole.push(stream).expect("no limit");
    let whole_rest = whole.rest();
    assert_eq!([whole_events.concat(), whole_rest.clone()].concat(), stream);
    let mut split = SseEvents::new(usize::MAX);
    let mut split_events = Vec::new();
    for c in &chunks {
        split_events.extend(split.push(c).expect("no limit"));
    }
    let split_rest = split.rest();
    assert_eq!([split_events.concat(), split_rest.clone()].concat(), stream);
    assert_eq!(
        meaningful(&whole_events),
        meaningful(&split_events),
        "the events depend on where the stream is cut ({size}-byte chunks)"
    );
    assert_eq!(trim_eol(&whole_rest), trim_eol(&split_rest));

    for e in &whole_events {
        // Every event ends with a blank line.
        assert!(e.ends_with(b"\n") || e.ends_with(b"\r"), "{e:?}");
        let text = String::from_utf8_lossy(e);
        let _ = sse_lines(&text).count();
        let _ = SseEvent::parse(&text);
        if let EventData::Json(v) = EventData::of(e) {
            let _ = message_ids(&v);
        }
    }

    // The rewriter, whole and in chunks, with an edit that marks every message.
    let mut rw = ResponseRewriter::new(Some("text/event-stream"), 1 << 24).expect("SSE");
    let out_whole = rw.push(stream, &mut edit);
    assert!(!rw.overflowed());
    let refused = rw.unparsable();
    let _ = rw.finish(&mut edit);
    let mut rw = ResponseRewriter::new(Some("text/event-stream"), 1 << 24).expect("SSE");
    let mut out_split = Vec::new();
    for c in &chunks {
        out_split.extend(rw.push(c, &mut edit));
    }
    assert_eq!(
        refused,
        rw.unparsable(),
        "refusal depends on the cut ({size}-byte chunks)"
    );
    let _ = rw.finish(&mut edit);
    let got = client_view(&out_whole, true);
    assert_eq!(
        got,
        client_view(&out_split, true),
        "the rewritten stream depends on where it is cut ({size}-byte chunks)"
    );

    // What a client reads in the input, edited, is what it reads in the output, or the
    // output's events are a prefix of it and the stream was refused. The events the input
    // completes are those the splitter emitted whole.
    let complete = whole_events.concat();
    let mut want = client_view(&complete, true);
    for ev in &mut want {
        if let Data::Json(v) = &mut ev.1 {
            edit_messages(v);
            *v = canonical(v.take());
        }
    }
    for (_, d) in &got {
        if let Data::Text(t) = d {
            assert!(
                t.trim_matches([' ', '\t', '\n', '\r']).is_empty(),
                "data that is not JSON to the proxy passes: {t:?}"
            );
        }
    }
    if refused {
        assert!(
            got.len() <= want.len(),
            "refused, yet more events than the input's"
        );
        assert_eq!(
            got,
            want[..got.len()],
            "refused, yet not a prefix of the edited input"
        );
    } else {
        assert_eq!(
            got, want,
            "a client reads an event the rewriter did not edit (or edited differently)"
        );
    }
});

fn chunk(stream: &[u8], size: usize, one_byte_first: bool) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    if one_byte_first && !rest.is_empty() {
        out.push(&rest[..1]);
        rest = &rest[1..];
    }
    while !rest.is_empty() {
        let (c, tail) = rest.split_at(size.min(rest.len()));
        out.push(c);
        rest = tail;
    }
    out
}

fn trim_eol(e: &[u8]) -> &[u8] {
    let start = e
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(e.len());
    let end = e
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(start, |i| i + 1);
    &e[start..end.max(start)]
}

/// Events without their edge line terminators, empty ones dropped.
fn meaningful(events: &[Vec<u8>]) -> Vec<&[u8]> {
    events
        .iter()
        .map(|e| trim_eol(e))
        .filter(|e| !e.is_empty())
        .collect()
}

fn edit(v: &mut Value) {
    let inner = v.take();
    *v = json!({ "edited": inner });
}

/// The edit as the rewriter applies it: to each message of a batch, or to the message.
fn edit_messages(v: &mut Value) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(edit),
        other => edit(other),
    }
}

/// The value as it reads after a trip through its JSON text. serde_json (without its
/// `float_roundtrip` feature) may read a decimal one unit in the last place off, and the
/// rewriter writes what it read: both sides are compared after the same trip.
fn canonical(v: Value) -> Value {
    serde_json::from_str(&v.to_string()).unwrap_or(v)
}

#[derive(Debug, PartialEq)]
enum Data {
    Json(Value),
    Text(String),
}

/// The events a spec-compliant client dispatches (WHATWG HTML "event stream interpretation"):
/// (type, data), with the data read as JSON when it is JSON. `stream_start`: a leading BOM is
/// dropped. A last line without its terminator, and an event without its blank line, are
/// not dispatched.
fn client_view(bytes: &[u8], stream_start: bool) -> Vec<(String, Data)> {
    let text = String::from_utf8_lossy(bytes);
    let mut text: &str = &text;
    if stream_start {
        text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    }
    let mut out = Vec::new();
    let (mut data, mut kind) = (String::new(), String::new());
    let mut rest = text;
    loop {
        let Some(end) = rest.find(['\r', '\n']) else {
            break; // no terminator: not a complete line
        };
        let line = &rest[..end];
        let term = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + term..];
        if line.is_empty() {
            if !data.is_empty() {
                data.pop(); // the last LF
                let d = match serde_json::from_str::<Value>(&data) {
                    Ok(v) => Data::Json(canonical(v)),
                    Err(_) => Data::Text(std::mem::take(&mut data)),
                };
                let k = if kind.is_empty() {
                    "message".to_owned()
                } else {
                    kind.clone()
                };
                out.push((k, d));
            }
            data.clear();
            kind.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (name, value) = match line.split_once(':') {
            Some((n, v)) => (n, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match name {
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "event" => kind = value.to_owned(),
            _ => {}
        }
    }
    out
}
