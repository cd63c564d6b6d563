//! The client for the proxy's own back-end services (Vault, OAuth token endpoints): reached
//! directly, not through the egress guard (the operator configured them), TLS always verified
//! (system roots plus an optional CA), every call bounded by a timeout, errors phrased so they
//! are safe to show an agent (no URL credentials, no response bodies).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::certs::TlsError;
use crate::config::UpstreamConfig;
use crate::credentials::fetch::SourceError;

pub struct Backend {
    /// What to call it in errors ("vault", "OAuth token endpoint").
    name: &'static str,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl Backend {
    pub fn new(
        name: &'static str,
        ca: Option<PathBuf>,
        timeout: Duration,
    ) -> Result<Backend, TlsError> {
        let roots = UpstreamConfig {
            extra_roots: ca.into_iter().collect(),
            ..UpstreamConfig::default()
        };
        let tls = crate::upstream::client_tls_config(&roots, Vec::new())?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Backend {
            name,
            client: Client::builder(TokioExecutor::new()).build(https),
            timeout,
        })
    }

    /// One request; `headers` values are marked sensitive (they may carry tokens).
    pub async fn call(
        &self,
        method: Method,
        url: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), SourceError> {
        let backend = self.name;
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            let mut v = v.clone();
            v.set_sensitive(true);
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|_| SourceError::BadRequest { backend })?;
        let run = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|_| SourceError::Unreachable { backend })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|_| SourceError::CutOff { backend })?
                .to_bytes();
            Ok((status, body))
        };
        let timeout = self.timeout;
        tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_| Err(SourceError::Timeout { backend, timeout }))
    }
}
