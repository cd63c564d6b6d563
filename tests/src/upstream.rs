//! A real TLS upstream on loopback that records what reaches it and answers by path.

use super::*;

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// The HTTP version the request arrived with.
    pub version: String,
    pub path: String,
    pub headers: http::HeaderMap,
}

/// Requests the upstream saw, and a counter tests can wait on.
pub struct Recorder {
    seen: Mutex<Vec<Seen>>,
    count: tokio::sync::watch::Sender<usize>,
}

impl Recorder {
    fn record(&self, s: Seen) {
        let mut seen = self.seen.lock().unwrap();
        seen.push(s);
        self.count.send_replace(seen.len());
    }
}

/// A real HTTP(S) server on loopback that records requests. `/slow` waits until `release()`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    recorder: Arc<Recorder>,
    gate: Arc<tokio::sync::Semaphore>,
    slow_arrived: Arc<tokio::sync::Notify>,
}

impl Upstream {
    /// TLS when `tls` is given, plain HTTP otherwise; binds `ip:0`.
    pub async fn start(ip: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
        let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
        let u = Upstream {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
            recorder: Arc::new(Recorder {
                seen: Mutex::default(),
                count: tokio::sync::watch::channel(0).0,
            }),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            slow_arrived: Arc::default(),
        };
        let (conns, seen, gate, arrived) = (
            u.connections.clone(),
            u.recorder.clone(),
            u.gate.clone(),
            u.slow_arrived.clone(),
        );
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let (seen, gate, arrived, acceptor) = (
                    seen.clone(),
                    gate.clone(),
                    arrived.clone(),
                    acceptor.clone(),
                );
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, gate, arrived) = (seen.clone(), gate.clone(), arrived.clone());
                        async move { Ok::<_, Infallible>(respond(req, &seen, &gate, &arrived).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        u
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.recorder.seen.lock().unwrap().clone()
    }

    /// Wait until at least `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.recorder.count.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n))
            .await
            .expect("requests did not arrive")
            .unwrap();
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Wait until a `/slow` request has arrived.
    pub async fn slow_arrived(&self) {
        tokio::time::timeout(WAIT, self.slow_arrived.notified())
            .await
            .expect("no /slow request arrived");
    }

    /// Let one waiting `/slow` request answer.
    pub fn release(&self) {
        self.gate.add_permits(1);
    }
}

async fn respond(
    req: Request<Incoming>,
    seen: &Recorder,
    gate: &tokio::sync::Semaphore,
    arrived: &tokio::sync::Notify,
) -> Response<Full<Bytes>> {
    seen.record(Seen {
        method: req.method().to_string(),
        version: format!("{:?}", req.version()),
        path: req.uri().path().to_owned(),
        headers: req.headers().clone(),
    });
    if matches!(req.uri().path(), "/echo" | "/gzip-echo") {
        // Echo what arrived (headers, query, body), in the body and in a header: lets tests
        // check substitution upstream and redaction on the way back. `/gzip-echo` compresses
        // it whatever the request's Accept-Encoding says (a server that ignores it).
        let gzip = req.uri().path() == "/gzip-echo";
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let headers: serde_json::Map<String, Value> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
            .collect();
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        let echo = json!({"headers": headers, "query": query, "body": body}).to_string();
        let resp = Response::builder()
            .header("content-type", "application/json")
            .header("x-echo-authorization", auth);
        return match gzip {
            true => resp
                .header("content-encoding", "gzip")
                .body(Full::new(Bytes::from(gzip_bytes(echo.as_bytes()))))
                .unwrap(),
            false => resp.body(Full::new(Bytes::from(echo))).unwrap(),
        };
    }
    if req.uri().path() == "/mcp-params" {
        // A stateless MCP server (revision 2026-07-28) whose `query` tool mirrors its `region`
        // argument into `Mcp-Param-Region` (`x-mcp-header`): answers `tools/list` with that
        // definition and any other request with the Mcp-Param headers it received.
        let params: serde_json::Map<String, Value> = req
            .headers()
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("mcp-param-"))
            .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
            .collect();
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let msg: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let result = match msg["method"].as_str() {
            Some("tools/list") => json!({"tools": [{"name": "query", "inputSchema": {
                "type": "object",
                "properties": {
                    "region": {"type": "string", "x-mcp-header": "Region"},
                    "sql": {"type": "string"}},
                "required": ["sql"]}}]}),
            _ => json!({"content": [{"type": "text", "text": "ok"}], "params": params}),
        };
        let answer = json!({"jsonrpc": "2.0", "id": msg["id"], "result": result});
        return Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(answer.to_string())))
            .unwrap();
    }
    if req.uri().path() == "/sse-tools" {
        // An MCP server answering every POST with a tools/list result on an event stream,
        // after a progress notification. `?surrogate`: the listing holds a lone surrogate
        // escape, which JavaScript's JSON.parse and Python's json read and serde_json refuses.
        let extra = match req.uri().query() {
            Some("surrogate") => r#","x":"\ud800""#,
            _ => "",
        };
        let body = format!(
            "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\
             \"params\":{{\"progressToken\":1,\"progress\":1}}}}\n\n\
             id: 2\ndata: {{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{{\"tools\":[\
             {{\"name\":\"search_issues\",\"inputSchema\":{{\"type\":\"object\"}}}},\
             {{\"name\":\"delete_repo\",\"inputSchema\":{{\"type\":\"object\"}}{extra}}}]}}}}\n\n"
        );
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
    }
    if req.uri().path() == "/echo-forms" {
        // Reflect the Authorization value and the query in the forms APIs and frameworks
        // reflect values in: base64/base64url, JSON escapes, percent-encoding.
        return echo_forms(&req);
    }
    if req.uri().path() == "/early-401" {
        // Answers before reading the upload, and closes (an API rejecting a token at once).
        return Response::builder()
            .status(401)
            .header("connection", "close")
            .body(Full::new(Bytes::from_static(b"{\"error\":\"early\"}")))
            .unwrap();
    }
    if req.uri().path() == "/always-401" {
        return Response::builder()
            .status(401)
            .body(Full::new(Bytes::from_static(
                b"{\"error\":\"invalid_token\"}",
            )))
            .unwrap();
    }
    if req.uri().path() == "/redirect" {
        let to = req.uri().query().unwrap_or("").to_owned();
        return Response::builder()
            .status(302)
            .header("location", to)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    if req.uri().path().starts_with("/first-auth-fails") {
        // An upstream that rejects the first credential it sees on a path (say, revoked at
        // the provider) and accepts the next request.
        let path = req.uri().path().to_owned();
        let earlier = seen
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .count();
        if earlier == 1 {
            // Read the request first, as an API server checking a token usually does: this
            // peer tests the 401 handling, not an answer that races the upload.
            let _ = http_body_util::BodyExt::collect(req.into_body()).await;
            return Response::builder()
                .status(401)
                .header("www-authenticate", "Bearer error=\"invalid_token\"")
                .body(Full::new(Bytes::from_static(
                    b"{\"error\":\"invalid_token\"}",
                )))
                .unwrap();
        }
    }
    if req.uri().path() == "/slow" {
        arrived.notify_one();
        let _ = gate.acquire().await.map(|p| p.forget());
    }
    let body = json!({"upstream": "test", "path": req.uri().path()}).to_string();
    Response::builder()
        .header("content-type", "application/json")
        .header("connection", "x-upstream-hop")
        .header("x-upstream-hop", "must-not-reach-client")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// `gzip -c` (the system's gzip, as the MCP tests use it).
pub fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = Command::new("gzip")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    gz.stdin.take().unwrap().write_all(data).unwrap();
    gz.wait_with_output().unwrap().stdout
}

fn echo_forms(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    use base64::Engine as _;
    let auth = req
        .headers()
        .get("authorization")
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    let token = auth
        .strip_prefix(b"Bearer ")
        .map(<[u8]>::to_vec)
        .unwrap_or_else(|| auth.clone());
    let b64 = base64::engine::general_purpose::STANDARD.encode(&token);
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&token);
    let text = String::from_utf8_lossy(&token).into_owned();
    let json = serde_json::to_string(&text).unwrap().replace('/', "\\/");
    let all_u: String = text
        .chars()
        .map(|c| format!("\\u{:04x}", u32::from(c)))
        .collect();
    let pct: String = token.iter().map(|b| format!("%{b:02X}")).collect();
    let query = req.uri().query().unwrap_or("").to_owned();
    let body = format!(
        "{{\"auth\":{},\"b64\":\"{b64}\",\"b64url\":\"{b64url}\",\"json\":{json},\"u\":\"{all_u}\",\"pct\":\"{pct}\",\"query\":{}}}",
        serde_json::to_string(&String::from_utf8_lossy(&auth)).unwrap(),
        serde_json::to_string(&query).unwrap(),
    );
    Response::builder()
        .header("content-type", "application/json")
        .header("x-echo-b64", b64)
        .header("x-echo-pct", pct)
        .header(
            "x-echo-raw",
            http::HeaderValue::from_bytes(&[&b"\xff "[..], &auth].concat()).unwrap(),
        )
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}
