#!/usr/bin/env bash
# The gRPC proxy under many watchers of one key: keel's `keel grpc-proxy start` in front of a
# keel member beside etcd 3.4's `etcd grpc-proxy start` in front of an etcd 3.4 member, loaded
# by etcd's benchmark tool (`benchmark watch`: STREAMS streams of PER watchers on one key, over
# 100 connections, then puts to that key). Interleaved rounds. For each, prints the watchers
# the member serves (its `etcd_debugging_mvcc_watcher_total`, highest seen during the run), the
# proxy's CPU (from /proc/PID/stat) and peak RSS (VmHWM), the member's CPU, and the tool's
# watch creation and event delivery rates.
#
# usage: bench/grpc-proxy-compare.sh [STREAMS] [PER] [PUTS] [ROUNDS]
#        (default 100 streams × 100 watchers = 10,000 watchers, 200 puts, 2 rounds)
# env:   KEEL (target/release/keel), BENCH (/tmp/etcd-bench-bin/benchmark, made by
#        ../shared/tools/build-etcd-benchmark.sh)
set -euo pipefail
STREAMS=${1:-100}
PER=${2:-100}
PUTS=${3:-200}
ROUNDS=${4:-2}
KEEL=${KEEL:-target/release/keel}
BENCH=${BENCH:-/tmp/etcd-bench-bin/benchmark}
[ -x "$KEEL" ] || { echo "no $KEEL (cargo build --release)" >&2; exit 1; }
[ -x "$BENCH" ] || { echo "no $BENCH (../shared/tools/build-etcd-benchmark.sh $(dirname "$BENCH"))" >&2; exit 1; }
command -v etcd >/dev/null || { echo "no etcd (apt-get install etcd-server)" >&2; exit 1; }
W=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; rm -rf "$W"; }
trap cleanup EXIT
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
member_flags() { # name dir port
  echo "--name=$1 --data-dir=$2 --listen-client-urls=http://127.0.0.1:$3 \
    --advertise-client-urls=http://127.0.0.1:$3 --listen-peer-urls=http://127.0.0.1:$(($3 + 1)) \
    --initial-advertise-peer-urls=http://127.0.0.1:$(($3 + 1)) \
    --initial-cluster=$1=http://127.0.0.1:$(($3 + 1))"
}

# A fresh member and proxy for each run, so that peak RSS belongs to that run alone.
start() { # program port proxy-port -> sets MPID PPID_
  local prog=$1 port=$2 pport=$3
  rm -rf "$W/d$port"
  # shellcheck disable=SC2046
  "$prog" $(member_flags m "$W/d$port" "$port") >"$W/m$port.log" 2>&1 &
  MPID=$!; PIDS+=("$MPID")
  wait_port "$port"
  "$prog" grpc-proxy start --endpoints=127.0.0.1:"$port" --listen-addr=127.0.0.1:"$pport" \
    >"$W/p$pport.log" 2>&1 &
  PPID_=$!; PIDS+=("$PPID_")
  wait_port "$pport"
  for _ in $(seq 50); do
    ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:"$pport" put warm up >/dev/null 2>&1 && break
    sleep 0.2
  done
}

watchers() { # member port -> the member's watcher gauge
  curl -s "http://127.0.0.1:$1/metrics" | awk '/^etcd_debugging_mvcc_watcher_total / {print $2}'
}

echo "Command: bench/grpc-proxy-compare.sh $STREAMS $PER $PUTS $ROUNDS (keel: $KEEL; etcd: $(etcd --version | head -1))"
echo
echo "| round | proxy | watchers | member watchers (peak) | proxy CPU s | proxy peak RSS MiB | member CPU s | creations/s | events/s |"
echo "|---|---|---|---|---|---|---|---|---|"
results=()
for round in $(seq "$ROUNDS"); do
  for which in etcd keel; do
    if [ "$which" = keel ]; then prog=$KEEL; port=25379; pport=25390; else prog=etcd; port=25479; pport=25490; fi
    start "$prog" "$port" "$pport"
    p0=$(ticks "$PPID_"); m0=$(ticks "$MPID")
    "$BENCH" --endpoints=127.0.0.1:"$pport" --conns=100 --clients=100 watch \
      --streams="$STREAMS" --watch-per-stream="$PER" --watched-key-total=1 \
      --put-total="$PUTS" --put-rate=100 >"$W/out" 2>&1 &
    B=$!
    peak=0
    while kill -0 "$B" 2>/dev/null; do
      n=$(watchers "$port"); n=${n%.*}
      [ -n "$n" ] && [ "$n" -gt "$peak" ] && peak=$n
      sleep 0.5
    done
    wait "$B" || { cat "$W/out" >&2; exit 1; }
    p1=$(ticks "$PPID_"); m1=$(ticks "$MPID")
    pcpu=$(awk -v t=$((p1 - p0)) -v hz="$hz" 'BEGIN {printf "%.2f", t / hz}')
    mcpu=$(awk -v t=$((m1 - m0)) -v hz="$hz" 'BEGIN {printf "%.2f", t / hz}')
    rss=$(awk -v k="$(hwm "$PPID_")" 'BEGIN {printf "%.1f", k / 1024}')
    # The tool prints two summaries: watch creation, then events received.
    rates=$(awk '/Requests\/sec/ {printf "%s ", $2}' "$W/out")
    create=$(echo "$rates" | awk '{printf "%.0f", $1}')
    events=$(echo "$rates" | awk '{printf "%.0f", $2}')
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$round" "$which" \
      $((STREAMS * PER)) "$peak" "$pcpu" "$rss" "$mcpu" "$create" "$events"
    results+=("$which $peak $pcpu $rss $mcpu $create $events")
    kill -9 "$PPID_" "$MPID" 2>/dev/null || true
    wait "$PPID_" "$MPID" 2>/dev/null || true
  done
done
echo
echo "| | keel proxy / etcd proxy |"
echo "|---|---|"
printf '%s\n' "${results[@]}" | awk '
  { w[$1] += $2; p[$1] += $3; r[$1] += $4; m[$1] += $5; c[$1] += $6; e[$1] += $7 }
  END {
    printf "| member watchers (peak) | %.0f vs %.0f |\n", w["keel"] / NR * 2, w["etcd"] / NR * 2
    printf "| proxy CPU | %.2f |\n", p["keel"] / p["etcd"]
    printf "| proxy peak RSS | %.2f |\n", r["keel"] / r["etcd"]
    printf "| member CPU | %.2f |\n", m["keel"] / m["etcd"]
    printf "| watch creations/s | %.2f |\n", c["keel"] / c["etcd"]
    printf "| events/s | %.2f |\n", e["keel"] / e["etcd"]
  }'
