//! A minimal OTLP/HTTP collector for the `mitm-otel` proxy: accepts `POST /v1/traces`, reads the
//! body and answers `200` with an empty `ExportTraceServiceResponse` (zero bytes of protobuf),
//! decoding nothing, so what the run measures is the proxy's cost of exporting, not a
//! collector's. Its CPU is the bench's, not the proxy's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct OtlpSink {
    pub addr: SocketAddr,
    /// Export requests and their body bytes received.
    pub requests: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl OtlpSink {
    pub async fn start() -> Result<OtlpSink> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the OTLP sink")?;
        let addr = listener.local_addr()?;
        let (requests, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (r, b) = (requests.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (r, b) = (r.clone(), b.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (r, b) = (r.clone(), b.clone());
                        async move {
                            let n = req
                                .into_body()
                                .collect()
                                .await
                                .map_or(0, |c| c.to_bytes().len());
                            r.fetch_add(1, Ordering::Relaxed);
                            b.fetch_add(n as u64, Ordering::Relaxed);
                            let mut resp = Response::new(Full::new(Bytes::new()));
                            resp.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/x-protobuf"),
                            );
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Ok(OtlpSink {
            addr,
            requests,
            bytes,
            task,
        })
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
