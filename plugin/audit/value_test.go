package audit

import (
	"bytes"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
	"google.golang.org/protobuf/encoding/protowire"
)

// eo builds an EncryptedObject with protowire, field by field.
type eo struct {
	data, dek  []byte
	keyID      string
	sourceType uint64
	ann        map[string][]byte
}

func (o eo) bytes() []byte {
	var b []byte
	if o.data != nil {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendBytes(b, o.data)
	}
	if o.keyID != "" {
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendString(b, o.keyID)
	}
	if o.dek != nil {
		b = protowire.AppendTag(b, 3, protowire.BytesType)
		b = protowire.AppendBytes(b, o.dek)
	}
	for k, v := range o.ann {
		var e []byte
		e = protowire.AppendTag(e, 1, protowire.BytesType)
		e = protowire.AppendString(e, k)
		e = protowire.AppendTag(e, 2, protowire.BytesType)
		e = protowire.AppendBytes(e, v)
		b = protowire.AppendTag(b, 4, protowire.BytesType)
		b = protowire.AppendBytes(b, e)
	}
	if o.sourceType != 0 {
		b = protowire.AppendTag(b, 5, protowire.VarintType)
		b = protowire.AppendVarint(b, o.sourceType)
	}
	return b
}

func good(keyID string) eo {
	return eo{data: bytes.Repeat([]byte{0xaa}, 100), dek: bytes.Repeat([]byte{0xbb}, 48), keyID: keyID, sourceType: 1,
		ann: map[string][]byte{"kms.hwkms.io/v": {1}}}
}

func kmsv2(name string, o eo) []byte { return append([]byte("k8s:enc:kms:v2:"+name+":"), o.bytes()...) }

func TestClassify(t *testing.T) {
	long := good(strings.Repeat("k", 1025))
	bigDEK := good("k")
	bigDEK.dek = make([]byte, 1025)
	noDEK := good("k")
	noDEK.dek = nil
	noData := good("k")
	noData.data = []byte{}
	badType := good("k")
	badType.sourceType = 2
	bigAnn := good("k")
	bigAnn.ann = map[string][]byte{"a.example.com": make([]byte, 32*1024)}
	aesGCMKey := good("k")
	aesGCMKey.sourceType = 0
	valid := kmsv2("hwkms", good("p11:abc"))
	wrongWire := append([]byte("k8s:enc:kms:v2:hwkms:"), protowire.AppendVarint(protowire.AppendTag(nil, 2, protowire.VarintType), 7)...)
	unknownField := append(kmsv2("hwkms", good("k")), protowire.AppendVarint(protowire.AppendTag(nil, 9, protowire.VarintType), 1)...)

	tests := []struct {
		name       string
		v          []byte
		configured []string
		want       Value
	}{
		{"kms v2", valid, nil, Value{Kind: KindKMSv2, Name: "hwkms", KeyID: "p11:abc"}},
		{"kms v2 AES_GCM_KEY source type", kmsv2("hwkms", aesGCMKey), nil, Value{Kind: KindKMSv2, Name: "hwkms", KeyID: "k"}},
		{"kms v2 unknown field skipped", unknownField, nil, Value{Kind: KindKMSv2, Name: "hwkms", KeyID: "k"}},
		{"kms v2 configured name with colon", kmsv2("a:b", good("k")), []string{"k8s:enc:kms:v2:a:b:"}, Value{Kind: KindKMSv2, Name: "a:b", KeyID: "k"}},
		{"kms v2 truncated", valid[:len(valid)-10], nil, Value{Kind: KindUnreadable, Name: "hwkms"}},
		{"kms v2 empty body", []byte("k8s:enc:kms:v2:hwkms:"), nil, Value{Kind: KindUnreadable, Name: "hwkms"}},
		{"kms v2 garbage body", []byte("k8s:enc:kms:v2:hwkms:\xff\xff\xff\xff"), nil, Value{Kind: KindUnreadable, Name: "hwkms"}},
		{"kms v2 no name", []byte("k8s:enc:kms:v2:"), nil, Value{Kind: KindUnreadable}},
		{"kms v2 empty name", []byte("k8s:enc:kms:v2::x"), nil, Value{Kind: KindUnreadable}},
		{"kms v2 empty key_id", kmsv2("hwkms", good("")), nil, Value{Kind: KindUnreadable, Name: "hwkms"}},
		{"kms v2 key_id over 1 kB", kmsv2("hwkms", long), nil, Value{Kind: KindUnreadable, Name: "hwkms"}},
		{"kms v2 DEK source over 1 kB", kmsv2("hwkms", bigDEK), nil, Value{Kind: KindUnreadable, Name: "hwkms"}},
		{"kms v2 no DEK source", kmsv2("hwkms", noDEK), nil, Value{Kind: KindUnreadable, Name: "hwkms"}},
		{"kms v2 empty data", kmsv2("hwkms", noData), nil, Value{Kind: KindUnreadable, Name: "hwkms"}},
		{"kms v2 unknown source type", kmsv2("hwkms", badType), nil, Value{Kind: KindUnreadable, Name: "hwkms"}},
		{"kms v2 annotations over 32 kB", kmsv2("hwkms", bigAnn), nil, Value{Kind: KindUnreadable, Name: "hwkms"}},
		{"kms v2 wrong wire type", wrongWire, nil, Value{Kind: KindUnreadable, Name: "hwkms"}},
		{"kms v2 unprintable name", kmsv2("a\x1b[2J", good("k")), nil, Value{Kind: KindKMSv2, Name: "?", KeyID: "k"}},
		{"kms v1", []byte("k8s:enc:kms:v1:old:\x00\x01..."), nil, Value{Kind: KindKMSv1, Name: "old"}},
		{"aescbc", []byte("k8s:enc:aescbc:v1:key1:\x00\x01"), nil, Value{Kind: KindAESCBC, Name: "key1"}},
		{"aesgcm", []byte("k8s:enc:aesgcm:v1:key2:\x00"), nil, Value{Kind: KindAESGCM, Name: "key2"}},
		{"secretbox", []byte("k8s:enc:secretbox:v1:sb:\x00"), nil, Value{Kind: KindSecretbox, Name: "sb"}},
		{"aescbc without name", []byte("k8s:enc:aescbc:v1:"), nil, Value{Kind: KindUnreadable}},
		{"unknown envelope", []byte("k8s:enc:rot13:v1:x:abc"), nil, Value{Kind: KindUnknown}},
		{"identity JSON", []byte(`{"kind":"Secret"}`), nil, Value{Kind: KindIdentity}},
		{"identity JSON with space", []byte("\n  {\"kind\":\"Secret\"}"), nil, Value{Kind: KindIdentity}},
		{"identity protobuf", []byte("k8s\x00\n\x0c\n\x02v1\x12\x06Secret"), nil, Value{Kind: KindIdentity}},
		{"identity CBOR", []byte{0xd9, 0xd9, 0xf7, 0xa1}, nil, Value{Kind: KindIdentity}},
		{"garbage", []byte{0x01, 0x02, 0x03}, nil, Value{Kind: KindUnreadable}},
		{"empty", nil, nil, Value{Kind: KindUnreadable}},
		{"only spaces", []byte("   "), nil, Value{Kind: KindUnreadable}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Classify(tt.v, tt.configured)
			if got.Kind != tt.want.Kind || got.Name != tt.want.Name || got.KeyID != tt.want.KeyID {
				t.Errorf("Classify = %+v, want %+v", got, tt.want)
			}
			if got.Kind == KindUnreadable && got.Why == "" {
				t.Errorf("Why = %q for kind %s", got.Why, got.Kind)
			}
		})
	}
}

// TestClassifyEveryTruncation: no prefix of a valid value panics; a prefix is either
// unreadable, or (cut at a field boundary after the key_id, which protobuf cannot tell
// from a complete object) still counted under the same key_id: truncation never moves
// an object to another key_id or out of the key's count unnoticed.
func TestClassifyEveryTruncation(t *testing.T) {
	v := kmsv2("hwkms", good("p11:0123456789abcdef"))
	valid := 0
	for i := range len(v) {
		got := Classify(v[:i], nil)
		if got.Kind == KindKMSv2 {
			valid++
			if got.KeyID != "p11:0123456789abcdef" {
				t.Fatalf("prefix of %d/%d bytes: key_id %q", i, len(v), got.KeyID)
			}
		} else if i > len("k8s:enc:kms:v2:hwkms:") && got.Kind != KindUnreadable {
			t.Fatalf("prefix of %d/%d bytes: %+v", i, len(v), got)
		}
	}
	if valid > 3 { // after the DEK source, after the annotation, (after the type)
		t.Errorf("%d truncations parse as complete objects", valid)
	}
	if got := Classify(v, nil); got.Kind != KindKMSv2 {
		t.Fatalf("whole value: %+v", got)
	}
	// Flipping any byte of the body never panics.
	for i := range len(v) {
		w := bytes.Clone(v)
		w[i] ^= 0xff
		Classify(w, nil)
	}
}

func TestKeyIDHash(t *testing.T) {
	// printf %s 'p11:abc' | sha256sum
	if got, want := kek.APIServerKeyIDHash("p11:abc"), "sha256:9db7cb80b6df5f1eefea8517353823d76e2c5904cb912254efc0543b2d1f3c9d"; got != want {
		t.Errorf("KeyIDHash = %s, want %s", got, want)
	}
	if kek.APIServerKeyIDHash("") != "" {
		t.Error("KeyIDHash of the empty key_id is not empty, unlike kube-apiserver's getHash")
	}
}
