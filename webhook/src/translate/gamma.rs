//! Gateway API routes attached to a Service (GAMMA: HTTPRoute and GRPCRoute whose
//! `parentRefs` name a Service) and SMI TrafficSplit.
//!
//! A route in the service's namespace (a producer route) applies to every client; a route in
//! another namespace (a consumer route) only to clients of that namespace, and replaces the
//! producer routes for them. Rules are ordered by the Gateway API's precedence: exact path,
//! longest prefix, regex, then method, most headers, most query parameters, then the oldest
//! route, then rule order. Unmatched requests get 404 (the model's rule when routes exist).
//! A rule without backends answers 500, as the Gateway API asks. `PathPrefix` matches whole
//! path segments (`segmentPrefix` in the model), and `ReplacePrefixMatch` replaces them by
//! the Gateway API's rules; Istio's textual `prefix` is left to VirtualServices.
//!
//! Which of these routes, a VirtualService or a TrafficSplit claiming the same service
//! applies is decided in [`super::routes`] (the oldest).

use std::sync::Arc;

use tracing::warn;
use weft_api::config::{
    CorsPolicy, DirectResponse, Forward, HeaderMatch, HeaderOps, HttpAction, HttpMatch, HttpRoute,
    Mirror, Protocol, QueryMatch, Redirect, RegexRewrite, RetryPolicy, Rewrite, StringMatch,
    TcpRoute, WeightedCluster,
};
use weft_api::crd::AnyResource;
use weft_api::crd::gateway::{
    BackendObjectReference, GrpcRouteFilterType, HttpHeaderFilter, HttpPathModifierType,
    HttpRouteFilter, HttpRouteFilterType, HttpRouteRule, HttpValueMatch, ParentReference,
    PathMatchType, ValueMatchType,
};

use super::registry::{RegPort, RegService};
use super::routes::{DEFAULT_RETRIABLE_CODES, DEFAULT_RETRY_ON, default_retries, resource_label};
use super::{Ctx, duration_ms};
use crate::resources::CLUSTER_DOMAIN;

fn is_service_parent(p: &ParentReference) -> bool {
    p.kind.as_deref() == Some("Service")
        && p.group
            .as_deref()
            .is_none_or(|g| g.is_empty() || g == "core")
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn header_filter(f: Option<&HttpHeaderFilter>) -> HeaderOps {
    f.map(|f| HeaderOps {
        set: f
            .set
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect(),
        add: f
            .add
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect(),
        remove: f.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    })
    .unwrap_or_default()
}

fn value_match(m: &HttpValueMatch) -> StringMatch {
    match m.type_ {
        Some(ValueMatchType::RegularExpression) => StringMatch::Regex(m.value.clone()),
        _ => StringMatch::Exact(m.value.clone()),
    }
}

fn backend_cluster(
    ctx: &mut Ctx<'_>,
    b: &BackendObjectReference,
    route_ns: &str,
    port: &RegPort,
) -> Option<String> {
    if b.kind.as_deref().is_some_and(|k| k != "Service")
        || b.group
            .as_deref()
            .is_some_and(|g| !g.is_empty() && g != "core")
    {
        return None;
    }
    let ns = b.namespace.as_deref().unwrap_or(route_ns);
    let host = format!("{}.{ns}.svc.{CLUSTER_DOMAIN}", b.name);
    let p = b.port.and_then(|p| u16::try_from(p).ok());
    Some(ctx.cluster_for(&host, ns, p, None, port.port))
}

/// Precedence of one match: lower sorts first.
fn precedence(
    m: &HttpMatch,
) -> (
    u8,
    usize,
    bool,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
) {
    let (rank, len) = match &m.uri {
        Some(StringMatch::Exact(p)) => (0, p.len()),
        Some(StringMatch::Prefix(p) | StringMatch::SegmentPrefix(p)) => (1, p.len()),
        Some(StringMatch::Regex(p)) => (2, p.len()),
        None => (1, 1),
    };
    (
        rank,
        usize::MAX - len,
        m.method.is_none(),
        std::cmp::Reverse(m.headers.len()),
        std::cmp::Reverse(m.query_params.len()),
    )
}

struct Built {
    key: (
        u8,
        usize,
        bool,
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
    ),
    order: (usize, usize, usize),
    route: HttpRoute,
}

enum AnyRule<'a> {
    Http(&'a HttpRouteRule),
    Grpc(&'a weft_api::crd::gateway::GrpcRouteRule),
}

/// The HTTPRoutes / GRPCRoutes that apply to one service port for one proxy.
pub(crate) struct Attached {
    /// `(position in the index, route)`, oldest first.
    pub routes: Vec<(usize, Arc<AnyResource>)>,
    /// Age rank of the oldest of them ([`super::Index::age`]).
    pub age: usize,
}

/// The routes attached to a service port, when any: the consumer routes of the proxy's
/// namespace, else the producer routes of the service's namespace.
pub(crate) fn attached_routes(ctx: &Ctx<'_>, svc: &RegService, port: &RegPort) -> Option<Attached> {
    let name = svc
        .hostname
        .strip_suffix(&format!(".{}.svc.{CLUSTER_DOMAIN}", svc.namespace))?;
    let index = ctx.index;
    let mut producer = Vec::new();
    let mut consumer = Vec::new();
    for (position, r) in index.gamma_routes.iter().enumerate() {
        let (meta, parents) = match &**r {
            AnyResource::HttpRoute(h) => (&h.metadata, &h.spec.parent_refs),
            AnyResource::GrpcRoute(g) => (&g.metadata, &g.spec.parent_refs),
            _ => continue,
        };
        let route_ns = meta.namespace.as_deref().unwrap_or("default");
        let attached = parents.iter().any(|p| {
            is_service_parent(p)
                && p.name == name
                && p.namespace.as_deref().unwrap_or(route_ns) == svc.namespace
                && p.port
                    .is_none_or(|pp| i64::from(pp) == i64::from(port.port))
        });
        if !attached {
            continue;
        }
        if route_ns == svc.namespace {
            producer.push((position, r.clone()));
        } else if route_ns == ctx.proxy.namespace {
            consumer.push((position, r.clone()));
        }
    }
    let routes = if consumer.is_empty() {
        producer
    } else {
        consumer
    };
    let age = routes.iter().map(|(_, r)| index.age(r)).min()?;
    Some(Attached { routes, age })
}

/// The routes of a service port from the HTTPRoutes / GRPCRoutes attached to it.
pub(crate) fn routes_for_port(
    ctx: &mut Ctx<'_>,
    attached: &Attached,
    port: &RegPort,
) -> (Vec<HttpRoute>, Vec<TcpRoute>) {
    if !(port.protocol.is_http() || port.protocol == Protocol::Auto) {
        return (Vec::new(), Vec::new());
    }
    let chosen = &attached.routes;
    let mut built = Vec::new();
    for (position, r) in chosen {
        let (meta, rules): (_, Vec<AnyRule<'_>>) = match &**r {
            AnyResource::HttpRoute(h) => (
                &h.metadata,
                h.spec.rules.iter().map(AnyRule::Http).collect(),
            ),
            AnyResource::GrpcRoute(g) => (
                &g.metadata,
                g.spec.rules.iter().map(AnyRule::Grpc).collect(),
            ),
            _ => continue,
        };
        let route_ns = meta.namespace.as_deref().unwrap_or("default").to_owned();
        let route_name = meta.name.clone().unwrap_or_default();
        for (rule_index, rule) in rules.iter().enumerate() {
            let matches = match rule {
                AnyRule::Http(rule) => http_matches(rule),
                AnyRule::Grpc(rule) => grpc_matches(rule),
            };
            let action_route = match rule {
                AnyRule::Http(rule) => http_rule(ctx, &route_ns, rule, port),
                AnyRule::Grpc(rule) => grpc_rule(ctx, &route_ns, rule, port),
            };
            for (match_index, m) in matches.into_iter().enumerate() {
                let mut route = action_route.clone();
                route.name = format!("{route_ns}.{route_name}.{rule_index}");
                let key = precedence(&m);
                // ReplacePrefixMatch needs the prefix the route matched.
                if let HttpAction::Forward(f) = &mut route.action
                    && let Some(rw) = &mut f.rewrite
                    && rw.uri.is_some()
                    && !matches!(
                        m.uri,
                        Some(StringMatch::Prefix(_) | StringMatch::SegmentPrefix(_))
                    )
                {
                    rw.uri_regex = Some(RegexRewrite {
                        pattern: "^.*$".into(),
                        rewrite: rw.uri.take().unwrap_or_default(),
                    });
                }
                route.matches = vec![m];
                built.push(Built {
                    key,
                    order: (*position, rule_index, match_index),
                    route,
                });
            }
        }
    }
    built.sort_by(|a, b| a.key.cmp(&b.key).then(a.order.cmp(&b.order)));
    (built.into_iter().map(|b| b.route).collect(), Vec::new())
}

/// Gateway API `PathPrefix` matches whole segments, unlike Istio's textual `prefix`.
fn http_matches(rule: &HttpRouteRule) -> Vec<HttpMatch> {
    if rule.matches.is_empty() {
        return vec![HttpMatch {
            uri: Some(StringMatch::SegmentPrefix("/".into())),
            ..HttpMatch::default()
        }];
    }
    rule.matches
        .iter()
        .map(|m| {
            let uri = match &m.path {
                None => Some(StringMatch::SegmentPrefix("/".into())),
                Some(p) => {
                    let value = p.value.clone().unwrap_or_else(|| "/".into());
                    Some(match p.type_ {
                        Some(PathMatchType::Exact) => StringMatch::Exact(value),
                        Some(PathMatchType::RegularExpression) => StringMatch::Regex(value),
                        _ => StringMatch::SegmentPrefix(value),
                    })
                }
            };
            HttpMatch {
                uri,
                method: m.method.map(|meth| {
                    StringMatch::Exact(
                        serde_json::to_value(meth)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                    )
                }),
                headers: m
                    .headers
                    .iter()
                    .map(|h| HeaderMatch {
                        name: h.name.to_ascii_lowercase(),
                        value: Some(value_match(h)),
                        invert: false,
                    })
                    .collect(),
                query_params: m
                    .query_params
                    .iter()
                    .map(|q| QueryMatch {
                        name: q.name.clone(),
                        value: Some(value_match(q)),
                    })
                    .collect(),
                ..HttpMatch::default()
            }
        })
        .collect()
}

fn grpc_matches(rule: &weft_api::crd::gateway::GrpcRouteRule) -> Vec<HttpMatch> {
    if rule.matches.is_empty() {
        return vec![HttpMatch::default()];
    }
    rule.matches
        .iter()
        .map(|m| {
            let uri = m.method.as_ref().and_then(|mm| {
                let regex = mm.type_ == Some(ValueMatchType::RegularExpression);
                match (mm.service.as_deref(), mm.method.as_deref(), regex) {
                    (None, None, _) => None,
                    (Some(s), Some(me), false) => Some(StringMatch::Exact(format!("/{s}/{me}"))),
                    (Some(s), None, false) => Some(StringMatch::Prefix(format!("/{s}/"))),
                    (None, Some(me), false) => {
                        Some(StringMatch::Regex(format!("/[^/]+/{}", regex_escape(me))))
                    }
                    (s, me, true) => Some(StringMatch::Regex(format!(
                        "/{}/{}",
                        s.unwrap_or("[^/]+"),
                        me.unwrap_or("[^/]+")
                    ))),
                }
            });
            HttpMatch {
                uri,
                headers: m
                    .headers
                    .iter()
                    .map(|h| HeaderMatch {
                        name: h.name.to_ascii_lowercase(),
                        value: Some(value_match(h)),
                        invert: false,
                    })
                    .collect(),
                ..HttpMatch::default()
            }
        })
        .collect()
}

fn mirror_of(
    ctx: &mut Ctx<'_>,
    route_ns: &str,
    f: &weft_api::crd::gateway::HttpRequestMirrorFilter,
    port: &RegPort,
) -> Option<Mirror> {
    let cluster = backend_cluster(ctx, &f.backend_ref, route_ns, port)?;
    let percentage = if let Some(p) = f.percent {
        f64::from(p)
    } else if let Some(fr) = &f.fraction {
        let d = fr.denominator.unwrap_or(100).max(1);
        f64::from(fr.numerator) * 100.0 / f64::from(d)
    } else {
        100.0
    };
    Some(Mirror {
        cluster,
        percentage: percentage.clamp(0.0, 100.0),
    })
}

fn base_route() -> HttpRoute {
    HttpRoute {
        name: String::new(),
        matches: Vec::new(),
        action: HttpAction::DirectResponse(DirectResponse {
            status: 500,
            body: None,
        }),
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        fault: None,
        cors: None,
    }
}

fn http_rule(ctx: &mut Ctx<'_>, route_ns: &str, rule: &HttpRouteRule, port: &RegPort) -> HttpRoute {
    let mut route = base_route();
    let mut rewrite: Option<Rewrite> = None;
    let mut redirect: Option<Redirect> = None;
    let mut mirrors = Vec::new();
    for f in &rule.filters {
        apply_filter(
            ctx,
            route_ns,
            f,
            port,
            &mut route,
            &mut rewrite,
            &mut redirect,
            &mut mirrors,
        );
    }
    if let Some(r) = redirect {
        route.action = HttpAction::Redirect(r);
        return route;
    }
    let mut destinations = Vec::new();
    for b in &rule.backend_refs {
        let Some(cluster) = backend_cluster(ctx, &b.reference, route_ns, port) else {
            continue;
        };
        let mut request_headers = HeaderOps::default();
        let mut response_headers = HeaderOps::default();
        for f in &b.filters {
            match f.type_ {
                HttpRouteFilterType::RequestHeaderModifier => {
                    request_headers = header_filter(f.request_header_modifier.as_ref())
                }
                HttpRouteFilterType::ResponseHeaderModifier => {
                    response_headers = header_filter(f.response_header_modifier.as_ref())
                }
                _ => {}
            }
        }
        destinations.push(WeightedCluster {
            cluster,
            weight: u32::try_from(b.weight.unwrap_or(1)).unwrap_or(0),
            request_headers,
            response_headers,
        });
    }
    destinations.retain(|d| d.weight > 0);
    if destinations.is_empty() {
        return route;
    }
    let mut retries = Some(default_retries());
    if let Some(r) = &rule.retry {
        let attempts = u32::try_from(r.attempts.unwrap_or(2)).unwrap_or(0);
        retries = (attempts > 0).then(|| {
            let mut retry_on: Vec<String> =
                DEFAULT_RETRY_ON.iter().map(|s| (*s).to_owned()).collect();
            if !r.codes.is_empty() && !retry_on.iter().any(|c| c == "retriable-status-codes") {
                retry_on.push("retriable-status-codes".into());
            }
            RetryPolicy {
                attempts,
                per_try_timeout_ms: None,
                retry_on,
                retriable_status_codes: if r.codes.is_empty() {
                    DEFAULT_RETRIABLE_CODES.to_vec()
                } else {
                    r.codes
                        .iter()
                        .filter_map(|c| u16::try_from(*c).ok())
                        .collect()
                },
            }
        });
    }
    let timeouts = rule.timeouts.as_ref();
    if let (Some(r), Some(per_try)) = (
        retries.as_mut(),
        timeouts
            .and_then(|t| t.backend_request.as_deref())
            .and_then(duration_ms),
    ) {
        r.per_try_timeout_ms = Some(per_try).filter(|t| *t > 0);
    }
    route.action = HttpAction::Forward(Forward {
        destinations,
        rewrite,
        timeout_ms: timeouts
            .and_then(|t| t.request.as_deref())
            .and_then(duration_ms)
            .filter(|t| *t > 0),
        retries,
        mirrors,
    });
    route
}

#[expect(
    clippy::too_many_arguments,
    reason = "one filter updates several parts of a route"
)]
fn apply_filter(
    ctx: &mut Ctx<'_>,
    route_ns: &str,
    f: &HttpRouteFilter,
    port: &RegPort,
    route: &mut HttpRoute,
    rewrite: &mut Option<Rewrite>,
    redirect: &mut Option<Redirect>,
    mirrors: &mut Vec<Mirror>,
) {
    match f.type_ {
        HttpRouteFilterType::RequestHeaderModifier => {
            route.request_headers = header_filter(f.request_header_modifier.as_ref())
        }
        HttpRouteFilterType::ResponseHeaderModifier => {
            route.response_headers = header_filter(f.response_header_modifier.as_ref())
        }
        HttpRouteFilterType::UrlRewrite => {
            if let Some(u) = &f.url_rewrite {
                let mut rw = Rewrite {
                    authority: u.hostname.clone(),
                    ..Rewrite::default()
                };
                if let Some(p) = &u.path {
                    match p.type_ {
                        HttpPathModifierType::ReplacePrefixMatch => {
                            rw.uri = p.replace_prefix_match.clone()
                        }
                        HttpPathModifierType::ReplaceFullPath => {
                            rw.uri_regex = Some(RegexRewrite {
                                pattern: "^.*$".into(),
                                rewrite: p.replace_full_path.clone().unwrap_or_else(|| "/".into()),
                            })
                        }
                    }
                }
                *rewrite = Some(rw);
            }
        }
        HttpRouteFilterType::RequestRedirect => {
            if let Some(r) = &f.request_redirect {
                let mut out = Redirect {
                    scheme: r.scheme.clone(),
                    authority: r.hostname.clone(),
                    port: r.port.and_then(|p| u16::try_from(p).ok()),
                    code: r
                        .status_code
                        .and_then(|c| u16::try_from(c).ok())
                        .unwrap_or(302),
                    ..Redirect::default()
                };
                if let Some(p) = &r.path {
                    match p.type_ {
                        HttpPathModifierType::ReplaceFullPath => {
                            out.uri = p.replace_full_path.clone()
                        }
                        HttpPathModifierType::ReplacePrefixMatch => {
                            out.prefix = p.replace_prefix_match.clone()
                        }
                    }
                }
                *redirect = Some(out);
            }
        }
        HttpRouteFilterType::RequestMirror => {
            if let Some(m) = &f.request_mirror
                && let Some(m) = mirror_of(ctx, route_ns, m, port)
            {
                mirrors.push(m);
            }
        }
        HttpRouteFilterType::Cors => {
            if let Some(c) = &f.cors {
                route.cors = Some(CorsPolicy {
                    allow_origins: c
                        .allow_origins
                        .iter()
                        .map(|o| {
                            if o.contains('*') {
                                StringMatch::Regex(regex_escape(o).replace("\\*", ".*"))
                            } else {
                                StringMatch::Exact(o.clone())
                            }
                        })
                        .collect(),
                    allow_methods: c.allow_methods.clone(),
                    allow_headers: c.allow_headers.clone(),
                    expose_headers: c.expose_headers.clone(),
                    max_age_secs: c.max_age.and_then(|a| u64::try_from(a).ok()),
                    allow_credentials: c.allow_credentials,
                });
            }
        }
        HttpRouteFilterType::ExtensionRef => {
            tracing::debug!("HTTPRoute ExtensionRef filters are not supported");
        }
    }
}

fn grpc_rule(
    ctx: &mut Ctx<'_>,
    route_ns: &str,
    rule: &weft_api::crd::gateway::GrpcRouteRule,
    port: &RegPort,
) -> HttpRoute {
    let mut route = base_route();
    let mut mirrors = Vec::new();
    for f in &rule.filters {
        match f.type_ {
            GrpcRouteFilterType::RequestHeaderModifier => {
                route.request_headers = header_filter(f.request_header_modifier.as_ref())
            }
            GrpcRouteFilterType::ResponseHeaderModifier => {
                route.response_headers = header_filter(f.response_header_modifier.as_ref())
            }
            GrpcRouteFilterType::RequestMirror => {
                if let Some(m) = &f.request_mirror
                    && let Some(m) = mirror_of(ctx, route_ns, m, port)
                {
                    mirrors.push(m);
                }
            }
            GrpcRouteFilterType::ExtensionRef => {}
        }
    }
    let mut destinations = Vec::new();
    for b in &rule.backend_refs {
        let Some(cluster) = backend_cluster(ctx, &b.reference, route_ns, port) else {
            continue;
        };
        let mut request_headers = HeaderOps::default();
        let mut response_headers = HeaderOps::default();
        for f in &b.filters {
            match f.type_ {
                GrpcRouteFilterType::RequestHeaderModifier => {
                    request_headers = header_filter(f.request_header_modifier.as_ref())
                }
                GrpcRouteFilterType::ResponseHeaderModifier => {
                    response_headers = header_filter(f.response_header_modifier.as_ref())
                }
                _ => {}
            }
        }
        destinations.push(WeightedCluster {
            cluster,
            weight: u32::try_from(b.weight.unwrap_or(1)).unwrap_or(0),
            request_headers,
            response_headers,
        });
    }
    destinations.retain(|d| d.weight > 0);
    if !destinations.is_empty() {
        route.action = HttpAction::Forward(Forward {
            destinations,
            retries: Some(default_retries()),
            mirrors,
            ..Forward::default()
        });
    }
    route
}

/// The TrafficSplit whose root is the service: the oldest; any other is logged at warn.
pub(crate) fn traffic_split_for(ctx: &Ctx<'_>, svc: &RegService) -> Option<Arc<AnyResource>> {
    let mut splits = ctx.index.traffic_splits.iter().filter(|r| match &***r {
        AnyResource::TrafficSplit(t) => {
            let ns = t.metadata.namespace.as_deref().unwrap_or("default");
            super::resolve_host(&t.spec.service, ns) == svc.hostname
        }
        _ => false,
    });
    let chosen = splits.next()?;
    for other in splits {
        warn!(
            host = %svc.hostname,
            applied = %resource_label(chosen),
            ignored = %resource_label(other),
            "several TrafficSplits for one service: the oldest applies"
        );
    }
    Some(chosen.clone())
}

/// The routes of a service port from an SMI TrafficSplit whose root is the service: the
/// backends on the same port, weighted. `matches` (HTTPRouteGroup) are not translated.
/// `None` when no backend has weight.
pub(crate) fn traffic_split(
    ctx: &mut Ctx<'_>,
    split: &AnyResource,
    port: &RegPort,
) -> Option<(Vec<HttpRoute>, Vec<TcpRoute>)> {
    let AnyResource::TrafficSplit(t) = split else {
        return None;
    };
    let ns = t.metadata.namespace.as_deref().unwrap_or("default");
    let backends = &t.spec.backends;
    let destinations: Vec<WeightedCluster> = backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| WeightedCluster {
            cluster: ctx.cluster_for(&b.service, ns, Some(port.port), None, port.port),
            weight: u32::try_from(b.weight).unwrap_or(u32::MAX),
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        })
        .collect();
    if destinations.is_empty() {
        return None;
    }
    if port.protocol.is_http() || port.protocol == Protocol::Auto {
        let mut http = base_route();
        http.name = "trafficsplit".into();
        http.action = HttpAction::Forward(Forward {
            destinations: destinations.clone(),
            retries: Some(default_retries()),
            ..Forward::default()
        });
        let tcp = if port.protocol == Protocol::Auto {
            vec![TcpRoute {
                matches: Vec::new(),
                destinations,
            }]
        } else {
            Vec::new()
        };
        Some((vec![http], tcp))
    } else {
        Some((
            Vec::new(),
            vec![TcpRoute {
                matches: Vec::new(),
                destinations,
            }],
        ))
    }
}
