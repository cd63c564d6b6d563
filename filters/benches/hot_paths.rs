//! The pure hot-path functions of the request pipeline, one request's worth each: SPIFFE ID
//! parsing, the X.509-SVID leaf checks, placeholder detection + substitution (the two
//! credential stages on a typical request), and JSON-RPC inspection of an MCP `tools/call`.
//! Run: `cargo bench -p portcullis-filters`. Results: bench/README.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis_filters::parse::destination::Destination;
use portcullis_filters::parse::identity::{self, SpiffeId};
use portcullis_filters::parse::secret::{Placeholder, SecretValue};
use portcullis_filters::pipeline::{Context, Filter, Peer, Via};
use portcullis_filters::stages::credentials::{
    Credential, CredentialDetect, CredentialSet, CredentialSubstitute, OnBehalf, SecretStore,
    StoreError,
};
use rcgen::{string::Ia5String, CertificateParams, KeyPair, KeyUsagePurpose, SanType};

const ID: &str = "spiffe://acme.test/agents/research";

fn svid_der() -> Vec<u8> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(Ia5String::try_from(ID).unwrap())];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .to_vec()
}

#[derive(Debug)]
struct Fixed(Arc<SecretValue>);

#[async_trait::async_trait]
impl SecretStore for Fixed {
    async fn get(
        &self,
        _name: &str,
        _on_behalf: Option<&OnBehalf<'_>>,
    ) -> Result<Arc<SecretValue>, StoreError> {
        Ok(self.0.clone())
    }
    async fn revoke(&self, _name: &str) -> bool {
        true
    }
}

/// A typical agent request to api.github.com carrying one placeholder.
fn request() -> http::request::Parts {
    let (parts, ()) = http::Request::builder()
        .method("GET")
        .uri("https://api.github.com/repos/acme/widgets/issues?state=open&per_page=50")
        .header("host", "api.github.com")
        .header("user-agent", "agent-runtime/1.4 python-httpx/0.27")
        .header("accept", "application/vnd.github+json")
        .header("authorization", "Bearer pcx_github")
        .header("x-github-api-version", "2022-11-28")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(())
        .unwrap()
        .into_parts();
    parts
}

fn benches(c: &mut Criterion) {
    c.bench_function("spiffe_id_parse", |b| {
        b.iter(|| SpiffeId::parse(black_box(ID)).unwrap())
    });

    let der = svid_der();
    let now = SystemTime::now();
    c.bench_function("svid_leaf_checks", |b| {
        b.iter(|| {
            let id = identity::check_svid_leaf(black_box(&der)).unwrap();
            identity::check_validity(&der, now).unwrap();
            id
        })
    });

    let set = Arc::new(CredentialSet::new(vec![Credential {
        name: "github".into(),
        placeholder: Placeholder::parse("pcx_github").unwrap(),
        hosts: vec![
            portcullis_filters::parse::destination::Binding::parse("api.github.com").unwrap(),
        ],
        body: false,
    }]));
    let detect = CredentialDetect { set: set.clone() };
    let substitute = CredentialSubstitute::new(
        set,
        Arc::new(Fixed(Arc::new(SecretValue::new(
            "ghp_0123456789abcdefghijklmnopqrstuvwxyz".into(),
        )))),
    );
    let peer = Arc::new(Peer {
        spiffe_id: SpiffeId::parse(ID).unwrap(),
        source: "10.0.0.5:51234".parse().unwrap(),
        source_ip: "10.0.0.5".into(),
        proof: portcullis_filters::pipeline::Proof::X509Svid,
    });
    let dest = Destination::from_absolute_uri(&"https://api.github.com/".parse().unwrap()).unwrap();
    let template = request();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    c.bench_function("placeholder_detect_and_substitute", |b| {
        b.iter_batched(
            || {
                let parts = template.clone();
                let ctx = Context::new(peer.clone(), Via::Mitm, dest.clone(), &parts);
                (ctx, parts)
            },
            |(mut ctx, mut parts)| {
                rt.block_on(async {
                    detect.request(&mut ctx, &mut parts).await;
                    substitute.request(&mut ctx, &mut parts).await;
                });
                (ctx, parts)
            },
            criterion::BatchSize::SmallInput,
        )
    });

    let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"create_issue","arguments":{"owner":"acme","repo":"widgets","title":"Flaky test in CI","body":"The nightly run failed twice this week."}}}"#;
    c.bench_function("jsonrpc_inspect_tools_call", |b| {
        b.iter(|| {
            portcullis_filters::parse::jsonrpc::parse(
                black_box(body),
                Some("session-1"),
                Some("2025-06-18"),
            )
            .unwrap()
        })
    });
}

criterion_group! {
    name = hot_paths;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(hot_paths);
