//! The SSRF guard applied to every address before Portcullis dials it. Invariants: the configured
//! deny list beats the allow list, which beats the default-blocked categories (loopback, private,
//! link-local, CGNAT, multicast, reserved, cloud metadata, ...); IPv6 forms that embed an IPv4
//! address are judged by that IPv4 address too; an empty address set is never "allowed".

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Cloud instance-metadata endpoints, blocked even where the address is otherwise public.
const METADATA_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure IMDS, OpenStack, ...
    Ipv4Addr::new(168, 63, 129, 16),   // Azure wireserver
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
    Ipv4Addr::new(192, 0, 0, 192),     // Oracle Cloud
];
/// AWS IMDS over IPv6 (Nitro).
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockCategory {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7 (ULA), fec0::/10 (site-local).
    Private,
    /// 169.254/16, fe80::/10.
    LinkLocal,
    /// 100.64.0.0/10 (RFC 6598 carrier-grade NAT).
    SharedAddressSpace,
    /// 0.0.0.0/8 ("this network"), ::.
    Unspecified,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// Instance-metadata services (169.254.169.254, 168.63.129.16, 100.100.100.200,
    /// 192.0.0.192, fd00:ec2::254).
    CloudMetadata,
    /// 240.0.0.0/4, 192.0.0.0/24, 198.18.0.0/15, 100::/64.
    Reserved,
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32, 3fff::/20.
    Documentation,
    /// Matched the configured deny list.
    Denied,
    /// There was no address to check (e.g. a name that resolved to nothing).
    NoAddress,
}

impl fmt::Display for BlockCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockCategory::Loopback => "loopback",
            BlockCategory::Private => "private",
            BlockCategory::LinkLocal => "link-local",
            BlockCategory::SharedAddressSpace => "cgnat",
            BlockCategory::Unspecified => "unspecified",
            BlockCategory::Multicast => "multicast",
            BlockCategory::Broadcast => "broadcast",
            BlockCategory::CloudMetadata => "cloud-metadata",
            BlockCategory::Reserved => "reserved",
            BlockCategory::Documentation => "documentation",
            BlockCategory::Denied => "deny-listed",
            BlockCategory::NoAddress => "no-address",
        })
    }
}

/// A refused destination address. For [`BlockCategory::NoAddress`] `addr` is `0.0.0.0` and
/// carries no meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub addr: IpAddr,
    pub category: BlockCategory,
}

impl Blocked {
    fn no_address() -> Blocked {
        Blocked {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            category: BlockCategory::NoAddress,
        }
    }
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.category {
            BlockCategory::NoAddress => {
                f.write_str("destination has no addresses to connect to (blocked: no-address)")
            }
            category => write!(
                f,
                "destination address {} is blocked ({category})",
                self.addr
            ),
        }
    }
}

impl std::error::Error for Blocked {}

/// Decides whether an address may be dialled. See [`EgressGuard::check`] for the order of rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressGuard {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl EgressGuard {
    pub fn new(allow: Vec<IpNet>, deny: Vec<IpNet>) -> EgressGuard {
        EgressGuard { allow, deny }
    }

    /// The configured exceptions to the default-blocked categories.
    pub fn allow(&self) -> &[IpNet] {
        &self.allow
    }

    /// The configured always-blocked networks.
    pub fn deny(&self) -> &[IpNet] {
        &self.deny
    }

    /// Decide one address. Order: explicit `deny` list → blocked; else explicit `allow` list →
    /// permitted; else blocked if it falls in a default-blocked category ([`classify`]); else
    /// permitted. Both lists are matched against the literal address and against the IPv4
    /// address embedded in it, if any ([`embedded_ipv4`]), so allowing `127.0.0.0/8` also allows
    /// `::ffff:127.0.0.1` (but not `::1`).
    pub fn check(&self, ip: IpAddr) -> Result<(), Blocked> {
        let embedded = match ip {
            IpAddr::V4(_) => None,
            IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4),
        };
        let listed = |nets: &[IpNet]| {
            nets.iter()
                .any(|net| net.contains(&ip) || embedded.is_some_and(|e| net.contains(&e)))
        };
        if listed(&self.deny) {
            return Err(Blocked {
                addr: ip,
                category: BlockCategory::Denied,
            });
        }
        if listed(&self.allow) {
            return Ok(());
        }
        match classify(ip) {
            Some(category) => Err(Blocked { addr: ip, category }),
            None => Ok(()),
        }
    }

    /// All addresses must pass (a name that resolves to one public and one private address is
    /// blocked); the first refused address is reported. Empty slice → `Err` with
    /// [`BlockCategory::NoAddress`] (nothing to connect to is not "allowed").
    pub fn check_all(&self, addrs: &[SocketAddr]) -> Result<(), Blocked> {
        if addrs.is_empty() {
            return Err(Blocked::no_address());
        }
        addrs.iter().try_for_each(|addr| self.check(addr.ip()))
    }
}

/// Which default-blocked category an address is in, if any. IPv6 addresses that embed an IPv4
/// address ([`embedded_ipv4`]) are blocked when the embedded address is; cloud-metadata
/// addresses are reported as [`BlockCategory::CloudMetadata`] before any wider category.
pub fn classify(ip: IpAddr) -> Option<BlockCategory> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// The IPv4 address an IPv6 address carries, for the forms a stack or translator may turn into
/// IPv4 traffic: IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d`,
/// IPv4-compatible `::a.b.c.d` (except `::` and `::1`), NAT64 `64:ff9b::/96` and the local-use
/// NAT64 prefix `64:ff9b:1::/48` (read with the /96 layout, i.e. the last 32 bits), and 6to4
/// `2002:aabb:ccdd::/48`.
pub fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    let last32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match v6.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(last32),
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(last32),
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] => Some(last32),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(last32),
        [0x64, 0xff9b, 1, ..] => Some(last32),
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        _ => None,
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<BlockCategory> {
    use BlockCategory as C;
    if METADATA_V4.contains(&ip) {
        return Some(C::CloudMetadata);
    }
    if ip == Ipv4Addr::BROADCAST {
        return Some(C::Broadcast);
    }
    match ip.octets() {
        [0, ..] => Some(C::Unspecified),
        [127, ..] => Some(C::Loopback),
        [10, ..] | [172, 16..=31, ..] | [192, 168, ..] => Some(C::Private),
        [100, 64..=127, ..] => Some(C::SharedAddressSpace),
        [169, 254, ..] => Some(C::LinkLocal),
        [224..=239, ..] => Some(C::Multicast),
        [240..=255, ..] => Some(C::Reserved),
        // IETF protocol assignments; benchmarking.
        [192, 0, 0, _] | [198, 18..=19, ..] => Some(C::Reserved),
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => Some(C::Documentation),
        _ => None,
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<BlockCategory> {
    use BlockCategory as C;
    if ip == METADATA_V6 {
        return Some(C::CloudMetadata);
    }
    if ip.is_unspecified() {
        return Some(C::Unspecified);
    }
    if ip.is_loopback() {
        return Some(C::Loopback);
    }
    if let Some(category) = embedded_ipv4(ip).and_then(classify_v4) {
        return Some(category);
    }
    let s = ip.segments();
    if s[0] & 0xfe00 == 0xfc00 {
        Some(C::Private) // fc00::/7 unique local
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some(C::LinkLocal) // fe80::/10
    } else if s[0] & 0xffc0 == 0xfec0 {
        Some(C::Private) // fec0::/10 deprecated site-local
    } else if s[0] & 0xff00 == 0xff00 {
        Some(C::Multicast) // ff00::/8
    } else if (s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] == 0x3fff && s[1] & 0xf000 == 0) {
        Some(C::Documentation) // 2001:db8::/32, 3fff::/20
    } else if s[..4] == [0x0100, 0, 0, 0] {
        Some(C::Reserved) // 100::/64 discard-only
    } else {
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use BlockCategory as C;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn cat(s: &str) -> Option<BlockCategory> {
        classify(ip(s))
    }

    fn default_guard() -> EgressGuard {
        EgressGuard::default()
    }

    #[test]
    fn ipv4_categories() {
        assert_eq!(cat("0.0.0.0"), Some(C::Unspecified));
        assert_eq!(cat("0.1.2.3"), Some(C::Unspecified));
        assert_eq!(cat("127.0.0.1"), Some(C::Loopback));
        assert_eq!(cat("127.255.255.254"), Some(C::Loopback));
        assert_eq!(cat("10.0.0.1"), Some(C::Private));
        assert_eq!(cat("172.16.0.1"), Some(C::Private));
        assert_eq!(cat("172.31.255.255"), Some(C::Private));
        assert_eq!(cat("192.168.1.1"), Some(C::Private));
        assert_eq!(cat("100.64.0.1"), Some(C::SharedAddressSpace));
        assert_eq!(cat("100.127.255.255"), Some(C::SharedAddressSpace));
        assert_eq!(cat("169.254.1.1"), Some(C::LinkLocal));
        assert_eq!(cat("224.0.0.1"), Some(C::Multicast));
        assert_eq!(cat("239.255.255.250"), Some(C::Multicast));
        assert_eq!(cat("240.0.0.1"), Some(C::Reserved));
        assert_eq!(cat("255.255.255.254"), Some(C::Reserved));
        assert_eq!(cat("255.255.255.255"), Some(C::Broadcast));
        assert_eq!(cat("192.0.0.8"), Some(C::Reserved));
        assert_eq!(cat("198.18.0.1"), Some(C::Reserved));
        assert_eq!(cat("198.19.255.255"), Some(C::Reserved));
        assert_eq!(cat("192.0.2.1"), Some(C::Documentation));
        assert_eq!(cat("198.51.100.7"), Some(C::Documentation));
        assert_eq!(cat("203.0.113.9"), Some(C::Documentation));
    }

    #[test]
    fn ipv4_range_edges_are_public() {
        for s in [
            "9.255.255.255",
            "11.0.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "223.255.255.255",
            "126.255.255.255",
            "128.0.0.0",
            "1.0.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "192.0.1.0",
            "8.8.8.8",
        ] {
            assert_eq!(cat(s), None, "{s}");
        }
    }

    #[test]
    fn cloud_metadata_reported_first() {
        assert_eq!(cat("169.254.169.254"), Some(C::CloudMetadata));
        assert_eq!(cat("168.63.129.16"), Some(C::CloudMetadata));
        assert_eq!(cat("100.100.100.200"), Some(C::CloudMetadata));
        assert_eq!(cat("192.0.0.192"), Some(C::CloudMetadata));
        assert_eq!(cat("fd00:ec2::254"), Some(C::CloudMetadata));
        assert_eq!(cat("::ffff:169.254.169.254"), Some(C::CloudMetadata));
        assert_eq!(cat("64:ff9b::a9fe:a9fe"), Some(C::CloudMetadata));
        // Neighbours of the public ones are public.
        assert_eq!(cat("168.63.129.17"), None);
    }

    #[test]
    fn ipv6_categories() {
        assert_eq!(cat("::"), Some(C::Unspecified));
        assert_eq!(cat("::1"), Some(C::Loopback));
        assert_eq!(cat("fc00::1"), Some(C::Private));
        assert_eq!(cat("fdff:ffff::1"), Some(C::Private));
        assert_eq!(cat("fd00:ec2::253"), Some(C::Private));
        assert_eq!(cat("fe80::1"), Some(C::LinkLocal));
        assert_eq!(cat("febf::1"), Some(C::LinkLocal));
        assert_eq!(cat("fec0::1"), Some(C::Private));
        assert_eq!(cat("ff02::1"), Some(C::Multicast));
        assert_eq!(cat("2001:db8::1"), Some(C::Documentation));
        assert_eq!(cat("3fff::1"), Some(C::Documentation));
        assert_eq!(cat("100::1"), Some(C::Reserved));
        assert_eq!(cat("100:0:0:1::1"), None);
        assert_eq!(cat("2606:4700::1"), None);
        assert_eq!(cat("2001:db9::1"), None);
    }

    #[test]
    fn embedded_ipv4_forms() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let v4 = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(embedded_ipv4(v6("::ffff:127.0.0.1")), v4("127.0.0.1"));
        assert_eq!(embedded_ipv4(v6("::ffff:0:10.0.0.1")), v4("10.0.0.1"));
        assert_eq!(embedded_ipv4(v6("::10.0.0.1")), v4("10.0.0.1"));
        assert_eq!(embedded_ipv4(v6("::2")), v4("0.0.0.2"));
        assert_eq!(embedded_ipv4(v6("::")), None);
        assert_eq!(embedded_ipv4(v6("::1")), None);
        assert_eq!(embedded_ipv4(v6("64:ff9b::a00:1")), v4("10.0.0.1"));
        assert_eq!(embedded_ipv4(v6("64:ff9b:1::a00:1")), v4("10.0.0.1"));
        assert_eq!(embedded_ipv4(v6("2002:c0a8:101::1")), v4("192.168.1.1"));
        assert_eq!(embedded_ipv4(v6("2606:4700::1")), None);
        assert_eq!(embedded_ipv4(v6("64:ff9b:0:1::a00:1")), None);
    }

    #[test]
    fn embedded_ipv4_is_classified() {
        assert_eq!(cat("::ffff:127.0.0.1"), Some(C::Loopback));
        assert_eq!(cat("::ffff:10.1.2.3"), Some(C::Private));
        assert_eq!(cat("::ffff:0:127.0.0.1"), Some(C::Loopback));
        assert_eq!(cat("::127.0.0.1"), Some(C::Loopback));
        assert_eq!(cat("::0.0.0.2"), Some(C::Unspecified));
        assert_eq!(cat("64:ff9b::10.0.0.1"), Some(C::Private));
        assert_eq!(cat("64:ff9b:1::7f00:1"), Some(C::Loopback));
        assert_eq!(cat("2002:a9fe:a9fe::"), Some(C::CloudMetadata));
        assert_eq!(cat("2002:7f00:1::1"), Some(C::Loopback));
        assert_eq!(cat("2002:6440:1::1"), Some(C::SharedAddressSpace));
        // Embedded public addresses stay public.
        assert_eq!(cat("::ffff:93.184.216.34"), None);
        assert_eq!(cat("64:ff9b::5db8:d822"), None);
        assert_eq!(cat("2002:5db8:d822::1"), None);
    }

    #[test]
    fn public_addresses_allowed() {
        let g = default_guard();
        assert_eq!(g.check(ip("93.184.216.34")), Ok(()));
        assert_eq!(g.check(ip("2606:4700::1")), Ok(()));
        assert_eq!(g.check(ip("1.1.1.1")), Ok(()));
    }

    #[test]
    fn default_guard_blocks_with_category() {
        let g = default_guard();
        assert_eq!(
            g.check(ip("::ffff:127.0.0.1")),
            Err(Blocked {
                addr: ip("::ffff:127.0.0.1"),
                category: C::Loopback
            })
        );
        assert_eq!(
            g.check(ip("64:ff9b::a00:1")).unwrap_err().category,
            C::Private
        );
        assert_eq!(
            g.check(ip("169.254.169.254")).unwrap_err().category,
            C::CloudMetadata
        );
    }

    #[test]
    fn allow_list_is_an_exception() {
        let g = EgressGuard::new(vec![net("127.0.0.0/8")], vec![]);
        assert_eq!(g.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(g.check(ip("127.4.5.6")), Ok(()));
        assert_eq!(g.check(ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(g.check(ip("10.0.0.1")).unwrap_err().category, C::Private);
        assert_eq!(g.check(ip("::1")).unwrap_err().category, C::Loopback);
    }

    #[test]
    fn allow_list_v6_literal() {
        let g = EgressGuard::new(vec![net("fd00::/8")], vec![]);
        assert_eq!(g.check(ip("fd12::1")), Ok(()));
        assert_eq!(g.check(ip("fc00::1")).unwrap_err().category, C::Private);
    }

    #[test]
    fn deny_wins_over_allow() {
        let g = EgressGuard::new(vec![net("10.0.0.0/8")], vec![net("10.0.0.0/24")]);
        assert_eq!(g.check(ip("10.1.0.1")), Ok(()));
        assert_eq!(
            g.check(ip("10.0.0.5")),
            Err(Blocked {
                addr: ip("10.0.0.5"),
                category: C::Denied
            })
        );
        assert_eq!(
            g.check(ip("::ffff:10.0.0.5")).unwrap_err().category,
            C::Denied
        );
    }

    #[test]
    fn deny_list_blocks_public_addresses_and_embedded_forms() {
        let g = EgressGuard::new(vec![], vec![net("93.184.216.0/24")]);
        assert_eq!(
            g.check(ip("93.184.216.34")).unwrap_err().category,
            C::Denied
        );
        assert_eq!(
            g.check(ip("64:ff9b::5db8:d822")).unwrap_err().category,
            C::Denied
        );
        assert_eq!(
            g.check(ip("2002:5db8:d822::1")).unwrap_err().category,
            C::Denied
        );
        assert_eq!(g.check(ip("93.184.217.1")), Ok(()));
    }

    #[test]
    fn check_all_requires_every_address() {
        let g = default_guard();
        assert_eq!(
            g.check_all(&[sock("93.184.216.34:443"), sock("[2606:4700::1]:443")]),
            Ok(())
        );
        assert_eq!(
            g.check_all(&[sock("93.184.216.34:443"), sock("10.0.0.1:443")]),
            Err(Blocked {
                addr: ip("10.0.0.1"),
                category: C::Private
            })
        );
        assert_eq!(
            g.check_all(&[sock("[fe80::1%2]:443"), sock("93.184.216.34:443")])
                .unwrap_err()
                .category,
            C::LinkLocal
        );
    }

    #[test]
    fn check_all_empty_is_blocked() {
        let err = default_guard().check_all(&[]).unwrap_err();
        assert_eq!(err.category, C::NoAddress);
        assert_eq!(err.addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(
            err.to_string(),
            "destination has no addresses to connect to (blocked: no-address)"
        );
        // Even a permissive allow list does not make "nothing" allowed.
        let open = EgressGuard::new(vec![net("0.0.0.0/0"), net("::/0")], vec![]);
        assert_eq!(open.check_all(&[]).unwrap_err().category, C::NoAddress);
    }

    #[test]
    fn display_messages() {
        let b = Blocked {
            addr: ip("10.0.0.1"),
            category: C::Private,
        };
        assert_eq!(
            b.to_string(),
            "destination address 10.0.0.1 is blocked (private)"
        );
        let b = Blocked {
            addr: ip("100.64.0.1"),
            category: C::SharedAddressSpace,
        };
        assert_eq!(
            b.to_string(),
            "destination address 100.64.0.1 is blocked (cgnat)"
        );
        assert_eq!(C::LinkLocal.to_string(), "link-local");
        assert_eq!(C::CloudMetadata.to_string(), "cloud-metadata");
        assert_eq!(C::Denied.to_string(), "deny-listed");
    }

    #[test]
    fn accessors() {
        let g = EgressGuard::new(vec![net("10.0.0.0/8")], vec![net("10.0.0.0/24")]);
        assert_eq!(g.allow(), &[net("10.0.0.0/8")]);
        assert_eq!(g.deny(), &[net("10.0.0.0/24")]);
    }
}
