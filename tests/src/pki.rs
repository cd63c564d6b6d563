//! The test PKI, generated at test time with the project's own `pki` module: trust domains,
//! client SVIDs, the proxy's and the upstream's certificates, and the base config using them.

use super::*;

/// A client identity on disk.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The test PKI: two trust domains, the proxy's server SVID, the MITM CA, an upstream CA.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub acme: Authority,
    pub other: Authority,
    pub upstream_ca: Authority,
    pub upstream_tls: Arc<rustls::ServerConfig>,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let p = |f: &str| dir.path().join(f);
        let acme = Authority::generate("acme.test CA", Some("spiffe://acme.test")).unwrap();
        acme.write(&p("acme-ca.pem"), &p("acme-ca.key")).unwrap();
        let other = Authority::generate("other.test CA", Some("spiffe://other.test")).unwrap();
        other.write(&p("other-ca.pem"), &p("other-ca.key")).unwrap();
        let mut server = LeafSpec::svid("spiffe://acme.test/portcullis", Duration::from_secs(3600));
        server.dns = vec!["localhost".into()];
        server.ips = vec![[127, 0, 0, 1].into()];
        acme.issue(&server)
            .unwrap()
            .write(&p("server.pem"), &p("server.key"))
            .unwrap();
        let mitm = Authority::generate("test MITM CA", None).unwrap();
        mitm.write(&p("mitm-ca.pem"), &p("mitm-ca.key")).unwrap();
        let upstream_ca = Authority::generate("test upstream CA", None).unwrap();
        upstream_ca
            .write(&p("upstream-ca.pem"), &p("upstream-ca.key"))
            .unwrap();
        let upstream_tls = server_tls(&upstream_ca, &["localhost", "127.0.0.1", "127.0.0.2"]);
        // The network tests run on an allow-all policy; policy tests replace it.
        std::fs::create_dir(p("policy")).unwrap();
        std::fs::write(p("policy/allow.rego"), ALLOW_ALL).unwrap();
        Pki {
            dir,
            acme,
            other,
            upstream_ca,
            upstream_tls,
        }
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// Issue a client certificate from `spec` with `ca`, written as `name.pem`/`name.key`.
    pub fn client_with(&self, name: &str, ca: &Authority, spec: &LeafSpec) -> ClientCert {
        let c = ClientCert {
            cert: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}.key")),
        };
        ca.issue(spec).unwrap().write(&c.cert, &c.key).unwrap();
        c
    }

    /// A valid SVID for `spiffe_id` from the acme.test CA.
    pub fn client(&self, name: &str, spiffe_id: &str) -> ClientCert {
        self.client_with(
            name,
            &self.acme,
            &LeafSpec::svid(spiffe_id, Duration::from_secs(3600)),
        )
    }

    /// The config every test starts from, as JSON (which is YAML), paths relative to the dir.
    pub fn base_config(&self) -> Value {
        json!({
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "reload_interval": "100ms",
            "tls": {"cert": "server.pem", "key": "server.key"},
            "trust_domains": {
                "acme.test": {"bundle": "acme-ca.pem"},
                "other.test": {"bundle": "other-ca.pem"},
            },
            "mitm": {"ca_cert": "mitm-ca.pem", "ca_key": "mitm-ca.key"},
            "upstream": {"extra_roots": ["upstream-ca.pem"]},
            "egress": {"allow": ["127.0.0.1/32"]},
            "policy": {"paths": ["policy"]},
        })
    }

    pub fn write_config(&self, cfg: &Value) -> PathBuf {
        let path = self.path("config.yaml");
        portcullis::pki::write_file(&path, cfg.to_string().as_bytes(), false).unwrap();
        path
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// A DER TLV with a short-form length (small values only).
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut v = vec![tag, u8::try_from(content.len()).unwrap()];
    v.extend_from_slice(content);
    v
}

/// A keyUsage extension written by hand, so its criticality can be wrong: `bits` is the first
/// byte of the BIT STRING (digitalSignature 0x80, keyCertSign 0x04, cRLSign 0x02).
pub fn key_usage_extension(bits: u8, critical: bool) -> rcgen::CustomExtension {
    let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 15], tlv(0x03, &[0, bits]));
    ext.set_criticality(critical);
    ext
}

/// A subjectAltName extension holding one URI, with the given criticality.
pub fn uri_san_extension(uri: &str, critical: bool) -> rcgen::CustomExtension {
    let san = tlv(0x30, &tlv(0x86, uri.as_bytes()));
    let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 17], san);
    ext.set_criticality(critical);
    ext
}

/// A TLS server config for `names`, signed by `ca`.
pub fn server_tls(ca: &Authority, names: &[&str]) -> Arc<rustls::ServerConfig> {
    let issued = ca
        .issue(&LeafSpec::server(names, Duration::from_secs(3600)))
        .unwrap();
    let cert = rustls_pki_types::CertificateDer::from(issued.cert_der.clone());
    let key = rustls_pki_types::pem::PemObject::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}
