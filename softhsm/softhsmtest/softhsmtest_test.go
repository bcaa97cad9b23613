package softhsmtest

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/softhsm"
)

func TestMain(m *testing.M) { Main(m) }

func TestNewTokenIsFresh(t *testing.T) {
	fx := New(t)
	if got := os.Getenv(softhsm.ConfEnv); got != fx.ConfPath {
		t.Errorf("%s = %q, want %q", softhsm.ConfEnv, got, fx.ConfPath)
	}
	a, b := NewToken(t, fx), NewToken(t, fx)
	if a.Label == b.Label || a.Serial == b.Serial || a.PIN == b.PIN {
		t.Errorf("two tokens share state: %+v %+v", a, b)
	}
	pin, err := os.ReadFile(a.PINFile)
	if err != nil || string(pin) != a.PIN+"\n" {
		t.Errorf("PIN file = %q, %v", pin, err)
	}
	if st, err := os.Stat(a.PINFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("PIN file mode = %v, %v; want 0600", st.Mode(), err)
	}
	label, pinFile := Token(t, fx)
	if label == "" || pinFile == "" || label == a.Label {
		t.Errorf("Token = %q, %q", label, pinFile)
	}
}

// recorder records whether a test was skipped or failed instead of stopping it.
type recorder struct {
	testing.TB
	skipped, failed bool
}

func (r *recorder) Helper()               {}
func (r *recorder) Skipf(string, ...any)  { r.skipped = true }
func (r *recorder) Fatalf(string, ...any) { r.failed = true }
func (r *recorder) Logf(string, ...any)   {}
func (r *recorder) Errorf(string, ...any) { r.failed = true }

func TestUnavailableSkipsUnlessCI(t *testing.T) {
	missing := errors.New("softhsm2-util not found")
	t.Setenv("CI", "")
	r := &recorder{TB: t}
	unavailable(r, missing)
	if !r.skipped || r.failed {
		t.Errorf("without CI: skipped=%v failed=%v, want a skip", r.skipped, r.failed)
	}
	t.Setenv("CI", "true")
	r = &recorder{TB: t}
	unavailable(r, missing)
	if r.skipped || !r.failed {
		t.Errorf("with CI: skipped=%v failed=%v, want a failure", r.skipped, r.failed)
	}
}

func TestFixtureConf(t *testing.T) {
	fx := New(t)
	conf, err := os.ReadFile(fx.ConfPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"directories.tokendir = " + fx.TokenDir, "objectstore.backend = file", "log.level = ERROR"} {
		if !strings.Contains(string(conf), want+"\n") {
			t.Errorf("softhsm2.conf lacks %q:\n%s", want, conf)
		}
	}
	if fx.Env() != "SOFTHSM2_CONF="+fx.ConfPath {
		t.Errorf("Env = %q", fx.Env())
	}
}
