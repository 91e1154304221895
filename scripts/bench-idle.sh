#!/usr/bin/env bash
# make bench-idle: what lockstepd itself costs with idle protected pairs. It starts one agent
# on the demo's test LAN (network namespaces it makes and removes), measures the agent's CPU
# (user + system time from /proc) and resident memory with no pair, then with 1 and with 4
# protected pairs of the test guest, and prints a table with the cost per pair against the
# no-pair baseline of the same run. The guests are idle (no client); the QEMUs' own CPU is not
# counted. Needs root (namespaces, bridges, taps). MEASURE=seconds per phase (default 30).
# PROFILE=folder also takes a CPU profile of the agent over each phase (lockstepd --pprof) and
# writes it there as idle-N.pprof (`go tool pprof -top build/bin/lockstepd idle-1.pprof`).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$here/build}
export BUILD
cd "$here"
measure=${MEASURE:-30}

[ "$(id -u)" = 0 ] || { echo "bench-idle needs root: it builds its test LAN out of network namespaces" >&2; exit 1; }
make -s qemu guest >/dev/null
go build -o "$BUILD/bin/" ./cmd/lockstepd ./cmd/lockstepctl
QEMU=$BUILD/bin/qemu11
QEMU_IMG=$BUILD/bin/qemu-img11
guest_out=$(bash integration/guest/build.sh 2>/dev/null)
KERNEL=$(sed -n 's/^kernel=//p' <<<"$guest_out")
INITRD=$(sed -n 's/^initrd=//p' <<<"$guest_out")

work=$(mktemp -d /tmp/lsidle.XXXXXX)
ovl=$(mktemp -d /dev/shm/lsidle.XXXXXX)
ns=lsidle$$
bridge=lsidle0
agent=
cleanup() {
	set +e
	if [ -n "$agent" ]; then
		for i in 1 2 3 4; do ctl delete "p$i" >/dev/null 2>&1; done
		kill -KILL "$agent" 2>/dev/null
	fi
	[ -f "$work/state/_fence.pid" ] && kill -KILL "$(cat "$work/state/_fence.pid")" 2>/dev/null
	for f in "$work"/state/*/*/qemu.pid; do [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null; done
	for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
	ip netns del "$ns" 2>/dev/null
	rm -rf "$work" "$ovl"
}
trap cleanup EXIT

ip netns add "$ns"
ip -n "$ns" link set lo up
ip netns exec "$ns" sh -c 'echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6' 2>/dev/null || true
ip -n "$ns" link add "$bridge" type bridge
ip -n "$ns" link set "$bridge" up
acl=$BUILD/qemu11/root/etc/qemu/bridge.conf
if ! grep -qsE "^allow ($bridge|all)\$" "$acl"; then
	mkdir -p "$(dirname "$acl")"
	echo "allow $bridge" >>"$acl"
fi

profile=${PROFILE:-}
extra=()
if [ -n "$profile" ]; then
	mkdir -p "$profile"
	profile=$(cd "$profile" && pwd)
	ip -n "$ns" link set lo up
	extra=(--metrics-listen 127.0.0.1:9464 --pprof)
fi
ip netns exec "$ns" "$BUILD/bin/lockstepd" --state-dir "$work/state" --overlay-dir "$ovl" --listen "unix://$work/api.sock" "${extra[@]}" \
	>"$work/lockstepd.log" 2>&1 &
agent=$!
ctl() { "$BUILD/bin/lockstepctl" --addr "unix://$work/api.sock" "$@"; }
for _ in $(seq 100); do ctl list >/dev/null 2>&1 && break; sleep 0.1; done

create() { # create PAIR N: the N-th pair, with its own disks, MAC and guest address
	local name=$1 n=$2
	truncate -s 64M "$work/$name-a.raw"
	cat >"$work/$name.yaml" <<YAML
apiVersion: lockstep.dev/v1
kind: Pair
metadata:
  name: $name
spec:
  memory: 128Mi
  vcpus: 1
  accel: tcg
  boot:
    kernel: $KERNEL
    initrd: $INITRD
    cmdline: console=ttyS0 quiet panic=-1 lockstep.ip=10.80.0.$((20 + n))/24
  disk:
    size: 64Mi
  nic: {mac: "52:54:00:80:00:$(printf %02x "$n")", model: e1000, bridge: $bridge}
  qemuCommand: [$QEMU]
  qemuImgCommand: [$QEMU_IMG]
  checkpointDelay: 200ms
  primary: {host: 127.0.0.1, disk: {path: $work/$name-a.raw}}
  secondary: {host: 127.0.0.1, disk: {path: $work/$name-b.raw}}
YAML
	ctl create -f "$work/$name.yaml" >/dev/null
}

wait_protected() { # wait_protected N: until pairs p1..pN are protected
	local n=$1
	for _ in $(seq 1800); do
		local ok=0
		for i in $(seq "$n"); do
			ctl status "p$i" 2>/dev/null | grep -q 'state:.*protected ' && ok=$((ok + 1))
		done
		[ "$ok" = "$n" ] && return 0
		sleep 1
	done
	echo "bench-idle: the pairs were not protected within 30 minutes" >&2
	ctl list >&2
	exit 1
}

hz=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' "/proc/$agent/stat"; }
rss() { awk '/^VmRSS/{print $2}' "/proc/$agent/status"; }
declare -a rows
phase() { # phase N: measure the agent with N protected pairs
	local n=$1 t0 t1
	sleep 5
	t0=$(ticks)
	if [ -n "$profile" ]; then
		ip netns exec "$ns" curl -sf -o "$profile/idle-$n.pprof" "http://127.0.0.1:9464/debug/pprof/profile?seconds=$measure"
	else
		sleep "$measure"
	fi
	t1=$(ticks)
	rows+=("$n $(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s="$measure" 'BEGIN{printf "%.3f", (b-a)/hz/s*100}') $(rss)")
}

phase 0
create p1 1
wait_protected 1
phase 1
for i in 2 3 4; do create "p$i" "$i"; done
wait_protected 4
phase 4

echo
echo "lockstepd's own cost with idle protected pairs ($measure s per phase, $(nproc) cores, QEMU 11.1 under TCG)"
printf '%-6s %12s %18s %10s %16s\n' pairs "CPU % core" "per pair (-base)" "RSS MiB" "RSS per pair"
base_cpu=$(echo "${rows[0]}" | awk '{print $2}')
base_rss=$(echo "${rows[0]}" | awk '{print $3}')
for r in "${rows[@]}"; do
	read -r n cpu kb <<<"$r"
	awk -v n="$n" -v cpu="$cpu" -v kb="$kb" -v bc="$base_cpu" -v br="$base_rss" 'BEGIN{
		if (n == 0) { printf "%-6d %12.3f %18s %10.1f %16s\n", n, cpu, "(baseline)", kb/1024, "(baseline)" }
		else { printf "%-6d %12.3f %18.3f %10.1f %16.1f\n", n, cpu, (cpu-bc)/n, kb/1024, (kb-br)/1024/n } }'
done
