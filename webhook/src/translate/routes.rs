//! VirtualService routes for one service port, as one proxy sees them, and the choice
//! between the routing resources that claim one service.
//!
//! Per match, `sourceLabels`, `sourceNamespace`, `gateways` and (tcp) `sourceSubnet` are
//! evaluated for this proxy: a match that does not apply is dropped, a route left without
//! matches (it had some) is dropped. `port` keeps a match to that service port. Delegates are
//! inlined: the parent's match conditions are merged into each of the delegate's (the
//! delegate's win); as in Istio, delegation is one level deep, and a delegate that delegates
//! again (itself, or a cycle) is refused with a warning. Routes without `retries` get Istio's
//! default policy (2 attempts on
//! `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`, code 503);
//! `attempts: 0` disables retries; numbers in `retryOn` are retriable status codes.
//!
//! One service port takes its routes from one source, as an Istio sidecar does (analyzer
//! IST0109 calls anything else undefined; `weft-webhook validate` reports it): among the
//! VirtualServices for the host, the one naming it most specifically (exact, then the longest
//! wildcard), then the oldest; among that VirtualService, the HTTPRoutes / GRPCRoutes
//! attached to the service and its TrafficSplits, the oldest. Whatever loses is logged at
//! warn with both names.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::warn;
use weft_api::config::{
    CorsPolicy, DirectResponse, Fault, FaultAbort, FaultDelay, Forward, HeaderMatch, HeaderOps,
    HttpAction, HttpMatch, HttpRoute, Mirror, Protocol, QueryMatch, Redirect, RegexRewrite,
    RetryPolicy, Rewrite, StringMatch, TcpMatch, TcpRoute, WeightedCluster,
};
use weft_api::crd::AnyResource;
use weft_api::crd::networking::{
    self as istio, HeaderOperations, HttpMatchRequest, HttpRetry, VirtualService,
};

use super::registry::{RegPort, RegService};
use super::{Ctx, duration_ms, exported_to, gamma, host_matches, labels_match, resolve_host};

/// Istio's default `retryOn` when a route has no (or an incomplete) retry policy.
pub const DEFAULT_RETRY_ON: &[&str] = &[
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
];
/// Istio's default retriable status code.
pub const DEFAULT_RETRIABLE_CODES: &[u16] = &[503];
/// Istio's default number of retries.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

/// Istio's default retry policy.
pub fn default_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: DEFAULT_RETRY_ATTEMPTS,
        per_try_timeout_ms: None,
        retry_on: DEFAULT_RETRY_ON.iter().map(|s| (*s).to_owned()).collect(),
        retriable_status_codes: DEFAULT_RETRIABLE_CODES.to_vec(),
    }
}

fn namespace_of(vs: &VirtualService) -> &str {
    vs.metadata.namespace.as_deref().unwrap_or("default")
}

/// `VirtualService/<namespace>/<name>`, for logs.
fn vs_label(vs: &VirtualService) -> String {
    format!(
        "VirtualService/{}/{}",
        namespace_of(vs),
        vs.metadata.name.as_deref().unwrap_or_default()
    )
}

/// `Kind/<namespace>/<name>` of any resource, for logs.
pub(crate) fn resource_label(r: &AnyResource) -> String {
    let meta = r.metadata();
    format!(
        "{}/{}/{}",
        r.known_kind().kind,
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// Whether a VirtualService applies to sidecars (`gateways` empty or naming `mesh`).
fn for_mesh(vs: &VirtualService) -> bool {
    vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh")
}

/// How specifically a host pattern names `hostname`, when it does: an exact name beats every
/// wildcard, a longer wildcard a shorter one (Istio's most specific host match).
fn specificity(pattern: &str, hostname: &str) -> Option<(bool, usize)> {
    host_matches(pattern, hostname).then(|| (!pattern.contains('*'), pattern.len()))
}

/// The VirtualService for a host that the proxy uses: among those visible to it on the mesh,
/// the one naming the host most specifically, then the oldest. The others are ignored, with a
/// warning naming both.
pub(crate) fn virtual_service<'a>(ctx: &Ctx<'a>, hostname: &str) -> Option<&'a Arc<AnyResource>> {
    let mut best: Option<(&'a Arc<AnyResource>, (bool, usize))> = None;
    let mut candidates = Vec::new();
    for r in &ctx.index.virtual_services {
        let AnyResource::VirtualService(vs) = &**r else {
            continue;
        };
        if vs.spec.hosts.is_empty()
            || !for_mesh(vs)
            || !exported_to(&vs.spec.export_to, namespace_of(vs), &ctx.proxy.namespace)
        {
            continue;
        }
        let Some(rank) = vs
            .spec
            .hosts
            .iter()
            .filter_map(|h| specificity(&resolve_host(h, namespace_of(vs)), hostname))
            .max()
        else {
            continue;
        };
        candidates.push(r);
        // Oldest first: a later one wins only when strictly more specific.
        if best.is_none_or(|(_, b)| rank > b) {
            best = Some((r, rank));
        }
    }
    let (chosen, _) = best?;
    for r in candidates {
        if !Arc::ptr_eq(r, chosen) {
            warn!(
                host = %hostname,
                applied = %resource_label(chosen),
                ignored = %resource_label(r),
                "several VirtualServices for one host: the most specific, then the oldest, applies"
            );
        }
    }
    Some(chosen)
}

/// The routes of one service port.
pub(crate) fn for_port(
    ctx: &mut Ctx<'_>,
    svc: &RegService,
    port: &RegPort,
) -> (Vec<HttpRoute>, Vec<TcpRoute>) {
    let http_port = port.protocol.is_http() || port.protocol == Protocol::Auto;
    let vs = virtual_service(ctx, &svc.hostname).cloned();
    let attached = gamma::attached_routes(ctx, svc, port);
    let split = gamma::traffic_split_for(ctx, svc);
    // The oldest of the sources claiming the service wins.
    let mut sources: Vec<(usize, Source)> = Vec::new();
    if let Some(vs) = &vs {
        sources.push((ctx.index.age(vs), Source::VirtualService(vs.clone())));
    }
    if let Some(routes) = &attached {
        sources.push((routes.age, Source::Gamma));
    }
    if let Some(split) = &split {
        sources.push((ctx.index.age(split), Source::TrafficSplit(split.clone())));
    }
    sources.sort_by_key(|(age, _)| *age);
    let mut sources = sources.into_iter().map(|(_, s)| s);
    let Some(chosen) = sources.next() else {
        return if http_port {
            (vec![default_route(ctx, svc, port)], Vec::new())
        } else {
            (Vec::new(), Vec::new())
        };
    };
    for ignored in sources {
        warn!(
            host = %svc.hostname,
            port = port.port,
            applied = %chosen.label(attached.as_ref()),
            ignored = %ignored.label(attached.as_ref()),
            "several routing resources for one service: the oldest applies"
        );
    }
    match chosen {
        Source::VirtualService(vs) => {
            let AnyResource::VirtualService(vs) = &*vs else {
                return (Vec::new(), Vec::new());
            };
            virtual_service_routes(ctx, vs, svc, port)
        }
        Source::Gamma => match attached {
            Some(routes) => gamma::routes_for_port(ctx, &routes, port),
            None => (Vec::new(), Vec::new()),
        },
        Source::TrafficSplit(split) => {
            gamma::traffic_split(ctx, &split, port).unwrap_or_else(|| {
                if http_port {
                    (vec![default_route(ctx, svc, port)], Vec::new())
                } else {
                    (Vec::new(), Vec::new())
                }
            })
        }
    }
}

/// A routing resource claiming a service.
enum Source {
    VirtualService(Arc<AnyResource>),
    /// The HTTPRoutes / GRPCRoutes attached to the service port (together).
    Gamma,
    TrafficSplit(Arc<AnyResource>),
}

impl Source {
    fn label(&self, attached: Option<&gamma::Attached>) -> String {
        match self {
            Source::VirtualService(r) | Source::TrafficSplit(r) => resource_label(r),
            Source::Gamma => attached
                .map(|a| {
                    a.routes
                        .iter()
                        .map(|(_, r)| resource_label(r))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
        }
    }
}

/// The routes of one VirtualService for one service port.
fn virtual_service_routes(
    ctx: &mut Ctx<'_>,
    vs: &VirtualService,
    svc: &RegService,
    port: &RegPort,
) -> (Vec<HttpRoute>, Vec<TcpRoute>) {
    let http_port = port.protocol.is_http() || port.protocol == Protocol::Auto;
    let tcp_port = !port.protocol.is_http();
    let ns = namespace_of(vs);
    let label = vs_label(vs);
    let mut http = Vec::new();
    let mut tcp = Vec::new();
    if http_port {
        for route in &vs.spec.http {
            http.extend(http_route(ctx, &label, ns, route, port, None));
        }
    }
    if tcp_port {
        if matches!(port.protocol, Protocol::Tls | Protocol::Auto) {
            for route in &vs.spec.tls {
                tcp.extend(tls_route(ctx, ns, route, port));
            }
        }
        for route in &vs.spec.tcp {
            tcp.extend(tcp_route(ctx, &label, ns, route, port));
        }
    }
    if http.is_empty() && http_port && vs.spec.http.is_empty() {
        http.push(default_route(ctx, svc, port));
    }
    (http, tcp)
}

/// The route Istio gives a service without routing rules: everything to the service, with
/// the default retries.
fn default_route(ctx: &mut Ctx<'_>, svc: &RegService, port: &RegPort) -> HttpRoute {
    let cluster = ctx.cluster_for(
        &svc.hostname,
        &svc.namespace,
        Some(port.port),
        None,
        port.port,
    );
    HttpRoute {
        name: "default".into(),
        matches: Vec::new(),
        action: HttpAction::Forward(Forward {
            destinations: vec![WeightedCluster {
                cluster,
                weight: 100,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
            }],
            retries: Some(default_retries()),
            ..Forward::default()
        }),
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        fault: None,
        cors: None,
    }
}

/// Whether per-proxy conditions of a match hold for the context's proxy.
fn applies(
    ctx: &Ctx<'_>,
    source_labels: &BTreeMap<String, String>,
    source_namespace: Option<&str>,
    gateways: &[String],
) -> bool {
    labels_match(source_labels, &ctx.proxy.labels)
        && source_namespace.is_none_or(|ns| ns == ctx.proxy.namespace)
        && (gateways.is_empty() || gateways.iter().any(|g| g == "mesh"))
}

pub(crate) fn string_match(m: &istio::StringMatch) -> Option<StringMatch> {
    if let Some(v) = &m.exact {
        Some(StringMatch::Exact(v.clone()))
    } else if let Some(v) = &m.prefix {
        Some(StringMatch::Prefix(v.clone()))
    } else {
        m.regex.as_ref().map(|v| StringMatch::Regex(v.clone()))
    }
}

fn http_match(m: &HttpMatchRequest) -> HttpMatch {
    let mut headers: Vec<HeaderMatch> = m
        .headers
        .iter()
        .map(|(name, v)| HeaderMatch {
            name: name.to_ascii_lowercase(),
            value: string_match(v),
            invert: false,
        })
        .collect();
    headers.extend(m.without_headers.iter().map(|(name, v)| HeaderMatch {
        name: name.to_ascii_lowercase(),
        value: string_match(v),
        invert: true,
    }));
    HttpMatch {
        uri: m.uri.as_ref().and_then(string_match),
        scheme: m.scheme.as_ref().and_then(string_match),
        method: m.method.as_ref().and_then(string_match),
        authority: m.authority.as_ref().and_then(string_match),
        headers,
        query_params: m
            .query_params
            .iter()
            .map(|(name, v)| QueryMatch {
                name: name.clone(),
                value: string_match(v),
            })
            .collect(),
        ignore_uri_case: m.ignore_uri_case == Some(true),
        port: None,
    }
}

/// A delegate's match with its parent's conditions filled in where it has none.
fn merge_match(parent: &HttpMatch, child: &HttpMatch) -> HttpMatch {
    let mut out = child.clone();
    out.uri = out.uri.or_else(|| parent.uri.clone());
    out.scheme = out.scheme.or_else(|| parent.scheme.clone());
    out.method = out.method.or_else(|| parent.method.clone());
    out.authority = out.authority.or_else(|| parent.authority.clone());
    out.ignore_uri_case |= parent.ignore_uri_case;
    for h in &parent.headers {
        if !out.headers.iter().any(|c| c.name == h.name) {
            out.headers.push(h.clone());
        }
    }
    for q in &parent.query_params {
        if !out.query_params.iter().any(|c| c.name == q.name) {
            out.query_params.push(q.clone());
        }
    }
    out
}

fn header_ops(ops: Option<&HeaderOperations>) -> HeaderOps {
    ops.map(|o| HeaderOps {
        set: o.set.clone(),
        add: o.add.clone(),
        remove: o.remove.clone(),
    })
    .unwrap_or_default()
}

fn percent(p: Option<&istio::Percent>, legacy: Option<i32>) -> f64 {
    p.and_then(|p| p.value)
        .or(legacy.map(f64::from))
        .unwrap_or(100.0)
        .clamp(0.0, 100.0)
}

/// Parses Istio's `retryOn` into conditions and retriable status codes.
pub fn retry_on(text: &str) -> (Vec<String>, Vec<u16>) {
    let mut conditions = Vec::new();
    let mut codes = Vec::new();
    for part in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match part.parse::<u16>() {
            Ok(code) => codes.push(code),
            Err(_) => conditions.push(part.to_owned()),
        }
    }
    if !codes.is_empty() && !conditions.iter().any(|c| c == "retriable-status-codes") {
        conditions.push("retriable-status-codes".into());
    }
    (conditions, codes)
}

fn retries(r: Option<&HttpRetry>) -> Option<RetryPolicy> {
    let Some(r) = r else {
        return Some(default_retries());
    };
    let attempts = u32::try_from(r.attempts.unwrap_or(0)).unwrap_or(0);
    if attempts == 0 {
        return None;
    }
    let (retry_on, retriable_status_codes) = match r.retry_on.as_deref() {
        Some(text) if !text.trim().is_empty() => retry_on(text),
        _ => (
            DEFAULT_RETRY_ON.iter().map(|s| (*s).to_owned()).collect(),
            DEFAULT_RETRIABLE_CODES.to_vec(),
        ),
    };
    Some(RetryPolicy {
        attempts,
        per_try_timeout_ms: r.per_try_timeout.as_deref().and_then(duration_ms),
        retry_on,
        retriable_status_codes,
    })
}

fn fault(f: &istio::HttpFaultInjection) -> Option<Fault> {
    let delay = f.delay.as_ref().and_then(|d| {
        Some(FaultDelay {
            fixed_delay_ms: duration_ms(d.fixed_delay.as_deref()?)?,
            percentage: percent(d.percentage.as_ref(), d.percent),
        })
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let http_status = a.http_status.and_then(|s| u16::try_from(s).ok());
        if http_status.is_none() && a.grpc_status.is_none() {
            return None;
        }
        Some(FaultAbort {
            http_status,
            grpc_status: a.grpc_status.clone(),
            percentage: percent(a.percentage.as_ref(), None),
        })
    });
    (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
}

fn cors(c: &istio::CorsPolicy) -> CorsPolicy {
    let mut allow_origins: Vec<StringMatch> =
        c.allow_origins.iter().filter_map(string_match).collect();
    allow_origins.extend(c.allow_origin.iter().map(|o| StringMatch::Exact(o.clone())));
    CorsPolicy {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age_secs: c
            .max_age
            .as_deref()
            .and_then(duration_ms)
            .map(|ms| ms / 1000),
        allow_credentials: c.allow_credentials,
    }
}

fn dest_port(d: &istio::Destination) -> Option<u16> {
    d.port
        .as_ref()
        .and_then(|p| p.number)
        .and_then(|n| u16::try_from(n).ok())
}

/// The delegating route a delegate's routes are inlined into.
struct Delegation<'a> {
    /// `VirtualService/<ns>/<name>` of the delegating VirtualService.
    root: &'a str,
    /// Its route's matches, merged into the delegate's.
    matches: &'a [HttpMatch],
}

/// Translates one `http` route of VirtualService `label` (of namespace `ns`); `parent` is set
/// when the VirtualService is a delegate inlined into another's route.
fn http_route(
    ctx: &mut Ctx<'_>,
    label: &str,
    ns: &str,
    route: &istio::HttpRoute,
    port: &RegPort,
    parent: Option<&Delegation<'_>>,
) -> Vec<HttpRoute> {
    let mut matches = Vec::new();
    for m in &route.r#match {
        if !applies(
            ctx,
            &m.source_labels,
            m.source_namespace.as_deref(),
            &m.gateways,
        ) {
            continue;
        }
        if m.port.is_some_and(|p| p != u32::from(port.port)) {
            continue;
        }
        matches.push(http_match(m));
    }
    if !route.r#match.is_empty() && matches.is_empty() {
        return Vec::new();
    }
    let parent_matches = parent.map(|p| p.matches).unwrap_or_default();
    let matches: Vec<HttpMatch> = match (parent_matches.is_empty(), matches.is_empty()) {
        (true, _) => matches,
        (false, true) => parent_matches.to_vec(),
        (false, false) => parent_matches
            .iter()
            .flat_map(|p| matches.iter().map(move |c| merge_match(p, c)))
            .collect(),
    };
    if let Some(delegate) = &route.delegate {
        let name = delegate.name.as_deref().unwrap_or_default();
        let dns = delegate.namespace.as_deref().unwrap_or(ns).to_owned();
        if let Some(parent) = parent {
            // Istio delegates one level deep; following further could loop forever (a
            // delegate naming itself, or a cycle).
            warn!(
                virtual_service = %label,
                root = %parent.root,
                delegate = %format!("{dns}/{name}"),
                "nested delegation refused (one level allowed): route dropped"
            );
            return Vec::new();
        }
        let child = ctx.index.virtual_services.iter().find_map(|r| match &**r {
            AnyResource::VirtualService(v)
                if v.metadata.name.as_deref() == Some(name)
                    && namespace_of(v) == dns
                    && v.spec.hosts.is_empty() =>
            {
                Some(r.clone())
            }
            _ => None,
        });
        let Some(child) = child else {
            warn!(
                virtual_service = %label,
                delegate = %format!("{dns}/{name}"),
                "delegate VirtualService not found (or has hosts): route dropped"
            );
            return Vec::new();
        };
        let AnyResource::VirtualService(child) = &*child else {
            return Vec::new();
        };
        let child_label = vs_label(child);
        let delegation = Delegation {
            root: label,
            matches: &matches,
        };
        return child
            .spec
            .http
            .iter()
            .flat_map(|r| http_route(ctx, &child_label, &dns, r, port, Some(&delegation)))
            .collect();
    }
    let action = if let Some(r) = &route.redirect {
        HttpAction::Redirect(Redirect {
            uri: r.uri.clone(),
            prefix: r.prefix_rewrite.clone(),
            authority: r.authority.clone(),
            scheme: r.scheme.clone(),
            port: r.port.and_then(|p| u16::try_from(p).ok()),
            code: r
                .redirect_code
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(301),
        })
    } else if let Some(d) = &route.direct_response {
        let body = d.body.as_ref().and_then(|b| {
            b.string.clone().or_else(|| {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b.bytes.as_deref()?)
                    .ok()?;
                String::from_utf8(bytes).ok()
            })
        });
        HttpAction::DirectResponse(DirectResponse {
            status: u16::try_from(d.status).unwrap_or(500),
            body,
        })
    } else {
        let weighted = route.route.iter().any(|d| d.weight.is_some());
        let mut destinations: Vec<WeightedCluster> = route
            .route
            .iter()
            .map(|d| {
                let cluster = ctx.cluster_for(
                    &d.destination.host,
                    ns,
                    dest_port(&d.destination),
                    d.destination.subset.as_deref(),
                    port.port,
                );
                let weight = if weighted {
                    u32::try_from(d.weight.unwrap_or(0)).unwrap_or(0)
                } else if route.route.len() == 1 {
                    100
                } else {
                    1
                };
                let headers = d.headers.as_ref();
                WeightedCluster {
                    cluster,
                    weight,
                    request_headers: header_ops(headers.and_then(|h| h.request.as_ref())),
                    response_headers: header_ops(headers.and_then(|h| h.response.as_ref())),
                }
            })
            .collect();
        if destinations.iter().any(|d| d.weight > 0) {
            destinations.retain(|d| d.weight > 0);
        }
        if destinations.is_empty() {
            HttpAction::DirectResponse(DirectResponse {
                status: 500,
                body: None,
            })
        } else {
            let mut mirrors = Vec::new();
            if let Some(m) = &route.mirror {
                let legacy = route.mirror_percent.or(route.mirror_percent_snake);
                mirrors.push(Mirror {
                    cluster: ctx.cluster_for(
                        &m.host,
                        ns,
                        dest_port(m),
                        m.subset.as_deref(),
                        port.port,
                    ),
                    percentage: percent(
                        route.mirror_percentage.as_ref(),
                        legacy.and_then(|p| i32::try_from(p).ok()),
                    ),
                });
            }
            for m in &route.mirrors {
                mirrors.push(Mirror {
                    cluster: ctx.cluster_for(
                        &m.destination.host,
                        ns,
                        dest_port(&m.destination),
                        m.destination.subset.as_deref(),
                        port.port,
                    ),
                    percentage: percent(m.percentage.as_ref(), None),
                });
            }
            HttpAction::Forward(Forward {
                destinations,
                rewrite: route.rewrite.as_ref().map(|r| Rewrite {
                    uri: r.uri.clone(),
                    uri_regex: r.uri_regex_rewrite.as_ref().and_then(|x| {
                        Some(RegexRewrite {
                            pattern: x.r#match.clone()?,
                            rewrite: x.rewrite.clone().unwrap_or_default(),
                        })
                    }),
                    authority: r.authority.clone(),
                }),
                timeout_ms: route
                    .timeout
                    .as_deref()
                    .and_then(duration_ms)
                    .filter(|t| *t > 0),
                retries: retries(route.retries.as_ref()),
                mirrors,
            })
        }
    };
    let headers = route.headers.as_ref();
    vec![HttpRoute {
        name: route.name.clone().unwrap_or_default(),
        matches,
        action,
        request_headers: header_ops(headers.and_then(|h| h.request.as_ref())),
        response_headers: header_ops(headers.and_then(|h| h.response.as_ref())),
        fault: route.fault.as_ref().and_then(fault),
        cors: route.cors_policy.as_ref().map(cors),
    }]
}

fn subnets(list: &[String]) -> Vec<ipnet::IpNet> {
    list.iter().filter_map(|s| subnet(s)).collect()
}

fn destinations(
    ctx: &mut Ctx<'_>,
    ns: &str,
    route: &[istio::RouteDestination],
    port: &RegPort,
) -> Vec<WeightedCluster> {
    let weighted = route.iter().any(|d| d.weight.is_some());
    let mut out: Vec<WeightedCluster> = route
        .iter()
        .map(|d| WeightedCluster {
            cluster: ctx.cluster_for(
                &d.destination.host,
                ns,
                dest_port(&d.destination),
                d.destination.subset.as_deref(),
                port.port,
            ),
            weight: if weighted {
                u32::try_from(d.weight.unwrap_or(0)).unwrap_or(0)
            } else {
                1
            },
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        })
        .collect();
    if out.iter().any(|d| d.weight > 0) {
        out.retain(|d| d.weight > 0);
    }
    out
}

/// A `sourceSubnet` (`a.b.c.d/n` or a bare address).
fn subnet(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Translates one `tcp` route of VirtualService `label` (of namespace `ns`).
fn tcp_route(
    ctx: &mut Ctx<'_>,
    label: &str,
    ns: &str,
    route: &istio::TcpRoute,
    port: &RegPort,
) -> Option<TcpRoute> {
    let mut matches = Vec::new();
    for m in &route.r#match {
        if !applies(
            ctx,
            &m.source_labels,
            m.source_namespace.as_deref(),
            &m.gateways,
        ) {
            continue;
        }
        if m.port.is_some_and(|p| p != u32::from(port.port)) {
            continue;
        }
        // The source of a sidecar's outbound connection is its own pod: the match applies
        // to this proxy or not at all. Unknown or unreadable: not applied, never widened.
        if let Some(text) = m.source_subnet.as_deref().filter(|s| !s.is_empty()) {
            let Some(net) = subnet(text) else {
                warn!(virtual_service = %label, source_subnet = %text, "tcp match sourceSubnet is not an address or CIDR: match dropped");
                continue;
            };
            if !ctx.proxy.ip.is_some_and(|ip| net.contains(&ip)) {
                continue;
            }
        }
        matches.push(TcpMatch {
            port: None,
            sni_hosts: Vec::new(),
            destination_subnets: subnets(&m.destination_subnets),
        });
    }
    if !route.r#match.is_empty() && matches.is_empty() {
        return None;
    }
    let destinations = destinations(ctx, ns, &route.route, port);
    (!destinations.is_empty()).then_some(TcpRoute {
        matches,
        destinations,
    })
}

fn tls_route(
    ctx: &mut Ctx<'_>,
    ns: &str,
    route: &istio::TlsRoute,
    port: &RegPort,
) -> Option<TcpRoute> {
    let mut matches = Vec::new();
    for m in &route.r#match {
        if !applies(
            ctx,
            &m.source_labels,
            m.source_namespace.as_deref(),
            &m.gateways,
        ) {
            continue;
        }
        if m.port.is_some_and(|p| p != u32::from(port.port)) {
            continue;
        }
        matches.push(TcpMatch {
            port: None,
            sni_hosts: m.sni_hosts.clone(),
            destination_subnets: subnets(&m.destination_subnets),
        });
    }
    if !route.r#match.is_empty() && matches.is_empty() {
        return None;
    }
    let destinations = destinations(ctx, ns, &route.route, port);
    (!destinations.is_empty()).then_some(TcpRoute {
        matches,
        destinations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_parses_codes() {
        let (c, codes) = retry_on("gateway-error,connect-failure,503, 504");
        assert_eq!(
            c,
            ["gateway-error", "connect-failure", "retriable-status-codes"]
        );
        assert_eq!(codes, [503, 504]);
        assert_eq!(retries(None), Some(default_retries()));
        assert_eq!(
            retries(Some(&HttpRetry {
                attempts: Some(0),
                ..Default::default()
            })),
            None
        );
    }
}
