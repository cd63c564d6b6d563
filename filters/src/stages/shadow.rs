//! The shadow policy: a candidate policy that decides every action the enforcing policy
//! decided, on the same input, after the action finished (the finished phase: the response is
//! already with the client). Its decisions never change traffic; they are compared with the
//! enforcing ones, counted, logged and put on the action's span.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use portcullis_policy::{Decision, PolicySet};

use crate::pipeline::{ActionKind, Context};

/// Distinct (kind, change, enforced reason, shadow reason) series kept in `/metrics`; further
/// pairs are counted under reasons `other`, so a policy with free-text reasons cannot grow
/// the metrics without bound.
pub const MAX_REASON_PAIRS: usize = 256;

/// How a shadow decision differs from the enforcing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// The enforcing policy allowed, the shadow would deny.
    AllowToDeny,
    /// The enforcing policy denied, the shadow would allow.
    DenyToAllow,
    /// Same verdict, another reason.
    Reason,
}

impl Change {
    /// `None` when the decisions agree (verdict and reason).
    pub fn between(enforced: &Decision, shadow: &Decision) -> Option<Change> {
        match (enforced.allow, shadow.allow) {
            (true, false) => Some(Change::AllowToDeny),
            (false, true) => Some(Change::DenyToAllow),
            _ if enforced.reason != shadow.reason => Some(Change::Reason),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Change::AllowToDeny => "allow_to_deny",
            Change::DenyToAllow => "deny_to_allow",
            Change::Reason => "reason",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PairKey {
    kind: &'static str,
    change: Change,
    enforced: String,
    shadow: String,
}

/// Counters of the shadow policy, rendered in `/metrics`.
#[derive(Debug, Default)]
pub struct ShadowStats {
    /// Shadow decisions by kind (`connect`, `http`, `mcp`).
    decisions: [AtomicU64; 3],
    /// Shadow decisions that were errors, undefined or over a limit (never affect traffic).
    pub errors: AtomicU64,
    differences: Mutex<HashMap<PairKey, u64>>,
}

const KINDS: [&str; 3] = ["connect", "http", "mcp"];

impl ShadowStats {
    fn record(&self, kind: &'static str, enforced: &Decision, shadow: &Decision) {
        if let Some(i) = KINDS.iter().position(|k| *k == kind) {
            self.decisions[i].fetch_add(1, Ordering::Relaxed);
        }
        if shadow.is_failure() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let Some(change) = Change::between(enforced, shadow) else {
            return;
        };
        let Ok(mut diffs) = self.differences.lock() else {
            return;
        };
        let mut key = PairKey {
            kind,
            change,
            enforced: enforced.reason.clone(),
            shadow: shadow.reason.clone(),
        };
        if !diffs.contains_key(&key) && diffs.len() >= MAX_REASON_PAIRS {
            key.enforced = "other".into();
            key.shadow = "other".into();
        }
        *diffs.entry(key).or_default() += 1;
    }

    /// Shadow decisions of one kind so far.
    pub fn decisions(&self, kind: &str) -> u64 {
        KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.decisions[i].load(Ordering::Relaxed))
    }

    /// Prometheus text: whether a candidate is loaded, decisions by kind, differences by kind,
    /// change and pair of reasons, errors.
    pub fn render(&self, out: &mut String, loaded: bool) {
        let name = "portcullis_policy_shadow_loaded";
        let _ = writeln!(
            out,
            "# HELP {name} 1 while a shadow policy is loaded (0: policy.shadow did not load yet).\n# TYPE {name} gauge\n{name} {}",
            u8::from(loaded)
        );
        let name = "portcullis_policy_shadow_decisions_total";
        let _ = writeln!(
            out,
            "# HELP {name} Actions the shadow policy decided, by kind.\n# TYPE {name} counter"
        );
        for (kind, n) in KINDS.iter().zip(&self.decisions) {
            let _ = writeln!(
                out,
                "{name}{{kind=\"{kind}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let name = "portcullis_policy_shadow_differences_total";
        let _ = writeln!(
            out,
            "# HELP {name} Shadow decisions that differ from the enforcing ones, by kind, change (allow_to_deny, deny_to_allow, reason) and the pair of reasons.\n# TYPE {name} counter"
        );
        if let Ok(diffs) = self.differences.lock() {
            let mut rows: Vec<_> = diffs.iter().collect();
            rows.sort_by(|a, b| {
                (a.0.kind, a.0.change.as_str(), &a.0.enforced, &a.0.shadow).cmp(&(
                    b.0.kind,
                    b.0.change.as_str(),
                    &b.0.enforced,
                    &b.0.shadow,
                ))
            });
            for (k, n) in rows {
                let _ = writeln!(
                    out,
                    "{name}{{kind=\"{}\",change=\"{}\",enforced_reason=\"{}\",shadow_reason=\"{}\"}} {n}",
                    k.kind,
                    k.change.as_str(),
                    LabelValue(&k.enforced),
                    LabelValue(&k.shadow)
                );
            }
        }
        let name = "portcullis_policy_shadow_errors_total";
        let _ = writeln!(
            out,
            "# HELP {name} Shadow decisions that were errors, undefined or over a limit (traffic is never affected).\n# TYPE {name} counter\n{name} {}",
            self.errors.load(Ordering::Relaxed)
        );
    }
}

/// A Prometheus label value: `\`, `"` and line feeds escaped (text exposition format).
pub struct LabelValue<'a>(pub &'a str);

impl std::fmt::Display for LabelValue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// The candidate policy, swapped on reload: empty until one loads, so a candidate that does
/// not compile or fails its tests at start never keeps the proxy from serving.
#[derive(Debug, Default)]
pub struct ShadowSlot(ArcSwapOption<PolicySet>);

impl ShadowSlot {
    pub fn new(set: Option<PolicySet>) -> ShadowSlot {
        ShadowSlot(ArcSwapOption::from(set.map(Arc::new)))
    }

    /// The loaded candidate, if any; hold it for the whole action.
    pub fn current(&self) -> Option<Arc<PolicySet>> {
        self.0.load_full()
    }

    /// Installs `set`; returns the one it replaced.
    pub fn replace(&self, set: PolicySet) -> Option<Arc<PolicySet>> {
        self.0.swap(Some(Arc::new(set)))
    }
}

/// The finished-phase stage: decides every kept input with the shadow policy.
#[derive(Debug)]
pub struct ShadowPolicy {
    pub policy: Arc<ShadowSlot>,
    pub stats: Arc<ShadowStats>,
}

impl crate::pipeline::Filter for ShadowPolicy {
    fn name(&self) -> &'static str {
        "shadow_policy"
    }

    fn finished(&self, ctx: &mut Context) {
        if ctx.decisions.is_empty() {
            return;
        }
        // One revision for the whole action, like the enforcing policy.
        let Some(set) = self.policy.current() else {
            return;
        };
        let action: ActionKind = ctx.kind;
        for rec in &mut ctx.decisions {
            let Some(input) = &rec.input else {
                continue;
            };
            let shadow = set.evaluate_kept(input);
            self.stats.record(rec.kind(action), &rec.decision, &shadow);
            rec.shadow = Some(shadow);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Duration;

    fn d(allow: bool, reason: &str) -> Decision {
        let mut d = Decision::deny(reason, Arc::from("r1"), Duration::ZERO);
        d.allow = allow;
        d
    }

    #[test]
    fn differences_are_counted_by_change_and_pair_of_reasons_with_bounded_series() {
        let stats = ShadowStats::default();
        stats.record("http", &d(true, "ok"), &d(true, "ok"));
        stats.record("http", &d(true, "ok"), &d(false, "no \"x\"\n"));
        stats.record("http", &d(true, "ok"), &d(false, "no \"x\"\n"));
        stats.record("mcp", &d(false, "a"), &d(true, "b"));
        stats.record("connect", &d(false, "a"), &d(false, "b"));
        let mut out = String::new();
        stats.render(&mut out, true);
        assert!(
            out.contains("portcullis_policy_shadow_decisions_total{kind=\"http\"} 3"),
            "{out}"
        );
        assert!(out.contains(
            "portcullis_policy_shadow_differences_total{kind=\"http\",change=\"allow_to_deny\",enforced_reason=\"ok\",shadow_reason=\"no \\\"x\\\"\\n\"} 2"
        ), "{out}");
        assert!(
            out.contains("change=\"deny_to_allow\",enforced_reason=\"a\",shadow_reason=\"b\"} 1"),
            "{out}"
        );
        assert!(out.contains("{kind=\"connect\",change=\"reason\""), "{out}");
        assert!(
            !out.contains("enforced_reason=\"ok\",shadow_reason=\"ok\""),
            "{out}"
        );

        for i in 0..MAX_REASON_PAIRS + 10 {
            stats.record("http", &d(true, "ok"), &d(false, &format!("r{i}")));
        }
        let diffs = stats.differences.lock().unwrap();
        assert_eq!(
            diffs.len(),
            MAX_REASON_PAIRS + 1,
            "bounded, plus the `other` series"
        );
        let other = diffs
            .iter()
            .find(|(k, _)| k.enforced == "other")
            .map(|(_, n)| *n)
            .unwrap();
        let total: u64 = diffs.values().sum();
        assert_eq!(
            total,
            4 + (MAX_REASON_PAIRS as u64 + 10),
            "nothing lost: {other} in other"
        );
    }
}
