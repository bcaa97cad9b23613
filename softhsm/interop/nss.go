package interop

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

var nssPackages = []string{"libnss3", "libnss3-tools"}

// nssTokenLabel is the label of the NSS softoken's key and certificate database token
// (slot 2); slot 1, "NSS Generic Crypto Services", has no key storage.
const nssTokenLabel = "NSS Certificate DB"

// NSSInitArgs is the CK_C_INITIALIZE_ARGS.pReserved string that makes libsoftokn3.so
// open the SQL database in dir read-write. Without it C_Initialize fails.
func NSSInitArgs(dir string) string {
	return fmt.Sprintf("configdir='sql:%s' certPrefix='' keyPrefix='' secmod='secmod.db' flags=", dir)
}

// StartNSS makes a new NSS SQL database (cert9.db, key4.db) in t.TempDir() with a
// random password (the token's user PIN) using certutil and returns its token. No
// process is started: the softoken runs inside the module.
func StartNSS(t testing.TB) *Token {
	t.Helper()
	libs := need(t, "NSS softoken", nssPackages, []string{"certutil"},
		[]string{"/usr/lib/*/libsoftokn3.so"})
	dir := filepath.Join(t.TempDir(), "nssdb")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	tk := &Token{
		Impl:       "NSS softoken",
		Package:    "libnss3",
		Version:    dpkgVersion("libnss3"),
		Module:     libs[0],
		TokenLabel: nssTokenLabel,
		PIN:        randHex(t, 8),
		InitArgs:   NSSInitArgs(dir),
	}
	tk.PINFile = writePIN(t, tk.PIN)
	if _, err := run(nil, "", nil, "certutil", "-N", "-d", "sql:"+dir, "-f", tk.PINFile); err != nil {
		t.Fatalf("interop: certutil -N: %v", err)
	}
	describe(t, tk)
	return tk
}
