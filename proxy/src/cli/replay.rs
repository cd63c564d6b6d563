//! `portcullis policy replay`: re-decides every decision-log line that carries its policy input
//! (`telemetry.decision_log_input`) with a candidate policy and reports what would change.
//! Exit status: 0 nothing changed, 1 something changed, 2 nothing could be replayed (or bad
//! usage). One thread reads the log in batches while one thread per core decides them; the
//! report does not depend on the thread count.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use portcullis_policy::{Decision, EngineInput, PolicySet};
use serde::{Deserialize, Serialize};

/// Lines decided per batch (read by one thread, decided by all).
const BATCH: usize = 8192;

/// What a decision-log line says, as far as replay needs it (other members are ignored).
#[derive(Deserialize)]
struct Recorded {
    #[serde(default)]
    trace_id: String,
    #[serde(default)]
    spiffe_id: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    destination: String,
    #[serde(default)]
    method: String,
    #[serde(default)]
    path: String,
    decision: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    policy_revision: String,
    #[serde(default)]
    mcp: Option<RecordedMcp>,
    input: Option<EngineInput>,
    #[serde(default)]
    input_omitted: Option<usize>,
}

#[derive(Deserialize, Serialize, Clone)]
struct RecordedMcp {
    #[serde(default)]
    method: String,
    #[serde(default)]
    tool: Option<String>,
}

/// One changed decision, as the report shows it.
#[derive(Serialize, Clone)]
struct Example {
    line: usize,
    trace_id: String,
    spiffe_id: String,
    kind: String,
    destination: String,
    method: String,
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    mcp: Option<RecordedMcp>,
    old: Verdict,
    new: Verdict,
}

#[derive(Serialize, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Verdict {
    decision: String,
    reason: String,
}

/// The replay's findings.
#[derive(Serialize, Default)]
struct Report {
    lines: usize,
    replayed: usize,
    unchanged: usize,
    changed: usize,
    /// Lines that are not decision-log lines (not JSON, a torn write, another log's line).
    unreadable: usize,
    /// Decision lines without an input (logged without `decision_log_input`, or
    /// `input_omitted`): not decided again.
    without_input: usize,
    /// `policy_revision`s the replayed lines were decided with.
    recorded_revisions: BTreeMap<String, usize>,
    candidate_revision: String,
    /// `allow -> deny`, `deny -> allow`, `deny -> deny` (another reason), `allow -> allow`.
    by_change: BTreeMap<String, usize>,
    by_identity: BTreeMap<String, usize>,
    by_destination: BTreeMap<String, usize>,
    /// `old reason -> new reason`.
    by_reason: BTreeMap<String, usize>,
    /// The first changed decisions of each change, in log order.
    examples: Vec<Example>,
    #[serde(skip)]
    examples_per_change: BTreeMap<String, usize>,
    decisions_per_second: f64,
}

/// What one line came to.
enum Outcome {
    Unreadable,
    WithoutInput,
    Same(String),
    Changed(String, Box<Example>),
}

fn decide(set: &PolicySet, number: usize, line: &str) -> Outcome {
    let Ok(rec) = serde_json::from_str::<Recorded>(line) else {
        return Outcome::Unreadable;
    };
    if !matches!(rec.decision.as_str(), "allow" | "deny") {
        return Outcome::Unreadable;
    }
    let Some(input) = rec.input.as_ref().filter(|_| rec.input_omitted.is_none()) else {
        return Outcome::WithoutInput;
    };
    let new: Decision = set.evaluate_kept(input);
    let old_allow = rec.decision == "allow";
    if new.allow == old_allow && new.reason == rec.reason {
        return Outcome::Same(rec.policy_revision);
    }
    let word = |allow: bool| if allow { "allow" } else { "deny" };
    let example = Example {
        line: number,
        trace_id: rec.trace_id,
        spiffe_id: rec.spiffe_id,
        kind: rec.kind,
        destination: rec.destination,
        method: rec.method,
        path: rec.path,
        mcp: rec.mcp,
        old: Verdict {
            decision: rec.decision,
            reason: rec.reason,
        },
        new: Verdict {
            decision: word(new.allow).to_owned(),
            reason: new.reason,
        },
    };
    Outcome::Changed(rec.policy_revision, Box::new(example))
}

impl Report {
    fn add(&mut self, outcome: Outcome, examples: usize) {
        self.lines += 1;
        match outcome {
            Outcome::Unreadable => self.unreadable += 1,
            Outcome::WithoutInput => self.without_input += 1,
            Outcome::Same(revision) => {
                self.replayed += 1;
                self.unchanged += 1;
                *self.recorded_revisions.entry(revision).or_default() += 1;
            }
            Outcome::Changed(revision, ex) => {
                self.replayed += 1;
                self.changed += 1;
                *self.recorded_revisions.entry(revision).or_default() += 1;
                let change = format!("{} -> {}", ex.old.decision, ex.new.decision);
                *self.by_change.entry(change.clone()).or_default() += 1;
                *self.by_identity.entry(ex.spiffe_id.clone()).or_default() += 1;
                *self
                    .by_destination
                    .entry(ex.destination.clone())
                    .or_default() += 1;
                *self
                    .by_reason
                    .entry(format!("{:?} -> {:?}", ex.old.reason, ex.new.reason))
                    .or_default() += 1;
                let shown = self.examples_per_change.entry(change).or_default();
                if *shown < examples {
                    *shown += 1;
                    self.examples.push(*ex);
                }
            }
        }
    }
}

/// Reads `reader` in batches on one thread while one thread per core decides them; the
/// outcomes reach `add` in line order. An I/O error stops the read and is returned.
fn decide_all(
    set: &PolicySet,
    reader: Box<dyn BufRead + Send>,
    mut add: impl FnMut(Outcome),
) -> std::io::Result<()> {
    use std::sync::mpsc;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    // (batch number, first line number, lines)
    let (batches_tx, batches_rx) = mpsc::sync_channel::<(usize, usize, Vec<String>)>(workers);
    let batches_rx = std::sync::Mutex::new(batches_rx);
    let (done_tx, done_rx) = mpsc::channel::<(usize, Vec<Outcome>)>();
    std::thread::scope(|s| {
        let reading = s.spawn(move || {
            let mut lines = reader.lines();
            let (mut batch_no, mut line_no) = (0, 1);
            loop {
                let batch = lines
                    .by_ref()
                    .take(BATCH)
                    .collect::<std::io::Result<Vec<String>>>()?;
                if batch.is_empty() {
                    return Ok(());
                }
                let n = batch.len();
                if batches_tx.send((batch_no, line_no, batch)).is_err() {
                    return Ok(());
                }
                batch_no += 1;
                line_no += n;
            }
        });
        for _ in 0..workers {
            let (rx, tx) = (&batches_rx, done_tx.clone());
            s.spawn(move || loop {
                let next = rx.lock().ok().and_then(|r| r.recv().ok());
                let Some((batch_no, first, lines)) = next else {
                    return;
                };
                let outcomes = lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| decide(set, first + i, l))
                    .collect();
                if tx.send((batch_no, outcomes)).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        // Batches finish out of order; hand them on in order.
        let mut waiting = BTreeMap::new();
        let mut next = 0;
        for (batch_no, outcomes) in done_rx {
            waiting.insert(batch_no, outcomes);
            while let Some(outcomes) = waiting.remove(&next) {
                outcomes.into_iter().for_each(&mut add);
                next += 1;
            }
        }
        reading
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the reader panicked")))
    })
}

/// Runs the replay; the report goes to stdout (text, or JSON with `json`).
#[allow(clippy::print_stdout)] // the report is this command's output
pub fn run(set: &PolicySet, log: &Path, json: bool, examples: usize) -> ExitCode {
    let reader: Box<dyn BufRead + Send> = if log == Path::new("-") {
        Box::new(std::io::BufReader::with_capacity(1 << 20, std::io::stdin()))
    } else {
        match std::fs::File::open(log) {
            Ok(f) => Box::new(std::io::BufReader::with_capacity(1 << 20, f)),
            Err(e) => return super::fail(2, format!("{}: {e}", log.display())),
        }
    };
    let mut report = Report {
        candidate_revision: set.revision().to_string(),
        ..Report::default()
    };
    let start = Instant::now();
    if let Err(e) = decide_all(set, reader, |outcome| report.add(outcome, examples)) {
        return super::fail(2, format!("{}: {e}", log.display()));
    }
    let took = start.elapsed().as_secs_f64();
    report.decisions_per_second = if took > 0.0 {
        (report.replayed as f64 / took).round()
    } else {
        0.0
    };
    if json {
        println!(
            "{:#}",
            serde_json::to_value(&report).unwrap_or(serde_json::Value::Null)
        );
    } else {
        print!("{}", text(&report));
    }
    if report.replayed == 0 {
        return super::fail(
            2,
            format!(
                "{}: no line could be replayed ({} without an input: enable telemetry.decision_log_input; {} unreadable)",
                log.display(),
                report.without_input,
                report.unreadable
            ),
        );
    }
    if report.changed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replayed {} of {} lines with policy revision {}: {} unchanged, {} changed",
        r.replayed, r.lines, r.candidate_revision, r.unchanged, r.changed
    );
    if r.without_input > 0 || r.unreadable > 0 {
        let _ = writeln!(
            out,
            "not replayed: {} without an input, {} unreadable",
            r.without_input, r.unreadable
        );
    }
    let revisions: Vec<String> = r
        .recorded_revisions
        .iter()
        .map(|(rev, n)| format!("{rev} ({n})"))
        .collect();
    let _ = writeln!(out, "recorded with revisions: {}", revisions.join(", "));
    for (title, map) in [
        ("by change", &r.by_change),
        ("by identity", &r.by_identity),
        ("by destination", &r.by_destination),
        ("by reason", &r.by_reason),
    ] {
        if map.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{title}:");
        let mut rows: Vec<_> = map.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (k, n) in rows {
            let _ = writeln!(out, "  {n:>8}  {k}");
        }
    }
    if !r.examples.is_empty() {
        let _ = writeln!(out, "examples:");
        for e in &r.examples {
            let what = match &e.mcp {
                Some(m) => format!(
                    "{} {}",
                    m.method,
                    m.tool
                        .as_deref()
                        .map_or(String::new(), |t| format!("{t:?}"))
                ),
                None => format!("{} {}", e.method, e.path),
            };
            let _ = writeln!(
                out,
                "  line {}: {} {} {} {} | {} {:?} -> {} {:?} | trace {}",
                e.line,
                e.spiffe_id,
                e.kind,
                e.destination,
                what.trim_end(),
                e.old.decision,
                e.old.reason,
                e.new.decision,
                e.new.reason,
                e.trace_id
            );
        }
    }
    let _ = writeln!(out, "{:.0} decisions per second", r.decisions_per_second);
    out
}
