//! The scenario catalogue: what each named workload sends, over which route, and which direct
//! run is its baseline. Selecting a proxied scenario also runs its baseline, so every ratio in a
//! report compares two runs of the same invocation on the same machine state.

use std::fmt;

/// How the client reaches the built-in upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// TLS straight to the upstream: the baseline.
    Direct,
    /// CONNECT to a `mitm.passthrough` host: the proxy copies bytes blind.
    Tunnel,
    /// CONNECT with interception: the proxy terminates TLS with a MITM leaf and forwards.
    Mitm,
}

/// Connection reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnMode {
    /// N persistent connections, each closed-loop.
    KeepAlive,
    /// A new connection (every handshake, CONNECT included) for every request.
    PerRequest,
}

/// The request every iteration sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// GET /small: a ~100-byte JSON body.
    Small,
    /// GET /bytes/N with the configured body size.
    Large,
    /// GET /bytes/(16 N): sixteen times the large body, to see whether proxy memory follows
    /// body size (buffering) or not (streaming).
    Huge,
    /// POST /mcp with a JSON-RPC `tools/call`.
    Mcp,
}

/// Which proxy configuration a scenario runs against (one proxy process per profile).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Profile {
    /// Allow-all policy, no credentials, telemetry off: the budget's "bare MITM".
    Bare,
    /// The example policy, a credential substituted on every request, the decision log on
    /// and spans exported over OTLP to an in-process sink: the budget's "full pipeline".
    Full,
    /// `full` plus a delegation token (ES256, verified against a JWKS file) on every request:
    /// what acting for a user costs.
    FullDelegated,
    /// `full` plus a shadow policy (a copy of the example policy) deciding every action again
    /// after it finished, and each decision's input in the decision log: what recording and
    /// shadowing a candidate policy cost.
    FullShadow,
    /// The example policy over a large data document (thousands of identities and hosts).
    PolicyHeavy,
    /// The bare pipeline plus OTLP export of every span (`--otel-sampling`) to a sink in the
    /// bench: telemetry's cost, read against `mitm`.
    Otel,
    /// The bare pipeline plus a rate limit keyed by identity (`rate_limits.limits`, never
    /// reached) checked in a real `redis-server` on every request: the cost of one Redis round
    /// trip per request, read against `mitm`.
    Limited,
    /// mitmproxy's `mitmdump`, intercepting (a peer, with `--peers`).
    Mitmproxy,
    /// squid, CONNECT tunnels only (a peer, with `--peers`).
    Squid,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Bare => "bare",
            Profile::Full => "full",
            Profile::FullDelegated => "full-delegated",
            Profile::FullShadow => "full-shadow",
            Profile::PolicyHeavy => "policy-heavy",
            Profile::Otel => "mitm-otel",
            Profile::Limited => "ratelimit",
            Profile::Mitmproxy => "mitmproxy",
            Profile::Squid => "squid",
        }
    }

    /// Another proxy, measured for comparison; reached over plain TCP, no client SVID.
    pub fn is_peer(self) -> bool {
        matches!(self, Profile::Mitmproxy | Profile::Squid)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub route: Route,
    pub mode: ConnMode,
    pub workload: Workload,
    /// The direct scenario this one is compared with (`ratio_to_direct`).
    pub baseline: Option<&'static str>,
    /// Named but not measurable yet: reported as "not yet available".
    pub stub: bool,
    pub profile: Profile,
}

const fn sc(
    name: &'static str,
    about: &'static str,
    route: Route,
    mode: ConnMode,
    workload: Workload,
    baseline: Option<&'static str>,
) -> Scenario {
    Scenario {
        name,
        about,
        route,
        mode,
        workload,
        baseline,
        stub: false,
        profile: Profile::Bare,
    }
}

/// Every scenario, in run order (baselines first so ratios can be computed as results arrive).
pub const ALL: &[Scenario] = &[
    sc(
        "direct",
        "client -> upstream TLS, keep-alive, GET /small",
        Route::Direct,
        ConnMode::KeepAlive,
        Workload::Small,
        None,
    ),
    sc(
        "direct-handshake",
        "client -> upstream, new TLS connection per request",
        Route::Direct,
        ConnMode::PerRequest,
        Workload::Small,
        None,
    ),
    sc(
        "direct-large",
        "client -> upstream TLS, keep-alive, GET /bytes/N",
        Route::Direct,
        ConnMode::KeepAlive,
        Workload::Large,
        None,
    ),
    sc(
        "direct-mcp",
        "client -> upstream TLS, keep-alive, POST /mcp tools/call",
        Route::Direct,
        ConnMode::KeepAlive,
        Workload::Mcp,
        None,
    ),
    sc(
        "tunnel",
        "CONNECT to a passthrough host, blind tunnel, keep-alive",
        Route::Tunnel,
        ConnMode::KeepAlive,
        Workload::Small,
        Some("direct"),
    ),
    sc(
        "tunnel-handshake",
        "new proxy mTLS + CONNECT to a passthrough host + upstream TLS per request",
        Route::Tunnel,
        ConnMode::PerRequest,
        Workload::Small,
        Some("direct-handshake"),
    ),
    sc(
        "tunnel-large",
        "CONNECT to a passthrough host, blind tunnel, keep-alive, GET /bytes/N",
        Route::Tunnel,
        ConnMode::KeepAlive,
        Workload::Large,
        Some("direct-large"),
    ),
    sc(
        "mitm",
        "CONNECT + MITM, keep-alive, GET /small (bare pipeline)",
        Route::Mitm,
        ConnMode::KeepAlive,
        Workload::Small,
        Some("direct"),
    ),
    sc(
        "handshake",
        "new proxy mTLS + CONNECT + MITM TLS per request (leaf cache warm)",
        Route::Mitm,
        ConnMode::PerRequest,
        Workload::Small,
        Some("direct-handshake"),
    ),
    sc(
        "large",
        "CONNECT + MITM, keep-alive, GET /bytes/N",
        Route::Mitm,
        ConnMode::KeepAlive,
        Workload::Large,
        Some("direct-large"),
    ),
    sc(
        "large-16x",
        "CONNECT + MITM, keep-alive, GET /bytes/16N (proxy RSS vs body size)",
        Route::Mitm,
        ConnMode::KeepAlive,
        Workload::Huge,
        None,
    ),
    sc(
        "mcp",
        "CONNECT + MITM, keep-alive, POST /mcp JSON-RPC tools/call",
        Route::Mitm,
        ConnMode::KeepAlive,
        Workload::Mcp,
        Some("direct-mcp"),
    ),
    Scenario {
        profile: Profile::Otel,
        ..sc(
            "mitm-otel",
            "like mitm, through a proxy exporting every span (OTLP/HTTP to a sink in the bench)",
            Route::Mitm,
            ConnMode::KeepAlive,
            Workload::Small,
            Some("direct"),
        )
    },
    Scenario {
        profile: Profile::Limited,
        ..sc(
            "ratelimit",
            "like mitm, with a rate limit checked in Redis on every request (one Lua round trip)",
            Route::Mitm,
            ConnMode::KeepAlive,
            Workload::Small,
            Some("direct"),
        )
    },
    Scenario {
        profile: Profile::Full,
        ..sc(
            "full",
            "MITM with example policy, credential substitution, telemetry exporting",
            Route::Mitm,
            ConnMode::KeepAlive,
            Workload::Small,
            Some("direct"),
        )
    },
    Scenario {
        profile: Profile::FullDelegated,
        ..sc(
            "full-delegated",
            "like full, every request also carrying a delegation token (ES256 JWT) the proxy verifies",
            Route::Mitm,
            ConnMode::KeepAlive,
            Workload::Small,
            Some("direct"),
        )
    },
    Scenario {
        profile: Profile::FullShadow,
        ..sc(
            "full-shadow",
            "like full, plus a shadow policy decided on every action and each decision's policy input in the decision log",
            Route::Mitm,
            ConnMode::KeepAlive,
            Workload::Small,
            Some("direct"),
        )
    },
    Scenario {
        profile: Profile::PolicyHeavy,
        ..sc(
            "policy-heavy",
            "MITM with the example policy over a large data document (5,000 identities)",
            Route::Mitm,
            ConnMode::KeepAlive,
            Workload::Small,
            Some("direct"),
        )
    },
    Scenario {
        profile: Profile::Mitmproxy,
        ..sc(
            "mitmproxy",
            "peer: mitmdump intercepting, keep-alive, GET /small (with --peers)",
            Route::Mitm,
            ConnMode::KeepAlive,
            Workload::Small,
            Some("direct"),
        )
    },
    Scenario {
        profile: Profile::Mitmproxy,
        ..sc(
            "mitmproxy-large",
            "peer: mitmdump intercepting, keep-alive, GET /bytes/N (with --peers)",
            Route::Mitm,
            ConnMode::KeepAlive,
            Workload::Large,
            Some("direct-large"),
        )
    },
    Scenario {
        profile: Profile::Squid,
        ..sc(
            "squid",
            "peer: squid CONNECT blind tunnel, keep-alive, GET /small (with --peers)",
            Route::Tunnel,
            ConnMode::KeepAlive,
            Workload::Small,
            Some("direct"),
        )
    },
    Scenario {
        profile: Profile::Squid,
        ..sc(
            "squid-large",
            "peer: squid CONNECT blind tunnel, keep-alive, GET /bytes/N (with --peers)",
            Route::Tunnel,
            ConnMode::KeepAlive,
            Workload::Large,
            Some("direct-large"),
        )
    },
];

/// The peer scenarios `--peers` adds.
pub const PEERS: &str = "mitmproxy,mitmproxy-large,squid,squid-large";

/// What runs when `--scenarios` is not given.
pub const DEFAULT: &str =
    "direct,tunnel,mitm,mitm-otel,handshake,large,large-16x,mcp,ratelimit,full,full-delegated,full-shadow,policy-heavy";

#[derive(Debug)]
pub struct UnknownScenario(pub String);

impl fmt::Display for UnknownScenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = ALL.iter().map(|s| s.name).collect();
        write!(
            f,
            "unknown scenario {:?}; known: {} (or \"all\")",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownScenario {}

pub fn find(name: &str) -> Option<&'static Scenario> {
    ALL.iter().find(|s| s.name == name)
}

/// Parse a comma-separated list, add the baselines the chosen scenarios need, and return them
/// in catalogue order.
pub fn select(list: &str) -> Result<Vec<&'static Scenario>, UnknownScenario> {
    let mut wanted: Vec<&str> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if name == "all" {
            wanted.extend(ALL.iter().map(|s| s.name));
            continue;
        }
        let s = find(name).ok_or_else(|| UnknownScenario(name.to_owned()))?;
        wanted.push(s.name);
        if let Some(b) = s.baseline {
            wanted.push(b);
        }
        if s.profile != Profile::Bare && !s.profile.is_peer() {
            // Their cost is read against the bare pipeline of the same run.
            wanted.push("mitm");
        }
    }
    if wanted.is_empty() {
        return Err(UnknownScenario(list.to_owned()));
    }
    Ok(ALL.iter().filter(|s| wanted.contains(&s.name)).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn selection_adds_baselines_in_catalogue_order() {
        let names: Vec<&str> = select("large, mitm")
            .unwrap()
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["direct", "direct-large", "mitm", "large"]);
    }

    #[test]
    fn profiles_bring_the_bare_mitm_along() {
        let names: Vec<&str> = select("mitm-otel,full")
            .unwrap()
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["direct", "mitm", "mitm-otel", "full"]);
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = select("mitm,warp").unwrap_err();
        assert!(e.to_string().contains("\"warp\""), "{e}");
        assert!(select(" , ").is_err());
    }

    #[test]
    fn every_baseline_exists_and_is_direct() {
        for s in ALL {
            if let Some(b) = s.baseline {
                assert_eq!(find(b).map(|b| b.route), Some(Route::Direct), "{}", s.name);
            }
        }
    }
}
