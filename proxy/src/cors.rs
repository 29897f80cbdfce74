//! CORS (VirtualService `corsPolicy`), as Envoy's cors filter does it: a preflight from an
//! allowed origin is answered by the proxy; an actual request from an allowed origin goes
//! upstream and its response gains the `access-control-*` headers. Requests from other
//! origins pass through untouched.

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use weft_api::config::{self as model, ConfigError};

use crate::http::{self as h, Body};
use crate::route::StrMatcher;

/// A compiled CORS policy.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: Vec<StrMatcher>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
}

fn joined(items: &[String], field: &str) -> Result<Option<HeaderValue>, ConfigError> {
    if items.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(&items.join(","))
        .map(Some)
        .map_err(|_| ConfigError {
            field: field.to_owned(),
            reason: "not a header value".to_owned(),
        })
}

impl Cors {
    /// Compiles a policy.
    pub fn compile(c: &model::CorsPolicy, field: &str) -> Result<Self, ConfigError> {
        Ok(Cors {
            origins: c
                .allow_origins
                .iter()
                .enumerate()
                .map(|(i, o)| StrMatcher::compile(o, false, &format!("{field}.allowOrigins[{i}]")))
                .collect::<Result<_, _>>()?,
            allow_methods: joined(&c.allow_methods, &format!("{field}.allowMethods"))?,
            allow_headers: joined(&c.allow_headers, &format!("{field}.allowHeaders"))?,
            expose_headers: joined(&c.expose_headers, &format!("{field}.exposeHeaders"))?,
            max_age: c.max_age_secs.map(HeaderValue::from),
            allow_credentials: c.allow_credentials == Some(true),
        })
    }

    /// The request's `Origin` when the policy allows it.
    pub fn allowed_origin<'a>(&self, headers: &'a HeaderMap) -> Option<&'a HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let s = origin.to_str().ok()?;
        self.origins.iter().any(|m| m.matches(s)).then_some(origin)
    }

    /// The answer to a preflight from an allowed origin; `None` for anything else (the
    /// request then goes upstream as usual).
    pub fn preflight(&self, parts: &Parts) -> Option<Response<Body>> {
        if parts.method != Method::OPTIONS
            || !parts
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return None;
        }
        let origin = self.allowed_origin(&parts.headers)?.clone();
        let mut resp = Response::new(h::empty());
        *resp.status_mut() = StatusCode::OK;
        let hs = resp.headers_mut();
        hs.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if let Some(v) = &self.allow_methods {
            hs.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v.clone());
        }
        if let Some(v) = &self.allow_headers {
            hs.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if let Some(v) = &self.max_age {
            hs.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if self.allow_credentials {
            hs.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        Some(resp)
    }

    /// Adds the response headers of an actual request from the allowed `origin`.
    pub fn decorate(&self, origin: HeaderValue, headers: &mut HeaderMap) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.allow_credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose_headers {
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn cors() -> Cors {
        Cors::compile(
            &crate::route::test_yaml(
                "{allowOrigins: [{exact: 'https://a.example'}, {regex: 'https://.*\\.b\\.example'}],
                  allowMethods: [GET, POST], allowHeaders: [x-token], exposeHeaders: [x-trace],
                  maxAgeSecs: 600, allowCredentials: true}",
            )
            .expect("yaml"),
            "cors",
        )
        .expect("compiles")
    }

    fn parts(method: Method, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().method(method).uri("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn preflight_from_allowed_origin_is_answered() {
        let c = cors();
        let p = parts(
            Method::OPTIONS,
            &[
                ("origin", "https://x.b.example"),
                ("access-control-request-method", "POST"),
            ],
        );
        let r = c.preflight(&p).expect("answered");
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], "https://x.b.example");
        assert_eq!(h["access-control-allow-methods"], "GET,POST");
        assert_eq!(h["access-control-allow-headers"], "x-token");
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["access-control-allow-credentials"], "true");
    }

    #[test]
    fn other_origins_and_plain_options_pass_through() {
        let c = cors();
        let p = parts(
            Method::OPTIONS,
            &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "POST"),
            ],
        );
        assert!(c.preflight(&p).is_none());
        let p = parts(Method::OPTIONS, &[("origin", "https://a.example")]);
        assert!(
            c.preflight(&p).is_none(),
            "no Access-Control-Request-Method"
        );
    }

    #[test]
    fn simple_request_is_decorated() {
        let c = cors();
        let p = parts(Method::GET, &[("origin", "https://a.example")]);
        let origin = c.allowed_origin(&p.headers).expect("allowed").clone();
        let mut h = HeaderMap::new();
        c.decorate(origin, &mut h);
        assert_eq!(h["access-control-allow-origin"], "https://a.example");
        assert_eq!(h["access-control-expose-headers"], "x-trace");
        let p = parts(Method::GET, &[("origin", "https://c.example")]);
        assert!(c.allowed_origin(&p.headers).is_none());
    }
}
