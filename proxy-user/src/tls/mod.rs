//! TLS termination for the `tls` and `pg_tls` handlers: one rustls server configuration per
//! public port (its `tls_options`), certificates from [`certs::CertStore`] chosen by SNI, and
//! a self-signed certificate where the port asks for one or no certificate is configured;
//! where the kernel has TLS, the sessions of ports that forward plaintext go to it
//! ([`kernel`]).

pub mod certs;
mod client;
pub mod kernel;
pub mod postgres;

use std::{fmt, sync::Arc, time::Duration};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsOptions;
pub use certs::{CertError, CertStore};
pub use client::client_config;
pub use kernel::Records;

/// How often `--certs` is looked at for changes.
pub const CERTS_POLL: Duration = Duration::from_secs(1);

/// The crypto every TLS port uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// What a TLS port does with each new connection.
pub struct TlsPort {
    pub acceptor: TlsAcceptor,
    /// `pg_tls`: the client asks for TLS with PostgreSQL's `SSLRequest` first.
    pub postgres: bool,
    /// Whether each session goes to kernel TLS after its handshake ([`kernel::hand_over`]).
    pub kernel: bool,
}

/// Why a port's TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsConfigError(#[from] rustls::Error);

impl TlsPort {
    /// The server side of a port with `options`: its ALPN protocols in order, its versions
    /// (both when none are named), the store's certificates and, when no certificate matches,
    /// `fallback`. Sessions resume with tickets (TLS 1.3 and 1.2) and the session cache.
    /// `kernel`: sessions are handed to kernel TLS after their handshake.
    pub fn new(
        options: &TlsOptions,
        postgres: bool,
        kernel: bool,
        store: Arc<CertStore>,
        fallback: Option<Arc<CertifiedKey>>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsConfigError> {
        let versions: Vec<&'static rustls::SupportedProtocolVersion> =
            if options.versions.is_empty() {
                rustls::ALL_VERSIONS.to_vec()
            } else {
                options
                    .versions
                    .iter()
                    .filter_map(|v| match v.as_str() {
                        "TLSv1.2" => Some(&rustls::version::TLS12),
                        "TLSv1.3" => Some(&rustls::version::TLS13),
                        // The config reader refuses any other name.
                        _ => None,
                    })
                    .collect()
            };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver { store, fallback }));
        config.alpn_protocols = options.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        config.enable_secret_extraction = kernel;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            postgres,
            kernel,
        })
    }
}

/// Chooses a port's certificate for each handshake from the store as it is then.
struct Resolver {
    store: Arc<CertStore>,
    fallback: Option<Arc<CertifiedKey>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("certs", &self.store.len())
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let found = self.store.lookup(hello.server_name());
        if found.is_none() && self.fallback.is_none() {
            tracing::debug!(server_name = ?hello.server_name(), "no certificate for this name");
        }
        found.or_else(|| self.fallback.clone())
    }
}

/// Re-reads the store every [`CERTS_POLL`] while the returned task runs, logging each new set
/// and each file that kept one from being used.
pub fn watch(store: Arc<CertStore>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CERTS_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let s = Arc::clone(&store);
            match tokio::task::spawn_blocking(move || s.reload_if_changed()).await {
                Ok(Ok(true)) => tracing::info!(names = store.len(), "certificates reloaded"),
                Ok(Ok(false)) | Err(_) => {}
                Ok(Err(errors)) => {
                    for e in errors {
                        tracing::error!("certificates not reloaded: {e}");
                    }
                }
            }
        }
    })
}
