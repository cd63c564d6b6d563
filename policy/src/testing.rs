//! `portcullis policy test`: every rule named `test_*` in every loaded package (like
//! `opa test`) is evaluated on the interpreter, which supports `with input as …`.
//! A test passes iff its value is `true`; undefined or any other value fails.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use regorus::utils::limits::ExecutionTimerConfig;
use regorus::Value;

use crate::PolicySet;

/// Time budget of one test rule (tests may legitimately do more than one decision).
pub const TEST_TIME_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TestCase {
    pub(crate) package: String,
    pub(crate) name: String,
}

/// Outcome of one test rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestOutcome {
    Pass,
    /// The rule was undefined or not `true`.
    Fail,
    /// Evaluation failed; the message says why.
    Error(String),
}

/// One test rule's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// `data.<package>`.
    pub package: String,
    /// `test_…`.
    pub name: String,
    pub outcome: TestOutcome,
    pub duration: Duration,
}

/// Results of [`PolicySet::run_tests`], in load order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestReport {
    pub results: Vec<TestResult>,
}

impl TestReport {
    /// True iff there is at least one test and every test passed.
    pub fn passed(&self) -> bool {
        !self.results.is_empty() && self.results.iter().all(|r| r.outcome == TestOutcome::Pass)
    }

    /// Number of passing tests.
    pub fn pass_count(&self) -> usize {
        self.results
            .iter()
            .filter(|r| r.outcome == TestOutcome::Pass)
            .count()
    }
}

impl fmt::Display for TestReport {
    /// `opa test -v`-like: one `PASS:`/`FAIL:`/`ERROR:` line per test, then totals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.results {
            let label = match r.outcome {
                TestOutcome::Pass => "PASS",
                TestOutcome::Fail => "FAIL",
                TestOutcome::Error(_) => "ERROR",
            };
            writeln!(f, "{label}: {}.{} ({:?})", r.package, r.name, r.duration)?;
            if let TestOutcome::Error(message) = &r.outcome {
                for line in message.lines().filter(|l| !l.trim().is_empty()) {
                    writeln!(f, "  {line}")?;
                }
            }
        }
        let total = self.results.len();
        if total == 0 {
            return writeln!(f, "no tests found (rules named test_*)");
        }
        writeln!(f, "{}", "-".repeat(80))?;
        let pass = self.pass_count();
        writeln!(f, "PASS: {pass}/{total}")?;
        let fail = self
            .results
            .iter()
            .filter(|r| r.outcome == TestOutcome::Fail)
            .count();
        if fail > 0 {
            writeln!(f, "FAIL: {fail}/{total}")?;
        }
        let error = total - pass - fail;
        if error > 0 {
            writeln!(f, "ERROR: {error}/{total}")?;
        }
        Ok(())
    }
}

impl PolicySet {
    /// Runs every `test_*` rule of every loaded package, each on a fresh copy of the
    /// prepared engine with no input (tests supply it with `with input as …`).
    pub fn run_tests(&self) -> TestReport {
        self.tests_run(None)
    }

    /// [`PolicySet::run_tests`], recording which lines and rules of every loaded module the
    /// tests evaluated (`portcullis policy test --coverage`, like `opa test --coverage`).
    pub fn run_tests_with_coverage(&self) -> (TestReport, Coverage) {
        let mut lines = BTreeMap::<String, FileLines>::new();
        let report = self.tests_run(Some(&mut lines));
        (report, self.coverage(lines))
    }

    fn tests_run(&self, mut coverage: Option<&mut BTreeMap<String, FileLines>>) -> TestReport {
        let mut template = self.engine.clone();
        template.set_execution_timer_config(ExecutionTimerConfig {
            limit: TEST_TIME_LIMIT,
            ..self.limits.timer_config()
        });
        template.set_enable_coverage(coverage.is_some());
        let results = self
            .tests
            .iter()
            .map(|test| {
                let mut engine = template.clone();
                let start = Instant::now();
                let rule = format!("{}.{}", test.package, test.name);
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    engine.eval_rule(rule).map_err(|e| e.to_string())
                }))
                .unwrap_or_else(|_| Err("the policy engine panicked".to_owned()));
                let duration = start.elapsed();
                if let (Some(acc), Ok(run)) =
                    (coverage.as_deref_mut(), engine.get_coverage_report())
                {
                    for file in run.files {
                        let entry = acc.entry(file.path).or_default();
                        entry.covered.extend(file.covered);
                        entry.seen.extend(file.not_covered);
                    }
                }
                let outcome = match result {
                    Ok(Value::Bool(true)) => TestOutcome::Pass,
                    Ok(_) => TestOutcome::Fail,
                    Err(e) => TestOutcome::Error(e.trim().to_owned()),
                };
                TestResult {
                    package: test.package.clone(),
                    name: test.name.clone(),
                    outcome,
                    duration,
                }
            })
            .collect();
        TestReport { results }
    }

    /// Lines gathered over all tests, per file, with each rule's verdict. A module no test
    /// touched at all is listed with every rule not exercised.
    fn coverage(&self, mut lines: BTreeMap<String, FileLines>) -> Coverage {
        let mut engine = self.engine.clone();
        let packages = engine.get_packages().unwrap_or_default();
        let mut files = Vec::new();
        for (i, module) in engine.get_modules().iter().enumerate() {
            let source = &module.package.refr.span().source;
            let path = source.file().clone();
            let acc = lines.remove(&path).unwrap_or_default();
            let package = packages.get(i).cloned().unwrap_or_default();
            let rules = module
                .policy
                .iter()
                .map(|rule| {
                    let span = rule.span();
                    let first = span.line;
                    let text_lines = u32::try_from(span.text().matches('\n').count()).unwrap_or(0);
                    let last = first.saturating_add(text_lines);
                    RuleCoverage {
                        name: format!("{package}.{}", rule_name(rule)),
                        line: first,
                        exercised: acc.covered.range(first..=last).next().is_some(),
                    }
                })
                .collect();
            let not_covered = acc.seen.difference(&acc.covered).copied().collect();
            files.push(FileCoverage {
                path,
                covered: acc.covered,
                not_covered,
                rules,
            });
        }
        Coverage { files }
    }
}

/// The name a rule is declared with, as written (`allow`, `deny[msg]`, `default decision`).
fn rule_name(rule: &regorus::unstable::Rule) -> String {
    use regorus::unstable::{Rule, RuleHead};
    let refr = match rule {
        Rule::Spec { head, .. } => match head {
            RuleHead::Compr { refr, .. }
            | RuleHead::Set { refr, .. }
            | RuleHead::Func { refr, .. } => refr,
        },
        Rule::Default { refr, .. } => refr,
    };
    refr.span().text().to_owned()
}

#[derive(Default)]
struct FileLines {
    covered: BTreeSet<u32>,
    /// Lines with an expression some test's report listed (covered or not).
    seen: BTreeSet<u32>,
}

/// What `policy test --coverage` found: per module file, the lines with an expression the
/// tests evaluated and those they did not (lines without an expression are in neither), and
/// each rule, exercised when any of its lines was.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Coverage {
    pub files: Vec<FileCoverage>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FileCoverage {
    pub path: String,
    pub covered: BTreeSet<u32>,
    pub not_covered: BTreeSet<u32>,
    pub rules: Vec<RuleCoverage>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RuleCoverage {
    /// `data.<package>.<rule head>`.
    pub name: String,
    /// Line of the rule's head.
    pub line: u32,
    pub exercised: bool,
}

impl FileCoverage {
    /// Covered lines as a percentage of the lines with an expression (100 with none).
    pub fn percent(&self) -> f64 {
        percent(self.covered.len(), self.not_covered.len())
    }
}

impl Coverage {
    /// Over every file: (covered lines, lines with an expression).
    pub fn totals(&self) -> (usize, usize) {
        self.files.iter().fold((0, 0), |(c, t), f| {
            (
                c + f.covered.len(),
                t + f.covered.len() + f.not_covered.len(),
            )
        })
    }
}

fn percent(covered: usize, not_covered: usize) -> f64 {
    let total = covered + not_covered;
    if total == 0 {
        return 100.0;
    }
    covered as f64 * 100.0 / total as f64
}

/// Line ranges, compact: `3-5, 9`.
struct Ranges<'a>(&'a BTreeSet<u32>);

impl fmt::Display for Ranges<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut iter = self.0.iter().copied().peekable();
        let mut first = true;
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end += 1;
                iter.next();
            }
            f.write_str(if first { "" } else { ", " })?;
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Coverage {
    /// Per file: percentage, the lines not covered, the rules no test exercised; then the total.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "COVERAGE")?;
        for file in &self.files {
            writeln!(
                f,
                "{:5.1}%  {}  ({}/{} lines)",
                file.percent(),
                file.path,
                file.covered.len(),
                file.covered.len() + file.not_covered.len()
            )?;
            if !file.not_covered.is_empty() {
                writeln!(
                    f,
                    "        not covered: lines {}",
                    Ranges(&file.not_covered)
                )?;
            }
            for rule in file.rules.iter().filter(|r| !r.exercised) {
                writeln!(
                    f,
                    "        rule not exercised: {} (line {})",
                    rule.name, rule.line
                )?;
            }
        }
        let (covered, total) = self.totals();
        let rules = self.files.iter().flat_map(|f| &f.rules);
        let exercised = rules.clone().filter(|r| r.exercised).count();
        writeln!(
            f,
            "total: {:.1}% of lines ({covered}/{total}), {exercised}/{} rules exercised",
            percent(covered, total - covered),
            rules.count()
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::PathBuf;

    use super::*;
    use crate::Limits;

    fn load(dir: &str) -> PolicySet {
        let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).join(dir);
        PolicySet::load(&[path], "data.portcullis.decision", Limits::default()).unwrap()
    }

    fn load_dir(dir: &std::path::Path) -> PolicySet {
        PolicySet::load(
            &[dir.to_path_buf()],
            "data.portcullis.decision",
            Limits::default(),
        )
        .unwrap()
    }

    #[test]
    fn example_policy_tests_pass() {
        let report = load("policies").run_tests();
        assert!(report.passed(), "{report}");
        assert!(report.results.len() >= 30, "{report}");
        let text = report.to_string();
        assert!(
            text.contains("PASS: data.portcullis.hosts_test.test_exact_host ("),
            "{text}"
        );
        assert!(
            text.ends_with(&format!("PASS: {n}/{n}\n", n = report.results.len())),
            "{text}"
        );
    }

    #[test]
    fn failures_and_errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.rego"),
            "package portcullis\nimport rego.v1\ndecision := input.ok\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("p_test.rego"),
            "package portcullis_test\nimport rego.v1\n\
             test_pass if data.portcullis.decision with input as {\"ok\": true}\n\
             test_false if data.portcullis.decision with input as {\"ok\": false}\n\
             test_undefined if data.portcullis.decision\n\
             test_error if c == 1\n\
             c := 1\n\
             c := 2 if true\n\
             test_not_true := 1\n\
             test_function(x) := x\n",
        )
        .unwrap();
        let set = load_dir(dir.path());
        let report = set.run_tests();
        let outcomes: Vec<(&str, &TestOutcome)> = report
            .results
            .iter()
            .map(|r| (r.name.as_str(), &r.outcome))
            .collect();
        assert_eq!(outcomes.len(), 5, "{report}");
        assert_eq!(outcomes[0], ("test_pass", &TestOutcome::Pass));
        assert_eq!(outcomes[1], ("test_false", &TestOutcome::Fail));
        assert_eq!(outcomes[2], ("test_undefined", &TestOutcome::Fail));
        assert!(
            matches!(outcomes[3], ("test_error", TestOutcome::Error(m)) if m.contains("rule conflicts")),
            "{report}"
        );
        assert_eq!(outcomes[4], ("test_not_true", &TestOutcome::Fail));
        assert!(report
            .results
            .iter()
            .all(|r| r.package == "data.portcullis_test"));
        assert!(!report.passed());
        let text = report.to_string();
        assert!(
            text.contains("PASS: data.portcullis_test.test_pass ("),
            "{text}"
        );
        assert!(
            text.contains("FAIL: data.portcullis_test.test_false ("),
            "{text}"
        );
        assert!(
            text.contains("ERROR: data.portcullis_test.test_error ("),
            "{text}"
        );
        assert!(
            text.contains("PASS: 1/5\nFAIL: 3/5\nERROR: 1/5\n"),
            "{text}"
        );
    }

    #[test]
    fn coverage_says_which_lines_and_rules_the_tests_reached() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.rego"),
            "package portcullis\n\
             import rego.v1\n\
             default decision := false\n\
             decision if {\n\
             \tinput.host == \"a.test\"\n\
             }\n\
             decision if {\n\
             \tinput.host == \"b.test\"\n\
             \tinput.port == 8443\n\
             }\n\
             unused if {\n\
             \tinput.never\n\
             }\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("p_test.rego"),
            "package portcullis_test\nimport rego.v1\n\
             test_a if data.portcullis.decision with input as {\"host\": \"a.test\"}\n",
        )
        .unwrap();
        let set = load_dir(dir.path());
        let (report, coverage) = set.run_tests_with_coverage();
        assert!(report.passed(), "{report}");
        let policy = coverage
            .files
            .iter()
            .find(|f| f.path.ends_with("/p.rego"))
            .unwrap();
        assert!(policy.covered.contains(&5), "{coverage}");
        assert!(policy.covered.contains(&8), "{coverage}");
        // `input.host == "b.test"` was false, so the next line never ran; `unused` never did.
        assert!(policy.not_covered.contains(&9), "{coverage}");
        assert!(policy.not_covered.contains(&12), "{coverage}");
        let unexercised: Vec<&str> = policy
            .rules
            .iter()
            .filter(|r| !r.exercised)
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(unexercised, ["data.portcullis.unused"], "{coverage}");
        let text = coverage.to_string();
        assert!(text.contains("not covered: lines 9, 12"), "{text}");
        assert!(
            text.contains("rule not exercised: data.portcullis.unused (line 11)"),
            "{text}"
        );
        // Without coverage nothing changes in the report.
        assert_eq!(set.run_tests().results.len(), report.results.len());
    }

    #[test]
    fn no_tests_is_not_a_pass() {
        let report = load("allow-all").run_tests();
        assert!(report.results.is_empty());
        assert!(!report.passed());
        assert!(report.to_string().contains("no tests found"));
    }
}
