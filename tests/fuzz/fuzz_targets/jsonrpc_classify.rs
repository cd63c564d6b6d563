//! JSON-RPC / MCP request-body classification (`filters/src/parse/jsonrpc.rs`): `classify`,
//! `parse`, `policy_input`, and the streaming `LargeBodyScan` used for bodies over the
//! inspection limit (`filters/src/stages/mcp.rs`).
//!
//! Input: the first byte chooses how the body is cut into chunks for the streaming scan
//! (low nibble + 1: chunk size; bit 4: the first chunk holds at least 4 bytes), the rest is
//! the body.
//!
//! Invariants:
//! - "plain HTTP" (`Ok(BodyKind::Other)`) is never said of a body whose JSON (UTF-8 BOM
//!   stripped, as servers do) has a top-level `"jsonrpc"` member, or one in an object
//!   directly inside a top-level array;
//! - an accepted message or batch is well formed (methods, ids, batch flag) and agrees with
//!   `parse`;
//! - the streaming scan never calls plain what `classify` reads as JSON-RPC (or refuses),
//!   flags every body `classify` finds a `"jsonrpc"` member in, and its verdict does not depend
//!   on where the body is cut (its end told with `end()`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_filters::parse::jsonrpc::{
    classify, head_may_be_jsonrpc, parse, policy_input, BodyKind, LargeBodyScan, Unreadable,
};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, body)) = data.split_first() else {
        return;
    };
    let class = classify(body, Some("session-1"), None);
    let _ = class.as_ref().map_err(|e| e.to_string());
    let text = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let json: Option<Value> = serde_json::from_slice(text).ok();
    let names_jsonrpc = |v: &Value| v.as_object().is_some_and(|o| o.contains_key("jsonrpc"));
    let has_member = match &json {
        Some(Value::Array(items)) => items.iter().any(names_jsonrpc),
        Some(other) => names_jsonrpc(other),
        None => false,
    };

    match &class {
        Ok(BodyKind::Other) => {
            assert!(
                !has_member,
                "plain HTTP, but the JSON has a \"jsonrpc\" member"
            );
        }
        Ok(BodyKind::JsonRpc(req)) => {
            assert!(has_member);
            let v = json
                .as_ref()
                .expect("JSON-RPC that serde_json does not parse");
            assert_eq!(req.batch, v.is_array());
            assert!(!req.messages.is_empty());
            if let Value::Array(items) = v {
                assert_eq!(items.len(), req.messages.len());
            }
            assert_eq!(req.session_id.as_deref(), Some("session-1"));
            for m in &req.messages {
                assert!(m
                    .id
                    .as_ref()
                    .is_none_or(|id| id.is_string() || id.is_number()));
                if let Some(tool) = m.tool() {
                    assert_eq!(m.method.as_deref(), Some("tools/call"));
                    let input = policy_input(req, m);
                    assert_eq!(input["tool"].as_str(), Some(tool));
                }
                let input = policy_input(req, m);
                assert!(input.is_object());
                assert_eq!(input["batch"].as_bool(), Some(req.batch));
                assert_eq!(
                    input.get("method").and_then(Value::as_str),
                    m.method.as_deref()
                );
            }
            // Without a BOM, `parse` reads the same messages.
            if text.len() == body.len() {
                let p = parse(body, Some("session-1"), None);
                assert_eq!(p.as_ref(), Ok(req));
            }
        }
        Err(Unreadable::NotJsonRpc(_)) => assert!(has_member),
        Err(Unreadable::Malformed(_)) => assert!(json.is_none()),
        Err(Unreadable::Encoding(_)) => {}
    }

    // The streaming scan of the same body, whole and cut into chunks.
    let whole_says = head_may_be_jsonrpc(body);
    let mut whole = LargeBodyScan::default();
    assert_eq!(whole.feed(body) || whole.end(), whole_says);
    let mut scan = LargeBodyScan::default();
    let mut said = false;
    let size = usize::from(ctl & 0x0f) + 1;
    let first = if ctl & 0x10 != 0 { size.max(4) } else { size };
    let (head, mut rest) = body.split_at(first.min(body.len()));
    said |= scan.feed(head);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        said |= scan.feed(chunk);
        rest = tail;
    }
    said |= scan.end();
    // A body classify reads as JSON-RPC, or refuses, is flagged by the whole-body scan.
    if matches!(
        class,
        Ok(BodyKind::JsonRpc(_)) | Err(Unreadable::NotJsonRpc(_)) | Err(Unreadable::Encoding(_))
    ) {
        assert!(
            whole_says,
            "the large-body scan misses a JSON-RPC body: {class:?}"
        );
    }
    // The streaming scan never settles on plain HTTP for what classify does not call plain.
    if scan.is_plain() || whole.is_plain() {
        assert!(
            matches!(class, Ok(BodyKind::Other)),
            "the large-body scan calls plain HTTP a body classify reads as {class:?} \
             (cut: {first} then {size})"
        );
    }
    // Where the body is cut does not change the verdict.
    assert_eq!(said, whole_says, "cut: {first} then {size}: {class:?}");
    assert_eq!(
        scan.is_plain(),
        whole.is_plain(),
        "cut: {first} then {size}"
    );
});
