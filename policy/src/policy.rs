//! The live policy: an atomically swappable `Arc<PolicySet>`. Readers never block and
//! keep the set they loaded for the whole action; a failed reload keeps the last good set.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::{Decision, EngineInput, Input, Limits, PolicyError, PolicySet};

/// Holder of the current [`PolicySet`], shared by every connection.
pub struct Policy {
    current: ArcSwap<PolicySet>,
}

impl Policy {
    /// Wraps an already loaded set.
    pub fn new(set: PolicySet) -> Policy {
        Policy {
            current: ArcSwap::from_pointee(set),
        }
    }

    /// [`PolicySet::load`], wrapped.
    pub fn load(
        paths: &[PathBuf],
        entrypoint: &str,
        limits: Limits,
    ) -> Result<Policy, PolicyError> {
        PolicySet::load(paths, entrypoint, limits).map(Policy::new)
    }

    /// The current set; hold it for the whole action so one action sees one revision.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// Evaluates with the current set.
    pub fn evaluate(&self, input: &Input) -> Decision {
        self.current.load().evaluate(input)
    }

    /// [`Policy::evaluate`], keeping the input as the engine read it (for a shadow decision
    /// or the decision log).
    pub fn evaluate_keeping(&self, input: &Input) -> (Decision, EngineInput) {
        let kept = EngineInput::new(input);
        (self.current.load().evaluate_kept(&kept), kept)
    }

    /// Installs `set`; returns the one it replaced.
    pub fn replace(&self, set: PolicySet) -> Arc<PolicySet> {
        self.current.swap(Arc::new(set))
    }

    /// Loads the current set's paths again with the same entrypoint and limits and
    /// installs the result. On error the current set stays (keep-last-good).
    pub fn reload(&self) -> Result<Arc<PolicySet>, PolicyError> {
        let current = self.current();
        let set = PolicySet::load(current.paths(), current.entrypoint(), current.limits())?;
        self.replace(set);
        Ok(self.current())
    }

    /// Revision id of the current set.
    pub fn revision(&self) -> Arc<str> {
        self.current.load().revision().clone()
    }
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("current", &*self.current.load())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::{Identity, Kind, TimeInfo};

    fn write(dir: &std::path::Path, rego: &str) {
        std::fs::write(
            dir.join("p.rego"),
            format!("package portcullis\nimport rego.v1\n{rego}\n"),
        )
        .unwrap();
    }

    fn input() -> Input {
        Input {
            kind: Kind::Connect,
            identity: Identity::from_spiffe_id("spiffe://acme.test/a").unwrap(),
            source: None,
            destination: crate::Destination {
                host: "example.com".into(),
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
        }
    }

    #[test]
    fn reload_swaps_and_keeps_last_good() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "decision := false");
        let policy = Policy::load(
            &[dir.path().to_path_buf()],
            "data.portcullis.decision",
            Limits::default(),
        )
        .unwrap();
        let first = policy.revision();
        let held = policy.current();
        assert!(!policy.evaluate(&input()).allow);

        write(dir.path(), "decision := true");
        let reloaded = policy.reload().unwrap();
        assert_ne!(policy.revision(), first);
        assert_eq!(reloaded.revision(), &policy.revision());
        assert!(policy.evaluate(&input()).allow);
        // A set taken before the swap keeps deciding with its own revision.
        assert!(!held.evaluate(&input()).allow);
        assert_eq!(held.revision(), &first);

        let good = policy.revision();
        write(dir.path(), "decision := {");
        assert!(policy.reload().is_err());
        assert_eq!(policy.revision(), good);
        assert!(policy.evaluate(&input()).allow);
    }

    #[test]
    fn replace_returns_the_previous_set() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "decision := false");
        let paths = [dir.path().to_path_buf()];
        let policy = Policy::load(&paths, "data.portcullis.decision", Limits::default()).unwrap();
        let before = policy.revision();
        write(dir.path(), "decision := true");
        let next = PolicySet::load(&paths, "data.portcullis.decision", Limits::default()).unwrap();
        let previous = policy.replace(next);
        assert_eq!(previous.revision(), &before);
        assert!(policy.current().evaluate(&input()).allow);
    }
}
