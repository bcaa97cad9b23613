package hsm

import (
	"context"
	"errors"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

// TestReplicateKey copies a replicable KEK from token A to token B: same key_id, a
// body wrapped via A unwraps via B and the other way round; the copy is sensitive
// and not extractable, and is refused without allowReplicated.
func TestReplicateKey(t *testing.T) {
	fx, toks := newTokens(t, 2)
	ctx := context.Background()
	src := cfgFor(fx, toks[0], "kek-ha")
	dst := cfgFor(fx, toks[1], "kek-ha")

	// An ordinary (non-extractable) KEK cannot be replicated.
	plain := cfgFor(fx, toks[0], "kek-plain")
	createKey(t, plain)
	plainDst := cfgFor(fx, toks[1], "kek-plain")
	if _, err := ReplicateKey(ctx, plain, plainDst); err == nil {
		t.Fatal("ReplicateKey of a non-extractable KEK succeeded")
	}

	ki, err := CreateReplicableKey(ctx, src, ReplicableOptions{})
	if err != nil {
		t.Fatalf("CreateReplicableKey: %v", err)
	}
	if !ki.Extractable || !ki.Sensitive || ki.Safe() {
		t.Fatalf("replicable key attributes: %+v", ki)
	}
	got, err := ReplicateKey(ctx, src, dst)
	if err != nil {
		t.Fatalf("ReplicateKey: %v", err)
	}
	if got.KeyID != ki.KeyID || got.CKAID != ki.CKAID || got.Label != ki.Label {
		t.Fatalf("replica %+v, source %+v", got, ki)
	}
	if got.Extractable || !got.Sensitive || got.NeverExtractable {
		t.Errorf("replica attributes: %+v", got)
	}
	if _, err := ReplicateKey(ctx, src, dst); !errors.Is(err, kek.ErrKeyExists) {
		t.Errorf("second ReplicateKey = %v, want kek.ErrKeyExists", err)
	}

	// Neither copy opens by default.
	for _, c := range []Config{src, dst} {
		if k, err := Open(ctx, c); !errors.Is(err, ErrUnsafeKey) {
			if k != nil {
				k.Close()
			}
			t.Errorf("Open(%s) without a flag = %v, want ErrUnsafeKey", c.TokenLabel, err)
		}
	}
	// allowReplicated accepts the replica but not an extractable source without
	// CKA_WRAP_WITH_TRUSTED; the source needs allowExtractable.
	srcRepl := src
	srcRepl.AllowReplicated = true
	if k, err := Open(ctx, srcRepl); !errors.Is(err, ErrUnsafeKey) {
		if k != nil {
			k.Close()
		}
		t.Errorf("Open(source, allowReplicated) = %v, want ErrUnsafeKey", err)
	}
	src.AllowExtractable = true
	dst.AllowReplicated = true
	a, b := openKEK(t, src), openKEK(t, dst)
	if a.ID() != b.ID() {
		t.Fatalf("key_id %s on A, %s on B", a.ID(), b.ID())
	}
	for _, pair := range [][2]*KEK{{a, b}, {b, a}} {
		pt, aad := []byte("0123456789abcdef0123456789abcdef"), []byte("aad")
		body, err := pair[0].Wrap(ctx, pt, aad)
		if err != nil {
			t.Fatal(err)
		}
		out, err := pair[1].Unwrap(ctx, body, aad)
		if err != nil {
			t.Fatalf("Unwrap on the other token: %v", err)
		}
		if string(out) != string(pt) {
			t.Fatal("other token unwrapped to other bytes")
		}
	}

	// The replica's value cannot be read, nor wrapped out again.
	c, sh := rawSession(t, dst)
	h, _, _, err := selectKey(c, sh, toks[1].Label, dst.KeyLabel, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)}); err == nil {
		t.Error("CKA_VALUE of the replica was readable")
	}
}

// TestReplicateWrapWithTrusted records what SoftHSM does with CKA_WRAP_WITH_TRUSTED:
// the ephemeral transport key is not CKA_TRUSTED (only an SO can set that), so the
// token refuses to wrap, and nothing is left on the destination.
func TestReplicateWrapWithTrusted(t *testing.T) {
	fx, toks := newTokens(t, 2)
	ctx := context.Background()
	src := cfgFor(fx, toks[0], "kek-trusted")
	dst := cfgFor(fx, toks[1], "kek-trusted")
	if _, err := CreateReplicableKey(ctx, src, ReplicableOptions{WrapWithTrusted: true}); err != nil {
		t.Fatal(err)
	}
	_, err := ReplicateKey(ctx, src, dst)
	if err == nil {
		t.Fatal("ReplicateKey of a wrap-with-trusted key under an untrusted transport key succeeded")
	}
	t.Logf("ReplicateKey: %v", err)
	if keys, err := ListKeys(ctx, dst); err != nil || len(keys) != 0 {
		t.Errorf("destination holds %v, %v", keys, err)
	}
	// allowReplicated accepts the wrap-with-trusted source.
	src.AllowReplicated = true
	openKEK(t, src)
}
