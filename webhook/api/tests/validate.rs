//! Validator rules, one small document each, and the cross-document conflict checks.
#![cfg(feature = "crd")]

use weft_api::validate::{Finding, Severity, has_errors, validate_documents, validate_object};

fn findings(yaml: &str) -> Vec<Finding> {
    validate_documents(yaml)
}

#[track_caller]
fn expect(yaml: &str, severity: Severity, field: &str) {
    let found = findings(yaml);
    assert!(
        found
            .iter()
            .any(|f| f.severity == severity && f.field == field),
        "expected {severity} on {field}, got {found:#?}"
    );
}

#[track_caller]
fn expect_clean(yaml: &str) {
    let found = findings(yaml);
    assert!(!has_errors(&found), "unexpected errors: {found:#?}");
}

fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\n  namespace: ns\nspec:\n  hosts: [reviews]\n  http:\n{http}"
    )
}

#[test]
fn virtual_service_rules() {
    let ok = vs(
        "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 75\n    - destination: {host: reviews, subset: v2}\n      weight: 25\n    retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"5xx,reset,503\"}\n    timeout: 1.5s\n",
    );
    expect_clean(&ok);
    expect(
        &vs("  - redirect: {uri: /x}\n    route:\n    - destination: {host: reviews}\n"),
        Severity::Error,
        "spec.http[0].redirect",
    );
    expect(
        &vs(
            "  - route:\n    - destination: {host: a}\n      weight: 0\n    - destination: {host: b}\n      weight: 0\n",
        ),
        Severity::Error,
        "spec.http[0].route",
    );
    expect(
        &vs(
            "  - route:\n    - destination: {host: a}\n      weight: 60\n    - destination: {host: b}\n      weight: 30\n",
        ),
        Severity::Warning,
        "spec.http[0].route",
    );
    expect(
        &vs(
            "  - match:\n    - uri: {regex: \"(unclosed\"}\n    route:\n    - destination: {host: a}\n",
        ),
        Severity::Error,
        "spec.http[0].match[0].uri.regex",
    );
    expect(
        &vs(
            "  - route:\n    - destination: {host: a}\n    retries: {attempts: 2, retryOn: \"5xx,sometimes\"}\n",
        ),
        Severity::Error,
        "spec.http[0].retries.retryOn",
    );
    expect(
        &vs("  - route:\n    - destination: {host: a}\n    fault: {}\n"),
        Severity::Error,
        "spec.http[0].fault",
    );
    expect(
        &vs(
            "  - route:\n    - destination: {host: a}\n    fault: {abort: {httpStatus: 700, percentage: {value: 10}}}\n",
        ),
        Severity::Error,
        "spec.http[0].fault.abort.httpStatus",
    );
    expect(
        &vs("  - route:\n    - destination: {host: a}\n    timeout: 100us\n"),
        Severity::Error,
        "spec.http[0].timeout",
    );
    expect(
        &vs("  - route:\n    - destination: {host: a, port: {number: 70000}}\n"),
        Severity::Error,
        "spec.http[0].route[0].destination.port.number",
    );
    expect(
        &vs(
            "  - route:\n    - destination: {host: a}\n    headers: {request: {set: {\":path\": /x}}}\n",
        ),
        Severity::Error,
        "spec.http[0].headers.request.set[:path]",
    );
    expect(
        &vs("  - route:\n    - destination: {host: a}\n    retires: {attempts: 3}\n"),
        Severity::Warning,
        "spec.http[0].retires",
    );
    expect(
        &vs("  - route:\n    - destination: {host: a}\n  - route:\n    - destination: {host: b}\n"),
        Severity::Warning,
        "spec.http[1]",
    );
    expect(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: all}\nspec:\n  hosts: [\"*\"]\n  http:\n  - route:\n    - destination: {host: a}\n",
        Severity::Error,
        "spec.hosts[0]",
    );
    expect(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: d}\nspec:\n  gateways: [ns/gw]\n  http:\n  - route:\n    - destination: {host: a}\n",
        Severity::Error,
        "spec.gateways",
    );
    expect(
        &vs("  - delegate: {name: d, namespace: ns}\n    route:\n    - destination: {host: a}\n"),
        Severity::Error,
        "spec.http[0].route",
    );
}

#[test]
fn structure_rules() {
    expect(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {mtls: {mode: SOMETIMES}}\n",
        Severity::Error,
        "spec.mtls.mode",
    );
    expect(
        "apiVersion: networking.istio.io/v9\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [a]\n  http:\n  - route:\n    - destination: {host: a}\n",
        Severity::Error,
        "apiVersion",
    );
    expect(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nspec: {host: a}\n",
        Severity::Error,
        "metadata.name",
    );
    assert!(
        findings(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: 1}\n"
        )
        .is_empty()
    );
    // The admission path sees JSON.
    let object = serde_json::json!({
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "DestinationRule",
        "metadata": {"name": "d", "namespace": "ns"},
        "spec": {"host": "reviews", "subsets": [{"name": "v1"}, {"name": "v1"}]}
    });
    let found = validate_object(&object);
    assert!(
        found
            .iter()
            .any(|f| f.field == "spec.subsets[1].name" && f.severity == Severity::Error),
        "{found:#?}"
    );
    assert_eq!(found[0].object, "DestinationRule/ns/d");
}

#[test]
fn destination_rule_rules() {
    let dr = |policy: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d}}\nspec:\n  host: reviews\n  trafficPolicy:\n{policy}"
        )
    };
    expect_clean(&dr(
        "    loadBalancer:\n      consistentHash: {httpCookie: {name: user, ttl: 0s}}\n    tls: {mode: ISTIO_MUTUAL}\n",
    ));
    expect(
        &dr("    tls: {mode: MUTUAL}\n"),
        Severity::Error,
        "spec.trafficPolicy.tls.clientCertificate",
    );
    expect(
        &dr(
            "    loadBalancer:\n      consistentHash: {httpHeaderName: x, maglev: {tableSize: 100}}\n",
        ),
        Severity::Error,
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
    );
    expect(
        &dr("    connectionPool: {tcp: {connectTimeout: soon}}\n"),
        Severity::Error,
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
    );
    expect(
        &dr("    outlierDetection: {maxEjectionPercent: 150}\n"),
        Severity::Error,
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
    );
}

#[test]
fn security_rules() {
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  portLevelMtls:\n    8080: {mode: DISABLE}\n";
    expect(pa, Severity::Error, "spec.portLevelMtls");
    let ap = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: a}}\nspec:\n{spec}"
        )
    };
    expect_clean(&ap(
        "  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/default/sa/sleep]}\n    to:\n    - operation: {methods: [GET], paths: [\"/api/*\"]}\n",
    ));
    expect(&ap("  action: DENY\n"), Severity::Error, "spec.rules");
    expect(
        &ap("  action: ALLOW\n  provider: {name: ext}\n  rules: [{}]\n"),
        Severity::Error,
        "spec.provider",
    );
    expect(
        &ap("  action: CUSTOM\n  rules: [{}]\n"),
        Severity::Error,
        "spec.provider.name",
    );
    expect(
        &ap("  rules:\n  - when:\n    - key: request.colour\n      values: [red]\n"),
        Severity::Error,
        "spec.rules[0].when[0].key",
    );
    expect(
        &ap("  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/40]}\n"),
        Severity::Error,
        "spec.rules[0].from[0].source.ipBlocks[0]",
    );
    expect(
        &ap(
            "  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n",
        ),
        Severity::Error,
        "spec.selector",
    );
    let ra = |rule: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r}}\nspec:\n  jwtRules:\n  - {rule}\n"
        )
    };
    expect_clean(&ra(
        "{issuer: https://auth.example.com, jwksUri: https://auth.example.com/jwks.json}",
    ));
    expect(
        &ra("{audiences: [a]}"),
        Severity::Error,
        "spec.jwtRules[0].issuer",
    );
    expect(
        &ra("{issuer: x, jwksUri: \"https://a/jwks\", jwks: '{\"keys\":[]}'}"),
        Severity::Error,
        "spec.jwtRules[0].jwks",
    );
    expect(
        &ra("{issuer: x, jwksUri: \"ftp://a/jwks\"}"),
        Severity::Error,
        "spec.jwtRules[0].jwksUri",
    );
}

#[test]
fn gateway_api_rules() {
    let route = |rule: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: h}}\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  - {rule}\n"
        )
    };
    expect_clean(&route(
        "{matches: [{path: {type: PathPrefix, value: /api}}], backendRefs: [{name: svc, port: 80, weight: 90}, {name: svc2, port: 80, weight: 10}]}",
    ));
    expect(
        &route(
            "{filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}], backendRefs: [{name: svc, port: 80}]}",
        ),
        Severity::Error,
        "spec.rules[0].filters",
    );
    expect(
        &route(
            "{matches: [{path: {type: Exact, value: foo}}], backendRefs: [{name: svc, port: 80}]}",
        ),
        Severity::Error,
        "spec.rules[0].matches[0].path.value",
    );
    expect(
        &route("{backendRefs: [{name: svc}]}"),
        Severity::Error,
        "spec.rules[0].backendRefs[0].port",
    );
    expect(
        &route("{backendRefs: [{name: svc, port: 80, weight: 2000000}]}"),
        Severity::Error,
        "spec.rules[0].backendRefs[0].weight",
    );
    expect(
        &route(
            "{filters: [{type: RequestHeaderModifier, urlRewrite: {hostname: x}}], backendRefs: [{name: svc, port: 80}]}",
        ),
        Severity::Error,
        "spec.rules[0].filters[0].requestHeaderModifier",
    );
    expect(
        &route(
            "{timeouts: {request: 1s, backendRequest: 2s}, backendRefs: [{name: svc, port: 80}]}",
        ),
        Severity::Error,
        "spec.rules[0].timeouts.backendRequest",
    );
    expect(
        &route(
            "{filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}], backendRefs: [{name: svc, port: 80}]}",
        ),
        Severity::Error,
        "spec.rules[0].filters",
    );
    let split = "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata: {name: s}\nspec:\n  service: api\n  backends:\n  - {service: api-v1, weight: 0}\n";
    expect(split, Severity::Error, "spec.backends");
}

const TWO_MESH_VS: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a, namespace: prod}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b, namespace: prod}
spec:
  hosts: [reviews.prod.svc.cluster.local]
  http:
  - route:
    - destination: {host: reviews, subset: v2}
";

#[test]
fn two_virtual_services_for_one_mesh_host_are_an_error() {
    let found = findings(TWO_MESH_VS);
    assert!(
        found.iter().any(|f| f.severity == Severity::Error
            && f.object == "VirtualService/prod/b"
            && f.field == "spec.hosts[0]"
            && f.message.contains("VirtualService/prod/a")),
        "{found:#?}"
    );
    // Each alone is fine.
    for doc in TWO_MESH_VS.split("---\n") {
        expect_clean(doc);
    }
}

#[test]
fn virtual_services_merged_on_a_gateway_are_a_warning() {
    let yaml = TWO_MESH_VS
        .replace("  hosts:", "  gateways: [prod/gw]\n  hosts:")
        .replace("reviews.prod.svc.cluster.local]", "reviews]");
    let found = findings(&yaml);
    assert!(!has_errors(&found), "{found:#?}");
    assert!(
        found
            .iter()
            .any(|f| f.severity == Severity::Warning && f.message.contains("merges")),
        "{found:#?}"
    );
}

#[test]
fn virtual_services_exported_to_disjoint_namespaces_do_not_conflict() {
    let yaml = TWO_MESH_VS
        .replace(
            "metadata: {name: a, namespace: prod}\nspec:\n",
            "metadata: {name: a, namespace: prod}\nspec:\n  exportTo: [ns1]\n",
        )
        .replace(
            "metadata: {name: b, namespace: prod}\nspec:\n",
            "metadata: {name: b, namespace: prod}\nspec:\n  exportTo: [ns2]\n",
        );
    expect_clean(&yaml);
}

#[test]
fn http_route_and_virtual_service_for_one_service_are_an_error() {
    let yaml = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: prod}
spec:
  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v2, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: prod}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
";
    let found = findings(yaml);
    assert!(
        found.iter().any(|f| f.severity == Severity::Error
            && f.object == "HTTPRoute/prod/reviews"
            && f.field == "spec.parentRefs[0]"),
        "{found:#?}"
    );
}

#[test]
fn traffic_split_and_virtual_service_for_one_service_are_an_error() {
    let yaml = "\
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: s, namespace: prod}
spec:
  service: reviews
  backends: [{service: reviews-v1, weight: 90}, {service: reviews-v2, weight: 10}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: prod}
spec:
  hosts: [reviews.prod.svc.cluster.local]
  http:
  - route:
    - destination: {host: reviews}
";
    expect(yaml, Severity::Error, "spec.service");
}

const SPLIT: &str = "\
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: s, namespace: prod}
spec:
  service: reviews
  backends: [{service: reviews-v1, weight: 90}, {service: reviews-v2, weight: 10}]
";

const ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: prod}
spec:
  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v2, port: 9080}]
";

/// A finding of `severity` on `object`'s `field` whose message names all of `names`.
#[track_caller]
fn expect_naming(found: &[Finding], severity: Severity, object: &str, field: &str, names: &[&str]) {
    assert!(
        found.iter().any(|f| f.severity == severity
            && f.object == object
            && f.field == field
            && names.iter().all(|n| f.message.contains(n))),
        "expected {severity} on {object} {field} naming {names:?}: {found:#?}"
    );
}

#[test]
fn http_route_and_traffic_split_for_one_service_are_an_error() {
    let found = findings(&format!("{ROUTE}---\n{SPLIT}"));
    expect_naming(
        &found,
        Severity::Error,
        "TrafficSplit/prod/s",
        "spec.service",
        &["HTTPRoute/prod/reviews", "reviews.prod.svc.cluster.local"],
    );
    // The split of another service is no conflict.
    expect_clean(&format!(
        "{ROUTE}---\n{}",
        SPLIT.replace("service: reviews\n", "service: ratings\n")
    ));
}

#[test]
fn several_traffic_splits_for_one_service_are_an_error() {
    let second = SPLIT.replace("name: s,", "name: t,").replace(
        "service: reviews\n",
        "service: reviews.prod.svc.cluster.local\n",
    );
    let found = findings(&format!("{SPLIT}---\n{second}"));
    expect_naming(
        &found,
        Severity::Error,
        "TrafficSplit/prod/t",
        "spec.service",
        &["TrafficSplit/prod/s"],
    );
    assert!(
        !found
            .iter()
            .any(|f| f.object == "TrafficSplit/prod/s" && f.severity == Severity::Error),
        "the first one is not blamed: {found:#?}"
    );
    // The same root name in another namespace is another service.
    expect_clean(&format!(
        "{SPLIT}---\n{}",
        SPLIT.replace("name: s, namespace: prod", "name: s, namespace: staging")
    ));
}

#[test]
fn a_short_name_and_the_fqdn_from_another_namespace_are_one_host() {
    let yaml = TWO_MESH_VS.replace(
        "metadata: {name: b, namespace: prod}",
        "metadata: {name: b, namespace: other}",
    );
    let found = findings(&yaml);
    expect_naming(
        &found,
        Severity::Error,
        "VirtualService/other/b",
        "spec.hosts[0]",
        &["VirtualService/prod/a", "reviews.prod.svc.cluster.local"],
    );
    // The short name in another namespace is another service.
    let yaml = TWO_MESH_VS
        .replace(
            "metadata: {name: b, namespace: prod}",
            "metadata: {name: b, namespace: other}",
        )
        .replace("reviews.prod.svc.cluster.local]", "reviews]");
    expect_clean(&yaml);
    assert!(findings(&yaml).is_empty(), "{:#?}", findings(&yaml));
}

#[test]
fn wildcard_hosts_overlapping_other_virtual_services_are_reported() {
    let wildcard = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: all, namespace: other}
spec:
  hosts: [\"*.prod.svc.cluster.local\"]
  http:
  - route:
    - destination: {host: reviews.prod.svc.cluster.local}
";
    let one = TWO_MESH_VS.split("---\n").next().expect("first document");
    let found = findings(&format!("{wildcard}---\n{one}"));
    assert!(!has_errors(&found), "{found:#?}");
    expect_naming(
        &found,
        Severity::Warning,
        "VirtualService/other/all",
        "spec.hosts[0]",
        &[
            "*.prod.svc.cluster.local",
            "reviews.prod.svc.cluster.local",
            "VirtualService/prod/a",
            "most specific",
        ],
    );
    // Narrower wildcards are covered too; disjoint ones are not.
    let narrower = wildcard
        .replace("name: all,", "name: narrow,")
        .replace("*.prod.svc.cluster.local", "*.v1.prod.svc.cluster.local");
    let found = findings(&format!("{wildcard}---\n{narrower}"));
    expect_naming(
        &found,
        Severity::Warning,
        "VirtualService/other/all",
        "spec.hosts[0]",
        &["*.v1.prod.svc.cluster.local"],
    );
    let disjoint = wildcard
        .replace("name: all,", "name: staging,")
        .replace("*.prod.svc", "*.staging.svc");
    assert!(
        findings(&format!("{wildcard}---\n{disjoint}")).is_empty(),
        "{:#?}",
        findings(&format!("{wildcard}---\n{disjoint}"))
    );
    // An HTTPRoute or a TrafficSplit for a service a wildcard VirtualService covers: two
    // routing configurations for one service.
    let found = findings(&format!("{wildcard}---\n{ROUTE}---\n{SPLIT}"));
    expect_naming(
        &found,
        Severity::Error,
        "HTTPRoute/prod/reviews",
        "spec.parentRefs[0]",
        &["VirtualService/other/all"],
    );
    expect_naming(
        &found,
        Severity::Error,
        "TrafficSplit/prod/s",
        "spec.service",
        &["VirtualService/other/all"],
    );
}

#[test]
fn destination_rules_for_one_host_and_duplicates_are_warnings() {
    let yaml = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a, namespace: prod}
spec:
  host: reviews
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: b, namespace: prod}
spec:
  host: reviews.prod.svc.cluster.local
  trafficPolicy: {tls: {mode: DISABLE}}
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: b, namespace: prod}
spec:
  host: reviews.prod.svc.cluster.local
  trafficPolicy: {tls: {mode: DISABLE}}
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: prod}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v3}
";
    let found = findings(yaml);
    assert!(!has_errors(&found), "{found:#?}");
    let warning = |object: &str, field: &str, text: &str| {
        found.iter().any(|f| {
            f.severity == Severity::Warning
                && f.object == object
                && f.field == field
                && f.message.contains(text)
        })
    };
    assert!(
        warning("DestinationRule/prod/b", "metadata.name", "duplicate"),
        "{found:#?}"
    );
    assert!(
        warning(
            "DestinationRule/prod/b",
            "spec.host",
            "trafficPolicy is ignored"
        ),
        "{found:#?}"
    );
    assert!(
        warning(
            "VirtualService/prod/r",
            "spec.http[0].route[0].destination.subset",
            "v3"
        ),
        "{found:#?}"
    );
}

#[test]
fn findings_render_for_the_cli() {
    let found = findings(&vs(
        "  - route:\n    - destination: {host: c}\n      weight: -15\n    - destination: {host: d}\n      weight: 100\n",
    ));
    let text: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert!(
        text.iter().any(
            |t| t == "error: VirtualService/ns/r: spec.http[0].route[0].weight: weight -15 < 0"
        ),
        "{text:#?}"
    );
}

#[test]
fn fields_weft_does_not_honour_are_warnings_naming_them() {
    let warned = |yaml: &str| -> Vec<(String, String)> {
        let found = findings(yaml);
        assert!(
            !has_errors(&found),
            "valid Istio must stay accepted: {found:#?}"
        );
        found
            .into_iter()
            .filter(|f| f.severity == Severity::Warning && f.message.contains("Weft"))
            .map(|f| (f.field, f.message))
            .collect()
    };
    let fields = |w: &[(String, String)]| w.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>();

    let retries = warned(&vs(
        "  - route:\n    - destination: {host: reviews}\n    retries: {attempts: 3, backoff: 100ms}\n  - route:\n    - destination: {host: reviews}\n    retries: {attempts: 2, retryIgnorePreviousHosts: true}\n",
    ));
    assert_eq!(
        fields(&retries),
        [
            "spec.http[1].retries.retryIgnorePreviousHosts",
            "spec.http[0].retries.backoff"
        ]
    );
    assert!(
        retries[1].1.contains("not supported by Weft"),
        "{retries:?}"
    );

    let dr = warned(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r, namespace: ns}\nspec:\n  host: reviews\n  trafficPolicy:\n    proxyProtocol: {version: V1}\n    connectionPool: {tcp: {maxConnections: 10}}\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      outlierDetection: {consecutive5xxErrors: 3, splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2}\n      portLevelSettings:\n      - port: {number: 9080}\n        tls: {mode: SIMPLE, credentialName: reviews-tls}\n",
    );
    assert_eq!(
        fields(&dr),
        [
            "spec.trafficPolicy.proxyProtocol",
            "spec.subsets[0].trafficPolicy.outlierDetection.splitExternalLocalOriginErrors",
            "spec.subsets[0].trafficPolicy.outlierDetection.consecutiveLocalOriginFailures",
            "spec.subsets[0].trafficPolicy.portLevelSettings[0].tls.credentialName",
        ]
    );
    // What Weft does honour gives no such warning.
    assert!(
        warned(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r, namespace: ns}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {simple: LEAST_REQUEST, warmup: {duration: 10s}}\n    connectionPool: {tcp: {maxConnections: 10}, http: {http1MaxPendingRequests: 5}}\n    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 30s}\n"
        )
        .is_empty()
    );

    let on_gateway = warned(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: ns}\nspec:\n  hosts: [\"*\"]\n  gateways: [bookinfo-gateway]\n  http:\n  - route:\n    - destination: {host: productpage}\n",
    );
    assert_eq!(fields(&on_gateway), ["spec.gateways"]);
    assert!(
        on_gateway[0].1.contains("bookinfo-gateway") && on_gateway[0].1.contains("no sidecar"),
        "{on_gateway:?}"
    );

    let authz = warned(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: ns}\nspec: {}\n",
    );
    assert_eq!(fields(&authz), ["kind"]);
    assert!(authz[0].1.contains("NOT ENFORCED"), "{authz:?}");

    let route = warned(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: ns}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 9080}]\n  hostnames: [reviews.example]\n  rules:\n  - filters:\n    - type: ExtensionRef\n      extensionRef: {group: example.com, kind: Filter, name: f}\n    backendRefs: [{name: reviews, port: 9080}]\n",
    );
    assert_eq!(
        fields(&route),
        ["spec.rules[0].filters[0].extensionRef", "spec.hostnames"]
    );
}
