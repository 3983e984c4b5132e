//! The loaded kernel programs and their maps: loading and attaching, the per-socket map
//! entries of a spliced pair, the per-service counters, and the pumps that turn the verdict
//! program's ring buffer and aya-log records into events and log lines.

use std::{
    os::fd::{AsRawFd, BorrowedFd},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf, SockHash},
    programs::{CgroupAttachMode, ProgramError, SkMsg, SkSkb, SockOps},
};
use proxy_common::{
    Flow, FlowEvent, Link, MAX_SERVICES, PORT_BACKEND, PORT_PUBLIC, ServiceCounters, UserTx,
    hold_port_key, names,
};

use crate::watch::{Registry, SockEvent};

/// The object built by build.rs (empty when built with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spliced-ebpf"));

/// Why the kernel programs could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this build carries no BPF object (it was built with AYA_BUILD_SKIP=1)")]
    NoObject,
    #[error("loading the BPF object failed: {0}")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("the BPF object has no {0}")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("ring buffer: {0}")]
    Io(#[from] std::io::Error),
    #[error("cgroup (v2) {path}, where {prog} attaches: {reason}")]
    Cgroup {
        prog: &'static str,
        path: String,
        reason: String,
    },
}

/// A failed map operation on a spliced pair.
#[derive(Debug, thiserror::Error)]
#[error("{op} on {map} for socket {cookie}: {}", describe(source))]
pub struct MapOpError {
    op: &'static str,
    map: &'static str,
    cookie: u64,
    #[source]
    source: MapError,
}

impl MapOpError {
    /// The kernel refused the socket because of its TCP state: a socket map only takes
    /// established sockets, and one that has received FIN is in `CLOSE_WAIT`.
    pub fn is_state_refusal(&self) -> bool {
        syscall_errno(&self.source) == Some(libc::EOPNOTSUPP)
    }

    /// The socket is in the map already.
    pub fn is_busy(&self) -> bool {
        syscall_errno(&self.source) == Some(libc::EBUSY)
    }
}

/// The errno of a map operation that failed in the syscall (socket maps report a missing key
/// as a plain ENOENT there).
fn syscall_errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) => io_error.raw_os_error(),
        _ => None,
    }
}

fn describe(e: &MapError) -> String {
    match e {
        MapError::SyscallError(aya::sys::SyscallError { call, io_error }) => {
            format!("{call}: {io_error}")
        }
        other => other.to_string(),
    }
}

struct Maps {
    hold_ports: HashMap<MapData, u32, u32>,
    socks: SockHash<MapData, u64>,
    recv: SockHash<MapData, u64>,
    links: HashMap<MapData, u64, Link>,
    flows: HashMap<MapData, u64, Flow>,
}

/// The sum over CPUs of a service's kernel counters.
pub type ServiceTotals = ServiceCounters;

/// The kernel programs, attached, and their maps.
pub struct Kernel {
    maps: Mutex<Maps>,
    stats: PerCpuArray<MapData, ServiceCounters>,
    user_tx: PerCpuArray<MapData, UserTx>,
    // Owns the programs; dropping it detaches them. Kept last so maps close first.
    _ebpf: Ebpf,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::Missing(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

/// The program `name` of the object, as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(LoadError::Missing(name))?;
    prog.try_into()
        .map_err(|source| LoadError::Program { name, source })
}

impl Kernel {
    /// Loads the programs into the kernel, attaches them to their maps, and starts the event
    /// pump (ring buffer -> `registry`) and the kernel log pump on the current runtime.
    pub fn load(registry: Arc<Registry>) -> Result<Self, LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| LoadError::Object(Box::new(e)))?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_pump(logger)?,
            Err(e) => tracing::warn!(error = %e, "kernel program logs are not available"),
        }

        let hold_ports = take(&mut ebpf, names::HOLD_PORTS)?;
        let socks: SockHash<MapData, u64> = take(&mut ebpf, names::SOCKS)?;
        let recv: SockHash<MapData, u64> = take(&mut ebpf, names::RECV)?;
        let links = take(&mut ebpf, names::LINKS)?;
        let flows = take(&mut ebpf, names::FLOWS)?;
        let stats = take(&mut ebpf, names::SERVICE_STATS)?;
        let user_tx = take(&mut ebpf, names::USER_TX)?;
        let events: RingBuf<MapData> = take(&mut ebpf, names::EVENTS)?;

        let name = names::VERDICT_PROG;
        let verdict: &mut SkSkb = program(&mut ebpf, name)?;
        verdict
            .load()
            .and_then(|()| verdict.attach(recv.fd()))
            .map_err(|source| LoadError::Program { name, source })?;
        let name = names::MSG_PROG;
        let msg: &mut SkMsg = program(&mut ebpf, name)?;
        msg.load()
            .and_then(|()| msg.attach(socks.fd()))
            .map_err(|source| LoadError::Program { name, source })?;
        let name = names::HOLD_PROG;
        let path = own_cgroup_path().map_err(|reason| LoadError::Cgroup {
            prog: name,
            path: "of the daemon".to_owned(),
            reason,
        })?;
        let cgroup = open_cgroup(name, &path)?;
        let hold: &mut SockOps = program(&mut ebpf, name)?;
        hold.load()
            // aya attaches with a BPF link on this kernel, and links to a cgroup always coexist
            // with other programs; the kernel refuses the multi flag on a link (EINVAL).
            .and_then(|()| hold.attach(&cgroup, CgroupAttachMode::Single))
            .map_err(|source| LoadError::Program { name, source })?;
        tracing::debug!(cgroup = ?cgroup, "hold program attached");
        spawn_event_pump(events, registry)?;
        Ok(Self {
            maps: Mutex::new(Maps {
                hold_ports,
                socks,
                recv,
                links,
                flows,
            }),
            stats,
            user_tx,
            _ebpf: ebpf,
        })
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the hold program which connections to watch: those accepted on `public` ports
    /// and those made to `backend` ports. Called before the first connection.
    pub fn watch_ports(
        &self,
        public: impl IntoIterator<Item = u16>,
        backend: impl IntoIterator<Item = u16>,
    ) -> Result<(), MapError> {
        let mut maps = self.maps();
        let keys = public
            .into_iter()
            .map(|p| hold_port_key(PORT_PUBLIC, p))
            .chain(backend.into_iter().map(|p| hold_port_key(PORT_BACKEND, p)));
        for key in keys {
            maps.hold_ports.insert(&key, &1, 0)?;
        }
        Ok(())
    }

    /// Creates the link and flow entries of one socket.
    pub fn add_link(&self, cookie: u64, link: &Link) -> Result<(), MapOpError> {
        let mut maps = self.maps();
        maps.flows
            .insert(&cookie, &Flow::default(), 0)
            .map_err(|source| op_err("insert", names::FLOWS, cookie, source))?;
        maps.links
            .insert(&cookie, link, 0)
            .map_err(|source| op_err("insert", names::LINKS, cookie, source))
    }

    /// Replaces the link of a socket (check point, hold).
    pub fn set_link(&self, cookie: u64, link: &Link) -> Result<(), MapOpError> {
        self.maps()
            .links
            .insert(&cookie, link, 0)
            .map_err(|source| op_err("update", names::LINKS, cookie, source))
    }

    /// What the verdict program has done with the bytes this socket received.
    pub fn flow(&self, cookie: u64) -> Result<Flow, MapOpError> {
        self.maps()
            .flows
            .get(&cookie, 0)
            .map_err(|source| op_err("lookup", names::FLOWS, cookie, source))
    }

    /// Puts a socket in `SOCKS`, where it can be redirected to.
    pub fn add_socket(&self, cookie: u64, fd: BorrowedFd<'_>) -> Result<(), MapOpError> {
        self.maps()
            .socks
            .insert(&cookie, fd.as_raw_fd(), 0)
            .map_err(|source| op_err("insert", names::SOCKS, cookie, source))
    }

    /// Lets the bytes a socket receives flow to its peer (puts it in `RECV`).
    pub fn start_receive(&self, cookie: u64, fd: BorrowedFd<'_>) -> Result<(), MapOpError> {
        self.maps()
            .recv
            .insert(&cookie, fd.as_raw_fd(), 0)
            .map_err(|source| op_err("insert", names::RECV, cookie, source))
    }

    /// Removes every entry of a socket. Missing entries are fine: set-up may have failed
    /// half-way, and closing a socket removes it from the socket maps by itself.
    pub fn forget(&self, cookie: u64) {
        let mut maps = self.maps();
        let results = [
            (names::RECV, maps.recv.remove(&cookie)),
            (names::SOCKS, maps.socks.remove(&cookie)),
            (names::LINKS, maps.links.remove(&cookie)),
            (names::FLOWS, maps.flows.remove(&cookie)),
        ];
        for (map, result) in results {
            log_removal(map, cookie, result);
        }
    }

    /// Entries left in each per-socket map (for leak checks).
    pub fn entry_counts(&self) -> [(&'static str, usize); 4] {
        let maps = self.maps();
        [
            (names::SOCKS, maps.socks.keys().count()),
            (names::RECV, maps.recv.keys().count()),
            (names::LINKS, maps.links.keys().count()),
            (names::FLOWS, maps.flows.keys().count()),
        ]
    }

    /// The kernel counters of a service, summed over CPUs.
    pub fn service_totals(&self, service: u32) -> ServiceTotals {
        let mut sum = ServiceCounters::default();
        if service >= MAX_SERVICES {
            return sum;
        }
        if let Ok(values) = self.stats.get(&service, 0) {
            for v in values.iter() {
                sum.bytes_to_backend += v.bytes_to_backend;
                sum.bytes_to_client += v.bytes_to_client;
                sum.segments += v.segments;
                sum.redirect_failures += v.redirect_failures;
                sum.flow_events += v.flow_events;
                sum.events_lost += v.events_lost;
                sum.holds += v.holds;
                sum.overlaps += v.overlaps;
                sum.overlap_bytes += v.overlap_bytes;
                sum.stream_faults += v.stream_faults;
            }
        }
        sum
    }

    /// What processes wrote into spliced sockets, summed over CPUs.
    pub fn user_tx(&self) -> UserTx {
        let mut sum = UserTx::default();
        if let Ok(values) = self.user_tx.get(&0, 0) {
            for v in values.iter() {
                sum.messages += v.messages;
                sum.bytes += v.bytes;
            }
        }
        sum
    }
}

/// The key was not in the map (socket maps report that as a plain ENOENT).
fn not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound) || syscall_errno(e) == Some(libc::ENOENT)
}

fn log_removal(map: &'static str, cookie: u64, result: Result<(), MapError>) {
    match result {
        Ok(()) => {}
        Err(e) if not_found(&e) => {}
        Err(e) => {
            tracing::error!(
                map,
                cookie,
                error = describe(&e),
                "removing a map entry failed"
            );
        }
    }
}

/// The path of this process's cgroup in the cgroup v2 hierarchy (from `/proc/self/cgroup`).
/// Sockets belong to the cgroup of the process that created them (accepted ones to their
/// listener's), so the hold program attached there sees every connection of the daemon, and
/// no other cgroup's.
fn own_cgroup_path() -> Result<String, String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    Ok(cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("/proc/self/cgroup has no cgroup v2 entry")?
        .to_owned())
}

/// The directory of the cgroup at `path` in the cgroup v2 hierarchy, where program `prog` is to
/// attach, opened (found through `/proc/self/mountinfo`).
///
/// Where no cgroup2 file system is mounted in this mount namespace (`ip netns exec` mounts a
/// fresh `/sys`), one is mounted on a private temporary directory just long enough to open
/// the directory, then detached.
fn open_cgroup(prog: &'static str, path: &str) -> Result<std::fs::File, LoadError> {
    open_cgroup_dir(path).map_err(|reason| LoadError::Cgroup {
        prog,
        path: path.to_owned(),
        reason,
    })
}

fn open_cgroup_dir(path: &str) -> Result<std::fs::File, String> {
    let path = path.trim_start_matches('/');
    if path.split('/').any(|part| part == "..") {
        return Err(format!("{path}: a cgroup path may not contain '..'"));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    // mountinfo: id parent major:minor root mount-point options... - fstype source options
    let mounted = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (right.split_whitespace().next() == Some("cgroup2") && root == "/").then_some(point)
    });
    if let Some(point) = mounted {
        let dir = std::path::Path::new(point).join(path);
        return std::fs::File::open(&dir).map_err(|e| format!("{}: {e}", dir.display()));
    }
    let tmp = std::env::temp_dir().join(format!("spliced-cgroup2-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let opened = crate::sys::mount_cgroup2(&tmp).and_then(|()| {
        let opened = std::fs::File::open(tmp.join(path));
        crate::sys::detach_mount(&tmp)?;
        opened
    });
    let _ = std::fs::remove_dir(&tmp);
    opened.map_err(|e| format!("through cgroup2 mounted on {}: {e}", tmp.display()))
}

fn op_err(op: &'static str, map: &'static str, cookie: u64, source: MapError) -> MapOpError {
    MapOpError {
        op,
        map,
        cookie,
        source,
    }
}

/// Reads [`FlowEvent`]s and hands each to the connection that owns the socket.
fn spawn_event_pump(events: RingBuf<MapData>, registry: Arc<Registry>) -> std::io::Result<()> {
    let mut events = crate::sys::async_readable(events)?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = events.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(event) = crate::sys::read_pod::<FlowEvent>(&item) {
                    registry.deliver(event.cookie, SockEvent::Pressure);
                }
            }
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Forwards aya-log records from the kernel programs into the `log` facade, which the
/// tracing subscriber picks up.
fn spawn_log_pump(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> std::io::Result<()> {
    let mut logger = crate::sys::async_readable(logger)?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
