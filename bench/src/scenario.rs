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
    /// Through the second proxy, which exports every span over OTLP (to the bench's sink);
    /// compared with `mitm` (telemetry off) of the same run.
    pub otel: bool,
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
        otel: false,
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
    Scenario {
        otel: true,
        ..sc(
            "mitm-otel",
            "like mitm, through a proxy exporting every span (OTLP/HTTP to a sink in the bench)",
            Route::Mitm,
            ConnMode::KeepAlive,
            Workload::Small,
            Some("direct"),
        )
    },
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
        stub: true,
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
        stub: true,
        ..sc(
            "policy-heavy",
            "MITM with a large Rego policy evaluated per request",
            Route::Mitm,
            ConnMode::KeepAlive,
            Workload::Small,
            Some("direct"),
        )
    },
];

/// What runs when `--scenarios` is not given.
pub const DEFAULT: &str = "direct,tunnel,mitm,mitm-otel,handshake,large,large-16x,mcp";

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
        if s.otel {
            // Telemetry's cost is read against the same pipeline without it.
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
        let names: Vec<&str> = select("mitm-otel")
            .unwrap()
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["direct", "mitm", "mitm-otel"]);
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
