#!/usr/bin/env bash
# The cost of TLS and auth, keel beside etcd 3.4 (issue: security). For each server and each of
# three setups (plain, TLS with client certificates, TLS with client certificates and auth
# enabled, the client authenticating with --user), one fresh single member on loopback is loaded
# with etcd's benchmark tool: puts then serializable ranges, 100 connections and 1000 clients.
# Prints a markdown table: requests/s and the server's CPU per request (from /proc/PID/stat),
# and the ratio keel/etcd per setup.
#
# usage: bench/secure-compare.sh [TOTAL]     (TOTAL requests per load, default 50000)
# env:   KEEL (target/release/keel), BENCH (/tmp/etcd-bench-bin/benchmark, made by
#        ../shared/tools/build-etcd-benchmark.sh), BCRYPT_COST (given to both servers; default
#        etcd's 10). etcd's tool authenticates once per connection (100 per load), and each
#        Authenticate costs a bcrypt check: at cost 10 that setup dominates the CPU per request
#        of a short run; a low cost shows the per-request cost of tokens.
set -euo pipefail
TOTAL=${1:-50000}
KEEL=${KEEL:-target/release/keel}
BENCH=${BENCH:-/tmp/etcd-bench-bin/benchmark}
[ -x "$KEEL" ] || { echo "no $KEEL (cargo build --release)" >&2; exit 1; }
[ -x "$BENCH" ] || { echo "no $BENCH (../shared/tools/build-etcd-benchmark.sh $(dirname "$BENCH"))" >&2; exit 1; }
command -v etcd >/dev/null || { echo "no etcd (apt-get install etcd-server)" >&2; exit 1; }
W=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT

# A CA, a server certificate for 127.0.0.1, and a client certificate whose CN is root.
cert() { # name cn
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/$1-key.pem" \
    -out "$W/$1.csr" -subj "/CN=$2" 2>/dev/null
  printf "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n" > "$W/$1.ext"
  openssl x509 -req -in "$W/$1.csr" -CA "$W/ca.pem" -CAkey "$W/ca-key.pem" -CAcreateserial \
    -out "$W/$1.pem" -days 2 -extfile "$W/$1.ext" 2>/dev/null
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/ca-key.pem" \
  -out "$W/ca.pem" -days 2 -subj "/CN=bench-ca" 2>/dev/null
cert server server
cert client root

P=23790
ticks() { awk '{print $14+$15}' "/proc/$PID/stat"; }
hz=$(getconf CLK_TCK)

run() { # server setup
  local server=$1 setup=$2 scheme=http tls_srv=() tls_cli=() user=()
  if [ "$setup" != plain ]; then
    scheme=https
    tls_srv=(--cert-file="$W/server.pem" --key-file="$W/server-key.pem"
      --trusted-ca-file="$W/ca.pem" --client-cert-auth)
    tls_cli=(--cacert="$W/ca.pem" --cert="$W/client.pem" --key="$W/client-key.pem")
  fi
  [ "$setup" = tls+auth ] && user=(--user=root:rootpw) && tls_srv+=(--bcrypt-cost="${BCRYPT_COST:-10}")
  local bin=etcd
  [ "$server" = keel ] && bin=$KEEL
  rm -rf "$W/data"
  "$bin" --data-dir="$W/data" --listen-client-urls=$scheme://127.0.0.1:$P \
    --advertise-client-urls=$scheme://127.0.0.1:$P --listen-peer-urls=http://127.0.0.1:$((P + 1)) \
    --initial-advertise-peer-urls=http://127.0.0.1:$((P + 1)) \
    --initial-cluster=default=http://127.0.0.1:$((P + 1)) "${tls_srv[@]}" >"$W/log" 2>&1 &
  PID=$!
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$P) 2>/dev/null && break; sleep 0.1; done
  local ctl=(env ETCDCTL_API=3 etcdctl --endpoints=$scheme://127.0.0.1:$P "${tls_cli[@]}")
  if [ "$setup" = tls+auth ]; then
    "${ctl[@]}" user add root:rootpw >/dev/null
    "${ctl[@]}" auth enable >/dev/null 2>&1
  fi
  "${ctl[@]}" "${user[@]}" put foo bar >/dev/null
  local b=("$BENCH" --endpoints=$scheme://127.0.0.1:$P "${tls_cli[@]}" "${user[@]}" --conns=100 --clients=1000)
  local c0 c1 c2 put range
  c0=$(ticks)
  put=$("${b[@]}" put --key-size=8 --sequential-keys --key-space-size=100000 --val-size=256 \
    --total="$TOTAL" 2>&1 | awk '/Requests\/sec/ {print $2}')
  c1=$(ticks)
  range=$("${b[@]}" range foo --consistency=s --total="$TOTAL" 2>&1 | awk '/Requests\/sec/ {print $2}')
  c2=$(ticks)
  kill -9 "$PID"; wait "$PID" 2>/dev/null || true; PID=
  local put_cpu range_cpu
  put_cpu=$(awk -v t=$((c1 - c0)) -v n="$TOTAL" -v hz="$hz" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
  range_cpu=$(awk -v t=$((c2 - c1)) -v n="$TOTAL" -v hz="$hz" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
  printf '%s %s %.0f %s %.0f %s\n' "$server" "$setup" "$put" "$put_cpu" "$range" "$range_cpu"
}

echo "Command: BCRYPT_COST=${BCRYPT_COST:-10} bench/secure-compare.sh $TOTAL (keel: $KEEL; etcd: $(etcd --version | head -1))"
echo
echo "| setup | server | put req/s | put CPU µs/req | range req/s | range CPU µs/req |"
echo "|---|---|---|---|---|---|"
results=()
for setup in plain tls tls+auth; do
  for server in etcd keel; do
    line=$(run "$server" "$setup")
    results+=("$line")
    read -r s st pr pc rr rc <<<"$line"
    echo "| $st | $s | $pr | $pc | $rr | $rc |"
  done
done
echo
echo "| setup | put keel/etcd | put CPU keel/etcd | range keel/etcd | range CPU keel/etcd |"
echo "|---|---|---|---|---|"
for setup in plain tls tls+auth; do
  e=$(printf '%s\n' "${results[@]}" | awk -v s="$setup" '$1 == "etcd" && $2 == s')
  k=$(printf '%s\n' "${results[@]}" | awk -v s="$setup" '$1 == "keel" && $2 == s')
  paste <(echo "$e") <(echo "$k") | awk '{printf "| %s | **%.2f×** | %.2f× | **%.2f×** | %.2f× |\n", $2, $9/$3, $10/$4, $11/$5, $12/$6}'
done
