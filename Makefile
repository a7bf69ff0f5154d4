# pgs2 — see README.md.
GO      ?= go
BIN     := bin
SERVICES := capture router delivery s2local pgs2ctl
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: all build test soak scale bench lint proto run run-clean clean image

all: build

build:
	@mkdir -p $(BIN)
	@for s in $(SERVICES); do $(GO) build -trimpath -o $(BIN)/$$s ./services/$$s || exit 1; done

# Every test: unit, integration (real PostgreSQL + JetStream) and fault tests.
test:
	@scripts/ensure-postgres.sh
	$(GO) test -count=1 -timeout 30m ./...

# The soak test for 5 minutes (make test runs it for 60s): two sources,
# every service SIGKILLed and restarted, NATS restarts, S2 storms, parks;
# PGS2_SOAK_SEED replays a seed.
soak:
	PGS2_SOAK=5m $(GO) test -count=1 -timeout 60m -run 'TestSoak' -v ./soak/

# 10,000 S2 streams, 3 delivery processes: idle cost and takeover (make
# test runs 300; see docs/benchmarks.md).
scale:
	PGS2_SCALE_STREAMS=10000 $(GO) test -count=1 -timeout 40m -run 'TestScaleStreams' -v ./pkg/delivery/

# Benchmarks (see docs/benchmarks.md).
bench: build
	PGS2_BENCH=1 $(GO) test -count=1 -timeout 120m -run 'Bench' -v ./bench/...

lint:
	$(GO) vet ./...
	@out=$$(gofmt -l . | grep -v '^proto/.*\.pb\.go$$'); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

proto:
	scripts/gen-proto.sh

# The whole pipeline on one machine (state in .run/; see README.md). Flags go
# in RUN_ARGS, e.g. make run RUN_ARGS='--nats-port 14222'.
RUN_ARGS ?=
run: build
	@scripts/ensure-postgres.sh
	@$(GO) build -trimpath -o $(BIN)/pgs2-run ./scripts/run
	@$(BIN)/pgs2-run $(RUN_ARGS)

# make run from scratch: removes .run/'s contents first.
run-clean: build
	@scripts/ensure-postgres.sh
	@$(GO) build -trimpath -o $(BIN)/pgs2-run ./scripts/run
	@$(BIN)/pgs2-run --clean $(RUN_ARGS)

clean:
	rm -rf $(BIN)

# The pgs2 image from binaries built here, on a scratch base (no image is
# pulled): make image IMAGE=pgs2:dev. docker compose builds deploy/Dockerfile.
IMAGE ?= pgs2:dev
image:
	@scripts/build-image.sh $(IMAGE)
