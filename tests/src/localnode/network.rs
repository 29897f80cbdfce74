//! Network namespaces, the node bridge and pod veth pairs, driven through iproute2.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;

use anyhow::{Context, bail};
use nix::sched::{CloneFlags, setns};

/// Runs `ip <args>`; the error carries ip's own message.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2 is required)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Path of a named network namespace.
pub fn netns_path(name: &str) -> String {
    format!("/var/run/netns/{name}")
}

/// Runs `f` on a fresh thread inside network namespace `name`. Sockets created there stay in
/// that namespace and may be used from any thread afterwards.
pub fn in_netns<T, F>(name: &str, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = File::open(netns_path(name)).with_context(|| format!("open netns {name}"))?;
    std::thread::spawn(move || setns(&ns, CloneFlags::CLONE_NEWNET).map(|()| f()))
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns {name} panicked"))?
        .with_context(|| format!("setns {name}"))
}

/// Addresses of the node network.
#[derive(Debug, Clone, Copy)]
pub struct Subnet;

impl Subnet {
    /// Bridge address (the pods' gateway).
    pub const GATEWAY4: Ipv4Addr = Ipv4Addr::new(10, 44, 0, 1);
    /// Bridge IPv6 address.
    pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x44, 0, 0, 0, 0, 0, 1);

    /// The IPv4 address of pod number `n` (from 2).
    pub fn pod4(n: u16) -> Ipv4Addr {
        Ipv4Addr::new(10, 44, (n >> 8) as u8, (n & 0xff) as u8)
    }

    /// The IPv6 address of pod number `n`.
    pub fn pod6(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x44, 0, 0, 0, 0, 0, n)
    }

    /// Service VIP number `n`: nothing routes these; only redirection reaches them.
    pub fn vip4(n: u16) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, (n >> 8) as u8, (n & 0xff) as u8)
    }

    /// IPv6 service VIP number `n`.
    pub fn vip6(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, n)
    }
}

/// Bridge name inside the node namespace.
pub const BRIDGE: &str = "weftbr0";

/// Creates the node namespace with its bridge.
pub fn create_node(ns: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&["-n", ns, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["-n", ns, "addr", "add", "10.44.0.1/16", "dev", BRIDGE])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        "fd00:44::1/64",
        "dev",
        BRIDGE,
        "nodad",
    ])?;
    ip(&["-n", ns, "link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// Creates a pod namespace attached to the node bridge with addresses for pod `n`.
pub fn create_pod(node_ns: &str, pod_ns: &str, n: u16) -> anyhow::Result<()> {
    let veth = format!("veth{n}");
    ip(&["netns", "add", pod_ns])?;
    ip(&[
        "-n", node_ns, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
        pod_ns,
    ])?;
    ip(&["-n", node_ns, "link", "set", &veth, "master", BRIDGE, "up"])?;
    let v4 = format!("{}/16", Subnet::pod4(n));
    let v6 = format!("{}/64", Subnet::pod6(n));
    ip(&["-n", pod_ns, "link", "set", "lo", "up"])?;
    ip(&["-n", pod_ns, "addr", "add", &v4, "dev", "eth0"])?;
    ip(&["-n", pod_ns, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
    ip(&["-n", pod_ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", pod_ns, "route", "add", "default", "via", "10.44.0.1"])?;
    ip(&[
        "-n",
        pod_ns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:44::1",
    ])?;
    Ok(())
}

/// Deletes a namespace (and with it its interfaces and rules); a missing one is fine.
pub fn delete_netns(ns: &str) {
    if std::path::Path::new(&netns_path(ns)).exists()
        && let Err(e) = ip(&["netns", "del", ns])
    {
        tracing::warn!(error = %e, "netns delete failed");
    }
}

/// Names of all network namespaces.
pub fn list_netns() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
