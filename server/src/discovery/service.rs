//! `--discovery URL`: etcd's discovery protocol (its `v2discovery` package) against a discovery
//! service, a v2 keys API such as `https://discovery.etcd.io/<token>` or an etcd with
//! `--enable-v2` (`http://host:2379/v2/keys/discovery/<token>`). Each new member:
//!
//! 1. reads the expected size (`<url>/_config/size`);
//! 2. registers itself: `PUT <url>/<member ID in hex>?prevExist=false` with its
//!    `name=peerURL,…` (the ID from its peer URLs, the discovery URL as the cluster token);
//! 3. lists the registered members (`GET <url>`, ordered by creation index) and long-polls
//!    `?wait=true&recursive=true&waitIndex=N` until `size` are there;
//! 4. takes the first `size` registrations as the initial cluster.
//!
//! A member that finds `size` others registered before it gets "discovery: cluster is full".
//! Errors reaching the service are retried with etcd's backoff (1 s doubling to 256 s); the
//! service's own answers (no size key, a bad size, a duplicate ID) stop the start.

use serde_json::Value;

use super::http::{self, HttpError, Target};

/// etcd's longest backoff exponent: 2^8 s.
const MAX_BACKOFF_EXP: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("discovery: invalid URL")]
    InvalidUrl,
    #[error("discovery: size key is bad")]
    BadSizeKey,
    #[error("discovery: size key not found")]
    SizeNotFound,
    #[error("discovery: found duplicate id")]
    DuplicateId,
    #[error("discovery: found duplicate name")]
    DuplicateName,
    #[error("discovery: cluster is full")]
    FullCluster,
    #[error("discovery: bad discovery endpoint")]
    BadEndpoint,
    #[error("discovery: {0}")]
    Service(String),
}

/// One registration.
#[derive(Debug, Clone)]
struct Node {
    key: String,
    value: String,
    created: u64,
    modified: u64,
}

fn node_of(v: &Value) -> Option<Node> {
    Some(Node {
        key: v.get("key")?.as_str()?.to_string(),
        value: v
            .get("value")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        created: v.get("createdIndex").and_then(Value::as_u64).unwrap_or(0),
        modified: v.get("modifiedIndex").and_then(Value::as_u64).unwrap_or(0),
    })
}

fn base(key: &str) -> &str {
    key.trim_end_matches('/').rsplit('/').next().unwrap_or(key)
}

/// A failure to reach the service (retried), or its answer (not retried).
enum Failure {
    Unreachable(String),
    Final(DiscoveryError),
}

impl From<HttpError> for Failure {
    fn from(e: HttpError) -> Failure {
        Failure::Unreachable(e.to_string())
    }
}

struct Discovery {
    /// The discovery URL without a trailing slash.
    url: String,
    proxy: Option<Target>,
    /// This member's ID, in hex (its key).
    me: String,
    retries: u32,
}

impl Discovery {
    fn get(&self, suffix: &str, query: &str, long_poll: bool) -> Result<http::Response, Failure> {
        let url = format!("{}{suffix}?{query}", self.url);
        Ok(http::request(
            "GET",
            &url,
            None,
            self.proxy.as_ref(),
            long_poll,
        )?)
    }

    /// The body as JSON; an answer that is not JSON means the URL is not a discovery service.
    fn json(r: &http::Response) -> Result<Value, Failure> {
        serde_json::from_slice(&r.body).map_err(|_| Failure::Final(DiscoveryError::BadEndpoint))
    }

    /// The v2 error code of an error answer.
    fn error_code(v: &Value) -> Option<u64> {
        v.get("errorCode").and_then(Value::as_u64)
    }

    fn backoff(&mut self, step: &str, reason: &str) {
        self.retries += 1;
        let secs = 1u64 << self.retries.min(MAX_BACKOFF_EXP);
        tracing::info!(url = %self.url, step, reason, backoff_seconds = secs, "retry connecting to discovery service");
        std::thread::sleep(std::time::Duration::from_secs(secs));
    }

    /// The registrations, the size, and the index to watch from (etcd's `checkCluster`).
    fn check(&mut self) -> Result<(Vec<Node>, usize, u64), DiscoveryError> {
        loop {
            match self.try_check() {
                Ok(r) => return Ok(r),
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Unreachable(why)) => self.backoff("cluster status check", &why),
            }
        }
    }

    fn try_check(&mut self) -> Result<(Vec<Node>, usize, u64), Failure> {
        let r = self.get(
            "/_config/size",
            "quorum=false&recursive=false&sorted=false",
            false,
        )?;
        // A load balancer's error page is not the service's answer: retried.
        if r.status >= 500 {
            return Err(Failure::Unreachable(format!("status {}", r.status)));
        }
        let v = Self::json(&r)?;
        if r.status == 404 && Self::error_code(&v) == Some(100) {
            return Err(Failure::Final(DiscoveryError::SizeNotFound));
        }
        if r.status != 200 {
            return Err(Failure::Final(DiscoveryError::Service(format!(
                "reading the size: status {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ))));
        }
        let size: usize = v
            .pointer("/node/value")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .filter(|s| *s > 0)
            .ok_or(Failure::Final(DiscoveryError::BadSizeKey))?;
        let r = self.get("", "quorum=false&recursive=false&sorted=false", false)?;
        if r.status >= 500 {
            return Err(Failure::Unreachable(format!("status {}", r.status)));
        }
        let v = Self::json(&r)?;
        if r.status != 200 {
            return Err(Failure::Final(DiscoveryError::Service(format!(
                "listing members: status {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ))));
        }
        let index = r
            .header("x-etcd-index")
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        let mut nodes: Vec<Node> = v
            .pointer("/node/nodes")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(node_of).collect())
            .unwrap_or_default();
        nodes.retain(|n| base(&n.key) != "_config");
        nodes.sort_by_key(|n| n.created);
        for (i, n) in nodes.iter().enumerate() {
            if base(&n.key) == self.me {
                break;
            }
            if i + 1 >= size {
                nodes.truncate(size);
                return Err(Failure::Final(DiscoveryError::FullCluster));
            }
        }
        Ok((nodes, size, index))
    }

    /// Registers this member (etcd's `createSelf`).
    fn create_self(&mut self, contents: &str) -> Result<(), DiscoveryError> {
        loop {
            let url = format!("{}/{}?prevExist=false", self.url, self.me);
            let body = format!("value={}", http::form_encode(contents));
            match http::request("PUT", &url, Some(&body), self.proxy.as_ref(), false) {
                Ok(r) if r.status == 201 || r.status == 200 => return Ok(()),
                Ok(r) if r.status == 412 => return Err(DiscoveryError::DuplicateId),
                Ok(r) if r.status >= 500 => {
                    self.backoff("registering", &format!("status {}", r.status));
                }
                Ok(r) => {
                    return Err(DiscoveryError::Service(format!(
                        "registering: status {}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    )));
                }
                Err(e) => self.backoff("registering", &e.to_string()),
            }
        }
    }

    /// Waits until `size` members are registered (etcd's `waitNodes`).
    fn wait(
        &mut self,
        mut nodes: Vec<Node>,
        size: usize,
        mut index: u64,
    ) -> Result<Vec<Node>, DiscoveryError> {
        nodes.truncate(size);
        for n in &nodes {
            tracing::info!(
                peer = base(&n.key),
                self_ = base(&n.key) == self.me,
                "found a member through the discovery service"
            );
        }
        while nodes.len() < size {
            tracing::info!(
                found_peers = nodes.len(),
                needed_peers = size - nodes.len(),
                "found peers from discovery server; waiting for more"
            );
            let query = format!("wait=true&recursive=true&waitIndex={}", index + 1);
            let url = format!("{}?{query}", self.url);
            let answer = http::request("GET", &url, None, self.proxy.as_ref(), true);
            let answer = match answer {
                // A long poll with nothing to tell is asked again at once (etcd waits as long
                // as it takes), as is an empty answer (etcd's client's `ErrEmptyBody`).
                Err(e) if http::is_quiet(&e) => continue,
                Ok(r) if r.status == 200 && r.body.iter().all(u8::is_ascii_whitespace) => continue,
                other => other.map_err(Failure::from),
            };
            let event = match answer {
                Ok(r) if r.status == 200 => {
                    Self::json(&r).map_err(|_| DiscoveryError::BadEndpoint)?
                }
                Ok(r) if r.status < 500 => {
                    return Err(DiscoveryError::Service(format!(
                        "watching: status {}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    )));
                }
                Ok(r) => {
                    self.backoff("waiting for other nodes", &format!("status {}", r.status));
                    let (n, s, i) = self.check()?;
                    return self.wait(n, s, i);
                }
                Err(Failure::Unreachable(why)) => {
                    self.backoff("waiting for other nodes", &why);
                    let (n, s, i) = self.check()?;
                    return self.wait(n, s, i);
                }
                Err(Failure::Final(e)) => return Err(e),
            };
            let Some(node) = event.get("node").and_then(node_of) else {
                return Err(DiscoveryError::BadEndpoint);
            };
            index = index.max(node.modified);
            if base(&node.key) == "_config" || nodes.iter().any(|n| n.key == node.key) {
                continue;
            }
            tracing::info!(peer = base(&node.key), "found peer from discovery server");
            nodes.push(node);
        }
        tracing::info!(
            found_peers = nodes.len(),
            "found all needed peers from discovery server"
        );
        Ok(nodes)
    }
}

/// The initial cluster (`name=url,…`) of a new member with ID `id` registering `config`
/// (`name=url,…` of its own peer URLs) at discovery URL `url`.
pub fn join_cluster(
    url: &str,
    proxy: Option<&str>,
    id: u64,
    config: &str,
) -> Result<String, DiscoveryError> {
    Target::parse(url).map_err(|_| DiscoveryError::InvalidUrl)?;
    let proxy =
        match proxy.filter(|p| !p.is_empty()) {
            Some(p) if p.contains("://") => Some(Target::parse(p).map_err(|e| {
                DiscoveryError::Service(format!("invalid proxy address {p:?}: {e}"))
            })?),
            Some(p) => Some(Target::parse(&format!("http://{p}")).map_err(|e| {
                DiscoveryError::Service(format!("invalid proxy address {p:?}: {e}"))
            })?),
            None => None,
        };
    let mut d = Discovery {
        url: url.trim_end_matches('/').to_string(),
        proxy,
        me: format!("{id:x}"),
        retries: 0,
    };
    d.check()?;
    d.create_self(config)?;
    let (nodes, size, index) = d.check()?;
    let all = d.wait(nodes, size, index)?;
    nodes_to_cluster(&all, size)
}

/// The registrations as an initial cluster; as many distinct names as the size.
fn nodes_to_cluster(nodes: &[Node], size: usize) -> Result<String, DiscoveryError> {
    let cluster = nodes
        .iter()
        .map(|n| n.value.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut names = Vec::new();
    for member in cluster.split(',') {
        let (name, url) = member.split_once('=').ok_or(DiscoveryError::InvalidUrl)?;
        crate::config::parse_url(url).map_err(|_| DiscoveryError::InvalidUrl)?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    if names.len() != size {
        return Err(DiscoveryError::DuplicateName);
    }
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(key: &str, value: &str, created: u64) -> Node {
        Node {
            key: key.into(),
            value: value.into(),
            created,
            modified: created,
        }
    }

    #[test]
    fn registrations_become_the_cluster() {
        let nodes = [
            node("/d/1", "a=http://127.0.0.1:1", 5),
            node("/d/2", "b=http://127.0.0.1:2,b=http://127.0.0.2:2", 6),
        ];
        assert_eq!(
            nodes_to_cluster(&nodes, 2).unwrap(),
            "a=http://127.0.0.1:1,b=http://127.0.0.1:2,b=http://127.0.0.2:2"
        );
        assert!(matches!(
            nodes_to_cluster(&nodes, 3),
            Err(DiscoveryError::DuplicateName)
        ));
        assert!(matches!(
            nodes_to_cluster(&[node("/d/1", "garbage", 1)], 1),
            Err(DiscoveryError::InvalidUrl)
        ));
    }

    /// A one-connection-per-answer HTTP server that sends `answers` in turn.
    fn serve(answers: Vec<&'static str>) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for answer in answers {
                let (mut conn, _) = listener.accept().unwrap();
                let mut buf = [0u8; 4096];
                let _ = std::io::Read::read(&mut conn, &mut buf);
                let _ = std::io::Write::write_all(&mut conn, answer.as_bytes());
            }
        });
        format!("http://{addr}/d")
    }

    #[test]
    fn an_empty_watch_answer_is_asked_again() {
        let url = serve(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n{\"node\":{\"key\":\"/d/2\",\"value\":\"b=http://h:2\",\"modifiedIndex\":9}}",
        ]);
        let mut d = Discovery {
            url,
            proxy: None,
            me: "1".into(),
            retries: 0,
        };
        let nodes = d.wait(vec![node("/d/1", "a=http://h:1", 5)], 2, 5).unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].key, "/d/2");
        assert_eq!(d.retries, 0, "no backoff for an empty answer");
    }

    #[test]
    fn keys_and_errors() {
        assert_eq!(
            base("/v2/keys/discovery/tok/8e9e05c52164694d"),
            "8e9e05c52164694d"
        );
        assert_eq!(base("/tok/_config/"), "_config");
        assert_eq!(
            DiscoveryError::FullCluster.to_string(),
            "discovery: cluster is full"
        );
        assert!(matches!(
            join_cluster("ftp://x", None, 1, "a=http://127.0.0.1:1"),
            Err(DiscoveryError::InvalidUrl)
        ));
    }
}
