//! Evaluation without a shared lock: the entrypoint is compiled once to regorus's VM and
//! each thread keeps its own VM per policy set (keyed by the set's unique id). Every run is
//! bounded by an in-engine timer and instruction budget; range builtins are size-checked.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::vm::{ExecutionMode, ExecutionState, RegoVM, SuspendReason, VmError};
use regorus::rvm::{Instruction, Program};
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Engine, LimitError, Value};

use crate::input::{self, Input};
use crate::{Decision, PolicySet};

/// A policy input as the engine reads it, built once per decision and kept (a shared value:
/// cloning is cheap) for a shadow decision, the decision log's `input` and `policy replay`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct EngineInput(Value);

impl EngineInput {
    pub fn new(input: &Input) -> EngineInput {
        EngineInput(input::to_value(input, input::Parts::ALL))
    }

    /// An arbitrary JSON document as an input (`policy eval --input`).
    pub fn from_json(json: &serde_json::Value) -> EngineInput {
        EngineInput(input::json_to_value(json))
    }
}

/// Bounds on one evaluation. Exceeding any of them denies with `policy_eval_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget, checked inside the engine every [`TIMER_CHECK_INTERVAL`]
    /// work units and once more after the run. Default 50 ms.
    pub max_eval_time: Duration,
    /// VM instructions per evaluation (`None`: unlimited). Deterministic, unlike the
    /// timer. Not enforced by the interpreter fallback. Default 1,000,000.
    pub max_instructions: Option<u64>,
    /// Largest collection `numbers.range` / `numbers.range_step` may produce (these
    /// run as a single uninterruptible builtin call in regorus). Default 100,000.
    pub max_generated_elements: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_eval_time: Duration::from_millis(50),
            max_instructions: Some(1_000_000),
            max_generated_elements: 100_000,
        }
    }
}

/// Work units (VM instructions / interpreter steps) between clock reads. A clock read
/// costs ~20 ns; at ~10–50 ns per instruction this checks roughly every 3–15 µs.
pub const TIMER_CHECK_INTERVAL: u32 = 256;

impl Limits {
    pub(crate) fn timer_config(&self) -> ExecutionTimerConfig {
        ExecutionTimerConfig {
            limit: self.max_eval_time,
            check_interval: NonZeroU32::new(TIMER_CHECK_INTERVAL).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// Builtins replaced by host implementations that check the output size first:
/// (name, arity).
const GUARDED_BUILTINS: [(&str, usize); 2] = [("numbers.range", 2), ("numbers.range_step", 3)];

/// How the entrypoint runs.
pub(crate) enum Evaluator {
    Vm {
        program: Arc<Program>,
        /// The program calls a guarded builtin, so it runs in suspendable mode.
        guarded: bool,
    },
    Interpreter {
        fallback_reason: String,
    },
}

impl Evaluator {
    pub(crate) fn compile(compiled: &CompiledPolicy, entrypoint: &str) -> Evaluator {
        match Compiler::compile_from_policy_with_host_await(
            compiled,
            &[entrypoint],
            &GUARDED_BUILTINS,
        ) {
            Ok(program) => {
                let guarded = program
                    .instructions
                    .iter()
                    .any(|i| matches!(i, Instruction::HostAwait { .. }));
                Evaluator::Vm { program, guarded }
            }
            Err(e) => Evaluator::Interpreter {
                fallback_reason: e.to_string(),
            },
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Evaluator::Vm { .. } => "rvm",
            Evaluator::Interpreter { .. } => "interpreter",
        }
    }

    pub(crate) fn fallback_reason(&self) -> Option<&str> {
        match self {
            Evaluator::Vm { .. } => None,
            Evaluator::Interpreter { fallback_reason } => Some(fallback_reason),
        }
    }
}

/// Evaluation strategies, selectable for benchmarks. `evaluate` always uses
/// `PerThread` with the set's own evaluator.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The set's evaluator, one cached instance per thread, and decisions remembered per
    /// thread (the default).
    PerThread,
    /// As `PerThread`, but every decision evaluated (nothing remembered).
    PerThreadEvaluated,
    /// The set's evaluator, a fresh instance per evaluation (VM: new + load + data;
    /// interpreter: clone of the prepared engine).
    FreshPerEval,
    /// Force the tree-walking interpreter, one cached engine per thread.
    InterpreterPerThread,
    /// Force the interpreter, cloning the prepared engine per evaluation.
    InterpreterClonePerEval,
}

pub(crate) enum Failure {
    Limit,
    Error(String),
}

enum Instance {
    Vm(Box<RegoVM>),
    Interpreter(Box<Engine>),
}

struct Slot {
    set_id: u64,
    interpreter: bool,
    instance: Instance,
    /// This thread's copy of the revision id (see `new_instance`).
    revision: Arc<str>,
}

/// Cached instances per thread: the current set and, during a reload, the previous one.
const SLOTS_PER_THREAD: usize = 2;

/// Data documents up to this size are copied into each thread's VM (see `new_instance`);
/// larger data is shared, trading some contention for memory.
const PRIVATE_DATA_MAX_BYTES: usize = 1 << 20;

thread_local! {
    static SLOTS: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

impl PolicySet {
    /// Decides one action. Never fails: errors, undefined results and exceeded limits
    /// are denies with the reason codes on [`Decision`]. Safe to call from any number
    /// of threads at once; no lock is taken.
    pub fn evaluate(&self, input: &Input) -> Decision {
        self.evaluate_value(input::to_value(input, self.parts))
    }

    /// Decides an arbitrary JSON input (for `portcullis policy eval --input FILE`).
    /// The caller is responsible for its size.
    pub fn evaluate_json(&self, input: &serde_json::Value) -> Decision {
        self.evaluate_kept(&EngineInput::from_json(input))
    }

    /// Decides an input kept as the engine reads it (a shadow decision, a replayed one).
    pub fn evaluate_kept(&self, input: &EngineInput) -> Decision {
        self.evaluate_value(input.0.clone())
    }

    #[doc(hidden)]
    pub fn evaluate_with(&self, input: &Input, strategy: Strategy) -> Decision {
        self.decide(input::to_value(input, self.parts), strategy)
    }

    pub(crate) fn evaluate_value(&self, input: Value) -> Decision {
        self.decide(input, Strategy::PerThread)
    }

    fn decide(&self, input: Value, strategy: Strategy) -> Decision {
        let key = match strategy {
            Strategy::PerThread => self.reads.remembered_by().and_then(|p| key(p, &input)),
            _ => None,
        };
        if let Some(decision) = key.as_ref().and_then(|key| recall(self.id, key)) {
            return decision;
        }
        let (result, revision, eval_time) = self.run(input, strategy);
        match result {
            // The in-engine timer cannot interrupt a single slow builtin; the budget
            // still holds for the decision.
            Ok(_) | Err(Failure::Limit) if eval_time > self.limits.max_eval_time => {
                Decision::deny(Decision::EVAL_LIMIT, revision, eval_time)
            }
            Ok(value) => {
                let decision = Decision::from_value(&value, revision, eval_time);
                if let Some(key) = key {
                    remember(self.id, key, &decision);
                }
                decision
            }
            Err(Failure::Limit) => Decision::deny(Decision::EVAL_LIMIT, revision, eval_time),
            Err(Failure::Error(message)) => Decision::error(message, revision, eval_time),
        }
    }

    /// The result, the revision that produced it, and the evaluation time. Setting up a
    /// thread's engine instance (once per thread and revision) is not evaluation: the
    /// budget starts when the instance is ready, so a cold thread on a busy machine is not
    /// denied for compiling.
    fn run(
        &self,
        input: Value,
        strategy: Strategy,
    ) -> (Result<Value, Failure>, Arc<str>, Duration) {
        let interpreter = match strategy {
            Strategy::PerThread | Strategy::PerThreadEvaluated | Strategy::FreshPerEval => {
                matches!(self.evaluator, Evaluator::Interpreter { .. })
            }
            Strategy::InterpreterPerThread | Strategy::InterpreterClonePerEval => true,
        };
        let cached = matches!(
            strategy,
            Strategy::PerThread | Strategy::PerThreadEvaluated | Strategy::InterpreterPerThread
        );
        if !cached {
            let mut instance = match self.new_instance(interpreter, false) {
                Ok(i) => i,
                Err(failure) => return (Err(failure), self.revision.clone(), Duration::ZERO),
            };
            let start = Instant::now();
            let result = self.run_guarded(&mut instance, input, start);
            return (result, self.revision.clone(), start.elapsed());
        }
        let mut slot = match take_slot(self.id, interpreter) {
            Some(slot) => slot,
            None => match self.new_instance(interpreter, self.data_bytes <= PRIVATE_DATA_MAX_BYTES)
            {
                Ok(instance) => Slot {
                    set_id: self.id,
                    interpreter,
                    instance,
                    revision: Arc::from(&*self.revision),
                },
                Err(failure) => return (Err(failure), self.revision.clone(), Duration::ZERO),
            },
        };
        let start = Instant::now();
        let result = self.run_guarded(&mut slot.instance, input, start);
        let eval_time = start.elapsed();
        let revision = slot.revision.clone();
        // An instance that failed may hold half-finished state: drop it.
        if result.is_ok() {
            put_slot(slot);
        }
        (result, revision, eval_time)
    }

    /// Runs one evaluation; a panic inside regorus (e.g. `numbers.range_step` with step 0
    /// in the interpreter) becomes an error instead of unwinding into the caller.
    fn run_guarded(
        &self,
        instance: &mut Instance,
        input: Value,
        start: Instant,
    ) -> Result<Value, Failure> {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.run_instance(instance, input, start)
        }))
        .unwrap_or_else(|_| Err(Failure::Error("the policy engine panicked".to_owned())))
    }

    /// A VM (or interpreter) ready to evaluate this set. A `private` VM gets its own deep
    /// copy of the program's literals and of `data`: regorus values are reference
    /// counted atomically, and threads sharing them contend on the counts (measured with
    /// 2 threads: ~6.0 µs CPU per decision on shared values, ~5.3 µs on private copies).
    /// The cost is one copy of `data` per thread and cached set.
    fn new_instance(&self, interpreter: bool, private: bool) -> Result<Instance, Failure> {
        match &self.evaluator {
            Evaluator::Vm { program, guarded } if !interpreter => {
                let mut vm = RegoVM::new();
                if private {
                    let mut copy = Program::clone(program);
                    copy.literals = copy.literals.iter().map(deep_copy).collect();
                    copy.rule_tree = deep_copy(&copy.rule_tree);
                    vm.load_program(Arc::new(copy));
                    vm.set_data(deep_copy(&self.data))
                } else {
                    vm.load_program(program.clone());
                    vm.set_data(self.data.clone())
                }
                .map_err(|e| Failure::Error(e.to_string()))?;
                vm.set_strict_builtin_errors(false);
                vm.set_execution_timer_config(Some(self.limits.timer_config()));
                vm.set_max_instructions(
                    self.limits
                        .max_instructions
                        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX)),
                );
                if *guarded {
                    vm.set_execution_mode(ExecutionMode::Suspendable);
                }
                Ok(Instance::Vm(Box::new(vm)))
            }
            _ => Ok(Instance::Interpreter(Box::new(self.engine.clone()))),
        }
    }

    fn run_instance(
        &self,
        instance: &mut Instance,
        input: Value,
        start: Instant,
    ) -> Result<Value, Failure> {
        match instance {
            Instance::Interpreter(engine) => {
                engine.set_input(input);
                engine.eval_rule(self.entrypoint.clone()).map_err(|e| {
                    match e.downcast_ref::<LimitError>() {
                        Some(_) => Failure::Limit,
                        None => Failure::Error(one_line(&e.to_string())),
                    }
                })
            }
            Instance::Vm(vm) => {
                vm.set_input(input);
                let mut result = vm.execute();
                loop {
                    let value = result.map_err(vm_failure)?;
                    let (identifier, argument) = match vm.execution_state() {
                        ExecutionState::Suspended {
                            reason:
                                SuspendReason::HostAwait {
                                    identifier,
                                    argument,
                                    ..
                                },
                            ..
                        } => (identifier.clone(), argument.clone()),
                        ExecutionState::Suspended { .. } => {
                            return Err(Failure::Error("unexpected VM suspension".to_owned()))
                        }
                        _ => return Ok(value),
                    };
                    let response = guarded_builtin(
                        &identifier,
                        &argument,
                        self.limits.max_generated_elements,
                    )?;
                    // Time spent suspended is not counted by the VM's own timer.
                    if start.elapsed() > self.limits.max_eval_time {
                        return Err(Failure::Limit);
                    }
                    result = vm.resume(Some(response));
                }
            }
        }
    }
}

/// The exact values a set's decision depends on: the value at each path it reads.
pub(crate) type Key = Vec<Value>;

/// Decisions remembered per set and thread; when full, the set's entries start over. A
/// deterministic set's decision is a function of the values at the paths it reads (and of
/// its data, which a reload replaces with a new set), so the same values get the same
/// decision without evaluating again. Only evaluated allows and denies are remembered,
/// never an error or an exceeded limit.
const REMEMBERED_DECISIONS: usize = 256;
/// Keys larger than this (strings and members, roughly in bytes) are not remembered, so a
/// set that reads headers or MCP arguments cannot make the memory grow with them.
const MAX_KEY_BYTES: usize = 2048;

/// The values at every one of `paths` (`Undefined` where the input has none), or `None`
/// when they are too large to keep.
fn key(paths: &[Vec<Value>], input: &Value) -> Option<Key> {
    let mut budget = MAX_KEY_BYTES;
    paths
        .iter()
        .map(|path| {
            let value = path.iter().fold(input, |v, k| &v[k]);
            budget = budget.checked_sub(size(value, budget)?)?;
            Some(value.clone())
        })
        .collect()
}

/// Roughly the bytes of `value`, or `None` once over `budget`.
fn size(value: &Value, budget: usize) -> Option<usize> {
    const NODE: usize = 16;
    let total = match value {
        Value::String(s) => NODE + s.len(),
        Value::Array(items) => items
            .iter()
            .try_fold(NODE, |n, v| Some(n + size(v, budget)?))?,
        Value::Set(items) => items
            .iter()
            .try_fold(NODE, |n, v| Some(n + size(v, budget)?))?,
        Value::Object(members) => members.iter().try_fold(NODE, |n, (k, v)| {
            Some(n + size(k, budget)? + size(v, budget)?)
        })?,
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::Undefined => NODE,
    };
    (total <= budget).then_some(total)
}

struct Recalled {
    set_id: u64,
    decisions: BTreeMap<Key, Decision>,
}

thread_local! {
    static RECALLED: RefCell<Vec<Recalled>> = const { RefCell::new(Vec::new()) };
}

/// A remembered decision of set `set_id` for `key` (its evaluation time: none).
fn recall(set_id: u64, key: &Key) -> Option<Decision> {
    RECALLED
        .try_with(|sets| {
            let sets = sets.try_borrow().ok()?;
            let set = sets.iter().find(|s| s.set_id == set_id)?;
            set.decisions.get(key).cloned()
        })
        .ok()
        .flatten()
}

fn remember(set_id: u64, key: Key, decision: &Decision) {
    let _ = RECALLED.try_with(|sets| {
        let Ok(mut sets) = sets.try_borrow_mut() else {
            return;
        };
        let index = match sets.iter().position(|s| s.set_id == set_id) {
            Some(index) => index,
            None => {
                // The current set and, during a reload or beside a shadow, one more.
                sets.truncate(SLOTS_PER_THREAD - 1);
                sets.insert(
                    0,
                    Recalled {
                        set_id,
                        decisions: BTreeMap::new(),
                    },
                );
                0
            }
        };
        let decisions = &mut sets[index].decisions;
        if decisions.len() >= REMEMBERED_DECISIONS {
            decisions.clear();
        }
        let recalled = Decision {
            eval_time: Duration::ZERO,
            ..decision.clone()
        };
        decisions.insert(key, recalled);
    });
}

/// A copy of `value` that shares no reference counts with it.
fn deep_copy(value: &Value) -> Value {
    match value {
        Value::String(s) => Value::from(s.as_ref()),
        Value::Array(items) => Value::from(items.iter().map(deep_copy).collect::<Vec<_>>()),
        Value::Set(items) => Value::from(
            items
                .iter()
                .map(deep_copy)
                .collect::<std::collections::BTreeSet<_>>(),
        ),
        Value::Object(members) => Value::from(
            members
                .iter()
                .map(|(k, v)| (deep_copy(k), deep_copy(v)))
                .collect::<std::collections::BTreeMap<_, _>>(),
        ),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::Undefined => value.clone(),
    }
}

fn take_slot(set_id: u64, interpreter: bool) -> Option<Slot> {
    SLOTS
        .try_with(|slots| {
            let mut slots = slots.try_borrow_mut().ok()?;
            let index = slots
                .iter()
                .position(|s| s.set_id == set_id && s.interpreter == interpreter)?;
            Some(slots.remove(index))
        })
        .ok()
        .flatten()
}

fn put_slot(slot: Slot) {
    let _ = SLOTS.try_with(|slots| {
        if let Ok(mut slots) = slots.try_borrow_mut() {
            slots.insert(0, slot);
            slots.truncate(SLOTS_PER_THREAD);
        }
    });
}

fn vm_failure(err: VmError) -> Failure {
    match err {
        VmError::InstructionLimitExceeded { .. }
        | VmError::TimeLimitExceeded { .. }
        | VmError::MemoryLimitExceeded { .. }
        | VmError::MemoryBudgetExceeded { .. }
        | VmError::RegexSizeLimitExceeded { .. } => Failure::Limit,
        other => Failure::Error(one_line(&other.to_string())),
    }
}

/// Regorus messages carry a multi-line source excerpt; a reason must be one line.
fn one_line(message: &str) -> String {
    let crate::PolicyError::Compile {
        file,
        line,
        col,
        message,
        ..
    } = crate::PolicyError::from_rego(&message)
    else {
        return message.split_whitespace().collect::<Vec<_>>().join(" ");
    };
    format!("{file}:{line}:{col}: {message}")
}

/// Host versions of [`GUARDED_BUILTINS`] with regorus's non-strict semantics (bad
/// arguments make the call undefined) that refuse to build more than `max` elements.
fn guarded_builtin(identifier: &Value, argument: &Value, max: u64) -> Result<Value, Failure> {
    let args = match argument {
        Value::Array(args) => args.as_ref(),
        _ => return Ok(Value::Undefined),
    };
    let int = |index: usize| match args.get(index) {
        Some(Value::Number(n)) if n.is_integer() => n.as_i64(),
        _ => None,
    };
    let step = match (identifier, args.len()) {
        (Value::String(name), 2) if name.as_ref() == "numbers.range" => Some(1),
        (Value::String(name), 3) if name.as_ref() == "numbers.range_step" => {
            int(2).filter(|step| *step > 0)
        }
        _ => None,
    };
    let (Some(from), Some(to), Some(step)) = (int(0), int(1), step) else {
        return Ok(Value::Undefined);
    };
    let span = (i128::from(to) - i128::from(from)).unsigned_abs();
    let count = span / u128::from(step.unsigned_abs()) + 1;
    if count > u128::from(max) {
        return Err(Failure::Limit);
    }
    let delta = if to >= from { step } else { -step };
    // `count` elements from `from` by `delta` stay within [from, to]: no overflow.
    let values = (0..count)
        .scan(from, |next, _| {
            let value = *next;
            *next = next.saturating_add(delta);
            Some(Value::from(value))
        })
        .collect::<Vec<_>>();
    Ok(Value::from(values))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::PathBuf;

    use super::*;
    use crate::input::{Destination, Identity, Kind, RequestInfo};
    use crate::TimeInfo;

    const ENTRY: &str = "data.portcullis.decision";

    fn examples() -> PolicySet {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policies"));
        PolicySet::load(&[dir], ENTRY, Limits::default()).unwrap()
    }

    fn policy(rego: &str, limits: Limits) -> PolicySet {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.rego"),
            format!("package portcullis\nimport rego.v1\n{rego}\n"),
        )
        .unwrap();
        PolicySet::load(&[dir.path().to_path_buf()], ENTRY, limits).unwrap()
    }

    /// Friday 2025-11-21 12:00 UTC.
    const FRIDAY_NOON: i64 = 1_763_726_400;

    fn input(kind: Kind, spiffe_id: &str, method: &str, host: &str, unix: i64) -> Input {
        Input {
            kind,
            identity: Identity::from_spiffe_id(spiffe_id).unwrap(),
            source: None,
            destination: Destination {
                host: host.into(),
                port: 443,
                scheme: "https".into(),
            },
            request: (kind != Kind::Connect).then(|| RequestInfo {
                method: method.into(),
                path: "/".into(),
                ..RequestInfo::default()
            }),
            mcp: None,
            credentials: vec![],
            time: TimeInfo::at(unix),
            gateway: None,
            approval: None,
            delegation: None,
        }
    }

    /// (input, allow, reason prefix) for the example policy.
    fn cases() -> Vec<(Input, bool, &'static str)> {
        const RESEARCH: &str = "spiffe://acme.test/agents/research";
        const REPORTER: &str = "spiffe://acme.test/agents/reporter";
        const SUNDAY: i64 = FRIDAY_NOON + 2 * 86_400;
        vec![
            (
                input(Kind::Http, RESEARCH, "POST", "api.github.com", FRIDAY_NOON),
                true,
                "agents: ",
            ),
            (
                input(
                    Kind::Http,
                    RESEARCH,
                    "GET",
                    "raw.githubusercontent.com",
                    FRIDAY_NOON,
                ),
                true,
                "agents: ",
            ),
            (
                input(Kind::Connect, RESEARCH, "", "api.github.com", FRIDAY_NOON),
                true,
                "agents: ",
            ),
            (
                input(Kind::Mcp, RESEARCH, "POST", "localhost", FRIDAY_NOON),
                true,
                "agents: ",
            ),
            (
                input(Kind::Http, RESEARCH, "GET", "example.com", FRIDAY_NOON),
                false,
                "default deny",
            ),
            (
                input(Kind::Connect, REPORTER, "", "api.github.com", FRIDAY_NOON),
                true,
                "agents: ",
            ),
            (
                input(Kind::Http, REPORTER, "GET", "api.github.com", FRIDAY_NOON),
                true,
                "agents: ",
            ),
            (
                input(
                    Kind::Http,
                    REPORTER,
                    "DELETE",
                    "api.github.com",
                    FRIDAY_NOON,
                ),
                false,
                "read_only: ",
            ),
            (
                input(Kind::Http, REPORTER, "GET", "api.github.com", SUNDAY),
                false,
                "business_hours: ",
            ),
            (
                input(
                    Kind::Http,
                    "spiffe://sandbox.test/x",
                    "PUT",
                    "httpbin.org",
                    FRIDAY_NOON,
                ),
                true,
                "sandbox: ",
            ),
            (
                input(
                    Kind::Http,
                    "spiffe://sandbox.test/agents/tinker",
                    "GET",
                    "api.github.com",
                    FRIDAY_NOON,
                ),
                false,
                "trust_domain: ",
            ),
            (
                input(
                    Kind::Http,
                    "spiffe://dev.portcullis/agent/demo",
                    "GET",
                    "127.0.0.1",
                    0,
                ),
                true,
                "agents: ",
            ),
            (
                input(
                    Kind::Http,
                    "spiffe://dev.portcullis/agent/demo",
                    "GET",
                    "example.com",
                    0,
                ),
                false,
                "default deny",
            ),
            (
                input(
                    Kind::Http,
                    "spiffe://other.test/agents/research",
                    "GET",
                    "api.github.com",
                    FRIDAY_NOON,
                ),
                false,
                "default deny",
            ),
        ]
    }

    #[test]
    fn example_policy_decisions() {
        let set = examples();
        for (input, allow, reason) in cases() {
            let decision = set.evaluate(&input);
            assert_eq!(decision.allow, allow, "{input:?} -> {decision:?}");
            assert!(
                decision.reason.starts_with(reason),
                "{input:?} -> {decision:?}"
            );
            assert_eq!(decision.revision, *set.revision());
            let evaluated = set.evaluate_with(&input, Strategy::PerThreadEvaluated);
            assert!(evaluated.eval_time > Duration::ZERO);
        }
    }

    #[test]
    fn all_strategies_agree() {
        let set = examples();
        for (input, _, _) in cases() {
            let expected = set.evaluate(&input);
            for strategy in [
                Strategy::PerThreadEvaluated,
                Strategy::FreshPerEval,
                Strategy::InterpreterPerThread,
                Strategy::InterpreterClonePerEval,
            ] {
                let decision = set.evaluate_with(&input, strategy);
                assert_eq!(
                    (decision.allow, &decision.reason),
                    (expected.allow, &expected.reason),
                    "{strategy:?} on {input:?}"
                );
            }
        }
    }

    /// (allow, reason, status, headers): what a decision says, without its timing.
    fn said(d: &Decision) -> (bool, &str, Option<u16>, &BTreeMap<String, String>) {
        (d.allow, &d.reason, d.status, &d.headers)
    }

    #[test]
    fn remembered_decisions_are_the_evaluated_ones() {
        let set = examples();
        assert_eq!(set.not_remembered_because(), None);
        assert_eq!(
            set.input_reads(),
            [
                "destination.host",
                "identity.spiffe_id",
                "identity.trust_domain",
                "kind",
                "request.method",
                "time.hour_utc",
                "time.weekday"
            ]
        );
        let cases = cases();
        for round in 0..3 {
            for i in 0..cases.len() {
                let input = &cases[(i * 5 + round) % cases.len()].0;
                let remembered = set.evaluate(input);
                let evaluated = set.evaluate_with(input, Strategy::PerThreadEvaluated);
                assert_eq!(said(&remembered), said(&evaluated), "{input:?}");
                if round > 0 {
                    assert_eq!(remembered.eval_time, Duration::ZERO, "{input:?}");
                }
            }
        }
    }

    #[test]
    fn a_decision_is_remembered_for_the_same_values_read_only() {
        let set = policy(
            r#"decision := {"allow": true, "reason": input.request.path} if input.request.method == "GET"
               else := {"allow": false, "reason": "not GET"}"#,
            Limits::default(),
        );
        assert_eq!(set.input_reads(), ["request.method", "request.path"]);
        let mut input = cases()[0].0.clone();
        let request = input.request.as_mut().unwrap();
        request.method = "GET".into();
        request.path = "/a".into();
        let first = set.evaluate(&input);
        assert_eq!((first.allow, first.reason.as_str()), (true, "/a"));
        assert!(first.eval_time > Duration::ZERO);
        // Something the set does not read changes: the same decision, remembered.
        let request = input.request.as_mut().unwrap();
        request.headers.insert("x-other".into(), vec!["1".into()]);
        input.destination.host = "elsewhere.test".into();
        let again = set.evaluate(&input);
        assert_eq!(said(&again), said(&first));
        assert_eq!(again.eval_time, Duration::ZERO);
        // Something it reads changes: decided again.
        input.request.as_mut().unwrap().path = "/b".into();
        let other = set.evaluate(&input);
        assert_eq!((other.allow, other.reason.as_str()), (true, "/b"));
        assert!(other.eval_time > Duration::ZERO);
        input.request.as_mut().unwrap().method = "POST".into();
        assert_eq!(set.evaluate(&input).reason, "not GET");
        // A CONNECT has no request: undefined there, decided on that.
        let mut connect = input.clone();
        connect.request = None;
        assert_eq!(set.evaluate(&connect).reason, "not GET");
    }

    /// What is left out of the engine's input is what no rule reads: a negated condition
    /// on a header sees the header.
    #[test]
    fn a_negated_read_sees_what_it_reads() {
        let set = policy(
            r#"decision if not input.request.headers["x-danger"]"#,
            Limits::default(),
        );
        assert_eq!(set.input_reads(), ["request.headers.x-danger"]);
        let mut input = cases()[0].0.clone();
        assert!(set.evaluate(&input).allow);
        let request = input.request.as_mut().unwrap();
        request.headers.insert("x-danger".into(), vec!["1".into()]);
        assert!(!set.evaluate(&input).allow);
        assert!(!set.evaluate(&input).allow);
    }

    #[test]
    fn sets_that_depend_on_more_than_the_input_are_always_evaluated() {
        for (rego, why) in [
            ("decision if time.now_ns() > 0", "it calls time.now_ns"),
            (
                "decision if count(input) > 0",
                "it can read the whole input",
            ),
        ] {
            let set = policy(rego, Limits::default());
            assert_eq!(set.not_remembered_because().as_deref(), Some(why));
            let input = &cases()[0].0;
            for _ in 0..2 {
                let d = set.evaluate(input);
                assert!(d.allow);
                assert!(d.eval_time > Duration::ZERO, "{rego}");
            }
        }
    }

    #[test]
    fn exceeded_limits_are_never_remembered() {
        let set = policy(
            r#"decision if count(numbers.range(0, input.request.body_size)) > 0"#,
            Limits::default(),
        );
        let mut input = cases()[0].0.clone();
        input.request.as_mut().unwrap().body_size = Some(10_000_000);
        for _ in 0..2 {
            let d = set.evaluate(&input);
            assert_eq!(d.reason, Decision::EVAL_LIMIT);
            assert!(d.eval_time > Duration::ZERO, "a limit is decided again");
        }
        input.request.as_mut().unwrap().body_size = Some(10);
        assert!(set.evaluate(&input).allow);
    }

    #[test]
    fn large_keys_are_not_remembered() {
        let set = policy(r#"decision if input.request.path != """#, Limits::default());
        let mut input = cases()[0].0.clone();
        input.request.as_mut().unwrap().path = format!("/{}", "a".repeat(MAX_KEY_BYTES));
        for _ in 0..2 {
            assert!(set.evaluate(&input).eval_time > Duration::ZERO);
        }
        input.request.as_mut().unwrap().path = "/short".into();
        set.evaluate(&input);
        assert_eq!(set.evaluate(&input).eval_time, Duration::ZERO);
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PolicySet>();
        assert_send_sync::<crate::Policy>();
        assert_send_sync::<Decision>();
    }

    #[test]
    fn evaluation_is_consistent_across_threads() {
        let set = examples();
        let cases = cases();
        let expected: Vec<(bool, String)> = cases
            .iter()
            .map(|(input, _, _)| {
                let d = set.evaluate(input);
                (d.allow, d.reason)
            })
            .collect();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (set, cases, expected) = (&set, &cases, &expected);
                scope.spawn(move || {
                    for i in 0..400 {
                        let n = (i * 7 + t) % cases.len();
                        let d = set.evaluate(&cases[n].0);
                        assert_eq!((d.allow, &d.reason), (expected[n].0, &expected[n].1));
                    }
                });
            }
        });
    }

    #[test]
    fn per_thread_instances_follow_the_set() {
        let allow = policy("decision := true", Limits::default());
        let deny = policy("decision := false", Limits::default());
        let third = policy(
            "decision := {\"allow\": false, \"reason\": \"third\"}",
            Limits::default(),
        );
        let input = &cases()[0].0;
        for _ in 0..3 {
            assert!(allow.evaluate(input).allow);
            assert!(!deny.evaluate(input).allow);
            assert_eq!(third.evaluate(input).reason, "third");
        }
    }

    #[test]
    fn undefined_and_errors_deny() {
        let input = &cases()[0].0;
        let undefined = policy("decision if input.kind == \"nope\"", Limits::default());
        assert_eq!(undefined.evaluate(input).reason, Decision::UNDEFINED);

        let conflict = policy(
            "decision := true if input.kind == \"http\"\ndecision := false if input.kind == \"http\"",
            Limits::default(),
        );
        // The VM treats an error inside a rule body as "body failed": still a deny.
        let d = conflict.evaluate(input);
        assert!(!d.allow);
        assert_eq!(d.reason, Decision::UNDEFINED);
        // The interpreter reports it, as one line with the position.
        let d = conflict.evaluate_with(input, Strategy::InterpreterPerThread);
        assert!(!d.allow);
        assert!(d.reason.starts_with(Decision::ERROR_PREFIX), "{d:?}");
        assert!(d.reason.contains("p.rego:4:1: rule conflicts"), "{d:?}");
        assert!(!d.reason.contains('\n'), "{d:?}");
    }

    #[test]
    fn evaluate_json_takes_any_document() {
        let set = policy(
            "decision := {\"allow\": input.x == 1, \"reason\": \"x\"}",
            Limits::default(),
        );
        assert!(set.evaluate_json(&serde_json::json!({"x": 1})).allow);
        assert!(!set.evaluate_json(&serde_json::json!({"x": 2})).allow);
    }

    fn assert_limited(rego: &str, limits: Limits) {
        let set = policy(&format!("default decision := false\n{rego}"), limits);
        let start = Instant::now();
        let d = set.evaluate(&cases()[0].0);
        assert_eq!(d.reason, Decision::EVAL_LIMIT, "{rego}: {d:?}");
        assert!(!d.allow);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{rego}: {:?}",
            start.elapsed()
        );
    }

    const TRIGGER: &str = "input.kind == \"http\"";

    #[test]
    fn a_huge_range_hits_the_limit_instead_of_hanging() {
        assert_limited(
            &format!("decision if {{ {TRIGGER}; count([x | some x in numbers.range(1, 100000000)]) > 0 }}"),
            Limits::default(),
        );
        assert_limited(
            &format!(
                "decision if {{ {TRIGGER}; count(numbers.range_step(0, 100000000000, 7)) > 0 }}"
            ),
            Limits::default(),
        );
    }

    #[test]
    fn long_loops_hit_the_instruction_limit() {
        assert_limited(
            &format!("decision if {{ {TRIGGER}; count([x | some x in numbers.range(1, 99999); some y in numbers.range(1, 99999)]) > 0 }}"),
            Limits::default(),
        );
    }

    #[test]
    fn long_loops_hit_the_time_limit() {
        assert_limited(
            &format!("decision if {{ {TRIGGER}; count([x | some x in numbers.range(1, 99999); some y in numbers.range(1, 99999)]) > 0 }}"),
            Limits {
                max_eval_time: Duration::from_millis(20),
                max_instructions: None,
                ..Limits::default()
            },
        );
    }

    #[test]
    fn the_interpreter_fallback_is_time_limited_too() {
        // `with` keeps the entrypoint off the VM.
        let rego = format!(
            "decision if {{ {TRIGGER}; slow with input.kind as \"x\" }}\n\
             slow if count([x | some x in numbers.range(1, 99999); some y in numbers.range(1, 99999)]) > 0"
        );
        let set = policy(
            &format!("default decision := false\n{rego}"),
            Limits::default(),
        );
        assert_eq!(set.evaluator_name(), "interpreter");
        assert!(set.interpreter_fallback_reason().unwrap().contains("with"));
        assert_limited(&rego, Limits::default());
    }

    #[test]
    fn guarded_ranges_match_the_interpreter() {
        let set = policy(
            "decision := {\"allow\": true, \"reason\": sprintf(\"%v %v %v %v %v\", [\
             numbers.range(1, 4), numbers.range(3, -1), numbers.range_step(0, 10, 3), \
             numbers.range_step(10, 0, 4), numbers.range(-2, -2)])}",
            Limits::default(),
        );
        let input = &cases()[0].0;
        let vm = set.evaluate(input);
        assert_eq!(
            vm.reason,
            "[1, 2, 3, 4] [3, 2, 1, 0, -1] [0, 3, 6, 9] [10, 6, 2] [-2]"
        );
        assert_eq!(
            vm.reason,
            set.evaluate_with(input, Strategy::InterpreterPerThread)
                .reason
        );
        let invalid = policy(
            "decision := {\"allow\": true, \"reason\": sprintf(\"%v\", [numbers.range_step(1, 2, 0)])}",
            Limits::default(),
        );
        assert_eq!(invalid.evaluate(input).reason, Decision::UNDEFINED);
    }
}
