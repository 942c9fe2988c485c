//! `--config-file`: etcd's YAML configuration file (etcd's `etcd.conf.yml.sample`).
//!
//! Its keys are the flags' names (`name`, `data-dir`, `listen-client-urls`, ...), plus two
//! sections for TLS: `client-transport-security` (`cert-file`, `key-file`, `client-cert-auth`,
//! `trusted-ca-file`, `auto-tls`, `crl-file`) and `peer-transport-security` (the same, for the
//! `--peer-*` flags, and `allowed-cn`, `allowed-hostname`). Lists are joined with commas; empty
//! values leave the flag at its default; durations are integers of nanoseconds, as etcd's YAML
//! holds them. As in etcd 3.4, a configuration file replaces the command line and the `ETCD_*`
//! variables: they are ignored when one is given. A key Keel does not know is ignored, as etcd
//! ignores it, and named in a notice at start.

use std::path::Path;

use clap::{CommandFactory, FromArgMatches};
use yaml_rust2::{Yaml, YamlLoader};

use super::Flags;

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not YAML: {reason}")]
    Yaml { path: String, reason: String },
    #[error("the configuration file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Keys whose values are Go durations (`time.Duration` in etcd's configuration struct).
const DURATION_KEYS: &[&str] = &[
    "grpc-keepalive-min-time",
    "grpc-keepalive-interval",
    "grpc-keepalive-timeout",
    "backend-batch-interval",
    "experimental-corrupt-check-time",
    "experimental-watch-progress-notify-interval",
    "experimental-warning-apply-duration",
    "experimental-lease-checkpoint-interval",
];

/// A scalar or a list as a flag's value; `None` for an empty value.
fn value(v: &Yaml) -> Result<Option<String>, String> {
    Ok(match v {
        Yaml::Null => None,
        Yaml::String(s) if s.is_empty() => None,
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        Yaml::Array(items) => {
            let mut parts = Vec::new();
            for item in items {
                if let Some(s) = value(item)? {
                    parts.push(s);
                }
            }
            (!parts.is_empty()).then(|| parts.join(","))
        }
        other => return Err(format!("{other:?} is not a value")),
    })
}

/// The flag a key of a transport-security section sets.
fn security_flag(section: &str, key: &str) -> Option<String> {
    let peer = section == "peer-transport-security";
    let flag = match key {
        "cert-file" | "key-file" | "client-cert-auth" | "trusted-ca-file" | "auto-tls" => {
            key.to_string()
        }
        "crl-file" => "client-crl-file".to_string(),
        "allowed-cn" if peer => "cert-allowed-cn".to_string(),
        "allowed-hostname" if peer => "cert-allowed-hostname".to_string(),
        _ => return None,
    };
    Some(match (peer, flag.as_str()) {
        (true, "client-crl-file") => "peer-crl-file".to_string(),
        (true, f) => format!("peer-{f}"),
        (false, f) => f.to_string(),
    })
}

/// The command line a configuration file's text stands for.
pub fn args(text: &str) -> Result<Vec<String>, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
    let mut args = Vec::new();
    let Some(doc) = docs.into_iter().next() else {
        return Ok(args);
    };
    let Yaml::Hash(map) = doc else {
        return Err("the top level is not a map of keys".into());
    };
    for (k, v) in map {
        let Yaml::String(key) = k else {
            return Err(format!("{k:?} is not a key"));
        };
        if key == "client-transport-security" || key == "peer-transport-security" {
            let Yaml::Hash(section) = v else {
                if matches!(v, Yaml::Null) {
                    continue;
                }
                return Err(format!("{key} is not a map"));
            };
            for (sk, sv) in section {
                let Yaml::String(sk) = sk else {
                    return Err(format!("{sk:?} in {key} is not a key"));
                };
                let flag =
                    security_flag(&key, &sk).ok_or_else(|| format!("unknown key {key}.{sk}"))?;
                if let Some(v) = value(&sv).map_err(|e| format!("{key}.{sk}: {e}"))? {
                    args.push(format!("--{flag}={v}"));
                }
            }
            continue;
        }
        if key == "config-file" {
            return Err("config-file cannot name another configuration file".into());
        }
        // etcd's YAML holds durations as integers of nanoseconds (Go's time.Duration).
        let v = match (&v, DURATION_KEYS.contains(&key.as_str())) {
            (Yaml::Integer(n), true) => Some(format!("{n}ns")),
            _ => value(&v).map_err(|e| format!("{key}: {e}"))?,
        };
        if let Some(v) = v {
            args.push(format!("--{key}={v}"));
        }
    }
    Ok(args)
}

/// The flags of the configuration file at `path`; the command line and the `ETCD_*` variables
/// are not read.
pub fn load(path: &Path) -> Result<Flags, FileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: shown.clone(),
        source,
    })?;
    let args = args(&text).map_err(|reason| FileError::Yaml {
        path: shown.clone(),
        reason,
    })?;
    // The same flags, their environment variables unset, so that only the file counts.
    let command = Flags::command().mut_args(|a| a.env(None::<&str>));
    let known: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    // Keys Keel does not know are ignored, as etcd's YAML decoding ignores them, and noted.
    let mut ignored = Vec::new();
    let args: Vec<String> = args
        .into_iter()
        .filter(|arg| {
            let name = arg
                .trim_start_matches("--")
                .split('=')
                .next()
                .unwrap_or_default();
            let keep = known.iter().any(|k| k == name);
            if !keep {
                ignored.push(name.to_string());
            }
            keep
        })
        .collect();
    let matches = command
        .try_get_matches_from(std::iter::once("keel".to_string()).chain(args))
        .map_err(|e| FileError::Invalid {
            path: shown.clone(),
            reason: e.to_string().lines().next().unwrap_or_default().to_string(),
        })?;
    let mut flags = Flags::from_arg_matches(&matches).map_err(|e| FileError::Invalid {
        path: shown,
        reason: e.to_string(),
    })?;
    flags.compat.ignored_config_keys = ignored;
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_lists_and_sections_become_flags() {
        let got = args(
            "name: 'm1'\n\
             data-dir:\n\
             heartbeat-interval: 100\n\
             enable-v2: false\n\
             log-outputs: [stderr, /var/log/keel.log]\n\
             grpc-keepalive-interval: 7200000000000\n\
             client-transport-security:\n  cert-file: /c.pem\n  client-cert-auth: true\n  crl-file: /crl\n\
             peer-transport-security:\n  key-file: /k.pem\n  allowed-cn: m\n  crl-file: /pcrl\n",
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "--name=m1",
                "--heartbeat-interval=100",
                "--enable-v2=false",
                "--log-outputs=stderr,/var/log/keel.log",
                "--grpc-keepalive-interval=7200000000000ns",
                "--cert-file=/c.pem",
                "--client-cert-auth=true",
                "--client-crl-file=/crl",
                "--peer-key-file=/k.pem",
                "--peer-cert-allowed-cn=m",
                "--peer-crl-file=/pcrl",
            ]
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        assert!(args("- a\n- b\n").unwrap_err().contains("not a map"));
        assert!(
            args("client-transport-security:\n  allowed-cn: x\n")
                .unwrap_err()
                .contains("unknown key client-transport-security.allowed-cn")
        );
        assert!(args("name: [unclosed\n").is_err());
        assert_eq!(args("").unwrap(), Vec::<String>::new());
    }
}
