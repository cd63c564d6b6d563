//! An in-process SPIFFE Workload API server (no SPIRE binary can be installed here): the
//! documented gRPC service `SpiffeWorkloadAPI` with its X.509 server-streaming methods,
//! `FetchX509SVID` and `FetchX509Bundles`, and its JWT methods, `FetchJWTSVID` (unary: a
//! JWT-SVID for the current X.509-SVID's SPIFFE ID, ES256-signed by the trust domain's JWT
//! authority, for the audiences asked) and `FetchJWTBundles` (streaming: that authority as a
//! SPIFFE bundle, `use: jwt-svid`), over a Unix socket. Like SPIRE it refuses calls
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

/// `JWTSVIDRequest`
#[derive(Clone, PartialEq, prost::Message)]
pub struct JwtSvidRequest {
    #[prost(string, repeated, tag = "1")]
    pub audience: Vec<String>,
    #[prost(string, tag = "2")]
    pub spiffe_id: String,
}

/// `JWTSVIDResponse`
#[derive(Clone, PartialEq, prost::Message)]
pub struct JwtSvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<JwtSvidMessage>,
}

/// `JWTSVID`
#[derive(Clone, PartialEq, prost::Message)]
pub struct JwtSvidMessage {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    #[prost(string, tag = "2")]
    pub svid: String,
    #[prost(string, tag = "3")]
    pub hint: String,
}

/// `JWTBundlesRequest {}`
#[derive(Clone, PartialEq, prost::Message)]
pub struct JwtBundlesRequest {}

/// `JWTBundlesResponse`: JWKS documents keyed by the trust domain's SPIFFE ID.
#[derive(Clone, PartialEq, prost::Message)]
pub struct JwtBundlesResponse {
    #[prost(map = "string, bytes", tag = "1")]
    pub bundles: HashMap<String, Vec<u8>>,
}

/// The trust domain's JWT authority: an ES256 key and its key ID.
pub struct JwtAuthority {
    pair: ring::signature::EcdsaKeyPair,
    pub kid: String,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl JwtAuthority {
    pub fn generate(kid: &str) -> JwtAuthority {
        use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING as ES256};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ES256, &rng).unwrap();
        JwtAuthority {
            pair: EcdsaKeyPair::from_pkcs8(&ES256, pkcs8.as_ref(), &rng).unwrap(),
            kid: kid.to_owned(),
        }
    }

    /// This authority as a SPIFFE bundle (a JWK Set whose key says `use: jwt-svid`).
    pub fn bundle_json(&self) -> String {
        use ring::signature::KeyPair as _;
        let public = self.pair.public_key().as_ref();
        serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "use": "jwt-svid",
            "kid": self.kid, "x": b64url(&public[1..33]), "y": b64url(&public[33..])}],
            "spiffe_sequence": 1})
        .to_string()
    }

    /// A JWT-SVID for `spiffe_id` and `audience`, valid from now for `ttl_secs` (negative:
    /// already expired).
    pub fn sign(&self, spiffe_id: &str, audience: &[String], ttl_secs: i64) -> String {
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap();
        let header = serde_json::json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let claims = serde_json::json!({"sub": spiffe_id, "aud": audience,
            "exp": now + ttl_secs, "iat": now.min(now + ttl_secs - 1)});
        let signed = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = self
            .pair
            .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
            .unwrap();
        format!("{signed}.{}", b64url(sig.as_ref()))
    }
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
    /// The trust domain (of the X.509-SVID pushed) signs JWT-SVIDs with this; they live
    /// `jwt_ttl` seconds.
    jwt: Arc<JwtAuthority>,
    jwt_ttl: Arc<std::sync::atomic::AtomicI64>,
    jwt_issued: Arc<AtomicUsize>,
    jwt_bundles: watch::Sender<Option<JwtBundlesResponse>>,
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
struct FetchJwtSvid(State);
struct FetchJwtBundles(State);

impl tonic::server::UnaryService<JwtSvidRequest> for FetchJwtSvid {
    type Response = JwtSvidResponse;
    type Future = BoxFuture<tonic::Response<JwtSvidResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<JwtSvidRequest>) -> Self::Future {
        let s = &self.0;
        let r = s.check_header(&request).and_then(|()| {
            let req = request.get_ref();
            if req.audience.is_empty() {
                return Err(tonic::Status::invalid_argument(
                    "audience must be specified",
                ));
            }
            let id = s
                .svid
                .borrow()
                .as_ref()
                .and_then(|r| r.svids.first().map(|v| v.spiffe_id.clone()))
                .ok_or_else(|| tonic::Status::permission_denied("no identity issued"))?;
            s.jwt_issued.fetch_add(1, Ordering::SeqCst);
            let ttl = s.jwt_ttl.load(Ordering::SeqCst);
            let svid = s.jwt.sign(&id, &req.audience, ttl);
            Ok(tonic::Response::new(JwtSvidResponse {
                svids: vec![JwtSvidMessage {
                    spiffe_id: id,
                    svid,
                    hint: String::new(),
                }],
            }))
        });
        Box::pin(async move { r })
    }
}

impl tonic::server::ServerStreamingService<JwtBundlesRequest> for FetchJwtBundles {
    type Response = JwtBundlesResponse;
    type ResponseStream = Updates<JwtBundlesResponse>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<JwtBundlesRequest>) -> Self::Future {
        let s = &self.0;
        let r = s
            .check_header(&request)
            .map(|()| tonic::Response::new(s.updates(s.jwt_bundles.subscribe())));
        Box::pin(async move { r })
    }
}

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
            "/SpiffeWorkloadAPI/FetchJWTSVID" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(FetchJwtSvid(state), req).await)
            }),
            "/SpiffeWorkloadAPI/FetchJWTBundles" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(FetchJwtBundles(state), req).await)
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
            jwt: Arc::new(JwtAuthority::generate("jwt-authority-1")),
            jwt_ttl: Arc::new(std::sync::atomic::AtomicI64::new(300)),
            jwt_issued: Arc::default(),
            jwt_bundles: watch::channel(None).0,
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

    /// The JWT authority of the trust domains this server signs JWT-SVIDs for.
    pub fn jwt_authority(&self) -> &JwtAuthority {
        &self.state.jwt
    }

    /// JWT-SVIDs issued from now on live `secs` seconds.
    pub fn set_jwt_ttl(&self, secs: i64) {
        self.state.jwt_ttl.store(secs, Ordering::SeqCst);
    }

    /// JWT-SVIDs issued so far.
    pub fn jwt_svids_issued(&self) -> usize {
        self.state.jwt_issued.load(Ordering::SeqCst)
    }

    /// Push the JWT bundles: trust domain name → its JWT authority (this server's, or another
    /// agent's: each workload's agent signs its own JWT-SVIDs).
    pub fn set_jwt_bundles(&self, bundles: &[(&str, &JwtAuthority)]) {
        let resp = JwtBundlesResponse {
            bundles: bundles
                .iter()
                .map(|(td, a)| (format!("spiffe://{td}"), a.bundle_json().into_bytes()))
                .collect(),
        };
        self.state.jwt_bundles.send_replace(Some(resp));
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
