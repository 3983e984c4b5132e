//! `/metrics` in Prometheus' text format (`--metrics-addr`): the admin snapshot's counters,
//! read at each scrape, as counters and gauges labelled by service and machine. Nothing is
//! counted twice: every figure is read from where the daemon keeps it.
//!
//! The kernel's byte counters are per service id, which is the service's place in the config:
//! after a reload that reorders services, a series may continue under another service's name.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, histogram::Histogram},
    registry::Registry,
};

use super::{Shared, StartError};
use crate::{balance::Pool, dataplane::Plane};

type Labels = Vec<(&'static str, String)>;

/// One metric family: its samples, each with its labels.
struct Family<'e, 'w> {
    encoder: &'e mut DescriptorEncoder<'w>,
}

impl Family<'_, '_> {
    fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) -> std::fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in samples {
            ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn histogram<'h>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, &'h Histogram)>,
    ) -> std::fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, histogram) in samples {
            histogram.encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, i64)>,
    ) -> std::fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in samples {
            ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn one<T>(value: T) -> [(Labels, T); 1] {
    [(Vec::new(), value)]
}

fn gauge_of(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Reads the daemon's counters at each scrape.
struct Scrape(Arc<Shared>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let shared = &self.0;
        let mut f = Family {
            encoder: &mut encoder,
        };
        let c = &shared.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        f.gauge(
            "spliced_dataplane",
            "The data plane in place (1 for the one named).",
            [(vec![("dataplane", shared.plane.name().to_owned())], 1)],
        )?;
        f.counter(
            "spliced_connections_accepted",
            "Connections accepted on public ports.",
            one(load(&c.accepted)),
        )?;
        f.gauge(
            "spliced_connections_active",
            "Connections open now.",
            one(gauge_of(load(&c.active))),
        )?;
        buffers(&mut f, shared)?;
        f.counter(
            "spliced_connections_ended",
            "Connections ended, by how: completed (FIN both ways), aborted (at the end of the \
             shutdown grace), failed (an error), idle (the idle timeout).",
            [
                ("completed", &c.completed),
                ("aborted", &c.aborted),
                ("failed", &c.failed),
                ("idle", &c.idle_closed),
            ]
            .map(|(how, n)| (vec![("outcome", how.to_owned())], load(n))),
        )?;
        f.counter(
            "spliced_connections_refused",
            "Connections closed without a machine: by reason.",
            [
                ("no_machine", &c.refused),
                ("backend_unreachable", &c.backend_unreachable),
            ]
            .map(|(why, n)| (vec![("reason", why.to_owned())], load(n))),
        )?;
        f.counter(
            "spliced_connections_copied_fallback",
            "Connections the kernel would not take, copied in userspace instead.",
            one(load(&c.copied_fallback)),
        )?;
        f.counter(
            "spliced_connections_upgrade",
            "Spliced connections handed to the new process at an upgrade, and taken over from \
             the old one.",
            [
                ("handed_over", &c.handed_over),
                ("taken_over", &c.taken_over),
            ]
            .map(|(r, n)| (vec![("direction", r.to_owned())], load(n))),
        )?;
        f.counter(
            "spliced_tls_handshakes",
            "TLS handshakes on tls and pg_tls ports, by result.",
            [("ok", &c.tls_handshakes), ("failed", &c.tls_failed)]
                .map(|(r, n)| (vec![("result", r.to_owned())], load(n))),
        )?;
        f.counter(
            "spliced_tls_kernel_sessions",
            "TLS sessions handed to kernel TLS after their handshake.",
            one(load(&c.tls_kernel)),
        )?;
        let h = &shared.http;
        f.counter(
            "spliced_http_requests",
            "HTTP requests served on http ports.",
            one(load(&h.requests)),
        )?;
        f.counter(
            "spliced_http_errors",
            "HTTP requests answered by spliced itself, by status.",
            [
                ("400", &h.bad_requests),
                ("502", &h.bad_gateway),
                ("503", &h.unavailable),
                ("504", &h.gateway_timeout),
            ]
            .map(|(code, n)| (vec![("code", code.to_owned())], load(n))),
        )?;
        reloads(&mut f, shared)?;
        // One reading of the config for the whole scrape: a reload may replace it meanwhile.
        let current = shared.current();
        services(&mut f, &current.pools)?;
        if let Plane::Sockmap(s) = &shared.plane {
            kernel(&mut f, &current, s, shared)?;
        }
        process(&mut f)
    }
}

/// Reloads, and this edge's view of the registry when it follows one.
fn reloads(f: &mut Family<'_, '_>, shared: &Shared) -> std::fmt::Result {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    f.counter(
        "spliced_reloads",
        "Reloads (SIGHUP), by result.",
        [
            ("ok", &shared.reloads.done),
            ("failed", &shared.reloads.failed),
        ]
        .map(|(r, n)| (vec![("result", r.to_owned())], load(n))),
    )?;
    match &shared.registry {
        Some(r) => registry(f, r),
        None => Ok(()),
    }
}

/// This edge's view of the registry, so that an operator can tell whether edges agree.
fn registry(f: &mut Family<'_, '_>, r: &crate::registry::Status) -> std::fmt::Result {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    f.gauge(
        "spliced_registry_connected",
        "1 while the registry is watched; 0 while it cannot be reached (the last state is served).",
        [(vec![], i64::from(r.connected.load(Ordering::Relaxed)))],
    )?;
    f.gauge(
        "spliced_registry_revision",
        "The registry revision of the state served.",
        [(vec![], r.revision.load(Ordering::Relaxed))],
    )?;
    f.gauge(
        "spliced_registry_machines",
        "Machines the registry lists, over every app.",
        [(vec![], gauge_of(load(&r.machines)))],
    )?;
    f.gauge(
        "spliced_registry_left_out",
        "Apps and machine records of the registry the state served leaves out (see the log).",
        [(
            vec![],
            gauge_of(
                r.left_out
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len() as u64,
            ),
        )],
    )?;
    f.counter(
        "spliced_registry_updates",
        "States taken from the registry: whole loads and watched changes.",
        [(vec![], load(&r.updates))],
    )?;
    f.counter(
        "spliced_registry_reconnects",
        "Times the registry's connection was lost and tried again.",
        [(vec![], load(&r.reconnects))],
    )
}

fn services(f: &mut Family<'_, '_>, pools: &[Arc<Pool>]) -> std::fmt::Result {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let svc = |p: &Pool| vec![("service", p.service.clone())];
    f.gauge(
        "spliced_service_queued",
        "Connections waiting for a machine's slot now.",
        pools
            .iter()
            .map(|p| (svc(p), gauge_of(load(&p.stats.queued)))),
    )?;
    for (name, help, pick) in [
        (
            "spliced_service_dequeued",
            "Connections that waited for a slot, then got one.",
            (|p: &crate::balance::PoolStats| &p.dequeued) as fn(&_) -> &_,
        ),
        (
            "spliced_service_queue_full",
            "Connections refused because the queue was full.",
            |p| &p.queue_full,
        ),
        (
            "spliced_service_queue_timeouts",
            "Connections closed after waiting too long for a slot.",
            |p| &p.queue_timeouts,
        ),
        (
            "spliced_service_connect_retries",
            "Connects retried on another machine after one failed.",
            |p| &p.retried,
        ),
        (
            "spliced_service_waited_for_start",
            "Connections that found no machine running and waited for one to start.",
            |p| &p.waited_for_start,
        ),
        (
            "spliced_service_start_failures",
            "Connections refused because no machine could be started for them.",
            |p| &p.start_failures,
        ),
    ] {
        f.counter(
            name,
            help,
            pools.iter().map(|p| (svc(p), load(pick(&p.stats)))),
        )?;
    }
    let machines = || {
        pools.iter().flat_map(|p| {
            p.machines.iter().map(move |m| {
                (
                    vec![("service", p.service.clone()), ("machine", m.id.clone())],
                    m,
                )
            })
        })
    };
    f.gauge(
        "spliced_machine_connections_active",
        "Connections routed to the machine now.",
        machines().map(|(l, m)| (l, gauge_of(load(&m.active)))),
    )?;
    f.counter(
        "spliced_machine_connections",
        "Connections routed to the machine.",
        machines().map(|(l, m)| (l, load(&m.chosen))),
    )?;
    f.counter(
        "spliced_machine_connect_failures",
        "Connects to the machine that failed or timed out.",
        machines().map(|(l, m)| (l, load(&m.connect_failures))),
    )?;
    f.gauge(
        "spliced_machine_healthy",
        "1 when the machine passes its health checks (or has none).",
        machines().map(|(l, m)| (l, i64::from(m.healthy.load(Ordering::Relaxed)))),
    )?;
    f.counter(
        "spliced_machine_checks",
        "Health checks of the machine that ran, passed or failed.",
        machines().map(|(l, m)| (l, load(&m.checks))),
    )?;
    f.counter(
        "spliced_machine_check_failures",
        "Health checks of the machine that failed.",
        machines().map(|(l, m)| (l, load(&m.check_failures))),
    )?;
    f.histogram(
        "spliced_machine_connect_seconds",
        "How long connects to the machine took that succeeded.",
        machines().map(|(l, m)| (l, &m.connect_seconds)),
    )?;
    f.gauge(
        "spliced_machine_running",
        "1 when the machine can take connections (spliced's own machines: started).",
        machines().map(|(l, m)| (l, i64::from(m.running()))),
    )
}

fn kernel(
    f: &mut Family<'_, '_>,
    current: &super::generation::Generation,
    s: &crate::dataplane::sockmap::Splicer,
    shared: &Shared,
) -> std::fmt::Result {
    let totals: Vec<(String, proxy_common::ServiceCounters)> = current
        .pools
        .iter()
        .zip(&current.config.services)
        .map(|(p, service)| (p.service.clone(), shared.service_totals(service.id)))
        .collect();
    let svc = |name: &String| vec![("service", name.clone())];
    f.counter(
        "spliced_kernel_bytes",
        "Bytes the kernel moved between the two sockets of the service's connections, by \
         direction.",
        totals.iter().flat_map(|(n, t)| {
            [
                ("to_backend", t.bytes_to_backend),
                ("to_client", t.bytes_to_client),
            ]
            .map(|(d, v)| {
                let mut l = svc(n);
                l.push(("direction", d.to_owned()));
                (l, v)
            })
        }),
    )?;
    for (name, help, pick) in [
        (
            "spliced_kernel_holds",
            "Senders held back at the per-direction bound.",
            (|t: &proxy_common::ServiceCounters| t.holds) as fn(&_) -> u64,
        ),
        (
            "spliced_kernel_redirect_failures",
            "Batches the kernel refused to redirect.",
            |t| t.redirect_failures,
        ),
        (
            "spliced_kernel_stream_faults",
            "Batches that did not continue their stream (the connection is aborted).",
            |t| t.stream_faults,
        ),
        (
            "spliced_kernel_events_lost",
            "Kernel events lost to a full ring buffer.",
            |t| t.events_lost,
        ),
    ] {
        f.counter(name, help, totals.iter().map(|(n, t)| (svc(n), pick(t))))?;
    }
    f.counter(
        "spliced_userspace_moved_bytes",
        "Bytes of kernel-plane connections that userspace carried itself (at their end).",
        one(s.moved_bytes.load(Ordering::Relaxed)),
    )?;
    f.gauge(
        "spliced_bpf_map_entries",
        "Entries in each BPF map of the data plane.",
        s.kernel
            .entry_counts()
            .into_iter()
            .map(|(map, n)| (vec![("map", map.to_owned())], gauge_of(n as u64))),
    )
}

fn buffers(f: &mut Family<'_, '_>, shared: &Shared) -> std::fmt::Result {
    f.gauge(
        "spliced_buffer_budget_bytes",
        "Kernel memory the proxied sockets of all connections may hold (--buffer-budget).",
        one(gauge_of(shared.budget.total())),
    )?;
    f.gauge(
        "spliced_buffer_bound_bytes",
        "The per-direction bound the buffer budget gives each connection now.",
        one(gauge_of(shared.budget.bound())),
    )
}

fn process(f: &mut Family<'_, '_>) -> std::fmt::Result {
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
        // SAFETY: sysconf reads a constant of the system.
        .map(|pages| pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) });
    let fds = std::fs::read_dir("/proc/self/fd").map(Iterator::count).ok();
    f.gauge(
        "spliced_process_resident_memory_bytes",
        "Resident memory of the daemon.",
        rss.map(|v| (Vec::new(), v)),
    )?;
    f.gauge(
        "spliced_process_open_fds",
        "File descriptors the daemon has open.",
        fds.map(|v| (Vec::new(), gauge_of(v as u64))),
    )
}

/// The text of one scrape.
fn render(shared: &Arc<Shared>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(Arc::clone(shared))));
    let mut out = String::new();
    // Writing to a String fails only if a collector fails, which these do not.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

/// Serves `GET /metrics` on `addr` over HTTP/1.1.
pub(super) async fn start_metrics(
    addr: SocketAddr,
    shared: Arc<Shared>,
    inherited: Option<std::net::TcpListener>,
) -> Result<(tokio::task::JoinHandle<()>, std::os::fd::OwnedFd), StartError> {
    let error = |source| StartError::Metrics { addr, source };
    let listener = match inherited {
        // Handed over by the process this one upgraded.
        Some(l) => {
            l.set_nonblocking(true).map_err(error)?;
            tokio::net::TcpListener::from_std(l).map_err(error)?
        }
        None => tokio::net::TcpListener::bind(addr).await.map_err(error)?,
    };
    let copy = std::os::fd::AsFd::as_fd(&listener)
        .try_clone_to_owned()
        .map_err(error)?;
    tracing::info!(%addr, "metrics served at /metrics");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let shared = Arc::clone(&shared);
                    async move {
                        let response = if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header("content-type", prometheus_text::CONTENT_TYPE)
                                .body(Full::new(Bytes::from(render(&shared))))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                        };
                        response.map_err(std::io::Error::other)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((task, copy))
}
