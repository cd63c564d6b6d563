// A real third-party OAuth 2.0 authorization server for the credential tests:
// oauth2-mock-server (npm), on 127.0.0.1:PORT. Every token response is logged as one JSON line
// on stdout, so tests can count how many times the proxy asked for a token.
// Usage: node oauth_server.mjs PORT [TOKEN_TTL_SECONDS]
import { OAuth2Server } from 'oauth2-mock-server';

const port = Number(process.argv[2]);
const ttl = Number(process.argv[3] || 3600);
const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');
server.service.on('beforeResponse', (resp, req) => {
  resp.body.expires_in = ttl;
  const auth = req.headers['authorization'] || '';
  console.log(JSON.stringify({
    event: 'token',
    grant_type: req.body.grant_type,
    scope: req.body.scope ?? null,
    audience: req.body.aud ?? req.body.audience ?? null,
    client_auth: auth.startsWith('Basic ') ? 'basic' : (req.body.client_secret ? 'post' : 'none'),
    access_token: resp.body.access_token,
    // Test tokens only: lets the tests follow refresh-token rotation.
    refresh_token_in: req.body.refresh_token ?? null,
    refresh_token_out: resp.body.refresh_token ?? null,
  }));
});
await server.start(port, '127.0.0.1');
console.log('READY');
process.on('SIGTERM', () => server.stop().then(() => process.exit(0)));
