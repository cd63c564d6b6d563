// A Streamable HTTP MCP server built with the official TypeScript SDK, served over TLS.
// Test peer for Portcullis' MCP end-to-end tests (the TypeScript twin of
// tests/python/mcp_server.py, with its v1 tool variant).
//
// Usage:
//   node mcp_ts_server.mjs --sdk v1|v2 --port PORT --cert CERT.pem --key KEY.pem
//                          --record RECORD.jsonl [--json-response] [--stateless]
//
// --sdk v2: @modelcontextprotocol/server 2.x. 2026-07-28 requests (no initialize, no session)
//   are served by createMcpHandler, which checks the Mcp-Method / Mcp-Name /
//   MCP-Protocol-Version headers against the body; 2025-era requests (initialize ...) by a
//   sessionful WebStandardStreamableHTTPServerTransport, or with --stateless by
//   createMcpHandler's own per-request legacy serving (no Mcp-Session-Id).
// --sdk v1: @modelcontextprotocol/sdk 1.x (protocol up to 2025-11-25), low-level Server;
//   sessions (Mcp-Session-Id) unless --stateless (sessionIdGenerator undefined).
// --json-response: answers as JSON bodies instead of SSE streams (v2 modern: progress
//   notifications are then dropped, as in the Python SDK's JSON mode). The SDK has no JSON mode
//   for createMcpHandler's own legacy serving: with --sdk v2 --stateless, 2025-era answers are
//   SSE streams whatever this flag says.
//
// Listens on https://127.0.0.1:PORT, endpoint /mcp. Prints exactly one line `READY` on stdout
// once the socket is listening; exits 0 on SIGTERM/SIGINT.
//
// Every JSON-RPC message in the body of a POST to /mcp is appended to RECORD as one JSON line
// (before the SDK sees it), the shape mcp_server.py writes:
//   {"method": "tools/call", "id": 3, "tool": "search_issues", "arguments": {...},
//    "session": <Mcp-Session-Id or null>, "protocol_version": <MCP-Protocol-Version or null>,
//    "traceparent": <traceparent or null>,
//    "headers": {"mcp-method": .., "mcp-name": .., "mcp-protocol-version": ..}}  (null when absent)
// A notification has "id": null; a client response/error has "method": null and "kind";
// params._meta is under "meta"; batch elements carry "batch": true; a body that is not a JSON
// object/array is recorded as {"raw": "<text>"}.
import { appendFileSync, readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { randomUUID } from 'node:crypto';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: {
    sdk: { type: 'string' },
    port: { type: 'string' },
    cert: { type: 'string' },
    key: { type: 'string' },
    record: { type: 'string' },
    'json-response': { type: 'boolean', default: false },
    stateless: { type: 'boolean', default: false },
  },
});
for (const name of ['port', 'cert', 'key', 'record']) {
  if (!args[name]) throw new Error(`--${name} is required`);
}
if (!['v1', 'v2'].includes(args.sdk)) throw new Error('--sdk must be v1 or v2');
const json = args['json-response'];

// The tools of mcp_server.py's v1 variant, with the schemas FastMCP derives for them.
const str = (title) => ({ title, type: 'string' });
const TOOLS = {
  search_issues: {
    description: 'Search issues',
    properties: { query: str('Query') },
    run: ({ query }) => `found 3 issues for ${query}`,
  },
  create_issue: {
    description: 'Create an issue in a repository',
    properties: { owner: str('Owner'), repo: str('Repo'), title: str('Title') },
    run: ({ owner, repo, title }) => `created issue '${title}' in ${owner}/${repo}`,
  },
  delete_repo: {
    description: 'Delete a repository',
    properties: { owner: str('Owner'), repo: str('Repo') },
    run: ({ owner, repo }) => `deleted ${owner}/${repo}`,
  },
  slow_progress: {
    description: "Send `steps` progress notifications 300 ms apart, then return 'done'",
    properties: { steps: { title: 'Steps', type: 'integer' } },
    // `progress(i, total, message)` sends one notification (nothing without a progressToken).
    run: async ({ steps }, progress) => {
      for (let i = 0; i < steps; i++) {
        await progress(i + 1, steps, `step ${i + 1}/${steps}`);
        await new Promise((resolve) => setTimeout(resolve, 300)); // the tool's pace, not a sync
      }
      return 'done';
    },
  },
};
const inputSchema = (name, t) => ({
  properties: t.properties,
  required: Object.keys(t.properties),
  title: `${name}Arguments`,
  type: 'object',
});
const outputSchema = (name) => ({
  properties: { result: { title: 'Result', type: 'string' } },
  required: ['result'],
  title: `${name}Output`,
  type: 'object',
});
const result = (text) => ({ content: [{ type: 'text', text }], structuredContent: { result: text } });
const SERVER_INFO = { name: 'portcullis-test-server', version: args.sdk === 'v2' ? '2.4.0' : '1.32.2' };

// handle(Request) -> Promise<Response> for the chosen SDK; close() on shutdown.
async function v2Handler() {
  const sdk = await import('@modelcontextprotocol/server');
  const factory = () => {
    const server = new sdk.McpServer(SERVER_INFO);
    for (const [name, t] of Object.entries(TOOLS)) {
      const config = {
        description: t.description,
        inputSchema: sdk.fromJsonSchema(inputSchema(name, t)),
        outputSchema: sdk.fromJsonSchema(outputSchema(name)),
      };
      server.registerTool(name, config, async (toolArgs, ctx) => {
        const token = ctx.mcpReq._meta?.progressToken;
        const progress = async (progress, total, message) => {
          if (token === undefined) return;
          await ctx.mcpReq.notify({
            method: 'notifications/progress',
            params: { progressToken: token, progress, total, message },
          });
        };
        return result(await t.run(toolArgs, progress));
      });
    }
    return server;
  };
  const responseMode = json ? 'json' : 'sse';
  if (args.stateless) {
    const handler = sdk.createMcpHandler(factory, { responseMode, legacy: 'stateless' });
    return { handle: (req) => handler.fetch(req), close: () => handler.close() };
  }
  const modern = sdk.createMcpHandler(factory, { responseMode, legacy: 'reject' });
  const legacy = sessionful(
    (opts) => new sdk.WebStandardStreamableHTTPServerTransport(opts),
    factory,
  );
  return {
    handle: async (req) => ((await sdk.isLegacyRequest(req)) ? legacy.handle(req) : modern.fetch(req)),
    close: async () => {
      await legacy.close();
      await modern.close();
    },
  };
}

async function v1Handler() {
  const { Server } = await import('@modelcontextprotocol/sdk/server/index.js');
  const { WebStandardStreamableHTTPServerTransport } = await import(
    '@modelcontextprotocol/sdk/server/webStandardStreamableHttp.js'
  );
  const { CallToolRequestSchema, ListToolsRequestSchema, ErrorCode } = await import(
    '@modelcontextprotocol/sdk/types.js'
  );
  const factory = () => {
    const server = new Server(SERVER_INFO, { capabilities: { tools: {} } });
    server.setRequestHandler(ListToolsRequestSchema, () => ({
      tools: Object.entries(TOOLS).map(([name, t]) => ({
        name,
        description: t.description,
        inputSchema: inputSchema(name, t),
        outputSchema: outputSchema(name),
      })),
    }));
    server.setRequestHandler(CallToolRequestSchema, async (request, extra) => {
      const t = Object.hasOwn(TOOLS, request.params.name) ? TOOLS[request.params.name] : undefined;
      // The JSON-RPC error v2's McpServer answers (McpError would prefix "MCP error -32602: ").
      if (!t) {
        const error = new Error(`Tool ${request.params.name} not found`);
        throw Object.assign(error, { code: ErrorCode.InvalidParams });
      }
      const token = request.params._meta?.progressToken;
      const progress = async (progress, total, message) => {
        if (token === undefined) return;
        await extra.sendNotification({
          method: 'notifications/progress',
          params: { progressToken: token, progress, total, message },
        });
      };
      return result(await t.run(request.params.arguments ?? {}, progress));
    });
    return server;
  };
  if (args.stateless) {
    // A fresh server and transport per request, no session ids (the v1 stateless recipe).
    return {
      handle: async (req) => {
        const transport = new WebStandardStreamableHTTPServerTransport({
          sessionIdGenerator: undefined,
          enableJsonResponse: json,
        });
        await factory().connect(transport);
        return transport.handleRequest(req);
      },
      close: async () => {},
    };
  }
  return sessionful((opts) => new WebStandardStreamableHTTPServerTransport(opts), factory);
}

// 2025-era sessions: one transport (and server) per Mcp-Session-Id. A request without the
// header gets a fresh transport (which accepts only initialize); an unknown id gets 404.
function sessionful(makeTransport, factory) {
  const sessions = new Map();
  return {
    handle: async (req) => {
      const id = req.headers.get('mcp-session-id');
      if (id) {
        const transport = sessions.get(id);
        if (transport) return transport.handleRequest(req);
        const error = { jsonrpc: '2.0', error: { code: -32001, message: 'Session not found' }, id: null };
        return Response.json(error, { status: 404 });
      }
      const transport = makeTransport({
        sessionIdGenerator: randomUUID,
        enableJsonResponse: json,
        onsessioninitialized: (sid) => sessions.set(sid, transport),
        onsessionclosed: (sid) => sessions.delete(sid),
      });
      await factory().connect(transport);
      return transport.handleRequest(req);
    },
    close: async () => {
      for (const transport of sessions.values()) await transport.close();
    },
  };
}

function describe(msg, extra) {
  if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
    return { raw: JSON.stringify(msg), ...extra };
  }
  const entry = { method: msg.method ?? null, id: msg.id ?? null };
  if (!('method' in msg)) entry.kind = 'error' in msg ? 'error' : 'response';
  const params = msg.params;
  const isObject = params !== null && typeof params === 'object' && !Array.isArray(params);
  if (msg.method === 'tools/call' && isObject) {
    entry.tool = params.name ?? null;
    entry.arguments = params.arguments ?? null;
  }
  if (isObject && '_meta' in params) entry.meta = params._meta;
  return { ...entry, ...extra };
}

function record(body, headers) {
  const h = (name) => headers[name] ?? null;
  const extra = {
    session: h('mcp-session-id'),
    protocol_version: h('mcp-protocol-version'),
    traceparent: h('traceparent'),
    headers: {
      'mcp-method': h('mcp-method'),
      'mcp-name': h('mcp-name'),
      'mcp-protocol-version': h('mcp-protocol-version'),
    },
  };
  const text = body.toString('utf8');
  let entries;
  try {
    const parsed = JSON.parse(text);
    if (Array.isArray(parsed)) {
      entries = parsed.length
        ? parsed.map((m) => describe(m, { batch: true, ...extra }))
        : [{ raw: text, batch: true, ...extra }];
    } else if (parsed !== null && typeof parsed === 'object') {
      entries = [describe(parsed, extra)];
    } else {
      entries = [{ raw: text, ...extra }];
    }
  } catch {
    entries = [{ raw: text, ...extra }];
  }
  appendFileSync(args.record, entries.map((e) => JSON.stringify(e) + '\n').join(''));
}

const mcp = args.sdk === 'v2' ? await v2Handler() : await v1Handler();

// node:https <-> web Request/Response: both SDKs serve web-standard requests.
const server = createServer({ cert: readFileSync(args.cert), key: readFileSync(args.key) }, async (req, res) => {
  const url = new URL(req.url, `https://${req.headers.host ?? '127.0.0.1'}`);
  if (url.pathname.replace(/\/$/, '') !== '/mcp') {
    res.writeHead(404).end('not found');
    return;
  }
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const body = Buffer.concat(chunks);
  if (req.method === 'POST') record(body, req.headers);
  const aborted = new AbortController();
  res.on('close', () => aborted.abort());
  const headers = new Headers();
  for (const [name, value] of Object.entries(req.headers)) {
    for (const v of [value].flat()) headers.append(name, v);
  }
  const hasBody = !['GET', 'HEAD'].includes(req.method);
  const request = new Request(url, {
    method: req.method,
    headers,
    body: hasBody ? body : undefined,
    signal: aborted.signal,
  });
  let response;
  try {
    response = await mcp.handle(request);
  } catch (e) {
    process.stderr.write(`handler failed: ${e?.stack ?? e}\n`);
    res.writeHead(500).end();
    return;
  }
  const out = {};
  response.headers.forEach((value, name) => {
    out[name] = name in out ? [out[name], value].flat() : value;
  });
  res.writeHead(response.status, out);
  res.flushHeaders(); // an SSE stream's headers go out before its first event
  if (!response.body) {
    res.end();
    return;
  }
  const reader = response.body.getReader();
  res.on('close', () => reader.cancel().catch(() => {}));
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      res.write(value);
    }
  } catch {
    // the client went away, or the SDK aborted the stream
  }
  res.end();
});

server.listen(Number(args.port), '127.0.0.1', () => {
  process.stdout.write('READY\n');
});
server.on('error', (e) => {
  process.stderr.write(`${e}\n`);
  process.exit(1);
});

let stopping = false;
async function shutdown() {
  if (stopping) return;
  stopping = true;
  server.close();
  server.closeAllConnections();
  await mcp.close().catch(() => {});
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
