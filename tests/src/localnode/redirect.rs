//! eBPF redirection on the local node: one `weft-redirector node` agent per simulated node,
//! each attached to its own cgroup subtree and fed pod files, as the DaemonSet's agent is fed
//! by the API server in a cluster.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Pod;
use weft_api::redirect::{CidrSet, PortSet, parse_cidrs, parse_ports};

use super::network;
use crate::exec::{ExecSpec, SPEC_ENV};

/// How pods' traffic reaches their proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interception {
    /// iptables rules in each pod (the init step).
    #[default]
    Iptables,
    /// The node agents' eBPF programs; the init step only verifies.
    Ebpf,
}

/// One agent: the programs of one simulated node.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    bins: PathBuf,
    node_ns: String,
    /// Pins under `/sys/fs/bpf/weft/<instance>`.
    pub instance: String,
    /// The subtree its programs attach to; pods of this node live under it.
    pub cgroup_root: PathBuf,
    /// Where the agent reads pod files.
    pub pods_dir: PathBuf,
    /// Its own cgroup (outside the subtree).
    cgroup: PathBuf,
    listen: SocketAddr,
    log: PathBuf,
    /// Extra arguments, after the node's own.
    extra_args: Vec<String>,
}

impl Agent {
    /// Starts the agent of simulated node `index` and waits for its `/healthz`.
    pub fn start(
        bins: &Path,
        node_ns: &str,
        node_dir: &Path,
        node_cgroup: &Path,
        id: &str,
        index: usize,
        extra_args: &[String],
    ) -> anyhow::Result<Agent> {
        let object = bins.join("weft-ebpf.o");
        anyhow::ensure!(
            object.is_file(),
            "{} is missing: eBPF mode needs the object `cargo xtask test` builds (Debian's tool chain, see ebpf/README.md)",
            object.display()
        );
        let port = u16::try_from(15100 + index)?;
        let mut agent = Agent {
            child: None,
            bins: bins.to_path_buf(),
            node_ns: node_ns.to_owned(),
            instance: format!("{id}-{index}"),
            cgroup_root: node_cgroup.join(format!("node-{index}")),
            pods_dir: node_dir.join(format!("ebpf-pods-{index}")),
            cgroup: node_cgroup.join(format!("agent-{index}")),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            log: node_dir.join(format!("agent-{index}.log")),
            extra_args: extra_args.to_vec(),
        };
        std::fs::create_dir_all(&agent.cgroup_root)?;
        std::fs::create_dir_all(&agent.cgroup)?;
        std::fs::create_dir_all(&agent.pods_dir)?;
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut argv = vec![
            self.bins.join("weft-redirector").display().to_string(),
            "node".into(),
            "--pods-dir".into(),
            self.pods_dir.display().to_string(),
            "--cgroup-root".into(),
            self.cgroup_root.display().to_string(),
            "--instance".into(),
            self.instance.clone(),
            "--listen".into(),
            self.listen.to_string(),
            "--bpf-object".into(),
            self.bins.join("weft-ebpf.o").display().to_string(),
        ];
        argv.extend(self.extra_args.iter().cloned());
        let spec = ExecSpec {
            netns: PathBuf::from(network::netns_path(&self.node_ns)),
            cgroup: Some(self.cgroup.clone()),
            host_mounts: true,
            argv,
            env: vec![
                ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
                ("RUST_LOG".into(), "info".into()),
            ],
            ..Default::default()
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.child = Some(
            Command::new(self.bins.join("weft-pod-exec"))
                .env_clear()
                .env(SPEC_ENV, serde_json::to_string(&spec)?)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .context("start weft-redirector node")?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let listen = self.listen;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "the eBPF agent exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let healthy = network::in_netns(&self.node_ns, move || {
                use std::io::{Read, Write};
                let mut s =
                    std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200))
                        .ok()?;
                s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
                write!(
                    s,
                    "GET /healthz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
                )
                .ok()?;
                let mut resp = String::new();
                s.read_to_string(&mut resp).ok()?;
                Some(resp.starts_with("HTTP/1.1 200"))
            })?;
            if healthy == Some(true) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the eBPF agent did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the agent (its pinned programs keep redirecting) and starts it again.
    pub fn restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        self.stop();
        std::thread::sleep(down_for);
        self.spawn()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The file naming a pod to this agent. Written before the pod's init step runs.
    pub fn pod_file(&self, namespace: &str, name: &str) -> PathBuf {
        self.pods_dir.join(format!("{namespace}_{name}.json"))
    }

    /// Tells the agent a pod is here (its cgroup, network namespace, addresses and the
    /// redirect settings of its init step).
    pub fn add_pod(
        &self,
        pod: &Pod,
        cgroup: &Path,
        netns: &str,
        ips: &[IpAddr],
    ) -> anyhow::Result<()> {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let args: Vec<String> = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .find(|c| c.name == "weft-init")
            .and_then(|c| c.args.clone())
            .unwrap_or_default();
        let flag = |name: &str| -> Option<String> {
            args.iter()
                .find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_owned))
        };
        let mut file = serde_json::json!({
            "namespace": ns,
            "name": name,
            "cgroup": cgroup,
            "netns": network::netns_path(netns),
            "ips": ips,
            "meshed": true,
        });
        if let Some(v) = flag("exclude-inbound-ports") {
            file["excludeInboundPorts"] = serde_json::json!(parse_ports(&v)?);
        }
        if let Some(v) = flag("exclude-outbound-ports") {
            file["excludeOutboundPorts"] = serde_json::json!(parse_ports(&v)?);
        }
        if let Some(v) = flag("include-outbound-ports") {
            file["includeOutboundPorts"] = serde_json::json!(parse_ports(&v)?);
        }
        if let Some(v) = flag("exclude-outbound-cidrs") {
            file["excludeOutboundCidrs"] = serde_json::json!(parse_cidrs(&v)?);
        }
        if let Some(v) = flag("include-outbound-cidrs") {
            file["includeOutboundCidrs"] = serde_json::json!(CidrSet::parse(&v)?.to_string());
        }
        if let Some(v) = flag("include-inbound-ports") {
            file["includeInboundPorts"] = serde_json::json!(PortSet::parse(&v)?.to_string());
        }
        for (key, f) in [("proxyUid", "proxy-uid"), ("proxyGid", "proxy-gid")] {
            if let Some(v) = flag(f) {
                file[key] = serde_json::json!(v.parse::<u32>()?);
            }
        }
        let path = self.pod_file(&ns, &name);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&file)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Forgets a pod.
    pub fn remove_pod(&self, namespace: &str, name: &str) {
        let _ = std::fs::remove_file(self.pod_file(namespace, name));
    }

    /// The simulated node's name (`node-<index>`), as pods' `spec.nodeName` says it.
    pub fn node_name(&self) -> String {
        self.cgroup_root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Where it serves `/healthz` and `/metrics` (in the node's network namespace).
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        uninstall(&self.bins, &self.instance);
    }
}

/// Detaches an instance's programs and removes its pins.
pub fn uninstall(bins: &Path, instance: &str) {
    let status = Command::new(bins.join("weft-redirector"))
        .args(["node", "--uninstall", "--instance", instance])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !status.is_ok_and(|s| s.success()) {
        tracing::warn!(%instance, "eBPF uninstall failed");
    }
}
