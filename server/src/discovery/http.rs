//! A small blocking HTTP/1.1 client for the discovery service: one request per connection
//! (`Connection: close`), http or https (the system's CA bundle, as Go's default transport),
//! optionally through an HTTP proxy (`--discovery-proxy`: absolute-form requests for http,
//! `CONNECT` for https). Bodies are read by `Content-Length`, chunked, or to the end, up to a
//! bound.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// The most a response body may hold (a discovery directory lists a few members).
const MAX_BODY: usize = 4 << 20;
/// Connecting, and a whole request that is not a long poll (etcd's 5 s per Get or Create): a
/// server trickling its answer cannot hold the start past it.
const TIMEOUT: Duration = Duration::from_secs(5);
/// A long poll with no answer for this long is given up and asked again: a connection that
/// died silently does not hang the caller forever.
const LONG_POLL: Duration = Duration::from_secs(300);
/// Header lines a response may have.
const MAX_HEADER_LINES: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL {0:?}")]
    Url(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("a bad HTTP response: {0}")]
    Response(String),
}

/// A parsed `http(s)://host[:port]/path?query` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The path and query, starting with `/`.
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, HttpError> {
        let bad = || HttpError::Url(url.to_string());
        let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(bad());
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path
        };
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if after.is_empty() => default_port,
                None => return Err(bad()),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        Ok(Target {
            tls,
            host,
            port,
            path,
        })
    }

    /// `host:port` as a `Host` header and a `CONNECT` target.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A TCP stream whose reads end by a deadline: each read may wait only what is left of it (a
/// long poll has none: each read waits up to [`LONG_POLL`]).
struct Deadline {
    tcp: TcpStream,
    deadline: Option<std::time::Instant>,
    per_read: Duration,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let timeout = match self.deadline {
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "context deadline exceeded",
                    ));
                }
                left.min(self.per_read)
            }
            None => self.per_read,
        };
        self.tcp.set_read_timeout(Some(timeout))?;
        match self.tcp.read(buf) {
            // A long poll's read waited its whole time: nothing happened (not a failure).
            Err(e)
                if self.deadline.is_none()
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, QUIET))
            }
            other => other,
        }
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// The error of a long poll's read that waited its whole time.
const QUIET: &str = "nothing happened during the long poll";

/// Whether `e` is a long poll's read timing out after its request was sent (nothing happened:
/// ask again); a connect or write timeout is not.
pub fn is_quiet(e: &HttpError) -> bool {
    matches!(e, HttpError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut && io.to_string() == QUIET)
}

fn connect(host: &str, port: u16) -> Result<TcpStream, HttpError> {
    let mut last = None;
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| std::io::Error::other(format!("{host}: no address")))
        .into())
}

fn tls(host: &str, tcp: impl Read + Write + 'static) -> Result<Box<dyn Stream>, HttpError> {
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(crate::tls::system_roots())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| HttpError::Tls(e.to_string()))?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| HttpError::Tls(e.to_string()))?;
    Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
}

/// Redirects followed at most (etcd's client's `DefaultCheckRedirect`).
const MAX_REDIRECTS: usize = 10;

/// [`request_once`], following redirects as etcd's discovery client does: any 3xx answer is
/// asked again, same method and body, at its `Location` (an absolute URL: etcd's client cannot
/// follow a bare path either), at most [`MAX_REDIRECTS`] times ("client: too many redirects"),
/// all within one request's time.
pub fn request(
    method: &str,
    url: &str,
    form: Option<&str>,
    proxy: Option<&Target>,
    long_poll: bool,
) -> Result<Response, HttpError> {
    let mut url = url.to_string();
    // The deadline counts from here: connecting and redirects are part of the request's time.
    let deadline = (!long_poll).then(|| std::time::Instant::now() + TIMEOUT);
    for _ in 0..=MAX_REDIRECTS {
        let r = request_once(method, &url, form, proxy, deadline)?;
        if r.status / 100 != 3 {
            return Ok(r);
        }
        let location = r
            .header("location")
            .ok_or_else(|| HttpError::Response("location header not set".into()))?;
        url = if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            return Err(HttpError::Response(format!(
                "location header not valid URL: {location}"
            )));
        };
    }
    Err(HttpError::Response("client: too many redirects".into()))
}

/// Sends `method url` with a form `body` (if any), through `proxy` (if any), reading until
/// `deadline`; without one (a long poll) each read waits up to [`LONG_POLL`] (a watch waits as
/// long as it takes).
fn request_once(
    method: &str,
    url: &str,
    form: Option<&str>,
    proxy: Option<&Target>,
    deadline: Option<std::time::Instant>,
) -> Result<Response, HttpError> {
    let target = Target::parse(url)?;
    let long_poll = deadline.is_none();
    let (tcp, absolute) = match proxy {
        Some(p) => (connect(&p.host, p.port)?, !target.tls),
        None => (connect(&target.host, target.port)?, false),
    };
    tcp.set_write_timeout(Some(TIMEOUT))?;
    tcp.set_nodelay(true)?;
    let tcp = Deadline {
        tcp,
        deadline,
        per_read: if long_poll { LONG_POLL } else { TIMEOUT },
    };
    let mut stream: Box<dyn Stream> = match (proxy, target.tls) {
        (Some(_), true) => {
            let mut tcp = tcp;
            write!(
                tcp,
                "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n",
                a = target.authority()
            )?;
            let answer = read_response(&mut tcp, "CONNECT")?;
            if answer.status != 200 {
                return Err(HttpError::Response(format!(
                    "the proxy refused CONNECT {}: {}",
                    target.authority(),
                    answer.status
                )));
            }
            tls(&target.host, tcp)?
        }
        (None, true) => tls(&target.host, tcp)?,
        (_, false) => Box::new(tcp),
    };
    let line_target = if absolute {
        format!("http://{}{}", target.authority(), target.path)
    } else {
        target.path.clone()
    };
    let mut head = format!(
        "{method} {line_target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: keel\r\nConnection: close\r\n",
        target.authority()
    );
    if let Some(body) = form {
        head.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = form {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()?;
    read_response(stream, method)
}

/// Reads one response from `stream`. A `CONNECT` answer has no body.
fn read_response(stream: impl Read, method: &str) -> Result<Response, HttpError> {
    let bad = |what: &str| HttpError::Response(what.to_string());
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let read_line = |reader: &mut BufReader<_>, line: &mut String| -> Result<(), HttpError> {
        line.clear();
        let n = reader.by_ref().take(16 << 10).read_line(line)?;
        if n == 0 {
            return Err(bad("the connection closed in the head"));
        }
        Ok(())
    };
    read_line(&mut reader, &mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut headers = Vec::new();
    for n in 0.. {
        read_line(&mut reader, &mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if n >= MAX_HEADER_LINES {
            return Err(bad("too many headers"));
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if method == "CONNECT" {
        return Ok(response);
    }
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let length = response
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    if chunked {
        loop {
            read_line(&mut reader, &mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad("a bad chunk size"))?;
            if size == 0 {
                break;
            }
            if size > MAX_BODY - response.body.len() {
                return Err(bad("the body is too large"));
            }
            let start = response.body.len();
            response.body.resize(start + size, 0);
            reader.read_exact(&mut response.body[start..])?;
            read_line(&mut reader, &mut line)?;
        }
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return Err(bad("the body is too large"));
        }
        response.body.resize(n, 0);
        reader.read_exact(&mut response.body)?;
    } else {
        reader
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut response.body)?;
        if response.body.len() > MAX_BODY {
            return Err(bad("the body is too large"));
        }
    }
    Ok(response)
}

/// `s` encoded for a form or a query (`application/x-www-form-urlencoded`).
pub fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char);
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("https://discovery.etcd.io/3e86b59982e49066c5d813af1c2e2579cbf573de")
            .unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port),
            (true, "discovery.etcd.io", 443)
        );
        assert_eq!(t.path, "/3e86b59982e49066c5d813af1c2e2579cbf573de");
        let t = Target::parse("http://[::1]:2379/v2/keys/d?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 2379, "/v2/keys/d?x=1")
        );
        assert_eq!(t.authority(), "[::1]:2379");
        assert_eq!(Target::parse("http://h").unwrap().path, "/");
        for bad in ["ftp://h/x", "http://", "http://h:port/", "http://u@h/"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    /// A redirect is followed with the same method and body; a loop of them ends.
    #[test]
    fn redirects_are_followed_a_bounded_number_of_times() {
        let second = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let second_addr = second.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = second.accept().unwrap();
            let mut got = String::new();
            // The head and the body may come in two reads.
            for _ in 0..10 {
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).unwrap();
                got.push_str(&String::from_utf8_lossy(&buf[..n]));
                if n == 0 || got.ends_with("value=x") {
                    break;
                }
            }
            let answer = if got.starts_with("PUT /there ") && got.ends_with("value=x") {
                "HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
            } else {
                "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
            };
            conn.write_all(answer.as_bytes()).unwrap();
        });
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let first_addr = first.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = first.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{second_addr}/there\r\nContent-Length: 0\r\n\r\n"
            );
            conn.write_all(answer.as_bytes()).unwrap();
        });
        let url = format!("http://{first_addr}/here");
        let r = request("PUT", &url, Some("value=x"), None, false).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"ok"[..]));
        // A server redirecting to itself forever.
        let lp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let lp_addr = lp.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in lp.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let answer = format!(
                    "HTTP/1.1 302 Found\r\nLocation: http://{lp_addr}/again\r\nContent-Length: 0\r\n\r\n"
                );
                let _ = conn.write_all(answer.as_bytes());
            }
        });
        let e = request("GET", &format!("http://{lp_addr}/x"), None, None, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a bad HTTP response: client: too many redirects"
        );
    }

    /// A server that trickles its answer a byte a second cannot hold a request past its
    /// deadline.
    #[test]
    fn a_trickled_answer_ends_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n");
            for _ in 0..60 {
                if conn.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        let started = std::time::Instant::now();
        let e = request("GET", &format!("http://{addr}/d"), None, None, false).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(30), "{e}");
        assert!(e.to_string().contains("deadline"), "{e}");
    }

    #[test]
    fn responses_by_length_chunks_or_close() {
        let r = read_response(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Etcd-Index: 7\r\n\r\nabcdef"[..],
            "GET",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        assert_eq!(r.header("x-etcd-index"), Some("7"));
        let r = read_response(
            &b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"[..],
            "PUT",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"abcde"[..]));
        let r = read_response(&b"HTTP/1.0 404 Not Found\r\n\r\ngone"[..], "GET").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"gone"[..]));
        assert!(
            read_response(
                &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab"[..],
                "GET"
            )
            .is_err()
        );
        assert!(read_response(&b"garbage"[..], "GET").is_err());
        assert!(
            read_response(
                &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
                "GET"
            )
            .is_err()
        );
        // A chunk size that would overflow the body's length.
        let huge =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nffffffffffffffff\r\n";
        assert!(read_response(&huge[..], "GET").is_err());
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "junk\r\n".repeat(200));
        assert!(read_response(many.as_bytes(), "GET").is_err());
    }

    #[test]
    fn form_encoding() {
        assert_eq!(
            form_encode("m1=http://127.0.0.1:2380,m1=http://[::1]:2380"),
            "m1%3Dhttp%3A%2F%2F127.0.0.1%3A2380%2Cm1%3Dhttp%3A%2F%2F%5B%3A%3A1%5D%3A2380"
        );
    }
}
