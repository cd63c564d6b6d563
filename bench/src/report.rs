//! The report: one row per scenario (JSON and a table on stdout), the ratios between runs of the
//! same invocation, and the DESIGN.md performance-budget lines judged against them.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::floor::CryptoFloor;
use crate::load::Measured;
use crate::scenario::{ConnMode, Route, Scenario};

#[derive(Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub date: String,
    pub machine: Machine,
    pub settings: Settings,
    pub proxy: Option<ProxyInfo>,
    pub scenarios: Vec<ScenarioResult>,
    pub budget: Vec<BudgetLine>,
    /// The Performance II targets (issue 23), as ratios within this run.
    pub targets: Vec<BudgetLine>,
    /// What AES-GCM alone costs per MiB here (measured when `large` runs).
    pub crypto_floor: Option<CryptoFloor>,
    pub peers: Vec<String>,
    /// Anything about how the proxy was run that a reader of the numbers should know.
    pub notes: Vec<String>,
    /// Why the run stopped early, if it did.
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub note: &'static str,
}

#[derive(Serialize)]
pub struct Settings {
    pub connections: usize,
    pub rounds: usize,
    /// `--max-other`: disturbed scenarios were measured again.
    pub max_other: Option<f64>,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub body_bytes: u64,
    pub smoke: bool,
    pub access_log: bool,
    pub decision_log: bool,
    pub tls_resumption: bool,
    /// What the load client speaks on its innermost connection.
    pub client_protocol: &'static str,
    /// What the built-in upstream offers in ALPN (so what the proxy's upstream leg speaks).
    pub upstream_alpn: &'static str,
    /// `--rate`: open loop at this total rate; `None`: closed loop.
    pub open_loop_rate: Option<f64>,
}

#[derive(Serialize)]
pub struct ProxyInfo {
    pub bin: String,
    pub pid: u32,
    /// `GLIBC_TUNABLES` the proxies ran with (see `proxy_proc::IMAGE_GLIBC_TUNABLES`).
    pub glibc_tunables: String,
    /// VmHWM at the end of the run: the peak over every scenario.
    pub rss_peak_mib: Option<f64>,
}

#[derive(Serialize, Clone)]
pub struct ScenarioResult {
    pub name: &'static str,
    pub about: &'static str,
    /// `ok`, `failed`, or `not yet available`.
    pub status: &'static str,
    pub baseline: Option<&'static str>,
    pub connections: usize,
    pub new_connection_per_request: bool,
    pub requests: u64,
    pub errors: u64,
    pub warmup_errors: u64,
    pub rps: f64,
    pub throughput_mib_s: f64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Proxy CPU (user + system) per request in the measured window; null for direct runs.
    pub cpu_us_per_req: Option<f64>,
    /// How many of the machine's cores the proxy kept busy.
    pub proxy_cores: Option<f64>,
    /// This process (load generator + built-in upstream) CPU per request.
    pub bench_cpu_us_per_req: Option<f64>,
    /// Cores kept busy by processes other than the proxy and the bench during the window
    /// (other users of a shared machine); above ~0.1 the numbers are disturbed.
    pub other_cores: Option<f64>,
    /// Largest proxy VmRSS sampled during the scenario; null for direct runs.
    pub rss_mib: Option<f64>,
    pub ratio_to_direct: Option<f64>,
    pub ratio_to_mitm: Option<f64>,
    pub first_error: Option<String>,
    /// Throughput of every round run; the row is the median one (a failed round wins).
    pub round_rps: Vec<f64>,
    /// `large` only: the crypto floor (µs per downloaded MiB) measured just before and just
    /// after this round of it, the faster of the two: the row is judged against the
    /// machine's speed of that minute, not of the start of the run.
    pub crypto_floor_us_per_mib: Option<f64>,
    #[serde(skip)]
    route: Option<Route>,
}

const MIB: f64 = 1024.0 * 1024.0;
/// "other" cores above this disturb the numbers noticeably.
const BUSY_CORES: f64 = 0.15;

impl ScenarioResult {
    pub fn from_measured(sc: &Scenario, connections: usize, m: &Measured) -> ScenarioResult {
        let secs = m.window.as_secs_f64().max(1e-9);
        let proxied = sc.route != Route::Direct;
        let per_req = |us: Option<u64>| {
            us.filter(|_| m.requests > 0)
                .map(|us| us as f64 / m.requests as f64)
        };
        let q = |p: f64| {
            if m.hist.is_empty() {
                0
            } else {
                m.hist.value_at_quantile(p)
            }
        };
        ScenarioResult {
            name: sc.name,
            about: sc.about,
            status: if m.fatal.is_some() || m.errors + m.warmup_errors > 0 {
                "failed"
            } else {
                "ok"
            },
            baseline: sc.baseline,
            connections,
            new_connection_per_request: sc.mode == ConnMode::PerRequest,
            requests: m.requests,
            errors: m.errors,
            warmup_errors: m.warmup_errors,
            rps: m.requests as f64 / secs,
            throughput_mib_s: m.bytes as f64 / secs / MIB,
            mean_us: m.hist.mean(),
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: m.hist.max(),
            cpu_us_per_req: per_req(m.proxy_cpu_us).filter(|_| proxied),
            proxy_cores: m
                .proxy_cpu_us
                .filter(|_| proxied)
                .map(|us| us as f64 / 1e6 / secs),
            bench_cpu_us_per_req: per_req(m.bench_cpu_us),
            other_cores: m.system_cpu_us.map(|sys| {
                let own = m.proxy_cpu_us.unwrap_or(0) + m.bench_cpu_us.unwrap_or(0);
                sys.saturating_sub(own) as f64 / 1e6 / secs
            }),
            rss_mib: m
                .proxy_rss_kib
                .filter(|_| proxied)
                .map(|k| k as f64 / 1024.0),
            ratio_to_direct: None,
            ratio_to_mitm: None,
            first_error: m.fatal.clone().or_else(|| m.first_error.clone()),
            round_rps: Vec::new(),
            crypto_floor_us_per_mib: None,
            route: Some(sc.route),
        }
    }

    /// A peer scenario whose peer is not installed (or did not start).
    pub fn skipped(sc: &Scenario) -> ScenarioResult {
        ScenarioResult {
            status: "skipped",
            ..ScenarioResult::stub(sc)
        }
    }

    /// A named scenario that cannot be measured yet.
    pub fn stub(sc: &Scenario) -> ScenarioResult {
        ScenarioResult {
            name: sc.name,
            about: sc.about,
            status: "not yet available",
            baseline: sc.baseline,
            connections: 0,
            new_connection_per_request: sc.mode == ConnMode::PerRequest,
            requests: 0,
            errors: 0,
            warmup_errors: 0,
            rps: 0.0,
            throughput_mib_s: 0.0,
            mean_us: 0.0,
            p50_us: 0,
            p90_us: 0,
            p99_us: 0,
            p999_us: 0,
            max_us: 0,
            cpu_us_per_req: None,
            proxy_cores: None,
            bench_cpu_us_per_req: None,
            other_cores: None,
            rss_mib: None,
            ratio_to_direct: None,
            ratio_to_mitm: None,
            first_error: None,
            round_rps: Vec::new(),
            crypto_floor_us_per_mib: None,
            route: None,
        }
    }

    fn measured(&self) -> bool {
        self.status == "ok" && self.requests > 0
    }
}

/// The row to report for one scenario's rounds: a failed round if any (failures must show),
/// else the one with the median throughput.
pub fn median_round(mut rounds: Vec<ScenarioResult>) -> Option<ScenarioResult> {
    let all_rps: Vec<f64> = rounds.iter().map(|r| r.rps).collect();
    let pick = match rounds.iter().position(|r| r.status == "failed") {
        Some(i) => i,
        None => {
            let mut order: Vec<usize> = (0..rounds.len()).collect();
            order.sort_by(|&a, &b| rounds[a].rps.total_cmp(&rounds[b].rps));
            *order.get(order.len() / 2)?
        }
    };
    let mut row = rounds.swap_remove(pick);
    row.round_rps = all_rps;
    Some(row)
}

/// One line of DESIGN.md's performance budget and how this run did against it.
#[derive(Serialize)]
pub struct BudgetLine {
    pub line: String,
    pub measured: Option<f64>,
    /// None when the scenario did not run (or cannot yet).
    pub met: Option<bool>,
}

impl BudgetLine {
    fn judged(line: &str, measured: Option<f64>, ok: &dyn Fn(f64) -> bool) -> BudgetLine {
        BudgetLine {
            line: line.to_owned(),
            measured,
            met: measured.map(ok),
        }
    }
}

impl Report {
    /// The scenario `name`, if it ran and was measured.
    fn measured_row(&self, name: &str) -> Option<&ScenarioResult> {
        self.scenarios
            .iter()
            .find(|s| s.name == name && s.measured())
    }

    /// Fill in the ratios and judge the budget, once every scenario has run.
    pub fn finish(&mut self) {
        let rps = |name: &str, all: &[ScenarioResult]| {
            all.iter()
                .find(|s| s.name == name && s.measured())
                .map(|s| s.rps)
        };
        let all = self.scenarios.clone();
        for s in &mut self.scenarios {
            if !s.measured() {
                continue;
            }
            let base = s.baseline.or(Some(s.name).filter(|n| *n == "direct"));
            s.ratio_to_direct = base.and_then(|b| rps(b, &all)).map(|b| s.rps / b);
            if s.route.is_some_and(|r| r != Route::Direct) {
                s.ratio_to_mitm = rps("mitm", &all).map(|m| s.rps / m);
            }
        }
        // A smoke run is a correctness check; its timings judge nothing.
        if !self.settings.smoke {
            self.budget = self.judge();
            self.targets = self.judge_targets();
        }
    }

    fn judge(&self) -> Vec<BudgetLine> {
        let get = |name: &str| self.measured_row(name);
        let mut lines = Vec::new();
        let mut push = |line: &str, measured: Option<f64>, ok: &dyn Fn(f64) -> bool| {
            lines.push(BudgetLine::judged(line, measured, ok));
        };
        let mitm = get("mitm");
        push(
            "bare MITM: proxy CPU <= 30 us/request",
            mitm.and_then(|s| s.cpu_us_per_req),
            &|v| v <= 30.0,
        );
        push(
            "bare MITM: throughput >= 0.3x direct",
            mitm.and_then(|s| s.ratio_to_direct),
            &|v| v >= 0.3,
        );
        let full = get("full");
        push(
            "full pipeline: proxy CPU <= 40 us/request",
            full.and_then(|s| s.cpu_us_per_req),
            &|v| v <= 40.0,
        );
        push(
            "full pipeline: throughput >= 0.8x bare MITM",
            full.and_then(|s| s.ratio_to_mitm),
            &|v| v >= 0.8,
        );
        push(
            "bare MITM: throughput >= 40x mitmproxy (intercepting)",
            mitm.zip(get("mitmproxy")).map(|(m, p)| m.rps / p.rps),
            &|v| v >= 40.0,
        );
        push(
            "new intercepted connection per request: >= 0.4x direct",
            get("handshake").and_then(|s| s.ratio_to_direct),
            &|v| v >= 0.4,
        );
        let large = get("large");
        push(
            "1 MiB bodies through MITM: >= 0.6x direct",
            large.and_then(|s| s.ratio_to_direct),
            &|v| v >= 0.6,
        );
        // Flat RSS: a proxy that buffered whole bodies would need, per connection, 15 more
        // bodies' worth of memory for the 16x run than for the large run; a quarter of that
        // separates buffering from streaming.
        let body_mib = self.settings.body_bytes as f64 / MIB;
        let limit = self.settings.connections as f64 * 15.0 * body_mib / 4.0;
        push(
            &format!("large bodies: proxy RSS flat (16x - 1x body RSS < {limit:.0} MiB)"),
            get("large-16x")
                .and_then(|h| h.rss_mib)
                .zip(large.and_then(|l| l.rss_mib))
                .map(|(h, l)| h - l),
            &|v| v < limit,
        );
        lines
    }

    /// Issue 23's targets: every line a ratio between rows of this run (or against the crypto
    /// floor measured in it), so a faster or slower host does not move them.
    fn judge_targets(&self) -> Vec<BudgetLine> {
        let get = |name: &str| self.measured_row(name);
        let line = BudgetLine::judged;
        let (mitm, large) = (get("mitm"), get("large"));
        let cpu = |s: Option<&ScenarioResult>| s.and_then(|s| s.cpu_us_per_req);
        let body_mib = self.settings.body_bytes as f64 / MIB;
        vec![
            line(
                "bare MITM proxy CPU/request / squid tunnel's <= 1.6x",
                cpu(mitm).zip(cpu(get("squid"))).map(|(m, s)| m / s),
                &|v| v <= 1.6,
            ),
            line(
                "bare MITM throughput >= 0.35x direct",
                mitm.and_then(|s| s.ratio_to_direct),
                &|v| v >= 0.35,
            ),
            line(
                "bare MITM throughput >= 60x mitmproxy",
                mitm.zip(get("mitmproxy")).map(|(m, p)| m.rps / p.rps),
                &|v| v >= 60.0,
            ),
            line(
                "full pipeline >= 0.85x bare MITM",
                get("full").and_then(|s| s.ratio_to_mitm),
                &|v| v >= 0.85,
            ),
            line(
                "mcp (tools/call, two decisions) >= 0.9x bare MITM",
                get("mcp").and_then(|s| s.ratio_to_mitm),
                &|v| v >= 0.9,
            ),
            line(
                "new intercepted connection per request >= 0.45x direct",
                get("handshake").and_then(|s| s.ratio_to_direct),
                &|v| v >= 0.45,
            ),
            line(
                "1 MiB bodies: proxy CPU per MiB / crypto floor <= 1.3x",
                cpu(large)
                    .zip(
                        large
                            .and_then(|l| l.crypto_floor_us_per_mib)
                            .or(self.crypto_floor.map(|f| f.download_us_per_mib)),
                    )
                    .map(|(c, floor)| c / body_mib / floor),
                &|v| v <= 1.3,
            ),
        ]
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// The table on stdout: the binary's output.
    #[allow(clippy::print_stdout)] // stdout is this binary's product; everything else is stderr
    pub fn print_table(&self) {
        println!(
            "portcullis-bench {}  {}  {} cores ({}), {} connections, {:.1}s + {:.1}s warm-up",
            self.version,
            self.date,
            self.machine.cores,
            self.machine.cpu_model,
            self.settings.connections,
            self.settings.duration_s,
            self.settings.warmup_s,
        );
        if let Some(proxy) = &self.proxy {
            println!(
                "proxy {}  GLIBC_TUNABLES={}",
                proxy.bin, proxy.glibc_tunables
            );
        }
        println!(
            "{:<17} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>6} {:>9} {:>7} {:>7} {:>6} {:>5}",
            "scenario",
            "requests",
            "req/s",
            "MiB/s",
            "p50us",
            "p90us",
            "p99us",
            "p999us",
            "errors",
            "proxyus/r",
            "rssMiB",
            "xdirect",
            "xmitm",
            "other"
        );
        let opt = |v: Option<f64>, prec: usize| {
            v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"))
        };
        for s in &self.scenarios {
            if s.status == "not yet available" {
                println!("{:<17} not yet available", s.name);
                continue;
            }
            println!(
                "{:<17} {:>9} {:>9.0} {:>8.1} {:>7} {:>7} {:>7} {:>7} {:>6} {:>9} {:>7} {:>7} {:>6} {:>5}",
                s.name,
                s.requests,
                s.rps,
                s.throughput_mib_s,
                s.p50_us,
                s.p90_us,
                s.p99_us,
                s.p999_us,
                s.errors + s.warmup_errors,
                opt(s.cpu_us_per_req, 1),
                opt(s.rss_mib, 1),
                opt(s.ratio_to_direct, 2),
                opt(s.ratio_to_mitm, 2),
                opt(s.other_cores, 2),
            );
            if let Some(e) = &s.first_error {
                println!("{:<17} first error: {}", "", first_line(e));
            }
        }
        let busy: Vec<&str> = self
            .scenarios
            .iter()
            .filter(|s| s.other_cores.is_some_and(|c| c > BUSY_CORES))
            .map(|s| s.name)
            .collect();
        if !busy.is_empty() {
            println!(
                "warning: other processes kept > {BUSY_CORES} cores busy during {}; rerun on a quiet machine",
                busy.join(", ")
            );
        }
        for (title, lines) in [
            ("budget (DESIGN.md \"Performance budget\"):", &self.budget),
            ("targets (issue 23, Performance II):", &self.targets),
        ] {
            if lines.iter().any(|b| b.met.is_some()) {
                println!("{title}");
                for b in lines {
                    let verdict = match b.met {
                        Some(true) => "met   ",
                        Some(false) => "MISSED",
                        None => "n/a   ",
                    };
                    println!("  {verdict} {:<62} {}", b.line, opt(b.measured, 2));
                }
            }
        }
        if let Some(f) = &self.crypto_floor {
            println!(
                "crypto floor: {} in {} KiB records, one thread: seal {:.0} us/MiB, open {:.0} us/MiB; an intercepted download >= {:.0} us/MiB (1 open + 2 seals){}",
                f.aead,
                f.record_bytes / 1024,
                f.seal_us_per_mib,
                f.open_us_per_mib,
                f.download_us_per_mib,
                f.other_download_us_per_mib
                    .map(|o| format!("; the faster of {:.0} and {o:.0}, measured before and after the scenarios", f.download_us_per_mib))
                    .unwrap_or_default()
            );
        }
        let large = self.scenarios.iter().find(|s| s.name == "large");
        if let Some(floor) = large.and_then(|l| l.crypto_floor_us_per_mib) {
            println!(
                "crypto floor around the reported round of large (the faster of just before and just after it): {floor:.0} us/MiB; the 1 MiB target line is judged against it"
            );
        }
        for p in &self.peers {
            println!("peers: {p}");
        }
        for n in &self.notes {
            println!("note: {n}");
        }
        if let Some(e) = &self.error {
            println!("run stopped early: {}", first_line(e));
        }
    }
}

/// The table shows one line per message; the JSON has the whole text (e.g. the proxy's log).
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_else(|| "unknown".into()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            note: "load generator, built-in upstream and proxy share these cores",
        }
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::scenario::find;

    fn row(name: &str, rps: f64, cpu: Option<f64>) -> ScenarioResult {
        let sc = find(name).unwrap();
        ScenarioResult {
            status: "ok",
            requests: 1000,
            rps,
            cpu_us_per_req: cpu,
            route: Some(sc.route),
            ..ScenarioResult::stub(sc)
        }
    }

    fn report(rows: Vec<ScenarioResult>) -> Report {
        Report {
            tool: "t",
            version: "0",
            date: String::new(),
            machine: Machine::detect(),
            settings: Settings {
                connections: 16,
                rounds: 1,
                max_other: None,
                warmup_s: 1.0,
                duration_s: 5.0,
                body_bytes: 1 << 20,
                smoke: false,
                access_log: false,
                decision_log: false,
                tls_resumption: false,
                client_protocol: "http/1.1",
                upstream_alpn: "h2,http/1.1",
                open_loop_rate: None,
            },
            proxy: None,
            scenarios: rows,
            budget: Vec::new(),
            targets: Vec::new(),
            crypto_floor: None,
            peers: Vec::new(),
            notes: Vec::new(),
            error: None,
        }
    }

    #[test]
    fn ratios_use_each_scenarios_own_baseline() {
        let mut r = report(vec![
            row("direct", 100_000.0, None),
            row("direct-handshake", 3_000.0, None),
            row("mitm", 40_000.0, Some(20.0)),
            row("handshake", 1_500.0, Some(500.0)),
        ]);
        r.finish();
        let get = |n: &str| r.scenarios.iter().find(|s| s.name == n).unwrap();
        assert_eq!(get("direct").ratio_to_direct, Some(1.0));
        assert_eq!(get("direct").ratio_to_mitm, None);
        assert_eq!(get("mitm").ratio_to_direct, Some(0.4));
        assert_eq!(get("handshake").ratio_to_direct, Some(0.5));
        assert_eq!(get("handshake").ratio_to_mitm, Some(1_500.0 / 40_000.0));
        let line = |prefix: &str| {
            r.budget
                .iter()
                .find(|b| b.line.starts_with(prefix))
                .unwrap()
        };
        assert_eq!(line("bare MITM: proxy CPU").met, Some(true));
        assert_eq!(line("bare MITM: throughput").met, Some(true));
        assert_eq!(line("new intercepted").met, Some(true));
        assert_eq!(line("1 MiB bodies through").met, None);
    }

    #[test]
    fn large_is_judged_against_the_floor_measured_around_it() {
        let floor = |download| CryptoFloor {
            aead: "AES-128-GCM (ring)",
            record_bytes: 16384,
            seal_us_per_mib: 0.0,
            open_us_per_mib: 0.0,
            download_us_per_mib: download,
            other_download_us_per_mib: None,
        };
        let target = |r: &Report| {
            r.targets
                .iter()
                .find(|t| t.line.starts_with("1 MiB bodies"))
                .and_then(|t| t.measured)
        };
        // 1 MiB bodies: 2,000 µs of proxy CPU per request is 2,000 µs per MiB.
        let mut r = report(vec![row("large", 500.0, Some(2_000.0))]);
        r.crypto_floor = Some(floor(500.0));
        r.finish();
        assert_eq!(
            target(&r),
            Some(4.0),
            "the run's floor without one around the row"
        );

        let mut large = row("large", 500.0, Some(2_000.0));
        large.crypto_floor_us_per_mib = Some(1_000.0);
        let mut r = report(vec![large]);
        r.crypto_floor = Some(floor(500.0));
        r.finish();
        assert_eq!(target(&r), Some(2.0));
    }

    #[test]
    fn median_round_prefers_failures_then_the_middle() {
        let rounds = vec![
            row("mitm", 3.0, None),
            row("mitm", 1.0, None),
            row("mitm", 2.0, None),
        ];
        let m = median_round(rounds).unwrap();
        assert_eq!(m.rps, 2.0);
        assert_eq!(m.round_rps, [3.0, 1.0, 2.0]);
        let mut failed = row("mitm", 9.0, None);
        failed.status = "failed";
        let m = median_round(vec![row("mitm", 1.0, None), failed]).unwrap();
        assert_eq!(m.status, "failed");
        assert!(median_round(Vec::new()).is_none());
    }
}
