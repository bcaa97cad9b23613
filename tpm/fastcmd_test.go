package tpm

import (
	"bytes"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// TestSessionAttrsByte: the hand-written TPMA_SESSION encoding is go-tpm's, for every
// combination of the six defined bits, and the decoding inverts it and refuses the
// reserved bits.
func TestSessionAttrsByte(t *testing.T) {
	for m := range 64 {
		a := tpm2.TPMASession{
			ContinueSession: m&1 != 0, AuditExclusive: m&2 != 0, AuditReset: m&4 != 0,
			Decrypt: m&8 != 0, Encrypt: m&16 != 0, Audit: m&32 != 0,
		}
		want := tpm2.Marshal(&a)
		got := sessionAttrsByte(a)
		if len(want) != 1 || got != want[0] {
			t.Fatalf("%+v: sessionAttrsByte %#02x, go-tpm %x", a, got, want)
		}
		back, err := sessionAttrsFrom(got)
		if err != nil || back != a {
			t.Fatalf("sessionAttrsFrom(%#02x) = %+v, %v; want %+v", got, back, err, a)
		}
	}
	for _, b := range []byte{1 << 3, 1 << 4, 0xff} {
		if _, err := sessionAttrsFrom(b); !errors.Is(err, errFastResponse) {
			t.Errorf("sessionAttrsFrom(%#02x): %v, want errFastResponse", b, err)
		}
	}
}

// TestFastCommandsAgree runs every fast command and its go-tpm counterpart in turn on
// one KEK's session, on swtpm: the results are equal, and the session's nonce chain
// survives the alternation (each command's response HMAC is checked by the next
// one's Validate and by the TPM's check of the next command's HMAC).
func TestFastCommandsAgree(t *testing.T) {
	ctx := testCtx(t)
	t.Run("hmac", func(t *testing.T) {
		sim := swtpmtest.New(t)
		cfg := keyForms[1].cfg(t, sim)
		cfg.Kind = KindHMAC
		createKey(t, cfg)
		k := openKEK(t, sim, cfg)
		err := k.do(ctx, "test", func() error {
			for i := range 4 {
				in := bytes.Repeat([]byte{byte(i)}, 40+i)
				fast, err := hmacFast(k.c, k.sOut, k.kek, k.name, in)
				if err != nil {
					return err
				}
				rsp, err := tpm2.Hmac{
					Handle:  tpm2.AuthHandle{Handle: k.kek, Name: tpm2.TPM2BName{Buffer: k.name}, Auth: k.sOut},
					Buffer:  tpm2.TPM2BMaxBuffer{Buffer: in},
					HashAlg: tpm2.TPMAlgSHA256,
				}.Execute(k.c)
				if err != nil {
					return err
				}
				if !bytes.Equal(fast, rsp.OutHMAC.Buffer) || len(fast) != 32 {
					t.Errorf("input %d: fast HMAC %x, go-tpm %x", i, fast, rsp.OutHMAC.Buffer)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		assertOnlyOwn(t, k)
	})
	t.Run("sealed", func(t *testing.T) {
		sim := swtpmtest.New(t)
		cfg := keyForms[1].cfg(t, sim)
		createKey(t, cfg)
		k := openKEK(t, sim, cfg)
		seed := bytes.Repeat([]byte{0x5a}, 32)
		body, err := k.Wrap(ctx, seed, nil)
		if err != nil {
			t.Fatal(err)
		}
		pubBytes, priv, name, _, err := k.parseBody(body)
		if err != nil {
			t.Fatal(err)
		}
		err = k.do(ctx, "test", func() error {
			for range 2 {
				h, gotName, err := loadFast(k.c, k.sOut, k.kek, k.name, priv, pubBytes)
				if err != nil {
					return err
				}
				lr, err := tpm2.Load{
					ParentHandle: tpm2.AuthHandle{Handle: k.kek, Name: tpm2.TPM2BName{Buffer: k.name}, Auth: k.sOut},
					InPrivate:    tpm2.TPM2BPrivate{Buffer: priv},
					InPublic:     tpm2.BytesAs2B[tpm2.TPMTPublic](pubBytes),
				}.Execute(k.c)
				if err != nil {
					return err
				}
				if !bytes.Equal(gotName, name) || !bytes.Equal(lr.Name.Buffer, name) {
					t.Errorf("Names: fast %x, go-tpm %x, body %x", gotName, lr.Name.Buffer, name)
				}
				fast, err := unsealFast(k.c, k.sOut, h, name)
				if err != nil {
					return err
				}
				slow, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: lr.ObjectHandle, Name: tpm2.TPM2BName{Buffer: name}, Auth: k.sOut}}.Execute(k.c)
				if err != nil {
					return err
				}
				// The sealed data is SHA-256(aad) || seed.
				if !bytes.Equal(fast, slow.OutData.Buffer) || !bytes.HasSuffix(fast, seed) || len(fast) != 32+len(seed) {
					t.Errorf("unsealed: fast %x, go-tpm %x, want 32 bytes then %x", fast, slow.OutData.Buffer, seed)
				}
				if err := flushFast(k.c, h); err != nil {
					return err
				}
				if _, err := (tpm2.FlushContext{FlushHandle: lr.ObjectHandle}).Execute(k.c); err != nil {
					return err
				}
				// A flushed handle is gone: the TPM's error comes back as its TPMRC.
				if err := flushFast(k.c, h); !errors.Is(err, tpm2.TPMRCHandle) {
					t.Errorf("flushing a flushed handle: %v, want TPM_RC_HANDLE", err)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		assertOnlyOwn(t, k)
	})
}

// flipper passes commands to the TPM and flips one bit of each response.
type flipper struct {
	t   transport.TPM
	off int
}

func (f flipper) Send(cmd []byte) ([]byte, error) {
	rsp, err := f.t.Send(cmd)
	if err == nil && f.off < len(rsp) {
		rsp[f.off] ^= 0x04
	}
	return rsp, err
}

// TestFastTamperedResponse: a response with any one bit flipped, anywhere, is an
// error, never a result: header and lengths by parsing, the parameters, nonce,
// attributes and HMAC by the session's response HMAC. Afterwards the KEK reconnects
// and serves.
func TestFastTamperedResponse(t *testing.T) {
	sim := swtpmtest.New(t)
	cfg := keyForms[1].cfg(t, sim)
	cfg.Kind = KindHMAC
	createKey(t, cfg)
	k := openKEK(t, sim, cfg)
	ctx := testCtx(t)
	body, err := k.Wrap(ctx, []byte("seed"), nil)
	if err != nil {
		t.Fatal(err)
	}
	in := bytes.Repeat([]byte{7}, 40)
	var rspLen int
	if err := k.do(ctx, "measure", func() error {
		out, err := hmacFast(recorder{k.c, &rspLen}, k.sOut, k.kek, k.name, in)
		if err == nil && len(out) != 32 {
			t.Fatalf("HMAC of %d bytes", len(out))
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if rspLen < 80 {
		t.Fatalf("response of %d bytes: not the session response expected", rspLen)
	}
	for off := range rspLen {
		accepted := false
		_ = k.do(ctx, "tamper", func() error {
			_, err := hmacFast(flipper{k.c, off}, k.sOut, k.kek, k.name, in)
			if err == nil {
				accepted = true
			}
			k.needReset = true // the session's nonces are out of step now
			return err
		})
		if accepted {
			t.Fatalf("a response with byte %d of %d flipped was accepted", off, rspLen)
		}
	}
	if got, err := k.Unwrap(ctx, body, nil); err != nil || string(got) != "seed" {
		t.Fatalf("Unwrap after the tampering: %q, %v", got, err)
	}
}

// recorder passes commands through and records the length of the last response.
type recorder struct {
	t transport.TPM
	n *int
}

func (r recorder) Send(cmd []byte) ([]byte, error) {
	rsp, err := r.t.Send(cmd)
	*r.n = len(rsp)
	return rsp, err
}

// fakeSession is a tpm2.Session that authorises and validates anything, so that
// FuzzExecFastResponse reaches every branch of the response parser.
type fakeSession struct{ enc bool }

func (fakeSession) Init(transport.TPM) error           { return nil }
func (fakeSession) CleanupFailure(transport.TPM) error { return nil }
func (fakeSession) NonceTPM() tpm2.TPM2BNonce          { return tpm2.TPM2BNonce{} }
func (fakeSession) NewNonceCaller() error              { return nil }
func (fakeSession) IsDecryption() bool                 { return false }
func (s fakeSession) IsEncryption() bool               { return s.enc }
func (fakeSession) Encrypt([]byte) error               { return nil }
func (fakeSession) Decrypt(p []byte) error             { clear(p); return nil }
func (fakeSession) Handle() tpm2.TPMHandle             { return 0x02000000 }
func (fakeSession) Authorize(tpm2.TPMCC, []byte, []byte, []tpm2.TPM2BName, int) (*tpm2.TPMSAuthCommand, error) {
	return &tpm2.TPMSAuthCommand{Handle: 0x02000000, Nonce: tpm2.TPM2BNonce{Buffer: make([]byte, 16)}}, nil
}
func (fakeSession) Validate(tpm2.TPMRC, tpm2.TPMCC, []byte, []tpm2.TPM2BName, int, *tpm2.TPMSAuthResponse) error {
	return nil
}

// canned answers every command with one response.
type canned []byte

func (c canned) Send([]byte) ([]byte, error) { return append([]byte(nil), c...), nil }

// FuzzExecFastResponse: no response, however malformed, makes execFast panic, and a
// response it accepts has the layout it claims.
func FuzzExecFastResponse(f *testing.F) {
	ok := []byte{0x80, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 2, 0xaa, 0xbb, 0, 0, 1, 0, 0}
	ok[5] = byte(len(ok))
	f.Add(ok, true)
	f.Add([]byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0}, false)
	f.Add([]byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 1, 0x8b}, true)
	f.Fuzz(func(t *testing.T, rsp []byte, withSession bool) {
		var sess tpm2.Session
		if withSession {
			sess = fakeSession{enc: true}
		}
		_, params, err := execFast(canned(rsp), sess, fastCmd{cc: tpm2.TPMCCHMAC, handles: []tpm2.TPMHandle{0x81000000}, names: []tpm2.TPM2BName{{}}, params: []byte{0, 0, 0, 0x0b}})
		if err != nil {
			return
		}
		if len(params) > len(rsp) {
			t.Fatalf("%d parameter bytes from a %d-byte response", len(params), len(rsp))
		}
		if v, err := only2B(params); err == nil && len(v)+2 != len(params) {
			t.Fatalf("only2B kept %d of %d bytes", len(v), len(params))
		}
	})
}
