//! The usual end-to-end setup, built in one place: a test PKI, the real proxy with a policy
//! (allow-all unless given) and a config edit, a real TLS upstream, and the `research` agent.
//! Tests ask it for more identities and run curl as any of them.

use super::*;

/// A running proxy in front of a recording upstream, with its PKI and default agent
/// (`spiffe://acme.test/agents/research`).
pub struct Harness {
    pub pki: Pki,
    pub up: Upstream,
    pub proxy: Proxy,
    pub agent: ClientCert,
}

/// A change to the base config.
type ConfigEdit = Box<dyn FnOnce(&mut Value)>;

/// How the harness's proxy is configured; [`HarnessBuilder::start`] starts it.
#[derive(Default)]
pub struct HarnessBuilder {
    policy: Option<String>,
    edits: Vec<ConfigEdit>,
    env: Vec<(String, String)>,
    files: Vec<(String, String)>,
}

impl Harness {
    pub fn builder() -> HarnessBuilder {
        HarnessBuilder::default()
    }

    /// A client SVID for `spiffe://acme.test/agents/{name}`.
    pub fn identity(&self, name: &str) -> ClientCert {
        self.pki
            .client(name, &format!("spiffe://acme.test/agents/{name}"))
    }

    /// curl through the proxy as `who` (MITM CA trusted, proxy CA trusted).
    pub async fn curl_as(&self, who: &ClientCert, args: &[&str]) -> CurlOut {
        curl(&self.pki, self.proxy.addr, Some(who), args).await
    }

    /// curl's arguments for going through the proxy as `who` (proxy and MITM CAs trusted),
    /// for tests that run curl themselves (several URLs on one connection, many at once).
    pub fn proxy_args(&self, who: &ClientCert) -> Vec<String> {
        vec![
            "--proxy".into(),
            format!("https://{}", self.proxy.addr),
            "--proxy-cacert".into(),
            self.pki.path("acme-ca.pem").display().to_string(),
            "--proxy-cert".into(),
            who.cert.display().to_string(),
            "--proxy-key".into(),
            who.key.display().to_string(),
            "--cacert".into(),
            self.pki.path("mitm-ca.pem").display().to_string(),
        ]
    }

    /// curl through the proxy as the default agent.
    pub async fn curl(&self, args: &[&str]) -> CurlOut {
        self.curl_as(&self.agent, args).await
    }

    /// `https://localhost:{upstream port}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.up.port())
    }

    /// Every line the proxy wrote (logs and decision log): leak checks read these.
    pub fn everything_logged(&self) -> String {
        format!(
            "{}\n{}",
            self.proxy.logs.lines().join("\n"),
            self.proxy.decisions.lines().join("\n")
        )
    }
}

impl HarnessBuilder {
    /// The policy (one Rego file); allow-all by default.
    pub fn policy(mut self, rego: &str) -> Self {
        self.policy = Some(rego.to_owned());
        self
    }

    /// Change the base config (`Pki::base_config`) before it is written.
    pub fn config(mut self, edit: impl FnOnce(&mut Value) + 'static) -> Self {
        self.edits.push(Box::new(edit));
        self
    }

    /// An environment variable of the proxy process.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// A file in the test directory (relative paths in the config resolve there; missing
    /// directories are made).
    pub fn file(mut self, name: &str, content: &str) -> Self {
        self.files.push((name.to_owned(), content.to_owned()));
        self
    }

    pub async fn start(self) -> Harness {
        let pki = Pki::new();
        if let Some(rego) = &self.policy {
            replace_file(&pki.path("policy/allow.rego"), rego);
        }
        for (name, content) in &self.files {
            let path = pki.path(name);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).unwrap();
            }
            std::fs::write(path, content).unwrap();
        }
        let up = Upstream::start("127.0.0.1", Some(pki.upstream_tls.clone())).await;
        let mut cfg = pki.base_config();
        for edit in self.edits {
            edit(&mut cfg);
        }
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let proxy = Proxy::start_with_env(&pki.write_config(&cfg), &env);
        let agent = pki.client("agent", "spiffe://acme.test/agents/research");
        Harness {
            pki,
            up,
            proxy,
            agent,
        }
    }
}
