// Package kektest is the conformance suite of the kek.KEK contract and the one
// in-memory KEK (Fake) the plugin's own tests use.
//
// Run, in the spirit of testing/fstest.TestFS, checks a KEK implementation against
// everything package plugin relies on: round trips at 1, 32 and kek.MaxPlaintext
// bytes, a fresh body on every Wrap, a stable and valid ID and Backend, that every
// single-byte change, every truncation and any appended bytes of a body and any
// change of the aad fail with kek.ErrInvalidCiphertext, that out-of-range
// plaintexts fail with kek.ErrInvalidInput, that a body is bound to its key, that
// concurrent use is correct, that Close is idempotent and closes every operation
// with kek.ErrClosed, and that a cancelled context fails an operation. Every backend
// (hsm over SoftHSM2, tpm over swtpm, the Fake) runs it from its own tests.
//
// Fake is an AES-256-GCM KEK held in memory with the hooks the plugin's tests need
// (a failure to return, an Unwrap that blocks until released, a call counter, a
// no-cryptography mode for benchmarks). It reports kek.BackendTest, which production
// keyrings refuse.
//
// The package imports only the standard library, package kek and package testing.
// Only tests import it, so it is never linked into bin/hwkms.
package kektest
