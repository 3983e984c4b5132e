//! A machine as the registry keeps it: JSON under `PREFIX/apps/<app>/machines/<id>`, with the
//! fields of `[[machines]]` an edge routes by. A machine spliced runs (`command`) cannot come
//! from a registry: every edge would run it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::Machine;

/// One machine's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineRecord {
    /// Where its services accept, at their `internal_port`.
    pub address: IpAddr,
    /// Process groups it runs; empty: every group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// The key of machine `id` of `app` under `prefix`.
pub fn machine_key(prefix: &str, app: &str, id: &str) -> String {
    format!("{prefix}/apps/{app}/machines/{id}")
}

/// Whether `name` can be an app name or a machine id in a key: not empty, no `/`, no space.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.contains(char::is_whitespace)
}

/// Reads the record of machine `id`.
pub(super) fn machine(id: &str, record: &[u8]) -> Result<Machine, String> {
    if !valid_name(id) {
        return Err(format!("{id:?} is not a machine id"));
    }
    let r: MachineRecord = serde_json::from_slice(record).map_err(|e| e.to_string())?;
    Ok(Machine {
        id: id.to_owned(),
        address: r.address,
        processes: r.processes,
        region: r.region,
        command: None,
        dir: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_as_machines_and_bad_ones_say_why() {
        let m = machine(
            "m1",
            br#"{"address":"10.0.0.2","processes":["web"],"region":"ams"}"#,
        )
        .expect("valid");
        assert_eq!(m.address.to_string(), "10.0.0.2");
        assert_eq!(m.processes, ["web"]);
        assert_eq!(m.region.as_deref(), Some("ams"));
        let e = machine("m1", br#"{"address":"10.0.0.300"}"#).expect_err("bad address");
        assert!(e.contains("invalid"), "{e}");
        let e = machine("m1", br#"{"address":"10.0.0.2","command":["x"]}"#).expect_err("command");
        assert!(e.contains("unknown field `command`"), "{e}");
        assert!(machine("a/b", br#"{"address":"10.0.0.2"}"#).is_err());
    }
}
