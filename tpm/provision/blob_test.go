package provision

import (
	"bytes"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

func TestImportBlobFormat(t *testing.T) {
	if n := len(wire.NoDuplicationLabel); n >= 36 {
		t.Fatalf("wire.NoDuplicationLabel is %d bytes; a policy hash input can be that long", n)
	}
	_, escrowPub, err := NewEscrowKey()
	if err != nil {
		t.Fatal(err)
	}
	m, err := NewKEKMaterial(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Destroy()
	blob, err := m.ImportBlob(escrowPub.Public)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseBlob(blob); err != nil {
		t.Fatalf("parseImportBlob: %v", err)
	}
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"magic only", blob[:4]},
		{"unknown version", append(append([]byte("HWKI"), 3), blob[5:]...)},
		{"version 2 with version 1 fields", append(append([]byte("HWKI"), 2), blob[5:]...)},
		{"truncated", blob[:len(blob)-1]},
		{"trailing", append(bytes.Clone(blob), 0)},
		{"kek blob file", []byte{1, 0, 1, 0, 0, 1, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ParseBlob(tc.b); err == nil {
				t.Error("accepted")
			}
		})
	}
	// A key made by CreateKey's template (fixedTPM) is not an imported KEK, and a
	// non-storage key is not an import parent.
	p := wire.KEKTemplate()
	if wire.IsImportedKEK(&p) {
		t.Error("kekTemplate is recognised as imported")
	}
	sealed := tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgKeyedHash,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, UserWithAuth: true, NoDA: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: make([]byte, 32)}),
	}
	if _, _, err := ParseSRKPublic(tpm2.Marshal(tpm2.New2B(sealed))); err == nil {
		t.Error("ParseSRKPublic accepted a sealed-data object")
	}
	if _, err := NewKEKMaterial([]byte("short")); err == nil {
		t.Error("NewKEKMaterial accepted a 5-byte auth value")
	}
}

// FuzzParseImportBlob: parsing an import blob of either version never panics, and
// what it accepts InspectImportBlob reports consistently.
func FuzzParseImportBlob(f *testing.F) {
	_, escrow, err := NewEscrowKey()
	if err != nil {
		f.Fatal(err)
	}
	m, err := NewKEKMaterial(nil)
	if err != nil {
		f.Fatal(err)
	}
	v1, err := m.ImportBlob(escrow.EncodeSRKPEM())
	m.Destroy()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(v1)
	// A version 2 shape: the EK public area is the ECC EK template, then three fields.
	v2 := bytes.Clone(v1[:len(importMagic)])
	v2 = append(v2, ImportV2)
	rest := v1[len(importMagic)+1:]
	for range 2 { // KEK public, parent Name
		field, r, _ := wire.Cut2B(rest)
		v2, _ = wire.Append2B(v2, field)
		rest = r
	}
	v2, _ = wire.Append2B(v2, tpm2.Marshal(tpm2.ECCEKTemplate))
	for _, n := range []int{66, 66, 60} {
		v2, _ = wire.Append2B(v2, bytes.Repeat([]byte{0x5a}, n))
	}
	f.Add(v2)
	f.Fuzz(func(t *testing.T, b []byte) {
		ib, err := ParseBlob(b)
		info, ierr := InspectImportBlob(b)
		if (err == nil) != (ierr == nil) {
			t.Fatalf("parseImportBlob error %v, InspectImportBlob error %v", err, ierr)
		}
		if err != nil {
			return
		}
		if info.KeyID != wire.KeyID(ib.Name) || (ib.EK == nil) != (info.EKName == nil) {
			t.Fatalf("InspectImportBlob %+v disagrees with the parse", info)
		}
		if ib.EK == nil && (ib.Duplicate == nil || ib.Seed == nil) {
			t.Fatal("a version 1 blob parsed without its duplicate")
		}
	})
}
