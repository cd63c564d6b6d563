//! The soak's verdict: totals, latency after the warm-up, the trend of each sampled series,
//! what the pipeline's back ends reported (spans, OAuth fetches, Redis), and the reasons it
//! failed, if it did. Printed on stdout, written as JSON with `--json`, and drawn as a chart.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::chart::{self, Panel};
use super::load::{Kind, Tally, LATE_AFTER};
use super::redis::info_field;
use super::sample::Sample;
use super::trend::{self, Fit, Limit, Verdict};
use super::Options;
use crate::proxy_proc::metric;

/// How fast each sampled series may grow per hour after the warm-up (see `trend`).
const RSS_LIMIT: Limit = Limit::OfMean(0.10);
const FDS_LIMIT: Limit = Limit::Absolute(1.0);
const TASKS_LIMIT: Limit = Limit::Absolute(1.0);

pub struct Inputs<'a> {
    pub options: &'a Options,
    pub warmup: Duration,
    pub samples: &'a [Sample],
    pub tally: &'a Tally,
    pub metrics: &'a str,
    pub redis_stats: &'a str,
    pub redis_keys: &'a str,
    pub sink_requests: u64,
    pub rss_peak_kib: Option<u64>,
    pub fatal: Option<String>,
}

#[derive(Serialize)]
pub struct Summary {
    pub date: String,
    pub duration_s: f64,
    pub rate: f64,
    pub inflight: usize,
    pub connections: usize,
    pub requests_per_connection: u32,
    pub interval_s: f64,
    pub warmup_s: f64,
    pub late_after_ms: f64,
    pub requests: Requests,
    /// Latency in µs of the requests completed after the warm-up: from the start of one on
    /// time, from the due time of a late one.
    pub latency_us: Vec<(&'static str, u64)>,
    pub trends: Vec<Trend>,
    pub rss_peak_mib: Option<f64>,
    pub pipeline: BTreeMap<&'static str, Option<u64>>,
    pub error_messages: Vec<(String, u64)>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub csv: String,
    pub png: String,
}

#[derive(Serialize)]
pub struct Requests {
    pub ok: u64,
    pub errors: u64,
    pub late: u64,
    pub connections_opened: u64,
    pub by_kind: BTreeMap<&'static str, (u64, u64)>,
}

#[derive(Serialize)]
pub struct Trend {
    pub series: &'static str,
    pub unit: &'static str,
    pub fit: Option<Fit>,
    /// `None`: reported, not judged.
    pub limit_per_h: Option<f64>,
    pub verdict: Option<Verdict>,
}

/// The series fitted: name, unit, limit (none: reported only), value of a sample.
type Getter = fn(&Sample) -> Option<f64>;
const SERIES: [(&str, &str, Option<Limit>, Getter); 4] = [
    ("rss", "MiB", Some(RSS_LIMIT), |s| {
        Some(s.rss_kib as f64 / 1024.0)
    }),
    ("fds", "", Some(FDS_LIMIT), |s| Some(s.fds as f64)),
    ("tasks", "", Some(TASKS_LIMIT), |s| {
        s.tasks.map(|t| t as f64)
    }),
    ("threads", "", None, |s| Some(s.threads as f64)),
];

/// Counters of the proxy's `/metrics` that must stay zero, and the ones only reported.
const MUST_BE_ZERO: [&str; 5] = [
    "portcullis_otel_spans_dropped_total",
    "portcullis_otel_export_errors_total",
    "portcullis_credential_fetch_errors_total",
    "portcullis_redis_errors_total",
    "portcullis_decision_log_dropped_total",
];
const REPORTED: [&str; 4] = [
    "portcullis_otel_spans_exported_total",
    "portcullis_credential_fetches_total",
    "portcullis_mcp_pins",
    "portcullis_mitm_leaf_cache_misses_total",
];

impl Summary {
    pub fn build(i: Inputs<'_>) -> Summary {
        let o = i.options;
        let t = i.tally;
        let warm_s = i.warmup.as_secs_f64();
        let settled: Vec<&Sample> = i.samples.iter().filter(|s| s.t_s > warm_s).collect();
        let window = Duration::from_secs_f64(
            settled.last().map_or(0.0, |s| s.t_s) - settled.first().map_or(0.0, |s| s.t_s),
        );
        let mut failures = Vec::new();
        let mut notes = Vec::new();
        if let Some(f) = &i.fatal {
            failures.push(format!("the run stopped early: {f}"));
        }
        if t.errors > 0 {
            failures.push(format!("{} requests failed", t.errors));
        }

        let mut trends = Vec::new();
        for (series, unit, limit, get) in SERIES {
            let points: Vec<(f64, f64)> = settled
                .iter()
                .filter_map(|s| get(s).map(|v| (s.t_s, v)))
                .collect();
            let fit = trend::fit(&points);
            if fit.is_none() && series == "tasks" && settled.iter().all(|s| s.tasks.is_none()) {
                notes.push(
                    "tasks not sampled: the proxy's /metrics has no portcullis_runtime_alive_tasks"
                        .into(),
                );
            }
            let verdict = fit.zip(limit).map(|(f, l)| trend::judge(&f, l, window));
            if verdict == Some(Verdict::Growing) {
                if let Some(f) = &fit {
                    failures.push(format!(
                        "{series} grows {:+.2}{unit}/h (± {:.2}), over the limit of {:.2}{unit}/h",
                        f.slope_per_h,
                        f.stderr_per_h,
                        limit.map_or(0.0, |l| l.per_hour(f.mean))
                    ));
                }
            }
            trends.push(Trend {
                series,
                unit,
                limit_per_h: fit.zip(limit).map(|(f, l)| l.per_hour(f.mean)),
                fit,
                verdict,
            });
        }
        if window < trend::MIN_JUDGED {
            notes.push(format!(
                "growth not judged: {:.0} s after the warm-up, shorter than {} s",
                window.as_secs_f64(),
                trend::MIN_JUDGED.as_secs()
            ));
        }

        let mut pipeline = BTreeMap::new();
        for name in MUST_BE_ZERO {
            let v = metric(i.metrics, name);
            match v {
                Some(n) if n > 0 => failures.push(format!("{name} is {n}")),
                None => notes.push(format!("{name} missing from the proxy's /metrics")),
                _ => {}
            }
            pipeline.insert(name, v);
        }
        for name in REPORTED {
            pipeline.insert(name, metric(i.metrics, name));
        }
        if pipeline["portcullis_credential_fetches_total"] == Some(0) {
            failures.push("the OAuth credential was never fetched".into());
        }
        let commands = info_field(i.redis_stats, "total_commands_processed");
        if commands.is_none_or(|c| c == 0) {
            failures.push("the proxy sent Redis no command".into());
        }
        pipeline.insert("redis_commands_processed", commands);
        pipeline.insert(
            "redis_keys",
            i.redis_keys
                .lines()
                .find_map(|l| l.strip_prefix("db0:keys="))
                .and_then(|l| l.split(',').next())
                .and_then(|n| n.parse().ok()),
        );
        pipeline.insert("otlp_sink_requests", Some(i.sink_requests));

        let q = |q: f64| t.settled.value_at_quantile(q);
        let latency_us = if t.settled.is_empty() {
            Vec::new()
        } else {
            vec![
                ("p50", q(0.50)),
                ("p90", q(0.90)),
                ("p99", q(0.99)),
                ("p99.9", q(0.999)),
                ("max", t.settled.max()),
            ]
        };
        Summary {
            date: crate::report::now_rfc3339(),
            duration_s: o.duration.as_secs_f64(),
            rate: o.plan.rate,
            inflight: o.plan.inflight,
            connections: o.plan.connections,
            requests_per_connection: o.plan.requests_per_connection,
            interval_s: o.interval.as_secs_f64(),
            warmup_s: warm_s,
            late_after_ms: LATE_AFTER.as_secs_f64() * 1000.0,
            requests: Requests {
                ok: t.ok,
                errors: t.errors,
                late: t.late,
                connections_opened: t.connections_opened,
                by_kind: Kind::ALL
                    .iter()
                    .enumerate()
                    .map(|(n, k)| (k.name(), (t.ok_by_kind[n], t.errors_by_kind[n])))
                    .collect(),
            },
            latency_us,
            trends,
            rss_peak_mib: i.rss_peak_kib.map(|k| k as f64 / 1024.0),
            pipeline,
            error_messages: t.error_messages.clone(),
            failures,
            notes,
            csv: o.csv.display().to_string(),
            png: o.png.display().to_string(),
        }
    }

    /// The summary on stdout: the binary's product in this mode.
    #[allow(clippy::print_stdout)]
    pub fn print(&self) {
        let r = &self.requests;
        let all = r.ok + r.errors;
        println!(
            "soak {} s at {} req/s, open loop (<= {} in flight, {} keep-alive connections x {} requests), a sample every {} s, warm-up {} s excluded",
            self.duration_s, self.rate, self.inflight, self.connections,
            self.requests_per_connection, self.interval_s, self.warmup_s
        );
        println!(
            "requests  {} ok, {} errors, {} late (> {} ms after their due time: {:.3} %), {} connections opened",
            r.ok,
            r.errors,
            r.late,
            self.late_after_ms,
            r.late as f64 * 100.0 / all.max(1) as f64,
            r.connections_opened
        );
        let kinds: Vec<String> = r
            .by_kind
            .iter()
            .map(|(k, (ok, err))| format!("{k} {ok}/{err}"))
            .collect();
        println!("  by kind (ok/errors): {}", kinds.join(", "));
        let lat: Vec<String> = self
            .latency_us
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "latency   µs after warm-up (a late request's from its due time): {}",
            lat.join("  ")
        );
        println!(
            "trend     per hour after warm-up (least squares){}",
            self.rss_peak_mib
                .map(|p| format!("; RSS peak {p:.1} MiB"))
                .unwrap_or_default()
        );
        println!(
            "  {:<8} {:>10} {:>12} {:>10} {:>10}  verdict",
            "series", "mean", "slope/h", "± stderr", "limit/h"
        );
        for t in &self.trends {
            let name = match t.unit {
                "" => t.series.to_owned(),
                u => format!("{} {u}", t.series),
            };
            match &t.fit {
                Some(f) => println!(
                    "  {name:<8} {:>10.2} {:>+12.3} {:>10.3} {:>10}  {}",
                    f.mean,
                    f.slope_per_h,
                    f.stderr_per_h,
                    t.limit_per_h.map_or("-".into(), |l| format!("{l:.2}")),
                    match t.verdict {
                        Some(Verdict::Flat) => "flat",
                        Some(Verdict::Growing) => "GROWING",
                        Some(Verdict::NotJudged) => "not judged",
                        None => "reported",
                    }
                ),
                None => println!("  {name:<8} (too few samples)"),
            }
        }
        let pipe: Vec<String> = self
            .pipeline
            .iter()
            .map(|(k, v)| {
                let k = k.strip_prefix("portcullis_").unwrap_or(k);
                format!("{k}={}", v.map_or("?".into(), |v| v.to_string()))
            })
            .collect();
        println!("pipeline  {}", pipe.join(" "));
        for (m, n) in &self.error_messages {
            println!("error     {n} x {m}");
        }
        for n in &self.notes {
            println!("note      {n}");
        }
        println!("files     {} {}", self.csv, self.png);
        if self.failures.is_empty() {
            println!("PASS");
        } else {
            println!("FAIL: {}", self.failures.join("; "));
        }
    }
}

/// The chart: RSS, open fds, tokio tasks (each with its post-warm-up trend) and latency.
pub fn chart(s: &Summary, samples: &[Sample]) -> Vec<u8> {
    let series = |get: Getter| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter_map(|x| get(x).map(|v| (x.t_s, v)))
            .collect()
    };
    let mut panels = Vec::new();
    for (t, (_, _, _, get)) in s.trends.iter().zip(SERIES).take(3) {
        let label = match t.series {
            "rss" => "proxy RSS (MiB)",
            "fds" => "open fds",
            _ => "tokio tasks",
        };
        let (title, trend) = match &t.fit {
            Some(f) => {
                let from = s.warmup_s;
                let to = samples.last().map_or(from, |x| x.t_s);
                (
                    format!("{label}   trend {:+.2}/h", f.slope_per_h),
                    Some(((from, f.at(from)), (to, f.at(to)))),
                )
            }
            None => (format!("{label}   (not sampled)"), None),
        };
        panels.push(Panel {
            title,
            lines: vec![series(get)],
            trend,
        });
    }
    panels.push(Panel {
        title: "latency (ms) per sample: p50 blue, p99 orange".into(),
        lines: vec![series(|x| ms(x.p50_us)), series(|x| ms(x.p99_us))],
        trend: None,
    });
    let length = match s.duration_s {
        d if d >= 300.0 => format!("{:.0} min", d / 60.0),
        d => format!("{d:.0} s"),
    };
    let title = format!(
        "portcullis soak: {} req/s, {length}. shaded: warm-up. red: trend",
        s.rate
    );
    chart::render(&title, &panels, s.duration_s, s.warmup_s)
}

fn ms(us: Option<u64>) -> Option<f64> {
    us.map(|u| u as f64 / 1000.0)
}
