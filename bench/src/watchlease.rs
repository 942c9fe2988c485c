//! `watch-latency` and `lease-keepalive`, as etcd's benchmark defines them.
//!
//! - **watch-latency**: `--clients` watch streams (spread over `--conns` connections) each watch
//!   one key (or, with `--prefix`, the key as a prefix); one more connection puts to it at
//!   `--put-rate` until `--total` puts. Each event's latency is from the moment its put was sent
//!   to the moment a watcher receives it (etcd's tool starts the clock when the put returns;
//!   starting it at the send counts the whole write-to-notification path).
//! - **lease-keepalive**: each client grants leases (`--leases` in all, at least one per client;
//!   etcd's tool grants one per client), then sends `--total` keep-alives round-robin over its
//!   leases on one keep-alive stream, each timed from request to response.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use keel_proto::etcdserverpb as pb;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;
use tonic::transport::Channel;

use crate::client::{self, Token};
use crate::report::Recorder;
use crate::run::Outcome;

/// Settings of `watch-latency`.
#[derive(Debug, Clone)]
pub struct WatchLatency {
    pub total: u64,
    pub put_rate: f64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub prefix: bool,
    pub sample: bool,
}

fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Runs `watch-latency` with `watchers` watch streams over `channels`, puts on `put_channel`.
pub async fn watch_latency(
    o: &WatchLatency,
    channels: &[Channel],
    put_channel: Channel,
    token: &Token,
    watchers: usize,
) -> Outcome {
    let starts: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let recorder = Arc::new(Mutex::new(Recorder::new(o.sample)));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let aborted: Arc<Mutex<Option<String>>> = Arc::default();
    let range_end = if o.prefix {
        prefix_end(&o.key)
    } else {
        Vec::new()
    };
    // Open every watch and wait until each is created.
    let mut tasks = Vec::new();
    let (created_tx, mut created_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(1024);
    for i in 0..watchers.max(1) {
        let channel = channels[i % channels.len()].clone();
        let mut client = WatchClient::with_interceptor(channel, token.clone());
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: o.key.clone(),
                    range_end: range_end.clone(),
                    ..Default::default()
                },
            )),
        };
        let requests = futures::stream::iter([create]).chain(futures::stream::pending());
        let (starts, recorder, received, stop, created_tx) = (
            starts.clone(),
            recorder.clone(),
            received.clone(),
            stop.clone(),
            created_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut stream = match client.watch(requests).await {
                Ok(s) => s.into_inner(),
                Err(s) => {
                    let _ = created_tx.send(Err(client::status_text(&s))).await;
                    return;
                }
            };
            let mut local: Vec<(i64, Instant)> = Vec::new();
            loop {
                if !local.is_empty() {
                    // Match receipts with put times (known once the put was acknowledged).
                    let starts = starts.lock().expect("not poisoned");
                    let mut rec = recorder.lock().expect("not poisoned");
                    local.retain(|(rev, at)| match starts.get(rev) {
                        Some(st) => {
                            rec.success(SystemTime::now(), at.saturating_duration_since(*st));
                            false
                        }
                        None => true,
                    });
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                };
                match msg {
                    Ok(Some(r)) => {
                        if r.created {
                            let _ = created_tx.send(Ok(())).await;
                        }
                        let now = Instant::now();
                        for e in &r.events {
                            let rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                            local.push((rev, now));
                        }
                        received.fetch_add(r.events.len() as u64, Ordering::Relaxed);
                    }
                    Ok(None) => break,
                    Err(s) => {
                        let _ = created_tx.send(Err(client::status_text(&s))).await;
                        break;
                    }
                }
            }
        }));
    }
    drop(created_tx);
    let mut created = 0;
    while created < watchers.max(1) {
        match created_rx.recv().await {
            Some(Ok(())) => created += 1,
            Some(Err(e)) => {
                *aborted.lock().expect("not poisoned") = Some(e);
                break;
            }
            None => break,
        }
    }
    let start = Instant::now();
    let mut kv = client::kv(put_channel, token);
    let mut put_recorder = Recorder::new(false);
    if aborted.lock().expect("not poisoned").is_none() {
        for i in 0..o.total {
            if o.put_rate > 0.0 {
                let at = start + Duration::from_secs_f64(i as f64 / o.put_rate);
                tokio::time::sleep_until(at.into()).await;
            }
            let sent = Instant::now();
            let r = pb::PutRequest {
                key: o.key.clone(),
                value: o.value.clone(),
                ..Default::default()
            };
            match kv.put(r).await {
                Ok(resp) => {
                    let rev = resp.into_inner().header.map_or(0, |h| h.revision);
                    starts.lock().expect("not poisoned").insert(rev, sent);
                }
                Err(s) => {
                    put_recorder.error(client::status_text(&s));
                    if client::is_fatal(&s) {
                        *aborted.lock().expect("not poisoned") = Some(client::status_text(&s));
                        break;
                    }
                }
            }
        }
    }
    // Wait for the events still in flight (bounded: a stalled watch must not hang the run).
    let expected = o.total * watchers.max(1) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let missing = expected.saturating_sub(received.load(Ordering::Relaxed));
    let mut all = recorder.lock().expect("not poisoned").clone();
    all.merge(&put_recorder);
    for _ in 0..missing.min(1_000_000) {
        all.error("event not received within 30 s of the last put");
    }
    let aborted = aborted.lock().expect("not poisoned").take();
    Outcome {
        recorders: vec![all],
        elapsed,
        aborted,
    }
}

/// Settings of `lease-keepalive`.
#[derive(Debug, Clone)]
pub struct LeaseKeepalive {
    pub total: u64,
    /// Leases granted in all (at least one per client).
    pub leases: u64,
    pub ttl: i64,
    pub sample: bool,
}

/// Runs `lease-keepalive` with `clients` clients over `channels`.
pub async fn lease_keepalive(
    o: &LeaseKeepalive,
    channels: &[Channel],
    token: &Token,
    clients: usize,
) -> Outcome {
    let clients = clients.max(1);
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let aborted: Arc<Mutex<Option<String>>> = Arc::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let channel = channels[c % channels.len()].clone();
        let mut lease = LeaseClient::with_interceptor(channel, token.clone());
        let mine = o.leases.max(clients as u64) / clients as u64
            + u64::from((c as u64) < o.leases.max(clients as u64) % clients as u64);
        let (next, stop, aborted, total, ttl, sample) = (
            next.clone(),
            stop.clone(),
            aborted.clone(),
            o.total,
            o.ttl,
            o.sample,
        );
        tasks.push(tokio::spawn(async move {
            let mut rec = Recorder::new(sample);
            let fail = |rec: &mut Recorder, s: &tonic::Status| {
                let text = client::status_text(s);
                rec.error(text.clone());
                if client::is_fatal(s) {
                    stop.store(true, Ordering::Relaxed);
                    aborted.lock().expect("not poisoned").get_or_insert(text);
                }
            };
            let mut ids = Vec::with_capacity(mine as usize);
            for _ in 0..mine {
                if stop.load(Ordering::Relaxed) {
                    return rec;
                }
                match lease
                    .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                    .await
                {
                    Ok(r) => ids.push(r.into_inner().id),
                    Err(s) => {
                        fail(&mut rec, &s);
                        return rec;
                    }
                }
            }
            if ids.is_empty() || next.fetch_add(1, Ordering::Relaxed) >= total {
                return rec;
            }
            // The first keep-alive goes with the call: a server may send its response headers
            // only once it has a message to answer.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut pending = Some(ids[0]);
            tx.send(pb::LeaseKeepAliveRequest { id: ids[0] })
                .await
                .expect("the receiver is alive");
            let mut sent_at = (SystemTime::now(), Instant::now());
            let mut responses = match lease.lease_keep_alive(tokio_stream_from(rx)).await {
                Ok(s) => s.into_inner(),
                Err(s) => {
                    fail(&mut rec, &s);
                    return rec;
                }
            };
            let mut k = 1usize;
            loop {
                if pending.is_none() {
                    if stop.load(Ordering::Relaxed) || next.fetch_add(1, Ordering::Relaxed) >= total
                    {
                        break;
                    }
                    let id = ids[k % ids.len()];
                    k += 1;
                    sent_at = (SystemTime::now(), Instant::now());
                    if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                        rec.error("keep-alive stream closed");
                        break;
                    }
                }
                pending = None;
                let (began, t) = sent_at;
                match responses.message().await {
                    Ok(Some(r)) if r.ttl > 0 => rec.success(began, t.elapsed()),
                    Ok(Some(_)) => rec.error("lease expired or revoked"),
                    Ok(None) => {
                        rec.error("keep-alive stream closed");
                        break;
                    }
                    Err(s) => {
                        fail(&mut rec, &s);
                        break;
                    }
                }
            }
            rec
        }));
    }
    let mut all = Recorder::new(o.sample);
    for t in tasks {
        match t.await {
            Ok(r) => all.merge(&r),
            Err(e) => all.error(format!("client task failed: {e}")),
        }
    }
    let aborted = aborted.lock().expect("not poisoned").take();
    Outcome {
        recorders: vec![all],
        elapsed: start.elapsed(),
        aborted,
    }
}

/// Counts the events arriving on `stream` into `received` until `stop` (or the stream ends);
/// `requests` is kept so the request side stays open.
fn count_events(
    mut stream: tonic::Streaming<pb::WatchResponse>,
    requests: tokio::sync::mpsc::Sender<pb::WatchRequest>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _requests = requests;
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if stop.load(Ordering::Relaxed) { break; }
                    continue;
                }
            };
            match msg {
                Ok(Some(r)) => {
                    received.fetch_add(r.events.len() as u64, Ordering::Relaxed);
                }
                _ => break,
            }
        }
    })
}

/// A request stream fed by a channel.
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"abc"), b"abd".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }
}

/// Settings of `watch`.
#[derive(Debug, Clone)]
pub struct WatchBench {
    pub streams: usize,
    pub per_stream: usize,
    pub put_total: u64,
    pub put_rate: f64,
    pub key_size: usize,
    pub key_space: u64,
    pub sequential: bool,
    pub prev_kv: bool,
    pub sample: bool,
}

/// The outcome of `watch`: watcher creation, then puts (with every event accounted for).
#[derive(Debug)]
pub struct WatchOutcome {
    pub creation: Outcome,
    pub puts: Outcome,
}

fn watch_request(key: Vec<u8>, prev_kv: bool) -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key,
                prev_kv,
                ..Default::default()
            },
        )),
    }
}

/// Runs `watch` as etcd's benchmark: `streams` streams of `per_stream` watchers each on keys of
/// a `key_space` pool (creation timed from request to `created`), then `put_total` puts on the
/// pool's keys at `put_rate` (each timed), waiting until every watcher got its events.
pub async fn watch(o: &WatchBench, channels: &[Channel], token: &Token) -> WatchOutcome {
    use rand::Rng;
    let space = o.key_space.max(1);
    let pool: Vec<Vec<u8>> = (0..space)
        .map(|n| crate::workloads::key(n, o.key_size.max(8)))
        .collect();
    let mut rng = rand::rng();
    let mut pick = |i: u64| -> u64 {
        if o.sequential {
            i % space
        } else {
            rng.random_range(0..space)
        }
    };
    // Watchers per key, to know how many events each put must produce.
    let mut watchers_of = vec![0u64; space as usize];
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let aborted: Arc<Mutex<Option<String>>> = Arc::default();
    let mut creation = Recorder::new(o.sample);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..o.streams.max(1) {
        let channel = channels[s % channels.len()].clone();
        let (tx, rx) = tokio::sync::mpsc::channel(o.per_stream.max(1) + 1);
        let mut client = WatchClient::with_interceptor(channel, token.clone());
        let keys: Vec<u64> = (0..o.per_stream.max(1))
            .map(|w| pick((s * o.per_stream.max(1) + w) as u64))
            .collect();
        for &k in &keys {
            watchers_of[k as usize] += 1;
        }
        // The first create goes with the call (see lease_keepalive).
        let first = Instant::now();
        let _ = tx
            .send(watch_request(pool[keys[0] as usize].clone(), o.prev_kv))
            .await;
        let mut stream = match client.watch(tokio_stream_from(rx)).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                creation.error(client::status_text(&e));
                *aborted.lock().expect("not poisoned") = Some(client::status_text(&e));
                break;
            }
        };
        let mut sent = vec![first];
        for &k in &keys[1..] {
            sent.push(Instant::now());
            let _ = tx
                .send(watch_request(pool[k as usize].clone(), o.prev_kv))
                .await;
        }
        // Creation latencies: responses to creates come back in order.
        let mut created = 0;
        while created < keys.len() {
            match stream.message().await {
                Ok(Some(r)) if r.created => {
                    creation.success(SystemTime::now(), sent[created].elapsed());
                    created += 1;
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    creation.error("watch stream closed");
                    break;
                }
                Err(e) => {
                    creation.error(client::status_text(&e));
                    break;
                }
            }
        }
        tasks.push(count_events(stream, tx, received.clone(), stop.clone()));
    }
    let creation = Outcome {
        recorders: vec![creation],
        elapsed: start.elapsed(),
        aborted: aborted.lock().expect("not poisoned").take(),
    };
    let mut puts = Recorder::new(o.sample);
    let mut kv = client::kv(channels[0].clone(), token);
    let mut expected = 0u64;
    let start = Instant::now();
    let mut aborted = None;
    if creation.aborted.is_none() {
        for i in 0..o.put_total {
            if o.put_rate > 0.0 {
                let at = start + Duration::from_secs_f64(i as f64 / o.put_rate);
                tokio::time::sleep_until(at.into()).await;
            }
            let k = pick(i);
            let r = pb::PutRequest {
                key: pool[k as usize].clone(),
                value: b"data".to_vec(),
                ..Default::default()
            };
            let (began, t) = (SystemTime::now(), Instant::now());
            match kv.put(r).await {
                Ok(_) => {
                    puts.success(began, t.elapsed());
                    expected += watchers_of[k as usize];
                }
                Err(s) => {
                    puts.error(client::status_text(&s));
                    if client::is_fatal(&s) {
                        aborted = Some(client::status_text(&s));
                        break;
                    }
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let missing = expected.saturating_sub(received.load(Ordering::Relaxed));
    for _ in 0..missing.min(1_000_000) {
        puts.error("event not received within 30 s of the last put");
    }
    WatchOutcome {
        creation,
        puts: Outcome {
            recorders: vec![puts],
            elapsed,
            aborted,
        },
    }
}

/// Settings of `watch-get`.
#[derive(Debug, Clone)]
pub struct WatchGet {
    pub watchers: usize,
    pub streams: usize,
    pub events: u64,
    pub sample: bool,
}

/// Runs `watch-get` as etcd's benchmark: `watchers` watchers (over `streams` streams) of one key
/// receive `events` puts while `clients` clients range the key; the ranges are timed until
/// every watcher has every event.
pub async fn watch_get(
    o: &WatchGet,
    channels: &[Channel],
    token: &Token,
    clients: usize,
) -> Outcome {
    const KEY: &[u8] = b"watchkey";
    let streams = o.streams.clamp(1, o.watchers.max(1));
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let mut rec = Recorder::new(o.sample);
    for s in 0..streams {
        let n = o.watchers / streams + usize::from(s < o.watchers % streams);
        if n == 0 {
            continue;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(n + 1);
        for _ in 0..n {
            let _ = tx.send(watch_request(KEY.to_vec(), false)).await;
        }
        let mut client =
            WatchClient::with_interceptor(channels[s % channels.len()].clone(), token.clone());
        let mut stream = match client.watch(tokio_stream_from(rx)).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                rec.error(client::status_text(&e));
                return Outcome {
                    recorders: vec![rec],
                    elapsed: Duration::ZERO,
                    aborted: Some(client::status_text(&e)),
                };
            }
        };
        let mut created = 0;
        while created < n {
            match stream.message().await {
                Ok(Some(r)) => created += usize::from(r.created),
                _ => break,
            }
        }
        tasks.push(count_events(stream, tx, received.clone(), done.clone()));
    }
    let start = Instant::now();
    let expected = o.events * o.watchers as u64;
    let mut getters = Vec::new();
    for c in 0..clients.max(1) {
        let mut kv = client::kv(channels[c % channels.len()].clone(), token);
        let (received, done, sample) = (received.clone(), done.clone(), o.sample);
        getters.push(tokio::spawn(async move {
            let mut rec = Recorder::new(sample);
            while received.load(Ordering::Relaxed) < expected && !done.load(Ordering::Relaxed) {
                let (began, t) = (SystemTime::now(), Instant::now());
                let r = pb::RangeRequest {
                    key: KEY.to_vec(),
                    ..Default::default()
                };
                match kv.range(r).await {
                    Ok(_) => rec.success(began, t.elapsed()),
                    Err(s) => {
                        rec.error(client::status_text(&s));
                        if client::is_fatal(&s) {
                            break;
                        }
                    }
                }
            }
            rec
        }));
    }
    let mut kv = client::kv(channels[0].clone(), token);
    let mut aborted = None;
    for _ in 0..o.events {
        let r = pb::PutRequest {
            key: KEY.to_vec(),
            value: b"data".to_vec(),
            ..Default::default()
        };
        if let Err(s) = kv.put(r).await {
            rec.error(client::status_text(&s));
            aborted = Some(client::status_text(&s));
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.store(true, Ordering::Relaxed);
    for g in getters {
        if let Ok(r) = g.await {
            rec.merge(&r);
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let missing = expected.saturating_sub(received.load(Ordering::Relaxed));
    for _ in 0..missing.min(1_000_000) {
        rec.error("event not received within 30 s of the last put");
    }
    Outcome {
        recorders: vec![rec],
        elapsed: start.elapsed(),
        aborted,
    }
}
