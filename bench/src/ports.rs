//! Free loopback ports for servers this process starts (keel-bench's `compare`, and the
//! end-to-end tests, which include this file by path).
//!
//! Asking the kernel for port 0 and closing the socket is not enough: the kernel hands the same
//! port out again (two calls in a row can return it), and the servers' own outgoing connections
//! (peer streams, probes) take ephemeral ports that a server started a moment later may then fail
//! to bind. So ports come from below the kernel's ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`), are never handed out twice by one process, start
//! at an offset derived from the process ID (so concurrent processes rarely meet), and are
//! checked to be bindable when handed out.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out: above the well-known and common service ports.
const LOWEST: u32 = 10_000;

/// How many ports have been handed out (or skipped as taken) by this process.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The first port of the kernel's ephemeral range (where outgoing connections take theirs).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|&p: &u32| p > LOWEST + 1_000)
        .unwrap_or(32_768)
}

/// A loopback port nobody listens on now, never returned before by this process.
pub fn free_port() -> std::io::Result<u16> {
    let span = ephemeral_start() - LOWEST;
    let offset = (std::process::id() * 7919) % span;
    for _ in 0..span {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST + (offset + i) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return Ok(port as u16);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        "no free loopback port below the ephemeral range",
    ))
}
