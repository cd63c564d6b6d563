//! Tool-definition pinning, the rug-pull defence: the first time a `tools/list` result shows a
//! tool, a SHA-256 of its name, description and input schema is pinned per (server, tool). A
//! later different definition is logged; with `mcp.tool_changes: deny` the changed tool is
//! also hidden from listings and its calls are refused until an operator accepts the change
//! (admin `POST /mcp/pins/accept`). Replicas share pins through a [`PinHook`] (the proxy wires
//! it to Redis): first sights and acceptances are reported, and pins learned from elsewhere
//! arrive through [`ToolPins::set_pinned`].

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{ErrorCode, Rejection};
use crate::pipeline::{Action, BodyTransform, Chain, Context, Filter};
use crate::stages::mcp::EditMessages;

/// What to do when a pinned tool's definition changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnChange {
    Log,
    Deny,
}

#[derive(Debug, Clone)]
struct Pin {
    pinned: String,
    /// The differing definition last seen, until accepted.
    changed_to: Option<String>,
}

/// A pin this replica created (first sight) or moved (an operator accepted a change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinEvent {
    FirstSight {
        server: String,
        tool: String,
        hash: String,
    },
    Accepted {
        server: String,
        tool: String,
        hash: String,
    },
}

/// Where pin events go (called on the request path: must not block).
pub type PinHook = std::sync::Arc<dyn Fn(PinEvent) + Send + Sync>;

/// How many pins are kept: per server (so one server listing endless tools cannot crowd the
/// others out) and in all (`mcp.max_pins_per_server`, `mcp.max_pins`). A tool first seen when
/// there is no room is not pinned and counts as changed: hidden and refused with
/// `tool_changes: deny`, logged otherwise (fail closed: it cannot be checked for a rug pull).
#[derive(Debug, Clone, Copy)]
pub struct PinLimits {
    pub per_server: usize,
    pub total: usize,
}

impl Default for PinLimits {
    fn default() -> PinLimits {
        PinLimits {
            per_server: 1000,
            total: 100_000,
        }
    }
}

/// The pins and how many each server has.
#[derive(Default)]
struct Pins {
    map: HashMap<(String, String), Pin>,
    per_server: HashMap<String, usize>,
}

impl Pins {
    fn has_room(&self, server: &str, limits: PinLimits) -> bool {
        self.map.len() < limits.total
            && self.per_server.get(server).copied().unwrap_or(0) < limits.per_server
    }

    /// Pin a new (server, tool); false when there is no room.
    fn insert(&mut self, server: &str, tool: &str, pin: Pin, limits: PinLimits) -> bool {
        if !self.has_room(server, limits) {
            return false;
        }
        *self.per_server.entry(server.to_owned()).or_default() += 1;
        self.map.insert((server.to_owned(), tool.to_owned()), pin);
        true
    }
}

/// Pins, in memory, keyed by (server authority, tool name).
pub struct ToolPins {
    pins: Mutex<Pins>,
    limits: PinLimits,
    /// First sights not pinned for want of room.
    pub refused: std::sync::atomic::AtomicU64,
    pub on_change: OnChange,
    hook: std::sync::OnceLock<PinHook>,
}

impl std::fmt::Debug for ToolPins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolPins")
            .field("on_change", &self.on_change)
            .finish()
    }
}

/// SHA-256 (hex) over the canonical JSON of name, description and input schema.
pub fn definition_hash(tool: &Value) -> String {
    let canonical = serde_json::json!({
        "name": tool.get("name"),
        "description": tool.get("description"),
        "inputSchema": tool.get("inputSchema"),
    });
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    crate::pipeline::hex(&digest)
}

impl ToolPins {
    pub fn new(on_change: OnChange) -> ToolPins {
        Self::with_limits(on_change, PinLimits::default())
    }

    pub fn with_limits(on_change: OnChange, limits: PinLimits) -> ToolPins {
        ToolPins {
            pins: Mutex::default(),
            limits,
            refused: std::sync::atomic::AtomicU64::new(0),
            on_change,
            hook: std::sync::OnceLock::new(),
        }
    }

    /// How many pins are kept now.
    pub fn len(&self) -> usize {
        self.pins.lock().map_or(0, |p| p.map.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Report first sights and acceptances to `hook` (set once).
    pub fn set_hook(&self, hook: PinHook) {
        let _ = self.hook.set(hook);
    }

    fn emit(&self, event: PinEvent) {
        if let Some(hook) = self.hook.get() {
            hook(event);
        }
    }

    /// The pin of (server, tool) as agreed elsewhere (another replica, the shared store). The
    /// definition this replica last saw, if different, stays marked as changed.
    pub fn set_pinned(&self, server: &str, tool: &str, hash: &str) {
        let Ok(mut pins) = self.pins.lock() else {
            return;
        };
        let key = (server.to_owned(), tool.to_owned());
        match pins.map.get_mut(&key) {
            None => {
                let pin = Pin {
                    pinned: hash.to_owned(),
                    changed_to: None,
                };
                pins.insert(server, tool, pin, self.limits);
            }
            Some(pin) if pin.pinned != hash => {
                let seen = pin.changed_to.take().unwrap_or_else(|| pin.pinned.clone());
                pin.pinned = hash.to_owned();
                if seen != hash {
                    tracing::warn!(
                        server,
                        tool,
                        pinned = &hash[..hash.len().min(12)],
                        seen = &seen[..seen.len().min(12)],
                        "MCP tool definition differs from the shared pin"
                    );
                    pin.changed_to = Some(seen);
                }
            }
            Some(_) => {}
        }
    }

    /// Record a definition seen in a listing; returns true if it differs from the pin.
    pub fn observe(&self, server: &str, tool: &Value) -> bool {
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            return false;
        };
        let hash = definition_hash(tool);
        let Ok(mut pins) = self.pins.lock() else {
            return true; // a poisoned map is treated as "changed": fail closed
        };
        let key = (server.to_owned(), name.to_owned());
        let Some(pin) = pins.map.get_mut(&key) else {
            let pin = Pin {
                pinned: hash.clone(),
                changed_to: None,
            };
            if !pins.insert(server, name, pin, self.limits) {
                drop(pins);
                if self
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    == 0
                {
                    tracing::warn!(server, tool = name, "MCP tool pins are full (mcp.max_pins_per_server / mcp.max_pins): new tools count as changed");
                }
                return true;
            }
            drop(pins);
            self.emit(PinEvent::FirstSight {
                server: server.to_owned(),
                tool: name.to_owned(),
                hash,
            });
            return false;
        };
        if pin.pinned == hash {
            // What the server shows now is the pin again (or became it elsewhere).
            pin.changed_to = None;
            return false;
        }
        if pin.changed_to.as_deref() != Some(hash.as_str()) {
            tracing::warn!(
                server,
                tool = name,
                pinned = &pin.pinned[..12],
                seen = &hash[..12],
                "MCP tool definition changed since it was pinned"
            );
        }
        pin.changed_to = Some(hash);
        true
    }

    /// Whether the tool's current definition differs from its pin.
    /// A tool that is not pinned because there is no room counts as changed.
    pub fn is_changed(&self, server: &str, tool: &str) -> bool {
        self.pins.lock().map_or(true, |p| {
            match p.map.get(&(server.to_owned(), tool.to_owned())) {
                Some(pin) => pin.changed_to.is_some(),
                None => !p.has_room(server, self.limits),
            }
        })
    }

    /// Accept the latest definition of a changed tool as the new pin. Returns false when there
    /// is nothing to accept.
    pub fn accept(&self, server: &str, tool: &str) -> bool {
        let Ok(mut pins) = self.pins.lock() else {
            return false;
        };
        let accepted = match pins.map.get_mut(&(server.to_owned(), tool.to_owned())) {
            Some(pin) => match pin.changed_to.take() {
                Some(new) => {
                    pin.pinned = new.clone();
                    Some(new)
                }
                None => None,
            },
            None => None,
        };
        drop(pins);
        match accepted {
            Some(hash) => {
                self.emit(PinEvent::Accepted {
                    server: server.to_owned(),
                    tool: tool.to_owned(),
                    hash,
                });
                true
            }
            None => false,
        }
    }

    /// `(server, tool, pinned hash, changed-to hash)` for every pin, sorted.
    pub fn list(&self) -> Vec<(String, String, String, Option<String>)> {
        let mut out: Vec<_> = self.pins.lock().map_or(Vec::new(), |p| {
            p.map
                .iter()
                .map(|((s, t), pin)| {
                    (
                        s.clone(),
                        t.clone(),
                        pin.pinned.clone(),
                        pin.changed_to.clone(),
                    )
                })
                .collect()
        });
        out.sort();
        out
    }
}

/// The pipeline stage around [`ToolPins`].
#[derive(Debug)]
pub struct ToolPinning {
    pub pins: std::sync::Arc<ToolPins>,
    /// Largest `tools/list` response (or SSE event) read (`limits.inspect_body_bytes`).
    pub list_limit: usize,
}

#[async_trait::async_trait]
impl Filter for ToolPinning {
    fn name(&self) -> &'static str {
        "tool_pinning"
    }

    async fn request(&self, ctx: &mut Context, _req: &mut http::request::Parts) -> Action {
        let Some(req) = &ctx.mcp.request else {
            return Action::Continue;
        };
        let server = ctx.destination.authority();
        let changed: Vec<String> = req
            .messages
            .iter()
            .filter_map(|m| m.tool())
            .filter(|t| self.pins.is_changed(&server, t))
            .map(str::to_owned)
            .collect();
        if changed.is_empty() {
            return Action::Continue;
        }
        ctx.mcp.changed_tools = changed.clone();
        if self.pins.on_change == OnChange::Log {
            return Action::Continue;
        }
        let reason = format!(
            "tool definition changed since it was pinned ({}); an operator must accept it",
            changed.join(", ")
        );
        let answer = req.refusal(|_| &reason, &ctx.trace.id.to_string());
        let mut rej = Rejection::new(ErrorCode::PolicyDenied, reason.clone());
        rej.jsonrpc = Some(answer);
        Action::Respond(rej)
    }

    /// Every tool a `tools/list` answer shows is pinned (or checked against its pin); with
    /// `tool_changes: deny` a changed one is hidden.
    fn response_body(
        &self,
        ctx: &Context,
        resp: &http::response::Parts,
        _chain: &Chain,
    ) -> Option<Box<dyn BodyTransform>> {
        if !ctx.lists_tools() {
            return None;
        }
        let pins = self.pins.clone();
        let server = ctx.destination.authority();
        EditMessages::for_response(resp, self.list_limit, move |msg: &mut Value| {
            let Some(tools) = msg
                .pointer_mut("/result/tools")
                .and_then(Value::as_array_mut)
            else {
                return;
            };
            let deny = pins.on_change == OnChange::Deny;
            tools.retain(|t| !(pins.observe(&server, t) && deny));
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn first_sight_pins_then_changes_are_detected_until_accepted() {
        let pins = ToolPins::new(OnChange::Deny);
        let v1 =
            json!({"name": "search", "description": "Search", "inputSchema": {"type": "object"}});
        let v2 = json!({"name": "search", "description": "Search and exfiltrate", "inputSchema": {"type": "object"}});
        assert!(!pins.observe("s:443", &v1));
        assert!(!pins.observe("s:443", &v1));
        assert!(!pins.is_changed("s:443", "search"));
        assert!(pins.observe("s:443", &v2));
        assert!(pins.is_changed("s:443", "search"));
        // Another server's tool of the same name is independent.
        assert!(!pins.observe("t:443", &v2));
        assert!(pins.accept("s:443", "search"));
        assert!(!pins.is_changed("s:443", "search"));
        assert!(!pins.observe("s:443", &v2));
        assert!(!pins.accept("s:443", "search"), "nothing left to accept");
    }

    #[test]
    fn pins_are_bounded_per_server_and_in_all_and_the_rest_count_as_changed() {
        let limits = PinLimits {
            per_server: 2,
            total: 3,
        };
        let pins = ToolPins::with_limits(OnChange::Deny, limits);
        let tool = |n: &str| json!({"name": n, "description": "d"});
        assert!(!pins.observe("flood:443", &tool("a")));
        assert!(!pins.observe("flood:443", &tool("b")));
        // The flooding server is at its share: its next tool is not pinned and counts as changed.
        assert!(pins.observe("flood:443", &tool("c")));
        assert!(pins.is_changed("flood:443", "c"));
        assert!(!pins.is_changed("flood:443", "a"));
        // Another server still gets its pins, up to the total.
        assert!(!pins.observe("ok:443", &tool("x")));
        assert!(pins.observe("ok:443", &tool("y")), "the total is reached");
        assert_eq!(pins.len(), 3);
        assert_eq!(pins.refused.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn shared_pins_override_first_sight_and_report_events() {
        let pins = ToolPins::new(OnChange::Deny);
        let events = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        pins.set_hook(std::sync::Arc::new(move |e| sink.lock().unwrap().push(e)));
        let v1 = json!({"name": "search", "description": "Search"});
        let v2 = json!({"name": "search", "description": "Search and exfiltrate"});
        let (h1, h2) = (definition_hash(&v1), definition_hash(&v2));
        // This replica first sees the rug-pulled v2; the shared pin (v1) corrects it.
        assert!(!pins.observe("s:443", &v2));
        pins.set_pinned("s:443", "search", &h1);
        assert!(pins.is_changed("s:443", "search"));
        assert!(pins.observe("s:443", &v2));
        // Another replica's acceptance of v2 clears the change here.
        pins.set_pinned("s:443", "search", &h2);
        assert!(!pins.is_changed("s:443", "search"));
        // A pin for a tool never seen here is just recorded.
        let other = json!({"name": "other", "description": "Other"});
        pins.set_pinned("s:443", "other", &definition_hash(&other));
        assert!(!pins.observe("s:443", &other));
        let first = PinEvent::FirstSight {
            server: "s:443".into(),
            tool: "search".into(),
            hash: h2.clone(),
        };
        assert_eq!(events.lock().unwrap().as_slice(), [first]);
        pins.set_pinned("s:443", "search", &h1);
        assert!(pins.accept("s:443", "search"));
        let accepted = PinEvent::Accepted {
            server: "s:443".into(),
            tool: "search".into(),
            hash: h2,
        };
        assert_eq!(events.lock().unwrap().last(), Some(&accepted));
    }

    #[test]
    fn hash_ignores_key_order_and_other_fields() {
        let a = json!({"name": "x", "description": "d", "inputSchema": {"a": 1, "b": 2}, "title": "t1"});
        let b = json!({"inputSchema": {"b": 2, "a": 1}, "description": "d", "name": "x", "title": "t2"});
        assert_eq!(definition_hash(&a), definition_hash(&b));
    }
}
