//! JWT-SVIDs end to end: `portcullis connect --jwt-audience` fetches the agent's JWT-SVID from
//! the Workload API (the in-process server of `portcullis_tests::workload_api`) and writes it
//! into its CONNECT; the proxy verifies it against the trust domain's JWT bundle (a file, or
//! the Workload API's JWT bundles stream) and a token exchange sends it as the actor token to a
//! real authorization server (oidc-provider, tests/node/token_exchange_server.mjs), which
//! verifies it against the same bundle itself. Forged, foreign, expired and misaddressed ones
//! are refused; none reaches the upstream or a log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use portcullis::pki::{Issued, LeafSpec};
use portcullis_tests::*;
use serde_json::{json, Value};

const AGENT: &str = "spiffe://acme.test/agents/mail";
const HOUR: Duration = Duration::from_secs(3600);

fn svid(pki: &Pki, id: &str) -> Issued {
    pki.acme.issue(&LeafSpec::svid(id, HOUR)).unwrap()
}

/// The base64url of the JWT header every JWT-SVID of `authority` starts with: what must never
/// show in a log.
fn jwt_prefix(authority: &JwtAuthority) -> String {
    let header = json!({"alg": "ES256", "kid": authority.kid, "typ": "JWT"}).to_string();
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header)
}

/// `credentials`: `saas` minted per user by token exchange at `sts`, with the agent's
/// JWT-SVID for `audience` as the actor token.
fn exchanged_with_jwt_svid(sts: &TokenExchangeServer, audience: &str) -> Value {
    json!([{"name": "saas", "hosts": ["localhost:*"], "source": {"token_exchange": {
        "token_url": sts.token_url(), "client_id": "portcullis",
        "client_secret": "env:PCX_TX_SECRET", "audience": "https://api.saas.test",
        "actor": {"jwt_svid": {"audience": audience}}}}}])
}

fn delegating(cfg: &mut Value, idp: &TokenIssuer) {
    cfg["delegation"] = json!({
        "issuers": [{"issuer": idp.issuer(), "jwks_url": idp.jwks_url(), "audiences": ["portcullis"]}],
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agents_jwt_svid_from_the_connector_is_the_actor_token_of_its_exchanges() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let idp = TokenIssuer::start("RS256");
    let agent_api = WorkloadApiServer::start().await;
    agent_api.set_svid(AGENT, &svid(&pki, AGENT), &pki.acme, &[]);
    let authority = agent_api.jwt_authority();
    let bundle = pki.path("acme-jwt.json");
    replace_file(&bundle, &authority.bundle_json());
    let sts = TokenExchangeServer::start_with_jwt_svid_actors(&idp, &bundle);

    let mut cfg = pki.base_config();
    cfg["trust_domains"]["acme.test"]["jwt_bundle"] = json!("acme-jwt.json");
    delegating(&mut cfg, &idp);
    cfg["credentials"] = exchanged_with_jwt_svid(&sts, &sts.token_url());
    let proxy = Proxy::start_with_env(
        &pki.write_config(&cfg),
        &[("PCX_TX_SECRET", "portcullis-secret")],
    );
    let conn = Connector::start(&[
        "--upstream",
        &format!("https://localhost:{}", proxy.addr.port()),
        "--workload-api",
        &agent_api.endpoint(),
        "--jwt-audience",
        &sts.token_url(),
    ]);
    conn.logs.wait_for("the JWT-SVID", |l| {
        l.contains("JWT-SVID from the Workload API")
    });

    let alice = idp.token("alice", &[("audience", "portcullis")]);
    let on_behalf = format!("x-portcullis-on-behalf-of: {alice}");
    let url = format!("https://localhost:{}/me", up.port());
    let args = [
        "-H",
        "Authorization: Bearer pcx_saas",
        "-H",
        &on_behalf,
        &url,
    ];
    let out = conn.curl(&pki, &args).await;
    assert_eq!(out.status, 200, "{out:?}");

    // The server verified the JWT-SVID itself and put the agent in the token's `act`.
    let exchanges = sts.exchanges();
    assert_eq!(exchanges.len(), 1, "{exchanges:?}");
    let e = &exchanges[0];
    assert_eq!(e["ok"], true, "{e}");
    assert_eq!(
        (&e["subject"], &e["actor"]),
        (&json!("alice"), &json!(AGENT))
    );
    let seen = up.seen();
    let me = seen.iter().find(|s| s.path == "/me").unwrap();
    assert_eq!(
        me.headers["authorization"],
        format!("Bearer {}", e["access_token"].as_str().unwrap()).as_str()
    );
    assert!(
        !me.headers.contains_key("x-portcullis-jwt-svid"),
        "{:?}",
        me.headers
    );
    assert_eq!(
        proxy
            .metric("portcullis_jwt_svids_total{outcome=\"verified\"}")
            .await,
        1
    );

    // Without a JWT-SVID (the agent straight to the proxy): the credential that needs one is
    // refused, never minted without its actor.
    let agent = pki.client("mail", AGENT);
    let direct = |extra: Vec<String>| {
        let mut a: Vec<String> = vec![
            "-H".into(),
            "Authorization: Bearer pcx_saas".into(),
            "-H".into(),
            on_behalf.clone(),
        ];
        a.extend(extra);
        a.push(url.clone());
        a
    };
    let with_svid = |token: &str| {
        direct(vec![
            "--proxy-header".into(),
            format!("x-portcullis-jwt-svid: {token}"),
        ])
    };
    let run = |args: Vec<String>| {
        let (pki, agent, addr) = (&pki, &agent, proxy.addr);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(pki, addr, Some(agent), &args).await
        }
    };
    let out = run(direct(vec![])).await;
    out.assert_refused(503, "credential_unavailable");
    assert!(out.body.contains("JWT-SVID"), "{}", out.body);

    // One issued for another audience verifies, but is not this exchange's actor token.
    let elsewhere = authority.sign(AGENT, &["https://elsewhere.test".into()], 300);
    run(with_svid(&elsewhere))
        .await
        .assert_refused(503, "credential_unavailable");

    // Refused outright: another workload's, an expired one, one signed by a foreign key (even
    // with the trust domain's key ID), garbage.
    let aud = [sts.token_url()];
    let foreign = JwtAuthority::generate(&authority.kid);
    for (token, why) in [
        (
            authority.sign("spiffe://acme.test/agents/calendar", &aud, 300),
            "another workload's",
        ),
        (authority.sign(AGENT, &aud, -60), "expired"),
        (foreign.sign(AGENT, &aud, 300), "foreign key"),
        ("not.a.jwt".to_owned(), "garbage"),
    ] {
        let out = run(with_svid(&token)).await;
        assert_eq!(out.status, 403, "{why}: {out:?}");
        out.assert_refused(403, "jwt_svid_invalid");
    }
    assert_eq!(
        proxy
            .metric("portcullis_jwt_svids_total{outcome=\"refused\"}")
            .await,
        4
    );
    assert_eq!(
        sts.exchanges().len(),
        1,
        "no exchange without a valid actor"
    );

    // No JWT-SVID in any log of the proxy or the connector.
    let prefix = jwt_prefix(authority);
    for line in proxy
        .logs
        .lines()
        .iter()
        .chain(&proxy.decisions.lines())
        .chain(&conn.logs.lines())
    {
        assert!(!line.contains(&prefix), "a JWT-SVID in a log: {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_takes_jwt_bundles_from_the_workload_api_and_fails_closed_without_them() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    // The agent's Workload API signs its JWT-SVIDs; the proxy's own agent sends the bundles.
    let agent_api = WorkloadApiServer::start().await;
    let proxy_api = WorkloadApiServer::start().await;
    let mut cfg = pki.base_config();
    cfg["tls"] = json!({"workload_api": proxy_api.endpoint()});
    cfg["trust_domains"]["acme.test"] = json!({"workload_api": true});
    let proxy = Proxy::start_until(
        &pki.write_config(&cfg),
        &[],
        "waiting for the X.509-SVID and bundles from the Workload API",
    );
    let mut spec = LeafSpec::svid("spiffe://acme.test/portcullis", HOUR);
    spec.dns = vec!["localhost".into()];
    spec.ips = vec![[127, 0, 0, 1].into()];
    proxy_api.set_svid(
        "spiffe://acme.test/portcullis",
        &pki.acme.issue(&spec).unwrap(),
        &pki.acme,
        &[],
    );
    proxy_api.set_bundles(&[("acme.test", vec![pki.acme.cert_der()])]);
    proxy
        .logs
        .wait_for("listening", |l| l.contains("\"listening\""));

    let agent = pki.client("mail", AGENT);
    let url = format!("https://localhost:{}/hello", up.port());
    let token = agent_api
        .jwt_authority()
        .sign(AGENT, &["https://sts.test".into()], 300);
    let header = format!("x-portcullis-jwt-svid: {token}");
    let args = ["--proxy-header", &header, &url];
    // No JWT bundle for the trust domain yet: refused, never passed unverified.
    curl(&pki, proxy.addr, Some(&agent), &args)
        .await
        .assert_refused(503, "jwt_svid_unavailable");
    assert!(up.seen().is_empty());

    proxy_api.set_jwt_bundles(&[("acme.test", agent_api.jwt_authority())]);
    proxy.logs.wait_for("the JWT bundles", |l| {
        l.contains("JWT bundles from the Workload API")
    });
    let out = curl(&pki, proxy.addr, Some(&agent), &args).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(
        proxy
            .metric("portcullis_jwt_svids_total{outcome=\"verified\"}")
            .await,
        1
    );
    assert!(!up.seen()[0].headers.contains_key("x-portcullis-jwt-svid"));
}

#[test]
fn check_refuses_bad_jwt_svid_settings_by_key() {
    let pki = Pki::new();
    replace_file(&pki.path("empty-jwt.json"), r#"{"keys": []}"#);
    replace_file(
        &pki.path("x509-only.json"),
        r#"{"keys": [{"kty": "EC", "use": "x509-svid"}]}"#,
    );
    let exchange = |actor: Value| {
        json!([{"name": "saas", "hosts": ["localhost:*"], "source": {"token_exchange": {
            "token_url": "http://127.0.0.1:9/token", "client_id": "p", "client_secret": "env:HOME",
            "audience": "https://api.saas.test", "actor": actor}}}])
    };
    for (edit, key) in [
        (
            json!({"trust_domains": {"acme.test": {"bundle": "acme-ca.pem", "jwt_bundle": "missing.json"}}}),
            "trust_domains.acme.test.jwt_bundle",
        ),
        (
            json!({"trust_domains": {"acme.test": {"bundle": "acme-ca.pem", "jwt_bundle": "empty-jwt.json"}}}),
            "trust_domains.acme.test.jwt_bundle",
        ),
        (
            json!({"trust_domains": {"acme.test": {"bundle": "acme-ca.pem", "jwt_bundle": "x509-only.json"}}}),
            "trust_domains.acme.test.jwt_bundle",
        ),
        (
            json!({"credentials": exchange(json!({}))}),
            "credentials[0].source.token_exchange.actor",
        ),
        (
            json!({"credentials": exchange(json!({"jwt_svid": {"audience": "a"},
                "assertion": {"key": "acme-ca.key", "kid": "k", "issuer": "i"}}))}),
            "credentials[0].source.token_exchange.actor",
        ),
    ] {
        let mut cfg = pki.base_config();
        cfg["delegation"] = json!({"issuers": [{"issuer": "https://i",
            "jwks_file": "empty-jwt.json", "audiences": ["p"]}]});
        for (k, v) in edit.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let err = check_refuses(&pki, &cfg);
        assert!(err.contains(key), "{key}: {err}");
    }
}

/// Who called, by gateway route: the policy sees the bearer caller's SPIFFE ID like any other.
const GATEWAY_POLICY: &str = r#"package portcullis

import rego.v1

default decision := {"allow": false, "reason": "not the mail agent"}

decision := {"allow": true, "reason": "the mail agent"} if {
	input.identity.spiffe_id == "spiffe://acme.test/agents/mail"
	not writes_by_bearer
}

decision := {"allow": false, "reason": "writes need mTLS"} if writes_by_bearer

writes_by_bearer if {
	input.request.method == "POST"
	input.identity.proof == "jwt_svid"
}
"#;

const SECRET: &str = "saas-secret-0123456789";

#[tokio::test(flavor = "multi_thread")]
async fn gateway_callers_without_a_client_certificate_present_a_jwt_svid() {
    let pki = Pki::new();
    replace_file(&pki.path("policy/allow.rego"), GATEWAY_POLICY);
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let base = format!("https://localhost:{}", up.port());
    let authority = JwtAuthority::generate("jwt-authority-1");
    replace_file(&pki.path("acme-jwt.json"), &authority.bundle_json());
    let audience = "https://portcullis.test/saas";
    let mut cfg = pki.base_config();
    cfg["trust_domains"]["acme.test"]["jwt_bundle"] = json!("acme-jwt.json");
    cfg["bearer_listen"] = json!("127.0.0.1:0");
    cfg["credentials"] = json!([{"name": "saas", "hosts": ["localhost:*"],
        "source": {"env": "SAAS_SECRET"}}]);
    cfg["routes"] = json!([
        {"name": "saas", "match": {"path_prefix": "/saas"}, "upstream": base,
         "credential": "saas", "jwt_svid": {"audience": audience}},
        {"name": "mtls-only", "match": {"path_prefix": "/private"}, "upstream": base},
    ]);
    let proxy = Proxy::start_with_env(&pki.write_config(&cfg), &[("SAAS_SECRET", SECRET)]);
    let listening = proxy
        .logs
        .wait_for("listening", |l| l.contains("\"listening\""));
    let bearer: std::net::SocketAddr = serde_json::from_str::<Value>(&listening).unwrap()["bearer"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // curl without a client certificate: only the server's CA.
    let call = |port: u16, path: &str, token: Option<String>, extra: Vec<String>| {
        let (ca, path) = (pki.path("acme-ca.pem"), path.to_owned());
        async move {
            let mut cmd = tokio::process::Command::new("curl");
            cmd.args(["-sS", "--max-time", "20", "-D", "-", "-o", "-", "--cacert"])
                .arg(ca);
            if let Some(t) = token {
                cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
            }
            cmd.args(extra)
                .arg(format!("https://localhost:{port}{path}"));
            run_curl(cmd).await
        }
    };
    let token = |id: &str, aud: &str, ttl: i64| authority.sign(id, &[aud.to_owned()], ttl);

    // The agent's JWT-SVID for the route's audience: its identity for the policy; the bearer is
    // removed and the route's credential substituted.
    let out = call(
        bearer.port(),
        "/saas/echo",
        Some(token(AGENT, audience, 300)),
        vec![],
    )
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    let seen = up.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.path, "/echo");
    assert_eq!(
        last.headers["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
    let access = proxy.wait_access(1, |e| e["path"] == "/echo");
    assert_eq!(access[0]["spiffe_id"], AGENT, "{access:?}");

    // The policy knows how the caller proved its identity: a bearer may read, not write; the
    // same workload over mTLS may write.
    let post = vec!["-X".to_owned(), "POST".to_owned()];
    let out = call(
        bearer.port(),
        "/saas/echo",
        Some(token(AGENT, audience, 300)),
        post,
    )
    .await;
    out.assert_refused(403, "policy_denied");
    assert!(out.body.contains("writes need mTLS"), "{}", out.body);
    let agent = pki.client("mail", AGENT);
    let mut mtls = tokio::process::Command::new("curl");
    mtls.args([
        "-sS",
        "--max-time",
        "20",
        "-D",
        "-",
        "-o",
        "-",
        "-X",
        "POST",
        "--cacert",
    ])
    .arg(pki.path("acme-ca.pem"))
    .arg("--cert")
    .arg(&agent.cert)
    .arg("--key")
    .arg(&agent.key)
    .arg(format!("https://localhost:{}/saas/echo", proxy.addr.port()));
    let out = run_curl(mtls).await;
    assert_eq!(out.status, 200, "{out:?}");

    // The policy decides on the bearer's identity like on a certificate's.
    let other = call(
        bearer.port(),
        "/saas/echo",
        Some(token("spiffe://acme.test/agents/calendar", audience, 300)),
        vec![],
    )
    .await;
    other.assert_refused(403, "policy_denied");

    // Refused before any identity exists: no token, another audience, expired, forged, a
    // route that does not take bearer callers, proxy requests.
    let forged = JwtAuthority::generate("jwt-authority-1").sign(AGENT, &[audience.into()], 300);
    for (path, t, extra, status, code) in [
        ("/saas/echo", None, vec![], 401, "identity_required"),
        (
            "/saas/echo",
            Some(token(AGENT, "https://elsewhere.test", 300)),
            vec![],
            403,
            "jwt_svid_invalid",
        ),
        (
            "/saas/echo",
            Some(token(AGENT, audience, -60)),
            vec![],
            403,
            "jwt_svid_invalid",
        ),
        ("/saas/echo", Some(forged), vec![], 403, "jwt_svid_invalid"),
        (
            "/private/echo",
            Some(token(AGENT, audience, 300)),
            vec![],
            404,
            "no_route",
        ),
        (
            "/saas/echo",
            Some(token(AGENT, audience, 300)),
            vec!["--request-target".to_owned(), format!("{base}/echo")],
            401,
            "identity_required",
        ),
    ] {
        let out = call(bearer.port(), path, t, extra).await;
        out.assert_refused(status, code);
    }
    let unauthenticated = call(bearer.port(), "/saas/echo", None, vec![]).await;
    assert_eq!(
        unauthenticated.header("www-authenticate").as_deref(),
        Some("Bearer")
    );

    // The JWT bundle file rotates (hot reload): the new authority's tokens verify, tokens of
    // the old one no longer.
    let rotated = JwtAuthority::generate("jwt-authority-2");
    replace_file(&pki.path("acme-jwt.json"), &rotated.bundle_json());
    proxy.logs.wait_for("the reload", |l| {
        l.contains("reloaded server certificate and trust bundles")
    });
    let new = rotated.sign(AGENT, &[audience.to_owned()], 300);
    let out = call(bearer.port(), "/saas/echo", Some(new.clone()), vec![]).await;
    assert_eq!(out.status, 200, "{out:?}");
    call(
        bearer.port(),
        "/saas/echo",
        Some(token(AGENT, audience, 301)),
        vec![],
    )
    .await
    .assert_refused(403, "jwt_svid_invalid");

    // A revoked identity is refused on the bearer listener too.
    let (status, body) = proxy
        .admin_request(
            "POST",
            &format!("/identity/revoke?id={AGENT}&reason=leaked"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    call(bearer.port(), "/saas/echo", Some(new), vec![])
        .await
        .assert_refused(403, "identity_revoked");

    // The proxy listener still wants a client certificate: a bearer is not enough there.
    let out = call(
        proxy.addr.port(),
        "/saas/echo",
        Some(token(AGENT, audience, 300)),
        vec![],
    )
    .await;
    assert_eq!(out.status, 0, "{out:?}");
    assert_eq!(
        up.seen().iter().filter(|s| s.path == "/echo").count(),
        3,
        "only the first bearer call, the mTLS write and the rotated key's call reached it"
    );
    // No JWT-SVID in any log.
    let prefixes = [jwt_prefix(&authority), jwt_prefix(&rotated)];
    for line in proxy.logs.lines().iter().chain(&proxy.decisions.lines()) {
        assert!(
            !prefixes.iter().any(|p| line.contains(p)),
            "a JWT-SVID in a log: {line}"
        );
    }
}
