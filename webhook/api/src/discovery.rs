//! The wire protocol between proxies and the control plane, on its TLS port (15012, HTTP/2).
//! The control plane's serving certificate chains to the mesh root, which the proxy has from
//! its bootstrap (`WEFT_ROOT_CERT`).
//!
//! **Certificates** — `POST` [`PATH_CERTIFICATES`] with `Authorization: Bearer <token>` (the
//! pod's projected service-account token, audience `weft-ca`) and a JSON
//! [`CertificateRequest`] carrying a PEM CSR for exactly `spiffe://<td>/ns/<ns>/sa/<sa>` of
//! that token. The answer is a [`CertificateResponse`]; errors are a non-2xx status with a
//! JSON [`ErrorResponse`]. The private key never leaves the pod.
//!
//! **Config** — `POST` [`PATH_DISCOVERY`] over mutual TLS with the workload certificate (which
//! identifies the proxy), full duplex: the request body is a stream of [`DiscoveryRequest`]
//! messages, the response body a stream of [`DiscoveryResponse`] messages, each one JSON
//! document followed by `\n`. The first request names the proxy ([`Node`]); every snapshot is
//! then acknowledged (or refused with the reason) by version. The stream stays open; the
//! control plane pushes a new snapshot when the proxy's view changes (bursts debounced), and
//! the proxy reconnects with backoff when it breaks, keeping its last good snapshot.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::Snapshot;

/// Path of the certificate-signing endpoint.
pub const PATH_CERTIFICATES: &str = "/weft.v1/certificates";
/// Path of the config stream.
pub const PATH_DISCOVERY: &str = "/weft.v1/discovery";
/// Content type of both streams' messages.
pub const CONTENT_TYPE_NDJSON: &str = "application/x-ndjson";
/// Default lifetime of workload certificates.
pub const DEFAULT_CERT_TTL_SECS: u64 = 24 * 3600;

/// A certificate signing request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequest {
    /// PEM PKCS#10 CSR; its only SAN is the workload's SPIFFE URI.
    pub csr: String,
    /// Requested lifetime; the CA may shorten it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_secs: Option<u64>,
}

/// A signed certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// PEM certificates, leaf first, then intermediates up to (not including) the root.
    pub cert_chain: Vec<String>,
    /// PEM roots the mesh trusts now (two during a root rotation).
    pub roots: Vec<String>,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What was wrong, for the proxy's log.
    pub error: String,
}

/// The proxy, as it introduces itself on the config stream. Its identity comes from its
/// certificate; these fields pick the pod.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// Pod name.
    pub name: String,
    /// Namespace (must match the certificate's).
    pub namespace: String,
    /// Pod IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// Proxy version, for the control plane's logs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub proxy_version: String,
}

/// A message from proxy to control plane.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryRequest {
    /// Present in the first message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Node>,
    /// The version this message acknowledges (or refuses, with `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why that version was refused; the proxy keeps its previous snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A message from control plane to proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryResponse {
    /// Version of the snapshot (also in `snapshot.version`).
    pub version: String,
    /// The proxy's whole view; its `identity` is always absent.
    pub snapshot: Snapshot,
    /// PEM roots the mesh trusts now: a new root is picked up live, both are trusted during
    /// the overlap of a rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_bundle: Vec<String>,
}

/// Serialises one message of a stream: JSON and a newline.
pub fn encode_message<T: Serialize>(message: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut v = serde_json::to_vec(message)?;
    v.push(b'\n');
    Ok(v)
}

/// Splits complete messages off the front of a stream buffer. Returns the messages and
/// leaves a partial trailing line in `buf`.
pub fn decode_messages<T: for<'de> Deserialize<'de>>(
    buf: &mut Vec<u8>,
) -> Result<Vec<T>, serde_json::Error> {
    let mut out = Vec::new();
    while let Some(end) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=end).collect();
        let line = &line[..line.len() - 1];
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.push(serde_json::from_slice(line)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_framing() {
        let a = DiscoveryRequest {
            node: Some(Node {
                name: "p".into(),
                namespace: "ns".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let b = DiscoveryRequest {
            version: Some("7".into()),
            ..Default::default()
        };
        let mut buf = encode_message(&a).expect("encode");
        let second = encode_message(&b).expect("encode");
        buf.extend_from_slice(&second[..5]);
        let got: Vec<DiscoveryRequest> = decode_messages(&mut buf).expect("decode");
        assert_eq!(got, [a]);
        buf.extend_from_slice(&second[5..]);
        let got: Vec<DiscoveryRequest> = decode_messages(&mut buf).expect("decode");
        assert_eq!(got, [b]);
        assert!(buf.is_empty());
        buf.extend_from_slice(b"{not json}\n");
        assert!(decode_messages::<DiscoveryRequest>(&mut buf).is_err());
    }
}
