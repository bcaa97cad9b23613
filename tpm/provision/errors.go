package provision

import "errors"

// Errors of this package. The KEK-shape error is wire's, exported by package tpm as
// tpm.ErrNotKEK, so a blob holding something other than an imported KEK gives the
// same sentinel on the node and in the ceremony.
var (
	// ErrEKNotTrusted means an EK certificate did not verify against the given roots,
	// does not certify the EK it came with, or the EK or SRK public area is not the
	// TCG template.
	ErrEKNotTrusted = errors.New("tpm: EK is not trusted")
	// ErrWrongEscrowKey means an escrow blob was not made for the given escrow key.
	ErrWrongEscrowKey = errors.New("tpm: escrow blob was made for another escrow key")
)
