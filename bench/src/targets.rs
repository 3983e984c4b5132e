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

use crate::topo::{SERVICES, Topology, terminated};

/// The name the TLS-terminating targets' certificate is for.
pub const TLS_NAME: &str = "bench.test";

/// The certificate every TLS-terminating target serves, and the CA its clients trust.
pub struct TlsFiles {
    /// The certificate with its key after it; named `default` so that spliced serves it
    /// whatever name a client asks for (or none, as wrk).
    pub pem: PathBuf,
    /// The directory `spliced run --certs` reads.
    pub dir: PathBuf,
    pub ca_pem: String,
}

impl TlsFiles {
    pub fn new(scratch: &Scratch) -> Result<Self> {
        let dir = scratch.0.join("certs");
        std::fs::create_dir_all(&dir)?;
        let ca = tests::tls::TestCa::new(&scratch.0);
        ca.issue(&dir, "default", "bench", &[TLS_NAME], false);
        Ok(Self {
            pem: dir.join("default.pem"),
            dir,
            ca_pem: ca.pem,
        })
    }
}

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
    /// The cgroup of its own that spliced runs in, removed once it has exited.
    cgroup: Option<PathBuf>,
    /// spliced's admin socket.
    admin: Option<PathBuf>,
}

/// What spliced's kernel plane did, from its admin snapshot: the figures a bench sample
/// reports as differences.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelWork {
    /// Bytes the daemon moved itself instead of the kernel.
    pub userspace_moved: f64,
    /// Holds set, and events that woke the daemon (check points and drained holds).
    pub holds: f64,
    pub wakeups: f64,
}

impl Target {
    /// spliced's kernel counters now; `None` for other targets and the copy plane.
    pub fn kernel_work(&self) -> Option<KernelWork> {
        use std::io::Read as _;
        let mut s = std::os::unix::net::UnixStream::connect(self.admin.as_ref()?).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let k = v.get("kernel").filter(|k| !k.is_null())?;
        let sum = |field: &str| -> f64 {
            k["services"]
                .as_array()
                .map_or(0.0, |s| s.iter().filter_map(|c| c[field].as_f64()).sum())
        };
        Some(KernelWork {
            userspace_moved: k["userspace_moved_bytes"].as_f64()?,
            holds: k["holds"].as_f64()?,
            wakeups: sum("flow_events") + sum("drain_events"),
        })
    }
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
        if let Some(dir) = &self.cgroup {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted, if it is.
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // mountinfo: id parent major:minor root mount-point options... - fstype source options
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (right.split_whitespace().next() == Some("cgroup2") && root == "/")
            .then(|| PathBuf::from(point))
    })
}

/// Runs `cmd` in a new cgroup of its own: spliced attaches its hold program to its own
/// cgroup, and in a shared one every other target's connections would run it too. Returns
/// the wrapped command and the cgroup; `cmd` unchanged where no cgroup v2 is mounted.
fn in_own_cgroup(cmd: Command, name: &str) -> Result<(Command, Option<PathBuf>)> {
    let Some(root) = cgroup2_mount() else {
        eprintln!(
            "[bench] no cgroup v2 mounted: {name} shares its cgroup, and every target's \
             connections run its hold program's callbacks"
        );
        return Ok((cmd, None));
    };
    let dir = root.join(format!("spliced-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut wrapped = Command::new("sh");
    wrapped
        .args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
        .arg(dir.join("cgroup.procs"))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            wrapped.env(k, v);
        }
    }
    Ok((wrapped, Some(dir)))
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
    tls: &TlsFiles,
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
            cgroup: None,
            admin: None,
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
        cgroup: None,
        admin: matches!(name, "sockmap" | "copy").then(|| file("admin.sock")),
    };
    for (i, cmd) in commands(name, topo, &addrs, spliced, tls, &file)?
        .into_iter()
        .enumerate()
    {
        let mut cmd = if matches!(name, "sockmap" | "copy") {
            let (cmd, cgroup) = in_own_cgroup(cmd, &format!("{}-{name}", topo.name))?;
            target.cgroup = cgroup;
            cmd
        } else {
            cmd
        };
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

/// spliced's fly.toml: one service per (public, backend) pair, on one machine, with the
/// handlers the service's name asks for.
fn spliced_config(pairs: &[(SocketAddr, SocketAddr)], backend_ip: IpAddr) -> String {
    let mut text = String::from("app = \"bench\"\n");
    for ((listen, backend), (name, _)) in pairs.iter().zip(SERVICES) {
        let (tls, http) = terminated(name);
        let handlers: Vec<&str> = [(tls, "\"tls\""), (http, "\"http\"")]
            .iter()
            .filter_map(|(on, h)| on.then_some(*h))
            .collect();
        let _ = write!(
            text,
            "\n[[services]]\n  internal_port = {}\n  [[services.ports]]\n    port = {}\n    handlers = [{}]\n",
            backend.port(),
            listen.port(),
            handlers.join(", ")
        );
    }
    let _ = write!(
        text,
        "\n[[machines]]\n  id = \"backend\"\n  address = \"{backend_ip}\"\n"
    );
    text
}

/// `HAProxy`'s configuration for `pairs` (one per [`SERVICES`]).
fn haproxy_config(pairs: &[(SocketAddr, SocketAddr)], tls: &TlsFiles) -> String {
    let mut text = String::from(
        "global\n  maxconn 8200\n  maxpipes 1000\n  tune.bufsize 65536\n\n\
         defaults\n  mode tcp\n  \
         timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n  \
         option splice-auto\n",
    );
    // Terminated services: TLS with `ssl crt`, HTTP in `mode http` with keep-alive to
    // the server and X-Forwarded-For, as spliced adds its forwarding headers.
    let pem = tls.pem.display();
    for (k, ((listen, backend), (name, _))) in pairs.iter().zip(SERVICES).enumerate() {
        let (ssl, http) = terminated(name);
        let bind = if ssl {
            format!("{listen} ssl crt {pem} alpn h2,http/1.1")
        } else {
            listen.to_string()
        };
        let mode = if http {
            "  mode http\n  option forwardfor\n"
        } else {
            ""
        };
        let _ = write!(
            text,
            "\nfrontend f{k}\n  bind {bind}\n{mode}  default_backend b{k}\n\n\
             backend b{k}\n{mode}  server s1 {backend}\n"
        );
    }
    text
}

/// nginx's configuration for `pairs` (one per [`SERVICES`]), its files named by `file`.
fn nginx_config(
    pairs: &[(SocketAddr, SocketAddr)],
    tls: &TlsFiles,
    file: &dyn Fn(&str) -> PathBuf,
) -> Result<String> {
    // Terminated services: `ssl` in the stream module for TLS alone; the http module
    // for HTTP, with keep-alive to the server and X-Forwarded-For.
    let pem = tls.pem.display();
    let ssl_files = format!("ssl_certificate {pem}; ssl_certificate_key {pem};");
    let mut servers = String::new();
    let mut http_servers = String::new();
    for (k, ((listen, backend), (name, _))) in pairs.iter().zip(SERVICES).enumerate() {
        match terminated(name) {
            (ssl, false) => {
                let (flag, files) = if ssl {
                    (" ssl", ssl_files.as_str())
                } else {
                    ("", "")
                };
                let _ = write!(
                    servers,
                    " server {{ listen {listen}{flag} backlog=8192; {files} proxy_pass {backend}; \
                     proxy_buffer_size 64k; proxy_half_close on; }}"
                );
            }
            (ssl, true) => {
                let (flag, files) = if ssl {
                    (" ssl http2", ssl_files.as_str())
                } else {
                    ("", "")
                };
                let _ = write!(
                    http_servers,
                    " upstream u{k} {{ server {backend}; keepalive 64; }} \
                     server {{ listen {listen}{flag} backlog=8192; {files} location / {{ \
                     proxy_pass http://u{k}; proxy_http_version 1.1; \
                     proxy_set_header Connection \"\"; \
                     proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }}"
                );
            }
        }
    }
    let temp = file("nginx-temp");
    std::fs::create_dir_all(&temp)?;
    let t = temp.display();
    Ok(format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
             worker_processes auto;\nworker_rlimit_nofile 20000;\ndaemon off;\n\
             pid {};\nerror_log {} warn;\n\
             events {{ worker_connections 19900; }}\nstream {{{servers} }}\n\
             http {{ access_log off; client_body_temp_path {t}/body; \
             proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fastcgi; \
             uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;{http_servers} }}\n",
        file("nginx.pid").display(),
        file("nginx.log").display()
    ))
}

/// The commands that run proxy `name` on `addrs` (one per [`SERVICES`]), with configs
/// written by `file`.
fn commands(
    name: &str,
    topo: &Topology,
    addrs: &[SocketAddr],
    spliced: &SplicedCmd,
    tls: &TlsFiles,
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
                .arg("--admin-socket")
                .arg(file("admin.sock"))
                .arg("--certs")
                .arg(&tls.dir)
                .args(&spliced.extra)
                .env("RUST_LOG", "warn");
        }
        "haproxy" => {
            // mode tcp with splice(2) both ways, buffers of 64 KiB (the copy plane's and
            // nginx's here, four times HAProxy's default) and a pipe for every connection of
            // the sweep; threads: one per CPU. Timeouts long enough never to fire during a
            // run. maxconn and maxpipes fit the machine's open-file limit of 20,000 (two
            // descriptors per connection, two per splice pipe).
            let config = file("haproxy.cfg");
            std::fs::write(&config, haproxy_config(&pairs, tls))?;
            cmd.args(["haproxy", "-db", "-f"]).arg(&config);
        }
        "nginx" => {
            // The stream module, one worker per CPU, proxy_buffer_size 64k (the copy plane's
            // buffer, four times nginx's default), and proxy_half_close on: without it nginx
            // closes both sides at the client's FIN and the reply is lost, as every other
            // target passes the FIN on.
            let config = file("nginx.conf");
            std::fs::write(&config, nginx_config(&pairs, tls, file)?)?;
            cmd.args(["nginx", "-c"]).arg(&config);
        }
        "socat" => {
            // socat's own model: one forked process per connection; one listener per port;
            // blocks of 256 KiB (the load generator's), not its default 8 KiB.
            let mut all = Vec::new();
            for (listen, backend) in &pairs {
                let mut c = netns();
                c.args([
                    "socat".to_owned(),
                    "-b262144".to_owned(),
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
