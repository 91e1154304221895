# lockstep: see README.md. Every target installs what it needs (as root on Debian 12).
SHELL := /bin/bash
BUILD ?= $(CURDIR)/build
export BUILD
GO ?= go
STATICCHECK_VERSION ?= v0.8.2
TOOLS := $(BUILD)/tools

.PHONY: all build test unit lint qemu guest bench fuzz clean proto demo

all: build

build:
	$(GO) build ./...
	@if ls cmd/*/*.go >/dev/null 2>&1; then $(GO) build -o $(BUILD)/bin/ ./cmd/...; fi

# Everything CI runs: the QEMUs and the guest are prepared first (cached under $(BUILD)), then
# every package, integration tests included, under the race detector. Fuzz seed corpora run as
# ordinary tests.
test: qemu guest
	bash scripts/test.sh

# Unit tests only: no QEMU needed.
unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /integration)

$(TOOLS)/staticcheck:
	GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

lint: $(TOOLS)/staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(TOOLS)/staticcheck ./...

# QEMU 7.2 (Debian 12) and QEMU 11.1 (a Debian 13 root with trixie-backports) for the tests.
qemu:
	bash scripts/qemu.sh

# The test guest: kernel and initramfs from Debian packages plus our workload program.
guest:
	bash integration/guest/build.sh

# The QMP client against the raw socket floor and go-qemu on both real QEMUs, then the COLO
# table (throughput, checkpoint pauses, failover times) on QEMU 11.1 with the test guest.
bench: qemu guest
	$(GO) test -run '^$$' -bench . -benchtime 2000x -count 3 ./qmp/
	$(GO) test -run '^$$' -bench BenchmarkColo -benchtime 1x -timeout 30m ./integration/

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecode -fuzztime 60s ./qmp/

# Regenerate the gRPC code from proto/ (CI checks it with scripts/proto.sh --check --lint).
proto:
	bash scripts/proto.sh

# A protected pair on this machine, failed over while a client writes (see scripts/demo.sh).
demo:
	bash scripts/demo.sh

clean:
	rm -rf $(BUILD)/bin $(BUILD)/tools
