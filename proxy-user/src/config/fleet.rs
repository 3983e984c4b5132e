//! Several apps served together, as a registry lists them: each app's fly.toml read with the
//! machines the registry lists for it, then the apps merged into one [`Config`] whose
//! services and machines are named `app/name`. A service keeps its id from one merge to the
//! next (the kernel counts per id); an app that cannot be served whole (a port another app
//! has, a handler spliced lacks) is refused whole and the others are served.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Config, ConfigError, Machine, Protocol, source::Reader};

/// The apps merged, and one line per app left out and why.
#[derive(Debug)]
pub struct Merged {
    pub config: Config,
    pub refused: Vec<String>,
}

/// Adds a registry's `machines` to an app's own: they may not share an id, and the app may not
/// list machines spliced runs (every edge would run them).
pub(super) fn add_machines(r: &mut Reader<'_>, config: &mut Config, machines: Vec<Machine>) {
    for (i, m) in config.machines.iter().enumerate() {
        if m.command.is_some() {
            r.error(
                0,
                &format!("machines[{i}].command"),
                "an app from a registry cannot list machines spliced runs: every edge would run them",
            );
        }
    }
    for m in machines {
        if config.machines.iter().any(|own| own.id == m.id) {
            r.error(
                0,
                "machines",
                format!(
                    "machine id {:?} is both in the file and in the registry",
                    m.id
                ),
            );
            continue;
        }
        for group in &m.processes {
            if !config.process_groups.contains(group) {
                r.warn(
                    0,
                    "machines",
                    format!(
                        "machine {:?} runs process group {group:?}, which the app does not have ({})",
                        m.id,
                        config.process_groups.join(", ")
                    ),
                );
            }
        }
        config.machines.push(m);
    }
}

impl Config {
    /// A config that serves nothing.
    pub fn empty() -> Self {
        Self {
            app: None,
            primary_region: None,
            env: Vec::new(),
            process_groups: Vec::new(),
            services: Vec::new(),
            machines: Vec::new(),
            kill_signal: None,
            kill_timeout: None,
            ignored: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Checks one app of a registry: its fly.toml `text` (named `file` in messages), served by
    /// `machines` and by no implicit local machine.
    pub fn parse_app(file: &str, text: &str, machines: Vec<Machine>) -> Result<Self, ConfigError> {
        Self::parse_with(file, text, Some(machines))
    }

    /// One config serving every app of `apps` (name and config) that can be served beside the
    /// others, in the order given; `prev`, the merge served before, whose services keep their
    /// ids.
    pub fn merge(apps: Vec<(String, Config)>, prev: Option<&Config>) -> Merged {
        let mut out = Config::empty();
        let mut refused = Vec::new();
        let mut claimed: BTreeMap<(u16, Protocol), String> = BTreeMap::new();
        for (app, config) in apps {
            let problems = config.unservable();
            if !problems.is_empty() {
                refused.push(format!("app {app}: {}", problems.join("; ")));
                continue;
            }
            let taken = config.public_ports().find_map(|(s, p)| {
                claimed
                    .get(&(p.port, s.protocol))
                    .map(|other| (p.port, other.clone()))
            });
            if let Some((port, other)) = taken {
                refused.push(format!(
                    "app {app}: public port {port} is served by app {other} already"
                ));
                continue;
            }
            let total = out.services.len() + config.services.len();
            if total > proxy_common::MAX_SERVICES as usize {
                refused.push(format!(
                    "app {app}: {total} services with the apps before it; spliced serves at most {}",
                    proxy_common::MAX_SERVICES
                ));
                continue;
            }
            for (s, p) in config.public_ports() {
                claimed.insert((p.port, s.protocol), app.clone());
            }
            // Only the file's app may list machines spliced runs: they run as it says.
            if config.machines.iter().any(|m| m.command.is_some()) {
                out.env.clone_from(&config.env);
                out.kill_signal.clone_from(&config.kill_signal);
                out.kill_timeout = config.kill_timeout;
            }
            let scoped = |id: &str| format!("{app}/{id}");
            out.machines
                .extend(config.machines.into_iter().map(|m| Machine {
                    id: scoped(&m.id),
                    ..m
                }));
            let region = config.primary_region;
            out.services.extend(config.services.into_iter().map(|s| {
                let machines = s.machines.iter().map(|m| scoped(m)).collect();
                let name = scoped(&s.name);
                super::Service {
                    name,
                    machines,
                    region: region.clone(),
                    ..s
                }
            }));
            out.warnings.extend(config.warnings);
        }
        assign_ids(&mut out, prev);
        Merged {
            config: out,
            refused,
        }
    }
}

/// A service of `prev` keeps its id; a new one takes an id no service of `prev` has, above
/// theirs while there is one, so that a removed service's counters are not a new one's.
fn assign_ids(config: &mut Config, prev: Option<&Config>) {
    let before: HashMap<&str, u32> = prev
        .map(|p| p.services.iter().map(|s| (s.name.as_str(), s.id)).collect())
        .unwrap_or_default();
    let mut used: HashSet<u32> = HashSet::new();
    for s in &mut config.services {
        if let Some(&id) = before.get(s.name.as_str()) {
            s.id = id;
            used.insert(id);
        }
    }
    let held: HashSet<u32> = before.values().copied().collect();
    let mut next = before.values().map(|id| id + 1).max().unwrap_or(0);
    for s in &mut config.services {
        if before.contains_key(s.name.as_str()) {
            continue;
        }
        let id = if next < proxy_common::MAX_SERVICES {
            next += 1;
            next - 1
        } else {
            (0..proxy_common::MAX_SERVICES)
                .find(|id| !used.contains(id) && !held.contains(id))
                .or_else(|| (0..proxy_common::MAX_SERVICES).find(|id| !used.contains(id)))
                .unwrap_or(0)
        };
        s.id = id;
        used.insert(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, address: &str) -> Machine {
        Machine {
            id: id.to_owned(),
            address: address.parse().expect("address"),
            processes: Vec::new(),
            region: None,
            command: None,
            dir: None,
        }
    }

    fn app(port: u16, internal: u16, machines: &[&str]) -> Config {
        let text = format!(
            "primary_region = \"ams\"\n[[services]]\ninternal_port = {internal}\n[[services.ports]]\nport = {port}\n"
        );
        let machines = machines
            .iter()
            .enumerate()
            .map(|(i, a)| machine(&format!("m{i}"), a))
            .collect();
        Config::parse_app("t", &text, machines).expect("valid")
    }

    #[test]
    fn apps_merge_named_by_app_with_stable_ids() {
        let merged = Config::merge(
            vec![
                ("b".to_owned(), app(8002, 9002, &["10.0.0.2"])),
                ("c".to_owned(), app(8003, 9003, &["10.0.0.3", "10.0.0.4"])),
            ],
            None,
        );
        assert!(merged.refused.is_empty(), "{:?}", merged.refused);
        let c = &merged.config;
        let names: Vec<(&str, u32)> = c.services.iter().map(|s| (s.name.as_str(), s.id)).collect();
        assert_eq!(names, [("b/services[0]", 0), ("c/services[0]", 1)]);
        assert_eq!(c.services[1].machines, ["c/m0", "c/m1"]);
        assert_eq!(c.services[1].region.as_deref(), Some("ams"));
        assert_eq!(c.machines.len(), 3);
        // An app added before the others leaves their ids alone; a removed one's id is not
        // given to the new one.
        let again = Config::merge(
            vec![
                ("a".to_owned(), app(8001, 9001, &[])),
                ("c".to_owned(), app(8003, 9003, &["10.0.0.3"])),
            ],
            Some(c),
        );
        let ids: Vec<(&str, u32)> = again
            .config
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.id))
            .collect();
        assert_eq!(ids, [("a/services[0]", 2), ("c/services[0]", 1)]);
        assert_eq!(
            again.config.services[0].machines.len(),
            0,
            "no implicit local machine"
        );
    }

    #[test]
    fn an_app_whose_port_is_taken_is_refused_whole() {
        let merged = Config::merge(
            vec![
                ("a".to_owned(), app(8001, 9001, &["10.0.0.2"])),
                ("b".to_owned(), app(8001, 9002, &["10.0.0.3"])),
            ],
            None,
        );
        assert_eq!(merged.config.services.len(), 1);
        assert_eq!(
            merged.refused,
            ["app b: public port 8001 is served by app a already"]
        );
    }

    #[test]
    fn a_registry_app_runs_no_machine_and_shares_no_machine_id() {
        let text = "[[services]]\ninternal_port = 9000\n[[services.ports]]\nport = 8000\n\
                    [[machines]]\nid = \"m0\"\ncommand = [\"sleep\", \"9\"]\n";
        let e = Config::parse_app("t", text, vec![machine("m0", "10.0.0.2")])
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("machines[0].command: an app from a registry cannot"),
            "{e}"
        );
        assert!(
            e.contains("machine id \"m0\" is both in the file and in the registry"),
            "{e}"
        );
    }
}
