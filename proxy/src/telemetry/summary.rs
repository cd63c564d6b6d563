//! The summary line: one compact log line per action's span tree (target `portcullis::span`),
//! for `dev` without a collector. Like the access log: no query string, no header values, no
//! credential values.

use super::spans::{span_name, url, verdict, Joined, SCRATCH, SCRATCH_KEEP};
use super::*;

/// The summary line: the action, who, the verdict, the ids, then each step with its time.
/// Like the access log: no query string, no header values, no credential values.
pub(super) fn summary(ctx: &Context, outcome: &Outcome) {
    SCRATCH.with_borrow_mut(|s| {
        span_name(ctx, &mut s.name);
        let line = &mut s.text;
        line.clear();
        line.push_str(&s.name);
        if ctx.kind != ActionKind::Connect {
            url(ctx, &mut s.url);
            line.push(' ');
            line.push_str(&s.url);
        }
        let _ = write!(
            line,
            " -> {} in {:.1?} | {}",
            outcome.status, outcome.duration, ctx.peer.spiffe_id
        );
        if let Some((word, rec)) = verdict(ctx) {
            let _ = write!(line, " {word} {:?}", rec.decision.reason);
        }
        if let Some(code) = ctx.error {
            let _ = write!(line, " error={}", code.as_str());
        }
        if !ctx.credentials.names.is_empty() {
            let _ = write!(line, " credentials={}", Joined(&ctx.credentials.names));
        }
        let _ = write!(
            line,
            " | trace={} span={}",
            ctx.trace.id,
            span_hex(&ctx.trace.span_id)
        );
        if let Some(p) = ctx.trace.parent_span_id {
            let _ = write!(line, " parent={}", span_hex(&p));
        }
        let steps = ctx.trace.steps.as_deref().map_or(&[][..], |s| &s.steps[..]);
        for (i, step) in steps.iter().enumerate() {
            line.push_str(if i == 0 { " | " } else { ", " });
            summary_step(line, ctx, step);
        }
        tracing::info!(target: "portcullis::span", "{line}");
        if line.capacity() > SCRATCH_KEEP {
            *line = String::new();
        }
    });
}

pub(super) fn summary_step(line: &mut String, ctx: &Context, step: &Step) {
    let took = step.end.saturating_duration_since(step.start);
    let _ = match &step.kind {
        StepKind::Policy { decision } => {
            let word = match ctx.decisions.get(*decision) {
                Some(r) if r.decision.allow => "allow",
                Some(_) => "deny",
                None => "?",
            };
            write!(line, "policy.evaluate {took:.1?} {word}")
        }
        StepKind::Credential {
            name,
            cache_hit,
            error,
        } => {
            let how = match (error, cache_hit) {
                (true, _) => " unavailable",
                (false, Some(true)) => " cached",
                (false, Some(false)) => " fetched",
                (false, None) => "",
            };
            write!(line, "credential.fetch {name} {took:.1?}{how}")
        }
        StepKind::Upstream { status, error } => {
            let _ = write!(line, "upstream {} {took:.1?}", ctx.method);
            match (status, error) {
                (_, Some(code)) => write!(line, " {}", code.as_str()),
                (Some(s), None) => write!(line, " {s}"),
                (None, None) => Ok(()),
            }
        }
    };
}
