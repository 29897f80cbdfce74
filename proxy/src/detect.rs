//! Protocol detection on a client's first bytes, without consuming them.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use weft_api::config::Protocol;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface (prior knowledge, gRPC).
    Http2,
    /// A TLS handshake record.
    Tls,
    /// Anything else, or nothing before the timeout: opaque TCP.
    Tcp,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
/// Enough bytes to decide every case.
const PEEK_LEN: usize = 24;

/// Classifies a prefix of the stream: `None` means more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if H2_PREFACE.starts_with(buf) {
        return None;
    }
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => None,
            Some(0x03) => Some(Detected::Tls),
            Some(_) => Some(Detected::Tcp),
        };
    }
    let mut undecided = false;
    for m in METHODS {
        if buf.len() >= m.len() {
            if buf.starts_with(m) {
                return Some(Detected::Http1);
            }
        } else if m.starts_with(buf) {
            undecided = true;
        }
    }
    if undecided { None } else { Some(Detected::Tcp) }
}

/// How long a client of a port declared HTTP may take to send its first bytes. The port's
/// protocol is known; only HTTP/1 versus HTTP/2 is open, so there is no reason to give up
/// early (and falling back to opaque TCP would bypass routing and retries).
pub const DECLARED_HTTP_WAIT: Duration = Duration::from_secs(60);

/// The protocol to serve a connection with, given the port's declared protocol: declared TCP
/// and TLS never wait; declared HTTP waits for the first bytes to tell HTTP/1 from HTTP/2 and
/// stays HTTP whatever arrives; undeclared ports are detected within `timeout`.
pub async fn for_port(
    stream: &TcpStream,
    declared: Protocol,
    timeout: Duration,
) -> io::Result<Detected> {
    Ok(match declared {
        Protocol::Tcp | Protocol::Tls => Detected::Tcp,
        Protocol::Http => match detect(stream, DECLARED_HTTP_WAIT).await? {
            Detected::Http2 => Detected::Http2,
            _ => Detected::Http1,
        },
        Protocol::Http2 | Protocol::Grpc => match detect(stream, DECLARED_HTTP_WAIT).await? {
            Detected::Http1 => Detected::Http1,
            _ => Detected::Http2,
        },
        Protocol::Auto => detect(stream, timeout).await?,
    })
}

/// Peeks at the stream until [`classify`] decides or `timeout` passes (then: TCP). A client
/// that closes before sending anything is TCP too.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> io::Result<Detected> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; PEEK_LEN];
    let mut seen = 0;
    let mut backoff = Duration::from_micros(200);
    loop {
        let n = if seen == 0 {
            // Nothing yet: wait for readability rather than polling.
            match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => return Ok(Detected::Tcp),
            }
        } else {
            stream.peek(&mut buf).await?
        };
        if n == 0 {
            return Ok(Detected::Tcp);
        }
        if let Some(d) = classify(&buf[..n]) {
            return Ok(d);
        }
        if n == seen {
            // Same partial prefix as before: the rest has not arrived. Peek returns at once
            // while data is buffered, so wait a little before looking again.
            if Instant::now() + backoff > deadline {
                return Ok(Detected::Tcp);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(10));
        }
        seen = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Detected::Http2)
        );
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Detected::Tls));
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(b"\x00\x00\x00\x0aJ5.7"), Some(Detected::Tcp));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Detected::Tcp));
        assert_eq!(classify(b"GETX"), Some(Detected::Tcp));
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        (c, s)
    }

    #[tokio::test]
    async fn detects_without_consuming() {
        let (mut c, s) = pair().await;
        c.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        assert_eq!(
            detect(&s, Duration::from_secs(5)).await.expect("detect"),
            Detected::Http1
        );
        let mut buf = [0u8; 3];
        s.peek(&mut buf).await.expect("peek");
        assert_eq!(&buf, b"GET");
    }

    #[tokio::test]
    async fn split_prefix_is_reassembled() {
        let (mut c, s) = pair().await;
        c.write_all(b"PRI * HTTP").await.expect("write");
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            c.write_all(b"/2.0\r\n\r\nSM\r\n\r\n").await.expect("write");
            c
        });
        assert_eq!(
            detect(&s, Duration::from_secs(5)).await.expect("detect"),
            Detected::Http2
        );
        drop(writer.await);
    }

    #[tokio::test]
    async fn declared_ports_never_fall_back_to_tcp() {
        // A slow HTTP client, past the detection timeout, on a port declared HTTP.
        let (mut c, s) = pair().await;
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(120)).await;
            c.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
            c
        });
        let d = for_port(&s, Protocol::Http, Duration::from_millis(20))
            .await
            .expect("detect");
        assert_eq!(d, Detected::Http1);
        drop(writer.await);
        let (mut c, s) = pair().await;
        c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(
            for_port(&s, Protocol::Http, Duration::from_millis(20))
                .await
                .expect("h2"),
            Detected::Http2
        );
        // Declared TCP: decided before any byte arrives.
        let (_c, s) = pair().await;
        let started = Instant::now();
        assert_eq!(
            for_port(&s, Protocol::Tcp, Duration::from_secs(30))
                .await
                .expect("tcp"),
            Detected::Tcp
        );
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[tokio::test]
    async fn silent_client_times_out_as_tcp() {
        let (_c, s) = pair().await;
        let started = Instant::now();
        assert_eq!(
            detect(&s, Duration::from_millis(50)).await.expect("detect"),
            Detected::Tcp
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
