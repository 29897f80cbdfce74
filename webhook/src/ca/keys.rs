//! CA keys as people have them: PKCS#8 (`PRIVATE KEY`), PKCS#1 RSA (`RSA PRIVATE KEY`, what
//! Istio's sample `cacerts` and `openssl genrsa` write) and SEC1 EC (`EC PRIVATE KEY`). ring
//! loads only PKCS#8, so the other two are wrapped into PKCS#8 first (a fixed DER envelope).

use rcgen::KeyPair;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// `rsaEncryption` with its NULL parameters.
const RSA_ALGORITHM: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// `id-ecPublicKey`.
const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// `prime256v1`.
const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// `secp384r1`.
const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Reads a private key in any of the supported PEM forms.
pub fn key_pair_from_pem(pem: &str) -> Result<KeyPair, String> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("key PEM: {e}"))?;
    let pkcs8 = match &key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => wrap(RSA_ALGORITHM, k.secret_pkcs1_der()),
        PrivateKeyDer::Sec1(k) => {
            let sec1 = k.secret_sec1_der();
            let curve = if contains(sec1, P384) { P384 } else { P256 };
            let mut algorithm = EC_PUBLIC_KEY.to_vec();
            algorithm.extend_from_slice(curve);
            wrap(&tlv(0x30, &algorithm), sec1)
        }
        _ => return Err("unsupported private key format".into()),
    };
    KeyPair::try_from(&PrivatePkcs8KeyDer::from(pkcs8)).map_err(|e| format!("key: {e}"))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `PrivateKeyInfo ::= SEQUENCE { version 0, algorithm, OCTET STRING key }`.
fn wrap(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(algorithm);
    body.extend_from_slice(&tlv(0x04, key));
    tlv(0x30, &body)
}

fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs8_round_trips() {
        let key = KeyPair::generate().expect("key");
        let back = key_pair_from_pem(&key.serialize_pem()).expect("pkcs8");
        assert_eq!(back.public_key_raw(), key.public_key_raw());
    }

    #[test]
    fn openssl_forms_load() {
        let dir = tempfile::tempdir().expect("tmp");
        let cases = [
            (
                "rsa.pem",
                vec!["genrsa", "-traditional", "-out", "rsa.pem", "2048"],
            ),
            (
                "ec.pem",
                vec![
                    "ecparam",
                    "-genkey",
                    "-name",
                    "prime256v1",
                    "-noout",
                    "-out",
                    "ec.pem",
                ],
            ),
        ];
        for (file, args) in cases {
            let status = std::process::Command::new("openssl")
                .args(&args)
                .current_dir(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run openssl ({e}): this test needs the openssl command line \
                         (Debian package openssl) to make keys in the forms people have"
                    )
                });
            assert!(status.success(), "openssl {args:?}");
            let pem = std::fs::read_to_string(dir.path().join(file)).expect("read");
            assert!(pem.contains(if file == "rsa.pem" {
                "RSA PRIVATE KEY"
            } else {
                "EC PRIVATE KEY"
            }));
            key_pair_from_pem(&pem).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
}
