//! Who sent a request, and whether they may do it: what every service asks before it serves.
//!
//! The identity comes, as in etcd (`AuthInfoFromCtx`), from the `token` metadata (or
//! `authorization`), else, under `--client-cert-auth`, from the verified client certificate's
//! common name. A token that is not live is refused ("etcdserver: invalid auth token") even
//! while auth is off, as etcd does.

use std::sync::Arc;
use std::time::Duration;

use keel_engine::error::AuthError;
use keel_proto::etcdserverpb as pb;
use tonic::{Request, Status};

use super::{AuthInfo, AuthState};
use crate::api::convert::auth_status;
use crate::raft::Core;
use crate::raft::proposal::AuthStamp;

/// How long a token is waited for on a member that has not applied its Authenticate entry yet.
const TOKEN_WAIT: Duration = Duration::from_secs(5);

/// What the services share to identify and check requests. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gate {
    core: Core,
    client_cert_auth: bool,
    /// JWT tokens (`--auth-token jwt,...`); none: simple tokens.
    pub jwt: Option<Arc<super::jwt::Jwt>>,
    pub limiter: Arc<super::limit::Limiter>,
}

/// A request's token and client certificate CN, kept by a stream to identify each of its
/// requests anew.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub token: Option<String>,
    pub common_name: Option<String>,
}

/// One request's identity and the auth state it was checked against.
#[derive(Debug, Clone)]
pub struct Checked {
    pub state: Arc<AuthState>,
    pub info: Option<AuthInfo>,
}

impl Gate {
    pub fn new(core: Core, client_cert_auth: bool, jwt: Option<Arc<super::jwt::Jwt>>) -> Gate {
        Gate {
            core,
            client_cert_auth,
            jwt,
            limiter: Arc::default(),
        }
    }

    /// What identifies the caller of `request`: its token, and its certificate's CN.
    pub fn credentials<T>(request: &Request<T>) -> Credentials {
        let md = request.metadata();
        Credentials {
            token: md
                .get("token")
                .or_else(|| md.get("authorization"))
                .map(|v| v.to_str().unwrap_or_default().to_string()),
            common_name: request
                .extensions()
                .get::<crate::tls::incoming::Identity>()
                .and_then(|i| i.common_name.clone()),
        }
    }

    /// The identity of `request` and the current auth state.
    pub async fn check<T>(&self, request: &Request<T>) -> Result<Checked, Status> {
        self.check_credentials(&Self::credentials(request)).await
    }

    /// The identity `c` gives now (a token is looked up again each time) and the auth state.
    pub async fn check_credentials(&self, c: &Credentials) -> Result<Checked, Status> {
        let info = match &c.token {
            Some(token) => Some(self.token_user(token).await?),
            None if self.client_cert_auth => c.common_name.clone().map(|username| AuthInfo {
                username,
                revision: self.core.auth().revision,
            }),
            None => None,
        };
        // A token (a JWT) issued by a member that has applied more auth changes than this
        // one: wait until this one has too, so that it is checked by the same rules.
        if let Some(i) = &info {
            let deadline = tokio::time::Instant::now() + TOKEN_WAIT;
            while self.core.auth().revision < i.revision {
                if tokio::time::Instant::now() >= deadline {
                    return Err(auth_status(AuthError::AuthOldRevision));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(Checked {
            state: self.core.auth(),
            info,
        })
    }

    async fn token_user(&self, token: &str) -> Result<AuthInfo, Status> {
        let invalid = || auth_status(AuthError::InvalidAuthToken);
        if let Some(jwt) = &self.jwt {
            return jwt.verify(token).ok_or_else(invalid);
        }
        let index = super::token::index_of(token).ok_or_else(invalid)?;
        // Assigned on another member: wait until this one has applied it.
        let deadline = tokio::time::Instant::now() + TOKEN_WAIT;
        while self.core.applied_index() < index {
            if tokio::time::Instant::now() >= deadline {
                return Err(invalid());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let username = self.core.tokens().user(token).ok_or_else(invalid)?;
        Ok(AuthInfo {
            username,
            revision: self.core.auth().revision,
        })
    }

    pub fn core(&self) -> &Core {
        &self.core
    }
}

impl Checked {
    fn info(&self) -> Option<&AuthInfo> {
        self.info.as_ref()
    }

    /// May the caller read `[key, range_end)`?
    pub fn read(&self, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
        self.state
            .permitted(self.info(), key, range_end, false)
            .map_err(auth_status)
    }

    /// May the caller write `[key, range_end)`?
    pub fn write(&self, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
        self.state
            .permitted(self.info(), key, range_end, true)
            .map_err(auth_status)
    }

    /// Is the caller an administrator (root role), or is auth off?
    pub fn admin(&self) -> Result<(), Status> {
        self.state.admin(self.info()).map_err(auth_status)
    }

    /// etcd's Maintenance checks return the auth package's own errors, which reach clients as
    /// gRPC's Unknown with the `auth:` message.
    pub fn admin_raw(&self) -> Result<(), Status> {
        self.state.admin(self.info()).map_err(|e| {
            let msg = match e {
                AuthError::UserEmpty => "auth: user name is empty",
                AuthError::UserNotFound => "auth: user not found",
                _ => "auth: permission denied",
            };
            Status::unknown(msg)
        })
    }

    /// The caller's name ("" without one).
    pub fn username(&self) -> &str {
        self.info.as_ref().map_or("", |i| i.username.as_str())
    }

    /// The stamp a proposal checked against this state carries: the revision of the rules it
    /// was checked by (not the token's, which may be another member's), and the caller, for the
    /// checks that can only be made when it applies (keys attached to a lease).
    pub fn stamp(&self) -> AuthStamp {
        AuthStamp {
            revision: self.state.revision,
            enabled: self.state.enabled,
            username: self.username().to_string(),
        }
    }

    /// After a read (and its wait for a linearizable read point): its result is refused if the
    /// rules it was checked by changed meanwhile (the same rule as the apply-time fence; etcd
    /// checks after its wait).
    pub fn still_current(&self, core: &Core) -> Result<(), Status> {
        let now = core.auth();
        if now.enabled && (!self.state.enabled || self.state.revision < now.revision) {
            return Err(auth_status(AuthError::AuthOldRevision));
        }
        Ok(())
    }

    /// Every key range a txn reads or writes, its compares and both branches, nested txns too
    /// (etcd 3.4 skips nested ones; checking them is the safe side).
    pub fn txn(
        &self,
        t: &pb::TxnRequest,
        lease_keys: &dyn Fn(i64) -> Vec<Vec<u8>>,
    ) -> Result<(), Status> {
        for c in &t.compare {
            self.read(&c.key, &c.range_end)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            use pb::request_op::Request as R;
            match &op.request {
                Some(R::RequestRange(r)) => self.read(&r.key, &r.range_end)?,
                Some(R::RequestPut(p)) => self.put(p, lease_keys)?,
                Some(R::RequestDeleteRange(d)) => self.delete(d)?,
                Some(R::RequestTxn(n)) => self.txn(n, lease_keys)?,
                None => {}
            }
        }
        Ok(())
    }

    /// A put: write on the key; read too with `prev_kv`; write on the keys already attached to
    /// its lease (etcd's `checkLeasePuts`).
    pub fn put(
        &self,
        p: &pb::PutRequest,
        lease_keys: &dyn Fn(i64) -> Vec<Vec<u8>>,
    ) -> Result<(), Status> {
        self.write(&p.key, b"")?;
        if p.prev_kv {
            self.read(&p.key, b"")?;
        }
        if p.lease != 0 && self.state.enabled {
            for k in lease_keys(p.lease) {
                self.write(&k, b"")?;
            }
        }
        Ok(())
    }

    /// A delete: write on the range; read too with `prev_kv`.
    pub fn delete(&self, d: &pb::DeleteRangeRequest) -> Result<(), Status> {
        self.write(&d.key, &d.range_end)?;
        if d.prev_kv {
            self.read(&d.key, &d.range_end)?;
        }
        Ok(())
    }
}
