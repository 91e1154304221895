#!/usr/bin/env bash
# `make test`: vet, then every package under the race detector, one package at a time (the QEMU
# tests compete for 2 cores).
#
# Reruns: a failed integration test is run up to three more times, every outcome printed; a
# fourth failure fails the run. They date from the survivor's guest kernel oopsing after
# failovers (in libata, e1000, sd, fsync or the timer), which CI hit in every attempt of the
# two-host fast-path and host-loss tests with Debian's 6.1.192 guest kernel. Its cause, found
# on 2026-12-01: COLO started while the guest kernel booted left the secondary's memory
# corrupt (the secondary oopsed during COLO, before any failover). Since a TCG primary waits
# out tunables.boot_settle (15 s) before its first protection, three full runs here needed one
# rerun between them, for a test race since fixed, and none for a guest crash. The reruns stay
# as a net: a rerun printed here is a defect to chase, not noise.
set -uo pipefail
cd "$(dirname "$0")/.."

go vet ./... || exit 1
pkgs=$(go list ./... | grep -v '/integration$')
go test -race -count=1 -p 1 -timeout 25m $pkgs || exit 1

out=$(mktemp)
trap 'rm -f "$out"' EXIT
go test -race -count=1 -timeout 25m ./integration/ 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
# Up to three reruns of only the tests that failed, each printed; a test that fails four times
# fails the run.
for attempt in 1 2 3; do
	[ "$rc" -eq 0 ] && break
	failed=$(grep -E '^--- FAIL: ' "$out" | awk '{print $3}' | sort -u | paste -sd'|' -)
	if [ -z "$failed" ]; then
		exit "$rc"
	fi
	echo
	echo "=== RERUN $attempt of 3 of failed integration tests ($failed): see the note on reruns in scripts/test.sh"
	go test -race -count=1 -timeout 20m -run "^(${failed})\$" ./integration/ 2>&1 | tee "$out"
	rc=${PIPESTATUS[0]}
done
exit "$rc"
