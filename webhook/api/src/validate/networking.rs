//! `networking.istio.io` rules, after Istio's `pkg/config/validation` (`ValidateVirtualService`,
//! `ValidateDestinationRule`, `ValidateGateway`, `ValidateServiceEntry`, `ValidateSidecar`,
//! `ValidateWorkloadEntry`).

use std::collections::{BTreeMap, BTreeSet};

use super::Report;
use super::syntax::{
    self, GRPC_STATUSES, RETRY_ON_POLICIES, is_dns1123_label, validate_duration, validate_fqdn,
    validate_header_operation, validate_header_value, validate_ip, validate_ip_subnet,
    validate_label, validate_port, validate_regex, validate_request_header_write,
    validate_wildcard_domain,
};
use crate::crd::WorkloadSelector;
use crate::crd::networking::{
    ClientTlsMode, ClientTlsSettings, ConnectionPoolSettings, CorsPolicy, Destination,
    DestinationRuleSpec, GatewaySpec, H2UpgradePolicy, HeaderOperations, Headers,
    HttpDirectResponse, HttpFaultInjection, HttpMatchRequest, HttpRedirect, HttpRetry, HttpRewrite,
    HttpRoute, HttpRouteDestination, L4MatchAttributes, LoadBalancerSettings, OutboundTrafficMode,
    OutlierDetection, Percent, Port, PortTrafficPolicy, Resolution, RouteDestination,
    ServerTlsMode, ServerTlsSettings, ServiceEntrySpec, SidecarSpec, StringMatch,
    TlsMatchAttributes, TlsProtocol, TlsRoute, TrafficPolicy, VirtualServiceSpec,
    WorkloadEntrySpec, WorkloadLabels,
};

// ---------------------------------------------------------------------------------------------
// Host names as Istio compares them (`host.Name`)
// ---------------------------------------------------------------------------------------------

/// Whether two hosts overlap (`host.Name.Matches`): equal, or one wildcard covers the other.
pub(crate) fn hosts_overlap(a: &str, b: &str) -> bool {
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(sa), Some(sb)) => sa.ends_with(sb) || sb.ends_with(sa),
        (Some(sa), None) => b.ends_with(sa),
        (None, Some(sb)) => a.ends_with(sb),
        (None, None) => a == b,
    }
}

/// Whether every name `a` covers is covered by `b` (`host.Name.SubsetOf`).
fn host_subset_of(a: &str, b: &str) -> bool {
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(sa), Some(sb)) => sa.ends_with(sb),
        (Some(_), None) => false,
        (None, Some(sb)) => a.ends_with(sb),
        (None, None) => a == b,
    }
}

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

fn labels(map: &BTreeMap<String, String>, path: &str, report: &mut Report) {
    for (key, value) in map {
        report.check(format!("{path}[{key}]"), validate_label(key, value));
    }
}

/// `type.v1beta1.WorkloadSelector` (`matchLabels`).
pub(crate) fn policy_selector(
    selector: Option<&WorkloadSelector>,
    path: &str,
    report: &mut Report,
) {
    let Some(selector) = selector else { return };
    let labels = selector.match_labels.clone().unwrap_or_default();
    selector_labels(&labels, &format!("{path}.matchLabels"), report);
    if labels.is_empty() {
        report.warning(path, "workload selector specified without labels");
    }
}

fn selector_labels(labels: &BTreeMap<String, String>, path: &str, report: &mut Report) {
    for (key, value) in labels {
        let field = format!("{path}[{key}]");
        if key.is_empty() {
            report.error(&field, "empty key is not supported in selector");
        }
        if key.contains('*') || value.contains('*') {
            report.error(
                &field,
                format!("wildcard is not supported in selector: \"{key}={value}\""),
            );
        } else if !key.is_empty() {
            report.check(&field, validate_label(key, value));
        }
    }
}

/// `networking.WorkloadSelector` (`labels`) of Sidecar and ServiceEntry.
fn workload_labels(selector: Option<&WorkloadLabels>, path: &str, what: &str, report: &mut Report) {
    let Some(selector) = selector else { return };
    selector_labels(&selector.labels, &format!("{path}.labels"), report);
    if selector.labels.is_empty() {
        report.warning(
            path,
            format!("{what}: workload selector specified without labels, will be applied to all services in namespace"),
        );
    }
}

fn export_to(
    namespace: Option<&str>,
    values: &[String],
    is_service_entry: bool,
    has_workload_selector: bool,
    report: &mut Report,
) {
    if values.is_empty() {
        return;
    }
    let namespace = namespace.unwrap_or("default");
    let path = "spec.exportTo";
    let mut seen = BTreeSet::new();
    for (i, value) in values.iter().enumerate() {
        let field = format!("{path}[{i}]");
        let key = if value == "." {
            namespace
        } else {
            value.as_str()
        };
        if !seen.insert(key.to_string()) {
            if key != value {
                report.error(
                    &field,
                    format!("duplicate entries in exportTo: . and current namespace {namespace}"),
                );
            } else {
                report.error(
                    &field,
                    format!("duplicate entries in exportTo for entry {value}"),
                );
            }
            continue;
        }
        let valid = key == "*" || (is_service_entry && key == "~") || is_dns1123_label(key);
        if !valid {
            report.error(
                &field,
                format!("invalid exportTo value {value:?}: must be '.', '*' or a namespace"),
            );
        }
    }
    if has_workload_selector {
        if !seen.contains(namespace) {
            report.error(path, "destination rule with workload selector cannot have exportTo beyond current namespace");
        } else if seen.len() > 1 {
            report.error(
                path,
                "destination rule with workload selector cannot have multiple entries in exportTo",
            );
        }
    }
    if seen.contains("*") && values.len() > 1 {
        report.error(
            path,
            "cannot have both public (*) and non-public exportTo values for a resource",
        );
    }
    if seen.contains("~") && values.len() > 1 {
        report.error(
            path,
            "cannot export service entry to no one (~) and someone",
        );
    }
}

fn percent(p: Option<&Percent>, path: &str, report: &mut Report) {
    let Some(value) = p.and_then(|p| p.value) else {
        return;
    };
    if !(0.0..=100.0).contains(&value) || (value > 0.0 && value < 0.0001) {
        report.error(
            format!("{path}.value"),
            format!("percentage {value} is neither 0.0, nor in range [0.0001, 100.0]"),
        );
    }
}

fn duration(value: Option<&String>, path: &str, report: &mut Report) {
    if let Some(value) = value {
        report.check(path, validate_duration(value));
    }
}

fn destination(dest: &Destination, path: &str, report: &mut Report) {
    if dest.host == "*" {
        report.error(format!("{path}.host"), "invalid destination host *");
    } else {
        report.check(format!("{path}.host"), validate_wildcard_domain(&dest.host));
    }
    if let Some(subset) = &dest.subset
        && !is_dns1123_label(subset)
    {
        report.error(
            format!("{path}.subset"),
            format!("subset name is invalid: {subset:?}"),
        );
    }
    if let Some(port) = &dest.port {
        report.check(
            format!("{path}.port.number"),
            validate_port(i64::from(port.number.unwrap_or(0))),
        );
    }
}

fn gateway_names(names: &[String], path: &str, report: &mut Report) {
    for (i, name) in names.iter().enumerate() {
        let field = format!("{path}[{i}]");
        match name.split_once('/') {
            None => {
                if name.contains('.') {
                    let mut parts = name.split('.');
                    let gw = parts.next().unwrap_or_default();
                    let ns = parts.next().unwrap_or_default();
                    report.warning(
                        &field,
                        format!("using legacy gatewayName format {name:?}; prefer the <namespace>/<name> format: \"{ns}/{gw}\""),
                    );
                }
                report.check(&field, validate_fqdn(name));
            }
            Some((namespace, gateway)) => {
                if namespace.is_empty() || gateway.is_empty() {
                    report.error(&field, "config namespace and gateway name cannot be empty");
                }
                if !is_dns1123_label(namespace) {
                    report.error(
                        &field,
                        format!("invalid value for namespace: {namespace:?}"),
                    );
                }
                if !is_dns1123_label(gateway) {
                    report.error(
                        &field,
                        format!("invalid value for gateway name: {gateway:?}"),
                    );
                }
            }
        }
    }
}

fn string_match(m: &StringMatch, path: &str, allow_empty_prefix: bool, report: &mut Report) {
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
        .iter()
        .filter(|s| **s)
        .count();
    if set > 1 {
        report.error(path, "only one of exact, prefix or regex may be set");
    }
    if let Some(prefix) = &m.prefix
        && prefix.is_empty()
        && !allow_empty_prefix
    {
        report.error(
            format!("{path}.prefix"),
            "prefix string match should not be empty",
        );
    }
    if let Some(regex) = &m.regex {
        if regex.is_empty() {
            report.error(
                format!("{path}.regex"),
                "regex string match should not be empty",
            );
        } else {
            report.check(format!("{path}.regex"), validate_regex(regex));
        }
    }
}

fn header_operations(
    ops: Option<&HeaderOperations>,
    path: &str,
    request: bool,
    report: &mut Report,
) {
    let Some(ops) = ops else { return };
    for (kind, map) in [("set", &ops.set), ("add", &ops.add)] {
        for (name, value) in map {
            let field = format!("{path}.{kind}[{name}]");
            if request {
                report.check(&field, validate_request_header_write(name));
            } else {
                report.check(&field, validate_header_operation(name));
            }
            report.check(&field, validate_header_value(value));
        }
    }
    for (i, name) in ops.remove.iter().enumerate() {
        report.check(
            format!("{path}.remove[{i}]"),
            validate_header_operation(name),
        );
    }
}

fn headers(h: Option<&Headers>, path: &str, report: &mut Report) {
    let Some(h) = h else { return };
    header_operations(h.request.as_ref(), &format!("{path}.request"), true, report);
    header_operations(
        h.response.as_ref(),
        &format!("{path}.response"),
        false,
        report,
    );
}

// ---------------------------------------------------------------------------------------------
// VirtualService
// ---------------------------------------------------------------------------------------------

/// Validates a VirtualService spec.
pub(crate) fn virtual_service(
    spec: &VirtualServiceSpec,
    namespace: Option<&str>,
    report: &mut Report,
) {
    let delegate = spec.hosts.is_empty();
    if delegate {
        if !spec.gateways.is_empty() {
            report.error(
                "spec.gateways",
                "delegate virtual service must have no gateways specified",
            );
        }
        if !spec.tls.is_empty() {
            report.error(
                "spec.tls",
                "delegate virtual service must have no tls route specified",
            );
        }
        if !spec.tcp.is_empty() {
            report.error(
                "spec.tcp",
                "delegate virtual service must have no tcp route specified",
            );
        }
    }
    gateway_names(&spec.gateways, "spec.gateways", report);
    let applies_to_gateway =
        !spec.gateways.is_empty() && !spec.gateways.iter().any(|g| g == "mesh");
    let applies_to_mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");

    if !applies_to_gateway {
        for (i, http) in spec.http.iter().enumerate() {
            for (j, m) in http.r#match.iter().enumerate() {
                for (kind, map) in [
                    ("headers", &m.headers),
                    ("withoutHeaders", &m.without_headers),
                ] {
                    for key in map.keys().filter(|k| syntax::is_jwt_claim_route(k)) {
                        report.error(
                            format!("spec.http[{i}].match[{j}].{kind}[{key}]"),
                            "JWT claim based routing is only supported for gateways",
                        );
                    }
                }
            }
        }
    }

    let mut all_hosts_valid = true;
    for (i, host) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        match validate_wildcard_domain(host) {
            Err(error) if validate_ip(host).is_err() => {
                report.error(&field, error);
                all_hosts_valid = false;
            }
            Ok(()) if applies_to_mesh && host == "*" => {
                report.error(
                    &field,
                    "wildcard host * is not allowed for virtual services bound to the mesh gateway",
                );
                all_hosts_valid = false;
            }
            _ => {}
        }
    }
    if all_hosts_valid {
        for (i, a) in spec.hosts.iter().enumerate() {
            for b in &spec.hosts[i + 1..] {
                if hosts_overlap(a, b) {
                    report.error(
                        format!("spec.hosts[{i}]"),
                        format!("duplicate hosts in virtual service: {a} & {b}"),
                    );
                }
            }
        }
    }

    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        report.error(
            "spec.http",
            "http, tcp or tls must be provided in virtual service",
        );
    }
    for (i, http) in spec.http.iter().enumerate() {
        http_route(http, &format!("spec.http[{i}]"), delegate, report);
    }
    for (i, tls) in spec.tls.iter().enumerate() {
        tls_route(tls, spec, &format!("spec.tls[{i}]"), report);
    }
    for (i, tcp) in spec.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{i}]");
        for (j, m) in tcp.r#match.iter().enumerate() {
            l4_match(m, &format!("{path}.match[{j}]"), report);
        }
        if tcp.route.is_empty() {
            report.error(format!("{path}.route"), "TCP route is required");
        }
        route_destinations(&tcp.route, &format!("{path}.route"), report);
    }
    export_to(namespace, &spec.export_to, false, false, report);
    unreachable_rules(spec, report);
}

fn http_route(http: &HttpRoute, path: &str, in_delegate: bool, report: &mut Report) {
    let root = !in_delegate && http.delegate.is_some();
    if root {
        if http.redirect.is_some() {
            report.error(
                format!("{path}.redirect"),
                "root HTTP route must not specify redirect",
            );
        }
        if !http.route.is_empty() {
            report.error(
                format!("{path}.route"),
                "root HTTP route must not specify route",
            );
        }
    } else {
        if in_delegate && http.delegate.is_some() {
            report.error(
                format!("{path}.delegate"),
                "delegate HTTP route cannot contain delegate",
            );
        }
        if http.redirect.is_some() {
            if !http.route.is_empty() {
                report.error(
                    format!("{path}.redirect"),
                    "HTTP route cannot contain both route and redirect",
                );
            }
            if http.fault.is_some() {
                report.error(
                    format!("{path}.redirect"),
                    "HTTP route cannot contain both fault and redirect",
                );
            }
            if http.rewrite.is_some() {
                report.error(
                    format!("{path}.redirect"),
                    "HTTP route rule cannot contain both rewrite and redirect",
                );
            }
            if http.direct_response.is_some() {
                report.error(
                    format!("{path}.redirect"),
                    "HTTP route rule cannot contain both direct_response and redirect",
                );
            }
        } else if http.direct_response.is_some() {
            if !http.route.is_empty() {
                report.error(
                    format!("{path}.directResponse"),
                    "HTTP route cannot contain both route and direct_response",
                );
            }
            if http.fault.is_some() {
                report.error(
                    format!("{path}.directResponse"),
                    "HTTP route cannot contain both fault and direct_response",
                );
            }
            if http.rewrite.is_some() {
                report.error(
                    format!("{path}.directResponse"),
                    "HTTP route rule cannot contain both rewrite and direct_response",
                );
            }
        } else if http.route.is_empty() {
            report.error(
                format!("{path}.route"),
                "HTTP route, redirect or direct_response is required",
            );
        }
    }
    if http.mirror.is_some() && !http.mirrors.is_empty() {
        report.error(
            format!("{path}.mirrors"),
            "HTTP route cannot contain both mirror and mirrors",
        );
    }

    for (j, m) in http.r#match.iter().enumerate() {
        http_match(m, &format!("{path}.match[{j}]"), report);
    }
    headers(http.headers.as_ref(), &format!("{path}.headers"), report);
    if let Some(cors) = &http.cors_policy {
        cors_policy(cors, &format!("{path}.corsPolicy"), report);
    }
    if let Some(fault) = &http.fault {
        fault_injection(fault, &format!("{path}.fault"), report);
    }
    for (field, value) in [
        ("mirrorPercent", http.mirror_percent),
        ("mirror_percent", http.mirror_percent_snake),
    ] {
        if let Some(value) = value {
            if value > 100 {
                report.error(
                    format!("{path}.{field}"),
                    format!("mirror_percent must have a max value of 100 (it has {value})"),
                );
            }
            report.warning(
                format!("{path}.{field}"),
                "using deprecated setting \"mirrorPercent\", use \"mirrorPercentage\" instead",
            );
        }
    }
    if let Some(value) = http.mirror_percentage.as_ref().and_then(|p| p.value)
        && !(0.0..=100.0).contains(&value)
    {
        report.error(
            format!("{path}.mirrorPercentage.value"),
            format!("mirror percentage must be in 0..=100 (it has {value})"),
        );
    }
    if let Some(mirror) = &http.mirror {
        destination(mirror, &format!("{path}.mirror"), report);
    }
    for (i, mirror) in http.mirrors.iter().enumerate() {
        let field = format!("{path}.mirrors[{i}]");
        destination(&mirror.destination, &format!("{field}.destination"), report);
        if let Some(value) = mirror.percentage.as_ref().and_then(|p| p.value)
            && !(0.0..=100.0).contains(&value)
        {
            report.error(
                format!("{field}.percentage.value"),
                format!("mirror percentage must be in 0..=100 (it has {value})"),
            );
        }
    }
    if let Some(redirect) = &http.redirect {
        http_redirect(redirect, &format!("{path}.redirect"), report);
    }
    if let Some(direct) = &http.direct_response {
        direct_response(direct, &format!("{path}.directResponse"), report);
    }
    if let Some(retries) = &http.retries {
        http_retry(retries, &format!("{path}.retries"), report);
    }
    if let Some(rewrite) = &http.rewrite {
        http_rewrite(rewrite, &format!("{path}.rewrite"), report);
    }
    authority_rewrite(http, path, report);
    http_route_destinations(&http.route, &format!("{path}.route"), report);
    duration(http.timeout.as_ref(), &format!("{path}.timeout"), report);
}

fn http_match(m: &HttpMatchRequest, path: &str, report: &mut Report) {
    for (name, value) in &m.headers {
        let field = format!("{path}.headers[{name}]");
        report.check(&field, syntax::validate_match_header_name(name));
        string_match(value, &field, false, report);
    }
    for (name, value) in &m.without_headers {
        let field = format!("{path}.withoutHeaders[{name}]");
        report.check(&field, syntax::validate_match_header_name(name));
        // `regex: "*"` is not RE2: it means "present".
        if value.regex.as_deref() != Some("*") {
            string_match(value, &field, false, report);
        }
    }
    if let Some(uri) = &m.uri {
        // Envoy accepts an empty path prefix.
        string_match(uri, &format!("{path}.uri"), true, report);
    }
    for (field, value) in [
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(value) = value {
            string_match(value, &format!("{path}.{field}"), false, report);
        }
    }
    for (name, value) in &m.query_params {
        string_match(value, &format!("{path}.queryParams[{name}]"), false, report);
    }
    if let Some(port) = m.port.filter(|p| *p != 0) {
        report.check(format!("{path}.port"), validate_port(i64::from(port)));
    }
    labels(&m.source_labels, &format!("{path}.sourceLabels"), report);
    gateway_names(&m.gateways, &format!("{path}.gateways"), report);
    if let Some(ns) = m.source_namespace.as_deref().filter(|ns| !ns.is_empty())
        && !is_dns1123_label(ns)
    {
        report.error(
            format!("{path}.sourceNamespace"),
            format!("sourceNamespace match {ns} is invalid"),
        );
    }
}

const CORS_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE", "*",
];

fn cors_policy(cors: &CorsPolicy, path: &str, report: &mut Report) {
    for (i, origin) in cors.allow_origins.iter().enumerate() {
        let field = format!("{path}.allowOrigins[{i}]");
        let value = origin
            .exact
            .as_ref()
            .or(origin.prefix.as_ref())
            .or(origin.regex.as_ref());
        if value.is_none_or(|v| v.is_empty()) {
            report.error(
                &field,
                "'' is not a valid match type for CORS allow origins",
            );
        }
        string_match(origin, &field, false, report);
    }
    for (i, method) in cors.allow_methods.iter().enumerate() {
        if !CORS_METHODS.contains(&method.as_str()) {
            report.error(
                format!("{path}.allowMethods[{i}]"),
                format!("{method:?} is not a supported HTTP method"),
            );
        }
    }
    for (field, names) in [
        ("allowHeaders", &cors.allow_headers),
        ("exposeHeaders", &cors.expose_headers),
    ] {
        for (i, name) in names.iter().enumerate() {
            if name != "*" && !syntax::is_http_token(name) {
                report.error(
                    format!("{path}.{field}[{i}]"),
                    format!("header name {name:?} is not a valid header name"),
                );
            }
        }
    }
    if let Some(max_age) = &cors.max_age {
        match validate_duration(max_age) {
            Ok(d) if d.subsec_nanos() != 0 => {
                report.error(
                    format!("{path}.maxAge"),
                    "max_age duration is accurate only to seconds precision",
                );
            }
            Ok(_) => {}
            Err(error) => report.error(format!("{path}.maxAge"), error),
        }
    }
}

fn fault_injection(fault: &HttpFaultInjection, path: &str, report: &mut Report) {
    if fault.abort.is_none() && fault.delay.is_none() {
        report.error(
            path,
            "HTTP fault injection must have an abort and/or a delay",
        );
    }
    if let Some(abort) = &fault.abort {
        let path = format!("{path}.abort");
        percent(
            abort.percentage.as_ref(),
            &format!("{path}.percentage"),
            report,
        );
        let set = [
            abort.http_status.is_some(),
            abort.grpc_status.is_some(),
            abort.http2_error.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if set > 1 {
            report.error(
                &path,
                "only one of httpStatus, grpcStatus or http2Error may be set",
            );
        }
        if let Some(status) = abort.http_status
            && !(200..=599).contains(&status)
        {
            report.error(
                format!("{path}.httpStatus"),
                format!("HTTP status {status} is not in range 200-599"),
            );
        }
        if let Some(status) = &abort.grpc_status
            && !GRPC_STATUSES.contains(&status.as_str())
        {
            report.error(
                    format!("{path}.grpcStatus"),
                    format!("gRPC status {status:?} is not supported, for example 'NOT_FOUND' or 'UNAVAILABLE'"),
                );
        }
        if abort.http2_error.is_some() {
            report.error(
                format!("{path}.http2Error"),
                "HTTP/2 abort fault injection not supported yet",
            );
        }
        if set == 0 {
            report.warning(&path, "abort configured, but error type not set");
        }
    }
    if let Some(delay) = &fault.delay {
        let path = format!("{path}.delay");
        percent(
            delay.percentage.as_ref(),
            &format!("{path}.percentage"),
            report,
        );
        if let Some(p) = delay.percent
            && !(0..=100).contains(&p)
        {
            report.error(
                format!("{path}.percent"),
                format!("percentage {p} is not in range 0..100"),
            );
        }
        duration(
            delay.fixed_delay.as_ref(),
            &format!("{path}.fixedDelay"),
            report,
        );
        if let Some(exp) = &delay.exponential_delay {
            report.check(format!("{path}.exponentialDelay"), validate_duration(exp));
            report.error(
                format!("{path}.exponentialDelay"),
                "exponentialDelay not supported yet",
            );
        }
        if delay.fixed_delay.is_none() && delay.exponential_delay.is_none() {
            report.error(
                format!("{path}.fixedDelay"),
                "Required value: a delay needs fixedDelay",
            );
        }
    }
}

fn http_redirect(redirect: &HttpRedirect, path: &str, report: &mut Report) {
    if redirect.uri.is_none()
        && redirect.authority.is_none()
        && redirect.port.is_none()
        && redirect.derive_port.is_none()
        && redirect.scheme.is_none()
        && redirect.prefix_rewrite.is_none()
    {
        report.error(
            path,
            "redirect must specify URI, authority, scheme, or port",
        );
    }
    if redirect.port.is_some() && redirect.derive_port.is_some() {
        report.error(
            format!("{path}.derivePort"),
            "only one of port or derivePort may be set",
        );
    }
    if redirect.uri.is_some() && redirect.prefix_rewrite.is_some() {
        report.error(
            format!("{path}.prefixRewrite"),
            "only one of uri or prefixRewrite may be set",
        );
    }
    if let Some(code) = redirect.redirect_code.filter(|c| *c != 0)
        && !(300..=399).contains(&code)
    {
        report.error(
            format!("{path}.redirectCode"),
            format!("{code} is not a valid redirect code, must be 3xx"),
        );
    }
    if let Some(scheme) = &redirect.scheme
        && scheme != "http"
        && scheme != "https"
    {
        report.error(
            format!("{path}.scheme"),
            "invalid redirect scheme, must be \"http\" or \"https\"",
        );
    }
    if let Some(port) = redirect.port.filter(|p| *p > 0) {
        report.check(format!("{path}.port"), validate_port(i64::from(port)));
    }
}

fn direct_response(direct: &HttpDirectResponse, path: &str, report: &mut Report) {
    if let Some(body) = &direct.body {
        if body.string.is_some() && body.bytes.is_some() {
            report.error(
                format!("{path}.body"),
                "only one of string or bytes may be set",
            );
        }
        let size = body
            .string
            .as_ref()
            .or(body.bytes.as_ref())
            .map_or(0, String::len);
        if size > 1024 * 1024 {
            report.error(format!("{path}.body"), "large direct_responses may impact control plane performance, must be less than 1MB");
        } else if size > 100 * 1024 {
            report.warning(
                format!("{path}.body"),
                "large direct_responses may impact control plane performance",
            );
        }
    }
    if !(200..=599).contains(&direct.status) {
        report.error(
            format!("{path}.status"),
            format!("HTTP status {} is not in range 200-599", direct.status),
        );
    }
}

fn http_retry(retries: &HttpRetry, path: &str, report: &mut Report) {
    let attempts = retries.attempts.unwrap_or(0);
    if attempts < 0 {
        report.error(format!("{path}.attempts"), "attempts cannot be negative");
    }
    if attempts == 0
        && (retries.per_try_timeout.is_some()
            || retries.retry_on.is_some()
            || retries.retry_remote_localities.is_some())
    {
        report.error(
            format!("{path}.attempts"),
            "http retry policy configured when attempts are set to 0 (disabled)",
        );
    }
    duration(
        retries.per_try_timeout.as_ref(),
        &format!("{path}.perTryTimeout"),
        report,
    );
    duration(retries.backoff.as_ref(), &format!("{path}.backoff"), report);
    if let Some(retry_on) = retries.retry_on.as_deref().filter(|r| !r.is_empty()) {
        for policy in retry_on.split(',').map(str::trim) {
            let status = policy
                .parse::<u16>()
                .is_ok_and(|code| (100..=599).contains(&code));
            if !status && !RETRY_ON_POLICIES.contains(&policy) {
                report.error(
                    format!("{path}.retryOn"),
                    format!("{policy:?} is not a valid retryOn policy"),
                );
            }
        }
    }
}

fn http_rewrite(rewrite: &HttpRewrite, path: &str, report: &mut Report) {
    if rewrite.uri.is_some() && rewrite.uri_regex_rewrite.is_some() {
        report.error(
            path,
            "rewrite may only contain one of URI or UriRegexRewrite",
        );
    }
    if rewrite.uri.is_none() && rewrite.uri_regex_rewrite.is_none() && rewrite.authority.is_none() {
        report.error(
            path,
            "rewrite must specify at least one of URI, UriRegexRewrite, or authority",
        );
    }
    if let Some(regex) = &rewrite.uri_regex_rewrite {
        let field = format!("{path}.uriRegexRewrite");
        match (&regex.r#match, &regex.rewrite) {
            (Some(m), Some(r)) if !m.is_empty() && !r.is_empty() => {
                report.check(format!("{field}.match"), validate_regex(m));
            }
            _ => report.error(
                field,
                "UriRegexRewrite requires both Rewrite and Match fields to be specified",
            ),
        }
    }
}

fn authority_rewrite(http: &HttpRoute, path: &str, report: &mut Report) {
    let mut current = http.rewrite.as_ref().and_then(|r| r.authority.clone());
    if let Some(request) = http.headers.as_ref().and_then(|h| h.request.as_ref()) {
        for (kind, map) in [("set", &request.set), ("add", &request.add)] {
            for (name, value) in map.iter().filter(|(name, _)| syntax::is_authority(name)) {
                if let Some(previous) = &current {
                    report.error(
                        format!("{path}.headers.request.{kind}[{name}]"),
                        format!("authority header cannot be set multiple times: have {previous:?}, attempting to set {value:?}"),
                    );
                }
                current = Some(value.clone());
            }
        }
    }
}

fn weights(weights: &[Option<i32>], path: &str, report: &mut Report) {
    let mut total: i64 = 0;
    for (i, weight) in weights.iter().enumerate() {
        let weight = weight.unwrap_or(0);
        if weight < 0 {
            report.error(
                format!("{path}[{i}].weight"),
                format!("weight {weight} < 0"),
            );
        } else if weight > 100 {
            report.warning(
                format!("{path}[{i}].weight"),
                format!("weight {weight} > 100: weights are shares of 100"),
            );
        }
        total += i64::from(weight);
    }
    if weights.len() > 1 {
        if total == 0 {
            report.error(path, "total destination weight = 0");
        } else if total != 100 && weights.iter().all(|w| w.unwrap_or(0) >= 0) {
            report.warning(path, format!("destination weights sum to {total}, not 100; they are applied as relative shares"));
        }
    }
}

fn http_route_destinations(route: &[HttpRouteDestination], path: &str, report: &mut Report) {
    for (i, r) in route.iter().enumerate() {
        let field = format!("{path}[{i}]");
        headers(r.headers.as_ref(), &format!("{field}.headers"), report);
        destination(&r.destination, &format!("{field}.destination"), report);
    }
    weights(
        &route.iter().map(|r| r.weight).collect::<Vec<_>>(),
        path,
        report,
    );
}

fn route_destinations(route: &[RouteDestination], path: &str, report: &mut Report) {
    for (i, r) in route.iter().enumerate() {
        destination(&r.destination, &format!("{path}[{i}].destination"), report);
    }
    weights(
        &route.iter().map(|r| r.weight).collect::<Vec<_>>(),
        path,
        report,
    );
}

fn l4_match(m: &L4MatchAttributes, path: &str, report: &mut Report) {
    for (i, subnet) in m.destination_subnets.iter().enumerate() {
        report.check(
            format!("{path}.destinationSubnets[{i}]"),
            validate_ip_subnet(subnet),
        );
    }
    if let Some(port) = m.port.filter(|p| *p != 0) {
        report.check(format!("{path}.port"), validate_port(i64::from(port)));
    }
    labels(&m.source_labels, &format!("{path}.sourceLabels"), report);
    gateway_names(&m.gateways, &format!("{path}.gateways"), report);
}

fn tls_route(tls: &TlsRoute, vs: &VirtualServiceSpec, path: &str, report: &mut Report) {
    if tls.r#match.is_empty() {
        report.error(
            format!("{path}.match"),
            "TLS route must have at least one match condition",
        );
    }
    for (j, m) in tls.r#match.iter().enumerate() {
        tls_match(m, vs, &format!("{path}.match[{j}]"), report);
    }
    if tls.route.is_empty() {
        report.error(format!("{path}.route"), "TLS route is required");
    }
    route_destinations(&tls.route, &format!("{path}.route"), report);
}

fn tls_match(m: &TlsMatchAttributes, vs: &VirtualServiceSpec, path: &str, report: &mut Report) {
    if m.sni_hosts.is_empty() {
        report.error(
            format!("{path}.sniHosts"),
            "TLS match must have at least one SNI host",
        );
    }
    for (i, sni) in m.sni_hosts.iter().enumerate() {
        let field = format!("{path}.sniHosts[{i}]");
        if let Err(error) = validate_wildcard_domain(sni) {
            if validate_ip(sni).is_ok() {
                report.warning(&field, format!("using an IP address ({sni:?}) goes against SNI spec and most clients do not support this"));
            } else {
                report.error(&field, error);
            }
            continue;
        }
        if !vs.hosts.iter().any(|h| host_subset_of(sni, h)) {
            report.error(
                &field,
                format!("SNI host {sni:?} is not a compatible subset of any of the virtual service hosts: [{}]", vs.hosts.join(", ")),
            );
        }
    }
    for (i, subnet) in m.destination_subnets.iter().enumerate() {
        report.check(
            format!("{path}.destinationSubnets[{i}]"),
            validate_ip_subnet(subnet),
        );
    }
    if let Some(port) = m.port.filter(|p| *p != 0) {
        report.check(format!("{path}.port"), validate_port(i64::from(port)));
    }
    labels(&m.source_labels, &format!("{path}.sourceLabels"), report);
    gateway_names(&m.gateways, &format!("{path}.gateways"), report);
}

/// Istio's unreachable-rule analysis: a rule after a catch-all, or whose matches all repeat
/// earlier ones, is never used.
fn unreachable_rules(spec: &VirtualServiceSpec, report: &mut Report) {
    fn analyse<M: serde::Serialize>(rules: &[&[M]], kind: &str, report: &mut Report) {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut catch_all: Option<usize> = None;
        for (i, matches) in rules.iter().enumerate() {
            let field = format!("spec.{kind}[{i}]");
            if let Some(first) = catch_all {
                report.warning(
                    &field,
                    format!(
                        "rule not used: rule {first} has no match and catches everything before it"
                    ),
                );
                continue;
            }
            if matches.is_empty() {
                catch_all = Some(i);
                continue;
            }
            let mut duplicates = 0;
            for (j, m) in matches.iter().enumerate() {
                let mut key = serde_json::to_value(m).unwrap_or_default();
                if let Some(map) = key.as_object_mut() {
                    map.remove("name");
                }
                let key = key.to_string();
                if let Some(earlier) = seen.get(&key) {
                    duplicates += 1;
                    report.warning(
                        format!("{field}.match[{j}]"),
                        format!("match not used: duplicate of a match in rule {earlier}"),
                    );
                } else {
                    seen.insert(key, i);
                }
            }
            if duplicates == matches.len() {
                report.warning(&field, "rule not used: all matches used by prior rules");
            }
        }
    }
    analyse(
        &spec
            .http
            .iter()
            .map(|r| r.r#match.as_slice())
            .collect::<Vec<_>>(),
        "http",
        report,
    );
    analyse(
        &spec
            .tcp
            .iter()
            .map(|r| r.r#match.as_slice())
            .collect::<Vec<_>>(),
        "tcp",
        report,
    );
    analyse(
        &spec
            .tls
            .iter()
            .map(|r| r.r#match.as_slice())
            .collect::<Vec<_>>(),
        "tls",
        report,
    );
}

// ---------------------------------------------------------------------------------------------
// DestinationRule
// ---------------------------------------------------------------------------------------------

/// Validates a DestinationRule spec.
pub(crate) fn destination_rule(
    spec: &DestinationRuleSpec,
    namespace: Option<&str>,
    report: &mut Report,
) {
    report.check("spec.host", validate_wildcard_domain(&spec.host));
    if let Some(policy) = &spec.traffic_policy {
        traffic_policy(policy, "spec.trafficPolicy", report);
    }
    let mut names = BTreeSet::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if !names.insert(subset.name.as_str()) {
            report.error(
                format!("{path}.name"),
                format!("duplicate subset names: {}", subset.name),
            );
        }
        if subset.name.is_empty() {
            report.error(format!("{path}.name"), "subset name cannot be empty");
        } else if !is_dns1123_label(&subset.name) {
            report.error(
                format!("{path}.name"),
                format!("subset name is invalid: {}", subset.name),
            );
        }
        labels(&subset.labels, &format!("{path}.labels"), report);
        if let Some(policy) = &subset.traffic_policy {
            traffic_policy(policy, &format!("{path}.trafficPolicy"), report);
        }
    }
    export_to(
        namespace,
        &spec.export_to,
        false,
        spec.workload_selector.is_some(),
        report,
    );
    policy_selector(
        spec.workload_selector.as_ref(),
        "spec.workloadSelector",
        report,
    );
}

fn traffic_policy(policy: &TrafficPolicy, path: &str, report: &mut Report) {
    if policy.outlier_detection.is_none()
        && policy.connection_pool.is_none()
        && policy.load_balancer.is_none()
        && policy.tls.is_none()
        && policy.port_level_settings.is_empty()
        && policy.tunnel.is_none()
        && policy.proxy_protocol.is_none()
        && policy.retry_budget.is_none()
    {
        report.error(path, "traffic policy must have at least one field");
        return;
    }
    if policy.tunnel.is_some() && policy.proxy_protocol.is_some() {
        report.error(path, "tunnel and proxyProtocol must not be set together");
        return;
    }
    if let Some(outlier) = &policy.outlier_detection {
        outlier_detection(outlier, &format!("{path}.outlierDetection"), report);
    }
    if let Some(pool) = &policy.connection_pool {
        connection_pool(pool, &format!("{path}.connectionPool"), report);
    }
    if let Some(lb) = &policy.load_balancer {
        load_balancer(
            lb,
            policy.outlier_detection.as_ref(),
            &format!("{path}.loadBalancer"),
            report,
        );
    }
    if let Some(tls) = &policy.tls {
        client_tls(tls, &format!("{path}.tls"), report);
    }
    for (i, port_policy) in policy.port_level_settings.iter().enumerate() {
        port_traffic_policy(
            port_policy,
            &format!("{path}.portLevelSettings[{i}]"),
            report,
        );
    }
    if let Some(tunnel) = &policy.tunnel {
        let field = format!("{path}.tunnel");
        if let Some(protocol) = &tunnel.protocol
            && protocol != "CONNECT"
            && protocol != "POST"
        {
            report.error(
                format!("{field}.protocol"),
                "tunnel protocol must be \"CONNECT\" or \"POST\"",
            );
        }
        if validate_fqdn(&tunnel.target_host).is_err() && validate_ip(&tunnel.target_host).is_err()
        {
            report.error(
                format!("{field}.targetHost"),
                "tunnel target host must be valid FQDN or IP address",
            );
        }
        report.check(
            format!("{field}.targetPort"),
            validate_port(i64::from(tunnel.target_port)),
        );
    }
    if let Some(budget) = &policy.retry_budget {
        duration(
            budget.budget_interval.as_ref(),
            &format!("{path}.retryBudget.budgetInterval"),
            report,
        );
        if let Some(p) = budget.percent
            && !(0.0..=100.0).contains(&p)
        {
            report.error(
                format!("{path}.retryBudget.percent"),
                format!("percent {p} is not in range 0..100"),
            );
        }
    }
}

fn port_traffic_policy(policy: &PortTrafficPolicy, path: &str, report: &mut Report) {
    match &policy.port {
        None => report.error(
            format!("{path}.port"),
            "portTrafficPolicy must have valid port",
        ),
        Some(port) => report.check(
            format!("{path}.port.number"),
            validate_port(i64::from(port.number.unwrap_or(0))),
        ),
    }
    if policy.outlier_detection.is_none()
        && policy.connection_pool.is_none()
        && policy.load_balancer.is_none()
        && policy.tls.is_none()
    {
        report.error(path, "port traffic policy must have at least one field");
        return;
    }
    if let Some(outlier) = &policy.outlier_detection {
        outlier_detection(outlier, &format!("{path}.outlierDetection"), report);
    }
    if let Some(pool) = &policy.connection_pool {
        connection_pool(pool, &format!("{path}.connectionPool"), report);
    }
    if let Some(lb) = &policy.load_balancer {
        load_balancer(
            lb,
            policy.outlier_detection.as_ref(),
            &format!("{path}.loadBalancer"),
            report,
        );
    }
    if let Some(tls) = &policy.tls {
        client_tls(tls, &format!("{path}.tls"), report);
    }
}

fn outlier_detection(outlier: &OutlierDetection, path: &str, report: &mut Report) {
    duration(
        outlier.base_ejection_time.as_ref(),
        &format!("{path}.baseEjectionTime"),
        report,
    );
    duration(
        outlier.interval.as_ref(),
        &format!("{path}.interval"),
        report,
    );
    if outlier.consecutive_errors.is_some_and(|e| e != 0) {
        report.warning(
            format!("{path}.consecutiveErrors"),
            "outlier detection consecutive errors is deprecated, use consecutiveGatewayErrors or consecutive5xxErrors instead",
        );
    }
    if outlier.split_external_local_origin_errors != Some(true)
        && outlier
            .consecutive_local_origin_failures
            .is_some_and(|f| f > 0)
    {
        report.error(
            format!("{path}.consecutiveLocalOriginFailures"),
            "outlier detection consecutive local origin failures is specified, but split external local origin errors is set to false",
        );
    }
    for (field, value) in [
        ("maxEjectionPercent", outlier.max_ejection_percent),
        ("minHealthPercent", outlier.min_health_percent),
    ] {
        if let Some(value) = value
            && !(0..=100).contains(&value)
        {
            report.error(
                format!("{path}.{field}"),
                format!("percentage {value} is not in range 0..100"),
            );
        }
    }
    for (i, code) in outlier
        .outlier_detection_http_error_codes
        .iter()
        .enumerate()
    {
        if !(100..=599).contains(code) {
            report.error(
                format!("{path}.outlierDetectionHttpErrorCodes[{i}]"),
                format!("status code {code} is not in range 100-599"),
            );
        }
    }
}

/// Validates connection pool settings (DestinationRule and Sidecar).
pub(crate) fn connection_pool(pool: &ConnectionPoolSettings, path: &str, report: &mut Report) {
    if pool.http.is_none() && pool.tcp.is_none() {
        report.error(path, "connection pool must have at least one field");
        return;
    }
    if let Some(http) = &pool.http {
        let field = format!("{path}.http");
        for (name, value) in [
            ("http1MaxPendingRequests", http.http1_max_pending_requests),
            ("http2MaxRequests", http.http2_max_requests),
            ("maxRequestsPerConnection", http.max_requests_per_connection),
            ("maxRetries", http.max_retries),
            ("maxConcurrentStreams", http.max_concurrent_streams),
        ] {
            if value.is_some_and(|v| v < 0) {
                report.error(
                    format!("{field}.{name}"),
                    format!("{name} must be non-negative"),
                );
            }
        }
        duration(
            http.idle_timeout.as_ref(),
            &format!("{field}.idleTimeout"),
            report,
        );
        if http.h2_upgrade_policy == Some(H2UpgradePolicy::Upgrade)
            && http.use_client_protocol == Some(true)
        {
            report.error(
                format!("{field}.useClientProtocol"),
                "use client protocol must not be true when H2UpgradePolicy is UPGRADE",
            );
        }
        if let Some(keepalive) = &http.http2_keep_alive {
            duration(
                keepalive.interval.as_ref(),
                &format!("{field}.http2KeepAlive.interval"),
                report,
            );
            duration(
                keepalive.timeout.as_ref(),
                &format!("{field}.http2KeepAlive.timeout"),
                report,
            );
        }
    }
    if let Some(tcp) = &pool.tcp {
        let field = format!("{path}.tcp");
        if tcp.max_connections.is_some_and(|v| v < 0) {
            report.error(
                format!("{field}.maxConnections"),
                "max connections must be non-negative",
            );
        }
        duration(
            tcp.connect_timeout.as_ref(),
            &format!("{field}.connectTimeout"),
            report,
        );
        duration(
            tcp.max_connection_duration.as_ref(),
            &format!("{field}.maxConnectionDuration"),
            report,
        );
        if let Some(idle) = &tcp.idle_timeout {
            // 0s disables the idle timeout.
            match syntax::parse_duration(idle) {
                Ok(d) if d.is_zero() => {}
                _ => report.check(format!("{field}.idleTimeout"), validate_duration(idle)),
            }
        }
        if let Some(keepalive) = &tcp.tcp_keepalive {
            duration(
                keepalive.time.as_ref(),
                &format!("{field}.tcpKeepalive.time"),
                report,
            );
            duration(
                keepalive.interval.as_ref(),
                &format!("{field}.tcpKeepalive.interval"),
                report,
            );
        }
    }
}

fn is_prime(x: u64) -> bool {
    if x != 0 && x < 4 {
        return true;
    }
    if x & 1 == 0 {
        return false;
    }
    let mut factor = 3;
    while factor * factor <= x {
        if x.is_multiple_of(factor) {
            return false;
        }
        factor += 2;
    }
    true
}

fn load_balancer(
    lb: &LoadBalancerSettings,
    outlier: Option<&OutlierDetection>,
    path: &str,
    report: &mut Report,
) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        report.error(path, "only one of simple or consistentHash may be set");
    }
    if let Some(hash) = &lb.consistent_hash {
        let field = format!("{path}.consistentHash");
        let keys = [
            hash.http_header_name.is_some(),
            hash.http_cookie.is_some(),
            hash.use_source_ip.is_some(),
            hash.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() > 1 {
            report.error(&field, "only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set");
        }
        if let Some(cookie) = &hash.http_cookie {
            if cookie.name.is_empty() {
                report.error(
                    format!("{field}.httpCookie.name"),
                    "name required for HttpCookie",
                );
            }
            if let Some(ttl) = &cookie.ttl {
                report.check(
                    format!("{field}.httpCookie.ttl"),
                    syntax::parse_duration(ttl),
                );
            }
        }
        if hash.minimum_ring_size.is_some_and(|s| s != 0) {
            report.warning(
                format!("{field}.minimumRingSize"),
                "consistent hash MinimumRingSize is deprecated, use ConsistentHashLB's RingHash configuration instead",
            );
            if hash.ring_hash.is_some() || hash.maglev.is_some() {
                report.error(
                    format!("{field}.minimumRingSize"),
                    "only one of MinimumRingSize or Maglev/Ringhash can be specified",
                );
            }
        }
        if hash.ring_hash.is_some() && hash.maglev.is_some() {
            report.error(&field, "only one of ringHash or maglev may be set");
        }
        if let Some(maglev) = &hash.maglev {
            let size = maglev.table_size.unwrap_or(0);
            let table = format!("{field}.maglev.tableSize");
            if size == 0 {
                report.error(&table, "tableSize must be set for maglev");
            } else if size >= 5_000_011 {
                report.error(&table, "tableSize must be less than 5000011 for maglev");
            } else if !is_prime(size) {
                report.error(&table, "tableSize must be a prime number for maglev");
            }
        }
    }
    if let Some(locality) = &lb.locality_lb_setting {
        let field = format!("{path}.localityLbSetting");
        if !locality.distribute.is_empty() && !locality.failover.is_empty() {
            report.error(
                &field,
                "can not simultaneously specify 'distribute' and 'failover'",
            );
        }
        if (!locality.failover.is_empty() || !locality.failover_priority.is_empty())
            && outlier.is_none()
        {
            report.error(
                &field,
                "outlier detection policy must be provided for failover",
            );
        }
        for (i, d) in locality.distribute.iter().enumerate() {
            let sum: u64 = d.to.values().map(|w| u64::from(*w)).sum();
            if sum != 100 {
                report.error(
                    format!("{field}.distribute[{i}].to"),
                    "total weight must be 100 across all localities",
                );
            }
        }
        for (i, f) in locality.failover.iter().enumerate() {
            if f.from.is_some() && f.from == f.to {
                report.error(
                    format!("{field}.failover[{i}]"),
                    "locality lb failover settings must specify different regions",
                );
            }
        }
    }
    duration(
        lb.warmup_duration_secs.as_ref(),
        &format!("{path}.warmupDurationSecs"),
        report,
    );
    if let Some(warmup) = &lb.warmup {
        let field = format!("{path}.warmup");
        match &warmup.duration {
            None => report.error(
                format!("{field}.duration"),
                "Required value: duration is required",
            ),
            Some(d) => report.check(format!("{field}.duration"), validate_duration(d)),
        }
        if let Some(p) = warmup.minimum_percent
            && !(0.0..=100.0).contains(&p)
        {
            report.error(
                format!("{field}.minimumPercent"),
                format!("Invalid value: {p}: minimumPercent must be in 0..=100"),
            );
        }
        if let Some(a) = warmup.aggression
            && a < 1.0
        {
            report.error(
                format!("{field}.aggression"),
                format!("Invalid value: {a}: aggression should be greater than or equal to 1"),
            );
        }
    }
}

fn client_tls(tls: &ClientTlsSettings, path: &str, report: &mut Report) {
    let mode = tls.mode.unwrap_or(ClientTlsMode::Disable);
    if tls.insecure_skip_verify == Some(true) {
        if mode == ClientTlsMode::Simple
            && (tls.ca_certificates.is_some()
                || tls.credential_name.is_some()
                || !tls.subject_alt_names.is_empty())
        {
            report.error(
                format!("{path}.insecureSkipVerify"),
                "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify is set true",
            );
        }
        if mode == ClientTlsMode::Mutual
            && (tls.ca_certificates.is_some() || !tls.subject_alt_names.is_empty())
        {
            report.error(
                format!("{path}.insecureSkipVerify"),
                "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set true",
            );
        }
    }
    let mutual_or_simple = matches!(mode, ClientTlsMode::Simple | ClientTlsMode::Mutual);
    if mutual_or_simple && tls.credential_name.is_some() {
        if tls.client_certificate.is_some()
            || tls.ca_certificates.is_some()
            || tls.private_key.is_some()
            || tls.ca_crl.is_some()
        {
            report.error(
                format!("{path}.credentialName"),
                "cannot specify client certificates or CA certificate or CA CRL If credentialName is set",
            );
        }
        return;
    }
    if mode == ClientTlsMode::Mutual {
        if tls.client_certificate.is_none() {
            report.error(
                format!("{path}.clientCertificate"),
                "client certificate required for mutual tls",
            );
        }
        if tls.private_key.is_none() {
            report.error(
                format!("{path}.privateKey"),
                "private key required for mutual tls",
            );
        }
    }
    if mode == ClientTlsMode::IstioMutual
        && (tls.client_certificate.is_some()
            || tls.private_key.is_some()
            || tls.ca_certificates.is_some()
            || tls.credential_name.is_some())
    {
        report.warning(
            path,
            "ISTIO_MUTUAL uses the mesh certificates; the certificate fields are ignored",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------------------------

/// Validates an Istio Gateway spec.
pub(crate) fn gateway(spec: &GatewaySpec, report: &mut Report) {
    if spec.servers.is_empty() {
        report.error("spec.servers", "gateway must have at least one server");
    }
    let mut port_names = BTreeSet::new();
    for (i, server) in spec.servers.iter().enumerate() {
        let path = format!("spec.servers[{i}]");
        if server.hosts.is_empty() {
            report.error(
                format!("{path}.hosts"),
                "server config must contain at least one host",
            );
        }
        for (j, host) in server.hosts.iter().enumerate() {
            for error in syntax::validate_namespace_slash_hostname(host, true) {
                report.error(format!("{path}.hosts[{j}]"), error);
            }
        }
        let bind = server.bind.as_deref().unwrap_or("");
        let port_ok = match &server.port {
            None => {
                report.error(format!("{path}.port"), "port is required");
                false
            }
            Some(port) => server_port(port, bind, &format!("{path}.port"), report),
        };
        if let Some(unix) = bind.strip_prefix("unix://") {
            report.check(format!("{path}.bind"), validate_unix_address(unix));
            if server
                .port
                .as_ref()
                .and_then(|p| p.number)
                .is_some_and(|n| n != 0)
            {
                report.error(
                    format!("{path}.port.number"),
                    "port number must be 0 for unix domain socket",
                );
            }
        } else if !bind.is_empty() {
            report.check(format!("{path}.bind"), validate_ip(bind));
        }
        if let Some(tls) = &server.tls {
            server_tls(tls, &format!("{path}.tls"), report);
        }
        if let (true, Some(port)) = (port_ok, &server.port) {
            let protocol = port.protocol.as_deref().unwrap_or("");
            if syntax::is_tls_protocol(protocol) && server.tls.is_none() {
                report.error(
                    format!("{path}.tls"),
                    "server must have TLS settings for HTTPS/TLS protocols",
                );
            } else if let (false, Some(tls)) = (syntax::is_tls_protocol(protocol), &server.tls) {
                let passthrough = matches!(
                    tls.mode.unwrap_or(ServerTlsMode::Passthrough),
                    ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough
                );
                if syntax::is_http_protocol(protocol) {
                    let certs = tls.ca_certificates.is_some()
                        || tls.private_key.is_some()
                        || tls.server_certificate.is_some();
                    if !passthrough || certs {
                        report.error(
                            format!("{path}.tls"),
                            "server cannot have TLS settings for plain text HTTP ports",
                        );
                    }
                } else {
                    report.error(
                        format!("{path}.tls"),
                        "server cannot have TLS settings for non HTTPS/TLS ports",
                    );
                }
            }
            if let Some(name) = &port.name
                && !port_names.insert(name.clone())
            {
                report.error(
                    format!("{path}.port.name"),
                    format!("port names in servers must be unique: duplicate name {name}"),
                );
            }
            if !syntax::is_http_protocol(protocol)
                && server.tls.as_ref().and_then(|t| t.https_redirect) == Some(true)
            {
                report.warning(
                    format!("{path}.tls.httpsRedirect"),
                    "tls.httpsRedirect should only be used with http servers",
                );
            }
        }
    }
}

fn server_port(port: &Port, bind: &str, path: &str, report: &mut Report) -> bool {
    let mut ok = true;
    let protocol = port.protocol.as_deref().unwrap_or("");
    if !syntax::is_known_protocol(protocol) {
        report.error(
            format!("{path}.protocol"),
            format!("invalid protocol {protocol:?}, supported protocols are HTTP, HTTP2, GRPC, GRPC-WEB, MONGO, REDIS, MYSQL, TCP"),
        );
        ok = false;
    }
    let number = port.number.unwrap_or(0);
    if (number > 0 || !bind.starts_with("unix://"))
        && let Err(error) = validate_port(i64::from(number))
    {
        report.error(format!("{path}.number"), error);
        ok = false;
    }
    if port.target_port.is_some_and(|t| t > 0) {
        report.error(
            format!("{path}.targetPort"),
            "targetPort has no impact on Gateways",
        );
    }
    if port.name.as_deref().is_none_or(str::is_empty) {
        report.error(format!("{path}.name"), "port name must be set");
        ok = false;
    }
    ok
}

fn validate_unix_address(address: &str) -> Result<(), String> {
    if address.is_empty() {
        return Err("unix address must not be empty".into());
    }
    if address.starts_with('@') {
        return Ok(());
    }
    if !address.starts_with('/') || address.ends_with('/') {
        return Err(format!("{address} is not an absolute path to a file"));
    }
    Ok(())
}

fn server_tls(tls: &ServerTlsSettings, path: &str, report: &mut Report) {
    if matches!(
        tls.min_protocol_version,
        Some(TlsProtocol::TlsV1_0 | TlsProtocol::TlsV1_1)
    ) && tls.cipher_suites.is_empty()
    {
        report.warning(
            format!("{path}.minProtocolVersion"),
            "TLS version below TLSV1_2 require setting compatible ciphers as by default they no longer include compatible ciphers",
        );
    }
    let mode = tls.mode.unwrap_or(ServerTlsMode::Passthrough);
    if mode == ServerTlsMode::IstioMutual {
        for (field, set) in [
            ("serverCertificate", tls.server_certificate.is_some()),
            ("privateKey", tls.private_key.is_some()),
            ("caCertificates", tls.ca_certificates.is_some()),
            ("tlsCertificates", !tls.tls_certificates.is_empty()),
            ("credentialName", tls.credential_name.is_some()),
            ("credentialNames", !tls.credential_names.is_empty()),
        ] {
            if set {
                report.error(
                    format!("{path}.{field}"),
                    format!("ISTIO_MUTUAL TLS cannot have associated {field}"),
                );
            }
        }
        return;
    }
    let has_certs = tls.ca_crl.is_some()
        || tls.server_certificate.is_some()
        || tls.private_key.is_some()
        || tls.ca_certificates.is_some()
        || !tls.tls_certificates.is_empty()
        || tls.credential_name.is_some()
        || !tls.credential_names.is_empty();
    if matches!(
        mode,
        ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough
    ) && has_certs
    {
        report.warning(
            path,
            format!("{mode:?} mode does not use certificates, they will be ignored"),
        );
    }
    let sources = [
        tls.server_certificate.is_some() && tls.private_key.is_some(),
        tls.credential_name.is_some(),
        !tls.credential_names.is_empty(),
        !tls.tls_certificates.is_empty(),
    ];
    if sources.iter().filter(|s| **s).count() > 1 {
        report.error(
            path,
            "only one of credential_name, credential_names, server_certificate/private_key, tls_certificates should be specified",
        );
    }
    let terminating = matches!(
        mode,
        ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual
    );
    if terminating && (tls.credential_name.is_some() || !tls.credential_names.is_empty()) {
        if tls.ca_crl.is_some() && tls.credential_name.is_some() {
            report.error(format!("{path}.caCrl"), "CRL is not supported with credentialName. CRL has to be specified in the credential");
        }
        return;
    }
    if terminating {
        let prefix = if mode == ServerTlsMode::Simple {
            "SIMPLE TLS"
        } else {
            "MUTUAL TLS"
        };
        if mode != ServerTlsMode::Simple && tls.ca_certificates.is_none() {
            report.error(
                format!("{path}.caCertificates"),
                format!("{prefix} requires a client CA bundle"),
            );
        }
        if tls.tls_certificates.is_empty() {
            if tls.server_certificate.is_none() {
                report.error(
                    format!("{path}.serverCertificate"),
                    format!("{prefix} requires a server certificate"),
                );
            }
            if tls.private_key.is_none() {
                report.error(
                    format!("{path}.privateKey"),
                    format!("{prefix} requires a private key"),
                );
            }
        }
        for (i, cert) in tls.tls_certificates.iter().enumerate() {
            if cert.server_certificate.is_none() {
                report.error(
                    format!("{path}.tlsCertificates[{i}].serverCertificate"),
                    format!("{prefix} requires a server certificate"),
                );
            }
            if cert.private_key.is_none() {
                report.error(
                    format!("{path}.tlsCertificates[{i}].privateKey"),
                    format!("{prefix} requires a private key"),
                );
            }
        }
    }
    if tls.ca_crl.is_some() && mode == ServerTlsMode::Simple {
        report.error(
            format!("{path}.caCrl"),
            "CRL is not supported with SIMPLE TLS",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// ServiceEntry and WorkloadEntry
// ---------------------------------------------------------------------------------------------

/// Validates a ServiceEntry spec.
pub(crate) fn service_entry(spec: &ServiceEntrySpec, namespace: Option<&str>, report: &mut Report) {
    workload_labels(
        spec.workload_selector.as_ref(),
        "spec.workloadSelector",
        "service entry",
        report,
    );
    if spec.workload_selector.is_some() && spec.endpoints.is_some() {
        report.error(
            "spec.endpoints",
            "only one of WorkloadSelector or Endpoints is allowed in Service Entry",
        );
    }
    if spec.hosts.is_empty() {
        report.error("spec.hosts", "service entry must have at least one host");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        if host == "*" {
            report.error(&field, "invalid host *");
        } else {
            report.check(&field, validate_wildcard_domain(host));
            if let Err(warning) = syntax::validate_partial_wildcard(host) {
                report.warning(&field, warning);
            }
        }
    }
    let resolution = spec.resolution.unwrap_or(Resolution::None);
    let mut cidr = false;
    for (i, address) in spec.addresses.iter().enumerate() {
        cidr |= address.contains('/');
        report.check(format!("spec.addresses[{i}]"), validate_ip_subnet(address));
    }
    if cidr && !matches!(resolution, Resolution::None | Resolution::Static) {
        report.error(
            "spec.addresses",
            "CIDR addresses are allowed only for NONE/STATIC resolution types",
        );
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        let name = port.name.clone().unwrap_or_default();
        if !names.insert(name.clone()) {
            report.error(
                format!("{path}.name"),
                format!("service entry port name {name:?} already defined"),
            );
        }
        let number = port.number.unwrap_or(0);
        if !numbers.insert(number) {
            report.error(
                format!("{path}.number"),
                format!("service entry port {number} already defined"),
            );
        }
        if let Some(target) = port.target_port.filter(|t| *t != 0) {
            report.check(
                format!("{path}.targetPort"),
                validate_port(i64::from(target)),
            );
        }
        if !is_dns1123_label(&name) {
            report.error(
                format!("{path}.name"),
                format!("invalid port name: {name:?}"),
            );
        }
        if let Some(protocol) = port.protocol.as_deref().filter(|p| !p.is_empty())
            && !syntax::is_known_protocol(protocol)
        {
            report.error(
                format!("{path}.protocol"),
                format!("unsupported protocol: {protocol}"),
            );
        }
        report.check(format!("{path}.number"), validate_port(i64::from(number)));
    }
    let endpoints = spec.endpoints.as_deref().unwrap_or_default();
    match resolution {
        Resolution::None => {
            if !endpoints.is_empty() {
                report.error(
                    "spec.endpoints",
                    "no endpoints should be provided for resolution type none",
                );
            }
            if spec.workload_selector.is_some() {
                report.warning(
                    "spec.workloadSelector",
                    "workloadSelector should not be set when resolution mode is NONE",
                );
            }
        }
        Resolution::Static => {
            for (i, endpoint) in endpoints.iter().enumerate() {
                workload_entry(
                    endpoint,
                    &format!("spec.endpoints[{i}]"),
                    Some(&names),
                    false,
                    report,
                );
            }
        }
        Resolution::Dns | Resolution::DnsRoundRobin | Resolution::DynamicDns => {
            if endpoints.is_empty() && resolution != Resolution::DynamicDns {
                for (i, host) in spec.hosts.iter().enumerate() {
                    if validate_fqdn(host).is_err() {
                        report.error(
                            format!("spec.hosts[{i}]"),
                            format!("hosts must be FQDN if no endpoints are provided for resolution mode {resolution:?}"),
                        );
                    }
                }
            }
            if resolution == Resolution::DnsRoundRobin && endpoints.len() > 1 {
                report.error(
                    "spec.endpoints",
                    "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN",
                );
            }
            for (i, endpoint) in endpoints.iter().enumerate() {
                workload_entry(
                    endpoint,
                    &format!("spec.endpoints[{i}]"),
                    Some(&names),
                    true,
                    report,
                );
            }
        }
    }
    if resolution != Resolution::None && spec.hosts.len() > 1 {
        let l4 = spec.ports.iter().any(|p| {
            let protocol = p.protocol.as_deref().unwrap_or("TCP");
            !syntax::is_http_protocol(protocol) && !syntax::is_tls_protocol(protocol)
        });
        if l4 {
            report.error(
                "spec.hosts",
                "multiple hosts provided with non-HTTP, non-TLS ports",
            );
        }
    }
    export_to(namespace, &spec.export_to, true, false, report);
}

/// Validates a WorkloadEntry (standalone, or an endpoint of a ServiceEntry with its ports).
pub(crate) fn workload_entry(
    entry: &WorkloadEntrySpec,
    path: &str,
    service_ports: Option<&BTreeSet<String>>,
    allow_fqdn: bool,
    report: &mut Report,
) {
    let address = entry.address.as_deref().unwrap_or("");
    if address.is_empty() {
        if entry.network.as_deref().unwrap_or("").is_empty() {
            report.error(format!("{path}.address"), "address is required");
            return;
        }
        report.warning(
            format!("{path}.address"),
            "address is unset with network set",
        );
    }
    if let Some(unix) = address.strip_prefix("unix://") {
        report.check(format!("{path}.address"), validate_unix_address(unix));
        if !entry.ports.is_empty() {
            report.error(
                format!("{path}.ports"),
                format!("unix endpoint {address} must not include ports"),
            );
        }
    } else if !address.is_empty() && validate_ip(address).is_err() {
        if !allow_fqdn {
            report.error(
                format!("{path}.address"),
                format!("endpoint address {address:?} is not a valid IP address"),
            );
        } else if validate_fqdn(address).is_err() {
            report.error(
                format!("{path}.address"),
                format!("endpoint address {address:?} is not a valid FQDN or an IP address"),
            );
        }
    }
    for (name, port) in &entry.ports {
        let field = format!("{path}.ports[{name}]");
        if service_ports.is_some_and(|ports| !ports.contains(name)) {
            report.error(
                &field,
                format!("endpoint port {port} is not defined by the service entry"),
            );
        }
        if !is_dns1123_label(name) {
            report.error(&field, format!("invalid port name: {name}"));
        }
        report.check(&field, validate_port(i64::from(*port)));
    }
    labels(&entry.labels, &format!("{path}.labels"), report);
}

// ---------------------------------------------------------------------------------------------
// Sidecar
// ---------------------------------------------------------------------------------------------

/// Validates a Sidecar spec.
pub(crate) fn sidecar(spec: &SidecarSpec, report: &mut Report) {
    workload_labels(
        spec.workload_selector.as_ref(),
        "spec.workloadSelector",
        "sidecar",
        report,
    );
    if spec.egress.is_empty()
        && spec.ingress.is_empty()
        && spec.outbound_traffic_policy.is_none()
        && spec.inbound_connection_pool.is_none()
    {
        report.error("spec", "sidecar: empty configuration provided");
        return;
    }
    let mut ports = BTreeSet::new();
    for (i, ingress) in spec.ingress.iter().enumerate() {
        let path = format!("spec.ingress[{i}]");
        let Some(port) = &ingress.port else {
            report.error(
                format!("{path}.port"),
                "sidecar: port is required for ingress listeners",
            );
            continue;
        };
        if port.target_port.is_some_and(|t| t > 0) {
            report.error(
                format!("{path}.port.targetPort"),
                "targetPort has no impact on Sidecars",
            );
        }
        sidecar_port(port, &format!("{path}.port"), report);
        report.check(
            format!("{path}.port.number"),
            validate_port(i64::from(port.number.unwrap_or(0))),
        );
        if let Some(bind) = ingress.bind.as_deref().filter(|b| !b.is_empty()) {
            report.check(format!("{path}.bind"), validate_ip(bind));
        }
        if !ports.insert(port.number.unwrap_or(0)) {
            report.error(
                format!("{path}.port.number"),
                "sidecar: ports on IP bound listeners must be unique",
            );
        }
        if let Some(endpoint) = ingress
            .default_endpoint
            .as_deref()
            .filter(|e| !e.is_empty())
        {
            default_endpoint(endpoint, &format!("{path}.defaultEndpoint"), report);
        }
        if let Some(tls) = &ingress.tls {
            let field = format!("{path}.tls");
            if !tls.subject_alt_names.is_empty() {
                report.error(
                    format!("{field}.subjectAltNames"),
                    "sidecar: subjectAltNames is not supported in ingress tls",
                );
            }
            if tls.https_redirect == Some(true) {
                report.error(
                    format!("{field}.httpsRedirect"),
                    "sidecar: httpsRedirect is not supported",
                );
            }
            if tls.credential_name.is_some() {
                report.error(
                    format!("{field}.credentialName"),
                    "sidecar: credentialName is not currently supported",
                );
            }
            if !tls.credential_names.is_empty() {
                report.error(
                    format!("{field}.credentialNames"),
                    "sidecar: credentialNames is not currently supported",
                );
            }
            if !tls.tls_certificates.is_empty() {
                report.error(
                    format!("{field}.tlsCertificates"),
                    "sidecar: tls_certificates is not currently supported",
                );
            }
            if matches!(
                tls.mode,
                Some(ServerTlsMode::IstioMutual | ServerTlsMode::AutoPassthrough)
            ) {
                report.error(format!("{field}.mode"), "configuration is invalid: cannot set mode to ISTIO_MUTUAL or AUTO_PASSTHROUGH in sidecar ingress tls");
            }
            if !syntax::is_tls_protocol(port.protocol.as_deref().unwrap_or("")) {
                report.error(
                    &field,
                    "server cannot have TLS settings for non HTTPS/TLS ports",
                );
            }
            server_tls(tls, &field, report);
        }
        if let Some(pool) = &ingress.connection_pool {
            connection_pool(pool, &format!("{path}.connectionPool"), report);
            if pool.http.is_some()
                && !syntax::is_http_protocol(port.protocol.as_deref().unwrap_or(""))
            {
                report.warning(
                    format!("{path}.connectionPool.http"),
                    "sidecar: HTTP connection pool settings are configured but the port's protocol is not HTTP; only TCP settings will apply",
                );
            }
        }
    }
    if let Some(pool) = &spec.inbound_connection_pool {
        connection_pool(pool, "spec.inboundConnectionPool", report);
    }

    let mut ports = BTreeSet::new();
    let mut sockets = BTreeSet::new();
    let mut catch_all = false;
    let last = spec.egress.len().saturating_sub(1);
    for (i, egress) in spec.egress.iter().enumerate() {
        let path = format!("spec.egress[{i}]");
        match &egress.port {
            None => {
                if catch_all {
                    report.error(
                        format!("{path}.port"),
                        "sidecar: egress can have only one listener with empty port",
                    );
                } else if i == last {
                    catch_all = true;
                } else {
                    report.error(format!("{path}.port"), "sidecar: the egress listener with empty port should be the last listener in the list");
                }
            }
            Some(port) => {
                if port.target_port.is_some_and(|t| t > 0) {
                    report.error(
                        format!("{path}.port.targetPort"),
                        "targetPort has no impact on Sidecars",
                    );
                }
                sidecar_port(port, &format!("{path}.port"), report);
                let bind = egress.bind.as_deref().unwrap_or("");
                let number = port.number.unwrap_or(0);
                if number == 0 {
                    match bind.strip_prefix("unix://") {
                        None => report.error(format!("{path}.bind"), "sidecar: ports with 0 value must have a unix domain socket bind address"),
                        Some(unix) => report.check(format!("{path}.bind"), validate_unix_address(unix)),
                    }
                    if !sockets.insert(bind.to_string()) {
                        report.error(
                            format!("{path}.bind"),
                            "sidecar: unix domain socket values for listeners must be unique",
                        );
                    }
                } else {
                    report.check(
                        format!("{path}.port.number"),
                        validate_port(i64::from(number)),
                    );
                    if !bind.is_empty() {
                        report.check(format!("{path}.bind"), validate_ip(bind));
                    }
                    if !ports.insert(number) {
                        report.error(
                            format!("{path}.port.number"),
                            "sidecar: ports on IP bound listeners must be unique",
                        );
                    }
                }
            }
        }
        if egress.hosts.is_empty() {
            report.error(
                format!("{path}.hosts"),
                "sidecar: egress listener must contain at least one host",
            );
        }
        let mut seen = BTreeSet::new();
        for (j, host) in egress.hosts.iter().enumerate() {
            let field = format!("{path}.hosts[{j}]");
            for error in syntax::validate_namespace_slash_hostname(host, false) {
                report.error(&field, error);
            }
            if !seen.insert(host.as_str()) {
                report.warning(&field, format!("duplicated egress host: {host}"));
            }
        }
        if seen.contains("*/*") && seen.iter().filter(|h| !h.starts_with('~')).count() > 1 {
            report.warning(
                format!("{path}.hosts"),
                "`*/*` host select all resources, no other hosts can be added",
            );
        }
    }

    if let Some(policy) = &spec.outbound_traffic_policy
        && let Some(proxy) = &policy.egress_proxy
    {
        let path = "spec.outboundTrafficPolicy.egressProxy";
        if policy.mode != Some(OutboundTrafficMode::AllowAny) {
            report.error(path, "sidecar: egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode");
        } else {
            report.check(format!("{path}.host"), validate_fqdn(&proxy.host));
            if proxy.port.is_none() {
                report.error(
                    format!("{path}.port"),
                    "sidecar: egress_proxy port must be non-nil",
                );
            } else {
                destination(proxy, path, report);
            }
        }
    }
}

fn sidecar_port(port: &Port, path: &str, report: &mut Report) {
    if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty())
        && !is_dns1123_label(name)
    {
        report.error(format!("{path}.name"), format!("invalid port name: {name}"));
    }
    if let Some(protocol) = port.protocol.as_deref().filter(|p| !p.is_empty())
        && !syntax::is_known_protocol(protocol)
    {
        report.error(
            format!("{path}.protocol"),
            format!("unsupported protocol: {protocol}"),
        );
    }
}

fn default_endpoint(endpoint: &str, path: &str, report: &mut Report) {
    if let Some(unix) = endpoint.strip_prefix("unix://") {
        report.check(path, validate_unix_address(unix));
        return;
    }
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        report.error(
            path,
            format!("sidecar: defaultEndpoint {endpoint:?} must be of form 127.0.0.1:<port>"),
        );
        return;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if !["", "127.0.0.1", "0.0.0.0", "::1", "::"].contains(&host) {
        report.error(
            path,
            "sidecar: defaultEndpoint must be of form 127.0.0.1:<port>,0.0.0.0:<port>,[::1]:port,[::]:port,unix://filepath or unset",
        );
    }
    match port.parse::<i64>() {
        Ok(port) => report.check(path, validate_port(port)),
        Err(_) => report.error(
            path,
            format!("sidecar: defaultEndpoint port ({port}) is not a number"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_overlap_and_subsets() {
        assert!(hosts_overlap("*.foo.com", "bar.foo.com"));
        assert!(hosts_overlap("*.com", "*.foo.com"));
        assert!(!hosts_overlap("a.com", "b.com"));
        assert!(host_subset_of("a.foo.com", "*.foo.com"));
        assert!(host_subset_of("*.a.foo.com", "*.foo.com"));
        assert!(!host_subset_of("*.foo.com", "a.foo.com"));
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537));
        assert!(!is_prime(65536));
        assert!(is_prime(2));
    }
}
