//! TLS for the control plane (rustls with the ring provider, through tonic).
//!
//! One `[security]` section serves both sides, per process:
//!
//! - coordinator: `tls_cert` + `tls_key` turn on server TLS; `tls_client_ca` also
//!   requires every client to present a certificate signed by that CA (mutual TLS);
//! - worker, `hsat status`: `tls_ca` is the CA that signed the coordinator's
//!   certificate (the client then speaks TLS); `tls_cert` + `tls_key` are the
//!   client's own certificate for a coordinator that requires one.
//!
//! Files are PEM. [`server_config`] builds the same server side as a plain rustls
//! `ServerConfig`, for other listeners of the process (a metrics port).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tonic::transport::{Certificate, Identity};
pub use tonic::transport::{ClientTlsConfig, ServerTlsConfig};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {key} = {} (the {what}); check the path and its permissions", path.display())]
    Read {
        /// The config key that named it.
        key: &'static str,
        /// What it should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// A file holds no PEM block of the expected kind, or a malformed one.
    #[error("{key} = {} is not a PEM {what}: {why}", path.display())]
    Pem {
        /// The config key that named it.
        key: &'static str,
        /// What it should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The settings do not fit together (a key without its certificate, ...).
    #[error("{0}")]
    Settings(String),
    /// rustls refused the certificates.
    #[error("TLS setup failed: {0}")]
    Rustls(String),
}

/// The PEM files of one process (`[security]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain (`security.tls_cert`).
    pub cert: Option<PathBuf>,
    /// Its private key (`security.tls_key`).
    pub key: Option<PathBuf>,
    /// Coordinator: CA that client certificates must chain to
    /// (`security.tls_client_ca`).
    pub client_ca: Option<PathBuf>,
    /// Client: CA that the coordinator's certificate must chain to
    /// (`security.tls_ca`).
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files of a `[security]` section.
    pub fn from_config(security: &hsat_core::config::SecurityConfig) -> Self {
        Self {
            cert: security.tls_cert.clone(),
            key: security.tls_key.clone(),
            client_ca: security.tls_client_ca.clone(),
            ca: security.tls_ca.clone(),
        }
    }

    fn identity_files(&self) -> Result<Option<(&Path, &Path)>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (None, None) => Ok(None),
            _ => Err(TlsError::Settings(
                "security.tls_cert and security.tls_key go together: set both or neither".into(),
            )),
        }
    }
}

fn read_pem(
    path: &Path,
    key: &'static str,
    what: &'static str,
    label: &str,
) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        what,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN") || !text.contains(label) {
        return Err(TlsError::Pem {
            key,
            what,
            path: path.to_owned(),
            why: format!("no `-----BEGIN ...{label}` block"),
        });
    }
    Ok(bytes)
}

fn identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    Ok(Identity::from_pem(
        read_pem(cert, "security.tls_cert", "certificate", "CERTIFICATE")?,
        read_pem(key, "security.tls_key", "private key", "PRIVATE KEY")?,
    ))
}

/// The coordinator's TLS: `None` without `tls_cert` (plain HTTP/2); with
/// `tls_client_ca`, clients must present a certificate signed by it.
pub fn server_tls(files: &TlsFiles) -> Result<Option<ServerTlsConfig>, TlsError> {
    let Some((cert, key)) = files.identity_files()? else {
        if files.client_ca.is_some() {
            return Err(TlsError::Settings(
                "security.tls_client_ca needs security.tls_cert and security.tls_key: client \
                 certificates are checked only over TLS"
                    .into(),
            ));
        }
        return Ok(None);
    };
    let mut config = ServerTlsConfig::new().identity(identity(cert, key)?);
    if let Some(ca) = &files.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read_pem(
            ca,
            "security.tls_client_ca",
            "CA certificate",
            "CERTIFICATE",
        )?));
    }
    Ok(Some(config))
}

/// A client's TLS: `None` without `tls_ca` (plain HTTP/2); with `tls_cert` and
/// `tls_key`, the client presents that certificate (for mutual TLS).
pub fn client_tls(files: &TlsFiles) -> Result<Option<ClientTlsConfig>, TlsError> {
    let Some(ca) = &files.ca else {
        return Ok(None);
    };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(
        ca,
        "security.tls_ca",
        "CA certificate",
        "CERTIFICATE",
    )?));
    if let Some((cert, key)) = files.identity_files()? {
        config = config.identity(identity(cert, key)?);
    }
    Ok(Some(config))
}

/// The coordinator's TLS as a rustls `ServerConfig` (ring provider) for another
/// listener of the process, e.g. a metrics port; `None` without `tls_cert`. ALPN is
/// left empty: set it for the protocol served.
pub fn server_config(files: &TlsFiles) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some((cert, key)) = files.identity_files()? else {
        return Ok(None);
    };
    let pem = |path: &Path, key: &'static str, what: &'static str, why: String| TlsError::Pem {
        key,
        what,
        path: path.to_owned(),
        why,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read_pem(
        cert,
        "security.tls_cert",
        "certificate",
        "CERTIFICATE",
    )?)
    .collect::<Result<_, _>>()
    .map_err(|err| pem(cert, "security.tls_cert", "certificate", err.to_string()))?;
    let private = PrivateKeyDer::from_pem_slice(&read_pem(
        key,
        "security.tls_key",
        "private key",
        "PRIVATE KEY",
    )?)
    .map_err(|err| pem(key, "security.tls_key", "private key", err.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|err| TlsError::Rustls(err.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for der in CertificateDer::pem_slice_iter(&read_pem(
                ca,
                "security.tls_client_ca",
                "CA certificate",
                "CERTIFICATE",
            )?) {
                let der = der.map_err(|err| {
                    pem(
                        ca,
                        "security.tls_client_ca",
                        "CA certificate",
                        err.to_string(),
                    )
                })?;
                roots
                    .add(der)
                    .map_err(|err| TlsError::Rustls(err.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|err| TlsError::Rustls(err.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, private)
        .map_err(|err| TlsError::Rustls(err.to_string()))?;
    Ok(Some(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a leaf for `localhost` signed by it, as PEM files in `dir`.
    fn pki(dir: &Path) -> TlsFiles {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        TlsFiles {
            cert: Some(write("tls.crt", cert.pem())),
            key: Some(write("tls.key", key.serialize_pem())),
            client_ca: Some(write("ca.crt", ca.pem())),
            ca: None,
        }
    }

    #[test]
    fn the_rustls_server_config_serves_tls_and_mutual_tls() {
        let dir = tempfile::tempdir().unwrap();
        let files = pki(dir.path());
        assert!(server_config(&files).unwrap().is_some());
        let one_way = TlsFiles {
            client_ca: None,
            ..files.clone()
        };
        assert!(server_config(&one_way).unwrap().is_some());
        assert!(server_tls(&files).unwrap().is_some());
        assert!(server_config(&TlsFiles::default()).unwrap().is_none());
        assert!(server_tls(&TlsFiles::default()).unwrap().is_none());
    }

    #[test]
    fn unusable_files_are_named_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let files = pki(dir.path());
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let err = server_tls(&TlsFiles {
            key: Some(not_pem.clone()),
            ..files.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("security.tls_key")
                && err.contains("not.pem")
                && err.contains("PRIVATE KEY"),
            "{err}"
        );
        let err = server_tls(&TlsFiles {
            key: None,
            ..files.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("go together"), "{err}");
        let err = server_tls(&TlsFiles {
            cert: None,
            key: None,
            ..files.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("tls_client_ca needs security.tls_cert"),
            "{err}"
        );
        let err = client_tls(&TlsFiles {
            ca: Some(dir.path().join("missing.crt")),
            ..TlsFiles::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("security.tls_ca") && err.contains("missing.crt"),
            "{err}"
        );
    }
}
