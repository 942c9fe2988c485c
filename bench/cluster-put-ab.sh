#!/usr/bin/env bash
# A/B of two keel binaries as 3-member clusters on loopback: interleaved rounds, a fresh cluster
# per measurement, loaded with etcd's benchmark tool over all three endpoints (`put
# --key-size=8 --sequential-keys --val-size=256`, 100 connections, 1000 clients, after 10,000
# warm-up puts). Prints puts/s, the server CPU per put of each member (from /proc/PID/stat) and
# their sum, and the peer bytes sent per request (`etcd_network_peer_sent_bytes_total` over the three
# members), which counts the raft messages' framing as well as the entries.
#
# With OP=range, the measured load is linearizable ranges of one key instead (`range foo
# --consistency=l`, after the same warm-up puts).
#
# usage: bench/cluster-put-ab.sh OLD NEW [ROUNDS] [TOTAL]   (default 4 rounds of 30000 requests)
# env:   BENCH (/tmp/etcd-bench-bin/benchmark, made by ../shared/tools/build-etcd-benchmark.sh),
#        PORT (first of the ports used, 26000; keep them below the ephemeral range, 32768, or a
#        client connection may hold one), OP (put or range, put)
set -euo pipefail
OLD=${1:?usage: bench/cluster-put-ab.sh OLD NEW [ROUNDS] [TOTAL]}
NEW=${2:?usage: bench/cluster-put-ab.sh OLD NEW [ROUNDS] [TOTAL]}
ROUNDS=${3:-4}
TOTAL=${4:-30000}
BENCH=${BENCH:-/tmp/etcd-bench-bin/benchmark}
PORT=${PORT:-26000}
OP=${OP:-put}
case $OP in
  put) LOAD=(put --key-size=8 --sequential-keys --val-size=256) ;;
  range) LOAD=(range foo --consistency=l) ;;
  *) echo "OP is put or range" >&2; exit 1 ;;
esac
for b in "$OLD" "$NEW"; do [ -x "$b" ] || { echo "no $b" >&2; exit 1; }; done
[ -x "$BENCH" ] || { echo "no $BENCH (../shared/tools/build-etcd-benchmark.sh $(dirname "$BENCH"))" >&2; exit 1; }
W=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
peer_bytes() {
  local total=0 v
  for i in 0 1 2; do
    v=$(curl -s "http://127.0.0.1:$(($1 + 10 * i))/metrics" |
      awk '/^etcd_network_peer_sent_bytes_total/ {s += $2} END {printf "%d", s}')
    total=$((total + v))
  done
  echo "$total"
}

# run BIN BASEPORT: one fresh cluster, one measurement.
run() {
  local bin=$1 bp=$2 ic="" i
  for i in 0 1 2; do ic="$ic,m$i=http://127.0.0.1:$((bp + 10 * i + 1))"; done
  ic=${ic#,}
  PIDS=()
  for i in 0 1 2; do
    local c=$((bp + 10 * i))
    "$bin" --name "m$i" --data-dir "$W/$bp-m$i" --listen-client-urls "http://127.0.0.1:$c" \
      --advertise-client-urls "http://127.0.0.1:$c" --listen-peer-urls "http://127.0.0.1:$((c + 1))" \
      --initial-advertise-peer-urls "http://127.0.0.1:$((c + 1))" --initial-cluster "$ic" \
      --initial-cluster-token "ab-$bp" >"$W/$bp-m$i.log" 2>&1 &
    PIDS+=($!)
  done
  for _ in $(seq 100); do curl -s "http://127.0.0.1:$bp/health" | grep -q true && break; sleep 0.1; done
  for i in 0 1 2; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      echo "member $i of $bin did not start:" >&2
      tail -3 "$W/$bp-m$i.log" >&2
      exit 1
    fi
  done
  local eps="127.0.0.1:$bp,127.0.0.1:$((bp + 10)),127.0.0.1:$((bp + 20))"
  "$BENCH" --endpoints="$eps" --conns=100 --clients=1000 put --key-size=8 --sequential-keys \
    --val-size=256 --total=10000 >/dev/null 2>&1
  local before=() p0 out
  for p in "${PIDS[@]}"; do before+=("$(ticks "$p")"); done
  p0=$(peer_bytes "$bp")
  out=$("$BENCH" --endpoints="$eps" --conns=100 --clients=1000 "${LOAD[@]}" --total="$TOTAL" 2>&1)
  local p1 line sum=0 d
  p1=$(peer_bytes "$bp")
  line="$(basename "$bin"): $(echo "$out" | awk '/Requests\/sec/ {printf "%.0f req/s", $2}'), CPU µs/req by member"
  for i in 0 1 2; do
    d=$(($(ticks "${PIDS[$i]}") - before[i]))
    sum=$((sum + d))
    line="$line $(awk -v d="$d" -v hz="$hz" -v n="$TOTAL" 'BEGIN {printf "%.1f", d / hz * 1e6 / n}')"
  done
  echo "$line, sum $(awk -v d="$sum" -v hz="$hz" -v n="$TOTAL" 'BEGIN {printf "%.1f", d / hz * 1e6 / n}'), peer bytes/req $(((p1 - p0) / TOTAL))"
  for p in "${PIDS[@]}"; do
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PIDS=()
}

for r in $(seq "$ROUNDS"); do
  run "$OLD" $((PORT + r * 100))
  run "$NEW" $((PORT + r * 100 + 50))
done
