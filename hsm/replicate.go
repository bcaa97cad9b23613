package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

// Replication of a KEK between per-node tokens (docs/ha.md, "per-node tokens").
//
// An ordinary hwkms KEK is created with CKA_EXTRACTABLE false and can never be
// copied. A replicable KEK is created on purpose with CreateReplicableKey:
// CKA_SENSITIVE true (its value is never readable in plaintext) but
// CKA_EXTRACTABLE true, so C_WrapKey can move it to another token. ReplicateKey
// then copies it to a destination token under a transport key that exists only
// inside the two tokens for the duration of the call: each token generates an
// ephemeral P-256 key pair (session objects), and each derives the same AES-256
// key from its private key and the other's public point (C_DeriveKey,
// CKM_ECDH1_DERIVE with CKD_NULL). The source wraps the KEK with
// CKM_AES_KEY_WRAP_PAD (RFC 5649) under its copy, the destination unwraps it under
// its copy with the same CKA_LABEL and CKA_ID (hence the same key_id) as a
// sensitive, non-extractable key. The ephemeral keys are session objects and
// vanish with the sessions; the wrapped bytes leave the tokens but are useless
// without the transport key.
//
// Such keys are refused by Open unless the config says so: the source copy (it is
// extractable) needs allowExtractable, or allowReplicated if it was created with
// CKA_WRAP_WITH_TRUSTED (then only a key the token's SO marked CKA_TRUSTED can wrap
// it); a destination copy (sensitive, not extractable, but CKA_NEVER_EXTRACTABLE
// false because it was unwrapped) needs allowReplicated.
//
// Measured on SoftHSM 2.6.1: wrap, ECDH derive, AES_KEY_WRAP_PAD through
// C_WrapKey/C_UnwrapKey all work. CKA_TRUSTED can be set only in an SO session, and
// hwkms's module handling logs in as the user, so the ephemeral transport key is
// never trusted: a KEK created with wrapWithTrusted cannot be replicated by
// ReplicateKey on SoftHSM (C_WrapKey returns CKR_KEY_NOT_WRAPPABLE); on an HSM
// where the SO can approve a transport key, use the vendor's procedure.

// p11Wrap is the part of *pkcs11.Ctx replication needs beyond p11.
type p11Wrap interface {
	p11
	GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error)
	DeriveKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, base pkcs11.ObjectHandle, a []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	WrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, wrappingkey, key pkcs11.ObjectHandle) ([]byte, error)
	UnwrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, unwrappingkey pkcs11.ObjectHandle, wrappedkey []byte, a []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
}

// p256OID is the DER OID of NIST P-256 (CKA_EC_PARAMS).
var p256OID = []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}

// ReplicableOptions tune CreateReplicableKey.
type ReplicableOptions struct {
	// WrapWithTrusted sets CKA_WRAP_WITH_TRUSTED: only a wrapping key with
	// CKA_TRUSTED (set by the token's SO) can wrap the KEK.
	WrapWithTrusted bool
}

// kekAttrs is the template of an hwkms KEK with the given CKA_EXTRACTABLE.
func kekAttrs(label string, id []byte, extractable bool) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, extractable),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
}

// CreateReplicableKey is CreateKey for a KEK that ReplicateKey can copy to other
// tokens: the same template except CKA_EXTRACTABLE true (and CKA_WRAP_WITH_TRUSTED
// if asked). CKA_SENSITIVE stays true, so the value is never readable in plaintext,
// only wrappable. Open refuses it unless allowExtractable (or, with
// WrapWithTrusted, allowReplicated) is set.
func CreateReplicableKey(ctx context.Context, cfg Config, opts ReplicableOptions) (KeyInfo, error) {
	cfg = cfg.Resolved()
	if cfg.KeyCKAID != "" {
		return KeyInfo{}, errors.New("hsm: keyCKAID must not be set when creating a key: a random CKA_ID is generated")
	}
	var ki KeyInfo
	err := adminSession(ctx, cfg, true, func(t *token, sh pkcs11.SessionHandle) error {
		if err := refuseExisting(t, sh, cfg.KeyLabel); err != nil {
			return err
		}
		id := make([]byte, 16)
		if _, err := rand.Read(id); err != nil {
			return fmt.Errorf("hsm: generating CKA_ID: %w", err)
		}
		tmpl := append(kekAttrs(cfg.KeyLabel, id, true), pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32))
		if opts.WrapWithTrusted {
			tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_WRAP_WITH_TRUSTED, true))
		}
		h, err := t.ctx.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, tmpl)
		if err != nil {
			return opError{op: "C_GenerateKey", err: err}
		}
		ki, _, err = readKeyInfo(t.ctx, sh, h)
		if err == nil && (!ki.Sensitive || !ki.Extractable) {
			err = fmt.Errorf("hsm: token %q did not honour the replicable key template: %w", t.label, ErrUnsafeKey)
		}
		if err != nil {
			if derr := t.ctx.DestroyObject(sh, h); derr != nil {
				return errors.Join(err, fmt.Errorf("hsm: C_DestroyObject of the new key failed; destroy it by hand: %w", derr))
			}
			return err
		}
		return nil
	})
	if err != nil {
		return KeyInfo{}, err
	}
	return ki, nil
}

func refuseExisting(t *token, sh pkcs11.SessionHandle, label string) error {
	existing, err := findObjects(t.ctx, sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)})
	if err != nil {
		return err
	}
	if len(existing) > 0 {
		return fmt.Errorf("hsm: token %q already has %d object(s) labelled %q: %w", t.label, len(existing), label, kek.ErrKeyExists)
	}
	return nil
}

// ReplicateKey copies the replicable KEK selected by src (label, and CKA_ID if set)
// to the token selected by dst, under the ECDH-derived transport key described
// above, with the same CKA_LABEL and CKA_ID; dst.KeyLabel must equal
// src.KeyLabel. The copy is CKA_SENSITIVE and not extractable. It refuses a source
// key that is not sensitive or not extractable, and a destination token that
// already has an object with the label (kek.ErrKeyExists). Both tokens must be
// reachable from this process (for network HSMs, from the admin host).
func ReplicateKey(ctx context.Context, src, dst Config) (KeyInfo, error) {
	src, dst = src.Resolved(), dst.Resolved()
	if src.KeyLabel != dst.KeyLabel {
		return KeyInfo{}, errors.New("hsm: replicate: source and destination keyLabel differ (the key_id depends on it)")
	}
	// Both tokens are acquired (which may log in, holding a module gate exclusively)
	// before either gate is held for reading: nesting adminSession would deadlock when
	// both tokens are on one module.
	st, err := acquireAdminToken(ctx, src)
	if err != nil {
		return KeyInfo{}, err
	}
	defer releaseToken(st) //nolint:errcheck // a release error cannot undo the copy
	dt, err := acquireAdminToken(ctx, dst)
	if err != nil {
		return KeyInfo{}, err
	}
	defer releaseToken(dt) //nolint:errcheck // as above
	if dt == st {
		return KeyInfo{}, errors.New("hsm: replicate: source and destination are the same token")
	}
	st.mod.gate.RLock()
	defer st.mod.gate.RUnlock()
	if dt.mod != st.mod {
		dt.mod.gate.RLock()
		defer dt.mod.gate.RUnlock()
	}
	var out KeyInfo
	err = withSession(st, true, func(st *token, ssh pkcs11.SessionHandle) error {
		sc, ok := st.ctx.(p11Wrap)
		if !ok {
			return errors.New("hsm: replicate: module wrapper lacks C_WrapKey")
		}
		kh, ki, ckaID, err := selectKey(sc, ssh, st.label, src.KeyLabel, src.ckaID(), true)
		if err != nil {
			return err
		}
		if !ki.Sensitive || !ki.Extractable {
			return fmt.Errorf("hsm: replicate: key %q on token %q is not a replicable key (want CKA_SENSITIVE and CKA_EXTRACTABLE true; create it with --replicable)", ki.Label, st.label)
		}
		return withSession(dt, true, func(dt *token, dsh pkcs11.SessionHandle) error {
			dc, ok := dt.ctx.(p11Wrap)
			if !ok {
				return errors.New("hsm: replicate: module wrapper lacks C_UnwrapKey")
			}
			if err := refuseExisting(dt, dsh, dst.KeyLabel); err != nil {
				return err
			}
			sPriv, sPoint, err := ephemeralECDH(sc, ssh)
			if err != nil {
				return err
			}
			defer sc.DestroyObject(ssh, sPriv) //nolint:errcheck // session object, gone with the session anyway
			dPriv, dPoint, err := ephemeralECDH(dc, dsh)
			if err != nil {
				return err
			}
			defer dc.DestroyObject(dsh, dPriv) //nolint:errcheck // as above
			sT, err := deriveTransport(sc, ssh, sPriv, dPoint, pkcs11.CKA_WRAP)
			if err != nil {
				return err
			}
			defer sc.DestroyObject(ssh, sT) //nolint:errcheck // as above
			dT, err := deriveTransport(dc, dsh, dPriv, sPoint, pkcs11.CKA_UNWRAP)
			if err != nil {
				return err
			}
			defer dc.DestroyObject(dsh, dT) //nolint:errcheck // as above
			mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP_PAD, nil)}
			wrapped, err := sc.WrapKey(ssh, mech, sT, kh)
			if err != nil {
				return opError{op: "C_WrapKey", err: err}
			}
			defer clear(wrapped)
			nh, err := dc.UnwrapKey(dsh, mech, dT, wrapped, kekAttrs(ki.Label, ckaID, false))
			if err != nil {
				return opError{op: "C_UnwrapKey", err: err}
			}
			out, _, err = readKeyInfo(dc, dsh, nh)
			if err == nil && (out.KeyID != ki.KeyID || out.Extractable || !out.Sensitive) {
				err = fmt.Errorf("hsm: replicate: token %q did not honour the unwrap template: %w", dt.label, ErrUnsafeKey)
			}
			if err != nil {
				if derr := dc.DestroyObject(dsh, nh); derr != nil {
					return errors.Join(err, fmt.Errorf("hsm: C_DestroyObject of the copy failed; destroy it by hand: %w", derr))
				}
				return err
			}
			return nil
		})
	})
	if err != nil {
		return KeyInfo{}, err
	}
	return out, nil
}

// ephemeralECDH generates a P-256 key pair as session objects and returns the
// private key handle and the public point (CKA_EC_POINT). The public object is
// destroyed at once.
func ephemeralECDH(c p11Wrap, sh pkcs11.SessionHandle) (pkcs11.ObjectHandle, []byte, error) {
	pub, priv, err := c.GenerateKeyPair(sh,
		[]*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, p256OID),
		},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true),
		})
	if err != nil {
		return 0, nil, opError{op: "C_GenerateKeyPair", err: err}
	}
	defer c.DestroyObject(sh, pub) //nolint:errcheck // session object
	attrs, err := c.GetAttributeValue(sh, pub, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil)})
	if err != nil {
		c.DestroyObject(sh, priv) //nolint:errcheck // session object
		return 0, nil, opError{op: "C_GetAttributeValue(CKA_EC_POINT)", err: err}
	}
	point := attrs[0].Value
	// CKA_EC_POINT is a DER OCTET STRING around 04||X||Y; ECDH1 takes the raw point.
	if len(point) == 67 && point[0] == 0x04 && point[1] == 65 {
		point = point[2:]
	}
	return priv, bytes.Clone(point), nil
}

// deriveTransport derives an AES-256 session key from priv and the peer's point
// (CKM_ECDH1_DERIVE, CKD_NULL: the key is the leading 32 bytes of the shared
// x-coordinate, the same on both tokens), usable only for use (CKA_WRAP or
// CKA_UNWRAP), sensitive and not extractable.
func deriveTransport(c p11Wrap, sh pkcs11.SessionHandle, priv pkcs11.ObjectHandle, peer []byte, use uint) (pkcs11.ObjectHandle, error) {
	h, err := c.DeriveKey(sh,
		[]*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDH1_DERIVE, pkcs11.NewECDH1DeriveParams(pkcs11.CKD_NULL, nil, peer))},
		priv,
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(use, true),
		})
	if err != nil {
		return 0, opError{op: "C_DeriveKey(CKM_ECDH1_DERIVE)", err: err}
	}
	return h, nil
}

// replicaAcceptable reports whether a key that is not Safe may still be used under
// allowReplicated: sensitive, with a CKA_ID, and either a replica (not extractable;
// CKA_NEVER_EXTRACTABLE false only because it was unwrapped) or a replicable source
// that only a trusted key can wrap.
func replicaAcceptable(c p11, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle, ki KeyInfo) (bool, error) {
	if !ki.Sensitive || ki.CKAID == "" {
		return false, nil
	}
	if !ki.Extractable {
		return true, nil
	}
	attrs, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_WRAP_WITH_TRUSTED, nil)})
	if err != nil {
		return false, opError{op: "C_GetAttributeValue(CKA_WRAP_WITH_TRUSTED)", err: err}
	}
	v := attrs[0].Value
	return len(v) == 1 && v[0] != 0, nil
}
