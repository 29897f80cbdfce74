//! The proxy's compiled view of a config snapshot: indexes from original destination to
//! service and cluster, and the static-file source that feeds it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use weft_api::config::{self as model, ConfigError, Protocol, UpstreamTlsMode};

/// A snapshot ready for lookups. Immutable; a new version replaces it wholesale, and
/// connections keep the targets they resolved.
#[derive(Debug)]
pub struct Config {
    /// The snapshot as received (for `/config_dump`).
    pub snapshot: model::Snapshot,
    by_vip: HashMap<SocketAddr, Arc<Target>>,
    by_endpoint: HashMap<SocketAddr, Arc<Target>>,
    /// How long to wait for a client's first bytes.
    pub detect_timeout: Duration,
}

/// Where a connection to one original destination goes.
#[derive(Debug)]
pub struct Target {
    /// Service host name.
    pub hostname: String,
    /// Service port.
    pub port: u16,
    /// Declared protocol.
    pub protocol: Protocol,
    /// Endpoints.
    pub cluster: Arc<Cluster>,
}

/// Endpoints of one cluster with their balancing state.
#[derive(Debug)]
pub struct Cluster {
    /// Name.
    pub name: String,
    /// Endpoints, each repeated by weight for round robin.
    pub endpoints: Vec<Endpoint>,
    /// TLS towards the endpoints.
    pub tls: UpstreamTlsMode,
    /// Connect timeout override.
    pub connect_timeout: Option<Duration>,
    next: AtomicUsize,
    schedule: Vec<usize>,
}

/// One endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Address and target port.
    pub addr: SocketAddr,
    /// SPIFFE ID to require; `None` means plaintext.
    pub identity: Option<Arc<str>>,
}

impl Cluster {
    fn compile(c: &model::Cluster) -> Cluster {
        let endpoints: Vec<Endpoint> = c
            .endpoints
            .iter()
            .map(|e| Endpoint {
                addr: SocketAddr::new(e.address, e.port),
                identity: match c.tls.mode {
                    UpstreamTlsMode::Disable => None,
                    _ => e.identity.as_deref().map(Arc::from),
                },
            })
            .collect();
        // Smooth-enough weighted round robin: each endpoint appears `weight` times, spread
        // by interleaving (cap the weight so a schedule stays small).
        let mut schedule = Vec::new();
        let max = c
            .endpoints
            .iter()
            .map(|e| e.weight.min(100))
            .max()
            .unwrap_or(0);
        for round in 0..max {
            for (i, e) in c.endpoints.iter().enumerate() {
                if e.weight.min(100) > round {
                    schedule.push(i);
                }
            }
        }
        Cluster {
            name: c.name.clone(),
            endpoints,
            tls: c.tls.mode,
            connect_timeout: c.connect_timeout_ms.map(Duration::from_millis),
            next: AtomicUsize::new(0),
            schedule,
        }
    }

    fn single(name: String, endpoint: Endpoint) -> Cluster {
        Cluster {
            name,
            endpoints: vec![endpoint],
            tls: UpstreamTlsMode::Auto,
            connect_timeout: None,
            next: AtomicUsize::new(0),
            schedule: vec![0],
        }
    }

    /// The next endpoint in weighted round-robin order; `None` when the cluster is empty.
    pub fn pick(&self) -> Option<&Endpoint> {
        if self.schedule.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.endpoints.get(self.schedule[n % self.schedule.len()])
    }
}

impl Config {
    /// Validates and indexes a snapshot.
    pub fn compile(snapshot: model::Snapshot) -> Result<Config, ConfigError> {
        snapshot.validate()?;
        let clusters: HashMap<&str, Arc<Cluster>> = snapshot
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), Arc::new(Cluster::compile(c))))
            .collect();
        let empty = |name: &str| {
            Arc::new(Cluster::compile(&model::Cluster {
                name: name.to_owned(),
                ..Default::default()
            }))
        };
        let mut by_vip = HashMap::new();
        let mut by_endpoint = HashMap::new();
        for service in &snapshot.services {
            for port in &service.ports {
                let name = port.cluster_name(&service.hostname);
                let cluster = clusters
                    .get(name.as_str())
                    .cloned()
                    .unwrap_or_else(|| empty(&name));
                for ep in &cluster.endpoints {
                    by_endpoint.entry(ep.addr).or_insert_with(|| {
                        Arc::new(Target {
                            hostname: service.hostname.clone(),
                            port: port.port,
                            protocol: port.protocol,
                            cluster: Arc::new(Cluster::single(name.clone(), ep.clone())),
                        })
                    });
                }
                let target = Arc::new(Target {
                    hostname: service.hostname.clone(),
                    port: port.port,
                    protocol: port.protocol,
                    cluster,
                });
                for vip in &service.vips {
                    by_vip.insert(SocketAddr::new(*vip, port.port), target.clone());
                }
            }
        }
        Ok(Config {
            detect_timeout: Duration::from_millis(snapshot.mesh.protocol_detection_timeout_ms),
            snapshot,
            by_vip,
            by_endpoint,
        })
    }

    /// The empty config a proxy starts with before its first snapshot.
    pub fn empty() -> Config {
        Config::compile(model::Snapshot::default()).expect("the empty snapshot is valid")
    }

    /// The target of an outbound connection to `dst`: a service VIP, or an endpoint address
    /// the mesh knows (a client that resolved a pod directly, as with headless services).
    pub fn resolve(&self, dst: SocketAddr) -> Option<Arc<Target>> {
        self.by_vip
            .get(&dst)
            .or_else(|| self.by_endpoint.get(&dst))
            .cloned()
    }
}

/// Errors reading a config file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be read.
    #[error("read {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a snapshot.
    #[error("parse {path}: {reason}")]
    Parse {
        /// File.
        path: String,
        /// Parser message, with line and column.
        reason: String,
    },
    /// The snapshot breaks the model's rules.
    #[error("invalid {path}: {source}")]
    Invalid {
        /// File.
        path: String,
        /// The offending field.
        #[source]
        source: ConfigError,
    },
}

/// Reads and compiles a snapshot from a YAML or JSON file.
pub fn load_file(path: &Path) -> Result<Config, LoadError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: display.clone(),
        source,
    })?;
    let snapshot = model::Snapshot::from_yaml(&text).map_err(|e| LoadError::Parse {
        path: display.clone(),
        reason: e.to_string(),
    })?;
    Config::compile(snapshot).map_err(|source| LoadError::Invalid {
        path: display,
        source,
    })
}

/// Identifies a version of a set of files cheaply (modification time and length).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileStamp(Vec<Option<(SystemTime, u64)>>);

impl FileStamp {
    /// The current stamp of `paths`; a missing file has its own stamp.
    pub fn of(paths: &[PathBuf]) -> FileStamp {
        FileStamp(
            paths
                .iter()
                .map(|p| {
                    std::fs::metadata(p)
                        .ok()
                        .and_then(|m| Some((m.modified().ok()?, m.len())))
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::compile(model::Snapshot::from_yaml(yaml).expect("yaml")).expect("valid")
    }

    const TWO_SERVICES: &str = r#"
services:
- hostname: b.genesis.svc.cluster.local
  vips: [10.96.0.2, "fd00::2"]
  ports: [{port: 8080, protocol: http}, {port: 9000, protocol: tcp}]
clusters:
- name: "outbound|8080||b.genesis.svc.cluster.local"
  endpoints:
  - {address: 10.44.0.2, port: 8080, identity: "spiffe://cluster.local/ns/genesis/sa/b", weight: 3}
  - {address: 10.44.0.3, port: 8080, identity: "spiffe://cluster.local/ns/genesis/sa/b"}
- name: "outbound|9000||b.genesis.svc.cluster.local"
  tls: {mode: DISABLE}
  endpoints:
  - {address: 10.44.0.2, port: 9000, identity: "spiffe://cluster.local/ns/genesis/sa/b"}
"#;

    #[test]
    fn resolves_vips_and_endpoints() {
        let c = config(TWO_SERVICES);
        let t = c
            .resolve("10.96.0.2:8080".parse().expect("addr"))
            .expect("vip");
        assert_eq!(t.protocol, Protocol::Http);
        assert_eq!(t.cluster.endpoints.len(), 2);
        let t6 = c
            .resolve("[fd00::2]:9000".parse().expect("addr"))
            .expect("v6 vip");
        assert_eq!(t6.protocol, Protocol::Tcp);
        assert_eq!(
            t6.cluster.endpoints[0].identity, None,
            "DISABLE drops identity"
        );
        let direct = c
            .resolve("10.44.0.3:8080".parse().expect("addr"))
            .expect("endpoint");
        assert_eq!(direct.cluster.endpoints.len(), 1);
        assert_eq!(
            direct.cluster.pick().expect("ep").addr,
            "10.44.0.3:8080".parse().expect("a")
        );
        assert!(c.resolve("10.96.0.2:81".parse().expect("addr")).is_none());
    }

    #[test]
    fn weighted_round_robin() {
        let c = config(TWO_SERVICES);
        let t = c
            .resolve("10.96.0.2:8080".parse().expect("addr"))
            .expect("vip");
        let picks: Vec<String> = (0..8)
            .map(|_| t.cluster.pick().expect("ep").addr.ip().to_string())
            .collect();
        let heavy = picks.iter().filter(|p| *p == "10.44.0.2").count();
        assert_eq!(heavy, 6, "weight 3 against 1 over two rounds: {picks:?}");
    }

    #[test]
    fn empty_cluster_picks_nothing() {
        let c = config(
            "services: [{hostname: x.ns.svc.cluster.local, vips: [10.96.0.9], ports: [{port: 80}]}]",
        );
        let t = c
            .resolve("10.96.0.9:80".parse().expect("addr"))
            .expect("vip");
        assert!(t.cluster.pick().is_none());
    }

    #[test]
    fn load_errors_name_file_and_field() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "services: [{hostname: '', ports: []}]").expect("write");
        let e = load_file(&path).expect_err("invalid");
        assert!(
            e.to_string().contains("services[0].hostname: is empty"),
            "{e}"
        );
        std::fs::write(&path, "services: {").expect("write");
        let e = load_file(&path).expect_err("unparsable");
        assert!(e.to_string().starts_with("parse "), "{e}");
        let e = load_file(&dir.path().join("missing.yaml")).expect_err("missing");
        assert!(e.to_string().starts_with("read "), "{e}");
    }
}
