package tpm

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// The commands of every Decrypt, marshalled without reflection.
//
// Profiling BenchmarkUnwrapHMAC on swtpm showed about two thirds of the client's CPU
// per TPM2_HMAC in go-tpm's reflection-driven marshalling of the command and its
// response (tpm2.execute: marshalStruct, cmdSessions, unmarshalStruct), not in the
// session's cryptography. While that runs the KEK holds the TPM, which serves one
// command at a time, so the client's marshalling is TPM time no other call can use.
//
// execFast builds the same bytes for the few commands a Decrypt sends (TPM2_HMAC,
// TPM2_Load, TPM2_Unseal, TPM2_FlushContext), with the session arithmetic left to
// go-tpm: NewNonceCaller, Authorize (cpHash and the command HMAC), Validate (rpHash,
// the response HMAC, compared in constant time) and Decrypt (the response parameter's
// AES-CFB) are go-tpm's exported tpm2.Session methods, called in the order tpm2's
// execute calls them. Only the framing is ours, and it is parsed strictly: every
// length is checked against what is left, and bytes left over are an error.
// TestFastCommandsAgree runs each command both ways on one session and compares.

// fastCmd is one command for execFast.
type fastCmd struct {
	cc      tpm2.TPMCC
	handles []tpm2.TPMHandle // the handle area
	names   []tpm2.TPM2BName // the Names of handles, for the session's cpHash
	params  []byte           // the marshalled parameter area (never encrypted)
	// rspHandles is the number of handles the response carries before its parameters.
	rspHandles int
}

// errFastResponse marks a response execFast cannot parse. It is a transport-class
// failure: the connection is torn down (needsReset), as after a garbled frame.
var errFastResponse = errors.New("malformed TPM response")

// Session attribute bits (TPMA_SESSION, TPM 2.0 Part 2 section 8.4).
const (
	sessContinue   = 1 << 0
	sessAuditExcl  = 1 << 1
	sessAuditReset = 1 << 2
	sessReserved   = 1<<3 | 1<<4
	sessDecrypt    = 1 << 5
	sessEncrypt    = 1 << 6
	sessAudit      = 1 << 7
)

func sessionAttrsByte(a tpm2.TPMASession) byte {
	var b byte
	set := func(on bool, bit byte) {
		if on {
			b |= bit
		}
	}
	set(a.ContinueSession, sessContinue)
	set(a.AuditExclusive, sessAuditExcl)
	set(a.AuditReset, sessAuditReset)
	set(a.Decrypt, sessDecrypt)
	set(a.Encrypt, sessEncrypt)
	set(a.Audit, sessAudit)
	return b
}

func sessionAttrsFrom(b byte) (tpm2.TPMASession, error) {
	if b&sessReserved != 0 {
		return tpm2.TPMASession{}, fmt.Errorf("%w: reserved session attribute bits 0x%02x", errFastResponse, b&sessReserved)
	}
	return tpm2.TPMASession{
		ContinueSession: b&sessContinue != 0,
		AuditExclusive:  b&sessAuditExcl != 0,
		AuditReset:      b&sessAuditReset != 0,
		Decrypt:         b&sessDecrypt != 0,
		Encrypt:         b&sessEncrypt != 0,
		Audit:           b&sessAudit != 0,
	}, nil
}

// execFast sends cmd with at most one session (sess nil: none) and returns the
// response's handles and its parameter area, the first parameter decrypted when sess
// encrypts responses. A TPM error comes back as the tpm2.TPMRC (as go-tpm returns
// it), so callers classify it the same way.
func execFast(t transport.TPM, sess tpm2.Session, cmd fastCmd) ([]tpm2.TPMHandle, []byte, error) {
	var auth *tpm2.TPMSAuthCommand
	if sess != nil {
		if sess.IsDecryption() {
			// The fast path never encrypts command parameters; such a session is
			// not one a Decrypt uses.
			return nil, nil, errors.New("execFast: a session that decrypts command parameters is not supported")
		}
		if err := sess.Init(t); err != nil {
			return nil, nil, fmt.Errorf("initializing session: %w", err)
		}
		if err := sess.NewNonceCaller(); err != nil {
			return nil, nil, err
		}
		var err error
		if auth, err = sess.Authorize(cmd.cc, cmd.params, nil, cmd.names, 0); err != nil {
			return nil, nil, fmt.Errorf("session 0: %w", err)
		}
	}

	authLen := 0 // the TPMS_AUTH_COMMAND, after the area's 4-byte size
	if auth != nil {
		authLen = 4 + 2 + len(auth.Nonce.Buffer) + 1 + 2 + len(auth.Authorization.Buffer)
	}
	size := 10 + 4*len(cmd.handles) + len(cmd.params)
	if auth != nil {
		size += 4 + authLen
	}
	b := make([]byte, 0, size)
	tag := tpm2.TPMSTNoSessions
	if auth != nil {
		tag = tpm2.TPMSTSessions
	}
	b = binary.BigEndian.AppendUint16(b, uint16(tag))
	b = binary.BigEndian.AppendUint32(b, uint32(size))
	b = binary.BigEndian.AppendUint32(b, uint32(cmd.cc))
	for _, h := range cmd.handles {
		b = binary.BigEndian.AppendUint32(b, uint32(h))
	}
	if auth != nil {
		b = binary.BigEndian.AppendUint32(b, uint32(authLen))
		b = binary.BigEndian.AppendUint32(b, uint32(auth.Handle))
		b = append2B(b, auth.Nonce.Buffer)
		b = append(b, sessionAttrsByte(auth.Attributes))
		b = append2B(b, auth.Authorization.Buffer)
	}
	b = append(b, cmd.params...)

	rsp, err := t.Send(b)
	if err != nil {
		return nil, nil, err
	}
	r := reader{b: rsp}
	rtag, _ := r.u16()
	rsize, _ := r.u32()
	rc, ok := r.u32()
	if !ok || int(rsize) != len(rsp) {
		return nil, nil, fmt.Errorf("%w: header", errFastResponse)
	}
	if tpm2.TPMRC(rc) != tpm2.TPMRCSuccess {
		if sess != nil {
			if cerr := sess.CleanupFailure(t); cerr != nil {
				return nil, nil, fmt.Errorf("%w - additional errors encountered during cleanup: %v", tpm2.TPMRC(rc), cerr)
			}
		}
		return nil, nil, tpm2.TPMRC(rc)
	}
	if want := uint16(tag); rtag != want {
		return nil, nil, fmt.Errorf("%w: tag 0x%04x, want 0x%04x", errFastResponse, rtag, want)
	}
	handles := make([]tpm2.TPMHandle, cmd.rspHandles)
	for i := range handles {
		h, ok := r.u32()
		if !ok {
			return nil, nil, fmt.Errorf("%w: handle %d", errFastResponse, i)
		}
		handles[i] = tpm2.TPMHandle(h)
	}
	if sess == nil {
		return handles, r.rest(), nil
	}
	n, ok := r.u32()
	if !ok {
		return nil, nil, fmt.Errorf("%w: parameter size", errFastResponse)
	}
	params, ok := r.take(int(n))
	if !ok {
		return nil, nil, fmt.Errorf("%w: parameter area of %d bytes", errFastResponse, n)
	}
	nonce, ok1 := r.take2B()
	attrs, ok2 := r.u8()
	mac, ok3 := r.take2B()
	if !ok1 || !ok2 || !ok3 || len(r.rest()) != 0 {
		return nil, nil, fmt.Errorf("%w: response session", errFastResponse)
	}
	a, err := sessionAttrsFrom(attrs)
	if err != nil {
		return nil, nil, err
	}
	ra := tpm2.TPMSAuthResponse{
		Nonce:         tpm2.TPM2BNonce{Buffer: append([]byte(nil), nonce...)},
		Attributes:    a,
		Authorization: tpm2.TPM2BData{Buffer: mac},
	}
	if err := sess.Validate(tpm2.TPMRCSuccess, cmd.cc, params, cmd.names, 0, &ra); err != nil {
		return nil, nil, fmt.Errorf("validating auth session 0: %w", err)
	}
	if sess.IsEncryption() && len(params) >= 2 {
		if l := int(binary.BigEndian.Uint16(params)); 2+l <= len(params) {
			if err := sess.Decrypt(params[2 : 2+l]); err != nil {
				return nil, nil, fmt.Errorf("decrypting first parameter with session 0: %w", err)
			}
		}
	}
	return handles, params, nil
}

// only2B parses params as exactly one TPM2B and returns its buffer.
func only2B(params []byte) ([]byte, error) {
	r := reader{b: params}
	v, ok := r.take2B()
	if !ok || len(r.rest()) != 0 {
		return nil, fmt.Errorf("%w: want one sized buffer in %d parameter bytes", errFastResponse, len(params))
	}
	return v, nil
}

func append2B(b, v []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
	return append(b, v...)
}

// reader takes big-endian fields off b; every method reports whether b held enough.
type reader struct{ b []byte }

func (r *reader) take(n int) ([]byte, bool) {
	if n < 0 || n > len(r.b) {
		r.b = nil
		return nil, false
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v, true
}

func (r *reader) u8() (byte, bool) {
	v, ok := r.take(1)
	if !ok {
		return 0, false
	}
	return v[0], true
}

func (r *reader) u16() (uint16, bool) {
	v, ok := r.take(2)
	if !ok {
		return 0, false
	}
	return binary.BigEndian.Uint16(v), true
}

func (r *reader) u32() (uint32, bool) {
	v, ok := r.take(4)
	if !ok {
		return 0, false
	}
	return binary.BigEndian.Uint32(v), true
}

func (r *reader) take2B() ([]byte, bool) {
	n, ok := r.u16()
	if !ok {
		return nil, false
	}
	return r.take(int(n))
}

func (r *reader) rest() []byte { return r.b }

// hmacFast is tpm2.Hmac{Handle: key (auth sess), Buffer: in, HashAlg: SHA-256}.
func hmacFast(t transport.TPM, sess tpm2.Session, key tpm2.TPMHandle, keyName, in []byte) ([]byte, error) {
	params := append2B(make([]byte, 0, 2+len(in)+2), in)
	params = binary.BigEndian.AppendUint16(params, uint16(tpm2.TPMAlgSHA256))
	_, rp, err := execFast(t, sess, fastCmd{
		cc: tpm2.TPMCCHMAC, handles: []tpm2.TPMHandle{key}, names: []tpm2.TPM2BName{{Buffer: keyName}}, params: params,
	})
	if err != nil {
		return nil, err
	}
	return only2B(rp)
}

// loadFast is tpm2.Load{ParentHandle: parent (auth sess), InPrivate: priv, InPublic:
// pub} and returns the object's handle and Name.
func loadFast(t transport.TPM, sess tpm2.Session, parent tpm2.TPMHandle, parentName, priv, pub []byte) (tpm2.TPMHandle, []byte, error) {
	params := append2B(make([]byte, 0, 4+len(priv)+len(pub)), priv)
	params = append2B(params, pub)
	hs, rp, err := execFast(t, sess, fastCmd{
		cc: tpm2.TPMCCLoad, handles: []tpm2.TPMHandle{parent}, names: []tpm2.TPM2BName{{Buffer: parentName}}, params: params, rspHandles: 1,
	})
	if err != nil {
		return 0, nil, err
	}
	name, err := only2B(rp)
	if err != nil {
		return 0, nil, err
	}
	return hs[0], name, nil
}

// unsealFast is tpm2.Unseal{ItemHandle: item (auth sess)}.
func unsealFast(t transport.TPM, sess tpm2.Session, item tpm2.TPMHandle, itemName []byte) ([]byte, error) {
	_, rp, err := execFast(t, sess, fastCmd{
		cc: tpm2.TPMCCUnseal, handles: []tpm2.TPMHandle{item}, names: []tpm2.TPM2BName{{Buffer: itemName}},
	})
	if err != nil {
		return nil, err
	}
	return only2B(rp)
}

// flushFast is tpm2.FlushContext{FlushHandle: h}.
func flushFast(t transport.TPM, h tpm2.TPMHandle) error {
	_, rp, err := execFast(t, nil, fastCmd{cc: tpm2.TPMCCFlushContext, params: binary.BigEndian.AppendUint32(nil, uint32(h))})
	if err != nil {
		return err
	}
	if len(rp) != 0 {
		return fmt.Errorf("%w: %d bytes after TPM2_FlushContext", errFastResponse, len(rp))
	}
	return nil
}
