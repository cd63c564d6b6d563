//! Transparent capture (`portcullis connect --transparent`), in a network namespace this test
//! creates (root is needed, as in CI; only the namespace's own loopback is used). Inside it:
//! `portcullis dev` (the central proxy and its demo upstream), the connector as root, the
//! rules `connect --print-rules` prints, applied with nft, and unmodified clients without any
//! proxy settings running as `nobody`: curl, Python's urllib and Node's fetch reach the
//! upstream through the connector and the central proxy (the decision log shows each request
//! decided for the agent's SPIFFE ID), plain HTTP is named by its Host, a destination the
//! policy denies fails, UDP egress is dropped, and a client dialling the connector's port
//! itself is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use portcullis_tests::*;

/// The namespace, deleted (with everything in it) when the test ends.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = root(&["ip", "netns", "del", &self.0]).status();
    }
}

/// A process that is killed when the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `args` as root: directly when the test runs as root (CI), else through `sudo -n`.
fn root(args: &[&str]) -> Command {
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let mut cmd = Command::new(if is_root { args[0] } else { "sudo" });
    if is_root {
        cmd.args(&args[1..]);
    } else {
        cmd.arg("-n").args(args);
    }
    cmd
}

impl Netns {
    fn new() -> Netns {
        let name = format!("pcx-{}", std::process::id());
        let ok = root(&["ip", "netns", "add", &name]).status().unwrap();
        assert!(ok.success(), "ip netns add needs root (CI runs as root)");
        let ns = Netns(name);
        assert!(ns
            .exec(&["ip", "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        ns
    }

    /// `args` inside the namespace, as root.
    fn exec(&self, args: &[&str]) -> Command {
        let mut all = vec!["ip", "netns", "exec", &self.0];
        all.extend_from_slice(args);
        root(&all)
    }

    /// `args` inside the namespace as `nobody`, with no proxy settings at all.
    fn as_nobody(&self, args: &[&str]) -> Command {
        let mut all = vec![
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "env",
            "-u",
            "HTTPS_PROXY",
            "-u",
            "https_proxy",
            "-u",
            "HTTP_PROXY",
            "-u",
            "http_proxy",
            "-u",
            "ALL_PROXY",
        ];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// Python's plain HTTP server on `bind`:`port` inside the namespace (as root), ready.
    fn http_server(&self, bind: &str, port: &str) -> (Running, Arc<Logs>) {
        let logs = Arc::new(Logs::default());
        let server = self.spawn(
            &[
                "/usr/bin/python3",
                "-m",
                "http.server",
                port,
                "--bind",
                bind,
            ],
            &logs,
        );
        logs.wait_for("the plain HTTP server", |l| l.contains("Serving HTTP"));
        (server, logs)
    }

    /// curl as `nobody` printing only the response status of `url`.
    fn status_of(&self, url: &str) -> Command {
        self.as_nobody(&[
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ])
    }

    /// Starts `args` inside the namespace; its stdout and stderr are captured into `logs`.
    fn spawn(&self, args: &[&str], logs: &Arc<Logs>) -> Running {
        let mut child = self
            .exec(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        capture(child.stdout.take().unwrap(), logs.clone());
        capture(child.stderr.take().unwrap(), logs.clone());
        Running(child)
    }
}

#[test]
fn unmodified_clients_in_a_namespace_go_through_the_connector_and_the_policy() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let dev_dir = dir.path().join("dev");
    // `nobody` must read the MITM CA the clients trust.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bin = bin();
    let bin = bin.to_str().unwrap();

    let dev_logs = Arc::new(Logs::default());
    let _dev = ns.spawn(
        &[
            bin,
            "dev",
            "--dir",
            dev_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:8443",
            "--admin-listen",
            "127.0.0.1:9901",
        ],
        &dev_logs,
    );
    dev_logs.wait_for("dev to be ready", |l| l.contains("Ctrl-C to stop"));
    let port: u16 = dev_logs
        .lines()
        .iter()
        .find_map(|l| {
            let at = l.find("https://localhost:")? + "https://localhost:".len();
            l[at..].split('/').next()?.parse().ok()
        })
        .expect("the demo upstream's port in dev's output");
    let pem = |f: &str| dev_dir.join(f).display().to_string();
    std::fs::set_permissions(
        &dev_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        dev_dir.join("mitm-ca.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();

    let conn_logs = Arc::new(Logs::default());
    let _connector = ns.spawn(
        &[
            bin,
            "connect",
            "--transparent",
            "--upstream",
            "https://127.0.0.1:8443",
            "--svid",
            &pem("agent.pem"),
            "--svid-key",
            &pem("agent.key"),
            "--bundle",
            &pem("trust-ca.pem"),
            "--listen",
            "127.0.0.1:15001",
        ],
        &conn_logs,
    );
    conn_logs.wait_for("the connector", |l| l.contains("connector listening"));

    // The rules, exactly as printed, applied in the namespace (root's traffic is exempt: the
    // connector and the central proxy run as root here).
    let rules = Command::new(bin)
        .args([
            "connect",
            "--print-rules",
            "--listen",
            "127.0.0.1:15001",
            "--uid",
            "0",
        ])
        .output()
        .unwrap();
    assert!(rules.status.success());
    let rules_file = dir.path().join("rules.nft");
    std::fs::write(&rules_file, &rules.stdout).unwrap();
    let applied = ns
        .exec(&["nft", "-f", rules_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(applied.status.success(), "{applied:?}");

    let url = format!("https://localhost:{port}/hello");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // curl, no proxy settings: through the connector, the central proxy's MITM, the policy.
    let (code, body, err) = run(&mut ns.as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "20",
        "--cacert",
        &pem("mitm-ca.pem"),
        &url,
    ]));
    assert_eq!(code, Some(0), "{body} {err}");
    assert!(
        body.contains("hello from the Portcullis demo upstream"),
        "{body}"
    );
    // Python's urllib (Debian's python3, readable by nobody).
    let py = format!(
        "import ssl, urllib.request\n\
         ctx = ssl.create_default_context(cafile={:?})\n\
         r = urllib.request.urlopen({url:?}, context=ctx, timeout=20)\n\
         print(r.status, r.read().decode())\n",
        pem("mitm-ca.pem")
    );
    let (code, body, err) = run(&mut ns.as_nobody(&["/usr/bin/python3", "-c", &py]));
    assert_eq!(code, Some(0), "{body} {err}");
    assert!(body.starts_with("200 "), "{body} {err}");
    // Node's fetch (undici), trusting the MITM CA through NODE_EXTRA_CA_CERTS only.
    let ca_env = format!("NODE_EXTRA_CA_CERTS={}", pem("mitm-ca.pem"));
    let js = format!("fetch({url:?}).then(async r => console.log(r.status, await r.text()))");
    let (code, body, err) = run(&mut ns.as_nobody(&["env", &ca_env, "node", "-e", &js]));
    assert_eq!(code, Some(0), "{body} {err}");
    assert!(body.starts_with("200 "), "{body} {err}");

    // Each of the three was decided for the agent's identity, per request.
    let deadline = Instant::now() + WAIT;
    let decided = || {
        dev_logs
            .lines()
            .iter()
            .filter(|l| {
                l.contains("\"kind\":\"http\"")
                    && l.contains("\"path\":\"/hello\"")
                    && l.contains("spiffe://dev.portcullis/agent/demo")
                    && l.contains("\"decision\":\"allow\"")
            })
            .count()
    };
    while decided() < 3 && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(decided(), 3, "{:#?}", dev_logs.lines());

    // A destination the policy denies (dev's policy: 127.0.0.2 is not the agent's): fails.
    let denied = format!("https://127.0.0.2:{port}/hello");
    let (code, body, _) = run(&mut ns.as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "20",
        "--cacert",
        &pem("mitm-ca.pem"),
        &denied,
    ]));
    assert_ne!(code, Some(0), "{body}");
    dev_logs.wait_for("the denied CONNECT", |l| {
        l.contains("\"destination\":\"127.0.0.2:") && l.contains("\"decision\":\"deny\"")
    });
    conn_logs.wait_for("the connector's refusal", |l| {
        l.contains("refused the redirected connection") && l.contains("127.0.0.2")
    });

    // Plain HTTP is named by its Host: a server in the namespace, reached through the proxy;
    // a plain client refused by the policy reads the proxy's own answer.
    let (_http, http_logs) = ns.http_server("127.0.0.1", "8080");
    let (code, status, err) = run(&mut ns.status_of("http://localhost:8080/plain"));
    assert_eq!((code, status.as_str()), (Some(0), "404"), "{err}");
    http_logs.wait_for("the plain request", |l| l.contains("GET /plain HTTP/1.1"));
    dev_logs.wait_for("the plain request's decision", |l| {
        l.contains("\"path\":\"/plain\"") && l.contains("\"decision\":\"allow\"")
    });
    let (_, body, err) = run(&mut ns.as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "20",
        "http://127.0.0.2:8080/plain",
    ]));
    assert!(body.contains("\"error\":\"policy_denied\""), "{body} {err}");

    // IPv6 is captured too (the connector also listens on [::1]): a server on ::1, named by
    // its literal, decided by the proxy (dev's policy lists localhost and 127.0.0.1, not ::1:
    // the client reads the proxy's 403, and the server sees nothing).
    let (_v6, v6_logs) = ns.http_server("::1", "8081");
    let (code, status, err) = run(&mut ns.status_of("http://[::1]:8081/six"));
    assert_eq!((code, status.as_str()), (Some(0), "403"), "{err}");
    dev_logs.wait_for("the IPv6 CONNECT's decision", |l| {
        l.contains("\"destination\":\"[::1]:8081\"")
            && l.contains("\"kind\":\"connect\"")
            && l.contains("\"decision\":\"deny\"")
    });
    assert!(!v6_logs.lines().iter().any(|l| l.contains("GET /six")));

    // No way around it: UDP is dropped, and dialling the connector itself is refused.
    let udp = "import socket\n\
               s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
               try:\n    s.sendto(b'x', ('127.0.0.1', 9999)); print('sent')\n\
               except PermissionError:\n    print('blocked')\n";
    let (_, out, err) = run(&mut ns.as_nobody(&["/usr/bin/python3", "-c", udp]));
    assert_eq!(out.trim(), "blocked", "{err}");
    let (code, _, _) =
        run(&mut ns.as_nobody(&["curl", "-sS", "--max-time", "10", "http://127.0.0.1:15001/"]));
    assert_ne!(code, Some(0));
    conn_logs.wait_for("the refusal of a direct dial", |l| {
        l.contains("made to the transparent listener itself")
    });
}
