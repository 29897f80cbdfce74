//! Valid Istio and Gateway API that Weft accepts but does not honour yet. Each such field or
//! kind present in an object is a warning naming it, so that nothing a user wrote is ignored
//! without a word: `weft-webhook validate` prints it and `POST /validate` returns it to
//! `kubectl` as an admission warning. The object is still accepted (it is valid, and Istio's
//! own control plane would take it).

use serde_json::Value;

use super::Report;

/// `(path, why)`: a dotted path from the object's root, `[]` standing for every element of
/// an array.
type Table = &'static [(&'static str, &'static str)];

const VIRTUAL_SERVICE: Table = &[
    (
        "spec.http[].match[].statPrefix",
        "Weft's metrics have no per-route stat prefix",
    ),
    (
        "spec.http[].retries.retryRemoteLocalities",
        "locality-aware routing is out of scope",
    ),
    (
        "spec.http[].retries.retryIgnorePreviousHosts",
        "a retry goes to the endpoint the load balancer picks, which may be the previous one",
    ),
    (
        "spec.http[].retries.backoff",
        "retries wait Envoy's default jittered back-off (25 ms base, 250 ms cap)",
    ),
    (
        "spec.http[].redirect.derivePort",
        "the redirect keeps the request's port unless `port` is set",
    ),
    (
        "spec.http[].corsPolicy.unmatchedPreflights",
        "preflights no policy matches are forwarded to the app",
    ),
];

/// Under every traffic policy of a DestinationRule (top level, per port, per subset).
const TRAFFIC_POLICY: Table = &[
    ("tunnel", "Weft does not tunnel upstream connections"),
    ("proxyProtocol", "Weft does not send the PROXY protocol"),
    (
        "connectionPool.tcp.maxConnectionDuration",
        "upstream connections are not closed by age",
    ),
    (
        "connectionPool.http.h2UpgradePolicy",
        "between sidecars Weft always uses HTTP/2; to other upstreams the client's protocol",
    ),
    (
        "connectionPool.http.useClientProtocol",
        "between sidecars Weft always uses HTTP/2; to other upstreams the client's protocol",
    ),
    (
        "connectionPool.http.maxConcurrentStreams",
        "HTTP/2 stream limits are hyper's defaults",
    ),
    (
        "outlierDetection.splitExternalLocalOriginErrors",
        "connect failures and 5xx answers count together",
    ),
    (
        "outlierDetection.consecutiveLocalOriginFailures",
        "connect failures and 5xx answers count together",
    ),
    (
        "tls.credentialName",
        "client certificates are read from the paths in clientCertificate/privateKey/caCertificates",
    ),
    ("tls.caCrl", "certificate revocation lists are not checked"),
    (
        "loadBalancer.localityLbSetting",
        "locality-aware load balancing is out of scope",
    ),
    (
        "loadBalancer.zoneAwareLbSetting",
        "zone-aware routing is out of scope",
    ),
    (
        "loadBalancer.backendUtilization",
        "weights from backend-reported utilization are not used",
    ),
    (
        "loadBalancer.warmup.minimumPercent",
        "warm-up ramps linearly from zero over its duration",
    ),
    (
        "loadBalancer.warmup.aggression",
        "warm-up ramps linearly from zero over its duration",
    ),
    (
        "loadBalancer.consistentHash.httpCookie.attributes",
        "the generated cookie carries only its name, path and TTL",
    ),
    (
        "retryBudget.budgetInterval",
        "the budget counts the retries active now",
    ),
];

/// Where a DestinationRule holds traffic policies.
const TRAFFIC_POLICIES: &[&str] = &[
    "spec.trafficPolicy",
    "spec.trafficPolicy.portLevelSettings[]",
    "spec.subsets[].trafficPolicy",
    "spec.subsets[].trafficPolicy.portLevelSettings[]",
];

const SIDECAR: Table = &[
    (
        "spec.ingress",
        "Weft's inbound listener serves the pod's ports as they are; ingress listeners are not applied",
    ),
    (
        "spec.inboundConnectionPool",
        "inbound connections to the app are not limited",
    ),
    (
        "spec.egress[].port",
        "egress hosts apply to every port; per-port egress listeners are not built",
    ),
    ("spec.egress[].bind", "outbound capture has no bind address"),
    (
        "spec.egress[].captureMode",
        "capture is the pod's redirect mode (iptables or eBPF)",
    ),
];

const SERVICE_ENTRY: Table = &[
    (
        "spec.workloadSelector",
        "endpoints come from `endpoints` only; WorkloadEntry selection is not translated",
    ),
    (
        "spec.subjectAltNames",
        "peers are verified against the mesh identities of their endpoints",
    ),
];

/// HTTPRoute and GRPCRoute.
const HTTP_ROUTE: Table = &[
    (
        "spec.rules[].retry.backoff",
        "retries wait Envoy's default jittered back-off (25 ms base, 250 ms cap)",
    ),
    (
        "spec.parentRefs[].sectionName",
        "the route applies to every port of its parent Service",
    ),
    (
        "spec.rules[].filters[].extensionRef",
        "Weft defines no ExtensionRef filters",
    ),
    (
        "spec.rules[].backendRefs[].filters[].extensionRef",
        "Weft defines no ExtensionRef filters",
    ),
    (
        "spec.hostnames",
        "the route takes every request to its parent Service",
    ),
];

/// Warns about every field of `object` (a `kind` of `group`) that Weft does not honour.
pub(crate) fn check(group: &str, kind: &str, object: &Value, report: &mut Report) {
    use crate::crd::{gateway, networking, security, smi, telemetry};
    let whole = |report: &mut Report, what: &str| {
        report.warning("kind", format!("{kind} is validated but {what}"));
    };
    match (group, kind) {
        (networking::GROUP, "VirtualService") => {
            table(object, "", VIRTUAL_SERVICE, report);
            gateways(object, report);
        }
        (networking::GROUP, "DestinationRule") => {
            for prefix in TRAFFIC_POLICIES {
                table(object, prefix, TRAFFIC_POLICY, report);
            }
        }
        (networking::GROUP, "Sidecar") => table(object, "", SIDECAR, report),
        (networking::GROUP, "ServiceEntry") => table(object, "", SERVICE_ENTRY, report),
        (networking::GROUP, "Gateway") => whole(
            report,
            "not served: Weft runs sidecars only, no Istio ingress or egress gateway",
        ),
        (networking::GROUP, "WorkloadEntry") => whole(
            report,
            "not translated by Weft: endpoints come from pods and ServiceEntry endpoints",
        ),
        (security::GROUP, "AuthorizationPolicy") => whole(
            report,
            "NOT ENFORCED by Weft yet: every request that passes mTLS (PeerAuthentication) is allowed",
        ),
        (security::GROUP, "RequestAuthentication") => whole(
            report,
            "not enforced by Weft yet: JWTs are passed to the app unchecked",
        ),
        (telemetry::GROUP, "Telemetry") => whole(
            report,
            "not applied: Weft's metrics are fixed and it exports no traces or access logs",
        ),
        (gateway::GROUP, "HTTPRoute" | "GRPCRoute") => table(object, "", HTTP_ROUTE, report),
        (gateway::GROUP, "Gateway" | "GatewayClass") => whole(
            report,
            "not served: Weft implements the Gateway API's mesh (GAMMA) routes only",
        ),
        (gateway::GROUP, "TCPRoute") => whole(
            report,
            "not translated by Weft: mesh TCP routing is written as a VirtualService tcp route",
        ),
        (smi::GROUP, "TrafficSplit") => table(
            object,
            "",
            &[(
                "spec.matches",
                "matches are not applied: the split covers every request to the service",
            )],
            report,
        ),
        _ => {}
    }
}

/// Warns about each `prefix` + `path` of `table` present in `object`.
fn table(object: &Value, prefix: &str, table: Table, report: &mut Report) {
    for (path, why) in table {
        let full = if prefix.is_empty() {
            (*path).to_owned()
        } else {
            format!("{prefix}.{path}")
        };
        for field in present(object, &full) {
            report.warning(field, format!("not supported by Weft and ignored: {why}"));
        }
    }
}

/// The concrete paths (`spec.http[2].retries.backoff`) of `path` that are set in `object`
/// (null and empty arrays or maps count as unset).
fn present(object: &Value, path: &str) -> Vec<String> {
    let mut found = Vec::new();
    walk(object, path, String::new(), &mut found);
    found
}

fn walk(value: &Value, rest: &str, at: String, found: &mut Vec<String>) {
    if rest.is_empty() {
        let unset = match value {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        if !unset {
            found.push(at);
        }
        return;
    }
    let (step, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let (key, each) = match step.strip_suffix("[]") {
        Some(key) => (key, true),
        None => (step, false),
    };
    let Some(child) = value.get(key) else {
        return;
    };
    let here = if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    };
    if each {
        for (i, item) in child.as_array().into_iter().flatten().enumerate() {
            walk(item, tail, format!("{here}[{i}]"), found);
        }
    } else {
        walk(child, tail, here, found);
    }
}

/// A VirtualService bound to gateways other than `mesh` is not served for those gateways.
fn gateways(object: &Value, report: &mut Report) {
    let Some(gateways) = object.pointer("/spec/gateways").and_then(Value::as_array) else {
        return;
    };
    let names: Vec<&str> = gateways.iter().filter_map(Value::as_str).collect();
    let others: Vec<&str> = names.iter().copied().filter(|g| *g != "mesh").collect();
    if others.is_empty() {
        return;
    }
    report.warning(
        "spec.gateways",
        format!(
            "Weft runs no Istio gateway: {} not served{}",
            others.join(", "),
            if names.contains(&"mesh") {
                "; the routes apply to the mesh"
            } else {
                "; this VirtualService applies to no sidecar"
            }
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_expands_arrays_and_skips_absent_and_null() {
        let v: Value = serde_json::json!({"spec": {"http": [
            {"retries": {"backoff": "1s"}},
            {"retries": {}},
            {"retries": {"backoff": null}},
            {"retries": {"backoff": "2s"}},
        ]}});
        assert_eq!(
            present(&v, "spec.http[].retries.backoff"),
            [
                "spec.http[0].retries.backoff",
                "spec.http[3].retries.backoff"
            ]
        );
        assert!(present(&v, "spec.tcp[].match").is_empty());
        let empty: Value = serde_json::json!({"spec": {"ingress": [], "tunnel": {}}});
        assert!(present(&empty, "spec.ingress").is_empty());
        assert!(present(&empty, "spec.tunnel").is_empty());
        assert!(present(&v, "spec.http.retries").is_empty());
    }
}
