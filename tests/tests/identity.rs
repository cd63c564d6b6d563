//! Who may connect: SPIFFE X.509-SVID verification on the proxy's mTLS listener, end to end
//! with real curl. Every rejected client must fail the handshake and never reach the upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use portcullis::pki::rcgen;
use portcullis::pki::{Authority, LeafSpec};
use portcullis_tests::*;
use time::OffsetDateTime;

const HOUR: Duration = Duration::from_secs(3600);

fn svid(id: &str) -> LeafSpec {
    LeafSpec::svid(id, HOUR)
}

#[tokio::test(flavor = "multi_thread")]
async fn good_svid_is_accepted_and_identity_is_logged() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let agent = pki.client("agent", "spiffe://acme.test/agents/research");
    let url = format!("https://localhost:{}/hello", up.port());
    let out = curl(&pki, proxy.addr, Some(&agent), &[&url]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.json()["path"], "/hello");
    let log = proxy
        .logs
        .wait_for("access line for GET", |l| l.contains("\"GET\""));
    assert!(log.contains("spiffe://acme.test/agents/research"), "{log}");
}

/// Each case: a client certificate the proxy must refuse, and a fragment of the logged reason.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_svids_fail_the_handshake_and_never_reach_upstream() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let url = format!("https://localhost:{}/", up.port());
    let now = OffsetDateTime::now_utc();
    let evil = Authority::generate("evil.test CA", Some("spiffe://evil.test")).unwrap();

    let mut two_uris = svid("spiffe://acme.test/a");
    two_uris.uris.push("spiffe://acme.test/b".into());
    let mut https_uri = svid("spiffe://acme.test/a");
    https_uri.uris = vec!["https://acme.test/a".into()];
    let mut ca_leaf = svid("spiffe://acme.test/a");
    ca_leaf.is_ca = true;
    let mut expired = svid("spiffe://acme.test/a");
    expired.not_before = now - 2 * HOUR;
    expired.not_after = now - HOUR;
    let mut not_yet = svid("spiffe://acme.test/a");
    not_yet.not_before = now + HOUR;
    not_yet.not_after = now + 2 * HOUR;
    let mut key_cert_sign = svid("spiffe://acme.test/a");
    key_cert_sign
        .key_usages
        .push(rcgen::KeyUsagePurpose::KeyCertSign);
    let mut bad_id = svid("spiffe://acme.test/a");
    bad_id.uris = vec!["spiffe://ACME.test/a".into()];
    let mut soft_key_usage = svid("spiffe://acme.test/a");
    soft_key_usage.key_usages.clear();
    soft_key_usage.extensions = vec![key_usage_extension(0x80, false)];
    let mut subjectless = svid("spiffe://acme.test/a");
    subjectless.common_name.clear();
    subjectless.uris.clear();
    subjectless.extensions = vec![uri_san_extension("spiffe://acme.test/a", false)];
    let mut client_auth_only = svid("spiffe://acme.test/a");
    client_auth_only.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];

    // (name, signer, certificate, logged reason, TLS alert the client receives)
    let unknown = "certificate unknown";
    #[rustfmt::skip]
    let cases: Vec<(&str, &Authority, LeafSpec, &str, &str)> = vec![
        ("untrusted-td", &evil, svid("spiffe://evil.test/a"), "UnknownIssuer", "unknown ca"),
        ("two-uris", &pki.acme, two_uris, "2 URI SANs", unknown),
        ("non-spiffe", &pki.acme, https_uri, "spiffe", unknown),
        ("ca-leaf", &pki.acme, ca_leaf, "CA", unknown),
        ("expired", &pki.acme, expired, "Expired", "certificate expired"),
        ("not-yet-valid", &pki.acme, not_yet, "NotValidYet", "certificate expired"),
        ("key-cert-sign", &pki.acme, key_cert_sign, "keyCertSign", unknown),
        ("bad-spiffe-id", &pki.acme, bad_id, "invalid character", unknown),
        ("trust-domain-id", &pki.acme, svid("spiffe://acme.test"), "has no path", unknown),
        ("soft-key-usage", &pki.acme, soft_key_usage, "keyUsage extension is not marked critical", unknown),
        ("subjectless", &pki.acme, subjectless, "subjectAltName extension is not critical", unknown),
        ("client-auth-only", &pki.acme, client_auth_only, "without id-kp-serverAuth", unknown),
        // Signed by a trusted CA, but the wrong trust domain's: acme.test IDs need acme.test's CA.
        ("cross-td", &pki.other, svid("spiffe://acme.test/a"), "UnknownIssuer", "unknown ca"),
    ];
    for (name, ca, spec, reason, alert) in &cases {
        let client = pki.client_with(name, ca, spec);
        let out = curl(&pki, proxy.addr, Some(&client), &[&url]).await;
        assert!(!out.success, "{name}: curl succeeded: {out:?}");
        assert_ne!(out.status, 200, "{name}");
        assert!(
            out.stderr.contains(alert),
            "{name}: expected alert {alert:?}: {}",
            out.stderr
        );
        let line = proxy.logs.wait_for(name, |l| {
            l.contains("client TLS handshake failed") && l.contains(reason)
        });
        assert!(!line.is_empty());
    }
    // No client certificate at all.
    let out = curl(&pki, proxy.addr, None, &[&url]).await;
    assert!(!out.success, "no client cert: {out:?}");
    assert!(
        out.stderr.contains("certificate required"),
        "{}",
        out.stderr
    );
    assert_eq!(
        up.connection_count(),
        0,
        "a rejected client reached the upstream"
    );
    assert!(
        proxy.access_log().is_empty(),
        "a rejected client produced an access line"
    );
}

/// An SVID whose chain goes through an intermediate the client sends is accepted.
#[tokio::test(flavor = "multi_thread")]
async fn intermediate_chain_is_verified() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let inter = pki.acme.intermediate("acme.test intermediate").unwrap();
    let client = pki.client_with("leaf", &inter, &svid("spiffe://acme.test/via-intermediate"));
    // Send leaf + intermediate as the chain.
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(&client.cert).unwrap(),
        inter.cert_pem()
    );
    std::fs::write(&client.cert, chain).unwrap();
    let url = format!("https://localhost:{}/i", up.port());
    let out = curl(&pki, proxy.addr, Some(&client), &[&url]).await;
    assert_eq!(out.status, 200, "{out:?}");
}

fn signing_cert(uri: &str) -> LeafSpec {
    let mut spec = svid(uri);
    spec.is_ca = true;
    spec.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    spec
}

/// Every intermediate the client sends must be an X.509-SVID signing certificate (spec 3.2,
/// 4.1, 4.3), checked before the chain is verified: refused in the handshake, logged with the
/// reason, never reaching the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn intermediates_must_be_signing_certificates() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let url = format!("https://localhost:{}/", up.port());

    let mut no_cert_sign = signing_cert("spiffe://acme.test");
    no_cert_sign.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let mut not_ca = signing_cert("spiffe://acme.test");
    not_ca.is_ca = false;
    let mut soft_key_usage = signing_cert("spiffe://acme.test");
    soft_key_usage.key_usages.clear();
    soft_key_usage.extensions = vec![key_usage_extension(0x06, false)];
    #[rustfmt::skip]
    let cases = [
        ("no-key-cert-sign", no_cert_sign, "intermediate certificate 1: signing certificate lacks the keyCertSign key usage"),
        ("not-ca", not_ca, "intermediate certificate 1: signing certificate is not a CA"),
        ("id-with-path", signing_cert("spiffe://acme.test/ca"), "has a path"),
        ("soft-key-usage", soft_key_usage, "intermediate certificate 1: SVID keyUsage extension is not marked critical"),
    ];
    for (name, spec, reason) in &cases {
        let inter = pki.acme.intermediate_from(spec).unwrap();
        let client = pki.client_with(name, &inter, &svid("spiffe://acme.test/a"));
        let chain = std::fs::read_to_string(&client.cert).unwrap() + inter.cert_pem();
        std::fs::write(&client.cert, chain).unwrap();
        let out = curl(&pki, proxy.addr, Some(&client), &[&url]).await;
        assert!(!out.success, "{name}: curl succeeded: {out:?}");
        assert!(
            out.stderr.contains("certificate unknown"),
            "{name}: {}",
            out.stderr
        );
        proxy.logs.wait_for(name, |l| {
            l.contains("client TLS handshake failed") && l.contains(reason)
        });
    }
    // The same construction with a proper signing certificate is accepted.
    let inter = pki
        .acme
        .intermediate_from(&signing_cert("spiffe://acme.test"))
        .unwrap();
    let client = pki.client_with("good", &inter, &svid("spiffe://acme.test/a"));
    let chain = std::fs::read_to_string(&client.cert).unwrap() + inter.cert_pem();
    std::fs::write(&client.cert, chain).unwrap();
    let out = curl(&pki, proxy.addr, Some(&client), &[&url]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(
        up.connection_count(),
        1,
        "only the good chain reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trust_domain_added_to_config_is_accepted_without_restart() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let mut cfg = pki.base_config();
    let config = pki.write_config(&cfg);
    let proxy = Proxy::start(&config);
    let newcomer_ca = Authority::generate("new.test CA", Some("spiffe://new.test")).unwrap();
    newcomer_ca
        .write(&pki.path("new-ca.pem"), &pki.path("new-ca.key"))
        .unwrap();
    let client = pki.client_with("newcomer", &newcomer_ca, &svid("spiffe://new.test/agent"));
    let url = format!("https://localhost:{}/", up.port());

    let before = curl(&pki, proxy.addr, Some(&client), &[&url]).await;
    assert!(
        !before.success,
        "new.test must not be trusted yet: {before:?}"
    );

    cfg["trust_domains"]["new.test"] = serde_json::json!({"bundle": "new-ca.pem"});
    pki.write_config(&cfg);
    proxy.logs.wait_for("the reload", |l| {
        l.contains("reloaded server certificate and trust bundles")
    });
    assert_eq!(proxy.metric("portcullis_reloads_total").await, 1);

    let after = curl(&pki, proxy.addr, Some(&client), &[&url]).await;
    assert_eq!(after.status, 200, "{after:?}");
    // Existing identities are unaffected.
    let agent = pki.client("agent", "spiffe://acme.test/a");
    assert_eq!(
        curl(&pki, proxy.addr, Some(&agent), &[&url]).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_bundle_reload_keeps_the_last_good_one() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    std::fs::write(pki.path("other-ca.pem"), "not a certificate").unwrap();
    proxy
        .logs
        .wait_for("the reload error", |l| l.contains("reload failed"));
    assert_eq!(proxy.metric("portcullis_reload_errors_total").await, 1);
    let agent = pki.client("agent", "spiffe://acme.test/a");
    let url = format!("https://localhost:{}/", up.port());
    assert_eq!(
        curl(&pki, proxy.addr, Some(&agent), &[&url]).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_server_certificate_is_served_without_restart() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let proxy = Proxy::start(&pki.write_config(&pki.base_config()));
    let agent = pki.client("agent", "spiffe://acme.test/a");
    let url = format!("https://localhost:{}/", up.port());
    let before = curl(&pki, proxy.addr, Some(&agent), &["-v", &url]).await;
    assert!(before.stderr.contains("CN=portcullis"), "{}", before.stderr);

    let mut rotated = svid("spiffe://acme.test/portcullis");
    rotated.common_name = "portcullis-rotated".into();
    rotated.dns = vec!["localhost".into()];
    rotated.ips = vec![[127, 0, 0, 1].into()];
    pki.acme
        .issue(&rotated)
        .unwrap()
        .write(&pki.path("server.pem"), &pki.path("server.key"))
        .unwrap();
    proxy
        .logs
        .wait_for("the reload", |l| l.contains("reloaded server certificate"));
    let after = curl(&pki, proxy.addr, Some(&agent), &["-v", &url]).await;
    assert_eq!(after.status, 200, "{after:?}");
    assert!(
        after.stderr.contains("CN=portcullis-rotated"),
        "{}",
        after.stderr
    );
}

// === Identity over time ===

/// Proxy config for the tests below: `127.0.0.1` is a passthrough host, `localhost` (the same
/// upstream) is intercepted.
async fn over_time(edit: impl FnOnce(&mut serde_json::Value) + 'static) -> Harness {
    Harness::builder()
        .config(|c| c["mitm"]["passthrough"] = serde_json::json!(["127.0.0.1"]))
        .config(edit)
        .start()
        .await
}

/// A keep-alive request on the proxy connection itself (absolute-form).
fn absolute_get(h: &Harness, path: &str) -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: localhost:{}\r\n\r\n",
        h.url(path),
        h.up.port()
    )
}

type Tls<S> = tokio_rustls::client::TlsStream<S>;

/// A passthrough tunnel to the upstream's `127.0.0.1`, TLS to the upstream itself done over it,
/// and one request answered through it.
async fn passthrough_tunnel(h: &Harness, client: &ClientCert) -> Tls<Tls<tokio::net::TcpStream>> {
    let target = format!("127.0.0.1:{}", h.up.port());
    let mut outer = raw_tls(&h.pki, h.proxy.addr, client).await;
    let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    outer.write_all(connect.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut outer).await.status, 200);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(
            h.pki.upstream_ca.cert_der().to_vec(),
        ))
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, outer)
        .await
        .unwrap();
    let req = format!("GET /passthrough HTTP/1.1\r\nHost: {target}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut tls).await.status, 200);
    tls
}

/// An intercepted tunnel to `localhost`, with one request answered through it.
async fn intercepted_tunnel(h: &Harness, client: &ClientCert) -> Tls<Tls<tokio::net::TcpStream>> {
    let target = format!("localhost:{}", h.up.port());
    let mut tls = raw_tunnel(&h.pki, h.proxy.addr, client, &target).await;
    let req = format!("GET /intercepted HTTP/1.1\r\nHost: {target}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut tls).await.status, 200);
    tls
}

/// The proxy closes `s` (EOF or a reset) within [`WAIT`], sending nothing more.
async fn assert_closed<S: tokio::io::AsyncRead + Unpin>(what: &str, s: &mut S) {
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: still open"));
    assert!(matches!(n, Ok(0) | Err(_)), "{what}: read {n:?}");
}

/// The open connection's next request (`/after`) is refused as `identity_revoked` with a
/// reason containing `why`, `Connection: close`, and the connection closes; nothing reached
/// the upstream.
async fn assert_revoked_on_open<S>(h: &Harness, conn: &mut S, why: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    conn.write_all(absolute_get(h, "/after").as_bytes())
        .await
        .unwrap();
    let refused = read_response(conn).await;
    refused.assert_refused(403, "identity_revoked");
    assert_eq!(refused.header("connection").as_deref(), Some("close"));
    let reason = refused.json()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains(why), "{reason}");
    assert_closed("the proxy connection", conn).await;
    assert!(h.up.seen().iter().all(|s| s.path != "/after"));
}

/// An SVID that expires while its connections are open: the next request on the proxy
/// connection is refused (403 identity_expired, `Connection: close`) and never forwarded;
/// intercepted and passthrough tunnels are closed at notAfter.
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_svid_ends_its_connections() {
    let h = over_time(|_| {}).await;
    let spec = LeafSpec::svid("spiffe://acme.test/agents/brief", Duration::from_secs(8));
    let client = h.pki.client_with("brief", &h.pki.acme, &spec);
    let mut intercepted = intercepted_tunnel(&h, &client).await;
    let mut passthrough = passthrough_tunnel(&h, &client).await;
    let mut conn = raw_tls(&h.pki, h.proxy.addr, &client).await;
    let get = absolute_get(&h, "/keepalive");
    // Poll the open connection until the proxy refuses (bounded by WAIT).
    let deadline = std::time::Instant::now() + WAIT;
    let mut answered = 0;
    let refused = loop {
        conn.write_all(get.as_bytes()).await.unwrap();
        let resp = read_response(&mut conn).await;
        if resp.status != 200 {
            break resp;
        }
        answered += 1;
        assert!(std::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    refused.assert_refused(403, "identity_expired");
    assert_eq!(refused.header("connection").as_deref(), Some("close"));
    assert!(refused.json()["reason"]
        .as_str()
        .unwrap()
        .contains("expired at"));
    assert!(answered >= 1, "the SVID expired before its first request");
    assert_closed("the proxy connection", &mut conn).await;
    assert_closed("the intercepted tunnel", &mut intercepted).await;
    assert_closed("the passthrough tunnel", &mut passthrough).await;
    for tunnel in ["closing intercepted tunnel", "closing passthrough tunnel"] {
        h.proxy
            .logs
            .wait_for(tunnel, |l| l.contains(tunnel) && l.contains("expired at"));
    }
    let keepalive =
        h.up.seen()
            .iter()
            .filter(|s| s.path == "/keepalive")
            .count();
    assert_eq!(
        keepalive, answered,
        "the refused request reached the upstream"
    );
    h.proxy.logs.wait_for("the refusal's access line", |l| {
        l.contains("identity_expired") && l.contains("spiffe://acme.test/agents/brief")
    });
}

/// Replacing a trust domain's bundle so an open connection's chain no longer verifies: its
/// next request is refused (403 identity_revoked) and its tunnels are closed.
#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_bundle_revokes_open_connections() {
    let h = over_time(|_| {}).await;
    let client = h
        .pki
        .client_with("o", &h.pki.other, &svid("spiffe://other.test/agents/o"));
    let mut intercepted = intercepted_tunnel(&h, &client).await;
    let mut passthrough = passthrough_tunnel(&h, &client).await;
    let mut conn = raw_tls(&h.pki, h.proxy.addr, &client).await;
    let get = absolute_get(&h, "/before");
    conn.write_all(get.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut conn).await.status, 200);

    let rotated = Authority::generate("other.test CA 2", Some("spiffe://other.test")).unwrap();
    rotated
        .write(&h.pki.path("other-ca.pem"), &h.pki.path("other-ca.key"))
        .unwrap();
    h.proxy.logs.wait_for("the reload", |l| {
        l.contains("reloaded server certificate and trust bundles")
    });
    assert_revoked_on_open(
        &h,
        &mut conn,
        "no longer verifies against the trust bundles",
    )
    .await;
    assert_closed("the intercepted tunnel", &mut intercepted).await;
    assert_closed("the passthrough tunnel", &mut passthrough).await;
    // Another trust domain's connections are unaffected.
    assert_eq!(h.curl(&[&h.url("/acme")]).await.status, 200);
}

/// Removing a trust domain from the config: an open connection's next request is refused and
/// the reason names the trust domain.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_trust_domain_revokes_open_connections() {
    let h = over_time(|_| {}).await;
    let client = h
        .pki
        .client_with("o", &h.pki.other, &svid("spiffe://other.test/agents/o"));
    let mut intercepted = intercepted_tunnel(&h, &client).await;
    let mut conn = raw_tls(&h.pki, h.proxy.addr, &client).await;
    conn.write_all(absolute_get(&h, "/before").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut conn).await.status, 200);

    let mut cfg = h.pki.base_config();
    cfg["mitm"]["passthrough"] = serde_json::json!(["127.0.0.1"]);
    cfg["trust_domains"]
        .as_object_mut()
        .unwrap()
        .remove("other.test");
    h.pki.write_config(&cfg);
    h.proxy.logs.wait_for("the reload", |l| {
        l.contains("reloaded server certificate and trust bundles")
    });
    let why = "trust domain other.test is no longer trusted";
    assert_revoked_on_open(&h, &mut conn, why).await;
    assert_closed("the intercepted tunnel", &mut intercepted).await;
}

/// `limits.max_connection_age`: a request in flight when the age is reached completes with
/// `Connection: close`, then the connection closes; an idle tunnel is closed.
#[tokio::test(flavor = "multi_thread")]
async fn connections_are_closed_gracefully_at_their_max_age() {
    let h = over_time(|c| c["limits"] = serde_json::json!({"max_connection_age": "2s"})).await;
    let mut intercepted = intercepted_tunnel(&h, &h.agent).await;
    let mut conn = raw_tls(&h.pki, h.proxy.addr, &h.agent).await;
    conn.write_all(absolute_get(&h, "/slow").as_bytes())
        .await
        .unwrap();
    h.up.slow_arrived().await;
    h.proxy.logs.wait_for("the age limit", |l| {
        l.contains("closing the client connection") && l.contains("max_connection_age")
    });
    h.up.release();
    let resp = read_response(&mut conn).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("connection").as_deref(), Some("close"));
    assert_closed("the proxy connection", &mut conn).await;
    assert_closed("the intercepted tunnel", &mut intercepted).await;
    // A new connection is served as usual.
    assert_eq!(h.curl(&[&h.url("/fresh")]).await.status, 200);
}

/// At `limits.max_connection_age` an intercepted h2 connection is shut down gracefully
/// (GOAWAY): the request in flight still completes.
#[tokio::test(flavor = "multi_thread")]
async fn an_intercepted_h2_connection_finishes_its_request_at_max_age() {
    let h = over_time(|c| c["limits"] = serde_json::json!({"max_connection_age": "2s"})).await;
    let h = std::sync::Arc::new(h);
    let h2 = h.clone();
    let slow = tokio::spawn(async move { h2.curl(&["--http2", &h2.url("/slow")]).await });
    h.up.slow_arrived().await;
    h.proxy.logs.wait_for("the age limit", |l| {
        l.contains("closing intercepted tunnel") && l.contains("max_connection_age")
    });
    h.up.release();
    let out = slow.await.unwrap();
    assert_eq!(out.status, 200, "{out:?}");
    assert!(out.headers.starts_with("HTTP/2"), "{out:?}");
    let seen = h.up.seen();
    assert!(seen.iter().any(|s| s.path == "/slow"), "{seen:?}");
}

// === Identity revocation ===

/// `openssl x509 -noout FLAGS -in cert`, the value after `=`.
fn openssl_x509(cert: &std::path::Path, flags: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout"])
        .args(flags)
        .arg("-in")
        .arg(cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    text.trim().rsplit_once('=').unwrap().1.to_owned()
}

/// `portcullis identity ARGS --admin ADDR`: (success, stdout, stderr).
fn identity_cli(h: &Harness, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin())
        .arg("identity")
        .args(args)
        .args(["--admin", &h.proxy.admin.to_string()])
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

/// A SPIFFE ID revoked by path prefix with the CLI: the open connection's next request is
/// refused (403 identity_revoked naming the revocation) and never forwarded, its tunnels
/// close, new handshakes fail with the `certificate_revoked` alert; IDs outside the prefix are
/// untouched; restoring lets the identity in again. Counted in `/metrics`.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_spiffe_id_is_refused_on_open_and_new_connections() {
    let h = over_time(|_| {}).await;
    let client = h.pki.client("r", "spiffe://acme.test/agents/r/1");
    let mut intercepted = intercepted_tunnel(&h, &client).await;
    let mut passthrough = passthrough_tunnel(&h, &client).await;
    let mut conn = raw_tls(&h.pki, h.proxy.addr, &client).await;
    conn.write_all(absolute_get(&h, "/before").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut conn).await.status, 200);

    for bad in [
        vec!["revoke", "--id", "spiffe://acme.test"],
        vec!["revoke", "--prefix", "https://acme.test/agents"],
        vec!["revoke", "--serial", "not-hex"],
    ] {
        let (ok, _, err) = identity_cli(&h, &bad);
        assert!(!ok && !err.is_empty(), "{bad:?} was accepted");
    }
    let (ok, out, err) = identity_cli(
        &h,
        &[
            "revoke",
            "--prefix",
            "spiffe://acme.test/agents/r/",
            "--reason",
            "key leaked",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("prefix:spiffe://acme.test/agents/r"), "{out}");

    let why = "revoked by an operator: prefix:spiffe://acme.test/agents/r (key leaked)";
    assert_revoked_on_open(&h, &mut conn, why).await;
    assert_closed("the intercepted tunnel", &mut intercepted).await;
    assert_closed("the passthrough tunnel", &mut passthrough).await;

    let out = h.curl_as(&client, &[&h.url("/new")]).await;
    assert!(!out.success && out.status != 200, "{out:?}");
    assert!(out.stderr.contains("revoked"), "{}", out.stderr);
    // A sibling outside the prefix, on a segment boundary.
    let sibling = h.pki.client("r2", "spiffe://acme.test/agents/r2");
    assert_eq!(h.curl_as(&sibling, &[&h.url("/sibling")]).await.status, 200);
    assert!(
        h.proxy
            .metric("portcullis_identity_revoked_handshakes_total")
            .await
            >= 1
    );
    assert!(
        h.proxy
            .metric("portcullis_identity_revoked_connections_total")
            .await
            >= 1
    );
    assert_eq!(h.proxy.metric("portcullis_identity_revocations").await, 1);

    let (ok, listed, _) = identity_cli(&h, &["list"]);
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["selector"], "prefix:spiffe://acme.test/agents/r");
    assert_eq!(listed[0]["reason"], "key leaked");

    let (ok, _, err) = identity_cli(&h, &["restore", "--prefix", "spiffe://acme.test/agents/r"]);
    assert!(ok, "{err}");
    assert_eq!(h.curl_as(&client, &[&h.url("/restored")]).await.status, 200);
    let (ok, _, err) = identity_cli(&h, &["restore", "--prefix", "spiffe://acme.test/agents/r"]);
    assert!(!ok && err.contains("is not revoked"), "{err}");
}

/// The mTLS listener resumes no session: a client that keeps rustls's session cache still
/// gets a full handshake on its next connection, so every connection's SVID is verified
/// against the trust bundle and revocations of now (a revoked identity fails new handshakes).
#[tokio::test(flavor = "multi_thread")]
async fn every_mtls_connection_is_a_full_handshake() {
    let h = over_time(|_| {}).await;
    let client = h.pki.client("r", "spiffe://acme.test/agents/r/1");
    let cfg = client_tls(&h.pki, &client);
    for round in ["first", "second", "third"] {
        let mut conn = raw_tls_with(cfg.clone(), h.proxy.addr).await;
        conn.write_all(absolute_get(&h, "/resume").as_bytes())
            .await
            .unwrap();
        // Reading the answer also reads any session tickets sent before it.
        assert_eq!(read_response(&mut conn).await.status, 200, "{round}");
        assert_eq!(
            conn.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "{round} connection"
        );
    }
}

/// Both TLS servers of the proxy (the mTLS listener, the intercepting one) choose AES-128-GCM
/// even when the client lists AES-256-GCM first (as OpenSSL does by default), and a client
/// without it gets what it offers.
#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_chooses_aes_128_gcm_over_the_clients_order() {
    let h = over_time(|_| {}).await;
    // The suite of each TLS session curl opens (the proxy's, then the intercepted origin's)
    // when it offers `ciphers` in that order on both.
    let suites = |ciphers: &'static str| {
        let h = &h;
        async move {
            let args = [
                "-v",
                "--proxy-tls13-ciphers",
                ciphers,
                "--tls13-ciphers",
                ciphers,
            ];
            let url = h.url("/suite");
            let out = h.curl(&[&args[..], &[url.as_str()]].concat()).await;
            assert_eq!(out.status, 200, "{out:?}");
            let used: Vec<String> = out
                .stderr
                .lines()
                .filter_map(|l| l.split_once("SSL connection using TLSv1.3 / "))
                .map(|(_, rest)| rest.split(' ').next().unwrap_or("").to_owned())
                .collect();
            assert_eq!(used.len(), 2, "proxy and origin: {}", out.stderr);
            used
        }
    };
    let first_256 = suites("TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256").await;
    assert_eq!(first_256, ["TLS_AES_128_GCM_SHA256"; 2]);
    // A client without AES-128-GCM still connects, with what it offers.
    let only_256 = suites("TLS_AES_256_GCM_SHA384").await;
    assert_eq!(only_256, ["TLS_AES_256_GCM_SHA384"; 2]);
}

/// One certificate revoked by its serial or its SHA-256 fingerprint, as `openssl x509` prints
/// them: that certificate is refused, another SVID for the same SPIFFE ID is not.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_certificate_is_refused_by_serial_or_fingerprint() {
    let h = over_time(|_| {}).await;
    let flags: [(&[&str], &str); 2] = [
        (&["-serial"], "--serial"),
        (&["-fingerprint", "-sha256"], "--sha256"),
    ];
    for (flags, kind) in flags {
        let old = h.pki.client("old", "spiffe://acme.test/agents/c");
        let value = openssl_x509(&old.cert, flags);
        let (ok, _, err) = identity_cli(&h, &["revoke", kind, &value]);
        assert!(ok, "{kind} {value}: {err}");
        let out = h.curl_as(&old, &[&h.url("/old")]).await;
        assert!(!out.success, "{kind}: {out:?}");
        assert!(out.stderr.contains("revoked"), "{kind}: {}", out.stderr);
        let new = h.pki.client("new", "spiffe://acme.test/agents/c");
        assert_eq!(
            h.curl_as(&new, &[&h.url("/new")]).await.status,
            200,
            "{kind}"
        );
        let (ok, _, err) = identity_cli(&h, &["restore", kind, &value]);
        assert!(ok, "{kind}: {err}");
    }
}
