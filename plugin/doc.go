// Package plugin implements the Kubernetes KMS v2 service (k8s.io/kms/pkg/service.Service)
// on top of key-encryption keys that live in hardware.
//
// It owns: the keyring (one primary KEK for Encrypt, any number of decrypt-only KEKs,
// selected by key_id), the versioned ciphertext frame and its AAD, input limits, the
// mapping of errors to gRPC status codes, the cached health probe that answers Status,
// and the unix socket lifecycle. It does not own any device detail: the backends in
// hsm/ and tpm/ implement the KEK interface defined here.
package plugin
