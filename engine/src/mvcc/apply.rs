//! etcd's KV request semantics on top of the store: request validation (`v3rpc/key.go`) and
//! application (`etcdserver/apply.go`). The types mirror `etcdserverpb`'s field for field, so the
//! server's conversion is mechanical.
//!
//! Not here: lease existence (the lessor checks `Put` leases before applying), quotas, and the
//! response header's cluster/member/term fields (the server fills them).

use std::cmp::Ordering;
use std::collections::HashSet;

use super::kv::KeyValue;
use super::kvstore::{Change, RangeOptions, RangeResult, ReadView, Store, WriteTxn};
use crate::error::{Error, Result};

/// Sort order of a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SortOrder {
    /// No sorting (key order).
    #[default]
    None,
    /// Ascending.
    Ascend,
    /// Descending.
    Descend,
}

/// What a range is sorted by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SortTarget {
    /// The key.
    #[default]
    Key,
    /// The version.
    Version,
    /// The create revision.
    Create,
    /// The mod revision.
    Mod,
    /// The value.
    Value,
}

/// etcd's `RangeRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeRequest {
    pub key: Vec<u8>,
    /// Empty: the single key; `[0]`: every key `>= key`; otherwise `[key, range_end)`.
    pub range_end: Vec<u8>,
    pub limit: i64,
    pub revision: i64,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub serializable: bool,
    pub keys_only: bool,
    pub count_only: bool,
    pub min_mod_revision: i64,
    pub max_mod_revision: i64,
    pub min_create_revision: i64,
    pub max_create_revision: i64,
    /// The largest response accepted, in bytes of keys and values (0: no limit); over it the
    /// range fails with `ResponseTooLarge` (not an etcd field: the server's send limit).
    pub max_bytes: usize,
}

/// etcd's `RangeResponse` (the header's revision in `revision`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeResponse {
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    pub count: i64,
}

/// etcd's `PutRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutRequest {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub lease: i64,
    pub prev_kv: bool,
    pub ignore_value: bool,
    pub ignore_lease: bool,
}

/// etcd's `PutResponse`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutResponse {
    pub revision: i64,
    pub prev_kv: Option<KeyValue>,
}

/// etcd's `DeleteRangeRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteRangeRequest {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
}

/// etcd's `DeleteRangeResponse`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteRangeResponse {
    pub revision: i64,
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

/// etcd's `Compare.CompareResult`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CompareResult {
    #[default]
    Equal,
    Greater,
    Less,
    NotEqual,
}

/// etcd's `Compare.CompareTarget`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CompareTarget {
    #[default]
    Version,
    Create,
    Mod,
    Value,
    Lease,
}

/// etcd's `Compare.target_union` (which may disagree with the target: then the operand is 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetUnion {
    Version(i64),
    CreateRevision(i64),
    ModRevision(i64),
    Value(Vec<u8>),
    Lease(i64),
}

/// etcd's `Compare`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compare {
    pub result: CompareResult,
    pub target: CompareTarget,
    pub key: Vec<u8>,
    pub target_union: Option<TargetUnion>,
    pub range_end: Vec<u8>,
}

/// etcd's `RequestOp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    /// An op with no request set (etcd refuses it with "key not found").
    Empty,
}

/// etcd's `TxnRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

/// etcd's `ResponseOp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
}

/// etcd's `TxnResponse` (`revision` is 0 in nested responses, whose headers etcd leaves empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnResponse {
    pub revision: i64,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

/// etcd's `mkGteRange`: `range_end` as a store range end.
fn range_end(range_end: &[u8]) -> Option<&[u8]> {
    match range_end {
        [] => None,
        [0] => Some(&[]),
        end => Some(end),
    }
}

// ---------------------------------------------------------------------------------------------
// Validation (etcd's v3rpc/key.go)

/// Validates a range request.
pub fn check_range(r: &RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// Validates a put request.
pub fn check_put(r: &PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

/// Validates a delete request.
pub fn check_delete(r: &DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_ops: usize) -> Result<()> {
    match op {
        RequestOp::Range(r) => check_range(r),
        RequestOp::Put(r) => check_put(r),
        RequestOp::DeleteRange(r) => check_delete(r),
        RequestOp::Txn(t) => check_txn_request(t, max_ops),
        RequestOp::Empty => Err(Error::KeyNotFound),
    }
}

/// etcd's `checkTxnRequest`: size (`max_ops`, etcd's `--max-txn-ops`, shrinking for nested
/// txns), compare keys, each op.
fn check_txn_request(t: &TxnRequest, max_ops: usize) -> Result<()> {
    let ops = t.compare.len().max(t.success.len()).max(t.failure.len());
    if ops > max_ops {
        return Err(Error::TooManyOps);
    }
    if t.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    for op in t.success.iter().chain(&t.failure) {
        check_op(op, max_ops - ops)?;
    }
    Ok(())
}

/// Validates a txn as etcd's Txn handler does: the request checks, then the duplicate-key rule
/// on each branch (which looks into nested txns itself).
pub fn check_txn(t: &TxnRequest, max_ops: usize) -> Result<()> {
    check_txn_request(t, max_ops)?;
    check_intervals(&t.success)?;
    check_intervals(&t.failure)?;
    Ok(())
}

/// A deleted interval `[begin, end)`; a point delete is `[key, key + "\0")`.
#[derive(Debug, Clone)]
struct Interval {
    begin: Vec<u8>,
    /// `None`: the point `begin`.
    end: Option<Vec<u8>>,
}

impl Interval {
    /// Whether the point `k` lies in the interval.
    fn contains(&self, k: &[u8]) -> bool {
        match &self.end {
            None => self.begin == k,
            Some(end) => self.begin.as_slice() <= k && k < end.as_slice(),
        }
    }
}

/// etcd's `checkIntervals`: the keys put and the intervals deleted by `ops` (recursively), or
/// `ErrDuplicateKey` if one key is put twice, or put and deleted, on paths that can both run.
fn check_intervals(ops: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Interval>)> {
    let mut dels: Vec<Interval> = ops
        .iter()
        .filter_map(|op| match op {
            RequestOp::DeleteRange(d) => Some(Interval {
                begin: d.key.clone(),
                end: (!d.range_end.is_empty()).then(|| d.range_end.clone()),
            }),
            _ => None,
        })
        .collect();
    let hits = |dels: &[Interval], k: &[u8]| dels.iter().any(|d| d.contains(k));
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in ops {
        let RequestOp::Txn(t) = op else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || hits(&dels, k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            // Then and else exclude each other: the same key in both is fine.
            if (puts.contains(k) && !puts_then.contains(k)) || hits(&dels, k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let RequestOp::Put(p) = op else { continue };
        if puts.contains(&p.key) || hits(&dels, &p.key) {
            return Err(Error::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

// ---------------------------------------------------------------------------------------------
// Application (etcd's etcdserver/apply.go)

/// Which leases exist: a put naming any other lease fails with `ErrLeaseNotFound`, as in etcd.
pub trait Leases {
    /// Whether lease `id` exists now.
    fn exists(&self, id: i64) -> bool;
}

/// The lease table of a member that has granted none (no lessor yet): every lease is unknown.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLeases;

impl Leases for NoLeases {
    fn exists(&self, _id: i64) -> bool {
        false
    }
}

/// A predicate over lease ids is a lease table (tests, and callers holding a plain set).
impl<F: Fn(i64) -> bool> Leases for F {
    fn exists(&self, id: i64) -> bool {
        self(id)
    }
}

/// Something ranges can be read from: a read view, or the write transaction itself.
pub trait Reader {
    /// A store-level range.
    fn range(&self, key: &[u8], end: Option<&[u8]>, opts: RangeOptions) -> Result<RangeResult>;
    /// The revision the reader is at.
    fn rev(&self) -> i64;
    /// The compacted revision.
    fn first_rev(&self) -> i64;
}

impl Reader for ReadView<'_> {
    fn range(&self, key: &[u8], end: Option<&[u8]>, opts: RangeOptions) -> Result<RangeResult> {
        ReadView::range(self, key, end, opts)
    }
    fn rev(&self) -> i64 {
        ReadView::rev(self)
    }
    fn first_rev(&self) -> i64 {
        self.compact_revision()
    }
}

impl Reader for WriteTxn<'_> {
    fn range(&self, key: &[u8], end: Option<&[u8]>, opts: RangeOptions) -> Result<RangeResult> {
        WriteTxn::range(self, key, end, opts)
    }
    fn rev(&self) -> i64 {
        WriteTxn::rev(self)
    }
    fn first_rev(&self) -> i64 {
        self.compact_revision()
    }
}

fn sort_key_cmp(target: SortTarget, a: &KeyValue, b: &KeyValue) -> Ordering {
    match target {
        SortTarget::Key => a.key.cmp(&b.key),
        SortTarget::Version => a.version.cmp(&b.version),
        SortTarget::Create => a.create_revision.cmp(&b.create_revision),
        SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
        SortTarget::Value => a.value.cmp(&b.value),
    }
}

/// A Range, as etcd applies it.
pub fn range(reader: &impl Reader, r: &RangeRequest) -> Result<RangeResponse> {
    let filtered = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    // Sorting or filtering needs every key before the limit applies; otherwise fetch one more
    // than the limit to learn `more`.
    let mut limit = r.limit;
    if r.sort_order != SortOrder::None || filtered {
        limit = 0;
    }
    if limit > 0 {
        limit = limit.saturating_add(1);
    }
    // A keys-only range sorted by value reads its values (etcd sorts by value, then drops
    // them), and is measured against `max_bytes` once sorted and cut, without the values it
    // does not send.
    let by_value = r.keys_only && r.sort_target == SortTarget::Value;
    let opts = RangeOptions {
        limit,
        rev: r.revision,
        count: r.count_only,
        max_bytes: if by_value { 0 } else { r.max_bytes },
        keys_only: r.keys_only && !by_value,
    };
    let rr = reader.range(&r.key, range_end(&r.range_end), opts)?;
    let mut kvs = rr.kvs;
    if r.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= r.max_mod_revision);
    }
    if r.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= r.min_mod_revision);
    }
    if r.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= r.max_create_revision);
    }
    if r.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= r.min_create_revision);
    }
    let mut order = r.sort_order;
    if r.sort_target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    // Stable sorts: equal elements keep key order in both directions, as etcd's sort of small
    // slices (insertion sort) does.
    match order {
        SortOrder::None => {}
        SortOrder::Ascend => kvs.sort_by(|a, b| sort_key_cmp(r.sort_target, a, b)),
        SortOrder::Descend => kvs.sort_by(|a, b| sort_key_cmp(r.sort_target, b, a)),
    }
    let mut more = false;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    if by_value && r.max_bytes > 0 {
        let size: usize = kvs.iter().map(|kv| 32 + kv.key.len()).sum();
        if size > r.max_bytes {
            return Err(Error::ResponseTooLarge { limit: r.max_bytes });
        }
    }
    Ok(RangeResponse {
        revision: rr.rev,
        kvs,
        more,
        count: rr.count as i64,
    })
}

/// A Put inside a write transaction: the lease must exist (checked first, as etcd's apply does),
/// and `ignore_*` needs the key.
pub fn put(txn: &mut WriteTxn<'_>, r: &PutRequest, leases: &impl Leases) -> Result<PutResponse> {
    if r.lease != 0 && !leases.exists(r.lease) {
        return Err(Error::LeaseNotFound);
    }
    put_checked(txn, r)
}

/// A Put whose lease is known to exist.
fn put_checked(txn: &mut WriteTxn<'_>, r: &PutRequest) -> Result<PutResponse> {
    let mut prev = None;
    if r.ignore_value || r.ignore_lease || r.prev_kv {
        prev = txn
            .range(&r.key, None, RangeOptions::default())?
            .kvs
            .into_iter()
            .next();
    }
    if (r.ignore_value || r.ignore_lease) && prev.is_none() {
        return Err(Error::KeyNotFound);
    }
    let value: &[u8] = match &prev {
        Some(p) if r.ignore_value => &p.value,
        _ => &r.value,
    };
    let lease = match &prev {
        Some(p) if r.ignore_lease => p.lease,
        _ => r.lease,
    };
    let revision = txn.put(&r.key, value, lease)?;
    Ok(PutResponse {
        revision,
        prev_kv: if r.prev_kv { prev } else { None },
    })
}

/// A DeleteRange inside a write transaction.
pub fn delete_range(txn: &mut WriteTxn<'_>, r: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
    let end = range_end(&r.range_end);
    let prev_kvs = if r.prev_kv {
        txn.range(&r.key, end, RangeOptions::default())?.kvs
    } else {
        Vec::new()
    };
    let (deleted, revision) = txn.delete_range(&r.key, end)?;
    Ok(DeleteRangeResponse {
        revision,
        deleted,
        prev_kvs,
    })
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    let ordering = match c.target {
        CompareTarget::Value => {
            let v: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(v)
        }
        target => {
            let (have, want) = match (target, &c.target_union) {
                (CompareTarget::Version, Some(TargetUnion::Version(v))) => (kv.version, *v),
                (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => {
                    (kv.create_revision, *v)
                }
                (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => (kv.mod_revision, *v),
                (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => (kv.lease, *v),
                (CompareTarget::Version, _) => (kv.version, 0),
                (CompareTarget::Create, _) => (kv.create_revision, 0),
                (CompareTarget::Mod, _) => (kv.mod_revision, 0),
                (CompareTarget::Lease, _) => (kv.lease, 0),
                (CompareTarget::Value, _) => unreachable!("handled above"),
            };
            have.cmp(&want)
        }
    };
    match c.result {
        CompareResult::Equal => ordering == Ordering::Equal,
        CompareResult::Greater => ordering == Ordering::Greater,
        CompareResult::Less => ordering == Ordering::Less,
        CompareResult::NotEqual => ordering != Ordering::Equal,
    }
}

/// etcd's `applyCompare`: every key in the compare's range must satisfy it; with no key, a value
/// compare fails and the others compare against zeros.
fn compare(reader: &impl Reader, c: &Compare) -> bool {
    let Ok(rr) = reader.range(&c.key, range_end(&c.range_end), RangeOptions::default()) else {
        return false;
    };
    if rr.kvs.is_empty() {
        return c.target != CompareTarget::Value && compare_kv(c, &KeyValue::default());
    }
    rr.kvs.iter().all(|kv| compare_kv(c, kv))
}

/// The branches a txn takes, depth first (etcd's `txnPath`), all decided on the state before the
/// txn runs.
fn txn_path(reader: &impl Reader, t: &TxnRequest, path: &mut Vec<bool>) {
    let ok = t.compare.iter().all(|c| compare(reader, c));
    path.push(ok);
    for op in if ok { &t.success } else { &t.failure } {
        if let RequestOp::Txn(nested) = op {
            txn_path(reader, nested, path);
        }
    }
}

/// A write a txn makes, in order, for checking later ops before anything is written.
enum Effect<'t> {
    Put(&'t [u8]),
    Delete(&'t [u8], &'t [u8]),
}

/// Whether `k` falls in the range of a request with `key` and `range_end` (etcd's conventions).
fn covers(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    match range_end(end) {
        None => k == key,
        Some([]) => k >= key,
        Some(end) => k >= key && k < end,
    }
}

/// Whether `key` exists at this point of the txn: the txn's own latest write to it decides,
/// else the state before the txn.
fn exists(reader: &impl Reader, effects: &[Effect<'_>], key: &[u8]) -> Result<bool> {
    for e in effects.iter().rev() {
        match e {
            Effect::Put(k) if *k == key => return Ok(true),
            Effect::Delete(k, end) if covers(key, k, end) => return Ok(false),
            _ => {}
        }
    }
    Ok(!reader
        .range(key, None, RangeOptions::default())?
        .kvs
        .is_empty())
}

/// First pass of the checks (etcd checks puts before ranges): a put with `ignore_value` or
/// `ignore_lease` needs its key to exist *at its place in the txn*, so earlier deletes and puts
/// of the same txn count. (etcd checks against the state before the txn and panics when an
/// earlier delete removed the key; Keel refuses the txn instead.)
fn check_puts<'t>(
    reader: &impl Reader,
    leases: &impl Leases,
    t: &'t TxnRequest,
    path: &mut std::slice::Iter<'_, bool>,
    effects: &mut Vec<Effect<'t>>,
) -> Result<()> {
    let ok = *path.next().expect("path covers the txn");
    for op in if ok { &t.success } else { &t.failure } {
        match op {
            RequestOp::Put(p) => {
                if (p.ignore_value || p.ignore_lease) && !exists(reader, effects, &p.key)? {
                    return Err(Error::KeyNotFound);
                }
                if p.lease != 0 && !leases.exists(p.lease) {
                    return Err(Error::LeaseNotFound);
                }
                effects.push(Effect::Put(&p.key));
            }
            RequestOp::DeleteRange(d) => effects.push(Effect::Delete(&d.key, &d.range_end)),
            RequestOp::Txn(nested) => check_puts(reader, leases, nested, path, effects)?,
            RequestOp::Range(_) => {}
            RequestOp::Empty => return Err(Error::KeyNotFound),
        }
    }
    Ok(())
}

/// Second pass: range revisions must be readable.
fn check_ranges(
    reader: &impl Reader,
    t: &TxnRequest,
    path: &mut std::slice::Iter<'_, bool>,
) -> Result<()> {
    let ok = *path.next().expect("path covers the txn");
    for op in if ok { &t.success } else { &t.failure } {
        match op {
            RequestOp::Range(r) if r.revision != 0 => {
                if r.revision > reader.rev() {
                    return Err(Error::FutureRev);
                }
                if r.revision < reader.first_rev() {
                    return Err(Error::Compacted);
                }
            }
            RequestOp::Txn(nested) => check_ranges(reader, nested, path)?,
            _ => {}
        }
    }
    Ok(())
}

/// Checks the ops a txn will run, before it writes anything: after these, applying it can only
/// fail on I/O.
fn check_path(
    reader: &impl Reader,
    leases: &impl Leases,
    t: &TxnRequest,
    path: &[bool],
) -> Result<()> {
    check_puts(reader, leases, t, &mut path.iter(), &mut Vec::new())?;
    check_ranges(reader, t, &mut path.iter())
}

fn is_read_only(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| match op {
        RequestOp::Range(_) => true,
        RequestOp::Txn(nested) => is_read_only(nested),
        _ => false,
    })
}

/// Runs the chosen branches of a read-only txn.
fn run_read(
    reader: &impl Reader,
    t: &TxnRequest,
    path: &mut std::slice::Iter<'_, bool>,
) -> Result<TxnResponse> {
    let ok = *path.next().expect("path covers the txn");
    let mut responses = Vec::new();
    for op in if ok { &t.success } else { &t.failure } {
        responses.push(match op {
            RequestOp::Range(r) => ResponseOp::Range(range(reader, r)?),
            RequestOp::Txn(nested) => ResponseOp::Txn(run_read(reader, nested, path)?),
            _ => unreachable!("read-only txn"),
        });
    }
    Ok(TxnResponse {
        revision: 0,
        succeeded: ok,
        responses,
    })
}

/// Runs the chosen branches of a txn in the write transaction: later ops see earlier writes.
///
/// A range whose response would pass the send limit does not stop the txn: its writes are
/// applied (on every member alike), and `too_large` tells the proposer to answer the client
/// `ResourceExhausted`, as etcd commits the txn and then fails to send its response.
fn run_write(
    txn: &mut WriteTxn<'_>,
    t: &TxnRequest,
    path: &mut std::slice::Iter<'_, bool>,
    too_large: &mut Option<Error>,
) -> Result<TxnResponse> {
    let ok = *path.next().expect("path covers the txn");
    let mut responses = Vec::new();
    for op in if ok { &t.success } else { &t.failure } {
        responses.push(match op {
            RequestOp::Range(r) => match range(txn, r) {
                Ok(r) => ResponseOp::Range(r),
                Err(e @ Error::ResponseTooLarge { .. }) => {
                    too_large.get_or_insert(e);
                    ResponseOp::Range(RangeResponse::default())
                }
                Err(e) => return Err(e),
            },
            RequestOp::Put(p) => ResponseOp::Put(put_checked(txn, p)?),
            RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(delete_range(txn, d)?),
            RequestOp::Txn(nested) => ResponseOp::Txn(run_write(txn, nested, path, too_large)?),
            RequestOp::Empty => return Err(Error::KeyNotFound),
        });
    }
    Ok(TxnResponse {
        revision: 0,
        succeeded: ok,
        responses,
    })
}

/// A Txn inside an open write transaction (a batch): its writes share the transaction's current
/// revision; call [`WriteTxn::finish_revision`] after it. Read-only txns write nothing.
pub fn txn_in(w: &mut WriteTxn<'_>, t: &TxnRequest, leases: &impl Leases) -> Result<TxnResponse> {
    let mut path = Vec::new();
    txn_path(w, t, &mut path);
    check_path(w, leases, t, &path)?;
    let mut too_large = None;
    let mut resp = if is_read_only(t) {
        run_read(w, t, &mut path.iter())?
    } else {
        // Checked above: a failure now is I/O or corruption, and the transaction must not commit
        // half of this txn. A range too large to send is not one (see `run_write`).
        run_write(w, t, &mut path.iter(), &mut too_large).inspect_err(|_| w.fail())?
    };
    if let Some(e) = too_large {
        // Applied; only the answer fails. The transaction stays good.
        return Err(e);
    }
    resp.revision = w.rev();
    Ok(resp)
}

/// A whole Txn, as etcd applies it. Read-only txns run on a read view and never bump the
/// revision; others run in one write transaction (one revision for all their writes) recorded
/// with `applied` (raft index, term). Returns the response and the changes made.
pub fn txn(
    store: &Store,
    t: &TxnRequest,
    leases: &impl Leases,
    applied: Option<(u64, u64)>,
) -> Result<(TxnResponse, Vec<Change>)> {
    if is_read_only(t) {
        let view = store.read();
        let mut path = Vec::new();
        txn_path(&view, t, &mut path);
        check_path(&view, leases, t, &path)?;
        let mut resp = run_read(&view, t, &mut path.iter())?;
        resp.revision = view.rev();
        return Ok((resp, Vec::new()));
    }
    let mut w = store.write()?;
    let resp = match txn_in(&mut w, t, leases) {
        Ok(resp) => resp,
        // Applied, but too large to answer: committed all the same.
        Err(e @ Error::ResponseTooLarge { .. }) => {
            w.end(applied)?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let changes = w.end(applied)?;
    Ok((resp, changes))
}

/// A standalone Put in its own write transaction.
pub fn put_request(
    store: &Store,
    r: &PutRequest,
    leases: &impl Leases,
    applied: Option<(u64, u64)>,
) -> Result<(PutResponse, Vec<Change>)> {
    let mut w = store.write()?;
    let resp = put(&mut w, r, leases)?;
    Ok((resp, w.end(applied)?))
}

/// A standalone DeleteRange in its own write transaction.
pub fn delete_request(
    store: &Store,
    r: &DeleteRangeRequest,
    applied: Option<(u64, u64)>,
) -> Result<(DeleteRangeResponse, Vec<Change>)> {
    let mut w = store.write()?;
    let resp = delete_range(&mut w, r)?;
    Ok((resp, w.end(applied)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_op(k: &str) -> RequestOp {
        RequestOp::Put(PutRequest {
            key: k.into(),
            ..Default::default()
        })
    }

    fn del_op(k: &str, end: &str) -> RequestOp {
        RequestOp::DeleteRange(DeleteRangeRequest {
            key: k.into(),
            range_end: end.into(),
            ..Default::default()
        })
    }

    fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp::Txn(TxnRequest {
            compare: vec![],
            success,
            failure,
        })
    }

    /// A txn whose range is too large to answer is applied all the same (etcd commits it and
    /// fails the send): the write transaction is not failed, its writes commit, and the
    /// proposer gets `ResponseTooLarge`. It used to fail the batch, which stopped every member.
    #[test]
    fn a_txn_with_a_range_too_large_to_answer_still_applies() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("db"), Default::default()).unwrap();
        put_request(
            &store,
            &PutRequest {
                key: b"big".to_vec(),
                value: vec![b'v'; 1000],
                ..Default::default()
            },
            &NoLeases,
            None,
        )
        .unwrap();
        let t = TxnRequest {
            compare: vec![],
            success: vec![
                put_op("written"),
                RequestOp::Range(RangeRequest {
                    key: b"big".to_vec(),
                    max_bytes: 100,
                    ..Default::default()
                }),
            ],
            failure: vec![],
        };
        let written = || {
            let r = RangeRequest {
                key: b"written".to_vec(),
                ..Default::default()
            };
            range(&store.read(), &r).unwrap()
        };
        let mut w = store.write().unwrap();
        let err = txn_in(&mut w, &t, &NoLeases).unwrap_err();
        assert!(matches!(err, Error::ResponseTooLarge { .. }), "{err}");
        w.finish_revision();
        w.end(None).unwrap();
        let got = written();
        assert_eq!(got.kvs.len(), 1, "the txn's put was applied");
        assert!(matches!(
            txn(&store, &t, &NoLeases, None),
            Err(Error::ResponseTooLarge { .. })
        ));
        let got = written();
        assert_eq!(got.kvs[0].version, 2, "applied by txn() too");
    }

    /// A keys-only range sorted by value is ordered by the values it does not return, as
    /// etcd sorts before dropping them.
    #[test]
    fn a_keys_only_range_sorted_by_value_orders_by_the_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("db"), Default::default()).unwrap();
        for (k, v) in [("k0", "b"), ("k1", "a")] {
            let put = PutRequest {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            };
            put_request(&store, &put, &NoLeases, None).unwrap();
        }
        // Keys-only, sorted by value, at most `max_bytes` (0: no limit).
        let sorted = |max_bytes| {
            let r = RangeRequest {
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                sort_target: SortTarget::Value,
                keys_only: true,
                max_bytes,
                ..Default::default()
            };
            range(&store.read(), &r)
        };
        let got = sorted(0).unwrap();
        let keys: Vec<&[u8]> = got.kvs.iter().map(|kv| &kv.key[..]).collect();
        assert_eq!(keys, [&b"k1"[..], b"k0"]);
        assert!(got.kvs.iter().all(|kv| kv.value.is_empty()));
        // The response limit counts what is sent: keys, not the values read to sort them.
        let long = PutRequest {
            key: b"k2".to_vec(),
            value: vec![b'z'; 1000],
            ..Default::default()
        };
        put_request(&store, &long, &NoLeases, None).unwrap();
        assert_eq!(sorted(200).unwrap().kvs.len(), 3);
        assert!(matches!(sorted(50), Err(Error::ResponseTooLarge { .. })));
    }

    #[test]
    fn duplicate_key_rule_matches_etcd() {
        let dup = |ops: Vec<RequestOp>| check_intervals(&ops).is_err();
        assert!(dup(vec![put_op("a"), put_op("a")]));
        assert!(dup(vec![put_op("a"), del_op("a", "")]));
        assert!(dup(vec![del_op("a", "c"), put_op("b")]));
        assert!(
            !dup(vec![del_op("a", "c"), put_op("c")]),
            "end is exclusive"
        );
        assert!(
            !dup(vec![del_op("a", ""), del_op("a", "")]),
            "repeated deletes are fine"
        );
        assert!(
            !dup(vec![del_op("a", "\0"), put_op("a")]),
            "range_end \\0 is not widened here"
        );
        assert!(dup(vec![put_op("a"), nested(vec![put_op("a")], vec![])]));
        assert!(
            !dup(vec![nested(vec![put_op("a")], vec![put_op("a")])]),
            "then/else exclusive"
        );
        assert!(dup(vec![
            nested(vec![put_op("a")], vec![]),
            nested(vec![put_op("a")], vec![])
        ]));
        assert!(dup(vec![
            del_op("a", ""),
            nested(vec![put_op("a")], vec![])
        ]));
        assert!(dup(vec![
            nested(vec![del_op("a", "")], vec![]),
            put_op("a")
        ]));
    }

    #[test]
    fn txn_validation_errors() {
        let t = TxnRequest {
            success: vec![put_op("a"); 3],
            ..Default::default()
        };
        assert!(matches!(check_txn(&t, 2), Err(Error::TooManyOps)));
        check_txn(&t.clone(), 3).unwrap_err(); // duplicate key
        let t = TxnRequest {
            success: vec![RequestOp::Empty],
            ..Default::default()
        };
        assert!(matches!(check_txn(&t, 128), Err(Error::KeyNotFound)));
        let t = TxnRequest {
            compare: vec![Compare {
                key: vec![],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(matches!(check_txn(&t, 128), Err(Error::EmptyKey)));
        let p = PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ignore_value: true,
            ..Default::default()
        };
        assert!(matches!(check_put(&p), Err(Error::ValueProvided)));
        let p = PutRequest {
            key: b"k".to_vec(),
            lease: 5,
            ignore_lease: true,
            ..Default::default()
        };
        assert!(matches!(check_put(&p), Err(Error::LeaseProvided)));
    }

    #[test]
    fn range_end_conventions() {
        assert_eq!(range_end(b""), None);
        assert_eq!(range_end(b"\0"), Some(&b""[..]));
        assert_eq!(range_end(b"b"), Some(&b"b"[..]));
    }
}
