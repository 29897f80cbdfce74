//! The primitive value checks Istio's `pkg/config/validation` applies everywhere: host names
//! and wildcards, durations, ports, IPs and CIDRs, header names, RE2 regexes, labels.

use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;

/// RFC 1123 label: lowercase alphanumerics and `-`, at most 63 characters.
pub(crate) fn is_dns1123_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    !value.is_empty()
        && value.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(|b| *b != b'-')
        && bytes.last().is_some_and(|b| *b != b'-')
}

/// A host name label: RFC 1123 characters, any case (DNS is case-insensitive).
fn is_host_label(value: &str) -> bool {
    is_dns1123_label(&value.to_ascii_lowercase())
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters (Kubernetes object names).
pub(crate) fn is_dns1123_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(is_dns1123_label)
}

/// A DNS label that may start with `*` or `*-` (Istio's `IsWildcardDNS1123Label`).
fn is_wildcard_dns1123_label(value: &str) -> bool {
    if value == "*" {
        return true;
    }
    if value.len() > 63 {
        return false;
    }
    let rest = value
        .strip_prefix("*-")
        .or_else(|| value.strip_prefix('*'))
        .unwrap_or(value);
    is_host_label(rest)
}

fn check_dns1123_preconditions(name: &str) -> Result<(), String> {
    if name.len() > 255 {
        return Err(format!("domain name {name:?} too long (max 255)"));
    }
    if name.is_empty() {
        return Err("empty domain name not allowed".into());
    }
    Ok(())
}

fn validate_dns1123_labels(domain: &str) -> Result<(), String> {
    let parts: Vec<&str> = domain.split('.').collect();
    let last = parts.len() - 1;
    if let Some(tld) = parts.last()
        && !tld.is_empty()
        && tld.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!(
            "domain name {domain:?} invalid (top level domain {tld:?} cannot be all-numeric)"
        ));
    }
    for (i, label) in parts.iter().enumerate() {
        // A trailing dot (`istio.io.`) is allowed.
        if i == last && label.is_empty() {
            return Ok(());
        }
        if !is_host_label(label) {
            return Err(format!(
                "domain name {domain:?} invalid (label {label:?} invalid)"
            ));
        }
    }
    Ok(())
}

/// A fully qualified domain name (Istio's `ValidateFQDN`); short names are accepted as one
/// label.
pub(crate) fn validate_fqdn(fqdn: &str) -> Result<(), String> {
    check_dns1123_preconditions(fqdn)?;
    validate_dns1123_labels(fqdn)
}

/// A domain name that may have a wildcard first label (`*.example.com`, `*`), Istio's
/// `ValidateWildcardDomain`.
pub(crate) fn validate_wildcard_domain(domain: &str) -> Result<(), String> {
    check_dns1123_preconditions(domain)?;
    let (first, rest) = match domain.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (domain, None),
    };
    if !is_wildcard_dns1123_label(first) {
        return Err(format!(
            "domain name {domain:?} invalid (label {first:?} invalid)"
        ));
    }
    match rest {
        Some(rest) => validate_dns1123_labels(rest),
        None => Ok(()),
    }
}

/// Partial wildcards (`foo*.com`, `*foo.com`) are not allowed where only `*` and `*.suffix`
/// are.
pub(crate) fn validate_partial_wildcard(host: &str) -> Result<(), String> {
    if host.contains('*') && host != "*" && !host.starts_with("*.") {
        return Err(format!("partial wildcard {host:?} not allowed"));
    }
    Ok(())
}

fn validate_sidecar_or_gateway_hostname_part(hostname: &str, is_gateway: bool) -> Vec<String> {
    let mut errors = Vec::new();
    if hostname != "*" && !hostname.contains('.') {
        errors.push("short names (non FQDN) are not allowed".to_string());
    }
    if let Err(error) = validate_wildcard_domain(hostname) {
        // Gateways also accept an IP address.
        if !is_gateway || hostname.parse::<IpAddr>().is_err() {
            errors.push(error);
        }
    }
    if let Err(error) = validate_partial_wildcard(hostname) {
        errors.push(error);
    }
    errors
}

/// A `namespace/dnsName` host of a Gateway server or Sidecar egress listener (Istio's
/// `ValidateNamespaceSlashWildcardHostname`). Gateways also accept a bare host.
pub(crate) fn validate_namespace_slash_hostname(hostname: &str, is_gateway: bool) -> Vec<String> {
    let Some((namespace, dns_name)) = hostname.split_once('/') else {
        if is_gateway {
            return validate_sidecar_or_gateway_hostname_part(hostname, true);
        }
        return vec!["host must be of form namespace/dnsName".to_string()];
    };
    let mut errors = Vec::new();
    if namespace.is_empty() || dns_name.is_empty() {
        errors.push("config namespace and dnsName in host entry cannot be empty".to_string());
    }
    // Sidecars may exclude a namespace: `~ns/host`, or `~/host` for the own one.
    let namespace_name = if is_gateway {
        namespace
    } else {
        namespace.strip_prefix('~').unwrap_or(namespace)
    };
    let special =
        namespace == "*" || namespace == "." || (!is_gateway && namespace_name.is_empty());
    if !special && !is_dns1123_label(namespace_name) {
        let what = if is_gateway { "gateway" } else { "sidecar" };
        errors.push(format!("invalid namespace value {namespace:?} in {what}"));
    }
    errors.extend(validate_sidecar_or_gateway_hostname_part(
        dns_name, is_gateway,
    ));
    errors
}

/// Parses a duration the way Kubernetes CEL and Istio accept them: Go syntax, a sequence of
/// decimal numbers with units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h` (`1.5s`, `1m30s`, `300ms`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?}");
    let mut rest = text.trim();
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() || rest.starts_with('-') {
        return Err(invalid());
    }
    let mut total_nanos: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        if number_len == 0 {
            return Err(invalid());
        }
        let number: f64 = rest[..number_len].parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .chars()
            .take_while(|c| c.is_alphabetic())
            .map(char::len_utf8)
            .sum();
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(format!("{} (missing or unknown unit)", invalid())),
        };
        rest = &rest[unit_len..];
        total_nanos += number * scale;
    }
    if !total_nanos.is_finite() || total_nanos > u64::MAX as f64 {
        return Err(invalid());
    }
    Ok(Duration::from_nanos(total_nanos.round() as u64))
}

/// An Istio duration field: parses, at least 1ms, millisecond precision (`ValidateDuration`).
pub(crate) fn validate_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration < Duration::from_millis(1) {
        return Err(format!(
            "duration {text:?} must be greater than or equal to 1ms"
        ));
    }
    if duration.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "duration {text:?}: only durations to ms precision are supported"
        ));
    }
    Ok(duration)
}

static GATEWAY_DURATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$").expect("the Gateway API duration pattern compiles")
});

/// A Gateway API duration (GEP-2257): `1h`, `10s`, `1m30s`, `500ms`.
pub(crate) fn validate_gateway_duration(text: &str) -> Result<Duration, String> {
    if !GATEWAY_DURATION.is_match(text) {
        return Err(format!(
            "invalid duration {text:?}: must match ^([0-9]{{1,5}}(h|m|s|ms)){{1,4}}$"
        ));
    }
    parse_duration(text)
}

/// A port number in `1..=65535`.
pub(crate) fn validate_port(port: i64) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("port number {port} must be in the range 1..65535"))
    }
}

/// An IP address.
pub(crate) fn validate_ip(address: &str) -> Result<(), String> {
    address
        .parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| format!("{address} is not a valid IP"))
}

/// An IP address or a CIDR block (`ValidateIPSubnet`).
pub(crate) fn validate_ip_subnet(subnet: &str) -> Result<(), String> {
    if subnet.matches('/').count() == 1 {
        subnet
            .parse::<ipnet::IpNet>()
            .map(|_| ())
            .map_err(|_| format!("{subnet} is not a valid CIDR block"))
    } else {
        validate_ip(subnet)
    }
}

/// An HTTP header name: RFC 7230 token characters.
pub(crate) fn is_http_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// HTTP/2 pseudo-headers that may be matched on.
const PSEUDO_HEADERS: &[&str] = &[":method", ":scheme", ":authority", ":path", ":status"];

/// A header name in a route match: a token, a pseudo-header, or a JWT claim
/// (`@request.auth.claims.name`).
pub(crate) fn validate_match_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name cannot be empty".into());
    }
    if is_jwt_claim_route(name) || PSEUDO_HEADERS.contains(&name) || is_http_token(name) {
        return Ok(());
    }
    Err(format!("header name {name} is not a valid header name"))
}

/// `@request.auth.claims.NAME` or `@request.auth.claims[NAME]` routing on a JWT claim.
pub(crate) fn is_jwt_claim_route(name: &str) -> bool {
    name.strip_prefix("@request.auth.claims")
        .is_some_and(|rest| {
            (rest.starts_with('.') && rest.len() > 1)
                || (rest.starts_with('[') && rest.ends_with(']'))
        })
}

fn is_internal_header(name: &str) -> bool {
    name.starts_with(':') || name.eq_ignore_ascii_case("host")
}

fn is_authority_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host")
}

/// A header added or set on a request (the authority may be set, once).
pub(crate) fn validate_request_header_write(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name cannot be empty".into());
    }
    if is_internal_header(name) && !is_authority_header(name) {
        return Err(format!(
            "invalid header {name:?}: header cannot have \":\" prefix"
        ));
    }
    Ok(())
}

/// A header removed from a request, or changed on a response.
pub(crate) fn validate_header_operation(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name cannot be empty".into());
    }
    if name.eq_ignore_ascii_case("host") {
        return Err(format!("invalid header {name:?}: cannot set Host header"));
    }
    if is_internal_header(name) {
        return Err(format!(
            "invalid header {name:?}: header cannot have \":\" prefix"
        ));
    }
    Ok(())
}

/// Whether a header is the authority (`:authority` or `host`).
pub(crate) fn is_authority(name: &str) -> bool {
    is_authority_header(name)
}

/// A header value Envoy accepts: no control characters, `%` only as `%%` or around a
/// variable (`%HOSTNAME%`).
pub(crate) fn validate_header_value(value: &str) -> Result<(), String> {
    if value
        .chars()
        .any(|c| (c as u32) < 0x20 && c != '\t' || c as u32 == 0x7f)
    {
        return Err(format!(
            "header value {value:?} contains control characters"
        ));
    }
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            continue;
        }
        if chars.peek() == Some(&'%') {
            chars.next();
            continue;
        }
        // A variable: letters, digits, `_`, and an optional `(...)` argument, closed by `%`.
        let mut closed = false;
        let mut depth = 0usize;
        for inner in chars.by_ref() {
            match inner {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                '%' if depth == 0 => {
                    closed = true;
                    break;
                }
                _ => {}
            }
        }
        if !closed {
            return Err(format!(
                "header value {value:?}: unterminated '%' (write %% for a literal percent sign)"
            ));
        }
    }
    Ok(())
}

/// An RE2 regex of at most 1024 characters (Envoy's program size limit, approximated).
pub(crate) fn validate_regex(pattern: &str) -> Result<(), String> {
    if pattern.len() > 1024 {
        return Err("regex is too large, max length allowed is 1024".into());
    }
    Regex::new(pattern).map(|_| ()).map_err(|error| {
        let first = error
            .to_string()
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        format!("invalid RE2 regex {pattern:?}: {first}")
    })
}

static LABEL_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
        .expect("the label name pattern compiles")
});

/// A Kubernetes label key (`prefix/name`) and value.
pub(crate) fn validate_label(key: &str, value: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && !is_dns1123_subdomain(prefix)
    {
        return Err(format!(
            "invalid label key {key:?}: prefix must be a DNS subdomain"
        ));
    }
    if name.len() > 63 || !LABEL_NAME.is_match(name) {
        return Err(format!("invalid label key {key:?}"));
    }
    if value.len() > 63 || (!value.is_empty() && !LABEL_NAME.is_match(value)) {
        return Err(format!("invalid label value {value:?} for key {key:?}"));
    }
    Ok(())
}

/// Istio's protocol names (case-insensitive).
pub(crate) fn is_known_protocol(protocol: &str) -> bool {
    const PROTOCOLS: &[&str] = &[
        "HTTP",
        "HTTPS",
        "GRPC",
        "GRPC-WEB",
        "HTTP2",
        "HTTP_PROXY",
        "MONGO",
        "MYSQL",
        "REDIS",
        "TCP",
        "TLS",
        "UDP",
    ];
    PROTOCOLS.iter().any(|p| p.eq_ignore_ascii_case(protocol))
}

/// HTTP-family protocols.
pub(crate) fn is_http_protocol(protocol: &str) -> bool {
    ["HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY"]
        .iter()
        .any(|p| p.eq_ignore_ascii_case(protocol))
}

/// Protocols carried over TLS.
pub(crate) fn is_tls_protocol(protocol: &str) -> bool {
    ["HTTPS", "TLS"]
        .iter()
        .any(|p| p.eq_ignore_ascii_case(protocol))
}

/// gRPC status names accepted by fault injection.
pub(crate) const GRPC_STATUSES: &[&str] = &[
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on` conditions.
pub(crate) const RETRY_ON_POLICIES: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(is_dns1123_label("reviews"));
        assert!(is_dns1123_label("v1-2"));
        assert!(!is_dns1123_label("-v1"));
        assert!(!is_dns1123_label("V1"));
        assert!(!is_dns1123_label(""));
        assert!(!is_dns1123_label(&"a".repeat(64)));
    }

    #[test]
    fn wildcard_domains() {
        assert!(validate_wildcard_domain("*").is_ok());
        assert!(validate_wildcard_domain("*.example.com").is_ok());
        assert!(validate_wildcard_domain("reviews").is_ok());
        assert!(validate_wildcard_domain("productpage.nsA.svc.cluster.local").is_ok());
        assert!(validate_wildcard_domain("reviews.prod.svc.cluster.local").is_ok());
        assert!(validate_wildcard_domain("istio.io.").is_ok());
        assert!(validate_wildcard_domain("foo.*.com").is_err());
        assert!(validate_wildcard_domain("example.123").is_err());
        assert!(validate_wildcard_domain("").is_err());
        assert!(validate_wildcard_domain("bad_host").is_err());
        assert!(validate_partial_wildcard("*foo.com").is_err());
        assert!(validate_partial_wildcard("*.foo.com").is_ok());
    }

    #[test]
    fn namespace_slash_hosts() {
        assert!(validate_namespace_slash_hostname("istio-system/*", false).is_empty());
        assert!(validate_namespace_slash_hostname("./*.example.com", false).is_empty());
        assert!(validate_namespace_slash_hostname("*/*", false).is_empty());
        assert!(validate_namespace_slash_hostname("~prod-us2/*", false).is_empty());
        assert!(validate_namespace_slash_hostname("~/bar.example.com", false).is_empty());
        assert!(!validate_namespace_slash_hostname("reviews", false).is_empty());
        assert!(
            !validate_namespace_slash_hostname("ns/reviews", false).is_empty(),
            "short name"
        );
        assert!(validate_namespace_slash_hostname("uk.bookinfo.com", true).is_empty());
        assert!(
            validate_namespace_slash_hostname("10.1.2.3", true).is_empty(),
            "gateways accept IPs"
        );
        assert!(validate_namespace_slash_hostname("*", true).is_empty());
        assert!(!validate_namespace_slash_hostname("ns/foo*.com", true).is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("").is_err());
        assert!(validate_duration("0s").is_err());
        assert!(validate_duration("100us").is_err());
        assert!(validate_duration("1.0001s").is_err(), "sub-ms precision");
        assert!(validate_duration("1ms").is_ok());
        assert!(validate_gateway_duration("10s").is_ok());
        assert!(validate_gateway_duration("1m30s").is_ok());
        assert!(validate_gateway_duration("1.5s").is_err());
    }

    #[test]
    fn ports_and_addresses() {
        assert!(validate_port(1).is_ok());
        assert!(validate_port(65535).is_ok());
        assert!(validate_port(0).is_err());
        assert!(validate_port(65536).is_err());
        assert!(validate_ip_subnet("10.0.0.0/8").is_ok());
        assert!(validate_ip_subnet("2001:db8::/32").is_ok());
        assert!(validate_ip_subnet("10.0.0.1").is_ok());
        assert!(validate_ip_subnet("10.0.0.0/33").is_err());
        assert!(validate_ip_subnet("example.com").is_err());
    }

    #[test]
    fn headers() {
        assert!(validate_match_header_name("x-user").is_ok());
        assert!(validate_match_header_name(":authority").is_ok());
        assert!(validate_match_header_name("@request.auth.claims.group").is_ok());
        assert!(validate_match_header_name("bad header").is_err());
        assert!(validate_request_header_write(":path").is_err());
        assert!(validate_request_header_write(":authority").is_ok());
        assert!(validate_header_operation("Host").is_err());
        assert!(validate_header_value("%HOSTNAME%").is_ok());
        assert!(validate_header_value("100%%").is_ok());
        assert!(validate_header_value("abc%123").is_err());
        assert!(validate_header_value("a\nb").is_err());
    }

    #[test]
    fn regexes_and_labels() {
        assert!(validate_regex("^/api/v[0-9]+/.*").is_ok());
        assert!(validate_regex("(unclosed").is_err());
        assert!(validate_regex(&"a".repeat(1025)).is_err());
        assert!(validate_label("app", "reviews").is_ok());
        assert!(validate_label("app.kubernetes.io/name", "").is_ok());
        assert!(validate_label("bad key", "x").is_err());
        assert!(validate_label("app", "-bad").is_err());
    }
}
