//! The registry: time from a change in etcd to the first connection each edge routes by it.
//! Two edges follow a three-member etcd cluster; the hosts (etcd, the edges, two machines, the
//! client) are namespaces behind one router, as in the registry's tests. Each round moves
//! machine `m` to the other host with one `spliced registry put-machine`; the clock starts
//! when that command starts and stops, per edge, at the first connection that reaches the new
//! host (tried every half millisecond).

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tests::{
    Netns, Scratch, Server,
    registry::{Etcd, Fabric},
};

use crate::Sample;

const PORT: u16 = 19601;
const INTERNAL: u16 = 19611;

/// An edge, stopped when dropped.
struct Edge {
    child: Child,
    addr: Ipv4Addr,
    _ns: Netns,
}

impl Drop for Edge {
    fn drop(&mut self) {
        // SAFETY: kill on the pid of our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// A host that says its name, then echoes.
fn named(name: &'static str) -> impl Fn(TcpStream) + Send + Sync + 'static {
    move |mut s: TcpStream| {
        if s.write_all(format!("{name}\n").as_bytes()).is_ok() {
            tests::echo(s);
        }
    }
}

/// The host a new connection to `edge` reaches.
fn reached(edge: Ipv4Addr) -> Option<String> {
    let s = TcpStream::connect_timeout(&SocketAddr::new(edge.into(), PORT), Duration::from_secs(1))
        .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some(line.trim().to_owned())
}

fn registry(client: &Netns, spliced: &Path, url: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", &client.name])
        .arg(spliced)
        .args(["registry", "--registry", url])
        .args(args)
        .output()
        .context("spliced registry")?;
    if !out.status.success() {
        bail!(
            "spliced registry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Per edge, milliseconds from `started` until a connection through it reaches `want`.
fn until_reached(
    client: &Netns,
    edges: Vec<Ipv4Addr>,
    want: &'static str,
    started: Instant,
) -> Result<Vec<f64>> {
    client.run(move || {
        let mut took: Vec<Option<f64>> = vec![None; edges.len()];
        while took.iter().any(Option::is_none) {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("an edge did not route to {want} within 10 s: {took:?}");
            }
            for (i, &e) in edges.iter().enumerate() {
                if took[i].is_none() && reached(e).as_deref() == Some(want) {
                    took[i] = Some(started.elapsed().as_secs_f64() * 1e3);
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(took.into_iter().flatten().collect())
    })
}

/// `rounds` samples of each edge's time.
pub fn run(spliced: &Path, rounds: usize, dir: &Scratch) -> Result<Vec<Sample>> {
    let fabric = Fabric::new();
    let (reg, reg_addr) = fabric.host("etcd");
    let etcd = Etcd::start(reg, reg_addr);
    let url = etcd.url(&[0, 1, 2], "bench");
    let (client, _) = fabric.host("cli");
    let hosts: Vec<(Server, Netns, Ipv4Addr)> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let (ns, addr) = fabric.host(name);
            let server = Server::start(&ns, SocketAddr::new(addr.into(), INTERNAL), named(name));
            (server, ns, addr)
        })
        .collect();
    let file = dir.0.join("registry.toml");
    std::fs::write(
        &file,
        format!(
            "[[services]]\n  internal_port = {INTERNAL}\n  [[services.ports]]\n    port = {PORT}\n"
        ),
    )?;
    let file = file.to_str().context("a UTF-8 path")?.to_owned();
    registry(&client, spliced, &url, &["put-config", "bench", &file])?;
    let host_addr = |i: usize| hosts[i].2.to_string();
    registry(
        &client,
        spliced,
        &url,
        &["put-machine", "bench", "m", "--address", &host_addr(0)],
    )?;
    let mut edges = Vec::new();
    for i in 0..2 {
        let (ns, addr) = fabric.host(&format!("edge{i}"));
        let log = std::fs::File::create(dir.0.join(format!("registry-edge{i}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(spliced)
            .args(["run", "--dataplane", "sockmap", "--registry", &url])
            .args(["--listen-addr", &addr.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start an edge for the registry workload")?;
        edges.push(Edge {
            child,
            addr,
            _ns: ns,
        });
    }
    let addrs: Vec<Ipv4Addr> = edges.iter().map(|e| e.addr).collect();
    until_reached(&client, addrs.clone(), "a", Instant::now())?;
    let mut out = Vec::new();
    for round in 0..rounds {
        let to = (round + 1) % 2;
        let want = ["a", "b"][to];
        let started = Instant::now();
        let moved = registry(
            &client,
            spliced,
            &url,
            &["put-machine", "bench", "m", "--address", &host_addr(to)],
        )
        .and_then(|()| until_reached(&client, addrs.clone(), want, started));
        let (figures, error) = match moved {
            Ok(ms) => (
                ms.iter()
                    .enumerate()
                    .map(|(i, v)| (format!("edge {i} ms"), *v))
                    .collect(),
                None,
            ),
            Err(e) => (std::collections::BTreeMap::new(), Some(format!("{e:#}"))),
        };
        out.push(Sample {
            topology: "fleet",
            workload: "registry change".to_owned(),
            target: "sockmap",
            round,
            figures,
            error,
        });
    }
    drop(edges);
    drop(etcd);
    Ok(out)
}
