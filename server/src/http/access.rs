//! etcd's access control of the HTTP requests on the client URLs (its `accessController`):
//!
//! - `--host-whitelist`: over plain http, a request whose `Host` is not listed is refused with
//!   `421` and etcd's explanation (DNS rebinding, CVE-2018-5702). Empty or `*`: every host.
//! - `--cors`: the CORS headers, with `*` when every origin is allowed (empty or `*`, the
//!   default), else with the request's `Origin` when it is listed; an `OPTIONS` request (a
//!   browser's preflight) is answered with them alone.
//!
//! gRPC requests are not HTTP requests in this sense: etcd serves them apart, and so does Keel
//! (this layer wraps only the HTTP routes).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode};

/// The `--cors` and `--host-whitelist` policies. `None`: everything is allowed.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub origins: Option<Vec<String>>,
    pub hosts: Option<Vec<String>>,
}

impl Access {
    /// The policy of two comma-separated lists (`*` or empty: all).
    pub fn new(cors: &str, host_whitelist: &str) -> Access {
        let list = |s: &str| {
            let items: Vec<String> = s
                .split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(str::to_string)
                .collect();
            (!items.is_empty() && !items.iter().any(|i| i == "*")).then_some(items)
        };
        Access {
            origins: list(cors),
            hosts: list(host_whitelist),
        }
    }
}

/// `text` as Go's `http.Error` writes it.
pub fn text_response(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(format!("{text}\n")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// etcd's answer to a request for a host not in the whitelist.
fn misdirected(host: &str) -> String {
    format!(
        r#"
etcd received your request, but the Host header was unrecognized.

To fix this, choose one of the following options:
- Enable TLS, then any HTTPS request will be allowed.
- Add the hostname you want to use to the whitelist in settings.
  - e.g. etcd --host-whitelist {host:?}

This requirement has been added to help prevent "DNS Rebinding" attacks (CVE-2018-5702).
"#
    )
}

/// The host name a request is for (its `Host` without the port), as etcd's `GetHostname`.
fn hostname(request: &Request<Body>) -> String {
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    match host.rsplit_once(':') {
        // `[::1]:2379` and `host:2379`; a bare IPv6 address has no port to drop.
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            name.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        }
        _ => host,
    }
}

/// The middleware.
pub async fn check(
    State(access): State<Arc<Access>>,
    request: Request<Body>,
    next: axum::middleware::Next,
) -> Response<Body> {
    // A TLS connection's requests carry its identity; only plain http is checked.
    let tls = request
        .extensions()
        .get::<crate::tls::incoming::Identity>()
        .is_some();
    if let (false, Some(hosts)) = (tls, &access.hosts) {
        let host = hostname(&request);
        if !hosts.contains(&host) {
            tracing::warn!(%host, "rejecting HTTP request to prevent DNS rebinding attacks");
            // etcd writes it with `http.Error`, which adds a newline to the one it ends with.
            return text_response(StatusCode::MISDIRECTED_REQUEST, &misdirected(&host));
        }
    }
    let origin = match &access.origins {
        None => Some(HeaderValue::from_static("*")),
        Some(origins) => request
            .headers()
            .get(axum::http::header::ORIGIN)
            .filter(|o| o.to_str().is_ok_and(|o| origins.iter().any(|a| a == o)))
            .cloned(),
    };
    let mut response = if request.method() == Method::OPTIONS {
        Response::new(Body::empty())
    } else {
        next.run(request).await
    };
    if let Some(origin) = origin {
        let headers = response.headers_mut();
        headers.insert(
            "access-control-allow-methods",
            HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
        );
        headers.insert("access-control-allow-origin", origin);
        headers.insert(
            "access-control-allow-headers",
            HeaderValue::from_static("accept, content-type, authorization"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_with_a_star_or_nothing_allow_all() {
        assert!(Access::new("*", "").origins.is_none());
        assert!(Access::new("", "*").hosts.is_none());
        assert!(Access::new("http://a,*", "a").origins.is_none());
        let a = Access::new(
            "http://a.example, http://b.example",
            "localhost,example.com",
        );
        assert_eq!(a.origins.unwrap(), ["http://a.example", "http://b.example"]);
        assert_eq!(a.hosts.unwrap(), ["localhost", "example.com"]);
    }

    #[test]
    fn the_hostname_drops_the_port() {
        let req = |host: &str| {
            Request::builder()
                .header("host", host)
                .body(Body::empty())
                .unwrap()
        };
        assert_eq!(hostname(&req("example.com:2379")), "example.com");
        assert_eq!(hostname(&req("example.com")), "example.com");
        assert_eq!(hostname(&req("[::1]:2379")), "::1");
        assert_eq!(hostname(&req("127.0.0.1:2379")), "127.0.0.1");
    }
}
