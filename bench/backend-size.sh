#!/bin/bash
# The backend file's size after 200,000 puts of 1 KiB values (16-byte sequential keys, 100
# connections, 1000 clients, keel-bench), for one server binary (keel or etcd).
# usage: bench/backend-size.sh BIN [PORT]     (PORT: the client port; the peer port is PORT+1)
set -e
BIN=$1; W=$(mktemp -d); P=${2:-23770}
$BIN --data-dir=$W/d --listen-client-urls=http://127.0.0.1:$P --advertise-client-urls=http://127.0.0.1:$P --listen-peer-urls=http://127.0.0.1:$((P+1)) --initial-advertise-peer-urls=http://127.0.0.1:$((P+1)) --initial-cluster=default=http://127.0.0.1:$((P+1)) > $W/log 2>&1 &
PID=$!
for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$P) 2>/dev/null && break; sleep 0.1; done
/work/main/target/release/keel-bench --endpoints=127.0.0.1:$P --conns=100 --clients=1000 put --key-size=16 --val-size=1024 --sequential-keys --key-space-size=200000 --total=200000 2>&1 | grep "Requests/sec"
sleep 1
echo "$(basename $BIN) db bytes: $(stat -c %s $W/d/member/snap/db)"
kill -9 $PID 2>/dev/null; rm -rf $W
