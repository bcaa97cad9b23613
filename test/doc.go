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
// Without SoftHSM2 the suites skip, unless CI is set: then they fail.
package test
