package interop

import (
	"testing"

	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// StartSoftHSM2 makes a fresh SoftHSM2 token with softhsmtest (whose Main must run
// from the test binary's TestMain) and returns it as a Token, so a matrix test can
// range over every implementation. Make it before the module is first initialised in
// the process (see softhsmtest).
func StartSoftHSM2(t testing.TB) *Token {
	t.Helper()
	fx := softhsmtest.New(t)
	st := softhsmtest.NewToken(t, fx)
	tk := &Token{
		Impl:       "SoftHSM2",
		Package:    "softhsm2",
		Version:    dpkgVersion("softhsm2"),
		Module:     fx.Module,
		TokenLabel: st.Label,
		PIN:        st.PIN,
		PINFile:    st.PINFile,
	}
	describe(t, tk)
	return tk
}

// Starter starts one implementation's token; Starters lists every implementation.
type Starter struct {
	// Name is the implementation's name, as Token.Impl.
	Name  string
	Start func(testing.TB) *Token
}

// Starters are the four implementations. SoftHSM2, the reference hwkms is tested on,
// comes last: loaded before opencryptoki, it makes opencryptoki's re-initialisation
// crash the process (docs/tokens.md).
var Starters = []Starter{
	{"opencryptoki", StartOpencryptoki},
	{"tpm2-pkcs11", StartTPM2PKCS11},
	{"NSS softoken", StartNSS},
	{"SoftHSM2", StartSoftHSM2},
}
