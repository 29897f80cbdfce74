//! What the agent is told about pods: [`PodSpec`], the meshed pods it must redirect, and the
//! local node's pod files ([`PodFile`], one JSON file per pod in `--pods-dir`).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use weft_api::bootstrap::{PORT_INBOUND, PORT_OUTBOUND, PROXY_UID};
use weft_api::redirect::{CidrSet, InitArgs, InterceptionMode, PortSet};

/// Errors reading pod files.
#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    /// The directory cannot be listed.
    #[error("reading pods directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file is not a pod file.
    #[error("pod file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// A pod by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodId {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A meshed pod the agent redirects, whatever source it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// Which pod.
    pub id: PodId,
    /// A path that opens the pod's network namespace (`/var/run/netns/NAME`,
    /// `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// The pod's cgroup, when known (checked to be under the agent's cgroup root).
    pub cgroup: Option<PathBuf>,
    /// The pod's addresses as reported (the agent adds those it finds in the namespace).
    pub ips: Vec<IpAddr>,
    /// The redirection wanted, as the injected init step would get it.
    pub args: InitArgs,
}

/// The local node's description of one pod: the file `<namespace>_<name>.json` in
/// `--pods-dir`. Files appear when a pod starts (before its init containers run) and
/// disappear when it is deleted.
///
/// ```json
/// {"namespace": "default", "name": "web-1",
///  "cgroup": "/sys/fs/cgroup/unified/weft/<node>/pod-3",
///  "netns": "/var/run/netns/weft-<node>-3-web-1",
///  "ips": ["10.44.0.3", "fd00:44::3"],
///  "meshed": true,
///  "excludeInboundPorts": [15020, 15021, 15090],
///  "excludeOutboundPorts": [],
///  "excludeOutboundCidrs": []}
/// ```
///
/// Optional fields, with the injector's defaults: `includeOutboundCidrs` (`"*"`),
/// `includeInboundPorts` (`"*"`), `includeOutboundPorts` (`[]`), `excludeInterfaces` (`[]`),
/// `proxyUid` / `proxyGid` (1337), `outboundPort` (15001), `inboundPort` (15006).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodFile {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    /// The pod's network namespace file.
    pub netns: PathBuf,
    /// The pod's addresses.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Whether the pod has the sidecar and is in eBPF mode; `false` pods are never redirected.
    pub meshed: bool,
    /// Inbound ports never captured.
    #[serde(default = "default_exclude_inbound_ports")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports never redirected.
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    /// Destinations never redirected.
    #[serde(default)]
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Destinations redirected: `*` or comma-separated CIDRs.
    #[serde(default = "star")]
    pub include_outbound_cidrs: String,
    /// Inbound ports captured: `*` or comma-separated ports.
    #[serde(default = "star")]
    pub include_inbound_ports: String,
    /// Outbound ports redirected whatever the destination.
    #[serde(default)]
    pub include_outbound_ports: Vec<u16>,
    /// Interfaces whose inbound traffic is never captured.
    #[serde(default)]
    pub exclude_interfaces: Vec<String>,
    /// The proxy's UID.
    #[serde(default = "proxy_id")]
    pub proxy_uid: u32,
    /// The proxy's GID.
    #[serde(default = "proxy_id")]
    pub proxy_gid: u32,
    /// The proxy's outbound listener.
    #[serde(default = "outbound_port")]
    pub outbound_port: u16,
    /// The proxy's inbound listener.
    #[serde(default = "inbound_port")]
    pub inbound_port: u16,
}

fn default_exclude_inbound_ports() -> Vec<u16> {
    InitArgs::default().exclude_inbound_ports
}
fn star() -> String {
    "*".to_owned()
}
fn proxy_id() -> u32 {
    PROXY_UID
}
fn outbound_port() -> u16 {
    PORT_OUTBOUND
}
fn inbound_port() -> u16 {
    PORT_INBOUND
}

impl PodFile {
    /// The file name the local node uses: `<namespace>_<name>.json`.
    pub fn file_name(&self) -> String {
        format!("{}_{}.json", self.namespace, self.name)
    }

    /// The pod to redirect, or `None` for a pod that is not meshed.
    pub fn spec(&self) -> Result<Option<PodSpec>, String> {
        if !self.meshed {
            return Ok(None);
        }
        let args = InitArgs {
            mode: InterceptionMode::Ebpf,
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            include_outbound_cidrs: CidrSet::parse(&self.include_outbound_cidrs)
                .map_err(|e| format!("includeOutboundCidrs: {e}"))?,
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
            include_inbound_ports: PortSet::parse(&self.include_inbound_ports)
                .map_err(|e| format!("includeInboundPorts: {e}"))?,
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            include_outbound_ports: self.include_outbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_interfaces: self.exclude_interfaces.clone(),
        };
        Ok(Some(PodSpec {
            id: PodId {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
            },
            netns: self.netns.clone(),
            cgroup: Some(self.cgroup.clone()),
            ips: self.ips.clone(),
            args,
        }))
    }
}

/// Reads every `*.json` pod file in `dir`: the meshed pods by id, and the files that could not
/// be read (reported, not fatal: the others are still redirected). Files being written are
/// skipped until they parse; the local node should write them atomically (rename).
pub fn read_dir(dir: &Path) -> Result<(BTreeMap<PodId, PodSpec>, Vec<PodsError>), PodsError> {
    let entries = std::fs::read_dir(dir).map_err(|source| PodsError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let mut pods = BTreeMap::new();
    let mut errors = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PodsError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<PodFile>(&b).map_err(|e| e.to_string()))
            .and_then(|f| f.spec());
        match parsed {
            Ok(Some(spec)) => {
                pods.insert(spec.id.clone(), spec);
            }
            Ok(None) => {}
            // A file that vanished between listing and reading is a pod that went away.
            Err(message) if !path.exists() => {
                tracing::debug!(path = %path.display(), %message, "pod file vanished")
            }
            Err(message) => errors.push(PodsError::File { path, message }),
        }
    }
    Ok((pods, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"namespace": "default", "name": "web-1",
        "cgroup": "/sys/fs/cgroup/unified/weft/n1/pod-3",
        "netns": "/var/run/netns/weft-n1-3-web-1",
        "ips": ["10.44.0.3", "fd00:44::3"],
        "meshed": true,
        "excludeInboundPorts": [15020, 15021, 15090],
        "excludeOutboundPorts": [5432],
        "excludeOutboundCidrs": ["10.96.0.1/32"]}"#;

    #[test]
    fn the_documented_file_parses_into_the_injector_defaults() {
        let file: PodFile = serde_json::from_str(EXAMPLE).expect("parse");
        assert_eq!(file.file_name(), "default_web-1.json");
        let spec = file.spec().expect("valid").expect("meshed");
        assert_eq!(spec.id.to_string(), "default/web-1");
        assert_eq!(spec.ips.len(), 2);
        let expected = InitArgs {
            mode: InterceptionMode::Ebpf,
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec!["10.96.0.1/32".parse().expect("cidr")],
            ..InitArgs::default()
        };
        assert_eq!(spec.args, expected);
    }

    #[test]
    fn unmeshed_pods_are_not_redirected_and_bad_lists_are_named() {
        let mut file: PodFile = serde_json::from_str(EXAMPLE).expect("parse");
        file.meshed = false;
        assert_eq!(file.spec(), Ok(None));
        file.meshed = true;
        file.include_inbound_ports = "80,http".into();
        let e = file.spec().expect_err("bad ports");
        assert!(
            e.contains("includeInboundPorts") && e.contains("http"),
            "{e}"
        );
    }

    #[test]
    fn a_directory_of_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("default_web-1.json"), EXAMPLE).expect("write");
        let mut other: PodFile = serde_json::from_str(EXAMPLE).expect("parse");
        other.name = "plain".into();
        other.meshed = false;
        std::fs::write(
            dir.path().join(other.file_name()),
            serde_json::to_vec(&other).expect("json"),
        )
        .expect("write");
        std::fs::write(dir.path().join("broken.json"), "{").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
        let (pods, errors) = read_dir(dir.path()).expect("read");
        assert_eq!(
            pods.keys().map(ToString::to_string).collect::<Vec<_>>(),
            ["default/web-1"]
        );
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().contains("broken.json"),
            "{}",
            errors[0]
        );
    }
}
