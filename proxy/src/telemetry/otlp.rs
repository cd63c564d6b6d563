//! OTLP trace export without an intermediate span model: spans are written as protobuf
//! (`opentelemetry.proto.trace.v1.Span`) straight from the request's context into one buffer,
//! and a batch of them is sent as one `ExportTraceServiceRequest` over OTLP/HTTP (protobuf) or
//! OTLP/gRPC. The SDK's `SpanData` plus `opentelemetry-otlp`'s conversion copied every attribute
//! into new strings and cost more than the rest of the request path's telemetry together
//! (bench/README.md); the integration tests decode what arrives with the official generated
//! types (`opentelemetry-proto`, tonic's gRPC server).

use crate::config::{OtlpEndpoint, OtlpProtocol as Protocol};
use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The protobuf wire format (protobuf.dev, "Encoding"): varints, and length-delimited fields
/// whose length is known before they are written.
mod wire {
    pub const VARINT: u8 = 0;
    pub const I64: u8 = 1;
    pub const LEN: u8 = 2;
    pub const I32: u8 = 5;

    pub fn varint(buf: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            buf.push((v & 0x7f) as u8 | 0x80);
            v >>= 7;
        }
        buf.push(v as u8);
    }

    pub fn varint_len(v: u64) -> usize {
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }

    pub fn key(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
        varint(buf, u64::from(field) << 3 | u64::from(wire_type));
    }

    pub fn key_len(field: u32) -> usize {
        varint_len(u64::from(field) << 3)
    }

    /// The size of a length-delimited field holding `n` bytes.
    pub fn len_field(field: u32, n: usize) -> usize {
        key_len(field) + varint_len(n as u64) + n
    }

    /// The key and length of a length-delimited field; its `n` bytes follow.
    pub fn len_prefix(buf: &mut Vec<u8>, field: u32, n: usize) {
        key(buf, field, LEN);
        varint(buf, n as u64);
    }

    pub fn bytes(buf: &mut Vec<u8>, field: u32, v: &[u8]) {
        len_prefix(buf, field, v.len());
        buf.extend_from_slice(v);
    }

    pub fn uint(buf: &mut Vec<u8>, field: u32, v: u64) {
        key(buf, field, VARINT);
        varint(buf, v);
    }

    pub fn fixed64(buf: &mut Vec<u8>, field: u32, v: u64) {
        key(buf, field, I64);
        buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn fixed32(buf: &mut Vec<u8>, field: u32, v: u32) {
        key(buf, field, I32);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

/// Writes `KeyValue` attributes (`common.v1`) as repeated field `field` of the message being
/// written. `text` is scratch space for values that are formatted first.
pub struct Attributes<'a> {
    buf: &'a mut Vec<u8>,
    field: u32,
    text: &'a mut String,
}

impl Attributes<'_> {
    /// `KeyValue { key = 1; value = 2 }` around an `AnyValue` of `any_len` bytes.
    fn head(&mut self, key: &str, any_len: usize) {
        let kv_len = wire::len_field(1, key.len()) + wire::len_field(2, any_len);
        wire::len_prefix(self.buf, self.field, kv_len);
        wire::bytes(self.buf, 1, key.as_bytes());
        wire::len_prefix(self.buf, 2, any_len);
    }

    /// `AnyValue.string_value` (field 1).
    pub fn str(&mut self, key: &str, value: &str) {
        self.head(key, wire::len_field(1, value.len()));
        wire::bytes(self.buf, 1, value.as_bytes());
    }

    /// A value formatted with `Display`, without allocating.
    pub fn display(&mut self, key: &str, value: impl std::fmt::Display) {
        let mut text = std::mem::take(self.text);
        text.clear();
        let _ = write!(text, "{value}");
        self.str(key, &text);
        *self.text = text;
    }

    /// `AnyValue.int_value` (field 3).
    pub fn int(&mut self, key: &str, value: i64) {
        // int64 is a two's-complement varint.
        let v = value as u64;
        self.head(key, wire::key_len(3) + wire::varint_len(v));
        wire::uint(self.buf, 3, v);
    }

    /// `AnyValue.bool_value` (field 2).
    pub fn bool(&mut self, key: &str, value: bool) {
        self.head(key, 2);
        wire::uint(self.buf, 2, u64::from(value));
    }
}

/// `Span.SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// What a span says besides its attributes.
#[derive(Debug)]
pub struct SpanHead<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    /// The parent is the caller's span (from its `traceparent`), not one of ours.
    pub parent_is_remote: bool,
    pub kind: Kind,
    pub name: &'a str,
    /// Unix nanoseconds.
    pub start: u64,
    pub end: u64,
    /// `Some(message)`: status Error.
    pub error: Option<&'a str>,
}

/// Scratch buffers for encoding, reused across spans (one set per thread).
#[derive(Debug, Default)]
pub struct Encoder {
    /// The span being written (its length prefixes it in `out`).
    span: Vec<u8>,
    text: String,
    /// Finished spans: repeated `ScopeSpans.spans` (field 2) entries.
    pub out: Vec<u8>,
}

/// `Span.flags`: the W3C trace flags (sampled), and whether the parent is remote.
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_CONTEXT_IS_REMOTE: u32 = 0x200;

impl Encoder {
    /// Append one span to `out`, with the attributes `attrs` writes.
    pub fn span(&mut self, head: &SpanHead<'_>, attrs: impl FnOnce(&mut Attributes<'_>)) {
        let s = &mut self.span;
        s.clear();
        wire::bytes(s, 1, &head.trace_id);
        wire::bytes(s, 2, &head.span_id);
        if let Some(parent) = head.parent {
            wire::bytes(s, 4, &parent);
        }
        wire::bytes(s, 5, head.name.as_bytes());
        wire::uint(s, 6, head.kind as u64);
        wire::fixed64(s, 7, head.start);
        wire::fixed64(s, 8, head.end);
        attrs(&mut Attributes {
            buf: s,
            field: 9,
            text: &mut self.text,
        });
        if let Some(message) = head.error {
            // Status { message = 2; code = 3 (STATUS_CODE_ERROR = 2) }
            let len = wire::len_field(2, message.len()) + wire::key_len(3) + 1;
            wire::len_prefix(s, 15, len);
            wire::bytes(s, 2, message.as_bytes());
            wire::uint(s, 3, 2);
        }
        let mut flags = FLAG_SAMPLED | FLAG_CONTEXT_HAS_IS_REMOTE;
        if head.parent_is_remote {
            flags |= FLAG_CONTEXT_IS_REMOTE;
        }
        wire::fixed32(s, 16, flags);
        wire::bytes(&mut self.out, 2, s);
    }
}

/// The parts of every `ExportTraceServiceRequest` that do not change: the resource and the
/// instrumentation scope, encoded once.
#[derive(Debug)]
pub struct Envelope {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Envelope {
    /// `attributes` are the resource's (`service.name`, ...).
    pub fn new(attributes: &[(&str, &str)], scope_name: &str, scope_version: &str) -> Envelope {
        let mut resource = Vec::new();
        let mut text = String::new();
        let mut attrs = Attributes {
            buf: &mut resource,
            field: 1,
            text: &mut text,
        };
        for (k, v) in attributes {
            attrs.str(k, v);
        }
        let mut scope = Vec::new();
        wire::bytes(&mut scope, 1, scope_name.as_bytes());
        wire::bytes(&mut scope, 2, scope_version.as_bytes());
        Envelope { resource, scope }
    }

    /// One `ExportTraceServiceRequest { resource_spans = 1 { resource = 1; scope_spans = 2 {
    /// scope = 1; spans = 2 (the encoded spans) } } }`, after `prefix_len` zero bytes that the
    /// caller may fill in (gRPC's message frame).
    pub fn request(&self, spans: &[u8], prefix_len: usize) -> Vec<u8> {
        let scope_spans = wire::len_field(1, self.scope.len()) + spans.len();
        let resource_spans =
            wire::len_field(1, self.resource.len()) + wire::len_field(2, scope_spans);
        let total = wire::len_field(1, resource_spans);
        let mut out = Vec::with_capacity(prefix_len + total);
        out.resize(prefix_len, 0);
        wire::len_prefix(&mut out, 1, resource_spans);
        wire::bytes(&mut out, 1, &self.resource);
        wire::len_prefix(&mut out, 2, scope_spans);
        wire::bytes(&mut out, 1, &self.scope);
        out.extend_from_slice(spans);
        out
    }
}

/// The largest collector response read.
const MAX_RESPONSE: usize = 64 * 1024;

const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Where a batch is sent: the OTLP/HTTP `/v1/traces` path (an endpoint already ending in it
/// is taken as it is) or the gRPC method path under the endpoint. The endpoint was checked when
/// it was parsed; errors never echo it (it could hold a token in its path).
pub fn export_url(protocol: Protocol, endpoint: &OtlpEndpoint) -> Result<http::Uri, String> {
    let endpoint = endpoint.uri().to_string();
    let base = endpoint.trim_end_matches('/');
    let url = match protocol {
        Protocol::HttpProtobuf if base.ends_with("/v1/traces") => base.to_owned(),
        Protocol::HttpProtobuf => format!("{base}/v1/traces"),
        Protocol::Grpc => format!("{base}{GRPC_PATH}"),
    };
    url.parse()
        .map_err(|_| "is not a URL: use http://host:port or https://host:port".to_owned())
}

/// The collector connection: one pooled client, fixed URL and headers.
pub struct Transport {
    protocol: Protocol,
    url: http::Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Transport {
    /// `endpoint` is the collector's base URL (`http://host:4317`); an OTLP/HTTP endpoint that
    /// already ends in `/v1/traces` is used as it is. TLS (`https://`) is verified against the
    /// system roots and `tls`'s extra ones.
    pub fn new(
        protocol: Protocol,
        endpoint: &OtlpEndpoint,
        headers: Vec<(HeaderName, HeaderValue)>,
        tls: rustls::ClientConfig,
    ) -> Result<Transport, String> {
        let url = export_url(protocol, endpoint)?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let mut client = Client::builder(TokioExecutor::new());
        let https = match protocol {
            Protocol::HttpProtobuf => builder.enable_http1().build(),
            Protocol::Grpc => {
                // gRPC is HTTP/2 only: ALPN h2 over TLS, prior knowledge over plain TCP.
                client.http2_only(true);
                builder.enable_http2().build()
            }
        };
        Ok(Transport {
            protocol,
            url,
            headers,
            client: client.build(https),
        })
    }

    /// The URL without its query string, for logs.
    pub fn describe(&self) -> String {
        let scheme = self.url.scheme_str().unwrap_or("");
        let authority = self.url.authority().map_or("", |a| a.as_str());
        format!("{scheme}://{authority}{}", self.url.path())
    }

    /// Send one batch of encoded spans; the error says why it was not accepted (never a
    /// header value).
    pub async fn send(&self, envelope: &Envelope, spans: &[u8]) -> Result<(), ExportError> {
        let (body, content_type) = match self.protocol {
            Protocol::HttpProtobuf => (envelope.request(spans, 0), "application/x-protobuf"),
            Protocol::Grpc => {
                // Length-prefixed message: compressed flag 0, then the length, big-endian.
                let mut body = envelope.request(spans, 5);
                let len = u32::try_from(body.len() - 5).map_err(|_| ExportError::BatchTooLarge)?;
                body[1..5].copy_from_slice(&len.to_be_bytes());
                (body, "application/grpc")
            }
        };
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(http::header::CONTENT_TYPE, content_type);
        if self.protocol == Protocol::Grpc {
            req = req.header(http::header::TE, "trailers");
        }
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| ExportError::BadRequest)?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| ExportError::Unreachable(root_cause(&e)))?;
        let status = resp.status();
        let head_grpc_status = grpc_status(resp.headers());
        // Only the status matters; a collector's answer is small (an empty message, or a
        // partial-success count), so a larger one is refused rather than buffered.
        let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|_| ExportError::CutOff)?;
        match self.protocol {
            Protocol::HttpProtobuf if status.is_success() => Ok(()),
            Protocol::HttpProtobuf => Err(ExportError::Http(status)),
            Protocol::Grpc if status != StatusCode::OK => Err(ExportError::Http(status)),
            Protocol::Grpc => {
                // The status is in the trailers, or in the headers of a trailers-only answer.
                let code = body.trailers().and_then(grpc_status).or(head_grpc_status);
                match code {
                    Some((0, _)) => Ok(()),
                    Some((code, message)) => Err(ExportError::Grpc { code, message }),
                    None => Err(ExportError::NoGrpcStatus),
                }
            }
        }
    }
}

/// Why the collector did not accept a batch (never a header value: they may hold API keys).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("batch too large")]
    BatchTooLarge,
    #[error("invalid export request")]
    BadRequest,
    #[error("collector unreachable: {0}")]
    Unreachable(String),
    #[error("collector response cut off or too large")]
    CutOff,
    #[error("collector answered HTTP {0}")]
    Http(StatusCode),
    #[error("collector answered gRPC status {code}: {message}")]
    Grpc { code: u32, message: String },
    #[error("collector answered without a gRPC status")]
    NoGrpcStatus,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// `grpc-status` and `grpc-message` (percent-encoded text, shown as received but bounded).
fn grpc_status(headers: &http::HeaderMap) -> Option<(u32, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    Some((code, message))
}

/// The innermost error (hyper-util's outer one only says "client error (Connect)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `name=value` pairs separated by commas, values percent-encoded: the format of
/// `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_RESOURCE_ATTRIBUTES`. Errors show names only.
pub fn parse_pairs(list: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((name, value)) = item.split_once('=') else {
            return Err(format!("{:?} is not name=value", redact(item)));
        };
        let value = percent_encoding::percent_decode_str(value.trim())
            .decode_utf8()
            .map_err(|_| format!("the value of {} is not UTF-8", name.trim()))?;
        out.push((name.trim().to_owned(), value.into_owned()));
    }
    Ok(out)
}

/// Export headers in the `OTEL_EXPORTER_OTLP_HEADERS` format. Values are marked sensitive.
pub fn parse_headers(list: &str) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    parse_pairs(list)?
        .iter()
        .map(|(name, value)| header(name, value))
        .collect()
}

/// One export header from its name and value.
pub fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::try_from(name).map_err(|_| format!("{name:?} is not a header name"))?;
    let mut v =
        HeaderValue::try_from(value).map_err(|_| format!("the value of {name} is not valid"))?;
    v.set_sensitive(true);
    Ok((n, v))
}

/// The name part of a malformed `name=value` item, for errors (the rest may be a secret).
fn redact(item: &str) -> &str {
    item.split(['=', ':']).next().unwrap_or("")
}

/// The export timeout from `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` (milliseconds).
pub fn timeout_from(value: Option<&str>, default: Duration) -> Duration {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(default, Duration::from_millis)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message as _;

    #[test]
    fn varints_match_the_spec() {
        for (v, want) in [
            (0u64, vec![0u8]),
            (1, vec![1]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (150, vec![0x96, 0x01]),
            (
                u64::MAX,
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut buf = Vec::new();
            wire::varint(&mut buf, v);
            assert_eq!(buf, want, "{v}");
            assert_eq!(wire::varint_len(v), want.len(), "{v}");
        }
    }

    /// What the encoder writes decodes with the official generated types, field for field.
    #[test]
    fn spans_decode_with_opentelemetry_proto() {
        let envelope = Envelope::new(
            &[("service.name", "portcullis"), ("service.version", "1.2.3")],
            "portcullis",
            "1.2.3",
        );
        let mut enc = Encoder::default();
        let long = "x".repeat(300);
        enc.span(
            &SpanHead {
                trace_id: [0xab; 16],
                span_id: [1; 8],
                parent: Some([2; 8]),
                parent_is_remote: true,
                kind: Kind::Server,
                name: "tools/call create_issue",
                start: 1_700_000_000_000_000_000,
                end: 1_700_000_000_000_123_456,
                error: Some("policy_denied"),
            },
            |a| {
                a.str("portcullis.identity.spiffe_id", "spiffe://acme.test/agent");
                a.int("server.port", 443);
                a.int("negative", -5);
                a.bool("portcullis.credential.cache_hit", true);
                a.display("url.full", format_args!("https://h{}", long));
            },
        );
        enc.span(
            &SpanHead {
                trace_id: [0xab; 16],
                span_id: [3; 8],
                parent: None,
                parent_is_remote: false,
                kind: Kind::Client,
                name: "GET",
                start: 5,
                end: 6,
                error: None,
            },
            |_| {},
        );
        let body = envelope.request(&enc.out, 0);
        let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        let rs = &req.resource_spans[0];
        let res = rs.resource.as_ref().unwrap();
        assert_eq!(res.attributes[0].key, "service.name");
        let scope = &rs.scope_spans[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "portcullis");
        assert_eq!(scope.scope.as_ref().unwrap().version, "1.2.3");
        let (a, b) = (&scope.spans[0], &scope.spans[1]);
        assert_eq!(a.trace_id, vec![0xab; 16]);
        assert_eq!(a.span_id, vec![1; 8]);
        assert_eq!(a.parent_span_id, vec![2; 8]);
        assert_eq!(a.name, "tools/call create_issue");
        assert_eq!(a.kind, 2);
        assert_eq!(a.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(a.end_time_unix_nano, 1_700_000_000_000_123_456);
        assert_eq!(a.flags, 0x301);
        let status = a.status.as_ref().unwrap();
        assert_eq!((status.code, status.message.as_str()), (2, "policy_denied"));
        let attr = |k: &str| {
            a.attributes
                .iter()
                .find(|kv| kv.key == k)
                .and_then(|kv| kv.value.clone())
                .and_then(|v| v.value)
                .unwrap()
        };
        assert_eq!(
            attr("portcullis.identity.spiffe_id"),
            Value::StringValue("spiffe://acme.test/agent".into())
        );
        assert_eq!(attr("server.port"), Value::IntValue(443));
        assert_eq!(attr("negative"), Value::IntValue(-5));
        assert_eq!(
            attr("portcullis.credential.cache_hit"),
            Value::BoolValue(true)
        );
        assert_eq!(
            attr("url.full"),
            Value::StringValue(format!("https://h{long}"))
        );
        assert!(b.parent_span_id.is_empty());
        assert_eq!((b.kind, b.flags), (3, 0x101));
        assert!(b.status.is_none());
        assert!(b.attributes.is_empty());
    }

    #[test]
    fn header_lists_follow_the_otel_format() {
        let h = parse_headers("api-key=s%3Dcr%2Ct, x-tenant = a b ,").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].0, "api-key");
        assert_eq!(h[0].1, "s=cr,t");
        assert!(h[0].1.is_sensitive());
        assert_eq!(
            (h[1].0.as_str(), h[1].1.to_str().unwrap()),
            ("x-tenant", "a b")
        );
        let err = parse_headers("authorization:Bearer-secret").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
        assert!(parse_headers("bad name=x").is_err());
    }

    #[test]
    fn endpoints_become_export_urls() {
        let url = |p, e: &str| {
            let endpoint = OtlpEndpoint::try_from(e.to_owned()).map_err(str::to_owned)?;
            export_url(p, &endpoint).map(|u| u.to_string())
        };
        assert_eq!(
            url(Protocol::HttpProtobuf, "http://c:4318/").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            url(Protocol::HttpProtobuf, "https://c/otlp/v1/traces").unwrap(),
            "https://c/otlp/v1/traces"
        );
        assert_eq!(
            url(Protocol::Grpc, "http://c:4317").unwrap(),
            format!("http://c:4317{GRPC_PATH}")
        );
        assert!(url(Protocol::Grpc, "c:4317").is_err());
        let err = url(Protocol::Grpc, "https://user:hunter2@c:4317").unwrap_err();
        assert!(
            err.contains("credentials") && !err.contains("hunter2"),
            "{err}"
        );
        assert!(url(Protocol::Grpc, "ftp://c:4317").is_err());
    }
}
