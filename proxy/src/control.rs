//! Connections to the control plane's TLS port (15012): the server is verified against the
//! mesh roots and the name in `WEFT_CONTROL_PLANE`; HTTP/2 on top.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::http::Body;

/// Errors talking to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// `WEFT_CONTROL_PLANE` is not `host:port`.
    #[error("control plane address {0:?} is not host:port")]
    Address(String),
    /// Name resolution or TCP connect failed.
    #[error("connect to the control plane {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// TLS failed (wrong root, wrong name, refused client certificate).
    #[error("tls with the control plane {addr}: {source}")]
    Tls {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// rustls refused the roots or the client certificate.
    #[error("tls config: {0}")]
    Config(#[from] rustls::Error),
    /// HTTP/2 failed.
    #[error("http/2 with the control plane: {0}")]
    Http(#[from] hyper::Error),
}

/// Where the control plane is.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    addr: String,
    host: String,
    port: u16,
}

impl ControlPlane {
    /// Parses `host:port` (`[v6]:port` for IPv6 literals). The address is also the
    /// authority of the requests, so it must be a valid URI authority.
    pub fn parse(addr: &str) -> Result<ControlPlane, ControlError> {
        let bad = || ControlError::Address(addr.to_owned());
        http::uri::Authority::try_from(addr).map_err(|_| bad())?;
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(ControlPlane {
            addr: addr.to_owned(),
            host: host.to_owned(),
            port,
        })
    }

    /// The address as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Opens an HTTP/2 connection, verifying the control plane against `roots`; with
    /// `client`, presenting that workload certificate.
    pub async fn connect(
        &self,
        roots: &[CertificateDer<'static>],
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        timeout: Duration,
    ) -> Result<http2::SendRequest<Body>, ControlError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone())?;
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(store);
        let mut config = match client {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| ControlError::Address(self.addr.clone()))?;
        let connect_err = |source| ControlError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let tcp = tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| connect_err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))?
        .map_err(connect_err)?;
        tcp.set_nodelay(true).map_err(connect_err)?;
        let tls = tokio::time::timeout(
            timeout,
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .map_err(|_| ControlError::Tls {
            addr: self.addr.clone(),
            source: io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"),
        })?
        .map_err(|source| ControlError::Tls {
            addr: self.addr.clone(),
            source,
        })?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await?;
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "control-plane connection ended");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let cp = ControlPlane::parse("weft-control-plane.weft-system.svc:15012").expect("dns");
        assert_eq!(
            (cp.host.as_str(), cp.port),
            ("weft-control-plane.weft-system.svc", 15012)
        );
        let cp = ControlPlane::parse("[fd00::1]:15012").expect("v6");
        assert_eq!(cp.host, "fd00::1");
        assert!(ControlPlane::parse("no-port").is_err());
        assert!(ControlPlane::parse("host:0").is_err());
        for bad in [
            "bad host:15012",
            "host/path:15012",
            "user@host:15012x",
            "[fd00::1:15012",
        ] {
            let error = ControlPlane::parse(bad).expect_err(bad);
            assert!(error.to_string().contains(bad), "{error}");
        }
    }
}
