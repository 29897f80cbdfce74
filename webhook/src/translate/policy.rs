//! DestinationRules: which one applies to a host for a proxy, and the cluster settings it
//! gives.
//!
//! Lookup follows Istio: rules exported to the proxy's namespace (`exportTo`) whose host
//! covers the service (short names resolved in the rule's namespace, exact hosts before
//! wildcards), a rule with a `workloadSelector` only for the workloads it selects in its own
//! namespace; the proxy's namespace first, then the service's, then the root namespace, then
//! any other. Several rules of the chosen namespace are merged oldest first: the first traffic
//! policy wins, subsets are concatenated and a later duplicate subset name is dropped.
//!
//! Settings of a cluster (`outbound|port|subset|host`), most specific first: the subset's
//! `portLevelSettings` for the port, the subset's policy, the rule's `portLevelSettings`, the
//! rule's policy (Istio's merge).

use weft_api::config::{
    Cluster, ConnectionPool, ConsistentHash, Endpoint, HashAlgorithm, HashKey, LbPolicy,
    LoadBalancer, OutlierDetection, RetryBudget, TcpKeepalive, UpstreamTls, UpstreamTlsMode,
};
use weft_api::crd::AnyResource;
use weft_api::crd::networking::{
    ClientTlsMode, ClientTlsSettings, ConnectionPoolSettings, DestinationRuleSpec,
    LoadBalancerSettings, OutlierDetection as IstioOutlier, SimpleLb, Subset, TrafficPolicy,
};

use super::{ClusterRef, Ctx, duration_ms, exported_to, host_matches, labels_match, resolve_host};

/// The DestinationRule(s) that apply to one host for one proxy, merged.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedRule {
    /// Namespace of the rule(s).
    pub namespace: String,
    /// Top-level traffic policy.
    pub policy: Option<TrafficPolicy>,
    /// Subsets.
    pub subsets: Vec<Subset>,
}

fn dr(r: &AnyResource) -> Option<(&DestinationRuleSpec, &str)> {
    match r {
        AnyResource::DestinationRule(d) => Some((
            &d.spec,
            d.metadata.namespace.as_deref().unwrap_or("default"),
        )),
        _ => None,
    }
}

/// The merged DestinationRule for `host` as seen by the context's proxy.
pub(crate) fn destination_rule(ctx: &Ctx<'_>, host: &str) -> Option<MergedRule> {
    let proxy = ctx.proxy;
    let candidates: Vec<(&DestinationRuleSpec, &str, bool)> = ctx
        .index
        .destination_rules
        .iter()
        .filter_map(|r| dr(r))
        .filter(|(spec, ns)| exported_to(&spec.export_to, ns, &proxy.namespace))
        .filter(|(spec, ns)| match &spec.workload_selector {
            Some(sel) => {
                *ns == proxy.namespace
                    && sel
                        .match_labels
                        .as_ref()
                        .is_none_or(|l| labels_match(l, &proxy.labels))
            }
            None => true,
        })
        .filter_map(|(spec, ns)| {
            let pattern = resolve_host(&spec.host, ns);
            host_matches(&pattern, host).then_some((spec, ns, pattern == host))
        })
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let service_ns = ctx.index.service(host).map(|s| s.namespace.as_str());
    let root = ctx.resources.settings.root_namespace.as_str();
    let order = [Some(proxy.namespace.as_str()), service_ns, Some(root)];
    let chosen_ns: &str = order
        .iter()
        .flatten()
        .find(|ns| candidates.iter().any(|(_, n, _)| n == *ns))
        .copied()
        .unwrap_or(candidates[0].1);
    let mut group: Vec<&(&DestinationRuleSpec, &str, bool)> = candidates
        .iter()
        .filter(|(_, n, _)| *n == chosen_ns)
        .collect();
    // Exact hosts before wildcards; the sort is stable, so oldest first within each.
    group.sort_by_key(|(_, _, exact)| !*exact);
    let mut merged = MergedRule {
        namespace: chosen_ns.to_owned(),
        policy: None,
        subsets: Vec::new(),
    };
    for (spec, _, _) in group {
        if merged.policy.is_none() {
            merged.policy = spec.traffic_policy.clone();
        }
        for s in &spec.subsets {
            if !merged.subsets.iter().any(|m| m.name == s.name) {
                merged.subsets.push(s.clone());
            }
        }
    }
    Some(merged)
}

/// The effective settings for one port of one subset.
#[derive(Debug, Default)]
struct Effective {
    load_balancer: Option<LoadBalancerSettings>,
    connection_pool: Option<ConnectionPoolSettings>,
    outlier_detection: Option<IstioOutlier>,
    tls: Option<ClientTlsSettings>,
    retry_budget: Option<weft_api::crd::networking::RetryBudget>,
}

fn overlay(eff: &mut Effective, policy: Option<&TrafficPolicy>, port: u16) {
    let Some(p) = policy else { return };
    if p.load_balancer.is_some() {
        eff.load_balancer = p.load_balancer.clone();
    }
    if p.connection_pool.is_some() {
        eff.connection_pool = p.connection_pool.clone();
    }
    if p.outlier_detection.is_some() {
        eff.outlier_detection = p.outlier_detection.clone();
    }
    if p.tls.is_some() {
        eff.tls = p.tls.clone();
    }
    if p.retry_budget.is_some() {
        eff.retry_budget = p.retry_budget.clone();
    }
    if let Some(pl) = p
        .port_level_settings
        .iter()
        .find(|s| s.port.as_ref().and_then(|p| p.number) == Some(u32::from(port)))
    {
        if pl.load_balancer.is_some() {
            eff.load_balancer = pl.load_balancer.clone();
        }
        if pl.connection_pool.is_some() {
            eff.connection_pool = pl.connection_pool.clone();
        }
        if pl.outlier_detection.is_some() {
            eff.outlier_detection = pl.outlier_detection.clone();
        }
        if pl.tls.is_some() {
            eff.tls = pl.tls.clone();
        }
    }
}

fn load_balancer(lb: &LoadBalancerSettings) -> LoadBalancer {
    // Istio's default (absent or UNSPECIFIED) is LEAST_REQUEST; LEAST_CONN is its old name.
    let policy = match lb.simple {
        Some(SimpleLb::RoundRobin) => LbPolicy::RoundRobin,
        Some(SimpleLb::Random) => LbPolicy::Random,
        Some(SimpleLb::Passthrough) => LbPolicy::Passthrough,
        _ => LbPolicy::LeastRequest,
    };
    let consistent_hash = lb.consistent_hash.as_ref().and_then(|ch| {
        let key = if let Some(h) = &ch.http_header_name {
            HashKey::Header(h.to_ascii_lowercase())
        } else if let Some(c) = &ch.http_cookie {
            HashKey::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl_ms: c.ttl.as_deref().and_then(duration_ms),
            }
        } else if ch.use_source_ip == Some(true) {
            HashKey::SourceIp
        } else if let Some(q) = &ch.http_query_parameter_name {
            HashKey::QueryParameter(q.clone())
        } else {
            return None;
        };
        let algorithm = if let Some(m) = &ch.maglev {
            HashAlgorithm::Maglev {
                table_size: m
                    .table_size
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(65_537),
            }
        } else {
            HashAlgorithm::Ring {
                min_ring_size: ch
                    .ring_hash
                    .as_ref()
                    .and_then(|r| r.minimum_ring_size)
                    .or(ch.minimum_ring_size)
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(1024),
            }
        };
        Some(ConsistentHash { key, algorithm })
    });
    let warmup_ms = lb
        .warmup
        .as_ref()
        .and_then(|w| w.duration.as_deref())
        .or(lb.warmup_duration_secs.as_deref())
        .and_then(duration_ms);
    LoadBalancer {
        policy,
        consistent_hash,
        warmup_ms,
    }
}

fn positive(v: Option<i32>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0)
}

fn connection_pool(pool: &ConnectionPoolSettings) -> (ConnectionPool, Option<u64>) {
    let tcp = pool.tcp.as_ref();
    let http = pool.http.as_ref();
    let keepalive = tcp
        .and_then(|t| t.tcp_keepalive.as_ref())
        .map(|k| TcpKeepalive {
            time_ms: k.time.as_deref().and_then(duration_ms),
            interval_ms: k.interval.as_deref().and_then(duration_ms),
            probes: k.probes,
        });
    (
        ConnectionPool {
            max_connections: positive(tcp.and_then(|t| t.max_connections)),
            tcp_keepalive: keepalive,
            http1_max_pending_requests: positive(http.and_then(|h| h.http1_max_pending_requests)),
            http2_max_requests: positive(http.and_then(|h| h.http2_max_requests)),
            max_requests_per_connection: positive(http.and_then(|h| h.max_requests_per_connection)),
            max_retries: positive(http.and_then(|h| h.max_retries)),
            idle_timeout_ms: http
                .and_then(|h| h.idle_timeout.as_deref())
                .or(tcp.and_then(|t| t.idle_timeout.as_deref()))
                .and_then(duration_ms),
        },
        tcp.and_then(|t| t.connect_timeout.as_deref())
            .and_then(duration_ms),
    )
}

fn outlier(o: &IstioOutlier) -> OutlierDetection {
    let gateway = o
        .consecutive_gateway_errors
        .or_else(|| o.consecutive_errors.and_then(|e| u32::try_from(e).ok()));
    // Istio's default of 5 consecutive 5xx applies unless only gateway errors are set.
    let five_xx = o
        .consecutive_5xx_errors
        .or(if gateway.is_some() { None } else { Some(5) })
        .filter(|v| *v > 0);
    OutlierDetection {
        consecutive_5xx_errors: five_xx,
        consecutive_gateway_errors: gateway.filter(|v| *v > 0),
        interval_ms: o
            .interval
            .as_deref()
            .and_then(duration_ms)
            .unwrap_or(10_000),
        base_ejection_time_ms: o
            .base_ejection_time
            .as_deref()
            .and_then(duration_ms)
            .unwrap_or(30_000),
        max_ejection_percent: o
            .max_ejection_percent
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(10),
        min_health_percent: o
            .min_health_percent
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0),
    }
}

fn tls(t: &ClientTlsSettings) -> UpstreamTls {
    let mode = match t.mode {
        Some(ClientTlsMode::Disable) => UpstreamTlsMode::Disable,
        Some(ClientTlsMode::Simple) => UpstreamTlsMode::Simple,
        Some(ClientTlsMode::Mutual) => UpstreamTlsMode::Mutual,
        Some(ClientTlsMode::IstioMutual) => UpstreamTlsMode::IstioMutual,
        None => UpstreamTlsMode::Auto,
    };
    let external = matches!(mode, UpstreamTlsMode::Simple | UpstreamTlsMode::Mutual);
    UpstreamTls {
        mode,
        sni: t.sni.clone().filter(|_| external),
        ca_certificates: t.ca_certificates.clone().filter(|_| external),
        client_certificate: t
            .client_certificate
            .clone()
            .filter(|_| mode == UpstreamTlsMode::Mutual),
        private_key: t
            .private_key
            .clone()
            .filter(|_| mode == UpstreamTlsMode::Mutual),
        subject_alt_names: if external {
            t.subject_alt_names.clone()
        } else {
            Vec::new()
        },
        insecure_skip_verify: external && t.insecure_skip_verify == Some(true),
    }
}

/// Builds the cluster `r` for the context's proxy.
pub(crate) fn cluster(ctx: &Ctx<'_>, r: &ClusterRef, rule: Option<&MergedRule>) -> Cluster {
    let mut cluster = Cluster {
        name: r.name(),
        ..Cluster::default()
    };
    let Some(svc) = ctx
        .index
        .service(&r.host)
        .filter(|s| exported_to(&s.export_to, &s.namespace, &ctx.proxy.namespace))
    else {
        // A route to an unknown host or port: an empty cluster, so requests get 503 (Istio's
        // "no cluster" answer) instead of the whole snapshot being refused.
        return cluster;
    };
    let subset = match &r.subset {
        Some(name) => match rule.and_then(|d| d.subsets.iter().find(|s| &s.name == name)) {
            Some(s) => Some(s),
            None => return cluster,
        },
        None => None,
    };
    let mut eff = Effective::default();
    overlay(&mut eff, rule.and_then(|d| d.policy.as_ref()), r.port);
    overlay(
        &mut eff,
        subset.and_then(|s| s.traffic_policy.as_ref()),
        r.port,
    );
    if let Some(lb) = &eff.load_balancer {
        cluster.load_balancer = load_balancer(lb);
    }
    if let Some(pool) = &eff.connection_pool {
        let (pool, connect) = connection_pool(pool);
        cluster.connection_pool = pool;
        cluster.connect_timeout_ms = connect;
    }
    cluster.outlier_detection = eff.outlier_detection.as_ref().map(outlier);
    if let Some(t) = &eff.tls {
        cluster.tls = tls(t);
    }
    cluster.retry_budget = eff.retry_budget.as_ref().map(|b| RetryBudget {
        percent: b.percent.unwrap_or(20.0),
        min_concurrency: b.min_retry_concurrency.unwrap_or(3),
    });
    if svc.passthrough {
        cluster.load_balancer.policy = LbPolicy::Passthrough;
        cluster.load_balancer.consistent_hash = None;
        return cluster;
    }
    for ep in &svc.endpoints {
        let Some(port) = ep.port_for(r.port) else {
            continue;
        };
        if let Some(s) = subset
            && !labels_match(&s.labels, &ep.labels)
        {
            continue;
        }
        let identity = match cluster.tls.mode {
            UpstreamTlsMode::IstioMutual => {
                match ep.identity.clone().or_else(|| ep.account_identity.clone()) {
                    Some(id) => Some(id),
                    None => continue,
                }
            }
            UpstreamTlsMode::Auto => ep.identity_for(r.port),
            _ => None,
        };
        cluster.endpoints.push(Endpoint {
            address: ep.address,
            port,
            identity,
            labels: (*ep.labels).clone(),
            weight: ep.weight,
        });
    }
    cluster
}
