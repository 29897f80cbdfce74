//! A pod's network namespace as the agent needs it: its cookie (the pods' key in the maps),
//! its addresses and its interfaces. Each look is made from a short-lived thread that enters
//! the namespace, so the agent's own threads never change namespace.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nix::libc;
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, getsockopt, socket};
use nix::{getsockopt_impl, sockopt_impl};

sockopt_impl!(
    /// `SO_NETNS_COOKIE`: the cookie of the socket's network namespace (Linux 5.14).
    NetnsCookie,
    GetOnly,
    libc::SOL_SOCKET,
    libc::SO_NETNS_COOKIE,
    u64
);

/// Errors looking into a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file cannot be opened.
    #[error("opening network namespace {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A system call failed.
    #[error("{what}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The helper thread died.
    #[error("network namespace helper thread panicked")]
    Thread,
}

/// What the agent knows of a pod's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsInfo {
    /// Its cookie.
    pub cookie: u64,
    /// Its inode (identifies it while it lives).
    pub inode: u64,
    /// Global addresses of its interfaces (not loopback, not link-local).
    pub addrs: Vec<IpAddr>,
    /// Interface indexes by name.
    pub ifaces: BTreeMap<String, u32>,
}

/// The cookie of the calling thread's network namespace.
pub fn current_cookie() -> Result<u64, NetnsError> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .or_else(|_| {
        socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
    })
    .map_err(|source| NetnsError::Sys {
        what: "socket",
        source,
    })?;
    getsockopt(&sock, NetnsCookie).map_err(|source| NetnsError::Sys {
        what: "getsockopt(SO_NETNS_COOKIE)",
        source,
    })
}

/// Opens the namespace file at `path`.
pub fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Looks into the network namespace at `path`.
pub fn inspect(path: &Path) -> Result<NetnsInfo, NetnsError> {
    let file = open(path)?;
    let inode = file
        .metadata()
        .map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?
        .ino();
    let (cookie, addrs, ifaces) = within(&file, || {
        let cookie = current_cookie()?;
        let mut addrs = Vec::new();
        let mut ifaces = BTreeMap::new();
        let all = nix::ifaddrs::getifaddrs().map_err(|source| NetnsError::Sys {
            what: "getifaddrs",
            source,
        })?;
        for a in all {
            if let Ok(index) = nix::net::if_::if_nametoindex(a.interface_name.as_str()) {
                ifaces.insert(a.interface_name.clone(), index);
            }
            let ip = a.address.as_ref().and_then(|s| {
                s.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            });
            if let Some(ip) = ip.filter(|ip| is_global(*ip)) {
                addrs.push(ip);
            }
        }
        addrs.sort();
        addrs.dedup();
        Ok((cookie, addrs, ifaces))
    })?;
    Ok(NetnsInfo {
        cookie,
        inode,
        addrs,
        ifaces,
    })
}

/// Runs `f` on a new thread that has entered the network namespace `ns`.
pub fn within<T: Send>(
    ns: &File,
    f: impl FnOnce() -> Result<T, NetnsError> + Send,
) -> Result<T, NetnsError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Sys {
                what: "setns",
                source,
            })?;
            f()
        })
        .join()
        .map_err(|_| NetnsError::Thread)?
    })
}

fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_has_a_cookie_and_loopback() {
        let cookie = current_cookie().expect("cookie");
        assert_ne!(cookie, 0);
        let info = inspect(Path::new("/proc/self/ns/net")).expect("inspect");
        assert_eq!(
            info.cookie, cookie,
            "a thread in the same namespace sees the same cookie"
        );
        assert_eq!(info.ifaces.get("lo"), Some(&1));
        assert!(info.addrs.iter().all(|ip| !ip.is_loopback()));
    }
}
