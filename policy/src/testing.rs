//! `portcullis policy test`: every rule named `test_*` in every loaded package (like
//! `opa test`) is evaluated on the interpreter, which supports `with input as …`.
//! A test passes iff its value is `true`; undefined or any other value fails.

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
        let mut template = self.engine.clone();
        template.set_execution_timer_config(ExecutionTimerConfig {
            limit: TEST_TIME_LIMIT,
            ..self.limits.timer_config()
        });
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
        let set = PolicySet::load(
            &[dir.path().to_path_buf()],
            "data.portcullis.decision",
            Limits::default(),
        )
        .unwrap();
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
    fn no_tests_is_not_a_pass() {
        let report = load("allow-all").run_tests();
        assert!(report.results.is_empty());
        assert!(!report.passed());
        assert!(report.to_string().contains("no tests found"));
    }
}
