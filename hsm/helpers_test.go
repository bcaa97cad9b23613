package hsm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/softhsm"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

func TestMain(m *testing.M) { softhsmtest.Main(m) }

// newTokens makes n fresh tokens and registers a check, run after every other cleanup
// of the test, that no module or token reference leaked.
func newTokens(t testing.TB, n int) (*softhsm.Fixture, []softhsmtest.TokenInfo) {
	t.Helper()
	fx := softhsmtest.New(t)
	requireNoModules(t)
	t.Cleanup(func() { requireNoModules(t) })
	toks := make([]softhsmtest.TokenInfo, n)
	for i := range toks {
		toks[i] = softhsmtest.NewToken(t, fx)
	}
	return fx, toks
}

func requireNoModules(t testing.TB) {
	t.Helper()
	registry.Lock()
	defer registry.Unlock()
	for path, m := range registry.modules {
		t.Errorf("module %q still loaded with %d token references", path, m.refs)
	}
}

func cfgFor(fx *softhsm.Fixture, tok softhsmtest.TokenInfo, keyLabel string) Config {
	return Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: keyLabel}
}

func createKey(t testing.TB, cfg Config) KeyInfo {
	t.Helper()
	ki, err := CreateKey(context.Background(), cfg)
	if err != nil {
		t.Fatalf("CreateKey: %v", err)
	}
	return ki
}

func openKEK(t testing.TB, cfg Config) *KEK {
	t.Helper()
	k, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := k.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return k
}

// rawSession gives the test a read-write session on cfg's token through the shared
// module, for raw PKCS#11 calls the package does not offer.
func rawSession(t testing.TB, cfg Config) (p11, pkcs11.SessionHandle) {
	t.Helper()
	pin, err := cfg.readPIN()
	if err != nil {
		t.Fatal(err)
	}
	tok, err := acquireToken(context.Background(), cfg, pin)
	if err != nil {
		t.Fatalf("acquireToken: %v", err)
	}
	sh, err := tok.ctx.OpenSession(tok.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tok.ctx.CloseSession(sh); err != nil {
			t.Errorf("CloseSession: %v", err)
		}
		if err := releaseToken(tok); err != nil {
			t.Errorf("releaseToken: %v", err)
		}
	})
	return tok.ctx, sh
}

// roundTrip wraps and unwraps pt under k and checks the result.
func roundTrip(t testing.TB, k *KEK, pt, aad []byte) []byte {
	t.Helper()
	ctx := context.Background()
	body, err := k.Wrap(ctx, pt, aad)
	if err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	got, err := k.Unwrap(ctx, body, aad)
	if err != nil {
		t.Fatalf("Unwrap: %v", err)
	}
	if string(got) != string(pt) {
		t.Fatalf("Unwrap = %x, want %x", got, pt)
	}
	return body
}

// seam replaces loadModule for the duration of the test with one that wraps the real
// module with wrap. The module must not be loaded yet (newTokens checks that).
func seam(t testing.TB, wrap func(p11) p11) {
	t.Helper()
	orig := loadModule
	loadModule = func(path string) (p11, error) {
		c, err := orig(path)
		if err != nil {
			return nil, err
		}
		return wrap(c), nil
	}
	t.Cleanup(func() { loadModule = orig })
}

// faulty is a p11 that counts calls and returns injected errors instead of calling
// the module: faults[name] is consumed one entry per call.
type faulty struct {
	p11
	mu     sync.Mutex
	calls  map[string]int
	faults map[string][]error
}

func newFaulty(c p11) *faulty {
	return &faulty{p11: c, calls: map[string]int{}, faults: map[string][]error{}}
}

func (f *faulty) hit(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[name]++
	if q := f.faults[name]; len(q) > 0 {
		f.faults[name] = q[1:]
		return q[0]
	}
	return nil
}

func (f *faulty) inject(name string, errs ...error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.faults[name] = append(f.faults[name], errs...)
}

func (f *faulty) count(name string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[name]
}

func (f *faulty) Initialize(opts ...pkcs11.InitializeOption) error {
	if err := f.hit("Initialize"); err != nil {
		return err
	}
	return f.p11.Initialize(opts...)
}

func (f *faulty) Login(sh pkcs11.SessionHandle, userType uint, pin string) error {
	if err := f.hit("Login"); err != nil {
		return err
	}
	return f.p11.Login(sh, userType, pin)
}

func (f *faulty) OpenSession(slot, flags uint) (pkcs11.SessionHandle, error) {
	if err := f.hit("OpenSession"); err != nil {
		return 0, err
	}
	return f.p11.OpenSession(slot, flags)
}

func (f *faulty) CloseSession(sh pkcs11.SessionHandle) error {
	if err := f.hit("CloseSession"); err != nil {
		return err
	}
	return f.p11.CloseSession(sh)
}

func (f *faulty) EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	if err := f.hit("EncryptInit"); err != nil {
		return err
	}
	return f.p11.EncryptInit(sh, m, o)
}

func (f *faulty) FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error {
	if err := f.hit("FindObjectsInit"); err != nil {
		return err
	}
	return f.p11.FindObjectsInit(sh, temp)
}

func writeFile(path, content string) error { return os.WriteFile(path, []byte(content), 0o600) }

// keyIDFor recomputes KeyID independently of its implementation.
func keyIDFor(label string, id []byte) string {
	sum := sha256.Sum256(append(append([]byte("hwkms/pkcs11/key_id\x00"+label), 0), id...))
	return hex.EncodeToString(sum[:16])
}
