//! OpenTelemetry export, checked at an in-process OTLP/HTTP collector (no collector binary can
//! be installed here; the receiver decodes the documented OTLP protobuf): spans per action with
//! the identity and policy attributes, continuing the caller's trace, child spans for the
//! policy, the credential and the upstream call inside the action's span, the upstream and an
//! MCP server (the official SDK) continuing the trace from the proxy's client span, deny spans
//! marked as errors, no secret anywhere, and a dead collector never affecting requests while
//! its drops are counted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use opentelemetry_proto::tonic::trace::v1::Span;
use portcullis_tests::*;
use serde_json::json;

const POLICY: &str = r#"package portcullis

import rego.v1

default decision := {"allow": true, "reason": "ok"}

decision := {"allow": false, "reason": "no writes"} if {
	input.request.method == "POST"
}
"#;

/// OTLP `Span.kind` values.
const INTERNAL: i32 = 1;
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
/// OTLP `Status.code` for Error.
const ERROR: i32 = 2;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn is_error(s: &Span) -> bool {
    s.status.as_ref().is_some_and(|st| st.code == ERROR)
}

/// The child spans of `parent` (same trace), each checked to lie inside its interval.
fn children(otlp: &OtlpReceiver, parent: &Span) -> Vec<Span> {
    let kids: Vec<Span> = otlp
        .spans()
        .into_iter()
        .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
        .collect();
    for k in &kids {
        assert!(
            k.start_time_unix_nano >= parent.start_time_unix_nano
                && k.start_time_unix_nano <= k.end_time_unix_nano
                && k.end_time_unix_nano <= parent.end_time_unix_nano,
            "child {} [{}, {}] is not inside its parent {} [{}, {}]",
            k.name,
            k.start_time_unix_nano,
            k.end_time_unix_nano,
            parent.name,
            parent.start_time_unix_nano,
            parent.end_time_unix_nano
        );
    }
    kids
}

/// Wait until `parent` has a child satisfying `pred` (children are exported with the parent,
/// but may land in the next batch).
async fn child(
    otlp: &OtlpReceiver,
    parent: &Span,
    what: &str,
    pred: impl Fn(&Span) -> bool,
) -> Span {
    otlp.wait_span(what, |s| {
        s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id && pred(s)
    })
    .await;
    children(otlp, parent)
        .into_iter()
        .find(|s| pred(s))
        .unwrap()
}

/// A GET through the proxy as `spiffe_id` (answered 200), then its action span, checked to
/// carry that identity.
async fn get_as(
    pki: &Pki,
    proxy: &Proxy,
    up: &Upstream,
    otlp: &OtlpReceiver,
    spiffe_id: &str,
) -> Span {
    let agent = pki.client("agent", spiffe_id);
    let url = format!("https://localhost:{}/get", up.port());
    assert_eq!(
        curl(pki, proxy.addr, Some(&agent), &[&url]).await.status,
        200
    );
    let span = otlp
        .wait_span(&format!("GET by {spiffe_id}"), |s| {
            s.name == "GET"
                && s.kind == SERVER
                && span_attr(s, "portcullis.identity.spiffe_id").as_deref() == Some(spiffe_id)
        })
        .await;
    assert_eq!(
        span_attr(&span, "portcullis.identity.trust_domain").as_deref(),
        Some("acme.test")
    );
    span
}

/// Wait until undelivered spans are counted (dropped spans and failed export calls); returns
/// the once-per-outage warning.
async fn drops_counted(proxy: &Proxy) -> String {
    proxy
        .wait_metric("portcullis_otel_spans_dropped_total", |n| n > 0)
        .await;
    assert!(proxy.metric("portcullis_otel_export_errors_total").await > 0);
    proxy.logs.wait_for("the export failure warning", |l| {
        l.contains("span export failed")
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_tie_each_action_to_the_workload_identity() {
    let pki = Pki::new();
    replace_file(&pki.path("policy/allow.rego"), POLICY);
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let otlp = OtlpReceiver::start().await;
    let mut cfg = pki.base_config();
    cfg["telemetry"] = json!({"otlp_endpoint": otlp.endpoint(), "otlp_protocol": "http/protobuf", "service_name": "portcullis-test"});
    cfg["credentials"] = json!([
        {"name": "gh", "hosts": ["localhost:*"], "source": {"env": "PCX_TEST_SECRET"}},
        {"name": "filed", "hosts": ["localhost:*"], "source": {"file": "filed-token"}},
        {"name": "missing", "hosts": ["localhost:*"], "source": {"env": "PCX_UNSET_FOR_TEST"}},
    ]);
    let secret = "otel-leak-check-secret-42";
    let file_secret = "otel-leak-check-file-secret-43";
    std::fs::write(pki.path("filed-token"), file_secret).unwrap();
    let proxy = Proxy::start_with_env(
        &pki.write_config(&cfg),
        &[
            ("PCX_TEST_SECRET", secret),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let agent = pki.client("agent", "spiffe://acme.test/agents/research");
    let url = format!("https://localhost:{}/v1/things", up.port());
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("traceparent: 00-{caller_trace}-00f067aa0ba902b7-01");
    let out = curl(
        &pki,
        proxy.addr,
        Some(&agent),
        &["-H", &tp, "-H", "Authorization: Bearer pcx_gh", &url],
    )
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    let denied = curl(
        &pki,
        proxy.addr,
        Some(&agent),
        &["-X", "POST", "-d", "x", &url],
    )
    .await;
    assert_eq!(denied.status, 403);

    let get = otlp
        .wait_span("GET", |s| s.name == "GET" && s.kind == SERVER)
        .await;
    assert_eq!(
        hex(&get.trace_id),
        caller_trace,
        "the caller's trace is continued"
    );
    assert_eq!(
        hex(&get.parent_span_id),
        "00f067aa0ba902b7",
        "the caller's span is the action span's parent"
    );
    assert_eq!(
        span_attr(&get, "portcullis.identity.spiffe_id").as_deref(),
        Some("spiffe://acme.test/agents/research")
    );
    assert_eq!(
        span_attr(&get, "portcullis.identity.trust_domain").as_deref(),
        Some("acme.test")
    );
    assert_eq!(
        span_attr(&get, "portcullis.policy.decision").as_deref(),
        Some("allow")
    );
    assert_eq!(
        span_attr(&get, "portcullis.credentials").as_deref(),
        Some("gh")
    );
    assert_eq!(
        span_attr(&get, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        span_attr(&get, "server.address").as_deref(),
        Some("localhost")
    );

    // Child spans: the policy decision, the credential read, the upstream call.
    let policy = child(&otlp, &get, "policy.evaluate", |s| {
        s.name == "policy.evaluate"
    })
    .await;
    assert_eq!(policy.kind, INTERNAL);
    assert_eq!(
        span_attr(&policy, "portcullis.policy.decision").as_deref(),
        Some("allow")
    );
    assert_eq!(
        span_attr(&policy, "portcullis.policy.reason").as_deref(),
        Some("ok")
    );
    assert_eq!(
        span_attr(&policy, "portcullis.policy.revision"),
        span_attr(&get, "portcullis.policy.revision")
    );
    assert!(span_attr(&policy, "portcullis.policy.eval_time_us").is_some());
    let cred = child(&otlp, &get, "credential.fetch", |s| {
        s.name == "credential.fetch"
    })
    .await;
    assert_eq!(
        span_attr(&cred, "portcullis.credential.name").as_deref(),
        Some("gh")
    );
    assert!(!is_error(&cred));
    let client = child(&otlp, &get, "the upstream client span", |s| {
        s.kind == CLIENT
    })
    .await;
    assert_eq!(client.name, "GET");
    assert_eq!(
        span_attr(&client, "server.address").as_deref(),
        Some("localhost")
    );
    assert_eq!(
        span_attr(&client, "server.port"),
        Some(up.port().to_string())
    );
    assert_eq!(
        span_attr(&client, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(!is_error(&client));
    // Policy first, then the credential, then the upstream call.
    assert!(policy.end_time_unix_nano <= cred.start_time_unix_nano);
    assert!(cred.end_time_unix_nano <= client.start_time_unix_nano);
    // The upstream continues the caller's trace with the proxy's client span as its parent.
    let sent = up.seen()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        sent,
        format!("00-{caller_trace}-{}-01", hex(&client.span_id))
    );

    let post = otlp
        .wait_span("POST", |s| s.name == "POST" && s.kind == SERVER)
        .await;
    assert_eq!(
        span_attr(&post, "portcullis.policy.decision").as_deref(),
        Some("deny")
    );
    assert_eq!(
        span_attr(&post, "portcullis.policy.reason").as_deref(),
        Some("no writes")
    );
    assert!(is_error(&post), "deny spans have status Error");
    assert_eq!(
        span_attr(&post, "error.type").as_deref(),
        Some("policy_denied")
    );
    let denial = child(&otlp, &post, "the deny decision", |s| {
        s.name == "policy.evaluate"
    })
    .await;
    assert_eq!(
        span_attr(&denial, "portcullis.policy.decision").as_deref(),
        Some("deny")
    );
    assert!(
        children(&otlp, &post).iter().all(|s| s.kind != CLIENT),
        "a denied request has no upstream call"
    );
    otlp.wait_span("CONNECT", |s| s.name.starts_with("CONNECT localhost:"))
        .await;

    // A file credential: read once (not a cache hit), then served from the cache.
    for _ in 0..2 {
        let out = curl(
            &pki,
            proxy.addr,
            Some(&agent),
            &["-H", "Authorization: Bearer pcx_filed", &url],
        )
        .await;
        assert_eq!(out.status, 200, "{out:?}");
    }
    let filed = otlp
        .wait_span("two filed reads", |s| {
            s.name == "credential.fetch"
                && span_attr(s, "portcullis.credential.cache_hit").as_deref() == Some("true")
        })
        .await;
    assert_eq!(
        span_attr(&filed, "portcullis.credential.name").as_deref(),
        Some("filed")
    );
    otlp.wait_span("the first filed read", |s| {
        s.name == "credential.fetch"
            && span_attr(s, "portcullis.credential.cache_hit").as_deref() == Some("false")
    })
    .await;

    // A credential that cannot be read: the fetch span is an error, nothing goes upstream.
    let out = curl(
        &pki,
        proxy.addr,
        Some(&agent),
        &["-H", "Authorization: Bearer pcx_missing", &url],
    )
    .await;
    assert_eq!(out.status, 503, "{out:?}");
    let failed = otlp
        .wait_span("the failed fetch", |s| {
            s.name == "credential.fetch"
                && span_attr(s, "portcullis.credential.name").as_deref() == Some("missing")
        })
        .await;
    assert!(is_error(&failed));
    let action = otlp
        .wait_span("the 503 action", |s| s.span_id == failed.parent_span_id)
        .await;
    assert_eq!(
        span_attr(&action, "error.type").as_deref(),
        Some("credential_unavailable")
    );
    assert!(children(&otlp, &action).iter().all(|s| s.kind != CLIENT));

    // An upstream nobody listens on: the client span says why it failed.
    let dead = format!("https://localhost:{}/x", free_addr().port());
    let out = curl(&pki, proxy.addr, Some(&agent), &[&dead]).await;
    assert_eq!(out.status, 502, "{out:?}");
    let refused = otlp
        .wait_span("the failed upstream call", |s| {
            s.kind == CLIENT && is_error(s)
        })
        .await;
    assert_eq!(
        span_attr(&refused, "error.type").as_deref(),
        Some("upstream_unreachable")
    );
    assert!(span_attr(&refused, "http.response.status_code").is_none());

    let dump = otlp.dump();
    assert!(
        !dump.contains(secret) && !dump.contains(file_secret),
        "a secret reached the exported spans"
    );

    // Every export names the service and this process.
    for resource in otlp.resources() {
        let attr = |k: &str| {
            resource
                .attributes
                .iter()
                .find(|kv| kv.key == k)
                .and_then(|kv| kv.value.as_ref()?.value.clone())
        };
        use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
        assert_eq!(
            attr("service.name"),
            Some(V::StringValue("portcullis-test".into()))
        );
        assert!(matches!(attr("service.version"), Some(V::StringValue(v)) if !v.is_empty()));
        assert!(
            matches!(attr("service.instance.id"), Some(V::StringValue(v)) if v.len() == 32),
            "{resource:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_servers_continue_the_trace_from_meta() {
    let pki = Pki::new();
    let server = McpSdkServer::start(&pki);
    let otlp = OtlpReceiver::start().await;
    let mut cfg = pki.base_config();
    cfg["telemetry"] = json!({"otlp_endpoint": otlp.endpoint(), "otlp_protocol": "http/protobuf"});
    let proxy = Proxy::start_with_env(
        &pki.write_config(&cfg),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let agent = pki.client("agent", "spiffe://acme.test/agents/mcp");
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let ops = json!([{
        "op": "call", "tool": "search_issues", "args": {"query": "bug"},
        "meta": {"traceparent": format!("00-{caller_trace}-{caller_span}-01"), "tracestate": "vendor=7", "progressToken": "p1"},
    }]);
    let r = mcp_sdk_client(&pki, proxy.addr, &agent, &server.url(), ops).await;
    assert_eq!(r[0]["text"], "found 3 issues for bug", "{r:?}");

    // The action span continues the trace the caller put in `_meta`.
    let call = otlp
        .wait_span("tools/call search_issues", |s| {
            s.name == "tools/call search_issues" && s.kind == SERVER
        })
        .await;
    assert_eq!(hex(&call.trace_id), caller_trace);
    assert_eq!(hex(&call.parent_span_id), caller_span);
    // The OTel MCP conventions.
    for (key, want) in [
        ("mcp.method.name", "tools/call"),
        ("gen_ai.operation.name", "execute_tool"),
        ("gen_ai.tool.name", "search_issues"),
        ("network.transport", "tcp"),
    ] {
        assert_eq!(span_attr(&call, key).as_deref(), Some(want), "{key}");
    }
    assert!(span_attr(&call, "jsonrpc.request.id").is_some());
    assert!(span_attr(&call, "mcp.protocol.version").is_some());
    assert!(span_attr(&call, "mcp.session.id").is_some());
    // Recorded in the logging phase, like the span: wait for it.
    proxy
        .wait_metric(
            "mcp_server_operation_duration_seconds_count{mcp_method_name=\"tools/call\"}",
            |n| n == 1,
        )
        .await;
    let (_, metrics) = proxy.admin_get("/metrics").await;
    for series in [
        "mcp_server_operation_duration_seconds_count{mcp_method_name=\"tools/call\"} 1",
        "mcp_client_operation_duration_seconds_count{mcp_method_name=\"tools/call\"} 1",
        "mcp_server_operation_duration_seconds_count{mcp_method_name=\"initialize\"} 1",
        "mcp_server_operation_duration_seconds_bucket{mcp_method_name=\"tools/call\",le=\"300\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} not in:\n{metrics}");
    }
    let client = child(&otlp, &call, "the upstream client span", |s| {
        s.kind == CLIENT
    })
    .await;
    assert_eq!(client.name, "POST");

    // The MCP server got the proxy's client span as the parent, in `_meta` and in the header;
    // the rest of `_meta` arrived as the caller sent it.
    let expected = format!("00-{caller_trace}-{}-01", hex(&client.span_id));
    let received = server.received();
    let m = received
        .iter()
        .find(|m| m["tool"] == "search_issues")
        .unwrap();
    assert_eq!(m["meta"]["traceparent"], expected.as_str(), "{m}");
    assert_eq!(m["meta"]["progressToken"], "p1", "{m}");
    assert_eq!(m["meta"]["tracestate"], "vendor=7", "{m}");
    assert_eq!(m["traceparent"], expected.as_str(), "{m}");
    assert_eq!(m["arguments"], json!({"query": "bug"}));
    // Messages that came without a trace context get the proxy's (a new trace) too.
    let init = received
        .iter()
        .find(|m| m["method"] == "initialize")
        .unwrap();
    let tp = init["meta"]["traceparent"].as_str().unwrap();
    assert!(
        tp.starts_with("00-") && !tp.contains(caller_trace),
        "{init}"
    );
    assert_eq!(init["traceparent"].as_str(), Some(tp));
}

/// A dead collector (nobody listens) and a hanging one (connections accepted by the kernel,
/// never answered: each export runs into its timeout): requests go through untouched either
/// way, and the spans that could not be delivered are counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_or_hanging_collector_does_not_affect_requests() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    for collector in [free_addr(), hanging.local_addr().unwrap()] {
        let mut cfg = pki.base_config();
        cfg["telemetry"] = json!({"otlp_endpoint": format!("http://{collector}"), "otlp_protocol": "http/protobuf"});
        let proxy = Proxy::start_with_env(
            &pki.write_config(&cfg),
            &[
                ("OTEL_BSP_SCHEDULE_DELAY", "50"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "300"),
            ],
        );
        let agent = pki.client("agent", "spiffe://acme.test/a");
        let url = format!("https://localhost:{}/", up.port());
        for _ in 0..5 {
            assert_eq!(
                curl(&pki, proxy.addr, Some(&agent), &[&url]).await.status,
                200
            );
        }
        drops_counted(&proxy).await;
        assert_eq!(
            proxy.metric("portcullis_otel_spans_exported_total").await,
            0
        );
    }
    drop(hanging);
}

/// A collector that answers but refuses (HTTP 503; gRPC status `UNAVAILABLE`, sent as a
/// trailers-only response): the refused spans are counted as dropped, requests are untouched,
/// and once it accepts again spans arrive.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusing_collector_is_counted_then_delivery_resumes() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    for grpc in [true, false] {
        let otlp = if grpc {
            OtlpReceiver::start_grpc().await
        } else {
            OtlpReceiver::start().await
        };
        otlp.set_refusing(true);
        let mut cfg = pki.base_config();
        cfg["telemetry"] = json!({
            "otlp_endpoint": otlp.endpoint(),
            "otlp_protocol": if grpc { "grpc" } else { "http/protobuf" },
        });
        let proxy = Proxy::start_with_env(
            &pki.write_config(&cfg),
            &[("OTEL_BSP_SCHEDULE_DELAY", "50")],
        );
        let agent = pki.client("agent", "spiffe://acme.test/agents/refused");
        let url = format!("https://localhost:{}/r", up.port());
        assert_eq!(
            curl(&pki, proxy.addr, Some(&agent), &[&url]).await.status,
            200
        );
        let warning = drops_counted(&proxy).await;
        assert!(otlp.spans().is_empty());
        let why = if grpc { "gRPC status 14" } else { "HTTP 503" };
        assert!(warning.contains(why), "grpc={grpc}: {warning}");

        otlp.set_refusing(false);
        get_as(
            &pki,
            &proxy,
            &up,
            &otlp,
            "spiffe://acme.test/agents/refused",
        )
        .await;
        proxy
            .wait_metric("portcullis_otel_spans_exported_total", |n| n > 0)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_are_exported_over_otlp_grpc() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let otlp = OtlpReceiver::start_grpc().await;
    let mut cfg = pki.base_config();
    cfg["telemetry"] = json!({"otlp_endpoint": otlp.endpoint(), "otlp_protocol": "grpc"});
    let proxy = Proxy::start_with_env(
        &pki.write_config(&cfg),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    get_as(&pki, &proxy, &up, &otlp, "spiffe://acme.test/agents/grpc").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_exports_spans_with_otlp_endpoint() {
    let otlp = OtlpReceiver::start_grpc().await;
    let dev = DevProxy::start(
        &["--otlp-endpoint", &otlp.endpoint()],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    DevProxy::run(&dev.curls()[0]).await;
    let span = otlp
        .wait_span("the demo GET", |s| s.name == "GET" && s.kind == SERVER)
        .await;
    assert_eq!(
        span_attr(&span, "portcullis.identity.spiffe_id").as_deref(),
        Some("spiffe://dev.portcullis/agent/demo")
    );
    assert_eq!(
        span_attr(&span, "portcullis.credentials").as_deref(),
        Some("demo")
    );
    // With a collector, no summary lines.
    assert!(!dev
        .stderr
        .lines()
        .iter()
        .any(|l| l.contains("portcullis::span")));
}

/// A collector reached over TLS (verified against `telemetry.otlp_ca`), on both protocols,
/// with export headers from the standard variable and from the config (a secret read from
/// the environment wins over the variable's value) and resource attributes from
/// `OTEL_RESOURCE_ATTRIBUTES`. The header's secret value appears in no log.
#[tokio::test(flavor = "multi_thread")]
async fn tls_collectors_get_the_configured_headers() {
    let pki = Pki::new();
    let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
    let key = "otlp-api-key-never-logged-77";
    for grpc in [true, false] {
        let otlp = OtlpReceiver::start_tls(grpc, pki.upstream_tls.clone()).await;
        let mut cfg = pki.base_config();
        cfg["telemetry"] = json!({
            "otlp_endpoint": otlp.endpoint(),
            "otlp_protocol": if grpc { "grpc" } else { "http/protobuf" },
            "otlp_ca": pki.path("upstream-ca.pem"),
            "otlp_headers": {"x-api-key": "env:PCX_OTLP_KEY", "x-tenant": "acme"},
        });
        let proxy = Proxy::start_with_env(
            &pki.write_config(&cfg),
            &[
                ("PCX_OTLP_KEY", key),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "x-api-key=from-env,x-env-only=e%20v",
                ),
                ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ],
        );
        get_as(&pki, &proxy, &up, &otlp, "spiffe://acme.test/agents/tls").await;
        let headers = otlp.headers();
        let h = headers.first().unwrap();
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(get("x-api-key").as_deref(), Some(key), "grpc={grpc}");
        assert_eq!(get("x-tenant").as_deref(), Some("acme"));
        assert_eq!(get("x-env-only").as_deref(), Some("e v"));
        assert!(otlp.resources().iter().all(|r| r
            .attributes
            .iter()
            .any(|kv| kv.key == "deployment.environment")));
        assert!(
            !proxy.logs.lines().iter().any(|l| l.contains(key)),
            "the export header's secret was logged"
        );
    }
}

/// `dev` without a collector: one summary line per action on stderr, tying the request to
/// the demo identity, its verdict, trace ids and steps, without the demo secret.
#[tokio::test(flavor = "multi_thread")]
async fn dev_without_a_collector_logs_a_span_summary_per_action() {
    let dev = DevProxy::start(&[], &[]);
    DevProxy::run(&dev.curls()[0]).await;
    let summary = dev.stderr.wait_for("the GET's span summary", |l| {
        l.contains("portcullis::span") && l.contains("GET https://localhost:")
    });
    for part in [
        "/hello -> 200",
        "spiffe://dev.portcullis/agent/demo allow",
        "credentials=demo",
        " trace=",
        "policy.evaluate ",
        "credential.fetch demo ",
        "upstream GET ",
    ] {
        assert!(summary.contains(part), "{part:?} missing in {summary}");
    }
    dev.stderr.wait_for("the CONNECT's span summary", |l| {
        l.contains("portcullis::span") && l.contains("CONNECT localhost:")
    });
    let secret = std::fs::read_to_string(dev.dir.path().join("dev/demo-token")).unwrap();
    assert!(!dev.stderr.lines().iter().any(|l| l.contains(secret.trim())));
}

/// A decision-log output that stops taking lines (a reader that never reads: a stalled pipe,
/// like a full disk) never holds up a request: lines beyond `telemetry.decision_log_buffer`
/// are dropped and counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_decision_log_drops_and_counts_instead_of_blocking() {
    use std::os::unix::fs::OpenOptionsExt;
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("decisions.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // Opened for reading (non-blocking, so the proxy's open for writing succeeds), never read.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o4000) // O_NONBLOCK
        .open(&fifo)
        .unwrap();
    let path = fifo.display().to_string();
    let s = Harness::builder()
        .config(move |c| {
            c["telemetry"] = serde_json::json!({"decision_log": path, "decision_log_buffer": 16384})
        })
        .start()
        .await;
    let target = format!("localhost:{}", s.up.port());
    let mut tunnel = raw_tunnel(&s.pki, s.proxy.addr, &s.agent, &target).await;
    let started = std::time::Instant::now();
    for i in 0..600 {
        let req = format!("GET /n{i} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        tunnel.write_all(req.as_bytes()).await.unwrap();
        let out = read_response(&mut tunnel).await;
        assert_eq!(out.status, 200, "request {i}: {out:?}");
    }
    let dropped = s
        .proxy
        .metric("portcullis_decision_log_dropped_total")
        .await;
    assert!(
        dropped > 0,
        "lines beyond the pipe and the buffer are dropped"
    );
    eprintln!(
        "600 requests in {:?}; {dropped} decision lines dropped",
        started.elapsed()
    );
}
