//! Reading the machine: CPU time and resident memory of a process tree, the whole
//! machine's CPU time, the kernel's memory, and what the machine is.

/// Clock ticks per second of /proc's CPU times (`USER_HZ`).
fn ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Fields of /proc/PID/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `pid` and all its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut parent: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1)?.parse().ok()) {
                parent.push((p, ppid));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// CPU seconds (user + system, with reaped children) of a process tree.
pub fn tree_cpu_secs(pid: u32) -> f64 {
    let hz = ticks();
    tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            // utime, stime, cutime, cstime: fields 14-17 of stat, 12-15 after the name.
            (11..15)
                .filter_map(|i| f.get(i)?.parse::<f64>().ok())
                .sum::<f64>()
                / hz
        })
        .sum()
}

/// Resident memory of a process tree, KiB.
pub fn tree_rss_kib(pid: u32) -> f64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .sum()
}

/// Busy CPU seconds of the whole machine since boot (all but idle and iowait).
pub fn machine_cpu_secs() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .take(8)
        .map(|(_, x)| x)
        .sum();
    busy / ticks()
}

/// Kernel memory that grows with sockets, KiB: the active objects of every slab cache (freed
/// objects a cache keeps for reuse are not counted, so the figure falls back when sockets
/// close) plus the pages TCP buffers hold.
pub fn kernel_kib() -> f64 {
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    let slab: f64 = slabinfo
        .lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let active: f64 = f.get(1)?.parse().ok()?;
            let size: f64 = f.get(3)?.parse().ok()?;
            Some(active * size / 1024.0)
        })
        .sum();
    slab + tcp_buffer_kib()
}

/// Memory TCP's buffers hold on the whole host, KiB (`/proc/net/sockstat`'s `mem`, which
/// counts every namespace: the client's and the sink's sockets too, the same for every target).
pub fn tcp_buffer_kib() -> f64 {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let pages = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|x| *x == "mem")?;
            f.get(i + 1)?.parse::<f64>().ok()
        })
        .unwrap_or(0.0);
    pages * 4.0
}

/// Runs `work` while sampling [`tcp_buffer_kib`] every 2 ms; returns its result and the most
/// TCP buffer memory seen meanwhile.
pub fn with_peak_tcp_kib<T>(work: impl FnOnce() -> T) -> (T, f64) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = tcp_buffer_kib();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(2));
                peak = peak.max(tcp_buffer_kib());
            }
            peak
        });
        let out = work();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (out, sampler.join().unwrap_or(0.0))
    })
}

/// What the numbers were measured on.
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_owned(), |s| s.trim().to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let version = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .find(|l| l.contains("version"))
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
    };
    serde_json::json!({
        "cpu": model,
        "cpus": cpus,
        "memory_gib": mem_kib / (1 << 20),
        "kernel": kernel,
        "haproxy": version("haproxy", "-v"),
        "nginx": version("nginx", "-v"),
        "socat": version("socat", "-V"),
    })
}
