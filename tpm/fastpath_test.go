package tpm

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/tpm/internal/wire"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// slowParse is what Unwrap decided before the fast path.
func slowParse(b []byte, imported bool) (pubBytes, priv, name []byte, userWithAuth bool, ok bool) {
	pub, pubBytes, priv, err := decodeObject(bodyV1, b)
	if err == nil {
		err = checkSealedPublicFor(pub, imported)
	}
	if err != nil {
		return nil, nil, nil, false, false
	}
	name, err = wire.ObjectName(pub)
	if err != nil {
		return nil, nil, nil, false, false
	}
	return pubBytes, priv, name, pub.ObjectAttributes.UserWithAuth, true
}

func bodyFor(t testing.TB, imported bool, policy []byte) []byte {
	t.Helper()
	pub := sealedTemplateFor(policy, imported)
	unique := make([]byte, 32)
	for i := range unique {
		unique[i] = byte(i * 7)
	}
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: unique})
	b, err := encodeObject(bodyV1, tpm2.Marshal(pub), []byte{0, 32, 9, 8, 7, 6, 5})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestFastPathAgrees: whatever the fast path accepts, the slow path accepts with the
// same areas and Name and userWithAuth set; the fast path does accept Wrap's form;
// and a body it declines is left to the slow path (which may accept it, e.g. a
// PCR-policy object).
func TestFastPathAgrees(t *testing.T) {
	check := func(t *testing.T, b []byte, imported bool) bool {
		t.Helper()
		fp, fpriv, fname, fok := parseSealedFast(b, imported)
		sp, spriv, sname, suwa, sok := slowParse(b, imported)
		if fok && (!sok || !suwa || !bytes.Equal(fp, sp) || !bytes.Equal(fpriv, spriv) || !bytes.Equal(fname, sname)) {
			t.Fatalf("fast path accepts %x (imported %v) but the slow path says ok=%v userWithAuth=%v name %x vs %x", b, imported, sok, suwa, sname, fname)
		}
		return fok
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for _, imported := range []bool{false, true} {
		good := bodyFor(t, imported, nil)
		if !check(t, good, imported) {
			t.Fatalf("fast path declines Wrap's own form (imported %v)", imported)
		}
		if check(t, good, !imported) {
			t.Fatalf("fast path accepts a body of the other KEK form (imported %v)", imported)
		}
		if check(t, bodyFor(t, imported, bytes.Repeat([]byte{1}, 32)), imported) {
			t.Fatal("fast path accepts a PCR-policy object")
		}
		for i := range good {
			for bit := range 8 {
				b := bytes.Clone(good)
				b[i] ^= 1 << bit
				check(t, b, imported)
			}
			check(t, good[:i], imported)
			check(t, append(bytes.Clone(good[:i]), good[i+1:]...), imported)
		}
		check(t, append(bytes.Clone(good), 0), imported)
		for range 2000 {
			b := bytes.Clone(good)
			for range 1 + rng.IntN(4) {
				b[rng.IntN(len(b))] = byte(rng.Uint32())
			}
			check(t, b, imported)
		}
	}
}

// TestFastPathOnSwtpm: a body Wrap made on a real TPM takes the fast path and
// unwraps.
func TestFastPathOnSwtpm(t *testing.T) {
	sim := swtpmtest.New(t)
	cfg := keyForms[1].cfg(t, sim)
	createKey(t, cfg)
	k := openKEK(t, sim, cfg)
	body, err := k.Wrap(testCtx(t), []byte("seed"), []byte("aad"))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, ok := parseSealedFast(body, k.imported); !ok {
		t.Fatal("a body made by Wrap does not take the fast path")
	}
	if got, err := k.Unwrap(testCtx(t), body, []byte("aad")); err != nil || string(got) != "seed" {
		t.Fatalf("Unwrap = %q, %v", got, err)
	}
}
