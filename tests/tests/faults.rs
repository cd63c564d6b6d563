//! Dependencies failing while requests flow: Vault, the OAuth server, Redis and the OTLP
//! collector stopped and restarted on their addresses, and the decision log's file hitting a
//! size limit (a full disk). Under every fault: no placeholder reaches the upstream, every
//! request ends within its bound with a 200 or the contract error, the proxy stays up, the
//! outage shows in `/metrics`, and service comes back within a bounded time after the
//! dependency does. Real curl as the agent, the real oauth2-mock-server and redis-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use portcullis_tests::*;
use serde_json::json;

const VAULT_SECRET: &str = "vault-secret-under-faults-1234";
/// Each request's own bound (curl's `--max-time`); every outcome must come well inside it.
const REQUEST_BOUND: Duration = Duration::from_secs(10);
/// How long the proxy may take to serve again once a dependency is back.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);

/// One request of the load: status (0: curl failed), `x-portcullis-error`, how long it took.
#[derive(Debug)]
struct Outcome {
    status: u16,
    error: Option<String>,
    took: Duration,
    curl: Option<i32>,
}

/// Three curl loops through the harness's proxy until `stop`.
async fn flow(h: &Harness, args: &[&str], stop: &AtomicBool) -> Vec<Outcome> {
    let max_time = REQUEST_BOUND.as_secs().to_string();
    let worker = || async {
        let mut out = Vec::new();
        // Bounded: at most 2000 requests per worker, whatever `stop` says.
        for _ in 0..2000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let mut all = vec!["--max-time", max_time.as_str()];
            all.extend_from_slice(args);
            let started = Instant::now();
            let r = h.curl(&all).await;
            out.push(Outcome {
                status: r.status,
                error: r.header("x-portcullis-error"),
                took: started.elapsed(),
                curl: r.code,
            });
        }
        out
    };
    let all = futures_util::future::join_all((0..3).map(|_| worker())).await;
    all.into_iter().flatten().collect()
}

/// Run the load while `fault` does its work; the load stops when the fault is done.
async fn under_load<T>(
    h: &Harness,
    args: &[&str],
    fault: impl std::future::Future<Output = T>,
) -> (Vec<Outcome>, T) {
    let stop = AtomicBool::new(false);
    let fault = async {
        let r = fault.await;
        stop.store(true, Ordering::Relaxed);
        r
    };
    tokio::join!(flow(h, args, &stop), fault)
}

/// Every request ended in time with a 200 or one of `allowed` contract errors; nothing with a
/// placeholder reached the upstream.
#[track_caller]
fn assert_fail_closed(outcomes: &[Outcome], up: &Upstream, allowed: &[(u16, &str)]) {
    assert!(outcomes.len() >= 10, "too little load: {outcomes:?}");
    for o in outcomes {
        assert!(o.took < REQUEST_BOUND, "a request hung: {o:?}");
        let fine = o.status == 200
            || allowed
                .iter()
                .any(|(s, e)| o.status == *s && o.error.as_deref() == Some(e));
        assert!(fine, "unexpected outcome {o:?}");
        assert_eq!(o.curl, Some(0), "curl failed: {o:?}");
    }
    for seen in up.seen() {
        for (name, value) in &seen.headers {
            let v = String::from_utf8_lossy(value.as_bytes());
            assert!(!v.contains("pcx_"), "placeholder forwarded in {name}: {v}");
        }
    }
}

/// Wait (bounded by `within`) until `cond` holds.
async fn eventually(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Requests that reached the upstream so far.
fn forwarded(h: &Harness) -> usize {
    h.up.seen().len()
}

/// The proxy's credential cache dropped (as an operator or a 401 would), so the next use must
/// reach the source.
async fn revoke(h: &Harness, name: &str) {
    let (status, body) = h
        .proxy
        .admin_request("POST", &format!("/credentials/revoke?name={name}"))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Vault down while requests flow and the cached secret is revoked: 503
/// `credential_unavailable` (never a forwarded placeholder), counted; back once Vault is.
#[tokio::test(flavor = "multi_thread")]
async fn vault_outage_under_load() {
    let vault = VaultServer::start(vec![("agents/github", "token", VAULT_SECRET)]).await;
    let address = vault.address();
    let h = Harness::builder()
        .env("VAULT_TOKEN_FOR_TEST", VAULT_ROOT_TOKEN)
        .config(move |cfg| {
            cfg["vault"] = json!({"address": address, "token": "env:VAULT_TOKEN_FOR_TEST",
                "cache_ttl": "1h"});
            cfg["credentials"] = json!([{"name": "github", "hosts": ["localhost:*"],
                "source": {"vault": {"mount": "secret", "path": "agents/github", "field": "token"}}}]);
        })
        .start()
        .await;
    let url = h.url("/echo");
    let args = ["-H", "Authorization: Bearer pcx_github", url.as_str()];
    let (outcomes, ()) = under_load(&h, &args, async {
        eventually("load flowing", RECOVERY_BOUND, async || forwarded(&h) >= 5).await;
        vault.stop();
        revoke(&h, "github").await;
        h.proxy
            .wait_metric("portcullis_credential_fetch_errors_total", |n| n >= 3)
            .await;
        vault.restart().await;
        let before = forwarded(&h);
        eventually("service back after Vault", RECOVERY_BOUND, async || {
            forwarded(&h) >= before + 5
        })
        .await;
    })
    .await;
    assert_fail_closed(&outcomes, &h.up, &[(503, "credential_unavailable")]);
    assert!(outcomes.iter().any(|o| o.status == 503), "no outage seen");
    assert_eq!(outcomes.last().unwrap().status, 200, "{outcomes:?}");
    assert!(!h.everything_logged().contains(VAULT_SECRET));
}

/// The OAuth token endpoint down and its token revoked under load: 503s while it is down,
/// counted; the same endpoint back on its port is used again.
#[tokio::test(flavor = "multi_thread")]
async fn oauth_outage_under_load() {
    let mut oauth = OAuthServer::start(3600);
    let (port, token_url) = (oauth.port, oauth.token_url());
    let h = Harness::builder()
        .env("OAUTH_CLIENT_SECRET", "oauth-client-secret-xyz")
        .config(move |cfg| {
            cfg["credentials"] = json!([{"name": "saas", "hosts": ["localhost:*"],
                "source": {"oauth": {"token_url": token_url, "client_id": "portcullis",
                    "client_secret": "env:OAUTH_CLIENT_SECRET"}}}]);
        })
        .start()
        .await;
    let url = h.url("/echo");
    let args = ["-H", "Authorization: Bearer pcx_saas", url.as_str()];
    let (outcomes, restarted) = under_load(&h, &args, async {
        eventually("load flowing", RECOVERY_BOUND, async || forwarded(&h) >= 5).await;
        oauth.stop();
        revoke(&h, "saas").await;
        h.proxy
            .wait_metric("portcullis_credential_fetch_errors_total", |n| n >= 3)
            .await;
        let restarted = OAuthServer::start_on(port, 3600);
        let before = forwarded(&h);
        eventually("service back after OAuth", RECOVERY_BOUND, async || {
            forwarded(&h) >= before + 5
        })
        .await;
        restarted
    })
    .await;
    assert_fail_closed(&outcomes, &h.up, &[(503, "credential_unavailable")]);
    assert!(outcomes.iter().any(|o| o.status == 503), "no outage seen");
    assert_eq!(restarted.tokens().len(), 1, "one token after the outage");
}

/// Redis down under load: requests go on from the local cache and the source (no outage for
/// the agent), the errors are counted, and once Redis is back the replica stores fetched
/// values there again.
#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_under_load() {
    let mut redis = RedisServer::start();
    let (port, redis_url) = (redis.port, redis.url());
    let oauth = OAuthServer::start(3600);
    let token_url = oauth.token_url();
    let h = Harness::builder()
        .env("OAUTH_CLIENT_SECRET", "oauth-client-secret-xyz")
        .env(
            "PCX_REDIS_KEY",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        )
        .config(move |cfg| {
            cfg["credentials"] = json!([{"name": "saas", "hosts": ["localhost:*"],
                "source": {"oauth": {"token_url": token_url, "client_id": "portcullis",
                    "client_secret": "env:OAUTH_CLIENT_SECRET"}}}]);
            cfg["redis"] = json!({"url": redis_url, "encryption_key": "env:PCX_REDIS_KEY",
                "timeout": "300ms", "lock_ttl": "2s"});
        })
        .start()
        .await;
    let url = h.url("/echo");
    let args = ["-H", "Authorization: Bearer pcx_saas", url.as_str()];
    let (outcomes, redis) = under_load(&h, &args, async {
        eventually("load flowing", RECOVERY_BOUND, async || forwarded(&h) >= 5).await;
        redis.stop();
        // A refetch while Redis is down: straight from the source.
        revoke(&h, "saas").await;
        h.proxy
            .wait_metric("portcullis_redis_errors_total", |n| n >= 1)
            .await;
        let before = forwarded(&h);
        eventually("requests during the outage", RECOVERY_BOUND, async || {
            forwarded(&h) >= before + 5
        })
        .await;
        let redis = RedisServer::start_on(port);
        // Back: a value fetched now is shared through Redis again.
        eventually("the shared cache used again", RECOVERY_BOUND, async || {
            let fetched = h.proxy.metric("portcullis_credential_fetches_total").await;
            revoke(&h, "saas").await;
            h.proxy
                .wait_metric("portcullis_credential_fetches_total", |n| n > fetched)
                .await;
            redis.cli(&["EXISTS", "portcullis:secret:saas"]).trim() == "(integer) 1"
        })
        .await;
        redis
    })
    .await;
    assert_fail_closed(&outcomes, &h.up, &[]);
    drop(redis);
}

/// The OTLP collector down under load: requests are not slowed or failed, lost exports are
/// counted, and spans arrive again once the collector is back.
#[tokio::test(flavor = "multi_thread")]
async fn otlp_collector_outage_under_load() {
    let otlp = OtlpReceiver::start().await;
    let endpoint = otlp.endpoint();
    let h = Harness::builder()
        .config(move |cfg| {
            cfg["telemetry"] = json!({"otlp_endpoint": endpoint,
                "otlp_protocol": "http/protobuf", "service_name": "faults"});
        })
        .start()
        .await;
    let url = h.url("/traced");
    let (outcomes, ()) = under_load(&h, &[url.as_str()], async {
        eventually("spans exported", RECOVERY_BOUND, async || {
            otlp.spans().len() >= 5
        })
        .await;
        otlp.stop();
        h.proxy
            .wait_metric("portcullis_otel_export_errors_total", |n| n >= 1)
            .await;
        otlp.restart().await;
        let before = otlp.spans().len();
        eventually(
            "spans after the collector is back",
            RECOVERY_BOUND,
            async || otlp.spans().len() > before,
        )
        .await;
    })
    .await;
    assert_fail_closed(&outcomes, &h.up, &[]);
    assert!(h.proxy.metric("portcullis_otel_spans_dropped_total").await >= 1);
}

/// The decision log's file cannot grow (a file size limit standing in for a full disk, where
/// writes fail with EFBIG as they would with ENOSPC): requests go on, the proxy survives,
/// lost lines are counted, and once there is room again lines are written again.
#[tokio::test(flavor = "multi_thread")]
async fn decision_log_disk_full_under_load() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let log = pki.path("decisions.jsonl");
    let mut cfg = pki.base_config();
    cfg["telemetry"] = json!({"decision_log": log.to_str().unwrap()});
    // 16 blocks of 512 bytes (dash): room for a few dozen lines.
    let proxy = Proxy::start_after_shell(&pki.write_config(&cfg), &[], "ulimit -f 16");
    let agent = pki.client("agent", "spiffe://acme.test/agents/research");
    let h = Harness {
        pki,
        up,
        proxy,
        agent,
    };
    let url = h.url("/logged");
    let (outcomes, ()) = under_load(&h, &[url.as_str()], async {
        h.proxy
            .wait_metric("portcullis_decision_log_dropped_total", |n| n >= 5)
            .await;
        let before = forwarded(&h);
        eventually(
            "requests while the log is full",
            RECOVERY_BOUND,
            async || forwarded(&h) >= before + 10,
        )
        .await;
        // Room again (an operator rotated the file).
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(0)
            .unwrap();
        eventually("lines written again", RECOVERY_BOUND, async || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.lines()
                .any(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        })
        .await;
    })
    .await;
    assert_fail_closed(&outcomes, &h.up, &[]);
    h.proxy.logs.wait_for("the recovery", |l| {
        l.contains("decision log writable again")
    });
    assert_eq!(h.proxy.admin_get("/healthz").await.0, 200);
}
