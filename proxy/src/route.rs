//! HTTP and TCP route matching: a port's `HttpRoute`s compiled into a matcher that picks the
//! first route whose conditions hold (Istio's ordered first-match semantics).
//!
//! Everything that can be prepared is prepared at compile time: regexes are anchored
//! (Istio's regex matches the whole value) and compiled once, header names are parsed and
//! lower-cased, header values of actions are validated. Matching a request allocates
//! nothing unless a header carries several values (they are joined with `,`, as Envoy does)
//! or a query parameter is percent-encoded.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use regex::{Regex, RegexBuilder};
use weft_api::config::{self as model, ConfigError, HttpAction, StringMatch};

use crate::cors::Cors;
use crate::fault::Fault;
use crate::mirror::MirrorPolicy;
use crate::retry::RetryPolicy;
use crate::rewrite::{DirectResponse, HeaderOps, Redirect, Rewrite};
use crate::snapshot::Cluster;

/// Longest compiled regex program accepted (bytes), so that a config cannot make matching slow.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Compiles an RE2-style pattern that must match the whole value.
pub fn full_regex(pattern: &str, ignore_case: bool, field: &str) -> Result<Regex, ConfigError> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .case_insensitive(ignore_case)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| invalid(field, format!("invalid regex {pattern:?}: {e}")))
}

/// A compiled `StringMatch`.
#[derive(Debug, Clone)]
pub enum StrMatcher {
    /// Equal (ASCII case-insensitive when `ignore_case`).
    Exact {
        /// The value.
        value: Box<str>,
        /// Compare case-insensitively.
        ignore_case: bool,
    },
    /// Starts with.
    Prefix {
        /// The prefix.
        value: Box<str>,
        /// Compare case-insensitively.
        ignore_case: bool,
    },
    /// Starts with whole `/`-separated segments (Gateway API `PathPrefix`).
    SegmentPrefix {
        /// The prefix without its trailing `/` (empty for `/`, which matches every path).
        value: Box<str>,
        /// Compare case-insensitively.
        ignore_case: bool,
    },
    /// Anchored regex.
    Regex(Regex),
}

impl StrMatcher {
    /// Compiles a match; `field` names it in errors.
    pub fn compile(m: &StringMatch, ignore_case: bool, field: &str) -> Result<Self, ConfigError> {
        Ok(match m {
            StringMatch::Exact(v) => StrMatcher::Exact {
                value: v.as_str().into(),
                ignore_case,
            },
            StringMatch::Prefix(v) => StrMatcher::Prefix {
                value: v.as_str().into(),
                ignore_case,
            },
            StringMatch::SegmentPrefix(v) => StrMatcher::SegmentPrefix {
                value: v.trim_end_matches('/').into(),
                ignore_case,
            },
            StringMatch::Regex(p) => StrMatcher::Regex(full_regex(p, ignore_case, field)?),
        })
    }

    /// True when `v` satisfies the match.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatcher::Exact {
                value,
                ignore_case: false,
            } => v == &**value,
            StrMatcher::Exact {
                value,
                ignore_case: true,
            } => v.eq_ignore_ascii_case(value),
            StrMatcher::Prefix {
                value,
                ignore_case: false,
            } => v.starts_with(&**value),
            StrMatcher::Prefix {
                value,
                ignore_case: true,
            } => starts_with_ignore_case(v, value),
            StrMatcher::SegmentPrefix { value, ignore_case } => {
                let head = if *ignore_case {
                    starts_with_ignore_case(v, value)
                } else {
                    v.starts_with(&**value)
                };
                // The prefix must end where a segment ends: at the end of the value or
                // before a `/` (`/old` matches `/old/x`, not `/oldish`).
                head && matches!(v.as_bytes().get(value.len()), None | Some(b'/'))
            }
            StrMatcher::Regex(re) => re.is_match(v),
        }
    }

    /// The prefix a prefix match matched (what a prefix rewrite or redirect replaces).
    pub fn matched_prefix(&self) -> Option<MatchedPrefix> {
        match self {
            StrMatcher::Prefix { value, .. } => Some(MatchedPrefix {
                len: value.len(),
                segments: false,
            }),
            StrMatcher::SegmentPrefix { value, .. } => Some(MatchedPrefix {
                len: value.len(),
                segments: true,
            }),
            _ => None,
        }
    }
}

fn starts_with_ignore_case(v: &str, prefix: &str) -> bool {
    v.len() >= prefix.len() && v.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// The path prefix a request's match matched, which prefix rewrites and redirects replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchedPrefix {
    /// Length of the matched prefix in bytes (without a trailing `/` for segment prefixes).
    pub len: usize,
    /// Whole segments were matched (Gateway API `PathPrefix`): the replacement follows
    /// `ReplacePrefixMatch` (see [`crate::rewrite::replace_prefix`]); otherwise it is plain
    /// text (Istio's `rewrite.uri` after a `prefix` match).
    pub segments: bool,
}

/// Where a header condition reads its value.
#[derive(Debug, Clone)]
enum HeaderSource {
    Header(HeaderName),
    Authority,
    Method,
    Path,
    Scheme,
}

#[derive(Debug, Clone)]
struct HeaderCond {
    source: HeaderSource,
    value: Option<StrMatcher>,
    invert: bool,
}

impl HeaderCond {
    fn matches(&self, parts: &Parts) -> bool {
        let found = match &self.source {
            HeaderSource::Header(name) => header_matches(&parts.headers, name, self.value.as_ref()),
            HeaderSource::Authority => value_matches(request_authority(parts), self.value.as_ref()),
            HeaderSource::Method => value_matches(Some(parts.method.as_str()), self.value.as_ref()),
            HeaderSource::Path => value_matches(
                parts.uri.path_and_query().map(|p| p.as_str()),
                self.value.as_ref(),
            ),
            HeaderSource::Scheme => value_matches(Some(request_scheme(parts)), self.value.as_ref()),
        };
        found != self.invert
    }
}

fn value_matches(v: Option<&str>, m: Option<&StrMatcher>) -> bool {
    match (v, m) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(v), Some(m)) => m.matches(v),
    }
}

fn header_matches(headers: &HeaderMap, name: &HeaderName, m: Option<&StrMatcher>) -> bool {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return false;
    };
    let Some(m) = m else { return true };
    match values.next() {
        None => first.to_str().is_ok_and(|v| m.matches(v)),
        Some(second) => {
            // Several values: Envoy matches their comma-joined concatenation.
            let mut joined = String::new();
            for v in [first, second].into_iter().chain(values) {
                let Ok(v) = v.to_str() else { return false };
                if !joined.is_empty() {
                    joined.push(',');
                }
                joined.push_str(v);
            }
            m.matches(&joined)
        }
    }
}

/// The request's authority: the URI's (HTTP/2, absolute form) or the Host header's.
pub fn request_authority(parts: &Parts) -> Option<&str> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| parts.headers.get(header::HOST)?.to_str().ok())
}

/// The request's scheme; plaintext from the app when the URI has none.
pub fn request_scheme(parts: &Parts) -> &str {
    parts.uri.scheme_str().unwrap_or("http")
}

#[derive(Debug, Clone)]
struct QueryCond {
    name: Box<str>,
    value: Option<StrMatcher>,
}

/// Percent-decodes a query component (`+` is a space); borrows when nothing is encoded.
pub fn decode_query(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => decoded.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    decoded.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => decoded.push(b'%'),
            },
            other => decoded.push(other),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&decoded).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The first value of query parameter `name` (decoded), or `None` when absent. A parameter
/// without `=` has the empty value.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<Cow<'a, str>> {
    for pair in query?.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if decode_query(k) == name {
            return Some(decode_query(v));
        }
    }
    None
}

impl QueryCond {
    fn matches(&self, parts: &Parts) -> bool {
        match query_param(parts.uri.query(), &self.name) {
            None => false,
            Some(v) => self.value.as_ref().is_none_or(|m| m.matches(&v)),
        }
    }
}

/// One compiled `HttpMatch`: every condition must hold.
#[derive(Debug, Clone, Default)]
pub struct CompiledMatch {
    port: Option<u16>,
    method: Option<StrMatcher>,
    uri: Option<StrMatcher>,
    authority: Option<StrMatcher>,
    scheme: Option<StrMatcher>,
    headers: Vec<HeaderCond>,
    query: Vec<QueryCond>,
}

impl CompiledMatch {
    fn compile(m: &model::HttpMatch, field: &str) -> Result<Self, ConfigError> {
        let opt = |s: &Option<StringMatch>, ic: bool, f: &str| {
            s.as_ref()
                .map(|s| StrMatcher::compile(s, ic, &format!("{field}.{f}")))
                .transpose()
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for (i, h) in m.headers.iter().enumerate() {
            let f = format!("{field}.headers[{i}]");
            let lower = h.name.to_ascii_lowercase();
            let source = match lower.as_str() {
                ":authority" | "host" => HeaderSource::Authority,
                ":method" => HeaderSource::Method,
                ":path" => HeaderSource::Path,
                ":scheme" => HeaderSource::Scheme,
                _ => HeaderSource::Header(
                    HeaderName::from_bytes(lower.as_bytes())
                        .map_err(|_| invalid(format!("{f}.name"), "not a header name"))?,
                ),
            };
            headers.push(HeaderCond {
                source,
                value: h
                    .value
                    .as_ref()
                    .map(|v| StrMatcher::compile(v, false, &format!("{f}.value")))
                    .transpose()?,
                invert: h.invert,
            });
        }
        let mut query = Vec::with_capacity(m.query_params.len());
        for (i, q) in m.query_params.iter().enumerate() {
            query.push(QueryCond {
                name: q.name.as_str().into(),
                value: q
                    .value
                    .as_ref()
                    .map(|v| StrMatcher::compile(v, false, &format!("{field}.queryParams[{i}]")))
                    .transpose()?,
            });
        }
        Ok(CompiledMatch {
            port: m.port,
            method: opt(&m.method, false, "method")?,
            uri: opt(&m.uri, m.ignore_uri_case, "uri")?,
            authority: opt(&m.authority, false, "authority")?,
            scheme: opt(&m.scheme, false, "scheme")?,
            headers,
            query,
        })
    }

    /// True when the request satisfies every condition.
    pub fn matches(&self, parts: &Parts, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        if let Some(m) = &self.method
            && !m.matches(parts.method.as_str())
        {
            return false;
        }
        if let Some(m) = &self.uri
            && !m.matches(parts.uri.path())
        {
            return false;
        }
        if let Some(m) = &self.authority
            && !request_authority(parts).is_some_and(|a| m.matches(a))
        {
            return false;
        }
        if let Some(m) = &self.scheme
            && !m.matches(request_scheme(parts))
        {
            return false;
        }
        self.headers.iter().all(|h| h.matches(parts)) && self.query.iter().all(|q| q.matches(parts))
    }

    /// The path prefix this match matched (for prefix rewrites and redirects).
    pub fn matched_prefix(&self) -> Option<MatchedPrefix> {
        self.uri.as_ref().and_then(StrMatcher::matched_prefix)
    }
}

/// A destination of a forwarding route.
#[derive(Debug)]
pub struct Destination {
    /// The cluster.
    pub cluster: Arc<Cluster>,
    /// Relative weight.
    pub weight: u32,
    /// Header changes on requests sent here (applied before the route's).
    pub request_headers: HeaderOps,
    /// Header changes on responses from here (applied before the route's).
    pub response_headers: HeaderOps,
}

/// What a forwarding route does.
#[derive(Debug)]
pub struct Forward {
    /// Weighted destinations.
    pub destinations: Vec<Destination>,
    total_weight: u64,
    /// Path and authority rewrite.
    pub rewrite: Option<Rewrite>,
    /// Whole-request timeout, retries included.
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: Option<RetryPolicy>,
    /// Shadow destinations.
    pub mirrors: Vec<MirrorPolicy>,
}

impl Forward {
    /// A route to one cluster without any policy (a port without routes).
    pub fn to(cluster: Arc<Cluster>) -> Forward {
        Forward {
            destinations: vec![Destination {
                cluster,
                weight: 1,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
            }],
            total_weight: 1,
            rewrite: None,
            timeout: None,
            retry: None,
            mirrors: Vec::new(),
        }
    }

    /// Picks a destination by weight with `roll` uniform in `0..total_weight()`.
    pub fn destination_for(&self, roll: u64) -> &Destination {
        let mut acc = 0u64;
        for d in &self.destinations {
            acc += u64::from(d.weight);
            if roll < acc {
                return d;
            }
        }
        // Weights all zero: Envoy refuses such a config; take the first.
        &self.destinations[0]
    }

    /// Sum of the weights.
    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// Picks a destination by weight.
    pub fn pick_destination(&self) -> &Destination {
        if self.destinations.len() == 1 || self.total_weight == 0 {
            return &self.destinations[0];
        }
        self.destination_for(fastrand::u64(..self.total_weight))
    }
}

/// What a route does with a matching request.
#[derive(Debug)]
pub enum Action {
    /// Forward upstream.
    Forward(Forward),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with a fixed response.
    Direct(DirectResponse),
}

/// One compiled route.
#[derive(Debug)]
pub struct CompiledRoute {
    /// Name for logs (`<index>` when the config names none).
    pub name: Arc<str>,
    matches: Vec<CompiledMatch>,
    /// What to do.
    pub action: Action,
    /// Request header changes (after the destination's).
    pub request_headers: HeaderOps,
    /// Response header changes (after the destination's).
    pub response_headers: HeaderOps,
    /// Fault injection.
    pub fault: Option<Fault>,
    /// CORS.
    pub cors: Option<Cors>,
}

impl CompiledRoute {
    /// A catch-all route forwarding to `cluster` (a port without routes).
    pub fn default_to(cluster: Arc<Cluster>) -> CompiledRoute {
        CompiledRoute {
            name: Arc::from("default"),
            matches: Vec::new(),
            action: Action::Forward(Forward::to(cluster)),
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            fault: None,
            cors: None,
        }
    }

    fn compile(
        r: &model::HttpRoute,
        field: &str,
        index: usize,
        clusters: &HashMap<&str, Arc<Cluster>>,
    ) -> Result<Self, ConfigError> {
        let cluster = |name: &str, f: &str| {
            clusters
                .get(name)
                .cloned()
                .ok_or_else(|| invalid(f, format!("no cluster named {name:?}")))
        };
        let matches = r
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| CompiledMatch::compile(m, &format!("{field}.matches[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let action = match &r.action {
            HttpAction::Forward(f) => {
                let af = format!("{field}.action.forward");
                let mut destinations = Vec::with_capacity(f.destinations.len());
                for (i, d) in f.destinations.iter().enumerate() {
                    let df = format!("{af}.destinations[{i}]");
                    destinations.push(Destination {
                        cluster: cluster(&d.cluster, &format!("{df}.cluster"))?,
                        weight: d.weight,
                        request_headers: HeaderOps::compile(
                            &d.request_headers,
                            &format!("{df}.requestHeaders"),
                        )?,
                        response_headers: HeaderOps::compile(
                            &d.response_headers,
                            &format!("{df}.responseHeaders"),
                        )?,
                    });
                }
                if destinations.is_empty() {
                    return Err(invalid(format!("{af}.destinations"), "is empty"));
                }
                let mut mirrors = Vec::with_capacity(f.mirrors.len());
                for (i, m) in f.mirrors.iter().enumerate() {
                    mirrors.push(MirrorPolicy {
                        cluster: cluster(&m.cluster, &format!("{af}.mirrors[{i}].cluster"))?,
                        percentage: m.percentage,
                    });
                }
                Action::Forward(Forward {
                    total_weight: destinations.iter().map(|d| u64::from(d.weight)).sum(),
                    destinations,
                    rewrite: f
                        .rewrite
                        .as_ref()
                        .map(|rw| Rewrite::compile(rw, &format!("{af}.rewrite")))
                        .transpose()?,
                    timeout: f.timeout_ms.filter(|t| *t > 0).map(Duration::from_millis),
                    retry: f
                        .retries
                        .as_ref()
                        .filter(|p| p.attempts > 0)
                        .map(RetryPolicy::compile),
                    mirrors,
                })
            }
            HttpAction::Redirect(rd) => {
                Action::Redirect(Redirect::compile(rd, &format!("{field}.action.redirect"))?)
            }
            HttpAction::DirectResponse(d) => Action::Direct(DirectResponse::compile(
                d,
                &format!("{field}.action.directResponse"),
            )?),
        };
        Ok(CompiledRoute {
            name: Arc::from(if r.name.is_empty() {
                index.to_string()
            } else {
                r.name.clone()
            }),
            matches,
            action,
            request_headers: HeaderOps::compile(
                &r.request_headers,
                &format!("{field}.requestHeaders"),
            )?,
            response_headers: HeaderOps::compile(
                &r.response_headers,
                &format!("{field}.responseHeaders"),
            )?,
            fault: r.fault.as_ref().map(Fault::compile),
            cors: r
                .cors
                .as_ref()
                .map(|c| Cors::compile(c, &format!("{field}.cors")))
                .transpose()?,
        })
    }
}

/// The route a request selected, and which of its matches matched.
#[derive(Debug, Clone, Copy)]
pub struct Selection<'a> {
    /// The route.
    pub route: &'a CompiledRoute,
    /// The match that matched; `None` for a route without conditions.
    pub matched: Option<&'a CompiledMatch>,
}

impl Selection<'_> {
    /// The path prefix the match matched.
    pub fn matched_prefix(&self) -> Option<MatchedPrefix> {
        self.matched.and_then(CompiledMatch::matched_prefix)
    }
}

/// The routes of one service port.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
}

impl RouteTable {
    /// Compiles a port's routes; `field` locates them in errors.
    pub fn compile(
        routes: &[model::HttpRoute],
        field: &str,
        clusters: &HashMap<&str, Arc<Cluster>>,
    ) -> Result<Self, ConfigError> {
        Ok(RouteTable {
            routes: routes
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    CompiledRoute::compile(r, &format!("{field}.httpRoutes[{i}]"), i, clusters)
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// A table with one catch-all route to `cluster`.
    pub fn single(cluster: Arc<Cluster>) -> Self {
        RouteTable {
            routes: vec![CompiledRoute::default_to(cluster)],
        }
    }

    /// The first route matching the request to `port`; `None`: answer 404.
    pub fn select<'a>(&'a self, parts: &Parts, port: u16) -> Option<Selection<'a>> {
        for route in &self.routes {
            if route.matches.is_empty() {
                return Some(Selection {
                    route,
                    matched: None,
                });
            }
            if let Some(m) = route.matches.iter().find(|m| m.matches(parts, port)) {
                return Some(Selection {
                    route,
                    matched: Some(m),
                });
            }
        }
        None
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[CompiledRoute] {
        &self.routes
    }
}

/// One compiled TCP / TLS route.
#[derive(Debug)]
pub struct TcpRouteEntry {
    matches: Vec<model::TcpMatch>,
    /// Weighted destinations.
    pub destinations: Vec<(Arc<Cluster>, u32)>,
}

/// The TCP and TLS routes of one service port.
#[derive(Debug, Default)]
pub struct TcpRouteTable {
    routes: Vec<TcpRouteEntry>,
}

/// What a connection offers to TCP route matching.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFacts<'a> {
    /// Port the client connected to.
    pub port: u16,
    /// Original destination.
    pub dst: SocketAddr,
    /// SNI of the client's ClientHello, if it sent one.
    pub sni: Option<&'a str>,
}

/// `*.example.com` matches `a.example.com` (not `example.com`); otherwise case-insensitive
/// equality.
pub fn sni_matches(pattern: &str, sni: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            sni.len() > suffix.len()
                && sni.as_bytes()[sni.len() - suffix.len()..]
                    .eq_ignore_ascii_case(suffix.as_bytes())
        }
        None => pattern.eq_ignore_ascii_case(sni),
    }
}

fn tcp_match(m: &model::TcpMatch, facts: &ConnectionFacts<'_>) -> bool {
    if m.port.is_some_and(|p| p != facts.port) {
        return false;
    }
    if !m.sni_hosts.is_empty()
        && !facts
            .sni
            .is_some_and(|sni| m.sni_hosts.iter().any(|p| sni_matches(p, sni)))
    {
        return false;
    }
    let ip: IpAddr = facts.dst.ip();
    m.destination_subnets.is_empty() || m.destination_subnets.iter().any(|n| n.contains(&ip))
}

impl TcpRouteTable {
    /// Compiles a port's TCP routes.
    pub fn compile(
        routes: &[model::TcpRoute],
        field: &str,
        clusters: &HashMap<&str, Arc<Cluster>>,
    ) -> Result<Self, ConfigError> {
        let mut out = Vec::with_capacity(routes.len());
        for (i, r) in routes.iter().enumerate() {
            let mut destinations = Vec::with_capacity(r.destinations.len());
            for (d, dest) in r.destinations.iter().enumerate() {
                let c = clusters
                    .get(dest.cluster.as_str())
                    .cloned()
                    .ok_or_else(|| {
                        invalid(
                            format!("{field}.tcpRoutes[{i}].destinations[{d}].cluster"),
                            format!("no cluster named {:?}", dest.cluster),
                        )
                    })?;
                destinations.push((c, dest.weight));
            }
            out.push(TcpRouteEntry {
                matches: r.matches.clone(),
                destinations,
            });
        }
        Ok(TcpRouteTable { routes: out })
    }

    /// True when no route exists.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// True when some route looks at the SNI (the ClientHello must be read first).
    pub fn needs_sni(&self) -> bool {
        self.routes
            .iter()
            .any(|r| r.matches.iter().any(|m| !m.sni_hosts.is_empty()))
    }

    /// The first matching route.
    pub fn select(&self, facts: &ConnectionFacts<'_>) -> Option<&TcpRouteEntry> {
        self.routes
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| tcp_match(m, facts)))
    }
}

impl TcpRouteEntry {
    /// Picks a destination cluster by weight; `None` when the route has none.
    pub fn pick(&self) -> Option<&Arc<Cluster>> {
        let total: u64 = self.destinations.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return self.destinations.first().map(|(c, _)| c);
        }
        let mut roll = fastrand::u64(..total);
        for (c, w) in &self.destinations {
            if roll < u64::from(*w) {
                return Some(c);
            }
            roll -= u64::from(*w);
        }
        self.destinations.first().map(|(c, _)| c)
    }
}

/// Parses YAML the way `Snapshot::from_yaml` does (enums as single-key maps).
#[cfg(test)]
pub(crate) fn test_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let v: serde_json::Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    serde_json::from_value(v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn matcher(yaml: &str) -> CompiledMatch {
        let m: model::HttpMatch = test_yaml(yaml).expect("yaml");
        CompiledMatch::compile(&m, "m").expect("compiles")
    }

    #[test]
    fn uri_exact_prefix_regex_full_match() {
        let exact = matcher("uri: {exact: /a}");
        assert!(exact.matches(&parts("/a", &[]), 80));
        assert!(!exact.matches(&parts("/a/b", &[]), 80));
        assert!(
            exact.matches(&parts("/a?x=1", &[]), 80),
            "query is not path"
        );
        let prefix = matcher("uri: {prefix: /api}");
        assert!(prefix.matches(&parts("/api/v1", &[]), 80));
        assert!(
            prefix.matches(&parts("/apiary", &[]), 80),
            "Istio prefix is textual"
        );
        assert!(!prefix.matches(&parts("/ap", &[]), 80));
        assert_eq!(
            prefix.matched_prefix(),
            Some(MatchedPrefix {
                len: 4,
                segments: false
            })
        );
        let re = matcher("uri: {regex: '/v[0-9]+'}");
        assert!(re.matches(&parts("/v12", &[]), 80));
        assert!(
            !re.matches(&parts("/v12/x", &[]), 80),
            "regex must match the whole path"
        );
        assert!(!re.matches(&parts("/x/v1", &[]), 80));
        let alt = matcher("uri: {regex: '/a|/b'}");
        assert!(
            !alt.matches(&parts("/a/c", &[]), 80),
            "anchoring wraps alternations"
        );
    }

    #[test]
    fn segment_prefix_matches_whole_segments() {
        let m = matcher("uri: {segmentPrefix: /old}");
        for p in ["/old", "/old/", "/old/x", "/old/x/y", "/old?q=1"] {
            assert!(m.matches(&parts(p, &[]), 80), "{p}");
        }
        for p in ["/oldish", "/old-x", "/ol", "/", "/x/old"] {
            assert!(!m.matches(&parts(p, &[]), 80), "{p}");
        }
        assert_eq!(
            m.matched_prefix(),
            Some(MatchedPrefix {
                len: 4,
                segments: true
            })
        );
        let slash = matcher("uri: {segmentPrefix: /old/}");
        assert!(
            slash.matches(&parts("/old", &[]), 80),
            "trailing / of the prefix ignored"
        );
        assert!(slash.matches(&parts("/old/x", &[]), 80));
        assert!(!slash.matches(&parts("/oldish", &[]), 80));
        assert_eq!(slash.matched_prefix().map(|p| p.len), Some(4));
        let root = matcher("uri: {segmentPrefix: /}");
        for p in ["/", "/a", "/a/b/"] {
            assert!(root.matches(&parts(p, &[]), 80), "{p}");
        }
        assert_eq!(root.matched_prefix().map(|p| p.len), Some(0));
        let ic = matcher("{uri: {segmentPrefix: /API}, ignoreUriCase: true}");
        assert!(ic.matches(&parts("/api/v1", &[]), 80));
        assert!(!ic.matches(&parts("/apix", &[]), 80));
        // The Istio kind next to it stays textual.
        assert!(matcher("uri: {prefix: /old}").matches(&parts("/oldish", &[]), 80));
    }

    #[test]
    fn ignore_uri_case() {
        let m = matcher("{uri: {prefix: /API}, ignoreUriCase: true}");
        assert!(m.matches(&parts("/api/x", &[]), 80));
        let m = matcher("{uri: {exact: /Login}, ignoreUriCase: true}");
        assert!(m.matches(&parts("/LOGIN", &[]), 80));
        let m = matcher("{uri: {regex: '/log.n'}, ignoreUriCase: true}");
        assert!(m.matches(&parts("/LOGIN", &[]), 80));
        let m = matcher("{uri: {exact: /Login}}");
        assert!(!m.matches(&parts("/login", &[]), 80));
    }

    #[test]
    fn headers_presence_and_without_headers() {
        let m = matcher("headers: [{name: End-User, value: {exact: jason}}]");
        assert!(m.matches(&parts("/", &[("end-user", "jason")]), 80));
        assert!(!m.matches(&parts("/", &[("end-user", "json")]), 80));
        assert!(!m.matches(&parts("/", &[]), 80));
        let present = matcher("headers: [{name: x-canary}]");
        assert!(present.matches(&parts("/", &[("x-canary", "")]), 80));
        assert!(!present.matches(&parts("/", &[]), 80));
        let without = matcher("headers: [{name: x-canary, value: {prefix: t}, invert: true}]");
        assert!(without.matches(&parts("/", &[]), 80));
        assert!(without.matches(&parts("/", &[("x-canary", "false")]), 80));
        assert!(!without.matches(&parts("/", &[("x-canary", "true")]), 80));
        let re = matcher("headers: [{name: cookie, value: {regex: '.*user=(a|b).*'}}]");
        assert!(re.matches(&parts("/", &[("cookie", "x=1; user=b; y=2")]), 80));
        let multi = matcher("headers: [{name: x-v, value: {exact: '1,2'}}]");
        assert!(multi.matches(&parts("/", &[("x-v", "1"), ("x-v", "2")]), 80));
    }

    #[test]
    fn method_authority_scheme_port_and_query() {
        let m = matcher(
            "{method: {exact: POST}, authority: {prefix: reviews}, scheme: {exact: http}, port: 9080}",
        );
        let mut p = parts("/", &[("host", "reviews:9080")]);
        p.method = http::Method::POST;
        assert!(m.matches(&p, 9080));
        assert!(!m.matches(&p, 80), "port");
        p.method = http::Method::GET;
        assert!(!m.matches(&p, 9080), "method");
        let h2 = parts("http://reviews.ns/x", &[]);
        let m = matcher("authority: {exact: reviews.ns}");
        assert!(m.matches(&h2, 80), "absolute-form authority");
        let q = matcher("queryParams: [{name: v, value: {exact: 'a b'}}, {name: debug}]");
        assert!(q.matches(&parts("/?x=1&v=a%20b&debug", &[]), 80));
        assert!(q.matches(&parts("/?v=a+b&debug=", &[]), 80));
        assert!(!q.matches(&parts("/?v=a+b", &[]), 80));
        assert!(!q.matches(&parts("/?v=ab&debug", &[]), 80));
        let pseudo = matcher("headers: [{name: ':method', value: {exact: GET}}]");
        assert!(pseudo.matches(&parts("/", &[]), 80));
    }

    #[test]
    fn query_decoding() {
        assert_eq!(decode_query("a%2Fb+c"), "a/b c");
        assert_eq!(decode_query("100%"), "100%");
        assert_eq!(decode_query("%zz"), "%zz");
        assert!(matches!(decode_query("plain"), Cow::Borrowed(_)));
        assert_eq!(query_param(Some("a=1&b=2&a=3"), "a").as_deref(), Some("1"));
        assert_eq!(query_param(Some("flag"), "flag").as_deref(), Some(""));
        assert_eq!(query_param(None, "a"), None);
    }

    #[test]
    fn bad_regex_names_the_field() {
        let m: model::HttpMatch = test_yaml("uri: {regex: '('}").expect("yaml");
        let e = CompiledMatch::compile(&m, "routes[0]").expect_err("bad regex");
        assert_eq!(e.field, "routes[0].uri");
    }

    #[test]
    fn sni_wildcards() {
        assert!(sni_matches("*.example.com", "a.example.com"));
        assert!(sni_matches("*.example.com", "A.b.Example.com"));
        assert!(!sni_matches("*.example.com", "example.com"));
        assert!(sni_matches("api.example.com", "API.example.com"));
        assert!(!sni_matches("api.example.com", "www.example.com"));
    }
}
