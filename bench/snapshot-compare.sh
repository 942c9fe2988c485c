#!/usr/bin/env bash
# Snapshot of a large backend, keel beside etcd 3.4: each server (fresh, single member) is
# loaded with KEYS puts of 1 KiB values (keel-bench, 100 connections, 1000 clients), then
# `etcdctl snapshot save` takes its snapshot while a writer keeps putting. Prints the backend
# size, the snapshot's size and time, the throughput in MB/s, the server's anonymous memory
# (RssAnon: heap, not the mapped backend) before and at its peak during the save, and the puts
# the writer completed meanwhile; then `etcdctl snapshot status` of the file.
#
# usage: bench/snapshot-compare.sh [KEYS]     (default 1000000: about 1 GiB of values)
# env:   KEEL (target/release/keel), KEEL_BENCH (target/release/keel-bench)
set -euo pipefail
KEYS=${1:-1000000}
KEEL=${KEEL:-target/release/keel}
KB=${KEEL_BENCH:-target/release/keel-bench}
W=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
export ETCDCTL_API=3
P=23780

anon() { awk '/RssAnon/ {print $2}' "/proc/$PID/status"; }

for server in etcd keel; do
  bin=etcd
  [ "$server" = keel ] && bin=$KEEL
  rm -rf "$W/data" "$W/snap.db"
  "$bin" --data-dir="$W/data" --listen-client-urls=http://127.0.0.1:$P \
    --advertise-client-urls=http://127.0.0.1:$P --listen-peer-urls=http://127.0.0.1:$((P + 1)) \
    --initial-advertise-peer-urls=http://127.0.0.1:$((P + 1)) \
    --initial-cluster=default=http://127.0.0.1:$((P + 1)) --quota-backend-bytes=8589934592 \
    >"$W/log" 2>&1 &
  PID=$!
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$P) 2>/dev/null && break; sleep 0.1; done
  "$KB" --endpoints=127.0.0.1:$P --conns=100 --clients=1000 put --key-size=16 --val-size=1024 \
    --sequential-keys --key-space-size="$KEYS" --total="$KEYS" >/dev/null 2>&1
  db=$(stat -c %s "$W/data/member/snap/db")
  before=$(anon)
  # A writer during the save.
  "$KB" --endpoints=127.0.0.1:$P --conns=1 --clients=4 put --key-size=16 --val-size=1024 \
    --total=100000000 >"$W/writer" 2>&1 &
  writer=$!
  peak=$before
  ( while kill -0 "$PID" 2>/dev/null; do a=$(anon); [ "$a" -gt "$(cat "$W/peak" 2>/dev/null || echo 0)" ] && echo "$a" >"$W/peak"; sleep 0.05; done ) &
  sampler=$!
  puts0=$(etcdctl --endpoints=127.0.0.1:$P endpoint status -w json | sed 's/.*"revision":\([0-9]*\).*/\1/')
  t0=$(date +%s.%N)
  etcdctl --endpoints=127.0.0.1:$P snapshot save "$W/snap.db" >/dev/null 2>&1
  t1=$(date +%s.%N)
  puts1=$(etcdctl --endpoints=127.0.0.1:$P endpoint status -w json | sed 's/.*"revision":\([0-9]*\).*/\1/')
  kill "$writer" 2>/dev/null || true; wait "$writer" 2>/dev/null || true
  kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
  peak=$(cat "$W/peak" 2>/dev/null || echo "$before"); rm -f "$W/peak"
  size=$(stat -c %s "$W/snap.db")
  status=$(etcdctl snapshot status "$W/snap.db" 2>/dev/null)
  awk -v s="$server" -v db="$db" -v size="$size" -v t0="$t0" -v t1="$t1" -v b="$before" -v p="$peak" \
    -v w=$((puts1 - puts0)) -v st="$status" 'BEGIN {
      t = t1 - t0;
      printf "| %s | %.0f MiB | %.0f MiB | %.2f s | %.0f MB/s | %.0f MiB | %.0f MiB | %d | %s |\n",
        s, db / 1048576, size / 1048576, t, size / t / 1e6, b / 1024, p / 1024, w, st }'
  kill -9 "$PID"; wait "$PID" 2>/dev/null || true; PID=
done
