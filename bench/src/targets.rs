//! The targets: direct and each proxy, started side by side in a topology's proxy namespace,
//! each on its own public ports.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use std::fmt::Write as _;

use anyhow::{Context as _, Result, bail};
use tests::Scratch;

use crate::topo::{SERVICES, Topology};

/// The daemon under test, and arguments added to each `spliced run`.
pub struct SplicedCmd {
    pub bin: PathBuf,
    pub extra: Vec<String>,
}

/// What a client connects to.
pub struct Target {
    pub name: &'static str,
    /// Where the load generator connects (the first of [`SERVICES`]).
    pub addr: SocketAddr,
    /// Where each of [`SERVICES`] is reached through this target.
    pub addrs: Vec<SocketAddr>,
    /// The process whose CPU time is the proxy's (with its children), if any.
    pub pid: Option<u32>,
    /// Resident memory of its process tree once it listened, KiB.
    pub rss_at_start_kib: f64,
    children: Vec<Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SIGTERM first: spliced detaches its programs and nginx removes its pid file.
            // SAFETY: kill on a child we own.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut exited = false;
            while !exited && Instant::now() < deadline {
                exited = c.try_wait().ok().flatten().is_some();
                if !exited {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if !exited {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The public port of service `k` on target `i`.
fn public_port(k: usize, i: usize) -> u16 {
    10_000 + 100 * k as u16 + i as u16
}

/// Every target name, in the order they are measured in each round.
pub const TARGETS: &[&str] = &["direct", "sockmap", "copy", "haproxy", "nginx", "socat"];

/// Starts target `name` in the topology's proxy namespace, on its own port.
pub fn start_target(
    name: &'static str,
    topo: &Topology,
    spliced: &SplicedCmd,
    dir: &Scratch,
) -> Result<Target> {
    let index = TARGETS
        .iter()
        .position(|t| *t == name)
        .context("unknown target")?;
    if name == "direct" {
        return Ok(Target {
            name,
            addr: topo.backend_addr,
            addrs: SERVICES
                .iter()
                .map(|(_, p)| SocketAddr::new(topo.backend_addr.ip(), *p))
                .collect(),
            pid: None,
            rss_at_start_kib: 0.0,
            children: Vec::new(),
        });
    }
    let addrs: Vec<SocketAddr> = (0..SERVICES.len())
        .map(|k| SocketAddr::new(topo.public_ip, public_port(k, index)))
        .collect();
    let file = |n: &str| -> PathBuf { dir.0.join(format!("{}-{name}-{n}", topo.name)) };
    let mut target = Target {
        name,
        addr: addrs[0],
        addrs: addrs.clone(),
        pid: None,
        rss_at_start_kib: 0.0,
        children: Vec::new(),
    };
    for (i, mut cmd) in commands(name, topo, &addrs, spliced, &file)?
        .into_iter()
        .enumerate()
    {
        let log = std::fs::File::create(file(&format!("{i}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        target.pid.get_or_insert(child.id());
        target.children.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for &listen in &addrs {
        loop {
            let ok = topo.client.run(move || {
                TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok()
            });
            if ok {
                break;
            }
            if let Some(st) = target
                .children
                .iter_mut()
                .find_map(|c| c.try_wait().ok().flatten())
            {
                let log = std::fs::read_to_string(file("0.log")).unwrap_or_default();
                bail!("{name} exited at start ({st}): {log}");
            }
            if Instant::now() > deadline {
                bail!("{name} did not start listening on {listen}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    target.rss_at_start_kib = crate::machine::tree_rss_kib(target.pid.unwrap_or(0));
    Ok(target)
}

/// spliced's fly.toml: one service per (public, backend) pair, on one machine.
fn spliced_config(pairs: &[(SocketAddr, SocketAddr)], backend_ip: IpAddr) -> String {
    let mut text = String::from("app = \"bench\"\n");
    for (listen, backend) in pairs {
        let _ = write!(
            text,
            "\n[[services]]\n  internal_port = {}\n  port = {}\n",
            backend.port(),
            listen.port()
        );
    }
    let _ = write!(
        text,
        "\n[[machines]]\n  id = \"backend\"\n  address = \"{backend_ip}\"\n"
    );
    text
}

/// The commands that run proxy `name` on `addrs` (one per [`SERVICES`]), with configs
/// written by `file`.
fn commands(
    name: &str,
    topo: &Topology,
    addrs: &[SocketAddr],
    spliced: &SplicedCmd,
    file: &dyn Fn(&str) -> PathBuf,
) -> Result<Vec<Command>> {
    let backend_ip = topo.backend_addr.ip();
    let pairs: Vec<(SocketAddr, SocketAddr)> = addrs
        .iter()
        .zip(SERVICES)
        .map(|(a, (_, p))| (*a, SocketAddr::new(backend_ip, *p)))
        .collect();
    let netns = || {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.proxy.name]);
        cmd
    };
    let mut cmd = netns();
    match name {
        "sockmap" | "copy" => {
            let config = file("fly.toml");
            std::fs::write(&config, spliced_config(&pairs, backend_ip))?;
            cmd.arg(&spliced.bin)
                .args(["run", "--config"])
                .arg(&config)
                .args(["--dataplane", name])
                .arg("--listen-addr")
                .arg(topo.public_ip.to_string())
                .args(&spliced.extra)
                .env("RUST_LOG", "warn");
        }
        "haproxy" => {
            // mode tcp with splice(2) both ways; everything else at HAProxy's defaults
            // (threads: one per CPU). Timeouts long enough never to fire during a run.
            // maxconn fits the machine's open-file limit (two descriptors per connection,
            // two per splice pipe).
            let config = file("haproxy.cfg");
            let mut text = String::from(
                "global\n  maxconn 9000\n  maxpipes 500\n\ndefaults\n  mode tcp\n  \
                 timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n  \
                 option splice-auto\n",
            );
            for (k, (listen, backend)) in pairs.iter().enumerate() {
                let _ = write!(
                    text,
                    "\nfrontend f{k}\n  bind {listen}\n  default_backend b{k}\n\n\
                     backend b{k}\n  server s1 {backend}\n"
                );
            }
            std::fs::write(&config, text)?;
            cmd.args(["haproxy", "-db", "-f"]).arg(&config);
        }
        "nginx" => {
            // The stream module, one worker per CPU, proxy_buffer_size 64k (the copy plane's
            // buffer, four times nginx's default), and proxy_half_close on: without it nginx
            // closes both sides at the client's FIN and the reply is lost, as every other
            // target passes the FIN on.
            let config = file("nginx.conf");
            let mut servers = String::new();
            for (listen, backend) in &pairs {
                let _ = write!(
                    servers,
                    " server {{ listen {listen} backlog=8192; proxy_pass {backend}; \
                     proxy_buffer_size 64k; proxy_half_close on; }}"
                );
            }
            std::fs::write(
                &config,
                format!(
                    "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                     worker_processes auto;\nworker_rlimit_nofile 20000;\ndaemon off;\n\
                     pid {};\nerror_log {} warn;\n\
                     events {{ worker_connections 19900; }}\nstream {{{servers} }}\n",
                    file("nginx.pid").display(),
                    file("nginx.log").display()
                ),
            )?;
            cmd.args(["nginx", "-c"]).arg(&config);
        }
        "socat" => {
            // socat's own model: one forked process per connection; one listener per port.
            let mut all = Vec::new();
            for (listen, backend) in &pairs {
                let mut c = netns();
                c.args([
                    "socat".to_owned(),
                    format!(
                        "TCP-LISTEN:{},bind={},fork,reuseaddr,backlog=8192,nodelay",
                        listen.port(),
                        listen.ip()
                    ),
                    format!("TCP:{backend},nodelay"),
                ]);
                all.push(c);
            }
            return Ok(all);
        }
        _ => bail!("unknown target {name}"),
    }
    Ok(vec![cmd])
}
