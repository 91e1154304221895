#!/usr/bin/env bash
# make demo: a protected pair on this machine, failed over while a client writes.
#
# It installs what is missing (make qemu, make guest), builds lockstepd and lockstepctl, builds a
# test LAN out of two network namespaces (the host's, with a Linux bridge that both QEMUs join
# through QEMU's bridge helper, and a Linux client's), starts lockstepd (one agent, both sides of the pair) in
# the host's namespace, creates a pair running the test guest, runs the workload client in the
# client's namespace, kills the primary QEMU, shows what the client saw and the pair's status,
# waits for the automatic re-protection, and stops everything it started (by PID) and removes
# its namespaces. It needs root (namespaces, bridges, taps).
#
# Why a bridge and a Linux client rather than QEMU's slirp: slirp does not use TCP timestamps,
# so the guest's pure ACKs are frames short enough for its NIC driver to pad, and colo-compare
# counts the padding as data: almost every reply then mismatches and forces a checkpoint, and
# slirp retransmits a request lost in a failover only after a second and more. A Linux client
# behaves like most production clients (BenchmarkColoCauses in integration/ has the figures).
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

[ "$(id -u)" = 0 ] || { echo "make demo needs root: it builds its test LAN out of network namespaces" >&2; exit 1; }
work=$(mktemp -d /tmp/lsdemo.XXXXXX)
ovl=$(mktemp -d /dev/shm/lsdemo.XXXXXX)
# The LAN: namespace $ns_host holds the bridge $bridge (the VMs' taps join it) and one end of
# a veth pair whose other end is the client's eth0 in $ns_client.
ns_host=lsdemo$$-host
ns_client=lsdemo$$-client
bridge=lsdemo0
guest_ip=10.79.0.15
client_ip=10.79.0.100
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
	# Whatever of ours still runs in the namespaces (each was made by this script), by PID,
	# then the namespaces with their bridge, veths and taps.
	for ns in "$ns_host" "$ns_client"; do
		for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
		ip netns del "$ns" 2>/dev/null
	done
	rm -rf "$work" "$ovl"
}
trap cleanup EXIT

say "test LAN: bridge $bridge in namespace $ns_host, the client at $client_ip in $ns_client, the guest at $guest_ip"
ip netns add "$ns_host"
ip netns add "$ns_client"
for ns in "$ns_host" "$ns_client"; do
	ip -n "$ns" link set lo up
	# No IPv6: its router solicitations and multicast reports are noise for colo-compare.
	ip netns exec "$ns" sh -c 'echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6' 2>/dev/null || true
done
ip -n "$ns_host" link add "$bridge" type bridge
ip -n "$ns_host" link set "$bridge" up
ip -n "$ns_host" link add c0 type veth peer name eth0 netns "$ns_client"
ip -n "$ns_host" link set c0 master "$bridge" up
ip -n "$ns_client" addr add "$client_ip/24" dev eth0
ip -n "$ns_client" link set eth0 up
# QEMU's bridge helper attaches each QEMU's tap to the bridge if its ACL allows it; the test
# QEMU's ACL is in its Debian 13 root.
acl=$BUILD/qemu11/root/etc/qemu/bridge.conf
if ! grep -qsE "^allow ($bridge|all)\$" "$acl"; then
	mkdir -p "$(dirname "$acl")"
	echo "allow $bridge" >>"$acl"
fi

# Certificates, as on real hosts: the agent's API and its store run over mutual TLS. Both
# listen in $ns_host (a fresh namespace: any port is free there), where lockstepctl runs too.
api_port=7443 etcd_port=2379
say "certificates: lockstepctl certs (a test CA, the host's and the operator's)"
"$BUILD/bin/lockstepctl" certs --dir "$work/pki" --host demo=127.0.0.1 --client operator
pki=$work/pki
ctl() {
	ip netns exec "$ns_host" "$BUILD/bin/lockstepctl" --addr "tcp://127.0.0.1:$api_port" \
		--tls-cert "$pki/operator.pem" --tls-key "$pki/operator.key" --tls-ca "$pki/ca.pem" "$@"
}

say "lockstepd in $ns_host, API on tcp://127.0.0.1:$api_port and its store on https://127.0.0.1:$etcd_port, both mutual TLS"
# ip netns exec replaces itself with lockstepd, so $! is lockstepd's PID.
ip netns exec "$ns_host" "$BUILD/bin/lockstepd" --state-dir "$work/state" --overlay-dir "$ovl" --host demo \
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
    cmdline: console=ttyS0 quiet panic=-1 lockstep.ip=$guest_ip/24 lockstep.gw=$client_ip
  disk:
    size: 64Mi
  nic: {mac: "52:54:00:12:34:56", model: e1000, bridge: $bridge}
  qemuCommand: [$QEMU]
  qemuImgCommand: [$QEMU_IMG]
  checkpointDelay: 200ms
  primary: {host: 127.0.0.1, disk: {path: $work/disk-a.raw}}
  secondary: {host: 127.0.0.1, disk: {path: $work/disk-b.raw}}
YAML
say "lockstepctl create -f db1.yaml --wait"
ctl create -f "$work/db1.yaml" --wait

say "the workload client (in $ns_client) writes a record every 20 ms on one TCP connection"
ip netns exec "$ns_client" "$BUILD/bin/democlient" --addr "$guest_ip:7777" >"$work/client.log" 2>&1 &
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
	# the status's JSON spaces vary: match any number.
	ctl status db1 -o json | grep -qE '"generation": *2,' && ctl status db1 | grep -q 'state:.*protected ' && break
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
