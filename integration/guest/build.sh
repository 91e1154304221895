#!/usr/bin/env bash
# Builds the lockstep test guest: a Debian 12 kernel and an initramfs holding
# busybox, the kernel modules of the guest's devices, the workload service
# (integration/guest/workload) and /init (integration/guest/init.sh).
#
#   integration/guest/build.sh [OUTDIR]      OUTDIR defaults to $BUILD/guest,
#                                            BUILD to <repo>/build
#
# Everything comes from Debian packages (fetched with apt-get download, so
# verified against the signed apt indexes, and unpacked with dpkg-deb, never
# installed) and from this repository:
#   linux-image-amd64 -> the linux-image-<release>-amd64 it depends on: its
#                        vmlinuz, and the modules e1000 and virtio_net with
#                        virtio_pci (NICs), ata_piix and sd_mod (if=ide disk)
#                        with their dependencies from
#                        modules.dep, which /init loads in dependency order
#   busybox-static    -> the guest's userland, and the depmod and cpio that
#                        build the initramfs on the host
# The host needs apt-get, dpkg-deb, gzip, xz, flock, coreutils and Go (GO or
# PATH or /usr/local/go/bin). xz-utils is installed with apt-get when
# missing; apt-get update runs only when apt does not know the packages. Both
# need root; with the packages known and xz present, no step does.
#
# Two kernels come out: vmlinuz as Debian ships it, and vmlinux, its XZ
# payload decompressed, which QEMU boots through the kernel's PVH entry point
# about 4 s faster under TCG (decompressing at every boot is slow there).
#
# Cache layout (OUTDIR):
#   <key>/                 one build, never changed once complete; <key> is a
#                          hash of the inputs, listed in <key>/inputs.txt: the
#                          package versions, build.sh, init.sh, the Go files of
#                          the workload, the go line of go.mod, the Go version
#     vmlinux              the kernel to boot (-kernel)
#     vmlinuz              Debian's compressed kernel (also bootable)
#     initrd.img           the initramfs (-initrd), newc cpio, gzip
#     kernel-name          which of the two this build boots: vmlinux, or
#                          vmlinuz for a kernel without PVH
#     inputs.txt
#   current -> <key>       the newest build
#   kernel, vmlinuz, initrd.img
#                          stable links through current/
#   debs/                  the downloaded .deb files of the newest build
# A build whose key exists is reused as it is (about 1 s, mostly apt-cache);
# a build with new inputs takes 15 s, or a minute with the 72 MB download and
# a cold Go cache. The three newest builds are kept. Concurrent runs on one
# OUTDIR serialise on OUTDIR/.lock.
#
# On success stdout has exactly two lines, kernel=<path> and initrd=<path>:
# absolute paths inside <key>/, which stay valid until three newer builds
# have replaced it. Progress goes to stderr.
set -euo pipefail

# The kernel modules the guest loads, dependencies added automatically: the NIC
# drivers of both models lockstep supports in tests (e1000, and virtio-net with
# its PCI transport), the disk's.
MODULES=(e1000 virtio_pci virtio_net ata_piix sd_mod)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BUILD=${BUILD:-$REPO/build}
OUT=${1:-$BUILD/guest}

log() { echo "guest: $*" >&2; }
die() {
	echo "guest: error: $*" >&2
	exit 1
}

GO=${GO:-go}
if ! command -v "$GO" >/dev/null; then
	[ -x /usr/local/go/bin/go ] || die "go not found"
	GO=/usr/local/go/bin/go
fi
for c in apt-get apt-cache dpkg dpkg-deb gzip sha256sum flock find touch od dd; do
	command -v "$c" >/dev/null || die "$c not found"
done
[ "$(dpkg --print-architecture)" = amd64 ] || die "the guest is amd64 and is built on an amd64 Debian"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec 9>"$OUT/.lock"
flock 9
# Left by a build that was killed; no build runs while we hold the lock.
rm -rf "$OUT"/.work.*

# --- resolve the inputs ----------------------------------------------------

# candidates: the versions apt would install of linux-image-amd64 and
# busybox-static, and the metapackage's dependencies, as three lines. One
# apt-cache call, since each costs most of a second.
candidates() {
	apt-cache show --no-all-versions linux-image-amd64 busybox-static 2>/dev/null | awk '
		/^Package: / { p = $2 }
		/^Version: / { v[p] = $2 }
		/^Depends: / { sub(/^Depends: /, ""); d[p] = $0 }
		END { print v["linux-image-amd64"]; print d["linux-image-amd64"]; print v["busybox-static"] }'
}
mapfile -t CAND < <(candidates)
if [ -z "${CAND[0]}" ] || [ -z "${CAND[2]}" ]; then
	# A fresh machine has empty package lists.
	log "linux-image-amd64 or busybox-static unknown to apt: apt-get update"
	apt-get update -qq >&2 || die "apt-get update failed (it needs root)"
	mapfile -t CAND < <(candidates)
	[ -n "${CAND[0]}" ] && [ -n "${CAND[2]}" ] || die "linux-image-amd64 or busybox-static not available from apt"
fi
BBVER=${CAND[2]}
# The metapackage depends on exactly one kernel: "linux-image-<release>-amd64 (= <version>)".
KDEP=$(tr ',|' '\n\n' <<<"${CAND[1]}" | sed 's/^ *//' | grep -E '^linux-image-[0-9][^ ]*-amd64 \(= [^)]*\)$' | head -n1) ||
	die "cannot resolve linux-image-amd64 ${CAND[0]} (depends: ${CAND[1]}) to a kernel package"
KPKG=${KDEP%% *}
KVER=${KDEP##*= }
KVER=${KVER%)}
KREL=${KPKG#linux-image-}
ARCH=amd64

workload_files() {
	(cd "$REPO" && "$GO" list -deps -f \
		'{{if not .Standard}}{{$d := .Dir}}{{range .GoFiles}}{{$d}}/{{.}}{{"\n"}}{{end}}{{range .EmbedFiles}}{{$d}}/{{.}}{{"\n"}}{{end}}{{end}}' \
		./integration/guest/workload) | LC_ALL=C sort
}

INPUTS=$(
	echo "kernel $KPKG $KVER"
	echo "busybox-static $BBVER"
	echo "arch $ARCH"
	echo "modules ${MODULES[*]}"
	"$GO" version
	# go.mod only for its language version: the workload's own dependencies,
	# should it ever have any, are among the files that go list reports.
	grep -E '^(go|toolchain) ' "$REPO/go.mod" | sed 's/^/go.mod: /'
	for f in "$HERE/build.sh" "$HERE/init.sh" $(workload_files); do
		echo "$(sha256sum <"$f" | cut -c1-64) ${f#"$REPO"/}"
	done
)
KEY=$(printf '%s\n' "$INPUTS" | sha256sum | cut -c1-16)
FINAL=$OUT/$KEY

publish() {
	ln -sfn "$KEY" "$OUT/.current.tmp"
	mv -T "$OUT/.current.tmp" "$OUT/current"
	ln -sfn current/vmlinuz "$OUT/vmlinuz"
	ln -sfn "current/$(cat "$FINAL/kernel-name")" "$OUT/kernel"
	ln -sfn current/initrd.img "$OUT/initrd.img"
	touch "$FINAL"
	echo "kernel=$FINAL/$(cat "$FINAL/kernel-name")"
	echo "initrd=$FINAL/initrd.img"
}

if [ -f "$FINAL/kernel-name" ] && [ -f "$FINAL/initrd.img" ]; then
	log "up to date: $FINAL ($KPKG $KVER, busybox-static $BBVER)"
	publish
	exit 0
fi

# --- build -----------------------------------------------------------------

log "building $FINAL ($KPKG $KVER, busybox-static $BBVER)"
if ! command -v xz >/dev/null; then
	log "apt-get install xz-utils"
	{ apt-get install -y -qq xz-utils >&2 || { apt-get update -qq >&2 && apt-get install -y -qq xz-utils >&2; }; } ||
		die "cannot install xz-utils (it needs root)"
fi
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

DEBS=$OUT/debs
mkdir -p "$DEBS"
# fetch PKG VERSION: path of the .deb, downloaded unless cached.
fetch() {
	local f="$DEBS/${1}_${2//:/%3a}_$ARCH.deb"
	if [ ! -f "$f" ]; then
		log "apt-get download $1=$2"
		local opts=()
		# As root apt drops to the _apt user, which cannot write here.
		[ "$(id -u)" = 0 ] && opts=(-o APT::Sandbox::User=root)
		(cd "$DEBS" && apt-get download -q "${opts[@]}" "$1=$2" >&2) || die "apt-get download $1=$2 failed"
	fi
	[ -f "$f" ] || die "apt-get download $1=$2 did not produce $f"
	[ "$(dpkg-deb -f "$f" Version)" = "$2" ] || die "$f is not version $2"
	echo "$f"
}
KDEB=$(fetch "$KPKG" "$KVER")
BBDEB=$(fetch busybox-static "$BBVER")

dpkg-deb -x "$BBDEB" "$WORK/bb"
BB=$WORK/bb/bin/busybox
[ -x "$BB" ] || die "no bin/busybox in $BBDEB"
# The whole kernel package (about 400 MB unpacked) so depmod sees every module.
dpkg-deb -x "$KDEB" "$WORK/k"
MODDIR=$WORK/k/lib/modules/$KREL
[ -f "$WORK/k/boot/vmlinuz-$KREL" ] && [ -d "$MODDIR" ] || die "$KDEB lacks vmlinuz or modules of $KREL"
# The package ships no modules.dep: depmod runs at install time.
"$BB" depmod -b "$WORK/k" "$KREL"

# Resolve the modules and their dependencies into load orders: a depth-first
# walk of modules.dep puts each module after everything it depends on.
# Modules that share no dependency form separate groups, which /init loads in
# parallel: the NIC's probe and the disk's probe each spend most of their
# time waiting on emulated hardware.
declare -A DEPS PATHOF
while IFS= read -r line; do
	mod=${line%%:*}
	name=${mod##*/}
	name=${name%%.ko*}
	PATHOF[${name//-/_}]=$mod
	DEPS[$mod]=${line#*:}
done <"$MODDIR/modules.dep"
# closure MOD: MOD and its dependencies, each after its own dependencies.
closure() {
	local -A seen=()
	local order=()
	visit() {
		local d
		[ -z "${seen[$1]:-}" ] || return 0
		seen[$1]=1
		for d in ${DEPS[$1]}; do visit "$d"; done
		order+=("$1")
	}
	visit "$1"
	echo "${order[*]}"
}
MODGROUPS=()
for name in "${MODULES[@]}"; do
	p=${PATHOF[${name//-/_}]:-}
	if [ -z "$p" ]; then
		grep -qE "/${name}\.ko" "$MODDIR/modules.builtin" || die "module $name not found in $KREL"
		log "$name is built into $KREL"
		continue
	fi
	c=$(closure "$p")
	# Merge every group that shares a module with this closure: each group is
	# a complete closure, so the concatenation stays in dependency order.
	merged=""
	rest=()
	for g in "${MODGROUPS[@]}"; do
		shared=0
		for m in $c; do case " $g " in *" $m "*) shared=1 ;; esac; done
		if [ $shared = 1 ]; then merged="$merged $g"; else rest+=("$g"); fi
	done
	for m in $c; do case " $merged " in *" $m "*) ;; *) merged="$merged $m" ;; esac; done
	MODGROUPS=("${rest[@]}" "${merged# }")
done

R=$WORK/root
mkdir -p "$R"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$BB" "$R/bin/busybox"
for applet in $("$BB" --list); do
	[ "$applet" = busybox ] || ln -s busybox "$R/bin/$applet"
done
install -m 0755 "$HERE/init.sh" "$R/init"
# lib/modules/load-order: one line per group, the module files in load order.
for g in "${MODGROUPS[@]}"; do
	line=()
	for mod in $g; do
		base=${mod##*/}
		case "$base" in
		*.ko) cp "$MODDIR/$mod" "$R/lib/modules/$base" ;;
		*.ko.xz) xz -dc "$MODDIR/$mod" >"$R/lib/modules/${base%.xz}" && base=${base%.xz} ;;
		*) die "cannot load compressed module $base" ;;
		esac
		line+=("$base")
	done
	echo "${line[*]}" >>"$R/lib/modules/load-order"
	log "module group: ${line[*]}"
done

log "go build workload"
(cd "$REPO" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 "$GO" build -trimpath -ldflags='-s -w' \
	-o "$R/bin/workload" ./integration/guest/workload) || die "go build of the workload failed"

mkdir "$WORK/out"
# Fixed times and sorted names keep the archive's bytes a function of its inputs.
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | "$BB" cpio -o -H newc -R 0:0) |
	gzip -9n >"$WORK/out/initrd.img"
cp "$WORK/k/boot/vmlinuz-$KREL" "$WORK/out/vmlinuz"
# Decompress the kernel ahead of time: under TCG the bzImage spends about 4 s
# unpacking its XZ payload at every boot. QEMU boots the uncompressed ELF
# through the kernel's PVH entry point (CONFIG_PVH). The payload starts
# payload_offset (setup header, 0x248) bytes after the (setup_sects+1) sectors
# of real-mode setup (setup_sects at 0x1f1) and is payload_length (0x24c) long.
if grep -q '^CONFIG_PVH=y' "$WORK/k/boot/config-$KREL"; then
	bz=$WORK/out/vmlinuz
	setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
	payload=$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
	start=$(((setup_sects + 1) * 512 + payload))
	[ "$(od -An -c -j "$start" -N6 "$bz" | tr -d ' ')" = '3757zXZ\0' ] ||
		die "vmlinuz-$KREL: no XZ payload at offset $start"
	len=$(od -An -tu4 -j $((0x24c)) -N4 "$bz" | tr -d ' ')
	# The payload ends in its 4-byte uncompressed size, which xz ignores
	# with --single-stream.
	dd if="$bz" iflag=skip_bytes,count_bytes skip="$start" count="$len" bs=1M status=none |
		xz -dc --single-stream >"$WORK/out/vmlinux" ||
		die "cannot decompress vmlinuz-$KREL"
	[ "$(od -An -c -N4 "$WORK/out/vmlinux" | tr -d ' ')" = '177ELF' ] ||
		die "vmlinuz-$KREL: payload is not an ELF image"
	KERNEL=vmlinux
else
	log "$KREL lacks CONFIG_PVH: booting the compressed vmlinuz"
	KERNEL=vmlinuz
fi
echo "$KERNEL" >"$WORK/out/kernel-name"
printf '%s\n' "$INPUTS" >"$WORK/out/inputs.txt"
mv "$WORK/out" "$FINAL"
log "initrd.img $(du -k "$FINAL/initrd.img" | cut -f1) KiB, vmlinuz $(du -k "$FINAL/vmlinuz" | cut -f1) KiB"

# Keep the three newest builds, and only the .debs of this one.
kept=0
while IFS= read -r d; do
	[ -f "$d/inputs.txt" ] || continue
	kept=$((kept + 1))
	[ "$kept" -le 3 ] || rm -rf "$d"
done < <(ls -1dt "$OUT"/*/)
find "$DEBS" -name '*.deb' ! -name "${KDEB##*/}" ! -name "${BBDEB##*/}" -delete

publish
