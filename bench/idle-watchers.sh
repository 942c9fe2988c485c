#!/usr/bin/env bash
# What idle watchers cost: a fresh member (keel, then etcd 3.4), N watchers on ten streams (ten
# `etcdctl watch -i` processes, each given N/10 `watch` commands on distinct keys), then the
# server's CPU over 20 s without any write (from /proc/PID/stat). Interleaved rounds.
#
# usage: bench/idle-watchers.sh [N] [ROUNDS]   (default 10000 watchers, 2 rounds)
# env:   KEEL (target/release/keel), PORT (base client port, 28800)
set -euo pipefail
N=${1:-10000}
ROUNDS=${2:-2}
KEEL=${KEEL:-target/release/keel}
PORT=${PORT:-28800}

run() {
  local bin=$1 port=$2 peer=$(($2 + 1))
  local dir
  dir=$(mktemp -d)
  "$bin" --data-dir "$dir" --listen-client-urls "http://127.0.0.1:$port" \
    --advertise-client-urls "http://127.0.0.1:$port" --listen-peer-urls "http://127.0.0.1:$peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "default=http://127.0.0.1:$peer" >"$dir.log" 2>&1 &
  local server=$!
  for _ in $(seq 1 100); do
    curl -s "http://127.0.0.1:$port/health" | grep -q true && break
    sleep 0.1
  done
  local watchers=()
  for p in $(seq 1 10); do
    (for i in $(seq 1 $((N / 10))); do echo "watch w$p-$i"; done; sleep 40) |
      ETCDCTL_API=3 etcdctl --endpoints="127.0.0.1:$port" watch -i >/dev/null 2>&1 &
    watchers+=($!)
  done
  sleep 12
  local count t0 t1
  count=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^etcd_debugging_mvcc_watcher_total/ {print $2}')
  t0=$(awk '{print $14 + $15}' "/proc/$server/stat")
  sleep 20
  t1=$(awk '{print $14 + $15}' "/proc/$server/stat")
  printf '%-6s watchers %s, idle CPU over 20 s: %.2f %% of a CPU\n' "$(basename "$bin")" "$count" \
    "$(echo "($t1 - $t0) * 100 / $(getconf CLK_TCK) / 20" | bc -l)"
  kill -9 "$server"
  wait "$server" 2>/dev/null || true
  pkill -f "etcdctl --endpoints=127.0.0.1:$port " || true
  rm -rf "$dir" "$dir.log"
}

for r in $(seq 1 "$ROUNDS"); do
  run "$KEEL" $((PORT + 20 * r))
  run "$(command -v etcd)" $((PORT + 20 * r + 10))
done
