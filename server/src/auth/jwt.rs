//! JWT tokens (`--auth-token jwt,pub-key=…,priv-key=…,sign-method=…,ttl=…`), as etcd's
//! `auth/jwt.go`.
//!
//! - Claims: `{"username": …, "revision": <auth revision when issued>, "exp": <unix seconds>}`,
//!   header `{"alg": <sign-method>, "typ": "JWT"}`. `ttl` is a Go duration (default 5m); a
//!   token's expiry is fixed when it is issued, not extended on use.
//! - Methods: RS256/384/512, PS256/384/512, ES256/384 (PEM keys) and HS256/384/512 (the raw
//!   bytes of the `priv-key` file). ES512 (P-521) and EdDSA are refused at start: the crypto
//!   library (ring) has neither.
//! - A token is good if its algorithm is the configured one, its signature verifies and it has
//!   not expired; its user and revision are then the claims'. Tokens are stateless: nothing to
//!   drop when a user goes, but any auth change raises the revision, after which older tokens
//!   get "revision of auth store is old" (clients authenticate again), as in etcd.
//! - With only `pub-key`, the member verifies but cannot issue tokens (Authenticate answers
//!   etcd's "auth: token signing attempted with verify-only key"). `pub-key` is required for
//!   the asymmetric methods: Keel does not derive it from the private key as etcd does.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use super::AuthInfo;

/// `--auth-token`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenType {
    Simple,
    Jwt(JwtOptions),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtOptions {
    pub sign_method: String,
    pub pub_key: Option<PathBuf>,
    pub priv_key: Option<PathBuf>,
    pub ttl: Duration,
}

/// Parses `--auth-token` (`simple`, or `jwt` and its `k=v` options), with etcd's rules: a pair
/// without exactly one `=`, or a key given twice, is refused.
pub fn parse(flag: &str) -> Result<TokenType, String> {
    let mut parts = flag.split(',');
    let kind = parts.next().unwrap_or_default();
    let mut opts = std::collections::HashMap::new();
    for p in parts {
        let kv: Vec<&str> = p.split('=').collect();
        if kv.len() != 2 {
            return Err(format!(
                "auth: invalid auth options ({p:?} is not key=value)"
            ));
        }
        if opts.insert(kv[0], kv[1]).is_some() {
            return Err(format!(
                "auth: invalid auth options ({} given twice)",
                kv[0]
            ));
        }
    }
    match kind {
        "simple" => Ok(TokenType::Simple),
        "jwt" => {
            let sign_method = opts
                .get("sign-method")
                .ok_or("auth: invalid auth options (jwt needs sign-method)")?
                .to_string();
            algorithm(&sign_method)?;
            let ttl = match opts.get("ttl") {
                Some(t) => crate::config::parse_go_duration(t)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("auth: invalid auth options (ttl {t:?})"))?,
                None => Duration::from_secs(300),
            };
            Ok(TokenType::Jwt(JwtOptions {
                sign_method,
                pub_key: opts.get("pub-key").map(PathBuf::from),
                priv_key: opts.get("priv-key").map(PathBuf::from),
                ttl,
            }))
        }
        other => Err(format!(
            "auth: invalid auth options (unknown token type {other:?})"
        )),
    }
}

fn algorithm(method: &str) -> Result<Algorithm, String> {
    Ok(match method {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "ES512" | "EdDSA" => {
            return Err(format!(
                "auth: sign-method {method} is not supported by Keel (RS*, PS*, ES256, ES384, HS*)"
            ));
        }
        other => return Err(format!("auth: invalid auth signing method {other:?}")),
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

/// A member's JWT signer and verifier.
pub struct Jwt {
    algorithm: Algorithm,
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("algorithm", &self.algorithm)
            .field("signs", &self.encoding.is_some())
            .finish_non_exhaustive()
    }
}

impl Jwt {
    /// Reads the keys of `o`: an unreadable or unusable key stops the start.
    pub fn load(o: &JwtOptions) -> Result<Jwt, String> {
        let algorithm = algorithm(&o.sign_method)?;
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| format!("cannot read the JWT {what} {}: {e}", p.display()))
        };
        let bad = |p: &PathBuf, e: jsonwebtoken::errors::Error| {
            format!(
                "the JWT key {} cannot be used for {}: {e}",
                p.display(),
                o.sign_method
            )
        };
        let (encoding, decoding) = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let p = o
                    .priv_key
                    .as_ref()
                    .ok_or("auth: HS* JWT tokens need priv-key (the shared secret)")?;
                let secret = read(p, "priv-key")?;
                (
                    Some(EncodingKey::from_secret(&secret)),
                    DecodingKey::from_secret(&secret),
                )
            }
            _ => {
                let p = o.pub_key.as_ref().ok_or(
                    "auth: Keel needs pub-key for RS*, PS* and ES* JWT tokens (it does not derive \
                     it from priv-key)",
                )?;
                let pem = read(p, "pub-key")?;
                let decoding = match algorithm {
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                    _ => DecodingKey::from_rsa_pem(&pem),
                }
                .map_err(|e| bad(p, e))?;
                let encoding = match &o.priv_key {
                    Some(k) => {
                        let pem = read(k, "priv-key")?;
                        Some(
                            match algorithm {
                                Algorithm::ES256 | Algorithm::ES384 => {
                                    EncodingKey::from_ec_pem(&pem)
                                }
                                _ => EncodingKey::from_rsa_pem(&pem),
                            }
                            .map_err(|e| bad(k, e))?,
                        )
                    }
                    None => None,
                };
                (encoding, decoding)
            }
        };
        let jwt = Jwt {
            algorithm,
            encoding,
            decoding,
            ttl: o.ttl,
        };
        // A pair that does not belong together would issue tokens nobody accepts.
        if jwt.encoding.is_some() {
            let probe = jwt.sign("keel-key-check", 1)?;
            if jwt.verify(&probe).is_none() {
                return Err("auth: the JWT priv-key and pub-key do not belong together".into());
            }
        }
        Ok(jwt)
    }

    /// A token for `username` at auth revision `revision`.
    pub fn sign(&self, username: &str, revision: u64) -> Result<String, String> {
        let key = self
            .encoding
            .as_ref()
            .ok_or("auth: token signing attempted with verify-only key")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let claims = Claims {
            username: username.to_string(),
            revision,
            exp: (now + self.ttl).as_secs(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key).map_err(|e| e.to_string())
    }

    /// The user and revision of a good token.
    pub fn verify(&self, token: &str) -> Option<AuthInfo> {
        let mut v = Validation::new(self.algorithm);
        v.leeway = 0;
        v.validate_aud = false;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).ok()?;
        Some(AuthInfo {
            username: data.claims.username,
            revision: data.claims.revision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_as_etcd_parses_them() {
        assert_eq!(parse("simple").unwrap(), TokenType::Simple);
        let TokenType::Jwt(o) =
            parse("jwt,pub-key=/a.pub,priv-key=/a,sign-method=RS256,ttl=10m").unwrap()
        else {
            panic!()
        };
        assert_eq!(o.ttl, Duration::from_secs(600));
        assert_eq!(o.pub_key, Some(PathBuf::from("/a.pub")));
        assert!(parse("jwt,sign-method=RS256,sign-method=RS256").is_err());
        assert!(parse("jwt,pub-key").is_err());
        assert!(
            parse("jwt,sign-method=XX1")
                .unwrap_err()
                .contains("signing method")
        );
        assert!(
            parse("jwt,sign-method=ES512")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(parse("opaque").unwrap_err().contains("unknown token type"));
    }

    #[test]
    fn tokens_verify_expire_and_refuse_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"s3cret").unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"another").unwrap();
        let opts = |k: &PathBuf, ttl| JwtOptions {
            sign_method: "HS256".into(),
            pub_key: None,
            priv_key: Some(k.clone()),
            ttl,
        };
        let jwt = Jwt::load(&opts(&secret, Duration::from_secs(60))).unwrap();
        let token = jwt.sign("alice", 7).unwrap();
        assert_eq!(
            jwt.verify(&token),
            Some(AuthInfo {
                username: "alice".into(),
                revision: 7
            })
        );
        let stranger = Jwt::load(&opts(&other, Duration::from_secs(60))).unwrap();
        assert_eq!(stranger.verify(&token), None, "signed with another key");
        assert_eq!(jwt.verify("not.a.jwt"), None);
        assert_eq!(jwt.verify(&format!("{token}x")), None);
        // An expired one (a token whose exp is in the past).
        let expired = Jwt {
            ttl: Duration::ZERO,
            ..Jwt::load(&opts(&secret, Duration::from_secs(60))).unwrap()
        };
        let old = expired.sign("alice", 7).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(jwt.verify(&old), None);
    }
}
