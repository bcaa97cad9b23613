package audit

import (
	"bytes"
	"testing"
)

// FuzzClassify: no stored value makes Classify panic, a KMS v2 result always has a
// key_id kube-apiserver would accept, and no result carries value bytes beyond the
// name and key_id.
func FuzzClassify(f *testing.F) {
	f.Add(kmsv2("hwkms", good("p11:abc")))
	f.Add([]byte("k8s:enc:aescbc:v1:k1:xxxx"))
	f.Add([]byte("k8s:enc:kms:v2:hwkms:\x0a\x01"))
	f.Add([]byte(`{"kind":"Secret"}`))
	f.Add([]byte("k8s\x00\x0a"))
	f.Fuzz(func(t *testing.T, v []byte) {
		got := Classify(v, []string{"k8s:enc:kms:v2:hwkms:"})
		if got.Kind == KindKMSv2 && (got.KeyID == "" || len(got.KeyID) > keyIDMaxSize) {
			t.Fatalf("KMS v2 with key_id of %d bytes", len(got.KeyID))
		}
		if got.Kind == KindKMSv2 && !bytes.Contains(v, []byte(got.KeyID)) {
			t.Fatal("key_id not from the value")
		}
	})
}
