//! One soak sample: the proxy's RSS, open fds, threads and tokio tasks (its `/metrics` gauge
//! `portcullis_runtime_alive_tasks`), its CPU over the interval, and the requests completed,
//! failed and late in the interval with their p50/p99. Written as a CSV row as soon as taken.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::load::WindowStats;
use crate::procstat;
use crate::proxy_proc;

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_s: f64,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    /// `None` when the proxy's `/metrics` has no `portcullis_runtime_alive_tasks`.
    pub tasks: Option<u64>,
    pub ok: u64,
    pub errors: u64,
    pub late: u64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    /// Proxy CPU over the interval, in % of one core.
    pub proxy_cpu_pct: Option<f64>,
    pub active_connections: Option<u64>,
    pub redis_rss_kib: Option<u64>,
}

pub const CSV_HEADER: &str = "t_s,rss_kib,fds,threads,tasks,ok,errors,late,p50_us,p99_us,proxy_cpu_pct,active_connections,redis_rss_kib";

impl Sample {
    pub fn csv_row(&self) -> String {
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        format!(
            "{:.1},{},{},{},{},{},{},{},{},{},{},{},{}",
            self.t_s,
            self.rss_kib,
            self.fds,
            self.threads,
            opt(self.tasks),
            self.ok,
            self.errors,
            self.late,
            opt(self.p50_us),
            opt(self.p99_us),
            self.proxy_cpu_pct
                .map(|c| format!("{c:.1}"))
                .unwrap_or_default(),
            opt(self.active_connections),
            opt(self.redis_rss_kib),
        )
    }
}

/// Takes samples of one proxy (and the Redis beside it).
pub struct Sampler {
    pub pid: u32,
    pub admin: SocketAddr,
    pub redis_pid: u32,
    last_cpu: Option<(f64, u64)>,
}

impl Sampler {
    pub fn new(pid: u32, admin: SocketAddr, redis_pid: u32) -> Sampler {
        Sampler {
            pid,
            admin,
            redis_pid,
            last_cpu: procstat::cpu_us(pid).ok().map(|c| (0.0, c)),
        }
    }

    /// A sample at `t_s`, taking (and resetting) the request window.
    pub async fn take(&mut self, t_s: f64, window: WindowStats) -> Result<Sample> {
        let mem = procstat::mem(self.pid)?;
        let fds = procstat::fds(self.pid)?;
        let cpu = procstat::cpu_us(self.pid).ok();
        let proxy_cpu_pct = match (self.last_cpu, cpu) {
            (Some((t0, c0)), Some(c1)) if t_s > t0 => {
                Some(c1.saturating_sub(c0) as f64 / 1e6 / (t_s - t0) * 100.0)
            }
            _ => None,
        };
        self.last_cpu = cpu.map(|c| (t_s, c));
        let mut s = Sample {
            t_s,
            rss_kib: mem.rss_kib,
            fds,
            threads: mem.threads,
            tasks: None,
            ok: window.ok,
            errors: window.errors,
            late: window.late,
            p50_us: window.p50_us,
            p99_us: window.p99_us,
            proxy_cpu_pct,
            active_connections: None,
            redis_rss_kib: procstat::mem(self.redis_pid).ok().map(|m| m.rss_kib),
        };
        if let Some(text) = proxy_proc::admin_metrics(self.admin).await {
            s.tasks = proxy_proc::metric(&text, "portcullis_runtime_alive_tasks");
            s.active_connections = proxy_proc::metric(&text, "portcullis_active_connections");
        }
        Ok(s)
    }
}

/// The CSV file, a row appended (and flushed) per sample so a cut-short run keeps its data.
pub struct Csv(std::fs::File);

impl Csv {
    pub fn create(path: &Path) -> Result<Csv> {
        let mut f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        writeln!(f, "{CSV_HEADER}")?;
        Ok(Csv(f))
    }

    pub fn append(&mut self, s: &Sample) -> Result<()> {
        writeln!(self.0, "{}", s.csv_row()).context("writing the soak CSV")?;
        self.0.flush()?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_match_the_header() {
        let s = Sample {
            t_s: 5.0,
            rss_kib: 51_200,
            fds: 40,
            threads: 6,
            tasks: None,
            ok: 1000,
            errors: 0,
            late: 2,
            p50_us: Some(800),
            p99_us: Some(3100),
            proxy_cpu_pct: Some(12.34),
            active_connections: Some(8),
            redis_rss_kib: None,
        };
        let row = s.csv_row();
        assert_eq!(row, "5.0,51200,40,6,,1000,0,2,800,3100,12.3,8,");
        assert_eq!(row.split(',').count(), CSV_HEADER.split(',').count());
    }
}
