// Package files owns the two ways hwkms touches files that matter: reading a secret
// (a PKCS#11 PIN, a TPM auth value) and writing a file that must survive a crash (a TPM
// KEK blob, an import or escrow blob, the config written by key rotation, the
// refused-PIN record).
//
// ReadSecret caps the size, refuses a file that other users can read or write,
// strips one trailing newline and zeroes every buffer it drops. WriteFile writes a
// temporary file in the target's directory, fsyncs it, then renames it over the
// target (or links it, when the target must be new, so an existing file is never
// replaced) and fsyncs the directory, so after a crash the target holds either the
// old bytes or the new ones, never a prefix. Remove unlinks and fsyncs the directory.
//
// It imports only the standard library, so every layer (hsm, tpm, plugin/config,
// cmd/hwkms) can use it.
package files
