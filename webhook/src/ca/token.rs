//! Who asks for a certificate: the Bearer token of the request, verified
//!
//! - in Kubernetes by a TokenReview with audience `weft-ca` (the API server checks signature,
//!   expiry, audience and that the pod still exists);
//! - in local mode as an ES256 JWT signed by the local node, checked against its public key
//!   (`--token-public-key`, PEM `PUBLIC KEY`). Claims as in a Kubernetes service-account token:
//!   `iss`, `sub = system:serviceaccount:<ns>:<sa>`, `aud` containing the audience, `exp`,
//!   `nbf`/`iat`, and optionally `kubernetes.io: {namespace, serviceaccount: {name, uid}, pod:
//!   {name, uid}}`, which must agree with `sub`.
//!
//! Tokens are never logged.

use std::path::Path;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use serde::Deserialize;

use super::Requester;

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;
/// The TokenReview `extra` key naming the pod of a bound token.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// The token is not for this CA.
    #[error("token audience does not include {0}")]
    Audience(String),
    /// Bad signature, not yet valid, malformed, not a service account.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token could not be checked (API server unreachable).
    #[error("cannot verify the token now: {0}")]
    Unavailable(String),
    /// The public key file is unusable.
    #[error("token public key {path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
}

/// Verifies Bearer tokens.
#[derive(Clone)]
pub enum TokenVerifier {
    /// ES256 JWTs signed by the local node.
    Local {
        /// The node's public key.
        key: DecodingKey,
        /// Required audience.
        audience: String,
    },
    /// Kubernetes TokenReview.
    Kubernetes {
        /// The client.
        client: kube::Client,
        /// Required audience.
        audience: String,
    },
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local { audience, .. } => write!(f, "TokenVerifier::Local({audience})"),
            Self::Kubernetes { audience, .. } => write!(f, "TokenVerifier::Kubernetes({audience})"),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Debug, Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    serviceaccount: Option<NamedRef>,
    pod: Option<NamedRef>,
}

#[derive(Debug, Deserialize)]
struct NamedRef {
    name: String,
}

/// `system:serviceaccount:<ns>:<sa>` → `(ns, sa)`.
pub fn parse_service_account_user(user: &str) -> Option<(String, String)> {
    let rest = user.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| (ns.to_owned(), sa.to_owned()))
}

impl TokenVerifier {
    /// A local verifier from a PEM public key file (EC P-256).
    pub fn local_from_file(path: &Path, audience: &str) -> Result<TokenVerifier, TokenError> {
        let key_error = |message: String| TokenError::Key {
            path: path.display().to_string(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| key_error(e.to_string()))?;
        Self::local_from_pem(&pem, audience).map_err(|e| match e {
            TokenError::Key { message, .. } => key_error(message),
            other => other,
        })
    }

    /// A local verifier from PEM text (`PUBLIC KEY`, EC P-256).
    pub fn local_from_pem(pem: &[u8], audience: &str) -> Result<TokenVerifier, TokenError> {
        // Ensures a provider even if another crate of the build also enabled aws-lc.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let key = DecodingKey::from_ec_pem(pem).map_err(|e| TokenError::Key {
            path: String::new(),
            message: e.to_string(),
        })?;
        Ok(TokenVerifier::Local {
            key,
            audience: audience.to_owned(),
        })
    }

    /// Checks `token` and says whose it is.
    pub async fn verify(&self, token: &str) -> Result<Requester, TokenError> {
        match self {
            Self::Local { key, audience } => verify_local(key, audience, token),
            Self::Kubernetes { client, audience } => review(client, audience, token).await,
        }
    }
}

fn verify_local(key: &DecodingKey, audience: &str, token: &str) -> Result<Requester, TokenError> {
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
    validation.validate_nbf = true;
    validation.leeway = LEEWAY_SECS;
    let data =
        jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::InvalidAudience => TokenError::Audience(audience.to_owned()),
            ErrorKind::InvalidSignature => TokenError::Invalid("bad signature".into()),
            ErrorKind::ImmatureSignature => TokenError::Invalid("not valid yet (nbf)".into()),
            ErrorKind::InvalidAlgorithm => TokenError::Invalid("algorithm must be ES256".into()),
            ErrorKind::MissingRequiredClaim(c) => TokenError::Invalid(format!("missing claim {c}")),
            other => TokenError::Invalid(format!("{other:?}")),
        })?;
    let claims = data.claims;
    let (namespace, service_account) = parse_service_account_user(&claims.sub)
        .ok_or_else(|| TokenError::Invalid("sub is not system:serviceaccount:<ns>:<sa>".into()))?;
    let mut pod = None;
    if let Some(k) = claims.kubernetes {
        if k.namespace.as_deref().is_some_and(|n| n != namespace) {
            return Err(TokenError::Invalid(
                "kubernetes.io.namespace disagrees with sub".into(),
            ));
        }
        if k.serviceaccount
            .as_ref()
            .is_some_and(|s| s.name != service_account)
        {
            return Err(TokenError::Invalid(
                "kubernetes.io.serviceaccount.name disagrees with sub".into(),
            ));
        }
        pod = k.pod.map(|p| p.name);
    }
    Ok(Requester {
        namespace,
        service_account,
        pod,
    })
}

async fn review(
    client: &kube::Client,
    audience: &str,
    token: &str,
) -> Result<Requester, TokenError> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..Default::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let answer = api
        .create(&PostParams::default(), &request)
        .await
        .map_err(|e| TokenError::Unavailable(e.to_string()))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let reason = status.error.unwrap_or_else(|| "not authenticated".into());
        return Err(if reason.contains("expired") {
            TokenError::Expired
        } else if reason.contains("audience") {
            TokenError::Audience(audience.to_owned())
        } else {
            TokenError::Invalid(reason)
        });
    }
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == audience)
    {
        return Err(TokenError::Audience(audience.to_owned()));
    }
    let user = status.user.unwrap_or_default();
    let (namespace, service_account) = user
        .username
        .as_deref()
        .and_then(parse_service_account_user)
        .ok_or_else(|| TokenError::Invalid("not a service account token".into()))?;
    let pod = user
        .extra
        .and_then(|e| e.get(EXTRA_POD_NAME).and_then(|v| v.first().cloned()));
    Ok(Requester {
        namespace,
        service_account,
        pod,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_users() {
        assert_eq!(
            parse_service_account_user("system:serviceaccount:ns:sa"),
            Some(("ns".into(), "sa".into()))
        );
        assert_eq!(parse_service_account_user("system:node:x"), None);
        assert_eq!(
            parse_service_account_user("system:serviceaccount:ns:"),
            None
        );
    }
}
