//! The control plane's own registration in the cluster: the serving certificate kept in a Secret
//! (so that every replica, and the next rollout, serves the same one), the webhook
//! configurations' `caBundle` kept pointing at its CA, and the API server's version (whether
//! native sidecars are available).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::serving_cert::{self, ServingCert};

/// Keys of the serving-certificate Secret (those of a `kubernetes.io/tls` Secret plus the CA).
const KEY_CERT: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";
const KEY_CA: &str = "ca.crt";

/// Errors talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The API server refused or could not be reached.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// The certificate could not be made or read.
    #[error(transparent)]
    Cert(#[from] serving_cert::CertError),
    /// The API server's version does not parse.
    #[error("cannot read the api server version {major:?}.{minor:?}")]
    Version {
        /// `major` as reported.
        major: String,
        /// `minor` as reported.
        minor: String,
    },
    /// Another writer kept changing an object.
    #[error("{0} kept changing; gave up after retries")]
    Conflict(String),
}

/// Whether the API server runs Kubernetes ≥ 1.29, where native sidecars are on by default.
pub async fn supports_native_sidecars(client: &Client) -> Result<bool, RegistrationError> {
    let info = client.apiserver_version().await?;
    let digits = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
    };
    let (major, minor) = match (
        digits(&info.major).parse::<u32>(),
        digits(&info.minor).parse::<u32>(),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        _ => {
            return Err(RegistrationError::Version {
                major: info.major,
                minor: info.minor,
            });
        }
    };
    Ok((major, minor) >= (1, 29))
}

/// Reads the serving certificate from the Secret `namespace/name`, or makes one and stores it.
/// When two replicas race, the first write wins and the loser uses the winner's.
pub async fn serving_cert_from_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    dns_names: &[String],
) -> Result<ServingCert, RegistrationError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let renew_margin = Duration::from_secs(30 * 86_400);
    let primary = dns_names.first().map(String::as_str).unwrap_or_default();
    for _ in 0..3 {
        let existing = api.get_opt(name).await?;
        if let Some(cert) = existing.as_ref().and_then(cert_of) {
            if !serving_cert::needs_renewal(&cert, primary, renew_margin)? {
                info!(%namespace, %name, "serving certificate loaded from secret");
                return Ok(cert);
            }
            info!(%namespace, %name, "serving certificate in secret is expiring or for other names; renewing");
        }
        let cert = serving_cert::generate(dns_names)?;
        let mut secret = existing.unwrap_or_default();
        secret.metadata.name = Some(name.to_owned());
        secret.metadata.namespace = Some(namespace.to_owned());
        secret.type_ = Some("kubernetes.io/tls".to_owned());
        secret.data = Some(BTreeMap::from([
            (
                KEY_CERT.to_owned(),
                ByteString(cert.cert_pem.clone().into_bytes()),
            ),
            (
                KEY_KEY.to_owned(),
                ByteString(cert.key_pem.clone().into_bytes()),
            ),
            (
                KEY_CA.to_owned(),
                ByteString(cert.ca_pem.clone().into_bytes()),
            ),
        ]));
        let written = if secret.metadata.resource_version.is_some() {
            api.replace(name, &PostParams::default(), &secret).await
        } else {
            api.create(&PostParams::default(), &secret).await
        };
        match written {
            Ok(_) => {
                info!(%namespace, %name, "serving certificate generated and stored");
                return Ok(cert);
            }
            // Another replica wrote first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(RegistrationError::Conflict(format!(
        "secret {namespace}/{name}"
    )))
}

fn cert_of(secret: &Secret) -> Option<ServingCert> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(ServingCert {
        cert_pem: text(KEY_CERT)?,
        key_pem: text(KEY_KEY)?,
        ca_pem: text(KEY_CA)?,
    })
}

/// Something with webhooks that have a `clientConfig.caBundle`.
trait WebhookConfig:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug
{
    const KIND: &'static str;
    /// Sets every webhook's caBundle; true when something changed.
    fn set_ca_bundle(&mut self, ca: &[u8]) -> bool;
}

impl WebhookConfig for MutatingWebhookConfiguration {
    const KIND: &'static str = "MutatingWebhookConfiguration";
    fn set_ca_bundle(&mut self, ca: &[u8]) -> bool {
        let mut changed = false;
        for w in self.webhooks.iter_mut().flatten() {
            if w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca) {
                w.client_config.ca_bundle = Some(ByteString(ca.to_vec()));
                changed = true;
            }
        }
        changed
    }
}

impl WebhookConfig for ValidatingWebhookConfiguration {
    const KIND: &'static str = "ValidatingWebhookConfiguration";
    fn set_ca_bundle(&mut self, ca: &[u8]) -> bool {
        let mut changed = false;
        for w in self.webhooks.iter_mut().flatten() {
            if w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca) {
                w.client_config.ca_bundle = Some(ByteString(ca.to_vec()));
                changed = true;
            }
        }
        changed
    }
}

async fn patch_one<K: WebhookConfig>(
    client: &Client,
    name: &str,
    ca: &[u8],
) -> Result<bool, RegistrationError> {
    let api: Api<K> = Api::all(client.clone());
    for _ in 0..3 {
        let Some(mut config) = api.get_opt(name).await? else {
            debug!(kind = K::KIND, %name, "webhook configuration not found");
            return Ok(false);
        };
        if !config.set_ca_bundle(ca) {
            return Ok(false);
        }
        match api.replace(name, &PostParams::default(), &config).await {
            Ok(_) => {
                info!(kind = K::KIND, %name, "caBundle updated");
                return Ok(true);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(RegistrationError::Conflict(format!("{} {name}", K::KIND)))
}

/// Sets the `caBundle` of the MutatingWebhookConfiguration and the ValidatingWebhookConfiguration
/// called `name` (either may be absent). Returns whether anything changed.
pub async fn patch_ca_bundle(
    client: &Client,
    name: &str,
    ca_pem: &str,
) -> Result<bool, RegistrationError> {
    let m = patch_one::<MutatingWebhookConfiguration>(client, name, ca_pem.as_bytes()).await?;
    let v = patch_one::<ValidatingWebhookConfiguration>(client, name, ca_pem.as_bytes()).await?;
    Ok(m || v)
}

/// Keeps the `caBundle`s pointing at `ca_pem`: a `helm upgrade` or `kubectl apply` of the
/// manifests resets them to empty. Runs until dropped.
pub async fn keep_ca_bundle(client: Client, name: String, ca_pem: String, every: Duration) {
    loop {
        if let Err(error) = patch_ca_bundle(&client, &name, &ca_pem).await {
            warn!(%name, %error, "cannot update webhook caBundle");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};

    use super::*;

    #[test]
    fn ca_bundle_set_on_every_webhook_once() {
        let hook = |name: &str| MutatingWebhook {
            name: name.to_owned(),
            client_config: WebhookClientConfig::default(),
            ..Default::default()
        };
        let mut config = MutatingWebhookConfiguration {
            webhooks: Some(vec![hook("a.weft.dev"), hook("b.weft.dev")]),
            ..Default::default()
        };
        assert!(config.set_ca_bundle(b"PEM"));
        assert!(!config.set_ca_bundle(b"PEM"), "unchanged the second time");
        for w in config.webhooks.iter().flatten() {
            assert_eq!(
                w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()),
                Some(&b"PEM"[..])
            );
        }
    }
}
