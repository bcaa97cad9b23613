package tpm

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// unsealPolicy satisfies a PCR-policy object's authPolicy with TPM2_PolicyPCR
// (Part 3 section 23.7) over the configured PCRs and unseals it. The policy session
// is reused (the TPM resets its policy digest after each successful use) and
// dropped after any failure.
func (k *KEK) unsealPolicy(item tpm2.TPMHandle, name tpm2.TPM2BName) (_ *tpm2.UnsealResponse, err error) {
	if len(k.pcrs) == 0 {
		return nil, fmt.Errorf("%w: the object is sealed under a PCR policy and this key's config selects no pcrs", ErrPolicy)
	}
	if k.sPol == nil {
		s, _, err := tpm2.PolicySession(k.c, tpm2.TPMAlgSHA256, nonceSize,
			tpm2.Salted(k.kek, k.kekPub), tpm2.AESEncryption(128, tpm2.EncryptOut))
		if err != nil {
			return nil, fmt.Errorf("start policy session: %w", tpmCall(err))
		}
		k.sPol = s
	}
	defer func() {
		if err != nil {
			k.dropPolicySession()
		}
	}()
	if _, err := (tpm2.PolicyPCR{PolicySession: k.sPol.Handle(), Pcrs: k.pcrSelection()}).Execute(k.c); err != nil {
		return nil, fmt.Errorf("TPM2_PolicyPCR: %w", tpmCall(err))
	}
	return tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: item, Name: name, Auth: k.sPol}}.Execute(k.c)
}

func (k *KEK) dropPolicySession() {
	if k.sPol == nil {
		return
	}
	h := k.sPol.Handle()
	k.sPol = nil
	if h != tpm2.TPMRHNull {
		k.flush(h)
	}
}

func (k *KEK) pcrSelection() tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash:      tpm2.TPMAlgSHA256,
		PCRSelect: tpm2.PCClientCompatible.PCRs(k.pcrs...),
	}}}
}

// pcrPolicy reads the selected SHA-256 PCRs and returns the policy digest of
// TPM2_PolicyPCR over their current values (Part 3 section 23.7):
// H(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(PCR values in index order)).
func (k *KEK) pcrPolicy() ([]byte, error) {
	sel := k.pcrSelection()
	rsp, err := tpm2.PCRRead{PCRSelectionIn: sel}.Execute(k.c)
	if err != nil {
		return nil, tpmCall(err)
	}
	if !bytes.Equal(tpm2.Marshal(rsp.PCRSelectionOut), tpm2.Marshal(sel)) || len(rsp.PCRValues.Digests) != len(k.pcrs) {
		return nil, errors.New("the TPM did not return every selected SHA-256 PCR (is the SHA-256 bank allocated?)")
	}
	h := sha256.New()
	for _, d := range rsp.PCRValues.Digests {
		if len(d.Buffer) != sha256.Size {
			return nil, errors.New("PCR value is not a SHA-256 digest")
		}
		h.Write(d.Buffer)
	}
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	if err := (tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: h.Sum(nil)}, Pcrs: sel}).Update(calc); err != nil {
		return nil, err
	}
	return calc.Hash().Digest, nil
}
