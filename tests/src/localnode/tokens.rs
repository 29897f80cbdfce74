//! Service-account tokens, as the local node's "API server" issues them: ES256 JWTs with the
//! claims of Kubernetes' projected tokens, verified by the control plane's CA with the node's
//! public key.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// Signs tokens.
pub struct TokenSigner {
    key: EncodingKey,
    /// The public key, PEM (`PUBLIC KEY`), for `--token-public-key`.
    pub public_pem: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: String,
    aud: Vec<&'a str>,
    exp: u64,
    iat: u64,
    nbf: u64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Kube<'a>,
}

#[derive(Serialize)]
struct Kube<'a> {
    namespace: &'a str,
    serviceaccount: Named<'a>,
    pod: Named<'a>,
}

#[derive(Serialize)]
struct Named<'a> {
    name: &'a str,
    uid: String,
}

impl TokenSigner {
    /// A new P-256 key.
    pub fn new() -> anyhow::Result<TokenSigner> {
        let pair = rcgen::KeyPair::generate()?;
        Ok(TokenSigner {
            key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())?,
            public_pem: pair.public_key_pem(),
        })
    }

    /// A projected token for `sa` in `namespace`, bound to `pod`, for `audience`.
    pub fn sign(
        &self,
        namespace: &str,
        sa: &str,
        pod: &str,
        audience: &str,
        ttl_secs: u64,
    ) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = Claims {
            iss: "https://localnode.weft.dev",
            sub: format!("system:serviceaccount:{namespace}:{sa}"),
            aud: vec![audience],
            exp: now + ttl_secs,
            iat: now,
            nbf: now,
            kubernetes: Kube {
                namespace,
                serviceaccount: Named {
                    name: sa,
                    uid: format!("sa-{namespace}-{sa}"),
                },
                pod: Named {
                    name: pod,
                    uid: format!("pod-{namespace}-{pod}"),
                },
            },
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &self.key,
        )?)
    }
}
