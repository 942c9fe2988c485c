//! A small DNS client for SRV lookups (RFC 1035, RFC 2782), as Go's resolver makes them for
//! etcd's `--discovery-srv`: the name servers of `/etc/resolv.conf`, a UDP query, TCP when the
//! answer is truncated.
//!
//! Wire format, in brief: a 12-byte header (ID, flags, four counts, big-endian), the question
//! (the name as length-prefixed labels ending with a zero byte, type, class), then resource
//! records (name, type, class, TTL, data length, data). Names in answers may point back into
//! the message (two bytes, top bits `11`). An SRV record's data is priority, weight, port (16
//! bits each) and the target name. Everything read from the network is bounds-checked: a bad
//! answer is an error, never a panic.

#![allow(clippy::big_endian_bytes, reason = "DNS messages are big-endian")]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;
/// How long one server may take to answer one query.
const TIMEOUT: Duration = Duration::from_secs(3);
/// Queries per server before the next is asked.
const ATTEMPTS: usize = 2;
/// Pointers followed while reading one name.
const MAX_JUMPS: usize = 32;

/// One SRV record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// The target host, without the trailing dot.
    pub target: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("lookup {name}: no such host")]
    NoSuchHost { name: String },
    #[error("lookup {name}: server answered with code {rcode}")]
    Server { name: String, rcode: u8 },
    #[error("lookup {name}: {reason}")]
    Bad { name: String, reason: String },
    #[error("lookup {name}: no name server answered ({last})")]
    Unreachable { name: String, last: String },
    #[error("{0:?} is not a valid DNS name")]
    InvalidName(String),
}

/// The name servers of `resolv.conf` text (port 53); the local one when it names none, as
/// glibc and Go do.
pub fn name_servers(resolv_conf: &str) -> Vec<SocketAddr> {
    let servers: Vec<SocketAddr> = resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .take(3)
        .collect();
    if servers.is_empty() {
        vec![SocketAddr::from(([127, 0, 0, 1], 53))]
    } else {
        servers
    }
}

/// The SRV records of `name` (for example `_etcd-server._tcp.example.com`), ordered by
/// priority, then by weight (heaviest first).
pub fn lookup_srv(name: &str) -> Result<Vec<Srv>, DnsError> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    lookup_srv_at(&name_servers(&conf), name)
}

/// [`lookup_srv`] asking `servers`.
pub fn lookup_srv_at(servers: &[SocketAddr], name: &str) -> Result<Vec<Srv>, DnsError> {
    let query = encode_query(name, rand::random())?;
    let mut last = String::from("no name server");
    for server in servers {
        for _ in 0..ATTEMPTS {
            match exchange(*server, &query) {
                Ok(answer) => match decode_srv(name, &query, &answer) {
                    Ok(mut records) => {
                        records.sort_by(|a, b| {
                            a.priority.cmp(&b.priority).then(b.weight.cmp(&a.weight))
                        });
                        return Ok(records);
                    }
                    // SERVFAIL, REFUSED: the next server may know, as Go's resolver asks it.
                    Err(DnsError::Server { rcode, .. }) if rcode == 2 || rcode == 5 => {
                        last = format!("{server}: server answered with code {rcode}");
                        break;
                    }
                    Err(e) => return Err(e),
                },
                Err(e) => last = format!("{server}: {e}"),
            }
        }
    }
    Err(DnsError::Unreachable {
        name: name.to_string(),
        last,
    })
}

/// One query over UDP, again over TCP if the answer was truncated.
fn exchange(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect(server)?;
    socket.send(query)?;
    let mut buf = vec![0u8; 65535];
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        // Answers to other queries do not extend the wait.
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        socket.set_read_timeout(Some(left))?;
        let n = socket.recv(&mut buf)?;
        // Answers to another query (another ID) are not ours.
        if n >= 12 && buf[..2] == query[..2] {
            buf.truncate(n);
            break;
        }
    }
    let truncated = buf[2] & 0x02 != 0;
    if !truncated {
        return Ok(buf);
    }
    let mut tcp = TcpStream::connect_timeout(&server, TIMEOUT)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    tcp.write_all(&framed)?;
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tcp.read_exact(&mut answer)?;
    Ok(answer)
}

/// A recursive query for the SRV records of `name` with `id`.
fn encode_query(name: &str, id: u16) -> Result<Vec<u8>, DnsError> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    // Flags: recursion desired. One question.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    let trimmed = name.trim_end_matches('.');
    if trimmed.is_empty() || trimmed.len() > 253 {
        return Err(DnsError::InvalidName(name.to_string()));
    }
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(DnsError::InvalidName(name.to_string()));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&TYPE_SRV.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(q)
}

/// Reads a message with bounds checks.
struct Reader<'a> {
    msg: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Option<u8> {
        let b = *self.msg.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        let end = self.at.checked_add(n)?;
        (end <= self.msg.len()).then(|| self.at = end)
    }

    /// A name at the current position (following pointers), lowercased, without the final dot.
    fn name(&mut self) -> Option<String> {
        let mut labels: Vec<String> = Vec::new();
        let mut at = self.at;
        let mut jumped = false;
        for _ in 0..MAX_JUMPS * 4 {
            let len = *self.msg.get(at)?;
            match len & 0xc0 {
                0x00 => {
                    at += 1;
                    if len == 0 {
                        if !jumped {
                            self.at = at;
                        }
                        return Some(labels.join("."));
                    }
                    let label = self.msg.get(at..at + usize::from(len))?;
                    labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
                    at += usize::from(len);
                }
                0xc0 => {
                    let low = *self.msg.get(at + 1)?;
                    if !jumped {
                        self.at = at + 2;
                        jumped = true;
                    }
                    at = usize::from(u16::from(len & 0x3f) << 8 | u16::from(low));
                }
                _ => return None,
            }
        }
        None
    }
}

/// The SRV records of an answer to `query`.
fn decode_srv(name: &str, query: &[u8], msg: &[u8]) -> Result<Vec<Srv>, DnsError> {
    let bad = |reason: &str| DnsError::Bad {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if msg.len() < 12 || msg[..2] != query[..2] {
        return Err(bad("an answer to another query"));
    }
    if msg[2] & 0x80 == 0 {
        return Err(bad("not an answer"));
    }
    match msg[3] & 0x0f {
        0 => {}
        3 => {
            return Err(DnsError::NoSuchHost {
                name: name.to_string(),
            });
        }
        rcode => {
            return Err(DnsError::Server {
                name: name.to_string(),
                rcode,
            });
        }
    }
    let mut r = Reader { msg, at: 4 };
    let (qd, an) = (r.u16(), r.u16());
    let (Some(qd), Some(an)) = (qd, an) else {
        return Err(bad("a short header"));
    };
    r.at = 12;
    for _ in 0..qd {
        r.name().ok_or_else(|| bad("a bad question"))?;
        r.skip(4).ok_or_else(|| bad("a bad question"))?;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        let record = (|| {
            r.name()?;
            let (rtype, _class) = (r.u16()?, r.u16()?);
            r.skip(4)?;
            let len = usize::from(r.u16()?);
            let end = r.at.checked_add(len).filter(|e| *e <= msg.len())?;
            let srv = if rtype == TYPE_SRV {
                let (priority, weight, port) = (r.u16()?, r.u16()?, r.u16()?);
                let target = r.name()?;
                Some(Srv {
                    priority,
                    weight,
                    port,
                    target,
                })
            } else {
                None
            };
            r.at = end;
            Some(srv)
        })()
        .ok_or_else(|| bad("a bad answer record"))?;
        out.extend(record);
    }
    if out.is_empty() {
        return Err(DnsError::NoSuchHost {
            name: name.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer to `query` with SRV records, the first target written out, the second a
    /// pointer into the first.
    fn answer(query: &[u8]) -> Vec<u8> {
        let mut m = query.to_vec();
        m[2] = 0x81;
        m[3] = 0x80;
        m[6..8].copy_from_slice(&2u16.to_be_bytes());
        let record = |m: &mut Vec<u8>, port: u16, target: &[u8]| {
            m.extend_from_slice(&[0xc0, 12]); // the question's name
            m.extend_from_slice(&TYPE_SRV.to_be_bytes());
            m.extend_from_slice(&CLASS_IN.to_be_bytes());
            m.extend_from_slice(&60u32.to_be_bytes());
            m.extend_from_slice(&((6 + target.len()) as u16).to_be_bytes());
            m.extend_from_slice(&[0, 10, 0, 5]);
            m.extend_from_slice(&port.to_be_bytes());
            m.extend_from_slice(target);
        };
        let first_target_at = m.len() + 2 + 10 + 6;
        record(&mut m, 2380, b"\x02m1\x04keel\x04test\x00");
        // "m2" then a pointer to "keel.test" inside the first target.
        let ptr = (first_target_at + 3) as u16 | 0xc000;
        let mut t = b"\x02m2".to_vec();
        t.extend_from_slice(&ptr.to_be_bytes());
        record(&mut m, 2381, &t);
        m
    }

    #[test]
    fn srv_records_are_read_with_compressed_names() {
        let query = encode_query("_etcd-server._tcp.keel.test", 7).unwrap();
        let got = decode_srv("x", &query, &answer(&query)).unwrap();
        assert_eq!(
            got.iter()
                .map(|s| (s.target.as_str(), s.port))
                .collect::<Vec<_>>(),
            [("m1.keel.test", 2380), ("m2.keel.test", 2381)]
        );
    }

    #[test]
    fn every_cut_or_damaged_answer_is_an_error_not_a_panic() {
        let query = encode_query("_etcd-server._tcp.keel.test", 7).unwrap();
        let good = answer(&query);
        for len in 0..good.len() {
            assert!(decode_srv("x", &query, &good[..len]).is_err());
        }
        for i in 0..good.len() {
            for b in [0x00, 0xff, 0xc0] {
                let mut bad = good.clone();
                bad[i] = b;
                let _ = decode_srv("x", &query, &bad);
            }
        }
        // A pointer to itself ends.
        let mut looped = good.clone();
        let at = looped.len() - 2;
        looped[at..].copy_from_slice(&((at as u16) | 0xc000).to_be_bytes());
        assert!(decode_srv("x", &query, &looped).is_err());
    }

    #[test]
    fn nxdomain_and_names() {
        let query = encode_query("a.b", 1).unwrap();
        let mut nx = query.clone();
        nx[2] = 0x81;
        nx[3] = 0x83;
        assert!(matches!(
            decode_srv("a.b", &query, &nx),
            Err(DnsError::NoSuchHost { .. })
        ));
        assert!(encode_query("", 1).is_err());
        assert!(encode_query("a..b", 1).is_err());
        assert!(encode_query(&"x".repeat(64), 1).is_err());
    }

    #[test]
    fn resolv_conf_name_servers() {
        let conf = "# c\nsearch x\nnameserver 10.0.0.1\nnameserver ::1\noptions ndots:1\n";
        assert_eq!(
            name_servers(conf),
            [
                "10.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(name_servers(""), ["127.0.0.1:53".parse().unwrap()]);
    }
}
