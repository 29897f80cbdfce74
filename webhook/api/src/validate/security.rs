//! `security.istio.io` rules, after Istio's `ValidatePeerAuthentication`,
//! `ValidateAuthorizationPolicy`, `ValidateRequestAuthentication` and the CRDs' CEL rules.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::Report;
use super::networking::policy_selector;
use super::syntax::{self, validate_duration};
use crate::crd::security::{
    AuthorizationAction, AuthorizationPolicySpec, JwtRule, Operation, PeerAuthenticationSpec,
    RequestAuthenticationSpec, Source,
};
use crate::crd::{PolicyTargetReference, WorkloadSelector};

/// Validates a PeerAuthentication spec.
pub(crate) fn peer_authentication(spec: &PeerAuthenticationSpec, report: &mut Report) {
    let empty_selector = spec
        .selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .is_none_or(|l| l.is_empty());
    if let Some(ports) = &spec.port_level_mtls {
        if ports.is_empty() {
            report.error(
                "spec.portLevelMtls",
                "spec.portLevelMtls in body should have at least 1 properties",
            );
        } else if empty_selector {
            report.error(
                "spec.portLevelMtls",
                "portLevelMtls requires selector: mesh/namespace peer authentication cannot have port level mTLS",
            );
        }
        for port in ports.keys() {
            if !(1..=65535).contains(port) {
                report.error(
                    format!("spec.portLevelMtls[{port}]"),
                    "port must be between 1-65535",
                );
            }
        }
    }
    policy_selector(spec.selector.as_ref(), "spec.selector", report);
}

pub(crate) fn one_of_selector(
    selector: Option<&WorkloadSelector>,
    target_ref: Option<&PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
    report: &mut Report,
) {
    let set = [
        selector.is_some(),
        target_ref.is_some(),
        !target_refs.is_empty(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set > 1 {
        report.error(
            "spec.selector",
            "only one of targetRefs or workloadSelector can be set",
        );
    }
    policy_selector(selector, "spec.selector", report);
    if let Some(target) = target_ref {
        target_reference(target, "spec.targetRef", report);
    }
    for (i, target) in target_refs.iter().enumerate() {
        target_reference(target, &format!("spec.targetRefs[{i}]"), report);
    }
}

/// A policy target: a Service, ServiceEntry, Gateway or GatewayClass in the same namespace.
pub(crate) fn target_reference(target: &PolicyTargetReference, path: &str, report: &mut Report) {
    if target.name.is_empty() {
        report.error(format!("{path}.name"), "targetRef name must be set");
    }
    if target.namespace.as_deref().is_some_and(|ns| !ns.is_empty()) {
        report.error(
            format!("{path}.namespace"),
            "targetRef namespace must not be set; cross namespace referencing is not supported",
        );
    }
    let group = target.group.as_deref().unwrap_or("");
    let allowed = matches!(
        (group, target.kind.as_str()),
        ("" | "core", "Service")
            | ("networking.istio.io", "ServiceEntry")
            | ("gateway.networking.k8s.io", "Gateway" | "GatewayClass")
    );
    if !allowed {
        report.error(
            format!("{path}.kind"),
            format!(
                "targetRef must be to one of Service, ServiceEntry, gateway.networking.k8s.io Gateway or GatewayClass but was {group}/{}",
                target.kind
            ),
        );
    }
}

fn non_empty_values(values: &[String], path: &str, report: &mut Report) {
    for (i, value) in values.iter().enumerate() {
        if value.is_empty() {
            report.error(format!("{path}[{i}]"), "empty value not allowed");
        }
    }
}

fn ip_blocks(values: &[String], path: &str, report: &mut Report) {
    for (i, value) in values.iter().enumerate() {
        report.check(format!("{path}[{i}]"), syntax::validate_ip_subnet(value));
    }
}

fn port_values(values: &[String], path: &str, report: &mut Report) {
    for (i, value) in values.iter().enumerate() {
        if value.parse::<u32>().map_or(true, |p| p > 65535) {
            report.error(format!("{path}[{i}]"), format!("bad port ({value})"));
        }
    }
}

fn service_accounts(values: &[String], path: &str, report: &mut Report) {
    if values.len() > 16 {
        report.error(path, "may not have more than 16 values");
    }
    for (i, value) in values.iter().enumerate() {
        let field = format!("{path}[{i}]");
        if value.contains('*') {
            report.error(&field, "wildcard not allowed");
        } else if value.len() > 320 {
            report.error(&field, "value cannot exceed 320 characters");
        } else {
            let ok = match value.split_once('/') {
                Some((ns, sa)) => !ns.is_empty() && !sa.is_empty() && !sa.contains('/'),
                None => !value.is_empty(),
            };
            if !ok {
                report.error(&field, format!("expected format 'serviceAccount' or 'namespace/serviceAccount', found {value:?}"));
            }
        }
    }
}

fn path_templates(values: &[String], path: &str, report: &mut Report) {
    for (i, value) in values.iter().enumerate() {
        let has_template = value.contains("{*}") || value.contains("{**}");
        let mut found_any = false;
        for glob in value.trim_matches('/').split('/') {
            let problem = match glob {
                "{*}" | "{**}" if found_any => Some("{**} is not the last operator"),
                "{*}" => None,
                "{**}" => {
                    found_any = true;
                    None
                }
                _ if glob.contains(['{', '}']) => {
                    Some("contains '{' or '}' beyond a supported path template")
                }
                _ if has_template
                    && !glob
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@=".contains(c)) =>
                {
                    Some("contains a segment with an invalid string literal")
                }
                _ => None,
            };
            if let Some(problem) = problem {
                report.error(
                    format!("{path}[{i}]"),
                    format!("invalid or unsupported path {value:?}: {problem}"),
                );
                break;
            }
        }
    }
}

fn source(src: &Source, path: &str, report: &mut Report) {
    let identities = !(src.principals.is_empty()
        && src.not_principals.is_empty()
        && src.namespaces.is_empty()
        && src.not_namespaces.is_empty());
    let accounts = !(src.service_accounts.is_empty() && src.not_service_accounts.is_empty());
    if identities && accounts {
        report.error(
            path,
            "Cannot set serviceAccounts with namespaces or principals",
        );
    }
    let all = [
        &src.principals,
        &src.not_principals,
        &src.request_principals,
        &src.not_request_principals,
        &src.namespaces,
        &src.not_namespaces,
        &src.service_accounts,
        &src.not_service_accounts,
        &src.ip_blocks,
        &src.not_ip_blocks,
        &src.remote_ip_blocks,
        &src.not_remote_ip_blocks,
        &src.trust_domains,
        &src.not_trust_domains,
    ];
    if all.iter().all(|v| v.is_empty()) {
        report.error(path, "`from.source` must not be empty");
    }
    for (field, values) in [
        ("principals", &src.principals),
        ("notPrincipals", &src.not_principals),
        ("requestPrincipals", &src.request_principals),
        ("notRequestPrincipals", &src.not_request_principals),
        ("namespaces", &src.namespaces),
        ("notNamespaces", &src.not_namespaces),
        ("trustDomains", &src.trust_domains),
        ("notTrustDomains", &src.not_trust_domains),
    ] {
        non_empty_values(values, &format!("{path}.{field}"), report);
    }
    for (field, values) in [
        ("ipBlocks", &src.ip_blocks),
        ("notIpBlocks", &src.not_ip_blocks),
        ("remoteIpBlocks", &src.remote_ip_blocks),
        ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
    ] {
        ip_blocks(values, &format!("{path}.{field}"), report);
    }
    service_accounts(
        &src.service_accounts,
        &format!("{path}.serviceAccounts"),
        report,
    );
    service_accounts(
        &src.not_service_accounts,
        &format!("{path}.notServiceAccounts"),
        report,
    );
}

fn operation(op: &Operation, path: &str, report: &mut Report) {
    let all = [
        &op.hosts,
        &op.not_hosts,
        &op.ports,
        &op.not_ports,
        &op.methods,
        &op.not_methods,
        &op.paths,
        &op.not_paths,
    ];
    if all.iter().all(|v| v.is_empty()) {
        report.error(path, "`to.operation` must not be empty");
    }
    for (field, values) in [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ] {
        non_empty_values(values, &format!("{path}.{field}"), report);
    }
    port_values(&op.ports, &format!("{path}.ports"), report);
    port_values(&op.not_ports, &format!("{path}.notPorts"), report);
    path_templates(&op.paths, &format!("{path}.paths"), report);
    path_templates(&op.not_paths, &format!("{path}.notPaths"), report);
}

/// Istio's `security.ValidateAttribute`: known condition keys.
fn condition_key(key: &str) -> Result<(), String> {
    let map_key = || {
        let open = key.find('[');
        key.ends_with(']') && open.is_some_and(|o| o > 0 && o < key.len() - 2)
    };
    let map_prefixes = [
        "request.headers",
        "request.experimental.inline.headers",
        "request.auth.claims",
        "experimental.envoy.filters.",
    ];
    if map_prefixes.iter().any(|p| key.starts_with(p)) {
        return if map_key() {
            Ok(())
        } else {
            Err(format!("bad key ({key}): should have format a[b]"))
        };
    }
    match key {
        "source.ip"
        | "remote.ip"
        | "destination.ip"
        | "destination.port"
        | "source.serviceAccount"
        | "source.namespace"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni"
        | "source.trustDomain" => Ok(()),
        "destination.namespace" => Err(format!(
            "attribute {key} is replaced by the metadata.namespace"
        )),
        "destination.name" | "destination.user" => Err(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        _ if key.starts_with("destination.labels") => Err(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        _ => Err(format!("unknown attribute: {key}")),
    }
}

/// The value formats of condition keys.
fn condition_values(key: &str, values: &[String], path: &str, report: &mut Report) {
    non_empty_values(values, path, report);
    match key {
        "source.ip" | "remote.ip" | "destination.ip" => ip_blocks(values, path, report),
        "destination.port" => port_values(values, path, report),
        "source.serviceAccount" => service_accounts(values, path, report),
        _ => {}
    }
}

/// Validates an AuthorizationPolicy spec.
pub(crate) fn authorization_policy(
    spec: &AuthorizationPolicySpec,
    metadata: &ObjectMeta,
    report: &mut Report,
) {
    one_of_selector(
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        &spec.target_refs,
        report,
    );
    let action = spec.action.unwrap_or_default();

    if let Some(value) = metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("istio.io/dry-run"))
    {
        if !matches!(
            action,
            AuthorizationAction::Allow | AuthorizationAction::Deny
        ) {
            report.error(
                "metadata.annotations[istio.io/dry-run]",
                format!("the annotation istio.io/dry-run currently only supports action ALLOW/DENY, found {action:?}"),
            );
        } else if value.parse::<bool>().is_err() {
            report.error(
                "metadata.annotations[istio.io/dry-run]",
                format!("invalid value {value:?}: must be true or false"),
            );
        }
    }

    if action == AuthorizationAction::Custom {
        if spec.rules.is_none() {
            report.error(
                "spec.rules",
                "CUSTOM action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
            );
        } else if spec
            .provider
            .as_ref()
            .and_then(|p| p.name.as_deref())
            .is_none_or(str::is_empty)
        {
            report.error("spec.provider.name", "`provider.name` must not be empty");
        }
        for (i, rule) in spec.rules.iter().flatten().enumerate() {
            for (j, from) in rule.from.iter().flatten().enumerate() {
                let Some(src) = &from.source else { continue };
                for (field, set) in [
                    ("namespaces", !src.namespaces.is_empty()),
                    ("notNamespaces", !src.not_namespaces.is_empty()),
                    ("serviceAccounts", !src.service_accounts.is_empty()),
                    ("notServiceAccounts", !src.not_service_accounts.is_empty()),
                    ("principals", !src.principals.is_empty()),
                    ("notPrincipals", !src.not_principals.is_empty()),
                    ("requestPrincipals", !src.request_principals.is_empty()),
                    (
                        "notRequestPrincipals",
                        !src.not_request_principals.is_empty(),
                    ),
                ] {
                    if set {
                        report.error(
                            format!("spec.rules[{i}].from[{j}].source.{field}"),
                            format!("{field} is currently not supported with CUSTOM action"),
                        );
                    }
                }
            }
            for (j, when) in rule.when.iter().enumerate() {
                let unsupported = [
                    "source.namespace",
                    "source.serviceAccount",
                    "source.principal",
                ]
                .contains(&when.key.as_str())
                    || when.key.starts_with("request.auth.");
                if unsupported {
                    report.error(
                        format!("spec.rules[{i}].when[{j}].key"),
                        format!("{} is currently not supported with CUSTOM action", when.key),
                    );
                }
            }
        }
    }
    if spec.provider.is_some() && action != AuthorizationAction::Custom {
        report.error(
            "spec.provider",
            format!("`provider` must not be with non CUSTOM action, found {action:?}"),
        );
    }
    if action == AuthorizationAction::Deny && spec.rules.is_none() {
        report.error(
            "spec.rules",
            "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
        );
    }

    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let path = format!("spec.rules[{i}]");
        let mut tcp_in_from = false;
        let mut tcp_in_to = false;
        if rule.from.as_ref().is_some_and(Vec::is_empty) {
            report.error(format!("{path}.from"), "`from` must not be empty");
        }
        for (j, from) in rule.from.iter().flatten().enumerate() {
            let field = format!("{path}.from[{j}].source");
            match &from.source {
                None => report.error(&field, "`from.source` must not be nil"),
                Some(src) => {
                    source(src, &field, report);
                    tcp_in_from |= !(src.principals.is_empty()
                        && src.not_principals.is_empty()
                        && src.ip_blocks.is_empty()
                        && src.not_ip_blocks.is_empty()
                        && src.namespaces.is_empty()
                        && src.not_namespaces.is_empty()
                        && src.remote_ip_blocks.is_empty()
                        && src.not_remote_ip_blocks.is_empty()
                        && src.service_accounts.is_empty()
                        && src.not_service_accounts.is_empty());
                }
            }
        }
        if rule.to.as_ref().is_some_and(Vec::is_empty) {
            report.error(format!("{path}.to"), "`to` must not be empty");
        }
        for (j, to) in rule.to.iter().flatten().enumerate() {
            let field = format!("{path}.to[{j}].operation");
            match &to.operation {
                None => report.error(&field, "`to.operation` must not be nil"),
                Some(op) => {
                    operation(op, &field, report);
                    tcp_in_to |= !op.ports.is_empty() || !op.not_ports.is_empty();
                }
            }
        }
        for (j, condition) in rule.when.iter().enumerate() {
            let field = format!("{path}.when[{j}]");
            if condition.key.is_empty() {
                report.error(format!("{field}.key"), "`key` must not be empty");
            } else if condition.values.is_empty() && condition.not_values.is_empty() {
                report.error(
                    &field,
                    format!(
                        "at least one of `values` or `notValues` must be set for key {}",
                        condition.key
                    ),
                );
            } else {
                report.check(format!("{field}.key"), condition_key(&condition.key));
                condition_values(
                    &condition.key,
                    &condition.values,
                    &format!("{field}.values"),
                    report,
                );
                condition_values(
                    &condition.key,
                    &condition.not_values,
                    &format!("{field}.notValues"),
                    report,
                );
            }
        }
        let from_exists = rule.from.iter().flatten().any(|f| f.source.is_some());
        let to_exists = rule.to.iter().flatten().any(|t| t.operation.is_some());
        if action == AuthorizationAction::Deny
            && ((from_exists && !to_exists && !tcp_in_from) || (to_exists && !tcp_in_to))
        {
            report.warning(
                &path,
                "configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to the use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify the port",
            );
        }
    }
}

/// Validates a RequestAuthentication spec.
pub(crate) fn request_authentication(spec: &RequestAuthenticationSpec, report: &mut Report) {
    one_of_selector(
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        &spec.target_refs,
        report,
    );
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        jwt_rule(rule, &format!("spec.jwtRules[{i}]"), report);
    }
}

fn jwt_rule(rule: &JwtRule, path: &str, report: &mut Report) {
    for (i, audience) in rule.audiences.iter().enumerate() {
        if audience.is_empty() {
            report.error(
                format!("{path}.audiences[{i}]"),
                "audience must be non-empty string",
            );
        }
    }
    let issuer = rule.issuer.as_deref().unwrap_or("");
    let jwks_uri = rule.jwks_uri.as_deref().unwrap_or("");
    if issuer.is_empty() && jwks_uri.is_empty() {
        report.error(
            format!("{path}.issuer"),
            "issuer or jwksUri must be non-empty string",
        );
    }
    if !jwks_uri.is_empty() {
        let scheme_ok = jwks_uri.starts_with("http://") || jwks_uri.starts_with("https://");
        if !scheme_ok {
            report.error(
                format!("{path}.jwksUri"),
                "url must have scheme http:// or https://",
            );
        } else {
            let authority = jwks_uri.split_once("://").map_or("", |(_, rest)| {
                rest.split(['/', '?', '#']).next().unwrap_or("")
            });
            let host = authority
                .rsplit_once(':')
                .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                .map_or(authority, |(h, _)| h);
            if host.is_empty() {
                report.error(
                    format!("{path}.jwksUri"),
                    format!("jwksUri {jwks_uri:?} has no host"),
                );
            }
            if let Some((_, port)) = authority.rsplit_once(':')
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().map_or(true, |p| p == 0)
            {
                report.error(
                    format!("{path}.jwksUri"),
                    format!("jwksUri {jwks_uri:?} has an invalid port"),
                );
            }
        }
    }
    if let Some(jwks) = &rule.jwks {
        if !jwks_uri.is_empty() {
            report.error(
                format!("{path}.jwks"),
                "only one of jwks or jwksUri can be set",
            );
        }
        if let Err(error) = parse_jwks(jwks) {
            report.error(format!("{path}.jwks"), format!("jwks parse error: {error}"));
        }
    }
    for (i, header) in rule.from_headers.iter().enumerate() {
        if header.name.is_empty() {
            report.error(
                format!("{path}.fromHeaders[{i}].name"),
                "location header name must be non-empty string",
            );
        } else if !syntax::is_http_token(&header.name) {
            report.error(
                format!("{path}.fromHeaders[{i}].name"),
                format!("header name {:?} is not a valid header name", header.name),
            );
        }
    }
    for (i, param) in rule.from_params.iter().enumerate() {
        if param.is_empty() {
            report.error(
                format!("{path}.fromParams[{i}]"),
                "location query must be non-empty string",
            );
        }
    }
    for (i, cookie) in rule.from_cookies.iter().enumerate() {
        if cookie.is_empty() {
            report.error(
                format!("{path}.fromCookies[{i}]"),
                "cookie name must be non-empty string",
            );
        }
    }
    for (i, output) in rule.output_claim_to_headers.iter().enumerate() {
        let field = format!("{path}.outputClaimToHeaders[{i}]");
        if output.claim.is_empty() || output.header.is_empty() {
            report.error(
                &field,
                "outputClaimToHeaders header and claim value must be non-empty string",
            );
        } else if !output
            .header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            report.error(
                format!("{field}.header"),
                format!("header name {} is not a valid header name", output.header),
            );
        }
    }
    if let Some(header) = rule
        .output_payload_to_header
        .as_deref()
        .filter(|h| !h.is_empty())
        && !syntax::is_http_token(header)
    {
        report.error(
            format!("{path}.outputPayloadToHeader"),
            format!("header name {header:?} is not a valid header name"),
        );
    }
    if let Some(timeout) = &rule.timeout {
        report.check(format!("{path}.timeout"), validate_duration(timeout));
    }
}

/// A JSON Web Key Set: `{"keys": [{"kty": ...}, ...]}` (or a single key).
fn parse_jwks(jwks: &str) -> Result<(), String> {
    let value: serde_json::Value = serde_json::from_str(jwks).map_err(|e| e.to_string())?;
    let keys = match value.get("keys") {
        Some(serde_json::Value::Array(keys)) => keys.clone(),
        Some(_) => return Err("\"keys\" must be an array".into()),
        None if value.get("kty").is_some() => vec![value.clone()],
        None => return Err("expected a JWK set with \"keys\"".into()),
    };
    for (i, key) in keys.iter().enumerate() {
        if key.get("kty").and_then(serde_json::Value::as_str).is_none() {
            return Err(format!("key {i} has no \"kty\""));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_sets() {
        assert!(parse_jwks(r#"{"keys":[{"kty":"RSA","e":"AQAB","n":"x"}]}"#).is_ok());
        assert!(parse_jwks(r#"{"kty":"EC"}"#).is_ok());
        assert!(parse_jwks("not json").is_err());
        assert!(parse_jwks(r#"{"keys":[{"e":"AQAB"}]}"#).is_err());
    }
}
