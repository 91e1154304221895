#!/usr/bin/env bash
# make demo: a protected pair on this machine, failed over while a client writes.
#
# It installs what is missing (make qemu, make guest), builds lockstepd and lockstepctl, starts a
# test LAN (a QEMU hub with a loopback port forwarded to the guest's service), starts lockstepd in
# single-host mode, creates a pair running the test guest, runs the workload client, kills the
# primary QEMU, shows what the client saw and the pair's status, waits for the automatic
# re-protection, and stops everything it started (by PID).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$here/build}
export BUILD
cd "$here"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "preparing QEMU 11.1 and the test guest (cached under $BUILD)"
make -s qemu guest >/dev/null
go build -o "$BUILD/bin/" ./cmd/lockstepd ./cmd/lockstepctl ./integration/guest/democlient
QEMU=$BUILD/bin/qemu11
QEMU_IMG=$BUILD/bin/qemu-img11
guest_out=$(bash integration/guest/build.sh 2>/dev/null)
KERNEL=$(sed -n 's/^kernel=//p' <<<"$guest_out")
INITRD=$(sed -n 's/^initrd=//p' <<<"$guest_out")

work=$(mktemp -d /tmp/lsdemo.XXXXXX)
ovl=$(mktemp -d /dev/shm/lsdemo.XXXXXX)
pids=()
cleanup() {
	set +e
	if [ -n "${api_port:-}" ]; then
		ctl delete db1 >/dev/null 2>&1
	fi
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
	sleep 0.5
	for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
	for s in a b; do
		[ -f "$work/state/db1/$s/qemu.pid" ] && kill -KILL "$(cat "$work/state/db1/$s/qemu.pid")" 2>/dev/null
	done
	# lockstepd's fence keeper outlives the agent by design: stop it by the PID it wrote.
	[ -f "$work/state/_fence.pid" ] && kill -KILL "$(cat "$work/state/_fence.pid")" 2>/dev/null
	rm -rf "$work" "$ovl"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
client_port=$(free_port); hub_a=$(free_port); hub_b=$(free_port)

# Certificates, as on real hosts: the agent's API and its store run over mutual TLS.
api_port=$(free_port); etcd_port=$(free_port)
say "certificates: lockstepctl certs (a test CA, the host's and the operator's)"
"$BUILD/bin/lockstepctl" certs --dir "$work/pki" --host demo=127.0.0.1 --client operator
pki=$work/pki
ctl() { "$BUILD/bin/lockstepctl" --addr "tcp://127.0.0.1:$api_port" --tls-cert "$pki/operator.pem" --tls-key "$pki/operator.key" --tls-ca "$pki/ca.pem" "$@"; }

say "test LAN: a QEMU hub; 127.0.0.1:$client_port is forwarded to the guest's service"
"$QEMU" -M none -nodefaults -display none \
	-netdev "user,id=u0,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:$client_port-10.0.2.15:7777" -netdev hubport,id=hu0,hubid=0,netdev=u0 \
	-netdev "socket,id=s0,listen=127.0.0.1:$hub_a" -netdev hubport,id=hs0,hubid=0,netdev=s0 \
	-netdev "socket,id=s1,listen=127.0.0.1:$hub_b" -netdev hubport,id=hs1,hubid=0,netdev=s1 \
	>"$work/hub.log" 2>&1 &
pids+=($!)

say "lockstepd (single-host mode), API on tcp://127.0.0.1:$api_port and its store on https://127.0.0.1:$etcd_port, both mutual TLS"
"$BUILD/bin/lockstepd" --state-dir "$work/state" --overlay-dir "$ovl" --host demo \
	--listen "tcp://127.0.0.1:$api_port" --tls-cert "$pki/demo.pem" --tls-key "$pki/demo.key" --tls-ca "$pki/ca.pem" \
	--etcd-serve "https://127.0.0.1:$etcd_port" --etcd-cert "$pki/demo.pem" --etcd-key "$pki/demo.key" --etcd-ca "$pki/ca.pem" \
	>"$work/lockstepd.log" 2>&1 &
agent=$!
pids+=("$agent")
for _ in $(seq 100); do ctl list >/dev/null 2>&1 && break; sleep 0.1; done

truncate -s 64M "$work/disk-a.raw"
cat >"$work/db1.yaml" <<YAML
apiVersion: lockstep.dev/v1
kind: Pair
metadata:
  name: db1
spec:
  memory: 128Mi
  vcpus: 1
  accel: tcg
  boot:
    kernel: $KERNEL
    initrd: $INITRD
    cmdline: console=ttyS0 quiet panic=-1 lockstep.ip=10.0.2.15/24
  disk:
    size: 64Mi
  nic: {mac: "52:54:00:12:34:56", model: e1000, backend: socket}
  qemuCommand: [$QEMU]
  qemuImgCommand: [$QEMU_IMG]
  checkpointDelay: 200ms
  primary: {host: 127.0.0.1, disk: {path: $work/disk-a.raw}, netSocket: "127.0.0.1:$hub_a"}
  secondary: {host: 127.0.0.1, disk: {path: $work/disk-b.raw}, netSocket: "127.0.0.1:$hub_b"}
YAML
say "lockstepctl create -f db1.yaml --wait"
ctl create -f "$work/db1.yaml" --wait

say "the workload client writes a record every 20 ms on one TCP connection"
"$BUILD/bin/democlient" --addr "127.0.0.1:$client_port" >"$work/client.log" 2>&1 &
client=$!
pids+=("$client")
for _ in $(seq 300); do grep -q connected "$work/client.log" && break; sleep 0.1; done
sleep 3
ctl status db1

say "lockstepd's own cost over 10 s with one protected pair"
ticks() { awk '{print $14+$15}' "/proc/$agent/stat"; }
t0=$(ticks); sleep 10; t1=$(ticks)
hz=$(getconf CLK_TCK)
awk -v a="$t0" -v b="$t1" -v hz="$hz" 'BEGIN{printf "CPU: %.2f%% of one core\n", (b-a)/hz/10*100}'
grep -E '^VmRSS' "/proc/$agent/status"

say "kill -9 of the primary QEMU (pid $(cat "$work/state/db1/a/qemu.pid"))"
ctl watch db1 >"$work/watch.log" 2>&1 &
watcher=$!
pids+=("$watcher")
sleep 0.5
kill -KILL "$(cat "$work/state/db1/a/qemu.pid")"
for _ in $(seq 600); do
	ctl status db1 -o json | grep -q '"generation": 2,' && ctl status db1 | grep -q 'state:.*protected ' && break
	sleep 0.1
done
sleep 3
kill -TERM "$watcher" 2>/dev/null || true

say "what lockstepctl watch showed"
grep -E "state |failover|step .*done (secondary: x-colo|primary: wait colo)|resync" "$work/watch.log" | head -30

say "the client stops and checks its records on the same connection"
kill -TERM "$client"
wait "$client" || { cat "$work/client.log"; exit 1; }
cat "$work/client.log"

say "lockstepctl status db1 (re-protected automatically)"
ctl status db1
