//! `portcullis connect --transparent`: connections the kernel redirected to the connector
//! (nftables/iptables `REDIRECT` in the workload's network namespace). The connector recovers
//! the original destination (`SO_ORIGINAL_DST`), names it from the first bytes the client sends
//! (the TLS ClientHello's SNI, or a plain-HTTP request's `Host`), checks that the name and the
//! destination agree, and asks the central proxy for `CONNECT name:port` over its mTLS
//! connection: identity, policy, MITM, credentials and spans are then the same as for any
//! proxied client. The client's first bytes follow the CONNECT unchanged.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use portcullis_filters::parse::destination::Destination;
use portcullis_filters::parse::secret::SecretValue;
use portcullis_filters::stages::jwt_svid::JWT_SVID_HEADER;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most bytes read from the client before its destination must be named (a ClientHello with
/// post-quantum key shares is under 2 KiB; a request head under the proxy's header limit).
pub const FIRST_BYTES: usize = 16 * 1024;
/// Longest response head accepted from the central proxy for the CONNECT.
const ANSWER_HEAD: usize = 16 * 1024;

/// What a redirected connection is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// Where the client connected to, before the kernel redirected it.
    pub original: SocketAddr,
    /// The CONNECT authority: the SNI or Host name (or the original IP) and the original port.
    pub authority: String,
    /// `tls`, `http` or `tcp` (neither: named by its IP).
    pub protocol: &'static str,
    /// The bytes read to find the name: sent on after the CONNECT.
    pub first: Vec<u8>,
}

/// The destination before the kernel redirected the connection to us.
pub fn original_destination(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match tcp.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the original destination is not an IP address",
        )
    })
}

/// The result of parsing a prefix of the client's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Named {
    /// More bytes are needed.
    Partial,
    /// The name the bytes carry (`None`: the protocol carries none).
    Done(Option<String>),
    /// The bytes are not what their first byte said.
    Invalid(&'static str),
}

/// The `server_name` of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3), read from the
/// handshake records at the start of `buf` (the ClientHello may span several records).
pub fn sni(buf: &[u8]) -> Named {
    // Reassemble the handshake message from the records' fragments.
    let mut hs = Vec::new();
    let mut rest = buf;
    let mut need = None;
    loop {
        if rest.len() < 5 {
            return Named::Partial;
        }
        if rest[0] != 0x16 || rest[1] != 0x03 {
            return Named::Invalid("not a TLS handshake record");
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > 16384 + 256 {
            return Named::Invalid("a TLS record of an impossible length");
        }
        let Some(fragment) = rest.get(5..5 + len) else {
            return Named::Partial;
        };
        hs.extend_from_slice(fragment);
        rest = &rest[5 + len..];
        if need.is_none() && hs.len() >= 4 {
            if hs[0] != 1 {
                return Named::Invalid("the first handshake message is not a ClientHello");
            }
            need =
                Some(4 + (usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3])));
        }
        match need {
            Some(n) if n > FIRST_BYTES => return Named::Invalid("a ClientHello over 16 KiB"),
            Some(n) if hs.len() >= n => return client_hello_sni(&hs[4..n]),
            _ => {}
        }
    }
}

/// A cursor over a ClientHello body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn client_hello_sni(body: &[u8]) -> Named {
    let parsed = (|| {
        let mut r = Reader(body);
        r.take(2 + 32)?; // legacy_version, random
        r.vec8()?; // legacy_session_id
        r.vec16()?; // cipher_suites
        r.vec8()?; // legacy_compression_methods
        if r.0.is_empty() {
            return Some(Ok(None)); // no extensions at all
        }
        let mut exts = Reader(r.vec16()?);
        let mut found = None;
        while !exts.0.is_empty() {
            let kind = exts.u16()?;
            let data = exts.vec16()?;
            if kind != 0 {
                continue;
            }
            if found.is_some() {
                return Some(Err("two server_name extensions"));
            }
            let mut list = Reader(Reader(data).vec16()?);
            while !list.0.is_empty() {
                let name_type = list.u8()?;
                let name = list.vec16()?;
                if name_type != 0 {
                    continue;
                }
                if found.is_some() {
                    return Some(Err("two host names in server_name"));
                }
                found = Some(name);
            }
        }
        Some(Ok(found))
    })();
    match parsed {
        None => Named::Invalid("a malformed ClientHello"),
        Some(Err(e)) => Named::Invalid(e),
        Some(Ok(None)) => Named::Done(None),
        Some(Ok(Some(name))) => match std::str::from_utf8(name) {
            Ok(n) if !n.is_empty() => Named::Done(Some(n.to_ascii_lowercase())),
            _ => Named::Invalid("a server_name that is not a host name"),
        },
    }
}

/// The host of a plain-HTTP/1.x request's `Host` header (without its port).
pub fn http_host(buf: &[u8]) -> Named {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Named::Partial,
        Err(_) => Named::Invalid("not an HTTP/1.x request"),
        Ok(httparse::Status::Complete(_)) => {
            let mut hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"));
            let (Some(host), None) = (hosts.next(), hosts.next()) else {
                return Named::Invalid("an HTTP request without exactly one Host header");
            };
            let Ok(value) = std::str::from_utf8(host.value) else {
                return Named::Invalid("a Host header that is not text");
            };
            match value.trim().parse::<http::uri::Authority>() {
                Ok(a) if !a.host().is_empty() => Named::Done(Some(
                    a.host()
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_ascii_lowercase(),
                )),
                _ => Named::Invalid("a Host header that is not a host"),
            }
        }
    }
}

/// Reads the client's first bytes until its destination is named (or the protocol is known to
/// carry no name), within `timeout`. A client that speaks first with neither TLS nor HTTP is
/// named by its original IP; one that sends nothing in time is refused (server-speaks-first
/// protocols are not carried).
pub async fn capture<S: AsyncRead + Unpin>(
    client: &mut S,
    original: SocketAddr,
    timeout: Duration,
) -> Result<Captured, String> {
    let mut first = Vec::with_capacity(2048);
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = client
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the client's first bytes: {e}"))?;
            if n == 0 {
                return Err("the client closed before naming its destination".to_owned());
            }
            first.extend_from_slice(&chunk[..n]);
            let (protocol, named) = match first[0] {
                0x16 => ("tls", sni(&first)),
                b'A'..=b'Z' => ("http", http_host(&first)),
                _ => ("tcp", Named::Done(None)),
            };
            match named {
                Named::Partial if first.len() < FIRST_BYTES => continue,
                Named::Partial => return Err(format!("no {protocol} name in the first 16 KiB")),
                Named::Invalid(why) => return Err(why.to_owned()),
                Named::Done(name) => return Ok((protocol, name)),
            }
        }
    };
    let (protocol, name) = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| format!("the client named no destination within {timeout:?}"))??;
    let authority = authority_for(name.as_deref(), original)?;
    Ok(Captured {
        original,
        authority,
        protocol,
        first,
    })
}

/// The CONNECT authority for `name` (the original IP without one) and the original port, as
/// the central proxy's own parser accepts it: a name with anything but a DNS name's or an IP
/// literal's characters (a CR or LF the client put in its SNI, say) is refused, never written
/// into the CONNECT request.
pub fn authority_for(name: Option<&str>, original: SocketAddr) -> Result<String, String> {
    let host = match name {
        Some(name) => name.to_owned(),
        None => original.ip().to_string(),
    };
    let raw = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", original.port()),
        _ => format!("{host}:{}", original.port()),
    };
    Destination::parse_connect_authority(&raw)
        .map(|d| d.authority())
        .map_err(|e| {
            format!(
                "the client named {:?}: {e}",
                host.escape_debug().to_string()
            )
        })
}

/// The name must lead where the client was going: an IP literal must be the original IP; a
/// DNS name must resolve (here, with the namespace's resolver, as the client's did) to it.
/// Otherwise a client could connect to one address and name another (domain fronting in
/// reverse), and the policy would decide on a name the client never meant to reach.
pub async fn check_agreement(captured: &Captured) -> Result<(), String> {
    let (host, _) = captured
        .authority
        .rsplit_once(':')
        .unwrap_or((&captured.authority, ""));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let want = captured.original.ip();
    if let Ok(ip) = host.parse::<IpAddr>() {
        return if ip == want {
            Ok(())
        } else {
            Err(format!("the client connected to {want} but named {ip}"))
        };
    }
    let addrs = tokio::net::lookup_host((host, captured.original.port()))
        .await
        .map_err(|e| format!("{host} does not resolve here: {e}"))?;
    let addrs: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
    if addrs.contains(&want) {
        Ok(())
    } else {
        Err(format!(
            "the client connected to {want}, but {host} resolves to {addrs:?} here"
        ))
    }
}

/// Sends `CONNECT authority` to the central proxy and reads its answer head. `Ok` on a 2xx;
/// otherwise the answer as received (head and any body bytes read with it), for an HTTP client.
pub async fn open_tunnel<S: AsyncRead + AsyncWrite + Unpin>(
    proxy: &mut S,
    authority: &str,
    jwt_svid: Option<&SecretValue>,
) -> Result<(), (u16, Vec<u8>)> {
    // The JWT-SVID is visible ASCII (checked when it was fetched): one header line.
    let jwt_svid = jwt_svid
        .map(|t| format!("{JWT_SVID_HEADER}: {}\r\n", t.expose()))
        .unwrap_or_default();
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{jwt_svid}\r\n");
    if proxy.write_all(request.as_bytes()).await.is_err() {
        return Err((0, Vec::new()));
    }
    let mut head = Vec::with_capacity(512);
    loop {
        let mut chunk = [0u8; 1024];
        let n = match proxy.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err((0, head)),
            Ok(n) => n,
        };
        head.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&head) {
            Ok(httparse::Status::Complete(len)) => {
                let code = resp.code.unwrap_or(0);
                // A 2xx answer to CONNECT has no body: whatever follows is the tunnel's, and
                // the proxy sends nothing before the client does.
                return if (200..300).contains(&code) && len == head.len() {
                    Ok(())
                } else {
                    Err((code, head))
                };
            }
            Ok(httparse::Status::Partial) if head.len() < ANSWER_HEAD => continue,
            _ => return Err((0, head)),
        }
    }
}

/// The nftables ruleset that redirects the namespace's TCP to the connector at `port`, except
/// the connector's own (`uid`), and drops other IP egress of everyone else but DNS.
pub fn nft_rules(port: u16, uid: u32) -> String {
    format!(
        "# portcullis connect --transparent: apply with `nft -f FILE` in the workload's network
# namespace (needs CAP_NET_ADMIN). The connector runs as uid {uid}; its own traffic (to the
# central proxy, and DNS) is left alone, so it cannot loop.
table inet portcullis
delete table inet portcullis
table inet portcullis {{
\tchain capture {{
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta skuid {uid} return
\t\tmeta l4proto tcp redirect to :{port}
\t}}
\tchain guard {{
\t\ttype filter hook output priority 0; policy drop;
\t\tmeta skuid {uid} accept
\t\t# redirected TCP now goes to the connector on this host
\t\tip daddr 127.0.0.0/8 tcp dport {port} accept
\t\tip6 daddr ::1 tcp dport {port} accept
\t\tmeta l4proto {{ tcp, udp }} th dport 53 accept
\t\toif lo ct state established,related accept
\t}}
}}
"
    )
}

/// The same as iptables commands (IPv4 and IPv6), for hosts without nftables.
pub fn iptables_rules(port: u16, uid: u32) -> String {
    let mut out = String::from(
        "# The same with iptables/ip6tables (commented, so this whole output is one nft file):\n",
    );
    for tool in ["iptables", "ip6tables"] {
        let lo = if tool == "iptables" {
            "127.0.0.0/8"
        } else {
            "::1/128"
        };
        out.push_str(&format!(
            "# {tool} -t nat -A OUTPUT -p tcp -m owner --uid-owner {uid} -j RETURN\n\
             # {tool} -t nat -A OUTPUT -p tcp -j REDIRECT --to-ports {port}\n\
             # {tool} -A OUTPUT -m owner --uid-owner {uid} -j ACCEPT\n\
             # {tool} -A OUTPUT -p tcp -d {lo} --dport {port} -j ACCEPT\n\
             # {tool} -A OUTPUT -p udp --dport 53 -j ACCEPT\n\
             # {tool} -A OUTPUT -p tcp --dport 53 -j ACCEPT\n\
             # {tool} -A OUTPUT -o lo -m state --state ESTABLISHED,RELATED -j ACCEPT\n\
             # {tool} -P OUTPUT DROP\n"
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, for `name`.
    fn hello(name: &str) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        let _ = &mut roots;
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn sni_of_a_real_client_hello_in_any_cut() {
        let bytes = hello("api.example.com");
        assert_eq!(sni(&bytes), Named::Done(Some("api.example.com".into())));
        for cut in 0..bytes.len() {
            assert_eq!(sni(&bytes[..cut]), Named::Partial, "cut at {cut}");
        }
        // The same hello split over two records still names it.
        let body = &bytes[5..];
        let mid = body.len() / 2;
        let mut split = vec![0x16, 0x03, 0x01];
        split.extend_from_slice(&u16::try_from(mid).unwrap().to_be_bytes());
        split.extend_from_slice(&body[..mid]);
        split.extend_from_slice(&[0x16, 0x03, 0x01]);
        split.extend_from_slice(&u16::try_from(body.len() - mid).unwrap().to_be_bytes());
        split.extend_from_slice(&body[mid..]);
        assert_eq!(sni(&split), Named::Done(Some("api.example.com".into())));
        // An IP address is sent without SNI.
        assert_eq!(sni(&hello("127.0.0.1")), Named::Done(None));
        assert!(matches!(
            sni(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"),
            Named::Invalid(_)
        ));
        assert!(matches!(sni(b"GET / HTTP/1.1\r\n"), Named::Invalid(_)));
    }

    #[test]
    fn host_of_a_plain_request() {
        assert_eq!(
            http_host(b"GET /x HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n"),
            Named::Done(Some("example.com".into()))
        );
        assert_eq!(http_host(b"GET /x HTTP/1.1\r\nHost: exa"), Named::Partial);
        assert!(matches!(
            http_host(b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Named::Invalid(_)
        ));
        assert!(matches!(
            http_host(b"GET /x HTTP/1.1\r\n\r\n"),
            Named::Invalid(_)
        ));
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Named::Done(Some("::1".into()))
        );
    }

    #[test]
    fn only_a_host_name_or_ip_becomes_an_authority() {
        let at: SocketAddr = "127.0.0.1:443".parse().unwrap();
        assert_eq!(
            authority_for(Some("api.example.com"), at).unwrap(),
            "api.example.com:443"
        );
        assert_eq!(authority_for(None, at).unwrap(), "127.0.0.1:443");
        let v6: SocketAddr = "[::1]:8443".parse().unwrap();
        assert_eq!(authority_for(None, v6).unwrap(), "[::1]:8443");
        for bad in [
            "a.com:443 HTTP/1.1\r\nX: y",
            "a b.com",
            "a.com\n",
            "",
            "a.com:1",
            "[::1",
        ] {
            assert!(authority_for(Some(bad), at).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_name_must_lead_where_the_client_was_going() {
        let at = |ip: &str, authority: &str| Captured {
            original: SocketAddr::new(ip.parse().unwrap(), 443),
            authority: authority.into(),
            protocol: "tls",
            first: vec![],
        };
        assert!(check_agreement(&at("127.0.0.1", "localhost:443"))
            .await
            .is_ok());
        assert!(check_agreement(&at("127.0.0.1", "127.0.0.1:443"))
            .await
            .is_ok());
        assert!(check_agreement(&at("127.0.0.2", "127.0.0.1:443"))
            .await
            .is_err());
        assert!(check_agreement(&at("127.0.0.2", "localhost:443"))
            .await
            .is_err());
        assert!(check_agreement(&at("::1", "[::1]:443")).await.is_ok());
    }

    #[tokio::test]
    async fn the_connect_carries_the_jwt_svid_and_a_refusal_is_reported() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        for (answer, ok) in [
            (&b"HTTP/1.1 200 OK\r\n\r\n"[..], true),
            (
                &b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n"[..],
                false,
            ),
        ] {
            let (mut ours, mut proxy) = tokio::io::duplex(4096);
            let token = SecretValue::new("h.p.s".into());
            let open = open_tunnel(&mut ours, "api.example.com:443", Some(&token));
            let serve = async {
                let mut head = vec![0u8; 4096];
                let n = proxy.read(&mut head).await.unwrap();
                proxy.write_all(answer).await.unwrap();
                String::from_utf8(head[..n].to_vec()).unwrap()
            };
            let (opened, head) = tokio::join!(open, serve);
            assert_eq!(
                head,
                "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\
                 x-portcullis-jwt-svid: h.p.s\r\n\r\n"
            );
            assert_eq!(opened.is_ok(), ok, "{opened:?}");
        }
    }
}
