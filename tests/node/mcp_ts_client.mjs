// An MCP client built with the official TypeScript SDK (Streamable HTTP) talking through
// Portcullis. Test peer for Portcullis' MCP end-to-end tests (the TypeScript twin of
// tests/python/mcp_client.py).
//
// Usage:
//   node mcp_ts_client.mjs --sdk v1|v2 --url https://localhost:PORT/mcp
//       [--proxy https://127.0.0.1:PPORT --proxy-ca PROXY_CA.pem --cert CLIENT.pem --key CLIENT.key]
//       --ca ORIGIN_CA.pem --ops OPS_JSON [--timeout SECONDS] [--negotiation auto|legacy|pin]
//
// --sdk v2: @modelcontextprotocol/client 2.x; --negotiation (v2 only, default auto) is its
//   versionNegotiation mode: auto probes with server/discover and speaks 2026-07-28 when the
//   server offers it, else falls back to initialize; legacy always initializes (2025-11-25);
//   pin insists on 2026-07-28. --sdk v1: @modelcontextprotocol/sdk 1.x (initialize, <= 2025-11-25).
// --ca is the CA the origin certificate is checked against: Portcullis' MITM CA through the
// proxy, the server's own CA when connecting directly (no --proxy). With --proxy every request
// is tunnelled with CONNECT by an undici ProxyAgent (TLS to the proxy checked against
// --proxy-ca, client certificate --cert/--key), handed to the SDK transport as its `fetch`.
//
// OPS_JSON is a JSON list run in order in ONE MCP session (after connecting); one JSON line
// is printed per op, as mcp_client.py prints them:
//   {"op":"list_tools"}
//       -> {"op":"list_tools","tools":[names],"descriptions":{name:desc},"cache_scope":..,"ttl_ms":..}
//   {"op":"call","tool":NAME,"args":{...}[,"timeout":SECONDS][,"meta":{...}]}
//       -> {"op":"call","tool":NAME,"is_error":bool,"text":"<concatenated text content>"}
//       -> {"op":"call","tool":NAME,"is_error":true,"error":{"code":..,"message":..,"data":..}}
//          when the tools/call got a JSON-RPC error; from an HTTP error status (e.g. a 400
//          HeaderMismatch) the error adds "http_status" (and is the JSON-RPC error of the body
//          when there is one); a local SDK failure (a timeout ...) has the SDK's own code
//          (v2: a string such as "REQUEST_TIMEOUT"; v1: -32001)
//   {"op":"call_progress","tool":NAME,"args":{...}}
//       -> like "call" plus "progress_times" (seconds since the call started, one per progress
//          notification), "progress" (the values) and "elapsed"
//   {"op":"session"}
//       -> {"op":"session","session_id":<Mcp-Session-Id or null>,"protocol_version":..,
//           "era":"legacy"|"modern"|null (v2 only),"server":{"name":..,"version":..}}
//   {"op":"raw_headers"}
//       -> {"op":"raw_headers","requests":[{"method":"POST","mcp-method":..,"mcp-name":..,
//           "mcp-protocol-version":..,"mcp-session-id":..}, ...]}: every HTTP request so far
// On an unexpected failure: {"op":"fatal","error":"..."} and exit status 1.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Agent, ProxyAgent, fetch as undiciFetch } from 'undici';

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const fatal = (error) => {
  emit({ op: 'fatal', error });
  process.exit(1);
};

const { values: args } = parseArgs({
  options: {
    sdk: { type: 'string' },
    url: { type: 'string' },
    proxy: { type: 'string' },
    'proxy-ca': { type: 'string' },
    cert: { type: 'string' },
    key: { type: 'string' },
    ca: { type: 'string' },
    ops: { type: 'string' },
    timeout: { type: 'string', default: '30' },
    negotiation: { type: 'string', default: 'auto' },
  },
});
const timeout = Number(args.timeout);
// Never hang: the whole run is bounded.
setTimeout(() => fatal(`timeout after ${timeout}s`), timeout * 1000).unref();

const sent = []; // the MCP headers of every HTTP request, for `raw_headers`

function makeFetch() {
  const ca = readFileSync(args.ca);
  let dispatcher;
  if (args.proxy) {
    const proxyTls = args['proxy-ca'] ? { ca: readFileSync(args['proxy-ca']) } : {};
    if (args.cert) Object.assign(proxyTls, { cert: readFileSync(args.cert), key: readFileSync(args.key) });
    dispatcher = new ProxyAgent({ uri: args.proxy, proxyTls, requestTls: { ca } });
  } else {
    dispatcher = new Agent({ connect: { ca } });
  }
  const fetch = (url, init = {}) => {
    const h = new Headers(init.headers);
    sent.push({
      method: init.method ?? 'GET',
      ...Object.fromEntries(
        ['mcp-method', 'mcp-name', 'mcp-protocol-version', 'mcp-session-id'].map((n) => [n, h.get(n)]),
      ),
    });
    return undiciFetch(url, { ...init, dispatcher });
  };
  return { fetch, close: () => dispatcher.close() };
}

// The two SDKs behind one small interface.
async function connect(fetch) {
  const url = new URL(args.url);
  const info = { name: 'portcullis-ts-test-client', version: '1.0.0' };
  if (args.sdk === 'v2') {
    const sdk = await import('@modelcontextprotocol/client');
    const mode = { auto: 'auto', legacy: 'legacy', pin: { pin: '2026-07-28' } }[args.negotiation];
    if (!mode) throw new Error('--negotiation must be auto, legacy or pin');
    const client = new sdk.Client(info, { versionNegotiation: { mode } });
    const transport = new sdk.StreamableHTTPClientTransport(url, { fetch });
    await client.connect(transport, { timeout: timeout * 1000 });
    return {
      client,
      transport,
      era: () => client.getProtocolEra() ?? null,
      callTool: (params, options) => client.callTool(params, options),
      // A JSON-RPC error answer (ProtocolError; the 2026-07-28 era also reads one from an HTTP
      // error status), an HTTP error status (SdkHttpError), or a local SDK failure (SdkError).
      rpcError: (e) => {
        if (e instanceof sdk.SdkHttpError) {
          const status = e.data?.status;
          return embedded(status, e.data?.text) ?? { code: e.code, message: e.message, data: e.data ?? null, http_status: status };
        }
        return e instanceof sdk.ProtocolError || e instanceof sdk.SdkError
          ? { code: e.code, message: e.message, data: e.data ?? null }
          : null;
      },
    };
  }
  if (args.sdk !== 'v1') throw new Error('--sdk must be v1 or v2');
  const { Client } = await import('@modelcontextprotocol/sdk/client/index.js');
  const { StreamableHTTPClientTransport, StreamableHTTPError } = await import(
    '@modelcontextprotocol/sdk/client/streamableHttp.js'
  );
  const { McpError } = await import('@modelcontextprotocol/sdk/types.js');
  const client = new Client(info);
  const transport = new StreamableHTTPClientTransport(url, { fetch });
  await client.connect(transport, { timeout: timeout * 1000 });
  return {
    client,
    transport,
    era: () => null,
    callTool: (params, options) => client.callTool(params, undefined, options),
    rpcError: (e) => {
      if (e instanceof StreamableHTTPError) {
        // An HTTP error status; the body is only in the message.
        const text = e.message.replace(/^Streamable HTTP error: Error POSTing to endpoint: /, '');
        return embedded(e.code, text) ?? { code: e.code, message: e.message, data: null, http_status: e.code };
      }
      return e instanceof McpError
        ? // McpError prefixes "MCP error CODE: " to the server's message: the message as sent.
          { code: e.code, message: e.message.replace(/^MCP error -?\d+: /, ''), data: e.data ?? null }
        : null;
    },
  };
}

// The JSON-RPC error in the body of an HTTP error answer (e.g. a 400 HeaderMismatch), if any.
function embedded(status, text) {
  try {
    const { error } = JSON.parse(text);
    if (error) return { code: error.code, message: error.message, data: error.data ?? null, http_status: status };
  } catch {
    // not JSON
  }
  return null;
}

const textOf = (result) =>
  (result.content ?? []).filter((b) => b.type === 'text').map((b) => b.text).join('');

async function runCall(mcp, op, withProgress) {
  const out = { op: op.op, tool: op.tool };
  const times = [];
  const values = [];
  const start = performance.now();
  const seconds = () => Math.round(performance.now() - start) / 1000;
  const options = { timeout: (op.timeout ?? timeout) * 1000 };
  if (withProgress) {
    options.onprogress = (p) => {
      times.push(seconds());
      values.push(p.progress);
    };
  }
  const params = { name: op.tool, arguments: op.args ?? {} };
  if (op.meta) params._meta = op.meta;
  try {
    const result = await mcp.callTool(params, options);
    out.is_error = Boolean(result.isError);
    out.text = textOf(result);
  } catch (e) {
    const error = mcp.rpcError(e);
    if (!error) throw e;
    out.is_error = true;
    out.error = error;
  }
  if (withProgress) Object.assign(out, { progress_times: times, progress: values, elapsed: seconds() });
  return out;
}

async function run(ops) {
  const { fetch, close } = makeFetch();
  const mcp = await connect(fetch);
  const { client, transport } = mcp;
  for (const op of ops) {
    switch (op.op) {
      case 'list_tools': {
        let result;
        try {
          result = await client.listTools(undefined, { timeout: timeout * 1000 });
        } catch (e) {
          emit({ op: 'list_tools', error: `${e.name}: ${e.message}` });
          break;
        }
        emit({
          op: 'list_tools',
          tools: result.tools.map((t) => t.name),
          descriptions: Object.fromEntries(result.tools.map((t) => [t.name, t.description])),
          cache_scope: result.cacheScope ?? null,
          ttl_ms: result.ttlMs ?? null,
        });
        break;
      }
      case 'call':
        emit(await runCall(mcp, op, false));
        break;
      case 'call_progress':
        emit(await runCall(mcp, op, true));
        break;
      case 'session': {
        const server = client.getServerVersion();
        emit({
          op: 'session',
          session_id: transport.sessionId ?? null,
          protocol_version: transport.protocolVersion ?? client.getNegotiatedProtocolVersion?.() ?? null,
          era: mcp.era(),
          server: server ? { name: server.name, version: server.version } : null,
        });
        break;
      }
      case 'raw_headers':
        emit({ op: 'raw_headers', requests: sent });
        break;
      default:
        throw new Error(`unknown op: ${JSON.stringify(op)}`);
    }
  }
  // Like the Python SDK client on exit: end the session (DELETE) when there is one.
  if (transport.sessionId) await transport.terminateSession().catch(() => {});
  await client.close();
  await close();
}

try {
  for (const name of ['url', 'ca', 'ops']) if (!args[name]) throw new Error(`--${name} is required`);
  if (args.cert && !args.key) throw new Error('--cert needs --key');
  const ops = JSON.parse(args.ops);
  if (!Array.isArray(ops)) throw new Error('--ops must be a JSON list');
  await run(ops);
} catch (e) {
  // fetch failures hide the reason (a TLS error ...) in a chain of causes.
  let text = `${e?.name ?? 'Error'}: ${e?.message ?? e}`;
  for (let c = e?.cause; c; c = c.cause) text += ` (cause: ${c.code ? `${c.code} ` : ''}${c.message ?? c})`;
  fatal(text);
}
process.exit(0);
