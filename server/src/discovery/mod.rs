//! How a new member finds the others when `--initial-cluster` does not list them: DNS SRV
//! records (`--discovery-srv`, [`srv`]) or a discovery service (`--discovery`, [`service`]).
//! Used only when a member starts without a data dir, as etcd does; a restarting member knows
//! its cluster.

pub mod dns;
pub mod http;
pub mod service;
pub mod srv;
