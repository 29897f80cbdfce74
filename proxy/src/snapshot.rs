//! The proxy's compiled view of a config snapshot: indexes from original destination to
//! service and cluster, and the static-file source that feeds it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use weft_api::config::{self as model, ConfigError, Protocol, UpstreamTlsMode};

use crate::balance::{
    Balancer, Choice, ClusterState, EndpointState, HashPolicy, PickContext, PickInput, StateSlot,
};
use crate::breaker::Limits;
use crate::http::Body;
use crate::outlier::{Observation, OutlierPolicy};
use crate::pool::PoolOptions;
use crate::retry::BudgetLimits;
use crate::route::{RouteTable, TcpRouteTable};
use crate::upstream_tls::{TlsConnector, UpstreamTls};

/// A snapshot ready for lookups. Immutable; a new version replaces it wholesale, and
/// connections keep the targets they resolved.
#[derive(Debug)]
pub struct Config {
    /// The snapshot as received (for `/config_dump`).
    pub snapshot: model::Snapshot,
    by_vip: HashMap<SocketAddr, Arc<Target>>,
    by_endpoint: HashMap<SocketAddr, Arc<Target>>,
    clusters: HashMap<String, Arc<Cluster>>,
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
    /// The port's cluster (where traffic goes when no route says otherwise).
    pub cluster: Arc<Cluster>,
    /// HTTP routes; a port without routes has one catch-all route to `cluster`.
    pub routes: Arc<RouteTable>,
    /// TCP / TLS routes.
    pub tcp_routes: Arc<TcpRouteTable>,
}

/// An HTTP client for a cluster's SIMPLE / MUTUAL TLS endpoints.
pub type TlsClient = Client<TlsConnector, Body>;

/// Endpoints of one cluster with their balancing policy and limits.
#[derive(Debug)]
pub struct Cluster {
    /// Name.
    pub name: String,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Their weights.
    pub weights: Vec<u32>,
    /// TLS towards the endpoints.
    pub tls: UpstreamTlsMode,
    /// TLS origination for SIMPLE / MUTUAL.
    pub upstream_tls: Option<Arc<UpstreamTls>>,
    /// HTTP client over `upstream_tls`.
    pub tls_client: Option<TlsClient>,
    /// Connect timeout override.
    pub connect_timeout: Option<Duration>,
    /// Endpoint choice.
    pub balancer: Balancer,
    /// Consistent hashing key.
    pub hash: Option<HashPolicy>,
    /// Slow start window.
    pub warmup: Option<Duration>,
    /// Circuit breaking.
    pub limits: Limits,
    /// Retry budget.
    pub budget: BudgetLimits,
    /// Outlier detection.
    pub outlier: Option<OutlierPolicy>,
    /// Upstream connection settings.
    pub pool: PoolOptions,
    state: StateSlot,
}

/// One endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Address and target port.
    pub addr: SocketAddr,
    /// SPIFFE ID to require; `None` means plaintext (or the cluster's own TLS).
    pub identity: Option<Arc<str>>,
}

/// The endpoint a request or connection goes to.
#[derive(Debug, Clone)]
pub struct Picked {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Its live state.
    pub state: Arc<EndpointState>,
}

/// The host part of an `outbound|port|subset|host` cluster name (the default SNI).
fn cluster_host(name: &str) -> &str {
    name.split('|')
        .nth(3)
        .filter(|h| !h.is_empty())
        .unwrap_or(name)
}

impl Cluster {
    fn compile(c: &model::Cluster, field: &str) -> Result<Cluster, ConfigError> {
        let endpoints: Vec<Endpoint> = c
            .endpoints
            .iter()
            .map(|e| Endpoint {
                addr: SocketAddr::new(e.address, e.port),
                identity: match c.tls.mode {
                    UpstreamTlsMode::Disable
                    | UpstreamTlsMode::Simple
                    | UpstreamTlsMode::Mutual => None,
                    _ => e.identity.as_deref().map(Arc::from),
                },
            })
            .collect();
        let weights: Vec<u32> = c.endpoints.iter().map(|e| e.weight).collect();
        let connect_timeout = c.connect_timeout_ms.map(Duration::from_millis);
        let upstream_tls = UpstreamTls::build(&c.tls, cluster_host(&c.name))
            .map_err(|e| e.at(&format!("{field}.tls")))?
            .map(Arc::new);
        let pool = PoolOptions::from_model(&c.connection_pool);
        let tls_client = upstream_tls.as_ref().map(|tls| {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_timer(TokioTimer::new()).timer(TokioTimer::new());
            b.pool_idle_timeout(pool.idle_timeout.unwrap_or(Duration::from_secs(60)));
            if pool.max_requests_per_connection == Some(1) {
                b.pool_max_idle_per_host(0);
            }
            b.build(TlsConnector {
                tls: tls.clone(),
                timeout: connect_timeout.unwrap_or(Duration::from_secs(10)),
            })
        });
        let hash = match &c.load_balancer.consistent_hash {
            Some(ch) => Some(HashPolicy::compile(&ch.key).ok_or_else(|| ConfigError {
                field: format!("{field}.loadBalancer.consistentHash.key"),
                reason: "not a header name".into(),
            })?),
            None => None,
        };
        Ok(Cluster {
            name: c.name.clone(),
            balancer: Balancer::compile(&c.load_balancer, &endpoints, &weights),
            endpoints,
            weights,
            tls: c.tls.mode,
            upstream_tls,
            tls_client,
            connect_timeout,
            hash,
            warmup: c
                .load_balancer
                .warmup_ms
                .filter(|w| *w > 0)
                .map(Duration::from_millis),
            limits: Limits::from_pool(&c.connection_pool),
            budget: BudgetLimits::from_cluster(c),
            outlier: c
                .outlier_detection
                .as_ref()
                .and_then(OutlierPolicy::compile),
            pool,
            state: StateSlot::default(),
        })
    }

    /// A cluster with no endpoints (a port whose cluster the snapshot lacks).
    fn empty(name: &str) -> Cluster {
        Cluster::compile(
            &model::Cluster {
                name: name.to_owned(),
                ..Default::default()
            },
            "",
        )
        .expect("an empty cluster compiles")
    }

    /// This cluster narrowed to one of its endpoints (a client that called a pod directly).
    fn single(&self, endpoint: Endpoint) -> Cluster {
        let endpoints = vec![endpoint];
        Cluster {
            name: self.name.clone(),
            balancer: Balancer::compile(&model::LoadBalancer::default(), &endpoints, &[1]),
            endpoints,
            weights: vec![1],
            tls: self.tls,
            upstream_tls: self.upstream_tls.clone(),
            tls_client: self.tls_client.clone(),
            connect_timeout: self.connect_timeout,
            hash: None,
            warmup: None,
            limits: self.limits,
            budget: self.budget.clone(),
            outlier: None,
            pool: self.pool,
            state: StateSlot::default(),
        }
    }

    /// Live state (bound by [`Config::inherit_state`], or fresh on first use).
    pub fn state(&self) -> &Arc<ClusterState> {
        self.state.get(&self.endpoints)
    }

    /// Chooses an endpoint; `None` when none is usable.
    pub fn select(&self, ctx: &PickContext) -> Option<Picked> {
        let state = self.state();
        let input = PickInput {
            endpoints: &self.endpoints,
            weights: &self.weights,
            states: &state.endpoints,
            outlier: self.outlier.as_ref(),
            warmup: self.warmup,
        };
        let mut rng = fastrand::Rng::with_seed(fastrand::u64(..));
        match self.balancer.pick(&input, ctx, &mut rng)? {
            Choice::Endpoint(i) => Some(Picked {
                endpoint: self.endpoints.get(i)?.clone(),
                state: state.endpoints.get(i)?.clone(),
            }),
            Choice::Passthrough(addr) => Some(Picked {
                endpoint: Endpoint {
                    addr,
                    identity: None,
                },
                state: Arc::new(EndpointState::new()),
            }),
        }
    }

    /// The next endpoint by the cluster's policy, without request context; `None` when the
    /// cluster is empty.
    pub fn pick(&self) -> Option<&Endpoint> {
        let picked = self.select(&PickContext::now())?;
        self.endpoints
            .iter()
            .find(|e| e.addr == picked.endpoint.addr)
    }

    /// Feeds outlier detection with the outcome of a try; returns the ejection time when
    /// the endpoint was ejected.
    pub fn observe(&self, picked: &Picked, obs: Observation) -> Option<Duration> {
        let policy = self.outlier.as_ref()?;
        if !picked.state.outlier.observe(obs, policy) {
            return None;
        }
        let now = Instant::now();
        let states = &self.state().endpoints;
        let ejected = states.iter().filter(|s| s.outlier.is_ejected(now)).count();
        if picked.state.outlier.is_ejected(now) || !policy.may_eject(ejected, states.len()) {
            return None;
        }
        Some(picked.state.outlier.eject(now, policy))
    }
}

impl Config {
    /// Validates and indexes a snapshot.
    pub fn compile(snapshot: model::Snapshot) -> Result<Config, ConfigError> {
        snapshot.validate()?;
        let mut clusters: HashMap<String, Arc<Cluster>> = HashMap::new();
        for (i, c) in snapshot.clusters.iter().enumerate() {
            clusters.insert(
                c.name.clone(),
                Arc::new(Cluster::compile(c, &format!("clusters[{i}]"))?),
            );
        }
        let by_name: HashMap<&str, Arc<Cluster>> = clusters
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let mut by_vip = HashMap::new();
        let mut by_endpoint = HashMap::new();
        for (si, service) in snapshot.services.iter().enumerate() {
            for (pi, port) in service.ports.iter().enumerate() {
                let field = format!("services[{si}].ports[{pi}]");
                let name = port.cluster_name(&service.hostname);
                let cluster = by_name
                    .get(name.as_str())
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Cluster::empty(&name)));
                let routes = Arc::new(if port.http_routes.is_empty() {
                    RouteTable::single(cluster.clone())
                } else {
                    RouteTable::compile(&port.http_routes, &field, &by_name)?
                });
                let tcp_routes =
                    Arc::new(TcpRouteTable::compile(&port.tcp_routes, &field, &by_name)?);
                for ep in &cluster.endpoints {
                    by_endpoint.entry(ep.addr).or_insert_with(|| {
                        let single = Arc::new(cluster.single(ep.clone()));
                        Arc::new(Target {
                            hostname: service.hostname.clone(),
                            port: port.port,
                            protocol: port.protocol,
                            routes: Arc::new(RouteTable::single(single.clone())),
                            tcp_routes: Arc::new(TcpRouteTable::default()),
                            cluster: single,
                        })
                    });
                }
                let target = Arc::new(Target {
                    hostname: service.hostname.clone(),
                    port: port.port,
                    protocol: port.protocol,
                    cluster,
                    routes,
                    tcp_routes,
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
            clusters,
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

    /// A cluster by name.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }

    /// Takes over the live state of `previous` (the config this one replaces): per endpoint
    /// address of each cluster, in-flight counts, latency, outlier state and age; per
    /// cluster, circuit-breaker counters and the retry budget. Call before installing.
    pub fn inherit_state(&self, previous: &Config) {
        for (name, cluster) in &self.clusters {
            let Some(old) = previous.clusters.get(name) else {
                continue;
            };
            let state = ClusterState::new(&cluster.endpoints, Some(old.state()), &old.endpoints);
            cluster.state.bind(Arc::new(state));
        }
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
  loadBalancer: {policy: ROUND_ROBIN}
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
