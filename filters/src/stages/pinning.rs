//! Tool-definition pinning, the rug-pull defence: the first time a `tools/list` result shows a
//! tool, a SHA-256 of its canonical definition (name, title, description, annotations, input
//! and output schema: [`definition_hash`]) is pinned per (server, tool). A later different
//! definition is logged, and so is a known definition that reappears under a new name; with `mcp.tool_changes: deny` the changed tool is
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
    /// (server, definition without its name) -> the name it was first pinned under.
    shapes: HashMap<(String, String), String>,
    /// Servers that announced a changed tool list (`notifications/tools/list_changed`) since
    /// the proxy last saw their listing: their pins are not known to be current.
    stale: std::collections::HashSet<String>,
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

/// What a tool's pin covers: every field that tells a model what the tool is and does.
const PINNED_FIELDS: [&str; 6] = [
    "name",
    "title",
    "description",
    "annotations",
    "inputSchema",
    "outputSchema",
];

/// The pin of a definition: `v2:` and the SHA-256 (hex) of the canonical JSON (keys sorted at
/// every level, no whitespace, integral numbers without a fraction) of its name, title,
/// description, annotations, input and output schema; an absent field counts as `null`, so
/// adding one is a change. Anything else in the definition (icons, `_meta`) is not pinned.
pub fn definition_hash(tool: &Value) -> String {
    format!("v2:{}", digest_of(tool, &PINNED_FIELDS))
}

/// The pin format before `v2` (name, description and input schema), still recognised so pins
/// stored by an older version are upgraded, not reported as changes.
fn legacy_hash(tool: &Value) -> String {
    let canonical = serde_json::json!({
        "name": tool.get("name"),
        "description": tool.get("description"),
        "inputSchema": tool.get("inputSchema"),
    });
    crate::pipeline::hex(&Sha256::digest(canonical.to_string().as_bytes()))
}

/// The definition without its name: the same tool listed under another name has the same one.
fn shape_hash(tool: &Value) -> String {
    digest_of(tool, &PINNED_FIELDS[1..])
}

fn digest_of(tool: &Value, fields: &[&str]) -> String {
    let mut canonical = String::new();
    let picked: serde_json::Map<String, Value> = fields
        .iter()
        .map(|f| ((*f).to_owned(), tool.get(f).cloned().unwrap_or(Value::Null)))
        .collect();
    write_canonical(&Value::Object(picked), &mut canonical);
    crate::pipeline::hex(&Sha256::digest(canonical.as_bytes()))
}

/// JSON with object keys sorted at every level (whatever order the map type keeps), no
/// whitespace, and integral numbers written without a fraction (`1.0` as `1`).
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => {
                out.push_str(&format!("{}", f as i64));
            }
            _ => out.push_str(&n.to_string()),
        },
        other => out.push_str(&other.to_string()),
    }
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

    /// Record the definitions of one listing; for each, whether it is flagged: it differs from
    /// its pin, or it is new but a pinned definition whose name this listing no longer shows
    /// (the same tool renamed: flagged like a change).
    pub fn observe_listing(&self, server: &str, tools: &[Value]) -> Vec<bool> {
        if let Ok(mut pins) = self.pins.lock() {
            pins.stale.remove(server);
        }
        let listed: Vec<&str> = tools
            .iter()
            .filter_map(|t| t.get("name").and_then(Value::as_str))
            .collect();
        tools
            .iter()
            .map(|t| self.observe_in(server, t, &listed))
            .collect()
    }

    /// `server` announced that its tool list changed: until a listing of it is seen again,
    /// its pins are not known to hold ([`ToolPins::is_stale`]). Only a server with pins is
    /// remembered (the set stays bounded by the pins).
    pub fn mark_stale(&self, server: &str) {
        let Ok(mut pins) = self.pins.lock() else {
            return;
        };
        if pins.per_server.contains_key(server) && pins.stale.insert(server.to_owned()) {
            tracing::info!(
                server,
                "MCP server announced a changed tool list: its tools are checked again at the next listing"
            );
        }
    }

    /// Whether `server` announced a changed tool list not listed since (fail closed: a
    /// poisoned map counts as stale).
    pub fn is_stale(&self, server: &str) -> bool {
        self.pins.lock().map_or(true, |p| p.stale.contains(server))
    }

    /// [`ToolPins::observe_listing`] of a listing of this one tool.
    pub fn observe(&self, server: &str, tool: &Value) -> bool {
        self.observe_listing(server, std::slice::from_ref(tool))[0]
    }

    fn observe_in(&self, server: &str, tool: &Value, listed: &[&str]) -> bool {
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            return false;
        };
        let hash = definition_hash(tool);
        let shape = (server.to_owned(), shape_hash(tool));
        let Ok(mut pins) = self.pins.lock() else {
            return true; // a poisoned map is treated as "changed": fail closed
        };
        let key = (server.to_owned(), name.to_owned());
        let Some(pin) = pins.map.get_mut(&key) else {
            let renamed = pins
                .shapes
                .get(&shape)
                .filter(|known| !listed.contains(&known.as_str()))
                .filter(|known| {
                    pins.map
                        .contains_key(&(server.to_owned(), (*known).clone()))
                })
                .cloned();
            let pin = Pin {
                pinned: hash.clone(),
                // A known definition under a new name waits for an operator like a change.
                changed_to: renamed.is_some().then(|| hash.clone()),
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
            pins.shapes.entry(shape).or_insert_with(|| name.to_owned());
            drop(pins);
            if let Some(known) = renamed {
                tracing::warn!(
                    server,
                    tool = name,
                    known_as = %known,
                    "MCP tool definition reappears under a new name"
                );
                return true;
            }
            self.emit(PinEvent::FirstSight {
                server: server.to_owned(),
                tool: name.to_owned(),
                hash,
            });
            return false;
        };
        if pin.pinned == hash && pin.changed_to.as_deref() != Some(hash.as_str()) {
            // What the server shows now is the pin again (or became it elsewhere).
            pin.changed_to = None;
            return false;
        }
        if pin.pinned == legacy_hash(tool) {
            // Pinned by an older version over fewer fields, and those are unchanged: the pin
            // moves to the current form (and is shared as such).
            pin.pinned = hash.clone();
            pin.changed_to = None;
            drop(pins);
            self.emit(PinEvent::Accepted {
                server: server.to_owned(),
                tool: name.to_owned(),
                hash,
            });
            return false;
        }
        if pin.changed_to.as_deref() != Some(hash.as_str()) {
            tracing::warn!(
                server,
                tool = name,
                pinned = &pin.pinned[..pin.pinned.len().min(15)],
                seen = &hash[..hash.len().min(15)],
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

impl Filter for ToolPinning {
    fn name(&self) -> &'static str {
        "tool_pinning"
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
            // Any event stream may announce a changed tool list (the standalone GET stream
            // opens before the first listing): watched always, remembered for servers with
            // pins.
            let stream = resp
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
            return stream.then(|| {
                Box::new(ListChangedWatch {
                    pins: self.pins.clone(),
                    server: ctx.destination.authority(),
                    tail: Vec::new(),
                }) as Box<dyn BodyTransform>
            });
        }
        let server = ctx.destination.authority();
        let pins = self.pins.clone();
        EditMessages::for_response(resp, self.list_limit, move |msg: &mut Value| {
            let Some(tools) = msg
                .pointer_mut("/result/tools")
                .and_then(Value::as_array_mut)
            else {
                return;
            };
            let deny = pins.on_change == OnChange::Deny;
            let flagged = pins.observe_listing(&server, tools);
            let mut flags = flagged.into_iter();
            tools.retain(|_| !(flags.next().unwrap_or(true) && deny));
        })
    }

    fn request_now(&self, ctx: &mut Context, _req: &mut http::request::Parts) -> Action {
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
        let calls = req.messages.iter().any(|m| m.tool().is_some());
        let stale = calls && self.pins.is_stale(&server);
        if changed.is_empty() && !stale {
            return Action::Continue;
        }
        ctx.mcp.changed_tools = changed.clone();
        if self.pins.on_change == OnChange::Log {
            return Action::Continue;
        }
        let reason = match changed.is_empty() {
            true => "the server announced a changed tool list (notifications/tools/list_changed): list the tools again before calling one".to_owned(),
            false => format!(
                "tool definition changed since it was pinned ({}); an operator must accept it",
                changed.join(", ")
            ),
        };
        let answer = req.refusal(|_| &reason, &ctx.trace.id.to_string());
        let mut rej = Rejection::new(ErrorCode::PolicyDenied, reason.clone());
        rej.jsonrpc = Some(answer);
        Action::Respond(rej)
    }
}

const LIST_CHANGED: &[u8] = b"notifications/tools/list_changed";

/// Watches an event stream, passing every byte on as it comes, for the method name of
/// `notifications/tools/list_changed` (across chunk boundaries), raw or JSON-escaped in any mix
/// (`notifications\/tools\/list_changed`, `\u006c...`: the escaped matcher of the redactor):
/// seen, the server's pins are marked stale. The name anywhere in the stream counts (a tool
/// result quoting it too: the cost is one more listing, never a pass).
struct ListChangedWatch {
    pins: std::sync::Arc<ToolPins>,
    server: String,
    /// The last bytes of the previous chunk (fewer than the longest form of the name).
    tail: Vec<u8>,
}

fn list_changed() -> &'static crate::parse::redact::Needles {
    static NAME: std::sync::LazyLock<crate::parse::redact::Needles> =
        std::sync::LazyLock::new(|| crate::parse::redact::Needles::new([LIST_CHANGED], []));
    &NAME
}

/// Whether `data` names the method: raw (memmem, the common case), or escaped where the data
/// has an escape character at all.
fn names_list_changed(data: &[u8]) -> bool {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(LIST_CHANGED));
    FINDER.find(data).is_some()
        || memchr::memchr2(b'\\', b'%', data).is_some() && list_changed().found_in(data)
}

impl BodyTransform for ListChangedWatch {
    fn data(
        &mut self,
        chunk: bytes::Bytes,
    ) -> Result<bytes::Bytes, crate::pipeline::TransformError> {
        let keep = list_changed().longest() - 1;
        // The previous chunk's tail and this chunk's head: a name cut by the boundary.
        let mut seam = std::mem::take(&mut self.tail);
        seam.extend_from_slice(&chunk[..chunk.len().min(keep)]);
        if names_list_changed(&seam) || names_list_changed(&chunk) {
            self.pins.mark_stale(&self.server);
        }
        // The last `keep` bytes seen so far.
        self.tail = match chunk.len().checked_sub(keep) {
            Some(from) => chunk[from..].to_vec(),
            None => seam[seam.len().saturating_sub(keep)..].to_vec(),
        };
        Ok(chunk)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_list_changed_announcement_makes_calls_wait_for_a_fresh_listing() {
        let pins = std::sync::Arc::new(ToolPins::new(OnChange::Deny));
        let tool = json!({"name": "search", "description": "Search"});
        assert!(!pins.observe("s:443", &tool));
        let raw = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/tools/list_changed\"}\n\n";
        let escaped = br#"data: {"method":"notifications\/tools\/list\u005fchanged"}"#;
        // Split at every point: the name is found across any chunk boundary, in any form.
        for (event, cut) in [&raw[..], escaped]
            .into_iter()
            .flat_map(|e| (0..e.len()).map(move |cut| (e, cut)))
        {
            let mut watch = ListChangedWatch {
                pins: pins.clone(),
                server: "s:443".into(),
                tail: Vec::new(),
            };
            for part in [&event[..cut], &event[cut..]] {
                let out = watch.data(bytes::Bytes::copy_from_slice(part)).unwrap();
                assert_eq!(&out[..], part, "passed on unchanged");
            }
            assert!(pins.is_stale("s:443"), "cut at {cut}");
            pins.observe_listing("s:443", std::slice::from_ref(&tool));
            assert!(!pins.is_stale("s:443"), "a listing clears it");
        }
        for other in [
            &b"notifications/tools/list_change"[..],
            br"notifications\/tools\/list-changed",
            b"notifications/resources/list_changed",
        ] {
            assert!(
                !names_list_changed(other),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        // A server without pins is not remembered.
        pins.mark_stale("unknown:443");
        assert!(!pins.is_stale("unknown:443"));
    }

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
        let tool = |n: &str| json!({"name": n, "description": format!("does {n}")});
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
    fn the_pin_covers_what_a_model_reads_in_canonical_form() {
        let a = json!({"name": "x", "title": "X", "description": "d", "inputSchema": {"a": 1, "b": [1.0, {"d": 1, "c": 2}]},
            "icons": [{"src": "a.png"}], "_meta": {"k": 1}});
        let b = json!({"inputSchema": {"b": [1, {"c": 2, "d": 1}], "a": 1.0}, "description": "d", "name": "x", "title": "X",
            "icons": [], "_meta": {"k": 2}});
        assert_eq!(definition_hash(&a), definition_hash(&b));
        assert!(definition_hash(&a).starts_with("v2:"));
        for (field, value) in [
            ("title", json!("Delete everything")),
            ("annotations", json!({"destructiveHint": true})),
            ("outputSchema", json!({"type": "object"})),
            ("description", json!("d2")),
            ("inputSchema", json!({"a": 2})),
        ] {
            let mut changed = a.clone();
            changed[field] = value;
            assert_ne!(definition_hash(&a), definition_hash(&changed), "{field}");
        }
    }

    #[test]
    fn pins_of_the_older_form_are_upgraded_not_reported() {
        let pins = ToolPins::new(OnChange::Deny);
        let tool =
            json!({"name": "search", "description": "Search", "inputSchema": {"type": "object"}});
        pins.set_pinned("s:443", "search", &legacy_hash(&tool));
        assert!(!pins.observe("s:443", &tool));
        assert!(!pins.is_changed("s:443", "search"));
        assert_eq!(pins.list()[0].2, definition_hash(&tool));
        // A change of a field the older form covered is still a change.
        pins.set_pinned("s:443", "search", &legacy_hash(&tool));
        let evil = json!({"name": "search", "description": "Exfiltrate", "inputSchema": {"type": "object"}});
        assert!(pins.observe("s:443", &evil));
    }

    #[test]
    fn a_known_definition_under_a_new_name_is_flagged_until_accepted() {
        let pins = ToolPins::new(OnChange::Deny);
        let read = json!({"name": "read_file", "description": "Read a file", "inputSchema": {"type": "object"}});
        let mut alias = read.clone();
        alias["name"] = json!("read_file_v2");
        assert!(!pins.observe("s:443", &read));
        assert!(pins.observe("s:443", &alias), "a known definition renamed");
        assert!(pins.is_changed("s:443", "read_file_v2"));
        assert!(
            pins.observe("s:443", &alias),
            "still flagged on the next listing"
        );
        assert!(pins.accept("s:443", "read_file_v2"));
        assert!(!pins.observe("s:443", &alias));
        // Two tools alike in all but the name, listed together from the start: not a rename.
        let both = [
            json!({"name": "start", "description": "Control the service"}),
            json!({"name": "stop", "description": "Control the service"}),
        ];
        assert_eq!(pins.observe_listing("u:443", &both), [false, false]);
        assert_eq!(pins.observe_listing("u:443", &both), [false, false]);
        // The same definition on another server is that server's own first sight.
        assert!(!pins.observe("t:443", &alias));
    }
}
