//! The live connections, for `spliced status`: each one from accept to close, keyed by its
//! client socket's cookie, with its service, machine and data plane. Bytes, TCP states and
//! holds are not kept here: the kernel's own tables give them when asked ([`Live::report`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::sys::TcpCounters;

/// How a connection's bytes move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Carrier {
    /// Not yet decided: the connection waits for a machine or its TLS handshake.
    Pending,
    /// The kernel, through the socket maps.
    Sockmap,
    /// The daemon, copying.
    Copy,
    /// The daemon, over TLS it terminates in rustls.
    Tls,
    /// The daemon copies plaintext; the kernel encrypts and decrypts.
    KernelTls,
    /// The daemon's HTTP proxy, request by request.
    Http,
}

impl Carrier {
    fn name(self) -> &'static str {
        match self {
            Self::Pending => "-",
            Self::Sockmap => "sockmap",
            Self::Copy => "copy",
            Self::Tls => "tls",
            Self::KernelTls => "kernel-tls",
            Self::Http => "http",
        }
    }
}

/// A live connection as another process takes it over.
pub struct Described {
    pub client: SocketAddr,
    pub service: String,
    /// The machine's id and address.
    pub machine: Option<(String, SocketAddr)>,
}

/// What is kept of one live connection.
#[derive(Clone, Debug)]
struct Conn {
    client: SocketAddr,
    service: String,
    machine: Option<(String, SocketAddr)>,
    machine_cookie: u64,
    carrier: Carrier,
    since: SystemTime,
}

/// Every live connection of the daemon.
#[derive(Default)]
pub struct Live {
    conns: Mutex<HashMap<u64, Conn>>,
    draining: AtomicBool,
}

/// A connection's entry, removed when this is dropped.
pub struct Tracked<'a> {
    live: &'a Live,
    cookie: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.live.lock().remove(&self.cookie);
    }
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters a connection accepted from `peer` for `service`, keyed by its client socket's
    /// cookie.
    pub fn track(&self, cookie: u64, peer: SocketAddr, service: &str) -> Tracked<'_> {
        let conn = Conn {
            client: peer,
            service: service.to_owned(),
            machine: None,
            machine_cookie: 0,
            carrier: Carrier::Pending,
            since: SystemTime::now(),
        };
        self.lock().insert(cookie, conn);
        Tracked { live: self, cookie }
    }

    /// Notes the machine (its id, address and socket cookie) the connection whose client
    /// socket has `cookie` was connected to.
    pub fn connected(&self, cookie: u64, id: &str, addr: SocketAddr, machine_cookie: u64) {
        if let Some(c) = self.lock().get_mut(&cookie) {
            c.machine = Some((id.to_owned(), addr));
            c.machine_cookie = machine_cookie;
        }
    }

    /// Notes how the bytes of the connection whose client socket has `cookie` move.
    pub fn carried(&self, cookie: u64, carrier: Carrier) {
        if let Some(c) = self.lock().get_mut(&cookie) {
            c.carrier = carrier;
        }
    }

    /// What is known of the connection whose client socket has `cookie`.
    pub fn describe(&self, cookie: u64) -> Option<Described> {
        self.lock().get(&cookie).map(|c| Described {
            client: c.client,
            service: c.service.clone(),
            machine: c.machine.clone(),
        })
    }

    /// The daemon stopped accepting: every connection left is draining.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Every live connection with what the kernel says of its sockets: `sockets`, the TCP
    /// sockets by cookie ([`crate::sys::diag::tcp_sockets`]); `receiving`, the cookies of sockets
    /// whose input the kernel moves now (sockmap plane), for which a spliced socket not in it
    /// is held.
    pub fn report(
        &self,
        sockets: &HashMap<u64, TcpCounters>,
        receiving: Option<&HashSet<u64>>,
    ) -> Report {
        let now = SystemTime::now();
        let draining = self.draining.load(Ordering::Relaxed);
        let conns: Vec<(u64, Conn)> = self.lock().iter().map(|(k, c)| (*k, c.clone())).collect();
        let mut connections: Vec<ConnReport> = conns
            .into_iter()
            .map(|(cookie, c)| {
                let client = sockets.get(&cookie);
                let machine = sockets.get(&c.machine_cookie);
                let held = c.carrier == Carrier::Sockmap
                    && receiving
                        .is_some_and(|r| !r.contains(&cookie) || !r.contains(&c.machine_cookie));
                let state = match c.carrier {
                    _ if draining => "draining",
                    Carrier::Pending => "waiting",
                    Carrier::Sockmap if held => "held",
                    Carrier::Sockmap => "spliced",
                    Carrier::Http => "http",
                    Carrier::Copy | Carrier::Tls | Carrier::KernelTls => "copied",
                };
                ConnReport {
                    client: c.client,
                    service: c.service,
                    machine: c.machine.as_ref().map(|m| m.0.clone()),
                    machine_addr: c.machine.map(|m| m.1),
                    plane: c.carrier.name(),
                    state,
                    age_ms: now
                        .duration_since(c.since)
                        .unwrap_or(Duration::ZERO)
                        .as_millis()
                        .try_into()
                        .unwrap_or(u64::MAX),
                    bytes_from_client: client.map_or(0, |s| s.bytes_received),
                    bytes_from_machine: machine.map_or(0, |s| s.bytes_received),
                    client_tcp: client.map_or("-", |s| s.state.name()),
                    machine_tcp: machine.map_or("-", |s| s.state.name()),
                }
            })
            .collect();
        connections.sort_by_key(|c| std::cmp::Reverse(c.age_ms));
        let mut services: BTreeMap<String, ServiceReport> = BTreeMap::new();
        for c in &connections {
            let s = services.entry(c.service.clone()).or_default();
            s.connections += 1;
            s.bytes_from_client += c.bytes_from_client;
            s.bytes_from_machine += c.bytes_from_machine;
            *s.states.entry(c.state).or_default() += 1;
        }
        Report {
            connections,
            services,
        }
    }
}

/// What `spliced status` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub connections: Vec<ConnReport>,
    pub services: BTreeMap<String, ServiceReport>,
}

/// One live connection. Bytes are those the proxy's socket received from each side (over TLS,
/// the client's are TLS records); the TCP states are as `ss` names them.
#[derive(Debug, Serialize)]
pub struct ConnReport {
    pub client: SocketAddr,
    pub service: String,
    pub machine: Option<String>,
    pub machine_addr: Option<SocketAddr>,
    pub plane: &'static str,
    /// `waiting` (for its TLS handshake or a machine), `spliced` (the kernel moves its bytes),
    /// `held` (a side is held back for a slow reader), `copied` (the daemon moves them),
    /// `http` (the daemon's HTTP proxy serves it), `draining` (the daemon is stopping).
    pub state: &'static str,
    pub age_ms: u64,
    pub bytes_from_client: u64,
    pub bytes_from_machine: u64,
    pub client_tcp: &'static str,
    pub machine_tcp: &'static str,
}

/// A service's live connections summed.
#[derive(Debug, Default, Serialize)]
pub struct ServiceReport {
    pub connections: u64,
    pub bytes_from_client: u64,
    pub bytes_from_machine: u64,
    pub states: BTreeMap<&'static str, u64>,
}
