// Package kek is the contract between the KMS v2 service (package plugin) and the
// devices that hold key-encryption keys (packages hsm and tpm): the KEK interface, the
// Backend byte written in every ciphertext frame, the size limits of the KMS v2 wire
// contract and the error sentinels that decide a request's gRPC status code.
//
// It is a leaf: it imports only the standard library, so a backend that implements
// KEK pulls in nothing of gRPC or Kubernetes. Package plugin is the one place that
// maps these sentinels to gRPC codes; package kektest is the conformance suite every
// implementation runs.
package kek
