package wire

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

func TestTPM2B(t *testing.T) {
	out, err := Append2B([]byte{9}, []byte("abc"))
	if err != nil || !bytes.Equal(out, []byte{9, 0, 3, 'a', 'b', 'c'}) {
		t.Fatalf("Append2B = %x, %v", out, err)
	}
	for _, f := range [][]byte{nil, make([]byte, 0x10000)} {
		if _, err := Append2B(nil, f); err == nil {
			t.Errorf("Append2B of %d bytes accepted", len(f))
		}
	}
	f, rest, ok := Cut2B(out[1:])
	if !ok || string(f) != "abc" || len(rest) != 0 {
		t.Fatalf("Cut2B = %q, %x, %v", f, rest, ok)
	}
	for _, b := range [][]byte{nil, {0}, {0, 4, 1, 2, 3}} {
		if _, _, ok := Cut2B(b); ok {
			t.Errorf("Cut2B(%x) accepted", b)
		}
	}
}

func TestSafeUnmarshal(t *testing.T) {
	for _, b := range [][]byte{nil, {0xff}, {0, 0x23, 0, 0x0b, 0xff, 0xff, 0xff, 0xff}} {
		if _, err := SafeUnmarshalPublic(b); err == nil {
			t.Errorf("SafeUnmarshalPublic(%x) accepted", b)
		}
		if _, err := SafeUnmarshal[tpm2.TPMTSensitive](b); err == nil {
			t.Errorf("SafeUnmarshal[TPMTSensitive](%x) accepted", b)
		}
	}
	p := KEKTemplate()
	b, err := SafeMarshal(&p)
	if err != nil {
		t.Fatal(err)
	}
	back, err := SafeUnmarshalPublic(b)
	if err != nil || !bytes.Equal(tpm2.Marshal(back), b) {
		t.Fatalf("round trip: %v", err)
	}
	// A union whose selector does not match its contents cannot be marshalled:
	// SafeMarshal reports it instead of panicking.
	bad := p
	bad.Type = tpm2.TPMAlgRSA
	if _, err := SafeMarshal(&bad); !errors.Is(err, ErrMalformed) {
		t.Errorf("SafeMarshal of an inconsistent public area = %v, want ErrMalformed", err)
	}
}

func TestKeyID(t *testing.T) {
	p := KEKTemplate()
	name, err := ObjectName(&p)
	if err != nil {
		t.Fatal(err)
	}
	id := KeyID(name)
	if !strings.HasPrefix(id, "tpm:000b") || len(id) != len("tpm:")+2*34 {
		t.Errorf("KeyID = %q", id)
	}
}

func TestCheckKEKPublic(t *testing.T) {
	imported := ImportedKEKTemplate()
	plain := KEKTemplate()
	if IsImportedKEK(&plain) || !IsImportedKEK(&imported) {
		t.Fatal("IsImportedKEK does not tell the two forms apart")
	}
	if len(NoDuplicationLabel) >= 36 {
		t.Fatalf("NoDuplicationLabel is %d bytes; a policy hash input can be that long", len(NoDuplicationLabel))
	}
	for _, p := range []tpm2.TPMTPublic{plain, imported} {
		if err := CheckKEKPublic(&p); err != nil {
			t.Errorf("CheckKEKPublic refused a template: %v", err)
		}
	}
	mutate := func(f func(*tpm2.TPMTPublic)) *tpm2.TPMTPublic {
		p := KEKTemplate()
		f(&p)
		return &p
	}
	for name, p := range map[string]*tpm2.TPMTPublic{
		"sha1":       mutate(func(p *tpm2.TPMTPublic) { p.NameAlg = tpm2.TPMAlgSHA1 }),
		"not fixed":  mutate(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedTPM = false }),
		"policy":     mutate(func(p *tpm2.TPMTPublic) { p.AuthPolicy.Buffer = make([]byte, 32) }),
		"keyed hash": mutate(func(p *tpm2.TPMTPublic) { p.Type = tpm2.TPMAlgKeyedHash }),
		"other curve": mutate(func(p *tpm2.TPMTPublic) {
			p.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{Symmetric: AES128CFB, Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull}, CurveID: tpm2.TPMECCNistP384, KDF: tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull}})
		}),
	} {
		if err := CheckKEKPublic(p); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
