// Package provision is the offline side of the multi-node ("imported") TPM KEK: the
// provisioning ceremony that runs on an admin machine without a TPM. It owns the KEK
// material (NewKEKMaterial), the import blob format and its parser (ParseBlob,
// InspectImportBlob), making import blobs for a node's SRK (ImportBlob) or bound to
// its certified EK (ImportBlobForEK), EK certificate verification (ParseEKTrust,
// VerifyNodeEK, ParseEKPublic), SRK public files (ParseSRKPublic), and the offline
// escrow (NewEscrowKey, RecoverKEKMaterial).
//
// It does not own anything that talks to a TPM: exporting a node's SRK and EK
// (tpm.ExportSRK, tpm.ExportEK) and importing a blob on the node (tpm.ImportKey,
// which parses it with ParseBlob) are package tpm. It imports go-tpm's tpm2 for
// marshalling and the duplication and credential constructions, never hwkms's
// transport or connection code. The object templates and marshalling helpers it
// shares with package tpm are tpm/internal/wire. It writes no files: cmd/hwkms does.
// Structure names follow TPM 2.0 Library Part 2; duplication is Part 1 section 23.3,
// credential activation Part 1 section 24.
//
// # The ceremony
//
// For an HA control plane every node's TPM must hold the same KEK. The ceremony
// generates it in memory (NewKEKMaterial: crypto/rand P-256 scalar, 32-byte storage
// seed, optional auth value) and writes, per node, an import blob made for that
// node's owner SRK, in the duplication format of Part 1 section 23.3 with an outer
// wrapper only (tpm2.CreateDuplicate: seed encapsulated by one-pass ECDH to the
// SRK, KDFe "DUPLICATE"; AES-128-CFB with KDFa "STORAGE"; HMAC with KDFa
// "INTEGRITY" over the encrypted sensitive area and the KEK's Name). The KEK's
// public area is the imported KEK template (package tpm's doc explains its
// attributes and no-duplication policy), the same on every node, so is its Name
// and so the key_id.
//
// Trust: the KEK exists in the clear in the ceremony process (Go's crypto/ecdh and
// go-tpm keep copies of the scalar that hwkms cannot clear; run the ceremony in a
// short-lived process on an offline machine). The admin must get the SRK public
// files from the right TPMs: compare the srk_name printed on each node, or check
// the TPMs with their EK certificates (below).
//
// # Import blob format (stored: never change it, add a version instead)
//
//	"HWKI" 0x01 | TPM2B_PUBLIC (KEK) | TPM2B_NAME (target SRK) |
//	TPM2B_PRIVATE (duplicate) | TPM2B_ENCRYPTED_SECRET (seed)
//
//	"HWKI" 0x02 | TPM2B_PUBLIC (KEK) | TPM2B_NAME (target SRK) |
//	TPM2B_PUBLIC (EK) | TPM2B_ID_OBJECT | TPM2B_ENCRYPTED_SECRET (credential) |
//	TPM2B (12-byte nonce || AES-256-GCM(K, TPM2B duplicate || TPM2B seed))
//
// Each TPM2B is a big-endian u16 size and that many bytes (at least one). ParseBlob
// refuses a wrong magic or version, a truncated field, trailing bytes, a KEK public
// area that does not re-marshal to the same bytes or is not the imported KEK
// (tpm.ErrNotKEK), and, in version 2, an EK public area that is not a TCG EK
// template. Import blobs are transport files, but escrow.import is kept for years:
// every version stays readable. testdata/golden holds one of each, read back by
// TestGolden here and imported on the simulator they were made for by package tpm's
// TestGolden.
//
// # EK-bound import blobs (ek.go)
//
// An SRK public file says nothing about where its private key lives: a file
// swapped on its way to the admin machine would make the ceremony encrypt the KEK
// to a key in software. EK binding rules that out (the KEK can only land in a
// genuine TPM of a trusted vendor); it cannot tell one genuine TPM from another, so
// the operator still compares each node's EK Name with a record (docs/ha.md).
// `hwkms tpm export-srk --ek` (tpm.ExportEK) adds the TPM's endorsement key
// (re-created from the TCG EK template, ECC P-256 or RSA 2048, matching the EK
// certificate found at NV index 0x01C0000A or 0x01C00002) and that certificate.
// With `--ek-roots` the ceremony (VerifyNodeEK) checks that the certificate chains
// to the operator's manufacturer CAs (a critical subjectAltName is accepted only
// when it holds nothing but directoryNames, the form TCG EK certificates use for the
// TPM's manufacturer, model and version; any extended key usage, since older EK
// certificates carry none), that it certifies exactly that EK (an RSA modulus of
// exactly the template's size), that the EK is the TCG template, and that the SRK is
// the TCG SRK template; the NodeEK it returns only makes blobs for that SRK. The certificate proves the EK is in a
// genuine TPM but says nothing about the SRK; what ties them is credential
// activation (Part 1 section 24): ImportBlobForEK seals the duplicate and its seed
// with AES-256-GCM under a fresh key K and protects K with tpm2.CreateCredential
// (TPM2_MakeCredential's construction) to the EK for the SRK's Name. On the node,
// tpm.ImportKey re-creates the EK, checks its Name (tpm.ErrWrongTPM otherwise) and runs
// TPM2_ActivateCredential with the SRK (ADMIN role) and the EK (USER role, by
// PolicySecret on the endorsement hierarchy, whose auth must be empty): the TPM
// releases K only if it holds the EK's private key and an object with the SRK's
// exact Name is loaded and authorised. An attacker who holds the genuine TPM and
// the private key of a look-alike SRK can load only the look-alike's public area
// (TPM2_LoadExternal refuses a fixedTPM private area: TPM_RC_ATTRIBUTES), and a public-only object
// has no auth value for the ADMIN role the SRK template requires (adminWithPolicy
// clear): TPM2_ActivateCredential answers TPM_RC_AUTH_UNAVAILABLE (measured on
// swtpm 0.7.1 and asserted by TestEKBoundImportLookalikeSRK). Format, version 2:
//
//	"HWKI" 0x02 | TPM2B_PUBLIC (KEK) | TPM2B_NAME (target SRK) |
//	TPM2B_PUBLIC (EK) | TPM2B_ID_OBJECT | TPM2B_ENCRYPTED_SECRET (credential) |
//	TPM2B (12-byte nonce || AES-256-GCM(K, TPM2B duplicate || TPM2B seed))
//
// with everything before the last field as GCM additional data. Not covered: an
// operator's trust file is only as good as the CAs in it, and EK certificates are
// not checked for revocation. The escrow blob is never EK-bound.
//
// # Escrow
//
// The ceremony can also make an import blob for an offline escrow key, a software
// P-256 key pair whose public half is written as an SRK public area (NewEscrowKey:
// the TCG SRK template with the escrow point). RecoverKEKMaterial opens that blob in
// software (the inverse of the duplication, Part 1 section 23.3.2.2) and returns the
// same KEK material, from which blobs for new TPMs are made: the recovery drill for
// a cluster whose TPMs all died. The escrow private key is as sensitive as the KEK.
// An escrow blob is always version 1; a version 2 blob is a node's and is refused.
package provision
