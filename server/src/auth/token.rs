//! Simple tokens (`--auth-token simple`), as etcd's `auth/simple_token.go`.
//!
//! - A token is `<16 random letters>.<raft index of its Authenticate entry>`. The letters are
//!   chosen by the member that checked the password; applying the entry registers the token on
//!   every member, so a client may use it on any of them (a member that has not applied that
//!   index yet waits for it, see [`super::gate`]).
//! - The table is in memory: tokens do not survive a restart (clients authenticate again, as
//!   with etcd).
//! - A token lives `--auth-token-ttl` seconds (default 300) after its **last use**; expired ones
//!   are dropped when looked up and by a sweep on every 1,024th assignment.
//! - Dropped when its user is deleted or changes password, and all of them when auth is
//!   disabled.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng as _;

/// The member's simple tokens.
#[derive(Debug)]
pub struct SimpleTokens {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Token → (user, expiry).
    tokens: HashMap<String, (String, Instant)>,
    assigned: u64,
}

/// The 16 random letters of a new token.
pub fn prefix() -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::rng();
    (0..16)
        .map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char)
        .collect()
}

/// The raft index a token was assigned at, if it has the shape of a simple token.
pub fn index_of(token: &str) -> Option<u64> {
    let (letters, index) = token.split_once('.')?;
    if letters.is_empty() || index.contains('.') {
        return None;
    }
    index.parse().ok()
}

impl SimpleTokens {
    /// A table whose tokens live `ttl` after their last use (etcd: 300 s when 0).
    pub fn new(ttl: Duration) -> SimpleTokens {
        SimpleTokens {
            ttl: if ttl.is_zero() {
                Duration::from_secs(300)
            } else {
                ttl
            },
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn assign(&self, token: String, user: String) {
        let now = Instant::now();
        let mut s = self.state();
        s.assigned += 1;
        if s.assigned.is_multiple_of(1024) {
            s.tokens.retain(|_, (_, expiry)| *expiry > now);
        }
        s.tokens.insert(token, (user, now + self.ttl));
    }

    /// The user of `token`, if it is live (its life is extended).
    pub fn user(&self, token: &str) -> Option<String> {
        let now = Instant::now();
        let mut s = self.state();
        match s.tokens.get_mut(token) {
            Some((user, expiry)) if *expiry > now => {
                *expiry = now + self.ttl;
                Some(user.clone())
            }
            Some(_) => {
                s.tokens.remove(token);
                None
            }
            None => None,
        }
    }

    pub fn drop_token(&self, token: &str) {
        self.state().tokens.remove(token);
    }

    pub fn drop_user(&self, user: &str) {
        self.state().tokens.retain(|_, (u, _)| u != user);
    }

    pub fn drop_all(&self) {
        self.state().tokens.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_live_while_used_and_go_with_their_user() {
        let t = SimpleTokens::new(Duration::from_millis(300));
        let p = prefix();
        assert_eq!(p.len(), 16);
        assert!(p.chars().all(|c| c.is_ascii_alphabetic()));
        let token = format!("{p}.7");
        assert_eq!(index_of(&token), Some(7));
        assert_eq!(index_of("abc"), None);
        assert_eq!(index_of("a.b.1"), None);
        t.assign(token.clone(), "alice".into());
        t.assign("x.8".into(), "bob".into());
        assert_eq!(t.user(&token).as_deref(), Some("alice"));
        t.drop_user("alice");
        assert_eq!(t.user(&token), None);
        assert_eq!(t.user("x.8").as_deref(), Some("bob"));
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(t.user("x.8"), None, "expired");
        t.assign("y.9".into(), "bob".into());
        t.drop_all();
        assert_eq!(t.user("y.9"), None);
    }
}
