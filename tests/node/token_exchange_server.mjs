// A real third-party OAuth 2.0 authorization server for the token-exchange tests: oidc-provider
// (npm) on 127.0.0.1:PORT, issuer http://127.0.0.1:PORT (plain HTTP: loopback only), extended
// with the RFC 8693 grant through its registerGrantType API. Token endpoint: POST /token;
// discovery: /.well-known/openid-configuration; its signing keys (for the issued JWTs): /jwks.
//
// One confidential client: portcullis, secret portcullis-secret, registered as client_secret_basic
// (oidc-provider takes client_secret_post for such a client as well).
//
// The grant (grant_type=urn:ietf:params:oauth:grant-type:token-exchange) takes
//   subject_token + subject_token_type  a JWT from SUBJECT_ISSUER (keys at SUBJECT_JWKS_URL),
//                                       aud "portcullis"; type ...:jwt, ...:access_token or
//                                       ...:id_token
//   actor_token + actor_token_type      optional, checked the same way, or, when ACTOR_KEY is
//                                       given, as a JWT signed by that key (kid ACTOR_KID), iss
//                                       ACTOR_ISSUER, aud this server's token endpoint; or, when
//                                       spiffe-bundle:FILE is given instead, as a JWT-SVID: signed
//                                       by a jwt-svid key of that SPIFFE bundle, aud this
//                                       server's token endpoint, sub a SPIFFE ID
//   audience or resource                required, one target: the issued token's aud
//   scope                               optional, granted as asked
//   requested_token_type                optional, only ...:access_token
// and answers (RFC 8693 section 2.2) with a JWT access token (typ at+jwt, RS256) whose sub is the
// subject token's sub, with act {sub: actor's sub, act: the subject token's own act} when there is
// an actor token (else the subject token's act, if any, is carried over). Refusals are RFC 6749
// error bodies: invalid_request, invalid_grant, invalid_target (400), invalid_client (401).
// The JWT bearer grant (RFC 7523, grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer) is
// registered too: `assertion` is checked like a subject token, the answer has no
// issued_token_type. Every exchange, granted or refused, is logged as one JSON line on stdout
// (`grant`: token-exchange or jwt-bearer).
// Usage: node token_exchange_server.mjs PORT SUBJECT_ISSUER SUBJECT_JWKS_URL
//            [ACTOR_KEY_PEM ACTOR_ISSUER ACTOR_KID | spiffe-bundle:FILE]
//            (TOKEN_TTL env: seconds, default 600)
// ACTOR_KEY_PEM is the actor's signing key file (PKCS#8 PEM; only its public half is used).
import { createPublicKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createLocalJWKSet, createRemoteJWKSet, exportJWK, generateKeyPair, jwtVerify } from 'jose';
import Provider, { errors } from 'oidc-provider';

const port = Number(process.argv[2]);
const [subjectIssuer, subjectJwksUrl] = process.argv.slice(3, 5);
const [actorKeyFile, actorIssuer, actorKid] = process.argv.slice(5, 8);
const ttl = Number(process.env.TOKEN_TTL || 600);
// Actor tokens are JWT-SVIDs, verified with the trust domain's JWT authorities (a SPIFFE bundle
// marks them `use: jwt-svid`, which jose would skip as not `sig`: the mark is dropped here).
const spiffeBundle = actorKeyFile?.startsWith('spiffe-bundle:') ? actorKeyFile.slice('spiffe-bundle:'.length) : null;
// The actor assertion's verification key: the public half of ACTOR_KEY_PEM.
const actorKeys = spiffeBundle
  ? createLocalJWKSet({
    keys: JSON.parse(readFileSync(spiffeBundle, 'utf8')).keys
      .filter((k) => k.use === 'jwt-svid')
      .map(({ use, ...k }) => k),
  })
  : actorKeyFile
    ? createLocalJWKSet({ keys: [{ ...(await exportJWK(createPublicKey(readFileSync(actorKeyFile)))), kid: actorKid, alg: 'ES256' }] })
    : null;
const GRANT = 'urn:ietf:params:oauth:grant-type:token-exchange';
// RFC 7523 section 2.1: the same subject tokens, presented as `assertion`.
const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const TT = 'urn:ietf:params:oauth:token-type:';
const INPUT_TYPES = new Set(['jwt', 'access_token', 'id_token'].map((t) => TT + t));
const subjectKeys = createRemoteJWKSet(new URL(subjectJwksUrl));

// Every target is acceptable; the issued token is a JWT for it.
const resourceServer = (target) => ({
  audience: target, scope: '', accessTokenFormat: 'jwt', accessTokenTTL: ttl, jwt: { sign: { alg: 'RS256' } },
});

// A small in-memory store, so that oidc-provider does not warn about using its own dev one.
const stored = new Map();
class Store {
  constructor(model) { this.model = model; }
  async upsert(id, payload) { stored.set(`${this.model}:${id}`, payload); }
  async find(id) { return stored.get(`${this.model}:${id}`); }
  async findByUid() { return undefined; }
  async findByUserCode() { return undefined; }
  async consume(id) { const p = stored.get(`${this.model}:${id}`); if (p) p.consumed = Math.floor(Date.now() / 1000); }
  async destroy(id) { stored.delete(`${this.model}:${id}`); }
  async revokeByGrantId() {}
}

const { privateKey } = await generateKeyPair('RS256', { extractable: true });
const signingKey = { ...(await exportJWK(privateKey)), kid: 'te-1', alg: 'RS256', use: 'sig' };

const provider = new Provider(`http://127.0.0.1:${port}`, {
  adapter: Store,
  jwks: { keys: [signingKey] },
  clients: [{
    client_id: 'portcullis',
    client_secret: 'portcullis-secret',
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: [GRANT, JWT_BEARER],
    response_types: [],
    redirect_uris: [],
  }],
  features: {
    devInteractions: { enabled: false },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => undefined,
      getResourceServerInfo: (ctx, target) => resourceServer(target),
      useGrantedResource: () => false,
    },
  },
  ttl: { AccessToken: ttl },
  // Keeps the `act` set below: oidc-provider recomputes a token's extra claims from this hook.
  extraTokenClaims: (ctx, token) => token.extra,
  clientBasedCORS: () => false,
  renderError: (ctx, out) => { ctx.type = 'json'; ctx.body = out; },
});

const log = (line) => console.log(JSON.stringify({ event: 'exchange', ...line }));
const invalidGrant = (reason) => Object.assign(new errors.InvalidGrant(reason), { error_description: reason });

// Verifies a subject or actor token; returns its claims.
async function verifyToken(name, token, type) {
  if (!token) throw new errors.InvalidRequest(`missing required parameter '${name}'`);
  if (!type) throw new errors.InvalidRequest(`missing required parameter '${name}_type'`);
  if (!INPUT_TYPES.has(type)) throw new errors.InvalidRequest(`unsupported ${name}_type`);
  const asActor = name === 'actor_token' && actorKeys;
  const tokenEndpoint = `http://127.0.0.1:${port}/token`;
  const [keys, expected] = asActor
    ? [actorKeys, spiffeBundle ? { audience: tokenEndpoint } : { issuer: actorIssuer, audience: tokenEndpoint }]
    : [subjectKeys, { issuer: subjectIssuer, audience: 'portcullis' }];
  let payload;
  try {
    ({ payload } = await jwtVerify(token, keys, expected));
  } catch (err) {
    if (!err.code?.startsWith('ERR_J')) throw err; // not a jose verdict (JWKS unreachable): 500
    throw invalidGrant(`${name} ${err.code === 'ERR_JWT_EXPIRED' ? 'expired' : `invalid (${err.message})`}`);
  }
  if (typeof payload.sub !== 'string' || !payload.sub) throw invalidGrant(`${name} has no sub claim`);
  if (asActor && spiffeBundle && !payload.sub.startsWith('spiffe://')) throw invalidGrant(`${name} is no JWT-SVID`);
  return payload;
}

async function tokenExchange(ctx) {
  const p = ctx.oidc.params;
  if (p.actor_token_type && !p.actor_token) {
    throw new errors.InvalidRequest("actor_token_type given without 'actor_token'");
  }
  if (p.requested_token_type && p.requested_token_type !== `${TT}access_token`) {
    throw new errors.InvalidRequest('unsupported requested_token_type');
  }
  const subject = await verifyToken('subject_token', p.subject_token, p.subject_token_type);
  const actor = p.actor_token ? await verifyToken('actor_token', p.actor_token, p.actor_token_type) : null;

  await issue(ctx, 'token-exchange', subject, actor);
}

// The JWT bearer grant (RFC 7523): `assertion` is a subject token (checked the same way).
async function jwtBearer(ctx) {
  const subject = await verifyToken('assertion', ctx.oidc.params.assertion, `${TT}jwt`);
  await issue(ctx, 'jwt-bearer', subject, null);
}

// Issues the access token for `subject` (and `actor`) to the one requested target.
async function issue(ctx, grant, subject, actor) {
  const p = ctx.oidc.params;
  const targets = [...new Set([p.resource, p.audience].flat().filter(Boolean))];
  if (targets.length !== 1) {
    throw new errors.InvalidTarget(targets.length ? 'only one audience or resource is supported' : 'an audience or resource is required');
  }

  const at = new ctx.oidc.provider.AccessToken({
    accountId: subject.sub,
    client: ctx.oidc.client,
    scope: p.scope || undefined,
    resourceServer: new ctx.oidc.provider.ResourceServer(targets[0], resourceServer(targets[0])),
  });
  const act = actor ? { sub: actor.sub, ...(subject.act && { act: subject.act }) } : subject.act;
  if (act) at.extra = { act };
  const accessToken = await at.save();

  ctx.body = {
    access_token: accessToken,
    ...(grant === 'token-exchange' && { issued_token_type: `${TT}access_token` }),
    token_type: at.tokenType,
    expires_in: at.expiration,
    ...(at.scope && { scope: at.scope }),
  };
  log({
    ok: true, grant, client: ctx.oidc.client.clientId, subject: subject.sub, actor: actor?.sub ?? null,
    audience: targets[0], scope: at.scope ?? null, access_token: accessToken,
  });
}

provider.registerGrantType(
  GRANT,
  tokenExchange,
  ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type', 'requested_token_type', 'audience', 'resource', 'scope'],
  ['audience', 'resource'],
);
provider.registerGrantType(JWT_BEARER, jwtBearer, ['assertion', 'audience', 'resource', 'scope'], ['audience', 'resource']);

// Every refusal at the token endpoint (bad client credentials included) lands here.
const refused = (ctx, err) => log({
  ok: false,
  error: err.error ?? 'server_error',
  reason: err.error_detail ?? err.error_description ?? err.message,
  client: ctx.oidc?.client?.clientId ?? null,
});
provider.on('grant.error', refused);
provider.on('server_error', refused);

const server = provider.listen(port, '127.0.0.1', () => console.log('READY'));
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
});
