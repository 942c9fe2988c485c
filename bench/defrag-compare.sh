#!/usr/bin/env bash
# Defragmentation under load, keel beside etcd (issue: "defragmentation that does not stop the
# world"). For each server, in turn, on a fresh data dir:
#   1. 1024 puts of 1 MB values over 512 keys (a backend of about 1 GiB), then a physical
#      compaction at the last revision: half the data is garbage;
#   2. a put load (256-byte values, 16 clients, --rate-limited) and a linearizable range load run
#      for about 20 s; 5 s in, `etcdctl defrag` runs and is timed;
#   3. the loads' latency summaries, the defrag's duration and the file sizes are printed.
#
#   bench/defrag-compare.sh [KEEL_BINARY]       (default: target/release/keel)
#
# Needs etcd, etcdctl (Debian's etcd-server, etcd-client) and target/release/keel-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
keel=${1:-target/release/keel}
bench=target/release/keel-bench
work=$(mktemp -d /tmp/keel-defrag.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
export ETCDCTL_API=3

run() {
  local name=$1 binary=$2 port=$3
  local peer=$((port + 1)) ep="http://127.0.0.1:$port"
  "$binary" --name d --data-dir "$work/$name" \
    --listen-client-urls "$ep" --advertise-client-urls "$ep" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "d=http://127.0.0.1:$peer" --quota-backend-bytes=8589934592 \
    >"$work/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do etcdctl --endpoints "$ep" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
  "$bench" --endpoints "$ep" --clients 8 --conns 2 put --key-space-size 512 --total 1024 \
    --val-size 1000000 >/dev/null
  local rev
  rev=$(etcdctl --endpoints "$ep" get x -w json | sed 's/.*"revision":\([0-9]*\).*/\1/')
  etcdctl --endpoints "$ep" compact "$rev" --physical >/dev/null
  local before
  before=$(etcdctl --endpoints "$ep" endpoint status -w json | sed 's/.*"dbSize":\([0-9]*\).*/\1/')
  "$bench" --endpoints "$ep" --clients 16 --conns 4 put --total 40000 --rate 2000 --val-size 256 \
    --key-space-size 100000 >"$work/$name.put" 2>&1 &
  local put=$!
  "$bench" --endpoints "$ep" --clients 16 --conns 4 range k --total 40000 --rate 2000 \
    >"$work/$name.range" 2>&1 &
  local range=$!
  sleep 5
  local t0 t1
  t0=$(date +%s.%N)
  etcdctl --endpoints "$ep" --command-timeout=600s defrag >/dev/null
  t1=$(date +%s.%N)
  wait "$put" "$range"
  local after
  after=$(etcdctl --endpoints "$ep" endpoint status -w json | sed 's/.*"dbSize":\([0-9]*\).*/\1/')
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "== $name: defrag took $(echo "$t1 - $t0" | bc) s; db size $before -> $after bytes"
  for load in put range; do
    echo "-- $name $load"
    grep -E "Slowest|Average|Requests/sec|99%|99.9%" "$work/$name.$load" | sed 's/^/   /'
  done
}

run etcd etcd 24379
run keel "$keel" 24389
