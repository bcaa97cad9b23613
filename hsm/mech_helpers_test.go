package hsm

import (
	"crypto/rand"
	"reflect"
	"sync"
	"testing"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// ivEmulation is how mechTok makes SoftHSM2 behave for a GCM C_EncryptInit whose IV
// buffer is all zero (what aes-gcm-token-iv sends). SoftHSM2 itself takes the zero IV
// as the IV and leaves the buffer as it was (ivAsSoftHSM).
type ivEmulation int

const (
	// ivAsSoftHSM: no emulation: the token encrypts with the all-zero IV.
	ivAsSoftHSM ivEmulation = iota
	// ivAsCloudHSM emulates AWS CloudHSM: the token generates a random 12-byte IV and
	// writes it into the caller's IV buffer, which GCMParams.IV() then reads. It does
	// so whatever the buffer held (the caller's IV is ignored).
	ivAsCloudHSM
	// ivAsLunaBefore793 emulates Thales Luna in FIPS mode before firmware 7.9.3: the
	// token generates a 16-byte IV, leaves the caller's buffer alone and appends the
	// IV to the C_Encrypt output (ciphertext || tag || IV).
	ivAsLunaBefore793
	// ivAsLuna793FIPS emulates Thales Luna in FIPS mode from firmware 7.9.3, whose
	// documented IV table generates an IV only for ulIvLen 0 (ulIvBits 0/128 or 96)
	// and lists ulIvLen 12 with ulIvBits 96 as "copy 96 bits (non-FIPS)": in FIPS
	// mode C_EncryptInit refuses a caller's 12-byte IV buffer, zero or not
	// (CKR_MECHANISM_PARAM_INVALID; the refusal code is our assumption). miekg/pkcs11
	// v1.1.2 cannot send ulIvLen 0 with ulIvBits 96.
	ivAsLuna793FIPS
)

// ckmCloudKMSAESGCM is CKM_CLOUDKMS_AES_GCM of the Cloud KMS PKCS#11 library
// (kmsp11.h: CKM_GOOGLE_DEFINED | 0x01, CKM_GOOGLE_DEFINED = CKM_VENDOR_DEFINED |
// 0x1E100): its only GCM mechanism, which writes the IV Cloud KMS chose into pIv.
const ckmCloudKMSAESGCM = 0x80000000 | 0x1E100 | 0x01

// mechTok wraps the real module through the p11 seam and emulates other tokens:
// token-generated GCM IVs (ivEmulation), mechanisms the token lacks (missing:
// C_GetMechanismInfo and the *Init calls answer CKR_MECHANISM_INVALID), and one-shot
// CK_RVs from C_Sign. It counts C_DecryptInit and C_Sign calls.
type mechTok struct {
	p11
	mu        sync.Mutex
	iv        ivEmulation
	missing   map[uint]bool
	signFault []error
	calls     map[string]int
	lunaIV    map[pkcs11.SessionHandle][]byte
	// vendorGCM, if set, is a vendor GCM mechanism the token offers; mechTok runs it
	// as CKM_AES_GCM on SoftHSM2 (with the iv emulation).
	vendorGCM uint
}

// translate returns mm with the vendor GCM mechanism replaced by CKM_AES_GCM (same
// parameters), and whether it was the vendor mechanism.
func (m *mechTok) translate(mm []*pkcs11.Mechanism) ([]*pkcs11.Mechanism, bool) {
	m.mu.Lock()
	v := m.vendorGCM
	m.mu.Unlock()
	if v == 0 || len(mm) != 1 || mm[0].Mechanism != v {
		return mm, false
	}
	cp := *mm[0]
	cp.Mechanism = pkcs11.CKM_AES_GCM
	return []*pkcs11.Mechanism{&cp}, true
}

func newMechTok() *mechTok {
	return &mechTok{missing: map[uint]bool{}, calls: map[string]int{}, lunaIV: map[pkcs11.SessionHandle][]byte{}}
}

// installMechTok puts a fresh mechTok in the seam; call it before the module loads.
func installMechTok(t *testing.T) *mechTok {
	t.Helper()
	m := newMechTok()
	seam(t, func(p p11) p11 { m.p11 = p; return m })
	return m
}

func (m *mechTok) set(fn func(m *mechTok)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	fn(m)
}

func (m *mechTok) count(name string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.calls[name]
}

func (m *mechTok) lacks(mt uint) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.missing[mt]
}

// gcmFields reads the IV, AAD and tag size out of a mechanism made with
// pkcs11.NewMechanism(mt, *pkcs11.GCMParams). miekg/pkcs11 v1.1.2 keeps them
// unexported until it marshals CK_GCM_PARAMS inside C_EncryptInit, so an emulated
// token reads them by reflection, as a real token reads the C structure.
func gcmFields(t *pkcs11.Mechanism) (iv, aad []byte, tagBits int, ok bool) {
	s, ok := gcmStruct(t)
	if !ok {
		return nil, nil, 0, false
	}
	return s.FieldByName("iv").Bytes(), s.FieldByName("aad").Bytes(), int(s.FieldByName("tagSize").Int()), true
}

func gcmStruct(t *pkcs11.Mechanism) (reflect.Value, bool) {
	g := reflect.ValueOf(t).Elem().FieldByName("generator")
	if !g.IsValid() || g.IsNil() || g.Elem().Type() != reflect.TypeOf((*pkcs11.GCMParams)(nil)) {
		return reflect.Value{}, false
	}
	return g.Elem().Elem(), true
}

// replaceGCMIV makes the IV that C_EncryptInit will marshal into the C IV buffer iv,
// leaving the caller's Go slice alone: after the call the C buffer holds iv, which is
// where a token that writes its own IV leaves it (GCMParams.IV() reads it).
func replaceGCMIV(t *pkcs11.Mechanism, iv []byte) {
	s, _ := gcmStruct(t)
	f := s.FieldByName("iv")
	reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem().Set(reflect.ValueOf(iv))
}

func (m *mechTok) GetMechanismInfo(slot uint, mm []*pkcs11.Mechanism) (pkcs11.MechanismInfo, error) {
	if len(mm) == 1 && m.lacks(mm[0].Mechanism) {
		return pkcs11.MechanismInfo{}, pkcs11.Error(pkcs11.CKR_MECHANISM_INVALID)
	}
	if t, ok := m.translate(mm); ok {
		return m.p11.GetMechanismInfo(slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(t[0].Mechanism, nil)})
	}
	return m.p11.GetMechanismInfo(slot, mm)
}

func (m *mechTok) EncryptInit(sh pkcs11.SessionHandle, mm []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	if m.lacks(mm[0].Mechanism) {
		return pkcs11.Error(pkcs11.CKR_MECHANISM_INVALID)
	}
	mm, _ = m.translate(mm)
	m.mu.Lock()
	mode := m.iv
	m.mu.Unlock()
	iv, aad, tagBits, ok := gcmFields(mm[0])
	if !ok || mm[0].Mechanism != pkcs11.CKM_AES_GCM || mode == ivAsSoftHSM || mode == ivAsLunaBefore793 && !allZero(iv) {
		return m.p11.EncryptInit(sh, mm, o)
	}
	switch mode {
	case ivAsLuna793FIPS:
		return pkcs11.Error(pkcs11.CKR_MECHANISM_PARAM_INVALID)
	case ivAsCloudHSM:
		// The token's IV lands in the C IV buffer (set here before the parameters are
		// marshalled, so that SoftHSM2 encrypts with it and GCMParams.IV() reads it).
		gen := make([]byte, len(iv))
		if _, err := rand.Read(gen); err != nil {
			return err
		}
		replaceGCMIV(mm[0], gen)
		return m.p11.EncryptInit(sh, mm, o)
	case ivAsLunaBefore793:
		gen := make([]byte, 16)
		if _, err := rand.Read(gen); err != nil {
			return err
		}
		p := pkcs11.NewGCMParams(gen, aad, tagBits)
		defer p.Free() // SoftHSM2 copies the IV at C_EncryptInit
		if err := m.p11.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, p)}, o); err != nil {
			return err
		}
		m.mu.Lock()
		m.lunaIV[sh] = gen
		m.mu.Unlock()
		return nil
	}
	return m.p11.EncryptInit(sh, mm, o)
}

func (m *mechTok) Encrypt(sh pkcs11.SessionHandle, msg []byte) ([]byte, error) {
	m.mu.Lock()
	gen := m.lunaIV[sh]
	delete(m.lunaIV, sh)
	m.mu.Unlock()
	out, err := m.p11.Encrypt(sh, msg)
	if err != nil || gen == nil {
		return out, err
	}
	return append(out, gen...), nil
}

func (m *mechTok) DecryptInit(sh pkcs11.SessionHandle, mm []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	m.mu.Lock()
	m.calls["DecryptInit"]++
	m.mu.Unlock()
	if m.lacks(mm[0].Mechanism) {
		return pkcs11.Error(pkcs11.CKR_MECHANISM_INVALID)
	}
	mm, _ = m.translate(mm)
	return m.p11.DecryptInit(sh, mm, o)
}

func (m *mechTok) SignInit(sh pkcs11.SessionHandle, mm []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	if m.lacks(mm[0].Mechanism) {
		return pkcs11.Error(pkcs11.CKR_MECHANISM_INVALID)
	}
	return m.p11.SignInit(sh, mm, o)
}

func (m *mechTok) Sign(sh pkcs11.SessionHandle, msg []byte) ([]byte, error) {
	m.mu.Lock()
	m.calls["Sign"]++
	var fault error
	if len(m.signFault) > 0 {
		fault, m.signFault = m.signFault[0], m.signFault[1:]
	}
	m.mu.Unlock()
	out, err := m.p11.Sign(sh, msg) // the real call ends the operation either way
	if fault != nil {
		return nil, fault
	}
	return out, err
}
