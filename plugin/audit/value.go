package audit

import (
	"bytes"

	"google.golang.org/protobuf/encoding/protowire"
)

// Kind is how a stored value is protected, from its prefix.
type Kind string

// The kinds of stored value. KindUnreadable is a value kube-apiserver could not read
// with any provider: a KMS v2 prefix whose EncryptedObject does not parse or breaks
// kube-apiserver's rules, an envelope prefix without a provider name, or bytes that
// are neither an envelope nor a serialized object.
const (
	KindKMSv2      Kind = "kms-v2"
	KindKMSv1      Kind = "kms-v1"
	KindAESCBC     Kind = "aescbc"
	KindAESGCM     Kind = "aesgcm"
	KindSecretbox  Kind = "secretbox"
	KindIdentity   Kind = "identity"
	KindUnknown    Kind = "unknown-envelope" // "k8s:enc:" followed by a kind this package does not know
	KindUnreadable Kind = "unreadable"
)

const envelopePrefix = "k8s:enc:"

// kindPrefixes are the envelope prefixes kube-apiserver writes, before the name.
var kindPrefixes = []struct {
	kind   Kind
	prefix string
}{
	{KindKMSv2, "k8s:enc:kms:v2:"},
	{KindKMSv1, "k8s:enc:kms:v1:"},
	{KindAESCBC, "k8s:enc:aescbc:v1:"},
	{KindAESGCM, "k8s:enc:aesgcm:v1:"},
	{KindSecretbox, "k8s:enc:secretbox:v1:"},
}

// Limits kube-apiserver's KMS v2 envelope applies (kmsv2 envelope.go).
const (
	keyIDMaxSize              = 1024
	encryptedDEKSourceMaxSize = 1024
	annotationsMaxSize        = 32 * 1024
	maxNameLen                = 253
)

// Value is what Classify learned from one stored value. It holds no byte of the value
// except Name and KeyID, which are stored in clear by design.
type Value struct {
	Kind Kind
	// Name is the provider name (kms) or key name (aescbc, aesgcm, secretbox) from
	// the prefix; "?" if it is not printable.
	Name string
	// KeyID is the KMS v2 key_id (KindKMSv2 only).
	KeyID string
	// Why says, for KindUnreadable, what is wrong, in fixed words (never value bytes).
	Why string
}

// Classify reads the envelope prefix of one stored value and, for KMS v2, the key_id in
// its EncryptedObject. configured lists the provider prefixes of the resource's rule
// ("k8s:enc:kms:v2:hwkms:"): a value starting with one of them takes that name even if
// the name holds ':'. Classify never fails and never panics.
func Classify(v []byte, configured []string) Value {
	if !bytes.HasPrefix(v, []byte(envelopePrefix)) {
		switch {
		case len(v) > 0 && isJSONStart(v):
			return Value{Kind: KindIdentity}
		case bytes.HasPrefix(v, []byte("k8s\x00")):
			return Value{Kind: KindIdentity}
		case bytes.HasPrefix(v, []byte{0xd9, 0xd9, 0xf7}):
			return Value{Kind: KindIdentity}
		}
		return Value{Kind: KindUnreadable, Why: "neither an envelope nor a serialized object"}
	}
	for _, kp := range kindPrefixes {
		if !bytes.HasPrefix(v, []byte(kp.prefix)) {
			continue
		}
		name, rest, ok := "", []byte(nil), false
		for _, c := range configured {
			if len(c) > len(kp.prefix) && bytes.HasPrefix(v, []byte(c)) {
				name, rest, ok = c[len(kp.prefix):len(c)-1], v[len(c):], true
				break
			}
		}
		if !ok {
			after := v[len(kp.prefix):]
			i := bytes.IndexByte(after, ':')
			if i <= 0 || i > maxNameLen {
				return Value{Kind: KindUnreadable, Why: string(kp.kind) + " prefix without a provider name"}
			}
			name, rest = printable(after[:i]), after[i+1:]
		}
		if kp.kind != KindKMSv2 {
			return Value{Kind: kp.kind, Name: name}
		}
		keyID, why := parseEncryptedObject(rest)
		if why != "" {
			return Value{Kind: KindUnreadable, Name: name, Why: why}
		}
		return Value{Kind: KindKMSv2, Name: name, KeyID: keyID}
	}
	return Value{Kind: KindUnknown, Why: "unknown envelope kind"}
}

func isJSONStart(v []byte) bool {
	for _, c := range v {
		switch c {
		case ' ', '\t', '\r', '\n':
			continue
		case '{':
			return true
		}
		return false
	}
	return false
}

// printable returns b as a string if every byte is printable ASCII other than space,
// else "?".
func printable(b []byte) string {
	for _, c := range b {
		if c <= ' ' || c > '~' {
			return "?"
		}
	}
	return string(b)
}

// parseEncryptedObject decodes a KMS v2 EncryptedObject and applies kube-apiserver's
// validation (except the DNS form of annotation keys). It returns the key_id, or a
// fixed reason why kube-apiserver could not use the object.
func parseEncryptedObject(b []byte) (keyID string, why string) {
	var (
		dataLen, dekLen int
		annSize         int
		sourceType      uint64
		haveKeyID       bool
	)
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return "", "EncryptedObject: bad tag"
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return "", "EncryptedObject: truncated encryptedData"
			}
			dataLen, b = len(v), b[n:]
		case num == 2 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return "", "EncryptedObject: truncated keyID"
			}
			if len(v) > keyIDMaxSize {
				return "", "EncryptedObject: keyID longer than 1 kB"
			}
			keyID, haveKeyID, b = string(v), len(v) > 0, b[n:]
		case num == 3 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return "", "EncryptedObject: truncated encryptedDEKSource"
			}
			dekLen, b = len(v), b[n:]
		case num == 4 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return "", "EncryptedObject: truncated annotation"
			}
			size, ok := annotationEntrySize(v)
			if !ok {
				return "", "EncryptedObject: malformed annotation"
			}
			annSize += size
			b = b[n:]
		case num == 5 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return "", "EncryptedObject: truncated encryptedDEKSourceType"
			}
			sourceType, b = v, b[n:]
		case num >= 1 && num <= 5:
			return "", "EncryptedObject: field with the wrong wire type"
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return "", "EncryptedObject: truncated unknown field"
			}
			b = b[n:]
		}
	}
	switch {
	case sourceType > 1:
		return "", "EncryptedObject: unknown encryptedDEKSourceType"
	case dataLen == 0:
		return "", "EncryptedObject: encryptedData is empty"
	case dekLen == 0:
		return "", "EncryptedObject: encryptedDEKSource is empty"
	case dekLen > encryptedDEKSourceMaxSize:
		return "", "EncryptedObject: encryptedDEKSource longer than 1 kB"
	case !haveKeyID:
		return "", "EncryptedObject: keyID is empty"
	case annSize > annotationsMaxSize:
		return "", "EncryptedObject: annotations larger than 32 kB"
	}
	return keyID, ""
}

// annotationEntrySize checks one map<string, bytes> entry and returns len(key)+len(value).
func annotationEntrySize(b []byte) (int, bool) {
	size := 0
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, false
		}
		b = b[n:]
		if (num == 1 || num == 2) && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return 0, false
			}
			size += len(v)
			b = b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return 0, false
		}
		b = b[n:]
	}
	return size, true
}
