//! Socket plumbing: the original destination of a redirected connection, listeners for both
//! address families, and connects with a timeout.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The destination the client meant before NAT (or eBPF) sent it to us.
///
/// Fails with `NotFound` when the connection was not redirected: a client connected to the
/// proxy's port directly, which must never be forwarded (it would loop).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let not_redirected = |e: nix::Error| {
        if e == nix::Error::ENOENT {
            io::Error::new(io::ErrorKind::NotFound, "connection was not redirected")
        } else {
            io::Error::from(e)
        }
    };
    match stream.local_addr()? {
        SocketAddr::V4(_) => {
            let sa = getsockopt(stream, sockopt::OriginalDst).map_err(not_redirected)?;
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                u16::from_be(sa.sin_port),
            )))
        }
        SocketAddr::V6(_) => {
            let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(not_redirected)?;
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sa.sin6_addr.s6_addr),
                u16::from_be(sa.sin6_port),
                sa.sin6_flowinfo,
                sa.sin6_scope_id,
            )))
        }
    }
}

/// Binds a listener. IPv6 listeners are v6-only so that each family has its own socket (the
/// original-destination lookup differs per family).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            s.set_only_v6(true)?;
            s.set_nonblocking(true)?;
            TcpSocket::from_std_stream(s.into())
        }
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Binds the IPv4 address and, when the namespace has IPv6, the IPv6 one. At least one must
/// succeed.
pub fn bind_dual(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    let mut last_err = None;
    for addr in addrs {
        match bind(*addr) {
            Ok(l) => listeners.push(l),
            Err(e) if addr.is_ipv6() && listeners.len() == 1 => {
                tracing::info!(%addr, error = %e, "ipv6 unavailable, listening on ipv4 only");
            }
            Err(e) => last_err = Some((addr, e)),
        }
    }
    match (listeners.is_empty(), last_err) {
        (_, Some((addr, e))) => Err(io::Error::new(e.kind(), format!("bind {addr}: {e}"))),
        (true, None) => Err(io::Error::other("no address to bind")),
        (false, None) => Ok(listeners),
    }
}

/// Connects with a timeout and disables Nagle's algorithm (every hop here is latency-bound).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out after {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects to the app on the loopback address of the same family as `ip`, falling back to
/// the other family (an app may listen on only one).
pub async fn connect_app(ip: IpAddr, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let (first, second) = match ip {
        IpAddr::V4(_) => (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ),
        IpAddr::V6(_) => (
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        ),
    };
    match connect(SocketAddr::new(first, port), timeout).await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            connect(SocketAddr::new(second, port), timeout)
                .await
                .map_err(|_| e)
        }
        other => other,
    }
}

/// Unwraps IPv4-mapped IPv6 addresses.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}
