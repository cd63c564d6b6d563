//! Delegation end to end: tokens issued by a real OAuth server library (oauth2-mock-server,
//! its own token endpoint and JWKS), carried in `x-portcullis-on-behalf-of` through the real
//! proxy with curl: verified, stripped before the upstream, seen by the policy as
//! `input.delegation`, logged and traced without the token; bad ones refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use portcullis_tests::*;
use serde_json::{json, Value};

const POLICY: &str = r#"package portcullis

import rego.v1

default decision := true

# Alice's calendar only for Alice.
decision := {"allow": false, "reason": "only for alice"} if {
	startswith(input.request.path, "/calendars/alice")
	input.delegation.subject != "alice"
}

decision := {"allow": false, "reason": "calendars need a delegation"} if {
	startswith(input.request.path, "/calendars/")
	not input.delegation
}

decision := {"allow": false, "reason": "acme tenants only"} if {
	input.request.path == "/tenant"
	input.delegation.claims.tenant != "acme"
}
"#;

/// The PKI with [`POLICY`] and the upstream every test talks to.
async fn world() -> (Pki, Upstream) {
    let pki = Pki::new();
    replace_file(&pki.path("policy/allow.rego"), POLICY);
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    (pki, up)
}

/// The base config with `delegation` trusting `idp`'s tokens (audience `portcullis`).
fn delegating(pki: &Pki, idp: &TokenIssuer) -> Value {
    let mut cfg = pki.base_config();
    cfg["delegation"] = json!({
        "issuers": [{"issuer": idp.issuer(), "jwks_url": idp.jwks_url(), "audiences": ["portcullis"]}],
    });
    cfg
}

/// `credentials`: the one credential `saas` (`pcx_saas`), bound to localhost, from `source`.
fn saas(source: Value) -> Value {
    json!([{"name": "saas", "hosts": ["localhost:*"], "source": source}])
}

struct Setup {
    pki: Pki,
    up: Upstream,
    proxy: Proxy,
    agent: ClientCert,
    idp: TokenIssuer,
    foreign: TokenIssuer,
}

async fn setup(alg: &str) -> Setup {
    setup_with(alg, json!({})).await
}

/// With `extra` merged into the `delegation` config.
async fn setup_with(alg: &str, extra: Value) -> Setup {
    let (pki, up) = world().await;
    let idp = TokenIssuer::start(alg);
    let foreign = TokenIssuer::start("RS256");
    let mut cfg = delegating(&pki, &idp);
    cfg["delegation"]["claims"] = json!(["tenant"]);
    for (k, v) in extra.as_object().unwrap() {
        cfg["delegation"][k] = v.clone();
    }
    let proxy = Proxy::start(&pki.write_config(&cfg));
    let agent = pki.client("agent", "spiffe://acme.test/agents/assistant");
    Setup {
        pki,
        up,
        proxy,
        agent,
        idp,
        foreign,
    }
}

impl Setup {
    async fn get(&self, path: &str, token: Option<&str>) -> CurlOut {
        let url = format!("https://localhost:{}{path}", self.up.port());
        let header = token.map(|t| format!("x-portcullis-on-behalf-of: {t}"));
        let mut args = vec![];
        if let Some(h) = &header {
            args.extend(["-H", h.as_str()]);
        }
        args.push(&url);
        curl(&self.pki, self.proxy.addr, Some(&self.agent), &args).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_policy_decides_on_the_verified_subject_and_the_token_never_leaves() {
    let s = setup("RS256").await;
    let alice = s.idp.token(
        "alice",
        &[
            ("audience", "portcullis"),
            ("tenant", "acme"),
            ("act", "assistant,orchestrator"),
        ],
    );
    let bob = s
        .idp
        .token("bob", &[("audience", "portcullis"), ("tenant", "other")]);

    let ok = s.get("/calendars/alice/events", Some(&alice)).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let seen = s.up.seen();
    let last = seen.last().unwrap();
    assert!(
        last.headers.get("x-portcullis-on-behalf-of").is_none(),
        "the token reached the upstream"
    );
    s.get("/calendars/alice/events", Some(&bob))
        .await
        .assert_refused(403, "policy_denied");
    s.get("/calendars/alice/events", None)
        .await
        .assert_refused(403, "policy_denied");
    assert_eq!(s.get("/tenant", Some(&alice)).await.status, 200);
    let refused = s.get("/tenant", Some(&bob)).await;
    refused.assert_refused(403, "policy_denied");
    assert_eq!(refused.json()["reason"], "acme tenants only");

    // The decision log names the subject and the chain, never the token.
    let line = s.proxy.decisions.wait_for("alice's decision", |l| {
        l.contains("/calendars/alice") && l.contains("allow")
    });
    let d: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(d["delegation"]["subject"], "alice");
    assert_eq!(d["delegation"]["issuer"], s.idp.issuer().as_str());
    assert_eq!(
        d["delegation"]["chain"],
        json!(["assistant", "orchestrator"])
    );
    let everything = [s.proxy.logs.lines(), s.proxy.decisions.lines()]
        .concat()
        .join("\n");
    for token in [&alice, &bob] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!everything.contains(signature), "a token was logged");
    }
    assert_eq!(
        s.proxy
            .metric("portcullis_delegation_tokens_total{outcome=\"verified\"}")
            .await,
        4
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_foreign_forged_and_misaddressed_tokens_are_refused() {
    let s = setup("ES256").await;
    let expired = s
        .idp
        .token("alice", &[("audience", "portcullis"), ("expired", "1")]);
    let foreign = s.foreign.token("alice", &[("audience", "portcullis")]);
    let other_aud = s.idp.token("alice", &[("audience", "someone-else")]);
    let good = s.idp.token("alice", &[("audience", "portcullis")]);
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    // One signature byte changed (a character in the middle: still valid base64url).
    let mut sig: Vec<char> = parts[2].chars().collect();
    sig[10] = if sig[10] == 'A' { 'B' } else { 'A' };
    parts[2] = sig.into_iter().collect();
    let forged = parts.join(".");
    for (token, why) in [
        (expired.as_str(), "expired"),
        (foreign.as_str(), "issuer not allowed"),
        (other_aud.as_str(), "audience"),
        (forged.as_str(), "signature"),
        ("not-a-jwt", "not a JWT"),
    ] {
        let out = s.get("/anything", Some(token)).await;
        out.assert_refused(403, "delegation_invalid");
        let reason = out.json()["reason"].as_str().unwrap().to_owned();
        assert!(reason.contains(why), "{why}: {reason}");
        assert!(!reason.contains(token), "the reason echoes the token");
    }
    // Two headers (which would the upstream or a log believe?) are refused.
    let url = format!("https://localhost:{}/twice", s.up.port());
    let h = format!("x-portcullis-on-behalf-of: {good}");
    let args = ["-H", h.as_str(), "-H", h.as_str(), &url];
    let out = curl(&s.pki, s.proxy.addr, Some(&s.agent), &args).await;
    out.assert_refused(403, "delegation_invalid");
    assert!(out.json()["reason"]
        .as_str()
        .unwrap()
        .contains("more than one"));
    assert!(
        s.up.seen().is_empty(),
        "a refused token's request reached the upstream"
    );
    // A good one passes; no header at all is no delegation, not a refusal.
    assert_eq!(s.get("/anything", Some(&good)).await.status, 200);
    assert_eq!(s.get("/anything", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_issuer_key_is_fetched_and_a_down_issuer_fails_closed() {
    let mut s = setup_with("RS256", json!({"jwks_refresh": "1s"})).await;
    let before = s.idp.token("alice", &[("audience", "portcullis")]);
    assert_eq!(s.get("/a", Some(&before)).await.status, 200);
    // The issuer restarts with a new key (same issuer URL): its new tokens name a kid the
    // proxy has not seen, and the proxy fetches the set again.
    let port = s.idp.port;
    s.idp.stop();
    s.idp = TokenIssuer::start_on(port, "RS256");
    let after = s.idp.token("alice", &[("audience", "portcullis")]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = s.get("/b", Some(&after)).await;
        if out.status == 200 {
            break;
        }
        // Until the cached set is older than jwks_refresh (1 s), the new kid is unknown.
        out.assert_refused(403, "delegation_invalid");
        assert!(
            std::time::Instant::now() < deadline,
            "the new key was never fetched"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The old key is gone from the set: tokens it signed no longer verify.
    s.get("/c", Some(&before))
        .await
        .assert_refused(403, "delegation_invalid");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_issuer_without_cached_keys_is_503_never_a_pass() {
    let mut s = setup("RS256").await;
    let token = s.idp.token("alice", &[("audience", "portcullis")]);
    s.idp.stop();
    let out = s.get("/a", Some(&token)).await;
    out.assert_refused(503, "delegation_unavailable");
    assert!(s.up.seen().is_empty());
    assert_eq!(
        s.proxy
            .metric("portcullis_delegation_tokens_total{outcome=\"keys_unavailable\"}")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_per_user_credential_without_a_delegation_token_is_refused_never_substituted() {
    let (pki, up) = world().await;
    let idp = TokenIssuer::start("RS256");
    let dead = free_addr();
    let mut cfg = delegating(&pki, &idp);
    cfg["credentials"] = saas(json!({
        "token_exchange": {"token_url": format!("http://{dead}/token"), "client_id": "portcullis",
            "client_secret": "env:PCX_TX_SECRET"}}));
    let proxy = Proxy::start_with_env(&pki.write_config(&cfg), &[("PCX_TX_SECRET", "s")]);
    let agent = pki.client("agent", "spiffe://acme.test/agents/assistant");
    let url = format!("https://localhost:{}/me", up.port());
    let out = curl(
        &pki,
        proxy.addr,
        Some(&agent),
        &["-H", "Authorization: Bearer pcx_saas", &url],
    )
    .await;
    out.assert_refused(503, "credential_unavailable");
    assert!(out.json()["reason"]
        .as_str()
        .unwrap()
        .contains("delegation token"));
    // With a delegation token but the exchange endpoint down: refused too.
    let token = idp.token("alice", &[("audience", "portcullis")]);
    let on_behalf = format!("x-portcullis-on-behalf-of: {token}");
    let out = curl(
        &pki,
        proxy.addr,
        Some(&agent),
        &[
            "-H",
            "Authorization: Bearer pcx_saas",
            "-H",
            &on_behalf,
            &url,
        ],
    )
    .await;
    out.assert_refused(503, "credential_unavailable");
    assert!(up.seen().is_empty(), "a placeholder was forwarded");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_users_through_one_agent_get_their_own_exchanged_tokens() {
    let (pki, up) = world().await;
    let idp = TokenIssuer::start("RS256");
    let sts = TokenExchangeServer::start(&idp);
    let mut cfg = delegating(&pki, &idp);
    cfg["credentials"] = saas(json!({
        "token_exchange": {"token_url": sts.token_url(), "client_id": "portcullis",
            "client_secret": "env:PCX_TX_SECRET", "audience": "https://api.saas.test",
            "scopes": ["repo:read"]}}));
    let proxy = Proxy::start_with_env(
        &pki.write_config(&cfg),
        &[("PCX_TX_SECRET", "portcullis-secret")],
    );
    let agent = pki.client("agent", "spiffe://acme.test/agents/assistant");
    let url = format!("https://localhost:{}/me", up.port());
    let call = |token: String| {
        let (pki, agent, url) = (&pki, &agent, &url);
        async move {
            let on_behalf = format!("x-portcullis-on-behalf-of: {token}");
            let args = [
                "-H",
                "Authorization: Bearer pcx_saas",
                "-H",
                &on_behalf,
                url,
            ];
            let out = curl(pki, proxy.addr, Some(agent), &args).await;
            assert_eq!(out.status, 200, "{out:?}");
        }
    };
    let upstream_token = || {
        let seen = up.seen();
        let auth = seen.last().unwrap().headers["authorization"]
            .to_str()
            .unwrap()
            .to_owned();
        auth.strip_prefix("Bearer ").unwrap().to_owned()
    };
    let alice = idp.token("alice", &[("audience", "portcullis")]);
    let bob = idp.token("bob", &[("audience", "portcullis")]);
    call(alice.clone()).await;
    let for_alice = upstream_token();
    call(bob.clone()).await;
    let for_bob = upstream_token();
    assert_ne!(for_alice, for_bob, "two users, one token");
    // Alice again: her cached token, no new exchange.
    call(alice.clone()).await;
    assert_eq!(upstream_token(), for_alice);
    let exchanges = sts.exchanges();
    assert_eq!(exchanges.len(), 2, "{exchanges:?}");
    let issued = |who: &str| {
        exchanges
            .iter()
            .find(|e| e["subject"] == who)
            .unwrap_or_else(|| panic!("no exchange for {who}: {exchanges:?}"))
    };
    // The server minted each token for its subject, for the configured audience and scope.
    assert_eq!(issued("alice")["access_token"], for_alice.as_str());
    assert_eq!(issued("bob")["access_token"], for_bob.as_str());
    assert_eq!(issued("alice")["audience"], "https://api.saas.test");
    assert_eq!(issued("alice")["scope"], "repo:read");
    // Neither the user tokens nor the minted ones appear in the proxy's output.
    let everything = [proxy.logs.lines(), proxy.decisions.lines()]
        .concat()
        .join("\n");
    for t in [&alice, &bob, &for_alice, &for_bob] {
        let signature = t.rsplit('.').next().unwrap();
        assert!(!everything.contains(signature), "a token was logged");
    }
    // The upstream never sees the user's token either.
    assert!(up
        .seen()
        .iter()
        .all(|s| s.headers.get("x-portcullis-on-behalf-of").is_none()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_jwt_bearer_grant_mints_a_token_for_the_user_too() {
    let (pki, up) = world().await;
    let idp = TokenIssuer::start("ES256");
    let sts = TokenExchangeServer::start(&idp);
    let mut cfg = delegating(&pki, &idp);
    cfg["credentials"] = saas(json!({
        "jwt_bearer": {"token_url": sts.token_url(), "client_id": "portcullis",
            "client_secret": "env:PCX_TX_SECRET", "client_auth": "post",
            "resource": "https://api.saas.test"}}));
    let proxy = Proxy::start_with_env(
        &pki.write_config(&cfg),
        &[("PCX_TX_SECRET", "portcullis-secret")],
    );
    let agent = pki.client("agent", "spiffe://acme.test/agents/assistant");
    let url = format!("https://localhost:{}/me", up.port());
    let on_behalf = format!(
        "x-portcullis-on-behalf-of: Bearer {}",
        idp.token("carol", &[("audience", "portcullis")])
    );
    let args = [
        "-H",
        "Authorization: Bearer pcx_saas",
        "-H",
        &on_behalf,
        &url,
    ];
    let out = curl(&pki, proxy.addr, Some(&agent), &args).await;
    assert_eq!(out.status, 200, "{out:?}");
    let exchanges = sts.exchanges();
    assert_eq!(exchanges.len(), 1, "{exchanges:?}");
    assert_eq!(exchanges[0]["grant"], "jwt-bearer");
    assert_eq!(exchanges[0]["subject"], "carol");
    let seen = up.seen();
    let auth = seen[0].headers["authorization"].to_str().unwrap();
    assert_eq!(
        auth,
        format!("Bearer {}", exchanges[0]["access_token"].as_str().unwrap())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_action_span_shows_the_subject_and_the_actor_chain() {
    let (pki, up) = world().await;
    let idp = TokenIssuer::start("RS256");
    let otlp = OtlpReceiver::start().await;
    let mut cfg = delegating(&pki, &idp);
    cfg["telemetry"] = json!({"otlp_endpoint": otlp.endpoint(), "otlp_protocol": "http/protobuf"});
    let proxy = Proxy::start_with_env(
        &pki.write_config(&cfg),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let agent = pki.client("agent", "spiffe://acme.test/agents/assistant");
    let token = idp.token(
        "alice",
        &[
            ("audience", "portcullis"),
            ("act", "assistant,orchestrator"),
        ],
    );
    let on_behalf = format!("x-portcullis-on-behalf-of: {token}");
    let url = format!("https://localhost:{}/traced", up.port());
    let out = curl(&pki, proxy.addr, Some(&agent), &["-H", &on_behalf, &url]).await;
    assert_eq!(out.status, 200, "{out:?}");
    let span = otlp
        .wait_span("the delegated GET", |s| {
            span_attr(s, "portcullis.delegation.subject").as_deref() == Some("alice")
        })
        .await;
    assert_eq!(
        span_attr(&span, "portcullis.delegation.chain").as_deref(),
        Some("assistant,orchestrator")
    );
    assert_eq!(
        span_attr(&span, "portcullis.delegation.issuer"),
        Some(idp.issuer())
    );
    assert_eq!(
        span_attr(&span, "portcullis.identity.spiffe_id").as_deref(),
        Some("spiffe://acme.test/agents/assistant")
    );
    let signature = token.rsplit('.').next().unwrap();
    for s in otlp.spans() {
        assert!(
            !format!("{s:?}").contains(signature),
            "a span holds the token"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_actor_token_names_the_agent_and_the_server_puts_it_in_act() {
    let (pki, up) = world().await;
    let idp = TokenIssuer::start("RS256");
    let actor_key = pki.path("actor.key");
    let key = portcullis::pki::Authority::generate("actor signing key", None).unwrap();
    portcullis::pki::write_file(&actor_key, key.key_pem().as_bytes(), true).unwrap();
    let sts = TokenExchangeServer::start_with_actor(
        &idp,
        &actor_key,
        "spiffe://acme.test/portcullis",
        "portcullis-1",
    );
    let mut cfg = delegating(&pki, &idp);
    cfg["credentials"] = saas(json!({
        "token_exchange": {"token_url": sts.token_url(), "client_id": "portcullis",
            "client_secret": "env:PCX_TX_SECRET", "audience": "https://api.saas.test",
            "actor": {"assertion": {"key": "actor.key", "kid": "portcullis-1",
                "issuer": "spiffe://acme.test/portcullis"}}}}));
    let proxy = Proxy::start_with_env(
        &pki.write_config(&cfg),
        &[("PCX_TX_SECRET", "portcullis-secret")],
    );
    let alice = idp.token("alice", &[("audience", "portcullis")]);
    let url = format!("https://localhost:{}/me", up.port());
    let on_behalf = format!("x-portcullis-on-behalf-of: {alice}");
    // Two agents act for the same user: two exchanges, each naming its agent.
    for agent in [
        "spiffe://acme.test/agents/mail",
        "spiffe://acme.test/agents/calendar",
    ] {
        let cert = pki.client(agent.rsplit('/').next().unwrap(), agent);
        let args = [
            "-H",
            "Authorization: Bearer pcx_saas",
            "-H",
            &on_behalf,
            &url,
        ];
        let out = curl(&pki, proxy.addr, Some(&cert), &args).await;
        assert_eq!(out.status, 200, "{out:?}");
    }
    let exchanges = sts.exchanges();
    assert_eq!(exchanges.len(), 2, "{exchanges:?}");
    for (e, agent) in exchanges.iter().zip([
        "spiffe://acme.test/agents/mail",
        "spiffe://acme.test/agents/calendar",
    ]) {
        assert_eq!(e["ok"], true, "{e}");
        assert_eq!(e["subject"], "alice");
        assert_eq!(e["actor"], agent, "the server verified the actor assertion");
        // The issued token (a JWT) says who acts for alice.
        let token = e["access_token"].as_str().unwrap();
        let payload = token.split('.').nth(1).unwrap();
        use base64::Engine as _;
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["act"]["sub"], agent);
    }
}
