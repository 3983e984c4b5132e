//! `spliced registry`: what an operator does to the registry without etcdctl. A config is
//! checked before it is written; a machine may be written with a lease, kept alive while the
//! command runs (as a host agent would), so that it disappears when its host dies.

use std::{path::Path, time::Duration};

use etcd_client::{Client, DeleteOptions, GetOptions, PutOptions};
use serde::Serialize;

use super::{MachineRecord, RegistryError, Settings, valid_name};
use crate::config::Config;

fn name_ok(what: &str, name: &str) -> Result<(), RegistryError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "{name:?} is not a valid {what}: it must be non-empty, with no '/' and no space"
        )))
    }
}

/// How long an operation is tried again while etcd says it cannot serve it now.
const RETRY_FOR: Duration = Duration::from_secs(10);

/// Runs `op` on a client of the cluster, again while etcd answers that it cannot serve it
/// now (as it does for a moment after its leader died), for at most [`RETRY_FOR`]. Each
/// operation here does the same when done twice.
async fn retrying<T, F>(
    settings: &Settings,
    mut op: impl FnMut(Client) -> F,
) -> Result<T, RegistryError>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let client = settings.connect().await?;
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        match op(client.clone()).await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && tokio::time::Instant::now() < deadline => {
                tracing::debug!("etcd cannot serve it now ({e}); trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(settings.etcd(e)),
        }
    }
}

/// gRPC's `UNAVAILABLE` (14) and `DEADLINE_EXCEEDED` (4), and a connection lost: etcd without a
/// leader for a moment, or a member gone.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(s.code() as i32, 4 | 14),
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// Writes the fly.toml at `path` as `app`'s config, once it reads as one: its machines come
/// from the registry, so it is checked as having none.
pub async fn put_config(settings: &Settings, app: &str, path: &Path) -> Result<i64, RegistryError> {
    name_ok("app name", app)?;
    let text = std::fs::read_to_string(path).map_err(|source| RegistryError::File {
        path: path.to_owned(),
        source,
    })?;
    let config = Config::parse_app(&path.display().to_string(), &text, Vec::new())
        .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    let problems = config.unservable();
    if !problems.is_empty() {
        return Err(RegistryError::Invalid(problems.join("\n")));
    }
    let key = settings.config_key(app);
    let resp = retrying(settings, |mut c| {
        let (key, text) = (key.clone(), text.clone());
        async move { c.put(key, text, None).await }
    })
    .await?;
    Ok(resp
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision))
}

/// Writes machine `id` of `app`. With `lease`, the record lives as long as this call keeps
/// its lease alive: until `stop` resolves, when the lease is revoked and the record goes.
/// A lease lost meanwhile (etcd away for longer than it) is replaced once etcd is back.
pub async fn put_machine(
    settings: &Settings,
    app: &str,
    id: &str,
    record: &MachineRecord,
    lease: Option<Duration>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), RegistryError> {
    name_ok("app name", app)?;
    name_ok("machine id", id)?;
    let key = settings.machine_key(app, id);
    let value = serde_json::to_string(record).map_err(|e| RegistryError::Invalid(e.to_string()))?;
    let Some(ttl) = lease else {
        retrying(settings, |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.put(key, value, None).await }
        })
        .await?;
        return Ok(());
    };
    let ttl_secs = ttl.as_secs().max(1) as i64;
    tokio::pin!(stop);
    let mut registered = false;
    loop {
        match hold(
            settings,
            (&key, &value),
            ttl_secs,
            &mut registered,
            &mut stop,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(e) if !registered => return Err(e),
            Err(e) => {
                tracing::warn!("{key}: {e}; registering again in a second");
                tokio::select! {
                    () = &mut stop => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Puts `key` under a new lease of `ttl` seconds and keeps it alive until `stop`, then revokes
/// it; an error when etcd stops answering.
async fn hold(
    settings: &Settings,
    (key, value): (&str, &str),
    ttl: i64,
    registered: &mut bool,
    stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<(), RegistryError> {
    let lease = retrying(
        settings,
        |mut c| async move { c.lease_grant(ttl, None).await },
    )
    .await?
    .id();
    retrying(settings, |mut c| {
        let (key, value) = (key.to_owned(), value.to_owned());
        async move {
            c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
        }
    })
    .await?;
    let mut client = settings.connect().await?;
    *registered = true;
    tracing::info!(
        key,
        lease = format!("{lease:x}"),
        ttl,
        "registered; kept alive until stopped"
    );
    let (mut keeper, mut answers) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| settings.etcd(e))?;
    let every = Duration::from_millis((ttl as u64 * 1000 / 3).max(200));
    loop {
        tokio::select! {
            () = stop.as_mut() => {
                revoke(&mut client, lease).await;
                return Ok(());
            }
            () = tokio::time::sleep(every) => {}
        }
        keeper.keep_alive().await.map_err(|e| settings.etcd(e))?;
        let answer = tokio::time::timeout(every, answers.message())
            .await
            .map_err(|_| settings.timeout())?
            .map_err(|e| settings.etcd(e))?;
        match answer {
            Some(a) if a.ttl() > 0 => {}
            _ => {
                return Err(RegistryError::Invalid(format!(
                    "lease {lease:x} expired before it was renewed"
                )));
            }
        }
    }
}

async fn revoke(client: &mut Client, lease: i64) {
    if let Err(e) = client.lease_revoke(lease).await {
        tracing::warn!("lease {lease:x}: cannot revoke it ({e}); it expires by itself");
    }
}

/// Removes machine `id` of `app`; whether it was there.
pub async fn remove_machine(
    settings: &Settings,
    app: &str,
    id: &str,
) -> Result<bool, RegistryError> {
    let key = settings.machine_key(app, id);
    let resp = retrying(settings, |mut c| {
        let key = key.clone();
        async move { c.delete(key, None).await }
    })
    .await?;
    Ok(resp.deleted() > 0)
}

/// Removes `app`, its config and its machines; how many keys went.
pub async fn remove_app(settings: &Settings, app: &str) -> Result<i64, RegistryError> {
    name_ok("app name", app)?;
    let key = format!("{}/apps/{app}/", settings.url.prefix);
    let resp = retrying(settings, |mut c| {
        let key = key.clone();
        async move {
            c.delete(key, Some(DeleteOptions::new().with_prefix()))
                .await
        }
    })
    .await?;
    Ok(resp.deleted())
}

/// What `spliced registry list` prints.
#[derive(Debug, Default, Serialize)]
pub struct Listing {
    pub revision: i64,
    pub apps: Vec<AppListing>,
}

#[derive(Debug, Default, Serialize)]
pub struct AppListing {
    pub app: String,
    /// Bytes of its fly.toml; `None`: machines without a config (not served).
    pub config_bytes: Option<usize>,
    pub machines: Vec<MachineListing>,
}

#[derive(Debug, Serialize)]
pub struct MachineListing {
    pub id: String,
    /// The record as written (it may not read as a machine; edges leave those out).
    pub record: serde_json::Value,
    /// The lease that keeps it, in hexadecimal as etcdctl prints it; `None`: none.
    pub lease: Option<String>,
}

/// Every app and machine under the prefix.
pub async fn list(settings: &Settings) -> Result<Listing, RegistryError> {
    let key = settings.apps_prefix();
    let resp = retrying(settings, |mut c| {
        let key = key.clone();
        async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
    })
    .await?;
    let mut out = Listing {
        revision: resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision),
        apps: Vec::new(),
    };
    let apps_prefix = settings.apps_prefix();
    for kv in resp.kvs() {
        let Some(path) = std::str::from_utf8(kv.key())
            .ok()
            .and_then(|k| k.strip_prefix(&apps_prefix))
        else {
            continue;
        };
        let (app, what) = path.split_once('/').unwrap_or((path, ""));
        if out.apps.last().is_none_or(|a| a.app != app) {
            out.apps.push(AppListing {
                app: app.to_owned(),
                ..AppListing::default()
            });
        }
        let Some(entry) = out.apps.last_mut() else {
            continue;
        };
        if what == "config" {
            entry.config_bytes = Some(kv.value().len());
        } else if let Some(id) = what.strip_prefix("machines/") {
            let record = serde_json::from_slice(kv.value()).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(kv.value()).into_owned())
            });
            entry.machines.push(MachineListing {
                id: id.to_owned(),
                record,
                lease: (kv.lease() != 0).then(|| format!("{:x}", kv.lease())),
            });
        }
    }
    Ok(out)
}

impl Listing {
    /// One line per app and per machine.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!("revision {}\n", self.revision);
        for a in &self.apps {
            let _ = match a.config_bytes {
                Some(n) => writeln!(out, "app {}: config of {n} bytes", a.app),
                None => writeln!(out, "app {}: no config (not served)", a.app),
            };
            for m in &a.machines {
                let lease = m
                    .lease
                    .as_ref()
                    .map(|l| format!("  lease {l}"))
                    .unwrap_or_default();
                let _ = writeln!(out, "  machine {}  {}{lease}", m.id, m.record);
            }
        }
        out
    }
}
