#!/usr/bin/env bash
# The L4 gateway's cost: keel's `keel gateway start` beside etcd 3.4's `etcd gateway start`, both
# in front of the same fresh keel member on loopback, loaded with etcd's benchmark tool (puts
# and serializable ranges, 100 connections, 1000 clients), and the member without a gateway as
# the reference. Interleaved rounds. Prints requests/s and the gateway process's CPU per request
# (from /proc/PID/stat), and the ratios keel gateway / etcd gateway.
#
# usage: bench/gateway-compare.sh [TOTAL] [ROUNDS]   (default 50000 requests per load, 2 rounds)
# env:   KEEL (target/release/keel), BENCH (/tmp/etcd-bench-bin/benchmark, made by
#        ../shared/tools/build-etcd-benchmark.sh)
set -euo pipefail
TOTAL=${1:-50000}
ROUNDS=${2:-2}
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
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

M=24379 KG=24390 EG=24391
"$KEEL" --data-dir="$W/data" --listen-client-urls=http://127.0.0.1:$M \
  --advertise-client-urls=http://127.0.0.1:$M --listen-peer-urls=http://127.0.0.1:$((M + 1)) \
  --initial-advertise-peer-urls=http://127.0.0.1:$((M + 1)) \
  --initial-cluster=default=http://127.0.0.1:$((M + 1)) >"$W/member.log" 2>&1 &
MEMBER=$!; PIDS+=("$MEMBER")
"$KEEL" gateway start --endpoints=127.0.0.1:$M --listen-addr=127.0.0.1:$KG >"$W/kg.log" 2>&1 &
KGPID=$!; PIDS+=("$KGPID")
etcd gateway start --endpoints=127.0.0.1:$M --listen-addr=127.0.0.1:$EG >"$W/eg.log" 2>&1 &
EGPID=$!; PIDS+=("$EGPID")
wait_port $M; wait_port $KG; wait_port $EG
ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:$M put foo bar >/dev/null

load() { # port kind -> req/s
  local b=("$BENCH" --endpoints=127.0.0.1:"$1" --conns=100 --clients=1000)
  if [ "$2" = put ]; then
    "${b[@]}" put --key-size=8 --sequential-keys --key-space-size=100000 --val-size=256 \
      --total="$TOTAL" 2>&1 | awk '/Requests\/sec/ {print $2}'
  else
    "${b[@]}" range foo --consistency=s --total="$TOTAL" 2>&1 | awk '/Requests\/sec/ {print $2}'
  fi
}

echo "Command: bench/gateway-compare.sh $TOTAL $ROUNDS (keel: $KEEL; etcd: $(etcd --version | head -1))"
echo
echo "| round | load | path | req/s | gateway CPU µs/req |"
echo "|---|---|---|---|---|"
results=()
for round in $(seq "$ROUNDS"); do
  for kind in put range; do
    for path in direct etcd-gateway keel-gateway; do
      case $path in
        direct) port=$M pid= ;;
        etcd-gateway) port=$EG pid=$EGPID ;;
        keel-gateway) port=$KG pid=$KGPID ;;
      esac
      c0=0; [ -n "$pid" ] && c0=$(ticks "$pid")
      rps=$(load "$port" "$kind")
      cpu=-
      if [ -n "$pid" ]; then
        c1=$(ticks "$pid")
        cpu=$(awk -v t=$((c1 - c0)) -v n="$TOTAL" -v hz="$hz" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
      fi
      printf '| %s | %s | %s | %.0f | %s |\n' "$round" "$kind" "$path" "$rps" "$cpu"
      results+=("$kind $path $rps $cpu")
    done
  done
done
echo
echo "| load | req/s keel gw / etcd gw | CPU keel gw / etcd gw | keel gw / direct |"
echo "|---|---|---|---|"
for kind in put range; do
  printf '%s\n' "${results[@]}" | awk -v k="$kind" '
    $1 == k { rps[$2] += $3; cpu[$2] += $4; n[$2]++ }
    END { printf "| %s | **%.2f×** | %.2f× | %.2f× |\n", k,
            rps["keel-gateway"] / rps["etcd-gateway"], cpu["keel-gateway"] / cpu["etcd-gateway"],
            rps["keel-gateway"] / rps["direct"] }'
done
