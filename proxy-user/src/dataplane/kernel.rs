//! The loaded kernel programs and their maps: loading and attaching, the per-socket map
//! entries of a spliced pair, the per-service counters, and the pumps that turn the verdict
//! program's ring buffer and aya-log records into events and log lines.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, IterableMap, MapData, MapError, PerCpuArray, RingBuf, SockHash},
    programs::{CgroupAttachMode, ProgramError, SkMsg, SkSkb, SockOps},
};
use proxy_common::{
    Flow, Link, MAX_SERVICES, PortRole, SentBytes, ServiceCounters, hold_port_key, names,
};

use super::{cgroup, events};
use crate::{sys, watch::Registry};

/// The object built by build.rs (empty when built with `AYA_BUILD_SKIP=1`).
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spliced-ebpf"));

/// Why the kernel programs could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this build carries no BPF object (it was built with AYA_BUILD_SKIP=1)")]
    NoObject,
    #[error("{0}")]
    Unsupported(String),
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
#[error("{op} on {map} for socket {cookie}: {source}")]
pub struct MapOpError {
    op: &'static str,
    map: &'static str,
    cookie: u64,
    #[source]
    source: io::Error,
}

impl MapOpError {
    /// The kernel refused the socket because of its TCP state: a socket map only takes
    /// established sockets, and one that has received FIN is in `CLOSE_WAIT`.
    pub fn is_state_refusal(&self) -> bool {
        self.source.raw_os_error() == Some(libc::EOPNOTSUPP)
    }

    /// The socket is in the map already.
    pub fn is_busy(&self) -> bool {
        self.source.raw_os_error() == Some(libc::EBUSY)
    }
}

/// The per-socket maps. Entries are changed through the maps' descriptors ([`map_fd`]),
/// without a lock: each connection task changes only its own sockets' entries.
struct Maps {
    hold_ports: HashMap<MapData, u32, u32>,
    socks: SockHash<MapData, u64>,
    recv: SockHash<MapData, u64>,
    links: HashMap<MapData, u64, Link>,
    flows: HashMap<MapData, u64, Flow>,
}

/// The descriptor of a loaded map.
fn map_fd<K: aya::Pod, V>(map: &impl IterableMap<K, V>) -> BorrowedFd<'_> {
    map.map().fd().as_fd()
}

/// The kernel programs, attached, and their maps.
pub struct Kernel {
    maps: Maps,
    stats: PerCpuArray<MapData, ServiceCounters>,
    /// Present for an egress audit only.
    sent: Option<PerCpuArray<MapData, SentBytes>>,
    /// The ring buffer's descriptor, for a handover (the event pump reads the map).
    events: OwnedFd,
    /// The programs' BPF links (the hold program's to the daemon's cgroup; on kernels that
    /// link a program to a socket map, the verdict's too): each stays attached while any
    /// descriptor of it is open.
    links: Vec<OwnedFd>,
    /// Owns the programs this process loaded (none when it adopted another's); dropping it
    /// detaches them, unless [`Kernel::leave_attached`] was called.
    ebpf: Option<Ebpf>,
    leave_attached: std::sync::atomic::AtomicBool,
    /// The task that reads the ring buffer ([`events::spawn_event_pump`]).
    pump: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // The reader holds the ring buffer's map open.
        if let Some(pump) = self.take_pump() {
            pump.abort();
        }
        if self
            .leave_attached
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // aya detaches a program attached to a map when its handle is dropped; the
            // process that adopted the maps needs them attached.
            std::mem::forget(self.ebpf.take());
        }
    }
}

/// Descriptors of a loaded kernel's maps and its programs' links, handed to the process that
/// adopts them ([`Kernel::adopt`]), in [`Kernel::HANDOVER_ORDER`].
pub struct KernelFds(pub Vec<OwnedFd>);

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

/// Loads the programs of `ebpf` and attaches them: the verdict to `recv`, the `sk_msg` program
/// to `socks` (only for an egress audit), the hold program to the daemon's cgroup. Dropping
/// `ebpf` detaches them.
fn attach(
    ebpf: &mut Ebpf,
    recv: &SockHash<MapData, u64>,
    socks: &SockHash<MapData, u64>,
    egress_audit: bool,
) -> Result<Vec<OwnedFd>, LoadError> {
    let mut ids = Vec::new();
    let name = names::VERDICT_PROG;
    let verdict: &mut SkSkb = program(ebpf, name)?;
    verdict
        .load()
        .and_then(|()| verdict.attach(recv.fd()))
        .and_then(|_| verdict.info())
        .map(|info| ids.push(info.id()))
        .map_err(|source| LoadError::Program { name, source })?;
    if egress_audit {
        let name = names::MSG_PROG;
        let msg: &mut SkMsg = program(ebpf, name)?;
        msg.load()
            .and_then(|()| msg.attach(socks.fd()))
            .and_then(|_| msg.info())
            .map(|info| ids.push(info.id()))
            .map_err(|source| LoadError::Program { name, source })?;
    }
    let name = names::HOLD_PROG;
    let path = cgroup::own_cgroup_path().map_err(|reason| LoadError::Cgroup {
        prog: name,
        path: "of the daemon".to_owned(),
        reason,
    })?;
    let cgroup = cgroup::open_cgroup(name, &path)?;
    let hold: &mut SockOps = program(ebpf, name)?;
    hold.load()
        // aya attaches with a BPF link on this kernel, and links to a cgroup always coexist
        // with other programs; the kernel refuses the multi flag on a link (EINVAL).
        .and_then(|()| hold.attach(&cgroup, CgroupAttachMode::Single))
        .map_err(|source| LoadError::Program { name, source })?;
    tracing::debug!(cgroup = ?cgroup, "hold program attached");
    ids.push(
        hold.info()
            .map_err(|source| LoadError::Program { name, source })?
            .id(),
    );
    Ok(program_links(&ids))
}

/// Copies of this process's descriptors of the BPF links of the programs `ids` (aya keeps its
/// own private), found in `/proc/self/fdinfo`, which needs no privilege (listing the kernel's
/// links does).
fn program_links(ids: &[u32]) -> Vec<OwnedFd> {
    match sys::own_bpf_links(ids) {
        Ok(links) => links,
        Err(e) => {
            tracing::warn!(error = %e, "the programs' links were not found: an upgrade will not hand connections over");
            Vec::new()
        }
    }
}

/// The object, parsed, its maps created: nothing is loaded or attached yet.
fn open() -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    EbpfLoader::new()
        .load(OBJECT)
        .map_err(|e| LoadError::Object(Box::new(e)))
}

/// Loads every program of the object and attaches it as [`Kernel::load`] does, then detaches
/// it: whether this kernel runs the sockmap plane.
pub(super) fn trial_attach() -> Result<(), LoadError> {
    let mut ebpf = open()?;
    let socks: SockHash<MapData, u64> = take(&mut ebpf, names::SOCKS)?;
    let recv: SockHash<MapData, u64> = take(&mut ebpf, names::RECV)?;
    attach(&mut ebpf, &recv, &socks, true).map(drop)
}

impl Kernel {
    /// Loads the programs into the kernel, attaches them to their maps, and starts the event
    /// pump (ring buffer -> `registry`) and the kernel log pump on the current runtime. The
    /// `sk_msg` program is attached only for an `egress_audit`: a socket with one sends every
    /// redirected batch through `tcp_bpf_sendmsg`, which copies it once more.
    pub fn load(registry: Arc<Registry>, egress_audit: bool) -> Result<Self, LoadError> {
        let mut ebpf = open()?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => events::spawn_log_pump(logger)?,
            Err(e) => tracing::warn!(error = %e, "kernel program logs are not available"),
        }

        let hold_ports = take(&mut ebpf, names::HOLD_PORTS)?;
        let socks: SockHash<MapData, u64> = take(&mut ebpf, names::SOCKS)?;
        let recv: SockHash<MapData, u64> = take(&mut ebpf, names::RECV)?;
        let links = take(&mut ebpf, names::LINKS)?;
        let flows = take(&mut ebpf, names::FLOWS)?;
        let stats = take(&mut ebpf, names::SERVICE_STATS)?;
        let sent = if egress_audit {
            Some(take(&mut ebpf, names::SENT)?)
        } else {
            None
        };
        let events: RingBuf<MapData> = take(&mut ebpf, names::EVENTS)?;
        let events_fd = events.as_fd().try_clone_to_owned()?;

        let prog_links = attach(&mut ebpf, &recv, &socks, egress_audit)?;
        let pump = events::spawn_event_pump(events, registry)?;
        Ok(Self {
            maps: Maps {
                hold_ports,
                socks,
                recv,
                links,
                flows,
            },
            stats,
            sent,
            events: events_fd,
            links: prog_links,
            ebpf: Some(ebpf),
            leave_attached: std::sync::atomic::AtomicBool::new(false),
            pump: std::sync::Mutex::new(Some(pump)),
        })
    }

    /// Stops reading the ring buffer (a ring buffer has one consumer: the process that
    /// adopts this kernel reads it next). Returns once the reader has stopped.
    pub async fn stop_events(&self) {
        if let Some(pump) = self.take_pump() {
            pump.abort();
            pump.await.ok();
        }
    }

    /// The ring buffer's reader, if it still runs.
    fn take_pump(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.pump
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The order of [`KernelFds`]: these maps, then the programs' links.
    pub const HANDOVER_ORDER: [&'static str; 7] = [
        names::HOLD_PORTS,
        names::SOCKS,
        names::RECV,
        names::LINKS,
        names::FLOWS,
        names::SERVICE_STATS,
        names::EVENTS,
    ];

    /// Copies of the descriptors another process needs to take this kernel over
    /// ([`Self::adopt`]). After sending them, this process stops reading the ring buffer
    /// and calls [`Self::leave_attached`].
    pub fn handover_fds(&self) -> io::Result<KernelFds> {
        if !self.can_hand_over() {
            return Err(io::Error::other("no descriptor of the programs' links"));
        }
        let m = &self.maps;
        let fds = [
            map_fd(&m.hold_ports),
            m.socks.fd().as_fd(),
            m.recv.fd().as_fd(),
            map_fd(&m.links),
            map_fd(&m.flows),
            self.stats.map().fd().as_fd(),
            self.events.as_fd(),
        ];
        Ok(KernelFds(
            fds.into_iter()
                .chain(self.links.iter().map(AsFd::as_fd))
                .map(|fd| fd.try_clone_to_owned())
                .collect::<io::Result<_>>()?,
        ))
    }

    /// Whether another process can take this kernel over: it needs the programs' links.
    pub fn can_hand_over(&self) -> bool {
        !self.links.is_empty()
    }

    /// Leaves the programs attached when this is dropped: another process adopted them.
    pub fn leave_attached(&self) {
        self.leave_attached
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Takes over the maps and the programs' links another process loaded
    /// ([`Self::handover_fds`]), and reads its ring buffer into `registry`. The programs
    /// stay attached as they are; they are detached when the last descriptor of their maps
    /// and link closes. Without an egress audit's counter and the programs' log.
    pub fn adopt(fds: KernelFds, registry: Arc<Registry>) -> Result<Self, LoadError> {
        let KernelFds(mut fds) = fds;
        if fds.len() <= Self::HANDOVER_ORDER.len() {
            return Err(LoadError::Unsupported(format!(
                "a kernel handover of {} descriptors, fewer than its maps and a link",
                fds.len()
            )));
        }
        let prog_links = fds.split_off(Self::HANDOVER_ORDER.len());
        let [hold_ports, socks, recv, links, flows, stats, events]: [OwnedFd; 7] =
            fds.try_into()
                .map_err(|_| LoadError::Unsupported("a kernel handover's maps".to_owned()))?;
        let events_copy = events.try_clone()?;
        let maps = Maps {
            hold_ports: adopted_map(names::HOLD_PORTS, hold_ports)?,
            socks: adopted_map(names::SOCKS, socks)?,
            recv: adopted_map(names::RECV, recv)?,
            links: adopted_map(names::LINKS, links)?,
            flows: adopted_map(names::FLOWS, flows)?,
        };
        let stats = adopted_map(names::SERVICE_STATS, stats)?;
        let ring: RingBuf<MapData> = adopted_map(names::EVENTS, events)?;
        // Last: nothing after it can fail and leave the reader running.
        let pump = events::spawn_event_pump(ring, registry)?;
        Ok(Self {
            maps,
            stats,
            sent: None,
            events: events_copy,
            links: prog_links,
            ebpf: None,
            leave_attached: std::sync::atomic::AtomicBool::new(false),
            pump: std::sync::Mutex::new(Some(pump)),
        })
    }

    /// A socket's link as last written.
    pub fn link(&self, cookie: u64) -> Result<Link, MapOpError> {
        sys::map_lookup(map_fd(&self.maps.links), &cookie)
            .map_err(|source| op_err("lookup", names::LINKS, cookie, source))
    }

    /// Tells the hold program which connections to watch: those accepted on `public` ports
    /// and those made to `backend` ports. Called before the first connection.
    pub fn watch_ports(
        &self,
        public: impl IntoIterator<Item = u16>,
        backend: impl IntoIterator<Item = u16>,
    ) -> io::Result<()> {
        let map = map_fd(&self.maps.hold_ports);
        let keys = public
            .into_iter()
            .map(|p| hold_port_key(PortRole::Public, p))
            .chain(
                backend
                    .into_iter()
                    .map(|p| hold_port_key(PortRole::Backend, p)),
            );
        for key in keys {
            sys::map_update(map, &key, &1u32, 0)?;
        }
        Ok(())
    }

    /// Creates the link and flow entries of a pair's two sockets (one call per map).
    pub fn add_links(&self, links: [(u64, Link); 2]) -> Result<(), MapOpError> {
        let cookies = links.map(|(c, _)| c);
        sys::map_update_batch(map_fd(&self.maps.flows), &cookies, &[Flow::default(); 2])
            .map_err(|source| op_err("insert", names::FLOWS, cookies[0], source))?;
        sys::map_update_batch(map_fd(&self.maps.links), &cookies, &links.map(|(_, l)| l))
            .map_err(|source| op_err("insert", names::LINKS, cookies[0], source))
    }

    /// Replaces the link of a socket (a hold asked or ended, a drain point).
    pub fn set_link(&self, cookie: u64, link: &Link) -> Result<(), MapOpError> {
        sys::map_update(map_fd(&self.maps.links), &cookie, link, 0)
            .map_err(|source| op_err("update", names::LINKS, cookie, source))
    }

    /// What the verdict program has done with the bytes this socket received.
    pub fn flow(&self, cookie: u64) -> Result<Flow, MapOpError> {
        sys::map_lookup(map_fd(&self.maps.flows), &cookie)
            .map_err(|source| op_err("lookup", names::FLOWS, cookie, source))
    }

    /// Puts a socket in `SOCKS`, where it can be redirected to.
    pub fn add_socket(&self, cookie: u64, fd: BorrowedFd<'_>) -> Result<(), MapOpError> {
        sys::map_update(map_fd(&self.maps.socks), &cookie, &raw_fd(fd), 0)
            .map_err(|source| op_err("insert", names::SOCKS, cookie, source))
    }

    /// Lets the bytes a socket receives flow to its peer (puts it in `RECV`).
    pub fn start_receive(&self, cookie: u64, fd: BorrowedFd<'_>) -> Result<(), MapOpError> {
        sys::map_update(map_fd(&self.maps.recv), &cookie, &raw_fd(fd), 0)
            .map_err(|source| op_err("insert", names::RECV, cookie, source))
    }

    /// Removes every entry of a pair's sockets while they are open. Missing entries are fine:
    /// set-up may have failed half-way.
    pub fn forget(&self, cookies: &[u64]) {
        for &cookie in cookies {
            for (map, fd) in [
                (names::RECV, map_fd(&self.maps.recv)),
                (names::SOCKS, map_fd(&self.maps.socks)),
            ] {
                match sys::map_delete(fd, &cookie) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => log_removal_error(map, cookie, &e),
                }
            }
        }
        self.forget_closed(cookies);
    }

    /// Removes the entries of a pair's sockets once both are closed: closing a socket took it
    /// out of the socket maps, so only the link and flow entries are left (one call per map).
    pub fn forget_closed(&self, cookies: &[u64]) {
        for (map, fd) in [
            (names::LINKS, map_fd(&self.maps.links)),
            (names::FLOWS, map_fd(&self.maps.flows)),
        ] {
            if let Err(e) = sys::map_delete_all(fd, cookies) {
                log_removal_error(map, cookies.first().copied().unwrap_or(0), &e);
            }
        }
    }

    /// Entries left in each per-socket map (for leak checks).
    pub fn entry_counts(&self) -> [(&'static str, usize); 4] {
        let maps = &self.maps;
        [
            (names::SOCKS, maps.socks.keys().count()),
            (names::RECV, maps.recv.keys().count()),
            (names::LINKS, maps.links.keys().count()),
            (names::FLOWS, maps.flows.keys().count()),
        ]
    }

    /// Cookies of the sockets whose input the verdict takes now (in `RECV`).
    pub fn receiving(&self) -> std::collections::HashSet<u64> {
        self.maps.recv.keys().filter_map(Result::ok).collect()
    }

    /// The kernel counters of a service, summed over CPUs.
    pub fn service_totals(&self, service: u32) -> ServiceCounters {
        let mut sum = ServiceCounters::default();
        if service >= MAX_SERVICES {
            return sum;
        }
        if let Ok(values) = self.stats.get(&service, 0) {
            values.iter().for_each(|v| sum.add(v));
        }
        sum
    }

    /// What entered spliced sockets' send paths, summed over CPUs; `None` without an egress
    /// audit.
    pub fn sent(&self) -> Option<SentBytes> {
        let sent = self.sent.as_ref()?;
        let mut sum = SentBytes::default();
        if let Ok(values) = sent.get(&0, 0) {
            values.iter().for_each(|v| sum.add(v));
        }
        Some(sum)
    }
}

/// The map of another process's descriptor `fd`, as the type its name has in the object.
fn adopted_map<T>(name: &'static str, fd: OwnedFd) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let data = MapData::from_fd(fd).map_err(|source| LoadError::Map { name, source })?;
    let map = match name {
        names::SOCKS | names::RECV => aya::maps::Map::SockHash(data),
        names::SERVICE_STATS => aya::maps::Map::PerCpuArray(data),
        names::EVENTS => aya::maps::Map::RingBuf(data),
        _ => aya::maps::Map::HashMap(data),
    };
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

/// A socket's descriptor as a socket map's value.
fn raw_fd(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

fn log_removal_error(map: &'static str, cookie: u64, e: &io::Error) {
    tracing::error!(map, cookie, error = %e, "removing a map entry failed");
}

fn op_err(op: &'static str, map: &'static str, cookie: u64, source: io::Error) -> MapOpError {
    MapOpError {
        op,
        map,
        cookie,
        source,
    }
}
