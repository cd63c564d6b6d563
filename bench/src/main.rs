//! `portcullis-bench`: starts the built-in upstream and the real `portcullis` binary with a
//! generated PKI and config, runs the selected scenarios back to back in one invocation (so
//! ratios are fair), and reports throughput, latency and the proxy's own CPU and memory.
//! Every run is bounded: warm-up + duration per scenario, a timeout on every request.
//! `--soak DURATION` instead drives one full-pipeline proxy at a fixed rate and watches its
//! RSS, fds and tasks for growth (see `soak`).
#![forbid(unsafe_code)]

mod client;
mod floor;
mod load;
mod otlp_sink;
mod peers;
mod procstat;
mod progress;
mod proxy_proc;
mod report;
mod scenario;
mod setup;
mod soak;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser;

use crate::client::Dialer;
use crate::load::Plan;
use crate::progress::Progress;
use crate::proxy_proc::ProxyProcess;
use crate::report::{Machine, ProxyInfo, Report, ScenarioResult, Settings};
use crate::scenario::{Profile, Route};

/// Extra attempts per scenario under `--max-other`, and the wait for a quiet machine.
const QUIET_RETRIES: usize = 3;
const QUIET_WAIT: Duration = Duration::from_secs(60);

/// Load-test harness for the Portcullis egress proxy.
#[derive(Parser, Debug)]
#[command(name = "portcullis-bench", version)]
struct Args {
    /// Comma-separated scenarios (or "all"); baselines they are compared with are added.
    #[arg(long, default_value = scenario::DEFAULT)]
    scenarios: String,
    /// Concurrent connections (closed-loop workers) per scenario.
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: usize,
    /// Run the whole scenario list this many times and report, per scenario, the round with
    /// the median throughput (steadier ratios on a machine with other load).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// On a shared machine: before each scenario wait (up to 60 s) until other processes keep
    /// fewer than this many cores busy, and measure a scenario again (up to 3 times) when they
    /// kept more busy during it; the least disturbed attempt is reported.
    #[arg(long)]
    max_other: Option<f64>,
    /// Measured time per scenario (e.g. 5s, 500ms, 1m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Warm-up per scenario, excluded from the statistics.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Response body size of the large scenarios (e.g. 1MiB, 64KiB, 1000).
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    body_size: u64,
    /// Bound on one request, connection set-up included.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Open loop at this many requests per second in total (spread over the connections;
    /// latency counted from each request's scheduled start, correcting for coordinated
    /// omission). Default: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// The portcullis binary [default: `portcullis` next to this executable].
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// Also write the report as JSON to this file (partial results too).
    #[arg(long)]
    json: Option<PathBuf>,
    /// CI mode: ~1 s per scenario, 2 connections; fails unless every scenario ran error-free.
    #[arg(long)]
    smoke: bool,
    /// Keep the proxy's access log on (one log line per request); off by default, per the
    /// budget's "telemetry off" for the bare pipeline.
    #[arg(long)]
    access_log: bool,
    /// Speak h2 inside the tunnel (and directly to the upstream) instead of HTTP/1.1; still one
    /// request in flight per connection.
    #[arg(long)]
    http2: bool,
    /// Leave the proxy's decision log at its default (stdout, discarded by the bench) instead of
    /// `telemetry.decision_log: off`.
    #[arg(long)]
    decision_log: bool,
    /// Let clients resume TLS sessions (default: every new connection is a full handshake).
    #[arg(long)]
    tls_resumption: bool,
    /// Use this upstream (127.0.0.1:PORT, serving /small, /bytes/N and /mcp over TLS with a
    /// certificate for 127.0.0.1 and localhost) instead of the built-in one.
    #[arg(long, requires = "upstream_ca")]
    upstream: Option<SocketAddr>,
    /// CA certificate (PEM) of --upstream.
    #[arg(long)]
    upstream_ca: Option<PathBuf>,
    /// The built-in upstream offers only HTTP/1.1 (default: h2 and HTTP/1.1 via ALPN), so the
    /// proxy opens one upstream connection per concurrent request instead of multiplexing.
    #[arg(long)]
    upstream_http1: bool,
    /// `telemetry.sampling_ratio` of the `mitm-otel` proxy (1.0: every action's spans).
    #[arg(long, default_value_t = 1.0)]
    otel_sampling: f64,
    /// Keep the generated PKI and config dir and print its path.
    #[arg(long)]
    keep_dir: bool,
    /// Also run through peer proxies (mitmdump, squid) when they are on PATH.
    #[arg(long)]
    peers: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Soak instead of scenarios: the full pipeline (policy, credentials through Redis, MCP,
    /// decision log, span export) at `--rate` (default 200/s) open loop for this long (e.g.
    /// 20s, 10m, 1h), sampling the proxy's RSS, fds, threads and tokio tasks; fails on any
    /// error or on growth after the warm-up.
    #[arg(long, value_parser = parse_duration)]
    soak: Option<Duration>,
    /// Soak: time between samples.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    soak_interval: Duration,
    /// Soak: most requests in flight; a request due while all are busy starts late.
    #[arg(long, default_value_t = 64)]
    soak_inflight: usize,
    /// Soak: idle keep-alive connections kept for reuse.
    #[arg(long, default_value_t = 8)]
    soak_connections: usize,
    /// Soak: requests per connection before it is closed and a new one opened.
    #[arg(long, default_value_t = 100)]
    soak_requests_per_connection: u32,
    /// Soak: the samples as CSV [default: OUT_DIR/soak.csv].
    #[arg(long)]
    soak_csv: Option<PathBuf>,
    /// Soak: the chart as PNG [default: OUT_DIR/soak.png].
    #[arg(long)]
    soak_png: Option<PathBuf>,
    /// Where the soak writes its CSV and PNG unless given their own paths.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
}

/// The soak's default request rate (requests per second).
const SOAK_RATE: f64 = 200.0;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.list {
        list_scenarios();
        return ExitCode::SUCCESS;
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        eprintln!("portcullis-bench: --rate must be a positive number of requests per second");
        return ExitCode::from(2);
    }
    if let Some(duration) = args.soak {
        return soak(&args, duration).await;
    }
    if args.smoke {
        args.connections = 2;
        args.duration = Duration::from_secs(1);
        args.warmup = Duration::from_millis(200);
        args.rounds = 1;
    }
    if args.connections == 0 || args.duration.is_zero() || args.rounds == 0 {
        eprintln!("portcullis-bench: --connections, --duration and --rounds must be positive");
        return ExitCode::from(2);
    }
    if let Some(u) = args
        .upstream
        .filter(|u| u.ip() != std::net::Ipv4Addr::LOCALHOST)
    {
        // The CONNECT targets are 127.0.0.1 (intercepted) and localhost (passthrough).
        eprintln!("portcullis-bench: --upstream {u}: must be 127.0.0.1:PORT");
        return ExitCode::from(2);
    }
    let list = match args.peers {
        true => format!("{},{}", args.scenarios, scenario::PEERS),
        false => args.scenarios.clone(),
    };
    let selected = match scenario::select(&list) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("portcullis-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let needs_proxy = selected.iter().any(|s| !s.stub && s.route != Route::Direct);
    let bin = if needs_proxy {
        match proxy_proc::resolve_bin(args.proxy_bin.as_deref()) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("portcullis-bench: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };

    let mut report = Report {
        tool: "portcullis-bench",
        version: env!("CARGO_PKG_VERSION"),
        date: report::now_rfc3339(),
        machine: Machine::detect(),
        settings: Settings {
            connections: args.connections,
            rounds: args.rounds,
            max_other: args.max_other,
            warmup_s: args.warmup.as_secs_f64(),
            duration_s: args.duration.as_secs_f64(),
            body_bytes: args.body_size,
            smoke: args.smoke,
            access_log: args.access_log,
            decision_log: args.decision_log,
            tls_resumption: args.tls_resumption,
            open_loop_rate: args.rate,
            client_protocol: if args.http2 { "h2" } else { "http/1.1" },
            upstream_alpn: if args.upstream_http1 {
                "http/1.1"
            } else {
                "h2,http/1.1"
            },
        },
        proxy: None,
        scenarios: Vec::new(),
        budget: Vec::new(),
        targets: Vec::new(),
        crypto_floor: None,
        peers: Vec::new(),
        notes: Vec::new(),
        error: None,
    };
    if !args.smoke && selected.iter().any(|s| s.name == "large") {
        // Before the proxy starts, on a machine the bench has to itself.
        report.crypto_floor = Some(floor::measure());
    }
    if let Err(e) = run(&args, &selected, bin, &mut report).await {
        report.error = Some(format!("{e:#}"));
    }
    if let Some(before) = report.crypto_floor {
        // Again once the proxies are gone; the faster of the two judges `large`.
        report.crypto_floor = Some(floor::stricter(before, floor::measure()));
    }
    report.finish();
    report.print_table();
    if let Some(path) = &args.json {
        if let Err(e) = report.write_json(path) {
            eprintln!("portcullis-bench: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(e) = &report.error {
        eprintln!("portcullis-bench: error: {e}");
        return ExitCode::FAILURE;
    }
    let failed: Vec<&str> = report
        .scenarios
        .iter()
        .filter(|s| s.status == "failed" || (s.status == "ok" && s.requests == 0))
        .map(|s| s.name)
        .collect();
    if !failed.is_empty() {
        eprintln!(
            "portcullis-bench: scenarios with errors: {}",
            failed.join(", ")
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `--soak`: check the flags, run, and exit 0 only when the soak passed.
async fn soak(args: &Args, duration: Duration) -> ExitCode {
    if args.soak_interval.is_zero()
        || duration < args.soak_interval
        || args.soak_inflight == 0
        || args.soak_connections == 0
        || args.soak_requests_per_connection == 0
    {
        eprintln!(
            "portcullis-bench: --soak must be at least --soak-interval (> 0), and --soak-inflight, \
             --soak-connections and --soak-requests-per-connection positive"
        );
        return ExitCode::from(2);
    }
    let bin = match proxy_proc::resolve_bin(args.proxy_bin.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("portcullis-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let options = soak::Options {
        duration,
        interval: args.soak_interval,
        plan: soak::Plan {
            rate: args.rate.unwrap_or(SOAK_RATE),
            inflight: args.soak_inflight,
            connections: args.soak_connections,
            requests_per_connection: args.soak_requests_per_connection,
            request_timeout: args.request_timeout,
        },
        bin,
        csv: args
            .soak_csv
            .clone()
            .unwrap_or_else(|| args.out_dir.join("soak.csv")),
        png: args
            .soak_png
            .clone()
            .unwrap_or_else(|| args.out_dir.join("soak.png")),
        json: args.json.clone(),
        keep_dir: args.keep_dir,
    };
    match soak::run(&options).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("portcullis-bench: soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set up, run every selected scenario, tear down. Rows measured before an error are still put
/// in `report`.
async fn run(
    args: &Args,
    selected: &[&'static scenario::Scenario],
    bin: Option<PathBuf>,
    report: &mut Report,
) -> Result<()> {
    let mut progress = Progress::new();

    let setup = setup::Setup::generate(
        args.upstream_ca.as_deref(),
        args.keep_dir,
        !args.upstream_http1,
    )?;
    if args.decision_log {
        setup::write_config(&setup.config, false)?;
    }
    if args.keep_dir {
        progress.note(&format!("PKI and config kept in {}", setup.dir.display()));
    }
    let _upstream;
    let upstream_addr = match args.upstream {
        Some(addr) => addr,
        None => {
            let u = upstream::Upstream::start(setup.upstream_tls.clone()).await?;
            let addr = u.addr;
            _upstream = u;
            addr
        }
    };
    let log_filter = if args.access_log {
        "info"
    } else {
        "info,portcullis::access=off"
    };
    let mut proxy = match &bin {
        Some(bin) => {
            let p = match ProxyProcess::start(bin, &setup.config, log_filter) {
                Err(e) if format!("{e:#}").contains("telemetry") => {
                    let note = "this proxy does not accept telemetry.decision_log: \
                                its decision log stays at the proxy's default";
                    progress.note(note);
                    report.notes.push(note.into());
                    setup::write_config(&setup.config, false)?;
                    ProxyProcess::start(bin, &setup.config, log_filter)
                }
                other => other,
            }
            .context("starting the proxy")?;
            report.proxy = Some(ProxyInfo {
                bin: bin.display().to_string(),
                pid: p.pid,
                glibc_tunables: proxy_proc::glibc_tunables(),
                rss_peak_mib: None,
            });
            Some(p)
        }
        None => None,
    };
    let dialer = |proxy: Option<&ProxyProcess>, headers| -> Result<Arc<Dialer>> {
        Ok(Arc::new(Dialer {
            tls: setup.client_tls(args.tls_resumption, args.http2)?,
            proxy: proxy.map(|p| p.addr),
            proxy_tls: true,
            upstream: upstream_addr,
            body_bytes: args.body_size,
            http2: args.http2,
            headers,
        }))
    };
    let bare = dialer(proxy.as_ref(), Vec::new())?;
    let mut targets = vec![Target {
        profile: Profile::Bare,
        dialer: bare,
        proxy: proxy.take(),
        redis: None,
    }];
    // The other profiles each get their own proxy process (and `full` an OTLP sink).
    let mut profiles: Vec<Profile> = selected
        .iter()
        .map(|s| s.profile)
        .filter(|p| *p != Profile::Bare)
        .collect();
    profiles.dedup();
    let exports = [
        Profile::Full,
        Profile::FullDelegated,
        Profile::FullShadow,
        Profile::Otel,
    ];
    let sink = match profiles.iter().any(|p| exports.contains(p)) {
        true => Some(otlp_sink::OtlpSink::start().await?),
        false => None,
    };
    for profile in profiles {
        if profile.is_peer() {
            match start_peer(profile, &setup, args, upstream_addr).await {
                Ok(Some(target)) => {
                    let note = format!(
                        "{} running as pid {}",
                        profile.name(),
                        target.proxy.as_ref().map_or(0, |p| p.pid)
                    );
                    report.peers.push(note);
                    targets.push(target);
                }
                Ok(None) => {
                    let note = format!(
                        "{} not installed: its scenarios are skipped",
                        profile.name()
                    );
                    progress.note(&format!("peers: {note}"));
                    report.peers.push(note);
                }
                Err(e) => {
                    let note = format!("{} failed to start: {e:#}", profile.name());
                    progress.note(&format!("peers: {note}"));
                    report.peers.push(note);
                }
            }
            continue;
        }
        let Some(bin) = &bin else { break };
        let otlp = sink.as_ref().map_or(upstream_addr, |s| s.addr);
        let (config, redis, key) = match profile {
            Profile::Limited => {
                let redis = soak::redis::RedisServer::start()?;
                let config = setup.write_limited(&redis.url())?;
                (
                    config,
                    Some(redis),
                    soak::base64(&soak::random_bytes::<32>()?),
                )
            }
            _ => (
                setup.write_profile(profile, otlp, args.otel_sampling)?,
                None,
                String::new(),
            ),
        };
        let env = [(setup::SOAK_ENV[1], key.as_str())];
        let p = ProxyProcess::start_with_env(bin, &config, log_filter, &env)
            .with_context(|| format!("starting the {} proxy", profile.name()))?;
        let bearer = (
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static(concat!("Bearer ", "pcx_bench")),
        );
        let headers = match profile {
            Profile::Full | Profile::FullShadow => vec![bearer],
            Profile::FullDelegated => vec![
                bearer,
                (
                    http::HeaderName::from_static("x-portcullis-on-behalf-of"),
                    http::HeaderValue::from_str(setup.delegation_token()?.trim())?,
                ),
            ],
            _ => Vec::new(),
        };
        targets.push(Target {
            profile,
            dialer: dialer(Some(&p), headers)?,
            proxy: Some(p),
            redis,
        });
    }
    let plan = Plan {
        connections: args.connections,
        warmup: args.warmup,
        duration: args.duration,
        request_timeout: args.request_timeout,
        rate: args.rate,
    };

    let (rows, outcome) = measure(args, selected, &mut targets, plan, &mut progress).await;
    report.scenarios = rows;
    // Show that the limit really went to Redis: the commands it processed.
    for t in &targets {
        let Some(redis) = &t.redis else { continue };
        let stats = redis.info("stats").await.unwrap_or_default();
        let commands = stats
            .lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .unwrap_or("?")
            .trim()
            .to_owned();
        report.peers.push(format!(
            "{}: redis-server pid {} processed {commands} commands",
            t.profile.name(),
            redis.pid
        ));
    }
    for t in targets.iter().filter(|t| {
        matches!(
            t.profile,
            Profile::Full | Profile::FullDelegated | Profile::FullShadow | Profile::Otel
        )
    }) {
        let Some(p) = &t.proxy else { continue };
        let metric = |name: &'static str| proxy_proc::admin_metric(p.admin, name);
        let (exported, dropped) = (
            metric("portcullis_otel_spans_exported_total").await,
            metric("portcullis_otel_spans_dropped_total").await,
        );
        let show = |n: Option<u64>| n.map_or("?".to_owned(), |n| n.to_string());
        report.notes.push(format!(
            "{}: the proxy reported {} spans exported and {} dropped",
            t.profile.name(),
            show(exported),
            show(dropped)
        ));
    }
    if let Some(sink) = &sink {
        let ordering = std::sync::atomic::Ordering::Relaxed;
        report.notes.push(format!(
            "the OTLP sink received {} export requests ({} KiB); mitm-otel sampling ratio {}",
            sink.requests.load(ordering),
            sink.bytes.load(ordering) / 1024,
            args.otel_sampling
        ));
    }

    if let (Some(p), Some(info)) = (&targets[0].proxy, &mut report.proxy) {
        info.rss_peak_mib = procstat::mem(p.pid).ok().map(|m| m.hwm_kib as f64 / 1024.0);
    }
    for t in &mut targets {
        if let Some(p) = &mut t.proxy {
            p.stop();
        }
    }
    outcome
}

/// Start a peer proxy if it is installed (`Ok(None)` when it is not).
async fn start_peer(
    profile: Profile,
    setup: &setup::Setup,
    args: &Args,
    upstream: SocketAddr,
) -> Result<Option<Target>> {
    let (proc, tls) = match profile {
        Profile::Mitmproxy => {
            let Some(bin) = peers::find("mitmdump") else {
                return Ok(None);
            };
            let ca = setup.dir.join("upstream-ca.pem");
            let (proc, mitm_ca) = peers::mitmdump(&bin, &setup.dir, &ca).await?;
            let tls = setup.client_tls_trusting(args.tls_resumption, args.http2, &mitm_ca)?;
            (proc, tls)
        }
        Profile::Squid => {
            let Some(bin) = peers::find("squid") else {
                return Ok(None);
            };
            let proc = peers::squid(&bin, &setup.dir, upstream.port()).await?;
            (proc, setup.client_tls(args.tls_resumption, args.http2)?)
        }
        _ => return Ok(None),
    };
    let dialer = Arc::new(Dialer {
        tls,
        proxy: Some(proc.addr),
        proxy_tls: false,
        upstream,
        body_bytes: args.body_size,
        http2: args.http2,
        headers: Vec::new(),
    });
    Ok(Some(Target {
        profile,
        dialer,
        proxy: Some(proc),
        redis: None,
    }))
}

/// A proxy configuration under test: its process and the dialer that reaches it.
struct Target {
    profile: Profile,
    dialer: Arc<Dialer>,
    proxy: Option<ProxyProcess>,
    /// The `ratelimit` profile's Redis, kept running while its proxy is.
    redis: Option<soak::redis::RedisServer>,
}

/// Run every selected scenario `--rounds` times; one row per scenario (see
/// [`report::median_round`]) and why the run stopped early, if it did. Rows measured before a
/// failure are kept.
async fn measure(
    args: &Args,
    selected: &[&'static scenario::Scenario],
    targets: &mut [Target],
    plan: Plan,
    progress: &mut Progress,
) -> (Vec<ScenarioResult>, Result<()>) {
    // rounds[i] holds every round's result of selected[i].
    let mut rounds: Vec<Vec<ScenarioResult>> = vec![Vec::new(); selected.len()];
    let mut outcome = Ok(());
    'rounds: for round in 0..args.rounds {
        if args.rounds > 1 {
            progress.note(&format!("round {}/{}", round + 1, args.rounds));
        }
        for (sc, results) in selected.iter().zip(&mut rounds) {
            if sc.stub {
                if round == 0 {
                    progress.note(&format!("{}: not yet available", sc.name));
                    results.push(ScenarioResult::stub(sc));
                }
                continue;
            }
            let Some(target) = targets.iter_mut().find(|t| t.profile == sc.profile) else {
                if sc.profile.is_peer() {
                    // Not installed or failed to start: the report's peers say which.
                    if round == 0 {
                        results.push(ScenarioResult::skipped(sc));
                    }
                    continue;
                }
                outcome = Err(anyhow::anyhow!(
                    "scenario {}: no proxy for its profile",
                    sc.name
                ));
                break 'rounds;
            };
            let (dialer, mut proxy) = (&target.dialer, target.proxy.as_mut());
            // `large` is judged against the crypto floor of the same minute: a shared host's
            // speed drifts by tens of per cent between the start of a run and its end.
            let floor_before = (sc.name == "large" && !args.smoke).then(floor::measure);
            // With --max-other, a scenario disturbed by other processes is measured again
            // (bounded), keeping the least disturbed attempt.
            let mut best: Option<ScenarioResult> = None;
            for _attempt in 0..=args.max_other.map_or(0, |_| QUIET_RETRIES) {
                if let Some(max) = args.max_other {
                    let pid = proxy.as_deref().map(|p| p.pid);
                    if !load::wait_quiet(max, pid, QUIET_WAIT).await {
                        progress.note(&format!(
                            "{}: still more than {max} other cores busy after {QUIET_WAIT:?}; measuring anyway",
                            sc.name
                        ));
                    }
                }
                let m = match load::run(sc, dialer, plan, proxy.as_deref_mut(), progress).await {
                    Ok(m) => m,
                    Err(e) => {
                        results.extend(best);
                        outcome = Err(e.context(format!("scenario {}", sc.name)));
                        break 'rounds;
                    }
                };
                let r = ScenarioResult::from_measured(sc, plan.connections, &m);
                let quiet = args
                    .max_other
                    .is_none_or(|max| r.other_cores.is_some_and(|o| o <= max));
                if best
                    .as_ref()
                    .is_none_or(|b| r.other_cores < b.other_cores || r.status == "failed")
                {
                    best = Some(r);
                }
                if let Some(fatal) = m.fatal {
                    results.extend(best);
                    outcome = Err(anyhow::anyhow!("scenario {}: {fatal}", sc.name));
                    break 'rounds;
                }
                if quiet {
                    break;
                }
            }
            if let (Some(before), Some(row)) = (floor_before, best.as_mut()) {
                let floor = floor::stricter(before, floor::measure());
                row.crypto_floor_us_per_mib = Some(floor.download_us_per_mib);
            }
            results.extend(best);
        }
    }
    let rows = rounds
        .into_iter()
        .filter_map(report::median_round)
        .collect();
    (rows, outcome)
}

#[allow(clippy::print_stdout)] // `--list` output is the product of that invocation
fn list_scenarios() {
    for s in scenario::ALL {
        let base = s.baseline.map(|b| format!(" (vs {b})")).unwrap_or_default();
        let stub = if s.stub { " [not yet available]" } else { "" };
        println!("{:<17} {}{base}{stub}", s.name, s.about);
    }
}

/// `250ms`, `5s`, `1.5s`, `2m`, `1h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s or 1m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// `1048576`, `64KiB`, `1MiB` (also `K`/`M`/`KB`/`MB`, all binary).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 1MiB or 65536"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        _ => return Err(format!("{s:?}: unknown size unit")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}
