#!/bin/sh
# /init of the lockstep test guest (busybox ash, PID 1). build.sh copies it
# into the initramfs. It loads the disk and NIC modules, configures the
# network from the kernel command line and runs the workload service forever.
#
# Kernel command line parameters (all optional):
#   lockstep.ip=10.0.2.15/24   address of eth0
#   lockstep.gw=10.0.2.2       default gateway
#   lockstep.port=7777         TCP port of the workload service
# Console lines starting with "lockstep-guest:" are markers for tests.

export PATH=/bin
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console of its own (building it must not need
# root for mknod), so the kernel started us without stdio: attach it now.
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "lockstep-guest: init started, kernel $(uname -r)"

IP=10.0.2.15/24
GW=10.0.2.2
PORT=7777
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	lockstep.ip=*) IP=${arg#*=} ;;
	lockstep.gw=*) GW=${arg#*=} ;;
	lockstep.port=*) PORT=${arg#*=} ;;
	esac
done

# net_up configures eth0 once its driver is loaded.
net_up() {
	# No IPv6: its multicast joins rewrite the NIC's receive control
	# register, and QEMU's e1000 receives nothing for 1 s after every such
	# write.
	echo 1 >/proc/sys/net/ipv6/conf/eth0/disable_ipv6
	ip link set eth0 up
	# The e1000 driver's probe restarts autonegotiation, which QEMU completes
	# 500 ms later (at once with the device option autonegotiation=off). An
	# interface brought up before that notices its link only at the driver's
	# next watchdog run, 2 s later: the link-change interrupt cannot advance
	# a watchdog already scheduled. So if the link is not up right away,
	# take the interface down (which restarts autonegotiation) and bring it
	# up again once autonegotiation is over: that costs 0.7 s, not 2.
	i=0
	while [ "$(cat /sys/class/net/eth0/carrier)" != 1 ] && [ $i -lt 4 ]; do
		sleep 0.05
		i=$((i + 1))
	done
	if [ "$(cat /sys/class/net/eth0/carrier)" != 1 ]; then
		ip link set eth0 down
		sleep 0.6
		ip link set eth0 up
	fi
	ip addr add "$IP" dev eth0
	ip route add default via "$GW" dev eth0 || echo "lockstep-guest: no route via $GW"
	# Announce our address (gratuitous ARP): QEMU's user network then knows
	# our MAC and forwards the first connection without resolving it first.
	arping -q -U -c 1 -I eth0 "${IP%/*}"
	echo "lockstep-guest: network eth0 $IP gw $GW"
}

ip link set lo up
# One line per group of modules, each in dependency order as build.sh resolved
# them from modules.dep. Groups share no module, so they load in parallel, and
# the NIC's group goes on to configure the network. The workload does not wait
# for them: it waits for its disk itself and listens on every address.
while read -r group; do
	(
		for mod in $group; do
			insmod "/lib/modules/$mod" || echo "lockstep-guest: insmod $mod failed"
		done
		echo "lockstep-guest: loaded $group"
		# The NIC is an e1000 or a virtio-net: whichever driver's group sees eth0
		# first configures it, once (mkdir is atomic).
		case " $group " in *" e1000.ko "* | *" virtio_net.ko "*)
			[ -e /sys/class/net/eth0 ] && mkdir /tmp/net-up 2>/dev/null && net_up ;;
		esac
	) &
done </lib/modules/load-order

# Respawn the workload: a test may kill it on purpose, and PID 1 must never
# exit (that would panic the kernel).
while :; do
	/bin/workload -listen ":$PORT" -disk /dev/sda
	echo "lockstep-guest: workload exited with status $?, restarting in 1s"
	sleep 1
done
