# hwkms: `make run` serves a dev KMS v2 socket; `make test` runs every test.
GO      ?= go
BACKEND ?= pkcs11
SOCKET  ?= ./.dev/kms.sock
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
COMMIT  ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
export CGO_ENABLED := 1
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: all deps build run test test-unit test-api vet fmt-check bench clean fuzz-short soak e2e e2e-scale e2e-tools \
	tools package image dist sums

all: build

deps:
	@./.ci/deps.sh

build:
	$(GO) build -trimpath -ldflags "-X main.version=$(VERSION) -X main.commit=$(COMMIT)" -o bin/hwkms ./cmd/hwkms

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
FUZZ_TARGETS = ./plugin:FuzzParseFrame ./plugin:FuzzDecrypt ./plugin/config:FuzzParse ./hsm:FuzzUnwrap ./tpm:FuzzDecodeObject ./tpm:FuzzParseImportBlob ./plugin/audit:FuzzClassify ./tpm:FuzzExecFastResponse

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

## bench: floors (raw PKCS#11, raw TPM, bare gRPC, AES-GCM, an in-memory KEK behind the
## real plugin) and hwkms on SoftHSM2 and swtpm (both TPM KEK kinds) under load, with the
## targets of docs/contract.md; each PKCS#11 mechanism served at concurrency 1 beside its
## raw KEK op (hwkms dev --dev-mechanism); restart storms on swtpm at a discrete TPM's
## speed (tpm/swtpm/latency); raw outputs in .bench/ (docs/BENCHMARKS.md)
BENCH_DURATION ?= 3s
bench: deps build
	@$(GO) run ./cmd/benchtable --hwkms bin/hwkms --go $(GO) --out .bench --duration $(BENCH_DURATION)

## e2e: real kube-apiserver and etcd store Secrets through bin/hwkms on SoftHSM2 and swtpm.
## kube-apiserver, etcd, kubectl and kube-controller-manager (its storage-version-migrator
## controller runs the StorageVersionMigrations of the rotation test) are built from
## test/e2e/go.mod (cold: ~10 min, of which ~2 min for the 360 packages only
## kube-controller-manager needs; then cached in test/e2e/bin under their versions).
## E2E_RUN='^TestKeyRotation$$' runs only the tests it matches (go test -run). `make e2e-scale` runs the 12,000-Secret experiment instead.
E2E_DIR        := test/e2e
K8S_VERSION     = $(shell cd $(E2E_DIR) && $(GO) list -m -f '{{.Version}}' k8s.io/kubernetes)
ETCD_VERSION    = $(shell cd $(E2E_DIR) && $(GO) list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
KUBE_APISERVER  = $(E2E_DIR)/bin/kube-apiserver-$(K8S_VERSION)
ETCD            = $(E2E_DIR)/bin/etcd-$(ETCD_VERSION)
KUBECTL         = $(E2E_DIR)/bin/kubectl-$(K8S_VERSION)
KUBE_CONTROLLER_MANAGER = $(E2E_DIR)/bin/kube-controller-manager-$(K8S_VERSION)
K8S_MINOR       = $(word 2,$(subst ., ,$(K8S_VERSION)))
K8S_LDFLAGS     = -X k8s.io/component-base/version.gitVersion=$(K8S_VERSION) \
                  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(K8S_MINOR)
E2E_ENV         = E2E_HWKMS=$(CURDIR)/bin/hwkms E2E_KUBE_APISERVER=$(CURDIR)/$(KUBE_APISERVER) \
                  E2E_ETCD=$(CURDIR)/$(ETCD) E2E_KUBECTL=$(CURDIR)/$(KUBECTL) \
                  E2E_KUBE_CONTROLLER_MANAGER=$(CURDIR)/$(KUBE_CONTROLLER_MANAGER) \
                  E2E_KUBE_VERSION=$(K8S_VERSION)
E2E_GOFLAGS    ?= -p 2
E2E_RUN        ?=

e2e: deps build e2e-tools
	cd $(E2E_DIR) && $(GO) vet ./...
	cd $(E2E_DIR) && $(E2E_ENV) $(GO) test -count=1 -timeout 30m -v $(if $(E2E_RUN),-run '$(E2E_RUN)') ./...

e2e-scale: deps build e2e-tools
	cd $(E2E_DIR) && E2E_SCALE=1 $(E2E_ENV) $(GO) test -count=1 -timeout 90m -v -run '^TestScale' ./...

e2e-tools:
	@test -x $(KUBE_APISERVER) || { echo "building $(KUBE_APISERVER) (cold: ~10 min)"; \
	  cd $(E2E_DIR) && CGO_ENABLED=0 $(GO) build $(E2E_GOFLAGS) -trimpath -ldflags "$(K8S_LDFLAGS)" \
	    -o bin/kube-apiserver-$(K8S_VERSION).tmp k8s.io/kubernetes/cmd/kube-apiserver && \
	  mv bin/kube-apiserver-$(K8S_VERSION).tmp bin/kube-apiserver-$(K8S_VERSION); }
	@test -x $(ETCD) || { echo "building $(ETCD)"; \
	  cd $(E2E_DIR) && CGO_ENABLED=0 $(GO) build $(E2E_GOFLAGS) -trimpath \
	    -o bin/etcd-$(ETCD_VERSION).tmp go.etcd.io/etcd/server/v3 && \
	  mv bin/etcd-$(ETCD_VERSION).tmp bin/etcd-$(ETCD_VERSION); }
	@test -x $(KUBECTL) || { echo "building $(KUBECTL)"; \
	  cd $(E2E_DIR) && CGO_ENABLED=0 $(GO) build $(E2E_GOFLAGS) -trimpath -ldflags "$(K8S_LDFLAGS)" \
	    -o bin/kubectl-$(K8S_VERSION).tmp k8s.io/kubernetes/cmd/kubectl && \
	  mv bin/kubectl-$(K8S_VERSION).tmp bin/kubectl-$(K8S_VERSION); }
	@test -x $(KUBE_CONTROLLER_MANAGER) || { echo "building $(KUBE_CONTROLLER_MANAGER)"; \
	  cd $(E2E_DIR) && CGO_ENABLED=0 $(GO) build $(E2E_GOFLAGS) -trimpath -ldflags "$(K8S_LDFLAGS)" \
	    -o bin/kube-controller-manager-$(K8S_VERSION).tmp k8s.io/kubernetes/cmd/kube-controller-manager && \
	  mv bin/kube-controller-manager-$(K8S_VERSION).tmp bin/kube-controller-manager-$(K8S_VERSION); }

## Release artifacts, all in DIST (dist/), each with a CycloneDX SBOM (FILE.cdx.json),
## and DIST/SHA256SUMS over every file there. The tools (nfpm, cyclonedx-gomod,
## cmd/mkimage) are pinned in cmd/mkimage/go.mod, a module of their own so that none of
## them enters hwkms's go.mod. No container daemon is needed.
##   make package: DIST/hwkms_V_ARCH.deb and DIST/hwkms-V.RPMARCH.rpm (nfpm,
##                 deploy/packaging/nfpm.yaml), and the bare binary DIST/hwkms-V-linux-ARCH
##   make image:   the OCI image hwkms:VERSION (deploy/packaging/image.json) as an OCI
##                 layout DIST/hwkms-image-VERSION/ and an archive DIST/hwkms-image-VERSION.tar
##                 that docker load, podman load and ctr import read
## VERSION=1.2.3 sets the version (default git describe); a version that does not start
## with a digit is packaged as 0.0.0+git.VERSION.
DIST              ?= dist
PKG_VERSION       ?= $(shell echo '$(VERSION)' | sed -E 's/^v([0-9])/\1/; /^[0-9]/!{s/-/./g; s/^/0.0.0+git./;}')
ARCH              ?= $(shell $(GO) env GOARCH)
RPM_ARCH           = $(if $(filter amd64,$(ARCH)),x86_64,$(if $(filter arm64,$(ARCH)),aarch64,$(ARCH)))
IMAGE_TAG         ?= $(VERSION)
PKG_MAINTAINER    ?= hwkms maintainers <hwkms@localhost>
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
TOOLS             := bin/tools
DEB                = $(DIST)/hwkms_$(PKG_VERSION)_$(ARCH).deb
RPM                = $(DIST)/hwkms-$(PKG_VERSION).$(RPM_ARCH).rpm
BIN_DIST           = $(DIST)/hwkms-$(PKG_VERSION)-linux-$(ARCH)
IMAGE_DIR          = $(DIST)/hwkms-image-$(IMAGE_TAG)
IMAGE_TAR          = $(IMAGE_DIR).tar
BIN_SBOM           = $(BIN_DIST).cdx.json

tools:
	cd cmd/mkimage && CGO_ENABLED=0 $(GO) build -trimpath -o $(CURDIR)/$(TOOLS)/ tool
	cd cmd/mkimage && CGO_ENABLED=0 $(GO) build -trimpath -o $(CURDIR)/$(TOOLS)/mkimage .

# The binary's SBOM: cyclonedx-gomod bin reads the module list from the binary's build
# info, so it names exactly the modules linked in (what hwkms version prints).
$(BIN_SBOM): build tools
	@mkdir -p $(DIST)
	install -m 0755 bin/hwkms $(BIN_DIST)
	$(TOOLS)/cyclonedx-gomod bin -json -version $(VERSION) -output $@ bin/hwkms

package: build tools $(BIN_SBOM)
	PKG_VERSION='$(PKG_VERSION)' ARCH='$(ARCH)' PKG_MAINTAINER='$(PKG_MAINTAINER)' SOURCE_DATE_EPOCH='$(SOURCE_DATE_EPOCH)' \
	  $(TOOLS)/nfpm package --config deploy/packaging/nfpm.yaml --packager deb --target $(DEB)
	PKG_VERSION='$(PKG_VERSION)' ARCH='$(ARCH)' PKG_MAINTAINER='$(PKG_MAINTAINER)' SOURCE_DATE_EPOCH='$(SOURCE_DATE_EPOCH)' \
	  $(TOOLS)/nfpm package --config deploy/packaging/nfpm.yaml --packager rpm --target $(RPM)
	$(TOOLS)/mkimage sbom -in $(BIN_SBOM) -artifact $(DEB) -out $(DEB).cdx.json -version '$(PKG_VERSION)' \
	  -purl 'pkg:deb/hwkms@$(PKG_VERSION)?arch=$(ARCH)' -source-date-epoch $(SOURCE_DATE_EPOCH)
	$(TOOLS)/mkimage sbom -in $(BIN_SBOM) -artifact $(RPM) -out $(RPM).cdx.json -version '$(PKG_VERSION)' \
	  -purl 'pkg:rpm/hwkms@$(PKG_VERSION)?arch=$(RPM_ARCH)' -source-date-epoch $(SOURCE_DATE_EPOCH)
	@$(MAKE) --no-print-directory sums DIST=$(DIST)

image: build tools $(BIN_SBOM)
	$(TOOLS)/mkimage image -spec deploy/packaging/image.json -binary bin/hwkms -version '$(IMAGE_TAG)' -commit '$(COMMIT)' \
	  -source-date-epoch $(SOURCE_DATE_EPOCH) -out-dir $(IMAGE_DIR) -out-tar $(IMAGE_TAR) \
	  -sbom-in $(BIN_SBOM) -sbom-out $(IMAGE_TAR).cdx.json
	@$(MAKE) --no-print-directory sums DIST=$(DIST)

dist: package image

## sums: DIST/SHA256SUMS over every file in DIST (the OCI layout's files included)
sums:
	cd $(DIST) && find . -type f ! -name 'SHA256SUMS*' | sed 's|^\./||' | LC_ALL=C sort | xargs -d '\n' sha256sum > SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS

clean:
	rm -rf bin .dev .bench $(E2E_DIR)/bin
