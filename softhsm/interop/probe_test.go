package interop

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

func TestMain(m *testing.M) { softhsmtest.Main(m) }

// relevantMechs are the mechanisms hwkms uses or will use on these tokens.
var relevantMechs = []struct {
	m    uint
	name string
}{
	{pkcs11.CKM_AES_KEY_GEN, "CKM_AES_KEY_GEN"},
	{pkcs11.CKM_AES_GCM, "CKM_AES_GCM"},
	{pkcs11.CKM_AES_CBC_PAD, "CKM_AES_CBC_PAD"},
	{pkcs11.CKM_SHA256_HMAC, "CKM_SHA256_HMAC"},
	{pkcs11.CKM_GENERIC_SECRET_KEY_GEN, "CKM_GENERIC_SECRET_KEY_GEN"},
	{pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, "CKM_RSA_PKCS_KEY_PAIR_GEN"},
	{pkcs11.CKM_RSA_PKCS_OAEP, "CKM_RSA_PKCS_OAEP"},
	{pkcs11.CKM_AES_KEY_WRAP, "CKM_AES_KEY_WRAP"},
	{pkcs11.CKM_AES_KEY_WRAP_PAD, "CKM_AES_KEY_WRAP_PAD"},
}

// attr is a named template attribute, so a refusal can name what was refused.
type attr struct {
	name string
	a    *pkcs11.Attribute
}

// hwkmsTemplate is, attribute for attribute, the C_GenerateKey template of
// hsm.CreateKey (hsm/keys.go), with the given label and CKA_ID.
func hwkmsTemplate(label string, id []byte) []attr {
	return []attr{
		{"CKA_CLASS=CKO_SECRET_KEY", pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY)},
		{"CKA_KEY_TYPE=CKK_AES", pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES)},
		{"CKA_VALUE_LEN=32", pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32)},
		{"CKA_TOKEN=true", pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)},
		{"CKA_PRIVATE=true", pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true)},
		{"CKA_SENSITIVE=true", pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true)},
		{"CKA_EXTRACTABLE=false", pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false)},
		{"CKA_ENCRYPT=true", pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true)},
		{"CKA_DECRYPT=true", pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true)},
		{"CKA_WRAP=false", pkcs11.NewAttribute(pkcs11.CKA_WRAP, false)},
		{"CKA_UNWRAP=false", pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false)},
		{"CKA_SIGN=false", pkcs11.NewAttribute(pkcs11.CKA_SIGN, false)},
		{"CKA_VERIFY=false", pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false)},
		{"CKA_DERIVE=false", pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false)},
		{"CKA_LABEL", pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)},
		{"CKA_ID", pkcs11.NewAttribute(pkcs11.CKA_ID, id)},
	}
}

// fallbackTemplate keeps what hwkms needs (a private, sensitive, non-extractable
// AES-256 token key for encrypt/decrypt with a label and an ID) and drops the
// attributes that only restate defaults (WRAP/UNWRAP/SIGN/VERIFY/DERIVE false).
func fallbackTemplate(label string, id []byte) []attr {
	var out []attr
	for _, a := range hwkmsTemplate(label, id) {
		switch a.a.Type {
		case pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP, pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY, pkcs11.CKA_DERIVE:
			continue
		}
		out = append(out, a)
	}
	return out
}

func attrs(as []attr) []*pkcs11.Attribute {
	out := make([]*pkcs11.Attribute, len(as))
	for i, a := range as {
		out[i] = a.a
	}
	return out
}

// report is what one token's probe measured.
type report struct {
	tok        *Token
	initNoArgs string // C_Initialize without pReserved, when the token needs it
	mechCount  int
	mechs      map[string]string
	hwkmsGen   string   // C_GenerateKey with hwkms's template
	refused    []string // attributes whose removal alone made it succeed
	fallback   string   // C_GenerateKey with fallbackTemplate, if hwkms's failed
	readBack   string   // attributes of the generated key
	persisted  string   // found again by hwkms's search template after C_Finalize/C_Initialize
	gcm        string   // hwkms's CKM_AES_GCM (12-byte IV from the caller, 128-bit tag)
	gcmParts   string   // the same with C_EncryptUpdate/C_EncryptFinal
	cbcPad     string   // CKM_AES_CBC_PAD round trip with a 16-byte IV
	oaep       map[string]string
}

func rvName(err error) string {
	if err == nil {
		return "CKR_OK"
	}
	var e pkcs11.Error
	if errors.As(err, &e) {
		s := e.Error()
		return s[strings.LastIndex(s, ": ")+2:]
	}
	return err.Error()
}

func mechFlags(mi *pkcs11.MechanismInfo) string {
	names := []struct {
		f uint
		n string
	}{
		{pkcs11.CKF_ENCRYPT, "enc"}, {pkcs11.CKF_DECRYPT, "dec"}, {pkcs11.CKF_SIGN, "sign"},
		{pkcs11.CKF_VERIFY, "verify"}, {pkcs11.CKF_WRAP, "wrap"}, {pkcs11.CKF_UNWRAP, "unwrap"},
		{pkcs11.CKF_GENERATE, "gen"}, {pkcs11.CKF_GENERATE_KEY_PAIR, "genpair"},
		{pkcs11.CKF_DERIVE, "derive"}, {pkcs11.CKF_HW, "hw"},
	}
	var fs []string
	for _, n := range names {
		if mi.Flags&n.f != 0 {
			fs = append(fs, n.n)
		}
	}
	return fmt.Sprintf("%s %d-%d", strings.Join(fs, ","), mi.MinKeySize, mi.MaxKeySize)
}

// session opens a read-write session on tk's slot and logs in as the user.
func session(t *testing.T, c *pkcs11.Ctx, tk *Token) pkcs11.SessionHandle {
	t.Helper()
	sh, err := c.OpenSession(tk.Slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatalf("C_OpenSession: %v", err)
	}
	if err := c.Login(sh, pkcs11.CKU_USER, tk.PIN); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		t.Fatalf("C_Login as CKU_USER: %v", err)
	}
	return sh
}

func find(c *pkcs11.Ctx, sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := c.FindObjectsInit(sh, tmpl); err != nil {
		return nil, fmt.Errorf("C_FindObjectsInit: %w", err)
	}
	defer c.FindObjectsFinal(sh) //nolint:errcheck // test
	hs, _, err := c.FindObjects(sh, 100)
	if err != nil {
		return nil, fmt.Errorf("C_FindObjects: %w", err)
	}
	return hs, nil
}

// hwkmsSearch is hsm's keyTemplate(label, nil): token AES secret keys with the label.
func hwkmsSearch(label string) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
}

func newID(t *testing.T) []byte {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		t.Fatal(err)
	}
	return id
}

// TestTokens measures, on each implementation, the mechanisms hwkms needs and what
// happens to hwkms's key template: generation, which attribute is refused, whether
// the key survives C_Finalize/C_Initialize, and hwkms's AES-GCM. The table is logged
// (go test -v) and, with INTEROP_TABLE=path, written as markdown (docs/tokens.md).
func TestTokens(t *testing.T) {
	var reports []*report
	for _, st := range Starters {
		t.Run(strings.ReplaceAll(st.Name, " ", "_"), func(t *testing.T) {
			tk := st.Start(t)
			r := probeToken(t, tk)
			reports = append(reports, r)
			if tk.Impl == "SoftHSM2" {
				// The reference: everything hwkms does today must work here.
				if r.hwkmsGen != "CKR_OK" || r.persisted != "yes" || r.gcm != "CKR_OK" {
					t.Errorf("SoftHSM2: hwkms template %s, persisted %s, AES-GCM %s; want CKR_OK, yes, CKR_OK", r.hwkmsGen, r.persisted, r.gcm)
				}
			}
		})
	}
	table := renderTable(reports)
	t.Log("\n" + table)
	if p := os.Getenv("INTEROP_TABLE"); p != "" {
		if err := os.WriteFile(p, []byte(table), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func probeToken(t *testing.T, tk *Token) *report {
	t.Helper()
	r := &report{tok: tk, mechs: map[string]string{}, oaep: map[string]string{}}
	if tk.InitArgs != "" {
		c := pkcs11.New(tk.Module)
		err := c.Initialize()
		if err == nil {
			c.Finalize() //nolint:errcheck // test
			t.Errorf("%s: C_Initialize without pReserved succeeded; the fixture says it needs %q", tk.Impl, tk.InitArgs)
		}
		c.Destroy()
		r.initNoArgs = rvName(err)
	}
	c := tk.Open(t)
	ml, err := c.GetMechanismList(tk.Slot)
	if err != nil || len(ml) == 0 {
		t.Fatalf("C_GetMechanismList: %d mechanisms, %v", len(ml), err)
	}
	r.mechCount = len(ml)
	have := map[uint]bool{}
	for _, m := range ml {
		have[m.Mechanism] = true
	}
	for _, m := range relevantMechs {
		if !have[m.m] {
			r.mechs[m.name] = "no"
			continue
		}
		mi, err := c.GetMechanismInfo(tk.Slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(m.m, nil)})
		if err != nil {
			r.mechs[m.name] = "listed; info " + rvName(err)
			continue
		}
		r.mechs[m.name] = mechFlags(&mi)
	}
	sh := session(t, c, tk)

	label := "hwkms-probe-" + randHex(t, 4)
	keyGen := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}
	gen := func(tmpl []attr) (pkcs11.ObjectHandle, error) {
		return c.GenerateKey(sh, keyGen, attrs(tmpl))
	}
	destroy := func(h pkcs11.ObjectHandle) {
		if err := c.DestroyObject(sh, h); err != nil {
			t.Errorf("C_DestroyObject: %v", err)
		}
	}
	key, err := gen(hwkmsTemplate(label, newID(t)))
	r.hwkmsGen = rvName(err)
	if err != nil {
		full := hwkmsTemplate(label, newID(t))
		for i := range full {
			without := append(append([]attr{}, full[:i]...), full[i+1:]...)
			if h, err := gen(without); err == nil {
				r.refused = append(r.refused, full[i].name)
				destroy(h)
			}
		}
		key, err = gen(fallbackTemplate(label, newID(t)))
		r.fallback = rvName(err)
	}
	if err != nil {
		r.readBack, r.persisted, r.gcm, r.gcmParts, r.cbcPad = "-", "-", "-", "-", "-"
		t.Logf("%s: no AES key could be generated: hwkms template %s, fallback %s", tk.Impl, r.hwkmsGen, r.fallback)
	} else {
		r.readBack = readBack(c, sh, key)
		// Each operation in a session of its own: a token may leave a failed
		// operation active (NSS does), which would fail the next C_EncryptInit.
		for _, op := range []struct {
			out *string
			f   func(*pkcs11.Ctx, pkcs11.SessionHandle, pkcs11.ObjectHandle) string
		}{{&r.gcm, hwkmsGCM}, {&r.gcmParts, gcmMultiPart}, {&r.cbcPad, cbcPadRoundTrip}} {
			s2, err := c.OpenSession(tk.Slot, pkcs11.CKF_SERIAL_SESSION)
			if err != nil {
				t.Fatalf("C_OpenSession: %v", err)
			}
			*op.out = op.f(c, s2, key)
			if err := c.CloseSession(s2); err != nil {
				t.Errorf("C_CloseSession: %v", err)
			}
		}
		hs, err := find(c, sh, hwkmsSearch(label))
		if err != nil || len(hs) != 1 {
			t.Errorf("%s: hwkms's search template finds %d keys in the creating session (%v), want 1", tk.Impl, len(hs), err)
		}
		// A new process would see what C_Initialize reads from the token's storage.
		if err := c.Finalize(); err != nil {
			t.Fatalf("C_Finalize: %v", err)
		}
		if err := tk.Initialize(c); err != nil {
			t.Fatalf("C_Initialize again: %v", err)
		}
		sh = session(t, c, tk)
		hs, err = find(c, sh, hwkmsSearch(label))
		switch {
		case err != nil:
			r.persisted = "search failed: " + rvName(err)
		case len(hs) == 1:
			r.persisted = "yes"
			destroy(hs[0])
		default:
			r.persisted = fmt.Sprintf("NO (%d found)", len(hs))
		}
	}
	probeOAEP(t, c, sh, r)
	if err := c.Logout(sh); err != nil {
		t.Errorf("C_Logout: %v", err)
	}
	if err := c.CloseSession(sh); err != nil {
		t.Errorf("C_CloseSession: %v", err)
	}
	return r
}

// readBack reads the attributes hsm checks (plus CKA_TOKEN) of a generated key.
func readBack(c *pkcs11.Ctx, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) string {
	names := map[uint]string{
		pkcs11.CKA_TOKEN: "TOKEN", pkcs11.CKA_PRIVATE: "PRIVATE", pkcs11.CKA_SENSITIVE: "SENSITIVE",
		pkcs11.CKA_EXTRACTABLE: "EXTRACTABLE", pkcs11.CKA_NEVER_EXTRACTABLE: "NEVER_EXTRACTABLE",
	}
	order := []uint{pkcs11.CKA_TOKEN, pkcs11.CKA_PRIVATE, pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_NEVER_EXTRACTABLE}
	var out []string
	for _, typ := range order {
		a, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(typ, nil)})
		switch {
		case err != nil:
			out = append(out, names[typ]+"="+rvName(err))
		case len(a) == 1 && len(a[0].Value) == 1:
			out = append(out, fmt.Sprintf("%s=%v", names[typ], a[0].Value[0] != 0))
		default:
			out = append(out, names[typ]+"=?")
		}
	}
	return strings.Join(out, " ")
}

// gcmEncryptInit starts what hwkmsGCM and gcmMultiPart encrypt: the probe plaintext
// and AAD under CKM_AES_GCM with a fresh 12-byte IV and a 128-bit tag. free releases
// the mechanism parameters after the operation; msg is the failure, "" when started.
func gcmEncryptInit(c *pkcs11.Ctx, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) (iv, pt, aad []byte, free func(), msg string) {
	free = func() {}
	iv = make([]byte, 12)
	if _, err := rand.Read(iv); err != nil {
		return nil, nil, nil, free, err.Error()
	}
	pt, aad = []byte("hwkms interop probe plaintext"), []byte("aad")
	p := pkcs11.NewGCMParams(iv, aad, 128)
	free = p.Free
	if err := c.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, p)}, h); err != nil {
		return nil, nil, nil, free, "C_EncryptInit " + rvName(err)
	}
	return iv, pt, aad, free, ""
}

// hwkmsGCM runs what hsm's Wrap and Unwrap do: CKM_AES_GCM with a 12-byte IV chosen
// by the caller, AAD and a 128-bit tag, then decrypts and compares.
func hwkmsGCM(c *pkcs11.Ctx, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) string {
	iv, pt, aad, free, msg := gcmEncryptInit(c, sh, h)
	defer free()
	if msg != "" {
		return msg
	}
	ct, err := c.Encrypt(sh, pt)
	if err != nil {
		return "C_Encrypt " + rvName(err)
	}
	p2 := pkcs11.NewGCMParams(iv, aad, 128)
	defer p2.Free()
	if err := c.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, p2)}, h); err != nil {
		return "C_DecryptInit " + rvName(err)
	}
	back, err := c.Decrypt(sh, ct)
	if err != nil {
		return "C_Decrypt " + rvName(err)
	}
	if !bytes.Equal(back, pt) || len(ct) != len(pt)+16 {
		return fmt.Sprintf("wrong result (%d-byte ciphertext)", len(ct))
	}
	return "CKR_OK"
}

// probeOAEP generates an RSA-2048 key pair (session objects, then token objects if
// the token refuses session keys) and tries CKM_RSA_PKCS_OAEP with SHA-256 and SHA-1.
func probeOAEP(t *testing.T, c *pkcs11.Ctx, sh pkcs11.SessionHandle, r *report) {
	t.Helper()
	var (
		pub, priv pkcs11.ObjectHandle
		err       error
	)
	for _, onToken := range []bool{false, true} {
		label := "hwkms-probe-rsa-" + randHex(t, 4)
		pub, priv, err = c.GenerateKeyPair(sh,
			[]*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)},
			[]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, onToken),
				pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
				pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, 2048),
				pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			},
			[]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, onToken),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
				pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
				pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			})
		r.oaep["keypair"] += fmt.Sprintf("CKA_TOKEN=%v: %s; ", onToken, rvName(err))
		if err == nil {
			break
		}
	}
	if err != nil {
		r.oaep["SHA-256"], r.oaep["SHA-1"] = "-", "-"
		return
	}
	defer func() {
		for _, h := range []pkcs11.ObjectHandle{pub, priv} {
			if err := c.DestroyObject(sh, h); err != nil {
				t.Errorf("C_DestroyObject of the RSA probe key: %v", err)
			}
		}
	}()
	for _, hs := range []struct {
		name      string
		hash, mgf uint
	}{
		{"SHA-256", pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256},
		{"SHA-1", pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1},
	} {
		r.oaep[hs.name] = oaepRoundTrip(c, sh, pub, priv, hs.hash, hs.mgf)
	}
}

func oaepRoundTrip(c *pkcs11.Ctx, sh pkcs11.SessionHandle, pub, priv pkcs11.ObjectHandle, hash, mgf uint) string {
	mech := func() []*pkcs11.Mechanism {
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, pkcs11.NewOAEPParams(hash, mgf, pkcs11.CKZ_DATA_SPECIFIED, nil))}
	}
	pt := []byte("0123456789abcdef0123456789abcdef")
	if err := c.EncryptInit(sh, mech(), pub); err != nil {
		return "C_EncryptInit " + rvName(err)
	}
	ct, err := c.Encrypt(sh, pt)
	if err != nil {
		return "C_Encrypt " + rvName(err)
	}
	if err := c.DecryptInit(sh, mech(), priv); err != nil {
		return "C_DecryptInit " + rvName(err)
	}
	back, err := c.Decrypt(sh, ct)
	if err != nil {
		return "C_Decrypt " + rvName(err)
	}
	if !bytes.Equal(back, pt) {
		return "wrong plaintext"
	}
	return "CKR_OK"
}

func renderTable(rs []*report) string {
	var b strings.Builder
	row := func(cells ...string) { b.WriteString("| " + strings.Join(cells, " | ") + " |\n") }
	head := []string{"measured"}
	for _, r := range rs {
		head = append(head, r.tok.Impl)
	}
	row(head...)
	sep := make([]string, len(head))
	for i := range sep {
		sep[i] = "---"
	}
	row(sep...)
	line := func(name string, f func(r *report) string) {
		cells := []string{name}
		for _, r := range rs {
			v := f(r)
			if v == "" {
				v = "-"
			}
			cells = append(cells, strings.ReplaceAll(v, "|", "/"))
		}
		row(cells...)
	}
	line("package version", func(r *report) string { return r.tok.Package + " " + r.tok.Version })
	line("C_GetInfo library", func(r *report) string { return r.tok.Library + " " + r.tok.LibraryVersion })
	line("module", func(r *report) string { return "`" + r.tok.Module + "`" })
	line("C_Initialize pReserved", func(r *report) string {
		if r.tok.InitArgs == "" {
			return "none"
		}
		return "required (without: " + r.initNoArgs + ")"
	})
	line("mechanisms listed", func(r *report) string { return fmt.Sprint(r.mechCount) })
	for _, m := range relevantMechs {
		line(m.name, func(r *report) string { return r.mechs[m.name] })
	}
	line("C_GenerateKey, hwkms template", func(r *report) string { return r.hwkmsGen })
	line("attribute whose removal alone lets it pass", func(r *report) string {
		if r.hwkmsGen == "CKR_OK" {
			return "n/a"
		}
		if len(r.refused) == 0 {
			return "none (no single attribute)"
		}
		sort.Strings(r.refused)
		return strings.Join(r.refused, ", ")
	})
	line("C_GenerateKey, fallback template", func(r *report) string {
		if r.hwkmsGen == "CKR_OK" {
			return "n/a"
		}
		return r.fallback
	})
	line("generated key reads back", func(r *report) string { return r.readBack })
	line("found after C_Finalize/C_Initialize", func(r *report) string { return r.persisted })
	line("hwkms AES-GCM (caller IV, 128-bit tag), C_Encrypt", func(r *report) string { return r.gcm })
	line("same, C_EncryptUpdate+C_EncryptFinal", func(r *report) string { return r.gcmParts })
	line("AES-CBC-PAD round trip", func(r *report) string { return r.cbcPad })
	line("RSA-2048 key pair", func(r *report) string { return strings.TrimSuffix(r.oaep["keypair"], "; ") })
	line("RSA-OAEP SHA-256/MGF1-SHA-256", func(r *report) string { return r.oaep["SHA-256"] })
	line("RSA-OAEP SHA-1/MGF1-SHA-1", func(r *report) string { return r.oaep["SHA-1"] })
	return b.String()
}

// gcmMultiPart encrypts as hwkmsGCM does but with C_EncryptUpdate and
// C_EncryptFinal, whose output-length queries differ from C_Encrypt's.
func gcmMultiPart(c *pkcs11.Ctx, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) string {
	_, pt, _, free, msg := gcmEncryptInit(c, sh, h)
	defer free()
	if msg != "" {
		return msg
	}
	ct, err := c.EncryptUpdate(sh, pt)
	if err != nil {
		return "C_EncryptUpdate " + rvName(err)
	}
	tail, err := c.EncryptFinal(sh)
	if err != nil {
		return "C_EncryptFinal " + rvName(err)
	}
	if n := len(ct) + len(tail); n != len(pt)+16 {
		return fmt.Sprintf("wrong length %d", n)
	}
	return "CKR_OK"
}

// cbcPadRoundTrip encrypts and decrypts with CKM_AES_CBC_PAD and a random IV.
func cbcPadRoundTrip(c *pkcs11.Ctx, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) string {
	iv := make([]byte, 16)
	if _, err := rand.Read(iv); err != nil {
		return err.Error()
	}
	pt := []byte("hwkms interop probe plaintext")
	m := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, iv)}
	if err := c.EncryptInit(sh, m, h); err != nil {
		return "C_EncryptInit " + rvName(err)
	}
	ct, err := c.Encrypt(sh, pt)
	if err != nil {
		return "C_Encrypt " + rvName(err)
	}
	if err := c.DecryptInit(sh, m, h); err != nil {
		return "C_DecryptInit " + rvName(err)
	}
	back, err := c.Decrypt(sh, ct)
	if err != nil {
		return "C_Decrypt " + rvName(err)
	}
	if !bytes.Equal(back, pt) || len(ct) != 32 {
		return fmt.Sprintf("wrong result (%d-byte ciphertext)", len(ct))
	}
	return "CKR_OK"
}
