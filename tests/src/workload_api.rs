//! An in-process SPIFFE Workload API server (no SPIRE binary can be installed here): the
//! documented gRPC service `SpiffeWorkloadAPI` with its two X.509 server-streaming methods,
//! `FetchX509SVID` and `FetchX509Bundles`, over a Unix socket. Like SPIRE it refuses calls
//! without the `workload.spiffe.io: true` metadata header. The message structs are written by
//! hand from `workload.proto` (no protoc here). Tests push new SVIDs and bundles (rotation),
//! and can break the open streams to exercise the client's reconnect.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use portcullis::pki::{Authority, Issued};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::codegen::{http, BoxFuture, Service};

/// `X509SVIDRequest {}`
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidRequest {}

/// `X509SVIDResponse`
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: HashMap<String, Vec<u8>>,
}

/// `X509SVID`: DER chain (leaf first), PKCS#8 DER key, DER bundle of its trust domain.
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}

/// `X509BundlesRequest {}`
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509BundlesRequest {}

/// `X509BundlesResponse`: DER bundles keyed by the trust domain's SPIFFE ID.
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509BundlesResponse {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "2")]
    pub bundles: HashMap<String, Vec<u8>>,
}

type Updates<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

#[derive(Clone)]
struct State {
    svid: watch::Sender<Option<X509SvidResponse>>,
    bundles: watch::Sender<Option<X509BundlesResponse>>,
    /// Bumped to end every open stream with an error.
    generation: watch::Sender<u64>,
    calls: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

impl State {
    /// The latest value, then every change, until `break_streams`.
    fn updates<T: Clone + Send + Sync + 'static>(
        &self,
        rx: watch::Receiver<Option<T>>,
    ) -> Updates<T> {
        let mut generation = self.generation.subscribe();
        let values = WatchStream::new(rx).filter_map(|v| async move { v.map(Ok) });
        let broken = futures_util::stream::once(async move {
            let _ = generation.changed().await;
            Err(tonic::Status::unavailable("workload API restarting"))
        });
        // Ends (after its error) when broken; the client must reconnect.
        let merged = futures_util::stream::select(values, broken).scan(false, |ended, item| {
            let out = if *ended { None } else { Some(item) };
            if matches!(out, Some(Err(_))) {
                *ended = true;
            }
            async move { out }
        });
        Box::pin(merged)
    }
}

#[derive(Clone)]
struct WorkloadApiService(State);

impl tonic::server::NamedService for WorkloadApiService {
    const NAME: &'static str = "SpiffeWorkloadAPI";
}

/// `FetchX509SVID` and `FetchX509Bundles`: the header check, then the updates stream.
struct FetchSvid(State);
struct FetchBundles(State);

impl tonic::server::ServerStreamingService<X509SvidRequest> for FetchSvid {
    type Response = X509SvidResponse;
    type ResponseStream = Updates<X509SvidResponse>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<X509SvidRequest>) -> Self::Future {
        let s = &self.0;
        let r = s
            .check_header(&request)
            .map(|()| tonic::Response::new(s.updates(s.svid.subscribe())));
        Box::pin(async move { r })
    }
}

impl tonic::server::ServerStreamingService<X509BundlesRequest> for FetchBundles {
    type Response = X509BundlesResponse;
    type ResponseStream = Updates<X509BundlesResponse>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<X509BundlesRequest>) -> Self::Future {
        let s = &self.0;
        let r = s
            .check_header(&request)
            .map(|()| tonic::Response::new(s.updates(s.bundles.subscribe())));
        Box::pin(async move { r })
    }
}

impl State {
    /// SPIRE answers a call without the security header with InvalidArgument.
    fn check_header<T>(&self, req: &tonic::Request<T>) -> Result<(), tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match req.metadata().get("workload.spiffe.io") {
            Some(v) if v == "true" => Ok(()),
            _ => {
                self.refused.fetch_add(1, Ordering::SeqCst);
                Err(tonic::Status::invalid_argument(
                    "security header missing from request",
                ))
            }
        }
    }
}

impl<B> Service<http::Request<B>> for WorkloadApiService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let state = self.0.clone();
        match req.uri().path() {
            "/SpiffeWorkloadAPI/FetchX509SVID" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(FetchSvid(state), req).await)
            }),
            "/SpiffeWorkloadAPI/FetchX509Bundles" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(FetchBundles(state), req).await)
            }),
            _ => Box::pin(async move {
                Ok(tonic::Status::unimplemented("not served by this test server").into_http())
            }),
        }
    }
}

/// The server; dropped with the test (the socket lives in its own temp dir).
pub struct WorkloadApiServer {
    pub socket: PathBuf,
    state: State,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

/// PKCS#8 DER of an issued certificate's key (rcgen writes PKCS#8 PEM).
pub fn pkcs8_der(issued: &Issued) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .unwrap()
        .secret_pkcs8_der()
        .to_vec()
}

impl WorkloadApiServer {
    pub async fn start() -> WorkloadApiServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let state = State {
            svid: watch::channel(None).0,
            bundles: watch::channel(None).0,
            generation: watch::channel(0).0,
            calls: Arc::default(),
            refused: Arc::default(),
        };
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let task = tokio::spawn({
            let svc = WorkloadApiService(state.clone());
            async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming(incoming)
                    .await;
            }
        });
        WorkloadApiServer {
            socket,
            state,
            _dir: dir,
            task,
        }
    }

    /// `unix:///path/agent.sock`
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Push the workload's SVID `spiffe_id` (`issued` by `ca`) with `ca` as its trust domain's
    /// bundle, plus federated bundles (trust domain name, CA).
    pub fn set_svid(
        &self,
        spiffe_id: &str,
        issued: &Issued,
        ca: &Authority,
        federated: &[(&str, &Authority)],
    ) {
        let resp = X509SvidResponse {
            svids: vec![X509Svid {
                spiffe_id: spiffe_id.to_owned(),
                x509_svid: issued.cert_der.clone(),
                x509_svid_key: pkcs8_der(issued),
                bundle: ca.cert_der().to_vec(),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: federated
                .iter()
                .map(|(td, a)| (format!("spiffe://{td}"), a.cert_der().to_vec()))
                .collect(),
        };
        self.state.svid.send_replace(Some(resp));
    }

    /// Push the X.509 bundles: trust domain name → CA certificates (DER, concatenated on the
    /// wire as the Workload API sends them).
    pub fn set_bundles(&self, bundles: &[(&str, Vec<&[u8]>)]) {
        let resp = X509BundlesResponse {
            crl: Vec::new(),
            bundles: bundles
                .iter()
                .map(|(td, certs)| (format!("spiffe://{td}"), certs.concat()))
                .collect(),
        };
        self.state.bundles.send_replace(Some(resp));
    }

    /// End every open stream with UNAVAILABLE, as an agent restart would.
    pub fn break_streams(&self) {
        self.state.generation.send_modify(|g| *g += 1);
    }

    /// Calls received so far, and how many were refused for a missing security header.
    pub fn calls(&self) -> (usize, usize) {
        (
            self.state.calls.load(Ordering::SeqCst),
            self.state.refused.load(Ordering::SeqCst),
        )
    }
}

impl Drop for WorkloadApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
