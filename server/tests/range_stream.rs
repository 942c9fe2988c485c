//! RangeStream, etcd 3.7's chunked Range (declared by the vendored proto; etcd 3.4 has no such
//! call, so the reference is Keel's own Range): for every kind of range over more than 2000 keys
//! (so that several chunks are sent), merging the chunks as `proto.Merge` does gives exactly the
//! Range response (keys and values, count, more, header), and only the last chunk carries the
//! header, `more` and `count`. Errors are Range's errors.

mod common;

use keel_proto::etcdserverpb as pb;
use pb::kv_client::KvClient;
use tonic::transport::Channel;

const KEYS: usize = 2500;

/// What the proto says merging every chunk gives, and how many chunks there were.
async fn merged(kv: &mut KvClient<Channel>, r: &pb::RangeRequest) -> (pb::RangeResponse, usize) {
    let mut stream = kv.range_stream(r.clone()).await.unwrap().into_inner();
    let mut out = pb::RangeResponse::default();
    let mut chunks = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        chunks.push(m.range_response.expect("a chunk holds a range response"));
    }
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        if i + 1 < n {
            assert!(
                c.header.is_none() && !c.more && c.count == 0,
                "chunk {i} of {n} carries what only the last one should: {r:?}"
            );
        }
        out.kvs.extend(c.kvs);
        if c.header.is_some() {
            out.header = c.header;
        }
        out.more |= c.more;
        if c.count != 0 {
            out.count = c.count;
        }
    }
    (out, n)
}

fn prefix(p: &str) -> (Vec<u8>, Vec<u8>) {
    let key = p.as_bytes().to_vec();
    let mut end = key.clone();
    *end.last_mut().unwrap() += 1;
    (key, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_stream_chunks_merge_into_range_responses() {
    let dir = tempfile::tempdir().unwrap();
    let keel = common::keel(&dir.path().join("keel"), common::free_port(), &[]);
    let mut kv = KvClient::connect(keel.endpoint.clone())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    // 2500 keys under "r/" in 25 txns, then every tenth one rewritten: versions, mod and create
    // revisions and values differ between keys. Keys around the prefix too.
    let put = |key: String, value: String| pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.into_bytes(),
            value: value.into_bytes(),
            ..Default::default()
        })),
    };
    let mut middle = 0;
    for t in 0..25 {
        let success = (0..KEYS / 25)
            .map(|i| {
                let n = t * (KEYS / 25) + i;
                put(
                    format!("r/{n:05}"),
                    format!("value {} of {n}", (n * 7919) % 1000),
                )
            })
            .collect();
        let r = kv
            .txn(pb::TxnRequest {
                success,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if t == 12 {
            middle = r.header.unwrap().revision;
        }
    }
    for n in (0..KEYS).step_by(10) {
        kv.put(pb::PutRequest {
            key: format!("r/{n:05}").into_bytes(),
            value: format!("rewritten {n}").into_bytes(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for k in ["q", "r", "r0", "s"] {
        kv.put(pb::PutRequest {
            key: k.into(),
            value: b"outside".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    let (key, range_end) = prefix("r/");
    let base = pb::RangeRequest {
        key,
        range_end,
        ..Default::default()
    };
    let cases: Vec<(&str, pb::RangeRequest)> = vec![
        ("prefix", base.clone()),
        (
            "limit 1500",
            pb::RangeRequest {
                limit: 1500,
                ..base.clone()
            },
        ),
        (
            "limit of two whole chunks",
            pb::RangeRequest {
                limit: 2000,
                ..base.clone()
            },
        ),
        (
            "limit beyond the range",
            pb::RangeRequest {
                limit: 3000,
                ..base.clone()
            },
        ),
        (
            "keys only",
            pb::RangeRequest {
                keys_only: true,
                ..base.clone()
            },
        ),
        (
            "revision in the past",
            pb::RangeRequest {
                revision: middle,
                ..base.clone()
            },
        ),
        (
            "past revision, limit",
            pb::RangeRequest {
                revision: middle,
                limit: 1100,
                ..base.clone()
            },
        ),
        (
            "descending by key",
            pb::RangeRequest {
                sort_order: pb::range_request::SortOrder::Descend as i32,
                ..base.clone()
            },
        ),
        (
            "descending by key, limit",
            pb::RangeRequest {
                sort_order: pb::range_request::SortOrder::Descend as i32,
                limit: 1700,
                ..base.clone()
            },
        ),
        (
            "ascending by key",
            pb::RangeRequest {
                sort_order: pb::range_request::SortOrder::Ascend as i32,
                ..base.clone()
            },
        ),
        (
            "by mod revision, descending",
            pb::RangeRequest {
                sort_order: pb::range_request::SortOrder::Descend as i32,
                sort_target: pb::range_request::SortTarget::Mod as i32,
                ..base.clone()
            },
        ),
        (
            "by value",
            pb::RangeRequest {
                sort_order: pb::range_request::SortOrder::Ascend as i32,
                sort_target: pb::range_request::SortTarget::Value as i32,
                limit: 2100,
                ..base.clone()
            },
        ),
        (
            "count only",
            pb::RangeRequest {
                count_only: true,
                ..base.clone()
            },
        ),
        (
            "count only, limit",
            pb::RangeRequest {
                count_only: true,
                limit: 10,
                ..base.clone()
            },
        ),
        (
            "min mod revision",
            pb::RangeRequest {
                min_mod_revision: middle,
                ..base.clone()
            },
        ),
        (
            "every key",
            pb::RangeRequest {
                key: vec![0],
                range_end: vec![0],
                ..Default::default()
            },
        ),
        (
            "from a key",
            pb::RangeRequest {
                key: b"r/01000".to_vec(),
                range_end: vec![0],
                serializable: true,
                ..Default::default()
            },
        ),
        (
            "one key",
            pb::RangeRequest {
                key: b"r/00010".to_vec(),
                ..Default::default()
            },
        ),
        (
            "nothing",
            pb::RangeRequest {
                key: b"none".to_vec(),
                range_end: b"nonf".to_vec(),
                ..Default::default()
            },
        ),
    ];
    for (what, r) in &cases {
        let range = kv.range(r.clone()).await.unwrap().into_inner();
        let (stream, chunks) = merged(&mut kv, r).await;
        assert!(
            stream == range,
            "{what}: merged chunks differ from Range: {} keys, count {}, more {}, header {:?} \
             against {} keys, count {}, more {}, header {:?}",
            stream.kvs.len(),
            stream.count,
            stream.more,
            stream.header,
            range.kvs.len(),
            range.count,
            range.more,
            range.header
        );
        if range.kvs.len() > 2000 {
            assert!(
                chunks > 2,
                "{what}: {} keys in {chunks} chunks",
                range.kvs.len()
            );
        }
        println!("{what}: {} keys in {chunks} chunks", range.kvs.len());
    }
    // The prefix holds every key, once.
    assert_eq!(cases[0].0, "prefix");
    let (all, _) = merged(&mut kv, &cases[0].1).await;
    assert_eq!((all.kvs.len(), all.count), (KEYS, KEYS as i64));

    // Writes while a stream is read do not show in it: every chunk is read at the revision of
    // the first.
    let before = kv.range(base.clone()).await.unwrap().into_inner();
    let mut stream = kv.range_stream(base.clone()).await.unwrap().into_inner();
    let first = stream
        .message()
        .await
        .unwrap()
        .unwrap()
        .range_response
        .unwrap();
    kv.delete_range(pb::DeleteRangeRequest {
        key: b"r/01000".to_vec(),
        range_end: b"r/02000".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    kv.put(pb::PutRequest {
        key: b"r/02499".to_vec(),
        value: b"changed while streaming".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut kvs = first.kvs;
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        let c = m.range_response.unwrap();
        kvs.extend(c.kvs.clone());
        last = Some(c);
    }
    let last = last.expect("more than one chunk");
    assert!(
        kvs == before.kvs,
        "a stream saw writes made while it was read"
    );
    assert_eq!((last.count, last.more), (before.count, before.more));
    assert_eq!(
        last.header, before.header,
        "the header of the revision read"
    );

    // Errors are Range's.
    kv.compact(pb::CompactionRequest {
        revision: middle,
        physical: true,
    })
    .await
    .unwrap();
    let current = kv
        .range(base.clone())
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    for (what, r) in [
        (
            "compacted",
            pb::RangeRequest {
                revision: middle - 1,
                ..base.clone()
            },
        ),
        (
            "future",
            pb::RangeRequest {
                revision: current + 1,
                ..base.clone()
            },
        ),
        (
            "no key",
            pb::RangeRequest {
                key: Vec::new(),
                ..Default::default()
            },
        ),
    ] {
        let expected = kv.range(r.clone()).await.unwrap_err();
        let got = match kv.range_stream(r).await {
            Err(s) => s,
            Ok(s) => s
                .into_inner()
                .message()
                .await
                .expect_err("an error, not a chunk"),
        };
        assert_eq!(
            (got.code(), got.message()),
            (expected.code(), expected.message()),
            "{what}"
        );
    }
}
