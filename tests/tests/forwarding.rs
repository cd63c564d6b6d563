//! What the proxy does with authenticated traffic: CONNECT + MITM (HTTP/1.1 and h2),
//! absolute-form HTTP, passthrough, the egress guard, header hygiene, limits, upstream errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use portcullis_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup(edit: impl FnOnce(&mut serde_json::Value) + 'static) -> Harness {
    Harness::builder().config(edit).start().await
}

#[tokio::test(flavor = "multi_thread")]
async fn mitm_serves_http1_and_h2_and_uses_the_mitm_leaf() {
    let s = setup(|_| {}).await;
    let url = s.url("/v1/things?q=secret-query-value");
    for proto in ["--http1.1", "--http2"] {
        let out = s.curl(&[proto, "-v", &url]).await;
        assert_eq!(out.status, 200, "{proto}: {out:?}");
        assert_eq!(out.json()["path"], "/v1/things");
        // The client saw our MITM leaf (it only trusts the MITM CA, not the upstream CA).
        assert!(
            out.stderr.contains("test MITM CA"),
            "{proto}: {}",
            out.stderr
        );
        // Response hop-by-hop headers from the upstream are stripped.
        assert_eq!(out.header("x-upstream-hop"), None, "{proto}");
    }
    // The logging phase runs when the response body ends, so wait for both lines.
    let gets = s.proxy.wait_access(2, |e| e["method"] == "GET");
    for e in gets {
        assert_eq!(e["status"], 200);
        assert_eq!(e["path"], "/v1/things");
        assert_eq!(e["spiffe_id"], "spiffe://acme.test/agents/research");
        assert!(e["bytes"].as_u64().unwrap() > 0);
    }
    let lines = s.proxy.logs.lines().join("\n");
    assert!(
        !lines.contains("secret-query-value"),
        "query values must never be logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_form_plain_http_is_forwarded() {
    let s = setup(|_| {}).await;
    let plain = Upstream::start("127.0.0.1", None).await;
    let url = format!("http://127.0.0.1:{}/plain", plain.port());
    let out = s.curl(&[&url]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.json()["path"], "/plain");
    let seen = plain.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers.get("host").unwrap(),
        &format!("127.0.0.1:{}", plain.port())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_and_proxy_authorization_never_reach_upstream() {
    let s = setup(|_| {}).await;
    let plain = Upstream::start("127.0.0.1", None).await;
    // HTTP/1.1 inside the tunnel: h2 has no Connection header (curl would drop it itself).
    let headers = [
        "--http1.1",
        "-H",
        "Connection: x-private-hop",
        "-H",
        "X-Private-Hop: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "TE: trailers",
        "-H",
        "Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==",
        "-H",
        "Proxy-Connection: keep-alive",
        "-H",
        "X-Kept: yes",
    ];
    let https = s.url("/h");
    let http = format!("http://127.0.0.1:{}/h", plain.port());
    for (url, up) in [(&https, &s.up), (&http, &plain)] {
        let mut args: Vec<&str> = headers.to_vec();
        args.push(url);
        let out = s.curl(&args).await;
        assert_eq!(out.status, 200, "{out:?}");
        let seen = up.seen();
        let h = &seen.last().unwrap().headers;
        assert_eq!(h.get("x-kept").unwrap(), "yes", "{url}");
        for gone in [
            "x-private-hop",
            "keep-alive",
            "te",
            "proxy-authorization",
            "proxy-connection",
        ] {
            assert!(
                h.get(gone).is_none(),
                "{url}: {gone} reached the upstream: {h:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_connect_targets_get_400() {
    let s = setup(|_| {}).await;
    for target in [
        "localhost",
        "localhost:0",
        "localhost:99999",
        "127.1:443",
        "exa mple.com:443",
        "[::1:443",
    ] {
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        let resp = raw_request(&s.pki, s.proxy.addr, &s.agent, &req).await;
        assert_eq!(resp.status, 400, "{target}: {resp:?}");
    }
    // Targets hyper accepts as authorities reach our parser and get the error contract.
    let resp = raw_request(
        &s.pki,
        s.proxy.addr,
        &s.agent,
        "CONNECT localhost HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(
        resp.header("x-portcullis-error").as_deref(),
        Some("bad_request")
    );
    let body = resp.json();
    assert_eq!(body["error"], "bad_request");
    assert!(body["reason"].as_str().unwrap().contains("port"), "{body}");
    assert_eq!(body["trace_id"].as_str().unwrap().len(), 32);
    // Origin-form on the proxy port is not a proxy request.
    let resp = raw_request(
        &s.pki,
        s.proxy.addr,
        &s.agent,
        "GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 400);
    assert_eq!(
        resp.header("x-portcullis-error").as_deref(),
        Some("bad_request")
    );
    assert_eq!(s.up.connection_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn blocked_destinations_get_403_and_are_never_dialled() {
    // Allowed: 127.0.0.1 only. The victim listens on 127.0.0.2 (loopback, not allowed).
    let s = setup(|_| {}).await;
    let victim = Upstream::start("127.0.0.2", Some(s.pki.upstream_tls.clone())).await;
    let victim_plain = Upstream::start("127.0.0.2", None).await;
    let targets = [
        format!("127.0.0.2:{}", victim.port()),
        "10.0.0.1:443".to_owned(),
        "169.254.169.254:80".to_owned(),
        "[::1]:443".to_owned(),
        "[::ffff:127.0.0.2]:443".to_owned(),
    ];
    for t in &targets {
        let req = format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n");
        let resp = raw_request(&s.pki, s.proxy.addr, &s.agent, &req).await;
        assert_eq!(resp.status, 403, "{t}: {resp:?}");
        assert_eq!(
            resp.header("x-portcullis-error").as_deref(),
            Some("destination_blocked"),
            "{t}"
        );
        assert_eq!(resp.json()["error"], "destination_blocked");
    }
    let url = format!("http://127.0.0.2:{}/", victim_plain.port());
    let out = s.curl(&[&url]).await;
    out.assert_refused(403, "destination_blocked");
    // A name resolving to a blocked address is blocked too (localhost -> 127.0.0.1 is allowed,
    // but ::1 is not in the allow list, and any blocked address blocks the name).
    assert_eq!(
        victim.connection_count() + victim_plain.connection_count(),
        0,
        "a blocked address was dialled"
    );
    s.proxy
        .wait_access(targets.len() + 1, |e| e["error"] == "destination_blocked");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_with_untrusted_certificate_gets_502() {
    let s = setup(|_| {}).await;
    let stranger = portcullis::pki::Authority::generate("stranger CA", None).unwrap();
    let bad = Upstream::start("127.0.0.1", Some(server_tls(&stranger, &["localhost"]))).await;
    let url = format!("https://localhost:{}/", bad.port());
    let out = s.curl(&[&url]).await;
    out.assert_refused(502, "upstream_unreachable");
    assert!(
        out.json()["reason"].as_str().unwrap().contains("TLS"),
        "{}",
        out.body
    );
    assert!(
        bad.seen().is_empty(),
        "no request may be sent over an unverified connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431() {
    let s = setup(|c| c["limits"] = serde_json::json!({"max_header_bytes": 4096})).await;
    let big = format!("X-Big: {}", "a".repeat(5000));
    let url = s.url("/");
    let out = s.curl(&["-H", &big, &url]).await;
    out.assert_refused(431, "headers_too_large");
    // Past what the proxy reads of a head (8× the limit, at least 64 KiB): the proxy answers
    // 431 and closes while the client may still be writing, so the client sees either the
    // 431 (with the contract) or a reset. Never a forward, never a crash.
    let huge = format!("X-Huge: {}", "b".repeat(100_000));
    let out = s.curl(&["--http1.1", "-H", &huge, &url]).await;
    // (On a reset, the last status curl saw is the CONNECT 200.)
    match out.status {
        431 => out.assert_refused(431, "headers_too_large"),
        _ => assert!(!out.success && out.status == 200, "{out:?}"),
    }
    // On h2 too: a block over the limit reaches the proxy's own check, not an h2 stream
    // error (curl retries those five times, then fails).
    let large = format!("X-Large: {}", "c".repeat(20_000));
    let out = s.curl(&["--http2", "-H", &large, &url]).await;
    out.assert_refused(431, "headers_too_large");
    let out = s.curl(&["--http1.1", "-H", &large, &url]).await;
    out.assert_refused(431, "headers_too_large");
    assert!(s.up.seen().is_empty());
    // The proxy is still healthy.
    assert_eq!(s.curl(&[&url]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_off() {
    let s = setup(|c| {
        c["limits"] =
            serde_json::json!({"header_read_timeout": "1s", "tls_handshake_timeout": "1s"})
    })
    .await;
    // Slowloris: an unfinished request head is dropped after header_read_timeout.
    let mut tls = raw_tls(&s.pki, s.proxy.addr, &s.agent).await;
    tls.write_all(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, tls.read(&mut buf))
        .await
        .expect("not cut off");
    assert!(
        matches!(n, Ok(0) | Err(_)) || String::from_utf8_lossy(&buf).contains("408"),
        "{n:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut off too early"
    );
    // A TCP client that never starts TLS is dropped after tls_handshake_timeout.
    let mut tcp = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("not cut off");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_header_must_match_the_connect_target() {
    let s = setup(|_| {}).await;
    let url = s.url("/");
    let out = s
        .curl(&["--http1.1", "-H", "Host: evil.example", &url])
        .await;
    assert_eq!(out.status, 400, "{out:?}");
    assert!(
        out.json()["reason"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{}",
        out.body
    );
    assert!(s.up.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_host_header_or_an_inner_connect_is_refused_inside_a_tunnel() {
    let s = setup(|_| {}).await;
    // curl sends one Host only: two go by hand, inside a real intercepted tunnel.
    let target = format!("localhost:{}", s.up.port());
    let twice = format!("GET / HTTP/1.1\r\nHost: {target}\r\nHost: {target}\r\n\r\n");
    let out = raw_in_tunnel(&s.pki, s.proxy.addr, &s.agent, &target, &twice).await;
    assert_eq!(out.status, 400, "{out:?}");
    assert!(out.json()["reason"]
        .as_str()
        .unwrap()
        .contains("more than one Host"));
    let inner = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let out = raw_in_tunnel(&s.pki, s.proxy.addr, &s.agent, &target, &inner).await;
    out.assert_refused(405, "method_not_allowed");
    assert!(s.up.seen().is_empty(), "{:?}", s.up.seen().len());
}

/// Plain HTTP inside a CONNECT tunnel (curl `-p`, Node's undici `ProxyAgent` for `http://`
/// URLs) is served through the same pipeline, per request, and sent upstream over plain TCP;
/// bytes that are neither TLS nor HTTP get a 400.
#[tokio::test(flavor = "multi_thread")]
async fn plain_http_inside_a_tunnel_goes_through_the_pipeline() {
    let policy = "package portcullis\n\nimport rego.v1\n\ndefault decision := true\n\n\
        decision := {\"allow\": false, \"reason\": \"no secrets\"} if input.request.path == \"/secret\"\n";
    let s = Harness::builder().policy(policy).start().await;
    let plain = Upstream::start("127.0.0.1", None).await;
    let url = |p: &str| format!("http://localhost:{}{p}", plain.port());
    let out = s.curl(&["-p", &url("/v1/things?q=1")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.json()["path"], "/v1/things");
    let out = s.curl(&["-p", &url("/secret")]).await;
    out.assert_refused(403, "policy_denied");
    let seen: Vec<String> = plain.seen().iter().map(|r| r.path.clone()).collect();
    assert_eq!(seen, ["/v1/things"]);
    // Node's undici ProxyAgent: a real fetch of an http:// URL, tunnelled with CONNECT.
    let node = |url: String| {
        let mut cmd = std::process::Command::new(node());
        cmd.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("node/fetch_via_proxy.mjs"))
            .arg(format!("https://localhost:{}", s.proxy.addr.port()))
            .arg(url)
            .arg(s.pki.path("acme-ca.pem"))
            .arg(&s.agent.cert)
            .arg(&s.agent.key);
        clear_proxy_env(&mut cmd);
        let out = cmd.output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str::<serde_json::Value>(line.trim()).unwrap_or_else(|e| {
            panic!(
                "node said {line:?} ({e}); stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let fetched = node(url("/from-node"));
    assert_eq!(fetched["status"], 200, "{fetched}");
    let fetched = node(url("/secret"));
    assert_eq!(fetched["status"], 403, "{fetched}");
    assert_eq!(fetched["error"], "policy_denied");
    let seen: Vec<String> = plain.seen().iter().map(|r| r.path.clone()).collect();
    assert_eq!(seen, ["/v1/things", "/from-node"]);
    let decided = s
        .proxy
        .decisions
        .wait_for("the /secret decision", |l| l.contains("no secrets"));
    let decided: serde_json::Value = serde_json::from_str(&decided).unwrap();
    assert_eq!(decided["kind"], "http");

    // Neither TLS nor HTTP.
    let target = format!("localhost:{}", plain.port());
    let mut tls = raw_tls(&s.pki, s.proxy.addr, &s.agent).await;
    let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    tls.write_all(connect.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut tls).await.status, 200);
    tls.write_all(b"\x00\x01 not a protocol").await.unwrap();
    let out = read_response(&mut tls).await;
    out.assert_refused(400, "bad_request");
}

/// A malformed chunked body is the client's fault: 400 with the error contract, not a 502
/// blamed on the upstream, and nothing forwarded.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_chunked_body_is_a_400() {
    let s = setup(|c| c["limits"] = serde_json::json!({"inspect_body_bytes": 64})).await;
    let target = format!("localhost:{}", s.up.port());
    let head = format!("POST /x HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: chunked\r\n\r\n");
    // Bad framing in the part read for inspection, and past it (while the body streams on).
    let big = "a".repeat(100);
    for chunks in [
        "zz\r\nhello\r\n0\r\n\r\n".to_owned(),
        format!("64\r\n{big}\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ] {
        let bad = format!("{head}{chunks}");
        let out = raw_in_tunnel(&s.pki, s.proxy.addr, &s.agent, &target, &bad).await;
        out.assert_refused(400, "bad_request");
    }
    assert!(s.up.seen().is_empty());
}

/// Request heads the HTTP library would refuse on its own (with a bare 400/431) are refused by
/// the proxy first, with the error contract and an access-log line, on the proxy connection
/// and inside a tunnel; nothing reaches the upstream. Framing is followed across keep-alive
/// requests, so a bad head after good ones (chunked bodies included) is answered in order.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_heads_get_the_error_contract() {
    let s = setup(|c| c["limits"] = serde_json::json!({"max_header_bytes": 4096})).await;
    let target = format!("localhost:{}", s.up.port());
    let many = "X-Many: y\r\n".repeat(101);
    let long = format!("X-Long: {}\r\n", "z".repeat(70_000));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "two lengths",
            "Content-Length: 1\r\nContent-Length: 2\r\n\r\nab".into(),
            400,
            "bad_request",
        ),
        (
            "a bad length",
            "Content-Length: 1x\r\n\r\n".into(),
            400,
            "bad_request",
        ),
        (
            "length and chunked",
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
            400,
            "bad_request",
        ),
        (
            "gzip coding",
            "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".into(),
            400,
            "bad_request",
        ),
        (
            "obs-fold",
            "X-Folded: a\r\n b\r\n\r\n".into(),
            400,
            "bad_request",
        ),
        ("a bare CR", "X-Cr: a\rb\r\n\r\n".into(), 400, "bad_request"),
        ("a NUL", "X-Nul: a\0b\r\n\r\n".into(), 400, "bad_request"),
        (
            "too many fields",
            format!("{many}\r\n"),
            431,
            "headers_too_large",
        ),
        (
            "a head over the read limit",
            format!("{long}\r\n"),
            431,
            "headers_too_large",
        ),
    ];
    for (what, rest, status, code) in &cases {
        let host = format!("Host: {target}\r\n");
        // Inside an intercepted tunnel (origin-form) and on the proxy connection (absolute-form).
        let inner = format!("POST /x HTTP/1.1\r\n{host}{rest}");
        let out = raw_in_tunnel(&s.pki, s.proxy.addr, &s.agent, &target, &inner).await;
        assert_eq!(
            (out.status, out.header("x-portcullis-error").as_deref()),
            (*status, Some(*code)),
            "{what} in a tunnel: {out:?}"
        );
        let trace_id = out.json()["trace_id"].as_str().unwrap().to_owned();
        assert_eq!(trace_id.len(), 32);
        s.proxy
            .logs
            .wait_for("the refusal's access line", |l| l.contains(&trace_id));
        let outer = format!("POST http://{target}/x HTTP/1.1\r\n{host}{rest}");
        let out = raw_request(&s.pki, s.proxy.addr, &s.agent, &outer).await;
        assert_eq!(
            (out.status, out.header("x-portcullis-error").as_deref()),
            (*status, Some(*code)),
            "{what}: {out:?}"
        );
    }
    let space = format!("GET /a b HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let out = raw_in_tunnel(&s.pki, s.proxy.addr, &s.agent, &target, &space).await;
    out.assert_refused(400, "bad_request");
    assert!(s.up.seen().is_empty(), "{:?}", s.up.seen());

    // Keep-alive: the gate follows the framing (a chunked body with an extension and a
    // trailer, a sized one), so the bad head after them is found and refused.
    let mut tunnel = raw_tunnel(&s.pki, s.proxy.addr, &s.agent, &target).await;
    for (request, status) in [
        (format!("POST /one HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"), 200),
        (format!("POST /two HTTP/1.1\r\nHost: {target}\r\nContent-Length: 3\r\n\r\nabc"), 200),
        (format!("GET /three HTTP/1.1\r\nHost: {target}\r\nX-Folded: a\r\n b\r\n\r\n"), 400),
    ] {
        tunnel.write_all(request.as_bytes()).await.unwrap();
        let out = read_response(&mut tunnel).await;
        match status {
            200 => assert_eq!(out.status, 200, "{request:?}: {out:?}"),
            _ => out.assert_refused(400, "bad_request"),
        }
    }
    let seen: Vec<String> = s.up.seen().iter().map(|r| r.path.clone()).collect();
    assert_eq!(seen, ["/one", "/two"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_inside_mitm_gets_501() {
    let s = setup(|_| {}).await;
    let url = s.url("/ws");
    let out = s
        .curl(&[
            "--http1.1",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            &url,
        ])
        .await;
    out.assert_refused(501, "upgrade_not_supported");
    assert!(s.up.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn passthrough_hosts_are_tunnelled_without_interception() {
    let s = setup(|c| c["mitm"]["passthrough"] = serde_json::json!(["localhost"])).await;
    let url = s.url("/pt");
    // Trusting only the upstream's CA works: the client talks TLS to the upstream itself.
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-D", "-", "-o", "-", "-v"])
        .arg("--proxy")
        .arg(format!("https://{}", s.proxy.addr))
        .arg("--proxy-cacert")
        .arg(s.pki.path("acme-ca.pem"))
        .arg("--proxy-cert")
        .arg(&s.agent.cert)
        .arg("--proxy-key")
        .arg(&s.agent.key)
        .arg("--cacert")
        .arg(s.pki.path("upstream-ca.pem"))
        .arg(&url);
    let out = run_curl(cmd).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert!(out.stderr.contains("test upstream CA"), "{}", out.stderr);
    assert_eq!(
        s.proxy
            .metric("portcullis_mitm_leaf_cache_misses_total")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_first_connects_issue_one_leaf() {
    let s = setup(|_| {}).await;
    let url = s.url("/c");
    let args = [url.as_str()];
    let runs = (0..8).map(|_| s.curl(&args));
    for out in futures_util::future::join_all(runs).await {
        assert_eq!(out.status, 200, "{out:?}");
    }
    assert_eq!(
        s.proxy
            .metric("portcullis_mitm_leaf_cache_misses_total")
            .await,
        1
    );
    assert_eq!(
        s.proxy
            .metric("portcullis_mitm_leaf_cache_hits_total")
            .await,
        7
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_gets_504() {
    let s = setup(|c| c["upstream"]["response_header_timeout"] = serde_json::json!("1s")).await;
    let url = s.url("/slow");
    let out = s.curl(&[&url]).await;
    out.assert_refused(504, "upstream_timeout");
    s.up.release();
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let s = setup(|c| c["limits"] = serde_json::json!({"max_connections": 1})).await;
    let first = raw_tls(&s.pki, s.proxy.addr, &s.agent).await;
    // The only slot is taken: the listener stops accepting (new clients wait in the backlog).
    s.proxy
        .wait_metric("portcullis_connection_limit_reached", |v| v == 1)
        .await;
    let (pki, addr, agent) = (std::sync::Arc::new(s.pki), s.proxy.addr, s.agent.clone());
    let second = tokio::spawn(async move { raw_tls(&pki, addr, &agent).await });
    assert_eq!(s.proxy.metric("portcullis_active_connections").await, 1);
    // The second completes once the first connection closes.
    drop(first);
    let conn = tokio::time::timeout(WAIT, second)
        .await
        .expect("second connection never served");
    assert!(conn.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed() {
    let s = setup(|c| c["limits"] = serde_json::json!({"idle_timeout": "1s"})).await;
    let mut tls = raw_tls(&s.pki, s.proxy.addr, &s.agent).await;
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, tls.read(&mut buf))
        .await
        .expect("idle connection kept open");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the idle timeout"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn python_httpx_agent_reaches_upstream_through_the_proxy() {
    let s = setup(|_| {}).await;
    let url = s.url("/from-python");
    let (v, _) = httpx_get(&s, &url, &serde_json::json!({})).await;
    assert_eq!(v["status"], 200);
    assert_eq!(v["body"]["path"], "/from-python");
    let e = s.proxy.wait_access(1, |e| e["path"] == "/from-python");
    assert_eq!(e[0]["spiffe_id"], "spiffe://acme.test/agents/research");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callers_trace_is_continued_upstream_and_in_logs() {
    let s = setup(|_| {}).await;
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let url = s.url("/traced");
    let tp = format!("traceparent: {caller}");
    let out = s
        .curl(&[
            "-H",
            &tp,
            "-H",
            "tracestate: vendor=1",
            "-H",
            "baggage: userId=alice,tenant=acme",
            &url,
        ])
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    let h = &s.up.seen()[0].headers;
    let sent = h["traceparent"].to_str().unwrap();
    assert!(
        sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{sent}"
    );
    assert!(
        !sent.contains("00f067aa0ba902b7"),
        "the proxy's own span must be the parent: {sent}"
    );
    assert_eq!(h["tracestate"], "vendor=1");
    assert_eq!(h["baggage"], "userId=alice,tenant=acme");
    let access = s.proxy.wait_access(1, |e| e["path"] == "/traced");
    assert_eq!(access[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        sent.split('-').nth(2).unwrap(),
        access[0]["span_id"].as_str().unwrap()
    );
    // Without a traceparent, a new trace starts and is still sent upstream.
    let out = s.curl(&[&url]).await;
    assert_eq!(out.status, 200);
    let sent = s.up.seen()[1].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!sent.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{sent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_protocol_follows_upstream_http2() {
    for (http2, expected) in [(true, "HTTP/2.0"), (false, "HTTP/1.1")] {
        let s = setup(move |c| c["upstream"]["http2"] = serde_json::json!(http2)).await;
        let url = s.url("/v");
        assert_eq!(s.curl(&[&url]).await.status, 200);
        assert_eq!(s.up.seen()[0].version, expected, "upstream.http2 = {http2}");
    }
}

/// Bodies buffered for inspection are bounded process-wide: while one client's upload holds
/// most of `limits.buffered_body_bytes`, another's is refused at once (503 `overloaded`,
/// counted), and served again once the first is done.
#[tokio::test(flavor = "multi_thread")]
async fn buffered_bodies_are_bounded_by_a_process_budget() {
    let s = setup(|c| {
        c["limits"] = serde_json::json!({"inspect_body_bytes": 2048,
            "buffered_body_bytes": 3072, "buffered_body_bytes_per_connection": 4096})
    })
    .await;
    let target = format!("localhost:{}", s.up.port());
    let post =
        |n: usize| format!("POST /up HTTP/1.1\r\nHost: {target}\r\nContent-Length: {n}\r\n\r\n");
    // A: declares 2040 bytes, sends 1500 of them and waits.
    let mut a = raw_tunnel(&s.pki, s.proxy.addr, &s.agent, &target).await;
    a.write_all(post(2040).as_bytes()).await.unwrap();
    a.write_all(&[b'a'; 1500]).await.unwrap();
    a.flush().await.unwrap();
    let deadline = Instant::now() + WAIT;
    while s.proxy.metric("portcullis_buffered_body_bytes").await == 0 {
        assert!(Instant::now() < deadline, "A's body was never held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B: 2040 bytes do not fit beside A's.
    let b_req = format!("{}{}", post(2040), "b".repeat(2040));
    let out = raw_in_tunnel(&s.pki, s.proxy.addr, &s.agent, &target, &b_req).await;
    out.assert_refused(503, "overloaded");
    assert!(
        out.json()["reason"]
            .as_str()
            .unwrap()
            .contains("limits.buffered_body_bytes"),
        "{out:?}"
    );
    assert_eq!(
        s.proxy.metric("portcullis_body_budget_refused_total").await,
        1
    );
    // A finishes and is served; its bytes are given back, and B fits now.
    a.write_all(&[b'a'; 540]).await.unwrap();
    assert_eq!(read_response(&mut a).await.status, 200);
    let out = raw_in_tunnel(&s.pki, s.proxy.addr, &s.agent, &target, &b_req).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(s.proxy.metric("portcullis_buffered_body_bytes").await, 0);
}

/// An upstream that answers before reading the upload and closes: its answer reaches the
/// agent intact, on HTTP/1.1 and h2, 200 times in a row (no reset, no 502), for an upload the
/// proxy buffered and one it streamed.
#[tokio::test(flavor = "multi_thread")]
async fn an_early_upstream_answer_reaches_the_agent() {
    let s = setup(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB (buffered for inspection, then sent whole) and 3 MiB (over the limit: streamed).
    let mut uploads = Vec::new();
    for (name, size) in [("1m.bin", 1 << 20), ("3m.bin", 3 << 20)] {
        let path = dir.path().join(name);
        std::fs::write(&path, vec![b'u'; size]).unwrap();
        uploads.push(format!("@{}", path.display()));
    }
    let url = s.url("/early-401");
    let mut failures = Vec::new();
    for i in 0..200 {
        let proto = if i % 2 == 0 { "--http1.1" } else { "--http2" };
        let data = &uploads[(i / 2) % 2];
        let out = s
            .curl(&[proto, "-X", "POST", "--data-binary", data, &url])
            .await;
        if out.status != 401 || out.header("x-portcullis-error").is_some() {
            failures.push(format!("{proto} #{i}: {} {}", out.status, out.body));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 200 failed: {failures:#?}",
        failures.len()
    );
}
