//! The arguments of `weft-redirector init`, the injected init step.
//!
//! The injector builds an [`InitArgs`] from a pod's `traffic.sidecar.istio.io/*` annotations and
//! renders it with [`InitArgs::to_args`]; the redirector parses the same flags. The list parsers
//! are shared so that a value the injector accepts is one the redirector accepts.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::bootstrap::{PORT_INBOUND, PORT_OUTBOUND, PROXY_UID};

/// How traffic reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InterceptionMode {
    /// NAT REDIRECT rules in the pod's network namespace.
    #[default]
    Redirect,
    /// The node agent's eBPF programs; the init step only verifies the pod is taken.
    Ebpf,
    /// No redirection at all.
    None,
}

impl InterceptionMode {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            InterceptionMode::Redirect => "redirect",
            InterceptionMode::Ebpf => "ebpf",
            InterceptionMode::None => "none",
        }
    }
}

impl FromStr for InterceptionMode {
    type Err = ListError;
    fn from_str(s: &str) -> Result<Self, ListError> {
        match s.to_ascii_uppercase().as_str() {
            "REDIRECT" => Ok(InterceptionMode::Redirect),
            "EBPF" => Ok(InterceptionMode::Ebpf),
            "NONE" => Ok(InterceptionMode::None),
            // Istio's TPROXY keeps the source address; Weft does not implement it and says so.
            _ => Err(ListError(format!(
                "{s:?} is not an interception mode (REDIRECT, EBPF or NONE)"
            ))),
        }
    }
}

/// A value of a list flag or annotation that does not parse; the message quotes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ListError(pub String);

/// A port list where `*` means every port.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PortSet {
    /// `*`.
    All,
    /// An explicit list; empty means none.
    #[default]
    None,
    /// These ports.
    Some(Vec<u16>),
}

impl PortSet {
    /// Parses `*`, an empty string, or `80,443, 8080`.
    pub fn parse(s: &str) -> Result<PortSet, ListError> {
        match s.trim() {
            "*" => Ok(PortSet::All),
            "" => Ok(PortSet::None),
            list => Ok(PortSet::Some(parse_ports(list)?)),
        }
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSet::All => f.write_str("*"),
            PortSet::None => Ok(()),
            PortSet::Some(p) => f.write_str(&join(p)),
        }
    }
}

/// A CIDR list where `*` means every address.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CidrSet {
    /// `*`.
    All,
    /// Empty.
    #[default]
    None,
    /// These ranges.
    Some(Vec<IpNet>),
}

impl CidrSet {
    /// Parses `*`, an empty string, or `10.0.0.0/8,fd00::/8`.
    pub fn parse(s: &str) -> Result<CidrSet, ListError> {
        match s.trim() {
            "*" => Ok(CidrSet::All),
            "" => Ok(CidrSet::None),
            list => Ok(CidrSet::Some(parse_cidrs(list)?)),
        }
    }
}

impl fmt::Display for CidrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CidrSet::All => f.write_str("*"),
            CidrSet::None => Ok(()),
            CidrSet::Some(c) => f.write_str(&join(c)),
        }
    }
}

/// Parses a comma-separated list of ports (1–65535). Blank items are ignored.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, ListError> {
    items(s)
        .map(|p| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(ListError(format!("{p:?} is not a port (1-65535) in {s:?}"))),
            Ok(n) => Ok(n),
        })
        .collect()
}

/// Parses a comma-separated list of CIDRs; a bare address means a single host.
pub fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, ListError> {
    items(s)
        .map(|c| {
            c.parse::<IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| ListError(format!("{c:?} is not a CIDR in {s:?}")))
        })
        .collect()
}

/// Parses a comma-separated list of network interface names.
pub fn parse_interfaces(s: &str) -> Result<Vec<String>, ListError> {
    items(s)
        .map(|i| {
            let ok = i.len() < 16
                && i.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
            if ok {
                Ok(i.to_owned())
            } else {
                Err(ListError(format!(
                    "{i:?} is not an interface name in {s:?}"
                )))
            }
        })
        .collect()
}

fn items(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty())
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

/// Everything `weft-redirector init` needs, with Istio's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitArgs {
    /// Interception mode.
    pub mode: InterceptionMode,
    /// UID whose traffic is never redirected (the proxy).
    pub proxy_uid: u32,
    /// GID whose traffic is never redirected (the proxy).
    pub proxy_gid: u32,
    /// Port of the outbound listener.
    pub outbound_port: u16,
    /// Port of the inbound listener.
    pub inbound_port: u16,
    /// Destinations redirected outbound (`includeOutboundIPRanges`).
    pub include_outbound_cidrs: CidrSet,
    /// Destinations never redirected (`excludeOutboundIPRanges`).
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Inbound ports redirected (`includeInboundPorts`).
    pub include_inbound_ports: PortSet,
    /// Inbound ports never redirected (`excludeInboundPorts`, plus the proxy's own).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports redirected whatever the destination (`includeOutboundPorts`).
    pub include_outbound_ports: Vec<u16>,
    /// Outbound ports never redirected (`excludeOutboundPorts`).
    pub exclude_outbound_ports: Vec<u16>,
    /// Interfaces whose traffic is never redirected (`excludeInterfaces`).
    pub exclude_interfaces: Vec<String>,
}

impl Default for InitArgs {
    fn default() -> Self {
        Self {
            mode: InterceptionMode::Redirect,
            proxy_uid: PROXY_UID,
            proxy_gid: PROXY_UID,
            outbound_port: PORT_OUTBOUND,
            inbound_port: PORT_INBOUND,
            include_outbound_cidrs: CidrSet::All,
            exclude_outbound_cidrs: Vec::new(),
            include_inbound_ports: PortSet::All,
            exclude_inbound_ports: vec![15020, 15021, 15090],
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_interfaces: Vec::new(),
        }
    }
}

impl InitArgs {
    /// The command-line flags, in the order `weft-redirector init` documents them.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--mode={}", self.mode.as_str()),
            format!("--proxy-uid={}", self.proxy_uid),
            format!("--proxy-gid={}", self.proxy_gid),
            format!("--outbound-port={}", self.outbound_port),
            format!("--inbound-port={}", self.inbound_port),
            format!("--include-outbound-cidrs={}", self.include_outbound_cidrs),
            format!(
                "--exclude-outbound-cidrs={}",
                join(&self.exclude_outbound_cidrs)
            ),
            format!("--include-inbound-ports={}", self.include_inbound_ports),
            format!(
                "--exclude-inbound-ports={}",
                join(&self.exclude_inbound_ports)
            ),
            format!(
                "--include-outbound-ports={}",
                join(&self.include_outbound_ports)
            ),
            format!(
                "--exclude-outbound-ports={}",
                join(&self.exclude_outbound_ports)
            ),
        ];
        a.push(format!(
            "--exclude-interfaces={}",
            self.exclude_interfaces.join(",")
        ));
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_print() {
        assert_eq!(PortSet::parse("*").expect("star"), PortSet::All);
        assert_eq!(PortSet::parse(" ").expect("blank"), PortSet::None);
        assert_eq!(
            PortSet::parse("80, 443,").expect("list"),
            PortSet::Some(vec![80, 443])
        );
        assert_eq!(PortSet::Some(vec![80, 443]).to_string(), "80,443");
        let e = PortSet::parse("80,99999").expect_err("range");
        assert_eq!(
            e.to_string(),
            "\"99999\" is not a port (1-65535) in \"80,99999\""
        );
        assert!(parse_ports("0").is_err());
        assert_eq!(
            CidrSet::parse("10.0.0.1/8,fd00::1")
                .expect("cidrs")
                .to_string(),
            "10.0.0.0/8,fd00::1/128"
        );
        assert!(CidrSet::parse("10.0.0.0/33").is_err());
        assert!(parse_interfaces("eth0,veth@1").is_ok());
        assert!(parse_interfaces("eth0;rm").is_err());
        assert!("tproxy".parse::<InterceptionMode>().is_err());
        assert_eq!(
            "ebpf".parse::<InterceptionMode>().expect("mode"),
            InterceptionMode::Ebpf
        );
    }

    #[test]
    fn default_flags() {
        let args = InitArgs::default().to_args();
        assert!(args.contains(&"--include-outbound-cidrs=*".to_owned()));
        assert!(args.contains(&"--exclude-inbound-ports=15020,15021,15090".to_owned()));
        assert!(args.contains(&"--exclude-interfaces=".to_owned()));
    }
}
