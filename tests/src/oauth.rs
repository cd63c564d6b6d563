//! The real `oauth2-mock-server` (npm) as the token endpoint.

use super::*;

/// oauth2-mock-server (npm), a real third-party OAuth 2.0 server, run with node. Each token it
/// issues is logged as a JSON line (`{"event":"token",...}`) on its stdout.
pub struct OAuthServer {
    child: Child,
    pub port: u16,
    pub out: Arc<Logs>,
}

impl OAuthServer {
    pub fn start(token_ttl_secs: u64) -> OAuthServer {
        OAuthServer::start_on(free_addr().port(), token_ttl_secs)
    }

    /// On `port` (to restart a stopped server where its clients look for it).
    pub fn start_on(port: u16, token_ttl_secs: u64) -> OAuthServer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("node");
        assert!(
            dir.join("node_modules/oauth2-mock-server").is_dir(),
            "run `bash .ci/run` (or `npm ci --prefix tests/node`) to install oauth2-mock-server"
        );
        let (child, out) = spawn_ready(
            Command::new(crate::mcp::node())
                .arg(dir.join("oauth_server.mjs"))
                .args([port.to_string(), token_ttl_secs.to_string()]),
            "the OAuth server",
        );
        OAuthServer { child, port, out }
    }

    pub fn token_url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Token responses so far, once there are at least `n` (bounded wait: the log line is
    /// written before the response, but our reader thread may not have read it yet).
    pub fn tokens_after(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let tokens = self.tokens();
            let seen = self.out.lines().len();
            if tokens.len() >= n || Instant::now() >= deadline {
                return tokens;
            }
            self.out.wait_for_len(seen + 1, deadline);
        }
    }

    /// Token responses so far.
    pub fn tokens(&self) -> Vec<Value> {
        self.out
            .events()
            .into_iter()
            .filter(|e| e["event"] == "token")
            .collect()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// oauth2-mock-server as a token issuer for delegation (tests/node/idp.mjs): JWKS at `/jwks`,
/// issuer `http://localhost:PORT` (the name it gives itself), tokens from its own token
/// endpoint; reached on 127.0.0.1.
pub struct TokenIssuer {
    child: Child,
    pub port: u16,
}

impl TokenIssuer {
    /// With a fresh key of `alg` (`RS256`, `ES256`, …).
    pub fn start(alg: &str) -> TokenIssuer {
        TokenIssuer::start_on(free_addr().port(), alg)
    }

    /// On `port`, with a fresh key (a restart there is a key rotation).
    pub fn start_on(port: u16, alg: &str) -> TokenIssuer {
        let (child, _) = spawn_ready(
            Command::new(crate::mcp::node())
                .arg(crate::mcp::node_script("idp.mjs"))
                .args([port.to_string(), alg.to_owned()]),
            "the token issuer",
        );
        TokenIssuer { child, port }
    }

    pub fn issuer(&self) -> String {
        format!("http://localhost:{}", self.port)
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.base())
    }

    /// A token for `user` from the issuer's token endpoint (password grant), with the extra
    /// form fields idp.mjs understands (`audience`, `act`, `tenant`, `expired`).
    pub fn token(&self, user: &str, extra: &[(&str, &str)]) -> String {
        let mut form = vec![
            ("grant_type", "password"),
            ("username", user),
            ("password", "x"),
            ("client_id", "agent"),
        ];
        form.extend_from_slice(extra);
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10"]);
        for (k, v) in form {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = cmd
            .arg(format!("{}/token", self.issuer()))
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("token endpoint: {}", String::from_utf8_lossy(&out.stdout)));
        v["access_token"].as_str().unwrap().to_owned()
    }
}

impl TokenIssuer {
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// oidc-provider (npm) with the RFC 8693 token-exchange grant (tests/node/
/// token_exchange_server.mjs): client `portcullis` / `portcullis-secret`, subject tokens from
/// `issuer` checked against its JWKS; each exchange logged as a JSON line.
pub struct TokenExchangeServer {
    child: Child,
    pub port: u16,
    pub out: Arc<Logs>,
}

impl TokenExchangeServer {
    pub fn start(subjects: &TokenIssuer) -> TokenExchangeServer {
        TokenExchangeServer::start_with(subjects, &[])
    }

    /// Trusting actor assertions signed by the key in `key_pem` (its public half), with `kid`,
    /// from `issuer`.
    pub fn start_with_actor(
        subjects: &TokenIssuer,
        key_pem: &Path,
        issuer: &str,
        kid: &str,
    ) -> TokenExchangeServer {
        let key = key_pem.display().to_string();
        TokenExchangeServer::start_with(subjects, &[&key, issuer, kid])
    }

    /// Trusting actor tokens that are JWT-SVIDs of the trust domain whose SPIFFE bundle (JWT
    /// authorities) is in `bundle`.
    pub fn start_with_jwt_svid_actors(
        subjects: &TokenIssuer,
        bundle: &Path,
    ) -> TokenExchangeServer {
        let arg = format!("spiffe-bundle:{}", bundle.display());
        TokenExchangeServer::start_with(subjects, &[&arg])
    }

    fn start_with(subjects: &TokenIssuer, actor: &[&str]) -> TokenExchangeServer {
        let port = free_addr().port();
        let (child, out) = spawn_ready(
            Command::new(crate::mcp::node())
                .arg(crate::mcp::node_script("token_exchange_server.mjs"))
                .arg(port.to_string())
                .arg(subjects.issuer())
                .arg(subjects.jwks_url())
                .args(actor),
            "the token exchange server",
        );
        TokenExchangeServer { child, port, out }
    }

    pub fn token_url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Exchanges so far (granted and refused).
    pub fn exchanges(&self) -> Vec<Value> {
        self.out
            .events()
            .into_iter()
            .filter(|e| e["event"] == "exchange")
            .collect()
    }
}

impl Drop for TokenExchangeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
