//! What routes change in requests and responses: header operations, path and authority
//! rewrites, redirect locations and direct responses, following Envoy's semantics (headers
//! are removed before they are set or added; a prefix rewrite replaces the matched prefix; a
//! redirect keeps the query unless the new path carries one).
//!
//! A prefix rewrite after an Istio `prefix` match is plain text (Envoy's `prefix_rewrite`:
//! `/v1/` → `/v2/`); after a Gateway API `PathPrefix` match it follows `ReplacePrefixMatch`,
//! which works on whole segments (`/v2` replaced by `/` turns `/v2/x` into `/x`, not `//x`).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use regex::Regex;
use weft_api::config::{self as model, ConfigError};

use crate::http::{self as h, Body};
use crate::route::{MatchedPrefix, request_authority, request_scheme};

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Compiled header manipulation.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderOps {
    /// Validates names and values.
    pub fn compile(ops: &model::HeaderOps, field: &str) -> Result<Self, ConfigError> {
        let name = |n: &str, f: &str| {
            HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
                .map_err(|_| invalid(f, format!("{n:?} is not a header name")))
        };
        let pair = |(n, v): (&String, &String), f: &str| -> Result<_, ConfigError> {
            Ok((
                name(n, f)?,
                HeaderValue::from_str(v)
                    .map_err(|_| invalid(f, format!("{v:?} is not a header value")))?,
            ))
        };
        Ok(HeaderOps {
            remove: ops
                .remove
                .iter()
                .map(|n| name(n, &format!("{field}.remove")))
                .collect::<Result<_, _>>()?,
            set: ops
                .set
                .iter()
                .map(|p| pair(p, &format!("{field}.set")))
                .collect::<Result<_, _>>()?,
            add: ops
                .add
                .iter()
                .map(|p| pair(p, &format!("{field}.add")))
                .collect::<Result<_, _>>()?,
        })
    }

    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Applies remove, then set, then add.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }

    /// The value this set `name` to, if any (used for the authority).
    pub fn sets(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.set
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }
}

/// Converts Istio / RE2 style `\1` group references into the regex crate's `${1}`.
fn replacement(rewrite: &str) -> String {
    let mut out = String::with_capacity(rewrite.len() + 4);
    let mut chars = rewrite.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    out.push(d);
                    chars.next();
                }
                out.push('}');
            }
            '$' => out.push_str("$$"),
            other => out.push(other),
        }
    }
    out
}

/// `path` with its matched prefix replaced by `with`. Plain prefixes are replaced as text.
/// Segment prefixes follow the Gateway API's `ReplacePrefixMatch` table: what follows the
/// prefix is empty or starts with `/`, a trailing `/` of the replacement is dropped so that it
/// is not doubled, and an empty result is `/` (`/foo/bar` with `/foo` → `/xyz/` gives
/// `/xyz/bar`; `/foo` with `/foo` → `` gives `/`). A prefix that does not fit the path (a
/// config changed under the request) replaces the whole path.
pub fn replace_prefix(path: &str, prefix: MatchedPrefix, with: &str) -> String {
    let Some(rest) = path.get(prefix.len..) else {
        return with.to_owned();
    };
    if !prefix.segments {
        return format!("{with}{rest}");
    }
    let out = format!("{}{rest}", with.trim_end_matches('/'));
    if out.is_empty() { "/".to_owned() } else { out }
}

/// A compiled path / authority rewrite.
#[derive(Debug, Clone)]
pub struct Rewrite {
    uri: Option<String>,
    uri_regex: Option<(Regex, String)>,
    authority: Option<Authority>,
}

impl Rewrite {
    /// Compiles a rewrite.
    pub fn compile(r: &model::Rewrite, field: &str) -> Result<Self, ConfigError> {
        let uri_regex = match &r.uri_regex {
            Some(rr) => Some((
                Regex::new(&rr.pattern).map_err(|e| {
                    invalid(
                        format!("{field}.uriRegex.pattern"),
                        format!("invalid regex: {e}"),
                    )
                })?,
                replacement(&rr.rewrite),
            )),
            None => None,
        };
        let authority = match &r.authority {
            Some(a) => Some(Authority::try_from(a.as_str()).map_err(|_| {
                invalid(
                    format!("{field}.authority"),
                    format!("{a:?} is not an authority"),
                )
            })?),
            None => None,
        };
        Ok(Rewrite {
            uri: r.uri.clone(),
            uri_regex,
            authority,
        })
    }

    /// The new path for `path` (without query). `prefix` is the prefix the route matched: a
    /// `uri` rewrite replaces it ([`replace_prefix`]), or the whole path for other matches.
    pub fn path(&self, path: &str, prefix: Option<MatchedPrefix>) -> Option<String> {
        if let Some(uri) = &self.uri {
            return Some(match prefix {
                Some(p) => replace_prefix(path, p, uri),
                None => uri.clone(),
            });
        }
        let (re, with) = self.uri_regex.as_ref()?;
        Some(re.replace_all(path, with.as_str()).into_owned())
    }

    /// Rewrites the request: path (query kept) and authority (URI and Host header).
    pub fn apply(&self, parts: &mut Parts, prefix: Option<MatchedPrefix>) {
        if let Some(new_path) = self.path(parts.uri.path(), prefix) {
            let pq = match parts.uri.query() {
                Some(q) => format!("{new_path}?{q}"),
                None => new_path,
            };
            if let Ok(pq) = PathAndQuery::try_from(pq) {
                let mut up = parts.uri.clone().into_parts();
                up.path_and_query = Some(pq);
                if let Ok(uri) = Uri::from_parts(up) {
                    parts.uri = uri;
                }
            }
        }
        if let Some(a) = &self.authority {
            set_authority(parts, a.clone());
        }
    }
}

/// Replaces the request's authority in the URI (when absolute) and the Host header.
pub fn set_authority(parts: &mut Parts, authority: Authority) {
    if parts.headers.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    if parts.uri.authority().is_some() {
        let mut up = parts.uri.clone().into_parts();
        up.authority = Some(authority);
        if let Ok(uri) = Uri::from_parts(up) {
            parts.uri = uri;
        }
    }
}

/// A compiled redirect.
#[derive(Debug, Clone)]
pub struct Redirect {
    uri: Option<String>,
    prefix: Option<String>,
    authority: Option<String>,
    scheme: Option<String>,
    port: Option<u16>,
    code: StatusCode,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    // Bracketed IPv6 keeps its colons.
    if let Some(end) = authority.rfind(']') {
        let (host, rest) = authority.split_at(end + 1);
        return (host, rest.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (authority, None),
        },
        None => (authority, None),
    }
}

impl Redirect {
    /// Compiles a redirect.
    pub fn compile(r: &model::Redirect, field: &str) -> Result<Self, ConfigError> {
        let code = match r.code {
            301 | 302 | 303 | 307 | 308 => StatusCode::from_u16(r.code)
                .map_err(|_| invalid(format!("{field}.code"), "not a status"))?,
            other => {
                return Err(invalid(
                    format!("{field}.code"),
                    format!("{other} is not a redirect code (301, 302, 303, 307, 308)"),
                ));
            }
        };
        Ok(Redirect {
            uri: r.uri.clone(),
            prefix: r.prefix.clone(),
            authority: r.authority.clone(),
            scheme: r.scheme.clone(),
            port: r.port,
            code,
        })
    }

    /// The `Location` for a request; `prefix` is the path prefix the route matched.
    pub fn location(&self, parts: &Parts, prefix: Option<MatchedPrefix>) -> String {
        let orig_scheme = request_scheme(parts);
        let scheme = self.scheme.as_deref().unwrap_or(orig_scheme);
        let orig_authority = request_authority(parts).unwrap_or_default();
        let (host, port) = match &self.authority {
            Some(a) => split_host_port(a),
            None => {
                let (host, port) = split_host_port(orig_authority);
                // A scheme change drops the old scheme's port (Envoy does the same).
                if scheme != orig_scheme {
                    (host, None)
                } else {
                    (host, port)
                }
            }
        };
        let port = self
            .port
            .or(port)
            .filter(|p| Some(*p) != default_port(scheme));
        let path = parts.uri.path();
        let (new_path, query) = match (&self.uri, &self.prefix) {
            (Some(uri), _) => match uri.split_once('?') {
                Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                None => (uri.clone(), parts.uri.query().map(str::to_owned)),
            },
            (None, Some(with)) => (
                match prefix {
                    Some(p) => replace_prefix(path, p, with),
                    None => with.clone(),
                },
                parts.uri.query().map(str::to_owned),
            ),
            (None, None) => (path.to_owned(), parts.uri.query().map(str::to_owned)),
        };
        let mut out = format!("{scheme}://{host}");
        if let Some(p) = port {
            out.push_str(&format!(":{p}"));
        }
        out.push_str(&new_path);
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            out.push('?');
            out.push_str(&q);
        }
        out
    }

    /// The redirect response.
    pub fn response(&self, parts: &Parts, prefix: Option<MatchedPrefix>) -> Response<Body> {
        let location = self.location(parts, prefix);
        let mut resp = Response::new(h::empty());
        *resp.status_mut() = self.code;
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp
    }
}

/// A compiled direct response.
#[derive(Debug, Clone)]
pub struct DirectResponse {
    status: StatusCode,
    body: Option<Bytes>,
}

impl DirectResponse {
    /// Compiles a direct response.
    pub fn compile(d: &model::DirectResponse, field: &str) -> Result<Self, ConfigError> {
        Ok(DirectResponse {
            status: StatusCode::from_u16(d.status)
                .map_err(|_| invalid(format!("{field}.status"), "not an HTTP status"))?,
            body: d.body.clone().map(Bytes::from),
        })
    }

    /// The response.
    pub fn response(&self) -> Response<Body> {
        let mut resp = match &self.body {
            Some(b) => {
                let mut r =
                    Response::new(Full::new(b.clone()).map_err(|e| match e {}).boxed_unsync());
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                r
            }
            None => Response::new(h::empty()),
        };
        *resp.status_mut() = self.status;
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(uri: &str, host: Option<&str>) -> Parts {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn rewrite(yaml: &str) -> Rewrite {
        Rewrite::compile(&crate::route::test_yaml(yaml).expect("yaml"), "r").expect("compiles")
    }

    fn redirect(yaml: &str) -> Redirect {
        Redirect::compile(&crate::route::test_yaml(yaml).expect("yaml"), "r").expect("compiles")
    }

    #[test]
    fn header_ops_remove_then_set_then_add() {
        let ops = HeaderOps::compile(
            &crate::route::test_yaml(
                "{set: {X-A: '1', x-b: '2'}, add: {x-b: '3'}, remove: [x-gone, x-b]}",
            )
            .expect("yaml"),
            "ops",
        )
        .expect("compiles");
        let mut h = HeaderMap::new();
        h.insert("x-gone", HeaderValue::from_static("bye"));
        h.insert("x-b", HeaderValue::from_static("old"));
        h.insert("x-a", HeaderValue::from_static("old"));
        ops.apply(&mut h);
        assert!(!h.contains_key("x-gone"));
        assert_eq!(h["x-a"], "1");
        let b: Vec<_> = h.get_all("x-b").iter().collect();
        assert_eq!(b, ["2", "3"], "set replaces, add appends, remove ran first");
        let bad = HeaderOps::compile(
            &crate::route::test_yaml("{set: {'bad name': x}}").expect("yaml"),
            "ops",
        );
        assert_eq!(bad.expect_err("invalid").field, "ops.set");
    }

    fn plain(len: usize) -> Option<MatchedPrefix> {
        Some(MatchedPrefix {
            len,
            segments: false,
        })
    }

    #[test]
    fn prefix_rewrite_replaces_the_matched_prefix() {
        let r = rewrite("uri: /v2");
        assert_eq!(r.path("/v1/users", plain(3)).as_deref(), Some("/v2/users"));
        assert_eq!(
            r.path("/exact", None).as_deref(),
            Some("/v2"),
            "exact: whole path"
        );
        let root = rewrite("uri: /");
        assert_eq!(
            root.path("/api/x", plain(5)).as_deref(),
            Some("/x"),
            "prefix /api/ → /"
        );
        assert_eq!(
            root.path("/api/x", plain(4)).as_deref(),
            Some("//x"),
            "Istio's prefix rewrite is plain text, as Envoy's prefix_rewrite"
        );
        let mut p = parts("http://svc:80/v1/users?id=7", None);
        r.apply(&mut p, plain(3));
        assert_eq!(p.uri, "http://svc:80/v2/users?id=7", "query kept");
    }

    /// Matches `path` against a Gateway API `PathPrefix` as the route table does and returns
    /// what it matched.
    fn path_prefix(prefix: &str, path: &str) -> Option<MatchedPrefix> {
        let m = crate::route::StrMatcher::compile(
            &model::StringMatch::SegmentPrefix(prefix.into()),
            false,
            "m",
        )
        .expect("compiles");
        assert!(m.matches(path), "{prefix} matches {path}");
        m.matched_prefix()
    }

    #[test]
    fn replace_prefix_match_follows_the_gateway_api() {
        // The Gateway API's table for ReplacePrefixMatch, plus the cases of issue 6.
        let table = [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/v2/x", "/v2", "/", "/x"),
            ("/v2", "/v2", "/", "/"),
            ("/foo/bar", "/foo", "/new", "/new/bar"),
            ("/a/b", "/", "/c", "/c/a/b"),
        ];
        for (path, prefix, with, want) in table {
            let matched = path_prefix(prefix, path);
            // As a URLRewrite on a real request (query kept) ...
            let r = Rewrite::compile(
                &model::Rewrite {
                    uri: Some(with.into()),
                    ..Default::default()
                },
                "r",
            )
            .expect("compiles");
            let mut p = parts(&format!("http://svc.ns:80{path}?q=1"), None);
            r.apply(&mut p, matched);
            assert_eq!(
                p.uri.path_and_query().map(|pq| pq.as_str()),
                Some(format!("{want}?q=1").as_str()),
                "rewrite {path} (prefix {prefix:?}, replace {with:?})"
            );
            // ... and as a RequestRedirect.
            let rd = Redirect::compile(
                &model::Redirect {
                    prefix: Some(with.into()),
                    code: 302,
                    ..Default::default()
                },
                "r",
            )
            .expect("compiles");
            let p = parts(&format!("{path}?q=1"), Some("shop.example"));
            assert_eq!(
                rd.location(&p, matched),
                format!("http://shop.example{want}?q=1"),
                "redirect {path} (prefix {prefix:?}, replace {with:?})"
            );
        }
    }

    #[test]
    fn regex_rewrite_with_groups() {
        let r =
            rewrite("uriRegex: {pattern: '^/service/([^/]+)(/.*)$', rewrite: '\\2/instance/\\1'}");
        assert_eq!(
            r.path("/service/foo/v1/api", None).as_deref(),
            Some("/v1/api/instance/foo")
        );
        let all = rewrite("uriRegex: {pattern: 'a', rewrite: 'b'}");
        assert_eq!(
            all.path("/aaa", None).as_deref(),
            Some("/bbb"),
            "every match replaced"
        );
        assert_eq!(replacement("$x\\10"), "$$x${10}");
    }

    #[test]
    fn authority_rewrite_sets_host_and_uri() {
        let r = rewrite("authority: new.ns:8080");
        let mut p = parts("/x", Some("old:80"));
        r.apply(&mut p, None);
        assert_eq!(p.headers[header::HOST], "new.ns:8080");
        let mut p = parts("http://old:80/x", None);
        r.apply(&mut p, None);
        assert_eq!(p.uri, "http://new.ns:8080/x");
    }

    #[test]
    fn redirect_locations() {
        let p = parts("/old/page?q=1", Some("shop.example:8080"));
        assert_eq!(
            redirect("{uri: /new}").location(&p, None),
            "http://shop.example:8080/new?q=1"
        );
        assert_eq!(
            redirect("{uri: '/new?x=2'}").location(&p, None),
            "http://shop.example:8080/new?x=2",
            "a query in the new uri replaces the old one"
        );
        assert_eq!(
            redirect("{scheme: https}").location(&p, None),
            "https://shop.example/old/page?q=1",
            "scheme change drops the old port"
        );
        assert_eq!(
            redirect("{scheme: https, port: 8443, authority: secure.example}").location(&p, None),
            "https://secure.example:8443/old/page?q=1"
        );
        assert_eq!(
            redirect("{prefix: /fresh}").location(&p, plain(4)),
            "http://shop.example:8080/fresh/page?q=1"
        );
        assert_eq!(
            redirect("{port: 80}").location(&p, None),
            "http://shop.example/old/page?q=1",
            "default port omitted"
        );
        let v6 = parts("/", Some("[fd00::1]:8080"));
        assert_eq!(
            redirect("{uri: /a}").location(&v6, None),
            "http://[fd00::1]:8080/a"
        );
        let resp = redirect("{uri: /n, code: 302}").response(&p, None);
        assert_eq!(resp.status(), 302);
        assert!(
            Redirect::compile(&crate::route::test_yaml("{code: 200}").expect("yaml"), "r").is_err()
        );
    }

    #[test]
    fn direct_response() {
        let d = DirectResponse::compile(
            &crate::route::test_yaml("{status: 503, body: down}").expect("yaml"),
            "d",
        )
        .expect("compiles");
        let r = d.response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain");
    }
}
