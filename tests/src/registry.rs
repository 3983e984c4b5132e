//! A small fleet for the registry's tests: hosts in network namespaces joined by a router
//! namespace (each host on a /24 of its own behind it), and a three-member etcd cluster (the
//! Debian package's binary) on one of them.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU8, Ordering},
    time::{Duration, Instant},
};

use crate::{Netns, Scratch, sh, spliced_bin, veth};

/// A router namespace every host hangs off.
pub struct Fabric {
    pub router: Netns,
    next: AtomicU8,
}

impl Fabric {
    pub fn new() -> Self {
        let router = Netns::new("fab");
        sh(&[
            "ip",
            "netns",
            "exec",
            &router.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        Self {
            router,
            next: AtomicU8::new(1),
        }
    }

    /// A new host: its namespace and its address (10.90.K.2, routed through 10.90.K.1).
    pub fn host(&self, tag: &str) -> (Netns, Ipv4Addr) {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let ns = Netns::new(tag);
        veth(
            (&ns, "e0", &[&format!("10.90.{k}.2/24")]),
            (
                &self.router,
                &format!("f{k}"),
                &[&format!("10.90.{k}.1/24")],
            ),
        );
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "route",
            "add",
            "default",
            "via",
            &format!("10.90.{k}.1"),
        ]);
        (ns, Ipv4Addr::new(10, 90, k, 2))
    }
}

impl Default for Fabric {
    fn default() -> Self {
        Self::new()
    }
}

/// One etcd member.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A three-member etcd cluster in one namespace, each member on ports of its own.
pub struct Etcd {
    pub ns: Netns,
    pub addr: Ipv4Addr,
    members: Vec<Member>,
    dir: Scratch,
    /// With TLS to clients: the directory of `ca.pem`, `server.pem`/`.key` and the
    /// `client.pem`/`.key` etcdctl presents.
    tls: Option<PathBuf>,
    /// `user:password` etcdctl gives once authentication is on.
    root: Option<String>,
}

impl Etcd {
    /// Starts the cluster on `ns` at `addr` and waits until every member is healthy.
    pub fn start(ns: Netns, addr: Ipv4Addr) -> Self {
        Self::start_with(ns, addr, None)
    }

    /// [`Etcd::start`]; with `tls`, clients must talk TLS and present a certificate of the CA
    /// whose files are in that directory (see [`Etcd`]'s `tls`).
    pub fn start_with(ns: Netns, addr: Ipv4Addr, tls: Option<PathBuf>) -> Self {
        let members = (0..3)
            .map(|i| Member {
                name: format!("e{i}"),
                client: 2379 + 10 * i,
                peer: 2380 + 10 * i,
                child: None,
            })
            .collect();
        let mut etcd = Self {
            ns,
            addr,
            members,
            dir: Scratch::new(),
            tls,
            root: None,
        };
        for i in 0..3 {
            etcd.launch(i, "new");
        }
        etcd.wait_healthy(&[0, 1, 2]);
        etcd
    }

    fn launch(&mut self, i: usize, state: &str) {
        let a = self.addr;
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{a}:{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let data = self.dir.0.join(&m.name);
        let log =
            std::fs::File::create(self.dir.0.join(format!("{}.log", m.name))).expect("etcd log");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns.name,
            "etcd",
            "--name",
            &m.name,
            "--data-dir",
        ])
        .arg(&data);
        if let Some(dir) = &self.tls {
            cmd.arg("--cert-file")
                .arg(dir.join("server.pem"))
                .arg("--key-file")
                .arg(dir.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(dir.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args([
                "--listen-client-urls",
                &format!("{scheme}://{a}:{}", m.client),
                "--advertise-client-urls",
                &format!("{scheme}://{a}:{}", m.client),
                "--listen-peer-urls",
                &format!("http://{a}:{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{a}:{}", m.peer),
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                "spliced-test",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .expect("etcd starts (Debian's etcd-server)");
        self.members[i].child = Some(child);
    }

    /// The client endpoint of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("{}:{}", self.addr, self.members[i].client)
    }

    /// `etcd://` URL of members `members` with `prefix`.
    pub fn url(&self, members: &[usize], prefix: &str) -> String {
        let hosts: Vec<String> = members.iter().map(|&i| self.endpoint(i)).collect();
        format!("etcd://{}/{prefix}", hosts.join(","))
    }

    /// Runs etcdctl against members `members`.
    pub fn etcdctl(&self, members: &[usize], args: &[&str]) -> Output {
        let hosts: Vec<String> = members.iter().map(|&i| self.endpoint(i)).collect();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.name, "etcdctl", "--endpoints"])
            .arg(hosts.join(","));
        if let Some(dir) = &self.tls {
            cmd.arg("--cacert")
                .arg(dir.join("ca.pem"))
                .arg("--cert")
                .arg(dir.join("client.pem"))
                .arg("--key")
                .arg(dir.join("client.key"));
        }
        if let Some(root) = &self.root {
            cmd.args(["--user", root]);
        }
        cmd.args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("etcdctl runs")
    }

    fn wait_healthy(&self, members: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.etcdctl(members, &["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Turns authentication on, with `root:password` for etcdctl from then on.
    pub fn enable_auth(&mut self, password: &str) {
        let root = format!("root:{password}");
        for args in [vec!["user", "add", &root], vec!["auth", "enable"]] {
            let out = self.etcdctl(&[0], &args);
            assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
        }
        self.root = Some(root);
    }

    /// Kills member `i` at once (SIGKILL), as when its host dies.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.launch(i, "existing");
    }

    /// Waits until members `members` answer.
    pub fn healthy(&self, members: &[usize]) {
        self.wait_healthy(members);
    }

    /// The members' logs, for a failure's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let log = std::fs::read_to_string(self.dir.0.join(format!("{}.log", m.name)))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            let _ = writeln!(out, "--- etcd {} ---", m.name);
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// `spliced registry --registry URL ARGS...` run in `ns`; panics with its output when it fails.
pub fn registry_cmd(ns: &Netns, url: &str, args: &[&str]) -> String {
    let out = registry_output(ns, url, args);
    assert!(
        out.status.success(),
        "spliced registry {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `spliced registry --registry URL ARGS...` run in `ns`, as it ended.
pub fn registry_output(ns: &Netns, url: &str, args: &[&str]) -> Output {
    registry_output_env(ns, &[], url, args)
}

/// [`registry_output`] with `env` (`NAME=value`) added to its environment.
pub fn registry_output_env(ns: &Netns, env: &[&str], url: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", &ns.name, "env"])
        .args(env)
        .arg(spliced_bin())
        .args(["registry", "--registry", url])
        .args(args)
        .output()
        .expect("spliced registry runs")
}

/// `spliced registry put-machine ... --lease TTL` running in `ns` until killed.
pub fn leased_machine(ns: &Netns, url: &str, args: &[&str], ttl: &str) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(spliced_bin())
        .args(["registry", "--registry", url, "put-machine"])
        .args(args)
        .args(["--lease", ttl])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spliced registry put-machine runs")
}
