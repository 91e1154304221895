# lockstep: see README.md. Every target installs what it needs (as root on Debian 12).
SHELL := /bin/bash
BUILD ?= $(CURDIR)/build
export BUILD
GO ?= go
STATICCHECK_VERSION ?= v0.8.2
TOOLS := $(BUILD)/tools

.PHONY: all build test unit lint qemu guest bench bench-idle fuzz clean proto demo install uninstall fuzz-spec

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
# table (throughput, checkpoint pauses, failover times) on QEMU 11.1 with the test guest, then
# the cost of encrypted replication (TLS against plaintext in the same run).
bench: qemu guest
	$(GO) test -run '^$$' -bench . -benchtime 2000x -count 3 ./qmp/
	$(GO) test -run '^$$' -bench BenchmarkColo -benchtime 1x -timeout 30m ./integration/
	$(GO) test -run '^$$' -bench BenchmarkReplicationTLS -benchtime 1x -timeout 30m ./integration/
	bash scripts/bench-idle.sh

# lockstepd's own CPU and memory with 0, 1 and 4 idle protected pairs (see scripts/bench-idle.sh).
bench-idle: qemu guest
	bash scripts/bench-idle.sh

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecode -fuzztime 60s ./qmp/

# The pair spec's decoding and validation (its seed corpus runs with every go test).
fuzz-spec:
	$(GO) test -run '^$$' -fuzz FuzzDecode -fuzztime 60s ./pairspec/

# Regenerate the gRPC code from proto/ (CI checks it with scripts/proto.sh --check --lint).
proto:
	bash scripts/proto.sh

# A protected pair on this machine, failed over while a client writes (see scripts/demo.sh).
demo:
	bash scripts/demo.sh

clean:
	rm -rf $(BUILD)/bin $(BUILD)/tools

# Install lockstepd and lockstepctl, lockstepd's systemd unit, its default configuration
# (never over one already there) and lockstepctl's completions for bash, zsh and fish. DESTDIR
# is honoured; the state goes to /var/lib/lockstep (the unit's StateDirectory).
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
DATADIR ?= $(PREFIX)/share
DOCDIR ?= $(DATADIR)/doc/lockstep

install:
	@set -euo pipefail; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(GO) build -o "$$tmp/" ./cmd/lockstepd ./cmd/lockstepctl; \
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(SYSCONFDIR)/lockstep" "$(DESTDIR)$(DOCDIR)" \
		"$(DESTDIR)$(DATADIR)/bash-completion/completions" "$(DESTDIR)$(DATADIR)/zsh/site-functions" \
		"$(DESTDIR)$(DATADIR)/fish/vendor_completions.d"; \
	install -m 0755 "$$tmp/lockstepd" "$$tmp/lockstepctl" "$(DESTDIR)$(BINDIR)/"; \
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' \
		packaging/systemd/lockstepd.service.in > "$$tmp/lockstepd.service"; \
	install -m 0644 "$$tmp/lockstepd.service" "$(DESTDIR)$(UNITDIR)/lockstepd.service"; \
	if [ -e "$(DESTDIR)$(SYSCONFDIR)/lockstep/lockstepd.yaml" ]; then \
		echo "keeping $(DESTDIR)$(SYSCONFDIR)/lockstep/lockstepd.yaml"; \
	else install -m 0644 packaging/lockstepd.yaml "$(DESTDIR)$(SYSCONFDIR)/lockstep/lockstepd.yaml"; fi; \
	install -m 0644 README.md "$(DESTDIR)$(DOCDIR)/README.md"; \
	"$$tmp/lockstepctl" completion bash > "$(DESTDIR)$(DATADIR)/bash-completion/completions/lockstepctl"; \
	"$$tmp/lockstepctl" completion zsh > "$(DESTDIR)$(DATADIR)/zsh/site-functions/_lockstepctl"; \
	"$$tmp/lockstepctl" completion fish > "$(DESTDIR)$(DATADIR)/fish/vendor_completions.d/lockstepctl.fish"; \
	echo "installed under $(DESTDIR)$(PREFIX); then: systemctl daemon-reload && systemctl enable --now lockstepd"

# Remove what install put in place, except the configuration and the state.
uninstall:
	rm -f "$(DESTDIR)$(BINDIR)/lockstepd" "$(DESTDIR)$(BINDIR)/lockstepctl" "$(DESTDIR)$(UNITDIR)/lockstepd.service" \
		"$(DESTDIR)$(DOCDIR)/README.md" "$(DESTDIR)$(DATADIR)/bash-completion/completions/lockstepctl" \
		"$(DESTDIR)$(DATADIR)/zsh/site-functions/_lockstepctl" "$(DESTDIR)$(DATADIR)/fish/vendor_completions.d/lockstepctl.fish"
