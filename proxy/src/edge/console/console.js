// Portcullis approvals console.
//
// Lists pending approvals from the admin API (same origin), lets an approver grant or deny
// them, and shows what was decided recently. The approver's token lives in sessionStorage and
// goes out as `Authorization: Bearer`; live updates come from /approvals/events, read with
// fetch() (EventSource cannot send that header), with a list refetch every 10 s as fallback.
//
// SECURITY: every value from the API is attacker-controlled. Text goes into the page only
// through createElement / text nodes / setAttribute on fixed, harmless attributes; never
// innerHTML or HTML strings. Ids go into URLs through encodeURIComponent.
"use strict";

const TOKEN_KEY = "portcullis-approver-token";
const DECIDED_MAX = 20;
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let session = null; // AbortController of the current connection; null when disconnected
let live = false, listError = "", note = "", noteIsError = false;
let pollTimer = 0, debounceTimer = 0, refreshSeq = 0;

// ---- status line ----
function renderStatus() {
  let conn = "not connected";
  if (session) conn = listError ? `connected, ${listError}` : live ? "connected, live" : "connected, live updates reconnecting…";
  $("status").textContent = note ? `${conn} — ${note}` : conn;
  $("status").classList.toggle("error", noteIsError || (!!session && !!listError));
}
function setNote(text, isError = false) { note = text; noteIsError = isError; renderStatus(); }

// ---- safe DOM helpers ----
// Show invisible/control and bidi-override characters as escapes, so text cannot hide or reorder.
const SNEAKY = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]/g;
function visible(v) {
  const s = v == null ? "" : typeof v === "string" ? v : JSON.stringify(v);
  return s.replace(SNEAKY, (c) => `\\u{${c.codePointAt(0).toString(16)}}`);
}
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v != null) e.setAttribute(k, String(v));
  for (const c of children) if (c != null) e.append(c instanceof Node ? c : document.createTextNode(visible(c)));
  return e;
}

// ---- API ----
class Refused extends Error {}
async function api(path, init = {}) {
  const res = await fetch(path, { ...init, cache: "no-store", headers: { Authorization: `Bearer ${token}` } });
  if (res.status === 401) { refused(); throw new Refused("token refused"); }
  return res;
}
async function list(state, signal) {
  const res = await api(`/approvals?state=${state}`, { signal });
  if (!res.ok) throw new Error(`GET /approvals?state=${state}: HTTP ${res.status}`);
  const body = await res.json();
  if (!Array.isArray(body)) throw new Error("unexpected list response");
  return body.filter((r) => r && typeof r === "object" && typeof r.id === "string");
}

// ---- connection ----
function connect() {
  disconnect();
  session = new AbortController();
  listError = ""; live = false;
  setNote("");
  refresh();
  pollTimer = setInterval(refresh, 10000);
  liveLoop(session.signal);
}
function disconnect() {
  if (session) session.abort();
  session = null; live = false;
  clearInterval(pollTimer); clearTimeout(debounceTimer);
  renderStatus();
}
function refused() {
  sessionStorage.removeItem(TOKEN_KEY);
  token = "";
  disconnect();
  setNote("token refused, enter it again", true);
  $("token").focus();
}

async function refresh() {
  if (!session) return;
  const signal = session.signal, seq = ++refreshSeq;
  try {
    const [pending, all] = await Promise.all([list("pending", signal), list("all", signal)]);
    if (signal.aborted || seq !== refreshSeq) return; // a newer refresh or connection won
    const when = (r) => Date.parse(r.decided_at || r.expires || r.created) || 0;
    const decided = all.filter((r) => r.state !== "pending").sort((a, b) => when(b) - when(a));
    render($("pending"), pending, pendingRow);
    render($("decided"), decided.slice(0, DECIDED_MAX), decidedRow);
    $("pending-empty").hidden = pending.length > 0;
    $("decided-empty").hidden = decided.length > 0;
    listError = "";
  } catch (e) {
    if (e instanceof Refused || signal.aborted) return;
    listError = `list refresh failed: ${e.message}`;
  }
  renderStatus();
}
function refreshSoon() { clearTimeout(debounceTimer); debounceTimer = setTimeout(refresh, 100); }

// Live updates: Server-Sent Events over fetch(); reconnect 2 s after any error or end.
async function liveLoop(signal) {
  while (!signal.aborted) {
    try { await readEvents(signal); } catch { /* reconnect below */ }
    if (signal.aborted) return; // disconnected, or a newer connection owns `live`
    live = false; renderStatus();
    await new Promise((r) => setTimeout(r, 2000));
  }
}
async function readEvents(sessionSignal) {
  const stalled = new AbortController(); // the server pings every 15 s; give up after 45 s of silence
  let watchdog = 0;
  const arm = () => { clearTimeout(watchdog); watchdog = setTimeout(() => stalled.abort(), 45000); };
  arm();
  try {
    const res = await api("/approvals/events", { signal: AbortSignal.any([sessionSignal, stalled.signal]) });
    if (!res.ok || !res.body) throw new Error(`events: HTTP ${res.status}`);
    live = true; renderStatus();
    refresh(); // catch up on whatever changed while we were not listening
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "", data = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      arm();
      buf += value;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (line === "") { if (data !== null) refreshSoon(); data = null; } // dispatch
        else if (line.startsWith(":")) continue; // comment / ping
        else if (/^data(:|$)/.test(line)) data = (data ?? "") + line.replace(/^data:? ?/, "");
        // `event:`, `id:`, `retry:` need no handling: every event means "refetch".
      }
    }
  } finally { clearTimeout(watchdog); }
}

// ---- rendering ----
// Keyed update: rows already shown are kept (so disabled buttons stay disabled), new ones
// are built, gone ones removed, order follows the list.
function render(table, records, build) {
  const body = table.tBodies[0];
  const have = new Map([...body.rows].map((tr) => [tr.dataset.approvalId, tr]));
  records.forEach((r, i) => {
    const tr = have.get(r.id) || build(r);
    have.delete(r.id);
    if (body.rows[i] !== tr) body.insertBefore(tr, body.rows[i] || null);
  });
  for (const tr of have.values()) tr.remove();
}
function actionCell(a, r) {
  const uses = r && r.scope != null ? `scope ${visible(r.scope)}, ${visible(r.uses)} use${r.uses === 1 ? "" : "s"}` : null;
  return el("td", { "data-field": "action" },
    el("span", { "data-field": "kind" }, a.kind), " ",
    el("span", { "data-field": "method" }, a.method), a.tool != null ? " " : null,
    a.tool != null ? el("span", { class: "tool", "data-field": "tool" }, a.tool) : null,
    el("span", { class: "sub", "data-field": "path" }, a.path),
    uses ? el("span", { class: "sub", "data-field": "scope" }, uses) : null);
}
// Identity cell: the workload, plus the subject it acts for when there is one.
const whoCell = (r) => el("td", { class: "who" }, el("span", { "data-field": "identity" }, r.identity),
  r.subject != null ? el("span", { class: "sub", "data-field": "subject" }, "for ", r.subject) : null);
function pendingRow(r) {
  const a = r.action || {};
  const args = a.arguments == null ? null : el("pre", null, JSON.stringify(a.arguments, null, 2));
  return el("tr", { "data-approval-id": r.id },
    whoCell(r),
    el("td", { "data-field": "destination" }, a.destination),
    actionCell(a, r),
    el("td", { "data-field": "arguments" }, args),
    el("td", { "data-field": "reason" }, r.reason),
    el("td", { "data-field": "age", "data-created": r.created, title: `created ${visible(r.created)}, expires ${visible(r.expires)}` }, age(r.created)),
    el("td", { class: "buttons" },
      el("button", { type: "button", "data-action": "approve" }, "Approve"),
      el("button", { type: "button", "data-action": "deny" }, "Deny")));
}
function decidedRow(r) {
  const a = r.action || {};
  return el("tr", { "data-approval-id": r.id, "data-state": r.state },
    el("td", { "data-field": "state" }, r.state),
    whoCell(r),
    el("td", { "data-field": "destination" }, a.destination),
    actionCell(a),
    el("td", { "data-field": "decided_by" }, r.decided_by),
    el("td", { "data-field": "decided_at" }, r.decided_at));
}
function age(created) {
  const s = Math.max(0, Math.floor((Date.now() - Date.parse(created)) / 1000));
  if (Number.isNaN(s)) return "?";
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d`;
}

// ---- decisions ----
async function decide(tr, action) {
  const id = tr.dataset.approvalId;
  const buttons = tr.querySelectorAll("button[data-action]");
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const res = await api(`/approvals/${encodeURIComponent(id)}/${action}`, { method: "POST" });
    if (res.ok) {
      setNote(`${action === "approve" ? "approved" : "denied"} ${id}`);
    } else {
      const why = (await res.text()).trim().slice(0, 300);
      setNote(`${action} ${id} failed: HTTP ${res.status}${why ? ` ${why}` : ""}`, true);
      buttons.forEach((b) => { b.disabled = false; });
    }
  } catch (e) {
    if (e instanceof Refused) return;
    setNote(`${action} ${id} failed: ${e.message}`, true);
    buttons.forEach((b) => { b.disabled = false; });
  }
  refresh();
}

// ---- wiring ----
document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) { setNote("enter a token", true); return; }
    token = t;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    $("token").placeholder = "token kept for this tab";
    connect();
  });
  $("pending").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-action]");
    if (b && !b.disabled && session) decide(b.closest("tr"), b.dataset.action === "deny" ? "deny" : "approve");
  });
  setInterval(() => {
    for (const td of document.querySelectorAll("td[data-created]")) td.textContent = age(td.dataset.created);
  }, 1000);
  if (token) connect(); else $("token").focus();
  renderStatus();
});
