//! The progress line on stderr: rewritten in place on a terminal, one line per scenario
//! otherwise (CI logs stay readable).

use std::io::{IsTerminal, Write};
use std::time::Duration;

pub struct Progress {
    tty: bool,
    started: Option<&'static str>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            started: None,
        }
    }

    pub fn tick(
        &mut self,
        name: &'static str,
        phase: &str,
        elapsed: Duration,
        total: Duration,
        done: u64,
        errors: u64,
    ) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(
                err,
                "\r\x1b[K{name:<17} {phase:<8} {:>5.1}/{:.1}s {done:>9} req {errors:>6} err",
                elapsed.as_secs_f64(),
                total.as_secs_f64(),
            );
            let _ = err.flush();
        } else if self.started != Some(name) {
            let _ = writeln!(err, "running {name} ({:.1}s)", total.as_secs_f64());
        }
        self.started = Some(name);
    }

    pub fn done(&mut self, _name: &'static str) {
        if self.tty && self.started.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
        self.started = None;
    }

    /// A standalone note (skips, stubs), on its own line.
    pub fn note(&mut self, msg: &str) {
        self.done("");
        let _ = writeln!(std::io::stderr(), "{msg}");
    }
}
