// Drives the approvals console (/approvals/console) in headless Chromium the way an approver
// would: enter the token, wait for the approval's row, read it, click Approve (or Deny), and
// wait until it shows up as decided. Test peer for the end-to-end tests.
//
// Usage: node console_approve.mjs --console URL --token TOKEN --approval ID
//          [--action approve|deny] [--screenshot PATH] [--timeout-ms N]
// Chromium: $PORTCULLIS_CHROMIUM or /usr/bin/chromium (Debian's; no browser is downloaded).
// Prints one JSON line:
//   {"ok":true,"row":{identity,destination,tool,arguments,reason},"decided_state":..,
//    "status":..,"page_errors":[..],"pwned":false}                        (exit 0)
//   {"ok":false,"error":..,"status":..,"page_errors":[..],"pwned":..}      (exit 1)
// `ok` is false too when `pwned` (attacker HTML ran: an assignment to window.__pwned, or a
// dialog); callers should also check that `page_errors` (console errors, uncaught exceptions,
// CSP violations) is empty. `row.arguments` is the parsed JSON when the cell parses,
// else its text; `row.tool` is null for HTTP approvals. Fields are read from the row's
// `[data-field=NAME]` elements (cells, or spans inside a cell for identity and tool).
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

let opts;
try {
  opts = parseArgs({
    options: {
      console: { type: 'string' },
      token: { type: 'string' },
      approval: { type: 'string' },
      action: { type: 'string', default: 'approve' },
      screenshot: { type: 'string' },
      'timeout-ms': { type: 'string', default: '20000' },
    },
  }).values;
  for (const k of ['console', 'token', 'approval']) if (!opts[k]) throw new Error(`--${k} is required`);
  if (!['approve', 'deny'].includes(opts.action)) throw new Error('--action must be approve or deny');
  if (!(Number(opts['timeout-ms']) > 0)) throw new Error('--timeout-ms must be a positive number');
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: String(e.message), page_errors: [] }));
  process.exit(1);
}

const timeoutMs = Number(opts['timeout-ms']);
const deadline = Date.now() + timeoutMs;
const left = () => Math.max(1, deadline - Date.now());
const want = opts.action === 'approve' ? 'granted' : 'denied';
const pageErrors = [];
let pwned = false;
let statusText = null;
let done = false;

function finish(result) {
  if (done) return;
  done = true;
  console.log(JSON.stringify({ ...result, status: statusText, page_errors: pageErrors, pwned }));
  process.exitCode = result.ok ? 0 : 1;
}

// Last resort should Chromium itself hang (launch, close): every wait below is bounded too.
setTimeout(() => {
  finish({ ok: false, error: `overall timeout (${timeoutMs} ms + 15 s grace)` });
  process.exit(1);
}, timeoutMs + 15000).unref();

// Runs in the page before its own scripts; not subject to the page's CSP.
const initScript = () => {
  let value;
  Object.defineProperty(window, '__pwned', {
    configurable: false,
    get: () => value,
    set: (v) => { value = v; console.error(`PWNED: window.__pwned set to ${String(v)}`); },
  });
  document.addEventListener('securitypolicyviolation', (e) => {
    console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || '(inline)'}`);
  });
};

const cssString = (s) => JSON.stringify(String(s)); // an id inside an attribute selector

// Waits for `selector`; while the status line shows an error, asks `fatal(statusText)` whether
// to give up (returns a message) or keep waiting (returns null). Bounded by the deadline.
async function waitFor(page, selector, what, fatal) {
  for (;;) {
    try {
      await page.locator(`${selector}, #status.error`).first().waitFor({ state: 'attached', timeout: left() });
    } catch {
      throw new Error(`${what} within ${timeoutMs} ms`);
    }
    if (await page.locator(selector).count()) return page.locator(selector);
    const why = fatal(await page.textContent('#status', { timeout: left() }));
    if (why) throw new Error(why);
    if (Date.now() >= deadline) throw new Error(`${what} within ${timeoutMs} ms`);
    await page.waitForTimeout(Math.min(200, left()));
  }
}

const browser = await chromium.launch({
  executablePath: process.env.PORTCULLIS_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  timeout: left(),
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
}).catch((e) => {
  finish({ ok: false, error: `launching Chromium: ${e.message}` });
  process.exit(1);
});

let page;
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  await context.addInitScript(initScript);
  page = await context.newPage();
  page.setDefaultTimeout(timeoutMs);
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    if (m.text().startsWith('PWNED:')) pwned = true;
    else pageErrors.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (e) => pageErrors.push(`pageerror: ${e.message}`));
  page.on('dialog', (d) => { pwned = true; pageErrors.push(`dialog: ${d.type()} ${d.message()}`); d.dismiss().catch(() => {}); });

  await page.goto(opts.console, { waitUntil: 'load', timeout: left() });
  await page.fill('#token', opts.token, { timeout: left() });
  await page.click('#connect', { timeout: left() });

  const refused = (st) => (st.includes('token refused') ? 'the console refused the token (401)' : null);
  const row = await waitFor(page, `#pending tr[data-approval-id=${cssString(opts.approval)}]`,
    `approval ${opts.approval} did not show up as pending`, refused);
  const field = async (name) => {
    const cell = row.locator(`[data-field="${name}"]`);
    return (await cell.count()) ? (await cell.first().textContent()).trim() : null;
  };
  const argsText = await field('arguments');
  let args = argsText || null;
  try { if (argsText) args = JSON.parse(argsText); } catch { /* keep the text */ }
  const rowData = {
    identity: await field('identity'),
    destination: await field('destination'),
    tool: await field('tool'),
    arguments: args,
    reason: await field('reason'),
  };

  await row.locator(`button[data-action="${opts.action}"]`).click({ timeout: left() });
  const decided = await waitFor(page, `#decided tr[data-approval-id=${cssString(opts.approval)}]`,
    `approval ${opts.approval} did not show up as decided`,
    (st) => refused(st) || (st.includes(`${opts.action} ${opts.approval} failed`) ? `the console says: ${st}` : null));
  const state = await decided.getAttribute('data-state');
  statusText = await page.textContent('#status', { timeout: left() });
  await page.evaluate(() => window.__pwned).then((v) => { if (v !== undefined) pwned = true; });
  if (opts.screenshot) await page.screenshot({ path: opts.screenshot, fullPage: true, timeout: left() });
  if (state !== want) finish({ ok: false, error: `approval decided as ${state}, expected ${want}` });
  else if (pwned) finish({ ok: false, error: 'attacker-controlled HTML ran in the console (window.__pwned set or a dialog opened)', row: rowData, decided_state: state });
  else finish({ ok: true, row: rowData, decided_state: state });
} catch (e) {
  if (page) {
    statusText = await page.textContent('#status', { timeout: 1000 }).catch(() => statusText);
    if (opts.screenshot) await page.screenshot({ path: opts.screenshot, fullPage: true, timeout: 3000 }).catch(() => {});
  }
  finish({ ok: false, error: String(e.message).split('\n')[0] });
} finally {
  await browser.close().catch(() => {});
}
