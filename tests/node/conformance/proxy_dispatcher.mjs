// `node --import` preload: route this process's HTTP(S) client traffic through Portcullis, in one of
// three ways (PORTCULLIS_PROXY_MODE), or fix up TLS for direct runs.
//
// What it replaces, for this process:
//  - the undici global dispatcher. That one slot (globalThis[Symbol.for('undici.globalDispatcher.1')])
//    is what Node's built-in fetch uses (the MCP SDKs' transports call fetch) and what the `undici`
//    package's own request/fetch use (the conformance runner's undici 7 too).
//  - http.globalAgent / https.globalAgent, for code that calls node:http directly without its own
//    agent: the conformance runner does, for the SEP-2243 header scenarios (http-header-validation,
//    http-custom-header-server-validation), which send headers fetch would refuse or normalise.
//
// Modes (PORTCULLIS_PROXY_MODE; default `connect` when PORTCULLIS_PROXY is set, else none):
//   connect   every origin, http:// too, goes through a CONNECT tunnel on PORTCULLIS_PROXY. Inside it:
//             plain HTTP for http:// origins; for https:// origins TLS that the proxy terminates
//             (MITM), the origin certificate checked against PORTCULLIS_ORIGIN_CA.
//   absolute  http:// origins: absolute-form requests (`POST http://host:port/mcp HTTP/1.1`, Host =
//             the target's authority unless the caller set one) sent to PORTCULLIS_PROXY itself, over
//             TLS with the client certificate when the proxy URL is https://; no CONNECT. https://
//             origins: CONNECT as in `connect` mode.
//   direct    no proxy protocol: connections go straight to the URL's host (e.g. Portcullis's gateway
//             listener), TLS with the client certificate and PORTCULLIS_PROXY_CA as the only trust
//             anchor. PORTCULLIS_PROXY is ignored.
// Without a mode (PORTCULLIS_PROXY unset and no PORTCULLIS_PROXY_MODE) this file does nothing, unless
// CONFORMANCE_TLS_ORIGINS is set (below): then it installs the two TLS fix-ups and nothing else.
//
// TLS fix-ups, so that an https:// server under test sees the same requests as an http:// one:
//  - SNI and certificate name are the URL's host, never the Host header. undici derives the TLS
//    server name from a caller-set Host header, so the dns-rebinding scenario (Host:
//    evil.example.com) would fail the handshake instead of reaching the server's Host check.
//    Node's https.Agent does the same; both are pinned here in every mode.
//  - node:http requests to CONFORMANCE_TLS_ORIGINS go over TLS (see there).
//
//   PORTCULLIS_PROXY        proxy URL (https:// for Portcullis; http:// works for a plain proxy)
//   PORTCULLIS_PROXY_MODE   connect | absolute | direct (see above)
//   PORTCULLIS_PROXY_CA     PEM that the proxy's own certificate must chain to (required for an
//                           https:// proxy, and in direct mode, where it anchors the server we reach)
//   PORTCULLIS_CLIENT_CERT  PEM client certificate presented to the proxy (mTLS); in direct mode to
//                           the server reached
//   PORTCULLIS_CLIENT_KEY   its PEM private key
//   PORTCULLIS_ORIGIN_CA    PEM the origin certificates seen inside a CONNECT tunnel must chain to
//                           (the proxy's MITM CA); required for https:// origins through the proxy
//                           (no fallback to Node's roots), unused for http:// ones
//   CONFORMANCE_TLS_ORIGINS comma-separated host:port list of the https:// servers under test:
//                           node:http requests to these authorities are sent over TLS, as the
//                           https:// URL they came from says. The runner's SEP-2243 helper builds
//                           a node:http request from the URL's hostname/port/path and drops its
//                           scheme, so against an https:// server it would speak plain HTTP to a
//                           TLS port. run.sh sets this from CONFORMANCE_URL when that is https://.
//                           The TLS is the mode's own (through the tunnel with PORTCULLIS_ORIGIN_CA;
//                           direct with PORTCULLIS_PROXY_CA; without a mode, Node's default trust,
//                           i.e. NODE_EXTRA_CA_CERTS).
//   PORTCULLIS_PROXY_DEBUG  set: one stderr line per process saying what is installed
//
// Which certificate goes where, in every mode:
//   hop to the proxy (connect, absolute): presents PORTCULLIS_CLIENT_CERT/_KEY, trusts only
//     PORTCULLIS_PROXY_CA; no SNI when the proxy is addressed by IP (RFC 6066).
//   hop to an https:// origin inside a CONNECT tunnel: trusts only PORTCULLIS_ORIGIN_CA (the proxy's
//     MITM CA) and presents no certificate: the proxy terminates that TLS, our identity is the one
//     shown on the proxy hop. Per-request TLS options of callers (node:https) are not used.
//   direct: presents PORTCULLIS_CLIENT_CERT/_KEY, trusts only PORTCULLIS_PROXY_CA.
// A connection that fails (refused, TLS rejected, CONNECT refused, no answer within 10 s) fails the
// requests waiting for it, once: the error never carries undici's UND_ERR_SOCKET code, which would
// make undici keep the request queued and reconnect at once, in a loop, for as long as the proxy
// refuses (undici's own ProxyAgent does that when the proxy rejects the client certificate after a
// TLS 1.3 handshake; this file therefore tunnels with its own CONNECT code instead).
//
// undici is pinned to the version Node 22.23.5 bundles (6.29.1), so the dispatcher speaks the
// handler API that the built-in fetch calls it with. Compare ../fetch_via_proxy.mjs, which passes
// a ProxyAgent per request instead of globally.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import tls from 'node:tls';
import { Agent, buildConnector, Dispatcher, Pool, setGlobalDispatcher } from 'undici';

const env = process.env;
const proxy = env.PORTCULLIS_PROXY || '';
const mode = env.PORTCULLIS_PROXY_MODE || (proxy ? 'connect' : '');
if (!['', 'connect', 'absolute', 'direct'].includes(mode)) {
  throw new Error(`proxy_dispatcher: unknown PORTCULLIS_PROXY_MODE ${JSON.stringify(mode)} (connect, absolute or direct)`);
}
if ((mode === 'connect' || mode === 'absolute') && !proxy) {
  // Never run a "through the proxy" leg directly by accident: it would pass every comparison.
  throw new Error(`proxy_dispatcher: PORTCULLIS_PROXY_MODE=${mode} needs PORTCULLIS_PROXY`);
}

const pem = (name) => {
  const path = env[name];
  return path ? readFileSync(path) : undefined;
};
const unbracket = (host) => String(host).replace(/^\[|\]$/g, '').toLowerCase();
const authorityOf = (host, port) => `${net.isIPv6(host) ? `[${host}]` : host}:${port}`;
const sni = (host) => (net.isIP(host) ? undefined : host);

// host:port list whose node:http requests get TLS (see CONFORMANCE_TLS_ORIGINS above).
const httpTls = new Set(
  (env.CONFORMANCE_TLS_ORIGINS || '').split(',').map((s) => s.trim()).filter(Boolean).map((entry) => {
    const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(entry);
    if (!m) throw new Error(`proxy_dispatcher: CONFORMANCE_TLS_ORIGINS entry ${JSON.stringify(entry)} is not host:port`);
    return authorityOf(unbracket(m[1] || m[2]), Number(m[3]));
  }),
);
const isHttpTls = (host, port) => httpTls.has(authorityOf(host, Number(port)));

const ca = pem('PORTCULLIS_PROXY_CA');
const clientTls = {};
const cert = pem('PORTCULLIS_CLIENT_CERT');
const key = pem('PORTCULLIS_CLIENT_KEY');
if (cert) clientTls.cert = cert;
if (key) clientTls.key = key;
const originCa = pem('PORTCULLIS_ORIGIN_CA'); // TLS to https:// origins inside a CONNECT tunnel

// --- proxy connections (connect / absolute) ---------------------------------------------------
const proxyUrl = proxy ? new URL(proxy) : undefined;
const proxyIsTls = proxyUrl?.protocol === 'https:';
const proxyHost = proxyUrl ? unbracket(proxyUrl.hostname) : '';
const proxyPort = proxyUrl ? Number(proxyUrl.port) || (proxyIsTls ? 443 : 80) : 0;
const proxyTls = { ...(ca ? { ca } : {}), ...clientTls };
if ((mode === 'connect' || mode === 'absolute') && proxyIsTls && !ca) {
  // Never fall back to the public roots for the proxy's own certificate.
  throw new Error('proxy_dispatcher: PORTCULLIS_PROXY is https:// but PORTCULLIS_PROXY_CA is unset');
}
if (mode === 'direct' && !ca) {
  throw new Error('proxy_dispatcher: PORTCULLIS_PROXY_MODE=direct needs PORTCULLIS_PROXY_CA');
}
const directTls = mode === 'direct' ? { ca, ...clientTls } : {};

// How long a connection (TCP, TLS, CONNECT and the TLS inside it) may take: undici's default.
const CONNECT_TIMEOUT_MS = 10_000;

// The error a failed connection ends in. Never UND_ERR_SOCKET / UND_ERR_INFO: undici treats those
// as "retry on a new connection" and keeps the request queued (see the header).
const connectFailed = (err, authority, throughProxy = mode === 'connect' || mode === 'absolute') => {
  const via = throughProxy ? ` via proxy ${proxyUrl.host}` : '';
  const e = new Error(`proxy_dispatcher: connection to ${authority}${via} failed: ${err?.message ?? err}`, { cause: err });
  e.code = 'PORTCULLIS_CONNECT_FAILED';
  return e;
};

// undici connector straight to the origin it is asked for (the server, or in absolute mode the
// proxy itself), TLS server name = that host (none for an IP), whatever the request's Host header
// says (undici would take it from there).
const pinnedConnector = (tlsOpts) => {
  const connect = buildConnector({ ...tlsOpts, timeout: CONNECT_TIMEOUT_MS });
  return (opts, cb) => connect({ ...opts, servername: undefined }, (err, sock) =>
    err ? cb(connectFailed(err, opts.host, false)) : cb(null, sock));
};

// Callback once `sock` is connected ('connect' / 'secureConnect'), or with its error, or with a
// timeout error after CONNECT_TIMEOUT_MS; on error `sock` is destroyed.
const whenConnected = (sock, event, what, cb) => {
  const finish = (err) => {
    clearTimeout(timer);
    sock.off('error', finish);
    sock.off('close', onClose);
    sock.off(event, onConnect);
    if (err) {
      sock.destroy();
      cb(err);
    } else {
      cb(null, sock);
    }
  };
  const onConnect = () => finish(null);
  const onClose = () => finish(new Error(`${what}: connection closed before the handshake completed`));
  const timer = setTimeout(() => finish(new Error(`${what}: no connection after ${CONNECT_TIMEOUT_MS} ms`)), CONNECT_TIMEOUT_MS);
  sock.on('error', finish);
  sock.on('close', onClose);
  sock.once(event, onConnect);
};

// A connection to the proxy itself: TLS with the client certificate, the proxy's certificate checked
// against PORTCULLIS_PROXY_CA only, for an https:// proxy (plain TCP for an http:// one).
const connectProxy = () =>
  proxyIsTls
    ? tls.connect({ host: proxyHost, port: proxyPort, ...proxyTls, ALPNProtocols: ['http/1.1'],
        ...(sni(proxyHost) ? { servername: proxyHost } : {}) })
    : net.connect({ host: proxyHost, port: proxyPort });

// A CONNECT tunnel to host:port through the proxy: cb(err) or cb(null, socket to the proxy, the
// tunnel open on it).
const tunnel = (host, port, cb) => {
  const authority = authorityOf(host, port);
  const sock = connectProxy();
  // Read the CONNECT response in paused mode ('readable'): once that listener is removed the
  // socket's flow state is back to "no consumer yet", so node:http's own 'data' listener starts it.
  let head = Buffer.alloc(0);
  const done = (err) => {
    clearTimeout(timer);
    sock.off('readable', onReadable);
    sock.off('error', done);
    sock.off('close', onClose);
    if (err) {
      sock.destroy();
      cb(err);
    } else {
      cb(null, sock);
    }
  };
  const onClose = () => done(new Error(`proxy closed the connection during CONNECT ${authority}`));
  const onReadable = () => {
    let chunk;
    while ((chunk = sock.read()) !== null) {
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) {
        if (head.length > 65536) return done(new Error(`proxy CONNECT ${authority}: response head too long`));
        continue;
      }
      const statusLine = head.subarray(0, end).toString('latin1').split('\r\n')[0];
      if (!/^HTTP\/1\.[01] 2\d\d( |$)/.test(statusLine)) {
        return done(new Error(`proxy CONNECT ${authority}: ${statusLine}`));
      }
      if (head.length > end + 4) sock.unshift(head.subarray(end + 4));
      return done(null);
    }
  };
  const timer = setTimeout(() => done(new Error(`proxy CONNECT ${authority}: no answer after ${CONNECT_TIMEOUT_MS} ms`)), CONNECT_TIMEOUT_MS);
  sock.on('readable', onReadable);
  sock.on('error', done);
  sock.on('close', onClose);
  sock.once(proxyIsTls ? 'secureConnect' : 'connect', () => {
    sock.write(`CONNECT ${authority} HTTP/1.1\r\nHost: ${authority}\r\n\r\n`);
  });
};

// TLS to an https:// origin, the way this mode reaches it; server name = the origin's host, none for
// an IP (see the TLS fix-ups above). Through the proxy: inside a CONNECT tunnel, trusting
// PORTCULLIS_ORIGIN_CA only, no client certificate. Direct: PORTCULLIS_PROXY_CA and the client
// certificate. Without a mode: Node's default trust, no client certificate.
const originTls = (host, port, cb) => {
  const authority = authorityOf(host, port);
  const name = sni(host) ? { servername: host } : {};
  const fail = (err) => cb(connectFailed(err, authority));
  const done = (err, sock) => (err ? fail(err) : cb(null, sock));
  if (mode === 'connect' || mode === 'absolute') {
    if (!originCa) {
      // Never fall back to the public roots (or NODE_EXTRA_CA_CERTS) for the proxy's MITM certificates.
      return void process.nextTick(fail, new Error('an https:// origin through the proxy needs PORTCULLIS_ORIGIN_CA'));
    }
    tunnel(host, port, (err, raw) => {
      if (err) return fail(err);
      const sock = tls.connect({ socket: raw, ca: originCa, ALPNProtocols: ['http/1.1'], ...name });
      whenConnected(sock, 'secureConnect', `TLS to ${authority} in the tunnel`, done);
    });
  } else {
    const sock = tls.connect({ host, port, ...directTls, ALPNProtocols: ['http/1.1'], ...name });
    whenConnected(sock, 'secureConnect', `TLS to ${authority}`, done);
  }
};

// undici connector through a CONNECT tunnel (connect mode; absolute mode's https:// origins):
// plain HTTP inside it for http:// origins, originTls for https:// ones.
const tunnelConnector = (opts, cb) => {
  const https_ = opts.protocol === 'https:';
  const host = unbracket(opts.hostname);
  const port = Number(opts.port) || (https_ ? 443 : 80);
  if (https_) return void originTls(host, port, cb);
  tunnel(host, port, (err, sock) => (err ? cb(connectFailed(err, authorityOf(host, port))) : cb(null, sock)));
};

// --- node:http / node:https without an explicit agent -------------------------------------------
const targetOf = (options, defaultPort) => ({
  host: unbracket(options.host || options.hostname || 'localhost'),
  port: Number(options.port) || defaultPort,
});

class PortcullisHttpAgent extends http.Agent {
  addRequest(req, options) {
    const { host, port } = targetOf(options, 80);
    if (mode === 'absolute' && !isHttpTls(host, port) && req.path.startsWith('/')) {
      // Absolute-form request target. node:http renders the request line from req.path when the
      // headers go out (first write/end), after this; unless an Expect header made it render it in
      // the constructor already, so patch that too.
      const target = `http://${port === 80 ? (net.isIPv6(host) ? `[${host}]` : host) : authorityOf(host, port)}`;
      if (req._header) req._header = req._header.replace(/^(\S+ )\//, `$1${target}/`);
      req.path = target + req.path;
    }
    return super.addRequest(req, options);
  }

  createConnection(options, cb) {
    const { host, port } = targetOf(options, 80);
    const authority = authorityOf(host, port);
    if (isHttpTls(host, port)) return void originTls(host, port, cb);
    if (mode === 'connect') {
      return void tunnel(host, port, (err, sock) => (err ? cb(connectFailed(err, authority)) : cb(null, sock)));
    }
    if (mode === 'absolute') {
      return void whenConnected(connectProxy(), proxyIsTls ? 'secureConnect' : 'connect', `proxy ${proxyUrl.host}`,
        (err, sock) => (err ? cb(connectFailed(err, proxyUrl.host, false)) : cb(null, sock)));
    }
    return super.createConnection(options, cb); // none / direct: plain TCP to the target
  }
}

// TLS options a caller passes to node:https (ca, cert, rejectUnauthorized...) are not used: the
// trust and identity of each hop are this file's (see the header).
class PortcullisHttpsAgent extends https.Agent {
  createConnection(options, cb) {
    const { host, port } = targetOf(options, 443);
    originTls(host, port, cb);
  }
}

// --- fetch / undici: absolute form ----------------------------------------------------------------
// undici 6's ProxyAgent only sends absolute-form requests (proxyTunnel: false) to an http:// proxy;
// this does the same over a Pool to the proxy's origin whatever its scheme; https:// origins go
// through a CONNECT tunnel as in connect mode.
const headerPairs = (headers) => {
  if (headers == null) return [];
  if (Array.isArray(headers)) {
    if (headers.length && Array.isArray(headers[0])) return headers.map(([k, v]) => [k, v]);
    const out = [];
    for (let i = 0; i < headers.length; i += 2) out.push([headers[i], headers[i + 1]]);
    return out;
  }
  if (typeof headers[Symbol.iterator] === 'function') return [...headers].map(([k, v]) => [k, v]);
  return Object.entries(headers);
};

class AbsoluteFormDispatcher extends Dispatcher {
  #pool;
  #tunnel;

  constructor() {
    super();
    this.#pool = new Pool(proxyUrl.origin, { connect: pinnedConnector(proxyIsTls ? proxyTls : {}) });
    this.#tunnel = new Agent({ connect: tunnelConnector });
  }

  dispatch(opts, handler) {
    const origin = new URL(opts.origin);
    if (origin.protocol !== 'http:') return this.#tunnel.dispatch(opts, handler);
    const pairs = headerPairs(opts.headers);
    if (!pairs.some(([k]) => String(k).toLowerCase() === 'host')) pairs.push(['host', origin.host]);
    const headers = [];
    for (const [k, v] of pairs) {
      if (Array.isArray(v)) for (const one of v) headers.push(k, one);
      else if (v !== undefined) headers.push(k, v);
    }
    return this.#pool.dispatch({ ...opts, origin: proxyUrl.origin, path: origin.origin + (opts.path || '/'), headers }, handler);
  }

  async close() {
    await Promise.all([this.#pool.close(), this.#tunnel.close()]);
  }

  async destroy(err) {
    await Promise.all([this.#pool.destroy(err), this.#tunnel.destroy(err)]);
  }
}

// --- install ------------------------------------------------------------------------------------
if (mode === 'connect') {
  setGlobalDispatcher(new Agent({ connect: tunnelConnector }));
  http.globalAgent = new PortcullisHttpAgent({ keepAlive: true });
  https.globalAgent = new PortcullisHttpsAgent({ keepAlive: true });
} else if (mode === 'absolute') {
  setGlobalDispatcher(new AbsoluteFormDispatcher());
  http.globalAgent = new PortcullisHttpAgent({ keepAlive: true });
  https.globalAgent = new PortcullisHttpsAgent({ keepAlive: true });
} else if (mode === 'direct') {
  setGlobalDispatcher(new Agent({ connect: pinnedConnector(directTls) }));
  http.globalAgent = new PortcullisHttpAgent({ keepAlive: true });
  https.globalAgent = new PortcullisHttpsAgent({ keepAlive: true });
} else if (httpTls.size) {
  // No proxy: only the TLS fix-ups; trust is Node's default (NODE_EXTRA_CA_CERTS for a test CA).
  setGlobalDispatcher(new Agent({ connect: pinnedConnector({}) }));
  http.globalAgent = new PortcullisHttpAgent({ keepAlive: true });
  https.globalAgent = new PortcullisHttpsAgent({ keepAlive: true });
}

if (env.PORTCULLIS_PROXY_DEBUG && (mode || httpTls.size)) {
  const what = mode === 'direct' ? 'direct (TLS: PORTCULLIS_PROXY_CA + client certificate)'
    : mode ? `${mode} via ${proxy}` : 'no proxy';
  const tlsNote = httpTls.size ? `; node:http over TLS to ${[...httpTls].join(', ')}` : '';
  process.stderr.write(`[proxy_dispatcher] pid ${process.pid}: fetch, undici and node:http(s): ${what}${tlsNote}\n`);
}
