//! App health probes run by the proxy for the kubelet: the injector rewrites a container's
//! HTTP, TCP and gRPC probes to `GET :15020/app-health/<container>/<kind>`, and the proxy
//! runs the original probe against the app over localhost. Kubelet probes thus keep working
//! when the port requires mTLS.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use weft_api::bootstrap::{AppProbe, GrpcProbe, HttpGetProbe};

use crate::socket;

/// Kubernetes' default probe timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs one probe; `Err` carries why it failed.
pub async fn check(probe: &AppProbe) -> Result<(), String> {
    let timeout = probe
        .timeout_seconds
        .map(|s| Duration::from_secs(u64::from(s.max(1))))
        .unwrap_or(DEFAULT_TIMEOUT);
    let run = async {
        if let Some(http) = &probe.http_get {
            http_get(http, timeout).await
        } else if let Some(tcp) = &probe.tcp_socket {
            socket::connect_app(localhost(), tcp.port, timeout)
                .await
                .map(drop)
                .map_err(|e| format!("tcp connect to port {}: {e}", tcp.port))
        } else if let Some(grpc) = &probe.grpc {
            grpc_health(grpc, timeout).await
        } else {
            Err("probe has no handler".to_owned())
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("probe timed out after {timeout:?}"))?
}

fn localhost() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

async fn http_get(probe: &HttpGetProbe, timeout: Duration) -> Result<(), String> {
    let tcp = socket::connect_app(localhost(), probe.port, timeout)
        .await
        .map_err(|e| format!("connect to port {}: {e}", probe.port))?;
    let https = probe
        .scheme
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("https"));
    let path = probe.path.clone().unwrap_or_else(|| "/".to_owned());
    let host = probe
        .host
        .clone()
        .unwrap_or_else(|| format!("localhost:{}", probe.port));
    let mut req = Request::get(path).header(http::header::HOST, host);
    req = req.header(http::header::USER_AGENT, "kube-probe/weft");
    for h in &probe.http_headers {
        req = req.header(h.name.as_str(), h.value.as_str());
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("bad probe request: {e}"))?;
    let status = if https {
        let connector = tokio_rustls::TlsConnector::from(insecure_client());
        let name = ServerName::IpAddress(localhost().into());
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls to port {}: {e}", probe.port))?;
        send_h1(tls, req).await?
    } else {
        send_h1(tcp, req).await?
    };
    // Kubernetes: any code in [200, 400) is a success.
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("HTTP probe returned {status}"))
    }
}

/// `GET http://localhost:<port><path>` on the app: the body as text (metrics merge).
pub async fn fetch_text(port: u16, path: &str) -> Result<String, String> {
    let tcp = socket::connect_app(localhost(), port, DEFAULT_TIMEOUT)
        .await
        .map_err(|e| format!("connect to port {port}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, format!("localhost:{port}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = tokio::time::timeout(DEFAULT_TIMEOUT * 5, sender.send_request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("http request: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn send_h1<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<StatusCode, String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("http request: {e}"))?;
    Ok(resp.status())
}

/// `grpc.health.v1.Health/Check`: the response's status must be SERVING (1).
async fn grpc_health(probe: &GrpcProbe, timeout: Duration) -> Result<(), String> {
    let tcp = socket::connect_app(localhost(), probe.port, timeout)
        .await
        .map_err(|e| format!("connect to port {}: {e}", probe.port))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("http/2 handshake: {e}"))?;
    tokio::spawn(conn);
    let service = probe.service.as_deref().unwrap_or_default().as_bytes();
    let mut message = Vec::new();
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        encode_varint(service.len() as u64, &mut message);
        message.extend_from_slice(service);
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap_or(0).to_be_bytes());
    frame.extend_from_slice(&message);
    let req = Request::post(format!(
        "http://localhost:{}/grpc.health.v1.Health/Check",
        probe.port
    ))
    .header(http::header::CONTENT_TYPE, "application/grpc")
    .header(http::header::TE, "trailers")
    .body(Full::new(Bytes::from(frame)))
    .map_err(|e| format!("bad probe request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("grpc request: {e}"))?;
    let header_status = resp.headers().get("grpc-status").cloned();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("grpc response: {e}"))?;
    let trailer_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned());
    let grpc_status = trailer_status.or(header_status);
    if grpc_status.as_ref().is_none_or(|s| s != "0") {
        return Err(format!("grpc-status {grpc_status:?}"));
    }
    let mut body = collected.to_bytes();
    if body.len() < 5 {
        return Err("empty health response".to_owned());
    }
    body.advance(5);
    // HealthCheckResponse { status = 1 (varint) }; SERVING is 1.
    let serving = body.first() == Some(&0x08) && body.get(1) == Some(&1);
    if serving {
        Ok(())
    } else {
        Err(format!(
            "health status is not SERVING ({:?})",
            body.as_ref()
        ))
    }
}

fn encode_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Kubelet does not verify HTTPS probe certificates; neither does the proxy on its behalf.
fn insecure_client() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The address a probe reaches (for logs).
pub fn target(probe: &AppProbe) -> Option<SocketAddr> {
    let port = probe
        .http_get
        .as_ref()
        .map(|h| h.port)
        .or(probe.tcp_socket.as_ref().map(|t| t.port))
        .or(probe.grpc.as_ref().map(|g| g.port))?;
    Some(SocketAddr::new(localhost(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use weft_api::bootstrap::TcpProbe;

    async fn one_shot_http(status: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            s.write_all(resp.as_bytes()).await.expect("write");
        });
        port
    }

    fn http(port: u16) -> AppProbe {
        AppProbe {
            http_get: Some(HttpGetProbe {
                path: Some("/ready".into()),
                port,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn http_probe_follows_kubernetes_status_rules() {
        assert!(check(&http(one_shot_http("200 OK").await)).await.is_ok());
        assert!(check(&http(one_shot_http("302 Found").await)).await.is_ok());
        let e = check(&http(one_shot_http("503 Service Unavailable").await))
            .await
            .expect_err("503 fails");
        assert!(e.contains("503"), "{e}");
    }

    #[tokio::test]
    async fn tcp_probe_needs_a_listener() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let probe = AppProbe {
            tcp_socket: Some(TcpProbe { port }),
            ..Default::default()
        };
        assert!(check(&probe).await.is_ok());
        drop(l);
        let (port, _reserved) = closed_port();
        let probe = AppProbe {
            tcp_socket: Some(TcpProbe { port }),
            ..Default::default()
        };
        let e = check(&probe).await.expect_err("nothing listens");
        assert!(e.contains(&format!("tcp connect to port {port}")), "{e}");
    }

    /// A port on which nothing listens, on 127.0.0.1 and [::1] (the probes try both), held by
    /// bound sockets that do not listen so that no other process on the machine takes it
    /// while the test runs.
    fn closed_port() -> (u16, Vec<socket2::Socket>) {
        use socket2::{Domain, Socket, Type};
        loop {
            let v4 = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            v4.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
                .expect("bind");
            let port = v4
                .local_addr()
                .expect("addr")
                .as_socket()
                .expect("inet")
                .port();
            let v6 = Socket::new(Domain::IPV6, Type::STREAM, None).expect("socket");
            v6.set_only_v6(true).expect("v6only");
            let addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
            match v6.bind(&addr.into()) {
                Ok(()) => return (port, vec![v4, v6]),
                // No IPv6 loopback here: nothing can listen there either.
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    return (port, vec![v4]);
                }
                // Taken on [::1] by someone else: another port.
                Err(_) => continue,
            }
        }
    }

    /// A real `grpc.health.v1.Health` server (tonic-health) on 127.0.0.1: the empty service
    /// name reports `overall`, `weft.Named` reports `named`.
    async fn health_server(
        overall: tonic_health::ServingStatus,
        named: tonic_health::ServingStatus,
    ) -> u16 {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter.set_service_status("", overall).await;
        reporter.set_service_status("weft.Named", named).await;
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            // The reporter lives as long as the server, or the statuses would be dropped.
            let _reporter = reporter;
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
                .await
                .expect("grpc health server");
        });
        port
    }

    fn grpc(port: u16, service: Option<&str>) -> AppProbe {
        AppProbe {
            grpc: Some(GrpcProbe {
                port,
                service: service.map(str::to_owned),
            }),
            timeout_seconds: Some(5),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn grpc_probe_asks_a_real_health_server() {
        use tonic_health::ServingStatus::{NotServing, Serving};

        let port = health_server(Serving, NotServing).await;
        check(&grpc(port, None))
            .await
            .expect("SERVING passes the probe");
        let e = check(&grpc(port, Some("weft.Named")))
            .await
            .expect_err("NOT_SERVING fails the probe");
        assert!(e.contains("not SERVING"), "{e}");
        let e = check(&grpc(port, Some("weft.Unknown")))
            .await
            .expect_err("an unknown service fails the probe");
        assert!(e.contains("grpc-status"), "{e}");

        let port = health_server(NotServing, Serving).await;
        let e = check(&grpc(port, None))
            .await
            .expect_err("NOT_SERVING fails the probe");
        assert!(e.contains("not SERVING"), "{e}");
        check(&grpc(port, Some("weft.Named")))
            .await
            .expect("the named service is SERVING");

        // Nothing listening.
        let (closed, _reserved) = closed_port();
        let e = check(&grpc(closed, None))
            .await
            .expect_err("no server fails the probe");
        assert!(e.contains(&format!("connect to port {closed}")), "{e}");
    }

    #[test]
    fn varint() {
        let mut v = Vec::new();
        encode_varint(300, &mut v);
        assert_eq!(v, [0xac, 0x02]);
    }
}
