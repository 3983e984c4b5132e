//! Machines on demand: time from connect to the first byte back when the machine is stopped
//! (spliced starts its process), suspended (spliced sends SIGCONT) and running, through a
//! spliced of its own in the topology's proxy namespace whose machines are this binary's
//! echo backend (`spliced-bench --backend ADDR`) run by spliced.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tests::Scratch;

use crate::{Sample, topo::Topology};

/// Public ports of the three services: a machine stopped when idle, one suspended, one kept.
const PORTS: [u16; 3] = [19501, 19502, 19503];
/// Their machines' ports.
const INTERNAL: [u16; 3] = [19511, 19512, 19513];
const KINDS: [&str; 3] = ["stop", "suspend", "off"];
const FIGURES: [&str; 3] = ["stopped ms", "suspended ms", "running ms"];

/// A spliced serving the three services, stopped when dropped.
struct Edge {
    child: Child,
    admin: PathBuf,
}

impl Drop for Edge {
    fn drop(&mut self) {
        // SIGTERM: spliced stops the machines it runs before it exits.
        // SAFETY: kill on the pid of our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn config(bench: &Path) -> String {
    let mut c = String::from("app = \"cold-start\"\n\n[processes]\n");
    for kind in KINDS {
        let _ = writeln!(c, "  {kind} = \"backend\"");
    }
    for ((port, internal), kind) in PORTS.iter().zip(INTERNAL).zip(KINDS) {
        let _ = write!(
            c,
            "\n[[services]]\n  internal_port = {internal}\n  protocol = \"tcp\"\n  processes = [\"{kind}\"]\n  auto_stop_machines = \"{kind}\"\n  [[services.ports]]\n    port = {port}\n"
        );
    }
    for (internal, kind) in INTERNAL.iter().zip(KINDS) {
        let _ = write!(
            c,
            "\n[[machines]]\n  id = \"{kind}\"\n  processes = [\"{kind}\"]\n  command = [\"{}\", \"--backend\", \"127.0.0.1:{internal}\"]\n",
            bench.display()
        );
    }
    c
}

fn state(admin: &Path, machine: &str) -> Option<String> {
    let mut s = std::os::unix::net::UnixStream::connect(admin).ok()?;
    std::io::Write::write_all(&mut s, b"snapshot\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["machines"]
        .as_array()?
        .iter()
        .find(|m| m["id"] == machine)?["state"]
        .as_str()
        .map(str::to_owned)
}

fn wait_state(admin: &Path, machine: &str, want: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if state(admin, machine).as_deref() == Some(want) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("machine {machine} not {want} within 10 s")
}

/// Connect, ask for an echo of one byte, and time the answer.
fn first_byte(addr: SocketAddr) -> Result<f64> {
    let started = Instant::now();
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(15)))?;
    c.write_all(b"Ex")?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b)?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if b != *b"x" {
        bail!("echo answered {b:?}");
    }
    Ok(ms)
}

/// `rounds` samples of each figure, on `topo`'s proxy namespace, the client on loopback there.
pub fn run(topo: &Topology, spliced: &Path, rounds: usize, dir: &Scratch) -> Result<Vec<Sample>> {
    let bench = std::env::current_exe().context("the bench's own path")?;
    let file = dir.0.join("cold-start.toml");
    std::fs::write(&file, config(&bench))?;
    let admin = dir.0.join("cold-start.sock");
    let log = std::fs::File::create(dir.0.join("cold-start.log"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &topo.proxy.name])
        .arg(spliced)
        .args(["run", "--dataplane", "sockmap", "--config"])
        .arg(&file)
        .args(["--listen-addr", "127.0.0.1", "--autostop-interval", "100ms"])
        .arg("--admin-socket")
        .arg(&admin)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start spliced for the cold-start workload")?;
    let edge = Edge { child, admin };
    wait_state(&edge.admin, "off", "started")?;
    // Every machine runs once, so that the suspended one has a process to suspend.
    for port in PORTS {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        topo.proxy.run(move || first_byte(addr))?;
    }
    let mut out = Vec::new();
    for round in 0..rounds {
        let mut figures = std::collections::BTreeMap::new();
        let mut error = None;
        for ((port, kind), figure) in PORTS.iter().zip(KINDS).zip(FIGURES) {
            let idle = match kind {
                "stop" => "stopped",
                "suspend" => "suspended",
                _ => "started",
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], *port));
            let ms = wait_state(&edge.admin, kind, idle)
                .and_then(|()| topo.proxy.run(move || first_byte(addr)));
            match ms {
                Ok(ms) => {
                    figures.insert(figure.to_owned(), ms);
                }
                Err(e) => error = Some(format!("{figure}: {e:#}")),
            }
        }
        out.push(Sample {
            topology: topo.name,
            workload: "cold start".to_owned(),
            target: "sockmap",
            round,
            figures,
            error,
        });
    }
    Ok(out)
}
