//! Loading a policy set: `.rego` modules plus `.json`/`.yaml` data documents from files
//! or directories (walked recursively in sorted order, hidden entries skipped), compiled
//! for one entrypoint. A `PolicySet` is immutable; the revision id hashes every input.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use regorus::unstable::{Expr, Rule, RuleHead};
use regorus::{Engine, Rc, Value};
use sha2::{Digest, Sha256};

use crate::eval::{Evaluator, Limits};
use crate::input::{self, Destination, Identity, Input, Kind, Parts, TimeInfo};
use crate::reads::Reads;
use crate::testing::TestCase;
use crate::PolicyError;

/// Directory nesting followed below each given directory (guards symlink loops).
const MAX_WALK_DEPTH: usize = 32;
/// Hex digits of the SHA-256 kept as the revision id.
const REVISION_HEX_DIGITS: usize = 12;

/// Makes every set's id unique, so per-thread evaluators never outlive a reload.
static NEXT_SET_ID: AtomicU64 = AtomicU64::new(1);

/// A compiled, immutable policy set: modules, data, entrypoint and limits.
/// Cheap to share (`Arc<PolicySet>`); evaluation takes `&self`.
pub struct PolicySet {
    pub(crate) id: u64,
    pub(crate) revision: Arc<str>,
    pub(crate) entrypoint: String,
    pub(crate) limits: Limits,
    pub(crate) paths: Vec<PathBuf>,
    pub(crate) files: Vec<PathBuf>,
    /// Interpreter with every module and the data loaded; used by the test runner,
    /// as the fallback evaluator and as the template for per-thread interpreters.
    pub(crate) engine: Engine,
    pub(crate) data: Value,
    /// Total size of the data documents, in bytes.
    pub(crate) data_bytes: usize,
    pub(crate) evaluator: Evaluator,
    pub(crate) tests: Vec<TestCase>,
    /// What of the input the modules can read, and whether anything else decides.
    pub(crate) reads: Reads,
    /// The parts of the input document built for an evaluation (those `reads` names).
    pub(crate) parts: Parts,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("revision", &self.revision)
            .field("entrypoint", &self.entrypoint)
            .field("files", &self.files)
            .field("evaluator", &self.evaluator_name())
            .finish_non_exhaustive()
    }
}

enum FileKind {
    Rego,
    Json,
    Yaml,
}

struct SourceFile {
    /// Path as found (given root joined with the walked relative path).
    path: PathBuf,
    /// Path relative to its root: what the revision hashes, so it does not depend on
    /// where the policy directory lives.
    relative: String,
    kind: FileKind,
    content: String,
}

impl PolicySet {
    /// [`PolicySet::load`], then the policy's own tests: what the proxy serves (at start and
    /// on every reload). A policy without tests is served; one with a failing test is not.
    pub fn load_tested(
        paths: &[PathBuf],
        entrypoint: &str,
        limits: Limits,
    ) -> Result<PolicySet, PolicyError> {
        let set = PolicySet::load(paths, entrypoint, limits)?;
        let report = set.run_tests();
        if report.pass_count() < report.results.len() {
            return Err(PolicyError::TestsFail {
                report: report.to_string(),
            });
        }
        Ok(set)
    }

    /// Loads every `.rego`, `.json`, `.yaml` and `.yml` file under `paths` (files or
    /// directories), compiles `entrypoint` (e.g. `data.portcullis.decision`) and smoke-tests
    /// it on a minimal input. Errors name the file, and for Rego `file:line:col`.
    pub fn load(
        paths: &[PathBuf],
        entrypoint: &str,
        limits: Limits,
    ) -> Result<PolicySet, PolicyError> {
        let (package, rule) = split_entrypoint(entrypoint)?;
        let files = read_files(paths)?;
        if !files.iter().any(|f| matches!(f.kind, FileKind::Rego)) {
            return Err(PolicyError::NoPolicies {
                paths: paths.to_vec(),
            });
        }

        let mut engine = Engine::new();
        // As in OPA (and regorus's VM, which cannot do otherwise): a builtin error makes
        // its expression undefined. Both evaluators must agree with `policy test`.
        engine.set_strict_builtin_errors(false);
        for file in files.iter().filter(|f| matches!(f.kind, FileKind::Rego)) {
            engine
                .add_policy(file.path.display().to_string(), file.content.clone())
                .map_err(|e| PolicyError::from_rego(&e))?;
        }
        let data = merge_data(&files)?;
        engine
            .add_data(data.clone())
            .map_err(|e| PolicyError::from_rego(&e))?;
        engine.set_execution_timer_config(limits.timer_config());

        let rules = declared_rules(&mut engine)?;
        check_entrypoint(entrypoint, &package, &rule, &rules)?;
        let tests = rules
            .iter()
            .filter(|r| r.name.starts_with("test_") && !r.function)
            .map(|r| TestCase {
                package: r.package.clone(),
                name: r.name.clone(),
            })
            .fold(Vec::<TestCase>::new(), |mut acc, t| {
                if !acc.contains(&t) {
                    acc.push(t);
                }
                acc
            });

        let reads = Reads::of(engine.get_modules());
        let compiled = engine
            .compile_with_entrypoint(&Rc::from(entrypoint))
            .map_err(|e| PolicyError::from_rego(&e))?;
        let evaluator = std::panic::catch_unwind(AssertUnwindSafe(|| {
            Evaluator::compile(&compiled, entrypoint)
        }))
        .unwrap_or_else(|_| Evaluator::Interpreter {
            fallback_reason: "the VM compiler panicked".to_owned(),
        });

        let data_bytes = files
            .iter()
            .filter(|f| !matches!(f.kind, FileKind::Rego))
            .map(|f| f.content.len())
            .sum();
        let set = PolicySet {
            id: NEXT_SET_ID.fetch_add(1, Ordering::Relaxed),
            revision: revision(&files),
            entrypoint: entrypoint.to_owned(),
            limits,
            paths: paths.to_vec(),
            files: files.into_iter().map(|f| f.path).collect(),
            engine,
            data,
            data_bytes,
            evaluator,
            tests,
            parts: Parts::holding(reads.paths.as_deref()),
            reads,
        };
        set.smoke_test()?;
        Ok(set)
    }

    /// Evaluates the entrypoint once on a minimal input: a policy that errors (or hits
    /// a limit) before seeing any real request is rejected at load time.
    fn smoke_test(&self) -> Result<(), PolicyError> {
        let input = Input {
            kind: Kind::Connect,
            identity: Identity {
                spiffe_id: "spiffe://smoke.invalid/portcullis".into(),
                trust_domain: "smoke.invalid".into(),
                path: "/portcullis".into(),
                segments: vec!["portcullis".into()],
                proof: crate::input::x509_svid(),
            },
            source: None,
            destination: Destination {
                host: "smoke.invalid".into(),
                port: 443,
                scheme: "https".into(),
            },
            request: None,
            mcp: None,
            credentials: vec![],
            time: TimeInfo::at(0),
            gateway: None,
            approval: None,
            delegation: None,
        };
        let decision = self.evaluate_value(input::to_value(&input, self.parts));
        let error = decision
            .reason
            .strip_prefix(crate::Decision::ERROR_PREFIX)
            .map(str::to_owned)
            .or_else(|| {
                (decision.reason == crate::Decision::EVAL_LIMIT)
                    .then(|| "exceeded the evaluation limits".to_owned())
            });
        match error {
            Some(message) => Err(PolicyError::Entrypoint {
                entrypoint: self.entrypoint.clone(),
                message: format!("evaluation on a minimal connect input failed: {message}"),
            }),
            None => Ok(()),
        }
    }

    /// Revision id: the first 12 hex digits of a SHA-256 over every loaded file.
    pub fn revision(&self) -> &Arc<str> {
        &self.revision
    }

    /// The rule evaluated per action, e.g. `data.portcullis.decision`.
    pub fn entrypoint(&self) -> &str {
        &self.entrypoint
    }

    /// The limits every evaluation runs under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The paths this set was loaded from (what a reload reads again).
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Every file loaded, in load order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// `"rvm"` (compiled to regorus's VM: the fast path) or `"interpreter"` (used when
    /// the entrypoint needs a feature the VM compiler lacks, e.g. `with`).
    pub fn evaluator_name(&self) -> &'static str {
        self.evaluator.name()
    }

    /// Why the VM could not be used, when [`PolicySet::evaluator_name`] is `"interpreter"`.
    pub fn interpreter_fallback_reason(&self) -> Option<&str> {
        self.evaluator.fallback_reason()
    }

    /// The paths below `input` the set's modules can read (`["input"]`: all of it). Only
    /// these parts of the input are built for an evaluation.
    pub fn input_reads(&self) -> Vec<String> {
        self.reads.describe()
    }

    /// Why the set's decisions are evaluated every time (`None`: a decision is remembered
    /// per thread for the exact values it read; see the README's "Policy" section).
    pub fn not_remembered_because(&self) -> Option<String> {
        self.reads.not_remembered_because()
    }
}

fn split_entrypoint(entrypoint: &str) -> Result<(String, String), PolicyError> {
    let invalid = |why: &str| PolicyError::Entrypoint {
        entrypoint: entrypoint.to_owned(),
        message: why.to_owned(),
    };
    let components: Vec<&str> = entrypoint.split('.').collect();
    if components.first() != Some(&"data") || components.len() < 3 {
        return Err(invalid(
            "must be a rule path like data.portcullis.decision (data.<package>.<rule>)",
        ));
    }
    let is_ident = |c: &str| {
        c.chars()
            .next()
            .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_')
            && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
    };
    if !components.iter().all(|c| is_ident(c)) {
        return Err(invalid("every component must be a Rego identifier"));
    }
    let (rule, package) = components.split_last().ok_or_else(|| invalid("empty"))?;
    Ok((package.join("."), (*rule).to_owned()))
}

fn check_entrypoint(
    entrypoint: &str,
    package: &str,
    rule: &str,
    rules: &[DeclaredRule],
) -> Result<(), PolicyError> {
    let fail = |message: String| PolicyError::Entrypoint {
        entrypoint: entrypoint.to_owned(),
        message,
    };
    if !rules.iter().any(|r| r.package == package) {
        let mut known: Vec<&str> = rules.iter().map(|r| r.package.as_str()).collect();
        known.sort_unstable();
        known.dedup();
        return Err(fail(format!(
            "package {package} is not declared by any loaded .rego file (declared: {})",
            known.join(", ")
        )));
    }
    match rules
        .iter()
        .find(|r| r.package == package && r.name == rule)
    {
        None => Err(fail(format!("package {package} has no rule named {rule}"))),
        Some(r) if r.function => Err(fail(format!("{rule} is a function, not a rule"))),
        Some(_) => Ok(()),
    }
}

struct DeclaredRule {
    package: String,
    name: String,
    function: bool,
}

/// Every rule head in load order, with its package (`data.x.y`).
fn declared_rules(engine: &mut Engine) -> Result<Vec<DeclaredRule>, PolicyError> {
    let packages = engine
        .get_packages()
        .map_err(|e| PolicyError::Rego(e.to_string()))?;
    let mut rules = Vec::new();
    for (package, module) in packages.iter().zip(engine.get_modules().iter()) {
        if module.policy.is_empty() {
            // A package with no rules still counts as declared.
            rules.push(DeclaredRule {
                package: package.clone(),
                name: String::new(),
                function: false,
            });
        }
        for rule in &module.policy {
            let (refr, function) = match rule.as_ref() {
                Rule::Spec { head, .. } => match head {
                    RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. } => (refr, false),
                    RuleHead::Func { refr, .. } => (refr, true),
                },
                Rule::Default { refr, args, .. } => (refr, !args.is_empty()),
            };
            if let Some(name) = head_name(refr) {
                rules.push(DeclaredRule {
                    package: package.clone(),
                    name,
                    function,
                });
            }
        }
    }
    Ok(rules)
}

/// The first component of a rule head (`a` for `a`, `a.b`, `a[x]`).
fn head_name(refr: &Expr) -> Option<String> {
    match refr {
        Expr::Var { span, .. } => Some(span.text().to_owned()),
        Expr::RefDot { refr, .. } | Expr::RefBrack { refr, .. } => head_name(refr),
        _ => None,
    }
}

fn read_files(paths: &[PathBuf]) -> Result<Vec<SourceFile>, PolicyError> {
    let mut found = Vec::new();
    for root in paths {
        let meta = std::fs::metadata(root).map_err(|source| PolicyError::Io {
            path: root.clone(),
            source,
        })?;
        if meta.is_dir() {
            walk(root, root, 0, &mut found)?;
        } else {
            let relative = root
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            if file_kind(root).is_none() {
                return Err(PolicyError::UnsupportedFile { path: root.clone() });
            }
            found.push((root.clone(), relative));
        }
    }
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    for (path, relative) in found {
        let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if !seen.insert(canonical) {
            continue; // the same file reached through two given paths
        }
        let content = std::fs::read_to_string(&path).map_err(|source| PolicyError::Io {
            path: path.clone(),
            source,
        })?;
        let Some(kind) = file_kind(&path) else {
            continue;
        };
        files.push(SourceFile {
            path,
            relative,
            kind,
            content,
        });
    }
    Ok(files)
}

fn walk(
    root: &Path,
    dir: &Path,
    depth: usize,
    out: &mut Vec<(PathBuf, String)>,
) -> Result<(), PolicyError> {
    let io = |source| PolicyError::Io {
        path: dir.to_path_buf(),
        source,
    };
    if depth > MAX_WALK_DEPTH {
        return Err(io(std::io::Error::other(format!(
            "more than {MAX_WALK_DEPTH} nested directories (symlink loop?)"
        ))));
    }
    let mut entries = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let meta = std::fs::metadata(&path).map_err(|source| PolicyError::Io {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            walk(root, &path, depth + 1, out)?;
        } else if file_kind(&path).is_some() {
            let relative = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            out.push((path, relative));
        }
    }
    Ok(())
}

fn file_kind(path: &Path) -> Option<FileKind> {
    match path.extension()?.to_str()? {
        "rego" => Some(FileKind::Rego),
        "json" => Some(FileKind::Json),
        "yaml" | "yml" => Some(FileKind::Yaml),
        _ => None,
    }
}

/// Deep-merges every data document at the root of `data`. Unlike `opa run`, a document's
/// directory does not prefix its keys; two documents setting the same key (other than
/// both to objects) is an error naming both files.
fn merge_data(files: &[SourceFile]) -> Result<Value, PolicyError> {
    let mut merged = serde_json::Map::new();
    let mut merged_from: Vec<(&Path, serde_json::Value)> = Vec::new();
    for file in files {
        let doc: serde_json::Value = match file.kind {
            FileKind::Rego => continue,
            FileKind::Json => serde_json::from_str(&file.content).map_err(|e| e.to_string()),
            FileKind::Yaml => serde_yaml_ng::from_str::<Option<serde_json::Value>>(&file.content)
                .map(|doc| doc.unwrap_or_else(|| serde_json::json!({})))
                .map_err(|e| e.to_string()),
        }
        .map_err(|message| PolicyError::Data {
            path: file.path.clone(),
            message,
        })?;
        let serde_json::Value::Object(object) = &doc else {
            return Err(PolicyError::Data {
                path: file.path.clone(),
                message: "the top level must be an object".to_owned(),
            });
        };
        let mut key = vec!["data".to_owned()];
        if let Err(conflict) = merge_into(&mut merged, object, &mut key) {
            let first = merged_from
                .iter()
                .find(|(_, earlier)| lookup(earlier, &conflict[1..]).is_some())
                .map_or_else(|| file.path.clone(), |(path, _)| path.to_path_buf());
            return Err(PolicyError::DataConflict {
                key: conflict.join("."),
                first,
                second: file.path.clone(),
            });
        }
        merged_from.push((&file.path, doc));
    }
    Ok(input::json_to_value(&serde_json::Value::Object(merged)))
}

/// Merges `from` into `into`; on a conflict returns the key path (starting at `data`).
fn merge_into(
    into: &mut serde_json::Map<String, serde_json::Value>,
    from: &serde_json::Map<String, serde_json::Value>,
    key: &mut Vec<String>,
) -> Result<(), Vec<String>> {
    for (name, value) in from {
        key.push(name.clone());
        match (into.get_mut(name), value) {
            (None, _) => {
                into.insert(name.clone(), value.clone());
            }
            (Some(serde_json::Value::Object(existing)), serde_json::Value::Object(incoming)) => {
                merge_into(existing, incoming, key)?;
            }
            (Some(_), _) => return Err(key.clone()),
        }
        key.pop();
    }
    Ok(())
}

fn lookup<'a>(doc: &'a serde_json::Value, key: &[String]) -> Option<&'a serde_json::Value> {
    key.iter().try_fold(doc, |node, name| node.get(name))
}

fn revision(files: &[SourceFile]) -> Arc<str> {
    let mut sorted: Vec<&SourceFile> = files.iter().collect();
    sorted.sort_by(|a, b| (&a.relative, &a.content).cmp(&(&b.relative, &b.content)));
    let mut hasher = Sha256::new();
    for file in sorted {
        hasher.update(file.relative.as_bytes());
        hasher.update([0]);
        hasher.update((file.content.len() as u64).to_le_bytes());
        hasher.update(file.content.as_bytes());
    }
    let mut hex = String::with_capacity(REVISION_HEX_DIGITS);
    for byte in hasher.finalize().iter().take(REVISION_HEX_DIGITS / 2) {
        let _ = write!(hex, "{byte:02x}");
    }
    Arc::from(hex)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::fs;

    use super::*;

    const ENTRY: &str = "data.portcullis.decision";

    fn examples() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policies"))
    }

    /// A temp dir holding `files` (relative path, content).
    fn dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let path = dir.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, content).unwrap();
        }
        dir
    }

    fn load(dir: &tempfile::TempDir) -> Result<PolicySet, PolicyError> {
        PolicySet::load(&[dir.path().to_path_buf()], ENTRY, Limits::default())
    }

    const OK: &str = "package portcullis\nimport rego.v1\ndecision := true\n";

    #[test]
    fn loads_the_examples() {
        let set = PolicySet::load(&[examples()], ENTRY, Limits::default()).unwrap();
        assert_eq!(set.revision().len(), REVISION_HEX_DIGITS);
        assert!(set.revision().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(set.evaluator_name(), "rvm");
        assert!(set.interpreter_fallback_reason().is_none());
        assert_eq!(set.entrypoint(), ENTRY);
        assert!(set.files().iter().any(|f| f.ends_with("data.yaml")));
        assert!(set
            .files()
            .iter()
            .any(|f| f.ends_with("portcullis/decision.rego")));
    }

    #[test]
    fn syntax_error_names_file_line_and_column() {
        let d = dir(&[(
            "p/bad.rego",
            "package portcullis\n\ndecision if {\n  input.x ==\n}\n",
        )]);
        let err = load(&d).unwrap_err();
        let PolicyError::Compile {
            file,
            line,
            col,
            message,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert!(file.ends_with("p/bad.rego"), "{file}");
        assert_eq!((*line, *col), (5, 1));
        assert_eq!(message, "expecting expression");
        let text = err.to_string();
        let first = text.lines().next().unwrap();
        assert!(
            first.ends_with("p/bad.rego:5:1: expecting expression"),
            "{text}"
        );
        assert!(text.contains("5 | }"), "{text}");
    }

    #[test]
    fn v0_syntax_is_rejected_with_its_position() {
        let d = dir(&[("a.rego", "package portcullis\n\ndecision { true }\n")]);
        let err = load(&d).unwrap_err().to_string();
        assert!(
            err.contains("a.rego:3:10: `if` keyword is required"),
            "{err}"
        );
    }

    #[test]
    fn compile_error_names_file_line_and_column() {
        let d = dir(&[(
            "a.rego",
            "package portcullis\nimport rego.v1\ndecision if nope(1)\n",
        )]);
        let err = load(&d).unwrap_err().to_string();
        assert!(err.contains("a.rego:3:"), "{err}");
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn missing_path_is_an_io_error_naming_it() {
        let missing = PathBuf::from("/nonexistent/portcullis-policy");
        let err =
            PolicySet::load(std::slice::from_ref(&missing), ENTRY, Limits::default()).unwrap_err();
        assert!(
            matches!(&err, PolicyError::Io { path, .. } if *path == missing),
            "{err:?}"
        );
        assert!(err
            .to_string()
            .starts_with("/nonexistent/portcullis-policy: "));
    }

    #[test]
    fn no_rego_files_is_an_error() {
        let d = dir(&[("data.json", "{}"), ("README.md", "hi")]);
        assert!(matches!(load(&d), Err(PolicyError::NoPolicies { .. })));
    }

    #[test]
    fn an_unsupported_file_given_explicitly_is_an_error() {
        let d = dir(&[("notes.txt", "x")]);
        let err = PolicySet::load(&[d.path().join("notes.txt")], ENTRY, Limits::default());
        assert!(matches!(err, Err(PolicyError::UnsupportedFile { .. })));
    }

    #[test]
    fn data_documents_deep_merge() {
        let d = dir(&[
            ("a.rego", "package portcullis\nimport rego.v1\ndecision := {\"allow\": data.x.a == 1, \"reason\": data.x.b}\n"),
            ("a.json", r#"{"x": {"a": 1}}"#),
            ("sub/b.yaml", "x:\n  b: from yaml\n"),
            ("sub/c.yml", "# only a comment\n"),
        ]);
        let set = load(&d).unwrap();
        let decision = set.evaluate_json(&serde_json::json!({}));
        assert!(decision.allow, "{decision:?}");
        assert_eq!(decision.reason, "from yaml");
    }

    #[test]
    fn data_conflict_names_both_files() {
        let d = dir(&[
            ("a.rego", OK),
            ("a.json", r#"{"x": {"y": 1}}"#),
            ("b.yaml", "x:\n  y: 2\n"),
        ]);
        let err = load(&d).unwrap_err();
        let PolicyError::DataConflict { key, first, second } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(key, "data.x.y");
        assert!(
            first.ends_with("a.json") && second.ends_with("b.yaml"),
            "{err}"
        );
    }

    #[test]
    fn invalid_data_documents_are_errors() {
        for (name, content) in [
            ("a.json", "{nope"),
            ("a.yaml", "[1, 2]"),
            ("b.yaml", "a: ["),
        ] {
            let d = dir(&[("a.rego", OK), (name, content)]);
            let err = load(&d).unwrap_err();
            assert!(matches!(err, PolicyError::Data { .. }), "{name}: {err:?}");
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn entrypoint_is_validated() {
        let d = dir(&[(
            "a.rego",
            "package portcullis\nimport rego.v1\nallow := true\nf(x) := x\n",
        )]);
        for (entrypoint, expected) in [
            ("portcullis.decision", "must be a rule path"),
            ("data.portcullis", "must be a rule path"),
            ("data.portcullis.bad-name", "Rego identifier"),
            ("data.other.decision", "package data.other is not declared"),
            ("data.portcullis.decision", "has no rule named decision"),
            ("data.portcullis.f", "is a function"),
        ] {
            let err = PolicySet::load(&[d.path().to_path_buf()], entrypoint, Limits::default())
                .unwrap_err();
            assert!(
                matches!(err, PolicyError::Entrypoint { .. }),
                "{entrypoint}: {err:?}"
            );
            assert!(err.to_string().contains(expected), "{entrypoint}: {err}");
        }
        let ok = PolicySet::load(
            &[d.path().to_path_buf()],
            "data.portcullis.allow",
            Limits::default(),
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn smoke_test_rejects_a_broken_entrypoint() {
        for body in [
            "decision := {\"allow\": true, \"status\": \"teapot\"}",
            "decision := count(numbers.range(1, 1000000000))",
            "decision contains 1",
        ] {
            let d = dir(&[(
                "a.rego",
                &format!("package portcullis\nimport rego.v1\n{body}\n"),
            )]);
            let err = load(&d).unwrap_err();
            assert!(
                err.to_string()
                    .contains("evaluation on a minimal connect input failed"),
                "{body}: {err}"
            );
        }
    }

    #[test]
    fn revision_tracks_content_not_location() {
        let a = dir(&[
            ("p/a.rego", OK),
            ("d.json", r#"{"k": 1}"#),
            (".hidden/x.rego", "garbage"),
        ]);
        let b = dir(&[("p/a.rego", OK), ("d.json", r#"{"k": 1}"#)]);
        let rev_a = load(&a).unwrap().revision().clone();
        assert_eq!(rev_a, load(&b).unwrap().revision().clone());
        fs::write(b.path().join("d.json"), r#"{"k": 2}"#).unwrap();
        assert_ne!(rev_a, load(&b).unwrap().revision().clone());
        fs::write(b.path().join("d.json"), r#"{"k": 1}"#).unwrap();
        fs::rename(b.path().join("p"), b.path().join("q")).unwrap();
        assert_ne!(
            rev_a,
            load(&b).unwrap().revision().clone(),
            "a path is part of the revision"
        );
    }

    #[test]
    fn the_same_file_given_twice_loads_once() {
        let d = dir(&[("a.rego", OK)]);
        let paths = [d.path().to_path_buf(), d.path().join("a.rego")];
        let set = PolicySet::load(&paths, ENTRY, Limits::default()).unwrap();
        assert_eq!(set.files().len(), 1);
    }
}
