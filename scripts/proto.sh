#!/usr/bin/env bash
# Generates the Go code of lockstep's gRPC API: for every proto/**/*.proto, the *.pb.go and
# *_grpc.pb.go files next to it, which are committed. The tools are pinned so that the output is
# reproducible:
#   - protoc 3.21 from Debian 12 (protobuf-compiler; libprotobuf-dev has the well-known types
#     such as google/protobuf/duration.proto), installed with apt-get when missing (needs root);
#   - protoc-gen-go at the version of google.golang.org/protobuf in go.mod, protoc-gen-go-grpc
#     and buf at the versions below, installed with `go install` into $BUILD/tools.
#
# Usage:
#   bash scripts/proto.sh            regenerate the committed files (make proto)
#   bash scripts/proto.sh --check    regenerate into a temporary folder and fail when the
#                                    committed files differ (CI); runs buf lint when buf is
#                                    installed
#   bash scripts/proto.sh --lint     also install buf when missing and run `buf lint proto`
#                                    (the first install builds buf: a few minutes); combines
#                                    with --check
# Environment: BUILD (default <repo>/build), PROTOC_GEN_GO_VERSION, PROTOC_GEN_GO_GRPC_VERSION,
# BUF_VERSION, PROTOC_INCLUDE (default /usr/include).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
BUILD=${BUILD:-$here/build}
TOOLS=$BUILD/tools
GO=${GO:-go}
PROTO_DIR=$here/proto
PROTOC_INCLUDE=${PROTOC_INCLUDE:-/usr/include}
PROTOC_WANT=${PROTOC_WANT:-3.21.}   # Debian 12's protoc; its version is written into *.pb.go
PROTOC_GEN_GO_GRPC_VERSION=${PROTOC_GEN_GO_GRPC_VERSION:-v1.6.2}
BUF_VERSION=${BUF_VERSION:-v1.75.0}

log() { printf 'proto.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

check=0 lint=0
for arg in "$@"; do
	case $arg in
	--check) check=1 ;;
	--lint) lint=1 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument $arg (want --check and/or --lint)" ;;
	esac
done

# protoc-gen-go follows the protobuf runtime the module uses, so the generated code matches it.
if [ -z "${PROTOC_GEN_GO_VERSION:-}" ]; then
	PROTOC_GEN_GO_VERSION=$($GO list -m -f '{{.Version}}' google.golang.org/protobuf 2>/dev/null) ||
		die "google.golang.org/protobuf is not in go.mod; add it with go get"
fi

# --- protoc and the well-known types -----------------------------------------------------------
need_pkgs=()
command -v protoc >/dev/null 2>&1 || need_pkgs+=(protobuf-compiler)
[ -f "$PROTOC_INCLUDE/google/protobuf/duration.proto" ] || need_pkgs+=(libprotobuf-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || die "missing ${need_pkgs[*]}: run as root, or apt-get install ${need_pkgs[*]}"
	log "installing ${need_pkgs[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2; then
		apt-get update >&2
		apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2
	fi
fi
protoc_version=$(protoc --version | awk '{print $2}')
case $protoc_version in
"$PROTOC_WANT"*) ;;
*) log "warning: protoc $protoc_version, not $PROTOC_WANT* (Debian 12): the version line in the generated files will differ" ;;
esac

# --- Go plugins and buf, pinned, in $BUILD/tools -------------------------------------------------
mkdir -p "$TOOLS"
# install BIN PACKAGE VERSION VERSION_OUTPUT: go install PACKAGE@VERSION unless $TOOLS/BIN already
# prints VERSION_OUTPUT for --version.
install_tool() {
	local bin=$1 pkg=$2 version=$3 want=$4 have
	have=$("$TOOLS/$bin" --version 2>/dev/null || true)
	if [ "$have" != "$want" ]; then
		log "installing $pkg@$version into $TOOLS"
		GOBIN=$TOOLS $GO install "$pkg@$version"
		have=$("$TOOLS/$bin" --version 2>/dev/null || true)
		[ "$have" = "$want" ] || die "$TOOLS/$bin --version says '$have', want '$want'"
	fi
}
install_tool protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go \
	"$PROTOC_GEN_GO_VERSION" "protoc-gen-go $PROTOC_GEN_GO_VERSION"
install_tool protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc \
	"$PROTOC_GEN_GO_GRPC_VERSION" "protoc-gen-go-grpc ${PROTOC_GEN_GO_GRPC_VERSION#v}"

buf=""
if [ "$lint" = 1 ]; then
	install_tool buf github.com/bufbuild/buf/cmd/buf "$BUF_VERSION" "${BUF_VERSION#v}"
fi
if [ "$("$TOOLS/buf" --version 2>/dev/null || true)" = "${BUF_VERSION#v}" ]; then
	buf=$TOOLS/buf
elif command -v buf >/dev/null 2>&1; then
	buf=$(command -v buf)
	log "note: using $buf ($("$buf" --version 2>&1)), not the pinned $BUF_VERSION"
fi

# --- generate ---------------------------------------------------------------------------------
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mapfile -t protos < <(cd "$PROTO_DIR" && find . -name '*.proto' -not -path './google/*' | sed 's|^\./||' | LC_ALL=C sort)
[ ${#protos[@]} -gt 0 ] || die "no .proto files under $PROTO_DIR"
log "protoc $protoc_version, protoc-gen-go $PROTOC_GEN_GO_VERSION, protoc-gen-go-grpc $PROTOC_GEN_GO_GRPC_VERSION: ${protos[*]}"
(
	cd "$PROTO_DIR"
	protoc -I . -I "$PROTOC_INCLUDE" \
		--plugin=protoc-gen-go="$TOOLS/protoc-gen-go" \
		--plugin=protoc-gen-go-grpc="$TOOLS/protoc-gen-go-grpc" \
		--go_out="$tmp" --go_opt=paths=source_relative \
		--go-grpc_out="$tmp" --go-grpc_opt=paths=source_relative \
		"${protos[@]}"
)

# The generated files: those protoc just wrote, and those committed under proto/.
(cd "$tmp" && find . -name '*.pb.go' | sed 's|^\./||' | LC_ALL=C sort) >"$tmp.new"
(cd "$PROTO_DIR" && find . -name '*.pb.go' | sed 's|^\./||' | LC_ALL=C sort) >"$tmp.old"
trap 'rm -rf "$tmp" "$tmp.new" "$tmp.old"' EXIT

status=0
if [ "$check" = 1 ]; then
	stale=0
	if ! diff -u --label committed --label generated "$tmp.old" "$tmp.new" >"$tmp.diff"; then
		log "the set of generated files differs (- committed, + generated):"
		sed -n '3,$p' "$tmp.diff" >&2
		stale=1
	fi
	while read -r f; do
		[ -f "$PROTO_DIR/$f" ] || continue
		if ! diff -u --label "proto/$f (committed)" --label "proto/$f (generated)" \
			"$PROTO_DIR/$f" "$tmp/$f" >"$tmp.diff"; then
			log "proto/$f differs from what its .proto generates:"
			head -n 100 "$tmp.diff" >&2
			stale=1
		fi
	done <"$tmp.new"
	rm -f "$tmp.diff"
	if [ "$stale" = 1 ]; then
		log "FAIL: the committed generated code is not what proto/ generates."
		log "      Run 'make proto' (bash scripts/proto.sh) and commit the result."
		status=1
	else
		log "ok: the committed generated code is up to date"
	fi
else
	while read -r f; do rm -f "$PROTO_DIR/$f"; done <"$tmp.old"
	while read -r f; do
		mkdir -p "$(dirname "$PROTO_DIR/$f")"
		cp "$tmp/$f" "$PROTO_DIR/$f"
	done <"$tmp.new"
	log "wrote $(tr '\n' ' ' <"$tmp.new")under proto/"
fi

# --- lint -------------------------------------------------------------------------------------
if [ -n "$buf" ]; then
	export BUF_CACHE_DIR=${BUF_CACHE_DIR:-$BUILD/buf-cache}
	if (cd "$here" && "$buf" lint proto); then
		log "ok: buf lint proto"
	else
		log "FAIL: buf lint proto (rules in proto/buf.yaml)"
		status=1
	fi
else
	log "buf not installed: skipping buf lint (run with --lint to install buf $BUF_VERSION)"
fi
exit $status
