//! Where the CA material lives, in Istio's `cacerts` file names (`ca-cert.pem`, `ca-key.pem`,
//! `cert-chain.pem`, `root-cert.pem`):
//!
//! - local mode: a directory (`--ca-dir`), created with a new root on first start and reused
//!   after. `root-cert.pem` there is also the published trust bundle: the proxies' root file.
//! - Kubernetes: the Secret `cacerts` of the control-plane namespace when the user made one
//!   (never written), else the Secret `weft-ca`, created on first start (the first replica to
//!   create it wins; the others read it). The roots are published as the ConfigMap
//!   `weft-ca-root-cert` (`root-cert.pem`) in every namespace that has meshed pods.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use tracing::{info, warn};

use super::{CaError, Material};

/// The signing certificate.
pub const FILE_CA_CERT: &str = "ca-cert.pem";
/// Its key.
pub const FILE_CA_KEY: &str = "ca-key.pem";
/// The chain above the signing certificate.
pub const FILE_CERT_CHAIN: &str = "cert-chain.pem";
/// The trusted roots (the trust bundle).
pub const FILE_ROOT_CERT: &str = "root-cert.pem";
/// The user's own CA Secret (Istio's name), used when present.
pub const USER_SECRET: &str = "cacerts";
/// The Secret holding a CA the control plane made.
pub const GENERATED_SECRET: &str = "weft-ca";

/// Errors reading or writing the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API server refused.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// The directory holds part of a CA: generating a new root would overwrite the user's files.
    #[error(
        "{dir}: incomplete ca: {} present but {} missing; give the whole cacerts layout \
         (ca-cert.pem and its ca-key.pem, with cert-chain.pem and root-cert.pem for an \
         intermediate), or an empty directory for a new root",
        present.join(", "),
        missing.join(", ")
    )]
    Incomplete {
        /// The directory.
        dir: String,
        /// The CA files found.
        present: Vec<&'static str>,
        /// The signing files not found.
        missing: Vec<&'static str>,
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

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn read_optional(path: &Path) -> Result<String, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(io(path)(e)),
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), StoreError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(text.as_bytes()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn write_public(path: &Path, text: &str) -> Result<(), StoreError> {
    let tmp: PathBuf = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Loads the CA of `dir`, or makes a new root there on first start. A directory with some
/// of the CA files but not both `ca-cert.pem` and `ca-key.pem` is refused rather than
/// overwritten.
pub fn load_or_create_dir(dir: &Path, trust_domain: &str) -> Result<Material, CaError> {
    let cert = dir.join(FILE_CA_CERT);
    let key = dir.join(FILE_CA_KEY);
    let present: Vec<&'static str> = [FILE_CA_CERT, FILE_CA_KEY, FILE_CERT_CHAIN, FILE_ROOT_CERT]
        .into_iter()
        .filter(|f| dir.join(f).exists())
        .collect();
    let missing: Vec<&'static str> = [FILE_CA_CERT, FILE_CA_KEY]
        .into_iter()
        .filter(|f| !present.contains(f))
        .collect();
    if !present.is_empty() && !missing.is_empty() {
        return Err(StoreError::Incomplete {
            dir: dir.display().to_string(),
            present,
            missing,
        }
        .into());
    }
    if missing.is_empty() {
        let material = Material {
            ca_cert: read_optional(&cert)?,
            ca_key: read_optional(&key)?,
            cert_chain: read_optional(&dir.join(FILE_CERT_CHAIN))?,
            root_cert: read_optional(&dir.join(FILE_ROOT_CERT))?,
        };
        info!(dir = %dir.display(), "mesh ca loaded");
        return Ok(material);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let material = Material::generate(trust_domain)?;
    write_private(&key, &material.ca_key)?;
    write_public(&cert, &material.ca_cert)?;
    write_public(&dir.join(FILE_ROOT_CERT), &material.root_cert)?;
    info!(dir = %dir.display(), "new mesh root generated");
    Ok(material)
}

/// Writes the trust bundle to `<dir>/root-cert.pem` when it differs.
pub fn publish_dir_roots(dir: &Path, roots_pem: &str) -> Result<(), StoreError> {
    let path = dir.join(FILE_ROOT_CERT);
    if read_optional(&path)? != roots_pem {
        write_public(&path, roots_pem)?;
        info!(path = %path.display(), "trust bundle written");
    }
    Ok(())
}

/// The text under `key` of a Secret, from `data` or else `stringData`.
pub(crate) fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .cloned()
        })
}

fn secret_text(
    secret: &Secret,
    name: &str,
    key: &str,
    required: bool,
) -> Result<String, StoreError> {
    match secret_value(secret, key) {
        Some(v) => Ok(v),
        None if required => Err(StoreError::Missing {
            secret: name.to_owned(),
            key: key.to_owned(),
        }),
        None => Ok(String::new()),
    }
}

fn material_of(secret: &Secret, name: &str) -> Result<Material, StoreError> {
    Ok(Material {
        ca_cert: secret_text(secret, name, FILE_CA_CERT, true)?,
        ca_key: secret_text(secret, name, FILE_CA_KEY, true)?,
        cert_chain: secret_text(secret, name, FILE_CERT_CHAIN, false)?,
        root_cert: secret_text(secret, name, FILE_ROOT_CERT, false)?,
    })
}

/// Loads the CA from the `cacerts` Secret, else from `weft-ca`, making that on first start.
pub async fn load_or_create_secret(
    client: &kube::Client,
    namespace: &str,
    trust_domain: &str,
) -> Result<Material, CaError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(secret) = api.get_opt(USER_SECRET).await.map_err(StoreError::from)? {
        info!(%namespace, secret = USER_SECRET, "mesh ca loaded from the user's secret");
        return Ok(material_of(&secret, USER_SECRET)?);
    }
    for _ in 0..3 {
        if let Some(secret) = api
            .get_opt(GENERATED_SECRET)
            .await
            .map_err(StoreError::from)?
        {
            info!(%namespace, secret = GENERATED_SECRET, "mesh ca loaded");
            return Ok(material_of(&secret, GENERATED_SECRET)?);
        }
        let material = Material::generate(trust_domain)?;
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(GENERATED_SECRET.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_owned(),
                    "weft".to_owned(),
                )])),
                ..Default::default()
            },
            type_: Some("istio.io/ca-root".to_owned()),
            data: Some(BTreeMap::from([
                (
                    FILE_CA_CERT.to_owned(),
                    ByteString(material.ca_cert.clone().into_bytes()),
                ),
                (
                    FILE_CA_KEY.to_owned(),
                    ByteString(material.ca_key.clone().into_bytes()),
                ),
                (
                    FILE_ROOT_CERT.to_owned(),
                    ByteString(material.root_cert.clone().into_bytes()),
                ),
            ])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(%namespace, secret = GENERATED_SECRET, "new mesh root generated and stored");
                return Ok(material);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                info!("another replica stored the mesh root first; reading it");
            }
            Err(e) => return Err(StoreError::from(e).into()),
        }
    }
    Err(CaError::Material(format!(
        "secret {GENERATED_SECRET} could not be read or created"
    )))
}

/// Makes the ConfigMap `name` in `namespace` hold `roots_pem` as `root-cert.pem`.
pub async fn publish_root_config_map(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    roots_pem: &str,
) -> Result<bool, StoreError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let existing = api.get_opt(name).await?;
    let current = existing
        .as_ref()
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get(FILE_ROOT_CERT))
        .map(String::as_str);
    if current == Some(roots_pem) {
        return Ok(false);
    }
    let mut cm = existing.unwrap_or_default();
    cm.metadata.name = Some(name.to_owned());
    cm.metadata.namespace = Some(namespace.to_owned());
    cm.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("app.kubernetes.io/part-of".to_owned(), "weft".to_owned());
    cm.data = Some(BTreeMap::from([(
        FILE_ROOT_CERT.to_owned(),
        roots_pem.to_owned(),
    )]));
    let result = if cm.metadata.resource_version.is_some() {
        api.replace(name, &PostParams::default(), &cm).await
    } else {
        api.create(&PostParams::default(), &cm).await
    };
    match result {
        Ok(_) => {
            info!(%namespace, %name, "root certificate published");
            Ok(true)
        }
        Err(e) => {
            warn!(%namespace, %name, error = %e, "cannot publish the root certificate");
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_is_created_then_reused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("ca");
        let first = load_or_create_dir(&dir, "cluster.local").expect("create");
        let second = load_or_create_dir(&dir, "cluster.local").expect("reuse");
        assert_eq!(first, second);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(FILE_CA_KEY))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
        publish_dir_roots(&dir, "bundle").expect("publish");
        assert_eq!(
            std::fs::read_to_string(dir.join(FILE_ROOT_CERT)).expect("read"),
            "bundle"
        );
    }

    #[test]
    fn a_partial_cacerts_dir_is_refused_not_overwritten() {
        let tmp = tempfile::tempdir().expect("tmp");
        let user = Material::generate("cluster.local").expect("root");
        for (present, missing) in [
            (vec![FILE_CA_CERT], vec![FILE_CA_KEY]),
            (vec![FILE_CA_KEY], vec![FILE_CA_CERT]),
            (
                vec![FILE_CA_CERT, FILE_CERT_CHAIN, FILE_ROOT_CERT],
                vec![FILE_CA_KEY],
            ),
            (vec![FILE_ROOT_CERT], vec![FILE_CA_CERT, FILE_CA_KEY]),
        ] {
            let dir = tmp.path().join(present.join("+"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            for f in &present {
                let text = match *f {
                    FILE_CA_KEY => &user.ca_key,
                    _ => &user.ca_cert,
                };
                std::fs::write(dir.join(f), text).expect("write");
            }
            let error = load_or_create_dir(&dir, "cluster.local")
                .expect_err("a partial ca is refused")
                .to_string();
            assert!(
                error.contains(&format!(
                    "{} present but {} missing",
                    present.join(", "),
                    missing.join(", ")
                )),
                "{error}"
            );
            assert!(
                error.contains("incomplete ca") && error.contains(&dir.display().to_string()),
                "{error}"
            );
            // Nothing was generated over the user's files.
            for f in &present {
                let expected = match *f {
                    FILE_CA_KEY => &user.ca_key,
                    _ => &user.ca_cert,
                };
                assert_eq!(
                    &std::fs::read_to_string(dir.join(f)).expect("read"),
                    expected,
                    "{f} untouched"
                );
            }
            for f in &missing {
                assert!(!dir.join(f).exists(), "{f} not created");
            }
        }
    }
}
