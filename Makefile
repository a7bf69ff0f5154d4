# pgs2 — see README.md.
GO      ?= go
BIN     := bin
SERVICES := capture router delivery s2local pgs2ctl
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: all build test bench lint proto run clean

all: build

build:
	@mkdir -p $(BIN)
	@for s in $(SERVICES); do $(GO) build -trimpath -o $(BIN)/$$s ./services/$$s || exit 1; done

# Every test: unit, integration (real PostgreSQL + JetStream) and fault tests.
test:
	$(GO) test -count=1 -timeout 30m ./...

# Benchmarks (see docs/benchmarks.md).
bench: build
	PGS2_BENCH=1 $(GO) test -count=1 -timeout 60m -run 'Bench' -v ./bench/...

lint:
	$(GO) vet ./...
	@out=$$(gofmt -l . | grep -v '^proto/.*\.pb\.go$$'); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

proto:
	scripts/gen-proto.sh

run:
	@echo "make run: not yet — the whole-pipeline runner lands with issue 9; see README.md"

clean:
	rm -rf $(BIN)
