package tpm

import (
	"bytes"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// A body with a valid-looking structure, built without a TPM.
func sampleBody(t testing.TB) []byte {
	t.Helper()
	pub := sealedTemplate(nil)
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: make([]byte, 32)})
	b, err := encodeObject(bodyV1, tpm2.Marshal(pub), []byte{0, 1, 2, 3})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDecodeObject(t *testing.T) {
	b := sampleBody(t)
	pub, pubBytes, priv, err := decodeObject(bodyV1, b)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkSealedPublic(pub); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(priv, []byte{0, 1, 2, 3}) || len(pubBytes) != int(b[1])<<8|int(b[2]) {
		t.Fatalf("decode gave priv %x", priv)
	}
	// Byte layout of doc.go: version, u16 size, public, u16 size, private.
	if b[0] != 0x01 || !bytes.Equal(b[len(b)-6:], []byte{0, 4, 0, 1, 2, 3}) {
		t.Fatalf("layout: %x", b)
	}

	for name, bad := range map[string][]byte{
		"empty":           nil,
		"version 2":       append([]byte{2}, b[1:]...),
		"trailing":        append(bytes.Clone(b), 0),
		"truncated":       b[:len(b)-1],
		"empty private":   append(bytes.Clone(b[:len(b)-6]), 0, 0),
		"public size big": append([]byte{1, 0xff, 0xff}, b[3:]...),
	} {
		if _, _, _, err := decodeObject(bodyV1, bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestCheckSealedPublic(t *testing.T) {
	mutate := func(f func(p *tpm2.TPMTPublic)) *tpm2.TPMTPublic {
		p := sealedTemplate(nil)
		p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: make([]byte, 32)})
		f(&p)
		return &p
	}
	if err := checkSealedPublic(mutate(func(*tpm2.TPMTPublic) {})); err != nil {
		t.Fatal(err)
	}
	for name, p := range map[string]*tpm2.TPMTPublic{
		"sha1":                func() *tpm2.TPMTPublic { return mutate(func(p *tpm2.TPMTPublic) { p.NameAlg = tpm2.TPMAlgSHA1 }) }(),
		"decrypt":             mutate(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.Decrypt = true }),
		"sign":                mutate(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.SignEncrypt = true }),
		"not fixedTPM":        mutate(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedTPM = false }),
		"not fixedParent":     mutate(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedParent = false }),
		"policy and userAuth": mutate(func(p *tpm2.TPMTPublic) { p.AuthPolicy.Buffer = make([]byte, 32) }),
		"short unique": mutate(func(p *tpm2.TPMTPublic) {
			p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: make([]byte, 20)})
		}),
		"hmac scheme": mutate(func(p *tpm2.TPMTPublic) {
			p.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{
				Scheme: tpm2.TPMAlgHMAC, Details: tpm2.NewTPMUSchemeKeyedHash(tpm2.TPMAlgHMAC, &tpm2.TPMSSchemeHMAC{HashAlg: tpm2.TPMAlgSHA256}),
			}})
		}),
	} {
		if err := checkSealedPublic(p); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// FuzzDecodeObject: hostile bodies never panic, and whatever is accepted
// re-encodes to the same bytes.
func FuzzDecodeObject(f *testing.F) {
	f.Add(sampleBody(f))
	f.Add([]byte{1, 0, 1, 0, 0, 1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		pub, pubBytes, priv, err := decodeObject(bodyV1, b)
		if err != nil {
			return
		}
		_ = checkSealedPublic(pub)
		again, err := encodeObject(bodyV1, pubBytes, priv)
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("accepted body does not re-encode: %x", b)
		}
	})
}
