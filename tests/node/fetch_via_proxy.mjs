// One fetch through Portcullis with Node's undici ProxyAgent, as a Node agent runtime would
// (undici tunnels every URL with CONNECT, `http://` ones too). Test peer for the end-to-end
// tests. Prints one JSON line: {status, error (x-portcullis-error), body} or {failed}.
//
// Usage: node fetch_via_proxy.mjs PROXY_URL URL PROXY_CA CLIENT_CERT CLIENT_KEY
import { readFileSync } from 'node:fs';
import { ProxyAgent, fetch } from 'undici';

const [proxy, url, ca, cert, key] = process.argv.slice(2);
const agent = new ProxyAgent({
  uri: proxy,
  proxyTls: { ca: readFileSync(ca), cert: readFileSync(cert), key: readFileSync(key) },
});
try {
  const res = await fetch(url, { dispatcher: agent, signal: AbortSignal.timeout(20000) });
  const body = await res.text();
  console.log(JSON.stringify({ status: res.status, error: res.headers.get('x-portcullis-error'), body }));
} catch (e) {
  console.log(JSON.stringify({ failed: String(e && (e.cause || e)) }));
}
await agent.close();
