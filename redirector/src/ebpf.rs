//! The init step in eBPF mode (`init --mode=ebpf`): no rule is installed; the step checks that
//! the node agent has taken the pod, like Istio CNI's validation container, and fails the pod
//! with a clear message otherwise.
//!
//! The check is a real redirected connection, so it needs neither bpffs nor any capability:
//! it listens on `127.0.0.1:<outbound port>` (the proxy is not running yet) and connects to
//! the probe address `192.0.2.1:<outbound port>` (TEST-NET-1, routed nowhere), which the
//! programs redirect for every meshed process but the proxy. The connection must land on the
//! listener, and `SO_ORIGINAL_DST` on the accepted socket must answer the probe address. The
//! agent activates a pod last (after its addresses, rules and `sk_lookup` link), so success
//! means the whole pod is in place. Until then the step retries, up to a timeout. The probe
//! socket has `SO_DONTROUTE`: not redirected, its connect fails at once (the probe address is
//! not on a local link) and no packet leaves the pod.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use nix::{setsockopt_impl, sockopt_impl};
use tracing::{debug, info};
use weft_api::redirect::InitArgs;
use weft_ebpf_maps::PROBE_V4;

sockopt_impl!(
    /// `SO_DONTROUTE`: only directly connected destinations.
    DontRoute,
    SetOnly,
    libc::SOL_SOCKET,
    libc::SO_DONTROUTE,
    bool
);

/// Environment variable for the time the init step waits for the agent (seconds).
pub const ENV_VERIFY_TIMEOUT: &str = "WEFT_EBPF_VERIFY_TIMEOUT";
const RETRY: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Errors of the eBPF mode check.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The agent has not taken the pod in time.
    #[error(
        "eBPF interception: the node agent has not taken this pod after {waited:?} (last probe: \
         {last}). Is `weft-redirector node` running on this node, with this pod's cgroup under \
         its --cgroup-root (and, on a local node, this pod's file in its --pods-dir)? Without it \
         the pod's traffic would bypass the proxy. Otherwise run the pod in iptables mode \
         (annotation sidecar.istio.io/interceptionMode: REDIRECT)"
    )]
    NotTaken {
        /// How long the step waited.
        waited: Duration,
        /// What the last probe saw.
        last: String,
    },
    /// The probe's listener cannot be opened.
    #[error("eBPF interception check: listening on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Checks, for up to `timeout`, that the node agent's programs redirect this pod.
pub fn verify(args: &InitArgs, timeout: Duration) -> Result<(), EbpfError> {
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, args.outbound_port));
    let listener = match TcpListener::bind(local) {
        Ok(l) => {
            l.set_nonblocking(true)
                .map_err(|source| EbpfError::Listen {
                    addr: local,
                    source,
                })?;
            Some(l)
        }
        // The proxy already listens (a restarted init step): a connect to the unrouted probe
        // address that succeeds was redirected to it.
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => None,
        Err(source) => {
            return Err(EbpfError::Listen {
                addr: local,
                source,
            });
        }
    };
    let probe = SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(PROBE_V4),
        args.outbound_port,
    ));
    let start = Instant::now();
    loop {
        match probe_once(listener.as_ref(), probe) {
            Ok(()) => {
                info!(
                    elapsed_ms = start.elapsed().as_millis() as u64,
                    "eBPF interception verified: the node agent has taken this pod"
                );
                return Ok(());
            }
            Err(last) if start.elapsed() >= timeout => {
                return Err(EbpfError::NotTaken {
                    waited: start.elapsed(),
                    last,
                });
            }
            Err(why) => debug!(%why, "not taken yet"),
        }
        std::thread::sleep(RETRY);
    }
}

fn probe_once(listener: Option<&TcpListener>, probe: SocketAddr) -> Result<(), String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    setsockopt(&socket, DontRoute, &true).map_err(|e| e.to_string())?;
    socket
        .connect_timeout(&probe.into(), CONNECT_TIMEOUT)
        .map_err(|e| format!("connect to {probe} not redirected: {e}"))?;
    let stream = TcpStream::from(socket);
    let Some(listener) = listener else {
        return Ok(());
    };
    let me = stream.local_addr().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let accepted = loop {
        match listener.accept() {
            Ok((s, peer)) if peer.port() == me.port() => break s,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("connect to {probe} went elsewhere: {e}")),
        }
    };
    let orig = getsockopt(&accepted, sockopt::OriginalDst)
        .map_err(|e| format!("redirected, but SO_ORIGINAL_DST fails: {e}"))?;
    let orig = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(u32::from_be(orig.sin_addr.s_addr))),
        u16::from_be(orig.sin_port),
    );
    if orig == probe {
        Ok(())
    } else {
        Err(format!("redirected, but SO_ORIGINAL_DST answers {orig}"))
    }
}
