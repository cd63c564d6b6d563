//! The command line (DESIGN "CLI contract"). Exit codes: 0 ok, 1 runtime failure, 2 bad usage
//! or bad config.

pub(crate) mod dev;
mod replay;
pub(crate) mod signal;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use portcullis_filters::parse::identity::{SpiffeId, TrustDomain};

use crate::app;
use crate::config::{duration, Config};
use crate::pki::{Authority, LeafSpec};

#[derive(Parser, Debug)]
#[command(
    name = "portcullis",
    version,
    about = "Egress forward proxy for AI-agent tool calls"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Zero-setup local run: dev PKI, demo upstream, proxy, and a curl that works.
    Dev {
        #[arg(long, default_value = ".portcullis-dev")]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin_listen: SocketAddr,
        /// Export spans to this OTLP collector (e.g. http://127.0.0.1:4317). Without it, the
        /// access log on stderr shows one line per action with its identity and trace id.
        #[arg(long)]
        otlp_endpoint: Option<String>,
    },
    /// Run the proxy from a config file.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file and everything it references, then exit.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Policy tooling.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Credential operations on a running proxy (through its admin listener).
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
    },
    /// Identity revocation on a running proxy (through its admin listener): a revoked SPIFFE
    /// ID or certificate fails new handshakes and the next request of open connections.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Approvals on a running proxy (through its admin listener): list, approve, deny. The
    /// token is an approver's (`approvals.approvers`) or, without approvers, the admin token.
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// Local connector: a plain HTTP proxy on loopback (HTTPS_PROXY=http://127.0.0.1:15001)
    /// that carries each client connection to the central Portcullis over mTLS with this
    /// workload's SVID.
    Connect(ConnectArgs),
    /// Certificate authority helpers.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// X.509-SVID helpers.
    Svid {
        #[command(subcommand)]
        command: SvidCommand,
    },
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("identity").args(["svid", "workload_api"])))]
pub struct ConnectArgs {
    /// The central Portcullis proxy, e.g. https://portcullis.internal:8443.
    #[arg(long, required_unless_present = "print_rules")]
    pub upstream: Option<String>,
    /// Also require the central proxy's certificate to be the X.509-SVID of this SPIFFE ID,
    /// e.g. spiffe://acme.test/portcullis (on top of the host name check).
    #[arg(long)]
    pub upstream_id: Option<String>,
    /// Where agents connect (HTTPS_PROXY=http://ADDR). Keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub listen: SocketAddr,
    /// The workload's X.509-SVID (PEM, leaf first); re-read when it changes.
    #[arg(long, requires_all = ["svid_key", "bundle"])]
    pub svid: Option<PathBuf>,
    /// The SVID's private key (PEM; keep it mode 0600).
    #[arg(long, requires = "svid")]
    pub svid_key: Option<PathBuf>,
    /// CA certificates (PEM) that verify the central proxy's certificate.
    #[arg(long, requires = "svid")]
    pub bundle: Option<PathBuf>,
    /// Take the SVID and trust bundles from the SPIFFE Workload API instead, e.g.
    /// unix:///run/spire/agent.sock (or just the socket's absolute path).
    #[arg(long)]
    pub workload_api: Option<String>,
    /// Also fetch the workload's JWT-SVID for this audience from the Workload API (repeatable:
    /// one JWT-SVID naming them all) and send it with every proxy request
    /// (`x-portcullis-jwt-svid`), for token exchanges whose actor token it is.
    #[arg(
        long = "jwt-audience",
        value_name = "AUDIENCE",
        requires = "workload_api"
    )]
    pub jwt_audiences: Vec<String>,
    /// Source networks that may use the connector (repeatable); others get a 403.
    #[arg(long = "allow-clients", value_name = "CIDR", num_args = 1.., default_values = ["127.0.0.0/8", "::1/128"])]
    pub allow_clients: Vec<ipnet::IpNet>,
    /// Bound on TCP connect + TLS handshake to the central proxy.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub connect_timeout: Duration,
    /// How often the SVID files are checked for changes.
    #[arg(long, default_value = "2s", value_parser = duration::parse)]
    pub reload_interval: Duration,
    /// How long open tunnels may continue after SIGTERM/Ctrl-C.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub shutdown_grace: Duration,
    /// Open client connections at most (each holds one connection to the central proxy);
    /// more wait in the accept queue.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Accept connections redirected here by the kernel (nftables/iptables REDIRECT in the
    /// workload's network namespace) instead of proxy requests; see --print-rules.
    #[arg(long)]
    pub transparent: bool,
    /// Print the nftables and iptables rules that redirect the namespace's TCP to --listen
    /// (all but --uid's own traffic), then exit.
    #[arg(long)]
    pub print_rules: bool,
    /// With --print-rules: the user the connector runs as (its traffic is not redirected);
    /// default: the current user.
    #[arg(long, requires = "print_rules")]
    pub uid: Option<u32>,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Evaluate the policy on an input document (JSON) and print the decision as JSON.
    Eval {
        #[arg(long)]
        input: PathBuf,
        /// Policy files or directories (default: `policy.paths` of --config).
        #[arg(long)]
        policy: Vec<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "data.portcullis.decision")]
        entrypoint: String,
    },
    /// Run the policy's Rego unit tests (rules named `test_*`), like `opa test`.
    Test {
        /// Policy files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Also report the lines and rules the tests evaluated (like `opa test --coverage`).
        #[arg(long)]
        coverage: bool,
        /// With --coverage: print the report as JSON (test results and coverage).
        #[arg(long, requires = "coverage")]
        json: bool,
    },
    /// Decide every input recorded in a decision log (`telemetry.decision_log_input`) again
    /// with a candidate policy and report what changes. Exit 1 when anything changed.
    Replay {
        /// The decision log (JSON lines; `-` for stdin).
        #[arg(long)]
        log: PathBuf,
        /// The candidate policy: files or directories.
        #[arg(long, required = true)]
        policy: Vec<PathBuf>,
        #[arg(long, default_value = "data.portcullis.decision")]
        entrypoint: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Changed decisions shown per kind of change.
        #[arg(long, default_value_t = 5)]
        examples: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum CredentialsCommand {
    /// Drop the cached value of a credential, so the next use fetches it again.
    Revoke {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Where the admin listener is, and how to authenticate to it.
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The proxy's admin listener.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// The admin token (`env:NAME` or `file:PATH`), when the proxy has `admin_token`.
    #[arg(long)]
    pub admin_token: Option<String>,
}

/// One revocation selector.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("selector").required(true).args(["id", "prefix", "serial", "sha256"])))]
pub struct SelectorArgs {
    /// Exactly this SPIFFE ID.
    #[arg(long)]
    pub id: Option<String>,
    /// This SPIFFE ID and every ID under it (path-segment boundaries; a trust-domain ID
    /// covers the whole trust domain).
    #[arg(long)]
    pub prefix: Option<String>,
    /// A certificate's serial number, hex (leaf or intermediate).
    #[arg(long)]
    pub serial: Option<String>,
    /// A certificate's SHA-256 fingerprint, hex (colons allowed).
    #[arg(long)]
    pub sha256: Option<String>,
}

impl SelectorArgs {
    fn pair(&self) -> (&'static str, &str) {
        let all = [
            ("id", &self.id),
            ("prefix", &self.prefix),
            ("serial", &self.serial),
            ("sha256", &self.sha256),
        ];
        all.into_iter()
            .find_map(|(k, v)| v.as_deref().map(|v| (k, v)))
            .unwrap_or(("id", ""))
    }
}

#[derive(Subcommand, Debug)]
pub enum ApprovalsCommand {
    /// Print approvals (JSON), newest first.
    List {
        /// pending, granted, denied, expired or all.
        #[arg(long, default_value = "pending")]
        state: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Grant a pending approval (recorded with the approver's name).
    Approve {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Deny a pending approval.
    Deny {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum IdentityCommand {
    /// Revoke an identity on every replica (with Redis) until restored.
    Revoke {
        #[command(flatten)]
        selector: SelectorArgs,
        /// Why (kept with the revocation, shown in refusals).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Lift a revocation.
    Restore {
        #[command(flatten)]
        selector: SelectorArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the revocations in force (JSON).
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a self-signed CA (a trust domain CA with --trust-domain, else a plain CA such as
    /// the MITM CA). Writes CERT and KEY (mode 0600).
    Init {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        trust_domain: Option<String>,
        #[arg(long, default_value = "Portcullis CA")]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SvidCommand {
    /// Issue an X.509-SVID signed by a trust domain CA; writes OUT.pem and OUT.key.
    Issue {
        #[arg(long)]
        spiffe_id: String,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        ca_key: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. 1h, 24h.
        #[arg(long, default_value = "24h", value_parser = duration::parse)]
        ttl: Duration,
        /// Extra DNS or IP SANs (for the proxy's own server SVID).
        #[arg(long)]
        san: Vec<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Held until exit: flushes queued log lines.
    let _logs = init_logging(cli.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(cli.command))
}

/// Dependency log targets that can carry request data at debug or trace.
const QUIET_DEPENDENCIES: [&str; 9] = [
    "h2",
    "hyper",
    "hyper_util",
    "hyper_rustls",
    "rustls",
    "tokio_rustls",
    "redis",
    "tonic",
    "tower",
];

/// Logs go to stderr through a writer thread, so a log line costs the request path no write
/// syscall; the queue is not lossy (a full queue waits). The guard flushes at exit.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let mut filter =
        EnvFilter::try_from_env("PORTCULLIS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Dependencies that see request data (header values, frames, Redis commands) log it at
    // debug/trace: they stay at info whatever PORTCULLIS_LOG asks, so no secret reaches a log
    // line through them. Our own crates log no secret at any level.
    for target in QUIET_DEPENDENCIES {
        if let Ok(directive) = format!("{target}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    guard
}

pub(crate) fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    tracing::error!("{msg}");
    ExitCode::from(code)
}

async fn run(cmd: Command) -> ExitCode {
    match cmd {
        Command::Dev {
            dir,
            listen,
            admin_listen,
            otlp_endpoint,
        } => match dev::run(&dir, listen, admin_listen, otlp_endpoint.as_deref()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, format!("dev: {e:#}")),
        },
        Command::Serve { config } => serve(&config).await,
        Command::Check { config } => check(&config).await,
        Command::Policy {
            command:
                PolicyCommand::Eval {
                    input,
                    policy,
                    config,
                    entrypoint,
                },
        } => policy_eval(&input, policy, config.as_deref(), &entrypoint),
        Command::Policy {
            command:
                PolicyCommand::Test {
                    paths,
                    coverage,
                    json,
                },
        } => policy_test(&paths, coverage, json),
        Command::Policy {
            command:
                PolicyCommand::Replay {
                    log,
                    policy,
                    entrypoint,
                    json,
                    examples,
                },
        } => match portcullis_policy::PolicySet::load(
            &policy,
            &entrypoint,
            portcullis_policy::Limits::default(),
        ) {
            Ok(set) => replay::run(&set, &log, json, examples),
            Err(e) => fail(2, e),
        },
        Command::Credentials {
            command: CredentialsCommand::Revoke { name, admin },
        } => {
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("name", &name)
                .finish();
            admin_call(&admin, "POST", &format!("/credentials/revoke?{query}")).await
        }
        Command::Identity { command } => identity(command).await,
        Command::Approvals { command } => approvals(command).await,
        Command::Connect(args) => connect(args).await,
        Command::Ca {
            command:
                CaCommand::Init {
                    cert,
                    key,
                    trust_domain,
                    name,
                },
        } => ca_init(&cert, &key, trust_domain.as_deref(), &name),
        Command::Svid {
            command:
                SvidCommand::Issue {
                    spiffe_id,
                    ca,
                    ca_key,
                    out,
                    ttl,
                    san,
                },
        } => svid_issue(&spiffe_id, &ca, &ca_key, &out, ttl, &san),
    }
}

#[allow(clippy::print_stdout)] // --print-rules prints the rules
async fn connect(args: ConnectArgs) -> ExitCode {
    use crate::connector::{transparent, IdentitySource, Options, Upstream};
    if args.print_rules {
        use std::os::unix::fs::MetadataExt;
        let uid = match args.uid {
            Some(u) => u,
            None => match std::fs::metadata("/proc/self") {
                Ok(m) => m.uid(),
                Err(e) => {
                    return fail(2, format!("--uid not given and /proc/self unreadable: {e}"))
                }
            },
        };
        let port = args.listen.port();
        println!("{}", transparent::nft_rules(port, uid));
        println!("{}", transparent::iptables_rules(port, uid));
        return ExitCode::SUCCESS;
    }
    let upstream = match Upstream::parse(args.upstream.as_deref().unwrap_or_default()) {
        Ok(u) => u,
        Err(e) => return fail(2, e),
    };
    let upstream_id = match args.upstream_id.as_deref().map(SpiffeId::parse).transpose() {
        Ok(id) => id,
        Err(e) => return fail(2, format!("--upstream-id: {e}")),
    };
    let identity = match (args.svid, args.svid_key, args.bundle, args.workload_api) {
        (Some(svid), Some(key), Some(bundle), None) => IdentitySource::Files { svid, key, bundle },
        (None, None, None, Some(api)) => match crate::config::WorkloadApiEndpoint::parse(&api) {
            Ok(e) => IdentitySource::WorkloadApi(e),
            Err(e) => return fail(2, format!("--workload-api: {e}")),
        },
        // clap enforces the combinations; this is only reachable through a clap change.
        _ => return fail(2, "give --svid, --svid-key and --bundle, or --workload-api"),
    };
    if args.connect_timeout.is_zero() || args.reload_interval.is_zero() {
        return fail(
            2,
            "--connect-timeout and --reload-interval must be greater than zero",
        );
    }
    let run = crate::connector::run(
        Options {
            upstream,
            upstream_id,
            listen: args.listen,
            identity,
            allow_clients: args.allow_clients,
            connect_timeout: args.connect_timeout,
            reload_interval: args.reload_interval,
            shutdown_grace: args.shutdown_grace,
            max_connections: args.max_connections,
            transparent: args.transparent,
            jwt_audiences: args.jwt_audiences,
        },
        signal::shutdown_signal(),
    );
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.exit_code(), e),
    }
}

/// `portcullis identity …`: the admin API's `/identity/…` endpoints.
async fn identity(cmd: IdentityCommand) -> ExitCode {
    let mut query = form_urlencoded::Serializer::new(String::new());
    let (path, admin) = match &cmd {
        IdentityCommand::Revoke {
            selector,
            reason,
            admin,
        } => {
            let (kind, value) = selector.pair();
            query.append_pair(kind, value).append_pair("reason", reason);
            ("/identity/revoke", admin)
        }
        IdentityCommand::Restore { selector, admin } => {
            let (kind, value) = selector.pair();
            query.append_pair(kind, value);
            ("/identity/restore", admin)
        }
        IdentityCommand::List { admin } => {
            return admin_call(admin, "GET", "/identity/revocations").await;
        }
    };
    admin_call(admin, "POST", &format!("{path}?{}", query.finish())).await
}

async fn approvals(cmd: ApprovalsCommand) -> ExitCode {
    let (id, verb, admin) = match &cmd {
        ApprovalsCommand::List { state, admin } => {
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("state", state)
                .finish();
            return admin_call(admin, "GET", &format!("/approvals?{query}")).await;
        }
        ApprovalsCommand::Approve { id, admin } => (id, "approve", admin),
        ApprovalsCommand::Deny { id, admin } => (id, "deny", admin),
    };
    let valid = !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return fail(2, format!("{id:?} is not an approval id (apr_…)"));
    }
    admin_call(admin, "POST", &format!("/approvals/{id}/{verb}")).await
}

/// One request to the admin listener; its answer's body goes to stdout on success (exit 0)
/// and to the log otherwise (exit 1).
#[allow(clippy::print_stdout)] // the answer is this command's output
async fn admin_call(to: &AdminArgs, method: &str, path_and_query: &str) -> ExitCode {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let admin = to.admin;
    let auth = match to
        .admin_token
        .as_ref()
        .map(|t| crate::config::SecretRef::try_from(t.clone()))
    {
        None => String::new(),
        Some(Err(e)) => return fail(2, format!("--admin-token {e}")),
        Some(Ok(r)) => match r.resolve() {
            Ok(t) => format!("Authorization: Bearer {}\r\n", t.expose()),
            Err(e) => return fail(2, format!("--admin-token: {e}")),
        },
    };
    let run = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        let req = format!(
            "{method} {path_and_query} HTTP/1.1\r\nHost: {admin}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return fail(1, format!("admin listener {admin}: {e}")),
        Err(_) => return fail(1, format!("admin listener {admin} did not answer")),
    };
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    if out.starts_with("HTTP/1.1 200") {
        println!("{body}");
        ExitCode::SUCCESS
    } else if body.is_empty() {
        fail(1, out.lines().next().unwrap_or("no answer"))
    } else {
        fail(1, body)
    }
}

async fn serve(path: &Path) -> ExitCode {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    signal::survive_file_size_limit();
    let running = match app::start(cfg, path.to_owned()).await {
        Ok(r) => r,
        Err(e) => return fail(e.exit_code(), e),
    };
    signal::shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    let grace = running.grace();
    running.drain(grace).await;
    ExitCode::SUCCESS
}

#[allow(clippy::print_stdout)] // the decision is this command's output
fn policy_eval(
    input: &Path,
    paths: Vec<PathBuf>,
    config: Option<&Path>,
    entrypoint: &str,
) -> ExitCode {
    let (paths, entrypoint, limits) = match (paths.is_empty(), config) {
        (false, _) => (
            paths,
            entrypoint.to_owned(),
            portcullis_policy::Limits::default(),
        ),
        (true, Some(c)) => match Config::load(c) {
            Ok(cfg) => (
                cfg.policy.paths.clone(),
                cfg.policy.entrypoint.clone(),
                cfg.policy.limits(),
            ),
            Err(e) => return fail(2, e),
        },
        (true, None) => return fail(2, "give --policy PATH or --config FILE"),
    };
    let set = match portcullis_policy::PolicySet::load(&paths, &entrypoint, limits) {
        Ok(s) => s,
        Err(e) => return fail(2, e),
    };
    let doc: serde_json::Value = match std::fs::read_to_string(input)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => return fail(2, format!("{}: {e}", input.display())),
    };
    let d = set.evaluate_json(&doc);
    let out = serde_json::json!({
        "allow": d.allow,
        "reason": d.reason,
        "status": d.status,
        "headers": d.headers,
        "revision": &*d.revision,
        "eval_us": d.eval_time.as_micros() as u64,
        "approval": d.approval.as_ref().map(|a| serde_json::json!({
            "reason": a.reason,
            "ttl_s": a.ttl.as_secs(),
            "scope": a.scope.as_str(),
            "uses": a.uses,
        })),
        "limits": d.limits.iter().map(|l| serde_json::json!({
            "name": l.name,
            "key": l.key,
            "rate": l.rate.to_string(),
            "burst": l.burst,
        })).collect::<Vec<_>>(),
    });
    println!("{out:#}");
    ExitCode::SUCCESS
}

#[allow(clippy::print_stdout)] // the test report is this command's output
fn policy_test(paths: &[PathBuf], coverage: bool, json: bool) -> ExitCode {
    let set = match portcullis_policy::PolicySet::load(
        paths,
        "data.portcullis.decision",
        portcullis_policy::Limits::default(),
    ) {
        Ok(s) => s,
        Err(e) => return fail(2, e),
    };
    let report = if coverage {
        let (report, coverage) = set.run_tests_with_coverage();
        if json {
            let tests: Vec<_> = report
                .results
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "name": format!("{}.{}", r.package, r.name),
                        "outcome": match &r.outcome {
                            portcullis_policy::TestOutcome::Pass => "pass",
                            portcullis_policy::TestOutcome::Fail => "fail",
                            portcullis_policy::TestOutcome::Error(_) => "error",
                        },
                    })
                })
                .collect();
            let (covered, total) = coverage.totals();
            let out = serde_json::json!({
                "tests": tests,
                "passed": report.passed(),
                "coverage": coverage,
                "covered_lines": covered,
                "total_lines": total,
            });
            println!("{out:#}");
        } else {
            println!("{report}\n{coverage}");
        }
        report
    } else {
        let report = set.run_tests();
        println!("{report}");
        report
    };
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Everything `serve` loads, without binding: config, certificates, bundles, MITM CA, roots.
async fn check(path: &Path) -> ExitCode {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    let loaded = app::Loaded::load(&cfg);
    match loaded {
        Ok(l) if l.shadow_error().is_some() => fail(
            2,
            format!(
                "{}: policy.shadow: {}",
                path.display(),
                l.shadow_error()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ),
        ),
        Ok(l) => {
            tracing::info!(config = %path.display(), policy_revision = %l.policy_revision(), "{cfg}: OK");
            ExitCode::SUCCESS
        }
        Err(e) => fail(2, format!("{}: {e}", path.display())),
    }
}

fn ca_init(cert: &Path, key: &Path, trust_domain: Option<&str>, name: &str) -> ExitCode {
    let uri = match trust_domain.map(TrustDomain::parse).transpose() {
        Ok(td) => td.map(|td| format!("spiffe://{td}")),
        Err(e) => return fail(2, format!("--trust-domain: {e}")),
    };
    match Authority::generate(name, uri.as_deref()).and_then(|ca| ca.write(cert, key)) {
        Ok(()) => {
            tracing::info!(cert = %cert.display(), key = %key.display(), "CA created");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

fn svid_issue(
    spiffe_id: &str,
    ca: &Path,
    ca_key: &Path,
    out: &Path,
    ttl: Duration,
    san: &[String],
) -> ExitCode {
    let id = match SpiffeId::parse(spiffe_id) {
        Ok(id) => id,
        Err(e) => return fail(2, format!("--spiffe-id {spiffe_id:?}: {e}")),
    };
    let authority = match Authority::load(ca, ca_key) {
        Ok(a) => a,
        Err(e) => return fail(2, e),
    };
    let mut spec = LeafSpec::svid(id.as_str(), ttl);
    for s in san {
        match s.parse::<std::net::IpAddr>() {
            Ok(ip) => spec.ips.push(ip),
            Err(_) => spec.dns.push(s.clone()),
        }
    }
    let cert = out.with_extension("pem");
    let key = out.with_extension("key");
    match authority.issue(&spec).and_then(|i| i.write(&cert, &key)) {
        Ok(()) => {
            tracing::info!(spiffe_id = %id, cert = %cert.display(), key = %key.display(), "SVID issued");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}
