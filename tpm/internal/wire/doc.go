// Package wire holds what the node side (package tpm) and the offline ceremony
// (package tpm/provision) both need to agree on, byte for byte: TPM2B framing,
// panic-free go-tpm marshalling of hostile input, TPM Names and key_ids, and the
// public areas (templates) of the SRK, the KEK, the imported KEK and the KEK of kind
// hmac (hmac.go) with the checks
// that accept exactly those shapes.
//
// It owns no stored format of its own and never talks to a TPM: the KEK blob file
// and the body (package tpm), and the import and escrow blobs (package
// tpm/provision) are defined, versioned and documented by their packages. It is
// internal so that nothing outside tpm/ depends on these helpers.
package wire
