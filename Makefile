# hwkms: `make run` serves a dev KMS v2 socket; `make test` runs every test.
GO      ?= go
BACKEND ?= pkcs11
SOCKET  ?= ./.dev/kms.sock
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
export CGO_ENABLED := 1
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: all deps build run test test-unit test-api vet fmt-check bench clean fuzz-short soak

all: build

deps:
	@./.ci/deps.sh

build:
	$(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o bin/hwkms ./cmd/hwkms

## run: build and serve KMS v2 on a throwaway dev token (Ctrl-C to stop)
run: deps build
	./bin/hwkms dev --backend $(BACKEND) --socket $(SOCKET)

## test: formatting, vet, unit and device tests with -race (with the 30 s soak), the fuzzers' short runs, then the apiserver-client suite
test: deps fmt-check vet test-unit fuzz-short test-api

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...
	@if [ -f test/go.mod ]; then cd test && $(GO) vet ./...; fi

test-unit:
	$(GO) test -race -count=1 ./...

test-api:
	@if [ -f test/go.mod ]; then cd test && $(GO) test -race -count=1 -timeout 20m ./...; fi

# Each fuzz target, run for FUZZTIME (go test -fuzz takes one target per run). Seed
# corpora live in <pkg>/testdata/fuzz/<FuzzName>/ and also run in test-unit.
FUZZTIME ?= 10s
FUZZ_TARGETS = ./plugin:FuzzParseFrame ./plugin:FuzzDecrypt ./plugin/config:FuzzParse ./hsm:FuzzUnwrap ./tpm:FuzzDecodeObject

## fuzz-short: run every fuzzer for FUZZTIME (10 s each)
fuzz-short:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$name ($$pkg) for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg; \
	done

SOAK ?= 10m

## soak: the long soak (64 clients, faults every few seconds) for SOAK (10 min)
soak:
	HWKMS_SOAK=$(SOAK) $(GO) test -race -count=1 -run '^TestSoak$$' -timeout 2h -v ./hsm/

## bench: floors (raw PKCS#11, raw TPM, bare gRPC, AES-GCM) and hwkms on SoftHSM2 and
## swtpm under load, side by side in one table with the DESIGN.md section 6 targets;
## raw outputs in .bench/ (docs/BENCHMARKS.md)
BENCH_DURATION ?= 3s
bench: deps build
	@$(GO) run ./cmd/benchtable --hwkms bin/hwkms --go $(GO) --out .bench --duration $(BENCH_DURATION)

clean:
	rm -rf bin .dev .bench
