//! Writes the seed corpus of the `x509_svid` target: real certificates from the proxy's own
//! PKI helpers (`portcullis::pki`), good and bad SVIDs and CA certificates, as DER.
//! Run from tests/fuzz: `cargo run --example gen_x509_seeds [corpus/x509_svid]`.

use std::time::Duration;

use portcullis::pki::rcgen::{CustomExtension, KeyUsagePurpose};
use portcullis::pki::{Authority, LeafSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus/x509_svid".into());
    std::fs::create_dir_all(&dir)?;
    let day = Duration::from_secs(86_400);
    let root = Authority::generate("fuzz root", Some("spiffe://fuzz.test"))?;
    let inter = root.intermediate("fuzz intermediate")?;
    let mut seeds: Vec<(&str, Vec<u8>)> = vec![
        ("root_ca.der", root.cert_der().to_vec()),
        ("intermediate_ca.der", inter.cert_der().to_vec()),
    ];
    let issue = |spec: &LeafSpec| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        Ok(root.issue(spec)?.cert_der)
    };
    seeds.push((
        "svid.der",
        issue(&LeafSpec::svid("spiffe://fuzz.test/agents/a", day))?,
    ));
    seeds.push((
        "svid_from_intermediate.der",
        inter
            .issue(&LeafSpec::svid("spiffe://fuzz.test/w", day))?
            .cert_der,
    ));
    let mut no_path = LeafSpec::svid("spiffe://fuzz.test", day);
    no_path.common_name = "no path".into();
    seeds.push(("svid_no_path.der", issue(&no_path)?));
    let mut two = LeafSpec::svid("spiffe://fuzz.test/a", day);
    two.uris.push("spiffe://fuzz.test/b".into());
    seeds.push(("svid_two_uris.der", issue(&two)?));
    let mut ca = LeafSpec::svid("spiffe://fuzz.test/ca", day);
    ca.is_ca = true;
    seeds.push(("svid_is_ca.der", issue(&ca)?));
    let mut sign = LeafSpec::svid("spiffe://fuzz.test/a", day);
    sign.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    seeds.push(("svid_key_cert_sign.der", issue(&sign)?));
    let mut empty_subject = LeafSpec::svid("spiffe://fuzz.test/a", day);
    empty_subject.common_name = String::new();
    seeds.push(("svid_empty_subject.der", issue(&empty_subject)?));
    let mut non_critical_ku = LeafSpec::svid("spiffe://fuzz.test/a", day);
    non_critical_ku.key_usages.clear();
    // keyUsage digitalSignature, not critical: BIT STRING 0x80.
    non_critical_ku
        .extensions
        .push(CustomExtension::from_oid_content(
            &[2, 5, 29, 15],
            vec![0x03, 0x02, 0x07, 0x80],
        ));
    seeds.push(("svid_noncritical_ku.der", issue(&non_critical_ku)?));
    let mut bad_uri = LeafSpec::svid("spiffe://Fuzz.test/a/../b", day);
    bad_uri.dns.push("agent.fuzz.test".into());
    seeds.push(("svid_bad_uri.der", issue(&bad_uri)?));
    let mut expired = LeafSpec::svid("spiffe://fuzz.test/old", day);
    expired.not_before = time::OffsetDateTime::UNIX_EPOCH;
    expired.not_after = time::OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1);
    seeds.push(("svid_1970.der", issue(&expired)?));
    seeds.push((
        "server.der",
        issue(&LeafSpec::server(&["api.example.com", "127.0.0.1"], day))?,
    ));
    for (name, der) in &seeds {
        std::fs::write(format!("{dir}/seed-{name}"), der)?;
    }
    println!("wrote {} seeds to {dir}", seeds.len());
    Ok(())
}
