//! Redis as the shared credential cache, end to end with a real `redis-server`, the real
//! oauth2-mock-server and two proxy processes: replicas fetch a token once between them, store
//! it encrypted, propagate revocations, share rotated refresh tokens, and keep working (from
//! their own cache and the source) when Redis is down.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use portcullis_tests::*;
use serde_json::{json, Value};

/// 32 bytes, base64: the AES-256-GCM key both replicas share.
const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const CLIENT_SECRET: &str = "oauth-client-secret-xyz";

struct Replicas {
    pki: Pki,
    up: Upstream,
    a: Proxy,
    b: Proxy,
    agent: ClientCert,
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("PCX_REDIS_KEY", KEY),
        ("OAUTH_CLIENT_SECRET", CLIENT_SECRET),
        ("OAUTH_REFRESH_SEED", "seed-refresh-token"),
    ]
}

/// Two proxies with the same config (one OAuth credential `saas`) and one Redis.
async fn replicas(redis_url: &str, oauth: &serde_json::Value) -> Replicas {
    let pki = Pki::new();
    replace_file(
        &pki.path("policy/allow.rego"),
        "package portcullis\n\ndefault decision := true\n",
    );
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let mut cfg = pki.base_config();
    cfg["credentials"] =
        json!([{"name": "saas", "hosts": ["localhost:*"], "source": {"oauth": oauth}}]);
    cfg["redis"] = json!({"url": redis_url, "encryption_key": "env:PCX_REDIS_KEY",
        "timeout": "300ms", "lock_ttl": "3s"});
    let config = pki.write_config(&cfg);
    let a = Proxy::start_with_env(&config, &env());
    let b = Proxy::start_with_env(&config, &env());
    let agent = pki.client("agent", "spiffe://acme.test/agents/research");
    Replicas {
        pki,
        up,
        a,
        b,
        agent,
    }
}

fn client_credentials(oauth: &OAuthServer) -> Value {
    json!({"token_url": oauth.token_url(), "client_id": "portcullis",
        "client_secret": "env:OAUTH_CLIENT_SECRET"})
}

impl Replicas {
    async fn call(&self, proxy: &Proxy) -> CurlOut {
        let url = format!("https://localhost:{}/echo", self.up.port());
        curl(
            &self.pki,
            proxy.addr,
            Some(&self.agent),
            &["-H", "Authorization: Bearer pcx_saas", &url],
        )
        .await
    }

    /// The bearer token the upstream saw on its last request.
    fn last_token(&self) -> String {
        let seen = self.up.seen();
        let auth = seen.last().unwrap().headers["authorization"].clone();
        auth.to_str()
            .unwrap()
            .strip_prefix("Bearer ")
            .unwrap()
            .to_owned()
    }

    fn everything_logged(&self) -> String {
        [&self.a, &self.b]
            .iter()
            .flat_map(|p| [p.logs.lines(), p.decisions.lines()])
            .flatten()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_fetch_one_token_between_them_and_revoke_everywhere() {
    let redis = RedisServer::start();
    let oauth = OAuthServer::start(3600);
    let r = replicas(&redis.url(), &client_credentials(&oauth)).await;

    // Concurrent first uses on both replicas: one token request in all.
    let calls = (0..6).map(|i| r.call(if i % 2 == 0 { &r.a } else { &r.b }));
    for out in futures_util::future::join_all(calls).await {
        assert_eq!(out.status, 200, "{out:?}");
    }
    let tokens = oauth.tokens_after(1);
    assert_eq!(tokens.len(), 1, "replicas must share one token: {tokens:?}");
    let issued = tokens[0]["access_token"].as_str().unwrap().to_owned();
    assert!(r
        .up
        .seen()
        .iter()
        .all(|s| s.headers["authorization"] == format!("Bearer {issued}").as_str()));

    // Stored encrypted, and expiring with the token.
    let stored = redis.cli(&["GET", "portcullis:secret:saas"]);
    assert!(stored.len() > 40, "{stored}");
    assert!(
        !stored.contains(&issued[..20]),
        "the token is stored in clear"
    );
    let ttl: i64 = redis
        .cli(&["PTTL", "portcullis:secret:saas"])
        .trim()
        .trim_start_matches("(integer) ")
        .parse()
        .unwrap();
    assert!(ttl > 3_000_000 && ttl <= 3_600_000, "ttl {ttl}");

    // Revoked on A: B drops its copy too, and the next use fetches a new token once.
    let out = std::process::Command::new(bin())
        .args(["credentials", "revoke", "saas", "--admin"])
        .arg(r.a.admin.to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    r.b.logs
        .wait_for("B's revocation", |l| l.contains("revoked by a replica"));
    assert_eq!(
        redis.cli(&["EXISTS", "portcullis:secret:saas"]).trim(),
        "(integer) 0"
    );
    assert_eq!(r.call(&r.b).await.status, 200);
    assert_eq!(
        oauth.tokens_after(2).len(),
        2,
        "a revoked token must be refetched"
    );
    assert_eq!(
        r.last_token(),
        oauth.tokens()[1]["access_token"].as_str().unwrap()
    );
    assert_eq!(r.call(&r.a).await.status, 200);
    assert_eq!(oauth.tokens().len(), 2, "A must reuse B's new token");
    let fetches = r.a.metric("portcullis_credential_fetches_total").await
        + r.b.metric("portcullis_credential_fetches_total").await;
    assert_eq!(fetches, 2, "one fetch before and one after the revocation");

    let logged = r.everything_logged();
    assert!(!logged.contains(&issued) && !logged.contains(CLIENT_SECRET) && !logged.contains(KEY));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_token_rotated_by_one_replica_is_used_by_the_other() {
    let redis = RedisServer::start();
    // 60 s tokens refreshed 1 minute early are never reused: every request refreshes.
    let oauth = OAuthServer::start(60);
    let mut source = client_credentials(&oauth);
    source["grant"] = json!("refresh_token");
    source["refresh_token"] = json!("env:OAUTH_REFRESH_SEED");
    source["refresh_before"] = json!("1m");
    let r = replicas(&redis.url(), &source).await;

    assert_eq!(r.call(&r.a).await.status, 200);
    let first = oauth.tokens_after(1);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["grant_type"], "refresh_token");
    assert_eq!(first[0]["refresh_token_in"], "seed-refresh-token");
    let rotated = first[0]["refresh_token_out"].as_str().unwrap().to_owned();

    // B's refresh uses the token A received, not the stale seed.
    assert_eq!(r.call(&r.b).await.status, 200);
    let tokens = oauth.tokens_after(2);
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert_eq!(tokens[1]["refresh_token_in"], rotated.as_str());
    let logged = r.everything_logged();
    assert!(!logged.contains(&rotated) && !logged.contains("seed-refresh-token"));
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_falls_back_to_the_replicas_own_cache_and_source() {
    let dead = free_addr();
    let oauth = OAuthServer::start(3600);
    let r = replicas(&format!("redis://{dead}"), &client_credentials(&oauth)).await;
    for _ in 0..3 {
        assert_eq!(r.call(&r.a).await.status, 200);
    }
    assert_eq!(oauth.tokens_after(1).len(), 1, "A's own cache still serves");
    assert!(r.a.metric("portcullis_redis_errors_total").await >= 1);
    assert_eq!(r.call(&r.b).await.status, 200);
    assert_eq!(
        oauth.tokens_after(2).len(),
        2,
        "without Redis, B fetches its own"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_config_errors_are_precise() {
    let pki = Pki::new();
    replace_file(
        &pki.path("policy/allow.rego"),
        "package portcullis\n\ndefault decision := true\n",
    );
    let cases = [
        (
            json!({"url": "redis://:hunter2@127.0.0.1:6379", "encryption_key": "env:PCX_REDIS_KEY"}),
            "redis.url",
        ),
        (
            json!({"url": "redis://127.0.0.1:6379", "encryption_key": "0123456789abcdef0123456789abcdef"}),
            "never literals",
        ),
        (
            json!({"url": "http://127.0.0.1:6379", "encryption_key": "env:PCX_REDIS_KEY"}),
            "not a Redis URL",
        ),
        (
            json!({"url": "redis://127.0.0.1:6379", "encryption_key": "env:PCX_SHORT_KEY"}),
            "32 bytes",
        ),
    ];
    for (redis, expect) in cases {
        let mut cfg = pki.base_config();
        cfg["redis"] = redis;
        let out = std::process::Command::new(bin())
            .args(["check", "--config"])
            .arg(pki.write_config(&cfg))
            .env("PCX_REDIS_KEY", KEY)
            .env("PCX_SHORT_KEY", "c2hvcnQ=")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(expect), "{expect:?} not in {err}");
        assert!(!err.contains("hunter2"), "the password leaked: {err}");
    }
}

/// An identity revoked on one replica is refused by the other (announced through Redis) and by
/// a replica started later (persisted in Redis); restoring it on either lifts it everywhere.
#[tokio::test(flavor = "multi_thread")]
async fn identity_revocations_reach_every_replica_and_outlive_them() {
    let redis = RedisServer::start();
    let oauth = OAuthServer::start(3600);
    let r = replicas(&redis.url(), &client_credentials(&oauth)).await;
    let url = format!("https://localhost:{}/ok", r.up.port());
    let args = [url.as_str()];
    let get = |proxy: &Proxy| curl(&r.pki, proxy.addr, Some(&r.agent), &args);
    assert_eq!(get(&r.b).await.status, 200);

    let cli = |proxy: &Proxy, args: &[&str]| {
        let out = std::process::Command::new(bin())
            .arg("identity")
            .args(args)
            .args(["--admin", &proxy.admin.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    cli(
        &r.a,
        &["revoke", "--id", "spiffe://acme.test/agents/research"],
    );
    r.b.logs.wait_for("B follows A's revocation", |l| {
        l.contains("identity revocations updated from redis")
    });
    let out = get(&r.b).await;
    assert!(!out.success && out.stderr.contains("revoked"), "{out:?}");
    assert_eq!(r.b.metric("portcullis_identity_revocations").await, 1);

    let config = r.pki.path("config.yaml");
    let c = Proxy::start_with_env(&config, &env());
    let out = get(&c).await;
    assert!(!out.success && out.stderr.contains("revoked"), "{out:?}");

    cli(
        &r.b,
        &["restore", "--id", "spiffe://acme.test/agents/research"],
    );
    assert_eq!(
        r.a.wait_metric("portcullis_identity_revocations", |n| n == 0)
            .await,
        0
    );
    assert_eq!(
        c.wait_metric("portcullis_identity_revocations", |n| n == 0)
            .await,
        0
    );
    for p in [&r.a, &r.b, &c] {
        assert_eq!(get(p).await.status, 200);
    }
}

/// An upstream that answers 401 to every credential, called through both replicas: the
/// refresh on a 401 is claimed in Redis, so the replicas together ask the token endpoint for one
/// new token per `refresh_interval`, however many 401s they see (no fetch storm).
#[tokio::test(flavor = "multi_thread")]
async fn upstream_401s_on_both_replicas_cause_one_refresh_between_them() {
    let redis = RedisServer::start();
    let oauth = OAuthServer::start(3600);
    let r = replicas(&redis.url(), &client_credentials(&oauth)).await;
    let url = format!("https://localhost:{}/always-401", r.up.port());
    let args = ["-H", "Authorization: Bearer pcx_saas", url.as_str()];
    for i in 0..8 {
        let proxy = if i % 2 == 0 { &r.a } else { &r.b };
        let out = curl(&r.pki, proxy.addr, Some(&r.agent), &args).await;
        assert_eq!(out.status, 401, "{out:?}");
    }
    assert_eq!(
        oauth.tokens().len(),
        2,
        "the first token and one refresh, for both replicas and 8 rejections"
    );
    let hits =
        r.up.seen()
            .iter()
            .filter(|s| s.path == "/always-401")
            .count();
    assert_eq!(hits, 9, "8 requests and the one retry after the refresh");
}
