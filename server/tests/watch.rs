//! End-to-end Watch tests against the real `keel`, beside a real etcd 3.4 where outputs are
//! compared: etcdctl's watch commands, the `etcd-client` crate with every watch option (history,
//! prev_kv, filters, client-chosen IDs, cancel, progress requests, compaction), and a slow
//! watcher that stops reading while 100,000 events are written: the server's memory stays
//! bounded and every event arrives, once and in order, when the client reads again.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, ok};
use etcd_client::{
    Client, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchFilterType, WatchOptions,
    WatchResponse, WatchStream,
};

/// A hang guard, never the behaviour under test.
const HANG: Duration = Duration::from_secs(60);

/// Runs etcdctl watches in the background while `writes` run; returns each watch's output. The
/// writes start once the server counts every watcher (`etcd_debugging_mvcc_watcher_total`, on
/// etcd as on Keel); the last write must be seen by every watch, whose output is complete once
/// it ends with that event.
fn etcdctl_watches(
    e: &str,
    port: u16,
    watches: &[&[&str]],
    writes: &[&[&str]],
    last: &str,
) -> Vec<String> {
    let children: Vec<_> = watches
        .iter()
        .map(|args| {
            let mut child = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={e}"))
                .arg("watch")
                .args(*args)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcdctl");
            let output = Arc::new(Mutex::new(String::new()));
            let mut stdout = child.stdout.take().unwrap();
            let sink = output.clone();
            let reader = std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stdout.read(&mut buf) {
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
            (child, output, reader)
        })
        .collect();
    let deadline = Instant::now() + HANG;
    while metric(port, "etcd_debugging_mvcc_watcher_total") < watches.len() as f64 {
        assert!(
            Instant::now() < deadline,
            "{e}: the watches were not created"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in writes {
        ok(e, w);
    }
    children
        .into_iter()
        .zip(watches)
        .map(|((mut c, output, reader), args)| {
            while !output.lock().unwrap().ends_with(last) {
                assert!(
                    Instant::now() < deadline,
                    "{e}: etcdctl watch {args:?} did not see the last write: {}",
                    output.lock().unwrap()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            reader.join().unwrap();
            output.lock().unwrap().clone()
        })
        .collect()
}

#[test]
fn etcdctl_watch_commands_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    let watches: &[&[&str]] = &[
        &["k1"],
        &["--prefix", "k"],
        &["--rev=2", "k1"],
        &["--prev-kv", "--prefix", "k"],
        &["k1", "k3"],
        &["--rev=1", "--prefix", ""],
    ];
    let writes: &[&[&str]] = &[
        &["put", "k1", "v1"],
        &["put", "k2", "v2"],
        &["put", "k1", "v1b"],
        &["del", "k2"],
        &["put", "other", "x"],
        &["del", "k", "--prefix"],
        // Seen by every watch: their outputs end with it.
        &["put", "k1", "end"],
    ];
    // The history before the watches: revision 2 exists on both.
    for e in [&etcd.endpoint, &keel.endpoint] {
        ok(e, &["put", "k1", "v0"]);
    }
    let last = "PUT\nk1\nend\n";
    let expected = etcdctl_watches(&etcd.endpoint, etcd.port, watches, writes, last);
    let got = etcdctl_watches(&keel.endpoint, keel.port, watches, writes, last);
    for ((w, e), g) in watches.iter().zip(&expected).zip(&got) {
        assert_eq!(g, e, "etcdctl watch {w:?}");
    }
    assert!(expected[1].contains("PUT\nk2\nv2\n"), "{}", expected[1]);
}

/// A watch response as one line (header member and cluster ids and the term left out).
fn text(r: &WatchResponse) -> String {
    let events: Vec<String> = r
        .events()
        .iter()
        .map(|e| {
            let kv = e.kv().unwrap();
            let prev = e
                .prev_kv()
                .map(|p| format!(" prev={}@{}", p.value_str().unwrap(), p.mod_revision()))
                .unwrap_or_default();
            format!(
                "{:?} {}={} m{} v{}{prev}",
                e.event_type(),
                kv.key_str().unwrap(),
                kv.value_str().unwrap(),
                kv.mod_revision(),
                kv.version()
            )
        })
        .collect();
    format!(
        "rev {} id {} created {} canceled {} compact {} reason {:?} events {events:?}",
        r.header().map_or(0, |h| h.revision()),
        r.watch_id(),
        r.created(),
        r.canceled(),
        r.compact_revision(),
        r.cancel_reason()
    )
}

/// The next `n` responses, ordered by (revision, watch id) since etcd sends the responses of
/// different watchers for one revision in no particular order.
async fn next(s: &mut WatchStream, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = tokio::time::timeout(HANG, s.message())
            .await
            .expect("a watch response")
            .unwrap()
            .unwrap();
        out.push((
            r.header().map_or(0, |h| h.revision()),
            r.watch_id(),
            text(&r),
        ));
    }
    out.sort();
    let out: Vec<String> = out.into_iter().map(|(_, _, t)| t).collect();
    for line in &out {
        println!("{line}");
    }
    out
}

async fn scenario(endpoint: &str) -> Vec<String> {
    let mut c = Client::connect([endpoint], None).await.unwrap();
    let mut log = Vec::new();
    c.put("w/a", "1", None).await.unwrap(); // 2
    c.put("w/b", "2", None).await.unwrap(); // 3
    // History from revision 2, with previous values.
    let mut s = c
        .watch(
            "w/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(2)
                    .with_prev_key(),
            ),
        )
        .await
        .unwrap();
    log.extend(next(&mut s, 2).await);
    // A second watcher on the same stream with a chosen ID and a filter; the ID again is refused.
    s.watch(
        "w/a",
        Some(
            WatchOptions::new()
                .with_watch_id(7)
                .with_filters([WatchFilterType::NoPut]),
        ),
    )
    .await
    .unwrap();
    log.extend(next(&mut s, 1).await);
    s.watch("w/x", Some(WatchOptions::new().with_watch_id(7)))
        .await
        .unwrap();
    log.extend(next(&mut s, 1).await);
    // A negative chosen ID is taken as it is (etcd refuses only a duplicate).
    s.watch("w/n", Some(WatchOptions::new().with_watch_id(-5)))
        .await
        .unwrap();
    log.extend(next(&mut s, 1).await);
    // An empty range is refused.
    s.watch("w/z", Some(WatchOptions::new().with_range("w/a")))
        .await
        .unwrap();
    log.extend(next(&mut s, 1).await);
    c.put("w/a", "3", None).await.unwrap(); // 4: watcher 0 only (7 filters puts)
    log.extend(next(&mut s, 1).await);
    c.delete("w/a", None).await.unwrap(); // 5: both
    log.extend(next(&mut s, 2).await);
    // A transaction's events arrive in one response.
    let t = Txn::new().and_then([
        TxnOp::put("w/c", "4", None),
        TxnOp::put("w/d", "5", Some(PutOptions::new())),
    ]);
    c.txn(t).await.unwrap(); // 6
    log.extend(next(&mut s, 1).await);
    s.request_progress().await.unwrap();
    log.extend(next(&mut s, 1).await);
    s.cancel(7).await.unwrap();
    log.extend(next(&mut s, 1).await);
    // A second cancel gets no answer: the next response is watcher 0's event.
    s.cancel(7).await.unwrap();
    c.delete("w/", Some(etcd_client::DeleteOptions::new().with_prefix()))
        .await
        .unwrap(); // 7
    log.extend(next(&mut s, 1).await);
    // A watch from below the compacted revision is canceled with it.
    c.compact(5, None).await.unwrap();
    let mut old = c
        .watch(
            "w/",
            Some(WatchOptions::new().with_prefix().with_start_revision(3)),
        )
        .await
        .unwrap();
    log.extend(next(&mut old, 2).await);
    // From after the compacted revision: its history is still there. (From the compacted
    // revision itself Keel also sends a delete made exactly there, which etcd 3.4's compaction
    // dropped; etcd 3.5.16+ keeps it too.)
    let mut at = c
        .watch(
            "w/",
            Some(WatchOptions::new().with_prefix().with_start_revision(6)),
        )
        .await
        .unwrap();
    log.extend(next(&mut at, 2).await);
    let _ = c
        .get("w/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_watch_options_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    let expected = scenario(&etcd.endpoint).await;
    let got = scenario(&keel.endpoint).await;
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(g, e);
    }
    assert_eq!(got.len(), expected.len());
}

/// Anonymous resident memory (heap, stacks): the backend's mmap'd file is not counted.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// Writes `TXNS` txns of `PER_TXN` puts of 1 KiB under `prefix`, from four clients.
async fn write_load(c: &Client, prefix: &str, txns: usize, per_txn: usize) {
    let value = "v".repeat(1024);
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = c.clone();
        let value = value.clone();
        let prefix = prefix.to_string();
        writers.push(tokio::spawn(async move {
            for t in (w..txns).step_by(4) {
                let ops: Vec<TxnOp> = (0..per_txn)
                    .map(|i| TxnOp::put(format!("{prefix}{t:04}/{i:03}"), value.clone(), None))
                    .collect();
                c.txn(Txn::new().and_then(ops)).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
}

/// A watcher whose client reads nothing while about 100 MiB of events are written: the server's
/// memory grows by far less than that (its watchers go unsynced instead of buffering), then the
/// client reads every event once, in order, from history. The same load is run first without
/// the watcher, so that the comparison leaves out what any load costs (the key index, the WAL
/// tail cache, allocator arenas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_costs_bounded_memory_and_gets_every_event() {
    const TXNS: usize = 1000;
    const PER_TXN: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    let mut c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    // The same keys first: the key index holds every key's history, so new keys would grow it.
    write_load(&c, "s/", TXNS, PER_TXN).await;
    let start = c
        .put("warmup", "x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
        + 1;
    let mut s = c
        .watch("s/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(s.message().await.unwrap().unwrap().created());
    let before = rss_bytes(keel.child.id());
    write_load(&c, "s/", TXNS, PER_TXN).await;
    let after = rss_bytes(keel.child.id());
    let growth = after.saturating_sub(before);
    assert!(
        growth < 32 << 20,
        "server RSS grew {} MiB while a watcher did not read ~100 MiB of events",
        growth >> 20
    );
    // Now read: every event once, revisions in order.
    let mut seen = 0usize;
    let mut last_rev = 0;
    while seen < TXNS * PER_TXN {
        let r = s.message().await.unwrap().expect("the stream stays open");
        for e in r.events() {
            assert_eq!(e.event_type(), EventType::Put);
            let rev = e.kv().unwrap().mod_revision();
            assert!(rev >= last_rev, "revision {rev} after {last_rev}");
            assert!(rev >= start);
            last_rev = rev;
            seen += 1;
        }
    }
    assert_eq!(seen, TXNS * PER_TXN);
    assert_eq!(last_rev, start + TXNS as i64 - 1);
}

async fn progress_and_fragments(endpoint: &str) -> Vec<String> {
    let mut c = Client::connect([endpoint], None).await.unwrap();
    let mut log = Vec::new();
    let mut p = c
        .watch("p", Some(WatchOptions::new().with_progress_notify()))
        .await
        .unwrap();
    log.extend(next(&mut p, 1).await);
    // Nothing happens to "p": a progress notification comes (every 1 s interval).
    log.extend(next(&mut p, 1).await);
    let mut f = c
        .watch(
            "f/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_fragment(),
            ),
        )
        .await
        .unwrap();
    log.extend(next(&mut f, 1).await);
    // 700 keys of about 1 KiB, then one delete of all: with their previous values the delete's
    // events are above etcd's fragment size (--max-request-bytes + 512 KiB of gRPC overhead),
    // so they come in fragments.
    for i in 0..700 {
        c.put(format!("f/{i:03}"), "x".repeat(1000), None)
            .await
            .unwrap();
    }
    c.delete("f/", Some(etcd_client::DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut events = 0;
    while events < 700 {
        let r = tokio::time::timeout(HANG, f.message())
            .await
            .expect("events")
            .unwrap()
            .unwrap();
        events += r.events().len();
    }
    while events < 1400 {
        let r = tokio::time::timeout(HANG, f.message())
            .await
            .expect("fragments")
            .unwrap()
            .unwrap();
        events += r.events().len();
        log.push(format!("fragment of {} events", r.events().len()));
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notifications_and_fragments_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--experimental-watch-progress-notify-interval=1s",
        "--max-request-bytes=10000",
    ];
    let etcd = common::etcd(&dir.path().join("etcd"), &flags);
    let keel = common::keel(&dir.path().join("keel"), free_port(), &flags);
    let expected = progress_and_fragments(&etcd.endpoint).await;
    let got = progress_and_fragments(&keel.endpoint).await;
    assert_eq!(got, expected);
    assert!(
        expected.len() > 4,
        "the response was fragmented: {expected:?}"
    );
}

fn metric(port: u16, name: &str) -> f64 {
    let (_, text) = common::http_get(port, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap()
}

/// Waits for a gauge to reach `want` (the deadline only guards a hang).
async fn gauge_reaches(port: u16, name: &str, want: f64) {
    let deadline = Instant::now() + HANG;
    loop {
        let got = metric(port, name);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {got}, not {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_streams_and_revoked_leases_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    let port = keel.port;
    let mut c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    let mut streams = Vec::new();
    for i in 0..20 {
        let mut s = c.watch(format!("leak/{i}"), None).await.unwrap();
        s.watch(format!("leak/{i}/b"), None).await.unwrap();
        s.watch(
            format!("leak/{i}/c"),
            Some(WatchOptions::new().with_start_revision(1)),
        )
        .await
        .unwrap();
        streams.push(s);
    }
    gauge_reaches(port, "etcd_debugging_mvcc_watch_stream_total", 20.0).await;
    gauge_reaches(port, "etcd_debugging_mvcc_watcher_total", 60.0).await;
    // Cancelling one watcher, twice, and an unknown one.
    streams[0].cancel(1).await.unwrap();
    streams[0].cancel(1).await.unwrap();
    streams[0].cancel(99).await.unwrap();
    gauge_reaches(port, "etcd_debugging_mvcc_watcher_total", 59.0).await;
    drop(streams);
    gauge_reaches(port, "etcd_debugging_mvcc_watch_stream_total", 0.0).await;
    gauge_reaches(port, "etcd_debugging_mvcc_watcher_total", 0.0).await;
    // Leases: granted, one expired (seen gone), one revoked; keep-alives of both answer TTL 0
    // after.
    let a = c.lease_grant(60, None).await.unwrap().id();
    gauge_reaches(port, "keel_lease_total", 1.0).await;
    let b = c.lease_grant(1, None).await.unwrap().id();
    let deadline = Instant::now() + HANG;
    while c.lease_time_to_live(b, None).await.unwrap().ttl() != -1 {
        assert!(Instant::now() < deadline, "the 1 s lease never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gauge_reaches(port, "keel_lease_total", 1.0).await;
    c.lease_revoke(a).await.unwrap();
    gauge_reaches(port, "keel_lease_total", 0.0).await;
    for id in [a, b] {
        let r = c.lease_time_to_live(id, None).await.unwrap();
        assert_eq!(r.ttl(), -1);
        assert!(
            c.lease_keep_alive(id).await.is_err(),
            "keep-alive of a dead lease"
        );
    }
    c.put("still", "serving", None).await.unwrap();
}

/// A watcher created at revision 1 over 32 MiB of history, on a stream whose client reads
/// nothing after the created response: it is caught up from history only as far as its outbox
/// (4 MiB) and the stream's HTTP/2 window (2 MiB) let it, so it is still behind when the history
/// is compacted at the current revision. When the client reads again it gets a contiguous prefix
/// of the history, then a cancel carrying the compacted revision, as etcd answers a watcher
/// whose next revision was compacted away; the stream goes on serving.
///
/// Not run beside etcd: etcd 3.4 buffers 128 responses of up to 1000 revisions per watcher, so
/// making its catch-up overlap a compaction for sure would take over 128,000 revisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_during_a_watch_catch_up_cancels_it_with_the_compacted_revision() {
    const TXNS: usize = 1000;
    const PER_TXN: usize = 32;
    let dir = tempfile::tempdir().unwrap();
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    let mut c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    write_load(&c, "h/", TXNS, PER_TXN).await;
    let mut s = c
        .watch(
            "h/",
            Some(WatchOptions::new().with_prefix().with_start_revision(1)),
        )
        .await
        .unwrap();
    let created = s.message().await.unwrap().unwrap();
    assert!(created.created());
    let id = created.watch_id();
    let current = c
        .get("h/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(current, 1 + TXNS as i64);
    // The watcher is catching up (the gauge is published now and then).
    gauge_reaches(keel.port, "etcd_debugging_mvcc_slow_watcher_total", 1.0).await;
    c.compact(current, None).await.unwrap();
    // Now read: whole revisions from 2 on, in order, then the cancel.
    let mut next = 2;
    let cancel = loop {
        let r = tokio::time::timeout(HANG, s.message())
            .await
            .expect("events or the cancel")
            .unwrap()
            .expect("the stream stays open");
        assert_eq!(r.watch_id(), id);
        if r.canceled() {
            break r;
        }
        let mut events = r.events().iter().peekable();
        while let Some(e) = events.next() {
            let rev = e.kv().unwrap().mod_revision();
            assert_eq!(rev, next, "events of revision {next} expected");
            let mut n = 1;
            while events
                .peek()
                .is_some_and(|e| e.kv().unwrap().mod_revision() == rev)
            {
                events.next();
                n += 1;
            }
            assert_eq!(n, PER_TXN, "the events of revision {rev}");
            next += 1;
        }
    };
    assert!(
        next <= current,
        "every event arrived: the watcher was not behind when the compaction came"
    );
    println!("canceled at revision {next} of {current}");
    assert_eq!(cancel.compact_revision(), current, "{}", text(&cancel));
    assert!(cancel.events().is_empty());
    gauge_reaches(keel.port, "etcd_debugging_mvcc_watcher_total", 0.0).await;
    // The stream serves a new watcher after the compacted revision.
    s.watch(
        "h/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(current + 1),
        ),
    )
    .await
    .unwrap();
    let r = s.message().await.unwrap().unwrap();
    assert!(r.created() && !r.canceled(), "{}", text(&r));
    c.put("h/after", "x", None).await.unwrap();
    let r = tokio::time::timeout(HANG, s.message())
        .await
        .expect("the event after the compaction")
        .unwrap()
        .unwrap();
    let keys: Vec<&str> = r
        .events()
        .iter()
        .map(|e| e.kv().unwrap().key_str().unwrap())
        .collect();
    assert_eq!(keys, ["h/after"]);
}

/// A member with no watcher sends its hubs no revision; watchers made while writes flow must
/// still miss nothing. Five times: a writer puts one key without pause; a watcher from a past
/// revision (history) and one from now are made; each must see consecutive revisions, the first
/// from exactly its start, the second from after the revision the member had when it answered;
/// then both streams close, the member has no watcher again, and writes go on unwatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_made_while_an_unwatched_member_writes_miss_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    let port = keel.port;
    let c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut c = c.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.put("flow/k", n.to_string(), None).await.unwrap();
                n += 1;
            }
        })
    };
    /// Reads `n` events and checks that their revisions follow each other from `first`.
    async fn consecutive(s: &mut WatchStream, first: Option<i64>, n: usize) -> i64 {
        let mut want = first;
        let mut seen = 0;
        let mut start = 0;
        while seen < n {
            let r = tokio::time::timeout(HANG, s.message())
                .await
                .expect("events stopped")
                .unwrap()
                .expect("stream ended");
            for e in r.events() {
                let rev = e.kv().unwrap().mod_revision();
                match want {
                    Some(w) => assert_eq!(rev, w, "a revision was skipped or repeated"),
                    None => start = rev,
                }
                want = Some(rev + 1);
                seen += 1;
            }
        }
        start
    }
    let mut c2 = c.clone();
    for round in 0..5 {
        // Two revisions back, past the first put (revision 2).
        let past = c2
            .get("flow/k", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision()
            - 2;
        let past = past.max(2);
        let mut history = c2
            .watch(
                "flow/",
                Some(WatchOptions::new().with_prefix().with_start_revision(past)),
            )
            .await
            .unwrap();
        let mut now = c2
            .watch("flow/", Some(WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        // The created responses come first.
        assert!(history.message().await.unwrap().unwrap().created());
        let created = now.message().await.unwrap().unwrap();
        assert!(created.created());
        let at = created.header().unwrap().revision();
        consecutive(&mut history, Some(past), 200).await;
        let first = consecutive(&mut now, None, 200).await;
        assert_eq!(
            first,
            at + 1,
            "round {round}: the watcher from now starts after {at}"
        );
        drop((history, now));
        gauge_reaches(port, "etcd_debugging_mvcc_watcher_total", 0.0).await;
        // Writes go on with no watcher.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
}
