//! `portcullis-bench --soak DURATION`: the full pipeline (example policy, a file credential
//! and an OAuth credential cached in a real `redis-server`, MCP calls and filtered tool lists,
//! the decision log, span export to the in-process OTLP sink) at a fixed open-loop rate for a
//! long time, sampling the proxy's RSS, open fds, threads and tokio tasks. After the warm-up
//! they must stay flat and no request may fail; see `trend` for what "flat" means.

mod chart;
mod load;
mod png;
pub(crate) mod redis;
mod sample;
mod summary;
mod trend;

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use tokio::time::Instant;

use crate::client::Dialer;
use crate::otlp_sink::OtlpSink;
use crate::proxy_proc::{self, ProxyProcess};
use crate::setup::{Setup, SOAK_ENV};
use crate::upstream::Upstream;

pub use load::Plan;

/// What `--soak` and its companion flags asked for.
pub struct Options {
    pub duration: Duration,
    pub interval: Duration,
    pub plan: Plan,
    pub bin: PathBuf,
    pub csv: PathBuf,
    pub png: PathBuf,
    pub json: Option<PathBuf>,
    pub keep_dir: bool,
}

/// How often the proxy is checked for life between samples.
const LIFE_CHECK: Duration = Duration::from_secs(1);

/// Run the soak; `Ok(true)` when it passed (no error, nothing growing).
pub async fn run(o: &Options) -> Result<bool> {
    let setup = Setup::generate(None, o.keep_dir, true)?;
    if o.keep_dir {
        eprintln!("PKI and config kept in {}", setup.dir.display());
    }
    let upstream = Upstream::start(setup.upstream_tls.clone()).await?;
    let sink = OtlpSink::start().await?;
    let redis = redis::RedisServer::start()?;
    let config = setup.write_soak(sink.addr, upstream.addr, &redis.url())?;
    let key = base64(&random_bytes::<32>()?);
    let env = [
        (SOAK_ENV[0], "soak-oauth-client-secret"),
        (SOAK_ENV[1], key.as_str()),
    ];
    let mut proxy =
        ProxyProcess::start_with_env(&o.bin, &config, "info,portcullis::access=off", &env)
            .context("starting the proxy")?;
    let dialer = Arc::new(Dialer {
        tls: setup.client_tls(false, false)?,
        proxy: Some(proxy.addr),
        proxy_tls: true,
        upstream: upstream.addr,
        body_bytes: 0,
        http2: false,
        headers: Vec::new(),
    });
    if let Err(e) = load::preflight(&dialer, o.plan).await {
        let tail = proxy.exited().unwrap_or_else(|| proxy.log_tail());
        return Err(e.context(format!(
            "preflight (one request of each kind); proxy log:\n{tail}"
        )));
    }
    eprintln!(
        "soak: {:?} at {} req/s through proxy pid {} (redis-server pid {}), a sample every {:?}",
        o.duration, o.plan.rate, proxy.pid, redis.pid, o.interval
    );

    let mut csv = sample::Csv::create(&o.csv)?;
    let tally = Arc::new(Mutex::new(load::Tally::new()?));
    let warmup = trend::warmup(o.duration);
    let start = Instant::now();
    let end = start + o.duration;
    let load = tokio::spawn(load::run(
        o.plan,
        dialer.clone(),
        tally.clone(),
        start,
        start + warmup,
        end,
    ));

    let mut sampler = sample::Sampler::new(proxy.pid, proxy.admin, redis.pid);
    let mut samples = Vec::new();
    let mut fatal = None;
    let mut next = start + o.interval;
    while next <= end + Duration::from_millis(1) {
        tokio::time::sleep_until(next.min(Instant::now() + LIFE_CHECK)).await;
        if let Some(reason) = proxy.exited() {
            fatal = Some(reason);
            break;
        }
        if Instant::now() < next {
            continue;
        }
        let t_s = (next - start).as_secs_f64();
        let window = lock(&tally).window.take();
        let s = sampler
            .take(t_s, window)
            .await
            .context("sampling the proxy")?;
        csv.append(&s)?;
        progress(&s);
        samples.push(s);
        next += o.interval;
    }
    if fatal.is_some() {
        load.abort();
    } else {
        let _ = load.await;
    }

    let metrics = proxy_proc::admin_metrics(proxy.admin)
        .await
        .unwrap_or_default();
    let redis_stats = redis.info("stats").await.unwrap_or_default();
    let redis_keys = redis.info("keyspace").await.unwrap_or_default();
    let hwm = crate::procstat::mem(proxy.pid).ok().map(|m| m.hwm_kib);
    proxy.stop();
    let summary = summary::Summary::build(summary::Inputs {
        options: o,
        warmup,
        samples: &samples,
        tally: &lock(&tally),
        metrics: &metrics,
        redis_stats: &redis_stats,
        redis_keys: &redis_keys,
        sink_requests: sink.requests.load(std::sync::atomic::Ordering::Relaxed),
        rss_peak_kib: hwm,
        fatal,
    });
    summary.print();
    let png = summary::chart(&summary, &samples);
    std::fs::write(&o.png, png).with_context(|| format!("writing {}", o.png.display()))?;
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary.failures.is_empty())
}

fn lock(t: &Mutex<load::Tally>) -> std::sync::MutexGuard<'_, load::Tally> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One line per sample on stderr, so a long run can be followed (`tail -f`).
fn progress(s: &sample::Sample) {
    let tasks = s.tasks.map_or("?".into(), |t| t.to_string());
    let ms = |us: Option<u64>| us.map_or("-".into(), |u| format!("{:.1}", u as f64 / 1000.0));
    eprintln!(
        "t={:>6.0}s rss={:.1}MiB fds={} threads={} tasks={} ok={} err={} late={} p50={}ms p99={}ms cpu={:.0}%",
        s.t_s,
        s.rss_kib as f64 / 1024.0,
        s.fds,
        s.threads,
        tasks,
        s.ok,
        s.errors,
        s.late,
        ms(s.p50_us),
        ms(s.p99_us),
        s.proxy_cpu_pct.unwrap_or(0.0),
    );
}

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| anyhow!("reading /dev/urandom: {e}"))?;
    Ok(buf)
}

/// Standard base64 with padding (the Redis encryption key's format).
pub(crate) fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, enc) in cases {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
        assert_eq!(base64(&random_bytes::<32>().unwrap()).len(), 44);
    }
}
