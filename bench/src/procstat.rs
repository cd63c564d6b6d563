//! Process CPU time and memory from `/proc` (Linux). CPU is utime+stime in clock ticks, turned
//! into microseconds with `CLK_TCK` asked once from `getconf` (100 when that fails).

use std::sync::OnceLock;

use anyhow::{anyhow, Context as _, Result};

/// Clock ticks per second for `/proc/<pid>/stat` times.
pub fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// Total CPU time (user + system) of a process in microseconds. `pid` 0 means this process.
pub fn cpu_us(pid: u32) -> Result<u64> {
    let path = proc_path(pid, "stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_stat_ticks(&stat).ok_or_else(|| anyhow!("{path}: unexpected format"))?;
    Ok(ticks * 1_000_000 / clk_tck())
}

/// utime + stime from a `stat` line. The command name (field 2) may hold spaces and parens,
/// so fields are counted after its closing paren: state is then field 0, utime 11, stime 12.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time all processes spent busy (user, nice, system, irq, softirq, steal), summed over
/// every core, in microseconds: with the proxy's and the bench's own share subtracted, what is
/// left is load from other processes that makes a run on a shared machine unreliable.
pub fn system_busy_us() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks = parse_system_busy(&stat).ok_or_else(|| anyhow!("/proc/stat: unexpected format"))?;
    Ok(ticks * 1_000_000 / clk_tck())
}

fn parse_system_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// Memory figures in KiB: current resident set and its peak; and the thread count (from the
/// same file).
#[derive(Clone, Copy, Debug, Default)]
pub struct Mem {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub threads: u64,
}

pub fn mem(pid: u32) -> Result<Mem> {
    let path = proc_path(pid, "status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(parse_status(&status))
}

fn parse_status(status: &str) -> Mem {
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Mem {
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        threads: kib("Threads:"),
    }
}

/// Open file descriptors of a process: the entries of `/proc/<pid>/fd`.
pub fn fds(pid: u32) -> Result<u64> {
    let path = proc_path(pid, "fd");
    let dir = std::fs::read_dir(&path).with_context(|| format!("reading {path}"))?;
    Ok(dir.count() as u64)
}

fn proc_path(pid: u32, file: &str) -> String {
    if pid == 0 {
        format!("/proc/self/{file}")
    } else {
        format!("/proc/{pid}/{file}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "42 (we ird) name) S 1 42 42 0 -1 4194304 101 0 0 0 7 5 0 0 20 0 1 0 1 2 3";
        assert_eq!(parse_stat_ticks(line), Some(12));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn system_busy_skips_idle_and_iowait() {
        let stat = "cpu  10 1 5 1000 50 2 3 4 0 0\ncpu0 5 0 2 500 25 1 1 2 0 0\n";
        assert_eq!(parse_system_busy(stat), Some(25));
    }

    #[test]
    fn status_memory_lines() {
        let m = parse_status("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t3\n");
        assert_eq!((m.rss_kib, m.hwm_kib, m.threads), (1024, 2048, 3));
    }

    #[test]
    fn own_process_is_readable() {
        cpu_us(0).unwrap();
        assert!(mem(0).unwrap().rss_kib > 0);
        assert!(mem(0).unwrap().threads > 0);
        assert!(fds(0).unwrap() >= 3);
    }
}
