//! Gateway API rules: the CEL and pattern rules of the upstream CRDs (the schema Weft
//! generates keeps only types and enums), plus the regex and duration checks an
//! implementation must make.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use regex::Regex;

use super::Report;
use super::syntax::{is_http_token, validate_gateway_duration, validate_regex};
use crate::crd::gateway::{
    BackendObjectReference, GatewayClassSpec, GatewaySpec, GrpcRouteFilter, GrpcRouteFilterType,
    GrpcRouteSpec, HttpBackendRef, HttpHeaderFilter, HttpPathModifier, HttpPathModifierType,
    HttpRequestMirrorFilter, HttpRouteFilter, HttpRouteFilterType, HttpRouteSpec, HttpValueMatch,
    ParentReference, PathMatchType, ReferenceGrantSpec, TcpRouteSpec, TlsModeType, ValueMatchType,
};

fn pattern(re: &str) -> Regex {
    Regex::new(re).expect("the Gateway API patterns compile")
}

static HOSTNAME: LazyLock<Regex> = LazyLock::new(|| {
    pattern(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
});
static PRECISE_HOSTNAME: LazyLock<Regex> =
    LazyLock::new(|| pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"));
static PATH_CHARS: LazyLock<Regex> =
    LazyLock::new(|| pattern(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$"));
static CONTROLLER_NAME: LazyLock<Regex> = LazyLock::new(|| {
    pattern(
        r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9/\-._~%!$&'()*+,;=:]+$",
    )
});
static CORS_ORIGIN: LazyLock<Regex> = LazyLock::new(|| {
    pattern(
        r"(^\*$)|(^(http(s)?)://(((\*\.)?([a-zA-Z0-9\-]+\.)*[a-zA-Z0-9-]+|\*)(:([0-9]{1,5}))?)$)",
    )
});
static GRPC_SERVICE: LazyLock<Regex> =
    LazyLock::new(|| pattern(r"(?i)^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$"));
static GRPC_METHOD: LazyLock<Regex> = LazyLock::new(|| pattern(r"^[A-Za-z_][A-Za-z_0-9]*$"));

fn hostname(value: &str, path: &str, wildcard: bool, report: &mut Report) {
    let re = if wildcard {
        &HOSTNAME
    } else {
        &PRECISE_HOSTNAME
    };
    if value.len() > 253 || !re.is_match(value) {
        report.error(
            path,
            format!(
                "Invalid value: {value:?}: must be a lowercase RFC 1123 host name{}",
                if wildcard {
                    ", optionally prefixed with *."
                } else {
                    ""
                }
            ),
        );
    }
}

fn port(value: Option<i32>, path: &str, report: &mut Report) {
    if let Some(p) = value
        && !(1..=65535).contains(&p)
    {
        report.error(path, format!("Invalid value: {p}: must be in 1..65535"));
    }
}

fn parent_refs(refs: &[ParentReference], report: &mut Report) {
    let mut by_parent: BTreeMap<(String, String, String, String), Vec<Option<&str>>> =
        BTreeMap::new();
    for (i, parent) in refs.iter().enumerate() {
        let path = format!("spec.parentRefs[{i}]");
        if parent.name.is_empty() {
            report.error(format!("{path}.name"), "Required value");
        }
        port(parent.port, &format!("{path}.port"), report);
        let key = (
            parent
                .group
                .clone()
                .unwrap_or_else(|| "gateway.networking.k8s.io".into()),
            parent.kind.clone().unwrap_or_else(|| "Gateway".into()),
            parent.namespace.clone().unwrap_or_default(),
            parent.name.clone(),
        );
        by_parent
            .entry(key)
            .or_default()
            .push(parent.section_name.as_deref());
    }
    for ((_, kind, _, name), sections) in by_parent {
        if sections.len() < 2 {
            continue;
        }
        if sections.iter().any(Option::is_none) {
            report.error(
                "spec.parentRefs",
                format!("sectionName must be specified when parentRefs includes 2 or more references to the same parent ({kind} {name})"),
            );
        } else {
            let unique: BTreeSet<_> = sections.iter().collect();
            if unique.len() != sections.len() {
                report.error(
                    "spec.parentRefs",
                    format!("sectionName must be unique when parentRefs includes 2 or more references to the same parent ({kind} {name})"),
                );
            }
        }
    }
}

fn backend_object(backend: &BackendObjectReference, path: &str, report: &mut Report) {
    if backend.name.is_empty() {
        report.error(format!("{path}.name"), "Required value");
    }
    let is_service = backend.group.as_deref().unwrap_or("").is_empty()
        && backend.kind.as_deref().unwrap_or("Service") == "Service";
    if is_service && backend.port.is_none() {
        report.error(
            format!("{path}.port"),
            "Must have port for Service reference",
        );
    }
    port(backend.port, &format!("{path}.port"), report);
}

fn backend_weights(weights: &[Option<i32>], path: &str, report: &mut Report) {
    for (i, weight) in weights.iter().enumerate() {
        if let Some(w) = weight
            && !(0..=1_000_000).contains(w)
        {
            report.error(
                format!("{path}[{i}].weight"),
                format!("Invalid value: {w}: must be in 0..1000000"),
            );
        }
    }
    if !weights.is_empty() && weights.iter().all(|w| *w == Some(0)) {
        report.warning(
            path,
            "every backend has weight 0: requests matching this rule get HTTP 500",
        );
    }
}

fn values(matches: &[HttpValueMatch], path: &str, header: bool, report: &mut Report) {
    let mut names = BTreeSet::new();
    for (i, m) in matches.iter().enumerate() {
        let field = format!("{path}[{i}]");
        if !is_http_token(&m.name) {
            report.error(
                format!("{field}.name"),
                format!("Invalid value: {:?}: must be an HTTP token", m.name),
            );
        }
        // Header names are case-insensitive; query parameter names are not.
        let key = if header {
            m.name.to_ascii_lowercase()
        } else {
            m.name.clone()
        };
        if !names.insert(key) {
            report.warning(
                format!("{field}.name"),
                format!(
                    "{:?} is matched more than once; only the first match is used",
                    m.name
                ),
            );
        }
        if m.value.is_empty() {
            report.error(format!("{field}.value"), "Required value");
        }
        if m.type_ == Some(ValueMatchType::RegularExpression) {
            report.check(format!("{field}.value"), validate_regex(&m.value));
        }
    }
}

fn header_filter(filter: &HttpHeaderFilter, path: &str, report: &mut Report) {
    let mut names = BTreeSet::new();
    for (kind, headers) in [("set", &filter.set), ("add", &filter.add)] {
        for (i, header) in headers.iter().enumerate() {
            let field = format!("{path}.{kind}[{i}]");
            if !is_http_token(&header.name) {
                report.error(
                    format!("{field}.name"),
                    format!("Invalid value: {:?}: must be an HTTP token", header.name),
                );
            }
            if !names.insert((kind, header.name.to_ascii_lowercase())) {
                report.error(
                    format!("{field}.name"),
                    format!("Duplicate value: {:?}", header.name),
                );
            }
        }
    }
    let mut removed = BTreeSet::new();
    for (i, name) in filter.remove.iter().enumerate() {
        if !removed.insert(name.to_ascii_lowercase()) {
            report.error(
                format!("{path}.remove[{i}]"),
                format!("Duplicate value: {name:?}"),
            );
        }
    }
}

fn mirror(filter: &HttpRequestMirrorFilter, path: &str, report: &mut Report) {
    backend_object(&filter.backend_ref, &format!("{path}.backendRef"), report);
    if filter.percent.is_some() && filter.fraction.is_some() {
        report.error(
            path,
            "Only one of percent or fraction may be specified in HTTPRequestMirrorFilter",
        );
    }
    if let Some(p) = filter.percent
        && !(0..=100).contains(&p)
    {
        report.error(
            format!("{path}.percent"),
            format!("Invalid value: {p}: must be in 0..100"),
        );
    }
    if let Some(fraction) = &filter.fraction {
        let denominator = fraction.denominator.unwrap_or(100);
        if denominator < 1 {
            report.error(format!("{path}.fraction.denominator"), "must be at least 1");
        }
        if fraction.numerator < 0 || fraction.numerator > denominator {
            report.error(
                format!("{path}.fraction"),
                "numerator must be less than or equal to denominator",
            );
        }
    }
}

fn path_modifier(modifier: &HttpPathModifier, path: &str, report: &mut Report) {
    match modifier.type_ {
        HttpPathModifierType::ReplaceFullPath => {
            if modifier.replace_full_path.is_none() {
                report.error(
                    format!("{path}.replaceFullPath"),
                    "replaceFullPath must be specified when type is set to 'ReplaceFullPath'",
                );
            }
            if modifier.replace_prefix_match.is_some() {
                report.error(
                    format!("{path}.replacePrefixMatch"),
                    "type must be 'ReplacePrefixMatch' when replacePrefixMatch is set",
                );
            }
        }
        HttpPathModifierType::ReplacePrefixMatch => {
            if modifier.replace_prefix_match.is_none() {
                report.error(
                    format!("{path}.replacePrefixMatch"),
                    "replacePrefixMatch must be specified when type is set to 'ReplacePrefixMatch'",
                );
            }
            if modifier.replace_full_path.is_some() {
                report.error(
                    format!("{path}.replaceFullPath"),
                    "type must be 'ReplaceFullPath' when replaceFullPath is set",
                );
            }
        }
    }
    for value in [&modifier.replace_full_path, &modifier.replace_prefix_match]
        .into_iter()
        .flatten()
    {
        if !value.starts_with('/') && !value.is_empty() {
            report.warning(path, format!("path {value:?} does not start with '/'"));
        }
    }
}

/// Checks one list of HTTPRoute filters; returns whether it has a RequestRedirect and
/// whether a ReplacePrefixMatch path modifier is used.
fn http_filters(filters: &[HttpRouteFilter], path: &str, report: &mut Report) -> (bool, bool) {
    let mut seen = BTreeSet::new();
    let mut redirect = false;
    let mut rewrite = false;
    let mut prefix_replace = false;
    for (i, filter) in filters.iter().enumerate() {
        let field = format!("{path}[{i}]");
        let present = [
            (
                HttpRouteFilterType::RequestHeaderModifier,
                "requestHeaderModifier",
                filter.request_header_modifier.is_some(),
            ),
            (
                HttpRouteFilterType::ResponseHeaderModifier,
                "responseHeaderModifier",
                filter.response_header_modifier.is_some(),
            ),
            (
                HttpRouteFilterType::RequestMirror,
                "requestMirror",
                filter.request_mirror.is_some(),
            ),
            (
                HttpRouteFilterType::RequestRedirect,
                "requestRedirect",
                filter.request_redirect.is_some(),
            ),
            (
                HttpRouteFilterType::UrlRewrite,
                "urlRewrite",
                filter.url_rewrite.is_some(),
            ),
            (
                HttpRouteFilterType::ExtensionRef,
                "extensionRef",
                filter.extension_ref.is_some(),
            ),
            (HttpRouteFilterType::Cors, "cors", filter.cors.is_some()),
        ];
        for (kind, name, set) in present {
            if kind == filter.type_ && !set {
                report.error(
                    format!("{field}.{name}"),
                    format!(
                        "filter.{name} must be specified for {:?} filter.type",
                        filter.type_
                    ),
                );
            } else if kind != filter.type_ && set {
                report.error(
                    format!("{field}.{name}"),
                    format!("filter.{name} must be nil if the filter.type is not {kind:?}"),
                );
            }
        }
        let repeatable = matches!(
            filter.type_,
            HttpRouteFilterType::RequestMirror | HttpRouteFilterType::ExtensionRef
        );
        if !repeatable && !seen.insert(format!("{:?}", filter.type_)) {
            report.error(
                format!("{field}.type"),
                format!("{:?} filter cannot be repeated", filter.type_),
            );
        }
        if let Some(f) = &filter.request_header_modifier {
            header_filter(f, &format!("{field}.requestHeaderModifier"), report);
        }
        if let Some(f) = &filter.response_header_modifier {
            header_filter(f, &format!("{field}.responseHeaderModifier"), report);
        }
        if let Some(f) = &filter.request_mirror {
            mirror(f, &format!("{field}.requestMirror"), report);
        }
        if let Some(f) = &filter.request_redirect {
            redirect = true;
            let rpath = format!("{field}.requestRedirect");
            if let Some(scheme) = &f.scheme
                && scheme != "http"
                && scheme != "https"
            {
                report.error(
                    format!("{rpath}.scheme"),
                    format!("Unsupported value: {scheme:?}: supported values: \"http\", \"https\""),
                );
            }
            if let Some(h) = &f.hostname {
                hostname(h, &format!("{rpath}.hostname"), false, report);
            }
            port(f.port, &format!("{rpath}.port"), report);
            if let Some(code) = f.status_code
                && ![301, 302, 303, 307, 308].contains(&code)
            {
                report.error(
                    format!("{rpath}.statusCode"),
                    format!("Unsupported value: {code}: supported values: 301, 302, 303, 307, 308"),
                );
            }
            if let Some(p) = &f.path {
                path_modifier(p, &format!("{rpath}.path"), report);
                prefix_replace |= p.type_ == HttpPathModifierType::ReplacePrefixMatch;
            }
        }
        if let Some(f) = &filter.url_rewrite {
            rewrite = true;
            let rpath = format!("{field}.urlRewrite");
            if let Some(h) = &f.hostname {
                hostname(h, &format!("{rpath}.hostname"), false, report);
            }
            if let Some(p) = &f.path {
                path_modifier(p, &format!("{rpath}.path"), report);
                prefix_replace |= p.type_ == HttpPathModifierType::ReplacePrefixMatch;
            }
        }
        if let Some(cors) = &filter.cors {
            let cpath = format!("{field}.cors");
            for (i, origin) in cors.allow_origins.iter().enumerate() {
                if !CORS_ORIGIN.is_match(origin) {
                    report.error(
                        format!("{cpath}.allowOrigins[{i}]"),
                        format!("Invalid value: {origin:?}: must be * or scheme://host[:port]"),
                    );
                }
            }
            for (list, name) in [
                (&cors.allow_origins, "allowOrigins"),
                (&cors.allow_methods, "allowMethods"),
                (&cors.allow_headers, "allowHeaders"),
            ] {
                if list.len() > 1 && list.iter().any(|v| v == "*") {
                    report.error(
                        format!("{cpath}.{name}"),
                        format!("{name} cannot contain '*' alongside other values"),
                    );
                }
            }
            for (list, name) in [
                (&cors.allow_headers, "allowHeaders"),
                (&cors.expose_headers, "exposeHeaders"),
            ] {
                for (i, header) in list.iter().enumerate() {
                    if header != "*" && !is_http_token(header) {
                        report.error(
                            format!("{cpath}.{name}[{i}]"),
                            format!("Invalid value: {header:?}: must be an HTTP token"),
                        );
                    }
                }
            }
            const METHODS: &[&str] = &[
                "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "*",
            ];
            for (i, method) in cors.allow_methods.iter().enumerate() {
                if !METHODS.contains(&method.as_str()) {
                    report.error(
                        format!("{cpath}.allowMethods[{i}]"),
                        format!("Unsupported value: {method:?}"),
                    );
                }
            }
            if cors.max_age.is_some_and(|a| a < 1) {
                report.error(format!("{cpath}.maxAge"), "must be at least 1");
            }
        }
    }
    if redirect && rewrite {
        report.error(path, "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both");
    }
    (redirect, prefix_replace)
}

fn path_value(type_: PathMatchType, value: &str, path: &str, report: &mut Report) {
    if type_ == PathMatchType::RegularExpression {
        report.check(path, validate_regex(value));
        return;
    }
    if !value.starts_with('/') {
        report.error(path, "value must be an absolute path and start with '/' when type one of ['Exact', 'PathPrefix']");
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(bad) {
            report.error(
                path,
                format!("must not contain '{bad}' when type one of ['Exact', 'PathPrefix']"),
            );
        }
    }
    for bad in ["/..", "/."] {
        if value.ends_with(bad) {
            report.error(
                path,
                format!("must not end with '{bad}' when type one of ['Exact', 'PathPrefix']"),
            );
        }
    }
    if !PATH_CHARS.is_match(value) {
        report.error(path, "must only contain valid characters (matching ^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$) for types ['Exact', 'PathPrefix']");
    }
}

fn http_backends(backends: &[HttpBackendRef], path: &str, report: &mut Report) {
    for (i, backend) in backends.iter().enumerate() {
        let field = format!("{path}[{i}]");
        backend_object(&backend.reference, &field, report);
        let (redirect, _) = http_filters(&backend.filters, &format!("{field}.filters"), report);
        if redirect {
            report.error(
                format!("{field}.filters"),
                "RequestRedirect filter is not supported on a backendRef",
            );
        }
    }
    backend_weights(
        &backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
        path,
        report,
    );
}

/// Validates an HTTPRoute spec.
pub(crate) fn http_route(spec: &HttpRouteSpec, report: &mut Report) {
    parent_refs(&spec.parent_refs, report);
    for (i, h) in spec.hostnames.iter().enumerate() {
        hostname(h, &format!("spec.hostnames[{i}]"), true, report);
    }
    let mut total_matches = 0;
    let mut names = BTreeSet::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        if let Some(name) = &rule.name
            && !names.insert(name.as_str())
        {
            report.error(
                format!("{path}.name"),
                format!("Duplicate value: {name:?}: rule names must be unique"),
            );
        }
        total_matches += rule.matches.len().max(1);
        let mut prefix_matches = 0;
        for (j, m) in rule.matches.iter().enumerate() {
            let field = format!("{path}.matches[{j}]");
            if let Some(p) = &m.path {
                let type_ = p.type_.unwrap_or(PathMatchType::PathPrefix);
                prefix_matches += usize::from(type_ == PathMatchType::PathPrefix);
                path_value(
                    type_,
                    p.value.as_deref().unwrap_or("/"),
                    &format!("{field}.path.value"),
                    report,
                );
            }
            values(&m.headers, &format!("{field}.headers"), true, report);
            values(
                &m.query_params,
                &format!("{field}.queryParams"),
                false,
                report,
            );
        }
        let (redirect, prefix_replace) =
            http_filters(&rule.filters, &format!("{path}.filters"), report);
        if redirect && !rule.backend_refs.is_empty() {
            report.error(
                format!("{path}.filters"),
                "RequestRedirect filter must not be used together with backendRefs",
            );
        }
        if prefix_replace && (rule.matches.len() != 1 || prefix_matches != 1) {
            report.error(
                format!("{path}.filters"),
                "When using RequestRedirect or URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
            );
        }
        for (j, backend) in rule.backend_refs.iter().enumerate() {
            let uses_prefix = backend.filters.iter().any(|f| {
                [
                    f.request_redirect.as_ref().and_then(|r| r.path.as_ref()),
                    f.url_rewrite.as_ref().and_then(|r| r.path.as_ref()),
                ]
                .into_iter()
                .flatten()
                .any(|p| p.type_ == HttpPathModifierType::ReplacePrefixMatch)
            });
            if uses_prefix && (rule.matches.len() != 1 || prefix_matches != 1) {
                report.error(
                    format!("{path}.backendRefs[{j}].filters"),
                    "Within backendRefs, when using URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
                );
            }
        }
        http_backends(&rule.backend_refs, &format!("{path}.backendRefs"), report);
        if let Some(timeouts) = &rule.timeouts {
            let request = timeouts
                .request
                .as_ref()
                .map(|t| (t, validate_gateway_duration(t)));
            let backend = timeouts
                .backend_request
                .as_ref()
                .map(|t| (t, validate_gateway_duration(t)));
            if let Some((_, result)) = &request {
                report.check(format!("{path}.timeouts.request"), result.clone());
            }
            if let Some((_, result)) = &backend {
                report.check(format!("{path}.timeouts.backendRequest"), result.clone());
            }
            if let (Some((_, Ok(request))), Some((_, Ok(backend)))) = (&request, &backend)
                && !request.is_zero()
                && backend > request
            {
                report.error(
                    format!("{path}.timeouts.backendRequest"),
                    "backendRequest timeout cannot be longer than request timeout",
                );
            }
        }
        if let Some(retry) = &rule.retry {
            for (j, code) in retry.codes.iter().enumerate() {
                if !(400..=599).contains(code) {
                    report.error(
                        format!("{path}.retry.codes[{j}]"),
                        format!("Invalid value: {code}: must be in 400..599"),
                    );
                }
            }
            if retry.attempts.is_some_and(|a| a < 0) {
                report.error(
                    format!("{path}.retry.attempts"),
                    "must be greater than or equal to 0",
                );
            }
            if let Some(backoff) = &retry.backoff {
                report.check(
                    format!("{path}.retry.backoff"),
                    validate_gateway_duration(backoff),
                );
            }
        }
    }
    if total_matches > 128 {
        report.error("spec.rules", "While 16 rules and 64 matches per rule are allowed, the total number of matches across all rules in a route must be less than 128");
    }
}

fn grpc_filters(filters: &[GrpcRouteFilter], path: &str, report: &mut Report) {
    let mut seen = BTreeSet::new();
    for (i, filter) in filters.iter().enumerate() {
        let field = format!("{path}[{i}]");
        let present = [
            (
                GrpcRouteFilterType::RequestHeaderModifier,
                "requestHeaderModifier",
                filter.request_header_modifier.is_some(),
            ),
            (
                GrpcRouteFilterType::ResponseHeaderModifier,
                "responseHeaderModifier",
                filter.response_header_modifier.is_some(),
            ),
            (
                GrpcRouteFilterType::RequestMirror,
                "requestMirror",
                filter.request_mirror.is_some(),
            ),
            (
                GrpcRouteFilterType::ExtensionRef,
                "extensionRef",
                filter.extension_ref.is_some(),
            ),
        ];
        for (kind, name, set) in present {
            if kind == filter.type_ && !set {
                report.error(
                    format!("{field}.{name}"),
                    format!(
                        "filter.{name} must be specified for {:?} filter.type",
                        filter.type_
                    ),
                );
            } else if kind != filter.type_ && set {
                report.error(
                    format!("{field}.{name}"),
                    format!("filter.{name} must be nil if the filter.type is not {kind:?}"),
                );
            }
        }
        let repeatable = matches!(
            filter.type_,
            GrpcRouteFilterType::RequestMirror | GrpcRouteFilterType::ExtensionRef
        );
        if !repeatable && !seen.insert(format!("{:?}", filter.type_)) {
            report.error(
                format!("{field}.type"),
                format!("{:?} filter cannot be repeated", filter.type_),
            );
        }
        if let Some(f) = &filter.request_header_modifier {
            header_filter(f, &format!("{field}.requestHeaderModifier"), report);
        }
        if let Some(f) = &filter.response_header_modifier {
            header_filter(f, &format!("{field}.responseHeaderModifier"), report);
        }
        if let Some(f) = &filter.request_mirror {
            mirror(f, &format!("{field}.requestMirror"), report);
        }
    }
}

/// Validates a GRPCRoute spec.
pub(crate) fn grpc_route(spec: &GrpcRouteSpec, report: &mut Report) {
    parent_refs(&spec.parent_refs, report);
    for (i, h) in spec.hostnames.iter().enumerate() {
        hostname(h, &format!("spec.hostnames[{i}]"), true, report);
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let field = format!("{path}.matches[{j}]");
            if let Some(method) = &m.method {
                let mpath = format!("{field}.method");
                if method.service.is_none() && method.method.is_none() {
                    report.error(
                        &mpath,
                        "One or both of 'service' or 'method' must be specified",
                    );
                }
                let regex = method.type_ == Some(ValueMatchType::RegularExpression);
                for (name, value, re) in [
                    ("service", &method.service, &*GRPC_SERVICE),
                    ("method", &method.method, &*GRPC_METHOD),
                ] {
                    let Some(value) = value else { continue };
                    if regex {
                        report.check(format!("{mpath}.{name}"), validate_regex(value));
                    } else if !re.is_match(value) {
                        report.error(
                            format!("{mpath}.{name}"),
                            format!(
                                "{name} must only contain valid characters (matching {})",
                                re.as_str()
                            ),
                        );
                    }
                }
            }
            values(&m.headers, &format!("{field}.headers"), true, report);
        }
        grpc_filters(&rule.filters, &format!("{path}.filters"), report);
        for (j, backend) in rule.backend_refs.iter().enumerate() {
            let field = format!("{path}.backendRefs[{j}]");
            backend_object(&backend.reference, &field, report);
            grpc_filters(&backend.filters, &format!("{field}.filters"), report);
        }
        backend_weights(
            &rule
                .backend_refs
                .iter()
                .map(|b| b.weight)
                .collect::<Vec<_>>(),
            &format!("{path}.backendRefs"),
            report,
        );
    }
}

/// Validates a TCPRoute spec.
pub(crate) fn tcp_route(spec: &TcpRouteSpec, report: &mut Report) {
    parent_refs(&spec.parent_refs, report);
    if spec.rules.is_empty() {
        report.error("spec.rules", "Required value: a TCPRoute needs one rule");
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}].backendRefs");
        if rule.backend_refs.is_empty() {
            report.error(&path, "Required value: at least one backendRef");
        }
        for (j, backend) in rule.backend_refs.iter().enumerate() {
            backend_object(&backend.reference, &format!("{path}[{j}]"), report);
        }
        backend_weights(
            &rule
                .backend_refs
                .iter()
                .map(|b| b.weight)
                .collect::<Vec<_>>(),
            &path,
            report,
        );
    }
}

/// Validates a GatewayClass spec.
pub(crate) fn gateway_class(spec: &GatewayClassSpec, report: &mut Report) {
    if spec.controller_name.len() > 253 || !CONTROLLER_NAME.is_match(&spec.controller_name) {
        report.error(
            "spec.controllerName",
            format!(
                "Invalid value: {:?}: must be a domain-prefixed path",
                spec.controller_name
            ),
        );
    }
    if spec.description.as_ref().is_some_and(|d| d.len() > 64) {
        report.error("spec.description", "Too long: may not be longer than 64");
    }
}

/// Validates a Gateway API Gateway spec.
pub(crate) fn gateway(spec: &GatewaySpec, report: &mut Report) {
    if spec.gateway_class_name.is_empty() {
        report.error("spec.gatewayClassName", "Required value");
    }
    if spec.listeners.is_empty() {
        report.error("spec.listeners", "Required value: at least one listener");
    }
    let mut names = BTreeSet::new();
    let mut combos = BTreeSet::new();
    for (i, listener) in spec.listeners.iter().enumerate() {
        let path = format!("spec.listeners[{i}]");
        if !names.insert(listener.name.as_str()) {
            report.error(
                format!("{path}.name"),
                "Listener name must be unique within the Gateway",
            );
        }
        if !PRECISE_HOSTNAME.is_match(&listener.name) {
            report.error(
                format!("{path}.name"),
                format!(
                    "Invalid value: {:?}: must be a lowercase RFC 1123 subdomain",
                    listener.name
                ),
            );
        }
        port(Some(listener.port), &format!("{path}.port"), report);
        if let Some(h) = &listener.hostname {
            hostname(h, &format!("{path}.hostname"), true, report);
        }
        let protocol = listener.protocol.as_str();
        if !combos.insert((
            listener.port,
            protocol.to_string(),
            listener.hostname.clone(),
        )) {
            report.error(
                &path,
                "Combination of port, protocol and hostname must be unique for each listener",
            );
        }
        let plain = matches!(protocol, "HTTP" | "TCP" | "UDP");
        if plain && listener.tls.is_some() {
            report.error(
                format!("{path}.tls"),
                "tls must not be specified for protocols ['HTTP', 'TCP', 'UDP']",
            );
        }
        if matches!(protocol, "TCP" | "UDP") && listener.hostname.is_some() {
            report.error(
                format!("{path}.hostname"),
                "hostname must not be specified for protocols ['TCP', 'UDP']",
            );
        }
        let mode = listener
            .tls
            .as_ref()
            .map(|t| t.mode.unwrap_or(TlsModeType::Terminate));
        if protocol == "HTTPS" && mode == Some(TlsModeType::Passthrough) {
            report.error(
                format!("{path}.tls.mode"),
                "tls mode must be Terminate for protocol HTTPS",
            );
        }
        if protocol == "HTTPS" && listener.tls.is_none() {
            report.error(
                format!("{path}.tls"),
                "tls must be specified for protocol HTTPS",
            );
        }
        if protocol == "TLS" && listener.tls.as_ref().and_then(|t| t.mode).is_none() {
            report.error(
                format!("{path}.tls.mode"),
                "tls mode must be set for protocol TLS",
            );
        }
        if let Some(tls) = &listener.tls
            && mode == Some(TlsModeType::Terminate)
            && tls.certificate_refs.is_empty()
            && tls.options.is_empty()
        {
            report.error(
                format!("{path}.tls"),
                "certificateRefs or options must be specified when mode is Terminate",
            );
        }
    }
}

/// Validates a ReferenceGrant spec.
pub(crate) fn reference_grant(spec: &ReferenceGrantSpec, report: &mut Report) {
    if spec.from.is_empty() {
        report.error("spec.from", "Required value: at least one entry");
    }
    if spec.to.is_empty() {
        report.error("spec.to", "Required value: at least one entry");
    }
    for (i, from) in spec.from.iter().enumerate() {
        if from.kind.is_empty() {
            report.error(format!("spec.from[{i}].kind"), "Required value");
        }
        if from.namespace.is_empty() {
            report.error(format!("spec.from[{i}].namespace"), "Required value");
        }
    }
    for (i, to) in spec.to.iter().enumerate() {
        if to.kind.is_empty() {
            report.error(format!("spec.to[{i}].kind"), "Required value");
        }
    }
}
