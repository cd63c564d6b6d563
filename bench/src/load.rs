//! The closed-loop load generator. Each of N workers owns one connection (or opens a new one
//! per request) and sends the next request when the previous response body has ended. Only
//! requests that complete inside the measured window (after the warm-up) count; the proxy's
//! CPU time is read at both edges of that same window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{exchange, Dialer, Sender, Template};
use crate::procstat;
use crate::progress::Progress;
use crate::proxy_proc::ProxyProcess;
use crate::scenario::{ConnMode, Scenario};

/// Timing of one scenario run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Bound on one request (connection set-up included).
    pub request_timeout: Duration,
    /// Open loop: the total request rate (per second) spread evenly over the connections.
    /// Each request has an intended start time on a fixed schedule; one that a slow previous
    /// request delayed counts its latency from that time, not from when the worker got to
    /// send it (so a stall shows up in the percentiles instead of being hidden:
    /// coordinated-omission correction, as in wrk2).
    /// `None`: closed loop, the next request when the previous one ends.
    pub rate: Option<f64>,
}

/// How often the proxy is checked for life and its RSS sampled.
const TICK: Duration = Duration::from_millis(200);
/// Pause after a failed request so a dead target does not turn into a busy loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// What one scenario measured.
pub struct Measured {
    pub hist: Histogram<u64>,
    pub requests: u64,
    pub errors: u64,
    pub warmup_errors: u64,
    pub bytes: u64,
    pub first_error: Option<String>,
    pub window: Duration,
    /// Proxy CPU time in the window (None when no proxy runs).
    pub proxy_cpu_us: Option<u64>,
    /// This process's CPU time in the window: load generator plus built-in upstream.
    pub bench_cpu_us: Option<u64>,
    /// CPU time of every process on the machine in the window (all cores).
    pub system_cpu_us: Option<u64>,
    /// Largest proxy VmRSS sampled during the scenario.
    pub proxy_rss_kib: Option<u64>,
    /// Set when the run was cut short: the reason.
    pub fatal: Option<String>,
}

/// Counters the workers share with the progress line.
#[derive(Default)]
struct Live {
    done: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Live {
    fn error(&self, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert_with(|| format!("{e:#}"));
        }
    }
}

struct WorkerStats {
    hist: Histogram<u64>,
    requests: u64,
    errors: u64,
    warmup_errors: u64,
    bytes: u64,
}

/// Run `sc` per `plan`. Errors only for problems of the harness itself; a target that fails
/// shows up as `fatal` or in the error counts, with whatever was measured until then.
pub async fn run(
    sc: &Scenario,
    dialer: &Arc<Dialer>,
    plan: Plan,
    mut proxy: Option<&mut ProxyProcess>,
    progress: &mut Progress,
) -> Result<Measured> {
    let template = Arc::new(Template::new(dialer, sc.route, sc.workload));
    let hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| anyhow!("histogram: {e}"))?;
    let mut m = Measured {
        hist: hist.clone(),
        requests: 0,
        errors: 0,
        warmup_errors: 0,
        bytes: 0,
        first_error: None,
        window: Duration::ZERO,
        proxy_cpu_us: None,
        bench_cpu_us: None,
        system_cpu_us: None,
        proxy_rss_kib: None,
        fatal: None,
    };

    // One request first: a target that cannot answer at all is a clear error, not a run of
    // nothing but failures.
    if let Err(e) = preflight(dialer, &template, sc, plan.request_timeout).await {
        m.fatal = Some(format!("cannot complete a single request: {e:#}"));
        if let Some(reason) = proxy.as_deref_mut().and_then(ProxyProcess::exited) {
            m.fatal = Some(reason);
        }
        return Ok(m);
    }

    let live = Arc::new(Live::default());
    let start = Instant::now();
    let warm_end = start + plan.warmup;
    let end = warm_end + plan.duration;
    let mut workers = JoinSet::new();
    for n in 0..plan.connections {
        let offset = n as f64 / plan.connections as f64;
        workers.spawn(worker(
            dialer.clone(),
            template.clone(),
            *sc,
            Timing {
                warm_end,
                end,
                request_timeout: plan.request_timeout,
                interval: plan
                    .rate
                    .map(|r| (Duration::from_secs_f64(plan.connections as f64 / r), offset)),
            },
            live.clone(),
            hist.clone(),
        ));
    }

    let pid = proxy.as_deref().map(|p| p.pid);
    let sample = || {
        (
            pid.and_then(|p| procstat::cpu_us(p).ok()),
            procstat::cpu_us(0).ok(),
            procstat::system_busy_us().ok(),
        )
    };
    let mut cpu0 = (None, None, None);
    let mut measuring = false;
    loop {
        let now = Instant::now();
        if !measuring && now >= warm_end {
            measuring = true;
            cpu0 = sample();
        }
        if now >= end {
            break;
        }
        if let Some(reason) = proxy.as_deref_mut().and_then(ProxyProcess::exited) {
            m.fatal = Some(reason);
            break;
        }
        if let Some(p) = pid {
            if let Ok(mem) = procstat::mem(p) {
                m.proxy_rss_kib = Some(m.proxy_rss_kib.unwrap_or(0).max(mem.rss_kib));
            }
        }
        let phase = if measuring { "measure" } else { "warm-up" };
        progress.tick(
            sc.name,
            phase,
            now - start,
            end - start,
            live.done.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
        );
        let next = (now + TICK).min(if measuring { end } else { warm_end });
        tokio::time::sleep_until(next).await;
    }
    let stopped = Instant::now();
    m.window = stopped.saturating_duration_since(warm_end);
    if m.fatal.is_none() {
        let cpu1 = sample();
        let diff = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| b.saturating_sub(a));
        m.proxy_cpu_us = diff(cpu0.0, cpu1.0);
        m.bench_cpu_us = diff(cpu0.1, cpu1.1);
        m.system_cpu_us = diff(cpu0.2, cpu1.2);
    } else {
        workers.abort_all();
    }

    // Workers stop issuing at `end`; one in flight may take up to its timeout.
    let collect = async {
        while let Some(r) = workers.join_next().await {
            if let Ok(w) = r {
                m.requests += w.requests;
                m.errors += w.errors;
                m.warmup_errors += w.warmup_errors;
                m.bytes += w.bytes;
                m.hist.add(&w.hist).ok();
            }
        }
    };
    if tokio::time::timeout(plan.request_timeout + TICK, collect)
        .await
        .is_err()
    {
        workers.abort_all();
    }
    m.first_error = live.first_error.lock().ok().and_then(|f| f.clone());
    if m.fatal.is_none() && m.requests == 0 && m.errors > 0 {
        m.fatal = Some(format!(
            "every request failed; first error: {}",
            m.first_error.as_deref().unwrap_or("?")
        ));
    }
    progress.done(sc.name);
    Ok(m)
}

async fn preflight(
    dialer: &Dialer,
    template: &Template,
    sc: &Scenario,
    timeout: Duration,
) -> Result<()> {
    let attempt = async {
        let mut sender = dialer.open(sc.route).await?;
        exchange(&mut sender, template).await
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .context("timed out")??;
    Ok(())
}

/// When a worker measures, how long a request may take, and (open loop) its schedule: the
/// interval between its requests and its offset into the first interval (fraction).
struct Timing {
    warm_end: Instant,
    end: Instant,
    request_timeout: Duration,
    interval: Option<(Duration, f64)>,
}

async fn worker(
    dialer: Arc<Dialer>,
    template: Arc<Template>,
    sc: Scenario,
    timing: Timing,
    live: Arc<Live>,
    hist: Histogram<u64>,
) -> WorkerStats {
    let Timing {
        warm_end,
        end,
        request_timeout,
        interval,
    } = timing;
    let mut s = WorkerStats {
        hist,
        requests: 0,
        errors: 0,
        warmup_errors: 0,
        bytes: 0,
    };
    let mut conn: Option<Sender> = None;
    // Open loop: the workers' schedules are staggered evenly over one interval.
    let mut intended = interval.map(|(i, offset)| Instant::now() + i.mul_f64(offset));
    let interval = interval.map(|(i, _)| i);
    while Instant::now() < end {
        // Open loop: a request the previous one made late counts from its scheduled start
        // (coordinated omission); one that is on time counts from when it is really sent, so
        // the timer's millisecond granularity does not add to the latency.
        let t0 = match intended {
            Some(at) if Instant::now() >= at => at,
            Some(at) => {
                tokio::time::sleep_until(at).await;
                Instant::now()
            }
            None => Instant::now(),
        };
        if let (Some(at), Some(i)) = (&mut intended, interval) {
            *at += i;
        }
        // A request still running just after the end is abandoned, not waited for.
        let deadline = (t0 + request_timeout).min(end + Duration::from_millis(500));
        let r = tokio::time::timeout_at(deadline, iteration(&dialer, &template, &sc, &mut conn))
            .await
            .unwrap_or_else(|_| Err(anyhow!("request timed out")));
        let t1 = Instant::now();
        match r {
            Ok(bytes) if t1 >= warm_end && t1 <= end => {
                s.requests += 1;
                s.bytes += bytes;
                let us = u64::try_from((t1 - t0).as_micros()).unwrap_or(u64::MAX);
                s.hist.saturating_record(us.max(1));
                live.done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                live.done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                conn = None;
                if t1 > end {
                    break;
                }
                if t1 < warm_end {
                    s.warmup_errors += 1;
                } else {
                    s.errors += 1;
                }
                live.error(&e);
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
        }
    }
    s
}

/// One request on the worker's connection, opening it first when there is none (or always,
/// for a new-connection-per-request scenario).
async fn iteration(
    dialer: &Dialer,
    template: &Template,
    sc: &Scenario,
    conn: &mut Option<Sender>,
) -> Result<u64> {
    let mut sender = match conn.take() {
        Some(s) => s,
        None => dialer.open(sc.route).await?,
    };
    let n = exchange(&mut sender, template).await?;
    if sc.mode == ConnMode::KeepAlive {
        *conn = Some(sender);
    }
    Ok(n)
}

/// Wait until processes other than this one and `proxy` keep fewer than `max_cores` busy,
/// measured over half-second samples, for at most `limit`. False when the machine never got
/// that quiet.
pub async fn wait_quiet(max_cores: f64, proxy: Option<u32>, limit: Duration) -> bool {
    const SAMPLE: Duration = Duration::from_millis(500);
    let sample = || -> Option<(u64, u64)> {
        let own =
            procstat::cpu_us(0).ok()? + proxy.map_or(Some(0), |p| procstat::cpu_us(p).ok())?;
        Some((procstat::system_busy_us().ok()?, own))
    };
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let Some((sys0, own0)) = sample() else {
            return true;
        };
        tokio::time::sleep(SAMPLE).await;
        let Some((sys1, own1)) = sample() else {
            return true;
        };
        let other = (sys1.saturating_sub(sys0)).saturating_sub(own1.saturating_sub(own0));
        if (other as f64 / 1e6 / SAMPLE.as_secs_f64()) < max_cores {
            return true;
        }
    }
    false
}
