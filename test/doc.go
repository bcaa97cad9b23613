// Package test holds hwkms's end-to-end suites. They build the hwkms binary, run it on
// a throwaway SoftHSM2 token and drive it the way kube-apiserver does: through
// k8s.io/apiserver's EncryptionConfiguration loader and the KMS v2 envelope
// transformer, and through a raw k8s.io/kms/apis/v2 gRPC client for bad input.
//
// This is its own Go module so that k8s.io/apiserver stays out of the plugin's go.mod.
//
//	go test -race ./...                                  # the suites
//	go test -run x -bench Socket -benchtime 2000x ./...  # latency at concurrency 1
//
// TestInteropMatrix runs the apiserver-client, tampered-etcd and bad-input suites, and
// the kek conformance suite (kektest) in process, on every PKCS#11 implementation of
// softhsm/interop (opencryptoki, tpm2-pkcs11, NSS softoken, SoftHSM2), with keys made
// by `hwkms key create` (or the tpm2_ptool commands it prints) and a config that
// names no mechanism; `go test -v -run TestInteropMatrix` logs the table README.md
// shows. The opencryptoki soft token is machine-wide: its fixture holds a lock file
// shared with softhsm/interop and test/e2e, and must run as root.
//
// Without SoftHSM2 (or another implementation the matrix needs) the suites skip,
// unless CI is set: then they fail.
package test
