//! An in-process OTLP collector (HTTP/protobuf and gRPC) that decodes what the proxy exports
//! with the official generated types.

use super::*;

/// What an in-process collector received.
#[derive(Default)]
struct Received {
    spans: Vec<opentelemetry_proto::tonic::trace::v1::Span>,
    /// The resource of every `ResourceSpans` received.
    resources: Vec<opentelemetry_proto::tonic::resource::v1::Resource>,
    /// The request headers of every export call.
    headers: Vec<http::HeaderMap>,
    /// Refuse exports (HTTP 503, gRPC `UNAVAILABLE`) and keep nothing.
    refuse: bool,
}

type Receiving = (Arc<Mutex<Received>>, tokio::sync::watch::Sender<usize>);

fn receive(
    into: &Receiving,
    headers: http::HeaderMap,
    export: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) {
    let mut r = into.0.lock().unwrap();
    r.headers.push(headers);
    for rs in export.resource_spans {
        r.resources.extend(rs.resource);
        for ss in rs.scope_spans {
            r.spans.extend(ss.spans);
        }
    }
    into.1.send_replace(r.spans.len());
}

/// Serve `listener` until aborted; connections live inside the returned task.
fn accept(
    listener: TcpListener,
    grpc: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
    into: Receiving,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let addr = listener.local_addr().unwrap();
    let grpc_svc = TraceServiceServer::new(GrpcSink { into: into.clone() });
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, into, grpc_svc) = (tls.clone(), into.clone(), grpc_svc.clone());
            connections.spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let http_svc = hyper::service::service_fn(move |req| {
                    let into = into.clone();
                    async move { Ok::<_, Infallible>(otlp_http(&into, req).await) }
                });
                let grpc_svc = hyper_util::service::TowerToHyperService::new(grpc_svc);
                match (tls, grpc) {
                    (None, false) => {
                        let _ = builder.serve_connection(TokioIo::new(tcp), http_svc).await;
                    }
                    (None, true) => {
                        let _ = builder.serve_connection(TokioIo::new(tcp), grpc_svc).await;
                    }
                    (Some(tls), grpc) => {
                        let Ok(io) = tls.accept(tcp).await else {
                            return;
                        };
                        let io = TokioIo::new(io);
                        let _ = if grpc {
                            builder.serve_connection(io, grpc_svc).await
                        } else {
                            builder.serve_connection(io, http_svc).await
                        };
                    }
                }
            });
            while connections.try_join_next().is_some() {}
        }
    });
    (addr, task)
}

/// An in-process OTLP collector (no collector binary can be installed here): OTLP/HTTP
/// (`POST /v1/traces`, protobuf `ExportTraceServiceRequest`) or OTLP/gRPC (tonic's generated
/// `TraceService` server over HTTP/2), plain or over TLS. It keeps every span, resource and
/// the export calls' headers.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    received: Receiving,
    grpc: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// The accept loop, which owns every connection: aborting it ends them all.
    task: Mutex<tokio::task::JoinHandle<()>>,
}

impl OtlpReceiver {
    /// OTLP/HTTP, plain.
    pub async fn start() -> OtlpReceiver {
        Self::serve(false, None).await
    }

    /// OTLP/gRPC, plain (HTTP/2 with prior knowledge).
    pub async fn start_grpc() -> OtlpReceiver {
        Self::serve(true, None).await
    }

    /// OTLP/gRPC or OTLP/HTTP over TLS with `tls` (a certificate for `localhost`).
    pub async fn start_tls(grpc: bool, tls: Arc<rustls::ServerConfig>) -> OtlpReceiver {
        Self::serve(grpc, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn serve(grpc: bool, tls: Option<tokio_rustls::TlsAcceptor>) -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let received: Receiving = (Arc::default(), tokio::sync::watch::channel(0).0);
        let task = accept(listener, grpc, tls.clone(), received.clone());
        OtlpReceiver {
            addr: task.0,
            received,
            grpc,
            tls,
            task: Mutex::new(task.1),
        }
    }

    /// A collector that is down: its port refuses connections, open ones are dropped.
    pub fn stop(&self) {
        self.task.lock().unwrap().abort();
    }

    /// Up again on the same port (after [`OtlpReceiver::stop`]), keeping what it received.
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let (_, task) = accept(listener, self.grpc, self.tls.clone(), self.received.clone());
        *self.task.lock().unwrap() = task;
    }

    /// `http://127.0.0.1:port`, or `https://localhost:port` over TLS.
    pub fn endpoint(&self) -> String {
        if self.tls.is_some() {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// Wait until a span satisfies `pred`; returns it.
    pub async fn wait_span(
        &self,
        what: &str,
        pred: impl Fn(&opentelemetry_proto::tonic::trace::v1::Span) -> bool,
    ) -> opentelemetry_proto::tonic::trace::v1::Span {
        let mut rx = self.received.1.subscribe();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(s) = self.spans().into_iter().find(|s| pred(s)) {
                    return s;
                }
                rx.changed().await.unwrap();
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no span {what}; have {:?}",
                self.spans()
                    .iter()
                    .map(|s| s.name.clone())
                    .collect::<Vec<_>>()
            )
        })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.received.0.lock().unwrap().spans.clone()
    }

    /// Every resource received so far (one per `ResourceSpans`).
    pub fn resources(&self) -> Vec<opentelemetry_proto::tonic::resource::v1::Resource> {
        self.received.0.lock().unwrap().resources.clone()
    }

    /// The headers of every export call so far.
    pub fn headers(&self) -> Vec<http::HeaderMap> {
        self.received.0.lock().unwrap().headers.clone()
    }

    /// Refuse (or accept again) every export: HTTP 503 or gRPC status `UNAVAILABLE`.
    pub fn set_refusing(&self, refuse: bool) {
        self.received.0.lock().unwrap().refuse = refuse;
    }

    /// Everything received, as text (for leak checks).
    pub fn dump(&self) -> String {
        let r = self.received.0.lock().unwrap();
        format!("{:?} {:?}", r.resources, r.spans)
    }
}

/// The OTLP/HTTP side: protobuf in, an empty `ExportTraceServiceResponse` out; 400 for a body
/// that does not decode or a wrong path.
async fn otlp_http(into: &Receiving, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use prost::Message;
    let ok = req.uri().path() == "/v1/traces"
        && req
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/x-protobuf");
    let (parts, body) = req.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let refuse = into.0.lock().unwrap().refuse;
    let status = match ExportTraceServiceRequest::decode(body) {
        _ if refuse => 503,
        Ok(export) if ok => {
            receive(into, parts.headers, export);
            200
        }
        _ => 400,
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(
            ExportTraceServiceResponse::default().encode_to_vec(),
        )))
        .unwrap()
}

struct GrpcSink {
    into: Receiving,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for GrpcSink
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        if self.into.0.lock().unwrap().refuse {
            return Err(tonic::Status::unavailable("refusing exports"));
        }
        let headers = req.metadata().clone().into_headers();
        receive(&self.into, headers, req.into_inner());
        Ok(tonic::Response::new(Default::default()))
    }
}

/// A span attribute's string (or integer, as text) value.
pub fn span_attr(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            V::StringValue(s) => Some(s.clone()),
            V::IntValue(i) => Some(i.to_string()),
            V::BoolValue(b) => Some(b.to_string()),
            other => Some(format!("{other:?}")),
        })
}
