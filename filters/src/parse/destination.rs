//! Parses request destinations: the authority-form target of a CONNECT (RFC 9110 §9.3.6) and the
//! authority of an absolute-form request URI. Invariants: a [`Destination`] always holds a lowercase,
//! valid DNS name or an IP literal and a port in 1..=65535; numeric forms a resolver could read
//! differently (`127.1`, `0x7f.0.0.1`, `0177.0.0.1`) and IPv6 zone ids are rejected. Never panics.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest DNS name accepted (RFC 1035, textual form without the trailing dot).
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label accepted (RFC 1035).
const MAX_LABEL_LEN: usize = 63;
/// Longest excerpt of untrusted input quoted in an error message.
const SNIPPET_LEN: usize = 64;

/// Why a CONNECT target, URI authority or host could not be accepted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthorityError {
    #[error("target is empty")]
    Empty,
    #[error("CONNECT target must be host:port (port missing)")]
    MissingPort,
    #[error("host is empty")]
    EmptyHost,
    #[error("port is empty (nothing after ':')")]
    EmptyPort,
    #[error("invalid port {0:?}: must be a decimal number in 1..=65535")]
    InvalidPort(String),
    #[error("port 0 is not a valid destination port")]
    PortZero,
    #[error("port {0} is out of range (maximum 65535)")]
    PortOutOfRange(String),
    #[error("target must not contain userinfo ('user@host')")]
    UserInfo,
    #[error("CONNECT target must be authority-form host:port, not a URI")]
    NotAuthorityForm,
    #[error("CONNECT target must be host:port with no path, query or fragment (found {0:?})")]
    PathQueryOrFragment(char),
    #[error(
        "target contains non-ASCII characters (internationalised names must be sent as punycode A-labels)"
    )]
    NonAscii,
    #[error("target contains invalid character {ch:?} at byte offset {offset}")]
    InvalidCharacter { ch: char, offset: usize },
    #[error("IPv6 address must be enclosed in brackets, e.g. [::1]:443")]
    UnbracketedIpv6,
    #[error("IPv6 literal is missing its closing ']'")]
    UnclosedBracket,
    #[error("unexpected {0:?} after IPv6 literal (expected ':port')")]
    TrailingAfterIpv6(String),
    #[error("invalid IPv6 literal {0:?}")]
    InvalidIpv6(String),
    #[error("IPv6 zone identifiers are not allowed ({0:?})")]
    Ipv6ZoneId(String),
    #[error(
        "host {0:?} is numeric but not a canonical dotted-quad IPv4 address \
         (forms such as 127.1, 0x7f.0.0.1 or 0177.0.0.1 are refused)"
    )]
    NonCanonicalIpv4(String),
    #[error("host name is {0} characters long (maximum 253)")]
    NameTooLong(usize),
    #[error("host name {0:?} contains an empty label")]
    EmptyLabel(String),
    #[error("DNS label {label:?} is {len} characters long (maximum 63)")]
    LabelTooLong { label: String, len: usize },
    #[error("DNS label {0:?} must not start or end with '-'")]
    LabelHyphen(String),
    #[error(
        "DNS label {label:?} contains invalid character {ch:?} (allowed: letters, digits, '-', '_')"
    )]
    InvalidLabelCharacter { label: String, ch: char },
    #[error("request URI is not in absolute form (no scheme)")]
    MissingScheme,
    #[error("unsupported URI scheme {0:?} (expected http or https)")]
    UnsupportedScheme(String),
    #[error("request URI has no authority (host)")]
    MissingAuthority,
}

/// The host part of a destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A validated DNS name: lowercase, trailing dot removed.
    Dns(String),
    /// An IP literal (IPv4 canonical dotted quad, or IPv6 without zone id).
    Ip(IpAddr),
}

impl Host {
    /// Parses a host on its own: a DNS name, a canonical dotted-quad IPv4 address, or an IPv6
    /// address either bracketed (`[::1]`) or bare (`::1`). Same rules as the host of
    /// [`Destination::parse_connect_authority`].
    pub fn parse(s: &str) -> Result<Host, AuthorityError> {
        if s.is_empty() {
            return Err(AuthorityError::EmptyHost);
        }
        if !s.is_ascii() {
            return Err(AuthorityError::NonAscii);
        }
        if let Some(inner) = s.strip_prefix('[') {
            let Some(inner) = inner.strip_suffix(']') else {
                return Err(AuthorityError::UnclosedBracket);
            };
            return parse_ipv6(inner).map(|v6| Host::Ip(IpAddr::V6(v6)));
        }
        if s.contains(':') {
            return parse_ipv6(s).map(|v6| Host::Ip(IpAddr::V6(v6)));
        }
        if let Some(v4) = parse_canonical_ipv4(s) {
            return Ok(Host::Ip(IpAddr::V4(v4)));
        }
        parse_dns_name(s).map(Host::Dns)
    }

    /// The host as it appears in an authority: IPv6 addresses in brackets.
    pub fn to_authority_host(&self) -> String {
        match self {
            Host::Ip(IpAddr::V6(v6)) => format!("[{v6}]"),
            other => other.to_string(),
        }
    }
}

/// DNS name as-is, IP address in its canonical text form (IPv6 without brackets).
impl Host {
    /// Whether a host pattern from config names this host: an exact name or IP literal, or
    /// `*.suffix` for any subdomain of `suffix` (not `suffix` itself). Case-insensitive. The
    /// one matcher behind `mitm.passthrough`, `mcp.servers` and `credentials[].hosts`.
    pub fn matches(&self, pattern: &str) -> bool {
        let host = self.to_string();
        match pattern.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
            None => pattern
                .trim_start_matches('[')
                .trim_end_matches(']')
                .eq_ignore_ascii_case(&host),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Dns(name) => f.write_str(name),
            // Written on every request (policy input, logs, authority): without the
            // formatting machinery `Ipv4Addr`'s `Display` goes through.
            Host::Ip(IpAddr::V4(v4)) => {
                let mut buf = [0u8; 15];
                f.write_str(dotted_quad(v4, &mut buf))
            }
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// `a.b.c.d` in decimal, into `buf`.
fn dotted_quad<'a>(ip: &Ipv4Addr, buf: &'a mut [u8; 15]) -> &'a str {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        let digits = [octet / 100, octet / 10 % 10, octet % 10];
        let skip = match octet {
            100.. => 0,
            10.. => 1,
            _ => 2,
        };
        for d in &digits[skip..] {
            buf[n] = b'0' + d;
            n += 1;
        }
    }
    std::str::from_utf8(&buf[..n]).unwrap_or_default()
}

/// The scheme the client will speak to the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(&self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a credential may be sent (`credentials[].hosts`): a scheme, a host pattern (an exact
/// name or IP, or `*.suffix`) and a port. `api.github.com` means `https` on 443 only;
/// `host:8443` another port; `host:*` any port; cleartext needs an explicit
/// `http://host[:port]` (port 80 by default). A secret never goes anywhere else: not over
/// plain HTTP to a host bound for HTTPS, not to another port of the same host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Binding {
    pub scheme: Scheme,
    pub host: String,
    /// `None`: any port (`host:*`).
    pub port: Option<u16>,
}

impl Binding {
    pub fn parse(s: &str) -> Result<Binding, String> {
        let (scheme, rest) = match s.split_once("://") {
            Some(("http", rest)) => (Scheme::Http, rest),
            Some(("https", rest)) => (Scheme::Https, rest),
            Some((other, _)) => return Err(format!("unsupported scheme {other:?} in {s:?}")),
            None => (Scheme::Https, s),
        };
        // `[v6]:port`, `[v6]`, `host:port`, `host`.
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((h, "")) => (h, None),
                Some((h, p)) => (h, Some(p.strip_prefix(':').ok_or("expected :port")?)),
                None => return Err(format!("unclosed [ in {s:?}")),
            },
            None => match rest.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                _ => (rest, None),
            },
        };
        // Stored normalized (a DNS name lowercase, an IP canonical): a `*.suffix` must be a
        // DNS name too, so every binding is a host the proxy could connect to.
        let not_a_host =
            || format!("{s:?} is not a host, *.suffix or [ipv6], with an optional :port");
        let host = match host.strip_prefix("*.") {
            Some(suffix) => match Host::parse(suffix) {
                Ok(Host::Dns(name)) => format!("*.{name}"),
                _ => return Err(not_a_host()),
            },
            None => Host::parse(host).map_err(|_| not_a_host())?.to_string(),
        };
        let port = match port {
            None => Some(scheme.default_port()),
            Some("*") => None,
            Some(p) => Some(parse_port(p).map_err(|e| format!("{s:?}: {e}"))?),
        };
        Ok(Binding { scheme, host, port })
    }

    /// Whether a secret bound here may be sent to `dest`.
    pub fn covers(&self, dest: &Destination) -> bool {
        self.scheme == dest.scheme
            && self.port.is_none_or(|p| p == dest.port)
            && dest.host.matches(&self.host)
    }
}

impl TryFrom<String> for Binding {
    type Error = String;

    fn try_from(s: String) -> Result<Binding, String> {
        Binding::parse(&s)
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match self.host.contains(':') {
            true => format!("[{}]", self.host),
            false => self.host.clone(),
        };
        match self.port {
            Some(p) => write!(f, "{}://{host}:{p}", self.scheme),
            None => write!(f, "{}://{host}:*", self.scheme),
        }
    }
}

/// Where a request is going: validated host, port (never 0) and scheme.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub host: Host,
    pub port: u16,
    pub scheme: Scheme,
}

impl Destination {
    /// `host:port` exactly as in a CONNECT request line. Port required (1..=65535), IPv6 must be
    /// bracketed (`[::1]:443`), no userinfo, no path/query/fragment, no empty host, DNS names must
    /// be valid (labels 1..=63 of letters/digits/hyphen/underscore, not starting or ending with
    /// '-', total ≤ 253, case-folded to lowercase, one trailing dot allowed and removed). IPv4
    /// literals must be canonical dotted quads; a name whose last label is numeric (decimal or
    /// `0x` hex) but which is not a canonical dotted quad is rejected, because resolvers and URL
    /// parsers may read it as an IPv4 address. IPv6 zone ids are rejected. Scheme is Https.
    pub fn parse_connect_authority(s: &str) -> Result<Destination, AuthorityError> {
        if s.is_empty() {
            return Err(AuthorityError::Empty);
        }
        check_characters(s)?;
        if s.contains("://") {
            return Err(AuthorityError::NotAuthorityForm);
        }
        if let Some(ch) = s.chars().find(|c| matches!(c, '/' | '?' | '#')) {
            return Err(AuthorityError::PathQueryOrFragment(ch));
        }
        if s.contains('@') {
            return Err(AuthorityError::UserInfo);
        }
        let (host, port) = split_authority(s)?;
        let Some(port) = port else {
            return Err(AuthorityError::MissingPort);
        };
        let host = Host::parse(host)?;
        let port = parse_port(port)?;
        Ok(Destination {
            host,
            port,
            scheme: Scheme::Https,
        })
    }

    /// From an absolute-form request URI (`http://host[:port]/path`). Scheme must be http or
    /// https (case-insensitive); the port defaults per scheme; host rules as for
    /// [`Destination::parse_connect_authority`]; no userinfo.
    pub fn from_absolute_uri(uri: &http::Uri) -> Result<Destination, AuthorityError> {
        let scheme = match uri.scheme_str() {
            None => return Err(AuthorityError::MissingScheme),
            Some(s) if s.eq_ignore_ascii_case("http") => Scheme::Http,
            Some(s) if s.eq_ignore_ascii_case("https") => Scheme::Https,
            Some(s) => return Err(AuthorityError::UnsupportedScheme(snippet(s))),
        };
        let authority = uri
            .authority()
            .map(|a| a.as_str())
            .ok_or(AuthorityError::MissingAuthority)?;
        if authority.is_empty() {
            return Err(AuthorityError::MissingAuthority);
        }
        check_characters(authority)?;
        if authority.contains('@') {
            return Err(AuthorityError::UserInfo);
        }
        let (host, port) = split_authority(authority)?;
        let host = Host::parse(host)?;
        let port = match port {
            Some(p) => parse_port(p)?,
            None => scheme.default_port(),
        };
        Ok(Destination { host, port, scheme })
    }

    /// `host:port`, IPv6 bracketed.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host.to_authority_host(), self.port)
    }
}

/// `host:port`, IPv6 bracketed (same as [`Destination::authority`]).
impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host.to_authority_host(), self.port)
    }
}

/// Rejects non-ASCII input and ASCII control characters / whitespace anywhere in the target.
fn check_characters(s: &str) -> Result<(), AuthorityError> {
    if !s.is_ascii() {
        return Err(AuthorityError::NonAscii);
    }
    match s
        .char_indices()
        .find(|(_, c)| c.is_ascii_control() || *c == ' ')
    {
        Some((offset, ch)) => Err(AuthorityError::InvalidCharacter { ch, offset }),
        None => Ok(()),
    }
}

/// Splits `host[:port]` into host (brackets kept for IPv6) and optional port text.
pub fn split_authority(s: &str) -> Result<(&str, Option<&str>), AuthorityError> {
    if let Some(rest) = s.strip_prefix('[') {
        let Some(close) = rest.find(']') else {
            return Err(AuthorityError::UnclosedBracket);
        };
        // `[` and `]` are one byte each, so these indices are char boundaries.
        let host = s.get(..close + 2).unwrap_or(s);
        let after = rest.get(close + 1..).unwrap_or("");
        if after.is_empty() {
            Ok((host, None))
        } else if let Some(port) = after.strip_prefix(':') {
            Ok((host, Some(port)))
        } else {
            Err(AuthorityError::TrailingAfterIpv6(snippet(after)))
        }
    } else {
        match s.rsplit_once(':') {
            None => Ok((s, None)),
            Some((host, _)) if host.contains(':') => Err(AuthorityError::UnbracketedIpv6),
            Some((host, port)) => Ok((host, Some(port))),
        }
    }
}

/// Strict decimal port in 1..=65535 (digits only: no sign, no whitespace).
pub fn parse_port(p: &str) -> Result<u16, AuthorityError> {
    if p.is_empty() {
        return Err(AuthorityError::EmptyPort);
    }
    if !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthorityError::InvalidPort(snippet(p)));
    }
    let value = p.bytes().try_fold(0u16, |acc, b| {
        acc.checked_mul(10)?.checked_add(u16::from(b - b'0'))
    });
    match value {
        None => Err(AuthorityError::PortOutOfRange(snippet(p))),
        Some(0) => Err(AuthorityError::PortZero),
        Some(port) => Ok(port),
    }
}

/// The inside of an IPv6 literal; zone ids (`%eth0`, `%25eth0`) are refused.
fn parse_ipv6(inner: &str) -> Result<Ipv6Addr, AuthorityError> {
    if inner.contains('%') {
        return Err(AuthorityError::Ipv6ZoneId(snippet(inner)));
    }
    inner
        .parse::<Ipv6Addr>()
        .map_err(|_| AuthorityError::InvalidIpv6(snippet(inner)))
}

/// Exactly four decimal octets, each 0..=255 with no leading zeros (`0` itself is fine).
fn parse_canonical_ipv4(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        let canonical = !part.is_empty()
            && part.len() <= 3
            && part.bytes().all(|b| b.is_ascii_digit())
            && (part == "0" || !part.starts_with('0'));
        if !canonical {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// A label a URL parser or `inet_aton` would read as a number: decimal digits, or `0x` + hex.
fn is_numeric_label(label: &str) -> bool {
    let hex = label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(digits) => digits.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// Validates a DNS name and returns it lowercased without its (single) trailing dot.
fn parse_dns_name(s: &str) -> Result<String, AuthorityError> {
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() {
        return Err(AuthorityError::EmptyHost);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(AuthorityError::NameTooLong(name.len()));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(AuthorityError::EmptyLabel(snippet(s)));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(AuthorityError::LabelTooLong {
                label: snippet(label),
                len: label.len(),
            });
        }
        if let Some(ch) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(AuthorityError::InvalidLabelCharacter {
                label: snippet(label),
                ch,
            });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(AuthorityError::LabelHyphen(snippet(label)));
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if is_numeric_label(last) {
        return Err(AuthorityError::NonCanonicalIpv4(snippet(s)));
    }
    Ok(name.to_ascii_lowercase())
}

/// Untrusted input quoted in an error, cut to a bounded length on a char boundary.
fn snippet(s: &str) -> String {
    match s.char_indices().nth(SNIPPET_LEN) {
        Some((cut, _)) => format!("{}…", s.get(..cut).unwrap_or("")),
        None => s.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod pattern_tests {
    use super::*;

    #[test]
    fn host_patterns() {
        let h = |s: &str| Host::parse(s).unwrap();
        assert!(h("api.github.com").matches("api.github.com"));
        assert!(h("api.github.com").matches("API.GitHub.com"));
        assert!(h("raw.githubusercontent.com").matches("*.githubusercontent.com"));
        assert!(h("a.b.githubusercontent.com").matches("*.GitHubUserContent.com"));
        assert!(!h("githubusercontent.com").matches("*.githubusercontent.com"));
        assert!(!h("evilgithubusercontent.com").matches("*.githubusercontent.com"));
        assert!(h("127.0.0.1").matches("127.0.0.1"));
        assert!(h("::1").matches("[::1]"));
        assert!(!h("127.0.0.2").matches("127.0.0.1"));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use AuthorityError as E;

    fn ok(s: &str) -> Destination {
        Destination::parse_connect_authority(s)
            .unwrap_or_else(|e| panic!("{s:?} should parse, got: {e}"))
    }

    fn err(s: &str) -> AuthorityError {
        match Destination::parse_connect_authority(s) {
            Ok(d) => panic!("{s:?} should be rejected, parsed as {d:?}"),
            Err(e) => e,
        }
    }

    fn dns(name: &str) -> Host {
        Host::Dns(name.to_string())
    }

    fn uri(s: &str) -> Result<Destination, AuthorityError> {
        Destination::from_absolute_uri(&s.parse::<http::Uri>().unwrap())
    }

    // ---- valid CONNECT targets ----

    #[test]
    fn plain_dns_name() {
        let d = ok("example.com:443");
        assert_eq!(d.host, dns("example.com"));
        assert_eq!(d.port, 443);
        assert_eq!(d.scheme, Scheme::Https);
        assert_eq!(d.to_string(), "example.com:443");
    }

    #[test]
    fn dns_name_is_lowercased_and_trailing_dot_removed() {
        assert_eq!(ok("EXAMPLE.com.:443").host, dns("example.com"));
    }

    #[test]
    fn bracketed_ipv6() {
        let d = ok("[::1]:8443");
        assert_eq!(d.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(d.port, 8443);
        assert_eq!(d.authority(), "[::1]:8443");
        assert_eq!(d.host.to_string(), "::1");
    }

    #[test]
    fn ipv6_is_canonicalised() {
        let d = ok("[2001:DB8:0:0::0001]:443");
        assert_eq!(d.to_string(), "[2001:db8::1]:443");
    }

    #[test]
    fn ipv4_mapped_ipv6_kept_as_literal() {
        let d = ok("[::ffff:127.0.0.1]:443");
        assert_eq!(d.host, Host::Ip("::ffff:127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn ipv4_literal() {
        let d = ok("127.0.0.1:80");
        assert_eq!(d.host, Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(d.port, 80);
        assert_eq!(ok("0.0.0.0:1").host, Host::Ip("0.0.0.0".parse().unwrap()));
        assert_eq!(
            ok("255.255.255.255:65535").host,
            Host::Ip("255.255.255.255".parse().unwrap())
        );
    }

    #[test]
    fn underscores_hyphens_digits_and_single_labels() {
        assert_eq!(
            ok("_dmarc.my-host.example:1").host,
            dns("_dmarc.my-host.example")
        );
        assert_eq!(ok("localhost:8080").host, dns("localhost"));
        assert_eq!(ok("3com.com:443").host, dns("3com.com"));
        assert_eq!(ok("1.2.3.example:443").host, dns("1.2.3.example"));
        assert_eq!(ok("0x7f.example.com:443").host, dns("0x7f.example.com"));
        assert_eq!(
            ok("xn--bcher-kva.example:443").host,
            dns("xn--bcher-kva.example")
        );
    }

    #[test]
    fn port_bounds_and_leading_zeros() {
        assert_eq!(ok("example.com:1").port, 1);
        assert_eq!(ok("example.com:65535").port, 65535);
        assert_eq!(ok("example.com:0443").port, 443);
    }

    #[test]
    fn maximum_lengths_accepted() {
        let label = "a".repeat(63);
        assert_eq!(
            ok(&format!("{label}.com:443")).host,
            dns(&format!("{label}.com"))
        );
        // 4 × 63 + 3 dots = 255 > 253, so build exactly 253: 3 × 63 + 61 + 3 dots.
        let name = format!("{l}.{l}.{l}.{}", "b".repeat(61), l = label);
        assert_eq!(name.len(), 253);
        assert_eq!(ok(&format!("{name}:443")).host, dns(&name));
        assert_eq!(ok(&format!("{name}.:443")).host, dns(&name));
    }

    // ---- invalid CONNECT targets ----

    #[test]
    fn unbracketed_ipv6_rejected() {
        assert_eq!(err("::1:443"), E::UnbracketedIpv6);
        assert_eq!(err("::1"), E::UnbracketedIpv6);
        assert_eq!(err("2001:db8::1:443"), E::UnbracketedIpv6);
    }

    #[test]
    fn port_missing() {
        assert_eq!(err("example.com"), E::MissingPort);
        assert_eq!(err("[::1]"), E::MissingPort);
        assert_eq!(err("127.0.0.1"), E::MissingPort);
        assert_eq!(
            E::MissingPort.to_string(),
            "CONNECT target must be host:port (port missing)"
        );
    }

    #[test]
    fn bad_ports() {
        assert_eq!(err("example.com:0"), E::PortZero);
        assert_eq!(err("example.com:00000"), E::PortZero);
        assert_eq!(err("example.com:65536"), E::PortOutOfRange("65536".into()));
        assert_eq!(
            err("example.com:99999999999999999999"),
            E::PortOutOfRange("99999999999999999999".into())
        );
        assert_eq!(err("example.com:-1"), E::InvalidPort("-1".into()));
        assert_eq!(err("example.com:+443"), E::InvalidPort("+443".into()));
        assert_eq!(err("example.com:https"), E::InvalidPort("https".into()));
        assert_eq!(err("example.com:44a"), E::InvalidPort("44a".into()));
        assert_eq!(err("example.com:"), E::EmptyPort);
        assert_eq!(err("[::1]:443:1"), E::InvalidPort("443:1".into()));
    }

    #[test]
    fn userinfo_rejected() {
        assert_eq!(err("user@example.com:443"), E::UserInfo);
        assert_eq!(err("user:pass@example.com:443"), E::UserInfo);
        assert_eq!(err("example.com:443@evil.com:443"), E::UserInfo);
    }

    #[test]
    fn path_query_fragment_and_uris_rejected() {
        assert_eq!(err("example.com:443/path"), E::PathQueryOrFragment('/'));
        assert_eq!(err("example.com:443?q=1"), E::PathQueryOrFragment('?'));
        assert_eq!(err("example.com:443#frag"), E::PathQueryOrFragment('#'));
        assert_eq!(err("https://example.com:443"), E::NotAuthorityForm);
        assert_eq!(err("/"), E::PathQueryOrFragment('/'));
        assert_eq!(err("*"), E::MissingPort);
    }

    #[test]
    fn empty_inputs() {
        assert_eq!(err(""), E::Empty);
        assert_eq!(err(":443"), E::EmptyHost);
        assert_eq!(err("[]:443"), E::InvalidIpv6(String::new()));
        assert_eq!(err(".:443"), E::EmptyHost);
        assert_eq!(err(":"), E::EmptyHost);
    }

    #[test]
    fn bad_labels() {
        assert_eq!(err("a..b:443"), E::EmptyLabel("a..b".into()));
        assert_eq!(
            err(".example.com:443"),
            E::EmptyLabel(".example.com".into())
        );
        assert_eq!(
            err("example.com..:443"),
            E::EmptyLabel("example.com..".into())
        );
        assert_eq!(err("-a.com:443"), E::LabelHyphen("-a".into()));
        assert_eq!(err("a-.com:443"), E::LabelHyphen("a-".into()));
        assert_eq!(
            err("ex*ample.com:443"),
            E::InvalidLabelCharacter {
                label: "ex*ample".into(),
                ch: '*'
            }
        );
        assert_eq!(
            err("ex%61mple.com:443"),
            E::InvalidLabelCharacter {
                label: "ex%61mple".into(),
                ch: '%'
            }
        );
        assert!(matches!(
            err("a\\b.com:443"),
            E::InvalidLabelCharacter { ch: '\\', .. }
        ));
    }

    #[test]
    fn too_long_names_and_labels() {
        let label = "a".repeat(64);
        assert_eq!(
            err(&format!("{label}.com:443")),
            E::LabelTooLong { label, len: 64 }
        );
        // Long labels are quoted only in part.
        assert_eq!(
            err(&format!("{}.com:443", "c".repeat(70))),
            E::LabelTooLong {
                label: format!("{}…", "c".repeat(64)),
                len: 70
            }
        );
        let name = format!("{l}.{l}.{l}.{}", "b".repeat(62), l = "a".repeat(63));
        assert_eq!(name.len(), 254);
        assert_eq!(err(&format!("{name}:443")), E::NameTooLong(254));
        let huge = "a.".repeat(100_000) + "com:443";
        assert_eq!(err(&huge), E::NameTooLong(200_003));
        // Error messages quote a bounded amount of the input.
        let long_port = "9".repeat(10_000);
        assert!(err(&format!("a.com:{long_port}")).to_string().len() < 200);
    }

    #[test]
    fn non_canonical_ipv4_rejected() {
        for s in [
            "127.1:80",
            "0x7f000001:80",
            "0x7f.0.0.1:80",
            "0177.0.0.1:80",
            "2130706433:80",
            "127.0.0.01:80",
            "1.2.3.4.5:80",
            "256.0.0.1:80",
            "127.0.0.1.:80",
            "example.123:80",
            "example.0x1f:80",
            "foo.0x:80",
            "0X7F.0.0.1:80",
        ] {
            assert!(
                matches!(err(s), E::NonCanonicalIpv4(_)),
                "{s:?} -> {:?}",
                err(s)
            );
        }
    }

    #[test]
    fn ipv6_zone_ids_and_bad_literals() {
        assert_eq!(
            err("[fe80::1%25eth0]:443"),
            E::Ipv6ZoneId("fe80::1%25eth0".into())
        );
        assert_eq!(
            err("[fe80::1%eth0]:443"),
            E::Ipv6ZoneId("fe80::1%eth0".into())
        );
        assert_eq!(err("[::1:443"), E::UnclosedBracket);
        assert_eq!(err("[::1]443"), E::TrailingAfterIpv6("443".into()));
        assert_eq!(err("[127.0.0.1]:443"), E::InvalidIpv6("127.0.0.1".into()));
        assert_eq!(err("[v1.fe]:443"), E::InvalidIpv6("v1.fe".into()));
        assert_eq!(err("[::g]:443"), E::InvalidIpv6("::g".into()));
        assert_eq!(
            err("[example.com]:443"),
            E::InvalidIpv6("example.com".into())
        );
    }

    #[test]
    fn non_ascii_rejected() {
        assert_eq!(err("bücher.example:443"), E::NonAscii);
        assert_eq!(err("example.com:４４３"), E::NonAscii);
        assert_eq!(err("exаmple.com:443"), E::NonAscii); // Cyrillic 'а'
    }

    #[test]
    fn whitespace_and_control_characters_rejected() {
        assert_eq!(
            err("example.com :443"),
            E::InvalidCharacter {
                ch: ' ',
                offset: 11
            }
        );
        assert_eq!(
            err(" example.com:443"),
            E::InvalidCharacter { ch: ' ', offset: 0 }
        );
        assert_eq!(
            err("example.com:443\r\n"),
            E::InvalidCharacter {
                ch: '\r',
                offset: 15
            }
        );
        assert_eq!(
            err("exa\0mple.com:443"),
            E::InvalidCharacter {
                ch: '\0',
                offset: 3
            }
        );
        assert_eq!(
            err("example.com:\t443"),
            E::InvalidCharacter {
                ch: '\t',
                offset: 12
            }
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz over awkward characters.
        let alphabet = [
            "", "[", "]", ":", ".", "%", "@", "/", "0", "1", "9", "a", "-", "_", "x", "::", "ü",
            " ", "\0", "ff", "65536", "0x", "[::1]",
        ];
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    let s = format!("{a}{b}{c}");
                    let _ = Destination::parse_connect_authority(&s);
                    let _ = Host::parse(&s);
                }
            }
        }
    }

    #[test]
    fn error_messages_are_precise() {
        assert_eq!(
            err("127.1:80").to_string(),
            "host \"127.1\" is numeric but not a canonical dotted-quad IPv4 address \
             (forms such as 127.1, 0x7f.0.0.1 or 0177.0.0.1 are refused)"
        );
        assert_eq!(
            err("example.com:65536").to_string(),
            "port 65536 is out of range (maximum 65535)"
        );
        assert_eq!(
            err("::1:443").to_string(),
            "IPv6 address must be enclosed in brackets, e.g. [::1]:443"
        );
    }

    // ---- Host ----

    #[test]
    fn host_parse_forms() {
        assert_eq!(
            Host::parse("::1").unwrap(),
            Host::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            Host::parse("[::1]").unwrap(),
            Host::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            Host::parse("10.0.0.1").unwrap(),
            Host::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(Host::parse("Example.COM.").unwrap(), dns("example.com"));
        assert_eq!(Host::parse(""), Err(E::EmptyHost));
        assert_eq!(Host::parse("[::1"), Err(E::UnclosedBracket));
        assert_eq!(
            Host::parse("fe80::1%eth0"),
            Err(E::Ipv6ZoneId("fe80::1%eth0".into()))
        );
        assert!(matches!(Host::parse("127.1"), Err(E::NonCanonicalIpv4(_))));
    }

    #[test]
    fn host_display_and_authority_form() {
        let v6 = Host::parse("2001:db8::1").unwrap();
        assert_eq!(v6.to_string(), "2001:db8::1");
        assert_eq!(v6.to_authority_host(), "[2001:db8::1]");
        let v4 = Host::parse("192.0.2.1").unwrap();
        assert_eq!(v4.to_string(), "192.0.2.1");
        assert_eq!(v4.to_authority_host(), "192.0.2.1");
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.20.30.40",
            "100.200.255.9",
            "255.255.255.255",
        ] {
            let host = Host::Ip(ip.parse().unwrap());
            assert_eq!(host.to_string(), ip);
        }
        assert_eq!(dns("example.com").to_authority_host(), "example.com");
    }

    #[test]
    fn scheme_basics() {
        assert_eq!(Scheme::Http.as_str(), "http");
        assert_eq!(Scheme::Https.as_str(), "https");
        assert_eq!(Scheme::Http.default_port(), 80);
        assert_eq!(Scheme::Https.default_port(), 443);
        assert_eq!(Scheme::Https.to_string(), "https");
    }

    // ---- absolute-form URIs ----

    #[test]
    fn absolute_uri_default_ports() {
        let d = uri("http://Example.com/path?q=1").unwrap();
        assert_eq!(d.host, dns("example.com"));
        assert_eq!(d.port, 80);
        assert_eq!(d.scheme, Scheme::Http);
        let d = uri("https://example.com").unwrap();
        assert_eq!((d.port, d.scheme), (443, Scheme::Https));
    }

    #[test]
    fn absolute_uri_explicit_port_and_ipv6() {
        let d = uri("http://[::1]:8080/x").unwrap();
        assert_eq!(d.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(d.port, 8080);
        assert_eq!(d.to_string(), "[::1]:8080");
        let d = uri("HTTPS://10.1.2.3:8443/").unwrap();
        assert_eq!((d.port, d.scheme), (8443, Scheme::Https));
    }

    #[test]
    fn absolute_uri_rejections() {
        assert_eq!(uri("/relative/path"), Err(E::MissingScheme));
        assert_eq!(
            uri("ftp://example.com/"),
            Err(E::UnsupportedScheme("ftp".into()))
        );
        assert_eq!(uri("http://user@example.com/"), Err(E::UserInfo));
        assert_eq!(uri("http://example.com:0/"), Err(E::PortZero));
        assert_eq!(
            uri("http://example.com:65536/"),
            Err(E::PortOutOfRange("65536".into()))
        );
        assert!(matches!(uri("http://127.1/"), Err(E::NonCanonicalIpv4(_))));
        assert!(matches!(
            uri("http://0x7f000001/"),
            Err(E::NonCanonicalIpv4(_))
        ));
        assert_eq!(uri("http://a..b/"), Err(E::EmptyLabel("a..b".into())));
        // Authority-form (CONNECT style) is not an absolute URI.
        let authority_only: http::Uri = "example.com:443".parse().unwrap();
        assert_eq!(
            Destination::from_absolute_uri(&authority_only),
            Err(E::MissingScheme)
        );
    }

    #[test]
    fn credential_bindings_name_scheme_host_and_port() {
        let dest = |scheme, host: &str, port| Destination {
            host: Host::parse(host).unwrap(),
            port,
            scheme,
        };
        let plain = Binding::parse("api.github.com").unwrap();
        assert!(plain.covers(&dest(Scheme::Https, "api.github.com", 443)));
        assert!(!plain.covers(&dest(Scheme::Http, "api.github.com", 80)));
        assert!(!plain.covers(&dest(Scheme::Http, "api.github.com", 443)));
        assert!(!plain.covers(&dest(Scheme::Https, "api.github.com", 8443)));
        let port = Binding::parse("*.example.com:8443").unwrap();
        assert!(port.covers(&dest(Scheme::Https, "a.example.com", 8443)));
        assert!(!port.covers(&dest(Scheme::Https, "example.com", 8443)));
        let any = Binding::parse("localhost:*").unwrap();
        assert!(any.covers(&dest(Scheme::Https, "localhost", 34567)));
        assert!(!any.covers(&dest(Scheme::Http, "localhost", 34567)));
        let clear = Binding::parse("http://127.0.0.1").unwrap();
        assert!(clear.covers(&dest(Scheme::Http, "127.0.0.1", 80)));
        assert!(!clear.covers(&dest(Scheme::Https, "127.0.0.1", 443)));
        let v6 = Binding::parse("https://[::1]:*").unwrap();
        assert!(v6.covers(&dest(Scheme::Https, "::1", 9)));
        assert_eq!(v6.to_string(), "https://[::1]:*");
        assert_eq!(plain.to_string(), "https://api.github.com:443");
        for bad in [
            "ftp://x",
            "",
            "host:0",
            "host:99999",
            "a/b",
            "[::1",
            "x:y:z",
            "h@x",
            "*.",
            // Found by fuzzing (tests/fuzz connect_authority): a `*.suffix` that is no name.
            "*.]::",
            "*.github\u{0}\u{1c}:x",
            "*.10.0.0.1",
            "*.*.example.com",
        ] {
            assert!(Binding::parse(bad).is_err(), "{bad:?}");
        }
        // Stored normalized, so a binding renders as what it matches.
        assert_eq!(
            Binding::parse("*.GitHub.COM.").unwrap().to_string(),
            "https://*.github.com:443"
        );
        assert_eq!(
            Binding::parse("API.example.com:8443").unwrap().host,
            "api.example.com"
        );
    }
}
