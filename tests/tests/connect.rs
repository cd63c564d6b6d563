//! The local connector (`portcullis connect`) and the SPIFFE Workload API, end to end: agent
//! runtimes with nothing but `HTTPS_PROXY=http://127.0.0.1:PORT` (curl, Python httpx and
//! requests) reach the upstream through connector → Portcullis, and the proxy's policy and
//! decision log see the connector's SPIFFE ID; the client allow-list; SVID rotation from files
//! and from the Workload API; the proxy's own certificate and bundles from the Workload API;
//! bad inputs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::pki::{Authority, Issued, LeafSpec};
use portcullis_tests::*;
use serde_json::{json, Value};

const HOUR: Duration = Duration::from_secs(3600);
const CONNECTOR_ID: &str = "spiffe://acme.test/agents/connector";

/// Only the connector's workload may do anything.
const ONLY_CONNECTOR: &str = r#"package portcullis

import rego.v1

default decision := {"allow": false, "reason": "not the connector's workload"}

decision := {"allow": true, "reason": "the connector's workload"} if {
	input.identity.spiffe_id == "spiffe://acme.test/agents/connector"
}
"#;

fn file_args(pki: &Pki, proxy: &Proxy, client: &ClientCert) -> Vec<String> {
    vec![
        "--upstream".into(),
        format!("https://localhost:{}", proxy.addr.port()),
        "--svid".into(),
        client.cert.display().to_string(),
        "--svid-key".into(),
        client.key.display().to_string(),
        "--bundle".into(),
        pki.path("acme-ca.pem").display().to_string(),
        "--reload-interval".into(),
        "100ms".into(),
    ]
}

fn start_connector(args: &[String]) -> Connector {
    Connector::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A Python agent (`httpx` or `requests`) with only the proxy environment.
async fn python_agent(conn: &Connector, pki: &Pki, client: &str, url: &str) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(python_script("env_proxy_agent.py"))
        .args([client, url]);
    clear_proxy_env(&mut cmd);
    cmd.envs(conn.env(pki));
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{client}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Wait for the decision log line of `spiffe_id` on `path`.
fn decision_for(proxy: &Proxy, spiffe_id: &str, path: &str) -> Value {
    let line = proxy
        .decisions
        .wait_for(&format!("{spiffe_id} {path}"), |l| {
            l.contains(&format!("\"spiffe_id\":\"{spiffe_id}\""))
                && l.contains(&format!("\"path\":\"{path}\""))
        });
    serde_json::from_str(&line).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_with_only_https_proxy_reach_the_upstream_as_the_connectors_workload() {
    let pki = Pki::new();
    replace_file(&pki.path("policy/allow.rego"), ONLY_CONNECTOR);
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let plain = Upstream::start("127.0.0.1", None).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let agent = pki.client("connector", CONNECTOR_ID);
    let conn = start_connector(&file_args(&pki, &proxy, &agent));

    // curl: HTTPS through CONNECT + MITM, and plain HTTP in absolute form.
    let out = conn
        .curl(
            &pki,
            &[&format!("https://localhost:{}/curl-https", up.port())],
        )
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.json()["path"], "/curl-https");
    let out = conn
        .curl(
            &pki,
            &[&format!("http://127.0.0.1:{}/curl-http", plain.port())],
        )
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.json()["path"], "/curl-http");

    // Python runtimes, configured by the environment alone.
    for client in ["httpx", "requests"] {
        let url = format!("https://localhost:{}/{client}", up.port());
        let got = python_agent(&conn, &pki, client, &url).await;
        assert_eq!(got["status"], 200, "{client}: {got}");
        assert_eq!(got["body"]["path"], format!("/{client}"), "{client}: {got}");
    }

    // The proxy decided each as the connector's workload.
    for path in ["/curl-https", "/curl-http", "/httpx", "/requests"] {
        let d = decision_for(&proxy, CONNECTOR_ID, path);
        assert_eq!(d["decision"], "allow", "{d}");
        assert_eq!(d["reason"], "the connector's workload", "{d}");
    }

    // Another workload's connector is denied by the same policy: the identity is the SVID's.
    let other = pki.client("other", "spiffe://acme.test/agents/other");
    let conn2 = start_connector(&file_args(&pki, &proxy, &other));
    let out = conn2
        .curl(&pki, &[&format!("http://127.0.0.1:{}/other", plain.port())])
        .await;
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(
        out.header("x-portcullis-error").as_deref(),
        Some("policy_denied")
    );
    let d = decision_for(&proxy, "spiffe://acme.test/agents/other", "/other");
    assert_eq!(d["decision"], "deny", "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_outside_allow_clients_are_refused() {
    let pki = Pki::new();
    let plain = Upstream::start("127.0.0.1", None).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let agent = pki.client("connector", CONNECTOR_ID);
    let mut args = file_args(&pki, &proxy, &agent);
    args.extend(["--allow-clients".into(), "127.0.0.2/32".into()]);
    let conn = start_connector(&args);
    let url = format!("http://127.0.0.1:{}/refused", plain.port());

    // From 127.0.0.1: refused with a clear answer, and nothing went upstream.
    let out = conn.curl(&pki, &[&url]).await;
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(
        out.header("x-portcullis-error").as_deref(),
        Some("client_not_allowed")
    );
    assert!(
        out.json()["reason"].as_str().unwrap().contains("127.0.0.1"),
        "{out:?}"
    );
    conn.logs.wait_for("the refusal log line", |l| {
        l.contains("refused a client outside --allow-clients")
    });
    // HTTPS (CONNECT) is refused the same way.
    let out = conn.curl(&pki, &["https://localhost:1/"]).await;
    assert!(!out.success, "{out:?}");
    assert!(out.stderr.contains("403"), "{out:?}");
    assert_eq!(plain.connection_count(), 0);
    assert!(proxy.access_log().is_empty(), "{:?}", proxy.access_log());

    // From an allowed source address the same connector serves.
    let out = conn.curl(&pki, &["--interface", "127.0.0.2", &url]).await;
    assert_eq!(out.status, 200, "{out:?}");
}

/// The connector takes proxy requests only: an origin-form request (what a browser sends to a
/// name it resolved to the loopback listener: DNS rebinding) is refused there with a 400, so
/// it never reaches a gateway route as the connector's workload; absolute-form still works.
#[tokio::test(flavor = "multi_thread")]
async fn the_connector_refuses_origin_form_requests() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let plain = Upstream::start("127.0.0.1", None).await;
    let mut cfg = pki.base_config();
    let base = format!("https://localhost:{}", up.port());
    cfg["routes"] = json!([{"name": "open", "match": {"path_prefix": "/"}, "upstream": base}]);
    let proxy = Proxy::start(&pki.write_config(&cfg));
    let agent = pki.client("connector", CONNECTOR_ID);
    let conn = start_connector(&file_args(&pki, &proxy, &agent));
    let host = format!("rebound.example:{}", conn.addr.port());
    for request in [
        format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        format!("POST /y HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\n\r\n{{}}"),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(conn.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, request.as_bytes())
            .await
            .unwrap();
        let out = read_response(&mut tcp).await;
        out.assert_refused(400, "bad_request");
        assert!(
            out.json()["reason"]
                .as_str()
                .unwrap()
                .contains("only proxy requests"),
            "{out:?}"
        );
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    let out = conn
        .curl(
            &pki,
            &[&format!("http://127.0.0.1:{}/absolute", plain.port())],
        )
        .await;
    assert_eq!(out.status, 200, "{out:?}");
}

/// `--max-connections 1`: a second client waits (in the accept queue) until the first is done.
#[tokio::test(flavor = "multi_thread")]
async fn max_connections_queues_the_excess() {
    let pki = Pki::new();
    let plain = Upstream::start("127.0.0.1", None).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let agent = pki.client("connector", CONNECTOR_ID);
    let mut args = file_args(&pki, &proxy, &agent);
    args.extend(["--max-connections".into(), "1".into()]);
    let conn = Arc::new(start_connector(&args));
    let url = |p: &str| format!("http://127.0.0.1:{}{p}", plain.port());
    let spawn_curl = |path: &str| {
        let (conn, pki_mitm, url) = (conn.clone(), pki.path("mitm-ca.pem"), url(path));
        tokio::spawn(async move {
            let mut cmd = tokio::process::Command::new("curl");
            cmd.args(["-sS", "--max-time", "20", "-D", "-", "-o", "-", "--cacert"])
                .arg(pki_mitm)
                .arg(&url);
            clear_proxy_env(cmd.as_std_mut());
            cmd.env("http_proxy", conn.proxy_url());
            run_curl(cmd).await
        })
    };
    let slow = spawn_curl("/slow");
    plain.slow_arrived().await;
    // The only slot is taken: the connector stops accepting (new clients wait in the backlog).
    conn.logs.wait_for("the connection limit", |l| {
        l.contains("every connection slot is taken")
    });
    let queued = spawn_curl("/queued");
    assert_eq!(plain.seen().len(), 1);
    plain.release();
    assert_eq!(slow.await.unwrap().status, 200);
    let out = queued.await.unwrap();
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.json()["path"], "/queued");
}

/// An in-flight request keeps its connection (and identity) across a rotation; new connections
/// present the new SVID.
#[tokio::test(flavor = "multi_thread")]
async fn svid_files_rotated_in_place_are_used_for_new_connections() {
    let pki = Pki::new();
    let plain = Upstream::start("127.0.0.1", None).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let agent = pki.client("connector", "spiffe://acme.test/agents/v1");
    let conn = Arc::new(start_connector(&file_args(&pki, &proxy, &agent)));
    let url = |p: &str| format!("http://127.0.0.1:{}{p}", plain.port());

    let out = conn.curl(&pki, &[&url("/before")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    decision_for(&proxy, "spiffe://acme.test/agents/v1", "/before");

    // A slow request holds its tunnel open across the rotation.
    let (c2, pki_dir_url) = (conn.clone(), url("/slow"));
    let mitm = pki.path("mitm-ca.pem");
    let slow = tokio::spawn(async move {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "20", "-D", "-", "-o", "-", "--cacert"])
            .arg(mitm)
            .arg(&pki_dir_url);
        clear_proxy_env(cmd.as_std_mut());
        cmd.env("http_proxy", c2.proxy_url());
        run_curl(cmd).await
    });
    plain.slow_arrived().await;

    // Rotate: new key and certificate, replaced atomically as a deployment tool would.
    let issued = pki
        .acme
        .issue(&LeafSpec::svid("spiffe://acme.test/agents/v2", HOUR))
        .unwrap();
    replace_file(&agent.key, &issued.key_pem);
    replace_file(&agent.cert, &issued.cert_pem);
    conn.logs.wait_for("the rotation", |l| {
        l.contains("SVID files changed") && l.contains("spiffe://acme.test/agents/v2")
    });
    let out = conn.curl(&pki, &[&url("/after")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    decision_for(&proxy, "spiffe://acme.test/agents/v2", "/after");

    plain.release();
    let out = slow.await.unwrap();
    assert_eq!(out.status, 200, "{out:?}");
    decision_for(&proxy, "spiffe://acme.test/agents/v1", "/slow");

    // A broken replacement is refused and the last good SVID keeps serving.
    replace_file(&agent.cert, "not a certificate");
    conn.logs
        .wait_for("the failed reload", |l| l.contains("SVID reload failed"));
    let out = conn.curl(&pki, &[&url("/still")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    decision_for(&proxy, "spiffe://acme.test/agents/v2", "/still");
}

fn svid_from(ca: &Authority, id: &str) -> Issued {
    ca.issue(&LeafSpec::svid(id, HOUR)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn connector_takes_its_svid_from_the_workload_api_and_follows_rotation() {
    let pki = Pki::new();
    let plain = Upstream::start("127.0.0.1", None).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let api = WorkloadApiServer::start().await;
    let (v1, v2, v3) = (
        "spiffe://acme.test/agents/api-v1",
        "spiffe://acme.test/agents/api-v2",
        "spiffe://acme.test/agents/api-v3",
    );
    // The connector waits for its SVID before it listens.
    let (child, logs) = Connector::spawn(&[
        "--upstream",
        &format!("https://localhost:{}", proxy.addr.port()),
        "--workload-api",
        &api.endpoint(),
    ]);
    logs.wait_for("waiting for the SVID", |l| {
        l.contains("waiting for the X.509-SVID from the Workload API")
    });
    api.set_svid(v1, &svid_from(&pki.acme, v1), &pki.acme, &[]);
    let conn = Connector::ready(child, logs);
    let url = |p: &str| format!("http://127.0.0.1:{}{p}", plain.port());

    let out = conn.curl(&pki, &[&url("/one")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    decision_for(&proxy, v1, "/one");

    // Rotation pushed on the open stream.
    api.set_svid(v2, &svid_from(&pki.acme, v2), &pki.acme, &[]);
    conn.logs.wait_for("v2", |l| {
        l.contains("SVID from the Workload API: new connections use it") && l.contains(v2)
    });
    let out = conn.curl(&pki, &[&url("/two")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    decision_for(&proxy, v2, "/two");

    // The agent restarts (streams end with UNAVAILABLE): the connector keeps its SVID,
    // reconnects, and takes the next one.
    api.break_streams();
    conn.logs
        .wait_for("the lost stream", |l| l.contains("stream lost"));
    let out = conn.curl(&pki, &[&url("/kept")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    decision_for(&proxy, v2, "/kept");
    api.set_svid(v3, &svid_from(&pki.acme, v3), &pki.acme, &[]);
    conn.logs.wait_for("v3", |l| {
        l.contains("SVID from the Workload API: new connections use it") && l.contains(v3)
    });
    let out = conn.curl(&pki, &[&url("/three")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    decision_for(&proxy, v3, "/three");
    let (calls, refused) = api.calls();
    assert!(calls >= 2, "{calls}");
    assert_eq!(refused, 0);
}

/// The central proxy's certificate may come from a federated trust domain: the connector
/// trusts the bundles the Workload API sends with its SVID, and nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn connector_verifies_the_proxy_against_its_workload_api_bundles() {
    let pki = Pki::new();
    let plain = Upstream::start("127.0.0.1", None).await;
    // The proxy serves a certificate of other.test.
    let mut spec = LeafSpec::svid("spiffe://other.test/portcullis", HOUR);
    spec.dns = vec!["localhost".into()];
    pki.other
        .issue(&spec)
        .unwrap()
        .write(&pki.path("server-other.pem"), &pki.path("server-other.key"))
        .unwrap();
    let mut cfg = pki.base_config();
    cfg["tls"] = json!({"cert": "server-other.pem", "key": "server-other.key"});
    let proxy = Proxy::start(&pki.write_config(&cfg));
    let api = WorkloadApiServer::start().await;
    let id = "spiffe://acme.test/agents/federated";
    let svid = svid_from(&pki.acme, id);
    let url = format!("http://127.0.0.1:{}/federated", plain.port());

    // Only acme.test's bundle: the proxy's certificate is not trusted.
    api.set_svid(id, &svid, &pki.acme, &[]);
    let upstream = format!("https://localhost:{}", proxy.addr.port());
    // (The socket's bare path works as the address too.)
    let socket = api.socket.display().to_string();
    let conn = Connector::start(&["--upstream", &upstream, "--workload-api", &socket]);
    let out = conn.curl(&pki, &[&url]).await;
    assert_eq!(out.status, 502, "{out:?}");
    let reason = out.json()["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("the proxy's certificate is not trusted")
            && reason.contains("UnknownIssuer"),
        "{reason}"
    );

    // With other.test federated, it is.
    api.set_svid(id, &svid, &pki.acme, &[("other.test", &pki.other)]);
    conn.logs.wait_for("the federated bundle", |l| {
        l.contains("X.509-SVID from the Workload API") && l.contains("other.test")
    });
    let out = conn.curl(&pki, &[&url]).await;
    assert_eq!(out.status, 200, "{out:?}");
    decision_for(&proxy, id, "/federated");
}

/// `--upstream-id`: the central proxy must also be the expected workload, not just any
/// certificate of the bundle that names the host.
#[tokio::test(flavor = "multi_thread")]
async fn connector_checks_the_proxys_spiffe_id_when_asked() {
    let pki = Pki::new();
    let plain = Upstream::start("127.0.0.1", None).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let agent = pki.client("connector", CONNECTOR_ID);
    let url = format!("http://127.0.0.1:{}/id-checked", plain.port());
    let mut args = file_args(&pki, &proxy, &agent);
    args.extend([
        "--upstream-id".into(),
        "spiffe://acme.test/portcullis".into(),
    ]);
    let conn = start_connector(&args);
    let out = conn.curl(&pki, &[&url]).await;
    assert_eq!(out.status, 200, "{out:?}");

    let mut args = file_args(&pki, &proxy, &agent);
    args.extend([
        "--upstream-id".into(),
        "spiffe://acme.test/not-the-proxy".into(),
    ]);
    let conn = start_connector(&args);
    let out = conn.curl(&pki, &[&url]).await;
    assert_eq!(out.status, 502, "{out:?}");
    let reason = out.json()["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("is spiffe://acme.test/portcullis, not spiffe://acme.test/not-the-proxy"),
        "{reason}"
    );
    assert_eq!(plain.seen().len(), 1, "only the first request went through");
}

/// SPIRE refuses Workload API calls without the `workload.spiffe.io: true` header; so does
/// the test server (a raw gRPC call over HTTP/2 on the Unix socket).
#[tokio::test(flavor = "multi_thread")]
async fn the_test_workload_api_requires_the_security_header() {
    use http_body_util::BodyExt;
    let pki = Pki::new();
    let api = WorkloadApiServer::start().await;
    let id = "spiffe://acme.test/a";
    api.set_svid(id, &svid_from(&pki.acme, id), &pki.acme, &[]);
    for with_header in [false, true] {
        let io = hyper_util::rt::TokioIo::new(
            tokio::net::UnixStream::connect(&api.socket).await.unwrap(),
        );
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::post("http://localhost/SpiffeWorkloadAPI/FetchX509SVID")
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if with_header {
            req = req.header("workload.spiffe.io", "true");
        }
        // One gRPC frame: uncompressed, empty X509SVIDRequest.
        let body = http_body_util::Full::new(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]));
        let resp = send.send_request(req.body(body).unwrap()).await.unwrap();
        let status = resp
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned());
        if with_header {
            assert_eq!(status, None, "{resp:?}");
            let mut body = resp.into_body();
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let data = frame.into_data().unwrap();
            assert!(data.len() > 100, "an SVID message: {} bytes", data.len());
        } else {
            // Trailers-only response: InvalidArgument (3).
            assert_eq!(status.as_deref(), Some("3"), "{resp:?}");
        }
    }
    assert_eq!(api.calls(), (2, 1));
}

/// Wait until `n` log lines contain `what`.
fn wait_count(logs: &Logs, what: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = logs.lines();
        if lines.iter().filter(|l| l.contains(what)).count() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{n} × {what:?} not logged");
        logs.wait_for_len(lines.len() + 1, deadline);
    }
}

/// The certificate the proxy presents right now.
async fn presented_cert(proxy: &Proxy, pki: &Pki, client: &ClientCert) -> Vec<u8> {
    let tls = raw_tls(pki, proxy.addr, client).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn server_svid(ca: &Authority) -> Issued {
    let mut spec = LeafSpec::svid("spiffe://acme.test/portcullis", HOUR);
    spec.dns = vec!["localhost".into()];
    spec.ips = vec![[127, 0, 0, 1].into()];
    ca.issue(&spec).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_serves_and_verifies_with_material_from_the_workload_api() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let api = WorkloadApiServer::start().await;
    let mut cfg = pki.base_config();
    cfg["tls"] = json!({"workload_api": api.endpoint()});
    cfg["trust_domains"]["acme.test"] = json!({"workload_api": true});
    let config = pki.write_config(&cfg);

    // `check` validates such a config without the Workload API.
    let check = Command::new(bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Fail closed: bound but not ready, and not serving, until the SVID and bundles arrive.
    let proxy = Proxy::start_until(
        &config,
        &[],
        "waiting for the X.509-SVID and bundles from the Workload API",
    );
    assert_eq!(proxy.admin_get("/readyz").await.0, 503);
    let first = server_svid(&pki.acme);
    api.set_svid("spiffe://acme.test/portcullis", &first, &pki.acme, &[]);
    assert_eq!(
        proxy.admin_get("/readyz").await.0,
        503,
        "bundles still missing"
    );
    api.set_bundles(&[("acme.test", vec![pki.acme.cert_der()])]);
    proxy
        .logs
        .wait_for("listening", |l| l.contains("\"listening\""));
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);

    // It serves with the pushed SVID and accepts the bundle's trust domain (and the file one).
    let agent = pki.client("agent", "spiffe://acme.test/agents/a");
    let url = format!("https://localhost:{}/hello", up.port());
    let out = curl(&pki, proxy.addr, Some(&agent), &[&url]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(presented_cert(&proxy, &pki, &agent).await, first.cert_der);
    let other = pki.client_with(
        "other",
        &pki.other,
        &LeafSpec::svid("spiffe://other.test/b", HOUR),
    );
    let out = curl(&pki, proxy.addr, Some(&other), &[&url]).await;
    assert_eq!(out.status, 200, "{out:?}");

    // A rotated server SVID is served without restart.
    let second = server_svid(&pki.acme);
    api.set_svid("spiffe://acme.test/portcullis", &second, &pki.acme, &[]);
    wait_count(
        &proxy.logs,
        "server certificate updated from the Workload API",
        2,
    );
    assert_eq!(presented_cert(&proxy, &pki, &agent).await, second.cert_der);

    // A rotated bundle: acme.test moves to a new CA; clients of the old one are refused.
    let new_ca = Authority::generate("acme.test CA 2", Some("spiffe://acme.test")).unwrap();
    let renewed = pki.client_with(
        "renewed",
        &new_ca,
        &LeafSpec::svid("spiffe://acme.test/agents/renewed", HOUR),
    );
    let out = curl(&pki, proxy.addr, Some(&renewed), &[&url]).await;
    assert!(
        !out.success,
        "new CA accepted before its bundle arrived: {out:?}"
    );
    api.set_bundles(&[("acme.test", vec![new_ca.cert_der()])]);
    wait_count(
        &proxy.logs,
        "trust bundles updated from the Workload API",
        2,
    );
    let out = curl(&pki, proxy.addr, Some(&renewed), &[&url]).await;
    assert_eq!(out.status, 200, "{out:?}");
    let out = curl(&pki, proxy.addr, Some(&agent), &[&url]).await;
    assert!(!out.success, "the old CA is still trusted: {out:?}");
    assert!(out.stderr.contains("unknown ca"), "{}", out.stderr);
    // The file-based trust domain is untouched.
    let out = curl(&pki, proxy.addr, Some(&other), &[&url]).await;
    assert_eq!(out.status, 200, "{out:?}");

    // The agent restarts: both streams fail, the last good material keeps serving, and the
    // reconnected streams deliver the next rotation.
    api.break_streams();
    wait_count(&proxy.logs, "stream lost", 2);
    let out = curl(&pki, proxy.addr, Some(&renewed), &[&url]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(
        presented_cert(&proxy, &pki, &renewed).await,
        second.cert_der
    );
    let third = server_svid(&pki.acme);
    api.set_svid("spiffe://acme.test/portcullis", &third, &pki.acme, &[]);
    // (A reconnected stream re-sends what the proxy has: not an update, not counted.)
    wait_count(
        &proxy.logs,
        "server certificate updated from the Workload API",
        3,
    );
    assert_eq!(presented_cert(&proxy, &pki, &renewed).await, third.cert_der);
}

#[tokio::test(flavor = "multi_thread")]
async fn connector_bad_inputs_give_clear_errors() {
    let pki = Pki::new();
    let plain = Upstream::start("127.0.0.1", None).await;
    let agent = pki.client("agent", CONNECTOR_ID);
    let ca = pki.path("acme-ca.pem").display().to_string();
    let (cert, key) = (
        agent.cert.display().to_string(),
        agent.key.display().to_string(),
    );

    // Usage errors exit 2 with the reason.
    let missing = pki.path("missing.pem").display().to_string();
    #[rustfmt::skip]
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--upstream", "https://localhost:1", "--svid", &missing, "--svid-key", &key, "--bundle", &ca], "missing.pem"),
        (vec!["--upstream", "https://localhost:1", "--svid", &key, "--svid-key", &key, "--bundle", &ca], "no PEM certificate"),
        (vec!["--upstream", "http://localhost:1", "--svid", &cert, "--svid-key", &key, "--bundle", &ca], "must be https://"),
        (vec!["--upstream", "https://localhost:1", "--workload-api", "agent.sock"], "unix:///"),
        (vec!["--upstream", "https://localhost:1", "--svid", &cert], "--svid-key"),
        (vec!["--upstream", "https://localhost:1", "--upstream-id", "https://x", "--svid", &cert, "--svid-key", &key, "--bundle", &ca], "--upstream-id"),
        (vec!["--upstream", "https://localhost:1"], "--svid"),
    ];
    for (args, reason) in &cases {
        let mut child = Command::new(bin())
            .arg("connect")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_exit(&mut child, "the connector").await;
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    // Nothing listens upstream: the client gets a 502 saying so, and the connector lives on.
    let down = free_addr();
    let conn = Connector::start(&[
        "--upstream",
        &format!("https://127.0.0.1:{}", down.port()),
        "--svid",
        &cert,
        "--svid-key",
        &key,
        "--bundle",
        &ca,
    ]);
    let url = format!("http://127.0.0.1:{}/x", plain.port());
    for _ in 0..2 {
        let out = conn.curl(&pki, &[&url]).await;
        assert_eq!(out.status, 502, "{out:?}");
        assert_eq!(
            out.header("x-portcullis-error").as_deref(),
            Some("upstream_unreachable")
        );
        let reason = out.json()["reason"].as_str().unwrap().to_owned();
        assert!(reason.contains("cannot reach Portcullis"), "{reason}");
    }
    conn.logs
        .wait_for("the log line", |l| l.contains("upstream unreachable"));

    // The proxy refuses the connector's SVID (a trust domain it does not trust): the TLS 1.3
    // alert arrives after the handshake, and still becomes a clear 502.
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let evil = Authority::generate("evil.test CA", Some("spiffe://evil.test")).unwrap();
    let stranger = pki.client_with(
        "stranger",
        &evil,
        &LeafSpec::svid("spiffe://evil.test/agent", HOUR),
    );
    let conn2 = start_connector(&file_args(&pki, &proxy, &stranger));
    let out = conn2.curl(&pki, &[&url]).await;
    assert_eq!(out.status, 502, "{out:?}");
    assert_eq!(
        out.header("x-portcullis-error").as_deref(),
        Some("upstream_unreachable")
    );
    let reason = out.json()["reason"].as_str().unwrap().to_owned();
    // (Should the proxy's close overtake its alert, a reset is all the connector can report.)
    assert!(
        reason.contains("did not accept this connector's SVID (TLS alert UnknownCA)")
            || reason.contains("reset"),
        "{reason}"
    );
    assert_eq!(plain.connection_count(), 0);

    // SIGTERM: a clean stop, exit 0.
    let mut conn = conn;
    let ok = Command::new("kill")
        .args(["-TERM", &conn.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert_eq!(
        wait_exit(&mut conn.child, "the connector").await.code(),
        Some(0)
    );
}
