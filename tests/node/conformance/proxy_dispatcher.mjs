// `node --import` preload: route this process's HTTP(S) client traffic through Portcullis.
//
// When PORTCULLIS_PROXY is set (e.g. https://127.0.0.1:PORT) it installs, for this process:
//  1. an undici ProxyAgent as the global dispatcher. That one slot
//     (globalThis[Symbol.for('undici.globalDispatcher.1')]) is what Node's built-in fetch uses (the
//     MCP SDKs' transports call fetch) and what the `undici` package's own request/fetch use (the
//     conformance runner's undici 7 too). undici tunnels every origin, http:// ones too, with CONNECT.
//  2. a CONNECT-tunnelling http.globalAgent / https.globalAgent, for code that calls node:http
//     directly without its own agent: the conformance runner does, for the SEP-2243 header
//     scenarios (http-header-validation, http-custom-header-server-validation), which send headers
//     fetch would refuse or normalise.
// Both tunnel with the same TLS settings. Without PORTCULLIS_PROXY this file does nothing.
//
//   PORTCULLIS_PROXY        proxy URL (https:// for Portcullis; http:// works for a plain proxy)
//   PORTCULLIS_PROXY_CA     PEM that the proxy's own certificate must chain to (required for https://)
//   PORTCULLIS_CLIENT_CERT  PEM client certificate presented to the proxy (mTLS)
//   PORTCULLIS_CLIENT_KEY   its PEM private key
//   PORTCULLIS_ORIGIN_CA    PEM the origin certificates seen inside the tunnel must chain to
//                           (the proxy's MITM CA); only matters for https:// origins
//   PORTCULLIS_PROXY_DEBUG  set: one stderr line per process saying the dispatcher is on
//
// undici is pinned to the version Node 22.23.5 bundles (6.29.1), so the dispatcher speaks the
// handler API that the built-in fetch calls it with. Compare ../fetch_via_proxy.mjs, which passes
// a ProxyAgent per request instead of globally.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import tls from 'node:tls';
import { ProxyAgent, setGlobalDispatcher } from 'undici';

const proxy = process.env.PORTCULLIS_PROXY;
if (proxy) {
  const pem = (name) => {
    const path = process.env[name];
    return path ? readFileSync(path) : undefined;
  };
  const proxyUrl = new URL(proxy);
  const proxyIsTls = proxyUrl.protocol === 'https:';
  const proxyTls = {};
  const ca = pem('PORTCULLIS_PROXY_CA');
  const cert = pem('PORTCULLIS_CLIENT_CERT');
  const key = pem('PORTCULLIS_CLIENT_KEY');
  if (ca) proxyTls.ca = ca;
  if (cert) proxyTls.cert = cert;
  if (key) proxyTls.key = key;
  const requestTls = {};
  const originCa = pem('PORTCULLIS_ORIGIN_CA');
  if (originCa) requestTls.ca = originCa;
  if (proxyIsTls && !ca) {
    // Never fall back to the public roots for the proxy's own certificate.
    throw new Error('proxy_dispatcher: PORTCULLIS_PROXY is https:// but PORTCULLIS_PROXY_CA is unset');
  }

  // 1. fetch / undici
  setGlobalDispatcher(new ProxyAgent({ uri: proxy, proxyTls, requestTls }));

  // 2. node:http / node:https without an explicit agent
  const proxyHost = proxyUrl.hostname.replace(/^\[|\]$/g, '');
  const proxyPort = Number(proxyUrl.port) || (proxyIsTls ? 443 : 80);
  const tunnel = (host, port, cb) => {
    const authority = `${net.isIPv6(host) ? `[${host}]` : host}:${port}`;
    const sock = proxyIsTls
      ? tls.connect({ host: proxyHost, port: proxyPort, ...proxyTls, ALPNProtocols: ['http/1.1'],
          ...(net.isIP(proxyHost) ? {} : { servername: proxyHost }) })
      : net.connect({ host: proxyHost, port: proxyPort });
    // Read the CONNECT response in paused mode ('readable'): once that listener is removed the
    // socket's flow state is back to "no consumer yet", so node:http's own 'data' listener starts it.
    let head = Buffer.alloc(0);
    const done = (err) => {
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
    sock.on('readable', onReadable);
    sock.on('error', done);
    sock.on('close', onClose);
    sock.once(proxyIsTls ? 'secureConnect' : 'connect', () => {
      sock.write(`CONNECT ${authority} HTTP/1.1\r\nHost: ${authority}\r\n\r\n`);
    });
  };
  class TunnelHttpAgent extends http.Agent {
    createConnection(options, cb) {
      tunnel(options.host || 'localhost', options.port || 80, cb);
    }
  }
  class TunnelHttpsAgent extends https.Agent {
    createConnection(options, cb) {
      const host = options.host || 'localhost';
      tunnel(host, options.port || 443, (err, sock) => {
        if (err) return cb(err);
        const servername = options.servername || (net.isIP(host) ? undefined : host);
        const tlsSock = tls.connect({ ...options, socket: sock, ...requestTls, ...(servername ? { servername } : {}) });
        const onError = (e) => cb(e);
        tlsSock.once('error', onError);
        tlsSock.once('secureConnect', () => {
          tlsSock.off('error', onError);
          cb(null, tlsSock);
        });
      });
    }
  }
  http.globalAgent = new TunnelHttpAgent({ keepAlive: true });
  https.globalAgent = new TunnelHttpsAgent({ keepAlive: true });

  if (process.env.PORTCULLIS_PROXY_DEBUG) {
    process.stderr.write(`[proxy_dispatcher] pid ${process.pid}: fetch, undici and node:http(s) -> ${proxy}\n`);
  }
}
