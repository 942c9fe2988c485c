//! etcd's Auth service (etcd 3.4's `v3rpc/auth.go` and `auth/store.go`): users, roles,
//! permissions, enabling auth, and Authenticate. See [`crate::auth`] for where checks happen.
//!
//! - Changes go through raft (so every member has the same users and roles) with the caller's
//!   [`crate::raft::proposal::AuthStamp`]; admin rights (the root role, or auth off) are checked
//!   here first, in etcd's order (before the request's own validation).
//! - Reads (UserGet, UserList, RoleGet, RoleList, AuthStatus) wait for a linearizable read
//!   point, then answer from the applied state: what etcd answers by proposing them.
//! - Passwords are hashed here, off the storage core, on a blocking thread.

use std::net::IpAddr;

use keel_engine::error::AuthError;
use keel_proto::etcdserverpb as pb;
use tonic::{Request, Response, Status};

use super::convert::{auth_status, status};
use crate::auth::AuthApplied;
use crate::auth::gate::{Checked, Gate};
use crate::raft::proposal::{AuthOp, AuthRequest, InternalAuthenticate};
use crate::raft::{Applied, Request as Write};

/// How many times Authenticate checks the password again when the auth store changed while its
/// token was being assigned (etcd loops until it did not).
const AUTHENTICATE_ROUNDS: usize = 5;

#[derive(Debug, Clone)]
pub struct AuthService {
    gate: Gate,
    bcrypt_cost: u32,
    /// Password hashes computed at once: one per CPU, so that Authenticate calls (each about
    /// 50 ms of CPU at cost 10) queue rather than take every CPU from the storage core.
    bcrypt: std::sync::Arc<tokio::sync::Semaphore>,
}

/// The client address of `request` (for the Authenticate rate limit).
fn client_ip<T>(request: &Request<T>) -> Option<IpAddr> {
    request.remote_addr().map(|a| a.ip()).or_else(|| {
        request
            .extensions()
            .get::<crate::tls::incoming::Identity>()
            .and_then(|i| i.remote)
            .map(|a| a.ip())
    })
}

impl AuthService {
    pub fn new(gate: Gate, bcrypt_cost: u32) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        AuthService {
            gate,
            bcrypt_cost,
            bcrypt: std::sync::Arc::new(tokio::sync::Semaphore::new(cpus)),
        }
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        crate::auth::header(self.gate.core())
    }

    async fn change(&self, checked: &Checked, op: AuthOp) -> Result<AuthApplied, Status> {
        let applied = self
            .gate
            .core()
            .write_stamped(
                Write::Auth(AuthRequest { op: Some(op) }),
                Some(checked.stamp()),
            )
            .await
            .map_err(|e| status(&e))?;
        match applied {
            Applied::Auth(a) => Ok(a),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    /// Checks admin rights, then applies `op`.
    async fn admin_change<T>(&self, request: &Request<T>, op: AuthOp) -> Result<(), Status> {
        let checked = self.gate.check(request).await?;
        checked.admin()?;
        self.change(&checked, op).await.map(|_| ())
    }

    async fn hash(&self, password: String) -> Result<String, Status> {
        let cost = self.bcrypt_cost;
        // The permit goes with the work: a cancelled call must not free it while its bcrypt
        // still runs (hostile clients would then run any number at once).
        let cpu = self
            .bcrypt
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("etcdserver: server stopped"))?;
        tokio::task::spawn_blocking(move || {
            let _cpu = cpu;
            crate::auth::hash_password(&password, cost)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::invalid_argument)
    }

    async fn linearizable(&self) -> Result<(), Status> {
        self.gate
            .core()
            .linearizable()
            .await
            .map_err(|e| status(&e))
    }
}

impl AuthService {
    /// Authenticate, once its attempt was admitted by the rate limit.
    async fn authenticate_once(
        &self,
        r: pb::AuthenticateRequest,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        for _ in 0..AUTHENTICATE_ROUNDS {
            self.linearizable().await?;
            let state = self.gate.core().auth();
            if !state.enabled {
                return Err(auth_status(AuthError::AuthNotEnabled));
            }
            let Some(user) = state.users.get(&r.name) else {
                return Err(auth_status(AuthError::AuthFailed));
            };
            if user.options.as_ref().is_some_and(|o| o.no_password) {
                return Err(auth_status(AuthError::NoPasswordUser));
            }
            let (password, hash) = (r.password.clone(), user.password.clone());
            let ok = {
                let cpu = self
                    .bcrypt
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Status::unavailable("etcdserver: server stopped"))?;
                tokio::task::spawn_blocking(move || {
                    let _cpu = cpu;
                    crate::auth::verify_password(&password, &hash)
                })
                .await
                .unwrap_or(false)
            };
            if !ok {
                return Err(auth_status(AuthError::AuthFailed));
            }
            if let Some(jwt) = &self.gate.jwt {
                // Stateless: signed here with the revision the password was checked at.
                let token = jwt.sign(&r.name, state.revision).map_err(Status::unknown)?;
                return Ok(Response::new(pb::AuthenticateResponse {
                    header: self.header(),
                    token,
                }));
            }
            let op = AuthOp::Authenticate(InternalAuthenticate {
                name: r.name.clone(),
                simple_token: crate::auth::token::prefix(),
            });
            // Not fenced: the password was checked against `state`, which is compared below.
            let applied = self
                .gate
                .core()
                .write(Write::Auth(AuthRequest { op: Some(op) }))
                .await
                .map_err(|e| status(&e))?;
            let Applied::Auth(AuthApplied::Token(token)) = applied else {
                return Err(Status::internal("Authenticate gave no token"));
            };
            if self.gate.core().auth().revision == state.revision {
                return Ok(Response::new(pb::AuthenticateResponse {
                    header: self.header(),
                    token,
                }));
            }
            // The password may have changed meanwhile: check it again.
            self.gate.core().tokens().drop_token(&token);
        }
        Err(auth_status(AuthError::AuthOldRevision))
    }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    async fn auth_enable(
        &self,
        request: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        self.admin_change(&request, AuthOp::Enable(pb::AuthEnableRequest {}))
            .await?;
        Ok(Response::new(pb::AuthEnableResponse {
            header: self.header(),
        }))
    }

    async fn auth_disable(
        &self,
        request: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        self.admin_change(&request, AuthOp::Disable(pb::AuthDisableRequest {}))
            .await?;
        Ok(Response::new(pb::AuthDisableResponse {
            header: self.header(),
        }))
    }

    async fn auth_status(
        &self,
        _request: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        self.linearizable().await?;
        let state = self.gate.core().auth();
        Ok(Response::new(pb::AuthStatusResponse {
            header: self.header(),
            enabled: state.enabled,
            auth_revision: state.revision,
        }))
    }

    async fn authenticate(
        &self,
        request: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let client = client_ip(&request);
        if !self.gate.limiter.take(client) {
            return Err(auth_status(AuthError::TooManyAttempts));
        }
        // Only a wrong user or password keeps the attempt taken.
        let result = self.authenticate_once(request.into_inner()).await;
        if !matches!(&result, Err(s) if s.message() == AuthError::AuthFailed.to_string()) {
            self.gate.limiter.succeeded(client);
        }
        result
    }

    async fn user_add(
        &self,
        request: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        let checked = self.gate.check(&request).await?;
        checked.admin()?;
        let mut r = request.into_inner();
        if r.name.is_empty() {
            return Err(auth_status(AuthError::UserEmpty));
        }
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        if !no_password && r.hashed_password.is_empty() {
            r.hashed_password = self.hash(std::mem::take(&mut r.password)).await?;
        }
        r.password.clear();
        self.change(&checked, AuthOp::UserAdd(r)).await?;
        Ok(Response::new(pb::AuthUserAddResponse {
            header: self.header(),
        }))
    }

    async fn user_get(
        &self,
        request: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let checked = self.gate.check(&request).await?;
        let r = request.into_inner();
        if checked.username() != r.name {
            checked.admin()?;
        }
        self.linearizable().await?;
        let roles = self
            .gate
            .core()
            .auth()
            .user_roles(&r.name)
            .map_err(auth_status)?;
        Ok(Response::new(pb::AuthUserGetResponse {
            header: self.header(),
            roles,
        }))
    }

    async fn user_list(
        &self,
        request: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        self.gate.check(&request).await?.admin()?;
        self.linearizable().await?;
        let users = self.gate.core().auth().users.keys().cloned().collect();
        Ok(Response::new(pb::AuthUserListResponse {
            header: self.header(),
            users,
        }))
    }

    async fn user_delete(
        &self,
        request: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        let op = AuthOp::UserDelete(request.get_ref().clone());
        self.admin_change(&request, op).await?;
        Ok(Response::new(pb::AuthUserDeleteResponse {
            header: self.header(),
        }))
    }

    async fn user_change_password(
        &self,
        request: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        let checked = self.gate.check(&request).await?;
        checked.admin()?;
        let mut r = request.into_inner();
        if r.hashed_password.is_empty() {
            r.hashed_password = self.hash(std::mem::take(&mut r.password)).await?;
        }
        r.password.clear();
        self.change(&checked, AuthOp::UserChangePassword(r)).await?;
        Ok(Response::new(pb::AuthUserChangePasswordResponse {
            header: self.header(),
        }))
    }

    async fn user_grant_role(
        &self,
        request: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        let op = AuthOp::UserGrantRole(request.get_ref().clone());
        self.admin_change(&request, op).await?;
        Ok(Response::new(pb::AuthUserGrantRoleResponse {
            header: self.header(),
        }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        let op = AuthOp::UserRevokeRole(request.get_ref().clone());
        self.admin_change(&request, op).await?;
        Ok(Response::new(pb::AuthUserRevokeRoleResponse {
            header: self.header(),
        }))
    }

    async fn role_add(
        &self,
        request: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        let op = AuthOp::RoleAdd(request.get_ref().clone());
        self.admin_change(&request, op).await?;
        Ok(Response::new(pb::AuthRoleAddResponse {
            header: self.header(),
        }))
    }

    async fn role_get(
        &self,
        request: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let checked = self.gate.check(&request).await?;
        let r = request.into_inner();
        if !checked.state.has_role(checked.username(), &r.role) {
            checked.admin()?;
        }
        self.linearizable().await?;
        let perm = self
            .gate
            .core()
            .auth()
            .role_perms(&r.role)
            .map_err(auth_status)?;
        Ok(Response::new(pb::AuthRoleGetResponse {
            header: self.header(),
            perm,
        }))
    }

    async fn role_list(
        &self,
        request: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        self.gate.check(&request).await?.admin()?;
        self.linearizable().await?;
        let roles = self.gate.core().auth().roles.keys().cloned().collect();
        Ok(Response::new(pb::AuthRoleListResponse {
            header: self.header(),
            roles,
        }))
    }

    async fn role_delete(
        &self,
        request: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        let op = AuthOp::RoleDelete(request.get_ref().clone());
        self.admin_change(&request, op).await?;
        Ok(Response::new(pb::AuthRoleDeleteResponse {
            header: self.header(),
        }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        if request.get_ref().perm.is_none() {
            return Err(Status::invalid_argument(
                "etcdserver: permission is missing",
            ));
        }
        let op = AuthOp::RoleGrantPermission(request.get_ref().clone());
        self.admin_change(&request, op).await?;
        Ok(Response::new(pb::AuthRoleGrantPermissionResponse {
            header: self.header(),
        }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        let op = AuthOp::RoleRevokePermission(request.get_ref().clone());
        self.admin_change(&request, op).await?;
        Ok(Response::new(pb::AuthRoleRevokePermissionResponse {
            header: self.header(),
        }))
    }
}
