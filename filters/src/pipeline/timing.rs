//! Timings of the steps inside one action (policy evaluation, credential fetch, upstream
//! call), recorded on the request path as plain `Instant`s and turned into child spans by the
//! span export stage at logging time. They exist only when the action's span will be exported
//! (`Context::steps` is `None` otherwise), so with telemetry off the request path pays nothing.

use std::time::Instant;

use crate::error::ErrorCode;

/// What a step was, with what its child span needs to say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// One policy evaluation: the index of its record in `Context::decisions`.
    Policy { decision: usize },
    /// One secret read for substitution. `cache_hit` when the store can tell (a remote source
    /// was not asked); `error` when it could not produce the secret. Names only, never values.
    Credential {
        name: String,
        cache_hit: Option<bool>,
        error: bool,
    },
    /// One request sent upstream, until its response headers (or the failure).
    Upstream {
        status: Option<u16>,
        error: Option<ErrorCode>,
    },
}

/// A non-zero span id from `z` through splitmix64's finaliser (a bijection: distinct inputs
/// give distinct ids, and the result shows no trace of the input's structure).
pub fn mixed_id(mut z: u64) -> [u8; 8] {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if z == 0 {
        z = 1;
    }
    z.to_be_bytes()
}

/// One timed step: a child span of the action's span.
#[derive(Debug, Clone)]
pub struct Step {
    pub span_id: [u8; 8],
    pub start: Instant,
    pub end: Instant,
    pub kind: StepKind,
}

/// The steps of one action, and the child span ids handed out for it.
#[derive(Debug)]
pub struct Steps {
    parent: [u8; 8],
    issued: u64,
    pub steps: Vec<Step>,
    /// The id of the client span of the upstream attempt about to be sent: it is the parent
    /// in that request's `traceparent` (and MCP `_meta.traceparent`).
    pub upstream_span: Option<[u8; 8]>,
    /// The caller's `tracestate`, for `_meta.tracestate` of forwarded MCP messages.
    pub tracestate: Option<String>,
}

impl Steps {
    pub fn new(parent: [u8; 8], tracestate: Option<String>) -> Steps {
        Steps {
            parent,
            issued: 0,
            steps: Vec::with_capacity(4),
            upstream_span: None,
            tracestate,
        }
    }

    /// A fresh child span id: the parent id and a counter through a bijective mixer
    /// (splitmix64's finaliser), so ids are unique within the action and look random.
    pub fn next_id(&mut self) -> [u8; 8] {
        self.issued += 1;
        mixed_id(
            u64::from_be_bytes(self.parent)
                .wrapping_add(self.issued.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        )
    }

    /// Record a step that started at `start` and ends now.
    pub fn record(&mut self, start: Instant, kind: StepKind) {
        let span_id = match kind {
            StepKind::Upstream { .. } => self.upstream_span.take(),
            _ => None,
        }
        .unwrap_or_else(|| self.next_id());
        self.steps.push(Step {
            span_id,
            start,
            end: Instant::now(),
            kind,
        });
    }
}

/// Whether an action's span is sampled: a caller's trace by its `sampled` flag (parent-based),
/// a new trace by the ratio applied to the trace id's low 63 bits (as OpenTelemetry's
/// `TraceIdRatioBased` does, so every replica agrees).
pub fn sampled(trace_id: &[u8; 16], parent: bool, flags: u8, ratio: f64) -> bool {
    if parent {
        return flags & 1 == 1;
    }
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    (u64::from_be_bytes(low) >> 1) < bound
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn child_ids_are_distinct_and_upstream_keeps_its_reserved_id() {
        let mut s = Steps::new([7; 8], None);
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| s.next_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&[7; 8]));
        let reserved = s.next_id();
        s.upstream_span = Some(reserved);
        s.record(
            Instant::now(),
            StepKind::Upstream {
                status: Some(200),
                error: None,
            },
        );
        assert_eq!(s.steps[0].span_id, reserved);
        assert!(s.upstream_span.is_none());
        assert!(s.steps[0].end >= s.steps[0].start);
    }

    #[test]
    fn sampling_follows_the_parent_then_the_ratio() {
        assert!(sampled(&[0xff; 16], true, 1, 0.0));
        assert!(!sampled(&[0; 16], true, 0, 1.0));
        assert!(sampled(&[0xff; 16], false, 0, 1.0));
        assert!(!sampled(&[0; 16], false, 1, 0.0));
        assert!(sampled(&[0; 16], false, 1, 0.5));
        assert!(!sampled(&[0xff; 16], false, 1, 0.5));
    }
}
