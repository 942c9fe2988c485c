//! etcd's authentication and role-based access control (etcd 3.4's `auth` package).
//!
//! - [`AuthState`]: users, roles, whether auth is on and the auth revision, as of the applied
//!   index. It is kept in etcd's buckets and encodings (below), changed only by applying raft
//!   entries, so every member enforces the same rules; the network threads read it through an
//!   `ArcSwap` (a new state per change, which is rare).
//! - **Where checks happen.** Permissions are checked on the network thread that received the
//!   request, against the state it sees, and the proposal is stamped with that state's auth
//!   revision ([`crate::raft::proposal::AuthStamp`]). When the entry is applied, a stamp older
//!   than the applied state is refused with etcd's "revision of auth store is old" (clients
//!   re-authenticate and retry), so no write passes a check against rules that changed before
//!   it applied. etcd checks at apply time with the same revision rule; the result is the same,
//!   and the storage core does no permission work.
//! - **Passwords** are bcrypt-hashed on the network side (`--bcrypt-cost`, default 10, `$2a$`
//!   as etcd writes them); only the hash is proposed, so no password reaches the WAL.
//!   Authenticate checks the password before proposing, then a raft entry assigns the token on
//!   every member ([`token`]).
//! - **Limit (Keel's own):** Authenticate is rate-limited per client address ([`limit`]).
//!
//! # Storage (etcd's, `auth/store.go`)
//! | bucket | key | value |
//! |---|---|---|
//! | `auth` | `authEnabled` | one byte, 1 on, 0 off |
//! | `auth` | `authRevision` | u64 big-endian (1 when first written) |
//! | `authUsers` | user name | `authpb.User` (protobuf) |
//! | `authRoles` | role name | `authpb.Role` (protobuf) |

pub mod gate;
pub mod jwt;
pub mod limit;
pub mod perms;
pub mod token;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use keel_engine::error::AuthError;
use keel_engine::mvcc::{ReadView, WriteTxn};
use keel_engine::{Error, Result};
use keel_proto::authpb;
use keel_proto::etcdserverpb as pb;
use prost::Message as _;

use self::perms::UserPerms;
use crate::raft::proposal::AuthOp;

pub const AUTH_BUCKET: &[u8] = b"auth";
pub const USERS_BUCKET: &[u8] = b"authUsers";
pub const ROLES_BUCKET: &[u8] = b"authRoles";
const ENABLED_KEY: &[u8] = b"authEnabled";
const REVISION_KEY: &[u8] = b"authRevision";
/// The user and role that may do everything.
pub const ROOT: &str = "root";

/// Who a request comes from: a user, and the auth revision its token was checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthInfo {
    pub username: String,
    pub revision: u64,
}

/// The auth state as of the applied index.
#[derive(Debug, Clone, Default)]
pub struct AuthState {
    pub enabled: bool,
    pub revision: u64,
    pub users: BTreeMap<String, authpb::User>,
    pub roles: BTreeMap<String, authpb::Role>,
    perms: HashMap<String, Arc<UserPerms>>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::CorruptRecord(format!("{what}: {e}"))
}

fn name(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What applying an auth request gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthApplied {
    Done,
    /// Authenticate: the token assigned.
    Token(String),
}

/// Token side effects of an applied change, for the member's token table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEffect {
    None,
    /// Drop every token of this user (deleted, or its password changed).
    DropUser(String),
    /// Drop every token (auth disabled).
    DropAll,
    /// Register `token` for `user`.
    Assign {
        token: String,
        user: String,
    },
}

impl AuthState {
    /// The state recorded in the backend (etcd's: revision 1 when none was written).
    pub fn load(view: &ReadView) -> Result<AuthState> {
        let mut s = AuthState {
            enabled: false,
            revision: 1,
            ..Default::default()
        };
        for (k, v) in view.raw_range(AUTH_BUCKET)? {
            if k == ENABLED_KEY {
                s.enabled = v.first() == Some(&1);
            } else if k == REVISION_KEY {
                let bytes: [u8; 8] = v
                    .as_slice()
                    .try_into()
                    .map_err(|_| corrupt("auth revision", format!("{} bytes", v.len())))?;
                #[allow(
                    clippy::big_endian_bytes,
                    reason = "etcd's auth revision is big-endian"
                )]
                let r = u64::from_be_bytes(bytes);
                s.revision = r.max(1);
            }
        }
        for (k, v) in view.raw_range(USERS_BUCKET)? {
            let u = authpb::User::decode(v.as_slice()).map_err(|e| corrupt("authUsers", e))?;
            s.users.insert(name(&k), u);
        }
        for (k, v) in view.raw_range(ROLES_BUCKET)? {
            let r = authpb::Role::decode(v.as_slice()).map_err(|e| corrupt("authRoles", e))?;
            s.roles.insert(name(&k), r);
        }
        s.rebuild();
        Ok(s)
    }

    fn rebuild(&mut self) {
        self.perms = self
            .users
            .iter()
            .map(|(n, u)| {
                let roles = u.roles.iter().filter_map(|r| self.roles.get(r));
                (n.clone(), Arc::new(UserPerms::of(roles)))
            })
            .collect();
    }

    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// etcd's `IsAdminPermitted`: anyone while auth is off, else a user with the root role.
    pub fn admin(&self, info: Option<&AuthInfo>) -> std::result::Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let Some(info) = info.filter(|i| !i.username.is_empty()) else {
            return Err(AuthError::UserEmpty);
        };
        if !self.users.contains_key(&info.username) {
            return Err(AuthError::UserNotFound);
        }
        if !self.has_role(&info.username, ROOT) {
            return Err(AuthError::PermissionDenied);
        }
        Ok(())
    }

    /// etcd's `isOpPermitted`: may `info` read (or write) `[key, range_end)`?
    pub fn permitted(
        &self,
        info: Option<&AuthInfo>,
        key: &[u8],
        range_end: &[u8],
        write: bool,
    ) -> std::result::Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let Some(info) = info.filter(|i| i.revision != 0) else {
            return Err(AuthError::UserEmpty);
        };
        if info.revision < self.revision {
            return Err(AuthError::AuthOldRevision);
        }
        let Some(perms) = self.perms.get(&info.username) else {
            return Err(AuthError::PermissionDenied);
        };
        if self.has_role(&info.username, ROOT) {
            return Ok(());
        }
        let set = if write { &perms.write } else { &perms.read };
        if set.allows(key, range_end) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    fn bump(&mut self, w: &mut WriteTxn<'_>) -> Result<()> {
        self.revision += 1;
        #[allow(
            clippy::big_endian_bytes,
            reason = "etcd's auth revision is big-endian"
        )]
        let bytes = self.revision.to_be_bytes();
        w.put_raw(AUTH_BUCKET, REVISION_KEY, &bytes)
    }

    fn put_user(&mut self, w: &mut WriteTxn<'_>, u: authpb::User) -> Result<()> {
        w.put_raw(USERS_BUCKET, &u.name, &u.encode_to_vec())?;
        self.users.insert(name(&u.name), u);
        Ok(())
    }

    fn put_role(&mut self, w: &mut WriteTxn<'_>, r: authpb::Role) -> Result<()> {
        w.put_raw(ROLES_BUCKET, &r.name, &r.encode_to_vec())?;
        self.roles.insert(name(&r.name), r);
        Ok(())
    }

    fn user(&self, n: &str) -> std::result::Result<authpb::User, AuthError> {
        self.users.get(n).cloned().ok_or(AuthError::UserNotFound)
    }

    fn role(&self, n: &str) -> std::result::Result<authpb::Role, AuthError> {
        self.roles.get(n).cloned().ok_or(AuthError::RoleNotFound)
    }

    /// Applies `op` (entry `index`) to a copy of this state, writing its changes in `w`: the new
    /// state, the reply, and what the token table must do. Everything is checked before the
    /// first write, so a refused request changes nothing.
    pub fn apply(
        &self,
        w: &mut WriteTxn<'_>,
        op: AuthOp,
        index: u64,
    ) -> Result<(AuthState, AuthApplied, TokenEffect)> {
        let mut s = self.clone();
        let mut effect = TokenEffect::None;
        let mut applied = AuthApplied::Done;
        match op {
            AuthOp::Enable(_) => {
                if !s.enabled {
                    let root = s.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
                    if !root.roles.iter().any(|r| r == ROOT) {
                        return Err(AuthError::RootRoleNotExist.into());
                    }
                    w.put_raw(AUTH_BUCKET, ENABLED_KEY, &[1])?;
                    s.enabled = true;
                    tracing::info!("enabled authentication");
                }
            }
            AuthOp::Disable(_) => {
                if s.enabled {
                    w.put_raw(AUTH_BUCKET, ENABLED_KEY, &[0])?;
                    s.enabled = false;
                    s.bump(w)?;
                    effect = TokenEffect::DropAll;
                    tracing::info!("disabled authentication");
                }
            }
            AuthOp::Authenticate(a) => {
                if !s.enabled {
                    return Err(AuthError::AuthNotEnabled.into());
                }
                let u = s.users.get(&a.name).ok_or(AuthError::AuthFailed)?;
                if u.options.as_ref().is_some_and(|o| o.no_password) {
                    return Err(AuthError::AuthFailed.into());
                }
                let token = format!("{}.{index}", a.simple_token);
                applied = AuthApplied::Token(token.clone());
                effect = TokenEffect::Assign {
                    token,
                    user: a.name,
                };
            }
            AuthOp::UserAdd(r) => {
                if r.name.is_empty() {
                    return Err(AuthError::UserEmpty.into());
                }
                if s.users.contains_key(&r.name) {
                    return Err(AuthError::UserAlreadyExist.into());
                }
                let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
                let u = authpb::User {
                    name: r.name.into_bytes(),
                    password: if no_password {
                        Vec::new()
                    } else {
                        r.hashed_password.into_bytes()
                    },
                    roles: Vec::new(),
                    options: Some(authpb::UserAddOptions { no_password }),
                };
                s.put_user(w, u)?;
                s.bump(w)?;
            }
            AuthOp::UserDelete(r) => {
                if s.enabled && r.name == ROOT {
                    return Err(AuthError::InvalidAuthMgmt.into());
                }
                s.user(&r.name)?;
                w.delete_raw(USERS_BUCKET, r.name.as_bytes())?;
                s.users.remove(&r.name);
                s.bump(w)?;
                effect = TokenEffect::DropUser(r.name);
            }
            AuthOp::UserChangePassword(r) => {
                let mut u = s.user(&r.name)?;
                u.password = r.hashed_password.into_bytes();
                s.put_user(w, u)?;
                s.bump(w)?;
                effect = TokenEffect::DropUser(r.name);
            }
            AuthOp::UserGrantRole(r) => {
                let mut u = s.user(&r.user)?;
                if r.role != ROOT {
                    s.role(&r.role)?;
                }
                if !u.roles.contains(&r.role) {
                    u.roles.push(r.role);
                    u.roles.sort();
                    s.put_user(w, u)?;
                    s.bump(w)?;
                }
            }
            AuthOp::UserRevokeRole(r) => {
                if s.enabled && r.name == ROOT && r.role == ROOT {
                    return Err(AuthError::InvalidAuthMgmt.into());
                }
                let mut u = s.user(&r.name)?;
                let before = u.roles.len();
                u.roles.retain(|x| *x != r.role);
                if u.roles.len() == before {
                    return Err(AuthError::RoleNotGranted.into());
                }
                s.put_user(w, u)?;
                s.bump(w)?;
            }
            AuthOp::RoleAdd(r) => {
                if r.name.is_empty() {
                    return Err(AuthError::RoleEmpty.into());
                }
                if s.roles.contains_key(&r.name) {
                    return Err(AuthError::RoleAlreadyExist.into());
                }
                s.put_role(
                    w,
                    authpb::Role {
                        name: r.name.into_bytes(),
                        key_permission: Vec::new(),
                    },
                )?;
                s.bump(w)?;
            }
            AuthOp::RoleDelete(r) => {
                if s.enabled && r.role == ROOT {
                    return Err(AuthError::InvalidAuthMgmt.into());
                }
                s.role(&r.role)?;
                w.delete_raw(ROLES_BUCKET, r.role.as_bytes())?;
                s.roles.remove(&r.role);
                let holders: Vec<authpb::User> = s
                    .users
                    .values()
                    .filter(|u| u.roles.contains(&r.role))
                    .cloned()
                    .collect();
                for mut u in holders {
                    u.roles.retain(|x| *x != r.role);
                    s.put_user(w, u)?;
                }
                s.bump(w)?;
            }
            AuthOp::RoleGrantPermission(r) => {
                let mut role = s.role(&r.name)?;
                let perm = r
                    .perm
                    .ok_or_else(|| Error::InvalidArgument("permission is missing".into()))?;
                match role
                    .key_permission
                    .iter_mut()
                    .find(|p| p.key == perm.key && p.range_end == perm.range_end)
                {
                    Some(p) => p.perm_type = perm.perm_type,
                    None => {
                        role.key_permission.push(perm);
                        // etcd keeps them sorted by key.
                        role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
                    }
                }
                s.put_role(w, role)?;
                s.bump(w)?;
            }
            AuthOp::RoleRevokePermission(r) => {
                let mut role = s.role(&r.role)?;
                let before = role.key_permission.len();
                role.key_permission
                    .retain(|p| !(p.key == r.key && p.range_end == r.range_end));
                if role.key_permission.len() == before {
                    return Err(AuthError::PermissionNotGranted.into());
                }
                s.put_role(w, role)?;
                s.bump(w)?;
            }
        }
        s.rebuild();
        Ok((s, applied, effect))
    }

    /// `UserGet`'s answer: the user's roles (sorted, as stored).
    pub fn user_roles(&self, n: &str) -> std::result::Result<Vec<String>, AuthError> {
        Ok(self
            .users
            .get(n)
            .ok_or(AuthError::UserNotFound)?
            .roles
            .clone())
    }

    /// `RoleGet`'s answer: the role's permissions, as stored.
    pub fn role_perms(&self, n: &str) -> std::result::Result<Vec<authpb::Permission>, AuthError> {
        Ok(self
            .roles
            .get(n)
            .ok_or(AuthError::RoleNotFound)?
            .key_permission
            .clone())
    }
}

/// The bcrypt hash of `password`, as etcd stores it (`$2a$`, `cost` rounds; etcd falls back to
/// 10 outside 4–31).
pub fn hash_password(password: &str, cost: u32) -> std::result::Result<String, String> {
    let cost = if (4..=31).contains(&cost) { cost } else { 10 };
    bcrypt::hash_with_result(password, cost)
        .map(|h| h.format_for_version(bcrypt::Version::TwoA))
        .map_err(|e| e.to_string())
}

/// Whether `password` matches the stored bcrypt `hash` (`$2a$`, `$2b$` or `$2y$`).
pub fn verify_password(password: &str, hash: &[u8]) -> bool {
    std::str::from_utf8(hash).is_ok_and(|h| bcrypt::verify(password, h).unwrap_or(false))
}

/// The header etcd gives every auth response: the store's revision, the member and the term.
pub fn header(core: &crate::raft::Core) -> Option<pb::ResponseHeader> {
    let store = core.store();
    core.header().with(store.read().rev())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_engine::btree::BackendOptions;
    use keel_engine::mvcc::Store;

    fn apply(store: &Store, s: &AuthState, op: AuthOp) -> std::result::Result<AuthState, Error> {
        let mut w = store.write().unwrap();
        let r = s.apply(&mut w, op, 42);
        w.end(None).unwrap();
        r.map(|(s, _, _)| s)
    }

    fn user(name: &str) -> AuthOp {
        AuthOp::UserAdd(pb::AuthUserAddRequest {
            name: name.into(),
            hashed_password: hash_password("pw", 4).unwrap(),
            ..Default::default()
        })
    }

    #[test]
    fn etcds_rules_revisions_and_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("db"), BackendOptions::default()).unwrap();
        let s = AuthState::load(&store.read()).unwrap();
        assert_eq!((s.enabled, s.revision), (false, 1));
        let err = |r: std::result::Result<AuthState, Error>| match r {
            Err(Error::Auth(a)) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            err(apply(&store, &s, AuthOp::Enable(Default::default()))),
            AuthError::RootUserNotExist
        );
        let s = apply(&store, &s, user("root")).unwrap();
        assert_eq!(s.revision, 2);
        assert_eq!(
            err(apply(&store, &s, AuthOp::Enable(Default::default()))),
            AuthError::RootRoleNotExist
        );
        assert_eq!(
            err(apply(&store, &s, user("root"))),
            AuthError::UserAlreadyExist
        );
        let grant = |u: &str, r: &str| {
            AuthOp::UserGrantRole(pb::AuthUserGrantRoleRequest {
                user: u.into(),
                role: r.into(),
            })
        };
        // Granting root needs no root role to exist; granting twice changes nothing.
        let s = apply(&store, &s, grant("root", ROOT)).unwrap();
        assert_eq!(s.revision, 3);
        let s = apply(&store, &s, grant("root", ROOT)).unwrap();
        assert_eq!(s.revision, 3);
        let s = apply(&store, &s, AuthOp::Enable(Default::default())).unwrap();
        assert!(s.enabled);
        assert_eq!(s.revision, 3, "enabling does not bump the revision");
        assert_eq!(
            err(apply(
                &store,
                &s,
                AuthOp::UserDelete(pb::AuthUserDeleteRequest { name: ROOT.into() })
            )),
            AuthError::InvalidAuthMgmt
        );
        assert_eq!(
            err(apply(&store, &s, grant("root", "nope"))),
            AuthError::RoleNotFound
        );
        // Roles stay sorted; permissions are sorted by key, a re-grant updates in place.
        let s = apply(
            &store,
            &s,
            AuthOp::RoleAdd(pb::AuthRoleAddRequest { name: "b".into() }),
        )
        .unwrap();
        let s = apply(
            &store,
            &s,
            AuthOp::RoleAdd(pb::AuthRoleAddRequest { name: "a".into() }),
        )
        .unwrap();
        let s = apply(&store, &s, grant("root", "b")).unwrap();
        let s = apply(&store, &s, grant("root", "a")).unwrap();
        assert_eq!(s.user_roles(ROOT).unwrap(), vec!["a", "b", "root"]);
        let perm = |k: &str, t: authpb::permission::Type| {
            AuthOp::RoleGrantPermission(pb::AuthRoleGrantPermissionRequest {
                name: "a".into(),
                perm: Some(authpb::Permission {
                    perm_type: t as i32,
                    key: k.into(),
                    range_end: Vec::new(),
                }),
            })
        };
        let s = apply(&store, &s, perm("z", authpb::permission::Type::Read)).unwrap();
        let s = apply(&store, &s, perm("k", authpb::permission::Type::Read)).unwrap();
        let s = apply(&store, &s, perm("z", authpb::permission::Type::Write)).unwrap();
        let perms = s.role_perms("a").unwrap();
        assert_eq!(perms.len(), 2);
        assert_eq!(perms[0].key, b"k");
        assert_eq!(perms[1].perm_type, authpb::permission::Type::Write as i32);
        // Everything is in the backend: a reload sees the same state.
        let again = AuthState::load(&store.read()).unwrap();
        assert_eq!(again.enabled, s.enabled);
        assert_eq!(again.revision, s.revision);
        assert_eq!(again.users, s.users);
        assert_eq!(again.roles, s.roles);
        // Deleting a role takes it from every user.
        let s = apply(
            &store,
            &s,
            AuthOp::RoleDelete(pb::AuthRoleDeleteRequest { role: "b".into() }),
        )
        .unwrap();
        assert_eq!(s.user_roles(ROOT).unwrap(), vec!["a", "root"]);
        assert!(verify_password("pw", &s.users[ROOT].password));
        assert!(!verify_password("other", &s.users[ROOT].password));
        assert!(
            std::str::from_utf8(&s.users[ROOT].password)
                .unwrap()
                .starts_with("$2a$04$")
        );
    }

    #[test]
    fn who_may_do_what() {
        let mut s = AuthState {
            enabled: true,
            revision: 5,
            ..Default::default()
        };
        let role = authpb::Role {
            name: b"app".to_vec(),
            key_permission: vec![authpb::Permission {
                perm_type: authpb::permission::Type::Read as i32,
                key: b"app/".to_vec(),
                range_end: b"app0".to_vec(),
            }],
        };
        s.roles.insert("app".into(), role);
        for (n, roles) in [
            ("u", vec!["app".to_string()]),
            ("root", vec![ROOT.to_string()]),
        ] {
            s.users.insert(
                n.into(),
                authpb::User {
                    name: n.into(),
                    roles,
                    ..Default::default()
                },
            );
        }
        s.rebuild();
        let info = |n: &str, rev| AuthInfo {
            username: n.into(),
            revision: rev,
        };
        assert_eq!(
            s.permitted(None, b"app/x", b"", false),
            Err(AuthError::UserEmpty)
        );
        assert_eq!(
            s.permitted(Some(&info("u", 4)), b"app/x", b"", false),
            Err(AuthError::AuthOldRevision)
        );
        assert_eq!(
            s.permitted(Some(&info("u", 5)), b"app/x", b"", false),
            Ok(())
        );
        assert_eq!(
            s.permitted(Some(&info("u", 5)), b"app/x", b"", true),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(
            s.permitted(Some(&info("root", 5)), b"any", b"\0", true),
            Ok(())
        );
        assert_eq!(
            s.permitted(Some(&info("ghost", 5)), b"app/x", b"", false),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(
            s.admin(Some(&info("u", 5))),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(
            s.admin(Some(&info("ghost", 5))),
            Err(AuthError::UserNotFound)
        );
        assert_eq!(s.admin(None), Err(AuthError::UserEmpty));
        assert_eq!(
            s.admin(Some(&info("root", 1))),
            Ok(()),
            "admin checks ignore revisions"
        );
        s.enabled = false;
        assert_eq!(s.admin(None), Ok(()));
        assert_eq!(s.permitted(None, b"x", b"", true), Ok(()));
    }
}
