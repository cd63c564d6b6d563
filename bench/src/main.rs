//! `portcullis-bench`: starts the built-in upstream and the real `portcullis` binary with a
//! generated PKI and config, runs the selected scenarios back to back in one invocation (so
//! ratios are fair), and reports throughput, latency and the proxy's own CPU and memory.
//! Every run is bounded: warm-up + duration per scenario, a timeout on every request.
#![forbid(unsafe_code)]

mod client;
mod load;
mod otlp_sink;
mod procstat;
mod progress;
mod proxy_proc;
mod report;
mod scenario;
mod setup;
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
use crate::scenario::Route;

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
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.list {
        list_scenarios();
        return ExitCode::SUCCESS;
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
    let selected = match scenario::select(&args.scenarios) {
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
        peers: Vec::new(),
        notes: Vec::new(),
        error: None,
    };
    if let Err(e) = run(&args, &selected, bin, &mut report).await {
        report.error = Some(format!("{e:#}"));
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

/// Set up, run every selected scenario, tear down. Rows measured before an error are still put
/// in `report`.
async fn run(
    args: &Args,
    selected: &[&'static scenario::Scenario],
    bin: Option<PathBuf>,
    report: &mut Report,
) -> Result<()> {
    let mut progress = Progress::new();
    if args.peers {
        for peer in ["mitmdump", "squid"] {
            let note = match on_path(peer) {
                Some(p) => format!(
                    "{peer} found at {}, but peer runs are not implemented yet: skipped",
                    p.display()
                ),
                None => format!("{peer} not found on PATH: skipped"),
            };
            progress.note(&format!("peers: {note}"));
            report.peers.push(note);
        }
    }

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
                rss_peak_mib: None,
            });
            Some(p)
        }
        None => None,
    };
    let dialer = Arc::new(Dialer {
        tls: setup.client_tls(args.tls_resumption, args.http2)?,
        proxy: proxy.as_ref().map(|p| p.addr),
        upstream: upstream_addr,
        body_bytes: args.body_size,
        http2: args.http2,
    });
    // `mitm-otel`: a second proxy, the same config plus OTLP export to a sink in the bench.
    let mut otel = match &bin {
        Some(bin) if selected.iter().any(|s| s.otel && !s.stub) => {
            let sink = otlp_sink::OtlpSink::start().await?;
            let config = setup.dir.join("config-otel.yaml");
            setup::write_otel_config(&config, &sink.endpoint(), args.otel_sampling)?;
            let p = ProxyProcess::start(bin, &config, log_filter)
                .context("starting the exporting proxy")?;
            let d = Arc::new(Dialer {
                tls: setup.client_tls(args.tls_resumption, args.http2)?,
                proxy: Some(p.addr),
                upstream: upstream_addr,
                body_bytes: args.body_size,
                http2: args.http2,
            });
            Some((d, p, sink))
        }
        _ => None,
    };
    let plan = Plan {
        connections: args.connections,
        warmup: args.warmup,
        duration: args.duration,
        request_timeout: args.request_timeout,
    };

    let (rows, outcome) = measure(
        args,
        selected,
        &dialer,
        plan,
        proxy.as_mut(),
        otel.as_mut().map(|(d, p, _)| (&*d, p)),
        &mut progress,
    )
    .await;
    report.scenarios = rows;
    if let Some((_, p, sink)) = &mut otel {
        let metric = |name: &'static str| proxy_proc::admin_metric(p.admin, name);
        let (exported, dropped) = (
            metric("portcullis_otel_spans_exported_total").await,
            metric("portcullis_otel_spans_dropped_total").await,
        );
        report.notes.push(format!(
            "mitm-otel (sampling ratio {}): the exporting proxy reported {} spans exported and {} dropped; the sink received {} export requests ({} KiB)",
            args.otel_sampling,
            exported.map_or("?".into(), |n| n.to_string()),
            dropped.map_or("?".into(), |n| n.to_string()),
            sink.requests.load(std::sync::atomic::Ordering::Relaxed),
            sink.bytes.load(std::sync::atomic::Ordering::Relaxed) / 1024,
        ));
        p.stop();
    }

    if let (Some(p), Some(info)) = (&proxy, &mut report.proxy) {
        info.rss_peak_mib = procstat::mem(p.pid).ok().map(|m| m.hwm_kib as f64 / 1024.0);
    }
    if let Some(p) = &mut proxy {
        p.stop();
    }
    outcome
}

/// Run every selected scenario `--rounds` times; one row per scenario (see
/// [`report::median_round`]) and why the run stopped early, if it did. Rows measured before a
/// failure are kept.
async fn measure(
    args: &Args,
    selected: &[&'static scenario::Scenario],
    dialer: &Arc<Dialer>,
    plan: Plan,
    mut proxy: Option<&mut ProxyProcess>,
    mut otel: Option<(&Arc<Dialer>, &mut ProxyProcess)>,
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
            // With --max-other, a scenario disturbed by other processes is measured again
            // (bounded), keeping the least disturbed attempt.
            let mut best: Option<ScenarioResult> = None;
            for _attempt in 0..=args.max_other.map_or(0, |_| QUIET_RETRIES) {
                let (dialer, proxy) = match (sc.otel, otel.as_mut()) {
                    (true, Some((d, p))) => (*d, Some(&mut **p)),
                    _ => (dialer, proxy.as_deref_mut()),
                };
                if let Some(max) = args.max_other {
                    let pid = proxy.as_deref().map(|p| p.pid);
                    if !load::wait_quiet(max, pid, QUIET_WAIT).await {
                        progress.note(&format!(
                            "{}: still more than {max} other cores busy after {QUIET_WAIT:?}; measuring anyway",
                            sc.name
                        ));
                    }
                }
                let m = match load::run(sc, dialer, plan, proxy, progress).await {
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

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// `250ms`, `5s`, `1.5s`, `2m`.
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
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
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
        assert!(parse_duration("5h").is_err());
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
