//! Where the config served comes from: the file (`--config`, read again on SIGHUP), the
//! registry (`--registry`, followed live), or both, the file then one app beside the
//! registry's. An app whose new fly.toml does not read keeps being served as it last read,
//! with the machines the registry lists now.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{AbortOnDrop, RunOptions, StartError};
use crate::{
    config::{Config, ConfigError},
    registry::{Apps, Follower, Status},
};

/// How long a starting edge waits for the registry before it serves nothing and keeps trying.
const START_WAIT: Duration = Duration::from_secs(5);

pub(super) struct Source {
    path: Option<PathBuf>,
    file: Option<Config>,
    registry: Option<Followed>,
}

struct Followed {
    prefix: String,
    apps: watch::Receiver<Arc<Apps>>,
    status: Arc<Status>,
    /// Per app, the last fly.toml of it that read.
    good: HashMap<String, String>,
    _task: AbortOnDrop,
}

impl Source {
    /// The file as read at start, and the registry loaded (or, after [`START_WAIT`], being
    /// tried) and followed from now on. With `must_load` (a process an upgrade started, whose
    /// predecessor serves what the registry held), a registry not loaded by then is an error.
    pub async fn start(
        file: Option<Config>,
        opts: &RunOptions,
        must_load: bool,
    ) -> Result<Self, StartError> {
        let registry = match &opts.registry {
            Some(settings) => {
                let follower = Follower::start(settings.clone(), START_WAIT).await;
                if must_load && !follower.loaded() {
                    return Err(StartError::RegistryAway(settings.url.to_string()));
                }
                Some(Followed {
                    prefix: follower.prefix().to_owned(),
                    apps: follower.apps(),
                    status: Arc::clone(&follower.status),
                    good: HashMap::new(),
                    _task: AbortOnDrop(tokio::spawn(follower.follow())),
                })
            }
            None => None,
        };
        Ok(Self {
            path: opts.config_path.clone(),
            file,
            registry,
        })
    }

    pub fn status(&self) -> Option<Arc<Status>> {
        self.registry.as_ref().map(|r| Arc::clone(&r.status))
    }

    /// The config to serve now; `prev`, the one served until now. What had to be left out is
    /// logged, and with a registry kept in its status.
    pub fn compose(&mut self, prev: Option<&Config>) -> Config {
        let Some(r) = &mut self.registry else {
            return self.file.clone().unwrap_or_else(Config::empty);
        };
        let apps = Arc::clone(&r.apps.borrow_and_update());
        let composed = apps.compose(&r.prefix, self.file.as_ref(), prev, &mut r.good);
        for problem in &composed.problems {
            for line in problem.lines() {
                tracing::error!("registry: {line}");
            }
        }
        r.status.left_out(composed.problems);
        composed.config
    }

    /// Reads the file again; without one, nothing to do.
    pub fn reread(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.path {
            self.file = Some(Config::load(path)?);
        }
        Ok(())
    }

    /// Resolves when the registry has a new state; never without one.
    pub async fn changed(&mut self) {
        if let Some(r) = &mut self.registry
            && r.apps.changed().await.is_ok()
        {
            return;
        }
        std::future::pending::<()>().await;
    }
}
