//! The bench's own PKI and proxy config, generated at start with `portcullis::pki` into a temp
//! dir: trust domain `bench.test`, the load client's SVID, the proxy's server certificate, the
//! MITM CA and the upstream CA. Also the rustls configs the load generator and upstream use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use portcullis::pki::{write_file, Authority, Issued, LeafSpec};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;

use crate::scenario::Profile;

pub const TRUST_DOMAIN: &str = "bench.test";
pub const CLIENT_ID: &str = "spiffe://bench.test/load";
/// CONNECT host for intercepted scenarios: an IP literal, so the MITM leaf gets an IP SAN.
pub const MITM_HOST: &str = "127.0.0.1";
/// CONNECT host for the blind tunnel: listed in `mitm.passthrough`, resolves to loopback.
pub const PASSTHROUGH_HOST: &str = "localhost";

const TTL: Duration = Duration::from_secs(24 * 3600);

/// Everything generated for one run. The temp dir is removed when this value drops, unless
/// it was generated with `keep`.
pub struct Setup {
    pub dir: PathBuf,
    _guard: Option<tempfile::TempDir>,
    pub config: PathBuf,
    pub upstream_tls: Arc<ServerConfig>,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: PrivateKeyDer<'static>,
    trust_ca: CertificateDer<'static>,
    mitm_ca: CertificateDer<'static>,
    upstream_ca: CertificateDer<'static>,
}

/// The client-side TLS configs, one per hop kind.
pub struct ClientTls {
    /// Outer hop: to the proxy, presenting the client SVID.
    pub proxy: Arc<ClientConfig>,
    /// Inner hop of an intercepted tunnel: trusts the MITM CA.
    pub mitm: Arc<ClientConfig>,
    /// Direct and blind-tunnel hops: trusts the upstream CA.
    pub upstream: Arc<ClientConfig>,
}

impl Setup {
    /// Generate the PKI and write the proxy config. `upstream_ca_pem` replaces the built-in
    /// upstream's CA when the target is an external server.
    pub fn generate(
        upstream_ca_pem: Option<&Path>,
        keep: bool,
        upstream_h2: bool,
    ) -> Result<Setup> {
        let tmp = tempfile::Builder::new()
            .prefix("portcullis-bench-")
            .tempdir()
            .context("creating the temp dir")?;
        let (dir, guard) = if keep {
            (tmp.keep(), None)
        } else {
            (tmp.path().to_path_buf(), Some(tmp))
        };
        let p = |f: &str| dir.join(f);

        let trust = Authority::generate("bench.test CA", Some("spiffe://bench.test"))?;
        trust.write(&p("bench-ca.pem"), &p("bench-ca.key"))?;
        let mut server = LeafSpec::svid("spiffe://bench.test/portcullis", TTL);
        server.dns = vec!["localhost".into()];
        server.ips = vec![[127, 0, 0, 1].into()];
        trust
            .issue(&server)?
            .write(&p("server.pem"), &p("server.key"))?;
        let client = trust.issue(&LeafSpec::svid(CLIENT_ID, TTL))?;
        client.write(&p("client.pem"), &p("client.key"))?;

        let mitm = Authority::generate("portcullis-bench MITM CA", None)?;
        mitm.write(&p("mitm-ca.pem"), &p("mitm-ca.key"))?;

        let upstream = Authority::generate("portcullis-bench upstream CA", None)?;
        let upstream_leaf = upstream.issue(&LeafSpec::server(
            &[MITM_HOST, PASSTHROUGH_HOST, "::1"],
            TTL,
        ))?;
        let upstream_ca = match upstream_ca_pem {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading --upstream-ca {}", path.display()))?;
                write_file(&p("upstream-ca.pem"), &pem, false)?;
                CertificateDer::from_pem_slice(&pem)
                    .with_context(|| format!("{}: no PEM certificate", path.display()))?
            }
            None => {
                upstream.write(&p("upstream-ca.pem"), &p("upstream-ca.key"))?;
                CertificateDer::from(upstream.cert_der().to_vec())
            }
        };

        std::fs::create_dir_all(p("policy")).context("creating policy/")?;
        write_file(
            &p("policy/allow.rego"),
            b"package portcullis\n\ndecision := true\n",
            false,
        )?;
        let config = p("config.yaml");
        write_config(&config, true)?;

        Ok(Setup {
            upstream_tls: upstream_server_tls(&upstream_leaf, upstream_h2)?,
            client_chain: vec![CertificateDer::from(client.cert_der.clone())],
            client_key: PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes())
                .context("client key")?,
            trust_ca: CertificateDer::from(trust.cert_der().to_vec()),
            mitm_ca: CertificateDer::from(mitm.cert_der().to_vec()),
            upstream_ca,
            config,
            dir,
            _guard: guard,
        })
    }

    /// Client configs. Session resumption is off unless asked for, so "new connection per
    /// request" means full handshakes on every hop.
    pub fn client_tls(&self, resumption: bool, http2: bool) -> Result<ClientTls> {
        self.client_tls_trusting(resumption, http2, &self.mitm_ca)
    }

    /// Client configs whose intercepted hop trusts `mitm_ca` (a peer's own CA).
    pub fn client_tls_trusting(
        &self,
        resumption: bool,
        http2: bool,
        mitm_ca: &CertificateDer<'static>,
    ) -> Result<ClientTls> {
        let base = |ca: &CertificateDer<'static>| -> Result<_> {
            let mut roots = RootCertStore::empty();
            roots.add(ca.clone())?;
            Ok(
                ClientConfig::builder_with_provider(portcullis::tls::provider())
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots),
            )
        };
        let finish = |mut cfg: ClientConfig, alpn: bool| {
            if !resumption {
                cfg.resumption = rustls::client::Resumption::disabled();
            }
            if alpn {
                let proto: &[u8] = if http2 { b"h2" } else { b"http/1.1" };
                cfg.alpn_protocols = vec![proto.to_vec()];
            }
            Arc::new(cfg)
        };
        let proxy = base(&self.trust_ca)?
            .with_client_auth_cert(self.client_chain.clone(), self.client_key.clone_key())
            .context("client SVID")?;
        Ok(ClientTls {
            proxy: finish(proxy, false),
            mitm: finish(base(mitm_ca)?.with_no_client_auth(), true),
            upstream: finish(base(&self.upstream_ca)?.with_no_client_auth(), true),
        })
    }
}

/// The example policy (policy/examples/policies, tests left out) that `full` and
/// `policy-heavy` evaluate.
const EXAMPLE_POLICY: &[(&str, &str)] = &[
    (
        "data.yaml",
        include_str!("../../policy/examples/policies/data.yaml"),
    ),
    (
        "portcullis/decision.rego",
        include_str!("../../policy/examples/policies/portcullis/decision.rego"),
    ),
    (
        "portcullis/hosts.rego",
        include_str!("../../policy/examples/policies/portcullis/hosts.rego"),
    ),
    (
        "portcullis/hours.rego",
        include_str!("../../policy/examples/policies/portcullis/hours.rego"),
    ),
    (
        "portcullis/methods.rego",
        include_str!("../../policy/examples/policies/portcullis/methods.rego"),
    ),
    (
        "portcullis/trust_domains.rego",
        include_str!("../../policy/examples/policies/portcullis/trust_domains.rego"),
    ),
];

/// The placeholder the `full` profile's requests carry; substituted with a file secret.
pub const BENCH_PLACEHOLDER: &str = "pcx_bench";
/// Its real value (in the `bench-secret` file), which the upstream's `/cred` checks for.
pub const BENCH_SECRET: &str = "bench-real-secret-value";

impl Setup {
    /// The config of a non-bare profile, with its policy directory; `otlp` is where `full`
    /// exports spans (OTLP/HTTP).
    pub fn write_profile(
        &self,
        profile: Profile,
        otlp: SocketAddr,
        otel_sampling: f64,
    ) -> Result<PathBuf> {
        let name = profile.name();
        if profile == Profile::Otel {
            let mut cfg = base_config("policy/");
            cfg["telemetry"] = json!({
                "decision_log": "off",
                "otlp_endpoint": format!("http://{otlp}"),
                "otlp_protocol": "http/protobuf",
                "sampling_ratio": otel_sampling,
            });
            let path = self.dir.join("config-otel.yaml");
            write_file(&path, format!("{cfg:#}\n").as_bytes(), false)?;
            return Ok(path);
        }
        self.write_example_policy(name, profile == Profile::PolicyHeavy)?;
        let mut cfg = base_config(&format!("policy-{name}/"));
        if profile == Profile::FullDelegated {
            self.write_delegation()?;
            cfg["delegation"] = json!({"issuers": [{
                "issuer": BENCH_ISSUER, "jwks_file": "bench-jwks.json", "audiences": ["portcullis"],
            }]});
        }
        if matches!(
            profile,
            Profile::Full | Profile::FullDelegated | Profile::FullShadow
        ) {
            write_file(
                &self.dir.join("bench-secret"),
                format!("{BENCH_SECRET}\n").as_bytes(),
                false,
            )?;
            cfg["credentials"] = json!([{
                // `host:*`: https on the bench upstream's port (binaries before port binding
                // read the bare host, so one config serves before/after runs).
                "name": "bench", "placeholder": BENCH_PLACEHOLDER,
                "hosts": [MITM_HOST, format!("{MITM_HOST}:*")],
                "source": {"file": "bench-secret"},
            }]);
            cfg["telemetry"] = json!({
                "decision_log": "stdout",
                "otlp_endpoint": format!("http://{otlp}"),
                "otlp_protocol": "http/protobuf",
            });
        } else {
            cfg["telemetry"] = json!({"decision_log": "off"});
        }
        if profile == Profile::FullShadow {
            let candidate = self.write_example_policy("full-shadow-candidate", false)?;
            cfg["policy"]["shadow"] = json!({"paths": [candidate]});
            cfg["telemetry"]["decision_log_input"] = json!(true);
        }
        let path = self.dir.join(format!("config-{name}.yaml"));
        write_file(&path, format!("{cfg:#}\n").as_bytes(), false)?;
        Ok(path)
    }

    /// `policy-NAME/`: the example policy with the load client's identity allowed to reach
    /// the built-in upstream (the example's data shape); `heavy` adds thousands of other
    /// identities and hosts around it.
    fn write_example_policy(&self, name: &str, heavy: bool) -> Result<PathBuf> {
        let dir = self.dir.join(format!("policy-{name}"));
        std::fs::create_dir_all(dir.join("portcullis")).context("creating the policy dir")?;
        for (file, text) in EXAMPLE_POLICY {
            write_file(&dir.join(file), text.as_bytes(), false)?;
        }
        let mut agents = serde_json::Map::new();
        if heavy {
            for i in 0..5000 {
                let hosts: Vec<String> = (0..20)
                    .map(|h| format!("api-{h}.tenant-{i}.example.com"))
                    .collect();
                agents.insert(
                    format!("spiffe://bench.test/tenant-{i}/agent"),
                    json!({"hosts": hosts}),
                );
            }
        }
        agents.insert(CLIENT_ID.into(), json!({"hosts": [MITM_HOST]}));
        write_file(
            &dir.join("bench.json"),
            json!({"agents": agents}).to_string().as_bytes(),
            false,
        )?;
        Ok(dir)
    }

    /// The soak's proxy config: the `full` profile (example policy, the file credential, the
    /// decision log, span export to `otlp`) plus an OAuth credential whose token endpoint is the
    /// built-in upstream (`upstream`), cached in the Redis at `redis_url`, and a policy rule that
    /// hides one of the upstream's MCP tools (so `tools/list` results are filtered). The two
    /// secrets the config names come from the environment ([`SOAK_ENV`]).
    pub fn write_soak(
        &self,
        otlp: SocketAddr,
        upstream: SocketAddr,
        redis_url: &str,
    ) -> Result<PathBuf> {
        let dir = self.write_example_policy("soak", false)?;
        write_file(
            &dir.join("portcullis/soak.rego"),
            SOAK_RULE.as_bytes(),
            false,
        )?;
        write_file(
            &self.dir.join("bench-secret"),
            format!("{BENCH_SECRET}\n").as_bytes(),
            false,
        )?;
        let hosts = json!([MITM_HOST, format!("{MITM_HOST}:*")]);
        let mut cfg = base_config("policy-soak/");
        cfg["credentials"] = json!([
            {
                "name": "bench", "placeholder": BENCH_PLACEHOLDER, "hosts": hosts,
                "source": {"file": "bench-secret"},
            },
            {
                "name": "oauth", "placeholder": OAUTH_PLACEHOLDER, "hosts": hosts,
                "source": {"oauth": {
                    "token_url": format!("https://{upstream}/oauth/token"),
                    "client_id": "portcullis-soak",
                    "client_secret": format!("env:{}", SOAK_ENV[0]),
                    "ca": "upstream-ca.pem",
                }},
            },
        ]);
        cfg["telemetry"] = json!({
            "decision_log": "stdout",
            "otlp_endpoint": format!("http://{otlp}"),
            "otlp_protocol": "http/protobuf",
        });
        cfg["redis"] = json!({
            "url": redis_url,
            "encryption_key": format!("env:{}", SOAK_ENV[1]),
            "prefix": "portcullis-soak",
        });
        let path = self.dir.join("config-soak.yaml");
        write_file(&path, format!("{cfg:#}\n").as_bytes(), false)?;
        Ok(path)
    }
}

impl Setup {
    /// The `ratelimit` profile: the bare config plus a limit keyed by identity that the load
    /// never reaches, its buckets in the Redis at `redis_url` (encryption key from
    /// [`SOAK_ENV`]`[1]`).
    pub fn write_limited(&self, redis_url: &str) -> Result<PathBuf> {
        let mut cfg = base_config("policy/");
        cfg["telemetry"] = json!({"decision_log": "off"});
        cfg["rate_limits"] = json!({"limits": [
            {"name": "bench", "by": ["identity"], "rate": "1000000000/s"},
        ]});
        cfg["redis"] = json!({
            "url": redis_url,
            "encryption_key": format!("env:{}", SOAK_ENV[1]),
            "prefix": "portcullis-bench",
        });
        let path = self.dir.join("config-ratelimit.yaml");
        write_file(&path, format!("{cfg:#}\n").as_bytes(), false)?;
        Ok(path)
    }
}

/// The issuer of the `full-delegated` profile's token.
pub const BENCH_ISSUER: &str = "https://bench-idp.test";

impl Setup {
    /// An ES256 key: its JWK Set (`bench-jwks.json`) and a token it signed for `bench-user`,
    /// valid for two hours (`bench-delegation.jwt`).
    fn write_delegation(&self) -> Result<()> {
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .map_err(|_| anyhow::anyhow!("generating the bench ES256 key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("loading the bench ES256 key"))?;
        let public = pair.public_key().as_ref();
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "bench",
            "x": b64url(&public[1..33]), "y": b64url(&public[33..])}]});
        write_file(
            &self.dir.join("bench-jwks.json"),
            jwks.to_string().as_bytes(),
            false,
        )?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let claims = json!({"iss": BENCH_ISSUER, "sub": "bench-user", "aud": "portcullis",
            "iat": now, "exp": now + 7200, "scope": "bench", "act": {"sub": CLIENT_ID}});
        let signed = format!(
            "{}.{}",
            b64url(
                json!({"alg": "ES256", "kid": "bench", "typ": "JWT"})
                    .to_string()
                    .as_bytes()
            ),
            b64url(claims.to_string().as_bytes())
        );
        let sig = pair
            .sign(&rng, signed.as_bytes())
            .map_err(|_| anyhow::anyhow!("signing the bench token"))?;
        let token = format!("{signed}.{}", b64url(sig.as_ref()));
        write_file(
            &self.dir.join("bench-delegation.jwt"),
            token.as_bytes(),
            false,
        )?;
        Ok(())
    }

    /// The `full-delegated` profile's token (after [`Setup::write_profile`] wrote it).
    pub fn delegation_token(&self) -> Result<String> {
        std::fs::read_to_string(self.dir.join("bench-delegation.jwt"))
            .context("reading the bench delegation token")
    }
}

/// Unpadded base64url.
fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// The placeholder of the soak's OAuth credential.
pub const OAUTH_PLACEHOLDER: &str = "pcx_soak_oauth";

/// The environment variables the soak config's secret references name: the OAuth client
/// secret and the Redis cache's encryption key.
pub const SOAK_ENV: [&str; 2] = ["PORTCULLIS_SOAK_OAUTH_SECRET", "PORTCULLIS_SOAK_REDIS_KEY"];

/// Added to the example policy for the soak: one of the upstream's tools is never allowed, so
/// every `tools/list` result is filtered.
const SOAK_RULE: &str = r#"package portcullis

import rego.v1

deny contains "soak: delete_all is never allowed" if {
	input.kind == "mcp"
	input.mcp.tool == "delete_all"
}
"#;

/// The built-in upstream offers h2 (as most HTTPS APIs do) unless told not to; the proxy's
/// upstream client then multiplexes every tunnel's requests onto shared h2 connections.
/// The proxy config: the README's minimal `serve` shape (JSON is YAML) plus the passthrough
/// host. `telemetry_off` turns the decision log off, as the budget's bare pipeline wants;
/// proxies from before the `telemetry` key refuse it, so the caller can write it again without.
pub fn write_config(path: &Path, telemetry_off: bool) -> Result<()> {
    let mut cfg = base_config("policy/");
    if telemetry_off {
        cfg["telemetry"] = json!({"decision_log": "off"});
    }
    write_file(path, format!("{cfg:#}\n").as_bytes(), false)?;
    Ok(())
}

fn base_config(policy: &str) -> serde_json::Value {
    json!({
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "tls": {"cert": "server.pem", "key": "server.key"},
        "trust_domains": {TRUST_DOMAIN: {"bundle": "bench-ca.pem"}},
        "mitm": {
            "ca_cert": "mitm-ca.pem",
            "ca_key": "mitm-ca.key",
            "passthrough": [PASSTHROUGH_HOST],
        },
        "upstream": {"extra_roots": ["upstream-ca.pem"]},
        "egress": {"allow": ["127.0.0.0/8", "::1/128"]},
        "policy": {"paths": [policy]},
    })
}

fn upstream_server_tls(leaf: &Issued, h2: bool) -> Result<Arc<ServerConfig>> {
    let cert = CertificateDer::from(leaf.cert_der.clone());
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).context("upstream key")?;
    let mut cfg = ServerConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    cfg.alpn_protocols = if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod b64url_tests {
    #[test]
    fn rfc_4648_url_alphabet_without_padding() {
        for (raw, want) in [
            (&b""[..], ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (&[0xfb, 0xff][..], "-_8"),
        ] {
            assert_eq!(super::b64url(raw), want);
        }
    }
}
