#!/usr/bin/env bash
# Prepares the QEMUs that lockstep's tests, demo and benchmarks use (see DESIGN.md, "Which QEMU"):
#   - Debian 12's own qemu-system-x86 (7.2), installed on the host with apt-get;
#   - QEMU 11.1 from trixie-backports inside a Debian 13 root folder under $BUILD/qemu11/root,
#     run through the launcher $BUILD/bin/qemu11 (unshare -m + chroot, with /dev, /proc, /sys,
#     /tmp and the project's build folder bind-mounted at the same paths inside).
# Reused when present; `FORCE=1` rebuilds the root. Needs root for apt-get, debootstrap and chroot.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$here/build}
ROOT=$BUILD/qemu11/root
BIN=$BUILD/bin
QEMU11_PKG_VERSION=${QEMU11_PKG_VERSION:-}   # empty: newest in trixie-backports
mkdir -p "$BIN"

log() { printf 'qemu.sh: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
	log "needs root (apt-get, debootstrap, chroot); run it as root or with sudo"
	exit 1
fi

# The Debian mirror this machine is configured for; never hard-coded here.
mirror() {
	local m
	m=$( (grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null || true) |
		awk '{print $2}' | grep -E '/debian/?$' | head -n1)
	if [ -z "$m" ]; then
		m=$( (grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null || true) |
			awk '{print $2}' | grep -E '/debian/?$' | head -n1)
	fi
	[ -n "$m" ] || { log "no Debian mirror found in /etc/apt sources"; exit 1; }
	printf '%s\n' "${m%/}"
}

need_host=()
for p in qemu-system-x86 qemu-utils debootstrap; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_host+=("$p")
done
if [ ${#need_host[@]} -gt 0 ]; then
	log "installing on the host: ${need_host[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_host[@]}" >&2
fi
ln -sf "$(command -v qemu-system-x86_64)" "$BIN/qemu72"
ln -sf "$(command -v qemu-img)" "$BIN/qemu-img72"

if [ -n "${FORCE:-}" ]; then rm -rf "$BUILD/qemu11"; fi
if [ ! -f "$ROOT/.lockstep-ready" ]; then
	M=$(mirror)
	rm -rf "$ROOT"
	mkdir -p "$ROOT"
	log "debootstrap trixie into $ROOT (mirror from this machine's apt sources)"
	debootstrap --variant=minbase trixie "$ROOT" "$M" >"$BUILD/qemu11/debootstrap.log" 2>&1 || {
		tail -20 "$BUILD/qemu11/debootstrap.log" >&2; exit 1; }
	cat >"$ROOT/etc/apt/sources.list" <<SRC
deb $M trixie main
deb $M trixie-backports main
SRC
	log "installing qemu-system-x86 and qemu-utils from trixie-backports"
	chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get update >&2
	pkgs=(qemu-system-x86 qemu-utils)
	if [ -n "$QEMU11_PKG_VERSION" ]; then pkgs=("qemu-system-x86=$QEMU11_PKG_VERSION" "qemu-utils=$QEMU11_PKG_VERSION"); fi
	chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y --no-install-recommends -t trixie-backports "${pkgs[@]}" >&2
	chroot "$ROOT" apt-get clean
	touch "$ROOT/.lockstep-ready"
fi

# The launcher: a private mount namespace in which the host's /dev, /proc, /sys, /tmp and the build
# folder appear at the same paths inside the root, so sockets and images keep their paths. `exec`
# all the way down keeps the PID of the launcher the PID of QEMU, so tests kill QEMU by that PID.
# LOCKSTEP_QEMU_BIND adds colon-separated folders to bind.
write_launcher() { # name, program inside the root
	cat >"$BIN/$1" <<LAUNCH
#!/bin/sh
# Runs $2 from the QEMU 11 root at $ROOT (made by scripts/qemu.sh).
exec unshare -m --propagation private -- /bin/sh -c '
root=\$1; shift; prog=\$1; shift
for d in /dev /proc /sys /tmp "$BUILD" \$(echo "\${LOCKSTEP_QEMU_BIND:-}" | tr ":" " "); do
	[ -d "\$d" ] || continue
	mkdir -p "\$root\$d" && mount --rbind "\$d" "\$root\$d" || exit 125
done
exec chroot "\$root" "\$prog" "\$@"' lockstep-qemu11 "$ROOT" "$2" "\$@"
LAUNCH
	chmod +x "$BIN/$1"
}
write_launcher qemu11 /usr/bin/qemu-system-x86_64
write_launcher qemu-img11 /usr/bin/qemu-img

log "QEMU 7.2:  $BIN/qemu72 -> $("$BIN/qemu72" --version | head -n1)"
log "QEMU 11.x: $BIN/qemu11 -> $("$BIN/qemu11" --version | head -n1)"
