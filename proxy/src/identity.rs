//! The workload's identity: its current credentials, swapped atomically when they rotate.
//!
//! Connections keep the TLS context they were made with; new connections use the newest.
//! Credentials come from files (a static config's `identity` section) or, in a cluster, from
//! the control plane's CA.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use weft_api::config::IdentityFiles;

use crate::tls::{Credentials, TlsContext, TlsError};

/// Errors loading credentials.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A PEM file is missing or malformed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The credentials are not usable for mesh TLS.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

fn file_error(path: &Path, reason: impl ToString) -> IdentityError {
    IdentityError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Reads a certificate chain, key and roots from PEM files.
pub fn load_files(files: &IdentityFiles) -> Result<Credentials, IdentityError> {
    let certs = |p: &str| -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let path = Path::new(p);
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| file_error(path, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(path, e))?;
        if certs.is_empty() {
            return Err(file_error(path, "no PEM certificate in file"));
        }
        Ok(certs)
    };
    let key_path = Path::new(&files.private_key);
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| file_error(key_path, e))?;
    Ok(Credentials {
        chain: certs(&files.cert_chain)?,
        key,
        roots: certs(&files.root_cert)?,
    })
}

/// The current TLS context; empty until the first credentials arrive (the proxy is not ready
/// before that).
#[derive(Debug, Default)]
pub struct Identity {
    current: ArcSwapOption<TlsContext>,
}

impl Identity {
    /// No credentials yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The newest TLS context.
    pub fn current(&self) -> Option<Arc<TlsContext>> {
        self.current.load_full()
    }

    /// Replaces the trusted roots, keeping the certificate (a new trust bundle from the
    /// control plane). No-op when the roots are the same or there is no certificate yet.
    pub fn update_roots(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), IdentityError> {
        let Some(current) = self.current() else {
            return Ok(());
        };
        if current.roots() == roots.as_slice() || roots.is_empty() {
            return Ok(());
        }
        let ctx = Arc::new(current.with_roots(roots)?);
        tracing::info!(roots = ctx.roots().len(), "trust bundle updated");
        self.current.store(Some(ctx));
        Ok(())
    }

    /// Installs new credentials; existing connections are unaffected.
    pub fn install(&self, creds: Credentials) -> Result<Arc<TlsContext>, IdentityError> {
        let ctx = Arc::new(TlsContext::new(creds)?);
        self.current.store(Some(ctx.clone()));
        tracing::info!(identity = ctx.identity(), "workload certificate installed");
        Ok(ctx)
    }
}
