#!/usr/bin/env bash
# The Ansible deployment, tested for real: `ansible-playbook` deploys a 3-member cluster onto
# three hosts made on this machine, each a network namespace with its own address and its own
# sshd, reached over ssh with the same inventory format as real hosts. The hosts share this
# machine's filesystem, so each gets its paths under its own `keel_prefix`; there is no systemd
# here, so the role's supervised service mode runs the members.
#
# It checks, in order:
#   1. ansible-lint is clean, and the systemd units the role writes pass `systemd-analyze verify`;
#   2. the first run bootstraps a healthy cluster, over TLS for clients and peers (client and peer
#      certificates required), that etcdctl reads and writes through every member;
#   3. a second run reports no changes;
#   4. the members run as the keel user, with the unit's file limit and I/O class, in a 0700 data
#      dir, and the supervisor restarts a member killed with SIGKILL;
#   5. rolling-restart.yml --limit with a new binary upgrades and restarts only that member;
#   6. supervised members start at boot (a cron @reboot entry);
#   7. an upgrade and a configuration change: deploy.yml (site.yml's first play, as in a run
#      that stopped there) marks the members, and the next site.yml run restarts them one at a
#      time, with the data kept;
#   8. the backup job writes snapshots that etcdctl reads, and keeps only the newest.
#
# Needs root (namespaces, sshd, a system user), ansible, ansible-lint, sshd, etcdctl, openssl.
# Usage: ansible/tests/run.sh [KEEL_BIN_DIR]    (default: target/debug)
# It removes everything it made on exit: processes (by PID), namespaces, links, cron files, the
# keel user if it made it, and its temp dir.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
ansible_dir=$(dirname "$here")
root=$(dirname "$ansible_dir")
bin_dir=$(cd "${1:-$root/target/debug}" && pwd)

say() { printf '\n=== %s  %s\n' "$(date +%T)" "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; keep_tmp=1; exit 1; }

[[ $(id -u) -eq 0 ]] || { echo "not run: needs root (network namespaces, sshd, a system user)"; exit 0; }
for tool in ansible-playbook ansible-lint /usr/sbin/sshd ssh-keygen etcdctl openssl ip start-stop-daemon; do
  command -v "$tool" >/dev/null || fail "needs $tool (scripts/install-deps installs it)"
done

n=3
# The unit's LimitNOFILE, or this machine's hard limit if lower (raising it needs CAP_SYS_RESOURCE).
nofile=$(ulimit -H -n)
[[ $nofile == unlimited || $nofile -gt 65536 ]] && nofile=65536
id=$(( $$ % 200 ))
tag="ka$id"
subnet="10.214.$(( 20 + id ))"
tmp=$(mktemp -d /tmp/keel-ansible.XXXXXX)
chmod 0755 "$tmp" # the hosts' paths are under it, and the members run as the keel user
user_existed=0
getent passwd keel >/dev/null && user_existed=1
addr() { echo "$subnet.$(( 10 + $1 ))"; }
ns() { echo "${tag}m$1"; }

cleanup() {
  set +e
  for i in $(seq 0 $((n - 1))); do
    svc="$tmp/hosts/m$i/usr/local/bin/keel-service"
    [[ -x $svc ]] && ip netns exec "$(ns "$i")" "$svc" stop >/dev/null 2>&1
    [[ -s $tmp/sshd-$i.pid ]] && kill "$(cat "$tmp/sshd-$i.pid")" 2>/dev/null
    # Whatever still runs in the host (ssh sessions that ControlPersist kept open outlive the
    # listening sshd) goes with it.
    ip netns pids "$(ns "$i")" 2>/dev/null | xargs -r kill 2>/dev/null
    ip netns del "$(ns "$i")" 2>/dev/null
    ip link del "${tag}v$i" 2>/dev/null
    rm -f "/etc/cron.d/keel-backup-m$i" "/etc/cron.d/keel-m$i"
  done
  ip link del "${tag}br" 2>/dev/null
  if [[ $user_existed -eq 0 ]]; then
    userdel keel 2>/dev/null
    groupdel keel 2>/dev/null
  fi
  if [[ ${keep_tmp:-0} -eq 1 ]]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'keep_tmp=1; for f in "$tmp"/hosts/m*/var/log/keel/keel.log; do echo "--- $f"; tail -20 "$f"; done' ERR

say "hosts: $n network namespaces on a bridge, each with its sshd"
ip link add "${tag}br" type bridge
ip addr add "$subnet.1/24" dev "${tag}br"
ip link set "${tag}br" up
ssh-keygen -q -t ed25519 -N '' -f "$tmp/id" -C keel-ansible-test
ssh-keygen -q -t ed25519 -N '' -f "$tmp/hostkey"
cp "$tmp/id.pub" "$tmp/authorized_keys"
mkdir -p /run/sshd
for i in $(seq 0 $((n - 1))); do
  ip netns add "$(ns "$i")"
  ip link add "${tag}v$i" type veth peer name "${tag}p$i"
  ip link set "${tag}p$i" netns "$(ns "$i")"
  ip link set "${tag}v$i" master "${tag}br"
  ip link set "${tag}v$i" up
  ip -n "$(ns "$i")" addr add "$(addr "$i")/24" dev "${tag}p$i"
  ip -n "$(ns "$i")" link set "${tag}p$i" up
  ip -n "$(ns "$i")" link set lo up
  cat >"$tmp/sshd-$i.conf" <<EOF
ListenAddress $(addr "$i"):22
HostKey $tmp/hostkey
PidFile $tmp/sshd-$i.pid
AuthorizedKeysFile $tmp/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
EOF
  ip netns exec "$(ns "$i")" /usr/sbin/sshd -f "$tmp/sshd-$i.conf" -E "$tmp/sshd-$i.log"
done

say "TLS material: a CA, and a certificate per member for its address (server and client use)"
mkdir -p "$tmp/certs"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=keel-test-ca \
  -keyout "$tmp/certs/ca-key.pem" -out "$tmp/certs/ca.pem" 2>/dev/null
for i in $(seq 0 $((n - 1))); do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=m$i" \
    -keyout "$tmp/certs/m$i-key.pem" -out "$tmp/certs/m$i.csr" 2>/dev/null
  printf 'subjectAltName=IP:%s,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' "$(addr "$i")" \
    >"$tmp/certs/m$i.ext"
  openssl x509 -req -in "$tmp/certs/m$i.csr" -CA "$tmp/certs/ca.pem" -CAkey "$tmp/certs/ca-key.pem" \
    -CAcreateserial -days 2 -extfile "$tmp/certs/m$i.ext" -out "$tmp/certs/m$i.pem" 2>/dev/null
done

# The binaries, without debug info (a debug build is over 200 MB).
mkdir -p "$tmp/bin"
objcopy --strip-debug "$bin_dir/keel" "$tmp/bin/keel"
objcopy --strip-debug "$bin_dir/keelctl" "$tmp/bin/keelctl"

{
  echo "keel:"
  echo "  hosts:"
  for i in $(seq 0 $((n - 1))); do
    echo "    m$i:"
    echo "      ansible_host: $(addr "$i")"
    echo "      keel_prefix: $tmp/hosts/m$i"
    echo "      keel_client_cert_src: $tmp/certs/m$i.pem"
    echo "      keel_client_key_src: $tmp/certs/m$i-key.pem"
    echo "      keel_peer_cert_src: $tmp/certs/m$i.pem"
    echo "      keel_peer_key_src: $tmp/certs/m$i-key.pem"
  done
  cat <<EOF
  vars:
    ansible_user: root
    ansible_ssh_private_key_file: $tmp/id
    ansible_ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
    ansible_python_interpreter: /usr/bin/python3
    keel_service_mode: supervised
    keel_cluster_token: ansible-test
    keel_heartbeat_interval: 50
    keel_election_timeout: 500
    keel_restart_sec: 1
    keel_limit_nofile: $nofile
    keel_binary_src: $tmp/bin/keel
    keelctl_binary_src: $tmp/bin/keelctl
    keel_client_ca_src: $tmp/certs/ca.pem
    keel_client_cert_auth: true
    keel_peer_ca_src: $tmp/certs/ca.pem
    keel_peer_client_cert_auth: true
    keel_backup_keep: 2
EOF
} >"$tmp/inventory.yml"

export ANSIBLE_CONFIG="$ansible_dir/ansible.cfg"
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0
play() { # play LOGNAME PLAYBOOK [ARGS...]
  local log="$tmp/$1.log"
  shift
  if ! ansible-playbook -i "$tmp/inventory.yml" "$ansible_dir/$@" >"$log" 2>&1; then
    tail -60 "$log"
    fail "ansible-playbook $*"
  fi
  sed -n '/PLAY RECAP/,$p' "$log"
}
recap_changed() { # the changed= counts of a run's recap, one line per host
  sed -n '/PLAY RECAP/,$p' "$tmp/$1.log" | grep -oE '^m[0-9]+ .*changed=[0-9]+' | sed -E 's/^(m[0-9]+) .*changed=([0-9]+)/\1 \2/'
}
ctl() { # ctl MEMBER ARGS...: etcdctl against one member, with a member's client certificate
  ETCDCTL_API=3 etcdctl --endpoints="https://$(addr "$1"):2379" --cacert="$tmp/certs/ca.pem" \
    --cert="$tmp/certs/m0.pem" --key="$tmp/certs/m0-key.pem" "${@:2}"
}
keel_pid() { # the member's keel process (the supervisor's child)
  local sup
  sup=$(cat "$tmp/hosts/m$1/run/keel/keel.pid")
  pgrep -P "$sup" -x keel
}
wait_healthy() {
  for _ in $(seq 1 100); do
    local ok=0
    for i in $(seq 0 $((n - 1))); do
      ctl "$i" endpoint health >/dev/null 2>&1 && ok=$((ok + 1))
    done
    [[ $ok -eq $n ]] && return 0
    sleep 0.3
  done
  fail "the cluster did not become healthy"
}

say "1. ansible-lint, and the systemd units through systemd-analyze verify"
(cd "$ansible_dir" && ansible-lint --nocolor) || fail "ansible-lint"
ansible-playbook -i localhost, -c local "$here/render-units.yml" -e "out=$tmp/units" \
  -e "keel_binary_dir=$tmp/bin" >"$tmp/render.log" 2>&1 || { cat "$tmp/render.log"; fail "rendering the units"; }
if command -v systemd-analyze >/dev/null; then
  for unit in keel.service keel-backup.service keel-backup.timer; do
    # verify also checks that the binaries the units run exist (render-units.yml puts them there).
    out=$(cd "$tmp/units" && systemd-analyze verify --man=no "./$unit" 2>&1) || { echo "$out"; fail "systemd-analyze verify $unit"; }
    if grep -iE 'unknown|ignoring|invalid' <<<"$out"; then fail "systemd-analyze verify $unit"; fi
  done
  echo "units verified"
else
  echo "systemd-analyze not found: units not verified"
fi

say "2. first run: bootstrap the cluster"
play run1 site.yml
wait_healthy
ctl 0 put /ansible/greeting hello >/dev/null
for i in $(seq 0 $((n - 1))); do
  [[ $(ctl "$i" get /ansible/greeting --print-value-only) == hello ]] || fail "m$i does not read the write"
done
members=$(ctl 1 member list)
echo "$members"
[[ $(grep -c ', started, ' <<<"$members") -eq $n ]] || fail "member list: not $n started members"
for i in $(seq 0 $((n - 1))); do
  grep -q "m$i, https://$(addr "$i"):2380, https://$(addr "$i"):2379, false" <<<"$members" \
    || fail "member list lacks m$i with its TLS URLs"
done

say "3. second run: no changes"
play run2 site.yml
while read -r host changed; do
  [[ $changed -eq 0 ]] || fail "second run changed $changed things on $host (see $tmp/run2.log)"
done < <(recap_changed run2)
[[ $(recap_changed run2 | wc -l) -eq $n ]] || fail "recap of the second run lacks hosts"

say "4. what runs: user, limits, I/O class, data dir; a member killed is restarted"
for i in $(seq 0 $((n - 1))); do
  pid=$(keel_pid "$i") || fail "m$i: no keel process under its supervisor"
  [[ $(ps -o user= -p "$pid") == keel ]] || fail "m$i runs as $(ps -o user= -p "$pid")"
  grep -qE "^Max open files +$nofile +$nofile " "/proc/$pid/limits" || fail "m$i: open files limit"
  [[ $(ionice -p "$pid") == "best-effort: prio 0" ]] || fail "m$i: ionice $(ionice -p "$pid")"
  [[ $(stat -c '%a %U' "$tmp/hosts/m$i/var/lib/keel") == "700 keel" ]] || fail "m$i: data dir mode"
  [[ $(stat -c '%a %U %G' "$tmp/hosts/m$i/etc/keel/tls/peer-key.pem") == "640 root keel" ]] || fail "m$i: key mode"
  grep -qx 'ETCD_HEARTBEAT_INTERVAL=50' "$tmp/hosts/m$i/etc/keel/keel.env" || fail "m$i: env file"
done
victim=$(keel_pid 1)
kill -KILL "$victim"
for _ in $(seq 1 100); do
  new=$(keel_pid 1 || true)
  [[ -n $new && $new != "$victim" ]] && break
  sleep 0.1
done
[[ -n $new && $new != "$victim" ]] || fail "the supervisor did not restart m1"
grep -q 'keel exited with status 137; restarting' "$tmp/hosts/m1/var/log/keel/keel.log" \
  || fail "the supervisor did not log the restart"
wait_healthy
[[ $(ctl 1 get /ansible/greeting --print-value-only) == hello ]] || fail "m1 lost the key"
echo "m1 restarted by its supervisor: pid $victim -> $new"

before=$(for i in $(seq 0 $((n - 1))); do keel_pid "$i"; done)
say "5. rolling-restart.yml --limit m1 with a new binary: only m1 is upgraded and restarted"
cp "$tmp/bin/keel" "$tmp/bin/keel-next"
printf 'next' >>"$tmp/bin/keel-next" # a different file that still runs: ELF ignores a tail
play run4 rolling-restart.yml --limit m1 -e keel_binary_src="$tmp/bin/keel-next"
after=$(for i in $(seq 0 $((n - 1))); do keel_pid "$i"; done)
for i in $(seq 0 $((n - 1))); do
  same=$([[ $(sed -n "$((i + 1))p" <<<"$before") == $(sed -n "$((i + 1))p" <<<"$after") ]] && echo 1 || echo 0)
  if [[ $i -eq 1 ]]; then
    cmp -s "$tmp/bin/keel-next" "$tmp/hosts/m1/usr/local/bin/keel" || fail "m1 was not upgraded"
    [[ $same -eq 0 ]] || fail "m1 was not restarted"
  else
    cmp -s "$tmp/bin/keel" "$tmp/hosts/m$i/usr/local/bin/keel" || fail "m$i was upgraded"
    [[ $same -eq 1 ]] || fail "m$i was restarted"
  fi
done
wait_healthy
ctl 0 put /ansible/after-upgrade yes >/dev/null
[[ $(ctl 2 get /ansible/after-upgrade --print-value-only) == yes ]] || fail "no write after the upgrade"

say "6. boot: supervised members start from cron at boot"
grep -q "^@reboot root $tmp/hosts/m0/usr/local/bin/keel-service start" /etc/cron.d/keel-m0 \
  || { cat /etc/cron.d/keel-m0; fail "no @reboot entry"; }

say "7. an upgrade and a configuration change: marked by deploy.yml, rolled by site.yml"
# deploy.yml is site.yml's first play alone: a run that stopped there (a failure, an
# interrupt) leaves the changed member marked, and the next site.yml run restarts it.
before=$(for i in $(seq 0 $((n - 1))); do keel_pid "$i"; done)
play run5 deploy.yml -e keel_snapshot_count=30000 -e keel_binary_src="$tmp/bin/keel-next"
for i in $(seq 0 $((n - 1))); do
  [[ -e $tmp/hosts/m$i/etc/keel/restart-pending ]] || fail "m$i: no restart-pending mark"
  [[ $(keel_pid "$i") == $(sed -n "$((i + 1))p" <<<"$before") ]] || fail "m$i restarted by deploy.yml"
done
play run6 site.yml -e keel_snapshot_count=30000 -e keel_binary_src="$tmp/bin/keel-next"
for i in $(seq 0 $((n - 1))); do
  grep -qx 'ETCD_SNAPSHOT_COUNT=30000' "$tmp/hosts/m$i/etc/keel/keel.env" || fail "m$i: new env"
  [[ ! -e $tmp/hosts/m$i/etc/keel/restart-pending ]] || fail "m$i: the mark stayed"
  [[ $(keel_pid "$i") != $(sed -n "$((i + 1))p" <<<"$before") ]] || fail "m$i was not restarted by the next run"
  cmp -s "$tmp/bin/keel-next" "$tmp/hosts/m$i/usr/local/bin/keel" || fail "m$i was not upgraded"
done
# The second play restarted one host per batch, and waited for every member's health each time.
[[ $(grep -c 'TASK \[keel : Restart the member (supervised)\]' "$tmp/run6.log") -eq $n ]] \
  || fail "expected $n restart batches"
wait_healthy
[[ $(ctl 2 get /ansible/greeting --print-value-only) == hello ]] || fail "data lost in the restarts"

say "8. backups: scheduled, in etcd's format, the newest kept"
cron="/etc/cron.d/keel-backup-m0"
grep -q "^17 \* \* \* \* keel $tmp/hosts/m0/usr/local/bin/keel-backup" "$cron" || { cat "$cron"; fail "cron entry"; }
for _ in 1 2 3; do
  ip netns exec "$(ns 0)" runuser -u keel -- "$tmp/hosts/m0/usr/local/bin/keel-backup" \
    || fail "keel-backup"
  sleep 1.1 # snapshot names have a one-second resolution
done
mapfile -t snaps < <(ls "$tmp/hosts/m0/var/backups/keel")
[[ ${#snaps[@]} -eq 2 ]] || fail "expected the 2 newest snapshots, found: ${snaps[*]}"
ETCDCTL_API=3 etcdctl snapshot status "$tmp/hosts/m0/var/backups/keel/${snaps[1]}" -w table

say "all checks passed"
