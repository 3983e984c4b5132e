//! Routing: which service owns each public port (declared ports, fly's 80/443 default for the
//! first service without one, internal-only services), which machines serve each service, and
//! the checks that need the whole file (duplicate ports, unknown process groups).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use super::{
    Config, DEFAULT_PUBLIC_PORTS, Exposure, Machine, Protocol, PublicPort, read::Sites,
    source::Reader, words::did_you_mean,
};

/// Id of the machine spliced assumes when the file names none.
pub const LOCAL_MACHINE: &str = "local";

/// Resolves the routing of `config`; `implicit_local`: a file without machines is served by
/// one local machine.
pub(super) fn resolve(
    r: &mut Reader<'_>,
    config: &mut Config,
    sites: &Sites,
    implicit_local: bool,
) {
    if config.services.len() > proxy_common::MAX_SERVICES as usize {
        r.error(
            0,
            "services",
            format!(
                "{} services; spliced serves at most {}",
                config.services.len(),
                proxy_common::MAX_SERVICES
            ),
        );
    }
    claim_ports(r, config, sites);
    default_ports(r, config, sites);
    check_groups(r, config, sites);
    assign_machines(r, config, sites, implicit_local);
}

/// Two services may not claim the same port and protocol; one service may not list a port
/// twice.
fn claim_ports(r: &mut Reader<'_>, config: &Config, sites: &Sites) {
    let mut claimed: BTreeMap<(u16, Protocol), &str> = BTreeMap::new();
    for (s, port_sites) in config.services.iter().zip(&sites.ports) {
        for (p, (at, field)) in s.ports.iter().zip(port_sites) {
            let proto = match s.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            match claimed.insert((p.port, s.protocol), &s.name) {
                Some(other) if other == s.name => r.error(
                    *at,
                    field,
                    format!("public port {}/{proto} is given twice in {other}", p.port),
                ),
                Some(other) => r.error(
                    *at,
                    field,
                    format!(
                        "public port {}/{proto} is already claimed by {other}",
                        p.port
                    ),
                ),
                None => {}
            }
        }
    }
}

/// The first `[[services]]` block without a public port gets 80 and 443, those no other
/// service claims; any later one is internal-only.
fn default_ports(r: &mut Reader<'_>, config: &mut Config, sites: &Sites) {
    let claimed: Vec<(u16, Protocol)> = config
        .public_ports()
        .map(|(s, p)| (p.port, s.protocol))
        .collect();
    let mut first = true;
    for (s, at) in config.services.iter_mut().zip(&sites.services) {
        if !s.ports.is_empty() {
            continue;
        }
        if !first {
            s.exposure = Exposure::InternalOnly;
            continue;
        }
        first = false;
        s.ports = DEFAULT_PUBLIC_PORTS
            .iter()
            .filter(|&&p| !claimed.contains(&(p, s.protocol)))
            .map(|&port| PublicPort::raw(port, 0))
            .collect();
        if s.ports.is_empty() {
            s.exposure = Exposure::InternalOnly;
            r.warn(
                *at,
                &s.name,
                "declares no public port and 80 and 443 are taken: internal-only",
            );
        } else {
            s.exposure = Exposure::DefaultPorts;
        }
    }
}

/// Process groups named by services and machines must exist.
fn check_groups(r: &mut Reader<'_>, config: &Config, sites: &Sites) {
    let groups: Vec<&str> = config.process_groups.iter().map(String::as_str).collect();
    let named = config
        .services
        .iter()
        .zip(&sites.service_processes)
        .map(|(s, at)| (s.name.clone(), &s.processes, at))
        .chain(
            config
                .machines
                .iter()
                .zip(&sites.machine_processes)
                .enumerate()
                .map(|(i, (m, at))| (format!("machines[{i}]"), &m.processes, at)),
        );
    for (owner, processes, at) in named {
        for (i, (name, at)) in processes.iter().zip(at).enumerate() {
            if groups.contains(&name.as_str()) {
                continue;
            }
            let field = format!("{owner}.processes[{i}]");
            if sites.groups_declared {
                let hint = did_you_mean(name, &groups)
                    .map(|g| format!("; did you mean {g:?}?"))
                    .unwrap_or_default();
                r.error(
                    *at,
                    &field,
                    format!(
                        "no process group {name:?} in [processes] ({}){hint}",
                        groups.join(", ")
                    ),
                );
            } else {
                r.warn(
                    *at,
                    &field,
                    format!(
                        "no [processes] section, so the only process group is \"app\", not {name:?}"
                    ),
                );
            }
        }
    }
}

/// A service is served by every machine that runs one of its process groups; without
/// `[[machines]]`, by one local machine when `implicit_local`.
fn assign_machines(r: &mut Reader<'_>, config: &mut Config, sites: &Sites, implicit_local: bool) {
    if config.machines.is_empty() && implicit_local {
        config.machines.push(Machine {
            id: LOCAL_MACHINE.to_owned(),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            processes: Vec::new(),
            region: None,
            command: None,
            dir: None,
        });
    }
    for (s, at) in config.services.iter_mut().zip(&sites.services) {
        s.machines = config
            .machines
            .iter()
            .filter(|m| {
                s.processes.is_empty()
                    || m.processes.is_empty()
                    || m.processes.iter().any(|p| s.processes.contains(p))
            })
            .map(|m| m.id.clone())
            .collect();
        if s.machines.is_empty() && config.machines.is_empty() {
            r.warn(
                *at,
                &s.name,
                "no machine serves it: its connections will be refused",
            );
        } else if s.machines.is_empty() {
            r.warn(
                *at,
                &s.name,
                format!(
                    "no machine runs its process groups ({}): its connections will be refused",
                    s.processes.join(", ")
                ),
            );
        }
    }
}
