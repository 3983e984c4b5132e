//! `[[machines]]`, spliced's addition: where each process group runs.

use super::{Config, IpAddr, MACHINE_KEYS, Machine, Reader, Sites, Table};

pub(super) fn read_machine(
    r: &mut Reader<'_>,
    t: Table<'_, '_>,
    config: &mut Config,
    sites: &mut Sites,
) {
    r.unknown_keys(t, MACHINE_KEYS);
    let id = machine_id(r, t);
    if let Some(id) = &id
        && config.machines.iter().any(|m| &m.id == id)
        && let Some(v) = t.get("id")
    {
        r.error(
            v.span().start,
            &t.field("id"),
            format!("machine id {id:?} is used twice"),
        );
    }
    let command = machine_command(r, t);
    let dir = t.get("dir").and_then(|v| r.string(v, &t.field("dir")));
    // A machine spliced runs listens on the host unless told otherwise.
    let address = if command.is_some() && t.get("address").is_none() {
        Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
    } else {
        machine_address(r, t)
    };
    let mut processes = Vec::new();
    let mut process_sites = Vec::new();
    if let Some(v) = t.get("processes")
        && let Some(list) = r.strings(v, &t.field("processes"))
    {
        for p in list {
            process_sites.push(p.span().start);
            processes.push(p.into_inner());
        }
    }
    let region = t
        .get("region")
        .and_then(|v| r.string(v, &t.field("region")));
    if let (Some(id), Some(address)) = (id, address) {
        config.machines.push(Machine {
            id,
            address,
            processes,
            region,
            command,
            dir,
        });
        sites.machine_processes.push(process_sites);
    }
}

pub(super) fn machine_id(r: &mut Reader<'_>, t: Table<'_, '_>) -> Option<String> {
    let Some(v) = t.get("id") else {
        r.error(t.span.0, t.path, "a machine needs an id");
        return None;
    };
    let id = r.string(v, &t.field("id"))?;
    if id.is_empty() || id.contains(char::is_whitespace) {
        r.error(
            v.span().start,
            &t.field("id"),
            format!("{id:?} is not a machine id"),
        );
        return None;
    }
    Some(id)
}

pub(super) fn machine_address(r: &mut Reader<'_>, t: Table<'_, '_>) -> Option<IpAddr> {
    let Some(v) = t.get("address") else {
        r.error(t.span.0, t.path, "a machine needs an address");
        return None;
    };
    let a = r.string(v, &t.field("address"))?;
    let parsed = a.parse::<IpAddr>().ok();
    if parsed.is_none() {
        r.error(
            v.span().start,
            &t.field("address"),
            format!("{a:?} is not an IP address (the port is the service's internal_port)"),
        );
    }
    parsed
}

/// `command`: a non-empty list of strings, the program first.
fn machine_command(r: &mut Reader<'_>, t: Table<'_, '_>) -> Option<Vec<String>> {
    let v = t.get("command")?;
    let field = t.field("command");
    let list = r.strings(v, &field)?;
    if list.first().is_none_or(|p| p.as_ref().is_empty()) {
        r.error(
            v.span().start,
            &field,
            "a command needs a program: [\"program\", \"arg\", ...]".to_owned(),
        );
        return None;
    }
    Some(list.into_iter().map(toml::Spanned::into_inner).collect())
}
