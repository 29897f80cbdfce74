//! Keeping the maps equal to the set of meshed pods.
//!
//! [`Agent::sync`] computes every entry the pods need and makes the maps hold exactly those,
//! reading back what is there (so it also repairs what an earlier run left). A new pod is
//! activated last: addresses, rules and its `sk_lookup` link first, its `PODS` entry (which
//! the connect hooks look at) at the end. So once a meshed process sees its connects
//! redirected, everything else for its pod is in place: this is what the init step checks.
//! A pod that goes away is deactivated first, in the reverse order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use aya::maps::lpm_trie::Key;
use ipnet::IpNet;
use tracing::{debug, info, warn};
use weft_ebpf_maps::{Addr, CidrKey, IfaceKey, PodConfig, PodIp, PortKey, names};

use super::bpf::{self, BpfError, Layout, Loaded};
use super::netns::{self, NetnsInfo};
use super::pods::{PodId, PodSpec};
use super::rules::{self, PodEntries};

/// Errors of one sync (the agent logs them and tries again at the next).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A map operation failed.
    #[error("updating map {name}")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        #[source]
        source: aya::maps::MapError,
    },
    /// Attaching or detaching a pod failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> SyncError {
    move |source| SyncError::Map { name, source }
}

/// What the last sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Pods redirected.
    pub pods: usize,
    /// Pods that could not be taken (namespace missing…), with why.
    pub skipped: Vec<(PodId, String)>,
    /// Entries written and removed.
    pub written: usize,
    /// Entries removed.
    pub removed: usize,
}

/// The node agent's state: the loaded object and what it knows of pods.
pub struct Agent {
    loaded: Loaded,
    layout: Layout,
    cgroup_root: PathBuf,
    /// `pod_flags::SHORT_CIRCUIT_*` given to every pod.
    short_circuit: u32,
    /// Namespace file → (inode, what was seen), so each namespace is entered once.
    netns_cache: HashMap<PathBuf, NetnsInfo>,
    /// Pods taken, by id, with their namespace cookie.
    taken: BTreeMap<PodId, u64>,
    /// Warnings already given (not repeated each sync).
    warned: HashSet<String>,
    /// The last sync's report.
    pub last: SyncReport,
    /// When the agent started.
    pub started: Instant,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("layout", &self.layout)
            .field("taken", &self.taken)
            .finish_non_exhaustive()
    }
}

/// Every entry of every meshed pod.
#[derive(Debug, Default)]
struct Desired {
    pods: BTreeMap<u64, PodConfig>,
    ips: BTreeMap<Addr, u64>,
    ports: BTreeMap<PortKey, u32>,
    excl: BTreeMap<(u32, [u8; 24]), CidrKey>,
    incl: BTreeMap<(u32, [u8; 24]), CidrKey>,
    ifaces: BTreeSet<IfaceKey>,
    netns: BTreeMap<u64, PathBuf>,
}

fn cidr_index(netns: u64, net: &IpNet) -> ((u32, [u8; 24]), CidrKey) {
    let (len, key) = rules::cidr_key(netns, net);
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&key.netns);
    bytes[8..].copy_from_slice(&key.addr);
    ((len, bytes), key)
}

impl Agent {
    /// An agent around a loaded object; `short_circuit` are the `sk_msg` pod flags.
    pub fn new(loaded: Loaded, layout: Layout, cgroup_root: PathBuf, short_circuit: u32) -> Agent {
        Agent {
            loaded,
            layout,
            cgroup_root,
            short_circuit,
            netns_cache: HashMap::new(),
            taken: BTreeMap::new(),
            warned: HashSet::new(),
            last: SyncReport::default(),
            started: Instant::now(),
        }
    }

    /// The maps.
    pub fn maps(&self) -> &bpf::Maps {
        &self.loaded.maps
    }

    /// The pods taken, with their namespace cookies.
    pub fn taken(&self) -> &BTreeMap<PodId, u64> {
        &self.taken
    }

    /// Whether the links were kept from an earlier run.
    pub fn reused_links(&self) -> bool {
        self.loaded.reused_links
    }

    fn warn_once(&mut self, key: String, f: impl FnOnce()) {
        if self.warned.insert(key) {
            f();
        }
    }

    fn inspect(&mut self, path: &Path) -> Result<NetnsInfo, String> {
        use std::os::unix::fs::MetadataExt as _;
        let inode = std::fs::metadata(path).map_err(|e| e.to_string())?.ino();
        if let Some(info) = self.netns_cache.get(path).filter(|i| i.inode == inode) {
            return Ok(info.clone());
        }
        let info = netns::inspect(path).map_err(|e| {
            format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )
        })?;
        self.netns_cache.insert(path.to_owned(), info.clone());
        Ok(info)
    }

    fn desired(
        &mut self,
        pods: &BTreeMap<PodId, PodSpec>,
        report: &mut SyncReport,
    ) -> (Desired, BTreeMap<PodId, u64>) {
        let mut d = Desired::default();
        let mut taken = BTreeMap::new();
        for (id, spec) in pods {
            let info = match self.inspect(&spec.netns) {
                Ok(info) => info,
                Err(why) => {
                    report.skipped.push((id.clone(), why));
                    continue;
                }
            };
            if let Some(cg) = &spec.cgroup
                && !cg.starts_with(&self.cgroup_root)
            {
                let root = self.cgroup_root.clone();
                self.warn_once(format!("cgroup {id}"), || {
                    warn!(pod = %id, cgroup = %cg.display(), root = %root.display(),
                        "pod cgroup outside the agent's cgroup root: its connects are not redirected");
                });
            }
            let cookie = info.cookie;
            let e: PodEntries = rules::entries(
                &spec.args,
                spec.ips.iter().copied().chain(info.addrs.iter().copied()),
                |name| info.ifaces.get(name).copied(),
            );
            if !e.unknown_interfaces.is_empty() {
                let unknown = e.unknown_interfaces.clone();
                self.warn_once(format!("ifaces {id}"), || {
                    warn!(pod = %id, interfaces = ?unknown, "excluded interfaces not in the pod's namespace");
                });
            }
            let mut config = e.config;
            config.flags |= self.short_circuit;
            d.pods.insert(cookie, config);
            for ip in &e.ips {
                if let Some(other) = d.ips.insert(rules::addr(*ip), cookie)
                    && other != cookie
                {
                    warn!(pod = %id, %ip, "address claimed by two pods; the last one wins");
                }
            }
            for (port, flags) in &e.ports {
                d.ports.insert(PortKey::new(cookie, *port), *flags);
            }
            for net in &e.excluded_cidrs {
                let (k, v) = cidr_index(cookie, net);
                d.excl.insert(k, v);
            }
            for net in &e.included_cidrs {
                let (k, v) = cidr_index(cookie, net);
                d.incl.insert(k, v);
            }
            for i in &e.excluded_ifindexes {
                d.ifaces.insert(IfaceKey {
                    netns: cookie,
                    ifindex: *i,
                    pad: 0,
                });
            }
            d.netns.insert(cookie, spec.netns.clone());
            taken.insert(id.clone(), cookie);
        }
        (d, taken)
    }

    /// Makes the maps and the `sk_lookup` links match `pods`.
    pub fn sync(&mut self, pods: &BTreeMap<PodId, PodSpec>) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        let (d, taken) = self.desired(pods, &mut report);
        let layout = self.layout.clone();

        // Deactivate pods that went away.
        let gone: Vec<u64> = self
            .loaded
            .maps
            .pods
            .keys()
            .filter_map(Result::ok)
            .filter(|c| !d.pods.contains_key(c))
            .collect();
        for cookie in &gone {
            self.loaded
                .maps
                .pods
                .remove(cookie)
                .map_err(map_err(names::PODS))?;
            report.removed += 1;
        }

        // Everything a pod needs but its activation.
        let m = &mut self.loaded.maps;
        for (addr, cookie) in &d.ips {
            if m.pod_ips.get(addr, 0).ok().map(|p| p.netns) != Some(*cookie) {
                m.pod_ips
                    .insert(addr, PodIp { netns: *cookie }, 0)
                    .map_err(map_err(names::POD_IPS))?;
                report.written += 1;
            }
        }
        for (key, flags) in &d.ports {
            if m.port_rules.get(key, 0).ok() != Some(*flags) {
                m.port_rules
                    .insert(key, flags, 0)
                    .map_err(map_err(names::PORT_RULES))?;
                report.written += 1;
            }
        }
        for (trie, want, name) in [
            (&mut m.out_excl, &d.excl, names::OUT_EXCL_CIDRS),
            (&mut m.out_incl, &d.incl, names::OUT_INCL_CIDRS),
        ] {
            let have: Vec<Key<CidrKey>> = trie.keys().filter_map(Result::ok).collect();
            let mut present = BTreeSet::new();
            for k in have {
                let data = k.data();
                let mut bytes = [0u8; 24];
                bytes[..8].copy_from_slice(&data.netns);
                bytes[8..].copy_from_slice(&data.addr);
                let index = (k.prefix_len(), bytes);
                if want.contains_key(&index) {
                    present.insert(index);
                } else {
                    trie.remove(&k).map_err(map_err(name))?;
                    report.removed += 1;
                }
            }
            for (index, data) in want {
                if !present.contains(index) {
                    trie.insert(&Key::new(index.0, *data), 1, 0)
                        .map_err(map_err(name))?;
                    report.written += 1;
                }
            }
        }
        for key in &d.ifaces {
            if m.iface_excl.get(key, 0).is_err() {
                m.iface_excl
                    .insert(key, 1, 0)
                    .map_err(map_err(names::IFACE_EXCL))?;
                report.written += 1;
            }
        }
        for (cookie, path) in &d.netns {
            if !layout.pod(*cookie).exists() {
                let file = netns::open(path).map_err(|e| BpfError::Io {
                    what: "opening network namespace",
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                bpf::attach_pod(&mut self.loaded.ebpf, &layout, *cookie, &file)?;
                debug!(cookie, netns = %path.display(), "sk_lookup attached");
            }
        }

        // Activation.
        let m = &mut self.loaded.maps;
        for (cookie, config) in &d.pods {
            if m.pods.get(cookie, 0).ok() != Some(*config) {
                m.pods
                    .insert(cookie, config, 0)
                    .map_err(map_err(names::PODS))?;
                report.written += 1;
            }
        }

        // What nothing needs any more.
        let stale_ips: Vec<Addr> = m
            .pod_ips
            .keys()
            .filter_map(Result::ok)
            .filter(|a| !d.ips.contains_key(a))
            .collect();
        for a in stale_ips {
            m.pod_ips.remove(&a).map_err(map_err(names::POD_IPS))?;
            report.removed += 1;
        }
        let stale_ports: Vec<PortKey> = m
            .port_rules
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !d.ports.contains_key(k))
            .collect();
        for k in stale_ports {
            m.port_rules
                .remove(&k)
                .map_err(map_err(names::PORT_RULES))?;
            report.removed += 1;
        }
        let stale_ifaces: Vec<IfaceKey> = m
            .iface_excl
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !d.ifaces.contains(k))
            .collect();
        for k in stale_ifaces {
            m.iface_excl
                .remove(&k)
                .map_err(map_err(names::IFACE_EXCL))?;
            report.removed += 1;
        }
        for cookie in layout.pinned_pods()? {
            if !d.netns.contains_key(&cookie) {
                bpf::detach_pod(&layout, cookie)?;
                report.removed += 1;
                debug!(cookie, "sk_lookup detached");
            }
        }
        self.netns_cache
            .retain(|p, _| d.netns.values().any(|q| q == p));

        for (id, cookie) in &taken {
            if self.taken.get(id) != Some(cookie) {
                info!(pod = %id, netns = cookie, "pod taken");
            }
        }
        for id in self.taken.keys() {
            if !taken.contains_key(id) {
                info!(pod = %id, "pod released");
            }
        }
        for (id, why) in &report.skipped {
            let why = why.clone();
            self.warn_once(format!("skip {id} {why}"), || {
                info!(pod = %id, %why, "pod not taken yet");
            });
        }
        self.taken = taken;
        report.pods = self.taken.len();
        self.last = report.clone();
        Ok(report)
    }
}

/// Whether `ip` belongs to a pod this agent took (for tests and tools).
pub fn owner_of(agent: &Agent, ip: IpAddr) -> Option<u64> {
    agent
        .maps()
        .pod_ips
        .get(&rules::addr(ip), 0)
        .ok()
        .map(|p| p.netns)
}
