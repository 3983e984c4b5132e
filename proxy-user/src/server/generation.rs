//! What one reading of the config serves, and how a reload moves from one reading to the
//! next: machines, pools with their health checks, and a route per public port. A service
//! whose settings and machines are unchanged keeps its pool (its load, queue and health) and
//! its checks; a machine spliced runs whose command is unchanged keeps its process.
//! Established connections hold their own route and lease, so nothing a reload replaces
//! ends them.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};

use super::{Route, RunOptions, StartError, http_port, listen, tls_port};
use crate::{
    balance::{Demand, Pool},
    config::{AutoStop, Config},
    machines::{Managed, Spec, Timing},
};

/// The services, machines and routes of one reading of the config.
pub(super) struct Generation {
    pub config: Config,
    /// The machines spliced runs, in config order.
    pub managed: Vec<Arc<Managed>>,
    /// One per service, in service order.
    pub pools: Vec<Arc<Pool>>,
    /// The health checks of each pool; dropping the last reference stops them.
    health: Vec<Arc<JoinSet<()>>>,
    /// Pools made by this reading rather than kept from the last one.
    fresh: Vec<Arc<Pool>>,
    pub routes: BTreeMap<u16, Arc<Route>>,
}

impl Generation {
    /// The service with id `service` and its pool, if this reading has it.
    fn pool_of(&self, service: u32) -> Option<(&crate::config::Service, &Arc<Pool>)> {
        let i = self.config.services.iter().position(|s| s.id == service)?;
        Some((&self.config.services[i], &self.pools[i]))
    }

    /// Reads `config` into pools and routes, keeping from `prev` every machine process and
    /// every pool that did not change. Starts nothing: see [`Generation::start`].
    pub fn build(
        config: Config,
        opts: &RunOptions,
        prev: Option<&Self>,
        certs: &mut Option<Arc<crate::tls::CertStore>>,
    ) -> Result<Self, StartError> {
        let managed = managed_machines(&config, opts.machines, prev);
        let mut pools = Vec::new();
        let mut health = Vec::new();
        let mut fresh = Vec::new();
        for service in &config.services {
            let machines: Vec<(String, SocketAddr)> = config
                .machines_of(service)
                .map(|m| {
                    (
                        m.id.clone(),
                        SocketAddr::new(m.address, service.internal_port),
                    )
                })
                .collect();
            let runs: Vec<Option<Arc<Managed>>> = machines
                .iter()
                .map(|(id, _)| managed.iter().find(|m| &m.spec.id == id).cloned())
                .collect();
            let kept = prev.and_then(|p| {
                let i = p.config.services.iter().position(|o| o.id == service.id)?;
                let old = &p.config.services[i];
                let same = old == service
                    && config.machines_of(service).eq(p.config.machines_of(old))
                    && p.pools[i].machines.iter().zip(&runs).all(|(m, new)| {
                        match (&m.managed, new) {
                            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                            (None, None) => true,
                            _ => false,
                        }
                    });
                same.then(|| (Arc::clone(&p.pools[i]), Arc::clone(&p.health[i])))
            });
            if let Some((pool, checks)) = kept {
                pools.push(pool);
                health.push(checks);
                continue;
            }
            let limits = service.concurrency;
            let demand = Demand {
                auto_start: service.auto_start_machines.unwrap_or(true),
                auto_stop: service.auto_stop_machines.unwrap_or(AutoStop::Off),
                min_running: service.min_machines_running.unwrap_or(0),
            };
            let mut pool = Pool::new(
                service.name.clone(),
                machines,
                limits.and_then(|c| c.soft_limit),
                limits.and_then(|c| c.hard_limit),
                opts.queue,
            )
            .with_demand(demand, runs);
            let old = prev
                .and_then(|p| p.pool_of(service.id))
                .filter(|(_, old)| old.service == service.name);
            if let Some((old_service, old)) = old {
                let same_checks = old_service.tcp_checks == service.tcp_checks
                    && old_service.http_checks == service.http_checks;
                pool = pool.carrying(old, same_checks);
            }
            let pool = Arc::new(pool);
            if let Some((_, old)) = old {
                old.replaced_by(&pool);
            }
            health.push(Arc::new(crate::health::start_pool(service, &pool)));
            fresh.push(Arc::clone(&pool));
            pools.push(pool);
        }
        let mut routes = BTreeMap::new();
        for (service, port) in config.public_ports() {
            let at = config.services.iter().position(|s| s.id == service.id);
            let Some(pool) = at.map(|i| Arc::clone(&pools[i])) else {
                continue;
            };
            if pool.machines.is_empty() {
                tracing::warn!(port = port.port, service = %service.name, "no machine serves this port: its connections will be refused");
            }
            let route = Route {
                service: service.id,
                pool,
                proxy_proto: port.proxy_proto,
                tls: tls_port(&config, port, opts, certs)?,
                http: http_port(service, &config, port, opts)?,
            };
            routes.insert(port.port, Arc::new(route));
        }
        Ok(Self {
            config,
            managed,
            pools,
            health,
            fresh,
            routes,
        })
    }

    /// Once this reading serves: starts the machines its new pools keep running, and stops
    /// each machine of `prev` it no longer has once that machine carries no connection.
    pub fn start(&self, prev: Option<&Self>) {
        for pool in &self.fresh {
            pool.start_kept();
        }
        let Some(prev) = prev else {
            return;
        };
        for old in &prev.managed {
            if self.managed.iter().any(|m| Arc::ptr_eq(m, old)) {
                continue;
            }
            let old = Arc::clone(old);
            tokio::spawn(async move {
                while old.live() > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tracing::info!(machine = %old.spec.id, "the machine is gone from the config: stopping it");
                old.stop();
            });
        }
    }

    /// Every machine port this reading routes to.
    pub fn backend_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.pools
            .iter()
            .flat_map(|pool| pool.machines.iter().map(|m| m.addr.port()))
    }
}

/// A new listener for a worker, with the route of its port (`None` once the port is gone).
pub(super) type NewListener = (std::net::TcpListener, watch::Receiver<Option<Arc<Route>>>);

/// The public ports being served, and the workers that accept on them.
pub(super) struct Ports {
    listen_addrs: Vec<IpAddr>,
    open: HashMap<u16, watch::Sender<Option<Arc<Route>>>>,
    workers: Vec<mpsc::UnboundedSender<NewListener>>,
    /// A copy of each open port's listeners, for an upgrade to hand over; dropped with the
    /// port, so that a port gone from the config is closed once its workers let go.
    copies: HashMap<u16, Vec<(SocketAddr, std::os::fd::OwnedFd)>>,
    /// Listeners handed over by the process this one upgraded, taken before binding anew;
    /// those the first config does not use are closed after it.
    inherited: HashMap<SocketAddr, Vec<std::net::TcpListener>>,
    /// The cookie of every listener this process ever bound or was handed: a listener on one
    /// of its ports with another cookie is another process's.
    own: std::collections::HashSet<u64>,
}

impl Ports {
    pub fn new(
        listen_addrs: Vec<IpAddr>,
        workers: Vec<mpsc::UnboundedSender<NewListener>>,
        inherited: HashMap<SocketAddr, Vec<std::net::TcpListener>>,
    ) -> Self {
        Self {
            listen_addrs,
            open: HashMap::new(),
            workers,
            copies: HashMap::new(),
            inherited,
            own: std::collections::HashSet::new(),
        }
    }

    /// Fails when a process other than this one listens on `port` (`handed`: the listeners an
    /// upgrade handed over, this process's now): with `SO_REUSEPORT` on both sides, a second
    /// spliced would join the port and take part of its connections.
    fn check_alone(
        &mut self,
        port: u16,
        handed: &[(SocketAddr, std::net::TcpListener)],
    ) -> Result<(), StartError> {
        for (_, l) in handed {
            own_listener(&mut self.own, port, l)?;
        }
        let listening = crate::sys::diag::listeners_on(port)
            .map_err(|source| StartError::PortCheck { port, source })?;
        let others = listening
            .iter()
            .filter(|(cookie, ip)| {
                !self.own.contains(cookie)
                    && self.listen_addrs.iter().any(|ours| overlap(*ours, *ip))
            })
            .count();
        if others > 0 {
            return Err(StartError::Shared { port, others });
        }
        Ok(())
    }

    /// Copies of every open listener, with its address.
    pub fn listener_copies(&self) -> std::io::Result<Vec<(SocketAddr, std::os::fd::OwnedFd)>> {
        let mut out = Vec::new();
        for (addr, fd) in self.copies.values().flatten() {
            out.push((*addr, fd.try_clone()?));
        }
        Ok(out)
    }

    /// Serves `routes`: a port already open keeps its listeners and takes its new route for
    /// the next connection it accepts; a new port is bound (all of them before anything
    /// changes, so a port that cannot be bound changes nothing); a port no longer listed
    /// stops accepting, while its connections go on.
    pub fn apply(&mut self, routes: &BTreeMap<u16, Arc<Route>>) -> Result<(), StartError> {
        let mut fresh = Vec::new();
        for (&port, route) in routes {
            if self.open.contains_key(&port) {
                continue;
            }
            // Every listener handed over stays in service, so that no connection queued on
            // one is lost; a worker may then accept on several of an address.
            let mut bound = Vec::new();
            for ip in &self.listen_addrs {
                let addr = SocketAddr::new(*ip, port);
                let taken = self.inherited.remove(&addr).unwrap_or_default();
                bound.extend(taken.into_iter().map(|l| (addr, l)));
            }
            // Checked before this process joins the port, so that a refused start takes no
            // connection with it.
            self.check_alone(port, &bound)?;
            for ip in &self.listen_addrs {
                let addr = SocketAddr::new(*ip, port);
                while bound.iter().filter(|(a, _)| *a == addr).count() < self.workers.len() {
                    let l =
                        listen::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
                    own_listener(&mut self.own, port, &l)?;
                    bound.push((addr, l));
                }
                tracing::info!(%addr, service = %route.pool.service, proxy_proto = ?route.proxy_proto, workers = self.workers.len(), "listening");
            }
            fresh.push((port, Arc::clone(route), bound));
        }
        self.inherited.clear();
        for (port, tx) in &self.open {
            let next = routes.get(port).cloned();
            if next.is_none() {
                tracing::info!(
                    port,
                    "the port is gone from the config: no longer accepting"
                );
            }
            tx.send_replace(next);
        }
        self.open.retain(|port, _| routes.contains_key(port));
        self.copies.retain(|port, _| routes.contains_key(port));
        for (port, route, bound) in fresh {
            let (tx, rx) = watch::channel(Some(route));
            let mut copies = Vec::new();
            for (addr, listener) in &bound {
                match std::os::fd::AsFd::as_fd(listener).try_clone_to_owned() {
                    Ok(fd) => copies.push((*addr, fd)),
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "a listener cannot be copied: an upgrade will not hand it over");
                    }
                }
            }
            self.copies.insert(port, copies);
            for (i, (_, listener)) in bound.into_iter().enumerate() {
                // One listener of each address per worker.
                let worker = &self.workers[i % self.workers.len()];
                if worker.send((listener, rx.clone())).is_err() {
                    tracing::error!(port, "a worker is gone: the port is served by the others");
                }
            }
            self.open.insert(port, tx);
        }
        Ok(())
    }
}

/// Notes `l`, a listener of `port`, in `own`, the cookies of this process's listeners.
fn own_listener(
    own: &mut std::collections::HashSet<u64>,
    port: u16,
    l: &std::net::TcpListener,
) -> Result<(), StartError> {
    let cookie = crate::sys::socket_cookie(std::os::fd::AsFd::as_fd(l))
        .map_err(|source| StartError::PortCheck { port, source })?;
    own.insert(cookie);
    Ok(())
}

/// Whether a listener on `theirs` takes connections that one on `ours` (of the same port)
/// would: the same address, or a wildcard of the family (an IPv6 wildcard may take IPv4 too).
fn overlap(ours: IpAddr, theirs: IpAddr) -> bool {
    ours == theirs
        || (ours.is_unspecified() && ours.is_ipv4() == theirs.is_ipv4())
        || (theirs.is_unspecified() && (theirs.is_ipv6() || ours.is_ipv4()))
}

/// The machines spliced runs: each `[[machines]]` entry with a `command`, given the config's
/// `[env]` and `PORT`, the `internal_port` of the first service it serves, where it must
/// accept to be started. One whose command, directory, environment and address are those of
/// a machine of `prev` is that machine, process and all. A machine that serves no service is
/// never started.
fn managed_machines(
    config: &Config,
    timing: Timing,
    prev: Option<&Generation>,
) -> Vec<Arc<Managed>> {
    let runtime = tokio::runtime::Handle::current();
    let mut out = Vec::new();
    for m in &config.machines {
        let Some(command) = &m.command else {
            continue;
        };
        let Some(service) = config.services.iter().find(|s| s.machines.contains(&m.id)) else {
            tracing::warn!(machine = %m.id, "the machine serves no service: spliced never starts it");
            continue;
        };
        let mut env: Vec<(String, String)> = config
            .env
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect();
        env.push(("PORT".to_owned(), service.internal_port.to_string()));
        let spec = Spec {
            id: m.id.clone(),
            command: command.clone(),
            dir: m.dir.as_ref().map(PathBuf::from),
            env,
            ready: SocketAddr::new(m.address, service.internal_port),
            stop_signal: crate::machines::signal_number(
                config.kill_signal.as_deref().unwrap_or("SIGTERM"),
            ),
            stop_grace: config.kill_timeout.unwrap_or(timing.stop_grace),
        };
        let kept = prev.and_then(|p| p.managed.iter().find(|old| old.spec == spec));
        out.push(match kept {
            Some(old) => Arc::clone(old),
            None => Managed::new(spec, timing, runtime.clone()),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::overlap;

    #[test]
    fn listeners_overlap_by_address_and_wildcard() {
        let ip = |s: &str| s.parse().expect("address");
        for (ours, theirs, want) in [
            ("0.0.0.0", "127.0.0.1", true),
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1", "0.0.0.0", true),
            ("127.0.0.1", "::", true),
            ("127.0.0.1", "127.0.0.2", false),
            ("::", "127.0.0.1", false),
            ("::1", "0.0.0.0", false),
            ("::", "::1", true),
            ("::1", "::2", false),
        ] {
            assert_eq!(
                overlap(ip(ours), ip(theirs)),
                want,
                "{ours} against {theirs}"
            );
        }
    }
}
