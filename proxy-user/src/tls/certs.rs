//! Certificates chosen by SNI: PEM files from a directory (`--certs`), looked up by exact
//! name, then by wildcard, then the file named `default`; re-read whole when a file in the
//! directory changes, keeping the previous set while the new one has errors.

use std::{
    collections::{HashMap, hash_map::Entry},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::SystemTime,
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};

/// A certificate that could not be used, or a directory that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("{}: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("self-signed certificate: {0}")]
    SelfSigned(String),
}

/// Extensions of the files read as certificates; each holds a chain, and its key either
/// after it or in a file of the same stem ending `.key`.
const CERT_EXTENSIONS: [&str; 3] = ["pem", "crt", "cer"];

/// One reading of the directory.
#[derive(Default)]
struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` under `example.com`; it matches one label, as browsers do.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl Certs {
    fn lookup(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = server_name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(c) = self.exact.get(&name) {
                return Some(Arc::clone(c));
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(c) = self.wildcard.get(parent)
            {
                return Some(Arc::clone(c));
            }
        }
        self.default.clone()
    }

    fn names(&self) -> usize {
        self.exact.len() + self.wildcard.len() + usize::from(self.default.is_some())
    }
}

/// Each file's path, modification time and length: a change in any is a change of the set.
type Listing = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// The certificates of `--certs DIR`, shared by every TLS port.
pub struct CertStore {
    dir: Option<PathBuf>,
    current: RwLock<Arc<Certs>>,
    /// The directory as last read; `None` before the first reading.
    seen: Mutex<Option<Listing>>,
    provider: Arc<CryptoProvider>,
}

impl CertStore {
    /// Reads `dir` (none: an empty store). Every unusable file is an error here, at start.
    pub fn open(dir: Option<&Path>, provider: Arc<CryptoProvider>) -> Result<Self, Vec<CertError>> {
        let store = Self {
            dir: dir.map(Path::to_path_buf),
            current: RwLock::new(Arc::new(Certs::default())),
            seen: Mutex::new(None),
            provider,
        };
        store.reload_if_changed()?;
        Ok(store)
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Names and wildcards served, counting the default as one.
    pub fn len(&self) -> usize {
        self.read().names()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The certificate for `server_name` (the client's SNI): exact, wildcard, then default.
    pub fn lookup(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        self.read().lookup(server_name)
    }

    /// Re-reads the directory when a file was added, removed or changed since the last
    /// reading. Returns whether a new set is in place; on errors the previous one stays until
    /// the directory changes again.
    pub fn reload_if_changed(&self) -> Result<bool, Vec<CertError>> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let listing = listing(dir).map_err(|source| {
            vec![CertError::Dir {
                path: dir.clone(),
                source,
            }]
        })?;
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.as_ref() == Some(&listing) {
            return Ok(false);
        }
        // Noted even when the reading fails, so that its errors are reported once per change.
        let certs = read_certs(&listing, &self.provider);
        *seen = Some(listing);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(certs?);
        Ok(true)
    }

    fn read(&self) -> Arc<Certs> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The regular files of `dir`, sorted by path.
fn listing(dir: &Path) -> std::io::Result<Listing> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        // Followed, so that a symlinked pair (as certbot's live/ directory) counts.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.is_file() {
            out.push((path, meta.modified().ok(), meta.len()));
        }
    }
    out.sort();
    Ok(out)
}

/// Every certificate file of `listing`, indexed by the names it is valid for.
fn read_certs(listing: &Listing, provider: &Arc<CryptoProvider>) -> Result<Certs, Vec<CertError>> {
    let mut certs = Certs::default();
    let mut errors = Vec::new();
    for (path, _, _) in listing {
        let is_cert = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CERT_EXTENSIONS.contains(&e));
        if !is_cert {
            continue;
        }
        match read_pair(path, provider) {
            Ok(None) => {}
            Ok(Some((key, names))) => {
                if path.file_stem().is_some_and(|s| s == "default") {
                    certs.default = Some(Arc::clone(&key));
                }
                for name in names {
                    let (table, name) = match name.strip_prefix("*.") {
                        Some(parent) => (&mut certs.wildcard, parent.to_owned()),
                        None => (&mut certs.exact, name),
                    };
                    match table.entry(name) {
                        Entry::Occupied(e) => {
                            tracing::warn!(file = %path.display(), name = %e.key(), "another certificate file already serves this name; this one is not used for it");
                        }
                        Entry::Vacant(e) => {
                            e.insert(Arc::clone(&key));
                        }
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(certs)
    } else {
        Err(errors)
    }
}

/// A certificate with its key, and the names it serves.
type Pair = (Arc<CertifiedKey>, Vec<String>);

/// The chain and key of one certificate file and the names it serves; `None` for a PEM file
/// without a certificate (a key of another file).
fn read_pair(path: &Path, provider: &Arc<CryptoProvider>) -> Result<Option<Pair>, CertError> {
    let bad = |message: String| CertError::File {
        path: path.to_path_buf(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let Some(leaf) = chain.first() else {
        return Ok(None);
    };
    let names = names_of(leaf).map_err(bad)?;
    let key_file = path.with_extension("key");
    let key = PrivateKeyDer::from_pem_file(path)
        .or_else(|_| PrivateKeyDer::from_pem_file(&key_file))
        .map_err(|_| {
            bad(format!(
                "no private key, neither after the certificate nor in {}",
                key_file.display()
            ))
        })?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| bad(e.to_string()))?;
    Ok(Some((Arc::new(key), names)))
}

/// The DNS names a certificate is valid for: its subject alternative names, or its common
/// name when it has none; lower case.
fn names_of(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer as _};
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("subject alternative names: {e}")),
    };
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok(names)
}

/// A self-signed certificate for `names` (DNS names or IP addresses), made at start.
pub fn self_signed(
    names: Vec<String>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<CertifiedKey>, CertError> {
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| CertError::SelfSigned(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    let key = CertifiedKey::from_der(vec![made.cert.der().clone()], key, provider)
        .map_err(|e| CertError::SelfSigned(e.to_string()))?;
    Ok(Arc::new(key))
}
