//! Credential brokering end to end: agents send placeholders, the upstream receives real
//! secrets (headers, Basic auth, query, opt-in JSON bodies), only for bound hosts; unknown or
//! misdirected placeholders are refused before anything is forwarded; an unavailable source is
//! a 503; echoed secrets are redacted; and no secret appears in any log or decision line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use portcullis_tests::*;
use serde_json::{json, Value};

const GITHUB_SECRET: &str = "ghp_realSecretValue123456";
const FILE_SECRET: &str = "file-secret-abcdef987654";

/// Denies the `github` credential to the intern, allows everything else.
const POLICY: &str = r#"package portcullis

import rego.v1

default decision := {"allow": true, "reason": "ok"}

decision := {"allow": false, "reason": "interns may not use github"} if {
	"github" in input.credentials
	input.identity.spiffe_id == "spiffe://acme.test/agents/intern"
}
"#;

async fn setup() -> Harness {
    Harness::builder()
        .policy(POLICY)
        .file("file-secret", &format!("{FILE_SECRET}\n"))
        .env("PCX_TEST_GITHUB", GITHUB_SECRET)
        .config(|cfg| {
            cfg["credentials"] = json!([
                {"name": "github", "hosts": ["localhost:*"], "source": {"env": "PCX_TEST_GITHUB"}, "body": true},
                {"name": "filed", "placeholder": "pcx_filed_key", "hosts": ["localhost:*"], "source": {"file": "file-secret"}},
                {"name": "elsewhere", "hosts": ["api.example.com"], "source": {"env": "PCX_TEST_GITHUB"}},
                {"name": "missing", "hosts": ["localhost:*"], "source": {"env": "PCX_TEST_NOT_SET"}},
            ]);
        })
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn placeholders_become_secrets_upstream_and_never_come_back() {
    let s = setup().await;
    let basic = format!("Basic {}", base64_encode("bot:pcx_filed_key"));
    let out = s
        .curl(&[
            "-H",
            "Authorization: Bearer pcx_github",
            "-H",
            &format!("X-Other: {basic}"),
            "-H",
            "content-type: application/json",
            // As httpx, requests and Node ask by default: the echo must still be readable.
            "-H",
            "accept-encoding: gzip, deflate, br",
            "--data-binary",
            r#"{"token":"pcx_github","keep":"pcx_filed_key"}"#,
            &s.url("/echo?access_token=pcx_github&x=1"),
        ])
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    // What the upstream received: the real values, and a request for an uncompressed answer
    // (a compressed echo could not be searched for them).
    let seen = s.up.seen();
    let h = &seen[0].headers;
    assert_eq!(h["authorization"], format!("Bearer {GITHUB_SECRET}"));
    assert_eq!(h["accept-encoding"], "identity");
    // Basic credentials are only decoded in Authorization; X-Other carries it verbatim.
    assert_eq!(h["x-other"], basic.as_str());
    // What the agent got back: the echo, with every secret redacted.
    assert!(
        !out.body.contains(GITHUB_SECRET),
        "secret echoed to the agent: {}",
        out.body
    );
    assert!(!out.headers.contains(GITHUB_SECRET), "{}", out.headers);
    let echo = out.json();
    assert_eq!(echo["query"], "access_token=[REDACTED]&x=1");
    assert_eq!(
        echo["body"], r#"{"token":"[REDACTED]","keep":"pcx_filed_key"}"#,
        "body opt-in is per credential"
    );
    assert_eq!(
        out.header("x-echo-authorization").as_deref(),
        Some("Bearer [REDACTED]")
    );
    // The policy saw the credential names.
    s.proxy
        .decisions
        .wait_for("the decision", |l| l.contains("/echo"));
    s.proxy.wait_access(1, |e| e["path"] == "/echo");
    assert!(!s.everything_logged().contains(GITHUB_SECRET));
}

/// Every form a secret can take on the way back is redacted: the Basic token the proxy built,
/// base64/base64url reflections, JSON escapes, percent-encoding, in body and headers (a
/// non-UTF-8 header value included). Checked with real curl and httpx (which asks for gzip).
#[tokio::test(flavor = "multi_thread")]
async fn echoed_secrets_are_redacted_in_every_encoding() {
    let s = setup().await;
    let basic = format!("Basic {}", base64_encode("bot:pcx_filed_key"));
    for auth in ["Bearer pcx_github", basic.as_str()] {
        let out = s
            .curl(&[
                "-H",
                &format!("Authorization: {auth}"),
                "-H",
                "accept-encoding: gzip, br",
                &s.url("/echo-forms?access_token=pcx_github"),
            ])
            .await;
        assert_eq!(out.status, 200, "{out:?}");
        let everything = format!("{}\n{}", out.headers, out.body);
        assert_no_secret(&everything);
        assert!(everything.contains("[REDACTED]"), "{everything}");
        let echo = out.json();
        for key in ["auth", "b64", "b64url", "json", "u", "pct"] {
            assert!(
                echo[key].as_str().unwrap().contains("[REDACTED]"),
                "{key}: {echo}"
            );
        }
    }
    let seen = s.up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].headers.get("authorization").unwrap(),
        &format!("Bearer {GITHUB_SECRET}")
    );
}

/// Every encoding of both test secrets, as the tests look for them in what the agent got.
fn assert_no_secret(text: &str) {
    use base64::Engine as _;
    for secret in [GITHUB_SECRET, FILE_SECRET] {
        let forms = [
            secret.to_owned(),
            base64::engine::general_purpose::STANDARD.encode(secret),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
            base64::engine::general_purpose::STANDARD.encode(format!("bot:{secret}")),
            secret.bytes().map(|b| format!("%{b:02X}")).collect(),
            secret
                .chars()
                .map(|c| format!("\\u{:04x}", u32::from(c)))
                .collect(),
        ];
        for form in forms {
            // A distinctive middle part of the form (an encoding may be cut at its ends).
            let probe = &form[2..form.len() - 2];
            assert!(!text.contains(probe), "{form} leaked: {text}");
        }
    }
}

/// No secret in any log line, in any encoding, with our crates at TRACE (dependencies that see
/// request data stay at info whatever the log setting asks): substitution over HTTP/1.1 and
/// h2, Basic and bearer, query and body, an echo and a 401 refresh.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_a_log_line_even_at_trace() {
    let s = Harness::builder()
        .policy(POLICY)
        .file("file-secret", &format!("{FILE_SECRET}\n"))
        .env("PCX_TEST_GITHUB", GITHUB_SECRET)
        .env("PORTCULLIS_LOG", "trace")
        .config(|cfg| {
            cfg["credentials"] = json!([
                {"name": "github", "hosts": ["localhost:*"], "source": {"env": "PCX_TEST_GITHUB"}, "body": true},
                {"name": "filed", "placeholder": "pcx_filed_key", "hosts": ["localhost:*"], "source": {"file": "file-secret"}},
            ]);
        })
        .start()
        .await;
    let basic = format!(
        "Authorization: Basic {}",
        base64_encode("bot:pcx_filed_key")
    );
    for proto in ["--http1.1", "--http2"] {
        for (path, header) in [
            (
                "/echo-forms?token=pcx_github",
                "Authorization: Bearer pcx_github",
            ),
            ("/echo?k=pcx_filed_key", basic.as_str()),
            (
                "/first-auth-fails/trace",
                "Authorization: Bearer pcx_github",
            ),
        ] {
            let out = s
                .curl(&[
                    proto,
                    "-H",
                    header,
                    "-H",
                    "content-type: application/json",
                    "-X",
                    "PUT",
                    "--data-binary",
                    r#"{"t":"pcx_github"}"#,
                    &s.url(path),
                ])
                .await;
            assert!(out.status == 200, "{proto} {path}: {out:?}");
        }
    }
    assert!(s.up.seen().len() >= 6);
    let logs = s.proxy.logs.lines().join("\n");
    assert!(
        logs.contains("\"level\":\"DEBUG\""),
        "the proxy logged below info"
    );
    assert_no_secret(&logs);
}

/// A credential bound to a host (https on a port) is never substituted into cleartext HTTP to
/// it, and the proxy does not follow a redirect to another host with the secret.
#[tokio::test(flavor = "multi_thread")]
async fn bindings_hold_scheme_and_port_and_redirects_are_not_followed() {
    let s = setup().await;
    let plain = Upstream::start("127.0.0.1", None).await;
    let url = format!("http://localhost:{}/echo", plain.port());
    let out = s
        .curl(&["-H", "Authorization: Bearer pcx_github", &url])
        .await;
    out.assert_refused(403, "credential_not_allowed");
    assert!(
        out.json()["reason"]
            .as_str()
            .unwrap()
            .contains("http://localhost:"),
        "{out:?}"
    );
    assert!(plain.seen().is_empty(), "nothing went out in cleartext");

    let elsewhere = Upstream::start("127.0.0.1", None).await;
    let to = format!("http://127.0.0.1:{}/echo", elsewhere.port());
    let out = s
        .curl(&[
            "-H",
            "Authorization: Bearer pcx_github",
            &s.url(&format!("/redirect?{to}")),
        ])
        .await;
    assert_eq!(out.status, 302, "{out:?}");
    assert_eq!(out.header("location").as_deref(), Some(to.as_str()));
    assert!(
        elsewhere.seen().is_empty(),
        "the proxy followed the redirect"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_and_file_sources() {
    let s = setup().await;
    let out = s.curl(&["-u", "bot:pcx_filed_key", &s.url("/echo")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    let sent = s.up.seen()[0].headers["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        sent,
        format!("Basic {}", base64_encode(&format!("bot:{FILE_SECRET}")))
    );
    // Rotation: a new file content is used without restart, within the file's recheck
    // interval (1 s); until then the old secret, never the placeholder.
    std::fs::write(s.pki.path("file-secret"), "rotated-secret-000111\n").unwrap();
    let old = format!("Basic {}", base64_encode(&format!("bot:{FILE_SECRET}")));
    let new = format!("Basic {}", base64_encode("bot:rotated-secret-000111"));
    let mut rotated = false;
    for attempt in 1..=30 {
        let out = s.curl(&["-u", "bot:pcx_filed_key", &s.url("/echo")]).await;
        assert_eq!(out.status, 200);
        let sent = s.up.seen()[attempt].headers["authorization"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(sent == old || sent == new, "attempt {attempt}: {sent}");
        if sent == new {
            rotated = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(rotated, "the rotated file was not used within 6 s");
    assert!(!s.everything_logged().contains(FILE_SECRET));
}

#[tokio::test(flavor = "multi_thread")]
async fn misdirected_unknown_and_unavailable_credentials_are_refused() {
    let s = setup().await;
    let cases = [
        (
            "Authorization: Bearer pcx_elsewhere",
            403,
            "credential_not_allowed",
        ),
        (
            "Authorization: Bearer pcx_nobody",
            403,
            "credential_not_allowed",
        ),
        (
            "Authorization: Bearer pcx_missing",
            503,
            "credential_unavailable",
        ),
    ];
    for (header, status, code) in cases {
        let out = s.curl(&["-H", header, &s.url("/echo")]).await;
        assert_eq!(out.status, status, "{header}: {out:?}");
        assert_eq!(
            out.header("x-portcullis-error").as_deref(),
            Some(code),
            "{header}"
        );
    }
    assert!(
        s.up.seen().is_empty(),
        "a refused request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_decides_who_may_use_which_credential() {
    let s = setup().await;
    let intern = s.pki.client("intern", "spiffe://acme.test/agents/intern");
    let out = curl(
        &s.pki,
        s.proxy.addr,
        Some(&intern),
        &["-H", "Authorization: Bearer pcx_github", &s.url("/echo")],
    )
    .await;
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "interns may not use github");
    let out = s.curl_as(&intern, &[&s.url("/echo")]).await;
    assert_eq!(
        out.status, 200,
        "without the credential the intern may pass"
    );
    assert_eq!(s.up.seen().len(), 1);
}

const VAULT_SECRET: &str = "ghp_fromVault_0123456789";

/// A proxy brokering one credential from a back end (`edit` adds it to the config), with an
/// upstream and an agent.
/// A proxy with the allow-all policy, `edit` applied to its config and `env` set.
async fn broker(edit: impl FnOnce(&mut Value) + 'static, env: &[(&str, &str)]) -> Harness {
    env.iter()
        .fold(Harness::builder().config(edit), |b, (k, v)| b.env(k, v))
        .start()
        .await
}

/// A credential that cannot be fetched: 503 `credential_unavailable` naming the back end, and
/// nothing forwarded.
fn assert_unavailable(out: &CurlOut, up: &Upstream, backend: &str) {
    assert_eq!(out.status, 503, "{out:?}");
    assert_eq!(
        out.header("x-portcullis-error").as_deref(),
        Some("credential_unavailable")
    );
    assert!(
        out.json()["reason"].as_str().unwrap().contains(backend),
        "{}",
        out.body
    );
    assert!(up.seen().is_empty(), "a placeholder was forwarded");
}

async fn vault_setup(vault: &VaultServer, auth: serde_json::Value) -> Harness {
    let mut v = json!({"address": vault.address(), "cache_ttl": "1h"});
    for (k, val) in auth.as_object().unwrap() {
        v[k] = val.clone();
    }
    let env = [
        ("VAULT_TOKEN_FOR_TEST", VAULT_ROOT_TOKEN),
        ("ROLE_ID", "role-1"),
        ("SECRET_ID", "secret-1"),
    ];
    broker(
        move |cfg| {
            cfg["vault"] = v;
            cfg["credentials"] = json!([{"name": "github", "hosts": ["localhost:*"],
                "source": {"vault": {"mount": "secret", "path": "agents/github", "field": "token"}}}]);
        },
        &env,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_secrets_are_fetched_once_and_served_from_cache_when_vault_is_down() {
    let vault = VaultServer::start(vec![("agents/github", "token", VAULT_SECRET)]).await;
    let s = vault_setup(&vault, json!({"token": "env:VAULT_TOKEN_FOR_TEST"})).await;
    let url = s.url("/echo");
    let args = ["-H", "Authorization: Bearer pcx_github", url.as_str()];
    let runs = (0..6).map(|_| s.curl(&args));
    for out in futures_util::future::join_all(runs).await {
        assert_eq!(out.status, 200, "{out:?}");
        assert!(!out.body.contains(VAULT_SECRET));
    }
    assert!(s
        .up
        .seen()
        .iter()
        .all(|s| s.headers["authorization"] == format!("Bearer {VAULT_SECRET}").as_str()));
    assert_eq!(
        vault.reads.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "concurrent misses must coalesce into one read"
    );
    // Vault goes away: the cached value keeps serving.
    vault.stop();
    let out = s
        .curl(&["-H", "Authorization: Bearer pcx_github", &url])
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    let logged = s.everything_logged();
    assert!(!logged.contains(VAULT_SECRET) && !logged.contains(VAULT_ROOT_TOKEN));
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_down_without_a_cached_secret_is_a_503_and_nothing_is_forwarded() {
    let vault = VaultServer::start(vec![("agents/github", "token", VAULT_SECRET)]).await;
    vault.stop();
    let s = vault_setup(&vault, json!({"token": "env:VAULT_TOKEN_FOR_TEST"})).await;
    let url = s.url("/echo");
    let out = s
        .curl(&["-H", "Authorization: Bearer pcx_github", &url])
        .await;
    assert_unavailable(&out, &s.up, "vault");
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_approle_login() {
    let vault = VaultServer::start(vec![("agents/github", "token", VAULT_SECRET)]).await;
    let s = vault_setup(
        &vault,
        json!({"approle": {"role_id": "env:ROLE_ID", "secret_id": "env:SECRET_ID"}}),
    )
    .await;
    let url = s.url("/echo");
    let out = s
        .curl(&["-H", "Authorization: Bearer pcx_github", &url])
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(
        s.up.seen()[0].headers["authorization"],
        format!("Bearer {VAULT_SECRET}").as_str()
    );
    assert_eq!(vault.logins.load(std::sync::atomic::Ordering::SeqCst), 1);
}

async fn oauth_setup(token_url: &str) -> Harness {
    oauth_setup_with(token_url, json!({})).await
}

/// An OAuth client_credentials source; `extra` adds keys to it.
async fn oauth_setup_with(token_url: &str, extra: Value) -> Harness {
    let mut source = json!({"token_url": token_url, "client_id": "portcullis",
        "client_secret": "env:OAUTH_CLIENT_SECRET", "scopes": ["repo", "read:org"]});
    if let (Some(s), Some(extra)) = (source.as_object_mut(), extra.as_object()) {
        s.extend(extra.clone());
    }
    broker(
        move |cfg| {
            cfg["credentials"] = json!([{"name": "saas", "hosts": ["localhost:*"],
                "source": {"oauth": source}}]);
        },
        &[("OAUTH_CLIENT_SECRET", "oauth-client-secret-xyz")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn oauth_client_credentials_token_is_fetched_once_and_cached() {
    let mut oauth = OAuthServer::start(3600);
    let s = oauth_setup(&oauth.token_url()).await;
    let url = s.url("/echo");
    let args = ["-H", "Authorization: Bearer pcx_saas", url.as_str()];
    let runs = (0..5).map(|_| s.curl(&args));
    for out in futures_util::future::join_all(runs).await {
        assert_eq!(out.status, 200, "{out:?}");
    }
    let tokens = oauth.tokens_after(1);
    assert_eq!(
        tokens.len(),
        1,
        "concurrent requests must share one token request: {tokens:?}"
    );
    assert_eq!(tokens[0]["grant_type"], "client_credentials");
    assert_eq!(tokens[0]["scope"], "repo read:org");
    assert_eq!(tokens[0]["client_auth"], "basic");
    let issued = tokens[0]["access_token"].as_str().unwrap().to_owned();
    assert!(s
        .up
        .seen()
        .iter()
        .all(|s| s.headers["authorization"] == format!("Bearer {issued}").as_str()));

    // Cached: a later request asks the endpoint nothing.
    assert_eq!(s.curl(&args).await.status, 200);
    assert_eq!(oauth.tokens_after(1).len(), 1, "the token is cached");

    // The endpoint goes down while a valid token is cached: still served.
    oauth.stop();
    assert_eq!(s.curl(&args).await.status, 200);
    let logged = s.everything_logged();
    assert!(!logged.contains(&issued) && !logged.contains("oauth-client-secret-xyz"));
}

/// Expiry without a clock: tokens that live 60 s, refreshed 1 minute before they expire, are
/// never reused, so each request fetches its own (the margin stands in for waiting).
#[tokio::test(flavor = "multi_thread")]
async fn oauth_tokens_within_refresh_before_of_expiry_are_fetched_again() {
    let oauth = OAuthServer::start(60);
    let s = oauth_setup_with(&oauth.token_url(), json!({"refresh_before": "1m"})).await;
    let url = s.url("/echo");
    let args = ["-H", "Authorization: Bearer pcx_saas", url.as_str()];
    for _ in 0..2 {
        let out = s.curl(&args).await;
        assert_eq!(out.status, 200, "{out:?}");
    }
    let tokens = oauth.tokens_after(2);
    assert_eq!(
        tokens.len(),
        2,
        "a dying token must be refreshed: {tokens:?}"
    );
    let sent: Vec<String> =
        s.up.seen()
            .iter()
            .map(|s| s.headers["authorization"].to_str().unwrap().to_owned())
            .collect();
    let issued: Vec<String> = tokens
        .iter()
        .map(|t| format!("Bearer {}", t["access_token"].as_str().unwrap()))
        .collect();
    assert_eq!(
        sent, issued,
        "each request carries the token fetched for it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oauth_endpoint_down_without_a_token_is_a_503() {
    let dead = free_addr();
    let s = oauth_setup(&format!("http://{dead}/token")).await;
    let url = s.url("/echo");
    let out = s
        .curl(&["-H", "Authorization: Bearer pcx_saas", &url])
        .await;
    assert_unavailable(&out, &s.up, "OAuth token endpoint");
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_credential_drops_its_cached_value() {
    let vault = VaultServer::start(vec![("agents/github", "token", VAULT_SECRET)]).await;
    let s = vault_setup(&vault, json!({"token": "env:VAULT_TOKEN_FOR_TEST"})).await;
    let url = s.url("/echo");
    let args = ["-H", "Authorization: Bearer pcx_github", url.as_str()];
    assert_eq!(s.curl(&args).await.status, 200);
    assert_eq!(s.curl(&args).await.status, 200);
    assert_eq!(vault.reads.load(std::sync::atomic::Ordering::SeqCst), 1);
    let out = std::process::Command::new(bin())
        .args([
            "credentials",
            "revoke",
            "github",
            "--admin",
            &s.proxy.admin.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.curl(&args).await.status, 200);
    assert_eq!(
        vault.reads.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "revocation must force a refetch"
    );
    // Unknown names are an error.
    let out = std::process::Command::new(bin())
        .args([
            "credentials",
            "revoke",
            "nope",
            "--admin",
            &s.proxy.admin.to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn oauth_refresh_token_rotation_is_written_back_to_its_file() {
    let oauth = OAuthServer::start(3600);
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("refresh-token");
    std::fs::write(&seed, "seed-refresh-token\n").unwrap();
    let token_url = oauth.token_url();
    let reference = format!("file:{}", seed.display());
    let s = broker(
        move |cfg| {
            cfg["credentials"] = json!([{"name": "saas", "hosts": ["localhost:*"],
                "source": {"oauth": {"token_url": token_url, "client_id": "portcullis",
                    "grant": "refresh_token", "refresh_token": reference,
                    "client_secret": "env:OAUTH_CLIENT_SECRET", "client_auth": "post"}}}]);
        },
        &[("OAUTH_CLIENT_SECRET", "oauth-client-secret-xyz")],
    )
    .await;
    let url = s.url("/echo");
    let out = s
        .curl(&["-H", "Authorization: Bearer pcx_saas", &url])
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    let tokens = oauth.tokens_after(1);
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["grant_type"], "refresh_token");
    assert_eq!(tokens[0]["client_auth"], "post");
    assert_eq!(tokens[0]["refresh_token_in"], "seed-refresh-token");
    let rotated = tokens[0]["refresh_token_out"].as_str().unwrap();
    assert_eq!(std::fs::read_to_string(&seed).unwrap(), rotated);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&seed).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let logged = s.everything_logged();
    assert!(!logged.contains(rotated) && !logged.contains("seed-refresh-token"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_401_refreshes_the_secret_and_retries_idempotent_requests_once() {
    use std::sync::atomic::Ordering::SeqCst;
    let vault = VaultServer::start(vec![("agents/github", "token", VAULT_SECRET)]).await;
    let s = vault_setup(&vault, json!({"token": "env:VAULT_TOKEN_FOR_TEST"})).await;
    let base = format!("https://localhost:{}", s.up.port());
    let auth = ["-H", "Authorization: Bearer pcx_github"];
    let get = format!("{base}/first-auth-fails/get");
    let out = s.curl(&[auth[0], auth[1], &get]).await;
    assert_eq!(out.status, 200, "the retry must succeed: {out:?}");
    let tries: Vec<_> =
        s.up.seen()
            .into_iter()
            .filter(|s| s.path == "/first-auth-fails/get")
            .collect();
    assert_eq!(tries.len(), 2, "exactly one retry");
    for t in &tries {
        assert_eq!(
            t.headers["authorization"],
            format!("Bearer {VAULT_SECRET}").as_str()
        );
    }
    assert_eq!(
        vault.reads.load(SeqCst),
        2,
        "the 401 must refetch the secret"
    );

    // A POST is not replayed: the agent sees the 401, the upstream one request.
    let post = format!("{base}/first-auth-fails/post");
    let out = s
        .curl(&[auth[0], auth[1], "-X", "POST", "-d", "{}", &post])
        .await;
    assert_eq!(out.status, 401, "{out:?}");
    let posts =
        s.up.seen()
            .iter()
            .filter(|s| s.path == "/first-auth-fails/post")
            .count();
    assert_eq!(posts, 1);
    assert_eq!(vault.reads.load(SeqCst), 2);

    // An upstream that rejects every credential: one refresh per interval, however many
    // requests an agent sends (no fetch storm against Vault); each agent gets the 401.
    let always = format!("{base}/always-401");
    for _ in 0..5 {
        let out = s.curl(&[auth[0], auth[1], &always]).await;
        assert_eq!(out.status, 401, "{out:?}");
    }
    assert_eq!(
        vault.reads.load(SeqCst),
        2,
        "refreshed within the interval already (by the first test request)"
    );
    let hits =
        s.up.seen()
            .iter()
            .filter(|s| s.path == "/always-401")
            .count();
    assert_eq!(hits, 5, "no retries without a refresh");
}

/// A server that compresses whatever the request asks for (the proxy asks for `identity`
/// wherever it must read the answer): an answer that must be searched for echoed secrets but
/// arrives compressed is refused at its head (502 `unsupported_encoding`), never delivered
/// unread and never cut off mid-body. Real curl and httpx (which asks for gzip by default);
/// without a substituted credential the compressed answer passes as the server sent it.
#[tokio::test(flavor = "multi_thread")]
async fn a_compressed_answer_that_must_be_inspected_is_refused() {
    let s = setup().await;
    let url = s.url("/gzip-echo?access_token=pcx_github");
    let out = s
        .curl(&[
            "-H",
            "Authorization: Bearer pcx_github",
            "-H",
            "accept-encoding: gzip",
            &url,
        ])
        .await;
    out.assert_refused(502, "unsupported_encoding");
    let reason = out.json()["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("Content-Encoding gzip cannot be checked for echoed secrets"),
        "{reason}"
    );
    assert_no_secret(&format!("{}\n{}", out.headers, out.body));
    let seen = s.up.seen();
    let sent = seen.last().unwrap();
    assert_eq!(sent.headers["accept-encoding"], "identity");
    assert_eq!(
        sent.headers["authorization"],
        format!("Bearer {GITHUB_SECRET}").as_str()
    );

    // httpx, with its default Accept-Encoding.
    let (v, stdout) = httpx_get(&s, &url, &json!({"authorization": "Bearer pcx_github"})).await;
    assert_no_secret(&stdout);
    assert_eq!(v["status"], 502, "{v}");
    assert_eq!(v["body"]["error"], "unsupported_encoding", "{v}");

    // Nothing to search (no credential used): delivered compressed, as sent.
    let plain = s.url("/gzip-echo");
    let out = s.curl(&["--compressed", &plain]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.header("content-encoding").as_deref(), Some("gzip"));
    assert!(out.json()["headers"].is_object(), "{out:?}");
    // No body to read: a HEAD with a credential passes.
    let out = s
        .curl(&["-I", "-H", "Authorization: Bearer pcx_github", &url])
        .await;
    assert_eq!(out.status, 200, "{out:?}");
}
