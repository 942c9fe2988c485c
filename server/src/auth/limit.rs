//! Failed Authenticate attempts per client address (Keel's own limit; etcd has none): a token
//! bucket of [`BURST`] failures refilled at [`PER_SECOND`] a second. A client whose bucket is
//! empty is refused before its password is even checked, with `ResourceExhausted` "etcdserver:
//! too many authentication attempts, retry later", so a password cannot be guessed at full
//! gRPC speed. Successful attempts cost nothing, so scripts that run etcdctl with `--user` many
//! times are not slowed. (The CPU bcrypt takes is bounded separately: one check per CPU at a
//! time, see `api/auth.rs`.) The table holds at most [`MAX_CLIENTS`] addresses; when full, it
//! forgets those whose buckets are full again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

pub const BURST: f64 = 10.0;
pub const PER_SECOND: f64 = 1.0;
pub const MAX_CLIENTS: usize = 65_536;

#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<Option<IpAddr>, (f64, Instant)>>,
}

impl Limiter {
    fn buckets(&self) -> std::sync::MutexGuard<'_, HashMap<Option<IpAddr>, (f64, Instant)>> {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes one attempt for `client` if it has one left (given back by [`Limiter::succeeded`]):
    /// attempts in flight count, so concurrent guesses cannot outrun the limit.
    pub fn take(&self, client: Option<IpAddr>) -> bool {
        let now = Instant::now();
        if !self.allowed_at(client, now) {
            return false;
        }
        self.failed_at(client, now);
        true
    }

    /// Gives back the attempt of `client` that succeeded.
    pub fn succeeded(&self, client: Option<IpAddr>) {
        let now = Instant::now();
        if let Some(entry) = self.buckets().get_mut(&client) {
            Self::refill(entry, now);
            entry.0 = (entry.0 + 1.0).min(BURST);
        }
    }

    fn refill(entry: &mut (f64, Instant), now: Instant) {
        let (tokens, at) = entry;
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * PER_SECOND).min(BURST);
        *at = now;
    }

    fn allowed_at(&self, client: Option<IpAddr>, now: Instant) -> bool {
        let mut b = self.buckets();
        match b.get_mut(&client) {
            Some(entry) => {
                Self::refill(entry, now);
                entry.0 >= 1.0
            }
            None => true,
        }
    }

    fn failed_at(&self, client: Option<IpAddr>, now: Instant) {
        let mut b = self.buckets();
        if b.len() >= MAX_CLIENTS && !b.contains_key(&client) {
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * PER_SECOND < BURST
            });
        }
        let entry = b.entry(client).or_insert((BURST, now));
        Self::refill(entry, now);
        entry.0 = (entry.0 - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn failures_empty_the_bucket_per_address_and_it_refills() {
        let l = Limiter::default();
        let a = Some("10.0.0.1".parse().unwrap());
        let b = Some("10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(l.allowed_at(a, t0));
            l.failed_at(a, t0);
        }
        assert!(!l.allowed_at(a, t0));
        assert!(l.allowed_at(b, t0), "another address has its own bucket");
        assert!(!l.allowed_at(a, t0 + Duration::from_millis(500)));
        assert!(l.allowed_at(a, t0 + Duration::from_millis(1000)));
    }
}
