// A real third-party token issuer for the delegation tests: oauth2-mock-server (npm) on
// 127.0.0.1:PORT, its keys generated at start (ALG, default RS256), JWKS at /jwks, issuer
// http://127.0.0.1:PORT. Tokens come from its own token endpoint (password grant: `username`
// becomes `sub`); extra form fields shape the claims the delegation tests need:
//   audience=A        aud
//   act=ACTOR[,ACTOR] the `act` chain, outermost first
//   tenant=T          a custom claim
//   expired=1         exp ten minutes in the past
// Usage: node idp.mjs PORT [ALG]
import { OAuth2Server } from 'oauth2-mock-server';

const port = Number(process.argv[2]);
const server = new OAuth2Server();
await server.issuer.keys.generate(process.argv[3] || 'RS256');
server.service.on('beforeTokenSigning', (token, req) => {
  const b = req.body || {};
  if (b.audience) token.payload.aud = b.audience;
  if (b.tenant) token.payload.tenant = b.tenant;
  if (b.act) {
    let act;
    for (const sub of String(b.act).split(',').reverse()) act = act ? { sub, act } : { sub };
    token.payload.act = act;
  }
  if (b.expired) {
    const now = Math.floor(Date.now() / 1000);
    Object.assign(token.payload, { iat: now - 3600, nbf: now - 3600, exp: now - 600 });
  }
});
await server.start(port, '127.0.0.1');
console.log('READY');
process.on('SIGTERM', () => server.stop().then(() => process.exit(0)));
