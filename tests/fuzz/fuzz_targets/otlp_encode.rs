//! The proxy's direct OTLP protobuf encoder (`proxy/src/telemetry/otlp.rs`, re-exported as
//! `portcullis::fuzzing`): spans with fuzzed ids, names, times, status and attributes of
//! every kind, in an `ExportTraceServiceRequest` with a fuzzed resource and scope, with or
//! without the gRPC frame prefix.
//!
//! Invariant: what it writes decodes with the official generated types
//! (`opentelemetry-proto`, prost) to exactly the fields it was given.
#![no_main]

use libfuzzer_sys::arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::AnyValue;
use portcullis::fuzzing::{Encoder, Envelope, Kind, SpanHead};
use prost::Message as _;

#[derive(Debug)]
enum Attr {
    Str(String, String),
    Display(String, String),
    Int(String, i64),
    Bool(String, bool),
}

impl Attr {
    fn key(&self) -> &str {
        match self {
            Attr::Str(k, _) | Attr::Display(k, _) | Attr::Int(k, _) | Attr::Bool(k, _) => k,
        }
    }

    fn value(&self) -> Value {
        match self {
            Attr::Str(_, v) | Attr::Display(_, v) => Value::StringValue(v.clone()),
            Attr::Int(_, v) => Value::IntValue(*v),
            Attr::Bool(_, v) => Value::BoolValue(*v),
        }
    }
}

impl<'a> Arbitrary<'a> for Attr {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Attr> {
        Ok(match u.int_in_range(0..=3u8)? {
            0 => Attr::Str(u.arbitrary()?, u.arbitrary()?),
            1 => Attr::Display(u.arbitrary()?, u.arbitrary()?),
            2 => Attr::Int(u.arbitrary()?, u.arbitrary()?),
            _ => Attr::Bool(u.arbitrary()?, u.arbitrary()?),
        })
    }
}

#[derive(Debug)]
struct Span {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    parent_is_remote: bool,
    kind: Kind,
    name: String,
    start: u64,
    end: u64,
    error: Option<String>,
    attrs: Vec<Attr>,
}

impl<'a> Arbitrary<'a> for Span {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Span> {
        Ok(Span {
            trace_id: u.arbitrary()?,
            span_id: u.arbitrary()?,
            parent: u.arbitrary()?,
            parent_is_remote: u.arbitrary()?,
            kind: *u.choose(&[Kind::Internal, Kind::Server, Kind::Client])?,
            name: u.arbitrary()?,
            start: u.arbitrary()?,
            end: u.arbitrary()?,
            error: u.arbitrary()?,
            attrs: u.arbitrary()?,
        })
    }
}

#[derive(Debug)]
struct Batch {
    resource: Vec<(String, String)>,
    scope_name: String,
    scope_version: String,
    grpc: bool,
    spans: Vec<Span>,
}

impl<'a> Arbitrary<'a> for Batch {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Batch> {
        Ok(Batch {
            resource: u.arbitrary()?,
            scope_name: u.arbitrary()?,
            scope_version: u.arbitrary()?,
            grpc: u.arbitrary()?,
            spans: u.arbitrary()?,
        })
    }
}

fn string_of(v: &Option<AnyValue>) -> Option<&str> {
    match v.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fuzz_target!(|batch: Batch| {
    let resource: Vec<(&str, &str)> = batch
        .resource
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let envelope = Envelope::new(&resource, &batch.scope_name, &batch.scope_version);
    let mut enc = Encoder::default();
    for s in &batch.spans {
        let head = SpanHead {
            trace_id: s.trace_id,
            span_id: s.span_id,
            parent: s.parent,
            parent_is_remote: s.parent_is_remote,
            kind: s.kind,
            name: &s.name,
            start: s.start,
            end: s.end,
            error: s.error.as_deref(),
        };
        enc.span(&head, |a| {
            for attr in &s.attrs {
                match attr {
                    Attr::Str(k, v) => a.str(k, v),
                    Attr::Display(k, v) => a.display(k, format_args!("{v}")),
                    Attr::Int(k, v) => a.int(k, *v),
                    Attr::Bool(k, v) => a.bool(k, *v),
                }
            }
        });
    }
    let prefix = if batch.grpc { 5 } else { 0 };
    let body = envelope.request(&enc.out, prefix);
    assert!(body[..prefix].iter().all(|&b| b == 0));
    let req = ExportTraceServiceRequest::decode(&body[prefix..]).expect("decodes");
    // Nothing is left over or cut: prost's own size of the decoded message is no larger
    // (it omits the default values the encoder writes, such as an empty name).
    assert!(req.encoded_len() <= body.len() - prefix);

    assert_eq!(req.resource_spans.len(), 1);
    let rs = &req.resource_spans[0];
    let res = rs.resource.as_ref().expect("a resource");
    assert_eq!(res.attributes.len(), resource.len());
    for (kv, (k, v)) in res.attributes.iter().zip(&resource) {
        assert_eq!(kv.key, *k);
        assert_eq!(string_of(&kv.value), Some(*v));
    }
    assert_eq!(rs.scope_spans.len(), 1);
    let ss = &rs.scope_spans[0];
    let scope = ss.scope.as_ref().expect("a scope");
    assert_eq!(scope.name, batch.scope_name);
    assert_eq!(scope.version, batch.scope_version);
    assert_eq!(ss.spans.len(), batch.spans.len());
    for (got, want) in ss.spans.iter().zip(&batch.spans) {
        assert_eq!(got.trace_id, want.trace_id);
        assert_eq!(got.span_id, want.span_id);
        assert_eq!(
            got.parent_span_id,
            want.parent.map(Vec::from).unwrap_or_default()
        );
        assert_eq!(got.name, want.name);
        assert_eq!(got.kind, want.kind as i32);
        assert_eq!(got.start_time_unix_nano, want.start);
        assert_eq!(got.end_time_unix_nano, want.end);
        let remote = if want.parent_is_remote { 0x200 } else { 0 };
        assert_eq!(got.flags, 0x101 | remote);
        match &want.error {
            Some(message) => {
                let status = got.status.as_ref().expect("a status");
                assert_eq!(status.message, *message);
                assert_eq!(status.code, 2);
            }
            None => assert!(got.status.is_none()),
        }
        assert_eq!(got.attributes.len(), want.attrs.len());
        for (kv, attr) in got.attributes.iter().zip(&want.attrs) {
            assert_eq!(kv.key, attr.key());
            let value = kv.value.as_ref().and_then(|v| v.value.clone());
            assert_eq!(value, Some(attr.value()));
        }
        assert!(got.trace_state.is_empty() && got.events.is_empty() && got.links.is_empty());
    }
});
