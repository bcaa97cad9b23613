package hsm

// #include <stdlib.h>
import "C"

import (
	"fmt"
	"strings"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// maxInitArgs bounds Config.InitArgs; the NSS softoken's string is about 100 bytes.
const maxInitArgs = 4096

// validateInitArgs checks Config.InitArgs for Validate.
func (c Config) validateInitArgs(bad func(name, format string, args ...any)) {
	switch {
	case len(c.InitArgs) > maxInitArgs:
		bad("initArgs", "longer than %d bytes", maxInitArgs)
	case strings.IndexByte(c.InitArgs, 0) >= 0:
		bad("initArgs", "must not contain a NUL byte (C_Initialize gets it as a C string)")
	}
}

// sameInitArgs refuses a second configuration of an already loaded module with other
// C_Initialize arguments. A module is initialised once per process, so two different
// strings cannot both be honoured; the registry keeps one module per path.
func (m *module) sameInitArgs(initArgs string) error {
	if initArgs == m.initArgs {
		return nil
	}
	return mark(fmt.Errorf("hsm: module %q is already initialised in this process with initArgs %q, and another configuration asks for initArgs %q: every key on one module must use the same initArgs (C_Initialize runs once per process)",
		m.path, m.initArgs, initArgs), ErrModule)
}

// initialize calls C_Initialize with CKF_OS_LOCKING_OK and, when the module was loaded
// with initArgs, a NUL-terminated copy of them in C memory as
// CK_C_INITIALIZE_ARGS.pReserved. The NSS softoken parses the string into copies of
// its own during C_Initialize, but pReserved is outside the PKCS#11 standard and
// another module might keep the pointer, so the copy is made once and lives until the
// module is unloaded (freeInitArgs, after its last C_Finalize), across
// re-initialisations. The caller holds registry or m.gate exclusively.
func (m *module) initialize() error {
	if m.initArgs == "" {
		return m.ctx.Initialize()
	}
	if m.cArgs == nil {
		m.cArgs = unsafe.Pointer(C.CString(m.initArgs))
	}
	return m.ctx.Initialize(pkcs11.InitializeWithReserved(m.cArgs))
}

// freeInitArgs frees the C copy of initArgs; called when the module is unloaded,
// after C_Finalize, or when its first C_Initialize failed.
func (m *module) freeInitArgs() {
	if m.cArgs != nil {
		C.free(m.cArgs)
		m.cArgs = nil
	}
}
