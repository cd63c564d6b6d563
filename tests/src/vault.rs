//! An in-process Vault KV v2 server (token and AppRole auth), from the documented API.

use super::*;

/// An in-process server implementing the documented Vault HTTP API subset Portcullis uses
/// (no Vault binary can be installed here): KV v2 reads (`GET /v1/{mount}/data/{path}`, with
/// `X-Vault-Token`, answering `{"data":{"data":{...},"metadata":{...}}}`, 403 on a bad token,
/// 404 on an unknown path) and AppRole login (`POST /v1/auth/approle/login`).
pub struct VaultServer {
    pub addr: SocketAddr,
    pub reads: Arc<AtomicUsize>,
    pub logins: Arc<AtomicUsize>,
    secrets: Arc<Vec<(&'static str, &'static str, &'static str)>>,
    /// The accept loop, which owns every connection: aborting it ends them all.
    task: Mutex<tokio::task::JoinHandle<()>>,
}

pub const VAULT_ROOT_TOKEN: &str = "hvs.root-token-for-tests";
pub const VAULT_APPROLE_TOKEN: &str = "hvs.approle-token-for-tests";

impl VaultServer {
    /// `secrets`: (path under the `secret` mount, field, value).
    pub async fn start(secrets: Vec<(&'static str, &'static str, &'static str)>) -> VaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reads, logins) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let secrets = Arc::new(secrets);
        let task = Mutex::new(Self::serve(listener, &reads, &logins, &secrets));
        VaultServer {
            addr,
            reads,
            logins,
            secrets,
            task,
        }
    }

    fn serve(
        listener: TcpListener,
        reads: &Arc<AtomicUsize>,
        logins: &Arc<AtomicUsize>,
        secrets: &Arc<Vec<(&'static str, &'static str, &'static str)>>,
    ) -> tokio::task::JoinHandle<()> {
        let (r2, l2, secrets) = (reads.clone(), logins.clone(), secrets.clone());
        tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (reads, logins, secrets) = (r2.clone(), l2.clone(), secrets.clone());
                connections.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (reads, logins, secrets) =
                            (reads.clone(), logins.clone(), secrets.clone());
                        async move {
                            Ok::<_, Infallible>(vault_respond(req, &reads, &logins, &secrets).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        })
    }

    pub fn address(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop answering: the listener closes (new connections are refused) and open
    /// connections are dropped.
    pub fn stop(&self) {
        self.task.lock().unwrap().abort();
    }

    /// Answer again on the same address, with the same secrets (after [`VaultServer::stop`]).
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        *self.task.lock().unwrap() =
            Self::serve(listener, &self.reads, &self.logins, &self.secrets);
    }
}

async fn vault_respond(
    req: Request<Incoming>,
    reads: &AtomicUsize,
    logins: &AtomicUsize,
    secrets: &[(&str, &str, &str)],
) -> Response<Full<Bytes>> {
    let reply = |status: u16, body: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let path = req.uri().path().to_owned();
    let token = req
        .headers()
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if req.method() == http::Method::POST && path == "/v1/auth/approle/login" {
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        if v["role_id"] == "role-1" && v["secret_id"] == "secret-1" {
            logins.fetch_add(1, Ordering::SeqCst);
            return reply(
                200,
                json!({"auth": {"client_token": VAULT_APPROLE_TOKEN, "lease_duration": 3600, "renewable": true}}),
            );
        }
        return reply(400, json!({"errors": ["invalid role or secret ID"]}));
    }
    let Some(secret_path) = path.strip_prefix("/v1/secret/data/") else {
        return reply(404, json!({"errors": []}));
    };
    if token != VAULT_ROOT_TOKEN && token != VAULT_APPROLE_TOKEN {
        return reply(403, json!({"errors": ["permission denied"]}));
    }
    reads.fetch_add(1, Ordering::SeqCst);
    let data: serde_json::Map<String, Value> = secrets
        .iter()
        .filter(|(p, _, _)| *p == secret_path)
        .map(|(_, f, v)| ((*f).to_owned(), json!(v)))
        .collect();
    if data.is_empty() {
        return reply(404, json!({"errors": []}));
    }
    reply(
        200,
        json!({"data": {"data": data, "metadata": {"version": 1}}, "lease_duration": 0}),
    )
}
