#!/usr/bin/env node
// Compare two conformance runs check by check:
//
//   node compare.mjs BASE_DIR OTHER_DIR [--allowed FILE] [--way NAME]
//
// BASE_DIR / OTHER_DIR: a run.sh results dir (CONFORMANCE_RESULTS: one subdir per leg, e.g.
// server-2025, server-2026) or a single leg's dir (the runner's -o dir). Reads every
// <scenario dir>/checks.json the runner wrote; scenario dirs are named
// [server-]<scenario>-<ISO timestamp>, and client scenarios can sit one level down (auth/...).
// A leg's solo-<scenario>/ re-run (run.sh's timing retry) replaces that scenario's first run, as it
// does in run.sh's verdict.
//
// Prints, per leg and scenario, every check whose status differs (id, name where ids repeat, base
// status, other status, error messages), and exits 1 if any differs, unless the allow-list names it.
// Timestamps, details and ordering are ignored: checks are matched by id, then by name where a
// scenario repeats an id, and where id+name still repeat, their statuses are compared as a multiset.
// Groups made only of INFO records (the runner's request/response log in client scenarios) are
// compared by presence only, not by count.
//
// --allowed FILE (YAML or JSON): { <scenario>: { <check id>: "reason" } }, scenario names as the
// runner prints them (no server- prefix, no timestamp); check id "*" covers every check of the
// scenario, including a scenario missing on one side. Allowed differences are printed with their
// reason and do not fail the comparison; entries that matched nothing are listed at the end.
// An entry can be limited to some ways of reaching the server: instead of the reason string,
//   { "ways": ["Absolute", "Gateway"], "reason": "..." }
// then it allows the difference only when OTHER_DIR was run one of those ways: --way NAME, else
// the "way" that run.sh wrote to OTHER_DIR/run.json (Direct, Mitm, Tunnel, Absolute, Gateway).
// With no way known, such an entry allows nothing.
//
// Exit status: 0 no differences (or only allowed ones), 1 differences, 2 usage or input error.
//
//   node compare.mjs --expected-failures BASELINE.yaml --allowed FILE --way NAME [--mode server|client]
//
// prints BASELINE.yaml (the runner's expected-failures file) with the allow-list entries that apply
// to way NAME added to its `server:` (or `client:`) list, as `<scenario>:<check id>` (or the whole
// `<scenario>` for "*"): run.sh hands that to the runner through the proxy, so that a difference
// the proxy makes on purpose is an expected failure there, and a stale one (it no longer fails)
// is reported by the runner as such. Nothing is added for way Direct.
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { basename, dirname, join, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
const TS = /-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$/;

function die(msg) {
  console.error(`compare.mjs: ${msg}`);
  process.exit(2);
}

// --- arguments ---------------------------------------------------------------------------------
const positional = [];
let allowedFile;
let wayArg;
let baselineFile;
let modeArg = 'server';
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === '--allowed') allowedFile = process.argv[++i] ?? die('--allowed needs a file');
  else if (a.startsWith('--allowed=')) allowedFile = a.slice('--allowed='.length);
  else if (a === '--way') wayArg = process.argv[++i] ?? die('--way needs a name');
  else if (a.startsWith('--way=')) wayArg = a.slice('--way='.length);
  else if (a === '--expected-failures') baselineFile = process.argv[++i] ?? die('--expected-failures needs a file');
  else if (a === '--mode') modeArg = process.argv[++i] ?? die('--mode needs server or client');
  else if (a === '-h' || a === '--help') {
    console.log('usage: node compare.mjs BASE_DIR OTHER_DIR [--allowed FILE] [--way NAME]');
    process.exit(0);
  } else if (a.startsWith('--')) die(`unknown option ${a}`);
  else positional.push(a);
}
if (baselineFile !== undefined) {
  if (positional.length || !allowedFile || !wayArg) die('usage: node compare.mjs --expected-failures BASELINE.yaml --allowed FILE --way NAME [--mode server|client]');
  if (modeArg !== 'server' && modeArg !== 'client') die(`--mode: server or client, not ${modeArg}`);
} else if (positional.length !== 2) {
  die('usage: node compare.mjs BASE_DIR OTHER_DIR [--allowed FILE] [--way NAME]');
}
const [baseDir, otherDir] = positional.map((p) => resolve(p));
const yamlLib = () => createRequire(join(HERE, 'node_modules/@modelcontextprotocol/conformance/package.json'))('yaml');

// --- allow-list ----------------------------------------------------------------------------------
function loadAllowed(file) {
  if (!file) return {};
  let text;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    die(`cannot read allow-list ${file}: ${e.message}`);
  }
  let doc;
  try {
    if (/\.json$/i.test(file)) doc = JSON.parse(text);
    else {
      // The runner's own YAML parser (a dependency of @modelcontextprotocol/conformance).
      doc = yamlLib().parse(text);
    }
  } catch (e) {
    die(`cannot parse allow-list ${file}: ${e.message}`);
  }
  doc ??= {};
  if (typeof doc !== 'object' || Array.isArray(doc)) die(`allow-list ${file}: expected {scenario: {check_id: reason}}`);
  for (const [scenario, checks] of Object.entries(doc)) {
    if (!checks || typeof checks !== 'object' || Array.isArray(checks)) {
      die(`allow-list ${file}: ${scenario} must map check ids to reasons`);
    }
    for (const [id, entry] of Object.entries(checks)) {
      const where = `allow-list ${file}: ${scenario} / ${id}`;
      if (typeof entry === 'string') {
        if (!entry.trim()) die(`${where} needs a reason`);
        checks[id] = { reason: entry };
        continue;
      }
      if (!entry || typeof entry !== 'object' || Array.isArray(entry)) die(`${where}: a reason, or {ways, reason}`);
      const extra = Object.keys(entry).filter((k) => k !== 'ways' && k !== 'reason');
      if (extra.length) die(`${where}: unknown key(s) ${extra.join(', ')}`);
      if (typeof entry.reason !== 'string' || !entry.reason.trim()) die(`${where} needs a reason`);
      if (entry.ways !== undefined
        && (!Array.isArray(entry.ways) || !entry.ways.length || !entry.ways.every((w) => typeof w === 'string' && w))) {
        die(`${where}: ways must be a non-empty list of names`);
      }
    }
  }
  return doc;
}
const allowed = loadAllowed(allowedFile);
const allowedUsed = new Set();

// How OTHER_DIR was run (see the header): --way, else run.json beside the legs (or one level up,
// for a single leg dir).
function wayOf(dir) {
  if (wayArg) return wayArg;
  for (const d of [dir, dirname(dir)]) {
    const f = join(d, 'run.json');
    if (!existsSync(f)) continue;
    try {
      const way = JSON.parse(readFileSync(f, 'utf8')).way;
      if (typeof way === 'string' && way) return way;
    } catch (e) {
      die(`cannot parse ${f}: ${e.message}`);
    }
  }
  return undefined;
}
const way = wayOf(otherDir);
const allowReason = (scenario, id) => {
  const s = allowed[scenario];
  if (!s) return undefined;
  for (const key of [id, '*']) {
    const entry = Object.hasOwn(s, key) ? s[key] : undefined;
    if (!entry || (entry.ways && !entry.ways.includes(way))) continue;
    allowedUsed.add(`${scenario}\0${key}`);
    return entry.reason;
  }
  return undefined;
};

// --- expected-failures for a way (see the header) -------------------------------------------------
if (baselineFile !== undefined) {
  let doc;
  try {
    doc = yamlLib().parse(readFileSync(baselineFile, 'utf8')) ?? {};
  } catch (e) {
    die(`cannot read ${baselineFile}: ${e.message}`);
  }
  if (typeof doc !== 'object' || Array.isArray(doc)) die(`${baselineFile}: expected {server: [...], client: [...]}`);
  if (wayArg !== 'Direct') {
    const list = (doc[modeArg] ??= []);
    if (!Array.isArray(list)) die(`${baselineFile}: ${modeArg} is not a list`);
    const whole = new Set(list.map(String).filter((e) => !e.includes(':')));
    for (const [scenario, checks] of Object.entries(allowed)) {
      for (const [id, entry] of Object.entries(checks)) {
        if (entry.ways && !entry.ways.includes(wayArg)) continue;
        // The runner refuses a per-check entry beside its whole scenario.
        if (whole.has(scenario)) continue;
        const add = id === '*' ? scenario : `${scenario}:${id}`;
        if (!list.includes(add)) list.push(add);
      }
    }
  }
  process.stdout.write(`# ${baselineFile} with the allow-list entries for way ${wayArg} (compare.mjs)\n${yamlLib().stringify(doc)}`);
  process.exit(0);
}

// --- reading results -----------------------------------------------------------------------------
function findChecks(dir) {
  const out = [];
  const walk = (d) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name === 'checks.json') out.push(p);
    }
  };
  walk(dir);
  return out;
}

// root -> Map<legName, legDir>. A leg dir holds scenario dirs (name ends in a timestamp) directly.
function legsOf(root) {
  if (!existsSync(root) || !statSync(root).isDirectory()) die(`not a directory: ${root}`);
  const isLeg = (d) => readdirSync(d, { withFileTypes: true }).some((e) => e.isDirectory() && TS.test(e.name));
  const legs = new Map();
  if (isLeg(root)) {
    legs.set(basename(root), root);
    return legs;
  }
  for (const e of readdirSync(root, { withFileTypes: true })) {
    if (e.isDirectory() && findChecks(join(root, e.name)).length) legs.set(e.name, join(root, e.name));
  }
  if (!legs.size) die(`no checks.json under ${root}`);
  return legs;
}

// legDir -> Map<scenario, {checks, file, note}>
function scenariosOf(legName, legDir) {
  const client = /^client/.test(legName);
  const found = new Map();
  for (const file of findChecks(legDir)) {
    const parts = relative(legDir, dirname(file)).split(sep);
    let solo = false;
    if (parts[0].startsWith('solo-') && parts.length > 1) {
      solo = true;
      parts.shift();
    }
    const last = parts.length - 1;
    const stamp = TS.exec(parts[last])?.[0] ?? '';
    parts[last] = parts[last].slice(0, parts[last].length - stamp.length);
    if (!client) parts[0] = parts[0].replace(/^(authorization-server|server)-/, '');
    const scenario = parts.join('/');
    let checks;
    try {
      checks = JSON.parse(readFileSync(file, 'utf8'));
    } catch (e) {
      die(`cannot parse ${file}: ${e.message}`);
    }
    if (!Array.isArray(checks)) die(`${file}: not an array of checks`);
    const entry = { checks, file, solo, stamp };
    const prev = found.get(scenario);
    // A solo re-run wins; otherwise the latest run of a scenario.
    if (!prev || (solo && !prev.solo) || (solo === prev.solo && stamp > prev.stamp)) {
      entry.note = prev ? (solo && !prev.solo ? 'solo re-run' : 'latest of several runs') : undefined;
      found.set(scenario, entry);
    }
  }
  return found;
}

// --- comparing -------------------------------------------------------------------------------------
const groupBy = (checks) => {
  const byId = new Map();
  for (const c of checks) {
    const id = String(c?.id ?? '(no id)');
    if (!byId.has(id)) byId.set(id, []);
    byId.get(id).push(c);
  }
  return byId;
};
const counts = (list) => {
  const m = {};
  for (const c of list) m[c.status] = (m[c.status] || 0) + 1;
  return Object.keys(m).sort().map((k) => (m[k] > 1 ? `${k}×${m[k]}` : k)).join(', ') || '(missing)';
};
const errorsOf = (list) => [...new Set(list.map((c) => c.errorMessage).filter(Boolean))];

// Differences between two lists of checks sharing an id: [{label, base, other, baseErr, otherErr}]
function diffGroup(id, a, b) {
  const infoOnly = (l) => l.every((c) => c.status === 'INFO');
  if (a.length && b.length && infoOnly(a) && infoOnly(b)) return [];
  if (a.length <= 1 && b.length <= 1) {
    const [x, y] = [a[0], b[0]];
    if (x?.status === y?.status) return [];
    return [{ label: id, base: x?.status ?? '(missing)', other: y?.status ?? '(missing)',
      baseErr: x?.errorMessage ? [x.errorMessage] : [], otherErr: y?.errorMessage ? [y.errorMessage] : [] }];
  }
  // Repeated id: match by name, then compare what is left as multisets.
  const byName = (l) => {
    const m = new Map();
    for (const c of l) {
      const n = String(c.name ?? '');
      if (!m.has(n)) m.set(n, []);
      m.get(n).push(c);
    }
    return m;
  };
  const [na, nb] = [byName(a), byName(b)];
  const out = [];
  for (const name of [...new Set([...na.keys(), ...nb.keys()])].sort()) {
    const [x, y] = [na.get(name) ?? [], nb.get(name) ?? []];
    if (x.length && y.length && infoOnly(x) && infoOnly(y)) continue;
    if (counts(x) === counts(y)) continue;
    const bad = (l) => l.filter((c) => c.status !== 'SUCCESS' && c.status !== 'INFO');
    out.push({ label: `${id} [${name}]${x.length > 1 || y.length > 1 ? ` ×${Math.max(x.length, y.length)}` : ''}`,
      base: counts(x), other: counts(y), baseErr: errorsOf(bad(x)), otherErr: errorsOf(bad(y)) });
  }
  return out;
}

const baseLegs = legsOf(baseDir);
const otherLegs = legsOf(otherDir);
// Comparing two single leg dirs with different names (e.g. server-2026 of two runs): pair them.
if (baseLegs.size === 1 && otherLegs.size === 1 && [...baseLegs.keys()][0] !== [...otherLegs.keys()][0]) {
  const [dir] = otherLegs.values();
  otherLegs.clear();
  otherLegs.set([...baseLegs.keys()][0], dir);
}

console.log(`base:  ${baseDir}\nother: ${otherDir} (way: ${way ?? 'unknown'})${allowedFile ? `\nallowed: ${resolve(allowedFile)}` : ''}`);
let unallowed = 0;
let allowedCount = 0;
let comparedChecks = 0;
for (const leg of [...new Set([...baseLegs.keys(), ...otherLegs.keys()])].sort()) {
  const lines = [];
  if (!baseLegs.has(leg) || !otherLegs.has(leg)) {
    console.log(`\n== leg ${leg}: only in ${baseLegs.has(leg) ? 'base' : 'other'}`);
    unallowed++;
    continue;
  }
  const sa = scenariosOf(leg, baseLegs.get(leg));
  const sb = scenariosOf(leg, otherLegs.get(leg));
  for (const scenario of [...new Set([...sa.keys(), ...sb.keys()])].sort()) {
    const [ea, eb] = [sa.get(scenario), sb.get(scenario)];
    const notes = [ea?.note && `base: ${ea.note}`, eb?.note && `other: ${eb.note}`].filter(Boolean);
    const head = `  ${scenario}${notes.length ? ` (${notes.join('; ')})` : ''}`;
    if (!ea || !eb) {
      const reason = allowReason(scenario, '*');
      lines.push(head, `    ${reason ? 'ALLOWED' : 'DIFF   '} whole scenario: only in ${ea ? 'base' : 'other'}${reason ? `  -- ${reason}` : ''}`);
      reason ? allowedCount++ : unallowed++;
      continue;
    }
    const [ga, gb] = [groupBy(ea.checks), groupBy(eb.checks)];
    const scenarioLines = [];
    for (const id of [...new Set([...ga.keys(), ...gb.keys()])].sort()) {
      comparedChecks++;
      for (const d of diffGroup(id, ga.get(id) ?? [], gb.get(id) ?? [])) {
        const reason = allowReason(scenario, id);
        reason ? allowedCount++ : unallowed++;
        scenarioLines.push(`    ${reason ? 'ALLOWED' : 'DIFF   '} ${d.label}: ${d.base} -> ${d.other}${reason ? `  -- ${reason}` : ''}`);
        for (const e of d.baseErr) scenarioLines.push(`        base:  ${e}`);
        for (const e of d.otherErr) scenarioLines.push(`        other: ${e}`);
      }
    }
    if (scenarioLines.length) lines.push(head, ...scenarioLines);
  }
  console.log(`\n== leg ${leg}: ${sa.size} vs ${sb.size} scenarios${lines.length ? '' : ', no differences'}`);
  for (const l of lines) console.log(l);
}

const unused = [];
for (const [scenario, checks] of Object.entries(allowed)) {
  for (const [id, entry] of Object.entries(checks)) {
    if (allowedUsed.has(`${scenario}\0${id}`)) continue;
    const scope = entry.ways ? ` (only ${entry.ways.join(', ')}${entry.ways.includes(way) ? '' : '; not this way'})` : '';
    unused.push(`${scenario}: ${id}${scope}`);
  }
}
if (unused.length) {
  console.log('\nallow-list entries that matched no difference (fine if they cover another mode or leg):');
  for (const u of unused) console.log(`  ${u}`);
}
console.log(`\n${comparedChecks} check ids compared; ${unallowed} difference(s) not allowed, ${allowedCount} allowed`);
process.exit(unallowed ? 1 : 0);
