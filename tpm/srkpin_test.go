package tpm

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/internal/wire"
	"github.com/hwkms/hwkms/tpm/swtpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// substitution is what the interposer does to TPM2_CreatePrimary.
type substitution int

const (
	substNone substitution = iota
	// substFlipName forwards CreatePrimary and flips a bit of the Name in the answer:
	// the public area is the real SRK's, the Name is not its Name.
	substFlipName
	// substDuplicable answers with a primary the interposer creates itself in the
	// owner hierarchy from the SRK template with fixedTPM and fixedParent clear: a
	// consistent public area and Name, but not the SRK template.
	substDuplicable
	// substNullSRK answers with a primary the interposer creates itself in the NULL
	// hierarchy from the exact SRK template: consistent, the right shape, another
	// key. Only a pinned srkName tells it from the owner SRK.
	substNullSRK
)

// interposer sits on the bus between hwkms and swtpm (a unix socket proxy) and
// answers in the TPM's place: it substitutes another key for the owner SRK in
// TPM2_CreatePrimary answers, or redirects TPM2_ReadPublic of one persistent handle
// to another. It records every command code it forwards after its first
// substitution.
type interposer struct {
	path, target string
	ln           net.Listener
	wg           sync.WaitGroup

	mu          sync.Mutex
	subst       substitution
	readFrom    tpm2.TPMHandle // ReadPublic(readFrom) is sent as ReadPublic(readTo)
	readTo      tpm2.TPMHandle
	drop        bool // close the connection at the next command
	substituted int
	after       []tpm2.TPMCC
}

func newInterposer(t *testing.T, sim *swtpm.Sim) *interposer {
	t.Helper()
	dir, err := os.MkdirTemp("", "interposer")
	if err != nil {
		t.Fatal(err)
	}
	p := &interposer{path: filepath.Join(dir, "p.sock"), target: strings.TrimPrefix(sim.Device, "unix://")}
	if p.ln, err = net.Listen("unix", p.path); err != nil {
		t.Fatal(err)
	}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(func() { p.ln.Close(); p.wg.Wait(); os.RemoveAll(dir) })
	return p
}

func (p *interposer) device() string { return "unix://" + p.path }

// seenAfter reports the command codes forwarded after the first substitution.
func (p *interposer) seenAfter() (int, []tpm2.TPMCC) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.substituted, slices.Clone(p.after)
}

func (p *interposer) serve() { serveProxy(p.ln, &p.wg, p.target, p.pump) }

// rawTPM is go-tpm's transport over the upstream socket, keeping the raw answer.
type rawTPM struct {
	c    net.Conn
	last []byte
}

func (r *rawTPM) Send(cmd []byte) ([]byte, error) {
	if _, err := r.c.Write(cmd); err != nil {
		return nil, err
	}
	rsp, err := readFrame(r.c)
	r.last = rsp
	return rsp, err
}

func (p *interposer) pump(c, up net.Conn) {
	for {
		cmd, err := readFrame(c)
		if err != nil {
			return
		}
		cc := tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:10]))
		p.mu.Lock()
		subst, from, to, drop := p.subst, p.readFrom, p.readTo, p.drop
		p.drop = false
		if p.substituted > 0 {
			p.after = append(p.after, cc)
		}
		p.mu.Unlock()
		if drop {
			return
		}
		var rsp []byte
		switch {
		case cc == tpm2.TPMCCCreatePrimary && (subst == substDuplicable || subst == substNullSRK):
			hier, tmpl := tpm2.TPMRHOwner, wire.SRKTemplate
			if subst == substNullSRK {
				hier = tpm2.TPMRHNull
			} else {
				tmpl.ObjectAttributes.FixedTPM, tmpl.ObjectAttributes.FixedParent = false, false
			}
			up := &rawTPM{c: up}
			_, err := tpm2.CreatePrimary{
				PrimaryHandle: tpm2.AuthHandle{Handle: hier, Auth: tpm2.PasswordAuth(nil)},
				InPublic:      tpm2.New2B(tmpl),
			}.Execute(up)
			if err != nil {
				return
			}
			rsp = up.last
			p.mark()
		default:
			if cc == tpm2.TPMCCReadPublic && from != 0 && len(cmd) == 14 && tpm2.TPMHandle(binary.BigEndian.Uint32(cmd[10:14])) == from {
				cmd = slices.Clone(cmd)
				binary.BigEndian.PutUint32(cmd[10:14], uint32(to))
				p.mark()
			}
			if _, err := up.Write(cmd); err != nil {
				return
			}
			if rsp, err = readFrame(up); err != nil {
				return
			}
			rc := binary.BigEndian.Uint32(rsp[6:10])
			if cc == tpm2.TPMCCCreatePrimary && subst == substFlipName && rc == 0 {
				// The answer ends with the Name, then a password session's
				// response auth (empty nonce, attributes, empty HMAC: 5 bytes).
				rsp[len(rsp)-6] ^= 0x01
				p.mark()
			}
		}
		if _, err := c.Write(rsp); err != nil {
			return
		}
	}
}

func (p *interposer) mark() {
	p.mu.Lock()
	p.substituted++
	p.mu.Unlock()
}

// assertNothingAuthorised checks that the interposer substituted something and that
// after it hwkms sent no salted session, no TPM2_Create and no TPM2_Load: the
// substitute key was never used.
func assertNothingAuthorised(t *testing.T, p *interposer) {
	t.Helper()
	n, after := p.seenAfter()
	if n == 0 {
		t.Fatal("the interposer never substituted anything: the test is not testing")
	}
	for _, cc := range after {
		switch cc {
		case tpm2.TPMCCStartAuthSession, tpm2.TPMCCCreate, tpm2.TPMCCLoad, tpm2.TPMCCEvictControl:
			t.Errorf("after the substitution hwkms sent command 0x%x (commands: %x)", uint32(cc), after)
		}
	}
}

// TestSubstitutedSRK: an interposer on the bus replaces the owner SRK in the
// TPM2_CreatePrimary answer. CreateKey refuses before salting the session that
// carries the new KEK's auth value to it, and the blob form of Open refuses before
// loading under it: a Name that is not the public area's, a key that is not the SRK
// template, or (with srkName pinned) a well-formed key that is not this TPM's SRK.
func TestSubstitutedSRK(t *testing.T) {
	sim := swtpmtest.New(t)
	ctx := testCtx(t)
	srk, err := ExportSRK(ctx, sim.Device)
	if err != nil {
		t.Fatal(err)
	}
	pin := hex.EncodeToString(srk.Name)
	auth := writeFile(t, "0123456789abcdef0123456789abcdef")

	// A blob made on the real TPM, for Open.
	good := Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "good.blob"), AuthFile: auth, SRKName: pin}
	createKey(t, good)

	for _, tc := range []struct {
		name  string
		subst substitution
		pin   bool
		want  string
	}{
		{"Name not of the public area", substFlipName, false, "is not the Name of the public area"},
		{"not the SRK template", substDuplicable, false, "not the TCG ECC P-256 SRK template"},
		{"another SRK-shaped key, srkName pinned", substNullSRK, true, "srkName pins " + pin},
	} {
		t.Run(tc.name+"/CreateKey", func(t *testing.T) {
			p := newInterposer(t, sim)
			p.subst = tc.subst
			cfg := Config{Device: p.device(), BlobFile: filepath.Join(t.TempDir(), "kek.blob"), AuthFile: auth}
			if tc.pin {
				cfg.SRKName = pin
			}
			_, err := CreateKey(ctx, cfg)
			if !errors.Is(err, ErrSRKMismatch) || !errors.Is(err, kek.ErrUnavailable) || err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("CreateKey = %v, want ErrSRKMismatch and kek.ErrUnavailable saying %q", err, tc.want)
			}
			assertNothingAuthorised(t, p)
			if _, err := os.Lstat(cfg.BlobFile); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("blob file written: %v", err)
			}
		})
		t.Run(tc.name+"/Open", func(t *testing.T) {
			p := newInterposer(t, sim)
			p.subst = tc.subst
			cfg := good
			cfg.Device = p.device()
			if !tc.pin {
				cfg.SRKName = ""
			}
			k, err := Open(ctx, cfg)
			if err == nil {
				k.Close()
			}
			if !errors.Is(err, ErrSRKMismatch) || !errors.Is(err, kek.ErrUnavailable) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Open = %v, want ErrSRKMismatch and kek.ErrUnavailable saying %q", err, tc.want)
			}
			assertNothingAuthorised(t, p)
		})
	}

	// Without srkName the well-formed substitute is taken for the SRK: CreateKey
	// makes the KEK under the interposer's key, and the blob does not load under the
	// real SRK. This is what pinning srkName prevents.
	p := newInterposer(t, sim)
	p.subst = substNullSRK
	unpinned := Config{Device: p.device(), BlobFile: filepath.Join(t.TempDir(), "kek.blob"), AuthFile: auth}
	if _, err := CreateKey(ctx, unpinned); err != nil {
		t.Fatalf("CreateKey under the NULL-hierarchy substitute without srkName: %v", err)
	}
	unpinned.Device = sim.Device
	if _, err := Probe(ctx, unpinned); !errors.Is(err, ErrNotKEK) {
		t.Fatalf("Probe of the KEK made under the substitute = %v, want ErrNotKEK (it is not under this TPM's SRK)", err)
	}
}

// TestPinnedKeyID: Config.KeyID pins the KEK at a persistent handle. An interposer
// that answers TPM2_ReadPublic of that handle with another key's public area (here
// a second hwkms KEK on the same TPM) is refused at Open, by Probe and by
// DestroyKey, before any session is salted to it, and on the request path after a
// reconnect with kek.ErrUnavailable. Without KeyID, Open takes the substitute.
func TestPinnedKeyID(t *testing.T) {
	sim := swtpmtest.New(t)
	ctx := testCtx(t)
	const other = tpm2.TPMHandle(0x81010011)
	mine := createKey(t, Config{Device: sim.Device, PersistentHandle: testHandle})
	theirs := createKey(t, Config{Device: sim.Device, PersistentHandle: "0x81010011"})

	p := newInterposer(t, sim)
	cfg := Config{Device: p.device(), PersistentHandle: testHandle, KeyID: mine.KeyID}

	// Open with the pin and no interposition: fine.
	k := openKEK(t, sim, cfg)
	if k.ID() != mine.KeyID {
		t.Fatalf("ID = %s, want %s", k.ID(), mine.KeyID)
	}
	// The connection drops; on reconnect ReadPublic is answered with the other key.
	p.mu.Lock()
	p.readFrom, p.readTo, p.drop = tpm2.TPMHandle(0x81010010), other, true
	p.mu.Unlock()
	_, err := k.Wrap(ctx, []byte("data"), nil)
	if !errors.Is(err, ErrKeyIDMismatch) || !errors.Is(err, ErrNotKEK) || !errors.Is(err, kek.ErrUnavailable) {
		t.Fatalf("Wrap after the substitution = %v, want ErrKeyIDMismatch, ErrNotKEK and kek.ErrUnavailable", err)
	}
	if !strings.Contains(err.Error(), "the config's keyID pins "+mine.KeyID) || !strings.Contains(err.Error(), theirs.KeyID) {
		t.Errorf("Wrap error does not name both key_ids: %v", err)
	}
	assertNothingAuthorised(t, p)
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}

	p.mu.Lock()
	p.substituted, p.after = 0, nil
	p.mu.Unlock()
	k2, err := Open(ctx, cfg)
	if err == nil {
		k2.Close()
	}
	if !errors.Is(err, ErrKeyIDMismatch) || !strings.Contains(err.Error(), "keyID pins "+mine.KeyID) {
		t.Fatalf("Open with the substitution = %v, want ErrKeyIDMismatch naming keyID", err)
	}
	assertNothingAuthorised(t, p)
	if _, err := Probe(ctx, cfg); !errors.Is(err, ErrKeyIDMismatch) {
		t.Errorf("Probe with the substitution = %v, want ErrKeyIDMismatch", err)
	}
	if err := DestroyKey(ctx, cfg); !errors.Is(err, ErrKeyIDMismatch) {
		t.Errorf("DestroyKey with the substitution = %v, want ErrKeyIDMismatch", err)
	}
	if info, err := Probe(ctx, Config{Device: sim.Device, PersistentHandle: "0x81010011"}); err != nil || info.KeyID != theirs.KeyID {
		t.Errorf("the other key after DestroyKey was refused: %+v, %v", info, err)
	}

	// Without the pin the first Open trusts what it finds: it salts its sessions to
	// the substitute's public key (this interposer redirects only ReadPublic, so the
	// TPM then fails the session HMAC; one that answered every command itself would
	// have the session's salt).
	p.mu.Lock()
	p.substituted, p.after = 0, nil
	p.mu.Unlock()
	unpinned := cfg
	unpinned.KeyID = ""
	if k3, err := Open(ctx, unpinned); err == nil {
		k3.Close()
	}
	if _, after := p.seenAfter(); !slices.Contains(after, tpm2.TPMCCStartAuthSession) {
		t.Errorf("unpinned Open through the interposer started no salted session (commands %x): the pin is not what refused it above", after)
	}
}

// TestPinnedKeyIDBlob: KeyID also pins the blob form: a blob file holding another
// KEK is refused by Open, Probe and DestroyKey (the file stays).
func TestPinnedKeyIDBlob(t *testing.T) {
	sim := swtpmtest.New(t)
	ctx := testCtx(t)
	dir := t.TempDir()
	mine := createKey(t, Config{Device: sim.Device, BlobFile: filepath.Join(dir, "a.blob")})
	other := Config{Device: sim.Device, BlobFile: filepath.Join(dir, "b.blob")}
	createKey(t, other)
	other.KeyID = mine.KeyID
	if k, err := Open(ctx, other); !errors.Is(err, ErrKeyIDMismatch) || !errors.Is(err, ErrNotKEK) {
		if err == nil {
			k.Close()
		}
		t.Errorf("Open = %v, want ErrKeyIDMismatch", err)
	}
	if _, err := Probe(ctx, other); !errors.Is(err, ErrKeyIDMismatch) {
		t.Errorf("Probe = %v, want ErrKeyIDMismatch", err)
	}
	if err := DestroyKey(ctx, other); !errors.Is(err, ErrKeyIDMismatch) {
		t.Errorf("DestroyKey = %v, want ErrKeyIDMismatch", err)
	}
	if _, err := os.Stat(other.BlobFile); err != nil {
		t.Errorf("blob file after a refused destroy: %v", err)
	}
	if _, err := CreateKey(ctx, Config{Device: sim.Device, BlobFile: filepath.Join(dir, "c.blob"), KeyID: mine.KeyID}); err == nil || !strings.Contains(err.Error(), "keyID is set") {
		t.Errorf("CreateKey with keyID = %v, want a refusal", err)
	}
	right := Config{Device: sim.Device, BlobFile: mine.BlobFile, KeyID: mine.KeyID}
	k := openKEK(t, sim, right)
	if k.ID() != mine.KeyID {
		t.Errorf("ID = %s", k.ID())
	}
}

// TestKeyInfoFixedTPM: Probe reports fixedTPM for both forms, so callers (doctor,
// key destroy) can say which kind of KEK a persistent handle holds.
func TestKeyInfoFixedTPM(t *testing.T) {
	sim := swtpmtest.New(t)
	for _, f := range keyForms {
		cfg := f.cfg(t, sim)
		if info := createKey(t, cfg); !info.FixedTPM {
			t.Errorf("%s: CreateKey FixedTPM = false", f.name)
		}
		info, err := Probe(testCtx(t), cfg)
		if err != nil || !info.FixedTPM {
			t.Errorf("%s: Probe = %+v, %v; want FixedTPM", f.name, info, err)
		}
	}
}
