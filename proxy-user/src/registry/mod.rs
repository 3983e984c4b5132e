//! The etcd registry (`--registry etcd://HOST:PORT[,HOST:PORT...]/PREFIX`): each app's
//! fly.toml text under `PREFIX/apps/<app>/config`, each machine of it as JSON under
//! `PREFIX/apps/<app>/machines/<id>`. An edge loads everything under `PREFIX/apps/`, then
//! watches it from the revision it has: each change is a new [`Apps`] for the daemon to
//! serve. While etcd cannot be reached the edge keeps the last state it had and retries with
//! backoff; back, it watches from its revision, or loads whole when that was compacted.

mod records;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    str::FromStr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use serde::Serialize;
use tokio::sync::watch;

pub use records::{MachineRecord, machine_key, valid_name};

use crate::config::Config;

/// How long one attempt to reach etcd may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The first delay before etcd is tried again, doubling to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often a quiet connection to etcd is probed, and how long a probe may go unanswered
/// before the member counts as gone.
const KEEPALIVE: Duration = Duration::from_secs(2);

/// Where the registry is: `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub endpoints: Vec<String>,
    /// Every key starts with it: `/PREFIX`, without a trailing slash.
    pub prefix: String,
}

impl FromStr for Url {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| RegistryError::Url {
            url: s.to_owned(),
            why: why.to_owned(),
        };
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX"))?;
        let (hosts, prefix) = rest
            .split_once('/')
            .ok_or_else(|| bad("no /PREFIX after the members"))?;
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(bad("the PREFIX is empty"));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("member {host:?} has no :PORT")))?;
            if name.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad(&format!("member {host:?} is not HOST:PORT")));
            }
            endpoints.push(host.to_owned());
        }
        Ok(Self {
            endpoints,
            prefix: format!("/{prefix}"),
        })
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}{}", self.endpoints.join(","), self.prefix)
    }
}

/// How to authenticate to etcd: a CA for its certificates and a client certificate
/// (`--registry-ca`, `--registry-cert`, `--registry-key`), a user and password
/// (`--registry-user`, the password from `SPLICED_REGISTRY_PASSWORD`).
#[derive(Clone, Debug, Default)]
pub struct Access {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<(String, String)>,
}

/// The registry and how to reach it.
#[derive(Clone, Debug)]
pub struct Settings {
    pub url: Url,
    pub access: Access,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("--registry {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd {url}: {source}")]
    Etcd {
        url: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {url}: no answer within {CONNECT_TIMEOUT:?}")]
    Timeout { url: String },
    #[error("etcd {url}: {why}")]
    Watch { url: String, why: String },
    #[error("{0}")]
    Invalid(String),
}

impl Settings {
    fn etcd(&self, source: etcd_client::Error) -> RegistryError {
        RegistryError::Etcd {
            url: self.url.to_string(),
            source,
        }
    }

    fn timeout(&self) -> RegistryError {
        RegistryError::Timeout {
            url: self.url.to_string(),
        }
    }

    /// The key of `app`'s fly.toml.
    pub fn config_key(&self, app: &str) -> String {
        format!("{}/apps/{app}/config", self.url.prefix)
    }

    /// The key of machine `id` of `app`.
    pub fn machine_key(&self, app: &str, id: &str) -> String {
        machine_key(&self.url.prefix, app, id)
    }

    fn apps_prefix(&self) -> String {
        format!("{}/apps/", self.url.prefix)
    }

    /// A client of the cluster: any member that answers serves it.
    pub async fn connect(&self) -> Result<Client, RegistryError> {
        let tls = self.access.ca.is_some() || self.access.cert.is_some();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE, KEEPALIVE)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if tls {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| RegistryError::File {
                    path: path.clone(),
                    source,
                })
            };
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &self.access.ca {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            match (&self.access.cert, &self.access.key) {
                (Some(cert), Some(key)) => {
                    t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
                }
                (None, None) => {}
                _ => {
                    return Err(RegistryError::Invalid(
                        "--registry-cert and --registry-key go together".to_owned(),
                    ));
                }
            }
            options = options.with_tls(t);
        }
        if let Some((user, password)) = &self.access.user {
            options = options.with_user(user.clone(), password.clone());
        }
        let scheme = if tls { "https://" } else { "http://" };
        let endpoints: Vec<String> = self
            .url
            .endpoints
            .iter()
            .map(|e| format!("{scheme}{e}"))
            .collect();
        tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| self.timeout())?
            .map_err(|e| self.etcd(e))
    }

    /// Everything under `PREFIX/apps/`, and the revision it was read at.
    pub async fn load(&self, client: &mut Client) -> Result<(Apps, i64), RegistryError> {
        let read = client.get(self.apps_prefix(), Some(GetOptions::new().with_prefix()));
        let resp = tokio::time::timeout(CONNECT_TIMEOUT, read)
            .await
            .map_err(|_| self.timeout())?
            .map_err(|e| self.etcd(e))?;
        let mut apps = Apps::default();
        for kv in resp.kvs() {
            apps.apply(&self.url.prefix, kv.key(), Some(kv.value()));
        }
        let revision = resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        Ok((apps, revision))
    }
}

/// What the registry holds, per app: its fly.toml and its machines' records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Apps(BTreeMap<String, App>);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct App {
    config: Option<String>,
    machines: BTreeMap<String, Vec<u8>>,
}

/// The config the apps make together, and what of them could not be served.
#[derive(Debug)]
pub struct Composed {
    pub config: Config,
    pub problems: Vec<String>,
}

impl Apps {
    /// Notes a put (`value`) or a delete of `key`; keys that are neither an app's config nor
    /// one of its machines are left alone.
    fn apply(&mut self, prefix: &str, key: &[u8], value: Option<&[u8]>) {
        let Some(rest) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(prefix))
            .and_then(|k| k.strip_prefix("/apps/"))
        else {
            return;
        };
        let (app, what) = rest.split_once('/').unwrap_or((rest, ""));
        let entry = self.0.entry(app.to_owned()).or_default();
        if what == "config" {
            entry.config = value.map(|v| String::from_utf8_lossy(v).into_owned());
        } else if let Some(id) = what.strip_prefix("machines/") {
            match value {
                Some(v) => entry.machines.insert(id.to_owned(), v.to_vec()),
                None => entry.machines.remove(id),
            };
        }
        if entry.config.is_none() && entry.machines.is_empty() {
            self.0.remove(app);
        }
    }

    /// Machines listed, over every app.
    pub fn machine_count(&self) -> usize {
        self.0.values().map(|a| a.machines.len()).sum()
    }

    /// The apps with a config, each read with its machines, merged with `file` (the
    /// `--config` app, if any) into one config; `prev`, the config served until now, whose
    /// services keep their ids. An app whose fly.toml does not read is served by the last of
    /// its texts that did (kept in `good`), if any; what cannot be served is left out and
    /// named in [`Composed::problems`].
    pub fn compose(
        &self,
        prefix: &str,
        file: Option<&Config>,
        prev: Option<&Config>,
        good: &mut HashMap<String, String>,
    ) -> Composed {
        let mut problems = Vec::new();
        let mut parts = Vec::new();
        if let Some(file) = file {
            let name = file.app.clone().unwrap_or_else(|| "local".to_owned());
            parts.push((name, file.clone()));
        }
        good.retain(|name, _| self.0.get(name).is_some_and(|a| a.config.is_some()));
        for (name, app) in &self.0 {
            let Some(text) = &app.config else {
                continue;
            };
            let mut machines = Vec::new();
            for (id, record) in &app.machines {
                let key = machine_key(prefix, name, id);
                match records::machine(id, record) {
                    Ok(m) => machines.push(m),
                    Err(why) => problems.push(format!("{key}: left out: {why}")),
                }
            }
            let file = format!("etcd:{prefix}/apps/{name}/config");
            match Config::parse_app(&file, text, machines.clone()) {
                Ok(config) => {
                    good.insert(name.clone(), text.clone());
                    parts.push((name.clone(), config));
                }
                Err(e) => {
                    let before = good
                        .get(name)
                        .and_then(|t| Config::parse_app(&file, t, machines).ok());
                    let still = if before.is_some() {
                        "still serving the config before"
                    } else {
                        "app left out"
                    };
                    problems.push(format!("app {name}: {still}: {e}"));
                    if let Some(config) = before {
                        parts.push((name.clone(), config));
                    }
                }
            }
        }
        let merged = Config::merge(parts, prev);
        problems.extend(merged.refused);
        Composed {
            config: merged.config,
            problems,
        }
    }
}

/// What an edge knows of the registry, for the admin snapshot and the metrics.
#[derive(Debug, Default, Serialize)]
pub struct Status {
    pub url: String,
    /// Whether a watch is established now.
    pub connected: AtomicBool,
    /// The revision of the state served.
    pub revision: AtomicI64,
    pub apps: AtomicU64,
    pub machines: AtomicU64,
    /// New states taken from the registry (each one served, or refused in part).
    pub updates: AtomicU64,
    /// Whole loads: the first, and each after a compaction passed the revision held.
    pub full_loads: AtomicU64,
    /// Times the connection to etcd was lost and tried again.
    pub reconnects: AtomicU64,
    /// Why the last attempt failed, while not connected.
    pub last_error: Mutex<Option<String>>,
    /// What the state served leaves out (apps, machine records) and why.
    pub left_out: Mutex<Vec<String>>,
}

impl Status {
    pub fn left_out(&self, problems: Vec<String>) {
        *self.left_out.lock().unwrap_or_else(PoisonError::into_inner) = problems;
    }

    fn failed(&self, why: String) {
        self.connected.store(false, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(why);
    }

    fn took(&self, apps: &Apps, revision: i64) {
        self.revision.store(revision, Ordering::Relaxed);
        self.apps.store(apps.0.len() as u64, Ordering::Relaxed);
        self.machines
            .store(apps.machine_count() as u64, Ordering::Relaxed);
        self.updates.fetch_add(1, Ordering::Relaxed);
    }
}

/// An edge's view of the registry, kept up to date by [`Follower::follow`].
pub struct Follower {
    settings: Settings,
    pub status: Arc<Status>,
    apps: watch::Sender<Arc<Apps>>,
    revision: i64,
}

impl Follower {
    /// Loads the registry whole, trying for at most `wait`; if etcd cannot be reached by then,
    /// the view starts empty (and [`Follower::follow`] keeps trying).
    pub async fn start(settings: Settings, wait: Duration) -> Self {
        let status = Arc::new(Status {
            url: settings.url.to_string(),
            ..Status::default()
        });
        let mut follower = Self {
            settings,
            status,
            apps: watch::Sender::new(Arc::default()),
            revision: 0,
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut backoff = FIRST_BACKOFF;
        loop {
            match follower.load_whole().await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                    tracing::debug!("registry: {e}; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    tracing::warn!(
                        "registry: {e}; starting with nothing to serve and trying again"
                    );
                    follower.status.failed(e.to_string());
                    break;
                }
            }
        }
        follower
    }

    /// Whether the registry has been read whole yet.
    pub fn loaded(&self) -> bool {
        self.status.full_loads.load(Ordering::Relaxed) > 0
    }

    /// The apps as last read; changes with each update.
    pub fn apps(&self) -> watch::Receiver<Arc<Apps>> {
        self.apps.subscribe()
    }

    pub fn prefix(&self) -> &str {
        &self.settings.url.prefix
    }

    async fn load_whole(&mut self) -> Result<(), RegistryError> {
        let mut client = self.settings.connect().await?;
        self.reload(&mut client).await
    }

    async fn reload(&mut self, client: &mut Client) -> Result<(), RegistryError> {
        let (apps, revision) = self.settings.load(client).await?;
        self.revision = revision;
        self.status.full_loads.fetch_add(1, Ordering::Relaxed);
        self.publish(apps);
        tracing::info!(
            revision,
            apps = self.status.apps.load(Ordering::Relaxed),
            machines = self.status.machines.load(Ordering::Relaxed),
            "registry loaded"
        );
        Ok(())
    }

    fn publish(&self, apps: Apps) {
        self.status.took(&apps, self.revision);
        self.apps.send_replace(Arc::new(apps));
    }

    /// Follows the registry until dropped: each change becomes a new state of the apps. A
    /// lost connection is tried again with backoff, the state held meanwhile.
    pub async fn follow(mut self) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let e = self.watch(&mut backoff).await;
            let lost = self.status.connected.load(Ordering::Relaxed);
            self.status.failed(e.to_string());
            if lost {
                self.status.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    revision = self.revision,
                    "registry unreachable ({e}): serving the last state, trying again"
                );
            } else {
                tracing::debug!("registry still unreachable: {e}");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One watch from the revision held, until it fails; `backoff` is reset once it is
    /// established.
    async fn watch(&mut self, backoff: &mut Duration) -> RegistryError {
        let mut client = match self.settings.connect().await {
            Ok(c) => c,
            Err(e) => return e,
        };
        if self.status.full_loads.load(Ordering::Relaxed) == 0
            && let Err(e) = self.reload(&mut client).await
        {
            return e;
        }
        loop {
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(self.revision + 1)
                .with_progress_notify();
            let start = client.watch(self.settings.apps_prefix(), Some(options));
            let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, start).await {
                Err(_) => return self.settings.timeout(),
                Ok(Err(e)) => return self.settings.etcd(e),
                Ok(Ok(s)) => s,
            };
            match self.events(&mut stream, backoff).await {
                Ok(()) => {
                    // Compacted past the revision held: what changed meanwhile is gone from
                    // the history, so the state is read whole.
                    tracing::warn!(
                        revision = self.revision,
                        "registry compacted past the revision held: loading it whole"
                    );
                    if let Err(e) = self.reload(&mut client).await {
                        return e;
                    }
                }
                Err(e) => return e,
            }
        }
    }

    /// Applies the events of one watch; `Ok` when the watch was cancelled by a compaction.
    async fn events(
        &mut self,
        stream: &mut etcd_client::WatchStream,
        backoff: &mut Duration,
    ) -> Result<(), RegistryError> {
        let url = self.settings.url.to_string();
        let gone = |why: String| RegistryError::Watch {
            url: url.clone(),
            why,
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(gone("the watch ended".to_owned())),
                Err(e) => return Err(self.settings.etcd(e)),
            };
            if resp.compact_revision() > 0 {
                return Ok(());
            }
            if resp.canceled() {
                return Err(gone(format!("watch cancelled: {}", resp.cancel_reason())));
            }
            if resp.created() && !self.status.connected.swap(true, Ordering::Relaxed) {
                *backoff = FIRST_BACKOFF;
                *self
                    .status
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                tracing::info!(revision = self.revision, "registry watched");
            }
            if resp.events().is_empty() {
                continue;
            }
            let mut apps = Apps::clone(&self.apps.borrow());
            for ev in resp.events() {
                let Some(kv) = ev.kv() else {
                    continue;
                };
                let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                apps.apply(&self.settings.url.prefix, kv.key(), value);
                self.revision = self.revision.max(kv.mod_revision());
            }
            self.publish(apps);
        }
    }
}

pub mod ops;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_members_and_a_prefix() {
        let u: Url = "etcd://127.0.0.1:2379,10.0.0.1:2379/fleet/"
            .parse()
            .expect("valid");
        assert_eq!(u.endpoints, ["127.0.0.1:2379", "10.0.0.1:2379"]);
        assert_eq!(u.prefix, "/fleet");
        assert_eq!(u.to_string(), "etcd://127.0.0.1:2379,10.0.0.1:2379/fleet");
        for bad in [
            "http://h:1/p",
            "etcd://h:1",
            "etcd://h:1/",
            "etcd://h/p",
            "etcd://h:x/p",
        ] {
            assert!(bad.parse::<Url>().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_app_whose_new_config_does_not_read_is_served_as_it_last_read() {
        let p = "/f";
        let mut apps = Apps::default();
        let good = "[[services]]\ninternal_port = 9000\n[[services.ports]]\nport = 8000\n";
        apps.apply(p, b"/f/apps/web/config", Some(good.as_bytes()));
        apps.apply(
            p,
            b"/f/apps/web/machines/m1",
            Some(br#"{"address":"10.0.0.2"}"#),
        );
        apps.apply(p, b"/f/apps/web/machines/bad", Some(b"{}"));
        apps.apply(p, b"/elsewhere/apps/x/config", Some(b"ignored"));
        let mut texts = HashMap::new();
        let first = apps.compose(p, None, None, &mut texts);
        assert_eq!(first.config.services[0].machines, ["web/m1"]);
        assert_eq!(first.problems.len(), 1, "{:?}", first.problems);
        assert!(first.problems[0].starts_with("/f/apps/web/machines/bad: left out"));
        apps.apply(p, b"/f/apps/web/config", Some(b"[[services]\n"));
        apps.apply(
            p,
            b"/f/apps/web/machines/m2",
            Some(br#"{"address":"10.0.0.3"}"#),
        );
        let next = apps.compose(p, None, Some(&first.config), &mut texts);
        assert_eq!(next.config.services[0].machines, ["web/m1", "web/m2"]);
        assert!(
            next.problems
                .iter()
                .any(|l| l.starts_with("app web: still serving the config before")),
            "{:?}",
            next.problems
        );
        apps.apply(p, b"/f/apps/web/config", None);
        let gone = apps.compose(p, None, Some(&next.config), &mut texts);
        assert_eq!(gone.config.services.len(), 0);
        assert_eq!(texts.len(), 0);
    }
}
