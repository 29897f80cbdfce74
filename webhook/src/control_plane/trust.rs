//! Root rotation: the CA material (the `--ca-dir` directory, or the `cacerts` / `weft-ca`
//! Secret) and the extra roots (`--extra-root`, files or directories of PEM files) are read
//! again every so often; when they change, the new CA replaces the one in force and the
//! caller spreads its trust bundle (to proxies on their open streams, the published root
//! files and ConfigMaps, and the control-plane port's own TLS).
//!
//! A change is applied only once it has been read the same twice in a row, and only when it
//! makes a usable CA whose key belongs to its certificate: files replaced one by one, or a
//! Secret edited key by key, are never taken half-way. Until then, and on any error (logged
//! once per distinct error), the CA in force stays.
//!
//! In a directory, `root-cert.pem` is both the user's root and where the control plane
//! publishes the bundle (root plus extra roots, the proxies' bootstrap file). Reading back
//! what was published is not a change of the user's root, so removing an extra root takes
//! it out of the bundle again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tracing::{info, warn};

use crate::ca::store::{
    FILE_CA_CERT, FILE_CA_KEY, FILE_CERT_CHAIN, FILE_ROOT_CERT, GENERATED_SECRET, StoreError,
    USER_SECRET, publish_dir_roots,
};
use crate::ca::{Ca, CaError, CaOptions, Material, pem_certificates};

use super::LiveCa;

/// How often a CA directory and extra-root files are read again.
pub const FILE_RELOAD: Duration = Duration::from_secs(1);
/// How often the CA Secret is read again.
pub const SECRET_RELOAD: Duration = Duration::from_secs(30);

/// Errors reading the CA material or the extra roots.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A file or directory could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An extra-root file holds no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: String,
    },
    /// The material does not make a CA.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// `ca-key.pem` is not the key of `ca-cert.pem`.
    #[error("ca-key.pem is not the key of ca-cert.pem")]
    KeyMismatch,
    /// The API server refused or could not be reached.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// The trust bundle could not be published.
    #[error(transparent)]
    Publish(#[from] StoreError),
    /// Neither CA Secret exists.
    #[error("no secret {USER_SECRET} or {GENERATED_SECRET} in namespace {namespace}")]
    NoSecret {
        /// The control plane's namespace.
        namespace: String,
    },
    /// A Secret lacks a key.
    #[error("secret {secret} has no {key}")]
    Missing {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
}

/// Where the CA material is read from.
#[derive(Clone)]
pub enum CaSource {
    /// A directory in Istio's `cacerts` layout (`--ca-dir`).
    Dir(PathBuf),
    /// The `cacerts` Secret of the control plane's namespace, else `weft-ca`.
    Secret {
        /// The client.
        client: kube::Client,
        /// The control plane's namespace.
        namespace: String,
    },
    /// Made in memory at start; it never changes (only the extra roots do).
    Memory(Material),
}

impl std::fmt::Debug for CaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaSource::Dir(d) => f.debug_tuple("Dir").field(d).finish(),
            CaSource::Secret { namespace, .. } => f
                .debug_struct("Secret")
                .field("namespace", namespace)
                .finish(),
            CaSource::Memory(_) => f.write_str("Memory"),
        }
    }
}

impl CaSource {
    /// How often this source is read again.
    pub fn reload_interval(&self) -> Duration {
        match self {
            CaSource::Secret { .. } => SECRET_RELOAD,
            CaSource::Dir(_) | CaSource::Memory(_) => FILE_RELOAD,
        }
    }

    /// Reads the material as it is now, never creating it.
    pub async fn read(&self) -> Result<Material, TrustError> {
        match self {
            CaSource::Dir(dir) => read_dir_material(dir),
            CaSource::Memory(m) => Ok(m.clone()),
            CaSource::Secret { client, namespace } => {
                let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
                for name in [USER_SECRET, GENERATED_SECRET] {
                    if let Some(secret) = api.get_opt(name).await? {
                        return material_of_secret(&secret, name);
                    }
                }
                Err(TrustError::NoSecret {
                    namespace: namespace.clone(),
                })
            }
        }
    }
}

fn read_text(path: &Path, required: bool) -> Result<String, TrustError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(TrustError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

fn read_dir_material(dir: &Path) -> Result<Material, TrustError> {
    Ok(Material {
        ca_cert: read_text(&dir.join(FILE_CA_CERT), true)?,
        ca_key: read_text(&dir.join(FILE_CA_KEY), true)?,
        cert_chain: read_text(&dir.join(FILE_CERT_CHAIN), false)?,
        root_cert: read_text(&dir.join(FILE_ROOT_CERT), false)?,
    })
}

fn material_of_secret(secret: &Secret, name: &str) -> Result<Material, TrustError> {
    let text = |key: &str, required: bool| -> Result<String, TrustError> {
        match crate::ca::store::secret_value(secret, key) {
            Some(v) => Ok(v),
            None if required => Err(TrustError::Missing {
                secret: name.to_owned(),
                key: key.to_owned(),
            }),
            None => Ok(String::new()),
        }
    };
    Ok(Material {
        ca_cert: text(FILE_CA_CERT, true)?,
        ca_key: text(FILE_CA_KEY, true)?,
        cert_chain: text(FILE_CERT_CHAIN, false)?,
        root_cert: text(FILE_ROOT_CERT, false)?,
    })
}

/// Reads the extra roots: each path is a PEM file (it must exist and hold a certificate), or
/// a directory whose `*.pem` and `*.crt` files are each such a file (it may be empty: roots
/// are added by dropping files in). In path order, then file-name order.
pub fn read_extra_roots(paths: &[PathBuf]) -> Result<Vec<String>, TrustError> {
    let mut out = Vec::new();
    for path in paths {
        let read_err = |source| TrustError::Read {
            path: path.display().to_string(),
            source,
        };
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(read_err)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| matches!(e, "pem" | "crt"))
                })
                .collect();
            files.sort();
            files
        } else {
            vec![path.clone()]
        };
        for file in files {
            let text = read_text(&file, true)?;
            if pem_certificates(&text)?.is_empty() {
                return Err(TrustError::NoCertificate {
                    path: file.display().to_string(),
                });
            }
            out.push(text);
        }
    }
    Ok(out)
}

/// Whether `ca-key.pem` is the key of (the first certificate of) `ca-cert.pem`.
pub fn key_matches(material: &Material) -> Result<bool, TrustError> {
    let key = crate::ca::keys::key_pair_from_pem(&material.ca_key)
        .map_err(|e| CaError::Material(format!("ca-key.pem: {e}")))?;
    let cert = pem_certificates(&material.ca_cert)?;
    let first = cert
        .first()
        .ok_or_else(|| CaError::Material("ca-cert.pem holds no certificate".into()))?;
    let der = CertificateDer::from_pem_slice(first.as_bytes())
        .map_err(|e| CaError::Material(format!("ca-cert.pem: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CaError::Material(format!("ca-cert.pem: {e}")))?;
    Ok(parsed
        .tbs_certificate
        .subject_pki
        .subject_public_key
        .data
        .as_ref()
        == key.public_key_raw())
}

/// What the CA is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// The CA material, with the user's own `root-cert.pem`.
    pub material: Material,
    /// The extra roots (PEM), as read.
    pub extra_roots: Vec<String>,
}

/// `read` with its `root-cert.pem` put back to the user's root `base_root` when it is what the
/// control plane itself published there (`published`).
pub fn without_published_bundle(
    mut read: Material,
    published: Option<&str>,
    base_root: &str,
) -> Material {
    if published.is_some_and(|p| p == read.root_cert) {
        read.root_cert = base_root.to_owned();
    }
    read
}

/// Keeps the CA in force in step with its source and the extra roots.
#[derive(Debug)]
pub struct Rotation {
    source: CaSource,
    extra_roots: Vec<PathBuf>,
    options: CaOptions,
    every: Duration,
    current: Inputs,
    /// What was last written to `<dir>/root-cert.pem`.
    published: Option<String>,
}

impl Rotation {
    /// Builds the CA from `material` (as loaded, or made on first start) and the extra roots,
    /// and, for a directory, publishes the bundle there. Errors here stop the start.
    pub fn start(
        source: CaSource,
        material: Material,
        extra_roots: Vec<PathBuf>,
        options: CaOptions,
    ) -> Result<(Rotation, Arc<Ca>), TrustError> {
        let extras = read_extra_roots(&extra_roots)?;
        let ca = Arc::new(Ca::new(&material, &extras, options.clone())?);
        let mut rotation = Rotation {
            every: source.reload_interval(),
            source,
            extra_roots,
            options,
            current: Inputs {
                material,
                extra_roots: extras,
            },
            published: None,
        };
        rotation.publish(&ca)?;
        Ok((rotation, ca))
    }

    /// Reads every `every` instead of the source's default.
    pub fn with_interval(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Writes the bundle to `<dir>/root-cert.pem` (the proxies' bootstrap root file).
    fn publish(&mut self, ca: &Ca) -> Result<(), StoreError> {
        if let CaSource::Dir(dir) = &self.source {
            let bundle = ca.roots_pem();
            publish_dir_roots(dir, &bundle)?;
            self.published = Some(bundle);
        }
        Ok(())
    }

    async fn read(&self) -> Result<Inputs, TrustError> {
        let material = self.source.read().await?;
        let material = without_published_bundle(
            material,
            self.published.as_deref(),
            &self.current.material.root_cert,
        );
        Ok(Inputs {
            material,
            extra_roots: read_extra_roots(&self.extra_roots)?,
        })
    }

    fn build(&self, inputs: &Inputs) -> Result<Ca, TrustError> {
        if inputs.material.ca_key != self.current.material.ca_key
            || inputs.material.ca_cert != self.current.material.ca_cert
        {
            // A certificate with another key would sign certificates nobody can verify.
            if !key_matches(&inputs.material)? {
                return Err(TrustError::KeyMismatch);
            }
        }
        Ok(Ca::new(
            &inputs.material,
            &inputs.extra_roots,
            self.options.clone(),
        )?)
    }

    /// Reads the source and the extra roots every interval until the task is dropped. A
    /// change that holds is installed in `live` and handed to `changed` (which spreads the
    /// new trust bundle).
    pub async fn run(mut self, live: Arc<LiveCa>, mut changed: impl FnMut(&Arc<Ca>) + Send) {
        let mut candidate: Option<Inputs> = None;
        let mut last_error: Option<String> = None;
        loop {
            tokio::time::sleep(self.every).await;
            let read = match self.read().await {
                Ok(r) => r,
                Err(error) => {
                    let text = error.to_string();
                    if last_error.as_ref() != Some(&text) {
                        warn!(source = ?self.source, %error, "cannot read the ca material or extra roots; keeping the ca in force");
                        last_error = Some(text);
                    }
                    continue;
                }
            };
            last_error = None;
            if read == self.current {
                candidate = None;
                continue;
            }
            if candidate.as_ref() != Some(&read) {
                // Wait for the same content on the next read.
                candidate = Some(read);
                continue;
            }
            candidate = None;
            match self.build(&read) {
                Ok(ca) => {
                    let ca = Arc::new(ca);
                    let signer_changed = read.material.ca_cert != self.current.material.ca_cert
                        || read.material.ca_key != self.current.material.ca_key
                        || read.material.cert_chain != self.current.material.cert_chain;
                    let roots_changed = ca.roots() != live.current().roots();
                    self.current = read;
                    if !signer_changed && !roots_changed {
                        // Same CA, same bundle (a root moved from an extra file to root-cert.pem).
                        continue;
                    }
                    info!(
                        roots = ca.roots().len(),
                        signer_changed, "ca material or extra roots changed; new trust bundle"
                    );
                    live.replace(ca.clone());
                    if let Err(error) = self.publish(&ca) {
                        warn!(%error, "cannot publish the trust bundle");
                    }
                    changed(&ca);
                }
                Err(error) => {
                    let text = error.to_string();
                    if last_error.as_ref() != Some(&text) {
                        warn!(%error, "new ca material is not usable; keeping the ca in force");
                        last_error = Some(text);
                    }
                    // Not current: it is retried (and logged again only if the error changes).
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_roots_from_files_and_directories() {
        let tmp = tempfile::tempdir().expect("tmp");
        let one = Material::generate("cluster.local").expect("root");
        let two = Material::generate("cluster.local").expect("root");
        let file = tmp.path().join("one.pem");
        std::fs::write(&file, &one.root_cert).expect("write");
        let dir = tmp.path().join("more");
        std::fs::create_dir(&dir).expect("mkdir");
        assert_eq!(
            read_extra_roots(&[file.clone(), dir.clone()]).expect("read"),
            vec![one.root_cert.clone()],
            "an empty directory adds nothing"
        );
        std::fs::write(dir.join("two.crt"), &two.root_cert).expect("write");
        std::fs::write(dir.join("notes.txt"), "ignored").expect("write");
        assert_eq!(
            read_extra_roots(&[file.clone(), dir.clone()]).expect("read"),
            vec![one.root_cert.clone(), two.root_cert.clone()]
        );
        std::fs::write(dir.join("broken.pem"), "not a certificate").expect("write");
        let error = read_extra_roots(std::slice::from_ref(&dir)).expect_err("no certificate");
        assert!(error.to_string().contains("broken.pem"), "{error}");
        let error = read_extra_roots(&[tmp.path().join("missing.pem")]).expect_err("missing");
        assert!(error.to_string().contains("missing.pem"), "{error}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let one = Material::generate("cluster.local").expect("root");
        let two = Material::generate("cluster.local").expect("root");
        assert!(key_matches(&one).expect("readable"));
        let mixed = Material {
            ca_key: two.ca_key.clone(),
            ..one.clone()
        };
        assert!(!key_matches(&mixed).expect("readable"));
    }

    #[test]
    fn the_published_bundle_is_not_the_users_root() {
        let read = Material {
            ca_cert: "cert".into(),
            ca_key: "key".into(),
            cert_chain: String::new(),
            root_cert: "root+extra".into(),
        };
        let m = without_published_bundle(read.clone(), Some("root+extra"), "root");
        assert_eq!(m.root_cert, "root");
        // The user wrote another root there: that is the new root.
        let m = without_published_bundle(read.clone(), Some("root+old extra"), "root");
        assert_eq!(m.root_cert, "root+extra");
        let m = without_published_bundle(read, None, "root");
        assert_eq!(m.root_cert, "root+extra");
    }

    #[tokio::test(start_paused = true)]
    async fn a_directory_change_is_applied_once_it_holds() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ca_dir = tmp.path().join("ca");
        let extra_dir = tmp.path().join("extra");
        std::fs::create_dir_all(&extra_dir).expect("mkdir");
        let material =
            crate::ca::store::load_or_create_dir(&ca_dir, "cluster.local").expect("ca dir");
        let (rotation, ca) = Rotation::start(
            CaSource::Dir(ca_dir.clone()),
            material.clone(),
            vec![extra_dir.clone()],
            CaOptions::default(),
        )
        .expect("start");
        assert_eq!(ca.roots().len(), 1);
        let live = LiveCa::new(ca);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(rotation.run(live.clone(), move |ca: &Arc<Ca>| {
            let _ = tx.send(ca.roots().len());
        }));
        let published = || std::fs::read_to_string(ca_dir.join(FILE_ROOT_CERT)).expect("bundle");

        // A new root dropped in the extra-root directory: both roots, published in the dir.
        let next = Material::generate("cluster.local").expect("next root");
        std::fs::write(extra_dir.join("next.pem"), &next.root_cert).expect("write");
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(live.current().roots().len(), 2);
        assert_eq!(published(), live.current().roots_pem());

        // Taken out again: the published bundle is not mistaken for the user's root.
        std::fs::remove_file(extra_dir.join("next.pem")).expect("rm");
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(published(), material.root_cert);

        // The CA replaced by the next root, the old root still trusted (the overlap). The
        // certificate alone first, with the old key: never taken.
        std::fs::write(ca_dir.join(FILE_CA_CERT), &next.ca_cert).expect("write");
        tokio::time::sleep(FILE_RELOAD * 5).await;
        assert!(rx.try_recv().is_err(), "a mismatched key is never taken");
        assert_eq!(
            live.current().roots(),
            std::slice::from_ref(&material.root_cert)
        );
        std::fs::write(ca_dir.join(FILE_CA_KEY), &next.ca_key).expect("write");
        std::fs::write(
            ca_dir.join(FILE_ROOT_CERT),
            format!("{}{}", next.root_cert, material.root_cert),
        )
        .expect("write");
        assert_eq!(rx.recv().await, Some(2), "next root and old root");
        let roots = live.current().roots().to_vec();
        assert_eq!(roots, [next.root_cert.clone(), material.root_cert.clone()]);
        task.abort();
    }
}
