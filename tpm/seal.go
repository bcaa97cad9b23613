package tpm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// Wrap seals SHA-256(aad) || plaintext in a new sealed-data object under the KEK
// (TPM2_Create, Part 3 section 12.1), with the command's sensitive parameter
// encrypted by the salted session, and returns the body described in doc.go.
// plaintext must be 1..kek.MaxPlaintext bytes.
func (k *KEK) Wrap(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	if len(plaintext) == 0 || len(plaintext) > kek.MaxPlaintext {
		return nil, fmt.Errorf("tpm: wrap: %w: plaintext is %d bytes, want 1..%d", kek.ErrInvalidInput, len(plaintext), kek.MaxPlaintext)
	}
	if k.hmac {
		return k.wrapHMAC(ctx, plaintext, aad)
	}
	digest := sha256.Sum256(aad)
	sealed := make([]byte, 0, len(digest)+len(plaintext))
	sealed = append(append(sealed, digest[:]...), plaintext...)
	defer clear(sealed)
	var body []byte
	err := k.do(ctx, "wrap", func() error {
		var err error
		body, err = k.wrapLocked(sealed)
		return err
	})
	return body, err
}

func (k *KEK) wrapLocked(sealed []byte) ([]byte, error) {
	var policy []byte
	userAuth := k.auth
	if len(k.pcrs) > 0 {
		var err error
		if policy, err = k.pcrPolicy(); err != nil {
			return nil, fmt.Errorf("tpm: wrap: read PCRs: %w: %w", kek.ErrUnavailable, err)
		}
		userAuth = nil // policy-only object
	}
	rsp, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: k.kek, Name: tpm2.TPM2BName{Buffer: k.name}, Auth: k.sIn},
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			UserAuth: tpm2.TPM2BAuth{Buffer: userAuth},
			Data:     tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: sealed}),
		}},
		InPublic: tpm2.New2B(sealedTemplateFor(policy, k.imported)),
	}.Execute(k.c)
	if err != nil {
		return nil, fmt.Errorf("tpm: wrap: TPM2_Create: %w: %w", kek.ErrUnavailable, tpmCall(err))
	}
	body, err := encodeObject(bodyV1, rsp.OutPublic.Bytes(), rsp.OutPrivate.Buffer)
	if err != nil {
		return nil, fmt.Errorf("tpm: wrap: %w", err)
	}
	// Never hand out a body that Unwrap would refuse.
	pub, _, _, err := decodeObject(bodyV1, body)
	if err == nil {
		err = checkSealedPublicFor(pub, k.imported)
	}
	if err != nil {
		return nil, fmt.Errorf("tpm: wrap: TPM returned an unexpected object: %w", err)
	}
	return body, nil
}

// Unwrap parses body strictly, loads it under the KEK (TPM2_Load, Part 3 section
// 12.2; the TPM checks the private area's integrity HMAC and that it was made under
// this KEK), unseals it (TPM2_Unseal, section 12.7) with the response encrypted by
// the salted session (or, for a PCR-policy object, a salted policy session running
// TPM2_PolicyPCR), flushes it, and checks SHA-256(aad) in constant time.
// A malformed, tampered or foreign body or a wrong aad gives an error wrapping
// kek.ErrInvalidCiphertext; an unsatisfied PCR policy gives ErrPolicy.
func (k *KEK) Unwrap(ctx context.Context, body, aad []byte) ([]byte, error) {
	if k.hmac {
		return k.unwrapHMAC(ctx, body, aad)
	}
	pubBytes, priv, name, userWithAuth, err := k.parseBody(body)
	if err != nil {
		return nil, fmt.Errorf("tpm: unwrap: %w: %w", kek.ErrInvalidCiphertext, err)
	}
	var data []byte
	err = k.do(ctx, "unwrap", func() error {
		var err error
		data, err = k.unwrapLocked(userWithAuth, pubBytes, priv, name)
		return err
	})
	if err != nil {
		return nil, err
	}
	defer clear(data)
	digest := sha256.Sum256(aad)
	if len(data) <= len(digest) || len(data) > len(digest)+kek.MaxPlaintext ||
		subtle.ConstantTimeCompare(data[:len(digest)], digest[:]) != 1 {
		return nil, fmt.Errorf("tpm: unwrap: %w: aad does not match", kek.ErrInvalidCiphertext)
	}
	return bytes.Clone(data[len(digest):]), nil
}

// parseBody parses and checks a body (fastpath.go, else decodeObject and
// checkSealedPublicFor) and returns its areas, the sealed object's Name and whether
// the KEK's auth value (rather than a PCR policy) authorises its unseal.
func (k *KEK) parseBody(body []byte) (pubBytes, priv, name []byte, userWithAuth bool, err error) {
	if pubBytes, priv, name, ok := parseSealedFast(body, k.imported); ok {
		return pubBytes, priv, name, true, nil
	}
	pub, pubBytes, priv, err := decodeObject(bodyV1, body)
	if err == nil {
		err = checkSealedPublicFor(pub, k.imported)
	}
	if err != nil {
		return nil, nil, nil, false, err
	}
	if name, err = wire.ObjectName(pub); err != nil {
		return nil, nil, nil, false, err
	}
	return pubBytes, priv, name, pub.ObjectAttributes.UserWithAuth, nil
}

func (k *KEK) unwrapLocked(userWithAuth bool, pubBytes, priv, name []byte) ([]byte, error) {
	obj, loadedName, err := loadFast(k.c, k.sOut, k.kek, k.name, priv, pubBytes)
	if err != nil {
		err = tpmCall(err)
		if loadRejectsBody(err) {
			return nil, fmt.Errorf("tpm: unwrap: TPM2_Load: %w: %w", kek.ErrInvalidCiphertext, err)
		}
		return nil, fmt.Errorf("tpm: unwrap: TPM2_Load: %w: %w", kek.ErrUnavailable, err)
	}
	defer k.flush(obj)
	if !bytes.Equal(loadedName, name) {
		k.needReset = true
		return nil, fmt.Errorf("tpm: unwrap: TPM2_Load returned an unexpected Name: %w", kek.ErrUnavailable)
	}
	item := tpm2.TPM2BName{Buffer: name}
	var data []byte
	if userWithAuth {
		data, err = unsealFast(k.c, k.sOut, obj, name)
	} else {
		var rsp *tpm2.UnsealResponse
		if rsp, err = k.unsealPolicy(obj, item); err == nil {
			data = rsp.OutData.Buffer
		}
	}
	if err != nil {
		err = tpmCall(err)
		switch {
		case errors.Is(err, ErrPolicy), errors.Is(err, tpm2.TPMRCPolicyFail), errors.Is(err, tpm2.TPMRCPCRChanged):
			return nil, fmt.Errorf("tpm: unwrap: TPM2_Unseal: %w: %w: %w", ErrPolicy, kek.ErrUnavailable, err)
		case errors.Is(err, tpm2.TPMRCAuthFail), errors.Is(err, tpm2.TPMRCBadAuth):
			// Loaded under our KEK but made with another auth value: not ours.
			return nil, fmt.Errorf("tpm: unwrap: TPM2_Unseal: %w: %w", kek.ErrInvalidCiphertext, err)
		}
		return nil, fmt.Errorf("tpm: unwrap: TPM2_Unseal: %w: %w", kek.ErrUnavailable, err)
	}
	return data, nil
}

// loadRejectsBody reports whether a TPM2_Load error is about the object given
// (integrity, size, attributes, ...: a format-1 error on a parameter) rather than
// about the TPM or the parent.
func loadRejectsBody(err error) bool {
	if errors.Is(err, tpm2.TPMRCIntegrity) {
		return true
	}
	var fmt1 tpm2.TPMFmt1Error
	if errors.As(err, &fmt1) {
		isParam, _ := fmt1.Parameter()
		return isParam
	}
	return false
}
