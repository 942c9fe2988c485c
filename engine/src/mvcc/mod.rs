//! etcd's MVCC key-value store on Keel's backend.
//!
//! # Layout
//! - [`revision`]: `(main, sub)` revisions and their 17-byte keys.
//! - [`key_index`]: one key's history in generations (etcd's `keyIndex`).
//! - [`index`]: all keys' histories (etcd's `treeIndex`), rebuilt from the backend on open.
//! - [`kv`]: `mvccpb.KeyValue`, as stored.
//! - [`kvstore`]: the store: reads at any revision, the write transaction, compaction, hashes.
//! - [`apply`]: etcd's request semantics on top (Range with sort and filters, Put with
//!   `prev_kv`/`ignore_*`, DeleteRange, Txn with compares, nesting and the duplicate-key rule).
//!
//! The names follow etcd's `mvcc` package so the two can be read side by side.

pub mod apply;
pub mod index;
pub mod key_index;
pub mod kv;
pub mod kvstore;
pub mod revision;

pub use kv::KeyValue;
pub use kvstore::{
    Change, Compaction, HashKv, RangeOptions, RangeResult, ReadView, Store, WriteTxn,
};
pub use revision::Revision;
