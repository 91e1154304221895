#!/usr/bin/env bash
# `make test`: vet, then every package under the race detector, one package at a time (the QEMU
# tests compete for 2 cores). Each test runs once: a test that fails is a defect to find and
# fix, not to rerun. The policy's property tests run 2,000 checks each (controller's TestMain).
set -euo pipefail
cd "$(dirname "$0")/.."

go vet ./...
go test -race -count=1 -p 1 -timeout 40m ./...
